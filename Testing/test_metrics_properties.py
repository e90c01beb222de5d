"""Property tests on small random masks: bounds, symmetry and invariance of the metrics."""

from __future__ import annotations

import math

import numpy as np
import SimpleITK as sitk
from conftest import rotation
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from DeepWMLLib import metrics

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

masks = arrays(np.uint8, st.tuples(st.integers(1, 4), st.integers(2, 6), st.integers(2, 6)),
               elements=st.integers(0, 1))
spacings = st.tuples(*[st.floats(0.3, 6.0, allow_nan=False) for _ in range(3)])
angles = st.floats(-math.pi, math.pi, allow_nan=False)


def pair_of_masks():
    return masks.flatmap(lambda a: st.tuples(st.just(a), arrays(np.uint8, a.shape, elements=st.integers(0, 1))))


def image(array, spacing=(1.0, 1.0, 1.0), direction=np.eye(3), origin=(0.0, 0.0, 0.0)) -> sitk.Image:
    im = sitk.GetImageFromArray(np.asarray(array, np.uint8))
    im.SetSpacing(tuple(float(s) for s in spacing))
    im.SetDirection(tuple(np.asarray(direction, float).ravel()))
    im.SetOrigin(tuple(float(o) for o in origin))
    return im


def nan_equal(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)


def in_unit_interval(value: float) -> bool:
    return math.isnan(value) or 0.0 <= value <= 1.0


@SETTINGS
@given(pair_of_masks(), spacings)
def test_overlap_metrics_are_bounded_and_symmetric(arrays_, spacing):
    a, b = arrays_
    ab = metrics.MaskPair.from_images(image(a, spacing), image(b, spacing))
    ba = metrics.MaskPair.from_images(image(b, spacing), image(a, spacing))
    assert all(in_unit_interval(v) for v in ab.overlap().values())
    assert nan_equal(ab.overlap()["dice"], ba.overlap()["dice"])
    assert nan_equal(ab.overlap()["sensitivity"], ba.overlap()["precision"])
    assert nan_equal(ab.hd95_mm(), ba.hd95_mm())
    detection = ab.lesion_detection()
    assert in_unit_interval(detection["lesion_recall"]) and in_unit_interval(detection["lesion_f1"])
    lesionwise = ab.lesionwise()
    assert all(in_unit_interval(lesionwise[k]) for k in ("recall", "precision", "dice"))


@SETTINGS
@given(masks, spacings)
def test_a_mask_agrees_perfectly_with_itself(a, spacing):
    pair = metrics.MaskPair.from_images(image(a, spacing), image(a, spacing))
    assert pair.overlap()["dice"] == 1.0
    assert pair.hd95_mm() == 0.0 and pair.avd_percent() == 0.0
    assert pair.lesion_detection()["lesion_f1"] == 1.0 and pair.lesionwise()["dice"] == 1.0


@SETTINGS
@given(pair_of_masks(), spacings, angles, st.tuples(*[st.floats(-200, 200) for _ in range(3)]))
def test_physical_metrics_do_not_depend_on_where_the_grid_lies(arrays_, spacing, angle, origin):
    """Rotating the grid about the superior axis and moving it changes no distance or volume."""
    a, b = arrays_
    plain = metrics.case_metrics(image(a, spacing), image(b, spacing))
    direction = rotation(0.0, 0.0, angle)
    moved = metrics.case_metrics(image(a, spacing, direction, origin), image(b, spacing, direction, origin))
    for key in ("dice", "hd95_mm", "avd_percent", "reference_volume_ml", "lesion_f1"):
        assert nan_equal(plain[key], moved[key]), key
    assert [s["index"] for s in plain["slices"]] == [s["index"] for s in moved["slices"]]


@SETTINGS
@given(pair_of_masks(), spacings)
def test_per_image_lesion_volumes_add_up_to_the_reference_volume(arrays_, spacing):
    a, b = arrays_
    result = metrics.case_metrics(image(a, spacing), image(b, spacing))
    assert math.isclose(sum(s["lv_ml"] for s in result["slices"]), result["reference_volume_ml"],
                        rel_tol=1e-6, abs_tol=1e-9)
    assert all(s["lv_group"] == metrics.lv_group(s["lv_ml"]) for s in result["slices"])
    assert all(in_unit_interval(s[k]) for s in result["slices"] for k in ("dice", "sensitivity", "precision"))


@SETTINGS
@given(masks.flatmap(lambda ref: st.tuples(st.just(ref), arrays(np.float32, ref.shape,
                                                                 elements=st.floats(0, 1, width=32)))))
def test_roc_auc_is_bounded_rank_based_and_antisymmetric(data):
    ref, scores = data
    reference = image(ref)

    def auc(values):
        scores_image = sitk.GetImageFromArray(values)
        scores_image.CopyInformation(reference)
        return metrics.roc_auc(scores_image, reference)

    base = auc(scores)
    if not ref.any() or ref.all():
        assert math.isnan(base)
        return
    assert 0.0 <= base <= 1.0
    wide = scores.astype(np.float64)
    assert math.isclose(auc(2.0 * wide ** 3), base, abs_tol=1e-12)  # strictly monotone: same ranks
    assert math.isclose(auc(-wide), 1.0 - base, abs_tol=1e-12)  # reversed order
