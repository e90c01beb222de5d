"""The module's GUI segmentations in a worker process (python -m DeepWMLLib.worker, in Slicer its
PythonSlicer): the same result as in a thread, progress, an at-once cancel, and errors and crashes of
the process shown, never a frozen job. Real processes on real MRML nodes; this venv's Python stands in
for PythonSlicer."""

from __future__ import annotations

import json
import os
import pickle
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).parent / "slicer" / "support"))

import slicer  # noqa: E402
from conftest import make_volume  # noqa: E402
from DeepWMLLib.errors import Cancelled, DeepWMLError  # noqa: E402
from slicer_fixtures import scene  # noqa: E402,F401 (fixture)

from DeepWMLSlicerLib import CoreLogic  # noqa: E402
from DeepWMLSlicerLib import MRMLConversion as mrml  # noqa: E402
from DeepWMLSlicerLib.CoreLogic import DeepWMLCoreLogic, ProcessSegmentationJob  # noqa: E402


def sampleJobFolder(parent: Path, name: str, **options) -> Path:
    """A worker's job folder, as the module makes it, holding the bundled sample and segment_image's options."""
    folder = parent / name
    folder.mkdir()
    image = sitk.ReadImage(str(Path(__file__).resolve().parents[1] / "Resources" / "Sample" / "sample_flair.nii.gz"))
    (folder / "job.pkl").write_bytes(pickle.dumps({"image": image, "model_paths": None,
                                                   "options": {"device": "cpu", **options}}))
    return folder


def fakePython(folder: Path, script: str) -> Path:
    """An executable named python that runs `script` (sh) instead of the worker."""
    path = folder / "python"
    path.write_text(script)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def processLogic(python=sys.executable) -> DeepWMLCoreLogic:
    logic = DeepWMLCoreLogic()
    logic.workerPython = str(python)
    return logic


def pollUntilDone(job, timeout=120.0) -> list:
    """What the GUI's timer does: read job.done, then the progress, until done; the fractions seen."""
    seen, end = [], time.monotonic() + timeout
    while not job.done:
        seen.append(job.fraction)
        assert time.monotonic() < end, "the worker process did not finish"
        time.sleep(0.05)
    return seen


def test_a_worker_process_gives_the_same_mask_as_a_thread_with_progress_and_leaves_nothing_behind(
        scene, tiny_model):
    flair, _ = make_volume()
    volume = mrml.volumeFromImage(flair, "flair")
    # No brain mask: whether the shipped brain network outlines this 43 mm toy head is no concern of this test,
    # and its marks on such a head move with where its grid lies.
    job = processLogic().startSegmentation(volume, device="cpu", modelPaths=[str(tiny_model)], brainMask=False)
    assert isinstance(job, ProcessSegmentationJob)
    folder = job._folder
    assert folder.is_dir() and not job.done  # started, not yet finished: the GUI goes on meanwhile
    seen = pollUntilDone(job)
    assert not folder.exists()  # the scan's copy and the results are removed
    assert seen == sorted(seen) and max(seen) <= CoreLogic.SEGMENTED_FRACTION
    assert job.fraction == pytest.approx(CoreLogic.SEGMENTED_FRACTION)
    inProcess = processLogic(None).segmentVolume(volume, device="cpu", modelPaths=[str(tiny_model)], brainMask=False)
    fromProcess = processLogic().finishSegmentation(job)
    assert job.fraction == 1.0
    a = sitk.GetArrayFromImage(mrml.maskFromSegmentation(fromProcess, volume))
    b = sitk.GetArrayFromImage(mrml.maskFromSegmentation(inProcess, volume))
    assert a.sum() > 0 and np.array_equal(a, b)
    facts = [json.loads(node.GetAttribute(CoreLogic.RUN_ATTRIBUTE)) for node in (fromProcess, inProcess)]
    for run in facts:
        run.pop("seconds")
    assert facts[0] == facts[1] and facts[0]["model"]  # the run's facts travel back whole


def test_cancel_ends_the_worker_process_at_once(scene, tmp_path):
    slow = fakePython(tmp_path, "#!/bin/sh\nsleep 60\n")  # a worker that would take a minute
    flair, _ = make_volume()
    volume = mrml.volumeFromImage(flair, "flair")
    logic = processLogic(slow)
    job = logic.startSegmentation(volume, device="cpu")
    folder = job._folder
    time.sleep(0.3)
    assert not job.done
    started = time.monotonic()
    job.cancel()
    assert job.wait(5) and job.cancelled
    assert time.monotonic() - started < 5 and job._process.returncode is not None and not folder.exists()
    with pytest.raises(Cancelled):
        logic.finishSegmentation(job)
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0


def finishedFakeJob(folder: Path, script: str):
    """(logic, job) of a GUI run whose worker is a fake Python running `script`, polled until done."""
    flair, _ = make_volume()
    logic = processLogic(fakePython(folder, script))
    job = logic.startSegmentation(mrml.volumeFromImage(flair, "flair"), device="cpu")
    pollUntilDone(job, 30)  # done, not an exception out of the GUI's timer
    return logic, job


def test_a_worker_process_that_dies_gives_an_error_with_its_last_words(scene, tmp_path):
    logic, job = finishedFakeJob(tmp_path, "#!/bin/sh\necho 'out of memory in the runtime' >&2\nexit 137\n")
    with pytest.raises(DeepWMLError, match="exit code 137.*out of memory in the runtime"):
        logic.finishSegmentation(job)
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0


def test_an_error_in_the_worker_process_comes_back_as_the_thread_would_raise_it(scene, tmp_path):
    flair, _ = make_volume()
    volume = mrml.volumeFromImage(flair, "flair")
    missing = [str(tmp_path / "no such model.pt")]
    with pytest.raises(DeepWMLError) as inThread:
        processLogic(None).segmentVolume(volume, device="cpu", modelPaths=missing)
    logic = processLogic()
    job = logic.startSegmentation(volume, device="cpu", modelPaths=missing)
    pollUntilDone(job, 60)
    with pytest.raises(DeepWMLError) as inProcess:
        logic.finishSegmentation(job)
    assert type(inProcess.value) is type(inThread.value) and str(inProcess.value) == str(inThread.value)


def test_slicer_runs_gui_segmentations_in_its_own_python_unless_told_not_to(monkeypatch, tmp_path):
    assert CoreLogic.workerPython() is None  # no Slicer application: a worker thread
    pythonSlicer = tmp_path / "PythonSlicer"
    pythonSlicer.write_text("#!/bin/sh\n")
    pythonSlicer.chmod(pythonSlicer.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setattr(slicer, "app", object(), raising=False)
    monkeypatch.setenv("PATH", str(tmp_path) + os.pathsep + os.environ.get("PATH", ""))
    assert CoreLogic.workerPython() == str(pythonSlicer)
    monkeypatch.setenv(CoreLogic.IN_PROCESS_VARIABLE, "1")
    assert CoreLogic.workerPython() is None
    monkeypatch.setenv(CoreLogic.IN_PROCESS_VARIABLE, "0")
    assert CoreLogic.workerPython() == str(pythonSlicer)
    monkeypatch.setenv(CoreLogic.IN_PROCESS_VARIABLE, "false")  # read as written, not as "set"
    assert CoreLogic.workerPython() == str(pythonSlicer)
    monkeypatch.setenv(CoreLogic.IN_PROCESS_VARIABLE, "True")
    assert CoreLogic.workerPython() is None


@pytest.mark.skipif(os.name == "nt", reason="a parent's end is seen on POSIX only")
def test_a_worker_whose_slicer_has_gone_stops_and_removes_the_scans_copy(tmp_path):
    folder = sampleJobFolder(tmp_path, "DeepWML-job-orphan")
    # a stand-in for Slicer: it starts the worker, waits until it runs, and ends without collecting anything
    parent = ("import subprocess, sys, time, pathlib\n"
              f"subprocess.Popen([sys.executable, '-m', 'DeepWMLLib.worker', {str(folder)!r}])\n"
              f"while not pathlib.Path({str(folder)!r}, 'progress.json').exists(): time.sleep(0.01)\n")
    subprocess.run([sys.executable, "-c", parent], check=True, timeout=120)
    end = time.monotonic() + 60
    while folder.exists():
        assert time.monotonic() < end, "the orphaned worker left the scan's copy behind"
        time.sleep(0.1)


def test_job_folders_of_a_slicer_that_crashed_are_swept_and_no_others(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    folders = {name: tmp_path / f"{CoreLogic.JOB_FOLDER_PREFIX}{name}" for name in ("crashed", "running", "new")}
    for folder in folders.values():
        folder.mkdir()
        (folder / "job.pkl").write_bytes(b"a scan")
    (folders["crashed"] / "owner").write_text(str(gone.pid))
    (folders["running"] / "owner").write_text(str(os.getpid()))
    other = tmp_path / "someone-else"
    other.mkdir()
    CoreLogic.sweepOrphanedJobFolders(tmp_path)
    assert not folders["crashed"].exists()
    assert folders["running"].exists() and folders["new"].exists() and other.exists()


def test_a_progress_file_that_cannot_be_replaced_skips_that_update_not_the_run(tmp_path, monkeypatch, tiny_model):
    from DeepWMLLib import worker

    flair, _ = make_volume()
    (tmp_path / "job.pkl").write_bytes(pickle.dumps({"image": flair, "model_paths": [str(tiny_model)],
                                                     "options": {"device": "cpu"}}))
    replace = os.replace

    def busy(source, target):  # Windows: the caller is reading progress.json at that moment
        if str(target).endswith("progress.json"):
            raise PermissionError(13, "The process cannot access the file", str(target))
        replace(source, target)

    monkeypatch.setattr(worker.os, "replace", busy)
    assert worker.run(tmp_path) == 0
    result = pickle.loads((tmp_path / "result.pkl").read_bytes())
    assert result["mask"].GetSize() == flair.GetSize() and not (tmp_path / "error.pkl").exists()


def test_a_cancel_with_no_poll_after_it_leaves_no_copy_of_the_scan(scene, tmp_path):
    # the widget's cleanup (Slicer closing, the module reloaded) cancels the job and stops its timer: no poll follows
    slow = fakePython(tmp_path, "#!/bin/sh\nsleep 60\n")
    flair, _ = make_volume()
    job = processLogic(slow).startSegmentation(mrml.volumeFromImage(flair, "flair"), device="cpu")
    folder = job._folder
    assert (folder / "job.pkl").is_file()
    job.cancel()
    assert not folder.exists() and job._process.returncode is not None and job.cancelled


def test_a_worker_whose_job_folder_was_removed_stops_and_leaves_nothing(tmp_path):
    # PythonSlicer is a launcher: Cancel kills it and removes the folder, and the Python it started (its child,
    # which on Windows does not see its parent go) must stop too, not run the segmentation to its end
    folder = sampleJobFolder(tmp_path, "DeepWML-job-abandoned", tta=True)
    worker = subprocess.Popen([sys.executable, "-m", "DeepWMLLib.worker", str(folder)])
    try:
        end = time.monotonic() + 120
        while not (folder / "progress.json").exists():
            assert time.monotonic() < end and worker.poll() is None
            time.sleep(0.01)
        (folder / "job.pkl").unlink()  # what the module's clean-up removes first
        assert worker.wait(120) == 1
    finally:
        if worker.poll() is None:
            worker.kill()
    assert not folder.exists()


@pytest.mark.skipif(os.name == "nt", reason="a shell stands in for the PythonSlicer launcher")
def test_a_worker_started_through_a_launcher_stops_when_its_slicer_has_gone(tmp_path):
    # PythonSlicer is a launcher that starts the real Python as its child and waits for it: when Slicer crashes,
    # the worker's parent (the launcher) lives on, so only Slicer's own process id (the `owner` file) tells
    folder = sampleJobFolder(tmp_path, "DeepWML-job-launched", tta=True)
    slicerStandIn = ("import os, subprocess, sys, time, pathlib\n"
                     f"folder = pathlib.Path({str(folder)!r})\n"
                     "(folder / 'owner').write_text(str(os.getpid()))\n"
                     "subprocess.Popen(['/bin/sh', '-c', '\"$0\" -m DeepWMLLib.worker \"$1\"; true', sys.executable,"
                     " str(folder)])\n"
                     "while not (folder / 'progress.json').exists(): time.sleep(0.01)\n")
    subprocess.run([sys.executable, "-c", slicerStandIn], check=True, timeout=120)  # then it 'crashes' (ends)
    end = time.monotonic() + 60
    while folder.exists():
        assert time.monotonic() < end, "the worker left the scan's copy behind"
        assert not (folder / "result.pkl").exists(), "the worker ran on for a Slicer that had gone"
        time.sleep(0.05)


def test_a_result_that_cannot_be_read_is_an_error_that_says_so(scene, tmp_path):
    # a worker that writes a result of another Python's making
    logic, job = finishedFakeJob(tmp_path, '#!/bin/sh\nprintf "not a pickle" > "$3/result.pkl"\n')
    with pytest.raises(DeepWMLError, match="result could not be read"):
        logic.finishSegmentation(job)


def test_a_step_that_begins_right_after_an_update_is_written_to_the_progress_file(tmp_path, monkeypatch):
    """progress.json was written at most every PROGRESS_EVERY_S: 'post-processing: lesion mask', told right
    after a network's last slice, was dropped, and Slicer showed the network's words for all the seconds
    post-processing, the report and the FLAIR check take on a large scan. A new step is always written; the
    slices of one step still are not (a clock that stands still: every update within the interval)."""
    from types import SimpleNamespace

    from DeepWMLLib import segment, worker

    flair, _ = make_volume()
    (tmp_path / "job.pkl").write_bytes(pickle.dumps({"image": flair, "model_paths": None, "options": {}}))
    seen = []

    def fake_segment_image(image, models, progress, cancel, **options):
        for message in ("lesion model: slice 1/2", "lesion model: slice 2/2", "post-processing: lesion mask"):
            progress(0.7, message)
            seen.append(json.loads((tmp_path / "progress.json").read_text(encoding="utf-8"))["message"])
        return SimpleNamespace(mask=image, ventricles=None, report={})

    monkeypatch.setattr(worker, "time", SimpleNamespace(monotonic=lambda: 1000.0))
    monkeypatch.setattr(segment, "load_models", lambda paths: [])
    monkeypatch.setattr(segment, "segment_image", fake_segment_image)
    assert worker.run(tmp_path) == 0
    assert seen == ["lesion model: slice 1/2", "lesion model: slice 1/2", "post-processing: lesion mask"]
