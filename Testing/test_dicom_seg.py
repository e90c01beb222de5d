"""`deepwml segment --dicom-seg`: the mask as a DICOM Segmentation object of the input's study, a frame on each
input slice holding a voxel of it and on the first and last (DeepWMLLib/dicom_seg.py). Read back with pydicom and highdicom (test dependencies; DeepWML encodes
the file itself), each frame compared with the source image it names, read by pydicom too, so that a row, column
or slice order flipped anywhere fails; and checked by dciodvfy (dicom3tools) where it is installed."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import time

import numpy as np
import pytest
import SimpleITK as sitk

from DeepWMLLib import dicom_seg, io
from DeepWMLLib.cli import main
from DeepWMLLib.errors import DeepWMLError

from conftest import make_volume, rotation, stepped_positions, write_dicom_series, write_enhanced_mr

pydicom = pytest.importorskip("pydicom")
hd = pytest.importorskip("highdicom")

PATIENT = {"0010|0010": "Doe^Jane", "0010|0020": "PAT-0042", "0010|0030": "19500101", "0010|0040": "F",
           "0008|0020": "20260110", "0008|0030": "101500", "0008|0050": "ACC77", "0020|0010": "S77",
           "0008|0090": "House^Greg", "0020|0052": "1.2.3.77", "0008|1030": "MRI brain"}
LESION = 600  # the phantoms' lesion voxels (700 to 719), and only they, are this bright or brighter: the mask is
# where the source is


def phantom(size=(40, 28, 7), spacing=(0.7, 0.9, 5.0), direction=None):
    """A FLAIR whose lesions, LESION bright, lie in no symmetric pattern (an L a slice, moved and grown slice by
    slice, a corner voxel, one slice empty), more columns than rows: rows, columns or slices flipped or swapped
    anywhere give another mask."""
    columns, rows, slices = size
    noise = np.random.default_rng(1).integers(0, 20, (slices, rows, columns))
    array = (np.full((slices, rows, columns), 100) + noise).astype(np.int16)
    array[:, 2:-2, 3:-3] += 200
    for k in range(slices):
        if k == 2:
            continue  # a slice without a lesion: its frame is written, empty
        array[k, 3 + k:6 + k, 5:8 + 2 * k] = 700 + noise[k, 3 + k:6 + k, 5:8 + 2 * k]  # the foot of the L, longer each slice
        array[k, 3 + k:12 + k, 5:7] = 700 + noise[k, 3 + k:12 + k, 5:7]  # its upright
    array[0, 0, columns - 1] = 700  # a corner voxel on the first slice only
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin((-12.0, 20.0, -31.0))
    image.SetDirection(tuple(np.eye(3).ravel()) if direction is None else tuple(np.asarray(direction, float).ravel()))
    return image


def source_series(folder, extra=None, **kwargs):
    image = phantom(**kwargs)
    return write_dicom_series(folder, image, uid="1.2.3.4.5", description="AX T2 FLAIR", number=7,
                              extra={**PATIENT, **(extra or {})})


def make_seg(folder, out, mask=None, report=None):
    """The SEG of the series in `folder` with its mask read as DeepWML reads the FLAIR (`mask`: another, on its
    grid), written to `out`; returns (the SegObject, the FLAIR as read)."""
    series, _ = io.choose_dicom_series(folder)
    flair = io.read_image(folder, series=series)
    if mask is None:
        mask = sitk.Cast(flair >= LESION, sitk.sitkUInt8)
    made = dicom_seg.segmentation(flair, mask, series, report or {"model_sha256": ["abc123"], "volume_ml": 1.25,
                                                                   "lesion_count": 3})
    io.write_bytes(made.data, out)
    return made, flair


def framed_slices(mask) -> list[int]:
    """The slices (numpy k) on which DeepWML writes a frame of a one-segment mask: those holding a voxel, and the
    first and last."""
    array = np.asarray(mask)
    return sorted(set(np.flatnonzero(array.reshape(array.shape[0], -1).any(axis=1)).tolist()) | {0, array.shape[0] - 1})


def frames_of(ds) -> np.ndarray:
    """The frames of a SEG as pydicom unpacks them: [frame, row, column]."""
    pixels = ds.pixel_array
    return pixels.reshape((int(ds.NumberOfFrames), ds.Rows, ds.Columns))


def source_images(folder) -> dict:
    """{SOP Instance UID: pydicom data set} of every file in `folder`."""
    return {ds.SOPInstanceUID: ds for ds in (pydicom.dcmread(path) for path in sorted(folder.iterdir()))}


def check_against_sources(path, folder, lesion=LESION):
    """Every frame of the SEG at `path` against the source image it names, both read by pydicom: the frame is
    where the source is `lesion` bright, pixel for pixel in the source's own rows and columns, and lies at the
    source's own position (its Image Position, or its frame's Plane Position). Returns the SEG's data set."""
    ds = pydicom.dcmread(path)
    sources = source_images(folder)
    frames = frames_of(ds)
    seen = set()
    for k, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
        reference = item.DerivationImageSequence[0].SourceImageSequence[0]
        source = sources[reference.ReferencedSOPInstanceUID]
        assert reference.ReferencedSOPClassUID == source.SOPClassUID
        assert reference.PurposeOfReferenceCodeSequence[0].CodeValue == "121322"
        if "NumberOfFrames" in source:  # a multi-frame source: its frame, as the file numbers them
            number = int(reference.ReferencedFrameNumber)
            pixels = source.pixel_array.reshape((int(source.NumberOfFrames), source.Rows, source.Columns))[number - 1]
            where = source.PerFrameFunctionalGroupsSequence[number - 1].PlanePositionSequence[0].ImagePositionPatient
        else:
            assert "ReferencedFrameNumber" not in reference
            number, pixels, where = None, source.pixel_array, source.ImagePositionPatient
        assert (reference.ReferencedSOPInstanceUID, number) not in seen  # every source image (frame) once at most
        seen.add((reference.ReferencedSOPInstanceUID, number))
        assert np.array_equal(frames[k], (pixels >= lesion).astype(np.uint8)), k
        position = item.PlanePositionSequence[0].ImagePositionPatient
        assert np.allclose([float(v) for v in position], [float(v) for v in where], atol=1e-6), (k, position, where)
        assert item.SegmentIdentificationSequence[0].ReferencedSegmentNumber == 1
        assert list(item.FrameContentSequence[0].DimensionIndexValues) == [1, k + 1]  # its place among the frames'
    assert int(ds.NumberOfFrames) == len(frames) == len(ds.PerFrameFunctionalGroupsSequence)
    return ds


def test_each_frame_is_the_mask_on_its_own_source_slice(tmp_path):
    """An oblique series: frame k is the mask on the source image it references, in that image's rows and
    columns, at its Image Position; the patient, study, frame of reference and the source series are the
    source's; a new series and instance, numbered +2000 from the source's; highdicom reads the same mask. Slice 2,
    without a lesion, has no frame (it had one, empty: a frame on every slice); the source series is named whole."""
    folder = source_series(tmp_path / "flair", direction=rotation(0.12, -0.08, 0.3))
    made, flair = make_seg(folder, tmp_path / "case_wmh_seg.dcm")
    assert made.frames == 6 and made.series_number == 2007
    ds = check_against_sources(tmp_path / "case_wmh_seg.dcm", folder)
    source = pydicom.dcmread(sorted(folder.iterdir())[0])
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
                    "StudyTime", "AccessionNumber", "StudyID", "ReferringPhysicianName", "StudyDescription",
                    "FrameOfReferenceUID"):
        assert ds[keyword].value == source[keyword].value, keyword
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1" and ds.SOPClassUID == dicom_seg.SEGMENTATION_STORAGE
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID == made.sop_instance_uid
    assert ds.SeriesInstanceUID == made.series_uid != source.SeriesInstanceUID and ds.Modality == "SEG"
    assert ds.SeriesNumber == 2007 and ds.SeriesDescription == "DeepWML WMH segmentation (AX T2 FLAIR)"
    assert ds.SpecificCharacterSet == "ISO_IR 192" and list(ds.ImageType) == ["DERIVED", "PRIMARY"]
    assert (ds.SegmentationType, ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.Rows, ds.Columns) == (
        "BINARY", 1, 1, 0, 28, 40)
    segment = ds.SegmentSequence[0]
    assert (segment.SegmentNumber, segment.SegmentLabel, segment.SegmentAlgorithmType) == (1, "WMH", "AUTOMATIC")
    assert segment.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == "52988006"
    assert "1.25 ml, 3 lesions" in segment.SegmentDescription and "abc123" in segment.SegmentDescription
    assert list(segment.RecommendedDisplayCIELabValue) == dicom_seg.cielab(dicom_seg.DISPLAY_RGB)
    shared = ds.SharedFunctionalGroupsSequence[0]
    assert np.allclose([float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing], (0.9, 0.7))
    assert np.allclose([float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient],
                       [float(v) for v in source.ImageOrientationPatient], atol=1e-6)
    referenced = ds.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == source.SeriesInstanceUID
    assert sorted(r.ReferencedSOPInstanceUID for r in referenced.ReferencedInstanceSequence) == sorted(
        source_images(folder))
    assert not [element for element in ds.iterall() if element.tag.is_private]
    # highdicom: its segment and its pixels by source instance, in the order of the source files
    seg = hd.seg.segread(tmp_path / "case_wmh_seg.dcm")
    assert seg.get_segment_numbers(segment_label="WMH") == [1]
    uids = [pydicom.dcmread(path).SOPInstanceUID for path in sorted(folder.iterdir())]
    pixels = seg.get_pixels_by_source_instance(uids, segment_numbers=[1])[..., 0]
    sources = source_images(folder)
    assert np.array_equal(pixels, np.stack([sources[uid].pixel_array >= LESION for uid in uids]).astype(pixels.dtype))
    # and on the voxels DeepWML read: the frames are the mask's slices 0, 1, 3, 4, 5, 6; read back, the mask
    mask = sitk.GetArrayFromImage(flair) >= LESION
    assert framed_slices(mask) == [0, 1, 3, 4, 5, 6]
    assert np.array_equal(frames_of(ds), mask[[0, 1, 3, 4, 5, 6]])
    read = io.read_mask(tmp_path / "case_wmh_seg.dcm")  # on its own: the source's grid, slice 2 too
    assert read.GetSize() == flair.GetSize() and np.allclose(read.GetOrigin(), flair.GetOrigin())
    assert np.allclose(read.GetSpacing(), flair.GetSpacing()) and np.array_equal(sitk.GetArrayFromImage(read), mask)


def test_the_display_colour_is_the_outline_red_in_cielab():
    """Recommended Display CIELab Value: the red of the QC picture and outline (255, 40, 40), as highdicom converts it."""
    from DeepWMLLib import qc

    assert dicom_seg.DISPLAY_RGB == qc.LESION_RGB
    expected = hd.color.CIELabColor.from_rgb(*qc.LESION_RGB) if hasattr(hd.color.CIELabColor, "from_rgb") else None
    value = dicom_seg.cielab(qc.LESION_RGB)
    if expected is not None:
        assert np.allclose(value, expected.value, atol=16)  # 0.025 of L*, 0.06 of a*, b*: their white point's digits
    assert np.allclose(dicom_seg.cielab((255, 255, 255)), (65535, 32896, 32896), atol=3)  # white: L 100, a b 0
    assert np.allclose(dicom_seg.cielab((0, 0, 0)), (0, 32896, 32896), atol=3)


@pytest.mark.parametrize("how", ["reversed files", "descending slice axis"])
def test_a_series_stored_from_the_top_down(tmp_path, how):
    """Instance Number 1 the highest slice, or the slice axis written pointing down: the volume is read by
    position, so frame k (the k-th slice as read) must name the file at that position, not the k-th written."""
    if how == "reversed files":
        image = phantom()
        folder = write_dicom_series(tmp_path / "flair", image, uid="1.2.3.4.5", description="AX FLAIR",
                                    extra=PATIENT, instance_numbers=list(range(7, 0, -1)))
    else:
        folder = source_series(tmp_path / "flair", direction=(1, 0, 0, 0, 1, 0, 0, 0, -1))
    make_seg(folder, tmp_path / "s.dcm")
    ds = check_against_sources(tmp_path / "s.dcm", folder)
    along = [float(item.PlanePositionSequence[0].ImagePositionPatient[2]) for item in ds.PerFrameFunctionalGroupsSequence]
    assert along == sorted(along) or along == sorted(along, reverse=True)


@pytest.mark.parametrize("order, files", [(None, 1), (range(6, -1, -1), 1), (None, 7)])
def test_an_enhanced_multi_frame_source(tmp_path, order, files):
    """Enhanced MR: one file of all the frames, stored from the first slice or from the last, or a file a frame,
    the frames unevenly spaced: each SEG frame names the file and, for a multi-frame file, its frame (Referenced
    Frame Number), and lies at that frame's own Plane Position; highdicom reads each source frame's mask."""
    image = phantom(spacing=(0.7, 0.9, 5.16), direction=rotation(0.1, 0.05, 0.2))
    positions = stepped_positions(image, [5.0, 5.0, 5.8, 5.0, 5.0, 5.16], noise_mm=0.05)
    folder = tmp_path / "enhanced"
    stored = list(order or range(7))
    for k, frames in enumerate([stored] if files == 1 else [[k] for k in stored]):
        write_enhanced_mr(folder / f"flair{k}.dcm", image, order=frames, positions=positions,
                          frame_of_reference="1.2.3.77")
    make_seg(folder, tmp_path / "s.dcm")
    ds = check_against_sources(tmp_path / "s.dcm", folder)
    assert int(ds.NumberOfFrames) == 6  # slice 2 holds no lesion
    seg = hd.seg.segread(tmp_path / "s.dcm")
    if files == 1:
        source = pydicom.dcmread(folder / "flair0.dcm")
        pixels = seg.get_pixels_by_source_frame(source.SOPInstanceUID, list(range(1, 8)), segment_numbers=[1])[..., 0]
        assert np.array_equal(pixels, (source.pixel_array >= LESION).astype(pixels.dtype))


@pytest.mark.parametrize("source", ["a file a slice", "one enhanced file"])
def test_the_seg_of_an_unevenly_spaced_series_reads_back_as_its_mask(tmp_path, source, caplog):
    """Slices unevenly spaced (4.2 to 5.8 mm apart, within what DeepWML reads with a warning): the FLAIR is read on
    the regular grid of their mean step, slice k on its slice k, and the SEG's frames lie at their source slices' own
    positions, off that grid. Read back, alone and onto the FLAIR, each frame lies on the slice the FLAIR reader put
    its source on: the mask voxel for voxel (slice 2, without a frame, empty), a warning saying so. It was refused as
    frames between slices: DeepWML could not read its own output (evaluate, export, a rerun)."""
    image = phantom(spacing=(0.7, 0.9, 5.0), direction=rotation(0.1, 0.05, 0.2))
    positions = stepped_positions(image, [5.0, 5.6, 4.4, 5.0, 5.8, 4.2], noise_mm=0.02)
    folder = tmp_path / "flair"
    if source == "a file a slice":
        write_dicom_series(folder, image, uid="1.2.3.4.5", description="AX T2 FLAIR", number=7, extra=PATIENT,
                           positions=positions)
    else:
        write_enhanced_mr(folder / "flair.dcm", image, positions=positions, frame_of_reference="1.2.3.77")
    made, flair = make_seg(folder, tmp_path / "s.dcm")
    assert made.frames == 6
    series, _ = io.choose_dicom_series(folder)
    assert any("unevenly spaced" in w for w in series.slice_warnings(flair))  # the FLAIR itself is read so, warned of
    check_against_sources(tmp_path / "s.dcm", folder)  # each frame at its source's own position
    mask = sitk.GetArrayFromImage(flair) >= LESION
    alone = io.read_mask(tmp_path / "s.dcm")
    assert alone.GetSize() == flair.GetSize() and np.allclose(alone.GetOrigin(), flair.GetOrigin(), atol=1e-3)
    assert np.allclose(alone.GetSpacing(), flair.GetSpacing(), atol=1e-4)
    assert np.array_equal(sitk.GetArrayFromImage(alone), mask)
    assert np.array_equal(sitk.GetArrayFromImage(io.read_mask(tmp_path / "s.dcm", flair)), mask)
    assert "frames lie on an unevenly spaced series' slices" in caplog.text
    # the source series at hand: each frame on its source image's slice (named by its UID), the same mask
    assert np.array_equal(sitk.GetArrayFromImage(io.read_mask(tmp_path / "s.dcm", flair, source=series)), mask)


def test_the_seg_of_a_series_of_skewed_uneven_steps_reads_back_alone(tmp_path):
    """Steps of 4 and 4.78 mm with one of 3.22 (each within a fifth of their median, 4 mm, as the FLAIR reader
    checks: read with a warning), their mean 4.23 mm: DeepWML's own SEG of it, read alone (evaluate, a rerun), reads
    back as its mask. It was refused as 'neighbouring frames lie more unevenly apart than the slices of a series
    DeepWML reads': its frames' steps were held against the mean step, 3.22 mm over a fifth from it."""
    steps = [4.0, 4.78, 4.0, 4.78, 4.0, 4.78, 4.0, 4.78, 4.0, 3.22]
    image = phantom(size=(40, 28, len(steps) + 1), spacing=(0.7, 0.9, 5.0))
    folder = write_dicom_series(tmp_path / "flair", image, uid="1.2.3.4.5", description="AX T2 FLAIR", number=7,
                                extra=PATIENT, positions=stepped_positions(image, steps))
    _, flair = make_seg(folder, tmp_path / "s.dcm")
    series, _ = io.choose_dicom_series(folder)
    assert any("unevenly spaced" in w for w in series.slice_warnings(flair))
    mask = sitk.GetArrayFromImage(flair) >= LESION
    assert np.array_equal(sitk.GetArrayFromImage(io.read_mask(tmp_path / "s.dcm", flair)), mask)
    assert np.array_equal(sitk.GetArrayFromImage(io.read_mask(tmp_path / "s.dcm")), mask)


@pytest.mark.parametrize("other", ["the same positions", "other uneven positions", "a regular series"])
def test_the_seg_of_an_uneven_series_given_with_another_series_as_its_source_is_refused(tmp_path, other):
    """DeepWML's SEG of an unevenly spaced series (its frames off its own grid, each naming its source image), read
    with another series given as the source (export of a rater's SEG with the wrong series): its frames name none
    of that series' images, so they cannot be placed by them; refused saying so. It was placed by its own positions
    as though it were that series' (with a warning only). Read with its own series, it reads back as before."""
    image = phantom(spacing=(0.7, 0.9, 5.0))
    steps = [5.0, 5.6, 4.4, 5.0, 5.8, 4.2]
    mine = write_dicom_series(tmp_path / "a", image, uid="1.2.3.4.5", description="AX T2 FLAIR", number=7,
                              extra=PATIENT, positions=stepped_positions(image, steps))
    _, flair = make_seg(mine, tmp_path / "s.dcm")
    positions = {"the same positions": stepped_positions(image, steps),
                 "other uneven positions": stepped_positions(image, steps[::-1]), "a regular series": None}[other]
    folder = write_dicom_series(tmp_path / "b", image, uid="1.2.3.4.6", description="AX T2 FLAIR", number=8,
                                extra=PATIENT, positions=positions)
    series, _ = io.choose_dicom_series(folder)
    with pytest.raises(DeepWMLError, match=r"s\.dcm: the DICOM Segmentation has frames between slices, placed by the "
                                           r"source images they name, and frame 1 names image [0-9.]+, which is not in "
                                           r"the FLAIR series \(6 of its 6 frames name none of its images\): a "
                                           r"segmentation of another series; give the FLAIR series it was made on"):
        io.read_mask(tmp_path / "s.dcm", io.read_image(folder, series=series), source=series)
    own, _ = io.choose_dicom_series(mine)
    assert np.array_equal(sitk.GetArrayFromImage(io.read_mask(tmp_path / "s.dcm", flair, source=own)),
                          sitk.GetArrayFromImage(flair) >= LESION)


def test_frames_between_the_slices_of_a_regular_series_are_still_refused(tmp_path):
    """DeepWML's SEG of an evenly spaced series, one frame moved 0.3 of a slice: off the grid, and not as a series'
    slices are read (its steps to its neighbours 3.5 and 6.5 mm of 5), refused as between slices; a frame moved so
    that its steps would pass but naming no source image, or one named by another frame too, refused as well, and
    with the source series at hand, one that names its source image but lies elsewhere."""
    folder = source_series(tmp_path / "flair")
    make_seg(folder, tmp_path / "good.dcm")

    def altered(name, frame, by, change=None):
        ds = pydicom.dcmread(tmp_path / "good.dcm")
        item = ds.PerFrameFunctionalGroupsSequence[frame]
        position = item.PlanePositionSequence[0].ImagePositionPatient
        item.PlanePositionSequence[0].ImagePositionPatient = [float(v) for v in position[:2]] + [float(position[2]) + by]
        if change is not None:
            change(ds)
        ds.save_as(tmp_path / name)
        return tmp_path / name

    with pytest.raises(DeepWMLError, match=r"moved\.dcm: the DICOM Segmentation has frames between slices: frame 3 lies "
                                           r"3\.3 slices from the first.*neighbouring frames lie more unevenly apart"):
        io.read_mask(altered("moved.dcm", 2, 1.5))  # (frame 3: slice 3, slice 2 having none)

    def unnamed(ds):
        del ds.PerFrameFunctionalGroupsSequence[2].DerivationImageSequence

    def twice(ds):
        per_frame = ds.PerFrameFunctionalGroupsSequence
        per_frame[2].DerivationImageSequence = per_frame[3].DerivationImageSequence

    # a frame moved 0.18 of a slice that still names its source image: its steps pass, and read alone it would be
    # taken for an unevenly spaced series' slice; with the source series at hand it lies 0.9 mm from that image
    series, _ = io.choose_dicom_series(folder)
    flair = io.read_image(folder, series=series)
    with pytest.raises(DeepWMLError, match=r"named\.dcm: the DICOM Segmentation has frames between slices: frame 3 lies "
                                           r"0\.9 mm from the source image it names \(image 4 of the FLAIR series\)"):
        io.read_mask(altered("named.dcm", 2, 0.9), flair, source=series)
    for name, change, why in (("unnamed.dcm", unnamed, "do not each name the source image"),
                              ("twice.dcm", twice, "frames at different positions name one source image")):
        with pytest.raises(DeepWMLError, match=rf"{name.replace('.', '[.]')}: the DICOM Segmentation has frames between "
                                               rf"slices.*{why}"):
            io.read_mask(altered(name, 2, 0.9, change))  # 0.18 of a slice: steps 4.1 and 5.9 mm would pass


def test_an_empty_mask_gives_empty_frames_on_the_first_and_last_slices(tmp_path):
    """No lesion: the SEG has two frames, empty, on the first and last slices (a PACS shows that nothing was found,
    not a missing result; a SEG needs a frame), the bits padded to an even length; dciodvfy, highdicom and
    io.read_mask read it, as an all-zero mask on the scan's very grid. It had a frame on every slice."""
    folder = source_series(tmp_path / "flair", size=(13, 11, 3))
    series, _ = io.choose_dicom_series(folder)
    flair = io.read_image(folder, series=series)
    empty = sitk.Image(flair.GetSize(), sitk.sitkUInt8)
    empty.CopyInformation(flair)
    made = dicom_seg.segmentation(flair, empty, series, {})
    io.write_bytes(made.data, tmp_path / "s.dcm")
    ds = pydicom.dcmread(tmp_path / "s.dcm")
    assert made.frames == int(ds.NumberOfFrames) == 2 and len(ds.PerFrameFunctionalGroupsSequence) == 2
    assert [list(item.FrameContentSequence[0].DimensionIndexValues) for item in ds.PerFrameFunctionalGroupsSequence] == [
        [1, 1], [1, 2]]
    along = [float(item.PlanePositionSequence[0].ImagePositionPatient[2]) for item in ds.PerFrameFunctionalGroupsSequence]
    assert np.allclose(along, [flair.TransformIndexToPhysicalPoint((0, 0, k))[2] for k in (0, 2)])
    assert len(ds.PixelData) == 36 and not frames_of(ds).any()  # 286 bits: 36 bytes (even)
    read = io.read_mask(tmp_path / "s.dcm")
    assert read.GetSize() == flair.GetSize() and np.allclose(read.GetOrigin(), flair.GetOrigin())
    assert np.allclose(read.GetSpacing(), flair.GetSpacing()) and not sitk.GetArrayFromImage(read).any()
    seg = hd.seg.segread(tmp_path / "s.dcm")
    assert not seg.get_pixels_by_source_instance(sorted(source_images(folder)), segment_numbers=[1]).any()


def test_only_the_slices_holding_a_voxel_have_frames_and_read_back_on_the_scans_grid(tmp_path):
    """A mask on slices 2 and 4 of 0-6 (frames on 0, 2, 4, 6: 2 holding a voxel, the first and last empty): the
    frames a step of two slices apart, still read back slice for slice on the scan's grid by its Spacing Between
    Slices (without it, the step would be read as two slices), alone and onto the FLAIR; and of a 5-slice series,
    lesions on slices 0, 2 and 4, its frames those three alone; Dimension Index Values count the frames' slices 1,
    2, ...; the size a frame's 140 bytes each. Every slice had a frame."""
    for depth, slices, framed in ((7, [2, 4], [0, 2, 4, 6]), (5, [0, 2, 4], [0, 2, 4])):
        folder = source_series(tmp_path / f"flair{depth}", size=(40, 28, depth))
        series, _ = io.choose_dicom_series(folder)
        flair = io.read_image(folder, series=series)
        array = np.zeros((depth, 28, 40), np.uint8)
        for k in slices:
            array[k, 5 + k:9 + k, 10:13 + k] = 1
        mask = sitk.GetImageFromArray(array)
        mask.CopyInformation(flair)
        made = dicom_seg.segmentation(flair, mask, series, {})
        io.write_bytes(made.data, tmp_path / "s.dcm")
        ds = pydicom.dcmread(tmp_path / "s.dcm")
        assert made.frames == int(ds.NumberOfFrames) == len(framed) and len(ds.PixelData) == len(framed) * 140
        assert np.array_equal(frames_of(ds), array[framed])
        assert [list(i.FrameContentSequence[0].DimensionIndexValues) for i in ds.PerFrameFunctionalGroupsSequence] == [
            [1, n] for n in range(1, len(framed) + 1)]
        assert float(ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].SpacingBetweenSlices) == 5.0
        alone = io.read_mask(tmp_path / "s.dcm")
        assert alone.GetSize() == flair.GetSize() and np.allclose(alone.GetSpacing(), flair.GetSpacing())
        assert np.array_equal(sitk.GetArrayFromImage(alone), array)
        assert np.array_equal(sitk.GetArrayFromImage(io.read_mask(tmp_path / "s.dcm", flair)), array)


@pytest.mark.parametrize("how", ["slices up", "descending slice axis", "reversed files", "enhanced, stored top-down"])
def test_highdicom_maps_each_frame_of_a_sparse_multi_segment_seg_to_its_source(tmp_path, how):
    """A sparse SEG of several segments (`deepwml change --dicom-seg`'s kind: segment 1 on neither the first nor the
    last slice, three segments sharing one slice): highdicom maps every frame to the source image (frame) it lies on,
    each segment by source instance and as a volume (get_volume) the label map == its value, on a series stored
    bottom-up, with its slice axis pointing down, its files numbered from the top, or an enhanced file of frames
    stored top-down; segment 1's empty frames lie on the first and last slices; DeepWML reads the lesion segments."""
    from DeepWMLLib.dicom_seg import Segment

    image = phantom(size=(20, 16, 6), direction=(1, 0, 0, 0, 1, 0, 0, 0, -1) if how == "descending slice axis" else None)
    folder = tmp_path / "flair"
    if how.startswith("enhanced"):
        write_enhanced_mr(folder / "f.dcm", image, order=list(range(5, -1, -1)), frame_of_reference="1.2.3.77")
    else:
        write_dicom_series(folder, image, uid="1.2.3.4.5", description="AX FLAIR", extra=PATIENT,
                           instance_numbers=list(range(6, 0, -1)) if how == "reversed files" else None)
    series, _ = io.choose_dicom_series(folder)
    flair = io.read_image(folder, series=series)
    labels = np.zeros((6, 16, 20), np.uint8)
    labels[2, 2:5, 3:6], labels[3, 8:10, 1:12], labels[3, 0, 0], labels[1, 5, 5], labels[4, 10:14, 15:17] = 1, 2, 5, 5, 7
    labels[3, 12, 12] = 1
    values = (1, 2, 5, 7)
    segments = [Segment(v, f"call {v}", "", (255, 40, 40)) for v in values]
    made = dicom_seg.labelled_segmentation(flair, labels, series, segments, [], "DeepWML test", "TEST", "test")
    io.write_bytes(made.data, tmp_path / "s.dcm")
    ds = pydicom.dcmread(tmp_path / "s.dcm")
    chosen = [(1, 0), (1, 2), (1, 3), (1, 5), (2, 3), (3, 1), (3, 3), (4, 4)]  # (segment, slice k) in frame order
    assert made.frames == len(chosen) == int(ds.NumberOfFrames)
    assert [tuple(int(v) for v in i.FrameContentSequence[0].DimensionIndexValues)
            for i in ds.PerFrameFunctionalGroupsSequence] == [(n, k + 1) for n, k in chosen]
    seg = hd.seg.segread(tmp_path / "s.dcm")
    sources = source_images(folder)
    for number, value in enumerate(values, start=1):
        wanted = labels == value
        if how.startswith("enhanced"):
            (uid, source), = sources.items()
            where = [item.PlanePositionSequence[0].ImagePositionPatient for item in source.PerFrameFunctionalGroupsSequence]
            pixels = seg.get_pixels_by_source_frame(uid, list(range(1, 7)), segment_numbers=[number])[..., 0]
        else:
            uids = list(sources)
            where = [sources[uid].ImagePositionPatient for uid in uids]
            pixels = seg.get_pixels_by_source_instance(uids, segment_numbers=[number])[..., 0]
        ks = [flair.TransformPhysicalPointToIndex([float(v) for v in p])[2] for p in where]
        assert np.array_equal(pixels, wanted[ks].astype(pixels.dtype)), (how, number)
    volume = seg.get_volume(combine_segments=False)
    numbers = list(volume.get_channel_values(volume.channel_descriptors[0]))
    for s in range(volume.array.shape[0]):
        k = flair.TransformPhysicalPointToIndex((volume.affine @ np.array([s, 0, 0, 1.0]))[:3].tolist())[2]
        for c, number in enumerate(numbers):
            assert np.array_equal(volume.array[s, :, :, c], labels[k] == values[int(number) - 1]), (how, s, number)
    assert np.array_equal(sitk.GetArrayFromImage(io.read_mask(tmp_path / "s.dcm", flair)), (labels > 0).astype(np.uint8))


def test_bits_run_on_across_frames_first_pixel_lowest(tmp_path):
    """1-bit pixels: the frames' bits one run (a frame of 5 x 3 = 15 pixels does not start on a byte), the first
    pixel in the lowest bit, the bytes padded to an even count: read back by pydicom pixel for pixel."""
    image = sitk.GetImageFromArray((100 + np.random.default_rng(2).integers(0, 50, (3, 3, 5))).astype(np.int16))
    image.SetSpacing((1.0, 1.0, 3.0))
    folder = write_dicom_series(tmp_path / "tiny", image, description="FLAIR", extra=PATIENT)
    series, _ = io.choose_dicom_series(folder)
    flair = io.read_image(folder, series=series)
    rng = np.random.default_rng(3)
    bits = rng.integers(0, 2, (3, 3, 5)).astype(np.uint8)
    bits[0, 0, 0], bits[0, 0, 1] = 1, 0
    mask = sitk.GetImageFromArray(bits)
    mask.CopyInformation(flair)
    made = dicom_seg.segmentation(flair, mask, series, {})
    io.write_bytes(made.data, tmp_path / "s.dcm")
    ds = pydicom.dcmread(tmp_path / "s.dcm")
    assert len(ds.PixelData) == 6 and ds.PixelData[0] & 1 == 1 and ds.PixelData[0] & 2 == 0  # 45 bits: 6 bytes
    assert np.array_equal(frames_of(ds), bits)


def test_the_encoding_is_explicit_little_endian_with_even_values_and_a_right_group_length(tmp_path):
    """The file as bytes: preamble, DICM, the meta group's length the bytes of its elements, every element's
    length even, its tags ascending (pydicom reading it strictly, its raw elements walked here)."""
    folder = source_series(tmp_path / "flair", size=(13, 11, 3), extra={"0010|0010": "Müller^Jörg"})
    make_seg(folder, tmp_path / "s.dcm")
    data = (tmp_path / "s.dcm").read_bytes()
    assert data[:128] == bytes(128) and data[128:132] == b"DICM"
    import struct

    assert data[132:140] == b"\x02\x00\x00\x00UL\x04\x00"
    length = struct.unpack_from("<I", data, 140)[0]
    position = 144
    while position < 144 + length:
        group, _, vr = struct.unpack_from("<HH2s", data, position)
        assert group == 2
        size = (struct.unpack_from("<I", data, position + 8)[0] if vr in (b"OB", b"SQ", b"UN", b"UT")
                else struct.unpack_from("<H", data, position + 6)[0])
        position += (12 if vr in (b"OB", b"SQ", b"UN", b"UT") else 8) + size
    assert position == 144 + length and data[position:position + 2] == b"\x08\x00"  # the data set starts there

    def walk(ds):
        previous = -1
        for element in ds:
            assert element.tag > previous
            previous = element.tag
            if element.VR == "SQ":
                for item in element.value:
                    walk(item)

    with pydicom.config.strict_reading():
        ds = pydicom.dcmread(tmp_path / "s.dcm")
        walk(ds)
    from pydicom.filereader import data_element_generator
    from io import BytesIO

    raw = list(data_element_generator(BytesIO(data[position:]), False, True))
    assert all(element.length % 2 == 0 for element in raw)
    assert str(ds.PatientName) == "Müller^Jörg"


def _dciodvfy(path) -> list[str]:
    """dciodvfy's Error lines on the file at `path` (dicom3tools)."""
    # it echoes values (a UTF-8 name), which the locale's codec may not decode
    found = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, errors="replace", timeout=120)
    lines = (found.stdout + found.stderr).splitlines()
    assert any("Segmentation" in line for line in lines), lines  # it knew the object
    return [line for line in lines if line.startswith("Error")]


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) is not installed")
def test_dciodvfy_finds_no_error(tmp_path):
    """The standard's own validator (dicom3tools' dciodvfy; `apt-get install dicom3tools`) finds no error in the
    SEG of a classic series, of an enhanced multi-frame file, of an empty mask and of a source without its Type 2
    patient and study attributes; its warnings are listed in README."""
    folder = source_series(tmp_path / "flair", direction=rotation(0.12, -0.08, 0.3))
    make_seg(folder, tmp_path / "classic.dcm")
    image = phantom()
    write_enhanced_mr(tmp_path / "enhanced" / "f.dcm", image, frame_of_reference="1.2.3.77")
    make_seg(tmp_path / "enhanced", tmp_path / "enhanced.dcm")
    bare = write_dicom_series(tmp_path / "bare", phantom(), description="FLAIR", extra={"0020|0052": "1.2.3.78"})
    made, flair = make_seg(bare, tmp_path / "bare.dcm")
    series, _ = io.choose_dicom_series(bare)
    empty = sitk.Image(flair.GetSize(), sitk.sitkUInt8)
    empty.CopyInformation(flair)
    io.write_bytes(dicom_seg.segmentation(flair, empty, series, {}).data, tmp_path / "empty.dcm")
    for name in ("classic", "enhanced", "bare", "empty"):
        assert _dciodvfy(tmp_path / f"{name}.dcm") == [], name


def test_what_is_refused_before_anything_is_written(tmp_path):
    """A source without a Frame of Reference UID (the SEG could not be placed on it) or without SOP Instance UIDs
    (its frames could not name their images) is refused, naming --dicom-seg; a series without a study as the
    outline refuses it."""
    image = phantom(size=(13, 11, 3))
    folder = write_dicom_series(tmp_path / "nofor", image, description="FLAIR")
    series, _ = io.choose_dicom_series(folder)
    flair = io.read_image(folder, series=series)
    with pytest.raises(DeepWMLError, match=r"no Frame of Reference UID .*rerun without --dicom-seg"):
        dicom_seg.segmentation(flair, flair > 500, series, {})
    folder = write_enhanced_mr(tmp_path / "nouid" / "f.dcm", image, frame_of_reference="1.2.3.77").parent
    data = (folder / "f.dcm").read_bytes()
    # the SOP Instance UID's value made empty, its length 0 (the file meta's kept): a file that names no instance
    at = data.index(b"\x08\x00\x18\x00UI\x0c\x001.2.3.4.77.1")
    (folder / "f.dcm").write_bytes(data[:at] + b"\x08\x00\x18\x00UI\x00\x00" + data[at + 8 + 12:])
    series, _ = io.choose_dicom_series(folder)
    flair = io.read_image(folder, series=series)
    with pytest.raises(DeepWMLError, match=r"no SOP Instance UID.*--dicom-seg"):
        dicom_seg.segmentation(flair, flair > 500, series, {})


def test_segment_refuses_a_series_without_a_frame_of_reference_before_the_networks_run(tmp_path, tiny_model,
                                                                                        monkeypatch, capsys):
    """`deepwml segment --dicom-seg` of a DICOM series the SEG cannot be made of (no Frame of Reference UID), or
    `--dicom-outline` of one the outline cannot join (no Study Instance UID): refused from its headers before the
    networks run, as `deepwml change` refuses it, not after the whole segmentation was done for nothing."""
    from DeepWMLLib import segment

    def networks(*args, **kwargs):
        raise AssertionError("the networks ran")

    monkeypatch.setattr(segment, "segment_image", networks)
    nofor = write_dicom_series(tmp_path / "nofor", phantom(size=(13, 11, 3)), description="AX FLAIR")
    nostudy = write_dicom_series(tmp_path / "nostudy", phantom(size=(13, 11, 3)), description="AX FLAIR",
                                 extra={**PATIENT, "0020|000d": ""})
    common = ["--model", str(tiny_model), "--device", "cpu", "--no-brain-mask"]
    assert main(["segment", str(nofor), "-o", str(tmp_path / "o1"), "--dicom-seg", *common]) == 1
    assert main(["segment", str(nostudy), "-o", str(tmp_path / "o2"), "--dicom-outline", *common]) == 1
    err = capsys.readouterr().err
    assert "the networks ran" not in err
    assert "no Frame of Reference UID (0020,0052), so a DICOM SEG could not be placed on it" in err
    assert "no Study Instance UID, so the outline series cannot join its study" in err
    assert not list((tmp_path / "o1").glob("nofor*")) and not list((tmp_path / "o2").glob("nostudy*"))


def test_a_rerun_adding_a_seg_and_a_probability_map_refuses_the_series_before_the_networks_run_again(
        tmp_path, tiny_model, monkeypatch, capsys):
    """A case segmented before, rerun with --dicom-seg and --save-probabilities (added from the saved mask, the
    networks run again for the map): a series without a Frame of Reference UID was refused only after the networks
    had run again; now from its headers first, as a full run refuses it, nothing added."""
    from DeepWMLLib import segment

    nofor = write_dicom_series(tmp_path / "nofor", phantom(size=(13, 11, 3)), description="AX FLAIR")
    out = tmp_path / "out"
    args = ["segment", str(nofor), "-o", str(out), "--model", str(tiny_model), "--device", "cpu", "--no-brain-mask"]
    assert main(args) == 0
    before = sorted(p.name for p in out.iterdir())
    capsys.readouterr()

    def networks(*args, **kwargs):
        raise AssertionError("the networks ran")

    monkeypatch.setattr(segment, "segment_image", networks)
    assert main(args + ["--dicom-seg", "--save-probabilities"]) == 1
    err = capsys.readouterr().err
    assert "the networks ran" not in err
    assert "no Frame of Reference UID (0020,0052), so a DICOM SEG could not be placed on it" in err
    assert sorted(p.name for p in out.iterdir()) == before


def test_segment_writes_it_beside_the_outline_and_says_why_not_for_other_inputs(tmp_path, tiny_model, capsys):
    """`deepwml segment --dicom-seg --dicom-outline`: both, listed in the report; the SEG's frames the mask file's
    slices holding a voxel (and the first and last); a NIfTI input segmented with a warning and no SEG; a rerun skips the case, --overwrite makes a new
    SEG (a new instance), and a rerun with --overwrite without --dicom-seg removes the earlier one, listed in its
    report; an earlier SEG without its report is an incomplete set."""
    folder = source_series(tmp_path / "flair", direction=rotation(0.12, -0.08, 0.3))
    plain, _ = make_volume(size=(32, 32, 4))
    sitk.WriteImage(sitk.Cast(plain, sitk.sitkUInt16), str(tmp_path / "plain.nii.gz"))
    out = tmp_path / "out"
    args = ["segment", str(folder), str(tmp_path / "plain.nii.gz"), "-o", str(out), "--model", str(tiny_model),
            "--device", "cpu", "--no-brain-mask"]
    assert main(args + ["--dicom-seg", "--dicom-outline"]) == 0
    report = json.loads((out / "flair_report.json").read_text(encoding="utf-8"))
    assert {"flair_wmh_seg.dcm", "flair_outline_dicom"} <= set(report["outputs"])
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "flair_wmh.nrrd")))
    framed = framed_slices(mask)
    assert report["dicom_seg"]["file"] == "flair_wmh_seg.dcm" and report["dicom_seg"]["frames"] == len(framed)
    assert report["dicom_outline"]["images"] == 7 and report["dicom_outline"]["series_number"] == 1007
    assert report["dicom_seg"]["series_number"] == 2007
    ds = pydicom.dcmread(out / "flair_wmh_seg.dcm")
    assert ds.SOPInstanceUID == report["dicom_seg"]["sop_instance_uid"]
    assert ds.SeriesInstanceUID == report["dicom_seg"]["series_uid"] != report["dicom_outline"]["series_uid"]
    assert np.array_equal(frames_of(ds), mask[framed]) and mask.any()
    assert f"{report['volume_ml']:.2f} ml" in ds.SegmentSequence[0].SegmentDescription
    plain_report = json.loads((out / "plain_report.json").read_text(encoding="utf-8"))
    assert "dicom_seg" not in plain_report and not (out / "plain_wmh_seg.dcm").exists()
    assert any(w.startswith("no DICOM SEG: the input is not DICOM") for w in plain_report["warnings"])
    assert "no DICOM SEG" in capsys.readouterr().err
    # a rerun: skipped, the SEG untouched
    written = (out / "flair_wmh_seg.dcm").stat().st_mtime_ns
    assert main(args + ["--dicom-seg"]) == 0
    assert (out / "flair_wmh_seg.dcm").stat().st_mtime_ns == written
    with open(out / "summary.csv", newline="", encoding="utf-8-sig") as f:
        assert {r["case"]: r["status"] for r in csv.DictReader(f)}["flair"] == "skipped"
    # --overwrite: a new instance in a new series; no temporary file left
    assert main(args + ["--dicom-seg", "--overwrite"]) == 0
    again = pydicom.dcmread(out / "flair_wmh_seg.dcm")
    assert again.SOPInstanceUID != ds.SOPInstanceUID and again.SeriesInstanceUID != ds.SeriesInstanceUID
    assert not [p for p in out.iterdir() if p.name.startswith(".") and "deepwml-lock" not in p.name]
    assert not (out / "flair_outline_dicom").exists()  # not asked for this time: removed, as its report listed it
    # --overwrite without --dicom-seg: the earlier SEG goes
    assert main(args + ["--overwrite"]) == 0
    assert not (out / "flair_wmh_seg.dcm").exists()
    # a SEG without its report: an incomplete set, refused without --overwrite
    for path in out.glob("flair*"):
        path.unlink() if path.is_file() else shutil.rmtree(path)
    (out / "flair_wmh_seg.dcm").write_bytes(b"an earlier run's")
    assert main(args[:2] + args[3:] + ["--dicom-seg"]) == 1
    with open(out / "summary.csv", newline="", encoding="utf-8-sig") as f:
        assert "incomplete set of outputs (flair_wmh_seg.dcm" in next(csv.DictReader(f))["error"]


def test_a_rerun_asking_for_the_seg_and_outline_of_an_export_adds_them_from_the_saved_mask(tmp_path, tiny_model,
                                                                                           monkeypatch):
    """A PACS export segmented without --dicom-seg, rerun with it and --dicom-outline: the SEG and the outline series
    are made from the saved mask, no network run (the SEG's frames are the saved mask's slices), the mask and
    segmentation untouched, the report listing and describing both, the row `added`; the SEG deleted later is made
    again by a rerun asking for it (it is no part of the result a rerun requires)."""
    from DeepWMLLib import segment

    export = tmp_path / "export"
    source_series(export / "patientA" / "flair", direction=rotation(0.12, -0.08, 0.3))
    out = tmp_path / "out"
    args = ["segment", str(export), "-o", str(out), "--model", str(tiny_model), "--device", "cpu", "--no-brain-mask"]
    assert main(args) == 0
    kept = {name: (out / name).read_bytes() for name in ("patientA_flair_wmh.nrrd", "patientA_flair.seg.nrrd")}

    def refused(*args, **kwargs):
        raise AssertionError("the networks were run")

    with monkeypatch.context() as patched:
        patched.setattr(segment, "segment_image", refused)
        assert main(args + ["--dicom-seg", "--dicom-outline"]) == 0
    for name, data in kept.items():
        assert (out / name).read_bytes() == data, name
    with open(out / "summary.csv", newline="", encoding="utf-8-sig") as f:
        row = next(csv.DictReader(f))
    assert row["status"] == "added"
    assert row["error"].startswith("added patientA_flair_outline_dicom, patientA_flair_wmh_seg.dcm from the saved "
                                   "patientA_flair_wmh.nrrd")
    report = json.loads((out / "patientA_flair_report.json").read_text(encoding="utf-8"))
    assert {"patientA_flair_wmh_seg.dcm", "patientA_flair_outline_dicom"} <= set(report["outputs"])
    assert report["dicom_seg"]["frames"] == 7 and report["dicom_outline"]["images"] == 7
    ds = pydicom.dcmread(out / "patientA_flair_wmh_seg.dcm")
    assert ds.SOPInstanceUID == report["dicom_seg"]["sop_instance_uid"]
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "patientA_flair_wmh.nrrd")))
    assert np.array_equal(frames_of(ds), mask) and mask.any()
    assert f"{report['volume_ml']:.2f} ml" in ds.SegmentSequence[0].SegmentDescription
    assert len(list((out / "patientA_flair_outline_dicom").glob("IM*.dcm"))) == 7
    # nothing missing: skipped
    assert main(args + ["--dicom-seg", "--dicom-outline"]) == 0
    with open(out / "summary.csv", newline="", encoding="utf-8-sig") as f:
        assert next(csv.DictReader(f))["status"] == "skipped"
    # the SEG deleted (it was required as if it were the mask: "deleted? rerun with --overwrite"): made again
    (out / "patientA_flair_wmh_seg.dcm").unlink()
    assert main(args + ["--dicom-seg"]) == 0
    assert np.array_equal(frames_of(pydicom.dcmread(out / "patientA_flair_wmh_seg.dcm")), mask)


def test_segment_and_evaluate_read_back_the_seg_of_an_unevenly_spaced_series(tmp_path, tiny_model):
    """`deepwml segment --dicom-seg` of a series unevenly spaced (read with a warning): its SEG given to `deepwml
    evaluate` as the reference against the saved mask gives the same mask (it was refused: frames between slices)."""
    image = phantom(spacing=(0.7, 0.9, 5.0))
    folder = write_dicom_series(tmp_path / "export" / "flair", image, uid="1.2.3.4.5", description="AX T2 FLAIR",
                                number=7, extra=PATIENT,
                                positions=stepped_positions(image, [5.0, 5.6, 4.4, 5.0, 5.8, 4.2]))
    out = tmp_path / "out"
    assert main(["segment", str(folder), "-o", str(out), "--model", str(tiny_model), "--device", "cpu",
                 "--no-brain-mask", "--dicom-seg"]) == 0
    report = json.loads(next(out.glob("*_report.json")).read_text(encoding="utf-8"))
    assert any("unevenly spaced" in w for w in report["warnings"])
    seg, saved = next(out.glob("*_wmh_seg.dcm")), next(out.glob("*_wmh.nrrd"))
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(saved)))
    assert np.array_equal(sitk.GetArrayFromImage(io.read_mask(seg, io.read_image(folder))), mask)
    assert main(["evaluate", "--prediction", str(saved), "--reference", str(seg), "--json", str(tmp_path / "e.json")]) == 0
    result = json.loads((tmp_path / "e.json").read_text(encoding="utf-8"))
    assert mask.any() and result["dice"] == 1.0 and result["prediction_volume_ml"] == result["reference_volume_ml"]


def test_a_seg_written_inside_the_export_leaves_the_case_as_it_was(tmp_path, tiny_model):
    """-o inside a PACS export with --dicom-seg: the SEG joins the study on disk (Modality SEG, never a FLAIR
    candidate), yet the next run finds the same case, whose outputs exist: skipped."""
    export = tmp_path / "export"
    source_series(export / "patientA" / "flair")
    out = export / "results"
    args = ["segment", str(export), "-o", str(out), "--model", str(tiny_model), "--device", "cpu", "--dicom-seg",
            "--no-brain-mask"]
    assert main(args) == 0
    assert (out / "patientA_flair_wmh_seg.dcm").is_file()
    assert main(args) == 0
    with open(out / "summary.csv", newline="", encoding="utf-8-sig") as f:
        assert [(r["case"], r["status"]) for r in csv.DictReader(f)] == [("patientA_flair", "skipped")]


def test_a_seg_back_in_its_folder_is_never_taken_for_the_flair(tmp_path):
    """Sent to PACS and exported again beside the FLAIR's images, the SEG, whose description holds the FLAIR's, is
    Modality SEG: never a FLAIR candidate, nor chosen by the description both share."""
    folder = source_series(tmp_path / "flair")
    made, _ = make_seg(folder, folder / "seg.dcm")
    flair, how = io.choose_dicom_series(folder)
    assert flair.uid == "1.2.3.4.5" and how == "the only one of 2 series that looks like a FLAIR"
    assert io.choose_dicom_series(folder, "flair")[0].uid == "1.2.3.4.5"  # the SEG's "(AX T2 FLAIR)" too
    chosen = io.choose_dicom_series(folder, str(made.series_number))[0]
    assert chosen.uid == made.series_uid and chosen.derived and not flair.derived


def test_an_outdir_holding_a_seg_given_as_input_is_named_as_outputs_and_a_lone_seg_as_no_flair(tmp_path, tiny_model):
    """OUTDIR given for the scans: its SEG, a DICOM file, made it a DICOM folder whose only series (the SEG) was read
    as the FLAIR and refused as 'a label mask'; it is the earlier run's outputs, as a folder of its mask files is
    called. A SEG alone in a folder (sent back from PACS) is refused as a segmentation, not read as a scan."""
    folder = source_series(tmp_path / "flair")
    out = tmp_path / "out"
    args = ["--model", str(tiny_model), "--device", "cpu", "--no-brain-mask"]
    assert main(["segment", str(folder), "-o", str(out), "--dicom-seg"] + args) == 0
    assert main(["segment", str(out), "-o", str(tmp_path / "again")] + args) == 1
    with open(tmp_path / "again" / "summary.csv", newline="", encoding="utf-8-sig") as f:
        error = next(csv.DictReader(f))["error"]
    assert "holds only the outputs of an earlier DeepWML run (1 case(s): flair)" in error
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(out / "flair_wmh_seg.dcm", alone / "seg.dcm")
    with pytest.raises(DeepWMLError, match=r"holds only a DICOM Segmentation \(Modality SEG.*not a scan"):
        io.choose_dicom_series(alone)


@pytest.mark.shared
def test_a_real_flair_as_a_dicom_series(tmp_path, shared_data):
    """A clinical FLAIR (oblique, 320 x 320 x 36), written as a DICOM series: the SEG of a mask of its brightest
    voxels has each frame equal to that mask on the source image it names, read by pydicom, a frame on each slice
    holding a voxel (and the first and last), none on the others; read back, the mask; its size and the time to
    make it are what README states (a frame of 320 x 320 bits is 12.5 kB)."""
    scan = sitk.ReadImage(str(shared_data / "open_ms" / "clinical_flair" / "patient01_study1.nii.gz"))
    scan = sitk.Cast(scan, sitk.sitkInt16)
    values = sitk.GetArrayViewFromImage(scan)
    level = int(np.percentile(values[values > 0], 99.5))
    folder = write_dicom_series(tmp_path / "flair", scan, description="AX FLAIR", extra=PATIENT)
    series, _ = io.choose_dicom_series(folder)
    flair = io.read_image(folder, series=series)
    mask = sitk.Cast(flair >= level, sitk.sitkUInt8)
    start = time.perf_counter()
    made = dicom_seg.segmentation(flair, mask, series, {})
    seconds = time.perf_counter() - start
    io.write_bytes(made.data, tmp_path / "s.dcm")
    ds = check_against_sources(tmp_path / "s.dcm", folder, lesion=level)
    framed = framed_slices(sitk.GetArrayViewFromImage(mask))
    assert int(ds.NumberOfFrames) == len(framed) < 36
    assert frames_of(ds).sum() == sitk.GetArrayViewFromImage(mask).sum() > 0
    assert np.array_equal(sitk.GetArrayFromImage(io.read_mask(tmp_path / "s.dcm", flair)),
                          sitk.GetArrayViewFromImage(mask))
    assert len(made.data) < len(framed) * 320 * 320 / 8 + 100_000 and seconds < 10


def test_a_study_of_an_export_holding_only_a_seg_is_skipped_as_no_flair_exam(tmp_path, tiny_model):
    """An export (several studies) with a study whose only series is a SEG (sent back from PACS without its images):
    that study is no FLAIR exam, skipped as an export's other exams are (io.NoFlairSeries); the lone-SEG refusal
    made it the case's error and the run exit 1."""
    pydicom = pytest.importorskip("pydicom")
    export = tmp_path / "export"
    folder = source_series(export / "A")
    make_seg(folder, tmp_path / "seg.dcm")
    ds = pydicom.dcmread(tmp_path / "seg.dcm")
    ds.StudyInstanceUID = "1.2.3.99"  # another exam's
    (export / "B").mkdir()
    ds.save_as(export / "B" / "IM0001")
    with pytest.raises(io.NoFlairSeries, match=r"holds only a DICOM Segmentation"):
        io.choose_dicom_series(export / "B", strict=True)
    out = tmp_path / "out"
    assert main(["segment", str(export), "-o", str(out), "--model", str(tiny_model), "--device", "cpu",
                 "--no-brain-mask"]) == 0
    with open(out / "summary.csv", newline="", encoding="utf-8-sig") as f:
        rows = {row["case"]: row for row in csv.DictReader(f)}
    assert sorted(row["status"] for row in rows.values()) == ["ok", "skipped"], rows
