"""The metrics on a real labelled case (Ljubljana MS, patient07) against perturbed copies of its
consensus mask, through the command line. Skipped when ../shared/data is absent."""

from __future__ import annotations

import csv
import importlib.util
import json
import time

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import REPO
from scipy import ndimage

from DeepWMLLib import evaluation, io
from DeepWMLLib.cli import main

pytestmark = pytest.mark.shared

PATIENT = "patient07"


def _benchmark_module():
    path = REPO / "Testing" / "benchmarks" / "perturbed_real_cases.py"
    spec = importlib.util.spec_from_file_location("perturbed_real_cases", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = io.shared_data_dir()
    if root is None or not (root / "open_ms" / "labelled" / PATIENT).is_dir():
        pytest.skip("../shared/data/open_ms/labelled (or DEEPWML_SHARED_DATA) is absent: real-data tests skipped")
    out = tmp_path_factory.mktemp("perturbed")
    cases, raters = _benchmark_module().write_cohort(root, out, patients=(PATIENT,), probabilities=False)
    reference = root / "open_ms" / "labelled" / PATIENT / "consensus_mask.nii.gz"
    return {"out": out, "cases": cases, "raters": raters, "reference": reference,
            "mask": io.read_mask(reference)}


@pytest.fixture(scope="module")
def per_case(cohort):
    assert main(["evaluate", "--manifest", str(cohort["cases"]), "-o", str(cohort["out"] / "evaluation")]) == 0
    with open(cohort["out"] / "evaluation" / "per_case.csv", newline="", encoding="utf-8-sig") as f:
        return {r["case"].removeprefix(PATIENT + "_"): {k: _number(v) for k, v in r.items()}
                for r in csv.DictReader(f)}


def io_array(image: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(image) > 0


def _number(text: str):
    try:
        return float(text)
    except ValueError:
        return text


def test_perturbations_move_the_metrics_the_way_they_must(per_case, cohort):
    eroded, dilated = per_case["eroded"], per_case["dilated"]
    assert eroded["precision"] == 1.0 and eroded["sensitivity"] < 0.8   # a subset of the reference
    assert dilated["sensitivity"] == 1.0 and dilated["precision"] < 0.8  # a superset
    assert dilated["lesion_recall"] == 1.0 and dilated["n_predicted_lesions"] <= dilated["n_reference_lesions"]
    # an in-plane erosion or dilation by one voxel moves every outline by at most one 1 mm voxel
    assert 0 < dilated["hd95_mm"] <= 1.0 + 1e-9
    assert per_case["shifted_x1"]["hd95_mm"] == pytest.approx(1.0)
    assert per_case["shifted_y2"]["hd95_mm"] == pytest.approx(2.0)
    assert per_case["shifted_x1"]["avd_percent"] == 0.0  # nothing moved out of the field of view

    removed = per_case["lesion_removed"]
    labels, n = ndimage.label(io_array(cohort["mask"]), structure=np.ones((3, 3, 3)))
    assert removed["n_reference_lesions"] == n
    assert removed["lesion_recall"] == pytest.approx((n - 1) / n)
    assert removed["precision"] == 1.0 and removed["lesionwise_precision"] == 1.0
    assert removed["lesionwise_recall"] == pytest.approx((n - 1) / n)

    report = (cohort["out"] / "evaluation" / "report.md").read_text(encoding="utf-8")
    assert "Cases evaluated: 5 of 5" in report and "Kruskal-Wallis" in report


def test_single_case_cli_on_a_full_size_volume_is_fast(cohort, tmp_path):
    prediction = cohort["out"] / "masks" / f"{PATIENT}_shifted_x1.nii.gz"
    start = time.perf_counter()
    result = evaluation.evaluate_case(str(prediction), str(cohort["reference"]))
    assert time.perf_counter() - start < 15.0  # 182 x 218 x 182 voxels; about 1 s on one free core
    assert main(["evaluate", "--prediction", str(prediction), "--reference", str(cohort["reference"]),
                 "--json", str(tmp_path / "m.json")]) == 0
    saved = json.loads((tmp_path / "m.json").read_text(encoding="utf-8"))
    assert saved["dice"] == pytest.approx(result["dice"])
    volume = sum(s["lv_ml"] for s in saved["slices"])
    assert volume == pytest.approx(saved["reference_volume_ml"]) == pytest.approx(1.3, abs=0.05)


def test_consensus_finds_the_removed_lesion(cohort, tmp_path, capsys):
    removed = cohort["out"] / "masks" / f"{PATIENT}_lesion_removed.nii.gz"
    assert main(["consensus", str(removed), str(cohort["reference"]), "--json", str(tmp_path / "c.json")]) == 0
    result = json.loads((tmp_path / "c.json").read_text(encoding="utf-8"))
    missing = io_array(cohort["mask"]) & ~io_array(io.read_mask(removed))
    assert result["unmatched_lesions_a"] == []
    [lesion] = result["unmatched_lesions_b"]
    assert lesion["voxels"] == int(missing.sum())
    k = np.flatnonzero(missing.any(axis=(1, 2)))  # MNI grid: the axial axis is voxel axis k
    assert lesion["slices"] == [int(k.min()), int(k.max())]
    assert "lesions drawn by rater B only: 1" in capsys.readouterr().out


def test_consensus_cohort_on_real_perturbations(cohort):
    lines = cohort["raters"].read_text(encoding="utf-8").splitlines()
    wanted = [line for line in lines[1:] if line.startswith((f"{PATIENT}_eroded,", f"{PATIENT}_lesion_removed,"))]
    manifest = cohort["raters"].with_name("two_raters.csv")
    manifest.write_text("\n".join([lines[0], *wanted]) + "\n")
    out = cohort["out"] / "consensus"
    assert main(["consensus", "--manifest", str(manifest), "-o", str(out)]) == 0
    assert (out / "relabel.txt").read_text(encoding="utf-8") == f"{PATIENT}_eroded\n"  # lesion_removed keeps Dice >= 0.85


def test_a_reference_saved_cropped_gives_the_whole_references_figures(tmp_path, capsys):
    """patient07's consensus mask saved as a .seg.nrrd cropped to its lesions (Slicer's 'Crop to minimum extent')
    was refused by evaluate and consensus ('different voxel grids'); padded onto the scan's grid, it gives the very
    figures of the whole mask, slice numbers included."""
    root = io.shared_data_dir()
    if root is None or not (root / "open_ms" / "labelled" / PATIENT).is_dir():
        pytest.skip("../shared/data/open_ms/labelled (or DEEPWML_SHARED_DATA) is absent: real-data tests skipped")
    whole = root / "open_ms" / "labelled" / PATIENT / "consensus_mask.nii.gz"
    mask = sitk.ReadImage(str(whole))
    box = sitk.LabelShapeStatisticsImageFilter()
    box.Execute(mask != 0)
    i, j, k, ni, nj, nk = box.GetBoundingBox(1)
    cropped = io.write_segmentation(mask[i:i + ni, j:j + nj, k:k + nk], tmp_path / "cropped.seg.nrrd")
    grown = sitk.BinaryDilate(sitk.Cast(mask != 0, sitk.sitkUInt8), (1, 1, 0))
    prediction = tmp_path / "prediction.nii.gz"
    sitk.WriteImage(grown, str(prediction))
    results = []
    for reference in (whole, cropped):
        assert main(["evaluate", "--prediction", str(prediction), "--reference", str(reference),
                     "--json", str(tmp_path / "e.json")]) == 0
        results.append(json.loads((tmp_path / "e.json").read_text(encoding="utf-8")))
        (tmp_path / "e.json").unlink()
    assert results[0]["dice"] < 1 and results[1] == results[0]
    for pair in ((str(cropped), str(prediction)), (str(prediction), str(cropped))):
        assert main(["consensus", *pair, "--json", str(tmp_path / "c.json")]) == 0
        assert json.loads((tmp_path / "c.json").read_text(encoding="utf-8"))["dice"] == pytest.approx(results[0]["dice"])
        (tmp_path / "c.json").unlink()


def test_two_masks_both_saved_cropped_give_the_whole_masks_figures(tmp_path):
    """patient07's consensus mask and a second rater's (grown by a voxel in-plane, the lesions of one half of the
    head left out), each saved as a .seg.nrrd cropped to its own lesions: refused before ('both saved cropped');
    now compared on the extent of both: every figure of evaluate and consensus that of the whole masks, slice
    numbers shifted by where that extent starts (a note says so), and the QC picture drawn on the FLAIR as for the
    whole masks; with the FLAIR given, every figure the whole masks', slice numbers included."""
    from DeepWMLLib.consensus import consensus_check, pair_picture

    root = io.shared_data_dir()
    if root is None or not (root / "open_ms" / "labelled" / PATIENT).is_dir():
        pytest.skip("../shared/data/open_ms/labelled (or DEEPWML_SHARED_DATA) is absent: real-data tests skipped")
    case = root / "open_ms" / "labelled" / PATIENT
    first = sitk.Cast(sitk.ReadImage(str(case / "consensus_mask.nii.gz")) != 0, sitk.sitkUInt8)
    drawn = sitk.GetArrayFromImage(sitk.BinaryDilate(first, (1, 1, 0)))
    drawn[:, :, : drawn.shape[2] // 2] = 0
    second = sitk.GetImageFromArray(drawn)
    second.CopyInformation(first)
    box = sitk.LabelShapeStatisticsImageFilter()
    cropped, starts = [], []
    for mask, name in ((first, "a"), (second, "b")):
        box.Execute(mask)
        i, j, k, ni, nj, nk = box.GetBoundingBox(1)
        cropped.append(io.read_mask(io.write_segmentation(mask[i:i + ni, j:j + nj, k:k + nk], tmp_path / f"{name}.seg.nrrd")))
        starts.append(np.array((i, j, k)))
    start = np.minimum(*starts) - 1  # where the extent of both (and a voxel around it) starts on the scan's grid
    axis = io.axial_axis(first)
    whole, joint = evaluation.evaluate_case(second, first), evaluation.evaluate_case(*cropped[::-1])
    assert 0 < whole["dice"] < 1 and io.JOINT_EXTENT_NOTE in joint["notes"]
    for key in whole:
        if key not in ("slices", "notes", "roc_auc"):  # no probability map: NaN both
            assert joint[key] == whole[key], key
    assert [{**s, "index": s["index"] + int(start[axis])} for s in joint["slices"]] == whole["slices"]
    whole, joint = consensus_check(first, second), consensus_check(*cropped)
    shift = int(start[axis])
    assert joint["worst_slices"] == [k - shift for k in whole["worst_slices"]]
    for key in ("dice", "passed", "volume_a_ml", "volume_b_ml", "n_lesions_a", "n_lesions_b"):
        assert joint[key] == whole[key], key
    flair = case / "flair.nii.gz"
    assert pair_picture(flair, *cropped) == pair_picture(flair, first, second)
    # with the FLAIR (--flair, a flair column), on its grid: every figure, slice numbers too, the whole masks'
    assert consensus_check(*cropped, flair=flair) == whole
    whole_case, on_flair = evaluation.evaluate_case(second, first), evaluation.evaluate_case(*cropped[::-1], flair=flair)
    assert np.isnan(whole_case.pop("roc_auc")) and np.isnan(on_flair.pop("roc_auc"))  # no probability map
    assert on_flair == whole_case


def test_a_real_flair_given_as_a_mask_is_told_it_looks_like_a_scan(tmp_path):
    """Real FLAIRs given to evaluate in place of a mask: a clinical uint16 one was told to 'relabel it', the same
    saved as 8 bits was read as lesion labels (2605 ml of 'lesion', Dice 0.007, no word); the float labelled one
    was refused for its negative values. Each is now named as a scan."""
    root = io.shared_data_dir()
    clinical = None if root is None else root / "open_ms" / "clinical_flair" / "patient03_study1.nii.gz"
    if clinical is None or not clinical.is_file():
        pytest.skip("../shared/data/open_ms/clinical_flair (or DEEPWML_SHARED_DATA) is absent: real-data tests skipped")
    eight = tmp_path / "flair_uint8.nii.gz"
    sitk.WriteImage(sitk.Cast(sitk.RescaleIntensity(sitk.ReadImage(str(clinical)), 0, 255), sitk.sitkUInt8), str(eight))
    labelled = root / "open_ms" / "labelled" / PATIENT / "flair.nii.gz"
    for scan in (clinical, eight, labelled):
        with pytest.raises(io.DeepWMLError, match="looks like a scan, not a label mask"):
            io.read_mask(scan)
    assert sitk.GetArrayViewFromImage(io.read_mask(root / "open_ms" / "labelled" / PATIENT / "consensus_mask.nii.gz")).any()
