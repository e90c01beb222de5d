"""Dice of models on synthetic validation cases, end to end (each case segmented on its own grid).

    python Testing/benchmarks/synthetic_validation.py MANIFEST SPLIT --model A.pt [B.pt ...] [--split-name val]
        [--thresholds 0.3 0.4 0.5 ...] [--brain-model default|none|FILE] [--tta] [--json OUT]

Each --model entry is evaluated on its own; files joined with "+" (A.pt+B.pt) are one ensemble, their
probabilities averaged as `deepwml segment --model A.pt B.pt` does.

MANIFEST is a `deepwml synth` manifest (paths relative to its folder), SPLIT a CSV (case, split);
the cases of MANIFEST whose split is --split-name are segmented with each model (threshold and
post-processing as `deepwml segment`) and compared with their painted masks. Prints per model the
median and mean per-case Dice and the Dice of all voxels pooled. Mask value 2 (a real background's
own probable lesions, `deepwml synth --backgrounds`) is ignored: neither lesion nor background. This is how the shipped model was
chosen (see Resources/Models/README.md): on synthetic validation cases only.

With --thresholds, the same figures at each probability threshold as well (the same probability
maps, thresholded and cleaned of small components as `deepwml segment` does): how a model's
threshold can be chosen on synthetic validation data.

--brain-model: the brain-mask gate, as `deepwml segment` (default: the shipped one, if any; none:
no gate; or a brain-mask model file).

--adapt-to-scan: each case first re-estimates the models' batch-norm statistics on itself
(`DeepWMLLib.adapt.adapt_to_scan`, experimental; the networks then run in PyTorch).

--tta: each model is evaluated twice, without and with test-time flipping (`deepwml segment --tta`),
reported as MODEL and MODEL@tta.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from DeepWMLLib.adapt import adapt_to_scan as scan_adapted  # noqa: E402
from DeepWMLLib.metrics import IGNORE_LABEL  # noqa: E402
from DeepWMLLib.postprocessing import DEFAULT_MIN_LESION_MM3, postprocess  # noqa: E402
from DeepWMLLib.segment import load_brain_model, load_models, segment_image  # noqa: E402


def _summary(dices: list, tp: int, fp: int, fn: int) -> dict:
    return {"median_dice": float(np.median(dices)), "mean_dice": float(np.mean(dices)),
            "pooled_dice": 2 * tp / max(1, 2 * tp + fp + fn)}


def case_counts(predicted: np.ndarray, mask: np.ndarray) -> tuple[float, int, int, int]:
    """(Dice, true positive, false positive, false negative voxels) of a prediction against a painted
    mask with the labels of `DeepWMLLib.metrics`: 1 lesion, 2 ignore (a real background's own probable
    lesions, `deepwml synth --backgrounds`), removed from prediction and reference alike."""
    keep = mask != IGNORE_LABEL
    reference = mask == 1
    predicted = predicted & keep
    tp = int((predicted & reference).sum())
    fp = int((predicted & ~reference).sum())
    fn = int((~predicted & reference).sum())
    total = 2 * tp + fp + fn
    return (1.0 if total == 0 else 2 * tp / total), tp, fp, fn


def evaluate(manifest: Path, split: Path, models: list[str], split_name: str = "val",
             thresholds: list[float] = (), brain_model: str = "default", tta: bool = False,
             adapt_to_scan: bool = False) -> dict:
    assignment = {r["case"]: r["split"] for r in csv.DictReader(open(split, newline="", encoding="utf-8-sig"))}
    rows = [r for r in csv.DictReader(open(manifest, newline="", encoding="utf-8-sig")) if assignment.get(r["case"]) == split_name]
    if not rows:
        raise SystemExit(f"no case of {manifest} is in split {split_name!r} of {split}")
    results = {}
    runs = [(model, False) for model in models] + ([(model, True) for model in models] if tta else [])
    for model, flipped in runs:
        loaded = load_models(model.split("+"))
        brain = load_brain_model(None if brain_model == "none" else brain_model)
        counts = {t: ([], 0, 0, 0) for t in (None, *thresholds)}  # None: the model's own threshold
        for r in rows:
            image = sitk.ReadImage(str(manifest.parent / r["flair"]), sitk.sitkFloat32)
            mask = sitk.GetArrayFromImage(sitk.ReadImage(str(manifest.parent / r["mask"])))
            networks = scan_adapted(image, loaded) if adapt_to_scan else loaded
            result = segment_image(image, networks, device="cpu", brain_model=brain, tta=flipped)
            probabilities = sitk.GetArrayFromImage(result.probabilities)
            inside = None if result.brain is None else sitk.GetArrayFromImage(result.brain).astype(np.float32)
            voxel_mm3 = float(np.prod(image.GetSpacing()))
            for t, (dices, tp, fp, fn) in counts.items():
                if t is None:
                    predicted = sitk.GetArrayFromImage(result.mask) > 0
                else:
                    predicted = postprocess(probabilities, t, voxel_mm3, DEFAULT_MIN_LESION_MM3,
                                            brain_probabilities=inside) > 0
                dice, case_tp, case_fp, case_fn = case_counts(predicted, mask)
                dices.append(dice)
                counts[t] = (dices, tp + case_tp, fp + case_fp, fn + case_fn)
        dices = counts[None][0]
        results[model + ("@tta" if flipped else "") + ("@scan" if adapt_to_scan else "")] = {"cases": len(rows), **_summary(*counts[None]),
                          "per_case": dict(zip((r["case"] for r in rows), dices)),
                          "by_threshold": {str(t): _summary(*counts[t]) for t in thresholds},
                          "brain_model": None if brain is None else brain.name}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("manifest", type=Path)
    parser.add_argument("split", type=Path)
    parser.add_argument("--model", nargs="+", required=True)
    parser.add_argument("--split-name", default="val")
    parser.add_argument("--thresholds", type=float, nargs="*", default=[])
    parser.add_argument("--brain-model", default="default")
    parser.add_argument("--tta", action="store_true", help="also evaluate each model with test-time flipping")
    parser.add_argument("--adapt-to-scan", action="store_true",
                        help="re-estimate the models' batch-norm statistics on each case first (adapt.adapt_to_scan)")
    parser.add_argument("--json")
    args = parser.parse_args()
    results = evaluate(args.manifest, args.split, args.model, args.split_name, args.thresholds, args.brain_model,
                       args.tta, args.adapt_to_scan)
    for model, r in results.items():
        print(f"{'+'.join(Path(m).name for m in model.split('+'))}: {r['cases']} cases, median Dice {r['median_dice']:.3f}, "
              f"mean {r['mean_dice']:.3f}, pooled {r['pooled_dice']:.3f}")
        for t, figures in r["by_threshold"].items():
            print(f"    threshold {t}: median {figures['median_dice']:.3f}, mean {figures['mean_dice']:.3f}, "
                  f"pooled {figures['pooled_dice']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
