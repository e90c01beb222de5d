"""Mutation audit (mut45) of the DICOM SEG reader (io.read_dicom_seg, its functional groups) and writer
(DeepWMLLib/dicom_seg.py): hand-worked cases for what the other SEG tests left unchecked. The SEGs read here are
built element by element with pydicom (a test dependency), not by DeepWML's writer, and their expected masks,
grids and bytes are worked out by hand in the comments.

Mutants left alive as equivalent: the encoder's `len(data) > 0xFFFF` as `>=` (values are padded to an even length,
0xFFFF is odd); cielab's `<= 0.04045` as `<` (no integer channel gives c / 255 == 0.04045); source_frames' one-file
branch for one slice (both give frame 1 of a multi-frame file, None else); the Common Instance Reference's
`setdefault` as assignment (an instance has one SOP Class); the functional groups' first item as their last (the
Shared Functional Groups and each functional group macro hold exactly one item, PS3.3 C.7.6.16). Left: a file whose
"DICM" at byte 128 is damaged is not parsed for its frames' geometry (None, unchecked, as GDCM reads it); parsed
anyway it reads the same groups, so neither reading is pinned."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import SimpleITK as sitk

from DeepWMLLib import dicom_seg, io
from DeepWMLLib.errors import DeepWMLError

from conftest import write_dicom_series

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.sequence import Sequence  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian  # noqa: E402

PATIENT = {"0010|0010": "Doe^Jane", "0010|0020": "PAT-0042", "0020|0052": "1.2.3.77", "0008|0020": "20260110"}


def _item(**keywords) -> Dataset:
    item = Dataset()
    for keyword, value in keywords.items():
        setattr(item, keyword, value)
    return item


def seg_file(path, pixel_data: bytes, positions, *, rows=3, columns=3, kind="BINARY", bits=None,
             segments=(("WMH", 1),), numbers=None, spacing=("0.5", "0.8"), between="2", thickness=None,
             orientation=("1", "0", "0", "0", "1", "0"), frame_orientations=None, frame_measures=None,
             shared_segment=None, frames_count=None, maximum=None, syntax=ExplicitVRLittleEndian, drop=(),
             shared_position=None):
    """A minimal SEG: `positions` one Image Position (Patient) per frame, `numbers` each frame's Referenced Segment
    Number (None: no Segment Identification in its frame), `segments` (label, number) pairs; shared Pixel Measures
    (Pixel Spacing `spacing`, row then column; Spacing Between Slices `between`, Slice Thickness `thickness`, None:
    left out) and Plane Orientation (`orientation`, or each frame's own: `frame_orientations`); `drop`: top-level
    keywords left out."""
    ds = Dataset()
    ds.SOPClassUID = io.SEGMENTATION_STORAGE
    ds.SOPInstanceUID = "1.2.3.4.5.6.7"
    ds.Modality = "SEG"
    ds.NumberOfFrames = str(len(positions) if frames_count is None else frames_count)
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated = (1 if kind == "BINARY" else 8) if bits is None else bits
    ds.SegmentationType = kind
    if maximum is not None:
        ds.MaximumFractionalValue = maximum
    ds.SegmentSequence = Sequence([_item(SegmentNumber=n, SegmentLabel=label) for label, n in segments])
    measures = _item(PixelSpacing=list(spacing))
    if between is not None:
        measures.SpacingBetweenSlices = between
    if thickness is not None:
        measures.SliceThickness = thickness
    shared = Dataset()
    if frame_measures is None:
        shared.PixelMeasuresSequence = Sequence([measures])
    if frame_orientations is None:
        shared.PlaneOrientationSequence = Sequence([_item(ImageOrientationPatient=list(orientation))])
    if shared_position is not None:  # every frame's Plane Position in the shared groups, none of their own
        shared.PlanePositionSequence = Sequence([_item(ImagePositionPatient=[f"{v:g}" for v in shared_position])])
    if shared_segment is not None:
        shared.SegmentIdentificationSequence = Sequence([_item(ReferencedSegmentNumber=shared_segment)])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    numbers = [1] * len(positions) if numbers is None else numbers
    frames = []
    for k, position in enumerate(positions):
        frame = Dataset()
        if shared_position is None:
            frame.PlanePositionSequence = Sequence([_item(ImagePositionPatient=[f"{v:g}" for v in position])])
        if frame_orientations is not None:
            frame.PlaneOrientationSequence = Sequence([_item(ImageOrientationPatient=list(frame_orientations[k]))])
        if frame_measures is not None:
            frame.PixelMeasuresSequence = Sequence([_item(**frame_measures)])
        if numbers[k] is not None:
            frame.SegmentIdentificationSequence = Sequence([_item(ReferencedSegmentNumber=numbers[k])])
        frames.append(frame)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    ds.PixelData = pixel_data
    for keyword in drop:
        delattr(ds, keyword)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = io.SEGMENTATION_STORAGE
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = syntax
    ds.save_as(path, enforce_file_format=True)
    return path


# ---------------------------------------------------------------------------------------------
# the reader


def test_bits_run_on_across_frames_placed_by_position_on_a_sagittal_grid(tmp_path):
    """Two 3 x 3 BINARY frames, 18 bits in 3 bytes (the run not a whole number of bytes: the last pixel in byte 2's
    bit 1), stored from the higher position down, sagittal (rows along y, columns down z): the grid starts at the
    lower frame, which is slice 0; pixels 0.5 mm (rows) by 0.8 mm (columns), slices 2 mm apart."""
    # pixel p of the run is bit p % 8 of byte p // 8, the first pixel in the lowest bit:
    # frame 0: pixel 0 (row 0, column 0) -> byte 0 bit 0; pixel 5 (row 1, column 2) -> byte 0 bit 5: 0x21
    # frame 1: pixel 9 + 1 (row 0, column 1) -> byte 1 bit 2: 0x04; pixel 9 + 8 (row 2, column 2) -> byte 2 bit 1: 0x02
    pixels = bytes([0x21, 0x04, 0x02, 0x00])  # padded to an even length
    # row (0, 1, 0) x column (0, 0, -1) = normal (-1, 0, 0): frame 0 at x -12 lies 12 along it, frame 1 at -10: 10
    path = seg_file(tmp_path / "s.dcm", pixels, [(-12, 5, 7), (-10, 5, 7)],
                    orientation=("0", "1", "0", "0", "0", "-1"))
    image = io.read_dicom_seg(path)
    assert image.GetSize() == (3, 3, 2)
    assert image.GetSpacing() == (0.8, 0.5, 2.0)
    assert np.allclose(image.GetOrigin(), (-10, 5, 7))  # the lower frame's (frame 1's) position
    # direction columns: row (0, 1, 0), column (0, 0, -1), normal (-1, 0, 0)
    assert np.allclose(image.GetDirection(), (0, 0, -1, 1, 0, 0, 0, -1, 0))
    expected = np.zeros((2, 3, 3), np.uint8)
    expected[0, 0, 1] = expected[0, 2, 2] = 1  # frame 1, the lower: slice 0
    expected[1, 0, 0] = expected[1, 1, 2] = 1  # frame 0: slice 1
    assert np.array_equal(sitk.GetArrayFromImage(image), expected)


def test_an_implicit_vr_seg_is_read_as_the_explicit_one(tmp_path):
    """Implicit VR Little Endian (a 4-byte length straight after the tag, no VR): the same mask as its explicit twin."""
    pixels = bytes([0x21, 0x04, 0x02, 0x00])
    masks = []
    for name, syntax in (("explicit.dcm", ExplicitVRLittleEndian), ("implicit.dcm", ImplicitVRLittleEndian)):
        path = seg_file(tmp_path / name, pixels, [(0, 0, 0), (0, 0, 2)], syntax=syntax)
        masks.append(sitk.GetArrayFromImage(io.read_dicom_seg(path)))
    expected = np.zeros((2, 3, 3), np.uint8)
    expected[0, 0, 0] = expected[0, 1, 2] = expected[1, 0, 1] = expected[1, 2, 2] = 1
    assert np.array_equal(masks[0], expected) and np.array_equal(masks[1], expected)


def test_a_fractional_seg_is_lesion_at_half_its_maximum_and_not_below(tmp_path):
    """FRACTIONAL, Maximum Fractional Value 200: 100 (exactly half) is lesion, 99 is not, 200 is (200 x 2 = 400 does
    not fit a byte: wrapped, it read 144, under 200); no Maximum Fractional Value, or 16 bits: refused."""
    path = seg_file(tmp_path / "f.dcm", bytes([100, 99, 200, 0]), [(0, 0, 0)], rows=2, columns=2,
                    kind="FRACTIONAL", maximum=200)
    assert np.array_equal(sitk.GetArrayFromImage(io.read_dicom_seg(path)), [[[1, 0], [1, 0]]])
    path = seg_file(tmp_path / "nomax.dcm", bytes([100, 99, 200, 0]), [(0, 0, 0)], rows=2, columns=2,
                    kind="FRACTIONAL")
    with pytest.raises(DeepWMLError, match=r"is FRACTIONAL but gives no Maximum Fractional Value"):
        io.read_dicom_seg(path)
    path = seg_file(tmp_path / "f16.dcm", bytes(8), [(0, 0, 0)], rows=2, columns=2, kind="FRACTIONAL", bits=16,
                    maximum=200)
    with pytest.raises(DeepWMLError, match=r"is FRACTIONAL with Bits Allocated 16 \(a FRACTIONAL SEG has 8\)"):
        io.read_dicom_seg(path)


@pytest.mark.parametrize("change, words", [
    ({"kind": "SURFACE", "bits": 8}, r"Segmentation Type SURFACE; DeepWML reads BINARY, FRACTIONAL and LABELMAP"),
    ({"kind": "LABELMAP", "bits": 1}, r"is LABELMAP with Bits Allocated 1 \(a LABELMAP SEG has 8 or 16\)"),
    ({"kind": "LABELMAP", "bits": 8}, r"holds 4 bytes of Pixel Data, and 2 frames of 3 x 3 LABELMAP pixels need 18"),
    ({"drop": ("Rows",)}, r"gives no Rows or Columns"),
    ({"frames_count": 3}, r"gives 2 frames' functional groups for Number of Frames 3"),
    ({"spacing": ("0", "0.8")}, r"gives no Pixel Spacing"),
    ({"spacing": ("0.8",)}, r"gives no Pixel Spacing"),
    ({"orientation": ("1", "0", "0", "0", "2", "0")}, r"no two perpendicular unit vectors"),
    ({"orientation": ("1", "0", "0", "0", "1")}, r"does not give its frames' orientation"),
    ({"segments": ()}, r"lists no segments"),
    ({"positions": [(0, 0), (0, 2)]}, r"does not give each frame's position"),  # two numbers of three
    ({"numbers": [1, 3]}, r"gives frame 2 the segment number 3, which its Segment Sequence does not list \(1\)"),
    ({"pixel_data": bytes(2)}, r"holds 2 bytes of Pixel Data, and 2 frames of 3 x 3 BINARY pixels need 3"),
    ({"spacing": ("1e9", "1e9")}, r"voxel size is no MRI's"),
    # frames 0.1 of a slice off the grid (0.2 mm of 2): over the tolerance (2 % of a slice: 0.04 mm)
    ({"positions": [(0, 0, 0), (0, 0, 2.2)]}, r"frame 2 lies 1.1 slices from the first"),
    # frames 5000 slices apart: a grid of 5001 slices, over the 4096 read
    ({"positions": [(0, 0, 0), (0, 0, 10000)]}, r"spans 5001 slices 2 mm apart"),
])
def test_what_the_reader_refuses(tmp_path, change, words):
    """Each a damaged or unsupported SEG, refused naming what is wrong (a DeepWMLError, not an internal error)."""
    kwargs = {"pixel_data": bytes([0x21, 0x04, 0x02, 0x00]), "positions": [(0, 0, 0), (0, 0, 2)], **change}
    path = seg_file(tmp_path / "s.dcm", **kwargs)
    with pytest.raises(DeepWMLError, match=words):
        io.read_dicom_seg(path)


def test_frames_in_slightly_other_orientations_are_refused(tmp_path):
    """A frame turned 0.01 rad about x (its column 0.99995, 0.0099998): beyond the 1e-4 of the cosines' rounding."""
    turned = ("1", "0", "0", "0", "0.99995", "0.0099998")
    path = seg_file(tmp_path / "s.dcm", bytes([0x21, 0x04, 0x02, 0x00]), [(0, 0, 0), (0, 0, 2)],
                    frame_orientations=[("1", "0", "0", "0", "1", "0"), turned])
    with pytest.raises(DeepWMLError, match=r"has frames in other orientations \(frame 2: 1\\0\\0\\0\\0.99995"):
        io.read_dicom_seg(path)


def test_the_spacing_between_slices_is_the_grids_step_where_given(tmp_path):
    """Frames 6 mm apart, Spacing Between Slices 2: a grid of 4 slices (the frames on slices 0 and 3), not of 2 (the
    frames' own step); without it, of 2 slices 6 mm apart."""
    pixels = bytes([0x01, 0x02, 0x00, 0x00])  # frame 0 pixel 0; frame 1 pixel 9 + 0 (byte 1, bit 1)
    given = io.read_dicom_seg(seg_file(tmp_path / "given.dcm", pixels, [(0, 0, 0), (0, 0, 6)]))
    assert given.GetSize() == (3, 3, 4) and given.GetSpacing()[2] == 2.0
    array = sitk.GetArrayFromImage(given)
    assert array[0, 0, 0] == 1 and array[3, 0, 0] == 1 and array.sum() == 2
    derived = io.read_dicom_seg(seg_file(tmp_path / "derived.dcm", pixels, [(0, 0, 0), (0, 0, 6)], between=None))
    assert derived.GetSize() == (3, 3, 2) and derived.GetSpacing()[2] == 6.0
    # a Spacing Between Slices of no number (infinite, as a damaged DS reads): the frames' own step, as without it
    import warnings

    with warnings.catch_warnings():  # pydicom warns of the invalid DS it is told to write
        warnings.simplefilter("ignore", UserWarning)
        seg_file(tmp_path / "inf.dcm", pixels, [(0, 0, 0), (0, 0, 6)], between="inf")
    infinite = io.read_dicom_seg(tmp_path / "inf.dcm")
    assert infinite.GetSize() == (3, 3, 2) and infinite.GetSpacing()[2] == 6.0


def test_two_segments_on_the_same_frames_without_a_spacing_between_slices(tmp_path):
    """Segments 1 (WMH) and 2 (Brain) on the same two positions 3 mm apart, no Spacing Between Slices: the grid's
    step 3 mm (positions 0, 3, 0, 3: their distinct steps), two slices; WMH's frames alone are the mask."""
    # frames: WMH at z 0 (pixel 0), WMH at z 3 (pixel 4, the centre), Brain at z 0 and 3 (all 9 pixels each)
    run = np.zeros(36, np.uint8)
    run[0] = run[9 + 4] = 1
    run[18:36] = 1
    pixels = np.packbits(run, bitorder="little").tobytes()  # 36 bits: 5 bytes
    assert pixels == bytes([0x01, 0x20, 0xFC, 0xFF, 0x0F])  # by hand: bit 13 = byte 1 bit 5; bits 18-35 set
    path = seg_file(tmp_path / "s.dcm", pixels + b"\0", [(0, 0, 0), (0, 0, 3)] * 2, between=None,
                    segments=(("WMH", 1), ("Brain", 2)), numbers=[1, 1, 2, 2])
    image = io.read_dicom_seg(path)
    assert image.GetSize() == (3, 3, 2) and image.GetSpacing()[2] == 3.0
    expected = np.zeros((2, 3, 3), np.uint8)
    expected[0, 0, 0] = expected[1, 1, 1] = 1
    assert np.array_equal(sitk.GetArrayFromImage(image), expected)


def test_a_single_frame_takes_its_slice_thickness_from_its_own_pixel_measures(tmp_path):
    """One frame, no Spacing Between Slices, Pixel Measures per frame only (Slice Thickness 4 mm, Pixel Spacing
    0.5 0.8 there): a slice 4 mm thick; a thickness of 0 is refused."""
    pixels = bytes([0x01, 0x00])
    path = seg_file(tmp_path / "s.dcm", pixels, [(0, 0, 0)], between=None,
                    frame_measures={"PixelSpacing": ["0.5", "0.8"], "SliceThickness": "4"})
    image = io.read_dicom_seg(path)
    assert image.GetSize() == (3, 3, 1) and image.GetSpacing() == (0.8, 0.5, 4.0)
    path = seg_file(tmp_path / "zero.dcm", pixels, [(0, 0, 0)], between=None, thickness="0")
    with pytest.raises(DeepWMLError, match=r"gives neither Spacing Between Slices nor Slice Thickness"):
        io.read_dicom_seg(path)


def test_a_plane_position_in_the_shared_groups_places_every_frame(tmp_path):
    """A SEG whose frames all lie on one slice may give its Plane Position once, in the Shared Functional Groups
    (PS3.3 C.7.6.16): one frame at (4, -2, 9), and two segments' frames of one slice there; each read as a one-slice
    mask at that position (it was refused as giving no frame's position)."""
    one = seg_file(tmp_path / "one.dcm", bytes([0x11, 0x00]), [None], between=None, thickness="3",
                   shared_position=(4, -2, 9))
    image = io.read_dicom_seg(one)
    assert image.GetSize() == (3, 3, 1) and np.allclose(image.GetOrigin(), (4, -2, 9))
    assert image.GetSpacing() == (0.8, 0.5, 3.0)
    expected = np.zeros((1, 3, 3), np.uint8)
    expected[0, 0, 0] = expected[0, 1, 1] = 1  # pixels 0 and 4 (0x11)
    assert np.array_equal(sitk.GetArrayFromImage(image), expected)
    # frame 0 (WMH): pixel 0; frame 1 (Lesion): pixel 9 + 8 (row 2, column 2) -> byte 2 bit 1
    two = seg_file(tmp_path / "two.dcm", bytes([0x01, 0x00, 0x02, 0x00]), [None, None], between=None, thickness="3",
                   shared_position=(4, -2, 9), segments=(("WMH", 1), ("Lesion", 2)), numbers=[1, 2])
    image = io.read_dicom_seg(two)  # WMH alone is read: the lesion segment named so
    assert image.GetSize() == (3, 3, 1) and np.allclose(image.GetOrigin(), (4, -2, 9))
    expected = np.zeros((1, 3, 3), np.uint8)
    expected[0, 0, 0] = 1
    assert np.array_equal(sitk.GetArrayFromImage(image), expected)


@pytest.mark.parametrize("shared, numbers, segments, lesion", [
    (2, [None, None], (("WMH", 1), ("Brain", 2)), False),  # the shared group names Brain for every frame
    (1, [None, None], (("WMH", 1), ("Brain", 2)), True),
    (None, [None, None], (("WMH", 1),), True),  # no Segment Identification at all: the one segment's
])
def test_a_frames_segment_from_the_shared_groups_or_the_only_segment(tmp_path, shared, numbers, segments, lesion):
    """Frames without their own Segment Identification: the shared group's segment, else the only segment."""
    path = seg_file(tmp_path / "s.dcm", bytes([0x21, 0x04, 0x02, 0x00]), [(0, 0, 0), (0, 0, 2)],
                    shared_segment=shared, numbers=numbers, segments=segments)
    assert sitk.GetArrayFromImage(io.read_dicom_seg(path)).sum() == (4 if lesion else 0)


def test_one_lesion_label_in_two_cases_is_not_warned_of(tmp_path, caplog):
    """Segments 'Lesion' and 'lesion' (no WMH): both lesion, one name, no warning of segments joined; nor for a
    single segment."""
    import logging

    with caplog.at_level(logging.WARNING):
        path = seg_file(tmp_path / "two.dcm", bytes([0x21, 0x04, 0x02, 0x00]), [(0, 0, 0), (0, 0, 2)],
                        segments=(("Lesion", 1), ("lesion", 2)), numbers=[1, 2], between=None)
        assert sitk.GetArrayFromImage(io.read_dicom_seg(path)).sum() == 4
        path = seg_file(tmp_path / "one.dcm", bytes([0x21, 0x04, 0x02, 0x00]), [(0, 0, 0), (0, 0, 2)],
                        segments=(("Lesion", 1),))
        assert sitk.GetArrayFromImage(io.read_dicom_seg(path)).sum() == 4
    assert "none labelled WMH" not in caplog.text


def test_a_damaged_pixel_data_element_is_refused(tmp_path):
    """Pixel Data of undefined length (encapsulated) under an uncompressed syntax, a file cut short inside it, a
    file labelled RLE Lossless (a syntax DeepWML decodes) whose Pixel Data is not encapsulated: each refused as
    such."""
    path = seg_file(tmp_path / "s.dcm", bytes([0x21, 0x04, 0x02, 0x00]), [(0, 0, 0), (0, 0, 2)])
    data = path.read_bytes()
    header = b"\xe0\x7f\x10\x00OB\x00\x00" + struct.pack("<I", 4)
    assert data.endswith(header + bytes([0x21, 0x04, 0x02, 0x00]))
    at = len(data) - len(header) - 4
    encapsulated = data[:at] + b"\xe0\x7f\x10\x00OB\x00\x00\xff\xff\xff\xff" + b"\xfe\xff\x00\xe0\x00\x00\x00\x00" \
        + b"\xfe\xff\x00\xe0\x04\x00\x00\x00" + bytes([0x21, 0x04, 0x02, 0x00]) + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    (tmp_path / "encapsulated.dcm").write_bytes(encapsulated)
    with pytest.raises(DeepWMLError, match=r"holds its Pixel Data encapsulated"):
        io.read_dicom_seg(tmp_path / "encapsulated.dcm")
    (tmp_path / "short.dcm").write_bytes(data[:-2])
    with pytest.raises(DeepWMLError, match=r"is cut short: its Pixel Data holds 2 of 4 bytes"):
        io.read_dicom_seg(tmp_path / "short.dcm")
    # the file meta's Transfer Syntax UID made RLE Lossless's (the same length: 19 characters and a NUL)
    assert data.count(b"1.2.840.10008.1.2.1\0") == 1
    (tmp_path / "rle.dcm").write_bytes(data.replace(b"1.2.840.10008.1.2.1\0", b"1.2.840.10008.1.2.5\0"))
    with pytest.raises(DeepWMLError, match=r"rle\.dcm: the DICOM Segmentation is labelled RLE Lossless but holds its "
                                           r"Pixel Data uncompressed"):
        io.read_dicom_seg(tmp_path / "rle.dcm")


# ---------------------------------------------------------------------------------------------
# the writer


def _tiny_source(tmp_path, size=(3, 3, 2), spacing=(1.0, 1.0, 3.0), extra=None):
    """A DICOM series of a small image (columns, rows, slices), and the FLAIR as read from it and its series."""
    image = sitk.GetImageFromArray((100 + np.arange(np.prod(size)).reshape(size[::-1]) % 50).astype(np.int16))
    image.SetSpacing(spacing)
    folder = write_dicom_series(tmp_path / "src", image, description="FLAIR", number=7, extra={**PATIENT, **(extra or {})})
    series, _ = io.choose_dicom_series(folder)
    return io.read_image(folder, series=series), series


def _mask(flair, array) -> sitk.Image:
    mask = sitk.GetImageFromArray(np.asarray(array, np.uint8))
    mask.CopyInformation(flair)
    return mask


def test_the_bytes_of_the_file_meta_and_the_padding_of_uids_and_pixel_data(tmp_path):
    """Every voxel of a 3 x 3 x 2 mask set: 18 bits, bytes FF FF 03, padded with a NUL (not a space) to 4; the file
    meta's version 00 01 and its transfer syntax UID (19 characters) padded with a NUL."""
    flair, series = _tiny_source(tmp_path)
    made = dicom_seg.segmentation(flair, _mask(flair, np.ones((2, 3, 3))), series, {})
    data = made.data
    assert data.endswith(b"\xe0\x7f\x10\x00OB\x00\x00\x04\x00\x00\x00\xff\xff\x03\x00")
    assert b"\x02\x00\x01\x00OB\x00\x00\x02\x00\x00\x00\x00\x01" in data
    assert b"\x02\x00\x10\x00UI\x14\x001.2.840.10008.1.2.1\x00" in data


def test_the_codes_dimensions_and_equipment_as_the_standard_names_them(tmp_path):
    """The segment's codes (value, scheme, meaning), its algorithm's name, the dimension index pointers of the one
    dimension organisation, the derivation codes, and the equipment and image attributes by hand."""
    from DeepWMLLib import __version__

    flair, series = _tiny_source(tmp_path)
    made = dicom_seg.segmentation(flair, _mask(flair, np.ones((2, 3, 3))), series,
                                  {"model_sha256": ["abc123", "def456"]})
    io.write_bytes(made.data, tmp_path / "s.dcm")
    ds = pydicom.dcmread(tmp_path / "s.dcm")
    segment = ds.SegmentSequence[0]

    def code(sequence):
        return (sequence[0].CodeValue, sequence[0].CodingSchemeDesignator, sequence[0].CodeMeaning)

    assert code(segment.SegmentedPropertyCategoryCodeSequence) == ("49755003", "SCT", "Morphologically abnormal structure")
    assert code(segment.SegmentedPropertyTypeCodeSequence) == ("52988006", "SCT", "Lesion")
    assert code(segment.AnatomicRegionSequence) == ("68523003", "SCT", "Cerebral white matter")
    assert segment.SegmentAlgorithmName == "DeepWML"
    organisation = ds.DimensionOrganizationSequence[0].DimensionOrganizationUID
    index = ds.DimensionIndexSequence
    assert [(int(i.DimensionIndexPointer), int(i.FunctionalGroupPointer)) for i in index] == [
        (0x0062000B, 0x0062000A), (0x00200032, 0x00209113)]
    assert [i.DimensionOrganizationUID for i in index] == [organisation, organisation]
    derivation = ds.PerFrameFunctionalGroupsSequence[1].DerivationImageSequence[0]
    assert code(derivation.DerivationCodeSequence) == ("113076", "DCM", "Segmentation")
    source = derivation.SourceImageSequence[0]
    assert code(source.PurposeOfReferenceCodeSequence) == ("121322", "DCM", "Source image for image processing operation")
    assert source.SpatialLocationsPreserved == "YES"
    assert ds.DeviceSerialNumber == "abc123+def456" and ds.SoftwareVersions == __version__
    assert ds.Manufacturer == ds.ManufacturerModelName == "DeepWML" and ds.InstanceNumber == 1
    assert ds.ContentDate == ds.SeriesDate and ds.ContentTime == ds.SeriesTime
    assert (ds.PixelRepresentation, ds.SamplesPerPixel, ds.PhotometricInterpretation) == (0, 1, "MONOCHROME2")
    assert "ContentCreatorName" in ds and ds.ContentCreatorName == "" and ds.ContentLabel == "WMH"  # Type 2, no person


def test_the_slice_thickness_is_the_sources_and_the_spacing_its_step(tmp_path):
    """Slices 3 mm apart, each 2 mm thick (a gap): Slice Thickness 2, Spacing Between Slices 3."""
    flair, series = _tiny_source(tmp_path, extra={"0018|0050": "2"})
    assert series.slice_thickness_mm == 2.0
    made = dicom_seg.segmentation(flair, _mask(flair, np.ones((2, 3, 3))), series, {})
    io.write_bytes(made.data, tmp_path / "s.dcm")
    measures = pydicom.dcmread(tmp_path / "s.dcm").SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    assert (float(measures.SliceThickness), float(measures.SpacingBetweenSlices)) == (2.0, 3.0)


def test_long_labels_and_descriptions_are_cut_to_their_vrs_lengths(tmp_path):
    """A Segment Label of 70 characters (LO): 64; a Segment Description of 1100 (ST): 1024; a Content Description
    of 70 (LO): 64."""
    flair, series = _tiny_source(tmp_path)
    segment = dicom_seg.Segment(1, "L" * 70, "D" * 1100, (255, 0, 0))
    made = dicom_seg.labelled_segmentation(flair, np.ones((2, 3, 3), np.uint8), series, [segment], [], "T", "WMH",
                                           "C" * 70)
    io.write_bytes(made.data, tmp_path / "s.dcm")
    ds = pydicom.dcmread(tmp_path / "s.dcm")
    assert ds.SegmentSequence[0].SegmentLabel == "L" * 64
    assert ds.SegmentSequence[0].SegmentDescription == "D" * 1024
    assert ds.ContentDescription == "C" * 64


def test_what_the_writer_refuses(tmp_path):
    """No segment, a 2D image, a mask of another size: refused before anything is made."""
    flair, series = _tiny_source(tmp_path)
    segment = dicom_seg.Segment(1, "WMH", "", (255, 0, 0))
    with pytest.raises(ValueError, match=r"needs at least one segment"):
        dicom_seg.labelled_segmentation(flair, np.ones((2, 3, 3), np.uint8), series, [], [], "T", "WMH", "")
    with pytest.raises(DeepWMLError, match=r"needs a 3D image, got 2D"):
        dicom_seg.labelled_segmentation(flair[:, :, 0], np.ones((3, 3), np.uint8), series, [segment], [], "T", "WMH", "")
    with pytest.raises(ValueError, match=r"mask \(3, 3, 3\) and image \(3, 3, 2\) differ"):
        dicom_seg.labelled_segmentation(flair, np.ones((3, 3, 3), np.uint8), series, [segment], [], "T", "WMH", "")


def test_the_frame_shifted_within_its_plane_is_the_one_named(tmp_path):
    """Three frames 2 mm apart, the middle one 0.3 mm along its rows: that frame (2), by 0.3 mm, is named; not the
    frame farthest from the first (3, 4 mm along the normal, which is no shift within the plane)."""
    path = seg_file(tmp_path / "s.dcm", bytes(4), [(0, 0, 0), (0.3, 0, 2), (0, 0, 4)])
    with pytest.raises(DeepWMLError, match=r"shifted within their plane against one another \(frame 2 by 0.3 mm"):
        io.read_dicom_seg(path)


def test_a_sparse_segs_grid_is_the_largest_step_of_which_every_offset_is_a_multiple(tmp_path):
    """Frames at 0, 6 and 14 mm, no Spacing Between Slices: steps of 6 and 8 mm, whose largest common step is 2 mm
    (the smallest, 6, divided by 3): 8 slices, the frames on slices 0, 3 and 7."""
    # 3 frames of 9 pixels: pixel 0 of each frame is run bit 0, 9 and 18: bytes 0x01, 0x02, 0x04
    path = seg_file(tmp_path / "s.dcm", bytes([0x01, 0x02, 0x04, 0x00]), [(0, 0, 0), (0, 0, 6), (0, 0, 14)],
                    between=None)
    image = io.read_dicom_seg(path)
    assert image.GetSize() == (3, 3, 8) and image.GetSpacing()[2] == 2.0
    array = sitk.GetArrayFromImage(image)
    assert [int(k) for k in np.flatnonzero(array[:, 0, 0])] == [0, 3, 7] and array.sum() == 3


def test_a_stray_item_delimiter_or_a_one_byte_rows_is_refused(tmp_path):
    """An item delimiter (FFFE,E00D) stray at the top level, before the Shared Functional Groups, ends the data set
    read there: what follows is no Pixel Data, refused as such (not its bytes read as the pixels); a Rows of one
    byte (US has two) is no Rows."""
    path = seg_file(tmp_path / "s.dcm", bytes([0x21, 0x04, 0x02, 0x00]), [(0, 0, 0), (0, 0, 2)])
    data = path.read_bytes()
    shared = b"\x00\x52\x29\x92SQ"
    assert data.count(shared) == 1
    at = data.index(shared)
    (tmp_path / "stray.dcm").write_bytes(data[:at] + b"\xfe\xff\x0d\xe0\x00\x00\x00\x00" + data[at:])
    with pytest.raises(DeepWMLError, match=r"the DICOM Segmentation holds no Pixel Data"):
        io.read_dicom_seg(tmp_path / "stray.dcm")
    rows = b"\x28\x00\x10\x00US\x02\x00\x03\x00"
    assert data.count(rows) == 1
    (tmp_path / "rows.dcm").write_bytes(data.replace(rows, b"\x28\x00\x10\x00US\x01\x00\x03"))
    with pytest.raises(DeepWMLError, match=r"gives no Rows or Columns"):
        io.read_dicom_seg(tmp_path / "rows.dcm")


def test_an_rle_binary_frame_cut_short_is_refused_not_read_as_packed_bits():
    """A 1-bit RLE frame is stored packed (10 x 10 pixels: 13 bytes) or a byte a pixel (100 bytes), told apart by
    its decoded length; one that decodes to 50 bytes is neither (a byte-a-pixel frame cut short) and is refused,
    where it was read as packed bits (its first 13 bytes), a mask made of half a frame's bytes."""
    def fragment(payload: bytes) -> bytes:
        header = struct.pack("<16I", 1, 64, *([0] * 14))
        runs = b"".join(bytes([len(payload[k:k + 128]) - 1]) + payload[k:k + 128] for k in range(0, len(payload), 128))
        return header + runs
    unpacked = bytes([1, 0] * 50)  # pixels 0, 2, 4, ... marked
    assert io._rle_frame(fragment(unpacked), 100, 1).tolist() == [1, 0] * 50
    packed = bytes([0x55] * 12 + [0x05])  # bits 0, 2, 4, 6 of each byte: the same pixels, 100 bits in 13 bytes
    assert io._rle_frame(fragment(packed), 100, 1).tolist() == [1, 0] * 50
    assert io._rle_frame(fragment(packed + b"\0"), 100, 1).tolist() == [1, 0] * 50  # padded to an even length
    with pytest.raises(ValueError, match="decodes to 50 bytes"):
        io._rle_frame(fragment(unpacked[:50]), 100, 1)
