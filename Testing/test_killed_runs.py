"""A run killed outright (kill -9, a power cut) while it writes a case's outputs: its case's journal lists them, so
that a rerun refuses them as a run stopped part way (never counted as done nor as the user's files), --overwrite
removes exactly them, and a rerun adding outputs makes them rather than taking a killed run's for its own. The kill
is played in the process: whole_or_none's clean-up made a no-op (nothing runs after a kill) and the write of the
report raising."""

from __future__ import annotations

import contextlib
import csv
import json
import os

import numpy as np
import SimpleITK as sitk

from DeepWMLLib import io, segment
from DeepWMLLib.cli import main

from conftest import make_volume, write_dicom_series


class Killed(Exception):
    """Stands for the kill: raised where the process died."""


def killed_at(monkeypatch, name: str) -> None:
    """From now on, the process 'dies' as it is about to write the file `name`: nothing after that runs."""
    real = io.write_atomically

    def write(path, how):
        if os.path.basename(str(path)) == name:
            raise Killed(f"killed while writing {name}")
        return real(path, how)

    monkeypatch.setattr(io, "write_atomically", write)
    monkeypatch.setattr(segment, "whole_or_none", lambda paths: contextlib.nullcontext())


def revived(monkeypatch) -> None:
    monkeypatch.undo()


def write_scan(folder, name="a"):
    folder.mkdir(parents=True, exist_ok=True)
    image, _ = make_volume(size=(32, 32, 4))
    path = folder / f"{name}.nii.gz"
    sitk.WriteImage(sitk.Cast(image, sitk.sitkUInt16), str(path))
    return path


def run_segment(tiny_model, *arguments):
    return main(["segment", *map(str, arguments), "--model", str(tiny_model), "--device", "cpu"])


def status(out, case="a"):
    with open(out / "summary.csv", newline="", encoding="utf-8-sig") as f:
        return {row["case"]: row for row in csv.DictReader(f)}[case]


def names(out):
    return sorted(p.name for p in out.iterdir() if not p.name.startswith(".") and p.name != "summary.csv")


def test_segment_killed_before_its_report_is_refused_then_overwrite_removes_exactly_its_files(tmp_path, tiny_model,
                                                                                              monkeypatch):
    """Killed with --qc --save-probabilities after its images, before its report: the rerun said 'incomplete set'
    but --overwrite without those options kept the killed run's picture and probability map (listed nowhere), and a
    later --qc --save-probabilities run skipped the case, counting them as made. Now they are listed in the case's
    journal: refused as a run stopped part way, removed by --overwrite, and made by the run that asks for them."""
    scan, out = write_scan(tmp_path / "scans"), tmp_path / "out"
    (tmp_path / "out").mkdir()
    (out / "a_notes.png").write_bytes(b"mine")  # a file of the user's beside them: never touched
    killed_at(monkeypatch, "a_report.json")
    assert run_segment(tiny_model, scan, "-o", out, "--qc", "--save-probabilities") == 1
    revived(monkeypatch)
    assert names(out) == ["a.seg.nrrd", "a_notes.png", "a_prob.nii.gz", "a_qc.png", "a_wmh.nii.gz"]
    for options in ([], ["--output-format", "nrrd"], ["--qc", "--save-probabilities"]):
        assert run_segment(tiny_model, scan, "-o", out, *options) == 1
        said = status(out)["error"]
        assert status(out)["status"] == "error" and "--overwrite" in said, said
    assert run_segment(tiny_model, scan, "-o", out, "--overwrite") == 0
    assert names(out) == ["a.seg.nrrd", "a_notes.png", "a_report.json", "a_wmh.nii.gz"]
    assert "stopped part way" in said and "a_qc.png" in said and "a_prob.nii.gz" in said, said
    assert not [p.name for p in out.iterdir() if p.name.endswith(io.JOURNAL_SUFFIX)]
    assert run_segment(tiny_model, scan, "-o", out, "--qc", "--save-probabilities") == 0
    assert status(out)["status"] == segment.ADDED  # made now, not the killed run's taken for them
    assert (out / "a_notes.png").read_bytes() == b"mine"


def test_a_killed_runs_outputs_in_another_format_are_no_scans_nor_left_by_overwrite(tmp_path, tiny_model, monkeypatch):
    """Killed writing an NRRD case into the scans' folder: OUTDIR given back as INPUT took its a_wmh.nrrd for a
    scan, and --overwrite in the default format kept it beside the new a_wmh.nii.gz."""
    folder = tmp_path / "scans"
    scan = write_scan(folder)
    killed_at(monkeypatch, "a_report.json")
    assert run_segment(tiny_model, scan, "-o", folder, "--output-format", "nrrd") == 1
    revived(monkeypatch)
    assert (folder / "a_wmh.nrrd").exists()
    assert segment._image_files(folder) == [("a", scan, None)]
    assert run_segment(tiny_model, scan, "-o", folder, "--overwrite") == 0
    assert not (folder / "a_wmh.nrrd").exists()
    assert json.loads((folder / "a_report.json").read_text())["outputs"] == ["a.seg.nrrd", "a_report.json",
                                                                             "a_wmh.nii.gz"]
    assert scan.exists()


def test_a_run_killed_after_its_report_is_done_and_one_killed_while_overwriting_is_not(tmp_path, tiny_model,
                                                                                        monkeypatch):
    """The journal that a run killed just after writing its report leaves is known by the report's digest: the case is
    done (skipped, the journal gone). A journal beside a report it did not write (an --overwrite killed before it
    removed the earlier report) is a run stopped part way: never a case done."""
    scan, out = write_scan(tmp_path / "scans"), tmp_path / "out"
    real = io.write_atomically
    kept = {}

    def watched(path, how):
        if os.path.basename(str(path)) == "a_report.json":
            kept["journal"] = segment.journal_path(path).read_bytes()
        return real(path, how)

    monkeypatch.setattr(io, "write_atomically", watched)
    assert run_segment(tiny_model, scan, "-o", out) == 0
    revived(monkeypatch)
    journal = segment.journal_path(out / "a_report.json")
    journal.write_bytes(kept["journal"])  # killed between the report and the journal's removal
    assert run_segment(tiny_model, scan, "-o", out) == 0
    assert status(out)["status"] == "skipped" and not journal.exists()

    killed_at(monkeypatch, "a_wmh.nii.gz")
    monkeypatch.setattr(segment, "remove_earlier_outputs", lambda *a, **k: (_ for _ in ()).throw(Killed()))
    assert run_segment(tiny_model, scan, "-o", out, "--overwrite", "--qc") == 1
    revived(monkeypatch)
    assert (out / "a_report.json").exists() and journal.exists()
    assert run_segment(tiny_model, scan, "-o", out) == 1
    assert "stopped part way" in status(out)["error"]
    assert run_segment(tiny_model, scan, "-o", out, "--overwrite") == 0 and not journal.exists()


def test_export_killed_before_its_report_leaves_nothing_overwrite_keeps(tmp_path, monkeypatch, capsys):
    """deepwml export killed with --qc before its report: --overwrite without --qc kept the picture (listed nowhere)."""
    folder = tmp_path / "in"
    scan = write_scan(folder)
    mask = sitk.Cast(sitk.ReadImage(str(scan)) > 10**9, sitk.sitkUInt8)
    array = sitk.GetArrayFromImage(mask)
    array[2, 14:18, 14:18] = 1
    marked = sitk.GetImageFromArray(array)
    marked.CopyInformation(mask)
    sitk.WriteImage(marked, str(tmp_path / "mask.nii.gz"))
    out = tmp_path / "out"
    export = ["export", str(scan), str(tmp_path / "mask.nii.gz"), "-o", str(out), "--no-location"]
    killed_at(monkeypatch, "a_report.json")
    assert main(export + ["--qc"]) != 0
    revived(monkeypatch)
    assert names(out) == ["a_qc.png"]
    assert main(export) == 1  # refused: a run stopped part way
    assert "stopped part way" in capsys.readouterr().err
    assert main(export + ["--overwrite"]) == 0
    assert names(out) == ["a_report.json"]
    assert not [p.name for p in out.iterdir() if p.name.endswith(io.JOURNAL_SUFFIX)]
    assert np.count_nonzero(array) == json.loads((out / "a_report.json").read_text())["lesions"][0]["voxels"]


def test_overwrite_stopped_writing_its_journal_leaves_the_earlier_result_as_it_was(tmp_path, tiny_model, monkeypatch):
    """--overwrite on a full disk fails as it writes the case's journal, its first write: nothing of the earlier
    result may change. whole_or_none removed the earlier report and the outputs of the same names but kept its
    picture, listed by no report nor journal: a rerun then wrote the case beside it, and a later --qc run skipped
    the case, taking that picture for its own."""
    scan, out = write_scan(tmp_path / "scans"), tmp_path / "out"
    assert run_segment(tiny_model, scan, "-o", out, "--qc") == 0
    before = {name: (out / name).read_bytes() for name in names(out)}
    assert sorted(before) == ["a.seg.nrrd", "a_qc.png", "a_report.json", "a_wmh.nii.gz"]
    real = io.write_atomically

    def full(path, how):
        if str(path).endswith(io.JOURNAL_SUFFIX):
            raise segment.DeepWMLError(f"cannot write {path}: the disk is full")
        return real(path, how)

    monkeypatch.setattr(io, "write_atomically", full)
    assert run_segment(tiny_model, scan, "-o", out, "--overwrite") == 1
    revived(monkeypatch)
    assert "the disk is full" in status(out)["error"]
    assert {name: (out / name).read_bytes() for name in names(out)} == before
    assert run_segment(tiny_model, scan, "-o", out, "--qc") == 0 and status(out)["status"] == "skipped"


def test_a_journals_temporary_file_is_swept_and_never_taken_for_a_journal(tmp_path, tiny_model):
    """A run killed while writing a case's journal (before its rename) leaves the journal's temporary file,
    `..a_report.deepwml-journal.XXXX.part.deepwml-journal`: it ends as a journal does, so the sweep of temporary
    files passed it over for ever, and a folder given back as INPUT counted it as a case of a run stopped part way."""
    scan, out = write_scan(tmp_path / "scans"), tmp_path / "out"
    assert run_segment(tiny_model, scan, "-o", out) == 0
    left = io._temporary_sibling(segment.journal_path(out / "a_report.json"))
    left.write_text(json.dumps({"report": "a_report.json", "case": "zz", "outputs": ["a_wmh.nii.gz"]}))
    assert left.name.endswith(io.JOURNAL_SUFFIX) and left in io.temporary_leftovers(out)
    assert "zz" not in (segment._only_outputs(out) or "")
    assert run_segment(tiny_model, scan, "-o", out) == 0 and status(out)["status"] == "skipped"
    assert not left.exists()


def test_deepwml_change_sweeps_its_pairs_journal_temporary_file(tmp_path):
    """The pair's sweep of temporary files, its lock taken (change._pair_held), passed over a journal's temporary
    file (it ends as a journal does); another pair's stays."""
    from DeepWMLLib import change

    out = tmp_path / "out"
    out.mkdir()
    own = io._temporary_sibling(segment.journal_path(out / "p_change.json"))
    other = io._temporary_sibling(segment.journal_path(out / "q_change.json"))
    with change._pair_held(out, "p"):
        pass
    assert not own.exists() and other.exists()


def test_export_refuses_the_outputs_of_a_segment_run_killed_part_way(tmp_path, tiny_model, monkeypatch, capsys):
    """deepwml export into the OUTDIR of a deepwml segment run of the case killed before its report: refused, as
    beside a segment report, even with --overwrite, which removed the killed run's picture, kept its mask and
    .seg.nrrd (no export's names) and ended its journal, so that they were listed nowhere."""
    scan, out = write_scan(tmp_path / "scans"), tmp_path / "out"
    killed_at(monkeypatch, "a_report.json")
    assert run_segment(tiny_model, scan, "-o", out, "--qc") == 1
    revived(monkeypatch)
    mask = sitk.Cast(sitk.ReadImage(str(scan)) > 10**9, sitk.sitkUInt8)
    sitk.WriteImage(mask, str(tmp_path / "mask.nii.gz"))
    export = ["export", str(scan), str(tmp_path / "mask.nii.gz"), "-o", str(out), "--no-location"]
    capsys.readouterr()
    for options in ([], ["--overwrite"]):
        assert main(export + options) == 1
        said = capsys.readouterr().err
        assert "deepwml segment run of case 'a'" in said and "another OUTDIR" in said, said
    assert names(out) == ["a.seg.nrrd", "a_qc.png", "a_wmh.nii.gz"]
    assert segment.journal_path(out / "a_report.json").exists()


def test_overwrite_after_a_killed_run_removes_its_outline_series_never_a_users_images_there(tmp_path, tiny_model,
                                                                                          monkeypatch):
    """A run killed before its report lists its outline series' folder in its journal, by name alone; --overwrite
    emptied it of every IM*.dcm, a user's images put there (a FLAIR's, under the series' names) among them. Now they
    are known by their headers: the folder holding a user's images is refused before any work, with --dicom-outline
    or without it, and left as it is; the killed run's own series is still removed."""
    image, _ = make_volume(size=(32, 32, 4))
    scan = write_dicom_series(tmp_path / "scans" / "a", sitk.Cast(image, sitk.sitkInt16), description="AX FLAIR")
    out, folder = tmp_path / "out", tmp_path / "out" / "a_outline_dicom"
    killed_at(monkeypatch, "a_report.json")
    assert run_segment(tiny_model, scan, "-o", out, "--dicom-outline") == 1
    revived(monkeypatch)
    assert "a_outline_dicom" in json.loads(segment.journal_path(out / "a_report.json").read_text())["outputs"]
    killed = names(out)
    own = tmp_path / "own_outline"
    os.replace(folder, own)  # the killed run's series, put aside
    folder.mkdir()
    for k, path in enumerate(sorted(scan.iterdir()), start=1):
        (folder / f"IM{k:05d}.dcm").write_bytes(path.read_bytes())
    theirs = {p.name: p.read_bytes() for p in folder.iterdir()}
    for options in ([], ["--dicom-outline"]):
        assert run_segment(tiny_model, scan, "-o", out, "--overwrite", *options) == 1
        assert "holds DICOM images that are not DeepWML's outline series" in status(out)["error"]
        assert {p.name: p.read_bytes() for p in folder.iterdir()} == theirs
        assert names(out) == killed  # nothing done
    for path in folder.iterdir():  # the user takes theirs away; the killed run's series is back
        path.unlink()
    folder.rmdir()
    os.replace(own, folder)
    assert run_segment(tiny_model, scan, "-o", out, "--overwrite") == 0
    assert "a_outline_dicom" not in names(out) and "a_report.json" in names(out)
