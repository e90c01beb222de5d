"""Do reduced-precision masks match fp32's on real scans? bf16 (OpenVINO) against the fp32 path.

    python Testing/benchmarks/precision_agreement.py [--model FILE ...] [--candidate openvino:bf16]
        [--reference onnx:fp32] [--thickness 1 5 8] [--json OUT]

Every real scan of ../shared is segmented twice with the same model(s) and brain mask as
`deepwml segment`: once the reference way (default ONNX Runtime, fp32) and once the candidate way
(default OpenVINO, bf16). It prints, per scan, the Dice between the two final masks, both lesion
volumes and lesion counts, the largest difference of the probability maps, the share of voxels whose
probability lies within 0.02 of the threshold, and on the three labelled cases (at 1 mm and re-sliced
thick as in labelled_cases.py) each way's Dice against the consensus mask. The labelled cases are
evaluation-only: this compares two ways of running the same fixed model, it tunes nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from DeepWMLLib import io  # noqa: E402


def _way(text: str) -> tuple[str, str]:
    backend, _, precision = text.partition(":")
    return backend, precision or "auto"


def scans(thicknesses) -> list[tuple[str, object, object]]:
    """(name, image, reference mask or None) for every real scan: clinical FLAIRs, then labelled cases."""
    from labelled_cases import CASES, load_case

    shared = io.shared_data_dir()
    if shared is None:
        raise SystemExit("../shared/data is absent: the real scans are needed")
    out = []
    for path in sorted((shared / "open_ms" / "clinical_flair").glob("*.nii*")):
        out.append((io.case_name(path), lambda path=path: (io.read_image(path), None)))
    for thickness in thicknesses:
        for case in CASES:
            out.append((f"{case} {thickness} mm",
                        lambda case=case, t=thickness: load_case(shared / "open_ms" / "labelled", case, t)))
    return out


def compare(model_paths=None, reference=("onnx", "fp32"), candidate=("openvino", "bf16"), thicknesses=(1, 5, 8),
            brain_model="default") -> list[dict]:
    import SimpleITK as sitk

    from DeepWMLLib.evaluation import evaluate_case
    from DeepWMLLib.metrics import overlap
    from DeepWMLLib.segment import load_brain_model, load_models, segment_image

    models = load_models(model_paths)
    brain = load_brain_model(None if brain_model == "none" else brain_model)
    threshold = float(np.mean([m.threshold for m in models]))
    rows = []
    for name, load in scans(thicknesses):
        image, truth = load()
        results, seconds = [], []
        for backend, precision in (reference, candidate):
            start = time.perf_counter()
            results.append(segment_image(image, models, device="cpu", backend=backend, precision=precision,
                                         brain_model=brain))
            seconds.append(time.perf_counter() - start)
        masks = [sitk.GetArrayViewFromImage(r.mask) > 0 for r in results]
        probs = [sitk.GetArrayViewFromImage(r.probabilities) for r in results]
        row = {
            "scan": name,
            "mask_dice": round(overlap(results[1].mask, results[0].mask)["dice"], 5),
            "voxels_differing": int(np.logical_xor(*masks).sum()),
            "ml": [r.report["volume_ml"] for r in results],
            "lesions": [r.report["lesion_count"] for r in results],
            "max_prob_diff": round(float(np.abs(probs[0] - probs[1]).max()), 4),
            "near_threshold_share": round(float((np.abs(probs[0] - threshold) < 0.02).mean()), 6),
            "seconds": [round(s, 2) for s in seconds],
            "runners": [r.report["runner"] for r in results],
        }
        if truth is not None:
            row["dice_vs_consensus"] = [round(evaluate_case(r.mask, truth)["dice"], 4) for r in results]
        rows.append(row)
        print(f"{name:<22} mask Dice {row['mask_dice']:.4f} ({row['voxels_differing']} voxels differ)  "
              f"ml {row['ml'][0]:.2f}/{row['ml'][1]:.2f}  lesions {row['lesions'][0]}/{row['lesions'][1]}  "
              f"max |dp| {row['max_prob_diff']:.3f}  s {seconds[0]:.2f}/{seconds[1]:.2f}"
              + (f"  Dice vs consensus {row['dice_vs_consensus'][0]:.4f}/{row['dice_vs_consensus'][1]:.4f}"
                 if truth is not None else ""), flush=True)
    dice = [r["mask_dice"] for r in rows]
    print(f"{results[0].report['runner']} vs {results[1].report['runner']}: mask Dice median {np.median(dice):.4f}, "
          f"lowest {min(dice):.4f} ({rows[int(np.argmin(dice))]['scan']}) over {len(rows)} scans")
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", nargs="+", help="model file(s) (default: the shipped default model)")
    parser.add_argument("--reference", default="onnx:fp32", help="BACKEND:PRECISION of the reference (default onnx:fp32)")
    parser.add_argument("--candidate", default="openvino:bf16", help="BACKEND:PRECISION compared (default openvino:bf16)")
    parser.add_argument("--thickness", nargs="+", type=int, default=[1, 5, 8])
    parser.add_argument("--brain-model", default="default", help="default (the shipped one), none, or a file")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    rows = compare(args.model, _way(args.reference), _way(args.candidate), tuple(args.thickness), args.brain_model)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
