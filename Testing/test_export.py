"""`deepwml export FLAIR MASK -o OUTDIR`: a mask corrected by hand (or a rater's) made into the report, DICOM SEG,
outline series and QC picture that `deepwml segment` makes of its own mask (DeepWMLLib/export.py)."""

from __future__ import annotations

import json
import pathlib
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from DeepWMLLib import evaluation, io
from DeepWMLLib.cli import main
from DeepWMLLib.report import lesion_report
from DeepWMLLib.segment import mask_digest

from conftest import REPO, users_images_in, write_dicom_series
from test_dicom_seg import _dciodvfy, phantom, source_series

SAMPLE = REPO / "Resources" / "Sample" / "sample_flair.nii.gz"
VENTRICLES = REPO / "Resources" / "Models" / "deepwml_vent8_synth_v1.pt"

pydicom = pytest.importorskip("pydicom")


def edited_mask(folder, path):
    """A mask of the DICOM series in `folder` as a user edited it: DeepWML's (the bright voxels) with a lesion
    removed (the corner voxel) and one drawn (a block on the empty slice 2), saved as NIfTI."""
    flair = io.read_image(folder)
    array = (sitk.GetArrayFromImage(flair) >= 600).astype(np.uint8)
    array[0, 0, -1] = 0
    array[2, 15:18, 20:24] = 1
    mask = sitk.GetImageFromArray(array)
    mask.CopyInformation(flair)
    sitk.WriteImage(mask, str(path))
    return array


def test_export_dicom_seg_of_an_edited_mask(tmp_path):
    folder = source_series(tmp_path / "flair")
    array = edited_mask(folder, tmp_path / "edited.nii.gz")
    out = tmp_path / "out"
    assert main(["export", str(folder), str(tmp_path / "edited.nii.gz"), "-o", str(out), "--case", "p1",
                 "--dicom-seg", "--dicom-outline", "--qc"]) == 0
    seg = out / "p1_wmh_seg.dcm"
    assert seg.is_file() and (out / "p1_qc.png").is_file() and (out / "p1_outline_dicom").is_dir()
    flair = io.read_image(folder)
    back = io.read_mask(seg, flair, "the FLAIR")  # the SEG's frames read back on the FLAIR's grid: the mask
    assert np.array_equal(sitk.GetArrayFromImage(back), array)
    assert np.array_equal(sitk.GetArrayFromImage(io.read_dicom_seg(seg)) > 0, array > 0)
    data = pydicom.dcmread(seg)
    segment = data.SegmentSequence[0]
    assert segment.SegmentAlgorithmType == "SEMIAUTOMATIC" and segment.SegmentAlgorithmName == "DeepWML"
    assert data.PatientName == "Doe^Jane" and data.StudyInstanceUID == "1.2.3.4"
    report = json.loads((out / "p1_report.json").read_text())
    assert report["source"] == "export" and report["algorithm_type"] == "SEMIAUTOMATIC"
    assert report["mask"] == str(tmp_path / "edited.nii.gz") and report["model"] is None
    assert report["mask_sha256"] == mask_digest(back)
    assert report["location"] is None and "ventricle network" in report["location_why"]
    assert report["warnings"] == []
    assert sorted(report["outputs"]) == ["p1_outline_dicom", "p1_qc.png", "p1_report.json", "p1_wmh_seg.dcm"]
    # the figures: what segment computes for that mask, and the volume deepwml evaluate reads of it
    expected = lesion_report(back)
    for key in ("volume_ml", "lesion_count", "slices", "lesions"):
        if key in ("slices", "lesions"):
            for row, want in zip(report[key], expected[key]):
                assert {k: v for k, v in row.items() if not k.startswith("dicom_instance")} == want
        else:
            assert report[key] == expected[key]
    voxel_ml = np.prod(flair.GetSpacing()) / 1000
    assert report["volume_ml"] == pytest.approx(array.sum() * voxel_ml)
    case = evaluation.evaluate_case(back, back)
    assert report["volume_ml"] == pytest.approx(case["reference_volume_ml"], abs=1e-6)
    assert report["lesion_count"] == case["n_reference_lesions"]
    assert report["slices"][2]["dicom_instance"] == 3 and report["slices"][2]["lv_group"] is not None


def test_export_of_deepwmls_own_seg_of_an_unevenly_spaced_series(tmp_path):
    """The FLAIR's slices unevenly spaced (read on their mean step, warned of), the mask DeepWML's own SEG of it
    (its frames at their source slices' own positions): export reads it onto the FLAIR, each frame on its source
    image's slice, and writes the same mask as its SEG. It was refused as frames between slices."""
    from conftest import stepped_positions, write_dicom_series
    from test_dicom_seg import PATIENT, make_seg

    image = phantom(spacing=(0.7, 0.9, 5.0))
    folder = write_dicom_series(tmp_path / "flair", image, uid="1.2.3.4.5", description="AX T2 FLAIR", number=7,
                                extra=PATIENT, positions=stepped_positions(image, [5.0, 5.6, 4.4, 5.0, 5.8, 4.2]))
    _, flair = make_seg(folder, tmp_path / "mask_seg.dcm")
    array = (sitk.GetArrayFromImage(flair) >= 600).astype(np.uint8)
    out = tmp_path / "out"
    assert main(["export", str(folder), str(tmp_path / "mask_seg.dcm"), "-o", str(out), "--case", "p1",
                 "--dicom-seg"]) == 0
    assert np.array_equal(sitk.GetArrayFromImage(io.read_mask(out / "p1_wmh_seg.dcm", flair)), array)
    report = json.loads((out / "p1_report.json").read_text())
    assert report["volume_ml"] == pytest.approx(array.sum() * np.prod(flair.GetSpacing()) / 1000)


@pytest.mark.parametrize("kind", ["MANUAL", "AUTOMATIC"])
def test_export_algorithm_type(tmp_path, kind):
    folder = source_series(tmp_path / "flair")
    edited_mask(folder, tmp_path / "rater.nrrd")
    out = tmp_path / "out"
    assert main(["export", str(folder), str(tmp_path / "rater.nrrd"), "-o", str(out), "--dicom-seg",
                 "--algorithm-type", kind]) == 0
    [seg] = out.glob("*_wmh_seg.dcm")
    segment = pydicom.dcmread(seg).SegmentSequence[0]
    assert segment.SegmentAlgorithmType == kind
    # Segment Algorithm Name: required unless MANUAL (PS3.3 C.8.20.2)
    assert ("SegmentAlgorithmName" in segment) == (kind != "MANUAL")
    hd = pytest.importorskip("highdicom")
    read = hd.seg.segread(seg)  # highdicom reads it as a SEG of that algorithm type
    assert read.get_segment_description(1).algorithm_type.value == kind


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) is not installed")
def test_dciodvfy_finds_no_error_in_an_exported_seg(tmp_path):
    """The standard's validator finds no error in an export's SEG of each algorithm type (MANUAL: no Segment
    Algorithm Name, which the others require)."""
    folder = source_series(tmp_path / "flair")
    edited_mask(folder, tmp_path / "rater.nrrd")
    for kind, creator in (("MANUAL", None), ("SEMIAUTOMATIC", None), ("MANUAL", "Doe^Jane^M^Dr^PhD"),
                          ("SEMIAUTOMATIC", "Müller^Jürgen"),
                          ("MANUAL", "Yamada^Tarou=山田^太郎=やまだ^たろう"),
                          ("MANUAL", "山" * 21)):  # at most 64 bytes of UTF-8 in all, as dciodvfy counts them
        out = tmp_path / f"{kind}{len(creator or '')}"
        assert main(["export", str(folder), str(tmp_path / "rater.nrrd"), "-o", str(out), "--dicom-seg",
                     "--algorithm-type", kind] + (["--creator", creator] if creator else [])) == 0
        [seg] = out.glob("*_wmh_seg.dcm")
        assert _dciodvfy(seg) == [], (kind, creator)


def test_export_names_the_creator_and_makes_up_none(tmp_path):
    """--creator names who edited or drew the mask: the SEG's Content Creator's Name (a PN highdicom reads), the
    outline series' Derivation Description (a Secondary Capture has no Content Creator's Name) and the report's
    `creator`. Without it, SEMIAUTOMATIC and MANUAL write that Type 2 attribute empty: no person made up (it was
    "DeepWML^", a person named DeepWML, for SEMIAUTOMATIC)."""
    folder = source_series(tmp_path / "flair")
    edited_mask(folder, tmp_path / "edited.nii.gz")
    hd = pytest.importorskip("highdicom")
    for kind in ("SEMIAUTOMATIC", "MANUAL"):
        out = tmp_path / kind
        assert main(["export", str(folder), str(tmp_path / "edited.nii.gz"), "-o", str(out), "--case", "p",
                     "--dicom-seg", "--algorithm-type", kind]) == 0
        data = pydicom.dcmread(out / "p_wmh_seg.dcm")
        assert "ContentCreatorName" in data and data.ContentCreatorName == "", kind  # Type 2: present, empty
        assert json.loads((out / "p_report.json").read_text())["creator"] is None
    out = tmp_path / "named"
    assert main(["export", str(folder), str(tmp_path / "edited.nii.gz"), "-o", str(out), "--case", "p",
                 "--dicom-seg", "--dicom-outline", "--creator", " Doe^Jane "]) == 0
    data = pydicom.dcmread(out / "p_wmh_seg.dcm")
    assert data.ContentCreatorName == "Doe^Jane"
    assert (data.ContentCreatorName.family_name, data.ContentCreatorName.given_name) == ("Doe", "Jane")
    assert str(hd.seg.segread(out / "p_wmh_seg.dcm").ContentCreatorName) == "Doe^Jane"
    assert data.SegmentSequence[0].SegmentAlgorithmName == "DeepWML"
    assert json.loads((out / "p_report.json").read_text())["creator"] == "Doe^Jane"
    image = pydicom.dcmread(sorted((out / "p_outline_dicom").glob("*.dcm"))[0])
    assert "by Doe^Jane" in image.DerivationDescription and "ContentCreatorName" not in image
    # AUTOMATIC (DeepWML's mask unchanged), as segment writes it: no person either
    assert main(["export", str(folder), str(tmp_path / "edited.nii.gz"), "-o", str(tmp_path / "auto"), "--case",
                 "p", "--dicom-seg", "--algorithm-type", "AUTOMATIC"]) == 0
    data = pydicom.dcmread(tmp_path / "auto" / "p_wmh_seg.dcm")
    assert "ContentCreatorName" in data and data.ContentCreatorName == ""


@pytest.mark.parametrize("name, said", [
    ("A^B^C^D^E^F", "at most 5"), ("Doe\\Jane", "backslash"), ("Doe^Jane\n", "control character"),
    ("^^", "names no one"), ("D" * 65, "at most 64"), ("a=b=c=d", "at most 3"), ("Doe\x00", "control character"),
    ("山" * 22, "at most 64"), ("M\udcfcller^J", "not UTF-8"), ("Doe\u2028Jane", "line separator")])
def test_export_refuses_a_creator_that_is_no_person_name(tmp_path, capsys, name, said):
    folder = source_series(tmp_path / "flair")
    edited_mask(folder, tmp_path / "edited.nii.gz")
    assert main(["export", str(folder), str(tmp_path / "edited.nii.gz"), "-o", str(tmp_path / "out"),
                 "--dicom-seg", "--creator", name]) == 2
    error = capsys.readouterr().err
    assert said in error and "--creator" in error and len(error.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_person_name_is_what_validators_and_readers_take():
    """A Person Name holds at most 64 bytes of UTF-8 in all, as dciodvfy counts them (60 CJK characters, 180 bytes,
    were taken and written: "Length invalid for this VR = 180, expected <= 64"; so were 40 letters=40 letters, 81
    bytes, the standard's 64 characters in each component group); bytes that are not UTF-8
    (a name typed in another encoding, decoded by Python as lone surrogates) are refused where they crashed the
    export ("internal error: TypeError" writing the outline); trailing empty components and groups are left out, as
    pydicom reads them (the report said "Doe^Jane=" where the SEG read "Doe^Jane")."""
    from DeepWMLLib.dicom_seg import person_name

    assert person_name("山" * 21) == "山" * 21  # 63 bytes
    assert person_name("Yamada^Tarou=山田^太郎=やまだ^たろう") == "Yamada^Tarou=山田^太郎=やまだ^たろう"
    assert person_name("=山田^太郎") == "=山田^太郎"  # an empty alphabetic group before another: kept
    for given in ("Doe^Jane=", "Doe^Jane==", "Doe^Jane^^", " Doe^Jane^^= "):
        assert person_name(given) == "Doe^Jane", given
    for refused in ("山" * 22, "Doe=" + "é" * 31, "D" * 40 + "=" + "E" * 40, "Doe\udcff", "Doe\u2029Jane"):
        with pytest.raises(ValueError):
            person_name(refused)


def test_export_writes_the_creator_as_pydicom_reads_it_back(tmp_path):
    folder = source_series(tmp_path / "flair")
    edited_mask(folder, tmp_path / "edited.nii.gz")
    out = tmp_path / "out"
    assert main(["export", str(folder), str(tmp_path / "edited.nii.gz"), "-o", str(out), "--case", "p",
                 "--dicom-seg", "--creator", "Müller^Jürgen^="]) == 0
    written = pydicom.dcmread(out / "p_wmh_seg.dcm").ContentCreatorName
    assert str(written) == json.loads((out / "p_report.json").read_text())["creator"] == "Müller^Jürgen"


def test_export_refuses_a_mask_on_another_grid(tmp_path, capsys):
    folder = source_series(tmp_path / "flair")
    other = phantom(spacing=(0.7, 0.9, 3.0))  # the same size, other slices
    sitk.WriteImage(sitk.Cast(other >= 600, sitk.sitkUInt8), str(tmp_path / "other.nii.gz"))
    assert main(["export", str(folder), str(tmp_path / "other.nii.gz"), "-o", str(tmp_path / "out"),
                 "--dicom-seg"]) == 1
    error = capsys.readouterr().err
    assert "different voxel grids" in error
    # the FLAIR is the grid the outputs lie on: resampling it onto the mask (the two-mask advice) is no answer
    assert "resample one onto the other" not in error
    assert "was it drawn on another series or visit? Give that scan, or put the mask onto the FLAIR's grid" in error
    assert not list((tmp_path / "out").glob("*")) if (tmp_path / "out").exists() else True


def test_export_pads_a_mask_saved_cropped(tmp_path):
    folder = source_series(tmp_path / "flair")
    array = edited_mask(folder, tmp_path / "edited.nii.gz")
    full = sitk.ReadImage(str(tmp_path / "edited.nii.gz"))
    sitk.WriteImage(full[2:30, 1:25, :], str(tmp_path / "cropped.nii.gz"))  # Slicer's 'crop to minimum extent'
    out = tmp_path / "out"
    assert main(["export", str(folder), str(tmp_path / "cropped.nii.gz"), "-o", str(out), "--case", "c"]) == 0
    report = json.loads((out / "c_report.json").read_text())
    assert report["volume_ml"] == pytest.approx(array.sum() * np.prod(full.GetSpacing()) / 1000)


def test_export_refuses_existing_outputs_without_overwrite(tmp_path, capsys):
    folder = source_series(tmp_path / "flair")
    edited_mask(folder, tmp_path / "edited.nii.gz")
    out = tmp_path / "out"
    command = ["export", str(folder), str(tmp_path / "edited.nii.gz"), "-o", str(out), "--case", "p1", "--dicom-seg"]
    assert main(command) == 0
    before = (out / "p1_wmh_seg.dcm").read_bytes()
    capsys.readouterr()
    assert main(command) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "p1_wmh_seg.dcm").read_bytes() == before
    assert main([*command, "--overwrite", "--qc"]) == 0
    assert (out / "p1_qc.png").is_file()
    assert (out / "p1_wmh_seg.dcm").read_bytes() != before  # a new SEG (new UIDs)
    assert main([*command[:-1], "--overwrite"]) == 0  # without --dicom-seg and --qc: the earlier ones go
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["p1_report.json"]


def test_export_refuses_a_segment_run_outdir(tmp_path, capsys):
    folder = source_series(tmp_path / "flair")
    edited_mask(folder, tmp_path / "edited.nii.gz")
    out = tmp_path / "out"
    out.mkdir()
    (out / "p1_report.json").write_text(json.dumps({"case": "p1", "model": ["m"], "volume_ml": 1.0}))
    assert main(["export", str(folder), str(tmp_path / "edited.nii.gz"), "-o", str(out), "--case", "p1",
                 "--overwrite"]) == 1
    assert "deepwml segment wrote" in capsys.readouterr().err
    assert json.loads((out / "p1_report.json").read_text())["model"] == ["m"]


def test_export_non_dicom_flair_with_dicom_seg_warns(tmp_path, capsys):
    image = phantom()
    sitk.WriteImage(image, str(tmp_path / "flair.nii.gz"))
    sitk.WriteImage(sitk.Cast(image >= 600, sitk.sitkUInt8), str(tmp_path / "mask.nii.gz"))
    out = tmp_path / "out"
    assert main(["export", str(tmp_path / "flair.nii.gz"), str(tmp_path / "mask.nii.gz"), "-o", str(out),
                 "--dicom-seg"]) == 0
    assert "warning: no DICOM SEG: the input is not DICOM" in capsys.readouterr().err
    report = json.loads((out / "flair_report.json").read_text())
    assert any(w.startswith("no DICOM SEG") for w in report["warnings"])
    assert not list(out.glob("*.dcm")) and report["outputs"] == ["flair_report.json"]


def test_export_of_a_dicom_seg_mask(tmp_path, capsys):
    """A rater's SEG from PACS given as MASK: its own figures, and a SEG of it written again (MANUAL) that reads
    back the same; the SEG given is never written over."""
    folder = source_series(tmp_path / "flair")
    array = edited_mask(folder, tmp_path / "edited.nii.gz")
    assert main(["export", str(folder), str(tmp_path / "edited.nii.gz"), "-o", str(tmp_path / "a"), "--case", "p1",
                 "--dicom-seg"]) == 0
    rater = tmp_path / "a" / "p1_wmh_seg.dcm"
    assert main(["export", str(folder), str(rater), "-o", str(tmp_path / "b"), "--case", "p1", "--dicom-seg",
                 "--algorithm-type", "MANUAL"]) == 0
    first, second = (json.loads((tmp_path / name / "p1_report.json").read_text()) for name in "ab")
    assert second["volume_ml"] == first["volume_ml"] and second["lesion_count"] == first["lesion_count"]
    assert second["mask_sha256"] == first["mask_sha256"]  # the same voxels
    back = io.read_mask(tmp_path / "b" / "p1_wmh_seg.dcm", io.read_image(folder), "the FLAIR")
    assert np.array_equal(sitk.GetArrayFromImage(back), array)
    capsys.readouterr()
    before = rater.read_bytes()
    assert main(["export", str(folder), str(rater), "-o", str(tmp_path / "a"), "--case", "p1", "--dicom-seg",
                 "--overwrite"]) == 1
    assert "is one of the scans given" in capsys.readouterr().err and rater.read_bytes() == before


def test_export_case_name_must_be_a_file_name(tmp_path, capsys):
    image = phantom()
    sitk.WriteImage(image, str(tmp_path / "flair.nii.gz"))
    sitk.WriteImage(sitk.Cast(image >= 600, sitk.sitkUInt8), str(tmp_path / "mask.nii.gz"))
    assert main(["export", str(tmp_path / "flair.nii.gz"), str(tmp_path / "mask.nii.gz"), "-o", str(tmp_path / "out"),
                 "--case", "../up"]) == 2
    assert "is no file name" in capsys.readouterr().err and not (tmp_path / "up_report.json").exists()


def test_export_leaves_out_the_ignore_label(tmp_path, capsys):
    """A rater's mask of the mask conventions (1 lesion, 2 ignore: MICCAI's other pathology, as deepwml evaluate
    reads a reference): label 2 is no WMH, so neither in the report's figures nor in the SEG (review rev45c: every
    non-zero voxel was taken, the ignored voxels exported as lesion)."""
    folder = source_series(tmp_path / "flair")
    array = edited_mask(folder, tmp_path / "edited.nii.gz")
    labelled = array.copy()
    labelled[4, 2:5, 2:5] = 2  # other pathology, apart from the lesions
    assert not array[4, 2:5, 2:5].any()
    flair = io.read_image(folder)
    mask = sitk.GetImageFromArray(labelled)
    mask.CopyInformation(flair)
    sitk.WriteImage(mask, str(tmp_path / "rater.nii.gz"))
    out = tmp_path / "out"
    assert main(["export", str(folder), str(tmp_path / "rater.nii.gz"), "-o", str(out), "--case", "r",
                 "--dicom-seg", "--algorithm-type", "MANUAL"]) == 0
    report = json.loads((out / "r_report.json").read_text())
    assert report["volume_ml"] == pytest.approx(array.sum() * np.prod(flair.GetSpacing()) / 1000)
    back = io.read_mask(out / "r_wmh_seg.dcm", flair, "the FLAIR")
    assert np.array_equal(sitk.GetArrayFromImage(back), array)
    assert any("label 2 (ignore" in w and "9 voxels" in w for w in report["warnings"])
    assert capsys.readouterr().err.count("label 2 (ignore") == 1  # said once
    # a two-valued mask whose lesion value is 2 (Slicer's label after a segment was deleted) is still all lesion
    sitk.WriteImage(sitk.Cast(sitk.ReadImage(str(tmp_path / "edited.nii.gz")) * 2, sitk.sitkUInt8),
                    str(tmp_path / "twos.nii.gz"))
    assert main(["export", str(folder), str(tmp_path / "twos.nii.gz"), "-o", str(out), "--case", "t"]) == 0
    assert json.loads((out / "t_report.json").read_text())["volume_ml"] == report["volume_ml"]


def test_export_into_a_segment_outdir_is_refused_without_advising_overwrite(tmp_path, capsys):
    """Without --overwrite, an OUTDIR holding segment's outputs of the case is refused as it is with it (review
    rev45c: the first refusal advised --overwrite, which was then refused too)."""
    folder = source_series(tmp_path / "flair")
    edited_mask(folder, tmp_path / "edited.nii.gz")
    out = tmp_path / "out"
    out.mkdir()
    (out / "p1_report.json").write_text(json.dumps({"case": "p1", "model": ["m"], "volume_ml": 1.0}))
    assert main(["export", str(folder), str(tmp_path / "edited.nii.gz"), "-o", str(out), "--case", "p1"]) == 1
    error = capsys.readouterr().err
    assert "deepwml segment wrote" in error and "rerun with --overwrite" not in error


def test_a_change_segmentation_exported_says_in_its_report_which_calls_were_left_out(tmp_path, capsys):
    """deepwml change's CASE_change.seg.nrrd given as MASK is read as the follow-up's lesions, its gone calls left out:
    that warning was only logged (on the console, not in the export's report); now it is among the report's warnings
    and said once."""
    from DeepWMLLib import change

    folder = source_series(tmp_path / "flair")
    flair = io.read_image(folder)
    labels = np.zeros(sitk.GetArrayViewFromImage(flair).shape, np.uint8)
    labels[1, 2:5, 3:6], labels[3, 8:10, 1:12] = 2, 5  # a new lesion, a gone one
    image = sitk.GetImageFromArray(labels)
    image.CopyInformation(flair)
    io.write_label_segmentation(image, tmp_path / "c_change.seg.nrrd",
                                [(value, name, change.COLOURS[value]) for value, name in change.LABELS.items()])
    out = tmp_path / "out"
    assert main(["export", str(folder), str(tmp_path / "c_change.seg.nrrd"), "-o", str(out), "--case", "c"]) == 0
    report = json.loads((out / "c_report.json").read_text())
    left = [w for w in report["warnings"] if "gone, small gone left out" in w]
    assert len(left) == 1, report["warnings"]
    assert report["volume_ml"] == pytest.approx(9 * np.prod(flair.GetSpacing()) / 1000)  # the new lesion alone
    assert capsys.readouterr().err.count("gone, small gone left out") == 1


def test_export_of_segments_own_mask_gives_segments_periventricular_deep_split(tmp_path):
    """The split is made as segment makes it (the ventricle and brain networks on the FLAIR, the same code): the
    export of segment's own mask of the bundled sample, with the same ventricle model, has segment's `location`
    and each lesion's distance to the ventricles and periventricular share (it was left out: `location` null)."""
    flair = SAMPLE
    ventricles = VENTRICLES
    assert main(["segment", str(flair), "-o", str(tmp_path / "seg"), "--ventricle-model", str(ventricles),
                 "--device", "cpu"]) == 0
    segmented = json.loads((tmp_path / "seg" / "sample_flair_report.json").read_text())
    assert segmented["location"]["judged"]
    assert main(["export", str(flair), str(tmp_path / "seg" / "sample_flair_wmh.nii.gz"), "-o",
                 str(tmp_path / "exp"), "--ventricle-model", str(ventricles), "--device", "cpu"]) == 0
    exported = json.loads((tmp_path / "exp" / "sample_flair_report.json").read_text())
    assert exported["location"] == segmented["location"] and "location_why" not in exported
    assert 0 < exported["location"]["periventricular_ml"] and 0 < exported["location"]["deep_ml"]
    fields = ("ventricle_distance_mm", "periventricular_share")
    assert [{k: lesion[k] for k in fields} for lesion in exported["lesions"]] == \
        [{k: lesion[k] for k in fields} for lesion in segmented["lesions"]]
    assert exported["intracranial_ml"] == segmented["intracranial_ml"]
    assert exported["brain_model"] == segmented["brain_model"] and exported["model"] is None


def test_export_records_where_its_networks_ran(tmp_path):
    """With a ventricle model the export runs the ventricle and brain networks, whose figures (the split) depend on
    how they ran (bf16 or fp32): the report records `device` and `runner` as segment's does (they were not
    recorded); without one no network runs and both are null."""
    image = phantom()
    sitk.WriteImage(image, str(tmp_path / "flair.nii.gz"))
    sitk.WriteImage(sitk.Cast(image >= 600, sitk.sitkUInt8), str(tmp_path / "mask.nii.gz"))
    command = ["export", str(tmp_path / "flair.nii.gz"), str(tmp_path / "mask.nii.gz")]
    ventricles = VENTRICLES
    assert main([*command, "-o", str(tmp_path / "a"), "--ventricle-model", str(ventricles), "--device", "cpu"]) == 0
    report = json.loads((tmp_path / "a" / "flair_report.json").read_text())
    assert report["location"] is not None and report["device"] == "cpu" and report["runner"]
    assert main([*command, "-o", str(tmp_path / "b")]) == 0
    report = json.loads((tmp_path / "b" / "flair_report.json").read_text())
    assert report["device"] is None and report["runner"] is None


def test_export_without_a_ventricle_model_says_why_there_is_no_split(tmp_path, capsys):
    """The shipped registry marks no ventricle model default (as for segment): no split, `location_why` naming
    --ventricle-model; --no-location says so; both together are refused, as segment refuses them."""
    image = phantom()
    sitk.WriteImage(image, str(tmp_path / "flair.nii.gz"))
    sitk.WriteImage(sitk.Cast(image >= 600, sitk.sitkUInt8), str(tmp_path / "mask.nii.gz"))
    command = ["export", str(tmp_path / "flair.nii.gz"), str(tmp_path / "mask.nii.gz")]
    assert main([*command, "-o", str(tmp_path / "a")]) == 0
    report = json.loads((tmp_path / "a" / "flair_report.json").read_text())
    assert report["location"] is None and "--ventricle-model" in report["location_why"]
    assert report["intracranial_ml"] is None and report["brain_model"] is None
    assert main([*command, "-o", str(tmp_path / "b"), "--no-location"]) == 0
    assert "--no-location" in json.loads((tmp_path / "b" / "flair_report.json").read_text())["location_why"]
    capsys.readouterr()
    assert main([*command, "-o", str(tmp_path / "c"), "--no-location", "--ventricle-model", "v.pt"]) == 2
    assert "cannot go with" in capsys.readouterr().err and not (tmp_path / "c").exists()


def test_export_qc_picture_of_segments_own_mask_is_segments_picture(tmp_path):
    """export --qc draws the ventricles the split measured from, as segment --qc does (the same render call on the
    same ventricle image): the export of segment's own mask of the bundled sample, with the same ventricle model,
    gets segment's picture to the byte (the ventricles were not drawn: the pictures differed there); with
    --no-location none are drawn."""
    from DeepWMLLib.qc import LESION_RGB, VENTRICLE_RGB

    flair = SAMPLE
    ventricles = VENTRICLES
    assert main(["segment", str(flair), "-o", str(tmp_path / "seg"), "--ventricle-model", str(ventricles),
                 "--device", "cpu", "--qc"]) == 0
    mask = tmp_path / "seg" / "sample_flair_wmh.nii.gz"
    assert main(["export", str(flair), str(mask), "-o", str(tmp_path / "exp"), "--ventricle-model", str(ventricles),
                 "--device", "cpu", "--qc"]) == 0
    assert main(["export", str(flair), str(mask), "-o", str(tmp_path / "off"), "--no-location", "--qc"]) == 0

    def picture(folder):
        return sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / folder / "sample_flair_qc.png")))[..., :3]

    segmented, exported, off = picture("seg"), picture("exp"), picture("off")
    assert np.all(segmented == VENTRICLE_RGB, axis=-1).any()
    np.testing.assert_array_equal(exported, segmented)
    assert (tmp_path / "exp" / "sample_flair_qc.png").read_bytes() == (tmp_path / "seg" / "sample_flair_qc.png").read_bytes()
    assert not np.all(off == VENTRICLE_RGB, axis=-1).any() and np.all(off == LESION_RGB, axis=-1).any()


def test_export_no_brain_mask_gives_segments_split_with_no_brain_mask(tmp_path):
    """--no-brain-mask and --brain-model mean for export what they mean for segment's split: segment
    --no-brain-mask keeps the ventricles whole (not cut to its brain mask), and the export of its mask with
    --no-brain-mask gets its split (export had no such option: the ventricles were always cut to the brain mask);
    --brain-model FILE names the model that ran; the report's `brain_mask` says what the mask was used for."""

    flair = SAMPLE
    ventricles = VENTRICLES
    brain = REPO / "Resources" / "Models" / "deepwml_brain8_synth_v1.pt"
    assert main(["segment", str(flair), "-o", str(tmp_path / "seg"), "--ventricle-model", str(ventricles),
                 "--device", "cpu", "--no-brain-mask", "--save-ventricle-mask"]) == 0
    segmented = json.loads((tmp_path / "seg" / "sample_flair_report.json").read_text())
    command = ["export", str(flair), str(tmp_path / "seg" / "sample_flair_wmh.nii.gz"), "--ventricle-model",
               str(ventricles), "--device", "cpu"]
    assert main([*command, "-o", str(tmp_path / "exp"), "--no-brain-mask", "--brain-model", str(brain)]) == 0
    exported = json.loads((tmp_path / "exp" / "sample_flair_report.json").read_text())
    assert exported["location"] == segmented["location"]
    fields = ("ventricle_distance_mm", "periventricular_share")
    assert [{k: lesion[k] for k in fields} for lesion in exported["lesions"]] == \
        [{k: lesion[k] for k in fields} for lesion in segmented["lesions"]]
    assert exported["intracranial_ml"] == segmented["intracranial_ml"]  # the brain mask still made
    assert exported["brain_model"] == brain.name and exported["brain_mask"] == "not applied to the ventricles"
    assert main([*command, "-o", str(tmp_path / "gated")]) == 0
    gated = json.loads((tmp_path / "gated" / "sample_flair_report.json").read_text())
    assert gated["brain_mask"] == "keeps the ventricles inside the brain"
    # the sample's ventricles lie inside the shipped brain mask whole: a brain model that marks no brain shows that
    # --brain-model gates the ventricles, and that --no-brain-mask does not gate them
    from DeepWMLLib.checkpoint import save_model
    from DeepWMLLib.model import build_model
    from DeepWMLLib.preprocessing import PreprocessingConfig

    config, network = {"base_channels": 4, "depth": 2}, build_model({"base_channels": 4, "depth": 2})
    network.head.bias.data.fill_(-50.0)  # background everywhere
    other = tmp_path / "other_brain.pt"
    save_model(other, network, config, PreprocessingConfig(grid_size=(64, 64)), 0.5, {"kind": "test fixture"},
               {"0": "background", "1": "intracranial"})
    assert main([*command, "-o", str(tmp_path / "other"), "--brain-model", str(other)]) == 0
    cut = json.loads((tmp_path / "other" / "sample_flair_report.json").read_text())
    assert cut["brain_model"] == other.name and cut["intracranial_ml"] != gated["intracranial_ml"]
    assert cut["location"]["ventricles_ml"] == 0 < gated["location"]["ventricles_ml"]
    assert main([*command, "-o", str(tmp_path / "other_whole"), "--brain-model", str(other), "--no-brain-mask"]) == 0
    whole = json.loads((tmp_path / "other_whole" / "sample_flair_report.json").read_text())
    assert whole["location"] == exported["location"] and whole["intracranial_ml"] == cut["intracranial_ml"]


def test_export_refuses_brain_mask_options_where_no_split_is_made(tmp_path, capsys):
    """--brain-model and --no-brain-mask shape only the split (export's mask is given: no mark is gated): with
    --no-location, or with no ventricle model (the shipped registry marks none default), they would change
    nothing and are refused (exit 2) before OUTDIR is made, naming what to give."""
    image = phantom()
    sitk.WriteImage(image, str(tmp_path / "flair.nii.gz"))
    sitk.WriteImage(sitk.Cast(image >= 600, sitk.sitkUInt8), str(tmp_path / "mask.nii.gz"))
    command = ["export", str(tmp_path / "flair.nii.gz"), str(tmp_path / "mask.nii.gz")]
    for extra, said in ((["--no-brain-mask"], "needs a ventricle model"),
                        (["--brain-model", "b.pt"], "give --ventricle-model FILE"),
                        (["--no-location", "--no-brain-mask"], "cannot go with --no-brain-mask"),
                        (["--no-location", "--brain-model", "b.pt"], "cannot go with --brain-model")):
        capsys.readouterr()
        assert main([*command, "-o", str(tmp_path / "o"), *extra]) == 2, extra
        assert said in capsys.readouterr().err and not (tmp_path / "o").exists()



def test_which_brain_model_values_the_library_counts_as_asked_for_without_a_split(tmp_path):
    """export_case's `brain_model` with no split made (ventricle_model None): a model of one's own (a file as text or
    as a path, a path named "default" among them, an empty text, a loaded model) is refused as --brain-model is; the
    default ("default", True: the CLI's without --brain-model) and none (None, False) change nothing and are taken.
    The rule is segment.names_own_model, which load_brain_model's reading of the same values matches."""
    from DeepWMLLib import export
    from DeepWMLLib.checkpoint import load_model_settings
    from DeepWMLLib.errors import UsageError
    from DeepWMLLib.segment import asks_for_default_model, asks_for_no_model, names_own_model

    from conftest import tiny_model_file

    image = phantom()
    sitk.WriteImage(image, str(tmp_path / "flair.nii.gz"))
    sitk.WriteImage(sitk.Cast(image >= 600, sitk.sitkUInt8), str(tmp_path / "mask.nii.gz"))
    loaded = load_model_settings(tiny_model_file(tmp_path / "b.pt"))
    own = ["b.pt", str(tmp_path / "b.pt"), tmp_path / "b.pt", pathlib.Path("default"), "", loaded]
    taken = ["default", True, None, False]
    assert [names_own_model(v) for v in own + taken] == [True] * len(own) + [False] * len(taken)
    assert [asks_for_default_model(v) for v in taken] == [True, True, False, False]
    assert [asks_for_no_model(v) for v in taken] == [False, False, True, True]
    for k, value in enumerate(own):
        with pytest.raises(UsageError, match=r"^--brain-model shapes only the periventricular/deep split, which needs a "
                                             r"ventricle model: --no-location makes none$"):
            export.export_case(tmp_path / "flair.nii.gz", tmp_path / "mask.nii.gz", tmp_path / f"own{k}",
                               ventricle_model=None, brain_model=value)
        assert not (tmp_path / f"own{k}").exists()
    for k, value in enumerate(taken):
        report = export.export_case(tmp_path / "flair.nii.gz", tmp_path / "mask.nii.gz", tmp_path / f"taken{k}",
                                    ventricle_model=None, brain_model=value)
        assert report["brain_model"] is None and report["location"] is None
    with pytest.raises(UsageError, match=r"^--brain-model and --no-brain-mask shape only"):
        export.export_case(tmp_path / "flair.nii.gz", tmp_path / "mask.nii.gz", tmp_path / "both",
                           ventricle_model=False, brain_model=tmp_path / "b.pt", brain_gate=False)

def test_readme_names_every_field_of_exports_report(tmp_path):
    """Every field of export's report is named in README, in its section or in the table row of CASE_report.json
    (the figures it shares with segment's report): `mask_absolute` was named nowhere."""
    image = phantom()
    sitk.WriteImage(image, str(tmp_path / "flair.nii.gz"))
    sitk.WriteImage(sitk.Cast(image >= 600, sitk.sitkUInt8), str(tmp_path / "mask.nii.gz"))
    assert main(["export", str(tmp_path / "flair.nii.gz"), str(tmp_path / "mask.nii.gz"), "-o", str(tmp_path / "o"),
                 "--no-location"]) == 0
    report = json.loads((tmp_path / "o" / "flair_report.json").read_text())
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    start = readme.index("deepwml export FLAIR MASK -o OUTDIR")
    said = readme[start:readme.index("\n## ", start)] + "".join(
        line for line in readme.splitlines() if line.startswith("| `CASE_report.json`"))
    assert {"brain_mask", "location_why"} <= set(report)
    assert [key for key in report if f"`{key}`" not in said] == []


def test_exports_split_and_ventricles_are_those_of_the_scan_however_its_file_orders_its_axes(tmp_path):
    """The split and the ventricles drawn in the QC picture are made on the input's exact grid: a copy of the sample
    stored with its x and y axes swapped and its x and z flipped (the same voxels in the same place) gets the same
    report, and the ventricles `mask_location` returns lie on the copy's grid as the original's, voxel for voxel."""
    from DeepWMLLib.segment import mask_location

    flair, truth = sitk.ReadImage(str(SAMPLE)), sitk.ReadImage(str(SAMPLE.with_name("sample_flair_truth.nii.gz")))

    def stored_otherwise(image):
        return sitk.Flip(sitk.PermuteAxes(image, [1, 0, 2]), [True, False, True])

    reports = []
    for name, (f, m) in {"as_is": (flair, truth), "other": (stored_otherwise(flair), stored_otherwise(truth))}.items():
        sitk.WriteImage(f, str(tmp_path / f"{name}.nii.gz"))
        sitk.WriteImage(m, str(tmp_path / f"{name}_mask.nii.gz"))
        assert main(["export", str(tmp_path / f"{name}.nii.gz"), str(tmp_path / f"{name}_mask.nii.gz"), "-o",
                     str(tmp_path / name), "--ventricle-model", str(VENTRICLES), "--device", "cpu"]) == 0
        reports.append(json.loads((tmp_path / name / f"{name}_report.json").read_text()))
    assert reports[0]["location"]["judged"] and reports[0]["location"] == reports[1]["location"]
    assert reports[0]["intracranial_ml"] == reports[1]["intracranial_ml"]
    distances = [sorted(lesion["ventricle_distance_mm"] for lesion in report["lesions"]) for report in reports]
    assert distances[0] == distances[1]
    made = [mask_location(f, sitk.Cast(m > 0, sitk.sitkUInt8), str(VENTRICLES), device="cpu")["ventricles"]
            for f, m in ((flair, truth), (stored_otherwise(flair), stored_otherwise(truth)))]
    other = stored_otherwise(flair)
    assert made[1].GetSize() == other.GetSize() and made[1].GetDirection() == other.GetDirection()
    assert made[1].GetOrigin() == other.GetOrigin()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(stored_otherwise(made[0])), sitk.GetArrayFromImage(made[1]))


def test_export_overwrite_over_a_report_that_cannot_be_read_removes_its_outputs_as_segment_does(tmp_path):
    """An earlier export's report that cannot be read (damaged): --overwrite without --dicom-seg and --qc left its
    SEG and picture beside the new report, which does not list them, where a reader (PACS) takes them for the new
    result. Now the rule is segment's (segment.remove_earlier_outputs): a report without a list of its outputs
    stands for every output of the command's names, so the earlier SEG and picture go; a file of the user's in
    OUTDIR of another name stays."""
    folder = source_series(tmp_path / "flair")
    edited_mask(folder, tmp_path / "edited.nii.gz")
    out = tmp_path / "out"
    command = ["export", str(folder), str(tmp_path / "edited.nii.gz"), "-o", str(out), "--case", "p1"]
    assert main([*command, "--dicom-seg", "--qc"]) == 0
    (out / "p1_report.json").write_text('{"case": "p1", "outp')  # cut short
    (out / "p1_notes.txt").write_text("mine")
    assert main([*command, "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["p1_notes.txt", "p1_report.json"]


def test_export_overwrite_never_deletes_a_users_images_in_the_outline_folder(tmp_path, capsys):
    """The outline series' folder holding a FLAIR's images under the series' names (IM00001.dcm, ...): --overwrite,
    with --dicom-outline or without it (the earlier export's series removed), deleted them as DeepWML's. Refused
    before anything is written now, naming the folder; DeepWML's own series is still replaced."""
    folder = source_series(tmp_path / "flair")
    edited_mask(folder, tmp_path / "edited.nii.gz")
    out = tmp_path / "out"
    command = ["export", str(folder), str(tmp_path / "edited.nii.gz"), "-o", str(out), "--case", "p1"]
    assert main([*command, "--dicom-outline"]) == 0
    target = out / "p1_outline_dicom"
    first = pydicom.dcmread(target / "IM00001.dcm", stop_before_pixels=True).SeriesInstanceUID
    assert main([*command, "--dicom-outline", "--overwrite"]) == 0  # its own: replaced
    assert pydicom.dcmread(target / "IM00001.dcm", stop_before_pixels=True).SeriesInstanceUID != first
    theirs = users_images_in(folder, target)
    report = (out / "p1_report.json").read_bytes()
    capsys.readouterr()
    for options in (["--dicom-outline"], []):
        assert main([*command, *options, "--overwrite"]) == 1
        assert f"{target} holds DICOM images that are not DeepWML's outline series" in capsys.readouterr().err
        assert {p.name: p.read_bytes() for p in target.iterdir()} == theirs
        assert (out / "p1_report.json").read_bytes() == report


def test_export_says_a_users_folder_of_the_outlines_name_is_theirs_before_advising_overwrite(tmp_path, capsys):
    """A folder CASE_outline_dicom of the user's images in a new OUTDIR: export --dicom-outline said 'p1_outline_dicom
    already in OUTDIR; rerun with --overwrite to replace it', and --overwrite then refused the folder as not
    DeepWML's. The first refusal now says so, and what to do; nothing written. DeepWML's own series there is still
    said to be in the way, to be replaced by --overwrite."""
    folder = source_series(tmp_path / "flair")
    edited_mask(folder, tmp_path / "edited.nii.gz")
    out = tmp_path / "out"
    command = ["export", str(folder), str(tmp_path / "edited.nii.gz"), "-o", str(out), "--case", "p1", "--dicom-outline"]
    target = out / "p1_outline_dicom"
    theirs = users_images_in(folder, target)
    capsys.readouterr()
    for options in ([], ["--overwrite"]):
        assert main([*command, *options]) == 1
        err = capsys.readouterr().err
        assert f"{target} holds DICOM images that are not DeepWML's outline series" in err and "already in" not in err
        assert {p.name: p.read_bytes() for p in target.iterdir()} == theirs
        assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["p1_outline_dicom"]
    shutil.rmtree(target)
    assert main(command) == 0
    assert main(command) == 1
    assert "p1_outline_dicom, p1_report.json already in" in capsys.readouterr().err


def test_export_refuses_a_users_images_in_its_outline_folder_before_drawing_or_measuring(tmp_path, capsys,
                                                                                          monkeypatch):
    """--dicom-outline --overwrite into an outline folder holding a FLAIR's images under the series' names: the
    refusal came only as the series was about to be made, after the QC picture was drawn (and, with a ventricle
    model, after its network ran). Now before any of it, as segment refuses it."""
    from DeepWMLLib import qc

    folder = source_series(tmp_path / "flair")
    edited_mask(folder, tmp_path / "edited.nii.gz")
    out = tmp_path / "out"
    command = ["export", str(folder), str(tmp_path / "edited.nii.gz"), "-o", str(out), "--case", "p1", "--qc"]
    target = out / "p1_outline_dicom"
    theirs = users_images_in(folder, target)
    drawn = []
    render = qc.render
    monkeypatch.setattr(qc, "render", lambda *a, **k: drawn.append(1) or render(*a, **k))
    capsys.readouterr()
    assert main([*command, "--dicom-outline", "--overwrite"]) == 1
    assert f"{target} holds DICOM images that are not DeepWML's outline series" in capsys.readouterr().err
    assert drawn == []
    assert {p.name: p.read_bytes() for p in target.iterdir()} == theirs


def test_export_refuses_a_series_the_seg_or_outline_cannot_be_made_of_before_the_split_runs(tmp_path, capsys,
                                                                                           monkeypatch):
    """export --dicom-seg of a series without a Frame of Reference UID (or --dicom-outline of one without a Study
    Instance UID) with the periventricular/deep split asked for: refused only after the ventricle network had run;
    now from the headers first, as segment refuses it, nothing written."""
    from DeepWMLLib import segment
    from test_dicom_seg import PATIENT

    def split(*args, **kwargs):
        raise AssertionError("the split's networks ran")

    monkeypatch.setattr(segment, "mask_location", split)
    for name, extra, option, said in (
            ("nofor", {}, "--dicom-seg", "no Frame of Reference UID (0020,0052), so a DICOM SEG could not be placed"),
            ("nostudy", {**PATIENT, "0020|000d": ""}, "--dicom-outline",
             "no Study Instance UID, so the outline series cannot join its study")):
        folder = write_dicom_series(tmp_path / name, phantom(), description="AX FLAIR", extra=extra)
        edited_mask(folder, tmp_path / f"{name}.nii.gz")
        out = tmp_path / f"out_{name}"
        assert main(["export", str(folder), str(tmp_path / f"{name}.nii.gz"), "-o", str(out), option,
                     "--ventricle-model", str(segment.models_dir() / segment.SHIPPED_VENTRICLE_MODEL)]) == 1
        err = capsys.readouterr().err
        assert said in err and "the split's networks ran" not in err
        assert not out.exists() or not list(out.iterdir())
