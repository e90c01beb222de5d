"""The check that a scan looks like a FLAIR (DeepWMLLib/contrast.py): on phantoms with known tissue
contrast, its distance map against scipy's, and on a real T1-weighted template through segment_image.
(Every real clinical FLAIR is called a FLAIR: Testing/test_real_clinical.py.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from DeepWMLLib import contrast

from conftest import mni_t1_thick

SPACING = (5.0, 2.0, 2.0)  # slice, row, col (mm)


def _head(cortex: float, ventricle: float, radius_mm=(70.0, 85.0, 70.0), lesion_core: bool = False):
    """An ellipsoidal intracranial space: white matter 1, a cortical layer (outer 8 mm) and
    ventricles (a central ellipsoid) at the given levels relative to it, plus mild noise."""
    shape = (32, 110, 90)
    z, y, x = np.ogrid[:shape[0], :shape[1], :shape[2]]
    centre = [(n - 1) / 2 for n in shape]
    r = np.sqrt(((z - centre[0]) * SPACING[0] / radius_mm[0]) ** 2 + ((y - centre[1]) * SPACING[1] / radius_mm[1]) ** 2
                + ((x - centre[2]) * SPACING[2] / radius_mm[2]) ** 2)
    inside = r < 1
    depth = ndimage.distance_transform_edt(np.pad(inside, ((1, 1), (0, 0), (0, 0))), sampling=SPACING)[1:-1]
    stack = np.zeros(shape, np.float32)
    stack[inside] = 1.0
    stack[inside & (depth < 8)] = cortex
    ventricles = (((z - centre[0]) * SPACING[0] / 25) ** 2 + ((y - centre[1]) * SPACING[1] / 35) ** 2
                  + ((x - centre[2]) * SPACING[2] / 12) ** 2) < 1
    stack[ventricles] = ventricle
    stack += np.random.default_rng(0).normal(0, 0.03, shape).astype(np.float32) * inside
    lesion = np.zeros(shape, bool)
    if lesion_core:  # the model marked most of the deep brain (as on T2, where it marks CSF)
        lesion = inside & (depth >= 15)
    return stack * 300, inside, lesion


@pytest.mark.parametrize("cortex,ventricle,expected", [
    (1.25, 0.3, "FLAIR"),
    (1.1, 0.45, "FLAIR"),  # low grey/white contrast, poorly nulled CSF: still a FLAIR
    (0.7, 0.3, "T1-weighted"),
    (1.2, 3.0, "T2- or PD-weighted"),
    (1.15, 1.2, "T2- or PD-weighted"),  # PD: CSF a little brighter than white matter
])
def test_phantom_contrasts(cortex, ventricle, expected):
    stack, inside, lesion = _head(cortex, ventricle)
    check = contrast.flair_contrast(stack, inside, lesion, SPACING)
    assert check["looks_like"] == expected, check
    assert check["deep_ml"] > contrast.MIN_DEEP_ML
    warnings = contrast.contrast_warnings(check)
    if expected == "FLAIR":
        assert warnings == []
    else:
        assert len(warnings) == 1 and "does not look like a FLAIR" in warnings[0]
        assert expected.split("-")[0] in warnings[0]


@pytest.mark.parametrize("cortex,ventricle,expected", [(1.25, 0.3, "FLAIR"), (1.2, 3.0, "T2- or PD-weighted"),
                                                       (0.7, 0.3, "T1-weighted")])
def test_an_intensity_offset_does_not_change_the_verdict(cortex, ventricle, expected):
    """A scan stored with an offset (+1000: black is 1000, not 0): the dark ventricles of a FLAIR were
    measured against half of 1000 + the white matter's level, found bright, and the FLAIR called T2-weighted."""
    stack, inside, lesion = _head(cortex, ventricle)
    plain = contrast.flair_contrast(stack, inside, lesion, SPACING)
    shifted = contrast.flair_contrast(stack - stack.min() + 1000, inside, lesion, SPACING)
    assert plain["looks_like"] == shifted["looks_like"] == expected, shifted
    assert shifted["dark_fraction"] == pytest.approx(plain["dark_fraction"], abs=0.002)


@pytest.mark.parametrize("cortex,ventricle,expected", [(1.25, 0.3, "FLAIR"), (1.2, 3.0, "T2- or PD-weighted"),
                                                       (1.15, 1.2, "T2- or PD-weighted"), (0.7, 0.3, "T1-weighted")])
@pytest.mark.parametrize("stored", ["z-scored", "minus 1000", "scaled by 0.01"])
def test_a_z_score_or_a_negative_offset_does_not_change_the_verdict(cortex, ventricle, expected, stored):
    """A scan whose black lies below 0 (z-scored, as research pipelines save FLAIRs, or stored with a
    negative offset): levels were measured from 0, not from its black, so a z-scored FLAIR got other
    figures and one 1000 below the scanner's was not judged at all. Now the same verdict and figures."""
    stack, inside, lesion = _head(cortex, ventricle)
    plain = contrast.flair_contrast(stack, inside, lesion, SPACING)
    changed = {"z-scored": (stack - stack.mean()) / stack.std(), "minus 1000": stack - 1000,
               "scaled by 0.01": stack * 0.01}[stored]
    check = contrast.flair_contrast(changed, inside, lesion, SPACING)
    assert plain["looks_like"] == check["looks_like"] == expected, check
    assert check["dark_fraction"] == pytest.approx(plain["dark_fraction"], abs=1e-4)
    assert check["cortex_brighter_fraction"] == pytest.approx(plain["cortex_brighter_fraction"], abs=1e-3)


def test_a_few_voxels_or_padding_below_black_do_not_move_it():
    """Interpolation's undershoot (a few voxels at -20, as on the labelled scans) and a band of reslice
    padding (-32768, or -1024 as some tools write) leave the black at the air's level."""
    stack, inside, lesion = _head(1.25, 0.3)
    plain = contrast.flair_contrast(stack, inside, lesion, SPACING)
    undershoot = stack.copy()
    undershoot.reshape(-1)[::2000] = -20.0
    assert contrast.image_black(undershoot) == 0.0
    padded = []
    for value in (-32768.0, -3000.0, -1024.0):  # far below, or below a rest with its own black (the air at 0)
        padded.append(stack.copy())
        padded[-1][:, :4, :] = value
        assert contrast.image_black(padded[-1]) == pytest.approx(0.0, abs=1.0)
    for changed in [undershoot] + padded:
        check = contrast.flair_contrast(changed, inside, lesion, SPACING)
        assert check["looks_like"] == "FLAIR" and check["dark_fraction"] == pytest.approx(plain["dark_fraction"], abs=0.002)


@pytest.mark.parametrize("white_matter", [1200.0, 3000.0])
def test_padding_at_minus_1024_under_a_scanner_range_of_thousands_does_not_move_the_black(white_matter):
    """A FLAIR stored as the scanner does (white matter at 1200, cortex 1500; or a 12-bit range up to 3750) with
    a band of reslice padding at -1024: the padding lies less than the rest's range below it, and was taken as
    the image's black; its levels were then measured from -1024, the ventricles no longer counted dark, and a
    real FLAIR (patient03_study1 x 3 gave the same) was called 'T2- or PD-weighted'."""
    stack, inside, lesion = _head(1.25, 0.3)
    stack *= white_matter / 300
    plain = contrast.flair_contrast(stack, inside, lesion, SPACING)
    padded = stack.copy()
    padded[:, :4, :] = -1024.0
    assert contrast.image_black(padded) == pytest.approx(0.0, abs=white_matter / 300)
    check = contrast.flair_contrast(padded, inside, lesion, SPACING)
    assert plain["looks_like"] == "FLAIR" and check["looks_like"] == "FLAIR", check
    assert check["dark_fraction"] == pytest.approx(plain["dark_fraction"], abs=0.002)


@pytest.mark.parametrize("cortex,ventricle", [(1.25, 0.3), (1.2, 3.0), (0.7, 0.3)])
def test_a_background_filled_with_another_level_is_not_judged(cortex, ventricle):
    """z-scored inside the brain with 0 (the brain's mean) written outside: the image has no black to
    measure from, so no verdict (and a warning that says why), rather than one measured from the wrong level."""
    stack, inside, lesion = _head(cortex, ventricle)
    brain = stack[inside]
    masked = np.where(inside, (stack - brain.mean()) / brain.std(), 0).astype(np.float32)
    check = contrast.flair_contrast(masked, inside, lesion, SPACING)
    assert check["looks_like"] is None and "no black background" in check["not_judged"], check
    (warning,) = contrast.contrast_warnings(check)
    assert "could not be checked" in warning and "z-scored inside the brain" in warning


def test_the_sample_z_scored_or_minus_1000_is_judged_and_segmented_as_the_sample(tmp_path):
    """The bundled sample, z-scored and 1000 below: the same check figures and the same mask."""
    import SimpleITK as sitk

    from DeepWMLLib import io
    from DeepWMLLib.segment import segment_image

    image = io.read_image(Path(__file__).resolve().parents[1] / "Resources" / "Sample" / "sample_flair.nii.gz")
    voxels = sitk.GetArrayFromImage(image).astype(np.float32)
    results = []
    for changed in (voxels, (voxels - voxels.mean()) / voxels.std(), voxels - 1000):
        other = sitk.GetImageFromArray(changed)
        other.CopyInformation(image)
        result = segment_image(other, device="cpu")
        results.append((result.report["contrast"], sitk.GetArrayFromImage(result.mask)))
    (plain, mask), *others = results
    assert plain["looks_like"] == "FLAIR"
    for check, other_mask in others:
        assert check["looks_like"] == "FLAIR" and check["dark_fraction"] == pytest.approx(plain["dark_fraction"], abs=1e-3)
        assert check["cortex_brighter_fraction"] == pytest.approx(plain["cortex_brighter_fraction"], abs=1e-3)
        assert np.count_nonzero(other_mask != mask) <= 0.001 * np.count_nonzero(mask)


def test_a_real_t1_template_z_scored_is_still_called_t1_weighted():
    """The MNI152 T1 at 5 mm, z-scored (its black now below 0): still warned about as T1-weighted."""
    import SimpleITK as sitk

    from DeepWMLLib.segment import segment_image

    thick = mni_t1_thick(5, smooth=True)
    voxels = sitk.GetArrayFromImage(thick)
    z = sitk.GetImageFromArray(((voxels - voxels.mean()) / voxels.std()).astype(np.float32))
    z.CopyInformation(thick)
    report = segment_image(z, device="cpu").report
    assert report["contrast"]["looks_like"] == "T1-weighted", report["contrast"]


def test_the_check_imports_no_numpy_ma():
    """numpy.ma's import is 10-20 ms of every `deepwml segment` run; np.median, for the deep brain's level, did it."""
    code = ("import sys, numpy as np; from DeepWMLLib import contrast; "
            "z, y, x = np.ogrid[:32, :110, :90]; "
            "inside = ((z - 15.5) / 14) ** 2 + ((y - 54.5) / 42) ** 2 + ((x - 44.5) / 35) ** 2 < 1; "
            "core = ((z - 15.5) / 5) ** 2 + ((y - 54.5) / 17) ** 2 + ((x - 44.5) / 6) ** 2 < 1; "
            "stack = np.where(inside, np.where(core, 90.0, 300.0), 0.0) + np.random.default_rng(0).normal(0, 9, inside.shape); "
            f"check = contrast.flair_contrast(stack.astype(np.float32), inside, np.zeros_like(inside), {SPACING}); "
            "print(check['looks_like'], 'numpy.ma' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["FLAIR", "False"], result.stdout


def test_t2_with_the_deep_brain_marked_as_lesion():
    """On T2 the model marks CSF and much of the deep brain: the white matter's level then comes from
    all of the deep brain, and the bright ventricles still give the scan away."""
    stack, inside, lesion = _head(1.2, 3.0, lesion_core=True)
    assert contrast.flair_contrast(stack, inside, lesion, SPACING)["looks_like"] == "T2- or PD-weighted"


def test_not_judged_without_enough_deep_brain():
    """A small head (or a failed brain mask, or a few slices) has no deep brain to judge by."""
    stack, inside, lesion = _head(0.7, 0.3, radius_mm=(30.0, 35.0, 30.0))
    check = contrast.flair_contrast(stack, inside, lesion, SPACING)
    assert check["looks_like"] is None and check["dark_fraction"] is None and "under 50 ml" in check["not_judged"]
    (warning,) = contrast.contrast_warnings(check)  # said, not silent: silence would read as "a FLAIR"
    assert "could not be checked" in warning and f"only {check['deep_ml']:.0f} ml" in warning
    check["not_judged"] = "no black background to measure levels from"
    check["deep_ml"] = 400.0
    assert "no black background" in contrast.contrast_warnings(check)[0]


def test_holes_in_the_brain_mask_are_filled():
    """A brain mask that left the ventricles out (as the network may on a scan that is not a FLAIR)
    is measured from the skull inwards all the same."""
    stack, inside, lesion = _head(1.25, 0.3)
    holed = inside & (stack > 0.5 * 300)
    assert (contrast.flair_contrast(stack, holed, lesion, SPACING)["deep_ml"]
            == contrast.flair_contrast(stack, inside, lesion, SPACING)["deep_ml"])


@pytest.mark.parametrize("spacing", [(3.3, 0.9, 1.1), (1.0, 1.0, 1.0), (6.0, 0.45, 0.45)])
def test_depth_is_the_exact_euclidean_distance_below_its_limit(spacing):
    """numpy alone (segment must not import scipy), the same as scipy's exact transform wherever it is
    under the limit, and at least the limit elsewhere."""
    rng = np.random.default_rng(3)
    mask = ndimage.gaussian_filter(rng.random((14, 60, 50)), 3) > 0.5
    mask[:, 20:40, 15:35] = True
    expected = ndimage.distance_transform_edt(np.pad(mask, ((1, 1), (0, 0), (0, 0))), sampling=spacing)[1:-1]
    depth = contrast._depth_mm(mask, spacing, 12.0)
    below = expected < 12.0
    np.testing.assert_allclose(depth[below], expected[below], atol=1e-3)
    assert (depth[~below] >= 12.0 - 1e-3).all()


def test_holes_are_filled_as_scipy_fills_them_slice_by_slice():
    rng = np.random.default_rng(5)
    mask = ndimage.gaussian_filter(rng.random((6, 70, 64)), 2) > 0.48
    expected = np.stack([ndimage.binary_fill_holes(plane) for plane in mask])
    assert np.array_equal(contrast._fill_holes_in_plane(mask), expected)
    assert (expected & ~mask).any()  # there were holes to fill


def test_a_real_t1_template_is_called_t1_weighted():
    """nilearn's MNI152 T1 (a real T1-weighted average, brain-extracted) re-sliced to 5 mm axial slices,
    through segment_image with the shipped models: warned about."""
    from DeepWMLLib.segment import segment_image

    thick = mni_t1_thick(5, smooth=True)
    report = segment_image(thick, device="cpu").report
    assert report["contrast"]["looks_like"] == "T1-weighted", report["contrast"]
    assert any("does not look like a FLAIR" in w and "T1-weighted" in w for w in report["warnings"])
    from DeepWMLLib.segment import picture_title

    assert picture_title("t1", report).endswith("- not a FLAIR? looks T1-weighted")  # a batch's pictures show it


@pytest.mark.parametrize("shape, spacing", [((5, 101, 77), (3.0, 0.45, 0.7)), ((4, 90, 91), (5.0, 0.9, 0.62))])
@pytest.mark.parametrize("kept", [(slice(None), slice(None)), (slice(25, 70), slice(9, 50)), (slice(0, 60), slice(30, None))],
                         ids=["whole slice", "inside the slice", "against its edges"])
def test_region_bands_take_a_block_as_inside_when_half_of_it_is(shape, spacing, kept):
    """The coarse blocks (summed one offset at a time) are those whose mean is at least one half, on
    grids that do not divide into whole blocks; each band of depth is spread back over each block's voxels. The
    same bands where the depth is measured in the mask's box (a head inside the slice, or against its edges)."""
    rng = np.random.default_rng(11)
    mask = np.zeros(shape, bool)
    mask[(slice(None), *kept)] = (ndimage.gaussian_filter(rng.random(shape), (0, 4, 4)) > 0.49)[(slice(None), *kept)]
    n, rows, cols = shape
    fr, fc = (max(1, int(contrast.COARSE_MM / s + 1e-6)) for s in spacing[1:])
    r, c = rows // fr * fr, cols // fc * fc
    blocks = mask[:, :r, :c].reshape(n, r // fr, fr, c // fc, fc).mean(axis=(2, 4)) >= 0.5
    depth = contrast._depth_mm(contrast._fill_holes_in_plane(blocks), (spacing[0], spacing[1] * fr, spacing[2] * fc),
                               contrast.DEEP_MM + 1)
    expected = np.zeros(shape, np.float32)
    expected[:, :r, :c] = np.repeat(np.repeat(depth, fr, axis=1), fc, axis=2)
    assert expected.max() > 0
    bands = ((contrast.DEEP_MM, np.inf), contrast.SHELL_MM, (0.5, 2.5))
    found, block = contrast._region_bands(mask, spacing, bands)
    assert block == (fr, fc)
    for (low, high), band in zip(bands, found):
        result = np.stack(list(contrast._band_planes(band, block, shape[1:])))
        assert result.dtype == bool and np.array_equal(result, (expected >= low) & (expected <= high)), (low, high)
    assert found[2].any()


def test_a_bright_line_through_every_slice_is_found_on_a_real_flair_and_none_on_the_real_ones(shared_data):
    """The bright-line check's margin: no line on the 11 clinical FLAIRs and the sample (their excess is 0 or below,
    LINE_EXCESS_MAX 0.05); a stripe of a twentieth of the scan's top on 3 columns of every slice (0.80 to 1.01 ml on
    patient01_study1), or a tenth on 2 rows, is found where it was put."""
    import SimpleITK as sitk

    from DeepWMLLib import io

    scans = sorted((shared_data / "open_ms" / "clinical_flair").glob("*.nii.gz"))
    assert len(scans) == 11
    for path in [*scans, Path(__file__).resolve().parents[1] / "Resources" / "Sample" / "sample_flair.nii.gz"]:
        image = io.read_image(path)
        assert contrast.bright_line(io.axial_view(image)) is None, path.name
    image = io.read_image(scans[0])
    voxels = sitk.GetArrayFromImage(image)
    for where, along, amplitude in ((np.s_[:, :, 150:153], "column", 0.05), (np.s_[:, 100:102, :], "row", 0.1)):
        striped_voxels = voxels.copy()
        striped_voxels[where] += amplitude * voxels.max()
        striped = sitk.GetImageFromArray(striped_voxels)
        striped.CopyInformation(image)
        line = contrast.bright_line(io.axial_view(striped))
        assert line is not None and line["along"] == along and line["excess"] > 1.5 * contrast.LINE_EXCESS_MAX
        assert "straight bright line" in contrast.bright_line_warning(line, io.slice_frame(striped))


def test_a_bright_line_is_measured_in_an_integer_image_without_wrap_around():
    """A uint16 head (as synth and scanners give, through segment_image's API unconverted): no line, where the
    differences of unsigned voxels wrapped around to 65535 and called lines everywhere; a stripe is found."""
    rng = np.random.default_rng(0)
    z, y, x = np.mgrid[:12, :96, :96]
    head = ((y - 48) / 40.0) ** 2 + ((x - 48) / 34.0) ** 2 < 1
    stack = (np.where(head, 400, 3) + rng.integers(0, 40, head.shape) * head).astype(np.uint16)
    assert contrast.bright_line(stack) is None
    stack[:, :, 30] += 100
    assert contrast.bright_line(stack) == {"along": "column", "index": 30, "excess": pytest.approx(0.2, abs=0.03)}


@pytest.mark.parametrize("direction", [(1, 0, 0, 0, 1, 0, 0, 0, 1), (-1, 0, 0, 0, -1, 0, 0, 0, 1)])  # as DICOM, as RAS
@pytest.mark.parametrize("where,named", [(np.s_[:, :, 30], "i = 30"), (np.s_[:, 70, :], "j = 70")])
def test_a_bright_line_is_named_by_the_scan_s_own_voxel_index(direction, where, named):
    """The warning names the line's place as Slicer's Data Probe numbers the scan's voxels (IJK): the axial stack's
    column and row run against the file's where its x and y do (a NIfTI file stored as RAS), and the warning said
    'column 65' for a stripe at i = 30, the other side of the head."""
    import SimpleITK as sitk

    from DeepWMLLib import io

    rng = np.random.default_rng(0)
    z, y, x = np.mgrid[:12, :96, :96]
    head = ((y - 48) / 40.0) ** 2 + ((x - 48) / 34.0) ** 2 < 1
    voxels = (np.where(head, 400, 3) + rng.integers(0, 40, head.shape) * head).astype(np.float32)
    voxels[where] += 100
    image = sitk.GetImageFromArray(voxels)
    image.SetDirection(direction)
    frame = io.slice_frame(image)
    line = contrast.bright_line(io.axial_view(image, frame))
    assert line is not None and f"voxel index {named} " in contrast.bright_line_warning(line, frame)


def _ct(padding: float | None = None):
    """The phantom head as a CT in Hounsfield units: white matter 28, cortex 38, ventricles 8, a skull of 1000
    (6 mm outside the intracranial space), air -1000 around it (or reslice `padding` beyond the skull)."""
    stack, inside, lesion = _head(38 / 28, 8 / 28)
    stack = stack / 300 * 28
    outside = ndimage.distance_transform_edt(~inside, sampling=SPACING)
    stack[~inside] = -1000.0
    stack[(outside > 0) & (outside <= 6)] = 1000.0
    if padding is not None:
        stack[:, :, :20] = np.where(outside[:, :, :20] > 6, padding, stack[:, :, :20])
    return stack, inside, lesion


@pytest.mark.parametrize("padding", [None, -3024.0], ids=["air", "air and padding outside the field of view"])
def test_a_ct_in_hounsfield_units_is_said_to_be_a_ct_not_a_t2_weighted_mri(padding):
    """A head CT (air -1000, brain 8-38, skull 1000): its ventricles are not dark against the air's black, and it was
    warned as 'T2- or PD-weighted', sending the user to look for a FLAIR among MRI series that are not there."""
    stack, inside, lesion = _ct(padding)
    check = contrast.flair_contrast(stack, inside, lesion, SPACING)
    assert check["looks_like"] == "CT", check
    warnings = contrast.contrast_warnings(check)
    assert len(warnings) == 1 and "looks like a CT, not an MRI" in warnings[0] and "T2" not in warnings[0]
    assert "Hounsfield" in warnings[0]


def test_a_flair_of_low_levels_with_reslice_padding_of_minus_1024_is_no_ct():
    """A FLAIR whose white matter lies at 80 (as patient20_study2's, the lowest of the clinical scans), with a reslice's
    padding of -1024 around the head: air-like values outside and a brain within a CT's range, but nothing outside
    ten times as bright as the white matter (a CT's skull): still a FLAIR."""
    stack, inside, lesion = _head(1.25, 0.3)
    stack = stack / 300 * 80
    stack[:, :, :15] = np.where(inside[:, :, :15], stack[:, :, :15], -1024.0)
    check = contrast.flair_contrast(stack, inside, lesion, SPACING)
    assert check["looks_like"] == "FLAIR", check


@pytest.mark.parametrize("dtype", [np.uint16, np.float32])
def test_a_ct_stored_without_its_rescale_is_said_to_be_a_ct(dtype):
    """A CT's raw stored values (no RescaleIntercept applied: HU + 1024, air near 24, a uint16 NIfTI of such a series):
    its ventricles (1032) are not dark against the black, and it was warned as 'T2- or PD-weighted'."""
    stack, inside, lesion = _ct()
    raw = np.clip(stack + 1024, 0, None).astype(dtype)
    check = contrast.flair_contrast(raw, inside, lesion, SPACING)
    assert check["looks_like"] == "CT" and check["stored"] == "raw, 0 HU at 1024", check
    assert 20 <= check["deep_median"] <= 35  # in HU
    warnings = contrast.contrast_warnings(check)
    assert len(warnings) == 1 and "looks like a CT, not an MRI" in warnings[0] and "without its rescale" in warnings[0]


@pytest.mark.parametrize("top,dtype", [(255, np.uint8), (4095, np.uint16)])
def test_a_brain_windowed_ct_is_said_to_be_a_ct_not_a_flair(top, dtype):
    """A CT in a brain window (0-80 HU scaled to 0-255 or 0-4095): dark CSF and a cortex brighter than the white
    matter, a FLAIR's contrast, and it passed as a FLAIR with no warning; its skull is clipped to the top value."""
    stack, inside, lesion = _ct()
    windowed = np.rint(np.clip(stack / 80, 0, 1) * top).astype(dtype)
    check = contrast.flair_contrast(windowed, inside, lesion, SPACING)
    assert check["looks_like"] == "CT" and check["stored"] == "brain window", check
    warnings = contrast.contrast_warnings(check)
    assert len(warnings) == 1 and "looks like a CT, not an MRI" in warnings[0] and "clipped" in warnings[0]


@pytest.mark.parametrize("cortex,ventricle", [(1.25, 0.3), (0.7, 0.3)], ids=["FLAIR", "T1-weighted"])
@pytest.mark.parametrize("inverted", ["negated", "subtracted from its top"])
def test_an_inverted_flair_is_said_to_be_inverted_not_a_ct(inverted, cortex, ventricle):
    """A FLAIR with its values negated (or subtracted from its top): its air, at the image's top value around the
    head, was taken for a brain-windowed CT's clipped skull and the warning said 'looks like a CT', sending the user to
    look for an MRI among CT series. It is an MRI with its contrast inverted, and the warning says so (a T1-weighted
    scan inverted, its CSF bright and its cortex brighter than the white matter, too)."""
    stack, inside, lesion = _head(cortex, ventricle)
    stack = -stack if inverted == "negated" else stack.max() - stack
    check = contrast.flair_contrast(stack, inside, lesion, SPACING)
    assert check["looks_like"] == "inverted" and check["bright_outside_fraction"] > 0.9, check
    warnings = contrast.contrast_warnings(check)
    assert len(warnings) == 1 and "CT" not in warnings[0] and "contrast is inverted" in warnings[0], warnings
    assert "does not look like a FLAIR" in warnings[0]


@pytest.mark.parametrize("fill", [2.0, 3.0])
def test_a_flair_with_its_background_filled_bright_is_not_only_said_to_be_inverted(fill):
    """A FLAIR whose air an exporter filled with a bright value (its top, or a mid value) has as much bright outside
    the brain as an inverted one, and the check calls it 'inverted' (each real FLAIR so filled: 0.51-0.92 bright);
    the warning said only that its contrast was inverted, its values negated, which it is not (before the verdict it
    was 'not judged: no black background'). The warning names the filled background too."""
    stack, inside, lesion = _head(1.25, 0.3)
    stack[~inside] = fill * 300  # the white matter at 300: the background at twice it
    check = contrast.flair_contrast(stack, inside, lesion, SPACING)
    assert check["looks_like"] == "inverted", check
    warnings = contrast.contrast_warnings(check)
    assert len(warnings) == 1 and "background was filled with a bright value" in warnings[0], warnings


def test_the_sample_negated_is_said_to_be_inverted_not_a_ct(tmp_path):
    """The bundled sample FLAIR negated, through segment_image (its brain mask made by the network on the inverted
    scan, as a user's run makes it): called a CT in a brain window before, an inverted MRI now, with one warning."""
    import SimpleITK as sitk

    from DeepWMLLib import io
    from DeepWMLLib.segment import segment_image

    image = io.read_image(Path(__file__).resolve().parents[1] / "Resources" / "Sample" / "sample_flair.nii.gz")
    negated = sitk.GetImageFromArray(-sitk.GetArrayFromImage(image).astype(np.float32))
    negated.CopyInformation(image)
    report = segment_image(negated, device="cpu").report
    assert report["contrast"]["looks_like"] == "inverted", report["contrast"]
    said = [w for w in report["warnings"] if "FLAIR" in w and "brain mask covers" not in w]
    assert len(said) == 1 and "contrast is inverted" in said[0] and "CT" not in said[0], report["warnings"]


def test_a_flair_near_1024_with_bright_scalp_fat_is_no_raw_ct():
    """A FLAIR whose white matter lies at 1040 (a CT's brain stored raw) with air at 0 and scalp fat at 1.5 times the
    white matter (above a raw CT's bone level, 1524) around it: its ventricles are dark, so it stays a FLAIR; and a
    single brightest voxel outside the brain is no clipped skull."""
    stack, inside, lesion = _head(1.25, 0.3)
    stack = stack / 300 * 1040
    outside = ndimage.distance_transform_edt(~inside, sampling=SPACING)
    stack[(outside > 6) & (outside <= 12)] = 1.5 * 1040
    stack[0, 0, 0] = 4000.0
    check = contrast.flair_contrast(stack.astype(np.uint16), inside, lesion, SPACING)
    assert check["looks_like"] == "FLAIR", check


def test_an_adc_map_is_warned_as_not_a_flair_and_named():
    """An ADC map (10^-6 mm2/s: white matter 750, cortex 850, CSF 3000, 0 outside the head as scanners store it): its
    CSF is bright, so it is no FLAIR, and the warning names the ADC map beside T2 and PD."""
    stack, inside, lesion = _head(850 / 750, 3000 / 750)
    check = contrast.flair_contrast(stack / 300 * 750, inside, lesion, SPACING)
    assert check["looks_like"] == "T2- or PD-weighted", check
    warnings = contrast.contrast_warnings(check)
    assert len(warnings) == 1 and "ADC map" in warnings[0]


def _windowed(voxels: np.ndarray, percentile: float) -> np.ndarray:
    """`voxels` exported in a display window: cut at `percentile` of its upper voxels and scaled to 8 bits."""
    top = np.percentile(voxels[voxels > np.percentile(voxels, 60)], percentile)
    return (np.clip(voxels / top, 0, 1) * 255).round().astype(np.uint8)


def test_a_scan_clipped_by_a_display_window_is_found_and_the_real_flairs_are_not(shared_data):
    """The clipping check's margin: 1-2 voxels at the top value on the 11 clinical FLAIRs, the 3 labelled ones and the
    sample (under 0.0003 % of the head; CLIPPED_SHARE_MIN 0.1 %); patient19_study2 exported to 8 bits at its head's
    99.7th percentile puts 0.65 % of the head at 255 (its lesion volume 20.88 -> 22.24 ml), at the 97th 6.4 %."""
    import SimpleITK as sitk

    from DeepWMLLib import io
    from DeepWMLLib.preprocessing import plan_volume

    scans = sorted((shared_data / "open_ms" / "clinical_flair").glob("*.nii.gz"))
    labelled = sorted((shared_data / "open_ms" / "labelled").glob("*/flair.nii.gz"))
    assert len(scans) == 11 and len(labelled) == 3
    heads = {}
    for path in [*scans, *labelled, Path(__file__).resolve().parents[1] / "Resources" / "Sample" / "sample_flair.nii.gz"]:
        image = io.read_image(path)
        frame = io.slice_frame(image)
        stack = io.axial_view(image, frame)
        heads[path.name] = plan_volume(stack, frame, set()).head_voxels
        assert contrast.clipped_top(stack, heads[path.name]) is None, path
    image = io.read_image(scans[9])
    assert scans[9].name == "patient19_study2.nii.gz"
    voxels = sitk.GetArrayFromImage(image).astype(np.float32)
    head = plan_volume(io.axial_view(image), io.slice_frame(image), set()).head_voxels
    for percentile, share in ((99.7, 0.0065), (97, 0.064)):
        clipped = contrast.clipped_top(_windowed(voxels, percentile), head)
        assert clipped is not None and clipped["top"] == 255 and clipped["share"] == pytest.approx(share, rel=0.05)
        assert f"{clipped['share']:.2%} of the head's voxels hold the image's top value, 255" in \
            contrast.clipped_warning(clipped) and "looks clipped" in contrast.clipped_warning(clipped)


def test_clipping_is_counted_by_the_top_value_s_share_of_the_head():
    """By hand: a 10 x 20 x 20 volume, a tenth of it air (0-4), the rest tissue (80-120) but 150 voxels at its top value
    200, a head of 4000 voxels: 150 / 4000 = 3.75 % -> found (>= 0.1 % and >= 100 voxels); 99 voxels at the top: too
    few to say; a head of 200 000: 0.075 %, under the share; a volume of one value (no top above its black): nothing to
    say. Within 0.2 % of the range from the top counts as the top (a clipped scan resampled after the cut), 0.3 % not."""
    rng = np.random.default_rng(0)
    stack = rng.uniform(80, 120, (10, 20, 20)).astype(np.float32)
    stack[:, :2, :] = rng.uniform(0, 4, (10, 2, 20))  # the air
    stack.reshape(-1)[-150:] = 200
    black = contrast.image_black(stack)
    assert 0 <= black < 1
    assert contrast.clipped_top(stack, 4000) == {"share": 0.0375, "voxels": 150, "top": 200.0}
    assert contrast.clipped_top(stack, 200_000) is None
    few = stack.copy()
    few.reshape(-1)[-150:-99] = 100
    assert contrast.clipped_top(few, 4000) is None
    near = stack.copy()
    near.reshape(-1)[-150:-1] = 200 - 0.0019 * (200 - black)  # within 0.2 % of the range under the top: counted
    assert contrast.image_black(near) == black and contrast.clipped_top(near, 4000)["voxels"] == 150
    near.reshape(-1)[-150:-1] = 200 - 0.003 * (200 - black)
    assert contrast.image_black(near) == black and contrast.clipped_top(near, 4000) is None
    assert contrast.clipped_top(np.full((4, 8, 8), 7.0, np.float32), 100) is None
