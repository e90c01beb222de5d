"""The lesion report's figures on masks whose true values are known by construction."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from DeepWMLLib.report import lesion_report

from conftest import rotation


def mask_image(array_kji, spacing=(0.5, 0.8, 5.0), direction=None, origin=(10.0, -20.0, 30.0)):
    image = sitk.GetImageFromArray(array_kji.astype(np.uint8))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(tuple(np.eye(3).ravel() if direction is None else np.asarray(direction).ravel()))
    return image


def test_each_lesion_has_a_point_on_itself_where_its_centroid_lies_outside_it():
    """A curved lesion (a periventricular cap, a band) has its centroid outside it: a viewer sent there showed no
    lesion. `point_mm` is its voxel nearest the centroid, in millimetres on an anisotropic oblique grid."""
    a = np.zeros((3, 40, 40), np.uint8)
    a[1, 5:35, 5:8] = 1  # a C open to the right: its centroid lies in the empty middle
    a[1, 5:8, 5:30] = 1
    a[1, 32:35, 5:30] = 1
    d = rotation(0.3, 0.1, -0.2)
    image = mask_image(a, direction=d)
    (lesion,) = lesion_report(image)["lesions"]
    matrix = np.asarray(image.GetDirection()).reshape(3, 3) * np.asarray(image.GetSpacing())
    to_index = np.linalg.inv(matrix)
    centroid = to_index @ (np.asarray(lesion["centroid_mm"]) - np.asarray(image.GetOrigin()))
    point = to_index @ (np.asarray(lesion["point_mm"]) - np.asarray(image.GetOrigin()))  # (i, j, k)
    i, j, k = np.round(point).astype(int)
    assert a[round(centroid[2]), round(centroid[1]), round(centroid[0])] == 0  # the centroid: not on the lesion
    assert np.allclose(point, np.round(point), atol=0.01) and a[k, j, i] == 1  # the point: one of its voxels
    lesion_voxels = np.argwhere(a)[:, ::-1]  # (i, j, k)
    spacing = np.asarray(image.GetSpacing())
    distances = np.linalg.norm((lesion_voxels - centroid) * spacing, axis=1)
    assert np.linalg.norm((point - centroid) * spacing) == pytest.approx(distances.min(), abs=0.02)


def test_a_lesions_point_is_its_voxel_nearest_the_centroid_in_mm_not_in_voxel_steps():
    """A ring in one coronal plane, the border of 3 slices x 7 columns (16 voxels), 1 mm columns and 5 mm slices.
    By symmetry its centroid is (i 3, k 1), in the hole. Its voxels nearest it in mm are (i 0, k 1) and (i 6, k 1),
    3 mm away (the first in raster order is shown); (i 3, k 0) and (i 3, k 2) are one voxel step away but 5 mm."""
    a = np.zeros((3, 1, 7), np.uint8)  # numpy (k, j, i)
    a[[0, 2], 0, :] = 1
    a[1, 0, [0, 6]] = 1
    (lesion,) = lesion_report(mask_image(a, spacing=(1.0, 1.0, 5.0)))["lesions"]
    # identity direction: LPS = origin (10, -20, 30) + (i x 1, j x 1, k x 5) mm
    assert lesion["centroid_mm"] == [13.0, -20.0, 35.0]
    assert lesion["point_mm"] == [10.0, -20.0, 35.0]


def test_a_small_slice_lv_is_written_to_the_microlitre():
    """3 pixels of 0.5 x 0.5 mm at 3 mm: area 0.75 mm2, LV 0.75 x 3 / 1000 = 0.00225 ml, written as such (not 0)."""
    a = np.zeros((2, 4, 4), np.uint8)
    a[1, 0, 0:3] = 1
    row = lesion_report(mask_image(a, spacing=(0.5, 0.5, 3.0)))["slices"][1]
    assert (row["area_mm2"], row["lv_ml"], row["lv_group"]) == (0.75, 0.00225, "G1")


def test_volumes_counts_and_slices_on_oblique_anisotropic_grid():
    a = np.zeros((6, 40, 50), np.uint8)
    a[1:4, 10:20, 10:30] = 1  # 3 slices × 200 voxels, voxel 0.5×0.8×5 = 2 mm³
    a[5, 30:32, 40:41] = 1  # 2 voxels, a separate lesion
    d = rotation(0.2, -0.1, 0.4)
    report = lesion_report(mask_image(a, direction=d))
    assert report["volume_ml"] == pytest.approx(602 * 2.0 / 1000)
    assert report["lesion_count"] == 2
    big, small = report["lesions"]
    assert big["volume_ml"] == pytest.approx(1.2) and small["volume_ml"] == pytest.approx(0.004)
    assert big["slice_range"] == [1, 3] and small["slice_range"] == [5, 5]
    # centroid of the big block: index (19.5, 14.5, 2) through the oblique geometry
    expected = np.array([10.0, -20.0, 30.0]) + d @ (np.array([19.5, 14.5, 2.0]) * np.array([0.5, 0.8, 5.0]))
    assert np.allclose(big["centroid_mm"], expected, atol=0.01)
    slices = report["slices"]
    assert len(slices) == 6
    assert slices[2]["area_mm2"] == pytest.approx(200 * 0.4)
    assert slices[2]["lv_ml"] == pytest.approx(200 * 0.4 * 5 / 1000)
    assert slices[2]["lv_group"] == "G2" and slices[0]["lv_group"] is None


@pytest.mark.parametrize("pixels,group", [(99, "G1"), (100, "G2"), (349, "G2"), (350, "G3"), (999, "G3"),
                                          (1000, "G4"), (2499, "G4"), (2500, "G5")])
def test_lv_groups_follow_the_paper(pixels, group):
    # 1 mm² pixels, 2 mm slices: LV (ml) = pixels × 2 / 1000 -> boundaries 0.2, 0.7, 2, 5 ml
    a = np.zeros((1, 60, 60), np.uint8)
    a.reshape(-1)[:pixels] = 1
    report = lesion_report(mask_image(a, spacing=(1.0, 1.0, 2.0)))
    assert report["slices"][0]["lv_group"] == group


def test_a_group_bound_reached_through_float_spacings_is_the_upper_group_as_in_evaluate():
    """250 pixels of 0.8 x 0.7 mm at 5 mm is exactly 0.7 ml (G3), though the product in floats is 0.69999..."""
    from DeepWMLLib.evaluation import evaluate_case

    a = np.zeros((1, 20, 20), np.uint8)
    a.reshape(-1)[:250] = 1
    mask = mask_image(a, spacing=(0.8, 0.7, 5.0))
    row = lesion_report(mask)["slices"][0]
    assert (row["area_mm2"], row["lv_ml"], row["lv_group"]) == (140.0, 0.7, "G3")
    evaluated = evaluate_case(mask, mask)["slices"][0]
    assert (evaluated["reference_area_mm2"], evaluated["lv_group"]) == (140.0, "G3")


def test_empty_mask_reports_zero():
    report = lesion_report(mask_image(np.zeros((4, 10, 10), np.uint8)))
    assert report["volume_ml"] == 0 and report["lesion_count"] == 0 and report["lesions"] == []
    assert all(s["lv_group"] is None for s in report["slices"])


def test_slice_index_follows_the_file_axis_for_permuted_files():
    # the axial axis stored as the file's first axis: slice index = voxel index i
    a = np.zeros((20, 20, 7), np.uint8)  # numpy (k, j, i): i has 7 voxels
    a[5:8, 5:8, 4] = 1
    direction = np.array([[0, 1, 0], [0, 0, 1], [1, 0, 0]], float)  # axis i points superior
    report = lesion_report(mask_image(a, spacing=(4.0, 1.0, 1.0), direction=direction))
    assert len(report["slices"]) == 7
    assert [s["index"] for s in report["slices"] if s["area_mm2"] > 0] == [4]
    assert report["lesions"][0]["slice_range"] == [4, 4]


def test_each_lesion_carries_its_mean_and_highest_probability():
    """With the probability map, every lesion row gets the mean and the highest probability over its own
    voxels (a confident lesion against one only just over the threshold), whatever its rank."""
    array = np.zeros((4, 12, 12), np.uint8)
    probabilities = np.zeros(array.shape, np.float32)
    array[1, 2:5, 2:5] = 1  # 9 voxels: the larger lesion, id 1
    probabilities[1, 2:5, 2:5] = 0.9
    probabilities[1, 3, 3] = 1.0
    array[2, 8:10, 8:10] = 1  # 4 voxels, id 2
    probabilities[2, 8:10, 8:10] = [[0.5, 0.6], [0.7, 0.8]]
    probabilities[0, 0, 0] = 0.99  # outside every lesion: counts for none
    mask = sitk.GetImageFromArray(array)
    mask.SetSpacing((0.5, 0.5, 4.0))
    lesions = lesion_report(mask, probabilities)["lesions"]
    assert [x["voxels"] for x in lesions] == [9, 4]
    assert lesions[0]["mean_probability"] == pytest.approx((8 * 0.9 + 1.0) / 9, abs=1e-3)
    assert lesions[0]["max_probability"] == 1.0
    assert lesions[1]["mean_probability"] == pytest.approx(0.65, abs=1e-3) and lesions[1]["max_probability"] == 0.8
    assert "mean_probability" not in lesion_report(mask)["lesions"][0]  # a mask alone has none
    with pytest.raises(ValueError, match="do not match"):
        lesion_report(mask, probabilities[:3])


def test_an_lv_just_under_a_group_bound_is_written_in_its_group(tmp_path):
    """40 mm² at a slice thickness stored as float32 4.9999995 mm (as a converter writes a spacing computed from
    slice positions) is 0.19999998 ml, G1 here and in `deepwml evaluate`; the report wrote lv_ml 0.2 beside G1,
    and so did a CSV of it (Slicer's Save results, evaluate's per_image.csv)."""
    import csv

    from DeepWMLLib.evaluation import evaluate_case, write_csv

    a = np.zeros((1, 20, 20), np.uint8)
    a.reshape(-1)[:40] = 1
    mask = mask_image(a, spacing=(1.0, 1.0, float(np.float32(4.9999995))))
    row = lesion_report(mask)["slices"][0]
    evaluated = evaluate_case(mask, mask)["slices"][0]
    assert row["lv_group"] == evaluated["lv_group"] == "G1"
    assert row["lv_ml"] == evaluated["lv_ml"] < 0.2
    write_csv([row, evaluated], ["lv_ml", "lv_group"], tmp_path / "slices.csv")
    written = list(csv.DictReader(open(tmp_path / "slices.csv", encoding="utf-8-sig")))
    assert [(float(r["lv_ml"]), r["lv_group"]) for r in written] == [(row["lv_ml"], "G1")] * 2


def test_the_report_states_its_conventions_and_its_figures_follow_them():
    """A report read on its own (a radiologist opening CASE_report.json) said nothing of how lesions were counted
    or which way centroid_mm points: LPS x grows to the patient's left, the RAS Slicer shows to the right, so a
    centroid typed into Slicer as shown landed on the other side. It now says so, and its figures agree."""
    a = np.zeros((3, 10, 10), np.uint8)
    a[0, 2, 2] = a[1, 3, 3] = 1  # touching only at a corner: one lesion under 26-connectivity (6 would give two)
    a[1, 5, 9] = a[2, 5, 9] = 1  # a second lesion at the largest i
    report = lesion_report(mask_image(a, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0)))
    stated = report["conventions"]
    assert "26-connected" in stated["lesions"] and report["lesion_count"] == 2
    assert "LPS" in stated["coordinates"] and "x to the patient's left" in stated["coordinates"]
    assert [lesion["centroid_mm"][0] for lesion in report["lesions"]] == [2.5, 9.0]  # x: the voxel index i, mm
    assert "0 first" in stated["slice_index"] and report["lesions"][0]["slice_range"] == [0, 1]
    assert "G1 < 0.2 ml <= G2 < 0.7 ml <= G3 < 2 ml <= G4 < 5 ml <= G5" in stated["lv"]
    assert "ml" in stated["volumes"]


def test_one_lesion_is_said_as_one_lesion_wherever_a_count_is_shown():
    """'1 lesions' was printed by segment's case line, evaluate, consensus, the DICOM outline's derivation and the
    Slicer module's results; consensus placed a lesion on one slice on 'slices 5-5'."""
    import io as stdio

    from DeepWMLLib.consensus import format_check
    from DeepWMLLib.segment import ProgressBar, picture_title

    stream = stdio.StringIO()
    bar = ProgressBar(stream)
    bar(1, 1, "a")
    bar.finish({"case": "a", "status": "ok", "volume_ml": 0.12, "lesion_count": 1, "seconds": 0.5})
    assert "0.12 ml, 1 lesion, 0.5 s" in stream.getvalue()
    assert picture_title("a", {"volume_ml": 0.12, "lesion_count": 1}).startswith("a: 0.12 ml, 1 lesion")
    text = format_check({"dice": 1.0, "threshold": 0.85, "passed": True, "volume_a_ml": 0.1, "volume_b_ml": 0.1,
                         "n_lesions_a": 1, "n_lesions_b": 0, "worst_slices": [], "slices": [], "notes": [],
                         "unmatched_lesions_a": [{"volume_mm3": 12.0, "centroid_lps_mm": [1.0, 2.0, 3.0],
                                                  "slices": [5, 5]}], "unmatched_lesions_b": []})
    assert "in 1 lesion;" in text and "in 0 lesions" in text
    assert "mm, slice 5\n" in text  # not "slices 5-5"


def test_a_float_mask_is_its_whole_numbers_and_a_probability_map_is_refused():
    """lesion_report of a float mask: 0.9 was a lesion to the count but cast to 0 for the volume (1 lesion of 0 ml);
    a float 0/1 mask is read as its integers, a probability map or an array refused saying what to give."""
    from DeepWMLLib.errors import DeepWMLError

    lesion = np.zeros((6, 20, 20), np.uint8)
    lesion[2:4, 5:10, 5:10] = 1

    def image(array):
        made = sitk.GetImageFromArray(array)
        made.SetSpacing((1.0, 1.0, 2.0))
        return made
    expected = lesion_report(image(lesion))
    assert expected["volume_ml"] == 0.1 and expected["lesion_count"] == 1
    as_float = lesion_report(image(lesion.astype(np.float32)))
    assert (as_float["volume_ml"], as_float["lesion_count"]) == (0.1, 1)
    with pytest.raises(DeepWMLError, match="not a label mask: it holds values that are not whole numbers"):
        lesion_report(image(np.where(lesion > 0, 0.9, 0.01).astype(np.float32)))
    with pytest.raises(DeepWMLError, match="is a ndarray, not an image"):
        lesion_report(lesion)


def test_a_lesions_ventricle_distance_is_its_nearest_voxels_and_exactly_10_mm_is_periventricular():
    """Distances given at the mask's voxels (np.flatnonzero's order): a 4-voxel lesion at 10.0, 10.0, 10.5 and 12 mm
    is 10.0 mm from the ventricles (its nearest voxel, not the mean 10.625) with 2 of 4 voxels within the 10 mm
    periventricular distance, which includes 10 mm itself (location.PERIVENTRICULAR_MM); a 2-voxel lesion at 3 and
    25 mm is 3.0 mm away (mean 14) with half its voxels near."""
    array = np.zeros((3, 6, 8), np.uint8)
    array[1, 1, 1:5] = 1  # 4 voxels, id 1
    array[1, 4, 6:8] = 1  # 2 voxels, id 2
    distances = np.array([10.0, 10.0, 10.5, 12.0, 3.0, 25.0])
    lesions = lesion_report(mask_image(array), ventricle_distance=distances)["lesions"]
    assert [(x["voxels"], x["ventricle_distance_mm"], x["periventricular_share"]) for x in lesions] == [
        (4, 10.0, 0.5), (2, 3.0, 0.5)]


def test_lesion_geometry_read_a_slice_at_a_time_counts_each_slice_at_its_own_index():
    """Labels read one slice at a time (a chunk of 1 voxel): lesion 1 at (k, j, i) = (1, 0, 0), (3, 0, 0) and
    (3, 2, 2): 3 voxels, centroid (7/3, 2/3, 2/3), slices 1 to 3; lesion 2 one voxel at (2, 1, 1)."""
    from DeepWMLLib.report import lesion_geometry

    labels = np.zeros((4, 3, 3), np.uint8)
    labels[1, 0, 0] = labels[3, 0, 0] = labels[3, 2, 2] = 1
    labels[2, 1, 1] = 2
    for chunk in (1, 10 ** 6):
        sizes, centroids, first, last = lesion_geometry(labels, 2, 0, voxels_per_chunk=chunk)
        assert sizes.tolist() == [3, 1] and first.tolist() == [1, 2] and last.tolist() == [3, 2]
        assert centroids.ravel() == pytest.approx([7 / 3, 2 / 3, 2 / 3, 2.0, 1.0, 1.0])


def test_the_reports_slice_thickness_is_the_spacing_of_the_axial_planes():
    array = np.zeros((3, 6, 8), np.uint8)
    array[1, 2, 2] = 1
    assert lesion_report(mask_image(array))["slice_thickness_mm"] == 5.0  # spacing 0.5 x 0.8 x 5 mm
