"""The output mask lies on the input's exact grid, and in the right place, for awkward geometries."""

from __future__ import annotations

import re

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
                      and "does not cover the whole brain" not in w  # a slab of a cylinder,
                      and "looks clipped" not in w]  # its lesions painted at one value, its top
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


# columns are the voxel axes' directions in LPS: axis 0 runs posterior, axis 1 inferior, axis 2 to the patient's right
_SECOND_AXIS_DOWN = np.array([[0, 0, -1], [1, 0, 0], [0, -1, 0]], float)


@pytest.mark.parametrize("kind", ["SimpleITK", "Volume"])
def test_a_file_whose_second_axis_runs_down_is_stacked_along_it_by_hand(kind):
    """A file of 4 x 5 x 6 voxels (0.5, 3 and 0.8 mm) whose axis 0 runs posterior, axis 1 inferior and axis 2 to the
    right (direction columns (0,1,0), (0,0,-1), (-1,0,0)): its direction matrix's row and column 2 point at
    different axes, so reading the superior axis from the column instead of the row is seen. Worked out by hand:
    the slices are axis 1 (|-1| in the superior row), 3 mm thick, running down (not inferior first); of axes 0 and 2
    the columns are axis 2 (its x component -1), flipped to run to the left, 0.8 mm; the rows are axis 0, posterior
    already, 0.5 mm; a pixel is 0.4 mm2. So stack[s, r, c] is voxel (i=r, j=s, k=5-c), numpy's array[5-c, s, r];
    a voxel at (i=1, j=2, k=4) lies at [slice 2, row 1, col 1]. Its plane: axis 1 stands apart (3/0.8 > 0.8/0.5),
    whose direction column (0,0,-1) is superior-inferior: axial (its row (1,0,0) would say sagittal)."""
    array = np.arange(6 * 5 * 4, dtype=np.float32).reshape(6, 5, 4)  # numpy [k, j, i]
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.5, 3.0, 0.8))
    image.SetOrigin((10.0, -20.0, 30.0))
    image.SetDirection(tuple(_SECOND_AXIS_DOWN.ravel()))
    if kind == "Volume":
        image = Volume(array.copy(), image.GetSpacing(), image.GetOrigin(), image.GetDirection())
    stack, frame = io.to_axial_stack(image)
    assert (frame.slice_axis, frame.row_axis, frame.col_axis, frame.flip_row, frame.flip_col) == (1, 0, 2, False, True)
    assert frame.inferior_first is False and frame.n_slices == 5
    assert (frame.slice_thickness_mm, frame.row_spacing_mm, frame.col_spacing_mm) == (3.0, 0.5, 0.8)
    assert frame.pixel_area_mm2 == pytest.approx(0.4)
    assert stack.shape == (5, 4, 6)
    s, r, c = np.meshgrid(np.arange(5), np.arange(4), np.arange(6), indexing="ij")
    assert np.array_equal(stack, array[5 - c, s, r])
    assert np.array_equal(io.axial_view(image, frame), stack)
    # one nonzero voxel at (i=1, j=2, k=4): [slice 2, row 1, col 1]
    one = np.zeros_like(array)
    one[4, 2, 1] = 1
    marked = sitk.GetImageFromArray(one) if kind == "SimpleITK" else Volume(one, frame.spacing, frame.origin,
                                                                            frame.direction)
    if kind == "SimpleITK":
        marked.CopyInformation(image)
    assert [int(v[0]) for v in io.axial_positions(marked, frame)] == [2, 1, 1]
    back = io.from_axial_stack(stack, frame)
    assert io.grid_difference(back, image) is None and np.array_equal(voxels(back), array)
    # written back a few slices at a time: slices 1 and 3 of the stack land at j = 1 and 3
    written = io.blank_map(frame)
    io.put_axial_slices(written, frame, np.array([1, 3]), stack[[1, 3]])
    expected = np.zeros_like(array)
    expected[:, [1, 3], :] = array[:, [1, 3], :]
    assert np.array_equal(voxels(written), expected)
    assert io.acquisition_plane(image) == "axial"


def test_the_plane_is_the_direction_of_the_slice_axis_not_its_row():
    """Thick slices (0.9 x 0.9 x 5 mm) along a file's axis 2, which runs to the patient's right (direction column 2
    (-1, 0, 0)): a sagittal acquisition. The direction matrix's row 2 is (0, -1, 0), which would say coronal."""
    image = sitk.Image((8, 8, 6), sitk.sitkFloat32)
    image.SetSpacing((0.9, 0.9, 5.0))
    image.SetDirection(tuple(_SECOND_AXIS_DOWN.ravel()))
    assert io.acquisition_axis(image) == 2 and io.acquisition_plane(image) == "sagittal"


def test_the_slice_axis_of_spacings_in_even_steps_is_the_thickest():
    """1 x 2 x 4 mm voxels: the thickest axis stands apart from the middle one (4/2) exactly as much as the thinnest
    does (2/1); a 2D acquisition's slices are its thickest axis, so the slices are axis 2 (axial here), not the 1 mm
    axis 0 (which would be sagittal). The same with the thick axis first (4 x 2 x 1 mm, axis 0 running
    left-right: sagittal)."""
    image = sitk.Image((8, 8, 6), sitk.sitkFloat32)
    image.SetSpacing((1.0, 2.0, 4.0))
    assert io.acquisition_axis(image) == 2 and io.acquisition_plane(image) == "axial"
    image.SetSpacing((4.0, 2.0, 1.0))
    assert io.acquisition_axis(image) == 0 and io.acquisition_plane(image) == "sagittal"


def test_a_near_isotropic_volumes_slice_axis_is_its_axial_axis():
    """1 x 1.1 x 1 mm (within 20 %): its geometry cannot tell how it was acquired, so `acquisition_axis` (the axis
    realbg sub-slices) is the axial one, axis 2 here, not the 1.1 mm axis 1 that stands apart from the others."""
    image = sitk.Image((8, 8, 6), sitk.sitkFloat32)
    image.SetSpacing((1.0, 1.1, 1.0))
    assert io.acquisition_axis(image) == 2 and io.acquisition_plane(image) == io.ISOTROPIC


def test_a_slices_area_and_lv_use_both_pixel_sides_and_the_slice_spacing():
    """Rectangular pixels, 0.5 mm between columns (x) and 0.8 mm between rows (y), 3 mm slices: 10 lesion voxels on
    slice 2 are 10 x 0.5 x 0.8 = 4 mm2, an LV of 4 x 3 / 1000 = 0.012 ml (G1); the total 0.012 ml. With one pixel
    side used twice the area reads 2.5 or 6.4 mm2."""
    from DeepWMLLib.report import lesion_report

    array = np.zeros((5, 12, 16), np.uint8)  # numpy [slice, row, col]
    array[2, 6, 3:13] = 1
    mask = sitk.GetImageFromArray(array)
    mask.SetSpacing((0.5, 0.8, 3.0))
    report = lesion_report(mask)
    (row,) = [s for s in report["slices"] if s["area_mm2"] > 0]
    assert (row["index"], row["area_mm2"], row["lv_group"]) == (2, 4.0, "G1")
    assert row["lv_ml"] == pytest.approx(0.012) and report["volume_ml"] == pytest.approx(0.012)


@pytest.mark.parametrize("direction", [(-1, 0, 0, 0, 1, 0, 0, 0, 1), (1, 0, 0, 0, -1, 0, 0, 0, 1)],
                         ids=["x-runs-right", "y-runs-anterior"])
@pytest.mark.parametrize("kind", ["SimpleITK", "Volume"])
def test_a_stack_given_up_is_put_back_with_only_its_own_axis_flipped(direction, kind):
    """`from_axial_stack(reuse=True)` (how segment_image puts its maps back) flips the stack in its own buffer: a file
    of axial slices whose x alone runs to the patient's right has its columns flipped (rows kept), one whose y alone
    runs anterior its rows (columns kept). Put back, the stack is the file's own voxels again, exactly as without
    reuse; flipping the other axis mirrors the mask."""
    array = np.arange(3 * 4 * 5, dtype=np.float32).reshape(3, 4, 5)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.9, 0.8, 4.0))
    image.SetDirection(direction)
    if kind == "Volume":
        image = Volume(array.copy(), image.GetSpacing(), image.GetOrigin(), image.GetDirection())
    stack, frame = io.to_axial_stack(image)
    assert (frame.flip_col, frame.flip_row) == ((True, False) if direction[0] < 0 else (False, True))
    assert np.array_equal(stack, array[:, :, ::-1] if frame.flip_col else array[:, ::-1, :])
    back = io.from_axial_stack(stack.copy(), frame, reuse=True)
    assert io.grid_difference(back, image) is None and np.array_equal(voxels(back), array)


@pytest.mark.parametrize("kind", ["SimpleITK", "Volume"])
def test_an_axial_stack_is_never_the_images_own_voxels(kind):
    """`to_axial_stack` (copy=True) gives a stack the caller may write into: for a float32 file of axial slices that
    needs no flip, the stack is the image's voxels in the same order, but a copy; written over, the image keeps its
    values (a scan normalised in place would otherwise change the scan, and the Slicer volume's voxels with it)."""
    array = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    image = sitk.GetImageFromArray(array) if kind == "SimpleITK" else Volume(array.copy(), (1.0, 1.0, 3.0), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()))
    stack, frame = io.to_axial_stack(image)
    assert np.array_equal(stack, array) and stack.flags.writeable
    stack[...] = -1
    assert np.array_equal(voxels(image), array)


def _edge_input(kind: str, folder) -> tuple:
    """(a scan file or DICOM folder of `kind` whose header uses a fallback or an odd but valid placing, its true
    mask): an oblique scan (a flipped axis for NRRD), its header edited by hand."""
    import struct

    from conftest import set_orientation, write_dicom_series

    direction = rotation(0.2, -0.15, 0.3)
    if kind == "nrrd-flipped-axis":
        direction = direction @ np.diag([-1.0, 1.0, 1.0])
    image, truth = make_volume(size=(48, 40, 10), spacing=(0.9, 0.8, 4.0), direction=direction, origin=(12.5, -40.0, 7.0),
                               blobs=((0.4, 0.55, 0.5, 7.0),), dtype=sitk.sitkInt16 if kind.startswith("dicom") else
                               sitk.sitkFloat32)
    if kind.startswith("dicom"):
        path = write_dicom_series(folder / "series", image, description="AX FLAIR")
        set_orientation(path, "\\".join(f"{v:.4f}" for v in (*direction[:, 0], *direction[:, 1])))  # rounded
        return path, truth
    path = folder / ("scan.nii" if kind.startswith("nifti") else "scan.nrrd" if kind.startswith("nrrd") else "scan.mha")
    sitk.WriteImage(image, str(path))
    data = bytearray(path.read_bytes())
    if kind == "nifti-unused-sform-nan":  # sform_code 0: the qform places it, the NaN sform is not read
        struct.pack_into("<2h", data, 252, 1, 0)
        struct.pack_into("<f", data, 292, float("nan"))
    elif kind == "nifti-unused-qform-nan":  # qform_code 0: the sform places it
        struct.pack_into("<2h", data, 252, 0, 1)
        struct.pack_into("<3f", data, 256, *(float("nan"),) * 3)
    elif kind == "nrrd-no-origin":  # not known: 0, 0, 0 (as every NRRD reader reads it)
        data = bytearray(re.sub(rb"space origin: [^\n]*\n", b"", bytes(data), count=1))
    path.write_bytes(data)
    return path, truth


EDGE_INPUTS = ["nifti-unused-sform-nan", "nifti-unused-qform-nan", "nrrd-flipped-axis", "nrrd-no-origin", "mha-oblique",
               "dicom-rounded-orientation"]


@pytest.mark.parametrize("kind", EDGE_INPUTS)
def test_the_mask_of_a_scan_placed_by_a_fallback_has_the_scans_own_geometry(kind, tmp_path, tiny_model, monkeypatch):
    """`deepwml segment` end to end on inputs whose place is read by a fallback the standard defines (NIfTI: a form
    whose code is 0 is not read, whatever it holds; NRRD: no 'space origin' is 0, 0, 0) or from a header valid but
    odd (a flipped NRRD axis, a DICOM orientation rounded to 4 decimals): the mask written lies on exactly the grid
    the scan is read on, over the lesion; a NIfTI mask keeps the scan's own placing fields, the unused one too."""
    from DeepWMLLib.cli import main

    oracle_network(monkeypatch)
    path, truth = _edge_input(kind, tmp_path)
    out = tmp_path / "out"
    assert main(["segment", str(path), "-o", str(out), "--model", str(tiny_model), "--device", "cpu"]) == 0
    (written,) = out.glob("*_wmh.*")
    scan, mask = io.read_image(path), io.read_mask(written)
    for a, b in ((mask.GetSize(), scan.GetSize()), (mask.GetOrigin(), scan.GetOrigin()),
                 (mask.GetSpacing(), scan.GetSpacing()), (mask.GetDirection(), scan.GetDirection())):
        assert np.allclose(a, b, rtol=0, atol=1e-6), (a, b)
    assert io.grid_difference(mask, scan) is None
    if kind != "nrrd-no-origin":  # (its origin is not the phantom's)
        assert np.allclose(scan.GetOrigin(), (12.5, -40.0, 7.0), atol=1e-3)
    assert dice(sitk.GetArrayFromImage(mask), sitk.GetArrayFromImage(truth)) > 0.7
    if kind.startswith("nifti"):
        import gzip

        header, given = gzip.decompress(written.read_bytes())[:348], path.read_bytes()[:348]
        assert header[252:328] == given[252:328]  # codes, quaternion, qoffset, srow: as the scan has them
