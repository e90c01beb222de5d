"""Evaluation of predictions against reference masks: one case, or a cohort with the paper's report.

`evaluate_case` gives every metric of `metrics` for one case. `evaluate_cohort` runs a manifest
(CSV with columns case, prediction, reference and optionally centre, disease, probabilities;
relative paths are relative to the CSV's folder) and writes into an output folder:

    per_image.csv        DeepWML per-2D-image metrics (axial slices whose reference has lesion)
    per_case.csv         every case metric, and the error of any case that could not be evaluated
    table2.csv           the paper's Table 2: median [IQR] per-image Dice, sensitivity and
                         precision per centre, per disease and overall (plus per-case medians)
    lv_groups.csv        the same per lesion-volume group G1..G5 (behind the paper's Fig. 4)
    statistics.csv       Shapiro-Wilk; Kruskal-Wallis across diseases, centres and LV groups;
                         pairwise Mann-Whitney U with Bonferroni correction where Kruskal-Wallis
                         is significant (alpha 0.05)
    fig3_by_disease.png, fig3_by_centre.png, fig4_by_lv_group.png   box plots
    report.md            one readable report tying the above together
    summary.json         all of it, machine readable, written last

An earlier run's files of these names (and its pictures in qc/) are removed first, so that a rerun into the
same folder leaves none of them beside its own, and one stopped part way leaves no summary.json.

Quartiles are numpy's linear interpolation (Hyndman-Fan type 7; SPSS's type 6 can differ on small groups).
The unit of the paper's tables and tests is the 2D image (axial slice with reference lesion), as in
DeepWML; per-case values (MICCAI challenge and lesion-wise metrics) are reported next to them.
Undefined values (e.g. precision of an empty prediction) are left out of medians and tests and
the number of values used is always shown.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import SimpleITK as sitk

from . import io, metrics
from .errors import Cancelled, DeepWMLError, UsageError, case_error
from .volume import Volume
from .report import lesion_count_text

ALPHA = 0.05
MIN_GROUP_SIZE = 3  # fewer values than this and a group is left out of the tests (and said so)
MW_EXACT = "exact p (no ties, a group of 8 values or fewer)"
MW_ASYMPTOTIC = "p from the normal approximation (tie-corrected, continuity correction)"
IMAGE_METRICS = ("dice", "sensitivity", "precision")
CASE_COLUMNS = (
    "dice", "sensitivity", "precision", "hd95_mm", "avd_percent", "lesion_recall", "lesion_f1",
    "lesionwise_recall", "lesionwise_precision", "lesionwise_dice", "roc_auc",
    "reference_volume_ml", "prediction_volume_ml", "n_reference_lesions", "n_predicted_lesions",
    "n_images",
)
NOT_GIVEN = "(not given)"

Progress = Callable[[float, str], None]


# ---------------------------------------------------------------------------------------------
# Small shared helpers (also used by consensus)


def json_ready(value):
    """Replace NaN/inf by None recursively so the result is valid JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value


def json_text(data) -> str:
    """`data` as the JSON text write_json writes (json_ready, indented by 2, a final newline)."""
    return json.dumps(json_ready(data), indent=2) + "\n"


def write_json(data, path: str | os.PathLike) -> Path:
    return io.write_text(json_text(data), path)


def check_single_outputs(args) -> None:
    """One case's (evaluate) or pair's (consensus) --json and --qc files, checked before the work, not after it:
    --qc with its --flair, a picture name ending .png (a case.jpg held PNG data, which some viewers refuse), each
    file one that can be written."""
    if args.qc and not args.flair:  # (--flair alone: masks on other extents compared on its grid, a DICOM SEG's
        # frames placed by the images of its series they name)
        raise UsageError("--qc PNG needs --flair FLAIR (the picture is drawn on the FLAIR)")
    if args.qc and Path(args.qc).suffix.lower() != ".png":
        raise UsageError(f"--qc writes a PNG picture: give a file name ending .png, not {Path(args.qc).name}")
    for target in filter(None, (args.json, args.qc)):
        io.check_output_file(target)


def write_single_outputs(args, result: dict, picture: bytes | None) -> None:
    """One case's (evaluate) or pair's (consensus) --json and --qc files (checked by check_single_outputs), written
    once its result is printed."""
    if args.json:
        write_json(result, args.json)
    if picture is not None:
        io.write_bytes(picture, args.qc)


def write_csv(rows: list[dict], columns: list[str], path: str | os.PathLike) -> Path:
    return io.write_csv_text(io.csv_text(columns, (csv_cells(row, columns) for row in rows)), path)


def csv_cells(row: dict, columns: Sequence[str]) -> dict:
    """`row`'s cells of `columns` as write_csv writes them."""
    return {k: _cell(row.get(k)) for k in columns}


def _cell(value) -> str:
    """A CSV cell: six significant digits for a computed figure (a Dice), but a figure that a report already
    rounds to decimals (volume_ml to 6, area_mm2 to 4, an LV to 9 at most) as the report has it, so that the
    Slicer batch's summary.csv and Save results' table say what CASE_report.json and `deepwml segment`'s
    summary.csv say (27.97917 ml, not 27.9792; 1234.5678 mm², not 1234.57; an LV of 0.199999981 ml, G1, not 0.2)."""
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        text = f"{value:.6g}"
        if float(text) != value and math.isfinite(value) and round(value, 9) == value:
            text = repr(float(value))  # a numpy float's repr is "np.float64(0.6015625)"
        return text
    return str(value)


def read_manifest(path: str | os.PathLike, required: tuple[str, ...], optional: tuple[str, ...] = (),
                  path_columns: tuple[str, ...] = ()) -> list[dict]:
    """Rows of a CSV manifest with whitespace stripped and path columns made absolute, read as training reads
    its manifest (`io.read_manifest_rows`, `io.manifest_path`).

    Relative paths are taken relative to the manifest's folder, so a cohort folder can move; on macOS and Linux
    the backslashes of a manifest made on Windows separate folders too. Column names are matched whatever
    their case ("Case" is "case"); a column `center` is read as `centre`. A missing file stays the failure of
    its case, unless why it is missing can be told (paths written relative to the current folder, or Windows
    drive paths): then the manifest is refused before any case runs, saying so.
    """
    path = Path(path)
    numbered = io.read_manifest_rows(path, required, optional)
    rows, seen, missing, read_here = [], set(), [], 0
    for line, row in numbered:
        if not row["case"]:
            raise DeepWMLError(f"manifest {path}, line {line}: the case name is empty")
        if row["case"] in seen:
            raise DeepWMLError(f"manifest {path}: case {row['case']!r} is listed twice; give each case a unique name")
        seen.add(row["case"])
        for column in path_columns:
            if row.get(column):
                written, row[column] = row[column], io.manifest_path(path.parent, row[column])
                if io.known_missing(row[column]):
                    missing.append((row["case"], row[column], written))
                elif not os.path.isabs(written):
                    read_here += 1
        rows.append(row)
    hint = io.missing_paths_hint(path, [p for _, p, _ in missing], [w for _, _, w in missing], read_here) \
        if missing else ""
    if hint:
        case, first, _ = missing[0]
        raise DeepWMLError(f"{len(missing)} file(s) of the manifest {path} do not exist (first: {case}: {first})"
                           f"{hint}")
    return rows


def plain_name(case: str) -> str:
    """A manifest's case name made a plain file name (it may hold '/' or '..')."""
    return re.sub(r"[^\w.-]+", "_", case).strip(".") or "case"


def picture_path_name(case: str) -> str:
    """CASE_qc.png, CASE the case name made a plain file name."""
    return f"{plain_name(case)}_qc.png"


def claim_picture_name(taken: dict, case: str) -> None:
    """Record that `case` draws OUT/qc/`picture_path_name(case)` in this run; DeepWMLError when another case
    of it already does ("a/b" and "a_b" make the same plain name), so that neither picture is overwritten."""
    name = picture_path_name(case)
    if taken.setdefault(name, case) != case:
        raise DeepWMLError(f"its picture would be qc/{name}, as case {taken[name]!r}'s is; rename one of them")


def picture_path(out_dir: Path, case: str) -> Path:
    """OUT/qc/CASE_qc.png (see `picture_path_name`), its folder made."""
    return io.make_output_dir(Path(out_dir) / "qc") / picture_path_name(case)


def clear_earlier_run(out: Path, names, entries: list[dict], manifest=None) -> None:
    """Before a cohort command (evaluate, consensus) writes into `out`: what an earlier run of it left there is
    removed, so that none of it stays beside this run's looking like its own (a figure of an option not given
    now, a picture of a case no longer pictured, the tables of a run stopped part way). Only DeepWML's files:
    `names` (every file a run of the command may write, its summary first: written last, it says that a run
    finished) and, in out/qc, the pictures of this run's cases (`entries`) and of those the earlier summary
    lists; whatever else is in `out` is the user's. A file given to the run (the `manifest`, a mask or scan of
    `entries`) under one of those names is refused before anything is removed: the run would delete or write over it."""
    given = {_resolved_file(value) for entry in entries for value in entry.values() if isinstance(value, (str, Path))}
    given |= {_resolved_file(manifest)} if manifest is not None else set()
    taken = [out / name for name in names if _resolved_file(out / name) in given - {None}]
    if taken:
        raise DeepWMLError(f"{taken[0]} is a file given to this run, and the run writes a file of that name in "
                           f"{out}; choose another output folder")
    earlier = []
    try:
        summary = json.loads((out / names[0]).read_text(encoding="utf-8-sig"))
        earlier = [row.get("case") for key in ("cases", "failed") for row in summary.get(key) or []
                   if isinstance(row, dict)]
    except (OSError, ValueError, AttributeError, TypeError):  # none, or not one of ours: its pictures unknown
        pass
    cases = [c for c in dict.fromkeys([*earlier, *(entry["case"] for entry in entries)]) if isinstance(c, str)]
    for path in [*(out / name for name in names), *(out / "qc" / picture_path_name(c) for c in cases)]:
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            raise DeepWMLError(f"cannot remove {path}, an earlier run's ({exc.strerror or exc}); is it open in another "
                               "program (Excel, an image viewer)? close it there and run again") from exc
    try:
        (out / "qc").rmdir()  # only when no picture is left in it
    except OSError:
        pass


def _resolved_file(path) -> Path | None:
    """`path` resolved when it names a file, else None (also for a path the system cannot look up: its case's
    failure, said when the case is read)."""
    try:
        return Path(path).resolve() if path and Path(path).is_file() else None
    except (OSError, ValueError):
        return None


def print_progress(fraction: float, message: str) -> None:
    """A cohort's progress on stderr: '[ 50%] MESSAGE', the message's further lines (a case's notes) indented under
    its first."""
    prefix = f"[{fraction:4.0%}] "
    print(prefix + message.replace("\n", "\n" + " " * len(prefix)), file=sys.stderr)


def with_notes(message: str, notes: Sequence[str]) -> str:
    """A cohort case's progress message and its notes under it, one a line ('note: ...', as one case prints them):
    what per_case.csv's or consensus.csv's notes column says, seen at the terminal too."""
    return message + "".join(f"\nnote: {note}" for note in notes)


def report_failed_cases(failed: list[dict], verb: str) -> int:
    """One stderr line naming the cohort cases that failed; the exit code of a cohort command."""
    if not failed:
        return 0
    print(f"{len(failed)} case(s) {verb}: " + "; ".join(f"{c['case']}: {c['error']}" for c in failed), file=sys.stderr)
    return 1


# ---------------------------------------------------------------------------------------------
# One case


def as_mask(value, what: str, flair=None) -> sitk.Image:
    """A mask given as an image (SimpleITK, or a Volume as segment_image returns) or as a file's path (`what` names it
    in errors), as a SimpleITK image: a file read as `deepwml evaluate` and `consensus` read it (io.read_mask), a DICOM
    SEG's frames placed by the images they name of `flair` where that is a DICOM series' folder (io.mask_source)."""
    if isinstance(value, Volume):  # what segment_image returns for a Volume input
        value = value.to_sitk()
    if isinstance(value, sitk.Image):
        return value
    path = _existing(value, what)
    if not io.dicom_seg_file(path):
        return io.read_mask(path)
    source = io.mask_source(flair)
    try:
        return io.read_mask(path, source=source)
    except DeepWMLError as exc:
        if source is None and io.SEG_SOURCE_ADVICE in str(exc) and isinstance(flair, (str, os.PathLike)) \
                and os.path.isdir(flair):
            # the advice would be to give the FLAIR's series, given: what keeps its folder's series from being told
            # (two FLAIR-like series, say) is said instead
            io.choose_dicom_series(flair, option=None)
        raise


def _as_scores(value) -> sitk.Image:
    if isinstance(value, Volume):
        value = value.to_sitk()
    if isinstance(value, sitk.Image):
        return value
    # read_image would refuse an all-zero map, which is a legitimate (if useless) prediction
    return sitk.Cast(io.read_any(_existing(value, "probability map")), sitk.sitkFloat32)


def _existing(path, what: str) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise DeepWMLError(f"{what} must be a SimpleITK image or a file path, got {type(path).__name__}")
    return Path(path)


@io.dicom_headers_read_once()  # a FLAIR folder both masks' DICOM SEGs are placed by
def evaluate_case(prediction, reference, probabilities=None, found_fraction: float = metrics.FOUND_FRACTION,
                  size_classes: metrics.SizeClasses | None = None, flair=None) -> dict:
    """All metrics of one case; each argument is a SimpleITK image or a path to one. `flair`, the case's FLAIR
    (image or path, or None): masks on two different extents (both saved cropped, or one over a larger extent) are
    compared on its grid, slice numbers the scan's (`metrics.MaskPair.from_images`).

    Keys: dice, sensitivity, precision, hd95_mm, avd_percent, lesion_recall, lesion_f1,
    n_reference_lesions, n_predicted_lesions, reference_volume_ml, prediction_volume_ml, roc_auc
    (NaN without probabilities), slice_thickness_mm, lesionwise (dict, see
    `metrics.MaskPair.lesionwise`) and slices (list of {index, dice, sensitivity, precision,
    reference_area_mm2, prediction_area_mm2, lv_ml, lv_group} for every axial slice whose
    reference has lesion), notes (plain-language notes: which metrics an empty mask leaves undefined,
    voxels the ignore label left out, how many ml of a reference over a larger extent lie outside the scan and so
    count as missed). Conventions for empty masks and labels: see `DeepWMLLib.metrics`.
    """
    names = tuple(what if isinstance(value, (sitk.Image, Volume)) else f"{what} {value}"  # a file: named in errors
                  for what, value in (("prediction", prediction), ("reference", reference)))
    reference = as_mask(reference, "reference", flair)
    prediction = as_mask(prediction, "prediction", flair)
    scores = _as_scores(probabilities) if probabilities is not None else None
    return metrics.case_metrics(prediction, reference, scores, found_fraction, size_classes, names, flair)


def _case_row(case: dict, result: dict) -> dict:
    lesionwise = result["lesionwise"]
    return {
        **case,
        **{k: result[k] for k in CASE_COLUMNS if k in result},
        "lesionwise_recall": lesionwise["recall"],
        "lesionwise_precision": lesionwise["precision"],
        "lesionwise_dice": lesionwise["dice"],
        "n_images": len(result["slices"]),
        "notes": " | ".join(result.get("notes", [])),
    }


# ---------------------------------------------------------------------------------------------
# Cohort: tables and statistics


def _finite(values) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(v)]


def _describe(values) -> dict:
    import numpy as np

    finite = _finite(values)
    if not finite:
        return {"n": 0, "median": math.nan, "q1": math.nan, "q3": math.nan}
    q1, median, q3 = np.percentile(finite, [25, 50, 75])
    return {"n": len(finite), "median": float(median), "q1": float(q1), "q3": float(q3)}


def _groups(rows: list[dict], key: str) -> dict[str, list[dict]]:
    grouped: dict[str, list[dict]] = {}
    for row in rows:
        grouped.setdefault(row.get(key) or NOT_GIVEN, []).append(row)
    return dict(sorted(grouped.items(), key=lambda kv: _group_order(key, kv[0])))


def _group_order(key: str, name: str):
    if key == "lv_group" and name in metrics.LV_GROUPS:
        return (0, metrics.LV_GROUPS.index(name), name)
    return (1 if name == NOT_GIVEN else 0, 0, name)


def _table2(image_rows: list[dict], case_rows: list[dict]) -> list[dict]:
    """Median [IQR] per centre, per disease and overall, per image and per case."""
    table = []
    for grouping in ("centre", "disease", "overall"):
        if grouping == "overall":
            image_groups, case_groups = {"all": image_rows}, {"all": case_rows}
        else:
            if all(not r.get(grouping) for r in case_rows):
                continue
            image_groups, case_groups = _groups(image_rows, grouping), _groups(case_rows, grouping)
        for name, cases in case_groups.items():
            images = image_groups.get(name, [])
            row = {"grouping": grouping, "group": name, "n_cases": len(cases), "n_images": len(images)}
            for metric in IMAGE_METRICS:
                stats = _describe(r[metric] for r in images)
                row[f"image_{metric}_median"], row[f"image_{metric}_q1"], row[f"image_{metric}_q3"] = (
                    stats["median"], stats["q1"], stats["q3"])
                row[f"image_{metric}_n"] = stats["n"]
            for metric in ("dice", "hd95_mm", "avd_percent", "lesion_recall", "lesion_f1", "lesionwise_dice"):
                row[f"case_{metric}_median"] = _describe(r[metric] for r in cases)["median"]
            table.append(row)
    return table


def _lv_table(image_rows: list[dict]) -> list[dict]:
    by_group = _groups(image_rows, "lv_group")
    table = []
    bounds = (0.0,) + metrics.LV_GROUP_BOUNDS_ML + (math.inf,)
    for i, name in enumerate(metrics.LV_GROUPS):
        images = by_group.get(name, [])
        upper = "" if math.isinf(bounds[i + 1]) else f"{bounds[i + 1]:g}"
        row = {"lv_group": name, "lv_range_ml": f"[{bounds[i]:g}, {upper or 'inf'})", "n_images": len(images)}
        for metric in IMAGE_METRICS:
            stats = _describe(r[metric] for r in images)
            row[f"{metric}_median"], row[f"{metric}_q1"], row[f"{metric}_q3"] = stats["median"], stats["q1"], stats["q3"]
            row[f"{metric}_n"] = stats["n"]
        table.append(row)
    return table


def _compare_groups(image_rows: list[dict], grouping: str, metric: str) -> list[dict]:
    """Kruskal-Wallis across the groups, then Bonferroni-corrected Mann-Whitney pairs if significant."""
    from scipy import stats

    grouped = _groups(image_rows, grouping)
    groups = {name: _finite(r[metric] for r in rows) for name, rows in grouped.items() if name != NOT_GIVEN}
    usable = {name: values for name, values in groups.items() if len(values) >= MIN_GROUP_SIZE}
    small = [f"{name} (n={len(values)})" for name, values in groups.items() if len(values) < MIN_GROUP_SIZE]
    base = {"test": "Kruskal-Wallis", "metric": metric, "grouping": grouping,
            "groups": ", ".join(f"{n} (n={len(v)})" for n, v in usable.items())}
    unnamed = len(_finite(r[metric] for r in grouped.get(NOT_GIVEN, [])))  # in Table 2 as "(not given)"
    note = "; ".join(filter(None, [
        f"left out with fewer than {MIN_GROUP_SIZE} values: {', '.join(small)}" if small else "",
        f"left out, no {grouping} given: {NOT_GIVEN} (n={unnamed})" if unnamed else ""]))
    if len(usable) < 2:
        return [{**base, "statistic": math.nan, "p": math.nan,
                 "note": "; ".join(filter(None, [f"not run: needs 2 groups with at least {MIN_GROUP_SIZE} values, "
                                                 f"found {len(usable)}", note]))}]
    if len({v for values in usable.values() for v in values}) == 1:
        return [{**base, "statistic": math.nan, "p": math.nan,
                 "note": "; ".join(filter(None, ["not run: every value is identical", note]))}]
    h, p = stats.kruskal(*usable.values())
    verdict = "significant: pairwise tests follow" if p < ALPHA else "not significant"
    results = [{**base, "statistic": float(h), "p": float(p), "note": "; ".join(filter(None, [verdict, note]))}]
    if p < ALPHA:
        names = list(usable)
        pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
        for a, b in pairs:
            x, y = usable[a], usable[b]
            # scipy's own choice, made here so that the note can say which p it is: exact without ties when a group
            # has 8 values or fewer, else the normal approximation (tie-corrected, with continuity correction)
            exact = min(len(x), len(y)) <= 8 and len(set(x + y)) == len(x) + len(y)
            u, p_pair = stats.mannwhitneyu(x, y, alternative="two-sided", method="exact" if exact else "asymptotic")
            results.append({
                "test": "Mann-Whitney U (Bonferroni)", "metric": metric, "grouping": grouping,
                "groups": f"{a} vs {b}", "statistic": float(u), "p": min(1.0, float(p_pair) * len(pairs)),
                "note": f"two-sided, {MW_EXACT if exact else MW_ASYMPTOTIC}; "
                        + (f"p multiplied by {len(pairs)} pairs" if len(pairs) > 1
                           else "one pair: p not multiplied (no correction needed)"),
            })
    return results


def _normality(image_rows: list[dict], metric: str) -> dict:
    from scipy import stats

    values = _finite(r[metric] for r in image_rows)
    row = {"test": "Shapiro-Wilk", "metric": metric, "grouping": "overall", "groups": f"all (n={len(values)})"}
    if len(values) < MIN_GROUP_SIZE:
        return {**row, "statistic": math.nan, "p": math.nan,
                "note": f"not run: needs at least {MIN_GROUP_SIZE} values, found {len(values)}"}
    if max(values) == min(values):
        return {**row, "statistic": math.nan, "p": math.nan, "note": "not run: every value is identical"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns that p is approximate above 5000 values
        w, p = stats.shapiro(values)
    verdict = "not normal" if p < ALPHA else "no evidence against normality"
    return {**row, "statistic": float(w), "p": float(p), "note": verdict}


def _statistics(image_rows: list[dict], case_rows: list[dict]) -> list[dict]:
    results = []
    for metric in IMAGE_METRICS:
        results.append(_normality(image_rows, metric))
    for grouping in ("disease", "centre", "lv_group"):
        if grouping != "lv_group" and all(not r.get(grouping) for r in case_rows):
            continue
        for metric in IMAGE_METRICS:
            results.extend(_compare_groups(image_rows, grouping, metric))
    return results


# ---------------------------------------------------------------------------------------------
# Cohort: figures


def _box_plots(image_rows: list[dict], grouping: str, title: str, path: Path) -> Path | None:
    groups = _groups(image_rows, grouping)
    if grouping == "lv_group":
        groups = {name: groups.get(name, []) for name in metrics.LV_GROUPS}
    if not any(groups.values()):
        return None
    try:
        import matplotlib
    except ImportError as exc:
        raise DeepWMLError("the box plots need matplotlib: pip install 'deepwml[eval]'") from exc

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, axes = plt.subplots(1, len(IMAGE_METRICS), figsize=(4 * len(IMAGE_METRICS), 4), sharey=True)
    names = list(groups)
    for ax, metric in zip(axes, IMAGE_METRICS):
        data = [_finite(r[metric] for r in groups[name]) for name in names]
        positions = [i + 1 for i, values in enumerate(data) if values]
        if positions:
            ax.boxplot([values for values in data if values], positions=positions, widths=0.6)
        ax.set_xticks(range(1, len(names) + 1))
        ax.set_xticklabels([f"{n}\n(n={len(d)})" for n, d in zip(names, data)], fontsize=8)
        ax.set_xlim(0.4, len(names) + 0.6)
        ax.set_title(metric.capitalize())
        ax.set_ylim(-0.02, 1.02)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("per 2D image")
    fig.suptitle(title)
    fig.tight_layout()
    try:
        return io.write_atomically(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    finally:
        plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Cohort: Markdown report


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _median_iqr(row: dict, prefix: str) -> str:
    if not row.get(f"{prefix}_n"):
        return "–"
    return f"{_fmt(row[prefix + '_median'])} [{_fmt(row[prefix + '_q1'])}–{_fmt(row[prefix + '_q3'])}]"


def _p(value) -> str:
    if value is None or not math.isfinite(value):
        return "–"
    return "< 0.001" if value < 0.001 else f"{value:.3f}"


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _report(summary: dict) -> str:
    cases, failed = summary["cases"], summary["failed"]
    lines = [
        "# DeepWML evaluation report",
        "",
        f"Manifest: `{summary['manifest']}`  ",
        f"Cases evaluated: {len(cases)} of {len(cases) + len(failed)}"
        + (f" ({len(failed)} failed, listed at the end)" if failed else "") + "  ",
        f"2D images with reference lesion: {summary['n_images']}  ",
        f"Lesion-wise rule: a reference lesion is found when >= {summary['found_fraction']:.0%} of its voxels "
        f"are marked, a predicted lesion correct when >= {summary['found_fraction']:.0%} of its voxels lie in "
        f"the reference; size classes {summary['size_classes']}.",
        "",
        "Values are median [interquartile range] (quartiles by linear interpolation between order "
        "statistics, numpy's default, Hyndman-Fan type 7). Per-image values are over the axial slices whose "
        "reference has lesion (the DeepWML paper's unit); undefined values (precision of an empty "
        "prediction, metrics of an empty reference) are left out and *n* says how many were used. "
        "Definitions and empty-mask conventions: `DeepWMLLib/metrics.py`.",
        "",
        "## Table 2 — per-image Dice, sensitivity and precision",
        "",
    ]
    header = ["grouping", "group", "cases", "images", "Dice", "sensitivity", "precision"]
    lines.append(_markdown_table(header, [
        [r["grouping"], r["group"], r["n_cases"], r["n_images"],
         *(_median_iqr(r, f"image_{m}") for m in IMAGE_METRICS)] for r in summary["table2"]]))
    lines += ["", "## Per-case metrics (medians: DeepWML, MICCAI WMH challenge, lesion-wise)", ""]
    lines.append(_markdown_table(
        ["grouping", "group", "cases", "Dice", "HD95 mm", "AVD %", "lesion recall", "lesion F1", "lesion-wise Dice"],
        [[r["grouping"], r["group"], r["n_cases"], _fmt(r["case_dice_median"]), _fmt(r["case_hd95_mm_median"], 2),
          _fmt(r["case_avd_percent_median"], 1), _fmt(r["case_lesion_recall_median"]),
          _fmt(r["case_lesion_f1_median"]), _fmt(r["case_lesionwise_dice_median"])] for r in summary["table2"]]))
    lines += ["", "## Per lesion-volume group (Fig. 4)", "",
              "LV = reference lesion area of the 2D image x slice thickness.", ""]
    lines.append(_markdown_table(
        ["LV group", "LV (ml)", "images", "Dice", "sensitivity", "precision"],
        [[r["lv_group"], r["lv_range_ml"], r["n_images"], *(_median_iqr(r, m) for m in IMAGE_METRICS)]
         for r in summary["lv_groups"]]))
    lines += ["", "## Statistics", "",
              f"Two-sided tests on per-image values, alpha = {ALPHA}. Groups with fewer than "
              f"{MIN_GROUP_SIZE} values, and images of cases without the grouping's value ({NOT_GIVEN}), are "
              "left out of a test, which says so; a test that cannot run says why.", ""]
    lines.append(_markdown_table(
        ["test", "metric", "across", "groups", "statistic", "p", "note"],
        [[s["test"], s["metric"], s["grouping"], s["groups"], _fmt(s["statistic"]), _p(s["p"]), s["note"]]
         for s in summary["statistics"]]))
    lines += ["", "## Figures", ""]
    if summary["figures"]:
        lines += [f"![{name}]({name})\n" for name in summary["figures"]]
    elif summary.get("figure_error"):
        lines.append(f"No figure: {summary['figure_error']}.")
    else:
        lines.append("No figure: no 2D image with reference lesion was evaluated.")
    pictured = set(summary.get("pictured", []))
    lines += ["", "## Cases", ""]
    if pictured:
        lines += ["Pictures (a manifest's flair column): the FLAIR's axial slices, green where prediction and "
                  "reference agree, red prediction only, blue reference only.", ""]
    lines.append(_markdown_table(
        ["case", "centre", "disease", "Dice", "sens.", "prec.", "HD95 mm", "AVD %", "lesion recall",
         "lesion F1", "lesion-wise R / P / Dice", "ref ml", "pred ml", "AUC"] + (["picture"] if pictured else []),
        [[c["case"], c.get("centre") or "", c.get("disease") or "", _fmt(c["dice"]), _fmt(c["sensitivity"]),
          _fmt(c["precision"]), _fmt(c["hd95_mm"], 2), _fmt(c["avd_percent"], 1), _fmt(c["lesion_recall"]),
          _fmt(c["lesion_f1"]),
          f"{_fmt(c['lesionwise_recall'])} / {_fmt(c['lesionwise_precision'])} / {_fmt(c['lesionwise_dice'])}",
          _fmt(c["reference_volume_ml"], 2), _fmt(c["prediction_volume_ml"], 2), _fmt(c["roc_auc"], 4)]
         + ([f"[qc/{picture_path_name(c['case'])}](qc/{picture_path_name(c['case'])})" if c["case"] in pictured else ""]
            if pictured else [])
         for c in cases]))
    noted = [c for c in cases if c.get("notes")]
    if noted:  # an empty mask: which of its figures are undefined, and why (per_case.csv's notes)
        lines += ["", "## Notes on cases", ""]
        lines += [f"- **{c['case']}**: {c['notes']}" for c in noted]
    if failed:
        lines += ["", "## Failed cases", ""]
        lines += [f"- **{c['case']}**: {c['error']}" for c in failed]
    if summary.get("unpictured"):
        lines += ["", "## Cases without a picture (their figures are above)", ""]
        lines += [f"- **{c['case']}**: {c['error']}" for c in summary["unpictured"]]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Cohort


FIGURES = (("disease", "Fig. 3: per disease", "fig3_by_disease.png"),
           ("centre", "Fig. 3: per centre", "fig3_by_centre.png"),
           ("lv_group", "Fig. 4: per lesion-volume group", "fig4_by_lv_group.png"))
# every file evaluate_cohort may write in OUTDIR (but the pictures in qc/), its summary first (clear_earlier_run)
EVALUATION_OUTPUTS = ("summary.json", "report.md", "per_image.csv", "per_case.csv", "table2.csv", "lv_groups.csv",
                      "statistics.csv", *(name for _, _, name in FIGURES))


@io.dicom_headers_read_once()  # a FLAIR folder each row's DICOM SEGs are placed by
def evaluate_cohort(manifest: str | os.PathLike, out_dir: str | os.PathLike,
                    found_fraction: float = metrics.FOUND_FRACTION, size_classes: metrics.SizeClasses | None = None,
                    progress: Progress | None = None, cancel: Callable[[], bool] | None = None) -> dict:
    """Evaluate every case of a manifest and write the tables, statistics, figures and report.

    A case that cannot be evaluated is recorded with its error and the others still run.
    Returns the summary (also written as summary.json) with `failed` listing the failed cases.
    """
    size_classes = size_classes or metrics.SizeClasses()
    entries = read_manifest(manifest, ("case", "prediction", "reference"), ("centre", "disease", "probabilities", "flair"),
                            path_columns=("prediction", "reference", "probabilities", "flair"))
    out = io.make_output_dir(out_dir)
    clear_earlier_run(out, EVALUATION_OUTPUTS, entries, manifest)
    case_rows, image_rows, failed, pictured, unpictured, picture_names = [], [], [], [], [], {}
    for number, entry in enumerate(entries):
        if cancel is not None and cancel():
            raise Cancelled()
        info = {"case": entry["case"], "centre": entry.get("centre", ""), "disease": entry.get("disease", "")}
        try:
            reference, prediction = (as_mask(entry[what], what, entry.get("flair") or None)
                                     for what in ("reference", "prediction"))
            result = evaluate_case(prediction, reference, entry.get("probabilities") or None, found_fraction, size_classes,
                                   entry.get("flair") or None)
        except Cancelled:
            raise
        except Exception as exc:  # one bad case must not stop the cohort; its error is reported
            failed.append({**info, "error": case_error(exc)})
            message = f"{entry['case']}: FAILED ({failed[-1]['error']})"
        else:
            case_rows.append(_case_row(info, result))
            image_rows.extend({**info, **s} for s in result["slices"])
            message = f"{entry['case']}: Dice {_fmt(result['dice'])}"
            if entry.get("flair"):  # a picture that cannot be drawn costs the picture, not the case's figures
                try:
                    claim_picture_name(picture_names, entry["case"])
                    picture = comparison_picture(entry["flair"], prediction, reference,
                                                 f"{entry['case']}: Dice {_fmt(result['dice'])}")
                    io.write_bytes(picture, picture_path(out, entry["case"]))
                    pictured.append(entry["case"])
                except Cancelled:
                    raise
                except Exception as exc:
                    unpictured.append({**info, "error": case_error(exc)})
                    message += f" (no picture: {unpictured[-1]['error']})"
            message = with_notes(message, result.get("notes", []))
        if progress is not None:
            progress((number + 1) / len(entries), message)

    summary = {
        "manifest": str(Path(manifest).resolve()),
        "found_fraction": found_fraction,
        "size_classes": ", ".join(f"{k} {v}" for k, v in size_classes.describe().items()),
        "n_images": len(image_rows),
        "cases": case_rows,
        "failed": failed,
        "pictured": pictured,  # cases with OUT/qc/CASE_qc.png
        "unpictured": unpictured,  # cases whose flair could not be pictured (their figures are in)
        "table2": _table2(image_rows, case_rows),
        "lv_groups": _lv_table(image_rows),
        "statistics": _statistics(image_rows, case_rows),
        "figures": [],
    }
    info_columns = ["case", "centre", "disease"]
    write_csv(image_rows, info_columns + ["index", *IMAGE_METRICS, "reference_area_mm2", "prediction_area_mm2",
                                          "lv_ml", "lv_group"], out / "per_image.csv")
    write_csv(case_rows + failed, info_columns + list(CASE_COLUMNS) + ["notes", "error"], out / "per_case.csv")
    write_csv(summary["table2"], list(summary["table2"][0]), out / "table2.csv")
    write_csv(summary["lv_groups"], list(summary["lv_groups"][0]), out / "lv_groups.csv")
    write_csv(summary["statistics"], ["test", "metric", "grouping", "groups", "statistic", "p", "note"],
              out / "statistics.csv")
    for grouping, title, name in FIGURES:
        if grouping != "lv_group" and all(not r.get(grouping) for r in case_rows):
            continue
        try:
            if _box_plots(image_rows, grouping, title, out / name):
                summary["figures"].append(name)
        except DeepWMLError as exc:  # tables and report are still worth having without the figures
            summary["figure_error"] = str(exc)
            break
    io.write_text(_report(summary), out / "report.md")
    write_json(summary, out / "summary.json")
    return summary


# ---------------------------------------------------------------------------------------------
# Command line


def add_lesionwise_options(parser: argparse.ArgumentParser) -> None:
    from .cli import number_in

    parser.add_argument("--found-fraction", type=number_in(0, 1, low_open=True), default=metrics.FOUND_FRACTION,
                        help="fraction of a reference lesion's voxels that must be marked for it to count as "
                             "found (lesion-wise metrics; default %(default)s)")
    parser.add_argument("--size-bounds", type=number_in(0, float("inf"), low_open=True), nargs=2, metavar=("SMALL", "LARGE"),
                        default=metrics.SIZE_BOUNDS_VOXELS,
                        help="lesion size classes: small < SMALL <= medium <= LARGE < large (default 20 150)")
    parser.add_argument("--size-unit", choices=metrics.SIZE_UNITS, default="voxels",
                        help="unit of --size-bounds (default voxels)")


def register(subparsers) -> None:
    from .cli import add_debug_flag

    parser = subparsers.add_parser(
        "evaluate", help="compare predicted masks with reference masks (one case or a cohort)",
        description="One case: --prediction and --reference. A cohort: --manifest CSV (columns case, prediction, "
                    "reference, optional centre, disease, probabilities, flair) and -o OUTDIR, which receives per-image "
                    "and per-case CSVs, the paper's Table 2, LV-group table, statistics, box plots and report.md.")
    parser.add_argument("--prediction", help="predicted mask (any positive label is lesion)")
    parser.add_argument("--reference", help="reference mask (1 lesion, 2 ignore; a two-valued mask such as 0/255 is read as 0/1)")
    parser.add_argument("--probabilities", help="probability map of the prediction, for ROC AUC")
    parser.add_argument("--json", help="write all metrics of the case to this JSON file")
    parser.add_argument("--flair", help="the FLAIR both masks were drawn on: masks on different extents are compared "
                        "on its grid, a DICOM SEG's frames placed by the images of its series they name; for --qc")
    parser.add_argument("--qc", metavar="PNG", help="write a picture of the case: the FLAIR's axial slices with "
                        "agreement green, prediction only red, reference only blue (needs --flair)")
    parser.add_argument("--manifest", help="cohort CSV: case, prediction, reference[, centre, disease, probabilities, "
                        "flair]; with flair, OUTDIR/qc/CASE_qc.png pictures each case as --qc does")
    parser.add_argument("-o", "--output", help="output folder of the cohort report")
    add_lesionwise_options(parser)
    add_debug_flag(parser)
    parser.set_defaults(func=run)


def size_classes_from_args(args) -> metrics.SizeClasses:
    small, large = args.size_bounds
    if small > large:
        raise UsageError(f"--size-bounds SMALL LARGE needs SMALL <= LARGE, got {small:g} {large:g}")
    return metrics.SizeClasses(tuple(args.size_bounds), args.size_unit)


def run(args) -> int:
    size_classes = size_classes_from_args(args)
    if args.manifest:
        if args.prediction or args.reference or args.probabilities or args.json or args.flair or args.qc:
            raise UsageError("--manifest evaluates a cohort; leave out --prediction, --reference, --probabilities, "
                             "--json, --flair and --qc (each case's results go to the -o folder; a flair column "
                             "adds pictures)")
        if not args.output:
            raise UsageError("--manifest needs -o OUTDIR, the folder that receives the report")
        summary = evaluate_cohort(args.manifest, args.output, args.found_fraction, size_classes,
                                  progress=print_progress)
        overall = next(r for r in summary["table2"] if r["grouping"] == "overall")
        print(f"{len(summary['cases'])} cases, {summary['n_images']} images with lesion: median image Dice "
              f"{_median_iqr(overall, 'image_dice')}, sensitivity {_median_iqr(overall, 'image_sensitivity')}, "
              f"precision {_median_iqr(overall, 'image_precision')}")
        print(f"report: {Path(args.output) / 'report.md'}")
        return max(report_failed_cases(summary["failed"], "failed"),
                   report_failed_cases(summary["unpictured"], "could not be pictured (their figures are in the report)"))
    if not (args.prediction and args.reference):
        raise UsageError("give --prediction and --reference for one case, or --manifest and -o for a cohort")
    if args.output:
        raise UsageError("-o is for --manifest cohorts; use --json FILE to save one case's metrics")
    check_single_outputs(args)
    result = evaluate_case(args.prediction, args.reference, args.probabilities, args.found_fraction, size_classes,
                           args.flair)
    picture = (comparison_picture(args.flair, args.prediction, args.reference,
                                  f"{pair_title(args.prediction, args.reference)}: Dice {_fmt(result['dice'])}")
               if args.qc else None)  # a bad FLAIR: refused before anything is printed or written
    print(format_case(result))
    write_single_outputs(args, result, picture)
    return 0


def shown_name(path) -> str:
    """A mask's name in the title of a single case's picture: its folder's name before its case name
    (`patient07/flair_wmh`). Its file name alone told no case from another: tools write each case's files
    under the same names into the case's own folder (three cases' pictures all said FLAIR_WMH)."""
    folder = Path(os.path.abspath(path)).parent.name
    return f"{folder}/{io.case_name(path)}" if folder else io.case_name(path)


def pair_title(first, second) -> str:
    """The title of a single case's picture of two masks (a prediction and its reference, two raters)."""
    return f"{shown_name(first)} against {shown_name(second)}"


def comparison_picture(flair, prediction, reference, title: str | None = None) -> bytes:
    """PNG bytes of `qc.render_comparison` of a case, on the FLAIR's grid (`io.onto_scan`: masks saved cropped on
    its voxels are padded onto it; a FLAIR storing the masks' grid in another voxel order is reordered)."""
    from .qc import png_bytes, render_comparison

    image, prediction, reference = io.onto_scan(io.read_image(_existing(flair, "FLAIR")),
                                                as_mask(prediction, "prediction", flair),
                                                as_mask(reference, "reference", flair), f"FLAIR {flair}", "prediction",
                                                "reference")
    return png_bytes(render_comparison(image, prediction, reference, title))



def format_case(result: dict) -> str:
    """A few human-readable lines summarising `evaluate_case`'s result."""
    lw = result["lesionwise"]
    per_size = ", ".join(f"{name} {v['n_found']}/{v['n_reference']} found" for name, v in lw["by_size"].items())
    groups = {}
    for s in result["slices"]:
        groups[s["lv_group"]] = groups.get(s["lv_group"], 0) + 1
    return "\n".join([
        f"Dice {_fmt(result['dice'])}  sensitivity {_fmt(result['sensitivity'])}  precision {_fmt(result['precision'])}",
        f"HD95 {_fmt(result['hd95_mm'], 2)} mm  AVD {_fmt(result['avd_percent'], 1)} %  "
        f"lesion recall {_fmt(result['lesion_recall'])}  lesion F1 {_fmt(result['lesion_f1'])} (any overlap)",
        f"lesion-wise (>= {lw['found_fraction']:.0%} marked): recall {_fmt(lw['recall'])}  precision "
        f"{_fmt(lw['precision'])}  Dice {_fmt(lw['dice'])}  ({per_size})",
        f"volume: reference {_fmt(result['reference_volume_ml'], 2)} ml in {lesion_count_text(result['n_reference_lesions'])}, "
        f"prediction {_fmt(result['prediction_volume_ml'], 2)} ml in {lesion_count_text(result['n_predicted_lesions'])}"
        + (f"; ROC AUC {_fmt(result['roc_auc'], 4)}" if math.isfinite(result["roc_auc"]) else ""),
        f"2D images with lesion: {len(result['slices'])}"
        + (" (" + ", ".join(f"{g} {groups[g]}" for g in metrics.LV_GROUPS if g in groups) + ")" if groups else ""),
        *(f"note: {note} (–; null in the JSON)" if "undefined" in note else f"note: {note}"
          for note in result.get("notes", [])),
    ])
