"""Dice of models on synthetic validation cases, end to end (each case segmented on its own grid).

    python Testing/benchmarks/synthetic_validation.py MANIFEST SPLIT --model A.pt [B.pt ...] [--split-name val] [--json OUT]

MANIFEST is a `deepwml synth` manifest (paths relative to its folder), SPLIT a CSV (case, split);
the cases of MANIFEST whose split is --split-name are segmented with each model (threshold and
post-processing as `deepwml segment`) and compared with their painted masks. Prints per model the
median and mean per-case Dice and the Dice of all voxels pooled. This is how the shipped model was
chosen (see Resources/Models/README.md): on synthetic validation cases only.
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

from DeepWMLLib.segment import load_models, segment_image  # noqa: E402


def evaluate(manifest: Path, split: Path, models: list[str], split_name: str = "val") -> dict:
    assignment = {r["case"]: r["split"] for r in csv.DictReader(open(split, newline=""))}
    rows = [r for r in csv.DictReader(open(manifest, newline="")) if assignment.get(r["case"]) == split_name]
    if not rows:
        raise SystemExit(f"no case of {manifest} is in split {split_name!r} of {split}")
    results = {}
    for model in models:
        loaded = load_models([model])
        dices, tp, fp, fn = [], 0, 0, 0
        for r in rows:
            image = sitk.ReadImage(str(manifest.parent / r["flair"]), sitk.sitkFloat32)
            reference = sitk.GetArrayFromImage(sitk.ReadImage(str(manifest.parent / r["mask"]))) > 0
            predicted = sitk.GetArrayFromImage(segment_image(image, loaded, device="cpu").mask) > 0
            overlap = int((predicted & reference).sum())
            tp, fp, fn = tp + overlap, fp + int((predicted & ~reference).sum()), fn + int((~predicted & reference).sum())
            total = int(predicted.sum() + reference.sum())
            dices.append(1.0 if total == 0 else 2 * overlap / total)
        results[model] = {"cases": len(rows), "median_dice": float(np.median(dices)), "mean_dice": float(np.mean(dices)),
                          "pooled_dice": 2 * tp / max(1, 2 * tp + fp + fn),
                          "per_case": dict(zip((r["case"] for r in rows), dices))}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("manifest", type=Path)
    parser.add_argument("split", type=Path)
    parser.add_argument("--model", nargs="+", required=True)
    parser.add_argument("--split-name", default="val")
    parser.add_argument("--json")
    args = parser.parse_args()
    results = evaluate(args.manifest, args.split, args.model, args.split_name)
    for model, r in results.items():
        print(f"{Path(model).name}: {r['cases']} cases, median Dice {r['median_dice']:.3f}, "
              f"mean {r['mean_dice']:.3f}, pooled {r['pooled_dice']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
