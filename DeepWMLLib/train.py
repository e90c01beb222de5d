"""Headless training of the 2D U-Net: `deepwml train`, `python -m DeepWMLLib.train`, or `train()`.

The recipe follows the DeepWML paper (Zhang et al. 2021): 2D axial slices on the network grid,
BCE + Dice loss, Adam at 1e-4, random flips and ±10° rotations, 60/20/20 split of the cases
stratified by centre and disease, the best epoch chosen on validation Dice. From the MICCAI 2017
winner (Li et al.): shear and scale augmentation and ensembles of models trained from different
seeds. From the CSVD-WMH system (Tiantan 2022): intensity augmentation (contrast, gamma, bias
field, noise), learning-rate reduction on plateau and early stopping.

Slices are prepared exactly as inference prepares them (`prepare_volume` mirrors
`inference.predict_probabilities`): the same head mask, normalisation, network grid and the same
rule for skipping slices without head. They are cached once per run folder as .npy memmaps.

Reproducibility: every random choice of an epoch (which slices, crops, augmentations) comes from
generators seeded by (seed, epoch[, rank]), and `last.pt` (weights, optimiser, scheduler, history,
early-stopping state) is written atomically after every epoch, so a run killed at any moment and
resumed gives on CPU bit for bit the weights an uninterrupted run gives (same thread count).

Run folder (single model; with `ensemble` N the per-model files go to model_0 .. model_{N-1}):
    config.json     the training configuration (a resume must match it)
    split.csv       case, centre, disease, split (train / val / test)
    data.json       the train and val cases' files by content (a resume must train on the same)
    cache/          prepared network-grid slices (float16 images, uint8 labels) per split
    flair_check.csv     each case's FLAIR check (`deepwml segment`'s, contrast.py): what it looks like and its figures
    skipped_cases.csv   cases left out by `skip_bad_cases`, with the reason (only when any)
    history.csv     one row per epoch
    last.pt         full training state for resuming
    best.pt         self-describing model file of the best validation epoch (`deepwml segment --model`)

This module imports torch only inside functions so that `deepwml --help` stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import datetime
import hashlib
import json
import logging
import math
import os
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from . import io
from .checkpoint import shareable_provenance
from .cli import progress_line, say
from .errors import Cancelled, DeepWMLError, UsageError
from .preprocessing import PreprocessingConfig

log = logging.getLogger(__name__)

Progress = Callable[[float, str], None]

STATE_FORMAT = "deepwml-training-state"
STATE_VERSION = 1
SPLITS = ("train", "val", "test")
HISTORY_COLUMNS = ("epoch", "train_loss", "val_loss", "val_dice", "val_sensitivity", "val_precision", "lr", "seconds")

DEFAULT_AUGMENTATION = {
    "flip": True,  # left-right, p = 0.5 (paper)
    "rotate_deg": 10.0,  # uniform ± (paper)
    "shear_deg": 18.0,  # uniform ± (MICCAI winner)
    "scale": [0.9, 1.1],  # uniform (MICCAI winner)
    "contrast": [0.75, 1.25],  # multiplies the normalised image, p = 0.5 (CSVD)
    "gamma": [0.7, 1.5],  # log-uniform, p = 0.5 (CSVD)
    "bias_field": 0.3,  # max amplitude of a smooth multiplicative field, p = 0.5 (CSVD)
    "noise_std": 0.1,  # Gaussian noise, std up to this in normalised units, p = 0.5 (CSVD)
}
_INTENSITY_P = 0.5

# Settings that may change when a run is resumed: they change where and how long it runs, not what
# it computes (on CPU the thread count can change the last bits; see the module docstring).
_RUNTIME_KEYS = ("epochs", "device", "threads", "skip_bad_cases", "allow_non_flair")
# Runtime keys that decide which cases a run is prepared with: a run that has trained an epoch keeps its cases, so
# these keep the values it was prepared with (in config.json and the models' provenance), whatever a rerun gives.
_CASE_DECISIONS = ("skip_bad_cases", "allow_non_flair")


# ---------------------------------------------------------------------------------------------
# Configuration


@dataclass
class TrainConfig:
    manifest: str = ""
    split: str | None = None  # a split CSV (case, split) instead of the seeded stratified split
    architecture: dict = field(default_factory=lambda: {"name": "unet2d", "base_channels": 64, "depth": 4,
                                                        "batch_norm": False})
    preprocessing: dict = field(default_factory=lambda: PreprocessingConfig().to_dict())
    epochs: int = 200
    batch_size: int = 8
    learning_rate: float = 1e-4
    samples_per_epoch: int | None = None  # default: the number of training slices
    lesion_fraction: float | None = None  # share of slices with lesion per epoch; None: as in the data
    patch_size: int | None = None  # random square crops for cheaper training; None: whole grid
    augmentation: dict = field(default_factory=lambda: dict(DEFAULT_AUGMENTATION))
    dice_weight: float = 1.0  # loss = BCE + dice_weight * (1 - soft Dice)
    threshold: float = 0.5
    seed: int = 0
    val_fraction: float = 0.2
    test_fraction: float = 0.2
    plateau_patience: int | None = None  # ReduceLROnPlateau on val Dice when set
    plateau_factor: float = 0.5
    early_stopping_patience: int | None = None  # stop after this many epochs without a better val Dice
    ensemble: int = 1
    amp: bool = True  # mixed precision on GPU
    cpu_bf16: bool = False  # on the CPU: bf16 autocast and channels-last (needs native bf16: AMX or AVX512-BF16)
    device: str = "auto"
    threads: int | None = None
    skip_bad_cases: bool = False
    allow_non_flair: bool = False  # train on cases the FLAIR check calls T1-, T2- or PD-weighted (else refused or skipped)
    init: str | None = None  # start from the weights of this model file (fine-tuning); same architecture
    mask_column: str = "mask"  # the manifest column of the target masks (e.g. intracranial, for the brain mask)
    label_name: str = "WMH"  # what label 1 of the trained model means (written into the model file)
    ignore_label: int | None = None  # mask value left out of the loss and validation (uncertain or unlabelled voxels)

    @classmethod
    def coerce(cls, config: "dict | TrainConfig") -> "TrainConfig":
        if isinstance(config, TrainConfig):
            config = config.to_dict()
        if config is not None and not isinstance(config, dict):
            raise DeepWMLError(f"training settings must be a JSON object of name: value, got {type(config).__name__}")
        config = dict(config or {})
        unknown = sorted(set(config) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise DeepWMLError(f"unknown training settings {unknown}; see `deepwml train --help`")
        cfg = cls(**config)
        try:
            cfg.validate()
        except (TypeError, AttributeError) as exc:  # e.g. "learning_rate": "1e-3" in a --config file
            raise DeepWMLError(f"a training setting has the wrong type ({exc}); numbers must be JSON numbers, "
                               "not strings") from exc
        return cfg

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def validate(self) -> None:
        from .model import size_multiple, validate_config

        if not self.manifest:
            raise DeepWMLError("no manifest given; pass the manifest CSV (columns case, flair, mask)")
        self.manifest = str(Path(self.manifest).expanduser().resolve())
        if self.split:
            self.split = str(Path(self.split).expanduser().resolve())
        if self.init:
            self.init = str(Path(self.init).expanduser().resolve())
        try:
            self.architecture = validate_config(self.architecture)
            self.preprocessing = PreprocessingConfig.from_dict(self.preprocessing).to_dict()
        except ValueError as exc:
            raise DeepWMLError(f"{exc}; fix the architecture or preprocessing settings") from exc
        augmentation = dict(DEFAULT_AUGMENTATION)
        unknown = sorted(set(self.augmentation) - set(augmentation))
        if unknown:
            raise DeepWMLError(f"unknown augmentation settings {unknown}; known: {sorted(augmentation)}")
        augmentation.update(self.augmentation)
        self.augmentation = augmentation
        positive = {"epochs": self.epochs, "batch_size": self.batch_size, "ensemble": self.ensemble}
        for name, value in positive.items():
            if not isinstance(value, int) or value < 1:
                raise DeepWMLError(f"{name} must be a whole number >= 1, got {value!r}")
        optional = {"samples_per_epoch": (self.samples_per_epoch, 1), "plateau_patience": (self.plateau_patience, 0),
                    "early_stopping_patience": (self.early_stopping_patience, 1), "threads": (self.threads, 1)}
        for name, (value, least) in optional.items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
                raise DeepWMLError(f"{name} must be a whole number >= {least} (or left out), got {value!r}")
        if not self.learning_rate > 0:
            raise DeepWMLError(f"learning rate must be positive, got {self.learning_rate!r}")
        if not 0 < self.threshold < 1:
            raise DeepWMLError(f"threshold must be between 0 and 1 (exclusive), got {self.threshold!r}")
        if not 0 <= self.dice_weight < float("inf"):
            raise DeepWMLError(f"Dice weight must be 0 or more, got {self.dice_weight!r}")
        for name in ("scale", "contrast", "gamma"):
            value = self.augmentation.get(name)
            if value is not None and (len(value) != 2 or not 0 < value[0] <= value[1]):
                raise DeepWMLError(f"augmentation {name} must be a range LO,HI with 0 < LO <= HI, got {value!r}")
        for name in ("rotate_deg", "shear_deg", "bias_field", "noise_std"):
            value = self.augmentation.get(name)
            if value is not None and not value >= 0:
                raise DeepWMLError(f"augmentation {name} must be 0 or more, got {value!r}")
        if self.lesion_fraction is not None and not 0 <= self.lesion_fraction <= 1:
            raise DeepWMLError(f"lesion fraction must be between 0 and 1, got {self.lesion_fraction!r}")
        if not (0 < self.val_fraction < 1 and 0 <= self.test_fraction < 1 and self.val_fraction + self.test_fraction < 1):
            raise DeepWMLError("validation and test fractions must leave cases for training (e.g. 0.2 and 0.2)")
        multiple = size_multiple(self.architecture)
        grid = self.preprocessing["grid_size"]
        if any(g % multiple for g in grid):
            raise DeepWMLError(f"grid size {grid} must be a multiple of {multiple} for a U-Net of depth "
                               f"{self.architecture['depth']}")
        if self.patch_size is not None:
            if self.patch_size % multiple or not multiple <= self.patch_size <= min(grid):
                raise DeepWMLError(f"patch size {self.patch_size} must be a multiple of {multiple} "
                                   f"and at most the grid size {min(grid)}")
            if self.patch_size == min(grid) == max(grid):
                self.patch_size = None
        smallest = (self.patch_size or min(grid)) // multiple  # pixels across at the U-Net's bottom
        if self.architecture.get("batch_norm") and self.batch_size == 1 and smallest < 2:
            raise DeepWMLError(f"with batch norm, a batch of 1 slice needs more than one pixel at the U-Net's bottom: "
                               f"use a batch size of 2 or more, or patches of at least {2 * multiple} pixels")
        if self.ignore_label is not None and (isinstance(self.ignore_label, bool) or not isinstance(self.ignore_label, int)
                                              or not 2 <= self.ignore_label <= 255):
            raise DeepWMLError(f"ignore label must be a mask value from 2 to 255 (0 is background, 1 lesion), "
                               f"got {self.ignore_label!r}")

    def member(self, k: int) -> "TrainConfig":
        """The configuration of ensemble member k (its own seed)."""
        return dataclasses.replace(self, seed=self.seed + k, ensemble=1)


def _config_differences(stored: dict, current: dict) -> list[str]:
    """Settings that differ; one a stored config lacks (written before it existed) counts as its default."""
    defaults = TrainConfig().to_dict()
    keys = sorted((set(stored) | set(current)) - set(_RUNTIME_KEYS))
    return [k for k in keys if stored.get(k, defaults.get(k)) != current.get(k, defaults.get(k))]


# ---------------------------------------------------------------------------------------------
# Manifest and split


@dataclass(frozen=True)
class Case:
    case: str
    flair: str
    mask: str
    centre: str = ""
    disease: str = ""


def read_manifest(path: str | os.PathLike, mask_column: str = "mask") -> list[Case]:
    """Cases of a manifest CSV: columns case, flair, mask (centre, disease optional); paths may be
    relative to the CSV's folder (`io.read_manifest_rows`, `io.manifest_path`: read as evaluate, consensus and
    change read theirs). `mask_column` names another column to take the masks from (the target of training).
    A column `center` is the centre (else the split would silently not stratify by it).
    Raises DeepWMLError on a missing file, missing column or duplicate."""
    path = Path(path)
    mask_column = mask_column.strip().lower()
    numbered = io.read_manifest_rows(path, ("case", "flair", mask_column), ("centre", "disease"),
                                     " (deepwml synth writes one as manifest.csv)")
    cases, seen, scans = [], set(), {}
    for line, row in numbered:
        if not row.get("case") or not row.get("flair") or not row.get(mask_column):
            raise DeepWMLError(f"manifest {path} line {line}: case, flair and {mask_column} must all be filled in")
        if row["case"] in seen:
            raise DeepWMLError(f"manifest {path} line {line}: case {row['case']!r} appears twice; case names must be unique")
        seen.add(row["case"])
        flair = io.manifest_path(path.parent, row["flair"])
        if flair in scans:
            raise DeepWMLError(f"manifest {path} line {line}: case {row['case']!r} has the FLAIR of case {scans[flair]!r}; "
                               "one scan in two cases can land in training and validation at once: list it once")
        scans[flair] = row["case"]
        cases.append(Case(row["case"], flair, io.manifest_path(path.parent, row[mask_column]),
                          row.get("centre", ""), row.get("disease", "")))
    return cases


def _sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def stratified_split(cases: list[Case], seed: int, val_fraction: float = 0.2, test_fraction: float = 0.2) -> dict[str, str]:
    """case -> 'train' | 'val' | 'test', stratified by (centre, disease), deterministic by seed.

    Cases are shuffled within each stratum and the strata laid end to end; walking that list, each
    case goes to the set furthest behind its quota. Every stratum is then split within one case of
    the fractions, and strata too small to split (one or two cases) alternate between the sets
    instead of all landing in training, so the overall fractions hold too.
    """
    rng = np.random.default_rng(seed)
    strata: dict[tuple, list[str]] = {}
    for c in sorted(cases, key=lambda c: c.case):
        strata.setdefault((c.centre, c.disease), []).append(c.case)
    order = [name for key in sorted(strata) for name in rng.permutation(strata[key]).tolist()]
    fractions = {"train": 1.0 - val_fraction - test_fraction, "val": val_fraction, "test": test_fraction}
    counts = dict.fromkeys(SPLITS, 0)
    assignment = {}
    for i, name in enumerate(order, start=1):
        chosen = max(SPLITS, key=lambda s: (round(i * fractions[s] - counts[s], 9), -SPLITS.index(s)))
        counts[chosen] += 1
        assignment[name] = chosen
    return assignment


def _read_config(path: str) -> dict:
    """The settings of `--config`: a JSON object (DeepWMLError for anything else)."""
    try:
        config = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise DeepWMLError(f"--config {path} cannot be read ({exc.strerror or exc})") from exc
    except (UnicodeDecodeError, ValueError) as exc:
        raise DeepWMLError(f"--config {path} is not JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise DeepWMLError(f"--config {path} holds a JSON {type(config).__name__}; it must hold an object of settings "
                           '(e.g. {"epochs": 50, "batch_size": 16})')
    return config


def _split_rows(path: Path) -> list[dict]:
    """The rows of a split CSV (columns case, split), whitespace stripped and a cell written as text for a spreadsheet
    (`io.spreadsheet_cell`: split.csv's '-AX FLAIR) read as it was, blank rows left out."""
    if not path.is_file():
        raise DeepWMLError(f"split file {path} does not exist; pass a CSV with columns case, split")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            first = f.readline()  # ',' or, as Excel's 'CSV UTF-8' writes in many languages, ';' (as a manifest)
            f.seek(0)
            rows = [{(k or "").strip().lower(): io.plain_cell((v or "").strip()) for k, v in row.items()
                     if isinstance(v, str) or v is None}
                    for row in csv.DictReader(f, delimiter=io.csv_delimiter(first, ("case", "split")))]  # extra fields on a row (a list under no column) are left out
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DeepWMLError(f"split file {path} is not a readable CSV ({exc}); save it as UTF-8 CSV") from exc
    rows = [row for row in rows if any(row.values())]
    if not rows or "case" not in rows[0] or "split" not in rows[0]:
        raise DeepWMLError(f"split file {path} needs the columns case, split (train, val or test)")
    return rows


def did_you_mean(name: str, likely, known=()) -> str:
    """' (did you mean 'a' or 'b'?)' naming up to three names close to the mistyped `name` (difflib's), sought
    first among `likely` (a split file's: the manifest's cases it gave no row) and then among all `known`; '' when
    none is close. A name that differs in letter case alone is the one named."""
    import difflib

    for pool in (sorted(likely), sorted(known)):
        same = [n for n in pool if n.casefold() == name.casefold()]
        close = same[:1] or difflib.get_close_matches(name, pool, n=3, cutoff=0.6)
        if close:
            return f" (did you mean {' or '.join(repr(n) for n in close)}?)"
    return ""


def read_split(path: str | os.PathLike, cases: list[Case]) -> dict[str, str]:
    path = Path(path)
    rows = _split_rows(path)
    known = {c.case for c in cases}
    assignment, unknown, seen = {}, [], set()
    for row in rows:
        if row["case"] in seen:  # one not in the manifest too: named once among them, not twice
            raise DeepWMLError(f"split file {path}: case {row['case']!r} is listed twice; give each case one split")
        seen.add(row["case"])
        if row["split"] not in SPLITS:
            raise DeepWMLError(f"split file {path}: case {row['case']!r} has split {row['split']!r}; use train, val or test")
        if row["case"] not in known:
            unknown.append(row["case"])
            continue
        assignment[row["case"]] = row["split"]
    if unknown:  # all of them at once, each with the manifest's nearest names: a typo is mended in one go
        shown = "; ".join(f"{name!r}{did_you_mean(name, known - set(assignment), known)}" for name in unknown[:3])
        more = f"; and {len(unknown) - 3} more" if len(unknown) > 3 else ""
        raise DeepWMLError(f"split file {path}: {len(unknown)} case(s) not in the manifest: {shown}{more}; "
                           "name each case as the manifest's case column does")
    absent = sorted(known - set(assignment))
    if absent:
        shown = ", ".join(absent[:3]) + (", ..." if len(absent) > 3 else "")
        raise DeepWMLError(f"split file {path} does not assign {len(absent)} manifest case(s) ({shown}); give each a "
                           "row (train, val or test), or take them out of the manifest")
    return assignment


def write_split(path: Path, cases: list[Case], assignment: dict[str, str]) -> None:
    _write_csv(path, ["case", "centre", "disease", "split"], [(c.case, c.centre, c.disease, assignment[c.case]) for c in cases])


def _write_csv(path: Path, header: list[str], rows) -> None:
    io.write_csv_text(io.csv_text(header, (dict(zip(header, row)) for row in rows)), path)


# ---------------------------------------------------------------------------------------------
# Data preparation (must match inference exactly)


# Cached label values: 0 background, 1 lesion, IGNORED for voxels left out of loss and validation.
IGNORED = 2


def prepare_volume(image, mask, preprocessing: PreprocessingConfig,
                   ignore_label: int | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """Network-grid slices of one case as inference sees them.

    Returns (images float32 [n, H, W], labels uint8 [n, H, W], lesion on skipped slices in network pixels):
    only the slices inference segments (enough head) are kept; lesion on the others can never be
    found, and validation counts it as missed. Labels are 1 for lesion (any positive mask value but
    `ignore_label`), IGNORED where the mask holds `ignore_label` (and no lesion), 0 elsewhere; each is
    resampled to the network grid and kept where it covers at least half a pixel.
    """
    from .preprocessing import plan_volume

    stack, frame = io.to_axial_stack(image)
    labels, _ = io.to_axial_stack(mask)
    ignore = labels == ignore_label if ignore_label is not None else None
    lesion = ((labels > 0) if ignore is None else (labels > 0) & ~ignore).astype(np.float32)  # as in metrics
    plan = plan_volume(stack, frame, [preprocessing])
    images = plan.network_slices(stack, plan.kept, preprocessing)
    grid = plan.grids[preprocessing]
    network_labels = (grid.to_network(lesion[plan.kept]) > 0.5).astype(np.uint8)
    if ignore is not None and ignore.any():
        left_out = (grid.to_network(ignore[plan.kept].astype(np.float32)) > 0.5) & (network_labels == 0)
        network_labels[left_out] = IGNORED
    skipped = np.ones(lesion.shape[0], bool)
    skipped[plan.kept] = False
    # in network pixels, the unit validation counts everything else in
    return images, network_labels, int(round(float(lesion[skipped].sum()) / float(np.prod(grid.zoom))))


def _case_key(case: Case, preprocessing: dict, ignore_label: int | None = None) -> str:
    parts = [case.case, preprocessing] + ([{"ignore_label": ignore_label}] if ignore_label is not None else [])
    for p in (case.flair, case.mask):
        try:
            st = os.stat(p)
        except OSError:  # a name too long, a folder without access: reading the case says so, naming it
            parts.append([p, None, None])
            continue
        parts.append([p, st.st_size, st.st_mtime_ns])
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


@dataclass
class SliceSet:
    """The cached slices of one split: memmapped arrays plus per-slice facts."""

    images: np.ndarray  # float16 [N, H, W]
    labels: np.ndarray  # uint8 [N, H, W]
    case_index: np.ndarray  # int32 [N]
    lesion_pixels: np.ndarray  # int64 [N]
    cases: list
    missed_lesion_voxels: int  # lesion on slices inference skips (counted as missed), in network pixels

    @classmethod
    def open(cls, folder: Path, split: str) -> "SliceSet":
        meta = json.loads((folder / f"{split}.json").read_text(encoding="utf-8"))
        index = np.load(folder / f"{split}_index.npz")
        return cls(np.load(folder / f"{split}_images.npy", mmap_mode="r"), np.load(folder / f"{split}_labels.npy", mmap_mode="r"),
                   index["case_index"], index["lesion_pixels"], meta["cases"], int(meta["missed_lesion_voxels"]))

    def __len__(self) -> int:
        return int(self.images.shape[0])


@io.dicom_headers_read_once()  # a FLAIR folder several rows name
def prepare_cache(cases: list[Case], assignment: dict[str, str], preprocessing: dict, folder: Path,
                  skip_bad_cases: bool, progress: Progress | None = None, cancel=None,
                  ignore_label: int | None = None, flair_check: Callable | None = None,
                  allow_non_flair: bool = False, flair_table: Path | None = None,
                  started: bool = False, started_with: dict | None = None) -> list[tuple[str, str]]:
    """Prepare the train and val cases once into `folder`; returns the skipped (case, reason) pairs.

    Each case is first saved on its own (named by a hash of its files and the preprocessing), so an
    interrupted preparation continues where it stopped; then each split is gathered into one memmap.
    `flair_check(image, mask)` (`flair_checker`), when given, judges each case's contrast once (kept beside
    its slices, so a rerun does not judge it again) and its figures go to `flair_table`: cases that do not
    look like a FLAIR are refused, naming them, before any split is gathered, or with `skip_bad_cases` left
    out; `allow_non_flair` trains on them, with a warning. A prepared cache whose decisions `allow_non_flair` or
    `skip_bad_cases` now reverse (a case left out that would now be refused, trained or left out the other way) is
    prepared again (the checks kept, not run again), unless the run has `started` (trained an epoch): it keeps
    its cases, and is told so; prepared again all the same (a file of it deleted), it is prepared with the
    decisions it started with (`started_with`: skip_bad_cases, allow_non_flair as its config.json keeps them).
    """
    cfg = PreprocessingConfig.from_dict(preprocessing)
    parts = io.make_output_dir(folder / "cases")
    wanted = [c for c in cases if assignment[c.case] in ("train", "val")]
    tested = [c for c in cases if assignment[c.case] == "test"]  # read and checked, not prepared
    keys = {c.case: _case_key(c, preprocessing, ignore_label) for c in wanted + tested}
    # which split each case is in belongs to the signature: a run set up again with another split (or
    # seed) must not train on the old split's cases
    signature = hashlib.sha256(json.dumps(sorted((case, key, assignment[case]) for case, key in keys.items())
                                          ).encode()).hexdigest()
    done_file = folder / "cache.json"
    known_checks: dict[str, dict] = {}  # the checks of a cache prepared again for --allow-non-flair: not run again
    if done_file.is_file():
        done = json.loads(done_file.read_text(encoding="utf-8"))
        if done.get("signature") == signature:
            trained = done.get("not_flair") or []  # cases the check called non-FLAIR, trained on (--allow-non-flair)
            left_out = [name for name, reason in done["skipped"] if reason.startswith(_NOT_FLAIR_REASON)]
            unreadable = [name for name, reason in done["skipped"] if not reason.startswith(_NOT_FLAIR_REASON)]
            # a decision the command now reverses, before any epoch: prepared again, as a new run would be (cases
            # left out that are now refused, trained or left out the other way)
            flair_reversed = (trained and not allow_non_flair) or (left_out and (allow_non_flair or not skip_bad_cases))
            skip_reversed = unreadable and not skip_bad_cases
            # a file of the gathered splits gone (deleted to save space, say): prepared again, as a cache deleted whole is
            complete = all((folder / f"{split}{part}").is_file() for split in ("train", "val")
                           for part in ("_images.npy", "_labels.npy", "_index.npz", ".json"))
            if complete and (started or not (skip_reversed or (flair_reversed and flair_check is not None))):
                _say_kept_non_flair(trained, left_out, allow_non_flair)
                shutil.rmtree(parts, ignore_errors=True)  # left by a run killed as it marked the cache done
                return [tuple(s) for s in done["skipped"]]
            known_checks = done.get("flair_checks") or {}
            for key, check in known_checks.items():  # kept beside the slices: a preparation refused part way (an
                # unreadable case, --skip-bad-cases dropped) loses cache.json, and the next run still has them
                if key in keys.values():
                    io.write_text(json.dumps(check), parts / f"{key}_flair_check.json")
        done_file.unlink()
    asked_allow_non_flair = allow_non_flair  # the resume's, said against the run's below
    if started and started_with:  # a started run keeps its cases, its cache prepared again or not
        skip_bad_cases = started_with.get("skip_bad_cases", skip_bad_cases)
        allow_non_flair = started_with.get("allow_non_flair", allow_non_flair)
    log.info("preparing %d cases into %s%s", len(wanted), folder,
             f" (and checking the {len(tested)} test case(s))" if tested else "")
    skipped, several_values, several_segments = [], [], []
    # lesion values the masks read here hold, and whether any holds --ignore-label's: an ignore label none holds
    # (the raters' 9 given as 2, say) leaves nothing out and trains their uncertain voxels as lesion, in silence
    lesion_values, ignored_found, all_read_here, read_here = set(), False, True, 0
    checks: dict[str, dict] = {}
    everything = wanted + tested
    for i, case in enumerate(everything):
        if cancel is not None and cancel():
            raise Cancelled()
        if progress:
            verb = "preparing" if i < len(wanted) else "checking test case"
            progress(i / len(everything), f"{verb} {case.case} ({i + 1}/{len(everything)})")
        target = parts / f"{keys[case.case]}.npz"
        checked = parts / f"{keys[case.case]}_flair_check.json"
        if target.is_file() and (flair_check is None or checked.is_file()):
            if flair_check is not None:
                checks[case.case] = json.loads(checked.read_text(encoding="utf-8"))
            all_read_here = False
            continue
        try:
            # a DICOM folder's series chosen once: read, and its header checked (_warn_header_not_flair)
            series = io.choose_dicom_series(case.flair, option=None)[0] if os.path.isdir(case.flair) else None
            image = io.read_image(case.flair, series=series)
            # a DICOM SEG's frames placed by the images of that series they name (io.mask_source's series)
            mask = io.read_mask(case.mask, reference=image, reference_name=f"its FLAIR {case.flair}", source=series)
            if flair_check is not None:
                if keys[case.case] in known_checks:
                    checks[case.case] = known_checks[keys[case.case]]
                elif checked.is_file():  # judged before an interruption, not yet prepared
                    checks[case.case] = json.loads(checked.read_text(encoding="utf-8"))
                else:
                    checks[case.case] = flair_check(image, mask)
                    _tell_not_flair_at_once(case.case, checks[case.case], skip_bad_cases, allow_non_flair)
            _warn_header_not_flair(case, series)
        except DeepWMLError as exc:
            if not skip_bad_cases:
                raise DeepWMLError(f"case {case.case}: {exc} (or pass --skip-bad-cases to leave it out)") from exc
            log.warning("skipping case %s: %s", case.case, exc)
            skipped.append((case.case, str(exc)))
            continue
        if flair_check is not None:  # past the case's faults: a full disk here is the run's, no reason to leave it out
            io.write_text(json.dumps(checks[case.case]), checked)
        if i >= len(wanted):
            io.write_atomically(target, lambda tmp: tmp.write_bytes(b""))  # checked (an interrupted run skips it)
            continue
        segments = io.lesion_segment_names(case.mask)
        if len({name.lower() for name in segments}) > 1:  # one name ('WMH' and 'wmh', two 'lesion'): one lesion
            several_segments.append(f"{case.case} ({', '.join(segments[:4])})")
        values = np.bincount(io.voxels(mask).ravel(), minlength=256)[1:]
        read_here += 1
        if ignore_label is not None:
            ignored_found = ignored_found or bool(values[ignore_label - 1])
            values[ignore_label - 1] = 0
        lesion_values.update(int(v) + 1 for v in np.flatnonzero(values))
        if np.count_nonzero(values) > 1:
            several_values.append(f"{case.case} ({', '.join(str(v + 1) for v in np.flatnonzero(values)[:4])})")
        images, labels, missed = prepare_volume(image, mask, cfg, ignore_label)
        if not images.shape[0]:
            log.warning("case %s has no slice with head; it adds nothing to training", case.case)
        io.write_atomically(target, lambda tmp: _save_npz(tmp, images=images.astype(np.float16), labels=labels.astype(np.uint8),
                                                          missed=np.int64(missed)))
    if ignore_label is not None and not ignored_found and all_read_here and lesion_values:
        log.warning("--ignore-label %d: no mask of the %d case(s) prepared holds value %d, so no voxel is left out of "
                    "the loss and validation, and every value they hold (%s) trains as lesion; give --ignore-label the "
                    "value your masks mark voxels to leave out with", ignore_label, read_here, ignore_label,
                    ", ".join(map(str, sorted(lesion_values))))
    elif several_values and ignore_label is not None:
        log.warning("the masks of %d case(s) hold several lesion values besides --ignore-label %d's (%s); each trains "
                    "as lesion. If another one marks voxels to leave out too, relabel it %d (--ignore-label takes one "
                    "value)", len(several_values), ignore_label, "; ".join(several_values[:3]), ignore_label)
    elif several_values:
        log.warning("the masks of %d case(s) hold several lesion values (%s); every positive value trains as lesion. "
                    "If one of them marks voxels to leave out, pass --ignore-label with it", len(several_values),
                    "; ".join(several_values[:3]))
    if several_segments:
        # a .seg.nrrd (or a DICOM SEG) is read as the union of its segments (io.lesion_segments, io.read_dicom_seg): a
        # rater's "uncertain" or "brain" segment would train as lesion, and --ignore-label cannot reach it
        log.warning("the masks of %d case(s) are segmentations (Slicer .seg.nrrd, DICOM SEG) of several segments, none "
                    "named WMH (%s); all "
                    "of them train as lesion. If one is not lesion, name the lesion segment WMH (it alone is read then), "
                    "or save a label map and pass --ignore-label for the voxels to leave out", len(several_segments),
                    "; ".join(several_segments[:3]))
    not_flair = []
    if flair_check is not None:
        not_flair = _judge_flair_checks(everything, assignment, checks, flair_table, skip_bad_cases, allow_non_flair,
                                        asked_allow_non_flair)
        if not allow_non_flair:
            skipped += [(name, f"{_NOT_FLAIR_REASON}, it looks {looks}: {why}") for name, _, looks, why in not_flair]
    skipped_names = {s[0] for s in skipped}
    for split in ("train", "val"):
        members = [c for c in wanted if assignment[c.case] == split and c.case not in skipped_names]
        _gather_split(folder, split, members, [parts / f"{keys[c.case]}.npz" for c in members], cfg.grid_size)
    io.write_text(json.dumps({"signature": signature, "skipped": skipped,
                              "not_flair": not_flair if allow_non_flair else [],
                              "flair_checks": {keys[name]: check for name, check in checks.items()}}), done_file)
    shutil.rmtree(parts, ignore_errors=True)
    if progress:
        progress(1.0, "prepared")
    return skipped


def flair_checker(device: str = "auto", threads: int | None = None) -> Callable | None:
    """`deepwml segment`'s FLAIR check (contrast.py) for a training case: a function of its FLAIR and target
    mask (same grid; None for an unlabelled scan, as `deepwml adapt` checks) that gives the check's figures,
    its `looks_like` among them. The shipped brain-mask network
    outlines the brain, as segment's does (a few tenths of a second a case; README, training); None without one.
    The target is left out of the white matter's level as segment leaves out what it marked, unless it fills
    most of the brain (an intracranial mask, to train a brain-mask network). With `threads` (train's --threads,
    set in PyTorch by train) the network runs in PyTorch, on those threads: OpenVINO, segment's runner on a CPU,
    would take every core of a machine the user shares."""
    from .contrast import flair_contrast
    from .inference import predict_maps, resolve_device
    from .postprocessing import BRAIN_THRESHOLD
    from .segment import load_brain_model

    try:  # training needs no shipped model: an install without them (or a broken one) trains unchecked
        brain_model = load_brain_model("default")
    except DeepWMLError as exc:
        log.warning("the brain-mask model could not be loaded (%s), so whether each scan is a FLAIR is not checked", exc)
        return None
    if brain_model is None:
        log.warning("no brain-mask model is installed, so whether each scan is a FLAIR is not checked")
        return None
    device = resolve_device(device)

    def check(image, mask=None) -> dict:
        try:
            brain, _, _, frame = predict_maps(image, [brain_model], None, device,
                                              backend="torch" if threads else "auto")
        except DeepWMLError as exc:  # NaN (bf16 overflowing), a scan too narrow: not judged, the case still trains
            return {"deep_ml": None, "dark_fraction": None, "cortex_brighter_fraction": None, "looks_like": None,
                    "not_judged": f"the brain-mask network failed on it: {getattr(exc, 'what', exc)}"}
        inside = np.greater_equal(brain, BRAIN_THRESHOLD)
        del brain
        target = np.zeros(inside.shape, bool) if mask is None else io.axial_view(mask, frame) > 0
        lesion = target if 2 * np.count_nonzero(target) < np.count_nonzero(inside) else np.zeros_like(target)
        return flair_contrast(io.axial_view(image, frame), inside, lesion,
                              (frame.slice_thickness_mm, frame.row_spacing_mm, frame.col_spacing_mm))

    return check


FLAIR_TABLE_COLUMNS = ("case", "split", "looks_like", "dark_fraction", "cortex_brighter_fraction", "deep_ml", "not_judged")


def _warn_header_not_flair(case: Case, series=None) -> None:
    """Log a warning, naming the case, when its FLAIR's own header says it is not one (segment.scan_header_warnings:
    its DICOM `series`, as read, or the JSON sidecar, b-values or BIDS name beside its file): a manifest's columns
    mixed up, or the wrong series exported, which the picture does not always show (a diffusion image passes the FLAIR
    check). A warning, as in segment: the picture's check decides what is refused."""
    from .segment import scan_header_warnings

    for warning in scan_header_warnings(Path(case.flair), series):
        log.warning("case %s: %s", case.case, warning)


def _tell_not_flair_at_once(name: str, check: dict, skip_bad_cases: bool, allow_non_flair: bool) -> None:
    """Say as soon as it is judged that a case does not look like a FLAIR where the run will be refused for it
    (neither --skip-bad-cases nor --allow-non-flair): the refusal names every such case, but only once every
    case is prepared, which takes minutes on a large cohort; the user may stop the run now and fix the manifest."""
    looks = check.get("looks_like")
    if skip_bad_cases or allow_non_flair or looks in (None, "FLAIR"):
        return
    from .contrast import why_not_flair

    log.warning("case %s does not look like a FLAIR, it looks %s: %s. The run will stop before training once every "
                "case is prepared (pass --skip-bad-cases to leave such cases out, --allow-non-flair to train on them)",
                name, looks, why_not_flair(check))


def _judge_flair_checks(cases: list[Case], assignment: dict[str, str], checks: dict[str, dict], table: Path | None,
                        skip_bad_cases: bool, allow_non_flair: bool,
                        asked_allow_non_flair: bool | None = None) -> list[tuple[str, str, str, str]]:
    """Write the checks to `table`, say which cases could not be judged, and return the (case, split, what it
    looks like, why) of those that do not look like a FLAIR: a DeepWMLError naming them unless `skip_bad_cases`
    (each said to be skipped) or `allow_non_flair` (said to be trained on). `asked_allow_non_flair`: the command's
    --allow-non-flair where a started run keeps its own (`allow_non_flair`), said as `_say_kept_non_flair` says it."""
    if asked_allow_non_flair is None:
        asked_allow_non_flair = allow_non_flair
    from .contrast import why_not_flair

    judged = [c for c in cases if c.case in checks]
    if table is not None and judged:
        _write_csv(table, list(FLAIR_TABLE_COLUMNS), [[c.case, assignment[c.case]] + [
            "" if checks[c.case].get(k) is None else checks[c.case][k] for k in FLAIR_TABLE_COLUMNS[2:]] for c in judged])
    where = f" (every case's figures: {table})" if table is not None else ""
    unjudged = [c.case for c in judged if checks[c.case].get("looks_like") is None]
    if unjudged:
        log.warning("whether %d case(s) are FLAIRs could not be checked (%s%s: %s); make sure their scans are FLAIRs",
                    len(unjudged), ", ".join(unjudged[:3]), ", ..." if len(unjudged) > 3 else "",
                    checks[unjudged[0]]["not_judged"])
    found = [(c.case, assignment[c.case], checks[c.case]["looks_like"], why_not_flair(checks[c.case]))
             for c in judged if checks[c.case].get("looks_like") not in (None, "FLAIR")]
    if found and allow_non_flair:
        _warn_trained_non_flair(found, asked=asked_allow_non_flair)
        return found
    if found and not skip_bad_cases:
        named = "; ".join(f"case {name}{' (test)' if split == 'test' else ''} looks {looks}: {why}"
                          for name, split, looks, why in found[:2])
        more = (f"; and {len(found) - 2} more ({', '.join(name for name, *_ in found[2:5])}"
                f"{', ...' if len(found) > 5 else ''})") if len(found) > 2 else ""
        raise DeepWMLError(f"{len(found)} case(s) of the manifest do not look like a FLAIR{where}: {named}{more}; check "
                           "that their flair column names the FLAIR series, or pass --skip-bad-cases to leave them out, "
                           "or --allow-non-flair to train on them when you know better")
    for name, _, looks, why in found:
        log.warning("skipping case %s: it does not look like a FLAIR, it looks %s: %s", name, looks, why)
    if found and asked_allow_non_flair:  # a started run prepared without it, its cache prepared again
        _say_kept_non_flair([], [name for name, *_ in found], True)
    return found


_NOT_FLAIR_REASON = "does not look like a FLAIR"  # how skipped_cases.csv (and cache.json) gives such a case's reason


def _say_kept_non_flair(trained: list, left_out: list[str], asked: bool) -> None:
    """What a started run (or a prepared cache) does with the cases that do not look like a FLAIR: trains on `trained`
    (said truthfully, `asked` being the command's --allow-non-flair) or keeps `left_out` out though --allow-non-flair
    is `asked` now. Said alike whether the cache is kept or prepared again (a file of it deleted)."""
    if trained:
        _warn_trained_non_flair(trained, asked=asked)
    elif left_out and asked:
        log.warning("--allow-non-flair does not add %s to this run: it was prepared without them, and a run "
                    "that has started keeps its cases (a resume trains on the same); to train on them, use a "
                    "new run folder", ", ".join(left_out))


def _warn_trained_non_flair(found: list, asked: bool = True) -> None:
    """Said when the cases are prepared, and again on every rerun: the run trains on them (`asked`: with
    --allow-non-flair given now; else a run prepared with it that has started, and keeps its cases)."""
    names = ", ".join(f"{name} ({looks})" for name, _, looks, _ in found[:5]) + (", ..." if len(found) > 5 else "")
    if asked:
        log.warning("training on %d case(s) that do not look like a FLAIR, as --allow-non-flair asks: %s", len(found), names)
    else:
        log.warning("this run trains on %d case(s) that do not look like a FLAIR (%s): it was prepared with "
                    "--allow-non-flair, and a run that has started keeps its cases (a resume trains on the same); to "
                    "leave them out, train in a new run folder with --skip-bad-cases", len(found), names)


def _save_npz(path, **arrays) -> None:
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def _gather_split(folder: Path, split: str, members: list[Case], files: list[Path], grid_size) -> None:
    counts = []
    for f in files:
        with np.load(f) as z:
            counts.append(int(z["labels"].shape[0]))
    total = sum(counts)
    shape = (total,) + tuple(int(g) for g in grid_size)

    def fill(name, dtype):
        # Written case by case with plain writes, not through a memmap: a full disk is then an OSError that
        # write_atomically reports, where a memmap's page written onto it kills the process (SIGBUS, "Bus error").
        def write(tmp):
            with open(tmp, "wb") as out:
                np.lib.format.write_array_header_1_0(out, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                                           "fortran_order": False, "shape": shape})
                for f in files:
                    with np.load(f) as z:
                        out.write(np.ascontiguousarray(z[name], dtype=dtype).tobytes())
        io.write_atomically(folder / f"{split}_{name}.npy", write)

    fill("images", np.float16)
    fill("labels", np.uint8)
    case_index = np.repeat(np.arange(len(files), dtype=np.int32), counts)
    lesion_pixels, missed = np.zeros(total, dtype=np.int64), 0
    start = 0
    for f, n in zip(files, counts):
        with np.load(f) as z:
            lesion_pixels[start:start + n] = (z["labels"] == 1).reshape(n, -1).sum(axis=1)
            missed += int(z["missed"])
        start += n
    io.write_atomically(folder / f"{split}_index.npz", lambda tmp: _save_npz(tmp, case_index=case_index, lesion_pixels=lesion_pixels))
    io.write_text(json.dumps({"cases": [c.case for c in members], "missed_lesion_voxels": missed}), folder / f"{split}.json")


# ---------------------------------------------------------------------------------------------
# Sampling and augmentation


def epoch_samples(train: SliceSet, epoch: int, seed: int, n_samples: int, lesion_fraction: float | None) -> np.ndarray:
    """The slice indices of one epoch, the same on every rank and on every resume.

    Within each pool (slices with lesion, without) slices are drawn without replacement until the
    pool is used up, so an epoch sees as many different slices as it can.
    """
    rng = np.random.default_rng([seed, epoch])
    everything = np.arange(len(train))
    if lesion_fraction is None:
        return _draw(everything, n_samples, rng)
    lesion = everything[train.lesion_pixels > 0]
    clear = everything[train.lesion_pixels == 0]
    if not len(lesion) or not len(clear):
        return _draw(everything, n_samples, rng)
    n_lesion = int(rng.binomial(n_samples, lesion_fraction))
    chosen = np.concatenate([_draw(lesion, n_lesion, rng), _draw(clear, n_samples - n_lesion, rng)])
    return rng.permutation(chosen)


def _draw(pool: np.ndarray, k: int, rng) -> np.ndarray:
    if k <= 0:
        return pool[:0]
    rounds = -(-k // len(pool))
    return np.concatenate([rng.permutation(pool) for _ in range(rounds)])[:k]


def augment(images, labels, settings: dict, generator):
    """Random geometry and intensity changes of a batch ([B,1,H,W] image, [B,1,H,W] float label).

    All parameters come from `generator` (CPU) so a batch's augmentation depends only on its seed.
    Geometry is one affine map per slice (flip, rotation, shear, scale) applied with grid_sample,
    bilinear for the image (border padding: the border is background) and bilinear then > 0.5 for
    the label. Intensity changes act on the image above its own minimum, as a scanner's would on
    raw intensities: bias field and gamma multiply or bend the signal, not the background.
    """
    import torch
    import torch.nn.functional as F

    b = images.shape[0]
    device = images.device

    def uniform(lo, hi, n=b):
        return lo + (hi - lo) * torch.rand(n, generator=generator)

    def coin(p=_INTENSITY_P):
        return torch.rand(b, generator=generator) < p

    flip = torch.where(coin(0.5), -1.0, 1.0) if settings.get("flip") else torch.ones(b)
    angle = torch.deg2rad(uniform(-1.0, 1.0) * float(settings.get("rotate_deg") or 0.0))
    shear = torch.tan(torch.deg2rad(uniform(-1.0, 1.0) * float(settings.get("shear_deg") or 0.0)))
    lo_s, hi_s = settings.get("scale") or (1.0, 1.0)
    scale = uniform(float(lo_s), float(hi_s))
    if settings.get("flip") or settings.get("rotate_deg") or settings.get("shear_deg") or lo_s != hi_s:
        cos, sin = torch.cos(angle), torch.sin(angle)
        rotation = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
        shearing = torch.eye(2).repeat(b, 1, 1)
        shearing[:, 0, 1] = shear
        # grid_sample maps output to input coordinates: dividing by the scale zooms in by it.
        matrix = rotation @ shearing / scale[:, None, None]
        matrix[:, :, 0] *= flip[:, None]
        theta = torch.cat([matrix, torch.zeros(b, 2, 1)], dim=2).to(device)
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        images = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
        labels = (F.grid_sample(labels, grid, mode="bilinear", padding_mode="zeros", align_corners=False) > 0.5).float()

    floor = images.amin(dim=(1, 2, 3), keepdim=True)
    signal = images - floor
    if settings.get("bias_field"):
        amplitude = float(settings["bias_field"]) * coin().float()
        coarse = torch.randn(b, 1, 4, 4, generator=generator) * amplitude[:, None, None, None]
        field = F.interpolate(coarse.to(device), size=images.shape[-2:], mode="bicubic", align_corners=False)
        signal = signal * torch.exp(field)
    if settings.get("gamma"):
        lo_g, hi_g = (math.log(float(v)) for v in settings["gamma"])
        gamma = torch.where(coin(), torch.exp(uniform(lo_g, hi_g)), torch.ones(b)).to(device)[:, None, None, None]
        top = signal.amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)
        signal = (signal / top) ** gamma * top
    images = signal + floor
    if settings.get("contrast"):
        lo_c, hi_c = (float(v) for v in settings["contrast"])
        factor = torch.where(coin(), uniform(lo_c, hi_c), torch.ones(b)).to(device)[:, None, None, None]
        images = images * factor
    if settings.get("noise_std"):
        std = (uniform(0.0, float(settings["noise_std"])) * coin().float()).to(device)[:, None, None, None]
        images = images + std * torch.randn(images.shape, generator=generator).to(device)
    return images, labels


def random_crops(images, labels, size: int, rng: np.random.Generator):
    """Square crops of `size`; a slice with lesion is cropped around a randomly chosen lesion pixel
    (channel 0 of `labels`; any further channel, such as the ignored pixels, is cropped alike)."""
    b, _, h, w = images.shape
    out_i = images.new_empty((b, 1, size, size))
    out_l = labels.new_empty((b, labels.shape[1], size, size))
    for i in range(b):
        lesion = labels[i, 0].nonzero()
        if len(lesion):
            y, x = lesion[int(rng.integers(len(lesion)))].tolist()
            top = int(rng.integers(max(0, y - size + 1), min(y, h - size) + 1))
            left = int(rng.integers(max(0, x - size + 1), min(x, w - size) + 1))
        else:
            top, left = int(rng.integers(h - size + 1)), int(rng.integers(w - size + 1))
        out_i[i] = images[i, :, top:top + size, left:left + size]
        out_l[i] = labels[i, :, top:top + size, left:left + size]
    return out_i, out_l


def _torch_generator(*entropy: int):
    import torch

    g = torch.Generator()
    # Shifted as a Python int: numpy 1.x refuses uint64 >> int (TypeError).
    g.manual_seed(int(np.random.SeedSequence(list(entropy)).generate_state(1, dtype=np.uint64)[0]) >> 1)
    return g


# ---------------------------------------------------------------------------------------------
# Loss and validation


def loss_terms(logits, target, dice_weight: float, weight=None):
    """BCE (mean over pixels) + dice_weight × (1 − soft Dice over the whole batch).

    `weight` (0 or 1 per pixel) leaves pixels out: the BCE is the mean over the others, and the soft
    Dice counts neither their predictions nor their targets."""
    import torch.nn.functional as F

    logits = logits.float()
    p = logits.sigmoid()
    if weight is None:
        bce = F.binary_cross_entropy_with_logits(logits, target)
    else:
        weight = weight.float()
        bce = (F.binary_cross_entropy_with_logits(logits, target, reduction="none") * weight).sum() / weight.sum().clamp_min(1.0)
        p, target = p * weight, target * weight
    dice = (2 * (p * target).sum() + 1.0) / (p.sum() + target.sum() + 1.0)
    return bce + dice_weight * (1 - dice)


def _split_labels(labels):
    """Cached labels [B,1,H,W] (0, 1, IGNORED) -> (lesion [B,1,H,W] float, kept [B,1,H,W] float or None)."""
    lesion = (labels == 1).float()
    if not bool((labels == IGNORED).any()):
        return lesion, None
    return lesion, (labels != IGNORED).float()


def _ratio(num: float, den: float) -> float:
    return num / den if den else float("nan")


def validate(model, val: SliceSet, cfg: TrainConfig, device, rank: int = 0, world: int = 1) -> dict:
    """Loss and Dice, sensitivity, precision at the model threshold over all validation slices.

    Voxel counts are pooled over the set (one Dice for all validation cases). Across ranks each
    rank takes every world-th batch and the sums are all-reduced, so every rank gets the same numbers.
    """
    import torch

    sums = torch.zeros(5, dtype=torch.float64)  # loss × n, n, tp, fp, fn
    batch = 2 * cfg.batch_size
    autocast = _autocast(device, cfg)
    model.eval()
    with torch.no_grad():
        for start in range(rank * batch, len(val), batch * world):
            x = torch.from_numpy(np.asarray(val.images[start:start + batch], dtype=np.float32)).unsqueeze(1).to(device)
            y, kept = _split_labels(torch.from_numpy(np.array(val.labels[start:start + batch])).unsqueeze(1).to(device))
            with autocast:
                logits = model(x)
            n = x.shape[0]
            prediction = logits.float().sigmoid() >= cfg.threshold  # as inference marks (postprocess)
            truth = y > 0.5
            if kept is not None:  # ignored pixels count as neither found, missed nor false
                prediction &= kept > 0.5
            sums += torch.tensor([float(loss_terms(logits, y, cfg.dice_weight, kept)) * n, n,
                                  float((prediction & truth).sum()), float((prediction & ~truth).sum()),
                                  float((~prediction & truth).sum())], dtype=torch.float64)
    model.train()
    if world > 1:
        import torch.distributed as dist

        reduced = sums.to(device)
        dist.all_reduce(reduced)
        sums = reduced.cpu()
    loss_n, n, tp, fp, fn = sums.tolist()
    fn += val.missed_lesion_voxels
    return {"val_loss": _ratio(loss_n, n), "val_dice": 1.0 if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn),
            "val_sensitivity": _ratio(tp, tp + fn), "val_precision": _ratio(tp, tp + fp)}


def _autocast(device, cfg: TrainConfig):
    import torch

    if cfg.amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    if cfg.cpu_bf16 and device.type == "cpu":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def grad_scaler(enabled: bool):
    """fp16 loss scaling for CUDA training. torch.amp.GradScaler is new in torch 2.3; older torch has only
    torch.cuda.amp.GradScaler."""
    import torch

    if hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler("cuda", enabled=enabled)
    return torch.cuda.amp.GradScaler(enabled=enabled)


def cpu_has_native_bf16() -> bool:
    """Whether PyTorch computes bf16 natively on this CPU (AVX512-BF16 or AMX)."""
    from .inference import torch_cpu_has_native_bf16

    return torch_cpu_has_native_bf16()


# ---------------------------------------------------------------------------------------------
# Distributed context


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def run_on_main(self, fn):
        """Run fn on rank 0 only; every rank gets its result, or raises the DeepWMLError it raised."""
        if self.world == 1:
            return fn()
        import torch.distributed as dist

        message = [None, None]
        if self.main:
            try:
                message = [fn(), None]
            except DeepWMLError as exc:
                message = [None, str(exc)]
        dist.broadcast_object_list(message, src=0)
        if message[1] is not None:
            error = DeepWMLError(message[1])
            error.from_rank_0 = True  # every process raises it; rank 0 alone says it (cli.main)
            raise error
        return message[0]


def _partner_lost(exc: RuntimeError) -> bool:
    """Whether a collective failed because another process of the run is gone (killed, out of memory, its node
    lost): gloo raises a plain RuntimeError naming the closed connection, NCCL a DistBackendError."""
    import torch.distributed as dist

    text = str(exc).lower()
    return (isinstance(exc, dist.DistBackendError)
            or any(words in text for words in ("closed by peer", "reset by peer", "broken pipe")))


def _start_distributed(device_name: str) -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    import torch
    import torch.distributed as dist

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    owns = not dist.is_initialized()
    if owns:
        use_cuda = device_name != "cpu" and torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(local_rank)
        # Rank 0 prepares the slice cache while the others wait at a barrier: allow hours for it. NCCL where
        # PyTorch has it; Windows' PyTorch has not, and gloo carries CUDA tensors too (more slowly).
        backend = "nccl" if use_cuda and dist.is_nccl_available() else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(hours=6))
    return _Dist(rank, world, local_rank, owns)


# ---------------------------------------------------------------------------------------------
# Training


def train(config: "dict | TrainConfig", run_dir: str | os.PathLike, progress: Progress | None = None,
          cancel: Callable[[], bool] | None = None):
    """Train (or resume) in `run_dir`; returns the best model file (a list of them for an ensemble).

    When `run_dir` already holds a training, its config.json must match `config` except for
    epochs, device, threads, skip_bad_cases and allow_non_flair, and training continues from last.pt
    (the command line's --resume lets only --epochs, --device and --threads change: rerun the full
    command to change --skip-bad-cases; --allow-non-flair changes which cases train only before the first
    epoch, prepare_cache).
    """
    import torch

    cfg = TrainConfig.coerce(config)
    run_dir = Path(run_dir).expanduser().resolve()
    dist_ctx = _start_distributed(cfg.device)
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        if cfg.threads:
            torch.set_num_threads(int(cfg.threads))
        from .inference import resolve_device

        device = torch.device(resolve_device(cfg.device))
        if device.type == "cuda" and dist_ctx.world > 1:
            device = torch.device("cuda", dist_ctx.local_rank)
        if device.type == "cpu":
            torch.use_deterministic_algorithms(True)
        else:
            torch.backends.cudnn.benchmark = True
        setup = dist_ctx.run_on_main(lambda: _set_up_run(cfg, run_dir, progress, cancel))
        cfg = dataclasses.replace(cfg, **setup.pop("prepared_with", {}))  # {}: a set-up of its own (gpu_train.py)
        dist_ctx.barrier()
        cache = run_dir / "cache"
        train_set, val_set = SliceSet.open(cache, "train"), SliceSet.open(cache, "val")
        for split, slices in (("train", train_set), ("val", val_set)):
            if not len(slices):
                what = "training" if split == "train" else "validation"
                if not setup.get("cases", {}).get(split) and setup.get("skipped_cases"):
                    raise DeepWMLError(f"no {what} slice is left after preparation: every {split} case was skipped (see "
                                       f"{run_dir / 'skipped_cases.csv'}); mend them and rerun, or add cases to the "
                                       "manifest")
                raise DeepWMLError(f"no {what} slice is left after preparation; add cases to the manifest")
        if not train_set.lesion_pixels.any():
            raise DeepWMLError("no training mask holds lesion on a slice the network sees (all empty, or the label "
                               f"is another column: --mask-column); there is nothing to learn from {cfg.manifest}")
        if dist_ctx.main and not val_set.lesion_pixels.any() and not val_set.missed_lesion_voxels:
            log.warning("no validation mask holds lesion: val Dice is 1 for predicting nothing, so it cannot choose "
                        "the best epoch; put cases with lesion in val: --split with a CSV of case, split, or another "
                        "--seed (a run folder that has trained an epoch keeps its split: use a new one)")
        best = []
        for k in range(cfg.ensemble):
            member_dir = run_dir if cfg.ensemble == 1 else run_dir / f"model_{k}"
            if dist_ctx.main:
                io.make_output_dir(member_dir)
            dist_ctx.barrier()
            label = f"model {k + 1}/{cfg.ensemble}: " if cfg.ensemble > 1 else ""
            member_progress = None if progress is None else (
                lambda fraction, message, k=k, label=label: progress((k + fraction) / cfg.ensemble, label + message))
            best.append(_train_member(cfg.member(k), member_dir, train_set, val_set, setup, device, dist_ctx,
                                      member_progress, cancel, label))
        return best[0] if cfg.ensemble == 1 else best
    except RuntimeError as exc:
        if dist_ctx.world > 1 and _partner_lost(exc):
            error = DeepWMLError(f"another process of this training stopped ({str(exc).strip().splitlines()[0][:160]}); "
                                 "the run keeps every finished epoch: see the stopped process's own message, then "
                                 "rerun the same command to resume")
            error.this_process_only = True  # met by the processes left, not by every process alike: each says it
            raise error from exc
        raise
    finally:
        _unlock_run_dir(run_dir)
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
        if dist_ctx.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()


_RUN_LOCKS: dict = {}  # run folder -> the open lock file of the training running in it


def _lock_run_dir(run_dir: Path) -> None:
    """Hold an exclusive lock on the run folder while training runs in it (io.try_lock: POSIX and Windows;
    on a file system without locks, unguarded)."""
    try:
        handle = open(run_dir / ".lock", "w", encoding="utf-8")
    except OSError as exc:  # a run folder that exists but cannot be written in (read-only, another user's)
        raise DeepWMLError(f"cannot write in the run folder {run_dir} ({exc.strerror or exc}); "
                           f"{io.write_advice(exc, 'choose a writable place, or copy the run folder to one')}") from exc
    locked = io.try_lock(handle.fileno())
    if not locked:
        handle.close()
        if locked is False:
            raise DeepWMLError(f"another deepwml train is running in {run_dir}; wait for it to end or use another run folder")
        return
    _RUN_LOCKS[str(run_dir)] = handle


def _unlock_run_dir(run_dir: Path) -> None:
    handle = _RUN_LOCKS.pop(str(run_dir), None)
    if handle is not None:
        handle.close()


def _has_trained(run_dir: Path) -> bool:
    """Whether `run_dir` holds a training that has finished an epoch (its last.pt, or an ensemble member's)."""
    return (run_dir / "last.pt").is_file() or any(run_dir.glob("model_*/last.pt"))


def _started_with_skip(run_dir: Path) -> bool:
    """Whether `run_dir` holds a training that has trained an epoch and was prepared with --skip-bad-cases: it
    keeps its cases (those it left out stay out, named again), so a rerun without the option is not refused for
    a file missing since it started."""
    try:
        return _has_trained(run_dir) and bool(json.loads((run_dir / "config.json").read_text(encoding="utf-8")).get("skip_bad_cases"))
    except (OSError, ValueError, AttributeError):
        return False


def _set_up_run(cfg: TrainConfig, run_dir: Path, progress, cancel) -> dict:
    """Check or record the config, make or read the split, prepare the cache. Rank 0 only."""
    cases = read_manifest(cfg.manifest, cfg.mask_column)
    missing = [(c.case, p) for c in cases for p in (c.flair, c.mask) if io.known_missing(p)]
    if missing and not cfg.skip_bad_cases and not _started_with_skip(Path(run_dir)):
        case, path = missing[0]
        raise DeepWMLError(f"{len(missing)} file(s) of the manifest do not exist (first: {case}: {path})"
                           f"{io.missing_paths_hint(cfg.manifest, [p for _, p in missing])}; "
                           "fix the paths or pass --skip-bad-cases")
    flairs = _check_distinct_scans(cases, run_dir)
    _warn_shared_masks(cases, cfg.ignore_label)
    # a started run has its weights in last.pt: the file is not read again, unless an ensemble member yet to start
    # needs it (checked now, not after the others have trained on)
    if cfg.init and not all((member / "last.pt").is_file() for member in (
            [Path(run_dir)] if cfg.ensemble == 1 else [Path(run_dir) / f"model_{k}" for k in range(cfg.ensemble)])):
        _init_source(cfg)  # a wrong --init fails before the run folder records its config
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DeepWMLError(f"cannot create the run folder {run_dir} ({io.why_no_folder(run_dir, exc)}); "
                           f"{io.write_advice(exc, 'choose a writable place')}") from exc
    _check_run_folder(run_dir, cfg.split)  # before the lock file: a refused folder is left as it was
    _lock_run_dir(run_dir)
    _remove_temporary_leftovers(run_dir)
    config_file = run_dir / "config.json"
    # A folder whose run never finished an epoch (it failed on its data, say) holds nothing to keep:
    # its settings and split are made again, so a corrected manifest or command just works.
    started = _has_trained(run_dir)
    if config_file.is_file() and started:
        stored = json.loads(config_file.read_text(encoding="utf-8"))
        differences = _config_differences(stored, cfg.to_dict())
        if differences:
            detail = "; ".join(f"{k}: {stored.get(k)!r} there, {getattr(cfg, k, None)!r} now" for k in differences[:3])
            raise DeepWMLError(f"{run_dir} holds a training with other settings ({detail}); "
                               "use a new run folder, or resume it with `deepwml train --resume RUN_DIR`")
    split_file = run_dir / "split.csv"
    if split_file.is_file() and started:
        _check_same_cases(split_file, cases, cfg.manifest, run_dir)
        assignment = read_split(split_file, cases)
        source = f"the run's {split_file}"
    elif cfg.split:
        assignment = read_split(cfg.split, cases)
        source = f"the split file {cfg.split}"
    else:
        assignment = stratified_split(cases, cfg.seed, cfg.val_fraction, cfg.test_fraction)
        shares = (1 - cfg.val_fraction - cfg.test_fraction, cfg.val_fraction, cfg.test_fraction)
        source = f"the {'/'.join(f'{round(100 * share, 6):g}' for share in shares)} split of {len(cases)} case(s)"
    counts = {s: sum(1 for v in assignment.values() if v == s) for s in SPLITS}
    if not counts["train"] or not counts["val"]:
        raise DeepWMLError(f"{source} puts {counts['train']} case(s) in train and {counts['val']} in val; training needs "
                           "at least one of each" + ("" if len(cases) > 1 else ": add cases to the manifest"))
    if not counts["test"] and cfg.test_fraction > 0 and not cfg.split and not (split_file.is_file() and started):
        log.warning("%s keeps no case for test (too few cases for a test fraction of %g): the model cannot be "
                    "evaluated on cases it never saw (validation chose its epoch); add cases, or keep some aside",
                    source, cfg.test_fraction)
    data_file, data = run_dir / "data.json", _data_fingerprints(cases, assignment, flairs)
    stored_data = json.loads(data_file.read_text(encoding="utf-8")) if data_file.is_file() and started else None
    if stored_data is not None:
        _check_same_data(stored_data, data, run_dir, cases)
    kept = {}  # a started run trains on the cases it was prepared with: its decisions on cases stay as they were
    if config_file.is_file() and started:
        kept = {key: stored[key] for key in _CASE_DECISIONS if key in stored and stored[key] != getattr(cfg, key)}
    io.write_text(json.dumps({**cfg.to_dict(), **kept}, indent=2) + "\n", config_file)
    if not (split_file.is_file() and started):
        write_split(split_file, cases, assignment)
    # a run of a version before data.json: what it trains on from now; one of a version that knew its files less
    # well (the first MiB alone, no DICOM folder): the same files, known fully from now
    if stored_data != data:
        io.write_text(json.dumps(data, indent=1) + "\n", data_file)
    absent: dict[str, list[str]] = {}  # case -> its files that do not exist, named: which of a case's files is gone
    for name, path in missing:
        absent.setdefault(name, []).append(path)
    absent_reasons = [(name, f"a file does not exist: {', '.join(paths)}") for name, paths in sorted(absent.items())]
    for name, reason in absent_reasons:
        log.warning("skipping case %s: %s", name, reason)
    usable = [c for c in cases if c.case not in absent]
    skipped = prepare_cache(usable, assignment, cfg.preprocessing, run_dir / "cache", cfg.skip_bad_cases, progress, cancel,
                            cfg.ignore_label, flair_checker(cfg.device, cfg.threads), cfg.allow_non_flair, run_dir / "flair_check.csv",
                            started, {**{key: getattr(cfg, key) for key in _CASE_DECISIONS}, **kept})
    skipped = absent_reasons + list(skipped)
    if skipped:
        _write_csv(run_dir / "skipped_cases.csv", ["case", "reason"], skipped)
        left = {s: sum(1 for c, v in assignment.items() if v == s and c not in {n for n, _ in skipped}) for s in SPLITS}
        log.warning("%d case(s) skipped (see skipped_cases.csv); training on %d, validating on %d, %d kept for test",
                    len(skipped), left["train"], left["val"], left["test"])
    skipped_names = {n for n, _ in skipped}
    return {
        "prepared_with": kept,
        "manifest": cfg.manifest,
        "manifest_sha256": _sha256_file(cfg.manifest),
        "split_sha256": _sha256_file(split_file),
        "cases": {s: sum(1 for c, v in assignment.items() if v == s and c not in skipped_names) for s in SPLITS},
        "skipped_cases": [n for n, _ in skipped],
    }


# The files a run writes at the top of its folder (with cache/ and, for an ensemble, model_k/).
_RUN_FILES = ("config.json", "split.csv", "data.json", "history.csv", "last.pt", "best.pt", "skipped_cases.csv",
              "flair_check.csv")


def _remove_temporary_leftovers(run_dir: Path) -> None:
    """Remove what a run killed while writing a file (io.write_atomically) left: its hidden temporary copy, as large
    as the file (a split's slices: the whole data set). With the folder's lock held. Beside the cache, only copies of
    the run's own files: a folder given as RUN_DIR may hold hidden files of other programs."""
    own = tuple(io.temporary_prefix(run_dir / name) for name in _RUN_FILES)
    leftovers = [p for folder in (run_dir, *run_dir.glob("model_*")) for p in io.temporary_leftovers(folder)
                 if p.name.startswith(own)]
    for left in leftovers + io.temporary_leftovers(run_dir / "cache") + io.temporary_leftovers(run_dir / "cache" / "cases"):
        with contextlib.suppress(OSError):  # one that cannot be removed costs space, not the run
            left.unlink()


def _check_run_folder(run_dir: Path, split: str | None = None) -> None:
    """A DeepWMLError when `run_dir` holds files of a run's names but no DeepWML training (no config.json of one):
    a cohort folder with its own split.csv, say, given as the run folder, whose files the run would overwrite.
    Its split.csv given as `split` (--split) is no such file: the run writes the same split back."""
    try:
        config = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
        if isinstance(config, dict) and "manifest" in config:
            return
    except (OSError, UnicodeDecodeError, ValueError):
        pass
    if _has_trained(run_dir):  # a run that trained an epoch, its config.json deleted (or spoilt) since
        raise DeepWMLError(_no_config_message(run_dir))
    given = Path(split).expanduser().resolve() if split else None
    found = [name for name in _RUN_FILES if (run_dir / name).exists() and (run_dir / name).resolve() != given]
    if found:
        raise DeepWMLError(f"{run_dir} holds {', '.join(found)} but no DeepWML training, and a run would write over "
                           f"{'them' if len(found) > 1 else 'it'}; give a new or empty run folder")


def _no_config_message(run_dir: Path) -> str:
    """Why a run folder that has trained an epoch (`_has_trained`) cannot go on without its config.json, and what to
    do: its settings decide what a resume trains, so they are not guessed."""
    found = [name for name in _RUN_FILES if name != "config.json" and (run_dir / name).exists()]
    found += sorted({f"{p.parent.name}/last.pt" for p in run_dir.glob("model_*/last.pt")})[:2]
    what = "is missing" if not (run_dir / "config.json").exists() else "cannot be read as a run's settings"
    # an ensemble's weights are its members' (model_k/best.pt): none at the folder's top
    weights = [p for p in (run_dir / "best.pt", *sorted(run_dir.glob("model_*/best.pt"))) if p.is_file()][:1]
    init = "".join(f" (--init {p} starts from its weights)" for p in weights)
    return (f"{run_dir} holds a started training ({', '.join(found)}) whose config.json {what}: a resume needs the "
            f"settings it started with; restore its config.json ({_config_source(run_dir)}) to resume it, or train in "
            f"a new run folder{init}")


def _config_source(run_dir: Path) -> str:
    """Where a started run's settings are to be had but in its config.json: a backup, or the 'config' entry of its
    last.pt; an ensemble's is in its members' model_k/last.pt, each of which holds its own model's settings
    (TrainConfig.member: 'ensemble' 1, the run's seed + k), so the first there is named with what to change."""
    if (run_dir / "last.pt").is_file():
        return "from a backup, or from the 'config' entry of its last.pt"
    members = sorted(int(p.parent.name[len("model_"):]) for p in run_dir.glob("model_*/last.pt")
                     if p.parent.name[len("model_"):].isdigit())
    if not members:
        return "from a backup"
    k = members[0]
    seed = f", and 'seed' to the one there less {k}" if k else ""
    return (f"from a backup, or from the 'config' entry of model_{k}/last.pt, which holds that model's settings: set "
            f"'ensemble' (1 there) to the run's number of models (at least {members[-1] + 1}){seed}")


def _check_distinct_scans(cases: list[Case], run_dir: Path) -> dict[str, str | None]:
    """A DeepWMLError when two cases' FLAIRs are copies of one file (same content at two paths; the same path
    twice read_manifest refuses): one scan in two cases can land in training and validation at once. A run in
    `run_dir` that started with both (a version before this check) cannot drop one: the error says so. Returns
    each FLAIR's `_scan_fingerprint` by its path."""
    seen: dict[str, list[Case]] = {}
    fingerprints = {}
    for c in cases:
        fingerprint = fingerprints[c.flair] = _scan_fingerprint(c.flair)
        if fingerprint is None:  # missing or unreadable: said above, or when the case is read
            continue
        earlier = seen.setdefault(fingerprint, [])
        # a DICOM series is known by its UIDs; a file's fingerprint reads only parts of it (a header alone where
        # its voxels lie in a list of files), so two scans that share it are compared whole
        first = next((e for e in earlier if fingerprint.startswith("dicom:") or _same_image(e.flair, c.flair)), None)
        earlier.append(c)
        if first is not None:
            raise DeepWMLError(f"case {c.case!r} has a copy of the FLAIR of case {first.case!r} ({c.flair} holds what "
                               f"{first.flair} holds); one scan in two cases can land in training and validation "
                               f"at once: list it once{_started_with(run_dir, first.case, c.case)}")
    return fingerprints


def _same_image(first: str, second: str) -> bool:
    """Whether two scan files hold the same image, voxels and grid. Their fingerprints can agree while they do not:
    a .mhd or .nhdr whose voxels lie in a LIST or pattern of files is known by its header, which two patients'
    scans on one template grid share byte for byte. False where one cannot be read (said when its case is read)."""
    import SimpleITK as sitk

    try:
        a, b = io.read_image(first), io.read_image(second)
    except DeepWMLError:
        return False
    return (a.GetSize() == b.GetSize() and a.GetSpacing() == b.GetSpacing() and a.GetOrigin() == b.GetOrigin()
            and a.GetDirection() == b.GetDirection()
            and np.array_equal(sitk.GetArrayViewFromImage(a), sitk.GetArrayViewFromImage(b)))


def _started_with(run_dir: Path, *names: str) -> str:
    """For an error about cases `names`: that the run in `run_dir` started with them (its split), so a resume
    cannot leave one out (a started run keeps its cases); "" when no run started there."""
    if not _has_trained(run_dir):
        return ""
    try:
        split = {row["case"]: row["split"] for row in _split_rows(run_dir / "split.csv")}
    except DeepWMLError:
        split = {}
    held = ", ".join(f"{name} in {split[name]}" for name in names if name in split)
    return (f"; the run in {run_dir} started with both{f' ({held})' if held else ''} and keeps its cases, so it "
            "cannot go on: train in a new run folder, with the scan listed once")


def _check_same_cases(split_file: Path, cases: list[Case], manifest: str, run_dir: Path) -> None:
    """A DeepWMLError when the manifest lists other cases than the started run split (its split.csv): cases added
    to the manifest, or taken out of it, after the run began."""
    split = {row["case"]: row["split"] for row in _split_rows(split_file)}
    names = {c.case for c in cases}
    added = sorted(names - set(split))
    removed = [f"{name} ({split[name]})" for name in sorted(set(split) - names)]
    if not added and not removed:
        return
    changes = [f"{len(found)} {what}: {', '.join(found[:3])}{', ...' if len(found) > 3 else ''}"
               for what, found in (("added", added), ("no longer listed", removed)) if found]
    raise DeepWMLError(f"the manifest {manifest} lists other cases than the run in {run_dir} started with "
                       f"({'; '.join(changes)}); a started run keeps its cases and their split: put the manifest back "
                       f"as it was, or train on the new list in a new run folder (--init {run_dir / 'best.pt'} "
                       "starts from its weights)")


def _warn_shared_masks(cases: list[Case], ignore_label: int | None = None) -> None:
    """Warn when one mask file with lesion is listed for several cases: a copy-paste slip, which on scans of one
    grid (registered to a template) nothing else would show. An empty mask that healthy controls share is right,
    and so is one that marks only voxels to leave out (`ignore_label`), no lesion."""
    def holds_lesion(path: str) -> bool:
        try:
            mask = io.read_mask(path)  # kept while its voxels are looked at: io.voxels is a view into it
        except DeepWMLError:
            return False  # said, naming the case, when the case is prepared
        voxels = io.voxels(mask)
        return bool(np.any((voxels > 0) & (voxels != ignore_label)) if ignore_label is not None else np.any(voxels))

    listed: dict[str, list[str]] = {}
    for c in cases:
        listed.setdefault(c.mask, []).append(c.case)
    shared = {mask: names for mask, names in listed.items()
              if len(names) > 1 and Path(mask).exists() and holds_lesion(mask)}
    if shared:
        log.warning("%d mask file(s) with lesion are listed for several cases (%s): each case's lesions need a mask "
                    "of its own", len(shared),
                    "; ".join(f"{Path(mask).name}: {', '.join(names[:4])}" for mask, names in list(shared.items())[:3]))


def _scan_fingerprint(path: str) -> str | None:
    """A scan by its content: a file by io.content_fingerprint (scans on one template grid share their size, first
    MiB and, detached, their header), a DICOM folder by the UIDs of the series training reads from it
    (segment.input_fingerprint); None for a missing or unreadable file or a folder without one series to read."""
    p = Path(path)
    try:
        if p.is_file():
            return io.content_fingerprint(p)
        if not p.is_dir():
            return None
        from .segment import input_fingerprint

        series, _ = io.choose_dicom_series(p, option=None)  # the series io.read_image reads
        return input_fingerprint(p, series)
    except (DeepWMLError, OSError):  # unreadable (no read access): said, naming the case, when it is read
        return None


def _data_fingerprints(cases: list[Case], assignment: dict[str, str], flairs: dict | None = None) -> dict:
    """Each train and val case's FLAIR and mask by content (`_scan_fingerprint`; the FLAIRs' from `flairs`, by
    path, where given)."""
    flairs = flairs or {}
    return {c.case: [flairs[c.flair] if c.flair in flairs else _scan_fingerprint(c.flair), _scan_fingerprint(c.mask)]
            for c in cases if assignment[c.case] in ("train", "val")}


def _check_same_data(stored: dict, now: dict, run_dir: Path, cases: list[Case] = ()) -> None:
    """A DeepWMLError when a train or val case's files differ from those the run started on (data.json): a
    resumed run that prepared them again would go on training on other data, unsaid. One of `cases` whose file is
    there but cannot be read (no read access) is said so, not said to have changed."""
    def older(value):  # data.json of a version before spread blocks and voxel files: the first MiB alone
        return value if value is None else value.split("+")[0].split("~")[0]

    def same(before: list | None, after: list | None) -> bool:
        if before == after:
            return True
        if before is None or after is None or len(before) != len(after):
            return False
        # a DICOM folder: None in the data.json of a version that did not fingerprint folders
        return all(b == a or (b is not None and "~" not in b and b == older(a))
                   or (b is None and a is not None and a.startswith("dicom:")) for b, a in zip(before, after))

    changed = sorted(case for case in set(stored) | set(now) if not same(stored.get(case), now.get(case)))
    unreadable = [(c.case, path) for c in cases if c.case in changed and stored.get(c.case)
                  for path, before, after in zip((c.flair, c.mask), stored[c.case], now.get(c.case) or (None, None))
                  if before is not None and after is None and Path(path).exists()]
    if unreadable:
        case, path = unreadable[0]
        raise DeepWMLError(f"case {case}: {path} cannot be read (no read access?), so whether it changed since "
                           f"{run_dir} started cannot be told; ask for read access to it")
    if changed:
        shown = ", ".join(changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")
        raise DeepWMLError(f"the training data changed since {run_dir} started (changed: {shown}): a resumed run "
                           f"goes on with the data it started on; put those files back as they were, or train in "
                           f"a new run folder (--init {run_dir / 'best.pt'} starts from its weights)")


def _new_state(model, optimizer, scheduler, scaler, cfg: TrainConfig) -> dict:
    return {"format": STATE_FORMAT, "format_version": STATE_VERSION, "config": cfg.to_dict(), "epoch": 0,
            "history": [], "best_dice": -1.0, "best_epoch": 0, "epochs_since_best": 0, "finished": False,
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler else None, "scaler": scaler.state_dict()}


def load_state(path: Path) -> dict:
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged file
        raise DeepWMLError(f"{path} cannot be read ({type(exc).__name__}); delete it to restart the run from scratch") from exc
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise DeepWMLError(f"{path} is not a DeepWML training state; use another run folder")
    return state


def _train_member(cfg: TrainConfig, run_dir: Path, train_set: SliceSet, val_set: SliceSet, setup: dict, device,
                  dist_ctx: _Dist, progress, cancel, label: str = "") -> Path:
    import torch

    from .checkpoint import save_torch
    from .model import build_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.architecture)
    model.to(device)
    if cfg.cpu_bf16 and device.type == "cpu":
        if not cpu_has_native_bf16():
            raise DeepWMLError("--cpu-bf16 needs a CPU that computes bf16 natively (AMX or AVX512-BF16); "
                               "this one does not: train without it")
        # Convolutions in channels-last are oneDNN's fast layout on the CPU. On a 2-core Xeon with
        # AMX, a training step of the 16-channel U-Net (8 crops of 128x128) took 91 ms this way
        # against 250 ms in fp32 (README, training).
        model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate)
    scheduler = None
    if cfg.plateau_patience is not None:
        # better = a higher val Dice, as for best.pt and early stopping (PyTorch's default asks for 1e-4 more, relative:
        # an epoch that wrote best.pt counted towards halving the learning rate)
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=cfg.plateau_factor,
                                                               patience=cfg.plateau_patience, threshold=0.0)
    scaler = grad_scaler(cfg.amp and device.type == "cuda")
    last, best_file = run_dir / "last.pt", run_dir / "best.pt"
    if last.is_file():
        state = load_state(last)
        differences = _config_differences(state["config"], cfg.to_dict())
        if differences:
            raise DeepWMLError(f"{last} was made with other settings ({', '.join(differences[:3])}); use a new run folder")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
        if state["scaler"]:  # a run on the CPU saved a disabled scaler's empty state: resumed on a GPU, it starts afresh
            scaler.load_state_dict(state["scaler"])
        if dist_ctx.main:
            _write_history(run_dir / "history.csv", state["history"])
            log.info("%sresuming %s after epoch %d", label, run_dir, state["epoch"])
            _warn_other_world_size(state, dist_ctx.world, cfg, label)
            _say_other_threads(state, device, cfg, label)
    else:
        initialised_from = _initialise_from(model, cfg) if cfg.init else None
        state = _new_state(model, optimizer, scheduler, scaler, cfg)
        if initialised_from is not None:
            state["initialised_from"] = initialised_from
    state["world_size"] = dist_ctx.world
    state["threads"] = torch.get_num_threads() if device.type == "cpu" else None
    net = model
    if dist_ctx.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    n_samples = cfg.samples_per_epoch or len(train_set)
    share = n_samples // dist_ctx.world
    if share < 1:
        raise DeepWMLError(f"samples per epoch ({n_samples}) must be at least the number of processes ({dist_ctx.world})")
    batches = [(i, min(i + cfg.batch_size, share)) for i in range(0, share, cfg.batch_size)]
    if len(batches) > 1 and batches[-1][1] - batches[-1][0] < 2:
        batches.pop()  # a batch of one slice breaks BatchNorm and adds noise, not information
    autocast = _autocast(device, cfg)
    first_epoch = state["epoch"]
    while state["epoch"] < cfg.epochs and not state["finished"]:
        epoch = state["epoch"] + 1
        started = time.monotonic()
        samples = epoch_samples(train_set, epoch, cfg.seed, n_samples, cfg.lesion_fraction)[dist_ctx.rank::dist_ctx.world][:share]
        crop_rng = np.random.default_rng([cfg.seed, epoch, dist_ctx.rank])
        generator = _torch_generator(cfg.seed, epoch, dist_ctx.rank)
        lr = optimizer.param_groups[0]["lr"]
        total_loss = torch.zeros((), dtype=torch.float64)
        for step, (a, b) in enumerate(batches):
            if cancel is not None and cancel():
                raise Cancelled()
            index = np.sort(samples[a:b])
            order = np.argsort(np.argsort(samples[a:b]))  # memmaps read fastest in order; keep the drawn order
            x = torch.from_numpy(np.asarray(train_set.images[index], dtype=np.float32)[order]).unsqueeze(1)
            y = torch.from_numpy(np.asarray(train_set.labels[index], dtype=np.float32)[order]).unsqueeze(1)
            if cfg.ignore_label is not None:  # lesion and ignored pixels as two channels through augmentation
                y = torch.cat([(y == 1).float(), (y == IGNORED).float()], dim=1)
            x, y = augment(x.to(device), y.to(device), cfg.augmentation, generator)
            if cfg.patch_size:
                x, y = random_crops(x, y, cfg.patch_size, crop_rng)
            kept = None
            if cfg.ignore_label is not None:
                y, kept = y[:, :1], 1 - y[:, 1:]
            with autocast:
                logits = net(x)
            loss = loss_terms(logits, y, cfg.dice_weight, kept)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            total_loss += loss.detach().double().cpu()
            if progress is not None and dist_ctx.main:
                done = (epoch - 1 + (step + 1) / len(batches)) / cfg.epochs
                progress(done, f"epoch {epoch}/{cfg.epochs} step {step + 1}/{len(batches)} loss {loss.item():.4f}")
        if dist_ctx.world > 1:
            import torch.distributed as dist

            for buffer in model.buffers():  # BatchNorm statistics: validate and save rank 0's
                dist.broadcast(buffer, 0)
            reduced = total_loss.to(device)
            dist.all_reduce(reduced)
            total_loss = reduced.cpu() / dist_ctx.world
        _refuse_broken_weights(model, epoch, float(total_loss) / len(batches), run_dir, state["epoch"])
        metrics = validate(model, val_set, cfg, device, dist_ctx.rank, dist_ctx.world)
        row = {"epoch": epoch, "train_loss": float(total_loss) / len(batches), **metrics, "lr": lr,
               "seconds": round(time.monotonic() - started, 3)}
        state["history"].append(row)
        state["epoch"] = epoch
        dice = metrics["val_dice"]
        improved = dice > state["best_dice"]
        if improved:
            state["best_dice"], state["best_epoch"], state["epochs_since_best"] = dice, epoch, 0
        else:
            state["epochs_since_best"] += 1
        if scheduler is not None:
            scheduler.step(dice)
        if cfg.early_stopping_patience is not None and state["epochs_since_best"] >= cfg.early_stopping_patience:
            state["finished"] = True
        state["model"], state["optimizer"] = model.state_dict(), optimizer.state_dict()
        state["scheduler"] = scheduler.state_dict() if scheduler else None
        state["scaler"] = scaler.state_dict()
        if dist_ctx.main:
            if improved:
                _save_best(best_file, model, cfg, state, setup, device, dist_ctx.world)
            io.write_atomically(last, lambda tmp: save_torch(state, tmp))
            _write_history(run_dir / "history.csv", state["history"])
            log.info("%sepoch %d/%d: train loss %.4f, val loss %.4f, val Dice %.4f (best %.4f at epoch %d)%s", label, epoch, cfg.epochs,
                     row["train_loss"], row["val_loss"], dice, state["best_dice"], state["best_epoch"],
                     "; early stop" if state["finished"] else "")
        dist_ctx.barrier()
    if dist_ctx.main and state["epoch"] == first_epoch:
        if state["finished"] and state["epoch"] < cfg.epochs:  # resumed with more --epochs after an early stop
            log.warning("%s stopped early after epoch %d (no better val Dice in %d epochs), so more --epochs do not "
                        "train it on; to go on, train in a new run folder with --init %s", run_dir, state["epoch"],
                        cfg.early_stopping_patience, best_file)
        else:
            log.info("%s already finished (epoch %d)", run_dir, state["epoch"])
    if progress is not None:
        progress(1.0, f"done: best val Dice {state['best_dice']:.4f} at epoch {state['best_epoch']}")
    return best_file


def _refuse_broken_weights(model, epoch: int, train_loss: float, run_dir: Path, kept: int) -> None:
    """A DeepWMLError, before last.pt is written, when an epoch left weights that are NaN or infinite (the loss ran
    away): saved, every later epoch and every resume would go on from them. (On a GPU the fp16 loss scaler skips the
    steps whose gradients overflow, so a healthy run never gets here.) Every process holds the same weights, so
    under torchrun every one stops alike."""
    import torch

    if all(bool(torch.isfinite(t).all()) for t in model.state_dict().values() if t.is_floating_point()):
        return
    kept_text = f"{run_dir / 'last.pt'} keeps epoch {kept}" if kept else "no epoch was kept"
    raise DeepWMLError(f"the network's weights became NaN or infinite in epoch {epoch} (train loss {train_loss:.4g}): "
                       f"the learning rate is too high for this data, or a scan holds extreme values; {kept_text}, and "
                       "a resume would run the same epoch again: train in a new run folder with a lower --lr"
                       + (f" (--init {run_dir / 'best.pt'} starts from the best epoch's weights)" if kept else ""))


def _warn_other_world_size(state: dict, world: int, cfg: TrainConfig, label: str = "") -> None:
    """Say when a run resumes in another number of processes than it trained in (torchrun's --nproc_per_node, or
    torchrun dropped): --batch-size is per process, so each step takes another number of slices, and the epochs'
    slices are dealt out otherwise: it trains on, but not as it would have (nor bit for bit)."""
    before = state.get("world_size")  # None: a state of a version that did not keep it
    if before is None or before == world or state["finished"] or state["epoch"] >= cfg.epochs:
        return
    log.warning("%sthis run trained in %d process(es) and resumes in %d: with --batch-size %d per process a step now "
                "takes %d slices instead of %d, so it does not go on as it started (a resume in %d process(es) "
                "would)", label, before, world, cfg.batch_size, cfg.batch_size * world, cfg.batch_size * before, before)


def _say_other_threads(state: dict, device, cfg: TrainConfig, label: str = "") -> None:
    """Say when a CPU run resumes on another number of threads than it trained on (--threads, or another machine's
    default): it goes on as it would have, but not bit for bit (the module docstring)."""
    import torch

    before, now = state.get("threads"), torch.get_num_threads()
    if device.type != "cpu" or not before or before == now or state["finished"] or state["epoch"] >= cfg.epochs:
        return
    log.info("%sthis run trained on %d CPU thread(s) and resumes on %d: its weights may differ in the last bits from "
             "those of a run kept on %d (--threads %d)", label, before, now, before, before)


def _init_source(cfg: TrainConfig):
    """The model file `cfg.init`, loaded, or a DeepWMLError when it is missing or of another architecture."""
    from .checkpoint import load_model, not_a_model_file

    if not Path(cfg.init).is_file():  # a run folder, say: what to give instead
        raise DeepWMLError(f"--init: {not_a_model_file(Path(cfg.init))}")
    source = load_model(cfg.init)
    if source.config != cfg.architecture:
        raise DeepWMLError(f"--init {cfg.init} has architecture {source.config}, but this run asks for "
                           f"{cfg.architecture}; give the same --base-channels/--depth/--batch-norm")
    return source


def _initialise_from(model, cfg: TrainConfig) -> dict:
    """Copy the weights of the model file `cfg.init` into a new run's network (fine-tuning); returns the file's name
    and digest as they were then, for the provenance of every best.pt the run writes (a resume does not read the
    file again: it may have been moved, or trained on, since)."""
    from .checkpoint import file_digest

    source = _init_source(cfg)
    digest = file_digest(cfg.init)
    if source.preprocessing.to_dict() != cfg.preprocessing:
        grid = source.preprocessing.to_dict()
        spacing = grid["grid_spacing_mm"]
        log.warning("--init %s was trained with preprocessing %s; this run uses %s (to fine-tune it on the grid it "
                    "learnt on, give --grid-size %s --grid-spacing %s)", cfg.init, grid, cfg.preprocessing,
                    " ".join(map(str, grid["grid_size"])), "none" if spacing is None else f"{spacing:g}")
    model.load_state_dict(source.model.state_dict())
    log.info("starting from the weights of %s", cfg.init)
    return {"file": Path(cfg.init).name, "sha256": digest}


def _save_best(path: Path, model, cfg: TrainConfig, state: dict, setup: dict, device, world: int) -> None:
    import torch

    from .checkpoint import save_model

    best_row = state["history"][-1]
    provenance = {
        "command": shlex.join(sys.argv),
        "training_config": cfg.to_dict(),
        "epoch": state["epoch"],
        "epochs_planned": cfg.epochs,
        "metrics": {k: best_row[k] for k in ("val_loss", "val_dice", "val_sensitivity", "val_precision")},
        "data": setup,
        "seed": cfg.seed,
        "device": str(device),
        "world_size": world,
        "torch_version": str(torch.__version__),
    }
    if state.get("initialised_from"):
        provenance["initialised_from"] = dict(state["initialised_from"])
    elif cfg.init:  # the state of a version that did not keep it: the file as it is now, if it is still there
        from .checkpoint import file_digest

        provenance["initialised_from"] = {"file": Path(cfg.init).name}
        with contextlib.suppress(OSError):
            provenance["initialised_from"]["sha256"] = file_digest(cfg.init)
    save_model(path, model, cfg.architecture, cfg.preprocessing, cfg.threshold, provenance,
               {"0": "background", "1": cfg.label_name})


def _write_history(path: Path, history: list[dict]) -> None:
    lines = [",".join(HISTORY_COLUMNS)]
    for row in history:
        lines.append(",".join(str(row[c]) if c == "epoch" else format(float(row[c]), ".6g") for c in HISTORY_COLUMNS))
    io.write_csv_text("\n".join(lines) + "\n", path)


def _refuse_writing_over_a_source(sources: list, target: str | os.PathLike) -> None:
    """A DeepWMLError when `target` is one of the model files it is made from (a slip of the command line): the
    copy would replace the run's own best.pt (its fp32 weights, its provenance) or a file the user still needs."""
    for source in sources:
        with contextlib.suppress(OSError):  # a target not there yet, or a source the loader will name
            if os.path.samefile(source, target):
                raise DeepWMLError(f"writing {target} would replace {source}, the model file it is made from; give "
                                   "the new model another file name (nothing was written)")


def export_model(source: str | os.PathLike, target: str | os.PathLike, fp16: bool = True,
                 threshold: float | None = None) -> Path:
    """Write a compact copy of a model file (fp16 weights by default) for shipping, optionally with
    another probability threshold (e.g. one chosen on validation data after training). Its provenance
    keeps no path to the training data and no case name (`shareable_provenance`)."""
    from .checkpoint import load_model, save_model

    _refuse_writing_over_a_source([source], target)
    loaded = load_model(source)
    provenance = shareable_provenance(loaded.provenance)
    provenance["exported_from"] = str(Path(source).name)
    provenance["exported_fp16"] = bool(fp16)
    if threshold is not None:
        if not 0 < threshold < 1:
            raise DeepWMLError(f"threshold must be between 0 and 1 (exclusive), got {threshold}")
        provenance["threshold_during_training"] = loaded.threshold
    return save_model(target, loaded.model, loaded.config, loaded.preprocessing,
                      loaded.threshold if threshold is None else float(threshold), provenance, loaded.labels, fp16=fp16)


def average_models(sources: list, target: str | os.PathLike, weights: list | None = None,
                   fp16: bool = False) -> Path:
    """Write a model whose weights are the weighted mean of several model files of one architecture
    (a "model soup"; Wortsman et al. 2022). Meant for models fine-tuned from one start, e.g. a model
    and its fine-tuned copy: unlike an ensemble, the result costs one network at inference."""
    from .checkpoint import load_model, save_model

    if len(sources) < 2:
        raise DeepWMLError(f"averaging needs at least two model files, got {len(sources)}")
    if weights is None:
        weights = [1.0 / len(sources)] * len(sources)
    if len(weights) != len(sources):
        raise DeepWMLError(f"give one weight per model: {len(sources)} models, {len(weights)} weights")
    if any(not math.isfinite(w) or w < 0 for w in weights) or not math.isclose(sum(weights), 1.0, abs_tol=1e-6):
        raise DeepWMLError(f"weights must be non-negative and sum to 1, got {list(weights)}")
    _refuse_writing_over_a_source(sources, target)
    loaded = [load_model(s) for s in sources]
    first = loaded[0]
    for source, other in zip(sources[1:], loaded[1:]):
        for what, a, b in (("architecture", first.config, other.config),
                           ("preprocessing", first.preprocessing.to_dict(), other.preprocessing.to_dict()),
                           ("labels", first.labels, other.labels), ("threshold", first.threshold, other.threshold)):
            if a != b:
                raise DeepWMLError(f"{source} and {sources[0]} differ in their {what} ({b} vs {a}); only models of "
                                   "one kind can be averaged")
    states = [m.model.state_dict() for m in loaded]
    mean = {k: sum(w * s[k].double() for w, s in zip(weights, states)).to(v.dtype) if v.is_floating_point() else v
            for k, v in states[0].items()}
    first.model.load_state_dict(mean)
    provenance = {"averaged_from": [{"file": Path(s).name, "digest": m.digest, "weight": float(w), "provenance": m.provenance}
                                    for s, m, w in zip(sources, loaded, weights)],
                  "exported_fp16": bool(fp16)}
    return save_model(target, first.model, first.config, first.preprocessing, first.threshold, provenance,
                      first.labels, fp16=fp16)


def widen_model(source: str | os.PathLike, target: str | os.PathLike, noise: float = 0.01, seed: int = 0) -> Path:
    """Write a copy of a model file with twice the channels at every level (`model.widen`): the same
    function up to `noise`, a start for fine-tuning a wider network (`deepwml train --init`)."""
    from .checkpoint import load_model, save_model
    from .model import widen

    if not 0 <= noise < 1:
        raise DeepWMLError(f"widening noise must be in [0, 1), got {noise}")
    _refuse_writing_over_a_source([source], target)
    loaded = load_model(source)
    wide = widen(loaded.model.float().eval(), noise=noise, seed=seed)
    config = dict(loaded.config, base_channels=2 * loaded.config["base_channels"])
    provenance = {"widened_from": {"file": Path(source).name, "digest": loaded.digest, "noise": noise, "seed": seed,
                                   "provenance": loaded.provenance}}
    return save_model(target, wide, config, loaded.preprocessing, loaded.threshold, provenance, loaded.labels)


# ---------------------------------------------------------------------------------------------
# Command line


class _Console(logging.Handler):
    """A one-line progress bar on stderr, with log lines printed above it."""

    def __init__(self, stream=None):
        super().__init__(logging.INFO)
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.line = ""
        self.last = 0.0

    def __call__(self, fraction: float, message: str) -> None:
        now = time.monotonic()
        if not self.tty or (now - self.last < 0.2 and fraction < 1):
            return
        self.last = now
        filled = int(30 * min(max(fraction, 0.0), 1.0))
        self.line = f"[{'#' * filled}{'.' * (30 - filled)}] {100 * fraction:5.1f}% {message}"[:160]
        progress_line(self.stream, self.line, "\r\033[K" + self.line)

    def emit(self, record: logging.LogRecord) -> None:
        prefix = "warning: " if record.levelno >= logging.WARNING else ""
        say(f"deepwml train: {prefix}{record.getMessage()}", self.stream)  # above the bar, as a warning is

    def close(self) -> None:
        if self.tty and self.line:
            progress_line(self.stream, None, "\n")
        super().close()


_OFF = "off"  # what _range gives for none/off/0: the range switched off (None in the config; None here = not given)


def _range(text: str) -> list[float] | str:
    """argparse type: LO,HI with 0 < LO <= HI, or none/off/0 (`_OFF`)."""
    if text.lower() in ("none", "off", "0"):
        return _OFF
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 2 or not 0 < values[0] <= values[1]:
        raise argparse.ArgumentTypeError(f"must be LO,HI with 0 < LO <= HI (or off), got {text}")
    return values


def register(subparsers) -> None:
    from .cli import (add_debug_flag, non_negative_float, non_negative_int, number_in, open_unit_interval, positive_float,
                      positive_int, unit_interval)

    p = subparsers.add_parser(
        "train", help="train a U-Net on a manifest of FLAIR volumes and lesion masks",
        description="Train the 2D U-Net on FLAIR volumes and WMH masks listed in a manifest CSV (columns case, flair, mask; "
                    "optional centre, disease). Writes split.csv, history.csv, last.pt and best.pt (a model file for "
                    "`deepwml segment --model`) into the run folder; rerunning the same command resumes. "
                    "Multi-GPU / multi-node: torchrun --nproc_per_node N -m DeepWMLLib.train ...")
    p.add_argument("manifest", nargs="?", help="manifest CSV (relative paths are relative to its folder)")
    p.add_argument("--run-dir", help="run folder (created; holds the cache, checkpoints and history)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR with its stored settings")
    p.add_argument("--export", nargs=2, metavar=("MODEL", "OUT"), help="write a compact copy of a model file and exit")
    p.add_argument("--average", nargs="+", metavar="MODEL", help="write the weight average of these model files "
                   "(one architecture, e.g. a model and its fine-tuned copy) to --out and exit")
    p.add_argument("--weights", nargs="+", type=float, metavar="W", help="with --average: one weight per model, summing to 1 "
                   "(default equal)")
    p.add_argument("--widen", metavar="MODEL", help="write a copy of MODEL with twice the channels at every level, "
                   "computing the same function (a start for a wider network: --init); needs --out")
    p.add_argument("--widen-noise", type=float, default=0.01, metavar="S", help="with --widen: noise on the copied "
                   "channels' weights, relative to each layer's spread, so that training can separate them (default 0.01)")
    p.add_argument("--out", metavar="OUT", help="with --average or --widen: the model file to write")
    p.add_argument("--fp16", action="store_true", help="with --export or --average: store the weights as float16 (half the size)")
    p.add_argument("--config", metavar="JSON", help="settings from a JSON file (the flags below override it)")
    g = p.add_argument_group("data")
    g.add_argument("--mask-column", metavar="NAME", help="manifest column of the target masks (default mask; "
                   "intracranial trains the brain-mask network on `deepwml synth --intracranial` data)")
    g.add_argument("--label-name", metavar="NAME", help="what the trained label means, written into the model file "
                   "(default WMH; intracranial for a brain-mask network)")
    g.add_argument("--ignore-label", type=number_in(2, 255, int), metavar="N", help="mask value N (2 to 255) marks voxels "
                   "to leave out of the loss and validation (uncertain or unlabelled regions); other positive values are lesion")
    g.add_argument("--split", metavar="CSV", help="use this split (columns case, split) instead of the seeded 60/20/20")
    g.add_argument("--skip-bad-cases", action="store_true", default=None, help="leave out unreadable cases, and cases "
                   "whose scan does not look like a FLAIR, with a warning")
    g.add_argument("--allow-non-flair", action="store_true", default=None, help="train on cases whose scan the FLAIR "
                   "check calls T1-, T2- or PD-weighted (refused otherwise, naming them; RUN_DIR/flair_check.csv "
                   "holds every case's figures): when you know they are FLAIRs, or mean to train on that contrast")
    g.add_argument("--grid-size", type=positive_int, nargs="+", metavar="N", help="network grid (default 256 256)")
    g.add_argument("--grid-spacing", type=lambda s: None if s.lower() == "none" else float(s), default=argparse.SUPPRESS,
                   metavar="MM", help="network pixel size in mm, or 'none' to fit the field of view (default 0.9)")
    g = p.add_argument_group("model")
    g.add_argument("--base-channels", type=positive_int, help="channels of the first level (paper 64)")
    g.add_argument("--depth", type=positive_int, help="poolings (paper 4)")
    g.add_argument("--batch-norm", action="store_true", default=None, help="BatchNorm after each convolution")
    g.add_argument("--init", metavar="MODEL", help="start from this model file's weights, or a shipped model's by its "
                   "name, e.g. unet32-v9 (fine-tuning; same architecture)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=positive_int, help="epochs (paper 200)")
    g.add_argument("--batch-size", type=positive_int, help="slices per step and process (default 8)")
    g.add_argument("--lr", type=positive_float, dest="learning_rate", help="Adam learning rate (paper 1e-4)")
    g.add_argument("--samples-per-epoch", type=positive_int, help="slices drawn per epoch (default: the number of training slices)")
    g.add_argument("--lesion-fraction", type=unit_interval, help="share of drawn slices that contain lesion, e.g. 0.7 (default: as in the data)")
    g.add_argument("--patch-size", type=positive_int, help="train on random square crops of this size (cheaper on CPU)")
    g.add_argument("--dice-weight", type=non_negative_float, help="loss = BCE + w × (1 − Dice) (default 1)")
    g.add_argument("--threshold", type=open_unit_interval, help="probability threshold for validation and the model file (default 0.5; with --export: "
                        "the exported file's threshold, default the source's)")
    g.add_argument("--seed", type=int, help="seed of the split, initialisation and sampling (default 0)")
    g.add_argument("--plateau-patience", type=non_negative_int, help="halve the learning rate when more than this many epochs in a row bring no better "
                   "val Dice (PyTorch's ReduceLROnPlateau patience: with 3, the 4th such epoch halves it)")
    g.add_argument("--early-stopping", type=positive_int, dest="early_stopping_patience", help="stop after this many epochs without a better val Dice")
    g.add_argument("--ensemble", type=positive_int, help="train N models from seeds seed..seed+N-1 into RUN_DIR/model_k")
    g = p.add_argument_group("augmentation (0 switches rotate, shear, bias field or noise off; 'off' a range)")
    g.add_argument("--no-augment", action="store_true", help="switch all augmentation off")
    g.add_argument("--no-flip", action="store_true", help="no left-right flips")
    g.add_argument("--rotate", type=non_negative_float, dest="rotate_deg", help="max rotation in degrees (default 10)")
    g.add_argument("--shear", type=non_negative_float, dest="shear_deg", help="max shear in degrees (default 18)")
    g.add_argument("--scale", type=_range, help="scale range LO,HI (default 0.9,1.1)")
    g.add_argument("--contrast", type=_range, help="contrast factor range LO,HI (default 0.75,1.25)")
    g.add_argument("--gamma", type=_range, help="gamma range LO,HI (default 0.7,1.5)")
    g.add_argument("--bias-field", type=non_negative_float, help="bias field amplitude (default 0.3)")
    g.add_argument("--noise", type=non_negative_float, dest="noise_std", help="max Gaussian noise std in normalised units (default 0.1)")
    g = p.add_argument_group("hardware")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), help="default auto")
    g.add_argument("--threads", type=positive_int, help="CPU threads")
    g.add_argument("--no-amp", action="store_true", help="no mixed precision on GPU")
    g.add_argument("--cpu-bf16", action="store_true", help="on the CPU: bf16 autocast and channels-last, about 2.7x "
                   "faster per step on CPUs with AMX (needs native bf16: AMX or AVX512-BF16); off by default")
    add_debug_flag(p)
    p.set_defaults(func=_run)


# Options that set a training setting (argparse dest names); --resume refuses them but epochs, device, threads.
# Command-line options that set the training config, by where they go in it (argparse dest names).
_RESUMABLE_OPTIONS = ("epochs", "device", "threads")  # the only ones --resume may change
_TOP_OPTIONS = ("split", "batch_size", "learning_rate", "samples_per_epoch", "lesion_fraction", "patch_size",
                "dice_weight", "threshold", "seed", "plateau_patience", "early_stopping_patience", "ensemble",
                "skip_bad_cases", "allow_non_flair", "init", "mask_column", "label_name", "ignore_label")
_ARCHITECTURE_OPTIONS = ("base_channels", "depth", "batch_norm")
_AUGMENTATION_OPTIONS = ("rotate_deg", "shear_deg", "scale", "contrast", "gamma", "bias_field", "noise_std")
_SETTING_OPTIONS = (_TOP_OPTIONS + ("no_amp", "cpu_bf16") + _ARCHITECTURE_OPTIONS + ("grid_size", "no_augment", "no_flip")
                    + _AUGMENTATION_OPTIONS)  # (and grid_spacing, present only when given) fixed by a run's config


_OPTION_NAMES = {"learning_rate": "lr", "early_stopping_patience": "early_stopping", "rotate_deg": "rotate",
                 "shear_deg": "shear", "noise_std": "noise"}  # argparse dest -> option, where they differ


def _init_file(spec: str) -> str:
    """--init's model file: a file, or the name of a shipped model (`unet32-v9`), as segment's --model takes it."""
    from .segment import model_files

    files = model_files([spec], option="--init")
    if len(files) > 1:
        raise UsageError(f"--init {spec} is an ensemble of {len(files)} models, and fine-tuning starts from one: "
                         f"give one of its members ({', '.join(Path(f).name for f in files)})")
    return files[0]


def config_from_args(args: argparse.Namespace) -> tuple[dict, Path]:
    """The training config and run folder a command line asks for."""
    if args.resume:
        run_dir = Path(args.resume)
        stored = run_dir / "config.json"
        if not stored.is_file():
            if _has_trained(run_dir):
                raise DeepWMLError(_no_config_message(run_dir))
            raise DeepWMLError(f"{run_dir} holds no training to resume (no config.json)")
        given = [name for name in _SETTING_OPTIONS if getattr(args, name, None) is not None  # 0 is a value too
                 and getattr(args, name, None) is not False]
        given += ["grid_spacing"] if hasattr(args, "grid_spacing") else []
        if args.manifest or args.run_dir or args.config or given:
            extra = ", ".join(["a manifest"] * bool(args.manifest) + ["--run-dir"] * bool(args.run_dir)
                              + ["--config"] * bool(args.config)
                              + [f"--{_OPTION_NAMES.get(n, n).replace('_', '-')}" for n in given])
            raise UsageError(f"--resume continues with the run's stored settings; only --epochs, --device and --threads "
                             f"may change ({extra} given); start a new run folder to change the others")
        config = json.loads(stored.read_text(encoding="utf-8"))
        for key in _RESUMABLE_OPTIONS:
            if getattr(args, key, None) is not None:
                config[key] = getattr(args, key)
        return config, run_dir
    if not args.manifest or not args.run_dir:
        raise UsageError("give a manifest and --run-dir (or --resume RUN_DIR, or --export MODEL OUT)")
    config = _read_config(args.config) if args.config else {}
    config["manifest"] = args.manifest
    for key in _TOP_OPTIONS + _RESUMABLE_OPTIONS:
        if getattr(args, key, None) is not None:
            config[key] = getattr(args, key)
    if config.get("init"):
        config["init"] = _init_file(config["init"])
    if args.no_amp:
        config["amp"] = False
    if args.cpu_bf16:
        config["cpu_bf16"] = True
    architecture = dict(config.get("architecture", {}))
    for key in _ARCHITECTURE_OPTIONS:
        if getattr(args, key) is not None:
            architecture[key] = getattr(args, key)
    config["architecture"] = architecture
    preprocessing = dict(config.get("preprocessing", PreprocessingConfig().to_dict()))
    if args.grid_size:
        preprocessing["grid_size"] = (args.grid_size * 2)[:2]
    if hasattr(args, "grid_spacing"):
        preprocessing["grid_spacing_mm"] = args.grid_spacing
    config["preprocessing"] = preprocessing
    augmentation = dict(config.get("augmentation", DEFAULT_AUGMENTATION))
    if args.no_augment:
        augmentation = {k: (False if k == "flip" else None) for k in DEFAULT_AUGMENTATION}
    if args.no_flip:
        augmentation["flip"] = False
    for key in _AUGMENTATION_OPTIONS:
        value = getattr(args, key, None)
        if value is not None:
            augmentation[key] = None if value == _OFF else value
    config["augmentation"] = augmentation
    return config, Path(args.run_dir)


def _run(args: argparse.Namespace) -> int:
    if sum(map(bool, (args.average, args.widen, args.export))) > 1:
        raise UsageError("--export, --average and --widen each make one model file; give one of them")
    if (args.average or args.widen or args.export) and (args.manifest or args.run_dir or args.resume):
        raise UsageError("--export, --average and --widen only write a model file; no manifest, --run-dir or --resume "
                         f"goes with them{f' (got {args.manifest})' if args.manifest else ''}")
    target = args.export[1] if args.export else args.out
    if (args.average or args.widen or args.export) and target:
        io.make_output_dir(Path(target).expanduser().parent)  # as segment makes its output folder
    if args.average:
        if not args.out:
            raise UsageError("--average needs --out OUT, the model file to write")
        print(average_models(args.average, args.out, args.weights, fp16=args.fp16))
        return 0
    if args.widen:
        if not args.out:
            raise UsageError("--widen needs --out OUT, the model file to write")
        print(widen_model(args.widen, args.out, args.widen_noise, args.seed or 0))
        return 0
    if args.weights or args.out:
        raise UsageError("--weights and --out go with --average or --widen")
    if args.export:
        out = export_model(args.export[0], args.export[1], fp16=args.fp16, threshold=args.threshold)
        print(out)
        return 0
    try:
        config, run_dir = config_from_args(args)
    except (OSError, json.JSONDecodeError) as exc:
        raise DeepWMLError(f"cannot read the settings ({exc}); check --config / --resume") from exc
    main_rank = int(os.environ.get("RANK", "0")) == 0
    console = _Console()
    logger = logging.getLogger("DeepWMLLib")
    if main_rank:
        logger.addHandler(console)
        logger.setLevel(logging.INFO)
    try:
        best = train(config, run_dir, progress=console if main_rank else None)
    except KeyboardInterrupt:  # Ctrl-C or a stop signal: what was kept, and how to go on (main says it was stopped)
        if _has_trained(run_dir):
            log.info("%s keeps every finished epoch: rerun the same command, or `deepwml train --resume %s`, to go "
                     "on from the last", run_dir, run_dir)
        else:
            log.info("no epoch was finished: rerun the same command to start again (the cases prepared so far are kept)")
        raise
    finally:
        logger.removeHandler(console)
        console.close()
    if main_rank:
        for path in best if isinstance(best, list) else [best]:
            print(path)
    return 0


if __name__ == "__main__":
    from .cli import main

    sys.exit(main(["train", *sys.argv[1:]]))
