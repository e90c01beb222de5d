"""Session 50's mutation audit (mut50) of this session's new code: the outline-image verdicts kept by file status
(dicom_outline.is_outline_image, _status_key, remove_outline_series), io.reorders_onto / voxel_order_grid /
on_joint_extent, manifests separated by ';' (io.read_manifest_rows), the change summary's figures measured on one scan
(change._summary, _followup_ml, format_summary), the inverted-contrast verdict (contrast.flair_contrast, _high,
why_not_flair, contrast_warnings) and the Slicer Logic's refusal while a cancelled job ends (CoreLogic
refuseWhileEnding, _start, drop/heldNodes). Each test names the mutants it kills; expected values are worked out by
hand in the comments.

Mutants of the code as of 1db5252 and their fate (87 made by hand, one at a time, each run against the tests
covering its code; 56 killed before, 25 killed by these tests, 5 equivalent, 1 alive showing a bug, fixed):
  dicom_outline (22): killed before O3 fresh ignored, O5 no status re-check, O6 +3 s, O8 mtime only, O16 removal not
    fresh, O17 True kept, O18 or, O20 bound 0, O22 re-check of a vanished file only; killed here O1 clock after
    lstat, O2 links let through, O7 <=, O9 ctime only, O10 >, O11 never cleared, O12-O15 size/ctime/mtime/inode out of
    the key, O19 store's inode guard dropped, O21 re-check follows links (os.stat); equivalent O4 lookup's inode guard
    dropped (the store's guard keeps an inode-0 key out, so the lookup never finds one).
  io (16): killed before I1 early return dropped, I3, I4-I11 voxel_order_grid's flips/size-1/spacing/order/shape/
    direction, I12, I16 no seek; killed here I2 3D check 'and', I13 on_joint_extent without b's grid, I14 ';' taken
    beside ','; equivalent I15 (';' for a header with neither: one column either way, and every caller requires 3+).
  metrics (6): killed before M1-M5 (each predicate inverted or dropped); M6 (the FLAIR used whenever given) lived
    and showed a bug: both masks cropped to one box with the FLAIR given were numbered from the box, unsaid; fixed
    (metrics._one_grid: masks on one grid their lesions fill go onto the FLAIR's), test at the end.
  evaluation (3): killed before E1 repr of the numpy float, E2 >= 1; equivalent E3 '> 2' (pairs number C(n,2):
    1, 3, 6..., never 2).
  change (13): killed before C1, C4-C8, C10, C12; killed here C3 small gone on the follow-up, C9 brackets always,
    C11 stable's figures on the not-assessable line, C13 an old report's two-scan volume shown; equivalent C2 (gone
    and small gone rows are the baseline's alone).
  contrast, segment (13): killed before K1 0.95 (the sample negated, a slow test), K2, K3, K5, K6, K8, K9, K11, K12,
    S1; killed here K7 level 90 % of the way, K10 the share left out of the words; equivalent K4 (always sampling:
    a speed measure, the percentile of a strided sample).
  conftest (3): killed before G1, G2; killed here G3 ImportError raised.
  CoreLogic (11): killed before L1 (test_the_lesion_change_waits_for_a_segmentation_running), L2, L3, L4, L6, L8,
    L10, L11; killed here L5 startSegmentation's own refusal, L7 outputNode and L9 the change's nodes not let go.
"""
from __future__ import annotations

import importlib
import os
import shutil
import time

import pytest

from DeepWMLLib import dicom_outline, io

from conftest import counting_outline_reads


# ---- dicom_outline.is_outline_image: the verdicts kept ------------------------------------------------------------

@pytest.fixture(scope="module")
def _written(tmp_path_factory):
    """An outline series DeepWML wrote (6 images), once for the module."""
    from test_dicom_outline import _outline, oblique_flair

    tmp = tmp_path_factory.mktemp("outline50")
    folder, truth = oblique_flair(tmp)
    _outline(folder, truth, tmp / "own")
    return tmp / "own"


@pytest.fixture
def own(_written, tmp_path, monkeypatch):
    """A copy of the series, its images last changed (mtime and ctime) before the reading clock, which stands an hour
    on; each header read is counted (`own.reads`), no verdict kept from before."""
    folder = tmp_path / "own"
    shutil.copytree(_written, folder)
    reads = counting_outline_reads(monkeypatch)
    monkeypatch.setattr(io, "_now_ns", lambda: time.time_ns() + 3600 * 10**9)
    return folder, reads


def test_the_clock_is_read_before_the_files_status(own, monkeypatch):
    """The reading's time is taken before the file's status (io's rule): a clock taken after it counts the time spent
    on the status as the file's age. Here time jumps an hour once the status is read, the file changed moments
    before the reading: judged at the time before, it is not kept (read twice). (Kills: the clock after lstat.)"""
    folder, reads = own
    statted = []
    lstat = os.lstat

    def watched(path, *args, **kwargs):
        statted.append(path)
        return lstat(path, *args, **kwargs)

    monkeypatch.setattr(os, "lstat", watched)
    monkeypatch.setattr(io, "_now_ns", lambda: time.time_ns() + (3600 * 10**9 if statted else 0))
    first = folder / "IM00001.dcm"
    for _ in range(2):
        del statted[:]
        assert dicom_outline.is_outline_image(first)
    assert reads == [str(first)] * 2


def test_a_link_to_deepwmls_own_image_is_not_an_outline_image_nor_deleted(own, tmp_path):
    """A file, not a link: a symbolic link named as an image of the series and leading to DeepWML's own image is not
    DeepWML's (its reader would follow it), so the series' removal leaves it. (Kills: only folders refused.)"""
    folder, _ = own
    elsewhere = tmp_path / "elsewhere.dcm"
    shutil.copy(folder / "IM00001.dcm", elsewhere)
    link = folder / "IM00099.dcm"
    os.symlink(elsewhere, link)
    assert not dicom_outline.is_outline_image(link)
    assert not dicom_outline.is_outline_image(link, fresh=True)
    dicom_outline.remove_outline_series(folder)
    assert link.is_symlink() and [p.name for p in folder.iterdir()] == ["IM00099.dcm"]


@pytest.mark.parametrize("margin, kept", [(0, False), (1, True)])
def test_a_verdict_is_kept_only_for_a_file_changed_more_than_3_s_before_its_reading(own, monkeypatch, margin, kept):
    """The bound itself: a file last changed exactly io._RACY_NS (3 s) before the reading began is read again, 1 ns
    more and it is kept. (Kills: <= for <.)"""
    folder, reads = own
    first = folder / "IM00001.dcm"
    status = os.lstat(first)
    newest = max(status.st_mtime_ns, status.st_ctime_ns)
    monkeypatch.setattr(io, "_now_ns", lambda: newest + io._RACY_NS + margin)
    assert dicom_outline.is_outline_image(first) and dicom_outline.is_outline_image(first)
    assert len(reads) == (1 if kept else 2)


def test_a_modification_time_ahead_of_the_reading_keeps_no_verdict(own, monkeypatch):
    """Both times are judged: a file whose change time is long before the reading but whose modification time was
    set ahead of it (a copy keeping a clock-skewed server's time) is read again. (Kills: the change time alone.)"""
    folder, reads = own
    first = folder / "IM00001.dcm"
    changed = os.lstat(first).st_ctime_ns
    ahead = changed + 7200 * 10**9
    os.utime(first, ns=(ahead, ahead))
    changed = os.lstat(first).st_ctime_ns
    monkeypatch.setattr(io, "_now_ns", lambda: changed + 600 * 10**9)
    assert dicom_outline.is_outline_image(first) and dicom_outline.is_outline_image(first)
    assert len(reads) == 2


def test_the_verdicts_kept_are_forgotten_all_at_once_at_their_bound(own, monkeypatch):
    """At _VERDICTS_KEPT verdicts (here 2) the next one clears them first: 3 images read leave 1 kept. (Kills: > for
    >=; never cleared.)"""
    folder, _ = own
    monkeypatch.setattr(dicom_outline, "_VERDICTS_KEPT", 2)
    for name in ("IM00001.dcm", "IM00002.dcm"):
        assert dicom_outline.is_outline_image(folder / name)
    assert len(dicom_outline._VERDICTS) == 2
    assert dicom_outline.is_outline_image(folder / "IM00003.dcm")
    assert list(dicom_outline._VERDICTS) == [dicom_outline._status_key(folder / "IM00003.dcm")]


_EXTRA = ("st_atime", "st_mtime", "st_ctime", "st_atime_ns", "st_mtime_ns", "st_ctime_ns", "st_blksize", "st_blocks",
          "st_rdev")


@pytest.mark.parametrize("field", ["st_dev", "st_ino", "st_size", "st_mtime_ns", "st_ctime_ns"])
def test_a_file_whose_status_differs_in_any_part_of_its_key_is_read_again(own, monkeypatch, field):
    """The verdict is kept by device, inode, size, modification and change times: a file whose status differs in any
    one of them alone (as a file system keeping no change time of its own shows a rewrite) is read again. (Kills:
    each of them left out of the key.)"""
    folder, reads = own
    first = folder / "IM00001.dcm"
    assert dicom_outline.is_outline_image(first) and dicom_outline.is_outline_image(first)
    assert len(reads) == 1  # kept
    lstat = os.lstat

    def moved(path, *args, **kwargs):
        status = lstat(path, *args, **kwargs)
        if str(path) != str(first):
            return status
        sequence = list(status)
        extra = {name: getattr(status, name) for name in _EXTRA if hasattr(status, name)}
        if field in extra:
            extra[field] -= 10**9  # a second earlier: still long before the reading
        else:
            sequence[("st_mode", "st_ino", "st_dev", "st_nlink", "st_uid", "st_gid", "st_size").index(field)] += 1
        return os.stat_result(sequence, extra)

    monkeypatch.setattr(os, "lstat", moved)
    assert dicom_outline.is_outline_image(first)
    assert len(reads) == 2


def test_a_file_system_giving_every_file_inode_0_keeps_no_verdict(own, monkeypatch):
    """Where a file system gives no inode (0 for every file) the key does not tell files apart: nothing is kept, each
    reading reads. (Kills: the store's inode guard dropped; the lookup's guard alone then hides it.)"""
    folder, reads = own
    lstat = os.lstat

    def no_inode(path, *args, **kwargs):
        status = lstat(path, *args, **kwargs)
        sequence = list(status)
        sequence[1] = 0
        return os.stat_result(sequence, {name: getattr(status, name) for name in _EXTRA if hasattr(status, name)})

    monkeypatch.setattr(os, "lstat", no_inode)
    first = folder / "IM00001.dcm"
    assert dicom_outline.is_outline_image(first) and dicom_outline.is_outline_image(first)
    assert len(reads) == 2 and dicom_outline._VERDICTS == {}


def test_deepwmls_image_moved_aside_for_a_link_to_it_while_read_is_not_deleted(own, tmp_path, monkeypatch):
    """The status after the read is the name's own (lstat): DeepWML's image moved elsewhere while read and a link to
    it put in its place shows the moved file's status through the link (the same key), but the name is a link now,
    never deleted. (Kills: the status after the read following links, os.stat.)"""
    folder, _ = own
    first = folder / "IM00001.dcm"
    aside = tmp_path / "aside.dcm"
    reader = dicom_outline._reader

    def swapped(path, *args):
        if path == str(first) and not first.is_symlink():
            os.replace(first, aside)
            os.symlink(aside, first)
        return reader(path, *args)

    monkeypatch.setattr(dicom_outline, "_reader", swapped)
    dicom_outline.remove_outline_series(folder)
    assert first.is_symlink() and [p.name for p in folder.iterdir()] == ["IM00001.dcm"] and aside.is_file()


# ---- change: the summary's figures, each measured on one scan -----------------------------------------------------

def _row(status, scan, volume_ml, change_ml=None):
    return {"status": status, "scan": scan, "volume_ml": volume_ml, "change_ml": change_ml}


def test_each_calls_volume_is_summed_on_its_own_scan_by_hand():
    """Rows of every call written by hand: new 0.1, small new 0.01, enlarging 0.5 (grown 0.2), stable 0.3 seen on
    the follow-up and 0.1 kept on the baseline's side, not assessable 0.04 and 0.02 on the baseline's side, gone
    0.06, small gone 0.005 (both baseline rows). The follow-up's calls take their follow-up rows alone (0.3, 0.04),
    the gone ones their baseline rows; the baseline-side rows are counted and summed apart. (Kills: the follow-up
    rows' scan not required; small gone measured on the follow-up; not assessable given no baseline side; the side's
    count of every row; the side's volume of the follow-up rows; the scan test inverted.)"""
    from DeepWMLLib import change

    rows = [_row("new", "follow-up", 0.1, 0.1), _row("small new", "follow-up", 0.01, 0.01),
            _row("enlarging", "follow-up", 0.5, 0.2), _row("stable", "follow-up", 0.3, -0.1),
            _row("stable", "baseline", 0.1), _row("not assessable", "follow-up", 0.04),
            _row("not assessable", "baseline", 0.02), _row("gone", "baseline", 0.06, -0.06),
            _row("small gone", "baseline", 0.005, -0.005)]
    summary = change._summary(rows, 0.9, 0.95)
    assert {k: v for k, v in summary.items() if k.startswith(("n_", "new", "small", "enlarging", "stable", "not",
                                                              "gone"))} == {
        "n_new": 1, "new_ml": 0.1, "n_small_new": 1, "small_new_ml": 0.01, "n_enlarging": 1, "enlarging_ml": 0.5,
        "enlarging_growth_ml": 0.2, "n_stable": 2, "stable_ml": 0.3, "n_stable_baseline_side": 1,
        "stable_baseline_side_ml": 0.1, "n_not_assessable": 2, "not_assessable_ml": 0.04,
        "n_not_assessable_baseline_side": 1, "not_assessable_baseline_side_ml": 0.02, "n_gone": 1, "gone_ml": 0.06,
        "n_small_gone": 1, "small_gone_ml": 0.005}


def test_the_printed_summary_gives_baseline_only_lesions_apart_and_an_old_reports_volume_not_by_hand():
    """format_summary's stable and not assessable figures (_followup_ml): the follow-up volume, then the baseline-only
    lesions in brackets where there are any; a report written before they were given apart shows no volume.
    (Kills: the brackets always; the follow-up volume left out; stable's figures on the not assessable line; the
    stable figure left out; the old report's not-assessable volume of two scans shown.)"""
    from DeepWMLLib import change
    from test_change import _hand_report

    report = _hand_report(0.5, 0.75, 50.0, stable_ml=0.3, n_stable_baseline_side=0, stable_baseline_side_ml=0.0,
                          n_not_assessable=2, not_assessable_ml=0.05, n_not_assessable_baseline_side=1,
                          not_assessable_baseline_side_ml=0.02)
    lines = change.format_summary("p", report).splitlines()
    assert lines[1] == ("  new: 2 lesions, 0.12 ml; enlarging: 1 lesion, +0.07 ml; stable: 3 lesions, 0.30 ml; gone: "
                        "1 lesion, 0.04 ml")
    assert lines[2] == ("  not assessable (partly outside the other scan's field of view): 2 lesions, 0.05 ml on the "
                        "follow-up (1 of them on the baseline only, 0.02 ml there)")
    report.update(n_not_assessable=1, not_assessable_ml=0.0)  # its only lesion on the baseline: no 0.00 ml shown
    assert change.format_summary("p", report).splitlines()[2] == (
        "  not assessable (partly outside the other scan's field of view): 1 lesion, on the baseline only (0.02 ml "
        "there)")
    old = _hand_report(0.5, 0.75, 50.0, n_not_assessable=2, not_assessable_ml=0.05)
    assert change.format_summary("p", old).splitlines()[2] == (
        "  not assessable (partly outside the other scan's field of view): 2 lesions")


# ---- contrast: the inverted verdict's words -----------------------------------------------------------------------

def test_the_inverted_warning_gives_the_share_of_bright_voxels_outside_the_brain():
    """why_not_flair names the measured share (0.834: 83 %), not just the verdict. (Kills: the figure dropped.)"""
    from DeepWMLLib import contrast

    (warning,) = contrast.contrast_warnings({"looks_like": "inverted", "bright_outside_fraction": 0.834})
    assert "(83% of the voxels outside the brain nearer the image's top than the white matter's level;" in warning


# ---- io.reorders_onto ---------------------------------------------------------------------------------------------

def test_a_2d_image_against_a_3d_reference_and_back_is_not_reordered_onto_it():
    """Either image 2D and the other 3D: not on its grid, said without trying a 3D reorientation of the 2D one (as
    align_voxel_order leaves it). (Kills: both required 2D before answering False.)"""
    import SimpleITK as sitk

    flat, solid = sitk.Image([4, 5], sitk.sitkUInt8), sitk.Image([4, 5, 1], sitk.sitkUInt8)
    assert io.reorders_onto(flat, solid) is False and io.reorders_onto(solid, flat) is False
    assert io.grid_difference(io.align_voxel_order(flat, solid), solid) is not None


def test_a_mask_padded_onto_the_other_masks_grid_is_not_on_a_joint_extent():
    """on_joint_extent: a mask cropped to its lesions padded onto the other's whole grid is on that mask's grid (a
    scan's: its slice numbers hold), not on the extent of both. (Kills: the other mask's grid not checked.)"""
    import SimpleITK as sitk

    whole = sitk.Image([6, 6, 5], sitk.sitkUInt8)
    whole.SetSpacing((0.5, 0.5, 3.0))
    cropped = whole[1:4, 2:5, 1:3]
    common = io.onto_common_grid(cropped, whole, "a", "b")[1]
    assert io.grid_difference(common, whole) is None
    assert io.on_joint_extent(common, cropped, whole) is False


# ---- io.read_manifest_rows: ';' between columns only where the header holds no ',' --------------------------------

def test_a_header_holding_both_separators_is_read_with_commas(tmp_path):
    """A comma-separated manifest whose last column's name holds ';' (a note) is read with commas. (Kills: ';' taken
    wherever the header holds one.)"""
    manifest = tmp_path / "m.csv"
    manifest.write_text("case,prediction,reference,note; free text\na,p.nii.gz,r.nii.gz,x\n", encoding="utf-8")
    (line, row), = io.read_manifest_rows(manifest, ("case", "prediction", "reference"))
    assert line == 2 and (row["case"], row["prediction"], row["reference"]) == ("a", "p.nii.gz", "r.nii.gz")


@pytest.mark.parametrize("way, inverted", [(0.7, True), (0.4, False)])
def test_an_inverted_scan_is_told_by_its_outside_above_the_middle_to_its_top(way, inverted):
    """The bright level is the middle between the deep brain's level and the image's top (_high): a FLAIR phantom
    subtracted from its top (white matter at top - 300, air at the top) with 60 % of the voxels outside the brain put
    70 % of the way from the white matter to the top is inverted, all of its outside above the middle; put 40 % of
    the way, only the 40 % left at the top are above it, under INVERTED_BRIGHT_MIN (0.5): not inverted. (Kills: the
    level 90 % of the way.)"""
    import numpy as np

    from DeepWMLLib import contrast
    from test_contrast import SPACING, _head

    stack, inside, lesion = _head(1.25, 0.3)
    stack = stack.max() - stack
    top = float(stack.max())
    outside = np.flatnonzero(~inside)
    moved = np.random.default_rng(50).choice(outside, int(0.6 * outside.size), replace=False)
    stack.flat[moved] = top - 300 + way * 300
    check = contrast.flair_contrast(stack, inside, lesion, SPACING)
    assert (check["looks_like"] == "inverted") is inverted, check
    if inverted:
        assert check["bright_outside_fraction"] == 1.0


# ---- Testing/conftest.py: a pytest-xdist whose scheduler module has no LoadScopeScheduling --------------------------

def test_a_pytest_xdist_without_load_scope_scheduling_runs_the_tests_ungrouped_with_a_warning(tmp_path, monkeypatch):
    """The class itself gone from xdist.scheduler (renamed or moved in a later version): the import's ImportError is
    no failure of the run, the tests run ungrouped, warned. (Kills: the ImportError raised.)"""
    import sys
    import types

    import conftest
    from test_test_grouping import _config

    pytest.importorskip("xdist.scheduler")
    monkeypatch.setenv(conftest._GROUPS_FOLDER, str(tmp_path))
    monkeypatch.setitem(sys.modules, "xdist.scheduler", types.ModuleType("xdist.scheduler"))
    with pytest.warns(UserWarning, match="not grouped"):
        assert conftest.pytest_xdist_make_scheduler(_config(), None) is None


# ---- the Slicer Logic: a job started from Python while a cancelled one still ends ---------------------------------

class _Ending:
    """A job cancelled but still running in the background (BackgroundJob's fields that refuseWhileEnding reads)."""
    cancelled, done = True, False
    stillEnding = "the comparison cancelled just now is still ending its registration"


def test_the_logic_itself_refuses_a_segmentation_while_a_cancelled_job_ends(monkeypatch):
    """The widget refuses before asking anything, but DeepWMLCoreLogic.startSegmentation (the Python console's, a
    script's) refuses too, before reading the volume: the two jobs would share the CPU. (Kills: startSegmentation's
    own refusal dropped.)"""
    import sys
    import weakref
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent / "slicer" / "support"))
    importlib.import_module("slicer_fixtures")  # the stand-in slicer, DeepWML/ on the path (as the Slicer tests)
    from DeepWMLSlicerLib import CoreLogic
    from DeepWMLLib.errors import DeepWMLError

    logic = CoreLogic.DeepWMLCoreLogic()
    monkeypatch.setattr(logic, "ensureDependencies", lambda: None)
    monkeypatch.setattr(CoreLogic, "checkInputVolume", lambda volume: None)
    monkeypatch.setattr(CoreLogic.mrml, "imageFromVolume", lambda volume: pytest.fail("the volume was read"))
    ending = _Ending()
    CoreLogic.startedJobs().append(weakref.ref(ending))  # forgotten after the test (conftest)
    with pytest.raises(DeepWMLError, match="^the comparison cancelled just now is still ending its registration: "
                                           "segment once it has$"):
        logic.startSegmentation(object(), device="cpu")
    ending.done = True  # it has ended: the run goes on (to the volume, here refused by the stand-in)
    with pytest.raises(pytest.fail.Exception, match="the volume was read"):
        logic.startSegmentation(object(), device="cpu")


@pytest.mark.parametrize("kind, held", [("SegmentationJob", ("volumeNode", "outputNode")),
                                        ("SplitJob", ("volumeNode", "nodes", "again")),
                                        ("ChangeJob", ("volumeNode", "nodes"))])
def test_a_dropped_job_lets_go_of_every_node_and_call_back_it_holds(kind, held):
    """drop() (the widget cleaned up) cancels the job and lets go, on the calling thread, of what it holds of the
    scene and the GUI: a segmentation its volume and the output segmentation chosen to be replaced (the panel sets
    it), the split its volume, nodes and the statistics' call-back, the comparison its volume and nodes. (Kills: the
    output segmentation, or the comparison's nodes, left out of heldNodes.)"""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent / "slicer" / "support"))
    importlib.import_module("slicer_fixtures")
    from DeepWMLSlicerLib import CoreLogic

    cls = getattr(CoreLogic, kind)
    job = cls.__new__(cls)  # its fields alone: no scene needed
    job._cancelRequested, job._cancel = False, None
    for name in held:
        setattr(job, name, object())
    job.drop()
    assert job.cancelRequested() and all(getattr(job, name) is None for name in held)


# ---- metrics._one_grid: both masks cropped to one box, the FLAIR given ---------------------------------------------

def test_two_masks_cropped_to_the_same_box_count_slices_on_the_flair_when_given():
    """Both raters' masks saved cropped to one box (two segments of one segmentation, cropped together): on one grid,
    so the FLAIR given was never looked at and the slices were numbered from the box's first (the worst 1 and 4, the
    scan's 3 and 6), unsaid. With the FLAIR they are put on its grid, as masks on two extents are. (Found by the
    mutant M6: the FLAIR used whenever given.)"""
    import numpy as np
    import SimpleITK as sitk

    from DeepWMLLib.consensus import consensus_check
    from test_consensus import image, raters

    a, b = raters()
    k, j, i = (slice(n.min(), n.max() + 1) for n in np.nonzero(a | b))  # slices 2 to 6 of 0-7
    flair = sitk.GetImageFromArray(np.random.default_rng(0).normal(300, 30, a.shape).astype(np.float32))
    flair.CopyInformation(image(a))
    whole = consensus_check(image(a), image(b))
    cropped = consensus_check(image(a)[i, j, k], image(b)[i, j, k], flair=flair)
    assert whole["worst_slices"] == [3, 6] and cropped["worst_slices"] == [3, 6]
    assert cropped["dice"] == pytest.approx(whole["dice"])
