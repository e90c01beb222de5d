"""Fixtures for the Slicer module's tests (Testing/test_slicer_*.py import them by name).

Why this folder: Testing/ is on sys.path during pytest, and slicer-core's `slicer` package imports
every module it finds in any `slicer` folder on sys.path, so Testing/slicer/ itself must hold no
Python module. This sub-folder has no __init__.py, which keeps it out of that scan.
"""

from __future__ import annotations

import importlib
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
MODULE_DIR = REPO / "DeepWML"
for folder in (MODULE_DIR, Path(__file__).resolve().parent):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

import slicer  # noqa: E402
import slicer_standins  # noqa: E402
from DeepWMLSlicerLib import MRMLConversion  # noqa: E402


@pytest.fixture(autouse=True)
def onnxCache(tmp_path, monkeypatch):
    """Keep ONNX exports of throw-away test models out of the user's cache."""
    monkeypatch.setenv("DEEPWML_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def scene(monkeypatch):
    """A fresh standalone MRML scene as slicer.mrmlScene, with an axial 'Red' slice view node."""
    monkeypatch.setattr(slicer, "mrmlScene", None, raising=False)
    monkeypatch.setattr(MRMLConversion, "_standalone", {})
    scene = MRMLConversion.initializeStandaloneScene()
    sliceNode = slicer.vtkMRMLSliceNode()
    sliceNode.SetLayoutName("Red")
    sliceNode.SetSingletonTag("Red")  # like the application's view nodes, it survives scene.Clear()
    sliceNode.SetOrientationToAxial()
    scene.AddNode(sliceNode)
    yield scene
    scene.Clear(1)


@pytest.fixture
def module(scene, monkeypatch):
    """DeepWML.py imported with the qt/ScriptedLoadableModule stand-ins (all removed after the test)."""
    slicer_standins.install(monkeypatch)
    monkeypatch.delitem(sys.modules, "DeepWML", raising=False)
    yield importlib.import_module("DeepWML")
    sys.modules.pop("DeepWML", None)


def blockingSegmentation(monkeypatch) -> threading.Event:
    """Make segment_image run until cancelled, so a job is reliably still running when a test acts."""
    import DeepWMLLib.segment
    from DeepWMLLib.errors import Cancelled

    started = threading.Event()

    def segment(image, models=None, cancel=None, **options):
        started.set()
        deadline = time.monotonic() + 10
        while not cancel():
            assert time.monotonic() < deadline, "the job was never cancelled"
            time.sleep(0.005)
        raise Cancelled()

    monkeypatch.setattr(DeepWMLLib.segment, "segment_image", segment)
    return started


def gatedChange(monkeypatch) -> tuple:
    """Make change.lesion_change report its first registration's end and then wait for a gate (running for real once
    it opens), in whatever thread it runs; count the registrations (change.align, memoized). Returns (started, gate,
    threads it ran in, registrations)."""
    from DeepWMLLib import change

    started, gate, threads, registrations = threading.Event(), threading.Event(), [], []
    real, align = change.lesion_change, change.align

    def lesionChange(*args, progress=None, **kwargs):
        assert progress is not None, "the registrations ran with no progress shown"
        threads.append(threading.current_thread().name)
        progress("registered the baseline to the follow-up in 30 s; now the other way round, to check it ...")
        started.set()
        assert gate.wait(30), "the gate was never opened"
        return real(*args, progress=progress, **kwargs)

    monkeypatch.setattr(change, "lesion_change", lesionChange)
    monkeypatch.setattr(change, "align", lambda *a, **k: registrations.append(1) or align(*a, **k))
    return started, gate, threads, registrations


def lateSegmentation(monkeypatch) -> tuple[threading.Event, threading.Event]:
    """Make segment_image wait for a gate, then segment for real without looking at cancel again, as in
    its post-processing, report and contrast check (seconds on a real scan). Returns (started, gate)."""
    import DeepWMLLib.segment

    segmentImage = DeepWMLLib.segment.segment_image
    started, gate = threading.Event(), threading.Event()

    def segment(image, models=None, cancel=None, **options):
        started.set()
        assert gate.wait(10), "the gate was never opened"
        return segmentImage(image, models, **options)

    monkeypatch.setattr(DeepWMLLib.segment, "segment_image", segment)
    return started, gate


def seriesOfFrames(scene, frames):
    """A sequence of `frames` (SimpleITK images) browsed with a sequence browser, as Slicer shows a 4D or multi-frame
    series: returns (the browser, its proxy volume node, the Sequences logic, which must be kept alive)."""
    import SimpleITK as sitk

    sequences = slicer.vtkSlicerSequencesLogic()  # registers the sequence node classes; moves the proxy with the browser
    sequences.SetMRMLApplicationLogic(MRMLConversion._standalone["application"])
    sequences.SetMRMLScene(scene)
    sequence = scene.AddNewNodeByClass("vtkMRMLSequenceNode", "FLAIR series")
    sequence.SetIndexName("time")
    sequence.SetIndexUnit("s")
    for number, frame in enumerate(frames):
        item = slicer.vtkMRMLScalarVolumeNode()
        slicer.util.updateVolumeFromArray(item, sitk.GetArrayFromImage(frame))
        item.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(MRMLConversion.ijkToRASFromImage(frame)))
        sequence.SetDataNodeAtValue(item, str(10 * number))
    browser = scene.AddNewNodeByClass("vtkMRMLSequenceBrowserNode", "FLAIR series browser")
    browser.AddSynchronizedSequenceNodeID(sequence.GetID())
    browser.SetSelectedItemNumber(0)  # as Slicer shows a sequence it loads: its first frame
    sequences.UpdateProxyNodesFromSequences(browser)
    return browser, browser.GetProxyNode(sequence), sequences


def countNetworkRuns(monkeypatch) -> list:
    """Count the ventricle and brain networks' runs (inference.predict_maps, which segment.location_inputs calls)."""
    import DeepWMLLib.inference as inference

    runs, predict = [], inference.predict_maps
    monkeypatch.setattr(inference, "predict_maps", lambda *args, **kwargs: runs.append(1) or predict(*args, **kwargs))
    return runs
