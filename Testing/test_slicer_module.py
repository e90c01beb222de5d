"""DeepWML.py itself, on real MRML nodes with the qt/ScriptedLoadableModule stand-ins: module metadata,
the module's own self-test, and the widget's wiring (Segment WMH / Cancel with progress, results,
per-slice table and slice jumps, reference comparison, rater consensus, saving)."""

from __future__ import annotations

import csv
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).parent / "slicer" / "support"))

import slicer  # noqa: E402
import slicer_standins  # noqa: E402
from conftest import make_volume, oracle_network, rotation  # noqa: E402
from DeepWMLLib import io  # noqa: E402
from DeepWMLLib.errors import DeepWMLError  # noqa: E402
from DeepWMLLib.export import BRAIN_MASK_GATES_VENTRICLES  # noqa: E402
from slicer_fixtures import (blockingSegmentation, countNetworkRuns, gatedChange, lateSegmentation, module, onnxCache,  # noqa: E402,F401 (fixtures)
                             scene, seriesOfFrames)

from DeepWMLSlicerLib import MRMLConversion as mrml  # noqa: E402


def test_module_metadata(module):
    parent = type("Parent", (), {})()
    module.DeepWML(parent)
    assert parent.title == "DeepWML" and parent.categories == ["Segmentation"]
    assert "WMH" in parent.helpText


def test_the_modules_self_test_passes(module, tiny_model):
    test = module.DeepWMLTest()
    test.modelPaths = [str(tiny_model)]
    test.runTest()


def test_the_modules_self_test_runs_the_shipped_default_model(module):
    module.DeepWMLTest().test_segment_and_measure()


@pytest.fixture
def widget(module, scene, monkeypatch):
    flair, truth = make_volume(direction=rotation(0.15, 0.0, -0.3), spacing=(0.9, 0.9, 5.0),
                               blobs=((0.3, 0.6, 0.5, 6.0),))
    mrml.volumeFromImage(flair > 1e9, "a labelmap first", "vtkMRMLLabelMapVolumeNode")  # the selector hides it
    volume = mrml.volumeFromImage(flair, "FLAIR")
    widget = module.DeepWMLWidget()  # no parent: set up at once, as Slicer does
    widget.truth, widget.volume = truth, volume
    yield widget
    widget.cleanup()  # as Slicer does when the module is closed: observers off, job cancelled
    if widget._job is not None:
        widget._job.wait(10)


def finishJob(widget) -> None:
    """What the QTimer does while the job runs: poll until the worker thread is done."""
    job = widget._job
    assert job is not None and widget._timer.active
    assert job.wait(30)
    widget._timer.fire()
    assert not widget._timer.active


def test_widget_binds_the_parameter_node_and_lists_models(widget, module):
    ui, p = widget.ui, widget._parameterNode
    assert p.inputVolume is widget.volume  # the first scalar volume in the scene (not a labelmap) is preselected
    assert widget.logic is not None and widget.ui.applyButton is not None
    p.referenceSegmentation = None  # a selector set back to "None" (Slicer refuses this for a Union without None)
    p.raterA = p.raterB = None
    shipped = widget.logic.shippedModels()
    names = [m["name"] for m in shipped]
    ensembles = [e["name"] for e in widget.logic.shippedEnsembles()]
    listed = [name for name in ui.modelComboBox.items[:-1] if name != widget.logic.defaultEnsembleChoice()]
    assert sorted(listed) == sorted(names + ensembles)
    assert ui.modelComboBox.items[-1] == module.MODEL_FILE_CHOICE
    # the shipped default first: the default ensemble when several models are default, else that model
    ensemble = widget.logic.defaultEnsembleChoice()
    default = ensemble or next((m["name"] for m in shipped if m.get("default")), names[0])
    assert ui.modelComboBox.items[0] == default and ui.modelComboBox.currentIndex == 0
    assert ui.applyButton.text == "Segment WMH" and ui.applyButton.enabled
    assert not ui.compareButton.enabled and not ui.consensusButton.enabled and not ui.saveResultsButton.enabled
    ui.modelComboBox.currentIndex = len(ui.modelComboBox.items) - 1
    assert p.modelName == module.MODEL_FILE_CHOICE and ui.modelFilePathLineEdit.visible
    p.useModelThreshold = False
    assert ui.thresholdSliderWidget.enabled


def test_the_selector_offers_the_measured_ensembles_and_no_all_models_checkbox(widget, module, monkeypatch):
    """'Ensemble of all shipped models' (a checkbox) averaged all thirteen WMH models, a combination never measured;
    the selector offers the ensembles the model card measured after the default, with their figures as the tooltip,
    and Segment WMH runs their members."""
    ui, p = widget.ui, widget._parameterNode
    assert not hasattr(ui, "ensembleCheckBox") and "ensemble" not in type(p).allFields
    index = ui.modelComboBox.findText("ensemble-v8")
    assert 0 < index <= 2 and ui.modelComboBox.findText("ensemble-v7") == index + 1
    assert "median Dice" in ui.modelComboBox.itemData[(index, 3)]  # qt.Qt.ToolTipRole
    members = [e for e in widget.logic.shippedEnsembles() if e["name"] == "ensemble-v8"][0]["paths"]
    started = []

    def start(volume, **options):  # what would run, without running four networks
        started.append(options)
        raise RuntimeError("stop here")

    monkeypatch.setattr(widget.logic, "startSegmentation", start)
    ui.modelComboBox.currentIndex = index
    assert p.modelName == "ensemble-v8" and not ui.modelFilePathLineEdit.visible
    with pytest.raises(RuntimeError, match="stop here"):
        ui.applyButton.click()
    assert started[0]["modelPaths"] == members and len(members) == 4


def test_segment_button_runs_in_background_shows_progress_and_results(widget, module, monkeypatch, tiny_model):
    oracle_network(monkeypatch)
    ui, p = widget.ui, widget._parameterNode
    p.modelName, p.modelFile, p.device = module.MODEL_FILE_CHOICE, tiny_model, "cpu"
    ui.applyButton.click()
    assert ui.applyButton.text == "Cancel"
    finishJob(widget)

    assert ui.applyButton.text == "Segment WMH" and ui.progressBar.value == 100
    segmentation = p.outputSegmentation
    assert segmentation.GetName() == "FLAIR WMH"
    assert "Total lesion volume" in ui.resultsLabel.text and "in 1 lesion\n" in ui.resultsLabel.text
    report = widget.logic.lesionStatistics(segmentation, widget.volume)
    lesionSlices = [s["index"] for s in report["slices"] if s["area_mm2"] > 0]
    assert [row[0].text for row in ui.sliceTable.rows] == [str(k) for k in lesionSlices]
    assert ui.sliceTable.headers[:4] == ["Slice", "Area (mm²)", "LV (ml)", "LV group"]
    composite = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
    ui.applyButton.click()  # a second run writes into the same segmentation node
    finishJob(widget)
    assert p.outputSegmentation is segmentation
    assert slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 1
    assert composite.GetBackgroundVolumeID() == widget.volume.GetID()  # shown over the FLAIR

    ui.sliceTable.selectRow(len(lesionSlices) - 1)
    red = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLSliceNode")
    centre = slicer.util.arrayFromVTKMatrix(red.GetSliceToRAS())[:3, 3]
    np.testing.assert_allclose(centre, mrml.sliceCenterRAS(widget.volume, lesionSlices[-1]), atol=1e-6)


def test_the_panels_precision_is_saved_and_reaches_the_job(widget, module, tiny_model):
    """The panel had no precision choice (deepwml segment --precision): on a CPU that computes bf16 natively no
    run in Slicer could be fp32. Precision (default auto) is a parameter of the scene, and Segment WMH runs it."""
    ui, p = widget.ui, widget._parameterNode
    assert p.precision == "auto"
    assert widget.logic.getParameterNode().parameterNode.GetParameter("precision") == "auto"
    p.modelName, p.modelFile, p.device, p.precision = module.MODEL_FILE_CHOICE, tiny_model, "cpu", "fp32"
    assert widget.logic.getParameterNode().parameterNode.GetParameter("precision") == "fp32"  # saved with the scene
    ui.applyButton.click()
    assert widget._job.precision == "fp32"
    finishJob(widget)
    assert widget.logic.lesionStatistics(p.outputSegmentation, widget.volume)["settings"]["precision"] == "fp32"


def test_the_panels_steadier_marks_option_is_saved_and_runs_four_grid_phases(widget, module, tiny_model):
    """deepwml segment --grid-phases 4 was on the command line only. The panel's 'Steadier marks' (off by default)
    is a parameter of the scene, read back as saved, and Segment WMH runs four grid phases with it, recorded in the
    result's settings as the command line records them; a scene saved before the option runs one."""
    ui, p = widget.ui, widget._parameterNode
    assert p.averageGridPhases is False
    p.modelName, p.modelFile, p.device, p.averageGridPhases = module.MODEL_FILE_CHOICE, tiny_model, "cpu", True
    assert widget.logic.getParameterNode().averageGridPhases is True  # saved with the scene, and read back
    assert p.parameterNode.GetParameter("averageGridPhases") == "True"
    ui.applyButton.click()
    assert widget._job.gridPhases == 4
    finishJob(widget)
    assert widget.logic.lesionStatistics(p.outputSegmentation, widget.volume)["settings"]["grid_phases"] == 4
    p.parameterNode.UnsetParameter("averageGridPhases")  # a scene of an older version
    assert widget.logic.getParameterNode().averageGridPhases is False
    ui.applyButton.click()
    assert widget._job.gridPhases == 1
    finishJob(widget)
    assert widget.logic.lesionStatistics(p.outputSegmentation, widget.volume)["settings"]["grid_phases"] == 1


def bf16Item(ui) -> tuple[bool, str]:
    """Whether the Precision box's bf16 item can be chosen (its flags, as QStandardItem keeps them), and its tooltip."""
    qt = sys.modules["qt"]
    box = ui.precisionComboBox
    index = box.findText("bf16")
    assert index >= 0, box.items  # filled with the choices as Slicer's connector fills it
    return box.itemData.get((index, qt.Qt.UserRole - 1), 33) != 0, box.itemData.get((index, qt.Qt.ToolTipRole), "")


def test_precision_bf16_is_not_offered_where_it_would_be_refused(widget, monkeypatch):
    """`--precision bf16` on a CPU without native bf16 (or on a GPU) is refused by the command line before anything
    runs; the panel offered it, and refused it only when Segment WMH started. Its item is greyed out now, its tooltip
    saying why, and checked again as the device changes; a bf16 saved with a scene (chosen on another computer) is
    put back to auto with the reason on the status line, and the run gets auto."""
    import torch

    from DeepWMLLib import inference

    native, gpu = [False], [False]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu[0])
    monkeypatch.setattr(inference, "cpu_computes_bf16", lambda backend="auto": native[0])
    ui, p = widget.ui, widget._parameterNode
    widget.exit()
    widget.enter()  # the box filled again by the parameter node's connection: its items' states set again
    p.device = "cpu"
    enabled, tip = bf16Item(ui)
    assert not enabled and "does not compute bf16 natively" in tip
    native[0] = True  # another computer: checked again when the device changes
    p.device = "auto"
    assert bf16Item(ui)[0]
    p.precision = "bf16"
    assert p.precision == "bf16" and "bf16" not in ui.deviceNoteLabel.text
    gpu[0] = True
    p.device = "cuda"  # bf16 is for the CPU: put back to auto at once, saying why
    enabled, tip = bf16Item(ui)
    assert not enabled and "for the CPU" in tip
    assert p.precision == "auto" and "Precision bf16 is not used here" in ui.statusLabel.text
    p.device = "cpu"
    assert bf16Item(ui)[0]
    gpu[0], native[0] = False, False
    p.device = "cuda"  # no GPU: refused by the device note, not told for bf16; the tooltip claims nothing of this CPU
    enabled, tip = bf16Item(ui)
    assert enabled and "this CPU" not in tip and "natively" in tip

    # a scene saved with bf16, opened on a computer whose CPU cannot run it
    gpu[0], native[0] = False, False
    widget.exit()
    p.parameterNode.SetParameter("precision", "bf16")
    p.parameterNode.SetParameter("device", "auto")
    ui.statusLabel.text = ""
    widget.enter()
    assert p.precision == "auto" and not bf16Item(ui)[0]
    assert ui.statusLabel.text.startswith("Precision bf16 is not used here: This CPU does not compute bf16 natively")
    assert "Precision auto is selected" in ui.statusLabel.text


def test_segment_button_with_a_worker_process_shows_progress_results_and_cancels(widget, module, tiny_model):
    ui, p = widget.ui, widget._parameterNode
    widget.logic.workerPython = sys.executable  # as in Slicer, where it is PythonSlicer
    p.modelName, p.modelFile, p.device = module.MODEL_FILE_CHOICE, tiny_model, "cpu"
    ui.applyButton.click()
    assert ui.applyButton.text == "Cancel" and widget._job.python == sys.executable
    finishJob(widget)
    assert ui.applyButton.text == "Segment WMH" and ui.progressBar.value == 100
    assert p.outputSegmentation.GetName() == "FLAIR WMH" and "Total lesion volume" in ui.resultsLabel.text
    ui.applyButton.click()
    job = widget._job
    ui.applyButton.click()  # Cancel: the process is ended at once
    assert job.wait(5) and job.cancelled
    widget._timer.fire()
    assert widget._job is None and ui.statusLabel.text == "Cancelled." and ui.applyButton.text == "Segment WMH"


def test_the_periventricular_option_runs_the_ventricle_model_only_when_ticked(widget, module, monkeypatch, tiny_model,
                                                                             tmp_path):
    """Off (as in `deepwml segment`, where the ventricle model is opt-in): no ventricle segment. Ticked:
    the shipped ventricle model runs, its hidden segment is added and the results speak of the split."""
    from conftest import tiny_model_file

    oracle_network(monkeypatch)
    ui, p = widget.ui, widget._parameterNode
    assert p.ventricleSplit is False and Path(widget.logic.ventricleModelPath()).is_file()  # the shipped, opt-in one
    ventricles = tiny_model_file(tmp_path / "vent.pt", labels={"0": "background", "1": "lateral_ventricles"})
    monkeypatch.setattr(widget.logic, "ventricleModelPath", lambda: str(ventricles))  # tiny, to stay fast
    p.modelName, p.modelFile, p.device = module.MODEL_FILE_CHOICE, tiny_model, "cpu"
    ui.applyButton.click()
    finishJob(widget)
    content = p.outputSegmentation.GetSegmentation()
    assert not content.GetSegmentIdBySegmentName(mrml.VENTRICLE_SEGMENT_NAME)
    assert "periventricular" not in ui.resultsLabel.text.lower()

    p.ventricleSplit = True
    ui.applyButton.click()
    finishJob(widget)
    assert content.GetSegmentIdBySegmentName(mrml.VENTRICLE_SEGMENT_NAME)
    assert "periventricular" in ui.resultsLabel.text.lower()

    monkeypatch.setattr(widget.logic, "ventricleModelPath", lambda: None)  # a build that ships none
    with pytest.raises(Exception, match="needs a lateral-ventricle model"):
        ui.applyButton.click()
    assert widget._job is None and ui.applyButton.text == "Segment WMH"


def test_a_device_check_that_fails_is_shown_and_the_buttons_still_follow(widget, monkeypatch):
    ui = widget.ui

    def broken(device, precision="auto"):
        raise RuntimeError("torch cannot be imported")

    monkeypatch.setattr(widget.logic, "deviceNote", broken)
    widget._deviceNoteFor = None
    ui.applyButton.enabled = False
    widget.updateGUIFromParameterNode()  # real Slicer's tryWithErrorDisplay raised here, after its dialog
    assert ui.deviceNoteLabel.text == "Cannot check the device: torch cannot be imported"
    assert ui.applyButton.enabled  # a FLAIR is chosen: Segment WMH is not left disabled


def test_models_that_cannot_be_listed_leave_the_module_set_up(module, scene, monkeypatch):
    def broken(self):
        raise OSError("models.json: permission denied")

    monkeypatch.setattr(module.DeepWMLLogic, "modelChoices", broken)
    mrml.volumeFromImage(make_volume()[0], "FLAIR")
    widget = module.DeepWMLWidget()
    try:
        assert widget._parameterNode is not None  # set-up went on to the parameter node
        assert "permission denied" in widget.ui.statusLabel.text
        assert widget.ui.modelComboBox.items == [module.MODEL_FILE_CHOICE]  # a model file can still be chosen
    finally:
        widget.cleanup()


def test_cancel_button_stops_the_run(widget, monkeypatch):
    started = blockingSegmentation(monkeypatch)
    ui = widget.ui
    ui.applyButton.click()
    assert started.wait(5)
    widget._timer.fire()  # a poll while running changes nothing
    assert ui.applyButton.text == "Cancel"
    ui.applyButton.click()
    assert ui.statusLabel.text == "Cancelling..."
    finishJob(widget)
    assert ui.statusLabel.text == "Cancelled." and ui.applyButton.text == "Segment WMH"
    assert widget._parameterNode.outputSegmentation is None


def startHeldRun(widget, module, monkeypatch, tiny_model):
    """Segment WMH clicked with a run held in its last steps (post-processing, report) until `gate` is set:
    (the widget's ui, gate)."""
    oracle_network(monkeypatch)
    started, gate = lateSegmentation(monkeypatch)
    ui, p = widget.ui, widget._parameterNode
    p.modelName, p.modelFile, p.device = module.MODEL_FILE_CHOICE, tiny_model, "cpu"
    ui.applyButton.click()
    assert started.wait(5)
    return ui, gate


def test_the_status_says_cancelling_until_a_cancelled_run_has_ended(widget, module, monkeypatch, tiny_model):
    """A run in a thread goes on after Cancel until segment_image returns (its post-processing and report,
    seconds on a real scan); each poll put its step ("segmenting") back over "Cancelling...", as if Cancel
    had not been heard."""
    ui, gate = startHeldRun(widget, module, monkeypatch, tiny_model)
    widget._timer.fire()
    assert ui.statusLabel.text == "segmenting"
    ui.applyButton.click()
    widget._timer.fire()  # still running
    assert ui.statusLabel.text == "Cancelling..." and ui.applyButton.text == "Cancel"
    gate.set()
    finishJob(widget)
    assert ui.statusLabel.text == "Cancelled." and ui.applyButton.text == "Segment WMH"


@pytest.mark.parametrize("how", ["Cancel", "closing the scene"])
def test_cancel_or_closing_the_scene_late_in_the_run_puts_nothing_into_the_scene(widget, module, monkeypatch,
                                                                                 tiny_model, how):
    """Cancel in the run's last seconds (post-processing, report) gave "Done." and the result anyway; closing
    the scene then gave the dialog "Segmentation failed: the volume was removed from the scene"."""
    ui, gate = startHeldRun(widget, module, monkeypatch, tiny_model)
    if how == "Cancel":
        ui.applyButton.click()
    else:
        slicer.mrmlScene.Clear(0)
    gate.set()
    finishJob(widget)  # no error display
    assert ui.statusLabel.text == "Cancelled." and ui.applyButton.text == "Segment WMH"
    assert slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0
    assert ui.resultsLabel.text == "" and widget._parameterNode.outputSegmentation is None


def test_errors_reach_the_error_display_and_the_button_recovers(widget, module):
    p = widget._parameterNode
    p.modelName = module.MODEL_FILE_CHOICE  # but no model file chosen
    with pytest.raises(Exception, match="choose a DeepWML model file"):
        widget.ui.applyButton.click()  # tryWithErrorDisplay shows it, then raises it again (so does real Slicer)
    assert widget._job is None and widget.ui.applyButton.text == "Segment WMH"


def test_compare_consensus_and_save_from_the_gui(widget, tmp_path):
    ui, p = widget.ui, widget._parameterNode
    truth = widget.truth
    p.outputSegmentation = mrml.segmentationFromMask(sitk.BinaryDilate(truth, [1, 1, 0]), widget.volume, name="auto")
    p.referenceSegmentation = mrml.segmentationFromMask(truth, widget.volume, name="manual")
    assert ui.compareButton.enabled
    ui.compareButton.click()
    assert ui.comparisonLabel.text.startswith("Dice 0.") and "sensitivity 1.000" in ui.comparisonLabel.text
    assert "Dice" in ui.sliceTable.headers and ui.saveResultsButton.enabled
    slicer_standins.QFileDialog.nextPath = str(tmp_path / "comparison.csv")
    ui.saveResultsButton.click()
    rows = list(csv.DictReader(open(tmp_path / "comparison.csv", encoding="utf-8-sig")))
    assert rows and all(float(r["sensitivity"]) == 1.0 for r in rows)

    p.raterA, p.raterB = p.referenceSegmentation, p.outputSegmentation
    p.consensusThreshold = 0.99
    ui.consensusButton.click()
    assert "FAIL" in ui.consensusLabel.text and "Most discordant slices" in ui.consensusLabel.text
    assert ui.sliceTable.headers[-1] == "Disagreement (mm²)"
    p.consensusThreshold = 0.2
    ui.consensusButton.click()
    assert "PASS" in ui.consensusLabel.text
    slicer_standins.QFileDialog.nextPath = ""  # the user cancels the file dialog
    ui.saveResultsButton.click()


def test_save_results_offers_a_name_of_the_patients_flair_and_the_last_folder(widget, tmp_path):
    """Save results offered "deepwml_results.csv" for every patient and every kind of result, in whatever
    folder Slicer was started from; a saved consensus .json named neither rater, a comparison not the reference."""
    ui, p = widget.ui, widget._parameterNode
    widget.volume.SetName("3: AX FLAIR")  # a DICOM series' name
    p.outputSegmentation = mrml.segmentationFromMask(widget.truth, widget.volume, name="auto")
    p.referenceSegmentation = mrml.segmentationFromMask(widget.truth, widget.volume, name="manual")
    ui.showStatisticsButton.click()
    slicer_standins.QFileDialog.nextPath = ""  # the user cancels the dialog
    ui.saveResultsButton.click()
    assert slicer_standins.QFileDialog.offered == "3_AX_FLAIR_lesions.csv"
    ui.compareButton.click()
    slicer_standins.QFileDialog.nextPath = str(tmp_path / "patient 7" / "comparison.csv")
    (tmp_path / "patient 7").mkdir()
    ui.saveResultsButton.click()
    assert slicer_standins.QFileDialog.offered == "3_AX_FLAIR_comparison.csv"
    slicer_standins.QFileDialog.nextPath = str(tmp_path / "patient 7" / "comparison.json")
    ui.saveResultsButton.click()
    saved = json.loads((tmp_path / "patient 7" / "comparison.json").read_text(encoding="utf-8"))
    assert (saved["report"]["volume"], saved["report"]["segmentation"], saved["reference"]) == ("3: AX FLAIR", "auto",
                                                                                               "manual")
    p.raterA, p.raterB = p.referenceSegmentation, p.outputSegmentation
    ui.consensusButton.click()
    slicer_standins.QFileDialog.nextPath = ""
    ui.saveResultsButton.click()
    assert slicer_standins.QFileDialog.offered == str(tmp_path / "patient 7" / "3_AX_FLAIR_consensus.json")
    slicer_standins.QFileDialog.nextPath = slicer_standins.QFileDialog.offered  # the user takes the name offered
    ui.saveResultsButton.click()
    saved = json.loads((tmp_path / "patient 7" / "3_AX_FLAIR_consensus.json").read_text(encoding="utf-8"))["consensus"]
    assert (saved["rater_a"], saved["rater_b"], saved["volume"]) == ("manual", "auto", "3: AX FLAIR")
    # the next patient's series has the same name, and the dialog opens in the folder saved to last: the name
    # offered was the previous patient's file, which taking it would overwrite
    slicer_standins.QFileDialog.nextPath = ""
    ui.saveResultsButton.click()
    assert slicer_standins.QFileDialog.offered == str(tmp_path / "patient 7" / "3_AX_FLAIR_consensus_2.json")


def test_save_results_opens_in_a_last_folder_that_can_no_longer_be_looked_in(widget, tmp_path, monkeypatch):
    """The folder saved to last (a share) whose permissions changed since: the check for a file of the name to
    offer (fd24855) raised PermissionError, so every Save results said 'Cannot save the results.' and no dialog
    opened to save anywhere else. The dialog opens there again, offering the name; the user may pick another folder."""
    ui, p = widget.ui, widget._parameterNode
    widget.volume.SetName("3: AX FLAIR")
    p.outputSegmentation = mrml.segmentationFromMask(widget.truth, widget.volume, name="auto")
    ui.showStatisticsButton.click()
    share = tmp_path / "share"
    share.mkdir()
    slicer_standins.QFileDialog.nextPath = str(share / "first.csv")
    ui.saveResultsButton.click()
    assert (share / "first.csv").is_file()
    exists = Path.exists

    def refused(path):  # as for a user no longer allowed into the share (root may look anywhere)
        if str(path).startswith(str(share)):
            raise PermissionError(13, "Permission denied", str(path))
        return exists(path)

    monkeypatch.setattr(Path, "exists", refused)
    slicer_standins.QFileDialog.offered, slicer_standins.QFileDialog.nextPath = None, str(tmp_path / "elsewhere.csv")
    ui.saveResultsButton.click()
    assert slicer_standins.QFileDialog.offered == str(share / "3_AX_FLAIR_lesions.csv")
    assert (tmp_path / "elsewhere.csv").is_file()


def test_a_row_shows_its_slice_of_the_volume_measured_whatever_is_chosen_since(widget):
    """The table's rows are slices of the volume the results were computed on; with another volume chosen
    since (to segment it next), a row jumped the views to that slice number of the other volume."""
    ui, p = widget.ui, widget._parameterNode
    p.outputSegmentation = mrml.segmentationFromMask(widget.truth, widget.volume, name="auto")
    ui.showStatisticsButton.click()
    flair, _ = make_volume(origin=(40.0, -60.0, 10.0), seed=4)
    p.inputVolume = mrml.volumeFromImage(flair, "another patient")
    ui.sliceTable.selectRow(0)
    red = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLSliceNode")
    centre = slicer.util.arrayFromVTKMatrix(red.GetSliceToRAS())[:3, 3]
    np.testing.assert_allclose(centre, mrml.sliceCenterRAS(widget.volume, widget._tableSlices[0]), atol=1e-6)


def test_review_lesions_lists_every_lesion_smallest_first_and_shows_each_on_itself(widget, tmp_path):
    """A radiologist checks a result lesion by lesion, the small marks first (the default model over-calls a small
    load). Review lesions lists every lesion of the output segmentation, smallest first, and a row centres the
    views on a voxel of its lesion: a C-shaped lesion's centroid lies outside it, where nothing would be seen."""
    ui, p = widget.ui, widget._parameterNode
    image = mrml.imageFromVolume(widget.volume)
    array = np.zeros(sitk.GetArrayViewFromImage(image).shape, np.uint8)  # (k, j, i)
    k = array.shape[0] // 2
    array[k, 8:30, 8:12] = 1  # a C open to one side (the grid is 48 x 40 x 10)
    array[k, 8:12, 8:30] = 1
    array[k, 26:30, 8:30] = 1
    array[k + 1, 35:37, 40:42] = 1  # and a speck
    mask = sitk.GetImageFromArray(array)
    mask.CopyInformation(image)
    p.outputSegmentation = mrml.segmentationFromMask(mask, widget.volume, name="auto")
    assert ui.listLesionsButton.enabled
    ui.listLesionsButton.click()
    assert ui.sliceTable.headers == ["Lesion", "Volume (ml)", "Slices"]
    sizes = [float(row[1].text) for row in ui.sliceTable.rows]
    assert sizes == sorted(sizes) and len(sizes) == 2  # smallest first
    assert [row[2].text for row in ui.sliceTable.rows] == [str(k + 1), str(k)]
    assert ui.sliceTableCollapsibleButton.text == "Lesions (2, smallest first)"
    assert "2 lesions" in ui.resultsLabel.text
    ui.sliceTable.selectRow(1)  # the C
    red = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLSliceNode")
    shown = slicer.util.arrayFromVTKMatrix(red.GetSliceToRAS())[:3, 3]
    i, j, kk = np.round(np.linalg.inv(mrml.worldIJKToRAS(widget.volume)) @ np.append(shown, 1.0))[:3].astype(int)
    assert array[kk, j, i] == 1  # on the lesion itself
    slicer_standins.QFileDialog.nextPath = str(tmp_path / "lesions.csv")
    ui.saveResultsButton.click()
    rows = list(csv.DictReader(open(tmp_path / "lesions.csv", encoding="utf-8-sig")))
    assert [float(r["volume_ml"]) for r in rows] == sorted(float(r["volume_ml"]) for r in rows)
    assert [r["slice_range"] for r in rows] == [f"{k + 1}-{k + 1}", f"{k}-{k}"]  # as deepwml change writes them
    # a list beginning with a minus is text to a spreadsheet ('-6.91 ..., not #NAME?), read back without the apostrophe
    assert rows[1]["point_mm"].startswith("'-")
    point = [float(v) for v in io.plain_cell(rows[1]["point_mm"]).split()]  # LPS, as the reports: the row's place
    np.testing.assert_allclose((-point[0], -point[1], point[2]), shown, atol=0.01)
    assert len(rows[1]["centroid_mm"].split()) == 3
    slicer_standins.QFileDialog.nextPath = ""
    ui.saveResultsButton.click()
    assert slicer_standins.QFileDialog.offered.endswith("FLAIR_lesion_table.csv")
    ui.showStatisticsButton.click()  # back to the slices
    assert ui.sliceTableCollapsibleButton.text == "Per-slice results" and ui.sliceTable.headers[0] == "Slice"


def changePair(widget, monkeypatch) -> None:
    """The phantom pair of test_change.py as the panel's follow-up (input volume and output segmentation) and earlier
    scan, each registration of its scans run once per test worker (conftest.memoize_alignments)."""
    from conftest import memoize_alignments
    from test_change import change_pair_images

    memoize_alignments(monkeypatch)
    (base_flair, base_mask), (follow_flair, follow_mask) = change_pair_images()
    ui, p = widget.ui, widget._parameterNode
    baseline = mrml.volumeFromImage(base_flair, "earlier FLAIR")
    p.inputVolume = mrml.volumeFromImage(follow_flair, "follow-up FLAIR")
    p.outputSegmentation = mrml.segmentationFromMask(follow_mask, p.inputVolume, name="follow-up WMH")
    assert not ui.changeButton.enabled
    p.baselineVolume = baseline
    p.baselineSegmentation = mrml.segmentationFromMask(base_mask, baseline, name="earlier WMH")
    assert ui.changeButton.enabled


def test_lesion_change_from_the_gui(widget, tmp_path, monkeypatch):
    changePair(widget, monkeypatch)
    ui = widget.ui
    ui.changeButton.click()  # returns while the scans are registered
    assert widget._job.kind == "change" and ui.statusLabel.text.startswith(
        "Lesion change of 'follow-up FLAIR' since 'earlier FLAIR': registering the earlier scan to the follow-up")
    finishJob(widget)
    assert ui.progressBar.value == 100 and ui.statusLabel.text == (
        "Lesion change of 'follow-up FLAIR' since 'earlier FLAIR': 'follow-up FLAIR change' and 'earlier FLAIR "
        "(registered to follow-up FLAIR)' are in the scene.")
    assert "new: 1 lesion" in ui.changeLabel.text and "gone: 1 lesion" in ui.changeLabel.text
    assert ui.sliceTable.headers[:2] == ["Slice", "Change"] and ui.saveResultsButton.enabled
    assert slicer.util.getFirstNodeByName("follow-up FLAIR change") is not None
    slicer_standins.QFileDialog.nextPath = str(tmp_path / "change.csv")
    ui.saveResultsButton.click()
    rows = list(csv.DictReader(open(tmp_path / "change.csv", encoding="utf-8-sig")))
    assert sorted(r["status"] for r in rows) == ["enlarging", "gone", "new", "not assessable", "stable"]
    slicer_standins.QFileDialog.nextPath = str(tmp_path / "change.json")  # names the scans and segmentations
    ui.saveResultsButton.click()
    saved = json.loads((tmp_path / "change.json").read_text(encoding="utf-8"))["change"]
    assert [saved[key] for key in ("baseline", "baseline_segmentation", "followup", "followup_segmentation")] == \
        ["earlier FLAIR", "earlier WMH", "follow-up FLAIR", "follow-up WMH"]


def startedChange(widget, monkeypatch) -> tuple:
    """Compare with earlier scan clicked on the phantom pair (changePair), its lesion_change held after its first
    registration's report (gatedChange): (the gate, the threads it ran in, the registrations, the job)."""
    changePair(widget, monkeypatch)
    started, gate, threads, registrations = gatedChange(monkeypatch)
    widget.ui.changeButton.click()
    assert started.wait(10)
    return gate, threads, registrations, widget._job


def test_the_lesion_change_runs_as_a_job_with_progress_refusal_and_cancel(widget, monkeypatch):
    """Lesion change ran both registrations (about a minute on a clinical pair on 2 cores) on the main thread under a
    wait cursor: the panel frozen without a word, no Cancel. It runs as the split's networks run now: the progress
    bar and the status line follow the registrations, Segment WMH turns into Cancel, a second click is refused saying
    why; Cancel stops waiting at once and keeps nothing, also once the registration running then has ended; let run,
    the nodes are made."""
    gate, threads, registrations, job = startedChange(widget, monkeypatch)
    ui = widget.ui
    assert job is not None and widget._timer.active and ui.applyButton.text == "Cancel" and ui.applyButton.enabled
    assert not ui.inputVolumeSelector.enabled
    widget._timer.fire()
    assert ui.progressBar.value == 45 and ui.statusLabel.text == (
        "Lesion change of 'follow-up FLAIR' since 'earlier FLAIR': registered the baseline to the follow-up in 30 s; "
        "now the other way round, to check it ...")
    with pytest.raises(DeepWMLError, match="the lesion change is being computed already"):
        ui.changeButton.click()
    assert widget._job is job and len(threads) == 1
    ui.applyButton.click()  # Cancel: not waited for
    assert widget._job is None and not widget._timer.active and ui.progressBar.value == 0
    assert ui.statusLabel.text.startswith("Cancelled: nothing of the lesion change is kept. The registration running "
                                          "now cannot be interrupted")
    assert ui.applyButton.text == "Segment WMH"
    gate.set()
    assert job.wait(30) and job.cancelled and len(registrations) == 1  # stopped once that registration ended
    assert slicer.util.getFirstNodeByName("follow-up FLAIR change") is None and not ui.changeLabel.text
    assert not widget._results

    ui.changeButton.click()  # the gate open: runs through
    finishJob(widget)
    assert ui.progressBar.value == 100 and "new: 1 lesion" in ui.changeLabel.text
    assert slicer.util.getFirstNodeByName("follow-up FLAIR change") is not None


def test_a_dropped_lesion_change_job_lets_go_of_its_nodes_on_the_main_thread(widget, monkeypatch):
    """Cancel (or closing the scene) stops polling a change job whose registration goes on: the job was then released
    wherever its last reference went (the worker thread's end, or the cyclic garbage collector in any thread), still
    holding the four nodes, so that a node removed from the scene meanwhile could be destroyed off the main thread
    (MRML events, VTK's event broker). Dropped, the job holds no node: they are let go of at the click."""
    gate, _, _, job = startedChange(widget, monkeypatch)
    ui = widget.ui
    ui.applyButton.click()  # Cancel
    assert widget._job is None
    held = [name for name, value in vars(job).items() if isinstance(value, slicer.vtkMRMLNode)
            or (isinstance(value, tuple) and any(isinstance(v, slicer.vtkMRMLNode) for v in value))]
    assert held == []
    gate.set()
    assert job.wait(30) and job.cancelled


def test_a_lesion_change_whose_segmentation_was_deleted_meanwhile_keeps_nothing_and_says_so(widget, monkeypatch):
    """A scan or segmentation deleted or edited while the registrations ran: nothing is made or shown, the status
    line says which and why; closing the scene stops waiting for the job."""
    gate = startedChange(widget, monkeypatch)[0]
    ui, p = widget.ui, widget._parameterNode
    slicer.mrmlScene.RemoveNode(p.baselineSegmentation)
    gate.set()
    finishJob(widget)
    assert ui.statusLabel.text == ("No lesion change kept: 'earlier WMH' was removed from the scene while the scans "
                                   "were being registered. Compare again.")
    assert ui.progressBar.value == 0 and not widget._results and not ui.changeLabel.text
    assert slicer.util.getFirstNodeByName("follow-up FLAIR change") is None
    p.baselineSegmentation = mrml.segmentationFromMask(widget.truth, widget.volume, name="drawn meanwhile")
    gate.clear()
    ui.changeButton.click()
    job = widget._job
    slicer.mrmlScene.InvokeEvent(slicer.mrmlScene.StartCloseEvent)
    assert widget._job is None and not widget._timer.active
    gate.set()
    assert job.wait(30) and job.cancelled


def segmentationHeld(widget, module, monkeypatch, tiny_model):
    """Segment WMH clicked with the tiny model, its run held once it has started (blockingSegmentation): its job."""
    started = blockingSegmentation(monkeypatch)
    p = widget._parameterNode
    p.modelName, p.modelFile, p.device = module.MODEL_FILE_CHOICE, tiny_model, "cpu"
    widget.ui.applyButton.click()
    assert started.wait(10)
    return widget._job


def test_the_lesion_change_waits_for_a_segmentation_running(widget, module, monkeypatch, tiny_model):
    """One job at a time (the panel has one progress bar, one Cancel): while Segment WMH runs, Lesion change is
    refused, saying why."""
    job = segmentationHeld(widget, module, monkeypatch, tiny_model)
    ui = widget.ui
    changePair(widget, monkeypatch)
    with pytest.raises(DeepWMLError, match="the lesion change registers the scans, which waits for the run going on"):
        ui.changeButton.click()
    assert widget._job is job
    ui.applyButton.click()
    finishJob(widget)


def test_a_cancelled_comparison_still_registering_holds_back_every_other_job(widget, module, monkeypatch, tiny_model):
    """Cancel of a lesion change stops waiting at once, but the registration running then cannot be interrupted and
    goes on in the background (tens of seconds): a second comparison was refused meanwhile, yet Segment WMH, or
    statistics running the split's networks, started beside it, two heavy jobs sharing the CPU without a word. Every
    job is refused now, saying why, until it has ended; then they run."""
    gate, _, registrations, change = startedChange(widget, monkeypatch)
    ui, p = widget.ui, widget._parameterNode
    ui.applyButton.click()  # Cancel: its registration goes on
    assert widget._job is None and not change.done
    assert ui.statusLabel.text.endswith("its result is dropped; no other job starts until it has.")
    started = blockingSegmentation(monkeypatch)
    p.modelName, p.modelFile, p.device = module.MODEL_FILE_CHOICE, tiny_model, "cpu"
    ending = "the comparison cancelled just now is still ending its registration \\(it cannot be interrupted"
    with pytest.raises(DeepWMLError, match=f"{ending}.*: segment once it has$"):
        ui.applyButton.click()
    assert widget._job is None and not started.is_set() and ui.applyButton.text == "Segment WMH"
    networksStarted, _, runs = blockingNetworks(monkeypatch)
    p.ventricleSplit = True  # the follow-up's WMH holds no ventricles: the statistics would run the networks
    with pytest.raises(DeepWMLError, match=f"{ending}.*: show the statistics once it has, or untick the split$"):
        ui.showStatisticsButton.click()
    assert widget._job is None and runs == []
    with pytest.raises(DeepWMLError, match=f"{ending}.*: compare again once it has$"):
        ui.changeButton.click()
    assert widget._job is None
    p.ventricleSplit = False
    ui.showStatisticsButton.click()  # no networks: shown at once
    assert "Total lesion volume" in ui.resultsLabel.text and widget._job is None

    gate.set()
    assert change.wait(30) and change.cancelled and len(registrations) == 1
    p.outputSegmentation = None  # a new one: nothing drawn by hand replaced
    ui.applyButton.click()  # it has ended: Segment WMH runs
    assert started.wait(10) and widget._job.kind == "segmentation"
    ui.applyButton.click()
    finishJob(widget)
    assert ui.statusLabel.text == "Cancelled."


def test_a_cancelled_segmentation_still_ending_says_so_when_another_job_is_asked_for(widget, module, monkeypatch,
                                                                                     tiny_model):
    """The converse: a segmentation in a thread goes on after Cancel to its next look (its post-processing and report:
    seconds). The panel waits for it, so a comparison or the split's networks were refused, but with the words for a
    run going on ("... once it is done (or cancel it)"), as if Cancel had not been heard. They say it is ending now."""
    ui, gate = startHeldRun(widget, module, monkeypatch, tiny_model)
    ui.applyButton.click()  # Cancel: the run's last steps go on
    job = widget._job
    ending = "the segmentation cancelled just now is still ending"
    changePair(widget, monkeypatch)
    with pytest.raises(DeepWMLError, match=f"{ending}.*: compare again once it has$"):
        ui.changeButton.click()
    p = widget._parameterNode
    p.ventricleSplit = True
    with pytest.raises(DeepWMLError, match=f"{ending}.*: show the statistics once it has, or untick the split$"):
        ui.showStatisticsButton.click()
    assert widget._job is job and ui.applyButton.text == "Cancel"
    gate.set()
    finishJob(widget)
    assert ui.statusLabel.text == "Cancelled." and slicer.mrmlScene.GetNumberOfNodesByClass(
        "vtkMRMLSegmentationNode") == 2  # the pair's two, nothing of the run


def test_a_cancelled_split_still_ending_says_so_in_words_that_agree(widget, monkeypatch):
    """A cancelled split's networks go on to their next look, the panel waiting for them; a comparison asked for
    meanwhile was refused in words that did not agree ("the ... networks ... are still ending (...): compare again once
    it has"). The split is what is ending now."""
    import DeepWMLLib.inference as inference
    from DeepWMLLib.errors import Cancelled

    started, gate = threading.Event(), threading.Event()

    def networks(*args, progress=None, cancel=None, **kwargs):  # deaf to cancel until the gate opens: its next look
        progress(0.25, "ventricles: slice 3/12")
        started.set()
        assert gate.wait(10), "never let go"
        raise Cancelled()

    changePair(widget, monkeypatch)
    monkeypatch.setattr(inference, "predict_maps", networks)
    ui, p = widget.ui, widget._parameterNode
    p.device, p.ventricleSplit = "cpu", True  # the follow-up's WMH holds no ventricles: the networks run
    ui.showStatisticsButton.click()
    assert started.wait(10) and widget._job.kind == "split"
    ui.applyButton.click()  # Cancel: the panel waits for the networks' next look
    job = widget._job
    assert job.cancelled and not job.done
    with pytest.raises(DeepWMLError, match="^the periventricular/deep split cancelled just now is still ending \\(its "
                                           "networks stop at their next slice: seconds\\): compare again once it has$"):
        ui.changeButton.click()
    assert widget._job is job
    gate.set()
    finishJob(widget)
    assert job.cancelled


def test_the_widget_cleaned_up_during_a_worker_process_kills_it(widget, module, tiny_model):
    """Clean-up drops any job now (BackgroundJob.drop): a segmentation in a worker process is still ended at once
    (ProcessSegmentationJob.cancel), not left running after Slicer has closed, and it is done, so that it holds back
    no later job."""
    ui, p = widget.ui, widget._parameterNode
    widget.logic.workerPython = sys.executable
    p.modelName, p.modelFile, p.device = module.MODEL_FILE_CHOICE, tiny_model, "cpu"
    ui.applyButton.click()
    job = widget._job
    assert job.python == sys.executable and job._process.poll() is None  # starting: its imports take longer
    widget.cleanup()
    assert job._process.poll() is not None and job._process.returncode != 0  # killed, not finished
    assert job.done and job.cancelled and job.volumeNode is None and job.outputNode is None
    widget.logic.refuseWhileEnding("segment")  # nothing holds back a new run


@pytest.mark.parametrize("kind", ["segmentation", "split"])
def test_the_widget_cleaned_up_during_a_job_lets_go_of_its_nodes(widget, module, monkeypatch, tiny_model, kind):
    """Cleaned up (Slicer closing, the module reloaded) while a segmentation or the split's networks ran in a thread,
    the widget cancelled the job and polled it no more: its thread went on to its next look holding the volume, the
    output segmentation and the statistics' call-back (the widget itself), released at the thread's end, off the main
    thread (a node removed from the scene meanwhile destroyed there), as a dropped change job was. Dropped now."""
    if kind == "segmentation":
        job = segmentationHeld(widget, module, monkeypatch, tiny_model)
    else:
        p = widget._parameterNode
        p.outputSegmentation = mrml.segmentationFromMask(widget.truth, widget.volume, name="manual")
        p.device, p.ventricleSplit = "cpu", True
        started, _, _ = blockingNetworks(monkeypatch)
        widget.ui.showStatisticsButton.click()
        assert started.wait(10)
        job = widget._job
    assert job.kind == kind
    widget.cleanup()
    assert job.cancelled and not widget._timer.active
    held = [name for name, value in vars(job).items() if isinstance(value, slicer.vtkMRMLNode) or callable(value)
            and name == "again" or (isinstance(value, tuple) and any(isinstance(v, slicer.vtkMRMLNode) for v in value))]
    assert held == []
    assert job.wait(10)


def test_another_volume_gets_its_own_segmentation_and_no_ones_ventricles(widget, module, monkeypatch, tiny_model,
                                                                         tmp_path):
    """The output selector still holds volume A's result when B is chosen: B's run must not overwrite A's
    result, carry A's name, or measure its periventricular split from A's ventricles."""
    from conftest import tiny_model_file

    oracle_network(monkeypatch)
    ui, p = widget.ui, widget._parameterNode
    ventricles = tiny_model_file(tmp_path / "vent.pt", labels={"0": "background", "1": "lateral_ventricles"})
    monkeypatch.setattr(widget.logic, "ventricleModelPath", lambda: str(ventricles))
    p.modelName, p.modelFile, p.device, p.ventricleSplit = module.MODEL_FILE_CHOICE, tiny_model, "cpu", True
    ui.applyButton.click()
    finishJob(widget)
    first = p.outputSegmentation
    before = widget.logic.lesionStatistics(first, widget.volume)["volume_ml"]

    flair, _ = make_volume(blobs=((0.7, 0.3, 0.5, 8.0),), seed=3)
    other = mrml.volumeFromImage(flair, "B")
    p.inputVolume, p.ventricleSplit = other, False
    ui.applyButton.click()
    finishJob(widget)
    second = p.outputSegmentation
    assert second is not first and second.GetName() == "B WMH"
    assert not second.GetSegmentation().GetSegmentIdBySegmentName(mrml.VENTRICLE_SEGMENT_NAME)
    assert "periventricular" not in ui.resultsLabel.text.lower()
    assert first.GetName() == "FLAIR WMH"
    assert widget.logic.lesionStatistics(first, widget.volume)["volume_ml"] == before  # A's result kept
    ui.applyButton.click()  # B again: its own result is rewritten in place
    finishJob(widget)
    assert p.outputSegmentation is second


def test_segment_wmh_asks_before_replacing_a_wmh_segment_edited_by_hand(widget, module, monkeypatch, tiny_model):
    """Segment WMH again (to try TTA or another threshold) after correcting the result by hand replaced the
    corrected WMH segment without a word, and Slicer's undo does not bring it back."""
    oracle_network(monkeypatch)
    ui, p = widget.ui, widget._parameterNode
    p.modelName, p.modelFile, p.device = module.MODEL_FILE_CHOICE, tiny_model, "cpu"
    asked = []
    answers = iter([False, True, False, False])
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda text, *a, **k: asked.append(text) or next(answers))
    ui.applyButton.click()
    finishJob(widget)
    result = p.outputSegmentation
    ui.applyButton.click()  # as DeepWML made it: replaced without asking
    finishJob(widget)
    assert asked == [] and p.outputSegmentation is result

    corrected = sitk.BinaryDilate(mrml.maskFromSegmentation(result, widget.volume), [2, 2, 0])
    mrml.segmentationFromMask(corrected, widget.volume, result)  # the radiologist's correction
    ui.applyButton.click()
    assert asked[-1].startswith("The segment WMH of 'FLAIR WMH' was edited, or moved against its volume, since DeepWML made it")
    assert widget._job is None and ui.applyButton.text == "Segment WMH"  # cancelled: nothing runs
    np.testing.assert_array_equal(sitk.GetArrayFromImage(mrml.maskFromSegmentation(result, widget.volume)),
                                  sitk.GetArrayFromImage(corrected))
    ui.applyButton.click()  # replace it after all
    finishJob(widget)
    assert len(asked) == 2 and p.outputSegmentation is result
    assert sitk.GetArrayFromImage(mrml.maskFromSegmentation(result, widget.volume)).sum() < \
        sitk.GetArrayFromImage(corrected).sum()

    p.outputSegmentation = mrml.segmentationFromMask(widget.truth, widget.volume, name="manual")  # not DeepWML's
    ui.applyButton.click()
    assert "of 'manual' was not made by this version of DeepWML" in asked[-1] and widget._job is None

    p.outputSegmentation = result  # ventricles drawn by hand, which a run with the split would replace
    mrml.segmentationFromMask(widget.truth, widget.volume, result, segmentName=mrml.VENTRICLE_SEGMENT_NAME)
    ui.applyButton.click()  # without the split: kept, nothing asked
    finishJob(widget)
    assert len(asked) == 3
    monkeypatch.setattr(widget.logic, "ventricleModelPath", lambda: str(tiny_model))
    p.ventricleSplit = True
    ui.applyButton.click()
    assert asked[-1].startswith("The segment Lateral ventricles of 'FLAIR WMH' was not made by this version")
    assert widget._job is None


def test_without_a_main_window_a_rerun_over_hand_edits_is_refused_not_asked(widget, module, monkeypatch,
                                                                            tiny_model):
    """Slicer's confirmOkCancelDisplay opens its question also when Slicer runs without a main window
    (--no-main-window, a script driving the module): Segment WMH over a corrected result waited there for
    ever, with no one to answer."""
    oracle_network(monkeypatch)
    ui, p = widget.ui, widget._parameterNode
    p.modelName, p.modelFile, p.device = module.MODEL_FILE_CHOICE, tiny_model, "cpu"
    ui.applyButton.click()
    finishJob(widget)
    result = p.outputSegmentation
    mrml.segmentationFromMask(widget.truth, widget.volume, result)  # corrected by hand
    monkeypatch.setattr(slicer.util, "mainWindow", lambda: None)
    monkeypatch.setattr(slicer.app, "testingEnabled", lambda: False, raising=False)  # Slicer's own dialogs, then
    monkeypatch.setattr(slicer.util, "messageBox", lambda *a, **k: pytest.fail("a dialog without a main window"))
    with pytest.raises(DeepWMLError, match="was edited, or moved against its volume, since DeepWML made it; Segment WMH would replace it: to "
                                           "keep it, choose 'Create new segmentation'"):
        ui.applyButton.click()
    assert widget._job is None and ui.applyButton.text == "Segment WMH"
    np.testing.assert_array_equal(sitk.GetArrayFromImage(mrml.maskFromSegmentation(result, widget.volume)),
                                  sitk.GetArrayFromImage(widget.truth))


def resultCorrectedByHand(widget, module, monkeypatch, tiny_model):
    """A finished Segment WMH whose WMH segment was then redrawn by hand (the true mask): (ui, parameters)."""
    oracle_network(monkeypatch)
    ui, p = widget.ui, widget._parameterNode
    p.modelName, p.modelFile, p.device = module.MODEL_FILE_CHOICE, tiny_model, "cpu"
    ui.applyButton.click()
    finishJob(widget)
    mrml.segmentationFromMask(widget.truth, widget.volume, p.outputSegmentation)  # corrected by hand
    return ui, p


def test_a_run_that_cannot_start_is_refused_before_asking_about_hand_edits(widget, module, monkeypatch,
                                                                           tiny_model):
    """With the model file not chosen (or no ventricle model for the split), Segment WMH over a corrected
    result first asked whether to replace the corrections, and after OK said that it cannot start."""
    ui, p = resultCorrectedByHand(widget, module, monkeypatch, tiny_model)
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda *a, **k: pytest.fail("asked"))
    p.modelFile = ""
    with pytest.raises(DeepWMLError, match="choose a DeepWML model file"):
        ui.applyButton.click()
    p.modelFile, p.ventricleSplit = tiny_model, True
    monkeypatch.setattr(widget.logic, "ventricleModelPath", lambda: None)
    with pytest.raises(DeepWMLError, match="needs a lateral-ventricle model"):
        ui.applyButton.click()
    assert widget._job is None


def test_the_check_for_hand_edits_shows_the_wait_cursor_and_the_question_does_not(widget, module, monkeypatch,
                                                                                  tiny_model):
    """Comparing the WMH and ventricle segments with what DeepWML wrote takes seconds on a large scan (a
    segment of 512 x 512 x 200 voxels: 0.5 s, 2.6 s with both cores busy): it ran with the ordinary cursor,
    and Segment WMH seemed not to react."""
    ui, p = resultCorrectedByHand(widget, module, monkeypatch, tiny_model)
    cursor, seen = [], {}
    monkeypatch.setattr(slicer.app, "setOverrideCursor", lambda shape: cursor.append(shape), raising=False)
    monkeypatch.setattr(slicer.app, "restoreOverrideCursor", lambda: cursor.pop(), raising=False)
    rerunLoses = widget.logic.rerunLoses

    def check(*args):
        seen["check"] = len(cursor)  # wait cursors on
        return rerunLoses(*args)

    def question(*args, **kwargs):
        seen["question"] = len(cursor)
        return False  # Cancel

    monkeypatch.setattr(widget.logic, "rerunLoses", check)
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", question)
    ui.applyButton.click()
    assert seen == {"check": 1, "question": 0} and cursor == [] and widget._job is None


def test_results_are_those_of_the_volume_segmented_and_selectors_wait(widget, module, monkeypatch, tiny_model):
    oracle_network(monkeypatch)
    ui, p = widget.ui, widget._parameterNode
    p.modelName, p.modelFile, p.device = module.MODEL_FILE_CHOICE, tiny_model, "cpu"
    flair, _ = make_volume(blobs=(), seed=5)
    other = mrml.volumeFromImage(flair, "B (no lesion)")
    ui.applyButton.click()
    assert not ui.inputVolumeSelector.enabled and not ui.outputSegmentationSelector.enabled
    p.inputVolume = other  # e.g. from a script while the run goes on
    finishJob(widget)
    assert ui.inputVolumeSelector.enabled and ui.outputSegmentationSelector.enabled
    assert p.inputVolume is widget.volume and p.outputSegmentation.GetName() == "FLAIR WMH"
    expected = widget.logic.lesionStatistics(p.outputSegmentation, widget.volume)
    assert expected["lesion_count"] == 1
    assert ui.resultsLabel.text == widget.logic.formatReport(expected)


def test_a_rerun_clears_an_older_dice_and_closing_the_scene_clears_everything(widget, module, monkeypatch,
                                                                              tiny_model):
    oracle_network(monkeypatch)
    ui, p = widget.ui, widget._parameterNode
    p.modelName, p.modelFile, p.device = module.MODEL_FILE_CHOICE, tiny_model, "cpu"
    ui.applyButton.click()
    finishJob(widget)
    p.referenceSegmentation = mrml.segmentationFromMask(widget.truth, widget.volume, name="manual")
    ui.compareButton.click()
    assert ui.comparisonLabel.text.startswith("Dice")
    p.useModelThreshold, p.threshold = False, 0.99
    ui.applyButton.click()
    finishJob(widget)
    assert ui.comparisonLabel.text == "" and "Total lesion volume" in ui.resultsLabel.text

    slicer.mrmlScene.InvokeEvent(slicer.mrmlScene.StartCloseEvent)
    assert ui.resultsLabel.text == "" and ui.sliceTable.rows == [] and widget._results == {}
    assert ui.statusLabel.text == "" and ui.progressBar.value == 0


def test_a_failed_run_says_so_in_the_status_line(widget, module, monkeypatch, tiny_model):
    import DeepWMLLib.segment

    def fails(image, models=None, progress=None, **kwargs):
        progress(0.4, "segmenting: slice 4/10")
        raise DeepWMLError("out of memory")

    monkeypatch.setattr(DeepWMLLib.segment, "segment_image", fails)
    ui, p = widget.ui, widget._parameterNode
    p.modelName, p.modelFile, p.device = module.MODEL_FILE_CHOICE, tiny_model, "cpu"
    ui.applyButton.click()
    with pytest.raises(DeepWMLError, match="out of memory"):
        finishJob(widget)
    assert ui.statusLabel.text == "Failed: out of memory" and ui.progressBar.value == 0
    assert ui.applyButton.text == "Segment WMH"


def loadOlderScene(p, **parameters) -> None:
    """What loading a scene saved by an older version does to the module's (singleton) parameter node: its
    parameters, as that version wrote them, arrive at once."""
    node = p.parameterNode
    wasModifying = node.StartModify()
    for name, value in parameters.items():
        node.SetParameter(name, value)
    node.EndModify(wasModifying)


def test_a_scene_saved_with_the_all_models_ensemble_ticked_says_it_is_gone(widget, monkeypatch):
    """An older version's scene with 'Ensemble of all shipped models' ticked (its parameter 'ensemble') ran, in this
    version, the single model its greyed-out selector had shown, and nothing said so: the user took it for the
    average they had saved. Now the status line says that average is gone and which ensembles are measured, the
    run is the model selected, and the old parameter is not kept (nor said again)."""
    ui, p = widget.ui, widget._parameterNode
    loadOlderScene(p, ensemble="True", modelName="unet16-synth-v1")
    assert ui.statusLabel.text == (
        "The scene was saved with 'Ensemble of all shipped models' ticked, which this version does not have (an "
        "average of every shipped model, never measured): Segment WMH runs the model selected; the ensembles the "
        "model card measured are in the list (ensemble-v8, ensemble-v7).")
    assert p.modelName == "unet16-synth-v1" and ui.modelComboBox.items[ui.modelComboBox.currentIndex] == "unet16-synth-v1"
    assert "ensemble" not in p.parameterNode.GetParameterNames()
    ui.statusLabel.text = ""
    p.tta = True  # any later update
    assert ui.statusLabel.text == ""
    loadOlderScene(p, ensemble="False")  # unticked: nothing to say, nothing kept
    assert ui.statusLabel.text == "" and "ensemble" not in p.parameterNode.GetParameterNames()
    # ticked, with a model this version does not ship: both are said
    loadOlderScene(p, ensemble="True", modelName="a model of an older version")
    assert "'Ensemble of all shipped models' ticked" in ui.statusLabel.text
    assert "The model 'a model of an older version' saved with the scene is not shipped" in ui.statusLabel.text
    assert p.modelName == ui.modelComboBox.items[0]


def test_a_scene_saved_with_an_older_default_ensemble_selects_its_named_ensemble(widget):
    """A scene saved while v8 (or v7) was the default holds the selector's 'default ensemble (...)' of its four
    members; this version said that model was not shipped and ran v9, though it names that very ensemble
    ensemble-v8 (ensemble-v7). It selects the named ensemble, and says so; an older default that no ensemble
    matches (v6's three members) still falls back to the default, said."""
    ui, p = widget.ui, widget._parameterNode
    for name, members in (("ensemble-v8", "unet16-adabn-v5 + unet16-adabn-o + unet16-adabn-p + unet16-adabn-t"),
                          ("ensemble-v7", "unet16-synth-v5 + unet16-realbg-o + unet16-realbg-p + unet16-realbg-t")):
        loadOlderScene(p, modelName=f"default ensemble ({members})")
        assert p.modelName == name and ui.modelComboBox.items[ui.modelComboBox.currentIndex] == name
        assert ui.statusLabel.text == (f"The scene's model, 'default ensemble ({members})' (an older version's "
                                       f"default), is '{name}' now; it is selected.")
    loadOlderScene(p, modelName="default ensemble (unet16-synth-v5 + unet16-realbg-o + unet16-realbg-p)")
    assert p.modelName == ui.modelComboBox.items[0] and "is not shipped with this version" in ui.statusLabel.text


def test_a_saved_model_no_longer_shipped_falls_back_to_the_default_shown(widget):
    ui, p = widget.ui, widget._parameterNode
    p.modelName = "a model of an older version"
    assert p.modelName == ui.modelComboBox.items[0] and ui.modelComboBox.currentIndex == 0
    assert "not shipped with this version" in ui.statusLabel.text


def test_a_frame_browsed_away_from_during_the_run_is_shown_again_with_its_result_and_said(widget, module, monkeypatch,
                                                                                           tiny_model):
    """A frame of a 4D series segmented from the panel while the user browses on to another frame: the result is
    the frame segmented's, named after it, the browser is put back on it and the status line says so."""
    oracle_network(monkeypatch)
    first, truth = make_volume(direction=rotation(0.15, 0.0, -0.3), spacing=(0.9, 0.9, 5.0), blobs=((0.3, 0.6, 0.5, 6.0),))
    second, _ = make_volume(direction=rotation(0.15, 0.0, -0.3), spacing=(0.9, 0.9, 5.0), blobs=((0.7, 0.3, 0.5, 6.0),))
    browser, proxy, sequences = seriesOfFrames(slicer.mrmlScene, [first, second])
    started, gate = lateSegmentation(monkeypatch)
    ui, p = widget.ui, widget._parameterNode
    p.inputVolume = proxy
    p.modelName, p.modelFile, p.device, p.brainMask = module.MODEL_FILE_CHOICE, tiny_model, "cpu", False
    ui.applyButton.click()
    assert started.wait(10)
    browser.SetSelectedItemNumber(1)
    gate.set()
    finishJob(widget)
    assert browser.GetSelectedItemNumber() == 0
    assert p.outputSegmentation.GetName() == "FLAIR series WMH (time = 0.00 s)"
    assert ui.statusLabel.text.endswith("The sequence browser 'FLAIR series browser' was moved to time = 10.00 s while "
                                        "'FLAIR series' was being segmented: the result is of time = 0.00 s, the frame "
                                        "segmented, which is shown again")
    assert "Frame time = 0.00 s of the sequence 'FLAIR series'" in ui.resultsLabel.text
    report = widget.logic.lesionStatistics(p.outputSegmentation, proxy)
    assert report["frame"]["label"] == "time = 0.00 s" and report["lesion_count"] == 1
    del sequences


def test_the_readme_python_console_example_runs_as_written(module, monkeypatch):
    """README's 'From the Python console' block, run as it stands (the network is 'bright means lesion', as the
    calls and what they return are checked here, not the weights): every call exists with the arguments written
    there and gives what its comment says."""
    import re

    from conftest import REPO

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    block = re.search(r"```python\n(import DeepWML\n.*?)```", readme, re.S)
    assert block, "README's Python console block was not found"
    oracle_network(monkeypatch)
    flair, truth = make_volume(size=(48, 40, 10), blobs=((0.3, 0.6, 0.5, 6.0), (0.7, 0.4, 0.5, 4.0)))
    before, earlierTruth = make_volume(size=(48, 40, 10), blobs=((0.3, 0.6, 0.5, 6.0),), seed=1)
    volume = mrml.volumeFromImage(flair, "FLAIR")
    mrml.segmentationFromMask(truth, volume, name="manual")
    mrml.segmentationFromMask(truth, volume, name="rater A")
    mrml.segmentationFromMask(sitk.BinaryDilate(truth, [1, 1, 0]), volume, name="rater B")
    earlier = mrml.volumeFromImage(before, "earlier")
    names = {"slicer": slicer,  # the console has slicer imported
             "earlier": earlier, "earlierSegmentation": mrml.segmentationFromMask(earlierTruth, earlier, name="earlier")}
    exec(block.group(1), names)  # noqa: S102 (README's own code)

    assert names["segmentation"].IsA("vtkMRMLSegmentationNode")
    assert {"volume_ml", "lesion_count", "slices", "lesions"} <= set(names["report"])
    assert {"dice", "sensitivity"} <= set(names["metrics"])
    assert "dice" in names["verdict"]
    assert names["changeNode"].IsA("vtkMRMLSegmentationNode") and names["registered"].IsA("vtkMRMLScalarVolumeNode")
    assert {"n_new", "lesions"} <= set(names["change"])


def test_save_results_also_writes_the_dicom_seg_when_ticked(widget, tmp_path, monkeypatch):
    """'Also write a DICOM SEG' ticked: Save results writes, beside the results, the output segmentation as the DICOM
    SEG of the FLAIR's study (<FLAIR>_wmh_seg.dcm), for a FLAIR from Slicer's DICOM database; for a volume that is not
    from DICOM the results are saved and the SEG refused with the logic's message, no file."""
    from conftest import write_dicom_series

    ui, p = widget.ui, widget._parameterNode
    flair, truth = make_volume(size=(40, 36, 6), spacing=(0.9, 0.9, 5.0), dtype=sitk.sitkInt16)
    folder = write_dicom_series(tmp_path / "database", flair, uid="1.2.3.8", description="AX FLAIR", number=3,
                                extra={"0020|0052": "1.2.3.99"})
    monkeypatch.setattr(slicer, "dicomDatabase", slicer_standins.DicomDatabase(folder), raising=False)
    series = io.dicom_series(folder)[0]
    image = io.read_image(folder, series=series)
    volume = mrml.volumeFromImage(image, "3: AX FLAIR")
    volume.SetAttribute("DICOM.instanceUIDs", " ".join(series.instance_uids))
    p.inputVolume = volume
    p.outputSegmentation = mrml.segmentationFromMask(truth, volume, name="auto")
    ui.showStatisticsButton.click()
    out = tmp_path / "out"
    out.mkdir()
    slicer_standins.QFileDialog.nextPath = str(out / "lesions.csv")
    ui.saveResultsButton.click()
    assert (out / "lesions.csv").is_file() and not (out / "3_AX_FLAIR_wmh_seg.dcm").exists()  # not ticked: no SEG
    p.dicomSeg = True
    ui.saveResultsButton.click()
    seg = io.read_mask(out / "3_AX_FLAIR_wmh_seg.dcm", reference=image)  # with or without empty frames
    assert sitk.GetArrayFromImage(truth).any()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(seg), sitk.GetArrayFromImage(truth))
    assert ui.statusLabel.text.endswith("3_AX_FLAIR_wmh_seg.dcm")

    p.inputVolume = widget.volume  # made in the scene: no DICOM behind it
    p.outputSegmentation = mrml.segmentationFromMask(widget.truth, widget.volume, name="plain")
    ui.showStatisticsButton.click()
    slicer_standins.QFileDialog.nextPath = str(out / "plain.csv")
    with pytest.raises(DeepWMLError, match="'FLAIR' was not loaded from DICOM"):
        ui.saveResultsButton.click()
    assert (out / "plain.csv").is_file() and not (out / "FLAIR_wmh_seg.dcm").exists()


def test_statistics_of_a_manual_segmentation_make_the_split_when_it_is_ticked(widget, tmp_path):
    """Show statistics (and so Save results) of a segmentation DeepWML did not compute had no periventricular/deep
    split even with the split ticked; ticked, the ventricle model makes it as `deepwml export` does (on the panel's
    device), and the saved .json holds it; unticked, none (no network runs)."""
    ui, p = widget.ui, widget._parameterNode
    p.outputSegmentation = mrml.segmentationFromMask(widget.truth, widget.volume, name="manual")
    p.device = "cpu"
    ui.showStatisticsButton.click()
    assert "periventricular" not in ui.resultsLabel.text.lower()
    p.ventricleSplit = True
    ui.showStatisticsButton.click()
    finishJob(widget)  # the networks, as a job
    assert "periventricular" in ui.resultsLabel.text.lower()
    slicer_standins.QFileDialog.nextPath = str(tmp_path / "all.json")
    ui.saveResultsButton.click()
    saved = json.loads((tmp_path / "all.json").read_text(encoding="utf-8"))["report"]
    assert saved["location"]["ventricle_model"] == Path(widget.logic.ventricleModelPath()).name
    assert saved["location"]["ventricles"].startswith("the ventricle network on 'FLAIR'") and saved["device"] == "cpu"


def test_statistics_say_why_they_wait_for_the_split_networks_and_run_them_once_per_volume(widget, monkeypatch):
    """With the split ticked, the statistics of a manual segmentation ran the ventricle and brain networks at every
    click, and Review lesions after Show statistics ran them again on the same volume. The status line says what runs
    while it runs (then shows what it showed), the networks run once for the unchanged volume, and a closed scene's
    are let go."""
    ui, p = widget.ui, widget._parameterNode
    p.outputSegmentation = mrml.segmentationFromMask(widget.truth, widget.volume, name="manual")
    p.device, p.ventricleSplit = "cpu", True
    runs = countNetworkRuns(monkeypatch)
    ui.statusLabel.text = "Done."
    ui.showStatisticsButton.click()
    assert ui.statusLabel.text.startswith("Finding the lateral ventricles on 'FLAIR' for the periventricular/deep split")
    finishJob(widget)
    assert len(runs) == 1 and ui.statusLabel.text == "Done." and madeBySplit(widget)
    shown = ui.resultsLabel.text
    ui.listLesionsButton.click()
    ui.showStatisticsButton.click()
    assert widget._job is None and len(runs) == 1 and ui.resultsLabel.text == shown  # at once: kept
    slicer.mrmlScene.InvokeEvent(slicer.mrmlScene.StartCloseEvent)
    assert widget.logic._locationInputs is None


def madeBySplit(widget) -> bool:
    """The results shown come with the networks' split (the synthetic volume's ventricles are too small to judge it)."""
    location = widget._results["report"]["location"]
    return location is not None and location["ventricles"].startswith("the ventricle network on 'FLAIR'")


def blockingNetworks(monkeypatch) -> tuple[threading.Event, threading.Event, list]:
    """Make the split's networks (inference.predict_maps) report a step, then wait for a gate (running for real once it
    opens) or for cancel. Returns (started, gate, runs)."""
    import DeepWMLLib.inference as inference
    from DeepWMLLib.errors import Cancelled

    started, gate, runs, predict = threading.Event(), threading.Event(), [], inference.predict_maps

    def networks(*args, progress=None, cancel=None, **kwargs):
        assert cancel is not None and progress is not None, "the networks ran with no progress shown and no Cancel"
        runs.append(1)
        progress(0.25, "ventricles: slice 3/12")
        started.set()
        deadline = time.monotonic() + 10
        while not gate.is_set():
            if cancel():
                raise Cancelled()
            assert time.monotonic() < deadline, "neither let go nor cancelled"
            time.sleep(0.005)
        return predict(*args, progress=progress, cancel=cancel, **kwargs)

    monkeypatch.setattr(inference, "predict_maps", networks)
    return started, gate, runs


def test_the_split_networks_run_as_a_job_with_progress_and_cancel(widget, monkeypatch):
    """The statistics of a manual segmentation with the split ticked ran the ventricle and brain networks on the main
    thread (seconds to tens of seconds on a large scan on the CPU): the panel frozen, a status line alone, no Cancel.
    They run as Segment WMH runs now: the progress bar and the status line follow them, Segment WMH turns into Cancel,
    the statistics buttons wait; Cancel stops them, keeps nothing of them and shows the statistics without the split,
    saying so; let run, they are kept and the statistics come with the split, a second time at once."""
    ui, p = widget.ui, widget._parameterNode
    p.outputSegmentation = mrml.segmentationFromMask(widget.truth, widget.volume, name="manual")
    p.device, p.ventricleSplit = "cpu", True
    started, gate, runs = blockingNetworks(monkeypatch)
    ui.statusLabel.text = "Done."
    ui.showStatisticsButton.click()  # returns while the networks run
    assert started.wait(10)
    job = widget._job
    assert job is not None and widget._timer.active and ui.applyButton.text == "Cancel" and ui.applyButton.enabled
    assert not ui.showStatisticsButton.enabled and not ui.listLesionsButton.enabled
    widget._timer.fire()
    assert ui.progressBar.value == 25 and ui.statusLabel.text.startswith("Finding the lateral ventricles on 'FLAIR'")
    assert ui.statusLabel.text.endswith("ventricles: slice 3/12")
    ui.applyButton.click()  # Cancel
    assert job.wait(10)
    widget._timer.fire()
    assert widget._job is None and not widget._timer.active and ui.progressBar.value == 0
    assert ui.statusLabel.text.startswith("Cancelled: the statistics are shown without the periventricular/deep split")
    assert "Total lesion volume" in ui.resultsLabel.text and "Periventricular" not in ui.resultsLabel.text
    assert "No periventricular/deep split: its networks were cancelled" in ui.resultsLabel.text
    assert widget._results["report"]["location"] is None and widget.logic._locationInputs is None  # nothing kept
    assert ui.showStatisticsButton.enabled and ui.applyButton.text == "Segment WMH"

    gate.set()
    ui.statusLabel.text = "Done."
    ui.listLesionsButton.click()
    finishJob(widget)
    assert len(runs) == 2 and ui.progressBar.value == 100 and ui.statusLabel.text == "Done."
    assert madeBySplit(widget) and widget._results.get("table") == "lesions"
    assert "No periventricular/deep split: its networks were cancelled" not in ui.resultsLabel.text
    ui.showStatisticsButton.click()  # kept: at once, no job
    assert widget._job is None and len(runs) == 2 and madeBySplit(widget)


def test_the_panel_says_what_the_split_of_a_manual_segmentation_runs_and_costs():
    """The split's checkbox spoke only of DeepWML's own run, and the brain-mask one only of the marks: a user ticking
    them did not learn that the statistics of a manual segmentation then run the ventricle and brain networks
    (seconds, the first time for a volume) nor that the brain mask shapes that split."""
    import xml.etree.ElementTree as ElementTree

    ui = ElementTree.parse(Path(__file__).resolve().parent.parent / "DeepWML" / "Resources" / "UI" / "DeepWML.ui")
    tips = {w.get("name"): w.findtext("property[@name='toolTip']/string") for w in ui.iter("widget")}
    assert "manual" in tips["ventricleSplitCheckBox"] and "seconds the first time" in tips["ventricleSplitCheckBox"]
    assert "keeps the ventricles found inside the brain mask" in tips["brainMaskCheckBox"]
    assert "split" in tips["showStatisticsButton"]


def test_statistics_of_deepwmls_own_split_need_no_ventricle_model_file(widget, monkeypatch):
    """With the split ticked, the statistics looked for the ventricle model file before anything else, so where none
    is found (a models folder of one's own) even a segmentation holding its own 'Lateral ventricles' segment, which
    needs no network, got no statistics at all. The model is looked for only where the networks make the split: a
    manual segmentation without one is still refused, saying to untick the split."""
    ui, p = widget.ui, widget._parameterNode
    monkeypatch.setattr(widget.logic, "ventricleModelPath", lambda: None)
    segmentation = mrml.segmentationFromMask(widget.truth, widget.volume, name="edited")
    ventricles = sitk.Image(widget.truth)
    ventricles[:] = 0
    ventricles[20:30, 20:30, :] = 1
    mrml.segmentationFromMask(ventricles, widget.volume, segmentation, segmentName=mrml.VENTRICLE_SEGMENT_NAME)
    p.outputSegmentation, p.ventricleSplit = segmentation, True
    ui.showStatisticsButton.click()
    assert "periventricular" in ui.resultsLabel.text.lower()
    p.outputSegmentation = mrml.segmentationFromMask(widget.truth, widget.volume, name="manual")
    with pytest.raises(DeepWMLError, match="untick the split, or measure the mask with deepwml export --ventricle-model"):
        ui.showStatisticsButton.click()


def test_the_split_networks_do_not_run_beside_a_segmentation(widget, module, monkeypatch, tiny_model):
    """A second job beside the one running (the panel has one progress bar, one Cancel): while Segment WMH runs, the
    statistics that would run the split's networks are refused, saying why; those that need none are shown."""
    job = segmentationHeld(widget, module, monkeypatch, tiny_model)
    ui, p = widget.ui, widget._parameterNode
    p.outputSegmentation = mrml.segmentationFromMask(widget.truth, widget.volume, name="manual")
    p.ventricleSplit = True
    with pytest.raises(DeepWMLError, match="wait for the run going on now"):
        ui.showStatisticsButton.click()
    assert widget._job is job
    p.ventricleSplit = False
    ui.showStatisticsButton.click()
    assert "Total lesion volume" in ui.resultsLabel.text and widget._job is job
    ui.applyButton.click()
    finishJob(widget)


def test_statistics_waiting_for_the_split_are_those_of_the_click(widget, monkeypatch):
    """The statistics waiting for the split's networks were made when they finished from what the panel showed then:
    a reference chosen meanwhile was the one compared, and a device (or precision, or brain mask) changed meanwhile
    threw the networks' work away and ran them again, unasked. They are those of the click now: its segmentation,
    reference and settings, the networks run once."""
    ui, p = widget.ui, widget._parameterNode
    p.outputSegmentation = mrml.segmentationFromMask(widget.truth, widget.volume, name="manual")
    first = mrml.segmentationFromMask(widget.truth, widget.volume, name="rater A")
    p.referenceSegmentation = first
    p.device, p.ventricleSplit, p.brainMask = "cpu", True, True
    started, gate, runs = blockingNetworks(monkeypatch)
    ui.compareButton.click()
    assert started.wait(10)
    p.referenceSegmentation = mrml.segmentationFromMask(widget.truth, widget.volume, name="rater B")
    p.device, p.brainMask = "auto", False  # for the next run
    gate.set()
    finishJob(widget)
    assert widget._job is None and len(runs) == 1, "the networks ran again"
    assert widget._results["reference"] == "rater A" and madeBySplit(widget)
    report = widget._results["report"]
    assert report["device"] == "cpu" and report["brain_mask"] == BRAIN_MASK_GATES_VENTRICLES


def test_statistics_waiting_for_the_split_say_their_segmentation_was_deleted_meanwhile(widget, monkeypatch):
    """A segmentation deleted while the split's networks ran left no statistics and the status line as it was before
    the click, as if the networks had made them: it says why none are shown."""
    ui, p = widget.ui, widget._parameterNode
    manual = mrml.segmentationFromMask(widget.truth, widget.volume, name="manual")
    p.outputSegmentation, p.device, p.ventricleSplit = manual, "cpu", True
    started, gate, runs = blockingNetworks(monkeypatch)
    ui.statusLabel.text = "Done."
    ui.showStatisticsButton.click()
    assert started.wait(10)
    slicer.mrmlScene.RemoveNode(manual)
    gate.set()
    finishJob(widget)
    assert ui.statusLabel.text == ("No statistics shown: 'manual' was removed from the scene while the ventricles were "
                                   "being found.")
    assert not widget._results and widget.logic._locationInputs is not None  # the volume's networks: kept


def test_leaving_and_entering_the_module_again_warns_of_nothing(widget):
    """exit() stops observing the parameter node; enter() set it again and removed that observer a second time,
    which Slicer's observation helper reports as a warning ("does not have observer") in the log each time the user
    comes back to the module. Once observed again, the panel follows the parameter node as before."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        widget.exit()
        widget.enter()
    assert [str(w.message) for w in caught if "observer" in str(w.message)] == []
    widget._parameterNode.device = "cpu"
    assert widget.ui.deviceNoteLabel.text == ""
    widget._parameterNode.device = "cuda"  # no GPU here: the note says so, the panel still following the node
    assert "GPU" in widget.ui.deviceNoteLabel.text
