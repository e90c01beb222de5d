"""Mutation audit (mut47) of this session's new code: bf16 refused up front on a CPU that does not compute it
(inference.cpu_computes_bf16, check_runtime), --series naming no series refused before OUTDIR (io.series_named,
segment.refuse_series_named_nowhere), a DICOM SEG's frames placed by the FLAIR folder given to evaluate and consensus
(io.mask_source), export's split of a mask given (segment.location_inputs, mask_location) and the Slicer Logic's
kept split networks (CoreLogic._volumeLocationInputs, its key). Expected values are worked out by hand in the
comments; each test names the mutants it kills.

Mutants left alive as equivalent are listed in the audit's report (the helper's final message)."""

from __future__ import annotations

from pathlib import Path

import pytest

from DeepWMLLib import inference, io
from DeepWMLLib.errors import DeepWMLError
from DeepWMLLib.io import DicomSeries, DicomStudy


# ---- inference.cpu_computes_bf16 and check_runtime ----------------------------------------------------------------

def _runtimes(monkeypatch, openvino, torch):
    """OpenVINO answering `openvino` (True/False; None: not installed or not working) and PyTorch `torch`."""
    def core():
        if openvino is None:
            raise ImportError("No module named 'openvino'")
        return "core"

    monkeypatch.setattr(inference, "_openvino_core", core)
    monkeypatch.setattr(inference, "_openvino_computes_bf16", lambda given: bool(openvino))
    monkeypatch.setattr(inference, "torch_cpu_has_native_bf16", lambda: torch)


@pytest.mark.parametrize("openvino, torch, backend, native", [
    (True, False, "auto", True),  # auto with OpenVINO working: make_runner runs OpenVINO, so OpenVINO is asked
    (False, True, "auto", False),
    (True, False, "openvino", True), (False, True, "openvino", False),
    (True, False, "torch", False),  # --backend torch: PyTorch asked, whatever OpenVINO says
    (False, True, "torch", True),
    (None, True, "auto", True),  # auto without OpenVINO runs PyTorch: PyTorch asked
    (None, False, "auto", False),
    (None, False, "openvino", True)])  # --backend openvino not working: its runner says what is wrong, not bf16
def test_bf16_is_asked_of_the_runtime_that_would_run_it(monkeypatch, openvino, torch, backend, native):
    """cpu_computes_bf16 asks OpenVINO where it runs (openvino, or auto with it working), else PyTorch; a broken
    OpenVINO asked for by name is not called a CPU without bf16. Worked out from make_runner's order: auto tries
    OpenVINO first and falls back to PyTorch.
    (Kills: auto not asking OpenVINO; a broken OpenVINO answered False, or auto's fallback answered True; OpenVINO's
    answer negated; PyTorch's answer replaced by True.)"""
    _runtimes(monkeypatch, openvino, torch)
    assert inference.cpu_computes_bf16(backend) is native


def test_check_runtime_refuses_bf16_as_the_chosen_backend_would_run_it_and_nothing_else(monkeypatch):
    """OpenVINO computing bf16 and PyTorch not: --backend torch --precision bf16 is refused (PyTorch would emulate
    it), auto and openvino are not; on a CPU where neither computes it, only bf16 is refused, never auto or fp32.
    (Kills: check_runtime asking for backend 'auto' whatever was chosen; the refusal made for any precision but fp32.)"""
    _runtimes(monkeypatch, True, False)
    with pytest.raises(inference.PrecisionUnavailable, match="native bf16"):
        inference.check_runtime("cpu", "torch", "bf16")
    assert inference.check_runtime("cpu", "auto", "bf16") == "cpu"
    assert inference.check_runtime("cpu", "openvino", "bf16") == "cpu"
    _runtimes(monkeypatch, False, False)
    assert inference.check_runtime("cpu", "auto", "auto") == "cpu"
    assert inference.check_runtime("cpu", "torch", "fp32") == "cpu"
    with pytest.raises(inference.PrecisionUnavailable):
        inference.check_runtime("cpu", "auto", "bf16")


# ---- io.series_named ---------------------------------------------------------------------------------------------

def _series(uid, description, number=None, modality="MR", secondary_capture=False):
    return DicomSeries(uid=uid, description=description, files=(), number=number, modality=modality,
                       secondary_capture=secondary_capture)


def test_series_named_takes_uid_number_whole_description_then_a_part():
    """Four series: 1.2.9.4 #4 'SAG T1', 1.2.9.5 #5 'AX T2 FLAIR', 1.2.9.6 #6 'FLAIR', 1.2.9.7 #7 'FLAIR outline'
    (a Secondary Capture). By hand: ' 1.2.9.5 ' (spaces typed) is 1.2.9.5's UID; ' 5 ' is series 5; '4' series 4
    (not 5); 'sag t1' the whole description of #4 only; 'flair' the whole description of #6 only (not the part of
    #5 and #7); 't2 fl' a part of #5's only; 'outline' a part of #7 alone (derived, but the only match).
    (Kills: the UID compared unstripped; the choice not stripped; the number off by one; the whole description
    compared with !=; the part looked for the wrong way round; the whole-description step dropped.)"""
    series = [_series("1.2.9.4", "SAG T1", 4), _series("1.2.9.5", "AX T2 FLAIR", 5), _series("1.2.9.6", "FLAIR", 6),
              _series("1.2.9.7", "FLAIR outline", 7, modality="OT", secondary_capture=True)]
    named = {choice: [s.uid for s in io.series_named(series, choice)]
             for choice in (" 1.2.9.5 ", " 5 ", "4", "sag t1", "flair", "t2 fl", "outline", "t2 flair x")}
    assert named == {" 1.2.9.5 ": ["1.2.9.5"], " 5 ": ["1.2.9.5"], "4": ["1.2.9.4"], "sag t1": ["1.2.9.4"],
                     "flair": ["1.2.9.6"], "t2 fl": ["1.2.9.5"], "outline": ["1.2.9.7"], "t2 flair x": []}


def test_series_named_prefers_the_images_to_a_picture_sharing_their_description():
    """'AX FLAIR' (MR) and 'AX FLAIR' (its outline series, a Secondary Capture) and 'AX FLAIR' (its SEG): the
    images alone; two derived series alone matching are both given (nothing better to choose).
    (Kills: the derived filter made only above two matches, or keeping the derived ones; its fallback dropped.)"""
    images, picture = _series("1.1", "AX FLAIR", 3), _series("1.2", "AX FLAIR", 300, "OT", True)
    seg = _series("1.3", "AX FLAIR", 301, modality="SEG")
    assert [s.uid for s in io.series_named([picture, images], "ax flair")] == ["1.1"]
    assert [s.uid for s in io.series_named([picture, images, seg], "flair")] == ["1.1"]
    assert [s.uid for s in io.series_named([picture, seg, _series("1.4", "T1", 2)], "ax flair")] == ["1.2", "1.3"]


# ---- segment.refuse_series_named_nowhere ------------------------------------------------------------------------

CHOOSE = "choose one with --series TEXT (its series number, its description or a part of it, or its UID)"


def _study(name, *series):
    from pathlib import Path

    return DicomStudy(name=name, folder=Path("/nonexistent") / name, uid=f"9.{name}", series=tuple(series))


def test_a_long_listing_of_the_series_no_study_holds_is_ordered_by_count_then_number_and_cut_at_six():
    """Four studies, none holding 'perfusion': A #3 'AX FLAIR', #10 'T1'; B #3 'AX FLAIR', #2 'DWI'; C #7 'SWI' and
    one with neither number nor description; D #1 'LOC', #8 'ADC'. Seven kinds: #3 in 2 studies first, then those in
    1 by number (1, 2, 7, 8, 10), the one without a number last; six shown, 'and 1 more'.
    (Kills: the count sorted upwards; the numbers sorted downwards; six shown cut to five; 'more' said only beyond
    seven.)"""
    from DeepWMLLib.segment import refuse_series_named_nowhere

    studies = [_study("A", _series("1", "AX FLAIR", 3), _series("2", "T1", 10)),
               _study("B", _series("3", "AX FLAIR", 3), _series("4", "DWI", 2)),
               _study("C", _series("5", "SWI", 7), _series("6", "")),
               _study("D", _series("7", "LOC", 1), _series("8", "ADC", 8))]
    with pytest.raises(DeepWMLError) as raised:
        refuse_series_named_nowhere([(s.name, s.folder, s) for s in studies], "perfusion")
    assert str(raised.value) == (
        "--series 'perfusion' matches no series in any of the 4 DICOM studies given; they hold series 3 'AX FLAIR' "
        "(in 2); series 1 'LOC' (in 1); series 2 'DWI' (in 1); series 7 'SWI' (in 1); series 8 'ADC' (in 1); series 10 "
        f"'T1' (in 1); and 1 more; {CHOOSE}")
    with pytest.raises(DeepWMLError) as raised:  # six kinds: no 'more'
        refuse_series_named_nowhere([(s.name, s.folder, s) for s in studies[:3]], "perfusion")
    assert str(raised.value) == (
        "--series 'perfusion' matches no series in any of the 3 DICOM studies given; they hold series 3 'AX FLAIR' "
        f"(in 2); series 2 'DWI' (in 1); series 7 'SWI' (in 1); series 10 'T1' (in 1); '(no description)' (in 1); "
        f"{CHOOSE}")


def test_folders_and_studies_are_named_as_what_was_given(tmp_path, monkeypatch):
    """A DICOM folder given beside a study of an export, neither holding 'T2': 'DICOM folders and studies'; two
    folders: 'DICOM folders' (the series read from their headers, io.dicom_series).
    (Kills: any study making it 'DICOM studies'; the studies left out of the check, so nothing refused.)"""
    from DeepWMLLib.segment import refuse_series_named_nowhere

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    held = {a: [_series("1", "AX FLAIR", 3)], b: [_series("2", "T1", 4)]}
    monkeypatch.setattr(io, "dicom_series", lambda path: held[path])
    study = _study("S", _series("3", "DWI", 5))
    with pytest.raises(DeepWMLError, match=r"in any of the 2 DICOM folders and studies given; they hold series 3 'AX "
                                           r"FLAIR' \(in 1\); series 5 'DWI' \(in 1\);"):
        refuse_series_named_nowhere([("a", a, None), ("S", study.folder, study)], "T2")
    with pytest.raises(DeepWMLError, match="in any of the 2 DICOM folders given; they hold series 3 'AX FLAIR'"):
        refuse_series_named_nowhere([("a", a, None), ("b", b, None)], "T2")
    assert refuse_series_named_nowhere([("a", a, None), ("b", b, None)], "t1") is None  # b holds it
    with pytest.raises(DeepWMLError, match="in any of the 2 DICOM studies given"):
        refuse_series_named_nowhere([("S", study.folder, study), ("T", study.folder, study)], "T2")


def test_a_folder_whose_series_cannot_be_told_or_images_alone_make_no_refusal(tmp_path, monkeypatch):
    """Only where every DICOM case is known to lack the series is --series refused up front: a folder whose headers
    cannot be read (DeepWMLError), or with no series of its own (a catalogue, damaged files), might hold it, so no
    refusal, even beside a folder that lacks it; image files take no --series (none refused, nothing to list). A case
    that failed already (a folder that cannot be listed) fails whatever --series names: the other folder's lack
    refuses the run, in that folder's own words.
    (Kills: the unreadable or empty folder skipped instead of ending the check; the check going on with no DICOM
    case; a failed case's folder read as a DICOM folder.)"""
    from DeepWMLLib.segment import refuse_series_named_nowhere

    broken, empty, other, image = tmp_path / "broken", tmp_path / "empty", tmp_path / "other", tmp_path / "x.nii.gz"
    for folder in (broken, empty, other):
        folder.mkdir()
    image.write_bytes(b"")

    def series_of(path):
        if path == broken:
            raise DeepWMLError("damaged headers")
        return {empty: [], other: [_series("1", "T1", 4)]}[path]

    monkeypatch.setattr(io, "dicom_series", series_of)
    assert refuse_series_named_nowhere([("broken", broken, None), ("other", other, None)], "FLAIR") is None
    assert refuse_series_named_nowhere([("empty", empty, None), ("other", other, None)], "FLAIR") is None
    assert refuse_series_named_nowhere([("x", image, None)], "FLAIR") is None
    failed = DeepWMLError(f"{empty} cannot be read (Permission denied)")
    with pytest.raises(DeepWMLError, match=f"{other} holds 1 DICOM series and none match --series 'FLAIR': series 4"):
        refuse_series_named_nowhere([("empty", empty, failed), ("other", other, None)], "FLAIR")


# ---- io.mask_source -----------------------------------------------------------------------------------------------

def test_mask_source_is_the_series_of_a_dicom_folder_and_none_for_anything_else(tmp_path):
    """The series read_image reads of a folder of one series, whatever it is called (a T2 TSE: no FLAIR needed to
    place a SEG's frames); None for no FLAIR, an image in memory, a file, and a folder without DICOM (what is wrong
    with it is said where the FLAIR is read).
    (Kills: the type check joined to the folder check by 'and' (None and an image reach os.path.isdir); DeepWML's
    refusals let through; the folder's series chosen strictly, as a study of an export.)"""
    import SimpleITK as sitk

    from conftest import make_volume, write_dicom_series

    image, _ = make_volume(size=(12, 10, 3), spacing=(1.0, 1.0, 4.0), dtype=sitk.sitkInt16)
    folder = write_dicom_series(tmp_path / "t2", image, uid="1.2.3.47", description="AX T2 TSE", number=2)
    assert io.mask_source(folder).uid == "1.2.3.47"
    assert io.mask_source(str(folder)).uid == "1.2.3.47"
    (tmp_path / "nothing").mkdir()
    sitk.WriteImage(image, str(tmp_path / "scan.nrrd"))
    for given in (None, image, tmp_path / "scan.nrrd", tmp_path / "nothing", tmp_path / "missing"):
        assert io.mask_source(given) is None, given


def _sparse_seg_of_an_uneven_series(tmp_path):
    """test_dicom_seg_mask's case: a highdicom SEG without its empty frames (lowest frame on slice 2) of a series of
    slices 0, 5, 10.6, 15, 20, 25.8, 30 mm up, which read alone lies on no grid; (FLAIR folder, SEG, the same mask as
    a file on the FLAIR)."""
    import numpy as np
    import SimpleITK as sitk

    from conftest import stepped_positions, write_dicom_series

    pytest.importorskip("highdicom")
    from test_dicom_seg_mask import LESION, PATIENT, as_file, highdicom_seg, phantom

    image = phantom(spacing=(0.7, 0.9, 5.0))
    folder = write_dicom_series(tmp_path / "flair", image, uid="1.2.3.4.5", description="AX T2 FLAIR", number=7,
                                extra=PATIENT, positions=stepped_positions(image, [5.0, 5.6, 4.4, 5.0, 5.8, 4.2]))
    flair = io.read_image(folder)
    mask = (sitk.GetArrayFromImage(flair) >= LESION).astype(np.uint8)
    mask[:2] = 0
    mask[2] = mask[3]
    highdicom_seg(folder, tmp_path / "rater.dcm", {"WMH": mask})
    return folder, tmp_path / "rater.dcm", as_file(mask, flair, tmp_path / "prediction.nrrd")


def test_the_flair_folder_places_a_sparse_segs_frames_through_every_way_a_mask_is_given(tmp_path):
    """evaluate_case and consensus_check given the files (Python API), and deepwml evaluate's manifest with a flair
    column: the SEG read with the FLAIR folder's series, Dice 1 against the same mask as a file (each rater's mask
    against itself is 1 by definition of Dice: 2|A n A| / (|A| + |A|)). Without the FLAIR each is refused.
    (Kills: consensus_check's own reading of a file given without the FLAIR; evaluate's manifest reading its masks
    without the case's flair, a bug: such a case failed saying to give the FLAIR that its row gives.)"""
    import json

    from DeepWMLLib.cli import main
    from DeepWMLLib.consensus import consensus_check
    from DeepWMLLib.evaluation import evaluate_case

    folder, seg, prediction = _sparse_seg_of_an_uneven_series(tmp_path)
    assert evaluate_case(prediction, seg, flair=str(folder))["dice"] == 1.0
    assert consensus_check(seg, prediction, flair=str(folder))["dice"] == 1.0
    with pytest.raises(DeepWMLError, match="give the FLAIR's DICOM series"):
        consensus_check(seg, prediction)
    (tmp_path / "cases.csv").write_text("case,prediction,reference,flair\nc1,prediction.nrrd,rater.dcm,flair\n",
                                        encoding="utf-8")
    assert main(["evaluate", "--manifest", str(tmp_path / "cases.csv"), "-o", str(tmp_path / "out")]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text(encoding="utf-8"))
    assert summary["failed"] == []


# ---- segment.location_inputs / mask_location without a ventricle model -------------------------------------------

def test_no_ventricle_model_makes_no_split_and_runs_no_network(monkeypatch):
    """ventricle_model None (export's --no-location): location_inputs and mask_location give None at once, before
    the brain model is loaded or a network runs.
    (Kills: location_inputs going on without a ventricle model; mask_location reading the None it gets.)"""
    import numpy as np
    import SimpleITK as sitk

    from DeepWMLLib import segment

    ran = []
    monkeypatch.setattr(inference, "predict_maps", lambda *a, **k: ran.append(1))
    image = sitk.GetImageFromArray(np.zeros((3, 8, 8), np.int16))
    mask = sitk.GetImageFromArray(np.zeros((3, 8, 8), np.uint8))
    assert segment.location_inputs(image, None) is None
    assert segment.mask_location(image, mask, None) is None
    assert ran == []



def test_inputs_made_once_serve_every_mask_and_are_never_changed():
    """location_inputs of the sample stored with its rows and columns running against LPS (DICOMOrient 'RAS': the same
    scan; from_axial_stack flips such a stack back in place where it is given up) measured against masks in turn: the kept ventricles are the same bytes after
    each, and each mask's split is what mask_location makes running the networks itself. They record the device the
    networks ran on (resolved: never 'auto') and the brain model by its name and digest, as the shipped default's.
    (Kills: the kept stack given up to from_axial_stack, flipped in place, so the next mask's split measured from
    mirrored ventricles; the device recorded as asked; the brain model's name recorded as its digest.)"""
    import numpy as np
    import SimpleITK as sitk

    from DeepWMLLib import segment

    sample = Path(__file__).resolve().parents[1] / "Resources" / "Sample"
    ventricles = Path(__file__).resolve().parents[1] / "Resources" / "Models" / "deepwml_vent8_synth_v1.pt"
    image = sitk.DICOMOrient(io.read_image(sample / "sample_flair.nii.gz"), "RAS")
    truth = sitk.DICOMOrient(sitk.ReadImage(str(sample / "sample_flair_truth.nii.gz")) > 0, "RAS")
    upper = sitk.Image(truth)
    upper[:, :, :11] = 0
    inputs = segment.location_inputs(image, str(ventricles), device="auto")
    kept = inputs["ventricles"].copy()
    brain = segment.load_brain_model("default")
    assert (inputs["device"], inputs["brain_model"], inputs["brain_model_sha256"]) == (
        inference.resolve_device("auto"), brain.name, brain.digest)
    for mask in (truth, upper, truth):
        split = segment.mask_location(None, mask, inputs=inputs)
        assert np.array_equal(inputs["ventricles"], kept)
        fresh = segment.mask_location(image, mask, str(ventricles), device="auto") if mask is upper else None
        if fresh is not None:
            assert split["location"] == fresh["location"]
            assert np.array_equal(sitk.GetArrayFromImage(split["ventricles"]), sitk.GetArrayFromImage(fresh["ventricles"]))




def test_a_split_from_inputs_given_warns_of_too_little_ventricle_on_a_whole_brain():
    """mask_location with inputs given by hand (no network): 2000 voxels of 1 mm^3 of ventricle, 2.0 ml, under the
    7 ml an adult's hold, on a scan of 1400 ml intracranial volume (a whole brain: 1000 ml or more) is warned of; the
    lesion voxel 11 mm from the block's nearest face (column 30 against 19) is deep, 0.001 ml. At 900 ml (part of a
    brain) no warning. (Kills: the small-ventricles warning dropped from mask_location's warnings.)"""
    import types

    import numpy as np
    import SimpleITK as sitk

    from DeepWMLLib import segment

    lesion = np.zeros((20, 40, 40), np.uint8)
    lesion[10, 20, 30] = 1
    mask = sitk.GetImageFromArray(lesion)
    ventricles = np.zeros((20, 40, 40), bool)
    ventricles[5:15, 10:30, 10:20] = True
    inputs = {"frame": io.slice_frame(mask), "ventricles": ventricles, "brain_model": "b.pt", "brain_model_sha256": "b",
              "ventricle_model": types.SimpleNamespace(name="v.pt", digest="d" * 24, threshold=0.5),
              "intracranial_ml": 1400.0, "device": "cpu", "runner": "torch"}
    split = segment.mask_location(None, mask, inputs=inputs)
    assert split["location"]["judged"] and split["location"]["ventricles_ml"] == pytest.approx(2.0)
    assert split["location"]["deep_ml"] == pytest.approx(0.001) and split["location"]["periventricular_ml"] == 0
    assert len(split["warnings"]) == 1
    assert split["warnings"][0].startswith("only 2.0 ml of lateral ventricle found on a scan of 1400 ml intracranial")
    assert segment.mask_location(None, mask, inputs={**inputs, "intracranial_ml": 900.0})["warnings"] == []


# ---- export's --brain-model / --no-brain-mask where no split is made ----------------------------------------------

def _flair_and_mask(tmp_path):
    import numpy as np
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.arange(4 * 12 * 10, dtype=np.int16).reshape(4, 12, 10))
    sitk.WriteImage(image, str(tmp_path / "flair.nii.gz"))
    sitk.WriteImage(sitk.Cast(image >= 400, sitk.sitkUInt8), str(tmp_path / "mask.nii.gz"))
    return tmp_path / "flair.nii.gz", tmp_path / "mask.nii.gz"


def test_export_without_a_split_takes_segments_default_brain_settings_and_any_device(tmp_path):
    """export_case with no split (ventricle_model None or False): the brain model as segment runs it by default
    (True, "default", None, False) is no brain option given, so nothing is refused; nor is --device cuda on a
    machine without a GPU, since no network runs. The mask above 400 of 0..479 is the last 80 voxels of 1 mm^3:
    0.08 ml.
    (Kills: brain_model True taken for a model given; the device checked where no network runs.)"""
    from DeepWMLLib.export import export_case

    flair, mask = _flair_and_mask(tmp_path)
    for number, (ventricle, brain) in enumerate(((None, True), (False, "default"), (None, None), (False, False))):
        report = export_case(flair, mask, tmp_path / f"o{number}", ventricle_model=ventricle, brain_model=brain,
                             device="cuda")
        assert report["volume_ml"] == pytest.approx(0.08) and report["location"] is None


def test_export_names_the_brain_options_given_and_how_to_get_a_split(tmp_path):
    """Refused (UsageError) where no split is made: one option named with 'shapes', both with 'shape'; no split asked
    for (ventricle_model None or False: --no-location) says --no-location makes none; a split asked for with no model
    found would say to give --ventricle-model FILE.
    (Kills: the verb's number turned round; False not taken for no split asked for.)"""
    from DeepWMLLib.errors import UsageError
    from DeepWMLLib.export import export_case

    flair, mask = _flair_and_mask(tmp_path)
    for ventricle in (None, False):
        with pytest.raises(UsageError) as raised:
            export_case(flair, mask, tmp_path / "o", ventricle_model=ventricle, brain_gate=False)
        assert str(raised.value) == ("--no-brain-mask shapes only the periventricular/deep split, which needs a "
                                     "ventricle model: --no-location makes none")
        with pytest.raises(UsageError) as raised:
            export_case(flair, mask, tmp_path / "o", ventricle_model=ventricle, brain_model="b.pt", brain_gate=False)
        assert str(raised.value) == ("--brain-model and --no-brain-mask shape only the periventricular/deep split, "
                                     "which needs a ventricle model: --no-location makes none")
    assert not (tmp_path / "o").exists()


# ---- the Slicer Logic's kept split networks (CoreLogic._volumeLocationInputs) ------------------------------------

try:  # slicer-core: the Logic on real MRML nodes
    import slicer  # noqa: F401
    import sys

    sys.path.insert(0, str(Path(__file__).parent / "slicer" / "support"))
    import slicer_fixtures

    scene = slicer_fixtures.scene  # the fixture, by its name
except ImportError:  # pragma: no cover
    slicer = None


@pytest.mark.skipif(slicer is None, reason="needs slicer-core")
def test_the_kept_split_networks_are_kept_by_model_file_and_digest_device_and_brain_model(scene, monkeypatch,
                                                                                         tmp_path):
    """The split networks' work is kept by all it depends on. On the sample and its rater's mask: a second update
    runs nothing; the same ventricle model copied under another name runs them again and the split names the copy;
    a model at the same path whose contents (digest) changed runs them and names the new digest; device auto after
    cpu runs them; another brain model (another digest) runs them and the report names its digest; precision fp32
    after auto alone runs them. While they run,
    the earlier volume's are let go; what is kept cannot be written; forgetKept lets it go (the next update runs).
    Counts worked out by hand: one run per changed setting, 7 in all.
    (Kills: the ventricle model's path, its digest, the brain model or its digest, the device or the precision dropped
    from the key; the earlier work kept while the networks run; the kept ventricles writable; forgetKept keeping them.)"""
    import copy
    import shutil

    import SimpleITK as sitk

    from DeepWMLLib import segment
    from DeepWMLSlicerLib import MRMLConversion as mrml
    from DeepWMLSlicerLib.CoreLogic import DeepWMLCoreLogic

    sample = Path(__file__).resolve().parents[1] / "Resources" / "Sample"
    ventricles = Path(__file__).resolve().parents[1] / "Resources" / "Models" / "deepwml_vent8_synth_v1.pt"
    volume = mrml.volumeFromImage(sitk.ReadImage(str(sample / "sample_flair.nii.gz")), "sample_flair")
    manual = mrml.segmentationFromMask(sitk.ReadImage(str(sample / "sample_flair_truth.nii.gz")) > 0, volume,
                                       name="rater")
    logic = DeepWMLCoreLogic()
    runs, predict = [], inference.predict_maps

    def counted(*args, **kwargs):
        runs.append(logic._locationInputs)  # what is kept while the networks run
        return predict(*args, **kwargs)

    monkeypatch.setattr(inference, "predict_maps", counted)

    def statistics(model=ventricles, device="cpu", precision="auto"):
        return logic.lesionStatistics(manual, volume, ventricleModel=str(model), device=device, precision=precision)

    first = statistics()
    assert len(runs) == 1 and first["location"]["ventricle_model"] == "deepwml_vent8_synth_v1.pt"
    assert logic._locationInputs[1]["ventricles"].flags.writeable is False
    assert statistics() == first and len(runs) == 1
    twin = tmp_path / "vent_copy.pt"
    shutil.copy(ventricles, twin)
    named = statistics(twin)
    assert len(runs) == 2 and named["location"]["ventricle_model"] == "vent_copy.pt"
    assert named["location"]["ventricle_model_sha256"] == first["location"]["ventricle_model_sha256"]
    load_ventricle, load_brain = segment.load_ventricle_model, segment.load_brain_model

    def changed(load, digest):
        def load_changed(spec):
            loaded = copy.copy(load(spec))
            if loaded is not None:
                loaded.digest = digest
            return loaded
        return load_changed

    monkeypatch.setattr(segment, "load_ventricle_model", changed(load_ventricle, "f" * 24))  # the file rewritten
    rewritten = statistics(twin)
    assert len(runs) == 3 and rewritten["location"]["ventricle_model_sha256"] == "f" * 24
    statistics(twin, device="auto")  # each step below changes one setting alone
    assert len(runs) == 4
    monkeypatch.setattr(segment, "load_brain_model", changed(load_brain, "e" * 24))  # another brain model
    brain = statistics(twin, device="auto")
    assert len(runs) == 5 and brain["brain_model_sha256"] == "e" * 24
    statistics(twin, device="auto", precision="fp32")
    assert len(runs) == 6
    assert runs == [None] * 6  # the earlier volume's let go before each run
    logic.forgetKept()
    statistics(twin, device="auto", precision="fp32")
    assert len(runs) == 7
