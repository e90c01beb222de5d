"""What a scan's own header says it is: a DICOM series' (description, inversion and repetition time, Image Type,
sequence name, b-value) and, for an image file, the JSON sidecar, b-values and BIDS name a converter wrote beside it.
A scan segmented as asked whose header says it is not a FLAIR (a T1, a diffusion image) is warned of first."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).parent / "slicer" / "support"))

from conftest import make_volume, oracle_network, write_dicom_series  # noqa: E402
from slicer_fixtures import scene  # noqa: E402,F401 (fixture)
from DeepWMLLib import io  # noqa: E402
from DeepWMLLib.cli import main  # noqa: E402

NOT_FLAIR = "the scan may not be a FLAIR"


def _phantom() -> sitk.Image:
    flair, _ = make_volume(size=(48, 40, 6), spacing=(0.9, 0.9, 5.0), blobs=((0.5, 0.5, 0.5, 6.0),))
    return sitk.Cast(flair, sitk.sitkInt16)


def _warnings(out: Path, case: str) -> list[str]:
    return json.loads((out / f"{case}_report.json").read_text())["warnings"]


# (description, inversion ms, repetition ms, extra tags, the words the warning must hold; None: no warning)
SERIES = [
    ("t2_tirm_tra_dark-fluid", 2500, 9000, {"0008|0008": "ORIGINAL\\PRIMARY\\M\\NORM\\DIS2D",
                                            "0018|0024": "*tir2d1_21"}, None),
    ("AX T2 FLAIR", 2200, 8000, {}, None),
    ("Series 5", None, None, {}, None),  # nothing said either way: no warning (the image's own check runs)
    ("t1_mprage_tra", 900, 2300, {}, ["description 't1_mprage_tra' names a T1-weighted scan",
                                      "inversion time is 900 ms (a FLAIR's is 1500-3000 ms)"]),
    ("ep2d_diff_b1000_TRACEW", None, 5000, {"0008|0008": "DERIVED\\PRIMARY\\DIFFUSION\\TRACEW\\ND",
                                            "0018|0024": "*ep_b1000t"},
     ["names a diffusion image", "Image Type names DIFFUSION, TRACEW", "ep_b1000t is a diffusion sequence's (b = 1000)"]),
    ("", None, None, {"0018|9087": "1000"}, ["diffusion b-value is 1000 s/mm"]),  # a b-value alone
    # a vendor's private b-value alone, under its private creator (an anonymised GE or Philips export)
    ("", None, None, {"0043|0010": "GEMS_PARM_01", "0043|1039": "1000001000\\8\\0\\0", "0018|0020": "EP\\SE"},
     ["diffusion b-value is 1000 s/mm"]),
    ("", None, None, {"2001|0010": "Philips Imaging DD 001", "2001|1003": "800"}, ["diffusion b-value is 800 s/mm"]),
    ("AX T2 TSE", None, 4500, {}, ["names a T2- or PD-weighted scan"]),
    # MP2RAGE's second inversion has a FLAIR's timing (TI 2500, TR 5000): only its name says what it is
    ("mp2rage_sag_p3_INV2", 2500, 5000, {}, ["description 'mp2rage_sag_p3_INV2' names a T1-weighted scan"]),
    ("MP2RAGE_UNI_Images", 2500, 5000, {}, ["names a T1-weighted scan"]),
    ("FLAIR", 2400, 3000, {}, ["repetition time is 3000 ms (a FLAIR's is 4000 ms or more)"]),
]


@pytest.mark.parametrize("description, inversion, repetition, extra, words", SERIES)
def test_a_lone_dicom_series_whose_header_says_it_is_not_a_flair_is_segmented_with_a_warning(
        tmp_path, tiny_model, monkeypatch, description, inversion, repetition, extra, words):
    oracle_network(monkeypatch)
    folder = write_dicom_series(tmp_path / "scan", _phantom(), description=description or None,
                                inversion_ms=inversion, repetition_ms=repetition, extra=extra)
    out = tmp_path / "out"
    assert main(["segment", str(folder), "-o", str(out), "--model", str(tiny_model), "--device", "cpu"]) == 0
    found = [w for w in _warnings(out, "scan") if w.startswith(NOT_FLAIR)]
    if words is None:
        assert found == []
        return
    assert len(found) == 1 and found[0].endswith("check that this is the patient's FLAIR")
    assert "(its DICOM header)" in found[0]
    for word in words:
        assert word in found[0]


def test_a_diffusion_series_is_never_the_one_chosen_as_the_flair_nor_taken_alone_from_an_export(tmp_path):
    image = _phantom()
    write_dicom_series(tmp_path / "study", image, uid="1.2.3.1", description="AX FLAIR", number=3)
    # described as a FLAIR by a careless protocol name, but the header's Image Type says diffusion
    write_dicom_series(tmp_path / "study", image, uid="1.2.3.2", description="AX FLAIR", number=4, prefix="dwi",
                       extra={"0008|0008": "ORIGINAL\\PRIMARY\\DIFFUSION\\NONE"})
    chosen, how = io.choose_dicom_series(tmp_path / "study")
    assert chosen.number == 3 and how.startswith("the only one of 2 series")
    # a lone diffusion series with no description in an export says what it is: not taken as an unlabelled scan
    write_dicom_series(tmp_path / "export", image, uid="1.2.3.3", extra={"0018|0024": "ep_b1000"})
    lone = io.dicom_series(tmp_path / "export")
    assert len(lone) == 1 and lone[0].diffusion and not lone[0].unlabelled
    with pytest.raises(io.NoFlairSeries):
        io.choose_dicom_series(tmp_path / "export", strict=True)


def test_an_mp2rage_second_inversion_with_a_flairs_timing_is_not_chosen_as_the_flair(tmp_path):
    image = _phantom()
    write_dicom_series(tmp_path / "study", image, uid="1.2.3.1", description="t2_space_dark-fluid_sag", number=3,
                       inversion_ms=1800, repetition_ms=5000)
    # TI 2500 ms and TR 5000 ms pass a FLAIR's timing; the name says MP2RAGE (a T1-weighted protocol)
    write_dicom_series(tmp_path / "study", image, uid="1.2.3.2", description="mp2rage_sag_p3_INV2", number=5,
                       inversion_ms=2500, repetition_ms=5000, prefix="inv2")
    chosen, how = io.choose_dicom_series(tmp_path / "study")
    assert chosen.number == 3 and how.startswith("the only one of 2 series")


def _nifti(folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    sitk.WriteImage(_phantom(), str(path))
    return path


# (sidecar JSON or None, .bval text or None, file name, the words the warning must hold; None: no warning)
SIDECARS = [
    ({"SeriesDescription": "t2_tirm_tra_dark-fluid", "InversionTime": 2.5, "RepetitionTime": 9.0, "Modality": "MR",
      "ImageType": ["ORIGINAL", "PRIMARY", "M", "ND", "NORM"], "SequenceName": "*tir2d1_21"}, None, "flair.nii.gz", None),
    (None, None, "sub-01_FLAIR.nii.gz", None),
    ({"SeriesDescription": "t1_mprage_sag", "InversionTime": 0.9, "RepetitionTime": 2.3}, None, "scan.nii.gz",
     ["names a T1-weighted scan", "inversion time is 900 ms", "(scan.json)"]),
    ({"ProtocolName": "Ax FLAIR", "InversionTime": 0.9}, None, "scan.nii.gz", ["inversion time is 900 ms"]),
    ({"SeriesDescription": "ep2d_diff", "ImageType": ["DERIVED", "PRIMARY", "DIFFUSION", "ADC"]}, None, "scan.nii",
     ["Image Type names DIFFUSION, ADC"]),
    ({"Modality": "CT"}, None, "scan.nrrd", ["its modality is CT, not MR"]),
    (None, "0 1000 1000 1000\n", "scan.nii.gz", ["b-values go up to 1000 s/mm", "(scan.bval)"]),
    (None, "0 0\n", "scan.nii.gz", None),  # b = 0 only
    (None, None, "sub-01_ses-1_T1w.nii.gz", ["its name ends _T1w, the BIDS name of a T1-weighted scan",
                                               "(sub-01_ses-1_T1w.nii.gz)"]),
    (None, None, "sub-01_dwi.nii.gz", ["the BIDS name of a diffusion image"]),
    (None, None, "sub-01_inv-2_MP2RAGE.nii.gz", ["its name ends _MP2RAGE, the BIDS name of an MP2RAGE image"]),
    ({"SeriesDescription": "mp2rage_INV2", "InversionTime": 2.5, "RepetitionTime": 5.0}, None, "scan.nii.gz",
     ["names a T1-weighted scan"]),
    ("{not json", None, "scan.nii.gz", None),  # a sidecar that cannot be parsed says nothing
    ({"InversionTime": "long", "RepetitionTime": None, "ImageType": "DIFFUSION", "SeriesDescription": 5}, None,
     "scan.nii.gz", None),  # values of the wrong type are not read as evidence
    ([1, 2], None, "scan.nii.gz", None),
]


@pytest.mark.parametrize("sidecar, bval, name, words", SIDECARS)
def test_an_image_file_whose_converter_files_say_it_is_not_a_flair_is_segmented_with_a_warning(
        tmp_path, tiny_model, monkeypatch, sidecar, bval, name, words):
    oracle_network(monkeypatch)
    path = _nifti(tmp_path / "in", name)
    case = io.case_name(path)
    if sidecar is not None:
        (path.parent / f"{case}.json").write_text(sidecar if isinstance(sidecar, str) else json.dumps(sidecar))
    if bval is not None:
        (path.parent / f"{case}.bval").write_text(bval)
    out = tmp_path / "out"
    assert main(["segment", str(path), "-o", str(out), "--model", str(tiny_model), "--device", "cpu"]) == 0
    found = [w for w in _warnings(out, case) if w.startswith(NOT_FLAIR)]
    if words is None:
        assert found == []
        return
    assert len(found) == 1
    for word in words:
        assert word in found[0]


def test_header_evidence_by_hand():
    assert io.not_flair_evidence() == []
    assert io.not_flair_evidence("T2W_FLAIR", 2800, 11000) == []
    assert io.not_flair_evidence("t2_spc_da-fl_sag_p2_iso", 1800, 5000) == []
    assert io.not_flair_evidence("t2_tse_dark-fluid", None, None) == []  # tse beside a FLAIR word: a FLAIR
    assert io.not_flair_evidence("", 3200) == ["its inversion time is 3200 ms (a FLAIR's is 1500-3000 ms)"]
    assert io.not_flair_evidence("", 1500, 4000) == [] and io.not_flair_evidence("", 3000) == []  # limits inclusive
    assert io.not_flair_evidence("", None, 2000) == []  # a repetition time alone says nothing
    assert io.not_flair_evidence("", b_values=(50.0,)) == []  # b = 50 and under: not a diffusion weighting
    assert io.not_flair_evidence("", b_values=(float("nan"),)) == []
    assert io.not_flair_evidence("STIR cor") == ["its description 'STIR cor' names STIR"]
    assert io.not_flair_evidence("3D DIR") == ["its description '3D DIR' names double inversion recovery"]
    assert io.not_flair_evidence("SWI_Images") == ["its description 'SWI_Images' names susceptibility-weighted imaging"]
    assert io.not_flair_evidence("DTI_30dir") == ["its description 'DTI_30dir' names a diffusion image"]  # 30 directions
    # descriptions FLAIRs are given by the consoles of three vendors and by sites: none is held against the scan
    for description in ("t2_tirm_tra_dark-fluid_3mm", "t2_flair_tra", "Ax T2 FLAIR FS", "Sag CUBE FLAIR", "T2W_FLAIR",
                        "FLAIR_longTR", "tirm_tra", "T2 FLAIR SENSE", "FLAIR+C", "T2-FLAIR", "FLAIR_3D_VISTA",
                        "3D_Brain_VIEW_FLAIR_SHC", "AX T2 FLAIR PROPELLER", "T2_FLAIR_BLADE", "flair_tra_TSE",
                        "t2_tse_dark-fluid_tra", "ep2d_flair", "sT2W_FLAIR", "3D T2 FLAIR SPACE", "DarkFluid"):
        assert io.not_flair_evidence(description) == [], description
    for description, kind in (("T1W_3D_TFE", "T1-weighted"), ("ep2d_diff_3scan_trace_p2", "diffusion"),
                              ("Ax DWI 1000b", "diffusion"), ("t2_swi_tra", "susceptibility"), ("AX T2 FSE", "T2- or PD"),
                              ("PD_TSE", "T2- or PD"), ("T1 FLAIR AX", "T1-weighted"), ("t1_tirm_tra", "T1-weighted"),
                              ("AX T2*", "T2- or PD")):
        assert kind in " ".join(io.not_flair_evidence(description)), description
    assert io.not_flair_evidence("", secondary_capture=True) == [
        "it is a Secondary Capture (a picture of images, not the scanner's)"]


def test_a_sidecar_of_a_volume_loaded_in_slicer_and_its_dicom_header_are_warned_of_by_the_module(
        scene, tmp_path, monkeypatch, tiny_model):
    import slicer
    from DeepWMLSlicerLib import CoreLogic
    from DeepWMLSlicerLib import MRMLConversion as mrml

    oracle_network(monkeypatch)
    path = tmp_path / "t1.nrrd"
    sitk.WriteImage(_phantom(), str(path))
    (tmp_path / "t1.json").write_text(json.dumps({"SeriesDescription": "t1_mprage", "InversionTime": 0.9}))
    volume = mrml.loadVolumeFile(str(path), "t1")
    logic = CoreLogic.DeepWMLCoreLogic()
    segmentation = logic.segmentVolume(volume, device="cpu", modelPaths=[str(tiny_model)])
    report = logic.lesionStatistics(segmentation, volume)
    first = report["warnings"][0]
    assert first.startswith(NOT_FLAIR) and "inversion time is 900 ms" in first and "(t1.json)" in first
    (tmp_path / "t1.json").unlink()  # read when the run starts: a rerun without the sidecar has nothing to say
    segmentation = logic.segmentVolume(volume, device="cpu", modelPaths=[str(tiny_model)])
    assert not any(w.startswith(NOT_FLAIR) for w in logic.lesionStatistics(segmentation, volume)["warnings"])

    # a volume the DICOM module loaded: its first instance's file, through Slicer's DICOM database
    folder = write_dicom_series(tmp_path / "dwi", _phantom(), description="ep2d_diff_b1000_TRACEW")
    files = sorted(folder.iterdir())

    class Database:  # Slicer's ctkDICOMDatabase, of which the module asks one thing
        def fileForInstance(self, uid):
            return str(files[0]) if uid == "1.2.9.1" else ""

    monkeypatch.setattr(slicer, "dicomDatabase", Database(), raising=False)
    node = mrml.volumeFromImage(io.read_image(folder), "dwi")
    assert CoreLogic.sourceWarnings(node) == []  # made in the scene: no source
    node.SetAttribute("DICOM.instanceUIDs", "1.2.9.1 1.2.9.2")
    found = CoreLogic.sourceWarnings(node)
    assert len(found) == 1 and "names a diffusion image (its DICOM header)" in found[0]
    node.SetAttribute("DICOM.instanceUIDs", "1.2.9.7")  # not in the database (deleted): nothing to say
    assert CoreLogic.sourceWarnings(node) == []


def test_the_slicer_batch_script_warns_of_a_sidecar_once_whichever_reader_loads_the_file(scene, tmp_path, monkeypatch,
                                                                                          tiny_model):
    import importlib.util

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("segment_batch", REPO / "DeepWML" / "Scripts" / "segment_batch.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    oracle_network(monkeypatch)
    inputs, out = tmp_path / "in", tmp_path / "out"
    _nifti(inputs, "a.nii.gz")  # loaded by Slicer's reader: the module's logic reads the sidecar too
    sitk.WriteImage(sitk.JoinSeries(_phantom(), 0.0, 2.0), str(inputs / "b.mha"))  # X, Y, Z, 1: made in the scene
    _nifti(inputs, "c.nii.gz")
    for case in ("a", "b"):
        (inputs / f"{case}.json").write_text(json.dumps({"SeriesDescription": "t1_mprage", "InversionTime": 0.9}))
    assert script.main(["--input-dir", str(inputs), "--output-dir", str(out), "--model", str(tiny_model),
                        "--device", "cpu"]) == 0
    for case, count in (("a", 1), ("b", 1), ("c", 0)):
        found = [w for w in _warnings(out, case) if w.startswith(NOT_FLAIR)]
        assert len(found) == count and all(f"({case}.json)" in w for w in found)


def test_a_t2_named_series_with_a_flairs_inversion_time_is_not_warned_of():
    """A description naming T2 (or TSE) and no FLAIR word is evidence against a FLAIR only where the timing does
    not say it is one: 't2_spc_ir_sag_p2_iso' or 'T2 IR TSE' with an inversion time of 1.8-2.5 s and a long
    repetition time is a FLAIR (an inversion recovery T2 nulling CSF), and is chosen as one; it was also warned
    of as 'a T2- or PD-weighted scan'."""
    for description, inversion, repetition in (("t2_spc_ir_sag_p2_iso", 1800, 5000), ("T2 IR TSE", 2500, 9000),
                                               ("Sag 3D T2 IR", 1650, None)):
        assert io.not_flair_evidence(description, inversion, repetition) == [], description
    # a T2 name beside another timing, or none, is still held against it
    assert io.not_flair_evidence("AX T2 TSE", None, 4500) == [
        "its description 'AX T2 TSE' names a T2- or PD-weighted scan"]
    assert "T2- or PD" in " ".join(io.not_flair_evidence("t2_spc_ir", 1800, 3000))  # TR of no FLAIR
    assert "T2- or PD" in " ".join(io.not_flair_evidence("T2 IR", 400))


def test_header_evidence_limits_by_hand():
    """Mutation audit (mut44): the limits of the rules above, each on its edge (inclusive, as the FLAIR's range)."""
    # a T2 name beside a FLAIR's timing at its limits: TI 1.5 and 3 s, TR 4 s or none given
    for inversion, repetition in ((1500, 4000), (3000, None), (2500, 4000)):
        assert io.not_flair_evidence("AX T2", inversion, repetition) == [], (inversion, repetition)
    assert io.not_flair_evidence("", modality="") == []  # an empty Modality says nothing, as a missing one
    # a T2 name beside another kind named: that kind alone (a STIR of T2 contrast is a STIR)
    assert io.not_flair_evidence("t2_stir_cor") == ["its description 't2_stir_cor' names STIR"]
    # a diffusion type in the Image Type and the Frame Type: said once
    assert io.not_flair_evidence("", image_type=("DIFFUSION",), frame_type=("DIFFUSION",)) == [
        "its Image Type names DIFFUSION (a diffusion image)"]
    # a b-value, a directionality beside a sequence name or a b-value that say so already: said once
    assert io.not_flair_evidence("", sequence_name="*ep_b1000t", b_values=(1000.0,)) == [
        "its sequence name *ep_b1000t is a diffusion sequence's (b = 1000)"]
    assert io.not_flair_evidence("", b_values=(1000.0,), directionality=("DIRECTIONAL",)) == [
        "its diffusion b-value is 1000 s/mm\u00b2"]
    assert io.not_flair_evidence("", b_values=(100.0,)) == ["its diffusion b-value is 100 s/mm\u00b2"]  # above 50
    assert io.not_flair_evidence("", image_type=("DERIVED", "PRIMARY", "EADC")) == [
        "its Image Type names EADC (a diffusion image)"]  # Siemens' exponential ADC
    assert "T2- or PD" in " ".join(io.not_flair_evidence("Ax FSE"))  # a fast spin echo named alone
    # a series' own reading of the same: b = 50 is no diffusion weighting; a description that names nothing is a label
    assert not io.DicomSeries("1.2", "", ("a.dcm",), b_value=50.0).diffusion
    assert io.DicomSeries("1.2", "", ("a.dcm",), b_value=50.5).diffusion
    assert io.DicomSeries("1.2", "", ("a.dcm",)).unlabelled
    assert not io.DicomSeries("1.2", "Series 5", ("a.dcm",)).unlabelled
    # chosen as a FLAIR by its timing at the range's limits (inclusive); never a picture of images
    for inversion, repetition in ((1500, 4000), (3000, None)):
        assert io.DicomSeries("1.2", "", ("a.dcm",), inversion_ms=inversion, repetition_ms=repetition).looks_like_flair
    assert not io.DicomSeries("1.2", "AX FLAIR", ("a.dcm",), secondary_capture=True).looks_like_flair


@pytest.mark.parametrize("sidecar, words", [
    # BIDS gives times in seconds; a sidecar written in ms (against BIDS, as hand-made ones are) held 1.8e+06 ms
    ({"SeriesDescription": "FLAIR", "InversionTime": 2500, "RepetitionTime": 9000}, None),
    ({"InversionTime": 1800}, None),
    ({"SeriesDescription": "t1_mprage", "InversionTime": 900, "RepetitionTime": 2300},
     ["its inversion time is 900 ms"]),
    ({"InversionTime": 1.8, "RepetitionTime": 5}, None),  # seconds, as BIDS has them
    # numbers beyond a float (JSON allows any integer): a traceback (OverflowError, TypeError); nothing said
    ({"InversionTime": int("9" * 400)}, None),
    ({"DiffusionBValue": int("9" * 400)}, None),
    ({"RepetitionTime": [int("9" * 400)], "InversionTime": 1.8}, None),
    # (mutation audit, mut44) a FLAIR's TR of 11 s is seconds (not 11 ms); 100 is still seconds, above it ms
    ({"SeriesDescription": "FLAIR", "InversionTime": 2.8, "RepetitionTime": 11}, None),
    ({"InversionTime": 100}, ["its inversion time is 100000 ms"]),
    ({"InversionTime": 100.5}, ["its inversion time is 100.5 ms"]),
    # the protocol's name where the series' description is missing, as dcm2niix writes both
    ({"ProtocolName": "t1_mprage_sag"}, ["its description 't1_mprage_sag' names a T1-weighted scan"]),
    ({"InversionTime": True, "RepetitionTime": False}, None),  # booleans are no times (Python's True is 1)
    ({"Modality": "mr"}, None),  # MR in lower case
])
def test_a_sidecars_times_in_ms_or_numbers_beyond_a_float(tmp_path, sidecar, words):
    path = _nifti(tmp_path, "scan.nii.gz")
    (tmp_path / "scan.json").write_text(json.dumps(sidecar))
    reasons, sources = io.image_file_evidence(path)
    if words is None:
        assert reasons == [], sidecar
        return
    assert sources == ["scan.json"]
    for word in words:
        assert word in " ".join(reasons)


def test_a_series_of_files_mislabelled_big_endian_only_is_listed_with_what_its_header_says(tmp_path):
    """A series whose every file is labelled big endian while its data set is little endian is listed from its
    headers read by hand (`io._mislabelled_header`), and refused when read. Its record lacked the Image Type,
    sequence name and b-value every other series' has: listing a folder of such a series was an IndexError
    (a traceback) before it could be refused. Its Image Type and sequence name say what it is, as any series'."""
    from conftest import relabel_transfer_syntax

    folder = write_dicom_series(tmp_path / "export", _phantom(), uid="1.2.3.4", description="",
                                extra={"0008|0008": "ORIGINAL\\PRIMARY\\DIFFUSION\\NONE", "0018|0024": "*ep_b1000t",
                                       "0018|9087": "1000", "0020|0011": "nan"})
    relabel_transfer_syntax(folder, "1.2.840.10008.1.2.2")
    (series,) = io.dicom_series(folder)
    assert series.image_type == ("ORIGINAL", "PRIMARY", "DIFFUSION", "NONE") and series.sequence_name == "*ep_b1000t"
    assert series.b_value == 1000 and series.diffusion and series.number is None
    assert "Image Type names DIFFUSION" in " ".join(series.not_flair_evidence())
    with pytest.raises(io.DeepWMLError, match="labelled Explicit VR Big Endian"):
        io.read_image(folder)


def test_header_numbers_that_are_not_numbers_say_nothing(tmp_path):
    """A Series Number of 'nan' (a damaged header) was a ValueError (a traceback) listing the folder; an inversion
    time of 'nan' the warning 'its inversion time is nan ms' and the series never chosen as the FLAIR. Values
    not finite are read as not given."""
    folder = write_dicom_series(tmp_path / "a", _phantom(), description="AX FLAIR",
                                extra={"0020|0011": "nan", "0018|0082": "nan", "0018|0080": "inf"})
    (series,) = io.dicom_series(folder)
    assert series.number is None and series.inversion_ms is None and series.repetition_ms is None
    assert series.not_flair_evidence() == [] and series.looks_like_flair


@pytest.mark.parametrize("name, warned", [("sub-01_acq-FLAIR_T2w.nii.gz", False), ("sub-01_acq-3Dflair_T2w.nii.gz", False),
                                          ("sub-01_acq-darkfluid_T2w.nii.gz", False), ("sub-01_acq-tse_T2w.nii.gz", True)])
def test_a_bids_name_whose_entities_say_flair_is_not_warned_of_for_its_suffix(tmp_path, name, warned):
    """Some BIDS data sets file a FLAIR under the T2w suffix with an acquisition label saying so
    ('sub-01_acq-FLAIR_T2w'): its own name says FLAIR, so the suffix is no evidence against it."""
    reasons, _ = io.image_file_evidence(_nifti(tmp_path, name))
    assert bool(reasons) == warned, reasons


GE_B = {"0043|0010": "GEMS_PARM_01", "0018|0020": "EP\\SE"}
SIEMENS_B = {"0019|0010": "SIEMENS MR HEADER", "0019|100c": "1000"}


def _patch(folder: Path, old: bytes, new: bytes) -> None:
    """The bytes `old` made `new` (as long) in every file of a series: a private creator or tag another than the
    image library writes (it refuses a value of a private element whose VR another creator's dictionary gives)."""
    assert len(old) == len(new)
    for path in folder.iterdir():
        data = path.read_bytes()
        assert data.count(old) == 1, path
        path.write_bytes(data.replace(old, new))


@pytest.mark.parametrize("extra, patch, b_value", [
    ({**GE_B, "0043|1039": "1000001250\\8\\0\\0"}, None, 1250),  # multi-b DWI: 1000000000 added (the bias, (0043,107F))
    ({**GE_B, "0043|1039": "1000\\8\\0\\0"}, None, 1000),  # DTI: no bias
    ({**GE_B, "0043|1039": "0\\8\\0\\0"}, None, 0),  # a b = 0 image
    ({**GE_B, "0043|1039": "1000\\8\\0\\0", "0018|0020": "SE\\IR"}, None, None),  # no EPI: another sequence's
    ({**GE_B, "0043|1039": "1000\\8\\0\\0", "0018|0020": "SE", "0018|9018": "YES"}, None, 1000),  # EPI said so
    ({"2001|0010": "Philips Imaging DD 001", "2001|1003": "1000"}, None, 1000),
    ({"2001|0010": "Philips Imaging DD 001", "2001|1003": "0"}, None, 0),  # Philips writes b = 0 on every image
    (SIEMENS_B, None, 1000),
    # the creator's block: (0019,11xx) under a creator at (0019,0011)
    ({"0019|0011": "SIEMENS MR HEADER", "0019|110c": "700"}, None, 700),
    # another creator's element of the same number means something else: never read as a b-value
    (SIEMENS_B, (b"SIEMENS MR HEADER ", b"GEMS_ACQU_01      "), None),
    ({**GE_B, "0043|1039": "1000\\8\\0\\0"}, (b"GEMS_PARM_01", b"GEMS_IDEN_01"), None),
    ({"2001|0010": "Philips Imaging DD 001", "2001|1003": "1000"}, (b"Imaging DD 001", b"Imaging DD 002"), None),
    # a creator at (0019,0011) owns (0019,11xx): its (0019,100C) is no one's
    (SIEMENS_B, (b"\x19\x00\x10\x00\x12\x00\x00\x00SIEMENS", b"\x19\x00\x11\x00\x12\x00\x00\x00SIEMENS"), None),
])
def test_a_vendors_private_b_value_is_read_under_its_own_private_creator_only(tmp_path, extra, patch, b_value):
    """A diffusion series whose description and Image Type say nothing (an anonymised or renamed export) was
    recognised by the standard Diffusion b-value (0018,9087) alone, which older software leaves out; the vendors'
    private b-values are read: GE's (0043,xx39) (its first value, less the 1000000000 some versions add; on an
    echo planar sequence only), Philips' (2001,xx03), Siemens' (0019,xx0C), each only where its private creator
    element says whose it is (the same element number under another creator is another thing)."""
    folder = write_dicom_series(tmp_path / "scan", _phantom(), extra=extra)
    if patch:
        _patch(folder, *patch)
    (series,) = io.dicom_series(folder)
    assert series.b_value == b_value
    warned = b_value is not None and b_value > io.DIFFUSION_MIN_B
    assert series.diffusion == warned and series.unlabelled is not warned  # unlabelled: taken alone from an export
    evidence = " ".join(series.not_flair_evidence())
    assert (f"its diffusion b-value is {b_value:g} s/mm" in evidence) if warned else evidence == ""
    assert io.dicom_file_evidence(series.files[0]) == series.not_flair_evidence()  # the Slicer module's reading


def test_a_diffusion_series_whose_first_file_is_a_b0_image_is_known_by_its_other_files(tmp_path):
    """A diffusion series' b = 0 images usually come first (GE, Philips: one file a slice and b-value): the
    series' b-value was its first file's, 0, and the series passed for an unlabelled scan. Its largest is kept."""
    image = _phantom()
    philips = {"2001|0010": "Philips Imaging DD 001"}
    write_dicom_series(tmp_path / "dwi", image, uid="1.2.3.9", prefix="a_b0", extra={**philips, "2001|1003": "0"})
    write_dicom_series(tmp_path / "dwi", image, uid="1.2.3.9", prefix="b_b1000", instance_numbers=range(7, 13),
                       extra={**philips, "2001|1003": "1000"})
    (series,) = io.dicom_series(tmp_path / "dwi")
    assert len(series.files) == 12 and series.b_value == 1000 and series.diffusion
    write_dicom_series(tmp_path / "standard", image, uid="1.2.3.8", prefix="a_b0", extra={"0018|9087": "0"})
    write_dicom_series(tmp_path / "standard", image, uid="1.2.3.8", prefix="b_b1000", instance_numbers=range(7, 13),
                       extra={"0018|9087": "1000"})
    assert io.dicom_series(tmp_path / "standard")[0].b_value == 1000  # the standard one, too


def test_a_private_b_value_of_a_file_read_by_hand_is_read_under_its_creator(tmp_path):
    """A series of files labelled big endian whose data sets are little endian is listed from its headers read by
    hand (`io._mislabelled_header`): the vendors' private b-values are read there too (Philips' FL as four bytes),
    under their creators only."""
    from conftest import relabel_transfer_syntax

    folder = write_dicom_series(tmp_path / "export", _phantom(), uid="1.2.3.4",
                                extra={"2001|0010": "Philips Imaging DD 001", "2001|1003": "1000", **SIEMENS_B,
                                       "0019|100c": "3000"})
    _patch(folder, b"SIEMENS MR HEADER ", b"GEMS_ACQU_01      ")  # another creator's (0019,100C): not read
    relabel_transfer_syntax(folder, "1.2.840.10008.1.2.2")
    (series,) = io.dicom_series(folder)
    assert series.b_value == 1000 and series.diffusion
    assert "its diffusion b-value is 1000 s/mm" in " ".join(series.not_flair_evidence())


def test_vendor_b_values_by_hand():
    assert io.vendor_b_value({}) is None
    assert io.vendor_b_value({0x0019100C: "1000"}) is None  # no creator
    assert io.vendor_b_value({0x00190010: "SIEMENS MR HEADER ", 0x0019100C: "1000 "}) == 1000
    assert io.vendor_b_value({0x00190010: "siemens mr header", 0x0019100C: "nan"}) is None  # not a number
    assert io.vendor_b_value({0x20010010: b"Philips Imaging DD 001", 0x20011003: struct.pack("<f", 700.0)}) == 700
    # a value an image library could not type (UN) comes base64 encoded: Philips' FL, GE's IS text
    assert io.vendor_b_value({0x20010010: "Philips Imaging DD 001", 0x20011003: "AAAvRA=="}) == 700
    assert io.vendor_b_value({0x00430010: "GEMS_PARM_01", 0x00431039: "MjAwMFw4XDBcMA=="}, "EP") == 2000
    # GE's bias taken off whatever the b-value (b = 10000 and more on high-b sequences)
    assert io.vendor_b_value({0x00430010: "GEMS_PARM_01", 0x00431039: "1000010000\\8\\0\\0"}, "EP\\SE") == 10000
    assert io.vendor_b_value({0x00430010: "GEMS_PARM_01", 0x00431039: "1000\\8\\0\\0"}, "EPSI") is None
    # (mutation audit, mut44) the bias is GE's alone; of two vendors' values (a file passed through another's
    # workstation) the largest
    assert io.vendor_b_value({0x00190010: "SIEMENS MR HEADER", 0x0019100C: "1000001000"}) == 1000001000
    assert io.vendor_b_value({0x20010010: "Philips Imaging DD 001", 0x20011003: struct.pack("<f", 0.0),
                              0x00190010: "SIEMENS MR HEADER", 0x0019100C: "1000"}) == 1000


def _enhanced(path: Path, **kwargs) -> Path:
    from conftest import write_enhanced_mr

    return write_enhanced_mr(path, _phantom(), description="", **kwargs)


@pytest.mark.parametrize("kwargs, words", [
    # b = 0 frames first, as diffusion series store them: the per-frame MR Diffusion groups' largest b-value
    ({"b_values": [0, 0, 1000, 1000, 1000, 1000]}, ["its diffusion b-value is 1000 s/mm"]),
    ({"frame_type": "ORIGINAL\\PRIMARY\\DIFFUSION\\NONE"}, ["its Frame Type names DIFFUSION (a diffusion image)"]),
    ({"frame_type": "DERIVED\\PRIMARY\\DIFFUSION\\ADC"}, ["its Frame Type names DIFFUSION, ADC"]),
    # a directionality alone (the b-value left out): a diffusion weighting all the same
    ({"b_values": [None] * 6, "directionality": ["ISOTROPIC"] * 6},
     ["its Diffusion Directionality is ISOTROPIC (a diffusion-weighted image)"]),
    # a FLAIR's frames: no diffusion weighting, nothing said
    ({"b_values": [0] * 6, "frame_type": "ORIGINAL\\PRIMARY\\T2\\NONE", "inversion_ms": 2500,
      "repetition_ms": 9000}, None),
    ({"b_values": [None] * 6, "directionality": ["NONE"] * 6}, None),
])
def test_an_enhanced_mr_diffusion_file_is_known_by_its_functional_groups(tmp_path, kwargs, words):
    """An enhanced MR (multi-frame) file keeps its b-values, Diffusion Directionality (MR Diffusion group) and Frame
    Type (MR Image Frame Type group) in its functional groups, shared or per frame, not at its top level, where the
    header check looked: a diffusion file without a description passed for an unlabelled scan."""
    path = _enhanced(tmp_path / "enhanced" / "mr.dcm", **kwargs)
    (series,) = io.dicom_series(path.parent)
    evidence = series.not_flair_evidence()
    assert io.dicom_file_evidence(path) == evidence  # the Slicer module's reading of a file
    if words is None:
        assert evidence == [] and not series.diffusion and series.looks_like_flair is (series.inversion_ms is not None)
        return
    assert series.diffusion and not series.unlabelled and not series.looks_like_flair
    for word in words:
        assert word in " ".join(evidence)
    with pytest.raises(io.NoFlairSeries):
        io.choose_dicom_series(path.parent, strict=True)


def test_an_enhanced_mr_diffusion_file_is_segmented_with_a_warning(tmp_path, tiny_model, monkeypatch):
    oracle_network(monkeypatch)
    path = _enhanced(tmp_path / "scan" / "mr.dcm", b_values=[0, 0, 1000, 1000, 1000, 1000])
    out = tmp_path / "out"
    assert main(["segment", str(path.parent), "-o", str(out), "--model", str(tiny_model), "--device", "cpu"]) == 0
    found = [w for w in _warnings(out, "scan") if w.startswith(NOT_FLAIR)]
    assert len(found) == 1 and "its diffusion b-value is 1000 s/mm" in found[0] and "(its DICOM header)" in found[0]


def test_unstated_orientation_by_hand(tmp_path):
    """Mutation audit (mut44): 'space dimension' states a space as 'space' does (its axes are its 'space
    directions'); a Slicer segmentation is never warned of (its place is its scan's); no header fields, no warning."""
    head = "NRRD0004\ntype: int16\ndimension: 3\nsizes: 2 2 2\n"
    for name, geometry, warned in (
            ("spacings.nrrd", "spacings: 0.9 0.9 5\n", True),
            ("dimension.nrrd", "space dimension: 3\nspace directions: (0.9,0,0) (0,0.9,0) (0,0,5)\n", False),
            ("lesions.seg.nrrd", "spacings: 0.9 0.9 5\n", False)):
        (tmp_path / name).write_bytes(f"{head}{geometry}endian: little\nencoding: raw\n\n".encode() + bytes(16))
        assert (io.unstated_orientation(tmp_path / name) is not None) == warned, name
    (tmp_path / "empty.nrrd").write_bytes(b"")
    assert io.unstated_orientation(tmp_path / "empty.nrrd") is None


@pytest.mark.parametrize("space, warned", [(None, True), ("left-posterior-superior", False),
                                           ("right-anterior-superior", False)])
def test_an_nrrd_that_states_no_orientation_is_segmented_with_a_warning_that_left_and_right_are_assumed(
        tmp_path, tiny_model, monkeypatch, space, warned):
    """An NRRD without 'space' gives its voxel sizes ('spacings') but not how its axes lie in the patient: ITK and 3D
    Slicer read it on the identity (left, posterior, superior), so a scan stored right to left would have its sides
    swapped in the picture and the report's positions, silently."""
    oracle_network(monkeypatch)
    image = _phantom()
    voxels = sitk.GetArrayFromImage(image).astype("<i2")
    x, y, z = image.GetSize()
    if space is None:
        geometry = "spacings: 0.9 0.9 5\n"
    else:
        geometry = f"space: {space}\nspace directions: (0.9,0,0) (0,0.9,0) (0,0,5)\nspace origin: (0,0,0)\n"
    path = tmp_path / "in" / "scan.nrrd"
    path.parent.mkdir()
    path.write_bytes(f"NRRD0004\ntype: int16\ndimension: 3\nsizes: {x} {y} {z}\n{geometry}endian: little\n"
                     f"encoding: raw\n\n".encode() + voxels.tobytes())
    out = tmp_path / "out"
    assert main(["segment", str(path), "-o", str(out), "--model", str(tiny_model), "--device", "cpu"]) == 0
    found = [w for w in _warnings(out, "scan") if "states no orientation" in w]
    if not warned:
        assert found == []
        return
    assert len(found) == 1
    assert "no 'space'" in found[0] and "left and right" in found[0]
