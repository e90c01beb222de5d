"""Reading: every supported format, and a clear one-line DeepWMLError for every input we refuse."""

from __future__ import annotations

import csv
import errno
import gzip
import math
import os
import re
import struct
import sys
import time
import zlib
from io import StringIO
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from DeepWMLLib import io
from DeepWMLLib.errors import DeepWMLError

from conftest import (drop_pixel_spacing, encoded_dicom_series, in_folder, make_volume, nifti2_of,
                      record_syncs_and_renames, relabel_transfer_syntax, rotation, set_orientation, stepped_positions,
                      write_dicom_series, write_enhanced_mr)


@pytest.mark.parametrize("ext", [".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".hdr"])
def test_formats_keep_geometry(tmp_path, ext):
    image, _ = make_volume(size=(20, 16, 6), spacing=(0.7, 0.8, 4.0), direction=rotation(0.2, -0.1, 0.3),
                           dtype=sitk.sitkInt16)
    path = tmp_path / f"case{ext}"
    sitk.WriteImage(image, str(path))
    read = io.read_image(path)
    assert read.GetPixelID() == sitk.sitkFloat32
    assert io.grid_difference(read, image) is None
    assert np.array_equal(sitk.GetArrayFromImage(read), sitk.GetArrayFromImage(image).astype(np.float32))


@pytest.mark.parametrize("ext", [".NII.GZ", ".NII", ".NRRD", ".MHA", ".MHD", ".Mha", ".HDR"])
def test_extensions_in_upper_case_read_the_same(tmp_path, ext):
    """SimpleITK picks its reader by the lower-case extension: SCAN.MHA (Windows tools) 'could not be read'.
    The NIfTI files are scaled, which takes them to SimpleITK too (outside the SimpleITK-free subset)."""
    image, _ = make_volume(size=(20, 16, 6), spacing=(0.7, 0.8, 4.0), direction=rotation(0.2, -0.1, 0.3),
                           dtype=sitk.sitkInt16)
    path = tmp_path / f"case{ext.lower()}"
    sitk.WriteImage(image, str(path))
    if "nii" in ext.lower():
        data = bytearray(gzip.decompress(path.read_bytes()) if ext.lower().endswith(".gz") else path.read_bytes())
        data[112:120] = np.array([2.0, 10.0], "<f4").tobytes()  # scl_slope, scl_inter
        path.write_bytes(gzip.compress(bytes(data)) if ext.lower().endswith(".gz") else bytes(data))
    upper = tmp_path / f"CASE{ext}"
    for name in [f for f in tmp_path.iterdir() if f.name.startswith("case")]:  # an .mhd's .raw goes along
        name.rename(upper if name == path else tmp_path / ("CASE" + name.name[4:]))
    if ext.lower() == ".mhd":
        upper.write_text(upper.read_text().replace("case.raw", "CASE.raw"))
    if ext == ".HDR":  # the pair's voxel file in the same case: the only name the image library looks for
        (tmp_path / "CASE.img").rename(tmp_path / "CASE.IMG")
    for light in (False, True):
        read = io.read_image(upper, light=light)
        assert io.grid_difference(read, image) is None
        expected = sitk.GetArrayFromImage(image).astype(np.float32) * (2 if "nii" in ext.lower() else 1)
        assert np.array_equal(io.voxels(read), expected + (10 if "nii" in ext.lower() else 0))


def _pair(folder, name="case", seed=0):
    image, _ = make_volume(size=(20, 16, 6), spacing=(0.7, 0.8, 4.0), direction=rotation(0.2, -0.1, 0.3),
                           dtype=sitk.sitkInt16, seed=seed)
    sitk.WriteImage(image, str(folder / f"{name}.hdr"))  # a NIfTI-1 pair: "ni1" in the header
    return image, folder / f"{name}.hdr", folder / f"{name}.img"


def test_a_nifti_pair_is_read_as_its_nii_is(tmp_path):
    """SPM's .hdr + .img (NIfTI-1, 'ni1'): refused as an unsupported file type, though the image library reads
    it exactly as the same scan saved as .nii.gz; now read, its outputs named and written as for a .nii."""
    image, header, voxel_file = _pair(tmp_path)
    assert header.read_bytes()[344:348] == b"ni1\0" and voxel_file.is_file()
    sitk.WriteImage(image, str(tmp_path / "same.nii.gz"))
    pair, nii = io.read_image(header), io.read_image(tmp_path / "same.nii.gz")
    assert io.grid_difference(pair, nii) is None
    for a, b in ((pair.GetOrigin(), nii.GetOrigin()), (pair.GetDirection(), nii.GetDirection()),
                 (pair.GetSpacing(), nii.GetSpacing())):
        assert np.allclose(a, b, rtol=0, atol=1e-6)
    assert np.array_equal(sitk.GetArrayFromImage(pair), sitk.GetArrayFromImage(nii))
    assert io.case_name(header) == "case" and io.output_extension(header) == ".nii.gz"
    assert io.is_image_file(header) and not io.is_image_file(voxel_file)


@pytest.mark.parametrize("pixel", [sitk.sitkUInt8, sitk.sitkInt16, sitk.sitkFloat32, sitk.sitkFloat64])
def test_a_nifti_pair_read_once_gives_what_the_image_library_reads(tmp_path, pixel):
    """A pair is read once into one buffer and parsed like a .nii (not checked, then read again by SimpleITK):
    the very voxels and geometry SimpleITK reads from the pair, oblique and flipped, read light or not."""
    for n, direction in enumerate([rotation(0.3, -0.2, 0.4), rotation(0.1, 0.2, -0.3) @ np.diag([1, 1, -1])]):
        image, _ = make_volume(size=(20, 16, 6), spacing=(0.7, 0.8, 4.0), direction=direction, dtype=pixel, seed=n)
        header = tmp_path / f"p{n}.hdr"
        sitk.WriteImage(image, str(header))
        reference = sitk.ReadImage(str(header))
        for light in (False, True):
            read = io.read_any(header, light=light)
            assert tuple(read.GetSize()) == reference.GetSize() and read.GetSpacing() == reference.GetSpacing()
            assert read.GetOrigin() == reference.GetOrigin() and read.GetDirection() == reference.GetDirection()
            assert io.voxels(read).dtype == sitk.GetArrayViewFromImage(reference).dtype
            assert np.array_equal(io.voxels(read), sitk.GetArrayViewFromImage(reference))
            flair = io.read_image(header, light=light)
            assert np.array_equal(io.voxels(flair), sitk.GetArrayViewFromImage(reference).astype(np.float32))


def test_a_compressed_nifti_pair_is_read_as_its_nii_gz_is(tmp_path):
    """A .hdr.gz + .img.gz pair (SPM and FSL write them) was refused as an unsupported file type, though the image
    library reads it exactly as the same scan saved as .nii.gz; now read like an uncompressed pair, its outputs
    named and written as for a .nii, with what is wrong with a broken one said."""
    import shutil

    image, header, voxel_file = _pair(tmp_path)
    for plain, packed in ((header, tmp_path / "zip.hdr.gz"), (voxel_file, tmp_path / "zip.img.gz")):
        packed.write_bytes(gzip.compress(plain.read_bytes()))
    sitk.WriteImage(image, str(tmp_path / "same.nii.gz"))
    nii = io.read_image(tmp_path / "same.nii.gz")
    packed = tmp_path / "zip.hdr.gz"
    assert sitk.ReadImage(str(packed)).GetDirection() == nii.GetDirection()  # the image library reads it so too
    for light in (False, True):
        read = io.read_image(packed, light=light)
        assert read.GetSpacing() == nii.GetSpacing() and read.GetOrigin() == nii.GetOrigin()
        assert read.GetDirection() == nii.GetDirection() and tuple(read.GetSize()) == nii.GetSize()
        assert np.array_equal(io.voxels(read), sitk.GetArrayViewFromImage(nii))
    assert io.case_name(packed) == "zip" and io.output_extension(packed) == ".nii.gz" and io.is_image_file(packed)
    assert io.detached_data_files(packed) == [tmp_path / "zip.img.gz"] and not io.is_image_file(tmp_path / "zip.img.gz")
    assert io.read_time_axis(packed) is None
    # a .img.gz of another pair changes the fingerprint (the skip check), as for an uncompressed pair
    before = io.content_fingerprint(packed)
    (tmp_path / "zip.img.gz").write_bytes(gzip.compress(voxel_file.read_bytes()[:-2] + b"\1\1"))
    assert io.content_fingerprint(packed) != before
    (tmp_path / "zip.img.gz").write_bytes(gzip.compress(voxel_file.read_bytes())[:-200])  # cut short
    with pytest.raises(DeepWMLError, match="zip.img.gz is truncated"):
        io.read_image(packed)
    (tmp_path / "zip.img.gz").unlink()
    with pytest.raises(DeepWMLError, match="zip.img.gz is not beside it"):
        io.read_image(packed)
    shutil.copyfile(voxel_file, tmp_path / "zip.img")  # an uncompressed .img beside a .hdr.gz: not its voxel file
    with pytest.raises(DeepWMLError, match="zip.img.gz is not beside it"):
        io.read_image(packed)


def test_an_analyze_pair_and_broken_nifti_pairs_are_refused_saying_why(tmp_path):
    """Analyze 7.5 (no NIfTI mark) has no orientation: left and right are read in different ways by different
    software, so it is refused with how to convert it; a pair without its .img, or a truncated .img, says so."""
    _, header, voxel_file = _pair(tmp_path)
    analyze = tmp_path / "old.hdr"
    data = bytearray(header.read_bytes()[:348])
    data[344:348] = bytes(4)
    analyze.write_bytes(bytes(data))
    (tmp_path / "old.img").write_bytes(voxel_file.read_bytes())
    lonely = tmp_path / "lonely.hdr"
    lonely.write_bytes(header.read_bytes())
    short = tmp_path / "short.hdr"
    short.write_bytes(header.read_bytes())
    (tmp_path / "short.img").write_bytes(voxel_file.read_bytes()[:-100])
    one_file = tmp_path / "one.hdr"
    sitk.WriteImage(sitk.ReadImage(str(header)), str(tmp_path / "one.nii"))
    (tmp_path / "one.nii").rename(one_file)
    mixed = tmp_path / "mixed.HDR"
    mixed.write_bytes(header.read_bytes())
    (tmp_path / "mixed.img").write_bytes(voxel_file.read_bytes())
    for path, words in ((mixed, "rename the two files"), (analyze, "Analyze 7.5"), (analyze, "fslchfiletype"), (lonely, "lonely.img is not beside it"),
                        (short, "short.img is truncated"), (one_file, "rename it to .nii")):
        with pytest.raises(DeepWMLError, match=words):
            io.read_image(path)


def test_a_nifti_pairs_fingerprint_covers_its_voxel_file(tmp_path):
    """Two patients' pairs on one grid have byte-identical .hdr files: the skip check's fingerprint must see
    the .img, or a follow-up scan of that name would be skipped as done."""
    for folder, seed in (("p1", 0), ("p2", 9)):
        (tmp_path / folder).mkdir()
        _pair(tmp_path / folder, seed=seed)
    assert (tmp_path / "p1" / "case.hdr").read_bytes() == (tmp_path / "p2" / "case.hdr").read_bytes()
    assert io.content_fingerprint(tmp_path / "p1" / "case.hdr") != io.content_fingerprint(tmp_path / "p2" / "case.hdr")
    assert io.detached_data_files(tmp_path / "p1" / "case.hdr") == [tmp_path / "p1" / "case.img"]


def test_dicom_series_folder(tmp_path):
    image, _ = make_volume(size=(20, 16, 5), spacing=(0.8, 0.8, 5.0), dtype=sitk.sitkInt16)
    folder = write_dicom_series(tmp_path / "FLAIR_series", image)
    assert io.is_dicom_folder(folder)
    read = io.read_image(folder)
    assert read.GetSize() == image.GetSize()
    assert np.allclose(read.GetSpacing(), image.GetSpacing(), atol=1e-3)
    assert io.case_name(folder) == "FLAIR_series"



def test_a_folders_dicom_headers_are_read_once_in_a_run_and_again_where_it_changed(tmp_path, header_reads,
                                                                                   monkeypatch):
    """Within io.dicom_headers_read_once (a run), a folder's series asked for again (--series checked, then chosen; a
    FLAIR folder each DICOM SEG is placed by) are not read from its headers again, nor scanned by GDCM again
    (is_dicom_folder); a folder changed since is: a file added, one rewritten in place, one removed, a folder below
    added (a catalogue). Outside one, each call reads."""
    scans = []
    scan = io._gdcm_series_ids
    monkeypatch.setattr(io, "_gdcm_series_ids", lambda folder: scans.append(folder) or scan(folder))
    image, _ = make_volume(size=(20, 16, 4), spacing=(0.8, 0.8, 5.0), dtype=sitk.sitkInt16)
    folder = write_dicom_series(tmp_path / "s", image, uid="1.2.3.61", description="AX FLAIR", inversion_ms=2500,
                                number=3)
    uncached = io.dicom_series(folder)
    assert in_folder(header_reads, folder) == {1: 4}
    header_reads.clear()
    with io.dicom_headers_read_once():
        first = io.dicom_series(folder)
        assert io.series_named(first, "FLAIR") and io.choose_dicom_series(folder, "FLAIR")[0] == first[0] == uncached[0]
        with io.dicom_headers_read_once():  # nested (segment_cases inside the CLI's run): the same reading
            assert io.dicom_series(folder) == first
            assert io.is_dicom_folder(folder) and io.is_dicom_folder(folder) and scans == [folder]
        assert in_folder(header_reads, folder) == {1: 4}
        first.clear()  # each caller's own list
        assert io.dicom_series(folder) == uncached
        write_dicom_series(folder, image, uid="1.2.3.62", description="T1 SE", number=4, prefix="t1")  # added
        assert [s.description for s in io.dicom_series(folder)] == ["AX FLAIR", "T1 SE"]
        assert in_folder(header_reads, folder) == {2: 4, 1: 4}
        assert io.is_dicom_folder(folder) and scans == [folder, folder]
        before = (folder / "t1000.dcm").stat()
        for path in folder.glob("t1*"):  # rewritten in place, the same size (written again, a generated UID's length
            path.write_bytes(path.read_bytes().replace(b"T1 SE", b"T1 XE"))  # may differ: 1514 bytes against 1510)
        assert (folder / "t1000.dcm").stat().st_size == before.st_size
        assert [s.description for s in io.dicom_series(folder)] == ["AX FLAIR", "T1 XE"]
        for path in folder.glob("t1*"):
            path.unlink()
        assert io.dicom_series(folder) == uncached
        header_reads.clear()
        assert [s.uid for study in io.dicom_catalogue(tmp_path)[0] for s in study.series] == ["1.2.3.61"]
        write_dicom_series(tmp_path / "below" / "t", image, uid="1.2.3.63", description="T2", number=5)
        assert sorted(s.uid for study in io.dicom_catalogue(tmp_path)[0] for s in study.series) == ["1.2.3.61",
                                                                                                    "1.2.3.63"]
        assert in_folder(header_reads, folder) == {2: 4}
        assert io.dicom_catalogue(tmp_path)[0] and in_folder(header_reads, folder) == {2: 4}
    header_reads.clear()
    assert io._header_cache is None and io.dicom_series(folder) == io.dicom_series(folder) == uncached
    assert in_folder(header_reads, folder) == {2: 4}
    # the least recently asked for forgotten past so many files (each folder: itself and its 4 files, 5): two folders
    monkeypatch.setattr(io, "_HEADER_CACHE_FILES", 10)
    others = [write_dicom_series(tmp_path / f"o{k}", image, uid=f"1.2.3.7{k}") for k in range(2)]
    header_reads.clear()
    with io.dicom_headers_read_once():
        for path in (folder, others[0], folder, others[1], folder, others[0]):  # o0 forgotten, not the folder asked
            io.dicom_series(path)  # for since
        assert len(io._header_cache) == 2
    assert in_folder(header_reads, folder) == {1: 4} and in_folder(header_reads, others[1]) == {1: 4}
    assert in_folder(header_reads, others[0]) == {2: 4}
    monkeypatch.setattr(io, "_HEADER_CACHE_FILES", 4)  # a folder of more files than that is not kept
    header_reads.clear()
    with io.dicom_headers_read_once():
        assert io.dicom_series(folder) == io.dicom_series(folder) == uncached and io._header_cache == {}
    assert in_folder(header_reads, folder) == {2: 4}


def test_a_run_of_many_dicom_folders_reads_each_once(tmp_path, header_reads, monkeypatch):
    """A run of 40 DICOM series folders (segment's inputs expanded, io.is_dicom_folder of each, then each case:
    is_dicom_folder again and its series chosen; train's fingerprints of every case's series, then its preparation)
    reads each folder once: the cache kept 32 folders, so each folder's GDCM scan and headers were forgotten before
    its case came, and read again (as with no cache)."""
    scans = []
    scan = io._gdcm_series_ids
    monkeypatch.setattr(io, "_gdcm_series_ids", lambda folder: scans.append(folder) or scan(folder))
    image, _ = make_volume(size=(8, 8, 2), spacing=(1.0, 1.0, 5.0), dtype=sitk.sitkInt16)
    folders = [write_dicom_series(tmp_path / f"s{k:02d}", image, uid=f"1.2.3.8.{k}", description="AX FLAIR",
                                  inversion_ms=2500, number=1) for k in range(40)]
    with io.dicom_headers_read_once():
        assert all(io.is_dicom_folder(f) for f in folders)
        for folder in folders:
            assert io.is_dicom_folder(folder) and io.choose_dicom_series(folder, option=None)[0].number == 1
        assert [io.dicom_series(f)[0].uid for f in folders] == [f"1.2.3.8.{k}" for k in range(40)]
    assert sorted(scans) == folders and all(in_folder(header_reads, f) == {1: 2} for f in folders)

def _times_stand_still(monkeypatch) -> None:
    """io._folder_state as on a file system whose clock has not moved on since a folder was first looked at (one tick
    of a coarse clock; up to 2 s on FAT): each folder's first state given again, so that a file rewritten in place
    with its size keeps its times (mtime and ctime), as it then does."""
    states = {}
    state = io._folder_state
    monkeypatch.setattr(io, "_folder_state",
                        lambda root, recursive: states.setdefault((str(root), recursive), state(root, recursive)))


def test_a_slice_rewritten_within_the_tick_it_was_written_in_is_read_again(tmp_path, header_reads, monkeypatch):
    """A slice rewritten in place with its size in the tick of the file system's clock it was written in keeps its
    name, inode, size, mtime and ctime: nothing in its folder's state tells the change (git's "racily clean" entry).
    Its folder, read 1 s after its files were written (within io._RACY_NS), is not kept but read again when asked for
    again, naming the new description; it was kept, and the earlier answer ("AX FLAIR") given for the rewritten
    folder (its 4 headers read once)."""
    image, _ = make_volume(size=(8, 8, 4), spacing=(1.0, 1.0, 5.0), dtype=sitk.sitkInt16)
    folder = write_dicom_series(tmp_path / "s", image, uid="1.2.3.97", description="AX FLAIR", inversion_ms=2500,
                                number=1)
    written = max(max(p.stat().st_mtime_ns, p.stat().st_ctime_ns) for p in folder.iterdir())
    monkeypatch.setattr(io, "_now_ns", lambda: written + 10**9, raising=False)
    _times_stand_still(monkeypatch)
    with io.dicom_headers_read_once():
        assert [s.description for s in io.dicom_series(folder)] == ["AX FLAIR"]
        for p in folder.iterdir():  # the description's bytes rewritten in place: the same size, the same inode
            data = p.read_bytes()
            with open(p, "r+b") as f:
                f.write(data.replace(b"AX FLAIR", b"AX FLAIX"))
        assert [s.description for s in io.dicom_series(folder)] == ["AX FLAIX"]
        assert io._header_cache == {}
    assert in_folder(header_reads, folder) == {2: 4}


@pytest.mark.parametrize("mtime_s, after_ns, reads", [
    (-3600, io._RACY_NS, 2),  # copied keeping its times (cp -p): its ctime, not its mtime, just within the bound
    (-3600, io._RACY_NS + 1, 1),  # just past it
    (-3600, 600 * 10**9, 1),  # an export written 10 minutes before the run
    (3600, 600 * 10**9, 2),  # a modification time ahead of this machine's clock (another machine's, a skewed server)
])
def test_a_folder_is_kept_once_its_files_are_older_than_the_racy_bound(tmp_path, header_reads, monkeypatch, mtime_s,
                                                                       after_ns, reads):
    """A folder whose files' modification times are `mtime_s` from now, asked for twice in a run `after_ns` after its
    files' change times (ctime, set now): kept (its 4 headers read once) only where both times are more than
    io._RACY_NS before the reading; else read again ({2: 4}), as a change in the tick of those times could not be
    told. Not the modification time alone (a copy keeping its times), nor the change time alone."""
    image, _ = make_volume(size=(8, 8, 4), spacing=(1.0, 1.0, 5.0), dtype=sitk.sitkInt16)
    folder = write_dicom_series(tmp_path / "s", image, uid="1.2.3.98", description="AX FLAIR", number=1)
    when = time.time_ns() + mtime_s * 10**9
    for p in folder.iterdir():
        os.utime(p, ns=(when, when))
    changed = max(p.stat().st_ctime_ns for p in folder.iterdir())
    monkeypatch.setattr(io, "_now_ns", lambda: changed + after_ns)
    _times_stand_still(monkeypatch)
    with io.dicom_headers_read_once():
        assert io.dicom_series(folder) == io.dicom_series(folder)
        assert len(io._header_cache) == (1 if reads == 1 else 0)
    assert in_folder(header_reads, folder) == {reads: 4}


def test_a_dicom_series_whose_slices_are_rescaled_unlike_its_first_keeps_each_slices_real_values(tmp_path):
    """Philips exports give each slice its own Rescale Slope / Intercept, and some exports tag only some slices:
    ITK took the series' pixel type from the first slice (no rescale: unsigned 16-bit) and cast the others' real
    values into it, a background of -30 wrapping to 65506 and fractions cut off, so the network saw slices of
    another brightness (a real scan so exported: 0 ml, 0 lesions; read right, 2.80 ml, 55 lesions)."""
    pydicom = pytest.importorskip("pydicom")
    real, _ = make_volume(size=(20, 16, 5), spacing=(0.8, 0.8, 5.0))
    real = sitk.Round(real) - 50.0  # (make_volume's background is ~20: here below 0, as rescaled slices can be)
    unscaled = write_dicom_series(tmp_path / "unscaled", sitk.Cast(real + 50.0, sitk.sitkUInt16))
    # stored (real + 60) * 3, then tagged: GDCM given a float image and these tags wrote classic MR files in some
    # processes and, in others (this test run alone), Enhanced MR ones, whose positions are in functional groups
    rescaled = write_dicom_series(tmp_path / "series", sitk.Cast((real + 60.0) * 3.0, sitk.sitkUInt16))
    for path in sorted(rescaled.glob("*.dcm"))[1:]:
        data = pydicom.dcmread(path)
        data.RescaleSlope, data.RescaleIntercept = "0.3333333333", "-60"
        data.save_as(path)
    (unscaled / "slice000.dcm").replace(rescaled / "slice000.dcm")  # the first slice untagged, its stored values real
    assert {pydicom.dcmread(path).SOPClassUID for path in rescaled.glob("*.dcm")} == {"1.2.840.10008.5.1.4.1.1.4"}
    expected = sitk.GetArrayFromImage(real)
    expected[0] += 50.0
    read = sitk.GetArrayFromImage(io.read_image(rescaled))
    assert np.abs(read - expected).max() < 1e-3


def test_a_folder_of_dicom_files_gdcm_cannot_read_says_why_not_that_it_holds_no_series(tmp_path):
    """A series compressed in a transfer syntax GDCM does not decode (JPEG XL) was "a folder without a DICOM
    series or image files", which sent the user looking for files that are there."""
    image, _ = make_volume(size=(20, 16, 5), spacing=(0.8, 0.8, 5.0), dtype=sitk.sitkInt16)
    compressed = write_dicom_series(tmp_path / "jpegxl", image)
    relabel_transfer_syntax(compressed, "1.2.840.10008.1.2.4.110")
    with pytest.raises(DeepWMLError, match=r"holds 5 DICOM file\(s\) compressed in a way GDCM .* cannot decode "
                                           r"\(transfer syntax 1\.2\.840\.10008\.1\.2\.4\.110\): export the series again"):
        io.read_image(compressed)


@pytest.mark.parametrize("syntax, label", [("1.2.840.10008.1.2.2", "Explicit VR Big Endian"),
                                           ("1.2.840.10008.1.2.1.99", "Deflated Explicit VR Little Endian")])
def test_dicom_files_labelled_big_endian_or_deflated_but_not_so_encoded_are_refused_promptly(tmp_path, syntax, label):
    """Files whose file meta header says Explicit VR Big Endian (or Deflated) while their data set is implicit VR
    little endian (a fuzzing audit's; a broken export): GDCM, reading the lengths big endian, set aside and
    cleared about a gigabyte for each such file, about 3 s a file at each of the series' three readings (a
    200-file series with 5 of them: over a minute), and read the slices right in the end; deflated ones it
    cannot read were skipped, the series then refused for a slice missing. Both refused at once, the files named,
    before GDCM sees them; in a folder given and in an export's study alike. A series of such files only is listed
    (their Series Instance UID and description read as their data set is encoded) and refused when read; files
    whose series cannot be told (no Series Instance UID) in a folder of their own: a failing case of the export,
    not left out."""
    image, _ = make_volume(size=(64, 64, 6), spacing=(0.8, 0.8, 5.0), dtype=sitk.sitkInt16)
    folder = write_dicom_series(tmp_path / "export" / "series", image, description="AX FLAIR")
    relabel_transfer_syntax(folder, syntax, names=["slice002.dcm", "slice005.dcm"])
    said = (rf"2 of its DICOM files \(slice002\.dcm, slice005\.dcm\) are labelled {label} \(Transfer Syntax UID "
            rf"{re.escape(syntax)} in their file meta header\), but their data set is implicit VR little endian")
    start = time.monotonic()
    assert io.is_dicom_folder(folder)
    with pytest.raises(DeepWMLError, match=said):
        io.read_image(folder)
    alone = write_dicom_series(tmp_path / "export" / "alone", image[:, :, :3], uid="1.2.3.9", description="AX FLAIR 2")
    relabel_transfer_syntax(alone, syntax)  # every file: a series of such files only, listed, refused when read
    nameless = write_dicom_series(tmp_path / "export" / "nameless", image[:, :, :3], uid="1.2.3.10")
    relabel_transfer_syntax(nameless, syntax)
    for path in nameless.iterdir():  # no Series Instance UID (0020,000e): its series cannot be told
        path.write_bytes(path.read_bytes().replace(b"\x20\x00\x0e\x00", b"\x21\x00\x0e\x00", 1))
    (study,), problems = io.dicom_catalogue(tmp_path / "export")
    assert [(s.description, len(s.files)) for s in study.series] == [("AX FLAIR", 4), ("AX FLAIR 2", 3)]
    with pytest.raises(DeepWMLError, match=said):
        io.read_image(study.folder, series=study.series[0])
    with pytest.raises(DeepWMLError, match=f"{re.escape(str(alone))}: 3 of its DICOM files"):
        io.read_image(study.folder, series=study.series[1])
    assert problems == [f"{nameless} cannot be read: 3 of its DICOM files (slice000.dcm, slice001.dcm, slice002.dcm) are "
                        f"labelled {label} (Transfer Syntax UID {syntax} in their file meta header), but their data set "
                        "is implicit VR little endian: a damaged or mislabelled export, which the DICOM library reads "
                        "slowly if at all (seconds and a gigabyte of memory a file); export the series again from the "
                        "scanner or PACS (or move those files out of the folder if they are not the series')"]
    with pytest.raises(DeepWMLError, match=f"{re.escape(str(alone))}: 3 of its DICOM files"):
        io.read_image(alone)
    assert time.monotonic() - start < 5  # 18 s and more before (big endian)


@pytest.mark.parametrize("syntax", ["1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"])
def test_a_mislabelled_dicom_file_blocks_its_own_series_only(tmp_path, syntax):
    """A file labelled big endian or deflated whose data set is little endian was refused with every series of its
    folder (its series unknown: GDCM is not given it): one such T1 file blocked the FLAIR beside it. Its series is
    read from its data set as encoded: the refusal, naming the file, is its series' alone; the other series are
    listed and read."""
    flair, _ = make_volume(size=(20, 16, 5), spacing=(0.8, 0.8, 5.0), dtype=sitk.sitkInt16)
    t1, _ = make_volume(size=(20, 16, 4), spacing=(0.8, 0.8, 5.0), dtype=sitk.sitkInt16, seed=3)
    folder = write_dicom_series(tmp_path / "study", flair, uid="1.2.3.4.1", description="AX FLAIR", prefix="a_")
    write_dicom_series(folder, t1, uid="1.2.3.4.2", description="AX T1", prefix="b_")
    relabel_transfer_syntax(folder, syntax, names=["b_002.dcm"])
    listed = io.dicom_series(folder)
    assert [(s.description, len(s.files), len(s.mislabelled)) for s in listed] == [("AX FLAIR", 5, 0), ("AX T1", 3, 1)]
    read = io.read_image(folder)  # the FLAIR, chosen by its description
    assert np.array_equal(sitk.GetArrayFromImage(read), sitk.GetArrayFromImage(flair).astype(np.float32))
    with pytest.raises(DeepWMLError, match=rf"{re.escape(str(folder))}: 1 of its DICOM files \(b_002\.dcm\) are labelled"):
        io.read_image(folder, series="AX T1")
    relabel_transfer_syntax(folder, syntax, names=[f"b_00{k}.dcm" for k in (0, 1, 3)])  # the whole T1: still listed
    assert [(s.description, len(s.files)) for s in io.dicom_series(folder)] == [("AX FLAIR", 5), ("AX T1", 4)]
    assert io.read_image(folder).GetSize() == flair.GetSize()
    with pytest.raises(DeepWMLError, match=r"4 of its DICOM files \(b_000\.dcm, b_001\.dcm, b_002\.dcm and 1 more\)"):
        io.read_image(folder, series="AX T1")
    relabel_transfer_syntax(folder, syntax, names=["a_003.dcm"])  # and one of the FLAIR's: the FLAIR refused
    with pytest.raises(DeepWMLError, match=r"1 of its DICOM files \(a_003\.dcm\) are labelled"):
        io.read_image(folder, series="AX FLAIR")


@pytest.mark.parametrize("syntax", ["1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"])
def test_a_series_truly_in_big_endian_or_deflated_is_read(tmp_path, syntax):
    """Files encoded as their header says, explicit VR big endian or deflated, pass the check of that header
    (`_mislabelled_syntax`) and are read voxel for voxel, in their place."""
    image, _ = make_volume(size=(24, 20, 4), spacing=(0.8, 0.7, 5.0), dtype=sitk.sitkInt16)
    folder = encoded_dicom_series(tmp_path / "series", image, syntax)
    assert not any(io._mislabelled_syntax(str(path)) for path in folder.iterdir())
    read = io.read_image(folder)
    assert io.grid_difference(read, image) is None
    assert np.array_equal(sitk.GetArrayFromImage(read), sitk.GetArrayFromImage(image).astype(np.float32))


def _set_us(path: Path, tag: bytes, value: int) -> None:
    """Give an implicit VR little endian file's US element (group and element bytes `tag`) another value."""
    data = path.read_bytes()
    at = data.index(tag + b"\x02\x00\x00\x00")
    path.write_bytes(data[:at + 8] + struct.pack("<H", value) + data[at + 10:])


@pytest.mark.parametrize("which, tag, value", [("all", b"\x28\x00\x10\x00", 128), ("all", b"\x28\x00\x10\x00", 512),
                                               ("all", b"\x28\x00\x11\x00", 255), ("one", b"\x28\x00\x10\x00", 128),
                                               ("all", b"\x28\x00\x00\x01", 8)])
def test_dicom_images_whose_header_does_not_fit_their_pixel_data_are_refused(tmp_path, which, tag, value):
    """Rows (0028,0010), Columns (0028,0011) or Bits Allocated (0028,0100) changed in the header (a fuzzing audit's;
    a damaged file) while the Pixel Data holds 256 x 256 x 2 bytes: GDCM read every slice as a 128-row image of
    its first half without an error, 512 rows as leftover memory past it (refused by luck, as values that wrapped
    around), one file so changed as "another image shares its series UID". Refused naming the file and the sizes."""
    image, _ = make_volume(size=(256, 256, 3), spacing=(0.9, 0.9, 5.0), dtype=sitk.sitkInt16)
    folder = write_dicom_series(tmp_path / "series", image, description="AX FLAIR")
    for path in sorted(folder.iterdir())[:1 if which == "one" else None]:
        _set_us(path, tag, value)
    shape = {b"\x28\x00\x10\x00": (value, 256, 16), b"\x28\x00\x11\x00": (256, value, 16),
             b"\x28\x00\x00\x01": (256, 256, value)}[tag]
    with pytest.raises(DeepWMLError, match=rf"the DICOM file slice000\.dcm gives {shape[0]} rows x {shape[1]} columns of "
                                           rf"{shape[2]} bits \({shape[0] * shape[1] * shape[2] // 8} bytes\), but its "
                                           r"Pixel Data holds 131072 bytes"):
        io.read_image(folder)


def _colour_series(folder: Path, photometric: str, pixel_bytes: int, slices: int = 3) -> Path:
    """An 8-bit colour (Samples per Pixel 3) DICOM series of 6 x 4 pixels written by hand in explicit VR little
    endian, its Photometric Interpretation `photometric`, each Pixel Data `pixel_bytes` long."""

    def element(tag: int, vr: str, value) -> bytes:
        value = value.encode() + (b"\0" if vr == "UI" else b" ") * (len(value) % 2) if isinstance(value, str) else value
        if vr == "OB":
            return struct.pack("<HH2sHI", tag >> 16, tag & 0xFFFF, b"OB", 0, len(value)) + value
        return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr.encode(), len(value)) + value

    folder.mkdir(parents=True)
    for k in range(slices):
        sop = f"1.2.3.4.77.{k + 1}"
        meta = (element(0x00020001, "OB", b"\0\1") + element(0x00020002, "UI", "1.2.840.10008.5.1.4.1.1.7")
                + element(0x00020003, "UI", sop) + element(0x00020010, "UI", "1.2.840.10008.1.2.1"))
        us = lambda value: struct.pack("<H", value)  # noqa: E731
        body = b"".join([element(0x00080016, "UI", "1.2.840.10008.5.1.4.1.1.7"), element(0x00080018, "UI", sop),
                         element(0x00080060, "CS", "MR"), element(0x0020000D, "UI", "1.2.3.4"),
                         element(0x0020000E, "UI", "1.2.3.4.77"), element(0x00200013, "IS", str(k + 1)),
                         element(0x00200032, "DS", f"0\\0\\{5 * k}"), element(0x00200037, "DS", "1\\0\\0\\0\\1\\0"),
                         element(0x00280002, "US", us(3)), element(0x00280004, "CS", photometric),
                         element(0x00280006, "US", us(0)), element(0x00280010, "US", us(4)),
                         element(0x00280011, "US", us(6)), element(0x00280030, "DS", "1\\1"),
                         element(0x00280100, "US", us(8)), element(0x00280101, "US", us(8)),
                         element(0x00280102, "US", us(7)), element(0x00280103, "US", us(0)),
                         element(0x7FE00010, "OB", bytes(range(pixel_bytes)))])
        (folder / f"slice{k:03d}.dcm").write_bytes(b"\0" * 128 + b"DICM" + element(0x00020000, "UL", struct.pack(
            "<I", len(meta))) + meta + body)
    return folder


@pytest.mark.parametrize("photometric, pixel_bytes, misfit", [("RGB", 72, False), ("YBR_FULL", 72, False),
                                                              ("YBR_FULL_422", 48, False), ("YBR_PARTIAL_422", 48, False),
                                                              ("YBR_FULL_422", 72, True), ("RGB", 48, True)])
def test_uncompressed_ybr_422_pixel_data_is_two_samples_a_pixel_not_a_damaged_header(tmp_path, photometric,
                                                                                    pixel_bytes, misfit):
    """YBR_FULL_422 (and the retired YBR_PARTIAL_422) uncompressed keeps one Cb and one Cr for each two pixels
    (PS3.3 C.7.6.3.1.2): 2 bytes a pixel of 8 bits for its 3 samples, so 6 x 4 pixels hold 48 bytes, not 72: such a
    file was refused as a damaged header. Such a colour series is still refused, for its colour (3 values a voxel)."""
    folder = _colour_series(tmp_path / "colour", photometric, pixel_bytes)
    said = io._pixel_data_misfit(str(folder / "slice000.dcm"))
    assert (said is not None) == misfit, said
    with pytest.raises(DeepWMLError) as refused:
        io.read_image(folder)
    assert ("Pixel Data holds" in str(refused.value)) == misfit, str(refused.value)


def _pad_pixel_data(path: Path, pad: bytes) -> None:
    """Append `pad` to the Pixel Data (its last element) of an implicit VR little endian file `write_dicom_series`
    wrote, its length made to match."""
    data = path.read_bytes()
    at = data.rindex(b"\xe0\x7f\x10\x00")
    length = struct.unpack_from("<I", data, at + 4)[0]
    assert at + 8 + length == len(data)
    path.write_bytes(data[:at + 4] + struct.pack("<I", length + len(pad)) + data[at + 8:] + pad)


@pytest.mark.parametrize("syntax", ["1.2.840.10008.1.2", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"])
@pytest.mark.parametrize("pad", [bytes(2048), b"\xff" * 1000, bytes(96 * 10)])
def test_dicom_pixel_data_padded_past_its_image_is_read_voxel_for_voxel(tmp_path, syntax, pad):
    """Excess padding after the pixels (PS3.5 8.1.1: older applications sent it), one value repeated (2 kB of
    zeros, 1000 bytes of 0xff, 10 columns' worth of zeros, which a Columns 10 too small would leave too): longer
    than a row, it was refused as a damaged header, though GDCM reads the pixels before it right. Read voxel for
    voxel, in implicit VR little endian, explicit VR big endian and deflated files alike."""
    image, _ = make_volume(size=(64, 48, 4), spacing=(0.9, 0.9, 5.0), dtype=sitk.sitkInt16)
    if syntax == "1.2.840.10008.1.2":
        folder = write_dicom_series(tmp_path / "padded", image, description="AX FLAIR")
        for path in folder.iterdir():
            _pad_pixel_data(path, pad)
    else:
        folder = encoded_dicom_series(tmp_path / "padded", image, syntax, pad=pad)
    read = io.read_image(folder)
    assert io.grid_difference(read, image) is None
    assert np.array_equal(sitk.GetArrayFromImage(read), sitk.GetArrayFromImage(image).astype(np.float32))


def _rectangular_phantom(blank_rows: int = 0) -> sitk.Image:
    """An int16 phantom of 48 rows x 64 columns x 3 slices (a rectangular field of view), its last `blank_rows` rows 0."""
    image, _ = make_volume(size=(64, 48, 3), spacing=(0.9, 0.9, 5.0), dtype=sitk.sitkInt16)
    if blank_rows:
        array = sitk.GetArrayFromImage(image)
        array[:, -blank_rows:, :] = 0
        image = _with_array(image, array)
    return image


@pytest.mark.parametrize("blank", [False, True])
def test_dicom_images_of_a_columns_too_small_are_refused_even_where_fewer_bytes_than_a_row_or_blank_ones_are_left(
        tmp_path, blank):
    """Columns (0028,0011) one too small in an image of fewer rows than columns (48 x 64, as a rectangular field of
    view gives) leaves 48 pixels past the image, fewer than a row: taken for padding, and GDCM read every row
    sheared by one more pixel without an error. Refused; also where those pixels are blank (zeros, as padding
    is): the image reads as one in 64 columns, not in 63."""
    folder = write_dicom_series(tmp_path / "series", _rectangular_phantom(6 if blank else 0), description="AX FLAIR")
    for path in folder.iterdir():
        _set_us(path, b"\x28\x00\x11\x00", 63)
    with pytest.raises(DeepWMLError, match=r"slice000\.dcm gives 48 rows x 63 columns of 16 bits \(6048 bytes\), but its "
                                           r"Pixel Data holds 6144 bytes" + (r", which 48 rows x 64 columns would hold"
                                                                              if blank else "")):
        io.read_image(folder)


def test_dicom_images_of_a_rows_too_small_are_read_in_place_where_only_blank_rows_are_left_and_all_agree(tmp_path):
    """Rows (0028,0010) too small leaves the image's bottom rows past it: where those are blank (one value, as
    padding is) the rows read are the image's own, in their place, and the series is read without them (it was
    refused); where one file alone gives fewer rows, it is refused, named, as a damaged header (not as another image
    sharing the series UID)."""
    image = _rectangular_phantom(6)
    folder = write_dicom_series(tmp_path / "series", image, description="AX FLAIR")
    for path in folder.iterdir():
        _set_us(path, b"\x28\x00\x10\x00", 42)
    read = io.read_image(folder)
    assert io.grid_difference(read, image[:, :42, :]) is None
    assert np.array_equal(sitk.GetArrayFromImage(read), sitk.GetArrayFromImage(image)[:, :42, :].astype(np.float32))
    one = write_dicom_series(tmp_path / "one", image, description="AX FLAIR")
    _set_us(one / "slice001.dcm", b"\x28\x00\x10\x00", 42)
    with pytest.raises(DeepWMLError, match=r"the DICOM file slice001\.dcm gives 42 rows x 64 columns of 16 bits \(5376 "
                                           r"bytes\), but its Pixel Data holds 6144 bytes, and the series' other images "
                                           r"are 48 rows x 64 columns \(a damaged header"):
        io.read_image(one)


@pytest.mark.parametrize("syntax", ["1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"])
def test_big_endian_and_deflated_dicom_images_whose_header_does_not_fit_their_pixel_data_are_refused(tmp_path, syntax):
    """The Pixel Data's length was checked in little-endian files only: a big endian or deflated series whose Rows
    were halved was read as the first half of each slice, without an error. Refused, naming the file and sizes."""
    image, _ = make_volume(size=(64, 48, 3), spacing=(0.9, 0.9, 5.0), dtype=sitk.sitkInt16)
    folder = encoded_dicom_series(tmp_path / "series", image, syntax, rows=24)
    with pytest.raises(DeepWMLError, match=r"slice000\.dcm gives 24 rows x 64 columns of 16 bits \(3072 bytes\), but its "
                                           r"Pixel Data holds 6144 bytes"):
        io.read_image(folder)


def _with_array(image: sitk.Image, array: np.ndarray) -> sitk.Image:
    """`array` on `image`'s grid."""
    made = sitk.GetImageFromArray(array)
    made.CopyInformation(image)
    return made


def _study(folder, *series):
    """A folder holding several DICOM series: (description, inversion ms, repetition ms, slices) each,
    told apart by their number of slices."""
    for number, (description, inversion, repetition, slices) in enumerate(series, start=1):
        image, _ = make_volume(size=(20, 16, slices), spacing=(0.8, 0.8, 5.0), dtype=sitk.sitkInt16)
        write_dicom_series(folder, image, uid=f"1.2.3.4.{number}", description=description, inversion_ms=inversion,
                           repetition_ms=repetition, prefix=f"s{number}_")
    return folder


def test_dicom_study_folder_reads_its_flair(tmp_path):
    """A study exported as one folder (T1, T2 and FLAIR series side by side): the FLAIR is read, by
    its description; without descriptions by its long inversion time."""
    study = _study(tmp_path / "study", ("AX T1 SE", None, 500, 4), ("AX T2 TSE", None, 4000, 3),
                   ("AX T2 FLAIR", 2500, 9000, 5))
    assert io.is_dicom_folder(study)
    chosen, how = io.choose_dicom_series(study)
    assert chosen.description == "AX T2 FLAIR" and chosen.inversion_ms == 2500 and len(chosen.files) == 5
    assert how == "the only one of 3 series that looks like a FLAIR"
    assert io.read_image(study).GetSize()[2] == 5
    assert io.read_image(study, series="t2 tse").GetSize()[2] == 3  # a part of the description, any case
    assert io.read_image(study, series="1.2.3.4.1").GetSize()[2] == 4  # or the series UID
    plain = _study(tmp_path / "plain", (None, 900, 2000, 4), (None, 2200, 9000, 5), (None, 150, 5000, 3))
    assert io.read_image(plain).GetSize()[2] == 5  # not T1-FLAIR (TI 900 ms), not STIR (150 ms)
    # Siemens names its 3D FLAIR t2_spc_da-fl: without an inversion time in the header (an Enhanced MR file
    # keeps it in its functional groups) that description alone was "none looks like a FLAIR"
    siemens = _study(tmp_path / "siemens", ("t1_mprage_sag_p2_iso", None, 2300, 4),
                     ("t2_spc_da-fl_sag_p2_iso", None, 5000, 5), ("t2_tse_tra", None, 6000, 3))
    assert io.choose_dicom_series(siemens)[0].description == "t2_spc_da-fl_sag_p2_iso"


def test_a_study_is_read_in_slice_order_whatever_its_file_names(tmp_path):
    """The series are listed from one pass over the files' headers (in name order); the series read is
    sorted by slice position, so files named against their slice order, interleaved with another
    series' and beside files that are not DICOM, still give the series' own volume."""
    flair, _ = make_volume(size=(20, 16, 6), spacing=(0.8, 0.8, 5.0), dtype=sitk.sitkInt16, seed=3)
    other, _ = make_volume(size=(20, 16, 4), spacing=(0.8, 0.8, 5.0), dtype=sitk.sitkInt16, seed=4)
    study = write_dicom_series(tmp_path / "study", flair, uid="1.2.3.4.1", description="AX FLAIR", inversion_ms=2500)
    write_dicom_series(study, other, uid="1.2.3.4.2", description="AX T1", prefix="t")
    for k in range(6):  # slice 0 gets the last name, and every name sits between the other series' names
        (study / f"slice{k:03d}.dcm").rename(study / f"t{5 - k:03d}x.dcm")
    (study / "DICOMDIR").write_bytes(b"not an image")
    (study / "notes.txt").write_text("exported by PACS")
    chosen, _ = io.choose_dicom_series(study)
    assert chosen.description == "AX FLAIR" and len(chosen.files) == 6
    read = io.read_image(study)
    assert io.grid_difference(read, flair) is None
    assert np.array_equal(sitk.GetArrayFromImage(read), sitk.GetArrayFromImage(flair).astype(np.float32))


@pytest.mark.parametrize("series,choice,words", [
    ((("AX FLAIR", 2500, 9000, 5), ("AX FLAIR post", 2500, 9000, 4)), None, "2 look like a FLAIR"),
    ((("AX T1", None, 500, 4), ("AX T2", None, 4000, 3)), None, "none looks like a FLAIR"),
    ((("AX FLAIR", 2500, 9000, 5), ("AX FLAIR post", 2500, 9000, 4)), "flair post", None),  # whole description
    ((("AX FLAIR", 2500, 9000, 5), ("AX FLAIR post", 2500, 9000, 4)), "fla", "2 match series 'fla'"),
    ((("AX FLAIR", 2500, 9000, 5), ("AX T1", None, 500, 4)), "dwi", "none match series 'dwi'"),
    ((("AX T1 FLAIR", 860, 2000, 5), ("t2_tirm_cor STIR", 160, 5000, 4), ("3D DIR", 3400, 7500, 3)), None,
     "none looks like a FLAIR"),  # T1-weighted inversion recovery, STIR and double inversion recovery are not FLAIR
])
def test_dicom_study_folder_that_needs_a_choice(tmp_path, series, choice, words):
    """Several candidates, none, or an ambiguous choice: refused, listing every series and the way out."""
    study = _study(tmp_path / "study", *series)
    if words is None:  # an exact description wins over the longer ones that contain it
        assert io.read_image(study, series=choice).GetSize()[2] == 4
        assert io.read_image(study, series="ax flair").GetSize()[2] == 5
        return
    with pytest.raises(DeepWMLError) as error:
        io.read_image(study, series=choice)
    message = str(error.value)
    assert words in message and "--series" in message
    assert all(f"'{description}' ({slices} images" in message for description, _, _, slices in series)


def test_dicom_series_chosen_by_timing_number_and_the_listing_of_a_long_study(tmp_path):
    """A T1-FLAIR beside the FLAIR does not make it ambiguous; a series number chooses; a choice that the
    only series does not match is refused; thirty long-named series keep the error short, candidates first."""
    study = _study(tmp_path / "ge", ("AX T1 FLAIR", 860, 2000, 4), ("AX T2 FLAIR", 2400, 9000, 5), ("AX T2 FSE", None, 4000, 3))
    chosen, how = io.choose_dicom_series(study)
    assert chosen.description == "AX T2 FLAIR" and how == "the only one of 3 series that looks like a FLAIR"
    numbered = tmp_path / "numbered"
    for number, slices in ((7, 3), (12, 4)):
        image, _ = make_volume(size=(20, 16, slices), spacing=(0.8, 0.8, 5.0), dtype=sitk.sitkInt16)
        write_dicom_series(numbered, image, uid=f"1.9.{number}", description="FLAIR", number=number, prefix=f"n{number}_")
    assert io.read_image(numbered, series="12").GetSize()[2] == 4
    assert io.choose_dicom_series(numbered, "7", "--series")[0].label() == "series 7 'FLAIR' (3 images)"
    single = _study(tmp_path / "single", ("AX T1 SE", None, 500, 4))
    with pytest.raises(DeepWMLError, match="none match series 'flair'"):
        io.read_image(single, series="flair")
    many = tmp_path / "many"
    image, _ = make_volume(size=(8, 8, 2), spacing=(0.8, 0.8, 5.0), dtype=sitk.sitkInt16)
    for number in range(30):
        flair = number in (27, 28)
        write_dicom_series(many, image, uid=f"1.8.{number}", number=number, prefix=f"m{number}_",
                           description=f"{'FLAIR' if flair else 'localizer'} protocol with a very long name {number:02d} xxxxxxxxx",
                           inversion_ms=2500 if flair else None)
    with pytest.raises(DeepWMLError) as error:
        io.read_image(many)
    message = str(error.value)
    assert len(message) < 600 and "2 look like a FLAIR" in message and "more" in message
    assert message.index("series 27") < message.index("series 0 ")  # the candidates first


def test_a_latin1_series_description_is_text(tmp_path):
    """European exports write descriptions in Latin-1 (ISO_IR 100): read as text, written to UTF-8 files."""
    image, _ = make_volume(size=(20, 16, 4), spacing=(0.8, 0.8, 5.0), dtype=sitk.sitkInt16)
    folder = write_dicom_series(tmp_path / "latin", image, description="FLAIR Sch@del\nax", inversion_ms=2500)
    for path in folder.iterdir():
        path.write_bytes(path.read_bytes().replace(b"Sch@del", b"Sch\xe4del"))
    other, _ = make_volume(size=(20, 16, 3), spacing=(0.8, 0.8, 5.0), dtype=sitk.sitkInt16)
    write_dicom_series(folder, other, uid="1.2.9", description="T1", prefix="t1_")
    chosen, _ = io.choose_dicom_series(folder)
    assert chosen.description == "FLAIR Sch\u00e4del ax"  # one line, no control characters
    chosen.label().encode("utf-8")
    assert io.read_image(folder, series="schädel").GetSize()[2] == 4


def _write(path, array, spacing=None):
    image = sitk.GetImageFromArray(array, isVector=array.ndim == 4 and array.shape[-1] == 3)
    if spacing:
        image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))
    return path


def bad_inputs(tmp_path):
    """(name, path, words the message must contain)."""
    good, _ = make_volume(size=(20, 16, 6))
    sitk.WriteImage(good, str(tmp_path / "good.nii.gz"))
    data = (tmp_path / "good.nii.gz").read_bytes()
    (tmp_path / "truncated.nii.gz").write_bytes(data[: len(data) // 2])
    raw = gzip.decompress(data)
    (tmp_path / "truncated_raw.nii").write_bytes(raw[: len(raw) - 500])
    (tmp_path / "text.nii.gz").write_text("this is not an image\n")
    (tmp_path / "text.nrrd").write_text("hello\n")
    (tmp_path / "empty.nii.gz").write_bytes(b"")
    (tmp_path / "flair.png.txt").write_text("x")
    nan = sitk.GetArrayFromImage(good)
    nan[2, 3, 4] = np.nan
    nan[1, 1, 1] = np.inf
    return [
        ("missing", tmp_path / "nope.nii.gz", "does not exist"),
        ("truncated gzip", tmp_path / "truncated.nii.gz", "truncated"),
        ("truncated raw", tmp_path / "truncated_raw.nii", "truncated"),
        ("text as nifti", tmp_path / "text.nii.gz", "truncated or corrupt"),
        ("text as nrrd", tmp_path / "text.nrrd", "cannot be read"),
        ("empty file", tmp_path / "empty.nii.gz", "empty file"),
        ("unsupported extension", tmp_path / "flair.png.txt", "unsupported file type"),
        ("2D image", _write(tmp_path / "slice.nii.gz", np.ones((30, 40), np.float32)), "2D image"),
        ("4D image", _write(tmp_path / "dwi.nii.gz", np.random.rand(3, 4, 5, 6).astype(np.float32)), "4D image"),
        ("RGB image", _write(tmp_path / "rgb.mha", np.random.rand(4, 5, 6, 3).astype(np.float32)), "values per voxel"),
        ("constant", _write(tmp_path / "zeros.nii.gz", np.zeros((5, 6, 7), np.int16)), "constant"),
        ("non-finite", _write(tmp_path / "nan.nii.gz", nan), "non-finite"),
        ("empty folder", tmp_path, "without a DICOM series"),
    ]


def test_bad_inputs_raise_one_clear_line(tmp_path):
    for name, path, words in bad_inputs(tmp_path):
        if name == "empty folder":
            path = tmp_path / "emptydir"
            path.mkdir()
        with pytest.raises(DeepWMLError) as info:
            io.read_image(path)
        message = str(info.value)
        assert words in message, f"{name}: {message}"
        assert "\n" not in message, name


@pytest.mark.parametrize("ext", [".nii.gz", ".nrrd", ".mha"])
def test_a_4d_file_of_several_volumes_says_how_to_choose_one(tmp_path, ext):
    """Three echoes (or time points) in one file: the one-line error counts them and names ways to save the
    one to segment as its own file; the old message only said to extract the FLAIR volume."""
    path = _write(tmp_path / f"echoes{ext}", np.random.rand(3, 4, 5, 6).astype(np.float32))
    with pytest.raises(DeepWMLError) as info:
        io.read_image(path, light=True)
    message = str(info.value)
    assert "4D image" in message and "3 volumes" in message and "\n" not in message
    assert "Sequences" in message and "fslroi" in message


@pytest.mark.parametrize("ext", [".nii.gz", ".nrrd"])
def test_a_complex_image_is_named_so(tmp_path, ext):
    """Two values per voxel, but real and imaginary parts, not a vector or RGB: the user is told to export the
    magnitude image (MetaImage stores them as two channels, which reads as a vector)."""
    values = np.random.default_rng(0).random((4, 5, 6)) * (1 + 1j)
    path = tmp_path / f"complex{ext}"
    sitk.WriteImage(sitk.GetImageFromArray(values.astype(np.complex64)), str(path))
    for light in (False, True):
        with pytest.raises(DeepWMLError, match="complex values .* magnitude"):
            io.read_image(path, light=light)


def test_four_d_with_one_volume_is_accepted(tmp_path):
    array = np.random.rand(1, 6, 7, 8).astype(np.float32)
    path = _write(tmp_path / "one.nii.gz", array)
    assert io.read_image(path).GetSize() == (8, 7, 6)


@pytest.mark.parametrize("name,header,known", [
    ("none.nrrd", "", False),
    ("unknown.nrrd", "spacings: 0.9 0.8 nan\n", False),  # NRRD's 'nan': a length not known
    ("spacings.nrrd", "spacings: 0.9 0.8 5\n", True),
    ("time.nrrd", "spacings: 0.9 0.8 5 nan\nkinds: domain domain domain time\n", True),  # the 4th axis: no length
    ("directions.nrrd", "space: left-posterior-superior\nspace directions: (0.9,0,0) (0,0.8,0) (0,0,5)\n", True),
    ("no_directions.nrrd", "space: left-posterior-superior\nspace directions: none none none\n", False),  # all 'none'
    ("none.mha", "", False),
    ("spacing.mha", "ElementSpacing = 0.9 0.8 5\n", True),
])
def test_a_file_without_a_voxel_size_is_refused(tmp_path, name, header, known):
    """SimpleITK reads an NRRD or MetaImage header without a voxel size (or NRRD's 'nan') as 1 mm: the lesion
    volume of 5 mm slices would come out 5 times too small, silently."""
    voxels = np.random.default_rng(0).integers(0, 400, size=(3, 4, 5)).astype("<u2")
    if name.endswith(".nrrd"):
        layout = "dimension: 4\nsizes: 5 4 3 1" if "time" in name else "dimension: 3\nsizes: 5 4 3"
        text = f"NRRD0004\ntype: uint16\n{layout}\n{header}endian: little\nencoding: raw\n\n"
    else:
        text = f"ObjectType = Image\nNDims = 3\nDimSize = 5 4 3\n{header}ElementType = MET_USHORT\nElementDataFile = LOCAL\n"
    path = tmp_path / name
    path.write_bytes(text.encode() + voxels.tobytes())
    if known:
        assert io.read_image(path).GetSpacing() == pytest.approx((0.9, 0.8, 5.0))
    else:
        with pytest.raises(DeepWMLError, match="gives no voxel size .* lesion volumes in ml would be wrong"):
            io.read_image(path)


@pytest.mark.parametrize("fields,words", [
    ("NDims = 100\nDimSize = 5 4 3\nElementSpacing = 0.9 0.8 5\n", "NDims = 100, not a count of 2 to 5 axes"),
    ("NDims = x\nDimSize = 5 4 3\nElementSpacing = 0.9 0.8 5\n", "NDims = x, not a count of 2 to 5 axes"),
    ("NDims = 4\nDimSize = 5 4 3\nElementSpacing = 0.9 0.8 5\n", "NDims = 4 beside 3 sizes (DimSize = 5 4 3)"),
    ("NDims = 3\nDimSize = 5 4 3\nElementSpacing = -0.9 0.8 5\n", "ElementSpacing = -0.9 0.8 5, not voxel sizes"),
    ("NDims = 3\nDimSize = 5 4 3\nElementSpacing = nan nan nan\n", "ElementSpacing = nan nan nan, not voxel sizes"),
    ("NDims = 3\nDimSize = 5 4 3\nOffset = nan nan nan\nElementSpacing = 0.9 0.8 5\n", "Offset = nan nan nan, not 3 numbers"),
    ("NDims = 3\nDimSize = 5 4 3\nOffset = 10 20\nElementSpacing = 0.9 0.8 5\n", "Offset = 10 20, not 3 numbers"),
    ("NDims = 3\nDimSize = 5 4 3\nTransformMatrix = nan 0 0 0 1 0 0 0 1\nElementSpacing = 0.9 0.8 5\n",
     "TransformMatrix = nan 0 0 0 1 0 0 0 1, not 9 numbers"),
    ("NDims = 3\nDimSize = 5 4 3\nRotation = 1 0 0 0 inf 0 0 0 1\nElementSpacing = 0.9 0.8 5\n",
     "Rotation = 1 0 0 0 inf 0 0 0 1, not 9 numbers"),
    ("NDims = 3\nDimSize = 5 4 3\nTransformMatrix = 1 0 0 0 1 0\nElementSpacing = 0.9 0.8 5\n",
     "TransformMatrix = 1 0 0 0 1 0, not 9 numbers"),
    ("NDims = 3\nDimSize = 5 4 3\nTransformMatrix = 0 0 0 0 1 0 0 0 1\nElementSpacing = 0.9 0.8 5\n",
     "TransformMatrix = 0 0 0 0 1 0 0 0 1, axes of length 0 or in one line"),
    ("NDims = 3\nDimSize = 5 4 3\nTransformMatrix = 1 0 0 1 0 0 0 0 1\nElementSpacing = 0.9 0.8 5\n",
     "TransformMatrix = 1 0 0 1 0 0 0 0 1, axes of length 0 or in one line"),
    ("NDims = 3\nDimSize = 5 4 3\nTransformMatrix = 0.9 0 0 0 0.8 0 0 0 5\nElementSpacing = 0.9 0.8 5\n",
     "TransformMatrix = 0.9 0 0 0 0.8 0 0 0 5, axes of length 0.9, 0.8, 5, not 1"),
    # a rotation given to 3 decimals: axes 2e-4 short of 1, which the volume's check refuses; named here (it was
    # 'its direction's axes are of length 0.9998, 0.9998, 1, not 1 (... scaled by them?)', said of images made in
    # memory)
    ("NDims = 3\nDimSize = 5 4 3\nTransformMatrix = 0.707 0.707 0 -0.707 0.707 0 0 0 1\nElementSpacing = 0.9 0.8 5\n",
     "TransformMatrix = 0.707 0.707 0 -0.707 0.707 0 0 0 1, axes of length 0.9998, 0.9998, 1, not 1"),
    # (mutation audit, mut44) two axes of length 1 in one line; ten numbers for nine
    ("NDims = 3\nDimSize = 5 4 3\nTransformMatrix = 1 1 0 0 0 0 0 0 1\nElementSpacing = 0.9 0.8 5\n",
     "TransformMatrix = 1 1 0 0 0 0 0 0 1, axes of length 0 or in one line"),
    ("NDims = 3\nDimSize = 5 4 3\nTransformMatrix = 1 0 0 0 1 0 0 0 1 0\nElementSpacing = 0.9 0.8 5\n",
     "TransformMatrix = 1 0 0 0 1 0 0 0 1 0, not 9 numbers"),    ("NDims = 3\nDimSize = 5 4 3\nElementSpacing = 0.9 0 5\n", "ElementSpacing = 0.9 0 5, not voxel sizes"),
    ("NDims = 1\nDimSize = 60\nElementSpacing = 0.9\n", "NDims = 1, not a count of 2 to 5 axes"),
])
def test_a_metaimage_header_no_image_has_is_refused(tmp_path, fields, words):
    """NDims of -1 hung the image library, of 100 or 2147483648 crashed the process; NDims 4 beside three sizes was
    'No such file or directory'; ElementSpacing -1 was read as 1 mm on a flipped axis, NaN as 'a field above it with
    too few values'; an Offset of NaN, or of two values for three axes, was read as 0, 0, 0. A TransformMatrix of
    NaN or infinite values, or with an axis of length 0 or two in one line, was refused in the image library's words
    ('Bad direction, determinant is 0'), one scaled by the voxel sizes called a sheared grid: the field is named."""
    path = tmp_path / "damaged.mha"
    path.write_bytes(f"ObjectType = Image\n{fields}ElementType = MET_FLOAT\nElementDataFile = LOCAL\n".encode()
                     + np.ones(60, "<f4").tobytes())
    with pytest.raises(DeepWMLError, match=re.escape(f"its header gives {words}")):
        io.read_image(path)


def test_an_nrrd_with_a_leading_axis_of_one_value_reads_as_a_scalar_volume(tmp_path):
    """'sizes: 1 5 4 3' with 'kinds: list domain domain domain' (one value per voxel stored as a list):
    SimpleITK reads a vector image of one component, which its Cast refused with a traceback ('internal
    error' in `deepwml segment`); its 'spacings' name no length for the list axis (nan)."""
    voxels = np.random.default_rng(0).integers(0, 400, size=(3, 4, 5)).astype("<u2")
    for name, geometry in (("directions", "space: left-posterior-superior\nspace directions: none (0.9,0,0) (0,0.8,0) "
                                          "(0,0,5)\n"), ("spacings", "spacings: nan 0.9 0.8 5\n")):
        path = tmp_path / f"{name}.nrrd"
        path.write_bytes(("NRRD0004\ntype: uint16\ndimension: 4\nsizes: 1 5 4 3\nkinds: list domain domain domain\n"
                          f"{geometry}endian: little\nencoding: raw\n\n").encode() + voxels.tobytes())
        read = io.read_image(path)
        assert read.GetPixelID() == sitk.sitkFloat32 and read.GetSpacing() == pytest.approx((0.9, 0.8, 5.0))
        assert np.array_equal(sitk.GetArrayFromImage(read), voxels.astype(np.float32))


@pytest.mark.parametrize("space", ["space: left-posterior-superior", "space dimension: 3"])
def test_an_nrrd_slice_placed_in_3d_space_is_called_a_2d_image(tmp_path, space):
    """One slice saved with its place in the scanner (2 axes, 3D space directions): the image library's own
    words came through ('number of domain axes in the NRRD file (2) doesn't match dimension of space...')."""
    header = ("NRRD0004\ntype: float\ndimension: 2\nsizes: 40 30\n{}\nspace directions: (0.9,0,0) (0,0.9,0)\n"
              "space origin: (-10,20,35)\nendian: little\nencoding: raw\n\n").format(space)
    path = tmp_path / "slice.nrrd"
    path.write_bytes(header.encode() + np.zeros((30, 40), "<f4").tobytes())
    with pytest.raises(DeepWMLError, match=r"slice.nrrd is a 2D image \(40, 30\) \(one slice placed in 3D space\); "
                                           "DeepWML needs a 3D FLAIR volume") as caught:
        io.read_image(path)
    assert "ITK" not in str(caught.value) and "domain axes" not in str(caught.value)
    volume = ("NRRD0004\ntype: float\ndimension: 3\nsizes: 40 30 2\n{}\nspace directions: (0.9,0,0) (0,0.9,0) "
              "(0,0,5)\nendian: little\nencoding: raw\n\n").format(space)
    path.write_bytes(volume.encode() + np.arange(2 * 30 * 40, dtype="<f4").tobytes())
    assert io.read_image(path).GetSize() == (40, 30, 2)  # a volume in the same space: read


@pytest.mark.parametrize("placed", [False, True])
def test_a_2d_mask_is_refused_as_a_mask_not_as_a_flair(tmp_path, placed):
    """A one-slice reference given to evaluate or consensus was told 'DeepWML needs a 3D FLAIR volume', as if
    the FLAIR were wrong: a mask read as a mask is called one."""
    space = "space: left-posterior-superior\nspace directions: (0.9,0,0) (0,0.9,0)\n" if placed else "spacings: 0.9 0.9\n"
    path = tmp_path / "reference.nrrd"
    path.write_bytes(f"NRRD0004\ntype: uint8\ndimension: 2\nsizes: 40 30\n{space}encoding: raw\n\n".encode()
                     + np.ones((30, 40), np.uint8).tobytes())
    with pytest.raises(DeepWMLError, match=r"reference.nrrd is a 2D image \(40, 30\).*; DeepWML needs a 3D mask") as caught:
        io.read_mask(path)
    assert "FLAIR" not in str(caught.value)
    with pytest.raises(DeepWMLError, match="DeepWML needs a 3D FLAIR volume"):
        io.read_image(path)


def test_an_nrrd_that_cannot_be_read_says_why(tmp_path):
    """SimpleITK's first line is 'Error reading x.nhdr:'; the NRRD library's last one says what is wrong
    (the data file missing beside a detached header, an encoding it lacks): that is what the user reads."""
    header = "NRRD0004\ntype: int16\ndimension: 3\nsizes: 5 4 3\nspacings: 0.9 0.8 5\nendian: little\n"
    (tmp_path / "detached.nhdr").write_text(header + "encoding: raw\ndata file: slices.raw\n")
    (tmp_path / "packed.nrrd").write_bytes((header + "encoding: bzip2\n\n").encode() + bytes(120))
    with pytest.raises(DeepWMLError, match=r"couldn't open .*slices\.raw"):
        io.read_image(tmp_path / "detached.nhdr")
    with pytest.raises(DeepWMLError, match="bzip2 encoding not available") as caught:
        io.read_image(tmp_path / "packed.nrrd")
    # a complete file in an encoding the reader lacks: "check the file is a complete image" sent the user astray
    assert "save it again with gzip or raw encoding" in str(caught.value) and "complete image" not in str(caught.value)


@pytest.mark.parametrize("units,refused", [('"m" "m" "m"', True), ('"cm" "cm" "cm"', True), ('"mm" "mm" "mm"', False)])
def test_an_nrrd_in_other_units_than_mm_is_refused(tmp_path, units, refused):
    """SimpleITK ignores NRRD's 'space units': a head given in metres was read as 1000 times too small and came
    out with 0 ml and no lesions (exit 0, a brain-mask warning only)."""
    voxels = np.random.default_rng(0).integers(0, 400, size=(3, 4, 5)).astype("<u2")
    path = tmp_path / "units.nrrd"
    path.write_bytes(("NRRD0004\ntype: uint16\ndimension: 3\nsizes: 5 4 3\nspace: left-posterior-superior\n"
                      f"space directions: (0.9,0,0) (0,0.8,0) (0,0,5)\nspace units: {units}\nendian: little\n"
                      "encoding: raw\n\n").encode() + voxels.tobytes())
    if refused:
        with pytest.raises(DeepWMLError, match=f"lengths in '{units.split()[0].strip(chr(34))}' .* save it with lengths in mm"):
            io.read_image(path)
    else:
        assert io.read_image(path).GetSpacing() == pytest.approx((0.9, 0.8, 5.0))


NAN = float("nan")
NRRD_PLACED = ("NRRD0004\ntype: uint16\ndimension: 3\nsizes: 5 4 3\nspace: left-posterior-superior\n"
               "space directions: (0.9,0,0) (0,0.8,0) (0,0,5)\nspace origin: (-20,15,-30)\nendian: little\n"
               "encoding: raw\n\n")


@pytest.mark.parametrize("field,value,words", [
    ("space origin", "(nan,nan,nan)", "'space origin: (nan,nan,nan)', not 3 numbers"),  # was read as 0, 0, 0
    ("space origin", "(NaN,15,-30)", "'space origin: (NaN,15,-30)', not 3 numbers"),
    ("space origin", "(-inf,15,-30)", "'space origin: (-inf,15,-30)', not 3 numbers"),
    ("space origin", "(-20,15)", "'space origin: (-20,15)', not 3 numbers"),
    ("space directions", "(nan,nan,nan) (nan,nan,nan) (nan,nan,nan)",  # was read as 1 x 1 x 1 mm on the identity
     "whose vector of axis 0 is not 3 numbers"),
    ("space directions", "(0.9,0,0) (0,inf,0) (0,0,5)", "whose vector of axis 1 is not 3 numbers"),
    ("space directions", "(0.9,0,0) (0,0.8,0) (0,0,0)", "whose vector of axis 2 has a length of 0"),
    ("space directions", "(0.9,0,0) none (0,0,5)",  # was called 'an axis of time beside its three in space'
     "'none' for one of the three axes of a volume in space"),
    ("spacings", "0.9 inf 5", "'spacings: 0.9 inf 5', a voxel size of inf along axis 1"),
    ("spacings", "0.9 0.8 0", "'spacings: 0.9 0.8 0', a voxel size of 0 along axis 2"),
    ("spacings beside a space", "0.9 0.8 5", "'spacings: 0.9 0.8 5' beside 'space' (or 'space dimension'), which NRRD "
                                             "does not allow"),  # 'nrrdSpacingStatusScalarWithSpace'
])
def test_an_nrrd_whose_place_or_voxel_size_is_not_numbers_is_refused_naming_the_field(tmp_path, field, value, words):
    """An NRRD 'space origin' of NaN was read as 0, 0, 0 without a word: the mask written on it lay elsewhere in
    the patient than the scan; 'space directions' all NaN were read as 1 x 1 x 1 mm on the identity (every volume
    wrong). One NaN or infinite value, a vector of length 0 or infinite 'spacings' were refused in the NRRD
    library's own words ('existance of all space vector coefficients must be consistent'), which named no field,
    and 'none' for an axis in space was called an axis of time. Each is refused naming the field and its value."""
    header = NRRD_PLACED
    if field == "spacings beside a space":
        header = header.replace("space origin", f"spacings: {value}\nspace origin")
    elif field == "spacings":  # spacings go without a space (NRRD allows one or the other)
        header = re.sub(r"space: [^\n]*\nspace directions: [^\n]*\nspace origin: [^\n]*\n", f"spacings: {value}\n",
                        header)
    else:
        header = re.sub(rf"{field}: [^\n]*", f"{field}: {value}", header)
    path = tmp_path / "placed.nrrd"
    path.write_bytes(header.encode() + np.ones(60, "<u2").tobytes())
    with pytest.raises(DeepWMLError, match=r"placed\.nrrd: its header gives .*" + re.escape(words) + ".*, so the header is damaged; correct it or save the image again"):
        io.read_image(path)


@pytest.mark.parametrize("header, words", [
    # one origin is one vector: a second after it is no place, not the first one taken
    (NRRD_PLACED.replace("space origin: (-20,15,-30)", "space origin: (-20,15,-30) (1,2,3)"),
     "'space origin: (-20,15,-30) (1,2,3)', not 3 numbers"),
    # a vector of two numbers in a 3D space
    (NRRD_PLACED.replace("(0.9,0,0) (0,0.8,0)", "(0.9,0) (0,0.8,0)"), "whose vector of axis 0 is not 3 numbers"),
    # 'none' of a list axis first: the vectors after it are checked all the same
    (NRRD_PLACED.replace("dimension: 3\nsizes: 5 4 3", "dimension: 4\nsizes: 2 5 4 3\nkinds: list domain domain domain")
     .replace("space directions: (0.9,0,0)", "space directions: none (nan,0,0)"), "whose vector of axis 1 is not 3 numbers"),
    # two of the three axes of a volume 'none'
    (NRRD_PLACED.replace("(0,0.8,0) (0,0,5)", "none none"), "'none' for one of the three axes of a volume in space"),
])
def test_an_nrrd_whose_vectors_are_too_many_too_short_or_none_is_refused_naming_the_field(tmp_path, header, words):
    """Mutation audit (mut44): each rule of `_nrrd_geometry_fault` on a case the test above leaves out."""
    path = tmp_path / "placed.nrrd"
    path.write_bytes(header.encode() + np.ones(120 if "list" in header else 60, "<u2").tobytes())
    with pytest.raises(DeepWMLError, match=r"placed\.nrrd: its header gives .*" + re.escape(words)):
        io.read_image(path)


def test_an_nrrd_origin_without_a_space_is_left_to_the_nrrd_library(tmp_path):
    """A 'space origin' beside 'spacings' and no 'space' has no dimension to be checked against: the NRRD library
    refuses it in its own words (not 'not 0 numbers')."""
    path = tmp_path / "placed.nrrd"
    header = re.sub(r"space: [^\n]*\nspace directions: [^\n]*\n", "spacings: 0.9 0.8 5\n", NRRD_PLACED)
    path.write_bytes(header.encode() + np.ones(60, "<u2").tobytes())
    with pytest.raises(DeepWMLError, match=r"placed\.nrrd cannot be read as an image \(.*space dimension"):
        io.read_image(path)


def test_an_nrrd_placed_by_its_header_is_read_where_it_says(tmp_path):
    """The refusals above leave a complete header read as it is: a flipped axis (a direction of -0.9) and no
    'space origin' (not known: 0, 0, 0, as every NRRD reader reads it)."""
    path = tmp_path / "placed.nrrd"
    flipped = NRRD_PLACED.replace("(0.9,0,0)", "(-0.9,0,0)")
    path.write_bytes(flipped.encode() + np.arange(60, dtype="<u2").tobytes())
    image = io.read_image(path)
    assert image.GetOrigin() == (-20, 15, -30) and image.GetSpacing() == pytest.approx((0.9, 0.8, 5))
    assert image.GetDirection() == (-1, 0, 0, 0, 1, 0, 0, 0, 1)
    path.write_bytes(re.sub(r"space origin: [^\n]*\n", "", NRRD_PLACED).encode() + np.arange(60, dtype="<u2").tobytes())
    assert io.read_image(path).GetOrigin() == (0, 0, 0)


def _metaimage(fields: str, data: bytes, dims: str = "5 4 3", ndims: int = 3) -> bytes:
    return (f"ObjectType = Image\nNDims = {ndims}\nBinaryData = True\nBinaryDataByteOrderMSB = False\n{fields}"
            f"DimSize = {dims}\nElementType = MET_USHORT\nElementDataFile = LOCAL\n").encode() + data


@pytest.mark.parametrize("size_field,refused", [(None, True), ("half", True), ("double", True), ("exact", False)])
def test_a_compressed_metaimage_without_its_true_data_size_is_refused(tmp_path, size_field, refused):
    """A MetaImage's own compressed voxels (CompressedData = True, LOCAL) with no CompressedDataSize, or a wrong one:
    SimpleITK printed 'Uncompress failed' and returned a volume of whatever its memory held (the previous scan's
    voxels, in a batch), or a partly unpacked one, and the scan was segmented."""
    voxels = np.random.default_rng(0).integers(1, 400, size=(3, 4, 5)).astype("<u2")
    packed = zlib.compress(voxels.tobytes())
    told = {None: "", "half": f"CompressedDataSize = {len(packed) // 2}\n",
            "double": f"CompressedDataSize = {2 * len(packed)}\n", "exact": f"CompressedDataSize = {len(packed)}\n"}
    path = tmp_path / "packed.mha"
    path.write_bytes(_metaimage(f"CompressedData = True\n{told[size_field]}ElementSpacing = 0.9 0.8 5\n", packed))
    if refused:
        with pytest.raises(DeepWMLError, match="CompressedDataSize.* save it again"):
            io.read_image(path)
    else:
        assert np.array_equal(sitk.GetArrayFromImage(io.read_image(path)), voxels.astype(np.float32))


@pytest.mark.parametrize("centre,refused", [("0 0 0", True), ("0 0 0 0", False)])
def test_a_metaimage_whose_voxel_size_the_library_misreads_is_refused(tmp_path, centre, refused):
    """A 4D MetaImage of one volume whose CenterOfRotation has three values, not four: SimpleITK read the
    ElementSpacing after it as 1 x 1 x 1 mm, and 0.9 x 0.8 x 5 mm voxels were measured 3.6 times too small."""
    voxels = np.random.default_rng(0).integers(1, 400, size=(1, 3, 4, 5)).astype("<u2")
    fields = (f"TransformMatrix = 1 0 0 0 0 1 0 0 0 0 1 0 0 0 0 1\nOffset = 0 0 0 0\nCenterOfRotation = {centre}\n"
              "ElementSpacing = 0.9 0.8 5 1\n")
    path = tmp_path / "one.mha"
    path.write_bytes(_metaimage(fields, voxels.tobytes(), "5 4 3 1", 4))
    if refused:
        with pytest.raises(DeepWMLError, match=r"ElementSpacing 0.9 0.8 5, .* read 1 x 1 x 1 mm"):
            io.read_image(path)
    else:
        assert io.read_image(path).GetSpacing() == pytest.approx((0.9, 0.8, 5.0))


@pytest.mark.parametrize("times", [1, 2])
def test_an_nrrd_with_a_time_axis_beside_its_space_is_called_a_4d_image(tmp_path, times):
    """'kinds: domain domain domain time' in a 3D space (the time axis's direction 'none'), as pynrrd users write
    a series: the image library's own words came through ('ITK ERROR: NrrdImageIO(0x55...): ... number of domain
    axes in the NRRD file (4) doesn't match dimension of space in which orientation i')."""
    path = tmp_path / "series.nrrd"
    path.write_bytes((f"NRRD0004\ntype: uint16\ndimension: 4\nsizes: 5 4 3 {times}\nspace: left-posterior-superior\n"
                      "space directions: (0.9,0,0) (0,0.8,0) (0,0,5) none\nkinds: domain domain domain time\n"
                      "endian: little\nencoding: raw\n\n").encode() + bytes(2 * 60 * times))
    with pytest.raises(DeepWMLError, match=rf"series.nrrd is a 4D image \(5, 4, 3, {times}\): .*save the volume to "
                                           "segment as a 3D file") as caught:
        io.read_image(path)
    assert "ITK" not in str(caught.value)


def test_an_nrrd_in_a_space_with_time_is_checked_in_its_four_dimensions(tmp_path):
    """Mutation audit (mut44): a space with time ('left-posterior-superior-time') has 4 dimensions: an origin and
    vectors of 4 numbers are its place (not 'not 3 numbers'), and it is called a 4D image."""
    path = tmp_path / "series.nrrd"
    path.write_bytes(("NRRD0004\ntype: uint16\ndimension: 4\nsizes: 5 4 3 2\nkinds: domain domain domain time\n"
                      "space: left-posterior-superior-time\nspace directions: (0.9,0,0,0) (0,0.8,0,0) (0,0,5,0) (0,0,0,1)\n"
                      "space origin: (-20,15,-30,0)\nendian: little\nencoding: raw\n\n").encode() + bytes(2 * 120))
    with pytest.raises(DeepWMLError, match=r"series.nrrd is a 4D image \(5, 4, 3, 2\)"):
        io.read_image(path)


def test_an_nrrd_of_a_negative_spacing_is_read_on_a_flipped_axis(tmp_path):
    """Mutation audit (mut44): 'spacings' refuses infinite and 0 sizes only; a negative one is the NRRD library's
    flipped axis (ITK and 3D Slicer read it so: 0.9 mm along -x), read as it reads it."""
    path = tmp_path / "flipped.nrrd"
    path.write_bytes(("NRRD0004\ntype: uint16\ndimension: 3\nsizes: 5 4 3\nspacings: -0.9 0.8 5\nendian: little\n"
                      "encoding: raw\n\n").encode() + np.arange(60, dtype="<u2").tobytes())
    image = io.read_image(path)
    assert image.GetSpacing() == pytest.approx((0.9, 0.8, 5)) and image.GetDirection() == (-1, 0, 0, 0, 1, 0, 0, 0, 1)


@pytest.mark.parametrize("kinds,first", [("list domain domain domain", True), ("domain domain domain list", False)])
def test_an_nrrd_of_several_volumes_on_a_list_axis_is_called_a_4d_image(tmp_path, kinds, first):
    """3D Slicer saves a sequence of volumes (.seq.nrrd), a multi-volume or a DWI with a list axis of one value
    per volume; SimpleITK reads it as a vector image, and the user was told of '3 values per voxel (vector/RGB)',
    not that the file holds 3 volumes nor how to save the one to segment."""
    directions = "(0.9,0,0) (0,0.8,0) (0,0,5)"
    path = tmp_path / "scans.seq.nrrd"
    path.write_bytes((f"NRRD0004\ntype: uint16\ndimension: 4\nsizes: {'3 5 4 3' if first else '5 4 3 3'}\n"
                      f"space: left-posterior-superior\nspace directions: {'none ' if first else ''}{directions}"
                      f"{'' if first else ' none'}\nkinds: {kinds}\nendian: little\nencoding: raw\n\n").encode()
                     + bytes(2 * 60 * 3))
    with pytest.raises(DeepWMLError, match=r"scans.seq.nrrd is a 4D image \(5, 4, 3, 3\): 3 volumes .* Sequences toolbar"):
        io.read_image(path)
    with pytest.raises(DeepWMLError, match=r"is a 4D image \(5, 4, 3, 3\): 3 volumes in one file; DeepWML needs a 3D mask"):
        io.read_mask(path)


def test_a_2d_nrrd_with_a_list_axis_is_refused_in_one_line(tmp_path):
    """A 2D image of a few values per voxel on a list axis (in a 2D space) is not 3 volumes: taken for a 3D volume
    it was read as a vector image, and the FLAIR and the mask failed with a SimpleITK Cast traceback."""
    path = tmp_path / "frames.nrrd"
    path.write_bytes(("NRRD0004\ntype: short\ndimension: 3\nspace dimension: 2\nsizes: 3 5 4\n"
                      "kinds: list domain domain\nspace directions: none (0.9,0) (0,0.8)\nendian: little\n"
                      "encoding: raw\n\n").encode() + bytes(2 * 60))
    with pytest.raises(DeepWMLError, match=r"frames.nrrd has 3 values per voxel"):
        io.read_image(path)
    with pytest.raises(DeepWMLError, match=r"frames.nrrd has 3 values per voxel"):
        io.read_mask(path)


@pytest.mark.parametrize("name,header", [
    ("detached.nhdr", "NRRD0004\ntype: uint16\ndimension: 3\nsizes: 5 4 {}\nspacings: 0.9 0.8 5\nendian: little\n"
                      "encoding: raw\n{}data file: detached.raw\n"),
    ("detached.mhd", "ObjectType = Image\nNDims = 3\nDimSize = 5 4 {}\nElementSpacing = 0.9 0.8 5\n"
                     "ElementType = MET_USHORT\n{}ElementDataFile = detached.raw\n"),
])
@pytest.mark.parametrize("slices,skip,refused", [(3, False, False), (2, False, True), (3, True, False)])
def test_voxel_data_longer_than_the_header_says_are_refused(tmp_path, name, header, slices, skip, refused):
    """A hand-written header for raw voxels whose sizes, type or skip do not fit them (one slice too few, a
    preamble not skipped): the image library read the first bytes only, a wrong image without an error (a slice
    left out, every voxel shifted), and the scan was segmented. Data that fit, with a skip given, are read."""
    voxels = np.random.default_rng(0).integers(1, 400, size=(3, 4, 5)).astype("<u2")
    preamble = b"a preamble" if skip else b""
    skipped = ("byte skip: -1\n" if name.endswith(".nhdr") else "HeaderSize = -1\n") if skip else ""
    (tmp_path / name).write_text(header.format(slices, skipped))
    (tmp_path / "detached.raw").write_bytes(preamble + voxels.tobytes())
    if refused:
        with pytest.raises(DeepWMLError, match="voxel data take 120 bytes, but its header's sizes and type need 80"):
            io.read_image(tmp_path / name)
    else:
        assert np.array_equal(sitk.GetArrayFromImage(io.read_image(tmp_path / name)), voxels.astype(np.float32))


@pytest.mark.parametrize("field,read", [("LIST 2D\ns001.raw\ns002.raw\n", 2), ("s%03d.raw 1 2 1", 2),
                                        ("s%03d.raw 1 3 2", 2), ("s%03d.raw 3 1 -1", 0), ("s%03d.raw 3 1 1", 0),
                                        ("LIST\ns001.raw\ns002.raw\ns003.raw\n", None), ("s%03d.raw 1 3 1", None)])
def test_a_metaimage_naming_fewer_slice_files_than_slices_is_refused(tmp_path, field, read):
    """A MetaImage of a file per slice whose LIST or numbered pattern names fewer files than it has slices (one left
    out, a step of 2; a pattern counting down, which SimpleITK's reader never counts): SimpleITK filled the slices
    without a file with leftover memory, without an error, and the scan was segmented. All named: read."""
    voxels = np.random.default_rng(0).integers(1, 400, size=(3, 4, 5)).astype("<u2")
    for k, plane in enumerate(voxels, 1):
        (tmp_path / f"s{k:03d}.raw").write_bytes(plane.tobytes())
    path = tmp_path / "slices.mhd"
    path.write_text("ObjectType = Image\nNDims = 3\nDimSize = 5 4 3\nElementSpacing = 0.9 0.8 5\n"
                    f"ElementType = MET_USHORT\nElementDataFile = {field}")
    if read is None:
        assert np.array_equal(sitk.GetArrayFromImage(io.read_image(path)), voxels.astype(np.float32))
        return
    with pytest.raises(DeepWMLError, match=rf"slices.mhd: its header names {read} voxel files? \(ElementDataFile\) for "
                                           "its 3 slices"):
        io.read_image(path)


@pytest.mark.parametrize("name,field", [("slices.mhd", "ElementDataFile = s%03d.raw 1 1000000000 1"),
                                        ("slices.nhdr", "data file: s%03d.raw 1 1000000000 1")])
def test_a_detached_header_whose_numbered_pattern_names_a_billion_files_is_refused(tmp_path, name, field):
    """A header whose slice-file pattern counts to 1e9 (a typo: 1000000000 for 3): listing its names, which a batch
    does to know a scan done before by its files, took every byte of the machine's memory before anything was said."""
    for k in (1, 2, 3):
        (tmp_path / f"s{k:03d}.raw").write_bytes(bytes(40))
    header = ("NRRD0004\ntype: uint16\ndimension: 3\nsizes: 5 4 3\nendian: little\nencoding: raw\n" if name.endswith("nhdr")
              else "ObjectType = Image\nNDims = 3\nDimSize = 5 4 3\nElementType = MET_USHORT\n")
    (tmp_path / name).write_text(header + field + "\n")
    with pytest.raises(DeepWMLError, match=rf"{name}: its data file pattern 's%03d.raw 1 1000000000 1' names "
                                           "1,000,000,000 files, more than any scan has slices"):
        io.detached_data_files(tmp_path / name)


@pytest.mark.parametrize("name", ["slices.mhd", "slices.nhdr"])
def test_a_numbered_pattern_past_what_a_machine_word_counts_is_refused_as_well(tmp_path, name):
    """A last number of 20 digits (past 2^63): counting the pattern's files overflowed, and deepwml segment of the
    .mhd ended in 'internal error: OverflowError: Python int too large to convert to C ssize_t'."""
    field = "ElementDataFile = s%03d.raw 1 99999999999999999999 1" if name.endswith("mhd") else \
        "data file: s%03d.raw 1 99999999999999999999 1"
    header = ("NRRD0004\ntype: uint16\ndimension: 3\nsizes: 5 4 3\nendian: little\nencoding: raw\n" if name.endswith("nhdr")
              else "ObjectType = Image\nNDims = 3\nDimSize = 5 4 3\nElementType = MET_USHORT\n")
    (tmp_path / name).write_text(header + field + "\n")
    with pytest.raises(DeepWMLError, match=r"names 99,999,999,999,999,999,999 files, more than any scan has slices"):
        io.detached_data_files(tmp_path / name)


def test_a_metaimage_that_cannot_be_read_says_so_without_the_libraries_internals(tmp_path):
    """A .mhd whose .raw is cut short: the message held 'ITK ERROR: MetaImageIO(0x55641eb59960): File cannot be
    read: ...', a class name and a memory address that tell the user nothing."""
    (tmp_path / "cut.mhd").write_text("ObjectType = Image\nNDims = 3\nDimSize = 5 4 3\nElementSpacing = 0.9 0.8 5\n"
                                      "ElementType = MET_USHORT\nElementDataFile = cut.raw\n")
    (tmp_path / "cut.raw").write_bytes(bytes(100))
    with pytest.raises(DeepWMLError, match=r"cut.mhd cannot be read as an image \(File cannot be read: .*check the file "
                                           "is a complete image") as caught:
        io.read_image(tmp_path / "cut.mhd")
    assert "ITK" not in str(caught.value) and "0x" not in str(caught.value)


@pytest.mark.parametrize("numbers, said", [("1 2 3 4", None), ("1;2;3;4", None), ("0.1 2.5 -3 4e2", None),
                                           ("1 2 3 4 5", "301 numbers for its 300 voxels"),
                                           ("1 2 3 -1", "-1 read as 65535"), ("1 2 3 70000", "70000 read as 4464"),
                                           ("1.7 2 3 4", "1.7 read as 1")])
def test_a_metaimage_of_voxels_as_text_is_read_as_written_or_refused(tmp_path, numbers, said):
    """BinaryData = False: SimpleITK reads the numbers as written, whatever separates them, but takes as many as the
    header's sizes need, ignoring the rest, and casts each to its type without an error (-1 in MET_USHORT read as
    65535). Read as written, or refused saying how it would be misread."""
    kind = "MET_FLOAT" if "." in numbers and said is None else "MET_USHORT"
    head = " ".join(str(100 + v) for v in range(296))  # a scan's many values (not a label mask's few)
    path = tmp_path / "text.mha"
    path.write_text(f"ObjectType = Image\nNDims = 3\nBinaryData = False\nDimSize = 10 10 3\nElementSpacing = 0.9 0.9 5\n"
                    f"ElementType = {kind}\nElementDataFile = LOCAL\n{head} {numbers}\n")
    if said is None:
        assert sitk.GetArrayFromImage(io.read_image(path)).ravel().tolist() == np.array(
            re.split(r"[ ;]", f"{head} {numbers}"), float).astype(np.float32 if kind == "MET_FLOAT" else np.uint16).tolist()
    else:
        with pytest.raises(DeepWMLError, match=rf"written as text \(BinaryData = False\), and the image library reads "
                                               rf"them otherwise \({re.escape(said)}\)"):
            io.read_image(path)


@pytest.mark.parametrize("matrix", ["as written", "transposed", "left out"])
def test_a_metaimage_whose_orientation_contradicts_its_matrix_is_refused(tmp_path, matrix):
    """A sagittal scan (columns front to back, rows top to bottom, slices left to right) in a MetaImage whose
    TransformMatrix was written row by row (ITK reads it column by column), or left out, beside an
    AnatomicalOrientation of its true axes: SimpleITK placed the slices in another plane (axial, without the
    matrix), and DeepWML segmented the sagittal slices as axial ones, without a word."""
    image = make_volume(size=(12, 10, 6))[0]
    image.SetDirection([0, 0, 1, 1, 0, 0, 0, -1, 0])
    sitk.WriteImage(image, str(tmp_path / "sagittal.mha"))
    data = (tmp_path / "sagittal.mha").read_bytes()
    head, voxels = data.split(b"ElementDataFile = LOCAL\n", 1)
    line = re.search(rb"TransformMatrix = ([^\n]*)\n", head)
    values = np.array(line.group(1).split(), float).reshape(3, 3)
    changed = {"as written": line.group(0), "left out": b"",
               "transposed": b"TransformMatrix = " + " ".join(f"{v:g}" for v in values.T.ravel()).encode() + b"\n"}
    path = tmp_path / "given.mha"
    path.write_bytes(head.replace(line.group(0), changed[matrix]) + b"ElementDataFile = LOCAL\n" + voxels)
    assert b"AnatomicalOrientation = ASR" in head  # ITK's letters: the side each axis comes from
    if matrix == "as written":
        assert io.read_image(path).GetDirection() == pytest.approx(image.GetDirection())
    else:
        with pytest.raises(DeepWMLError, match="AnatomicalOrientation ASR .* TransformMatrix"):
            io.read_image(path)


def test_an_oblique_metaimage_as_itk_writes_it_is_read_on_its_grid_and_segmented_onto_it(tmp_path, tiny_model):
    """ITK writes a MetaImage's TransformMatrix column by column (each image axis's direction in turn) and reads it
    so; its AnatomicalOrientation gives each axis the body axis its greedy pick over the whole matrix leaves it,
    which for a strongly oblique scan (20, -35 and 35 degrees about z, y and x) lies under half of that axis (0.47):
    DeepWML refused such a file as one whose matrix was written row by row ("the plane of its slices is unknown"),
    though SimpleITK wrote and reads it right. Read on its own grid; its mask lies on that exact grid."""
    from DeepWMLLib.cli import main

    direction = rotation(*np.radians([35, -35, 20]))  # about x, y, z
    image = make_volume(size=(32, 28, 8), spacing=(0.9, 0.8, 5.0), direction=direction, origin=(-20.5, 15.25, -30.75))[0]
    path = tmp_path / "oblique.mha"
    sitk.WriteImage(image, str(path))
    head = path.read_bytes().split(b"ElementDataFile")[0].decode()
    written = np.array(re.search(r"TransformMatrix = ([^\n]*)", head).group(1).split(), float)
    assert written == pytest.approx(direction.T.ravel())  # column by column: image axis 0's direction first
    assert "AnatomicalOrientation = RIP" in head  # axis 0 along x (0.94), axis 1 along z (0.47 of it)
    read = io.read_image(path)
    assert read.GetDirection() == pytest.approx(direction.ravel(), abs=1e-12)
    assert read.GetOrigin() == image.GetOrigin() and read.GetSpacing() == image.GetSpacing()
    assert main(["segment", str(path), "-o", str(tmp_path / "out"), "--model", str(tiny_model), "--device", "cpu"]) == 0
    mask = sitk.ReadImage(str(tmp_path / "out" / "oblique_wmh.mha"))
    assert (mask.GetSize(), mask.GetOrigin(), mask.GetSpacing(), mask.GetDirection()) == (
        image.GetSize(), image.GetOrigin(), image.GetSpacing(), sitk.ReadImage(str(path)).GetDirection())


def test_the_libraries_internals_are_left_out_as_windows_prints_them(tmp_path, monkeypatch):
    """ITK built with MSVC prints an object's address without '0x' ('MetaImageIO(000001D2A3B4C5E0)'): the class
    name and address came through to Windows users."""
    path = tmp_path / "cut.mha"
    path.write_text("ObjectType = Image\nNDims = 3\nDimSize = 5 4 3\nElementSpacing = 0.9 0.8 5\n"
                    "ElementType = MET_USHORT\nElementDataFile = LOCAL\n")

    class Reader:
        def SetFileName(self, name):
            pass

        def ReadImageInformation(self):
            raise RuntimeError("Exception thrown in SimpleITK ImageFileReader_ReadImageInformation: D:\\a\\itk.cxx:7:\n"
                               "ITK ERROR: MetaImageIO(000001D2A3B4C5E0): File cannot be read: cut.mha for reading.")

    monkeypatch.setattr(io, "_file_reader", lambda p: Reader())
    with pytest.raises(DeepWMLError, match=r"cut.mha cannot be read as an image \(File cannot be read: ") as caught:
        io.read_image(path)
    assert "ITK" not in str(caught.value) and "000001D2A3B4C5E0" not in str(caught.value)


@pytest.mark.parametrize("unit,code,factor", [("metres", 1, 1000.0), ("microns", 3, 0.001)])
def test_a_nifti_whose_length_unit_does_not_fit_its_voxel_sizes_is_refused(tmp_path, unit, code, factor):
    """A NIfTI header saying metres (or microns) beside voxel sizes in mm: SimpleITK converts, so a 0.9 x 0.8 x 5 mm
    scan was read with 900 x 800 x 5000 mm voxels (0.0009 x ... mm) and came out "ok - 0.00 ml, 0 lesions", its
    warnings about the brain outline naming no cause. A head truly given in metres (or microns) is read in mm."""
    image = make_volume(size=(12, 10, 5), spacing=(0.9, 0.8, 5.0))[0]
    sitk.WriteImage(image, str(tmp_path / "mm.nii"))
    data = bytearray((tmp_path / "mm.nii").read_bytes())
    data[123] = (data[123] & 0xF8) | code  # xyzt_units: the length unit alone changed
    (tmp_path / "wrong.nii").write_bytes(bytes(data))
    for light in (False, True):
        with pytest.raises(DeepWMLError, match=f"lengths in {unit} .* voxel sizes, 0.9 x 0.8 x 5, look like mm"):
            io.read_image(tmp_path / "wrong.nii", light=light)
    sized = sitk.Image(image)  # the same head in that unit's numbers
    sized.SetSpacing([v / factor for v in image.GetSpacing()])
    sized.SetOrigin([v / factor for v in image.GetOrigin()])
    sitk.WriteImage(sized, str(tmp_path / "true.nii"))
    data = bytearray((tmp_path / "true.nii").read_bytes())
    data[123] = (data[123] & 0xF8) | code
    (tmp_path / "true.nii").write_bytes(bytes(data))
    assert io.read_image(tmp_path / "true.nii").GetSpacing() == pytest.approx((0.9, 0.8, 5.0), rel=1e-5)


@pytest.mark.parametrize("nifti_2", [False, True])
def test_a_nifti_without_orientation_is_refused(tmp_path, nifti_2):
    """qform_code and sform_code 0: no orientation. SimpleITK (and so 3D Slicer) placed the voxels with its identity
    direction, FSL and nibabel with the front and back the other way round, and DeepWML wrote the mask with SimpleITK's
    guess as scanner orientation: in FSL it no longer lay on the FLAIR, and the slice axis was taken to be axial."""
    sitk.WriteImage(make_volume(size=(12, 10, 5))[0], str(tmp_path / "placed.nii"))
    data = bytearray((tmp_path / "placed.nii").read_bytes())
    struct.pack_into("<2h", data, 252, 0, 0)
    (tmp_path / "unplaced.nii").write_bytes(nifti2_of(bytes(data)) if nifti_2 else bytes(data))
    for light in (False, True):
        with pytest.raises(DeepWMLError, match="gives no orientation .* export it again"):
            io.read_image(tmp_path / "unplaced.nii", light=light)


@pytest.mark.parametrize("codes,edits,words", [
    ((1, 0), [(76, float("nan"))], r"the qform's handedness \(pixdim\[0\], qfac\) as nan, not 1 or -1"),
    ((1, 1), [(76, float("-inf"))], r"the qform's handedness \(pixdim\[0\], qfac\) as -inf, not 1 or -1"),
    ((1, 0), [(256, 2.0)], r"quatern_b, c, d = 2, 0, 1, no unit quaternion's \(their squares sum to 5, above 1\)"),
    ((1, 0), [(256, 1e30)], r"quatern_b, c, d = 1e\+30, 0, 1, no unit quaternion's"),
    ((1, 0), [(268, 1e30)], r"places the first voxel at 1e\+30, -15, -30 mm \(qoffset_x, y, z\), beyond any scanner's"),
    ((0, 1), [(292, -1e30)], r"places the first voxel at -1e\+30, -15, -30 mm \(srow_x\[3\], srow_y\[3\], srow_z\[3\]: "
                             r"the sform's\), beyond any scanner's"),
    # (mutation audit, mut44) just beyond a unit quaternion, past float32 rounding; a qform's offset of NaN
    ((1, 0), [(256, 0.2)], r"quatern_b, c, d = 0.2, 0, 1, no unit quaternion's \(their squares sum to 1.04, above 1\)"),
    ((1, 0), [(268, float("nan"))], r"orientation \(qform\) holds values that are not numbers"),
], ids=["qfac-nan", "qfac-inf-beside-an-sform", "quaternion-2", "quaternion-1e30", "qoffset-1e30", "srow-offset-1e30",
        "quaternion-1.04", "qoffset-nan"])
def test_a_nifti_whose_qform_or_sform_in_use_is_no_place_is_refused_naming_the_field(tmp_path, codes, edits, words):
    """A qform's handedness (pixdim[0]) of NaN was read as 1 without a word; a quaternion beyond a unit one's
    (quatern_b 2) was scaled down by the image library into a rotation it made up, which nibabel refuses: the scan
    read in another orientation, silently. An sform placing the first voxel 1e30 mm away was called a sheared grid.
    Each is refused naming the field, whichever way the file is read (light: without SimpleITK)."""
    image, _ = make_volume(size=(12, 10, 4))
    path = tmp_path / "placed.nii"
    sitk.WriteImage(image, str(path))
    header = bytearray(path.read_bytes())
    struct.pack_into("<2h", header, 252, *codes)
    for offset, value in edits:
        struct.pack_into("<f", header, offset, value)
    path.write_bytes(header)
    for light in (False, True):
        with pytest.raises(DeepWMLError, match=r"placed\.nii: its header.*" + words + ".*copy the file again"):
            io.read_image(path, light=light)


@pytest.mark.parametrize("codes,offset,value", [((0, 1), 256, NAN), ((0, 1), 268, NAN), ((1, 0), 292, NAN),
                                                ((1, 0), 280, NAN), ((0, 1), 256, 2.0), ((0, 1), 268, 1e30)],
                         ids=["quatern-nan-sform-used", "qoffset-nan-sform-used", "srow-offset-nan-qform-used",
                              "srow-rotation-nan-qform-used", "quatern-2-sform-used", "qoffset-1e30-sform-used"])
def test_a_nifti_placed_by_one_form_is_read_by_it_whatever_the_unused_form_holds(tmp_path, codes, offset, value):
    """The standard's fallback: a form whose code is 0 is not used, so NaN in it is no damage to the scan's place;
    read by the other form (sform_code 0: the qform; qform_code 0: the sform), on the scan's own grid, both ways."""
    image, _ = make_volume(size=(12, 10, 4), direction=rotation(0.2, -0.1, 0.3).ravel().tolist())
    path = tmp_path / "placed.nii"
    sitk.WriteImage(image, str(path))
    header = bytearray(path.read_bytes())
    struct.pack_into("<2h", header, 252, *codes)
    struct.pack_into("<f", header, offset, value)
    path.write_bytes(header)
    for light in (False, True):
        read = io.read_image(path, light=light)
        assert np.allclose(read.GetOrigin(), image.GetOrigin(), atol=1e-4)
        assert np.allclose(read.GetSpacing(), image.GetSpacing(), atol=1e-6)
        assert np.allclose(read.GetDirection(), image.GetDirection(), atol=1e-5)


@pytest.mark.parametrize("edits,words", [
    ([(268, "f", 2e5)], r"places the first voxel at 2e\+05, -15, -30 mm \(qoffset_x, y, z\), beyond any scanner's \(100 m"),
    ([(80, "f", float("inf"))], r"a voxel size of inf mm along axis 1 \(pixdim\[1\]\)"),
    ([(88, "f", 0.0)], r"a voxel size of 0 mm along axis 3 \(pixdim\[3\]\)"),
    # the sform's slice 5 % longer than pixdim's (5.25 and 5 mm): beyond float32 rounding, refused past 1 %
    ([(320, "f", 5.25)], r"two voxel sizes, 0.9 x 0.8 x 5 mm \(pixdim\) and 0.9 x 0.8 x 5.25 mm \(the sform\)"),
    ([(46, "h", 0)], r"gives the image 12 x 10 x 0 voxels \(dim\), a size below 1"),
    ([(72, "h", 16)], r"gives voxels of 16 bits \(bitpix\) of a type of 32 bits \(datatype 16\)"),
], ids=["qoffset-2e5", "pixdim-inf", "pixdim-0", "sform-slice-5-percent-longer", "dim-0", "bitpix-16-of-float32"])
def test_a_nifti_header_just_past_its_limits_is_refused(tmp_path, edits, words):
    """Mutation audit (mut44): the NIfTI header's limits each just past them (an origin 200 m away, not 1e30 mm; a
    voxel size infinite or 0; an sform 5 % off pixdim), with both forms in use as SimpleITK writes them."""
    image, _ = make_volume(size=(12, 10, 4), spacing=(0.9, 0.8, 5.0))
    path = tmp_path / "placed.nii"
    sitk.WriteImage(image, str(path))
    header = bytearray(path.read_bytes())
    assert struct.unpack_from("<2h", header, 252) == (1, 1) and struct.unpack_from("<f", header, 320)[0] == 5.0
    for offset, kind, value in edits:
        struct.pack_into("<" + kind, header, offset, value)
    path.write_bytes(header)
    for light in (False, True):
        with pytest.raises(DeepWMLError, match=r"placed\.nii: its header.*" + words):
            io.read_image(path, light=light)


@pytest.mark.parametrize("degrees,refused", [(15.0, True), (0.1, True), (-0.1, True), (0.01, False), (0.0, False)])
def test_a_nifti_whose_sform_is_sheared_is_refused_not_placed_by_its_qform(tmp_path, degrees, refused):
    """An sform whose slice axis leans (a stack sheared as by a gantry tilt), its axes of pixdim's lengths: the image
    library placed the scan by its qform without a word, FSL and nibabel by the sform (15 degrees: lesion volumes
    3.5 % apart, voxels up to 16 mm apart). Refused beyond 0.057 degrees; rounding-sized leans are read. An sform
    not in use (sform_code 0) is no matter."""
    image, _ = make_volume(size=(12, 10, 4), spacing=(0.9, 0.8, 5.0))
    path = tmp_path / "leaning.nii"
    sitk.WriteImage(image, str(path))
    header = bytearray(path.read_bytes())
    srow = list(struct.unpack_from("<12f", header, 280))
    assert srow[2] == 0 and srow[10] == 5.0
    srow[2], srow[10] = 5 * math.sin(math.radians(degrees)), 5 * math.cos(math.radians(degrees))
    struct.pack_into("<12f", header, 280, *srow)
    path.write_bytes(header)
    for light in (False, True):
        if refused:
            angle = f"{90 + abs(degrees):.2f}"  # the x axis runs right to left (srow_x[0] -0.9)
            if degrees < 0:
                angle = f"{90 - abs(degrees):.2f}"
            with pytest.raises(DeepWMLError, match=rf"leaning\.nii: its header's sform places the voxels on a sheared "
                                                   rf"grid \(axes 1 and 3 at {angle} degrees, not 90\).*resample it"):
                io.read_image(path, light=light)
        else:
            assert io.read_image(path, light=light).GetSize() == image.GetSize()
    struct.pack_into("<h", header, 254, 0)  # sform_code 0: the qform alone places it
    path.write_bytes(header)
    assert np.allclose(io.read_image(path).GetOrigin(), image.GetOrigin(), atol=1e-4)


def test_a_nifti_whose_voxels_follow_its_header_without_extension_flags_is_read(tmp_path):
    """Voxels right after the 348-byte header (vox_offset 348), without the 4 bytes of extension flags: as MATLAB
    toolboxes and web viewers' exporters write them, and the image library reads them. They were refused as a damaged
    file (voxels 'not after the header's 352 bytes')."""
    image = make_volume(size=(12, 10, 5), spacing=(0.9, 0.9, 5.0), direction=rotation(0.1, 0.0, 0.2),
                        dtype=sitk.sitkInt16)[0]
    sitk.WriteImage(image, str(tmp_path / "usual.nii"))
    usual = (tmp_path / "usual.nii").read_bytes()
    tight = bytearray(usual[:348] + usual[352:])
    struct.pack_into("<f", tight, 108, 348.0)
    (tmp_path / "tight.nii").write_bytes(bytes(tight))
    for light in (False, True):
        read = io.read_image(tmp_path / "tight.nii", light=light)
        assert io.grid_difference(read, image) is None
        assert np.array_equal(io.voxels(read), sitk.GetArrayFromImage(image).astype(np.float32))


@pytest.mark.parametrize("name", ["scan.nrrd", "scan.mha"])
def test_a_header_is_read_once_for_the_checks_simpleitk_lacks(tmp_path, monkeypatch, name):
    """An NRRD's header was opened and parsed three times for the checks SimpleITK lacks (a slice placed in
    space, no voxel size, lengths not in mm: 0.9 ms of a 182 x 218 x 182 .nrrd's 27 ms read); once now, with
    the same answers (the tests above)."""
    sitk.WriteImage(make_volume()[0], str(tmp_path / name))
    read = []
    fields = io._header_fields
    monkeypatch.setattr(io, "_header_fields", lambda path: read.append(path) or fields(path))
    assert io.read_image(tmp_path / name).GetSize() == (48, 40, 10)
    assert len(read) == 1, read


def test_mask_on_other_grid_is_refused(tmp_path):
    image, truth = make_volume(size=(20, 16, 6))
    for change in ("spacing", "origin", "direction", "size"):
        other = sitk.Image(truth) if change != "size" else truth[:, :, :5]
        if change == "size":  # off the scan's lattice too (a crop on it is padded: below)
            other.SetOrigin(tuple(np.array(other.GetOrigin()) + 0.3))
        elif change == "spacing":
            other.SetSpacing((0.9, 0.9, 4.0))
        elif change == "origin":
            other.SetOrigin((0, 0, 0))
        elif change == "direction":
            other.SetDirection(rotation(0.05, 0, 0).ravel())
        path = tmp_path / f"mask_{change}.nii.gz"
        sitk.WriteImage(other, str(path))
        with pytest.raises(DeepWMLError, match=change):
            io.read_mask(path, reference=image)


def test_mask_with_fractional_values_is_refused(tmp_path):
    path = _write(tmp_path / "prob.nii.gz", np.full((4, 5, 6), 0.3, np.float32))
    with pytest.raises(DeepWMLError, match="not a label mask"):
        io.read_mask(path)


def test_atomic_write_leaves_no_partial_file(tmp_path, monkeypatch):
    image, _ = make_volume(size=(10, 10, 3))
    target = tmp_path / "out.nii.gz"

    def broken_write(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(sitk, "WriteImage", broken_write)
    with pytest.raises(DeepWMLError, match="cannot write"):
        io.write_image(image, target)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["out.nii.gz", "out.nii"])
def test_a_nifti_file_the_image_library_writes_short_is_an_error_not_an_output(tmp_path, name):
    """SimpleITK's NIfTI writer says a failed write (a full disk, a file size limit) only on stderr ("NWAD: wrote
    only 0 of ... bytes"), not by an exception: the file cut short was renamed into place as the output (a `deepwml
    synth` set on a full disk got a 0-byte mask and went on). A real failed write, made by a file size limit
    (RLIMIT_FSIZE: Python ignores SIGXFSZ, so the write fails with EFBIG), as a full disk does; the file cut short at
    the limit says which (test_an_output_over_the_file_size_limit_is_said_to_be_so)."""
    resource = pytest.importorskip("resource")
    image = sitk.GetImageFromArray(np.random.default_rng(0).integers(0, 4000, (20, 64, 64)).astype(np.uint16))
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (20000, hard))
    try:
        with pytest.raises(DeepWMLError, match=rf"cannot write .*{name} \(File too large\); .* file size limit"):
            io.write_image(image, tmp_path / name)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert list(tmp_path.iterdir()) == []
    io.write_image(image, tmp_path / name)  # with room, written and read back whole
    assert np.array_equal(sitk.GetArrayFromImage(io.read_image(tmp_path / name)), sitk.GetArrayFromImage(image))


FULL_DISK_WORDS = "the disk is full: free space on it"


@pytest.mark.parametrize("code, words, stage", [  # a file size limit fails writes, not the making of a file
    (errno.ENOSPC, FULL_DISK_WORDS, "temporary name"), (errno.ENOSPC, FULL_DISK_WORDS, "writing"),
    (errno.ENOSPC, FULL_DISK_WORDS, "lock"), (errno.EFBIG, "larger than a file size limit allows (ulimit -f", "writing")])
def test_a_full_disk_is_said_so_not_sent_to_look_at_permissions(tmp_path, monkeypatch, code, words, stage):
    """'cannot write in OUTDIR (No space left on device); choose a writable output folder' sent a user with a full
    disk to look at the folder's permissions."""

    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    real_open = os.open
    if stage == "temporary name":
        monkeypatch.setattr(io.tempfile, "mkstemp", fail)
    if stage == "lock":
        monkeypatch.setattr(io.os, "open", lambda path, *args: (fail if str(path).endswith(".lock") else real_open)(path, *args))
    with pytest.raises(DeepWMLError, match=re.escape(words)) as caught:
        if stage == "lock":
            with io.exclusive(tmp_path / "case.lock", "case"):
                pass
        else:
            io.write_atomically(tmp_path / "a_report.json", fail if stage == "writing" else os.path.exists)
    assert "permissions" not in str(caught.value) and "writable" not in str(caught.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("free, said", [(0, "(No space left on device); the disk is full: free space on it"),
                                        (10 << 30, "(ITK ERROR: NrrdImageIO: failed to write to file); check free space and permissions")])
def test_an_image_writer_error_on_a_full_disk_is_said_as_the_full_disk(tmp_path, monkeypatch, free, said):
    """ITK's writers carry no errno: on a full disk NRRD said "failed to write to file", GDCM "DICOM does not support
    this component type". On a disk with (almost) no space left such an error is the full disk; elsewhere its own."""
    import shutil

    image, _ = make_volume(size=(10, 10, 3))

    def fails(*args, **kwargs):
        raise RuntimeError("ITK ERROR: NrrdImageIO: failed to write to file")

    monkeypatch.setattr(sitk, "WriteImage", fails)
    monkeypatch.setattr(shutil, "disk_usage", lambda folder: shutil._ntuple_diskusage(20 << 30, 20 << 30, free))
    with pytest.raises(DeepWMLError, match=re.escape(f"cannot write {tmp_path / 'a_prob.nrrd'} {said}")):
        io.write_image(image, tmp_path / "a_prob.nrrd")
    assert list(tmp_path.iterdir()) == []


def test_every_output_is_on_disk_before_its_name_and_the_name_before_the_next(tmp_path, monkeypatch):
    """A power cut after the rename must not find a mask empty or cut short under its name beside a complete
    report (a rerun would skip the case as done): each output's bytes are synced before it is renamed into
    place, and the rename is synced before the next output (the report last) is written."""
    from DeepWMLLib.volume import Volume

    events = record_syncs_and_renames(monkeypatch)
    image, mask = make_volume(size=(10, 10, 3))
    light = Volume(sitk.GetArrayFromImage(mask), mask.GetSpacing(), mask.GetOrigin(), mask.GetDirection())
    writes = [lambda: io.write_image(light, tmp_path / "a_wmh.nii.gz"),  # without SimpleITK, as segment writes it
              lambda: io.write_image(image, tmp_path / "a_prob.nrrd"),
              lambda: io.write_segmentation(mask, tmp_path / "a.seg.nrrd"),
              lambda: io.write_bytes(b"picture", tmp_path / "a_qc.png"),
              lambda: io.write_text("{}", tmp_path / "a_report.json")]
    folder = os.stat(tmp_path)
    for write in writes:
        events.clear()
        write()
        renamed = [k for k, (kind, _) in enumerate(events) if kind == "rename"]
        assert len(renamed) == 1, events
        k = renamed[0]
        assert any(kind == "sync" and os.path.samestat(stat, events[k][1]) for kind, stat in events[:k]), events
        assert any(kind == "sync" and os.path.samestat(stat, folder) for kind, stat in events[k + 1:]), events


def test_a_path_that_cannot_be_looked_up_is_refused_in_words(tmp_path):
    """A name over the file system's 255 bytes made Path.exists raise: 'internal error: OSError'."""
    with pytest.raises(DeepWMLError, match=r"cannot be looked up \(File name too long\)"):
        io.read_image(tmp_path / ("x" * 300 + ".nii.gz"))


def test_write_into_missing_folder_is_refused(tmp_path):
    image, _ = make_volume(size=(10, 10, 3))
    with pytest.raises(DeepWMLError, match="does not exist"):
        io.write_image(image, tmp_path / "no" / "out.nii.gz")


def test_segmentation_file_round_trip_oblique(tmp_path):
    _, truth = make_volume(size=(24, 20, 7), spacing=(0.6, 0.7, 5.0), direction=rotation(0.3, 0.1, -0.4))
    path = io.write_segmentation(truth, tmp_path / "case.seg.nrrd")
    back = io.read_segmentation(path, "WMH")
    assert io.grid_difference(back, truth) is None
    assert np.array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(truth))
    import slicerio

    seg = slicerio.read_segmentation(str(path))
    assert [s["name"] for s in seg["segments"]] == ["WMH"]
    assert np.allclose(seg["ijkToLPS"], io.ijk_to_lps(truth))


def test_segmentation_file_matches_what_slicerio_writes(tmp_path):
    """DeepWML writes .seg.nrrd itself (no slicerio/pynrrd import on the segment path): the file must
    parse to the same segment, voxels and geometry as slicerio's own writer gives."""
    import slicerio

    _, truth = make_volume(size=(24, 20, 7), spacing=(0.6, 0.7, 5.0), direction=rotation(0.3, 0.1, -0.4))
    ours = slicerio.read_segmentation(str(io.write_segmentation(truth, tmp_path / "ours.seg.nrrd", "WMH", (1.0, 0.9, 0.0))))
    voxels = sitk.GetArrayFromImage(truth).transpose(2, 1, 0) > 0
    reference = slicerio.create_segmentation(voxels.shape, io.ijk_to_lps(truth))
    slicerio.add_segment(reference, voxels, {"id": "WMH", "name": "WMH", "color": [1.0, 0.9, 0.0]})
    slicerio.write_segmentation(str(tmp_path / "theirs.seg.nrrd"), reference)
    theirs = slicerio.read_segmentation(str(tmp_path / "theirs.seg.nrrd"))
    assert ours["segments"] == theirs["segments"]
    assert np.array_equal(ours["voxels"], theirs["voxels"])
    assert np.allclose(ours["ijkToLPS"], theirs["ijkToLPS"], atol=1e-12)


@pytest.mark.parametrize("field,value,words", [
    ("space origin", "(nan,nan,nan)", "'space origin: (nan,nan,nan)', not 3 numbers"),  # an internal error (ValueError)
    ("space directions", "(0,0,0) (0,0.8,0) (0,0,5)", "whose vector of axis 0 has a length of 0"),  # ITK's words
    ("space directions", "(nan,nan,nan) (nan,nan,nan) (nan,nan,nan)", "whose vector of axis 0 is not 3 numbers"),
    ("space directions", "(1e30,0,0) (0,0.8,0) (0,0,5)", "voxel size is no MRI's"),  # called another grid
])
def test_a_segmentation_file_placed_nowhere_is_refused_naming_the_field(tmp_path, field, value, words):
    """A Slicer .seg.nrrd given as a mask (evaluate, consensus, change) is read by its segments, not by SimpleITK:
    a 'space origin' of NaN was an internal error ('ValueError: data must be finite'), a direction of length 0
    SimpleITK's 'Zero-valued spacing is not supported', NaN or 1e30 directions another voxel grid than the
    scan's. Refused as the same NRRD damage is in a scan."""
    image, truth = make_volume(size=(12, 10, 4), spacing=(0.9, 0.8, 5.0))
    path = tmp_path / "rater.seg.nrrd"
    io.write_segmentation(truth, path)
    data = path.read_bytes()
    path.write_bytes(re.sub(rf"{field}: [^\n]*".encode(), f"{field}: {value}".encode(), data, count=1))
    with pytest.raises(DeepWMLError, match=r"rater\.seg\.nrrd: its .*" + re.escape(words)):
        io.read_mask(path)


def test_empty_segmentation_file_reads_back_empty(tmp_path):
    import slicerio

    _, truth = make_volume(size=(12, 10, 4))
    empty = sitk.Image(truth.GetSize(), sitk.sitkUInt8)
    empty.CopyInformation(truth)
    path = io.write_segmentation(empty, tmp_path / "empty.seg.nrrd")
    seg = slicerio.read_segmentation(str(path))
    assert seg["segments"][0]["extent"] == [0, -1, 0, -1, 0, -1]
    assert sitk.GetArrayFromImage(io.read_segmentation(path)).sum() == 0


def test_searching_a_tree_with_a_link_loop_ends(tmp_path):
    """A symbolic link back up the tree (as some exports and mounts have) is followed once, not forever."""
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "up").symlink_to(tmp_path / "a")
    (tmp_path / "a" / "notes.txt").write_text("no DICOM here")
    assert not io.has_dicom_below(tmp_path / "a")
    assert io.dicom_catalogue(tmp_path / "a") == ([], [])


def test_a_series_with_a_slice_missing_is_refused(tmp_path):
    """An incomplete transfer (a slice file missing) would be read onto a regular grid with every later
    slice misplaced: refused, saying where the gap is."""
    image, _ = make_volume(size=(20, 16, 8), spacing=(0.8, 0.8, 5.0), dtype=sitk.sitkInt16,
                           direction=rotation(0.1, 0.05, 0.2).ravel().tolist())
    folder = write_dicom_series(tmp_path / "gap", image, description="FLAIR")
    assert io.read_image(folder).GetSize()[2] == 8  # whole: read
    (folder / "slice004.dcm").unlink()
    with pytest.raises(DeepWMLError, match=r"10.00 mm between images 4 and 5, 5.00 mm elsewhere: about 1 slice\(s\) missing"):
        io.read_image(folder)



@pytest.mark.parametrize("steps, noise_mm, warned", [
    ([5, 5, 5.6, 5, 5, 5, 5], 0.0, "(5.00 to 5.60 mm apart by their positions): volumes and LV use their mean "
                                   "spacing, 5.09 mm, which puts image 4 (instance 4) 0.34 mm from where it was imaged"),
    ([5, 5, 5.6, 5, 5, 5, 5], 0.001, "(5.00 to 5.60 mm apart by their positions): volumes and LV use their mean "
                                     "spacing, 5.09 mm, which puts image 4 (instance 4) 0.34 mm from where it was imaged"),
    ([4.6, 5.4, 4.6, 5.4, 4.6, 5.4, 5.4], 0.0, "(4.60 to 5.40 mm apart by their positions): volumes and LV use their "
                                               "mean spacing, 5.06 mm, which puts image 6 (instance 6) 0.69 mm from "
                                               "where it was imaged"),
    ([5.0] * 7, 0.0, None),
    ([5.0] * 7, 0.001, None),  # float noise
    ([5.0] * 7, 0.005, None)])  # positions rounded to 0.01 mm
def test_slices_unevenly_spaced_within_the_refusal_are_warned_of(tmp_path, steps, noise_mm, warned):
    """Slices 5 mm apart but for one 5.6 mm step, or alternately 4.6 and 5.4 mm apart (within the 20 % that is
    refused as slices missing), were read by ITK onto a regular grid of their mean step without a word: the
    stack's extent is right, but a slice lay up to 0.7 mm from where it was imaged and a lesion beside a long
    step measured 2 % small. The series now warns of it, with the range of steps, the spacing the volumes use and
    the slice placed farthest off; positions with float noise or rounded to 0.01 mm (every real file) do not."""
    image, _ = make_volume(size=(20, 16, 8), spacing=(0.8, 0.8, 5.0), dtype=sitk.sitkInt16,
                           direction=rotation(0.1, 0.05, 0.2).ravel().tolist())
    positions = stepped_positions(image, steps, noise_mm)
    folder = write_dicom_series(tmp_path / "series", image, description="AX FLAIR", positions=positions)
    (series,) = io.dicom_series(folder)
    read = io.read_image(folder, series=series)
    assert np.allclose(read.TransformIndexToPhysicalPoint((0, 0, 7)), positions[-1], atol=0.02)  # the extent: right
    warnings = series.slice_warnings(read)
    assert warnings == ([] if warned is None else [f"DICOM slices unevenly spaced {warned} (lesions there are "
                                                   "placed as far off, and measured with the mean spacing)"])


@pytest.mark.parametrize("steps, noise_mm, order, warned", [
    ([5, 5, 5.6, 5, 5, 5, 5], 0.0, None, "(5.00 to 5.60 mm apart by their positions): volumes and LV use their mean "
                                         "spacing, 5.09 mm, which puts frame 4 0.34 mm from where it was imaged"),
    ([4.6, 5.4, 4.6, 5.4, 4.6, 5.4, 5.4], 0.0, None, "(4.60 to 5.40 mm apart by their positions): volumes and LV use "
                                                     "their mean spacing, 5.06 mm, which puts frame 6 0.69 mm from "
                                                     "where it was imaged"),
    ([5, 5, 5.6, 5, 5, 5, 5], 0.0, range(7, -1, -1), "(5.00 to 5.60 mm apart by their positions): volumes and LV use "
                                                     "their mean spacing, 5.09 mm, which puts frame 5 0.34 mm from "
                                                     "where it was imaged"),
    ([5.0] * 7, 0.001, None, None),  # float noise
    ([5.0] * 7, 0.005, None, None)])  # positions rounded to 0.01 mm
def test_an_enhanced_mr_files_frames_unevenly_spaced_are_read_on_their_mean_step_and_warned_of(tmp_path, steps,
                                                                                                noise_mm, order, warned):
    """One multi-frame (Enhanced MR) file whose frames are unevenly spaced within the fifth that is refused: GDCM
    read it on 1 x 1 x 1 mm voxels, and it was refused as 'its pixels are 0.8 x 0.7 mm and were read as 1 x 1
    mm', even for frames 5 mm apart whose positions were written rounded to 0.01 mm. It is now read on the
    frames' mean step, as a series of one file per slice is, and warned of as that series is (the same
    tolerance: rounded positions are not)."""
    image, _ = make_volume(size=(20, 16, 8), spacing=(0.8, 0.7, 5.0), dtype=sitk.sitkInt16,
                           direction=rotation(0.1, 0.05, 0.2).ravel().tolist())
    positions = stepped_positions(image, steps, noise_mm)
    write_enhanced_mr(tmp_path / "stack" / "IM1", image, order=order, positions=positions)
    (series,) = io.dicom_series(tmp_path / "stack")
    read = io.read_image(tmp_path / "stack", series=series)
    first, last = (0, 7) if order is None else (7, 0)
    assert np.allclose(read.GetSpacing()[:2], (0.8, 0.7))
    assert np.allclose(read.TransformIndexToPhysicalPoint((0, 0, 0)), positions[first], atol=0.02)
    assert np.allclose(read.TransformIndexToPhysicalPoint((0, 0, 7)), positions[last], atol=0.02)  # the extent: right
    expected = sitk.GetArrayFromImage(image).astype(np.float32)
    assert np.array_equal(sitk.GetArrayFromImage(read), expected if order is None else expected[::-1])
    assert series.slice_warnings(read) == ([] if warned is None else [f"DICOM slices unevenly spaced {warned} (lesions "
                                                                      "there are placed as far off, and measured with "
                                                                      "the mean spacing)"])


@pytest.mark.parametrize("direction", [None, (1, 0, 0, 0, 1, 0, 0, 0, -1)])
@pytest.mark.parametrize("order", [None, range(7, -1, -1)])
def test_a_1_mm_isotropic_enhanced_mr_file_is_read_whichever_way_its_frames_are_stored(tmp_path, direction, order):
    """A 1 mm isotropic 3D FLAIR as one Enhanced MR file: GDCM reads its evenly spaced frames on 1 x 1 x 1 mm, its
    own spacing for unevenly spaced frames, and already along the way they are stored. Taken for unevenly spaced
    frames, its slice axis was turned a second time where the frames are stored from the top down, and the file
    was refused ('frame 8 lies 14.0 mm from where the volume read from it puts it'); it is read as it was."""
    image, _ = make_volume(size=(20, 16, 8), spacing=(1.0, 1.0, 1.0), dtype=sitk.sitkInt16, direction=direction)
    write_enhanced_mr(tmp_path / "stack" / "IM1", image, order=order)
    (series,) = io.dicom_series(tmp_path / "stack")
    read = io.read_image(tmp_path / "stack", series=series)
    first, last = (0, 7) if order is None else (7, 0)
    assert read.GetSpacing() == pytest.approx((1.0, 1.0, 1.0))
    assert np.allclose(read.TransformIndexToPhysicalPoint((0, 0, 0)), image.TransformIndexToPhysicalPoint((0, 0, first)))
    assert np.allclose(read.TransformIndexToPhysicalPoint((0, 0, 7)), image.TransformIndexToPhysicalPoint((0, 0, last)))
    expected = sitk.GetArrayFromImage(image).astype(np.float32)
    assert np.array_equal(sitk.GetArrayFromImage(read), expected if order is None else expected[::-1])
    assert series.slice_warnings(read) == []


@pytest.mark.parametrize("change,words", [
    ({"orientation": "0\\0\\0\\0\\1\\0"}, r"frame 1's Image Orientation \(Patient\) as '0\\\\0\\\\0\\\\0\\\\1\\\\0', no "
                                          r"pair of unit vectors at right angles"),
    ({"orientation": "1\\0\\0\\1\\0\\0"}, r"frame 1's Image Orientation \(Patient\) as '1\\\\0\\\\0\\\\1\\\\0\\\\0', no pair of unit vectors at right angles"),
    ({"orientation": "nan\\0\\0\\0\\1\\0"}, r"frame 1's Image Orientation \(Patient\) as 'nan\\\\0.*', not six numbers"),
    ({"positions": "nan"}, r"frame 3's Image Position \(Patient\) as 'nan\\\\nan\\\\nan', not three numbers"),
    ({"pixel": b"nan\\nan"}, r"a Pixel Spacing of 'nan\\\\nan', not two sizes above 0"),
    ({"pixel": b"0.0\\0.0"}, r"a Pixel Spacing of '0\\\\0', not two sizes above 0"),
], ids=["a-row-of-zeros", "rows-in-one-line", "orientation-nan", "position-nan", "pixel-spacing-nan", "pixel-spacing-0"])
def test_an_enhanced_mr_file_whose_frames_geometry_is_not_numbers_is_refused_naming_it(tmp_path, change, words):
    """An enhanced MR file whose functional groups give an orientation of zeros, NaN or rows in one line, a NaN
    position or a Pixel Spacing of NaN or 0 was refused in ITK's words, 'Zero-valued spacing is not supported',
    which named nothing the user could look for (one frame's NaN position: 'frame 2 lies nan mm from where the
    volume read from it puts it'). The field and the frame are named."""
    image, _ = make_volume(size=(20, 16, 6), spacing=(0.8, 0.8, 5.0), dtype=sitk.sitkInt16,
                           direction=rotation(0.0, 0.0, 0.3).ravel().tolist())
    kwargs = {"orientation": change["orientation"]} if "orientation" in change else {}
    if "positions" in change:
        kwargs["positions"] = [image.TransformIndexToPhysicalPoint((0, 0, k)) for k in range(6)]
        kwargs["positions"][2] = (math.nan,) * 3
    path = write_enhanced_mr(tmp_path / "enhanced" / "im.dcm", image, **kwargs)
    if "pixel" in change:  # the shared Pixel Measures' Pixel Spacing, of the same length
        data = path.read_bytes()
        assert data.count(b"0.8\\0.8") == 1
        path.write_bytes(data.replace(b"0.8\\0.8", change["pixel"]))
    with pytest.raises(DeepWMLError, match=r"the functional groups of the multi-frame DICOM file im\.dcm give " + words
                       + ".*a damaged file; export the series again"):
        io.read_image(path.parent)


def test_an_enhanced_mr_files_frames_drifting_over_half_a_slice_are_refused(tmp_path):
    """As a series of one file per slice is: steps drifting from 4.1 to 5.9 mm put the middle frames of the
    mean-spaced grid over half a slice from where they were imaged."""
    image, _ = make_volume(size=(20, 16, 21), spacing=(0.8, 0.8, 5.0), dtype=sitk.sitkInt16,
                           direction=rotation(0.1, 0.05, 0.2).ravel().tolist())
    write_enhanced_mr(tmp_path / "stack" / "IM1", image, positions=stepped_positions(image, np.linspace(4.1, 5.9, 20)))
    with pytest.raises(DeepWMLError, match=r"frames of the multi-frame DICOM file IM1 are unevenly spaced \(4.10 to 5.90 "
                                           r"mm apart\): on a regular grid of their mean spacing, 5.00 mm, frame 11 would "
                                           r"lie 4.7 mm \(over half a slice\)"):
        io.read_image(tmp_path / "stack")


def test_a_step_over_a_fifth_off_is_still_refused_not_warned_of(tmp_path):
    image, _ = make_volume(size=(20, 16, 8), spacing=(0.8, 0.8, 5.0), dtype=sitk.sitkInt16,
                           direction=rotation(0.1, 0.05, 0.2).ravel().tolist())
    folder = write_dicom_series(tmp_path / "series", image, description="AX FLAIR",
                                positions=stepped_positions(image, [5, 5, 6.3, 5, 5, 5, 5]))
    with pytest.raises(DeepWMLError, match=r"not evenly spaced \(6.30 mm between images 3 and 4, 5.00 mm elsewhere: "
                                           r"uneven slice spacing\)"):
        io.read_image(folder)


def test_a_slice_position_that_is_not_numbers_is_refused(tmp_path):
    """A damaged Image Position (Patient) ('-19.j679'): GDCM read what it could of it, sorted and spaced the slices
    wrongly (a 6 mm series read as 1.24 mm slices in another order) and the spacing check, finding a word that is
    no number, let it through: segmented 'ok', every volume wrong."""
    image, _ = make_volume(size=(20, 16, 8), spacing=(0.8, 0.8, 5.0), dtype=sitk.sitkInt16)
    folder = write_dicom_series(tmp_path / "series", image, description="AX FLAIR")
    damaged = folder / "slice003.dcm"
    data = damaged.read_bytes()
    at = data.index(b"\x20\x00\x32\x00") + 8  # (0020,0032)'s value, implicit VR: after tag and length
    end = at + struct.unpack_from("<I", data, at - 4)[0]
    value = data[at:end]
    damaged.write_bytes(data[:at] + value[:-3] + b"j" + value[-2:] + data[end:])  # a digit of z made a letter
    with pytest.raises(DeepWMLError, match=r"the Image Position \(Patient\) of image \d+ of the DICOM series is missing "
                                           r"or not three numbers \('.*j.*'\), so its slices cannot be placed"):
        io.read_image(folder)
    damaged.write_bytes(data[:at - 8] + data[end:])  # none in one file: GDCM sorted the slices by what it could
    with pytest.raises(DeepWMLError, match=r"of image \d+ of the DICOM series is missing or not three numbers \(''\)"):
        io.read_image(folder)


@pytest.mark.parametrize("orientation,words", [
    ("0\\0\\0\\0\\1\\0", r"Image Orientation \(Patient\) \(0020,0037\), '0\\\\0\\\\0\\\\0\\\\1\\\\0', is no pair of "
                         r"unit vectors at right angles .* read them as \(1, 0, 0\), \(0, 1, 0\) instead"),
    ("1\\0\\0\\1\\0\\0", r"'1\\\\0\\\\0\\\\1\\\\0\\\\0', is no pair of unit vectors at right angles"),
    ("0.955\\0.296\\0\\-0.28\\0.96\\0", r"is no pair of unit vectors at right angles"),  # 1 degree off
    ("nan\\0\\0\\0\\1\\0", r"Image Orientation \(Patient\) \(0020,0037\) of image 1 of the DICOM series is not six "
                           r"numbers \('nan.*'\)"),  # was called 'a localizer or a reformat shares the series UID'
    ("1\\0\\0\\0\\1", r"of image 1 of the DICOM series is not six numbers"),
    (None, r"give no Image Orientation \(Patient\) \(0020,0037\), so the orientation of their slices is unknown"),
    # (mutation audit, mut44) columns 3 degrees off a right angle: read as the identity, 0.05 from the given rows
    ("1\\0\\0\\0.05\\1\\0", r"is no pair of unit vectors at right angles .* read them as \(1, 0, 0\), \(0, 1, 0\)"),
], ids=["a-row-of-zeros", "rows-in-one-line", "rows-not-at-right-angles", "nan", "five-numbers", "missing",
        "columns-3-degrees-off"])
def test_a_series_whose_orientation_is_no_pair_of_unit_vectors_is_refused(tmp_path, orientation, words):
    """GDCM reads a series whose Image Orientation (Patient) is missing or no pair of unit vectors at right angles
    as axial, without a word: an axial scan turned 17 degrees in its plane was segmented 'ok' on unturned axes
    (every slice's mask turned against the scan in the patient). Refused naming the tag; a value of rounded unit
    vectors is read as it says."""
    turned = rotation(0.0, 0.0, 0.3)
    image, _ = make_volume(size=(20, 16, 6), spacing=(0.8, 0.8, 5.0), dtype=sitk.sitkInt16, direction=turned.ravel().tolist())
    folder = write_dicom_series(tmp_path / "series", image, description="AX FLAIR")
    set_orientation(folder, orientation)
    with pytest.raises(DeepWMLError, match=words):
        io.read_image(folder)
    rounded = "\\".join(f"{v:.4f}" for v in (*turned[:, 0], *turned[:, 1]))  # 4 decimals: 1e-4 off unit length
    folder = write_dicom_series(tmp_path / "rounded", image, description="AX FLAIR")
    set_orientation(folder, rounded)
    assert np.allclose(io.read_image(folder).GetDirection(), turned.ravel(), atol=2e-4)


def test_a_series_whose_every_file_is_damaged_is_not_called_a_folder_without_dicom(tmp_path):
    """Files whose pixel data are gone (a transfer cut short in every file) are DICOM files all the same: 'a folder
    without a DICOM series or image files' sent the user looking for files that are there."""
    image, _ = make_volume(size=(20, 16, 4), spacing=(0.8, 0.8, 5.0), dtype=sitk.sitkInt16)
    folder = write_dicom_series(tmp_path / "series", image, description="AX FLAIR")
    for path in folder.iterdir():
        data = path.read_bytes()
        path.write_bytes(data[:data.index(b"\xe0\x7f\x10\x00")])  # the pixel data element, and all after it
    with pytest.raises(DeepWMLError, match=r"series holds 4 DICOM file\(s\), but no image series the DICOM library "
                                           r"can read \(damaged headers"):
        io.read_image(folder)


def _label_enhanced_mr(folder):
    """Each file's (0008,0016) MR Image Storage made Enhanced MR Image Storage (implicit VR little endian)."""
    for path in folder.iterdir():
        data = path.read_bytes()
        at = data.index(b"\x08\x00\x16\x00", 132) + 8
        end = at + struct.unpack_from("<I", data, at - 4)[0]
        path.write_bytes(data[:at - 4] + struct.pack("<I", 28) + b"1.2.840.10008.5.1.4.1.1.4.1\0" + data[end:])


def test_a_series_whose_slices_are_read_other_than_their_positions_space_them_is_refused(tmp_path):
    """Classic images labelled Enhanced MR (SOP Class UID damaged): GDCM sought their geometry in functional groups
    they lack and read 1 x 1 x 1 mm at 0, 0, 0, though their positions put the slices 5 mm apart: said 'ok', every
    volume wrong."""
    image, _ = make_volume(size=(20, 16, 6), spacing=(0.8, 0.8, 5.0), dtype=sitk.sitkInt16)
    folder = write_dicom_series(tmp_path / "series", image, description="AX FLAIR")
    _label_enhanced_mr(folder)
    with pytest.raises(DeepWMLError, match=r"read the series' slices 1.00 mm apart, but their Image Positions "
                                           r"\(Patient\) are 5.00 mm apart"):
        io.read_image(folder)


def _retag(path, **tags):
    """Rewrite one file of a `write_dicom_series` series with tags changed (keyword: the tag with '_' for '|')."""
    image = sitk.ReadImage(str(path))
    for key, value in tags.items():
        image.SetMetaData(key.replace("_", "|"), value)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    writer.SetFileName(str(path))
    writer.Execute(image)


def test_a_series_with_a_gantry_tilt_is_refused(tmp_path):
    """Slices shifted sideways along the stack (a gantry tilt: each slice's position moves along the column
    direction) were read as a straight stack 4.2 mm apart instead of 4 mm: every slice misplaced (by up to 5 mm
    here) and every volume 4 % too large, silently. A stack 0.1 pixel off over its length is still read."""
    image, _ = make_volume(size=(20, 16, 8), spacing=(0.8, 0.8, 4.0), dtype=sitk.sitkInt16,
                           direction=rotation(0.1, 0.05, 0.2).ravel().tolist())
    d = np.array(image.GetDirection()).reshape(3, 3)
    for name, shift in (("straight", 0.08 / 7), ("tilted", 4.0 * np.tan(np.radians(10)))):
        folder = write_dicom_series(tmp_path / name, image, description="AX FLAIR")
        for k in range(8):
            position = np.array(image.TransformIndexToPhysicalPoint((0, 0, k))) + d[:, 1] * k * shift
            _retag(folder / f"slice{k:03d}.dcm", **{"0020_0032": "\\".join(f"{v:.4f}" for v in position)})
    assert io.grid_difference(io.read_image(tmp_path / "straight"), image) is None
    with pytest.raises(DeepWMLError, match=r"not stacked straight .*image 8 lies 4.9 mm sideways.*gantry tilt"):
        io.read_image(tmp_path / "tilted")


@pytest.mark.parametrize("enhanced", [False, True])
def test_a_long_oblique_stack_whose_orientation_is_given_to_3_decimals_is_read(tmp_path, enhanced):
    """Image Orientation (Patient) given to 3 decimals (as some consoles and converters write it) puts the
    normal up to about 0.001 rad off: over a 176 mm stack of 0.23 mm pixels the last slice lay 0.1 mm 'sideways'
    and a straight stack was refused as a gantry tilt (an enhanced file's frame as 0.1 mm off its grid). The
    tolerance grows with the stack's length (0.002 of it: a tilt of 0.1 degree); a real tilt is still refused."""
    image, _ = make_volume(size=(8, 8, 176), spacing=(0.23, 0.23, 1.0), dtype=sitk.sitkInt16, blobs=(),
                           direction=rotation(0.3, 0.25, 0.2).ravel().tolist())
    d = image.GetDirection()
    cosines = "\\".join(f"{v:.3f}" for v in (d[0], d[3], d[6], d[1], d[4], d[7]))
    if enhanced:
        write_enhanced_mr(tmp_path / "stack" / "IM1", image, orientation=cosines)
    else:
        write_dicom_series(tmp_path / "stack", image, description="AX FLAIR", extra={"0020|0037": cosines})
    assert io.read_image(tmp_path / "stack").GetSize() == (8, 8, 176)


def test_an_image_in_another_plane_sharing_the_series_uid_is_named(tmp_path):
    """A localizer of the FLAIR's size with its series UID was refused as 'about 9 slice(s) missing': the
    image in another plane is named instead."""
    image, _ = make_volume(size=(20, 16, 8), spacing=(0.8, 0.8, 4.0), dtype=sitk.sitkInt16)
    folder = write_dicom_series(tmp_path / "flair", image, description="AX FLAIR")
    loose = write_dicom_series(tmp_path / "loc", image[:, :, 3:4], description="AX FLAIR", prefix="localizer")
    (loose / "localizer000.dcm").replace(folder / "localizer000.dcm")
    _retag(folder / "localizer000.dcm", **{"0020_0037": "1\\0\\0\\0\\0\\-1"})
    with pytest.raises(DeepWMLError, match=r"not all lie in one plane \(8 do, and localizer000.dcm faces another way\)"):
        io.read_image(folder)


def test_an_image_turned_2_degrees_in_its_plane_is_named(tmp_path):
    """Mutation audit (mut44): an image whose orientation is 2 degrees off the others' (0.035 apart, past the 1e-3
    within which they lie in one plane) is named, as a localizer is."""
    image, _ = make_volume(size=(20, 16, 8), spacing=(0.8, 0.8, 4.0), dtype=sitk.sitkInt16)
    folder = write_dicom_series(tmp_path / "flair", image, description="AX FLAIR")
    _retag(folder / "slice003.dcm", **{"0020_0037": "0.99939\\0.0349\\0\\-0.0349\\0.99939\\0"})
    with pytest.raises(DeepWMLError, match=r"not all lie in one plane \(7 do, and slice003.dcm faces another way\)"):
        io.read_image(folder)


def test_pixel_data_a_byte_or_two_short_is_refused_and_a_one_pixel_image_padded_to_even_length_read():
    """Mutation audit (mut44): `_pixel_verdict` on its edges, by hand: Pixel Data 2 bytes short of 4 x 4 pixels of 16
    bits is a damaged header (no padding rule applies below the image's length); a 1 x 1 image of 8 bits padded to an
    even length (PS3.5 7.1.1) by one byte is read."""
    def layout(rows, columns, bits, length):
        return io._PixelLayout("", rows, columns, 1, 1, 1, bits, False, length, "<", 0, 0, False)

    assert io._pixel_verdict(layout(4, 4, 16, 30))[0] == ("gives 4 rows x 4 columns of 16 bits (32 bytes), but its Pixel "
                                                         "Data holds 30 bytes")
    assert io._pixel_verdict(layout(4, 4, 16, 32)) == (None, 0, None)
    assert io._pixel_verdict(layout(1, 1, 8, 2)) == (None, 0, None)
    # 1 bit a pixel: 5 x 5 pixels need 4 bytes (25 bits rounded up), so 3 are short of them
    assert io._pixel_verdict(layout(5, 5, 1, 3))[0] == ("gives 5 rows x 5 columns of 1 bits (4 bytes), but its Pixel "
                                                       "Data holds 3 bytes")


def test_pixel_data_past_a_frame_or_of_several_frames_is_no_padding(tmp_path):
    """Mutation audit (mut44): zeros past the image are padding only in a single-frame image and less than a frame
    (a Frames, Samples or Bits Allocated too small leaves a frame and more), by hand: 32 bytes of zeros past a 4 x 4
    image of 16 bits (a frame's worth), 40 past 10 frames of 4 x 4 (more than a frame, less than a row or column of
    each frame) and 1000 past 4 frames of 48 x 64 (less than a frame) are each refused."""
    def verdict(rows, columns, frames, excess, tail=None, bits=16):
        expected = rows * columns * frames * bits // 8
        path = tmp_path / f"pixels{rows}x{columns}x{frames}"
        path.write_bytes(np.arange(expected * 8 // bits, dtype=f"<u{bits // 8}").tobytes()
                         + (bytes(excess) if tail is None else tail))
        return io._pixel_verdict(io._PixelLayout(str(path), rows, columns, 1, 1, frames, bits, False, expected + excess,
                                                 "<", 0, 0, False))

    assert verdict(4, 4, 1, 32)[0] == "gives 4 rows x 4 columns of 16 bits (32 bytes), but its Pixel Data holds 64 bytes"
    assert verdict(4, 4, 10, 40)[0] == ("gives 4 rows x 4 columns x 10 frames of 16 bits (320 bytes), but its Pixel Data "
                                        "holds 360 bytes")
    assert verdict(48, 64, 4, 1000)[0] == ("gives 48 rows x 64 columns x 4 frames of 16 bits (24576 bytes), but its "
                                           "Pixel Data holds 25576 bytes")
    assert verdict(4, 4, 1, 1)[0] is None  # less than a row: padding
    # more than a row and less than a frame: padding only where one value repeats
    assert verdict(8, 8, 1, 20, tail=bytes(range(1, 21)))[0] == (
        "gives 8 rows x 8 columns of 16 bits (128 bytes), but its Pixel Data holds 148 bytes, and the 20 bytes past the "
        "image are not padding (one value repeated)")
    # 8 bits, two columns' worth and the byte that pads to an even length: also read as 2 columns more (10 columns)
    padded = verdict(8, 8, 1, 17, bits=8)
    assert padded[:2] == (None, 17) and padded[2] is not None and padded[2][2] == 10
    # a colour image's row is its samples' bytes (3 a pixel): 6 bytes past 4 x 4 RGB pixels are less than a row
    rgb = tmp_path / "rgb"
    rgb.write_bytes(bytes(54))
    assert io._pixel_verdict(io._PixelLayout(str(rgb), 4, 4, 3, 3, 1, 8, False, 54, "<", 0, 0, False)) == (None, 0, None)


def test_blank_images_padded_by_whole_columns_are_read(tmp_path):
    """Mutation audit (mut44): blank images (every pixel 0) padded by zeros a whole number of columns long read as
    smooth in either shape: nothing tells a Columns too small, and the header's shape is taken."""
    image, _ = make_volume(size=(64, 48, 2), spacing=(0.9, 0.9, 5.0), dtype=sitk.sitkInt16)
    folder = write_dicom_series(tmp_path / "blank", image * 0, description="AX FLAIR")
    for path in folder.iterdir():
        _pad_pixel_data(path, bytes(96 * 10))  # 10 columns of 48 rows of 16 bits
    assert io._series_pixel_misfit(sorted(str(p) for p in folder.iterdir())) is None


def test_an_image_copied_twice_into_a_series_is_named(tmp_path):
    """'IM3 (1).dcm' beside 'IM3.dcm' (an export copied twice): refused as 'two images at one position; the
    transfer may be incomplete: export the series again', the wrong fix. The copy is named."""
    import shutil

    image, _ = make_volume(size=(20, 16, 6), spacing=(0.8, 0.8, 4.0), dtype=sitk.sitkInt16)
    folder = write_dicom_series(tmp_path / "twice", image, description="AX FLAIR")
    shutil.copy(folder / "slice003.dcm", folder / "slice003 (1).dcm")
    with pytest.raises(DeepWMLError, match=r"holds 1 image\(s\) twice.* two files: slice003 \(1\).dcm = slice003.dcm; "
                                           r"remove the copies"):
        io.read_image(folder)


def test_images_sharing_a_sop_instance_uid_at_their_own_positions_are_read(tmp_path):
    """A series written by a script from one template header gives every slice the template's SOP Instance
    UID: ITK reads it as a good volume, and it was refused as '7 image(s) twice ... remove the copies', which
    would leave one slice. Files are copies only where they also lie at one position (and share its instance
    number); a copy among such files is still named."""
    import shutil

    image, _ = make_volume(size=(20, 16, 8), spacing=(0.8, 0.8, 4.0), dtype=sitk.sitkInt16)
    folder = write_dicom_series(tmp_path / "template", image, description="AX FLAIR", extra={"0008|0018": "1.2.3.99.1"})
    assert io.grid_difference(io.read_image(folder), image) is None
    shutil.copy(folder / "slice005.dcm", folder / "slice005 (1).dcm")
    with pytest.raises(DeepWMLError, match=r"holds 1 image\(s\) twice.* two files: slice005 \(1\).dcm = slice005.dcm; "):
        io.read_image(folder)


def test_a_lone_dicom_image_is_refused_as_a_2d_image(tmp_path):
    """One image of a series (an export of the image on screen): GDCM reads it as a volume of one 1 mm slice,
    whatever its Slice Thickness (4 mm here), and it was segmented with every volume a quarter of the truth.
    A 2D image file is refused; so is this, naming the series."""
    image, _ = make_volume(size=(20, 16, 6), spacing=(0.8, 0.8, 4.0), dtype=sitk.sitkInt16)
    folder = write_dicom_series(tmp_path / "one", image[:, :, 2:3], description="AX FLAIR", number=5)
    with pytest.raises(DeepWMLError, match=r"series 5 \('AX FLAIR'\) is a single DICOM image, a 2D image"):
        io.read_image(folder)


def test_a_series_without_pixel_spacing_is_refused(tmp_path):
    """GDCM reads images without Pixel Spacing (a screen capture) as 1 x 1 mm: the volumes would be off by the
    square of the true pixel size (0.6 x 0.7 mm here: read as 2.4 times larger), silently."""
    image, _ = make_volume(size=(24, 20, 4), spacing=(0.6, 0.7, 5.0), dtype=sitk.sitkInt16)
    folder = write_dicom_series(tmp_path / "capture", image, description="AX FLAIR")
    assert io.read_image(folder).GetSpacing()[:2] == pytest.approx((0.6, 0.7))
    drop_pixel_spacing(folder)
    with pytest.raises(DeepWMLError, match="no Pixel Spacing"):
        io.read_image(folder)


@pytest.mark.parametrize("spacing", ["0\\0", "0.7", "a\\b"])
def test_a_series_whose_pixel_spacing_is_no_size_is_refused(tmp_path, spacing):
    """A Pixel Spacing of '0\\0' (or of one value, or not numbers) GDCM reads as 1 x 1 mm, as it reads none: volumes
    off by the square of the pixel size, said 'ok'."""
    image, _ = make_volume(size=(24, 20, 4), spacing=(0.6, 0.7, 5.0), dtype=sitk.sitkInt16)
    folder = write_dicom_series(tmp_path / "damaged", image, description="AX FLAIR")
    for path in folder.iterdir():  # (0028,0030)'s value replaced, its length with it (implicit VR little endian)
        data = path.read_bytes()
        at = data.index(b"\x28\x00\x30\x00")
        end = at + 8 + struct.unpack_from("<I", data, at + 4)[0]
        value = spacing.encode() + b" " * (len(spacing) % 2)
        path.write_bytes(data[:at + 4] + struct.pack("<I", len(value)) + value + data[end:])
    with pytest.raises(DeepWMLError, match=re.escape(f"give a Pixel Spacing (0028,0030) of {spacing!r}, not two sizes "
                                                     "above 0")):
        io.read_image(folder)


def test_a_multi_frame_file_keeps_its_pixel_spacing_in_its_functional_groups(tmp_path):
    """GDCM writes a 3D image as one multi-frame file whose Pixel Spacing lies in the functional groups, not at
    the top level: read with its spacing, not refused by the check above."""
    image, _ = make_volume(size=(24, 20, 4), spacing=(0.6, 0.7, 5.0), dtype=sitk.sitkUInt16)  # GDCM: unsigned only
    (tmp_path / "frames").mkdir()
    sitk.WriteImage(image, str(tmp_path / "frames" / "frames.dcm"))
    read = io.read_image(tmp_path / "frames")
    assert read.GetSpacing() == pytest.approx((0.6, 0.7, 5.0)) and read.GetSize() == (24, 20, 4)

@pytest.mark.parametrize("explicit", [True, False])
def test_an_enhanced_mr_file_is_read_on_its_frames_positions_or_refused(tmp_path, explicit):
    """One Enhanced MR file holding the whole FLAIR (Siemens XA, Philips): GDCM stacks the frames in the order
    the file stores them. In slice order, or the reverse, the volume lies where its frames do; frames stored
    out of slice order (acquisition order) were read scrambled on 1 x 1 x 1 mm voxels, a frame missing the
    same, a frame repeated as one slice more: every one silently. Now refused, saying why."""
    image, _ = make_volume(size=(20, 16, 8), spacing=(0.7, 0.8, 4.0), dtype=sitk.sitkInt16,
                           direction=rotation(0.1, 0.05, 0.2).ravel().tolist())
    write_enhanced_mr(tmp_path / "ordered" / "IM1", image, explicit=explicit)
    read = io.read_image(tmp_path / "ordered")
    assert io.grid_difference(read, image) is None
    assert np.array_equal(sitk.GetArrayFromImage(read), sitk.GetArrayFromImage(image).astype(np.float32))
    write_enhanced_mr(tmp_path / "reversed" / "IM1", image, order=range(7, -1, -1), explicit=explicit)
    read = io.read_image(tmp_path / "reversed")  # the same lattice, its slice axis the other way
    assert np.allclose(read.GetOrigin(), image.TransformIndexToPhysicalPoint((0, 0, 7)), atol=1e-3)
    assert np.allclose(read.TransformIndexToPhysicalPoint((0, 0, 7)), image.GetOrigin(), atol=1e-3)
    assert np.array_equal(sitk.GetArrayFromImage(read), sitk.GetArrayFromImage(image)[::-1].astype(np.float32))
    for name, order, words in (("interleaved", [0, 2, 4, 6, 1, 3, 5, 7], "its frames are not stored in slice order"),
                               ("missing", [0, 1, 2, 4, 5, 6, 7], r"frames missing: 8.00 mm between two of them"),
                               ("repeated", [0, 1, 2, 3, 3, 4, 5, 6, 7], "a frame repeated"),
                               ("two volumes", list(range(8)) * 2, "several frames at each position")):
        write_enhanced_mr(tmp_path / name / "IM1", image, order=order, explicit=explicit)
        with pytest.raises(DeepWMLError, match=rf"multi-frame DICOM file IM1 would be read onto a wrong grid \({words}"):
            io.read_image(tmp_path / name)


def test_an_enhanced_mr_file_whose_groups_this_parser_miscounts_is_read_as_gdcm_reads_it(tmp_path, monkeypatch):
    """The frame check reads the functional groups with a small parser of its own: where the frames it finds
    are not the frames GDCM read (a non-conformant item merging two frames' groups), a parser's doubt must not
    refuse a file GDCM reads (it was refused as 'describes 7 frames and holds 8'); it is read unchecked."""
    image, _ = make_volume(size=(20, 16, 8), spacing=(0.7, 0.8, 4.0), dtype=sitk.sitkInt16,
                           direction=rotation(0.1, 0.05, 0.2).ravel().tolist())
    write_enhanced_mr(tmp_path / "stack" / "IM1", image)
    parsed = io.frame_geometry

    def one_frame_short(file):
        positions, orientations, spacing = parsed(file)
        return positions[:-1], orientations[:-1], spacing

    monkeypatch.setattr(io, "frame_geometry", one_frame_short)
    read = io.read_image(tmp_path / "stack")
    assert io.grid_difference(read, image) is None
    assert np.array_equal(sitk.GetArrayFromImage(read), sitk.GetArrayFromImage(image).astype(np.float32))


def test_a_series_of_single_frame_enhanced_images_is_read_in_slice_order_and_checked(tmp_path):
    """Enhanced MR images of one frame each keep their position in their functional groups, not at the top
    level: the series was sorted by Instance Number, else by file name, and read scrambled on 2.9 mm slices
    (4 mm here), a slice missing unseen. They are now sorted and checked by the positions GDCM reads there."""
    image, _ = make_volume(size=(20, 16, 8), spacing=(0.8, 0.8, 4.0), dtype=sitk.sitkInt16,
                           direction=rotation(0.1, 0.05, 0.2).ravel().tolist())
    folder = tmp_path / "frames"
    for k in range(8):  # named against the slice order
        write_enhanced_mr(folder / f"IM{(k * 3) % 8}", image, order=[k])
    read = io.read_image(folder)
    assert io.grid_difference(read, image) is None
    assert np.array_equal(sitk.GetArrayFromImage(read), sitk.GetArrayFromImage(image).astype(np.float32))
    (folder / "IM4").unlink()
    with pytest.raises(DeepWMLError, match=r"8.00 mm between images 4 and 5, 4.00 mm elsewhere: about 1 slice\(s\) "):
        io.read_image(folder)


@pytest.mark.parametrize("explicit", [True, False])
def test_enhanced_mr_series_are_told_apart_by_the_timing_in_their_functional_groups(tmp_path, explicit):
    """Enhanced MR files keep the inversion and repetition times in their functional groups, not at the top
    level: a study of them (one file a series) was 'none looks like a FLAIR' when the FLAIR's description did
    not say so, and the listing showed no TI or TR. The FLAIR is now found by its inversion time."""
    image, _ = make_volume(size=(20, 16, 4), spacing=(0.8, 0.8, 5.0), dtype=sitk.sitkInt16)
    timings = (("t1_ir_tra", 900.0, 2000.0), ("t2_ir_tra", 2500.0, 9000.0), ("t2_tse_tra", None, 4000.0))
    for number, (description, inversion, repetition) in enumerate(timings):
        write_enhanced_mr(tmp_path / "study" / f"IM{number}", image, explicit=explicit, uid=f"1.2.3.4.7{number}",
                          description=description, inversion_ms=inversion, repetition_ms=repetition)
    chosen, how = io.choose_dicom_series(tmp_path / "study")
    assert chosen.description == "t2_ir_tra" and how == "the only one of 3 series that looks like a FLAIR"
    assert "TI 2500 ms, TR 9000 ms" in chosen.label()
    assert io.read_image(tmp_path / "study").GetSize() == (20, 16, 4)


@pytest.mark.parametrize("explicit", [True, False])
def test_the_slice_thickness_of_enhanced_mr_is_read_from_its_functional_groups(tmp_path, explicit):
    """Enhanced MR files keep Slice Thickness in their Pixel Measures group, not at the top level: the report's
    `slice_thickness_tag_mm` was null for them and a gap between their slices went unwarned. It is now read
    there, as their timing is."""
    image, _ = make_volume(size=(20, 16, 4), spacing=(0.8, 0.8, 5.0), dtype=sitk.sitkInt16)
    write_enhanced_mr(tmp_path / "even" / "IM1", image, explicit=explicit)
    write_enhanced_mr(tmp_path / "gap" / "IM1", image, explicit=explicit, thickness_mm=3.5)
    (even,), (gap,) = io.dicom_series(tmp_path / "even"), io.dicom_series(tmp_path / "gap")
    assert even.slice_thickness_mm == 5.0 and even.as_dict("x")["slice_thickness_tag_mm"] == 5.0
    assert even.slice_gap_warning(io.read_image(tmp_path / "even", series=even)) is None
    assert gap.slice_thickness_mm == 3.5
    warning = gap.slice_gap_warning(io.read_image(tmp_path / "gap", series=gap))
    assert warning and "5.00 mm apart but 3.50 mm thick" in warning and "1.50 mm gap" in warning


def _with_private_un_sequence(path) -> None:
    """Put a private sequence of undefined length with VR UN (a vendor's sequence, as an archive that does not
    know it passes it on: its items in implicit VR, PS3.5 6.2.2) before the functional groups of an explicit
    VR file `write_enhanced_mr` wrote."""
    import struct

    creator = b"Philips MR Imaging DD 005 "
    inner = struct.pack("<HHI", 0x2005, 0x1071, 4) + b"1.5 " + struct.pack("<HHI", 0x2005, 0x1072, 0xFFFFFFFF)
    inner += struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF) + struct.pack("<HHI", 0x0018, 0x9079, 8)
    inner += struct.pack("<d", 150.0) + struct.pack("<HHIHHI", 0xFFFE, 0xE00D, 0, 0xFFFE, 0xE0DD, 0)
    _insert_before_groups(path, struct.pack("<HH2sH", 0x2005, 0x0010, b"LO", len(creator)) + creator
                          + struct.pack("<HH2sHI", 0x2005, 0x1402, b"UN", 0, 0xFFFFFFFF)
                          + struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF) + inner
                          + struct.pack("<HHIHHI", 0xFFFE, 0xE00D, 0, 0xFFFE, 0xE0DD, 0))


def _with_encapsulated_icon(path) -> None:
    """Put an Icon Image Sequence whose pixel data is encapsulated (fragments of undefined length, as in a
    compressed file) before the functional groups of an explicit VR file `write_enhanced_mr` wrote."""
    import struct

    fragment = bytes(range(16))
    pixels = (struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, 0xFFFFFFFF) + struct.pack("<HHI", 0xFFFE, 0xE000, 0)
              + struct.pack("<HHI", 0xFFFE, 0xE000, len(fragment)) + fragment + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0))
    _insert_before_groups(path, struct.pack("<HH2sHI", 0x0088, 0x0200, b"SQ", 0, 0xFFFFFFFF)
                          + struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
                          + struct.pack("<HH2sHH", 0x0028, 0x0010, b"US", 2, 4) + pixels
                          + struct.pack("<HHIHHI", 0xFFFE, 0xE00D, 0, 0xFFFE, 0xE0DD, 0))


def _insert_before_groups(path, elements: bytes) -> None:
    import struct

    data = path.read_bytes()
    at = data.index(struct.pack("<HH2s", 0x5200, 0x9229, b"SQ"))
    path.write_bytes(data[:at] + elements + data[at:])


@pytest.mark.parametrize("insert", [_with_private_un_sequence, _with_encapsulated_icon])
def test_an_enhanced_mr_file_with_a_sequence_of_another_kind_is_read_and_checked(tmp_path, insert):
    """A vendor's private sequence passed on as UN of undefined length (as archives that do not know it do),
    or an icon image of encapsulated pixel data, stopped the reading of the functional groups: the FLAIR's
    inversion time went unseen ('none looks like a FLAIR' when its description does not say so) and frames
    stored out of slice order were read scrambled, silently. Both are read as the standard says, and skipped."""
    image, _ = make_volume(size=(20, 16, 4), spacing=(0.8, 0.8, 5.0), dtype=sitk.sitkInt16)
    for number, (description, inversion) in enumerate((("t1_ir_tra", 900.0), ("t2_ir_tra", 2500.0))):
        insert(write_enhanced_mr(tmp_path / "study" / f"IM{number}", image, uid=f"1.2.3.4.7{number}",
                                 description=description, inversion_ms=inversion, repetition_ms=9000.0))
    chosen, _ = io.choose_dicom_series(tmp_path / "study")
    assert chosen.description == "t2_ir_tra" and chosen.inversion_ms == 2500.0
    assert io.grid_difference(io.read_image(tmp_path / "study"), image) is None
    insert(write_enhanced_mr(tmp_path / "interleaved" / "IM1", image, order=[0, 2, 1, 3]))
    with pytest.raises(DeepWMLError, match=r"would be read onto a wrong grid \(its frames are not stored in slice order"):
        io.read_image(tmp_path / "interleaved")


@pytest.mark.parametrize("tag", ["0020|000d", "0010|0020"])
def test_a_series_whose_images_belong_to_two_patients_is_refused(tmp_path, tag):
    """One Series Instance UID in the files of two studies or patients (a mixed-up export) was read as one
    scan, and --dicom-outline filed the second patient's slices under the first one's name."""
    image, _ = make_volume(size=(20, 16, 6), spacing=(0.8, 0.8, 5.0), dtype=sitk.sitkInt16)
    extra = {"0010|0010": "ALPHA^ANN", "0010|0020": "PIDA", "0020|000d": "1.1.1"}
    folder = write_dicom_series(tmp_path / "mixed", image, description="FLAIR", extra=extra)
    assert io.read_image(folder).GetSize()[2] == 6
    other = write_dicom_series(tmp_path / "other", image, description="FLAIR", extra={**extra, tag: "2.2.2"})
    for k in (3, 4, 5):
        (other / f"slice{k:03d}.dcm").replace(folder / f"slice{k:03d}.dcm")
    with pytest.raises(DeepWMLError, match="differ in .* more than one study or patient") as refused:
        io.read_image(folder)
    assert "PIDA" not in str(refused.value) and "2.2.2" not in str(refused.value)

def _slicer_file(path, truth, segments):
    """A .seg.nrrd as slicerio writes it: `segments` (name, mask array in k, j, i order, label value)."""
    import slicerio

    seg = slicerio.create_segmentation(truth.GetSize(), io.ijk_to_lps(truth))
    for name, mask, _ in segments:
        slicerio.add_segment(seg, mask.transpose(2, 1, 0), {"id": name, "name": name, "color": [1.0, 0.0, 0.0]})
    for entry, (_, _, value) in zip(seg["segments"], segments):  # e.g. 2 after a segment was deleted in Slicer
        seg["voxels"][seg["voxels"] == entry["labelValue"]] = value
        entry["labelValue"] = value
    slicerio.write_segmentation(str(path), seg)
    return path


def test_a_slicer_file_is_read_by_segment_whatever_its_label_values_and_name_case(tmp_path):
    """One segment stored with label value 2 is lesion (not the masks' 'ignore' label); a segment named
    'wmh' in another case is the WMH segment, as the Slicer module (GetSegmentIdBySegmentName) takes it."""
    _, truth = make_volume(size=(24, 20, 6), blobs=((0.3, 0.6, 0.5, 5.0), (0.7, 0.3, 0.5, 4.0)))
    lesion = sitk.GetArrayFromImage(truth) > 0
    left, right = lesion.copy(), lesion.copy()
    left[:, :, 12:], right[:, :, :12] = False, False
    one = io.read_mask(_slicer_file(tmp_path / "one.seg.nrrd", truth, [("WMH", lesion, 2)]))
    assert np.array_equal(sitk.GetArrayFromImage(one), lesion.astype(np.uint8))
    named = io.read_mask(_slicer_file(tmp_path / "named.seg.nrrd", truth, [("wmh", left, 1), ("other", right, 2)]))
    assert np.array_equal(sitk.GetArrayFromImage(named) > 0, left)
    both = io.read_mask(_slicer_file(tmp_path / "both.seg.nrrd", truth, [("rater 1", left, 1), ("rater 2", right, 2)]))
    assert np.array_equal(sitk.GetArrayFromImage(both) > 0, lesion)


def test_segments_of_one_name_in_a_slicer_file_are_all_lesion(tmp_path):
    """Slicer lets a rater give two segments one name ('lesion', 'lesion'): only the first was read, the other's
    lesions silently missing from the reference (Dice 0.22 and 3.2 of 25.1 ml for the bundled sample's mask)."""
    import slicerio

    _, truth = make_volume(size=(24, 20, 6), blobs=((0.3, 0.6, 0.5, 5.0), (0.7, 0.3, 0.5, 4.0)))
    lesion = sitk.GetArrayFromImage(truth) > 0
    left, right = lesion.copy(), lesion.copy()
    left[:, :, 12:], right[:, :, :12] = False, False
    seg = slicerio.create_segmentation(truth.GetSize(), io.ijk_to_lps(truth))
    for i, part in enumerate((left, right)):
        slicerio.add_segment(seg, part.transpose(2, 1, 0), {"id": f"Segment_{i}", "name": "lesion", "color": [1.0, 0, 0]})
    slicerio.write_segmentation(str(tmp_path / "same.seg.nrrd"), seg)
    mask = io.read_mask(tmp_path / "same.seg.nrrd")
    assert np.array_equal(sitk.GetArrayFromImage(mask) > 0, lesion)


def test_segments_named_wmh_in_two_cases_are_both_lesion_as_in_the_slicer_module(tmp_path):
    """'WMH' and 'wmh' in one file: the Slicer module measures both (names in any case); the command line read
    'WMH' alone, half the lesion missing without a word and a Dice unlike the module's."""
    _, truth = make_volume(size=(24, 20, 6), blobs=((0.3, 0.6, 0.5, 5.0), (0.7, 0.3, 0.5, 4.0)))
    lesion = sitk.GetArrayFromImage(truth) > 0
    left, right = lesion.copy(), lesion.copy()
    left[:, :, 12:], right[:, :, :12] = False, False
    path = _slicer_file(tmp_path / "cases.seg.nrrd", truth, [("WMH", left, 1), ("wmh", right, 2)])
    assert np.array_equal(sitk.GetArrayFromImage(io.read_mask(path)) > 0, lesion)


def test_a_two_valued_mask_above_255_reads_as_lesion_and_a_many_valued_one_is_refused(tmp_path):
    _, truth = make_volume(size=(16, 14, 4))
    lesion = sitk.GetArrayFromImage(truth) > 0
    for value in (256, 1000, 65535):
        image = sitk.GetImageFromArray(lesion.astype(np.uint16) * value)
        image.CopyInformation(truth)
        sitk.WriteImage(image, str(tmp_path / f"m{value}.nii.gz"))
        mask = io.read_mask(tmp_path / f"m{value}.nii.gz", truth)
        assert np.array_equal(sitk.GetArrayFromImage(mask), lesion.astype(np.uint8)), value
    mixed = lesion.astype(np.uint16) * 300
    mixed[0, 0, 0] = 1
    image = sitk.GetImageFromArray(mixed)
    image.CopyInformation(truth)
    sitk.WriteImage(image, str(tmp_path / "mixed.nii.gz"))
    with pytest.raises(DeepWMLError, match="above 255 among several labels"):
        io.read_mask(tmp_path / "mixed.nii.gz")


def test_a_series_with_an_image_of_another_size_names_it(tmp_path):
    """A localizer (or screenshot) sharing the FLAIR's series UID: ITK's own error is a fragment
    ("Size: [128, 128, 1]"); the message names the odd image and says what to do."""
    from conftest import write_dicom_series

    image, _ = make_volume(size=(32, 32, 6), spacing=(0.9, 0.9, 5.0), dtype=sitk.sitkInt16)
    folder = write_dicom_series(tmp_path / "flair", image, uid="1.2.3.80", description="AX FLAIR")
    small, _ = make_volume(size=(16, 16, 1), spacing=(0.9, 0.9, 5.0), dtype=sitk.sitkInt16)
    for path in write_dicom_series(tmp_path / "loc", small, uid="1.2.3.80", description="AX FLAIR", prefix="loc").iterdir():
        path.rename(folder / path.name)
    with pytest.raises(DeepWMLError, match=r"images differ in size \(6 of 32x32, and loc\w*\.dcm \(16x16\)\).*move it out"):
        io.read_image(folder)


def test_two_visits_alike_in_one_folder_are_listed_with_their_uids_and_chosen_by_one(tmp_path):
    """Two visits' FLAIRs with one series number and name in one folder: the refusal lists each with its
    Series UID, which --series then takes."""
    from conftest import write_dicom_series

    image, _ = make_volume(size=(24, 20, 4), spacing=(0.9, 0.9, 5.0), dtype=sitk.sitkInt16)
    folder = tmp_path / "P1"
    for prefix, study, uid in (("a", "1.2.3.4", "1.2.3.4.5"), ("b", "1.2.3.9", "1.2.3.9.5")):
        write_dicom_series(folder, image, uid=uid, description="AX FLAIR", inversion_ms=2500, repetition_ms=9000,
                           number=5, prefix=prefix, extra={"0020|000d": study})
    with pytest.raises(DeepWMLError) as refused:
        io.choose_dicom_series(folder)
    assert "UID 1.2.3.4.5" in str(refused.value) and "UID 1.2.3.9.5" in str(refused.value)
    assert io.choose_dicom_series(folder, "1.2.3.9.5")[0].uid == "1.2.3.9.5"


def test_the_time_axis_of_a_volume_stored_with_one_time_point_is_read_and_written_where_nifti_keeps_it(tmp_path):
    # NIfTI-1 keeps the time origin in toffset (byte 136); byte 132 is slice_duration, which says nothing of it
    import struct

    image, _ = make_volume(size=(12, 10, 6))
    source = tmp_path / "four.nii"
    sitk.WriteImage(sitk.JoinSeries(image, 7.0, 2.5), str(source))
    header = source.read_bytes()[:348]
    assert struct.unpack_from("<2f", header, 132) == (0.0, 7.0)  # as ITK writes it: slice_duration, toffset
    axis = io.read_time_axis(source)
    assert axis == io.TimeAxis(7.0, 2.5)
    light = io.read_image(source, light=True)
    for name, mask in (("light.nii", light), ("itk.nii.gz", image)):  # without SimpleITK, and with it
        io.write_image(mask, tmp_path / name, axis)
        assert io.read_time_axis(tmp_path / name) == axis, name
    written = (tmp_path / "light.nii").read_bytes()
    assert struct.unpack_from("<2f", written, 132) == (0.0, 7.0)
    io.write_image(image, tmp_path / "other.nrrd", axis)  # another format: its fourth origin and spacing
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(tmp_path / "other.nrrd"))
    reader.ReadImageInformation()
    assert (reader.GetOrigin()[3], reader.GetSpacing()[3]) == (7.0, 2.5)


def test_a_file_named_only_by_its_extension_takes_its_folders_name(tmp_path):
    """'P1/.nii.gz' (a file saved with no name) was case '': outputs '_wmh.nii.gz' and a hidden '.seg.nrrd'."""
    assert io.case_name(tmp_path / "P1" / ".nii.gz") == "P1"
    assert io.case_name(tmp_path / "P2" / ".NRRD") == "P2"
    assert io.case_name(tmp_path / "P3" / "scan.nii.gz") == "scan"


def test_single_frame_enhanced_mr_images_are_not_taken_for_images_without_pixel_spacing():
    """A series of enhanced MR objects of one frame each keeps Pixel Spacing in its functional groups, as
    multi-frame files do: it was refused as 'no Pixel Spacing'. A plain MR image without it still is."""
    class Reader:
        def __init__(self, tags):
            self.tags = tags

        def HasMetaDataKey(self, index, tag):
            return tag in self.tags

        def GetMetaData(self, index, tag):
            return self.tags[tag]

    io._check_pixel_spacing("series", Reader({"0008|0016": "1.2.840.10008.5.1.4.1.1.4.1", "0028|0008": "1"}))
    io._check_pixel_spacing("series", Reader({"0008|0016": "1.2.840.10008.5.1.4", "0028|0030": "0.9\\0.9"}))
    with pytest.raises(DeepWMLError, match="no Pixel Spacing"):
        io._check_pixel_spacing("series", Reader({"0008|0016": "1.2.840.10008.5.1.4", "0028|0008": "1"}))


def test_a_grid_of_another_size_names_both_spacings(tmp_path):
    """A mask resampled to 0.5 mm against a 1 mm reference was refused as 'size (40, 40, 20) vs (20, 20, 10)'
    alone: which one was resampled, and to what, went unsaid."""
    fine = sitk.Image([40, 40, 20], sitk.sitkUInt8)
    fine.SetSpacing((0.5, 0.5, 0.5))
    coarse = sitk.Image([20, 20, 10], sitk.sitkUInt8)
    with pytest.raises(DeepWMLError, match=r"size \(40, 40, 20\) vs \(20, 20, 10\), spacing \(0\.5, 0\.5, 0\.5\) vs "
                                           r"\(1, 1, 1\) mm"):
        io.check_same_grid(fine, coarse)
    cropped = sitk.Image([20, 20, 8], sitk.sitkUInt8)  # same spacing: only the sizes are said
    with pytest.raises(DeepWMLError, match=r"size \(20, 20, 8\) vs \(20, 20, 10\)\)"):
        io.check_same_grid(cropped, coarse)


@pytest.mark.parametrize("values, dtype, words", [
    ([0, -1], np.int16, "negative values (down to -1)"),
    ([0, 0.25, 0.75], np.float32, "values that are not whole numbers (2 voxels between 0.25 and 0.75: a probability map"),
    ([0, 0.7, 0.7], np.float32, "values that are not whole numbers (2 voxels of 0.7: a probability map"),
    # beyond MASK_ROUND_OFF but whole in 3 digits: it said '2 voxels of 1', a value no mask is refused for
    ([0, 1.0003, 1.0003], np.float32, "values that are not whole numbers (2 voxels of 1.0003: a probability map"),
])
def test_read_mask_says_what_is_wrong_with_the_values(tmp_path, values, dtype, words):
    """A mask of int16 with -1 was told to 'threshold probability maps first'; now the message says what it holds."""
    array = np.zeros((4, 5, 6), dtype)
    array.flat[:len(values)] = values
    path = tmp_path / "mask.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    with pytest.raises(DeepWMLError) as caught:
        io.read_mask(path)
    assert str(path) in str(caught.value) and words in str(caught.value)


def test_read_mask_names_the_image_it_is_checked_against(tmp_path):
    path = tmp_path / "mask.nii.gz"
    beyond = sitk.Image([4, 5, 8], sitk.sitkUInt8)  # a lesion voxel beyond the scan (an empty slice there is cut off)
    beyond[1, 1, 7] = 1
    sitk.WriteImage(beyond, str(path))
    with pytest.raises(DeepWMLError, match="mask.nii.gz and the baseline FLAIR are on different voxel grids"):
        io.read_mask(path, sitk.Image([4, 5, 7], sitk.sitkFloat32), "the baseline FLAIR")


def test_a_cropped_mask_on_the_same_voxels_is_told_which_part_it_covers():
    """A segmentation saved cropped (Slicer's 'Crop to minimum extent') lies on the scan's very voxels over a smaller
    extent; it was refused as 'size ... vs ...; resample one onto the other', though no resampling is needed."""
    scan = sitk.Image([30, 40, 12], sitk.sitkUInt8)
    scan.SetSpacing((0.9, 0.8, 5.0))
    scan.SetOrigin((10.0, -20.0, 3.0))
    scan.SetDirection(tuple(rotation(0.2, -0.1, 0.3).ravel()))
    cropped = sitk.DICOMOrient(scan[4:20, 7:39, 2:11], "RAS")  # and stored in another voxel order
    with pytest.raises(DeepWMLError, match=r"the mask covers voxels \(4 to 19, 7 to 38, 2 to 10\) of the scan's "
                                           r"\(0 to 29, 0 to 39, 0 to 11\): the same voxels over another extent.*"
                                           r"no interpolation needed"):
        io.check_same_grid(cropped, scan, "the mask", "the scan")
    shifted = scan[4:20, 7:39, 2:11]
    shifted.SetOrigin(tuple(np.array(shifted.GetOrigin()) + 0.3))  # off the lattice: resampling is needed
    with pytest.raises(DeepWMLError) as caught:
        io.check_same_grid(shifted, scan, "the mask", "the scan")
    assert "covers voxels" not in str(caught.value) and "resample one onto the other" in str(caught.value)


def _scan_and_lesions():
    """An oblique scan grid and a mask on it with two lesions well inside."""
    scan = sitk.Image([30, 40, 12], sitk.sitkFloat32)
    scan.SetSpacing((0.9, 0.8, 5.0))
    scan.SetOrigin((10.0, -20.0, 3.0))
    scan.SetDirection(tuple(rotation(0.2, -0.1, 0.3).ravel()))
    mask = sitk.Image(scan.GetSize(), sitk.sitkUInt8)
    mask.CopyInformation(scan)
    mask[6:9, 10:14, 3:5] = 1
    mask[15:19, 30:37, 8:10] = 1
    return scan, mask


def test_a_cropped_mask_on_the_scans_voxels_is_padded_onto_its_grid(tmp_path):
    """A mask saved cropped to its lesions (Slicer's 'Crop to minimum extent', stored here in another voxel order
    too) was refused, though it lies on the scan's very voxels; now it is padded with zeros onto the scan's grid:
    every voxel where it was, nothing interpolated. As a real .seg.nrrd read against the scan, too."""
    scan, mask = _scan_and_lesions()
    cropped = sitk.DICOMOrient(mask[4:20, 7:39, 2:11], "RAS")
    padded = io.onto_grid(cropped, scan, "the mask", "the scan")
    assert io.grid_difference(padded, scan) is None
    assert np.array_equal(sitk.GetArrayFromImage(padded), sitk.GetArrayFromImage(mask))
    seg = io.write_segmentation(mask[6:19, 10:37, 3:10], tmp_path / "cropped.seg.nrrd")  # the lesions' own extent
    read = io.read_mask(seg, scan, "the scan")
    assert np.array_equal(sitk.GetArrayFromImage(read), sitk.GetArrayFromImage(mask))


def test_a_mask_over_a_larger_or_shifted_extent_with_nothing_beyond_the_scan_is_cut_onto_its_grid():
    """On the scan's lattice over a larger extent, or a shifted one that only partly overlaps it, with every voxel
    beyond the scan zero: refused before ('pad or crop it onto the other's grid'), though cutting and padding is
    exact; now put onto the scan's grid, voxel for voxel (stored in another voxel order too)."""
    scan, mask = _scan_and_lesions()
    larger = sitk.ConstantPad(mask, (2, 0, 0), (0, 0, 3))
    shifted = sitk.ConstantPad(mask, (3, 0, 0), (0, 0, 0))[0:25, 5:40, 1:12]  # 3 columns before the scan, ends inside
    for other in (larger, sitk.DICOMOrient(shifted, "RAS")):
        placed = io.onto_grid(other, scan, "the mask", "the scan")
        for got, want in ((placed.GetSize(), scan.GetSize()), (placed.GetSpacing(), scan.GetSpacing()),
                          (placed.GetOrigin(), scan.GetOrigin()), (placed.GetDirection(), scan.GetDirection())):
            assert np.allclose(got, want, rtol=0, atol=1e-9)
        assert np.array_equal(sitk.GetArrayFromImage(placed), sitk.GetArrayFromImage(mask))


def test_a_mask_with_lesion_beyond_the_scans_grid_is_refused_with_how_many_voxels():
    """When lesion voxels lie beyond the scan (the mask of another, larger scan) the message says how many; a grid
    of the scan's size a whole number of voxels off is a changed header, not a crop, and is refused as before."""
    scan, mask = _scan_and_lesions()
    larger = sitk.ConstantPad(mask, (2, 0, 0), (0, 0, 3))
    larger[0, 5, 5] = larger[1, 5, 5] = larger[5, 5, 13] = 1  # two voxels before the scan's first column, one above it
    with pytest.raises(DeepWMLError, match=r"different voxel grids .*3 of its non-zero voxels lie outside that "
                                           r"grid") as caught:
        io.onto_grid(larger, scan, "the mask", "the scan")
    # whose grid the voxel numbers count is named: it said '(voxels (-2 to 29, ...) of its (0 to 29, ...))'
    assert ("on the same voxel lattice over another extent, the mask covers voxels (-2 to 29, 0 to 39, 0 to 14) of the "
            "scan's grid (0 to 29, 0 to 39, 0 to 11), and 3 of its") in str(caught.value)
    assert " of its (" not in str(caught.value)
    shifted = sitk.Image(mask)
    shifted.SetOrigin(scan.TransformIndexToPhysicalPoint((1, 0, 0)))
    with pytest.raises(DeepWMLError, match="a conversion changed one header"):
        io.onto_grid(shifted, scan, "the mask", "the scan")


def test_two_masks_one_cropped_are_compared_on_the_larger_grid():
    """A reference saved cropped against a prediction on the whole scan, either way round: both end on the whole
    scan's grid (slice numbers the scan's), neither loses a voxel."""
    _, mask = _scan_and_lesions()
    cropped = mask[6:19, 10:37, 3:10]
    for a, b in ((mask, cropped), (cropped, mask)):
        a2, b2 = io.onto_common_grid(a, b, "prediction", "reference")
        for image in (a2, b2):
            assert io.grid_difference(image, mask) is None
            assert np.array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(mask))


def test_two_masks_both_cropped_are_compared_on_the_extent_of_both_with_the_whole_scans_figures():
    """Two raters' segmentations both saved cropped to their own lesions (Slicer's 'Crop to minimum extent'), each
    over part of the other's extent, or of one size at two offsets: refused before ('both saved cropped', or for
    the same size 'a conversion changed one header'), though they lie on one voxel lattice; now both are padded onto
    the extent of both, nothing interpolated: Dice, volumes and lesion counts those of the masks on the whole scan,
    and a note says that slice numbers count from that extent; with the scan given, on the scan's grid."""
    from DeepWMLLib import metrics

    scan, mask = _scan_and_lesions()
    other = sitk.Image(mask.GetSize(), sitk.sitkUInt8)  # a second rater: one lesion drawn larger, one more beyond
    other.CopyInformation(mask)
    other[14:20, 29:38, 7:10] = 1
    other[22:25, 36:39, 10:12] = 1
    whole = metrics.case_metrics(other, mask)
    first, second = other[14:25, 29:39, 7:12], mask[6:19, 10:37, 3:10]  # each cropped to its own lesions
    twin = sitk.Image(mask)  # a lesion of the other's size: crops to their lesions of one size at two offsets
    twin[6:12, 10:19, 3:6] = 1
    same_size = twin[6:12, 10:19, 3:6], other[14:20, 29:38, 7:10]
    assert same_size[0].GetSize() == same_size[1].GetSize()
    nested = other[14:25, 29:39, 7:12], other[22:25, 36:39, 10:12]  # one rater's crop holding the other's
    for a, b in ((first, second), (second, first), same_size, (sitk.DICOMOrient(first, "RAS"), second), nested,
                 nested[::-1]):
        common_a, common_b = io.onto_common_grid(a, b, "rater A's mask", "rater B's mask")
        assert io.grid_difference(common_a, common_b) is None and io.on_joint_extent(common_b, a, b)
        for common, own in ((common_a, a), (common_b, b)):  # every marked voxel where it was
            assert sitk.GetArrayViewFromImage(common).sum() == sitk.GetArrayViewFromImage(own).sum()
    cropped = metrics.case_metrics(first, second)
    for key in ("dice", "sensitivity", "precision", "hd95_mm", "reference_volume_ml", "prediction_volume_ml",
                "n_reference_lesions", "n_predicted_lesions"):
        assert cropped[key] == whole[key], key
    assert io.JOINT_EXTENT_NOTE in cropped["notes"] and io.JOINT_EXTENT_NOTE not in whole["notes"]
    # with the case's scan given, on its grid: every figure the whole masks', slice numbers and notes included
    assert metrics.case_metrics(first, second, scan=scan) == whole


def test_two_masks_both_cropped_keep_the_outline_at_the_far_end_of_their_joint_extent():
    """HD95's outline is the mask less its in-plane erosion, the image border counting as lesion, so the extent of both
    masks gets a voxel around it at either end. Rater A: a 10 x 10 voxel square on one 1 mm slice; rater B: one voxel at
    its first corner; each saved cropped to its own lesion. A's outline is its 36 edge voxels, at squared distances
    from B's voxel i^2 + j^2, the largest 162 (9, 9), then 145 twice ((8, 9), (9, 8)); B's is 0 from A. HD95: the 95th
    percentile of A's 36 (numpy: sorted index 0.95 x 35 = 33.25, between 145 and 145), sqrt(145) = 12.04 mm, as on
    the whole scan. Without the voxel past A's far edges those edges were no outline: 9 mm."""
    from DeepWMLLib import metrics

    rater_a, rater_b = np.zeros((5, 30, 30), np.uint8), np.zeros((5, 30, 30), np.uint8)
    rater_a[2, 5:15, 5:15] = 1
    rater_b[2, 5, 5] = 1
    a, b = sitk.GetImageFromArray(rater_a), sitk.GetImageFromArray(rater_b)
    assert metrics.case_metrics(a, b)["hd95_mm"] == pytest.approx(math.sqrt(145))
    assert metrics.case_metrics(a[5:15, 5:15, 2:3], b[5:6, 5:6, 2:3])["hd95_mm"] == pytest.approx(math.sqrt(145))


def test_two_masks_not_on_one_lattice_or_of_the_scans_size_shifted_are_still_refused():
    """Off the lattice (half a voxel), another spacing, or the scan's very size a voxel off with lesions inside
    (a changed header, not two crops): refused, each with its own advice."""
    _, mask = _scan_and_lesions()
    first, second = mask[4:12, 8:16, 2:7], mask[13:21, 28:39, 7:11]
    off = sitk.Image(second)
    off.SetOrigin(tuple(np.array(second.GetOrigin()) + 0.4))
    with pytest.raises(DeepWMLError, match="resample one onto the other"):
        io.onto_common_grid(first, off, "rater A's mask", "rater B's mask")
    coarse = sitk.Image(second)
    coarse.SetSpacing((0.9, 0.8, 2.5))
    with pytest.raises(DeepWMLError, match="different voxel grids"):
        io.onto_common_grid(first, coarse, "rater A's mask", "rater B's mask")
    shifted = sitk.Image(mask)
    shifted.SetOrigin(mask.TransformIndexToPhysicalPoint((1, 0, 0)))
    with pytest.raises(DeepWMLError, match="a conversion changed one header"):
        io.onto_common_grid(shifted, mask, "rater A's mask", "rater B's mask")


def test_a_mask_of_the_scans_size_shifted_with_a_lesion_at_one_end_only_is_a_changed_header_not_a_crop():
    """A mask cropped to its lesions has them at both ends of every axis; one whose lesion touches only the first
    voxel of each axis (a 3 x 3 x 3 lesion in the corner of a 20 x 20 x 20 grid) is a whole scan's mask, and the same
    mask with its origin moved 2 voxels is a changed header: refused, not padded 2 voxels off (every voxel of the
    lesion then lies 2 voxels from where it was drawn)."""
    array = np.zeros((20, 20, 20), np.uint8)
    array[0:3, 0:3, 0:3] = 1
    mask = sitk.GetImageFromArray(array)
    shifted = sitk.Image(mask)
    shifted.SetOrigin(mask.TransformIndexToPhysicalPoint((2, 2, 2)))
    with pytest.raises(DeepWMLError, match="a conversion changed one header"):
        io.onto_grid(shifted, mask, "the mask", "the scan")


def test_two_masks_one_over_a_shifted_extent_with_nothing_beyond_the_other_end_on_one_of_their_grids():
    """A prediction on the scan's grid against a reference on the same lattice over a larger extent, or a shifted
    one over part of it, nothing marked beyond the scan: refused before when the extents only partly overlapped;
    now compared on one of their own grids (the larger when one holds the other), every marked voxel kept."""
    from DeepWMLLib import metrics

    _, mask = _scan_and_lesions()
    larger = sitk.ConstantPad(mask, (2, 0, 0), (0, 0, 3))
    partly = sitk.ConstantPad(mask, (3, 0, 0), (0, 0, 0))[0:25, 5:40, 1:12]  # 3 columns before the scan, ends inside
    for other in (larger, partly):
        for a, b in ((mask, other), (other, mask)):
            common_a, common_b = io.onto_common_grid(a, b, "prediction", "reference")
            assert io.grid_difference(common_a, common_b) is None and not io.on_joint_extent(common_b, a, b)
            assert io.grid_difference(common_b, other if other is larger else b) is None
            for common in (common_a, common_b):
                assert sitk.GetArrayViewFromImage(common).sum() == sitk.GetArrayViewFromImage(mask).sum()
            assert metrics.case_metrics(a, b)["dice"] == 1.0


def test_a_cropped_mask_is_padded_onto_a_volume_read_without_simpleitk():
    """The scan or the prediction as a `Volume` (a NIfTI read with light=True, and what segment_image returns for
    it) against a mask saved cropped: padding copied the geometry with SimpleITK's CopyInformation, which takes
    no Volume, and failed with a TypeError (an internal error) instead of padding."""
    from DeepWMLLib import metrics
    from DeepWMLLib.volume import Volume

    scan, mask = _scan_and_lesions()
    as_volume = Volume(sitk.GetArrayFromImage(mask), mask.GetSpacing(), mask.GetOrigin(), mask.GetDirection())
    cropped = mask[4:20, 7:39, 2:11]
    padded = io.onto_grid(cropped, as_volume, "the mask", "the scan")
    assert io.grid_difference(padded, mask) is None
    assert np.array_equal(sitk.GetArrayFromImage(padded), sitk.GetArrayFromImage(mask))
    result = metrics.case_metrics(as_volume, cropped)
    assert result["dice"] == 1.0 and result["reference_volume_ml"] == result["prediction_volume_ml"] > 0


@pytest.mark.parametrize("written, named, words", [
    (".nrrd", "scan.nii.gz", "is in NRRD format, though its name ends in .nii.gz; rename it to scan.nrrd"),
    (".nrrd", "scan.nii", "is in NRRD format, though its name ends in .nii; rename it to scan.nrrd"),
    (".mha", "scan.nii.gz", "is in MetaImage format, though its name ends in .nii.gz; rename it to scan.mha"),
    (".nii.gz", "scan.nrrd", "is in gzip-compressed NIfTI format, though its name ends in .nrrd; rename it to scan.nii.gz"),
    (".nii", "scan.mha", "is in NIfTI format, though its name ends in .mha; rename it to scan.nii"),
    (".nrrd", "scan.mha", "is in NRRD format, though its name ends in .mha; rename it to scan.nrrd"),
])
def test_a_file_renamed_to_another_format_is_told_its_own(tmp_path, written, named, words):
    """A FLAIR renamed by hand to another format's extension was called "truncated or corrupt; copy the file again"
    (an NRRD named .nii.gz) or "cannot be read as an image; check the file is a complete image" (a .nii.gz named
    .nrrd), though the file is whole; the message now names its format and the name to give it."""
    image, _ = make_volume(size=(16, 16, 4))
    sitk.WriteImage(image, str(tmp_path / f"source{written}"))
    (tmp_path / f"source{written}").rename(tmp_path / named)
    for light in (False, True):  # deepwml segment reads NIfTI names with light=True
        with pytest.raises(DeepWMLError) as caught:
            io.read_image(tmp_path / named, light=light)
        assert str(tmp_path / named) in str(caught.value) and words in str(caught.value)


def test_a_dicom_file_named_nii_is_told_to_give_its_folder(tmp_path):
    image, _ = make_volume(size=(16, 16, 3))
    folder = write_dicom_series(tmp_path / "series", sitk.Cast(image, sitk.sitkInt16), description="AX FLAIR")
    one = sorted(folder.iterdir())[0]
    one.rename(tmp_path / "slice.nii")
    with pytest.raises(DeepWMLError, match="is a DICOM file, though its name ends in .nii; give the folder of its series"):
        io.read_image(tmp_path / "slice.nii")


@pytest.mark.parametrize("ext", [".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".hdr"])
def test_files_named_as_they_are_read_as_before(tmp_path, ext):
    """The format check lets every correctly named file through (detached headers and pairs included)."""
    image, _ = make_volume(size=(16, 16, 4))
    sitk.WriteImage(image, str(tmp_path / f"scan{ext}"))
    read = io.read_image(tmp_path / f"scan{ext}")
    np.testing.assert_allclose(sitk.GetArrayFromImage(read), sitk.GetArrayFromImage(image), rtol=1e-6)


def test_a_probability_map_of_0_to_100_given_as_a_mask_is_told_a_probability_map(tmp_path):
    """A network's probability map saved in percent (float 0-100, non-zero nearly everywhere) given as a mask was
    called 'looks like a scan, not a label mask (was the FLAIR given instead of its mask?)'; it is told again that
    it holds fractions, 'threshold a probability map first'. A float FLAIR, skull-stripped or not, is still a scan."""
    image, truth = make_volume(size=(48, 48, 12), blobs=((0.5, 0.5, 0.5, 6.0),))
    rng = np.random.default_rng(0)
    lesion = sitk.GetArrayFromImage(truth).astype(np.float32)
    percent = np.clip(lesion * 90 + rng.random(lesion.shape, dtype=np.float32) * 0.5, 0, 100).astype(np.float32)
    prob = sitk.GetImageFromArray(percent)
    prob.CopyInformation(truth)
    sitk.WriteImage(prob, str(tmp_path / "prob.nii.gz"))
    with pytest.raises(DeepWMLError) as caught:
        io.read_mask(tmp_path / "prob.nii.gz")
    assert "threshold a probability map first" in str(caught.value) and "looks like a scan" not in str(caught.value)

    flair = sitk.GetArrayFromImage(image).astype(np.float32) * 1.37
    assert np.any(flair != np.round(flair))
    stripped = np.where(flair > np.percentile(flair, 60), flair, 0).astype(np.float32)  # zero outside the brain
    for name, voxels in (("flair", flair), ("stripped", stripped)):
        scan = sitk.GetImageFromArray(voxels)
        scan.CopyInformation(image)
        sitk.WriteImage(scan, str(tmp_path / f"{name}.nii.gz"))
        with pytest.raises(DeepWMLError, match="looks like a scan, not a label mask"):
            io.read_mask(tmp_path / f"{name}.nii.gz")


def test_a_flair_resampled_by_nearest_neighbour_is_no_label_map():
    """The label-map check (neighbouring voxels alike) spares a FLAIR of whole numbers resampled by nearest
    neighbour, whose voxels repeat along the axes it was resampled along (2-fold along all three here), and
    catches a map of one label per lesion."""
    image, truth = make_volume(size=(32, 32, 8), blobs=((0.3, 0.3, 0.5, 4.0), (0.7, 0.6, 0.5, 4.0)), dtype=sitk.sitkInt16)
    array = sitk.GetArrayFromImage(image).repeat(2, 0).repeat(2, 1).repeat(2, 2)
    assert io.check_volume(sitk.GetImageFromArray(array.astype(np.float32)), "resampled") is not None
    labels = np.zeros((8, 32, 32), np.float32)
    for label in range(1, 21):  # 20 small lesions of 3 x 3 x 2 voxels, apart
        z, y, x = 1 + (label % 3) * 2, 2 + (label % 5) * 6, 2 + (label // 5) * 6
        labels[z:z + 2, y:y + 3, x:x + 3] = label
    with pytest.raises(io.LabelMaskGiven, match="looks like a label mask of many labels"):
        io.check_volume(sitk.GetImageFromArray(labels), "labels")


def test_the_label_map_check_of_a_scan_of_whole_numbers_sorts_no_copy_of_its_slices(monkeypatch):
    """A clinical FLAIR stored as integers (uint16, read as float32 whole numbers) gets the label-map check in full
    on every read: its background was found by sorting the 1.6 million voxels of the 24 slices judged, some 15 ms
    of each case's 0.3 s outside the networks (deepwml bench). Counted by value instead, nothing but the few-values
    check's sample of 200,000 is sorted; the verdicts stay those of the sorting: a FLAIR passes, a map of one label
    per lesion on a background of -1024 (not 0) and one of int16's whole range are refused."""
    rng = np.random.default_rng(3)
    rows, cols = np.mgrid[:256, :256]
    head = (rows - 128) ** 2 + (cols - 128) ** 2 < 100 ** 2
    flair = np.where(head, rng.integers(200, 1200, (25, 256, 256)), 0).astype(np.float32)
    sorted_sizes = []
    real_sort = np.sort

    def counted(values, *args, **kwargs):
        sorted_sizes.append(np.size(values))
        return real_sort(values, *args, **kwargs)

    monkeypatch.setattr(np, "sort", counted)
    assert io.check_volume(sitk.GetImageFromArray(flair), "flair") is not None
    assert sum(sorted_sizes) <= 210_000, sorted_sizes
    labels = np.full((8, 32, 32), -1024, np.int16)
    for label in range(1, 21):  # 20 small lesions of 3 x 3 x 2 voxels, apart
        z, y, x = 1 + (label % 3) * 2, 2 + (label % 5) * 6, 2 + (label // 5) * 6
        labels[z:z + 2, y:y + 3, x:x + 3] = label
    for name, voxels in (("labels", labels), ("wide", np.where(labels > 0, labels * 1600, -32768).astype(np.int16))):
        with pytest.raises(io.LabelMaskGiven, match="looks like a label mask of many labels"):
            io.check_volume(sitk.GetImageFromArray(voxels), name)


def test_slices_drifting_over_half_a_slice_off_the_grid_are_refused(tmp_path):
    """Steps drifting from 4.1 to 5.9 mm, each within a fifth of the median (not refused as slices missing), put
    the middle slices of the mean-spaced grid several mm from where they were imaged: over half a slice, refused
    (a warning was all they got)."""
    image, _ = make_volume(size=(20, 16, 21), spacing=(0.8, 0.8, 5.0), dtype=sitk.sitkInt16,
                           direction=rotation(0.1, 0.05, 0.2).ravel().tolist())
    steps = np.linspace(4.1, 5.9, 20)
    folder = write_dicom_series(tmp_path / "series", image, description="AX FLAIR",
                                positions=stepped_positions(image, steps))
    with pytest.raises(DeepWMLError, match=r"unevenly spaced \(4.10 to 5.90 mm apart\): on a regular grid of their "
                                           r"mean spacing, 5.00 mm, image 11 would lie 4.7 mm \(over half a slice\)"):
        io.read_image(folder)


def test_slices_drifting_within_half_a_slice_are_read_and_warned_of(tmp_path):
    image, _ = make_volume(size=(20, 16, 9), spacing=(0.8, 0.8, 5.0), dtype=sitk.sitkInt16,
                           direction=rotation(0.1, 0.05, 0.2).ravel().tolist())
    folder = write_dicom_series(tmp_path / "series", image, description="AX FLAIR",
                                positions=stepped_positions(image, np.linspace(4.6, 5.4, 8)))
    (series,) = io.dicom_series(folder)
    read = io.read_image(folder, series=series)
    (warning,) = series.slice_warnings(read)
    assert warning.startswith("DICOM slices unevenly spaced (4.60 to 5.40 mm apart")


@pytest.mark.parametrize("scale, offset, words", [(1e37, 0, "outside single precision"), (1e-44, 0, "outside single precision"),
                                                  (1, 2 ** 40, "all one value in single precision")])
def test_an_image_single_precision_cannot_hold_is_refused(scale, offset, words):
    """A double image DeepWML computes on in float32: voxels past float32's range became Inf (a raw numpy error
    deep inside), and voxels too small for it, or too close together, a few values or one, which segmented silently
    as no lesion at all."""
    image, _ = make_volume(size=(32, 28, 4))
    voxels = sitk.GetArrayFromImage(image).astype(np.float64) * scale
    scaled = sitk.GetImageFromArray(voxels + offset if not offset else voxels.astype(np.int64) + offset)  # 64-bit integers
    scaled.CopyInformation(image)
    with pytest.raises(DeepWMLError, match=words):
        io.check_volume(scaled, "scaled")
    assert io.check_volume(sitk.Cast(image, sitk.sitkFloat64), "double") is not None  # an ordinary double image


@pytest.mark.parametrize("code, written", [(errno.EINVAL, True), (errno.EOPNOTSUPP, True), (errno.EIO, False)])
def test_a_file_system_that_cannot_sync_files_still_gets_outputs_but_a_failed_write_is_an_error(tmp_path, monkeypatch,
                                                                                                 code, written):
    """Outputs are fsynced before their rename; a network share or FUSE mount that cannot sync a file (EINVAL, not
    supported) failed every output. It now writes them as before; a failed write (EIO) is still an error."""
    def fsync(fd):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "fsync", fsync)
    target = tmp_path / "out" / "report.json"
    target.parent.mkdir()
    if written:
        io.write_text("{}", target)
        assert target.read_text(encoding="utf-8") == "{}"
    else:
        with pytest.raises(DeepWMLError):
            io.write_text("{}", target)
        assert not target.exists()


def test_thin_slices_with_positions_rounded_to_a_tenth_of_a_millimetre_are_read_without_a_word(tmp_path):
    """A 3D FLAIR's 0.55 mm slices with Image Positions written to 0.1 mm (steps 0.5 or 0.6 mm, each slice within
    0.05 mm of its place) were refused as unevenly spaced (0.6 mm is over a fifth more than the median 0.5 mm), and
    within that, warned of: the rounding counted as misplacement. A slice missing there is still refused."""
    image, _ = make_volume(size=(20, 16, 12), spacing=(0.8, 0.8, 0.55), dtype=sitk.sitkInt16)
    positions = [np.round(p, 1) for p in stepped_positions(image, [0.55] * 11)]
    folder = write_dicom_series(tmp_path / "series", image, description="3D FLAIR", positions=positions)
    (series,) = io.dicom_series(folder)
    assert series.slice_warnings(io.read_image(folder, series=series)) == []
    (folder / sorted(p.name for p in folder.iterdir())[5]).unlink()  # a slice missing
    with pytest.raises(DeepWMLError, match="slice\\(s\\) missing"):
        io.read_image(folder)


def test_a_thin_slice_multi_frame_file_with_positions_rounded_to_a_tenth_of_a_millimetre_is_read(tmp_path):
    """As a series of files: a multi-frame file's 0.55 mm frames at positions written to 0.1 mm were refused as a
    frame missing or repeated (0.6 mm steps beside a median of 0.5 mm)."""
    image, _ = make_volume(size=(20, 16, 12), spacing=(0.8, 0.8, 0.55), dtype=sitk.sitkInt16)
    positions = [np.round(p, 1) for p in stepped_positions(image, [0.55] * 11)]
    write_enhanced_mr(tmp_path / "flair.dcm", image, positions=positions)
    (series,) = io.dicom_series(tmp_path)
    read = io.read_image(tmp_path, series=series)
    assert read.GetSize() == (20, 16, 12) and series.slice_warnings(read) == []


@pytest.mark.parametrize("value, cell", [
    ("-AX FLAIR", "'-AX FLAIR"), ("=HYPERLINK(\"http://x\")", "'=HYPERLINK(\"http://x\")"), ("+C AX FLAIR", "'+C AX FLAIR"),
    ("@SUM(A1)", "'@SUM(A1)"), ("\tx", "'\tx"), ("\rx", "'\rx"), ("'=1+1", "''=1+1"),  # an apostrophe of its own kept
    (-0.7, "-0.7"), ("-0.70", "-0.70"), ("+1e-3", "+1e-3"), (-3, "-3"), (None, ""),  # numbers stay numbers
    ("-1_000", "'-1_000"), ("-nan", "'-nan"),  # which Python reads as numbers, a spreadsheet as formulas
    ("AX FLAIR", "AX FLAIR"), ("'quoted", "'quoted"), ("3-5", "3-5")])
def test_csv_cells_a_spreadsheet_would_take_for_formulas_are_text_and_read_back_as_written(value, cell):
    """Excel and LibreOffice take a cell beginning with =, +, -, @, a tab or a carriage return for a formula: a series
    "-AX FLAIR" showed #NAME?, and "=HYPERLINK(...)" ran (CSV injection, OWASP). The apostrophe before such text is
    not shown by the spreadsheet, and DeepWML takes it off where it reads its own tables back."""
    assert io.spreadsheet_cell(value) == cell
    assert io.plain_cell(cell) == ("" if value is None else str(value))


def test_a_csv_table_guards_its_text_cells_and_leaves_its_numbers():
    text = io.csv_text(["case", "change_ml", "centroid_mm"], [{"case": "=1+1", "change_ml": -0.531, "centroid_mm": "-1 2 3"},
                                                              {"case": "-AX FLAIR", "change_ml": None}])
    assert list(csv.reader(StringIO(text, newline=""))) == [["case", "change_ml", "centroid_mm"],
                                                            ["'=1+1", "-0.531", "'-1 2 3"], ["'-AX FLAIR", "", ""]]


def test_a_csv_cell_holding_a_carriage_return_is_quoted_so_its_row_stays_one_row():
    """A carriage return inside a cell (a DICOM series description or a centre typed on a Mac) was written bare, as
    the tables end their lines with a line feed alone: a spreadsheet or a CSV reader ended the row there, and the rest
    of the row became a row of its own, its columns shifted."""
    rows = [{"case": "p1", "series": "AX\rFLAIR", "ml": 1.5}, {"case": "p2", "series": "AX FLAIR", "ml": 2}]
    text = io.csv_text(["case", "series", "ml"], rows)
    assert list(csv.reader(StringIO(text, newline=""))) == [["case", "series", "ml"], ["p1", "AX\rFLAIR", "1.5"],
                                                            ["p2", "AX FLAIR", "2"]]
    assert text.endswith("p2,AX FLAIR,2\n")  # rows without one are written as before


@pytest.mark.parametrize("where", [np.s_[5], np.s_[:, 20], np.s_[:, :, 24]], ids=["slice", "row", "column"])
def test_a_thin_line_of_minus_32768_padding_through_bright_tissue_is_not_taken_for_wrapped_values(tmp_path, where):
    """A slice, row or column of -32768 (a slice missing from a reslice or conversion, filled with its padding) through
    a head at 21000: every padded voxel lies next to a bright one, and the scan was refused as wrapped around. Padding
    is one value, the image's least, where wrapped values spread over many; a wrapped scan is still refused."""
    scan, _ = make_volume(size=(48, 40, 10))
    voxels = np.clip(sitk.GetArrayFromImage(scan) * 70, 0, 32000).astype(np.int16)
    voxels[where] = -32768
    padded = sitk.GetImageFromArray(voxels)
    padded.CopyInformation(scan)
    sitk.WriteImage(padded, str(tmp_path / "padded.nii.gz"))
    assert io.read_image(tmp_path / "padded.nii.gz").GetSize() == padded.GetSize()
    wrapped = (np.round(sitk.GetArrayFromImage(scan).astype(np.float64) * 60).astype(np.int64) + 32768) % 65536 - 32768
    wrapped[where] = -32768
    assert np.count_nonzero((wrapped < -16384) & (wrapped > -32768)) > 30  # the lesions, at 42000, wrapped
    with pytest.raises(DeepWMLError, match="values that wrapped around"):
        io.check_volume(io.like_image(wrapped.astype(np.int16), scan))


def test_reslice_padding_of_minus_32768_beside_bright_tissue_is_not_taken_for_wrapped_values(tmp_path):
    """A scan in signed 16 bits (its head at 21000) whose field of view was cut by -32768 padding through the head, as a
    reslice leaves it: read, where a scan whose bright voxels wrapped past 32767 to negative is refused
    (test_bad_inputs): only the padding's edge lies next to bright voxels."""
    scan, _ = make_volume(size=(48, 40, 10))
    voxels = np.clip(sitk.GetArrayFromImage(scan) * 70, 0, 32000).astype(np.int16)
    voxels[:, :, :8] = -32768
    assert np.any((voxels[:, :, 8] > 16384))  # the padding borders the bright head
    padded = sitk.GetImageFromArray(voxels)
    padded.CopyInformation(scan)
    sitk.WriteImage(padded, str(tmp_path / "padded.nii.gz"))
    assert io.read_image(tmp_path / "padded.nii.gz").GetSize() == padded.GetSize()


def test_a_real_flair_whose_brightest_voxels_wrapped_past_65535_is_refused_and_one_saturated_there_is_read(shared_data):
    """A clinical FLAIR whose top 1 % was scaled past 65535 and stored in unsigned 16 bits: its brightest voxels
    (lesions, scalp) start again from 0 and read as dark holes in bright tissue, and it was segmented without a word.
    The same scan scaled to a top of 65535, or saturated there from its 99th percentile (bright scalp at 65535 beside
    the air), is read as before."""
    scan = sitk.ReadImage(str(shared_data / "open_ms" / "clinical_flair" / "patient01_study1.nii.gz"))
    values = sitk.GetArrayFromImage(scan).astype(np.float64)
    top = np.percentile(values, 99)
    wrapped = np.round(values * 65536 / top).astype(np.int64) % 65536
    assert np.count_nonzero(values > top) > 30000  # the voxels that overflowed
    with pytest.raises(DeepWMLError, match="values that wrapped around.*over 65535 stored in unsigned 16 bits"):
        io.check_volume(io.like_image(wrapped.astype(np.uint16), scan))
    for full in (values * 65535 / values.max(), np.clip(values * 65535 / top, 0, 65535)):
        io.check_volume(io.like_image(np.round(full).astype(np.uint16), scan))


@pytest.mark.parametrize("name,data", [("out.mhd", "out.zraw"), ("out.nhdr", "out.raw.gz")])
def test_a_detached_header_is_written_with_its_data_file_under_its_own_name(tmp_path, name, data):
    """io.write_image to a .mhd or .nhdr: ITK names the data file after the header it writes, and the header was
    written under a temporary name, so the output named '.out.mhd.xxxx.part.zraw', a hidden temporary file that the
    next run into the folder removes as a leftover of a killed one. Written again over itself, as with --overwrite."""
    scan, _ = make_volume()
    for _ in range(2):
        io.write_image(scan, tmp_path / name)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, data])
    assert io.temporary_leftovers(tmp_path) == []
    assert np.array_equal(sitk.GetArrayFromImage(io.read_image(tmp_path / name)), sitk.GetArrayFromImage(scan))


@pytest.mark.parametrize("name", ["out.mhd", "out.nhdr"])
def test_a_detached_header_whose_data_file_was_cut_short_by_a_full_disk_leaves_nothing(tmp_path, monkeypatch, name):
    """A full disk while ITK writes a .mhd's or .nhdr's data file (it writes the header, cuts the data file short and
    raises): a one-line error that says the disk is full, and nothing left behind (the temporary data file, cut short,
    was left: on a real 1 MB disk, all of its space)."""
    written = sitk.WriteImage

    def full_disk(image, file_name, *args):
        written(image, file_name, *args)
        for part in Path(file_name).parent.iterdir():
            if part.suffix in (".zraw", ".gz"):
                part.write_bytes(part.read_bytes()[:100])
        raise RuntimeError("MetaImage: M_WriteElementsData: file stream is fail after write")

    monkeypatch.setattr(sitk, "WriteImage", full_disk)
    monkeypatch.setattr(io, "ALMOST_FULL_BYTES", 1 << 62)  # this disk, with the space the data file took back, is full
    scan, _ = make_volume()
    with pytest.raises(DeepWMLError, match=r"cannot write .*\(No space left on device\); the disk is full"):
        io.write_image(scan, tmp_path / name)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.name == "nt", reason="no file size limit (ulimit -f) on Windows")
def test_an_output_over_the_file_size_limit_is_said_to_be_so(tmp_path):
    """An output larger than the file size limit (ulimit -f; a write past it fails with EFBIG): the .mha was refused
    with "(Reason: File too large); check free space and permissions", and NRRD and NIfTI outputs with ITK's own words
    or "is the disk full?", where the disk had space; now each says the file size limit, and leaves nothing."""
    import subprocess
    import sys

    script = ("import resource, sys, numpy as np, SimpleITK as sitk\n"
              "from DeepWMLLib import io\n"
              "from DeepWMLLib.errors import DeepWMLError\n"
              "image = sitk.GetImageFromArray(np.random.default_rng(0).random((20, 100, 100)).astype(np.float32))\n"
              "resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))\n"
              "for name in sys.argv[1:]:\n"
              "    try:\n"
              "        io.write_image(image, name)\n"
              "    except DeepWMLError as exc:\n"
              "        print(exc)\n")
    names = [str(tmp_path / f"out{ext}") for ext in (".mha", ".nrrd", ".nii.gz", ".mhd")]
    done = subprocess.run([sys.executable, "-c", script, *names], capture_output=True, text=True, timeout=120,
                          cwd=Path(io.__file__).parents[1])
    said = done.stdout.splitlines()
    assert len(said) == len(names), done.stdout + done.stderr
    for name, line in zip(names, said):
        assert line.startswith(f"cannot write {name} (File too large); the file is larger than a file size limit "
                               "allows (ulimit -f"), line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the peak memory reset and read in /proc: Linux")
def test_the_notes_of_an_image_written_by_simpleitk_cost_no_copy_of_its_voxels(tmp_path):
    """write_image's `notes` (the change label map's header words) where SimpleITK writes the file (an NRRD, .mha, or
    a NIfTI without its input's geometry: a DICOM follow-up): they were set on a copy of the image, which SimpleITK
    makes a copy of every voxel (+64 MiB at 512 x 512 x 256, 420 MB of a 1024 x 1024 x 400 follow-up's labels); now
    on the image itself while it is written, its own fields back afterwards."""
    import subprocess

    script = ("import sys, SimpleITK as sitk\n"
              "from DeepWMLLib import io\n"
              "def peak():\n"  # VmHWM, kB (a child starts with its parent's: reset first)
              "    return int(next(line for line in open('/proc/self/status') if line.startswith('VmHWM')).split()[1])\n"
              "image = sitk.Image(512, 512, 256, sitk.sitkUInt8)\n"
              "image[100, 100, 100] = 3\n"
              "image.SetMetaData('ITK_FileNotes', 'its own')\n"
              "io.write_image(image, sys.argv[1] + '/warm.nrrd')\n"  # the writer's own buffers, once
              "open('/proc/self/clear_refs', 'w').write('5')\n"
              "before = peak()\n"
              "io.write_image(image, sys.argv[1] + '/p_change.nrrd', notes=io.CHANGE_MAP_NOTES)\n"
              "print((peak() - before) / 1024)\n"
              "print(image.GetMetaData('ITK_FileNotes'))\n")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=120,
                          cwd=Path(io.__file__).parents[1])
    said = done.stdout.splitlines()
    assert len(said) == 2, done.stdout + done.stderr
    assert float(said[0]) < 16, f"{said[0]} MiB more at the peak"  # (the image: 64 MiB)
    assert said[1] == "its own"  # the caller's image keeps its own fields
    assert io.file_notes(tmp_path / "p_change.nrrd") == io.CHANGE_MAP_NOTES
    assert io.file_notes(tmp_path / "warm.nrrd") == "its own"


@pytest.mark.parametrize("raised,code", [
    # MetaImageIO's words (itkMetaImageIO.cxx: "File cannot be written: " ... "Reason: " GetLastSystemError())
    ("ITK ERROR: MetaImageIO(0x1): File cannot be written: {name}\nReason: Disk quota exceeded", errno.EDQUOT),
    # NrrdImageIO's, with no reason: a small file cannot be written in the folder either
    ("ITK ERROR: NrrdImageIO(0x1): Write: Error writing {name}:\n[nrrd] _nrrdGzWrite: failed to write to file", None),
], ids=["MetaImage", "NRRD"])
def test_an_output_over_the_disk_quota_is_said_to_be_so(tmp_path, monkeypatch, raised, code):
    """A disk quota used up (EDQUOT: the disk has space, this user has none) while ITK writes: its error carries no
    errno, and the disk's free space is not low, so the user was told "(Reason: Disk quota exceeded); check free space
    and permissions" or ITK's own words; now the quota is named. (A real quota could not be made here: ext4's and
    tmpfs's quotas are not in this kernel; the words are ITK's, as its source writes them.)"""
    def fails(image, file_name, *args):
        Path(file_name).write_bytes(b"\0" * 1000)
        raise RuntimeError(raised.format(name=file_name))

    def no_room(*args, **kwargs):
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))

    monkeypatch.setattr(sitk, "WriteImage", fails)
    if code is None:  # the probe of a small file meets the quota too
        monkeypatch.setattr(io.tempfile, "TemporaryFile", no_room)
    scan, _ = make_volume()
    for name in ("out.mha", "out.nrrd"):
        with pytest.raises(DeepWMLError, match=r"\(Disk quota exceeded\); your disk quota is used up"):
            io.write_image(scan, tmp_path / name)
    assert list(tmp_path.iterdir()) == []


def _series_of_8(**fields):
    return io.DicomSeries(uid="1.2.3", description="AX FLAIR", files=tuple(f"f{k}" for k in range(8)), **fields)


@pytest.mark.parametrize("spacing, thickness, gap", [
    (6.25, 6.125, None),  # 0.125 mm short: 2 % of 6.25 mm exactly, the tolerance: the same (written rounded)
    (6.25, 6.0, 0.25),  # 0.25 mm: a gap
    (1.0, 0.96875, None),  # 0.03125 mm: within the 0.05 mm floor of thin slices (2 % would be 0.02 mm)
    (1.0, 0.9375, 0.0625),  # past it
    (4.0, 5.0, None),  # overlapping slices (a 3D FLAIR reconstructed at under its thickness): no gap
    (5.0, 0.0, None)])  # a Slice Thickness of 0 says nothing of the slices (no "5.00 mm gap")
def test_a_gap_between_slices_is_warned_of_past_the_larger_of_2_percent_and_50_microns(spacing, thickness, gap):
    """`slice_gap_warning`'s rule by hand: Slice Thickness and slice spacing count as the same within the larger of
    0.05 mm and 2 % of the spacing (values chosen exact in binary, so each boundary is met exactly): 6.25 mm slices
    6.125 mm thick are 0.125 mm short, exactly 2 %: no gap; 6.0 mm thick: a 0.25 mm gap. 1 mm slices 0.96875 mm thick
    are within 0.05 mm; 0.9375 mm thick is a 0.0625 mm gap. Thicker than the spacing is overlap, never a gap."""
    image = sitk.Image((4, 4, 8), sitk.sitkInt16)
    image.SetSpacing((0.9, 0.9, spacing))
    warning = _series_of_8(slice_thickness_mm=thickness).slice_gap_warning(image)
    if gap is None:
        assert warning is None
    else:
        assert warning is not None and f"a {gap:.2f} mm gap between them" in warning


def _cumulative(steps):
    return tuple(float(v) for v in np.concatenate([[0.0], np.cumsum(steps)]))


@pytest.mark.parametrize("steps, spacing, warned", [
    ([6.25] * 7, 6.25, None),
    # one step 0.125 mm long (2 % of 6.25 mm, the tolerance): slices 3.. 0.125 mm past the grid: the same
    ([6.25, 6.25, 6.375, 6.25, 6.25, 6.25, 6.25], 6.25, None),
    # 0.25 mm long: image 4 on lies 0.25 mm off its place
    ([6.25, 6.25, 6.5, 6.25, 6.25, 6.25, 6.25], 6.25, "image 4 (instance 4) 0.25 mm"),
    # thin slices: 0.15 mm is the floor (2 % of 0.5 mm would be 0.01 mm); 0.125 mm off: the same, 0.25 mm: warned
    ([0.5, 0.5, 0.625, 0.5, 0.5, 0.5, 0.5], 0.5, None),
    ([0.5, 0.5, 0.75, 0.5, 0.5, 0.5, 0.5], 0.5, "image 4 (instance 4) 0.25 mm"),
    # each slice within 0.125 mm of its place (images 2 and 3 0.125 mm either side), but the step between them 0.25 mm
    # short of 5 mm: a slab 5 % thin measured as 5 mm, warned of by its step
    ([5.125, 4.75, 5.125, 5.0, 5.0, 5.0, 5.0], 5.0, "image 2 (instance 2) 0.12 mm")])
def test_uneven_slices_are_warned_of_past_the_larger_of_2_percent_and_150_microns(steps, spacing, warned):
    """`slice_spacing_warning`'s rule by hand, on positions along the slice axis (0, then the cumulative steps) and a
    series read onto `spacing`: each slice's place from the first, and each step, within the larger of 0.15 mm and
    2 % of the spacing of where the regular grid puts them. Positions exact in binary, so the boundaries hold
    exactly: with 6.25 mm slices a step 0.125 mm long (2 %) is not warned of, 0.25 mm is (slice 4, instance 4, lies
    0.25 mm off: its place 12.5 + 6.5 = 19.0 mm, the grid's 3 x 6.25 = 18.75 mm)."""
    positions = _cumulative(steps)
    image = sitk.Image((4, 4, len(positions)), sitk.sitkInt16)
    image.SetSpacing((0.9, 0.9, spacing))
    series = _series_of_8(slice_positions_mm=positions, instance_numbers=tuple(range(1, 9)))
    warning = series.slice_spacing_warning(image)
    if warned is None:
        assert warning is None
    else:
        assert warning is not None and f"which puts {warned} from where it was imaged" in warning


@pytest.mark.parametrize("long_step, refused", [(6.0, False), (6.25, True)])
def test_one_step_over_a_fifth_longer_than_the_others_is_refused(tmp_path, long_step, refused):
    """Axial slices 5 mm apart but one step (images 3 to 4): 6 mm is a fifth longer, the most `_check_slice_spacing`
    lets through (|6 - 5| = 1.0 mm, not over 0.2 x 5 mm), read and warned of; 6.25 mm (a quarter) is refused as uneven
    slice spacing (no slice is missing: round(6.25 / 5) - 1 = 0), as a lesion past that step would be placed 1.25 mm
    off on the mean grid."""
    image, _ = make_volume(size=(16, 16, 8), spacing=(0.8, 0.8, 5.0), dtype=sitk.sitkInt16)
    steps = [5.0, 5.0, long_step, 5.0, 5.0, 5.0, 5.0]
    folder = write_dicom_series(tmp_path / "series", image, description="AX FLAIR",
                                positions=stepped_positions(image, steps))
    if refused:
        with pytest.raises(DeepWMLError, match=r"not evenly spaced \(6.25 mm between images 3 and 4, 5.00 mm "
                                               r"elsewhere: uneven slice spacing\)"):
            io.read_image(folder)
    else:
        (series,) = io.dicom_series(folder)
        read = io.read_image(folder, series=series)
        assert read.GetSize()[2] == 8
        # (and a gap: 5 mm thick on the mean spacing of 5.14 mm)
        assert [w for w in series.slice_warnings(read) if w.startswith("DICOM slices unevenly spaced (5.00 to 6.00 mm apart")]


@pytest.mark.parametrize("run, refused", [(6, False), (7, True)])
def test_slices_drifting_just_over_half_a_slice_are_refused(tmp_path, run, refused):
    """`run` steps of 4.6 mm then `run` of 5.4 mm: every step within a fifth of the median 5.0 mm, and the mean
    step 5.0 mm, so image `run` + 1 lies run x 0.4 mm before its place on the mean grid: 2.4 mm (0.48 of a slice)
    for 6, read and warned of; 2.8 mm (0.56 of a slice, over half) for 7, refused."""
    image, _ = make_volume(size=(16, 16, 2 * run + 1), spacing=(0.8, 0.8, 5.0), dtype=sitk.sitkInt16)
    steps = [4.6] * run + [5.4] * run
    folder = write_dicom_series(tmp_path / "series", image, description="AX FLAIR",
                                positions=stepped_positions(image, steps))
    if refused:
        with pytest.raises(DeepWMLError, match=r"mean spacing, 5.00 mm, image 8 would lie 2.8 mm \(over half a slice\)"):
            io.read_image(folder)
    else:
        (series,) = io.dicom_series(folder)
        read = io.read_image(folder, series=series)
        (warning,) = series.slice_warnings(read)
        assert "which puts image 7 (instance 7) 2.40 mm from where it was imaged" in warning


@pytest.mark.parametrize("last_shift_mm, refused", [(0.4, False), (0.6, True)])
def test_a_stack_sheared_by_over_half_a_pixel_is_refused(tmp_path, last_shift_mm, refused):
    """Axial slices 5 mm apart (8 of them: 35 mm) of 0.8 mm pixels, each shifted along the rows by k/7 of
    `last_shift_mm`: the most `_check_slice_spacing` lets through is half a pixel plus 0.2 % of the stack's length,
    0.4 + 0.07 = 0.47 mm by hand. The last slice 0.4 mm sideways is read; 0.6 mm is refused (a sheared stack read
    straight misplaces every slice; a limit of a whole pixel, 0.87 mm, let it through)."""
    image, _ = make_volume(size=(16, 16, 8), spacing=(0.8, 0.8, 5.0), dtype=sitk.sitkInt16)
    origin = np.array(image.GetOrigin())
    positions = [origin + np.array([0.0, k * last_shift_mm / 7, 5.0 * k]) for k in range(8)]
    folder = write_dicom_series(tmp_path / "series", image, description="AX FLAIR", positions=positions)
    if refused:
        with pytest.raises(DeepWMLError, match=r"not stacked straight along their normal \(image 8 lies 0.6 mm sideways"):
            io.read_image(folder)
    else:
        assert io.read_image(folder).GetSize()[2] == 8


@pytest.mark.parametrize("positions_mm, refused", [(1.2, False), (1.3, True)])
def test_slices_read_a_fifth_closer_than_their_positions_are_refused(tmp_path, positions_mm, refused):
    """Classic images labelled Enhanced MR, as in the test above: GDCM reads them 1 mm apart whatever their
    positions say. Positions 1.2 mm apart differ from the 1 mm read by 0.2 mm, within max(0.2 x 1.2, 0.15) =
    0.24 mm: read (as 1 mm slices); 1.3 mm apart differ by 0.3 mm, over max(0.26, 0.15): refused, as every volume
    would be 23 % small."""
    image, _ = make_volume(size=(20, 16, 6), spacing=(0.8, 0.8, positions_mm), dtype=sitk.sitkInt16)
    folder = write_dicom_series(tmp_path / "series", image, description="AX FLAIR")
    _label_enhanced_mr(folder)
    if refused:
        with pytest.raises(DeepWMLError, match=r"read the series' slices 1.00 mm apart, but their Image Positions "
                                               r"\(Patient\) are 1.30 mm apart"):
            io.read_image(folder)
    else:
        assert io.read_image(folder).GetSpacing()[2] == pytest.approx(1.0)


@pytest.mark.parametrize("long_step, refused", [(6.0, False), (6.25, True)])
def test_one_frame_step_over_a_fifth_longer_than_the_others_is_refused(tmp_path, long_step, refused):
    """The same rule for the frames of one multi-frame (Enhanced MR) file (`_check_frames`): frames 5 mm apart but
    one step of 6 mm (a fifth longer, |6 - 5| = 1.0 mm, not over 0.2 x 5 mm) is read onto the grid of the mean step;
    6.25 mm (a quarter) is refused as unevenly spaced frames (not 'frames missing': 6.25 is under 1.5 x 5)."""
    image, _ = make_volume(size=(16, 16, 8), spacing=(0.8, 0.8, 5.0), dtype=sitk.sitkInt16)
    write_enhanced_mr(tmp_path / "stack" / "IM1", image,
                      positions=stepped_positions(image, [5.0, 5.0, long_step, 5.0, 5.0, 5.0, 5.0]))
    if refused:
        with pytest.raises(DeepWMLError, match=r"its frames unevenly spaced: 6.25 mm between two of them, 5.00 mm "
                                               r"elsewhere"):
            io.read_image(tmp_path / "stack")
    else:
        assert io.read_image(tmp_path / "stack").GetSize()[2] == 8


@pytest.mark.parametrize("order, flips, change", [
    ((0, 1, 2), (False, False, True), None), ((2, 0, 1), (True, False, False), None),
    ((1, 0, 2), (True, True, False), None), ((0, 1, 2), (False, False, True), "origin"),
    ((2, 0, 1), (False, True, True), "crop"), ((0, 1, 2), (False, False, False), "crop"),
])
def test_reorders_onto_tells_what_align_voxel_order_does_from_the_geometry_alone(order, flips, change):
    """io.reorders_onto (metrics' grid checks, no voxel reordered) says whether align_voxel_order puts an image on a
    reference's grid, as reordering it does: the same voxels stored in another order (slices the other way,
    sagittal-first), and not with the reference's origin moved by a voxel or its extent cropped by a slice."""
    image = sitk.Image([5, 6, 7], sitk.sitkUInt8)
    image.SetSpacing((0.7, 0.9, 3.0))
    image.SetOrigin((12.0, -30.0, 4.5))
    image.SetDirection(tuple(np.array(sitk.Euler3DTransform((0, 0, 0), 0.1, -0.2, 0.15).GetMatrix())))
    reference = sitk.Flip(sitk.PermuteAxes(image, order), flips)
    if change == "origin":
        reference.SetOrigin(tuple(np.add(reference.GetOrigin(), (0.0, 0.0, 3.0))))
    elif change == "crop":
        reference = reference[:, :, 1:]
    landed = io.grid_difference(io.align_voxel_order(image, reference), reference) is None
    assert io.reorders_onto(image, reference) is landed
    assert landed is (change is None)


def test_reorders_onto_agrees_with_reordering_on_random_grids():
    """io.reorders_onto against reordering (grid_difference(align_voxel_order(image, reference), reference) is None)
    on seeded random grids: oblique directions (near 45 degrees too), reflections (det -1), sizes of 1, anisotropic
    spacings permuted, origins, spacings and directions moved to just within or beyond the tolerances, crops,
    whole-voxel shifts, unrelated grids, 2D images; each as a SimpleITK image and as a Volume (~2 s)."""
    from DeepWMLLib.volume import Volume

    rng = np.random.default_rng(50)

    def rotation_of(scale):
        return np.array(sitk.Euler3DTransform((0, 0, 0), *(rng.normal(size=3) * scale)).GetMatrix()).reshape(3, 3)

    def direction():
        signed = np.eye(3)[list(rng.permutation(3))] * rng.choice([-1, 1], 3)  # det +1 or -1
        return [signed, signed @ rotation_of(0.05), rotation_of(2.0) @ signed,
                rotation_of(np.pi / 4 * rng.uniform(0.9, 1.1))][rng.integers(4)]

    outcomes = set()
    for case in range(160):
        reference = sitk.Image([int(n) for n in rng.choice([1, 2, 3, 5], 3)], sitk.sitkUInt8)
        reference.SetSpacing(tuple(rng.choice([0.5, 0.7, 1.0, 3.0, 5.0], 3) * rng.uniform(0.9, 1.1, 3)))
        reference.SetOrigin(tuple(rng.uniform(-100, 100, 3)))
        reference.SetDirection(tuple(direction().ravel()))
        image = sitk.Flip(sitk.PermuteAxes(reference, [int(v) for v in rng.permutation(3)]),
                          [bool(v) for v in rng.integers(0, 2, 3)])
        tolerance = io._ORIGIN_TOL_FRACTION * min(reference.GetSpacing())
        near = rng.choice([0.999, 1.001, 1 - 1e-9, 1 + 1e-9, 2.0])
        change = case % 8
        if change == 1:
            step = rng.normal(size=3)
            image.SetOrigin(tuple(np.add(image.GetOrigin(), step / np.abs(step).max() * tolerance * near)))
        elif change == 2:
            spacing = np.array(image.GetSpacing())
            spacing[rng.integers(3)] *= 1 + io._SPACING_RTOL * near * rng.choice([-1, 1])
            image.SetSpacing(tuple(spacing))
        elif change == 3:
            moved = np.array(image.GetDirection()).reshape(3, 3) @ rotation_of(io._DIRECTION_TOL * near)
            image.SetDirection(tuple(moved.ravel()))
        elif change == 4 and max(image.GetSize()) > 1:
            axis = int(np.argmax(image.GetSize()))
            image = image[tuple(slice(1, None) if a == axis else slice(None) for a in range(3))]
        elif change == 5:
            image.SetDirection(tuple(direction().ravel()))
        elif change == 6:
            axis = int(rng.integers(3))
            shift = np.array(image.GetDirection()).reshape(3, 3)[:, axis] * image.GetSpacing()[axis]
            image.SetOrigin(tuple(np.add(image.GetOrigin(), shift)))
        elif change == 7:
            reference = reference[:, :, 0]
            image = sitk.Image(reference.GetSize(), sitk.sitkUInt8)
            image.CopyInformation(reference)
            image = sitk.Flip(image, [bool(rng.integers(2)), False]) if min(image.GetSize()) > 1 else image
        forms = [image]
        if image.GetDimension() == 3:
            forms.append(Volume(sitk.GetArrayFromImage(image), image.GetSpacing(), image.GetOrigin(),
                                image.GetDirection()))
        for form in forms:
            landed = io.grid_difference(io.align_voxel_order(form, reference), reference) is None
            assert io.reorders_onto(form, reference) is landed, (case, form, reference)
            outcomes.add((change, landed))
    assert {landed for _, landed in outcomes} == {True, False}
