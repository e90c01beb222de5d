"""The output mask lies on the input's exact grid, and in the right place, for awkward geometries."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from DeepWMLLib import io
from DeepWMLLib.preprocessing import NetworkGrid, PreprocessingConfig, head_mask
from DeepWMLLib.segment import load_models, segment_image
from DeepWMLLib.volume import Volume, voxels

from conftest import make_volume, oracle_network, rotation

# (name, spacing, direction): a thick-slice axial scan, tilted, flipped (RAS-stored), a sagittal
# acquisition (thick axis left-right) and a permuted-axis file.
GEOMETRIES = [
    ("axial", (0.9, 0.9, 5.0), np.eye(3)),
    ("oblique", (0.7, 0.8, 4.0), rotation(0.3, -0.2, 0.25)),
    ("ras-flipped", (0.9, 0.9, 6.0), np.diag([-1.0, -1.0, 1.0])),
    # columns of a direction matrix are the voxel axes: thick axis 0 runs left-right
    ("sagittal-acquired", (5.0, 0.9, 0.9), np.array([[1, 0, 0], [0, 0, 1], [0, -1, 0]], float)),
    # thick axis 2 runs anterior-posterior, slightly tilted
    ("coronal-oblique", (0.8, 0.8, 3.0), rotation(0.1, 0.2, 0.0) @ np.array([[1, 0, 0], [0, 0, 1], [0, -1, 0]], float)),
]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    return 2 * np.logical_and(a, b).sum() / max(1, a.sum() + b.sum())


@pytest.mark.parametrize("name,spacing,direction", GEOMETRIES, ids=[g[0] for g in GEOMETRIES])
def test_axial_stack_round_trip_is_exact(name, spacing, direction):
    image, _ = make_volume(size=(30, 26, 12), spacing=spacing, direction=direction)
    stack, frame = io.to_axial_stack(image)
    back = io.from_axial_stack(stack, frame)
    assert io.grid_difference(back, image) is None
    assert np.array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))


@pytest.mark.parametrize("kind", ["SimpleITK", "Volume"])
@pytest.mark.parametrize("name,spacing,direction", GEOMETRIES, ids=[g[0] for g in GEOMETRIES])
def test_a_map_written_a_few_axial_slices_at_a_time_is_the_stack_put_back(name, spacing, direction, kind):
    """segment_image's probability map is written into its image as the networks finish a few slices (runs of
    them: a slice with too little head is not run, and stays 0), not made whole and then copied into an image: the
    same image, of the input's kind, as the whole stack put back on the input's grid."""
    image, _ = make_volume(size=(30, 26, 12), spacing=spacing, direction=direction)
    if kind == "Volume":
        image = Volume(sitk.GetArrayFromImage(image), image.GetSpacing(), image.GetOrigin(), image.GetDirection())
    stack, frame = io.to_axial_stack(image)
    slices = np.array([0, 1, 2, 5, 7, 8, frame.n_slices - 1])
    run = np.zeros_like(stack)
    run[slices] = stack[slices]
    expected = io.from_axial_stack(run, frame)
    written = io.blank_map(frame)
    for part in (slices[:4], slices[4:]):
        io.put_axial_slices(written, frame, part, stack[part])
    assert type(written) is type(expected) and io.grid_difference(written, expected) is None
    assert np.array_equal(voxels(written), voxels(expected)) and voxels(written).dtype == np.float32


@pytest.mark.parametrize("name,spacing,direction", GEOMETRIES, ids=[g[0] for g in GEOMETRIES])
def test_axial_stack_is_radiological(name, spacing, direction):
    """Slices run inferior->superior; columns go to patient left, rows to posterior, whatever the file order."""
    image, _ = make_volume(size=(20, 18, 16), spacing=spacing, direction=direction)
    stack, frame = io.to_axial_stack(image)
    d = np.array(image.GetDirection()).reshape(3, 3)
    assert abs(d[2, frame.slice_axis]) == pytest.approx(np.abs(d[2]).max())

    def lps_of(s, r, c):
        idx = [0, 0, 0]
        idx[frame.slice_axis] = s
        idx[frame.row_axis] = (frame.size[frame.row_axis] - 1 - r) if frame.flip_row else r
        idx[frame.col_axis] = (frame.size[frame.col_axis] - 1 - c) if frame.flip_col else c
        return np.array(image.TransformIndexToPhysicalPoint(idx))

    step_col = lps_of(0, 0, 1) - lps_of(0, 0, 0)
    step_row = lps_of(0, 1, 0) - lps_of(0, 0, 0)
    assert step_col[0] > 0  # towards patient left (+x in LPS)
    assert step_row[1] > 0  # towards posterior (+y in LPS)


@pytest.mark.parametrize("spacing_mm", [0.9, None])
def test_network_grid_round_trip_keeps_lesion_in_place(spacing_mm):
    image, truth = make_volume(size=(120, 100, 8), spacing=(0.45, 0.6, 5.0), blobs=((0.6, 0.4, 0.5, 6.0),))
    stack, frame = io.to_axial_stack(image)
    truth_stack, _ = io.to_axial_stack(truth)
    grid = NetworkGrid.plan(frame, PreprocessingConfig(grid_size=(128, 128), grid_spacing_mm=spacing_mm), head_mask(stack))
    back = grid.to_input(grid.to_network(truth_stack.astype(np.float32)))
    assert back.shape == truth_stack.shape
    assert dice(back > 0.5, truth_stack) > 0.85


@pytest.mark.parametrize("name,spacing,direction", GEOMETRIES, ids=[g[0] for g in GEOMETRIES])
def test_segment_output_on_input_grid_and_in_place(name, spacing, direction, tiny_model, monkeypatch):
    """End to end with a 'bright is lesion' network: the mask must cover the painted lesion."""
    oracle_network(monkeypatch)
    size = tuple(int(round(n)) for n in np.where(np.array(spacing) > 2, 12, 64))
    image, truth = make_volume(size=size, spacing=spacing, direction=direction, origin=(12.5, -40.0, 7.0),
                               blobs=((0.35, 0.6, 0.5, 7.0), (0.65, 0.4, 0.5, 5.0)))
    result = segment_image(image, load_models([tiny_model]), device="cpu", min_lesion_mm3=0)
    assert io.grid_difference(result.mask, image) is None
    assert io.grid_difference(result.probabilities, image) is None
    assert result.mask.GetPixelID() == sitk.sitkUInt8
    assert dice(sitk.GetArrayFromImage(result.mask), sitk.GetArrayFromImage(truth)) > 0.7
    expected_plane = "sagittal" if name == "sagittal-acquired" else ("coronal" if name == "coronal-oblique" else "axial")
    assert result.report["acquisition_plane"] == expected_plane
    plane_warnings = [w for w in result.report["warnings"] if "could not be checked" not in w  # a small phantom,
                      and "does not cover the whole brain" not in w]  # a slab of a cylinder
    assert bool(plane_warnings) == (expected_plane != "axial")


SAGITTAL = np.array([[0, 0, -1], [1, 0, 0], [0, -1, 0]], float)  # slices along left-right, as a sagittal 3D FLAIR


@pytest.mark.parametrize("spacing,direction", [((1.0, 1.0, 1.0), SAGITTAL), ((3.0, 3.0, 3.0), SAGITTAL),
                                               ((1.0, 1.1, 1.0), rotation(0.0, 0.0, 1.5708) @ SAGITTAL),
                                               ((0.9, 0.9, 1.0), np.eye(3))],
                         ids=["1mm-sagittal", "3mm-sagittal", "near-isotropic-coronal", "near-isotropic-axial"])
def test_isotropic_volume_is_not_called_axial(spacing, direction, tiny_model, monkeypatch):
    """A 1 mm isotropic sagittal 3D FLAIR was reported as an axial acquisition: its voxels do not tell the plane
    it was acquired in, and the report now says so; it is segmented on its axial planes, without the warning
    of thick sagittal or coronal slices (nothing is thick)."""
    oracle_network(monkeypatch)
    image, _ = make_volume(size=(24, 40, 40), spacing=spacing, direction=direction, blobs=((0.5, 0.5, 0.5, 4.0),))
    assert io.acquisition_plane(image) == "isotropic"
    report = segment_image(image, load_models([tiny_model]), device="cpu", min_lesion_mm3=0).report
    assert report["acquisition_plane"] == "isotropic"
    assert [w for w in report["warnings"] if "acquisition" in w] == []
    assert io.acquisition_plane(make_volume(size=(24, 40, 40), spacing=(1.0, 1.0, 0.8))[0]) == "axial"  # 1.25: thin slices


def test_integer_input_gives_same_mask_as_float(tiny_model, monkeypatch):
    oracle_network(monkeypatch)
    image_f, _ = make_volume(dtype=sitk.sitkFloat32)
    image_u, _ = make_volume(dtype=sitk.sitkUInt16)
    models = load_models([tiny_model])
    a = segment_image(image_f, models, device="cpu").mask
    b = segment_image(image_u, models, device="cpu").mask
    assert dice(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b)) > 0.95


@pytest.mark.parametrize("grid_size", [(64, 128), (128, 64)])
def test_fitted_non_square_grid_covers_the_whole_slice(grid_size):
    """grid_spacing_mm None fits the whole slice into a non-square grid too: no input pixel falls
    outside the network's field of view (which would give it probability 0), but for the outermost
    half network pixel of a shrunk slice (pixel centres map onto pixel centres)."""
    image, _ = make_volume(size=(120, 100, 4), spacing=(0.45, 0.6, 5.0))
    stack, frame = io.to_axial_stack(image)
    grid = NetworkGrid.plan(frame, PreprocessingConfig(grid_size=grid_size, grid_spacing_mm=None), head_mask(stack))
    back = grid.to_input(np.ones((1, *grid_size), np.float32))
    assert back.shape == (1, *stack.shape[1:])
    assert back[:, 1:-1, 1:-1].min() > 0.99


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd"])
def test_isotropic_bound_holds_whatever_the_format(suffix, tmp_path):
    """A 1 x 1 x 1.2 mm sagittal 3D FLAIR (voxel sizes 20 % apart, the bound) was 'isotropic' as NRRD but 'sagittal'
    as NIfTI, which stores 1.2 mm as 1.2000000477 in single precision: the same scan named two ways by its format."""
    image, _ = make_volume(size=(24, 40, 40), spacing=(1.2, 1.0, 1.0), direction=SAGITTAL)
    path = tmp_path / f"flair{suffix}"
    sitk.WriteImage(image, str(path))
    assert io.acquisition_plane(io.read_image(path)) == "isotropic"
