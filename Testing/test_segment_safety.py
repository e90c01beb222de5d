"""`deepwml segment` when its surroundings misbehave: OUTDIR is the input folder, another scan of the same
name was done there, another process writes the same case, a run is interrupted or stopped, names are
too long or not UTF-8, files cannot be read. Inputs are never written over nor deleted, and no earlier or
foreign result is taken for this scan's."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal

import numpy as np
import pytest
import SimpleITK as sitk

from DeepWMLLib import io
from DeepWMLLib.cli import Stopped, main
from DeepWMLLib.errors import DeepWMLError
from DeepWMLLib.segment import segment_cases

from conftest import another_run_holds, make_volume, write_dicom_series


def write_case(folder, name, size=(32, 32, 4), **kwargs):
    folder.mkdir(parents=True, exist_ok=True)
    image, _ = make_volume(size=size, **kwargs)
    path = folder / f"{name}.nii.gz"
    sitk.WriteImage(sitk.Cast(image, sitk.sitkUInt16), str(path))
    return path


def two_cases(tmp_path):
    """Cases a and b (another head) in tmp_path/scans, and the OUTDIR of the runs, tmp_path/out (not made)."""
    folder = tmp_path / "scans"
    write_case(folder, "a")
    write_case(folder, "b", seed=3)
    return folder, tmp_path / "out"


def summary(out):
    with open(out / "summary.csv", newline="", encoding="utf-8-sig") as f:
        return {row["case"]: row for row in csv.DictReader(f)}


def segment(tiny_model, *arguments):
    return main(["segment", *map(str, arguments), "--model", str(tiny_model), "--device", "cpu"])


def test_overwrite_in_the_input_folder_never_deletes_a_scan_named_like_an_output(tmp_path, tiny_model):
    """FSL's brain extraction names its result X_brain.nii.gz, as DeepWML names a brain mask: with OUTDIR the
    input folder, that scan stays a case on every rerun and --overwrite leaves it alone."""
    folder = tmp_path / "scans"
    write_case(folder, "a")
    scan = write_case(folder, "a_brain", seed=4)
    content = scan.read_bytes()
    assert segment(tiny_model, folder, "-o", folder) == 0
    assert set(summary(folder)) == {"a", "a_brain"}
    assert segment(tiny_model, folder, "-o", folder) == 0
    assert {case: row["status"] for case, row in summary(folder).items()} == {"a": "skipped", "a_brain": "skipped"}
    assert segment(tiny_model, folder, "-o", folder, "--overwrite") == 0
    assert scan.read_bytes() == content
    assert {case: row["status"] for case, row in summary(folder).items()} == {"a": "ok", "a_brain": "ok"}
    assert json.loads((folder / "a_report.json").read_text())["outputs"] == ["a.seg.nrrd", "a_report.json",
                                                                             "a_wmh.nii.gz"]


def test_an_output_name_taken_by_a_scan_given_is_refused_not_written_over(tmp_path, tiny_model, capsys):
    folder = tmp_path / "scans"
    write_case(folder, "p1")
    mine = write_case(folder, "p1_wmh", seed=2)  # the user's own file of that name, no report beside it
    content = mine.read_bytes()
    for extra in ([], ["--overwrite"]):
        assert segment(tiny_model, folder, "-o", folder, *extra) == 1
        assert mine.read_bytes() == content
        assert "p1_wmh.nii.gz in" in capsys.readouterr().err
        assert summary(folder)["p1"]["status"] == "error"


def test_a_rerun_with_another_scan_of_the_same_name_is_not_skipped_as_done(tmp_path, tiny_model, capsys):
    first = write_case(tmp_path / "p1", "FLAIR")
    second = write_case(tmp_path / "p2", "FLAIR", seed=9, blobs=())
    out = tmp_path / "out"
    assert segment(tiny_model, first, "-o", out) == 0
    report = json.loads((out / "FLAIR_report.json").read_text())
    assert report["input_absolute"] == str(first.resolve())
    assert segment(tiny_model, first, "-o", out) == 0  # the same scan: skipped
    assert summary(out)["FLAIR"]["status"] == "skipped"
    capsys.readouterr()
    assert segment(tiny_model, second, "-o", out) == 1
    assert "holds the results of another scan named 'FLAIR'" in capsys.readouterr().err
    assert summary(out)["FLAIR"]["volume_ml"] == ""  # not the other scan's figures
    assert segment(tiny_model, second, "-o", out, "--overwrite") == 0
    assert json.loads((out / "FLAIR_report.json").read_text())["input"] == str(second)


def test_a_case_another_process_is_writing_is_left_to_it_and_the_lock_goes_after(tmp_path, tiny_model, capsys):
    """Left to the process writing it: skipped, not failed (exit 0), saying so on screen and in summary.csv."""
    path = write_case(tmp_path, "a")
    out = tmp_path / "out"
    out.mkdir()
    with io.exclusive(out / ".a.deepwml-lock", "the other run"):
        assert segment(tiny_model, path, "-o", out) == 0
        assert "a: skipped - being written by another DeepWML process now, so left to it" in capsys.readouterr().err
        assert not (out / "a_report.json").exists()
        row = summary(out)["a"]
        assert (row["status"], row["volume_ml"]) == ("skipped", "")
        assert row["error"].startswith("being written by another DeepWML process now")
    assert segment(tiny_model, path, "-o", out) == 0
    assert summary(out)["a"]["status"] == "ok"
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no lock file left


def test_two_runs_into_one_outdir_each_list_the_cases_the_other_wrote(tmp_path, tiny_model):
    """Two runs of the same cases into one OUTDIR: each case is written by one of them, and the summary.csv of
    the run that ends last (which replaces the other's) lists every case with its figures, none an error.
    Here the other run holds case a while this run reaches it, then writes it and ends before this one does."""
    folder, out = two_cases(tmp_path)
    out.mkdir()
    other = io.exclusive(out / ".a.deepwml-lock", "the other run")
    other.__enter__()

    class Other:  # when this run has left case a, the other run finishes it
        def __call__(self, number, total, case):
            return None

        def finish(self, row):
            if row["case"] == "a":
                assert row["status"] == "skipped"
                other.__exit__(None, None, None)
                assert segment(tiny_model, folder / "a.nii.gz", "-o", out) == 0

    rows = segment_cases([str(folder)], out, [str(tiny_model)], "cpu", progress_factory=Other())
    assert {row["case"]: row["status"] for row in rows} == {"a": "skipped", "b": "ok"}
    listed = summary(out)
    report = json.loads((out / "a_report.json").read_text())
    assert listed["a"]["status"] == "skipped"
    assert listed["a"]["error"].startswith("written by another DeepWML process into this OUTDIR during this run")
    assert float(listed["a"]["volume_ml"]) == pytest.approx(report["volume_ml"])
    assert listed["a"]["lesion_count"] == str(report["lesion_count"])
    assert listed["b"]["status"] == "ok"
    assert segment(tiny_model, folder, "-o", out) == 0  # both done: a rerun skips both as done
    assert {case: row["status"] for case, row in summary(out).items()} == {"a": "skipped", "b": "skipped"}


def test_a_case_done_before_that_the_other_run_only_skipped_is_listed_as_done_before(tmp_path, tiny_model):
    """A case done before both runs, which the other run held only to skip it as done when this run reached it, was
    listed as "written by another DeepWML process into this OUTDIR during this run": its report was there, unchanged,
    when this run reached it, so it is listed as any case done before is."""
    folder, out = two_cases(tmp_path)
    assert segment(tiny_model, folder / "a.nii.gz", "-o", out) == 0
    # when this run has left case a, the other run has skipped it and goes on
    Bar = another_run_holds(out, note="the other run, skipping a")
    segment_cases([str(folder)], out, [str(tiny_model)], "cpu", progress_factory=Bar())
    listed = summary(out)["a"]
    assert listed["status"] == "skipped"
    assert listed["error"].startswith("outputs exist (") and "use --overwrite to replace them" in listed["error"], \
        listed["error"]
    assert float(listed["volume_ml"]) == pytest.approx(json.loads((out / "a_report.json").read_text())["volume_ml"])


def test_overwrite_redoes_at_the_end_a_case_done_before_that_the_other_run_only_skipped(tmp_path, tiny_model):
    """With --overwrite, a case done before that the other run held only to skip it was listed "outputs exist (...);
    use --overwrite to replace them", the run given --overwrite ending 0 with that case's old outputs unreplaced.
    Nobody replaced them meanwhile (its report unchanged), so this run does, at the end."""
    folder, out = two_cases(tmp_path)
    assert segment(tiny_model, folder / "a.nii.gz", "-o", out) == 0
    before = os.stat(out / "a_report.json")
    # when this run has left case a, the other run has skipped it and goes on
    Bar = another_run_holds(out, note="the other run, skipping a",
                            when=lambda row: row["error"].startswith("being written by another"))
    segment_cases([str(folder)], out, [str(tiny_model)], "cpu", progress_factory=Bar(), overwrite=True)
    listed = summary(out)["a"]
    assert (listed["status"], listed["error"]) == ("ok", ""), listed
    after = os.stat(out / "a_report.json")
    assert (after.st_ino, after.st_mtime_ns) != (before.st_ino, before.st_mtime_ns)


def test_a_case_the_other_run_failed_on_is_segmented_by_this_one_at_the_end(tmp_path, tiny_model, capsys):
    """The other run into OUTDIR held case a, then failed on it (its lock released, no outputs left: whole_or_none).
    This run left a `skipped` and exited 0, so the cohort looked done with a never segmented. Now the end-of-run
    look at a finds its lock free and no result: this run segments it then, and says so."""
    folder, out = two_cases(tmp_path)
    out.mkdir()
    Bar = another_run_holds(out)  # when this run has left case a, the other run fails on it
    capsys.readouterr()
    rows = segment_cases([str(folder)], out, [str(tiny_model)], "cpu", progress_factory=Bar())
    err = capsys.readouterr().err
    assert {row["case"]: row["status"] for row in rows} == {"a": "ok", "b": "ok"}
    assert (out / "a_report.json").exists() and (out / "a_wmh.nii.gz").exists()
    assert {case: row["status"] for case, row in summary(out).items()} == {"a": "ok", "b": "ok"}
    assert "a: skipped - being written by another DeepWML process now" in err
    lines = err.splitlines()
    assert [line.split(" - ")[0] for line in lines if " - " in line] == ["a: skipped", "b: ok", "a: ok"]


def test_a_case_still_locked_at_the_end_says_how_to_clear_a_lock_left_behind(tmp_path, tiny_model, capsys):
    """A case whose lock is still held when the run ends stays left to the process holding it (exit 0), and its row
    names the lock file and when to delete it: a process on another computer sharing OUTDIR (NFS, SMB) that died
    can leave its lock held, and every rerun then skipped the case without a word on why or what to do."""
    path = write_case(tmp_path, "a")
    out = tmp_path / "out"
    out.mkdir()
    with io.exclusive(out / ".a.deepwml-lock", "the other run"):
        assert segment(tiny_model, path, "-o", out) == 0
        row = summary(out)["a"]
        assert row["status"] == "skipped"
        assert row["error"].startswith("being written by another DeepWML process now, so left to it")
        assert f"its lock, {out / '.a.deepwml-lock'}, was still held at the end of this run" in row["error"]
        assert row["error"].endswith("delete that file and run again")
        (out / ".a.deepwml-lock").unlink()  # what the row says to do: the lock, still held, no longer stops a run
        assert segment(tiny_model, path, "-o", out) == 0
        assert summary(out)["a"]["status"] == "ok"


def test_a_case_another_run_wrote_that_cannot_be_checked_is_an_error_not_the_end_of_the_run(tmp_path, tiny_model,
                                                                                            monkeypatch, capsys):
    """Looked at again at the end of the run, a case the other run wrote whose result could not be checked for a
    reason other than DeepWML's own (here its report not to be read: PermissionError) ended the run with a
    traceback-like 'internal error', without the final line and with the other cases' rows never rewritten. Now
    its row is an error that says what happened and what to do, and the run ends as it does (exit 1, its total)."""
    from DeepWMLLib import segment as segment_module

    folder, out = two_cases(tmp_path)
    out.mkdir()
    def unreadable(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(out / "a_report.json"))

    def done_by_the_other(row):
        assert segment(tiny_model, folder / "a.nii.gz", "-o", out) == 0
        monkeypatch.setattr(segment_module, "check_earlier_result", unreadable)

    Bar = another_run_holds(out, then=done_by_the_other)  # when this run has left case a, the other run does it

    monkeypatch.setattr(segment_module, "ProgressBar", Bar)
    capsys.readouterr()
    assert segment(tiny_model, folder, "-o", out) == 1
    err = capsys.readouterr().err
    assert f"1/2 cases done (1 failed, 0 skipped), summary in {out / 'summary.csv'}" in err, err
    rows = summary(out)
    assert (rows["a"]["status"], rows["b"]["status"]) == ("error", "ok")
    assert rows["a"]["error"].startswith("written by another DeepWML process during this run, but its results could "
                                         "not be checked (PermissionError: [Errno 13] Permission denied: ")
    assert rows["a"]["error"].endswith("run again to check them, or with --overwrite to redo the case")


def test_a_cancel_while_a_case_another_run_wrote_is_checked_stops_the_run(tmp_path, tiny_model, monkeypatch):
    """The end-of-run look at a case another run wrote turned every exception into the case's error row, a cancel
    (Cancelled, from a library caller's cancel check or the Slicer module's Cancel) too: the run went on as if
    not cancelled. A cancel now stops it, as it does anywhere else."""
    import io as stdio

    from DeepWMLLib import segment as segment_module
    from DeepWMLLib.errors import Cancelled

    folder, out = two_cases(tmp_path)
    out.mkdir()
    def cancelled(*args, **kwargs):
        raise Cancelled("cancelled")

    def done_by_the_other(row):
        assert segment(tiny_model, folder / "a.nii.gz", "-o", out) == 0
        monkeypatch.setattr(segment_module, "check_earlier_result", cancelled)

    Bar = another_run_holds(out, then=done_by_the_other)  # when this run has left case a, the other run does it

    with pytest.raises(Cancelled):
        segment_cases([str(folder)], out, [str(tiny_model)], "cpu", progress_factory=Bar(stdio.StringIO()))


def test_a_case_another_run_made_with_other_settings_meanwhile_is_an_error(tmp_path, tiny_model):
    """Looked at again at the end of the run, a case the other run wrote with other settings is not this run's
    result: an error, as a rerun's would be."""
    path = write_case(tmp_path, "a")
    out = tmp_path / "out"
    out.mkdir()
    other = io.exclusive(out / ".a.deepwml-lock", "the other run")
    other.__enter__()

    class Other:
        def __call__(self, number, total, case):
            return None

        def finish(self, row):
            other.__exit__(None, None, None)
            assert segment(tiny_model, path, "-o", out, "--threshold", "0.3") == 0

    rows = segment_cases([str(path)], out, [str(tiny_model)], "cpu", progress_factory=Other())
    assert rows[0]["status"] == "error" and "made with other settings" in rows[0]["error"]


def test_temporary_and_hidden_files_are_no_cases_and_a_killed_runs_are_swept(tmp_path, tiny_model):
    folder = tmp_path / "scans"
    scan = write_case(folder, "a")
    left = folder / ".a_prob.nii.gz.k3j9x0aa.part.nii.gz"  # what a run killed while writing leaves
    shutil.copy(scan, left)
    (folder / "._a.nii.gz").write_bytes(b"\0\5\26\7 macOS resource fork")
    assert segment(tiny_model, folder, "-o", folder) == 0
    assert set(summary(folder)) == {"a"}
    assert not left.exists() and (folder / "._a.nii.gz").exists()  # DeepWML's own leftover only


def test_an_interrupted_overwrite_leaves_no_old_output_beside_the_new(tmp_path, tiny_model, monkeypatch):
    """The earlier run's outputs that the new one does not make go before anything new is written; and
    summary.csv then holds the cases this run finished, not the earlier run's figures."""
    folder, out = two_cases(tmp_path)
    assert segment(tiny_model, folder, "-o", out, "--save-probabilities", "--qc") == 0
    assert (out / "a_prob.nii.gz").exists() and (out / "a_qc.png").exists()
    real = io.write_segmentation
    calls = []

    def interrupted(mask, path):
        calls.append(path)
        if len(calls) == 2:  # case b, part way
            raise KeyboardInterrupt
        return real(mask, path)

    monkeypatch.setattr(io, "write_segmentation", interrupted)
    assert segment(tiny_model, folder, "-o", out, "--overwrite") == 130
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("a")) == ["a.seg.nrrd", "a_report.json",
                                                                                "a_wmh.nii.gz"]
    assert not (out / "b_prob.nii.gz").exists() and not (out / "b_qc.png").exists()
    assert not (out / "b_report.json").exists()  # incomplete: the next run says so
    assert set(summary(out)) == {"a"} and summary(out)["a"]["status"] == "ok"


@pytest.mark.parametrize("stop", [KeyboardInterrupt, Stopped(signal.SIGTERM),
                                  DeepWMLError("cannot write b.seg.nrrd (No space left on device)")])
def test_a_case_stopped_while_its_outputs_are_written_is_redone_by_the_same_command(tmp_path, tiny_model, monkeypatch,
                                                                                    stop):
    """Ctrl-C, SIGTERM or a full disk after a case's mask was written and before its report: the mask went
    with it, so that running the same command again redoes that case (and skips those done) instead of
    failing it with 'an earlier run left an incomplete set of outputs; rerun with --overwrite', which
    redoes every case of the run."""
    folder, out = two_cases(tmp_path)
    real = io.write_segmentation

    def cut_short(mask, path):
        if path.name == "b.seg.nrrd":
            raise stop
        return real(mask, path)

    monkeypatch.setattr(io, "write_segmentation", cut_short)
    expected = 1 if isinstance(stop, DeepWMLError) else 130 if stop is KeyboardInterrupt else 128 + signal.SIGTERM
    assert segment(tiny_model, folder, "-o", out, "--qc") == expected
    assert not [p.name for p in out.iterdir() if p.name.startswith("b")]
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary file nor lock
    monkeypatch.setattr(io, "write_segmentation", real)
    assert segment(tiny_model, folder, "-o", out, "--qc") == 0
    assert {case: row["status"] for case, row in summary(out).items()} == {"a": "skipped", "b": "ok"}
    assert (out / "b_report.json").exists() and (out / "b_wmh.nii.gz").exists()


def test_ctrl_c_says_which_cases_are_kept_and_how_to_go_on(tmp_path, tiny_model, monkeypatch, capsys):
    """'deepwml segment: interrupted' alone left the user to guess what the run kept: summary.csv lists only
    the cases finished, so the line names it, how many it lists, and that the same command goes on."""
    import DeepWMLLib.segment as segment_module

    folder = tmp_path / "scans"
    for name in ("a", "b", "c"):
        write_case(folder, name)
    real = segment_module.segment_case
    stop_at = ["a"]

    def stopped(case, *args, **kwargs):
        if case in stop_at:
            raise KeyboardInterrupt
        return real(case, *args, **kwargs)

    monkeypatch.setattr(segment_module, "segment_case", stopped)
    out = tmp_path / "out"
    assert segment(tiny_model, folder, "-o", out) == 130
    err = capsys.readouterr().err
    assert "stopped in case 1/3, before any case was finished; run the same command again" in err  # not "the 0 before it"
    # with --overwrite too: nothing this run did would be done again, so not 'without --overwrite' (which would skip
    # as done the earlier outputs the user asked to replace), nor 'the cases done are skipped'
    assert segment(tiny_model, folder, "-o", out, "--overwrite") == 130
    err = capsys.readouterr().err
    assert "stopped in case 1/3, before any case was finished; run the same command again to go on\n" in err
    stop_at[:] = ["b"]
    assert segment(tiny_model, folder, "-o", out) == 130
    err = capsys.readouterr().err
    assert f"stopped in case 2/3: {out / 'summary.csv'} lists the 1 before it; run the same command again" in err
    assert err.rstrip().endswith("deepwml segment: interrupted")
    assert list(summary(out)) == ["a"]
    # with --overwrite, the same command would segment case a again: it says to leave --overwrite out
    assert segment(tiny_model, folder, "-o", out, "--overwrite") == 130
    err = capsys.readouterr().err
    assert f"stopped in case 2/3: {out / 'summary.csv'} lists the 1 before it; run it again without --overwrite to " \
           "go on (the cases done are skipped; a case not reached yet whose earlier outputs were made with other " \
           "settings is then refused, naming them: give it alone with --overwrite)" in err
    assert segment(tiny_model, folder, "-o", out) == 130  # as told: a skipped, and b stops it again here
    assert summary(out)["a"]["status"] == "skipped"


def test_ctrl_c_between_two_cases_says_what_summary_lists_and_names_no_other_run(tmp_path, tiny_model, monkeypatch,
                                                                                 capsys):
    """Stopped just after a case's line (summary.csv being rewritten), no other run anywhere, the run said "stopped
    in case 1/2, which another DeepWML process had left, being done at the end of the run: summary.csv lists all 2
    cases", of a summary.csv listing the one case done."""
    from DeepWMLLib import segment as segment_module

    folder = tmp_path / "scans"
    for name in ("a", "b"):
        write_case(folder, name)
    rewrite = segment_module._summary_so_far

    def stopped_after_the_first(summary, row=None):
        if row is not None:  # the rewrite after the first case
            raise KeyboardInterrupt
        rewrite(summary, row)

    monkeypatch.setattr(segment_module, "_summary_so_far", stopped_after_the_first)
    out = tmp_path / "out"
    assert segment(tiny_model, folder, "-o", out) == 130
    err = capsys.readouterr().err
    assert f"stopped after 1 of 2 cases: {out / 'summary.csv'} lists them; run the same command again" in err, err
    assert "another DeepWML process" not in err
    assert list(summary(out)) == ["a"]


def test_ctrl_c_while_a_case_left_to_another_run_is_done_at_the_end_says_what_summary_lists(tmp_path, tiny_model,
                                                                                           monkeypatch, capsys):
    """Stopped while segmenting, at the end of the run, a case another run had left (it failed on it), the run said
    "stopped in case 1/3: summary.csv lists the 0 before it", but summary.csv lists every case by then."""
    from DeepWMLLib import segment as segment_module

    folder = tmp_path / "scans"
    for name, seed in (("a", 1), ("b", 3), ("c", 5)):
        write_case(folder, name, seed=seed)
    out = tmp_path / "out"
    out.mkdir()
    Bar = another_run_holds(out)  # when this run has left case a, the other run fails on it
    real, tries = segment_module.segment_case, []

    def stopped_at_the_end(case, *args, **kwargs):
        tries.append(case)
        if tries.count("a") == 2:  # done again at the end of the run
            raise KeyboardInterrupt
        return real(case, *args, **kwargs)

    monkeypatch.setattr(segment_module, "segment_case", stopped_at_the_end)
    monkeypatch.setattr(segment_module, "ProgressBar", Bar)
    assert segment(tiny_model, folder, "-o", out) == 130
    err = capsys.readouterr().err
    assert (f"stopped in case 1/3, which another DeepWML process had left, being done at the end of the run: "
            f"{out / 'summary.csv'} lists all 3 cases, that one as left to the other process; run the same command "
            f"again to go on (the cases done are skipped)") in err, err
    assert "lists the 0 before it" not in err
    assert [row["status"] for row in summary(out).values()] == ["skipped", "ok", "ok"]


def test_sigterm_stops_as_ctrl_c_does(tmp_path, tiny_model, monkeypatch, capsys):
    import DeepWMLLib.segment as segment_module

    def killed(args):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("not stopped")

    monkeypatch.setattr(segment_module, "_run", killed)
    handler = signal.getsignal(signal.SIGTERM)
    assert main(["segment", str(tmp_path / "x.nii.gz"), "-o", str(tmp_path / "o")]) == 128 + signal.SIGTERM
    assert "stopped by SIGTERM" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is handler  # given back


def test_a_screen_pipe_closed_mid_run_ends_it_without_blaming_the_case(tmp_path, tiny_model, monkeypatch):
    """`deepwml segment DIR -o OUT 2>&1 | head`: the reader gone while case b was being segmented, summary.csv
    listed b as 'error, internal error: BrokenPipeError: [Errno 32] Broken pipe' (the scan was fine). The run ends
    with 141, as a command the closed pipe kills does, summary.csv listing the cases finished before, as when
    stopped, and b leaves no output, so the same command run again does it."""
    import sys

    folder = tmp_path / "scans"
    for name in ("a", "b", "c"):
        write_case(folder, name)

    class ClosingPipe:  # the reader leaves once case b has begun
        closed = False

        def write(self, text):
            self.closed = self.closed or "[2/3]" in text
            if self.closed:
                raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            pass

        def isatty(self):
            return False

    monkeypatch.setattr(sys, "stderr", ClosingPipe())
    out = tmp_path / "out"
    assert segment(tiny_model, folder, "-o", out) == 141
    assert {case: row["status"] for case, row in summary(out).items()} == {"a": "ok"}
    assert not list(out.glob("b*"))


def test_names_too_long_or_not_utf8_fail_alone_with_a_message(tmp_path, tiny_model, capsys):
    folder = tmp_path / "scans"
    write_case(folder, "a" * 223)  # its outputs' names fit (up to 235 bytes); temporary names must too
    write_case(folder, "b" * 246)  # "b..._report.json" would be 258 bytes
    image, _ = make_volume(size=(32, 32, 4))
    sitk.WriteImage(image, str(folder / "plain.nrrd"))
    latin1 = os.path.join(os.fsencode(folder), b"caf\xe9.nrrd")
    os.rename(os.fsencode(folder / "plain.nrrd"), latin1)  # a name from a Latin-1 system
    out = tmp_path / "out"
    assert segment(tiny_model, folder, "-o", out) == 1
    err = capsys.readouterr().err
    rows = summary(out)
    assert rows["a" * 223]["status"] == "ok"
    assert rows["b" * 246]["status"] == "error" and "too long for its output files (258 bytes" in err
    latin = next(row for case, row in rows.items() if case.startswith("caf"))
    assert latin["status"] == "error" and "not UTF-8 text" in latin["error"]


def test_the_same_scan_given_twice_is_one_case(tmp_path, tiny_model):
    path = write_case(tmp_path / "in", "a")
    out = tmp_path / "out"
    assert segment(tiny_model, path, path, tmp_path / "in", "-o", out) == 0
    assert list(summary(out)) == ["a"]


def test_files_that_cannot_be_read_are_named(tmp_path, tiny_model, monkeypatch, capsys):
    """A scan without read permission, a link to a share not mounted, a folder below that cannot be listed
    (simulated: tests may run as root), and a DICOM slice that cannot be read at an end of its series."""
    folder = tmp_path / "scans"
    write_case(folder, "a")
    locked = write_case(folder, "locked")
    (folder / "gone.nii.gz").symlink_to(tmp_path / "unmounted" / "scan.nii.gz")
    (folder / "sub").mkdir()
    real_scandir, real_open = os.scandir, io.gzip.open

    def scandir(path="."):
        if str(path) == str(folder / "sub"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    def gzip_open(path, *args, **kwargs):
        if str(path) == str(locked):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "scandir", scandir)
    monkeypatch.setattr(io.gzip, "open", gzip_open)
    out = tmp_path / "out"
    assert segment(tiny_model, folder, "-o", out) == 1
    rows = summary(out)
    assert rows["a"]["status"] == "ok"
    assert "cannot be read (permission denied)" in rows["locked"]["error"]
    assert "is a link to" in rows["gone"]["error"] and "cannot be reached" in rows["gone"]["error"]
    assert any(row["status"] == "error" and "Permission denied" in row["error"] for row in rows.values()
               if row["input"].endswith("sub"))
    monkeypatch.undo()

    image, _ = make_volume(size=(32, 32, 6), dtype=sitk.sitkInt16)
    series = write_dicom_series(tmp_path / "dicom", image, description="AX FLAIR", inversion_ms=2500)
    last = sorted(series.iterdir())[-1]
    last.write_bytes(b"\0" * 64)  # stands for a file this user may not read
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False if str(p) == str(last) else real_access(p, mode, **k))
    assert segment(tiny_model, series, "-o", tmp_path / "out2") == 0
    report = json.loads((tmp_path / "out2" / "dicom_report.json").read_text())
    assert any(last.name in warning for warning in report["warnings"])
    assert np.isclose(report["slice_thickness_mm"], 5.0)


def test_overwrite_without_an_earlier_report_deletes_nothing_but_its_own_files(tmp_path, tiny_model):
    """No report, nothing to say which files DeepWML wrote: a scan named like an output and a picture of the
    user's own stay, though this run does not make them."""
    folder = tmp_path / "in"
    scan = write_case(folder, "X")
    shutil.copy(scan, folder / "X_brain.nii.gz")
    (folder / "X_qc.png").write_bytes(b"precious")
    assert segment(tiny_model, scan, "-o", folder, "--overwrite") == 0
    assert (folder / "X_brain.nii.gz").read_bytes() == scan.read_bytes()
    assert (folder / "X_qc.png").read_bytes() == b"precious"


def test_another_scan_behind_an_identical_detached_header_is_not_skipped_as_done(tmp_path, tiny_model, capsys):
    """Two patients' scans on one grid (resampled to a template) written as scan.mhd + scan.raw: the headers
    are byte for byte the same. The second was skipped as done, its report and summary the first patient's."""
    for patient, seed in (("p1", 0), ("p2", 9)):
        (tmp_path / patient).mkdir()
        image, _ = make_volume(size=(32, 32, 4), seed=seed, blobs=() if seed else ((0.5, 0.5, 0.5, 4.0),))
        sitk.WriteImage(sitk.Cast(image, sitk.sitkUInt16), str(tmp_path / patient / "scan.mhd"))
    assert (tmp_path / "p1" / "scan.mhd").read_bytes() == (tmp_path / "p2" / "scan.mhd").read_bytes()
    out = tmp_path / "out"
    assert segment(tiny_model, tmp_path / "p1" / "scan.mhd", "-o", out) == 0
    assert segment(tiny_model, tmp_path / "p1" / "scan.mhd", "-o", out) == 0  # the same scan: skipped
    assert summary(out)["scan"]["status"] == "skipped"
    capsys.readouterr()
    assert segment(tiny_model, tmp_path / "p2" / "scan.mhd", "-o", out) == 1
    assert "holds the results of another scan named 'scan'" in capsys.readouterr().err
    report = json.loads((out / "scan_report.json").read_text())  # a report that fingerprinted the header alone
    report["input_fingerprint"] = report["input_fingerprint"].split("~")[0]
    (out / "scan_report.json").write_text(json.dumps(report))
    assert segment(tiny_model, tmp_path / "p1" / "scan.mhd", "-o", out) == 0  # judged as it was then: skipped
    assert summary(out)["scan"]["status"] == "skipped"
    # but that report cannot tell the other patient's scan from it: only the very file it was made from counts
    assert segment(tiny_model, tmp_path / "p2" / "scan.mhd", "-o", out) == 1
    assert "holds the results of another scan named 'scan'" in capsys.readouterr().err


def _slice_files(folder, image, header: str) -> None:
    """`image` (uint16) as one raw file per slice, s0.raw, s1.raw..., under a detached header naming them as a LIST
    (NRRD .nhdr) or a numbered pattern (MetaImage .mhd), as per-slice exports and older pipelines write them."""
    voxels = sitk.GetArrayFromImage(sitk.Cast(image, sitk.sitkUInt16))
    for k, plane in enumerate(voxels):
        (folder / f"s{k}.raw").write_bytes(plane.astype("<u2").tobytes())
    x, y, z = image.GetSize()
    if header == "scan.nhdr":
        text = ("NRRD0004\ntype: unsigned short\ndimension: 3\nspace: left-posterior-superior\n"
                f"sizes: {x} {y} {z}\nspace directions: (1,0,0) (0,1,0) (0,0,5)\nkinds: domain domain domain\n"
                "endian: little\nencoding: raw\nspace origin: (0,0,0)\ndata file: LIST\n"
                + "".join(f"s{k}.raw\n" for k in range(z)))
    else:
        text = (f"ObjectType = Image\nNDims = 3\nDimSize = {x} {y} {z}\nElementSpacing = 1 1 5\n"
                f"ElementType = MET_USHORT\nElementDataFile = s%d.raw 0 {z - 1} 1\n")
    (folder / header).write_text(text)


@pytest.mark.parametrize("header", ["scan.nhdr", "scan.mhd"])
def test_another_scan_behind_an_identical_header_of_slice_files_is_not_skipped_as_done(header, tmp_path, tiny_model,
                                                                                       capsys):
    """A detached header naming a file per slice (a LIST, a numbered pattern): its fingerprint was the header's
    alone, so another patient's slices behind the same header, or slices replaced in place, were skipped as done
    with the first scan's mask and figures."""
    for patient, seed in (("p1", 0), ("p2", 9)):
        (tmp_path / patient).mkdir()
        image, _ = make_volume(size=(32, 32, 4), seed=seed, blobs=() if seed else ((0.5, 0.5, 0.5, 4.0),))
        _slice_files(tmp_path / patient, image, header)
    assert (tmp_path / "p1" / header).read_bytes() == (tmp_path / "p2" / header).read_bytes()
    out = tmp_path / "out"
    assert segment(tiny_model, tmp_path / "p1" / header, "-o", out) == 0
    assert segment(tiny_model, tmp_path / "p1" / header, "-o", out) == 0  # the same scan: skipped
    assert summary(out)["scan"]["status"] == "skipped"
    capsys.readouterr()
    assert segment(tiny_model, tmp_path / "p2" / header, "-o", out) == 1
    assert "holds the results of another scan named 'scan'" in capsys.readouterr().err
    shutil.copy(tmp_path / "p2" / "s2.raw", tmp_path / "p1" / "s2.raw")  # one slice replaced under the same header
    assert segment(tiny_model, tmp_path / "p1" / header, "-o", out) == 1
    assert "holds the results of another scan named 'scan'" in capsys.readouterr().err


def test_another_uncompressed_scan_with_the_same_first_mebibyte_is_not_skipped_as_done(tmp_path, tiny_model, capsys):
    """Scans on one template grid saved uncompressed (SPM's wFLAIR.nii) start with the same empty slices below
    the head: the fingerprint's first MiB was all it hashed, and a follow-up scan of that name was skipped as
    done with the baseline's figures."""
    for patient, seed in (("baseline", 0), ("followup", 9)):
        image, _ = make_volume(size=(64, 64, 6), seed=seed)
        voxels = np.zeros((140, 64, 64), np.uint16)  # 140 empty slices of 8 KiB before the head: 1.1 MiB
        volume = sitk.GetImageFromArray(np.concatenate([voxels, sitk.GetArrayFromImage(sitk.Cast(image, sitk.sitkUInt16))]))
        volume.SetSpacing((0.9, 0.9, 5.0))
        (tmp_path / patient).mkdir()
        sitk.WriteImage(volume, str(tmp_path / patient / "wFLAIR.nii"))
    first_mib = [(tmp_path / patient / "wFLAIR.nii").read_bytes()[: 1 << 20] for patient in ("baseline", "followup")]
    assert first_mib[0] == first_mib[1]
    out = tmp_path / "out"
    assert segment(tiny_model, tmp_path / "baseline" / "wFLAIR.nii", "-o", out) == 0
    capsys.readouterr()
    assert segment(tiny_model, tmp_path / "followup" / "wFLAIR.nii", "-o", out) == 1
    assert "holds the results of another scan named 'wFLAIR'" in capsys.readouterr().err
    report = json.loads((out / "wFLAIR_report.json").read_text())  # a report of an earlier version: judged so
    report["input_fingerprint"] = report["input_fingerprint"].split("~")[0]
    (out / "wFLAIR_report.json").write_text(json.dumps(report))
    assert segment(tiny_model, tmp_path / "baseline" / "wFLAIR.nii", "-o", out) == 0
    assert summary(out)["wFLAIR"]["status"] == "skipped"
    capsys.readouterr()  # the follow-up, which that report cannot tell from the baseline, is not its
    assert segment(tiny_model, tmp_path / "followup" / "wFLAIR.nii", "-o", out) == 1
    assert "holds the results of another scan named 'wFLAIR'" in capsys.readouterr().err


def test_a_moved_folder_keeps_its_results_and_a_replaced_scan_does_not(tmp_path, tiny_model, capsys):
    first = write_case(tmp_path / "in", "a")
    out = tmp_path / "out"
    assert segment(tiny_model, first, "-o", out, "--qc") == 0
    (out / "a_qc.png").unlink()  # optional outputs may be deleted after review: still done
    (tmp_path / "in").rename(tmp_path / "moved")
    assert segment(tiny_model, tmp_path / "moved", "-o", out) == 0
    assert summary(out)["a"]["status"] == "skipped"
    write_case(tmp_path / "moved", "a", seed=7, blobs=())  # the file replaced by another scan of that name
    capsys.readouterr()
    assert segment(tiny_model, tmp_path / "moved", "-o", out) == 1
    assert "or this scan has changed since" in capsys.readouterr().err


def test_a_file_system_without_locks_still_runs(tmp_path, tiny_model, monkeypatch):
    import errno
    import fcntl

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    assert segment(tiny_model, write_case(tmp_path, "a"), "-o", tmp_path / "out") == 0
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]


def test_a_system_folder_below_the_input_is_not_a_failing_case(tmp_path, tiny_model, monkeypatch):
    folder = tmp_path / "disk"
    write_case(folder, "a")
    (folder / "lost+found").mkdir()
    real_scandir = os.scandir

    def scandir(path="."):
        if str(path) == str(folder / "lost+found"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    assert segment(tiny_model, folder, "-o", tmp_path / "out") == 0
    assert list(summary(tmp_path / "out")) == ["a"]


def test_a_long_name_in_a_multibyte_script_fits_its_temporary_names(tmp_path, tiny_model):
    name = "é" * 118  # 236 bytes: its outputs (up to 248 bytes) fit, and so must their temporary names
    path = write_case(tmp_path / "in", name)
    assert segment(tiny_model, path, "-o", tmp_path / "out") == 0
    assert (tmp_path / "out" / f"{name}_report.json").is_file()


def test_a_rerun_with_no_brain_mask_skips_but_not_a_result_made_without_the_brain_checks(tmp_path, tiny_model, capsys):
    """--no-brain-mask runs the brain mask for the checks (not for the marks): a rerun with it skips the case, but a
    result of a version that ran no brain mask with it (no FLAIR check) is not passed off as this run's."""
    path = write_case(tmp_path / "in", "a")
    out = tmp_path / "out"
    assert segment(tiny_model, path, "-o", out, "--no-brain-mask") == 0
    report = json.loads((out / "a_report.json").read_text())
    assert report["brain_mask"] == report["settings"]["brain_mask"] == "not applied to the marks"
    assert report["brain_model"] and report["contrast"] is not None and report["outside_brain_removed_ml"] == 0
    assert segment(tiny_model, path, "-o", out, "--no-brain-mask") == 0 and summary(out)["a"]["status"] == "skipped"
    del report["settings"]["brain_mask"]  # as the version before made it: no brain model with --no-brain-mask
    report["settings"].update(brain_model=None, brain_model_sha256=None)
    (out / "a_report.json").write_text(json.dumps(report))
    capsys.readouterr()
    assert segment(tiny_model, path, "-o", out, "--no-brain-mask") == 1
    err = capsys.readouterr().err
    assert "made with other settings" in err and "--brain-model/--no-brain-mask (none then, " in err, err
    assert segment(tiny_model, path, "-o", out, "--overwrite") == 0  # gated, by that version too: its report
    report = json.loads((out / "a_report.json").read_text())
    del report["settings"]["brain_mask"]  # lacks brain_mask, and is the same result: skipped
    (out / "a_report.json").write_text(json.dumps(report))
    assert segment(tiny_model, path, "-o", out) == 0 and summary(out)["a"]["status"] == "skipped"


def test_a_rerun_with_other_result_settings_is_refused_naming_them(tmp_path, tiny_model, capsys):
    """A rerun into the same OUTDIR with settings that change the result must not pass the earlier result
    off as this run's; optional outputs asked for now (added) and how the run goes do not block the skip."""
    from conftest import tiny_model_file

    path = write_case(tmp_path / "in", "a")
    out = tmp_path / "out"
    assert segment(tiny_model, path, "-o", out) == 0
    settings = json.loads((out / "a_report.json").read_text())["settings"]
    assert (settings["threshold"], settings["tta"], settings["min_lesion_mm3"], settings["exclude_edge_fraction"]) \
        == (0.5, False, 5.0, 0.0)
    # auto measures each network shape's precision (inference.bf16_is_faster): on a CPU with native bf16 the tiny WMH
    # and brain networks may each go either way, recorded together as "bf16+fp32"
    assert settings["model"] == ["tiny.pt"] and settings["precision"] in ("fp32", "bf16", "bf16+fp32")
    capsys.readouterr()
    for extra, said in ((["--threshold", "0.3"], "--threshold (0.5 then, 0.3 now)"),
                        (["--tta"], "--tta (off then, on now)"),
                        (["--min-lesion-mm3", "0"], "--min-lesion-mm3 (5 then, 0 now)"),
                        (["--exclude-edge-slices", "0.1"], "--exclude-edge-slices (0 then, 0.1 now)"),
                        (["--no-brain-mask"], "--no-brain-mask (gates the marks then, not applied to the marks now)")):
        assert segment(tiny_model, path, "-o", out, *extra) == 1, extra
        err = capsys.readouterr().err
        assert "made with other settings" in err and said in err and "--overwrite" in err, (extra, err)
        assert summary(out)["a"]["status"] == "error" and summary(out)["a"]["volume_ml"] == ""
    (tmp_path / "models").mkdir()
    other = tiny_model_file(tmp_path / "models" / "tiny.pt", seed=3)  # the same name, other weights
    assert main(["segment", str(path), "-o", str(out), "--model", str(other), "--device", "cpu"]) == 1
    assert "--model (tiny.pt (other weights) then, tiny.pt now)" in capsys.readouterr().err
    for extra, status in ((["--qc", "--save-probabilities"], "added"),  # the optional outputs added, not refused
                          (["--batch-size", "2", "--backend", "torch"], "skipped"), (["--threshold", "0.5"], "skipped")):
        assert segment(tiny_model, path, "-o", out, *extra) == 0, extra
        assert summary(out)["a"]["status"] == status, extra
    report = json.loads((out / "a_report.json").read_text())
    report["settings"]["precision"] = "bf16"  # made where bf16 is native; fp32 asked for now
    (out / "a_report.json").write_text(json.dumps(report))
    assert segment(tiny_model, path, "-o", out, "--precision", "fp32") == 1
    assert "--precision (bf16 then, fp32 now)" in capsys.readouterr().err
    assert segment(tiny_model, path, "-o", out) == 0  # auto: whatever the machine computes in
    assert segment(tiny_model, path, "-o", out, "--tta", "--overwrite") == 0
    assert json.loads((out / "a_report.json").read_text())["settings"]["tta"] is True
    del report["settings"]  # a report of an older version: what it records is checked, the rest said unknown
    (out / "a_report.json").write_text(json.dumps(report))
    assert segment(tiny_model, path, "-o", out, "--min-lesion-mm3", "0") == 0
    assert summary(out)["a"]["status"] == "skipped" and "does not record all its settings" in summary(out)["a"]["error"]
    capsys.readouterr()
    assert segment(tiny_model, path, "-o", out, "--threshold", "0.3") == 1
    assert "--threshold (0.5 then, 0.3 now)" in capsys.readouterr().err
    assert main(["segment", str(path), "-o", str(out), "--model", str(other), "--device", "cpu"]) == 1
    assert "--model (tiny.pt (other weights) then, tiny.pt now)" in capsys.readouterr().err


def test_a_moved_dicom_series_keeps_its_results_and_another_series_of_that_name_does_not(tmp_path, tiny_model, capsys):
    image, _ = make_volume(size=(28, 24, 4), dtype=sitk.sitkInt16)
    write_dicom_series(tmp_path / "in" / "FLAIR", image, uid="1.2.3.7", description="AX FLAIR", inversion_ms=2500)
    out = tmp_path / "out"
    assert segment(tiny_model, tmp_path / "in" / "FLAIR", "-o", out) == 0
    assert json.loads((out / "FLAIR_report.json").read_text())["input_fingerprint"].startswith("dicom:4:")
    (tmp_path / "in").rename(tmp_path / "moved")  # the export moved (another disk, a renamed folder above)
    assert segment(tiny_model, tmp_path / "moved" / "FLAIR", "-o", out) == 0
    assert summary(out)["FLAIR"]["status"] == "skipped"
    other, _ = make_volume(size=(28, 24, 4), dtype=sitk.sitkInt16, seed=5)
    write_dicom_series(tmp_path / "p2" / "FLAIR", other, uid="1.2.3.8", description="AX FLAIR", inversion_ms=2500)
    capsys.readouterr()
    assert segment(tiny_model, tmp_path / "p2" / "FLAIR", "-o", out) == 1
    assert "holds the results of another scan named 'FLAIR'" in capsys.readouterr().err
    # the same series UID written again (new files: new SOP Instance UIDs) is not the scan done either
    write_dicom_series(tmp_path / "p3" / "FLAIR", other, uid="1.2.3.7", description="AX FLAIR", inversion_ms=2500)
    assert segment(tiny_model, tmp_path / "p3" / "FLAIR", "-o", out) == 1
    # in a folder of two FLAIR-like series, --series naming the other one is a setting that differs
    write_dicom_series(tmp_path / "moved" / "FLAIR", other, uid="1.2.3.9", description="AX FLAIR 2",
                       inversion_ms=2500, prefix="second", number=2)
    assert segment(tiny_model, tmp_path / "moved" / "FLAIR", "-o", out, "--series", "AX FLAIR") == 0
    assert segment(tiny_model, tmp_path / "moved" / "FLAIR", "-o", out, "--series", "2") == 1
    assert "--series (UID 1.2.3.7 'AX FLAIR' then, series 2 'AX FLAIR 2'" in capsys.readouterr().err


def test_case_names_alike_but_for_upper_and_lower_case_never_share_outputs(tmp_path, tiny_model, capsys):
    """On macOS and Windows A_wmh.nii.gz and a_wmh.nii.gz are one file: such names are told apart as equal
    names are (checked here on a file system that tells them apart)."""
    from DeepWMLLib.segment import expand_inputs

    first = write_case(tmp_path / "x", "A")
    second = write_case(tmp_path / "y", "a", seed=2)
    out = tmp_path / "out"
    assert segment(tiny_model, first, second, "-o", out) == 0  # told apart by their folders (x, y)
    assert sorted(p.name for p in out.glob("*_wmh.nii.gz")) == ["x_A_wmh.nii.gz", "y_a_wmh.nii.gz"]
    same = tmp_path / "same"  # side by side in one folder no folder tells them apart: refused before either runs
    (same / "A.nii.gz").parent.mkdir()
    first.rename(same / "A.nii.gz")
    second.rename(same / "a.nii.gz")
    capsys.readouterr()
    assert segment(tiny_model, same, "-o", tmp_path / "out2") == 1
    assert "'A' and 'a' (" in capsys.readouterr().err
    assert not (tmp_path / "out2").exists()
    export = tmp_path / "export"  # two studies whose folders differ only in case: named apart by their dates
    for folder, study, date in (("P1", "8.1", "20250101"), ("p1", "8.2", "20260101")):
        image, _ = make_volume(size=(28, 24, 3), dtype=sitk.sitkInt16)
        write_dicom_series(export / folder / "S", image, uid=study + ".1", description="FLAIR", inversion_ms=2500,
                           extra={"0020|000d": study, "0008|0020": date})
    names = [case for case, _, _ in expand_inputs([str(export)])]
    assert sorted(names) == ["P1_S_20250101", "p1_S_20260101"]
    assert len({name.casefold() for name in names}) == 2


def test_summary_lists_the_cases_done_while_the_run_goes_on(tmp_path, tiny_model, monkeypatch):
    """summary.csv was written once, at the end (or on Ctrl-C): a run killed outright (kill -9, a crash, a power
    cut) in case 3 of 50 left no summary, or an earlier run's. It now holds the cases done so far, from the start."""
    import DeepWMLLib.segment as segment_module

    folder = tmp_path / "scans"
    for name in ("a", "b", "c"):
        write_case(folder, name)
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.csv").write_text("case,status\nold,ok\n", encoding="utf-8")  # an earlier run's
    real = segment_module.segment_case
    seen = {}

    def watched(case, *args, **kwargs):
        seen[case] = list(summary(out))  # what a kill at this moment would leave
        return real(case, *args, **kwargs)

    monkeypatch.setattr(segment_module, "segment_case", watched)
    assert segment(tiny_model, folder, "-o", out) == 0
    assert seen == {"a": [], "b": ["a"], "c": ["a", "b"]}
    assert list(summary(out)) == ["a", "b", "c"]


def test_summary_is_written_once_per_change_each_write_synced_to_disk(tmp_path, tiny_model, monkeypatch):
    """Each output is synced to disk as it is written (milliseconds each on a virtual disk): summary.csv was written
    three times for one case, an empty one at the start where no earlier run's was to be replaced, and the last case's
    again at the end. Now once into a new OUTDIR; into one with an earlier run's summary, twice (that one replaced
    at the start, as before); the summary the same."""
    import os

    folder = tmp_path / "scans"
    write_case(folder, "a")
    written = []
    replace = os.replace

    def counted(source, target):
        written.append(os.path.basename(target))
        return replace(source, target)

    monkeypatch.setattr(os, "replace", counted)
    out = tmp_path / "out"
    assert segment(tiny_model, folder, "-o", out) == 0
    assert written.count("summary.csv") == 1 and list(summary(out)) == ["a"]
    written.clear()
    assert segment(tiny_model, folder, "-o", out, "--overwrite") == 0
    assert written.count("summary.csv") == 2 and list(summary(out)) == ["a"]


def test_overwrite_in_a_shared_outdir_removes_only_the_case_s_listed_outputs_there(tmp_path, tiny_model):
    """A cohort in one OUTDIR: rerunning case a with --overwrite (without --save-probabilities and --qc) removes a's
    probability map and picture, which its report lists, and nothing else: not case ab's or a_2's outputs (names
    that begin as a's), not a file of the user's (another case's name, an output's name its report does not list),
    not what a tampered report lists beyond a's own output names (another case's, a path out of OUTDIR), and of a
    listed picture that is a symbolic link, the link alone."""
    scans = tmp_path / "scans"
    for seed, name in enumerate(["a", "ab", "a_2"]):
        write_case(scans, name, seed=seed)
    out = tmp_path / "out"
    assert segment(tiny_model, scans, "-o", out, "--save-probabilities", "--qc") == 0
    mine = {"other_wmh.nii.gz": b"mine", "a_notes.txt": b"mine", "a_wmh.mha": b"mine"}
    for name, content in mine.items():
        (out / name).write_bytes(content)
    elsewhere = tmp_path / "elsewhere.png"
    elsewhere.write_bytes(b"precious")
    (out / "a_qc.png").unlink()
    os.symlink(elsewhere, out / "a_qc.png")
    (tmp_path / "x").write_bytes(b"precious")
    report = json.loads((out / "a_report.json").read_text())
    report["outputs"] += ["../x", str(tmp_path / "x"), "ab_wmh.nii.gz", "ab_report.json", "a_2_prob.nii.gz",
                          "other_wmh.nii.gz"]
    (out / "a_report.json").write_text(json.dumps(report))
    others = {p.name: p.read_bytes() for p in out.iterdir() if p.name.startswith(("ab", "a_2"))}
    assert len(others) == 10
    assert segment(tiny_model, scans / "a.nii.gz", "-o", out, "--overwrite") == 0
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name.startswith(("ab", "a_2"))} == others
    assert all((out / name).read_bytes() == content for name, content in mine.items())
    assert elsewhere.read_bytes() == b"precious" and (tmp_path / "x").read_bytes() == b"precious"
    assert not os.path.lexists(out / "a_qc.png") and not (out / "a_prob.nii.gz").exists()


def test_overwrite_removes_a_symlinked_outline_folder_s_link_never_the_series_it_leads_to(tmp_path):
    """An outline series folder the earlier report lists, now a symbolic link to a series elsewhere (the user's):
    --overwrite without --dicom-outline, or a run stopped part way, removed the images it leads to. Now the link
    alone goes."""
    from DeepWMLLib.segment import output_paths, remove_earlier_outputs, start_outputs, whole_or_none

    for stopped in (False, True):
        out, elsewhere = tmp_path / f"out{stopped}", tmp_path / f"series{stopped}"
        out.mkdir()
        elsewhere.mkdir()
        (elsewhere / "IM0001.dcm").write_bytes(b"precious")
        os.symlink(elsewhere, out / "a_outline_dicom", target_is_directory=True)
        (out / "a_report.json").write_text(json.dumps({"outputs": ["a.seg.nrrd", "a_outline_dicom", "a_report.json",
                                                                   "a_wmh.nii.gz"]}))
        if stopped:
            paths = output_paths(out, "a", False, dicom_outline=True)
            with pytest.raises(KeyboardInterrupt), whole_or_none(paths):
                start_outputs(out, "a", paths, False)  # the run's journal, its first write: its writing had begun
                raise KeyboardInterrupt
        else:
            remove_earlier_outputs(out, "a", output_paths(out, "a", False))
        assert (elsewhere / "IM0001.dcm").read_bytes() == b"precious"
        assert not os.path.lexists(out / "a_outline_dicom")


def test_overwrite_never_empties_a_listed_outline_folder_that_holds_a_scan_given(tmp_path):
    """A scan given to the run inside the folder of an outline series the earlier report lists (an earlier series
    given back as the FLAIR): the folder was emptied, the scan with it, as only the folder itself was checked."""
    from DeepWMLLib.segment import output_paths, remove_earlier_outputs

    out = tmp_path / "out"
    (out / "a_outline_dicom").mkdir(parents=True)
    scan = out / "a_outline_dicom" / "IM0001.dcm"
    scan.write_bytes(b"the scan")
    (out / "a_report.json").write_text(json.dumps({"outputs": ["a.seg.nrrd", "a_outline_dicom", "a_report.json",
                                                               "a_wmh.nii.gz"]}))
    remove_earlier_outputs(out, "a", output_paths(out, "a", False), frozenset({scan.resolve()}))
    assert scan.read_bytes() == b"the scan"
