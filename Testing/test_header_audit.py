"""Mutation audit (mut45b, finishing mut44's audit 5): what a scan's own header says against its being a FLAIR, each
rule pinned on an input that only it decides. Every expected value here is worked out by hand from the rule's
statement (the docstrings and comments of `DeepWMLLib.io`), not copied from the code's output."""

from __future__ import annotations

import json
import math
import struct
import sys
from pathlib import Path

import pytest
import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).parent))

from DeepWMLLib import io  # noqa: E402


def _series(description: str = "", **kwargs) -> io.DicomSeries:
    return io.DicomSeries("1.2", description, ("a.dcm",), **kwargs)


def test_image_type_and_sequence_name_are_read_whatever_their_case_and_padding():
    # Image Type values are compared stripped and in upper case: a padded or lower-case ADC is one all the same
    assert io.not_flair_evidence("", image_type=("DERIVED", "PRIMARY", "adc ")) == [
        "its Image Type names ADC (a diffusion image)"]
    # Siemens' TRACEW alone (the trace-weighted image of a diffusion series) is a diffusion image
    assert io.not_flair_evidence("", image_type=("DERIVED", "PRIMARY", "TRACEW")) == [
        "its Image Type names TRACEW (a diffusion image)"]
    # a diffusion sequence name in upper case: the same sequence
    assert io.not_flair_evidence("", sequence_name="*EP_B700T") == [
        "its sequence name *EP_B700T is a diffusion sequence's (b = 700)"]
    # an infinite b-value is no diffusion weighting (not finite: as if not given), as NaN is
    assert io.not_flair_evidence("", b_values=(math.inf,)) == []


@pytest.mark.parametrize("description", ["STIR cor", "3D DIR", "Ax DWI", "t2_swi_tra", "t1_tirm_tra",
                                         "double_inversion_sag", "TRACEW"])
def test_a_not_flair_word_rules_out_a_series_with_a_flairs_timing(description):
    """`looks_like_flair`: a description naming another kind rules the series out even where its inversion and
    repetition times are a FLAIR's (TI 2000 ms, TR 9000 ms, both inside the FLAIR's range)."""
    assert _series(description, inversion_ms=2000.0, repetition_ms=9000.0).looks_like_flair is False
    assert _series("AX FLAIR", inversion_ms=2000.0, repetition_ms=9000.0).looks_like_flair is True  # the control


@pytest.mark.parametrize("description, flair", [
    ("AX FLAIR T15", True),  # T1 followed by a digit is no T1 (a number: 'T15'), the name says FLAIR
    ("FLAIR_diffuse_lesions", True),  # 'diff' followed by letters is no diffusion abbreviation
    ("t2_spc_da-fl_sag_p2_iso", True),  # Siemens' 3D FLAIR (da-fl), no timing given
    ("tirm_tra", True),  # Siemens' turbo inversion recovery magnitude: their 2D FLAIR
])
def test_a_flair_is_known_by_its_description_alone(description, flair):
    assert _series(description).looks_like_flair is flair


def test_each_kind_a_description_names_is_said():
    assert io.not_flair_evidence("double_inversion") == [
        "its description 'double_inversion' names double inversion recovery"]
    assert io.not_flair_evidence("ep2d_diff") == ["its description 'ep2d_diff' names a diffusion image"]
    assert io.not_flair_evidence("ADC") == ["its description 'ADC' names a diffusion image"]
    assert io.not_flair_evidence("AX PD") == ["its description 'AX PD' names a T2- or PD-weighted scan"]
    # words that only begin like a kind's name say nothing: 'diffuse', PDFF (proton density fat fraction)
    assert io.not_flair_evidence("FLAIR diffuse") == []
    assert io.not_flair_evidence("PDFF") == []
    # a T2 name beside a FLAIR's own words (no timing to tell): a FLAIR
    assert io.not_flair_evidence("t2_spc_da-fl_sag") == []
    assert io.not_flair_evidence("t2_tirm_tra") == []
    assert io.not_flair_evidence("T2 fluid attenuated") == []


def _nifti(folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    sitk.WriteImage(sitk.Image(4, 4, 2, sitk.sitkInt16), str(path))
    return path


def test_a_sidecar_and_bval_file_by_hand(tmp_path):
    path = _nifti(tmp_path, "scan.nii.gz")
    sidecar, bval = tmp_path / "scan.json", tmp_path / "scan.bval"
    # one repetition time per echo (a list): the first, 2 s = 2000 ms, under a FLAIR's 4000 ms
    sidecar.write_text(json.dumps({"InversionTime": 2.5, "RepetitionTime": [2.0, 2.0]}))
    assert io.image_file_evidence(path) == (
        ["its repetition time is 2000 ms (a FLAIR's is 4000 ms or more)"], ["scan.json"])
    # NaN and Infinity (which Python's json reads) are no times
    sidecar.write_text('{"InversionTime": NaN, "RepetitionTime": Infinity}')
    assert io.image_file_evidence(path) == ([], [])
    # a sidecar over 4 MB is no converter's: not read
    sidecar.write_text(json.dumps({"SeriesDescription": "t1_mprage", "Padding": "x" * 4_000_000}))
    assert io.image_file_evidence(path) == ([], [])
    sidecar.unlink()
    # b-values of 50 and under are no diffusion weighting; an infinite one is not read
    bval.write_text("0 50 50\n")
    assert io.image_file_evidence(path) == ([], [])
    bval.write_text("0 inf\n")
    assert io.image_file_evidence(path) == ([], [])


def test_a_series_own_reading_of_its_header():
    assert _series(frame_type=("ORIGINAL", "PRIMARY", "DIFFUSION")).diffusion  # an enhanced file's Frame Type
    assert not _series(inversion_ms=2500.0).unlabelled  # an inversion time says something
    assert not _series(secondary_capture=True).unlabelled  # a picture of images is no unlabelled scan


def test_private_b_values_by_hand():
    ge = 0x00430010
    # GE's bias alone (1000000000 + 0) is b = 0: a multi-b series' b = 0 image
    assert io.vendor_b_value({ge: "GEMS_PARM_01", 0x00431039: "1000000000\\8\\0\\0"}, "EP") == 0
    # the scanning sequence compared in upper case ('ep' is EP)
    assert io.vendor_b_value({ge: "GEMS_PARM_01", 0x00431039: "1000\\8\\0\\0"}, "ep\\se") == 1000
    # values read by hand (bytes) that are no finite numbers say nothing
    assert io.vendor_b_value({0x00190010: b"SIEMENS MR HEADER", 0x0019100C: b"inf "}) is None
    assert io.vendor_b_value({0x20010010: b"Philips Imaging DD 001", 0x20011003: struct.pack("<f", math.inf)}) is None


def test_an_nrrd_header_that_cannot_be_read_is_not_said_to_state_no_orientation(tmp_path):
    path = tmp_path / "scan.nrrd"
    path.write_bytes(b"")  # no fields at all: SimpleITK's reader says what is wrong, not this warning
    assert io.unstated_orientation(path) is None


def _nifti1(dims=(3, 2, 2, 2), pixdim=(1.0, 1.0, 1.0, 1.0), units=2, qform_code=1, sform_code=1,
            quaternion=(0.0, 0.0, 0.0, 0.0, 0.0, 0.0), srow=(1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0), extra=b"") -> bytes:
    """A NIfTI-1 file of int16 voxels (all 0) built byte by byte: a 348-byte header, 4 bytes of no extension, the
    voxels (2 bytes each) and `extra` bytes after them."""
    header = bytearray(348)
    struct.pack_into("<i", header, 0, 348)
    struct.pack_into("<8h", header, 40, *dims, *[1] * (8 - len(dims)))
    struct.pack_into("<2h", header, 70, 4, 16)  # datatype int16, 16 bits
    struct.pack_into("<8f", header, 76, *pixdim, *[0.0] * (8 - len(pixdim)))
    struct.pack_into("<f", header, 108, 352.0)
    header[123] = units
    struct.pack_into("<2h", header, 252, qform_code, sform_code)
    struct.pack_into("<6f", header, 256, *quaternion)
    struct.pack_into("<12f", header, 280, *srow)
    header[344:348] = b"n+1\0"
    return bytes(header) + bytes(4) + bytes(2 * math.prod(dims[1:dims[0] + 1])) + extra


def _nifti_refusal(data: bytes) -> str | None:
    try:
        io._check_nifti(Path("scan.nii"), data)
    except io.DeepWMLError as exc:
        return str(exc)
    return None


def test_nifti_header_checks_by_hand():
    assert _nifti_refusal(_nifti1()) is None  # the control: 2 x 2 x 2 voxels of 1 mm, qform and sform identity
    assert "gives no orientation" in _nifti_refusal(_nifti1(qform_code=0, sform_code=0))
    # a NaN in the sform's second row (srow_y[1]): where the voxels lie is unknown
    assert "(sform) holds values that are not numbers" in _nifti_refusal(
        _nifti1(qform_code=0, srow=(1, 0, 0, 0, 0, math.nan, 0, 0, 0, 0, 1, 0)))
    # the qform's handedness (pixdim[0]) NaN matters only where the qform is used
    assert _nifti_refusal(_nifti1(pixdim=(math.nan, 1.0, 1.0, 1.0), qform_code=0)) is None
    assert "handedness" in _nifti_refusal(_nifti1(pixdim=(math.nan, 1.0, 1.0, 1.0), sform_code=0))
    # quatern_b 1.00001: its square 1.00002, within the 1e-4 float rounding allowed; 1.001 (1.002) is not
    assert _nifti_refusal(_nifti1(quaternion=(1.00001, 0.0, 0.0, 0.0, 0.0, 0.0), sform_code=0,
                                  pixdim=(1.0, 1.0, 1.0, 1.0))) is None
    assert "no unit quaternion" in _nifti_refusal(_nifti1(quaternion=(1.001, 0.0, 0.0, 0.0, 0.0, 0.0)))
    # the sform's offset (its fourth column) 200 m from the centre; its rotation part is 1 (no offset)
    assert "(srow_x[3], srow_y[3], srow_z[3]: the sform's)" in _nifti_refusal(
        _nifti1(qform_code=0, srow=(1, 0, 0, 2e5, 0, 1, 0, 0, 0, 0, 1, 0)))
    # a slice size of 0 along the third axis (pixdim[3])
    assert "along axis 3 (pixdim[3])" in _nifti_refusal(_nifti1(pixdim=(1.0, 1.0, 1.0, 0.0)))
    # lengths in metres: 0.2 m is 200 mm, beyond the 100 mm no MRI voxel reaches; 0.001 m (1 mm) is read
    metres = dict(units=1, sform_code=0)
    assert "look like mm with the wrong unit" in _nifti_refusal(_nifti1(pixdim=(1.0, 0.2, 0.2, 0.2), **metres))
    assert "look like mm with the wrong unit" in _nifti_refusal(_nifti1(pixdim=(1.0, 900.0, 900.0, 900.0), **metres))
    assert _nifti_refusal(_nifti1(pixdim=(1.0, 0.001, 0.001, 0.001), **metres)) is None
    # 4 bytes more than the 2 x 2 x 2 x 2 bytes of voxels: refused (the image library would read the first ones)
    assert "its voxel data take 20 bytes, but its header's sizes and type need 16" in _nifti_refusal(
        _nifti1(extra=bytes(4)))


LPS = "left-posterior-superior"


@pytest.mark.parametrize("fields, fault", [
    # 'none' for one of three axes whose kinds are domain, domain and ??? (NRRD's unknown kind): no volume in space
    ({"space": LPS, "space directions": "(1,0,0) (0,1,0) none", "kinds": "domain domain ???"},
     "'space directions: (1,0,0) (0,1,0) none', 'none' for one of the three axes of a volume in space (where its "
     "slices lie)"),
    # kinds that do not give one for each of the three axes: left to the NRRD library
    ({"space": LPS, "space directions": "(1,0,0) (0,1,0) none", "kinds": "domain domain"}, None),
    # a spacing of 0 (no space): no voxel size
    ({"spacings": "1 0 1"}, "'spacings: 1 0 1', a voxel size of 0 along axis 1"),
    # NRRD's 'nan' spacing (not known) beside 'space' is allowed; directions without a space are not this check's
    ({"space": LPS, "space directions": "(1,0,0) (0,1,0) (0,0,1)", "spacings": "nan nan nan"}, None),
    ({"space directions": "(1,0,0) (0,1,0) (0,0,1)"}, None),
])
def test_nrrd_geometry_faults_by_hand(fields, fault):
    assert io._nrrd_geometry_fault(Path("scan.nrrd"), fields) == fault


@pytest.mark.parametrize("fields, fault", [
    # a third axis of length 0 (its column (0, 0, 0))
    ({"transformmatrix": "1 0 0 0 1 0 0 0 0"},
     "TransformMatrix = 1 0 0 0 1 0 0 0 0, axes of length 0 or in one line (no orientation: its axes' directions)"),
    # the second axis (1, 1e-8, 0) 1e-8 rad off the first: in one line (determinant 1e-8, under 1e-6)
    ({"transformmatrix": "1 1 0 0 1e-8 0 0 0 1"},
     "TransformMatrix = 1 1 0 0 1e-8 0 0 0 1, axes of length 0 or in one line (no orientation: its axes' directions)"),
    ({"offset": "0 0 0 0"}, "Offset = 0 0 0 0, not 3 numbers"),  # four numbers for three axes
    ({"elementspacing": "1 1 inf"}, "ElementSpacing = 1 1 inf, not voxel sizes (numbers above 0)"),
])
def test_metaimage_header_faults_by_hand(fields, fault):
    assert io._metaimage_header_fault(Path("scan.mha"), {"ndims": "3", "dimsize": "2 2 2", **fields}) == fault


def test_orientations_by_hand(monkeypatch):
    identity = sitk.Image(2, 2, 2, sitk.sitkInt16)
    # rows (1, 1e-4, 0) and columns (0, 1, 0): 1e-4 off the identity GDCM read, within the 2e-3 allowed
    assert io._orientation_misread(np.array([1, 1e-4, 0, 0, 1, 0], float), identity) is None
    assert io._orientation_misread(np.array([0, 1, 0, 1, 0, 0], float), identity) == "(1, 0, 0), (0, 1, 0)"

    class Reader:  # two images' headers: the second's orientation five numbers
        texts = ("1\\0\\0\\0\\1\\0", "1\\0\\0\\0\\1")

        def HasMetaDataKey(self, k, tag):
            return tag == "0020|0037"

        def GetMetaData(self, k, tag):
            return self.texts[k]

    with pytest.raises(io.DeepWMLError, match=r"of image 2 of the DICOM series is not six numbers \('1\\\\0\\\\0"):
        io._check_orientation_given("scan", Reader(), identity, 2)
    # an enhanced file's frames: an orientation or a Pixel Spacing not finite (named as repr() shows
    # text: each backslash doubled)
    cosines, place = np.array([1, 0, 0, 0, 1, 0], float), np.zeros(3)
    for geometry, fault in (
            (([place], [np.array([math.nan, 0, 0, 0, 1, 0])], np.ones(2)),
             "frame 1's Image Orientation (Patient) as 'nan\\\\0\\\\0\\\\0\\\\1\\\\0', not six numbers"),
            (([place], [cosines], np.array([math.nan, 1.0])), "a Pixel Spacing of 'nan\\\\1', not two sizes above 0"),
            (([place], [cosines], np.array([math.inf, 1.0])), "a Pixel Spacing of 'inf\\\\1', not two sizes above 0"),
            (([place], [cosines], np.ones(2)), None)):
        monkeypatch.setattr(io, "frame_geometry", lambda file, geometry=geometry: geometry)
        assert io._frame_geometry_fault("mr.dcm") == fault


def _layout(tmp_path: Path, data: bytes, length: int, rows: int, columns: int, samples: int = 1, bits: int = 16,
            order: str = "<") -> io._PixelLayout:
    """A single-frame image's Pixel Data: `data` (the value, from byte 0 of a file), `length` the element's length."""
    path = tmp_path / "pixels.raw"
    path.write_bytes(data)
    return io._PixelLayout(str(path), rows, columns, samples, samples, 1, bits, False, length, order, 0, 0, False)


def test_pixel_data_lengths_by_hand(tmp_path):
    # 8 rows x 2 columns of 16 bits: 32 bytes; a row 4 bytes, a column 16. 6 bytes past it, more than a row (a too
    # small Rows could leave them), not one value repeated: not padding
    said = "gives 8 rows x 2 columns of 16 bits (32 bytes), but its Pixel Data holds 38 bytes"
    assert io._pixel_verdict(_layout(tmp_path, bytes(32) + bytes(range(1, 7)), 38, 8, 2)) == (
        said + ", and the 6 bytes past the image are not padding (one value repeated)", 0, None)
    # the file ends where the image does: the 6 bytes its length gives past it are not there, so not padding
    assert io._pixel_verdict(_layout(tmp_path, bytes(32), 38, 8, 2)) == (
        said + ", and the 6 bytes past the image are not padding (one value repeated)", 0, None)
    # 16 blank bytes past it: padding, which also fits one more column (16 bytes): read as 8 x 3 too, all 0
    assert io._pixel_verdict(_layout(tmp_path, bytes(48), 48, 8, 2)) == (None, 16, (0.0, 0.0, 3))
    # 2 x 2 pixels of 16 bits (8 bytes) and 8 bytes more: a whole frame past it (a too small Frames leaves that)
    assert io._pixel_verdict(_layout(tmp_path, bytes(16), 16, 2, 2)) == (
        "gives 2 rows x 2 columns of 16 bits (8 bytes), but its Pixel Data holds 16 bytes", 0, None)
    # colour (3 samples of 8 bits, 4 x 4: 48 bytes) and one row (12 bytes) more: a too small Samples or Rows
    assert io._pixel_verdict(_layout(tmp_path, bytes(60), 60, 4, 4, samples=3, bits=8)) == (
        "gives 4 rows x 4 columns x 3 samples of 8 bits (48 bytes), but its Pixel Data holds 60 bytes", 0, None)
    # big endian 2 x 2 pixels 1, 1 / 2, 2 and 4 bytes of padding (0): rows 1 apart; read as 2 x 3 (1, 1, 2 / 2, 0,
    # 0) the steps down its columns are 1, 1 and 2, a mean of 4/3
    data = struct.pack(">4H", 1, 1, 2, 2) + bytes(4)
    assert io._pixel_verdict(_layout(tmp_path, data, 12, 2, 2, order=">")) == (None, 4, (1.0, 4 / 3, 3))


def test_b_values_of_a_file_by_hand(tmp_path):
    class Reader:  # a classic file's header as SimpleITK gives it: a standard b-value 0 beside Siemens' 1000
        values = {"0018|9087": "0", "0019|0010": "SIEMENS MR HEADER", "0019|100c": "1000"}

        def GetMetaDataKeys(self):
            return list(self.values)

        def HasMetaDataKey(self, key):
            return key in self.values

        def GetMetaData(self, key):
            return self.values[key]

    assert io._reader_b_value(Reader()) == 1000  # the largest of the two
    # Philips' b-factor is one float (4 bytes): 8 bytes are not its value
    assert io._private_number(struct.pack("<2f", 700.0, 0.0), "FL") is None
    # an enhanced file whose first frame's b-value is NaN (a damaged value) and the others' 1000: b = 1000
    from conftest import write_enhanced_mr

    path = write_enhanced_mr(tmp_path / "mr.dcm", sitk.Image(4, 4, 3, sitk.sitkInt16), description="",
                             b_values=[math.nan, 1000.0, 1000.0])
    assert io._enhanced_header(str(path))[4] == 1000


def test_a_nifti2_qform_by_hand():
    from conftest import nifti2_of

    assert _nifti_refusal(nifti2_of(_nifti1())) is None
    # quatern_d 1.001 (its square 1.002): no unit quaternion, read from NIfTI-2's bytes 352-399 (doubles)
    assert "quatern_b, c, d = 0, 0, 1.001, no unit quaternion" in _nifti_refusal(
        nifti2_of(_nifti1(quaternion=(0.0, 0.0, 1.001, 0.0, 0.0, 0.0), sform_code=0)))


def _dicom_file(path: Path, body_elements, syntax: str = "1.2.840.10008.1.2.1", deflate: bool = False) -> Path:
    """A DICOM file written by hand: preamble, DICM, a file meta group (its length first) naming `syntax`, then the
    explicit VR little endian data set of `body_elements` ((tag, VR, value) each), raw deflated with `deflate`."""
    import zlib

    from conftest import _data_set, _element

    meta = _data_set([(0x00020001, "OB", b"\0\1"), (0x00020010, "UI", syntax)], True)
    body = _data_set(body_elements, True)
    if deflate:
        packer = zlib.compressobj(9, zlib.DEFLATED, -15)
        body = packer.compress(body) + packer.flush()
    path.write_bytes(b"\0" * 128 + b"DICM" + _element(0x00020000, "UL", struct.pack("<I", len(meta)), True) + meta
                     + body)
    return path


def test_pixel_layouts_of_files_written_by_hand(tmp_path):
    us = lambda value: struct.pack("<H", value)  # noqa: E731
    image = [(0x00280010, "US", us(4)), (0x00280011, "US", us(4)), (0x00280100, "US", us(8))]
    # 8-bit pixels in OB (a long VR: 2 reserved bytes, then a 4-byte length): 4 x 4 pixels, 16 bytes
    layout = io._pixel_layout(str(_dicom_file(tmp_path / "ob.dcm", image + [(0x7FE00010, "OB", bytes(range(16)))])))
    assert (layout.rows, layout.columns, layout.bits, layout.length) == (4, 4, 8, 16)
    assert layout.read(0, 16) == bytes(range(16))
    # Number of Frames (IS text) 2: 32 bytes of pixels
    layout = io._pixel_layout(str(_dicom_file(tmp_path / "frames.dcm", image + [
        (0x00280008, "IS", "2"), (0x7FE00010, "OB", bytes(32))])))
    assert (layout.frames, layout.expected) == (2, 32)
    # deflated: the Pixel Data's bytes read from the inflated data set
    layout = io._pixel_layout(str(_dicom_file(tmp_path / "deflated.dcm", image + [(0x7FE00010, "OB", bytes(range(16)))],
                                              "1.2.840.10008.1.2.1.99", deflate=True)))
    assert layout.deflated and layout.read(2, 3) == bytes([2, 3, 4])
    # no Bits Allocated: what the Pixel Data should hold is unknown, so no layout (left to the DICOM library)
    assert io._pixel_layout(str(_dicom_file(tmp_path / "bits.dcm", image[:2] + [(0x7FE00010, "OB", bytes(16))]))) is None


def test_a_dicom_series_is_judged_by_its_own_header_not_a_sidecar(tmp_path):
    """`scan_header_warnings`: a DICOM series' header says what it is; a JSON sidecar beside its file (a converter's,
    of another scan) is not read for it."""
    from DeepWMLLib import segment

    path = tmp_path / "scan.dcm"
    path.write_bytes(b"")
    (tmp_path / "scan.json").write_text(json.dumps({"SeriesDescription": "t1_mprage"}))
    assert segment.scan_header_warnings(path, io.DicomSeries("1.2", "AX FLAIR", (str(path),))) == []
    assert "names a T1-weighted scan" in segment.scan_header_warnings(path)[0]  # the control: the file alone


def test_an_enhanced_files_top_level_b_value_is_kept(tmp_path):
    """An enhanced MR file's b-value at its top level (as some converters leave it) beside functional groups that give
    none: the series' b-value is that one."""
    from conftest import write_enhanced_mr

    path = write_enhanced_mr(tmp_path / "mr" / "mr.dcm", sitk.Image(4, 4, 3, sitk.sitkInt16), description="")
    data = path.read_bytes()
    at = data.index(struct.pack("<HH2s", 0x0020, 0x000D, b"UI"))  # (0018,9087) goes before (0020,000D): tag order
    path.write_bytes(data[:at] + struct.pack("<HH2sHd", 0x0018, 0x9087, b"FD", 8, 1000.0) + data[at:])
    (series,) = io.dicom_series(path.parent)
    assert series.b_value == 1000 and series.diffusion
