"""`deepwml segment` end to end: outputs, summary, exit codes, one-line errors, nothing overwritten."""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from DeepWMLLib import io
from DeepWMLLib.cli import main

from conftest import (in_folder, make_volume, oracle_network, rotation, stepped_positions, tiny_model_file,
                      write_dicom_series, write_enhanced_mr)


def write_case(folder, name, **kwargs):
    image, truth = make_volume(**kwargs)
    path = folder / f"{name}.nii.gz"
    sitk.WriteImage(sitk.Cast(image, sitk.sitkUInt16), str(path))
    return path, truth


def read_summary(out):
    with open(out / "summary.csv", newline="", encoding="utf-8-sig") as f:
        return list(csv.DictReader(f))


def test_outputs_on_input_grid(tmp_path, tiny_model, monkeypatch, capsys):
    oracle_network(monkeypatch)
    path, truth = write_case(tmp_path, "oblique_case", size=(60, 50, 9), spacing=(0.8, 0.7, 5.0),
                             direction=rotation(0.2, 0.1, -0.3), blobs=((0.5, 0.5, 0.5, 8.0),))
    out = tmp_path / "out"
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert main(["segment", str(path), "-o", str(out), "--model", str(tiny_model), "--device", "cpu",
                 "--save-probabilities"]) == 0
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest  # input untouched
    mask = sitk.ReadImage(str(out / "oblique_case_wmh.nii.gz"))
    assert mask.GetPixelID() == sitk.sitkUInt8
    assert io.grid_difference(mask, truth) is None
    assert set(np.unique(sitk.GetArrayFromImage(mask))) <= {0, 1}
    seg = io.read_segmentation(out / "oblique_case.seg.nrrd", "WMH")
    assert io.grid_difference(seg, truth) is None
    assert np.array_equal(sitk.GetArrayFromImage(seg), sitk.GetArrayFromImage(mask))
    prob = sitk.ReadImage(str(out / "oblique_case_prob.nii.gz"))
    assert prob.GetPixelID() == sitk.sitkFloat32 and io.grid_difference(prob, truth) is None
    p = sitk.GetArrayFromImage(prob)
    assert p.min() >= 0 and p.max() <= 1
    report = json.loads((out / "oblique_case_report.json").read_text(encoding="utf-8"))
    for key in ("case", "input", "volume_ml", "lesion_count", "slices", "lesions", "model", "device", "seconds"):
        assert key in report
    true_ml = sitk.GetArrayFromImage(truth).sum() * np.prod(truth.GetSpacing()) / 1000
    assert report["volume_ml"] == pytest.approx(true_ml, rel=0.35)
    assert report["lesion_count"] == 1
    lesion = report["lesions"][0]  # its probabilities are those of the saved map over its voxels
    marked = sitk.GetArrayFromImage(mask) > 0
    assert lesion["mean_probability"] == pytest.approx(float(p[marked].mean()), abs=1e-3)
    assert report["threshold"] <= lesion["mean_probability"] <= lesion["max_probability"] == pytest.approx(float(p[marked].max()), abs=1e-3)
    assert len(report["slices"]) == 9 and report["device"] == "cpu"
    rows = read_summary(out)
    assert rows[0]["case"] == "oblique_case" and rows[0]["status"] == "ok"


def test_image_outputs_keep_the_input_format_so_the_grid_is_exact(tmp_path, tiny_model):
    """NIfTI stores the origin in single precision: a NRRD, MetaImage or DICOM input's mask written as
    NIfTI would sit micrometres off its grid, and SimpleITK would call them different spaces."""
    image, _ = make_volume(size=(32, 32, 4), direction=rotation(0.2, 0.1, -0.3))
    image.SetOrigin((-101.123456789, 87.987654321, -33.333333333))
    for name in ("n.nrrd", "m.mha"):
        sitk.WriteImage(sitk.Cast(image, sitk.sitkUInt16), str(tmp_path / name))
    out = tmp_path / "out"
    assert main(["segment", str(tmp_path / "n.nrrd"), str(tmp_path / "m.mha"), "-o", str(out), "--model",
                 str(tiny_model), "--device", "cpu", "--save-probabilities"]) == 0
    for written in ("n_wmh.nrrd", "n_prob.nrrd", "m_wmh.mha", "m_prob.mha"):
        result = sitk.ReadImage(str(out / written))
        assert result.GetOrigin() == image.GetOrigin(), written
        assert np.allclose(result.GetDirection(), image.GetDirection(), rtol=0, atol=1e-12), written
        sitk.Mask(image, sitk.Cast(result > 0.5, sitk.sitkUInt8))  # SimpleITK's own same-space check
    # asked for NIfTI, the grid is only as exact as single precision (and grid_difference accepts it)
    assert main(["segment", str(tmp_path / "n.nrrd"), "-o", str(tmp_path / "nii"), "--model", str(tiny_model),
                 "--device", "cpu", "--output-format", "nii.gz"]) == 0
    as_nifti = sitk.ReadImage(str(tmp_path / "nii" / "n_wmh.nii.gz"))
    assert 0 < np.abs(np.subtract(as_nifti.GetOrigin(), image.GetOrigin())).max() < 1e-4
    assert io.grid_difference(as_nifti, image) is None
    assert io.output_extension("scan.nii") == ".nii.gz" and io.output_extension("dicom_folder") == ".nrrd"


def test_folder_of_cases_with_one_bad_case(tmp_path, tiny_model, capsys):
    cases = tmp_path / "cases"
    cases.mkdir()
    write_case(cases, "a", size=(32, 32, 4))
    write_case(cases, "b", size=(32, 32, 4), spacing=(1.0, 1.0, 6.0))
    (cases / "broken.nii.gz").write_bytes(b"\x1f\x8b garbage")
    (cases / "notes.txt").write_text("ignored: not an image")
    out = tmp_path / "out"
    code = main(["segment", str(cases), "-o", str(out), "--model", str(tiny_model), "--device", "cpu"])
    assert code == 1
    rows = {r["case"]: r for r in read_summary(out)}
    assert set(rows) == {"a", "b", "broken"}
    assert rows["a"]["status"] == rows["b"]["status"] == "ok"
    assert rows["broken"]["status"] == "error" and "corrupt" in rows["broken"]["error"]
    assert (out / "a_wmh.nii.gz").exists() and not (out / "broken_wmh.nii.gz").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_a_cohort_folder_of_one_subfolder_a_patient_says_to_give_the_subfolders(tmp_path, tiny_model, capsys):
    """A cohort kept as patient07/flair.nii.gz, patient19/flair.nii.gz...: the folder above them, given as INPUT, said
    only that it was 'a folder without image files or a DICOM series'. Now it says that its subfolders hold them and
    how to give them; given so, each scan is a case, their masks skipped."""
    cohort = tmp_path / "cohort"
    for patient in ("patient_a", "patient_b"):
        (cohort / patient).mkdir(parents=True)
        write_case(cohort / patient, "flair", size=(32, 32, 4))
    (cohort / "notes").mkdir()  # a subfolder without images is not named
    (cohort / "notes" / "readme.txt").write_text("protocol")
    out = tmp_path / "out"
    assert main(["segment", str(cohort), "-o", str(out), "--model", str(tiny_model), "--device", "cpu"]) == 1
    error = read_summary(out)[0]["error"]
    assert "only its subfolders hold image files: patient_a, patient_b" in error and "notes" not in error
    assert f"{cohort / '*'}{os.sep}" in error
    subfolders = sorted(str(p) for p in cohort.iterdir() if p.is_dir())  # as the shell expands cohort/*/
    assert main(["segment", *subfolders, "-o", str(tmp_path / "out2"), "--model", str(tiny_model), "--device", "cpu"]) == 1
    rows = {r["input"]: r["status"] for r in read_summary(tmp_path / "out2")}  # the folder without scans is said
    assert rows == {str(cohort / "patient_a" / "flair.nii.gz"): "ok", str(cohort / "patient_b" / "flair.nii.gz"): "ok",
                    str(cohort / "notes"): "error"}


def test_dicom_study_folder_segments_its_flair_and_says_which(tmp_path, tiny_model, capsys):
    """A study folder with T1, T2 and FLAIR series: the FLAIR is segmented, on its own grid, the report
    names the series and a warning says it was picked; --series picks another; with two FLAIR-like
    series the case fails with the list, and the other cases still run."""
    study = tmp_path / "studies" / "patient_a"
    for number, (description, inversion, slices) in enumerate((("AX T1 SE", None, 3), ("AX T2 FLAIR", 2500, 5),
                                                               ("AX T2 TSE", None, 4)), start=1):
        image, _ = make_volume(size=(32, 32, slices), spacing=(0.9, 0.9, 5.0), dtype=sitk.sitkInt16)
        write_dicom_series(study, image, uid=f"1.2.3.{number}", description=description, inversion_ms=inversion,
                           repetition_ms=9000 if inversion else 600, prefix=f"s{number}_", number=number)
        if description == "AX T2 FLAIR":
            flair = image
    out = tmp_path / "out"
    assert main(["segment", str(study), "-o", str(out), "--model", str(tiny_model), "--device", "cpu"]) == 0
    report = json.loads((out / "patient_a_report.json").read_text(encoding="utf-8"))
    assert report["dicom_series"]["description"] == "AX T2 FLAIR" and report["dicom_series"]["uid"] == "1.2.3.2"
    assert report["dicom_series"]["chosen_by"] == "the only one of 3 series that looks like a FLAIR"
    assert report["warnings"][0].startswith("read DICOM series 2 'AX T2 FLAIR' (5 images, TI 2500 ms, TR 9000 ms)")
    assert "read DICOM series 2 'AX T2 FLAIR'" in capsys.readouterr().err
    mask = sitk.ReadImage(str(out / "patient_a_wmh.nrrd"))
    assert io.grid_difference(mask, flair) is None
    assert main(["segment", str(study), "-o", str(tmp_path / "t2"), "--model", str(tiny_model), "--device", "cpu",
                 "--series", "tse"]) == 0
    report = json.loads((tmp_path / "t2" / "patient_a_report.json").read_text(encoding="utf-8"))
    assert report["dicom_series"]["chosen_by"] == "--series tse" and report["slices"][-1]["index"] == 3
    assert not [w for w in report["warnings"] if w.startswith("read DICOM")]
    image, _ = make_volume(size=(32, 32, 4), spacing=(0.9, 0.9, 5.0), dtype=sitk.sitkInt16)
    write_dicom_series(study, image, uid="1.2.3.9", description="AX T2 FLAIR post", inversion_ms=2500, prefix="s9_")
    write_case(tmp_path / "studies", "plain", size=(32, 32, 4))
    assert main(["segment", str(tmp_path / "studies"), "-o", str(tmp_path / "both"), "--model", str(tiny_model),
                 "--device", "cpu"]) == 1
    rows = {r["case"]: r for r in read_summary(tmp_path / "both")}
    assert rows["plain"]["status"] == "ok" and rows["patient_a"]["status"] == "error"
    assert "2 look like a FLAIR" in rows["patient_a"]["error"] and "'AX T2 FLAIR post' (4 images" in rows["patient_a"]["error"]


def test_existing_outputs_kept_unless_overwrite(tmp_path, tiny_model):
    path, _ = write_case(tmp_path, "c", size=(32, 32, 4))
    out = tmp_path / "out"
    args = ["segment", str(path), "-o", str(out), "--model", str(tiny_model), "--device", "cpu"]
    assert main(args) == 0
    mask_file = out / "c_wmh.nii.gz"
    mask_file.write_bytes(b"user edited")
    first = read_summary(out)[0]
    assert main(args) == 0
    assert mask_file.read_bytes() == b"user edited"
    skipped = read_summary(out)[0]
    assert skipped["status"] == "skipped"
    # the rewritten summary keeps the earlier result's figures, read from its report
    for key in ("volume_ml", "lesion_count", "periventricular_ml", "deep_ml", "warnings"):
        assert skipped[key] == first[key], key
    assert skipped["volume_ml"] != ""
    assert first["seconds"] != "" and skipped["seconds"] == ""  # README: empty, this run did not segment it
    assert main(args + ["--overwrite"]) == 0
    assert mask_file.read_bytes() != b"user edited"
    # an earlier run's optional outputs go when a run that does not make them overwrites the case
    assert main(args + ["--overwrite", "--qc", "--save-probabilities"]) == 0
    assert (out / "c_qc.png").is_file() and (out / "c_prob.nii.gz").is_file()
    (out / "other_qc.png").write_bytes(b"another case's")
    assert main(args + ["--overwrite", "--save-probabilities"]) == 0
    assert not (out / "c_qc.png").exists() and (out / "c_prob.nii.gz").is_file()
    assert (out / "other_qc.png").read_bytes() == b"another case's"
    # ... and so do those of another --output-format (the same case's mask in .mha beside a new .nii.gz)
    assert main(args + ["--overwrite", "--save-probabilities", "--output-format", "mha"]) == 0
    assert (out / "c_wmh.mha").is_file() and (out / "c_prob.mha").is_file() and not (out / "c_wmh.nii.gz").exists()
    (out / "other_wmh.mha").write_bytes(b"another case's")
    assert main(args + ["--overwrite"]) == 0
    assert sorted(f.name for f in out.iterdir() if f.name.startswith("c")) == ["c.seg.nrrd", "c_report.json",
                                                                                "c_wmh.nii.gz"]
    assert (out / "other_wmh.mha").read_bytes() == b"another case's"


def _no_networks(monkeypatch):
    """segment_image made to fail: a rerun that adds outputs from the saved mask must not run the networks."""
    from DeepWMLLib import segment

    def refused(*args, **kwargs):
        raise AssertionError("the networks were run")

    monkeypatch.setattr(segment, "segment_image", refused)


def test_a_rerun_asking_for_the_qc_picture_adds_it_from_the_saved_mask(tmp_path, tiny_model, monkeypatch, capsys):
    """A case done before, rerun with --qc: only CASE_qc.png is made, from the saved mask and the report (no network
    run), the mask, segmentation and other files left byte for byte, the report listing the picture; the summary's
    status `added`, saying what was added; the picture the one a full --qc run draws. A rerun with nothing missing
    is skipped as before."""
    path, _ = write_case(tmp_path, "c", size=(32, 32, 4), blobs=((0.5, 0.5, 0.5, 6.0),))
    out = tmp_path / "out"
    args = ["segment", str(path), "-o", str(out), "--model", str(tiny_model), "--device", "cpu", "--no-brain-mask"]
    assert main(args) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.name.startswith("c")}
    report = json.loads(before["c_report.json"])
    assert report["mask_sha256"] and sorted(report["outputs"]) == ["c.seg.nrrd", "c_report.json", "c_wmh.nii.gz"]
    with monkeypatch.context() as patched:
        _no_networks(patched)
        capsys.readouterr()
        assert main(args + ["--qc"]) == 0
    err = capsys.readouterr().err
    assert (out / "c_qc.png").is_file()
    for name, data in before.items():
        if name != "c_report.json":
            assert (out / name).read_bytes() == data, name
    added = json.loads((out / "c_report.json").read_text(encoding="utf-8"))
    assert added["outputs"] == ["c.seg.nrrd", "c_qc.png", "c_report.json", "c_wmh.nii.gz"]
    assert added["outputs_added"] == ["c_qc.png"]
    assert {k: v for k, v in added.items() if k not in ("outputs", "outputs_added")} == \
        {k: v for k, v in report.items() if k != "outputs"}
    row = read_summary(out)[0]
    assert row["status"] == "added" and row["error"].startswith("added c_qc.png from the saved c_wmh.nii.gz")
    assert row["volume_ml"] == str(report["volume_ml"]) and row["seconds"] == ""
    assert "c: added - added c_qc.png" in err
    assert "0/1 cases done (0 failed, 0 skipped, 1 done before with outputs added)" in err
    # nothing missing now: skipped as before, nothing written
    picture = (out / "c_qc.png").read_bytes()
    with monkeypatch.context() as patched:
        _no_networks(patched)
        assert main(args + ["--qc"]) == 0
    assert read_summary(out)[0]["status"] == "skipped" and (out / "c_qc.png").read_bytes() == picture
    # the picture is the one a full run draws of that mask
    assert main(["segment", str(path), "-o", str(tmp_path / "full"), "--model", str(tiny_model), "--device", "cpu",
                 "--no-brain-mask", "--qc"]) == 0
    assert (tmp_path / "full" / "c_wmh.nii.gz").read_bytes() == before["c_wmh.nii.gz"]
    assert (tmp_path / "full" / "c_qc.png").read_bytes() == picture


def test_a_rerun_asking_for_dicom_outputs_of_a_file_input_is_skipped_saying_none_can_be_made(tmp_path, tiny_model,
                                                                                              capsys):
    """--dicom-seg and --dicom-outline asked of a case done before from a NIfTI file: nothing to add (the input has
    no patient or study), the case skipped, and the row says why there is no SEG or outline as a full run's report
    does (it said only 'outputs exist ... use --overwrite', which would not make them either); nothing written."""
    from DeepWMLLib.segment import NO_DICOM_OUTLINE, NO_DICOM_SEG

    path, _ = write_case(tmp_path, "c", size=(32, 32, 4), blobs=((0.5, 0.5, 0.5, 6.0),))
    out = tmp_path / "out"
    args = ["segment", str(path), "-o", str(out), "--model", str(tiny_model), "--device", "cpu", "--no-brain-mask"]
    assert main(args) == 0
    report = (out / "c_report.json").read_bytes()
    capsys.readouterr()
    assert main(args + ["--dicom-seg", "--dicom-outline"]) == 0
    row = read_summary(out)[0]
    assert row["status"] == "skipped" and NO_DICOM_SEG in row["error"] and NO_DICOM_OUTLINE in row["error"]
    assert NO_DICOM_SEG in capsys.readouterr().err
    assert (out / "c_report.json").read_bytes() == report and not (out / "c_wmh_seg.dcm").exists()
    assert main(args) == 0 and NO_DICOM_SEG not in read_summary(out)[0]["error"]


def test_a_rerun_adding_the_picture_to_an_old_report_reads_the_series_given_by_series(tmp_path, tiny_model):
    """A case of a DICOM study segmented with --series, its report of a version before `dicom_series` (and the
    input's fingerprint) were recorded, rerun with the same --series and --qc: the picture is drawn on that series.
    Without the report's series UID the study's FLAIR-like series was read instead, its grid not the mask's: an
    error telling to segment again."""
    study = tmp_path / "patient_a"
    for number, (description, inversion, slices) in enumerate((("AX T2 FLAIR", 2500, 5), ("AX T2 TSE", None, 4)),
                                                               start=1):
        image, _ = make_volume(size=(32, 32, slices), spacing=(0.9, 0.9, 5.0), dtype=sitk.sitkInt16)
        write_dicom_series(study, image, uid=f"1.2.3.{number}", description=description, inversion_ms=inversion,
                           repetition_ms=9000 if inversion else 600, prefix=f"s{number}_", number=number)
    out = tmp_path / "out"
    args = ["segment", str(study), "-o", str(out), "--model", str(tiny_model), "--device", "cpu", "--series", "tse"]
    assert main(args) == 0
    report = json.loads((out / "patient_a_report.json").read_text(encoding="utf-8"))
    for key in ("dicom_series", "input_absolute", "input_fingerprint", "mask_sha256"):
        del report[key]
    (out / "patient_a_report.json").write_text(json.dumps(report), encoding="utf-8")
    assert main(args + ["--qc"]) == 0
    row = read_summary(out)[0]
    assert row["status"] == "added" and (out / "patient_a_qc.png").is_file(), row["error"]


def test_a_rerun_adding_a_probability_map_runs_the_networks_and_keeps_the_saved_mask(tmp_path, tiny_model):
    """--save-probabilities asked for a case done without it: the networks run again (only they make the map), their
    mask checked to be the saved one; the saved files stay byte for byte; the row says the networks ran."""
    path, _ = write_case(tmp_path, "c", size=(32, 32, 4), blobs=((0.5, 0.5, 0.5, 6.0),))
    out = tmp_path / "out"
    args = ["segment", str(path), "-o", str(out), "--model", str(tiny_model), "--device", "cpu", "--no-brain-mask"]
    assert main(args) == 0
    mask = (out / "c_wmh.nii.gz").read_bytes()
    assert main(args + ["--save-probabilities", "--qc"]) == 0
    assert (out / "c_prob.nii.gz").is_file() and (out / "c_qc.png").is_file()
    assert (out / "c_wmh.nii.gz").read_bytes() == mask
    row = read_summary(out)[0]
    assert row["status"] == "added" and "the networks were run again for c_prob.nii.gz" in row["error"]
    report = json.loads((out / "c_report.json").read_text(encoding="utf-8"))
    assert report["outputs_added"] == ["c_prob.nii.gz", "c_qc.png"]
    probabilities = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "c_prob.nii.gz")))
    saved = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "c_wmh.nii.gz")))
    assert probabilities.shape == saved.shape and probabilities.max() <= 1


@pytest.mark.parametrize("then", ["bf16", "fp32"])
def test_a_probability_map_added_with_precision_auto_runs_in_the_precision_the_mask_was_made_in(tmp_path, tiny_model,
                                                                                               monkeypatch, then):
    """Precision auto on a CPU with native bf16 runs what is measured faster (inference.bf16_is_faster), an answer
    that may differ from the earlier run's (an earlier version's bf16, another thread count, the cache cleared): the
    networks run again for an output added then gave another mask than the saved one and the case failed ('differs
    in 4 voxels' for the sample after the Xeon of session 51 chose fp32). They now run in the precision the earlier
    report records."""
    from DeepWMLLib import inference

    path, _ = write_case(tmp_path, "c", size=(32, 32, 4), blobs=((0.5, 0.5, 0.5, 6.0),))
    out = tmp_path / "out"
    args = ["segment", str(path), "-o", str(out), "--model", str(tiny_model), "--device", "cpu", "--no-brain-mask",
            "--backend", "torch"]
    monkeypatch.setattr(inference, "torch_cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(inference, "_RUNNERS", {})
    monkeypatch.setattr(inference, "bf16_is_faster", lambda *measure: then == "bf16")
    assert main(args) == 0
    report = json.loads((out / "c_report.json").read_text(encoding="utf-8"))
    assert report["settings"]["precision"] == then
    monkeypatch.setattr(inference, "_RUNNERS", {})
    monkeypatch.setattr(inference, "bf16_is_faster", lambda *measure: then != "bf16")  # measured otherwise now
    asked, make_runner = [], inference.make_runner

    def spied(*args, **kwargs):
        runner = make_runner(*args, **kwargs)
        asked.append(runner.name)
        return runner

    monkeypatch.setattr(inference, "make_runner", spied)
    assert main(args + ["--save-probabilities"]) == 0
    assert read_summary(out)[0]["status"] == "added"
    assert asked and set(asked) == {"torch bf16" if then == "bf16" else "torch"}


def test_a_saved_mask_replaced_or_edited_is_not_given_new_outputs(tmp_path, tiny_model, monkeypatch):
    """The outputs added are made from the saved mask only when it is the one the run wrote: a mask of another grid
    is an error naming it and the difference, one edited since (its voxels not those its report records) an error
    saying so; both suggest --overwrite, and nothing is written (the report as it was)."""
    path, _ = write_case(tmp_path, "c", size=(32, 32, 4), blobs=((0.5, 0.5, 0.5, 6.0),))
    out = tmp_path / "out"
    args = ["segment", str(path), "-o", str(out), "--model", str(tiny_model), "--device", "cpu", "--no-brain-mask"]
    assert main(args) == 0
    report = (out / "c_report.json").read_bytes()
    saved = sitk.ReadImage(str(out / "c_wmh.nii.gz"))
    other = sitk.Image([40, 32, 4], sitk.sitkUInt8)
    other.SetSpacing(saved.GetSpacing())
    sitk.WriteImage(other, str(out / "c_wmh.nii.gz"))
    _no_networks(monkeypatch)
    assert main(args + ["--qc"]) == 1
    row = read_summary(out)[0]
    assert row["status"] == "error"
    assert "the saved mask c_wmh.nii.gz is not on the scan's grid (size (40, 32, 4) vs (32, 32, 4)" in row["error"]
    assert "--overwrite" in row["error"]
    assert not (out / "c_qc.png").exists() and (out / "c_report.json").read_bytes() == report
    edited = sitk.GetArrayFromImage(saved)
    edited[0, 0, 0] = 1 - edited[0, 0, 0]  # a voxel marked or cleared by hand
    again = sitk.GetImageFromArray(edited)
    again.CopyInformation(saved)
    sitk.WriteImage(again, str(out / "c_wmh.nii.gz"))
    assert main(args + ["--qc"]) == 1
    row = read_summary(out)[0]
    assert "c_wmh.nii.gz was changed since the run that made it" in row["error"] and "--overwrite" in row["error"]
    # what to do with the edit: --overwrite segments anew; deepwml export (or Slicer's Save results) makes the edit's
    assert "not your edit's" in row["error"] and "deepwml export FLAIR EDITED_MASK" in row["error"]
    assert "Save results with 'Also write a DICOM SEG'" in row["error"]
    assert not (out / "c_qc.png").exists() and (out / "c_report.json").read_bytes() == report
    # a report of an older version, without mask_sha256: the lesions' voxels tell
    older = json.loads(report)
    del older["mask_sha256"]
    (out / "c_report.json").write_text(json.dumps(older), encoding="utf-8")
    assert main(args + ["--qc"]) == 1
    assert "c_wmh.nii.gz was changed since the run that made it (it marks" in read_summary(out)[0]["error"]
    sitk.WriteImage(saved, str(out / "c_wmh.nii.gz"))  # the mask as written: the picture is added
    assert main(args + ["--qc"]) == 0
    assert read_summary(out)[0]["status"] == "added" and (out / "c_qc.png").is_file()


def test_adding_outputs_stopped_part_way_leaves_the_case_as_it_was(tmp_path, tiny_model, monkeypatch):
    """Stopped while the outputs asked for are written (Ctrl-C, a full disk): the files added so far go and the
    earlier report is put back byte for byte, so that the next run adds them again (whole_or_none's rule)."""
    from DeepWMLLib import io as deepwml_io

    path, _ = write_case(tmp_path, "c", size=(32, 32, 4), blobs=((0.5, 0.5, 0.5, 6.0),))
    out = tmp_path / "out"
    args = ["segment", str(path), "-o", str(out), "--model", str(tiny_model), "--device", "cpu", "--no-brain-mask"]
    assert main(args) == 0
    report = (out / "c_report.json").read_bytes()
    write_bytes = deepwml_io.write_bytes

    def stopped(data, target):
        if str(target).endswith("_qc.png"):
            write_bytes(data, target)
            raise KeyboardInterrupt
        return write_bytes(data, target)

    with monkeypatch.context() as patched:
        patched.setattr(deepwml_io, "write_bytes", stopped)
        assert main(args + ["--qc"]) == 130  # interrupted
    assert not (out / "c_qc.png").exists() and (out / "c_report.json").read_bytes() == report
    assert main(args + ["--qc"]) == 0 and (out / "c_qc.png").is_file()
    # killed outright after the report was rewritten (it is written first), before the picture: the report lists a
    # picture not there, which the next run asking for it makes
    (out / "c_qc.png").unlink()
    assert main(args) == 0 and read_summary(out)[0]["status"] == "skipped"  # not asked for: as a picture deleted
    assert main(args + ["--qc"]) == 0 and (out / "c_qc.png").is_file()
    assert read_summary(out)[0]["status"] == "added"


def test_outdir_inside_the_input_folder_does_not_turn_outputs_into_cases(tmp_path, tiny_model):
    """-o the input folder itself: a rerun skips the case (its outputs exist) instead of segmenting its
    own mask, probability map and .seg.nrrd as new scans; an image merely named like an output, without
    a report beside it, is still a case."""
    folder = tmp_path / "scans"
    folder.mkdir()
    write_case(folder, "a", size=(32, 32, 4))
    args = ["segment", str(folder), "-o", str(folder), "--model", str(tiny_model), "--device", "cpu"]
    assert main(args + ["--save-probabilities"]) == 0
    assert (folder / "a_prob.nii.gz").is_file() and (folder / "a.seg.nrrd").is_file()
    assert main(args) == 0
    rows = read_summary(folder)
    assert [(r["case"], r["status"]) for r in rows] == [("a", "skipped")]
    assert main(args + ["--overwrite", "--output-format", "mha"]) == 0  # its .nii.gz outputs are no case either
    assert [(r["case"], r["status"]) for r in read_summary(folder)] == [("a", "ok")]
    write_case(folder, "b_wmh", size=(32, 32, 4))  # no b_report.json: a scan of its own
    assert main(args) == 0
    assert sorted((r["case"], r["status"]) for r in read_summary(folder)) == [("a", "skipped"), ("b_wmh", "ok")]


def test_ensemble_and_tta_run(tmp_path):
    from conftest import tiny_model_file

    models = [str(tiny_model_file(tmp_path / f"m{i}.pt", seed=i)) for i in range(2)]
    path, _ = write_case(tmp_path, "e", size=(32, 32, 4))
    out = tmp_path / "out"
    assert main(["segment", str(path), "-o", str(out), "--model", *models, "--tta", "--device", "cpu"]) == 0
    report = json.loads((out / "e_report.json").read_text(encoding="utf-8"))
    assert report["model"] == ["m0.pt", "m1.pt"] and report["tta"] is True
    # which exact weights made the mask: each file's SHA-256 (24 hex digits), and the program's version
    import hashlib
    from DeepWMLLib import __version__
    assert report["model_sha256"] == [hashlib.sha256(open(m, "rb").read()).hexdigest()[:24] for m in models]
    assert report["model_sha256"][0] != report["model_sha256"][1]
    assert report["deepwml_version"] == __version__


def test_ensemble_members_of_one_file_name_are_named_apart(tmp_path, capsys):
    """runs/seed1/best.pt and runs/seed2/best.pt given to --model were both 'best.pt' in the report (and so in
    Slicer's result text), their digests differing, so a reader could not tell which was which: each is named by
    the fewest trailing parts of its path that tell it apart; a member whose name is its own keeps it."""
    from conftest import tiny_model_file
    from DeepWMLLib.segment import load_models

    runs = tmp_path / "runs"
    for seed in (1, 2):
        (runs / f"seed{seed}").mkdir(parents=True)
    models = [str(tiny_model_file(runs / f"seed{seed}" / "best.pt", seed=seed)) for seed in (1, 2)]
    models.append(str(tiny_model_file(tmp_path / "m0.pt", seed=0)))
    path, _ = write_case(tmp_path, "e", size=(32, 32, 4))
    out = tmp_path / "out"
    assert main(["segment", str(path), "-o", str(out), "--model", *models, "--device", "cpu", "--no-brain-mask"]) == 0
    report = json.loads((out / "e_report.json").read_text(encoding="utf-8"))
    assert report["model"] == ["seed1/best.pt", "seed2/best.pt", "m0.pt"]
    assert sorted(report["settings"]["model"]) == ["m0.pt", "seed1/best.pt", "seed2/best.pt"]
    (runs / "a" / "seed1").mkdir(parents=True)  # deeper where the folder above is the same name too
    deeper = tiny_model_file(runs / "a" / "seed1" / "best.pt", seed=3)
    assert [m.name for m in load_models([models[0], str(deeper)])] == ["runs/seed1/best.pt", "a/seed1/best.pt"]
    assert [m.name for m in load_models([models[0]])] == ["best.pt"]  # alone: its file name, as before
    again = os.path.join(os.path.dirname(models[0]), ".", "best.pt")  # one file twice: one name, warned as before
    with pytest.warns(UserWarning, match="best.pt is given 2 times"):
        assert [m.name for m in load_models([models[0], again])] == ["best.pt", "best.pt"]


def test_ensemble_averages_probabilities(tiny_model, tmp_path):
    from conftest import tiny_model_file
    from DeepWMLLib.inference import predict_probabilities
    from DeepWMLLib.segment import load_models

    image, _ = make_volume(size=(32, 32, 4))
    m1, m2 = load_models([tiny_model, tiny_model_file(tmp_path / "other.pt", seed=5)])
    p1, _ = predict_probabilities(image, [m1], "cpu")
    p2, _ = predict_probabilities(image, [m2], "cpu")
    both, _ = predict_probabilities(image, [m1, m2], "cpu")
    assert np.allclose(both, (p1 + p2) / 2, atol=1e-5)
    # members on different network grids: each grid's sum is resampled to the input once
    (m3,) = load_models([tiny_model_file(tmp_path / "coarse.pt", grid=(48, 48), seed=6)])
    p3, _ = predict_probabilities(image, [m3], "cpu")
    mixed, _ = predict_probabilities(image, [m1, m3, m2], "cpu")
    assert np.allclose(mixed, (p1 + p2 + p3) / 3, atol=1e-5)


def test_the_registrys_ensembles_are_the_model_cards_measured_ones_with_its_figures():
    """models.json names the ensembles the model card measured (members by model name): each member is a shipped
    WMH model, and the median Dice its description quotes is the card's, section by section."""
    from conftest import REPO
    from DeepWMLLib.segment import shipped_ensembles, shipped_models

    card = (REPO / "Resources" / "Models" / "README.md").read_text(encoding="utf-8")
    files = {m["name"]: m["path"] for m in shipped_models()}
    ensembles = shipped_ensembles()
    assert [e["name"] for e in ensembles] == ["ensemble-v8", "ensemble-v7"]
    assert ensembles[0]["members"] == ["unet16-adabn-v5", "unet16-adabn-o", "unet16-adabn-p", "unet16-adabn-t"]
    assert ensembles[1]["members"] == ["unet16-synth-v5", "unet16-realbg-o", "unet16-realbg-p", "unet16-realbg-t"]
    for ensemble in ensembles:
        assert ensemble["paths"] == [files[member] for member in ensemble["members"]]
        version = ensemble["name"].split("-")[1]
        section = card[card.index(f"# Model card: the {version} ensemble"):]
        medians = re.search(r"\*\*Median Dice over the three cases: ([\d.]+) at 1 mm, ([\d.]+) at 5 mm, ([\d.]+) at "
                            r"8 mm\*\*", section).groups()
        assert f"median Dice on the three labelled real MS cases {' / '.join(medians)} at 1 / 5 / 8 mm" \
            in ensemble["description"], ensemble["name"]
        assert f"--model {ensemble['name']}" in section  # the card says how to run it


def test_a_registry_ensemble_of_models_it_does_not_list_is_refused(tmp_path, tiny_model, monkeypatch):
    import shutil

    from DeepWMLLib.errors import DeepWMLError
    from DeepWMLLib.segment import shipped_ensembles

    shutil.copy(tiny_model, tmp_path / "a.pt")
    registry = {"format_version": 1, "models": [{"name": "a", "file": "a.pt", "version": "1", "default": True}],
                "ensembles": [{"name": "pair", "members": ["a", "b"], "description": "test"}]}
    (tmp_path / "models.json").write_text(json.dumps(registry), encoding="utf-8")
    monkeypatch.setenv("DEEPWML_MODELS_DIR", str(tmp_path))
    with pytest.raises(DeepWMLError, match="the ensemble 'pair' names b, not a WMH model listed there"):
        shipped_ensembles()
    registry["ensembles"][0].update(name="a", members=["a"])
    (tmp_path / "models.json").write_text(json.dumps(registry), encoding="utf-8")
    with pytest.raises(DeepWMLError, match="the ensemble 'a' has the name of a model"):
        shipped_ensembles()


def test_a_wrong_registry_ensemble_does_not_stop_a_models_name(tmp_path, tiny_model, monkeypatch):
    """An edited models.json whose ensemble entry names a model it does not list refused every name given to
    --model, the models' too ("the ensemble 'pair' names b ..." for --model a). A model's name resolves; the
    entry is reported when an ensemble's name, or a name that is none, is looked up."""
    import shutil

    from DeepWMLLib.errors import DeepWMLError
    from DeepWMLLib.segment import model_files

    shutil.copy(tiny_model, tmp_path / "a.pt")
    registry = {"format_version": 1, "models": [{"name": "a", "file": "a.pt", "version": "1", "default": True}],
                "ensembles": [{"name": "pair", "members": ["a", "b"], "description": "test"}]}
    (tmp_path / "models.json").write_text(json.dumps(registry), encoding="utf-8")
    monkeypatch.setenv("DEEPWML_MODELS_DIR", str(tmp_path))
    assert model_files(["a"]) == [str(tmp_path / "a.pt")]
    for name in ("pair", "no-such-model"):
        with pytest.raises(DeepWMLError, match="the ensemble 'pair' names b, not a WMH model listed there"):
            model_files(["a", name])


def test_model_takes_the_name_of_a_shipped_model_or_ensemble(tmp_path, tiny_model, monkeypatch, capsys):
    """--model took files only: running the v8 ensemble meant typing its four members' paths. It takes the name of
    a shipped model or ensemble too; a file of that name wins; a name that is neither is refused with the names."""
    from DeepWMLLib.segment import model_files, shipped_ensembles, shipped_models

    oracle_network(monkeypatch)
    files = {m["name"]: m["path"] for m in shipped_models()}
    v7 = next(e for e in shipped_ensembles() if e["name"] == "ensemble-v7")["paths"]
    assert model_files(["ensemble-v7"]) == v7
    assert model_files([str(tiny_model), "unet16-synth-v1"]) == [str(tiny_model), files["unet16-synth-v1"]]
    assert model_files(None) is None
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ensemble-v7").write_bytes(tiny_model.read_bytes())
    assert model_files(["ensemble-v7"]) == ["ensemble-v7"]  # a file that exists is itself
    assert model_files(["runs/missing.pt"]) == ["runs/missing.pt"]  # a path: the loader says it does not exist

    path, _ = write_case(tmp_path, "case", size=(40, 36, 6))
    assert main(["segment", str(path), "-o", "out", "--model", "no-such-model", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--model no-such-model: no such model file, nor a shipped model or ensemble" in err[0]
    assert "ensemble-v8" in err[0] and "unet32-v9" in err[0]
    (tmp_path / "ensemble-v7").unlink()
    assert main(["segment", str(path), "-o", "out", "--model", "ensemble-v7", "--device", "cpu", "--backend", "torch",
                 "--no-brain-mask"]) == 0
    report = json.loads((tmp_path / "out" / "case_report.json").read_text(encoding="utf-8"))
    assert report["model"] == [Path(p).name for p in v7]


def test_a_shipped_model_named_again_within_an_ensemble_given_is_averaged_in_once(tmp_path, tiny_model, monkeypatch,
                                                                                   capsys):
    """`--model ensemble-v8 unet16-adabn-v5` (an ensemble and one of its own members) averaged that member in twice,
    weight 2/5, with a warning that named its file; the user asked for the ensemble and a model it holds, not for a
    heavier one. Each shipped file given by name is now averaged in once, and the warning says so and why."""
    import shutil
    import warnings

    from DeepWMLLib.segment import model_files, shipped_ensembles, shipped_models

    files = {m["name"]: m["path"] for m in shipped_models()}
    ensembles = {e["name"]: e for e in shipped_ensembles()}
    v8, v7 = ensembles["ensemble-v8"]["paths"], ensembles["ensemble-v7"]["paths"]
    member = "unet16-adabn-v5"
    assert files[member] in v8
    with pytest.warns(UserWarning, match=f"^{member} is a member of ensemble-v8 already: used once$"):
        assert model_files(["ensemble-v8", member]) == v8
    with pytest.warns(UserWarning, match=f"^{member} is given, and is a member of ensemble-v8 too: used once$"):
        assert model_files([member, "ensemble-v8"]) == [files[member]] + [p for p in v8 if p != files[member]]
    with pytest.warns(UserWarning, match="^ensemble-v8 is given twice: used once$"):
        assert model_files(["ensemble-v8", "ensemble-v8"]) == v8
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert model_files(["ensemble-v8", "ensemble-v7"]) == v8 + v7  # nothing in common: nothing to say
        assert model_files(["ensemble-v8", "unet16-synth-v1"]) == v8 + [files["unet16-synth-v1"]]
    with monkeypatch.context() as patched:  # two ensembles with a member in common: it is averaged in once
        for name in ("a", "b", "c"):
            shutil.copy(tiny_model, tmp_path / f"{name}.pt")
        registry = {"format_version": 1, "models": [{"name": n, "file": f"{n}.pt", "version": "1"} for n in "abc"],
                    "ensembles": [{"name": "ab", "members": ["a", "b"], "description": "test"},
                                  {"name": "bc", "members": ["b", "c"], "description": "test"}]}
        (tmp_path / "models.json").write_text(json.dumps(registry), encoding="utf-8")
        patched.setenv("DEEPWML_MODELS_DIR", str(tmp_path))
        with pytest.warns(UserWarning, match="^b is a member of both ab and bc: used once$"):
            assert model_files(["ab", "bc"]) == [str(tmp_path / f"{n}.pt") for n in "abc"]

    oracle_network(monkeypatch)
    monkeypatch.chdir(tmp_path)
    path, _ = write_case(tmp_path, "case", size=(40, 36, 6))
    assert main(["segment", str(path), "-o", "out", "--model", "ensemble-v8", member, "--device", "cpu",
                 "--backend", "torch", "--no-brain-mask"]) == 0
    err = capsys.readouterr().err
    assert f"{member} is a member of ensemble-v8 already: used once" in err and "is given 2 times" not in err
    report = json.loads((tmp_path / "out" / "case_report.json").read_text(encoding="utf-8"))
    assert report["model"] == [Path(p).name for p in v8]


def test_a_folder_named_like_a_shipped_model_does_not_hide_the_name(tmp_path, monkeypatch, capsys):
    """An OUTDIR named after the model (`-o ensemble-v8 --model ensemble-v8`) ran the first time; rerun (new cases
    added), the folder now there took the name's place: 'ensemble-v8 is a folder, not a model file: ... put INPUT
    before --model'. A folder that is no training run's does not hide a shipped name; one that is, and a file of
    the name, still win; a folder of scans after --model that is no name is still refused as before."""
    from DeepWMLLib.segment import model_files, shipped_ensembles

    oracle_network(monkeypatch)
    monkeypatch.chdir(tmp_path)
    v8 = next(e for e in shipped_ensembles() if e["name"] == "ensemble-v8")["paths"]
    path, _ = write_case(tmp_path, "case", size=(40, 36, 6))
    (tmp_path / "ensemble-v8").mkdir()
    (tmp_path / "ensemble-v8" / "notes.txt").write_text("results", encoding="utf-8")
    assert model_files(["ensemble-v8"]) == v8
    assert main(["segment", str(path), "-o", "ensemble-v8", "--model", "ensemble-v8", "--device", "cpu",
                 "--backend", "torch", "--no-brain-mask"]) == 0
    report = json.loads((tmp_path / "ensemble-v8" / "case_report.json").read_text(encoding="utf-8"))
    assert report["model"] == [Path(p).name for p in v8]
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "best.pt").write_bytes(b"")
    (tmp_path / "scans").mkdir()
    assert model_files(["run"]) == ["run"]  # a training run's folder is itself (the loader names its best.pt)
    assert main(["segment", str(path), "-o", "out", "--model", "ensemble-v8", "scans"]) == 2
    assert "scans is a folder, not a model file" in capsys.readouterr().err
    assert main(["segment", str(path), "-o", "out", "--model", "ensemble-v8", "missing.nii.gz"]) == 2
    assert "missing.nii.gz is an image, not a model file" in capsys.readouterr().err


def test_change_adapt_and_bench_take_a_shipped_model_or_ensemble_name_as_segment_does(tmp_path, monkeypatch, capsys):
    """deepwml segment --model took a shipped model's or ensemble's name; deepwml change, adapt (--model and
    --pseudo-models) and bench took files only ('model file ensemble-v8 does not exist'). They resolve names the
    same way (segment.model_files), and a name that is none is refused before any work, naming the option."""
    from DeepWMLLib import adapt, bench, segment
    from DeepWMLLib.errors import DeepWMLError
    from DeepWMLLib.segment import shipped_ensembles, shipped_models

    v8 = next(e for e in shipped_ensembles() if e["name"] == "ensemble-v8")["paths"]
    v1 = next(m for m in shipped_models() if m["name"] == "unet16-synth-v1")["path"]
    seen = {}

    def stop(what, *models):
        seen[what] = models
        raise DeepWMLError("stop here")  # what would run, without running it

    monkeypatch.setattr(bench, "run_benchmark", lambda input_path, models, *args: stop("bench", models))
    monkeypatch.setattr(adapt, "adapt_models", lambda models, scans, outputs, pseudo, *args, **kwargs:
                        stop("adapt", models, pseudo))
    monkeypatch.setattr(segment, "load_models", lambda paths=None: stop("change", paths))
    baseline, _ = write_case(tmp_path, "baseline", size=(40, 36, 6))
    followup, _ = write_case(tmp_path, "followup", size=(40, 36, 6), blobs=((0.5, 0.5, 0.5, 5.0),))

    assert main(["bench", "--model", "ensemble-v8", "--slices", "1", "--repeat", "1"]) == 1
    assert seen["bench"] == (v8,)
    assert main(["adapt", "--scans", str(baseline), "-o", str(tmp_path / "adapted"), "--model", "ensemble-v8",
                 "--pseudo-models", "unet16-synth-v1"]) == 1
    assert seen["adapt"] == (v8, [v1])
    assert main(["change", str(baseline), str(followup), "-o", str(tmp_path / "change"), "--model", "ensemble-v8",
                 "--no-brain-mask"]) == 1
    assert seen["change"] == (v8,)
    capsys.readouterr()
    for command in (["bench", "--model", "no-such-model"], ["change", str(baseline), str(followup), "-o", "x",
                                                              "--model", "no-such-model"],
                    ["adapt", "--scans", str(baseline), "-o", "x", "--model", "no-such-model"],
                    ["adapt", "--scans", str(baseline), "-o", "x", "--pseudo-models", "no-such-model"]):
        assert main(command) == 2, command
        option = "--pseudo-models" if "--pseudo-models" in command else "--model"
        assert f"{option} no-such-model: no such model file, nor a shipped model or ensemble of that name" \
            in capsys.readouterr().err


def test_same_model_twice_in_an_ensemble_is_said(tiny_model, tmp_path):
    """Given twice (by name, or as a copy), a model weighs twice in the average: a warning says so, naming it."""
    import shutil

    from conftest import tiny_model_file
    from DeepWMLLib.segment import load_models

    other = tiny_model_file(tmp_path / "other.pt", seed=5)
    copy = shutil.copy(tiny_model, tmp_path / "copy.pt")
    with pytest.warns(UserWarning, match=r"tiny.pt is given 2 times: .*\(weight 2/3\)"):
        load_models([tiny_model, other, tiny_model])
    with pytest.warns(UserWarning, match=r"tiny.pt and copy.pt are one model .*\(weight 2/3\)"):
        load_models([tiny_model, copy, other])
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(load_models([tiny_model, other])) == 2  # two models: nothing to say


def test_a_file_that_is_not_a_model_is_named_for_what_it_is(tiny_model, tmp_path, capsys):
    """A scan, a text file or an empty file given as the model: the error says what the file is, not only
    "copy it again if it was cut short" (which is for a damaged model file)."""
    path, _ = write_case(tmp_path, "scan", size=(32, 32, 4))
    other, _ = write_case(tmp_path, "other", size=(32, 32, 4))
    out = str(tmp_path / "out")
    # a second scan after --model, INPUT given before: refused up front, as a usage error
    assert main(["segment", str(path), "-o", out, "--model", str(tiny_model), str(other)]) == 2
    err = capsys.readouterr().err
    assert "other.nii.gz is an image, not a model file" in err and "put INPUT before --model" in err
    folder = tmp_path / "scans"
    folder.mkdir()
    assert main(["segment", str(path), "-o", out, "--model", str(tiny_model), str(folder)]) == 2
    assert "scans is a folder, not a model file" in capsys.readouterr().err
    renamed = tmp_path / "scan.pt"
    renamed.write_bytes(path.read_bytes())
    text, empty, cut = tmp_path / "notes.pt", tmp_path / "empty.pt", tmp_path / "cut.pt"
    text.write_text("model: v9\n")
    empty.write_bytes(b"")
    cut.write_bytes(tiny_model.read_bytes()[:2000])
    import argparse

    import torch

    other_program = tmp_path / "their_unet.pt"  # a checkpoint of another program: weights_only refuses its objects
    torch.save({"state_dict": {"w": torch.zeros(2)}, "args": argparse.Namespace(lr=0.1)}, other_program)
    for model, words in ((renamed, "it is an image (gzip-compressed NIfTI), a scan rather than a model"),
                         (text, "it is not a PyTorch file at all"), (empty, "the file is empty (0 bytes)"),
                         (cut, "copy it again if it was cut short"),
                         (other_program, "a PyTorch file that holds Python objects (another program's model")):
        assert main(["segment", str(path), "-o", out, "--model", str(model)]) == 1
        err = capsys.readouterr().err
        assert f"{model} is not a readable DeepWML model file" in err and words in err, err
        assert len(err.strip().splitlines()) == 1


def _nan_network(tiny_model):
    """(image, the tiny model, a copy of it whose head gives NaN)."""
    import torch

    from DeepWMLLib.checkpoint import LoadedModel
    from DeepWMLLib.segment import load_models

    image, _ = make_volume(size=(32, 32, 4))
    (good,) = load_models([tiny_model])
    network = good.model
    broken = LoadedModel(good.config, good.preprocessing, good.threshold, good.labels, {}, "broken.pt", "0" * 24,
                         type(network)(1, good.config["base_channels"], good.config["depth"]))
    broken.model.load_state_dict(network.state_dict())
    with torch.no_grad():
        broken.model.head.bias.fill_(float("nan"))
    broken.model.eval()
    return image, good, broken


def test_a_network_giving_nan_is_an_error_not_an_empty_mask(tiny_model):
    """NaN probabilities (a network overflowing in reduced precision, or NaN weights loaded some other way) pass no
    threshold: the case read 'ok - 0 lesions', and one such member emptied a whole ensemble's average."""
    from DeepWMLLib.errors import DeepWMLError
    from DeepWMLLib.segment import segment_image

    image, good, broken = _nan_network(tiny_model)
    with pytest.raises(DeepWMLError, match=r"broken.pt gave NaN probabilities \(running as torch"):
        segment_image(image, [good, broken], "cpu", backend="torch", brain_model=None, ventricle_model=None)
    assert segment_image(image, [good], "cpu", backend="torch", brain_model=None, ventricle_model=None) is not None


def test_nan_probabilities_say_what_to_do_after_how_the_network_ran(tiny_model, monkeypatch):
    """The NaN error told every run to 'rerun with --precision fp32', also one that ran in fp32 already (the model
    file is then at fault, and the same rerun gives the same NaN). It says so only after reduced precision."""
    from DeepWMLLib import inference
    from DeepWMLLib.errors import DeepWMLError
    from DeepWMLLib.segment import segment_image

    image, _, broken = _nan_network(tiny_model)
    expected = {
        "torch": "broken.pt gave NaN probabilities (running as torch): its result would mark nothing; it ran in full "
                 "precision (fp32), so the model file is at fault: segment with another model",
        "torch bf16": "broken.pt gave NaN probabilities (running as torch bf16): its result would mark nothing; "
                      "rerun with --precision fp32, and if that fails too, the model file is at fault"}
    monkeypatch.setattr(inference, "bf16_is_faster", lambda *measure: True)  # auto runs bf16 where native
    for runner, words in expected.items():
        monkeypatch.setattr(inference, "torch_cpu_has_native_bf16", lambda bf16=runner.endswith("bf16"): bf16)
        inference._RUNNERS.clear()  # a runner kept from before ran at the other precision
        with pytest.raises(DeepWMLError) as error:
            segment_image(image, [broken], "cpu", backend="torch", brain_model=None, ventricle_model=None)
        assert str(error.value) == words
    inference._RUNNERS.clear()


def test_progress_and_cancel(tiny_model):
    from DeepWMLLib.errors import Cancelled
    from DeepWMLLib.segment import load_models, segment_image

    image, _ = make_volume(size=(32, 32, 12))
    seen = []
    segment_image(image, load_models([tiny_model]), "cpu", batch_size=2, progress=lambda f, m: seen.append(f))
    assert seen[-1] == 1.0 and seen == sorted(seen) and len(seen) > 3
    with pytest.raises(Cancelled):
        segment_image(image, load_models([tiny_model]), "cpu", cancel=lambda: True)


@pytest.mark.parametrize("kind", ["dicom", "nifti"])
def test_cancel_stops_a_scan_being_read(tmp_path, tiny_model, monkeypatch, kind):
    """Cancel (the job's cancel flag) was first checked by the networks, after the scan was read whole: a long DICOM
    series or NIfTI read could not be cancelled until it ended. The read now stops at its next file (or piece), with
    the same Cancelled as elsewhere, and nothing is segmented or written."""
    from DeepWMLLib import segment
    from DeepWMLLib.errors import Cancelled

    image, _ = make_volume(size=(32, 32, 12), dtype=sitk.sitkInt16)
    if kind == "dicom":
        path = write_dicom_series(tmp_path / "series", image, description="AX FLAIR", inversion_ms=2500)
    else:
        path = tmp_path / "flair.nii"
        sitk.WriteImage(image, str(path))
        monkeypatch.setattr(io, "READ_PIECE", 1 << 10)  # pieces of the 24 KB of voxels
    monkeypatch.setattr(segment, "segment_image", lambda *a, **k: pytest.fail("segmented after a cancel"))
    told = []

    def progress(fraction, message):
        told.append(fraction)
        stop["now"] = fraction > 0  # Cancel pressed once the read is under way

    stop = {"now": False}
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(Cancelled):
        segment.segment_case("case", path, out, segment.load_models([tiny_model]), "cpu", progress=progress,
                             cancel=lambda: stop["now"], brain_model=None, ventricle_model=None)
    assert 0 < max(told) < segment.READING_SHARE / 2  # stopped early in the read
    assert not list(out.iterdir())


def test_cancel_stops_the_whole_batch(tmp_path, tiny_model):
    """segment_cases with a cancel check: a cancel was recorded as the case's failure ('internal error: Cancelled'),
    and the run went on to read (and cancel) every case after it. It now stops the run, as Ctrl-C does, with the
    summary of the cases finished."""
    from DeepWMLLib.errors import Cancelled
    from DeepWMLLib.segment import segment_cases

    paths = [write_case(tmp_path, name, size=(32, 32, 4))[0] for name in ("p1", "p2", "p3")]
    started = []

    def factory(number, total, case):
        started.append(case)
        return lambda fraction, message: None

    factory.finish = lambda row: None
    out = tmp_path / "out"
    with pytest.raises(Cancelled):
        segment_cases([str(p) for p in paths], out, [str(tiny_model)], "cpu", progress_factory=factory,
                      cancel=lambda: len(started) > 1, brain_model=None, ventricle_model=None)
    assert started == ["p1", "p2"]
    assert [r["case"] for r in read_summary(out)] == ["p1"] and (out / "p1_wmh.nii.gz").is_file()


def test_progress_gives_each_network_its_share_of_the_work():
    from DeepWMLLib.segment import load_models, segment_image

    image = sitk.ReadImage(str(Path(__file__).resolve().parents[1] / "Resources" / "Sample" / "sample_flair.nii.gz"))
    image = image[:, :, image.GetDepth() // 2 - 2: image.GetDepth() // 2 + 2]  # the shares are per slice: 4 will do
    seen = []
    segment_image(image, load_models(None), "cpu", progress=lambda f, m: seen.append((f, m)), ventricle_model=None)
    share = {}
    for (before, _), (after, message) in zip(seen, seen[1:]):
        if ".pt: slice" in message:
            name = message.split(":")[0]
            share[name] = share.get(name, 0.0) + after - before
    lesion, brain = share["deepwml_unet32_v9.pt"], share["deepwml_brain8_synth_v1.pt"]
    # the 8-channel brain network on a 128-pixel grid costs about 1/64 of the 32-channel one on 256 by
    # network_cost: it must not fill half of the bar (before: each network an equal share per slice)
    assert brain < 0.1 * lesion and lesion > 0.6


def test_progress_reaches_100_percent_only_when_the_case_is_written(tmp_path, tiny_model):
    """A real run (the tiny network, no oracle): the network's progress is a part of the case's, so 1.0 comes
    last, once, after every output is written; never backwards."""
    from DeepWMLLib.segment import segment_cases

    path, _ = write_case(tmp_path, "case", size=(32, 32, 12), blobs=((0.5, 0.5, 0.5, 5.0),))
    out = tmp_path / "out"
    calls = []

    class Recorder:
        def __call__(self, number, total, case):
            return lambda fraction, message: calls.append((fraction, message, sorted(p.name for p in out.iterdir())))

        def finish(self, row):
            calls.append(("finished", row["status"], None))

    rows = segment_cases([str(path)], out, [str(tiny_model)], "cpu", progress_factory=Recorder(), batch_size=2,
                         qc=True, save_probabilities=True, brain_model=None, ventricle_model=None)
    assert rows[0]["status"] == "ok" and calls[-1] == ("finished", "ok", None)
    fractions = [f for f, _, _ in calls[:-1]]
    assert fractions == sorted(fractions) and len(fractions) > 5
    assert fractions[-1] == 1.0 and fractions.count(1.0) == 1
    assert max(fractions[:-1]) < 1.0
    written = calls[-2][2]
    assert {"case_wmh.nii.gz", "case.seg.nrrd", "case_prob.nii.gz", "case_qc.png", "case_report.json"} <= set(written)
    assert all("case_report.json" not in files for _, _, files in calls[:-2])  # the report is written last
    messages = [m for _, m, _ in calls[:-1]]
    assert messages.index("drawing the QC picture") < messages.index("writing the mask") < messages.index("done")


def test_usage_and_input_errors_are_one_line(tmp_path, tiny_model, capsys):
    assert main(["segment", str(tmp_path / "missing.nii.gz"), "-o", str(tmp_path / "o"),
                 "--model", str(tiny_model)]) == 1
    rows = read_summary(tmp_path / "o")
    assert rows[0]["status"] == "error" and "does not exist" in rows[0]["error"]
    with pytest.raises(SystemExit) as info:
        main(["segment", "x.nii.gz"])  # no -o
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        main(["segment", "x.nii.gz", "-o", "o", "--threshold", "1.5"])
    assert info.value.code == 2
    capsys.readouterr()
    assert main(["segment", "x.nii.gz", "-o", str(tmp_path / "o2"), "--model", str(tmp_path / "nomodel.pt")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0] and "Traceback" not in err[0]


def test_cuda_request_without_gpu_is_a_clear_error(tmp_path, tiny_model, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    path, _ = write_case(tmp_path, "g", size=(32, 32, 4))
    assert main(["segment", str(path), "-o", str(tmp_path / "o"), "--model", str(tiny_model), "--device", "cuda"]) == 1
    # refused at once, before OUTDIR is made (each case was refused, in a summary.csv of failed cases: dev46)
    assert "error: --device cuda was asked for but no CUDA GPU is usable here" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_console_script_runs_as_a_process(tmp_path, tiny_model):
    path, _ = write_case(tmp_path, "p", size=(32, 32, 4))
    proc = subprocess.run([sys.executable, "-m", "DeepWMLLib.cli", "segment", str(path), "-o", str(tmp_path / "o"),
                           "--model", str(tiny_model), "--device", "cpu"], capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "1/1 cases done" in proc.stderr


def test_onnx_and_torch_backends_agree(tiny_model, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    from DeepWMLLib.inference import OnnxRunner, TorchRunner, make_runner, resolve_device
    from DeepWMLLib.segment import load_models

    monkeypatch.setenv("DEEPWML_CACHE_DIR", str(tmp_path / "cache"))
    (loaded,) = load_models([tiny_model])
    cpu = resolve_device("cpu")
    assert isinstance(make_runner(loaded, cpu, "onnx"), OnnxRunner)
    assert isinstance(make_runner(loaded, cpu, "torch"), TorchRunner)
    batch = np.random.default_rng(0).normal(size=(3, 1, 64, 64)).astype(np.float32)
    assert np.allclose(OnnxRunner(loaded)(batch), TorchRunner(loaded, cpu, "fp32")(batch), atol=1e-4)
    assert list((tmp_path / "cache" / "onnx").glob("*.onnx"))  # exported once, cached
    # a runner is built once per model file, device and backend, and reused by the next case
    (again,) = load_models([tiny_model])
    assert make_runner(again, cpu, "onnx") is make_runner(loaded, cpu, "onnx")
    assert make_runner(again, cpu, "torch") is not make_runner(loaded, cpu, "onnx")


def test_openvino_backend_agrees_with_torch_in_fp32_and_closely_in_bf16(tiny_model, tmp_path, monkeypatch):
    """OpenVINO is the automatic choice on the CPU when installed; in fp32 it computes what PyTorch
    does, and bf16 (only where the CPU computes it natively) stays close. Runners are kept per precision."""
    pytest.importorskip("openvino")
    from DeepWMLLib.inference import OpenVinoRunner, TorchRunner, _openvino_core, make_runner, resolve_device
    from DeepWMLLib.segment import load_models

    from DeepWMLLib import inference

    monkeypatch.setenv("DEEPWML_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(inference, "_BF16_CHOICES", {})  # auto's bf16-or-fp32 measured here, into this cache
    # and a runner built here: the tiny model's digest is every test's, so an earlier test's kept runner (measured
    # into its own cache) was handed back, and no measurement was found in this one
    monkeypatch.setattr(inference, "_RUNNERS", {})
    (loaded,) = load_models([tiny_model])
    cpu = resolve_device("cpu")
    auto = make_runner(loaded, cpu, "auto")
    assert isinstance(auto, OpenVinoRunner)
    batch = np.random.default_rng(0).normal(size=(3, 1, 64, 64)).astype(np.float32)
    reference = TorchRunner(loaded, cpu, "fp32")(batch)
    fp32 = make_runner(loaded, cpu, "openvino", "fp32")
    assert fp32.name == "openvino fp32" and fp32 is not auto
    assert np.allclose(fp32(batch), reference, atol=1e-4)
    first = fp32(batch[:1])
    fp32(batch[1:2])  # the next run reuses the request's output buffer: the first result must not change
    assert np.array_equal(first, fp32(batch[:1])) and np.allclose(first, reference[:1], atol=1e-4)
    native = "BF16" in _openvino_core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    if native:  # bf16 where measured faster here (inference.bf16_is_faster)
        (memo,) = (tmp_path / "cache" / "precision").glob("openvino-*.json")
        assert auto.name == ("openvino bf16" if json.loads(memo.read_text())["bf16"] else "openvino fp32")
    else:
        assert auto.name == "openvino fp32"
    if native:
        bf16 = make_runner(loaded, cpu, "openvino", "bf16")
        difference = np.abs(1 / (1 + np.exp(-bf16(batch))) - 1 / (1 + np.exp(-reference)))
        assert 0 < difference.max() < 0.05  # rounded, so not identical, but close
    assert list((tmp_path / "cache" / "openvino").iterdir())  # compiled networks cached for the next process
    # one kept runner used by two threads at once (two segmentations): each gets its own slices' answer
    from concurrent.futures import ThreadPoolExecutor

    singles = [fp32(batch[i:i + 1]) for i in range(3)]
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda i: fp32(batch[i % 3:i % 3 + 1]), range(60)))
    assert all(np.array_equal(a, singles[i % 3]) for i, a in enumerate(answers))


def test_precision_choices_and_their_errors(tiny_model, tmp_path, monkeypatch):
    from DeepWMLLib.errors import DeepWMLError
    from DeepWMLLib.inference import _openvino_precision, make_runner

    class Core:
        def __init__(self, capabilities):
            self.capabilities = capabilities

        def get_property(self, device, name):
            assert (device, name) == ("CPU", "OPTIMIZATION_CAPABILITIES")
            return self.capabilities

    assert _openvino_precision(Core(["FP32", "BF16", "INT8"]), "auto") == "bf16"
    assert _openvino_precision(Core(["FP32", "INT8"]), "auto") == "fp32"
    assert _openvino_precision(Core(["FP32", "BF16"]), "fp32") == "fp32"
    with pytest.raises(DeepWMLError, match="native bf16"):
        _openvino_precision(Core(["FP32"]), "bf16")
    from DeepWMLLib.segment import load_models

    monkeypatch.setenv("DEEPWML_CACHE_DIR", str(tmp_path / "cache"))
    (loaded,) = load_models([tiny_model])
    with pytest.raises(DeepWMLError, match="not onnx"):
        make_runner(loaded, "cpu", "onnx", "bf16")
    with pytest.raises(DeepWMLError, match="unknown precision"):
        make_runner(loaded, "cpu", "auto", "fp8")
    with pytest.raises(DeepWMLError, match="unknown backend"):
        make_runner(loaded, "cpu", "tensorrt")


def test_auto_backend_falls_back_to_onnx_runtime_without_openvino(tiny_model, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    from DeepWMLLib import inference
    from DeepWMLLib.errors import DeepWMLError
    from DeepWMLLib.segment import load_models

    def missing():
        raise ImportError("No module named 'openvino'")

    monkeypatch.setattr(inference, "_openvino_core", missing)
    monkeypatch.setattr(inference, "_RUNNERS", {})
    monkeypatch.setenv("DEEPWML_CACHE_DIR", str(tmp_path / "cache"))
    (loaded,) = load_models([tiny_model])
    assert isinstance(inference.make_runner(loaded, "cpu", "auto"), inference.OnnxRunner)
    with pytest.raises(DeepWMLError, match="pip install openvino"):
        inference.make_runner(loaded, "cpu", "openvino")


def test_runners_of_an_ensemble_and_its_brain_model_are_all_kept_between_cases(tmp_path):
    """An ensemble of three members and the brain-mask network: the next case reuses all four
    runners (none is evicted and rebuilt, which would cost a session build per network per case)."""
    from conftest import tiny_model_file
    from DeepWMLLib.inference import make_runner, resolve_device
    from DeepWMLLib.segment import load_models

    files = [tiny_model_file(tmp_path / f"m{i}.pt", seed=i) for i in range(4)]
    cpu = resolve_device("cpu")
    first = [make_runner(m, cpu, "torch") for m in load_models(files)]
    again = [make_runner(m, cpu, "torch") for m in load_models(files)]
    assert all(a is b for a, b in zip(first, again))


def test_default_batch_is_one_slice_with_onnx_runtime_and_four_with_pytorch_on_cpu(tiny_model, tmp_path, monkeypatch):
    """ONNX Runtime runs one slice at a time (a fresh process then touches a quarter of the new
    memory, at the same warm speed); PyTorch on the CPU keeps batches of 4; --batch-size overrides."""
    pytest.importorskip("onnxruntime")
    from DeepWMLLib import inference
    from DeepWMLLib.segment import load_models

    monkeypatch.setenv("DEEPWML_CACHE_DIR", str(tmp_path / "cache"))
    seen = []
    real = inference.predict_network_slices

    def spy(slices, runner, batch_size, *args, **kwargs):
        seen.append((runner.name.split()[0], batch_size))
        return real(slices, runner, batch_size, *args, **kwargs)

    monkeypatch.setattr(inference, "predict_network_slices", spy)
    (loaded,) = load_models([tiny_model])
    image, _ = make_volume(size=(40, 36, 3))
    for backend, batch in (("onnx", None), ("torch", None), ("onnx", 3)):
        inference.predict_maps(image, [loaded], None, "cpu", batch, backend=backend)
    assert seen == [("onnxruntime", 1), ("torch", 4), ("onnxruntime", 3)]
    if importlib.util.find_spec("openvino") is not None:
        inference.predict_maps(image, [loaded], None, "cpu", None, backend="openvino", precision="fp32")
        assert seen[-1] == ("openvino", 1)


def test_onnx_graph_optimised_once_then_loaded_with_the_same_results(tiny_model, tmp_path, monkeypatch):
    """The first session saves ONNX Runtime's optimised graph; later ones load it (no optimisation
    passes) and compute bit for bit the same. A damaged saved graph is rebuilt, not fatal."""
    pytest.importorskip("onnxruntime")
    from DeepWMLLib.inference import OnnxRunner
    from DeepWMLLib.segment import load_models

    monkeypatch.setenv("DEEPWML_CACHE_DIR", str(tmp_path / "cache"))
    (loaded,) = load_models([tiny_model])
    batch = np.random.default_rng(1).normal(size=(2, 1, 64, 64)).astype(np.float32)
    first_runner = OnnxRunner(loaded)
    first = first_runner(batch)
    (saved,) = (tmp_path / "cache" / "onnx").glob("*.opt.onnx")
    stamp = saved.stat().st_mtime_ns
    assert np.array_equal(OnnxRunner(loaded)(batch), first)
    assert saved.stat().st_mtime_ns == stamp  # loaded, not written again
    saved.write_bytes(b"not a model")
    assert np.array_equal(OnnxRunner(loaded)(batch), first)
    assert saved.stat().st_size > 100  # rebuilt
    assert not list(saved.parent.glob("*.part"))
    # both ways of building a session keep the settings the timings were taken with
    for runner in (OnnxRunner(loaded), first_runner):
        assert not runner.session.get_session_options().enable_mem_pattern


def test_a_model_cache_on_a_full_disk_keeps_no_partial_files(tiny_model, tmp_path, monkeypatch):
    """A model cache that cannot be written (a full disk) costs the hashing and the export again next run; the
    partial files of its failed writes stayed (`.part`: from 0 bytes to most of an export, more at each run, on the
    disk that was full). A real failed write, made by a file size limit (RLIMIT_FSIZE: Python ignores SIGXFSZ)."""
    resource = pytest.importorskip("resource")
    from DeepWMLLib.checkpoint import file_digest
    from DeepWMLLib.inference import OnnxRunner
    from DeepWMLLib.segment import load_models

    cache = tmp_path / "cache"
    monkeypatch.setenv("DEEPWML_CACHE_DIR", str(cache))
    (loaded,) = load_models([tiny_model])
    for memo in (cache / "digests").iterdir():  # hashed again, its memo written again
        memo.unlink()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100, hard))
    try:
        assert file_digest(tiny_model) == loaded.digest
        with pytest.raises((OSError, RuntimeError)):
            OnnxRunner._export(loaded, cache / "onnx" / f"{loaded.digest}.onnx")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert [p.name for p in cache.rglob("*.part")] == []


@pytest.mark.parametrize("backend", ["openvino", "onnx"])
def test_segment_with_warm_cache_does_not_import_torch_or_scipy(tmp_path, tiny_model, backend):
    """Start-up time matters for short jobs: the OpenVINO and ONNX paths never need torch once the
    model was seen, and segmentation never needs scipy (its ndimage import alone costs about half a second)."""
    pytest.importorskip({"onnx": "onnxruntime"}.get(backend, backend))
    path, _ = write_case(tmp_path, "t", size=(32, 32, 4))
    env_cache = tmp_path / "cache"
    code = (
        "import sys, os\n"
        f"os.environ['DEEPWML_CACHE_DIR'] = {str(env_cache)!r}\n"
        "from DeepWMLLib import cli\n"
        "cli.OWN_PROCESS = True  # as cli.run(), the console entry point, sets it\n"
        "main = cli.main\n"
        f"args = ['segment', {str(path)!r}, '-o', {str(tmp_path / 'o')!r}, '--model', {str(tiny_model)!r}, '--device', 'cpu', '--overwrite', '--backend', {backend!r}, '--qc']\n"
        "assert main(args) == 0\n"
        "print('torch' in sys.modules, 'scipy' in sys.modules, 'slicerio' in sys.modules, 'numpy.ma' in sys.modules)\n"
    )
    if backend == "openvino":  # without OpenVINO's model converter, which stays importable for others
        code += ("print('openvino.tools.ovc' in sys.modules, 'openvino' in sys.modules)\n"
                 "from openvino.tools.ovc import convert_model\n")
    first = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300)
    second = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300)
    assert first.returncode == 0 and second.returncode == 0, second.stderr
    # cold cache: the model is read with torch and exported. Never: scipy, slicerio/pynrrd (the
    # .seg.nrrd is written directly), numpy.ma (np.percentile pulls it in; 20 ms; so does OpenVINO's
    # model converter)
    expected = "\nFalse True" if backend == "openvino" else ""
    assert first.stdout.strip() == "True False False False" + expected
    assert second.stdout.strip() == "False False False False" + expected


def test_console_entry_point_exits_quickly_with_outputs_written_and_the_right_code(tmp_path, tiny_model):
    """`deepwml segment` ends with os._exit after its outputs are closed: files, the summary, the
    messages on stderr and the exit code must all be there as with a normal exit."""
    path, _ = write_case(tmp_path, "good", size=(32, 32, 4))
    out = tmp_path / "o"
    code = "from DeepWMLLib.cli import run; run()"
    result = subprocess.run([sys.executable, "-c", code, "segment", str(path), str(tmp_path / "missing.nii.gz"),
                             "-o", str(out), "--model", str(tiny_model), "--device", "cpu"],
                            capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300)
    assert result.returncode == 1, result.stderr
    assert "good: ok" in result.stderr and "missing: error" in result.stderr
    assert result.stderr.rstrip().endswith(f"1/2 cases done (1 failed, 0 skipped), summary in {out / 'summary.csv'}")
    assert io.read_mask(out / "good_wmh.nii.gz").GetSize() == (32, 32, 4)
    assert io.read_segmentation(out / "good.seg.nrrd").GetSize() == (32, 32, 4)
    assert "missing" in (out / "summary.csv").read_text(encoding="utf-8-sig")
    ok = subprocess.run([sys.executable, "-c", code, "segment", str(path), "-o", str(out), "--overwrite",
                         "--model", str(tiny_model), "--device", "cpu"], capture_output=True, text=True,
                        encoding="utf-8", errors="replace", timeout=300)
    assert ok.returncode == 0, ok.stderr


def test_lean_openvino_import_falls_back_to_a_whole_import_when_the_converter_is_required(tmp_path):
    """The command line blocks OpenVINO's model converter at import; a version whose package cannot
    import without it is then imported whole, not broken (a stand-in package shows both)."""
    package = tmp_path / "fake" / "openvino"
    (package / "tools" / "ovc").mkdir(parents=True)
    (package / "tools" / "__init__.py").write_text("")
    (package / "tools" / "ovc" / "__init__.py").write_text("def convert_model():\n    return 'converted'\n")
    required = "from openvino.tools.ovc import convert_model\nclass Core:\n    pass\n"
    optional = "try:\n    from openvino.tools.ovc import convert_model\nexcept ImportError:\n    pass\nclass Core:\n    pass\n"
    code = ("import sys\nfrom DeepWMLLib import cli, inference\ncli.OWN_PROCESS = True\n"
            "ov = inference._import_openvino()\n"
            "print(hasattr(ov, 'convert_model'), 'openvino.tools.ovc' in sys.modules, ov.__file__.startswith(sys.argv[1]))\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path / "fake"), str(Path(__file__).resolve().parents[1])]))
    for init, expected in ((required, "True True True"), (optional, "False False True")):
        (package / "__init__.py").write_text(init)
        result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                                env=env, timeout=120)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == expected


def test_pytorch_on_the_cpu_runs_bf16_where_native_and_fp32_on_request(tiny_model, tmp_path, monkeypatch):
    """Without OpenVINO and ONNX Runtime (e.g. in Slicer before they are installed) PyTorch is the
    runtime: bf16 autocast on CPUs with AVX512-BF16 or AMX (auto, where bf16 is measured faster there), exact fp32
    on request, and a clear error for bf16 on a CPU without it."""
    from DeepWMLLib import inference
    from DeepWMLLib.errors import DeepWMLError
    from DeepWMLLib.segment import load_models

    monkeypatch.setenv("DEEPWML_CACHE_DIR", str(tmp_path / "cache"))
    (loaded,) = load_models([tiny_model])
    batch = np.random.default_rng(2).normal(size=(2, 1, 64, 64)).astype(np.float32)
    fp32 = inference.TorchRunner(loaded, "cpu", "fp32")
    assert fp32.name == "torch"
    native = inference.torch_cpu_has_native_bf16()
    monkeypatch.setattr(inference, "bf16_is_faster", lambda *measure: True)
    auto = inference.TorchRunner(loaded, "cpu")
    assert auto.name == ("torch bf16" if native else "torch")
    if native:
        difference = np.abs(1 / (1 + np.exp(-auto(batch))) - 1 / (1 + np.exp(-fp32(batch))))
        assert 0 < difference.max() < 0.05
        monkeypatch.setattr(inference, "bf16_is_faster", lambda *measure: False)  # bf16 measured slower here
        assert inference.TorchRunner(loaded, "cpu").name == "torch"
    monkeypatch.setattr(inference, "torch_cpu_has_native_bf16", lambda: False)
    assert inference.TorchRunner(loaded, "cpu").name == "torch"
    with pytest.raises(DeepWMLError, match="native bf16"):
        inference.TorchRunner(loaded, "cpu", "bf16")


def test_warnings_are_one_line(tmp_path, monkeypatch, capsys):
    import warnings

    from DeepWMLLib import segment

    def warn_and_finish(*args, **kwargs):
        warnings.warn("background left out: a test warning", stacklevel=2)
        return []

    monkeypatch.setattr(segment, "segment_cases", warn_and_finish)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        before = warnings.showwarning
        assert main(["segment", "x.nii.gz", "-o", str(tmp_path / "o")]) == 0
        err = capsys.readouterr().err.splitlines()
        assert err[0] == "deepwml segment: warning: background left out: a test warning"
        assert warnings.showwarning is before  # the library's callers keep their own warning display


def _export_series(folder, study, description, inversion=None, slices=4, seed=0, date="20260110", prefix="slice"):
    image, _ = make_volume(size=(28, 24, slices), spacing=(0.9, 0.9, 5.0), dtype=sitk.sitkInt16, seed=seed)
    uid = f"{study}.{sum(map(ord, str(folder) + description)) % 10**6}"
    write_dicom_series(folder, image, uid=uid, description=description, inversion_ms=inversion, prefix=prefix,
                       repetition_ms=9000 if inversion else 600, extra={"0020|000d": study, "0008|0020": date})
    return image


def test_image_files_beside_a_dicom_series_and_documents_below_it_change_nothing(tmp_path, tiny_model):
    """A folder of NIfTI scans with one stray DICOM file: every scan is still a case (the DICOM file one
    more). A one-series folder with a report.pdf in a subfolder is still that series (no PACS export,
    whose strict choice would skip an unlabelled series), and a .pdf is no DICOM file."""
    folder = tmp_path / "scans"
    folder.mkdir()
    write_case(folder, "a", size=(32, 32, 4))
    write_case(folder, "b", size=(32, 32, 4))
    image, _ = make_volume(size=(32, 32, 4), spacing=(0.9, 0.9, 5.0), dtype=sitk.sitkInt16)
    series = write_dicom_series(tmp_path / "series", image, uid="1.2.3.77")
    next(series.iterdir()).rename(folder / "screenshot.dcm")
    args = ["--model", str(tiny_model), "--device", "cpu"]
    main(["segment", str(folder), "-o", str(tmp_path / "out1"), *args])
    assert {"a", "b"} <= {r["case"] for r in read_summary(tmp_path / "out1") if r["status"] == "ok"}

    plain = write_dicom_series(tmp_path / "plain", image, uid="1.2.3.78")  # no description, no timing
    (plain / "docs").mkdir()
    (plain / "docs" / "report.pdf").write_bytes(b"%PDF-1.4 not an image")
    assert not io.has_dicom_below(plain)
    assert main(["segment", str(plain), "-o", str(tmp_path / "out2"), *args]) == 0
    assert [(r["case"], r["status"]) for r in read_summary(tmp_path / "out2")] == [("plain", "ok")]


@pytest.mark.parametrize("thickness, warned", [("2.5", "a 0.50 mm gap between them"), ("3.6", None),
                                               ("3.0", None), (None, None)])
def test_a_series_with_a_gap_between_its_slices_says_so(tmp_path, tiny_model, thickness, warned):
    """slice_thickness_mm is the spacing of the slices (right for volumes and LV), but a series whose slices are
    3 mm apart and 2.5 mm thick (a gap) showed no sign of it. The report now gives the header's Slice Thickness
    (0018,0050) in dicom_series (null when absent) and warns of a gap; overlapping slices (3D FLAIRs reconstructed
    at half their thickness) image everything and are only recorded: a warning on every such scan says nothing."""
    image, _ = make_volume(size=(32, 32, 6), spacing=(0.9, 0.9, 3.0), dtype=sitk.sitkInt16)
    folder = write_dicom_series(tmp_path / "series", image, uid="1.2.3.80", description="AX FLAIR",
                                extra={"0018|0050": thickness} if thickness else None)
    if thickness is None:
        for path in folder.iterdir():  # a header without Slice Thickness
            piece = sitk.ReadImage(str(path))
            writer = sitk.ImageFileWriter()
            writer.KeepOriginalImageUIDOn()
            writer.SetFileName(str(path))
            piece.EraseMetaData("0018|0050")
            writer.Execute(piece)
    assert main(["segment", str(folder), "-o", str(tmp_path / "out"), "--model", str(tiny_model), "--device", "cpu"]) == 0
    report = json.loads((tmp_path / "out" / "series_report.json").read_text(encoding="utf-8"))
    assert report["slice_thickness_mm"] == 3.0
    assert report["dicom_series"]["slice_thickness_tag_mm"] == (None if thickness is None else float(thickness))
    gaps = [w for w in report["warnings"] if "Slice Thickness" in w]
    if warned:
        assert gaps == [f"DICOM slices 3.00 mm apart but {float(thickness):.2f} mm thick (Slice Thickness; {warned}): "
                        "volumes and LV use the spacing, 3.00 mm"]
        assert warned in read_summary(tmp_path / "out")[0]["warnings"]
    else:
        assert not gaps


@pytest.mark.parametrize("steps", [[3, 3, 3, 3.4, 3], [3.0] * 5])
def test_a_series_with_unevenly_spaced_slices_says_so(tmp_path, tiny_model, steps):
    """Slices 3 mm apart but for one 3.4 mm step (under the 20 % refused as slices missing) were segmented on the
    grid of their mean step without a word, one slice 0.24 mm from where it was imaged. The report and summary
    now warn of it; evenly spaced slices, their positions with float noise, are not warned of."""
    image, _ = make_volume(size=(32, 32, 6), spacing=(0.9, 0.9, 3.0), dtype=sitk.sitkInt16,
                           direction=rotation(0.1, 0.05, 0.2).ravel().tolist())
    folder = write_dicom_series(tmp_path / "series", image, uid="1.2.3.81", description="AX FLAIR",
                                positions=stepped_positions(image, steps, noise_mm=0.001))
    assert main(["segment", str(folder), "-o", str(tmp_path / "out"), "--model", str(tiny_model), "--device", "cpu"]) == 0
    report = json.loads((tmp_path / "out" / "series_report.json").read_text(encoding="utf-8"))
    uneven = [w for w in report["warnings"] if "unevenly spaced" in w]
    if max(steps) == 3:
        assert not uneven
        return
    assert report["slice_thickness_mm"] == pytest.approx(3.08, abs=1e-3)  # the mean step: the stack's extent
    assert uneven == ["DICOM slices unevenly spaced (3.00 to 3.40 mm apart by their positions): volumes and LV use "
                      "their mean spacing, 3.08 mm, which puts image 4 (instance 4) 0.24 mm from where it was imaged "
                      "(lesions there are placed as far off, and measured with the mean spacing)"]
    assert "unevenly spaced" in read_summary(tmp_path / "out")[0]["warnings"]


def test_an_enhanced_mr_file_with_unevenly_spaced_frames_says_so_as_a_series_does(tmp_path, tiny_model):
    """One multi-frame file, its frames 3 mm apart but for one 3.4 mm step: refused before (read by GDCM on
    1 x 1 x 1 mm); now segmented on their mean step, its report and summary warning as a series' do."""
    image, _ = make_volume(size=(32, 32, 6), spacing=(0.9, 0.9, 3.0), dtype=sitk.sitkInt16,
                           direction=rotation(0.1, 0.05, 0.2).ravel().tolist())
    write_enhanced_mr(tmp_path / "stack" / "IM1", image, positions=stepped_positions(image, [3, 3, 3, 3.4, 3]))
    assert main(["segment", str(tmp_path / "stack"), "-o", str(tmp_path / "out"), "--model", str(tiny_model),
                 "--device", "cpu"]) == 0
    report = json.loads((tmp_path / "out" / "stack_report.json").read_text(encoding="utf-8"))
    assert report["slice_thickness_mm"] == pytest.approx(3.08, abs=1e-3)
    assert [w for w in report["warnings"] if "unevenly spaced" in w] == [
        "DICOM slices unevenly spaced (3.00 to 3.40 mm apart by their positions): volumes and LV use their mean "
        "spacing, 3.08 mm, which puts frame 4 0.24 mm from where it was imaged (lesions there are placed as far off, "
        "and measured with the mean spacing)"]
    assert "unevenly spaced" in read_summary(tmp_path / "out")[0]["warnings"]


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_a_damaged_file_at_the_end_of_a_series_is_reported(tmp_path, tiny_model, damage):
    """A transfer cut short leaves the last slice file empty or truncated: no gap shows, so the series'
    other slices are segmented, and the report and summary say a file beside it could not be read."""
    image, _ = make_volume(size=(32, 32, 6), spacing=(0.9, 0.9, 5.0), dtype=sitk.sitkInt16)
    folder = write_dicom_series(tmp_path / "series", image, uid="1.2.3.79", description="AX FLAIR")
    last = sorted(folder.iterdir())[-1]
    last.write_bytes(b"" if damage == "empty" else last.read_bytes()[:400])
    assert main(["segment", str(folder), "-o", str(tmp_path / "out"), "--model", str(tiny_model), "--device", "cpu"]) == 0
    report = json.loads((tmp_path / "out" / "series_report.json").read_text(encoding="utf-8"))
    assert report["dicom_series"]["images"] == 5
    assert any(w.startswith("1 file(s) beside the series could not be read") and last.name in w for w in report["warnings"])
    assert "could not be read" in read_summary(tmp_path / "out")[0]["warnings"]


def test_a_pacs_export_gives_one_case_per_study_with_its_flair(tmp_path, tiny_model):
    """A PACS export nests patient / study / series folders: every study below the input (its Study
    Instance UID, wherever its files lie) is one case, named by the folder its files share, its FLAIR
    picked among its series; a study without a FLAIR-like series is skipped, not failed; a stray image at
    the top does not hide the studies below; symbolic links are followed."""
    export = tmp_path / "export"
    flairs = {
        "PAT1_STU1": _export_series(export / "PAT1" / "STU1" / "SER2", "1.1", "AX T2 FLAIR", 2500, slices=5),
        "PAT2_STU1": _export_series(export / "PAT2" / "STU1" / "SER1", "2.1", "t2_tirm_tra_dark-fluid", slices=6),
        "PAT2_STU2_SER1": _export_series(export / "PAT2" / "STU2" / "SER1", "2.2", "FLAIR", slices=3),
        "PAT3": _export_series(export / "PAT3" / "FL_A", "3.1", "FLAIR", 2500, slices=7),
        "PAT3_FL_B": _export_series(export / "PAT3" / "FL_B", "3.2", "FLAIR", 2500, slices=8),
    }
    _export_series(export / "PAT1" / "STU1" / "SER1", "1.1", "AX T1 SE", slices=3)
    _export_series(export / "PAT1" / "STU1" / "SER3", "1.1", "AX T2 TSE", slices=3)
    _export_series(export / "PAT2" / "STU1" / "SER2", "2.1", "sag T1 mprage", slices=3)
    _export_series(export / "PAT3" / "T1_A", "3.1", "T1", slices=3)
    _export_series(export / "PAT4" / "STU1" / "SER1", "4.1", "sag T1 mprage", slices=3)  # no FLAIR: skipped
    _export_series(export, "9.9", "key image", slices=1, prefix="key")  # a stray image at the top: skipped
    (export / "README.txt").write_text("exported by PACS")
    (tmp_path / "elsewhere").mkdir()
    flairs["PAT5_FLAIR"] = _export_series(tmp_path / "elsewhere" / "FLAIR", "5.1", "FLAIR", 2500, slices=4)
    (export / "PAT5").symlink_to(tmp_path / "elsewhere")
    (export / "PAT1" / "loop").symlink_to(export)  # a link back up the tree: followed once, no endless walk
    unlabelled, _ = make_volume(size=(28, 24, 5), spacing=(0.9, 0.9, 5.0), dtype=sitk.sitkInt16)
    write_dicom_series(export / "PAT6" / "S1", unlabelled, uid="6.1.1", extra={"0020|000d": "6.1"})  # stripped header
    flairs["PAT6_S1"] = unlabelled
    write_dicom_series(export / "PAT7" / "S1", unlabelled, uid="7.1.1", description="Head 5mm",
                       extra={"0020|000d": "7.1", "0008|0060": "CT"})  # another exam: skipped
    out = tmp_path / "out"
    assert main(["segment", str(export), "-o", str(out), "--model", str(tiny_model), "--device", "cpu"]) == 0
    rows = {r["case"]: r for r in read_summary(out)}
    assert sorted(rows) == sorted([*flairs, "PAT4_STU1_SER1", "export", "PAT7_S1"])
    for skipped in ("PAT4_STU1_SER1", "export", "PAT7_S1"):
        assert rows[skipped]["status"] == "skipped" and "none looks like a FLAIR" in rows[skipped]["error"]
    assert all(rows[case]["status"] == "ok" for case in flairs)
    studies = {"PAT1_STU1": "1.1", "PAT2_STU1": "2.1", "PAT2_STU2_SER1": "2.2", "PAT3": "3.1", "PAT3_FL_B": "3.2",
               "PAT5_FLAIR": "5.1", "PAT6_S1": "6.1"}
    for case, flair in flairs.items():
        report = json.loads((out / f"{case}_report.json").read_text(encoding="utf-8"))
        assert len(report["slices"]) == flair.GetSize()[2], case
        assert io.grid_difference(sitk.ReadImage(str(out / f"{case}_wmh.nrrd")), flair) is None, case
        assert "T1" not in (report["dicom_series"]["description"] or "")
        assert report["dicom_series"]["study_uid"] == studies[case]


def test_summary_input_is_the_path_as_typed_for_files_series_and_studies(tmp_path, tiny_model, monkeypatch):
    """summary.csv's `input` names every case as it was typed, so that a script joining the rows to its own
    list of inputs (or opening them from where the run started) finds each: a study found in an export was
    given as an absolute path while files and DICOM series folders were as typed. Its absolute path is the
    report's `input_absolute`, from wherever the run was started."""
    image, _ = make_volume(size=(28, 24, 4), spacing=(0.9, 0.9, 5.0), dtype=sitk.sitkInt16)
    sitk.WriteImage(image, str(tmp_path / "scan.nii.gz"))
    _export_series(tmp_path / "series", "1.1", "AX FLAIR", 2500)
    _export_series(tmp_path / "export" / "PAT1" / "STU1" / "SER1", "2.1", "AX FLAIR", 2500)
    monkeypatch.chdir(tmp_path)
    assert main(["segment", "scan.nii.gz", "series", "export", "-o", "out", "--model", str(tiny_model),
                 "--device", "cpu"]) == 0
    rows = {row["case"]: row for row in read_summary(tmp_path / "out")}
    expected = {"scan": "scan.nii.gz", "series": "series", "PAT1_STU1_SER1": os.path.join("export", "PAT1", "STU1", "SER1")}
    assert {case: row["input"] for case, row in rows.items()} == expected
    for case, given in expected.items():
        report = json.loads((tmp_path / "out" / f"{case}_report.json").read_text(encoding="utf-8"))
        assert report["input"] == given and report["input_absolute"] == str((tmp_path / given).resolve())


def test_studies_sharing_folders_and_series_split_over_folders(tmp_path, tiny_model):
    """Two visits' files in one folder are two cases, named by their study dates (names that stay when a
    third visit is added); a series whose files lie in two folders is read whole, in slice order."""
    flat = tmp_path / "flat"
    first = _export_series(flat / "P", "6.1", "FLAIR", 2500, slices=4, date="20250101", prefix="a")
    second = _export_series(flat / "P", "6.2", "FLAIR", 2500, slices=6, date="20260101", prefix="b")
    _export_series(flat / "P", "6.1", "T1", slices=3, date="20250101", prefix="c")
    names = [study.name for study in io.dicom_catalogue(flat)[0]]
    assert names == ["P_20250101", "P_20260101"]
    _export_series(flat / "P", "6.0", "FLAIR", 2500, slices=3, date="20240101", prefix="d")
    assert [study.name for study in io.dicom_catalogue(flat)[0]] == ["P_20240101", "P_20250101", "P_20260101"]
    out = tmp_path / "out"
    assert main(["segment", str(flat), "-o", str(out), "--model", str(tiny_model), "--device", "cpu"]) == 0
    for name, image in (("P_20250101", first), ("P_20260101", second)):
        assert io.grid_difference(sitk.ReadImage(str(out / f"{name}_wmh.nrrd")), image) is None
    split = tmp_path / "split" / "STU"
    whole = _export_series(split / "SER1", "7.1", "FLAIR", 2500, slices=6)
    for k in (1, 3, 5):  # every other slice moved to a second folder, as some exports split large series
        (split / "SER2").mkdir(exist_ok=True)
        (split / "SER1" / f"slice{k:03d}.dcm").rename(split / "SER2" / f"slice{k:03d}.dcm")
    assert main(["segment", str(tmp_path / "split"), "-o", str(tmp_path / "out2"), "--model", str(tiny_model),
                 "--device", "cpu"]) == 0
    assert io.grid_difference(sitk.ReadImage(str(tmp_path / "out2" / "STU_wmh.nrrd")), whole) is None


def test_a_folder_of_the_export_that_cannot_be_read_is_a_failing_case(tmp_path, tiny_model, monkeypatch):
    """A subfolder the user may not read (a permission problem; simulated, since tests may run as root) is
    named in summary.csv as a failing case, and the readable studies still run."""
    export = tmp_path / "export"
    _export_series(export / "PAT1" / "SER1", "1.1", "FLAIR", 2500)
    _export_series(export / "PAT2" / "SER1", "2.1", "FLAIR", 2500)
    _export_series(export / "PAT3" / "SER1", "3.1", "FLAIR", 2500)
    locked, also = str(export / "PAT2"), str(export / "PAT3")
    real_scandir = os.scandir

    def scandir(path="."):
        if str(path) in (locked, also):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    out = tmp_path / "out"
    assert main(["segment", str(export), "-o", str(out), "--model", str(tiny_model), "--device", "cpu"]) == 1
    rows = read_summary(out)
    assert [r["status"] for r in rows] == ["ok", "error", "error"] and rows[0]["case"] == "PAT1_SER1"
    assert [r["error"] for r in rows[1:]] == [f"{folder} cannot be read (Permission denied)" for folder in (locked, also)]


def test_a_series_choice_that_matches_nothing_in_any_study_is_an_error(tmp_path, tiny_model, capsys):
    """--series applies to every study of an export, one it matches nothing in skipped; when it matches
    nothing in any study (a typo), the run does not end 'done' with no result (refused at once, before OUTDIR is
    made: refuse_series_named_nowhere); nor when no study holds a FLAIR."""
    export = tmp_path / "export"
    _export_series(export / "STU" / "s3", "5.1", "AX FLAIR", 2500, slices=4)
    _export_series(export / "STU" / "s5", "5.1", "SAG T1", slices=3, prefix="t")
    out = tmp_path / "out"
    args = ["segment", str(export), "-o", str(out), "--model", str(tiny_model), "--device", "cpu"]
    assert main(args + ["--series", "nomatch"]) == 1
    assert not out.exists()
    assert f"error: {export / 'STU'} holds 2 DICOM series and none match --series 'nomatch'" in capsys.readouterr().err
    assert main(args + ["--series", "FLAIR"]) == 0 and read_summary(out)[0]["status"] == "ok"
    other = tmp_path / "other"  # two studies, the choice in one of them: the other skipped, as before
    _export_series(other / "A" / "s1", "6.1", "AX FLAIR", 2500, slices=4)
    _export_series(other / "B" / "s1", "6.2", "SAG T1", slices=3)
    assert main(["segment", str(other), "-o", str(tmp_path / "out2"), "--model", str(tiny_model), "--device", "cpu",
                 "--series", "FLAIR"]) == 0
    assert sorted(r["status"] for r in read_summary(tmp_path / "out2")) == ["ok", "skipped"]
    capsys.readouterr()
    # an export of the wrong exam, no FLAIR in any study: an error (exit 1), not '0/1 done (0 failed, 1 skipped)', exit 0
    wrong = tmp_path / "wrong"
    _export_series(wrong / "B" / "s1", "7.2", "SAG T1", slices=3)
    assert main(["segment", str(wrong), "-o", str(tmp_path / "out3"), "--model", str(tiny_model), "--device", "cpu"]) == 1
    row, = read_summary(tmp_path / "out3")
    assert row["status"] == "error" and row["error"].endswith("; no study given holds a series that looks like a FLAIR")
    assert ("error: no series looks like a FLAIR in the DICOM study given, so nothing was segmented; if one is, choose it "
            "with --series; see summary.csv for their series") in capsys.readouterr().err


def test_a_series_choice_no_dicom_folder_holds_is_refused_at_once(tmp_path, tiny_model, capsys, monkeypatch):
    """--series naming no series of the one DICOM folder given, or of none of several, was refused case by case,
    into a summary.csv of failed cases in a new OUTDIR: now refused at once, before OUTDIR is made and before any
    pixel data is read (the headers only). Where some cases hold such a series, the others fail on their own,
    each naming its folder and series, as before; an image file takes no --series."""
    image, _ = make_volume(size=(28, 24, 4), spacing=(0.9, 0.9, 5.0), dtype=sitk.sitkInt16)
    a = write_dicom_series(tmp_path / "a", image, uid="1.2.3.81", description="AX FLAIR", inversion_ms=2500, number=3)
    b = write_dicom_series(tmp_path / "b", image, uid="1.2.3.82", description="AX FLAIR", inversion_ms=2500, number=3)
    write_dicom_series(b, image, uid="1.2.3.83", description="T1 SE", number=4, prefix="t1")
    nifti, _ = write_case(tmp_path, "n", size=(32, 32, 4))
    out = tmp_path / "out"
    args = ["-o", str(out), "--model", str(tiny_model), "--device", "cpu", "--no-brain-mask"]
    read = []
    real_read = io.read_image
    monkeypatch.setattr(io, "read_image", lambda *a, **k: read.append(a[0]) or real_read(*a, **k))
    assert main(["segment", str(a), *args, "--series", "T2"]) == 1
    assert capsys.readouterr().err == (
        f"deepwml segment: error: {a} holds 1 DICOM series and none match --series 'T2': series 3 'AX FLAIR' (4 images, "
        "TI 2500 ms); choose one with --series TEXT (its series number, its description or a part of it, or its "
        "UID)\n")
    assert main(["segment", str(a), str(b), str(nifti), *args, "--series", "T2"]) == 1
    assert capsys.readouterr().err == (
        "deepwml segment: error: --series 'T2' matches no series in any of the 2 DICOM folders given; they hold series "
        "3 'AX FLAIR' (in 2); series 4 'T1 SE' (in 1); choose one with --series TEXT (its series number, its "
        "description or a part of it, or its UID)\n")
    assert not out.exists() and read == []
    assert main(["segment", str(a), str(b), *args, "--series", "4"]) == 1  # series 4 in b alone: a fails on its own
    rows = {r["case"]: r for r in read_summary(out)}
    assert rows["b"]["status"] == "ok" and rows["a"]["status"] == "error"
    assert rows["a"]["error"].startswith(f"{a} holds 1 DICOM series and none match --series '4'")
    assert f"a: error - {a} holds 1 DICOM series and none match --series '4'" in capsys.readouterr().err



def test_a_series_folder_run_with_series_reads_each_dicom_header_once(tmp_path, tiny_model, header_reads,
                                                                      monkeypatch):
    """segment --series on one DICOM folder: the up-front check (refuse_series_named_nowhere) read every file's header,
    and the case read them all again choosing its series (and GDCM scanned the folder twice, io.is_dicom_folder's:
    the input expanded, then the case read); now once each (io.dicom_headers_read_once), the outputs the same as with
    every reading made (io's cache kept from remembering: twice each, as before)."""
    image, _ = make_volume(size=(28, 24, 5), spacing=(0.9, 0.9, 5.0), dtype=sitk.sitkInt16)
    study = write_dicom_series(tmp_path / "study", image, uid="1.2.3.71", description="AX T2 FLAIR", inversion_ms=2500,
                               repetition_ms=9000, number=2, prefix="f")
    write_dicom_series(study, image, uid="1.2.3.72", description="AX T1 SE", number=1, prefix="t")
    args = ["--model", str(tiny_model), "--device", "cpu", "--no-brain-mask", "--series", "FLAIR"]
    scans = []
    scan = io._gdcm_series_ids
    monkeypatch.setattr(io, "_gdcm_series_ids", lambda folder: scans.append(folder) or scan(folder))
    assert main(["segment", str(study), "-o", str(tmp_path / "once"), *args]) == 0
    assert in_folder(header_reads, study) == {1: 10} and scans == [study]
    header_reads.clear()
    scans.clear()
    with monkeypatch.context() as m:
        m.setattr(io, "_folder_state", lambda root, recursive: None)  # nothing remembered: the old readings
        assert main(["segment", str(study), "-o", str(tmp_path / "each"), *args]) == 0
    assert in_folder(header_reads, study) == {2: 10} and scans == [study, study]
    reports = [json.loads((tmp_path / out / "study_report.json").read_text(encoding="utf-8")) for out in ("once", "each")]
    assert reports[0]["dicom_series"] == reports[1]["dicom_series"] and reports[0]["dicom_series"]["uid"] == "1.2.3.71"
    assert reports[0]["volume_ml"] == reports[1]["volume_ml"] and reports[0]["slices"] == reports[1]["slices"]
    masks = [sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / out / "study_wmh.nrrd"))) for out in ("once", "each")]
    assert np.array_equal(*masks)

def test_a_run_of_flairless_studies_and_skipped_masks_is_an_error(tmp_path, tiny_model, capsys):
    """An export of the wrong exam beside a label mask and a Slicer segmentation (skipped as masks): the run ended
    '0/3 cases done (0 failed, 3 skipped)', exit 0, with nothing segmented; the masks skipped do not make it fine,
    so it is the error a run of only studies without a FLAIR is."""
    wrong = tmp_path / "wrong"
    _export_series(wrong / "B" / "s1", "7.2", "SAG T1", slices=3)
    _, truth = make_volume(size=(28, 24, 3), blobs=((0.5, 0.5, 0.5, 5.0),))
    sitk.WriteImage(truth, str(wrong / "consensus_mask.nii.gz"))
    sitk.WriteImage(truth, str(wrong / "case01.seg.nrrd"))
    out = tmp_path / "out"
    assert main(["segment", str(wrong), "-o", str(out), "--model", str(tiny_model), "--device", "cpu"]) == 1
    rows = {r["case"]: r for r in read_summary(out)}
    study, = (r for r in rows.values() if "looks like a FLAIR" in r["error"])
    assert study["status"] == "error" and study["error"].endswith("; no study given holds a series that looks like a FLAIR")
    assert sorted(r["status"] for r in rows.values()) == ["error", "skipped", "skipped"]
    assert ("error: no series looks like a FLAIR in the DICOM study given, so nothing was segmented; if one is, choose it "
            "with --series; see summary.csv for their series") in capsys.readouterr().err


def nifti_header(path: Path) -> dict:
    """The geometry fields of a NIfTI-1 file's header: dim, pixdim, qform/sform codes, quaternion, offsets, srows."""
    import gzip

    with gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb") as f:
        data = f.read(352)
    return {"dim": struct_unpack("<8h", data, 40), "pixdim": struct_unpack("<8f", data, 76)[:5],
            "codes": struct_unpack("<2h", data, 252), "quaternion": struct_unpack("<6f", data, 256),
            "srow": struct_unpack("<12f", data, 280)}


def struct_unpack(fmt, data, offset):
    import struct

    return struct.unpack_from(fmt, data, offset)


def test_a_4d_input_with_one_time_point_gets_4d_outputs_on_its_exact_grid(tmp_path, tiny_model, monkeypatch):
    """A volume stored X, Y, Z, 1 (as some converters write one): its mask and probability map are X, Y, Z, 1
    too, with the input's header geometry, and the report gives the size; two time points stay refused."""
    oracle_network(monkeypatch)
    image, _ = make_volume(size=(40, 36, 8), direction=rotation(0.2, 0.1, -0.3), blobs=((0.5, 0.5, 0.5, 7.0),))
    four = sitk.JoinSeries(sitk.Cast(image, sitk.sitkInt16), 0.0, 2.0)
    inputs = tmp_path / "in"
    inputs.mkdir()
    names = {"gz": "gz.nii.gz", "raw": "raw.nii", "nrrd": "nrrd.nrrd", "mha": "mha.mha"}  # case: input file
    for name in names.values():
        sitk.WriteImage(four, str(inputs / name))
    sitk.WriteImage(sitk.Cast(image, sitk.sitkInt16), str(inputs / "three.nii.gz"))
    out = tmp_path / "out"
    assert main(["segment", str(inputs), "-o", str(out), "--model", str(tiny_model), "--device", "cpu",
                 "--save-probabilities"]) == 0
    three = sitk.GetArrayFromImage(io.read_mask(out / "three_wmh.nii.gz", reference=image))
    for case, name in names.items():
        source, extension = inputs / name, io.output_extension(inputs / name)
        report = json.loads((out / f"{case}_report.json").read_text(encoding="utf-8"))
        assert report["input_size"] == [40, 36, 8, 1], case
        for output in (f"{case}_wmh", f"{case}_prob"):
            written = out / f"{output}{extension}"
            reader = sitk.ImageFileReader()
            reader.SetFileName(str(written))
            reader.ReadImageInformation()
            if written.name.endswith((".nii", ".nii.gz")):  # SimpleITK reads X, Y, Z, 1 NIfTI as 3D: the header
                got, given = nifti_header(written), nifti_header(source)
                assert got["dim"][:5] == given["dim"][:5] == (4, 40, 36, 8, 1), output
                for field in ("pixdim", "codes", "quaternion", "srow"):
                    np.testing.assert_allclose(got[field], given[field], rtol=0, atol=1e-5, err_msg=f"{output} {field}")
            else:
                assert (reader.GetDimension(), reader.GetSize()) == (4, (40, 36, 8, 1)), output
                np.testing.assert_allclose(reader.GetSpacing(), four.GetSpacing(), rtol=1e-6)
                np.testing.assert_allclose(reader.GetOrigin(), four.GetOrigin(), atol=1e-6)
                np.testing.assert_allclose(reader.GetDirection(), four.GetDirection(), atol=1e-6)
        mask = io.read_mask(out / f"{case}_wmh{extension}", reference=image)
        assert np.array_equal(sitk.GetArrayViewFromImage(mask), three) and three.any(), case  # the 3D input's mask
        assert io.read_segmentation(out / f"{case}.seg.nrrd").GetDimension() == 3  # Slicer's segmentation: 3D
    # a rerun asking for the QC picture: added from the saved masks, X, Y, Z, 1 ones too (the scan's 3D grid)
    assert main(["segment", str(inputs), "-o", str(out), "--model", str(tiny_model), "--device", "cpu",
                 "--save-probabilities", "--qc"]) == 0
    assert {row["status"] for row in read_summary(out)} == {"added"} and (out / "nrrd_qc.png").is_file()
    # a 3D input keeps 3D outputs
    assert nifti_header(out / "three_wmh.nii.gz")["dim"][:4] == (3, 40, 36, 8)
    assert json.loads((out / "three_report.json").read_text(encoding="utf-8"))["input_size"] == [40, 36, 8]
    # asked for another format, still X, Y, Z, 1
    assert main(["segment", str(inputs / "nrrd.nrrd"), "-o", str(tmp_path / "as_nifti"), "--model", str(tiny_model),
                 "--device", "cpu", "--output-format", "nii.gz"]) == 0
    assert nifti_header(tmp_path / "as_nifti" / "nrrd_wmh.nii.gz")["dim"][:5] == (4, 40, 36, 8, 1)
    # two time points are no volume to segment: refused, saying so
    sitk.WriteImage(sitk.JoinSeries([sitk.Cast(image, sitk.sitkInt16)] * 2), str(tmp_path / "two.nii.gz"))
    assert main(["segment", str(tmp_path / "two.nii.gz"), "-o", str(tmp_path / "two"), "--model", str(tiny_model),
                 "--device", "cpu"]) == 1
    assert "is a 4D image" in (tmp_path / "two" / "summary.csv").read_text(encoding="utf-8-sig")


def test_a_run_of_several_cases_says_about_how_long_the_rest_will_take(monkeypatch):
    import io as stringio

    from DeepWMLLib import segment

    clock = iter([0.0, 10.0, 20.0, 30.0])  # the first case starts, then each finishes 10 s after the last
    monkeypatch.setattr(segment.time, "monotonic", lambda: next(clock))
    stream = stringio.StringIO()
    bar = segment.ProgressBar(stream, eta=True)
    for number, case in enumerate(("p1", "p2", "p3"), start=1):
        bar(number, 3, case)
        bar.finish({"case": case, "status": "ok", "volume_ml": 1.0, "lesion_count": 2, "seconds": 10.0})
    lines = [line for line in stream.getvalue().splitlines() if ": ok - " in line]
    assert lines == ["p1: ok - 1.00 ml, 2 lesions, 10.0 s (20 s left for 2 more)",
                     "p2: ok - 1.00 ml, 2 lesions, 10.0 s (10 s left for 1 more)",
                     "p3: ok - 1.00 ml, 2 lesions, 10.0 s"]
    assert segment._duration(3 * 3600 + 5 * 60) == "3 h 05 min" and segment._duration(600) == "10 min"


@pytest.mark.parametrize("columns", [40, 80, 120])
def test_the_bar_fits_the_terminal_and_never_wraps(monkeypatch, columns):
    """The bar's line (case, a 30-character bar and 40 of the message) was 97 characters: on an 80-column terminal
    it wrapped, and each update began a new line instead of overwriting the last. It now fits the terminal's
    width, the bar shortened first, then the message."""
    import os
    import re

    from DeepWMLLib import segment

    class Terminal:
        def __init__(self):
            self.text = ""

        def isatty(self):
            return True

        def write(self, text):
            self.text += text

        def flush(self):
            pass

    monkeypatch.setattr(segment.shutil, "get_terminal_size", lambda fallback=(80, 24): os.terminal_size((columns, 24)))
    stream = Terminal()
    bar = segment.ProgressBar(stream)
    for case in ("p1", "sub-0042_ses-01_FLAIR", "x" * 200):
        update = bar(1, 12, case)
        for fraction, message in ((0.0, "reading the scan"), (0.5, "model.pt: slice 120/255"),
                                  (0.84, "FLAIR check: background outside brain"), (1.0, "done")):
            update(fraction, message)
        bar.finish({"case": case, "status": "ok", "volume_ml": 1.0, "lesion_count": 2, "seconds": 10.0})
    drawn = [piece for piece in stream.text.split("\r") if "\n" not in piece]  # drawn in place (a case's result
    assert len(drawn) > 12  # line, which ends its own line, may wrap)
    assert max(len(piece) for piece in drawn) < columns, max(drawn, key=len)
    assert "|  50% model.pt" in stream.text  # the message still shown
    if columns >= 80:  # room for all of a step's words beside a short case name
        assert re.search(r"p1 \|#+\.+\|  84% FLAIR check: background outside brain", stream.text)


def test_the_progress_bar_writes_plain_lines_to_a_stream_without_isatty():
    """A stream of another program's making (Slicer's console, which the batch script may write to) can lack
    isatty, or be closed for it: the bar then writes plain lines, not an AttributeError before any case."""
    from DeepWMLLib import segment

    class Console:
        def __init__(self):
            self.text = ""

        def write(self, text):
            self.text += text

        def flush(self):
            pass

    stream = Console()
    bar = segment.ProgressBar(stream)
    bar(1, 2, "p1")(0.5, "networks done")
    bar.finish({"case": "p1", "status": "ok", "volume_ml": 1.0, "lesion_count": 2, "seconds": 3.0})
    assert stream.text == "[1/2] p1:  50% networks done\np1: ok - 1.00 ml, 2 lesions, 3.0 s\n"


def test_the_time_left_counts_only_cases_segmented_not_those_skipped_as_done_before(monkeypatch):
    """A rerun after adding scans: the cases done before are skipped in a moment. Their lines promised
    '0 s left for 3 more' and the first new case's line a third of its real time per case left."""
    import io as stringio

    from DeepWMLLib import segment

    clock = iter([0.0, 0.1, 0.2, 10.2, 10.3, 20.3])  # skipped in 0.1 s, skipped, 10 s, skipped, 10 s
    monkeypatch.setattr(segment.time, "monotonic", lambda: next(clock))
    stream = stringio.StringIO()
    bar = segment.ProgressBar(stream, eta=True)
    done = {"status": "ok", "volume_ml": 1.0, "lesion_count": 2, "seconds": 10.0}
    rows = [{"case": "p1", "status": "skipped", "error": "outputs exist"},
            {"case": "p2", "status": "skipped", "error": "outputs exist"},
            {"case": "p3", **done}, {"case": "p4", "status": "skipped", "error": "outputs exist"}, {"case": "p5", **done}]
    for number, row in enumerate(rows, start=1):
        bar(number, len(rows), row["case"])
        bar.finish(row)
    assert stream.getvalue().splitlines() == ["p1: skipped - outputs exist", "p2: skipped - outputs exist",
                                              "p3: ok - 1.00 ml, 2 lesions, 10.0 s (20 s left for 2 more)",
                                              "p4: skipped - outputs exist",
                                              "p5: ok - 1.00 ml, 2 lesions, 10.0 s"]


def test_the_time_left_does_not_count_building_the_networks_again_for_each_case(monkeypatch):
    """The first case segmented also builds the networks (compiled for this CPU, or exported), which later cases
    reuse: its line promised that time again for every case left (a 40 s first case of 10 s work promised 2 min
    for 3 more, 4 times the real time, and the estimate came right only after about five cases)."""
    import io as stringio
    import types

    from DeepWMLLib import inference, segment

    clock = [0.0]
    monkeypatch.setattr(segment.time, "monotonic", lambda: clock[0])

    def build(loaded, device, backend, precision="auto"):
        clock[0] += 30.0
        return object()

    monkeypatch.setattr(inference, "_new_runner", build)
    monkeypatch.setattr(inference, "_RUNNERS", {})
    network = types.SimpleNamespace(digest="the network's hash")
    stream = stringio.StringIO()
    bar = segment.ProgressBar(stream, eta=True)
    for number, case in enumerate(["p1", "p2", "p3", "p4"], start=1):
        bar(number, 4, case)
        inference.make_runner(network, "cpu")  # built for the first case, kept for the others
        clock[0] += 10.0
        bar.finish({"case": case, "status": "ok", "volume_ml": 1.0, "lesion_count": 2, "seconds": 10.0})
    assert [line.partition(" s")[2] for line in stream.getvalue().splitlines()] == [
        " (30 s left for 3 more)", " (20 s left for 2 more)", " (10 s left for 1 more)", ""]


def test_the_time_left_counts_no_case_that_failed(monkeypatch):
    """A folder holding a lesion mask beside its FLAIRs (real data: patient26's consensus mask first): the mask is
    refused in 0.06 s, and its line promised '0 s left for 3 more'. A failed case now says nothing of the others."""
    import io as stringio

    from DeepWMLLib import segment

    clock = iter([0.0, 0.1, 10.1, 10.2, 20.2])  # failed in 0.1 s, 10 s, failed, 10 s
    monkeypatch.setattr(segment.time, "monotonic", lambda: next(clock))
    stream = stringio.StringIO()
    bar = segment.ProgressBar(stream, eta=True)
    done = {"status": "ok", "volume_ml": 1.0, "lesion_count": 2, "seconds": 10.0}
    rows = [{"case": "mask", "status": "error", "error": "it looks like a label mask"}, {"case": "p1", **done},
            {"case": "mask2", "status": "error", "error": "it looks like a label mask"}, {"case": "p2", **done}]
    for number, row in enumerate(rows, start=1):
        bar(number, len(rows), row["case"])
        bar.finish(row)
    assert stream.getvalue().splitlines() == ["mask: error - it looks like a label mask",
                                              "p1: ok - 1.00 ml, 2 lesions, 10.0 s (20 s left for 2 more)",
                                              "mask2: error - it looks like a label mask (10 s left for 1 more)",
                                              "p2: ok - 1.00 ml, 2 lesions, 10.0 s"]


def test_the_last_line_counts_cases_skipped_apart_from_those_done_as_change_does(tmp_path, tiny_model, capsys):
    """A rerun that only skipped said '2/2 cases done' where `deepwml change --manifest` says '0/2 pairs done
    (0 failed, 2 skipped)': both now count what the run did, failed and skipped, in the same words."""
    first, _ = write_case(tmp_path, "p1", size=(32, 32, 4))
    second, _ = write_case(tmp_path, "p2", size=(32, 32, 4))
    out = tmp_path / "out"
    argv = ["segment", str(first), "-o", str(out), "--model", str(tiny_model), "--device", "cpu"]
    assert main(argv) == 0
    assert capsys.readouterr().err.rstrip().endswith(f"1/1 cases done (0 failed, 0 skipped), summary in {out / 'summary.csv'}")
    assert main(argv[:2] + [str(second)] + argv[2:]) == 0
    err = capsys.readouterr().err
    assert "p1: skipped - outputs exist" in err and "p2: ok" in err
    assert err.rstrip().endswith(f"1/2 cases done (0 failed, 1 skipped), summary in {out / 'summary.csv'}")


@pytest.mark.parametrize("argv,prefix", [
    (["segment", "scan.nii.gz", "-o", "out", "--threshold", "1.5"], "deepwml segment: error: argument --threshold"),
    (["synth", "-n", "1", "-o", "s", "--matrix", "32"], "deepwml synth: error: argument --matrix"),
    (["segment", "scan.nii.gz", "-o", "out", "--thread", "2"], "deepwml segment: error: unrecognized arguments"),
    (["frobnicate"], "deepwml: error: argument COMMAND")])
def test_an_option_out_of_range_is_named_with_its_command_and_the_help_to_read(argv, prefix, capsys):
    """argparse's own errors said 'deepwml: error: ... (see --help)', and `deepwml --help` lists the
    commands, not the option; they now name the command, as the errors main() prints do."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and err.startswith(prefix), err
    assert err.endswith(f"(see {prefix.split(': error')[0]} --help)") and len(err.splitlines()) == 1, err


def test_a_nested_folder_of_one_flair_series_is_not_called_a_choice(tmp_path, tiny_model):
    """A folder holding one FLAIR series a level down (STUDY/SER1) was read with the warning 'the only one of 1
    series that looks like a FLAIR; name another with --series', though there is nothing else to name."""
    _export_series(tmp_path / "STUDY" / "SER1", "9.1", "AX T2 FLAIR", 2500, slices=4)
    out = tmp_path / "out"
    assert main(["segment", str(tmp_path / "STUDY"), "-o", str(out), "--model", str(tiny_model), "--device", "cpu"]) == 0
    report = json.loads(next(out.glob("*_report.json")).read_text(encoding="utf-8"))
    assert report["dicom_series"] and not any("name another with --series" in w for w in report["warnings"])


def test_a_label_mask_found_in_a_folder_is_skipped_and_one_named_is_an_error(tmp_path, tiny_model, capsys):
    """A labelled case's folder (real data: FLAIR + consensus mask) given whole: the mask was refused as 'looks
    like a label mask' and counted failed, so a batch whose every scan segmented exited 1. A mask found in a
    folder is now skipped, saying so on screen and in summary.csv; a mask named by the user alone stays an error
    (named beside a scan: test_a_glob_that_names_a_mask_beside_its_flair_skips_the_mask_with_a_warning)."""
    case = tmp_path / "patient07"
    case.mkdir()
    write_case(case, "flair", size=(32, 32, 4), blobs=((0.5, 0.5, 0.5, 5.0),))
    _, truth = make_volume(size=(32, 32, 4), blobs=((0.5, 0.5, 0.5, 5.0),))
    sitk.WriteImage(truth, str(case / "consensus_mask.nii.gz"))
    out = tmp_path / "out"
    argv = ["-o", str(out), "--model", str(tiny_model), "--device", "cpu"]
    assert main(["segment", str(case), *argv]) == 0
    err = capsys.readouterr().err
    rows = {r["case"]: r for r in read_summary(out)}
    assert rows["flair"]["status"] == "ok"
    assert rows["consensus_mask"]["status"] == "skipped"
    assert "looks like a label mask" in rows["consensus_mask"]["error"]
    assert rows["consensus_mask"]["seconds"] == ""  # README: empty for a skipped case, as its line gives no time
    assert "consensus_mask: skipped - looks like a label mask, not a FLAIR scan (2 values: 0, 1)" in err
    assert err.rstrip().endswith(f"1/2 cases done (0 failed, 1 skipped), summary in {out / 'summary.csv'}")
    assert not list(out.glob("consensus_mask*"))

    assert main(["segment", str(case / "consensus_mask.nii.gz"), *argv]) == 1  # named: an error, as before
    err = capsys.readouterr().err
    assert "looks like a label mask" in err and "0/1 cases done (1 failed, 0 skipped)" in err
    assert main(["segment", str(case), str(case / "consensus_mask.nii.gz"), *argv]) == 0  # named beside a scan:
    assert {r["case"]: r["status"] for r in read_summary(out)} == {"consensus_mask": "skipped", "flair": "skipped"}


def test_a_glob_that_names_a_mask_beside_its_flair_skips_the_mask_with_a_warning(tmp_path, tiny_model, capsys):
    """`deepwml segment data/patient07/* -o out` (the shell names consensus_mask.nii.gz beside flair.nii.gz; real
    data: labelled patient07): a mask named was an error, so the run failed (exit 1) though its scan segmented. A
    mask named beside a scan is now skipped with a warning naming it (exit 0), as one found in a folder is; a
    Slicer segmentation named so too (it was refused up front: '2 inputs are both named case01'). When every
    input named is a mask, they stay errors."""
    case = tmp_path / "patient07"
    case.mkdir()
    flair, _ = write_case(case, "flair", size=(32, 32, 4), blobs=((0.5, 0.5, 0.5, 5.0),))
    _, truth = make_volume(size=(32, 32, 4), blobs=((0.5, 0.5, 0.5, 5.0),))
    mask = case / "consensus_mask.nii.gz"
    sitk.WriteImage(truth, str(mask))
    out = tmp_path / "out"
    argv = ["-o", str(out), "--model", str(tiny_model), "--device", "cpu"]
    assert main(["segment", str(mask), str(flair), *argv]) == 0  # as the glob expands: the mask first
    err = capsys.readouterr().err
    rows = {r["case"]: r for r in read_summary(out)}
    assert rows["flair"]["status"] == "ok" and rows["consensus_mask"]["status"] == "skipped"
    assert "looks like a label mask" in rows["consensus_mask"]["error"]
    assert f"deepwml segment: warning: skipped {mask}, given as INPUT: looks like a label mask, not a FLAIR scan " \
           "(2 values: 0, 1)" in err
    assert err.rstrip().endswith(f"1/2 cases done (0 failed, 1 skipped), summary in {out / 'summary.csv'}")
    assert not list(out.glob("consensus_mask*"))

    other = tmp_path / "patient19_mask.nii.gz"
    sitk.WriteImage(truth, str(other))
    assert main(["segment", str(mask), str(other), *argv]) == 1  # no scan among them: errors, as before
    err = capsys.readouterr().err
    assert "deepwml segment: error: all 2 image files given look like a label mask or segmentation, not a FLAIR " \
           "scan, so nothing was segmented; give the FLAIR scans" in err and "warning" not in err
    rows = read_summary(out)
    assert [r["status"] for r in rows] == ["error", "error"]
    assert all("looks like a label mask or segmentation, not a FLAIR scan; give the FLAIR image" in r["error"]
               for r in rows)

    labelled = tmp_path / "labelled"  # case01.nrrd and its Slicer segmentation case01.seg.nrrd, named by a glob
    labelled.mkdir()
    image, truth = make_volume(size=(32, 32, 4), blobs=((0.5, 0.5, 0.5, 5.0),))
    sitk.WriteImage(sitk.Cast(image, sitk.sitkUInt16), str(labelled / "case01.nrrd"))
    sitk.WriteImage(truth, str(labelled / "case01.seg.nrrd"))
    assert main(["segment", str(labelled / "case01.nrrd"), str(labelled / "case01.seg.nrrd"), *argv]) == 0
    err = capsys.readouterr().err
    assert f"warning: skipped {labelled / 'case01.seg.nrrd'}, given as INPUT: a Slicer segmentation" in err
    assert [(r["input"].endswith(".seg.nrrd"), r["status"]) for r in read_summary(out)] == [(False, "ok"),
                                                                                           (True, "skipped")]


def test_the_time_left_counts_no_label_mask_or_segmentation_still_to_come(tmp_path, tiny_model, capsys):
    """A cohort with a mask beside each FLAIR (real data: labelled/*, 6 cases, 3 scans): the time left after
    the first FLAIR was for '4 more', twice the real time, as the masks still to come were counted as scans. A
    name like a mask's found so far (patient19/consensus_mask after patient07's) and a Slicer segmentation skipped
    unread are now not counted."""
    inputs = []
    for seed, patient in enumerate(("patient07", "patient19")):
        (tmp_path / patient).mkdir()
        _, truth = make_volume(size=(32, 32, 4), blobs=((0.5, 0.5, 0.5, 5.0),), seed=seed)
        sitk.WriteImage(truth, str(tmp_path / patient / "consensus_mask.nii.gz"))
        write_case(tmp_path / patient, "flair", size=(32, 32, 4), seed=seed)
        inputs.append(str(tmp_path / patient))
    argv = ["-o", str(tmp_path / "out"), "--model", str(tiny_model), "--device", "cpu"]
    assert main(["segment", *inputs, *argv]) == 0
    err = capsys.readouterr().err
    assert re.search(r"patient07_flair: ok - .* left for 1 more\)\n", err), err

    labelled = tmp_path / "labelled"  # a folder: a.nrrd, a.seg.nrrd (skipped unread), b.nrrd
    labelled.mkdir()
    image, truth = make_volume(size=(32, 32, 4), blobs=((0.5, 0.5, 0.5, 5.0),))
    for name in ("a", "b"):
        sitk.WriteImage(sitk.Cast(image, sitk.sitkUInt16), str(labelled / f"{name}.nrrd"))
    sitk.WriteImage(truth, str(labelled / "a.seg.nrrd"))
    assert main(["segment", str(labelled), "-o", str(tmp_path / "out2"), *argv[2:]]) == 0
    err = capsys.readouterr().err
    assert re.search(r"\na: ok - .* left for 1 more\)\n", err), err


def test_a_long_run_formats_each_summary_row_and_looks_at_each_name_once(tmp_path, tiny_model, monkeypatch):
    """summary.csv is written again after every case, so that a run killed at any moment leaves the cases it did
    listed; it formatted every row again each time, and the count of cases left looked at every case still to
    come: a case cost more the longer the run (cases 2000: 36 + 20 ms a case; 5000: 84 + 47 ms). Each row is now
    formatted, and each name looked at, about once, and summary.csv still lists exactly the cases done so far."""
    from DeepWMLLib import segment

    scans = tmp_path / "in"
    scans.mkdir()
    count = 150
    for number in range(count - 1):  # Slicer segmentations: skipped unread, the fastest case a run can have
        (scans / f"case{number:03d}.seg.nrrd").write_bytes(b"")
    write_case(scans, "scan", size=(32, 32, 4))  # and a scan, segmented (a run of masks alone is an error)
    out = tmp_path / "out"
    cells, names = [0], [0]
    for module, name, calls in ((segment.io, "spreadsheet_cell", cells), (segment, "_name_pattern", names)):
        def counted(*args, function=getattr(module, name), calls=calls):
            calls[0] += 1
            return function(*args)

        monkeypatch.setattr(module, name, counted)
    listed = []

    class Progress:
        def __call__(self, number, total, case):
            summary = out / "summary.csv"  # none before the first case (no earlier run's to replace)
            listed.append(summary.read_text(encoding="utf-8-sig").splitlines()[1:] if number > 1 else [])

        def finish(self, row):
            pass

    rows = segment.segment_cases([str(scans)], out, [str(tiny_model)], "cpu", Progress())
    assert len(rows) == count and [len(done) for done in listed] == list(range(count))
    assert all(done == listed[-1][:len(done)] for done in listed)  # each row as it was first written ...
    final = (out / "summary.csv").read_text(encoding="utf-8-sig").splitlines()[1:]  # ... and at the end
    assert final[:-1] == listed[-1] and final[-1].startswith(f"scan,{scans / 'scan.nii.gz'},")
    assert cells[0] <= 3 * count * len(segment.SUMMARY_COLUMNS), cells  # was 115 000 (count² / 2 rows)
    assert names[0] <= 4 * count, names  # was 11 000


def test_the_time_left_counts_scans_named_as_masks_found_before_them(tmp_path, tiny_model, capsys):
    """A cohort's masks/ and scans/ of one naming (masks/p01.nii.gz, scans/p01.nii.gz; `deepwml segment cohort/*`
    lists masks/ first): every scan was taken for a mask still to come, as its name but for the digits is a mask's
    found before it, so no time left was said for the whole run. A name a scan has too now tells nothing."""
    for folder in ("masks", "scans"):
        (tmp_path / "cohort" / folder).mkdir(parents=True)
    for number in (1, 2, 3):
        _, truth = make_volume(size=(32, 32, 4), seed=number)
        sitk.WriteImage(truth, str(tmp_path / "cohort" / "masks" / f"p0{number}.nii.gz"))
        write_case(tmp_path / "cohort" / "scans", f"p0{number}", size=(32, 32, 4), seed=number)
    argv = ["-o", str(tmp_path / "out"), "--model", str(tiny_model), "--device", "cpu"]
    assert main(["segment", str(tmp_path / "cohort" / "masks"), str(tmp_path / "cohort" / "scans"), *argv]) == 0
    err = capsys.readouterr().err
    assert "masks_p03: skipped - looks like a label mask" in err
    assert re.search(r"scans_p01: ok - .* left for 2 more\)\n", err), err
    assert re.search(r"scans_p02: ok - .* left for 1 more\)\n", err), err


def test_inputs_of_one_name_are_named_after_the_folders_that_tell_them_apart(tmp_path, tiny_model, capsys):
    """A cohort of one folder per patient, the same file names inside (patient07/flair.nii.gz beside its
    consensus_mask.nii.gz): the run was refused up front, '3 inputs are all named flair', nothing segmented.
    Names that clash now take the folders above them that differ (`patient07_flair`; a folder they all share,
    BIDS' `anat`, is left out; names alike but for upper/lower case too); a name of its own is kept; a rerun
    gives the same names and skips the cases done."""
    scans = []
    for seed, patient in enumerate(("patient07", "patient19", "patient26")):
        (tmp_path / patient).mkdir()
        scans.append(write_case(tmp_path / patient, "flair", size=(32, 32, 4), seed=seed)[0])
        _, truth = make_volume(size=(32, 32, 4), blobs=((0.5, 0.5, 0.5, 5.0),), seed=seed)
        sitk.WriteImage(truth, str(tmp_path / patient / "consensus_mask.nii.gz"))
    bids = []
    for seed, subject in enumerate(("sub-01", "sub-02")):
        (tmp_path / "bids" / subject / "anat").mkdir(parents=True)
        bids.append(write_case(tmp_path / "bids" / subject / "anat", "T2_FLAIR", size=(32, 32, 4), seed=seed)[0])
    (tmp_path / "x").mkdir()
    upper = write_case(tmp_path, "P1", size=(32, 32, 4))[0]
    lower = write_case(tmp_path / "x", "p1", size=(32, 32, 4))[0]
    single = write_case(tmp_path / "x", "alone", size=(32, 32, 4))[0]
    out = tmp_path / "out"
    argv = ["-o", str(out), "--model", str(tiny_model), "--device", "cpu"]
    inputs = [str(tmp_path / "patient07"), str(tmp_path / "patient19"), str(scans[2]), *map(str, bids), str(upper),
              str(lower), str(single)]
    assert main(["segment", *inputs, *argv]) == 0, capsys.readouterr().err
    rows = {r["case"]: (r["status"], Path(r["input"])) for r in read_summary(out)}
    assert rows == {
        "patient07_flair": ("ok", scans[0]), "patient07_consensus_mask": ("skipped", tmp_path / "patient07" /
                                                                           "consensus_mask.nii.gz"),
        "patient19_flair": ("ok", scans[1]), "patient19_consensus_mask": ("skipped", tmp_path / "patient19" /
                                                                           "consensus_mask.nii.gz"),
        "patient26_flair": ("ok", scans[2]), "sub-01_T2_FLAIR": ("ok", bids[0]), "sub-02_T2_FLAIR": ("ok", bids[1]),
        "P1": ("ok", upper), "x_p1": ("ok", lower), "alone": ("ok", single)}  # P1 lies above where they part
    assert (out / "patient07_flair_wmh.nii.gz").is_file() and (out / "alone_wmh.nii.gz").is_file()
    assert json.loads((out / "patient19_flair_report.json").read_text())["input"] == str(scans[1])
    capsys.readouterr()

    assert main(["segment", *inputs, *argv]) == 0  # the rerun: the same names, every case skipped
    assert {r["status"] for r in read_summary(out)} == {"skipped"}
    assert "patient07_flair: skipped" in capsys.readouterr().err


def test_studies_of_one_name_in_two_exports_are_named_after_the_exports_folders(tmp_path, tiny_model, capsys):
    """Two patients' PACS exports, each PAT1/STU1/SER1 inside (an anonymiser's names): the run was refused, '2 inputs
    are both named PAT1_STU1_SER1'. They are told apart by the folders above the exports, where their paths part."""
    flair, _ = make_volume(size=(32, 32, 4), spacing=(0.9, 0.9, 5.0), dtype=sitk.sitkInt16)
    for number, patient in enumerate(("p07", "p19"), start=1):
        write_dicom_series(tmp_path / patient / "export" / "PAT1" / "STU1" / "SER1", flair, uid=f"1.{number}.2",
                           description="AX FLAIR", extra={"0020|000d": f"1.{number}"})
    out = tmp_path / "out"
    assert main(["segment", str(tmp_path / "p07" / "export"), str(tmp_path / "p19" / "export"), "-o", str(out),
                 "--model", str(tiny_model), "--device", "cpu"]) == 0, capsys.readouterr().err
    rows = {r["case"]: r for r in read_summary(out)}
    assert sorted(rows) == ["p07_PAT1_STU1_SER1", "p19_PAT1_STU1_SER1"]
    assert {r["status"] for r in rows.values()} == {"ok"} and "p19" in rows["p19_PAT1_STU1_SER1"]["input"]


def test_names_told_apart_keep_the_patient_when_folders_differ_in_depth():
    """Folders were compared from the file upwards: data/p07/flair and data/p19/visit2/flair became `p07_flair` and
    `visit2_flair` (the patient lost), and p19's other visit beside p07's `visit1` was `visit2_flair` too. They are
    compared from the root, from where the paths part down to the file, leaving out a folder all of them share."""
    from DeepWMLLib.segment import _named_by_folders

    def names(*paths):
        return _named_by_folders([("flair", Path("/data") / path / "flair.nii.gz", None) for path in paths])

    assert names("p07", "p19/visit2") == ["p07_flair", "p19_visit2_flair"]
    assert names("p19/visit1", "p19/visit2", "p07/visit1") == ["p19_visit1_flair", "p19_visit2_flair",
                                                              "p07_visit1_flair"]
    assert names("s1/anat", "s2/anat", "s2/other") == ["s1_anat_flair", "s2_anat_flair", "s2_other_flair"]
    assert names("sub-01/anat", "sub-02/anat") == ["sub-01_flair", "sub-02_flair"]  # BIDS' anat says nothing
    assert names("P1", "p1") == ["flair", "flair"]  # nothing tells them apart: refused by check_case_names


def test_names_told_apart_by_long_folder_names_fit_their_output_files(tmp_path, tiny_model, capsys):
    """Folders of long names (an export's study descriptions): the folder's name before the scan's would make the
    outputs' file names longer than the 255 bytes a file system allows; the nearest part of it is kept."""
    scans = []
    for letter in "ab":
        (tmp_path / (letter * 240)).mkdir()
        scans.append(write_case(tmp_path / (letter * 240), "flair", size=(32, 32, 4))[0])
    out = tmp_path / "out"
    assert main(["segment", *map(str, scans), "-o", str(out), "--model", str(tiny_model), "--device", "cpu",
                 "--save-probabilities", "--save-brain-mask"]) == 0, capsys.readouterr().err
    cases = [r["case"] for r in read_summary(out)]
    assert [case[0] + case[-6:] for case in cases] == ["a_flair", "b_flair"]
    assert all(len(os.fsencode(p.name)) <= 255 for p in out.iterdir()) and len(list(out.glob("*_brain.nii.gz"))) == 2


def test_a_long_folder_name_cut_to_fit_never_makes_a_hidden_or_dash_name(tmp_path):
    """A long folder name cut to its nearest part (to fit the 255 bytes of a file name) began with what was left
    at the cut: a '.' there named every output of the case as a hidden file ('.b..._flair_wmh.nii.gz', unseen in
    a file browser or by ls; a rerun's folder of scans leaves hidden files out), a '-' or ' ' one that reads as an
    option on a command line. The cut name starts with a letter or digit."""
    from DeepWMLLib.segment import case_names_apart

    room = len("x" * (255 - len("_ventricles.nii.gz") - len("flair") - 1))
    cases = []
    for end, (start, lead) in enumerate((s, lead) for s in "azm" for lead in (". ", "-", "_.")):
        folder = start * 20 + lead + "c" * (room - len(lead) - 1) + str(end)  # cut at `lead`
        cases.append(("flair", tmp_path / folder / "flair.nii.gz", None))
    names = [case for case, _, _ in case_names_apart(cases)]
    assert len({name.casefold() for name in names}) == len(names)
    assert all(name[0].isalnum() and len(os.fsencode(name)) <= 255 - len("_ventricles.nii.gz") for name in names), \
        [name[:4] for name in names]


def test_inputs_of_one_name_no_folder_tells_apart_are_all_refused_before_anything_is_segmented(tmp_path, tiny_model,
                                                                                                  capsys):
    """Names that clash and that no folder tells apart (case01.nii.gz and case01.mha side by side; P1 and p1
    in one folder; a folder's name that makes another input's) are refused, every one at once, before anything
    runs or is written, with what to do. A rerun of distinct names still skips."""
    folder = tmp_path / "scans"
    folder.mkdir()
    first = write_case(folder, "case01", size=(32, 32, 4))[0]
    second = folder / "case01.mha"
    sitk.WriteImage(sitk.ReadImage(str(first)), str(second))
    upper = write_case(folder, "P1", size=(32, 32, 4))[0]
    lower = folder / "p1.mha"
    sitk.WriteImage(sitk.ReadImage(str(upper)), str(lower))
    (tmp_path / "p07").mkdir()
    nested = write_case(tmp_path / "p07", "flair", size=(32, 32, 4))[0]
    (tmp_path / "p19").mkdir()
    other = write_case(tmp_path / "p19", "flair", size=(32, 32, 4))[0]
    taken = write_case(tmp_path, "p07_flair", size=(32, 32, 4))[0]
    out = tmp_path / "out"
    argv = ["-o", str(out), "--model", str(tiny_model), "--device", "cpu"]
    assert main(["segment", *map(str, (first, second, upper, lower, nested, other, taken)), *argv]) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "error" in lines[0], err  # one error, nothing segmented
    assert f"2 inputs are both named 'case01' ({first}, {second})" in err
    assert "'P1' and 'p1'" in err and "alike but for upper/lower case" in err
    assert f"2 inputs are both named 'p07_flair' ({nested}, {taken})" in err
    assert "rename" in err and "separate output folders" in err
    assert not out.exists()

    assert main(["segment", str(first), str(upper), *argv]) == 0
    assert main(["segment", str(first), str(upper), *argv]) == 0  # the rerun skips both, as before
    assert [r["status"] for r in read_summary(out)] == ["skipped", "skipped"]
    capsys.readouterr()
    assert main(["segment", str(second), *argv]) == 1  # another scan's results of that name: refused, as before
    assert "holds the results of another scan" in capsys.readouterr().err


def test_a_folder_holding_only_label_masks_is_an_error_not_done(tmp_path, tiny_model, capsys):
    """The folder of a data set's masks given for the folder of its scans: every mask was skipped as 'looks like
    a label mask' and the run ended '0/2 cases done (0 failed, 2 skipped)', exit 0, nothing segmented. With no
    FLAIR among the inputs, the masks are errors (exit 1) and one line says to give the scans' folder."""
    labels = tmp_path / "labelsTr"
    labels.mkdir()
    for seed in range(2):
        _, truth = make_volume(size=(32, 32, 4), blobs=((0.5, 0.5, 0.5, 5.0),), seed=seed)
        sitk.WriteImage(truth, str(labels / f"p{seed}.nii.gz"))
    out = tmp_path / "out"
    argv = ["-o", str(out), "--model", str(tiny_model), "--device", "cpu"]
    assert main(["segment", str(labels), *argv]) == 1
    err = capsys.readouterr().err
    assert "all 2 image files found look like a label mask or segmentation" in err and "give the folder of the FLAIR scans" in err
    assert err.rstrip().endswith(f"0/2 cases done (2 failed, 0 skipped), summary in {out / 'summary.csv'}")
    rows = read_summary(out)
    assert [r["status"] for r in rows] == ["error", "error"]
    assert all("looks like a label mask" in r["error"] and "no FLAIR scan" in r["error"] for r in rows)
    assert all(r["seconds"] != "" for r in rows)  # failed cases: the time until they failed (README)

    write_case(labels, "flair", size=(32, 32, 4))  # with one scan beside them: the masks are skipped, as before
    assert main(["segment", str(labels), *argv]) == 0
    assert sorted(r["status"] for r in read_summary(out)) == ["ok", "skipped", "skipped"]


def test_a_slicer_segmentation_beside_its_scan_of_the_same_name_is_skipped(tmp_path, tiny_model, capsys):
    """case01.nrrd with its manual segmentation case01.seg.nrrd in the folder given: the two were '2 inputs are
    both named case01' and the whole run was refused, nothing segmented. A .seg.nrrd found in a folder is a
    segmentation, never a scan: skipped unread, so its name clashes with nothing; named as INPUT, still an error."""
    folder = tmp_path / "labelled"
    folder.mkdir()
    image, truth = make_volume(size=(32, 32, 4), blobs=((0.5, 0.5, 0.5, 5.0),))
    sitk.WriteImage(sitk.Cast(image, sitk.sitkUInt16), str(folder / "case01.nrrd"))
    sitk.WriteImage(truth, str(folder / "case01.seg.nrrd"))
    out = tmp_path / "out"
    argv = ["-o", str(out), "--model", str(tiny_model), "--device", "cpu"]
    assert main(["segment", str(folder), *argv]) == 0
    err = capsys.readouterr().err
    assert "case01: skipped - a Slicer segmentation (.seg.nrrd), not a FLAIR scan" in err
    rows = read_summary(out)
    assert [(r["input"].endswith(".seg.nrrd"), r["status"]) for r in rows] == [(False, "ok"), (True, "skipped")]
    assert (out / "case01_report.json").is_file()
    assert main(["segment", str(folder / "case01.seg.nrrd"), *argv]) == 1  # named: an error, as before
    manual = (folder / "case01.seg.nrrd").read_bytes()  # OUTDIR the folder itself: the scan's output would take
    assert main(["segment", str(folder), "-o", str(folder), *argv[2:]]) == 1  # the segmentation's name: refused
    assert "would be written over" in capsys.readouterr().err and (folder / "case01.seg.nrrd").read_bytes() == manual


def _lesions_labelled_one_by_one(like: sitk.Image, count: int = 24) -> sitk.Image:
    """A lesion mask labelled one value per lesion (1 to `count`), as connected-component tools write it."""
    array = np.zeros(sitk.GetArrayViewFromImage(like).shape, np.uint16)
    for label in range(1, count + 1):
        z, y = label % array.shape[0], 4 + (label * 5) % (array.shape[1] - 8)
        x = 4 + (label * 3) % (array.shape[2] - 8)
        array[z, y:y + 3, x:x + 3] = label
    labels = sitk.GetImageFromArray(array)
    labels.CopyInformation(like)
    return labels


def test_a_lesion_mask_labelled_per_lesion_is_a_label_mask_too(tmp_path, tiny_model, capsys):
    """A mask with one label per lesion (more than 16: 49 on real patient07) beside its FLAIR in the folder given
    was segmented as a scan (status ok, outputs for it), and named as INPUT too; a mask of a few values was
    skipped. It is now a label mask as well: skipped in a folder, an error when named."""
    case = tmp_path / "patient07"
    case.mkdir()
    flair, _ = write_case(case, "flair", size=(40, 40, 6), blobs=((0.5, 0.5, 0.5, 5.0),))
    sitk.WriteImage(_lesions_labelled_one_by_one(sitk.ReadImage(str(flair))), str(case / "lesion_labels.nii.gz"))
    out = tmp_path / "out"
    argv = ["-o", str(out), "--model", str(tiny_model), "--device", "cpu"]
    assert main(["segment", str(case), *argv]) == 0
    rows = {r["case"]: r for r in read_summary(out)}
    assert rows["flair"]["status"] == "ok" and rows["lesion_labels"]["status"] == "skipped"
    assert "looks like a label mask" in rows["lesion_labels"]["error"]
    assert not list(out.glob("lesion_labels*"))
    capsys.readouterr()
    assert main(["segment", str(case / "lesion_labels.nii.gz"), *argv]) == 1
    assert "looks like a label mask of many labels (one label per lesion, or a parcellation)" in capsys.readouterr().err


@pytest.mark.parametrize("fraction, cleared", [("0.1", 0), ("0.3", 1)])
def test_the_report_says_how_many_edge_slices_were_cleared(tmp_path, tiny_model, fraction, cleared):
    """--exclude-edge-slices clears floor(fraction x slices) at each end: 0.1 of a 6-slice scan clears none, which
    the report did not say (it recorded the fraction only). It now gives the count, and warns when it is none."""
    image, _ = make_volume(size=(32, 32, 6), spacing=(0.9, 0.9, 5.0))
    sitk.WriteImage(image, str(tmp_path / "few.nii.gz"))
    assert main(["segment", str(tmp_path / "few.nii.gz"), "-o", str(tmp_path / "out"), "--model", str(tiny_model),
                 "--device", "cpu", "--exclude-edge-slices", fraction]) == 0
    report = json.loads((tmp_path / "out" / "few_report.json").read_text(encoding="utf-8"))
    assert report["edge_slices_cleared"] == cleared
    edge = [w for w in report["warnings"] if "--exclude-edge-slices" in w]
    assert edge == ([] if cleared else ["--exclude-edge-slices 0.1 cleared no slice: it clears floor(0.1 x 6) = 0 of "
                                        "the 6 axial slices at each end (at least 10 slices are needed to clear one)"])


@pytest.mark.parametrize("kind", ["forms disagree", "metres"])
def test_nifti_outputs_carry_the_input_header_geometry_so_every_reader_places_them_on_the_flair(
        tmp_path, tiny_model, monkeypatch, kind):
    """A qform (code 2, 10 degrees apart) beside an sform (code 1), as after FSL/SPM alignment, or lengths in
    metres: SimpleITK (3D Slicer) reads one grid, FSL and nibabel another. The mask and probability map carry
    the input's own qform, sform, codes, voxel sizes and length unit, so each reader places them where it
    places the FLAIR."""
    import nibabel as nib

    oracle_network(monkeypatch)
    image, _ = make_volume(size=(40, 36, 8), spacing=(0.9, 0.9, 5.0), blobs=((0.5, 0.5, 0.5, 7.0),))
    data = np.transpose(sitk.GetArrayFromImage(image)).astype(np.int16)  # (i, j, k) as nibabel holds it
    sform = np.diag([0.9, 0.9, 5.0, 1.0])
    sform[:3, 3] = (-20.0, 15.0, -30.0)
    turn = np.eye(4)
    turn[:3, :3] = rotation(0.0, 0.0, math.radians(10))
    turn[:3, 3] = (10.0, 0.0, 0.0)
    nifti = nib.Nifti1Image(data, None)
    if kind == "metres":
        sform[:3] /= 1000.0
        nifti.set_sform(sform, code=1)
        nifti.set_qform(sform, code=1)
        nifti.header.set_xyzt_units("meter", "sec")
    else:
        nifti.set_sform(sform, code=1)
        nifti.set_qform(turn @ sform, code=2)
    source = tmp_path / "in" / "case.nii.gz"
    source.parent.mkdir()
    nib.save(nifti, str(source))
    out = tmp_path / "out"
    assert main(["segment", str(source), "-o", str(out), "--model", str(tiny_model), "--device", "cpu",
                 "--save-probabilities"]) == 0
    given = nib.load(str(source))
    flair = sitk.ReadImage(str(source))
    for name in ("case_wmh.nii.gz", "case_prob.nii.gz"):
        written = nib.load(str(out / name))
        np.testing.assert_allclose(written.affine, given.affine, atol=1e-6, err_msg=name)
        for form in ("get_qform", "get_sform"):
            (got, got_code), (want, want_code) = (getattr(img, form)(coded=True) for img in (written, given))
            assert got_code == want_code, (name, form)
            np.testing.assert_allclose(got, want, atol=1e-6, err_msg=f"{name} {form}")
        assert written.header.get_xyzt_units()[0] == given.header.get_xyzt_units()[0], name
        mask = sitk.ReadImage(str(out / name))
        np.testing.assert_allclose(mask.GetSpacing(), flair.GetSpacing(), rtol=1e-6, err_msg=name)
        np.testing.assert_allclose(mask.GetOrigin(), flair.GetOrigin(), atol=1e-5, err_msg=name)
        np.testing.assert_allclose(mask.GetDirection(), flair.GetDirection(), atol=1e-6, err_msg=name)
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(out / "case_wmh.nii.gz"))).sum() > 0


def test_case_names_a_spreadsheet_would_take_for_formulas_are_text_in_summary_csv_and_a_rerun_skips_them(
        tmp_path, tiny_model, capsys):
    """A series named "-AX FLAIR" showed #NAME? in Excel and LibreOffice, which take a cell beginning with - (or =,
    +, @) for a formula, and a name made to be one ("=1+1") ran as one (CSV injection). Such a cell now begins with
    an apostrophe, which the spreadsheet does not show; numbers stay numbers, and a rerun skips the cases done."""
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("-AX FLAIR", "=1+1"):
        write_case(folder, name, size=(32, 32, 4))
    out = tmp_path / "out"
    argv = ["segment", str(folder), "-o", str(out), "--model", str(tiny_model), "--device", "cpu"]
    assert main(argv) == 0
    rows = read_summary(out)
    assert sorted(row["case"] for row in rows) == ["'-AX FLAIR", "'=1+1"]
    assert all(float(row["volume_ml"]) >= 0 and float(row["seconds"]) > 0 for row in rows)
    assert sorted(io.plain_cell(row["case"]) for row in rows) == ["-AX FLAIR", "=1+1"]
    capsys.readouterr()
    assert main(argv) == 0
    assert "0/2 cases done (0 failed, 2 skipped)" in capsys.readouterr().err
    assert [row["status"] for row in read_summary(out)] == ["skipped", "skipped"]


@pytest.mark.parametrize("removable", [True, False], ids=["removed", "read-only"])
def test_an_earlier_runs_summary_is_not_left_as_this_runs_when_this_one_cannot_be_written(tmp_path, tiny_model,
                                                                                         monkeypatch, capsys, removable):
    """A run into a folder whose disk is full: its summary.csv cannot be written, and the earlier run's stayed, listing
    another case as if this run had done it, beside the error. It is removed (which takes no space) and the error says
    none is left; where it cannot be removed either (a read-only disk), the error says it is not this run's."""
    first, _ = write_case(tmp_path, "first", size=(32, 32, 4))
    second, _ = write_case(tmp_path, "second", size=(32, 32, 4))
    out = tmp_path / "o"
    assert main(["segment", str(first), "-o", str(out), "--model", str(tiny_model), "--device", "cpu"]) == 0
    assert "first" in (out / "summary.csv").read_text(encoding="utf-8-sig")
    capsys.readouterr()
    written = io.write_csv_text

    def disk_full(text, path, unless_held=False):
        if Path(path).name == "summary.csv":
            raise io.DeepWMLError(f"cannot write {path} (No space left on device); the disk is full: free space on "
                                  "it, or choose an output folder on another disk")
        return written(text, path, unless_held)

    monkeypatch.setattr(io, "write_csv_text", disk_full)
    if not removable:
        unlink = Path.unlink

        def read_only(self, missing_ok=False):
            if self.name == "summary.csv":
                raise OSError(30, "Read-only file system")
            return unlink(self, missing_ok)

        monkeypatch.setattr(Path, "unlink", read_only)
    assert main(["segment", str(second), "-o", str(out), "--model", str(tiny_model), "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "cannot write" in err and "summary.csv (No space left on device); the disk is full" in err
    if removable:
        assert not (out / "summary.csv").exists()
        assert f"no summary.csv is left in {out} (neither an earlier run's nor this one's cut short)" in err
    else:
        assert f"the {out / 'summary.csv'} there is not this run's and could not be removed (Read-only file system): " \
               "do not use it" in err


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts open files in /proc")
def test_a_long_batch_builds_each_network_once_and_holds_no_more_files_or_threads_case_after_case(tmp_path, tiny_model,
                                                                                                    monkeypatch):
    """A radiologist's folder of 100-200 scans in one run: measured over 120 cases (session 40), resident memory,
    open files and threads stayed flat and the time per case did not drift. This keeps it so where it would show
    first: a network runner (an OpenVINO or ONNX Runtime compilation) built again per case, or a file or thread
    left open per case, would grow with every case; the first cases build them, later ones only reuse them."""
    from DeepWMLLib import inference
    from DeepWMLLib.segment import segment_cases

    built = []
    new_runner = inference._new_runner
    monkeypatch.setattr(inference, "_new_runner", lambda *a, **k: built.append(a[0].name) or new_runner(*a, **k))
    monkeypatch.setattr(inference, "_RUNNERS", {})  # none kept from an earlier test in this process (same weights)
    paths = [write_case(tmp_path, f"p{k:02d}", size=(32, 32, 4), seed=k)[0] for k in range(12)]
    seen = []

    def factory(number, total, case):
        return lambda fraction, message: None

    def finish(row):  # the files and threads (the runtimes' own too) the process holds once each case is done
        seen.append((len(os.listdir("/proc/self/fd")), len(os.listdir("/proc/self/task"))))

    factory.finish = finish
    brain = tiny_model_file(tmp_path / "brain.pt", labels={"0": "background", "1": "intracranial"})
    rows = segment_cases([str(p) for p in paths], tmp_path / "out", [str(tiny_model)], "cpu", progress_factory=factory,
                         brain_model=str(brain), ventricle_model=None)
    assert [row["status"] for row in rows] == ["ok"] * 12
    assert sorted(built) == ["brain.pt", "tiny.pt"]  # once each, for the whole batch
    assert seen[-1] == seen[2], seen


def test_a_model_folder_without_a_brain_model_says_the_marks_are_not_gated_nor_checked(tmp_path, tiny_model,
                                                                                       monkeypatch, capsys):
    """DEEPWML_MODELS_DIR naming a folder of one's own WMH models (README: 'points either at other models') whose
    registry lists no brain-mask model ran no brain mask at all, without a word: marks in the scalp kept, no FLAIR
    check, no coverage check, and a report that only said so by its nulls. A warning now says so."""
    import shutil

    oracle_network(monkeypatch)
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(tiny_model, models / "mine.pt")
    (models / "models.json").write_text(json.dumps({"format_version": 1, "models": [
        {"name": "mine", "file": "mine.pt", "version": "1", "default": True}]}), encoding="utf-8")
    monkeypatch.setenv("DEEPWML_MODELS_DIR", str(models))
    path, _ = write_case(tmp_path, "case", size=(40, 36, 6))
    assert main(["segment", str(path), "-o", str(tmp_path / "out"), "--device", "cpu", "--backend", "torch"]) == 0
    report = json.loads((tmp_path / "out" / "case_report.json").read_text(encoding="utf-8"))
    assert report["brain_model"] is None
    shown = capsys.readouterr().err
    assert f"deepwml segment: warning: no brain-mask model is listed in {models / 'models.json'}" in shown, shown
    assert "marks outside the brain are kept" in shown and "--brain-model FILE" in shown, shown


def test_summary_csv_gives_the_volume_and_lesion_count_of_the_saved_mask(tmp_path, tiny_model, monkeypatch):
    """summary.csv is what a cohort is read from: its volume_ml and lesion_count must be the saved mask's, to the
    report's precision (not rounded further), whatever the report code does. Two blobs on 0.8 x 0.7 x 5 mm voxels
    (2.8 mm3 each): the volume is the mask's voxel count x 2.8 / 1000 ml, the count its 26-connected components."""
    oracle_network(monkeypatch)
    path, _ = write_case(tmp_path, "two", size=(60, 50, 9), spacing=(0.8, 0.7, 5.0),
                         blobs=((0.3, 0.5, 0.5, 6.0), (0.8, 0.5, 0.5, 5.0)))
    out = tmp_path / "out"
    assert main(["segment", str(path), "-o", str(out), "--model", str(tiny_model), "--device", "cpu"]) == 0
    mask = sitk.ReadImage(str(out / "two_wmh.nii.gz"))
    count = int(np.count_nonzero(sitk.GetArrayViewFromImage(mask)))
    components = sitk.ConnectedComponent(mask > 0, True)
    lesions = int(sitk.GetArrayViewFromImage(components).max())
    assert lesions == 2 and count > 0
    (row,) = read_summary(out)
    volume_ml = count * 2.8 / 1000
    assert abs(volume_ml - round(volume_ml, 2)) > 1e-5  # more than two decimals: a rounded figure would differ
    assert float(row["volume_ml"]) == pytest.approx(volume_ml, abs=1e-6)
    assert int(row["lesion_count"]) == lesions
