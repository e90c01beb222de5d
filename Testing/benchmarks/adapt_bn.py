"""A model's batch-norm statistics re-estimated on unlabelled scans (AdaBN): session 13's run A.

An experiment, not a DeepWML command: on the shipped networks it does harm (Resources/Models/README.md,
"Session 13: run A"). They were trained on 128-pixel crops, half of them centred on a lesion, and
their statistics belong to that mix; statistics of whole slices, even of their own synthetic kind,
cost v5 0.13 of pooled Dice on set V. It would suit a network trained on whole slices.

    python Testing/benchmarks/adapt_bn.py --model M1.pt [M2.pt ...] --scans S1.nii.gz ... -o OUT_DIR

A network with batch normalisation scales every layer by means and variances it learnt on its
training images. When a site's scans differ from those (another scanner, another protocol, or real
scans after synthetic training), the layers see other statistics than they were set for. AdaBN (Li et
al. 2016, "Revisiting batch normalization for practical domain adaptation") keeps every weight and
replaces only those statistics by the ones the layers see on scans of the new kind. No labels needed.

Here every slice that `deepwml segment` would run (slices with head), prepared exactly as it prepares
them (normalisation and resampling to the model's grid), goes through the network, and the layers are
set one after the other in the order the network runs them: each layer's mean and variance are
computed over all slices and all pixels, with every earlier layer already set (the exact population
figures, not running averages over batches). The adapted model is written as a new model file;
its provenance records the scans, the slice count and the model it came from.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from DeepWMLLib.errors import DeepWMLError

# Fewer slices than this give noisy statistics for the deepest layers (a warning, not an error).
FEW_SLICES = 60


class _Stop(Exception):
    """Raised inside a forward pass once the layer being measured has been reached."""


def network_slices(paths: Sequence[str | Path], preprocessing) -> tuple[np.ndarray, list[dict]]:
    """All head slices of the scans, as the network sees them ([n, H, W] float32), and per scan facts."""
    from DeepWMLLib import io
    from DeepWMLLib.preprocessing import plan_volume

    chunks, facts = [], []
    for path in paths:
        image = io.read_image(path)
        io.check_volume(image)
        stack, frame = io.to_axial_stack(image)
        plan = plan_volume(stack, frame, {preprocessing})
        if plan.kept.size:
            chunks.append(plan.network_slices(stack, plan.kept, preprocessing).astype(np.float32, copy=False))
        facts.append({"scan": Path(path).name, "slices": int(plan.kept.size), "of": int(stack.shape[0])})
    if not chunks:
        raise DeepWMLError("none of the scans has a slice with head in it; nothing to adapt on")
    return np.concatenate(chunks), facts


def pseudo_lesions(slices: np.ndarray, model_paths: Sequence[str | Path], threshold: float = 0.5,
                   batch_size: int = 8) -> np.ndarray:
    """[n, H, W] bool: where the given models' averaged probability is at least `threshold` (the
    unlabelled scans' own probable lesions, to centre crops on as training centred them on lesions)."""
    import torch

    from DeepWMLLib.checkpoint import load_model

    total = np.zeros(slices.shape, np.float32)
    for path in model_paths:
        model = load_model(path).model.eval()
        with torch.inference_mode():
            for start in range(0, slices.shape[0], batch_size):
                x = torch.from_numpy(np.ascontiguousarray(slices[start:start + batch_size, None]))
                total[start:start + batch_size] += torch.sigmoid(model(x))[:, 0].numpy()
    return total / len(model_paths) >= threshold


def matched_crops(slices: np.ndarray, lesions: np.ndarray, size: int, per_slice: int = 4,
                  lesion_share: float = 0.5, seed: int = 0) -> np.ndarray:
    """Crops drawn as `deepwml train --patch-size SIZE --lesion-fraction SHARE` draws them: a share of
    the crops from slices with lesion, each centred as training centres it (on a random lesion pixel),
    the rest from slices without, placed at random. [per_slice * n, size, size] float32."""
    import torch

    from DeepWMLLib.train import random_crops

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


def adapt_batch_norm(model, slices: np.ndarray, batch_size: int = 8,
                     progress: Callable[[int, int], None] | None = None) -> int:
    """Set every batch-norm layer's running mean and variance to the population figures over `slices`
    ([n, H, W] network inputs), layer by layer in run order; returns the number of layers set."""
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


def adapt_model_file(model_path: str | Path, scans: Sequence[str | Path], out_path: str | Path,
                     fp16: bool = True, batch_size: int = 8, progress=None, crop: int | None = None,
                     pseudo_models: Sequence[str | Path] = (), per_slice: int = 4, lesion_share: float = 0.5,
                     seed: int = 0) -> dict:
    """Adapt one model file on `scans` and write the result to `out_path`; returns a summary.

    crop: None measures whole slices (run A); a size measures crops drawn as training drew them
    (`matched_crops`), centred on the lesions that `pseudo_models` find (run A2)."""
    from DeepWMLLib.checkpoint import file_digest, load_model, save_model

    loaded = load_model(model_path)
    slices, facts = network_slices(scans, loaded.preprocessing)
    n_slices = int(slices.shape[0])
    how = "whole slices"
    if crop:
        if not pseudo_models:
            raise DeepWMLError("crops need the models whose marks centre them (pseudo_models)")
        lesions = pseudo_lesions(slices, pseudo_models)
        slices = matched_crops(slices, lesions, crop, per_slice, lesion_share, seed)
        how = (f"{slices.shape[0]} crops of {crop} px, {lesion_share:.0%} centred on pseudo-lesions of "
               f"{', '.join(Path(p).name for p in pseudo_models)} (seed {seed})")
    layers = adapt_batch_norm(loaded.model, slices, batch_size, progress)
    provenance = dict(loaded.provenance)
    provenance["adapted_batch_norm"] = {
        "method": "AdaBN: population statistics of every batch-norm layer, layer by layer, weights unchanged",
        "from_model": loaded.name,
        "from_digest": file_digest(model_path),
        "scans": facts,
        "slices": n_slices,
        "measured_on": how,
        "layers": layers,
    }
    save_model(out_path, loaded.model, loaded.config, loaded.preprocessing, loaded.threshold, provenance,
               loaded.labels, fp16=fp16)
    return {"model": loaded.name, "output": str(out_path), "slices": n_slices, "layers": layers,
            "scans": facts}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Re-estimate the batch-norm statistics of model files on unlabelled FLAIR scans (AdaBN); "
                    "weights stay as they are. Writes <name>-adapted.pt per model into the output folder.")
    p.add_argument("--model", nargs="+", required=True, metavar="FILE", help="model file(s) to adapt")
    p.add_argument("--scans", nargs="+", required=True, metavar="FILE",
                   help="unlabelled FLAIR volumes; every slice with head is used")
    p.add_argument("-o", "--output-dir", required=True, help="folder for the adapted model files")
    p.add_argument("--fp32", action="store_true", help="store fp32 weights (default: fp16)")
    p.add_argument("--batch-size", type=int, default=8, help="slices per forward pass (default 8)")
    p.add_argument("--threads", type=int, help="CPU threads for PyTorch")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--crop", type=int, help="measure on crops of this size drawn as training drew them (run A2)")
    p.add_argument("--pseudo-models", nargs="+", default=[], metavar="FILE",
                   help="with --crop: models whose averaged marks (>= 0.5) centre the lesion crops")
    p.add_argument("--per-slice", type=int, default=4, help="with --crop: crops per slice (default 4)")
    p.add_argument("--lesion-share", type=float, default=0.5, help="with --crop: share of lesion-centred crops")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> int:
    import torch

    args = parse_args(argv)

    if args.batch_size < 1:
        raise DeepWMLError("--batch-size must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    outputs = [out_dir / f"{Path(m).stem}-adapted.pt" for m in args.model]
    if len(set(outputs)) < len(outputs):
        raise DeepWMLError("two model files have the same name; adapt them into different folders")
    existing = [str(o) for o in outputs if o.exists()]
    if existing and not args.overwrite:
        raise DeepWMLError(f"{', '.join(existing)} exist(s); use --overwrite to replace")
    for model, out in zip(args.model, outputs):
        def progress(k: int, n: int, name=Path(model).name) -> None:
            print(f"\r{name}: layer {k}/{n}", end="" if k < n else "\n", file=sys.stderr, flush=True)

        summary = adapt_model_file(model, args.scans, out, fp16=not args.fp32, batch_size=args.batch_size,
                                   progress=progress, crop=args.crop, pseudo_models=args.pseudo_models,
                                   per_slice=args.per_slice, lesion_share=args.lesion_share, seed=args.seed)
        if summary["slices"] < FEW_SLICES:
            print(f"warning: only {summary['slices']} slices with head; the statistics of the deepest layers "
                  f"may be noisy (use more scans, {FEW_SLICES}+ slices)", file=sys.stderr)
        print(f"{summary['model']}: {summary['layers']} batch-norm layers set from {summary['slices']} slices "
              f"of {len(summary['scans'])} scans -> {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except DeepWMLError as exc:
        print(f"adapt_bn: {exc}", file=sys.stderr)
        sys.exit(1)
