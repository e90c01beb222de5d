"""`deepwml evaluate` and `evaluate_case` / `evaluate_cohort` on small synthetic cohorts written to disk."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import REPO
from scipy.stats import mannwhitneyu

from DeepWMLLib import evaluation, io
from DeepWMLLib.cli import main
from DeepWMLLib.errors import Cancelled, DeepWMLError

SPACING = (1.0, 1.0, 5.0)  # 1 pixel = 5 mm3, so LV groups are reached with small squares
# Square sides on slices 1..5: 8x8 -> 0.32 ml (G2); 4x4 -> 0.08 (G1); 14x14 -> 0.98 (G3);
# 20x20 -> 2.0 (G4); 32x32 -> 5.12 (G5).
SIDES = {1: 8, 2: 4, 3: 14, 4: 20, 5: 32}


def write_mask(array: np.ndarray, path, spacing=SPACING) -> str:
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.SetSpacing(spacing)
    image.SetOrigin((-20.0, 10.0, -12.5))
    io.write_image(image, path)
    return str(path)


def reference_array() -> np.ndarray:
    ref = np.zeros((7, 40, 40), np.uint8)
    for k, side in SIDES.items():
        ref[k, 2:2 + side, 2:2 + side] = 1
    return ref


def prediction_array(kept_columns: float) -> np.ndarray:
    """The reference with only the left `kept_columns` fraction of every square."""
    pred = np.zeros((7, 40, 40), np.uint8)
    for k, side in SIDES.items():
        pred[k, 2:2 + side, 2:2 + max(1, round(side * kept_columns))] = 1
    return pred


@pytest.fixture
def cohort(tmp_path):
    """Two centres, two well-sampled diseases (A near perfect, B half missed), a one-case disease C,
    a case whose prediction file is missing and one on another grid."""
    folder = tmp_path / "cohort"
    (folder / "masks").mkdir(parents=True)
    ref = write_mask(reference_array(), folder / "masks" / "ref.nii.gz")
    rows = []
    plan = [("a1", "X", "A", 1.0), ("a2", "Y", "A", 0.9), ("a3", "X", "A", 0.95),
            ("b1", "Y", "B", 0.5), ("b2", "X", "B", 0.4), ("b3", "Y", "B", 0.45), ("c1", "X", "C", 0.7)]
    for case, centre, disease, kept in plan:
        write_mask(prediction_array(kept), folder / "masks" / f"{case}.nii.gz")
        rows.append([case, f"masks/{case}.nii.gz", "masks/ref.nii.gz", centre, disease])
    rows.append(["missing", "masks/nothing.nii.gz", "masks/ref.nii.gz", "X", "A"])
    write_mask(prediction_array(1.0), folder / "masks" / "thick.nii.gz", spacing=(1.0, 1.0, 6.0))
    rows.append(["other_grid", "masks/thick.nii.gz", "masks/ref.nii.gz", "Y", "B"])
    manifest = folder / "cases.csv"
    with open(manifest, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["case", "prediction", "reference", "centre", "disease"])
        writer.writerows(rows)
    assert ref
    return manifest


def read_csv(path) -> list[dict]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        return list(csv.DictReader(f))


def test_cohort_writes_the_papers_tables_statistics_figures_and_report(cohort, tmp_path, monkeypatch, capsys):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # relative paths in the manifest are relative to the manifest
    out = tmp_path / "report"
    assert main(["evaluate", "--manifest", str(cohort), "-o", str(out)]) == 1  # two cases failed
    err = capsys.readouterr().err
    assert "missing" in err and "other_grid" in err and "different voxel grids" in err

    per_case = {r["case"]: r for r in read_csv(out / "per_case.csv")}
    assert set(per_case) == {"a1", "a2", "a3", "b1", "b2", "b3", "c1", "missing", "other_grid"}
    assert "does not exist" in per_case["missing"]["error"] and per_case["a1"]["error"] == ""
    assert float(per_case["a1"]["dice"]) == 1.0 and float(per_case["a1"]["hd95_mm"]) == 0.0

    per_image = read_csv(out / "per_image.csv")
    assert len(per_image) == 7 * len(SIDES)
    a1 = {int(r["index"]): r["lv_group"] for r in per_image if r["case"] == "a1"}
    assert a1 == {1: "G2", 2: "G1", 3: "G3", 4: "G4", 5: "G5"}

    table2 = {(r["grouping"], r["group"]): r for r in read_csv(out / "table2.csv")}
    assert {k for k in table2} == {("centre", "X"), ("centre", "Y"), ("disease", "A"), ("disease", "B"),
                                   ("disease", "C"), ("overall", "all")}
    dice_b = [float(r["dice"]) for r in per_image if r["disease"] == "B"]
    assert float(table2[("disease", "B")]["image_dice_median"]) == pytest.approx(np.median(dice_b))
    assert float(table2[("overall", "all")]["image_dice_median"]) == pytest.approx(
        np.median([float(r["dice"]) for r in per_image]))
    assert table2[("disease", "C")]["n_cases"] == "1" and table2[("overall", "all")]["n_cases"] == "7"

    lv = {r["lv_group"]: r for r in read_csv(out / "lv_groups.csv")}
    assert list(lv) == ["G1", "G2", "G3", "G4", "G5"] and all(lv[g]["n_images"] == "7" for g in lv)

    stats = read_csv(out / "statistics.csv")
    kruskal = next(s for s in stats if s["test"] == "Kruskal-Wallis" and s["grouping"] == "disease"
                   and s["metric"] == "dice")
    assert float(kruskal["p"]) < 0.05
    assert kruskal["groups"] == "A (n=15), B (n=15), C (n=5)"
    pairs = {s["groups"]: float(s["p"]) for s in stats if s["test"].startswith("Mann-Whitney")
             and s["grouping"] == "disease" and s["metric"] == "dice"}
    assert list(pairs) == ["A vs B", "A vs C", "B vs C"]
    dice = {d: [float(r["dice"]) for r in per_image if r["disease"] == d] for d in "AB"}
    raw = mannwhitneyu(dice["A"], dice["B"], alternative="two-sided").pvalue
    assert pairs["A vs B"] == pytest.approx(min(1.0, 3 * raw), rel=1e-5)  # Bonferroni over 3 pairs
    assert any(s["test"] == "Shapiro-Wilk" for s in stats)

    for name in ("fig3_by_disease.png", "fig3_by_centre.png", "fig4_by_lv_group.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text(encoding="utf-8")
    for text in ("Table 2", "Per lesion-volume group", "Kruskal-Wallis", "![fig4_by_lv_group.png]",
                 "**missing**", "**other_grid**"):
        assert text in report
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert len(summary["cases"]) == 7 and len(summary["failed"]) == 2
    assert not [p for p in out.iterdir() if ".part" in p.name]  # atomic writes leave no temporary files


def test_groups_too_small_for_a_test_are_reported_not_crashed(tmp_path):
    folder = tmp_path / "tiny"
    folder.mkdir()
    ref = np.zeros((4, 12, 12), np.uint8)
    ref[1, 2:5, 2:5] = 1
    ref[2, 2:4, 2:4] = 1
    write_mask(ref, folder / "ref.nii.gz")
    write_mask(ref, folder / "pred.nii.gz")
    (folder / "cases.csv").write_text("case,prediction,reference,disease\none,pred.nii.gz,ref.nii.gz,SVD\n")
    summary = evaluation.evaluate_cohort(folder / "cases.csv", tmp_path / "out")
    notes = [s["note"] for s in summary["statistics"]]
    assert any("not run: needs 2 groups" in n for n in notes)
    assert any("needs at least 3 values" in n for n in notes)
    report = (tmp_path / "out" / "report.md").read_text(encoding="utf-8")
    assert "not run" in report and "| overall | all | 1 | 2 |" in report


def test_statistics_match_scipy_and_say_every_group_left_out():
    """statistics.csv against scipy on edge cases: a group of one value and one without a disease left out, and
    said so (images of cases without a disease were left out of the tests unsaid, though Table 2 shows them);
    Bonferroni over the pairs tested; p capped at 1; identical values; NaN (undefined) values left out."""
    from scipy import stats as scipy_stats

    values = {"A": [0.1, 0.2, 0.3, 0.15, float("nan")], "B": [0.7, 0.8, 0.9, 0.85, None], "C": [0.4, 0.45, 0.5, 0.55],
              "D": [0.6], "": [0.95, 0.96, 0.97]}
    rows = [{"disease": group, "dice": v} for group, vs in values.items() for v in vs]
    kruskal, *pairs = evaluation._compare_groups(rows, "disease", "dice")
    a, b, c = ([v for v in values[g] if v is not None and v == v] for g in "ABC")
    assert kruskal["groups"] == "A (n=4), B (n=4), C (n=4)"
    assert kruskal["p"] == pytest.approx(scipy_stats.kruskal(a, b, c).pvalue, rel=1e-12) and kruskal["p"] < 0.05
    assert "fewer than 3 values: D (n=1)" in kruskal["note"]
    assert "no disease given: (not given) (n=3)" in kruskal["note"]
    assert [p["groups"] for p in pairs] == ["A vs B", "A vs C", "B vs C"]
    for pair, (x, y) in zip(pairs, ((a, b), (a, c), (b, c))):
        assert pair["p"] == pytest.approx(min(1.0, 3 * scipy_stats.mannwhitneyu(x, y).pvalue), rel=1e-12)
    # two groups alike and a third apart: the alike pair's p (scipy's 1.0) stays 1 after the factor of 3
    same = [{"disease": g, "dice": v} for g, vs in {"A": [0.5] * 5, "B": [0.5] * 5, "C": [0.1, 0.2, 0.3, 0.1, 0.2]}.items()
            for v in vs]
    _, alike, *_ = evaluation._compare_groups(same, "disease", "dice")
    assert alike["groups"] == "A vs B" and alike["p"] == 1.0
    flat = [{"disease": g, "dice": 0.5} for g in "AABBBCCC"] + [{"disease": "", "dice": 0.9}]
    (only,) = evaluation._compare_groups(flat, "disease", "dice")
    assert only["note"].startswith("not run: every value is identical") and "(not given) (n=1)" in only["note"]


def test_mann_whitney_pairs_say_whether_their_p_is_exact_or_approximate():
    """statistics.csv's note names the p of each pair (two-sided): exact for small groups without ties, else the
    normal approximation (whose p can be far from the exact one: 0.027 against 0.001 for 152 images against 3)."""
    from scipy import stats as scipy_stats

    values = {"A": [0.1, 0.2, 0.3], "B": [0.7, 0.8, 0.9], "C": [0.4, 0.5, 0.5, 0.6] * 3}  # C has ties
    rows = [{"disease": group, "dice": v} for group, vs in values.items() for v in vs]
    kruskal, *pairs = evaluation._compare_groups(rows, "disease", "dice")
    assert kruskal["p"] < 0.05
    notes = {p["groups"]: p["note"] for p in pairs}
    assert notes["A vs B"].startswith("two-sided, " + evaluation.MW_EXACT)
    assert notes["A vs C"].startswith("two-sided, " + evaluation.MW_ASYMPTOTIC)
    for pair in pairs:
        x, y = (values[g] for g in pair["groups"].split(" vs "))
        method = "exact" if evaluation.MW_EXACT in pair["note"] else "asymptotic"
        p = scipy_stats.mannwhitneyu(x, y, alternative="two-sided", method=method).pvalue
        assert pair["p"] == pytest.approx(min(1.0, 3 * p), rel=1e-12)
        assert "p multiplied by 3 pairs" in pair["note"]


def _rows(values: dict, grouping: str = "disease") -> list[dict]:
    """Per-image rows with the same value for every image metric."""
    return [{grouping: g, "dice": v, "sensitivity": v, "precision": v} for g, vs in values.items() for v in vs]


def test_pairwise_tests_follow_only_a_significant_kruskal_wallis_and_are_bonferroni_corrected_over_all_pairs():
    """p values derived by hand (no ties, so Kruskal-Wallis H = 12 / (N (N + 1)) sum(R^2 / n) - 3 (N + 1), and with 3
    groups (2 degrees of freedom) p = exp(-H / 2); two fully separated groups of m and n values: exact two-sided
    Mann-Whitney p = 2 / C(m + n, m))."""
    # 3 x 3 interleaved: rank sums 12, 15, 18, H = 12/90 x 693/3 - 30 = 0.8, p = exp(-0.4) = 0.67: no pairwise tests
    (only,) = evaluation._compare_groups(_rows({"A": [0.1, 0.4, 0.7], "B": [0.2, 0.5, 0.8], "C": [0.3, 0.6, 0.9]}),
                                         "disease", "dice")
    assert only["statistic"] == pytest.approx(0.8) and only["p"] == pytest.approx(math.exp(-0.4))
    assert only["note"] == "not significant"
    # 3 x 3 separated: rank sums 6, 15, 24, H = 12/90 x 837/3 - 30 = 7.2, p = exp(-3.6) = 0.027 < 0.05: pairs follow,
    # each 2 / C(6, 3) = 0.1, times 3 pairs
    kruskal, *pairs = evaluation._compare_groups(
        _rows({"A": [0.1, 0.2, 0.3], "B": [0.4, 0.5, 0.6], "C": [0.7, 0.8, 0.9]}), "disease", "dice")
    assert kruskal["statistic"] == pytest.approx(7.2) and kruskal["p"] == pytest.approx(math.exp(-3.6))
    assert kruskal["note"] == "significant: pairwise tests follow"
    assert [(p["groups"], p["p"]) for p in pairs] == [(g, pytest.approx(0.3)) for g in ("A vs B", "A vs C", "B vs C")]
    # 4 groups of 4 separated: 6 pairs, each 2 / C(8, 4) = 2/70, times 6 (the pairs, not the 4 groups)
    _, *pairs = evaluation._compare_groups(
        _rows({g: [0.1 * i + 0.01 * j for j in range(4)] for i, g in enumerate("ABCD")}), "disease", "dice")
    assert len(pairs) == 6 and all(p["p"] == pytest.approx(6 * 2 / 70) for p in pairs)
    assert all("p multiplied by 6 pairs" in p["note"] for p in pairs)
    # 8 against 9 values without ties: exact (scipy's rule: a group of 8 or fewer), 2 / C(17, 8) = 2 / 24310
    _, pair = evaluation._compare_groups(
        _rows({"A": [0.01 * j for j in range(8)], "B": [0.5 + 0.01 * j for j in range(9)]}), "disease", "dice")
    assert pair["note"].startswith("two-sided, " + evaluation.MW_EXACT) and pair["p"] == pytest.approx(2 / 24310)


def test_statistics_compare_the_lv_groups_and_give_quartiles_of_type_7():
    """statistics.csv tests across LV groups G1..G5 even without disease or centre (the paper's Fig. 4); lv_groups.csv
    gives numpy's linear quartiles: of 0.1, 0.2, 0.3, 0.4 at positions 0.75 and 2.25 of 0..3, 0.175 and 0.325."""
    rows = _rows({"G1": [0.1, 0.2, 0.3], "G2": [0.4, 0.5, 0.6], "G3": [0.7, 0.8, 0.9]}, "lv_group")
    tested = [r for r in evaluation._statistics(rows, [{}]) if r["test"] == "Kruskal-Wallis"]
    assert [(r["grouping"], r["metric"]) for r in tested] == [("lv_group", m) for m in evaluation.IMAGE_METRICS]
    assert tested[0]["p"] == pytest.approx(math.exp(-3.6))
    g1 = evaluation._lv_table(_rows({"G1": [0.4, 0.1, 0.3, 0.2]}, "lv_group"))[0]
    assert (g1["dice_q1"], g1["dice_median"], g1["dice_q3"]) == pytest.approx((0.175, 0.25, 0.325))


def test_shapiro_wilk_says_not_normal_only_when_p_is_below_alpha():
    from scipy import stats as scipy_stats

    two_values = [0.0] * 10 + [1.0] * 10  # two spikes: as far from normal as 20 values get
    row = evaluation._normality(_rows({"A": two_values}), "dice")
    assert row["p"] == pytest.approx(scipy_stats.shapiro(two_values).pvalue) and row["p"] < 0.05
    assert row["note"] == "not normal"
    normal = list(scipy_stats.norm.ppf(np.linspace(0.05, 0.95, 20)))  # the normal's own quantiles
    row = evaluation._normality(_rows({"A": normal}), "dice")
    assert row["p"] > 0.05 and row["note"] == "no evidence against normality"


def test_per_case_row_and_printed_summary_carry_each_figure_under_its_own_name():
    """Reference: two 8-voxel lesions on slices 1 and 3; prediction: the first exactly. By hand: lesion-wise recall
    1/2, precision 1/1, Dice (1 + 1) / (2 + 1) = 2/3; AVD |8 - 16| / 16 = 50 %; 2 images with reference lesion."""
    ref = np.zeros((5, 10, 10), np.uint8)
    ref[1, 2:4, 2:6] = 1
    ref[3, 6:8, 2:6] = 1
    pred = np.zeros_like(ref)
    pred[1, 2:4, 2:6] = 1
    images = []
    for array in (pred, ref):
        images.append(sitk.GetImageFromArray(array))
        images[-1].SetSpacing(SPACING)
    result = evaluation.evaluate_case(*images)
    row = evaluation._case_row({"case": "x"}, result)
    assert (row["lesionwise_recall"], row["lesionwise_precision"]) == (0.5, 1.0)
    assert row["lesionwise_dice"] == pytest.approx(2 / 3) and row["n_images"] == 2
    text = evaluation.format_case(result)
    assert "AVD 50.0 %" in text and "recall 0.500  precision 1.000  Dice 0.667" in text


def test_table2_counts_only_the_defined_values_it_takes_the_median_of():
    """Two images, one with no prediction (precision undefined, NaN): precision's median is over the one defined
    value, and its n says 1, not 2."""
    images = [{"dice": 0.0, "sensitivity": 0.0, "precision": math.nan}, {"dice": 0.5, "sensitivity": 0.5, "precision": 1.0}]
    case = dict.fromkeys(("dice", "hd95_mm", "avd_percent", "lesion_recall", "lesion_f1", "lesionwise_dice"), 0.5)
    (overall,) = evaluation._table2(images, [case])
    assert (overall["n_images"], overall["image_precision_n"], overall["image_precision_median"]) == (2, 1, 1.0)
    assert (overall["image_dice_n"], overall["image_dice_median"]) == (2, 0.25)


def test_lv_groups_table_names_each_groups_range_closed_below_and_open_above():
    table = evaluation._lv_table([])
    assert [r["lv_range_ml"] for r in table] == ["[0, 0.2)", "[0.2, 0.7)", "[0.7, 2)", "[2, 5)", "[5, inf)"]


def test_a_cohort_where_every_case_fails_still_gets_a_report(tmp_path):
    (tmp_path / "cases.csv").write_text("case,prediction,reference\nx,none.nii.gz,none.nii.gz\n")
    assert main(["evaluate", "--manifest", str(tmp_path / "cases.csv"), "-o", str(tmp_path / "out")]) == 1
    report = (tmp_path / "out" / "report.md").read_text(encoding="utf-8")
    assert "Cases evaluated: 0 of 1" in report and "No figure" in report


def test_single_case_json_has_the_documented_keys_and_null_for_undefined(tmp_path, capsys):
    ref = reference_array()
    pred = np.zeros_like(ref)
    pred[1, 2:10, 2:10] = 1                      # only the first square found
    probabilities = sitk.GetImageFromArray(ref.astype(np.float32) * 0.8 + 0.1)
    probabilities.SetSpacing(SPACING)
    probabilities.SetOrigin((-20.0, 10.0, -12.5))
    io.write_image(probabilities, tmp_path / "prob.nii.gz")
    args = ["evaluate", "--prediction", write_mask(pred, tmp_path / "p.nii.gz"),
            "--reference", write_mask(ref, tmp_path / "r.nii.gz"),
            "--probabilities", str(tmp_path / "prob.nii.gz"), "--json", str(tmp_path / "m.json")]
    assert main(args) == 0
    assert "Dice" in capsys.readouterr().out
    result = json.loads((tmp_path / "m.json").read_text(encoding="utf-8"))
    for key in ("dice", "sensitivity", "precision", "hd95_mm", "avd_percent", "lesion_recall", "lesion_f1",
                "lesionwise", "slices", "roc_auc"):
        assert key in result
    total = sum(side * side for side in SIDES.values())
    assert result["roc_auc"] == 1.0 and result["precision"] == 1.0
    assert result["sensitivity"] == pytest.approx(64 / total)
    assert result["n_reference_lesions"] == 1  # squares on neighbouring slices touch: one 3D lesion
    assert [s["index"] for s in result["slices"]] == sorted(SIDES)
    missed = result["slices"][1]
    assert set(missed) >= {"index", "dice", "sensitivity", "precision", "lv_ml", "lv_group"}
    assert missed["precision"] is None and missed["dice"] == 0.0  # NaN is written as JSON null


def test_evaluate_case_takes_images_or_paths(tmp_path):
    ref = reference_array()
    path = write_mask(ref, tmp_path / "r.nii.gz")
    from_paths = evaluation.evaluate_case(path, path)
    from_images = evaluation.evaluate_case(io.read_mask(path), io.read_mask(path))
    assert from_paths["dice"] == from_images["dice"] == 1.0
    assert math.isnan(from_paths["roc_auc"])


@pytest.mark.parametrize("content, message", [
    ("case,prediction\nx,p.nii.gz\n", "lacks column(s) reference"),
    ("case,prediction,reference\nx,p.nii.gz,r.nii.gz\nx,p.nii.gz,r.nii.gz\n", "listed twice"),
    ("case,prediction,reference\n", "lists no cases"),
])
def test_bad_manifests_give_one_line_errors(tmp_path, capsys, content, message):
    (tmp_path / "cases.csv").write_text(content)
    assert main(["evaluate", "--manifest", str(tmp_path / "cases.csv"), "-o", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


@pytest.mark.parametrize("args, message", [
    (["evaluate"], "give --prediction and --reference"),
    (["evaluate", "--manifest", "cases.csv"], "needs -o OUTDIR"),
    (["evaluate", "--prediction", "p.nii.gz", "--reference", "r.nii.gz", "-o", "out"], "use --json"),
    (["evaluate", "--manifest", "m.csv", "-o", "o", "--prediction", "p.nii.gz"], "leave out --prediction"),
])
def test_wrong_argument_combinations_say_what_to_do(capsys, args, message):
    assert main(args) == 2  # usage errors exit 2, as argparse's own do
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("option, says", [(["--found-fraction", "1.5"], "above 0 and at most 1"),
                                          (["--size-bounds", "-1", "100"], "above 0"),
                                          (["--size-bounds", "200", "100"], "SMALL <= LARGE")])
def test_lesionwise_options_out_of_range_are_usage_errors(capsys, option, says):
    try:
        code = main(["evaluate", "--prediction", "p.nii.gz", "--reference", "r.nii.gz", *option])
    except SystemExit as exc:  # argparse's own
        code = exc.code
    assert code == 2 and says in capsys.readouterr().err


def test_cancel_stops_a_cohort(cohort, tmp_path):
    with pytest.raises(Cancelled):
        evaluation.evaluate_cohort(cohort, tmp_path / "out", cancel=lambda: True)


def test_metrics_commands_import_neither_torch_nor_matplotlib():
    code = ("import sys, DeepWMLLib.evaluation, DeepWMLLib.consensus, DeepWMLLib.metrics; "
            "print(sorted(m for m in ('torch', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, encoding="utf-8", errors="replace", check=True)
    assert out.stdout.strip() == "[]"


def test_an_empty_mask_is_explained_in_the_text_and_per_case_csv(tmp_path, capsys):
    """An empty reference printed 'sensitivity –  HD95 – mm  AVD – %' and per_case.csv 'nan' with no word of why."""
    ref = write_mask(reference_array(), tmp_path / "ref.nii.gz")
    empty = write_mask(np.zeros((7, 40, 40)), tmp_path / "empty.nii.gz")
    assert main(["evaluate", "--prediction", empty, "--reference", ref]) == 0
    printed = capsys.readouterr().out
    assert "note: the prediction is empty: precision, HD95 and lesion-wise precision are undefined" in printed
    manifest = tmp_path / "cases.csv"
    manifest.write_text("case,prediction,reference\nnone,empty.nii.gz,ref.nii.gz\nall,ref.nii.gz,ref.nii.gz\n")
    evaluation.evaluate_cohort(manifest, tmp_path / "out")
    per_case = {r["case"]: r for r in read_csv(tmp_path / "out" / "per_case.csv")}
    assert per_case["none"]["precision"] == "nan" and "the prediction is empty" in per_case["none"]["notes"]
    assert per_case["all"]["notes"] == ""
    report = (tmp_path / "out" / "report.md").read_text(encoding="utf-8")
    assert "## Notes on cases\n\n- **none**: the prediction is empty" in report and "**all**" not in report


def test_names_a_spreadsheet_would_take_for_formulas_are_text_in_every_table(tmp_path):
    """A case "+C AX FLAIR" or a centre "-north" showed #NAME? in Excel and LibreOffice, which take a cell beginning
    with =, +, - or @ for a formula, and "=1+1" ran as one (CSV injection): such a cell now begins with an
    apostrophe, which the spreadsheet does not show, in per_case.csv, per_image.csv and the tables by group."""
    write_mask(reference_array(), tmp_path / "ref.nii.gz")
    write_mask(prediction_array(0.5), tmp_path / "pred.nii.gz")
    manifest = tmp_path / "cases.csv"
    manifest.write_text("case,prediction,reference,centre,disease\n=1+1,pred.nii.gz,ref.nii.gz,-north,@home\n"
                        "+C AX FLAIR,ref.nii.gz,ref.nii.gz,-north,@home\n")
    evaluation.evaluate_cohort(manifest, tmp_path / "out")
    per_case = {r["case"]: r for r in read_csv(tmp_path / "out" / "per_case.csv")}
    assert set(per_case) == {"'=1+1", "'+C AX FLAIR"}
    assert per_case["'=1+1"]["centre"] == "'-north" and per_case["'=1+1"]["disease"] == "'@home"
    assert 0 < float(per_case["'=1+1"]["dice"]) < 1 and per_case["'+C AX FLAIR"]["dice"] == "1"
    assert {r["case"] for r in read_csv(tmp_path / "out" / "per_image.csv")} == {"'=1+1", "'+C AX FLAIR"}
    groups = {r["group"] for r in read_csv(tmp_path / "out" / "table2.csv")}
    assert {"'-north", "'@home"} <= groups and not any(g[:1] in "=+-@" for g in groups)


def test_the_two_lesion_recalls_printed_say_what_each_counts(tmp_path, capsys):
    """Real patient07 printed 'lesion recall 0.297  lesion F1 0.193' and on the next line 'lesion-wise (>= 40%
    marked): recall 0.189': two lesion recalls, the first without its rule (MICCAI: any overlap detects)."""
    ref = write_mask(reference_array(), tmp_path / "ref.nii.gz")
    pred = write_mask(prediction_array(0.3), tmp_path / "pred.nii.gz")  # every lesion touched, under 40 % marked
    assert main(["evaluate", "--prediction", pred, "--reference", ref]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "lesion recall 1.000" in lines[1] and "recall 0.000" in lines[2]  # the same lesions, two rules
    assert lines[1].startswith("HD95 ") and lines[1].endswith(" (any overlap)") and "lesion recall" in lines[1]
    assert lines[2].startswith("lesion-wise (>= 40% marked): recall ")


def test_a_grid_error_of_one_case_names_both_files(tmp_path):
    """'prediction and reference are on different voxel grids' did not say which files."""
    ref = write_mask(reference_array(), tmp_path / "manual.nii.gz")
    pred = write_mask(reference_array(), tmp_path / "thick_wmh.nii.gz", spacing=(1.0, 1.0, 6.0))
    with pytest.raises(evaluation.DeepWMLError, match=r"prediction .*thick_wmh.nii.gz and reference .*manual.nii.gz "
                                                      r"are on different voxel grids \(spacing"):
        evaluation.evaluate_case(pred, ref)


def test_a_reference_whose_file_name_says_flair_gets_the_two_mask_advice_not_the_scans(tmp_path):
    """The advice for a mask off its FLAIR's grid was chosen by "FLAIR" anywhere in the other's name: a reference
    mask in a folder or file named FLAIR (sub01_FLAIR_manual.nii.gz) got "a mask must lie on the grid of the scan
    it was drawn on ... put the mask onto reference ...'s grid", as if the reference were the scan; two masks get
    the two-mask advice, whatever their files are called, and a mask against its FLAIR still gets the scan's."""
    from DeepWMLLib import io

    (tmp_path / "FLAIR").mkdir()
    ref = write_mask(reference_array(), tmp_path / "FLAIR" / "sub01_FLAIR_manual.nii.gz")
    pred = write_mask(reference_array(), tmp_path / "thick_wmh.nii.gz", spacing=(1.0, 1.0, 6.0))
    with pytest.raises(evaluation.DeepWMLError) as refused:
        evaluation.evaluate_case(pred, ref)
    assert "export both on the same grid (resample one onto the other first)" in str(refused.value)
    assert "scan it was drawn on" not in str(refused.value)
    thick, manual = sitk.ReadImage(str(pred)), sitk.ReadImage(str(ref))
    for name in ("the FLAIR", "the baseline FLAIR", f"its FLAIR {tmp_path / 'flair.nii.gz'}", "FLAIR x.nii.gz"):
        with pytest.raises(evaluation.DeepWMLError, match="was it drawn on another series or visit"):
            io.check_same_grid(thick, manual, "the mask", name)



def _manifest_variant(cohort, name: str, folder: str, center: bool = False):
    """lists/NAME: the cohort's a* and b* cases, their masks/ paths written as `folder`."""
    lines = cohort.read_text(encoding="utf-8").splitlines()
    header = lines[0].replace("centre", "center") if center else lines[0]
    rows = [line.replace("masks/", folder) for line in lines[1:] if line.startswith(("a", "b"))]
    path = cohort.parent.parent / "lists" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def test_a_cohort_manifest_made_on_windows_is_read_on_linux(cohort, tmp_path):
    """Relative paths with backslashes (..\\cohort\\masks\\a1.nii.gz) named no file: every case failed."""
    windows = _manifest_variant(cohort, "windows.csv", "..\\cohort\\masks\\")
    assert main(["evaluate", "--manifest", str(windows), "-o", str(tmp_path / "out")]) == 0
    assert {r["case"] for r in read_csv(tmp_path / "out" / "per_case.csv")} == {"a1", "a2", "a3", "b1", "b2", "b3"}
    drive = tmp_path / "lists" / "drive.csv"  # a drive path cannot be reached here: said so
    drive.write_text("case,prediction,reference\nx,D:\\cohort\\x_pred.nii.gz,D:\\cohort\\x_ref.nii.gz\n")
    with pytest.raises(DeepWMLError, match=r"D:\\cohort\\x_pred.nii.gz is a Windows path"):
        evaluation.read_manifest(drive, ("case", "prediction", "reference"), path_columns=("prediction", "reference"))


def test_a_center_column_is_the_centre_of_a_cohort(cohort, tmp_path):
    """An American 'center' column was left out: no centre in per_case.csv, Table 2 or the figures."""
    american = _manifest_variant(cohort, "american.csv", "../cohort/masks/", center=True)
    assert main(["evaluate", "--manifest", str(american), "-o", str(tmp_path / "out")]) == 0
    per_case = {r["case"]: r for r in read_csv(tmp_path / "out" / "per_case.csv")}
    assert per_case["a1"]["centre"] == "X" and per_case["a2"]["centre"] == "Y"
    table2 = {(r["grouping"], r["group"]) for r in read_csv(tmp_path / "out" / "table2.csv")}
    assert {("centre", "X"), ("centre", "Y")} <= table2


def test_cohort_paths_written_from_the_current_folder_are_explained(cohort, tmp_path, monkeypatch, capsys):
    """Paths typed relative to where the command runs (cohort/masks/a1.nii.gz, the manifest in lists/) failed
    every case with 'does not exist'; the manifest is now refused in one line saying why, before anything runs."""
    typed_here = _manifest_variant(cohort, "here.csv", "cohort/masks/")
    monkeypatch.chdir(tmp_path)
    assert main(["evaluate", "--manifest", str(typed_here), "-o", str(tmp_path / "here")]) == 1
    err = capsys.readouterr().err
    assert (f"12 file(s) of the manifest {typed_here} do not exist (first: a1: " in err and "not from the current "
            "folder, where 12 of them exist (e.g. cohort/masks/a1.nii.gz)" in err and err.count("\n") == 1)
    assert not (tmp_path / "here").exists()


def test_a_missing_file_is_not_told_as_read_from_the_wrong_folder(cohort, tmp_path, monkeypatch, capsys):
    """A manifest with one file missing, run from a copy of the cohort holding that file (masks/nothing.nii.gz
    there): the whole manifest was refused, 'relative paths are read from the manifest's folder, not from the
    current folder ...: write them relative to the manifest's folder, or in full', of paths written in full, or
    written relative to the manifest's folder, from which the others name their files. The hint is for manifests
    written relative to the current folder; such a file is its case's failure, as before."""
    full = cohort.parent / "full.csv"
    masks = cohort.parent / "masks"
    full.write_text(f"case,prediction,reference\na1,{masks}/a1.nii.gz,{masks}/ref.nii.gz\n"
                    f"missing,{masks}/nothing.nii.gz,{masks}/ref.nii.gz\n")
    copy = tmp_path / "copy"
    (copy / "masks").mkdir(parents=True)
    write_mask(reference_array(), copy / "masks" / "nothing.nii.gz")
    monkeypatch.chdir(copy)
    assert main(["evaluate", "--manifest", str(full), "-o", str(tmp_path / "out")]) == 1  # the one case failed
    assert "current folder" not in capsys.readouterr().err
    per_case = {r["case"]: r for r in read_csv(tmp_path / "out" / "per_case.csv")}
    assert float(per_case["a1"]["dice"]) == 1.0 and "nothing.nii.gz does not exist" in per_case["missing"]["error"]
    # the cohort's own manifest, written relative to its folder, from which its other paths name their files: its
    # missing case was refused whole, told to 'write them relative to the manifest's folder', as they are
    assert main(["evaluate", "--manifest", str(cohort), "-o", str(tmp_path / "cohort_out")]) == 1
    assert "current folder" not in capsys.readouterr().err
    per_case = {r["case"]: r for r in read_csv(tmp_path / "cohort_out" / "per_case.csv")}
    assert float(per_case["a1"]["dice"]) == 1.0 and "nothing.nii.gz does not exist" in per_case["missing"]["error"]
    mixed = tmp_path / "mixed.csv"  # predictions typed from the current folder, the reference from the manifest's
    (copy / "masks" / "a1.nii.gz").write_bytes((masks / "a1.nii.gz").read_bytes())
    mixed.write_text("case,prediction,reference\na1,masks/a1.nii.gz,cohort/masks/ref.nii.gz\n"
                     "missing,masks/nothing.nii.gz,cohort/masks/ref.nii.gz\n")
    with pytest.raises(DeepWMLError, match=r"not from the current folder, where 2 of them exist \(e.g. "
                                           r"masks/a1.nii.gz\)"):
        evaluation.read_manifest(mixed, ("case", "prediction", "reference"), path_columns=("prediction", "reference"))
    relative = cohort.parent / "relative.csv"  # written relative to the current folder: still told, and refused
    relative.write_text("case,prediction,reference\nmissing,masks/nothing.nii.gz,masks/ref.nii.gz\n")
    with pytest.raises(DeepWMLError, match=r"not from the current folder, where 1 of them exist \(e.g. "
                                           r"masks/nothing.nii.gz\)"):
        evaluation.read_manifest(relative, ("case", "prediction", "reference"), path_columns=("prediction",))


def test_a_path_whose_look_up_fails_is_its_cases_failure_not_the_cohorts(cohort, tmp_path, monkeypatch, capsys):
    """The manifest's check for missing files (ae31374) asked Path.exists, which raises where the look-up fails
    otherwise: a name too long for the file system, or a folder the user may not search (a share whose permissions
    changed). evaluate stopped before any case with 'internal error: OSError' (where that case alone failed
    before); now that case fails, saying why, and the others are evaluated."""
    long = "p" * 300 + ".nii.gz"  # ENAMETOOLONG: a real look-up failure, as root searches any folder
    locked = cohort.parent / "locked"  # a folder without search permission, refused here as root is not
    monkeypatch.setattr(io.Path, "exists", _refusing_exists(io.Path.exists, locked))
    manifest = tmp_path / "lookups.csv"
    manifest.write_text(f"case,prediction,reference\na1,cohort/masks/a1.nii.gz,cohort/masks/ref.nii.gz\n"
                        f"long,cohort/masks/{long},cohort/masks/ref.nii.gz\n"
                        f"locked,cohort/locked/a2.nii.gz,cohort/masks/ref.nii.gz\n"
                        f"windows,cohort\\locked\\a3.nii.gz,cohort/masks/ref.nii.gz\n")
    assert main(["evaluate", "--manifest", str(manifest), "-o", str(tmp_path / "out")]) == 1  # cases failed
    assert "internal error" not in capsys.readouterr().err.split("\n")[0]
    per_case = {r["case"]: r for r in read_csv(tmp_path / "out" / "per_case.csv")}
    assert float(per_case["a1"]["dice"]) == 1.0
    assert "File name too long" in per_case["long"]["error"] and per_case["locked"]["error"]
    assert per_case["windows"]["error"]


def _refusing_exists(exists, folder):
    """Path.exists refusing, as for a user without search permission on `folder`, with PermissionError."""
    def refused(self):
        if str(self).startswith(str(folder)):
            raise PermissionError(13, "Permission denied", str(self))
        return exists(self)
    return refused


def test_manifest_folders_and_line_numbers_are_named_as_training_names_them(tmp_path):
    """A folder given as the manifest was 'does not exist'; a line number did not count blank lines."""
    with pytest.raises(DeepWMLError, match="is a folder; pass the CSV file"):
        evaluation.read_manifest(tmp_path, ("case", "prediction", "reference"))
    gapped = tmp_path / "gapped.csv"
    gapped.write_text("case,prediction,reference\n\nx,a.nii.gz,b.nii.gz\n,c.nii.gz,d.nii.gz\n")
    with pytest.raises(DeepWMLError, match="line 4: the case name is empty"):
        evaluation.read_manifest(gapped, ("case", "prediction", "reference"))


def test_a_reference_over_a_larger_extent_says_what_lies_outside_the_scan(tmp_path, capsys):
    """A reference drawn on a scan with a larger extent (2 slices beyond the FLAIR the prediction was made on, on
    the same voxel lattice) is compared over its extent: the lesion beyond the scan counts as missed, lowering Dice
    and sensitivity, and nothing said why. The notes now say how many ml lie outside the scan; nothing when the
    reference lies within it."""
    ref = reference_array()
    larger = np.zeros((9,) + ref.shape[1:], np.uint8)
    larger[:7] = ref
    larger[8, 2:6, 2:6] = 1  # 16 voxels of 5 mm3 = 0.08 ml beyond the scan's last slice
    pred = write_mask(ref, tmp_path / "p.nii.gz")
    result = evaluation.evaluate_case(pred, write_mask(larger, tmp_path / "r.nii.gz"))
    total = sum(side * side for side in SIDES.values())
    assert result["sensitivity"] == pytest.approx(total / (total + 16))  # as before: counted as missed
    outside = [n for n in result["notes"] if "outside" in n]
    assert len(outside) == 1 and outside[0].startswith("0.08 ml (16 voxels) of the reference lie outside the "
                                                       "prediction's grid") and "missed" in outside[0], result["notes"]
    flair = write_mask(np.ones_like(ref), tmp_path / "flair.nii.gz")
    with_flair = evaluation.evaluate_case(pred, str(tmp_path / "r.nii.gz"), flair=flair)
    assert any(n.startswith("0.08 ml (16 voxels) of the reference lie outside the FLAIR's grid")
               for n in with_flair["notes"]), with_flair["notes"]
    args = ["evaluate", "--prediction", pred, "--reference", str(tmp_path / "r.nii.gz")]
    assert main(args) == 0
    assert "0.08 ml (16 voxels) of the reference lie outside" in capsys.readouterr().out
    ignored = larger.copy()
    ignored[7, 2:6, 2:6] = 2  # beyond the scan too, but ignored: left out of both masks, so not missed either
    notes = evaluation.evaluate_case(pred, write_mask(ignored, tmp_path / "i.nii.gz"))["notes"]
    assert any(n.startswith("0.08 ml (16 voxels) of the reference lie outside") for n in notes), notes
    within = larger.copy()
    within[8] = 0  # the same larger extent, every lesion inside the scan: nothing to say
    assert not any("outside" in n for n in evaluation.evaluate_case(
        pred, write_mask(within, tmp_path / "w.nii.gz"))["notes"])


def test_a_rerun_into_the_same_folder_leaves_nothing_of_the_earlier_run_beside_its_own(cohort, tmp_path, monkeypatch):
    """evaluate rerun into its folder: the per-centre figure of a first run stayed beside a second run without
    centres, as if this run's; and a run stopped part way left the earlier run's report.md and summary.json beside
    its new tables. Now an earlier run's files go first (only those DeepWML writes: a file of the user's stays)."""
    out = tmp_path / "out"
    evaluation.evaluate_cohort(cohort, out)
    assert (out / "fig3_by_centre.png").is_file()
    (out / "notes.txt").write_text("mine", encoding="utf-8")
    plain = cohort.parent / "plain.csv"  # the same cases, without centre and disease
    rows = read_csv(cohort)
    with open(plain, "w", newline="") as f:
        csv.writer(f).writerows([["case", "prediction", "reference"]] + [[r["case"], r["prediction"], r["reference"]]
                                                                         for r in rows])
    summary = evaluation.evaluate_cohort(plain, out)
    assert "fig3_by_centre.png" not in summary["figures"] and not (out / "fig3_by_centre.png").exists()
    assert not (out / "fig3_by_disease.png").exists() and (out / "fig4_by_lv_group.png").is_file()
    assert (out / "notes.txt").read_text(encoding="utf-8") == "mine"
    write_csv = evaluation.write_csv

    def stopped(rows, columns, path):
        if path.name == "table2.csv":
            raise KeyboardInterrupt
        return write_csv(rows, columns, path)

    monkeypatch.setattr(evaluation, "write_csv", stopped)
    with pytest.raises(KeyboardInterrupt):
        evaluation.evaluate_cohort(cohort, out)
    assert not (out / "summary.json").exists() and not (out / "report.md").exists()
    assert not (out / "fig4_by_lv_group.png").exists()  # none of the earlier run's beside this one's tables
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "per_case.csv", "per_image.csv"]


def test_a_manifest_under_an_output_name_in_the_output_folder_is_refused_not_written_over(cohort, tmp_path):
    """A manifest kept in the output folder as per_case.csv (a name evaluate writes) was deleted by a rerun's
    clearing, or written over at the end: the run is now refused before anything is removed, the file intact."""
    out = cohort.parent  # the cohort's own folder as OUTDIR, its manifest renamed per_case.csv
    manifest = out / "per_case.csv"
    manifest.write_bytes(cohort.read_bytes())
    with pytest.raises(DeepWMLError, match="is a file given to this run, and the run writes a file of that name"):
        evaluation.evaluate_cohort(manifest, out)
    assert manifest.read_bytes() == cohort.read_bytes()


def test_every_figure_in_the_cohort_tables_reads_back_as_a_number(tmp_path):
    """A slice Dice of 154/256 = 0.6015625 (a numpy float, exact in fewer than 10 decimals, so written in
    full) came out as the text "np.float64(0.6015625)" in per_image.csv, which pandas, R and Excel then
    read as text: every numeric column of every table must parse as a number."""
    ref = np.zeros((3, 16, 16), np.uint8)
    pred = np.zeros_like(ref)
    ref[1, :8, :] = 1      # 128 voxels
    pred[1].flat[51:179] = 1  # 128 voxels from the 52nd on: 77 of them on the reference
    assert (ref & pred).sum() == 77 and pred.sum() == 128
    folder = tmp_path / "c"
    folder.mkdir()
    write_mask(ref, folder / "ref.nii.gz")
    write_mask(pred, folder / "pred.nii.gz")
    (folder / "cases.csv").write_text("case,prediction,reference\ncase1,pred.nii.gz,ref.nii.gz\n")
    evaluation.evaluate_cohort(folder / "cases.csv", tmp_path / "out")
    images = read_csv(tmp_path / "out" / "per_image.csv")
    assert [row["dice"] for row in images] == ["0.6015625"]
    for name in ("per_image.csv", "per_case.csv", "table2.csv", "lv_groups.csv"):
        for row in read_csv(tmp_path / "out" / name):
            for key, cell in row.items():
                assert "np." not in cell, (name, key, cell)
    assert evaluation._cell(np.float64(0.6015625)) == "0.6015625"
    assert evaluation._cell(np.float32(0.5)) == "0.5"


def test_a_single_pair_says_its_p_needs_no_correction_rather_than_multiplied_by_1_pairs():
    """Two groups (MS against SVD) give one pair, whose note said "p multiplied by 1 pairs"."""
    _, pair = evaluation._compare_groups(
        _rows({"A": [0.01 * j for j in range(8)], "B": [0.5 + 0.01 * j for j in range(9)]}), "disease", "dice")
    assert "1 pairs" not in pair["note"]
    assert pair["note"].endswith("one pair: p not multiplied (no correction needed)")
    assert pair["p"] == pytest.approx(2 / 24310)


def test_a_prediction_and_reference_cropped_to_one_box_say_that_slice_numbers_count_from_the_box(tmp_path, capsys):
    """A prediction and a reference saved cropped to one box (their lesions reach every side of it), no FLAIR:
    compared on the box, the per-slice rows numbered from its first slice (0, 1, 2 for the scan's 2, 3, 4) and
    nothing said so. A note now says it: in the result, printed, per_case.csv's notes, the JSON."""
    ref = np.zeros((7, 40, 40), np.uint8)
    ref[2:5, 5:15, 5:15] = 1
    pred = ref.copy()
    pred[3, 5:15, 5:8] = 0
    whole = [write_mask(a, tmp_path / f"{n}_whole.nii.gz") for n, a in (("pred", pred), ("ref", ref))]
    boxed = [write_mask(a[2:5, 5:15, 5:15], tmp_path / f"{n}.nii.gz") for n, a in (("pred", pred), ("ref", ref))]
    on_scan = evaluation.evaluate_case(*whole)
    cropped = evaluation.evaluate_case(*boxed)
    assert [s["index"] for s in on_scan["slices"]] == [2, 3, 4] and [s["index"] for s in cropped["slices"]] == [0, 1, 2]
    assert cropped["dice"] == pytest.approx(on_scan["dice"])
    assert cropped["notes"] == on_scan["notes"] + [io.ONE_BOX_NOTE]
    assert main(["evaluate", "--prediction", boxed[0], "--reference", boxed[1], "--json", str(tmp_path / "e.json")]) == 0
    assert f"note: {io.ONE_BOX_NOTE}" in capsys.readouterr().out
    assert io.ONE_BOX_NOTE in json.loads((tmp_path / "e.json").read_text(encoding="utf-8"))["notes"]
    (tmp_path / "cases.csv").write_text("case,prediction,reference\nboxed,pred.nii.gz,ref.nii.gz\n")
    assert main(["evaluate", "--manifest", str(tmp_path / "cases.csv"), "-o", str(tmp_path / "out")]) == 0
    with open(tmp_path / "out" / "per_case.csv", newline="", encoding="utf-8-sig") as f:
        assert io.ONE_BOX_NOTE in next(csv.DictReader(f))["notes"].split(" | ")


def test_a_cohort_prints_each_cases_notes_under_its_line(tmp_path, capsys):
    """A cohort printed 'CASE: Dice 0.000' alone: a note such as 'the prediction is empty: precision, HD95 ... are
    undefined' was only in per_case.csv, summary.json and report.md. Each case's notes are now printed under its
    line, indented, one a line, as one case's are; a case without notes prints its line alone."""
    ref = reference_array()
    write_mask(ref, tmp_path / "ref.nii.gz")
    write_mask(ref, tmp_path / "same.nii.gz")
    write_mask(np.zeros_like(ref), tmp_path / "empty.nii.gz")
    (tmp_path / "cases.csv").write_text("case,prediction,reference\nnothing,empty.nii.gz,ref.nii.gz\n"
                                        "perfect,same.nii.gz,ref.nii.gz\n")
    assert main(["evaluate", "--manifest", str(tmp_path / "cases.csv"), "-o", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err.splitlines()
    notes = {c["case"]: c["notes"] for c in json.loads((tmp_path / "out" / "summary.json").read_text())["cases"]}
    assert notes["nothing"].startswith("the prediction is empty") and notes["perfect"] == ""
    start = err.index(next(line for line in err if "] nothing: Dice" in line))
    assert err[start + 1:start + 1 + len(notes["nothing"].split(" | "))] == [
        f"       note: {note}" for note in notes["nothing"].split(" | ")], err
    assert sum("note:" in line for line in err) == len(notes["nothing"].split(" | "))
