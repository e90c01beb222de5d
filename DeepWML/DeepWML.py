"""DeepWML: white matter hyperintensity segmentation on FLAIR MRI (3D Slicer scripted module).

The module is deliberately thin: the widget binds GUI to the parameter node and shows results,
`DeepWMLSlicerLib.CoreLogic.DeepWMLCoreLogic` moves data between MRML nodes and DeepWMLLib, and
DeepWMLLib does everything numeric.
"""

import logging
import pathlib
from typing import Annotated, Union

import qt
import vtk

import slicer
from slicer import vtkMRMLLabelMapVolumeNode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from DeepWMLSlicerLib import MRMLConversion
from DeepWMLSlicerLib.CoreLogic import (DEFAULT_CONSENSUS_THRESHOLD, LESION_TABLE, MODEL_FILE_CHOICE, PRECISION_CHOICES,
                                        DeepWMLCoreLogic, DeepWMLError, tableTitle)

# slicer.parameterNodeWrapper (with Union node types, Choice and WithinRange) is new in Slicer 5.4.
MINIMUM_SLICER = "5.4"
try:
    from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
except ImportError as error:
    raise ImportError(f"DeepWML needs 3D Slicer {MINIMUM_SLICER} or newer (it uses slicer.parameterNodeWrapper); "
                      f"this is Slicer {getattr(slicer.app, 'applicationVersion', 'of an unknown version')}") from error

POLL_INTERVAL_MS = 200
SEGMENT_TEXT = "Segment WMH"
CANCEL_TEXT = "Cancel"
# a combo box item's flags (QStandardItem keeps them in the role Qt::UserRole - 1): 0 shows it greyed out and not
# selectable, Qt::ItemIsSelectable | Qt::ItemIsEnabled (1 | 32) as an item is by default in a QComboBox
ITEM_FLAGS_ROLE_OFFSET = -1
ITEM_DISABLED, ITEM_ENABLED = 0, 1 | 32
BF16_TOOLTIP = "bf16: for a CPU that computes it natively (AMX or AVX512-BF16); refused elsewhere when the run starts"


class DeepWML(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "DeepWML"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["DeepWML contributors"]
        self.parent.helpText = """
Segments white matter hyperintensities (WMH) on a FLAIR volume with a 2D U-Net (DeepWML), reports
total lesion volume, lesion count and lesion volume per axial slice, compares the result with a
manual reference (Dice, sensitivity, precision), checks two raters' agreement (Dice >= 0.85) and
compares a follow-up with an earlier scan (new, enlarging, stable and gone lesions).
Not a medical device: review every result. The default model, trained on synthetic scans, reached a
median Dice of 0.75 on 5 mm slices of three labelled MS patients (paper: 0.78); it under-calls a large
lesion load and over-calls a small one, so check every mark on a scan with few lesions (figures per case:
Resources/Models/README.md).
"""
        self.parent.acknowledgementText = """
Method: Zhang et al., DeepWML (2021). Module layout follows SlicerNNUNet, SlicerMONAIAuto3DSeg and
SlicerTotalSegmentator.
"""


@parameterNodeWrapper
class DeepWMLParameterNode:
    """GUI state, saved with the scene. modelName is a shipped model's or named ensemble's name,
    MODEL_FILE_CHOICE for `modelFile`, or empty for the shipped default model."""

    inputVolume: vtkMRMLScalarVolumeNode
    modelName: str = ""
    modelFile: pathlib.Path
    device: Annotated[str, Choice(["auto", "cpu", "cuda"])] = "auto"
    # deepwml segment --precision: auto runs bf16 on a CPU that computes it natively where it is measured faster
    # than fp32 there, and fp16 on a GPU; fp32 is the way out when reduced precision overflows (NaN probabilities)
    precision: Annotated[str, Choice(list(PRECISION_CHOICES))] = "auto"
    useModelThreshold: bool = True
    threshold: Annotated[float, WithinRange(0.01, 0.99)] = 0.5
    tta: bool = False
    # deepwml segment --grid-phases 4 when ticked: the lesion map averaged over the network grid moved by 0 and half
    # a pixel, for marks that depend less on how the slices happen to be sampled (about 4 times slower)
    averageGridPhases: bool = False
    brainMask: bool = True
    # the periventricular/deep split with the shipped lateral-ventricle model; off as in `deepwml segment`,
    # where that model is opt-in (it under-marks real ventricles; Resources/Models/README.md)
    ventricleSplit: bool = False
    outputSegmentation: vtkMRMLSegmentationNode
    referenceSegmentation: Union[vtkMRMLSegmentationNode, vtkMRMLLabelMapVolumeNode, None]  # None: Slicer's wrapper needs it
    raterA: Union[vtkMRMLSegmentationNode, vtkMRMLLabelMapVolumeNode, None]  # None: Slicer's wrapper needs it
    raterB: Union[vtkMRMLSegmentationNode, vtkMRMLLabelMapVolumeNode, None]  # None: Slicer's wrapper needs it
    consensusThreshold: Annotated[float, WithinRange(0.0, 1.0)] = DEFAULT_CONSENSUS_THRESHOLD
    baselineVolume: vtkMRMLScalarVolumeNode  # an earlier scan of the same patient, for "Lesion change"
    baselineSegmentation: Union[vtkMRMLSegmentationNode, vtkMRMLLabelMapVolumeNode, None]  # None: Slicer's wrapper needs it
    # Save results also writes the output segmentation as a DICOM SEG of the FLAIR's study (deepwml segment --dicom-seg's
    # file) beside the results, for a FLAIR loaded with the DICOM module
    dicomSeg: bool = False


class DeepWMLWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        # set before the base __init__, which calls setup() at once when there is no parent
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None
        self._results = {}
        self._tableSlices = []
        self._tableVolume = None  # the volume whose slices the table's rows are
        self._deviceNoteFor = None
        self._bf16For = None  # the device the bf16 item's state was checked for, and why bf16 cannot run there ("")
        self._bf16Refusal = ""
        self._lastSaved = None
        VTKObservationMixin.__init__(self)
        ScriptedLoadableModuleWidget.__init__(self, parent)

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/DeepWML.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = DeepWMLLogic()
        self.logic.interactive = True
        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_INTERVAL_MS)
        self._timer.connect("timeout()", self.onPollJob)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.showStatisticsButton.connect("clicked(bool)", self.onShowStatistics)
        self.ui.listLesionsButton.connect("clicked(bool)", self.onListLesions)
        self.ui.compareButton.connect("clicked(bool)", self.onCompare)
        self.ui.consensusButton.connect("clicked(bool)", self.onConsensus)
        self.ui.changeButton.connect("clicked(bool)", self.onLesionChange)
        self.ui.saveResultsButton.connect("clicked(bool)", self.onSaveResults)
        self.ui.sliceTable.connect("itemSelectionChanged()", self.onSliceSelected)

        try:  # not tryWithErrorDisplay: it raises again after its dialog, and set-up must go on
            choices = self.logic.modelChoices()
        except Exception as exc:
            choices = [(MODEL_FILE_CHOICE, "A DeepWML model file (.pt) of your own")]  # what is left to choose
            logging.error(f"Cannot list the shipped DeepWML models: {exc}")
            self.ui.statusLabel.text = f"Cannot list the shipped models: {exc}"
        for name, description in choices:
            self.ui.modelComboBox.addItem(name)
            self.ui.modelComboBox.setItemData(self.ui.modelComboBox.count - 1, description, qt.Qt.ToolTipRole)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        if self._job is not None:
            self._job.drop()  # not polled again: its nodes let go of here, on the main thread
        self._timer.stop()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)

    def onSceneStartClose(self, caller, event) -> None:
        if self._job is not None and self._job.kind == "change":
            self._dropChange(self._job)  # not waited for: its registration cannot be interrupted
        elif self._job is not None:
            self._job.cancel()
        self.setParameterNode(None)
        self._clearResults()  # the closed scene's patient: nothing of it may stay on show or be saved
        with slicer.util.tryWithErrorDisplay("Cannot let go of the closed scene's data."):
            self.logic.forgetKept()  # nor kept in memory
        self.ui.statusLabel.text = ""
        self.ui.progressBar.value = 0

    def _clearResults(self, keepConsensus: bool = False) -> None:
        self._results = {}
        self._tableSlices = []
        self._tableVolume = None
        self.ui.sliceTable.clearContents()
        self.ui.sliceTable.setRowCount(0)
        self.ui.sliceTableCollapsibleButton.text = tableTitle({})
        labels = [self.ui.resultsLabel, self.ui.comparisonLabel, self.ui.changeLabel]
        for label in labels if keepConsensus else labels + [self.ui.consensusLabel]:
            label.text = ""

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            # GetFirstNodeByClass would also return labelmaps and vector volumes, which the selector hides
            for node in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode"):
                if node.GetClassName() == "vtkMRMLScalarVolumeNode":
                    self._parameterNode.inputVolume = node
                    break

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            # not observed since exit() (the module left, now entered again): removing it again would warn
            if self.hasObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode):
                self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent,
                                    self.updateGUIFromParameterNode)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
            self.updateGUIFromParameterNode()

    def updateGUIFromParameterNode(self, caller=None, event=None) -> None:
        p = self._parameterNode
        if p is None:
            return
        index = self.ui.modelComboBox.findText(p.modelName)
        retired, choice, said = "", None, ""
        try:  # an older version's scene: words only, the buttons below must still follow the parameters
            retired = self.logic.forgetAllModelsEnsemble(p.parameterNode)
            if index < 0 and p.modelName:
                choice, said = self.logic.savedModelChoice(p.modelName)
        except Exception as exc:
            logging.error(f"Cannot check the scene's model choice: {exc}")
            said = f"Cannot check the scene's model choice: {exc}"
        if retired:
            self.ui.statusLabel.text = retired
        if index < 0 and p.modelName:  # e.g. a scene saved with a model this version no longer ships
            self.ui.statusLabel.text = " ".join(text for text in (retired, said) if text)
            if choice is None or self.ui.modelComboBox.findText(choice) < 0:
                choice = self.ui.modelComboBox.itemText(0)
            p.modelName = choice  # what the box shows is what runs (updates again)
            return
        self.ui.modelComboBox.currentIndex = max(index, 0)
        self.ui.modelFilePathLineEdit.visible = p.modelName == MODEL_FILE_CHOICE
        self.ui.thresholdSliderWidget.enabled = not p.useModelThreshold
        if self._deviceNoteFor != (p.device, p.precision):
            self._deviceNoteFor = (p.device, p.precision)
            try:  # a note only: the buttons below must still follow the parameters
                self.ui.deviceNoteLabel.text = self.logic.deviceNote(p.device, p.precision)
            except Exception as exc:
                logging.error(f"Cannot check the device: {exc}")
                self.ui.deviceNoteLabel.text = f"Cannot check the device: {exc}"
        if self._offerPrecisions(p):
            return  # bf16 put back to auto: updated again
        running = self._job is not None
        splitting = running and self._job.kind == "split"  # the statistics wait for it: asked for once
        # the volume being segmented and the node its result goes into stay as they are until the run ends
        self.ui.inputVolumeSelector.enabled = not running
        self.ui.outputSegmentationSelector.enabled = not running
        self.ui.applyButton.text = CANCEL_TEXT if running else SEGMENT_TEXT
        self.ui.applyButton.enabled = running or bool(p.inputVolume)
        self.ui.showStatisticsButton.enabled = bool(p.inputVolume and p.outputSegmentation) and not splitting
        self.ui.listLesionsButton.enabled = bool(p.inputVolume and p.outputSegmentation) and not splitting
        self.ui.compareButton.enabled = bool(p.inputVolume and p.outputSegmentation and p.referenceSegmentation) \
            and not splitting
        self.ui.consensusButton.enabled = bool(p.raterA and p.raterB)
        self.ui.changeButton.enabled = bool(p.inputVolume and p.outputSegmentation and p.baselineVolume
                                            and p.baselineSegmentation)
        self.ui.saveResultsButton.enabled = bool(self._results)

    def _offerPrecisions(self, p) -> bool:
        """Offer Precision bf16 only where a run on the chosen device can use it (a GPU, or a CPU without native bf16,
        refuses it when the run starts): its item greyed out, its tooltip saying why, checked again when the device
        changes. A bf16 chosen before (a scene saved on another computer, or the device changed since) is put back to
        auto, the status line saying why; True then (the parameter node updates the panel again)."""
        if self._bf16For != p.device:
            self._bf16For = p.device
            try:  # words only: the panel must still follow the parameters
                self._bf16Refusal = self.logic.bf16Refusal(p.device)
            except Exception as exc:
                logging.error(f"Cannot check whether this computer runs bf16: {exc}")
                self._bf16Refusal = ""  # the run itself refuses it where it cannot run
        box = self.ui.precisionComboBox
        index = box.findText("bf16")
        if index >= 0:  # filled again each time the parameter node connects to the panel: set each time
            box.setItemData(index, ITEM_DISABLED if self._bf16Refusal else ITEM_ENABLED,
                            qt.Qt.UserRole + ITEM_FLAGS_ROLE_OFFSET)
            # offered also where it cannot be told yet (PyTorch not installed, cuda without a GPU): not "this CPU"
            box.setItemData(index, self._bf16Refusal or BF16_TOOLTIP, qt.Qt.ToolTipRole)
        if p.precision != "bf16" or not self._bf16Refusal:
            return False
        self.ui.statusLabel.text = f"Precision bf16 is not used here: {self._bf16Refusal} Precision auto is selected."
        p.precision = "auto"
        return True

    def onModelChanged(self, index: int) -> None:
        if self._parameterNode is not None and index >= 0:
            self._parameterNode.modelName = self.ui.modelComboBox.itemText(index)

    # -----------------------------------------------------------------------------------------
    # Segmentation (a worker process, or thread, polled by a timer)

    def onApplyButton(self) -> None:
        if self._job is not None and self._job.kind == "change":
            self._dropChange(self._job)
            return
        if self._job is not None:
            self._job.cancel()
            self.ui.statusLabel.text = "Cancelling..."
            return
        p = self._parameterNode
        keep = "choose 'Create new segmentation' as the output segmentation"
        with slicer.util.tryWithErrorDisplay("Cannot start the segmentation.", waitCursor=True):
            # not beside a cancelled comparison still ending its registration: refused before asking anything
            self.logic.refuseWhileEnding("segment")
            output = self.logic.outputFor(p.outputSegmentation, p.inputVolume)  # never another volume's result
            # what would run, refused (no model file, no ventricle model) before asking what it would replace
            modelPaths = self.logic.modelPaths(p.modelName, p.modelFile)
            location = self.logic.locationChoice(p.ventricleSplit)
            # hand edits a rerun replaces (a second or so on a large scan: under the wait cursor)
            loses = self.logic.rerunLoses(output, p.inputVolume, bool(location))
            if loses and slicer.util.mainWindow() is None:  # Slicer --no-main-window, a script: Slicer's question
                raise DeepWMLError(f"{loses}; Segment WMH would replace it: to keep it, {keep}")  # would wait for ever
        if loses and not slicer.util.confirmOkCancelDisplay(  # with the ordinary cursor
                f"{loses}. Segment WMH replaces it. Replace it?\n\nTo keep it, cancel and {keep}.", "DeepWML"):
            return
        with slicer.util.tryWithErrorDisplay("Cannot start the segmentation.", waitCursor=True):
            self._job = self.logic.startSegmentation(
                p.inputVolume, device=p.device, precision=p.precision, modelPaths=modelPaths,
                threshold=None if p.useModelThreshold else p.threshold, tta=p.tta, brainMask=p.brainMask,
                location=location, gridPhases=4 if p.averageGridPhases else 1)
            self._job.outputNode = output
            self.ui.progressBar.value = 0
            self._timer.start()
            self.updateGUIFromParameterNode()

    def onPollJob(self) -> None:
        job = self._job
        finished = job.done  # first: a worker process's job reads its progress then
        self.ui.progressBar.value = int(round(100 * job.fraction))
        # a cancelled run in a thread goes on to its end (post-processing, report): not its steps, which look
        # as if Cancel had not been heard
        self.ui.statusLabel.text = "Cancelling..." if job.cancelled and not finished else job.message
        if not finished:
            return
        self._timer.stop()
        self._job = None
        self.updateGUIFromParameterNode()
        p = self._parameterNode
        if job.kind == "split":
            self._finishSplit(job)
            return
        if job.kind == "change":
            self._finishChange(job)
            return
        if job.cancelled or p is None:  # cancelled by the user, or the scene was closed meanwhile
            self.ui.statusLabel.text = "Cancelled."
            return
        with slicer.util.tryWithErrorDisplay("Segmentation failed."):
            try:
                segmentation = self.logic.finishSegmentation(job, job.outputNode)
            except Exception as exc:
                self.ui.statusLabel.text = f"Failed: {exc}"
                self.ui.progressBar.value = 0
                raise
            self.ui.progressBar.value = int(round(100 * job.fraction))  # 100 % now that the result is in the scene
            # the results are those of the volume that was segmented, whatever is selected now
            p.inputVolume, p.outputSegmentation = job.volumeNode, segmentation
            slicer.util.setSliceViewerLayers(background=job.volumeNode)
            # and, for a frame of a sequence, that the browser was moved back to the frame segmented
            self.ui.statusLabel.text = " ".join([self.logic.describeRun(job.result.report)] + job.notes)
            self._clearResults(keepConsensus=True)  # an earlier Dice or change readout is of an older result
            self.onShowStatistics()

    # -----------------------------------------------------------------------------------------
    # Results

    def _statisticsArguments(self) -> dict:
        """The arguments of the output segmentation's statistics (logic.lesionStatistics), taken at the click: the
        statistics are of the segmentation, volume and settings chosen then, also where the split's networks run
        first (a job) and something else is chosen meanwhile. With the periventricular/deep split when it is ticked:
        from its 'Lateral ventricles' segment, else (a manual segmentation) made by the ventricle model as
        `deepwml export` makes it for a mask given (its networks on the FLAIR, on the panel's device, the brain mask
        as ticked)."""
        p = self._parameterNode
        # the model looked for only where the networks make the split (not for a segment of DeepWML's ventricles)
        return dict(segmentationNode=p.outputSegmentation, volumeNode=p.inputVolume,
                    ventricleModel=True if p.ventricleSplit else None, device=p.device, brainMask=p.brainMask,
                    precision=p.precision)

    @staticmethod
    def _withSplit(statistics: dict, split: bool) -> dict:
        """`statistics`, without the split where `split` is False (its networks were cancelled)."""
        return statistics if split else {**statistics, "ventricleModel": None}

    def _waitForSplit(self, job, again, nodes) -> bool:
        """Where the statistics need the split's networks first (seconds to tens of seconds the first time for a
        volume: logic.startSplit's `job`), show them running as a segmentation runs (progress bar, status line,
        Segment WMH turned into Cancel, the panel usable) and call `again(split)` (the statistics of the click) once
        they are done, if `nodes` (those the statistics are of) are still in the scene then (_finishSplit). False
        where there is no job: go on now."""
        if job is None:
            return False
        job.again, job.nodes, job.shown = again, nodes, self.ui.statusLabel.text
        self._job = job
        self.ui.progressBar.value = 0
        self.ui.statusLabel.text = job.message
        self._timer.start()
        self.updateGUIFromParameterNode()
        return True

    def _finishSplit(self, job) -> None:
        """The split's networks are done (or cancelled, or failed): their work kept and the statistics of the click
        shown with the split, or, cancelled, shown without it, the status line saying so; nothing is kept of a
        cancelled run. Where what they are of left the scene meanwhile, none are shown, the status line saying so."""
        if self._parameterNode is None:  # the scene was closed meanwhile
            self.ui.statusLabel.text = "Cancelled."
            return
        gone = [node.GetName() for node in job.nodes if node.GetScene() is None]  # deleted meanwhile
        goneText = (f"No statistics shown: '{gone[0]}' was removed from the scene while the ventricles were being "
                    "found." if gone else "")
        if job.cancelled:
            self.ui.progressBar.value = 0
            if gone:
                self.ui.statusLabel.text = "Cancelled."
                return
            job.again(False)
            self.ui.statusLabel.text = ("Cancelled: the statistics are shown without the periventricular/deep split "
                                        "(its networks were stopped; nothing of them is kept). Show them again to make "
                                        "it.")
            return
        with slicer.util.tryWithErrorDisplay("Cannot make the periventricular/deep split."):
            try:
                self.logic.finishSplit(job)
            except Exception as exc:
                self.ui.statusLabel.text = f"Failed: {exc}"
                self.ui.progressBar.value = 0
                raise
            self.ui.progressBar.value = 100
            self.ui.statusLabel.text = goneText or job.shown  # what it said before the networks ran
        if not gone:
            job.again(True)

    def _splitCancelledNote(self, statistics: dict, split: bool) -> str:
        """A line below the report where a cancelled split left the statistics without it."""
        if split or not statistics["ventricleModel"]:
            return ""
        return "\nNo periventricular/deep split: its networks were cancelled (show the statistics again to make it)"

    def onShowStatistics(self) -> None:
        self._showStatistics(self._statisticsArguments())

    def _showStatistics(self, statistics: dict, split: bool = True, table=None) -> None:
        """The report of the statistics' segmentation (`table`: LESION_TABLE, its lesions in the table, for Review
        lesions), once the split's networks, where they must run, are done (`_waitForSplit` calls it again)."""
        failure = "Cannot list the lesions." if table else "Cannot compute lesion statistics."
        with slicer.util.tryWithErrorDisplay(failure, waitCursor=True):
            arguments = self._withSplit(statistics, split)
            if self._waitForSplit(self.logic.startSplit(**arguments, busy=self._job is not None),
                                  lambda split: self._showStatistics(statistics, split, table),
                                  (statistics["segmentationNode"], statistics["volumeNode"])):
                return
            results = {"report": self.logic.lesionStatistics(**arguments)}
            if table:
                results["table"] = table
            self._showResults(results, self.logic.sliceTable(results), statistics["volumeNode"])
            self.ui.resultsLabel.text = (self.logic.formatReport(results["report"])
                                         + self._splitCancelledNote(statistics, split))

    def onListLesions(self) -> None:
        """Every lesion of the output segmentation in the table, smallest first (the marks most often wrong), each
        row showing its lesion: a radiologist's review of the result, lesion by lesion."""
        self._showStatistics(self._statisticsArguments(), table=LESION_TABLE)

    def onCompare(self) -> None:
        self._compare(self._statisticsArguments(), self._parameterNode.referenceSegmentation)

    def _compare(self, statistics: dict, reference, split: bool = True) -> None:
        with slicer.util.tryWithErrorDisplay("Cannot compare with the reference.", waitCursor=True):
            arguments = self._withSplit(statistics, split)
            if self._waitForSplit(self.logic.startSplit(**arguments, busy=self._job is not None),
                                  lambda split: self._compare(statistics, reference, split),
                                  (statistics["segmentationNode"], statistics["volumeNode"], reference)):
                return
            results = {
                "report": self.logic.lesionStatistics(**arguments),
                "comparison": self.logic.compareSegmentations(statistics["segmentationNode"], reference,
                                                              statistics["volumeNode"]),
                "reference": reference.GetName(),  # whose Dice, in the saved .json
            }
            self._showResults(results, self.logic.sliceTable(results), statistics["volumeNode"])
            self.ui.resultsLabel.text = (self.logic.formatReport(results["report"])
                                         + self._splitCancelledNote(statistics, split))
            self.ui.comparisonLabel.text = self.logic.formatComparison(results["comparison"])

    def onConsensus(self) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay("Cannot check the raters' agreement."):
            results = {"consensus": self.logic.consensusCheck(p.raterA, p.raterB, p.consensusThreshold, p.inputVolume)}
            self._showResults(results, self.logic.sliceTable(results))
            self.ui.consensusLabel.text = self.logic.formatConsensus(results["consensus"])

    def onLesionChange(self) -> None:
        """The lesion change of the follow-up (the input volume and output segmentation) since the earlier scan: its
        two registrations (tens of seconds each on a clinical pair) run as a job, as a segmentation runs (progress
        bar, status line, Segment WMH turned into Cancel, the panel usable); the nodes are made when they are done
        (_finishChange). Refused, saying why, while another job runs."""
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay("Cannot compare with the earlier scan.", waitCursor=True):
            job = self.logic.startChange(p.baselineVolume, p.baselineSegmentation, p.inputVolume, p.outputSegmentation,
                                         busy=self._job.kind if self._job is not None else False)
            self._job = job
            self.ui.progressBar.value = 0
            self.ui.statusLabel.text = job.message
            self._timer.start()
            self.updateGUIFromParameterNode()

    def _dropChange(self, job) -> None:
        """Cancel a lesion change job and stop waiting for it now: a registration cannot be interrupted once it runs,
        so its thread goes on to that registration's end, and its result is dropped then (never put into the
        scene)."""
        job.drop()  # its nodes let go of here, on the main thread
        self._timer.stop()
        self._job = None
        self.ui.progressBar.value = 0
        self.ui.statusLabel.text = ("Cancelled: nothing of the lesion change is kept. The registration running now "
                                    "cannot be interrupted: it ends in the background (up to tens of seconds) and its "
                                    "result is dropped; no other job starts until it has.")
        self.updateGUIFromParameterNode()

    def _finishChange(self, job) -> None:
        """The lesion change's registrations are done (or failed): its nodes made and its results shown, those of the
        scans and segmentations of the click. Where one of them was edited, moved or deleted meanwhile, nothing is
        made or shown, the status line saying why."""
        if self._parameterNode is None or job.cancelled:  # the scene was closed meanwhile
            self.ui.statusLabel.text = "Cancelled."
            self.ui.progressBar.value = 0
            return
        with slicer.util.tryWithErrorDisplay("Cannot compare with the earlier scan."):
            try:
                made = self.logic.finishChange(job)
            except Exception as exc:
                self.ui.statusLabel.text = f"Failed: {exc}"
                self.ui.progressBar.value = 0
                raise
            if made is None:
                self.ui.progressBar.value = 0
                self.ui.statusLabel.text = f"No lesion change kept: {job.discarded}. Compare again."
                return
            changeNode, registered, report = made
            baselineVolume, _, followupVolume, _ = job.nodes
            results = {"change": report}
            self._showResults(results, self.logic.sliceTable(results), followupVolume)
            self.ui.changeLabel.text = self.logic.formatChange(report)
            slicer.util.setSliceViewerLayers(background=followupVolume, foreground=registered, foregroundOpacity=0.0)
            self.ui.progressBar.value = 100
            self.ui.statusLabel.text = (f"Lesion change of '{followupVolume.GetName()}' since "
                                        f"'{baselineVolume.GetName()}': '{changeNode.GetName()}' and "
                                        f"'{registered.GetName()}' are in the scene.")

    def _showResults(self, results: dict, table, volume=None) -> None:
        """Keep the results for saving and fill the per-slice table (headers, rows, slice of each row); `volume`: the
        one the results are of (None: the input volume)."""
        self._results = results
        headers, rows, self._tableSlices = table
        self.ui.sliceTableCollapsibleButton.text = tableTitle(results)
        # a row shows its slice of it, whatever is chosen later
        self._tableVolume = volume if volume is not None else self._parameterNode.inputVolume
        view = self.ui.sliceTable
        view.clearContents()
        view.setColumnCount(len(headers))
        view.setHorizontalHeaderLabels(headers)
        view.setRowCount(len(rows))
        for r, row in enumerate(rows):
            for c, text in enumerate(row):
                view.setItem(r, c, qt.QTableWidgetItem(text))
        self.updateGUIFromParameterNode()

    def onSliceSelected(self) -> None:
        row = self.ui.sliceTable.currentRow()
        volumeNode = self._tableVolume
        if volumeNode is None or volumeNode.GetScene() is None or not 0 <= row < len(self._tableSlices):
            return
        with slicer.util.tryWithErrorDisplay("Cannot show that slice."):
            self.logic.jumpTo(volumeNode, self._tableSlices[row])

    def onSaveResults(self) -> None:
        with slicer.util.tryWithErrorDisplay("Cannot save the results."):
            # named after the patient's FLAIR and the results, in the folder and of the type saved last (at first
            # Slicer's scene folder and the table)
            last = pathlib.Path(self._lastSaved) if self._lastSaved else None
            folder = str(last.parent) if last else getattr(slicer.app, "defaultScenePath", "") or ""
            name = self.logic.resultsFileName(self._results, last.suffix.lower() if last else ".csv", folder or None)
            path = qt.QFileDialog.getSaveFileName(None, "Save DeepWML results", str(pathlib.Path(folder, name))
                                                  if folder else name, "Per-slice table (*.csv);;All results (*.json)")
            if not path:
                return
            self.logic.saveResults(self._results, path)
            self._lastSaved = path
        p = self._parameterNode
        if p.dicomSeg:  # its own error display: the results are saved whatever becomes of the SEG
            with slicer.util.tryWithErrorDisplay("Cannot write the DICOM SEG (the results are saved).", waitCursor=True):
                volume = self._tableVolume or p.inputVolume  # the FLAIR the results are of
                segPath = self.logic.dicomSegPath(volume, pathlib.Path(path).parent)
                self.logic.writeDicomSeg(p.outputSegmentation, volume, segPath)
                self.ui.statusLabel.text = f"Results saved; DICOM SEG written: {segPath}"


class DeepWMLLogic(ScriptedLoadableModuleLogic, DeepWMLCoreLogic):
    """Usable from the Python console and scripts without the GUI, e.g.

        logic = DeepWMLLogic()
        segmentation = logic.segmentVolume(getNode("FLAIR"))
        print(logic.lesionStatistics(segmentation, getNode("FLAIR"))["volume_ml"])
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        DeepWMLCoreLogic.__init__(self)

    def getParameterNode(self):
        return DeepWMLParameterNode(super().getParameterNode())


class DeepWMLTest(ScriptedLoadableModuleTest):
    """Self-test on a synthetic oblique FLAIR volume; needs no download.

    `modelPaths` None runs the shipped default model; the pytest suite sets a tiny model to stay fast.
    """

    modelPaths = None

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_segment_and_measure()
        self.setUp()
        self.test_compare_and_consensus()
        self.setUp()
        self.test_cancel_leaves_scene_unchanged()

    def _syntheticFlair(self):
        """A tilted head-like volume of thick axial slices with one bright lesion.

        Returns the volume node, the lesion's centre (RAS) and its number of voxels."""
        import numpy as np

        shape = (12, 64, 56)  # k, j, i
        k, j, i = np.indices(shape)
        head = ((i - 27.5) / 24) ** 2 + ((j - 31.5) / 28) ** 2 < 1
        flair = np.where(head, 300.0, 10.0) + np.random.default_rng(0).normal(0, 5, shape)
        lesion = ((i - 35) ** 2 + (j - 25) ** 2 < 16) & (abs(k - 6) <= 1)
        flair[lesion] = 900.0
        node = slicer.util.addVolumeFromArray(flair.astype(np.float32), name="Synthetic FLAIR")
        angle = np.deg2rad(12)
        directions = np.array([[-np.cos(angle), np.sin(angle), 0], [-np.sin(angle), -np.cos(angle), 0], [0, 0, 1]])
        ijkToRAS = np.eye(4)
        ijkToRAS[:3, :3] = directions * np.array([0.9, 0.9, 5.0])
        ijkToRAS[:3, 3] = (20.0, -15.0, -27.0)
        node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(ijkToRAS))
        centre = ijkToRAS @ np.append(np.argwhere(lesion).mean(axis=0)[::-1], 1.0)
        return node, centre[:3], int(lesion.sum())

    def test_segment_and_measure(self):
        import SimpleITK as sitk

        volumeNode, _, _ = self._syntheticFlair()
        logic = DeepWMLLogic()
        fractions = []
        segmentation = logic.segmentVolume(volumeNode, device="cpu", modelPaths=self.modelPaths,
                                           progress=lambda fraction, message: fractions.append(fraction))
        self.assertEqual(segmentation.GetName(), "Synthetic FLAIR WMH")
        self.assertTrue(segmentation.GetSegmentation().GetSegmentIdBySegmentName("WMH"))
        self.assertEqual(fractions[-1], 1.0)
        report = logic.lesionStatistics(segmentation, volumeNode)
        self.assertEqual(report["device"], "cpu")
        self.assertEqual([s["index"] for s in report["slices"]], list(range(12)))
        mask = MRMLConversion.maskFromSegmentation(segmentation, volumeNode)
        self.assertEqual(mask.GetSize(), (56, 64, 12))
        voxels = int(sitk.GetArrayViewFromImage(mask).sum())
        self.assertAlmostEqual(report["volume_ml"], voxels * 0.9 * 0.9 * 5.0 / 1000, places=5)

    def test_compare_and_consensus(self):
        volumeNode, lesionRAS, lesionVoxels = self._syntheticFlair()
        logic = DeepWMLLogic()
        image = MRMLConversion.imageFromVolume(volumeNode)
        truth = MRMLConversion.segmentationFromMask(image > 800, volumeNode, name="Manual")
        report = logic.lesionStatistics(truth, volumeNode)
        self.assertEqual(report["lesion_count"], 1)
        self.assertAlmostEqual(report["volume_ml"], lesionVoxels * 0.9 * 0.9 * 5.0 / 1000, places=5)
        centroidLPS = report["lesions"][0]["centroid_mm"]
        for got, expected in zip((-centroidLPS[0], -centroidLPS[1], centroidLPS[2]), lesionRAS):
            self.assertAlmostEqual(got, expected, delta=0.05)
        same = logic.compareSegmentations(truth, truth, volumeNode)
        self.assertEqual((same["dice"], same["sensitivity"], same["precision"]), (1.0, 1.0, 1.0))
        empty = MRMLConversion.segmentationFromMask(image > 1e9, volumeNode, name="Empty")
        check = logic.consensusCheck(truth, empty, 0.85, volumeNode)
        self.assertFalse(check["passed"])
        self.assertEqual(check["worst_slices"], [5, 6, 7])
        logic.jumpToSlice(volumeNode, 6)
        for sliceNode in slicer.util.getNodesByClass("vtkMRMLSliceNode"):
            centre = slicer.util.arrayFromVTKMatrix(sliceNode.GetSliceToRAS())[:3, 3]
            self.assertAlmostEqual(centre[2], lesionRAS[2], places=3)
        # Review lesions: its one row centres the views on the lesion (a sphere: its centre is one of its voxels)
        _, _, targets = logic.sliceTable({"report": report, "table": LESION_TABLE})
        logic.jumpTo(volumeNode, targets[0])
        for sliceNode in slicer.util.getNodesByClass("vtkMRMLSliceNode"):
            centre = slicer.util.arrayFromVTKMatrix(sliceNode.GetSliceToRAS())[:3, 3]
            for got, expected in zip(centre, lesionRAS):
                self.assertAlmostEqual(got, expected, delta=1.0)

    def test_cancel_leaves_scene_unchanged(self):
        from DeepWMLLib.errors import Cancelled

        volumeNode, _, _ = self._syntheticFlair()
        before = slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")
        with self.assertRaises(Cancelled):
            DeepWMLLogic().segmentVolume(volumeNode, device="cpu", modelPaths=self.modelPaths, cancel=lambda: True)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode"), before)
