"""The registration benchmark's same-patient variations (Testing/benchmarks/change_pairs.py, README's
"How close the limits are"): thick slices average their slab, the tilt turns the head, the scale holds."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parent / "benchmarks"))

from change_pairs import read, variant  # noqa: E402


def _ramp(n: int = 30) -> sitk.Image:
    """A 1 mm axial stack whose slice k holds 100 + 10 k everywhere (uint16, as the clinical scans)."""
    array = (100 + 10 * np.arange(n))[:, None, None] * np.ones((1, 24, 20))
    image = sitk.GetImageFromArray(array.astype(np.uint16))
    image.SetSpacing((0.8, 0.8, 1.0))
    image.SetOrigin((-5.0, 7.0, -12.0))
    return image


def test_thick_slices_average_their_slab_from_the_same_first_edge():
    image = _ramp()
    thick = variant(image, thick_mm=5.0)
    assert thick.GetSize() == (20, 24, 6) and thick.GetSpacing() == pytest.approx((0.8, 0.8, 5.0))
    # the first 5 mm slab covers the original slices 0-4 (edges -12.5 to -7.5 mm): centre at -10 mm
    assert thick.GetOrigin() == pytest.approx((-5.0, 7.0, -10.0))
    values = sitk.GetArrayFromImage(thick)[:, 12, 10]
    assert values[1:5] == pytest.approx(100 + 10 * (2 + 5 * np.arange(1, 5)), abs=1)  # a ramp averages to its centre


def test_scale_and_offset_are_another_scanners_and_stay_uint16():
    image = _ramp()
    scaled = variant(image, scale=0.35, offset=40.0)
    assert scaled.GetPixelID() == sitk.sitkUInt16
    assert sitk.GetArrayFromImage(scaled)[3, 5, 5] == round(130 * 0.35 + 40)
    assert sitk.GetArrayFromImage(variant(image, scale=1000.0)).max() == 65535  # clipped, not wrapped


def test_the_tilt_nods_the_head_about_its_left_right_axis():
    array = np.zeros((40, 40, 40), np.uint16)
    array[20, 30, 20] = 1000  # a bright point 10 voxels anterior/posterior of the centre, on the centre slice
    image = sitk.GetImageFromArray(array)
    tilted = sitk.GetArrayFromImage(variant(image, tilt_deg=30.0))
    k, j, i = np.unravel_index(np.argmax(tilted), tilted.shape)
    assert i == 20 and abs(k - 19.5) >= 4 and abs(j - 19.5) < 10  # moved through slices, not sideways


def test_a_study_name_carries_its_modifiers(tmp_path):
    sitk.WriteImage(_ramp(), str(tmp_path / "p_study1.nii.gz"))
    assert read(tmp_path, "p_study1").GetSpacing()[2] == pytest.approx(1.0)
    made = read(tmp_path, "p_study1:thick5:tilt6:scale3+20")
    assert made.GetSpacing()[2] == pytest.approx(5.0) and sitk.GetArrayFromImage(made).max() > 1000
    with pytest.raises(ValueError, match="unknown modifier"):
        read(tmp_path, "p_study1:blur2")
