"""Accuracy and runtime of a model on the real labelled MS cases, at 1 mm and as thick axial slices.

    python Testing/benchmarks/labelled_cases.py [--model FILE ...] [--brain-model default|none|FILE]
        [--thickness 1 5 8] [--threshold T] [--all-offsets] [--json OUT] [--markdown OUT]

The three Ljubljana cases (../shared/data/open_ms/labelled/patient07, 19, 26: 3T FLAIR, skull-stripped,
N4-corrected, 1 mm MNI grid, 3-rater consensus masks) are EVALUATION ONLY: nothing in training or
tuning may look at them. Thick-slice versions imitate a clinical 2D acquisition: each thick slice is
the average of `thickness` consecutive 1 mm axial slices (a box slice profile) and its reference is
the consensus mask's slab average thresholded at 0.5 (the lesion fills at least half the slice).
The slabs start at the first 1 mm slice; --all-offsets repeats the thick-slice figures with the slab
boundaries moved by 1, 2, ... mm, as another head position would place them, and prints how far the
median moves (the table and per-image figures stay those of offset 0).

Per case and thickness it reports Dice, sensitivity, precision, HD95, AVD, lesion recall and F1
(DeepWMLLib.evaluation.evaluate_case) and the segmentation time. The brain-mask gate is as in
`deepwml segment`: the shipped one by default, `--brain-model none` for none.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from DeepWMLLib import io  # noqa: E402

CASES = ("patient07", "patient19", "patient26")
METRICS = ("dice", "sensitivity", "precision", "hd95_mm", "avd_percent", "lesion_recall", "lesion_f1")


def thick_slices(image: sitk.Image, thickness: int, mask: bool = False, offset: int = 0) -> sitk.Image:
    """Average `thickness` consecutive slices along the axial axis (box profile); masks re-thresholded at 0.5.

    offset: the first thick slice starts at that 1 mm slice (0 <= offset < thickness): where the slab
    boundaries fall, as a different head position in the scanner would place them."""
    if thickness <= 1:
        return image
    if not 0 <= offset < thickness:
        raise ValueError(f"offset must be in [0, {thickness}), got {offset}")
    stack, frame = io.to_axial_stack(image, dtype=np.float32)
    n = (stack.shape[0] - offset) // thickness
    slabs = stack[offset: offset + n * thickness].reshape(n, thickness, *stack.shape[1:]).mean(axis=1)
    axis = frame.slice_axis
    size = list(frame.size)
    size[axis] = n
    spacing = list(frame.spacing)
    spacing[axis] = frame.spacing[axis] * thickness
    # the new slice k is centred on the old continuous index k*t + (t-1)/2 along the axial axis
    shift = [0.0, 0.0, 0.0]
    shift[axis] = offset + (thickness - 1) / 2
    origin = image.TransformContinuousIndexToPhysicalPoint(shift)
    thick_frame = io.SliceFrame(tuple(size), tuple(spacing), tuple(origin), frame.direction, axis,
                                frame.row_axis, frame.col_axis, frame.flip_row, frame.flip_col)
    out = io.from_axial_stack((slabs >= 0.5).astype(np.uint8) if mask else slabs.astype(np.float32), thick_frame)
    return out


def load_case(root: Path, case: str, thickness: int, offset: int = 0) -> tuple[sitk.Image, sitk.Image]:
    flair = io.read_image(root / case / "flair.nii.gz")
    mask = io.read_mask(root / case / "consensus_mask.nii.gz", reference=flair)
    return thick_slices(flair, thickness, offset=offset), thick_slices(mask, thickness, mask=True, offset=offset)


def evaluate(model_paths=None, thicknesses=(1, 5, 8), device: str = "cpu", cases=CASES, tta: bool = False,
             brain_model="default", threshold: float | None = None, all_offsets: bool = False,
             adapt_to_scan: bool = False, precision: str = "auto") -> list[dict]:
    """Rows per thickness and case, at slab offset 0; with all_offsets, at every offset 0..thickness-1
    (rows carry "offset"; the 1 mm rows have only 0). `precision` as deepwml segment's --precision ("auto": bf16
    on a CPU with AMX or AVX512-BF16 where bf16 is measured faster there, fp32 on others)."""
    from DeepWMLLib.adapt import adapt_to_scan as scan_adapted
    from DeepWMLLib.evaluation import evaluate_case
    from DeepWMLLib.segment import load_brain_model, load_models, segment_image

    shared = io.shared_data_dir()
    if shared is None:
        raise SystemExit("../shared/data is absent: the labelled cases are needed")
    root = shared / "open_ms" / "labelled"
    models = load_models(model_paths)
    brain = load_brain_model(None if brain_model == "none" else brain_model)
    rows = []
    for thickness, offset in [(t, o) for t in thicknesses for o in (range(t) if all_offsets else [0])]:
        for case in cases:
            flair, reference = load_case(root, case, thickness, offset)
            start = time.perf_counter()
            networks = scan_adapted(flair, models) if adapt_to_scan else models
            result = segment_image(flair, networks, device=device, threshold=threshold, tta=tta, brain_model=brain,
                                   precision=precision)
            seconds = time.perf_counter() - start
            scores = evaluate_case(result.mask, reference)
            row = {"case": case, "thickness_mm": thickness, "offset": offset, "slices": flair.GetSize()[2],
                   "reference_ml": round(float(sitk.GetArrayViewFromImage(reference).sum()) * np.prod(reference.GetSpacing()) / 1000, 2),
                   "predicted_ml": round(result.report["volume_ml"], 2), "seconds": round(seconds, 2)}
            row.update({k: scores[k] for k in METRICS})
            # the paper's unit: every axial 2D image whose reference has lesion
            row["images"] = [{k: image[k] for k in ("index", "dice", "sensitivity", "precision", "lv_ml")}
                             for image in scores["slices"]]
            rows.append(row)
            if offset == 0:
                print(format_row(row), flush=True)
    return rows


def format_row(row: dict) -> str:
    def f(v, d=3):
        return "n/a" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.{d}f}"

    return (f"| {row['case']} | {row['thickness_mm']} mm | {row['reference_ml']} | {row['predicted_ml']} | {f(row['dice'])} | "
            f"{f(row['sensitivity'])} | {f(row['precision'])} | {f(row['hd95_mm'], 2)} | {f(row['avd_percent'], 1)} | "
            f"{f(row['lesion_recall'])} | {f(row['lesion_f1'])} | {row['seconds']:.1f} |")


HEADER = ("| case | slice thickness | reference ml | predicted ml | Dice | sensitivity | precision | HD95 mm | AVD % | "
          "lesion recall | lesion F1 | seconds |\n|---|---|---|---|---|---|---|---|---|---|---|---|")


def markdown(rows: list[dict]) -> str:
    """The table, medians and per-image figures at slab offset 0; with other offsets, their table after."""
    first = [r for r in rows if r.get("offset", 0) == 0]
    lines = [HEADER] + [format_row(r) for r in first]
    for thickness in sorted({r["thickness_mm"] for r in first}):
        dice = [r["dice"] for r in first if r["thickness_mm"] == thickness]
        lines.append(f"\nMedian Dice at {thickness} mm: {np.median(dice):.3f}")
    lines += ["", per_image_table(first)]
    if len(first) < len(rows):
        lines += ["", offsets_table(rows)]
    return "\n".join(lines)


def offsets_table(rows: list[dict]) -> str:
    """Per thickness and slab offset, each case's Dice and the median over cases; then, per thickness,
    the mean and range of that median over the offsets: how much the figure owes to where the slab
    boundaries happen to fall."""
    cases = list(dict.fromkeys(r["case"] for r in rows))
    lines = ["| slice thickness | offset | " + " | ".join(cases) + " | median |",
             "|---|---|" + "---|" * len(cases) + "---|"]
    summary = []
    for thickness in sorted({r["thickness_mm"] for r in rows if r["thickness_mm"] > 1}):
        medians = []
        for offset in sorted({r.get("offset", 0) for r in rows if r["thickness_mm"] == thickness}):
            by_case = {r["case"]: r["dice"] for r in rows if r["thickness_mm"] == thickness and r.get("offset", 0) == offset}
            median = float(np.median(list(by_case.values())))
            medians.append(median)
            lines.append(f"| {thickness} mm | {offset} mm | " + " | ".join(f"{by_case.get(c, float('nan')):.3f}" for c in cases)
                         + f" | {median:.3f} |")
        summary.append(f"Median Dice at {thickness} mm over {len(medians)} slab offsets: mean {np.mean(medians):.3f}, "
                       f"range {min(medians):.3f}-{max(medians):.3f}")
    return "\n".join(lines + [""] + summary)


def per_image_table(rows: list[dict]) -> str:
    """The DeepWML paper's unit: median [IQR] Dice, sensitivity and precision over the 2D images (axial
    slices) whose reference has lesion, the three cases pooled, per slice thickness."""
    names = list(dict.fromkeys(r["case"].replace("patient", "") for r in rows))
    lines = [f"| slice thickness | 2D images ({' / '.join(names)}) | Dice | sensitivity | precision |",
             "|---|---|---|---|---|"]
    for thickness in sorted({r["thickness_mm"] for r in rows}):
        chosen = [r for r in rows if r["thickness_mm"] == thickness]
        images = [image for r in chosen for image in r.get("images", [])]
        if not images:
            continue
        cells = []
        for key in ("dice", "sensitivity", "precision"):
            values = np.array([image[key] for image in images], float)
            values = values[np.isfinite(values)]  # precision is undefined (NaN) on an image with no prediction
            if values.size == 0:
                cells.append("n/a")
                continue
            q1, q2, q3 = np.percentile(values, [25, 50, 75])
            cells.append(f"{q2:.3f} [{q1:.3f}-{q3:.3f}]")
        counts = " / ".join(str(len(r.get("images", []))) for r in chosen)
        lines.append(f"| {thickness} mm | {len(images)} ({counts}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", nargs="+", help="model file(s) (default: the shipped default model)")
    parser.add_argument("--thickness", nargs="+", type=int, default=[1, 5, 8])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tta", action="store_true")
    parser.add_argument("--threshold", type=float, help="probability threshold (default: the models' own, as deepwml segment)")
    parser.add_argument("--all-offsets", action="store_true",
                        help="also every other slab offset of the thick slices (where their boundaries fall)")
    parser.add_argument("--brain-model", default="default", help="brain-mask gate: default (the shipped one), none, or a file")
    parser.add_argument("--adapt-to-scan", action="store_true",
                        help="re-estimate the models' batch-norm statistics on each case first (experimental)")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                        help="what the networks compute in, as deepwml segment's --precision (auto: bf16 where the "
                             "CPU has AMX or AVX512-BF16 and bf16 is measured faster there, else fp32)")
    parser.add_argument("--json")
    parser.add_argument("--markdown")
    args = parser.parse_args(argv)
    print(HEADER)
    rows = evaluate(args.model, args.thickness, args.device, tta=args.tta, brain_model=args.brain_model,
                    threshold=args.threshold, all_offsets=args.all_offsets,
                    adapt_to_scan=args.adapt_to_scan, precision=args.precision)
    text = markdown(rows)
    print(text.split("\n\n", 1)[-1] if "\n\n" in text else "")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
