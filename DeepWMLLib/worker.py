"""One segmentation run for another process: `python -m DeepWMLLib.worker FOLDER`.

The Slicer module runs its GUI segmentations this way, in Slicer's own Python (PythonSlicer), so that
the networks never wait for Python's global lock while Slicer's main thread holds it, Cancel stops the
run at once, and a crash of a runtime (out of memory, a driver) ends the run rather than Slicer.

FOLDER holds `job.pkl`: {"image": a SimpleITK image, "model_paths": list or None, "options": keyword
arguments of segment.segment_image}. The worker writes `progress.json` ({"fraction", "message"}) as it
goes, stops (Cancelled) when `job.pkl` is removed (the caller gave up on it), or its parent process or the process named in FOLDER's `owner` file (Slicer's own: PythonSlicer is a
launcher, which lives on when Slicer crashes) has gone (then it removes FOLDER: nobody will collect it), and
ends with `result.pkl` ({"mask", "ventricles", "report"}) or `error.pkl` (the exception). Each file is
written under a temporary name and then renamed, so the other side never reads half of one.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import sys
import time
import traceback
from pathlib import Path

from .errors import Cancelled, DeepWMLError

PROGRESS_EVERY_S = 0.1


def write_whole(path: Path, data: bytes) -> None:
    from . import io

    part = path.with_name(path.name + ".part")
    part.write_bytes(data)
    io._replace(part, path)  # retried on Windows, where a virus scanner may hold the fresh file a moment


def write_pickled(path: Path, obj) -> None:
    """`obj` pickled into `path` (as `write_whole`), streamed into the file: no bytes of the pickle in memory beside
    the objects (a copy of the scan in Slicer's process as it hands over a job: 8 bytes a voxel for a float64 volume)."""
    from . import io

    part = path.with_name(path.name + ".part")
    with open(part, "wb") as f:
        pickle.dump(obj, f, protocol=pickle.HIGHEST_PROTOCOL)
    io._replace(part, path)


def read_pickled(path: Path):
    """What `write_pickled` wrote, unpickled as it is read: the scan's bytes once beside its image, not the file's
    bytes and their copy too (3 copies of the scan at once in the worker, where its run then holds one)."""
    with open(path, "rb") as f:
        return pickle.load(f)


def _picklable(exc: BaseException) -> bytes:
    """The exception pickled, or a DeepWMLError with its text when it cannot travel."""
    try:
        data = pickle.dumps(exc)
        pickle.loads(data)
        return data
    except Exception:
        return pickle.dumps(DeepWMLError(f"{type(exc).__name__}: {exc}"))


def process_exists(pid: int) -> bool:
    """Whether a process with this id is running (True when that cannot be told, e.g. another user's)."""
    if os.name == "nt":
        import ctypes
        from ctypes import wintypes

        kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
        kernel32.OpenProcess.restype = wintypes.HANDLE
        kernel32.OpenProcess.argtypes = (wintypes.DWORD, wintypes.BOOL, wintypes.DWORD)
        kernel32.GetExitCodeProcess.argtypes = (wintypes.HANDLE, ctypes.POINTER(wintypes.DWORD))
        kernel32.CloseHandle.argtypes = (wintypes.HANDLE,)
        handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return ctypes.get_last_error() != 87  # ERROR_INVALID_PARAMETER: no such process
        try:
            code = wintypes.DWORD()
            return not kernel32.GetExitCodeProcess(handle, ctypes.byref(code)) or code.value == 259  # STILL_ACTIVE
        finally:
            kernel32.CloseHandle(handle)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _let_go_of_log() -> None:
    """Point stdout and stderr at the null device: they write into the folder's log file, which Windows
    does not remove while this process holds it open."""
    for stream, fd in ((sys.stdout, 1), (sys.stderr, 2)):
        try:
            if stream is not None:
                stream.flush()
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, fd)
            os.close(null)
        except (OSError, ValueError):
            pass


def owner_of(folder: Path) -> int | None:
    """The process id in a job folder's `owner` file (the Slicer that made it), or None."""
    try:
        return int((folder / "owner").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def run(folder: Path) -> int:
    folder = Path(folder)
    parent = os.getppid()
    owner = owner_of(folder)
    last = [0.0, None]  # when progress.json was last written, and its step (the message without its digits)

    def progress(fraction: float, message: str) -> None:
        # A new step is always written: one that begins within PROGRESS_EVERY_S of the last update (post-processing
        # right after a network's last slice) would otherwise show the old step's words for all its seconds.
        now, step = time.monotonic(), re.sub(r"\d+", "", str(message))
        if now - last[0] >= PROGRESS_EVERY_S or fraction >= 1.0 or step != last[1]:
            last[0], last[1] = now, step
            try:
                write_whole(folder / "progress.json",
                            json.dumps({"fraction": float(fraction), "message": str(message)}).encode("utf-8"))
            except OSError:  # on Windows a file being read cannot be replaced: this update is skipped, not the run
                pass

    def orphaned() -> bool:  # the process that started this one, or the Slicer it works for, has gone
        return (os.name != "nt" and os.getppid() != parent) or (owner is not None and not process_exists(owner))

    def abandoned() -> bool:  # the caller removed its folder (Cancel: it killed PythonSlicer, a launcher, not this)
        return not (folder / "job.pkl").exists()

    def cancel() -> bool:
        return orphaned() or abandoned()

    try:
        job = read_pickled(folder / "job.pkl")
        from .segment import load_models, segment_image

        progress(0.0, "loading the model")
        models = load_models(job["model_paths"])
        if cancel():
            raise Cancelled("cancelled")
        progress(0.0, "segmenting")
        result = segment_image(job["image"], models, progress=progress, cancel=cancel, **job["options"])
        write_pickled(folder / "result.pkl", {"mask": result.mask, "ventricles": result.ventricles, "report": result.report})
        return 0
    except BaseException as exc:  # every failure goes back to the caller, which shows it
        if not isinstance(exc, (DeepWMLError, Cancelled)):
            traceback.print_exc()  # into the log the caller keeps for an unexpected error
        write_whole(folder / "error.pkl", _picklable(exc))
        return 1
    finally:
        if orphaned() or abandoned():  # nobody will collect the results: the scan's copy must not stay behind
            _let_go_of_log()
            shutil.rmtree(folder, ignore_errors=True)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m DeepWMLLib.worker FOLDER", file=sys.stderr)
        return 2
    return run(Path(argv[0]))


if __name__ == "__main__":
    sys.exit(main())
