"""The SimpleITK-free NIfTI path of `deepwml segment`: the same voxels and geometry as SimpleITK,
files SimpleITK reads back exactly, a fall-back to SimpleITK for every file outside its subset, and
the same outputs as the SimpleITK path."""

from __future__ import annotations

import gzip
import json
import struct
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from DeepWMLLib import io
from DeepWMLLib.errors import DeepWMLError
from DeepWMLLib.segment import load_models, segment_image
from DeepWMLLib.volume import Volume, nifti_bytes, parse_nifti

from conftest import make_volume, nifti2_of, oracle_network, rotation, tiny_model_file


def _same_geometry(a, b, atol=0.0) -> bool:
    return (tuple(a.GetSize()) == tuple(b.GetSize())
            and np.allclose(a.GetSpacing(), b.GetSpacing(), rtol=0, atol=atol)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), rtol=0, atol=atol)
            and np.allclose(a.GetDirection(), b.GetDirection(), rtol=0, atol=atol))


def _nifti_bytes_of(path) -> bytes:
    with (gzip.open if str(path).endswith(".gz") else open)(path, "rb") as f:
        return f.read()


@pytest.mark.parametrize("pixel", [sitk.sitkUInt8, sitk.sitkInt16, sitk.sitkUInt16, sitk.sitkFloat32, sitk.sitkFloat64])
@pytest.mark.parametrize("ext", [".nii.gz", ".nii"])
def test_files_simpleitk_writes_read_the_same(tmp_path, pixel, ext):
    for n, direction in enumerate([None, rotation(0.3, -0.2, 0.4), rotation(0.1, 0.2, -0.3) @ np.diag([1, 1, -1]),
                                   np.eye(3)[:, [1, 2, 0]] * [1, -1, 1]]):
        image, _ = make_volume(size=(12, 10, 5), spacing=(0.6, 0.7, 4.5), direction=direction, dtype=pixel)
        path = tmp_path / f"v{n}{ext}"
        sitk.WriteImage(image, str(path))
        volume = parse_nifti(_nifti_bytes_of(path))
        reference = sitk.ReadImage(str(path))
        assert volume is not None
        assert _same_geometry(volume, reference)
        assert volume.array.dtype == sitk.GetArrayViewFromImage(reference).dtype
        assert np.array_equal(volume.array, sitk.GetArrayViewFromImage(reference))


def test_written_files_read_back_the_same_in_simpleitk(tmp_path):
    rng = np.random.default_rng(7)
    for n in range(40):
        q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
        if n % 2:
            q[:, 2] *= -1  # left-handed voxel axes: qfac -1
        array = rng.integers(0, 200, size=tuple(rng.integers(2, 9, size=3))).astype(
            [np.uint8, np.int16, np.float32, np.uint16, np.float64][n % 5])
        volume = Volume(array, rng.uniform(0.3, 8, 3), rng.uniform(-200, 200, 3), q.ravel())
        path = tmp_path / f"w{n}.nii.gz"
        path.write_bytes(nifti_bytes(volume))
        read = sitk.ReadImage(str(path))
        assert np.array_equal(sitk.GetArrayViewFromImage(read), array)
        assert sitk.GetArrayViewFromImage(read).dtype == array.dtype
        assert _same_geometry(read, volume, atol=2e-5)  # float32 header fields
        assert _same_geometry(parse_nifti(_nifti_bytes_of(path)), read)


def test_sform_wins_like_simpleitk_when_both_are_set(tmp_path):
    image = sitk.Image(6, 5, 4, sitk.sitkFloat32)
    image.SetOrigin((10.0, 20.0, 30.0))
    sitk.WriteImage(image, str(tmp_path / "a.nii"))
    data = bytearray((tmp_path / "a.nii").read_bytes())
    x = struct.unpack_from("<f", data, 292)[0]
    struct.pack_into("<f", data, 292, x + 5e-5)  # sform's x offset a hair away from the qform's
    (tmp_path / "b.nii").write_bytes(data)
    volume = parse_nifti(bytes(data))
    assert volume.GetOrigin() == sitk.ReadImage(str(tmp_path / "b.nii")).GetOrigin() != (10.0, 20.0, 30.0)


@pytest.mark.parametrize("sform_code", [2, 3, 4])
def test_an_aligned_sform_beside_a_qform_reads_like_simpleitk(tmp_path, sform_code):
    """Both set, the sform 'aligned' (2), Talairach (3) or MNI (4): ITK may take the qform, whose directions
    differ from the sform's by a few 1e-6 (float32 quaternion; 2e-6 here). The light reader took the sform, so
    the mask it wrote sat off the FLAIR's grid by more than SimpleITK's same-space tolerance (sitk.Mask refused
    the two)."""
    image, _ = make_volume(size=(12, 10, 5), spacing=(0.6, 0.7, 4.5), direction=rotation(0.05, -0.03, 0.02),
                           dtype=sitk.sitkInt16)
    sitk.WriteImage(image, str(tmp_path / "scanner.nii"))
    path = tmp_path / "aligned.nii"
    path.write_bytes(_edited((tmp_path / "scanner.nii").read_bytes(), "h", 254, sform_code))
    reference = sitk.ReadImage(str(path))
    light = io.read_image(path, light=True)
    assert _same_geometry(light, reference, atol=1e-9)
    mask = io.from_axial_stack((io.to_axial_stack(light)[0] > 300).astype(np.uint8), io.slice_frame(light))
    io.write_image(mask, tmp_path / "mask.nii.gz")
    sitk.Mask(reference, sitk.Cast(sitk.ReadImage(str(tmp_path / "mask.nii.gz")), sitk.sitkUInt8))  # same space


def _edited(data: bytes, fmt: str, offset: int, *values) -> bytes:
    out = bytearray(data)
    struct.pack_into("<" + fmt, out, offset, *values)
    return bytes(out)


def _sheared(data: bytes) -> bytes:
    """The file with its sform's j axis leant towards its i axis, each voxel size kept (a pure shear)."""
    rows = np.array(struct.unpack_from("<12f", data, 280), float).reshape(3, 4)
    i, j = rows[:, 0], rows[:, 1]
    leant = j / np.linalg.norm(j) + 0.3 * i / np.linalg.norm(i)
    rows[:, 1] = leant / np.linalg.norm(leant) * np.linalg.norm(j)
    return _edited(data, "12f", 280, *rows.ravel())


def _in_unit(data: bytes, code: int, mm: float) -> bytes:
    """The file with its lengths given in another unit (xyzt_units `code`, `mm` millimetres each): voxel sizes,
    qform offset and sform divided by `mm`."""
    pixdim = struct.unpack_from("<8f", data, 76)
    data = _edited(data, "3f", 80, *(v / mm for v in pixdim[1:4]))
    data = _edited(data, "3f", 268, *(v / mm for v in struct.unpack_from("<3f", data, 268)))
    data = _edited(data, "12f", 280, *(v / mm for v in struct.unpack_from("<12f", data, 280)))
    return _edited(data, "B", 123, (data[123] & 0xF8) | code)


def test_files_outside_the_subset_fall_back_to_simpleitk(tmp_path):
    image, _ = make_volume(size=(12, 10, 5), spacing=(0.6, 0.7, 4.5), direction=rotation(0.2, 0.1, 0.3),
                           dtype=sitk.sitkInt16)
    sitk.WriteImage(image, str(tmp_path / "ok.nii"))
    data = (tmp_path / "ok.nii").read_bytes()
    assert parse_nifti(data) is not None
    odd = {
        "scaled": _edited(data, "2f", 112, 2.0, 5.0),
        "intercept beside an unset slope": _edited(data, "2f", 112, 0.0, 100.0),  # SimpleITK adds the 100
        "qform and sform disagree": _edited(data, "f", 292, struct.unpack_from("<f", data, 292)[0] + 3.0),
        "sheared sform": _sheared(data),
        "two time points": _edited(data, "8h", 40, 4, 12, 10, 5, 2, 1, 1, 1),
        # lengths in metres / microns (xyzt_units): the same head 1000 times smaller / larger in numbers
        "in metres": _in_unit(data, 1, 1000.0),
        "in microns": _in_unit(data, 3, 0.001),
    }
    for name, bad in odd.items():
        assert parse_nifti(bad) is None, name
        path = tmp_path / f"{name.replace(' ', '_')}.nii"
        path.write_bytes(bad)
        if name == "two time points":
            continue  # not a volume DeepWML takes; read_image refuses it either way
        if name == "sheared sform":  # SimpleITK would place it by its qform, FSL by the sform: refused both ways
            for light in (True, False):
                with pytest.raises(DeepWMLError, match="sform places the voxels on a sheared grid"):
                    io.read_image(path, light=light)
            continue
        light = io.read_image(path, light=True)
        assert isinstance(light, sitk.Image), name  # SimpleITK's rules decide
        heavy = io.read_image(path)
        assert io.grid_difference(light, heavy) is None
        assert np.array_equal(sitk.GetArrayViewFromImage(light), sitk.GetArrayViewFromImage(heavy)), name


def test_light_reading_refuses_bad_files_like_the_simpleitk_path(tmp_path):
    from test_io import bad_inputs

    for name, path, words in bad_inputs(tmp_path):
        if name == "empty folder":
            path = tmp_path / "emptydir"
            path.mkdir(exist_ok=True)
        for light in (False, True):
            with pytest.raises(DeepWMLError) as info:
                io.read_image(path, light=light)
            assert words in str(info.value) and "\n" not in str(info.value), f"{name} (light={light}): {info.value}"


@pytest.mark.parametrize("pixel", [sitk.sitkInt16, sitk.sitkFloat32])
def test_nifti_2_reads_as_the_nifti_1_file_it_was_made_from(tmp_path, pixel):
    """SimpleITK cannot open NIfTI-2 (ITK 5.4): it is read by parse_nifti, light or not, to the same voxels
    and grid as the NIfTI-1 file with the same header fields."""
    for n, direction in enumerate([rotation(0.3, -0.2, 0.4), rotation(0.1, 0.2, -0.3) @ np.diag([1, 1, -1])]):
        image, _ = make_volume(size=(12, 10, 5), spacing=(0.6, 0.7, 4.5), direction=direction, dtype=pixel)
        sitk.WriteImage(image, str(tmp_path / f"one{n}.nii"))
        reference = sitk.ReadImage(str(tmp_path / f"one{n}.nii"))
        path = tmp_path / f"two{n}.nii.gz"
        path.write_bytes(gzip.compress(nifti2_of((tmp_path / f"one{n}.nii").read_bytes())))
        for light in (True, False):
            read = io.read_any(path, light=light)
            assert isinstance(read, Volume if light else sitk.Image)
            assert _same_geometry(read, reference)
            assert np.array_equal(io.voxels(read), sitk.GetArrayViewFromImage(reference))
    scaled = bytearray(nifti2_of((tmp_path / "one0.nii").read_bytes()))
    struct.pack_into("<2d", scaled, 176, 2.0, 5.0)  # outside the subset read here: said so, not "cannot be read"
    (tmp_path / "scaled.nii").write_bytes(scaled)
    with pytest.raises(DeepWMLError, match="NIfTI-2 file .* save it as NIfTI-1"):
        io.read_image(tmp_path / "scaled.nii", light=True)


def test_nifti_compression_is_read_from_the_content_not_the_name(tmp_path):
    """A compressed file named .nii and a plain one named .nii.gz (renamed by hand or by an export): both
    read like the file correctly named, light or not; SimpleITK itself cannot open the first."""
    image, _ = make_volume(size=(12, 10, 5), spacing=(0.6, 0.7, 4.5), direction=rotation(0.2, 0.1, 0.3),
                           dtype=sitk.sitkInt16)
    sitk.WriteImage(image, str(tmp_path / "right.nii"))
    plain = (tmp_path / "right.nii").read_bytes()
    reference = sitk.ReadImage(str(tmp_path / "right.nii"))
    (tmp_path / "packed.nii").write_bytes(gzip.compress(plain))
    (tmp_path / "plain.nii.gz").write_bytes(plain)
    scaled = bytearray(plain)
    struct.pack_into("<2f", scaled, 112, 2.0, 0.0)  # outside parse_nifti's subset: SimpleITK's to read
    (tmp_path / "scaled_packed.nii").write_bytes(gzip.compress(bytes(scaled)))
    for name in ("packed.nii", "plain.nii.gz"):
        for light in (True, False):
            read = io.read_any(tmp_path / name, light=light)
            assert _same_geometry(read, reference), (name, light)
            assert np.array_equal(io.voxels(read), sitk.GetArrayViewFromImage(reference)), (name, light)
    with pytest.raises(DeepWMLError, match="gzip-compressed but named .nii.*rename it to .nii.gz"):
        io.read_image(tmp_path / "scaled_packed.nii")


@pytest.mark.parametrize("axis,size", [(3, 0.0), (1, -0.9), (2, float("nan"))])
def test_a_voxel_size_of_zero_or_below_is_refused(tmp_path, axis, size):
    """SimpleITK reads pixdim 0 as 1 mm (a 4.5 mm slice counted as 1 mm: the volume 4.5 times too small) and a
    negative one as a flipped axis (other software reads it unflipped); both readers refuse them."""
    image, _ = make_volume(size=(12, 10, 5), spacing=(0.6, 0.7, 4.5), dtype=sitk.sitkInt16)
    sitk.WriteImage(image, str(tmp_path / "ok.nii"))
    path = tmp_path / "bad.nii"
    path.write_bytes(_edited((tmp_path / "ok.nii").read_bytes(), "f", 76 + 4 * axis, size))
    for light in (True, False):
        with pytest.raises(DeepWMLError, match=f"voxel size of {size:g} mm along axis {axis}"):
            io.read_image(path, light=light)


@pytest.mark.parametrize("qform_code", [0, 1])
def test_an_sform_whose_voxel_sizes_differ_from_pixdim_is_refused(tmp_path, qform_code):
    """pixdim says 4.5 mm slices, the sform 5.4 mm: SimpleITK read 4.5 (the volume 17% below what FSL
    measures, and the mask off the FLAIR in FSL); refused, light or not. Float32 rounding is accepted."""
    image, _ = make_volume(size=(12, 10, 5), spacing=(0.6, 0.7, 4.5), direction=rotation(0.2, 0.1, 0.3),
                           dtype=sitk.sitkInt16)
    sitk.WriteImage(image, str(tmp_path / "ok.nii"))
    data = _edited((tmp_path / "ok.nii").read_bytes(), "h", 252, qform_code)
    rows = np.array(struct.unpack_from("<12f", data, 280), float).reshape(3, 4)
    for name, scale in (("rounded", 1 + 1e-6), ("thicker", 1.2)):
        scaled = rows.copy()
        scaled[:, 2] *= scale
        (tmp_path / f"{name}.nii").write_bytes(_edited(data, "12f", 280, *scaled.ravel()))
    for light in (True, False):
        assert io.read_image(tmp_path / "rounded.nii", light=light).GetSpacing() == pytest.approx((0.6, 0.7, 4.5))
        with pytest.raises(DeepWMLError, match=r"two voxel sizes, 0.6 x 0.7 x 4.5 mm \(pixdim\) and 0.6 x 0.7 x 5.4 mm"):
            io.read_image(tmp_path / "thicker.nii", light=light)


def test_axial_stack_of_a_volume_is_a_copy_and_comes_back_as_a_volume():
    image, _ = make_volume(size=(12, 10, 5), direction=rotation(0.1, 0.2, 0.3), dtype=sitk.sitkFloat32)
    volume = Volume(sitk.GetArrayFromImage(image), image.GetSpacing(), image.GetOrigin(), image.GetDirection())
    stack, frame = io.to_axial_stack(volume)
    before, untouched = volume.array.copy(), stack.copy()
    stack += 1
    assert np.array_equal(volume.array, before)
    back = io.from_axial_stack(untouched, frame)
    assert isinstance(back, Volume) and _same_geometry(back, image)
    assert np.array_equal(back.array, before)
    assert isinstance(io.from_axial_stack(*io.to_axial_stack(image)), sitk.Image)


def test_segmenting_a_volume_gives_what_the_simpleitk_image_gives(tmp_path, monkeypatch):
    oracle_network(monkeypatch)
    image, _ = make_volume(size=(40, 36, 8), spacing=(0.9, 0.8, 5.0), direction=rotation(0.1, -0.2, 0.15))
    path = tmp_path / "case.nii.gz"
    sitk.WriteImage(image, str(path))
    models = load_models([tiny_model_file(tmp_path / "m.pt", grid=(64, 64))])
    light, heavy = io.read_image(path, light=True), io.read_image(path)
    assert isinstance(light, Volume) and isinstance(heavy, sitk.Image)
    a, b = segment_image(light, models, "cpu"), segment_image(heavy, models, "cpu")
    assert isinstance(a.mask, Volume) and isinstance(b.mask, sitk.Image)
    assert b.report["volume_ml"] > 0
    assert np.array_equal(a.mask.array, sitk.GetArrayViewFromImage(b.mask))
    assert np.array_equal(a.probabilities.array, sitk.GetArrayViewFromImage(b.probabilities))
    for report in (a.report, b.report):
        report.pop("seconds")
    assert a.report == b.report
    io.write_image(a.mask, tmp_path / "a.nii.gz")
    io.write_image(b.mask, tmp_path / "b.nii.gz")
    io.write_segmentation(a.mask, tmp_path / "a.seg.nrrd")
    io.write_segmentation(b.mask, tmp_path / "b.seg.nrrd")
    assert (tmp_path / "a.seg.nrrd").read_bytes() == (tmp_path / "b.seg.nrrd").read_bytes()
    written = sitk.ReadImage(str(tmp_path / "a.nii.gz"))
    assert written.GetPixelID() == sitk.sitkUInt8 and _same_geometry(written, image, atol=1e-6)
    assert np.array_equal(sitk.GetArrayViewFromImage(written), a.mask.array)


@pytest.mark.parametrize("as_folder", [False, True])
def test_segment_command_on_nifti_imports_neither_simpleitk_nor_scipy(tmp_path, as_folder):
    """A NIfTI file, or a folder of them (not probed for DICOM series)."""
    image, _ = make_volume(size=(40, 36, 6))
    sitk.WriteImage(image, str(tmp_path / "case.nii.gz"))
    (tmp_path / "notes.txt").write_text("a folder of cases may hold notes")
    model = tiny_model_file(tmp_path / "m.pt", grid=(64, 64))
    given = tmp_path if as_folder else tmp_path / "case.nii.gz"
    code = ("import sys; from DeepWMLLib.cli import main; "
            f"rc = main(['segment', {str(given)!r}, '-o', {str(tmp_path / 'out')!r}, "
            f"'--model', {str(model)!r}, '--device', 'cpu']); "
            "print(rc, sorted(m for m in ('SimpleITK', 'scipy', 'torch') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, encoding="utf-8", timeout=300)
    assert result.returncode == 0, result.stderr
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("0 ") and "SimpleITK" not in last and "scipy" not in last, result.stdout
    report = json.loads((tmp_path / "out" / "case_report.json").read_text(encoding="utf-8"))
    assert report["lesion_count"] >= 0 and (tmp_path / "out" / "case_wmh.nii.gz").is_file()


def test_real_files_read_the_same_as_simpleitk(shared_data):
    paths = sorted((shared_data / "open_ms" / "clinical_flair").glob("*.nii.gz"))
    paths += sorted((shared_data / "open_ms" / "labelled").glob("*/*.nii.gz"))
    assert paths
    for path in paths:
        volume = parse_nifti(_nifti_bytes_of(path))
        reference = sitk.ReadImage(str(path))
        assert volume is not None, path.name
        assert _same_geometry(volume, reference), path.name
        assert np.array_equal(volume.array, sitk.GetArrayViewFromImage(reference)), path.name


def test_nifti_2_in_template_space_reads(tmp_path):
    """A NIfTI-2 file with qform and sform both set to a template's codes (FSL's MNI outputs: 4 and 4) was
    left to SimpleITK, which cannot read NIfTI-2 at all: refused as if it used features DeepWML lacks."""
    image, _ = make_volume(size=(12, 10, 5), spacing=(0.6, 0.7, 4.5), direction=rotation(0.3, -0.2, 0.4),
                           dtype=sitk.sitkInt16)
    sitk.WriteImage(image, str(tmp_path / "one.nii"))
    one = bytearray((tmp_path / "one.nii").read_bytes())
    struct.pack_into("<2h", one, 252, 4, 4)  # qform_code, sform_code: MNI152
    (tmp_path / "one.nii").write_bytes(one)
    reference = sitk.ReadImage(str(tmp_path / "one.nii"))
    (tmp_path / "two.nii").write_bytes(nifti2_of(bytes(one)))
    for light in (True, False):
        read = io.read_any(tmp_path / "two.nii", light=light)
        assert _same_geometry(read, reference)
        assert np.array_equal(io.voxels(read), sitk.GetArrayViewFromImage(reference))
