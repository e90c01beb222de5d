"""Mutation audit (mut46) of this session's new code: the DICOM Person Name check of `deepwml export --creator`
(dicom_seg.person_name), DeepWML's change label map read as a mask (io.file_notes, io.change_report_path,
io.change_map_calls, io.change_map_lesions), and a DICOM SEG's frames placed by the source images they name
(io.read_dicom_seg with the source series, _uneven_frames_fault). Expected values are worked out by hand in the
comments; each test names the mutants it kills.

Mutants left alive as equivalent are listed in the audit's report (the helper's final message)."""

from __future__ import annotations

import pytest

from DeepWMLLib.dicom_seg import person_name


# ---- dicom_seg.person_name ----------------------------------------------------------------------------------------

def test_a_person_name_of_exactly_five_components_and_64_bytes_is_taken():
    """At most 5 components (4 carets) a group and 64 bytes in all are allowed, so the limits themselves pass:
    Family^Given^Middle^Prefix^Suffix as typed, 64 ASCII letters (64 bytes), and 64 letters followed by an empty
    component and group ("D"*64 + "^=": 66 bytes typed, 64 once the empty parts DICOM leaves out are dropped).
    (Kills: 4 carets refused; 64 bytes refused; the size measured before the empty parts are dropped.)"""
    assert person_name("Doe^Jane^Mary^Dr^PhD") == "Doe^Jane^Mary^Dr^PhD"
    assert person_name("D" * 64) == "D" * 64
    assert person_name("D" * 64 + "^=") == "D" * 64
    # 32 two-byte letters: 64 bytes, taken; 33: 66 bytes, refused
    assert person_name("é" * 32) == "é" * 32
    with pytest.raises(ValueError, match="66 bytes"):
        person_name("é" * 33)


@pytest.mark.parametrize("name", ["^ ^", " ^ = ^ ", "= ="])
def test_a_person_name_of_carets_equals_signs_and_spaces_names_no_one(name):
    """Carets, equals signs and spaces only: every component empty (spaces pad a DICOM value), so no one is named.
    (Kills: the spaces between the separators not taken for empty.)"""
    with pytest.raises(ValueError, match="names no one"):
        person_name(name)


@pytest.mark.parametrize("given, kept", [("Doe^Jane ^", "Doe^Jane"), ("Doe^Jane^ =", "Doe^Jane"),
                                         ("Doe^Jane ^^=^ ", "Doe^Jane")])
def test_a_person_names_trailing_spaces_before_empty_parts_go_as_a_reader_drops_them(given, kept):
    """A component of spaces only, or spaces ending a group before the empty components dropped, are padding: a
    DICOM reader drops a value's trailing spaces (pydicom reads a PN written 'Doe^Jane ' back as 'Doe^Jane', and
    'Doe^Jane^ ' as 'Doe^Jane^'), so 'Doe^Jane ^' kept as 'Doe^Jane ' named the person in the report otherwise than
    the SEG read back. By hand: 'Doe^Jane ^' -> components Doe, 'Jane ', '' -> Doe^Jane; 'Doe^Jane^ =' -> groups
    'Doe^Jane^ ' and '' -> Doe^Jane; "Doe^Jane ^^=^ " -> groups "Doe^Jane ^^" and "^" -> Doe^Jane.
    (Kills nothing alive: a bug the rstrip('^ ') mutant showed, fixed.)"""
    assert person_name(given) == kept
    pydicom = pytest.importorskip("pydicom")
    from pydicom.filebase import DicomBytesIO
    from pydicom.filereader import read_dataset
    from pydicom.filewriter import write_dataset

    data = pydicom.Dataset()
    data.ContentCreatorName = kept
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, data)
    buffer.seek(0)
    assert str(read_dataset(buffer, False, True).ContentCreatorName) == kept


# ---- the change label map read as a mask (io.change_report_path, change_map_calls, change_map_lesions) -------------

def _labels(values, spacing=(1.0, 1.0, 2.0)):
    import numpy as np
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.asarray(values, np.uint8).reshape(1, 1, -1))
    image.SetSpacing(spacing)
    return image


@pytest.mark.parametrize("name, report, found", [
    ("p_change.nii.gz", "p_change.json", True), ("p_change.nii", "p_change.json", True),
    ("p_change.nrrd", "p_change.json", True), ("p_change.mha", "p_change.json", True),
    ("P_CHANGE.NII.GZ", "P_CHANGE.json", True),  # the name's case as a case-insensitive file system gives it
    ("p_wmh.nii.gz", "p_wmh.json", False),  # a mask named otherwise: no change report beside it
    ("p_change.nrrd.nii.gz", "p_change.json", False),  # fullmatch: 'p_change.nrrd' is no _change stem
    ("p_change.nii.gzip", "p_change.json", False),  # nor an image extension followed by more
    ("p_change.nii.gz", None, False)])  # no report beside it
def test_the_change_report_beside_a_label_map_is_the_one_named_as_its_map(tmp_path, name, report, found):
    """CASE_change.json is the report of the label map CASE_change.nii.gz/.nii/.nrrd/.mha beside it (any case of
    the name); no other name leads to a report, nor a report that is not there.
    (Kills: IGNORECASE dropped; the _change stem or .nii dropped from the pattern; search for fullmatch; a report
    path returned where no file is.)"""
    from DeepWMLLib import io

    if report is not None:
        (tmp_path / report).write_text("{}", encoding="utf-8")
    assert io.change_report_path(tmp_path / name) == ((tmp_path / report) if found else None)


def test_a_change_map_is_known_by_its_exact_header_words_and_holds_only_calls(tmp_path):
    """By its header: the words CHANGE_MAP_NOTES exactly (other words DeepWML might write are not they), and only
    where every value it holds is a call (1-7): values 0..7 give the follow-up's lesions 1, 2, 3, 4, 6 (stable,
    new, enlarging, not assessable, small new), 5 and 7 (gone, small gone) left out: [0,1,1,1,1,0,1,0]; a map
    holding 8 as well (relabelled since) is read as it is.
    (Kills: the header's words taken by their first word; the values-are-calls check dropped.)"""
    import SimpleITK as sitk

    from DeepWMLLib import io

    path = tmp_path / "p_change.nii.gz"
    io.write_image(_labels(range(8)), path, notes=io.CHANGE_MAP_NOTES)
    read = sitk.GetArrayFromImage(io.change_map_lesions(path, io.read_mask(path, change_labels=True))).ravel()
    assert read.tolist() == [0, 1, 1, 1, 1, 0, 1, 0]
    io.write_image(_labels([0, 1, 2, 8]), path, notes=io.CHANGE_MAP_NOTES)
    assert io.change_map_calls(path, _labels([0, 1, 2, 8])) is None
    assert sitk.GetArrayFromImage(io.read_mask(path)).ravel().tolist() == [0, 1, 2, 8]
    other = tmp_path / "q_change.nii.gz"
    io.write_image(_labels([0, 1, 5]), other, notes="DeepWML lesion mask")
    assert io.file_notes(other) == "DeepWML lesion mask"
    assert io.change_map_calls(other, _labels([0, 1, 5])) is None
    assert sitk.GetArrayFromImage(io.read_mask(other)).ravel().tolist() == [0, 1, 5]


def test_a_report_beside_a_map_shows_it_only_with_calls_and_naming_it(tmp_path):
    """By the report beside it (no header words): a JSON of that name whose labels are not change's calls (a
    rater's own {1: WMH}), its digest matching, does not make the map a change map (read as it is, 0/1/5 kept); a
    report of an earlier version (no labels_sha256) shows it only where its outputs list that very file.
    (Kills: the labels-are-calls check dropped; the outputs check taken as always true.)"""
    import json

    import SimpleITK as sitk

    from DeepWMLLib import io

    path = tmp_path / "p_change.nii.gz"
    labels = _labels([0, 1, 5])
    sitk.WriteImage(labels, str(path))
    report = tmp_path / "p_change.json"
    report.write_text(json.dumps({"labels": {"1": "WMH", "5": "WMH"}, "labels_sha256": io.mask_digest(labels)}),
                      encoding="utf-8")
    assert io.change_map_calls(path, labels) is None
    assert sitk.GetArrayFromImage(io.read_mask(path)).ravel().tolist() == [0, 1, 5]
    calls = {"1": "stable", "5": "gone"}
    report.write_text(json.dumps({"labels": calls, "outputs": ["p_change.nrrd", "p_change.json"]}), encoding="utf-8")
    assert io.change_map_calls(path, labels) is None  # lists another file
    report.write_text(json.dumps({"labels": calls, "outputs": ["p_change.nii.gz"]}), encoding="utf-8")
    assert io.change_map_calls(path, labels)[1] == {1: "stable", 5: "gone"}
    assert sitk.GetArrayFromImage(io.read_mask(path)).ravel().tolist() == [0, 1, 0]


# ---- a SEG's frames off its grid as an unevenly spaced series' slices (io._uneven_frames_fault) --------------------

@pytest.mark.parametrize("offsets, sources, fault", [
    # four frames, two segments' at 5.3 mm written 0.0004 mm apart (another writer's digits): one position, one
    # source image b; grid slices 0, 1, 2 of 5 mm, 0.3 mm off; steps 5.3 and 4.7 (median 5, within a fifth): read
    ([0, 5.3, 5.3004, 10], "abbc", None),
    # frame 2 lies 10.6 mm up, on grid slice 2 (slice 1 holds no frame); only the step between grid neighbours
    # (4.4 mm, slices 2 and 3) is held against their median: read
    ([0, 10.6, 15], "abc", None),
    # 6.4 and 3.6 mm steps, 1.4 mm from the median 5 (over a fifth, 1 mm): refused
    ([0, 6.4, 10], "abc", "neighbouring frames lie more unevenly apart"),
    # 4.6 and 5.4 mm both nearest grid slice 1
    ([0, 4.6, 5.4, 10], "abcd", "two frames at different positions lie nearest to one slice"),
    # 7.5 mm: half a slice from grid slices 1 and 2 (nearest to neither)
    ([0, 7.5, 10], "abc", "half a slice from two slices"),
    ([0, 5.3, 10], "abb", "frames at different positions name one source image"),
    ([0, 0, 5.3, 10], "abcd", "at one position name different source images")])
def test_uneven_frames_are_a_series_slices_only_as_a_series_is_read(offsets, sources, fault):
    """_uneven_frames_fault on frames' offsets (mm along the normal) on a 5 mm grid, each frame naming the source
    image in `sources`. Expected by hand in each case's comment.
    (Kills: offsets not rounded to 0.001 mm before frames at one position are told apart; every step between
    frames held against the median, not only grid neighbours'; the median step not checked; frames nearest one
    grid slice not refused; the half-slice check dropped; the checks of one source per position dropped.)"""
    import numpy as np

    from DeepWMLLib import io

    named = [(s, None) for s in sources]
    found = io._uneven_frames_fault(np.array(offsets, float), 5.0, named)
    assert (found is None) if fault is None else (fault in (found or "")), found
    assert "do not each name" in io._uneven_frames_fault(np.array(offsets, float), 5.0, None)


# ---- a SEG's frames placed by the source images they name (io.read_dicom_seg with the source series) ---------------
# (mut46b) The SEG of an unevenly spaced series: slices at 0, 5, 10.6, 15, 20, 25.8, 30 mm along the slice normal
# (steps 5, 5.6, 4.4, 5, 5.8, 4.2: mean 5 mm), so frames 2 and 5 lie 0.6 and 0.8 mm off the 5 mm grid of the SEG's
# Spacing Between Slices: placed by the source image each names where the series is at hand.

_UNEVEN_STEPS = [5.0, 5.6, 4.4, 5.0, 5.8, 4.2]


def test_the_seg_of_an_uneven_enhanced_series_stored_top_down_is_placed_from_its_lowest_slice(tmp_path):
    """An enhanced MR file whose frames are stored from the top down (frame 1 the highest slice: the z of frames 1
    to 7 are -1, -5.2, -11, -16, -20.4, -26, -31; the phantom's origin z -31, slices going up the normal +z). The
    FLAIR reader reads it top down (its slice axis -z, origin z -1). `_source_slices` gives the frames' own positions
    in stored order, so own[0] = -1 > own[-1] = -31: each SEG frame's slice counted up the normal is 6 - (its source
    frame's index), and the grid starts at the lowest slice, z -31 (own.min(), not own[0] = -1). Read with the
    series, the mask on its own lies from z -31 up, the FLAIR's voxels flipped along k; onto the FLAIR: its mask.
    (Kills: the index not reversed for a series stored top down; the origin put at the first stored slice.)"""
    pytest.importorskip("pydicom")
    import numpy as np
    import SimpleITK as sitk

    from DeepWMLLib import io
    from conftest import stepped_positions, write_enhanced_mr
    from test_dicom_seg import LESION, make_seg, phantom

    image = phantom(spacing=(0.7, 0.9, 5.0))  # origin (-12, 20, -31), 7 slices, slice 2 without a lesion
    folder = tmp_path / "enhanced"
    write_enhanced_mr(folder / "flair.dcm", image, order=list(range(6, -1, -1)),
                      positions=stepped_positions(image, _UNEVEN_STEPS), frame_of_reference="1.2.3.77")
    _, flair = make_seg(folder, tmp_path / "s.dcm")
    series, _ = io.choose_dicom_series(folder)
    own = io._source_slices(series, np.array([0.0, 0.0, 1.0]))[1]
    assert np.allclose(own, [-1, -5.2, -11, -16, -20.4, -26, -31])  # stored top down
    mask = sitk.GetArrayFromImage(flair) >= LESION  # k = 0 the top slice (z -1)
    assert flair.GetDirection()[8] == -1 and np.isclose(flair.GetOrigin()[2], -1)
    alone = io.read_mask(tmp_path / "s.dcm", source=series)
    assert np.allclose(alone.GetOrigin(), (-12, 20, -31), atol=1e-3) and alone.GetDirection()[8] == 1
    assert np.array_equal(sitk.GetArrayFromImage(alone), mask[::-1])
    assert np.array_equal(sitk.GetArrayFromImage(io.read_mask(tmp_path / "s.dcm", flair, source=series)), mask)


@pytest.mark.parametrize("frames", ["every frame", "frame 2 only"])
def test_a_seg_frame_whose_source_is_marked_spatial_locations_not_preserved_is_not_placed_by_it(tmp_path, frames):
    """Spatial Locations Preserved NO on a frame's source image: its pixels are not on that image's plane, so its
    source says nothing of where the frame lies. The uneven series' SEG (frames 0.6 and 0.8 mm off the 5 mm grid)
    with one frame's or every frame's source so marked: its frames cannot all be placed by their sources, so off
    the grid they are frames between slices, refused (without the series: 'do not each name the source image'; with
    it the same, none being placed by the series). Unmarked (YES, as DeepWML writes it): read, its mask.
    (Kills: the Spatial Locations Preserved NO check dropped.)"""
    pydicom = pytest.importorskip("pydicom")
    import numpy as np
    import SimpleITK as sitk

    from DeepWMLLib import io
    from DeepWMLLib.errors import DeepWMLError
    from conftest import stepped_positions, write_dicom_series
    from test_dicom_seg import LESION, PATIENT, make_seg, phantom

    image = phantom(spacing=(0.7, 0.9, 5.0))
    folder = write_dicom_series(tmp_path / "flair", image, uid="1.2.3.4.5", description="AX T2 FLAIR", number=7,
                                extra=PATIENT, positions=stepped_positions(image, _UNEVEN_STEPS))
    _, flair = make_seg(folder, tmp_path / "s.dcm")
    series, _ = io.choose_dicom_series(folder)
    mask = sitk.GetArrayFromImage(flair) >= LESION
    assert np.array_equal(sitk.GetArrayFromImage(io.read_mask(tmp_path / "s.dcm", flair, source=series)), mask)
    ds = pydicom.dcmread(tmp_path / "s.dcm")
    items = ds.PerFrameFunctionalGroupsSequence
    for item in items if frames == "every frame" else [items[1]]:
        source = item.DerivationImageSequence[0].SourceImageSequence[0]
        assert source.SpatialLocationsPreserved == "YES"
        source.SpatialLocationsPreserved = "NO"
    ds.save_as(tmp_path / "no.dcm")
    for given in (None, series):
        with pytest.raises(DeepWMLError, match=r"no\.dcm: the DICOM Segmentation has frames between slices.*do not "
                                               r"each name the source image they lie on"):
            io.read_mask(tmp_path / "no.dcm", flair, source=given)


# ---- a pair done before, rerun adding an output (change.done_pair, _missing_outputs, add_pair_outputs) -------------

def test_a_pair_rerun_adding_the_picture_reads_the_listed_label_map_and_keeps_the_reports_lists(tmp_path, monkeypatch,
                                                                                                capsys):
    """One pair (both masks given: nothing segmented) written with --output-format nrrd, its report listing
    followup_change.nrrd. By hand:
    - an edited copy of the map beside it as followup_change.nii.gz (not listed; .nii.gz comes before .nrrd in
      io.OUTPUT_EXTENSIONS): a rerun with --qc draws from the listed .nrrd, whose voxels are the report's: added;
    - the report as an older version wrote it (no labels_sha256) and the map holding 9, no call (LABELS are 1-7):
      refused as changed since (its labels are not calls), nothing drawn;
    - the map put back: --qc added, the report then recording the map's digest (mask_digest of its voxels), its
      outputs the earlier list and the picture, its outputs_added the earlier additions (here one set by hand,
      followup_change_seg.dcm) and the picture;
    - the listed followup_change.nrrd deleted, the stray .nii.gz there: the report's list says the map is gone,
      refused naming followup_change.nrrd (the older reports' rule, any image format, would take the .nii.gz).
    (Kills: the label map not taken from the report's list; an older report's labels not checked to be calls; the
    digest not recorded when outputs are added; the outputs list, or the outputs_added list, replaced by this run's
    additions; the report's list of outputs not used to find missing ones.)"""
    import json

    import SimpleITK as sitk

    from DeepWMLLib import io
    from DeepWMLLib.cli import main
    from test_change import _single_pair, _small_pair_manifest

    _, files = _small_pair_manifest(monkeypatch, tmp_path)
    out = tmp_path / "out"
    assert main(_single_pair(files, out, "--output-format", "nrrd")) == 0
    report_path, saved = out / "followup_change.json", out / "followup_change.nrrd"
    first = json.loads(report_path.read_text(encoding="utf-8"))
    assert "followup_change.nrrd" in first["outputs"] and "followup_change.nii.gz" not in first["outputs"]
    labels = sitk.ReadImage(str(saved))
    voxels = sitk.GetArrayFromImage(labels)

    def with_voxels(array):
        image = sitk.GetImageFromArray(array)
        image.CopyInformation(labels)
        return image

    edited = voxels.copy()
    edited[edited == 2] = 1  # a new lesion called stable
    sitk.WriteImage(with_voxels(edited), str(out / "followup_change.nii.gz"))
    capsys.readouterr()
    assert main(_single_pair(files, out, "--qc")) == 0
    assert "added followup_change_qc.png from the saved followup_change.nrrd" in capsys.readouterr().err
    (out / "followup_change_qc.png").unlink()

    older = json.loads(report_path.read_text(encoding="utf-8"))
    del older["labels_sha256"]
    older["outputs_added"] = ["followup_change_seg.dcm"]
    report_path.write_text(json.dumps(older), encoding="utf-8")
    stray = voxels.copy()
    stray[stray == 2] = 9
    sitk.WriteImage(with_voxels(stray), str(saved))
    assert main(_single_pair(files, out, "--qc")) == 1
    assert "followup_change.nrrd was changed since the run that made it" in capsys.readouterr().err
    assert not (out / "followup_change_qc.png").exists()

    sitk.WriteImage(labels, str(saved))
    assert main(_single_pair(files, out, "--qc")) == 0
    assert "added followup_change_qc.png from the saved followup_change.nrrd" in capsys.readouterr().err
    added = json.loads(report_path.read_text(encoding="utf-8"))
    assert added["labels_sha256"] == io.mask_digest(sitk.ReadImage(str(saved)))
    assert added["outputs"] == sorted(set(first["outputs"]) | {"followup_change_qc.png"})
    assert added["outputs_added"] == ["followup_change_qc.png", "followup_change_seg.dcm"]

    saved.unlink()
    assert main(_single_pair(files, out)) == 1
    assert ("followup_change.json is here but not its followup_change.nrrd (deleted?); rerun with --overwrite"
            in capsys.readouterr().err)


def test_a_dicom_pair_rerun_asking_for_a_seg_it_has_says_only_done_before(tmp_path, monkeypatch, capsys):
    """One pair whose follow-up is a DICOM series (a patient and study: a SEG can be made), run with --dicom-seg, then
    rerun with it: the SEG is there, nothing to add, so the pair is skipped as done, and the words on a follow-up
    that is not DICOM (no DICOM SEG, no DICOM outline series) are not said: this one is DICOM, its SEG made.
    (Kills: the warnings of a file follow-up said of a DICOM one.)"""
    pytest.importorskip("pydicom")
    import SimpleITK as sitk

    from DeepWMLLib.cli import main
    from conftest import write_dicom_series
    from test_change import SEG_PATIENT, _small_pair_manifest

    _, files = _small_pair_manifest(monkeypatch, tmp_path)
    study = write_dicom_series(tmp_path / "study", sitk.Cast(sitk.ReadImage(str(files["followup"])), sitk.sitkInt16),
                               uid="1.2.3.9", description="AX FLAIR", number=5, extra=SEG_PATIENT)
    run = ["change", str(files["baseline"]), str(study), "-o", str(tmp_path / "out"), "--baseline-mask",
           str(files["baseline_mask"]), "--followup-mask", str(files["followup_mask"]), "--dicom-seg"]
    assert main(run) == 0 and (tmp_path / "out" / "study_change_seg.dcm").is_file()
    capsys.readouterr()
    assert main(run + ["--dicom-outline"]) == 0  # the outline added
    assert "study: added - added study_change_outline_dicom" in capsys.readouterr().err
    assert main(run + ["--dicom-outline"]) == 0
    err = capsys.readouterr().err
    assert "study: skipped - done before (use --overwrite to redo)\n" in err and "not DICOM" not in err, err


def test_a_seg_nrrd_carrying_the_change_maps_header_words_is_read_by_its_segments_alone(tmp_path, caplog):
    """A .seg.nrrd is read by its segments (0/1), never as the change label map, even where its header carries the
    map's words (ITK_FileNotes 'DeepWML lesion change label map', put in here by hand as a tool copying the map's
    header would): its mask is its WMH segment, and no warning calls it the change label map.
    (Kills: a segmentation's mask passed through change_map_lesions.)"""
    import logging

    import numpy as np
    import SimpleITK as sitk

    from DeepWMLLib import io

    grid = sitk.Image(4, 3, 2, sitk.sitkUInt8)
    labels = np.zeros((2, 3, 4), np.uint8)
    labels[1, 1, 1:3] = 1
    image = sitk.GetImageFromArray(labels)
    image.CopyInformation(grid)
    path = tmp_path / "rater.seg.nrrd"
    io.write_label_segmentation(image, path, [(1, "WMH", (1, 0, 0))])
    data = path.read_bytes()
    first = data.index(b"\n") + 1
    path.write_bytes(data[:first] + f"{io._FILE_NOTES}:={io.CHANGE_MAP_NOTES}\n".encode() + data[first:])
    assert io.file_notes(path) == io.CHANGE_MAP_NOTES and io.segment_names(path) == ["WMH"]
    with caplog.at_level(logging.WARNING):
        mask = sitk.GetArrayFromImage(io.read_mask(path))
    assert mask.tolist() == labels.tolist()
    assert "change label map" not in caplog.text, caplog.text
