"""The module's logic without GUI on real MRML nodes: segmentVolume end to end (oracle network, so
geometry is tested independently of weights), worker-thread jobs and cancel, statistics, comparison,
rater consensus, saving, slice jumps and dependency checks."""

from __future__ import annotations

import csv
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).parent / "slicer" / "support"))

import slicer  # noqa: E402
from conftest import REPO, make_volume, mni_t1_thick, oracle_network, rotation  # noqa: E402
from DeepWMLLib import io  # noqa: E402
from DeepWMLLib.errors import Cancelled, DeepWMLError  # noqa: E402
from DeepWMLLib.evaluation import evaluate_case  # noqa: E402
from DeepWMLLib.report import lesion_report  # noqa: E402
from slicer_fixtures import (blockingSegmentation, gatedChange, lateSegmentation, onnxCache, scene,  # noqa: E402,F401 (fixtures)
                             seriesOfFrames)

from DeepWMLSlicerLib import MRMLConversion as mrml  # noqa: E402
from DeepWMLSlicerLib.CoreLogic import LESION_TABLE, MODEL_FILE_CHOICE, DeepWMLCoreLogic  # noqa: E402

OBLIQUE = dict(direction=rotation(0.2, -0.1, 0.35), spacing=(0.9, 0.9, 5.0), blobs=((0.3, 0.65, 0.5, 6.0),))


def dice(a: sitk.Image, b: sitk.Image) -> float:
    x, y = sitk.GetArrayFromImage(a) > 0, sitk.GetArrayFromImage(b) > 0
    return 2.0 * (x & y).sum() / (x.sum() + y.sum())


def test_segment_volume_finds_the_lesion_where_it_is_on_an_oblique_thick_slice_volume(scene, monkeypatch, tiny_model):
    oracle_network(monkeypatch)
    flair, truth = make_volume(**OBLIQUE)
    volume = mrml.volumeFromImage(flair, "Patient FLAIR")
    fractions = []
    segmentation = DeepWMLCoreLogic().segmentVolume(volume, device="cpu", modelPaths=[str(tiny_model)],
                                                    progress=lambda f, m: fractions.append(f))

    assert segmentation.GetName() == "Patient FLAIR WMH"
    assert fractions[-1] == 1.0 and fractions == sorted(fractions)
    assert dice(mrml.maskFromSegmentation(segmentation, volume), truth) > 0.9
    report = DeepWMLCoreLogic().lesionStatistics(segmentation, volume)
    expected = lesion_report(truth)
    assert report["lesion_count"] == 1
    assert report["volume_ml"] == pytest.approx(expected["volume_ml"], rel=0.15)
    np.testing.assert_allclose(report["lesions"][0]["centroid_mm"], expected["lesions"][0]["centroid_mm"], atol=1.0)
    assert [s["index"] for s in report["slices"]] == [s["index"] for s in expected["slices"]]
    assert report["device"] == "cpu" and report["model"] == ["tiny.pt"]


def test_volume_under_a_transform_is_segmented_in_world_space(scene, monkeypatch, tiny_model):
    oracle_network(monkeypatch)
    flair, truth = make_volume(**OBLIQUE)
    volume = mrml.volumeFromImage(flair, "moved")
    transform = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    matrix = np.eye(4)
    matrix[:3, :3] = rotation(0.0, 0.1, 0.5)
    matrix[:3, 3] = (25.0, -10.0, 4.0)
    transform.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(matrix))
    volume.SetAndObserveTransformNodeID(transform.GetID())

    segmentation = DeepWMLCoreLogic().segmentVolume(volume, device="cpu", modelPaths=[str(tiny_model)])
    assert segmentation.GetParentTransformNode() is None
    moved = mrml.maskFromSegmentation(segmentation, volume)  # exported onto the transformed volume's grid
    assert dice(moved, truth) > 0.9
    world = sitk.GetArrayFromImage(moved)
    hardened = mrml.volumeFromImage(mrml.imageFromVolume(volume), "hardened")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(mrml.maskFromSegmentation(segmentation, hardened)), world)


def test_a_volume_moved_while_it_is_segmented_gets_its_result_where_it_is_shown_at_the_end(scene, monkeypatch,
                                                                                           tiny_model):
    """The panel stays usable during a run: a transform set or changed meanwhile (a registration adjusted) left the
    result where the volume had been when the run started, 10 mm (two slices) off the lesions it marks, without a
    word (Dice 0 on the volume). The mask belongs to the volume's voxels: it goes where they are shown at the end.
    A volume whose voxel grid changed meanwhile (resampled or cropped in place) is refused, the scene left as it was."""
    oracle_network(monkeypatch)
    flair, truth = make_volume(**OBLIQUE)
    volume = mrml.volumeFromImage(flair, "FLAIR")
    logic = DeepWMLCoreLogic()
    logic.workerPython = None
    job = logic.startSegmentation(volume, device="cpu", modelPaths=[str(tiny_model)], location=False)
    assert job.wait(60)
    transform = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    matrix = np.eye(4)
    matrix[:3, :3] = rotation(0.0, 0.1, 0.3)
    matrix[:3, 3] = (0.0, 0.0, 10.0)
    transform.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(matrix))
    volume.SetAndObserveTransformNodeID(transform.GetID())
    result = logic.finishSegmentation(job)
    assert dice(mrml.maskFromSegmentation(result, volume), truth) > 0.9
    assert logic.rerunLoses(result, volume) is None

    job = logic.startSegmentation(volume, device="cpu", modelPaths=[str(tiny_model)], location=False)
    assert job.wait(60)
    slicer.util.updateVolumeFromArray(volume, slicer.util.arrayFromVolume(volume)[:, :, :30].copy())
    with pytest.raises(DeepWMLError, match="^'FLAIR' changed while it was being segmented .*; segment it again$"):
        logic.finishSegmentation(job)
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 1


def test_a_left_handed_thin_pixel_file_under_a_transform_is_segmented_and_measured_as_the_command_line_does(
        scene, monkeypatch, tmp_path, tiny_model):
    """A file with a left-handed voxel grid (an oblique FLAIR stored with a flipped axis, as NIfTI in FSL's
    radiological order), 0.45 x 0.45 x 5 mm voxels, far from the origin, loaded with Slicer's reader (which
    stores its slices in reverse order) and put under a transform: the result, exported on the volume's grid,
    is deepwml segment's mask of the hardened scan voxel for voxel, and the volume, lesions and every slice's
    LV and LV group are its report's (slices matched by where they lie: the module counts them on Slicer's grid)."""
    from DeepWMLLib.cli import main

    oracle_network(monkeypatch)
    flair, _ = make_volume(size=(120, 110, 9), spacing=(0.45, 0.45, 5.0), origin=(112.3, -87.6, 40.2),
                           direction=rotation(0.15, -0.1, 0.3) @ np.diag([1.0, -1.0, 1.0]),
                           blobs=((0.3, 0.65, 0.5, 6.0), (0.7, 0.4, 0.3, 4.0)))
    sitk.WriteImage(sitk.Cast(flair, sitk.sitkInt16), str(tmp_path / "flair.nrrd"))
    volume = mrml.loadVolumeFile(str(tmp_path / "flair.nrrd"), "flair")
    transform = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    matrix = np.eye(4)
    matrix[:3, :3] = rotation(0.05, 0.1, -0.4)
    matrix[:3, 3] = (17.0, -8.5, 3.25)
    transform.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(matrix))
    volume.SetAndObserveTransformNodeID(transform.GetID())
    # the scan as the views show it, worked out here from the file: the transform applied to its IJK -> RAS
    moved = matrix @ np.diag([-1.0, -1.0, 1.0, 1.0]) @ io.ijk_to_lps(flair)
    spacing = np.linalg.norm(moved[:3, :3], axis=0)
    world = sitk.Cast(flair, sitk.sitkInt16)
    world.SetDirection((np.diag([-1.0, -1.0, 1.0]) @ moved[:3, :3] / spacing).ravel().tolist())
    world.SetOrigin((np.diag([-1.0, -1.0, 1.0]) @ moved[:3, 3]).tolist())
    hardened = tmp_path / "hardened.nrrd"
    sitk.WriteImage(world, str(hardened))

    logic = DeepWMLCoreLogic()
    segmentation = logic.segmentVolume(volume, device="cpu", modelPaths=[str(tiny_model)], location=False)
    assert main(["segment", str(hardened), "-o", str(tmp_path / "cli"), "--model", str(tiny_model), "--device", "cpu",
                 "--no-location"]) == 0
    cli = sitk.ReadImage(str(tmp_path / "cli" / "hardened_wmh.nrrd"))
    mask = mrml.maskFromSegmentation(segmentation, volume)
    onCliGrid = sitk.Resample(mask, cli, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    assert sitk.GetArrayFromImage(cli).sum() > 500
    np.testing.assert_array_equal(sitk.GetArrayFromImage(onCliGrid), sitk.GetArrayFromImage(cli))

    report = logic.lesionStatistics(segmentation, volume)
    expected = json.loads((tmp_path / "cli" / "hardened_report.json").read_text(encoding="utf-8"))
    assert report["volume_ml"] == pytest.approx(expected["volume_ml"], rel=1e-5)
    assert report["lesion_count"] == expected["lesion_count"]
    toRAS = np.diag([-1.0, -1.0, 1.0])
    cliSlice = {}
    for s in expected["slices"]:  # each slice of the report by its centre (RAS), on the hardened scan
        centre = cli.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in cli.GetSize()[:2]] + [s["index"]])
        cliSlice[tuple(np.round(toRAS @ centre, 3))] = (s["lv_ml"], s["lv_group"])
    shown = {tuple(np.round(mrml.sliceCenterRAS(volume, s["index"]), 3)): (s["lv_ml"], s["lv_group"])
             for s in report["slices"]}
    assert shown == cliSlice and any(group for _, group in shown.values())


def test_cancel_raises_and_leaves_no_segmentation(scene, tiny_model):
    flair, _ = make_volume()
    volume = mrml.volumeFromImage(flair, "flair")
    with pytest.raises(Cancelled):
        DeepWMLCoreLogic().segmentVolume(volume, device="cpu", modelPaths=[str(tiny_model)], cancel=lambda: True)
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0


def test_job_runs_in_a_worker_thread_and_cancel_stops_it(scene, monkeypatch):
    started = blockingSegmentation(monkeypatch)
    flair, _ = make_volume()
    volume = mrml.volumeFromImage(flair, "flair")
    logic = DeepWMLCoreLogic()
    job = logic.startSegmentation(volume, device="cpu")
    assert started.wait(5)
    assert not job.done  # startSegmentation returned while the work goes on: the GUI stays responsive
    job.cancel()
    assert job.wait(5) and job.cancelled
    with pytest.raises(Cancelled):
        logic.finishSegmentation(job)
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0


def test_the_precision_chosen_reaches_the_networks_in_a_thread_and_in_a_worker_process(scene, tiny_model, precisions_asked):
    """deepwml segment has --precision; the module had no such choice, so on a CPU that computes bf16 natively a
    user could not run fp32 in Slicer (the way out of NaN probabilities). segmentVolume and startSegmentation take
    it (default auto, as before) and hand it to the networks, in a worker thread and in a worker process."""
    asked = precisions_asked
    flair, _ = make_volume()
    volume = mrml.volumeFromImage(flair, "flair")
    logic = DeepWMLCoreLogic()
    logic.workerPython = None  # a worker thread, in this process
    run = dict(device="cpu", modelPaths=[str(tiny_model)], brainMask=False, location=False)
    logic.segmentVolume(volume, **run)
    assert asked == ["auto"] * 2  # the default is unchanged (the lesion network, and the brain's for the checks)
    logic.segmentVolume(volume, precision="fp32", **run)
    job = logic.startSegmentation(volume, precision="fp32", **run)
    assert job.wait(30)
    logic.finishSegmentation(job)
    assert asked == ["auto"] * 2 + ["fp32"] * 4

    logic.workerPython = sys.executable  # a worker process (PythonSlicer in Slicer): what ran says what it got
    for precision in ("fp32", "bf16"):
        job = logic.startSegmentation(volume, precision=precision, **run)
        assert job.wait(120)
        if precision == "bf16" and job.error is not None:  # a CPU without native bf16 refuses it, as deepwml segment
            assert "needs a CPU with native bf16" in str(job.error)
            continue
        segmentation = logic.finishSegmentation(job)
        assert json.loads(segmentation.GetAttribute("DeepWML.run"))["settings"]["precision"] == precision


def test_four_grid_phases_reach_the_segmentation_as_deepwml_segments_grid_phases_do(scene, monkeypatch, tmp_path,
                                                                                     tiny_model):
    """deepwml segment --grid-phases 4 (the lesion map averaged over the network grid moved by half a pixel) had no
    way into the module. segmentVolume and startSegmentation take gridPhases (default 1): 4 gives the command
    line's very mask and settings, in a worker thread and a worker process, and another count is refused at once."""
    from DeepWMLLib.cli import main

    oracle_network(monkeypatch)
    flair, _ = make_volume()  # small lesions whose edges move with the grid's phase
    path = tmp_path / "a.nii.gz"
    sitk.WriteImage(flair, str(path))
    volume = mrml.volumeFromImage(flair, "flair")
    logic = DeepWMLCoreLogic()
    logic.workerPython = None
    run = dict(device="cpu", modelPaths=[str(tiny_model)], brainMask=False, location=False)
    one = logic.segmentVolume(volume, **run)
    four = logic.segmentVolume(volume, gridPhases=4, **run)
    for phases, node in ((1, one), (4, four)):
        assert main(["segment", str(path), "-o", str(tmp_path / f"cli{phases}"), "--model", str(tiny_model), "--device",
                     "cpu", "--no-brain-mask", "--grid-phases", str(phases)]) == 0
        cli = json.loads((tmp_path / f"cli{phases}" / "a_report.json").read_text(encoding="utf-8"))
        report = logic.lesionStatistics(node, volume)
        assert report["settings"] == cli["settings"] and report["settings"]["grid_phases"] == phases
        assert ("4 grid positions averaged" in logic.formatReport(report)) == (phases == 4)  # said with the result
        flipped = {**report, "settings": {**report["settings"], "tta": True}}
        assert "left-right flip averaged" in logic.formatReport(flipped) and "flip" not in logic.formatReport(report)
        assert report["volume_ml"] == pytest.approx(cli["volume_ml"], rel=1e-6)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(mrml.maskFromSegmentation(node, volume)),
                                      sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / f"cli{phases}" / "a_wmh.nii.gz"))))
    masks = [sitk.GetArrayFromImage(mrml.maskFromSegmentation(node, volume)) for node in (one, four)]
    assert (masks[0] != masks[1]).any()  # four phases are another result, not the default's under another name

    logic.workerPython = sys.executable  # a worker process (PythonSlicer in Slicer; the real tiny network) gets them
    job = logic.startSegmentation(volume, gridPhases=4, **run)
    assert job.wait(120)
    segmentation = logic.finishSegmentation(job)
    assert json.loads(segmentation.GetAttribute("DeepWML.run"))["settings"]["grid_phases"] == 4  # (its own network)

    nodes = scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")
    for start in (logic.segmentVolume, logic.startSegmentation):
        with pytest.raises(DeepWMLError, match="grid phases must be 1 or 4, got 2"):
            start(volume, gridPhases=2, **run)
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == nodes


def test_cancel_after_the_runs_last_look_still_leaves_the_scene_as_it_was(scene, monkeypatch, tiny_model):
    """segment_image looks at cancel only while the network runs: a Cancel during its post-processing and
    report (seconds on a real scan), or one that came just after the run ended and before the GUI's next
    poll, put the result into the scene all the same, over the WMH segment of the output chosen."""
    oracle_network(monkeypatch)
    started, gate = lateSegmentation(monkeypatch)
    flair, truth = make_volume(**OBLIQUE)
    volume = mrml.volumeFromImage(flair, "flair")
    edited = mrml.segmentationFromMask(truth, volume, name="edited by hand")
    logic = DeepWMLCoreLogic()
    for cancelWhen in ("during the report", "once ended"):
        job = logic.startSegmentation(volume, device="cpu", modelPaths=[str(tiny_model)], brainMask=False,
                                      location=False)
        assert started.wait(5)
        if cancelWhen == "during the report":
            job.cancel()
        gate.set()
        assert job.wait(30)
        if cancelWhen == "once ended":
            job.cancel()
        assert job.cancelled, cancelWhen
        with pytest.raises(Cancelled):
            logic.finishSegmentation(job, edited)
        started.clear()
        gate.clear()
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 1
    np.testing.assert_array_equal(sitk.GetArrayFromImage(mrml.maskFromSegmentation(edited, volume)),
                                  sitk.GetArrayFromImage(truth))


def test_rerun_into_an_existing_segmentation_replaces_only_the_wmh_segment(scene, monkeypatch, tiny_model):
    oracle_network(monkeypatch)
    flair, truth = make_volume(**OBLIQUE)
    volume = mrml.volumeFromImage(flair, "flair")
    segmentation = mrml.segmentationFromMask(truth * 0, volume, name="edited")
    mrml.segmentationFromMask(truth, volume, segmentation, segmentName="ventricles")
    result = DeepWMLCoreLogic().segmentVolume(volume, device="cpu", modelPaths=[str(tiny_model)],
                                              segmentationNode=segmentation)
    assert result is segmentation
    names = sorted(segmentation.GetSegmentation().GetNthSegment(i).GetName()
                   for i in range(segmentation.GetSegmentation().GetNumberOfSegments()))
    assert names == ["WMH", "ventricles"]
    assert dice(mrml.maskFromSegmentation(segmentation, volume), truth) > 0.9


def test_a_segmentation_holding_closed_surfaces_is_refused_as_output_before_the_run(scene, monkeypatch, tiny_model):
    """A segmentation whose segments are held as closed surfaces (its source representation: made from models or
    surface files) chosen as the output: the WMH mask put into it became a smoothed surface, and its lesion volume
    read 0.95 ml where a new segmentation's read 1.27 ml (Dice 0.86 between them), without a word. It is refused
    before the run, saying what to choose, and the segmentation is left as it was."""
    oracle_network(monkeypatch)
    flair, truth = make_volume(**dict(OBLIQUE, blobs=((0.3, 0.65, 0.5, 6.0), (0.7, 0.4, 0.3, 4.0))))
    volume = mrml.volumeFromImage(flair, "flair")
    surfaces = mrml.segmentationFromMask(truth, volume, name="from models", segmentName="tumour")
    surfaces.CreateClosedSurfaceRepresentation()
    surfaces.GetSegmentation().SetSourceRepresentationName(
        slicer.vtkSegmentationConverter.GetSegmentationClosedSurfaceRepresentationName())
    logic = DeepWMLCoreLogic()
    for attempt in (lambda: logic.outputFor(surfaces, volume),
                    lambda: logic.segmentVolume(volume, device="cpu", modelPaths=[str(tiny_model)],
                                                segmentationNode=surfaces)):
        with pytest.raises(DeepWMLError, match="^'from models' holds its segments as closed surfaces.*choose "
                                               "'Create new segmentation' as the output segmentation$"):
            attempt()
    assert surfaces.GetSegmentation().GetNumberOfSegments() == 1
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 1
    # a segmentation shown in 3D (a closed surface made beside its labelmaps) is written into as before
    labelmaps = mrml.segmentationFromMask(truth, volume, name="shown in 3D", segmentName="tumour")
    labelmaps.CreateClosedSurfaceRepresentation()
    assert logic.outputFor(labelmaps, volume) is labelmaps
    assert logic.segmentVolume(volume, device="cpu", modelPaths=[str(tiny_model)], segmentationNode=labelmaps) is labelmaps


def test_a_second_result_kept_beside_the_first_has_a_name_of_its_own(scene, monkeypatch, tiny_model):
    """Segment WMH again with the output set back to "Create new segmentation" (to keep the first result, e.g.
    to try another threshold) made a second node named "flair WMH" too: the reference and rater selectors,
    which show names alone, could not tell them apart."""
    oracle_network(monkeypatch)
    flair, _ = make_volume(**OBLIQUE)
    volume = mrml.volumeFromImage(flair, "flair")
    logic = DeepWMLCoreLogic()
    first = logic.segmentVolume(volume, device="cpu", modelPaths=[str(tiny_model)])
    second = logic.segmentVolume(volume, device="cpu", modelPaths=[str(tiny_model)], threshold=0.9)
    assert (first.GetName(), second.GetName()) == ("flair WMH", "flair WMH_1")
    assert logic.segmentVolume(volume, device="cpu", modelPaths=[str(tiny_model)], segmentationNode=first) is first
    assert first.GetName() == "flair WMH"  # a rerun into a node keeps its name


def test_a_new_result_takes_the_first_free_name(scene, monkeypatch, tiny_model):
    """The scene's GenerateUniqueName counted every rerun into a node (a name asked for, never used) and
    every result deleted since: a second result beside the first became "flair WMH_3", and a result made
    after the only one was deleted "flair WMH_4"."""
    oracle_network(monkeypatch)
    flair, _ = make_volume(**OBLIQUE)
    volume = mrml.volumeFromImage(flair, "flair")
    logic = DeepWMLCoreLogic()
    first = logic.segmentVolume(volume, device="cpu", modelPaths=[str(tiny_model)])
    for _ in range(2):  # reruns into it
        logic.segmentVolume(volume, device="cpu", modelPaths=[str(tiny_model)], segmentationNode=first)
    second = logic.segmentVolume(volume, device="cpu", modelPaths=[str(tiny_model)])
    assert (first.GetName(), second.GetName()) == ("flair WMH", "flair WMH_1")
    mrml.segmentationFromMask(sitk.Image(flair.GetSize(), sitk.sitkUInt8), volume, name="flair WMH_2")  # by hand
    mrml.removeNode(first)
    assert logic.segmentVolume(volume, device="cpu", modelPaths=[str(tiny_model)]).GetName() == "flair WMH"
    assert logic.segmentVolume(volume, device="cpu", modelPaths=[str(tiny_model)]).GetName() == "flair WMH_3"


def segmentedWithVentricles(monkeypatch, tmp_path, tiny_model):
    """An oblique volume segmented with the periventricular split (a tiny ventricle model): (logic, volume,
    result, the volume's true mask, the ventricle model's path)."""
    from conftest import tiny_model_file

    oracle_network(monkeypatch)
    ventricles = tiny_model_file(tmp_path / "vent.pt", labels={"0": "background", "1": "lateral_ventricles"})
    flair, truth = make_volume(**OBLIQUE)
    volume = mrml.volumeFromImage(flair, "flair")
    logic = DeepWMLCoreLogic()
    result = logic.segmentVolume(volume, device="cpu", modelPaths=[str(tiny_model)], location=str(ventricles))
    return logic, volume, result, truth, ventricles


def test_a_rerun_knows_when_the_ventricles_it_would_replace_were_edited(scene, monkeypatch, tmp_path, tiny_model):
    """The README invites editing the hidden 'Lateral ventricles' segment; a rerun with the split ticked
    replaced the edited ventricles without a word."""
    logic, volume, result, truth, ventricles = segmentedWithVentricles(monkeypatch, tmp_path, tiny_model)
    assert logic.rerunLoses(result, volume, ventricles=True) is None
    mrml.segmentationFromMask(truth, volume, result, segmentName=mrml.VENTRICLE_SEGMENT_NAME)  # drawn by hand
    assert logic.rerunLoses(result, volume) is None  # a run without the split keeps them
    assert logic.rerunLoses(result, volume, ventricles=True) == \
        "The segment Lateral ventricles of 'flair WMH' was edited, or moved against its volume, since DeepWML made it"
    logic.segmentVolume(volume, device="cpu", modelPaths=[str(tiny_model)], location=str(ventricles),
                        segmentationNode=result)
    assert logic.rerunLoses(result, volume, ventricles=True) is None


def test_a_result_saved_with_the_scene_and_opened_again_is_not_taken_for_edited(scene, monkeypatch, tmp_path,
                                                                                   tiny_model):
    """The fingerprint held where the volume's grid lies, which an oblique volume saved in a scene (.mrb) and
    opened again gets back only to the last bits: every rerun on a reopened scene asked about hand edits
    that were never made. One erased voxel is still an edit."""
    logic, volume, result, _, ventricles = segmentedWithVentricles(monkeypatch, tmp_path, tiny_model)
    result.GetSegmentation().CollapseBinaryLabelmaps(False)  # as the Segment Editor may: one layer for both
    result.CreateClosedSurfaceRepresentation()  # shown in 3D
    assert logic.rerunLoses(result, volume, ventricles=True) is None
    (tmp_path / "scene").mkdir()
    assert mrml._standalone["application"].SaveSceneToSlicerDataBundleDirectory(str(tmp_path / "scene"), None)
    scene.Clear(0)
    scene.SetURL(str(tmp_path / "scene" / "scene.mrml"))
    assert scene.Import()
    result, volume = scene.GetFirstNodeByName("flair WMH"), scene.GetFirstNodeByName("flair")
    assert logic.rerunLoses(result, volume, ventricles=True) is None

    erased = mrml.maskFromSegmentation(result, volume)
    erased[tuple(int(i) for i in np.argwhere(sitk.GetArrayViewFromImage(erased))[0][::-1])] = 0
    mrml.segmentationFromMask(erased, volume, result)
    assert logic.rerunLoses(result, volume) == ("The segment WMH of 'flair WMH' was edited, or moved against its "
                                                "volume, since DeepWML made it")


def test_a_result_whose_volume_was_moved_since_is_not_said_to_be_edited_alone(scene, monkeypatch, tmp_path, tiny_model):
    """The FLAIR put under a transform after segmenting (the result stays where it was made, in world space): the
    rerun's question said the segment 'was edited since DeepWML made it', which no one had done."""
    logic, volume, result, _, _ = segmentedWithVentricles(monkeypatch, tmp_path, tiny_model)
    transform = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    matrix = np.eye(4)
    matrix[:3, 3] = (0.0, 0.0, 12.0)
    transform.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(matrix))
    volume.SetAndObserveTransformNodeID(transform.GetID())
    assert "or moved against its volume" in logic.rerunLoses(result, volume)


def test_output_segmentation_deleted_during_the_run_gives_a_new_node_in_the_scene(scene, monkeypatch, tiny_model):
    oracle_network(monkeypatch)
    flair, truth = make_volume(**OBLIQUE)
    volume = mrml.volumeFromImage(flair, "flair")
    chosen = mrml.segmentationFromMask(truth * 0, volume, name="chosen")
    logic = DeepWMLCoreLogic()
    job = logic.startSegmentation(volume, device="cpu", modelPaths=[str(tiny_model)])
    scene.RemoveNode(chosen)  # the user deletes the output node while the worker runs
    assert job.wait(60)
    result = logic.finishSegmentation(job, chosen)
    assert result is not chosen and result.GetScene() is scene
    assert result.GetName() == "flair WMH"
    assert dice(mrml.maskFromSegmentation(result, volume), truth) > 0.9


def test_progress_reaches_100_percent_only_once_the_segmentation_is_in_the_scene(scene, tiny_model):
    """A real run (the tiny network): 1.0 comes last, once, with the segmentation node made; never backwards."""
    flair, _ = make_volume(size=(32, 32, 12))
    volume = mrml.volumeFromImage(flair, "flair")
    calls = []

    def record(fraction, message):
        calls.append((fraction, scene.GetNodesByClass("vtkMRMLSegmentationNode").GetNumberOfItems()))

    logic = DeepWMLCoreLogic()
    logic.segmentVolume(volume, device="cpu", modelPaths=[str(tiny_model)], progress=record, brainMask=False,
                        location=False)
    fractions = [f for f, _ in calls]
    assert fractions == sorted(fractions) and len(fractions) > 5
    assert fractions[-1] == 1.0 and fractions.count(1.0) == 1 and calls[-1][1] == 1
    assert all(nodes == 0 for _, nodes in calls[:-1])
    job = logic.startSegmentation(volume, device="cpu", modelPaths=[str(tiny_model)], brainMask=False, location=False)
    assert job.wait(60) and job.done and job.fraction < 1.0  # the GUI's bar is not full before the node is made
    logic.finishSegmentation(job)
    assert job.fraction == 1.0 and job.message == "done"


def test_consensus_line_never_contradicts_its_verdict():
    base = dict(volume_a_ml=1.0, volume_b_ml=1.0, n_lesions_a=1, n_lesions_b=1, worst_slices=[])
    fail = DeepWMLCoreLogic.formatConsensus(dict(base, dice=3398 / 4000, threshold=0.85, passed=False))
    assert fail.startswith("Dice 0.8495 < 0.85: FAIL")
    passed = DeepWMLCoreLogic.formatConsensus(dict(base, dice=0.8751, threshold=0.875, passed=True))
    assert passed.startswith("Dice 0.875 >= 0.875: PASS")  # was "0.875 >= 0.88"


def test_an_empty_mask_is_explained_in_the_panel(scene):
    """The panel showed "Dice 0.000, sensitivity 0.000, precision n/a" for an empty segmentation, with no word of why."""
    flair, truth = make_volume(**OBLIQUE)
    volume = mrml.volumeFromImage(flair, "flair")
    empty = mrml.segmentationFromMask(sitk.Image(truth) * 0, volume, name="empty")
    manual = mrml.segmentationFromMask(truth, volume, name="manual")
    logic = DeepWMLCoreLogic()
    shown = logic.formatComparison(logic.compareSegmentations(empty, manual, volume))
    assert "precision n/a" in shown and "Note: the prediction is empty: precision, HD95" in shown
    assert "Note: both raters' masks are empty" in logic.formatConsensus(logic.consensusCheck(empty, empty, 0.85, volume))


def test_a_labelmap_is_not_segmented(scene, tiny_model):
    flair, truth = make_volume()
    labelmap = mrml.volumeFromImage(truth, "manual mask", "vtkMRMLLabelMapVolumeNode")
    with pytest.raises(DeepWMLError, match="'manual mask' is a labelmap"):
        DeepWMLCoreLogic().segmentVolume(labelmap, device="cpu", modelPaths=[str(tiny_model)])
    with pytest.raises(DeepWMLError, match="is a labelmap"):
        DeepWMLCoreLogic().startSegmentation(labelmap, device="cpu", modelPaths=[str(tiny_model)])


def test_compare_matches_deepwmllib_on_the_same_masks_and_accepts_labelmaps(scene):
    flair, truth = make_volume(**OBLIQUE)
    volume = mrml.volumeFromImage(flair, "flair")
    predicted = sitk.BinaryDilate(truth, [1, 1, 0])
    prediction = mrml.segmentationFromMask(predicted, volume, name="DeepWML")
    reference = mrml.segmentationFromMask(truth, volume, name="manual")
    metrics = DeepWMLCoreLogic().compareSegmentations(prediction, reference, volume)
    expected = evaluate_case(predicted, truth)
    for key in ("dice", "sensitivity", "precision"):
        assert metrics[key] == pytest.approx(expected[key])
    assert metrics["sensitivity"] == 1.0 and metrics["precision"] < 0.9
    assert [s["index"] for s in metrics["slices"]] == [s["index"] for s in expected["slices"]]

    labelmap = mrml.volumeFromImage(truth, "manual labelmap", "vtkMRMLLabelMapVolumeNode")
    # with no volume given, the labelmap's grid is the common grid
    assert DeepWMLCoreLogic().compareSegmentations(prediction, labelmap)["dice"] == pytest.approx(expected["dice"])


def test_statistics_of_another_volumes_segmentation_say_so(scene):
    """The output selector keeps volume A's result when volume B is chosen: Update lesion statistics then
    measured A's lesions on B's grid (a part of them, on a smaller scan) and said nothing."""
    flair, truth = make_volume(**OBLIQUE)
    first = mrml.volumeFromImage(flair, "FLAIR 2024")
    result = mrml.segmentationFromMask(truth, first, name="FLAIR 2024 WMH")
    other = mrml.volumeFromImage(flair[:, :, :5], "FLAIR 2026")
    logic = DeepWMLCoreLogic()
    shown = logic.formatReport(logic.lesionStatistics(result, other))
    assert "Warning: 'FLAIR 2024 WMH' was drawn on 'FLAIR 2024', not on 'FLAIR 2026'" in shown
    assert "Warning" not in logic.formatReport(logic.lesionStatistics(result, first))


def test_statistics_of_the_result_of_a_volume_under_a_transform_on_another_volume_say_so(scene, monkeypatch, tiny_model):
    """The same with A under a transform (a registration): DeepWML's result of A, made where A is shown, holds no
    reference geometry, so its statistics on B said nothing, and Compare without a volume had no grid to use."""
    oracle_network(monkeypatch)
    flair, _ = make_volume(**OBLIQUE)
    first, other = mrml.volumeFromImage(flair, "FLAIR 2024"), mrml.volumeFromImage(flair[:, :, :5], "FLAIR 2026")
    transform = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    shift = np.eye(4)
    shift[:3, 3] = (3.0, -2.0, 1.0)
    transform.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(shift))
    first.SetAndObserveTransformNodeID(transform.GetID())
    logic = DeepWMLCoreLogic()
    result = logic.segmentVolume(first, device="cpu", modelPaths=[str(tiny_model)], location=False)
    shown = logic.formatReport(logic.lesionStatistics(result, other))
    assert "Warning: 'FLAIR 2024 WMH' was drawn on 'FLAIR 2024', not on 'FLAIR 2026'" in shown
    assert "drawn on" not in logic.formatReport(logic.lesionStatistics(result, first))
    assert logic.compareSegmentations(result, result)["dice"] == 1.0


def test_comparing_leaves_no_node_behind(scene):
    # exporting a segment without a colour table makes Slicer add "<segmentation>_ColorTable" each time
    flair, truth = make_volume(**OBLIQUE)
    volume = mrml.volumeFromImage(flair, "flair")
    prediction = mrml.segmentationFromMask(sitk.BinaryDilate(truth, [1, 1, 0]), volume, name="DeepWML")
    reference = mrml.segmentationFromMask(truth, volume, name="manual")
    before = sorted(scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes()))
    logic = DeepWMLCoreLogic()
    for _ in range(3):
        logic.compareSegmentations(prediction, reference, volume)
        logic.consensusCheck(prediction, reference, referenceVolumeNode=volume)
    after = sorted(scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes()))
    assert after == before


def test_the_panels_say_which_segments_and_labels_were_compared(scene):
    """A manual segmentation with a second segment (an infarct), a WMH segment beside one the rater added
    while correcting, a labelmap with two labels, one drawn on a cropped copy: the Dice changed with each,
    and the panel said nothing of what was taken."""
    flair, truth = make_volume(**OBLIQUE)
    volume = mrml.volumeFromImage(flair, "flair")
    logic = DeepWMLCoreLogic()
    ours = mrml.segmentationFromMask(truth, volume, name="DeepWML")
    mrml.segmentationFromMask(truth, volume, ours, segmentName=mrml.VENTRICLE_SEGMENT_NAME)  # DeepWML's own: no note
    infarct = sitk.Image(truth) * 0
    infarct[5:15, 5:15, 3:6] = 1
    manual = mrml.segmentationFromMask(truth, volume, name="manual", segmentName="lesion")
    mrml.segmentationFromMask(infarct, volume, manual, segmentName="infarct")
    comparison = logic.compareSegmentations(ours, manual, volume)
    assert comparison["dice"] < 0.9  # the infarct counted
    shown = logic.formatComparison(comparison)
    assert "Note: 'manual' has 2 segments ('lesion', 'infarct'): all were counted as lesion" in shown
    assert "DeepWML" not in shown
    consensus = logic.formatConsensus(logic.consensusCheck(manual, ours, 0.85, volume))
    assert "'manual' has 2 segments" in consensus

    corrected = mrml.segmentationFromMask(truth, volume, name="corrected")
    mrml.segmentationFromMask(infarct, volume, corrected, segmentName="missed lesions")
    comparison = logic.compareSegmentations(ours, corrected, volume)
    assert comparison["dice"] == 1.0  # 'missed lesions' left out
    assert "only the segment 'WMH' was counted as lesion, not 'missed lesions'" in logic.formatComparison(comparison)
    statistics = logic.formatReport(logic.lesionStatistics(corrected, volume))
    assert "Warning: of 'corrected', only the segment 'WMH' was counted" in statistics
    assert "Warning" not in logic.formatReport(logic.lesionStatistics(ours, volume))

    labels = sitk.Cast(truth, sitk.sitkUInt8) + 2 * sitk.Cast(infarct, sitk.sitkUInt8)
    labelmap = mrml.volumeFromImage(labels, "label file", "vtkMRMLLabelMapVolumeNode")
    shown = logic.formatComparison(logic.compareSegmentations(ours, labelmap, volume))
    assert "labelmap 'label file' has the labels 1, 2: all were counted as lesion" in shown
    single = mrml.volumeFromImage(truth, "one label", "vtkMRMLLabelMapVolumeNode")
    assert logic.compareSegmentations(ours, single, volume)["notes"] == []

    cropped = mrml.volumeFromImage(flair[:, :, :5], "flair cropped")
    drawnOnCrop = mrml.segmentationFromMask(truth[:, :, :5], cropped, name="rater C")
    shown = logic.formatComparison(logic.compareSegmentations(ours, drawnOnCrop, volume))
    assert "'rater C' was drawn on 'flair cropped', not on 'flair'" in shown
    assert logic.compareSegmentations(ours, ours, volume)["notes"] == []


def test_the_panels_say_which_segments_were_compared_where_two_are_named_wmh(scene):
    """A rater's two 'WMH' segments (both lesion, as the command line reads them) beside a segment of another name
    ('Brain'): the panel said "'rater' has 2 segments ('WMH', 'WMH'): all were counted as lesion; to count one alone,
    name it WMH", where the rater has three, 'Brain' was left out without a word, and both are named WMH already."""
    flair, truth = make_volume(size=(40, 40, 8), blobs=((0.3, 0.3, 0.5, 4.0), (0.7, 0.7, 0.5, 4.0)))
    volume = mrml.volumeFromImage(flair, "flair")
    halves = sitk.GetArrayFromImage(truth)
    first, second = halves.copy(), halves.copy()
    first[:, :, 20:], second[:, :, :20] = 0, 0
    first, second = (sitk.GetImageFromArray(half) for half in (first, second))
    for half in (first, second):
        half.CopyInformation(truth)
    brain = sitk.Image(truth) * 0
    brain[2:38, 2:38, 1:7] = 1
    rater = mrml.segmentationFromMask(first, volume, name="rater", segmentName="WMH")
    mrml.segmentationFromMask(second, volume, rater, segmentName="second")
    segmentation = rater.GetSegmentation()
    segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName("second")).SetName("WMH")
    logic = DeepWMLCoreLogic()
    reference = mrml.segmentationFromMask(truth, volume, name="truth")
    alone = logic.compareSegmentations(rater, reference, volume)
    assert alone["dice"] == 1.0  # both WMH segments counted
    assert alone["notes"] == ["'rater' has 2 segments named 'WMH': both were counted as lesion, together; to count "
                              "one alone, rename the other (Segment Editor)"]
    mrml.segmentationFromMask(brain, volume, rater, segmentName="Brain")
    comparison = logic.compareSegmentations(rater, reference, volume)
    assert comparison["dice"] == 1.0  # 'Brain' left out
    expected = ("of 'rater', only the 2 segments named 'WMH' were counted as lesion (together), not 'Brain'; to count "
                "them too, add them to 'WMH' (Segment Editor)")
    assert comparison["notes"] == [expected]
    assert f"Warning: {expected}" in logic.formatReport(logic.lesionStatistics(rater, volume))


def test_consensus_check_pass_fail_threshold_and_discordant_slices(scene):
    flair, truth = make_volume(**OBLIQUE)
    volume = mrml.volumeFromImage(flair, "flair")
    raterA = mrml.segmentationFromMask(truth, volume, name="rater A")
    shrunk = sitk.BinaryErode(truth, [1, 1, 0])
    raterB = mrml.segmentationFromMask(shrunk, volume, name="rater B")
    logic = DeepWMLCoreLogic()

    same = logic.consensusCheck(raterA, raterA, referenceVolumeNode=volume)
    assert same["passed"] and same["dice"] == 1.0 and same["worst_slices"] == []
    check = logic.consensusCheck(raterA, raterB, 0.85, volume)
    assert not check["passed"] and 0 < check["dice"] < 0.85
    lenient = logic.consensusCheck(raterA, raterB, 0.3, volume)
    assert lenient["passed"]
    assert "FAIL" in logic.formatConsensus(check) and "PASS" in logic.formatConsensus(lenient)
    areas = {s["index"]: s["disagreement_mm2"] for s in check["slices"]}
    assert check["worst_slices"][0] == max(areas, key=areas.get)
    assert str(check["worst_slices"][0]) in logic.formatConsensus(check)
    # the segmentations' reference volume is found without being passed
    assert logic.consensusCheck(raterA, raterB)["dice"] == pytest.approx(check["dice"])


def test_consensus_without_any_volume_says_what_to_choose(scene):
    raterA = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    raterA.GetSegmentation().AddEmptySegment("", "lesion")
    with pytest.raises(DeepWMLError, match="choose the FLAIR volume"):
        DeepWMLCoreLogic().consensusCheck(raterA, raterA)


def test_results_save_as_csv_table_and_json(scene, tmp_path):
    flair, truth = make_volume(**OBLIQUE)
    volume = mrml.volumeFromImage(flair, "flair")
    segmentation = mrml.segmentationFromMask(truth, volume, name="seg")
    logic = DeepWMLCoreLogic()
    results = {"report": logic.lesionStatistics(segmentation, volume),
               "comparison": logic.compareSegmentations(segmentation, segmentation, volume)}
    logic.saveResults(results, tmp_path / "slices.csv")
    rows = list(csv.DictReader(open(tmp_path / "slices.csv", encoding="utf-8-sig")))
    lesionSlices = [s["index"] for s in results["report"]["slices"] if s["area_mm2"] > 0]
    assert [int(r["index"]) for r in rows] == lesionSlices
    assert {float(r["dice"]) for r in rows} == {1.0} and all(r["lv_group"].startswith("G") for r in rows)
    logic.saveResults(results, tmp_path / "all.json")
    saved = json.loads((tmp_path / "all.json").read_text(encoding="utf-8"))
    assert saved["report"]["volume_ml"] == pytest.approx(results["report"]["volume_ml"])
    with pytest.raises(DeepWMLError, match=r"\.csv.*\.json"):
        logic.saveResults(results, tmp_path / "results.xlsx")

    headers, table, slices = logic.sliceTable(results)
    assert headers[:4] == ["Slice", "Area (mm²)", "LV (ml)", "LV group"] and slices == lesionSlices
    assert [row[0] for row in table] == [str(k) for k in lesionSlices]


def compared(flair, marks, manual):
    """The logic, its results (report and comparison) and the two masks as images, for a segmentation marking
    `marks` compared with a reference marking `manual` (arrays on `flair`'s voxels)."""
    images = []
    for array in (marks, manual):
        images.append(sitk.GetImageFromArray(array))
        images[-1].CopyInformation(flair)
    volume = mrml.volumeFromImage(flair, "flair")
    logic = DeepWMLCoreLogic()
    prediction = mrml.segmentationFromMask(images[0], volume, name="DeepWML")
    results = {"report": logic.lesionStatistics(prediction, volume),
               "comparison": logic.compareSegmentations(prediction, mrml.segmentationFromMask(images[1], volume,
                                                                                              name="manual"), volume)}
    return logic, results, images


def test_slice_table_never_shows_an_lv_that_reads_in_another_group_on_the_bundled_sample(scene):
    # the sample's grid (0.9489 mm pixels, 6 mm slices): 37 voxels are 0.19989 ml, G1, which the table showed as
    # "0.200" beside "G1" (a G2 figure to whoever reads it; the report says 0.19989)
    from DeepWMLLib import io

    flair = io.read_image(REPO / "Resources" / "Sample" / "sample_flair.nii.gz")
    marks = np.zeros(sitk.GetArrayViewFromImage(flair).shape, np.uint8)  # (k, j, i): k is the axial axis here
    for k, voxels in ((8, 37), (10, 38), (12, 30)):
        marks[k, 120, 100:100 + voxels] = 1
    mask = sitk.GetImageFromArray(marks)
    mask.CopyInformation(flair)
    volume = mrml.volumeFromImage(flair, "sample")
    logic = DeepWMLCoreLogic()
    report = logic.lesionStatistics(mrml.segmentationFromMask(mask, volume, name="seg"), volume)
    expected = lesion_report(mask)["slices"]
    assert report["slices"] == expected
    _, table, slices = logic.sliceTable({"report": report})
    shown = {k: (row[2], row[3]) for k, row in zip(slices, table)}
    assert shown[8][1] == "G1" and float(shown[8][0]) < 0.2 and shown[8][0].startswith("0.199")
    assert shown[10] == (f"{expected[10]['lv_ml']:.3f}", "G2") and shown[12] == (f"{expected[12]['lv_ml']:.3f}", "G1")


def test_comparison_table_gives_each_slice_the_reference_lv_group_deepwml_evaluate_gives_it(scene, tmp_path):
    # the table's only LV group was the segmentation's, while `deepwml evaluate` groups each slice's Dice by the
    # reference's (the paper's Fig. 4): on labelled patient26 14 of its 54 reference slices differ (or have none)
    flair, _ = make_volume()  # 0.9 x 0.9 mm pixels, 5 mm slices: 0.2 ml is 49.4 pixels
    marks, manual = (np.zeros(sitk.GetArrayViewFromImage(flair).shape, np.uint8) for _ in range(2))
    marks[3, 20, 10:40] = 1  # 30 pixels, G1 ...
    manual[3, 20:22, 10:40] = 1  # ... where the reference has 60, G2
    manual[5, 20, 10:20] = 1  # a slice only the reference marks
    marks[7, 20:22, 10:40] = manual[7, 20:22, 10:40] = 1
    logic, results, images = compared(flair, marks, manual)
    expected = {s["index"]: s["lv_group"] for s in evaluate_case(images[0], images[1])["slices"]}
    assert expected == {3: "G2", 5: "G1", 7: "G2"}
    headers, table, slices = logic.sliceTable(results)
    column = headers.index("Reference LV group")
    assert {k: row[column] for k, row in zip(slices, table) if row[column]} == expected
    logic.saveResults(results, tmp_path / "slices.csv")
    rows = list(csv.DictReader(open(tmp_path / "slices.csv", encoding="utf-8-sig")))
    assert {int(r["index"]): r["reference_lv_group"] for r in rows if r["reference_lv_group"]} == expected
    assert {int(r["index"]): r["lv_group"] for r in rows} == {3: "G1", 5: "", 7: "G2"}  # the segmentation's own


def test_the_comparison_table_gives_a_slice_one_side_did_not_mark_an_area_of_0_not_a_blank(scene, tmp_path):
    """A slice the segmentation missed showed a blank Area and LV beside its Dice 0.000, and a slice only the
    segmentation marked a blank Reference area beside blank Dice: blanks that read as 'not measured'. They read 0
    now (in the table and the saved .csv); the LV groups of a side with no lesion stay blank, and so does the Dice of
    a slice the reference did not mark (per slice, Dice is over the reference's slices, as deepwml evaluate's)."""
    flair, _ = make_volume()
    marks, manual = (np.zeros(sitk.GetArrayViewFromImage(flair).shape, np.uint8) for _ in range(2))
    marks[2, 20, 10:40] = 1  # only the segmentation
    manual[5, 20, 10:20] = 1  # only the reference
    logic, results, images = compared(flair, marks, manual)
    headers, table, slices = logic.sliceTable(results)
    shown = {index: dict(zip(headers, row)) for index, row in zip(slices, table)}
    assert slices == [2, 5]
    assert (shown[5]["Area (mm²)"], shown[5]["LV (ml)"], shown[5]["LV group"], shown[5]["Dice"]) == \
        ("0.000", "0.000", "", "0.000")
    assert (shown[2]["Reference area (mm²)"], shown[2]["Reference LV group"], shown[2]["Dice"]) == ("0.000", "", "")
    logic.saveResults(results, tmp_path / "slices.csv")
    rows = {int(r["index"]): r for r in csv.DictReader(open(tmp_path / "slices.csv", encoding="utf-8-sig"))}
    assert float(rows[5]["area_mm2"]) == 0.0 and float(rows[2]["reference_area_mm2"]) == 0.0
    assert rows[5]["lv_group"] == rows[2]["reference_lv_group"] == rows[2]["dice"] == ""


def test_jump_to_slice_centres_the_views_on_that_slice(scene):
    flair, _ = make_volume(**OBLIQUE)
    volume = mrml.volumeFromImage(flair, "flair")
    DeepWMLCoreLogic().jumpToSlice(volume, 7)
    red = scene.GetFirstNodeByClass("vtkMRMLSliceNode")
    centre = slicer.util.arrayFromVTKMatrix(red.GetSliceToRAS())[:3, 3]
    np.testing.assert_allclose(centre, mrml.sliceCenterRAS(volume, 7), atol=1e-6)


def test_model_choices(tmp_path):
    logic = DeepWMLCoreLogic()
    shipped = logic.shippedModels()
    assert shipped and all(Path(m["path"]).is_file() for m in shipped)
    assert logic.modelPaths() is None  # the shipped default
    assert logic.modelPaths(shipped[0]["name"]) == [shipped[0]["path"]]
    with pytest.raises(DeepWMLError, match="choose a DeepWML model file"):
        logic.modelPaths(MODEL_FILE_CHOICE, Path("."))
    model = tmp_path / "mine.pt"
    model.write_bytes(b"x")
    assert logic.modelPaths(MODEL_FILE_CHOICE, model) == [str(model)]
    with pytest.raises(DeepWMLError, match="no shipped model named"):
        logic.modelPaths("nonexistent")


def test_a_default_ensemble_is_the_selectors_first_choice(monkeypatch):
    """With several shipped models marked default (an ensemble, as `deepwml segment` runs by
    default), the selector offers that ensemble first and it gives every default model; each member
    stays selectable alone. With one default there is no ensemble entry."""
    entries = [{"name": "a", "path": "/m/a.pt", "default": True}, {"name": "old", "path": "/m/old.pt"},
               {"name": "b", "path": "/m/b.pt", "default": True}]
    logic = DeepWMLCoreLogic()
    monkeypatch.setattr(logic, "shippedModels", lambda: entries)
    monkeypatch.setattr(logic, "shippedEnsembles", lambda: [])
    names = [name for name, _ in logic.modelChoices()]
    assert names == ["default ensemble (a + b)", "a", "b", "old", MODEL_FILE_CHOICE]
    assert logic.modelPaths(names[0]) == ["/m/a.pt", "/m/b.pt"]
    assert logic.modelPaths("b") == ["/m/b.pt"]
    entries[2]["default"] = False
    assert logic.defaultEnsembleChoice() is None and logic.modelChoices()[0][0] == "a"


def test_the_measured_ensembles_follow_the_default_and_the_all_models_average_is_gone():
    """An "Ensemble of all shipped models" checkbox averaged all thirteen WMH models (v1 to v9), a combination never
    measured. The selector offers instead, right after the default, the ensembles the model card measured
    (models.json "ensembles"), each with its measured accuracy, and runs their members."""
    logic = DeepWMLCoreLogic()
    shipped = {m["name"]: m["path"] for m in logic.shippedModels()}
    choices = logic.modelChoices()
    names = [name for name, _ in choices]
    defaults = [m["name"] for m in logic.shippedModels() if m.get("default")]
    first = ([logic.defaultEnsembleChoice()] if logic.defaultEnsembleChoice() else []) + defaults
    assert names[:len(first) + 2] == first + ["ensemble-v8", "ensemble-v7"]
    descriptions = dict(choices)
    assert "0.676 / 0.762 / 0.756 at 1 / 5 / 8 mm" in descriptions["ensemble-v8"]
    assert "0.547 / 0.739 / 0.736 at 1 / 5 / 8 mm" in descriptions["ensemble-v7"]
    assert logic.modelPaths("ensemble-v8") == [shipped[f"unet16-adabn-{m}"] for m in ("v5", "o", "p", "t")]
    assert logic.modelPaths("ensemble-v7") == [shipped["unet16-synth-v5"]] + \
        [shipped[f"unet16-realbg-{m}"] for m in ("o", "p", "t")]
    listed = [name for name in names[:-1] if name != logic.defaultEnsembleChoice()]
    assert sorted(listed) == sorted([*shipped, "ensemble-v8", "ensemble-v7"])  # no average of every model


def test_device_note_without_gpu(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    logic = DeepWMLCoreLogic()
    assert logic.deviceNote("cpu") == ""
    assert "CPU" in logic.deviceNote("auto")
    assert "choose auto or cpu" in logic.deviceNote("cuda")


def _no_openvino():
    raise ImportError("no OpenVINO here")


def test_the_device_note_asks_the_runtime_the_module_runs_bf16_with(monkeypatch):
    """The module runs the auto backend, OpenVINO where installed (make_runner tries it first), which decides bf16
    itself; the note asked PyTorch alone, so it could say "does not compute bf16" where the run would go, or
    nothing where it would be refused (inference.cpu_computes_bf16, as deepwml segment's check asks)."""
    import torch

    from DeepWMLLib import inference

    logic = DeepWMLCoreLogic()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(inference, "_openvino_core", lambda: object())
    for torch_says, openvino_says in ((True, False), (False, True)):
        monkeypatch.setattr(inference, "torch_cpu_has_native_bf16", lambda: torch_says)
        monkeypatch.setattr(inference, "_openvino_computes_bf16", lambda core: openvino_says)
        note = logic.deviceNote("cpu", "bf16")
        assert ("does not compute bf16" in note) == (not openvino_says), (torch_says, openvino_says, note)


def test_the_device_note_says_beforehand_where_bf16_cannot_run(monkeypatch):
    """Precision bf16 that cannot run (a CPU without native bf16, a GPU; a scene saved on another computer) was
    said only when Segment WMH failed; Device had its note beforehand. The note now says it too."""
    import torch

    from DeepWMLLib import inference

    logic = DeepWMLCoreLogic()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(inference, "torch_cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(inference, "_openvino_core", _no_openvino)
    assert logic.deviceNote("cpu", "bf16") == ("This CPU does not compute bf16 natively (AMX or AVX512-BF16): choose "
                                               "Precision auto or fp32.")
    assert logic.deviceNote("auto", "bf16").startswith("No usable GPU: segmentation runs on the CPU (slower). "
                                                       "This CPU does not compute bf16")
    assert logic.deviceNote("cuda", "bf16") == "No usable GPU here: choose auto or cpu."  # the device first
    assert logic.deviceNote("cpu", "auto") == logic.deviceNote("cpu", "fp32") == ""
    monkeypatch.setattr(inference, "torch_cpu_has_native_bf16", lambda: True)
    assert logic.deviceNote("cpu", "bf16") == ""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for device in ("auto", "cuda"):
        assert logic.deviceNote(device, "bf16") == ("Precision bf16 is for the CPU: on a GPU choose Precision auto "
                                                    "(fp16) or fp32.")
        assert logic.deviceNote(device, "auto") == ""
    assert logic.deviceNote("cpu", "bf16") == ""


# ---------------------------------------------------------------------------------------------
# Dependencies: asked for on first use, never at import


def missing(monkeypatch, *modules):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in modules else real(name, *a))


def test_missing_pip_package_is_installed_only_after_the_user_agrees(monkeypatch):
    missing(monkeypatch, "scipy")
    installed = []
    answers = iter([False, True])
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda text, *a, **k: next(answers))
    monkeypatch.setattr(slicer.util, "pip_install", lambda requirements: installed.append(requirements))
    logic = DeepWMLCoreLogic()
    with pytest.raises(DeepWMLError, match="the Python packages scipy are missing"):
        logic.ensureDependencies()  # not interactive: no dialog, says what to do
    logic.interactive = True
    with pytest.raises(DeepWMLError, match="cannot run without scipy"):
        logic.ensureDependencies()
    assert installed == []
    logic.ensureDependencies()
    assert installed == ["scipy"]


def test_slicerio_is_not_asked_for_in_slicer(monkeypatch):
    """Only the command line reads .seg.nrrd with slicerio; Slicer's own readers serve the module, so an
    offline workstation without it must not be blocked."""
    missing(monkeypatch, "slicerio")
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda *a, **k: pytest.fail("asked to install"))
    DeepWMLCoreLogic().ensureDependencies()


def test_failed_pip_install_gives_a_clear_message(monkeypatch):
    missing(monkeypatch, "scipy")
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda *a, **k: True)

    def fail(requirements):
        raise RuntimeError("network unreachable")

    monkeypatch.setattr(slicer.util, "pip_install", fail)
    logic = DeepWMLCoreLogic()
    logic.interactive = True
    with pytest.raises(DeepWMLError, match="installing scipy failed.*network unreachable"):
        logic.ensureDependencies()


def test_missing_torch_goes_through_pytorch_utils(monkeypatch):
    missing(monkeypatch, "torch")
    logic = DeepWMLCoreLogic()
    logic.interactive = True
    monkeypatch.setitem(sys.modules, "PyTorchUtils", None)  # extension not installed
    with pytest.raises(DeepWMLError, match="install the 'PyTorch' extension"):
        logic.ensureDependencies()
    asked = []

    class PyTorchUtilsLogic:
        def installTorch(self, askConfirmation):
            asked.append(askConfirmation)
            return None  # the user declined

    monkeypatch.setitem(sys.modules, "PyTorchUtils", types.SimpleNamespace(PyTorchUtilsLogic=PyTorchUtilsLogic))
    with pytest.raises(DeepWMLError, match="cannot run without PyTorch"):
        logic.ensureDependencies()
    assert asked == [True]
    logic.interactive = False
    with pytest.raises(DeepWMLError, match="PyTorch is not installed yet"):
        logic.ensureDependencies()
    assert asked == [True]
    logic.ensureDependencies(torch=False)  # statistics and comparisons need no torch


def test_importing_the_logic_does_not_import_torch():
    import subprocess

    code = ("import sys; sys.path.insert(0, 'DeepWML'); import DeepWMLSlicerLib.CoreLogic; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, encoding="utf-8", errors="replace", check=True).stdout
    assert out.strip().splitlines()[-1] == "False"


def test_brain_mask_gate_of_the_shipped_registry_can_be_switched_off(scene, monkeypatch, tmp_path, tiny_model):
    """With a brain-mask model in the registry, segmentVolume gates by default (the GUI's checkbox,
    on) and keeps everything with brainMask=False, the brain mask still made for the checks; the run facts on the
    node say which."""
    import shutil

    from conftest import BRAIN_LABELS, oracle_networks_with_brain, tiny_model_file

    oracle_networks_with_brain(monkeypatch)
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(tiny_model, models / "wmh.pt")
    tiny_model_file(models / "brain.pt", labels=BRAIN_LABELS)
    (models / "models.json").write_text(json.dumps({"format_version": 1, "models": [
        {"name": "wmh", "file": "wmh.pt", "version": "1", "default": True, "description": "test"},
        {"name": "brain", "file": "brain.pt", "version": "1", "default": True, "role": "intracranial",
         "description": "test"}]}))
    monkeypatch.setenv("DEEPWML_MODELS_DIR", str(models))
    flair, _ = make_volume(size=(64, 48, 8), blobs=((0.3, 0.5, 0.5, 5.0), (0.72, 0.5, 0.5, 5.0)))
    volume = mrml.volumeFromImage(flair, "two")
    logic = DeepWMLCoreLogic()
    assert [m["name"] for m in logic.shippedModels()] == ["wmh"]  # the brain model is no WMH choice
    gated = logic.segmentVolume(volume, device="cpu")
    plain = logic.segmentVolume(volume, device="cpu", brainMask=False)
    assert logic.lesionStatistics(gated, volume)["lesion_count"] == 1
    assert logic.lesionStatistics(plain, volume)["lesion_count"] == 2
    run = json.loads(gated.GetAttribute("DeepWML.run"))
    assert run["brain_model"] == "brain.pt" and run["outside_brain_removed_ml"] > 0
    assert set(run["contrast"]) == {"deep_ml", "dark_fraction", "cortex_brighter_fraction", "looks_like",
                                    "not_judged"}  # travels with the scene
    assert run["runner"].split()[0] in ("openvino", "onnxruntime", "torch")  # which way the networks ran
    assert f"cpu ({run['runner']})" in logic.formatReport(logic.lesionStatistics(gated, volume))
    assert "outside the brain ignored" in logic.describeRun(run)
    ungated = json.loads(plain.GetAttribute("DeepWML.run"))
    assert ungated["brain_model"] == "brain.pt" and ungated["brain_mask"] == "not applied to the marks"
    assert ungated["contrast"] is not None  # the FLAIR check still ran
    assert logic.describeRun(ungated) == "Done (brain mask used for the checks, not applied to the marks)."
    assert logic.describeRun({"brain_model": None}) == "Done (no brain mask)."


def phantom_pair_nodes(monkeypatch):
    """The phantom pair of test_change.py as Slicer nodes, each registration of its two scans run once
    (conftest.memoize_alignments: it is deterministic): ((baseline FLAIR, mask), (follow-up FLAIR, mask)) and
    (the baseline volume, its lesions' segmentation, the follow-up volume, its lesions' segmentation)."""
    from conftest import memoize_alignments
    from test_change import change_pair_images

    memoize_alignments(monkeypatch)
    images = (base_flair, base_mask), (follow_flair, follow_mask) = change_pair_images()
    baseline = mrml.volumeFromImage(base_flair, "FLAIR 2024")
    followup = mrml.volumeFromImage(follow_flair, "FLAIR 2026")
    base_seg = mrml.segmentationFromMask(base_mask, baseline, name="2024 WMH")
    follow_seg = mrml.segmentationFromMask(follow_mask, followup, name="2026 WMH")
    return images, (baseline, base_seg, followup, follow_seg)


def test_lesion_change_between_two_volume_nodes(scene, monkeypatch):
    """The phantom pair of test_change.py as Slicer nodes: the same calls as DeepWMLLib makes on the
    files, a segment per call on the follow-up's grid, the registered baseline, nodes reused on a rerun."""
    from DeepWMLLib import change

    ((base_flair, base_mask), (follow_flair, follow_mask)), (baseline, base_seg, followup, follow_seg) = \
        phantom_pair_nodes(monkeypatch)
    logic = DeepWMLCoreLogic()
    node, registered, report = logic.lesionChange(baseline, base_seg, followup, follow_seg)
    assert (report["n_new"], report["n_enlarging"], report["n_stable"], report["n_gone"], report["n_not_assessable"]) \
        == (1, 1, 1, 1, 1)
    expected = change.lesion_change(base_flair, follow_flair, base_mask, follow_mask)
    segmentation = node.GetSegmentation()
    names = [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]
    assert names == list(change.LABELS.values())
    labels = sitk.GetArrayFromImage(expected.labels)
    for value, name in change.LABELS.items():  # each segment, exported on the follow-up's grid, is that call's voxels
        exported = sitk.GetArrayFromImage(mrml.maskFromSegmentation(node, followup, segmentation.GetSegmentIdBySegmentName(name)))
        assert np.array_equal(exported > 0, labels == value), name
    assert registered.GetName() == "FLAIR 2024 (registered to FLAIR 2026)"
    readme = (REPO / "README.md").read_text(encoding="utf-8")  # the names a user looks for in the Data module
    assert "*<follow-up> change*" in readme and "*<earlier> (registered to <follow-up>)*" in readme
    assert node.GetName() == "FLAIR 2026 change"
    assert np.allclose(slicer.util.arrayFromVolume(registered), sitk.GetArrayFromImage(expected.baseline_registered))
    assert json.loads(node.GetAttribute("DeepWML.change"))["n_new"] == 1
    headers, rows, slices = logic.sliceTable({"change": report})
    assert headers[:2] == ["Slice", "Change"] and sorted(r[1] for r in rows) == sorted(change.LABELS[v] for v in (1, 2, 3, 4, 5))
    assert all(0 <= s < followup.GetImageData().GetDimensions()[2] for s in slices)
    text = logic.formatChange(report)
    assert "new: 1 lesion" in text and "gone: 1 lesion" in text and "NOT RELIABLE" not in text
    unreliable = {**report, "registration": {**report["registration"], "reliable": False}}  # two patients' scans
    assert logic.formatChange(unreliable).startswith(f"{report['followup']}: REGISTRATION NOT RELIABLE")
    # the phantom's lesion above the earlier scan's last slice: its volume is warned about, as the CLI does
    assert len(report["warnings"]) == 1 and "outside the baseline's field of view" in report["warnings"][0]
    assert "Warning: " in text
    again, registered_again, _ = logic.lesionChange(baseline, base_seg, followup, follow_seg)
    assert len(slicer.util.getNodesByClass("vtkMRMLSegmentationNode")) == 3  # replaced, not piled up
    assert node.GetScene() is None and registered.GetScene() is None and registered_again.GetScene() is not None
    _, _, swapped = logic.lesionChange(baseline, follow_seg, followup, follow_seg)  # the follow-up's as the baseline's
    assert any("was drawn on 'FLAIR 2026', not on 'FLAIR 2024'" in w for w in swapped["warnings"])
    # the registered copy chosen as the earlier scan (it is listed among the volumes): kept, not replaced
    _, newest, _ = logic.lesionChange(baseline, base_seg, followup, follow_seg)
    on_copy = mrml.segmentationFromMask(follow_mask, newest, name="drawn on the copy")
    _, made, _ = logic.lesionChange(newest, on_copy, followup, follow_seg)
    assert newest.GetScene() is not None and made is not newest and made.GetScene() is not None
    with pytest.raises(DeepWMLError, match="same volume"):
        logic.lesionChange(followup, follow_seg, followup, follow_seg)
    with pytest.raises(DeepWMLError, match="segment the earlier scan first"):
        logic.lesionChange(baseline, None, followup, follow_seg)


def test_the_lesion_change_runs_as_a_job_in_a_thread_with_the_same_result(scene, monkeypatch):
    """lesionChange ran both registrations (tens of seconds each on a clinical pair) in the calling thread, the
    panel's main thread. startChange runs them as a job: in a worker thread on copies taken from the nodes, its
    progress following the registrations, refused while another job runs; finishChange makes the same nodes and
    report as lesionChange, on the main thread."""
    _, nodes = phantom_pair_nodes(monkeypatch)
    baseline, base_seg, followup, follow_seg = nodes
    logic = DeepWMLCoreLogic()
    node, registered, report = logic.lesionChange(*nodes)
    expectedMasks = {}
    segmentation = node.GetSegmentation()
    for i in range(segmentation.GetNumberOfSegments()):
        segmentId = segmentation.GetNthSegmentID(i)
        expectedMasks[segmentation.GetSegment(segmentId).GetName()] = sitk.GetArrayFromImage(
            mrml.maskFromSegmentation(node, followup, segmentId))
    expectedRegistered = slicer.util.arrayFromVolume(registered).copy()
    started, gate, threads, _ = gatedChange(monkeypatch)
    steps = []
    job = logic.startChange(*nodes, progress=lambda fraction, message: steps.append((fraction, message)))
    assert started.wait(30) and not job.done and job.kind == "change"
    assert threads == ["DeepWML change"]  # not the calling thread
    assert job.fraction == 0.45 and job.message == ("Lesion change of 'FLAIR 2026' since 'FLAIR 2024': registered the "
                                                    "baseline to the follow-up in 30 s; now the other way round, to "
                                                    "check it ...")
    with pytest.raises(DeepWMLError, match="being computed already"):  # never two at once
        logic.startChange(*nodes, busy="change")
    with pytest.raises(DeepWMLError, match="waits for the run going on now"):
        logic.startChange(*nodes, busy="segmentation")
    assert len(threads) == 1  # refused before anything ran
    gate.set()
    assert job.wait(60) and job.error is None
    assert steps[0] == (0.0, "Lesion change of 'FLAIR 2026' since 'FLAIR 2024': registering the earlier scan to the "
                             "follow-up (tens of seconds on a clinical scan; then the other way round, to check it)...")
    assert [fraction for fraction, _ in steps] == [0.0, 0.45, 0.9, 0.9]  # the stand-in's step, then the two real ones
    assert steps[3][1].startswith("Lesion change of 'FLAIR 2026' since 'FLAIR 2024': registered the other way round")
    made, madeRegistered, madeReport = logic.finishChange(job)
    assert job.fraction == 1.0 and node.GetScene() is None and registered.GetScene() is None  # replaced, as a rerun
    assert madeReport == report
    segmentation = made.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == len(expectedMasks)
    for i in range(segmentation.GetNumberOfSegments()):
        segmentId = segmentation.GetNthSegmentID(i)
        assert np.array_equal(sitk.GetArrayFromImage(mrml.maskFromSegmentation(made, followup, segmentId)),
                              expectedMasks[segmentation.GetSegment(segmentId).GetName()])
    assert np.array_equal(slicer.util.arrayFromVolume(madeRegistered), expectedRegistered)


def test_a_lesion_change_job_keeps_nothing_when_cancelled_or_when_an_input_changed(scene, monkeypatch):
    """Cancelled, or with a scan or segmentation edited, moved or deleted while the scans were registered, a change
    job puts nothing into the scene: finishChange raises Cancelled, or returns None saying which input changed how.
    Cancel cannot stop a registration that runs; it stops the job when that one ends (no second registration)."""
    _, nodes = phantom_pair_nodes(monkeypatch)
    baseline, base_seg, followup, follow_seg = nodes
    logic = DeepWMLCoreLogic()
    started, gate, threads, registrations = gatedChange(monkeypatch)

    def count() -> tuple[int, int]:
        return (scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode"),
                scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode"))

    before = count()
    job = logic.startChange(*nodes)
    assert started.wait(30)
    job.cancel()
    # a comparison cancelled but still registering (the GUI no longer waits for it): another is refused until it
    # ends, not run beside it, each Cancel-then-Compare adding a thread that competes for the CPUs
    with pytest.raises(DeepWMLError, match="cancelled just now is still ending its registration"):
        logic.startChange(*nodes)
    gate.set()
    assert job.wait(60) and job.cancelled and job.result is None
    assert len(registrations) == 1  # the one running when Cancel came (here: the first, once the gate opened)
    with pytest.raises(Cancelled):
        logic.finishChange(job)
    assert count() == before

    def changedWhileRegistering(change) -> str:
        job = logic.startChange(*nodes)
        change()
        changed = count()  # a node deleted: one fewer
        assert job.wait(60) and job.error is None and job.result is not None
        assert logic.finishChange(job) is None and count() == changed
        return job.discarded

    assert changedWhileRegistering(lambda: followup.GetImageData().Modified()) == \
        "the voxels or place of 'FLAIR 2026' changed while the scans were being registered"
    moved = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    moved.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(np.array(
        [[1, 0, 0, 5.0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])))
    assert changedWhileRegistering(lambda: baseline.SetAndObserveTransformNodeID(moved.GetID())) == \
        "the voxels or place of 'FLAIR 2024' changed while the scans were being registered"
    baseline.SetAndObserveTransformNodeID(None)
    lesions = mrml.maskFromNode(base_seg, baseline)
    edited = sitk.Image(lesions)
    edited[10:14, 10:14, 5:7] = 1  # a lesion drawn in
    assert changedWhileRegistering(lambda: mrml.segmentationFromMask(edited, baseline, base_seg)) == \
        "the segments of '2024 WMH' changed while the scans were being registered"
    mrml.segmentationFromMask(lesions, baseline, base_seg)
    assert changedWhileRegistering(lambda: scene.RemoveNode(follow_seg)) == \
        "'2026 WMH' was removed from the scene while the scans were being registered"


def test_a_change_cancelled_on_one_logic_refuses_a_segmentation_on_another_and_after_a_reload(scene, monkeypatch):
    """A comparison cancelled but still registering is known to every logic of the process: a second logic, and one of
    CoreLogic loaded again (the developer's Reload makes a new widget and logic; a reload of CoreLogic too), refuse to
    segment beside it until it ends, then no longer."""
    import importlib.util

    import conftest
    from DeepWMLSlicerLib import CoreLogic

    _, nodes = phantom_pair_nodes(monkeypatch)
    started, gate, _, _ = gatedChange(monkeypatch)
    job = DeepWMLCoreLogic().startChange(*nodes)  # its logic let go of at once (the widget reloaded)
    assert started.wait(30)
    job.cancel()
    spec = importlib.util.spec_from_file_location(CoreLogic.__name__, CoreLogic.__file__)
    reloaded = importlib.util.module_from_spec(spec)  # a fresh copy of CoreLogic, sys.modules left as it is
    spec.loader.exec_module(reloaded)
    others = [DeepWMLCoreLogic(), reloaded.DeepWMLCoreLogic()]
    assert CoreLogic.STARTED_JOBS_ATTRIBUTE == conftest.STARTED_JOBS_ATTRIBUTE  # forgotten after each test
    try:
        for other in others:
            monkeypatch.setattr(other, "ensureDependencies", lambda: None)
            with pytest.raises(DeepWMLError, match=r"^the comparison cancelled just now is still ending its "
                                                   r"registration \(.*\): segment once it has$"):
                other.startSegmentation(nodes[2], device="cpu")
    finally:
        gate.set()
        assert job.wait(60) and job.cancelled
    for other in others:
        other.refuseWhileEnding("segment")  # it has ended


def test_a_change_segmentation_taken_as_a_lesion_mask_is_the_follow_ups_lesions(scene, tmp_path, monkeypatch):
    """A change segmentation chosen where the module takes a lesion mask (volume, Dice, Save results, lesion change:
    mrml.segmentIds): the follow-up's segments, its gone ones left out and the result's notes saying so; the module's
    own (marked) and its CASE_change.seg.nrrd or change SEG loaded back (no mark: known by its segment names). Every
    segment was joined, gone lesions (baseline-only voxels) too. A rater's segments of other names are joined as
    before."""
    from DeepWMLLib import change

    _, (baseline, base_seg, followup, follow_seg) = phantom_pair_nodes(monkeypatch)
    logic = DeepWMLCoreLogic()
    node, _, report = logic.lesionChange(baseline, base_seg, followup, follow_seg)
    assert report["n_gone"] == 1
    lesions = sitk.GetArrayFromImage(mrml.maskFromSegmentation(follow_seg, followup))
    volume = logic.lesionStatistics(follow_seg, followup)["volume_ml"]

    def check(changeNode, why):
        assert np.array_equal(sitk.GetArrayFromImage(mrml.maskFromSegmentation(changeNode, followup)), lesions)
        stats = logic.lesionStatistics(changeNode, followup)
        assert stats["volume_ml"] == volume and stats["lesion_count"] == 4  # stable, new, enlarging, not assessable
        said = [w for w in stats["warnings"] if "lesion change segmentation" in w]
        assert len(said) == 1 and f"'{changeNode.GetName()}' is DeepWML's lesion change segmentation ({why})" in said[0]
        assert "gone" in said[0].split(";")[1] and "left out (baseline lesions no longer there)" in said[0]
        assert logic.compareSegmentations(changeNode, follow_seg, followup)["dice"] == 1.0

    check(node, "made by Lesion change")
    # CASE_change.seg.nrrd (as deepwml change writes it) loaded back by Slicer's own reader: no mark
    labels = sitk.Image(sitk.Cast(mrml.maskFromSegmentation(follow_seg, followup), sitk.sitkUInt8) * 0)
    for value, name in change.LABELS.items():  # the change label map, from the module's segments
        labels += mrml.maskFromSegmentation(node, followup, name) * value
    path = tmp_path / "followup_change.seg.nrrd"
    io.write_label_segmentation(labels, path, [(v, name, change.COLOURS[v]) for v, name in change.LABELS.items()])
    loaded = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "followup_change")
    storage = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(path))
    assert storage.ReadData(loaded) and not loaded.GetAttribute(mrml.CHANGE_ATTRIBUTE)
    why = "its segments are named as DeepWML names the change calls"
    check(loaded, why)
    # its change SEG loaded back: a segment for each call present, named with it
    segmentation = loaded.GetSegmentation()
    for value, name in change.LABELS.items():
        if not (sitk.GetArrayFromImage(labels) == value).any():
            segmentation.RemoveSegment(segmentation.GetSegmentIdBySegmentName(name))
    assert segmentation.GetNumberOfSegments() == 5
    check(loaded, why)
    # every follow-up call removed: only gone left, an empty mask (the exporter took no segment for all of them)
    for name in ("stable", "new", "enlarging", "not assessable"):
        segmentation.RemoveSegment(segmentation.GetSegmentIdBySegmentName(name))
    assert mrml.segmentIds(loaded) == [] and not sitk.GetArrayFromImage(mrml.maskFromSegmentation(loaded, followup)).any()
    assert logic.lesionStatistics(loaded, followup)["volume_ml"] == 0
    # a rater's segments of other names: joined as before, 'gone' among them too
    segmentation.AddEmptySegment("", "lesion")
    assert mrml.changeSegmentation(loaded) == "" and len(mrml.segmentIds(loaded)) == 2
    # a segment chosen by name: that one, the change rule not applied
    assert mrml.segmentIds(node, "gone") == [node.GetSegmentation().GetSegmentIdBySegmentName("gone")]


def test_the_change_label_map_loaded_as_a_labelmap_is_the_follow_ups_lesions(scene, tmp_path, monkeypatch):
    """CASE_change.nii.gz loaded into Slicer as a labelmap volume and chosen as a lesion mask: the follow-up's
    lesions, as the command line reads the file (its header; its report beside it where the header is gone), the
    panel's note saying gone was left out; every label was counted together, gone ones too. A rater's labelmap is
    read as before."""
    from test_change import every_fate_change

    flairs, followup_mask, _, out = every_fate_change(tmp_path, monkeypatch)
    followup = mrml.volumeFromImage(flairs[1], "FLAIR 2026")
    expected = sitk.GetArrayFromImage(followup_mask)
    logic = DeepWMLCoreLogic()

    def load(path, name):
        node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", name)
        storage = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
        storage.SetFileName(str(path))
        assert storage.ReadData(node)
        node.SetAndObserveStorageNodeID(storage.GetID())
        return node

    def counted(node):
        return sitk.GetArrayFromImage(mrml.maskFromNode(node, followup))

    labels_file = out / "followup_change.nii.gz"
    raw = sitk.GetArrayFromImage(sitk.ReadImage(str(labels_file)))
    assert (raw == 5).any() and (raw == 2).any()
    node = load(labels_file, "followup_change")
    assert np.array_equal(counted(node), expected)
    warnings = logic.lesionStatistics(node, followup)["warnings"]
    assert any(w.startswith("'followup_change' is DeepWML's lesion change label map (its header says so") and
               "; gone left out (baseline lesions no longer there)" in w for w in warnings), warnings
    assert logic.compareSegmentations(node, mrml.segmentationFromMask(followup_mask, followup), followup)["dice"] == 1.0
    # saved again without the header's words: known by its report beside it (labels_sha256)
    plain = sitk.GetImageFromArray(raw)
    plain.CopyInformation(sitk.ReadImage(str(labels_file)))
    sitk.WriteImage(plain, str(labels_file))
    again = load(labels_file, "followup_change again")
    assert np.array_equal(counted(again), expected)
    assert "its voxels are those its report followup_change.json records" in mrml.maskNotes(again)[0]
    # a rater's labelmap of the same labels elsewhere: every label counted, as before
    rater = tmp_path / "rater.nii.gz"
    sitk.WriteImage(plain, str(rater))
    theirs = load(rater, "rater")
    assert np.array_equal(counted(theirs), (raw > 0).astype(np.uint8))
    assert "all were counted as lesion, together" in mrml.maskNotes(theirs)[0]


def test_slicer_reads_the_change_transform_file_as_baseline_to_follow_up(scene, tmp_path, monkeypatch):
    """README: Slicer applies CASE_baseline_to_followup.tfm to the baseline volume as it is. Slicer's
    transform storage node reads the ITK file; a baseline point moved by it lands on the follow-up point
    that shows the same anatomy."""
    import vtk
    from conftest import memoize_alignments
    from test_change import change_pair_images

    from DeepWMLLib import change

    memoize_alignments(monkeypatch)  # the registration test_lesion_change_between_two_volume_nodes ran, if it did

    (base_flair, _), (follow_flair, _) = change_pair_images()
    transform = change.align(follow_flair, base_flair).transform
    sitk.WriteTransform(transform, str(tmp_path / "t.tfm"))
    node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    storage = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTransformStorageNode")
    storage.SetFileName(str(tmp_path / "t.tfm"))
    assert storage.ReadData(node)
    matrix = vtk.vtkMatrix4x4()
    node.GetMatrixTransformToParent(matrix)
    to_parent = np.array([[matrix.GetElement(i, j) for j in range(4)] for i in range(4)])
    for follow_lps in ([10.0, -20.0, 5.0], [-40.0, 30.0, -25.0]):
        base_lps = transform.TransformPoint(tuple(follow_lps))
        moved_ras = to_parent @ np.array([-base_lps[0], -base_lps[1], base_lps[2], 1.0])
        np.testing.assert_allclose(moved_ras[:3], [-follow_lps[0], -follow_lps[1], follow_lps[2]], atol=1e-6)


def test_a_t1_weighted_volume_is_warned_about_in_the_module(scene):
    """The contrast check reaches the module: a real T1-weighted volume (nilearn's MNI152 template on 5 mm
    slices) segmented with the shipped models shows the warning under the result, and the verdict
    travels with the segmentation node."""
    volume = mrml.volumeFromImage(mni_t1_thick(5), "T1 by mistake")
    logic = DeepWMLCoreLogic()
    segmentation = logic.segmentVolume(volume, device="cpu")
    assert json.loads(segmentation.GetAttribute("DeepWML.run"))["contrast"]["looks_like"] == "T1-weighted"
    shown = logic.formatReport(logic.lesionStatistics(segmentation, volume))
    assert "Warning: this does not look like a FLAIR" in shown and "T1-weighted" in shown


def test_the_ventricle_segment_gives_the_split_and_edits_to_it_count(scene, monkeypatch, tmp_path, tiny_model):
    """With a ventricle model in the registry, segmentVolume adds a hidden 'Lateral ventricles' segment;
    lesionStatistics measures the periventricular/deep split from it as the command line does from its
    mask, follows edits to it, and a rerun replaces it rather than adding a second."""
    import shutil

    from conftest import tiny_model_file
    from DeepWMLLib.segment import segment_image

    oracle_network(monkeypatch)
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(tiny_model, models / "wmh.pt")
    tiny_model_file(models / "vent.pt", labels={"0": "background", "1": "lateral_ventricles"})
    (models / "models.json").write_text(json.dumps({"format_version": 1, "models": [
        {"name": "wmh", "file": "wmh.pt", "default": True},
        {"name": "vent", "file": "vent.pt", "role": "ventricles", "default": True}]}), encoding="utf-8")
    monkeypatch.setenv("DEEPWML_MODELS_DIR", str(models))
    flair, _ = make_volume(size=(64, 48, 8), blobs=((0.3, 0.5, 0.5, 5.0), (0.9, 0.15, 0.5, 4.0)))
    volume = mrml.volumeFromImage(flair, "flair")
    logic = DeepWMLCoreLogic()
    segmentation = logic.segmentVolume(volume, device="cpu")
    content = segmentation.GetSegmentation()
    ventricle_id = content.GetSegmentIdBySegmentName(mrml.VENTRICLE_SEGMENT_NAME)
    assert content.GetNumberOfSegments() == 2 and ventricle_id
    assert not segmentation.GetDisplayNode().GetSegmentVisibility(ventricle_id)
    report = logic.lesionStatistics(segmentation, volume)
    expected = segment_image(mrml.imageFromVolume(volume), device="cpu").report
    split = report["location"]
    assert split["judged"] and split["ventricle_model"] == "vent.pt"
    for key in ("periventricular_ml", "deep_ml", "ventricles_ml", "judged", "rule"):
        assert split[key] == expected["location"][key], key
    assert report["volume_ml"] == expected["volume_ml"]
    assert [{key: lesion[key] for key in ("volume_ml", "ventricle_distance_mm", "periventricular_share")}
            for lesion in report["lesions"]] == \
        [{key: lesion[key] for key in ("volume_ml", "ventricle_distance_mm", "periventricular_share")}
         for lesion in expected["lesions"]]
    assert "Periventricular" in logic.formatReport(report)

    # Edited: the ventricle segment emptied -> too little ventricle, not judged; removed -> no split at all
    mrml.segmentationFromMask(mrml.maskFromSegmentation(segmentation, volume) * 0, volume, segmentation,
                              segmentName=mrml.VENTRICLE_SEGMENT_NAME)
    emptied = logic.lesionStatistics(segmentation, volume)["location"]
    assert emptied["judged"] is False and emptied["ventricles_ml"] == 0
    assert "No periventricular/deep split" in logic.formatReport(logic.lesionStatistics(segmentation, volume))
    content.RemoveSegment(content.GetSegmentIdBySegmentName(mrml.VENTRICLE_SEGMENT_NAME))
    removed = logic.lesionStatistics(segmentation, volume)
    assert removed["location"] is None and "ventricle_model" not in removed  # the model does not leak to the top
    # The lesion mask never takes the ventricles in, even without a WMH segment to name it
    logic.segmentVolume(volume, device="cpu", segmentationNode=segmentation)
    assert content.GetNumberOfSegments() == 2
    content.RemoveSegment(content.GetSegmentIdBySegmentName("WMH"))
    with pytest.raises(DeepWMLError, match="no lesion segment"):
        mrml.maskFromSegmentation(segmentation, volume)
    # A rerun without a ventricle model keeps the ventricle segment there (perhaps edited by hand) as it is
    edited = mrml.maskFromSegmentation(segmentation, volume, mrml.VENTRICLE_SEGMENT_NAME)
    edited_array = sitk.GetArrayFromImage(edited)
    edited_array[:, :, : edited_array.shape[2] // 2] = 0
    edited_image = sitk.GetImageFromArray(edited_array)
    edited_image.CopyInformation(edited)
    mrml.segmentationFromMask(edited_image, volume, segmentation, segmentName=mrml.VENTRICLE_SEGMENT_NAME)
    logic.segmentVolume(volume, device="cpu", segmentationNode=segmentation, location=False)
    assert sorted(content.GetNthSegment(i).GetName() for i in range(content.GetNumberOfSegments())) == \
        [mrml.VENTRICLE_SEGMENT_NAME, "WMH"]
    kept = sitk.GetArrayFromImage(mrml.maskFromSegmentation(segmentation, volume, mrml.VENTRICLE_SEGMENT_NAME))
    assert np.array_equal(kept > 0, edited_array > 0)
    # Asked for by its ID, the ventricle segment is measured as a segment, not against itself
    ventricle_id = content.GetSegmentIdBySegmentName(mrml.VENTRICLE_SEGMENT_NAME)
    assert logic.lesionStatistics(segmentation, volume, ventricle_id)["location"] is None


def test_a_run_that_found_too_little_ventricle_stops_saying_so_once_they_are_drawn(scene, monkeypatch, tmp_path,
                                                                                  tiny_model):
    from conftest import tiny_model_file

    oracle_network(monkeypatch)
    ventricle_model = tiny_model_file(tmp_path / "vent.pt", labels={"0": "background", "1": "lateral_ventricles"})
    flair, truth = make_volume(size=(24, 20, 2), blobs=((0.3, 0.5, 0.5, 3.0),))
    volume = mrml.volumeFromImage(flair, "flair")
    logic = DeepWMLCoreLogic()
    segmentation = logic.segmentVolume(volume, device="cpu", modelPaths=[str(tiny_model)], location=str(ventricle_model))
    report = logic.lesionStatistics(segmentation, volume)
    assert report["location"]["judged"] is False
    assert "No periventricular/deep split" in logic.formatReport(report)
    drawn = sitk.GetArrayFromImage(truth) * 0 + 1  # the user draws the ventricles (here: everywhere)
    drawn_image = sitk.GetImageFromArray(drawn.astype(np.uint8))
    drawn_image.CopyInformation(truth)
    mrml.segmentationFromMask(drawn_image, volume, segmentation, segmentName=mrml.VENTRICLE_SEGMENT_NAME)
    report = logic.lesionStatistics(segmentation, volume)
    assert report["location"]["judged"] and report["location"]["ventricle_model"] == "vent.pt"
    text = logic.formatReport(report)
    assert "Periventricular" in text and "No periventricular" not in text and "lateral ventricle found" not in text


def test_nan_probabilities_point_at_the_modules_precision_choice(scene, monkeypatch):
    """The NaN error said 'rerun with --precision fp32', an option of deepwml segment, and the module, which had no
    precision setting, sent users to the CPU or the command line. It now names the panel's Precision; after fp32,
    another model."""
    import pickle

    from DeepWMLLib.inference import NaNProbabilities

    from DeepWMLSlicerLib.CoreLogic import SegmentationJob

    flair, _ = make_volume()
    volume = mrml.volumeFromImage(flair, "flair")

    def finished(error):
        job = SegmentationJob(volume, flair, device="auto")
        job.error = pickle.loads(pickle.dumps(error))  # as it comes back from the worker process
        job._finished.set()
        with pytest.raises(DeepWMLError) as raised:
            DeepWMLCoreLogic().finishSegmentation(job)
        assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0
        return str(raised.value)

    for runner in ("torch fp16", "openvino bf16"):
        assert finished(NaNProbabilities("m.pt", runner)) == (
            f"m.pt gave NaN probabilities (running as {runner}): its result would mark nothing; reduced precision can "
            "overflow: choose Precision: fp32 (below Device) and segment again (slower). If that fails too, the model "
            "file is at fault")
    assert finished(NaNProbabilities("m.pt", "openvino fp32")) == (
        "m.pt gave NaN probabilities (running as openvino fp32): its result would mark nothing; it ran in full "
        "precision, so the model file is at fault: choose another model")


def test_bf16_where_it_cannot_run_is_said_in_the_panels_words(scene, monkeypatch, tiny_model):
    """Precision bf16 (saved with a scene made on a computer whose CPU computes bf16 natively, or chosen) on a CPU
    without it failed with '--precision bf16 needs a CPU with native bf16 ...; use fp32 or auto', an option of
    deepwml segment the panel does not show; on a GPU, '--precision bf16 is for the CPU'. Both now name the
    panel's Precision, in a worker thread as from a worker process."""
    import pickle

    from DeepWMLLib import inference

    from DeepWMLSlicerLib.CoreLogic import SegmentationJob

    monkeypatch.setattr(inference, "torch_cpu_has_native_bf16", lambda: False)

    def noOpenVino(*args, **kwargs):  # a Slicer without OpenVINO: PyTorch runs the networks
        raise ImportError("openvino")

    monkeypatch.setattr(inference, "OpenVinoRunner", noOpenVino)
    flair, _ = make_volume()
    volume = mrml.volumeFromImage(flair, "flair")
    logic = DeepWMLCoreLogic()
    logic.workerPython = None
    with pytest.raises(DeepWMLError) as raised:
        logic.segmentVolume(volume, device="cpu", modelPaths=[str(tiny_model)], brainMask=False, location=False,
                            precision="bf16")
    assert str(raised.value) == ("Precision bf16 needs a CPU that computes bf16 natively (AMX or AVX512-BF16), and "
                                 "this computer's does not: choose Precision: auto or fp32 (below Device) and segment "
                                 "again")
    assert "--precision" not in str(raised.value)

    job = SegmentationJob(volume, flair, device="auto")
    job.error = pickle.loads(pickle.dumps(inference.PrecisionUnavailable(on_gpu=True)))  # from a worker process
    job._finished.set()
    with pytest.raises(DeepWMLError) as raised:
        logic.finishSegmentation(job)
    assert str(raised.value) == ("Precision bf16 is for a CPU that computes bf16 natively, and this run was on a GPU: "
                                 "choose Precision: auto (fp16 on a GPU) or fp32 (below Device) and segment again")
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0
    # deepwml segment's own words are unchanged
    assert str(inference.PrecisionUnavailable()) == ("--precision bf16 needs a CPU with native bf16 (AMX or "
                                                     "AVX512-BF16); use fp32 or auto")


def test_the_modules_precision_choices_are_deepwml_segments():
    from DeepWMLLib.inference import PRECISIONS

    from DeepWMLSlicerLib.CoreLogic import PRECISION_CHOICES

    assert PRECISION_CHOICES == PRECISIONS


def test_the_part_of_a_manual_segmentation_outside_the_flair_is_said_in_ml(scene):
    """A manual segmentation drawn on a scan with a larger extent (or a labelmap on a larger grid) was cut to the
    FLAIR's field of view: "Dice 1.000, reference 0.97 ml" read as the whole outline, and the 2.2 ml outside it were
    counted nowhere, without a word. The panels now say how much lies outside, measured on the segmentation's own grid."""
    flair, truth = make_volume(**dict(OBLIQUE, blobs=((0.5, 0.5, 0.5, 6.0), (0.5, 0.5, 0.9, 8.0))))
    whole = mrml.volumeFromImage(flair, "FLAIR whole")
    flairNode = mrml.volumeFromImage(flair[:, :, :6], "FLAIR")
    marked = sitk.GetArrayFromImage(truth) > 0  # k, j, i
    voxelMl = float(np.prod(truth.GetSpacing())) / 1000
    total, outside = marked.sum() * voxelMl, marked[6:].sum() * voxelMl
    assert outside > 1.0 and marked[:6].sum() > 0
    said = (f"{outside:.2f} ml of 'manual' (of its {total:.2f} ml) lie outside the field of view of 'FLAIR' and are "
            "not counted in the Dice or the")

    logic = DeepWMLCoreLogic()
    ours = mrml.segmentationFromMask(truth[:, :, :6], flairNode, name="DeepWML")
    manual = mrml.segmentationFromMask(truth, whole, name="manual")
    comparison = logic.compareSegmentations(ours, manual, flairNode)
    assert comparison["dice"] == 1.0  # what is inside agrees; the note is the only sign of the rest
    assert comparison["reference_volume_ml"] + outside == pytest.approx(total)
    shown = logic.formatComparison(comparison)
    assert f"Note: {said} volumes" in shown
    assert "of 'DeepWML'" not in shown  # inside the FLAIR: nothing to say

    labelmap = mrml.volumeFromImage(truth, "manual", "vtkMRMLLabelMapVolumeNode")  # no 'drawn on' note to go by
    shown = logic.formatComparison(logic.compareSegmentations(ours, labelmap, flairNode))
    assert f"Note: {said} volumes" in shown and "drawn on" not in shown
    statistics = logic.formatReport(logic.lesionStatistics(manual, flairNode))
    assert f"Warning: {said[:-len('the Dice or the')]}the lesion volume" in statistics

    consensus = logic.formatConsensus(logic.consensusCheck(ours, manual, 0.85, flairNode))
    assert f"Note: {said} raters' volumes" in consensus and "of 'DeepWML'" not in consensus
    # each rater: both drawn on the larger scan, each said with its own figures
    upper = sitk.Image(truth)
    upper[:, :, :4] = 0
    raterA = mrml.segmentationFromMask(upper, whole, name="rater A")
    consensus = logic.formatConsensus(logic.consensusCheck(raterA, manual, 0.85, flairNode))
    aOutside, aTotal = marked[6:].sum() * voxelMl, marked[4:].sum() * voxelMl
    assert aTotal > aOutside
    assert (f"Note: {aOutside:.2f} ml of 'rater A' (of its {aTotal:.2f} ml) lie outside the field of view of 'FLAIR'"
            in consensus)
    assert f"Note: {said} raters' volumes" in consensus

    # under a transform, the part outside moves with it: shifted down by 4 slices, all of it is inside
    transform = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    shift = np.eye(4)
    shift[:3, 3] = -(np.array(flair.TransformContinuousIndexToPhysicalPoint((0, 0, 4)))
                     - np.array(flair.TransformContinuousIndexToPhysicalPoint((0, 0, 0)))) * [-1, -1, 1]  # LPS->RAS
    transform.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(shift))
    raterA.SetAndObserveTransformNodeID(transform.GetID())
    assert "'rater A' (of its" not in logic.formatConsensus(logic.consensusCheck(raterA, manual, 0.85, flairNode))


def _gridTransform(displacementRAS) -> "slicer.vtkMRMLGridTransformNode":
    """A non-linear (grid) transform node that moves everything by the same RAS vector, as a translation would."""
    import vtk
    from vtk.util import numpy_support

    grid = vtk.vtkImageData()
    grid.SetDimensions(5, 5, 5)
    grid.SetSpacing(100.0, 100.0, 100.0)
    grid.SetOrigin(-200.0, -200.0, -200.0)
    grid.AllocateScalars(vtk.VTK_DOUBLE, 3)
    numpy_support.vtk_to_numpy(grid.GetPointData().GetScalars())[:] = displacementRAS
    warp = slicer.vtkOrientedGridTransform()
    warp.SetDisplacementGridData(grid)
    node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLGridTransformNode", "registration warp")
    node.SetAndObserveTransformToParent(warp)
    return node


def test_a_segmentation_under_a_non_linear_transform_is_measured_where_it_is_shown(scene):
    """README: segmentations to compare may lie under any transform. Under a non-linear one (a registration's grid
    transform), Compare, Check agreement and Update lesion statistics all failed with "'DeepWML export' is under the
    non-linear transform 'registration warp'; harden the transform (Data module: right-click the volume...)", a node
    the user never sees: the check for a part outside the FLAIR read the segmentation on its own grid in world
    coordinates. It is measured where it is shown, as under a linear transform, and its part outside is said."""
    flair, truth = make_volume(**dict(OBLIQUE, blobs=((0.5, 0.5, 0.5, 6.0), (0.5, 0.5, 0.9, 8.0))))
    whole = mrml.volumeFromImage(flair, "FLAIR whole")
    flairNode = mrml.volumeFromImage(flair[:, :, :6], "FLAIR")
    logic = DeepWMLCoreLogic()
    ours = mrml.segmentationFromMask(truth[:, :, :6], flairNode, name="DeepWML")
    manual = mrml.segmentationFromMask(truth, whole, name="manual")
    untransformed = logic.formatComparison(logic.compareSegmentations(ours, manual, flairNode))
    assert "lie outside the field of view of 'FLAIR'" in untransformed

    manual.SetAndObserveTransformNodeID(_gridTransform((0.0, 0.0, 0.0)).GetID())
    assert logic.formatComparison(logic.compareSegmentations(ours, manual, flairNode)) == untransformed
    statistics = logic.formatReport(logic.lesionStatistics(manual, flairNode))
    assert "lie outside the field of view of 'FLAIR' and are not counted in the lesion volume" in statistics
    assert "Note: " in logic.formatConsensus(logic.consensusCheck(ours, manual, 0.85, flairNode))

    # moved down by 4 slices, as a linear transform moves it: all of it inside, and the same Dice
    down = -(np.array(flair.TransformContinuousIndexToPhysicalPoint((0, 0, 4)))
             - np.array(flair.TransformContinuousIndexToPhysicalPoint((0, 0, 0)))) * [-1, -1, 1]  # LPS->RAS
    manual.SetAndObserveTransformNodeID(_gridTransform(down).GetID())
    warped = logic.compareSegmentations(ours, manual, flairNode)
    assert not any("field of view" in note for note in warped["notes"])
    linear = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    shift = np.eye(4)
    shift[:3, 3] = down
    linear.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(shift))
    manual.SetAndObserveTransformNodeID(linear.GetID())
    assert warped["dice"] == pytest.approx(logic.compareSegmentations(ours, manual, flairNode)["dice"])


def test_measuring_on_a_flair_without_a_voxel_grid_names_that_flair_and_what_to_do(scene):
    """A FLAIR under a non-linear transform (Slicer's DICOM reader puts one on a scan with uneven or tilted slices) or
    one whose voxels were never loaded (a scene whose image file has gone): statistics, Compare, Check agreement and a
    slice jump named DeepWML's temporary node ("'DeepWML export' is under the non-linear transform ..."), or failed
    with "'NoneType' object has no attribute 'GetDimensions'" after exporting the segmentation onto a made-up grid.
    They name the FLAIR and say what to do, and leave no node behind."""
    import vtk

    flair, truth = make_volume(**OBLIQUE)
    volume = mrml.volumeFromImage(flair, "FLAIR")
    manual = mrml.segmentationFromMask(truth, volume, name="manual")
    logic = DeepWMLCoreLogic()
    measures = (lambda: logic.lesionStatistics(manual, volume), lambda: logic.compareSegmentations(manual, manual, volume),
                lambda: logic.consensusCheck(manual, manual, 0.85, volume), lambda: logic.jumpToSlice(volume, 3))
    volume.SetAndObserveTransformNodeID(_gridTransform((0.0, 0.0, 1.0)).GetID())
    before = scene.GetNumberOfNodes()
    for measure in measures:
        with pytest.raises(DeepWMLError, match="^'FLAIR' is under the non-linear transform 'registration warp'; harden"):
            measure()
    assert scene.GetNumberOfNodes() == before

    volume.SetAndObserveTransformNodeID(None)
    # no image data, or an empty one (a Crop Volume whose box missed the scan): segmenting that failed with an
    # AttributeError too, and the statistics were of a made-up one-voxel grid
    for imageData in (None, vtk.vtkImageData()):
        volume.SetAndObserveImageData(imageData)
        for measure in measures + (lambda: logic.segmentVolume(volume, device="cpu"),):
            with pytest.raises(DeepWMLError, match="^'FLAIR' is not a scalar volume with voxels; choose a loaded FLAIR"):
                measure()
        assert scene.GetNumberOfNodes() == before


def test_a_segmentation_inside_the_flair_is_not_said_to_lie_outside(scene):
    """No note for a segmentation inside the FLAIR's field of view: drawn on it, drawn on a cropped copy of it, or a
    labelmap on a grid a fraction of a voxel off whose lesion touches the edge (edge voxels, rounded either way)."""
    flair, truth = make_volume(**dict(OBLIQUE, blobs=((0.5, 0.5, 0.5, 6.0), (1.0, 0.5, 0.5, 6.0))))
    flairNode = mrml.volumeFromImage(flair, "FLAIR")
    logic = DeepWMLCoreLogic()
    ours = mrml.segmentationFromMask(truth, flairNode, name="DeepWML")
    manual = mrml.segmentationFromMask(sitk.BinaryDilate(truth, [1, 1, 0]), flairNode, name="manual")
    cropped = mrml.volumeFromImage(flair[:, :, 2:8], "FLAIR cropped")
    onCrop = mrml.segmentationFromMask(truth[:, :, 2:8], cropped, name="rater C")
    shifted = sitk.Image(truth)
    edge = np.array(flair.TransformContinuousIndexToPhysicalPoint((0.4, 0, 0))) - np.array(flair.GetOrigin())
    shifted.SetOrigin(tuple(np.array(flair.GetOrigin()) + edge))
    assert sitk.GetArrayFromImage(shifted)[:, :, -1].any()  # touches the edge, its last column 0.4 voxel past it
    offGrid = mrml.volumeFromImage(shifted, "label file", "vtkMRMLLabelMapVolumeNode")
    for node in (manual, onCrop, offGrid):
        comparison = logic.formatComparison(logic.compareSegmentations(ours, node, flairNode))
        consensus = logic.formatConsensus(logic.consensusCheck(ours, node, 0.85, flairNode))
        statistics = logic.formatReport(logic.lesionStatistics(node, flairNode)) if node is not offGrid else ""
        for shown in (comparison, consensus, statistics):
            assert "field of view" not in shown, shown


def test_the_part_of_a_mask_outside_its_scan_is_said_in_the_lesion_change(scene, monkeypatch):
    """Lesion change takes each mask on its own scan's grid: a manual label file on a larger grid (or one drawn on a
    scan of larger extent) loses what lies outside, and the new/gone calls and volumes count without it. The panel
    says how many ml of which mask, for the earlier scan and the follow-up each; nothing when all of it is inside."""
    from DeepWMLLib import change

    monkeypatch.setattr(change, "align", lambda followup, baseline: change.Registration(
        sitk.Euler3DTransform(), 1.0, -1.0, 0, 0.0))  # the same head, unmoved: no registration to wait for
    flair, truth = make_volume(blobs=((0.5, 0.5, 0.0, 8.0), (0.5, 0.5, 0.5, 6.0), (0.5, 0.5, 1.0, 6.0)))
    baseline = mrml.volumeFromImage(flair[:, :, :6], "FLAIR 2024")  # the top blob above it
    followup = mrml.volumeFromImage(flair[:, :, 3:], "FLAIR 2026")  # the bottom blob below it
    marked = sitk.GetArrayFromImage(truth) > 0  # k, j, i
    voxelMl = float(np.prod(truth.GetSpacing())) / 1000
    total = marked.sum() * voxelMl
    baseOutside, followOutside = marked[6:].sum() * voxelMl, marked[:3].sum() * voxelMl
    assert baseOutside > 0.1 and followOutside > 0.1 and baseOutside != followOutside
    logic = DeepWMLCoreLogic()

    baseLabels = mrml.volumeFromImage(truth, "2024 WMH", "vtkMRMLLabelMapVolumeNode")
    followLabels = mrml.volumeFromImage(truth, "2026 WMH", "vtkMRMLLabelMapVolumeNode")
    _, _, report = logic.lesionChange(baseline, baseLabels, followup, followLabels)
    for name, outside, scan in (("2024 WMH", baseOutside, "FLAIR 2024"), ("2026 WMH", followOutside, "FLAIR 2026")):
        said = (f"{outside:.2f} ml of '{name}' (of its {total:.2f} ml) lie outside the field of view of '{scan}' and "
                "are not counted in the lesion change")
        assert said in report["warnings"]
        assert f"Warning: {said}" in logic.formatChange(report)

    baseInside = mrml.segmentationFromMask(truth[:, :, :6], baseline, name="2024 inside")
    followInside = mrml.segmentationFromMask(truth[:, :, 3:], followup, name="2026 inside")
    _, _, report = logic.lesionChange(baseline, baseInside, followup, followInside)
    assert not any("field of view of '" in warning for warning in report["warnings"]), report["warnings"]


def test_a_result_of_an_adapted_model_says_how_it_was_adapted_as_deepwml_segments_report_does(scene, monkeypatch,
                                                                                              tmp_path):
    """The node kept the run's `model` and `model_sha256` but not `model_adapted`: the module's saved results and
    the Slicer batch script's CASE_report.json (made from them) did not say that the mask came from a model adapted
    on a site's scans, nor from which model, where `deepwml segment`'s report does."""
    from conftest import tiny_model_file
    from DeepWMLLib.adapt import adaptation_summary
    from DeepWMLLib.checkpoint import file_digest, load_model, save_model

    oracle_network(monkeypatch)
    source = tiny_model_file(tmp_path / "tiny.pt")
    plain = load_model(source)
    record = {"from_model": "tiny.pt", "from_digest": file_digest(source), "slices": 40, "not_flair_scans": 1,
              "scans": [{"slices": 20, "of": 24}, {"slices": 20, "of": 24, "looks_like": "T1-weighted"}]}
    adapted = save_model(tmp_path / "tiny-adapted.pt", plain.model, plain.config, plain.preprocessing, plain.threshold,
                         {**plain.provenance, "adapted_batch_norm": record})
    flair, _ = make_volume(**OBLIQUE)
    volume = mrml.volumeFromImage(flair, "flair")
    logic = DeepWMLCoreLogic()
    segmentation = logic.segmentVolume(volume, device="cpu", modelPaths=[str(adapted), str(source)])
    said = logic.lesionStatistics(segmentation, volume)
    assert said["model"] == ["tiny-adapted.pt", "tiny.pt"]
    assert said["model_adapted"] == [adaptation_summary({"adapted_batch_norm": record}), None]
    assert said["model_adapted"][0] == {"scans": 2, "slices": 40, "from_model": "tiny.pt",
                                        "from_sha256": file_digest(source), "not_flair_scans": 1}


def test_a_volume_that_does_not_cover_the_whole_brain_is_said_in_the_module(scene, monkeypatch, tmp_path):
    """The warning reaches the module's results as `deepwml segment`'s report has it, and its figures travel with
    the segmentation node."""
    from test_fov_cover import brain_phantom, cropped

    from conftest import tiny_model_file

    oracle_network(monkeypatch, brain="head")  # the shipped brain-mask model's place: the phantom's brain
    volume = mrml.volumeFromImage(cropped(brain_phantom(), left_mm=20), "cut")
    logic = DeepWMLCoreLogic()
    segmentation = logic.segmentVolume(volume, modelPaths=[str(tiny_model_file(tmp_path / "wmh.pt"))], device="cpu")
    run = json.loads(segmentation.GetAttribute("DeepWML.run"))
    assert run["brain_at_fov_edge"]["cut"] == ["left"]
    shown = logic.formatReport(logic.lesionStatistics(segmentation, volume))
    assert "Warning: the scan does not cover the whole brain: the brain reaches the left edge" in shown


def test_a_volume_of_several_values_per_voxel_is_refused_naming_what_it_may_be(scene, tiny_model):
    """An RGB volume, or a 4D multi-volume (MultiVolume's frames are the values of one voxel): refused as
    'vector/RGB' alone, which told the user of a 4D series nothing of taking one frame."""
    flair, _ = make_volume(size=(24, 24, 6))
    frames = sitk.Compose([flair, flair, flair])
    node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "DWI frames")
    node.SetAndObserveImageData(mrml.volumeFromImage(frames, "tmp", "vtkMRMLVectorVolumeNode").GetImageData())
    with pytest.raises(DeepWMLError, match=r"'DWI frames' has 3 values per voxel \(an RGB image, or a 4D series") as caught:
        DeepWMLCoreLogic().segmentVolume(node, device="cpu", modelPaths=[str(tiny_model)])
    assert "one of its frames a scalar volume" in str(caught.value)


@pytest.mark.parametrize("name,other", [("WMH", "WMH"), ("lesion", "lesion"), ("WMH", "wmh")])
def test_segments_of_one_name_are_all_lesion_in_the_module_as_on_the_command_line(name, other, scene):
    """A rater's two segments of one name (two 'WMH', or a segment picked by a name two segments share): the
    first alone was measured, the other's lesions missing without a word (the command line reads them all)."""
    flair, truth = make_volume(size=(40, 40, 8), blobs=((0.3, 0.3, 0.5, 4.0), (0.7, 0.7, 0.5, 4.0)))
    volume = mrml.volumeFromImage(flair, "flair")
    halves = sitk.GetArrayFromImage(truth)
    first, second = halves.copy(), halves.copy()
    first[:, :, 20:], second[:, :, :20] = 0, 0
    assert first.any() and second.any()
    first, second = (sitk.GetImageFromArray(half) for half in (first, second))
    for half in (first, second):
        half.CopyInformation(truth)
    rater = mrml.segmentationFromMask(first, volume, name="rater", segmentName=name)
    mrml.segmentationFromMask(second, volume, rater, segmentName="second")
    segmentation = rater.GetSegmentation()
    segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName("second")).SetName(other)
    for picked in (None, name):
        mask = mrml.maskFromSegmentation(rater, volume, picked)
        assert sitk.GetArrayFromImage(mask).sum() == halves.sum()
    expected = evaluate_case(truth, truth)
    assert DeepWMLCoreLogic().compareSegmentations(rater, mrml.segmentationFromMask(truth, volume, name="truth"),
                                                   volume)["dice"] == pytest.approx(expected["dice"])


def test_the_panels_figures_read_as_measured_each_in_its_place():
    """What the panel shows of hand-made results, worked out by hand: the total 1.2345 ml to two decimals (1.23 ml),
    periventricular 0.9 ml before deep 0.3345 ml (0.90 then 0.33); a consensus table lists the slices the check found
    most discordant first, in its order (5 then 2), then the others by index (1, 7); a lesion table gives a lesion's
    periventricular share as a percentage (0.25: 25 %), its slices as a range (3–4) or one slice (6), and its row's
    place as RAS: the report's LPS point (10, -20, 30) with x and y negated, (-10, 20, 30)."""
    report = {"volume_ml": 1.2345, "lesion_count": 2, "warnings": [],
              "location": {"judged": True, "periventricular_ml": 0.9, "deep_ml": 0.3345, "ventricles_ml": 20.0}}
    lines = DeepWMLCoreLogic.formatReport(report).splitlines()
    assert lines[0] == "Total lesion volume: 1.23 ml in 2 lesions"
    assert lines[1].startswith("Periventricular 0.90 ml, deep 0.33 ml (within 10 mm")
    logic = DeepWMLCoreLogic()
    consensus = {"worst_slices": [5, 2], "slices": [
        {"index": i, "dice": 0.5, "area_a_mm2": 1.0, "area_b_mm2": 2.0, "disagreement_mm2": 1.0} for i in (1, 2, 5, 7)]}
    _, _, order = logic.sliceTable({"consensus": consensus})
    assert order == [5, 2, 1, 7]
    lesions = [{"id": 1, "volume_ml": 0.5, "slice_range": [3, 4], "point_mm": [10.0, -20.0, 30.0],
                "periventricular_share": 0.25},
               {"id": 2, "volume_ml": 0.01, "slice_range": [6, 6], "point_mm": [1.0, 2.0, 3.0],
                "periventricular_share": 1.0}]
    headers, rows, targets = logic.sliceTable({"table": LESION_TABLE, "report": {"lesions": lesions}})
    assert headers == ["Lesion", "Volume (ml)", "Slices", "Periventricular"]
    assert rows == [["2", "0.010", "6", "100 %"], ["1", "0.500", "3–4", "25 %"]]  # smallest first
    assert targets == [(-1.0, -2.0, 3.0), (-10.0, 20.0, 30.0)]


def test_the_change_table_says_which_scan_each_volume_was_measured_on():
    """A baseline lesion's own row (gone, or stable kept by the follow-up's probability) gives its baseline volume: in
    the table it read as a follow-up volume, as the report's stable_ml once added it to the follow-up's."""
    lesions = [{"id": 1, "status": "stable", "scan": "follow-up", "volume_ml": 0.3, "change_ml": -0.1, "followup_slice": 9},
               {"id": 2, "status": "stable", "scan": "baseline", "volume_ml": 0.1, "change_ml": None, "followup_slice": 4}]
    headers, rows, slices = DeepWMLCoreLogic().sliceTable({"change": {"lesions": lesions}})
    assert headers[:4] == ["Slice", "Change", "Measured on", "Volume (ml)"]
    assert [row[:3] for row in rows] == [["9", "stable", "follow-up"], ["4", "stable", "baseline"]] and slices == [9, 4]


def test_a_labelmap_slice_one_slice_below_the_flair_is_said_to_lie_outside_it(scene):
    """The field of view ends half a voxel past the outer voxel centres: a labelmap one slice longer than the FLAIR at
    its low end (its slice 0 centred one whole slice, index -1, below the FLAIR's first) has that slice outside. By
    hand: 40 voxels on each of its slices 0 and 3 of 0.9 x 0.9 x 5 mm (4.05 mm3): 0.162 ml outside of 0.324 ml."""
    flair, _ = make_volume(size=(48, 40, 10))
    flairNode = mrml.volumeFromImage(flair[:, :, 1:6], "FLAIR")
    marks = np.zeros((6, 40, 48), np.uint8)  # k, j, i on the whole scan's slices 0-5
    marks[0, 20, 4:44] = marks[3, 20, 4:44] = 1
    mask = sitk.GetImageFromArray(marks)
    mask.CopyInformation(flair[:, :, :6])
    labelmap = mrml.volumeFromImage(mask, "manual", "vtkMRMLLabelMapVolumeNode")
    ours = mrml.segmentationFromMask(sitk.Image(mask[:, :, 1:6]), flairNode, name="DeepWML")
    comparison = DeepWMLCoreLogic().compareSegmentations(ours, labelmap, flairNode)
    assert comparison["reference_volume_ml"] == pytest.approx(0.162)
    assert ("Note: 0.16 ml of 'manual' (of its 0.32 ml) lie outside the field of view of 'FLAIR'"
            in DeepWMLCoreLogic.formatComparison(comparison))


def test_a_labelmap_slice_centred_on_the_flairs_outer_face_is_not_said_to_lie_outside_it(scene):
    """A voxel centre on the FLAIR's outer voxel face (a grid half a slice off) is inside, whatever the rounding: a
    labelmap of the FLAIR's grid moved 2.5 mm (half a 5 mm slice) down has its slice 0 centred on the FLAIR's lowest
    face, index -0.5; nothing of it is said to lie outside. Moved 2.6 mm down, that slice (40 voxels of 4.05 mm3:
    0.162 ml of 0.324 ml) lies outside."""
    flair, _ = make_volume(size=(48, 40, 6))
    flairNode = mrml.volumeFromImage(flair, "FLAIR")
    marks = np.zeros((6, 40, 48), np.uint8)
    marks[0, 20, 4:44] = marks[3, 20, 4:44] = 1
    for down, said in ((2.5, False), (2.6, True)):
        mask = sitk.GetImageFromArray(marks)
        mask.CopyInformation(flair)
        mask.SetOrigin(tuple(np.array(flair.GetOrigin()) - [0.0, 0.0, down]))
        labelmap = mrml.volumeFromImage(mask, f"manual {down}", "vtkMRMLLabelMapVolumeNode")
        notes = mrml.outsideNote(labelmap, flairNode, "the Dice or the volumes")
        assert bool(notes) == said, (down, notes)
        if said:
            assert notes[0].startswith(f"0.16 ml of 'manual {down}' (of its 0.32 ml) lie outside the field of view")


def test_a_frame_of_a_series_moved_on_during_its_run_gets_the_result_of_the_frame_segmented(scene, monkeypatch,
                                                                                            tiny_model):
    """A 4D or multi-frame series browsed in Slicer is one proxy volume whose voxels the sequence browser replaces
    frame by frame. Its voxels are copied when Segment WMH starts, so the mask is of that frame; but browsed on to
    another frame while it ran, the result was put on the proxy node as it showed then (another frame's voxels, and
    their geometry), named '<series> WMH' with nothing to tell which frame it was of. The browser is now put back on
    the frame segmented, the result is named and recorded with that frame and the status line says so; a rerun on
    another frame makes a result of its own rather than overwrite this frame's."""
    oracle_network(monkeypatch)
    first, truthFirst = make_volume(**OBLIQUE)
    second, truthSecond = make_volume(**dict(OBLIQUE, blobs=((0.7, 0.35, 0.5, 6.0),)))
    browser, proxy, sequences = seriesOfFrames(scene, [first, second])
    assert dice(sitk.Cast(mrml.imageFromVolume(proxy) > 600, sitk.sitkUInt8), truthFirst) == 1.0
    started, gate = lateSegmentation(monkeypatch)
    logic = DeepWMLCoreLogic()
    logic.workerPython = None
    job = logic.startSegmentation(proxy, device="cpu", modelPaths=[str(tiny_model)], brainMask=False, location=False)
    assert started.wait(10)
    browser.SetSelectedItemNumber(1)  # the user browses on: the proxy node's voxels are the second frame's now
    assert dice(sitk.Cast(mrml.imageFromVolume(proxy) > 600, sitk.sitkUInt8), truthSecond) == 1.0
    gate.set()
    assert job.wait(60)
    result = logic.finishSegmentation(job)

    assert browser.GetSelectedItemNumber() == 0  # shown with the frame it was made from
    assert dice(mrml.maskFromSegmentation(result, proxy), truthFirst) > 0.9
    assert result.GetName() == "FLAIR series WMH (time = 0.00 s)"
    assert job.notes == ["The sequence browser 'FLAIR series browser' was moved to time = 10.00 s while 'FLAIR series' "
                         "was being segmented: the result is of time = 0.00 s, the frame segmented, which is shown again"]
    report = logic.lesionStatistics(result, proxy)
    assert report["frame"] == {"label": "time = 0.00 s", "item": 0, "sequence": "FLAIR series",
                               "browser_name": "FLAIR series browser"}
    assert "Frame time = 0.00 s of the sequence 'FLAIR series'" in logic.formatReport(report)
    assert logic.outputFor(result, proxy) is result  # the same frame: rerun into it
    browser.SetSelectedItemNumber(1)
    assert logic.outputFor(result, proxy) is None  # another frame: a result of its own
    second_result = logic.segmentVolume(proxy, device="cpu", modelPaths=[str(tiny_model)], brainMask=False,
                                        location=False, segmentationNode=logic.outputFor(result, proxy))
    assert second_result.GetName() == "FLAIR series WMH (time = 10.00 s)"
    assert dice(mrml.maskFromSegmentation(second_result, proxy), truthSecond) > 0.9
    browser.SetSelectedItemNumber(0)
    assert dice(mrml.maskFromSegmentation(result, proxy), truthFirst) > 0.9  # the first frame's result is untouched

    # the browser removed meanwhile: which frame the proxy holds is unknown, so the run is refused, nothing written
    job = logic.startSegmentation(proxy, device="cpu", modelPaths=[str(tiny_model)], brainMask=False, location=False)
    assert job.wait(60)
    mrml.removeNode(browser)
    with pytest.raises(DeepWMLError, match="^'FLAIR series' was segmented at time = 0.00 s of the sequence 'FLAIR "
                                           "series', and its sequence browser was removed meanwhile"):
        logic.finishSegmentation(job)
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 2
    del sequences


def test_a_segmentation_is_read_with_the_source_representation_names_of_any_supported_slicer():
    """Slicer renamed a segmentation's "master" representation its "source" representation (GetSourceRepresentationName
    beside GetMasterRepresentationName, kept as a deprecated alias for a while). The module called only the new name: on
    a Slicer with the old one alone, choosing an existing segmentation as the output failed with AttributeError, and one
    that drops the old alias must keep working too. Fake segmentations with one name or the other."""
    labelmap = slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName()
    surface = slicer.vtkSegmentationConverter.GetSegmentationClosedSurfaceRepresentationName()

    class Old:  # Slicer before the rename
        def __init__(self, held):
            self.GetMasterRepresentationName = lambda: held

    class New:  # a Slicer that has dropped the deprecated alias
        def __init__(self, held):
            self.GetSourceRepresentationName = lambda: held

    def node(segmentation):
        return types.SimpleNamespace(GetSegmentation=lambda: segmentation, GetName=lambda: "chosen")

    for kind in (Old, New):
        assert mrml.sourceRepresentationName(kind(labelmap)) == labelmap
        mrml.checkMaskTarget(node(kind(labelmap)))  # binary labelmaps: written into
        with pytest.raises(DeepWMLError, match="^'chosen' holds its segments as closed surfaces"):
            mrml.checkMaskTarget(node(kind(surface)))
    with pytest.raises(DeepWMLError, match="neither GetSourceRepresentationName nor GetMasterRepresentationName"):
        mrml.sourceRepresentationName(object())


def _dicomFlair(tmp_path, monkeypatch):
    """A FLAIR series in a stand-in of Slicer's DICOM database (another series' files beside it, as the database may
    keep them) and its volume as Slicer's DICOM module loads it: the instance UIDs on it, its slices stored the other
    way round (a loader's own order: the same place in the world). Returns (volume, the series, its image as read)."""
    import slicer_standins
    from conftest import write_dicom_series

    flair, _ = make_volume(size=(40, 36, 6), spacing=(0.9, 0.9, 5.0), dtype=sitk.sitkInt16,
                           direction=rotation(0.1, -0.05, 0.2))
    other, _ = make_volume(size=(40, 36, 3), spacing=(0.9, 0.9, 5.0), dtype=sitk.sitkInt16)
    folder = write_dicom_series(tmp_path / "database", flair, uid="1.2.3.8", description="AX FLAIR", number=3,
                                inversion_ms=2500, extra={"0020|0052": "1.2.3.99", "0010|0020": "PAT-7"})
    write_dicom_series(folder, other, uid="1.2.3.9", description="AX T1", number=4, prefix="t1")
    monkeypatch.setattr(slicer, "dicomDatabase", slicer_standins.DicomDatabase(folder), raising=False)
    series = next(s for s in io.dicom_series(folder) if s.uid == "1.2.3.8")
    image = io.read_image(folder, series=series)
    volume = mrml.volumeFromImage(sitk.Flip(image, (False, False, True)), "3: AX FLAIR")
    volume.SetAttribute("DICOM.instanceUIDs", " ".join(series.instance_uids))
    return volume, series, image


def test_write_dicom_seg_of_a_volume_from_slicers_dicom_database(scene, tmp_path, monkeypatch, tiny_model):
    """The module's DICOM SEG (deepwml segment --dicom-seg's file) of a volume the DICOM module loaded: its files
    found through Slicer's DICOM database, the segmentation on that series' slices (read back: the segmentation's
    voxels, whatever order the volume stores its slices in); a volume not from DICOM, or whose files are gone from
    the database, is refused with a message and no file."""
    oracle_network(monkeypatch)
    volume, series, image = _dicomFlair(tmp_path, monkeypatch)
    logic = DeepWMLCoreLogic()
    segmentation = logic.segmentVolume(volume, device="cpu", modelPaths=[str(tiny_model)])
    path = tmp_path / "out" / logic.dicomSegPath(volume, tmp_path / "out").name
    assert path.name == "3_AX_FLAIR_wmh_seg.dcm"
    path.parent.mkdir()
    written = logic.writeDicomSeg(segmentation, volume, path)
    assert written["path"] == str(path) and written["file"] == path.name and written["series_number"] == 2003
    assert written["database"] is None  # not asked to add it
    expected = io.align_voxel_order(mrml.maskFromSegmentation(segmentation, volume), image)
    assert sitk.GetArrayFromImage(expected).any()
    fromSeg = io.read_mask(path, reference=image)  # read back onto the series' grid, with or without empty frames
    np.testing.assert_array_equal(sitk.GetArrayFromImage(fromSeg), sitk.GetArrayFromImage(expected))
    assert logic.dicomSegPath(volume, tmp_path / "out").name == "3_AX_FLAIR_2_wmh_seg.dcm"  # never the one there

    plain = mrml.volumeFromImage(image, "plain FLAIR")  # made in the scene (or loaded from a NIfTI file)
    plainSegmentation = logic.segmentVolume(plain, device="cpu", modelPaths=[str(tiny_model)])
    with pytest.raises(DeepWMLError, match="'plain FLAIR' was not loaded from DICOM"):
        logic.writeDicomSeg(plainSegmentation, plain, tmp_path / "plain.dcm")
    assert not (tmp_path / "plain.dcm").exists()
    Path(slicer.dicomDatabase.fileForInstance(series.instance_uids[2])).unlink()  # removed from the database
    with pytest.raises(DeepWMLError, match=r"no longer in Slicer's DICOM database \(1 of its 6 images not found\)"):
        logic.writeDicomSeg(segmentation, volume, tmp_path / "gone.dcm")
    assert not (tmp_path / "gone.dcm").exists()


def test_the_dicom_seg_of_an_edited_or_a_raters_segmentation_does_not_call_it_deepwmls_automatic_result(
        scene, tmp_path, monkeypatch, tiny_model):
    """The SEG's Segment Algorithm Type says whose the segmentation is: DeepWML's result as it wrote it AUTOMATIC
    (Segment Algorithm Name DeepWML); edited by hand in Slicer since (a lesion drawn) SEMIAUTOMATIC; a segmentation
    DeepWML did not write (a rater's) MANUAL, naming no algorithm. Every SEG the module wrote said AUTOMATIC."""
    pydicom = pytest.importorskip("pydicom")
    oracle_network(monkeypatch)
    volume, series, image = _dicomFlair(tmp_path, monkeypatch)
    logic = DeepWMLCoreLogic()
    segmentation = logic.segmentVolume(volume, device="cpu", modelPaths=[str(tiny_model)])

    def written(name):
        made = logic.writeDicomSeg(segmentation, volume, tmp_path / name)
        item = pydicom.dcmread(tmp_path / name).SegmentSequence[0]
        assert made["algorithm_type"] == item.SegmentAlgorithmType
        return item.SegmentAlgorithmType, item.get("SegmentAlgorithmName")

    assert written("automatic.dcm") == ("AUTOMATIC", "DeepWML")
    edited = mrml.maskFromSegmentation(segmentation, volume)
    array = sitk.GetArrayFromImage(edited)
    array[1, :4, :4] = 1  # a lesion drawn by hand
    drawn = sitk.GetImageFromArray(array)
    drawn.CopyInformation(edited)
    mrml.segmentationFromMask(drawn, volume, segmentation, segmentName=mrml.WMH_SEGMENT_NAME)
    assert written("edited.dcm") == ("SEMIAUTOMATIC", "DeepWML")
    rater = mrml.segmentationFromMask(drawn, volume, None, segmentName="lesions")  # a new node, not DeepWML's
    segmentation = rater
    assert written("rater.dcm") == ("MANUAL", None)
    np.testing.assert_array_equal(  # the rater's lesions, as drawn
        sitk.GetArrayFromImage(io.read_mask(tmp_path / "rater.dcm", reference=image)),
        sitk.GetArrayFromImage(io.align_voxel_order(mrml.maskFromSegmentation(rater, volume), image)))


def test_write_dicom_seg_of_a_series_whose_database_files_share_names(scene, tmp_path, monkeypatch, tiny_model):
    """The database keeps the series' files in two folders under the same names (slice000.dcm twice, as files indexed
    where they lay may be): each file linked once under a name of its own, the series read whole, the SEG the
    segmentation on its slices."""
    import shutil

    import slicer_standins

    oracle_network(monkeypatch)
    volume, series, image = _dicomFlair(tmp_path, monkeypatch)
    folder = Path(slicer.dicomDatabase.fileForInstance(series.instance_uids[0])).parent
    first, second = tmp_path / "db" / "a", tmp_path / "db" / "b"
    first.mkdir(parents=True), second.mkdir()
    for k, uid in enumerate(series.instance_uids):  # the slices shared out, each under the name slice00N.dcm
        source = Path(slicer.dicomDatabase.fileForInstance(uid))
        shutil.copyfile(source, (first if k % 2 else second) / f"slice{k // 2:03d}.dcm")
    shutil.rmtree(folder)
    monkeypatch.setattr(slicer, "dicomDatabase", slicer_standins.DicomDatabase(first, second), raising=False)
    assert {p.name for p in first.iterdir()} == {p.name for p in second.iterdir()}
    logic = DeepWMLCoreLogic()
    segmentation = logic.segmentVolume(volume, device="cpu", modelPaths=[str(tiny_model)])
    written = logic.writeDicomSeg(segmentation, volume, tmp_path / "s.dcm")
    expected = io.align_voxel_order(mrml.maskFromSegmentation(segmentation, volume), image)
    assert sitk.GetArrayFromImage(expected).any() and written["frames"] >= 2
    np.testing.assert_array_equal(sitk.GetArrayFromImage(io.read_mask(tmp_path / "s.dcm", reference=image)),
                                  sitk.GetArrayFromImage(expected))


def test_write_dicom_seg_refuses_a_volume_resampled_since_it_was_loaded_and_adds_to_the_database_when_asked(
        scene, tmp_path, monkeypatch, tiny_model):
    """A volume cropped since the DICOM module loaded it no longer lies on its series' slices: refused, no file. Asked
    to, the SEG is imported into the DICOM database with Slicer's DICOMUtils (a folder of it alone, copied); where
    DICOMLib is missing the file is written all the same and the result says so."""
    oracle_network(monkeypatch)
    volume, series, image = _dicomFlair(tmp_path, monkeypatch)
    logic = DeepWMLCoreLogic()
    segmentation = logic.segmentVolume(volume, device="cpu", modelPaths=[str(tiny_model)])
    cropped = mrml.volumeFromImage(image[:, :, 1:], "cropped")
    cropped.SetAttribute("DICOM.instanceUIDs", volume.GetAttribute("DICOM.instanceUIDs"))
    with pytest.raises(DeepWMLError, match="'cropped' no longer lies on the grid of the DICOM series"):
        logic.writeDicomSeg(segmentation, cropped, tmp_path / "cropped.dcm")
    assert not (tmp_path / "cropped.dcm").exists()

    imports = []

    def importDicom(folder, database=None, copyFiles=False):
        imports.append((sorted(p.name for p in Path(folder).iterdir()), database, copyFiles))
        return True

    monkeypatch.setitem(sys.modules, "DICOMLib", types.SimpleNamespace(DICOMUtils=types.SimpleNamespace(
        importDicom=importDicom)))
    written = logic.writeDicomSeg(segmentation, volume, tmp_path / "seg.dcm", addToDatabase=True)
    assert imports == [(["seg.dcm"], slicer.dicomDatabase, True)]
    assert written["database"] == "added to Slicer's DICOM database"
    monkeypatch.setitem(sys.modules, "DICOMLib", None)  # not importable
    written = logic.writeDicomSeg(segmentation, volume, tmp_path / "seg2.dcm", addToDatabase=True)
    assert (tmp_path / "seg2.dcm").is_file() and "not added to Slicer's DICOM database" in written["database"]



def _manual_segmentation_to_split():
    """A FLAIR volume node with a manual segmentation (no 'Lateral ventricles' segment), and lesionStatistics' /
    startSplit's arguments for its split made by the shipped ventricle model on the CPU: (FLAIR image, volume node,
    segmentation node, arguments)."""
    flair, truth = make_volume(spacing=(0.9, 0.9, 5.0), blobs=((0.3, 0.6, 0.5, 6.0),))
    volume = mrml.volumeFromImage(flair, "FLAIR")
    manual = mrml.segmentationFromMask(truth, volume, name="manual")
    model = str(REPO / "Resources" / "Models" / "deepwml_vent8_synth_v1.pt")
    return flair, volume, manual, dict(segmentationNode=manual, volumeNode=volume, ventricleModel=model, device="cpu")

def test_the_split_networks_start_as_a_job_that_keeps_nothing_when_cancelled(scene, monkeypatch):
    """lesionStatistics made the split of a segmentation without its own ventricles by running the networks in the
    calling thread (the panel's main thread). startSplit runs them as a job instead, where they are needed and not
    kept already: polled and cancelled as a segmentation job; cancelled, nothing is kept (finishSplit raises
    Cancelled); finished, finishSplit keeps their work and lesionStatistics runs no network."""
    import DeepWMLLib.inference as inference

    flair, volume, manual, arguments = _manual_segmentation_to_split()
    logic = DeepWMLCoreLogic()
    assert logic.startSplit(manual, volume, ventricleModel=None) is None  # no split asked for: no job
    runs, predict = [], inference.predict_maps
    monkeypatch.setattr(inference, "predict_maps", lambda *a, **k: runs.append(k.get("cancel")) or predict(*a, **k))

    job = logic.startSplit(**arguments)
    job.cancel()
    assert job.wait(30) and job.cancelled
    with pytest.raises(Cancelled):
        logic.finishSplit(job)
    assert logic._locationInputs is None
    job = logic.startSplit(**arguments)
    assert job.kind == "split" and job.wait(30)
    logic.finishSplit(job)
    assert job.fraction == 1.0 and runs[-1] is not None  # the networks looked at Cancel
    count = len(runs)
    assert logic.startSplit(**arguments) is None  # kept
    report = logic.lesionStatistics(**arguments)
    assert len(runs) == count and report["location"]["ventricles"].startswith("the ventricle network on 'FLAIR'")
    with pytest.raises(DeepWMLError, match="wait for the run going on now"):  # another job runs: never two at once
        logic.startSplit(**{**arguments, "precision": "fp32"}, busy=True)


def test_bf16_is_refused_where_a_run_would_refuse_it(monkeypatch):
    """What the panel greys the bf16 item out for: a GPU, or a CPU without native bf16 (the runtime asked); nothing
    where the device itself is refused (cuda without a GPU) or PyTorch is not installed yet."""
    import torch

    from DeepWMLLib import inference

    logic = DeepWMLCoreLogic()
    native = [False]
    monkeypatch.setattr(inference, "cpu_computes_bf16", lambda backend="auto": native[0])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "does not compute bf16 natively" in logic.bf16Refusal("cpu") == logic.bf16Refusal("auto")
    assert logic.bf16Refusal("cuda") == ""
    native[0] = True
    assert logic.bf16Refusal("cpu") == logic.bf16Refusal("auto") == ""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert "is for the CPU" in logic.bf16Refusal("auto") and "is for the CPU" in logic.bf16Refusal("cuda")
    assert logic.bf16Refusal("cpu") == ""


def test_a_split_job_keeps_nothing_where_the_volume_changed_or_left_while_its_networks_ran(scene):
    """finishSplit kept the networks' work by the key taken when the job started, whatever became of the volume
    meanwhile: a volume whose voxels were changed (an edit, another frame of a sequence) or that was deleted left its
    ventricles (a byte a voxel) kept under a key nothing matches again, until the next split or the scene's close. The
    key is taken again when the job finishes: the work is kept only where it is still that of the volume."""
    flair, volume, manual, arguments = _manual_segmentation_to_split()
    logic = DeepWMLCoreLogic()

    job = logic.startSplit(**arguments)
    assert job.wait(30)
    volume.GetImageData().Modified()  # the voxels changed while the networks ran
    kept = logic.finishSplit(job)
    assert logic._locationInputs is None and kept is False
    job = logic.startSplit(**arguments)  # the changed volume's networks: a job again
    assert job is not None and job.wait(30)
    scene.RemoveNode(volume)
    kept = logic.finishSplit(job)
    assert logic._locationInputs is None and kept is False

    volume = mrml.volumeFromImage(flair, "FLAIR")
    arguments["volumeNode"] = volume
    job = logic.startSplit(**arguments)
    assert job.wait(30) and logic.finishSplit(job) is True and logic.startSplit(**arguments) is None  # kept
