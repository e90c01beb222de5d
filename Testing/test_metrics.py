"""Metrics on hand-built masks whose true values are known by construction.

Grids are deliberately awkward: anisotropic spacing, oblique directions, axial axis not last.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import rotation
from scipy.spatial import cKDTree

from DeepWMLLib import io, metrics
from DeepWMLLib.errors import DeepWMLError

OBLIQUE = rotation(0.25, -0.15, 0.6)  # superior stays closest to the third voxel axis
# Rows of the direction matrix are L, P, S: voxel axis 0 points (mostly) superior here, so the
# axial slices are numpy's last axis — the case a "slice = numpy axis 0" shortcut gets wrong.
AXIAL_FIRST = rotation(0.1, 0.2, 0.05) @ np.array([[0, 1, 0], [0, 0, 1], [1, 0, 0]], float)


def image(array, spacing=(0.7, 0.9, 4.5), direction=OBLIQUE, origin=(12.5, -40.0, 7.25)) -> sitk.Image:
    im = sitk.GetImageFromArray(np.asarray(array, dtype=np.uint8))
    im.SetSpacing(spacing)
    im.SetDirection(tuple(np.asarray(direction, float).ravel()))
    im.SetOrigin(origin)
    return im


def zeros(shape=(8, 20, 24)) -> np.ndarray:
    return np.zeros(shape, np.uint8)


# ---------------------------------------------------------------------------------------------
# LV groups


@pytest.mark.parametrize("lv, group", [
    (0.0, "G1"), (0.1999, "G1"), (0.2, "G2"), (0.6999, "G2"), (0.7, "G3"), (1.999, "G3"), (2.0, "G4"),
    (4.999, "G4"), (5.0, "G5"), (80.0, "G5"),
])
def test_lv_group_bounds_are_closed_below(lv, group):
    assert metrics.lv_group(lv) == group


@pytest.mark.parametrize("bad", [-0.1, math.nan, math.inf])
def test_lv_group_refuses_impossible_volumes(bad):
    with pytest.raises(DeepWMLError):
        metrics.lv_group(bad)


def test_slice_lv_is_area_times_thickness_and_exact_at_group_bounds():
    ref = zeros((4, 30, 30))
    ref[1, :20, :20] = 1  # 400 px x 0.25 mm2 x 2 mm = 200 mm3 = 0.2 ml: exactly the G1/G2 bound
    ref[2, :10, :10] = 1  # 100 px -> 0.05 ml
    rows = metrics.slice_metrics(image(ref, (0.5, 0.5, 2.0)), image(ref, (0.5, 0.5, 2.0)))
    assert [(r["index"], r["lv_ml"], r["lv_group"]) for r in rows] == [(1, 0.2, "G2"), (2, 0.05, "G1")]
    assert rows[0]["reference_area_mm2"] == pytest.approx(100.0)


# ---------------------------------------------------------------------------------------------
# Voxel overlap and volumes


def test_overlap_of_partly_matching_boxes():
    ref, pred = zeros(), zeros()
    ref[2:6, 4:8, 4:8] = 1      # 64 voxels
    pred[2:6, 4:8, 4:5] = 1     # 16 of them ...
    pred[2:6, 12:16, 4:5] = 1   # ... and 16 outside
    result = metrics.overlap(image(pred), image(ref))
    assert result == pytest.approx({"dice": 32 / 96, "sensitivity": 16 / 64, "precision": 16 / 32})


def test_a_float_prediction_is_lesion_from_0_5_up():
    """A float prediction (Python API) is lesion where its value is >= 0.5: of 8 reference voxels, the 4 predicted
    at exactly 0.5 are found and the 4 at the float32 just below 0.5 are not: sensitivity 4/8, precision 4/4."""
    ref = zeros()
    ref[3, 4, 4:12] = 1
    pred = np.zeros(ref.shape, np.float32)
    pred[3, 4, 4:8] = 0.5
    pred[3, 4, 8:12] = np.nextafter(np.float32(0.5), np.float32(0))
    prediction = sitk.GetImageFromArray(pred)
    prediction.CopyInformation(image(ref))
    result = metrics.overlap(prediction, image(ref))
    assert result == pytest.approx({"dice": 8 / 12, "sensitivity": 0.5, "precision": 1.0})


def test_volumes_use_the_spacing_and_avd_is_percent_of_reference():
    ref, pred = zeros(), zeros()
    ref[0:4, 0:4, 0:4] = 1   # 64 voxels x 0.5*0.8*5 = 2 mm3 -> 128 mm3
    pred[0:3, 0:4, 0:4] = 1  # 48 voxels
    pair = metrics.MaskPair.from_images(image(pred, (0.5, 0.8, 5.0)), image(ref, (0.5, 0.8, 5.0)))
    assert pair.volumes_ml() == pytest.approx({"prediction_volume_ml": 0.096, "reference_volume_ml": 0.128})
    assert pair.avd_percent() == pytest.approx(25.0)


def test_per_image_metrics_cover_only_slices_with_reference_lesion():
    ref, pred = zeros(), zeros()
    ref[2, 5:9, 5:9] = 1                 # 16 px, found half
    pred[2, 5:9, 5:7] = 1
    ref[4, 5:9, 5:9] = 1                 # 16 px, missed
    pred[6, 1:3, 1:3] = 1                # false positive on a lesion-free slice: not a row
    rows = metrics.slice_metrics(image(pred), image(ref))
    assert [r["index"] for r in rows] == [2, 4]
    assert rows[0]["dice"] == pytest.approx(16 / 24)
    assert rows[0]["sensitivity"] == pytest.approx(0.5) and rows[0]["precision"] == 1.0
    assert rows[1]["dice"] == 0.0 and rows[1]["sensitivity"] == 0.0 and math.isnan(rows[1]["precision"])
    # areas of 0.7 x 0.9 = 0.63 mm2 pixels: reference 16 and 16, prediction 8 and none
    assert [(r["reference_area_mm2"], r["prediction_area_mm2"]) for r in rows] == [(10.08, 5.04), (10.08, 0.0)]


def test_slice_index_is_the_index_of_io_to_axial_stack_on_an_oblique_grid():
    ref = zeros((10, 12, 14))
    ref[3:5, 2:4, 6] = 1
    ref[7, 9, 1:4] = 1
    reference = image(ref, spacing=(5.0, 0.8, 0.9), direction=AXIAL_FIRST)
    assert io.axial_axis(reference) == 0
    stack, frame = io.to_axial_stack(reference, dtype=np.uint8)
    expected = [int(k) for k in np.flatnonzero(stack.reshape(len(stack), -1).any(axis=1))]
    rows = metrics.slice_metrics(reference, reference)
    assert [r["index"] for r in rows] == expected == [1, 2, 3, 6]
    assert metrics.case_metrics(reference, reference)["slice_thickness_mm"] == 5.0  # voxel axis 0's spacing
    area = [int(stack[k].sum()) * frame.pixel_area_mm2 for k in expected]
    assert [r["reference_area_mm2"] for r in rows] == pytest.approx(area)
    assert [r["lv_ml"] for r in rows] == pytest.approx([a * frame.slice_thickness_mm / 1000 for a in area])


# ---------------------------------------------------------------------------------------------
# HD95


@pytest.mark.parametrize("direction, spacing, axis", [
    (OBLIQUE, (0.7, 0.9, 4.5), 2),
    (AXIAL_FIRST, (4.5, 0.7, 0.9), 0),
])
def test_hd95_of_two_parallel_patches_is_their_distance_in_mm(direction, spacing, axis):
    """The same square patch on slices 2 and 5: every boundary point is 3 slices from the other."""
    ref, pred = zeros((9, 16, 16)), zeros((9, 16, 16))
    index = [slice(4, 12)] * 3
    index[2 - axis] = 2
    ref[tuple(index)] = 1
    index[2 - axis] = 5
    pred[tuple(index)] = 1
    got = metrics.hd95_mm(image(pred, spacing, direction), image(ref, spacing, direction))
    assert got == pytest.approx(3 * spacing[axis], abs=1e-9)


def test_hd95_of_two_parallel_lines_in_plane_uses_the_row_spacing():
    ref, pred = zeros(), zeros()
    ref[3, 6, 2:20] = 1
    pred[3, 8, 2:20] = 1  # two rows apart along voxel axis 1 (0.9 mm) on an oblique grid
    assert metrics.hd95_mm(image(pred), image(ref)) == pytest.approx(1.8, abs=1e-9)


def test_hd95_ignores_the_interior_of_lesions_by_in_plane_erosion():
    ref = zeros((5, 30, 30))
    ref[1:4, 5:25, 5:25] = 1
    pred = ref.copy()
    pred[2, 5:25, 5:25] = 0   # a hole through a whole slice would move no in-plane boundary ...
    pred[2, 5:25, 5] = 1      # ... apart from the outline of that slice
    pred[2, 5:25, 24] = 1
    pred[2, 5, 5:25] = 1
    pred[2, 24, 5:25] = 1
    assert metrics.hd95_mm(image(pred), image(ref)) == 0.0


def _hd95_by_simpleitk(pred: sitk.Image, ref: sitk.Image) -> float:
    """Independent implementation: SimpleITK erosion and point-by-point physical transforms."""
    radius = [1, 1, 1]
    radius[io.axial_axis(ref)] = 0

    def points(mask):
        border = sitk.GetArrayFromImage(sitk.Subtract(mask, sitk.BinaryErode(mask, radius)))
        return np.array([ref.TransformIndexToPhysicalPoint([int(v) for v in idx[::-1]])
                         for idx in np.argwhere(border)])

    a, b = points(pred), points(ref)
    return max(np.percentile(cKDTree(b).query(a)[0], 95), np.percentile(cKDTree(a).query(b)[0], 95))


@pytest.mark.parametrize("direction, spacing", [(OBLIQUE, (0.7, 0.9, 4.5)), (AXIAL_FIRST, (3.0, 1.1, 0.6))])
def test_hd95_agrees_with_simpleitk_on_random_lesions_touching_the_border(direction, spacing):
    rng = np.random.default_rng(7)
    from scipy import ndimage

    for _ in range(3):
        ref = ndimage.binary_dilation(rng.random((7, 18, 15)) > 0.96).astype(np.uint8)
        pred = (ndimage.binary_dilation(rng.random((7, 18, 15)) > 0.97) | (ref & (rng.random(ref.shape) > 0.3)))
        ref[0, 0, :] = 1  # on the image border: the border counts as foreground, as in SimpleITK
        r, p = image(ref, spacing, direction), image(pred, spacing, direction)
        assert metrics.hd95_mm(p, r) == pytest.approx(_hd95_by_simpleitk(p, r), rel=1e-9)


# ---------------------------------------------------------------------------------------------
# Lesion detection (MICCAI) and lesion-wise (CSVD)


def test_challenge_lesion_detection_counts_26_connected_lesions_with_any_overlap():
    ref, pred = zeros(), zeros()
    ref[1, 1, 1] = ref[2, 2, 2] = 1     # corner-touching voxels: one lesion
    ref[5, 10:13, 10:13] = 1            # detected by a single voxel
    ref[6, 16:19, 2:5] = 1              # missed
    pred[2, 2, 2] = 1
    pred[5, 11, 11] = 1
    pred[0, 18:20, 20:22] = 1           # false positive
    result = metrics.lesion_detection(image(pred), image(ref))
    assert result["n_reference_lesions"] == 3 and result["n_predicted_lesions"] == 3
    assert result["lesion_recall"] == pytest.approx(2 / 3)
    assert result["lesion_f1"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("marked, found", [(4, True), (3, False)])
def test_lesionwise_reference_lesion_is_found_from_40_percent_of_its_voxels(marked, found):
    ref, pred = zeros(), zeros()
    ref[3, 4, 2:12] = 1    # 10 voxels
    pred[3, 4, 2:2 + marked] = 1
    result = metrics.lesionwise(image(pred), image(ref))
    assert result["n_found"] == int(found)
    assert result["recall"] == float(found)
    assert result["precision"] == 1.0  # a too small outline inside a lesion is no false detection
    assert result["dice"] == (1.0 if found else 0.5)


def test_lesionwise_blob_mostly_outside_an_unfound_lesion_is_a_false_detection():
    ref, pred = zeros(), zeros()
    ref[3, 4, 2:12] = 1    # 10 voxels, 3 marked: not found
    pred[3, 4, 9:12] = 1
    pred[3, 5:9, 9:12] = 1  # 12 more voxels outside: 3 of 15 (20 %) in the reference
    result = metrics.lesionwise(image(pred), image(ref))
    assert (result["recall"], result["precision"], result["dice"]) == (0.0, 0.0, 0.0)
    assert metrics.lesion_detection(image(pred), image(ref))["lesion_recall"] == 1.0  # any overlap detects


def test_lesionwise_a_far_too_generous_outline_finds_its_lesion_but_is_a_false_detection():
    """The 40 % rule from both sides: a blob that is mostly outside the reference is not precise, even
    when it covers a lesion (a box over every lesion would otherwise score recall, precision and Dice 1)."""
    ref, pred = zeros(), zeros()
    ref[3, 8:10, 8:10] = 1
    pred[2:5, 6:12, 6:12] = 1  # 108 voxels around a 4-voxel lesion: 4 % in the reference
    pred[7, 0, 0] = 1          # and one false positive
    result = metrics.lesionwise(image(pred), image(ref))
    assert (result["recall"], result["precision"], result["dice"]) == (1.0, 0.0, pytest.approx(1 / 3))
    ref[3, 2:4, 2:4] = 1       # a second lesion, both under one box
    box = zeros()
    box[:, 1:12, 1:12] = 1
    result = metrics.lesionwise(image(box), image(ref))
    assert (result["n_found"], result["n_correct"], result["precision"]) == (2, 0, 0.0)
    tight = zeros()
    tight[3, 8:10, 7:10] = 1   # 6 voxels, 4 in the lesion: correct
    assert metrics.lesionwise(image(tight), image(ref))["n_correct"] == 1


def _line_lesions(sizes) -> np.ndarray:
    """One straight lesion per size, every other slice, so that no two touch and sizes are exact."""
    mask = zeros((2 * len(sizes), 3, 160))
    for n, size in enumerate(sizes):
        mask[2 * n, 1, :size] = 1
    return mask


def test_lesionwise_size_classes_in_voxels_follow_the_paper_bounds():
    ref = _line_lesions([19, 20, 150, 151, 5])
    pred = ref.copy()
    pred[6, 1, :] = 0   # the 151-voxel lesion is missed
    result = metrics.lesionwise(image(pred), image(ref))
    by_size = result["by_size"]
    assert [by_size[c]["n_reference"] for c in metrics.SIZE_CLASSES] == [2, 2, 1]
    assert by_size["large"]["recall"] == 0.0 and by_size["small"]["recall"] == 1.0
    assert math.isnan(by_size["large"]["precision"])  # no predicted large lesion
    assert by_size["large"]["dice"] == 0.0


def test_lesionwise_size_classes_in_mm3_use_the_voxel_volume():
    ref = _line_lesions([8, 15])  # voxel 0.5 x 0.8 x 5 = 2 mm3: 16 mm3 small, 30 mm3 medium
    spacing = (0.5, 0.8, 5.0)
    classes = metrics.SizeClasses((20, 150), "mm3")
    result = metrics.lesionwise(image(ref, spacing), image(ref, spacing), size_classes=classes)
    assert result["by_size"]["small"]["n_reference"] == 1 and result["by_size"]["medium"]["n_reference"] == 1
    # the predicted lesions too: by their 16 and 30 mm3, not their 8 and 15 voxels (both small)
    assert result["by_size"]["small"]["n_predicted"] == 1 and result["by_size"]["medium"]["n_predicted"] == 1
    assert result["by_size"]["medium"]["range"] == "20-150 mm3"


def test_lesionwise_a_lesion_marked_at_exactly_the_found_fraction_is_found_from_both_sides():
    """"At least" the fraction: 55 of 100 voxels is 55 % (0.55 x 100 is 55.00000000000001 in floating point)."""
    ref, pred = _line_lesions([100]), zeros((2, 3, 160))
    pred[0, 1, 45:145] = 1  # 100 voxels, 55 of them on the reference lesion
    result = metrics.lesionwise(image(pred), image(ref), found_fraction=0.55)
    assert (result["n_found"], result["n_correct"]) == (1, 1)
    result = metrics.lesionwise(image(pred), image(ref), found_fraction=0.56)
    assert (result["n_found"], result["n_correct"]) == (0, 0)


def test_lesionwise_size_classes_in_mm3_are_exact_at_the_bounds():
    """medium is 20..150 mm3 inclusive: 625 voxels of 0.4 x 0.4 x 1.5 mm are 150 mm3 (150.00000000000003 in floating
    point), 626 are large."""
    ref = np.zeros((4, 3, 700), np.uint8)
    ref[0, 1, :625] = 1
    ref[2, 1, :626] = 1
    spacing = (0.4, 0.4, 1.5)
    classes = metrics.SizeClasses((20, 150), "mm3")
    by_size = metrics.lesionwise(image(ref, spacing), image(ref, spacing), size_classes=classes)["by_size"]
    assert [by_size[c]["n_reference"] for c in metrics.SIZE_CLASSES] == [0, 1, 1]


@pytest.mark.parametrize("bounds, unit", [((150, 20), "voxels"), ((0, 10), "voxels"), ((20, 150), "ml")])
def test_bad_size_classes_are_refused(bounds, unit):
    with pytest.raises(DeepWMLError):
        metrics.SizeClasses(bounds, unit)


# ---------------------------------------------------------------------------------------------
# ROC AUC


def _scores(values, shape=(1, 1, 5)) -> sitk.Image:
    im = sitk.GetImageFromArray(np.asarray(values, np.float32).reshape(shape))
    im.SetSpacing((0.7, 0.9, 4.5))
    im.SetDirection(tuple(OBLIQUE.ravel()))
    im.SetOrigin((12.5, -40.0, 7.25))
    return im


def test_roc_auc_counts_ties_as_half():
    # lesion scores 0.9, 0.4; background 0.5, 0.1, 0.4 -> (3 + 1 + 0.5) / 6 pairs
    reference = image(np.array([1, 1, 0, 0, 0]).reshape(1, 1, 5))
    assert metrics.roc_auc(_scores([0.9, 0.4, 0.5, 0.1, 0.4]), reference) == pytest.approx(0.75)


def test_roc_auc_leaves_ignored_voxels_out():
    reference = image(np.array([1, 2, 0, 0, 2]).reshape(1, 1, 5))
    assert metrics.roc_auc(_scores([0.9, 0.0, 0.5, 0.1, 1.0]), reference) == 1.0


def test_roc_auc_against_a_reference_saved_cropped_is_the_whole_scans():
    """A probability map on the scan (scores above 0 on every face, as a network's are) and a reference saved
    cropped to its lesions: the map looked like a mask cropped to its lesions, so the two were compared on their
    joint extent and a voxel around it, a ring of scores 0 counted as background the scan does not have (AUC
    0.866 read as 0.890 here). The reference is padded onto the map's grid: the whole scan's AUC, in any voxel
    order."""
    rng = np.random.default_rng(1)
    lesion = np.zeros((20, 36, 40), np.uint8)
    lesion[5:8, 10:15, 10:16] = 1
    scores = _scores((rng.random(lesion.shape) * 0.6 + lesion * 0.3), lesion.shape)
    reference = image(lesion)
    whole = metrics.roc_auc(scores, reference)
    assert 0.7 < whole < 0.95, whole
    cropped = sitk.RegionOfInterest(reference, [6, 5, 3], [10, 10, 5])
    assert io.grid_difference(cropped, reference) is not None
    assert metrics.roc_auc(scores, cropped) == pytest.approx(whole, abs=1e-12)
    assert metrics.roc_auc(scores, sitk.Flip(cropped, [True, False, True])) == pytest.approx(whole, abs=1e-12)
    assert metrics.case_metrics(reference, cropped, scores)["roc_auc"] == pytest.approx(whole, abs=1e-12)


def test_roc_auc_is_undefined_without_both_classes():
    assert math.isnan(metrics.roc_auc(_scores([0.1] * 5), image(np.zeros((1, 1, 5)))))


# ---------------------------------------------------------------------------------------------
# Labels, empty masks and grids


def test_ignore_label_removes_voxels_from_both_masks():
    ref, pred = zeros(), zeros()
    ref[2, 2:4, 2:4] = 1
    ref[5, 10:14, 10:14] = metrics.IGNORE_LABEL   # e.g. a stroke lesion: not judged
    pred[2, 2:4, 2:4] = 1
    pred[5, 10:14, 10:14] = 1
    result = metrics.case_metrics(image(pred), image(ref))
    assert (result["dice"], result["precision"], result["hd95_mm"]) == (1.0, 1.0, 0.0)
    assert result["n_predicted_lesions"] == 1
    assert result["prediction_volume_ml"] == result["reference_volume_ml"]
    assert [s["index"] for s in result["slices"]] == [2]


def test_unknown_reference_labels_are_refused_with_a_clear_message():
    ref = zeros()
    ref[1, 1, 1] = 255
    ref[2, 2, 2] = 1  # 1 and 255 together: which is lesion is not knowable
    with pytest.raises(DeepWMLError, match="0 \\(background\\), 1 \\(lesion\\) and 2 \\(ignore\\)"):
        metrics.overlap(image(zeros()), image(ref))
    ref[2, 2, 2] = 3  # two lesion values other than 1
    with pytest.raises(DeepWMLError, match="values 3, 255 in 2 voxels"):
        metrics.overlap(image(zeros()), image(ref))


def test_a_two_valued_0_255_reference_is_read_as_lesion():
    ref, pred = zeros(), zeros()
    ref[2, 2:4, 2:4] = 255
    ref[5, 8:12, 8:12] = 255
    pred[2, 2:4, 2:4] = 1
    as_255 = metrics.case_metrics(image(pred), image(ref))
    as_1 = metrics.case_metrics(image(pred), image((ref > 0).astype(np.uint8)))
    assert as_255["dice"] == as_1["dice"] == pytest.approx(2 * 4 / (4 + 20))
    assert as_255["reference_volume_ml"] == as_1["reference_volume_ml"] > 0
    assert as_255["lesion_recall"] == as_1["lesion_recall"] == 0.5
    probabilities = sitk.Cast(image(pred), sitk.sitkFloat32)
    assert metrics.roc_auc(probabilities, image(ref)) == metrics.roc_auc(probabilities, image((ref > 0).astype(np.uint8)))


def test_prediction_probability_images_count_from_one_half():
    ref = zeros()
    ref[2, 2:4, 2:4] = 1
    probabilities = sitk.Cast(image(ref), sitk.sitkFloat32) * 0.6
    assert metrics.overlap(probabilities, image(ref))["dice"] == 1.0


EMPTY_TABLE = {
    # (reference empty, prediction empty) -> values from the module docstring
    (True, True): dict(dice=1.0, sensitivity=None, precision=None, hd95_mm=0.0, avd_percent=0.0,
                       lesion_recall=1.0, lesion_f1=1.0, lw_recall=None, lw_precision=None, lw_dice=1.0),
    (True, False): dict(dice=0.0, sensitivity=None, precision=0.0, hd95_mm=None, avd_percent=None,
                        lesion_recall=1.0, lesion_f1=0.0, lw_recall=None, lw_precision=0.0, lw_dice=0.0),
    (False, True): dict(dice=0.0, sensitivity=0.0, precision=None, hd95_mm=None, avd_percent=100.0,
                        lesion_recall=0.0, lesion_f1=0.0, lw_recall=0.0, lw_precision=None, lw_dice=0.0),
}


@pytest.mark.parametrize("ref_empty, pred_empty", list(EMPTY_TABLE))
def test_empty_mask_conventions(ref_empty, pred_empty):
    lesion = zeros()
    lesion[3, 4:6, 4:6] = 1
    ref = zeros() if ref_empty else lesion
    pred = zeros() if pred_empty else lesion
    result = metrics.case_metrics(image(pred), image(ref))
    got = {k: result[k] for k in ("dice", "sensitivity", "precision", "hd95_mm", "avd_percent",
                                  "lesion_recall", "lesion_f1")}
    got.update(lw_recall=result["lesionwise"]["recall"], lw_precision=result["lesionwise"]["precision"],
               lw_dice=result["lesionwise"]["dice"])
    got = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in got.items()}
    assert got == EMPTY_TABLE[(ref_empty, pred_empty)]


def test_masks_on_different_grids_are_refused():
    ref = image(zeros())
    moved = image(zeros(), origin=(12.5, -40.0, 9.0))
    resampled = image(zeros(), spacing=(0.7, 0.9, 4.0))
    # another extent is refused off the voxel lattice (on it, a cropped mask is padded: test_io)
    for other in (moved, resampled, image(zeros((8, 20, 23)), origin=(12.5, -40.0, 7.5))):
        with pytest.raises(DeepWMLError, match="different voxel grids"):
            metrics.case_metrics(other, ref)


def test_two_dimensional_images_are_refused():
    flat = sitk.Image(10, 10, sitk.sitkUInt8)
    with pytest.raises(DeepWMLError, match="3D"):
        metrics.overlap(flat, flat)


def test_a_reference_of_0_and_2_alone_is_refused_not_read_as_all_ignore():
    """A mask whose lesion value is 2 (a second label in ITK-SNAP, a segment exported as label 2) was read as
    'ignore' everywhere: no lesion left, the prediction masked away there, Dice 0 with nothing said."""
    ref, pred = zeros(), zeros()
    ref[2, 2:6, 2:6] = 2
    pred[2, 2:6, 2:6] = 1
    with pytest.raises(DeepWMLError, match="holds only 0 and 2.*relabel it 1"):
        metrics.case_metrics(image(pred), image(ref))
    ref[5, 10, 10] = 1  # with a lesion beside it, 2 is the challenge's ignore label as before
    assert metrics.case_metrics(image(pred), image(ref))["dice"] == 0.0


@pytest.mark.parametrize("pred_has, ref_has, words, undefined", [
    (True, False, "the reference is empty", ("sensitivity", "hd95_mm", "avd_percent")),
    (False, True, "the prediction is empty", ("precision", "hd95_mm")),
    (False, False, "both empty", ("sensitivity", "precision")),
])
def test_notes_say_which_metrics_an_empty_mask_leaves_undefined(pred_has, ref_has, words, undefined):
    ref, pred = zeros(), zeros()
    ref[2, 2:6, 2:6] = ref_has
    pred[3, 8:10, 8:10] = pred_has
    result = metrics.case_metrics(image(pred), image(ref))
    assert all(math.isnan(result[key]) for key in undefined)
    assert len(result["notes"]) == 1 and words in result["notes"][0]
    assert all(key.split("_")[0] in result["notes"][0].lower() for key in undefined)


def test_a_prediction_only_inside_the_ignored_region_is_not_called_empty():
    """deepwml evaluate said 'the prediction is empty' of a prediction whose voxels all lie in the reference's
    label 2: it says they were marked there and not counted, with how many."""
    ref, pred = zeros(), zeros()
    ref[2, 2:6, 2:6] = 1
    ref[5, 10:12, 10:13] = metrics.IGNORE_LABEL
    pred[5, 10:12, 10:12] = 1
    result = metrics.case_metrics(image(pred), image(ref))
    assert math.isnan(result["precision"]) and result["dice"] == 0.0
    assert result["notes"][0].startswith("all 4 voxels of the prediction lie in the reference's ignored region (label 2)")
    assert "is empty" not in " ".join(result["notes"])
    assert result["notes"][0].endswith("precision, HD95 and lesion-wise precision are undefined; Dice, sensitivity "
                                       "and lesion recall are 0, AVD 100 %")


def test_notes_count_the_voxels_the_ignore_label_left_out_and_are_empty_otherwise():
    ref, pred = zeros(), zeros()
    ref[2, 2:6, 2:6] = 1
    pred[2, 2:6, 2:6] = 1
    assert metrics.case_metrics(image(pred), image(ref))["notes"] == []
    ref[5, 10:12, 10:13] = metrics.IGNORE_LABEL
    assert metrics.case_metrics(image(pred), image(ref))["notes"] == [
        "6 reference voxels labelled 2 (ignore) were left out of both masks"]
