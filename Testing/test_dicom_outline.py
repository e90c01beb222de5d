"""`deepwml segment --dicom-outline`: the FLAIR with the lesions outlined as a new DICOM series of the
same study, on the input's own slices (DeepWMLLib/dicom_outline.py)."""

from __future__ import annotations

import csv
import time
import json
import os
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from DeepWMLLib import dicom_outline, io, qc
from DeepWMLLib.cli import main
from DeepWMLLib.errors import DeepWMLError

from conftest import (counting_outline_reads, make_volume, record_syncs_and_renames, rotation, stepped_positions,
                      users_images_in, write_dicom_series, write_enhanced_mr)

PATIENT = {"0010|0010": "Doe^Jane", "0010|0020": "PAT-0042", "0010|0030": "19500101", "0010|0040": "F",
           "0008|0020": "20260110", "0008|0050": "ACC77", "0020|0052": "1.2.3.77", "0008|1030": "MRI brain"}


def read_series(folder):
    """(the image, the per-file header dictionaries in slice order) of the one series in `folder`."""
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    image = reader.Execute()
    headers = [{key: reader.GetMetaData(k, key).strip() for key in reader.GetMetaDataKeys(k)} for k in range(len(files))]
    return image, headers


def oblique_flair(tmp_path, slices=6):
    direction = rotation(0.12, -0.08, 0.3).ravel().tolist()
    image, truth = make_volume(size=(40, 36, slices), spacing=(0.7, 0.8, 5.0), direction=direction,
                               blobs=((0.4, 0.5, 0.5, 6.0), (0.7, 0.3, 0.3, 3.0)), dtype=sitk.sitkInt16)
    folder = write_dicom_series(tmp_path / "flair", image, uid="1.2.3.4.5", description="AX T2 FLAIR", number=7,
                                inversion_ms=2500, repetition_ms=9000, extra=PATIENT)
    return folder, truth


def test_the_outline_series_lies_on_the_input_slices_in_the_same_study(tmp_path):
    folder, truth = oblique_flair(tmp_path)
    series, _ = io.choose_dicom_series(folder)
    flair = io.read_image(folder, series=series)
    report = {"model_sha256": ["abc123"], "volume_ml": 1.5, "lesion_count": 2}
    prepared = dicom_outline.outline_series(flair, truth, series, report)
    written = dicom_outline.write_outline_series(prepared, tmp_path / "out_dicom")
    assert written["folder"] == "out_dicom" and written["images"] == 6 and written["series_number"] == 1007
    image, headers = read_series(tmp_path / "out_dicom")
    assert image.GetNumberOfComponentsPerPixel() == 3 and image.GetSize() == flair.GetSize()
    assert np.allclose(image.GetOrigin(), flair.GetOrigin(), atol=1e-4)
    assert np.allclose(image.GetSpacing(), flair.GetSpacing(), atol=1e-4)
    assert np.allclose(image.GetDirection(), flair.GetDirection(), atol=1e-6)
    for k, header in enumerate(headers):
        for tag, value in PATIENT.items():
            assert header[tag] == value, tag
        assert header["0020|000d"] == "1.2.3.4"  # the source's study
        assert header["0020|000e"] == written["series_uid"] != "1.2.3.4.5"
        assert header["0008|0016"] == dicom_outline.SECONDARY_CAPTURE and header["0008|0060"] == "MR"
        assert header["0008|0008"] == "DERIVED\\SECONDARY" and header["0020|0011"] == "1007"
        assert header["0008|103e"] == "DeepWML WMH outline (AX T2 FLAIR)" and header["0008|0005"] == "ISO_IR 192"
        assert "abc123" in header["0008|2111"] and "not for diagnosis" in header["0008|2111"]
        assert int(header["0020|0013"]) == k + 1
    uids = {h["0008|0018"] for h in headers}
    assert len(uids) == 6 and all(u.startswith("2.25.") and len(u) <= 64 for u in uids)
    pixels = sitk.GetArrayFromImage(image)
    marked = sitk.GetArrayFromImage(truth) > 0
    red = np.all(pixels == np.array(qc.LESION_RGB, np.uint8), axis=-1)
    caption_rows = slice(pixels.shape[1] - 9, None)
    for k in range(pixels.shape[0]):
        assert np.array_equal(red[k][:caption_rows.start], qc.in_plane_outline(marked[k])[:caption_rows.start])
    grey = ~red
    assert np.array_equal(pixels[..., 0][grey], pixels[..., 1][grey])  # the FLAIR in grey elsewhere
    assert marked.any() and red.any()
    # the FLAIR's grey levels follow the FLAIR: brighter voxels never darker
    flat = sitk.GetArrayFromImage(flair)[:, :caption_rows.start][grey[:, :caption_rows.start]]
    shown = pixels[:, :caption_rows.start][grey[:, :caption_rows.start]][:, 0]
    order = np.argsort(flat, kind="stable")
    assert np.all(np.diff(shown[order].astype(int)) >= 0)


def test_the_outline_series_is_on_disk_before_its_name_and_its_name_before_the_report(tmp_path, monkeypatch):
    """The series was built in a folder beside its name and renamed into place, but its images were never synced
    (every other output is: io.write_atomically): after a power cut its folder could hold empty or cut-short
    images under the series' name beside a complete report. Now each image and the folder are synced before the
    rename (a first series and one replacing an earlier run's), and the rename before the report is written."""
    import os

    folder, truth = oblique_flair(tmp_path)
    series, _ = io.choose_dicom_series(folder)
    prepared = dicom_outline.outline_series(io.read_image(folder, series=series), truth, series, {})
    events = record_syncs_and_renames(monkeypatch)
    out = tmp_path / "out_dicom"
    for overwrite in (False, True):
        events.clear()
        dicom_outline.write_outline_series(prepared, out, overwrite=overwrite)
        renamed = [k for k, (kind, stat) in enumerate(events) if kind == "rename" and os.path.samestat(stat, os.stat(out))]
        assert len(renamed) == 1, events
        k = renamed[0]
        synced = [stat for kind, stat in events[:k] if kind == "sync"]
        images = sorted(out.iterdir())
        assert len(images) == 6
        for item in [out, *images]:
            assert any(os.path.samestat(stat, os.stat(item)) for stat in synced), (item, events)
        assert any(kind == "sync" and os.path.samestat(stat, os.stat(tmp_path)) for kind, stat in events[k + 1:]), events


def test_a_latin1_patient_name_is_written_as_utf8(tmp_path):
    image, truth = make_volume(size=(24, 20, 3), spacing=(0.9, 0.9, 5.0), dtype=sitk.sitkInt16)
    folder = write_dicom_series(tmp_path / "latin", image, description="FLAIR",
                                extra={"0008|0005": "ISO_IR 100", "0010|0010": "M@ller^J@rg"})
    for path in folder.iterdir():
        path.write_bytes(path.read_bytes().replace(b"M@ller^J@rg", b"M\xfcller^J\xf6rg"))
    series, _ = io.choose_dicom_series(folder)
    dicom_outline.write_outline_series(dicom_outline.outline_series(io.read_image(folder), truth, series, {}), tmp_path / "o")
    _, headers = read_series(tmp_path / "o")
    assert headers[0]["0010|0010"] == "M\u00fcller^J\u00f6rg" and headers[0]["0008|0005"] == "ISO_IR 192"


def test_segment_writes_it_for_dicom_inputs_and_says_why_not_for_others(tmp_path, tiny_model, capsys):
    folder, _ = oblique_flair(tmp_path)
    plain, _ = make_volume(size=(32, 32, 4))
    sitk.WriteImage(sitk.Cast(plain, sitk.sitkUInt16), str(tmp_path / "plain.nii.gz"))
    out = tmp_path / "out"
    args = ["segment", str(folder), str(tmp_path / "plain.nii.gz"), "-o", str(out), "--model", str(tiny_model),
            "--device", "cpu"]
    assert main(args + ["--dicom-outline"]) == 0
    report = json.loads((out / "flair_report.json").read_text(encoding="utf-8"))
    assert report["dicom_outline"]["folder"] == "flair_outline_dicom" and report["dicom_outline"]["images"] == 6
    image, headers = read_series(out / "flair_outline_dicom")
    mask = sitk.ReadImage(str(out / "flair_wmh.nrrd"))
    assert io.grid_difference(sitk.VectorIndexSelectionCast(image, 0), mask) is None
    assert headers[0]["0020|000e"] == report["dicom_outline"]["series_uid"]
    assert f"{report['volume_ml']:.2f} ml" in headers[0]["0008|2111"]
    plain_report = json.loads((out / "plain_report.json").read_text(encoding="utf-8"))
    assert "dicom_outline" not in plain_report and not (out / "plain_outline_dicom").exists()
    assert any(w.startswith("no DICOM outline series: the input is not DICOM") for w in plain_report["warnings"])
    assert "no DICOM outline series" in capsys.readouterr().err
    # replaced by a rerun with --overwrite (a new series), removed by one that does not ask for it
    first = report["dicom_outline"]["series_uid"]
    assert main(args + ["--dicom-outline", "--overwrite"]) == 0
    report = json.loads((out / "flair_report.json").read_text(encoding="utf-8"))
    assert report["dicom_outline"]["series_uid"] != first
    assert read_series(out / "flair_outline_dicom")[1][0]["0020|000e"] == report["dicom_outline"]["series_uid"]
    assert sorted(p.name for p in (out / "flair_outline_dicom").iterdir()) == [f"IM{k:05d}.dcm" for k in range(1, 7)]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary folder left
    assert main(args + ["--overwrite"]) == 0
    assert not (out / "flair_outline_dicom").exists()
    # a folder of that name holding someone else's files is never deleted
    (out / "flair_outline_dicom").mkdir()
    (out / "flair_outline_dicom" / "notes.txt").write_text("mine")
    mask_time = (out / "flair_wmh.nrrd").stat().st_mtime_ns
    assert main(args + ["--dicom-outline", "--overwrite"]) == 1
    assert (out / "flair_outline_dicom" / "notes.txt").read_text() == "mine"
    assert (out / "flair_wmh.nrrd").stat().st_mtime_ns == mask_time  # refused before anything was written


def _series_with(tmp_path, name, replace: dict | None = None, **kwargs):
    """A small FLAIR series whose header bytes are then edited (`replace`: placeholder bytes -> bytes of the
    same length), for character sets SimpleITK cannot write itself."""
    image, truth = make_volume(size=(24, 20, 4), spacing=(0.9, 0.9, 5.0), dtype=sitk.sitkInt16)
    folder = write_dicom_series(tmp_path / name, image, description="FLAIR", **kwargs)
    for path in folder.iterdir():
        data = path.read_bytes()
        for old, new in (replace or {}).items():
            data = data.replace(old, new)
        path.write_bytes(data)
    return folder, truth


def _outline(folder, truth, out):
    series, _ = io.choose_dicom_series(folder)
    return dicom_outline.write_outline_series(
        dicom_outline.outline_series(io.read_image(folder), truth, series, {}), out)


def test_names_in_other_character_sets_and_what_is_refused(tmp_path):
    """Cyrillic and Latin-2 names are decoded in their own character set; spaces inside a value are kept;
    a character set DeepWML does not know, or a series without a study, is refused before anything is written."""
    name = "\u0418\u0432\u0430\u043d\u043e\u0432^\u0418\u0432\u0430\u043d"  # Ivanov^Ivan in Cyrillic
    folder, truth = _series_with(tmp_path, "cyrillic", {b"PLACEHOLDER": name.encode("iso8859_5")},
                                 extra={"0008|0005": "ISO_IR 144", "0010|0010": "PLACEHOLDER", "0010|0020": "AB  0042"})
    _outline(folder, truth, tmp_path / "o1")
    header = read_series(tmp_path / "o1")[1][0]
    assert header["0010|0010"] == name and header["0010|0020"] == "AB  0042"
    name = "Dvo\u0159\u00e1k^Ji\u0159\u00ed"
    folder, truth = _series_with(tmp_path, "latin2", {b"PLACEHOLDER": name.encode("iso8859_2")},
                                 extra={"0008|0005": "ISO_IR 101", "0010|0010": "PLACEHOLDER"})
    _outline(folder, truth, tmp_path / "o2")
    assert read_series(tmp_path / "o2")[1][0]["0010|0010"] == name
    folder, truth = _series_with(tmp_path, "unknown", extra={"0008|0005": "ISO_IR 999", "0010|0010": "X"})
    with pytest.raises(DeepWMLError, match="character set .*ISO_IR 999"):
        _outline(folder, truth, tmp_path / "o3")
    assert not (tmp_path / "o3").exists()


def test_type2_attributes_stay_empty_and_a_series_needs_its_study(tmp_path):
    """A de-identified source with empty or missing patient and study attributes: written empty (GDCM would
    put today's date in, a different time on each image), never made up; no Study Instance UID: refused."""
    folder, truth = _series_with(tmp_path, "anon", extra={"0010|0010": "", "0008|0020": "", "0008|0030": ""})
    _outline(folder, truth, tmp_path / "o")
    headers = read_series(tmp_path / "o")[1]
    for tag in ("0010|0010", "0008|0020", "0008|0030", "0010|0030", "0008|0050"):
        assert {h.get(tag) for h in headers} == {""}, tag
    series, _ = io.choose_dicom_series(folder)
    attributes = dicom_outline.source_attributes(series)
    assert attributes["0020|000d"] == "1.2.3.4"
    folder, truth = _series_with(tmp_path, "nostudy", {b"1.2.3.4\x00": b"\x00" * 8},
                                 extra={"0020|000d": "1.2.3.4"})
    with pytest.raises(DeepWMLError, match="no Study Instance UID"):
        _outline(folder, truth, tmp_path / "o2")


def test_images_keep_the_sources_instance_numbers_and_description_is_one_value(tmp_path):
    """A series stored from the top of the head down (Instance Number 1 the highest slice): each outline
    image gets the number of the source image at its position, so both series scroll alike."""
    image, truth = make_volume(size=(24, 20, 5), spacing=(0.9, 0.9, 5.0), dtype=sitk.sitkInt16,
                               direction=(1, 0, 0, 0, 1, 0, 0, 0, -1))
    folder = write_dicom_series(tmp_path / "down", image, description="FLAIR\\AX")
    _outline(folder, truth, tmp_path / "o")
    _, source = read_series(folder)
    _, out = read_series(tmp_path / "o")
    by_position = {h["0020|0032"]: h["0020|0013"] for h in source}
    numbers = [(h["0020|0013"], by_position[h["0020|0032"]]) for h in out]
    assert all(a == b for a, b in numbers) and numbers[0][0] != "1"
    assert out[0]["0008|103e"] == "DeepWML WMH outline (FLAIR/AX)"


def test_a_failed_replacement_leaves_the_case_without_outputs_for_the_next_run_to_redo(tmp_path, tiny_model,
                                                                                       monkeypatch):
    """--overwrite: when the new series cannot be put in place, no temporary folder is left and the case's
    outputs all go (its old report first, the new mask, the earlier series), never a set half old, half new:
    the next run redoes the case, without --overwrite."""
    folder, _ = oblique_flair(tmp_path)
    out = tmp_path / "out"
    args = ["segment", str(folder), "-o", str(out), "--model", str(tiny_model), "--device", "cpu", "--dicom-outline"]
    assert main(args) == 0
    first = read_series(out / "flair_outline_dicom")[1][0]["0020|000e"]
    real_replace = dicom_outline.os.replace

    def failing(source, target):
        if str(source).endswith(".part"):
            raise OSError(28, "No space left on device")
        return real_replace(source, target)

    monkeypatch.setattr(dicom_outline.os, "replace", failing)
    assert main(args + ["--overwrite"]) == 1
    assert "No space left on device" in read_summary_error(out)
    monkeypatch.setattr(dicom_outline.os, "replace", real_replace)
    assert list(out.iterdir()) == [out / "summary.csv"]
    assert main(args) == 0 and (out / "flair_report.json").is_file()
    assert read_series(out / "flair_outline_dicom")[1][0]["0020|000e"] != first


def read_summary_error(out):
    import csv

    with open(out / "summary.csv", newline="", encoding="utf-8-sig") as f:
        return next(csv.DictReader(f))["error"]


def test_an_outline_series_back_in_its_study_is_never_taken_for_the_flair(tmp_path):
    """Sent to PACS and exported again with its study (or written inside the input's folder), the outline
    series, whose description holds the FLAIR's, is a Secondary Capture: never a FLAIR candidate."""
    folder, truth = oblique_flair(tmp_path)
    series, _ = io.choose_dicom_series(folder)
    written = dicom_outline.write_outline_series(
        dicom_outline.outline_series(io.read_image(folder), truth, series, {}), tmp_path / "outline")
    for path in (tmp_path / "outline").iterdir():
        path.rename(folder / f"outline_{path.name}")
    chosen, how = io.choose_dicom_series(folder)
    assert chosen.uid == series.uid and how == "the only one of 2 series that looks like a FLAIR"
    assert io.choose_dicom_series(folder, "flair")[0].uid == series.uid  # its description shared: the FLAIR
    assert io.choose_dicom_series(folder, str(written["series_number"]))[0].uid == written["series_uid"]
    studies, _ = io.dicom_catalogue(tmp_path / "flair")
    assert io.choose_dicom_series(folder, candidates=studies[0].series, strict=True)[0].uid == series.uid


def test_an_outline_series_written_inside_the_export_leaves_the_case_as_it_was(tmp_path, tiny_model):
    """-o inside a PACS export with --dicom-outline: the outline series joins the study on disk, yet the
    next run finds the same case (named by the folder of its images), whose outputs exist: skipped."""
    export = tmp_path / "export"
    oblique_flair(export / "patientA")
    out = export / "results"
    args = ["segment", str(export), "-o", str(out), "--model", str(tiny_model), "--device", "cpu", "--dicom-outline"]
    assert main(args) == 0
    assert (out / "patientA_flair_outline_dicom").is_dir()
    studies, _ = io.dicom_catalogue(export)
    assert [s.name for s in studies] == ["patientA_flair"] and len(studies[0].series) == 2
    assert main(args) == 0
    with open(out / "summary.csv", newline="", encoding="utf-8-sig") as f:
        assert [(r["case"], r["status"]) for r in csv.DictReader(f)] == [("patientA_flair", "skipped")]


def test_an_outdir_holding_an_outline_series_given_as_input_is_named_as_outputs(tmp_path, tiny_model):
    """OUTDIR given for the scans after a run with --dicom-outline: its outline series, in a folder below it, made it
    a PACS export whose one study (the outline, no FLAIR) was skipped and the run ended 'no series looks like a FLAIR
    ... choose it with --series'; its files are the earlier run's outputs, which its report lists, as a folder of
    masks or a SEG beside them is called. With the FLAIR's own study in the export, the outline joins it (above)."""
    folder, _ = oblique_flair(tmp_path)
    out = tmp_path / "out"
    args = ["--model", str(tiny_model), "--device", "cpu"]
    assert main(["segment", str(folder), "-o", str(out), "--dicom-outline"] + args) == 0
    assert (out / "flair_outline_dicom").is_dir()
    assert main(["segment", str(out), "-o", str(tmp_path / "again")] + args) == 1
    error = read_summary_error(tmp_path / "again")
    assert "holds only the outputs of an earlier DeepWML run (1 case(s): flair)" in error, error
    # the same series without the report that lists it (copied elsewhere, the report left behind): a study without a
    # FLAIR, named by its headers as DeepWML's outline series; it was said to hold none that looks like a FLAIR,
    # 'choose one with --series', which then refused it as '3 values per voxel (vector/RGB)'
    for path in out.iterdir():
        if path.is_file():
            path.unlink()
    assert main(["segment", str(out), "-o", str(tmp_path / "third")] + args) == 1
    error = read_summary_error(tmp_path / "third")
    assert "flair_outline_dicom holds only DeepWML's outline series" in error and "--series" not in error, error
    assert "give the folder of the FLAIR series it was drawn from" in error, error


def test_a_rerun_asking_for_the_outline_does_not_take_a_users_folder_of_its_name_for_it(tmp_path, tiny_model):
    """A case done without --dicom-outline, a folder CASE_outline_dicom of the user's images beside it (its report does
    not list it): a rerun with --dicom-outline said 'skipped - outputs exist (..., flair_outline_dicom)', the user's
    images taken for the outline series asked for, none made. Now the folder is no output of the case's: the outline
    is to be added, and the folder, holding images that are not DeepWML's, is refused as such, left as it is."""
    folder, _ = oblique_flair(tmp_path)
    out = tmp_path / "out"
    args = ["segment", str(folder), "-o", str(out), "--model", str(tiny_model), "--device", "cpu"]
    assert main(args) == 0
    theirs = out / "flair_outline_dicom"
    theirs.mkdir()
    shutil.copy(sorted(folder.iterdir())[0], theirs / "IM00001.dcm")  # a FLAIR image, not DeepWML's
    report = (out / "flair_report.json").read_bytes()
    assert main(args + ["--dicom-outline"]) == 1
    error = read_summary_error(out)
    assert "flair_outline_dicom holds DICOM images that are not DeepWML's outline series" in error, error
    assert [p.name for p in theirs.iterdir()] == ["IM00001.dcm"] and (out / "flair_report.json").read_bytes() == report
    # the case's own outline, listed by its report, still makes the rerun a skip
    shutil.rmtree(theirs)
    assert main(args + ["--dicom-outline"]) == 0  # added
    assert main(args + ["--dicom-outline"]) == 0
    with open(out / "summary.csv", newline="", encoding="utf-8-sig") as f:
        assert [r["status"] for r in csv.DictReader(f)] == ["skipped"]


def test_the_cases_own_outline_is_known_when_its_name_is_typed_in_other_letters(tmp_path, tiny_model):
    """On macOS and Windows (file names alike but for upper/lower case are one), a case done with --dicom-outline from
    .../flair, rerun with it typed .../FLAIR: its report (found as FLAIR_report.json) lists flair_outline_dicom, and
    the folder FLAIR_outline_dicom there is that one. It was taken for a user's folder the report does not list (an
    outline to add): the rerun failed, where it had been skipped. Here the file system is as such a one shows it:
    the earlier run's files under both names, their contents (the report's list) as written."""
    folder, _ = oblique_flair(tmp_path)
    out = tmp_path / "out"
    args = ["-o", str(out), "--model", str(tiny_model), "--device", "cpu", "--dicom-outline"]
    assert main(["segment", str(folder)] + args) == 0
    assert "flair_outline_dicom" in json.loads((out / "flair_report.json").read_text(encoding="utf-8"))["outputs"]
    for path in list(out.iterdir()):  # each file and the folder under both names (hard links, a link for the folder)
        for lower in ("flair", ".flair"):
            if path.name.startswith(lower):
                other = out / (lower.upper() + path.name[len(lower):])
                other.symlink_to(path.name) if path.is_dir() else os.link(path, other)
    typed = folder.parent / "FLAIR"
    typed.symlink_to(folder)
    outline = contents(out / "FLAIR_outline_dicom")
    assert main(["segment", str(typed)] + args) == 0
    with open(out / "summary.csv", newline="", encoding="utf-8-sig") as f:
        assert [(r["case"], r["status"]) for r in csv.DictReader(f)] == [("FLAIR", "skipped")]
    assert contents(out / "FLAIR_outline_dicom") == outline


def test_a_users_folder_of_the_outlines_name_in_a_new_outdir_is_said_to_be_theirs_at_once(tmp_path, tiny_model):
    """No report in OUTDIR, a folder CASE_outline_dicom of the user's there: --dicom-outline said 'an earlier run left
    an incomplete set of outputs (flair_outline_dicom; ...); rerun with --overwrite', and --overwrite then refused the
    folder as not DeepWML's (or, a file of that name, said 'exists; ... rerun with --overwrite' again). The first
    refusal now says what is in the way and what to do; the folder is left as it is, nothing written. An empty
    folder of the name is still replaced by --overwrite, as before."""
    folder, _ = oblique_flair(tmp_path)
    out = tmp_path / "out"
    args = ["segment", str(folder), "-o", str(out), "--model", str(tiny_model), "--device", "cpu", "--dicom-outline"]
    theirs = out / "flair_outline_dicom"
    before = users_images_in(folder, theirs)
    for options in ([], ["--overwrite"]):
        assert main(args + options) == 1
        error = read_summary_error(out)
        assert f"{theirs} holds DICOM images that are not DeepWML's outline series" in error, error
        assert contents(theirs) == before and sorted(p.name for p in out.iterdir()) == ["flair_outline_dicom",
                                                                                      "summary.csv"]
    shutil.rmtree(theirs)
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    assert main(args) == 1
    assert f"{theirs} holds files DeepWML did not write there (1: notes.txt); move them" in read_summary_error(out)
    shutil.rmtree(theirs)
    theirs.write_text("mine")  # a file of the folder's name: not 'rerun with --overwrite', which says that again
    for options in ([], ["--overwrite"]):
        assert main(args + options) == 1
        error = read_summary_error(out)
        assert f"{theirs} is a file, where the outline series' folder is to be written; move it" in error, error
        assert "--overwrite" not in error and theirs.read_text() == "mine"
    theirs.unlink()
    theirs.mkdir()
    assert main(args) == 1
    assert "an earlier run left an incomplete set of outputs (flair_outline_dicom; no flair_report.json)" \
        in read_summary_error(out)
    assert main(args + ["--overwrite"]) == 0 and len(list(theirs.glob("IM*.dcm"))) == 6


def test_an_outline_series_given_for_the_scan_is_named_as_deepwmls_outline(tmp_path, tiny_model, capsys):
    """An outline series' folder (or an OUTDIR holding it) given as the FLAIR: read as the folder's only series, it was
    refused as 'has 3 values per voxel (vector/RGB)' by segment, export and change, words that do not say it is an
    earlier run's output. Now it is named as DeepWML's outline series, and the FLAIR's folder asked for; chosen by
    name it is read as before (and refused as RGB); among other series it is passed over, as before."""
    folder, _ = oblique_flair(tmp_path)
    out = tmp_path / "out"
    model = ["--model", str(tiny_model), "--device", "cpu"]
    assert main(["segment", str(folder), "-o", str(out), "--dicom-outline"] + model) == 0
    outline = out / "flair_outline_dicom"
    said = "holds only DeepWML's outline series, series 1007 'DeepWML WMH outline (AX T2 FLAIR)' (6 images): a FLAIR"
    for given in (outline, out):
        with pytest.raises(DeepWMLError, match="give the folder of the FLAIR series it was drawn from") as refused:
            io.choose_dicom_series(given)
        assert f"{given} {said}" in str(refused.value)
    assert main(["segment", str(outline), "-o", str(tmp_path / "again")] + model) == 1
    assert f"{outline} {said}" in read_summary_error(tmp_path / "again")
    capsys.readouterr()
    assert main(["export", str(out), str(out / "flair_wmh.nrrd"), "-o", str(tmp_path / "exported")]) == 1
    assert f"{out} {said}" in capsys.readouterr().err
    assert io.choose_dicom_series(outline, "1007")[0].secondary_capture  # named: taken
    with pytest.raises(DeepWMLError, match="3 values per voxel"):
        io.read_image(outline, series="1007")


def test_japanese_names_with_half_width_katakana(tmp_path):
    """ISO 2022 IR 13 with IR 87, as Japanese DICOM writes names: half-width katakana as 8-bit bytes,
    kanji and hiragana behind escape sequences (DICOM PS3.5 annex H)."""
    raw = (bytes([0xD4, 0xCF, 0xC0, 0xDE]) + b"^" + bytes([0xC0, 0xDB, 0xB3]) + b"="
           + "\u5c71\u7530".encode("iso2022_jp") + b"^" + "\u592a\u90ce".encode("iso2022_jp"))
    text = io.header_value(raw.decode("utf-8", "surrogateescape"), "ISO 2022 IR 13\\ISO 2022 IR 87")
    assert text == "\uff94\uff8f\uff80\uff9e^\uff80\uff9b\uff73=\u5c71\u7530^\u592a\u90ce"
    assert io.header_value("\udcff".encode("utf-8", "surrogateescape").decode("utf-8", "surrogateescape"),
                           "ISO 2022 IR 13\\ISO 2022 IR 87") is None  # not valid there: None, never garbled


def test_report_and_picture_name_dicom_slices_by_their_instance_numbers(tmp_path, monkeypatch, tiny_model):
    """Many scanners number a series from the top down: the report's `dicom_instance` (and the QC tiles)
    give the image number PACS shows beside the voxel index."""
    from conftest import oracle_network

    oracle_network(monkeypatch)
    image, truth = make_volume(size=(40, 36, 6), spacing=(0.9, 0.9, 5.0), blobs=((0.5, 0.5, 0.35, 5.0),),
                               dtype=sitk.sitkInt16)
    folder = write_dicom_series(tmp_path / "flair", image, description="AX FLAIR",
                                instance_numbers=[60, 50, 40, 30, 20, 10])  # slice 0 (inferior) is image 60
    out = tmp_path / "out"
    assert main(["segment", str(folder), "-o", str(out), "--model", str(tiny_model), "--device", "cpu",
                 "--no-brain-mask", "--qc"]) == 0
    report = json.loads((out / "flair_report.json").read_text(encoding="utf-8"))
    assert [row["dicom_instance"] for row in report["slices"]] == [60 - 10 * row["index"] for row in report["slices"]]
    lesion = report["lesions"][0]
    assert lesion["dicom_instance_range"] == [60 - 10 * k for k in lesion["slice_range"]]
    numbered = qc.render(image, truth, slice_labels=[60, 50, 40, 30, 20, 10])
    assert not np.array_equal(numbered, qc.render(image, truth))  # the tiles carry other numbers
    plain = tmp_path / "plain.nii.gz"
    sitk.WriteImage(image, str(plain))
    assert main(["segment", str(plain), "-o", str(out), "--model", str(tiny_model), "--device", "cpu",
                 "--no-brain-mask"]) == 0
    assert "dicom_instance" not in json.loads((out / "plain_report.json").read_text(encoding="utf-8"))["slices"][0]


def test_each_image_lies_where_its_source_slice_was_imaged(tmp_path):
    """Slices a little unevenly spaced (read, with a warning, on the regular grid of their mean step): each
    outline image keeps its source image's own Image Position (Patient), as a viewer's cross-reference lines
    and linked scrolling need, not its place on that grid (0.32 mm off here)."""
    image, truth = make_volume(size=(24, 20, 6), spacing=(0.9, 0.9, 5.16), dtype=sitk.sitkInt16,
                               direction=rotation(0.1, 0.05, 0.2).ravel().tolist())
    positions = stepped_positions(image, [5.0, 5.0, 5.8, 5.0, 5.0])
    folder = write_dicom_series(tmp_path / "uneven", image, description="FLAIR", positions=positions)
    _outline(folder, truth, tmp_path / "o")
    _, source = read_series(folder)
    _, out = read_series(tmp_path / "o")
    for written, own in zip(out, source):
        assert written["0020|0013"] == own["0020|0013"]
        assert np.allclose([float(v) for v in written["0020|0032"].split("\\")],
                           [float(v) for v in own["0020|0032"].split("\\")], atol=1e-4), (written["0020|0032"], own["0020|0032"])


@pytest.mark.parametrize("order, files", [(None, 1), (range(5, -1, -1), 1),  # frames stored from the first slice; from the last
                                          (None, 6)])  # a file a frame
def test_each_image_of_an_enhanced_source_lies_where_its_frame_was_imaged(tmp_path, order, files):
    """Enhanced MR frames a little unevenly spaced, their positions with float noise (read on the regular grid of
    their mean step): each outline image keeps its frame's own Plane Position (Patient) from the Per-frame
    Functional Groups, numbered as the frame, not its place on that grid (0.32 mm off here)."""
    image, truth = make_volume(size=(24, 20, 6), spacing=(0.9, 0.9, 5.16), dtype=sitk.sitkInt16,
                               direction=rotation(0.1, 0.05, 0.2).ravel().tolist())
    positions = stepped_positions(image, [5.0, 5.0, 5.8, 5.0, 5.0], noise_mm=0.05)
    folder = tmp_path / "enhanced"
    stored = list(order or range(6))
    for k, frames in enumerate([stored] if files == 1 else [[k] for k in stored]):
        write_enhanced_mr(folder / f"flair{k}.dcm", image, order=frames, positions=positions)
    flair = io.read_image(folder)
    _outline(folder, sitk.Resample(truth, flair, sitk.Transform(), sitk.sitkNearestNeighbor), tmp_path / "o")
    _, out = read_series(tmp_path / "o")
    assert sorted(int(written["0020|0013"]) for written in out) == [1, 2, 3, 4, 5, 6]
    for written in out:
        frame = positions[stored[int(written["0020|0013"]) - 1]]
        assert np.allclose([float(v) for v in written["0020|0032"].split("\\")], frame, atol=1e-4), \
            (written["0020|0032"], frame)


def test_a_series_number_near_the_top_of_its_range_stays_in_it(tmp_path):
    """Series Number is an IS: at most 2147483647. A source numbered within 1000 of that is written 1000 below
    it (still beside it in PACS, never the same number), not past the range where a PACS refuses the images."""
    folder, truth = _series_with(tmp_path, "high", number=2147483000)
    written = _outline(folder, truth, tmp_path / "o")
    assert written["series_number"] == 2147482000
    assert {h["0020|0011"] for h in read_series(tmp_path / "o")[1]} == {"2147482000"}
    folder, truth = _series_with(tmp_path, "usual", number=64600)
    assert _outline(folder, truth, tmp_path / "o2")["series_number"] == 65600


def test_burned_in_annotation_says_yes_where_the_source_pixels_carry_one(tmp_path):
    """Burned In Annotation tells de-identification and sharing tools whether the pixels name the patient or the
    date. The caption does not (NO), but the outline shows the source's pixels: a source whose pixels do (YES)
    makes an outline that does too, which must not claim NO."""
    folder, truth = _series_with(tmp_path, "burned", extra={"0028|0301": "YES"})
    _outline(folder, truth, tmp_path / "o")
    assert {h["0028|0301"] for h in read_series(tmp_path / "o")[1]} == {"YES"}
    folder, truth = _series_with(tmp_path, "clean", extra={"0028|0301": "NO"})
    _outline(folder, truth, tmp_path / "o2")
    assert {h["0028|0301"] for h in read_series(tmp_path / "o2")[1]} == {"NO"}


def contents(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_only_deepwmls_own_outline_images_are_replaced_or_removed(tmp_path):
    """An outline series' folder was emptied of IM*.dcm by their names: a FLAIR's images named so (a PACS export, or
    copied there) were deleted as if DeepWML's. Now its images are known by their headers (a Secondary Capture by
    DeepWML): a folder holding others is refused, naming it, before anything is written, and never emptied of them;
    DeepWML's own series is still replaced and removed, and a folder that is a symbolic link loses the link alone."""
    folder, truth = oblique_flair(tmp_path)
    series, _ = io.choose_dicom_series(folder)
    prepared = dicom_outline.outline_series(io.read_image(folder), truth, series, {})
    own = tmp_path / "own"
    _outline(folder, truth, own)
    assert dicom_outline.check_outline_folder(own, True) == own  # its own: replaced
    written = dicom_outline.write_outline_series(prepared, own, overwrite=True)
    assert read_series(own)[1][0]["0020|000e"] == written["series_uid"]
    theirs = tmp_path / "theirs"
    before = users_images_in(folder, theirs)
    with pytest.raises(DeepWMLError, match="not DeepWML's outline series") as refused:
        dicom_outline.check_outline_folder(theirs, True)
    assert str(theirs) in str(refused.value) and "move them" in str(refused.value)
    with pytest.raises(DeepWMLError, match="not DeepWML's outline series"):
        dicom_outline.write_outline_series(prepared, theirs, overwrite=True)
    dicom_outline.remove_outline_series(theirs)
    assert contents(theirs) == before
    assert [dicom_outline.is_outline_image(p) for p in (own / "IM00001.dcm", theirs / "IM00001.dcm")] == [True, False]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
    # one of theirs among DeepWML's images: refused, and a removal takes DeepWML's alone
    (own / "IM09999.dcm").write_bytes(before["IM00001.dcm"])
    with pytest.raises(DeepWMLError, match=r"\(1: IM09999.dcm;"):
        dicom_outline.check_outline_folder(own, True)
    dicom_outline.remove_outline_series(own)
    assert contents(own) == {"IM09999.dcm": before["IM00001.dcm"]}
    # a file that is not DICOM at all under such a name: not DeepWML's either
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "IM00001.dcm").write_bytes(b"\0" * 200)
    with pytest.raises(DeepWMLError, match="not DeepWML's outline series"):
        dicom_outline.check_outline_folder(tmp_path / "odd", True)
    # a symbolic link to their folder: not looked into, the link alone replaced
    link = tmp_path / "link"
    try:
        link.symlink_to(theirs, target_is_directory=True)
    except OSError:
        return  # no symbolic links here (Windows without the right)
    dicom_outline.write_outline_series(prepared, link, overwrite=True)
    assert not link.is_symlink() and read_series(link)[1][0]["0020|000e"] == prepared.series_uid
    assert contents(theirs) == before


def test_a_file_put_into_the_outline_folder_while_it_is_replaced_is_kept(tmp_path, monkeypatch, caplog):
    """The earlier series moved aside when the new one took its name was deleted whole (shutil.rmtree), so a file
    put into the folder after check_outline_folder looked (while the new series was built, seconds) was deleted
    with it. Now DeepWML's own images alone are deleted; the file is moved into the new series' folder (under
    another name where the series has one like it), said in a warning; no temporary folder is left."""
    folder, truth = oblique_flair(tmp_path)
    series, _ = io.choose_dicom_series(folder)
    prepared = dicom_outline.outline_series(io.read_image(folder), truth, series, {})
    own = tmp_path / "own"
    _outline(folder, truth, own)
    theirs = sorted(folder.iterdir())[0].read_bytes()
    checked = dicom_outline.check_outline_folder

    def check_then_drop(target, overwrite):
        found = checked(target, overwrite)
        (own / "notes.txt").write_text("mine")
        (own / "IM00001.dcm.bak").write_text("also mine")
        if (own / "IM00002.dcm").exists():
            (own / "IM00002.dcm").write_bytes(theirs)  # a FLAIR image over one of the old series' names
        return found

    monkeypatch.setattr(dicom_outline, "check_outline_folder", check_then_drop)
    with caplog.at_level("WARNING"):
        written = dicom_outline.write_outline_series(prepared, own, overwrite=True)
    kept = contents(own)
    assert kept["notes.txt"] == b"mine" and kept["IM00001.dcm.bak"] == b"also mine"
    assert kept["IM00002.kept1.dcm"] == theirs  # the new series has an IM00002.dcm of its own
    assert "were kept there" in caplog.text and "notes.txt" in caplog.text
    images = sorted(p for p in own.glob("IM?????.dcm"))
    assert len(images) == len(prepared.images)
    assert all(dicom_outline.is_outline_image(p) for p in images)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(images[0]))
    reader.ReadImageInformation()
    assert reader.GetMetaData("0020|000e").strip(" \0") == written["series_uid"]  # the new series'
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_segment_overwrite_refuses_an_outline_folder_holding_a_users_images(tmp_path, tiny_model):
    """--overwrite, with --dicom-outline (the series replaced) or without it (the earlier run's removed): the folder
    now holds a FLAIR's images under the series' names, which were deleted. Refused before anything is written,
    the images and the earlier result left as they were."""
    folder, _ = oblique_flair(tmp_path)
    out = tmp_path / "out"
    args = ["segment", str(folder), "-o", str(out), "--model", str(tiny_model), "--device", "cpu"]
    assert main(args + ["--dicom-outline"]) == 0
    target = out / "flair_outline_dicom"
    before = users_images_in(folder, target)
    report = (out / "flair_report.json").read_bytes()
    for options in (["--dicom-outline", "--overwrite"], ["--overwrite"]):
        assert main(args + options) == 1
        said = read_summary_error(out)
        assert f"{target} holds DICOM images that are not DeepWML's outline series (6: IM00001.dcm" in said
        assert contents(target) == before
        assert (out / "flair_report.json").read_bytes() == report  # refused before anything was written


def _settled(folder, seconds=600):
    """The images of `folder` as an earlier run's are: last modified minutes ago."""
    import os
    import time

    for image in folder.glob("IM*.dcm"):
        os.utime(image, (time.time() - seconds, time.time() - seconds))


def _earlier_series(tmp_path):
    """An oblique DICOM FLAIR (its folder), an outline series prepared from it, and an earlier run's outline series
    of it in tmp_path/own, last modified minutes ago."""
    folder, truth = oblique_flair(tmp_path)
    series, _ = io.choose_dicom_series(folder)
    prepared = dicom_outline.outline_series(io.read_image(folder), truth, series, {})
    own = tmp_path / "own"
    _outline(folder, truth, own)
    _settled(own)
    return folder, prepared, own


def test_each_outline_image_header_is_read_twice_where_a_series_is_replaced(tmp_path, monkeypatch):
    """Replacing an earlier run's outline series read each of its images' headers three times: the early check
    (check_outline_folder), the writer's own check and the removal of the series moved aside (0.4 s each for 200
    images). Now the checks read each once while it stays as it was (a file changed since it was read is read
    again), and the removal reads it again, as it deletes on that reading."""
    folder, prepared, own = _earlier_series(tmp_path)
    images = len(list(own.glob("IM*.dcm")))
    reads = counting_outline_reads(monkeypatch)
    dicom_outline.check_outline_folder(own, True)
    written = dicom_outline.write_outline_series(prepared, own, overwrite=True)
    assert len(reads) == 2 * images  # was 3 x images
    assert read_series(own)[1][0]["0020|000e"] == written["series_uid"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    # an image changed after it was read (the maker's name in place: the same size) is read again, and not DeepWML's
    _settled(own)
    dicom_outline.check_outline_folder(own, True)
    first = own / "IM00001.dcm"
    data = first.read_bytes()
    first.write_bytes(data.replace(b"DeepWML", b"OtherCo"))
    del reads[:]
    assert not dicom_outline.is_outline_image(first) and reads == [str(first)]
    # a file changed within the file system clock's tick of its last change may keep its times: never kept then
    monkeypatch.setattr(io, "_now_ns", time.time_ns)  # the real clock: its files changed moments ago
    monkeypatch.setattr(dicom_outline, "_VERDICTS", {}, raising=False)
    del reads[:]
    dicom_outline.foreign_images(own)
    dicom_outline.foreign_images(own)
    assert len(reads) == 2 * images


def test_a_file_changed_after_the_early_check_is_not_deleted_with_the_series(tmp_path, monkeypatch, caplog):
    """The verdicts kept from the early check (check_outline_folder) do not cover a file changed or put into the
    folder after it: an image of the earlier series overwritten with a FLAIR image, and one of the same size that
    DeepWML did not make, are read again and kept."""
    folder, prepared, own = _earlier_series(tmp_path)
    theirs = sorted(folder.iterdir())[0].read_bytes()
    same_size = (own / "IM00003.dcm").read_bytes().replace(b"DeepWML", b"OtherCo")
    dicom_outline.check_outline_folder(own, True)  # every verdict kept
    checked = dicom_outline.check_outline_folder

    def check_then_change(target, overwrite):
        found = checked(target, overwrite)
        (own / "IM00002.dcm").write_bytes(theirs)
        (own / "IM00003.dcm").write_bytes(same_size)
        return found

    monkeypatch.setattr(dicom_outline, "check_outline_folder", check_then_change)
    with caplog.at_level("WARNING"):
        dicom_outline.write_outline_series(prepared, own, overwrite=True)
    kept = contents(own)
    assert kept["IM00002.kept1.dcm"] == theirs and kept["IM00003.kept1.dcm"] == same_size
    assert "were kept there" in caplog.text


def test_an_outline_verdict_is_judged_against_the_time_its_reading_began(tmp_path, monkeypatch):
    """is_outline_image took the clock after the header was read, not before the file's status as io's rule does:
    a slow read (a stalled share, a laptop put to sleep) counted as the file's age, so the verdict of a file changed
    moments before was kept, and a change in the same tick of the file system's clock (its times as they were) would
    have been judged by it. Now the time the reading began is judged: not kept, read again."""
    folder, truth = oblique_flair(tmp_path)
    own = tmp_path / "own"
    _outline(folder, truth, own)  # written moments ago
    reads = counting_outline_reads(monkeypatch)
    counted = dicom_outline._reader

    def an_hour_passes(path, *args):
        reads.append("slept")
        return counted(path, *args)

    monkeypatch.setattr(dicom_outline, "_reader", an_hour_passes)
    monkeypatch.setattr(io, "_now_ns", lambda: time.time_ns() + (3600 * 10**9 if reads else 0))
    first = own / "IM00001.dcm"
    assert dicom_outline.is_outline_image(first)
    assert dicom_outline.is_outline_image(first)  # began an hour on: now kept
    assert dicom_outline.is_outline_image(first)
    assert reads.count(str(first)) == 2


def test_a_link_put_in_place_of_a_users_file_while_it_is_read_is_not_deleted(tmp_path, monkeypatch):
    """is_outline_image looked at the file's status (a file, not a link), then its reader followed whatever the name
    led to: a user's file replaced by a link to DeepWML's image between the two was judged DeepWML's, and the link
    deleted with the series. Now a file whose status changed while it was read is not DeepWML's."""
    import os
    import shutil

    folder, truth = oblique_flair(tmp_path)
    own = tmp_path / "own"
    _outline(folder, truth, own)
    theirs = own / "IM00099.dcm"
    theirs.write_bytes(sorted(folder.iterdir())[0].read_bytes())  # a FLAIR image: the user's
    ours = tmp_path / "elsewhere" / "IM00001.dcm"
    ours.parent.mkdir()
    shutil.copy(own / "IM00001.dcm", ours)
    reader = dicom_outline._reader

    def swapped(path, *args):
        if path == str(theirs) and not theirs.is_symlink():
            theirs.unlink()
            os.symlink(ours, theirs)
        return reader(path, *args)

    monkeypatch.setattr(dicom_outline, "_reader", swapped)
    monkeypatch.setattr(dicom_outline, "_VERDICTS", {}, raising=False)
    dicom_outline.remove_outline_series(own)
    assert theirs.is_symlink() and sorted(p.name for p in own.iterdir()) == ["IM00099.dcm"]


def test_an_image_is_deleted_on_a_header_read_then_not_on_a_verdict_kept(tmp_path, monkeypatch):
    """A file system may keep a rewritten file's key (FAT has no change time of its own: a user's file of the same
    size copied over DeepWML's image with its modification time kept, `cp -p`): the verdict kept from the early
    check would call it DeepWML's. The removal reads each header itself before it deletes."""
    folder, truth = oblique_flair(tmp_path)
    own = tmp_path / "own"
    _outline(folder, truth, own)
    _settled(own)
    assert not dicom_outline.foreign_images(own)  # every verdict kept: DeepWML's
    first = own / "IM00001.dcm"
    theirs = first.read_bytes().replace(b"DeepWML", b"OtherCo")
    key = dicom_outline._status_key(first)
    first.write_bytes(theirs)
    dicom_outline._VERDICTS[dicom_outline._status_key(first)] = dicom_outline._VERDICTS[key]  # as FAT would keep it
    dicom_outline.remove_outline_series(own)
    assert contents(own) == {"IM00001.dcm": theirs}


def test_an_export_of_outline_series_alone_is_not_sent_to_series(tmp_path, tiny_model, capsys):
    """An export whose every study is DeepWML's outline series (copied without the report that lists it): each case's
    row names the outline as not a scan, yet the run's last line said 'no series looks like a FLAIR ...; if one is,
    choose it with --series', which only leads to the outline read as a FLAIR in colour. Now that line says the
    studies hold DeepWML's outline series alone and asks for the FLAIR's folder; with a study of another exam among
    them, --series is offered as before."""
    folder, truth = oblique_flair(tmp_path)
    export = tmp_path / "export"
    for patient in ("patientA", "patientB"):
        (export / patient).mkdir(parents=True)
        _outline(folder, truth, export / patient / "outline")
    model = ["--model", str(tiny_model), "--device", "cpu"]
    capsys.readouterr()
    assert main(["segment", str(export), "-o", str(tmp_path / "out")] + model) == 1
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("deepwml segment: error:")]
    assert len(said) == 1 and "--series" not in said[0], said
    assert "only DeepWML's outline series" in said[0] and "not a scan" in said[0], said
    with open(tmp_path / "out" / "summary.csv", newline="", encoding="utf-8-sig") as f:
        rows = list(csv.DictReader(f))
    assert rows and all("holds only DeepWML's outline series" in r["error"] for r in rows), rows
    assert all("--series" not in r["error"] for r in rows), rows
    # another exam's study beside them (a T1, no FLAIR): --series may pick its FLAIR, offered as before
    image, _ = make_volume(size=(24, 20, 4), spacing=(0.9, 0.9, 5.0), dtype=sitk.sitkInt16)
    write_dicom_series(export / "patientC" / "t1", image, uid="1.2.3.9.9", description="SAG T1", number=3,
                       extra={**PATIENT, "0010|0020": "PAT-0043", "0020|000d": "1.2.3.9"})
    capsys.readouterr()
    assert main(["segment", str(export), "-o", str(tmp_path / "out2")] + model) == 1
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("deepwml segment: error:")]
    assert len(said) == 1 and "choose it with --series" in said[0], said


APPLEDOUBLE = b"\x00\x05\x16\x07\x00\x02\x00\x00" + b"Mac OS X        " + b"\0" * 58  # an AppleDouble file's start


def _browsed(folder, images=("IM00001.dcm", "IM00002.dcm")):
    """The files macOS Finder and Windows Explorer leave, hidden, in a folder opened there."""
    (folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1" + b"\0" * 40)
    (folder / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0" + b"\0" * 60)
    (folder / "desktop.ini").write_text("[.ShellClassInfo]\n")
    (folder / "ehthumbs.db").write_bytes(b"\0" * 16)
    for name in images:
        (folder / f"._{name}").write_bytes(APPLEDOUBLE)


def test_the_files_a_file_browser_leaves_go_with_the_series_anything_else_is_refused(tmp_path, tiny_model):
    """An outline series' folder opened in Finder or Explorer holds .DS_Store, ._IM00001.dcm, Thumbs.db, desktop.ini:
    --overwrite refused it as holding 'files DeepWML did not write there', files the user cannot see. Now those (by
    their exact names, and the AppleDouble companions of the series' own images) go with the series when it is
    replaced or removed; any other file still refuses, named."""
    folder, prepared, own = _earlier_series(tmp_path)
    _browsed(own)
    assert dicom_outline.check_outline_folder(own, True) == own
    written = dicom_outline.write_outline_series(prepared, own, overwrite=True)
    assert sorted(p.name for p in own.iterdir()) == [f"IM{k:05d}.dcm" for k in range(1, len(prepared.images) + 1)]
    assert read_series(own)[1][0]["0020|000e"] == written["series_uid"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
    _browsed(own)
    dicom_outline.remove_outline_series(own)  # an earlier run's series removed (--overwrite without the outline)
    assert not own.exists()
    # anything else still refuses, each named: a file of another name, an AppleDouble file of no image of the
    # series, and one named so that is not AppleDouble
    for odd, data in (("notes.txt", b"mine"), ("._IM09999.dcm", APPLEDOUBLE), ("._IM00001.dcm", b"mine"),
                      (".DS_Store.bak", b"mine"), ("._notes.txt", APPLEDOUBLE)):
        dicom_outline.write_outline_series(prepared, own)
        _browsed(own, images=())
        (own / odd).write_bytes(data)
        with pytest.raises(DeepWMLError, match="did not write there") as refused:
            dicom_outline.check_outline_folder(own, True)
        assert f"(1: {odd})" in str(refused.value), str(refused.value)
        dicom_outline.remove_outline_series(own)  # DeepWML's images alone go; the folder stays with theirs
        assert (own / odd).read_bytes() == data and not list(own.glob("IM*.dcm"))
        shutil.rmtree(own)
