"""Mutation audit (mut48) of this session's new code: the journal of a run killed part way (segment.start_outputs,
finish_report, refuse_stopped, stopped_outputs, journal_outputs), the per-run DICOM header cache
(io.dicom_headers_read_once, _once_per_run and its bound), export's brain-model rules (segment.names_own_model,
asks_for_default_model, asks_for_no_model) and the Slicer Logic's split job (CoreLogic.startSplit, SplitJob,
finishSplit). Expected values are worked out by hand in the comments; each test names the mutants it kills.

Mutants left alive as equivalent are listed in the audit's report (the helper's final message)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import SimpleITK as sitk

from DeepWMLLib import io, segment
from DeepWMLLib.errors import DeepWMLError

from conftest import in_folder, make_volume, write_dicom_series


# ---- the journal of a run killed part way ------------------------------------------------------------------------

def _journal(out: Path, case: str = "a", **fields) -> Path:
    """A journal of `case` as start_outputs writes it, with `fields` (outputs, ...) replacing its own."""
    report = out / f"{case}_report.json"
    journal = {"journal": "DeepWML writes these outputs; a finished report replaces this file", "report": report.name,
               "case": case, "outputs": [f"{case}.seg.nrrd", f"{case}_report.json", f"{case}_wmh.nii.gz"],
               "started": "2026-12-07T12:00:00", **fields}
    path = segment.journal_path(report)
    path.write_text(json.dumps(journal), encoding="utf-8")
    return path


def test_a_journals_name_is_cut_only_past_180_bytes(tmp_path):
    """journal_path: `.` + the report's name less `.json` + `.deepwml-journal`; a stem of more than 180 bytes cut to
    160 bytes, then `~` and the first 16 hex digits of the whole stem's SHA-256 (so within 255 bytes, and two long
    cases never share one). A 180-byte stem (172-character case + `_report`... here a case of 173 ASCII characters:
    173 + 7 = 180 bytes) is kept whole; 181 bytes are cut. Kills J01 (cut past 18 bytes: every case of 12 or more
    characters renamed)."""
    import hashlib

    whole = "c" * 173
    assert segment.journal_path(tmp_path / f"{whole}_report.json").name == f".{whole}_report.deepwml-journal"
    assert segment.journal_path(tmp_path / "patient_0042_report.json").name == ".patient_0042_report.deepwml-journal"
    long_stem = "d" * 174 + "_report"  # 181 bytes
    cut = segment.journal_path(tmp_path / f"{long_stem}.json").name
    assert cut == "." + "d" * 160 + "~" + hashlib.sha256(long_stem.encode()).hexdigest()[:16] + ".deepwml-journal"
    assert len(cut.encode()) == 1 + 160 + 1 + 16 + 16


def test_a_journal_that_cannot_be_read_still_refuses_the_case_without_overwrite(tmp_path):
    """A journal that is not JSON (edited by hand, a disk error), or JSON but not an object, says a run was stopped
    part way though not which files it wrote: journal_outputs gives [] (not None), stopped_outputs keeps [] (the
    journal is not removed as stale: `_read_journal` gave {}), and refuse_stopped refuses the case, its message
    saying the journal cannot be read. Kills J04 (unreadable taken for no journal), J05 (a JSON list taken for no
    journal), J12 (an unreadable journal with nothing there removed as stale) and J15 (an empty list not refused)."""
    report = tmp_path / "a_report.json"
    journal = segment.journal_path(report)
    assert journal.name == ".a_report.deepwml-journal"  # `.` + the report's name less `.json` + the suffix
    for text in ("{not json", "[]", '"outputs"'):
        journal.write_text(text, encoding="utf-8")
        assert segment.journal_outputs(report) == []
        assert segment.stopped_outputs(report) == [] and journal.exists()
        with pytest.raises(DeepWMLError, match=r"an earlier run left an incomplete set of outputs \(its journal "
                                               r"cannot be read; no finished a_report\.json\)"):
            segment.refuse_stopped(report, False)
        segment.refuse_stopped(report, True)  # --overwrite: never refused
        assert journal.exists()


def test_a_stale_journal_is_removed_and_the_case_taken(tmp_path):
    """A readable journal none of whose listed files is there (killed before it wrote any: nothing to say), or whose
    `outputs` is not a list (no file named), is stale: stopped_outputs removes it and gives None, and refuse_stopped
    lets the case run. Kills J13 (the stale journal left) and J10 (outputs not a list taken for no journal: left)."""
    report = tmp_path / "a_report.json"
    for outputs in (["a_qc.png", "a_wmh.nii.gz"], "a_wmh.nii.gz", None):
        journal = _journal(tmp_path, outputs=outputs)
        if outputs == "a_wmh.nii.gz":
            (tmp_path / "a_wmh.nii.gz").write_bytes(b"a file not named by a list")
        segment.refuse_stopped(report, False)  # not refused
        assert not journal.exists(), outputs
        assert segment.stopped_outputs(report) is None


def test_a_journal_never_names_a_file_outside_outdir(tmp_path):
    """A name with a path in a journal (`../victim`, `sub/x`) is dropped (journal_outputs): with only such names
    listed, nothing the journal names is there, so the journal is stale (removed, the case taken), never a refusal
    naming a file outside OUTDIR. Kills J09 (names with a separator kept: `../victim` there, so refused)."""
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "victim").write_bytes(b"the user's")
    (out / "sub").mkdir()
    (out / "sub" / "x").write_bytes(b"mine")
    journal = _journal(out, outputs=["../victim", "sub/x", "..", ""])
    assert segment.journal_outputs(out / "a_report.json") == []
    segment.refuse_stopped(out / "a_report.json", False)
    assert not journal.exists() and (tmp_path / "victim").read_bytes() == b"the user's"


def test_a_listed_link_left_by_a_killed_run_counts_though_it_leads_nowhere(tmp_path):
    """stopped_outputs counts a listed file by os.path.lexists: a symbolic link the killed run left (an output name
    the user had linked elsewhere) is there even where its target is gone. Refused, naming it. Kills J11 (exists:
    the dangling link not counted, the journal removed and the case taken)."""
    if not hasattr(os, "symlink"):
        pytest.skip("no symbolic links")
    os.symlink(tmp_path / "gone.png", tmp_path / "a_qc.png")
    journal = _journal(tmp_path, outputs=["a_qc.png", "a_report.json"])
    with pytest.raises(DeepWMLError, match=r"incomplete set of outputs \(a_qc\.png; no finished a_report\.json\)"):
        segment.refuse_stopped(tmp_path / "a_report.json", False)
    assert journal.exists()


def test_a_journal_of_another_report_is_not_this_cases_and_one_naming_none_is(tmp_path):
    """_read_journal takes a journal at the case's journal path as the case's where its `report` is the case's report
    or absent, and not where it names another report (a journal copied in from elsewhere): ignored, left as it is,
    the case not refused. Kills J06 (any journal taken: refused) and J03 (a journal naming no report ignored: not
    refused)."""
    report = tmp_path / "a_report.json"
    (tmp_path / "a_qc.png").write_bytes(b"killed run's")
    journal = _journal(tmp_path, report="b_report.json", outputs=["a_qc.png"])
    assert segment.journal_outputs(report) is None
    segment.refuse_stopped(report, False)
    assert journal.exists()
    unnamed = {k: v for k, v in json.loads(journal.read_text(encoding="utf-8")).items() if k != "report"}
    journal.write_text(json.dumps(unnamed), encoding="utf-8")
    with pytest.raises(DeepWMLError, match=r"incomplete set of outputs \(a_qc\.png; no finished a_report\.json\)"):
        segment.refuse_stopped(report, False)


def test_a_run_stopped_part_way_and_cleaned_up_ends_its_journal(tmp_path):
    """Ctrl-C while a case's outputs are written: whole_or_none removes what the run wrote, then its journal, whose
    listed files are all gone (end_journal). Kills J24 (end_journal never removes) and J25 (not called)."""
    paths = segment.output_paths(tmp_path, "a", False)
    with pytest.raises(KeyboardInterrupt):
        with segment.whole_or_none(paths):
            segment.start_outputs(tmp_path, "a", paths, False)
            assert segment.journal_path(paths["report"]).exists()
            paths["mask"].write_bytes(b"half written")
            raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_folder_of_outputs_names_the_cases_only_a_journal_lists(tmp_path):
    """OUTDIR given back as INPUT holding a finished case a (its report) and the files of a case b killed part way
    (only its journal lists them; and a journal of a beside a's report, an --overwrite killed): the refusal counts
    2 cases, a and b, 1 of them (b) of a run stopped part way. Kills J29 (the stopped cases not counted: '1
    case(s): a')."""
    (tmp_path / "a_wmh.nii.gz").write_bytes(b"a")
    (tmp_path / "a_report.json").write_text(json.dumps({"outputs": ["a_report.json", "a_wmh.nii.gz"]}),
                                            encoding="utf-8")
    (tmp_path / "b_wmh.nii.gz").write_bytes(b"b")
    _journal(tmp_path, "b", outputs=["b_report.json", "b_wmh.nii.gz"])
    _journal(tmp_path, "a", outputs=["a_report.json", "a_wmh.nii.gz"])
    said = segment._only_outputs(tmp_path)
    assert "(2 case(s): a, b; 1 of a run stopped part way), no scan" in said, said


class _Killed(Exception):
    pass


def _journal_when_removing(monkeypatch, out, paths, **arguments) -> list[str]:
    """The `outputs` the journal lists when start_outputs (--overwrite) starts removing the earlier run's files."""
    seen = []

    def killed(*args, **kwargs):
        seen.append(json.loads(segment.journal_path(paths["report"]).read_text(encoding="utf-8")))
        raise _Killed()

    monkeypatch.setattr(segment, "remove_earlier_outputs", killed)
    with pytest.raises(_Killed):
        segment.start_outputs(out, "a", paths, True, **arguments)
    assert seen[0]["report"] == "a_report.json" and seen[0]["case"] == "a"
    return seen[0]["outputs"]


def test_overwrites_journal_lists_the_earlier_files_it_removes_before_removing_them(tmp_path, monkeypatch):
    """--overwrite of a case whose earlier report lists a picture and a probability map this run does not write:
    the journal, on disk before anything is removed, lists them beside this run's own three outputs, so that a run
    killed while removing them leaves none listed nowhere. Expected: this run's a.seg.nrrd, a_report.json,
    a_wmh.nii.gz and the earlier a_prob.nii.gz, a_qc.png (sorted); not a_notes.png (the user's, listed by no
    report), nor a_brain.nii.gz (listed by the earlier report, not there). Kills J16 (the stale outputs not listed),
    J18/J19 (the journal written after the removal, or not) and J27 (a listed file not there listed too)."""
    paths = segment.output_paths(tmp_path, "a", False)
    for name in ("a_wmh.nii.gz", "a.seg.nrrd", "a_prob.nii.gz", "a_qc.png", "a_notes.png"):
        (tmp_path / name).write_bytes(b"earlier")
    (tmp_path / "a_report.json").write_text(json.dumps({"outputs": [  # a_brain.nii.gz listed, not there
        "a.seg.nrrd", "a_brain.nii.gz", "a_prob.nii.gz", "a_qc.png", "a_report.json", "a_wmh.nii.gz"]}),
        encoding="utf-8")
    assert _journal_when_removing(monkeypatch, tmp_path, paths) == [
        "a.seg.nrrd", "a_prob.nii.gz", "a_qc.png", "a_report.json", "a_wmh.nii.gz"]


def test_overwrites_journal_keeps_listing_what_an_earlier_stopped_run_left_and_it_does_not_remove(tmp_path,
                                                                                                   monkeypatch):
    """An earlier run killed part way listed a_prob.nii.gz (still there); this --overwrite run cannot remove it
    (`possible` names none of its outputs: a command that writes no probability map), so its journal keeps listing
    it: killed in turn, the next run still knows the file for a stopped run's. Expected outputs: this run's three
    and a_prob.nii.gz. Kills J17 (the earlier journal's names not carried over)."""
    paths = segment.output_paths(tmp_path, "a", False)
    (tmp_path / "a_prob.nii.gz").write_bytes(b"killed run's")
    _journal(tmp_path, outputs=["a_prob.nii.gz", "a_report.json"])
    assert _journal_when_removing(monkeypatch, tmp_path, paths, possible=[]) == [
        "a.seg.nrrd", "a_prob.nii.gz", "a_report.json", "a_wmh.nii.gz"]


def test_finish_report_records_the_reports_digest_in_the_journal_before_the_report(tmp_path, monkeypatch):
    """finish_report writes the report's SHA-256 into the journal first, then the report, then removes the journal.
    Watched at the report's write: the journal there already holds the digest of the bytes written (hashlib of
    b'{"a": 1}', worked out independently below). Kills J22 (no digest) and J23 (the digest after the report)."""
    import hashlib

    report = tmp_path / "a_report.json"
    journal = _journal(tmp_path)
    seen = {}
    real = io.write_bytes

    def watched(data, path, *args, **kwargs):
        if Path(path) == report:
            seen["journal"] = json.loads(journal.read_text(encoding="utf-8"))
        return real(data, path, *args, **kwargs)

    monkeypatch.setattr(io, "write_bytes", watched)
    segment.finish_report(report, '{"a": 1}')
    assert seen["journal"]["report_sha256"] == hashlib.sha256(b'{"a": 1}').hexdigest()
    assert report.read_bytes() == b'{"a": 1}' and not journal.exists()


# ---- the per-run DICOM header cache --------------------------------------------------------------------------------

def _series_folder(folder: Path, uid="1.2.3.91") -> Path:
    image, _ = make_volume(size=(8, 8, 4), spacing=(1.0, 1.0, 5.0), dtype=sitk.sitkInt16)
    return write_dicom_series(folder, image, uid=uid, description="AX FLAIR", inversion_ms=2500, number=1)


def test_a_folder_of_exactly_the_bound_is_kept(tmp_path, header_reads, monkeypatch):
    """The bound counts a folder's entries: the folder itself and each of its files, 1 + 4 = 5 for a series of 4
    slices; an answer of at most the bound is kept. Bound 5: asked twice, each file read once ({1: 4}). Kills C05
    (< instead of <=: read twice, {2: 4})."""
    folder = _series_folder(tmp_path / "s")
    assert len(list(folder.iterdir())) == 4
    monkeypatch.setattr(io, "_HEADER_CACHE_FILES", 5)
    with io.dicom_headers_read_once():
        assert io.dicom_series(folder) == io.dicom_series(folder)
        assert len(io._header_cache) == 1
    assert in_folder(header_reads, folder) == {1: 4}


def test_a_file_rewritten_with_its_size_and_modification_time_kept_is_read_again(tmp_path, header_reads):
    """A slice rewritten in place by a copy keeping the source's times (cp -p, rsync -t) of the same size: its name,
    inode, size and modification time are as before; only its change time (ctime, set by the write) says it changed,
    and the folder is read again: its 4 files read twice ({2: 4}), the second answer naming the new description. Kills
    C12 (ctime left out of _folder_state: the earlier answer kept, read once)."""
    import time

    folder = _series_folder(tmp_path / "s", uid="1.2.3.96")
    with io.dicom_headers_read_once():
        assert [s.description for s in io.dicom_series(folder)] == ["AX FLAIR"]
        before = {p.name: p.stat() for p in folder.iterdir()}
        time.sleep(0.05)  # a change time of its own, on a file system counting in coarse steps
        for p in folder.iterdir():  # the description's bytes rewritten in place: the same size, the same inode
            data = p.read_bytes()
            assert data.count(b"AX FLAIR") == 1
            with open(p, "r+b") as f:
                f.write(data.replace(b"AX FLAIR", b"AX FLAIX"))
            os.utime(p, ns=(before[p.name].st_atime_ns, before[p.name].st_mtime_ns))
            assert p.stat().st_size == before[p.name].st_size and p.stat().st_ino == before[p.name].st_ino
            assert p.stat().st_mtime_ns == before[p.name].st_mtime_ns
        assert [s.description for s in io.dicom_series(folder)] == ["AX FLAIX"]
    assert in_folder(header_reads, folder) == {2: 4}


def test_a_file_changed_while_the_headers_are_read_is_read_again(tmp_path, monkeypatch):
    """The folder's state is taken before its headers are read: a file added while they are read (a copy still
    arriving) makes the next call read the folder again (2 readings), so the answer never lacks it. Kills C17 (the
    state taken after the reading: the answer kept as that of the folder with the new file, read once)."""
    folder = _series_folder(tmp_path / "s")
    readings = []
    scan = io._scan_series

    def arriving(root, recursive):
        found = scan(root, recursive)
        if not readings:
            (folder / "late.txt").write_text("arrived during the reading")
        readings.append(root)
        return found

    monkeypatch.setattr(io, "_scan_series", arriving)
    with io.dicom_headers_read_once():
        io.dicom_series(folder)
        io.dicom_series(folder)
        io.dicom_series(folder)
    assert len(readings) == 2


def test_an_answer_that_grew_past_the_bound_is_forgotten(tmp_path, monkeypatch):
    """A folder kept (5 entries, bound 6) that then grows past the bound (two files added: 7 entries) is read again
    and its earlier answer dropped, not left in the cache counted as 5. Kills C18 (the earlier entry left: the cache
    still holds the folder)."""
    folder = _series_folder(tmp_path / "s")
    monkeypatch.setattr(io, "_HEADER_CACHE_FILES", 6)
    with io.dicom_headers_read_once():
        io.dicom_series(folder)
        assert len(io._header_cache) == 1
        (folder / "x.txt").write_text("x")
        (folder / "y.txt").write_text("y")
        io.dicom_series(folder)
        assert io._header_cache == {}


# ---- export's brain-model rules ----------------------------------------------------------------------------------

def test_only_true_itself_asks_for_the_default_model():
    """asks_for_default_model is `spec is True` or the text "default": the number 1 (equal to True) is no such
    request but a value of the caller's choosing (refused where it is loaded), as is Path("default") (a model file
    so named). Kills E02 (`spec == True`: 1 taken for the default)."""
    assert segment.asks_for_default_model(True) and segment.asks_for_default_model("default")
    assert not segment.asks_for_default_model(1) and segment.names_own_model(1)
    assert not segment.asks_for_no_model(0) and segment.names_own_model(0)  # 0 == False, but not False
    assert segment.names_own_model(Path("default"))


# ---- the Slicer Logic's split job --------------------------------------------------------------------------------

sys.path.insert(0, str(Path(__file__).parent / "slicer" / "support"))
from slicer_fixtures import module, scene  # noqa: E402,F401 (fixtures)
from test_slicer_module import blockingNetworks, finishJob, widget  # noqa: E402,F401 (the panel's fixture, helpers)


def test_a_split_job_keeps_read_only_ventricles_lets_the_earlier_go_and_a_late_cancel_keeps_nothing(scene):
    """A finished split job: its ventricles kept read-only (every later update reads them: never flipped in place),
    its image let go. A job for another volume lets the kept work go when it starts (one volume's at a time). A
    Cancel that comes once the job had finished (its networks done) keeps nothing: finishSplit raises Cancelled.
    Without a volume, no job (None). Kills S05 (writable), S06 (the image kept), S09 (the earlier volume's work held
    while the next runs), S03 (a late cancel kept) and S20 (no volume: a job started on none, failing)."""
    from DeepWMLLib.errors import Cancelled

    from DeepWMLSlicerLib import MRMLConversion as mrml
    from DeepWMLSlicerLib.CoreLogic import DeepWMLCoreLogic

    from conftest import REPO

    flair, truth = make_volume(spacing=(0.9, 0.9, 5.0), blobs=((0.3, 0.6, 0.5, 6.0),))
    model = str(REPO / "Resources" / "Models" / "deepwml_vent8_synth_v1.pt")
    logic = DeepWMLCoreLogic()
    volumes = [mrml.volumeFromImage(flair, name) for name in ("FLAIR", "FLAIR 2")]
    manuals = [mrml.segmentationFromMask(truth, volume, name="manual") for volume in volumes]
    assert logic.startSplit(manuals[0], None, ventricleModel=model, device="cpu") is None  # no volume: no networks
    job = logic.startSplit(manuals[0], volumes[0], ventricleModel=model, device="cpu")
    assert job.wait(60) and logic.finishSplit(job) is True
    assert job.image is None
    ventricles = logic._locationInputs[1]["ventricles"]
    assert ventricles.dtype == bool and not ventricles.flags.writeable
    job = logic.startSplit(manuals[1], volumes[1], ventricleModel=model, device="cpu")
    assert job is not None and logic._locationInputs is None  # let go as the next volume's networks start
    assert job.wait(60) and job.error is None and job.result is not None
    job.cancel()  # after the networks' last look
    assert job.cancelled
    with pytest.raises(Cancelled):
        logic.finishSplit(job)
    assert logic._locationInputs is None


def test_a_pair_whose_overwrite_was_killed_beside_its_old_report_is_never_done(tmp_path):
    """deepwml change --overwrite killed after its journal, before it removed the pair's earlier report: the old
    report is there, but the journal says a run stopped part way; done_pair refuses the pair (never skipped as
    done) without --overwrite, and takes nothing as done with it (None: redone). Kills J32 (done_pair's refusal
    dropped)."""
    import types

    from DeepWMLLib import change

    report = tmp_path / "followup_change.json"
    report.write_text(json.dumps({"outputs": ["followup_change.json", "followup_change_qc.png"]}), encoding="utf-8")
    (tmp_path / "followup_change_qc.png").write_bytes(b"killed run's")
    segment.journal_path(report).write_text(json.dumps({"report": report.name, "case": "followup", "outputs": [
        "followup_change.json", "followup_change_qc.png"]}), encoding="utf-8")
    entry = {"case": "followup", "baseline": "b.nii.gz", "followup": "f.nii.gz", "baseline_mask": None,
             "followup_mask": None}
    with pytest.raises(DeepWMLError, match=r"incomplete set of outputs \(followup_change\.json, "
                                           r"followup_change_qc\.png; no finished followup_change\.json\).*redo the "
                                           r"pair"):
        change.done_pair(types.SimpleNamespace(overwrite=False), tmp_path, "followup", entry, {})
    assert change.done_pair(types.SimpleNamespace(overwrite=True), tmp_path, "followup", entry, {}) is None


def test_each_caller_gets_its_own_copy_of_a_kept_answer(tmp_path):
    """_read_series within a run: the answer (series dict, notes list) each caller gets is its own, so one changing it
    in place (a list sorted, an entry taken out) changes neither the answer kept nor another caller's. The first
    reading's answer emptied, then the second's: the third is still the folder's one series, 4 files. Kills C03 (the
    first reading's answer kept as it is) and C02 (the kept answer itself given out)."""
    folder = _series_folder(tmp_path / "s", uid="1.2.3.92")
    with io.dicom_headers_read_once():
        for _ in range(2):
            series, notes = io._read_series(folder, False)
            assert list(series) == ["1.2.3.92"] and len(series["1.2.3.92"]["files"]) == 4
            series["1.2.3.92"]["files"].clear()
            series.clear()
            notes.append("changed by a caller")
        series, notes = io._read_series(folder, False)
    assert list(series) == ["1.2.3.92"] and len(series["1.2.3.92"]["files"]) == 4
    assert "changed by a caller" not in notes


def test_a_pair_killed_before_its_report_lists_its_outline_series_in_its_journal(tmp_path, monkeypatch):
    """deepwml change --dicom-outline of a DICOM follow-up killed as it is about to write its report (the outline
    series written): the pair's journal lists the outline series' folder (followup_change_outline_dicom) beside the
    pair's files, so that the next run refuses it as a run stopped part way and --overwrite removes it. Kills J39
    (start_outputs given the pair's paths without the outline folder: the series listed nowhere)."""
    import contextlib

    from DeepWMLLib.cli import main

    from conftest import memoize_alignments

    memoize_alignments(monkeypatch)
    flair, truth = make_volume(size=(48, 48, 8), spacing=(1.0, 1.0, 4.0), blobs=((0.4, 0.5, 0.5, 5.0),))
    baseline = tmp_path / "baseline.nii.gz"
    sitk.WriteImage(flair, str(baseline))
    series = write_dicom_series(tmp_path / "followup", sitk.Cast(flair, sitk.sitkInt16), uid="1.2.3.93",
                                description="AX FLAIR", number=4, extra={"0020|000d": "1.2.3.930"})
    for name in ("baseline_mask", "followup_mask"):
        sitk.WriteImage(truth, str(tmp_path / f"{name}.nii.gz"))
    out = tmp_path / "out"
    real = io.write_atomically

    def killed(path, how):  # the process dies as it is about to write the pair's report: nothing after it runs
        if os.path.basename(str(path)) == "followup_change.json":
            raise SystemExit(137)
        return real(path, how)

    monkeypatch.setattr(io, "write_atomically", killed)
    monkeypatch.setattr(segment, "whole_or_none", lambda paths: contextlib.nullcontext())
    with pytest.raises(SystemExit):
        main(["change", str(baseline), str(series), "-o", str(out), "--baseline-mask",
              str(tmp_path / "baseline_mask.nii.gz"), "--followup-mask", str(tmp_path / "followup_mask.nii.gz"),
              "--dicom-outline"])
    assert (out / "followup_change_outline_dicom").is_dir() and not (out / "followup_change.json").exists()
    listed = json.loads(segment.journal_path(out / "followup_change.json").read_text(encoding="utf-8"))["outputs"]
    assert "followup_change_outline_dicom" in listed and "followup_change.json" in listed


def test_segment_cases_called_from_python_reads_a_series_folders_headers_once(tmp_path, tiny_model, header_reads):
    """segment_cases (the library's call, not through the CLI, whose run holds the cache itself) of one DICOM study
    folder with series="FLAIR": its series checked up front, then chosen for its case; each of its 10 files' headers
    read once ({1: 10}), as deepwml segment reads them. Kills C20 (segment_cases without its own
    dicom_headers_read_once: read twice, {2: 10})."""
    image, _ = make_volume(size=(28, 24, 5), spacing=(0.9, 0.9, 5.0), dtype=sitk.sitkInt16)
    study = write_dicom_series(tmp_path / "study", image, uid="1.2.3.94", description="AX T2 FLAIR",
                               inversion_ms=2500, repetition_ms=9000, number=2, prefix="f")
    write_dicom_series(study, image, uid="1.2.3.95", description="AX T1 SE", number=1, prefix="t")
    assert io._header_cache is None  # no run around this call
    rows = segment.segment_cases([study], tmp_path / "out", [str(tiny_model)], device="cpu", series="FLAIR",
                                 brain_model=None, ventricle_model=None)
    assert [row["status"] for row in rows] == ["ok"]
    assert in_folder(header_reads, study) == {1: 10}


def test_consensus_and_evaluate_called_from_python_read_the_flair_folder_once(tmp_path, header_reads):
    """consensus_check and evaluate_case (library calls, outside any CLI run) of two raters' DICOM SEGs placed by one
    FLAIR folder of 7 slices: each SEG placed by the folder, whose 7 headers are read once per call ({1: 7}), not
    once per SEG ({2: 7}). Kills C22 (consensus_check without its own dicom_headers_read_once)."""
    pytest.importorskip("pydicom")
    pytest.importorskip("highdicom")
    from test_dicom_seg_mask import highdicom_seg, sparse_seg_of_an_uneven_series

    from DeepWMLLib.consensus import consensus_check
    from DeepWMLLib.evaluation import evaluate_case

    folder, _, _, mask, _ = sparse_seg_of_an_uneven_series(tmp_path)
    other = mask.copy()
    other[4] = 0
    highdicom_seg(folder, tmp_path / "rater_b.dcm", {"WMH": other})
    header_reads.clear()
    result = consensus_check(tmp_path / "rater.dcm", tmp_path / "rater_b.dcm", flair=folder)
    assert in_folder(header_reads, folder) == {1: 7} and result["dice"] < 1
    header_reads.clear()
    evaluate_case(tmp_path / "rater_b.dcm", tmp_path / "rater.dcm", flair=folder)
    assert in_folder(header_reads, folder) == {1: 7}


def test_the_kept_split_is_kept_by_the_brain_mask_switch_and_bf16_refused_in_the_panels_words(scene, monkeypatch):
    """The ventricles are gated by the brain mask when it is ticked: the networks' work kept for the ticked switch is
    not that of the unticked one (startSplit runs them again: a job), while the same switch finds it kept (None).
    A split asked for with Precision bf16 on a CPU that does not compute it: finishSplit says so in the panel's
    words (Precision, not --precision), the runtime's PrecisionUnavailable as its cause. Kills S13 (the switch left
    out of the key: the ticked work taken for the unticked) and S19 (the runtime's words raised as they are)."""
    from DeepWMLLib import inference
    from DeepWMLLib.inference import PrecisionUnavailable

    from DeepWMLSlicerLib import MRMLConversion as mrml
    from DeepWMLSlicerLib.CoreLogic import DeepWMLCoreLogic

    from conftest import REPO

    flair, truth = make_volume(spacing=(0.9, 0.9, 5.0), blobs=((0.3, 0.6, 0.5, 6.0),))
    volume = mrml.volumeFromImage(flair, "FLAIR")
    manual = mrml.segmentationFromMask(truth, volume, name="manual")
    model = str(REPO / "Resources" / "Models" / "deepwml_vent8_synth_v1.pt")
    logic = DeepWMLCoreLogic()
    arguments = dict(segmentationNode=manual, volumeNode=volume, ventricleModel=model, device="cpu", brainMask=True)
    job = logic.startSplit(**arguments)
    assert job.wait(60) and logic.finishSplit(job) is True
    assert logic.startSplit(**arguments) is None
    job = logic.startSplit(**{**arguments, "brainMask": False})
    assert job is not None and job.wait(60) and logic.finishSplit(job) is True

    monkeypatch.setattr(inference, "torch_cpu_has_native_bf16", lambda: False)

    def noOpenVino(*args, **kwargs):  # a Slicer without OpenVINO: PyTorch runs the networks
        raise ImportError("openvino")

    monkeypatch.setattr(inference, "OpenVinoRunner", noOpenVino)
    job = logic.startSplit(**{**arguments, "precision": "bf16"})
    assert job is not None and job.wait(60)
    with pytest.raises(DeepWMLError) as raised:
        logic.finishSplit(job)
    assert str(raised.value) == ("Precision bf16 needs a CPU that computes bf16 natively (AMX or AVX512-BF16), and "
                                 "this computer's does not: choose Precision: auto or fp32 (below Device) and segment "
                                 "again")
    assert isinstance(raised.value.__cause__, PrecisionUnavailable) and logic._locationInputs is None


def test_statistics_that_waited_for_the_split_show_rows_of_the_clicks_volume(widget, monkeypatch):
    """Statistics clicked on volume FLAIR wait for the split's networks; the input volume is set to another meanwhile
    (by a script: the selector is disabled while a job runs). The statistics shown are the click's, and so is the
    volume whose slices their table's rows show (widget._tableVolume: FLAIR, not the other). Kills W10 (the rows
    taken for the volume chosen when the networks finished)."""
    from DeepWMLSlicerLib import MRMLConversion as mrml

    ui, p = widget.ui, widget._parameterNode
    p.outputSegmentation = mrml.segmentationFromMask(widget.truth, widget.volume, name="manual")
    p.device, p.ventricleSplit = "cpu", True
    started, gate, runs = blockingNetworks(monkeypatch)
    ui.showStatisticsButton.click()
    assert started.wait(10)
    flair, _ = make_volume(spacing=(0.9, 0.9, 5.0))
    other = mrml.volumeFromImage(flair, "other")
    p.inputVolume = other
    gate.set()
    finishJob(widget)
    assert len(runs) == 1 and widget._results["report"]["volume"] == "FLAIR"
    assert widget._tableVolume is widget.volume and p.inputVolume is other
