"""DeepWML/Scripts/segment_batch.py: the Slicer batch entry, run under plain Python with slicer-core
(as a process, the way Slicer runs it, and in-process for the finer cases)."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).parent / "slicer" / "support"))

from conftest import (REPO, another_run_holds, make_volume, oracle_network, rotation, tiny_model_file,  # noqa: E402
                      users_images_in)
from DeepWMLLib import io  # noqa: E402
from DeepWMLLib.errors import DeepWMLError  # noqa: E402
from DeepWMLLib.evaluation import evaluate_case  # noqa: E402
from slicer_fixtures import onnxCache, scene  # noqa: E402,F401 (fixtures)

SCRIPT = REPO / "DeepWML" / "Scripts" / "segment_batch.py"


def summary(folder: Path) -> dict:
    return {row["case"]: row for row in csv.DictReader(open(folder / "summary.csv", encoding="utf-8-sig"))}


def writeCase(folder: Path, name: str, **geometry):
    flair, truth = make_volume(**geometry)
    sitk.WriteImage(flair, str(folder / name))
    return flair, truth


@pytest.fixture
def batchScript():
    spec = importlib.util.spec_from_file_location("segment_batch", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_batch_process_segments_every_case_evaluates_and_exits_1_when_one_failed(tmp_path, tiny_model):
    inputs, references, out = tmp_path / "in", tmp_path / "ref", tmp_path / "out"
    inputs.mkdir()
    references.mkdir()
    flair, truth = writeCase(inputs, "p01.nrrd", direction=rotation(0.2, -0.1, 0.3), spacing=(0.9, 0.9, 5.0))
    sitk.WriteImage(truth, str(references / "p01_manual.nii.gz"))
    (inputs / "p02.nii.gz").write_bytes(b"not an image")
    environment = dict(os.environ, DEEPWML_CACHE_DIR=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(SCRIPT), "--input-dir", str(inputs), "--output-dir", str(out),
                           "--reference-dir", str(references), "--model", str(tiny_model), "--device", "cpu"],
                          capture_output=True, text=True, encoding="utf-8", errors="replace", env=environment, timeout=300)
    assert done.returncode == 1, done.stderr[-2000:]
    rows = summary(out)
    assert rows["p01"]["status"] == "ok" and rows["p02"]["status"] == "error"
    assert "acquisition" not in rows["p01"]["warnings"]  # the column exists (an axial 5 mm scan: no plane warning)
    assert "p02.nii.gz" in rows["p02"]["error"]
    assert "p01: ok" in done.stdout and "1/2 cases done" in done.stdout

    mask = io.read_mask(out / "p01_wmh.nrrd", reference=flair)  # on the input's grid, in its format
    assert np.allclose(mask.GetOrigin(), flair.GetOrigin(), rtol=0, atol=1e-9)
    fromSlicer = io.read_segmentation(out / "p01.seg.nrrd", "WMH")
    onGrid = sitk.Resample(fromSlicer, flair, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(onGrid), sitk.GetArrayFromImage(mask))
    report = json.loads((out / "p01_report.json").read_text(encoding="utf-8"))
    expected = evaluate_case(mask, truth)
    assert report["comparison"]["dice"] == pytest.approx(expected["dice"])
    assert float(rows["p01"]["dice"]) == pytest.approx(expected["dice"], abs=1e-5)
    assert report["volume_ml"] == pytest.approx(sitk.GetArrayFromImage(mask).sum() * 0.9 * 0.9 * 5.0 / 1000)
    assert rows["p01"]["reference"].endswith("p01_manual.nii.gz")
    # the same report keys as `deepwml segment` (README: "the same names"), with the comparison added
    from DeepWMLLib.cli import main as cli
    assert cli(["segment", str(inputs / "p01.nrrd"), "-o", str(tmp_path / "cli"), "--model", str(tiny_model),
                "--device", "cpu"]) == 0
    cli_report = json.loads((tmp_path / "cli" / "p01_report.json").read_text(encoding="utf-8"))
    assert set(report) - {"reference", "comparison", "segmentation", "volume"} == set(cli_report)  # + node names
    assert report["model_sha256"] == cli_report["model_sha256"] and report["deepwml_version"]


def test_batch_all_good_exits_0_then_skips_existing_outputs(scene, batchScript, tmp_path, monkeypatch, tiny_model,
                                                            capsys):
    oracle_network(monkeypatch)
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    _, truth = writeCase(inputs, "a.nii.gz")
    writeCase(inputs, "b.mha", direction=rotation(0.0, 0.0, 1.2))
    arguments = ["--input-dir", str(inputs), "--output-dir", str(out), "--model", str(tiny_model), "--device", "cpu"]
    assert batchScript.main(arguments) == 0
    rows = summary(out)
    assert {rows["a"]["status"], rows["b"]["status"]} == {"ok"}
    assert rows["a"]["dice"] == ""  # no reference folder, no metrics
    mask = sitk.GetArrayFromImage(io.read_mask(out / "a_wmh.nii.gz"))
    assert 2 * (mask & sitk.GetArrayFromImage(truth)).sum() / (mask.sum() + sitk.GetArrayFromImage(truth).sum()) > 0.9
    assert float(rows["a"]["volume_ml"]) == pytest.approx(json.loads((out / "a_report.json").read_text(encoding="utf-8"))["volume_ml"])
    assert scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == 0  # every case's nodes are removed

    first = rows
    assert batchScript.main(arguments) == 0
    rows = summary(out)
    assert {row["status"] for row in rows.values()} == {"skipped"}
    for case in ("a", "b"):  # the rewritten summary keeps the earlier results' figures
        assert [rows[case][key] for key in ("volume_ml", "lesion_count", "warnings")] == \
            [first[case][key] for key in ("volume_ml", "lesion_count", "warnings")]
        assert rows[case]["seconds"] == "" and float(first[case]["seconds"]) > 0  # not segmented by this run: no time
    assert "use --overwrite" in capsys.readouterr().out
    assert batchScript.main(arguments + ["--overwrite", "--qc"]) == 0
    assert {row["status"] for row in summary(out).values()} == {"ok"} and (out / "a_qc.png").is_file()
    assert batchScript.main(arguments + ["--overwrite"]) == 0  # the earlier picture goes with its result
    assert {row["status"] for row in summary(out).values()} == {"ok"} and not (out / "a_qc.png").exists()


def test_batch_summary_and_saved_table_give_the_figures_of_the_report_and_the_command_line(
        scene, batchScript, tmp_path, monkeypatch, tiny_model):
    # 0.9375 mm pixels (a 240 mm field at 256): volumes and areas with more than six significant digits, which the
    # batch's summary.csv wrote to six (27.9792 ml beside the report's and `deepwml segment`'s 27.97917)
    oracle_network(monkeypatch)
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    writeCase(inputs, "a.nii.gz", size=(64, 64, 12), spacing=(0.9375, 0.9375, 5.0),
              blobs=((0.5, 0.5, 0.5, 14.0), (0.25, 0.3, 0.4, 4.0)))
    assert batchScript.main(["--input-dir", str(inputs), "--output-dir", str(out), "--model", str(tiny_model),
                             "--device", "cpu"]) == 0
    report = json.loads((out / "a_report.json").read_text(encoding="utf-8"))
    volume = report["volume_ml"]
    assert f"{volume:.6g}" != repr(volume)  # the case needs the digits
    assert float(summary(out)["a"]["volume_ml"]) == volume

    from DeepWMLLib.cli import main as cli
    assert cli(["segment", str(inputs / "a.nii.gz"), "-o", str(tmp_path / "cli"), "--model", str(tiny_model),
                "--device", "cpu"]) == 0
    assert float(summary(tmp_path / "cli")["a"]["volume_ml"]) == volume
    assert json.loads((tmp_path / "cli" / "a_report.json").read_text(encoding="utf-8"))["slices"] == report["slices"]

    from DeepWMLSlicerLib.CoreLogic import DeepWMLCoreLogic  # Save results' per-slice table
    saved = DeepWMLCoreLogic().saveResults({"report": report}, tmp_path / "a_lesions.csv")
    rows = list(csv.DictReader(open(saved, encoding="utf-8-sig")))
    marked = [s for s in report["slices"] if s["area_mm2"] > 0]
    assert any(f"{s['area_mm2']:.6g}" != repr(s["area_mm2"]) for s in marked)
    assert [(int(r["index"]), float(r["area_mm2"]), float(r["lv_ml"]), r["lv_group"]) for r in rows] == \
        [(s["index"], s["area_mm2"], s["lv_ml"], s["lv_group"]) for s in marked]


def test_batch_writes_the_mask_of_an_input_stored_with_one_time_point_the_same_way(scene, batchScript, tmp_path,
                                                                                  monkeypatch, tiny_model):
    oracle_network(monkeypatch)
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    flair, _ = make_volume(direction=rotation(0.1, 0.0, 0.3))
    sitk.WriteImage(sitk.JoinSeries(flair, 0.0, 2.0), str(inputs / "a.mha"))  # X, Y, Z, 1
    assert batchScript.main(["--input-dir", str(inputs), "--output-dir", str(out), "--model", str(tiny_model),
                             "--device", "cpu"]) == 0
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(out / "a_wmh.mha"))
    reader.ReadImageInformation()
    assert (reader.GetDimension(), reader.GetSize()) == (4, (*flair.GetSize(), 1))
    np.testing.assert_allclose(reader.GetDirection(), sitk.JoinSeries(flair, 0.0, 2.0).GetDirection(), atol=1e-6)
    assert json.loads((out / "a_report.json").read_text(encoding="utf-8"))["input_size"] == [*flair.GetSize(), 1]
    assert io.read_mask(out / "a_wmh.mha", reference=flair).GetDimension() == 3  # read back onto the scan's grid


@pytest.mark.parametrize("extension", [".nii.gz", ".nrrd"])
def test_batch_writes_the_mask_of_a_left_handed_scan_on_its_grid_and_numbers_its_slices_as_the_command_line(
        scene, batchScript, tmp_path, monkeypatch, tiny_model, extension):
    """Slicer's reader stores the slices of a file with a left-handed voxel grid (here an oblique scan with a
    flipped axis, 0.45 x 0.45 x 5 mm; NIfTI in FSL's radiological order is one) in reverse order: the mask was
    written with its slices reversed against the input, and the report counted slices and lesions from the
    other end, unlike `deepwml segment` on the same file."""
    from DeepWMLLib.cli import main as cli

    oracle_network(monkeypatch)
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    flair, _ = make_volume(size=(60, 50, 9), spacing=(0.45, 0.45, 5.0), origin=(112.3, -87.6, 40.2),
                           direction=rotation(0.15, -0.1, 0.3) @ np.diag([1.0, -1.0, 1.0]),
                           blobs=((0.3, 0.65, 0.2, 6.0), (0.7, 0.4, 0.8, 4.0)))  # one low, one high
    sitk.WriteImage(sitk.Cast(flair, sitk.sitkInt16), str(inputs / f"a{extension}"))
    assert batchScript.main(["--input-dir", str(inputs), "--output-dir", str(out), "--model", str(tiny_model),
                             "--device", "cpu"]) == 0
    assert cli(["segment", str(inputs / f"a{extension}"), "-o", str(tmp_path / "cli"), "--model", str(tiny_model),
                "--device", "cpu"]) == 0
    batch, command = (sitk.ReadImage(str(folder / f"a_wmh{extension}")) for folder in (out, tmp_path / "cli"))
    np.testing.assert_allclose(batch.GetOrigin(), command.GetOrigin(), atol=1e-4)  # on the input's grid
    np.testing.assert_allclose(batch.GetDirection(), command.GetDirection(), atol=1e-6)
    assert sitk.GetArrayFromImage(command).sum() > 100
    np.testing.assert_array_equal(sitk.GetArrayFromImage(batch), sitk.GetArrayFromImage(command))
    report, expected = (json.loads((folder / "a_report.json").read_text(encoding="utf-8"))
                        for folder in (out, tmp_path / "cli"))
    assert [(s["index"], s["lv_ml"], s["lv_group"]) for s in report["slices"]] == \
        [(s["index"], s["lv_ml"], s["lv_group"]) for s in expected["slices"]]
    assert [lesion["slice_range"] for lesion in report["lesions"]] == \
        [lesion["slice_range"] for lesion in expected["lesions"]] == [[1, 2], [6, 7]]


def test_batch_reads_a_nifti_pair_and_refuses_an_analyze_one(scene, batchScript, tmp_path, monkeypatch, tiny_model):
    """A NIfTI-1 pair (.hdr + .img) is a case as its .nii would be, its mask on its grid; an Analyze 7.5 pair
    (no orientation), which Slicer's reader would load with a guessed left and right, fails saying why."""
    oracle_network(monkeypatch)
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    flair, _ = writeCase(inputs, "pair.hdr", direction=rotation(0.1, 0.0, 0.3))
    header = bytearray((inputs / "pair.hdr").read_bytes()[:348])
    header[344:348] = bytes(4)
    (inputs / "old.hdr").write_bytes(bytes(header))
    (inputs / "old.img").write_bytes((inputs / "pair.img").read_bytes())
    assert batchScript.main(["--input-dir", str(inputs), "--output-dir", str(out), "--model", str(tiny_model),
                             "--device", "cpu"]) == 1
    rows = summary(out)
    assert set(rows) == {"pair", "old"} and rows["pair"]["status"] == "ok"
    assert "Analyze 7.5 header" in rows["old"]["error"], rows["old"]
    assert io.grid_difference(io.read_mask(out / "pair_wmh.nii.gz"), flair) is None


def test_batch_reference_matching(scene, batchScript, tmp_path, monkeypatch, tiny_model):
    oracle_network(monkeypatch)
    inputs, references, out = tmp_path / "in", tmp_path / "ref", tmp_path / "out"
    inputs.mkdir()
    references.mkdir()
    _, truth = writeCase(inputs, "exact.nii.gz")
    writeCase(inputs, "twice.nii.gz")
    writeCase(inputs, "none.nii.gz")
    sitk.WriteImage(truth, str(references / "exact.nii.gz"))
    io.write_segmentation(truth, references / "twice_rater1.seg.nrrd")
    sitk.WriteImage(truth, str(references / "twice_rater2.nii.gz"))
    sitk.WriteImage(truth, str(references / "exact_other.nii.gz"))  # the exact name wins over prefixes
    status = batchScript.main(["--input-dir", str(inputs), "--output-dir", str(out), "--reference-dir",
                               str(references), "--model", str(tiny_model), "--device", "cpu", "--qc"])
    rows = summary(out)
    assert status == 1
    assert rows["exact"]["reference"].endswith("ref/exact.nii.gz") and float(rows["exact"]["dice"]) > 0.9
    assert rows["twice"]["status"] == "error" and "several references match 'twice'" in rows["twice"]["error"]
    assert rows["none"]["status"] == "ok" and rows["none"]["dice"] == ""
    from DeepWMLLib import qc

    def colours(name):  # of the tiles, below the band with the title and legend
        picture = sitk.GetArrayFromImage(sitk.ReadImage(str(out / name)))[qc.HEADER_PX:].reshape(-1, 3)
        return {tuple(c) for c in np.unique(picture, axis=0)}

    assert qc.LESION_RGB in colours("none_qc.png")  # no reference: the mask outlined
    exact = colours("exact_qc.png")  # a reference: agreement filled green over the grey FLAIR
    assert qc.LESION_RGB not in exact and any(g > r + 60 and g > b + 60 for r, g, b in exact)
    assert not (out / "twice_qc.png").exists()


def test_batch_summary_says_the_comparisons_notes(scene, batchScript, tmp_path, monkeypatch, tiny_model):
    """The comparison's notes (here: part of the reference lies outside the FLAIR, not counted in the Dice) were
    only in the case's report .json, under comparison.notes: summary.csv, where a cohort's Dice are read, said
    nothing of them. Its warnings column carries them beside the lesion statistics' warnings."""
    oracle_network(monkeypatch)
    inputs, references, out = tmp_path / "in", tmp_path / "ref", tmp_path / "out"
    inputs.mkdir()
    references.mkdir()
    _, truth = writeCase(inputs, "p.nii.gz")
    wider = sitk.ConstantPad(truth, [0, 0, 0], [0, 0, 4], 0)  # 4 more slices above the scan, with lesion in them
    extra = sitk.GetArrayFromImage(wider)
    extra[-3:, 10:20, 10:20] = 1
    larger = sitk.GetImageFromArray(extra)
    larger.CopyInformation(wider)
    sitk.WriteImage(larger, str(references / "p.nii.gz"))
    assert batchScript.main(["--input-dir", str(inputs), "--output-dir", str(out), "--reference-dir",
                             str(references), "--model", str(tiny_model), "--device", "cpu"]) == 0
    report = json.loads((out / "p_report.json").read_text(encoding="utf-8"))
    notes = [n for n in report["comparison"]["notes"] if "outside the field of view" in n]
    assert len(notes) == 1
    assert notes[0] in summary(out)["p"]["warnings"]


def test_batch_references_of_longer_case_names_are_theirs(scene, batchScript, tmp_path, monkeypatch, tiny_model):
    """p2 beside p2_fu, sub1 beside sub1_fu: a follow-up's reference is never the baseline's."""
    oracle_network(monkeypatch)
    inputs, references, out = tmp_path / "in", tmp_path / "ref", tmp_path / "out"
    inputs.mkdir()
    references.mkdir()
    for name in ("p2", "p2_fu", "sub1", "sub1_fu"):
        _, truth = writeCase(inputs, f"{name}.nii.gz")
    sitk.WriteImage(truth, str(references / "p2_fu.nii.gz"))
    sitk.WriteImage(truth, str(references / "sub1_manual.nii.gz"))
    sitk.WriteImage(truth, str(references / "sub1_fu_manual.nii.gz"))
    status = batchScript.main(["--input-dir", str(inputs), "--output-dir", str(out), "--reference-dir",
                               str(references), "--model", str(tiny_model), "--device", "cpu"])
    rows = summary(out)
    assert status == 0
    assert rows["p2"]["reference"] == "" and rows["p2"]["dice"] == ""
    assert rows["p2_fu"]["reference"].endswith("ref/p2_fu.nii.gz")
    assert rows["sub1"]["reference"].endswith("ref/sub1_manual.nii.gz")
    assert rows["sub1_fu"]["reference"].endswith("ref/sub1_fu_manual.nii.gz")


def test_batch_references_named_in_other_upper_and_lower_case_are_found(batchScript, tmp_path):
    """A reference folder written on Windows or macOS (P1_Manual.nii.gz for p1) gave p1 no Dice, silently."""
    references = tmp_path / "ref"
    references.mkdir()
    _, truth = make_volume()
    for name in ("P1_Manual.nii.gz", "SUB1.nii.gz", "sub1_FU_manual.nii.gz", "q.nii.gz", "Q.nii.gz"):
        sitk.WriteImage(truth, str(references / name))
    cases = ["p1", "sub1", "sub1_fu", "q"]
    assert batchScript.findReference(references, "p1", cases).name == "P1_Manual.nii.gz"
    assert batchScript.findReference(references, "sub1", cases).name == "SUB1.nii.gz"
    assert batchScript.findReference(references, "sub1_fu", cases).name == "sub1_FU_manual.nii.gz"
    assert batchScript.findReference(references, "q", cases).name == "q.nii.gz"  # the exact match first


def test_batch_segmentation_reference_and_usage_errors(scene, batchScript, tmp_path, monkeypatch, tiny_model, capsys):
    oracle_network(monkeypatch)
    inputs, references, out = tmp_path / "in", tmp_path / "ref", tmp_path / "out"
    inputs.mkdir()
    references.mkdir()
    _, truth = writeCase(inputs, "c.nii.gz", direction=rotation(0.3, 0.0, 0.0))
    io.write_segmentation(truth, references / "c.seg.nrrd")
    assert batchScript.main(["--input-dir", str(inputs), "--output-dir", str(out), "--reference-dir",
                             str(references), "--model", str(tiny_model), "--device", "cpu"]) == 0
    assert float(summary(out)["c"]["dice"]) > 0.9

    assert batchScript.main(["--input-dir", str(tmp_path / "missing"), "--output-dir", str(out)]) == 1
    assert "input folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:
        batchScript.main(["--output-dir", str(out)])
    assert usage.value.code == 2
    for threshold in ("2", "0", "nan", "high"):  # as `deepwml segment --threshold`: a usage error, nothing run
        with pytest.raises(SystemExit) as usage:
            batchScript.main(["--input-dir", str(inputs), "--output-dir", str(out), "--threshold", threshold])
        assert usage.value.code == 2


def test_batch_reads_a_pacs_export_study_by_study(scene, batchScript, tmp_path, monkeypatch, tiny_model, capsys):
    """DICOM below the input folder, nested as PACS exports are: one case per study, its FLAIR read on its
    own grid; a study without a FLAIR-like series is skipped, not failed. The report names the series read
    and warns of a gap between its slices (3 mm thick, 5 mm apart) as `deepwml segment`'s does."""
    from conftest import write_dicom_series
    from DeepWMLLib.cli import main as cli

    oracle_network(monkeypatch)
    inputs, out = tmp_path / "in", tmp_path / "out"
    flair, _ = make_volume(size=(40, 36, 6), spacing=(0.9, 0.9, 5.0), dtype=sitk.sitkInt16)
    other, _ = make_volume(size=(40, 36, 3), spacing=(0.9, 0.9, 5.0), dtype=sitk.sitkInt16)
    write_dicom_series(inputs / "PAT1" / "STU1" / "SER1", other, uid="1.1.1", description="AX T1", extra={"0020|000d": "1.1"})
    write_dicom_series(inputs / "PAT1" / "STU1" / "SER2", flair, uid="1.1.2", description="AX FLAIR",
                       extra={"0020|000d": "1.1", "0018|0050": "3"})
    write_dicom_series(inputs / "PAT2" / "STU1" / "SER1", other, uid="2.1.1", description="sag T1 mprage",
                       extra={"0020|000d": "2.1"})
    assert batchScript.main(["--input-dir", str(inputs), "--output-dir", str(out), "--model", str(tiny_model),
                             "--device", "cpu"]) == 0
    rows = summary(out)
    assert rows["PAT1_STU1"]["status"] == "ok" and rows["PAT2_STU1_SER1"]["status"] == "skipped"
    assert "none looks like a FLAIR" in rows["PAT2_STU1_SER1"]["error"]
    wrong = tmp_path / "wrong"  # an export of the wrong exam alone: an error, not '0/1 done (0 failed, 1 skipped)', 0
    write_dicom_series(wrong / "PAT2" / "STU1" / "SER1", other, uid="2.1.1", description="sag T1 mprage",
                       extra={"0020|000d": "2.1"})
    assert batchScript.main(["--input-dir", str(wrong), "--output-dir", str(tmp_path / "out2"), "--model",
                             str(tiny_model), "--device", "cpu"]) == 1
    assert summary(tmp_path / "out2")["PAT2_STU1_SER1"]["status"] == "error"
    assert summary(tmp_path / "out2")["PAT2_STU1_SER1"]["seconds"] != ""  # failed: its time, as deepwml segment's
    _, truth = writeCase(tmp_path, "flair.nii.gz")  # beside masks skipped as masks: still an error, as deepwml segment's
    sitk.WriteImage(truth, str(wrong / "consensus_mask.nii.gz"))
    sitk.WriteImage(truth, str(wrong / "case01.seg.nrrd"))
    capsys.readouterr()
    assert batchScript.main(["--input-dir", str(wrong), "--output-dir", str(tmp_path / "out3"), "--model",
                             str(tiny_model), "--device", "cpu"]) == 1
    assert summary(tmp_path / "out3")["PAT2_STU1_SER1"]["status"] == "error"
    assert "error: no series looks like a FLAIR in the DICOM study given" in capsys.readouterr().err
    assert io.grid_difference(sitk.ReadImage(str(out / "PAT1_STU1_wmh.nrrd")), flair) is None
    report = json.loads((out / "PAT1_STU1_report.json").read_text(encoding="utf-8"))
    assert cli(["segment", str(inputs), "-o", str(tmp_path / "cli"), "--model", str(tiny_model), "--device", "cpu"]) == 0
    cli_report = json.loads((tmp_path / "cli" / "PAT1_STU1_report.json").read_text(encoding="utf-8"))
    assert report["dicom_series"] == cli_report["dicom_series"]
    assert report["dicom_series"]["uid"] == "1.1.2" and report["dicom_series"]["slice_thickness_tag_mm"] == 3
    gap = [w for w in cli_report["warnings"] if "2.00 mm gap" in w]
    assert len(gap) == 1 and gap[0] in report["warnings"] and gap[0] in rows["PAT1_STU1"]["warnings"]
    assert set(report) - {"segmentation", "volume"} == set(cli_report)  # a DICOM study's report: the same names too


def test_batch_warns_of_unevenly_spaced_slices_as_the_command_line_does(scene, batchScript, tmp_path, monkeypatch,
                                                                          tiny_model):
    """A DICOM series whose slices are 5 mm apart but for one 5.8 mm step (under the 20 % refused as slices
    missing): the batch's report and summary warn of it in `deepwml segment`'s words."""
    from conftest import stepped_positions, write_dicom_series
    from DeepWMLLib.cli import main as cli

    oracle_network(monkeypatch)
    inputs, out = tmp_path / "in", tmp_path / "out"
    flair, _ = make_volume(size=(40, 36, 6), spacing=(0.9, 0.9, 5.0), dtype=sitk.sitkInt16)
    write_dicom_series(inputs / "case1", flair, uid="1.1.9", description="AX FLAIR",
                       positions=stepped_positions(flair, [5, 5, 5.8, 5, 5]))
    assert batchScript.main(["--input-dir", str(inputs), "--output-dir", str(out), "--model", str(tiny_model),
                             "--device", "cpu"]) == 0
    report = json.loads((out / "case1_report.json").read_text(encoding="utf-8"))
    assert cli(["segment", str(inputs / "case1"), "-o", str(tmp_path / "cli"), "--model", str(tiny_model),
                "--device", "cpu"]) == 0
    cli_report = json.loads((tmp_path / "cli" / "case1_report.json").read_text(encoding="utf-8"))
    uneven = [w for w in cli_report["warnings"] if "unevenly spaced (5.00 to 5.80 mm apart" in w]
    assert len(uneven) == 1 and uneven[0] in report["warnings"] and uneven[0] in summary(out)["case1"]["warnings"]


def test_batch_warns_of_the_series_it_picked_and_of_damaged_files_as_the_command_line_does(
        scene, batchScript, tmp_path, monkeypatch, tiny_model):
    """A study of a PACS export read by the batch, its FLAIR picked among its series and the last slice file
    of it cut short by the transfer: the report and summary say which series was read (the batch has no
    --series: that the others were left) and that a file beside it could not be read, in `deepwml segment`'s
    words; an image file's report has neither."""
    from conftest import write_dicom_series
    from DeepWMLLib.cli import main as cli

    oracle_network(monkeypatch)
    inputs, out = tmp_path / "in", tmp_path / "out"
    flair, _ = make_volume(size=(40, 36, 6), spacing=(0.9, 0.9, 5.0), dtype=sitk.sitkInt16)
    other, _ = make_volume(size=(40, 36, 3), spacing=(0.9, 0.9, 5.0), dtype=sitk.sitkInt16)
    write_dicom_series(inputs / "PAT1" / "STU1" / "SER1", other, uid="1.1.1", description="AX T1", extra={"0020|000d": "1.1"})
    folder = write_dicom_series(inputs / "PAT1" / "STU1" / "SER2", flair, uid="1.1.2", description="AX FLAIR",
                                extra={"0020|000d": "1.1"})
    last = sorted(folder.iterdir())[-1]
    last.write_bytes(last.read_bytes()[:400])
    writeCase(inputs, "plain.nii.gz", size=(40, 36, 6))
    assert batchScript.main(["--input-dir", str(inputs), "--output-dir", str(out), "--model", str(tiny_model),
                             "--device", "cpu"]) == 0
    rows = summary(out)
    assert rows["PAT1_STU1"]["status"] == "ok" and rows["plain"]["status"] == "ok"
    report = json.loads((out / "PAT1_STU1_report.json").read_text(encoding="utf-8"))
    assert report["dicom_series"]["uid"] == "1.1.2" and report["dicom_series"]["images"] == 5
    assert cli(["segment", str(inputs), "-o", str(tmp_path / "cli"), "--model", str(tiny_model), "--device", "cpu"]) == 0
    cli_report = json.loads((tmp_path / "cli" / "PAT1_STU1_report.json").read_text(encoding="utf-8"))
    damaged = [w for w in cli_report["warnings"] if w.startswith("1 file(s) beside the series could not be read")]
    assert len(damaged) == 1 and last.name in damaged[0]
    assert damaged[0] in report["warnings"] and damaged[0] in rows["PAT1_STU1"]["warnings"]
    picked = [w for w in cli_report["warnings"] if "the only one of 2 series that looks like a FLAIR" in w]
    assert len(picked) == 1 and picked[0].endswith("; name another with --series")
    said = picked[0][:-len("; name another with --series")]  # read DICOM series ... 'AX FLAIR' (5 images), the only one ...
    assert "'AX FLAIR'" in said
    batch = [w for w in report["warnings"] if w.startswith(said)]
    assert len(batch) == 1 and batch[0] not in cli_report["warnings"]  # not told to name another with --series
    assert "the others were left" in batch[0] and batch[0] in rows["PAT1_STU1"]["warnings"]
    assert report["warnings"].index(batch[0]) < report["warnings"].index(damaged[0])  # in the command line's order
    plain = json.loads((out / "plain_report.json").read_text(encoding="utf-8"))
    assert not any("could not be read" in w or "looks like a FLAIR" in w for w in plain.get("warnings") or [])


def test_batch_names_cases_of_one_name_as_the_command_line_does(scene, batchScript, tmp_path, monkeypatch,
                                                                tiny_model, capsys):
    """The batch names its cases as `deepwml segment` does, clashes included: an image file in IN named as a
    study of an export below IN is named (PAT1_STU1_SER1) is told apart by no folder (both lie in IN, the study's
    name is made of its folders below IN): refused before anything is segmented, by both."""
    from conftest import write_dicom_series
    from DeepWMLLib.cli import main as cli_main

    oracle_network(monkeypatch)
    inputs, out, cli_out = tmp_path / "in", tmp_path / "out", tmp_path / "cli"
    flair, _ = make_volume(size=(40, 36, 6), spacing=(0.9, 0.9, 5.0), dtype=sitk.sitkInt16)
    write_dicom_series(inputs / "PAT1" / "STU1" / "SER1", flair, uid="1.1.2", description="AX FLAIR",
                       extra={"0020|000d": "1.1"})
    writeCase(inputs, "PAT1_STU1_SER1.nii.gz", size=(40, 36, 6))
    assert batchScript.main(["--input-dir", str(inputs), "--output-dir", str(out), "--model", str(tiny_model),
                             "--device", "cpu"]) == 1
    assert "2 inputs are both named 'PAT1_STU1_SER1'" in capsys.readouterr().err
    assert cli_main(["segment", str(inputs), "-o", str(cli_out), "--model", str(tiny_model), "--device", "cpu"]) == 1
    assert "2 inputs are both named 'PAT1_STU1_SER1'" in capsys.readouterr().err
    assert not list(out.glob("*PAT1*")) and not cli_out.exists()


def test_batch_with_a_ventricle_model_splits_the_volume_as_the_command_line_does(scene, batchScript, tmp_path,
                                                                                monkeypatch, tiny_model):
    from conftest import tiny_model_file
    from DeepWMLLib.cli import main as cli_main

    oracle_network(monkeypatch)
    ventricle_model = tiny_model_file(tmp_path / "vent.pt", labels={"0": "background", "1": "lateral_ventricles"})
    inputs, out, cli_out = tmp_path / "in", tmp_path / "out", tmp_path / "cli"
    inputs.mkdir()
    writeCase(inputs, "a.nii.gz", size=(64, 48, 8), blobs=((0.3, 0.5, 0.5, 5.0), (0.9, 0.15, 0.5, 4.0)))
    assert batchScript.main(["--input-dir", str(inputs), "--output-dir", str(out), "--model", str(tiny_model),
                             "--device", "cpu", "--ventricle-model", str(ventricle_model)]) == 0
    assert cli_main(["segment", str(inputs / "a.nii.gz"), "-o", str(cli_out), "--model", str(tiny_model), "--device",
                     "cpu", "--ventricle-model", str(ventricle_model)]) == 0
    row = summary(out)["a"]
    expected = json.loads((cli_out / "a_report.json").read_text(encoding="utf-8"))["location"]
    assert expected["judged"] and float(row["periventricular_ml"]) > 0 and float(row["deep_ml"]) > 0
    assert float(row["periventricular_ml"]) == pytest.approx(expected["periventricular_ml"], abs=2e-3)
    assert float(row["deep_ml"]) == pytest.approx(expected["deep_ml"], abs=2e-3)
    ventricles = io.read_segmentation(out / "a.seg.nrrd", "Lateral ventricles")  # the split's reference, saved
    assert sitk.GetArrayFromImage(ventricles).sum() > 0
    # ... and never read as lesion: the two-segment file is its WMH segment to evaluate, consensus and change
    wmh = io.read_mask(out / "a_wmh.nii.gz")
    from_seg = io.read_mask(out / "a.seg.nrrd")
    on_grid = sitk.Resample(from_seg, wmh, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(on_grid), sitk.GetArrayFromImage(wmh))
    assert batchScript.main(["--input-dir", str(inputs), "--output-dir", str(tmp_path / "pictured"), "--model",
                             str(tiny_model), "--device", "cpu", "--ventricle-model", str(ventricle_model), "--qc"]) == 0
    from DeepWMLLib.qc import VENTRICLE_RGB

    picture = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "pictured" / "a_qc.png")))
    assert np.all(picture[..., :3] == VENTRICLE_RGB, axis=-1).any()  # outlined as deepwml segment --qc does
    with pytest.raises(SystemExit):
        batchScript.main(["--input-dir", str(inputs), "--output-dir", str(out), "--no-location", "--ventricle-model",
                          str(ventricle_model)])
    assert batchScript.main(["--input-dir", str(inputs), "--output-dir", str(tmp_path / "plain"), "--model",
                             str(tiny_model), "--device", "cpu"]) == 0
    assert summary(tmp_path / "plain")["a"]["periventricular_ml"] == ""  # no ventricle model: no split


def test_batch_never_writes_over_a_scan_given(scene, batchScript, tmp_path, monkeypatch, tiny_model):
    """The input folder as the output folder, with the user's own X_wmh.nii.gz among the scans: X is refused
    (as `deepwml segment` refuses it), even with --overwrite, and that file stays as it was."""
    oracle_network(monkeypatch)
    inputs = tmp_path / "in"
    inputs.mkdir()
    writeCase(inputs, "X.nii.gz")
    writeCase(inputs, "X_wmh.nii.gz", seed=3)
    before = (inputs / "X_wmh.nii.gz").read_bytes()
    for extra in ([], ["--overwrite"]):
        assert batchScript.main(["--input-dir", str(inputs), "--output-dir", str(inputs), "--model", str(tiny_model),
                                 "--device", "cpu", *extra]) == 1
        assert (inputs / "X_wmh.nii.gz").read_bytes() == before
        assert "is one of the scans given" in summary(inputs)["X"]["error"]


def test_batch_rerun_with_other_settings_is_refused_and_a_moved_series_skipped(scene, batchScript, tmp_path,
                                                                                monkeypatch, tiny_model):
    """The batch script keeps `deepwml segment`'s rules for a rerun: a case done with other result settings
    is refused, naming them; a DICOM series moved elsewhere keeps its result (a picture asked for now added to it, a
    rerun without it skipped); a case done by `deepwml segment`
    with the same settings is skipped."""
    from conftest import write_dicom_series
    from DeepWMLLib.cli import main as cli_main

    oracle_network(monkeypatch)
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    writeCase(inputs, "a.nii.gz")
    image, _ = make_volume(size=(28, 24, 4), dtype=sitk.sitkInt16)
    write_dicom_series(inputs / "S", image, uid="1.2.3.7", description="AX FLAIR", inversion_ms=2500)
    base = ["--output-dir", str(out), "--model", str(tiny_model), "--device", "cpu"]
    assert batchScript.main(["--input-dir", str(inputs), *base]) == 0
    assert json.loads((out / "S_report.json").read_text())["input_fingerprint"].startswith("dicom:4:")
    assert batchScript.main(["--input-dir", str(inputs), *base, "--threshold", "0.3"]) == 1
    rows = summary(out)
    assert {row["status"] for row in rows.values()} == {"error"}
    assert "made with other settings: --threshold (0.5 then, 0.3 now)" in rows["a"]["error"]
    inputs.rename(tmp_path / "moved")
    assert batchScript.main(["--input-dir", str(tmp_path / "moved"), *base, "--qc"]) == 0
    # its result kept: the pictures asked for now added to it, as deepwml segment adds them (nothing segmented again)
    assert {row["status"] for row in summary(out).values()} == {"added"}
    assert (out / "a_qc.png").is_file() and (out / "S_qc.png").is_file()
    assert batchScript.main(["--input-dir", str(tmp_path / "moved"), *base]) == 0
    assert {row["status"] for row in summary(out).values()} == {"skipped"}
    cli_out = tmp_path / "cli"
    assert cli_main(["segment", str(tmp_path / "moved"), "-o", str(cli_out), "--model", str(tiny_model),
                     "--device", "cpu"]) == 0
    assert batchScript.main(["--input-dir", str(tmp_path / "moved"), "--output-dir", str(cli_out), *base[2:]]) == 0
    assert {row["status"] for row in summary(cli_out).values()} == {"skipped"}


def test_batch_grid_phases_are_recorded_and_a_case_done_with_one_phase_is_not_taken_for_done(
        scene, batchScript, tmp_path, monkeypatch, tiny_model, capsys):
    """deepwml segment's --grid-phases 4 was on the command line only. The batch script has it (default 1): it is
    recorded in the report as deepwml segment records it (an OUTDIR either made is the other's, done), and a case
    done before with one phase is refused, naming it, as deepwml segment refuses it, until --overwrite redoes it."""
    from DeepWMLLib.cli import main as cli_main

    oracle_network(monkeypatch)
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    writeCase(inputs, "a.nii.gz")
    base = ["--input-dir", str(inputs), "--model", str(tiny_model), "--device", "cpu", "--no-brain-mask"]
    assert batchScript.main([*base, "--output-dir", str(out)]) == 0
    assert json.loads((out / "a_report.json").read_text())["settings"]["grid_phases"] == 1
    assert batchScript.main([*base, "--output-dir", str(out), "--grid-phases", "4"]) == 1
    assert "made with other settings: --grid-phases (1 then, 4 now)" in summary(out)["a"]["error"]
    assert batchScript.main([*base, "--output-dir", str(out), "--grid-phases", "4", "--overwrite"]) == 0
    report = json.loads((out / "a_report.json").read_text())
    assert report["settings"]["grid_phases"] == 4 and summary(out)["a"]["status"] == "ok"
    cli = tmp_path / "cli"
    assert cli_main(["segment", str(inputs), "-o", str(cli), "--model", str(tiny_model), "--device", "cpu",
                     "--no-brain-mask", "--grid-phases", "4"]) == 0
    assert json.loads((cli / "a_report.json").read_text())["settings"] == report["settings"]
    assert float(summary(cli)["a"]["volume_ml"]) == pytest.approx(report["volume_ml"], rel=1e-6)
    assert batchScript.main([*base, "--output-dir", str(cli), "--grid-phases", "4"]) == 0
    assert summary(cli)["a"]["status"] == "skipped"
    assert cli_main(["segment", str(inputs), "-o", str(out), "--model", str(tiny_model), "--device", "cpu",
                     "--no-brain-mask", "--grid-phases", "4"]) == 0  # the batch's result is deepwml segment's too
    capsys.readouterr()
    with pytest.raises(SystemExit) as usage:
        batchScript.main([*base, "--output-dir", str(out), "--grid-phases", "2"])
    assert usage.value.code == 2 and "--grid-phases: invalid choice: 2 (choose from 1, 4)" in capsys.readouterr().err


def test_batch_leaves_a_case_another_run_is_writing_to_it_and_lists_its_figures_once_done(scene, batchScript, tmp_path,
                                                                                         monkeypatch, tiny_model):
    """As `deepwml segment`: a case another DeepWML run into OUT is writing is left to it, skipped, not failed;
    done by the end of the batch, its row has the figures of the other run's report."""
    from DeepWMLLib import segment
    from DeepWMLLib.cli import main as cli_main

    oracle_network(monkeypatch)
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    out.mkdir()
    writeCase(inputs, "a.nii.gz")
    writeCase(inputs, "b.nii.gz", seed=3)
    arguments = ["--input-dir", str(inputs), "--output-dir", str(out), "--model", str(tiny_model), "--device", "cpu"]
    with io.exclusive(out / ".a.deepwml-lock", "the other run"):
        assert batchScript.main(arguments) == 0
    rows = summary(out)
    assert (rows["a"]["status"], rows["b"]["status"]) == ("skipped", "ok")
    assert rows["a"]["error"].startswith("being written by another DeepWML process now")

    (out / "b_report.json").unlink()
    other = io.exclusive(out / ".b.deepwml-lock", "the other run")
    other.__enter__()
    held = [True]

    class Bar(segment.ProgressBar):  # when the batch has left case b, the other run (deepwml segment) does it
        def finish(self, row):
            super().finish(row)
            if row["case"] == "b" and held[0]:
                held[0] = False
                other.__exit__(None, None, None)
                assert cli_main(["segment", str(inputs / "b.nii.gz"), "-o", str(out), "--model", str(tiny_model),
                                 "--device", "cpu", "--overwrite"]) == 0

    monkeypatch.setattr(segment, "ProgressBar", Bar)
    assert batchScript.main(arguments) == 0
    rows = summary(out)
    assert rows["b"]["status"] == "skipped" and rows["b"]["error"].startswith("written by another DeepWML process")
    report = json.loads((out / "b_report.json").read_text())
    assert float(rows["b"]["volume_ml"]) == pytest.approx(report["volume_ml"])


def test_batch_lists_a_case_done_before_that_another_run_only_skipped_as_done_before(scene, batchScript, tmp_path,
                                                                                      monkeypatch, tiny_model):
    """As `deepwml segment`: a case done before, held by another run only to skip it, was listed as written by
    that run during this one."""
    from DeepWMLLib import segment

    oracle_network(monkeypatch)
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    writeCase(inputs, "a.nii.gz")
    arguments = ["--input-dir", str(inputs), "--output-dir", str(out), "--model", str(tiny_model), "--device", "cpu"]
    assert batchScript.main(arguments) == 0
    # when the batch has left case a, the other run has skipped it
    monkeypatch.setattr(segment, "ProgressBar", another_run_holds(
        out, note="the other run, skipping a", when=lambda row: row["error"] == segment.LEFT_TO_ANOTHER))
    assert batchScript.main(arguments) == 0
    row = summary(out)["a"]
    assert row["status"] == "skipped" and row["error"].startswith("outputs exist ("), row["error"]


def test_batch_overwrite_redoes_at_its_end_a_case_done_before_that_another_run_only_skipped(
        scene, batchScript, tmp_path, monkeypatch, tiny_model):
    """As `deepwml segment --overwrite`: such a case was listed "outputs exist (...); use --overwrite to replace
    them", its old outputs left although --overwrite was given."""
    import os

    from DeepWMLLib import segment

    oracle_network(monkeypatch)
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    writeCase(inputs, "a.nii.gz")
    arguments = ["--input-dir", str(inputs), "--output-dir", str(out), "--model", str(tiny_model), "--device", "cpu"]
    assert batchScript.main(arguments) == 0
    before = os.stat(out / "a_report.json")
    # when the batch has left case a, the other run has skipped it
    monkeypatch.setattr(segment, "ProgressBar", another_run_holds(
        out, note="the other run, skipping a", when=lambda row: row["error"] == segment.LEFT_TO_ANOTHER))
    assert batchScript.main([*arguments, "--overwrite"]) == 0
    row = summary(out)["a"]
    assert (row["status"], row["error"]) == ("ok", ""), row
    after = os.stat(out / "a_report.json")
    assert (after.st_ino, after.st_mtime_ns) != (before.st_ino, before.st_mtime_ns)


def test_batch_segments_at_its_end_a_case_the_other_run_failed_on(scene, batchScript, tmp_path, monkeypatch,
                                                                   tiny_model, capsys):
    """As `deepwml segment`: a case left to another run that then failed on it (its lock released, no outputs)
    was left `skipped`, exit 0, the cohort looking done. Now the batch segments it at its end; a case whose lock
    is still held then names its lock file."""
    from DeepWMLLib import segment

    oracle_network(monkeypatch)
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    out.mkdir()
    writeCase(inputs, "a.nii.gz")
    writeCase(inputs, "b.nii.gz", seed=3)
    writeCase(inputs, "c.nii.gz", seed=5)
    arguments = ["--input-dir", str(inputs), "--output-dir", str(out), "--model", str(tiny_model), "--device", "cpu"]
    # when the batch has left case a, the other run fails on it
    monkeypatch.setattr(segment, "ProgressBar", another_run_holds(out))
    capsys.readouterr()
    with io.exclusive(out / ".c.deepwml-lock", "a run that holds c throughout"):
        assert batchScript.main(arguments) == 0
    printed = capsys.readouterr().out
    rows = summary(out)
    assert {case: row["status"] for case, row in rows.items()} == {"a": "ok", "b": "ok", "c": "skipped"}
    assert float(rows["a"]["volume_ml"]) == pytest.approx(json.loads((out / "a_report.json").read_text())["volume_ml"])
    assert f"its lock, {out / '.c.deepwml-lock'}, was still held at the end of this run" in rows["c"]["error"]
    assert [line.split(" - ")[0] for line in printed.splitlines() if " - " in line] == [
        "a: skipped", "b: ok", "c: skipped", "a: ok"]


def test_batch_stopped_while_a_case_left_to_another_run_is_done_at_its_end_says_what_summary_lists(
        scene, batchScript, tmp_path, monkeypatch, tiny_model, capsys):
    """Stopped while segmenting, at the end of the batch, a case another run had left (it failed on it), the batch
    said nothing of what summary.csv kept, and that file still listed the case as left to the other run; now it
    says it as `deepwml segment` does: every case is listed."""
    from DeepWMLLib import segment

    oracle_network(monkeypatch)
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    out.mkdir()
    writeCase(inputs, "a.nii.gz")
    writeCase(inputs, "b.nii.gz", seed=3)
    segmentCase, tries = batchScript.segmentCase, []

    def stoppedAtTheEnd(logic, case, *rest, **options):
        tries.append(case)
        if tries.count("a") == 2:
            raise KeyboardInterrupt
        return segmentCase(logic, case, *rest, **options)

    # when the batch has left case a, the other run fails on it
    monkeypatch.setattr(segment, "ProgressBar", another_run_holds(out))
    monkeypatch.setattr(batchScript, "segmentCase", stoppedAtTheEnd)
    assert stoppedStatus(batchScript, ["--input-dir", str(inputs), "--output-dir", str(out), "--model",
                                       str(tiny_model), "--device", "cpu"]) == 130
    said = capsys.readouterr()
    assert (f"stopped in case 1/2, which another DeepWML process had left, being done at the end of the run: "
            f"{out / 'summary.csv'} lists all 2 cases, that one as left to the other process; run the same command "
            f"again to go on (the cases done are skipped)") in said.out, said.out
    assert said.err.rstrip().endswith("segment_batch: interrupted"), said.err
    assert [row["status"] for row in summary(out).values()] == ["skipped", "ok"]


@pytest.mark.parametrize("debug", [False, True])
def test_batch_says_a_warning_and_a_failed_cases_traceback_on_lines_of_their_own(
        scene, batchScript, tmp_path, monkeypatch, tiny_model, debug):
    """A warning said while a case's bar is drawn on a terminal (a runtime's fallback) began on the end of the bar's
    line, in Python's own form (file, line, and the source line); with --debug, a failed case's traceback did too.
    Now a warning is one line, as `deepwml segment`'s (--debug: where it came from), and both start a line of their
    own."""
    import warnings

    from test_progress_lines import Terminal, screen

    oracle_network(monkeypatch)
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    writeCase(inputs, "a.nii.gz")
    writeCase(inputs, "b.nii.gz", seed=3)
    segmentCase = batchScript.segmentCase

    def warnedOrBroken(logic, case, path, args, study=None, progress=None):
        progress(0.1, "loading the model")
        if case == "b":
            raise RuntimeError("a reader's fault")
        warnings.warn("a runtime's fallback")
        return segmentCase(logic, case, path, args, study, progress)

    monkeypatch.setattr(batchScript, "segmentCase", warnedOrBroken)
    terminal = Terminal()  # standard output and error on one terminal
    monkeypatch.setattr(sys, "stdout", terminal)
    monkeypatch.setattr(sys, "stderr", terminal)
    # Python's own printing of a warning (to standard error), which pytest replaces by its record of them
    monkeypatch.setattr(warnings, "_showwarnmsg_impl", lambda message: sys.stderr.write(warnings.formatwarning(
        message.message, message.category, message.filename, message.lineno, message.line)))
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert batchScript.main(["--input-dir", str(inputs), "--output-dir", str(out), "--model", str(tiny_model),
                                 "--device", "cpu", *["--debug"] * debug]) == 1
    shown = screen(terminal.getvalue())
    said = [line for line in shown if line.endswith("a runtime's fallback")]
    assert said == ([f"{Path(__file__)}:{warnedOrBroken.__code__.co_firstlineno + 4}: UserWarning: a runtime's "
                     "fallback"] if debug else ["segment_batch: warning: a runtime's fallback"]), shown
    assert [line for line in shown if line.startswith("a: ok - ")], shown
    if debug:
        assert shown[shown.index("Traceback (most recent call last):") - 1].startswith("[2/2] b |"), shown
    assert [line for line in shown if line.startswith("b: error - internal error: RuntimeError: a reader's fault")]


def test_batch_case_another_run_wrote_that_cannot_be_checked_is_an_error_not_the_end_of_the_batch(
        scene, batchScript, tmp_path, monkeypatch, tiny_model, capsys):
    """A case left to another DeepWML run, done by the end of the batch but its result not to be checked for a
    reason other than DeepWML's own (its report not to be read: PermissionError): the exception left the batch at
    its end, without the final line, summary.csv still calling the case skipped. Now its row is an error that
    says so, as `deepwml segment`'s is, and the batch ends with its total and exit 1."""
    from DeepWMLLib import segment
    from DeepWMLLib.cli import main as cli_main

    oracle_network(monkeypatch)
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    out.mkdir()
    writeCase(inputs, "a.nii.gz")
    writeCase(inputs, "b.nii.gz", seed=3)
    arguments = ["--input-dir", str(inputs), "--output-dir", str(out), "--model", str(tiny_model), "--device", "cpu"]
    def unreadable(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(out / "a_report.json"))

    def doneByTheOther(row):
        assert cli_main(["segment", str(inputs / "a.nii.gz"), "-o", str(out), "--model", str(tiny_model),
                         "--device", "cpu"]) == 0
        monkeypatch.setattr(segment, "check_earlier_result", unreadable)

    # when the batch has left case a, the other run (deepwml segment) does it
    monkeypatch.setattr(segment, "ProgressBar", another_run_holds(out, then=doneByTheOther))
    capsys.readouterr()
    assert batchScript.main(arguments) == 1
    assert f"1/2 cases done (1 failed, 0 skipped), summary in {out / 'summary.csv'}" in capsys.readouterr().out
    rows = summary(out)
    assert (rows["a"]["status"], rows["b"]["status"]) == ("error", "ok")
    assert rows["a"]["error"].startswith("written by another DeepWML process during this run, but its results could "
                                         "not be checked (PermissionError: [Errno 13] Permission denied: ")


def test_batch_overwrite_stopped_part_way_leaves_no_old_report_beside_new_files(scene, batchScript, tmp_path,
                                                                                 monkeypatch, tiny_model):
    """--overwrite with another threshold, the disk full after the new segmentation was written: the earlier
    report (threshold 0.5) stayed beside the new .seg.nrrd (0.3), and a rerun at 0.5 skipped the case as done
    with that segmentation. Now the case's outputs go, and the rerun makes them again."""
    oracle_network(monkeypatch)
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    writeCase(inputs, "a.nii.gz")
    arguments = ["--input-dir", str(inputs), "--output-dir", str(out), "--model", str(tiny_model), "--device", "cpu"]
    assert batchScript.main(arguments) == 0
    real = io.write_image

    def full(image, path, *rest):
        raise DeepWMLError(f"cannot write {path} (No space left on device)")

    monkeypatch.setattr(io, "write_image", full)
    assert batchScript.main(arguments + ["--overwrite", "--threshold", "0.3"]) == 1
    monkeypatch.setattr(io, "write_image", real)
    assert sorted(p.name for p in out.iterdir()) == ["summary.csv"]
    assert batchScript.main(arguments) == 0
    assert summary(out)["a"]["status"] == "ok"
    assert json.loads((out / "a_report.json").read_text())["threshold"] == 0.5


def test_batch_skips_a_label_mask_beside_the_scans_and_refuses_clashing_names_up_front(scene, batchScript, tmp_path,
                                                                                        monkeypatch, tiny_model, capsys):
    """IN holding a labelled case (its FLAIR and its manual mask): the mask failed as 'looks like a label mask'
    and the batch exited 1; it is now skipped, as `deepwml segment` skips it. Two files of one case name
    (a.nii.gz, a.mha) were refused after the first was segmented; now before anything is."""
    oracle_network(monkeypatch)
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    _, truth = writeCase(inputs, "flair.nii.gz")
    sitk.WriteImage(truth, str(inputs / "consensus_mask.nii.gz"))
    arguments = ["--input-dir", str(inputs), "--output-dir", str(out), "--model", str(tiny_model), "--device", "cpu"]
    assert batchScript.main(arguments) == 0
    rows = summary(out)
    assert rows["flair"]["status"] == "ok" and rows["consensus_mask"]["status"] == "skipped"
    assert "looks like a label mask" in rows["consensus_mask"]["error"]
    assert "1/2 cases done (0 failed, 1 skipped)" in capsys.readouterr().out

    clashing, out = tmp_path / "clashing", tmp_path / "out2"
    clashing.mkdir()
    writeCase(clashing, "a.nii.gz")
    writeCase(clashing, "a.mha")
    assert batchScript.main(["--input-dir", str(clashing), "--output-dir", str(out), "--model", str(tiny_model)]) == 1
    assert "2 inputs are both named 'a'" in capsys.readouterr().err
    assert not list(out.glob("a*"))  # nothing segmented


def test_batch_shows_each_cases_steps_and_how_long_the_rest_will_take(scene, batchScript, tmp_path, monkeypatch,
                                                                        tiny_model, capsys):
    """The batch said nothing while a case ran and nothing of how long the folder would take (a folder of 100 scans
    runs for many minutes): it now shows each case's steps and, after each, the time left, as deepwml segment does;
    each warning on its own line, as there."""
    oracle_network(monkeypatch)
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    for name in ("a.nii.gz", "b.nii.gz", "c.nii.gz"):
        writeCase(inputs, name)
    from DeepWMLSlicerLib.CoreLogic import DeepWMLCoreLogic

    statistics = DeepWMLCoreLogic.lesionStatistics
    monkeypatch.setattr(DeepWMLCoreLogic, "lesionStatistics", lambda self, *a, **k: {
        **statistics(self, *a, **k), "warnings": ["first thing to know", "second"]})
    assert batchScript.main(["--input-dir", str(inputs), "--output-dir", str(out), "--model", str(tiny_model),
                             "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("[1/3] a: ") and "networks done" in line for line in lines)
    assert any(line.startswith("[3/3] c: ") and "done" in line for line in lines)
    finished = [line for line in lines if ": ok - " in line]
    assert [line.split(":")[0] for line in finished] == ["a", "b", "c"]
    assert "left for 2 more)" in finished[0] and "left for 1 more)" in finished[1] and "left" not in finished[2]
    assert lines.count("a: warning: first thing to know") == 1 and lines.count("a: warning: second") == 1
    assert summary(out)["a"]["warnings"] == "first thing to know | second"
    assert "3/3 cases done (0 failed, 0 skipped)" in lines[-1]


def test_batch_of_only_label_masks_is_an_error_and_a_segmentation_beside_its_scan_is_skipped(
        scene, batchScript, tmp_path, monkeypatch, tiny_model, capsys):
    """IN holding only masks (the masks' folder given for the scans'): every one was skipped and the batch ended
    exit 0 with nothing segmented; it is now an error, as `deepwml segment` says. A case01.seg.nrrd beside
    case01.nii.gz clashed with it by name, and the whole batch was refused; it is skipped unread."""
    oracle_network(monkeypatch)
    masks, out = tmp_path / "masks", tmp_path / "out"
    masks.mkdir()
    _, truth = writeCase(tmp_path, "flair.nii.gz")
    sitk.WriteImage(truth, str(masks / "case01.nii.gz"))
    arguments = ["--input-dir", str(masks), "--output-dir", str(out), "--model", str(tiny_model), "--device", "cpu"]
    assert batchScript.main(arguments) == 1
    captured = capsys.readouterr()
    assert "the image file found looks like a label mask or segmentation" in captured.err
    assert "0/1 cases done (1 failed, 0 skipped)" in captured.out
    assert summary(out)["case01"]["status"] == "error"
    assert summary(out)["case01"]["seconds"] != ""  # a failed case: the time until it failed, as deepwml segment's

    labelled, out = tmp_path / "labelled", tmp_path / "out2"
    labelled.mkdir()
    _, truth = writeCase(labelled, "case01.nii.gz")
    sitk.WriteImage(truth, str(labelled / "case01.seg.nrrd"))
    assert batchScript.main(["--input-dir", str(labelled), "--output-dir", str(out), *arguments[4:]]) == 0
    assert "1/2 cases done (0 failed, 1 skipped)" in capsys.readouterr().out
    assert (out / "case01_report.json").is_file()


def test_batch_model_takes_a_shipped_model_or_ensemble_name(scene, batchScript, tmp_path, monkeypatch, capsys):
    """As deepwml segment --model: the name of a shipped model or ensemble stands for its file(s); a name that is
    neither is refused before any case, with the names there are."""
    from DeepWMLLib.segment import shipped_models

    oracle_network(monkeypatch)
    inputs = tmp_path / "in"
    inputs.mkdir()
    writeCase(inputs, "a.nii.gz")
    arguments = ["--input-dir", str(inputs), "--device", "cpu", "--no-brain-mask"]
    assert batchScript.main([*arguments, "--output-dir", str(tmp_path / "x"), "--model", "no-such-model"]) == 1
    err = capsys.readouterr().err
    assert "--model no-such-model: no such model file, nor a shipped model or ensemble" in err and "ensemble-v8" in err
    assert batchScript.main([*arguments, "--output-dir", str(tmp_path / "out"), "--model", "unet16-synth-v1"]) == 0
    report = json.loads((tmp_path / "out" / "a_report.json").read_text(encoding="utf-8"))
    assert report["model"] == [Path(next(m["path"] for m in shipped_models() if m["name"] == "unet16-synth-v1")).name]


def test_batch_bf16_where_it_cannot_run_names_its_own_option(scene, batchScript, tmp_path, monkeypatch, tiny_model,
                                                               capsys):
    """The module's words for bf16 on a CPU without it name the panel's Precision, which the batch has not: the batch
    says deepwml segment's, whose --precision the batch has too. It says them before the output folder is made
    (inference.check_runtime: each case refused it, into a summary.csv of failed cases); a case whose runner refuses
    bf16 all the same says them too."""
    from DeepWMLLib import inference

    monkeypatch.setattr(inference, "torch_cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(inference, "_openvino_computes_bf16", lambda core: False)
    inputs = tmp_path / "in"
    inputs.mkdir()
    writeCase(inputs, "a.nii.gz")
    out = tmp_path / "out"
    run = ["--input-dir", str(inputs), "--output-dir", str(out), "--model", str(tiny_model), "--device", "cpu",
           "--no-brain-mask", "--precision", "bf16"]
    capsys.readouterr()
    assert batchScript.main(run) == 1
    assert capsys.readouterr().err == ("segment_batch: error: --precision bf16 needs a CPU with native bf16 (AMX or "
                                       "AVX512-BF16); use fp32 or auto\n")
    assert not out.exists()

    monkeypatch.setattr(inference, "cpu_computes_bf16", lambda backend: True)  # the runner's runtime refuses it

    def noOpenVino(*args, **kwargs):
        raise ImportError("openvino")

    monkeypatch.setattr(inference, "OpenVinoRunner", noOpenVino)
    assert batchScript.main(run) == 1
    # written as text ('--precision), which a spreadsheet would otherwise take for a formula and show as #NAME?
    assert summary(out)["a"]["error"] == "'--precision bf16 needs a CPU with native bf16 (AMX or AVX512-BF16); use " \
                                         "fp32 or auto"


def test_batch_has_deepwml_segments_precision_option_and_its_nan_advice_names_it(scene, batchScript, tmp_path,
                                                                               monkeypatch, tiny_model, precisions_asked):
    """A network that gave NaN probabilities in fp16 (a GPU) failed a batch case with advice to rerun with --device
    cpu, or with deepwml segment --precision fp32: the batch had no precision option. It has deepwml segment's
    --precision now (default auto), which reaches the networks, and the NaN advice is deepwml segment's own."""
    from DeepWMLLib import inference

    asked = precisions_asked
    inputs = tmp_path / "in"
    inputs.mkdir()
    writeCase(inputs, "a.nii.gz")
    arguments = ["--input-dir", str(inputs), "--model", str(tiny_model), "--device", "cpu", "--no-brain-mask"]
    assert batchScript.main([*arguments, "--output-dir", str(tmp_path / "auto")]) == 0
    assert batchScript.main([*arguments, "--output-dir", str(tmp_path / "fp32"), "--precision", "fp32"]) == 0
    assert asked == ["auto"] * 2 + ["fp32"] * 2  # the lesion network, and the brain's (for the checks)

    def nan(slices, runner, *args, ran=None, **kwargs):  # as a network that overflows in fp16 on a GPU
        if ran is not None:
            ran.append("torch fp16")
        return np.full(slices.shape, np.nan, np.float32)

    monkeypatch.setattr(inference, "predict_network_slices", nan)
    out = tmp_path / "nan"
    assert batchScript.main([*arguments, "--output-dir", str(out)]) == 1
    error = summary(out)["a"]["error"]
    assert error == "tiny.pt gave NaN probabilities (running as torch fp16): its result would mark nothing; rerun " \
                    "with --precision fp32, and if that fails too, the model file is at fault"


def stoppedStatus(batchScript, arguments):
    """The batch's exit status, or what it let out of main (an interrupt let out would stop pytest itself)."""
    try:
        return batchScript.main(arguments)
    except KeyboardInterrupt as exc:
        return f"{type(exc).__name__} let out of main"


def test_batch_stopped_part_way_leaves_a_summary_of_the_cases_it_did(scene, batchScript, tmp_path, monkeypatch,
                                                                      tiny_model):
    """summary.csv was written only at the end: a batch stopped in its last case (Ctrl-C, Slicer closed or killed)
    left none, or an earlier run's; the cases done had to be found by their reports. Now it is rewritten after
    every case."""
    oracle_network(monkeypatch)
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    for name in ("a.nii.gz", "b.nii.gz"):
        writeCase(inputs, name)
    out.mkdir()
    (out / "summary.csv").write_text("case,status\nold,ok\n", encoding="utf-8")  # an earlier run's, of other cases
    segmentCase = batchScript.segmentCase
    seen = {}

    def stoppedInB(logic, case, *rest, **options):
        if case == "b":  # the process killed now: what summary.csv says at this moment is what it leaves
            seen.update(summary(out))
            raise KeyboardInterrupt
        return segmentCase(logic, case, *rest, **options)

    monkeypatch.setattr(batchScript, "segmentCase", stoppedInB)
    assert stoppedStatus(batchScript, ["--input-dir", str(inputs), "--output-dir", str(out), "--model",
                                       str(tiny_model), "--device", "cpu"]) == 130
    assert list(seen) == ["a"] and seen["a"]["status"] == "ok" and float(seen["a"]["volume_ml"]) > 0
    assert summary(out) == seen


def test_batch_stopped_says_what_it_kept_and_how_to_go_on_and_exits_as_the_command_line(
        scene, batchScript, tmp_path, monkeypatch, tiny_model, capsys):
    """Ctrl-C or SIGTERM (a scheduler's time limit) let the interrupt out of the batch's main: a traceback, nothing
    said of what summary.csv kept or that the same command goes on, and Slicer's exit status not `deepwml
    segment`'s. Now it says both as segment does, and ends 130 (Ctrl-C) or 143 (SIGTERM), its handler given back."""
    import signal

    oracle_network(monkeypatch)
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    for name in ("a.nii.gz", "b.nii.gz", "c.nii.gz"):
        writeCase(inputs, name)
    segmentCase = batchScript.segmentCase
    arguments = ["--input-dir", str(inputs), "--output-dir", str(out), "--model", str(tiny_model), "--device", "cpu"]
    for stop, status, words in ((lambda: (_ for _ in ()).throw(KeyboardInterrupt), 130, "interrupted"),
                                (lambda: os.kill(os.getpid(), signal.SIGTERM), 143, "stopped by SIGTERM")):
        def stoppedInB(logic, case, *rest, **options):
            if case == "b":
                stop()
                raise AssertionError("not stopped")
            return segmentCase(logic, case, *rest, **options)

        monkeypatch.setattr(batchScript, "segmentCase", stoppedInB)
        handler = signal.getsignal(signal.SIGTERM)
        assert stoppedStatus(batchScript, arguments + ["--overwrite"]) == status
        said = capsys.readouterr()
        assert (f"stopped in case 2/3: {out / 'summary.csv'} lists the 1 before it; run it again without --overwrite "
                "to go on (the cases done are skipped; a case not reached yet whose earlier outputs were made with "
                "other settings is then refused, naming them: give it alone with --overwrite)") in said.out  # as segment's
        assert said.err.rstrip().endswith(f"segment_batch: {words}"), said.err
        assert {case: row["status"] for case, row in summary(out).items()} == {"a": "ok"}
        assert signal.getsignal(signal.SIGTERM) is handler
    monkeypatch.setattr(batchScript, "segmentCase", segmentCase)
    assert batchScript.main(arguments) == 0  # without --overwrite it goes on
    assert {case: row["status"] for case, row in summary(out).items()} == {"a": "skipped", "b": "ok", "c": "ok"}


def test_batch_writes_a_nifti_mask_with_the_inputs_own_qform_and_sform_as_the_command_line(
        scene, batchScript, tmp_path, monkeypatch, tiny_model):
    """A qform (code 2, 10 degrees apart) beside an sform (code 1), as after FSL/SPM alignment: Slicer reads one
    grid, FSL and nibabel another. The batch's mask carries the input's own header geometry, as `deepwml
    segment`'s does, so each reader places it where it places the FLAIR."""
    import math

    import nibabel as nib

    from DeepWMLLib.cli import main as cli

    oracle_network(monkeypatch)
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    flair, _ = make_volume(size=(40, 36, 8), spacing=(0.9, 0.9, 5.0), blobs=((0.5, 0.5, 0.5, 7.0),))
    sform = np.diag([0.9, 0.9, 5.0, 1.0])
    sform[:3, 3] = (-20.0, 15.0, -30.0)
    turn = np.eye(4)
    turn[:3, :3] = rotation(0.0, 0.0, math.radians(10))
    turn[:3, 3] = (10.0, 0.0, 0.0)
    nifti = nib.Nifti1Image(np.transpose(sitk.GetArrayFromImage(flair)).astype(np.int16), None)
    nifti.set_sform(sform, code=1)
    nifti.set_qform(turn @ sform, code=2)
    nib.save(nifti, str(inputs / "a.nii.gz"))
    assert batchScript.main(["--input-dir", str(inputs), "--output-dir", str(out), "--model", str(tiny_model),
                             "--device", "cpu"]) == 0
    assert cli(["segment", str(inputs / "a.nii.gz"), "-o", str(tmp_path / "cli"), "--model", str(tiny_model),
                "--device", "cpu"]) == 0
    given, batch, command = (nib.load(str(p)) for p in (inputs / "a.nii.gz", out / "a_wmh.nii.gz",
                                                         tmp_path / "cli" / "a_wmh.nii.gz"))
    for form in ("get_qform", "get_sform"):
        (got, got_code), (want, want_code) = (getattr(img, form)(coded=True) for img in (batch, given))
        assert got_code == want_code, form
        np.testing.assert_allclose(got, want, atol=1e-6, err_msg=form)
    assert np.asarray(command.dataobj).sum() > 0
    np.testing.assert_array_equal(np.asarray(batch.dataobj), np.asarray(command.dataobj))


def test_batch_summary_that_cannot_be_written_leaves_no_earlier_one_as_this_runs(batchScript, tmp_path, monkeypatch):
    """summary.csv on a full disk: the batch run stopped with the error, and the earlier run's summary stayed there,
    listing other cases as this run's. It is removed, and the error says none is left, as deepwml segment's does."""
    import DeepWMLLib.evaluation

    path = tmp_path / "summary.csv"
    path.write_text("case,status\nearlier,ok\n", encoding="utf-8")

    def diskFull(rows, columns, target):
        raise DeepWMLError(f"cannot write {target} (No space left on device); the disk is full")

    monkeypatch.setattr(DeepWMLLib.evaluation, "write_csv", diskFull)
    with pytest.raises(DeepWMLError, match=r"the disk is full; no summary.csv is left in .* \(neither an earlier run's"):
        batchScript.writeSummary([{"case": "new", "status": "ok"}], path)
    assert not path.exists()


def test_batch_refuses_a_truncated_nifti_scan_as_the_command_line_does(scene, batchScript, tmp_path, monkeypatch,
                                                                      tiny_model):
    """Slicer's reader fills a NIfTI file cut short (a copy interrupted) with zeros and raises nothing: in a batch of
    100 scans, one such copy was listed 'ok - 0.00 ml, 0 lesions' (cut inside its first slice). It fails, saying so,
    as deepwml segment's case does; the other cases still run and nothing of it stays in the scene."""
    oracle_network(monkeypatch)
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    writeCase(inputs, "good.nii.gz")
    for name in ("cut.nii", "cut_gz.nii.gz"):
        writeCase(inputs, name)
        data = (inputs / name).read_bytes()
        (inputs / name).write_bytes(data[:len(data) // 2])
    assert batchScript.main(["--input-dir", str(inputs), "--output-dir", str(out), "--model", str(tiny_model),
                             "--device", "cpu"]) == 1
    rows = summary(out)
    assert rows["good"]["status"] == "ok"
    for case in ("cut", "cut_gz"):
        assert rows[case]["status"] == "error" and "is truncated" in rows[case]["error"], rows[case]
    assert scene.GetNumberOfNodesByClass("vtkMRMLVolumeNode") == 0


def test_batch_formats_each_summary_row_once_however_long_the_batch(scene, batchScript, tmp_path, monkeypatch,
                                                                    tiny_model):
    """summary.csv is rewritten after every case (a batch stopped at any moment leaves the cases it did listed): it
    formatted every row again each time, a case costing more the longer the batch (47 ms a case at 2000 cases, 98 ms
    at 5000). Each row is now formatted once as its case ends, and once more at the end."""
    import DeepWMLLib.evaluation

    oracle_network(monkeypatch)
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    count = 150
    for number in range(count - 1):  # Slicer segmentations: skipped unread, the fastest case a batch can have
        (inputs / f"case{number:03d}.seg.nrrd").write_bytes(b"")
    writeCase(inputs, "scan.nii.gz")
    cells = [0]
    cell = DeepWMLLib.evaluation._cell

    def counted(value):
        cells[0] += 1
        return cell(value)

    monkeypatch.setattr(DeepWMLLib.evaluation, "_cell", counted)
    assert batchScript.main(["--input-dir", str(inputs), "--output-dir", str(out), "--model", str(tiny_model),
                             "--device", "cpu"]) == 0
    rows = summary(out)
    assert len(rows) == count and rows["scan"]["status"] == "ok"
    assert cells[0] <= 3 * count * len(batchScript.SUMMARY_COLUMNS), cells  # was 160 000 (count² / 2 rows)


def test_batch_writes_the_dicom_seg_and_outline_of_a_dicom_input_and_warns_of_another(scene, batchScript, tmp_path,
                                                                                       monkeypatch, tiny_model):
    """--dicom-seg and --dicom-outline as `deepwml segment` has them: for a DICOM series, CASE_wmh_seg.dcm (its
    lesion, read back, the mask file's voxels) and CASE_outline_dicom/, listed in the report; an image file is
    segmented with a warning in its report and summary row, and nothing of the kind written; a rerun with
    --overwrite without them removes the earlier SEG and outline series."""
    from conftest import write_dicom_series
    from DeepWMLLib import segment

    oracle_network(monkeypatch)
    inputs, out = tmp_path / "in", tmp_path / "out"
    flair, _ = make_volume(size=(40, 36, 6), spacing=(0.9, 0.9, 5.0), dtype=sitk.sitkInt16,
                           direction=rotation(0.1, -0.05, 0.2))
    write_dicom_series(inputs / "S", flair, uid="1.2.3.8", description="AX FLAIR", inversion_ms=2500, number=5,
                       extra={"0020|0052": "1.2.3.99", "0010|0010": "Doe^Jane", "0010|0020": "PAT-7"})
    writeCase(inputs, "a.nii.gz")
    base = ["--input-dir", str(inputs), "--output-dir", str(out), "--model", str(tiny_model), "--device", "cpu"]
    assert batchScript.main(base + ["--dicom-seg", "--dicom-outline"]) == 0
    report = json.loads((out / "S_report.json").read_text(encoding="utf-8"))
    assert {"S_wmh_seg.dcm", "S_outline_dicom"} <= set(report["outputs"])
    assert report["dicom_seg"]["file"] == "S_wmh_seg.dcm" and report["dicom_seg"]["series_number"] == 2005
    assert report["dicom_outline"]["images"] == 6 and report["dicom_outline"]["series_number"] == 1005
    mask = io.read_mask(out / "S_wmh.nrrd")
    assert sitk.GetArrayFromImage(mask).any()
    fromSeg = io.read_mask(out / "S_wmh_seg.dcm", reference=mask)  # read back, onto the mask's grid (with or
    np.testing.assert_array_equal(sitk.GetArrayFromImage(fromSeg), sitk.GetArrayFromImage(mask))  # without empty frames)
    assert len(list((out / "S_outline_dicom").glob("IM*.dcm"))) == 6
    assert not any("no DICOM" in w for w in report.get("warnings", []))
    other = json.loads((out / "a_report.json").read_text(encoding="utf-8"))
    assert segment.NO_DICOM_SEG in other["warnings"] and segment.NO_DICOM_OUTLINE in other["warnings"]
    assert "dicom_seg" not in other and not (out / "a_wmh_seg.dcm").exists() and not (out / "a_outline_dicom").exists()
    assert "no DICOM SEG" in summary(out)["a"]["warnings"] and "no DICOM" not in summary(out)["S"]["warnings"]
    assert batchScript.main(base + ["--dicom-seg"]) == 0  # a rerun: skipped, as deepwml segment skips it
    assert {row["status"] for row in summary(out).values()} == {"skipped"}
    assert batchScript.main(base + ["--overwrite"]) == 0  # not asked for now: the earlier SEG and series go
    assert not (out / "S_wmh_seg.dcm").exists() and not (out / "S_outline_dicom").exists()
    assert "S_wmh_seg.dcm" not in json.loads((out / "S_report.json").read_text(encoding="utf-8"))["outputs"]


def test_batch_refuses_a_series_the_seg_or_outline_cannot_be_made_of_before_segmenting_and_goes_on(
        scene, batchScript, tmp_path, monkeypatch, tiny_model):
    """--dicom-seg of a series without a Frame of Reference UID, --dicom-outline of one without a Study Instance
    UID: refused from its headers before the module's logic segments it (after the whole segmentation before), as
    deepwml segment refuses it; the other cases of the batch are still segmented."""
    from conftest import write_dicom_series

    oracle_network(monkeypatch)
    inputs, out = tmp_path / "in", tmp_path / "out"
    flair, _ = make_volume(size=(40, 36, 6), spacing=(0.9, 0.9, 5.0), dtype=sitk.sitkInt16)
    write_dicom_series(inputs / "nofor", flair, uid="1.2.3.8", description="AX FLAIR", inversion_ms=2500,
                       extra={"0020|000d": "1.2.3.1"})
    write_dicom_series(inputs / "nostudy", flair, uid="1.2.3.9", description="AX FLAIR", inversion_ms=2500,
                       extra={"0020|0052": "1.2.3.99", "0020|000d": ""})
    writeCase(inputs, "a.nii.gz")
    segmented = []
    real = batchScript.DeepWMLCoreLogic.segmentVolume

    def segmentVolume(self, volumeNode, *args, **kwargs):
        segmented.append(volumeNode.GetName())
        return real(self, volumeNode, *args, **kwargs)

    monkeypatch.setattr(batchScript.DeepWMLCoreLogic, "segmentVolume", segmentVolume)
    base = ["--input-dir", str(inputs), "--output-dir", str(out), "--model", str(tiny_model), "--device", "cpu"]
    assert batchScript.main(base + ["--dicom-seg", "--dicom-outline"]) == 1
    rows = summary(out)
    assert segmented == ["a"]
    assert rows["a"]["status"] == "ok" and rows["nofor"]["status"] == rows["nostudy"]["status"] == "error"
    assert "no Frame of Reference UID (0020,0052), so a DICOM SEG could not be placed on it" in rows["nofor"]["error"]
    assert "no Study Instance UID, so the outline series cannot join its study" in rows["nostudy"]["error"]
    assert not list(out.glob("nofor*")) and not list(out.glob("nostudy*"))


def test_batch_overwrite_never_deletes_a_users_images_in_the_outline_folder(scene, batchScript, tmp_path,
                                                                           monkeypatch, tiny_model):
    """CASE_outline_dicom/ holding a FLAIR's images under the series' names (IM00001.dcm, ...): --overwrite, with
    --dicom-outline (the series replaced) or without it (the earlier one removed), would delete them as DeepWML's.
    The case is refused before any work, as deepwml segment refuses it, the images and its earlier report kept."""
    import shutil

    from conftest import write_dicom_series

    oracle_network(monkeypatch)
    inputs, out = tmp_path / "in", tmp_path / "out"
    flair, _ = make_volume(size=(40, 36, 6), spacing=(0.9, 0.9, 5.0), dtype=sitk.sitkInt16)
    series = write_dicom_series(inputs / "S", flair, uid="1.2.3.8", description="AX FLAIR", inversion_ms=2500)
    base = ["--input-dir", str(inputs), "--output-dir", str(out), "--model", str(tiny_model), "--device", "cpu"]
    assert batchScript.main(base + ["--dicom-outline"]) == 0
    target = out / "S_outline_dicom"
    theirs = users_images_in(series, target)
    report = (out / "S_report.json").read_bytes()
    for options in (["--dicom-outline", "--overwrite"], ["--overwrite"]):
        assert batchScript.main(base + options) != 0
        assert "holds DICOM images that are not DeepWML's outline series" in summary(out)["S"]["error"]
        assert {p.name: p.read_bytes() for p in target.iterdir()} == theirs
        assert (out / "S_report.json").read_bytes() == report


def test_batch_never_takes_a_users_folder_of_the_outlines_name_for_it_nor_sends_them_to_overwrite(
        scene, batchScript, tmp_path, monkeypatch, tiny_model):
    """A folder CASE_outline_dicom of the user's images in OUT, as deepwml segment has it: with no report there, the
    case was refused as 'an incomplete set of outputs ...; rerun with --overwrite', which refused the folder; beside
    a case done without --dicom-outline (its report not listing the folder), a rerun with it was 'skipped', the
    user's images taken for the outline, none made. Now both say at once that the folder holds images not
    DeepWML's, and leave it and the report as they are; the case's own outline, once added, makes a rerun a skip."""
    import shutil

    from conftest import write_dicom_series

    oracle_network(monkeypatch)
    inputs, out = tmp_path / "in", tmp_path / "out"
    flair, _ = make_volume(size=(40, 36, 6), spacing=(0.9, 0.9, 5.0), dtype=sitk.sitkInt16)
    series = write_dicom_series(inputs / "S", flair, uid="1.2.3.8", description="AX FLAIR", inversion_ms=2500)
    base = ["--input-dir", str(inputs), "--output-dir", str(out), "--model", str(tiny_model), "--device", "cpu"]
    target = out / "S_outline_dicom"
    out.mkdir()
    theirs = users_images_in(series, target)
    assert batchScript.main(base + ["--dicom-outline"]) != 0
    error = summary(out)["S"]["error"]
    assert f"{target} holds DICOM images that are not DeepWML's outline series" in error, error
    assert {p.name: p.read_bytes() for p in target.iterdir()} == theirs and not (out / "S_report.json").exists()
    shutil.rmtree(target)
    assert batchScript.main(base) == 0
    theirs = users_images_in(series, target)
    report = (out / "S_report.json").read_bytes()
    assert batchScript.main(base + ["--dicom-outline"]) != 0
    row = summary(out)["S"]
    assert row["status"] == "error" and "holds DICOM images that are not DeepWML's outline series" in row["error"]
    assert {p.name: p.read_bytes() for p in target.iterdir()} == theirs
    assert (out / "S_report.json").read_bytes() == report
    shutil.rmtree(target)
    assert batchScript.main(base + ["--dicom-outline"]) == 0 and summary(out)["S"]["status"] == "added"
    assert batchScript.main(base + ["--dicom-outline"]) == 0 and summary(out)["S"]["status"] == "skipped"


def test_batch_rerun_adds_the_missing_picture_of_a_case_done_before_from_its_saved_mask(
        scene, batchScript, tmp_path, monkeypatch, tiny_model, capsys):
    """As `deepwml segment` does (segment.add_outputs): a rerun with --qc into the same OUT draws the picture of a
    case done without it from its saved mask, the mask left byte for byte, the report listing it; summary 'added',
    no seconds; the picture a full --qc run draws. A rerun that has every output is skipped."""
    from DeepWMLLib import segment

    oracle_network(monkeypatch)
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    writeCase(inputs, "a.nii.gz")
    base = ["--input-dir", str(inputs), "--output-dir", str(out), "--model", str(tiny_model), "--device", "cpu"]
    assert batchScript.main(base) == 0
    first = summary(out)["a"]
    mask = (out / "a_wmh.nii.gz").read_bytes()
    segmentation = (out / "a.seg.nrrd").read_bytes()
    capsys.readouterr()
    assert batchScript.main(base + ["--qc"]) == 0
    printed = capsys.readouterr().out
    row = summary(out)["a"]
    assert row["status"] == segment.ADDED == "added" and "a_qc.png" in row["error"] and row["seconds"] == ""
    assert [row[key] for key in ("volume_ml", "lesion_count")] == [first[key] for key in ("volume_ml", "lesion_count")]
    assert "0/1 cases done (0 failed, 0 skipped, 1 done before with outputs added)" in printed
    assert (out / "a_qc.png").is_file()
    assert (out / "a_wmh.nii.gz").read_bytes() == mask and (out / "a.seg.nrrd").read_bytes() == segmentation
    report = json.loads((out / "a_report.json").read_text(encoding="utf-8"))
    assert "a_qc.png" in report["outputs"] and report["outputs_added"] == ["a_qc.png"]
    assert report["mask_sha256"] == segment.mask_digest(io.read_mask(out / "a_wmh.nii.gz"))
    full = tmp_path / "full"  # the picture a run with --qc draws of the same mask
    assert batchScript.main(["--input-dir", str(inputs), "--output-dir", str(full), "--model", str(tiny_model),
                             "--device", "cpu", "--qc"]) == 0
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(out / "a_qc.png"))),
                                  sitk.GetArrayFromImage(sitk.ReadImage(str(full / "a_qc.png"))))
    assert batchScript.main(base + ["--qc"]) == 0  # nothing missing now: skipped
    assert summary(out)["a"]["status"] == "skipped"


def test_batch_rerun_refuses_to_add_a_picture_of_an_edited_mask(scene, batchScript, tmp_path, monkeypatch, tiny_model):
    oracle_network(monkeypatch)
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    writeCase(inputs, "a.nii.gz")
    base = ["--input-dir", str(inputs), "--output-dir", str(out), "--model", str(tiny_model), "--device", "cpu"]
    assert batchScript.main(base) == 0
    mask = io.read_mask(out / "a_wmh.nii.gz")
    array = sitk.GetArrayFromImage(mask)
    array[tuple(np.argwhere(array)[0])] = 0  # a lesion voxel removed by hand
    edited = sitk.GetImageFromArray(array)
    edited.CopyInformation(mask)
    sitk.WriteImage(edited, str(out / "a_wmh.nii.gz"))
    report = (out / "a_report.json").read_bytes()
    assert batchScript.main(base + ["--qc"]) == 1
    row = summary(out)["a"]
    assert row["status"] == "error" and "a_wmh.nii.gz was changed since the run that made it" in row["error"]
    assert not (out / "a_qc.png").exists() and (out / "a_report.json").read_bytes() == report


def test_batch_rerun_adds_the_dicom_seg_and_a_picture_with_its_ventricles_and_against_a_reference(
        scene, batchScript, tmp_path, monkeypatch, tiny_model):
    """--dicom-seg added to a DICOM case done without it (its lesion the saved mask's); --qc added to a case of a run
    with a ventricle model (the networks run again for the ventricles it outlines, their mask the saved one) and
    with --reference-dir (filled by agreement, as a full --qc run draws it)."""
    from conftest import tiny_model_file, write_dicom_series
    from DeepWMLLib.qc import VENTRICLE_RGB

    oracle_network(monkeypatch)
    inputs, out = tmp_path / "in", tmp_path / "out"
    flair, _ = make_volume(size=(40, 36, 6), spacing=(0.9, 0.9, 5.0), dtype=sitk.sitkInt16)
    write_dicom_series(inputs / "S", flair, uid="1.2.3.8", description="AX FLAIR", inversion_ms=2500, number=5,
                       extra={"0020|0052": "1.2.3.99"})
    base = ["--input-dir", str(inputs), "--output-dir", str(out), "--model", str(tiny_model), "--device", "cpu"]
    assert batchScript.main(base) == 0
    assert batchScript.main(base + ["--dicom-seg"]) == 0
    assert summary(out)["S"]["status"] == "added"
    mask = io.read_mask(out / "S_wmh.nrrd")
    fromSeg = io.read_mask(out / "S_wmh_seg.dcm", reference=mask)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(fromSeg), sitk.GetArrayFromImage(mask))
    assert json.loads((out / "S_report.json").read_text(encoding="utf-8"))["dicom_seg"]["file"] == "S_wmh_seg.dcm"

    ventricle_model = tiny_model_file(tmp_path / "vent.pt", labels={"0": "background", "1": "lateral_ventricles"})
    images, split = tmp_path / "images", tmp_path / "split"
    images.mkdir()
    writeCase(images, "a.nii.gz", size=(64, 48, 8), blobs=((0.3, 0.5, 0.5, 5.0), (0.9, 0.15, 0.5, 4.0)))
    withVentricles = ["--input-dir", str(images), "--output-dir", str(split), "--model", str(tiny_model), "--device",
                      "cpu", "--ventricle-model", str(ventricle_model)]
    assert batchScript.main(withVentricles) == 0
    assert batchScript.main(withVentricles + ["--qc"]) == 0
    assert summary(split)["a"]["status"] == "added" and "networks were run again" in summary(split)["a"]["error"]
    picture = sitk.GetArrayFromImage(sitk.ReadImage(str(split / "a_qc.png")))
    assert np.all(picture[..., :3] == VENTRICLE_RGB, axis=-1).any()

    one, references, compared, full = tmp_path / "one", tmp_path / "ref", tmp_path / "compared", tmp_path / "full"
    one.mkdir()
    references.mkdir()
    _, truth = writeCase(one, "b.nii.gz")
    sitk.WriteImage(truth, str(references / "b_manual.nii.gz"))
    withReference = ["--model", str(tiny_model), "--device", "cpu", "--reference-dir", str(references)]
    assert batchScript.main(["--input-dir", str(one), "--output-dir", str(compared)] + withReference) == 0
    assert batchScript.main(["--input-dir", str(one), "--output-dir", str(compared), "--qc"] + withReference) == 0
    assert summary(compared)["b"]["status"] == "added" and summary(compared)["b"]["dice"] != ""
    assert batchScript.main(["--input-dir", str(one), "--output-dir", str(full), "--qc"] + withReference) == 0
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(compared / "b_qc.png"))),
                                  sitk.GetArrayFromImage(sitk.ReadImage(str(full / "b_qc.png"))))


def test_batch_rerun_adding_a_picture_compares_with_the_reference_of_the_report_not_a_new_one(
        scene, batchScript, tmp_path, monkeypatch, tiny_model):
    """A rerun adding --qc whose --reference-dir now finds another reference (the folder changed): the picture is
    drawn against the reference the report's comparison (and summary.csv's Dice) was computed with, as the full run
    that made that report would have drawn it, and the row says so (review rev45c: it was drawn against the new
    reference, the picture and the report's figures of two references)."""
    oracle_network(monkeypatch)
    one, first, second, compared, full = (tmp_path / name for name in ("one", "ref1", "ref2", "compared", "full"))
    for folder in (one, first, second):
        folder.mkdir()
    _, truth = writeCase(one, "b.nii.gz")
    sitk.WriteImage(truth, str(first / "b_manual.nii.gz"))
    array = sitk.GetArrayFromImage(truth)
    array[:, :, : array.shape[2] // 2] = 0  # another rater's: the left half's lesions not marked
    assert array.any() and not np.array_equal(array, sitk.GetArrayFromImage(truth))
    other = sitk.GetImageFromArray(array)
    other.CopyInformation(truth)
    sitk.WriteImage(other, str(second / "b_manual.nii.gz"))
    run = ["--input-dir", str(one), "--model", str(tiny_model), "--device", "cpu"]
    assert batchScript.main(run + ["--output-dir", str(compared), "--reference-dir", str(first)]) == 0
    dice = summary(compared)["b"]["dice"]
    assert batchScript.main(run + ["--output-dir", str(compared), "--reference-dir", str(second), "--qc"]) == 0
    row = summary(compared)["b"]
    assert row["status"] == "added" and row["dice"] == dice and str(first / "b_manual.nii.gz") in row["error"]
    assert batchScript.main(run + ["--output-dir", str(full), "--reference-dir", str(first), "--qc"]) == 0
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(compared / "b_qc.png"))),
                                  sitk.GetArrayFromImage(sitk.ReadImage(str(full / "b_qc.png"))))


def test_batch_refusing_an_option_leaves_no_output_folder(scene, batchScript, tmp_path, capsys):
    """A model file of another kind, a missing one, or --device cuda where no GPU is (dev46): refused before the output
    folder is made. It was made first, and left empty (a model) or holding a summary.csv of failed cases (the device,
    each case refused)."""
    import torch

    inputs = tmp_path / "in"
    inputs.mkdir()
    writeCase(inputs, "a.nii.gz")
    vent = tiny_model_file(tmp_path / "vent.pt", labels={"0": "background", "1": "lateral_ventricles"})
    refusals = [(["--model", str(vent)], "is a ventricle model, not a WMH model"),
                (["--model", str(tmp_path / "nope.pt")], "does not exist")]
    if not torch.cuda.is_available():
        refusals.append((["--model", str(tiny_model_file(tmp_path / "wmh.pt")), "--device", "cuda"], "no CUDA GPU"))
    for number, (options, words) in enumerate(refusals):
        out = tmp_path / f"out{number}"
        assert batchScript.main(["--input-dir", str(inputs), "--output-dir", str(out), *options]) == 1
        assert words in capsys.readouterr().err
        assert not out.exists(), options


def test_batch_report_of_a_dicom_series_is_the_command_lines_field_by_field(scene, batchScript, tmp_path, monkeypatch,
                                                                            tiny_model):
    """A DICOM series numbered from the top down (Instance Number 60, 50, ...): the batch's report gives each slice
    its `dicom_instance` and each lesion its `dicom_instance_range`, the image numbers a radiologist finds the slices
    by in PACS, as `deepwml segment`'s does, and its QC picture's tiles are numbered so too (the same PNG). Every
    other field is the command line's, but for what differs by nature: the Slicer nodes' names (`segmentation`,
    `volume`), `seconds`, the new UIDs of the SEG and the outline series, and the lesions' probabilities, which
    the module does not keep (its lesion table is measured from the segment as it stands)."""
    from conftest import write_dicom_series
    from DeepWMLLib.cli import main as cli

    def fields(value, name=""):
        if isinstance(value, dict):
            return {k: v for key, item in value.items() for k, v in fields(item, f"{name}.{key}" if name else key).items()}
        if isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
            return {k: v for i, item in enumerate(value) for k, v in fields(item, f"{name}[{i}]").items()}
        return {name: value}

    oracle_network(monkeypatch)
    inputs, out = tmp_path / "in", tmp_path / "out"
    flair, _ = make_volume(size=(40, 36, 6), spacing=(0.9, 0.9, 5.0), dtype=sitk.sitkInt16,
                           direction=rotation(0.1, -0.05, 0.2))
    write_dicom_series(inputs / "S", flair, uid="1.2.3.8", description="AX FLAIR", inversion_ms=2500, number=5,
                       instance_numbers=[60 - 10 * k for k in range(6)],
                       extra={"0020|0052": "1.2.3.99", "0010|0010": "Doe^Jane", "0018|0050": "3"})
    options = ["--model", str(tiny_model), "--device", "cpu", "--qc", "--dicom-seg", "--dicom-outline"]
    assert batchScript.main(["--input-dir", str(inputs), "--output-dir", str(out)] + options) == 0
    assert cli(["segment", str(inputs), "-o", str(tmp_path / "cli")] + options) == 0
    report = json.loads((out / "S_report.json").read_text(encoding="utf-8"))
    cliReport = json.loads((tmp_path / "cli" / "S_report.json").read_text(encoding="utf-8"))
    assert [row["dicom_instance"] for row in report["slices"]] == [60 - 10 * k for k in range(6)]
    assert report["lesions"] and all(lesion["dicom_instance_range"] == [60 - 10 * k for k in lesion["slice_range"]]
                                     for lesion in report["lesions"])
    batch, command = fields(report), fields(cliReport)
    natural = ("segmentation", "volume", "seconds", "dicom_seg.series_uid", "dicom_seg.sop_instance_uid",
               "dicom_outline.series_uid")
    differing = {name for name in set(batch) | set(command) if batch.get(name, "absent") != command.get(name, "absent")}
    assert {name for name in differing
            if name not in natural and not name.endswith(("].mean_probability", "].max_probability"))} == set()
    assert (out / "S_qc.png").read_bytes() == (tmp_path / "cli" / "S_qc.png").read_bytes()


def test_batch_overwrite_removes_what_the_earlier_report_lists_and_nothing_else(scene, batchScript, tmp_path,
                                                                                monkeypatch, tiny_model):
    """--overwrite follows `deepwml segment`'s rule, by its code (segment.remove_earlier_outputs): the earlier run's
    outputs its report lists that this run will not write go before anything new is written. The batch removed
    only a picture, a SEG or an outline series, whether listed or not: a probability map and a mask in another
    format that `deepwml segment` had written stayed beside the new result (a_wmh.mha, 0.5, beside the batch's
    a_wmh.nii.gz, 0.3), while a picture of the user's own named a_qc.png, which no report lists, was deleted."""
    from DeepWMLLib.cli import main as cli

    oracle_network(monkeypatch)
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    writeCase(inputs, "a.nii.gz")
    writeCase(inputs, "b.nii.gz")
    assert cli(["segment", str(inputs / "a.nii.gz"), "-o", str(out), "--model", str(tiny_model), "--device", "cpu",
                "--save-probabilities", "--output-format", "mha"]) == 0
    assert {"a_prob.mha", "a_wmh.mha"} <= set(json.loads((out / "a_report.json").read_text())["outputs"])
    (out / "b_qc.png").write_bytes(b"the user's own picture")  # no report of b lists it (there is none)
    (out / "notes.txt").write_text("mine")
    arguments = ["--input-dir", str(inputs), "--output-dir", str(out), "--model", str(tiny_model), "--device", "cpu",
                 "--overwrite", "--threshold", "0.3"]
    assert batchScript.main(arguments) == 0
    assert {row["status"] for row in summary(out).values()} == {"ok"}
    assert not (out / "a_prob.mha").exists() and not (out / "a_wmh.mha").exists()
    assert (out / "b_qc.png").read_bytes() == b"the user's own picture" and (out / "notes.txt").read_text() == "mine"
    report = json.loads((out / "a_report.json").read_text())
    assert report["threshold"] == 0.3 and sorted(report["outputs"]) == ["a.seg.nrrd", "a_report.json", "a_wmh.nii.gz"]
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("a")) == sorted(report["outputs"])


def test_batch_killed_before_a_cases_report_is_refused_then_overwrite_removes_its_files(scene, batchScript, tmp_path,
                                                                                        monkeypatch):
    """The batch killed outright with --qc after a case's images, before its report: --overwrite without --qc kept the
    picture (no report listed it) and a later --qc run skipped the case, counting it as made. Now the case's journal
    lists it: refused as a run stopped part way, removed by --overwrite, made again by the --qc run."""
    import contextlib

    from DeepWMLLib import segment

    oracle_network(monkeypatch)
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    writeCase(inputs, "a.nii.gz")
    arguments = ["--input-dir", str(inputs), "--output-dir", str(out), "--model", str(tiny_model_file(tmp_path / "t.pt")),
                 "--device", "cpu"]
    real = io.write_atomically

    def killed(path, how):  # the process dies as it is about to write the report: nothing after it runs
        if Path(path).name == "a_report.json":
            raise DeepWMLError("killed")
        return real(path, how)

    with monkeypatch.context() as patched:
        patched.setattr(io, "write_atomically", killed)
        patched.setattr(segment, "whole_or_none", lambda paths: contextlib.nullcontext())
        batchScript.main(arguments + ["--qc"])
    assert (out / "a_qc.png").exists() and not (out / "a_report.json").exists()
    assert batchScript.main(arguments) == 1
    said = summary(out)["a"]["error"]
    assert batchScript.main(arguments + ["--overwrite"]) == 0
    assert not (out / "a_qc.png").exists()
    assert "stopped part way" in said and "a_qc.png" in said, said
    assert not [p for p in out.iterdir() if p.name.endswith(io.JOURNAL_SUFFIX)]
    assert batchScript.main(arguments + ["--qc"]) == 0
    assert summary(out)["a"]["status"] == "added" and (out / "a_qc.png").exists()
