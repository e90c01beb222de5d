"""The labelled-case benchmark's thick slices: slab offsets, geometry, and the offsets table."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parent / "benchmarks"))

from labelled_cases import markdown, offsets_table, thick_slices  # noqa: E402


def _ramp(n: int = 23) -> sitk.Image:
    """A 1 mm volume whose axial slice k holds the value k everywhere (x, y, z storage, RAS-like)."""
    array = np.repeat(np.arange(n, dtype=np.float32)[:, None, None], 4, axis=1).repeat(5, axis=2)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.9, 0.9, 1.0))
    image.SetOrigin((-10.0, 20.0, -30.0))
    return image


@pytest.mark.parametrize("thickness,offset", [(5, 0), (5, 3), (8, 7), (8, 2)])
def test_thick_slices_average_the_slab_that_starts_at_the_offset(thickness, offset):
    image = _ramp()
    thick = thick_slices(image, thickness, offset=offset)
    n = (23 - offset) // thickness
    assert thick.GetSize() == (5, 4, n)
    assert thick.GetSpacing()[2] == pytest.approx(thickness)
    values = sitk.GetArrayFromImage(thick)[:, 0, 0]
    expected = [np.mean(np.arange(offset + k * thickness, offset + (k + 1) * thickness)) for k in range(n)]
    np.testing.assert_allclose(values, expected)
    # each thick slice sits where the 1 mm slices it averages are centred
    for k in range(n):
        centre = thick.TransformIndexToPhysicalPoint((0, 0, k))[2]
        assert centre == pytest.approx(-30.0 + expected[k] * 1.0)


def test_thick_masks_keep_slabs_at_least_half_lesion():
    mask = sitk.GetImageFromArray(np.zeros((10, 3, 3), np.uint8))
    array = sitk.GetArrayFromImage(mask)
    array[1:4] = 1  # 1 mm slices 1, 2, 3
    mask = sitk.GetImageFromArray(array)
    assert list(sitk.GetArrayFromImage(thick_slices(mask, 5, mask=True, offset=0))[:, 0, 0]) == [1, 0]  # 3 of 5
    assert list(sitk.GetArrayFromImage(thick_slices(mask, 5, mask=True, offset=3))[:, 0, 0]) == [0]  # 1 of 5


def test_offset_must_lie_within_the_slab():
    with pytest.raises(ValueError):
        thick_slices(_ramp(), 5, offset=5)


def _rows(dice_by_offset: dict) -> list[dict]:
    rows = []
    for offset, dices in dice_by_offset.items():
        for case, dice in zip(("patient07", "patient19", "patient26"), dices):
            rows.append({"case": case, "thickness_mm": 5, "offset": offset, "dice": dice, "reference_ml": 1.0,
                         "predicted_ml": 1.0, "seconds": 0.1, "sensitivity": 0.5, "precision": 0.5, "hd95_mm": 1.0,
                         "avd_percent": 1.0, "lesion_recall": 0.5, "lesion_f1": 0.5, "images": []})
    return rows


def test_offsets_table_reports_each_offsets_median_and_their_spread():
    rows = _rows({0: [0.1, 0.8, 0.7], 1: [0.2, 0.6, 0.9], 2: [0.3, 0.5, 0.4]})
    text = offsets_table(rows)
    assert "| 5 mm | 1 mm | 0.200 | 0.600 | 0.900 | 0.600 |" in text
    assert "over 3 slab offsets: mean 0.567, range 0.400-0.700" in text  # medians 0.7, 0.6, 0.4


def test_markdown_headline_stays_at_offset_zero():
    text = markdown(_rows({0: [0.1, 0.8, 0.7], 1: [0.2, 0.6, 0.9]}))
    assert "Median Dice at 5 mm: 0.700" in text
    assert "over 2 slab offsets" in text
    assert "over 2 slab offsets" not in markdown(_rows({0: [0.1, 0.8, 0.7]}))
