"""Experiment (session 15): test-time entropy minimisation of the batch-norm scales and shifts (Tent).

Tent (Wang et al., ICLR 2021, "Tent: fully test-time adaptation by entropy minimization") adapts a
trained network to unlabelled images of a new kind by changing only its batch-norm affine parameters
(each channel's scale and shift) so that its predictions on those images become more certain: the loss
is the mean binary entropy of the sigmoid map, no labels. Here it goes one step beyond `deepwml adapt`
(AdaBN, which set the statistics of v8's members): starting from v8's members, with their statistics
kept as they are (the layers stay in inference mode), the scales and shifts are optimised with Adam on
the same kind of crops AdaBN measured, drawn from the same unlabelled clinical FLAIRs as training drew
its crops (128 px, half centred on the scans' probable lesions, where the models being adapted average
at least 0.5). Every other weight is frozen. Each adapted member is written as a model file whose
provenance records how it was made.

    python Testing/benchmarks/adapt_entropy.py --model <v8's four files> --scans <the five scans> \\
        -o runs/tent --epochs 1 --lr 1e-3 --batch-size 16 --seed 0

Its rule and result are in Resources/Models/README.md ("Session 15: Tent").
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from DeepWMLLib.adapt import crop_settings, matched_crops, network_slices, pseudo_lesions  # noqa: E402
from DeepWMLLib.checkpoint import file_digest, load_model, load_model_settings, save_model  # noqa: E402


def binary_entropy(logits):
    """Mean binary entropy (nats) of sigmoid(logits), computed stably from the logits."""
    import torch
    import torch.nn.functional as F

    p = torch.sigmoid(logits)
    # H = -p log p - (1 - p) log(1 - p) = softplus(z) - p z, exact for any z
    return (F.softplus(logits) - p * logits).mean()


def affine_parameters(model) -> list:
    """The batch-norm layers' scale and shift tensors; every other parameter is frozen."""
    from torch import nn

    for p in model.parameters():
        p.requires_grad_(False)
    params = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
            for p in (m.weight, m.bias):
                p.requires_grad_(True)
                params.append(p)
    return params


def minimise_entropy(model, crops: np.ndarray, epochs: int = 1, lr: float = 1e-3, batch_size: int = 16,
                     seed: int = 0, log=print) -> list[float]:
    """Optimise the batch-norm affine parameters of `model` (inference-mode statistics) so that its
    predictions on `crops` ([n, H, W]) have less entropy; returns the mean entropy of each epoch."""
    import torch

    model.eval()
    params = affine_parameters(model)
    if not params:
        raise SystemExit("the model has no batch-norm affine parameters to adapt")
    optimiser = torch.optim.Adam(params, lr=lr)
    rng = np.random.default_rng(seed)
    history = []
    for epoch in range(epochs):
        order = rng.permutation(crops.shape[0])
        total, count = 0.0, 0
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            x = torch.from_numpy(np.ascontiguousarray(crops[idx, None], dtype=np.float32))
            loss = binary_entropy(model(x))
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
        history.append(total / count)
        log(f"  epoch {epoch + 1}: mean entropy during the pass {history[-1]:.5f}")
    for p in model.parameters():
        p.requires_grad_(False)
    return history


def mean_entropy(model, crops: np.ndarray, batch_size: int = 32) -> float:
    import torch

    model.eval()
    total = 0.0
    with torch.inference_mode():
        for start in range(0, crops.shape[0], batch_size):
            x = torch.from_numpy(np.ascontiguousarray(crops[start:start + batch_size, None], dtype=np.float32))
            total += float(binary_entropy(model(x))) * x.shape[0]
    return total / crops.shape[0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", nargs="+", required=True, help="the member files to adapt")
    ap.add_argument("--scans", nargs="+", required=True, help="unlabelled FLAIRs to adapt on")
    ap.add_argument("--pseudo-models", nargs="+", help="models whose marks centre the crops (default: --model)")
    ap.add_argument("-o", "--out-dir", required=True)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--per-slice", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    configs = {load_model_settings(p).preprocessing for p in args.model}
    if len(configs) != 1:
        raise SystemExit("the models do not share one preprocessing")
    t0 = time.perf_counter()
    slices, facts = network_slices(args.scans, configs.pop())
    lesions = pseudo_lesions(slices, args.pseudo_models or args.model)
    print(f"{slices.shape[0]} head slices from {len(facts)} scans; probable lesions found "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    for path in args.model:
        t1 = time.perf_counter()
        loaded = load_model(path)
        size, share = crop_settings(loaded)
        crops = matched_crops(slices, lesions, size, args.per_slice, share, args.seed)
        before = mean_entropy(loaded.model, crops)
        history = minimise_entropy(loaded.model, crops, args.epochs, args.lr, args.batch_size, args.seed)
        after = mean_entropy(loaded.model, crops)
        provenance = dict(loaded.provenance)
        provenance["entropy_minimisation"] = {
            "method": "Tent: batch-norm scales and shifts optimised to lower the mean binary entropy of the "
                      "predictions on unlabelled crops; statistics and every other weight unchanged",
            "from_model": loaded.name,
            "from_digest": file_digest(path),
            "scans": facts,
            "crops": f"{crops.shape[0]} crops of {size} px, {share:.0%} centred on pseudo-lesions (seed {args.seed})",
            "optimiser": f"Adam lr {args.lr}, batch {args.batch_size}, {args.epochs} epoch(s)",
            "entropy_before": round(before, 6),
            "entropy_after": round(after, 6),
        }
        target = out / f"{Path(path).stem}-tent.pt"
        save_model(target, loaded.model, loaded.config, loaded.preprocessing, loaded.threshold, provenance,
                   loaded.labels, fp16=True)
        print(f"{loaded.name}: entropy {before:.5f} -> {after:.5f} (per epoch {[round(h, 5) for h in history]}), "
              f"{time.perf_counter() - t1:.0f} s -> {target}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
