"""Agreement of two raters' manual masks, the DeepWML paper's acceptance rule for training labels.

The paper accepted a manual mask when two raters reached Dice >= 0.85. `consensus_check` computes
that verdict for one pair and says where to look when it fails: the axial slices where the raters
disagree most (area marked by one rater only) and the lesions (3D 26-connected components) that one
rater drew and the other did not touch at all. Any positive label of either mask counts as lesion;
two empty masks agree (Dice 1). Positions are physical LPS millimetres; slice k is voxel index k
along `io.axial_axis`, as everywhere in DeepWML.

`deepwml consensus` runs it on one pair or on a manifest (columns case, rater_a, rater_b) and
writes a CSV of every case and the list of cases that need re-labelling. The verdict never changes
the exit status: it is 0 unless a file could not be read or compared.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import SimpleITK as sitk

from . import io
from .errors import Cancelled, DeepWMLError, UsageError, case_error
from .evaluation import (as_mask, check_single_outputs, claim_picture_name, clear_earlier_run, pair_title,
                         picture_path, print_progress, read_manifest, report_failed_cases, with_notes, write_csv,
                         write_json, write_single_outputs)
from .metrics import MaskPair, dice_of_counts
from .report import lesion_count_text
from .volume import Volume

DEFAULT_THRESHOLD = 0.85
WORST_SLICES_SHOWN = 5
# Below this Dice two raters who both marked lesions are asked whether the masks are of one scan: another patient's (or
# visit's) mask on the same grid. Measured on the 3 labelled open_ms cases against copies eroded or dilated by a
# voxel or with a third or half of their lesions left out: Dice 0.21-0.99 (0.06-0.09 where patient19's one confluent
# lesion was among those left out); one rater dilated and the other eroded and thinned out: 0.03-0.46 (0.006 without
# that lesion); the 435 pairs of different patients' masks of lesion_masks_mni, all in one MNI space: median 0.035,
# up to 0.29 (the labelled pairs 0.009, 0.017, 0.106). A hint, then: in one common space not every pair is caught.
UNRELATED_DICE = 0.05
CSV_COLUMNS = ("case", "dice", "threshold", "passed", "volume_a_ml", "volume_b_ml", "n_lesions_a", "n_lesions_b",
               "n_unmatched_lesions_a", "n_unmatched_lesions_b", "worst_slice", "rater_a", "rater_b", "notes", "error")


def _check_threshold(threshold: float) -> None:
    if not 0.0 <= threshold <= 1.0:
        raise DeepWMLError(f"the Dice threshold must be between 0 and 1, got {threshold}")


@io.dicom_headers_read_once()  # a FLAIR folder both raters' DICOM SEGs are placed by
def consensus_check(mask_a: sitk.Image, mask_b: sitk.Image, threshold: float = DEFAULT_THRESHOLD,
                    flair=None) -> dict:
    """Do two raters agree well enough (Dice >= threshold)? And where do they not? Each mask a SimpleITK image or a
    path to one (read as `deepwml consensus` reads it, `io.read_mask`). `flair`, the case's FLAIR
    (image or path, or None): masks on two different extents (both saved cropped, or one over a larger extent) are
    compared on its grid, slice numbers the scan's.

    Returns dice, threshold, passed, volume_a_ml, volume_b_ml, n_lesions_a, n_lesions_b, slices
    (every axial slice either rater marked, in slice order: {index, dice, area_a_mm2, area_b_mm2,
    disagreement_mm2}), worst_slices (indices, largest disagreement first) and
    unmatched_lesions_a / _b (lesions one rater drew that no voxel of the other touches, largest
    first: {voxels, volume_mm3, centroid_lps_mm, slices: [first, last]}) and notes (an empty mask said in
    words: two empty masks pass by convention; both raters' lesions barely overlapping (Dice under `UNRELATED_DICE`):
    masks of two scans, perhaps; slice numbers counted from the extent of both masks when both were
    saved cropped; how many ml of a mask over a larger extent lie outside the other's grid, `MaskPair.grid_notes`).
    """
    _check_threshold(threshold)
    names = [what if isinstance(mask, (sitk.Image, Volume)) else f"{what} {mask}"  # a file: named in errors
             for what, mask in (("rater A's mask", mask_a), ("rater B's mask", mask_b))]
    mask_a, mask_b = as_mask(mask_a, "rater A's mask", flair), as_mask(mask_b, "rater B's mask", flair)
    pair = MaskPair.binary_pair(mask_a, mask_b, *names, flair)
    dice = pair.overlap()["dice"]
    both, area_a, area_b = pair.slice_counts()
    pixel = pair.pixel_area_mm2
    slices = []
    for k in range(len(both)):
        if area_a[k] or area_b[k]:
            slices.append({
                "index": k,
                "dice": dice_of_counts(both[k], area_a[k], area_b[k]),
                "area_a_mm2": float(area_a[k] * pixel),
                "area_b_mm2": float(area_b[k] * pixel),
                "disagreement_mm2": float((area_a[k] + area_b[k] - 2 * both[k]) * pixel),
            })
    worst = sorted((s for s in slices if s["disagreement_mm2"] > 0), key=lambda s: (-s["disagreement_mm2"], s["index"]))
    volumes = pair.volumes_ml()
    empty = [f"rater {name}'s" for name, mask in (("A", pair.prediction), ("B", pair.reference)) if not mask.any()]
    notes = (["both raters' masks are empty: they agree by convention (Dice 1)"] if len(empty) == 2 else
             [f"{empty[0]} mask is empty: Dice 0"] if empty else []) + pair.grid_notes()
    if not empty and dice < UNRELATED_DICE:
        notes.append(f"both raters marked lesions but they barely overlap (Dice {dice_shown(dice, UNRELATED_DICE)}, "
                     f"under {UNRELATED_DICE:g}): "
                     "check that both masks were drawn on the same scan of the same patient (not another patient's, "
                     "or another visit's)")
    return {
        "dice": dice,
        "threshold": threshold,
        "passed": bool(dice >= threshold),
        "volume_a_ml": volumes["prediction_volume_ml"],
        "volume_b_ml": volumes["reference_volume_ml"],
        "n_lesions_a": pair.prediction_components[1],
        "n_lesions_b": pair.reference_components[1],
        "slices": slices,
        "worst_slices": [s["index"] for s in worst],
        "unmatched_lesions_a": pair.lesion_table("prediction"),
        "unmatched_lesions_b": pair.lesion_table("reference"),
        "notes": notes,
    }


def dice_shown(dice: float, threshold: float) -> str:
    """Dice with enough digits that its comparison with the threshold reads as the verdict says."""
    digits = 3
    while digits < 8 and (round(dice, digits) >= threshold) != (dice >= threshold):
        digits += 1
    return f"{dice:.{digits}f}"


def slice_range(first: int, last: int) -> str:
    """"slice 5" for a lesion on one slice, "slices 5-7" for one across several."""
    return f"slice {first}" if first == last else f"slices {first}-{last}"


def format_check(result: dict) -> str:
    """Human-readable verdict with the slices and lesions to review."""
    verdict = "PASS" if result["passed"] else "FAIL (re-label)"
    lines = [
        f"Dice {dice_shown(result['dice'], result['threshold'])} (threshold {result['threshold']:g}): {verdict}",
        f"rater A {result['volume_a_ml']:.2f} ml in {lesion_count_text(result['n_lesions_a'])}; "
        f"rater B {result['volume_b_ml']:.2f} ml in {lesion_count_text(result['n_lesions_b'])}",
        *(f"note: {note}" for note in result.get("notes", [])),
    ]
    by_index = {s["index"]: s for s in result["slices"]}
    worst = [by_index[k] for k in result["worst_slices"][:WORST_SLICES_SHOWN]]
    if worst:
        lines.append("slices where the raters disagree most (area marked by one rater only):")
        lines.append("  slice   Dice   A mm2    B mm2    disagreement mm2")
        lines += [f"  {s['index']:5d}  {s['dice']:.3f}  {s['area_a_mm2']:7.1f}  {s['area_b_mm2']:7.1f}  "
                  f"{s['disagreement_mm2']:7.1f}" for s in worst]
    for rater in ("a", "b"):
        lesions = result[f"unmatched_lesions_{rater}"]
        if not lesions:
            lines.append(f"lesions drawn by rater {rater.upper()} only: none")
            continue
        total = sum(lesion["volume_mm3"] for lesion in lesions)
        lines.append(f"lesions drawn by rater {rater.upper()} only: {len(lesions)} ({total:.1f} mm3), largest:")
        lines += [f"  {lesion['volume_mm3']:8.1f} mm3 at LPS ({', '.join(f'{c:.1f}' for c in lesion['centroid_lps_mm'])}) "
                  f"mm, {slice_range(*lesion['slices'])}" for lesion in lesions[:3]]
    return "\n".join(lines)


@io.dicom_headers_read_once()  # a FLAIR folder each row's DICOM SEGs are placed by
def consensus_cohort(manifest: str | os.PathLike, out_dir: str | os.PathLike, threshold: float = DEFAULT_THRESHOLD,
                     progress: Callable[[float, str], None] | None = None,
                     cancel: Callable[[], bool] | None = None) -> dict:
    """Check every rater pair of a manifest; writes consensus.csv, relabel.txt and consensus.json.

    A case that cannot be read or compared is recorded with its error and the others still run.
    """
    _check_threshold(threshold)
    entries = read_manifest(manifest, ("case", "rater_a", "rater_b"), ("flair",), path_columns=("rater_a", "rater_b", "flair"))
    out = io.make_output_dir(out_dir)
    clear_earlier_run(out, ("consensus.json", "consensus.csv", "relabel.txt"), entries, manifest)
    rows, details, unpictured, picture_names = [], {}, [], {}
    for number, entry in enumerate(entries):
        if cancel is not None and cancel():
            raise Cancelled()
        row = {"case": entry["case"], "rater_a": entry["rater_a"], "rater_b": entry["rater_b"], "threshold": threshold}
        try:
            missing = [entry[k] for k in ("rater_a", "rater_b") if not Path(entry[k]).exists()]
            if missing:  # both named when both are missing, not only the first one read
                raise DeepWMLError(f"{' and '.join(missing)} {'do' if len(missing) > 1 else 'does'} not exist")
            mask_a, mask_b = (as_mask(entry[rater], rater, entry.get("flair") or None) for rater in ("rater_a", "rater_b"))
            result = consensus_check(mask_a, mask_b, threshold, entry.get("flair") or None)
        except Cancelled:
            raise
        except Exception as exc:  # one bad case must not stop the cohort; its error is reported
            row["error"] = case_error(exc)
            message = f"{entry['case']}: ERROR ({row['error']})"
        else:
            details[entry["case"]] = result
            row.update({k: result[k] for k in ("dice", "passed", "volume_a_ml", "volume_b_ml", "n_lesions_a",
                                               "n_lesions_b")})
            row["n_unmatched_lesions_a"] = len(result["unmatched_lesions_a"])
            row["n_unmatched_lesions_b"] = len(result["unmatched_lesions_b"])
            row["worst_slice"] = result["worst_slices"][0] if result["worst_slices"] else ""
            row["notes"] = " | ".join(result["notes"])  # an empty mask, said in words
            shown = dice_shown(result["dice"], threshold)  # 0.84996 is not "0.850 FAIL"
            message = f"{entry['case']}: Dice {shown} {'PASS' if result['passed'] else 'FAIL'}"
            if entry.get("flair"):  # a picture that cannot be drawn costs the picture, not the verdict
                try:
                    claim_picture_name(picture_names, entry["case"])
                    picture = pair_picture(entry["flair"], mask_a, mask_b, f"{entry['case']}: Dice {shown}")
                    io.write_bytes(picture, picture_path(out, entry["case"]))
                except Cancelled:
                    raise
                except Exception as exc:
                    unpictured.append({"case": entry["case"], "error": case_error(exc)})
                    message += f" (no picture: {unpictured[-1]['error']})"
            message = with_notes(message, result["notes"])  # an empty mask, masks barely overlapping: seen here too
        rows.append(row)
        if progress is not None:
            progress((number + 1) / len(entries), message)
    relabel = [r["case"] for r in rows if r.get("passed") is False]
    failed = [r for r in rows if r.get("error")]
    write_csv(rows, list(CSV_COLUMNS), out / "consensus.csv")
    io.write_text("".join(f"{case}\n" for case in relabel), out / "relabel.txt")
    summary = {"manifest": str(Path(manifest).resolve()), "threshold": threshold, "cases": rows,
               "relabel": relabel, "failed": [{"case": r["case"], "error": r["error"]} for r in failed],
               "unpictured": unpictured, "details": details}
    write_json(summary, out / "consensus.json")
    return summary


def register(subparsers) -> None:
    from .cli import add_debug_flag, unit_interval

    parser = subparsers.add_parser(
        "consensus", help="check two raters' masks agree (Dice >= 0.85), one pair or a cohort",
        description="One pair: RATER_A RATER_B prints the Dice, PASS or FAIL, the slices where the raters disagree "
                    "most and lesions drawn by one rater only. A cohort: --manifest CSV (columns case, rater_a, "
                    "rater_b) and -o OUTDIR, which receives consensus.csv, relabel.txt and consensus.json. Any non-zero "
                    "voxel of a rater's mask is lesion (labels 2, 3, ... too). The exit status is 0 "
                    "whatever the verdict, non-zero only when a file cannot be read or compared.")
    parser.add_argument("rater_a", nargs="?", metavar="RATER_A", help="mask of the first rater")
    parser.add_argument("rater_b", nargs="?", metavar="RATER_B", help="mask of the second rater")
    parser.add_argument("--threshold", type=unit_interval, default=DEFAULT_THRESHOLD,
                        help="Dice at or above which the masks are accepted (default %(default)s)")
    parser.add_argument("--json", help="write the full result of one pair to this JSON file")
    parser.add_argument("--flair", help="the FLAIR both raters drew on: masks on different extents are compared on "
                        "its grid, a DICOM SEG's frames placed by the images of its series they name; for --qc")
    parser.add_argument("--qc", metavar="PNG", help="write a picture of the pair: the FLAIR's axial slices with both "
                        "raters' lesion green, rater A only red, rater B only blue (needs --flair)")
    parser.add_argument("--manifest", help="cohort CSV with columns case, rater_a, rater_b[, flair]; with flair, "
                        "OUTDIR/qc/CASE_qc.png pictures each pair as --qc does")
    parser.add_argument("-o", "--output", help="output folder of the cohort results")
    add_debug_flag(parser)
    parser.set_defaults(func=run)


def run(args) -> int:
    _check_threshold(args.threshold)
    if args.manifest:
        if args.rater_a or args.rater_b or args.json or args.flair or args.qc:
            raise UsageError("--manifest checks a cohort; leave out RATER_A, RATER_B, --json, --flair and --qc "
                             "(a flair column adds pictures)")
        if not args.output:
            raise UsageError("--manifest needs -o OUTDIR, the folder that receives consensus.csv")
        summary = consensus_cohort(args.manifest, args.output, args.threshold,
                                   progress=print_progress)
        n_ok = len(summary["cases"]) - len(summary["failed"])
        print(f"{n_ok} case{'s' * (n_ok != 1)} checked at Dice >= {args.threshold:g}: {n_ok - len(summary['relabel'])} pass, "
              f"{len(summary['relabel'])} need re-labelling"
              + (f" ({', '.join(summary['relabel'])})" if summary["relabel"] else ""))
        print(f"results: {Path(args.output) / 'consensus.csv'}")
        return max(report_failed_cases(summary["failed"], "could not be checked"),
                   report_failed_cases(summary["unpictured"], "could not be pictured (their verdicts stand)"))
    if not (args.rater_a and args.rater_b):
        raise UsageError("give two masks (RATER_A RATER_B), or --manifest CSV and -o OUTDIR for a cohort")
    if args.output:
        raise UsageError("-o is for --manifest cohorts; use --json FILE to save one pair's result")
    check_single_outputs(args)
    mask_a, mask_b = as_mask(args.rater_a, "rater A's mask", args.flair), as_mask(args.rater_b, "rater B's mask", args.flair)
    result = consensus_check(mask_a, mask_b, args.threshold, args.flair)
    picture = (pair_picture(args.flair, mask_a, mask_b, f"{pair_title(args.rater_a, args.rater_b)}: Dice "
                            f"{dice_shown(result['dice'], args.threshold)}")
               if args.qc else None)  # a bad FLAIR: refused before any output
    print(format_check(result))
    write_single_outputs(args, result, picture)
    return 0


def pair_picture(flair, mask_a: sitk.Image, mask_b: sitk.Image, title: str | None = None) -> bytes:
    """PNG bytes of `qc.render_comparison` of two raters (any non-zero voxel is lesion): both green, A only
    red, B only blue, on the FLAIR's grid (`io.onto_scan`: masks saved cropped on its voxels are padded onto it;
    another voxel order is reordered)."""
    from .qc import png_bytes, render_comparison

    image, a, b = io.onto_scan(io.read_image(flair), sitk.Cast(mask_a != 0, sitk.sitkUInt8),
                               sitk.Cast(mask_b != 0, sitk.sitkUInt8), f"FLAIR {flair}", "rater A's mask",
                               "rater B's mask")
    return png_bytes(render_comparison(image, a, b, title, names=("rater A", "rater B")))
