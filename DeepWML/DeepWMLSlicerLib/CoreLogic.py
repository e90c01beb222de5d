"""What the DeepWML module does, without any GUI: segment a volume node, measure the result,
compare it with a reference, check two raters' agreement, compare a follow-up with an earlier scan,
save the results.

`DeepWMLLogic` in DeepWML.py inherits `DeepWMLCoreLogic`; the batch script uses it directly. So one
code path serves the GUI, scripts and the tests that run on slicer-core. The numbers all come from
DeepWMLLib; this file moves data between MRML nodes and DeepWMLLib and formats results.

Dialogs (installing PyTorch or missing packages) appear only when `interactive` is True, as in
SlicerTotalSegmentator; otherwise a missing dependency is a DeepWMLError that says what to do.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import tempfile
import threading
import types
import weakref
from pathlib import Path

import slicer
from DeepWMLLib.errors import Cancelled, DeepWMLError
from DeepWMLLib.worker import read_pickled, write_pickled

from . import MRMLConversion as mrml

MODEL_FILE_CHOICE = "Model file..."
# the parameter of an older version's checkbox 'Ensemble of all shipped models' (an average of every shipped WMH
# model, never measured), which scenes saved then still hold
ALL_MODELS_PARAMETER = "ensemble"
# deepwml segment --precision (inference.PRECISIONS; not imported from there: the module loads before scipy is installed)
PRECISION_CHOICES = ("auto", "fp32", "bf16")
DEFAULT_CONSENSUS_THRESHOLD = 0.85
LESION_TABLE = "lesions"  # results["table"] of Review lesions: the table lists every lesion, not the slices
RUN_ATTRIBUTE = "DeepWML.run"
CHANGE_ATTRIBUTE = mrml.CHANGE_ATTRIBUTE  # on a change segmentation: the ID of its follow-up volume
CHANGE_REPORT_ATTRIBUTE = "DeepWML.change"  # on a change segmentation: its report (no lesion list)
REGISTERED_ATTRIBUTE = "DeepWML.registeredTo"  # on a registered baseline: the ID of its follow-up volume
# the WMH and ventricle segments as DeepWML wrote them (tell a rerun that they were edited since)
DIGEST_ATTRIBUTES = {mrml.WMH_SEGMENT_NAME: "DeepWML.wmhDigest", mrml.VENTRICLE_SEGMENT_NAME: "DeepWML.ventriclesDigest"}
# Facts about the run stored on the segmentation node, so they travel with the scene.
RUN_KEYS = ("model", "model_sha256", "model_adapted", "deepwml_version", "device", "runner", "threshold", "tta", "brain_model",
            "brain_model_sha256", "brain_mask", "intracranial_ml", "outside_brain_removed_ml", "brain_at_fov_edge", "seconds", "acquisition_plane", "contrast", "warnings",
            "settings")
DISCORDANT_SLICES_SHOWN = 10
SEGMENTED_FRACTION = 0.95  # a job's progress when segment_image is done; making the segmentation node is the rest
# Importable module -> pip requirement, for what Slicer's Python may lack (torch comes from PyTorch Utils).
PIP_PACKAGES = {"scipy": "scipy"}  # slicerio: only the command line reads .seg.nrrd with it; Slicer reads its own
IN_PROCESS_VARIABLE = "DEEPWML_IN_PROCESS"  # 1 (true, yes, on): GUI segmentations in a thread of Slicer's process
LOG_LINES_SHOWN = 5  # of a worker process that ended without a result
JOB_FOLDER_PREFIX = "DeepWML-job-"  # a worker process's temporary folder
CANCEL_WAIT_S = 5.0  # for a killed worker process to end, so that its folder can be removed at once
# a lesion change job's progress as each of its two registrations ends (the rest: classifying, making the nodes)
CHANGE_FRACTIONS = (0.45, 0.9)


def sourceWarnings(volumeNode) -> list[str]:
    """What the volume's source says against its being a FLAIR, as `deepwml segment` warns of it: the DICOM header
    of the series Slicer's DICOM module loaded it from (its first instance, found through Slicer's DICOM database),
    else the files a converter wrote beside the file it was loaded from (a JSON sidecar, b-values, a BIDS name).
    Empty where the volume has neither (made in the scene, or its source is gone): the scan's own check still runs."""
    from DeepWMLLib import io
    from DeepWMLLib.segment import image_file_warnings, not_flair_warning

    uids = (volumeNode.GetAttribute("DICOM.instanceUIDs") or "").split()
    if uids:
        database = getattr(slicer, "dicomDatabase", None)
        path = database.fileForInstance(uids[0]) if database is not None else ""
        evidence = io.dicom_file_evidence(path) if path and os.path.isfile(path) else []
        return [not_flair_warning(evidence, "its DICOM header")] if evidence else []
    storage = volumeNode.GetStorageNode()
    path = storage.GetFullNameFromFileName() if storage is not None else ""
    return image_file_warnings(Path(path)) if path and os.path.isfile(path) else []


def dicomSourceFiles(volumeNode) -> list[str]:
    """The files of the DICOM series Slicer's DICOM module loaded the volume from: its instance UIDs (the volume's
    "DICOM.instanceUIDs" attribute) found in Slicer's DICOM database (`slicer.dicomDatabase.fileForInstance`). Refused,
    saying why, where the volume did not come from DICOM or its files are no longer in the database."""
    name = volumeNode.GetName()
    uids = (volumeNode.GetAttribute("DICOM.instanceUIDs") or "").split()
    if not uids:
        raise DeepWMLError(f"'{name}' was not loaded from DICOM (Slicer's DICOM module), so it has no patient or study "
                           "to write a DICOM SEG into; load the FLAIR's DICOM series with the DICOM module and segment "
                           "that volume, or save the segmentation as .seg.nrrd")
    database = getattr(slicer, "dicomDatabase", None)
    if database is None:
        raise DeepWMLError(f"Slicer's DICOM database is not open, so the DICOM files '{name}' was loaded from cannot be "
                           "found; open it in the DICOM module")
    files = [database.fileForInstance(uid) or "" for uid in uids]
    missing = sum(1 for path in files if not path or not os.path.isfile(path))
    if missing:
        raise DeepWMLError(f"the DICOM files '{name}' was loaded from are no longer in Slicer's DICOM database ({missing} "
                           f"of its {len(files)} images not found), so no DICOM SEG can name them; import its series "
                           "into the DICOM database again, load it from there and segment that volume")
    return files


def _linkOrCopy(source: str, target: Path) -> None:
    """`target` a link to `source` (a symbolic one, else a hard one), else a copy (Windows without the right to make
    links, another drive)."""
    for link in (os.symlink, os.link):
        try:
            link(os.path.abspath(source), target)
            return
        except (OSError, NotImplementedError):
            pass
    shutil.copyfile(source, target)


class BackgroundJob:
    """Work for a worker thread that only ever sees SimpleITK images (MRML nodes are touched on the main thread
    alone), which the GUI polls (`done`, `fraction`, `message`) and may `cancel()`: `start()` runs `run()` in a
    thread, or `run()` runs it in the calling thread. `kind` tells the GUI which finishing it needs."""

    kind = ""
    threadName = "DeepWML job"
    # what the scene's nodes (and the GUI's call-backs) are held as: never read by the worker, let go of by drop()
    heldNodes = ("volumeNode",)
    # a cancelled job still running in the background, in a refusal of another (DeepWMLCoreLogic.refuseWhileEnding)
    stillEnding = "the job cancelled just now is still ending"

    def __init__(self, volumeNode, image, progress=None, cancel=None):
        self.volumeNode = volumeNode
        self.image = image
        self.result = None
        self.error = None
        self.fraction = 0.0
        self.message = "starting"
        self._progress = progress
        self._cancel = cancel
        self._cancelRequested = False
        self._finished = threading.Event()

    def start(self) -> "BackgroundJob":
        threading.Thread(target=self.run, name=self.threadName, daemon=True).start()
        return self

    def run(self) -> None:
        raise NotImplementedError

    def _report(self, fraction: float, message: str) -> None:
        self.fraction, self.message = float(fraction), message
        if self._progress is not None:
            self._progress(self.fraction, message)

    def cancel(self) -> None:
        self._cancelRequested = True

    def drop(self) -> None:
        """Cancel, and let go of the nodes now, on the calling (main) thread: a job the GUI no longer waits for is
        released wherever its last reference goes (the worker thread's end, or the cyclic garbage collector in any
        thread), and a node removed from the scene meanwhile would be destroyed there, MRML events and all. The
        worker never reads them (`heldNodes`)."""
        self.cancel()
        for name in self.heldNodes:
            setattr(self, name, None)

    def cancelRequested(self) -> bool:
        return self._cancelRequested or bool(self._cancel is not None and self._cancel())

    @property
    def done(self) -> bool:
        return self._finished.is_set()

    @property
    def cancelled(self) -> bool:
        """Cancelled, also when cancel() came after the run's last look or once it had ended: Cancel (or
        closing the scene) leaves the scene as it was, whatever the run got to, as a worker process does."""
        return self._cancelRequested or isinstance(self.error, Cancelled)

    def wait(self, timeout: float | None = None) -> bool:
        return self._finished.wait(timeout)


class SegmentationJob(BackgroundJob):
    """One inference run (a BackgroundJob). Its progress stops short of 1.0 (SEGMENTED_FRACTION):
    finishSegmentation reports 1.0 once the result is in the scene."""

    kind = "segmentation"
    threadName = "DeepWML inference"
    heldNodes = ("volumeNode", "outputNode")
    stillEnding = ("the segmentation cancelled just now is still ending (it stops at its next slice, or after its "
                   "post-processing: seconds)")

    def __init__(self, volumeNode, image, modelPaths=None, device="auto", threshold=None, tta=False,
                 progress=None, cancel=None, brainMask=True, location=True, precision="auto", gridPhases=1):
        from DeepWMLLib.inference import check_grid_phases

        check_grid_phases(gridPhases)  # refused now, not once a worker has loaded the models
        super().__init__(volumeNode, image, progress, cancel)
        # the frame of a sequence (4D or multi-frame series) the volume showed as `image` was read from it, or None:
        # finishing puts the result back on that frame, whichever the browser shows by then (mrml.showFrame)
        self.frame = mrml.sequenceFrame(volumeNode)
        # what the volume's DICOM header or the files beside its file say against its being a FLAIR (read now, on the
        # main thread: the run's warnings carry them first)
        self.sourceWarnings = sourceWarnings(volumeNode)
        self.notes = []  # what finishing has to say beside the result (the browser moved back to the frame segmented)
        self.modelPaths = list(modelPaths) if modelPaths else None
        self.device = device
        self.precision = precision  # as deepwml segment --precision: auto, fp32 or bf16
        self.threshold = threshold
        self.tta = tta
        self.brainMask = brainMask  # gate with the shipped brain-mask model (when one is shipped); it runs either way
        # the periventricular/deep split: True with the shipped default ventricle model (when the registry
        # marks one default), a ventricle model file's path, or False for none
        self.location = location
        self.gridPhases = gridPhases  # as deepwml segment --grid-phases: 1, or 4 for steadier marks (4 times slower)
        self.outputNode = None  # the segmentation node the GUI finishes the job into (None: a new one)

    def segmentOptions(self) -> dict:
        """segment_image's keyword arguments for this run, in a thread or a worker process alike."""
        return dict(device=self.device, **segmentImageOptions(self.threshold, self.tta, self.brainMask, self.location,
                                                              self.precision, self.gridPhases))

    def run(self) -> None:
        try:
            from DeepWMLLib.inference import progress_part
            from DeepWMLLib.segment import load_models, segment_image

            self._report(0.0, "loading the model")
            models = load_models(self.modelPaths)
            self._report(0.0, "segmenting")
            self.result = _handedBack(segment_image(self.image, models,
                                                   progress=progress_part(self._report, 0.0, SEGMENTED_FRACTION),
                                                   cancel=self.cancelRequested, **self.segmentOptions()))
            if self.cancelRequested():  # asked for after segment_image's last look (post-processing, report)
                self.result = None
                raise Cancelled("cancelled")
        except BaseException as exc:  # handed over to the main thread by finishSegmentation
            self.error = exc
        finally:
            # the scan's copy (a float64 volume's: 8 bytes a voxel) is not held while the result is put in the scene
            self.image = None
            self._finished.set()


class SplitJob(BackgroundJob):
    """The ventricle and brain networks of the periventricular/deep split of a segmentation without its own
    'Lateral ventricles' segment (`segment.location_inputs` on the volume: seconds to tens of seconds on a large
    scan on the CPU), run in a worker thread as a segmentation runs, so that the panel shows their progress, stays
    usable and can cancel them (`startSplit`; `finishSplit` keeps their work for the statistics). `key`: what the
    work is kept by (`_locationKey`)."""

    kind = "split"
    threadName = "DeepWML split"
    heldNodes = ("volumeNode", "nodes", "again")  # the last two: the GUI's (the statistics of the click)
    stillEnding = ("the periventricular/deep split cancelled just now is still ending (its networks stop at their next "
                   "slice: seconds)")

    def __init__(self, volumeNode, image, ventricle, brain, device, brainMask, precision, key):
        super().__init__(volumeNode, image)
        self.ventricle, self.brain = ventricle, brain
        self.device, self.brainMask, self.precision = device, brainMask, precision
        self.key = key
        self.prefix = (f"Finding the lateral ventricles on '{volumeNode.GetName()}' for the periventricular/deep "
                       "split (the ventricle and brain networks, the first time for this volume)")

    def run(self) -> None:
        from DeepWMLLib.segment import location_inputs

        try:
            self._report(0.0, f"{self.prefix}...")
            inputs = location_inputs(self.image, self.ventricle, self.brain, device=self.device,
                                     precision=self.precision, brain_gate=self.brainMask, cancel=self.cancelRequested,
                                     progress=lambda fraction, message: self._report(fraction,
                                                                                     f"{self.prefix}: {message}"))
            if self.cancelRequested():  # asked for after the networks' last look: nothing is kept
                raise Cancelled("cancelled")
            inputs["ventricles"].setflags(write=False)  # read by every later update: never flipped in place
            self.result = inputs
        except BaseException as exc:  # handed over to the main thread by finishSplit
            self.error = exc
        finally:
            self.image = None
            self._finished.set()


class ChangeJob(BackgroundJob):
    """The lesion change between an earlier scan (baseline) and the follow-up (`DeepWMLLib.change.lesion_change`: two
    rigid registrations, tens of seconds each on a clinical pair) on copies of the scans and masks taken from the
    nodes on the main thread (`DeepWMLCoreLogic.startChange`), so that the panel shows the registrations and stays
    usable; `finishChange` makes the nodes on the main thread. A registration cannot be interrupted once it runs:
    cancel() takes effect when the one running ends (lesion_change's progress report), and a cancelled job's result
    is never put into the scene. `nodes`: (baseline volume, its segmentation, follow-up volume, its segmentation);
    `keys`: what each was when they were taken (`_changeInputKeys`), to tell on finishing that none changed since."""

    kind = "change"
    threadName = "DeepWML change"
    heldNodes = ("volumeNode", "nodes")
    stillEnding = ("the comparison cancelled just now is still ending its registration (it cannot be interrupted: up "
                   "to tens of seconds)")

    def __init__(self, nodes, images, masks, keys, progress=None, cancel=None):
        super().__init__(nodes[2], images[1], progress, cancel)
        self.nodes, self.images, self.masks, self.keys = tuple(nodes), tuple(images), tuple(masks), keys
        self.discarded = ""  # why finishChange kept nothing (an input edited, moved or deleted meanwhile)
        self._registrations = 0
        self.prefix = f"Lesion change of '{nodes[2].GetName()}' since '{nodes[0].GetName()}'"

    def _registered(self, message: str) -> None:
        """lesion_change's report as each registration ends: the progress bar's steps, and Cancel's chance."""
        if self.cancelRequested():  # the registration that was running when Cancel came has ended: no more
            raise Cancelled("cancelled")
        self._registrations += 1
        self._report(CHANGE_FRACTIONS[min(self._registrations, len(CHANGE_FRACTIONS)) - 1], f"{self.prefix}: {message}")

    def run(self) -> None:
        try:
            from DeepWMLLib import change

            self._report(0.0, f"{self.prefix}: registering the earlier scan to the follow-up (tens of seconds on a "
                              "clinical scan; then the other way round, to check it)...")
            (baseline, followup), (baselineMask, followupMask) = self.images, self.masks
            self.result = change.lesion_change(baseline, followup, baselineMask, followupMask, progress=self._registered)
            if self.cancelRequested():  # asked for after the last registration: nothing is kept
                self.result = None
                raise Cancelled("cancelled")
        except BaseException as exc:  # handed over to the main thread by finishChange
            self.error = exc
        finally:
            self.image = self.images = self.masks = None  # the scans' copies are not held while the nodes are made
            self._finished.set()


def _handedBack(result) -> types.SimpleNamespace:
    """What of segment_image's result finishSegmentation puts into the scene, as a worker process hands it back
    (DeepWMLLib.worker): the mask, the ventricles and the report. The probability map and the brain mask (5 bytes a
    voxel) were held by a job in a thread until it was let go: through finishing, and in the GUI the statistics."""
    return types.SimpleNamespace(mask=result.mask, ventricles=result.ventricles, report=result.report)


class ProcessSegmentationJob(SegmentationJob):
    """The same run in a separate Python process (`python -m DeepWMLLib.worker`; in Slicer its own
    PythonSlicer). A thread of Slicer's process gets Python's global lock only while Slicer's main thread
    lets it go; a process never waits for it. Cancel ends the process at once, and a runtime that crashes
    (out of memory, a driver) ends the run, not Slicer. The image goes to the process, and the mask,
    ventricles and report come back, as files in a private temporary folder that is removed at the end.
    `done`, `fraction` and `message` are brought up to date by `poll()`, which `done` calls."""

    def __init__(self, *args, python: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.python = python
        self._folder = None
        self._process = None
        self._log = None

    def start(self) -> "ProcessSegmentationJob":
        import DeepWMLLib

        sweepOrphanedJobFolders()
        self._folder = Path(tempfile.mkdtemp(prefix=JOB_FOLDER_PREFIX))  # readable by this user only: a scan
        try:
            (self._folder / "owner").write_text(str(os.getpid()), encoding="utf-8")
            write_pickled(self._folder / "job.pkl",
                          {"image": self.image, "model_paths": self.modelPaths, "options": self.segmentOptions()})
            self.image = None  # handed to the process: not held here through its run and the finishing
            environment = os.environ.copy()  # DeepWMLLib importable from where this one was imported
            root = str(Path(DeepWMLLib.__file__).resolve().parent.parent)
            environment["PYTHONPATH"] = os.pathsep.join(p for p in (root, environment.get("PYTHONPATH")) if p)
            self._log = open(self._folder / "log.txt", "wb")
            hidden = {"creationflags": subprocess.CREATE_NO_WINDOW} if os.name == "nt" else {}
            self._process = subprocess.Popen([self.python, "-m", "DeepWMLLib.worker", str(self._folder)],
                                             stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                                             env=environment, **hidden)
        except BaseException:
            self._cleanUp()
            raise
        self._report(0.0, "starting")
        return self

    def run(self) -> None:
        self.start()
        self.wait()

    def poll(self) -> None:
        """Read the worker's progress; when it has ended, collect its result or error (once)."""
        if self._finished.is_set() or self._folder is None:
            return
        try:
            progress = json.loads((self._folder / "progress.json").read_text(encoding="utf-8"))
            fraction = SEGMENTED_FRACTION * min(max(float(progress["fraction"]), 0.0), 1.0)
            if fraction != self.fraction or progress["message"] != self.message:
                self._report(fraction, str(progress["message"]))
        except (OSError, ValueError, KeyError, TypeError):
            pass  # not written yet
        code = self._process.poll()
        if code is None:
            return
        try:
            self._collect(code)
        finally:
            self._cleanUp()
            self._finished.set()

    def _collect(self, code: int) -> None:
        from DeepWMLLib.errors import Cancelled, DeepWMLError

        result, error = self._folder / "result.pkl", self._folder / "error.pkl"
        if self._cancelRequested:
            self.error = Cancelled("cancelled")
        elif result.is_file() or error.is_file():
            try:
                if result.is_file():
                    self.result = types.SimpleNamespace(**read_pickled(result))
                else:
                    self.error = read_pickled(error)
            except Exception as exc:  # another DeepWML or Python in the process than in Slicer?
                self.result = None
                self.error = DeepWMLError(f"the segmentation process's {'result' if result.is_file() else 'error'} "
                                          f"could not be read ({type(exc).__name__}: {exc})")
        else:
            self._log.flush()
            lines = (self._folder / "log.txt").read_text(encoding="utf-8", errors="replace").strip().splitlines()
            tail = " | ".join(lines[-LOG_LINES_SHOWN:])
            self.error = DeepWMLError(f"the segmentation process ended without a result (exit code {code}; too "
                                      f"little memory?)" + (f": {tail}" if tail else ""))

    def _cleanUp(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None

    @property
    def done(self) -> bool:
        self.poll()
        return self._finished.is_set()

    def cancel(self) -> None:
        """End the process and remove its folder now: the widget's clean-up (Slicer closing) polls no more."""
        self._cancelRequested = True
        if self._process is not None and self._process.poll() is None:
            self._process.kill()  # it writes only into its own temporary folder
            try:
                self._process.wait(CANCEL_WAIT_S)
            except subprocess.TimeoutExpired:
                pass  # removed by a later poll
        self.poll()  # the folder goes: a Python that PythonSlicer (a launcher) started stops when it sees that

    def wait(self, timeout: float | None = None) -> bool:
        if self._process is None:
            return self._finished.is_set()
        try:
            self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.poll()
            return False
        self.poll()
        return self._finished.is_set()


def sweepOrphanedJobFolders(folder=None) -> None:
    """Remove the job folders of worker processes whose owner (a Slicer that crashed) has gone: they
    hold a copy of a scan. A folder without an owner (being made, or not ours) is left alone."""
    from DeepWMLLib.worker import owner_of, process_exists

    for path in Path(folder or tempfile.gettempdir()).glob(JOB_FOLDER_PREFIX + "*"):
        owner = owner_of(path)
        if owner is not None and not process_exists(owner):
            shutil.rmtree(path, ignore_errors=True)


def workerPython() -> str | None:
    """The Python that runs a GUI segmentation in a process of its own: Slicer's PythonSlicer, which
    Slicer puts on PATH. None (a worker thread instead) outside Slicer, without it, or when the
    environment variable DEEPWML_IN_PROCESS is 1, true, yes or on."""
    if os.environ.get(IN_PROCESS_VARIABLE, "").strip().lower() in ("1", "true", "yes", "on"):
        return None
    if getattr(slicer, "app", None) is None:
        return None
    return shutil.which("PythonSlicer")


def checkInputVolume(volumeNode) -> None:
    """A volume node to segment: not a labelmap (a mask is no scan; vector images are refused on reading)."""
    if volumeNode is None:
        raise DeepWMLError("choose a FLAIR volume to segment")
    if volumeNode.IsA("vtkMRMLLabelMapVolumeNode"):
        raise DeepWMLError(f"'{volumeNode.GetName()}' is a labelmap (a mask), not a FLAIR scan")


# on the `slicer` module: the list of startedJobs()
STARTED_JOBS_ATTRIBUTE = "_deepWMLStartedJobs"


def startedJobs() -> list:
    """Weak references to the jobs started (startSegmentation, startSplit, startChange) by every DeepWMLCoreLogic of
    this process, alive or gone: one cancelled but still running in the background (a registration cannot be
    interrupted; the GUI no longer waits for a dropped job) refuses another of any kind until it ends
    (refuseWhileEnding), whichever logic started it. Kept on the `slicer` module, which outlives the developer's
    Reload (a new widget and logic, DeepWML.py and maybe this file loaded again) and a second logic alike. Plain weak
    references, pruned on the main thread: a WeakSet drops a member from the thread its last reference goes in (a
    dropped job's worker), which can change the set while the main thread walks it."""
    started = getattr(slicer, STARTED_JOBS_ATTRIBUTE, None)
    if started is None:
        started = []
        setattr(slicer, STARTED_JOBS_ATTRIBUTE, started)
    return started


class DeepWMLCoreLogic:
    def __init__(self):
        self.interactive = False
        self.workerPython = "auto"  # startSegmentation's worker process: see there
        self._locationInputs = None  # (what they depend on, segment.location_inputs of a volume): _volumeLocationInputs

    # -----------------------------------------------------------------------------------------
    # Dependencies

    def ensureDependencies(self, torch: bool = True) -> None:
        """Make sure PyTorch (when `torch`) and the pip packages DeepWMLLib needs are importable."""
        if torch and importlib.util.find_spec("torch") is None:
            self._installTorch()
        missing = [requirement for module, requirement in PIP_PACKAGES.items()
                   if importlib.util.find_spec(module) is None]
        if not missing:
            return
        names = " ".join(missing)
        if not self.interactive:
            raise DeepWMLError(f"the Python packages {names} are missing; install them in Slicer's Python console "
                               f"with slicer.util.pip_install('{names}') or run the DeepWML module once")
        if not slicer.util.confirmOkCancelDisplay(
                f"DeepWML needs the Python packages {names}. Install them now? This needs an internet connection."):
            raise DeepWMLError(f"DeepWML cannot run without {names}")
        try:
            slicer.util.pip_install(names)
        except Exception as exc:  # pip fails in many ways (network, proxy, permissions)
            raise DeepWMLError(f"installing {names} failed ({exc}); check the internet connection, or run "
                               f"slicer.util.pip_install('{names}') in the Python console to see the details") from exc
        importlib.invalidate_caches()

    def _installTorch(self) -> None:
        try:
            import PyTorchUtils
        except ImportError as exc:
            raise DeepWMLError("DeepWML needs PyTorch: install the 'PyTorch' extension from the Extensions Manager, "
                               "restart Slicer and try again") from exc
        if not self.interactive:
            raise DeepWMLError("PyTorch is not installed yet: open the PyTorch Utils module and install it, or run "
                               "the DeepWML module once")
        try:
            torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=True)
        except Exception as exc:  # download or pip failure inside PyTorch Utils
            raise DeepWMLError(f"installing PyTorch failed ({exc}); open the PyTorch Utils module to install it "
                               "by hand") from exc
        if torch is None:
            raise DeepWMLError("DeepWML cannot run without PyTorch (installation declined or failed; "
                               "see the PyTorch Utils module)")

    def deviceNote(self, device: str, precision: str = "auto") -> str:
        """A line for the GUI when the chosen device will not be a GPU, or when the chosen Precision cannot run
        where the run would go (bf16 on a GPU, or on a CPU that does not compute it natively): said before
        Segment WMH is pressed, not only when the run fails (precisionAdvice)."""
        if importlib.util.find_spec("torch") is None:
            return "PyTorch will be installed on first use."
        import torch

        gpu = torch.cuda.is_available()
        notes = []
        if device == "cuda" and not gpu:
            notes.append("No usable GPU here: choose auto or cpu.")
        elif device == "auto" and not gpu:
            notes.append("No usable GPU: segmentation runs on the CPU (slower).")
        if precision == "bf16":
            notes.append(self.bf16Refusal(device))
        return " ".join(note for note in notes if note)

    @staticmethod
    def bf16Refusal(device: str) -> str:
        """Why a run on `device` would refuse Precision bf16 (inference.PrecisionUnavailable: on a GPU, or on a CPU
        that does not compute it natively), in the panel's words; "" where it runs, or cannot be told yet (PyTorch
        not installed, or `cuda` without a GPU, which the device note refuses itself). The panel offers bf16 only
        where this is "" (precisionAdvice: the same refusal, said when the run starts)."""
        if importlib.util.find_spec("torch") is None:
            return ""
        import torch

        gpu = torch.cuda.is_available()
        if device == "cuda" and not gpu:
            return ""
        if device != "cpu" and gpu:
            return "Precision bf16 is for the CPU: on a GPU choose Precision auto (fp16) or fp32."
        from DeepWMLLib.inference import cpu_computes_bf16

        if not cpu_computes_bf16():  # the module's runs take the auto backend: OpenVINO where installed
            return "This CPU does not compute bf16 natively (AMX or AVX512-BF16): choose Precision auto or fp32."
        return ""

    # -----------------------------------------------------------------------------------------
    # Models

    def shippedModels(self) -> list[dict]:
        from DeepWMLLib.segment import shipped_models

        return shipped_models()

    def shippedEnsembles(self) -> list[dict]:
        """The named ensembles of shipped models the model card measured (models.json "ensembles")."""
        from DeepWMLLib.segment import shipped_ensembles

        return shipped_ensembles()

    def defaultEnsembleChoice(self) -> str | None:
        """The selector's name for the shipped default when it is an ensemble (several models marked
        default, probabilities averaged as `deepwml segment` does by default); None for one model."""
        defaults = [entry["name"] for entry in self.shippedModels() if entry.get("default")]
        return f"default ensemble ({' + '.join(defaults)})" if len(defaults) > 1 else None

    def modelChoices(self) -> list[tuple[str, str]]:
        """(name, description) for the model selector: the shipped default first (the ensemble of the
        default models when there are several, then each of them), the registry's named ensembles (their
        description gives their measured accuracy), the other models, then MODEL_FILE_CHOICE for a model
        file of the user's."""
        entries = self.shippedModels()
        ensemble = self.defaultEnsembleChoice()
        first = [(ensemble, "The shipped default: these models' probabilities averaged")] if ensemble else []
        first += [(entry["name"], entry.get("description", "")) for entry in entries if entry.get("default")]
        return first + [(entry["name"], entry.get("description", "")) for entry in self.shippedEnsembles()] + \
            [(entry["name"], entry.get("description", "")) for entry in entries if not entry.get("default")] + \
            [(MODEL_FILE_CHOICE, "A DeepWML model file (.pt) of your own")]

    def savedModelChoice(self, modelName: str) -> tuple[str | None, str]:
        """For a model name saved with a scene that the selector does not offer: the choice that runs the same
        models (a default ensemble of an older version, "default ensemble (a + b ...)", that the registry names
        now), or None for the shipped default, and the words that tell the user."""
        found = re.fullmatch(r"default ensemble \((.+)\)", modelName)
        try:
            ensembles = self.shippedEnsembles() if found else []
        except Exception:  # an unreadable registry: the default, as for any other name
            ensembles = []
        for entry in ensembles:
            if sorted(entry["members"]) == sorted(found.group(1).split(" + ")):
                return entry["name"], (f"The scene's model, '{modelName}' (an older version's default), is "
                                       f"'{entry['name']}' now; it is selected.")
        return None, (f"The model '{modelName}' saved with the scene is not shipped with this version; the default "
                      "model is selected.")

    def forgetAllModelsEnsemble(self, parameterNode) -> str:
        """A scene saved by a version with the checkbox 'Ensemble of all shipped models' holds its parameter, which
        this version no longer reads: removed here (quietly: no update of the GUI), and the words that tell the user
        when it was ticked (Segment WMH runs the model selected, not that average); else ''."""
        names = parameterNode.GetParameterNames()
        if ALL_MODELS_PARAMETER not in names:
            return ""
        ticked = parameterNode.GetParameter(ALL_MODELS_PARAMETER) == "True"
        quiet = parameterNode.GetDisableModifiedEvent()
        parameterNode.SetDisableModifiedEvent(1)
        try:
            parameterNode.UnsetParameter(ALL_MODELS_PARAMETER)
        finally:
            parameterNode.SetDisableModifiedEvent(quiet)
        if not ticked:
            return ""
        try:
            measured = ", ".join(entry["name"] for entry in self.shippedEnsembles())
        except Exception:
            measured = ""
        return ("The scene was saved with 'Ensemble of all shipped models' ticked, which this version does not have "
                "(an average of every shipped model, never measured): Segment WMH runs the model selected"
                + (f"; the ensembles the model card measured are in the list ({measured})." if measured else "."))

    def ventricleModelPath(self) -> str | None:
        """The lateral-ventricle model the GUI's periventricular/deep option runs: the registry's default
        one, else the shipped opt-in one (`deepwml segment --ventricle-model`); None when none is shipped."""
        from DeepWMLLib.segment import VENTRICLE_ROLE, shipped_models

        entries = sorted(shipped_models(VENTRICLE_ROLE), key=lambda entry: not entry.get("default"))
        return entries[0]["path"] if entries else None

    def locationChoice(self, split: bool):
        """`location` for startSegmentation from the GUI's periventricular/deep checkbox: the ventricle
        model file when it is ticked, else False (no split)."""
        if not split:
            return False
        path = self.ventricleModelPath()
        if path is None or not Path(path).is_file():
            raise DeepWMLError("the periventricular/deep split needs a lateral-ventricle model and none is shipped "
                               "here; untick it, or run deepwml segment --ventricle-model FILE")
        return path

    def modelPaths(self, modelName: str = "", modelFile=None) -> list[str] | None:
        """Model files for a GUI choice (a shipped model's or named ensemble's name, MODEL_FILE_CHOICE with
        `modelFile`); None (no name) means the shipped default model."""
        if modelName == MODEL_FILE_CHOICE:
            if not modelFile or not Path(modelFile).is_file():
                raise DeepWMLError("choose a DeepWML model file (.pt) or pick a shipped model")
            return [str(modelFile)]
        if modelName and modelName == self.defaultEnsembleChoice():
            return [entry["path"] for entry in self.shippedModels() if entry.get("default")]
        if modelName:
            for entry in self.shippedModels():
                if entry["name"] == modelName:
                    return [entry["path"]]
            for entry in self.shippedEnsembles():
                if entry["name"] == modelName:
                    return list(entry["paths"])
            raise DeepWMLError(f"no shipped model named '{modelName}'")
        return None

    # -----------------------------------------------------------------------------------------
    # Segmentation

    def startSegmentation(self, volumeNode, device="auto", modelPaths=None, threshold=None,
                          tta=False, brainMask=True, location=True, precision="auto", gridPhases=1) -> SegmentationJob:
        """Start segmenting in a worker process (`self.workerPython`: "auto" for workerPython(), a Python
        executable, or None) or else a worker thread; poll `job.done`, then call finishSegmentation(job).
        `precision` is deepwml segment's --precision (PRECISION_CHOICES), `gridPhases` its --grid-phases (1 or 4)."""
        self.ensureDependencies()
        checkInputVolume(volumeNode)
        self.refuseWhileEnding("segment")
        python = workerPython() if self.workerPython == "auto" else self.workerPython
        image = mrml.imageFromVolume(volumeNode)
        if python:
            return self._start(ProcessSegmentationJob(volumeNode, image, modelPaths, device, threshold, tta,
                                                      brainMask=brainMask, location=location, precision=precision,
                                                      gridPhases=gridPhases, python=python))
        return self._start(SegmentationJob(volumeNode, image, modelPaths, device, threshold, tta, brainMask=brainMask,
                                           location=location, precision=precision, gridPhases=gridPhases))

    def _start(self, job: BackgroundJob) -> BackgroundJob:
        """Start `job`, known as started while it is alive (refuseWhileEnding)."""
        job.start()
        started = startedJobs()
        started[:] = [ref for ref in started if ref() is not None] + [weakref.ref(job)]
        return job

    def refuseWhileEnding(self, then: str, otherwise: str = "") -> None:
        """Refuse (DeepWMLError, saying why and to `then` once it has ended, or `otherwise` now) a new job while one
        started before was cancelled but still runs in the background: a registration cannot be interrupted (tens of
        seconds), and the GUI no longer waits for a dropped job; a segmentation or the split's networks in a thread
        stop at their next slice. The two would share the CPU, the user told nothing; one kind or another alike."""
        for job in [ref() for ref in startedJobs()]:
            if job is not None and job.cancelled and not job.done:
                raise DeepWMLError(f"{job.stillEnding}: {then} once it has"
                                   + (f", or {otherwise}" if otherwise else ""))

    def segmentVolume(self, volumeNode, device="auto", modelPaths=None, threshold=None, tta=False, progress=None,
                      cancel=None, segmentationNode=None, brainMask=True, location=True, precision="auto",
                      gridPhases=1):
        """Segment WMH in a volume node; returns a segmentation node with the segment 'WMH' and, with a
        ventricle model (`location`: a model file, or True for the registry's default one if it marks one),
        the hidden segment 'Lateral ventricles' that the periventricular/deep split is measured from
        (lesionStatistics).

        `progress(fraction, message)` and `cancel()` are called in this thread; when cancel() returns
        True, DeepWMLLib.errors.Cancelled is raised and the scene is left as it was.
        """
        self.ensureDependencies()
        checkInputVolume(volumeNode)
        mrml.checkMaskTarget(segmentationNode)  # refused now, not after the run
        job = SegmentationJob(volumeNode, mrml.imageFromVolume(volumeNode), modelPaths, device, threshold, tta,
                              progress, cancel, brainMask, location, precision, gridPhases)
        job.run()
        return self.finishSegmentation(job, segmentationNode)

    @staticmethod
    def plannedSettings(modelPaths=None, threshold=None, tta=False, brainMask=True, location=True, precision="auto",
                        gridPhases=1) -> dict:
        """The result settings (DeepWMLLib.segment.RESULT_SETTINGS) that segmentVolume, given these, records: those
        a result made before must share to be done already, as deepwml segment compares them (the batch script)."""
        from DeepWMLLib.segment import planned_settings

        return planned_settings(modelPaths, **segmentImageOptions(threshold, tta, brainMask, location, precision,
                                                                   gridPhases))

    def finishSegmentation(self, job: SegmentationJob, segmentationNode=None):
        """Put a finished job's mask into a segmentation node (a new one named after the volume)."""
        if not job.done:
            raise RuntimeError("finishSegmentation called before the job finished")
        if job.cancelled and not isinstance(job.error, Cancelled):
            raise Cancelled("cancelled")
        if job.error is not None:
            from DeepWMLLib.inference import NaNProbabilities, PrecisionUnavailable

            if isinstance(job.error, NaNProbabilities):  # its advice names deepwml segment's option (--precision)
                raise DeepWMLError(nanAdvice(job.error)) from job.error
            if isinstance(job.error, PrecisionUnavailable):  # so do its words (--precision bf16)
                raise DeepWMLError(precisionAdvice(job.error)) from job.error
            raise job.error
        volumeNode = job.volumeNode
        if volumeNode.GetScene() is None:
            raise DeepWMLError("the volume was removed from the scene while it was being segmented")
        if segmentationNode is not None and segmentationNode.GetScene() is None:
            segmentationNode = None  # the chosen output was deleted during the run: a new node, not a detached one
        # a frame of a sequence: the browser back on the frame segmented (moved meanwhile: the proxy node holds
        # another frame's voxels), or refused when that frame is gone, before anything is written
        moved = mrml.showFrame(job.frame, volumeNode) if job.frame is not None else None
        # a new node's name is the scene's only one: a second result kept beside the first (another model or
        # threshold) is told apart in the reference and rater selectors, which show names alone
        mask = _shownNow(job.result.mask, volumeNode)  # first: refused, the scene is left as it was
        ventricles = None if job.result.ventricles is None else _shownNow(job.result.ventricles, volumeNode)
        segmentationNode = mrml.segmentationFromMask(
            mask, volumeNode, segmentationNode,
            name=None if segmentationNode is not None else mrml.freeNodeName(
                f"{volumeNode.GetName()} WMH" + (f" ({job.frame['label']})" if job.frame is not None else "")))
        segmentation = segmentationNode.GetSegmentation()
        if ventricles is not None:  # replaces an earlier run's; without a new one, one there (perhaps
            mrml.segmentationFromMask(ventricles, volumeNode, segmentationNode,  # edited) is kept
                                      segmentName=mrml.VENTRICLE_SEGMENT_NAME, color=mrml.VENTRICLE_COLOR)
            display = segmentationNode.GetDisplayNode()
            if display is not None:  # hidden: shown to check the split, from the Segmentations module
                display.SetSegmentVisibility(segmentation.GetSegmentIdBySegmentName(mrml.VENTRICLE_SEGMENT_NAME), False)
        run = {key: job.result.report[key] for key in RUN_KEYS if key in job.result.report}
        location = job.result.report.get("location") or {}
        # lesionStatistics measures the split again from the segments as they are: the model goes back into its
        # `location`, and the run's "no split" warning is not kept (the ventricles may be drawn in later)
        run.update({key: location[key] for key in ("ventricle_model", "ventricle_model_sha256") if key in location})
        run["warnings"] = [*job.sourceWarnings, *(w for w in run.get("warnings", []) if w != location.get("why"))]
        if job.frame is not None:  # which frame of the series the result is of, with the result (and its saved report)
            run["frame"] = {key: job.frame[key] for key in ("label", "item", "sequence", "browser_name")}
        segmentationNode.SetAttribute(RUN_ATTRIBUTE, json.dumps(run))
        segmentationNode.SetNodeReferenceID(mrml.SOURCE_VOLUME_ROLE, volumeNode.GetID())
        for name in [mrml.WMH_SEGMENT_NAME] + ([mrml.VENTRICLE_SEGMENT_NAME] if job.result.ventricles is not None else []):
            segmentationNode.SetAttribute(DIGEST_ATTRIBUTES[name], _segmentDigest(segmentationNode, volumeNode, name))
        job.notes = [moved] if moved else []
        job._report(1.0, "done")
        return segmentationNode

    @staticmethod
    def rerunLoses(segmentationNode, volumeNode, ventricles: bool = False) -> str | None:
        """Why segmenting `volumeNode` into `segmentationNode` would lose work, or None: its WMH segment (and,
        when the run finds the `ventricles`, its ventricle segment), which a run replaces, was edited (or moved
        against the volume) since DeepWML wrote it, or was not written by DeepWML."""
        if segmentationNode is None or segmentationNode.GetScene() is None:
            return None
        for name in [mrml.WMH_SEGMENT_NAME] + ([mrml.VENTRICLE_SEGMENT_NAME] if ventricles else []):
            if not segmentationNode.GetSegmentation().GetSegmentIdBySegmentName(name):
                continue
            written = segmentationNode.GetAttribute(DIGEST_ATTRIBUTES[name])
            segment = f"The segment {name} of '{segmentationNode.GetName()}'"
            if written is None:
                return f"{segment} was not made by this version of DeepWML"
            if written != _segmentDigest(segmentationNode, volumeNode, name):
                # its voxels on the volume's grid: changed by a hand edit, or by a transform moving one of them
                return f"{segment} was edited, or moved against its volume, since DeepWML made it"
        return None

    @staticmethod
    def outputFor(segmentationNode, volumeNode):
        """The segmentation node a run on `volumeNode` should write into: the one chosen, unless it is
        DeepWML's result for another volume (then None: a new node), which a rerun must neither overwrite
        nor lend its ventricles to. One holding closed surfaces is refused (mrml.checkMaskTarget)."""
        if segmentationNode is None or segmentationNode.GetScene() is None:
            return None
        source = segmentationNode.GetNodeReference(mrml.SOURCE_VOLUME_ROLE)
        if source is not None and source is not volumeNode:
            return None
        if source is not None and _resultFrame(segmentationNode) != _frameOf(volumeNode):
            return None  # the result of another frame of the same series (a sequence's proxy node)
        mrml.checkMaskTarget(segmentationNode)  # before the run
        return segmentationNode

    @staticmethod
    def describeRun(report: dict) -> str:
        """The status line after a segmentation: done, and what the brain mask left out."""
        if not report.get("brain_model"):
            return "Done (no brain mask)."
        from DeepWMLLib.segment import BRAIN_MASK_NOT_APPLIED

        if report.get("brain_mask") == BRAIN_MASK_NOT_APPLIED:
            return "Done (brain mask used for the checks, not applied to the marks)."
        return f"Done. {report.get('outside_brain_removed_ml', 0):.2f} ml marked outside the brain ignored (brain mask)."

    # -----------------------------------------------------------------------------------------
    # Results

    def lesionStatistics(self, segmentationNode, volumeNode, segmentId=None, ventricleModel=None, device="auto",
                         brainMask=True, precision="auto", progress=None) -> dict:
        """Lesion report of a segmentation on the volume's grid: volume_ml, lesion_count, slices, lesions,
        plus the facts of the DeepWML run that made it (model, device, seconds...) when there was one.
        When the segmentation also has a 'Lateral ventricles' segment (DeepWML adds it), `location` holds
        the periventricular/deep split measured from it as it is now (edits to either segment count) and
        each lesion its distance to the ventricles. Without one (a manual segmentation, a label map, a result
        made without the split), `ventricleModel` (a ventricle model file; True: the panel's, `ventricleModelPath`,
        looked for only here, where it is needed; None: none) makes the split as
        `deepwml export --ventricle-model` makes it for a mask given (`segment.mask_location`: the ventricle and
        brain networks on the volume, on `device` in `precision`; `brainMask` False: the ventricles not kept inside
        the brain mask, export's --no-brain-mask), with export's `intracranial_ml`, `brain_model`, `brain_mask`
        and warnings of the split where the segmentation's run does not record its own; else `location` is None.
        The networks' work is kept for the next statistics of the same unchanged volume (`_volumeLocationInputs`);
        `progress(message)` is called before they run (seconds: the GUI says why it waits)."""
        self.ensureDependencies(torch=False)
        from DeepWMLLib.location import locate_images
        from DeepWMLLib.report import lesion_report

        mask = mrml.maskFromNode(segmentationNode, volumeNode, segmentId)
        location = distance = split = None
        isSegmentation = segmentationNode.IsA("vtkMRMLSegmentationNode")
        ventricleId = segmentationNode.GetSegmentation().GetSegmentIdBySegmentName(mrml.VENTRICLE_SEGMENT_NAME) \
            if isSegmentation else ""
        if ventricleId and ventricleId not in mrml.segmentIds(segmentationNode, segmentId):
            ventricles = mrml.maskFromSegmentation(segmentationNode, volumeNode, mrml.VENTRICLE_SEGMENT_NAME)
            location, distance = locate_images(mask, ventricles)
            location["ventricles"] = f"segment '{mrml.VENTRICLE_SEGMENT_NAME}' of '{segmentationNode.GetName()}'"
        elif ventricleModel and not ventricleId:  # the ventricle segment itself measured: no split, as above
            self.ensureDependencies()  # the networks run
            from DeepWMLLib.export import BRAIN_MASK_GATES_VENTRICLES, BRAIN_MASK_NOT_APPLIED
            from DeepWMLLib.segment import mask_location

            ventricleModel = self._ventricleModelFile(segmentationNode, ventricleModel)
            inputs = self._volumeLocationInputs(volumeNode, ventricleModel, device, brainMask, precision, progress)
            split = mask_location(None, mask, inputs=inputs)
            location, distance = split["location"], split["distance"]
            split["brain_mask"] = None if split["brain_model"] is None else (
                BRAIN_MASK_GATES_VENTRICLES if brainMask else BRAIN_MASK_NOT_APPLIED)
            # how its networks ran, with the split itself: the report's device, runner and brain_mask are those of
            # the run that made a DeepWML segmentation (perhaps on another device), not of this split
            made = [f"{split['device']}", f"{split['runner']}", f"precision {precision}",
                    "no brain model" if split["brain_model"] is None else f"brain mask {split['brain_mask']}"]
            location["ventricles"] = (f"the ventricle network on '{volumeNode.GetName()}' (as deepwml export makes "
                                      f"them; {', '.join(made)})")
        report = lesion_report(mask, None, distance)
        report["location"] = location
        # e.g. a segment added beside WMH while editing it; another volume's result, still chosen when this one was
        notes = (mrml.maskNotes(segmentationNode, segmentId) + mrml.drawnOnNote(segmentationNode, volumeNode)
                 + mrml.outsideNote(segmentationNode, volumeNode, "the lesion volume", segmentId))
        run = segmentationNode.GetAttribute(RUN_ATTRIBUTE) if isSegmentation else None
        if run:
            facts = json.loads(run)
            model = {key: facts.pop(key) for key in ("ventricle_model", "ventricle_model_sha256") if key in facts}
            if location is not None and split is None:  # the model that made the segment (a split made here names its own)
                location.update(model)
            report.update(facts)
        if split is not None:  # what the split's networks found, where the run that made the segmentation says nothing
            for key in ("intracranial_ml", "brain_model", "brain_model_sha256", "brain_mask", "device", "runner"):
                report.setdefault(key, split[key])
            report["warnings"] = list(report.get("warnings", [])) + split["warnings"]
        if notes:
            report["warnings"] = list(report.get("warnings", [])) + notes
        report.update(segmentation=segmentationNode.GetName(), volume=volumeNode.GetName())
        return report

    def _ventricleModelFile(self, segmentationNode, ventricleModel):
        """The ventricle model file of lesionStatistics' `ventricleModel` (True: the panel's), refused where none is."""
        if ventricleModel is True:
            ventricleModel = self.ventricleModelPath()
            if ventricleModel is None or not Path(ventricleModel).is_file():
                name = segmentationNode.GetName() if segmentationNode is not None else "the segmentation"
                raise DeepWMLError(
                    f"the periventricular/deep split of '{name}' (no '{mrml.VENTRICLE_SEGMENT_NAME}' segment) needs a "
                    "lateral-ventricle model and none is shipped here; untick the split, or measure the mask with "
                    "deepwml export --ventricle-model FILE")
        return ventricleModel

    @staticmethod
    def _splitNeedsNetworks(segmentationNode, ventricleModel) -> bool:
        """Whether lesionStatistics with these arguments makes the split with the networks (a ventricle model asked
        for, and no 'Lateral ventricles' segment to measure it from)."""
        if not ventricleModel or segmentationNode is None:
            return False
        if not segmentationNode.IsA("vtkMRMLSegmentationNode"):
            return True
        return not segmentationNode.GetSegmentation().GetSegmentIdBySegmentName(mrml.VENTRICLE_SEGMENT_NAME)

    @staticmethod
    def _locationKey(volumeNode, ventricle, brain, device, brainMask, precision):
        """What the networks' work for a volume is kept by (`_volumeLocationInputs`); None for a volume without voxels."""
        imageData = volumeNode.GetImageData()
        return None if imageData is None else (
            volumeNode.GetID(), imageData.GetMTime(), tuple(map(tuple, mrml.worldIJKToRAS(volumeNode).tolist())),
            ventricle.path, ventricle.digest, None if brain is None else (brain.path, brain.digest), device,
            bool(brainMask), precision)

    def _splitModels(self, volumeNode, ventricleModel, device, brainMask, precision):
        """(ventricle model, brain model, key, whether their work is kept) of a split made by the networks."""
        from DeepWMLLib.segment import load_brain_model, load_ventricle_model

        ventricle, brain = load_ventricle_model(ventricleModel), load_brain_model("default")  # settings only: fast
        key = self._locationKey(volumeNode, ventricle, brain, device, brainMask, precision)
        kept = key is not None and self._locationInputs is not None and self._locationInputs[0] == key
        return ventricle, brain, key, kept

    def startSplit(self, segmentationNode, volumeNode, segmentId=None, ventricleModel=None, device="auto",
                   brainMask=True, precision="auto", busy: bool = False) -> SplitJob | None:
        """For the GUI: lesionStatistics with these arguments without the main thread running networks. None where
        it runs none (no split asked for, a 'Lateral ventricles' segment to measure it from, or their work kept for
        this volume and these settings): call lesionStatistics now. Else a started SplitJob running them in a worker
        thread: poll `job.done`, then finishSplit(job) keeps their work, and lesionStatistics with the same arguments
        runs none. Refused where the networks would have to run beside another job (`busy`), and where
        lesionStatistics would refuse the split (no ventricle model)."""
        if volumeNode is None or not self._splitNeedsNetworks(segmentationNode, ventricleModel):
            return None
        self.ensureDependencies()
        ventricleModel = self._ventricleModelFile(segmentationNode, ventricleModel)
        ventricle, brain, key, kept = self._splitModels(volumeNode, ventricleModel, device, brainMask, precision)
        if kept:
            return None
        self.refuseWhileEnding("show the statistics", otherwise="untick the split")
        if busy:
            raise DeepWMLError(f"the periventricular/deep split of '{segmentationNode.GetName()}' runs the ventricle "
                               "and brain networks, which wait for the run going on now: show the statistics once it "
                               "is done (or cancel it), or untick the split")
        self._locationInputs = None  # the earlier volume's let go before the networks run
        return self._start(SplitJob(volumeNode, mrml.imageFromVolume(volumeNode), ventricle, brain, device, brainMask,
                                    precision, key))

    def finishSplit(self, job: SplitJob) -> bool:
        """Keep a finished SplitJob's work for the statistics of its volume (lesionStatistics runs no network then):
        True. A cancelled job keeps nothing (Cancelled is raised); a failed one raises its error. Nor is the work kept
        where it is no longer that of the volume (False): its voxels or their place changed while the networks ran (an
        edit, another frame of a sequence), or the volume left the scene; the key is taken again now, as
        lesionStatistics takes it."""
        if not job.done:
            raise RuntimeError("finishSplit called before the job finished")
        if job.cancelled:
            raise Cancelled("cancelled")
        if job.error is not None:
            from DeepWMLLib.inference import NaNProbabilities, PrecisionUnavailable

            if isinstance(job.error, NaNProbabilities):
                raise DeepWMLError(nanAdvice(job.error)) from job.error
            if isinstance(job.error, PrecisionUnavailable):
                raise DeepWMLError(precisionAdvice(job.error)) from job.error
            raise job.error
        job._report(1.0, "done")
        if job.key is None or job.volumeNode.GetScene() is None or job.key != self._locationKey(
                job.volumeNode, job.ventricle, job.brain, job.device, job.brainMask, job.precision):
            return False
        self._locationInputs = (job.key, job.result)
        return True

    def _volumeLocationInputs(self, volumeNode, ventricleModel, device, brainMask, precision, progress=None) -> dict:
        """`segment.location_inputs` of the volume (the ventricle and brain networks' work for the split of a
        segmentation drawn on it: seconds on a large scan, on the main thread), kept for the next statistics of the
        same volume: Show statistics, Review lesions, Compare and a segmentation edited between them run the networks
        once. Kept by all they depend on: the volume node, its voxels (their VTK modified time: an edit, another frame
        of a sequence) and where they lie (its IJK-to-world matrix, transforms included), both models (file and
        digest), the device, the brain-mask switch and the precision; never by the segmentation, whose edits count at
        every update. One volume's at a time (a bool stack of its voxels; `forgetKept` lets it go). `progress(message)`
        is called before the networks run. The panel runs them first as a job it shows and can cancel (startSplit)."""
        from DeepWMLLib.segment import location_inputs

        ventricle, brain, key, kept = self._splitModels(volumeNode, ventricleModel, device, brainMask, precision)
        if kept:
            return self._locationInputs[1]
        self._locationInputs = None  # the earlier volume's let go before the networks run
        if progress is not None:
            progress(f"Finding the lateral ventricles on '{volumeNode.GetName()}' for the periventricular/deep split "
                     "(the ventricle and brain networks: seconds; kept for later updates while the volume is unchanged)...")
        inputs = location_inputs(mrml.imageFromVolume(volumeNode), ventricle, brain, device=device,
                                 precision=precision, brain_gate=brainMask)
        inputs["ventricles"].setflags(write=False)  # read by every later update: never flipped in place
        if key is not None:
            self._locationInputs = (key, inputs)
        return inputs

    def forgetKept(self) -> None:
        """Let go of what is kept of a volume (`_volumeLocationInputs`): the scene is closing, its patient's data go."""
        self._locationInputs = None

    def compareSegmentations(self, a, b, referenceVolumeNode=None, segmentIdA=None, segmentIdB=None) -> dict:
        """Metrics of segmentation `a` (e.g. DeepWML's) against reference `b` (e.g. manual): dice,
        sensitivity, precision, hd95_mm, avd_percent, lesion-wise metrics and per-slice values.
        Either may be a segmentation or a labelmap volume; both are taken on the reference volume's grid."""
        self.ensureDependencies(torch=False)
        from DeepWMLLib.evaluation import evaluate_case

        reference = self._referenceVolume(a, b, referenceVolumeNode)
        result = evaluate_case(mrml.maskFromNode(a, reference, segmentIdA), mrml.maskFromNode(b, reference, segmentIdB))
        result["notes"] = list(result.get("notes", [])) + self._maskNotes(
            ((a, segmentIdA), (b, segmentIdB)), reference, "the Dice or the volumes")
        return result

    def consensusCheck(self, a, b, threshold: float = DEFAULT_CONSENSUS_THRESHOLD, referenceVolumeNode=None) -> dict:
        """Do two raters agree (Dice >= threshold)? Also the slices and lesions where they do not."""
        self.ensureDependencies(torch=False)
        from DeepWMLLib.consensus import consensus_check

        reference = self._referenceVolume(a, b, referenceVolumeNode)
        result = consensus_check(mrml.maskFromNode(a, reference), mrml.maskFromNode(b, reference), threshold)
        result.update(rater_a=a.GetName(), rater_b=b.GetName(), volume=reference.GetName())  # whose, when saved
        result["notes"] = list(result.get("notes", [])) + self._maskNotes(
            ((a, None), (b, None)), reference, "the Dice or the raters' volumes")
        return result

    @staticmethod
    def _maskNotes(nodes, volumeNode, counted: str) -> list[str]:
        """What of each node was compared (several segments or labels joined, a WMH segment beside others),
        which were drawn on another volume, and how much of each lies outside the volume's field of view and
        so is not counted in `counted` (`mrml.outsideNote`): the panel says so, as the numbers depend on it."""
        notes = []
        for node, segmentId in nodes:
            notes += [note for note in mrml.maskNotes(node, segmentId) + mrml.drawnOnNote(node, volumeNode)
                      + mrml.outsideNote(node, volumeNode, counted, segmentId)
                      if note not in notes]  # a node compared with itself: once
        return notes

    def lesionChange(self, baselineVolume, baselineSegmentation, followupVolume, followupSegmentation):
        """New, enlarging, stable and gone lesions between an earlier scan (baseline) and the follow-up
        (`DeepWMLLib.change`): each segmentation is taken on its own volume's grid, the baseline is
        registered rigidly to the follow-up. Returns (the change segmentation on the follow-up's grid, one
        segment per call; the baseline volume resampled onto the follow-up's grid; the report). Run again
        for the same follow-up, both nodes are replaced. Both are made in world coordinates, where the
        volumes are displayed (transforms included), under no transform. Runs in the calling thread (scripts, the
        batch script); the panel runs it as a job (startChange, finishChange)."""
        job = self._changeJob(baselineVolume, baselineSegmentation, followupVolume, followupSegmentation)
        job.run()
        if job.error is not None:
            raise job.error
        return self._changeNodes(job)

    def startChange(self, baselineVolume, baselineSegmentation, followupVolume, followupSegmentation,
                    busy: bool | str = False, progress=None) -> ChangeJob:
        """For the GUI: lesionChange without the main thread running the registrations (tens of seconds each on a
        clinical pair). The scans and masks are taken from the nodes now; a started ChangeJob runs lesion_change in a
        worker thread: poll `job.done` (`fraction` and `message` follow the registrations), then finishChange(job)
        makes the nodes. Refused while another job runs (`busy`: True, or the running job's `kind`), saying why."""
        self.refuseWhileEnding("compare again")
        job = self._changeJob(baselineVolume, baselineSegmentation, followupVolume, followupSegmentation, busy,
                              progress)
        return self._start(job)

    def finishChange(self, job: ChangeJob):
        """The nodes of a finished ChangeJob, as lesionChange returns them (made now, on the main thread). A cancelled
        job keeps nothing (Cancelled is raised); a failed one raises its error. Nor is anything kept where an input
        changed while the scans were registered (their voxels, where they lie, a segment edited, a node deleted):
        None then, `job.discarded` saying which and how."""
        if not job.done:
            raise RuntimeError("finishChange called before the job finished")
        if job.cancelled:
            raise Cancelled("cancelled")
        if job.error is not None:
            raise job.error
        job.discarded = self._changeInputsChanged(job)
        if job.discarded:
            return None
        made = self._changeNodes(job)
        job._report(1.0, "done")
        return made

    def _changeJob(self, baselineVolume, baselineSegmentation, followupVolume, followupSegmentation,
                   busy: bool | str = False, progress=None) -> ChangeJob:
        """A ChangeJob, not started: the inputs checked, their scans and masks taken (on the calling thread, the only
        one that touches nodes)."""
        self.ensureDependencies(torch=False)
        if baselineVolume is None or followupVolume is None:
            raise DeepWMLError("choose both FLAIR volumes: the earlier scan and the follow-up")
        if baselineSegmentation is None or followupSegmentation is None:
            raise DeepWMLError("choose a lesion segmentation for each scan (segment the earlier scan first)")
        if baselineVolume is followupVolume:
            raise DeepWMLError("the earlier scan and the follow-up are the same volume; choose the earlier scan")
        if busy == ChangeJob.kind:
            raise DeepWMLError("the lesion change is being computed already (the scans' registrations: tens of "
                               "seconds each): wait until it is done, or cancel it")
        if busy:
            raise DeepWMLError("the lesion change registers the scans, which waits for the run going on now: compare "
                               "once it is done (or cancel it)")
        nodes = (baselineVolume, baselineSegmentation, followupVolume, followupSegmentation)
        images = (mrml.imageFromVolume(baselineVolume), mrml.imageFromVolume(followupVolume))
        masks = (mrml.maskFromNode(baselineSegmentation, baselineVolume),
                 mrml.maskFromNode(followupSegmentation, followupVolume))
        return ChangeJob(nodes, images, masks, self._changeInputKeys(nodes, masks), progress)

    @staticmethod
    def _changeInputKeys(nodes, masks) -> tuple:
        """What the change's inputs are now: each volume's voxels (their VTK modified time: an edit, another frame of
        a sequence) and where they lie (its IJK-to-world matrix, transforms included); each mask's voxels on its
        volume's grid (a digest: an edit, a segment added or removed, a transform)."""
        import hashlib

        import SimpleITK as sitk

        keys = []
        for volumeNode in (nodes[0], nodes[2]):
            imageData = volumeNode.GetImageData()
            keys.append(None if imageData is None else (imageData.GetMTime(),
                                                        tuple(map(tuple, mrml.worldIJKToRAS(volumeNode).tolist()))))
        for mask in masks:
            digest = hashlib.sha256(sitk.GetArrayViewFromImage(mask))
            digest.update(repr(mask.GetSize()).encode())
            keys.append(digest.hexdigest())
        return tuple(keys)

    def _changeInputsChanged(self, job: ChangeJob) -> str:
        """Why a finished ChangeJob's result is no longer that of its inputs ('' where it is): one was removed from
        the scene, or changed (voxels, place, segments) while the scans were registered."""
        during = "while the scans were being registered"
        for node in job.nodes:
            if node.GetScene() is None:
                return f"'{node.GetName()}' was removed from the scene {during}"
        baselineVolume, baselineSegmentation, followupVolume, followupSegmentation = job.nodes
        try:
            masks = (mrml.maskFromNode(baselineSegmentation, baselineVolume),
                     mrml.maskFromNode(followupSegmentation, followupVolume))
            keys = self._changeInputKeys(job.nodes, masks)
        except Exception as exc:  # e.g. its voxels gone, or put under a non-linear transform
            return f"the scans or segmentations changed {during} ({exc})"
        for node, before, now, what in zip((baselineVolume, followupVolume, baselineSegmentation, followupSegmentation),
                                           job.keys, keys, ("voxels or place", "voxels or place", "segments",
                                                            "segments")):
            if before != now:
                return f"the {what} of '{node.GetName()}' changed {during}"
        return ""

    def _changeNodes(self, job: ChangeJob):
        """The nodes of a finished ChangeJob's result (lesionChange's return): the change segmentation and the
        registered baseline, replacing an earlier run's for the same follow-up, and the report."""
        import SimpleITK as sitk
        from DeepWMLLib import change

        result = job.result
        inputs = baselineVolume, baselineSegmentation, followupVolume, followupSegmentation = job.nodes
        for attribute, className in ((CHANGE_ATTRIBUTE, "vtkMRMLSegmentationNode"),
                                     (REGISTERED_ATTRIBUTE, "vtkMRMLScalarVolumeNode")):
            earlier = self._nodeMadeFor(attribute, followupVolume, className)
            if any(earlier is node for node in inputs):  # chosen as an input now: the user's, kept
                earlier.RemoveAttribute(attribute)
            else:
                mrml.removeNode(earlier)  # an earlier run's, replaced
        changeNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{followupVolume.GetName()} change")
        changeNode.CreateDefaultDisplayNodes()
        changeNode.SetAttribute(CHANGE_ATTRIBUTE, followupVolume.GetID())
        for value, name in change.LABELS.items():
            mrml.segmentationFromMask(sitk.Cast(result.labels == value, sitk.sitkUInt8), followupVolume, changeNode,
                                      segmentName=name, color=change.COLOURS[value])
        registered = mrml.volumeFromImage(result.baseline_registered,
                                          f"{baselineVolume.GetName()} (registered to {followupVolume.GetName()})")
        registered.SetAttribute(REGISTERED_ATTRIBUTE, followupVolume.GetID())
        report = {**result.report, "baseline": baselineVolume.GetName(), "followup": followupVolume.GetName(),
                  "baseline_segmentation": baselineSegmentation.GetName(),  # whose lesions, in the saved .json
                  "followup_segmentation": followupSegmentation.GetName()}
        for segmentationNode, volumeNode in ((baselineSegmentation, baselineVolume), (followupSegmentation, followupVolume)):
            # drawn on another volume: maybe a resampled copy; maybe the other scan
            report["warnings"] = report["warnings"] + self._maskNotes(((segmentationNode, None),), volumeNode,
                                                                      "the lesion change")
        changeNode.SetAttribute(CHANGE_REPORT_ATTRIBUTE, json.dumps({k: v for k, v in report.items() if k != "lesions"}))
        return changeNode, registered, report

    @staticmethod
    def _nodeMadeFor(attribute: str, volumeNode, className: str):
        for node in slicer.util.getNodesByClass(className):
            if node.GetAttribute(attribute) == volumeNode.GetID():
                return node
        return None

    @staticmethod
    def _referenceVolume(a, b, given):
        for candidate in (given, mrml.referenceVolumeOf(a), mrml.referenceVolumeOf(b)):
            if candidate is not None:
                return candidate
        for node in (a, b):
            if node is not None and node.IsA("vtkMRMLLabelMapVolumeNode"):
                return node
        raise DeepWMLError("choose the FLAIR volume the segmentations were drawn on")

    def jumpToSlice(self, volumeNode, sliceIndex: int) -> None:
        """Centre the slice views on axial slice `sliceIndex` of the volume (numbered as in the reports)."""
        mrml.jumpSlices(mrml.sliceCenterRAS(volumeNode, sliceIndex))

    def jumpTo(self, volumeNode, target) -> None:
        """Show a table row's place: an axial slice (its index) or a point (world RAS, a lesion's)."""
        if isinstance(target, (tuple, list)):
            mrml.jumpSlices(tuple(float(v) for v in target))
        else:
            self.jumpToSlice(volumeNode, target)

    # -----------------------------------------------------------------------------------------
    # Presenting and saving

    @staticmethod
    def sliceRecords(results: dict) -> tuple[list[str], list[dict]]:
        """Per-slice table of the results: columns and one dict per slice worth showing.

        With a consensus check: the slices either rater marked, most discordant first. Otherwise the
        slices with lesion in the segmentation or the reference, in slice order, with LV and LV group,
        and Dice, sensitivity, precision and the reference's area and LV group where a reference was compared.
        With results["table"] LESION_TABLE (Review lesions): every lesion, smallest first, each row's `target`
        the world RAS of its `point_mm`. With a change: its lesions, in the follow-up's slices.
        """
        if results.get("table") == LESION_TABLE:  # Review lesions: every lesion, smallest first, shown where it lies
            lesions = sorted(results["report"]["lesions"], key=lambda lesion: (lesion["volume_ml"], lesion["id"]))
            columns = ["id", "volume_ml", "slice_range"]
            if any("periventricular_share" in lesion for lesion in lesions):
                columns.append("periventricular_share")
            # the report's points are world LPS (the mask is taken on the volume's world grid): RAS flips x and y
            rows = [{**lesion, "index": lesion["slice_range"][0],
                     "target": (-lesion["point_mm"][0], -lesion["point_mm"][1], lesion["point_mm"][2])}
                    for lesion in lesions]
            return columns, rows
        if "change" in results:  # one row per lesion, in the follow-up's slices
            rows = [{**lesion, "index": lesion["followup_slice"]} for lesion in results["change"]["lesions"]]
            # the scan a row's volume was measured on: a baseline lesion's own row (gone, or kept with no follow-up
            # lesion) gives its baseline volume, which read as the follow-up's without it
            return ["index", "status", "scan", "volume_ml", "change_ml", "id"], rows
        if "consensus" in results:
            consensus = results["consensus"]
            order = {index: rank for rank, index in enumerate(consensus["worst_slices"])}
            rows = sorted(consensus["slices"], key=lambda s: (order.get(s["index"], len(order)), s["index"]))
            return ["index", "dice", "area_a_mm2", "area_b_mm2", "disagreement_mm2"], rows
        columns = ["index", "area_mm2", "lv_ml", "lv_group"]
        slices = {s["index"]: s for s in results.get("report", {}).get("slices", [])}  # every slice, 0 without lesion
        rows = {index: dict(s) for index, s in slices.items() if s["area_mm2"] > 0}
        if "comparison" in results:
            # and the reference's LV group, by which `deepwml evaluate` (lv_groups.csv, the paper's Fig. 4) groups
            # each slice's Dice: the segmentation's own may differ, or be none on a slice it missed
            columns += ["dice", "sensitivity", "precision", "reference_area_mm2", "reference_lv_group"]
            for s in results["comparison"]["slices"]:  # the slices the reference marked
                row = rows.setdefault(s["index"], dict(slices.get(s["index"], {"index": s["index"]})))
                row.update({key: s[key] for key in columns[4:-1]}, reference_lv_group=s["lv_group"])
            for row in rows.values():  # a slice only the segmentation marked: the reference's area 0, not a blank
                row.setdefault("reference_area_mm2", 0.0)
        return columns, [rows[index] for index in sorted(rows)]

    def sliceTable(self, results: dict) -> tuple[list[str], list[list[str]], list[int]]:
        """The per-slice table as the GUI shows it: headers, rows of text, and each row's slice index."""
        columns, records = self.sliceRecords(results)
        titles = {"index": "Slice", "area_mm2": "Area (mm²)", "lv_ml": "LV (ml)", "lv_group": "LV group",
                  "dice": "Dice", "sensitivity": "Sensitivity", "precision": "Precision",
                  "reference_area_mm2": "Reference area (mm²)", "reference_lv_group": "Reference LV group",
                  "area_a_mm2": "Area A (mm²)", "area_b_mm2": "Area B (mm²)", "disagreement_mm2": "Disagreement (mm²)",
                  "status": "Change", "scan": "Measured on", "volume_ml": "Volume (ml)", "change_ml": "Change (ml)", "id": "Lesion",
                  "slice_range": "Slices", "periventricular_share": "Periventricular"}
        shown = {"lv_ml": _lvText,  # an LV reads in the group beside it
                 "slice_range": lambda r: "" if r is None else str(r[0]) if r[0] == r[1] else f"{r[0]}–{r[1]}",
                 "periventricular_share": lambda v: "" if v is None else f"{100 * v:.0f} %"}
        return ([titles[c] for c in columns],
                [[shown.get(c, _text)(record.get(c)) for c in columns] for record in records],
                [record.get("target", record["index"]) for record in records])

    @staticmethod
    def formatReport(report: dict) -> str:
        from DeepWMLLib.report import lesion_count_text

        lines = [f"Total lesion volume: {report['volume_ml']:.2f} ml in {lesion_count_text(report['lesion_count'])}"]
        location = report.get("location")
        if location and location.get("judged"):
            # where the ventricles come from: DeepWML's hidden segment, or the networks on the volume (and how they ran)
            ventricles = location.get("ventricles") or f"segment '{mrml.VENTRICLE_SEGMENT_NAME}'"
            lines.append(f"Periventricular {location['periventricular_ml']:.2f} ml, deep {location['deep_ml']:.2f} ml "
                         f"(within 10 mm of the lateral ventricles or further; ventricles: {ventricles}, "
                         f"{location['ventricles_ml']:.1f} ml)")
        elif location and location["why"] not in report.get("warnings", []):
            lines.append(f"No periventricular/deep split: {location['why']}")
        frame = report.get("frame")
        if isinstance(frame, dict) and frame.get("label"):
            lines.append(f"Frame {frame['label']} of the sequence '{frame.get('sequence', '')}'")
        if "model" in report:
            models = ", ".join(report["model"]) if isinstance(report["model"], list) else report["model"]
            runner = f" ({report['runner']})" if report.get("runner") else ""
            settings = report.get("settings") or {}
            # what makes this result differ from a default run of the same model, said where the model is named
            averaged = ([f"{settings['grid_phases']} grid positions averaged"] if settings.get("grid_phases", 1) > 1 else []) \
                + (["left-right flip averaged"] if settings.get("tta") else [])
            lines.append(f"Model {models}, threshold {report['threshold']:.2f}, "
                         + "".join(f"{a}, " for a in averaged) + f"{report['device']}{runner}, {report['seconds']:.1f} s")
        lines += [f"Warning: {warning}" for warning in report.get("warnings", [])]
        return "\n".join(lines)

    @staticmethod
    def formatComparison(comparison: dict) -> str:
        return (f"Dice {_text(comparison['dice'])}, sensitivity {_text(comparison['sensitivity'])}, "
                f"precision {_text(comparison['precision'])}\n"
                f"Volume {_text(comparison['prediction_volume_ml'])} ml vs reference "
                f"{_text(comparison['reference_volume_ml'])} ml"
                + "".join(f"\nNote: {note}" for note in comparison.get("notes", [])))  # an empty mask: why "–"

    @staticmethod
    def formatConsensus(result: dict) -> str:
        verdict = "PASS" if result["passed"] else "FAIL: re-label"
        relation = ">=" if result["passed"] else "<"
        from DeepWMLLib.consensus import dice_shown  # enough digits that the comparison reads as the verdict says
        from DeepWMLLib.report import lesion_count_text

        lines = [f"Dice {dice_shown(result['dice'], result['threshold'])} {relation} {result['threshold']:g}: {verdict}",
                 f"Rater A {result['volume_a_ml']:.2f} ml ({lesion_count_text(result['n_lesions_a'])}), "
                 f"rater B {result['volume_b_ml']:.2f} ml ({lesion_count_text(result['n_lesions_b'])})"]
        worst = result["worst_slices"][:DISCORDANT_SLICES_SHOWN]
        if worst:
            lines.append("Most discordant slices: " + ", ".join(str(index) for index in worst))
        lines += [f"Note: {note}" for note in result.get("notes", [])]
        return "\n".join(lines)

    @staticmethod
    def formatChange(report: dict) -> str:
        from DeepWMLLib.change import format_summary

        lines = format_summary(report.get("followup", "follow-up"), report).splitlines()
        lines += [f"Warning: {warning}" for warning in report.get("warnings", [])]
        return "\n".join(line.strip() for line in lines)

    @staticmethod
    def resultsFileName(results: dict, suffix: str = ".csv", folder=None) -> str:
        """The file name Save results offers: the FLAIR's name (made a plain file name: a DICOM series' may be
        '3: AX FLAIR') and what the results are, e.g. 'FLAIR_comparison.csv', rather than one name for every
        patient's results. With `folder` (where the dialog opens), a name no file there has: series names
        repeat from patient to patient ('3: AX FLAIR'), and the folder saved to last was the previous
        patient's, so the name offered would be that patient's file (`_2`, `_3`... added)."""
        from DeepWMLLib.evaluation import plain_name

        kind = next((key for key in ("change", "consensus", "comparison") if key in results),
                    "lesion_table" if results.get("table") == LESION_TABLE else "lesions")
        volume = (results.get("report", {}).get("volume") or results.get("consensus", {}).get("volume")
                  or results.get("change", {}).get("followup") or "DeepWML")
        stem = f"{plain_name(volume)}_{kind}"

        def taken(name: str) -> bool:
            try:
                return Path(folder, name).exists()
            except OSError:  # a folder that can no longer be looked in (a share's permissions changed): the dialog
                return False  # still opens, and the user may choose another (it asks before overwriting)

        name, number = f"{stem}{suffix}", 1
        while folder and taken(name):
            number += 1
            name = f"{stem}_{number}{suffix}"
        return name

    def saveResults(self, results: dict, path) -> Path:
        """Save results shown in the GUI: .json holds everything, .csv the per-slice table."""
        from DeepWMLLib.evaluation import write_csv, write_json

        path = Path(path)
        if path.suffix.lower() == ".json":
            return write_json(results, path)
        if path.suffix.lower() == ".csv":
            columns, records = self.sliceRecords(results)
            if results.get("table") == LESION_TABLE:  # the list leads back to each lesion: where it lies (LPS mm,
                # as the reports), its slices as deepwml change writes them
                columns = columns + ["centroid_mm", "point_mm"]
                records = [{**r, "slice_range": f"{r['slice_range'][0]}-{r['slice_range'][1]}",
                            **{k: " ".join(f"{v:g}" for v in r[k]) for k in ("centroid_mm", "point_mm")}}
                           for r in records]
            return write_csv(records, columns, path)
        raise DeepWMLError(f"{path.name}: save results as .csv (per-slice table) or .json (everything)")


    # -----------------------------------------------------------------------------------------
    # DICOM SEG

    def writeDicomSeg(self, segmentationNode, volumeNode, path, addToDatabase: bool = False) -> dict:
        """The segmentation's lesion as a DICOM SEG of the study `volumeNode` was loaded from by Slicer's DICOM module,
        written to `path`: `deepwml segment --dicom-seg`'s file (DeepWMLLib.dicom_seg), made on the volume's own DICOM
        series. Its files are found through Slicer's DICOM database (`dicomSourceFiles`: refused, with a message and no
        file, for a volume that did not come from DICOM or whose files are gone), read as deepwml segment reads a
        series, and the segmentation exported onto the volume (a label map on its voxels) put on that series' grid
        (the same voxels, reordered where Slicer stores them in another order; a volume resampled or cropped since it
        was loaded is refused). Its segment's Segment Algorithm Type says whose it is (`segmentationOrigin`:
        AUTOMATIC as DeepWML wrote it, SEMIAUTOMATIC edited since, MANUAL not DeepWML's). With `addToDatabase`, the SEG is also imported into Slicer's DICOM database, beside
        its series, where Slicer's DICOMLib can (`_addToDicomDatabase`; a failure there leaves the file written and
        is said in the result's "database"). Returns what the report of deepwml segment records of it (file,
        series_uid, sop_instance_uid, series_number, frames) with `path` and `database` (None: not asked)."""
        self.ensureDependencies(torch=False)
        from DeepWMLLib import io
        from DeepWMLLib.dicom_seg import segmentation

        if volumeNode is None:
            raise DeepWMLError("choose the FLAIR volume the segmentation was made on")
        if segmentationNode is None:
            raise DeepWMLError("no segmentation selected")
        files = dicomSourceFiles(volumeNode)
        name = volumeNode.GetName()
        path = Path(path)
        with tempfile.TemporaryDirectory(prefix="DeepWML-dicom-seg-") as folder:  # the series' files alone (the
            for number, file in enumerate(files):  # database may keep them among others), as deepwml segment reads it
                _linkOrCopy(file, Path(folder, f"{number:05d}_{Path(file).name}"))
            found = io.dicom_series(folder)
            if len(found) != 1:
                raise DeepWMLError(f"the DICOM files '{name}' was loaded from hold {len(found)} series, not one; load "
                                   "the FLAIR's series alone with the DICOM module")
            series = found[0]
            image = io.read_image(folder, series=series)
            mask = mrml.onOwnGrid(mrml.maskFromNode(segmentationNode, volumeNode), volumeNode)
            onSeries = io.align_voxel_order(mask, image)
            if io.grid_difference(onSeries, image) is not None or onSeries.GetSize() != image.GetSize():
                raise DeepWMLError(f"'{name}' no longer lies on the grid of the DICOM series it was loaded from "
                                   f"({io.grid_difference(onSeries, image) or 'another size'}): resampled or cropped "
                                   "since, so a DICOM SEG on that series' slices would not hold its voxels; segment the "
                                   "volume as loaded from DICOM")
            report = self.lesionStatistics(segmentationNode, volumeNode)
            kind = self.segmentationOrigin(segmentationNode, volumeNode)
            made = segmentation(image, onSeries, series, report, kind)  # the files are read here: still linked
        io.write_bytes(made.data, path)
        result = {**made.as_dict(path.name), "path": str(path), "database": None, "algorithm_type": kind}
        if addToDatabase:
            result["database"] = _addToDicomDatabase(path)
        return result

    @staticmethod
    def segmentationOrigin(segmentationNode, volumeNode) -> str:
        """The DICOM Segment Algorithm Type of what `writeDicomSeg` writes of the segmentation: AUTOMATIC where its
        WMH segment is as DeepWML wrote it (its digest, `rerunLoses`' check), SEMIAUTOMATIC where DeepWML wrote it
        and it was edited (or moved against the volume) since, MANUAL where DeepWML did not write it (a rater's
        segmentation, a label map): a SEG must not call a hand edit DeepWML's automatic result."""
        if segmentationNode is None or not segmentationNode.IsA("vtkMRMLSegmentationNode"):
            return "MANUAL"
        if not segmentationNode.GetSegmentation().GetSegmentIdBySegmentName(mrml.WMH_SEGMENT_NAME):
            return "MANUAL"
        written = segmentationNode.GetAttribute(DIGEST_ATTRIBUTES[mrml.WMH_SEGMENT_NAME])
        if written is None:
            return "MANUAL"
        return "AUTOMATIC" if written == _segmentDigest(segmentationNode, volumeNode, mrml.WMH_SEGMENT_NAME) \
            else "SEMIAUTOMATIC"

    @staticmethod
    def dicomSegPath(volumeNode, folder) -> Path:
        """Where Save results writes the volume's DICOM SEG: FOLDER/<the volume's name>_wmh_seg.dcm (deepwml segment's
        name, CASE the volume's name made a plain file name), `_2`, `_3`... added where that file exists: series names
        repeat from patient to patient."""
        from DeepWMLLib.dicom_seg import FILE_SUFFIX
        from DeepWMLLib.evaluation import plain_name

        stem, number = plain_name(volumeNode.GetName()), 1
        path = Path(folder, f"{stem}{FILE_SUFFIX}")
        while path.exists():
            number += 1
            path = Path(folder, f"{stem}_{number}{FILE_SUFFIX}")
        return path


def _addToDicomDatabase(path: Path) -> str:
    """Import the SEG at `path` into Slicer's DICOM database with Slicer's own DICOMLib (DICOMUtils.importDicom, from a
    folder holding that file alone, copied into the database): what happened, in words. Never raises: the file is
    written whatever the database says."""
    try:
        from DICOMLib import DICOMUtils
    except ImportError:
        return "not added to Slicer's DICOM database: Slicer's DICOM module (DICOMLib) is not available here"
    database = getattr(slicer, "dicomDatabase", None)
    if database is None or not getattr(database, "isOpen", True):
        return "not added to Slicer's DICOM database: it is not open"
    try:
        with tempfile.TemporaryDirectory(prefix="DeepWML-dicom-seg-import-") as folder:
            shutil.copyfile(path, Path(folder, path.name))  # the one file: nothing else of its folder is imported
            imported = DICOMUtils.importDicom(folder, database, copyFiles=True)  # copied: the folder may go
    except Exception as exc:  # an older DICOMUtils without copyFiles, an indexer that failed
        return f"not added to Slicer's DICOM database ({type(exc).__name__}: {exc}); import {path} with the DICOM module"
    if imported is False:
        return f"not added to Slicer's DICOM database (its import failed); import {path} with the DICOM module"
    return "added to Slicer's DICOM database"


def _resultFrame(segmentationNode) -> str | None:
    """The frame of a sequence a DeepWML result was made from (its label), or None."""
    try:
        frame = json.loads(segmentationNode.GetAttribute(RUN_ATTRIBUTE) or "{}").get("frame")
    except ValueError:
        return None
    return frame.get("label") if isinstance(frame, dict) else None


def _frameOf(volumeNode) -> str | None:
    frame = mrml.sequenceFrame(volumeNode)
    return frame["label"] if frame is not None else None


def _shownNow(mask, volumeNode):
    """A mask made on a volume's voxels, placed where those voxels are shown now (a copy): the panel stays usable during
    a run, and a transform set or changed meanwhile would leave it where the volume was. A volume whose voxel grid
    changed meanwhile (resampled or cropped in place) is refused."""
    import SimpleITK as sitk

    shown = mrml.worldGeometry(volumeNode)
    now, then = (" x ".join(map(str, size)) for size in (volumeNode.GetImageData().GetDimensions(), mask.GetSize()))
    if now != then:
        raise DeepWMLError(f"'{volumeNode.GetName()}' changed while it was being segmented (now {now} voxels, then "
                           f"{then}); segment it again")
    placed = sitk.Image(mask)
    placed.SetSpacing(shown.GetSpacing())
    placed.SetDirection(shown.GetDirection())
    placed.SetOrigin(shown.GetOrigin())
    return placed


def _segmentDigest(segmentationNode, volumeNode, segmentName: str) -> str:
    """A fingerprint of a segment's voxels on the volume's grid. Not of where the grid lies: a scene saved
    (.mrb) and opened again brings an oblique volume's geometry back only to the last bits, and every
    reopened result would look edited; a segment moved against its volume (a transform) changes its
    voxels on the grid."""
    import hashlib

    import SimpleITK as sitk

    mask = mrml.maskFromSegmentation(segmentationNode, volumeNode, segmentName)
    digest = hashlib.sha256(sitk.GetArrayViewFromImage(mask))  # the voxels where they lie, not a copy
    digest.update(repr(mask.GetSize()).encode())
    return digest.hexdigest()[:24]


def nanAdvice(error) -> str:
    """The module's words on a network that gave NaN probabilities (inference.NaNProbabilities), whose own advice,
    rerun with --precision fp32, names deepwml segment's option: in the module it is the panel's Precision."""
    if not error.reduced:
        return f"{error.what}: its result would mark nothing; it ran in full precision, so the model file is at " \
               "fault: choose another model"
    return (f"{error.what}: its result would mark nothing; reduced precision can overflow: choose Precision: fp32 "
            "(below Device) and segment again (slower). If that fails too, the model file is at fault")


def precisionAdvice(error) -> str:
    """The module's words on bf16 asked for where it cannot run (inference.PrecisionUnavailable), whose own words
    name deepwml segment's --precision: in the module it is the panel's Precision (saved with a scene, it may have
    been chosen on another computer)."""
    if error.on_gpu:
        return ("Precision bf16 is for a CPU that computes bf16 natively, and this run was on a GPU: choose "
                "Precision: auto (fp16 on a GPU) or fp32 (below Device) and segment again")
    return ("Precision bf16 needs a CPU that computes bf16 natively (AMX or AVX512-BF16), and this computer's does "
            "not: choose Precision: auto or fp32 (below Device) and segment again")


def segmentImageOptions(threshold=None, tta=False, brainMask=True, location=True, precision="auto",
                        gridPhases=1) -> dict:
    """segment_image's keyword arguments, but the device, for the logic's options: one mapping for a run and for
    the settings it will record (plannedSettings)."""
    return dict(threshold=threshold, tta=tta, brain_model="default", brain_gate=brainMask,
                ventricle_model=_ventricleModel(location), precision=precision, grid_phases=gridPhases)


def _ventricleModel(location):
    """segment_image's ventricle_model for the `location` choice of the logic's methods."""
    if location is True:
        return "default"
    return str(location) if location else None


def _lvText(value) -> str:
    """A slice's LV as _text shows it, with more decimals where three would read in another LV group than its own:
    on the bundled sample's grid (0.9489 mm pixels, 6 mm slices) a slice of 37 voxels is 0.19989 ml, G1, which three
    decimals showed as 0.200 beside G1 (the report and the saved table say 0.19989)."""
    text = _text(value)
    if isinstance(value, float) and math.isfinite(value) and value >= 0:
        from DeepWMLLib.metrics import lv_group

        decimals = 3
        while lv_group(float(text)) != lv_group(value) and decimals < 9:
            decimals += 1
            text = f"{value:.{decimals}f}"
    return text


def tableTitle(results: dict) -> str:
    """The title of the table's section for these results (a plain function: it cannot fail)."""
    if results.get("table") == LESION_TABLE:
        return f"Lesions ({len(results['report']['lesions'])}, smallest first)"
    return "Lesion change" if "change" in results else "Per-slice results"


def _text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "n/a" if value != value else f"{value:.3f}"
    return str(value)
