"""Large scans (1024 x 1024 in-plane, hundreds of slices, float64): `deepwml segment` keeps one copy of
what it must hold, not several, and a scan that does not fit in memory fails with one clear line. The
figures measured on a 1024 x 1024 x 400 float64 scan are in README ("Large scans")."""

from __future__ import annotations

import csv
import gzip
import os
import re
import struct
import time
import tracemalloc

import numpy as np
import pytest
import SimpleITK as sitk

from DeepWMLLib import contrast, inference, io, postprocessing, qc, volume
from DeepWMLLib.cli import main
from DeepWMLLib.errors import DeepWMLError
from DeepWMLLib.segment import segment_cases, segment_image
from DeepWMLLib.volume import Volume, nifti_bytes, parse_nifti

from conftest import located_by_the_whole_map, make_volume, write_dicom_series


def _peak_bytes(function, *args):
    """(result, the most memory Python and numpy held at once during the call, beyond what they held before)."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        result = function(*args)
        return result, tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()


def test_a_compressed_nifti_is_read_into_one_buffer_not_pieces_then_joined(tmp_path, monkeypatch):
    """gzip's read() collects the decompressed pieces and joins them: for a moment the voxels twice (6.4 GB of
    the 9.3 GB peak on a 1024 x 1024 x 400 float64 scan). They are read into one buffer the header sizes, a
    piece at a time (16 MiB; 1 MiB here, for a test file of 5 MB)."""
    monkeypatch.setattr(io, "READ_PIECE", 1 << 20, raising=False)
    rng = np.random.default_rng(0)
    array = np.round(rng.random((40, 128, 128)) * 1000)  # float64, 5.2 MB, compresses to a few MB
    image = sitk.GetImageFromArray(array)
    path = tmp_path / "scan.nii.gz"
    path.write_bytes(gzip.compress(nifti_bytes(image, compresslevel=0), compresslevel=1))
    data, peak = _peak_bytes(io._nifti_data, path)
    assert len(data) == 352 + array.nbytes
    assert np.array_equal(np.frombuffer(data, "<f8", offset=352).reshape(array.shape), array)
    assert peak < 1.25 * len(data), f"{peak / len(data):.2f} times the file's bytes held at once"
    volume = io.read_image(path, light=True)
    assert np.array_equal(volume.array, array.astype(np.float32))


def test_a_truncated_compressed_nifti_is_still_named_so(tmp_path):
    image = sitk.GetImageFromArray(np.arange(4 * 30 * 30, dtype=np.float64).reshape(4, 30, 30))
    path = tmp_path / "cut.nii.gz"
    path.write_bytes(gzip.compress(nifti_bytes(image, compresslevel=0)[:-500]))
    with pytest.raises(DeepWMLError, match="truncated"):
        io.read_image(path, light=True)


def test_a_header_announcing_more_than_the_file_holds_gets_no_buffer_of_that_size(tmp_path):
    """A header that says 30000 x 30000 x 30000 float64 (216 TB) over a few kB: the truncation message, not an
    attempt to make room for it (the file is read as it is, as before)."""
    import struct

    raw = bytearray(nifti_bytes(sitk.GetImageFromArray(np.ones((4, 5, 6))), compresslevel=0))
    struct.pack_into("<3h", raw, 42, 30000, 30000, 30000)
    for name, content in (("huge.nii", bytes(raw)), ("huge.nii.gz", gzip.compress(bytes(raw)))):
        (tmp_path / name).write_bytes(content)
        assert len(io._nifti_data(tmp_path / name)) == len(raw)
        with pytest.raises(DeepWMLError, match="truncated"):
            io.read_image(tmp_path / name, light=True)


def test_the_networks_read_a_float32_scan_where_it_lies():
    """The axial stack the networks read is a read-only view of a float32 scan's voxels (the volume twice
    before: 1.6 GB more at 1024 x 1024 x 400); other types still come as one float32 copy."""
    image, _ = make_volume(size=(20, 24, 6))
    array = sitk.GetArrayViewFromImage(image)
    view, frame = io.to_axial_stack(image, copy=False)
    copied, _ = io.to_axial_stack(image)
    assert np.shares_memory(view, array) and not view.flags.writeable
    assert np.array_equal(view, copied) and not np.shares_memory(copied, array)
    as_int, _ = io.to_axial_stack(sitk.Cast(image, sitk.sitkUInt16), copy=False)
    assert as_int.dtype == np.float32 and as_int.flags.writeable


@pytest.mark.parametrize("kind", [sitk.sitkUInt16, sitk.sitkInt16, sitk.sitkFloat64])
def test_a_scan_of_another_voxel_type_is_segmented_without_a_float32_copy_of_it(tmp_path, tiny_model, monkeypatch, kind):
    """The Slicer module gives segment_image the volume node's voxels in their own type (uint16 or int16 for most
    FLAIRs, sometimes float64), as Python callers do: the networks read a float32 copy of the whole volume, 4 bytes a
    voxel beside the caller's scan through the networks (11.0 bytes a voxel at the peak of a 512 x 512 x 200 uint16
    scan's run, 7.0 for the same scan as float32). Read as float32 a few slices at a time: the same mask, map, brain
    mask and report, and no more memory than the scan as float32 takes."""
    from DeepWMLLib import preprocessing
    from DeepWMLLib.segment import load_brain_model, load_models

    from conftest import BRAIN_LABELS, tiny_model_file

    # a chunk's own buffers and a slab's float32 values small beside the volume's (a few slices of a large scan's)
    monkeypatch.setattr(inference, "CHUNK_SLICES", 4)
    monkeypatch.setattr(preprocessing, "SLAB_VOXELS", 1 << 16, raising=False)
    models = load_models([tiny_model])
    brain = load_brain_model(str(tiny_model_file(tmp_path / "brain.pt", labels=BRAIN_LABELS, seed=3)))
    given = sitk.Cast(make_volume(size=(256, 256, 40), spacing=(0.9, 0.9, 2.0), dtype=sitk.sitkUInt16)[0], kind)
    as_float32 = sitk.Cast(given, sitk.sitkFloat32)  # the same values
    # threshold 0.9: the untrained network marks half the head at 0.5, and labelling that would be the peak
    options = dict(brain_model=brain, ventricle_model=None, backend="torch", threshold=0.9, checked=True)
    segment_image(given[:, :, :4], models, "cpu", **options)  # the runners made: no part of either peak
    results, peaks = [], []
    for image in (as_float32, given):
        result, peak = _peak_bytes(lambda: segment_image(image, models, "cpu", **options))
        results.append(result)
        peaks.append(peak / image.GetNumberOfPixels())
    expected, result = results
    for name in ("mask", "probabilities", "brain"):
        a, b = (sitk.GetArrayViewFromImage(getattr(r, name)) for r in (expected, result))
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), name
    assert {**expected.report, "seconds": 0} == {**result.report, "seconds": 0}
    assert peaks[1] < peaks[0] + 1.0, f"{peaks[1]:.1f} bytes a voxel, {peaks[0]:.1f} for the scan as float32"


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="the process's peak is reset through Linux's /proc")
def test_a_simpleitk_scans_probability_map_is_not_held_twice_to_make_its_image(tiny_model, monkeypatch):
    """SimpleITK makes an image's voxels only as a copy of numpy's: the probability map's image was made from the
    networks' whole map while it was held, 4 bytes a voxel more at the peak of a SimpleITK scan's run (10.0-10.6 bytes
    a voxel of a 512 x 512 x 200 uint16 clinical scan; the Slicer module's and Python callers' way in). The networks'
    slices are written into the image as they are done (SimpleITK's paste in place): the same map and mask as the
    scan's as a Volume, and no second map."""
    from DeepWMLLib import preprocessing

    from conftest import resident_peak

    # a chunk's own buffers and a slab's float32 values small beside the volume's (a few slices of a large scan's)
    monkeypatch.setattr(inference, "CHUNK_SLICES", 4)
    monkeypatch.setattr(preprocessing, "SLAB_VOXELS", 1 << 16, raising=False)
    n, rows, cols = 48, 512, 512  # the map (50 MB) is allocated apart from the rest of the heap, as a large scan's
    j, i = np.ogrid[:rows, :cols]
    array = np.full((n, rows, cols), 20, np.uint16)  # air
    array[:, ((j - 256) / 220.0) ** 2 + ((i - 256) / 190.0) ** 2 < 1] = 300  # the head
    array[40:] = 20  # slices without head, which the networks do not run: 0 in the map
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.45, 0.45, 1.0))
    image.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))  # as Slicer's and NIfTI files' axial scans: rows, columns flipped
    models = [str(tiny_model)]
    # threshold 0.9: the untrained network marks half the head at 0.5, and labelling that would be the peak
    options = dict(brain_model=None, ventricle_model=None, backend="torch", threshold=0.9, checked=True)
    segment_image(image[:, :, :4], models, "cpu", **options)  # the runner made: no part of the peak
    result, peak = resident_peak(lambda: segment_image(image, models, "cpu", **options))
    # the lower of two runs' peaks: a CI worker once measured 7.2 bytes a voxel where this file alone measures 5.25
    # every time (something else of that process, a thread another test left ending, allocating at the same moment);
    # the map held twice is in every run
    peak = min(peak, resident_peak(lambda: segment_image(image, models, "cpu", **options))[1])
    volume = segment_image(Volume(array, image.GetSpacing(), image.GetOrigin(), image.GetDirection()), models, "cpu",
                           **options)
    for name in ("mask", "probabilities"):
        assert sitk.GetArrayViewFromImage(getattr(result, name)).tobytes() == getattr(volume, name).array.tobytes()
    assert result.probabilities.GetPixelID() == sitk.sitkFloat32
    assert {**result.report, "seconds": 0} == {**volume.report, "seconds": 0}
    # 5.3 bytes a voxel here (the map, 4, the mask and the rest of post-processing), 9.3 with the map held twice
    assert peak < 7.0 * array.size, f"{peak / array.size:.1f} bytes a voxel"


def test_the_contrast_check_holds_no_float_map_of_the_whole_volume(monkeypatch):
    """The depth under the brain's surface is measured on 2 mm blocks; the bands it decides (deep brain,
    cortical shell) come back to the voxels a slice at a time: the float32 map of the whole volume and its
    copies were 8.6 bytes a voxel at 0.25 mm pixels (3.2 GB at 1024 x 1024 x 400), 13 with the background check;
    then the two bands over the whole volume, a byte a voxel each (0.8 GB), held to the check's end, the peak of
    such a scan's memory. The voxels outside the brain are counted 16 M at a time (256 K here, for a volume of
    7.7 M), not copied out all at once."""
    monkeypatch.setattr(contrast, "SLAB_VOXELS", 1 << 18, raising=False)
    n, rows, cols = 48, 400, 400
    k, j, i = np.ogrid[:n, :rows, :cols]
    r2 = ((k - 24) * 2.0) ** 2 + ((j - 200) * 0.25) ** 2 + ((i - 200) * 0.25) ** 2
    inside = r2 < 46 ** 2
    stack = np.where(inside, 100 + np.sin(i * 0.3) * 5, 0).astype(np.float32)
    stack[r2 < 12 ** 2] = 20  # dark ventricles
    check, peak = _peak_bytes(contrast.flair_contrast, stack, inside, np.zeros_like(inside), (2.0, 0.25, 0.25))
    assert check["looks_like"] == "FLAIR", check
    assert peak < 2.5 * stack.size, f"{peak / stack.size:.1f} bytes a voxel"  # 3.5 with the bands over the whole volume


def test_the_image_black_is_found_without_copies_of_its_sample():
    """image_black partially sorted copies of its sample of the scan (a voxel in 18) and of the voxels above its
    black: 0.1 GB each at 1024 x 1024 x 400, at the peak of the FLAIR check on such a scan. Its own sample is sorted
    in place now: the same black, the scan untouched."""
    rng = np.random.default_rng(0)
    stack = (rng.random((40, 600, 600)) * 1500).astype(np.float32)
    stack[:, :, :150] = 0  # the air around the head
    before = stack.copy()
    black, peak = _peak_bytes(contrast.image_black, stack)
    sample = stack[::2, ::3, ::3]
    assert black == 0.0 and np.array_equal(stack, before)
    assert peak < 2.2 * sample.nbytes, f"{peak / sample.nbytes:.2f} samples held at once"  # 2.5 before


def test_the_dark_background_is_counted_in_slabs_of_a_few_slices():
    """The voxels outside the brain were counted 16 M at a time: a slab's copy of them, the indices numpy picks them
    by and their difference from the black, 7 bytes a voxel (0.11 GB at the peak of a 1024 x 1024 x 400 scan's run).
    4 M at a time (four such slices): the same shares, each level's (a CT's air and bone, a FLAIR's dark) counted on
    the same pick of the voxels."""
    rng = np.random.default_rng(1)
    stack = (rng.random((8, 1024, 1024)) * 1000).astype(np.float32)
    inside = np.zeros(stack.shape, bool)
    inside[:, 256:768, 256:768] = True
    shares, peak = _peak_bytes(contrast._dark_shares_outside, stack, inside, [(0.0, 100.0), (50.0, 300.0)])
    outside = stack[~inside]
    assert shares == [np.count_nonzero(outside < 100.0) / outside.size,
                      np.count_nonzero(outside - 50.0 < 300.0) / outside.size]
    assert peak < stack.nbytes, f"{peak / stack.nbytes:.2f} times the scan held at once"  # 1.69 the whole stack at once


def test_running_out_of_memory_is_one_clear_line_naming_the_scan_size(monkeypatch):
    """numpy's MemoryError ("Unable to allocate 1.56 GiB ...") reached the user as an internal error."""
    image, _ = make_volume(size=(48, 40, 10))

    def no_memory(*args, **kwargs):
        raise MemoryError("Unable to allocate 1.56 GiB for an array with shape (400, 1024, 1024) and data type float32")

    monkeypatch.setattr(inference, "predict_maps", no_memory)
    with pytest.raises(DeepWMLError) as info:
        segment_image(image, brain_model=None, ventricle_model=None)
    message = str(info.value)
    assert message.startswith("not enough memory for this scan (48 x 40 x 10 voxels") and "\n" not in message
    assert "more memory" in message


def test_running_out_of_memory_while_reading_fails_the_case_with_that_said(tmp_path, tiny_model, monkeypatch):
    image, _ = make_volume(size=(32, 32, 4))
    path = tmp_path / "big.nii.gz"
    sitk.WriteImage(image, str(path))

    def no_memory(*args, **kwargs):
        raise MemoryError()

    monkeypatch.setattr(io, "read_image", no_memory)
    out = tmp_path / "out"
    assert main(["segment", str(path), "-o", str(out), "--model", str(tiny_model), "--device", "cpu"]) == 1
    with open(out / "summary.csv", newline="", encoding="utf-8-sig") as f:
        row = next(csv.DictReader(f))
    assert row["status"] == "error" and row["error"].startswith("not enough memory"), row["error"]
    assert "internal error" not in row["error"]


def test_the_progress_bar_says_the_scan_is_being_read(tmp_path, tiny_model):
    """Reading and checking a 1024 x 1024 x 400 .nii.gz takes half a minute (2 cores), which the bar spent
    silent before its first message ("normalising")."""
    image, _ = make_volume(size=(32, 32, 4))
    path = tmp_path / "scan.nii.gz"
    sitk.WriteImage(image, str(path))
    messages = []

    def factory(number, total, case):
        return lambda fraction, message: messages.append((fraction, message))

    factory.finish = lambda row: None
    rows = segment_cases([str(path)], tmp_path / "out", [str(tiny_model)], "cpu", progress_factory=factory)
    assert rows[0]["status"] == "ok", rows
    assert messages[0] == (0.0, "reading the scan"), messages[:3]


@pytest.mark.parametrize("name", ["scan.nii.gz", "scan.nii"])
def test_the_bar_moves_while_the_scan_is_read(tmp_path, monkeypatch, name):
    """A 1024 x 1024 x 400 .nii.gz showed 0 % "reading the scan" for the 14 s it took to read, not moving. The
    reading is told the fraction of the file's bytes read after each piece (16 MiB; 64 KiB here), and
    `deepwml segment` shows it in the reading's share of the bar."""
    from DeepWMLLib import segment

    monkeypatch.setattr(io, "READ_PIECE", 1 << 16, raising=False)
    rng = np.random.default_rng(5)
    array = np.round(rng.random((16, 64, 64)) * 1000)  # float64, 512 KiB: 8 pieces
    raw = nifti_bytes(sitk.GetImageFromArray(array), compresslevel=0)
    path = tmp_path / name
    path.write_bytes(gzip.compress(raw, compresslevel=1) if name.endswith(".gz") else raw)
    told = []
    volume = io.read_image(path, light=True, reading=told.append)
    assert np.array_equal(volume.array, array.astype(np.float32))
    assert len(told) >= 7 and told == sorted(told) and len(set(told)) == len(told), told
    assert 0 < told[0] < 0.2 and told[-1] == 1.0, told

    messages = []

    def read_image(*args, **kwargs):
        kwargs["reading"](0.5)  # halfway through the file
        raise DeepWMLError("stop after reading")

    monkeypatch.setattr(io, "read_image", read_image)
    rows = segment.segment_cases([str(path)], tmp_path / "out", None, "cpu", ventricle_model=None,
                                 progress_factory=_recorder(messages))
    assert rows[0]["status"] == "error", rows
    assert messages[:2] == [(0.0, "reading the scan"), (segment.READING_SHARE * 0.5, "reading the scan")], messages
    assert 0 < segment.READING_SHARE < segment.SEGMENTING_SHARE


def test_the_bar_moves_while_a_dicom_series_is_read(tmp_path):
    """A DICOM series read through SimpleITK told the bar nothing until all its files were read: it is told
    file by file now, never backwards, ending at 1."""
    image = make_volume(size=(32, 32, 12), dtype=sitk.sitkInt16)[0]
    folder = write_dicom_series(tmp_path / "series", image)
    told = []
    volume = io.read_image(folder, reading=told.append)
    assert volume.GetSize() == (32, 32, 12)
    assert len(told) >= 12 and told == sorted(told) and len(set(told)) == len(told), told
    assert 0 <= told[0] < 0.2 and told[-1] == 1.0, told


@pytest.mark.parametrize("name", ["scan.nrrd", "scan.mha", "scan.hdr"])
def test_other_files_tell_their_reading_too(tmp_path, monkeypatch, name):
    """NRRD and MetaImage files (read by SimpleITK, whose readers of them say nothing between their start and
    end) and NIfTI pairs (read a piece at a time, 64 KiB here) told the bar nothing: now their start and end, the
    pair's every piece, never backwards, ending at 1."""
    monkeypatch.setattr(io, "READ_PIECE", 1 << 16, raising=False)
    image = make_volume(size=(64, 64, 16))[0]  # float32, 256 KiB: 4 pieces
    sitk.WriteImage(image, str(tmp_path / name))
    told = []
    io.read_image(tmp_path / name, light=True, reading=told.append)
    assert told == sorted(told) and len(set(told)) == len(told) and told[-1] == 1.0, told
    assert len(told) >= (4 if name.endswith(".hdr") else 2) and told[0] < 0.5, told


def test_a_reading_that_says_nothing_still_shows_it_is_reading(tmp_path, monkeypatch):
    """While the reading tells nothing (SimpleITK reading a large NRRD or MetaImage file: seconds), the bar said
    "reading the scan" at 0 %, frozen; now its message counts the seconds, the bar where the reading left it, in
    the reading's share, never backwards, and nothing is told once the reading has ended."""
    from DeepWMLLib import segment

    monkeypatch.setattr(segment, "READING_TICK_S", 0.05, raising=False)
    path = tmp_path / "scan.nrrd"
    sitk.WriteImage(make_volume()[0], str(path))
    messages = []

    def read_image(*args, **kwargs):
        time.sleep(0.4)  # a read that says nothing
        kwargs["reading"](0.3)
        time.sleep(0.4)
        raise DeepWMLError("stop after reading")

    monkeypatch.setattr(io, "read_image", read_image)
    rows = segment.segment_cases([str(path)], tmp_path / "out", None, "cpu", ventricle_model=None,
                                 progress_factory=_recorder(messages))
    assert rows[0]["status"] == "error", rows
    count = len(messages)
    time.sleep(0.3)
    assert len(messages) == count, messages[count:]  # the ticking stopped with the reading
    fractions = [f for f, _ in messages]
    assert fractions == sorted(fractions) and max(fractions) <= segment.READING_SHARE, messages
    assert messages[0] == (0.0, "reading the scan"), messages
    ticks = [(f, m) for f, m in messages if re.fullmatch(r"reading the scan \(\d+ s\)", m)]
    assert [f for f, _ in ticks if f == 0.0] and [f for f, _ in ticks if f == segment.READING_SHARE * 0.3], messages
    assert set(m for _, m in messages) <= {"reading the scan"} | {m for _, m in ticks}, messages


class _Stop(Exception):
    """What a caller's progress callback raises to stop a run."""


def _raising_at(fraction: float, error):
    def reading(done: float) -> None:
        told.append(done)
        if done >= fraction:
            raise error

    told = reading.told = []

    return reading


def _scan_read_by_itk(tmp_path, kind: str):
    if kind == "dicom":
        return write_dicom_series(tmp_path / "series", make_volume(size=(32, 32, 12), dtype=sitk.sitkInt16)[0])
    path = tmp_path / f"scan.{kind}"
    sitk.WriteImage(make_volume()[0], str(path))
    return path


@pytest.mark.parametrize("kind", ["dicom", "nrrd", "mha"])
@pytest.mark.parametrize("error", [KeyboardInterrupt, _Stop])
@pytest.mark.parametrize("fraction", [0.0, 1.0])
def test_what_the_reading_callback_raises_inside_itk_is_raised_not_a_bad_file(tmp_path, monkeypatch, kind, error,
                                                                              fraction):
    """Ctrl-C while SimpleITK read a DICOM series, an NRRD or a MetaImage file arrived in the progress command
    (Python runs only there during the read), which ITK turned into "the DICOM series cannot be read (... error
    executing the Python Callable)": a failed case, and `deepwml segment` went on to the next one. A caller's
    callback that stops the run, likewise. Now what it raised is raised once the reader returns."""
    path = _scan_read_by_itk(tmp_path, kind)
    with pytest.raises(error):
        io.read_image(path, reading=_raising_at(fraction, error()))
    if kind == "dicom":  # told no more once it raised, and the series is read no further (a Ctrl-C waited for it)
        events = []

        class Reader(sitk.ImageSeriesReader):
            def Execute(self):
                self.AddCommand(sitk.sitkProgressEvent, lambda: events.append(self.GetProgress()))
                return super().Execute()

        monkeypatch.setattr(sitk, "ImageSeriesReader", Reader)
        reading = _raising_at(0.25, error())
        with pytest.raises(error):
            io.read_image(path, reading=reading)
        assert len(reading.told) == 1 + sum(done < 0.25 for done in reading.told), reading.told
        assert len([e for e in events if e < 1]) <= 5, events  # of 12 files: stopped at the next one


def test_what_the_reading_callback_raises_midway_through_a_series_does_not_end_the_process(tmp_path):
    """Raised half way through a DICOM series, it ended Python itself (C++ 'terminate called after throwing an
    instance of itk::simple::GenericException', no traceback, no summary.csv): run apart here for that reason."""
    import subprocess
    import sys
    from pathlib import Path

    folder = _scan_read_by_itk(tmp_path, "dicom")
    script = (f"import sys; sys.path[:0] = [{str(Path(io.__file__).parents[1])!r}]\n"
              "from DeepWMLLib import io\n"
              "def reading(done):\n"
              "    if done > 0.3: raise KeyboardInterrupt\n"
              "try:\n"
              f"    io.read_image({str(folder)!r}, reading=reading)\n"
              "except KeyboardInterrupt:\n"
              "    print('interrupted')\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout.strip()) == (0, "interrupted"), done.stderr[-2000:]


@pytest.mark.parametrize("name", ["scan.nii.gz", "scan.nii", "scan.hdr", "scan.nrrd"])
def test_an_os_error_of_the_reading_callback_is_not_blamed_on_the_scan(tmp_path, monkeypatch, name):
    """A progress bar writing to a closed terminal or pipe (an SSH session gone, `| tee` killed) raises OSError
    in the reading's callback: a NIfTI file was then reported "truncated or corrupt; copy the file again from its
    source" (a pair's .img "cannot be read"), each case of the batch failing so. The error is raised as it was."""
    monkeypatch.setattr(io, "READ_PIECE", 1 << 16, raising=False)
    sitk.WriteImage(make_volume(size=(64, 64, 16))[0], str(tmp_path / name))
    for light in (True, False):
        with pytest.raises(BrokenPipeError):
            io.read_image(tmp_path / name, light=light, reading=_raising_at(0.5, BrokenPipeError(32, "Broken pipe")))


@pytest.mark.parametrize("error", [KeyboardInterrupt, _Stop])
def test_what_the_callback_raises_in_the_ticking_thread_reaches_the_run(monkeypatch, error):
    """The seconds ticked while a read says nothing are told from another thread: what the callback raised there
    (a caller's callback stopping the run, a closed terminal) was printed as 'Exception in thread deepwml-reading'
    and lost, the read and the run going on, the bar stopped. It now ends the ticking and is raised in the run's
    thread: at the reading's next word, or as the reading ends."""
    from DeepWMLLib import segment

    monkeypatch.setattr(segment, "READING_TICK_S", 0.05, raising=False)
    told = []

    def tell(fraction, message):
        told.append(message)
        if message != "reading the scan":
            raise error()

    with pytest.raises(error):
        with segment.reading_progress(tell):
            time.sleep(0.4)  # a read that says nothing
    assert len(told) == 2, told  # no tick after the callback raised
    told.clear()
    with pytest.raises(error):
        with segment.reading_progress(tell) as reading:
            time.sleep(0.4)
            reading(0.5)  # the reading's next word
            pytest.fail("the reading went on")


def _recorder(messages):
    def factory(number, total, case):
        return lambda fraction, message: messages.append((fraction, message))

    factory.finish = lambda row: None
    return factory


@pytest.mark.parametrize("slab_voxels", [1, 700, 1 << 24])
def test_lesion_labels_painted_a_slab_at_a_time_match_scipy(monkeypatch, slab_voxels):
    """Labels painted one slice, a few slices or the whole box at a time are scipy's, boxes cropped or not."""
    from scipy import ndimage

    monkeypatch.setattr(postprocessing, "PAINT_VOXELS", slab_voxels, raising=False)
    rng = np.random.default_rng(5)
    for density in (0.02, 0.2, 0.5):
        mask = np.zeros((14, 30, 26), bool)
        mask[2:13, 3:28, 1:24] = rng.random((11, 25, 23)) < density
        for case in (mask, mask[2:13, 3:28, 1:24]):
            expected, count = ndimage.label(case, structure=np.ones((3, 3, 3)))
            labels, n = postprocessing.label_components(case)
            assert n == count and np.array_equal(labels, expected)


def test_lesion_labels_need_no_second_volume_of_labels(monkeypatch):
    """The labels were painted into a new array as large as the lesions' bounding box and then copied into the
    label volume: both at once, 3.4 GB of int32 at 1024 x 1024 x 400 when lesions spread over the brain. They
    are painted 16 M voxels at a time (64 K here, for a volume of 2.4 M)."""
    monkeypatch.setattr(postprocessing, "PAINT_VOXELS", 1 << 16, raising=False)
    mask = np.zeros((60, 200, 200), bool)
    mask[1:59:4, 2:198:5, 2:198:3] = True  # specks all over: a box of nearly the whole volume
    (labels, count), peak = _peak_bytes(postprocessing.label_components, mask)
    assert count > 1000 and labels.dtype == np.int32
    assert peak < 2.2 * labels.nbytes, f"{peak / labels.nbytes:.2f} label volumes held at once"  # the masks: a byte each


@pytest.mark.parametrize("level", [0, 1])
def test_an_output_is_written_from_its_voxels_not_copies_of_them(level):
    """nifti_bytes joined the header to a bytes copy of the voxels, then compressed that: two copies of a
    float32 probability map (--save-probabilities: 7.4 GB peak at 1024 x 1024 x 400, 5.7 GB without it).
    The file is the same, byte for byte."""
    rng = np.random.default_rng(2)
    values = rng.random((30, 200, 200), dtype=np.float32)
    values[values < 0.97] = 0  # mostly 0, as a probability map is
    volume = Volume(values, (0.5, 0.5, 2.0), (1.0, 2.0, 3.0), np.eye(3).ravel())
    data, peak = _peak_bytes(nifti_bytes, volume, level)
    plain = bytes(data) if level == 0 else gzip.decompress(data)
    assert plain[352:] == volume.array.tobytes() and parse_nifti(plain) is not None
    if level:
        assert data == gzip.compress(plain, compresslevel=1, mtime=0)
    output_copies = 1 if level == 0 else 2  # compressed: its pieces, then joined (small for a mostly-0 map)
    assert peak < output_copies * len(data) + 0.3 * volume.array.nbytes, \
        f"{peak / volume.array.nbytes:.2f} volumes held at once"


@pytest.mark.parametrize("name", ["prob.nii.gz", "prob.nii"])
def test_an_output_file_is_written_a_piece_at_a_time_not_joined_first(tmp_path, monkeypatch, name):
    """A NIfTI output was made whole in memory before it was written: compressed, its pieces and then the joined
    file (--save-probabilities at 1024 x 1024 x 400: a probability map compresses to 0.9 GB, so 1.8 GB more at the
    peak of the run, 6.2 GB); not compressed, a copy of the voxels. The pieces now go to the file as they are made
    (256 KiB of voxels at a time here, 16 MiB in use; zlib holds a piece's output about twice as it makes it); the
    file is the same, byte for byte."""
    monkeypatch.setattr(volume, "_PIECE", 1 << 18)
    values = np.random.default_rng(3).random((30, 200, 200), dtype=np.float32)  # compresses little, as a map does
    image = Volume(values, (0.5, 0.5, 2.0), (1.0, 2.0, 3.0), (-1, 0, 0, 0, -1, 0, 0, 0, 1))
    path = tmp_path / name
    _, peak = _peak_bytes(io.write_image, image, path)
    assert path.read_bytes() == nifti_bytes(image, compresslevel=1 if name.endswith(".gz") else 0)
    assert peak < 0.5 * values.nbytes, f"{peak / values.nbytes:.2f} times the voxels held at once"


def test_the_segmentation_file_is_made_a_slab_of_slices_at_a_time(tmp_path, monkeypatch):
    """write_segmentation made the mask's bool copy, its bytes and a bool map of the segment (for its extent) over
    the whole volume, and compressed the bytes at once: 1.3 GB at 1024 x 1024 x 400, the peak of such a scan's run
    with the report's copies. Made, measured and compressed 64 K voxels at a time here (16 M in use): the same
    file, byte for byte, as the label map compressed whole, and Slicer's reader finds the segment where it lies."""
    import slicerio

    monkeypatch.setattr(io, "SEGMENTATION_SLAB_VOXELS", 1 << 16, raising=False)
    array = np.zeros((40, 200, 200), np.uint8)
    rng = np.random.default_rng(4)
    array[7:31, 30:170, 45:160] = (rng.random((24, 140, 115)) < 0.02) * rng.choice([1, 3], (24, 140, 115))
    mask = Volume(array, (0.5, 0.6, 2.0), (1.0, 2.0, 3.0), (1, 0, 0, 0, 0, -1, 0, 1, 0))
    path, peak = _peak_bytes(io.write_segmentation, mask, tmp_path / "case.seg.nrrd")
    data = path.read_bytes()
    header, body = data.split(b"\n\n", 1)
    assert body == gzip.compress((array > 0).astype(np.uint8).tobytes(), compresslevel=1, mtime=0)
    assert b"Segment0_Extent:=45 159 30 169 7 30" in header
    seg = slicerio.read_segmentation(str(path))
    assert np.array_equal(seg["voxels"], (array > 0).transpose(2, 1, 0))
    assert peak < 0.5 * array.nbytes, f"{peak / array.nbytes:.2f} bytes a voxel held at once"


def test_a_mask_laid_out_in_another_order_is_written_as_its_values(tmp_path, monkeypatch):
    """A mask whose voxels lie in memory in another order (a Fortran-ordered or transposed array, as a caller of the
    library may give in a Volume): its slabs, written a slab at a time, are not C-contiguous, and the file write
    failed with 'memoryview: casts are restricted to C-contiguous views'. The same file as the mask in C order."""
    monkeypatch.setattr(io, "SEGMENTATION_SLAB_VOXELS", 1 << 10, raising=False)
    array = (np.random.default_rng(5).random((6, 30, 40)) < 0.05).astype(np.uint8)
    files = []
    for voxels in (array, np.asfortranarray(array)):
        mask = Volume(voxels, (0.5, 0.6, 2.0), (1.0, 2.0, 3.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
        files.append(io.write_segmentation(mask, tmp_path / f"case{len(files)}.seg.nrrd").read_bytes())
    assert files[1] == files[0]


def test_progress_goes_on_through_the_steps_after_the_networks(tmp_path):
    """After the networks, a 1024 x 1024 x 400 scan spends 15-45 s in post-processing, the report, the FLAIR
    check and writing: the bar sat at 76 % for all of it, and a log (stderr not a terminal: the Slicer worker's,
    a batch's) had no line between 75 % and 100 %. Each step now says so as it begins, at a rising fraction,
    and a log gets a line for each. The sample scan's middle slices with the shipped networks (not timed)."""
    import io as stringio
    from pathlib import Path

    from DeepWMLLib.segment import BAR_MESSAGE_WIDTH, ProgressBar

    whole = sitk.ReadImage(str(Path(__file__).resolve().parents[1] / "Resources" / "Sample" / "sample_flair.nii.gz"))
    sample = tmp_path / "sample_middle.nii.gz"  # its middle 8 slices: the steps' shares are per voxel
    sitk.WriteImage(whole[:, :, whole.GetDepth() // 2 - 4: whole.GetDepth() // 2 + 4], str(sample))
    calls = []
    log = stringio.StringIO()  # not a terminal
    bar = ProgressBar(log)

    def factory(number, total, case):
        update = bar(number, total, case)

        def both(fraction, message):
            calls.append((fraction, message))
            update(fraction, message)
        return both

    factory.finish = bar.finish
    rows = segment_cases([str(sample)], tmp_path / "out", None, "cpu", progress_factory=factory,
                         ventricle_model=None, save_brain_mask=True)
    assert rows[0]["status"] == "ok", rows
    last_network = max(i for i, (_, message) in enumerate(calls) if message in ("networks done",) or ".pt: slice" in message)
    after = calls[last_network + 1:]
    steps = [message for _, message in after]
    for step in ("post-processing: lesion mask", "lesion report", "FLAIR check: depth inside the brain",
                 "FLAIR check: background outside brain", "writing the mask", "writing the segmentation",
                 "writing the brain mask", "done"):
        assert step in steps, (step, steps)
    fractions = [fraction for fraction, _ in after]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert len(set(fractions)) >= 8, after  # each step its own fraction, not all at one
    assert fractions[0] <= 0.7, after  # the steps after the networks have their share of the bar
    assert max(b - a for a, b in zip(fractions, fractions[1:])) <= 0.1, after  # no step jumps a tenth of it
    too_long = [message for message in steps if len(message) > BAR_MESSAGE_WIDTH]  # a terminal's bar cut them
    assert not too_long, too_long
    lines = log.getvalue().splitlines()
    logged = [line for line in lines if "%" in line]
    for step in ("post-processing: lesion mask", "lesion report", "FLAIR check: depth inside the brain",
                 "writing the mask", "done"):
        assert any(line.endswith(step) for line in logged), (step, lines)
    assert len(logged) < 30, lines  # a line per step, not per slice


def test_the_small_marks_are_removed_without_an_int32_label_volume():
    """filter_components labelled the marks in int32 over their bounding box (1.1 GB at 1024 x 1024 x 400, the
    peak of a large scan's memory) and kept the labels while it wrote the result. Fewer than 256 marks need a
    byte each; the result is the same."""
    mask = np.zeros((40, 200, 200), np.uint8)
    mask[1:39:10, 2:198:30, 2:198:30] = 1  # 196 specks (one voxel, too small) spread over the whole volume
    mask[10:14, 50:54, 60:64] = 1  # two lesions that stay
    mask[20:26, 100:103, 100:104] = 1
    inside = np.ones(mask.shape, bool)
    (out, removed), peak = _peak_bytes(postprocessing.filter_components, mask, 1.0, 5.0, inside)
    from scipy import ndimage

    labels, count = ndimage.label(mask, structure=np.ones((3, 3, 3)))
    assert 2 < count < 256
    sizes = np.bincount(labels.ravel())
    expected = (sizes >= 5)[labels] & (labels > 0)
    assert np.array_equal(out, expected.astype(np.uint8)) and removed == 0
    assert peak < 3.2 * mask.nbytes, f"{peak / mask.nbytes:.2f} bytes a voxel held at once"


def test_the_marks_are_filtered_from_their_runs_without_a_volume_of_labels(monkeypatch):
    """filter_components painted the marks' labels over their bounding box (a byte a voxel, 0.4 GB at 1024 x 1024 x
    400, at the peak of such a scan's post-processing) and marked the rows' changes over the whole box at once (a
    byte a voxel more). It now keeps or drops the components' runs, found a slab of slices at a time (64 K voxels
    here, 16 M in use), and writes the kept ones into the result, whose other pages the system never gives memory:
    beside the mask, the result and little more; the same result as scipy's labels give."""
    from scipy import ndimage

    monkeypatch.setattr(postprocessing, "PAINT_VOXELS", 1 << 16)
    mask = np.zeros((40, 200, 200), bool)
    mask[1:39:10, 2:198:30, 2:198:30] = True  # 196 specks (one voxel, too small) spread over the whole volume
    mask[10:14, 50:54, 60:64] = True  # a lesion that stays
    mask[20:26, 100:103, 100:104] = True  # and one outside the brain
    inside = np.ones(mask.shape, np.uint8)
    inside[15:30, 90:110, 90:110] = 0
    (out, removed), peak = _peak_bytes(postprocessing.filter_components, mask, 1.0, 5.0, inside)
    labels, _ = ndimage.label(mask, structure=np.ones((3, 3, 3)))
    sizes = np.bincount(labels.ravel())
    assert np.array_equal(out, (sizes >= 5)[labels] & (labels > 0) & (labels != labels[20, 100, 100]))
    assert out.dtype == bool and removed == 6 * 3 * 4
    assert peak < 1.1 * mask.nbytes, f"{peak / mask.nbytes:.2f} bytes a voxel held at once"  # 1.29 before


@pytest.mark.parametrize("count", [3, 300, 70000])
def test_compact_labels_are_the_same_numbers_in_a_smaller_type(count):
    """label_components(compact=True): the same labels, in uint8 up to 255 marks, uint16 up to 65535."""
    mask = np.zeros((2, 2 * ((count + 99) // 100) + 1, 201), bool)
    flat = mask[0, ::2, ::2].ravel()
    flat[:count] = True
    mask[0, ::2, ::2] = flat.reshape(mask[0, ::2, ::2].shape)
    labels, n = postprocessing.label_components(mask)
    small, m = postprocessing.label_components(mask, compact=True)
    assert n == m == count and np.array_equal(labels, small)
    assert small.dtype == (np.uint8 if count < 256 else np.uint16 if count < 65536 else np.uint32)


def test_the_report_labels_its_lesions_in_a_byte_each_when_it_can():
    """lesion_table labelled the mask in int32 (1.1 GB over the lesions' box at 1024 x 1024 x 400); with
    fewer than 256 lesions a byte each, and the same table."""
    from DeepWMLLib.report import lesion_table

    array = np.zeros((40, 200, 200), np.uint8)
    array[2:38:10, 3:197:30, 3:197:30] = 1  # 196 specks spread over the whole volume
    array[5:9, 40:44, 40:50] = 1  # and a lesion
    mask = sitk.GetImageFromArray(array)
    mask.SetSpacing((0.5, 0.5, 1.0))
    rows, peak = _peak_bytes(lesion_table, mask)
    assert 2 < len(rows) < 256 and sum(r["voxels"] for r in rows) == int(array.sum())
    assert peak < 3.2 * array.nbytes, f"{peak / array.nbytes:.2f} bytes a voxel held at once"


def test_the_report_counts_the_lesion_voxels_without_copies_of_the_mask():
    """lesion_report copied the mask to bool for its labels, and then to bool and bytes again for the volume and the
    slice table: two masks of the whole volume beside the one held (0.84 GB at 1024 x 1024 x 400, the peak of such a
    scan's run with the segmentation file's copies). A 0/1 mask of bytes is labelled as it lies and counted a slice
    at a time: beyond the labels (a byte a voxel), little; the same report."""
    from DeepWMLLib.report import lesion_report

    array = np.zeros((40, 200, 200), np.uint8)
    array[5:9, 40:44, 40:50] = 1
    array[20:30, 100:140, 60:62] = 1
    array[33, 150, 150] = 1
    mask = Volume(array, (0.5, 0.6, 2.0), (1.0, 2.0, 3.0), np.eye(3).ravel())
    report, peak = _peak_bytes(lesion_report, mask)
    assert report["lesion_count"] == 3 and report["volume_ml"] == round(int(array.sum()) * 0.6 / 1000, 6)
    assert [row["area_mm2"] for row in report["slices"]] == [round(int(n) * 0.3, 4) for n in array.sum(axis=(1, 2))]
    assert peak < 1.3 * array.nbytes, f"{peak / array.nbytes:.2f} bytes a voxel held at once"  # 2.3 before


def _read_with_memory(path):
    """(read_image(path, light=True), peak bytes during the read, bytes still held after it)."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        volume = io.read_image(path, light=True)
        now, peak = tracemalloc.get_traced_memory()
        return volume, peak - before, now - before
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("name", ["scan.nii.gz", "scan.nii"])
def test_a_float64_scan_is_converted_to_float32_in_the_buffer_it_was_read_into(tmp_path, monkeypatch, name):
    """A float64 NIfTI's raw voxels (3.2 GB at 1024 x 1024 x 400) were held beside their float32 copy (1.6 GB):
    4.8 GB while the scan was read. They are converted into the front of the same buffer a piece at a time
    (16 MiB; 1 MiB here), and the rest of the buffer is let go. The same float32 voxels."""
    monkeypatch.setattr(io, "READ_PIECE", 1 << 20, raising=False)
    rng = np.random.default_rng(3)
    array = rng.normal(300.0, 120.0, (40, 128, 128))  # float64 with digits beyond float32's: rounding is compared
    array[0, 0, :3] = (1e-50, -0.0, 3.4e38)
    raw = nifti_bytes(sitk.GetImageFromArray(array), compresslevel=0)
    path = tmp_path / name
    path.write_bytes(gzip.compress(raw, compresslevel=1) if name.endswith(".gz") else raw)
    volume, peak, held = _read_with_memory(path)
    assert volume.array.dtype == np.float32 and np.array_equal(volume.array, array.astype(np.float32))
    assert volume.array.tobytes() == array.astype(np.float32).tobytes()  # -0.0 and all
    assert volume.GetSpacing() == (1.0, 1.0, 1.0)
    assert peak < 1.25 * array.nbytes, f"{peak / array.nbytes:.2f} times the raw voxels held at once"
    assert held < 0.6 * array.nbytes, f"{held / array.nbytes:.2f} times the raw voxels still held"
    # the same as SimpleITK reads it
    assert np.array_equal(volume.array, sitk.GetArrayFromImage(io.read_image(path)))


def test_other_voxel_types_are_read_as_before(tmp_path):
    """float32, int16 and int64 (8 bytes too): the float32 voxels of astype."""
    rng = np.random.default_rng(4)
    for dtype in ("<f4", "<i2", "<i8"):
        array = rng.normal(300.0, 120.0, (6, 20, 24)).astype(dtype)
        path = tmp_path / f"scan_{dtype[1:]}.nii.gz"
        path.write_bytes(gzip.compress(nifti_bytes(sitk.GetImageFromArray(array), compresslevel=0), compresslevel=1))
        volume = io.read_image(path, light=True)
        assert volume.array.dtype == np.float32 and np.array_equal(volume.array, array.astype(np.float32)), dtype


@pytest.mark.parametrize("name, light, bound", [("scan.hdr", True, 1.4), ("scan.nii", True, 1.4), ("scan.hdr", False, 2.5),
                                               ("scan.nii", False, 2.5)])
def test_a_nifti_file_or_pair_is_read_without_a_second_copy_of_its_voxels(tmp_path, name, light, bound):
    """A .hdr + .img pair's .img was read whole for the checks, then again by SimpleITK, which holds the voxels
    twice while it reads: 2.0 times the .img at the peak (336 MB for a 168 MB float32 .img). It is read once,
    into one buffer, like a .nii: 1.0 times (`segment`, light), 2.0 as an image (SimpleITK's, the copy it is
    made from). A float32 .nii read light was copied into float32 (2.0 times: now 1.0), and one read as an image
    kept the bytes of the checks beside SimpleITK's two copies (3.0 times: now 2.0). Measured in a fresh process
    (SimpleITK's memory is not Python's)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    if not Path("/proc/self/status").is_file():
        pytest.skip("the process's peak memory is read from /proc (Linux)")
    array = np.random.default_rng(5).normal(300.0, 120.0, (40, 512, 512)).astype(np.float32)  # 42 MB
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.5, 0.5, 3.0))
    sitk.WriteImage(image, str(tmp_path / name))
    # the process's peak (VmHWM) beyond what it held before the read (VmRSS), in kB
    code = ("import sys, SimpleITK\nfrom DeepWMLLib import io\n"
            "def kb(field):\n"
            "    return next(int(line.split()[1]) for line in open('/proc/self/status') if line.startswith(field))\n"
            "before = kb('VmRSS')\nvolume = io.read_image(sys.argv[1], light=sys.argv[2] == 'light')\n"
            "print(kb('VmHWM') - before)")
    root = str(Path(__file__).resolve().parents[1])
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / name), "light" if light else "image"],
                          capture_output=True, text=True, cwd=root, env={**os.environ, "PYTHONPATH": root}, check=True)
    grown = int(done.stdout.split()[-1]) * 1024
    assert grown < bound * array.nbytes, f"{grown / array.nbytes:.2f} times the voxels held at once"
    assert np.array_equal(io.voxels(io.read_image(tmp_path / name, light=light)), array)


def _big_endian_nifti(array) -> bytes:
    """A NIfTI-1 file (.nii bytes) stored big-endian, as some older scanners and tools write it: float64 voxels
    `array` (k, j, i), 1 mm voxels, an identity sform."""
    header = bytearray(352)
    struct.pack_into(">i", header, 0, 348)
    struct.pack_into(">8h", header, 40, 3, *array.shape[::-1], 1, 1, 1, 1)
    struct.pack_into(">2h", header, 70, 64, 64)  # float64
    struct.pack_into(">8f", header, 76, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)
    struct.pack_into(">3f", header, 108, 352.0, 1.0, 0.0)  # vox_offset, scl_slope, scl_inter
    header[123] = 2  # mm
    struct.pack_into(">2h", header, 252, 0, 1)  # no qform; sform scanner-anatomical
    struct.pack_into(">12f", header, 280, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0)
    header[344:348] = b"n+1\0"
    return bytes(header) + np.ascontiguousarray(array, ">f8").tobytes()


@pytest.mark.parametrize("name", ["scan.nii.gz", "scan.nii"])
def test_a_big_endian_float64_scan_is_converted_in_its_buffer_too(tmp_path, monkeypatch, name):
    """A big-endian float64 NIfTI was swapped into a native copy before the conversion in the buffer was tried,
    which then did not apply: raw voxels, their swapped copy and the float32 ones at once (2.5 times the raw
    voxels; 8 GB at 1024 x 1024 x 400, beyond what the out-of-memory estimate allows for). Now swapped as they
    are converted, like a little-endian file's."""
    monkeypatch.setattr(io, "READ_PIECE", 1 << 20, raising=False)
    array = np.random.default_rng(5).normal(300.0, 120.0, (40, 128, 128))
    raw = _big_endian_nifti(array)
    path = tmp_path / name
    path.write_bytes(gzip.compress(raw, compresslevel=1) if name.endswith(".gz") else raw)
    volume, peak, held = _read_with_memory(path)
    assert volume.array.dtype == np.float32 and volume.array.tobytes() == array.astype(np.float32).tobytes()
    assert peak < 1.25 * array.nbytes, f"{peak / array.nbytes:.2f} times the raw voxels held at once"
    assert held < 0.6 * array.nbytes, f"{held / array.nbytes:.2f} times the raw voxels still held"
    assert np.array_equal(volume.array, sitk.GetArrayFromImage(io.read_image(path)))  # as SimpleITK reads it


def test_the_qc_picture_holds_no_copy_of_the_scan():
    """`deepwml segment --qc` drew its picture from a float32 copy of the scan and a second copy of its finite
    voxels (1.8 GB peak at 512 x 512 x 300 against 1.0 GB for the rest of the case): it reads the voxels where
    they lie, and samples its grey window from them; the picture is the one a copy gives."""
    image, truth = make_volume(size=(256, 256, 80))  # 5 M voxels: the grey window samples 2 M of them
    voxel_count = image.GetNumberOfPixels()
    picture, peak = _peak_bytes(qc.render, image, truth, "case")
    assert peak < 8 * voxel_count, f"{peak / voxel_count:.1f} bytes a voxel"  # 12 with the two copies
    copy = sitk.Image(image)
    copy.MakeUnique()
    assert np.array_equal(picture, qc.render(copy, truth, "case"))


def test_the_grey_window_is_sampled_alike_from_views_and_with_non_finite_voxels():
    stack = np.random.default_rng(1).gamma(2.0, 100.0, (30, 64, 80)).astype(np.float32)
    view = stack[:, ::-1, ::2]
    assert qc.grey_levels(view) == qc.grey_levels(np.ascontiguousarray(view))
    holes = stack.copy()
    holes[::3, 5, 5] = np.nan
    holes[1, 2, 3] = np.inf
    finite = holes[np.isfinite(holes)]
    assert qc.grey_levels(holes) == qc.grey_levels(finite)


def test_a_scan_is_checked_once_per_case_and_an_image_given_to_the_api_still_is(tmp_path, tiny_model, monkeypatch):
    """`deepwml segment` checked each scan twice (non-finite voxels, a constant image, a label map: 0.03 s for a
    clinical FLAIR, 0.09 s at 512 x 512 x 300), once as it was read and again before the networks."""
    checks = []
    check = io.check_volume
    monkeypatch.setattr(io, "check_volume", lambda image, *args: checks.append(image) or check(image, *args))
    image, _ = make_volume(size=(32, 32, 4))
    path = tmp_path / "scan.nii.gz"
    sitk.WriteImage(image, str(path))
    rows = segment_cases([str(path)], tmp_path / "out", [str(tiny_model)], "cpu")
    assert rows[0]["status"] == "ok", rows
    assert len(checks) == 1
    flat = sitk.Image(image)
    flat.MakeUnique()
    flat *= 0
    with pytest.raises(DeepWMLError, match="constant"):
        segment_image(flat, [str(tiny_model)], "cpu")


@pytest.mark.parametrize("direction", [(-1, 0, 0, 0, -1, 0, 0, 0, 1), (1, 0, 0, 0, 1, 0, 0, 0, 1),
                                       (0, 0, 1, -1, 0, 0, 0, -1, 0)])  # a NIfTI file's, LPS, sagittal
def test_a_map_given_up_is_put_on_the_input_grid_in_its_own_buffer(direction):
    """A NIfTI file's rows and columns run against the axial stack's: the stack was copied to flip them. Given
    up (`reuse`), it is flipped in its own buffer, where the file's axes are the stack's; the same image."""
    image = Volume(np.arange(6 * 8 * 10, dtype=np.float32).reshape(6, 8, 10), (0.5, 0.6, 2.0), (1.0, 2.0, 3.0),
                   direction)
    stack, frame = io.to_axial_stack(image)
    expected = io.from_axial_stack(stack, frame)
    given = stack.copy()
    result = io.from_axial_stack(given, frame, reuse=True)
    assert isinstance(result, Volume) and np.array_equal(result.array, expected.array)
    assert result.GetDirection() == expected.GetDirection() and result.GetOrigin() == expected.GetOrigin()
    assert np.array_equal(io.axial_view(result, frame), stack)
    assert np.shares_memory(result.array, given) == (frame._numpy_axes == (0, 1, 2))


def _resident_bytes(array: np.ndarray) -> int | None:
    """How many bytes of the memory areas holding `array`'s buffer the system gives memory (Linux's
    /proc/self/smaps, Rss: pages never written hold none, nor pages only read, which share one page of zeros), or
    None where that cannot be told: no smaps, or an area that reaches beyond the buffer (by more than an allocation's
    header and alignment: merged with, or split from, a neighbour's memory, whose pages would count too)."""
    start = array.__array_interface__["data"][0]
    end = start + array.nbytes
    held, area = 0, None
    with open("/proc/self/smaps", encoding="ascii", errors="replace") as f:
        for line in f:
            field = line.split()
            if re.fullmatch(r"[0-9a-f]+-[0-9a-f]+", field[0]):
                low, high = (int(address, 16) for address in field[0].split("-"))
                area = (low, high) if low < end and high > start else None
                if area and (low < start - (1 << 16) or high > end + (1 << 16)):  # a neighbour's pages would count
                    return None
            elif area and field[0] == "Rss:":
                held += int(field[1]) * 1024
    return held


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="the memory a buffer holds is told by Linux's smaps")
def test_the_slices_outside_the_head_hold_no_memory_in_the_probability_map(tiny_model):
    """The probability map has the scan's size, but the network runs only on the slices with head; the others
    stay 0. They were written all the same (the models' average taken over the whole map, a NIfTI file's rows
    flipped slice by slice), so the system gave them memory: 0.6 GB of the 1.6 GB map of a 1024 x 1024 x 400 scan
    whose 145 highest slices are above the head, held to the end of the case. Never written, they hold none."""
    n, rows, cols = 40, 512, 512  # the map (42 MB) is allocated apart from the rest of the heap, as a large scan's
    j, i = np.ogrid[:rows, :cols]
    array = np.full((n, rows, cols), 20, np.float32)  # air
    array[:8, ((j - 256) / 220.0) ** 2 + ((i - 256) / 190.0) ** 2 < 1] = 300  # the head in 8 slices, air above it
    image = Volume(array, (0.4, 0.4, 1.0), (0.0, 0.0, 0.0), (-1, 0, 0, 0, -1, 0, 0, 0, 1))  # as a NIfTI file is read
    result = segment_image(image, [str(tiny_model)], "cpu", brain_model=None, ventricle_model=None, checked=True)
    probabilities = result.probabilities.array
    assert probabilities[:8].any(axis=(1, 2)).all() and not probabilities[8:].any()
    held = _resident_bytes(probabilities)
    if held is None:
        pytest.skip("the map shares its memory area with other buffers here")
    assert held < 0.3 * probabilities.nbytes, f"{held / probabilities.nbytes:.2f} of the map held (8 of 40 slices run)"


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="the memory a buffer holds is told by Linux's smaps")
def test_the_threshold_mask_holds_memory_only_about_the_marks():
    """Post-processing's threshold mask was written whole (0.42 GB at 1024 x 1024 x 400, at the peak of such a
    scan's post-processing), though the slices outside the head (145 of 400 there) and others hold no mark. Only
    the rows with a mark are written now, so the system gives memory only about them (numpy asks for pages of 2 MB
    where the system offers them, two such slices: then a slice with a mark is held whole); the same mask."""
    n, rows, cols = 40, 1024, 1024  # the mask (42 MB) is allocated apart from the rest of the heap, as a large scan's
    probabilities = np.full((n, rows, cols), 0.2, np.float16)
    probabilities[5:40:10, 200:206, 300:306] = 0.9  # a mark on each of 4 slices
    over, peak = _peak_bytes(postprocessing.at_least, probabilities, 0.5)
    assert np.array_equal(over, probabilities >= 0.5)
    held = _resident_bytes(over)
    if held is None:
        pytest.skip("the mask shares its memory area with other buffers here")
    assert held < 0.3 * over.nbytes, f"{held / over.nbytes:.3f} of the threshold mask held"  # all of it before
    assert peak < 1.1 * over.nbytes, f"{peak / over.nbytes:.2f} masks held at once"


def test_the_masks_and_the_map_are_held_once_after_the_networks(monkeypatch):
    """After the networks, the lesion mask and the brain mask were copied onto the input grid and kept beside
    their axial stacks up to the end of the FLAIR check, and the probability map was copied while the mask
    was made (a NIfTI file's flipped rows and columns): 2 bytes a voxel more at the FLAIR check, 4 more in
    post-processing (6.1 GB, the peak of a 1024 x 1024 x 400 float64 scan).
    The FLAIR check reads the result's own masks, and the result's map is the networks' map."""
    n, rows, cols = 24, 160, 160
    k, j, i = np.ogrid[:n, :rows, :cols]
    r2 = ((k - 12) * 2.0) ** 2 + ((j - 80) * 0.5) ** 2 + ((i - 80) * 0.5) ** 2
    brain_map = (r2 < 30 ** 2).astype(np.float32)
    lesions = np.where(((k - 12) * 2.0) ** 2 + ((j - 60) * 0.5) ** 2 + ((i - 90) * 0.5) ** 2 < 16, 0.9, 0.1)
    image = Volume(np.where(brain_map > 0, 300, 10).astype(np.float32), (0.5, 0.5, 2.0), (0.0, 0.0, 0.0),
                   (-1, 0, 0, 0, -1, 0, 0, 0, 1))  # as a NIfTI file is read
    held = {}

    def maps(image, *args, brain_threshold, lesion_image, **kwargs):
        _, frame = io.to_axial_stack(image, copy=False)
        held["probabilities"], brain = lesions.astype(np.float32), (brain_map >= brain_threshold).astype(np.uint8)
        held["bytes"] = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        assert lesion_image  # the map as its image on the input grid, in the networks' own buffer
        return io.from_axial_stack(held["probabilities"], frame, reuse=True), brain, None, frame

    def check(scan, brain, mask, spacing, progress):
        held["brain"], held["mask"] = brain, mask
        return {"looks_like": "FLAIR"}

    monkeypatch.setattr(inference, "predict_maps", maps)
    monkeypatch.setattr(contrast, "flair_contrast", check)
    monkeypatch.setattr(contrast, "contrast_warnings", lambda check: [])
    tracemalloc.start()
    try:
        result = segment_image(image, None, "cpu", ventricle_model=None, checked=True)
        peak = tracemalloc.get_traced_memory()[1] - held["bytes"]
    finally:
        tracemalloc.stop()
    assert result.report["volume_ml"] > 0 and result.report["intracranial_ml"] > 0
    assert np.shares_memory(held["mask"], result.mask.array) and np.shares_memory(held["brain"], result.brain.array)
    assert np.shares_memory(result.probabilities.array, held["probabilities"])
    stack, frame = io.to_axial_stack(result.mask)
    assert np.array_equal(stack, (lesions >= result.report["threshold"]).astype(np.uint8))
    assert np.array_equal(io.to_axial_stack(result.brain)[0], brain_map.astype(np.uint8))
    # beyond the networks' map and brain mask: the lesion mask and, labelling its lesions, a bool copy and the labels,
    # a byte a voxel each (6.7 bytes a voxel before, beside the brain network's float32 map)
    assert peak < 3.5 * image.array.size, f"{peak / image.array.size:.1f} bytes a voxel beyond the networks' maps"


def test_the_brain_map_is_thresholded_as_the_networks_run_not_held_as_floats(tmp_path, tiny_model, monkeypatch):
    """Only the brain mask is ever used, but the brain network's float32 map was held whole up to the end of the
    networks and thresholded then: 4 bytes a voxel of the slices run (1.07 GB at 1024 x 1024 x 400, 255 slices run)
    where the mask needs 1. Thresholded a chunk of slices at a time, it is the same mask, byte for byte."""
    from DeepWMLLib.segment import load_brain_model, load_models

    from conftest import BRAIN_LABELS, tiny_model_file

    monkeypatch.setattr(inference, "CHUNK_SLICES", 4)  # a chunk's own buffers small beside the maps
    models = load_models([tiny_model])
    brain = load_brain_model(str(tiny_model_file(tmp_path / "brain.pt", labels=BRAIN_LABELS, seed=3)))
    image, _ = make_volume(size=(256, 256, 32), spacing=(0.9, 0.9, 2.0))
    _, brain_map, _, _ = inference.predict_maps(image, models, brain, "cpu", backend="torch")
    level = float(np.median(brain_map[brain_map > 0]))  # an untrained network's: half its voxels run inside
    (lesion, mask, _, _), peak = _peak_bytes(
        lambda: inference.predict_maps(image, models, brain, "cpu", backend="torch", brain_threshold=level))
    voxels = lesion.size
    assert mask.dtype == np.uint8 and 0 < np.count_nonzero(mask) < voxels
    assert np.array_equal(mask, (brain_map >= level).astype(np.uint8))
    # 8 bytes a voxel here with the mask (the maps 5, normalisation's masks and a chunk's buffers the rest); 11 with
    # the float32 brain map
    assert peak < 9.5 * voxels, f"{peak / voxels:.1f} bytes a voxel"


def test_the_maps_are_put_back_on_the_input_grid_a_few_slices_at_a_time(tmp_path, tiny_model, monkeypatch):
    """A chunk's maps (32 slices) were put back on the input grid all at once: the map, its half-way pass and the
    total's chunk, 0.13 GB each at 1024 x 1024, at the peak of the networks' end of such a scan. A few slices at a
    time (8; 2 of a chunk of 16 here), each slice resampled on its own: the same maps, byte for byte."""
    from DeepWMLLib.segment import load_brain_model, load_models

    from conftest import BRAIN_LABELS, tiny_model_file

    monkeypatch.setattr(inference, "CHUNK_SLICES", 16)
    models = load_models([tiny_model])
    brain = load_brain_model(str(tiny_model_file(tmp_path / "brain.pt", labels=BRAIN_LABELS, seed=3)))
    image, _ = make_volume(size=(256, 256, 32), spacing=(0.9, 0.9, 2.0))
    maps = {}
    for slices in (16, 2):
        monkeypatch.setattr(inference, "INPUT_SLICES", slices, raising=False)
        maps[slices], peak = _peak_bytes(lambda: inference.predict_maps(image, models, brain, "cpu", backend="torch",
                                                                       brain_threshold=0.5, phases=4))
    assert all(np.array_equal(whole, parts) for whole, parts in zip(maps[16][:2], maps[2][:2]))
    voxels = maps[2][0].size
    assert peak < 12.5 * voxels, f"{peak / voxels:.1f} bytes a voxel"  # 17.6 a chunk at a time


def test_the_ventricle_map_is_thresholded_as_the_networks_run_too(tmp_path, tiny_model):
    """With a ventricle model (--ventricle-model), its float32 map was held whole to the networks' end, though only
    its threshold is used (1.07 GB at 1024 x 1024 x 400 with 255 slices run, where the mask is 0.27 GB): it comes
    as the brain map does, a byte a voxel, 1 where the probability is over the model's threshold; the same mask."""
    from DeepWMLLib.location import ventricle_mask
    from DeepWMLLib.segment import load_models, load_ventricle_model

    from conftest import tiny_model_file

    models = load_models([tiny_model])
    vent = load_ventricle_model(str(tiny_model_file(tmp_path / "vent.pt", seed=4,
                                                    labels={"0": "background", "1": "lateral_ventricles"})))
    image, _ = make_volume(size=(128, 128, 12), spacing=(1.8, 1.8, 2.0))
    _, _, floats, _ = inference.predict_maps(image, models, None, "cpu", backend="torch", ventricle_model=vent)
    level = float(np.median(floats[floats > 0]))  # an untrained network's: half its voxels run inside
    _, _, cut, _ = inference.predict_maps(image, models, None, "cpu", backend="torch", ventricle_model=vent,
                                          ventricle_threshold=level)
    assert cut.dtype == np.uint8 and np.array_equal(cut, (floats >= level).astype(np.uint8))
    assert np.array_equal(ventricle_mask(cut, None, level), ventricle_mask(floats, None, level))


def test_the_ventricles_are_found_without_int32_labels_or_a_copy_of_the_distances():
    """ventricle_mask labelled its components with scipy's int32 labels (1.7 GB at 1024 x 1024 x 400) and
    ventricle_distance copied its float32 distances once more than needed (1.7 GB): labels of a byte a voxel (under
    256 components), no copy; the same ventricles and distances."""
    from DeepWMLLib import location

    n, rows, cols = 30, 200, 200
    k, j, i = np.ogrid[:n, :rows, :cols]
    probabilities = np.zeros((n, rows, cols), np.float32)
    probabilities[((k - 15) * 2.0) ** 2 + (j - 100) ** 2 + (i - 80) ** 2 < 20 ** 2] = 0.9  # the two lateral
    probabilities[((k - 15) * 2.0) ** 2 + (j - 100) ** 2 + (i - 120) ** 2 < 20 ** 2] = 0.8  # ventricles, touching
    probabilities[5, 20, 20] = 0.9  # a stray speck, dropped
    cut = (probabilities >= 0.5).astype(np.uint8)  # as predict_maps gives it
    ventricles, peak = _peak_bytes(location.ventricle_mask, cut, None, 0.5)
    assert np.array_equal(ventricles, (probabilities >= 0.5) & ~((k == 5) & (j == 20) & (i == 20)))
    assert peak < 3.5 * cut.size, f"{peak / cut.size:.1f} bytes a voxel"  # 21 with int32 labels
    distance, peak = _peak_bytes(location.ventricle_distance, ventricles, (2.0, 0.5, 0.5))
    from scipy import ndimage

    assert distance.dtype == np.float32
    assert np.allclose(distance, ndimage.distance_transform_edt(~ventricles, sampling=(2.0, 0.5, 0.5)), atol=1e-4)
    assert peak < 6.5 * cut.size, f"{peak / cut.size:.1f} bytes a voxel"  # 8 with the copy


def test_the_split_measures_the_distances_at_the_lesions_only(monkeypatch):
    """The periventricular/deep split made ITK's float32 distance map of the whole volume (3.4 GB while ITK made it,
    with its work copy, at 1024 x 1024 x 400: the peak of such a scan with a ventricle model), copied it non-negative
    (1.7 GB) and put it back on the scan's grid for the report, which reads it at the lesions' voxels only. Given
    those voxels, ITK measures from the stack's start to just past the last ventricle or lesion voxel and only
    their distances are kept: the same split and the same distances, bit for bit."""
    from DeepWMLLib import location

    n, rows, cols = 40, 240, 240
    k, j, i = np.ogrid[:n, :rows, :cols]
    ventricles = ((k - 10) * 2.0) ** 2 + (j - 40) ** 2 + (i - 45) ** 2 < 18 ** 2
    lesion = np.zeros((n, rows, cols), bool)
    lesion[8:12, 30:34, 60:70] = True  # on the ventricles' wall and inside them
    lesion[16:18, 75:78, 20:24] = True  # deep
    spacing = (0.9, 0.7, 0.7)  # no power of two: a box starting further in would change the distances' last bits
    measured = []
    maurer = sitk.SignedMaurerDistanceMap
    monkeypatch.setattr(sitk, "SignedMaurerDistanceMap",
                        lambda image, *args, **kwargs: measured.append(image.GetNumberOfPixels()) or maurer(image, *args,
                                                                                                           **kwargs))
    (entry, distances), peak = _peak_bytes(location.locate, np.nonzero(lesion), ventricles, spacing)
    whole_entry, whole = located_by_the_whole_map(lesion, ventricles, spacing)
    assert entry == whole_entry and entry["judged"] and entry["periventricular_ml"] > 0 and entry["deep_ml"] > 0
    assert np.array_equal(distances.view(np.uint32), whole[lesion].view(np.uint32))
    assert measured[0] == 20 * 78 * 70  # the box (past the ventricles by a voxel, the lesions by none), not the stack
    assert peak < 0.5 * lesion.size, f"{peak / lesion.size:.2f} bytes a voxel"  # 5 with the whole map and its copy


@pytest.mark.parametrize("direction", [(-1, 0, 0, 0, -1, 0, 0, 0, 1),  # a NIfTI's: rows and columns flipped
                                       (0, 0, -1, 1, 0, 0, 0, -1, 0)])  # sagittal slices: the stack is transposed
def test_the_slicer_modules_split_measures_the_distances_at_the_lesions_only(monkeypatch, direction):
    """The Slicer module's lesion statistics (locate_images: the lesion and ventricle segments as images) made the
    whole distance map as `deepwml segment` once did, copied it and put it back on the grid: 800 MiB at their peak
    on a 512 x 512 x 200 scan (16 bytes a voxel). Measured as the command line measures, at the lesion voxels only:
    the same split and per-lesion figures, bit for bit, as the whole map's."""
    from DeepWMLLib import location
    from DeepWMLLib.report import lesion_report

    shape = (30, 200, 180)  # numpy (k, j, i)
    k, j, i = np.ogrid[:shape[0], :shape[1], :shape[2]]
    ventricles = (((k - 8) * 2.5) ** 2 + (j - 50) ** 2 + (i - 40) ** 2 < 20 ** 2).astype(np.uint8)
    lesions = np.zeros(shape, np.uint8)
    lesions[6:10, 28:33, 55:70] = 1  # across the ventricles' wall
    lesions[14:16, 80:84, 30:35] = 1  # deep
    images = [sitk.GetImageFromArray(array) for array in (lesions, ventricles)]
    for image in images:
        image.SetSpacing((0.9, 0.7, 2.3))
        image.SetDirection(direction)
    mask, inside = images
    frame = io.slice_frame(mask)
    spacing = (frame.slice_thickness_mm, frame.row_spacing_mm, frame.col_spacing_mm)
    whole_entry, whole = located_by_the_whole_map(io.axial_view(mask, frame) > 0, io.axial_view(inside, frame) > 0,
                                                  spacing)
    whole_image = io.from_axial_stack(whole, frame)
    measured = []
    maurer = sitk.SignedMaurerDistanceMap
    monkeypatch.setattr(sitk, "SignedMaurerDistanceMap",
                        lambda image, *args, **kwargs: measured.append(image.GetNumberOfPixels()) or maurer(image, *args,
                                                                                                           **kwargs))
    (entry, distances), peak = _peak_bytes(location.locate_images, mask, inside)
    assert entry == whole_entry and entry["judged"] and entry["periventricular_ml"] > 0 and entry["deep_ml"] > 0
    assert measured[0] < lesions.size / 2  # the box up to the ventricles and lesions, not the stack
    assert peak < 2 * lesions.size, f"{peak / lesions.size:.1f} bytes a voxel"  # 10 with the whole map
    expected = volume.voxels(whole_image).ravel()[np.flatnonzero(lesions)]
    assert np.array_equal(distances.view(np.uint32), expected.view(np.uint32))
    assert lesion_report(mask, None, distances) == lesion_report(mask, None, volume.voxels(whole_image))


def test_post_processing_makes_the_lesion_mask_once():
    """Post-processing made the lesion mask as bool, then as bytes, and label_components copied the bytes to bool
    again: three masks of the whole volume where one serves (1.2 GB at 1024 x 1024 x 400 voxels, the peak of such a
    scan). Made once, as bool, and given back as bytes by a view: the same mask."""
    rng = np.random.default_rng(0)
    n, rows, cols = 40, 256, 256
    k, j, i = np.ogrid[:n, :rows, :cols]
    probabilities = np.zeros((n, rows, cols), np.float32)
    for _ in range(30):  # lesions, a few too small to keep
        z, y, x = rng.integers(5, n - 5), rng.integers(40, rows - 40), rng.integers(40, cols - 40)
        probabilities[((k - z) * 3.0) ** 2 + (j - y) ** 2 + (i - x) ** 2 < rng.uniform(4, 60)] = 0.9
    brain = ((((k - 20) * 4.0) ** 2 + (j - 128) ** 2 + (i - 128) ** 2) < 110 ** 2).astype(np.uint8)
    (mask, removed), peak = _peak_bytes(
        lambda: postprocessing.postprocess(probabilities, 0.5, 0.5, 5.0, 0.0, brain, return_removed=True))
    expected, expected_removed = postprocessing.filter_components(
        (probabilities >= 0.5).astype(np.uint8), 0.5, 5.0, brain, inside_level=postprocessing.BRAIN_THRESHOLD)
    assert mask.dtype == np.uint8 and np.array_equal(mask, expected) and removed == expected_removed > 0
    assert 0 < np.count_nonzero(mask) < np.count_nonzero(probabilities)  # the small ones gone
    # 2.5 bytes a voxel beyond the map (the mask, the labels, label_components' runs over the lesions' box); 3.5 before
    assert peak < 3 * probabilities.size, f"{peak / probabilities.size:.1f} bytes a voxel"


def test_a_dice_readout_labels_the_lesions_a_byte_a_voxel():
    """evaluate_case (the Slicer module's Dice readout against a manual segmentation, deepwml evaluate) labelled
    the lesions of both masks with scipy, int32 (8 bytes a voxel): 14 bytes a voxel at its peak here, and the peak
    of the module's whole flow at 512 x 512 x 200 (621 MiB over the 697 MiB held). Labelled a byte a voxel as the
    report does (8 here, 281 MiB there): the same figures as scipy's labels give."""
    from scipy import ndimage

    from DeepWMLLib import metrics
    from DeepWMLLib.evaluation import evaluate_case

    rng = np.random.default_rng(1)
    shape = (30, 300, 300)
    k, j, i = np.ogrid[:shape[0], :shape[1], :shape[2]]
    reference = np.zeros(shape, np.uint8)
    for _ in range(40):
        z, y, x = rng.integers(3, shape[0] - 3), rng.integers(30, shape[1] - 30), rng.integers(30, shape[2] - 30)
        reference[((k - z) * 3.0) ** 2 + (j - y) ** 2 + (i - x) ** 2 < rng.uniform(2, 80)] = 1
    prediction = np.roll(reference, 2, axis=2)
    prediction[8:16] = 0  # lesions missed
    prediction[20, 40:44, 40:44] = 1  # and one marked that is none
    images = [sitk.GetImageFromArray(array) for array in (prediction, reference)]
    for image in images:
        image.SetSpacing((0.5, 0.5, 3.0))
    result, peak = _peak_bytes(evaluate_case, *images)
    assert peak < 10 * reference.size, f"{peak / reference.size:.1f} bytes a voxel"
    with pytest.MonkeyPatch.context() as patch:  # what scipy's labels give
        patch.setattr(metrics, "label_components",
                      lambda mask, compact=False: ndimage.label(mask, structure=np.ones((3, 3, 3), bool)))
        expected = evaluate_case(*images)
    assert 0 < result["lesion_recall"] < 1 and result["n_predicted_lesions"] > 30 and 0 < result["dice"] < 1
    assert json_equal(result, expected)


def json_equal(a, b) -> bool:
    """Equal as the saved .json has them (NaN equal to NaN)."""
    import json

    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
