"""The brain-mask benchmark's cuts (Testing/benchmarks/brain_coverage.py, README's "A scan that does not cover the
whole brain"): a crop takes the side of the head it names whatever order the file stores its axes in, and a thick
re-slicing "to the top" ends its highest slice at the top of the brain."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parent / "benchmarks"))

from brain_coverage import crop, to_the_top  # noqa: E402

from DeepWMLLib import io  # noqa: E402


def numbered(direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)) -> sitk.Image:
    """A 12 x 10 x 8 voxel image whose every voxel holds its own number."""
    image = sitk.GetImageFromArray(np.arange(8 * 10 * 12, dtype=np.float32).reshape(8, 10, 12))
    image.SetDirection(direction)
    return image


@pytest.mark.parametrize("direction", [(1, 0, 0, 0, 1, 0, 0, 0, 1), (-1, 0, 0, 0, -1, 0, 0, 0, -1),
                                       (0, 1, 0, 1, 0, 0, 0, 0, 1)])
def test_a_crop_keeps_the_axial_stacks_slices_rows_and_columns_it_names(direction):
    image = numbered(direction)
    stack, frame = io.to_axial_stack(image)
    cut = crop(image, frame, slices=(1, 6), rows=(2, stack.shape[1]), cols=(0, stack.shape[2] - 3))
    assert np.array_equal(io.to_axial_stack(cut)[0], stack[1:6, 2:, :-3])


@pytest.mark.parametrize("thickness", [5, 8])
def test_to_the_top_ends_the_highest_thick_slice_at_the_top_of_the_brain(thickness):
    brain = np.zeros((60, 16, 16), np.float32)
    brain[7:50] = 1 + np.arange(43, dtype=np.float32)[:, None, None]  # slices 7-49 hold brain, numbered from 1
    thick = io.to_axial_stack(to_the_top(sitk.GetImageFromArray(brain), thickness))[0]
    assert thick[-1, 0, 0] == pytest.approx(np.mean(np.arange(43 - thickness + 1, 44)))  # the top `thickness` slices
    assert thick.shape[0] == 43 // thickness
