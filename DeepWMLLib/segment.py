"""The main job: FLAIR volume in, WMH mask on the input's exact grid plus a lesion report out.

`segment_image` is the Python API (the Slicer module and batch scripts call it); `segment_cases`
runs a list of files and folders the way `deepwml segment` does; `register` adds the sub-command.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import json
import math
import re
import os
import shutil
import sys
import threading
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from . import __version__, io, resources_dir
from .cli import end_progress_line, progress_line
from .errors import Cancelled, DeepWMLError, UsageError, case_error
from .report import lesion_count_text

if TYPE_CHECKING:
    import SimpleITK as sitk

MODELS_DIR_ENV = "DEEPWML_MODELS_DIR"
SUMMARY_COLUMNS = ("case", "input", "volume_ml", "lesion_count", "periventricular_ml", "deep_ml", "status", "error",
                   "seconds", "warnings")
BRAIN_ROLE = "intracranial"  # label 1 of a brain-mask model; its role in models.json
# The report's `brain_mask`: what the brain mask was used for. With --no-brain-mask it still runs (0.38 GFLOP a slice
# beside the WMH network's 24) for the checks that need it (FLAIR contrast, coverage) and the intracranial volume.
BRAIN_MASK_GATES = "gates the marks"
BRAIN_MASK_NOT_APPLIED = "not applied to the marks"
VENTRICLE_ROLE = "ventricles"  # the role of a lateral-ventricle model in models.json ...
VENTRICLE_LABEL = "lateral_ventricles"  # ... and its label 1
SHIPPED_VENTRICLE_MODEL = "deepwml_vent8_synth_v1.pt"  # in models_dir(); opt-in (too little of real ventricles)
# Plausible intracranial mask / head mask voxel ratios: 0.84-1.18 on the 11 clinical FLAIRs, the 3
# labelled cases at 1, 5 and 8 mm and the sample (the head mask leaves out dark CSF and bone; session 37,
# Testing/benchmarks/brain_coverage.py). Outside: a warning.
BRAIN_COVERAGE = (0.5, 2.0)
# The brain reaches an edge of the field of view on an axial slice where the brain mask lies within
# FOV_EDGE_BAND_MM of that edge along at least FOV_EDGE_CONTACT_MM of it: where an edge cuts the brain (crops of the
# real scans) the mask does not always reach the edge's last pixel (it stops up to 1 mm short of it on the nearest
# slice), hence a band. On the 11 clinical FLAIRs and the 3 labelled cases (also at 5 and 8 mm slices) the brain lies
# 12 mm or more from every edge; crops 10-30 mm into the brain put it at the edge along 63.6 mm or more of it
# (session 37: Testing/benchmarks/brain_coverage.py --crops, as the figures below).
FOV_EDGE_BAND_MM = 5.0
FOV_EDGE_CONTACT_MM = 20.0
# The scan misses the top (bottom) of the brain when its highest (lowest) slice holds at least this share of the
# brain's largest axial cross-section: at most 15 % (top) and 21 % (bottom: a slab ending in the cerebellum) on those
# real scans, up to 14 % on the labelled cases re-sliced to 8 mm slices of which the highest just reaches the top of
# the brain (a thick slice averages the brain below it in; 32 % in session 35, before the grids' centres moved, set
# this share's margin); 46 % or more with the top 20 mm of the brain cut off, 42 % or more with the slab ending
# 90 mm below the top of the brain, through the temporal lobes.
FOV_END_SHARE = 0.35
FOV_SIDES = ("right", "left", "anterior", "posterior")  # the axial stack's first and last column, first and last row
# Marked volume / intracranial volume above which the result is questioned: at most 1.6 % on the 11
# clinical FLAIRs and the sample, 3.2 % on the labelled cases (patient19 at 5 mm; its reference load,
# about 45-50 ml, is 4.1-4.6 %); a T2-weighted phantom (bright CSF, the commonest wrong series) got
# 8.9 % marked, its ventricles and sulci. The heaviest real loads come near it, so it is a warning that
# asks for a look, never a refusal.
IMPLAUSIBLE_LOAD = 0.05
# A sagittal or coronal acquisition is warned about when its slices are at least this thick: the
# axial planes the network sees then run across the thick slices. Thinner slices sample every plane.
THICK_NON_AXIAL_MM = 2.0
# Shares of the progress reported: the networks are most of a segmentation (the rest: post-processing, the
# report, the FLAIR check); segmenting is most of a case (the rest: the QC picture, the DICOM outline, writing
# the files). After the networks, each step says so as it starts, at about its share of the time: at 1024 x 1024
# x 400 voxels on a CPU, networks 33 s, post-processing 3 s, the report 3 s, the FLAIR check 6 s (twice that on
# a busy machine; on a GPU the networks take a few seconds, the rest as long): 0.85 left a bar at 76 % for all of it.
NETWORK_SHARE = 0.7
POSTPROCESSING_AT, LOCATION_AT, REPORT_AT, FLAIR_CHECK_AT = 0.7, 0.76, 0.78, 0.84
SEGMENTING_SHARE = 0.9
# Reading the scan, the first part of segmenting's share: 14-30 s for a 1024 x 1024 x 400 .nii.gz, beside the
# networks' 33 s on a CPU (a few seconds on a GPU); the bar moves as a NIfTI file's bytes or a DICOM series'
# files are read.
READING_SHARE = 0.15
# While the reading tells nothing for this long, the bar's message counts its seconds: SimpleITK reads an NRRD
# or MetaImage file in one call that says nothing until it ends (io.read_any).
READING_TICK_S = 1.0
# Peak memory of `deepwml segment` per voxel of the scan, with the brain mask: 5.2 GB for a 1024 x 1024 x 400
# scan stored as float64 (12.6 bytes a voxel), 1.0 GB for a 363 x 435 x 363 one (README "Large scans");
# rounded up for the out-of-memory message.
PEAK_BYTES_PER_VOXEL = 13
# The terminal progress bar shows this many characters of a step's message: the steps' own words fit in it.
BAR_MESSAGE_WIDTH = 40


def physical_memory_bytes() -> int | None:
    """This computer's memory (RAM) in bytes, or None when the system does not say."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        pass
    if sys.platform == "win32":
        import ctypes

        class _Status(ctypes.Structure):
            _fields_ = [("length", ctypes.c_ulong), ("load", ctypes.c_ulong)] + [
                (name, ctypes.c_ulonglong) for name in ("total", "free", "page_total", "page_free", "virtual_total",
                                                        "virtual_free", "extended")]

        status = _Status()
        status.length = ctypes.sizeof(_Status)
        if ctypes.windll.kernel32.GlobalMemoryStatusEx(ctypes.byref(status)):
            return int(status.total)
    return None


def out_of_memory(size=None) -> DeepWMLError:
    """The one-line error for a scan that did not fit in memory (`size`: its voxels along each axis, when
    known), in place of numpy's "Unable to allocate ..." reported as an internal error."""
    scan = ""
    if size:
        need = float(np.prod([int(n) for n in size], dtype=np.float64)) * PEAK_BYTES_PER_VOXEL
        scan = f" for this scan ({' x '.join(str(int(n)) for n in size)} voxels, which needs about {need / 1e9:.1f} GB)"
    memory = physical_memory_bytes()
    have = f" this computer has {memory / 1e9:.1f} GB in all;" if memory else ""
    return DeepWMLError(f"not enough memory{scan}:{have} close other programs (other DeepWML runs, a viewer holding "
                        "large scans) and run it again, or run it on a computer with more memory")


def _explains_running_out_of_memory(function):
    """`function(image, ...)` with a MemoryError turned into `out_of_memory`'s one-line error."""
    @functools.wraps(function)
    def guarded(image, *args, **kwargs):
        try:
            return function(image, *args, **kwargs)
        except MemoryError as exc:
            raise out_of_memory(image.GetSize() if hasattr(image, "GetSize") else None) from exc
    return guarded


def models_dir() -> Path:
    env = os.environ.get(MODELS_DIR_ENV)
    return Path(env) if env else resources_dir() / "Models"


def ventricle_model_needed() -> str:
    """What --save-ventricle-mask without a ventricle model is told: the shipped one named where this install keeps
    it (a wheel inside the package, DeepWMLLib/Resources/Models, not the source tree's Resources/Models)."""
    return ("--save-ventricle-mask needs a ventricle model: none runs by default; give one with --ventricle-model "
            f"(the shipped, opt-in one: {models_dir() / SHIPPED_VENTRICLE_MODEL})")


def _registry() -> dict:
    registry = models_dir() / "models.json"
    if not registry.is_file():
        raise DeepWMLError(f"no model registry at {registry}; pass --model FILE or set {MODELS_DIR_ENV}")
    return json.loads(registry.read_text(encoding="utf-8"))


def shipped_models(role: str | None = "wmh") -> list[dict]:
    """The model registry (Resources/Models/models.json): name, file, version, description, default,
    role ("wmh", the default, "intracranial" for a brain-mask network, "ventricles" for the lateral-ventricle
    network). `role` None: every entry."""
    entries = _registry()["models"]
    for entry in entries:
        entry["path"] = str(models_dir() / entry["file"])
    return [e for e in entries if role is None or e.get("role", "wmh") == role]


def shipped_ensembles() -> list[dict]:
    """The registry's named ensembles ("ensembles" in models.json: name, members by model name, description),
    each with `paths`, its members' files: the combinations of shipped WMH models the model card measured."""
    files = {entry["name"]: entry["path"] for entry in shipped_models()}
    ensembles = []
    for entry in _registry().get("ensembles", []):
        unknown = [member for member in entry["members"] if member not in files]
        if unknown or entry["name"] in files:
            raise DeepWMLError(f"{models_dir() / 'models.json'}: the ensemble {entry['name']!r} "
                               + (f"names {', '.join(unknown)}, not a WMH model listed there" if unknown else
                                  "has the name of a model") + "; correct the file or install DeepWML again")
        ensembles.append({**entry, "paths": [files[member] for member in entry["members"]]})
    return ensembles


def model_files(specs: Sequence[str] | None, option: str = "--model") -> list[str] | None:
    """--model's arguments as model files (deepwml segment, change, adapt, bench and the Slicer batch script):
    a file (or a training run's folder) is itself; else the name of a shipped model gives its file and that of a
    shipped ensemble its members' (also where a folder of that name is here, an OUTDIR named after the model, say).
    A name that is neither is refused with the names there are (`option` names the option in the message); a
    path (with a folder, ending .pt, or an image's name) or another folder is left for the caller or the loader
    to say what it is. None (the default model) stays None.
    A shipped model named again (an ensemble and one of its members, two ensembles with a member in common, a
    name twice) is averaged in once, with a warning saying so: the user asked for these models, not for one of
    them to weigh more (files given as paths are kept as given; `load_models` warns of one given twice)."""
    if not specs:
        return specs
    names = model_names = None
    files = []
    given: dict[str, str] = {}  # a shipped model's file -> the name (its own, or an ensemble's) that gave it first
    for spec in specs:
        if os.path.isfile(spec) or is_run_folder(spec) or os.sep in spec or "/" in spec \
                or spec.lower().endswith((".pt", ".pth")) or io.is_image_file(spec):
            files.append(spec)
            continue
        if names is None:
            names = {entry["name"]: [entry["path"]] for entry in shipped_models()}
            model_names = {paths[0]: name for name, paths in names.items()}
        if spec not in names:  # the ensembles only now: a wrong entry there does not stop a model's name
            names.update({entry["name"]: entry["paths"] for entry in shipped_ensembles()})
        if spec in names:
            again = [path for path in dict.fromkeys(names[spec]) if path in given]
            if again:
                warnings.warn(_named_again(spec, again, given, model_names), stacklevel=2)
            for path in names[spec]:
                if path not in given:
                    given[path] = spec
                    files.append(path)
        elif os.path.isdir(spec):
            files.append(spec)
        else:
            raise UsageError(f"{option} {spec}: no such model file, nor a shipped model or ensemble of that name "
                             f"(shipped: {', '.join(names)})")
    return files


def _named_again(spec: str, again: list[str], given: dict[str, str], model_names: dict[str, str]) -> str:
    """model_files' warning for the shipped files `again` of the name `spec` that an earlier name gave already."""
    if spec in given.values():
        return f"{spec} is given twice: used once"
    said = []
    for path in again:
        member, earlier = model_names.get(path, os.path.basename(path)), given[path]
        if earlier != member and spec != member:
            said.append(f"{member} is a member of both {earlier} and {spec}: used once")
        elif earlier != member:
            said.append(f"{member} is a member of {earlier} already: used once")
        else:
            said.append(f"{member} is given, and is a member of {spec} too: used once")
    return "; ".join(said)


def is_run_folder(path) -> bool:
    """Whether `path` is a training run's folder (its best.pt or last.pt in it, or an ensemble's model_k/best.pt),
    which --model may be given: the loader names the model files to give instead."""
    return os.path.isdir(path) and (any(os.path.isfile(os.path.join(path, name)) for name in ("best.pt", "last.pt"))
                                    or any(Path(path).glob("model_*/best.pt")))


def default_model_paths() -> list[str]:
    """The shipped default WMH model(s)."""
    entries = shipped_models()
    default = [e for e in entries if e.get("default")] or entries[:1]
    return [e["path"] for e in default]


def default_role_model_path(role: str) -> str | None:
    """The shipped default model of a role (BRAIN_ROLE, VENTRICLE_ROLE), or None when the registry has none."""
    entries = [e for e in shipped_models(role) if e.get("default")]
    return entries[0]["path"] if entries else None


def is_brain_model(loaded) -> bool:
    """Whether a model file segments the intracranial space (a brain-mask network) rather than WMH."""
    return str(loaded.labels.get("1", "")).strip().lower() == BRAIN_ROLE


def is_ventricle_model(loaded) -> bool:
    """Whether a model file segments the lateral ventricles rather than WMH."""
    return str(loaded.labels.get("1", "")).strip().lower() == VENTRICLE_LABEL


def load_models(paths: Sequence[str | os.PathLike] | None = None) -> list:
    """Model files' settings (None: the shipped default model); each network is built on first use. A shipped model's
    or ensemble's name ("unet32-v9", "ensemble-v8", as --model takes it) gives its file(s) (`model_files`)."""
    from .checkpoint import load_model_settings

    if isinstance(paths, (str, os.PathLike)):  # one file, not a string of one-letter paths
        paths = [paths]
    paths = list(paths or default_model_paths())
    if all(isinstance(p, (str, os.PathLike)) for p in paths):  # anything else: refused by the loader, saying so
        paths = model_files([os.fspath(p) for p in paths], "model")
    models = [load_model_settings(p) for p in paths]
    name_apart(models)
    names: dict[str, list[str]] = {}
    for m in models:
        names.setdefault(m.digest, []).append(m.name)
    for same in names.values():  # one file twice (a glob and its name, a copy): weighed twice, unsaid before
        if len(same) > 1:
            given = (f"{same[0]} is given {len(same)} times" if len(set(same)) == 1 else
                     f"{' and '.join(dict.fromkeys(same))} are one model (files of the same content)")
            warnings.warn(f"{given}: the ensemble averages it in {len(same)} times (weight {len(same)}/{len(models)}); "
                          "give it once for an equal average", stacklevel=2)
    for m in models:
        if is_brain_model(m):
            raise DeepWMLError(f"{m.name} is a brain-mask model, not a WMH model; pass it as the brain model "
                               "(--brain-model) and give a WMH model with --model")
        if is_ventricle_model(m):
            raise DeepWMLError(f"{m.name} is a ventricle model, not a WMH model; pass it as the ventricle model "
                               "(--ventricle-model) and give a WMH model with --model")
    return models


def name_apart(models: Sequence) -> None:
    """Names ensemble members of one file name (runs/seed1/best.pt, runs/seed2/best.pt) by the fewest trailing parts
    of their paths that tell them apart (seed1/best.pt, seed2/best.pt), so that the report, the progress lines and
    Slicer's result text say which is which; a member whose file name is its own keeps it, as one file given twice
    does (on Windows also in other letter case: paths are compared as the system finds its files)."""
    groups: dict[str, list] = {}
    for m in models:
        groups.setdefault(m.name, []).append(m)
    for group in groups.values():
        typed = [Path(os.path.abspath(m.path)).parts for m in group]
        found = [Path(os.path.normcase(os.path.abspath(m.path))).parts for m in group]
        files = set(found)
        if len(files) < 2:
            continue
        for depth in range(2, max(map(len, files)) + 1):
            if len({tail[-depth:] for tail in files}) == len(files):
                break
        for m, parts in zip(group, typed):
            m.name = Path(*parts[-depth:]).as_posix()  # "D:/best.pt", not "D:\/best.pt", where the drive tells


def asks_for_no_model(spec) -> bool:
    """Whether a helper network's `spec` (load_brain_model's, load_ventricle_model's) asks for none: None or False."""
    return spec is None or spec is False


def asks_for_default_model(spec) -> bool:
    """Whether a helper network's `spec` asks for the model registry's default: the text "default" (a path named so,
    pathlib.Path("default"), is a model file), or True (as False is none)."""
    return spec is True or (isinstance(spec, str) and spec == "default")


def names_own_model(spec) -> bool:
    """Whether a helper network's `spec` names a model of the caller's choosing: a model file (a path, as text or a
    path object; an empty or a non-model value too, refused where it is loaded) or an already loaded model; neither
    the default nor none (`asks_for_default_model`, `asks_for_no_model`)."""
    return not (asks_for_no_model(spec) or asks_for_default_model(spec))


def _load_role_model(spec, role: str, label: str, kind: str):
    """A helper network's model: "default" or True (the registry's default of `role`, None when it has none), None
    or False (none), a model file path, or an already loaded model whose label 1 must be `label`."""
    from .checkpoint import LoadedModel, load_model_settings

    if asks_for_no_model(spec):
        return None
    if asks_for_default_model(spec):
        spec = default_role_model_path(role)
        if spec is None:
            return None
    loaded = spec if isinstance(spec, LoadedModel) else load_model_settings(spec)
    if str(loaded.labels.get("1", "")).strip().lower() != label:
        raise DeepWMLError(f"{loaded.name} is not a {kind} model (its label 1 is "
                           f"{loaded.labels.get('1', '?')!r}, not {label!r})")
    return loaded


def load_brain_model(spec="default"):
    """The brain-mask model: "default" or True (the shipped one, if any), None or False (no brain network: no
    gating, no FLAIR or coverage check, no intracranial volume), a model file path, or an already loaded model.
    Raises DeepWMLError for a model of another kind."""
    return _load_role_model(spec, BRAIN_ROLE, BRAIN_ROLE, "brain-mask")


def load_brain_model_saying_none(spec="default"):
    """load_brain_model for a run of deepwml segment or change, with a warning when the shipped default is asked for
    and the model registry lists none (DEEPWML_MODELS_DIR naming a folder of one's own WMH models): no brain mask
    then removes the marks outside the brain or serves the FLAIR and coverage checks, which silence would hide."""
    loaded = load_brain_model(spec)
    if loaded is None and asks_for_default_model(spec):
        warnings.warn(f"no brain-mask model is listed in {models_dir() / 'models.json'} (role \"{BRAIN_ROLE}\"), so "
                      "none runs: marks outside the brain are kept, and whether each scan is a FLAIR and covers the "
                      "whole brain is not checked; list one there, or give one with --brain-model FILE", stacklevel=2)
    return loaded


def load_ventricle_model(spec="default"):
    """The lateral-ventricle model for the periventricular/deep split (location.py): "default" or True (the
    registry's default one, if it marks one), None or False (no split), a model file path, or an already loaded
    model. Raises DeepWMLError for a model of another kind."""
    return _load_role_model(spec, VENTRICLE_ROLE, VENTRICLE_LABEL, "ventricle")


def loaded_models(models) -> list:
    """segment_image's `models` (None: the shipped default; model files, shipped names or loaded models) as loaded
    models."""
    from .checkpoint import LoadedModel

    if models is None:
        return load_models()
    models = [models] if isinstance(models, (str, os.PathLike, LoadedModel)) else list(models)
    if not models:
        raise DeepWMLError("models is empty: give model files or loaded models (load_models), or None for the "
                           "shipped default")
    if all(isinstance(m, (str, os.PathLike)) for m in models):
        return load_models(models)
    # beside loaded models, each given one by one: a shipped ensemble's name gives several
    models = [loaded for m in models
              for loaded in (load_models([m]) if isinstance(m, (str, os.PathLike)) else [m])]
    for m in models:
        if not isinstance(m, LoadedModel):
            raise DeepWMLError(f"models must be model files or loaded models (load_models), got a {type(m).__name__}")
    return models


# The settings that shape a case's result (its mask, its figures, its split), by the option that sets them.
# The report records them (`settings`), and a rerun into the same OUTDIR skips a case only when they are the
# same. How a run goes (device, backend, batch size) and the optional outputs it adds do not count.
RESULT_SETTINGS = {"model_sha256": "--model", "threshold": "--threshold", "tta": "--tta", "grid_phases": "--grid-phases",
                   "min_lesion_mm3": "--min-lesion-mm3", "exclude_edge_fraction": "--exclude-edge-slices",
                   "brain_model_sha256": "--brain-model/--no-brain-mask", "brain_mask": "--no-brain-mask",
                   "ventricle_model_sha256": "--ventricle-model/--no-location", "precision": "--precision"}


def brain_mask_use(brain_model, brain_gate: bool) -> str | None:
    """The report's `brain_mask`: what the brain mask of `brain_model` (None: no brain model) was used for."""
    if brain_model is None:
        return None
    return BRAIN_MASK_GATES if brain_gate else BRAIN_MASK_NOT_APPLIED


def result_settings(models: Sequence, threshold: float | None, tta: bool, min_lesion_mm3: float | None,
                    exclude_edge_fraction: float, brain_model, ventricle_model, precision: str | None,
                    grid_phases: int = 1, brain_gate: bool = True) -> dict:
    """The settings that shape a result (RESULT_SETTINGS) and the models' names, from loaded models
    (`threshold`, `min_lesion_mm3` None: their defaults). `precision`: what the networks computed in
    (`computed_precision`); for a run not yet made, the one asked for, None for auto (any). `brain_gate`
    False: the brain mask was not applied to the marks (--no-brain-mask), only to the checks and figures; a
    report made before that had no brain model with --no-brain-mask (so its `brain_model_sha256` differs)."""
    from .postprocessing import DEFAULT_MIN_LESION_MM3

    pairs = sorted((m.digest, m.name) for m in models)  # an ensemble is averaged: its order does not matter
    return {
        "model": [name for _, name in pairs], "model_sha256": [digest for digest, _ in pairs],
        "threshold": float(np.mean([m.threshold for m in models])) if threshold is None else float(threshold),
        "tta": bool(tta),
        "grid_phases": int(grid_phases),
        "min_lesion_mm3": float(DEFAULT_MIN_LESION_MM3 if min_lesion_mm3 is None else min_lesion_mm3),
        "exclude_edge_fraction": float(exclude_edge_fraction),
        "brain_model": None if brain_model is None else brain_model.name,
        "brain_model_sha256": None if brain_model is None else brain_model.digest,
        "brain_mask": brain_mask_use(brain_model, brain_gate),
        "ventricle_model": None if ventricle_model is None else ventricle_model.name,
        "ventricle_model_sha256": None if ventricle_model is None else ventricle_model.digest,
        "precision": precision,
    }


def computed_precision(runner: str | None) -> str:
    """What the networks computed in, from the report's `runner` ("openvino bf16, torch"): fp32, bf16 or fp16,
    joined by "+" when runners differed (a GPU run finished on the CPU)."""
    kinds = {"bf16" if "bf16" in name else "fp16" if "fp16" in name else "fp32"
             for name in (runner or "").split(", ") if name}
    return "+".join(sorted(kinds)) or "fp32"


def rerun_precision(precision: str, earlier: dict, device: str, backend: str) -> str:
    """The precision to run the networks again in for a case done before (add_outputs, whose mask must be the saved
    one): `precision` as asked, but auto as the earlier run computed, where its report records one precision, fp32 or
    bf16 (bf16 where it runs here: check_runtime). Auto's choice on a CPU with native bf16 is measured
    (inference.bf16_is_faster), so it may differ from the earlier run's: an earlier version's bf16, another thread
    count, the cache cleared."""
    from .inference import check_runtime

    then = recorded_settings(earlier).get("precision")
    if precision != "auto" or then not in ("fp32", "bf16"):
        return precision
    if then == "bf16":
        try:
            check_runtime(device, backend, "bf16")
        except DeepWMLError:  # not here (a GPU, a CPU without native bf16): auto, whose mask check says so
            return precision
    return then


def planned_settings(models=None, threshold: float | None = None, tta: bool = False,
                     min_lesion_mm3: float | None = None, exclude_edge_fraction: float = 0.0,
                     brain_model="default", ventricle_model="default", precision: str = "auto",
                     grid_phases: int = 1, brain_gate: bool = True) -> dict:
    """The result settings a run given these (as segment_image takes them) will record, before it runs."""
    return result_settings(loaded_models(models), threshold, tta, min_lesion_mm3, exclude_edge_fraction,
                           load_brain_model(brain_model), load_ventricle_model(ventricle_model),
                           None if precision == "auto" else precision, grid_phases, brain_gate)


def recorded_settings(report: dict) -> dict:
    """The result settings a report records: its `settings`, or for a report of a version before them those
    its other fields give (the models, threshold, tta, brain and ventricle models; not the rest). A report made
    before --grid-phases was made with one phase, the only one there was."""
    if isinstance(report.get("settings"), dict):
        return {"grid_phases": 1, **report["settings"]}
    found = {key: report[key] for key in ("threshold", "tta", "brain_model", "brain_model_sha256") if key in report}
    found["grid_phases"] = 1
    names, digests = report.get("model"), report.get("model_sha256")
    if isinstance(names, list) and isinstance(digests, list) and len(names) == len(digests):
        pairs = sorted(zip(digests, names))
        found.update(model=[name for _, name in pairs], model_sha256=[digest for digest, _ in pairs])
    if "location" in report:
        location = report["location"] if isinstance(report["location"], dict) else {}
        found.update(ventricle_model=location.get("ventricle_model"),
                     ventricle_model_sha256=location.get("ventricle_model_sha256"))
    return found


def _shown(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        return ", ".join(map(str, value)) or "none"
    return f"{value:g}" if isinstance(value, float) else str(value)


def settings_differences(earlier: dict, wanted: dict, options: dict = RESULT_SETTINGS) -> list[str]:
    """The result settings in which an earlier report's `settings` and `wanted` (planned_settings) differ,
    each as "OPTION (THEN then, NOW now)"; `options`: which settings, by the option that sets them (`deepwml
    change` compares its own). A setting the earlier report lacks is not compared, nor the precision when
    `wanted` leaves it to the machine (auto)."""
    found = []
    for key, option in options.items():
        if key not in earlier or (key == "precision" and wanted[key] is None):
            continue
        then, now = earlier[key], wanted[key]
        if isinstance(now, float) and isinstance(then, (int, float)) and not isinstance(then, bool):
            same = abs(then - now) <= 1e-9 * max(1.0, abs(now))
        else:
            same = then == now
        if same:
            continue
        if key.endswith("_sha256"):  # the models by name; the same name with other weights says so
            then, now = earlier.get(key[:-7]), wanted.get(key[:-7])
            if then == now:
                then, now = f"{_shown(then)} (other weights)", _shown(now)
        found.append(f"{option} ({_shown(then)} then, {_shown(now)} now)")
    return found


def brain_at_fov_edge(brain_stack: np.ndarray, frame: io.SliceFrame, counts: np.ndarray) -> dict:
    """Where the brain mask (`brain_stack`, an axial stack, 0/1; `counts`: its voxels on each slice) says the scan
    does not cover the whole brain: `slices_at_edge`, for each side of the field of view, the axial slices on which
    the brain reaches it (FOV_EDGE_BAND_MM, FOV_EDGE_CONTACT_MM); `top_slice_share` and `bottom_slice_share`, the
    brain on the highest and the lowest slice as a share of its largest cross-section; `cut`, the sides and ends
    (`top`, `bottom`) where the brain goes on beyond the scan (FOV_END_SHARE), in that order. The edges are read
    from a few rows and columns of the mask: nothing beside what the run computed."""
    rows = max(1, math.ceil(FOV_EDGE_BAND_MM / frame.row_spacing_mm - 1e-9))
    cols = max(1, math.ceil(FOV_EDGE_BAND_MM / frame.col_spacing_mm - 1e-9))
    bands = (brain_stack[:, :, :cols].any(axis=2), brain_stack[:, :, -cols:].any(axis=2),  # along a column: rows
             brain_stack[:, :rows, :].any(axis=1), brain_stack[:, -rows:, :].any(axis=1))
    along = (frame.row_spacing_mm, frame.row_spacing_mm, frame.col_spacing_mm, frame.col_spacing_mm)
    slices = {side: int(np.count_nonzero(band.sum(axis=1) * mm >= FOV_EDGE_CONTACT_MM))
              for side, band, mm in zip(FOV_SIDES, bands, along)}
    largest = max(1, int(counts.max(initial=0)))
    top, bottom = (counts[-1], counts[0]) if frame.inferior_first else (counts[0], counts[-1])
    shares = {"top": round(float(top) / largest, 3), "bottom": round(float(bottom) / largest, 3)}
    return {"slices_at_edge": slices, "top_slice_share": shares["top"], "bottom_slice_share": shares["bottom"],
            "cut": [side for side in FOV_SIDES if slices[side]] + [end for end in shares if shares[end] >= FOV_END_SHARE]}


def fov_edge_warning(found: dict, frame: io.SliceFrame) -> str | None:
    """The report's warning for `brain_at_fov_edge`'s `found` (None when it found the whole brain) on the axial
    stack of `frame`: which sides cut the brain, on how many slices, and which end slice still holds much of it, by
    its index in the file."""
    if not found["cut"]:
        return None
    edges = [f"the {side} edge on {found['slices_at_edge'][side]} slice(s)" for side in FOV_SIDES
             if side in found["cut"]]
    said = [f"the brain reaches {' and '.join(edges)} of the field of view"] if edges else []
    for end, extent in (("top", "the top of the brain (vertex)"), ("bottom", "the bottom of the brain")):
        if end in found["cut"]:
            index = frame.n_slices - 1 if (end == "top") == frame.inferior_first else 0
            said.append(f"the brain is still large on the {'highest' if end == 'top' else 'lowest'} slice (index "
                        f"{index}: {found[end + '_slice_share']:.0%} of its largest cross-section), so the slab misses "
                        f"{extent}")
    return (f"the scan does not cover the whole brain: {'; '.join(said)}; lesions beyond the scan are not counted, and "
            "the lesion volume is that of the part scanned (compare lesion loads only between scans that cover the "
            "same brain)")


def lesion_location(mask, frame, ventricle_map: np.ndarray, brain: np.ndarray | None, ventricle_model) -> tuple:
    """The periventricular/deep split of `mask`'s lesions (on the grid `frame` describes), as `segment_image` and
    `deepwml export` (`mask_location`) make it: the lateral ventricles from the ventricle network's map
    (`predict_maps`', thresholded or not) inside `brain` (bool stack, None: no brain mask), then `location.locate`.
    Returns (the report's `location` entry, naming the ventricle model; the distances at the mask's voxels in the
    order of its own voxels, as `report.lesion_report` reads them, None when the split is not made; the ventricles,
    a bool stack)."""
    from .location import ventricle_mask

    ventricles = ventricle_mask(ventricle_map, brain, ventricle_model.threshold)
    location, distance = _locate_lesions(mask, frame, ventricles, ventricle_model)
    return location, distance, ventricles


def _locate_lesions(mask, frame, ventricles: np.ndarray, ventricle_model) -> tuple:
    """`location.locate` of `mask`'s lesions against the ventricles (a bool stack on `frame`'s grid): the report's
    `location` entry, naming the ventricle model, and the distances at the mask's voxels."""
    from .location import locate

    spacing = (frame.slice_thickness_mm, frame.row_spacing_mm, frame.col_spacing_mm)
    # the distances at the lesion voxels only; a map of the whole volume was 1.7 GB at 1024 x 1024 x 400, 3.4 GB
    # while ITK made it
    location, distance = locate(io.axial_positions(mask, frame), ventricles, spacing)
    location.update(ventricle_model=ventricle_model.name, ventricle_model_sha256=ventricle_model.digest)
    return location, distance


def location_inputs(image, ventricle_model="default", brain_model="default", device: str = "auto",
                    backend: str = "auto", precision: str = "auto", brain_gate: bool = True,
                    progress: Callable[[float, str], None] | None = None,
                    cancel: Callable[[], bool] | None = None) -> dict | None:
    """What `mask_location`'s split takes from the scan alone: the ventricle and brain networks' work (seconds), none
    of which depends on the mask, so that a caller measuring several masks of one scan (the Slicer module's statistics
    of a segmentation edited between updates) runs the networks once. Arguments as `mask_location` takes them. None
    without a ventricle model. Else {"frame": `image`'s axial frame, "ventricles": the lateral ventricles measured
    from (a bool axial stack: read it, do not write it), "ventricle_model": the loaded model, "brain_model",
    "brain_model_sha256", "intracranial_ml", "device", "runner"}. `progress(fraction, message)` and `cancel()` as
    `segment_image` takes them (the Slicer module runs the networks as a job the panel shows and can cancel:
    `Cancelled` is raised)."""
    from .inference import predict_maps, resolve_device
    from .location import ventricle_mask
    from .postprocessing import BRAIN_THRESHOLD

    ventricle_model = load_ventricle_model(ventricle_model)
    if ventricle_model is None:
        return None
    brain_model = load_brain_model(brain_model)
    dev, facts = resolve_device(device), {}
    _, brain, ventricle_map, frame = predict_maps(
        image, [], brain_model, dev, backend=backend, facts=facts, precision=precision, progress=progress, cancel=cancel,
        ventricle_model=ventricle_model, brain_threshold=BRAIN_THRESHOLD, ventricle_threshold=ventricle_model.threshold)
    gate = None if brain is None or not brain_gate else brain > 0  # as segment_image keeps them
    ventricles = ventricle_mask(ventricle_map, gate, ventricle_model.threshold)
    del ventricle_map, gate
    intracranial = None
    if brain is not None:  # counted as segment_image counts it
        counts = sum(np.count_nonzero(plane) for plane in brain)
        intracranial = round(float(counts) * float(np.prod(frame.spacing)) / 1000, 3)
    return {"frame": frame, "ventricles": ventricles, "ventricle_model": ventricle_model,
            "brain_model": None if brain_model is None else brain_model.name,
            "brain_model_sha256": None if brain_model is None else brain_model.digest,
            "intracranial_ml": intracranial, "device": str(dev), "runner": facts.get("runner")}


def mask_location(image, mask, ventricle_model="default", brain_model="default", device: str = "auto",
                  backend: str = "auto", precision: str = "auto", brain_gate: bool = True,
                  inputs: dict | None = None) -> dict | None:
    """The periventricular/deep split of a mask given on `image`'s grid (`deepwml export`: a mask DeepWML did not
    just compute), made as `segment_image` makes it for its own mask (`lesion_location`): the ventricle and brain
    networks (`ventricle_model`, `brain_model`: as segment_image takes them; the WMH networks do not run) on
    `image`, the ventricles kept inside the brain mask as segment's default keeps them (`brain_gate` False: not,
    as `deepwml segment --no-brain-mask` does not; the brain network still runs for `intracranial_ml`). `inputs`:
    `location_inputs` of this very image with these arguments, made earlier (the networks do not run again; the
    models and `image` are then not read). None without a ventricle model ("default" and the model registry marks
    none). Else {"location": the report's entry, "distance": at the mask's voxels (`lesion_report`'s
    `ventricle_distance`; None when the split is not made), "ventricles": the lateral ventricles measured from, a
    0/1 uint8 image on `image`'s grid (what segment's `SegmentationResult.ventricles` holds, which its QC picture
    outlines), "brain_model", "brain_model_sha256", "intracranial_ml" (None without a brain model), "device" and
    "runner" (how the networks ran, as segment's report records them), "warnings": what segment's report warns of
    the split (not made; too little ventricle for a whole brain)}."""
    from .location import small_ventricles_warning

    given = inputs is not None
    if not given:
        inputs = location_inputs(image, ventricle_model, brain_model, device, backend, precision, brain_gate)
        if inputs is None:
            return None
    frame, ventricles = inputs["frame"], inputs["ventricles"]
    location, distance = _locate_lesions(mask, frame, ventricles, inputs["ventricle_model"])
    # as segment_image puts them; the stack given up only where it was made here (`inputs` given are read again)
    ventricle_image = io.from_axial_stack(ventricles.view(np.uint8), frame, reuse=not given)
    said = [location["why"]] if not location["judged"] else []
    small = small_ventricles_warning(location, inputs["intracranial_ml"])
    if small:
        said.append(small)
    return {"location": location, "distance": distance, "ventricles": ventricle_image,
            **{key: inputs[key] for key in ("brain_model", "brain_model_sha256", "intracranial_ml", "device", "runner")},
            "warnings": said}


@dataclass
class SegmentationResult:
    """segment_image's outputs, each on the input's exact grid (size, origin, spacing, direction), of the input's kind:
    SimpleITK images, or `volume.Volume`s for a Volume input (io.read_image(path, light=True); `.to_sitk()` makes
    one a SimpleITK image). `report`: what CASE_report.json holds of the case (volumes in ml, positions in LPS mm)."""

    mask: sitk.Image  # uint8 0/1 on the input grid
    probabilities: sitk.Image  # float32 0–1 on the input grid
    report: dict
    brain: sitk.Image | None = None  # uint8 0/1 intracranial mask on the input grid, with a brain model
    ventricles: sitk.Image | None = None  # uint8 0/1 lateral ventricles on the input grid, with a ventricle model


@_explains_running_out_of_memory
def segment_image(image: sitk.Image, models: Sequence | None = None, device: str = "auto",
                  threshold: float | None = None, tta: bool = False, min_lesion_mm3: float | None = None,
                  exclude_edge_fraction: float = 0.0, batch_size: int | None = None,
                  progress: Callable[[float, str], None] | None = None, cancel: Callable[[], bool] | None = None,
                  backend: str = "auto", brain_model="default", precision: str = "auto",
                  ventricle_model="default", checked: bool = False, grid_phases: int = 1,
                  brain_gate: bool = True) -> SegmentationResult:
    """Segment WMH in a 3D FLAIR image; the mask and probabilities share the input's grid exactly.

    `brain_model` ("default" or True: the shipped brain-mask network, as `deepwml segment` runs it; a model file
    or loaded model) gates the result: lesion components mostly outside its intracranial mask are dropped. To keep
    the marks wherever they lie, as `deepwml segment --no-brain-mask` does, pass `brain_gate=False`: the brain mask
    still serves the checks (FLAIR contrast, coverage of the brain), the intracranial volume and `.brain`.
    `brain_model=None` (or False) runs no brain network at all: no gating, and none of those checks (the report's
    `brain_mask`, `contrast` and `brain_at_fov_edge` are None, it has no `intracranial_ml`, `.brain` is None).
    `ventricle_model` (the same choices) finds the lateral ventricles, and the report splits the lesion
    volume into periventricular and deep (location.py). `models`: loaded models or model files (None:
    the shipped default). `progress(fraction, message)` rises to 1.0 when all of it is done. `checked`: the
    image comes from io.read_image (or io.check_volume), which refused what cannot be segmented; it is not
    checked again (0.03-0.1 s a scan, a tenth of what a small scan costs beside its networks). `grid_phases`
    (1 or 4, inference.GRID_PHASES): the lesion probabilities averaged over the network grid moved by those
    sub-pixel phases (--grid-phases).
    """
    from .adapt import adaptation_summary
    from .contrast import (bright_line, bright_line_warning, clipped_top, clipped_warning, contrast_warnings,
                           flair_contrast)
    from .inference import check_batch_size, predict_maps, progress_part, resolve_device
    from .postprocessing import BRAIN_THRESHOLD, DEFAULT_MIN_LESION_MM3, postprocess
    from .report import lesion_report
    from .volume import voxels

    start = time.perf_counter()
    number = (int, float, np.integer, np.floating)
    if isinstance(exclude_edge_fraction, bool) or not isinstance(exclude_edge_fraction, number) \
            or not 0 <= exclude_edge_fraction < 0.5:
        raise DeepWMLError(f"exclude_edge_fraction must be in [0, 0.5), got {exclude_edge_fraction!r}")
    if min_lesion_mm3 is not None and (isinstance(min_lesion_mm3, bool) or not isinstance(min_lesion_mm3, number)
                                       or not 0 <= min_lesion_mm3 < float("inf")):
        raise DeepWMLError(f"min_lesion_mm3 must be a number of mm³ >= 0 (or None for the default), got {min_lesion_mm3!r}")
    check_batch_size(batch_size)
    if not checked:
        io.check_volume(image)
    models = loaded_models(models)
    brain_model = load_brain_model(brain_model)
    ventricle_model = load_ventricle_model(ventricle_model)
    if threshold is None:
        threshold = float(np.mean([m.threshold for m in models]))
    if not 0 < threshold < 1:
        raise DeepWMLError(f"threshold must be between 0 and 1 (exclusive), got {threshold}")
    dev = resolve_device(device)
    facts: dict = {}
    tell = progress or (lambda fraction, message: None)
    # Only the brain and ventricle masks are needed: they come thresholded, a byte a voxel, never as the networks'
    # float32 maps (1.07 GB more each at the networks' end of a 1024 x 1024 x 400 scan); postprocess and
    # ventricle_mask read them as the maps, inside where >= their thresholds (1 is, 0 is not). The lesion map comes
    # as its image on the input grid, filled as the networks run: made from a whole map in numpy it was held twice
    # (SimpleITK copies numpy's voxels), 4 bytes a voxel more at the peak of a SimpleITK scan's post-processing.
    prob_image, brain_stack, ventricle_map, frame = predict_maps(
        image, models, brain_model, dev, batch_size, tta, progress_part(progress, 0.0, NETWORK_SHARE), cancel, backend,
        facts, precision, ventricle_model, grid_phases, brain_threshold=BRAIN_THRESHOLD,
        ventricle_threshold=None if ventricle_model is None else ventricle_model.threshold, lesion_image=True)
    tell(POSTPROCESSING_AT, "post-processing: lesion mask")
    voxel_mm3 = float(np.prod(frame.spacing))
    min_mm3 = DEFAULT_MIN_LESION_MM3 if min_lesion_mm3 is None else min_lesion_mm3
    gate = brain_stack if brain_gate else None
    mask_stack, removed = postprocess(io.axial_view(prob_image, frame), threshold, voxel_mm3, min_mm3,
                                      exclude_edge_fraction, gate, return_removed=True)
    # The mask is put on the input grid in its own buffer (a NIfTI file's flipped rows and columns were a copy, held
    # twice from here on); it is read as the axial stack through a view of its image.
    mask = io.from_axial_stack(mask_stack, frame, reuse=True)
    mask_stack = io.axial_view(mask, frame)
    brain_image = ventricle_image = None
    location = distance = None
    if ventricle_model is not None:
        tell(LOCATION_AT, "periventricular/deep split")
        # kept inside the brain mask only where it gates the marks: with --no-brain-mask the split stays what it was
        # when no brain mask ran with that option
        location, distance, ventricles = lesion_location(mask, frame, ventricle_map, None if gate is None else gate > 0,
                                                         ventricle_model)
        del ventricle_map
        # given up, put on the input grid in its own buffer
        ventricle_image = io.from_axial_stack(ventricles.view(np.uint8), frame, reuse=True)
    tell(REPORT_AT, "lesion report")
    report = lesion_report(mask, voxels(prob_image), distance)
    report["location"] = location
    plane = io.acquisition_plane(image)
    slice_mm = float(image.GetSpacing()[io.acquisition_axis(image)])
    warnings = [] if plane in ("axial", io.ISOTROPIC) or slice_mm < THICK_NON_AXIAL_MM else [
        f"{plane} acquisition with {slice_mm:g} mm slices: DeepWML segmented the axial planes of the volume, "
        "across the thick slices; accuracy was only validated on axial acquisitions (expect lesions to be under-called)"
    ]
    if location is not None and not location["judged"]:
        warnings.append(location["why"])
    line = bright_line(io.axial_view(image, frame))  # with or without a brain mask: the line runs through the air too
    if line:
        warnings.append(bright_line_warning(line, frame))
    clipped = clipped_top(io.axial_view(image, frame), facts.get("head_voxels", 0))  # with or without a brain mask
    if clipped:
        warnings.append(clipped_warning(clipped))
    if facts.get("slices_below_head"):
        from .preprocessing import HEAD_HEIGHT_MM

        warnings.append(f"the scan reaches below the head: {facts['slices_below_head']} axial slices, more than "
                        f"{HEAD_HEIGHT_MM:g} mm below the top of the head (neck, shoulders), were not segmented and "
                        "were left out of the intensity normalisation")
    if exclude_edge_fraction:  # how many slices the fraction cleared: none, on few slices
        from .postprocessing import edge_slice_count

        report["edge_slices_cleared"] = edge_slice_count(mask_stack.shape[0], exclude_edge_fraction)
        if not report["edge_slices_cleared"]:
            warnings.append(f"--exclude-edge-slices {exclude_edge_fraction:g} cleared no slice: it clears "
                            f"floor({exclude_edge_fraction:g} x {mask_stack.shape[0]}) = 0 of the "
                            f"{mask_stack.shape[0]} axial slices at each end (at least "
                            f"{math.ceil(1 / exclude_edge_fraction - 1e-9)} slices are needed to clear one)")
    if brain_stack is not None:
        brain_image = io.from_axial_stack(brain_stack, frame, reuse=True)  # its buffer, as the mask's
        brain_stack = io.axial_view(brain_image, frame)
        # slice by slice: count_nonzero along an axis takes 40 times as long (1.5 s at 1024 x 1024 x 400)
        counts = np.fromiter((np.count_nonzero(plane) for plane in brain_stack), np.int64, brain_stack.shape[0])
        intracranial = int(counts.sum())
        fov = brain_at_fov_edge(brain_stack, frame, counts)
        report["brain_at_fov_edge"] = fov
        cut = fov_edge_warning(fov, frame)
        if cut:
            warnings.append(cut)
        report.update({
            "brain_model": brain_model.name,
            "brain_model_sha256": brain_model.digest,
            "brain_mask": brain_mask_use(brain_model, brain_gate),
            "intracranial_ml": round(float(intracranial) * voxel_mm3 / 1000, 3),
            "outside_brain_removed_ml": round(removed * voxel_mm3 / 1000, 4),
        })
        from .location import small_ventricles_warning

        small = small_ventricles_warning(location, report["intracranial_ml"])
        if small:
            warnings.append(small)
        coverage = intracranial / max(1, facts.get("head_voxels", 0))
        if not BRAIN_COVERAGE[0] <= coverage <= BRAIN_COVERAGE[1]:
            warnings.append(
                f"the brain mask covers {coverage:.0%} of the head mask (84-118 % on the scans it was checked on): "
                "it may have failed on this scan (it does on T2-weighted scans: check that the input is a FLAIR), "
                + (f"and {report['outside_brain_removed_ml']:.2f} ml marked outside it were dropped; compare with "
                   "--no-brain-mask" if brain_gate else "and with --no-brain-mask it was not applied to the marks"))
        check = flair_contrast(io.axial_view(image), brain_stack.view(bool), mask_stack.view(bool),  # 0/1: no copies
                               (frame.slice_thickness_mm, frame.row_spacing_mm, frame.col_spacing_mm),
                               progress_part(progress, FLAIR_CHECK_AT, 0.99))
        report["contrast"] = check
        warnings += contrast_warnings(check)
        # a CT in a brain window: its clipped skull is the CT warning's; an inverted MRI: its air at the top value is
        # no clipping, the inverted warning says why
        if clipped and check.get("looks_like") in ("CT", "inverted"):
            warnings.remove(clipped_warning(clipped))
        load = report["volume_ml"] / max(report["intracranial_ml"], 1e-9)
        # a brain mask of nothing keeps marks only with --no-brain-mask: a share of it means nothing, and the
        # coverage warning above says the mask failed
        if intracranial and load > IMPLAUSIBLE_LOAD:
            warnings.append(
                f"{report['volume_ml']:.1f} ml marked, {load:.1%} of the intracranial volume (up to 3.2 % on the real "
                "FLAIRs it was checked on; a 50 ml lesion load is about 4.5 %): check that the input is a FLAIR (on T2 "
                "the bright CSF is marked) and look at the result (in Slicer, or the picture of deepwml segment --qc)")
    else:
        report.update({"brain_model": None, "brain_model_sha256": None, "brain_mask": None, "contrast": None,
                       "brain_at_fov_edge": None})
    report.update({
        "acquisition_plane": plane,
        "warnings": warnings,
        "model": [m.name for m in models],
        "model_sha256": [m.digest for m in models],  # first 24 hex digits: which exact weights made this mask
        "model_adapted": [adaptation_summary(m.provenance) for m in models],  # how `deepwml adapt` made each
        "deepwml_version": __version__,
        "threshold": threshold,
        "tta": bool(tta),
        "device": str(dev),
        "runner": facts.get("runner"),
        "seconds": round(time.perf_counter() - start, 3),
        "settings": result_settings(models, threshold, tta, min_lesion_mm3, exclude_edge_fraction, brain_model,
                                    ventricle_model, computed_precision(facts.get("runner")), grid_phases, brain_gate),
    })
    tell(1.0, "segmented")
    return SegmentationResult(mask, prob_image, report, brain_image, ventricle_image)


# ---------------------------------------------------------------------------------------------
# Batch of cases (the CLI)


def expand_inputs(inputs: Sequence[str]) -> list[tuple]:
    """(case name, path, DICOM study or None) for each image file, DICOM folder, or image file inside a
    plain folder. A folder whose subfolders hold DICOM files is searched whole (io.dicom_catalogue: a PACS
    export's patient / study / series folders, any depth): each study below it is a case, its FLAIR picked
    among its series (a study without one is skipped). A folder that cannot be read is a failing case."""
    cases = []
    for raw in inputs:
        path = Path(raw)
        try:
            export = path.is_dir() and io.has_dicom_below(path)
            if path.is_dir() and (export or not io.is_dicom_folder(path)):
                images = _image_files(path)
                studies, problems = io.dicom_catalogue(path) if export else ([], [])
                written: dict = {}  # an earlier run's outline series or SEG alone (its OUTDIR given): no study
                studies = [study for study in studies if not _earlier_outputs_only(study, written)]
                found = images + [(study.name, _as_given(path, study.folder), study) for study in studies]
                if not found and not problems:
                    cases.append((io.case_name(path), path, None))  # reported as an error for that input
                cases.extend(sorted(found, key=lambda c: (str(c[1]), c[0])))
                cases.extend((f"{io.case_name(path)} (unreadable folder)",
                               _as_given(path, Path(problem.split(" cannot be read")[0])), DeepWMLError(problem))
                              for problem in problems)
            else:  # a file, or a DICOM series folder; image files beside the series are cases of their own
                cases.append((io.case_name(path), path, None))
                if path.is_dir():
                    cases.extend(sorted(_image_files(path), key=lambda c: (str(c[1]), c[0])))
        except OSError as exc:
            cases.append((io.case_name(path), path, DeepWMLError(f"{path} cannot be read ({exc.strerror})")))
        except DeepWMLError as exc:  # e.g. a name that is not UTF-8 text
            cases.append((io.case_name(path), path, exc))
    return cases


def _earlier_outputs_only(study: io.DicomStudy, written: dict) -> bool:
    """Whether every file of a study io.dicom_catalogue found is an output an earlier run's report (or a killed
    run's journal) beside it lists: its outline series (`CASE_outline_dicom/`, listed in the folder above the
    images) or its SEG (`CASE_wmh_seg.dcm`). An OUTDIR given back as INPUT is then that run's outputs, not a study
    without a FLAIR. `written`: the listed names of each folder, filled as folders are looked at."""
    def listed(folder: Path) -> set:
        if folder not in written:
            written[folder] = _outputs_of_earlier_runs(folder)
        return written[folder]

    files = [Path(f) for series in study.series for f in series.files]
    return bool(files) and all(f.name in listed(f.parent) or f.parent.name in listed(f.parent.parent) for f in files)


def _as_given(given: Path, folder: Path) -> Path:
    """A folder io.dicom_catalogue found below `given` (it answers absolute paths) as a path below `given` as
    it was typed, as an image file in a folder is: summary.csv's and the report's `input` then name every
    case the same way, relative to where the run was started when the input was typed so (the report's
    `input_absolute` holds the absolute path)."""
    try:
        return given / folder.relative_to(os.path.abspath(given))
    except ValueError:
        return folder


def _once_each(cases: list[tuple]) -> list[tuple]:
    """The cases with the same scan given twice (or a folder and a file in it) kept once (studies of an
    export may share a folder: the case name tells them apart, upper and lower case alike as on macOS)."""
    unique, seen = [], set()
    for case in cases:
        try:
            key = (case[1].resolve(), case[0].casefold())
        except (OSError, RuntimeError):
            key = (case[1], case[0].casefold())
        if key not in seen:
            seen.add(key)
            unique.append(case)
    return unique


def check_case_names(cases: Sequence[tuple], shown: int = 4) -> None:
    """A DeepWMLError naming every group of cases (expand_inputs) that share a name, or names alike but for
    upper/lower case (one file name on macOS and Windows): their outputs would fall on each other. Checked
    before anything is segmented, so that a run is not refused part way, after the first of them was done.
    A folder that could not be read is no case with outputs. `shown`: the clashes and inputs listed of each."""
    groups: dict = {}
    for case, path, study in cases:
        if not isinstance(study, DeepWMLError):
            groups.setdefault(case.casefold(), []).append((case, path))
    clashes = [group for group in groups.values() if len(group) > 1]
    if not clashes:
        return
    parts = []
    for group in clashes[:shown]:
        names = list(dict.fromkeys(case for case, _ in group))
        inputs = ", ".join(str(path) for _, path in group[:shown]) + (", ..." if len(group) > shown else "")
        if len(names) == 1:
            parts.append(f"{len(group)} inputs are {'both' if len(group) == 2 else 'all'} named {names[0]!r} ({inputs})")
        else:
            parts.append(f"{' and '.join(map(repr, names))} ({inputs}) are alike but for upper/lower case (one file "
                         "name on macOS and Windows)")
    more = f"; and {len(clashes) - shown} more names" if len(clashes) > shown else ""
    raise DeepWMLError(f"{'; '.join(parts)}{more}: their outputs would fall on each other, so nothing was segmented; "
                       "rename the files (or folders) apart, or segment them into separate output folders (-o)")


def case_names_apart(cases: Sequence[tuple], named=frozenset()) -> list[tuple]:
    """The cases (expand_inputs) with names that clash, upper and lower case alike (one file on macOS and
    Windows), told apart by the names of the folders above them where their paths part, the nearest next to
    the name, joined with "_" as a study's folders are: patient07/flair.nii.gz and patient19/flair.nii.gz are `patient07_flair` and
    `patient19_flair`; sub-01/anat/FLAIR.nii.gz and sub-02/anat/FLAIR.nii.gz `sub-01_FLAIR` and
    `sub-02_FLAIR` (a folder all of them share says nothing). Only a clash is renamed: a name of its own
    is kept, so that outputs made before keep their names, and a rerun of the same inputs names them the
    same (its cases done are skipped). Then `check_case_names`: scans of one name that no folder tells
    apart (case01.nii.gz and case01.nrrd side by side; the new name of another input) refuse the run.
    A Slicer segmentation skipped (`found_segmentation`: found in a folder, or named beside other inputs; `named`
    the paths typed) and a folder that could not be read write nothing: their names are kept and clash with nothing."""
    writing = [not isinstance(study, DeepWMLError) and not found_segmentation(path, named, len(cases) == 1)
               for _, path, study in cases]
    groups: dict = {}
    for index, (case, _, _) in enumerate(cases):
        if writing[index]:
            groups.setdefault(case.casefold(), []).append(index)
    renamed = list(cases)
    for group in groups.values():
        if len(group) > 1:
            for index, name in zip(group, _named_by_folders([cases[i] for i in group])):
                renamed[index] = (name, *cases[index][1:])
    check_case_names([case for case, writes in zip(renamed, writing) if writes])
    return renamed


def _named_by_folders(group: list[tuple]) -> list[str]:
    """The names of cases of one name, each after the folders above it that tell it from the others
    (case_names_apart), nearest last; a case no folder tells from another keeps its name. A name is kept short
    enough for its outputs' file names."""
    chains = [_folders_above(path, case if isinstance(study, io.DicomStudy) else None) for case, path, study in group]
    names = []
    for (case, _, _), folders in zip(group, _telling_apart(chains)):
        prefix = "_".join(folders)
        room = CASE_NAME_BYTES - len(os.fsencode(case)) - 1  # the nearest folders kept when there is too little
        if len(os.fsencode(prefix)) > room:
            while prefix and (len(os.fsencode(prefix)) > room or not prefix[0].isalnum()):
                prefix = prefix[1:]  # what is left at the cut: no hidden name ('.'), nor one read as an option ('-')
        names.append(f"{prefix}_{case}" if prefix else case)
    return names


def _telling_apart(chains: list[list[str]]) -> list[list[str]]:
    """For inputs of one name, given the names of the folders above each (nearest first), the folders that tell each
    from the others, outermost first: counted from the file system's root, from the first level at which their
    folders differ (upper and lower case alike) down to the file, leaving out a level that every one of them has
    and shares (BIDS' `anat`). So data/p07/flair and data/p19/visit2/flair are told apart as p07 and p19_visit2
    (the patient kept, though their depths differ), sub-01/anat and sub-02/anat as sub-01 and sub-02. Inputs that
    no folder tells apart get the same folders (`check_case_names` then refuses them)."""
    rooted = [list(reversed(chain)) for chain in chains]
    depth = max(map(len, rooted))
    levels = [[chain[level].casefold() if level < len(chain) else None for chain in rooted] for level in range(depth)]
    parting = next((level for level, names in enumerate(levels) if len(set(names)) > 1), depth)
    return [[chain[level] for level in range(parting, len(chain)) if len(set(levels[level])) > 1] for chain in rooted]


CASE_NAME_BYTES = 255 - len("_ventricles.nii.gz")  # the longest name of a case's outputs within a file name's 255


def _folders_above(path: Path, study: str | None = None) -> list[str]:
    """The names of the folders above an input, nearest first (as typed, made absolute; links not followed),
    up to the file system's root (named as io.case_name names a drive's root). For a study found in an export
    (`study` its name, the folders below the input joined with "_", io.dicom_catalogue), those above the input:
    two exports' PAT1/STU1 are told apart by the exports' folders."""
    names = []
    folder = Path(os.path.abspath(path))
    while True:
        names.append(folder.name or io.case_name(folder))
        if folder.parent == folder:
            break
        folder = folder.parent
    made_of = 1  # the input's own name
    if study is not None:
        for count in range(1, len(names) + 1):
            joined = "_".join(reversed(names[:count])).casefold()
            if study.casefold() == joined or study.casefold().startswith(joined + "_"):  # + a date when it was
                made_of = count  # needed to tell studies of one export apart
                if study.casefold() == joined:
                    break
    return names[made_of:]


def _image_files(folder: Path) -> list[tuple]:
    """(case name, path, None) for each image file in a folder, not those DeepWML wrote there for a case
    of an earlier run (OUTDIR may be the input folder itself)."""
    written = _outputs_of_earlier_runs(folder)
    # hidden files are none: a write cut short leaves `.NAME.xxxx.part.nii.gz`, macOS leaves `._NAME`; a
    # link whose target cannot be reached is a case (it fails, saying so) rather than left out unsaid
    return [(io.case_name(p), p, None) for p in folder.iterdir()
            if not p.name.startswith(".") and (p.is_file() or p.is_symlink() and not p.exists())
            and io.is_image_file(p) and p.name not in written]


def _outputs_of_earlier_runs(folder: Path) -> set[str]:
    """Names of the image outputs DeepWML wrote into `folder` for the cases whose report is there (the
    files its `outputs` lists; for a report of an older version without that list, a case's mask,
    probability map, .seg.nrrd... in any output format): a rerun with OUTDIR the input folder must not take
    them for new scans. Those the journal of a run stopped part way lists too (start_outputs: killed outright, no
    report lists them), and those of `deepwml change` (_change_outputs: its OUTDIR given as INPUT)."""
    names = set()
    for report in folder.glob("*_report.json"):
        case = report.name[:-len("_report.json")]
        listed = _listed_outputs(report)
        names.update(listed if listed is not None else (p.name for p in _possible_outputs(folder, case)))
    for report in folder.glob(f"*{CHANGE_REPORT_SUFFIX}"):
        names.update(_change_outputs(report))
    for journal in _journals(folder):
        listed = _listed_outputs(journal)
        names.update(listed or ())
    return names


# `deepwml change`'s report of a pair CASE: CASE_change.json (change.output_paths)
CHANGE_REPORT_SUFFIX = "_change.json"


def _change_outputs(report: Path) -> set[str]:
    """The names of the files a `deepwml change` report (CASE_change.json) says its run wrote beside it: its `outputs`
    and the outline series' folder it names; for a report of an older version without that list, every file change
    writes for the pair (change's possible outputs, in any output format, its outline and SEG included)."""
    listed = _listed_outputs(report)
    if listed is None:
        from .change import _possible_outputs as change_outputs

        return {p.name for p in change_outputs(report.parent, report.name[:-len(CHANGE_REPORT_SUFFIX)])}
    return {*listed, *_outline_named(report)}


def _earlier_output(path: Path) -> tuple[str, str] | None:
    """(the report's name, the scan it names) when `path` is an image output an earlier run's report beside it lists
    (a probability map, given as a scan from that run's OUTDIR; a registered baseline or change map of
    `deepwml change`), else None."""
    reports = [(report, "report.json", _listed_outputs) for report in path.parent.glob("*_report.json")]
    reports += [(report, CHANGE_REPORT_SUFFIX[1:], _change_outputs)
                for report in path.parent.glob(f"*{CHANGE_REPORT_SUFFIX}")]
    for report, suffix, listing in reports:  # only a case's own reports are read: outputs bear its name
        if path.name.startswith(report.name[:-len(suffix)]) and path.name in (listing(report) or ()):
            try:
                earlier = json.loads(report.read_text(encoding="utf-8"))
                made_from = earlier.get("input_absolute") or earlier.get("input") or " or ".join(
                    str(earlier[key]) for key in ("baseline", "followup") if earlier.get(key))  # a change report's
            except (OSError, ValueError, AttributeError):
                made_from = None
            return report.name, str(made_from or "the report's input")
    return None


def _subfolders_hint(folder: Path) -> str:
    """'; ...' where the folder's subfolders hold image files (a cohort kept as one folder a patient: patient07/flair.nii.gz),
    which a folder given as INPUT does not search (it might hold masks and outputs of every kind): how to give them."""
    try:
        holding = sorted(sub.name for sub in folder.iterdir()
                         if sub.is_dir() and not sub.name.startswith(".") and _image_files(sub))
    except OSError:  # a subfolder that cannot be read: the plain message
        return ""
    if not holding:
        return ""
    shown = ", ".join(holding[:3]) + (", ..." if len(holding) > 3 else "")
    return (f" (only its subfolders hold image files: {shown}); give the subfolders, e.g. "
            f"{Path(folder) / '*'}{os.sep}, each of their image files a case (label masks among them are skipped)")


def _only_outputs(folder: Path) -> str | None:
    """The error for a folder given as INPUT that holds image files, all of them an earlier run's outputs (its
    OUTDIR given for the scans), else None."""
    written = _outputs_of_earlier_runs(folder)
    if not written:
        return None
    cases = {report.name[:-len("_report.json")] for report in folder.glob("*_report.json")}
    changes = {report.name[:-len(CHANGE_REPORT_SUFFIX)] for report in folder.glob(f"*{CHANGE_REPORT_SUFFIX}")}
    scans = ("`baseline` and `followup` name its scans" if changes and not cases  # only `deepwml change`'s pairs
             else "`input` names its scan")
    cases |= changes
    stopped = set()  # those of a run stopped part way, which only its journal lists
    for journal in _journals(folder):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            named = json.loads(journal.read_text(encoding="utf-8")).get("case")
            if isinstance(named, str) and named not in cases:
                stopped.add(named)
    cases = sorted(cases | stopped)
    shown = ", ".join(cases[:3]) + (", ..." if len(cases) > 3 else "")
    return (f"{folder} holds only the outputs of an earlier DeepWML run ({len(cases)} case(s): {shown}"
            f"{f'; {len(stopped)} of a run stopped part way' if stopped else ''}), no scan; give the folder of the "
            f"FLAIRs (each report's {scans})")


def _listed_outputs(report: Path) -> list[str] | None:
    """The file names a case's report says its run wrote, or None (no list: an older version; unreadable)."""
    try:
        listed = json.loads(report.read_text(encoding="utf-8")).get("outputs")
    except (OSError, ValueError, AttributeError):
        return None
    return [name for name in listed if isinstance(name, str)] if isinstance(listed, list) else None


def _possible_outputs(out_dir: Path, case: str) -> list[Path]:
    """Every output a run could write for a case, in every output format (the report last)."""
    paths = {}
    for extension in io.OUTPUT_EXTENSIONS:
        paths.update({p: None for p in output_paths(out_dir, case, True, True, extension, True, True, True, True).values()})
    return sorted(paths, key=lambda p: p.name == f"{case}_report.json")


def _stale_outputs(out_dir: Path, case: str, paths: dict, protected=frozenset(), possible=None) -> list[Path]:
    """The outputs of an earlier run that remove_earlier_outputs removes (its rule), those there now."""
    listed = _listed_outputs(paths["report"]) if paths["report"].exists() else []
    if listed is not None:  # and its outline series, which a report of deepwml change names there alone, and what
        # the journal of a run stopped part way lists (killed outright: its outputs are listed nowhere else)
        listed = [*listed, *_outline_named(paths["report"]), *(journal_outputs(paths["report"]) or [])]
    kept = {p.name for p in paths.values()}
    return [stale for stale in (possible if possible is not None else _possible_outputs(out_dir, case))
            if os.path.lexists(stale) and stale.name not in kept and (listed is None or stale.name in listed)
            and not _holds_an_input(stale, protected)]


def remove_earlier_outputs(out_dir: Path, case: str, paths: dict, protected=frozenset(), possible=None) -> None:
    """--overwrite, before a case's new outputs (`paths`, output_paths') are written: the case's earlier report goes
    first (a run stopped part way leaves outputs without a report, which the next run refuses: never old and new
    mixed), then the outputs of the earlier run that this one will not write (other options, another
    --output-format), which would not match the new result and could be taken for it. Only files DeepWML wrote:
    those the earlier report lists as its `outputs`, and those the journal of a run stopped part way lists
    (start_outputs: a run killed outright, whose files no report lists); a report without that list (a version
    before it) or one that cannot be read, every name a run writes for the case; with neither a report nor a
    journal (none ever, or a version before journals), none: the files there may be the user's. Never a scan given
    to the run (`protected`: resolved paths) nor a folder holding one; of an outline series folder only its own
    images, known by their headers (dicom_outline.remove_outline_series: a user's images there are refused
    before any work, refuse_foreign_outlines); of a symbolic link the link alone, never what it leads to. Only
    names of `possible`, in OUTDIR: a listed name that is a path (`../x`, absolute) or another case's is never
    reached. `possible`: the outputs the command could have written (default: every one a segment run writes, in
    every output format); `deepwml export` and `deepwml change` pass their own. One rule for deepwml segment,
    export, change and the Slicer batch."""
    from .dicom_outline import remove_outline_series

    stale_outputs = _stale_outputs(out_dir, case, paths, protected, possible)
    paths["report"].unlink(missing_ok=True)
    for stale in stale_outputs:
        if stale.is_symlink():  # the link alone, never what it leads to (a file or a folder elsewhere)
            stale.unlink()
        elif stale.is_dir() and stale.name.endswith("_outline_dicom"):  # an outline series: its own images alone
            remove_outline_series(stale)
        elif stale.is_file():
            stale.unlink()


def refuse_foreign_outlines(out_dir: Path, case: str, paths: dict, overwrite: bool, protected=frozenset(),
                            possible=None) -> None:
    """Before any work, with --overwrite: an earlier run's outline series folder that remove_earlier_outputs would
    empty (one this run does not write; the one it writes is dicom_outline.check_outline_folder's) is refused when it
    holds images named as the series' (IM*.dcm) that are not DeepWML's by their headers
    (dicom_outline.refuse_foreign_images): a user's images, never deleted. Arguments as remove_earlier_outputs'."""
    if not overwrite:
        return
    from .dicom_outline import refuse_foreign_images

    for stale in _stale_outputs(out_dir, case, paths, protected, possible):
        if stale.name.endswith("_outline_dicom"):
            refuse_foreign_images(stale)  # a symbolic link: not looked into (its link alone is removed)


def _outline_named(report: Path) -> list[str]:
    """The folder of the outline series a report's `dicom_outline` entry names ([] if none)."""
    try:
        outline = json.loads(report.read_text(encoding="utf-8")).get("dicom_outline")
    except (OSError, ValueError, AttributeError):
        return []
    folder = outline.get("folder") if isinstance(outline, dict) else None
    return [folder] if isinstance(folder, str) else []


# A case's journal (start_outputs): written before the first output of a run, it lists every file the run may
# write or remove; the finished report replaces it. Hidden, beside the report, never taken for a temporary file.
JOURNAL_SUFFIX = io.JOURNAL_SUFFIX


def journal_path(report: Path) -> Path:
    """The journal of the run writing the case whose report is `report` (CASE_report.json, CASE_change.json):
    `.CASE_report.deepwml-journal` beside it (a long name cut, a digest of the whole added)."""
    import hashlib

    stem = report.name[:-len(".json")] if report.name.endswith(".json") else report.name
    if len(os.fsencode(stem)) > 180:  # room for the dot, the suffix and the digest within 255 bytes
        stem = f"{io.shortened(stem, 160)}~{hashlib.sha256(os.fsencode(stem)).hexdigest()[:16]}"
    return report.parent / f".{stem}{JOURNAL_SUFFIX}"


def _journals(folder: Path) -> list[Path]:
    """The case journals in `folder` (io.is_journal: not the temporary file one is written under)."""
    return [journal for journal in folder.glob(f".*{JOURNAL_SUFFIX}") if io.is_journal(journal.name)]


def _read_journal(report: Path) -> dict | None:
    """The journal of `report`'s case (journal_path), or None: none, or not one of this case's (unreadable: {} so
    that it is not taken for none)."""
    journal = journal_path(report)
    if not os.path.lexists(journal):
        return None
    try:
        kept = json.loads(journal.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(kept, dict):
        return {}
    return kept if kept.get("report") in (None, report.name) else None


def _finished(report: Path, journal: dict) -> bool:
    """Whether the journal's run finished: the report there is the one it wrote as it ended (finish_report)."""
    import hashlib

    digest = journal.get("report_sha256")
    try:
        return isinstance(digest, str) and hashlib.sha256(report.read_bytes()).hexdigest() == digest
    except OSError:
        return False


def journal_outputs(report: Path) -> list[str] | None:
    """The names a run stopped part way (killed outright: kill -9, a power cut) listed in its journal as the files it
    was writing or removing, or None: no journal, or its run finished (its report written; the journal left by a kill
    just after is removed here). A journal that cannot be read (edited by hand): [], the case still taken as stopped
    (stopped_outputs), its names unknown."""
    journal = _read_journal(report)
    if journal is None:
        return None
    if journal and _finished(report, journal):
        with contextlib.suppress(OSError):
            journal_path(report).unlink()
        return None
    listed = journal.get("outputs")
    return [name for name in listed if isinstance(name, str) and "/" not in name and "\\" not in name
            and name not in ("", ".", "..")] if isinstance(listed, list) else []


def stopped_outputs(report: Path) -> list[str] | None:
    """The files a run of the case stopped part way left (journal_outputs: those of its list there now), or None when
    there is none: no journal, its run finished, or nothing it listed is there (the journal, stale, is removed). Called
    with the case's lock held."""
    listed = journal_outputs(report)
    if listed is None:
        return None
    there = [name for name in listed if os.path.lexists(report.parent / name)]
    if not there and _read_journal(report) != {}:  # killed before it wrote anything: nothing to say
        with contextlib.suppress(OSError):
            journal_path(report).unlink()
        return None
    return there


def stopped_message(report: Path, there: list[str], what: str = "case") -> str:
    """The refusal of a case (or pair) whose earlier run was stopped part way, without --overwrite."""
    shown = ", ".join(there[:6]) + (", ..." if len(there) > 6 else "")
    return (f"an earlier run left an incomplete set of outputs ({shown or 'its journal cannot be read'}; no finished "
            f"{report.name}): it was stopped part way (killed, or the computer stopped) while writing them, as its "
            f"journal {journal_path(report).name} says; rerun with --overwrite to redo the case (the files that run "
            "listed are removed first)").replace("redo the case", f"redo the {what}")


def refuse_stopped(report: Path, overwrite: bool, what: str = "case") -> None:
    """Without --overwrite, a case (or pair) whose earlier run was stopped part way is refused (stopped_message): its
    files are not a finished result, nor the user's."""
    if not overwrite:
        there = stopped_outputs(report)
        if there is not None:
            raise DeepWMLError(stopped_message(report, there, what))


def start_outputs(out_dir: Path, case: str, paths: dict, overwrite: bool, protected=frozenset(), possible=None) -> None:
    """Before the first output of a case is written (`paths`, the report among them; the case's lock held): its
    journal (journal_path) lists every file this run may leave, those it writes and, with --overwrite, those of an
    earlier run it removes (remove_earlier_outputs, called here after it); written atomically, on disk first. A run
    killed outright then leaves no file that is listed nowhere: the next run refuses them as a run stopped part way
    (refuse_stopped), --overwrite removes exactly them, and no report says the case is done until finish_report."""
    names = {p.name for p in paths.values()}
    if overwrite:
        names |= {p.name for p in _stale_outputs(out_dir, case, paths, protected, possible)}
    names |= set(journal_outputs(paths["report"]) or [])  # an earlier stopped run's names it does not remove
    journal = {"journal": "DeepWML writes these outputs; a finished report replaces this file", "report":
               paths["report"].name, "case": case, "outputs": sorted(names), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    io.write_text(json.dumps(journal, indent=1), journal_path(paths["report"]))
    if overwrite:
        remove_earlier_outputs(out_dir, case, paths, protected, possible)


def finish_report(report: Path, text: str) -> None:
    """Write a case's finished report (`text`) and end its journal: the journal first records the report's digest, so
    that a run killed between the report and the journal's removal is known to have finished (journal_outputs)."""
    import hashlib

    data = text.encode("utf-8", "backslashreplace")
    journal = _read_journal(report)
    if journal:
        journal["report_sha256"] = hashlib.sha256(data).hexdigest()
        io.write_text(json.dumps(journal, indent=1), journal_path(report))
    io.write_bytes(data, report)
    with contextlib.suppress(FileNotFoundError):
        journal_path(report).unlink()


def end_journal(report: Path) -> None:
    """After a run stopped part way removed the outputs it wrote (whole_or_none): its journal goes too, unless a file
    it lists could not be removed (it stays listed)."""
    listed = journal_outputs(report)
    if listed is not None and not any(os.path.lexists(report.parent / name) for name in listed):
        with contextlib.suppress(OSError):
            journal_path(report).unlink()


def _holds_an_input(path: Path, protected) -> bool:
    """Whether `path` is, leads to, or (a folder) holds a scan or mask given to the run (`protected`: resolved)."""
    resolved = path.resolve()
    return resolved in protected or any(resolved in p.parents for p in protected)


def input_fingerprint(path: Path, series: io.DicomSeries | None = None) -> str | None:
    """What tells one scan from another wherever it lies. A scan file: its size, the SHA-256 of its first
    MiB and, after a '~', of blocks spread over the rest (`io.spread_digest`); a detached header (.mhd,
    .nhdr): that of each of its voxel files too (one, or a file per slice), each after a '+' (two patients'
    scans resampled to one template grid have byte-identical headers, and uncompressed, the same first MiB). A DICOM series read from a folder
    (`series`): its Series Instance UID and its files' SOP Instance UIDs (a file without one: its size and
    hash), hashed, as "dicom:FILES:HASH". None for a folder without `series`."""
    import hashlib

    if series is not None:
        uids = series.instance_uids or ("",) * len(series.files)
        keys = sorted(uid or io.file_fingerprint(f) for f, uid in zip(series.files, uids))
        digest = hashlib.sha256("\n".join([series.uid, *keys]).encode("utf-8"))
        return f"dicom:{len(series.files)}:{digest.hexdigest()[:24]}"
    return io.content_fingerprint(path) if path.is_file() else None


def _older_fingerprints(current: str) -> set:
    """What an earlier version recorded for the scan file whose fingerprint is now `current`: the first MiB
    alone (no '~' part), of the header alone for a detached header (no '+' part)."""
    alone = re.sub(r"~[0-9a-f]+", "", current)
    return {alone, alone.split("+")[0]}


def _dicom_candidates(path: Path, study: io.DicomStudy | None = None) -> list:
    """The DICOM series a folder input offers (those of `study`, for a study of an export), as
    io.choose_dicom_series finds them."""
    if study is not None:
        return list(study.series)
    found = io.dicom_series(path)
    return found or [s for below in io.dicom_catalogue(path)[0] for s in below.series]


def same_input(earlier: dict, path: Path, study: io.DicomStudy | None = None) -> bool:
    """Whether an earlier report was made from this input, known by its content (`input_fingerprint`) so
    that a folder moved, renamed or mounted elsewhere keeps its results and a scan replaced by another of the
    same name does not: a scan file by its bytes, a DICOM series by its UIDs (that series among the folder's,
    or `study`'s). A report of a DICOM folder made before its series had a fingerprint: by its place (the same
    folder, however it is reached). A report of a version before these were recorded is taken as this
    input's, as it always was."""
    absolute = earlier.get("input_absolute")
    if not absolute:
        return True
    fingerprint = earlier.get("input_fingerprint")
    if isinstance(fingerprint, str) and fingerprint.startswith("dicom:"):
        if not path.is_dir():
            return False
        uid = (earlier.get("dicom_series") or {}).get("uid")
        return any(input_fingerprint(path, series) == fingerprint for series in _dicom_candidates(path, study)
                   if uid in (None, series.uid))
    if fingerprint and path.is_file():
        current = input_fingerprint(path)
        if current == fingerprint:
            return True
        if "~" in fingerprint or fingerprint not in _older_fingerprints(current):
            return False
        # a report of an earlier version (first MiB only; a detached header alone): judged as it was then, but
        # where that could not tell two scans apart (a detached header; an uncompressed file past its first
        # MiB: two patients on one template grid) only for the very file it was made from
        if not io.detached_data_files(path) and path.stat().st_size <= 1 << 20:
            return True
        try:
            return os.path.samefile(absolute, path)
        except OSError:
            return False
    try:
        return os.path.samefile(absolute, path)
    except OSError:
        return Path(absolute) == path.resolve()


def check_earlier_result(out_dir: Path, case: str, path: Path, report_path: Path, mask_names, settings: dict | None = None,
                         study: io.DicomStudy | None = None, series: str | None = None) -> dict:
    """The report of an earlier run of `case` in `out_dir`, checked before the case is skipped as done: made
    from this same scan (`same_input`; with `series`, the --series choice, the series it names), with the same
    result settings as `settings` (planned_settings; those a report of an older version records), its
    mask and segmentation still there (its optional outputs, a QC picture or a probability map, may have been
    deleted). Else a DeepWMLError that says what to do."""
    try:
        earlier = json.loads(report_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DeepWMLError(f"{report_path.name} cannot be read ({exc}); rerun with --overwrite to redo the case") from exc
    if not isinstance(earlier, dict) or not same_input(earlier, path, study):
        given = earlier.get("input") if isinstance(earlier, dict) else None
        raise DeepWMLError(f"{out_dir} holds the results of another scan named {case!r} ({given}), or this scan has "
                           f"changed since; choose another OUTDIR, or --overwrite to replace them with this scan's")
    differences = []
    if series and path.is_dir() and isinstance(earlier.get("dicom_series"), dict):
        chosen, _ = io.choose_dicom_series(path, series, candidates=study.series if study else None, strict=bool(study))
        if chosen.uid != earlier["dicom_series"].get("uid"):
            then = earlier["dicom_series"]
            which = f"series {then['number']}" if then.get("number") is not None else f"UID {then.get('uid')}"
            differences.append(f"--series ({which} '{then.get('description') or ''}' then, {chosen.label()} now)")
    if settings is not None:
        differences += settings_differences(recorded_settings(earlier), settings)
    if differences:
        raise DeepWMLError(f"{out_dir} holds {case!r} made with other settings: {'; '.join(differences)}; use "
                           f"--overwrite to replace it with this run's, or another OUTDIR to keep both")
    listed = earlier.get("outputs")
    if isinstance(listed, list):  # its mask and segmentation, in whatever --output-format it was given
        # (not its DICOM SEG, CASE_wmh_seg.dcm: an optional output, which a rerun asking for it makes again)
        required = [n for n in listed if isinstance(n, str) and (n == f"{case}.seg.nrrd" or n.startswith(f"{case}_wmh."))]
        missing = [n for n in required if not (out_dir / n).exists()]
    else:  # an older report: its mask in some format
        missing = [] if any((out_dir / n).exists() for n in mask_names) else [mask_names[0]]
    if missing:
        raise DeepWMLError(f"an earlier run's {report_path.name} is here but not its {', '.join(missing)} (deleted?); "
                           f"rerun with --overwrite to make them again")
    return earlier


def not_flair_warning(evidence: Sequence[str], source: str) -> str:
    """The warning for a scan whose header (`source`: where it was read) says it may not be a FLAIR
    (`io.not_flair_evidence`): DeepWML segments it, as asked, but says so first."""
    return (f"the scan may not be a FLAIR: {'; '.join(evidence)} ({source}); DeepWML's model reads FLAIR only and "
            "marks other tissue on other scans (CSF on a T2, bright tissue on a diffusion image): check that this is "
            "the patient's FLAIR")


def image_file_warnings(path: Path) -> list[str]:
    """What a report warns of an image file from the files a converter wrote beside it (io.image_file_evidence): a
    JSON sidecar, b-values or a BIDS name that say it is not a FLAIR; and a header that states no orientation
    (io.unstated_orientation). Shared by `deepwml segment` and the Slicer batch script."""
    evidence, sources = io.image_file_evidence(path)
    orientation = io.unstated_orientation(path)
    return ([not_flair_warning(evidence, ", ".join(dict.fromkeys(sources)))] if evidence else []) + (
        [orientation] if orientation else [])


def scan_header_warnings(path: Path | None, series=None) -> list[str]:
    """The warning, if any, that a scan's own header says it is not a FLAIR: the DICOM `series` read from `path`'s
    folder (io.DicomSeries.not_flair_evidence), else the files beside the image file `path` (image_file_warnings,
    which also warns of an image file's header that states no orientation).
    Shared by segment, change and train."""
    if series is not None:
        evidence = series.not_flair_evidence()
        return [not_flair_warning(evidence, "its DICOM header")] if evidence else []
    return image_file_warnings(Path(path))


def dicom_series_warnings(series, chosen_by: str, image, another: str = "name another with --series") -> list[str]:
    """What a report warns of the DICOM series it was read from (`chosen_by`: how io.choose_dicom_series chose it;
    `image`: the series as read), first among its warnings: which series, where it was picked among others for
    the user (`another`: how to read another instead), files beside it that could not be read, a gap between its
    slices, slices unevenly spaced. Shared by `deepwml segment` and the Slicer batch script, so that both say the
    same."""
    warnings = []
    if chosen_by.startswith("the only one of"):  # picked for the user: say which, so it can be checked
        warnings.append(f"read DICOM {series.label()}, {chosen_by}; {another}")
    # the only series, or one named: taken, but its own header says what it is
    warnings += scan_header_warnings(None, series)
    if series.damaged:  # a transfer cut short loses slices at an end, where no gap shows
        names = ", ".join(Path(p).name for p in series.damaged[:3]) + (", ..." if len(series.damaged) > 3 else "")
        warnings.append(f"{len(series.damaged)} file(s) beside the series could not be read (empty or damaged: "
                        f"{names}); if they are its slices, the series is incomplete: copy it again")
    return warnings + series.slice_warnings(image)


def skip_message(existing: Sequence[str], earlier: dict) -> str:
    """The summary's word on a case skipped because an earlier run's outputs are here (check_earlier_result)."""
    message = f"outputs exist ({', '.join(existing)}); use --overwrite to replace them"
    if not isinstance(earlier.get("settings"), dict):  # an older version's report: its settings were not all kept
        message += ("; made by an older DeepWML whose report does not record all its settings (--min-lesion-mm3, "
                    "--exclude-edge-slices, --precision), so this run's may differ: --overwrite makes it with them")
    return message


# the warning of --dicom-outline and --dicom-seg for an input that is not DICOM (deepwml segment and the Slicer batch)
NO_DICOM_OUTLINE = ("no DICOM outline series: the input is not DICOM, so it has no patient or study to write one into "
                    "(--dicom-outline needs a DICOM series)")
NO_DICOM_SEG = ("no DICOM SEG: the input is not DICOM, so it has no patient or study to write one into (--dicom-seg "
                "needs a DICOM series)")


def output_paths(out_dir: Path, case: str, save_probabilities: bool, save_brain_mask: bool = False,
                 extension: str = ".nii.gz", qc: bool = False, dicom_outline: bool = False,
                 save_ventricle_mask: bool = False, dicom_seg: bool = False) -> dict:
    """The output files (and the outline series' folder) of a case; `extension` of the image outputs
    from `io.output_extension`."""
    paths = {
        "mask": out_dir / f"{case}_wmh{extension}",
        "segmentation": out_dir / f"{case}.seg.nrrd",
        "report": out_dir / f"{case}_report.json",
    }
    if save_probabilities:
        paths["probabilities"] = out_dir / f"{case}_prob{extension}"
    if save_brain_mask:
        paths["brain"] = out_dir / f"{case}_brain{extension}"
    if save_ventricle_mask:
        paths["ventricles"] = out_dir / f"{case}_ventricles{extension}"
    if qc:
        paths["qc"] = out_dir / f"{case}_qc.png"
    if dicom_outline:
        paths["dicom_outline"] = out_dir / f"{case}_outline_dicom"
    if dicom_seg:
        paths["dicom_seg"] = out_dir / f"{case}_wmh_seg.dcm"
    return paths


def segment_case(case: str, path: Path, out_dir: Path, models: Sequence, device: str = "auto",
                 threshold: float | None = None, tta: bool = False, save_probabilities: bool = False,
                 overwrite: bool = False, min_lesion_mm3: float | None = None, exclude_edge_fraction: float = 0.0,
                 batch_size: int | None = None, backend: str = "auto", progress=None, cancel=None,
                 brain_model="default", save_brain_mask: bool = False, precision: str = "auto",
                 output_format: str = "same", qc: bool = False, series: str | None = None,
                 dicom_outline: bool = False, study: io.DicomStudy | None = None, ventricle_model="default",
                 save_ventricle_mask: bool = False, protected=frozenset(), leftovers=None, grid_phases: int = 1,
                 brain_gate: bool = True, dicom_seg: bool = False) -> dict:
    """Segment one case and write its outputs; returns its summary row (status ok/skipped, or ADDED: a case done
    before that lacked optional outputs asked for now, made from its saved mask by add_outputs). `series`: in a
    DICOM folder that holds several series, which one (io.choose_dicom_series). `dicom_outline`: for a
    DICOM input, also the FLAIR with the lesions outlined as a new DICOM series (dicom_outline.py); `dicom_seg`:
    for a DICOM input, also the mask as a DICOM Segmentation object, CASE_wmh_seg.dcm (dicom_seg.py). `study`:
    a study found in an export (expand_inputs): its series are the candidates, and it is skipped
    (NoFlairSeries) when none looks like a FLAIR. `protected`: the resolved paths of the run's inputs, which
    are never written over or deleted (OUTDIR may be the input folder). `leftovers`: OUTDIR's temporary files
    (`io.temporary_leftovers`, listed once for a whole run; None: listed here). `progress(fraction, message)`
    reaches 1.0 when the case's outputs are all written; while the scan is read it may be called from another
    thread, one call at a time (`reading_progress`): a GUI's callback must hand its update to its own thread.
    `path` and `out_dir` (which must exist: segment_cases makes it) may be str or pathlib.Path."""
    path, out_dir = Path(path), Path(out_dir)
    outline = dicom_outline and path.is_dir()  # a DICOM input: only it has a patient and a study to write into
    seg = dicom_seg and path.is_dir()  # the same for a DICOM SEG
    paths = output_paths(out_dir, case, save_probabilities, save_brain_mask, io.output_extension(path, output_format), qc,
                         outline, save_ventricle_mask, seg)
    try:
        with case_guard(out_dir, case, paths, protected):
            return _segment_case(case, path, out_dir, paths, outline, models, device, threshold, tta, save_probabilities,
                                 overwrite, min_lesion_mm3, exclude_edge_fraction, batch_size, backend, progress, cancel,
                                 brain_model, save_brain_mask, precision, qc, series, dicom_outline, study,
                                 ventricle_model, save_ventricle_mask, protected, leftovers, grid_phases, brain_gate,
                                 seg, dicom_seg)
    except MemoryError as exc:  # reading or writing (segment_image explains its own, with the scan's size)
        raise out_of_memory() from exc


def case_guard(out_dir: Path, case: str, paths: dict, protected=frozenset()):
    """Checks before a case's outputs are written, and the lock held while they are (`deepwml segment` and the
    Slicer batch script alike): names that fit the file system, no output on a scan given to the run
    (`protected`), and no other DeepWML process writing the same case now."""
    longest = max(len(os.fsencode(p.name)) for p in paths.values())
    if longest > 255:
        raise DeepWMLError(f"the case name is too long for its output files ({longest} bytes, where a file name may "
                           f"have 255); copy the scan under a shorter name")
    inputs = [p.name for p in paths.values() if p.resolve() in protected]
    if inputs:
        raise DeepWMLError(f"{', '.join(inputs)} in {out_dir} would be written over, and is one of the scans given; "
                           f"choose another OUTDIR")
    return io.exclusive(lock_path(out_dir, case), f"case {case!r} in {out_dir}")


def lock_path(out_dir: Path, case: str) -> Path:
    """The file whose lock a process writing the case's outputs holds (case_guard)."""
    return out_dir / f".{io.shortened(case)}.deepwml-lock"


@contextlib.contextmanager
def whole_or_none(paths: dict):
    """While a case's outputs are written (`paths`, the report last): when the writing stops part way (Ctrl-C,
    SIGTERM, a full disk), the outputs of the case written so far are removed, and with --overwrite the earlier
    run's left, so that the case has none rather than a set without its report, which the next run refuses
    until --overwrite redoes every case; then its journal (start_outputs), unless a file it lists is still there. Only
    a run killed outright (kill -9, a power cut) leaves such a set, which its journal lists. Stopped before its
    journal is written (start_outputs' first write: a full disk), it removes nothing: nothing was written nor removed
    yet, and removing the earlier report and the outputs of this run's names would leave the earlier run's others
    (a picture) listed by no report nor journal, taken by a later run for its own."""
    try:
        yield
    except BaseException:
        if "report" in paths and not os.path.lexists(journal_path(paths["report"])):
            raise  # the earlier result, if any, stays whole
        for path in paths.values():
            with contextlib.suppress(OSError):
                if path.is_dir():
                    from .dicom_outline import remove_outline_series

                    remove_outline_series(path)
                elif path.exists():
                    path.unlink()
        if "report" in paths:
            end_journal(paths["report"])
        raise


def refuse_incomplete(paths: dict, existing: list[str]) -> None:
    """Without --overwrite, a case whose outputs (`existing`: the names of `paths`, output_paths', there now) have no
    report beside them is refused: the report is written last, so an earlier run stopped part way, and --overwrite
    replaces them; but first a folder of the outline series' name that --overwrite would not replace either (a
    user's images in it: dicom_outline.refuse_unreplaceable) is said to be such, and what to do. deepwml segment and
    the Slicer batch script."""
    if paths["report"].exists():
        return
    if "dicom_outline" in paths:
        from .dicom_outline import refuse_unreplaceable

        refuse_unreplaceable(paths["dicom_outline"])
    raise DeepWMLError(f"an earlier run left an incomplete set of outputs ({', '.join(existing)}; no "
                       f"{paths['report'].name}); rerun with --overwrite to replace them")


def outputs_to_add(paths: dict) -> list[str]:
    """The optional outputs (ADDABLE_OUTPUTS) asked for (`paths`, output_paths') that a case done before lacks, to be
    made from its saved mask (add_outputs): those not there, and its outline series' folder where one of that name
    is there that its report does not list (the run did not write it: a user's images), which is no outline of the
    case (add_outputs refuses it as a folder in the way). A report without the list (an older version): taken for
    the case's. Names alike but for upper/lower case are one: on macOS and Windows a scan typed FLAIR where the
    earlier run had flair finds that run's report and folder, which list it as flair_outline_dicom. deepwml
    segment and the Slicer batch script."""
    missing = [key for key in ADDABLE_OUTPUTS if key in paths and not paths[key].exists()]
    listed = _listed_outputs(paths["report"])
    if "dicom_outline" in paths and paths["dicom_outline"].exists() and listed is not None \
            and paths["dicom_outline"].name.casefold() not in {name.casefold() for name in listed}:
        missing.append("dicom_outline")
    return missing


def check_dicom_source(series, outline: bool, seg: bool) -> None:
    """Refuse a DICOM series the outline series (`outline`) or the SEG (`seg`) cannot be made of (no Study Instance
    UID, an unknown character set; for the SEG no Frame of Reference UID): its headers alone tell, so it is refused
    before the networks run, as deepwml change refuses it, not after minutes of segmenting for nothing. In the order
    the outputs are made (the outline first). deepwml segment, a case's added outputs and the Slicer batch script."""
    if outline:
        from .dicom_outline import source_attributes

        source_attributes(series, "--dicom-outline")
    if seg:
        from .dicom_seg import checked_source

        checked_source(series)


def _segment_case(case, path, out_dir, paths, outline, models, device, threshold, tta, save_probabilities, overwrite,
                  min_lesion_mm3, exclude_edge_fraction, batch_size, backend, progress, cancel, brain_model,
                  save_brain_mask, precision, qc, series, dicom_outline, study, ventricle_model, save_ventricle_mask,
                  protected, leftovers, grid_phases, brain_gate, seg=False, dicom_seg=False) -> dict:
    """segment_case's work, with the case's lock held (no other DeepWML process writes its outputs now)."""
    hidden = leftovers if leftovers is not None else io.temporary_leftovers(out_dir)
    prefixes = tuple(io.temporary_prefix(possible) for possible in [*_possible_outputs(out_dir, case),
                                                                     journal_path(paths["report"])])
    for left in hidden:  # a run killed while writing this case left its temporary files (its journal's too)
        if left.name.startswith(prefixes):
            shutil.rmtree(left, ignore_errors=True) if left.is_dir() else left.unlink(missing_ok=True)
    refuse_stopped(paths["report"], overwrite)  # a run killed part way: its files are no result, said so
    refuse_foreign_outlines(out_dir, case, paths, overwrite, protected)  # a user's images where a series was
    existing = [p.name for p in paths.values() if p.exists()]
    if existing and not overwrite:
        refuse_incomplete(paths, existing)  # no report: an earlier run stopped part way, or a user's folder
        planned = planned_settings(models, threshold, tta, min_lesion_mm3, exclude_edge_fraction, brain_model,
                                   ventricle_model, precision, grid_phases, brain_gate)
        earlier = check_earlier_result(out_dir, case, path, paths["report"],
                                       [paths["mask"].name] + [output_paths(out_dir, case, False, extension=e)["mask"].name
                                                               for e in io.OUTPUT_EXTENSIONS],
                                       planned, study, series)
        missing = outputs_to_add(paths)
        if missing:  # asked for now, not made then (or deleted since): made from the saved mask
            def networks(image):
                from .inference import progress_part

                return segment_image(image, models, device, threshold, tta, min_lesion_mm3, exclude_edge_fraction,
                                     batch_size, progress_part(progress, READING_SHARE, SEGMENTING_SHARE), cancel,
                                     backend, brain_model, rerun_precision(precision, earlier, device, backend),
                                     ventricle_model, checked=True, grid_phases=grid_phases, brain_gate=brain_gate)

            return add_outputs(case, path, out_dir, paths, missing, earlier, study, networks, progress, cancel, series=series)
        # --dicom-outline/--dicom-seg of an input that is not DICOM: nothing to add, said as a full run says it (the
        # skip alone read as if --overwrite would make them)
        unmade = [warning for asked, made, warning in ((dicom_outline, outline, NO_DICOM_OUTLINE),
                                                       (dicom_seg, seg, NO_DICOM_SEG)) if asked and not made]
        row = {"case": case, "input": str(path), "status": "skipped",
               "error": "; ".join([skip_message(existing, earlier), *unmade])}
        try:  # the earlier result stays in summary.csv, which this run writes anew
            row.update({key: value for key, value in summary_row(case, path, earlier).items()
                        if key not in ("status", "error", "input", "seconds")})
        except (KeyError, TypeError, AttributeError):
            pass  # a report without the figures: the row says skipped without them
        return row
    if outline:
        from .dicom_outline import check_outline_folder

        check_outline_folder(paths["dicom_outline"], overwrite)
    if path.is_dir() and study is None and not io.is_dicom_folder(path):
        raise DeepWMLError(io.undecodable_dicom(path) or _only_outputs(path)
                           or f"{path} is a folder without image files or a DICOM series{_subfolders_hint(path)}"
                              f"{io.windows_path_hint(path)}")
    if path.is_dir() and study is None and series is None:  # OUTDIR given for the scans, a DICOM SEG among its outputs
        only = _only_outputs(path)
        if only and all(s.derived for s in io.dicom_series(path)):
            raise DeepWMLError(only)
    chosen = (io.choose_dicom_series(path, series, candidates=study.series if study else None, strict=bool(study))
              if path.is_dir() else None)
    if chosen:  # a series the SEG or outline cannot be made of: refused before the networks run
        check_dicom_source(chosen[0], outline, seg)
    tell = progress or (lambda fraction, message: None)
    with reading_progress(tell, cancel) as reading:
        image = io.read_image(path, light=True, series=chosen[0] if chosen else None,  # plain NIfTI: no SimpleITK import
                              reading=reading)
    made_from = _earlier_output(path) if path.is_file() else None
    if made_from:  # a probability map is a grey-scale image: the label-mask check above lets it through
        raise DeepWMLError(f"{path} is an output of an earlier DeepWML run ({made_from[0]} beside it lists it), not a "
                           f"scan; give the FLAIR it was made from ({made_from[1]})")
    from .inference import progress_part

    result = segment_image(image, models, device, threshold, tta, min_lesion_mm3, exclude_edge_fraction, batch_size,
                           progress_part(progress, READING_SHARE, SEGMENTING_SHARE), cancel, backend, brain_model, precision,
                           ventricle_model, checked=True, grid_phases=grid_phases,  # read_image checked it
                           brain_gate=brain_gate)
    if save_brain_mask and result.brain is None:
        raise DeepWMLError("--save-brain-mask needs a brain-mask model; none is shipped or given (--brain-model)")
    if save_ventricle_mask and result.ventricles is None:
        raise DeepWMLError(ventricle_model_needed())
    time_axis = io.read_time_axis(path)  # X, Y, Z, 1: the image outputs are stored so too
    geometry = io.read_nifti_geometry(path)  # NIfTI outputs carry the input's qform and sform as they stand
    report = {"case": case, "input": str(path), "input_size": io.stored_size(image, time_axis), **result.report}
    instances = dicom_instances(chosen[0], result.mask) if chosen else None
    add_instance_numbers(report, instances)
    if chosen:
        report["dicom_series"] = chosen[0].as_dict(chosen[1])
        report["warnings"] = [*dicom_series_warnings(chosen[0], chosen[1], image), *report["warnings"]]
    else:
        report["warnings"] = [*scan_header_warnings(path), *report["warnings"]]
    if dicom_outline and not outline:
        report["warnings"] = [*report["warnings"], NO_DICOM_OUTLINE]
    if dicom_seg and not seg:
        report["warnings"] = [*report["warnings"], NO_DICOM_SEG]
    if qc:  # drawn before anything is written: a picture that fails leaves no half set of outputs
        from .qc import png_bytes, render

        tell(SEGMENTING_SHARE + 0.02, "drawing the QC picture")
        picture = png_bytes(render(image, result.mask, title=picture_title(case, result.report), ventricles=result.ventricles,
                                   slice_labels=instances))
    if outline:  # made before anything is written too
        from .dicom_outline import outline_series

        tell(SEGMENTING_SHARE + 0.04, "making the DICOM outline")
        prepared = outline_series(image, result.mask, chosen[0], report)
    if seg:  # and the SEG
        from .dicom_seg import segmentation

        tell(SEGMENTING_SHARE + 0.045, "making the DICOM SEG")
        segmented = segmentation(image, result.mask, chosen[0], report)
    with whole_or_none(paths):
        # the journal listing what this run writes and removes, then with --overwrite the earlier report and its
        # outputs this run will not write (remove_earlier_outputs)
        start_outputs(out_dir, case, paths, overwrite, protected)
        report["input_absolute"] = str(path.resolve())
        report["input_fingerprint"] = input_fingerprint(path, chosen[0] if chosen else None)
        report["outputs"] = sorted(p.name for p in paths.values())
        report["mask_sha256"] = mask_digest(result.mask)  # a rerun adding outputs checks the saved mask against it
        tell(SEGMENTING_SHARE + 0.05, "writing the mask")  # a second or more each on a large scan
        io.write_image(result.mask, paths["mask"], time_axis, geometry)
        tell(SEGMENTING_SHARE + 0.07, "writing the segmentation")
        io.write_segmentation(result.mask, paths["segmentation"])
        if save_probabilities:
            tell(SEGMENTING_SHARE + 0.08, "writing the probability map")
            io.write_image(result.probabilities, paths["probabilities"], time_axis, geometry)
        if save_brain_mask:
            tell(SEGMENTING_SHARE + 0.09, "writing the brain mask")
            io.write_image(result.brain, paths["brain"], time_axis, geometry)
        if save_ventricle_mask:
            tell(SEGMENTING_SHARE + 0.095, "writing the ventricle mask")
            io.write_image(result.ventricles, paths["ventricles"], time_axis, geometry)
        write_qc_and_dicom(report, paths, overwrite, picture if qc else None, prepared if outline else None,
                           segmented if seg else None)
        finish_report(paths["report"], json.dumps(report, indent=1))  # the journal's end
    tell(1.0, "done")
    return summary_row(case, path, report)


# The optional outputs a rerun into the same OUTDIR adds to a case done before, when asked for now and not there
# (add_outputs): drawn or written from the saved mask, or (the maps) from the networks run again.
ADDABLE_OUTPUTS = ("qc", "dicom_outline", "dicom_seg", "probabilities", "brain", "ventricles")
NETWORK_OUTPUTS = ("probabilities", "brain", "ventricles")  # the networks' maps: only a new run makes them
ADDED = "added"  # summary.csv's status of a case done before whose missing outputs this run added


mask_digest = io.mask_digest  # the report's mask_sha256 (and change's labels_sha256)


def _saved_output(out_dir: Path, case: str, earlier: dict, kind: str, current: Path | None) -> Path | None:
    """The file of a case's image output of `kind` ("wmh", "ventricles") an earlier run wrote, in whatever
    --output-format: the one its report lists (an older report without a list: any there), `current` (this run's
    name of it) first; None when there is none."""
    listed = earlier.get("outputs") if isinstance(earlier.get("outputs"), list) else None
    names = [f"{case}_{kind}{extension}" for extension in io.OUTPUT_EXTENSIONS]
    if listed is not None:
        names = [name for name in names if name in listed]
    if current is not None and current.name in names:
        names.remove(current.name)
        names.insert(0, current.name)
    return next((out_dir / name for name in names if (out_dir / name).is_file()), None)


def read_saved_output(file: Path, image, what: str, scan: str = "the scan's", redo: str = "segment the case again"):
    """A label image an earlier run saved (`what`: "mask", "change label map"...), read and checked to lie on the
    grid of `image` (`scan`: how the messages name it), for a rerun that adds outputs from it (`deepwml segment`'s
    `_saved_mask`, `deepwml change`'s saved label map): else a DeepWMLError naming it, saying to rerun with
    --overwrite to `redo` the case."""
    try:
        saved = io.read_mask(file, change_labels=True)  # change's label map as it is, not as the follow-up's mask
    except DeepWMLError as exc:
        raise DeepWMLError(f"the saved {what} {file.name} cannot be used ({exc}); rerun with --overwrite to {redo}") \
            from exc
    difference = io.grid_difference(saved, image)
    if difference:
        raise DeepWMLError(f"the saved {what} {file.name} is not on {scan} grid ({difference}): it was replaced or "
                           f"resampled since the run that made it; rerun with --overwrite to {redo} (or move that file "
                           "away first to keep it)")
    return saved


def _saved_mask(file: Path, image, what: str = "mask"):
    """A saved mask of a case (CASE_wmh, CASE_ventricles) read and checked to lie on the scan's grid
    (read_saved_output), as `image`'s kind (a Volume or a SimpleITK image) on its very geometry: else a
    DeepWMLError naming it."""
    from .volume import Volume, like, voxels

    mask = read_saved_output(file, image, what)
    array = np.array(voxels(mask), dtype=np.uint8)
    if array.max(initial=0) > 1:
        raise DeepWMLError(f"the saved {what} {file.name} holds labels other than 0 and 1 (up to {int(array.max())}), "
                           "so it is not the one DeepWML wrote; rerun with --overwrite to segment the case again")
    return like(array, image.GetSpacing(), image.GetOrigin(), image.GetDirection(),
                Volume if isinstance(image, Volume) else None)


def _check_unedited(mask, file: Path, earlier: dict) -> str:
    """The saved mask's digest (mask_digest), checked against what its report records (`mask_sha256`; a report of
    an older version without it: its lesions' voxels, counted): a mask edited since is refused, since the outputs
    added would draw or describe it with the report's figures, which are not its own."""
    from .volume import voxels

    digest = mask_digest(mask)
    recorded = earlier.get("mask_sha256")
    if isinstance(recorded, str):
        edited = recorded != digest
        how = "its voxels differ from those its report records (mask_sha256)"
    else:
        lesions = earlier.get("lesions")
        counted = (sum(int(lesion["voxels"]) for lesion in lesions)
                   if isinstance(lesions, list) and all(isinstance(l, dict) and "voxels" in l for l in lesions) else None)
        marked = int(np.count_nonzero(voxels(mask)))
        edited = counted is not None and counted != marked
        how = f"it marks {marked} voxels, its report's lesions {counted}"
    if edited:
        raise DeepWMLError(f"{file.name} was changed since the run that made it ({how}): the outputs asked for would "
                           "show it with the report's figures, which are not its own; rerun with --overwrite to segment "
                           "the case again (move your edited mask elsewhere first to keep it): that gives a new "
                           "segmentation's outputs, not your edit's. The edited mask's own report, DICOM SEG, outline "
                           "and picture: deepwml export FLAIR EDITED_MASK -o ANOTHER_OUTDIR --dicom-seg (or, in Slicer, "
                           "the DeepWML module's Save results with 'Also write a DICOM SEG')")
    return digest


def add_outputs(case: str, path: Path, out_dir: Path, paths: dict, missing: list[str], earlier: dict, study, networks,
                progress=None, cancel=None, draw=None, series: str | None = None) -> dict:
    """Make the outputs of a case done before that this run asks for and its OUTDIR lacks (`missing`, keys of
    `paths` among ADDABLE_OUTPUTS), from the earlier run's saved mask, the file the user has, checked first: on
    the scan's grid (read again), unedited (_check_unedited). The QC picture, the DICOM outline series and the
    DICOM SEG are drawn from it and the report's figures; the networks' maps (a probability map, a brain or
    ventricle mask, and the ventricles the QC picture outlines when the run had a ventricle model and did not save
    them) only come from the networks: `networks(image)` (segment_image with the run's settings, which are the
    earlier run's) runs them again, and its mask must be the saved mask, voxel for voxel, else the maps would not
    be of it (another device or precision). The files there stay as they are; the report (read before, `earlier`)
    is rewritten listing the new outputs (`outputs`, and `outputs_added`) first, then they are written: stopped
    part way (Ctrl-C, a full disk), the new files go and the earlier report is put back (whole_or_none's rule: the
    case as it was); killed outright, the report lists an optional output not there, which the next run asking for
    it makes. Returns the summary row, status ADDED, its `error` saying what was added. `draw(image, mask, title)`,
    when given, draws the QC picture's PNG bytes in place of render's (the Slicer batch script's against a reference)."""
    from .volume import voxels

    tell = progress or (lambda fraction, message: None)
    mask_file = _saved_output(out_dir, case, earlier, "wmh", paths["mask"])
    if mask_file is None:  # check_earlier_result found it: gone since
        raise DeepWMLError(f"the mask of {case!r} is not in {out_dir}; rerun with --overwrite to segment the case again")
    chosen = None
    if path.is_dir():  # the series the earlier run read (its UID), among the study's; a report of a version before
        # it was recorded: this run's --series, which check_earlier_result could not compare (else the study's FLAIR)
        uid = (earlier.get("dicom_series") or {}).get("uid") or series
        chosen = io.choose_dicom_series(path, uid, candidates=study.series if study else None, strict=bool(study))
        # refused before the networks run again (a probability map, the QC's ventricles asked for beside them)
        check_dicom_source(chosen[0], "dicom_outline" in missing, "dicom_seg" in missing)
    with reading_progress(tell, cancel) as reading:
        image = io.read_image(path, light=True, series=chosen[0] if chosen else None, reading=reading)
    tell(READING_SHARE, f"reading the saved {mask_file.name}")
    mask = _saved_mask(mask_file, image)
    digest = _check_unedited(mask, mask_file, earlier)
    report = dict(earlier)
    ventricles = None
    if "qc" in missing and report.get("location"):  # the QC outlines the ventricles the split measured from
        saved = _saved_output(out_dir, case, earlier, "ventricles", paths.get("ventricles"))
        ventricles = _saved_mask(saved, image, "ventricle mask") if saved is not None else None
    rerun = [key for key in missing if key in NETWORK_OUTPUTS] or (
        ["qc"] if "qc" in missing and report.get("location") and ventricles is None else [])
    result = None
    if rerun:
        result = networks(image)
        differ = int(np.count_nonzero(voxels(result.mask) != voxels(mask)))
        if differ:
            raise DeepWMLError(f"the networks run again to make {', '.join(paths[k].name for k in rerun)} give a mask "
                               f"that differs from the saved {mask_file.name} in {differ} voxels (another device, "
                               "backend or precision than the earlier run's?), so those maps would not be of it; rerun "
                               "with --overwrite to segment the case again")
        if "brain" in missing and result.brain is None:
            raise DeepWMLError("--save-brain-mask needs a brain-mask model; none is shipped or given (--brain-model)")
        if ventricles is None:
            ventricles = result.ventricles
    instances = dicom_instances(chosen[0], mask) if chosen else None
    made = {}  # what is written, by key: (how, what)
    if "qc" in missing:
        from .qc import png_bytes, render

        tell(SEGMENTING_SHARE + 0.02, "drawing the QC picture")
        made["qc"] = (draw(image, mask, picture_title(case, report)) if draw is not None else
                      png_bytes(render(image, mask, title=picture_title(case, report), ventricles=ventricles,
                                       slice_labels=instances)))
    if "dicom_outline" in missing:
        from .dicom_outline import check_outline_folder, outline_series

        check_outline_folder(paths["dicom_outline"], False)
        tell(SEGMENTING_SHARE + 0.04, "making the DICOM outline")
        made["dicom_outline"] = outline_series(image, mask, chosen[0], report)
        report["dicom_outline"] = made["dicom_outline"].as_dict(paths["dicom_outline"].name)
    if "dicom_seg" in missing:
        from .dicom_seg import segmentation

        tell(SEGMENTING_SHARE + 0.045, "making the DICOM SEG")
        made["dicom_seg"] = segmentation(image, mask, chosen[0], report)
        report["dicom_seg"] = made["dicom_seg"].as_dict(paths["dicom_seg"].name)
    added = sorted(paths[key].name for key in missing)
    listed = earlier.get("outputs")
    if not isinstance(listed, list):  # a report of an older version: what of its run is there
        listed = [p.name for p in _possible_outputs(out_dir, case) if p.exists()]
    report["outputs"] = sorted(set(listed) | set(added))
    report["outputs_added"] = sorted(set(report.get("outputs_added") or []) | set(added))
    report["mask_sha256"] = digest
    time_axis = io.read_time_axis(path) if result is not None else None
    geometry = io.read_nifti_geometry(path) if result is not None else None

    def write(key: str, target: Path) -> None:
        tell(SEGMENTING_SHARE + 0.05, f"writing {target.name}")
        if key == "qc":
            io.write_bytes(made[key], target)
        elif key == "dicom_outline":
            from .dicom_outline import write_outline_series

            write_outline_series(made[key], target)
        elif key == "dicom_seg":
            io.write_bytes(made[key].data, target)
        else:
            image_of = {"probabilities": result.probabilities, "brain": result.brain, "ventricles": result.ventricles}[key]
            if image_of is None:
                raise DeepWMLError(ventricle_model_needed())
            io.write_image(image_of, target, time_axis, geometry)

    write_added(paths["report"], report, {key: paths[key] for key in missing}, write)
    tell(1.0, "done")
    how = f"from the saved {mask_file.name}" + (
        f"; the networks were run again for {', '.join(paths[k].name for k in rerun) if rerun != ['qc'] else 'the ventricles the QC picture outlines'}"
        " (their mask is the saved one)" if rerun else "")
    row = summary_row(case, path, report)
    row.update(status=ADDED, error=f"added {', '.join(added)} {how}; the result is the earlier run's")
    return row


def write_added(report_path: Path, report: dict, new: dict, write) -> None:
    """Write the outputs a rerun adds to a case done before (`new`: {key: path}, each written by `write(key, path)`)
    and its report (`report`, listing them), `deepwml segment` and `deepwml change` alike: the report first, atomically
    (the new outputs listed before they are there), then the new outputs. Stopped part way (Ctrl-C, SIGTERM, a full
    disk), the new outputs written so far go (whole_or_none) and the earlier report is put back, byte for byte: the
    case as it was, which the same command run again completes. Killed outright between the two, the report lists an
    optional output that is not there, as after a picture deleted by hand: the next run that asks for it makes it."""
    before = report_path.read_bytes()
    try:
        with whole_or_none(new):
            io.write_text(json.dumps(report, indent=1), report_path)
            for key, path in new.items():
                write(key, path)
    except BaseException:
        with contextlib.suppress(OSError, DeepWMLError):  # the case as it was: its earlier report back
            io.write_bytes(before, report_path)
        raise


def dicom_instances(series: io.DicomSeries, mask) -> list[int] | None:
    """The Instance Number of each axial slice of a DICOM input read from `series` (slice k of the volume is
    the series' k-th file), or None when they do not name the slices: the slices are not the volume's third
    axis (a sagittal or coronal series), or the numbers are missing, repeated or not one per file."""
    numbers = list(series.instance_numbers)
    slices = mask.GetSize()[2]
    if io.axial_axis(mask) != 2 or len(numbers) != slices or None in numbers or len(set(numbers)) != slices:
        return None
    return [int(n) for n in numbers]


def add_instance_numbers(report: dict, instances: list[int] | None) -> None:
    """The image numbers PACS shows (`dicom_instances`; None: none), beside the voxel indices, in a report's slices
    (dicom_instance) and lesions (dicom_instance_range)."""
    if instances:
        for row in report["slices"]:
            row["dicom_instance"] = instances[row["index"]]
        for lesion in report["lesions"]:
            lesion["dicom_instance_range"] = [instances[k] for k in lesion["slice_range"]]


def write_qc_and_dicom(report: dict, targets: dict, overwrite: bool, picture: bytes | None = None, prepared=None,
                       segmented=None) -> None:
    """Write what a case's run made before writing anything, each that is not None: the QC picture's PNG bytes to
    targets["qc"], the outline series (dicom_outline.py's) into the folder targets["dicom_outline"] and the DICOM SEG
    (dicom_seg.py's) to targets["dicom_seg"]; the series' and the SEG's descriptions go into `report`. One writer for
    deepwml segment, export and change and the Slicer batch."""
    if picture is not None:
        io.write_bytes(picture, targets["qc"])
    if prepared is not None:
        from .dicom_outline import write_outline_series

        report["dicom_outline"] = write_outline_series(prepared, targets["dicom_outline"], overwrite)
    if segmented is not None:
        io.write_bytes(segmented.data, targets["dicom_seg"])
        report["dicom_seg"] = segmented.as_dict(targets["dicom_seg"].name)


@contextlib.contextmanager
def reading_progress(tell, cancel: Callable[[], bool] | None = None):
    """`reading(fraction)` for io.read_image, told to `tell` in the reading's share of the bar, "reading the scan"
    (from 0 at once: half a minute for a 1024 x 1024 x 400 .nii.gz, the bar shows what it waits for). While
    nothing is told for READING_TICK_S, another thread tells the seconds spent so far ("reading the scan (12 s)"),
    the bar where it stood: one that waits on a read saying nothing until it ends (an NRRD or MetaImage file,
    seconds for a large one) looked frozen at 0 %. `tell` is called by one thread at a time, never after the block;
    what it raises in the other thread (a callback that stops the run, a closed terminal) stops the ticking and is
    raised in the block's thread, at its next `reading` call or as the block ends, as when it is called there.
    When `cancel()` is true, `reading` raises Cancelled, which stops the read: a DICOM series at its next file, a
    NIfTI file at its next piece (a long read could not be cancelled until it ended); an NRRD or MetaImage file,
    which SimpleITK reads in one call, only as it ends."""
    lock = threading.Lock()
    stop = threading.Event()
    start = time.monotonic()
    state = {"at": 0.0, "said": start}
    raised: list[BaseException] = []  # by `tell` in the ticker's thread

    def say(fraction: float, message: str) -> None:
        state["at"], state["said"] = fraction, time.monotonic()
        tell(fraction, message)

    def reading(done: float) -> None:
        with lock:
            if raised:
                raise raised[0]
            if cancel is not None and cancel():
                raise Cancelled("cancelled")
            say(max(state["at"], READING_SHARE * min(1.0, done)), "reading the scan")

    def tick() -> None:
        while not stop.wait(READING_TICK_S / 4):
            with lock:
                if not stop.is_set() and time.monotonic() - state["said"] >= READING_TICK_S:
                    try:
                        say(state["at"], f"reading the scan ({time.monotonic() - start:.0f} s)")
                    except BaseException as exc:  # not lost in this thread (printed, the run going on)
                        raised.append(exc)
                        return

    say(0.0, "reading the scan")
    ticker = threading.Thread(target=tick, name="deepwml-reading", daemon=True)
    ticker.start()
    try:
        yield reading
    finally:
        stop.set()
        ticker.join()
    if raised:
        raise raised[0]


def summary_row(case: str, path: Path, report: dict) -> dict:
    """A case's summary.csv row from its report."""
    split = report.get("location") or {}
    return {"case": case, "input": str(path), "volume_ml": report["volume_ml"],
            "lesion_count": report["lesion_count"], "periventricular_ml": split.get("periventricular_ml"),
            "deep_ml": split.get("deep_ml"), "status": "ok", "error": "", "seconds": report.get("seconds"),
            "warnings": report.get("warnings") or []}


def picture_title(case: str, report: dict) -> str:
    """The QC picture's title: the case, its lesion volume and count, and whether the scan does not look
    like a FLAIR (contrast.py), so that a batch looked over by its pictures shows it."""
    title = f"{case}: {report['volume_ml']:.2f} ml, {lesion_count_text(report['lesion_count'])}"
    looks_like = (report.get("contrast") or {}).get("looks_like")
    if looks_like and looks_like != "FLAIR":
        title += f" - not a FLAIR? looks {looks_like}"
    return title


@io.dicom_headers_read_once()  # --series checked up front, then each case's folder chosen from
def segment_cases(inputs: Sequence[str], out_dir: str | os.PathLike, model_paths: Sequence[str] | None = None,
                  device: str = "auto", progress_factory=None, debug: bool = False, **options) -> list[dict]:
    """Run every case; a failing case is recorded (status error) and the others still run. `progress_factory(number,
    total, case)` gives each case's `progress` (`segment_case`: called from another thread while the scan is read)
    and its `finish(row)` each case's row. `inputs`: files and folders (str or pathlib.Path), or one of them."""
    if isinstance(inputs, (str, os.PathLike)):  # one scan: not its name's characters, the first "/" the whole disk
        inputs = [inputs]
    from .inference import check_runtime

    # --device cuda without a GPU, a backend not installed: refused before OUTDIR is made (each case refused it)
    check_runtime(device, options.get("backend", "auto"), options.get("precision", "auto"))
    models = load_models(model_paths)
    options["brain_model"] = load_brain_model_saying_none(options.get("brain_model", "default"))
    options["ventricle_model"] = load_ventricle_model(options.get("ventricle_model", "default"))
    if options.get("save_ventricle_mask") and options["ventricle_model"] is None:  # before anything is run or made
        raise UsageError(ventricle_model_needed())
    cases = _once_each(expand_inputs(inputs))
    named = frozenset(_resolved(Path(raw)) for raw in inputs)  # the files and folders the user typed
    cases = case_names_apart(cases, named)  # clashing names told apart by their folders, or refused
    if options.get("series"):  # a --series that no DICOM case holds (a typo): refused at once, from the headers
        refuse_series_named_nowhere(cases, options["series"])
    out = io.make_output_dir(out_dir)
    protected = frozenset(path.resolve() for _, path, _ in cases)  # never written over nor deleted
    options["leftovers"] = io.temporary_leftovers(out)
    rows = []
    summary = io.GrowingCsv(SUMMARY_COLUMNS, out / "summary.csv")
    finished = False
    # an earlier run's summary never stands for this one's, even if this one is killed or cannot write its own
    if (out / "summary.csv").exists() and not _summary_so_far(summary):
        without_summary(out / "summary.csv")
    try:
        _run_cases(cases, out, models, device, progress_factory, debug, protected, named, rows, summary, options)
        finished = True
    finally:  # also when interrupted: the cases done so far, not an earlier run's summary
        try:
            write_summary(rows, out / "summary.csv")
        except DeepWMLError as exc:
            left = without_summary(out / "summary.csv")
            if finished:
                raise DeepWMLError(f"{exc}; {left}") from exc
    return rows


def _summary_so_far(summary: io.GrowingCsv, row: dict | None = None) -> bool:
    """summary.csv with the cases done so far (and `row`, the case just done), rewritten after each: a run killed
    outright (kill -9, a crash, a power cut), which cannot write it at the end, leaves the cases it did listed. A
    failure to write it here (open in Excel on Windows) waits for the end of the run, which says so. Whether it was
    written."""
    try:
        summary.write() if row is None else summary.add(_summary_cells(row))
    except DeepWMLError:
        return False
    return True


def without_summary(summary: Path) -> str:
    """Remove `summary`, which this run could not write (a full disk, where removing a file takes no space), and say
    what is left: on a full disk an earlier run's summary.csv stayed beside this run's error, listing other cases or
    other figures as if they were this run's."""
    try:
        summary.unlink(missing_ok=True)
    except OSError as exc:
        return f"the {summary} there is not this run's and could not be removed ({exc.strerror}): do not use it"
    return (f"no {summary.name} is left in {summary.parent} (neither an earlier run's nor this one's cut short): each "
            "case segmented has its figures in its _report.json")


def _resolved(path: Path) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError):
        return path


def _run_cases(cases, out, models, device, progress_factory, debug, protected, named, rows, summary, options) -> None:
    unread = [isinstance(study, DeepWMLError) or found_segmentation(path, named, len(cases) == 1)
              for _, path, study in cases]
    to_segment = _CasesToSegment(cases, unread)
    for number, (case, path, study) in enumerate(cases, start=1):
        progress = progress_factory(number, len(cases), case) if progress_factory else None
        start = time.perf_counter()
        try:
            if isinstance(study, DeepWMLError):  # a folder of the input that could not be read (writes nothing)
                raise study
            if unread[number - 1]:  # a case's Slicer segmentation beside its scan (found_segmentation)
                row = {"case": case, "input": str(path), "status": "skipped", "error": SEGMENTATION_SKIPPED,
                       "seconds": round(time.perf_counter() - start, 3), "_mask": True}
                if _resolved(path) in named:
                    row["_named"] = f"{path} is a Slicer segmentation (.seg.nrrd), not a FLAIR scan; give the FLAIR image"
            else:
                row = segment_case(case, path, out, models, device, progress=progress, study=study,
                                   protected=protected, **options)
        except io.BeingWritten:  # another DeepWML run into OUTDIR is writing this case: left to it, not a failure
            row = {"case": case, "input": str(path), **left_to_another(out, case, path, study),
                   "seconds": round(time.perf_counter() - start, 3)}
        except (Cancelled, BrokenPipeError):  # the whole run stops, as it does when cancelled while segmenting;
            raise  # a broken pipe is the screen's (`2>&1 | head` gone), no fault of the case: main ends with 141
        except Exception as exc:  # one bad case never stops the others
            row = {"case": case, "input": str(path), **_failed_case(exc, path, named, len(cases) == 1, debug),
                   "seconds": round(time.perf_counter() - start, 3)}
        row["_study"] = isinstance(study, io.DicomStudy)
        rows.append(row)
        if progress_factory:
            row["_to_segment"] = to_segment.after(number, rows)
            progress_factory.finish(row)
            del row["_to_segment"]
        _summary_so_far(summary, row)

    def again(number, row, path, study, own):
        progress = progress_factory(number, len(cases), row["case"]) if progress_factory else None
        return segment_case(row["case"], path, out, models, device, progress=progress, study=study,
                            protected=protected, **{**options, "overwrite": own and options.get("overwrite", False)})

    recheck_left_to_another(rows, out, again,
                            lambda row, exc: _failed_case(exc, Path(row["input"]), named, len(cases) == 1, debug),
                            progress_factory and (lambda row: progress_factory.finish({**row, "_to_segment": 0})))
    no_flair = no_flair_anywhere(rows, options.get("series"))
    if no_flair:
        print(f"deepwml segment: error: {no_flair}", file=sys.stderr)
    named_masks = [row for row in rows if "_named" in row]
    only_masks = masks_only(rows)
    if only_masks:
        print(f"deepwml segment: error: {only_masks}", file=sys.stderr)
    for row in named_masks:
        if row["status"] == "skipped":
            warnings.warn(f"skipped {row['input']}, given as INPUT: {row['error']}", stacklevel=2)


LEFT_TO_ANOTHER = ("being written by another DeepWML process now, so left to it (not segmented twice); its "
                   "figures are in its report when it is done")
DONE_BY_ANOTHER = "written by another DeepWML process into this OUTDIR during this run; figures from its report"


def left_to_another(out: Path, case: str, path: Path, study) -> dict:
    """The status and error of a case another DeepWML process holds now (io.BeingWritten), marked `_busy` to be
    looked at again at the end of the run (recheck_left_to_another) with its report as it was now (_report_seen)."""
    return {"status": "skipped", "error": LEFT_TO_ANOTHER, "_busy": (path, study, _report_seen(out, case))}


def _report_seen(out: Path, case: str):
    """What tells the case's report apart from one written after (its time, size and file), or None: none there.
    Compared with itself, not with this computer's clock (another computer sharing OUTDIR may keep another time)."""
    try:
        stat = (out / f"{case}_report.json").stat()
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size, stat.st_ino


def _failed_case(exc: Exception, path: Path, named, alone: bool, debug: bool) -> dict:
    """The row's status and error of a case that raised `exc` (`deepwml segment`): a study without a FLAIR, or a
    label mask among the inputs (`mask_input_skipped`), is skipped, not failed (unless masks are all the run has:
    masks_only); any other exception is the case's error."""
    if isinstance(exc, io.NoFlairSeries):  # a study of an export that is not a FLAIR exam
        return no_flair_row(exc)
    if isinstance(exc, io.LabelMaskGiven) and mask_input_skipped(path, named, alone):
        row = {"status": "skipped", "error": mask_skipped(exc), "_mask": True}
        if _resolved(path) in named:
            row["_named"] = str(exc)
        return row
    if debug:
        end_progress_line()  # the traceback on lines of its own, below the case's bar where it stopped
        traceback.print_exc()
    return {"status": "error", "error": case_error(exc)}


def recheck_left_to_another(rows: list[dict], out: Path, again, failed, finish=None) -> None:
    """The cases of a run left to another DeepWML process writing them (left_to_another, marked `_busy`: (path,
    study, its report as it was then)), looked at again at the end of the run: `deepwml segment` and the Slicer
    batch script alike.
    - Finished by the other process: the row takes the figures of the report it wrote, checked as a rerun's are
      (the same scan, the same settings; else an error, as a rerun's would be, and so is any other failure to
      check it: unchecked_by_another). Its report there, unchanged, when this run reached it (done before, and
      the other process held it only to skip it): the case is this run's as any case done before, skipped, or
      with --overwrite replaced now.
    - Its lock free and no result (the other process failed on it, or was stopped, and its outputs went with
      it: whole_or_none): this run segments it now, so that a run does not end 'done' with a case nobody did.
    - Its lock still held: left to that process, the row naming the lock and when to delete it (a process on
      another computer sharing OUTDIR that died can leave its lock held on a network share).
    `again(number, row, path, study, own)` runs the case and gives its row (it raises as a case does): `own`, the
    case's report unchanged since this run reached it (done before; nobody did it meanwhile), with the run's own
    --overwrite, so that a run given --overwrite replaces it as asked; else without (the other process's result
    is checked, never replaced); `failed(row, exc)` is the caller's status and error of a case that raised `exc`; `finish(row)` shows
    the line of a case this look segmented or found failed. A cancel stops the run here as anywhere."""
    for number, row in enumerate(rows, start=1):
        left = row.pop("_busy", None)
        if left is None:
            continue
        path, study, seen = left
        report = _report_seen(out, row["case"])  # written by the other process, or before, by this look
        own = report is not None and report == seen
        start = time.perf_counter()
        try:
            result = again(number, row, path, study, own)
        except io.BeingWritten:
            row["error"] = (f"{LEFT_TO_ANOTHER}; its lock, {lock_path(out, row['case'])}, was still held at the end "
                            f"of this run: if no DeepWML run is writing into this OUTDIR, here or on another computer "
                            f"sharing the folder (one stopped there can leave its lock held on a network share), "
                            f"delete that file and run again")
            continue
        except (Cancelled, BrokenPipeError):  # as in _run_cases
            raise
        except Exception as exc:
            if report is not None and not own:
                row.update(status="error", error=unchecked_by_another(exc))
                continue
            result = failed(row, exc)
        else:
            if result["status"] == "skipped":  # its outputs there: done by the other process, or before
                row.update({key: value for key, value in result.items() if key not in ("status", "error", "seconds")},
                           error=result["error"] if own else DONE_BY_ANOTHER)
                continue
        row.update({"seconds": round(time.perf_counter() - start, 3), **result})  # segmented now, or failed
        if finish:
            finish(row)


def unchecked_by_another(exc: Exception) -> str:
    """The error of a case left to another DeepWML process whose result could not be checked at the end of the run
    (recheck_left_to_another): a DeepWMLError's own words; any other failure (a
    report damaged by a process killed while writing it, a file this run may not read) said, with what to do,
    rather than ending the run without its summary."""
    if isinstance(exc, DeepWMLError):
        return str(exc)
    return (f"written by another DeepWML process during this run, but its results could not be checked "
            f"({type(exc).__name__}: {exc}); run again to check them, or with --overwrite to redo the case")


class _CasesToSegment:
    """How many of the cases after the `number`th will be segmented, as far as can be told before they are read (for
    the time left): not those that write nothing unread (`unread`: a Slicer segmentation skipped, a folder that could
    not be read), nor those named as a label mask found so far is but for its digits (a labelled cohort's
    patient19/consensus_mask.nii.gz after patient07's; only reading tells a mask, and these were counted as scans
    to do, the time left twice the real one when a mask lay beside each FLAIR). A name a scan read so far has too
    tells nothing (masks/p01.nii.gz ... then scans/p01.nii.gz ...: the scans were all taken for masks, and no time
    left was said for the whole run). Counted as the run goes, each name looked at once: counting the cases left
    anew after each case took 20 ms a case at 2000 cases, 47 ms at 5000."""

    def __init__(self, cases, unread):
        self._patterns = [None if skipped else _name_pattern(path) for (_, path, _), skipped in zip(cases, unread)]
        self._left = collections.Counter(self._patterns)  # the name patterns of the cases not done yet ...
        self._total = len(cases) - sum(unread)  # ... of them in all, but for the unread ones (None)
        self._done = self._seen = 0  # cases taken off _left, rows looked at
        self._masks, self._scans = set(), set()  # the name patterns of the label masks and the scans read so far

    def after(self, number: int, rows: Sequence[dict]) -> int:
        for pattern in self._patterns[self._done:number]:
            self._left[pattern] -= 1
            self._total -= pattern is not None
        self._done = max(self._done, number)
        for row in rows[self._seen:]:
            (self._masks if row.get("_mask") else self._scans).add(_name_pattern(Path(row["input"])))
        self._seen = len(rows)
        return self._total - sum(self._left[pattern] for pattern in self._masks - self._scans)


def _name_pattern(path: Path) -> str:
    return re.sub(r"\d+", "#", path.name.casefold())


def mask_skipped(exc: io.LabelMaskGiven) -> str:
    """The summary's word on a label mask among the inputs (found in a folder given, or named), skipped."""
    return f"looks like a label mask, not a FLAIR scan ({exc.values}): not segmented"


SEGMENTATION_SKIPPED = "a Slicer segmentation (.seg.nrrd), not a FLAIR scan: not segmented"


def found_segmentation(path: Path, named, alone: bool = False) -> bool:
    """Whether an input is a Slicer segmentation (.seg.nrrd) to skip: found in a folder given, or named (`named`: the
    resolved paths the user typed) beside other inputs, as a shell glob (data/p07/*) names it; not the run's only
    input (`alone`), which is read and refused. It is a case's manual mask saved beside its scan, often of the scan's
    own name (case01.nrrd, case01.seg.nrrd), skipped unread, as a label mask among the inputs is, and has no outputs
    whose name could clash: the clash refused the whole run ('2 inputs are both named case01'), nothing segmented."""
    return path.name.lower().endswith(io.SEGMENTATION_EXTENSION) and mask_input_skipped(path, named, alone)


def mask_input_skipped(path: Path, named, alone: bool) -> bool:
    """Whether an input found to be a label mask or segmentation is skipped, with a word, rather than refused: found
    in a folder given (a case's FLAIR beside its manual mask), or named (`named`: the resolved paths the user typed)
    beside other inputs, as a shell glob (data/p07/*) names the mask beside the FLAIR. Named as the run's only input
    (`alone`), it is the error. deepwml adapt skips its --scans by the same rule."""
    return not (alone and _resolved(path) in named)


def masks_only(rows: list[dict]) -> str | None:
    """When every case of a run is a label mask (rows marked `_mask`, skipped; `_named` with its error when named as
    INPUT), they are errors, and the error to print is returned: a folder of masks given for the folder of scans,
    or a glob that named only masks, ended 'done', exit 0, with nothing segmented. A mask named is then its own
    error ("... looks like a label mask ...; give the FLAIR image"). The marks are removed."""
    masks = [row for row in rows if row.pop("_mask", False)]
    named = {id(row): row.pop("_named") for row in rows if "_named" in row}
    if not masks or len(masks) < len(rows):
        return None
    for row in masks:
        row.update(status="error", error=named.get(id(row)) or f"{row['error']}; no FLAIR scan among the inputs given")
    if named:
        found = f"all {len(masks)} image files given look"
    else:
        found = "the image file found looks" if len(masks) == 1 else f"all {len(masks)} image files found look"
    return (f"{found} like a label mask or segmentation, not a FLAIR scan, so nothing was segmented; give the "
            f"{'FLAIR scans' if named else 'folder of the FLAIR scans'}")


def refuse_series_named_nowhere(cases: Sequence[tuple], choice: str) -> None:
    """Raise DeepWMLError, before OUTDIR is made or a scan read, when --series `choice` names no series in any DICOM
    case of `cases` (expand_inputs's): a series folder given, or a study found in an export. Each case refused it after
    OUTDIR was made (into a summary.csv of failed cases). Only the series' headers are read (a study's were read when
    the export was searched), and only until one case holds such a series: then each case without one fails on its
    own, naming its series, as before. A folder whose series cannot be read makes no refusal here (its case says
    why); image files take no --series."""
    unmatched = []
    for case, path, study in cases:
        if isinstance(study, io.DicomStudy):
            series = list(study.series)
        elif study is None and path.is_dir():
            try:
                series = io.dicom_series(path)
            except (DeepWMLError, OSError):
                return
            if not series:  # no series of its own (damaged, or a catalogue of folders below): its case says
                return
        else:
            continue
        if io.series_named(series, choice):
            return
        unmatched.append((case, path, study, series))
    if not unmatched:
        return
    if len(unmatched) == 1:  # the words of the case's own refusal, at once
        _, path, study, series = unmatched[0]
        io.choose_dicom_series(path, choice, candidates=series)
    kinds = collections.Counter((s.number, s.description) for *_, series in unmatched for s in series)
    shown = [f"series {number} '{description or '(no description)'}' (in {count})" if number is not None
             else f"'{description or '(no description)'}' (in {count})" for (number, description), count in
             sorted(kinds.items(), key=lambda item: (-item[1], item[0][0] is None, item[0][0] or 0, item[0][1]))]
    more = f"; and {len(shown) - 6} more" if len(shown) > 6 else ""
    studies = sum(isinstance(study, io.DicomStudy) for _, _, study, _ in unmatched)
    given = ("DICOM studies" if studies == len(unmatched) else "DICOM folders" if not studies
             else "DICOM folders and studies")
    raise DeepWMLError(f"--series {choice!r} matches no series in any of the {len(unmatched)} {given} given; they "
                       f"hold {'; '.join(shown[:6])}{more}; choose one with --series TEXT (its "
                       "series number, its description or a part of it, or its UID)")


def no_flair_row(exc: Exception) -> dict:
    """The row of a study without a FLAIR (io.NoFlairSeries), skipped, marked `_no_flair` for no_flair_anywhere, and
    `_outline_only` where it holds DeepWML's outline series alone (io.OutlineSeriesOnly): `deepwml segment` and the
    Slicer batch script alike."""
    row = {"status": "skipped", "error": str(exc), "_no_flair": True}
    if isinstance(exc, io.OutlineSeriesOnly):
        row["_outline_only"] = True
    return row


def no_flair_anywhere(rows: list[dict], series: str | None = None, choose: str | None = "--series") -> str | None:
    """When no study of a run holds a FLAIR, the error to print, else None: `deepwml segment` and the Slicer batch
    script alike. Studies without a FLAIR (rows marked `_no_flair`) are skipped beside other cases (an export's
    other exams); but when they are all the run has besides label masks skipped as masks (rows marked `_mask`, left
    for masks_only: a case's manual mask beside the wrong exam is no scan segmented either), or `series` (--series)
    matches nothing in any study of the run (a mistyped choice), they are errors, so that the run does not end
    'done', exit 0, with nothing segmented (a PACS export of the wrong study). `choose`: the option that picks a
    series, offered in the message. The marks (`_study`, `_no_flair`) are removed."""
    studies = [row for row in rows if row.pop("_study", False)]
    outlines = [row for row in rows if row.pop("_outline_only", False)]
    unmatched = [row for row in rows if row.pop("_no_flair", False)]
    if not unmatched:
        return None
    given = "the DICOM study given" if len(unmatched) == 1 else f"any of the {len(unmatched)} DICOM studies given"
    if series and len(unmatched) >= len(studies):
        why, told = f"--series {series!r} matches no series in any study given", f"--series {series!r} matches no series in {given}"
    elif len(unmatched) + sum(bool(row.get("_mask")) for row in rows) == len(rows) and len(outlines) == len(unmatched):
        # each study DeepWML's outline series alone, each row saying so: no --series would find a FLAIR there
        why = "no study given holds a scan"
        told = (("the DICOM study given holds" if len(unmatched) == 1 else f"each of the {len(unmatched)} DICOM "
                 "studies given holds") + " only DeepWML's outline series (an earlier run's --dicom-outline output, "
                "not a scan), so nothing was segmented; give the folder of the FLAIR scans they were drawn from")
    elif len(unmatched) + sum(bool(row.get("_mask")) for row in rows) == len(rows):
        why = "no study given holds a series that looks like a FLAIR"
        told = (f"no series looks like a FLAIR in {given}, so nothing was segmented" +
                (f"; if one is, choose it with {choose}" if choose else ""))
    else:
        return None
    for row in unmatched:
        row.update(status="error", error=f"{row['error']}; {why}")
    return f"{told}; see summary.csv for their series"


def batch_total(rows: Sequence[dict], noun: str, summary: Path) -> str:
    """A batch's last line, worded alike by `deepwml segment`, the Slicer batch script and `deepwml change
    --manifest`: what this run did, failed and skipped (done before, or a study without a FLAIR), so that a
    rerun that only skipped does not read as all done."""
    done = sum(r["status"] == "ok" for r in rows)
    failed = sum(r["status"] == "error" for r in rows)
    added = sum(r["status"] == ADDED for r in rows)  # done before, outputs added: said only when there are such
    more = f", {added} done before with outputs added" if added else ""
    return (f"{done}/{len(rows)} {noun} done ({failed} failed, {len(rows) - done - failed - added} skipped{more}), "
            f"summary in {summary}")


def summary_seconds(row: dict) -> float | None:
    """summary.csv's seconds for a case's row: None (empty) for a case skipped, which this run did not segment (done
    before, a label mask found, left to another run), or done before with outputs added (ADDED), else its time, a failed case's until it failed (a mask or a
    study without a FLAIR made an error at the end of the run keeps its): `deepwml segment` and the batch script
    alike."""
    return None if row.get("status") in ("skipped", ADDED) else row.get("seconds")


def write_summary(rows: Sequence[dict], path: Path) -> None:
    text = io.csv_text(SUMMARY_COLUMNS, map(_summary_cells, rows))
    io.write_csv_text(text, path, unless_held=True)  # the end of a run rewrites its last case's


def _summary_cells(row: dict) -> dict:
    return {**row, "seconds": summary_seconds(row), "warnings": " | ".join(row.get("warnings") or [])}


class _Printable:
    """A text stream that writes a name that is not UTF-8 text (a Latin-1 byte in a file name) escaped, as
    Python's own stderr does, whatever stream it is given."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> None:
        self._stream.write(text.encode("utf-8", "backslashreplace").decode("utf-8"))

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _duration(seconds: float) -> str:
    """A rough duration for people: '40 s', '3 min', '2 h 05 min'."""
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = int(round(seconds / 60))
    return f"{minutes} min" if minutes < 90 else f"{minutes // 60} h {minutes % 60:02d} min"


class ProgressBar:
    """A one-line progress bar on stderr per case (plain lines when stderr is not a terminal: at each quarter, and
    when a step begins that had no line yet, so a log shows the steps after the networks rather than stopping at
    75 %; a network's "NAME: slice 84/255" is one step whatever its numbers). With `eta`,
    each finished case of a run of several also says about how long the rest will take (the mean time of
    the cases segmented so far times the cases left; a case skipped because it was done before takes no
    time and says nothing of the others, so it is not counted and its line says no time, nor does any
    line until one case has been segmented: a rerun after adding scans would otherwise promise "0 s left"; a
    case that failed is not counted either: a mask named as a scan, refused in 0.06 s, promised "0 s left for
    3 more"; nor is the time the first case segmented took to build the networks, which the others reuse: with
    PyTorch it took 1.5 s of a 2.2 s first case, 0.7 s each after). The cases left are those still to segment
    when `segment_cases` tells them (a row's `_to_segment`: not the label masks and segmentations it can tell among
    them), else all that follow."""

    def __init__(self, stream=None, width: int = 30, eta: bool = False):
        self.stream = _Printable(stream or sys.stderr)
        self.width = width
        try:  # a stream of another program's making (Slicer's console) may have no isatty, or be closed
            self.tty = bool(self.stream.isatty())
        except (AttributeError, ValueError):
            self.tty = False
        self.eta = eta
        self._started = None
        self._position = (0, 0)
        self._shown: set[int] = set()  # the numbers of the cases whose line was shown (finish)
        self._in_case = False  # a case begun (called) and its line not shown yet: else stopped between two
        self._last = None  # when the last case ended (or the first began)
        self._skipped = (0, 0.0)  # cases skipped so far and the time they took
        self._built = 0.0  # inference.building_seconds() when the case began
        self._one_off = None  # the seconds the first case segmented spent building the networks

    def __call__(self, number: int, total: int, case: str):
        if self._started is None:
            self._started = self._last = time.monotonic()
        if self.eta:
            from .inference import building_seconds

            self._built = building_seconds()
        self._position, self._in_case = (number, total), True
        prefix = f"[{number}/{total}] {case}"
        last = [-1]
        steps: set = set()  # the steps with a line (their messages without digits)

        def update(fraction: float, message: str) -> None:
            if self.tty:
                line = self._line(prefix, fraction, message)
                progress_line(self.stream, line, "\r" + line)
            else:  # quarter steps and new steps keep logs short
                step = re.sub(r"\d+", "", message)
                if int(fraction * 4) > last[0] or step not in steps:
                    last[0] = max(last[0], int(fraction * 4))
                    steps.add(step)
                    self.stream.write(f"{prefix}: {fraction:4.0%} {message}\n")

        return update

    @staticmethod
    def _columns() -> int:
        """The characters a line may take: one fewer than the terminal is wide (a line that fills the last column
        wraps on some terminals, Windows' console among them)."""
        return max(1, shutil.get_terminal_size((80, 24)).columns - 1)

    def _line(self, prefix: str, fraction: float, message: str) -> str:
        """The bar's line, fitted to the terminal: a line wider than it wrapped, and each update then began a new
        line instead of overwriting the last (97 characters on an 80-column terminal). The bar is shortened first
        (to 10 characters), then the message, then the line is cut."""
        columns = self._columns()
        prefix = prefix.encode("utf-8", "backslashreplace").decode("utf-8")  # as the stream writes it
        fixed = len(prefix) + len(" || 100% ")  # all but the bar and the message
        bar = max(min(self.width, 10), min(self.width, columns - fixed - BAR_MESSAGE_WIDTH))
        room = max(0, min(BAR_MESSAGE_WIDTH, columns - fixed - bar))
        filled = int(bar * fraction)
        line = f"{prefix} |{'#' * filled}{'.' * (bar - filled)}| {fraction:4.0%} {message[:room]:<{room}}"
        return line[:columns]

    def finish(self, row: dict) -> None:
        if self.tty:
            progress_line(self.stream, None, "\r" + " " * self._columns() + "\r")
        status = row["status"]
        detail = f"{row.get('volume_ml', 0):.2f} ml, {lesion_count_text(row.get('lesion_count', 0))}, {row.get('seconds', 0):.1f} s" \
            if status == "ok" else row.get("error", "")
        number, total = self._position
        self._shown.add(number)
        self._in_case = False
        left = ""
        if self.eta and self._started is not None:
            now = time.monotonic()
            if status != "ok":  # skipped, or failed (a mask among the scans is refused in a moment)
                self._skipped = (self._skipped[0] + 1, self._skipped[1] + now - self._last)
            elif self._one_off is None:
                from .inference import building_seconds

                self._one_off = building_seconds() - self._built
            self._last = now
            segmented = number - self._skipped[0]
            more = row.get("_to_segment", total - number)
            if 0 < number < total and segmented > 0 and status != "skipped" and more > 0:
                mean = (now - self._started - self._skipped[1] - self._one_off) / segmented
                left = f" ({_duration(mean * more)} left for {more} more)"
        self.stream.write(f"{row['case']}: {status} - {detail}{left}\n")
        for warning in row.get("warnings", []) if status == "ok" else []:  # a skipped case's are its earlier run's
            self.stream.write(f"{row['case']}: warning: {warning}\n")
        self.stream.flush()


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value < 0.5:
        raise argparse.ArgumentTypeError("must be in [0, 0.5)")
    return value


def probability(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError("must be between 0 and 1")
    return value


def register(subparsers) -> None:
    from .cli import add_debug_flag, help_path, non_negative_float, positive_int

    p = subparsers.add_parser(
        "segment", help="segment WMH in FLAIR volumes",
        description="Segment white matter hyperintensities. INPUT: an image file (.nii, .nii.gz, a .hdr + .img or "
                    ".hdr.gz + .img.gz NIfTI pair, .nrrd, .nhdr, .mha, .mhd), "
                    "a DICOM folder (a series, or a whole study: its FLAIR is picked), or a folder of image files "
                    "(directly inside it) and DICOM folders (nested any depth as PACS exports are); each image file, "
                    "and each DICOM study, is a case.")
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="FLAIR file(s), DICOM folder(s) or folder(s) of them")
    p.add_argument("-o", "--output-dir", required=True, metavar="OUTDIR")
    p.add_argument("--model", nargs="+", metavar="FILE", help="model file(s); several = ensemble (probabilities averaged). "
                   "The name of a shipped model or ensemble "
                   f"({help_path(models_dir() / 'models.json')}, e.g. ensemble-v8) stands "
                   "for its file(s); a file of that name wins. Default: the shipped default model")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--threshold", type=probability, help="probability threshold (default: from the model file)")
    p.add_argument("--tta", action="store_true", help="average with a left-right flipped prediction")
    p.add_argument("--grid-phases", type=int, default=1, choices=(1, 4),
                   help="4: average the lesion probabilities over the network grid moved by 0 and half a pixel along "
                        "rows and columns, for marks that depend less on where the slices happen to be sampled (fewer "
                        "small lesions that come and go between a patient's scans; about 4 times slower; README). "
                        "Default 1")
    p.add_argument("--save-probabilities", action="store_true", help="also write CASE_prob.nii.gz (or .nrrd, .mha: see --output-format)")
    p.add_argument("--output-format", default="same", choices=io.OUTPUT_FORMATS,
                   help="format of the image outputs: same (default): the input's own (.nii.gz for NIfTI, .nrrd for "
                        "NRRD and DICOM, .mha for MetaImage), so they lie on the input's exact grid; NIfTI keeps "
                        "the geometry in single precision")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs (default: keep them and skip the case "
                   "done before, adding only the optional outputs asked for that it lacks, from its saved mask)")
    p.add_argument("--min-lesion-mm3", type=non_negative_float, default=None,
                   help="remove 3D lesions smaller than this (default 5 mm³; 0 keeps all)")
    p.add_argument("--exclude-edge-slices", type=_fraction, default=0.0, metavar="FRACTION",
                   help="clear detections in the first/last FRACTION of axial slices (default 0: off)")
    p.add_argument("--brain-model", metavar="FILE", help="brain-mask model file: lesion components mostly outside "
                   "its intracranial mask are dropped, and the FLAIR and coverage checks and the intracranial volume "
                   "read it (default: the shipped brain-mask model)")
    p.add_argument("--no-brain-mask", action="store_true", help="keep marks outside the brain (no brain-mask gating); "
                   "the brain mask is still made for the checks (is it a FLAIR, is the whole brain in the scan)")
    p.add_argument("--save-brain-mask", action="store_true", help="also write CASE_brain.nii.gz (the intracranial mask used; "
                   "or .nrrd, .mha)")
    p.add_argument("--ventricle-model", metavar="FILE", help="lateral-ventricle model file for the periventricular/deep "
                   "split of the lesion volume (10 mm rule). Default: none runs; the shipped one, "
                   f"{help_path(models_dir() / SHIPPED_VENTRICLE_MODEL)}, is opt-in (it marks too little of real "
                   "ventricles: README)")
    p.add_argument("--no-location", action="store_true", help="no periventricular/deep split, even when the model "
                   "registry marks a ventricle model default")
    p.add_argument("--save-ventricle-mask", action="store_true", help="also write CASE_ventricles.nii.gz (the lateral "
                   "ventricles the split measured from; or .nrrd, .mha)")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="slices per network batch (default: 1 with OpenVINO or ONNX Runtime on the CPU, 4 with PyTorch on the CPU, 16 on a GPU)")
    p.add_argument("--backend", default="auto", choices=("auto", "openvino", "onnx", "torch"),
                   help="auto: on the CPU OpenVINO when installed, else ONNX Runtime, else PyTorch")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                   help="auto: bf16 with OpenVINO or PyTorch on a CPU that computes bf16 natively (AMX or "
                        "AVX512-BF16) where bf16 is measured faster than fp32 there (timed once, kept in the cache; "
                        "masks Dice >= 0.99 against fp32's on the real scans checked, see README), else fp32; "
                        "fp32 with ONNX Runtime; fp16 autocast on a GPU. fp32: exact fp32 everywhere")
    p.add_argument("--qc", action="store_true", help="also write CASE_qc.png: axial slices with the mask outlined in red, "
                   "to look a batch over without Slicer")
    p.add_argument("--dicom-outline", action="store_true", help="for a DICOM input, also write CASE_outline_dicom/: "
                   "the FLAIR with the lesions outlined in red as a new series of the same study (Secondary Capture, "
                   "on the input's slices), to read the result in a PACS viewer")
    p.add_argument("--dicom-seg", action="store_true", help="for a DICOM input, also write CASE_wmh_seg.dcm: the mask "
                   "as a DICOM Segmentation object (SEG) of the same study, a frame on each input slice, which PACS "
                   "viewers show as an overlay")
    p.add_argument("--series", metavar="TEXT", help="in a DICOM folder holding several series, the one whose series "
                   "number is TEXT, whose description is or contains TEXT (case-insensitive) or whose series UID is TEXT "
                   "(default: the only one that looks like a FLAIR by its description or inversion time); for an "
                   "export of several studies, it applies to every study")
    add_debug_flag(p)
    p.set_defaults(func=_run)


def _run(args) -> int:
    if not args.inputs:
        hint = (f"; --model takes every file after it, so it took {args.model[-1]}: put INPUT before --model"
                if args.model else "")
        raise UsageError(f"no INPUT given{hint}")
    args.model = model_files(args.model)  # a shipped name first: a folder of that name (OUTDIR) is not a model
    for path in args.model or []:  # INPUT given, and more after --model (`INPUT -o OUT --model a.pt INPUT2`)
        if io.is_image_file(path) or (os.path.isdir(path) and not is_run_folder(path)):
            raise UsageError(f"{path} is {'a folder' if os.path.isdir(path) else 'an image'}, not a model file: "
                             "--model takes every file after it; put INPUT before --model")
    if args.no_location and (args.ventricle_model or args.save_ventricle_mask):
        raise UsageError("--no-location cannot go with --ventricle-model or --save-ventricle-mask")
    if args.precision == "bf16" and args.backend == "onnx":
        raise UsageError("--precision bf16 runs with the openvino or torch backend, not onnx (fp32 only)")
    bar = ProgressBar(eta=True)
    try:
        rows = _segment_all(args, bar)
    except KeyboardInterrupt:  # Ctrl-C, SIGTERM: what was kept, and how to go on (main says it was stopped)
        say_stopped(bar, Path(args.output_dir) / "summary.csv", args.overwrite)
        raise
    _Printable(sys.stderr).write(batch_total(rows, "cases", Path(args.output_dir) / "summary.csv") + "\n")
    return 1 if any(r["status"] == "error" for r in rows) else 0


def say_stopped(bar: ProgressBar, summary: Path, overwrite: bool = False) -> None:
    """Where a run of several cases stopped part way (Ctrl-C, SIGTERM) was, what its `summary` (rewritten after
    each case) keeps, and how to go on, on the bar's stream (its line on a terminal ended first): `deepwml
    segment` and the Slicer batch script alike. Nothing before the first case began. With --overwrite (`overwrite`)
    the same command would redo the cases done too: it is left out to go on (none done yet: the same command). A case whose line was shown already
    is one left to another process, done again at the end of the run (recheck_left_to_another): every case is
    listed by then, that one as left to the other process. Stopped between two cases (summary.csv being
    rewritten), it lists those whose line was shown."""
    number, total = bar._position
    if total:
        # none finished (stopped in the first): nothing this run did would be done again, so --overwrite stays
        go_on = ("run the same command again to go on" if not bar._shown else
                 "run it again without --overwrite to go on (the cases done are skipped; a case not reached yet whose "
                 "earlier outputs were made with other settings is then refused, naming them: give it alone with "
                 "--overwrite)" if overwrite else "run the same command again to go on (the cases done are skipped)")
        if not bar._in_case:
            kept = f"stopped after {len(bar._shown)} of {total} cases: {summary} lists them"
        elif number in bar._shown:
            kept = (f"stopped in case {number}/{total}, which another DeepWML process had left, being done at the end "
                    f"of the run: {summary} lists all {total} cases, that one as left to the other process")
        elif number == 1:
            kept = f"stopped in case 1/{total}, before any case was finished"
        else:
            kept = f"stopped in case {number}/{total}: {summary} lists the {number - 1} before it"
        end_progress_line()
        bar.stream.write(f"{kept}; {go_on}\n")
        bar.stream.flush()


def _segment_all(args, bar: ProgressBar) -> list[dict]:
    return segment_cases(
        args.inputs, args.output_dir, args.model, args.device, progress_factory=bar, debug=args.debug,
        threshold=args.threshold, tta=args.tta, grid_phases=args.grid_phases, save_probabilities=args.save_probabilities,
        overwrite=args.overwrite, min_lesion_mm3=args.min_lesion_mm3,
        exclude_edge_fraction=args.exclude_edge_slices, batch_size=args.batch_size, backend=args.backend,
        precision=args.precision, output_format=args.output_format, qc=args.qc, series=args.series,
        dicom_outline=args.dicom_outline, dicom_seg=args.dicom_seg,
        brain_model=args.brain_model or "default", brain_gate=not args.no_brain_mask, save_brain_mask=args.save_brain_mask,
        ventricle_model=None if args.no_location else (args.ventricle_model or "default"),
        save_ventricle_mask=args.save_ventricle_mask)
