"""`deepwml adapt`: a model's batch-norm statistics re-estimated on a site's unlabelled scans (AdaBN).

A network with batch normalisation scales every layer by means and variances it learnt on its
training images. On scans of another kind (another scanner or protocol, or real scans after synthetic
training) the layers see other statistics than they were set for. AdaBN (Li et al. 2016, "Revisiting
batch normalization for practical domain adaptation") keeps every weight and replaces only those
statistics by the ones the layers see on scans of the new kind. No labels are needed.

The statistics must be measured on images like the ones the network was trained on, apart from the
change of scan: the shipped networks were trained on 128-pixel crops, half of them centred on a
lesion, and statistics of whole slices, even of their own synthetic kind, cost v5 0.13 of pooled Dice
(Resources/Models/README.md, session 13, run A). So every head slice is prepared exactly as `deepwml
segment` prepares it, and crops are drawn as the model's training drew them (its `patch_size` and
`lesion_fraction`, from the training configuration recorded in the model file): that share from slices
with lesion, centred on a random lesion pixel, the rest at random on slices without. The lesions are
the scans' own probable ones, where the models' averaged probability is at least 0.5. Then the
batch-norm layers are set one after the other, in the order the network runs them: each layer's mean
and variance over all crops and pixels, with every earlier layer already set (the exact population
figures, not running averages over batches). Each adapted model is written as a new model file whose
provenance records the scans' slice counts (not their names: a scan's file or folder name may be the
patient's, and model files are shared), the crops and the model it came from.

This is how the ensemble v8 (the default before v9) was made from v7 (run A2): on five real clinical
FLAIRs, median Dice on the labelled cases rose from 0.739 to 0.762 at 5 mm. Check an adapted model on
cases you can judge before relying on it.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .cli import progress_line, say
from .errors import DeepWMLError

# Fewer slices than this give noisy statistics for the deepest layers (a warning, not an error).
FEW_SLICES = 60
# Below this many head slices the statistics of the deepest layers come from a handful of values: on one
# slice of a clinical scan the adapted ensemble marked 2-3 times the volume on other scans (session 17).
MIN_SLICES = 20
# A share of crops centred on lesions and a crop size for models whose training settings are unknown.
DEFAULT_LESION_SHARE = 0.5


class _Stop(Exception):
    """Raised inside a forward pass once the layer being measured has been reached."""


def _head_slices(image, preprocessing) -> tuple[np.ndarray, int]:
    """The image's slices with head, as the network sees them ([n, H, W] float32), and its slice count."""
    from . import io
    from .preprocessing import plan_volume

    stack, frame = io.to_axial_stack(image)
    plan = plan_volume(stack, frame, {preprocessing})
    if not plan.kept.size:
        return np.zeros((0, *preprocessing.grid_size), np.float32), int(stack.shape[0])
    return plan.network_slices(stack, plan.kept, preprocessing).astype(np.float32, copy=False), int(stack.shape[0])


def network_slices(paths: Sequence, preprocessing, found: frozenset = frozenset(), log=None,
                   named: frozenset = frozenset(), flair_check: Callable | None = None,
                   allow_non_flair: bool = False,
                   progress: Callable[[str, int, int], None] | None = None) -> tuple[np.ndarray, list[dict]]:
    """All head slices of the scans, as the network sees them ([n, H, W] float32), and per scan facts, in the order
    of the scans' voxel digests (the same scans in any order give the same slices).
    A scan is a path, or (a DICOM folder, the io.DicomSeries to read from it). A path of `found` (an image file
    found in a folder given, not named) that is a label mask is skipped, said to `log`, as deepwml segment
    skips it: a labelled case's folder (FLAIR and manual mask) failed the whole run on its mask. A path of `named`
    (named beside other inputs: a shell glob, data/p07/*, names the mask beside the FLAIR) is skipped so too, with
    a warning, once a scan is read; when every image is a mask, that is the error.
    `flair_check(image)` (train's `flair_checker`), when given, judges each scan as `deepwml train` judges its
    cases: scans that do not look like a FLAIR are refused, naming them, once every scan is read (their statistics
    would spoil the adapted model for every later patient), or with `allow_non_flair` adapted on, with a warning.
    A scan whose own header says it is not a FLAIR (its DICOM series', or the JSON sidecar, b-values or BIDS name
    beside its file: segment.scan_header_warnings) is warned of, naming it, as segment, change and train warn of it:
    the picture's check decides what is refused (a diffusion image may pass it).
    progress("reading scans", done, total) is called as each scan is read (or skipped): reading, the FLAIR check and
    the head slices take seconds a scan, minutes of silence for a few dozen scans."""
    import warnings

    import SimpleITK as sitk

    from . import io
    from .segment import scan_header_warnings

    chunks, facts, seen, skipped, named_skipped, checks = [], [], {}, 0, [], []
    paths = list(paths)
    for done, item in enumerate(paths):
        if progress:  # 0/n at once: the stage has begun
            progress("reading scans", done, len(paths))
        path, series = item if isinstance(item, tuple) else (item, None)
        try:
            image = io.read_image(path, series=series)
            io.check_volume(image)
        except io.LabelMaskGiven as exc:
            if series is not None or (path not in found and path not in named):
                raise
            skipped += 1
            if path in named:
                named_skipped.append(f"skipped {path}, given in --scans: looks like a label mask, not a FLAIR scan "
                                     f"({exc.values}): not used")
            elif log:
                log(f"{io.case_name(path)}: skipped - looks like a label mask, not a FLAIR scan ({exc.values}): not used")
            continue
        canonical = sitk.DICOMOrient(image, "LPS") if isinstance(image, sitk.Image) else image  # voxel order aside
        digest = hashlib.sha256(np.ascontiguousarray(io.voxels(canonical)).tobytes()).hexdigest()
        if digest in seen:  # the same voxels twice (one file listed twice, or in two formats or voxel orders)
            given = ("is given twice in --scans" if Path(path).resolve() == Path(seen[digest]).resolve()
                     else f"holds the same scan as {seen[digest]}")
            raise DeepWMLError(f"{path} {given}; give each scan once")
        seen[digest] = path
        for warning in scan_header_warnings(Path(path), series):  # said as each scan is read, naming it
            warnings.warn(f"{path}: {warning}", stacklevel=2)
        fact = {"scan": str(path)}  # as given: file names alone (sub-01/anat/FLAIR.nii.gz, ...) may all be one
        if flair_check is not None:
            checks.append((path, flair_check(image)))
            if checks[-1][1].get("looks_like") not in (None, "FLAIR"):
                fact["looks_like"] = checks[-1][1]["looks_like"]
        slices, total = _head_slices(image, preprocessing)
        chunks.append((digest, slices))
        facts.append((digest, {**fact, "slices": int(slices.shape[0]), "of": total}))
    if progress and paths:
        progress("reading scans", len(paths), len(paths))
    if skipped and not facts:
        if named_skipped:
            raise DeepWMLError("every image file given looks like a label mask or segmentation, not a FLAIR scan; "
                               "give the FLAIR scans")
        raise DeepWMLError("every image file found looks like a label mask or segmentation, not a FLAIR scan; give "
                           "the folder of the FLAIR scans")
    for text in named_skipped:
        warnings.warn(text, stacklevel=2)
    _judge_flair_checks(checks, allow_non_flair)
    # In the order of the scans' voxels, not the order given: the crops are drawn from the slices by their place, so
    # `--scans a b` and `--scans b a` (a folder, or a list in another order) gave two different models
    chunks = [c for _, c in sorted(chunks, key=lambda item: item[0]) if c.shape[0]]
    facts = [f for _, f in sorted(facts, key=lambda item: item[0])]
    if not chunks:
        raise DeepWMLError("none of the scans has a slice with head in it; nothing to adapt on")
    return np.concatenate(chunks), facts


def _judge_flair_checks(checks: list[tuple], allow_non_flair: bool) -> None:
    """Say which scans could not be judged, and refuse those that do not look like a FLAIR, naming each with what it
    looks like and why (with `allow_non_flair`, a warning naming them), as `deepwml train` does its cases."""
    import warnings

    from .contrast import why_not_flair

    unjudged = [(path, check) for path, check in checks if check.get("looks_like") is None]
    if unjudged:
        names = ", ".join(str(path) for path, _ in unjudged[:3]) + (", ..." if len(unjudged) > 3 else "")
        warnings.warn(f"whether {len(unjudged)} scan(s) are FLAIRs could not be checked ({names}: "
                      f"{unjudged[0][1]['not_judged']}); make sure they are FLAIRs", stacklevel=3)
    found = [(path, check["looks_like"], why_not_flair(check)) for path, check in checks
             if check.get("looks_like") not in (None, "FLAIR")]
    if found and allow_non_flair:
        warnings.warn(f"adapting on {len(found)} scan(s) that do not look like a FLAIR, as --allow-non-flair asks: "
                      + ", ".join(f"{path} ({looks})" for path, looks, _ in found), stacklevel=3)
    elif found:
        named = "; ".join(f"{path} looks {looks}: {why}" for path, looks, why in found[:2])
        more = (f"; and {len(found) - 2} more ({', '.join(str(path) for path, *_ in found[2:5])}"
                f"{', ...' if len(found) > 5 else ''})") if len(found) > 2 else ""
        raise DeepWMLError(f"{len(found)} scan(s) do not look like a FLAIR: {named}{more}; their statistics would "
                           "spoil the adapted model for every later scan: leave them out of --scans (check that each "
                           "is the FLAIR series), or pass --allow-non-flair to adapt on them when you know better")


def pseudo_lesions(slices: np.ndarray, model_paths: Sequence[str | Path], threshold: float = 0.5,
                   batch_size: int = 8, progress: Callable[[str, int, int], None] | None = None,
                   names: Sequence[str] | None = None) -> np.ndarray:
    """[n, H, W] bool: where the given models' averaged probability is at least `threshold` (the
    unlabelled scans' own probable lesions, to centre crops on as training centred them on lesions).
    names: the models' names in the progress lines (None: their file names)."""
    import torch

    from .checkpoint import load_model

    total = np.zeros(slices.shape, np.float32)
    for path, name in zip(model_paths, names or [Path(p).name for p in model_paths]):
        model = load_model(path).model.eval()
        with torch.inference_mode():
            for start in range(0, slices.shape[0], batch_size):
                x = torch.from_numpy(np.ascontiguousarray(slices[start:start + batch_size, None]))
                total[start:start + batch_size] += torch.sigmoid(model(x))[:, 0].numpy()
                if progress:
                    progress(f"finding lesions with {name}", min(start + batch_size, slices.shape[0]),
                             slices.shape[0])
    return total / len(model_paths) >= threshold


def matched_crops(slices: np.ndarray, lesions: np.ndarray, size: int, per_slice: int = 4,
                  lesion_share: float = 0.5, seed: int = 0) -> np.ndarray:
    """Crops drawn as `deepwml train --patch-size SIZE --lesion-fraction SHARE` draws them: a share of
    the crops from slices with lesion, each centred as training centres it (on a random lesion pixel),
    the rest from slices without, placed at random. [per_slice * n, size, size] float32."""
    import torch

    from .train import random_crops

    rng = np.random.default_rng(seed)
    with_lesion = np.flatnonzero(lesions.reshape(lesions.shape[0], -1).any(axis=1))
    without = np.setdiff1d(np.arange(slices.shape[0]), with_lesion)
    n = per_slice * slices.shape[0]
    n_lesion = int(round(n * lesion_share)) if with_lesion.size else 0
    if not without.size:
        n_lesion = n
    picks = np.concatenate([rng.choice(with_lesion, n_lesion) if n_lesion else np.zeros(0, int),
                            rng.choice(without, n - n_lesion) if n > n_lesion else np.zeros(0, int)])
    images = torch.from_numpy(np.ascontiguousarray(slices[picks, None]))
    labels = torch.from_numpy(np.ascontiguousarray(lesions[picks, None]).astype(np.float32))
    crops, _ = random_crops(images, labels, size, rng)
    return crops[:, 0].numpy()


def _norm_layers_in_run_order(model, sample) -> list:
    import torch
    from torch import nn

    order, handles = [], []
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            handles.append(module.register_forward_pre_hook(lambda m, inputs: order.append(m)))
    try:
        with torch.inference_mode():
            model(sample)
    finally:
        for h in handles:
            h.remove()
    seen, layers = set(), []
    for m in order:  # a layer used twice counts once, where it first runs
        if id(m) not in seen:
            seen.add(id(m))
            layers.append(m)
    return layers


def adaptation_summary(provenance: dict) -> dict | None:
    """What `deepwml segment`'s report says of a model `deepwml adapt` made (None for one not adapted): how many
    scans and head slices it was adapted on, and the model it came from (its name, and its checksum as reports
    give one). A record of a version before the per-scan list (ensemble v8's members) gives the scans' count."""
    record = provenance.get("adapted_batch_norm")
    if not isinstance(record, dict):
        return None
    scans = record.get("scans")
    summary = {"scans": len(scans) if isinstance(scans, list) else scans, "slices": record.get("slices"),
               "from_model": record.get("from_model"), "from_sha256": record.get("from_digest")}
    looked = record.get("not_flair_scans")  # kept where the scans' list is a count (the settings' cache)
    if not isinstance(looked, int):
        looked = len([s for s in scans if isinstance(s, dict) and s.get("looks_like")] if isinstance(scans, list) else [])
    if looked:  # adapted on with --allow-non-flair
        summary["not_flair_scans"] = looked
    return summary


def adapt_batch_norm(model, slices: np.ndarray, batch_size: int = 8,
                     progress: Callable[[float, int], None] | None = None) -> int:
    """Set every batch-norm layer's running mean and variance to the population figures over `slices`
    ([n, H, W] network inputs), layer by layer in run order; returns the number of layers set.
    progress(done, layers) is called as each batch passes: `done` the layers done so far, a fraction of a layer
    while its batches pass (a layer over a cohort's crops is a pass over all of them: a minute or more on a busy
    CPU), the whole number `number` when the layer `number` is set."""
    import torch

    model.eval()
    if slices.ndim != 3 or slices.shape[0] == 0:
        raise DeepWMLError("adapting needs at least one slice")
    layers = _norm_layers_in_run_order(model, torch.from_numpy(slices[:1, None]))
    if not layers:
        raise DeepWMLError("the model has no batch normalisation; there are no statistics to adapt")
    for number, layer in enumerate(layers, start=1):
        total = sq = None
        count = 0

        def measure(module, inputs):
            nonlocal total, sq, count
            x = inputs[0].detach().double()
            s, q = x.sum(dim=(0, 2, 3)), (x * x).sum(dim=(0, 2, 3))
            total = s if total is None else total + s
            sq = q if sq is None else sq + q
            count += x.shape[0] * x.shape[2] * x.shape[3]
            raise _Stop

        handle = layer.register_forward_pre_hook(measure)
        try:
            with torch.inference_mode():
                for start in range(0, slices.shape[0], batch_size):
                    try:
                        model(torch.from_numpy(np.ascontiguousarray(slices[start:start + batch_size, None])))
                    except _Stop:
                        pass
                    if progress and start + batch_size < slices.shape[0]:  # the layer's last batch: set, below
                        progress(number - 1 + (start + batch_size) / slices.shape[0], len(layers))
        finally:
            handle.remove()
        mean = total / count
        var = torch.clamp(sq / count - mean * mean, min=0.0)
        with torch.no_grad():
            layer.running_mean.copy_(mean.to(layer.running_mean.dtype))
            layer.running_var.copy_(var.to(layer.running_var.dtype))
            if layer.num_batches_tracked is not None:
                layer.num_batches_tracked.zero_()
        if progress:
            progress(number, len(layers))
    return len(layers)


def adapt_batch_norm_one_pass(model, crops: np.ndarray) -> int:
    """`adapt_batch_norm` in a single forward pass: all `crops` ([n, H, W]) go through the network as one
    batch, and each batch-norm layer, just before it runs, takes the mean and variance of its input over
    the whole batch. Layers run in order, so every layer sees the earlier ones already set: the same
    population figures as layer by layer, at the cost of one pass instead of one per layer, and of
    holding the whole batch's activations (meant for one scan's crops, not a cohort's)."""
    import torch
    from torch import nn

    model.eval()
    if crops.ndim != 3 or crops.shape[0] == 0:
        raise DeepWMLError("adapting needs at least one slice")
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not layers:
        raise DeepWMLError("the model has no batch normalisation; there are no statistics to adapt")

    def set_statistics(module, inputs):
        x = inputs[0].detach().double()
        mean = x.mean(dim=(0, 2, 3))
        var = torch.clamp((x * x).mean(dim=(0, 2, 3)) - mean * mean, min=0.0)
        module.running_mean.copy_(mean.to(module.running_mean.dtype))
        module.running_var.copy_(var.to(module.running_var.dtype))
        if module.num_batches_tracked is not None:
            module.num_batches_tracked.zero_()

    handles = [layer.register_forward_pre_hook(set_statistics) for layer in layers]
    try:
        with torch.inference_mode():
            model(torch.from_numpy(np.ascontiguousarray(crops[:, None], dtype=np.float32)))
    finally:
        for h in handles:
            h.remove()
    return len(layers)


def adapt_to_scan(image, models, per_slice: int = 4, seed: int = 0, threshold: float = 0.5,
                  device: str = "cpu", backend: str = "auto", precision: str = "auto") -> list:
    """Copies of `models` (LoadedModel) with their batch-norm statistics re-estimated on this scan alone
    (test-time AdaBN): as `deepwml adapt` on the one scan, crops drawn as each model's training drew
    them, centred on the scan's own probable lesions (the models' averaged probability >= `threshold`
    on the network grid). The copies live in memory (no file, so they run with PyTorch) and leave the
    given models untouched. Experimental: see Resources/Models/README.md, session 14."""
    import copy

    from .checkpoint import LoadedModel
    from .inference import make_runner, predict_network_slices

    configs = {m.preprocessing for m in models}
    if len(configs) > 1:
        raise DeepWMLError("the models do not share one preprocessing (grid and spacing)")
    config = configs.pop()
    slices, _ = _head_slices(image, config)
    if not slices.shape[0]:
        raise DeepWMLError("the scan has no slice with head in it; nothing to adapt on")
    total = np.zeros(slices.shape, np.float32)
    for loaded in models:
        runner = make_runner(loaded, device, backend, precision)
        total += predict_network_slices(slices, runner, runner.default_batch_size)
    lesions = total / len(models) >= threshold
    adapted = []
    for loaded in models:
        size, share = crop_settings(loaded)
        crops = matched_crops(slices, lesions, size, per_slice, share, seed)
        network = copy.deepcopy(loaded.model)
        adapt_batch_norm_one_pass(network, crops)
        provenance = dict(loaded.provenance)
        provenance["adapted_to_scan"] = {"from_model": loaded.name, "slices": int(slices.shape[0]),
                                         "crops": int(crops.shape[0]), "crop_size": size, "lesion_share": share}
        copy_ = LoadedModel(loaded.config, loaded.preprocessing, loaded.threshold, loaded.labels, provenance,
                            model=network)
        copy_.name = f"{loaded.name} (adapted to the scan)"
        adapted.append(copy_)
    return adapted


def crop_settings(loaded) -> tuple[int, float]:
    """(crop size, share of lesion-centred crops) as the model's training drew its samples: its recorded
    `patch_size` (None: whole slices) and `lesion_fraction` (None: 0.5)."""
    config = loaded.provenance.get("training_config") or {}
    grid = tuple(loaded.preprocessing.grid_size)
    size = config.get("patch_size") or min(grid)
    share = config.get("lesion_fraction")
    share = DEFAULT_LESION_SHARE if share is None else float(share)
    if not 0 < size <= min(grid):
        size = min(grid)
    return int(size), share


def _grid_text(preprocessing) -> str:
    rows, cols = preprocessing.grid_size
    spacing = preprocessing.grid_spacing_mm
    return f"{rows}x{cols} px " + ("fitted to the slice" if spacing is None else f"at {spacing:g} mm")


def grids_differ(adapted: Sequence, pseudo: Sequence, pseudo_given: bool) -> str:
    """adapt_models' refusal of models (settings) that do not share one preprocessing: the slices and the lesions are
    computed once, on the grid of the models adapted. Models adapted on two grids go in separate runs (each with
    --pseudo-models of its grid, when given); --pseudo-models alone on another grid need replacing, which separate
    runs would not mend."""
    grids = {s.preprocessing for s in adapted}
    if len(grids) > 1:
        listed = "; ".join(f"{s.name}: {_grid_text(s.preprocessing)}" for s in adapted)
        return (f"the models do not share one preprocessing (grid and spacing) ({listed}); adapt them in separate runs"
                + (", each with --pseudo-models of its grid" if pseudo_given else ""))
    grid = grids.pop()
    other = [s for s in pseudo if s.preprocessing != grid]
    listed = ", ".join(f"{s.name} ({_grid_text(s.preprocessing)})" for s in other)
    return (f"--pseudo-models {listed} do not share the preprocessing (grid and spacing) of the models adapted "
            f"({_grid_text(grid)}), on whose slices their marks are found; give --pseudo-models of that grid, or leave "
            "--pseudo-models out for the models adapted to mark the lesions themselves")


def adapt_models(model_paths: Sequence[str | Path], scans: Sequence[str | Path], out_paths: Sequence[str | Path],
                 pseudo_models: Sequence[str | Path] | None = None, per_slice: int = 4, seed: int = 0,
                 fp16: bool = True, batch_size: int = 8, progress=None, log=None,
                 found: frozenset = frozenset(), named: frozenset = frozenset(), flair_check: Callable | None = None,
                 allow_non_flair: bool = False) -> list[dict]:
    """Adapt each model file on `scans` and write it to the matching `out_paths`; returns a summary per model. Each
    argument of paths (str or pathlib.Path) may be one path alone.

    pseudo_models: the models whose averaged marks (>= 0.5) are the scans' lesions for centring crops
    (None: the models being adapted). All must share one preprocessing (grid); the slices and the
    lesions are computed once. found: scans found in a folder given, and named: scans named beside other inputs,
    skipped when label masks, and flair_check, allow_non_flair: scans that do not look like a FLAIR refused (or, with
    allow_non_flair, adapted on) (network_slices).
    progress(what, done, total) is called as the scans are read ("reading scans", scans), as the lesions are found
    ("finding lesions with <model>", slices) and as each model's layers are set (its name, layers)."""
    from .checkpoint import file_digest, load_model, load_model_settings, model_payload, save_torch
    from .io import write_atomically

    # one path given alone is that file, not its name's characters (a scan's first "/": the root folder)
    model_paths, scans, out_paths = ([given] if isinstance(given, (str, os.PathLike)) else given
                                     for given in (model_paths, scans, out_paths))
    if isinstance(pseudo_models, (str, os.PathLike)):
        pseudo_models = [pseudo_models]
    if len(model_paths) != len(out_paths):
        raise DeepWMLError("one output path per model is needed")
    if per_slice < 1:
        raise DeepWMLError("crops per slice must be at least 1")
    from .model import validate_config
    from .segment import is_brain_model, name_apart

    pseudo_given, pseudo_models = pseudo_models, list(pseudo_models or model_paths)
    settings = [load_model_settings(p) for p in [*model_paths, *pseudo_models]]
    name_apart(settings)  # an ensemble's model_0/best.pt, model_1/best.pt: told apart in every line and record
    pseudo_names = [s.name for s in settings[len(model_paths):]]
    for number, s in enumerate(settings):
        if is_brain_model(s):
            named = f"{s.name} is" if number < len(model_paths) else f"{s.name} (--pseudo-models) is"
            what = "adapt WMH models" if number < len(model_paths) else "give WMH models"
            raise DeepWMLError(f"{named} a brain-mask model; {what}, whose marks centre the crops")
    for s in settings[:len(model_paths)]:  # refused before the scans are read and segmented (minutes), not after
        if not validate_config(s.config)["batch_norm"]:
            raise DeepWMLError(f"{s.name}: the model has no batch normalisation; there are no statistics to adapt "
                               "(adapt a model trained with --batch-norm)")
    configs = {s.preprocessing for s in settings}
    if len(configs) > 1:
        raise DeepWMLError(grids_differ(settings[:len(model_paths)], settings[len(model_paths):], bool(pseudo_given)))
    preprocessing = configs.pop()
    slices, facts = network_slices(scans, preprocessing, found, log, named, flair_check, allow_non_flair, progress)
    not_flair = sum(1 for f in facts if f.get("looks_like"))  # adapted on with --allow-non-flair
    if log:  # which scan gave what: printed, never stored (the names may be patients')
        for fact in sorted(facts, key=lambda f: f["scan"]):
            log(f"{fact['scan']}: {fact['slices']} of {fact['of']} slices with head")
    if slices.shape[0] < MIN_SLICES:
        raise DeepWMLError(f"only {slices.shape[0]} slice(s) with head in the scans; the statistics need at least "
                           f"{MIN_SLICES} ({FEW_SLICES}+ advised): add scans of the same protocol")
    if log and slices.shape[0] < FEW_SLICES:  # said before the minutes of work, not after
        log(f"warning: only {slices.shape[0]} slices with head; the deepest layers' statistics may be noisy "
            f"(use more scans, {FEW_SLICES}+ slices)")
    if log:
        log(f"{slices.shape[0]} head slices from {len(facts)} scan{'s' * (len(facts) != 1)}; finding their probable "
            f"lesions with {len(pseudo_models)} model(s)")
    lesions = pseudo_lesions(slices, pseudo_models, batch_size=batch_size, progress=progress, names=pseudo_names)
    summaries, adapted = [], []
    for path, out, named_apart in zip(model_paths, out_paths, settings):
        loaded = load_model(path)
        loaded.name = named_apart.name
        size, share = crop_settings(loaded)
        crops = matched_crops(slices, lesions, size, per_slice, share, seed)
        layers = adapt_batch_norm(loaded.model, crops, batch_size,
                                  (lambda k, n, name=loaded.name: progress(name, k, n)) if progress else None)
        provenance = dict(loaded.provenance)
        earlier = provenance.pop("adapted_batch_norm", None)
        if earlier and log:  # adapting is not cumulative: the earlier scans leave no trace in the statistics
            log(f"{loaded.name} was adapted before (on {earlier.get('slices', '?')} slices); its statistics are "
                "replaced by these scans' own, not added to (the earlier record is kept in the file)")
        provenance["adapted_batch_norm"] = {
            **({"earlier": earlier} if earlier else {}),  # a model adapted before keeps that record
            "method": "AdaBN: population statistics of every batch-norm layer, layer by layer, weights unchanged",
            "from_model": loaded.name,
            "from_digest": file_digest(path),
            # no names: they may be patients'; what a scan looked like when adapted on with --allow-non-flair
            "scans": [{k: f[k] for k in ("slices", "of", "looks_like") if k in f} for f in facts],
            # their count too: the settings' cache (and an exported model) keep of a list of scans its length alone
            # (checkpoint.shareable_provenance), which segment's report (adaptation_summary) reads on every later run
            **({"not_flair_scans": not_flair} if not_flair else {}),
            "slices": int(slices.shape[0]),
            "measured_on": (f"{crops.shape[0]} crops of {size} px, {share:.0%} centred on pseudo-lesions of "
                            f"{', '.join(pseudo_names)} (seed {seed})"),
            "layers": layers,
        }
        adapted.append((out, loaded, provenance))
        summaries.append({"model": loaded.name, "output": str(out), "slices": int(slices.shape[0]),
                          "crops": int(crops.shape[0]), "crop_size": size, "lesion_share": share,
                          "layers": layers, "scans": facts})
    # Written together at the end: an interrupted run leaves no part of an ensemble to be used as a whole; every
    # member's file content is made first, so that one refused (weights float16 cannot store) leaves none either.
    payloads = [(out, model_payload(loaded.model, loaded.config, loaded.preprocessing, loaded.threshold, provenance,
                                    loaded.labels, fp16=fp16)) for out, loaded, provenance in adapted]
    for out, payload in payloads:
        write_atomically(out, lambda tmp, payload=payload: save_torch(payload, tmp))
    return summaries


# In a log (not a terminal), a line at least this often while a stage goes on, beside its quarters: a model's
# batch-norm layers said only at layers 5, 9, 14 and 18, minutes apart on a busy CPU (22 minutes for one scan).
PLAIN_EVERY_S = 30.0


class StageProgress:
    """Progress of `deepwml adapt` on a stream: one line rewritten in place on a terminal; in a log (not
    a terminal), a plain line per quarter of each stage, and one whenever PLAIN_EVERY_S have passed since the last
    line with the stage gone on, so that logs stay short and readable and never silent for minutes. `done` may be
    a fraction (a batch-norm layer part done: its batches passed), said as the layer at work and its share done.
    `clock`: seconds (time.monotonic; a test's own)."""

    def __init__(self, stream, clock: Callable[[], float] | None = None):
        import time

        self.stream = stream
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self._clock = clock or time.monotonic
        self._stage, self._quarter, self._said, self._last = None, -1, None, None
        self._drawn = 0  # the length of the line drawn on the terminal, not yet ended

    def __call__(self, name: str, k: float, n: int) -> None:
        what = name if name.startswith(("finding ", "reading ")) else f"{name}: batch-norm layer"
        whole = int(k) if k == int(k) else None
        # a share rounded down: 799 of a layer's 800 crops passed is "(99%)", not "(100%)" before the layer is set
        text = (f"{what} {whole}/{n}" if whole is not None
                else f"{what} {int(k) + 1}/{n} ({int(100 * (k - int(k)))}%)")
        if self.tty:  # blanks over what a longer line before left ("layer 4/18 (87%)", then "layer 4/18")
            rest = " " * max(self._drawn - len(text), 0)
            progress_line(self.stream, text if k < n else None, f"\r{text}{rest}" + ("\n" if k >= n else ""))
            self._drawn = 0 if k >= n else len(text)
        else:
            now = self._clock()
            if what != self._stage:
                self._stage, self._quarter, self._last = what, -1, None
            quarter = int(4 * k / max(n, 1))
            late = self._said is not None and now - self._said >= PLAIN_EVERY_S and k != self._last
            if quarter > max(self._quarter, 0) or late:  # the first line at a quarter done, or after a silence
                self._quarter = max(self._quarter, quarter)
                self._said, self._last = now, k
                self.stream.write(f"{text}\n")
            elif self._said is None:  # the silence is counted from the first call
                self._said = now
        self.stream.flush()


def register(subparsers) -> None:
    from .cli import add_debug_flag, non_negative_int, positive_int

    p = subparsers.add_parser(
        "adapt", help="fit a model's batch-norm statistics to your own unlabelled scans (AdaBN)",
        description="Re-estimate the batch-norm statistics of model files on unlabelled FLAIR scans of the kind "
                    "you will segment (your scanner and protocol); weights stay as they are. Writes one adapted "
                    "model file per model into the output folder, for `deepwml segment --model`. This is how the "
                    "ensemble v8 (the default before v9) was made from v7 on five clinical FLAIRs. Check the "
                    "adapted models on cases you can judge before relying on them.")
    p.add_argument("--scans", nargs="+", required=True, metavar="FILE",
                   help="unlabelled FLAIR volumes (NIfTI, NRRD, MHA, DICOM folders, or folders of such files); "
                        f"every slice with head is used ({FEW_SLICES}+ slices advised)")
    p.add_argument("-o", "--output-dir", required=True, help="folder for the adapted model files (<name>-adapted.pt)")
    p.add_argument("--model", nargs="+", metavar="FILE",
                   help="model file(s) to adapt, or the name of a shipped model or ensemble (e.g. ensemble-v8: "
                        "each of its members), as in deepwml segment (default: the shipped default model, or each "
                        "member of a default ensemble)")
    p.add_argument("--pseudo-models", nargs="+", metavar="FILE",
                   help="models (files, or shipped models' or ensembles' names) whose averaged marks (>= 0.5) are the scans' lesions for centring crops "
                        "(default: the models being adapted; of their grid and spacing, on whose slices they mark)")
    p.add_argument("--crops-per-slice", type=positive_int, default=4, help="crops drawn per head slice (default 4)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of the crop draw (default 0)")
    p.add_argument("--fp32", action="store_true", help="store fp32 weights (default: fp16, half the size)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="images per forward pass (default 8)")
    p.add_argument("--threads", type=positive_int, help="CPU threads for PyTorch")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--allow-non-flair", action="store_true",
                   help="adapt on scans the FLAIR check (deepwml segment's) calls T1-, T2- or PD-weighted (refused "
                        "otherwise, naming them: their statistics would spoil the model for every later scan)")
    add_debug_flag(p)
    p.set_defaults(func=_run)


def adapted_name(name: str) -> str:
    """The adapted file's name for a model named `name` (name_apart's: 'best.pt', 'model_0/best.pt', on Windows
    'D:/best.pt' or '//server/scans/best.pt' for members on two drives): its parts joined by '_', without the
    drive's colon, which no Windows file name may hold."""
    parts = [part for part in re.split(r"[/\\:]+", name) if part]
    return f"{Path('_'.join(parts)).stem}-adapted.pt"


def adapted_paths(models: Sequence[str | Path], out_dir: Path) -> list[Path]:
    """OUT_DIR/<name>-adapted.pt for each model file; members of one file name (deepwml train's RUN/model_0/best.pt,
    RUN/model_1/best.pt) by the folders that tell them apart, as segment names them: model_0_best-adapted.pt."""
    from types import SimpleNamespace

    from .segment import name_apart

    same: dict[str, str] = {}
    for m in models:
        found = os.path.normcase(os.path.abspath(m))
        if found in same:
            raise DeepWMLError(f"{m} is given twice in --model; give each model once")
        same[found] = str(m)
    named = [SimpleNamespace(name=Path(m).name, path=m) for m in models]
    name_apart(named)
    outputs = [out_dir / adapted_name(n.name) for n in named]
    if len(set(outputs)) < len(outputs):  # a file named as another's parts joined (model_0_best.pt beside model_0/best.pt)
        raise DeepWMLError("two model files would be adapted into files of the same name; adapt them into different "
                           "folders")
    return outputs


def _run(args) -> int:
    import torch

    from . import io
    from .segment import default_model_paths, expand_inputs, mask_input_skipped, model_files
    from .train import flair_checker

    if args.threads:
        torch.set_num_threads(args.threads)
    # a shipped model's or ensemble's name stands for its file(s), as in deepwml segment
    models = list(model_files(args.model) or default_model_paths())
    args.pseudo_models = model_files(args.pseudo_models, "--pseudo-models")
    out_dir = Path(args.output_dir)
    outputs = adapted_paths(models, out_dir)
    folders = [str(o) for o in outputs if o.is_dir()]  # --overwrite replaces files, not folders: said before the work
    if folders:
        raise DeepWMLError(f"{', '.join(folders)} {'is a folder' if len(folders) == 1 else 'are folders'}, where the "
                           "adapted model file is to be written; move it away or choose another output folder (-o)")
    existing = [str(o) for o in outputs if o.exists()]
    if existing and not args.overwrite:
        raise DeepWMLError(f"{', '.join(existing)} {'already exists' if len(existing) == 1 else 'already exist'}; "
                           "use --overwrite to replace")
    made = not out_dir.exists()
    progress = StageProgress(sys.stderr)

    scans = []  # a folder stands for the images in it, and each DICOM study below it for its FLAIR, as in segment
    named = {Path(raw).resolve() for raw in args.scans}
    # image files found in a folder given, or named beside other inputs: a label mask among them is skipped, as
    # segment skips it (mask_input_skipped); named alone, it is the error
    found, beside = set(), set()
    inputs = expand_inputs(args.scans)
    for case, path, study in inputs:
        if isinstance(study, DeepWMLError):  # a folder that could not be read
            raise study
        if study is None:
            scans.append(path)
            if path.is_file() and mask_input_skipped(path, named, len(inputs) == 1):
                (beside if path.resolve() in named else found).add(path)
            continue
        try:
            scans.append((path, io.choose_dicom_series(path, candidates=study.series, strict=True)[0]))
        except io.NoFlairSeries as exc:
            print(f"{case}: skipped - {exc}", file=sys.stderr)
    io.make_output_dir(out_dir)  # checked (writable) before the minutes of work

    try:
        summaries = adapt_models(models, scans, outputs, args.pseudo_models, args.crops_per_slice, args.seed,
                                 fp16=not args.fp32, batch_size=args.batch_size, progress=progress,
                                 log=say, found=frozenset(found), named=frozenset(beside),
                                 flair_check=flair_checker("auto", args.threads),
                                 allow_non_flair=args.allow_non_flair)
    except BaseException:
        if made and out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()  # a refused or interrupted run leaves no empty folder behind
        raise
    for s in summaries:
        print(f"{s['model']}: {s['layers']} batch-norm layers set from {s['crops']} crops of {s['crop_size']} px "
              f"({s['lesion_share']:.0%} on lesions) -> {s['output']}", file=sys.stderr)
    print(f"segment with them: deepwml segment <scans> -o <folder> --model {' '.join(s['output'] for s in summaries)}",
          file=sys.stderr)
    return 0
