"""How long a Slicer GUI segmentation of the bundled sample takes as a worker thread and as a worker
process, when the application lets Python's global lock go and when it does not.

    python Testing/benchmarks/slicer_worker.py [--poll-ms 200] [--repeat 3]

The module polls its job with a 200 ms timer. Whether a Python thread of Slicer's process can run
between polls depends on whether Slicer's main thread releases the lock while it waits for events
(PythonQt's thread support), which cannot be checked without a real Slicer. Both cases are simulated
on slicer-core's MRML: "released" waits with time.sleep (which lets the lock go); "held" waits in a
C call that keeps it (ctypes.PyDLL), as an event loop without thread support would. Each poll then
runs the module's own bit of Python (job.done, job.fraction). Jobs are started as the module starts
them (DeepWMLCoreLogic.startSegmentation, shipped default model, brain mask and ventricle split);
one run of each kind first warms the caches. Prints the median wall time per kind.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "DeepWML"))
sys.path.insert(0, str(REPO / "Testing" / "slicer" / "support"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--poll-ms", type=float, default=200.0, help="the module's timer interval (200)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    import SimpleITK as sitk
    import slicer

    from DeepWMLSlicerLib import MRMLConversion as mrml
    from DeepWMLSlicerLib.CoreLogic import DeepWMLCoreLogic

    scene = slicer.vtkMRMLScene()
    slicer.mrmlScene = scene
    keep = slicer.vtkSlicerApplicationLogic()  # noqa: F841 (segment helpers need it alive)
    keep.SetMRMLScene(scene)
    volume = mrml.volumeFromImage(sitk.ReadImage(str(REPO / "Resources" / "Sample" / "sample_flair.nii.gz")),
                                  "sample")
    holding = ctypes.PyDLL(None)  # a call through PyDLL keeps the lock

    def run(python, held: bool) -> float:
        logic = DeepWMLCoreLogic()
        logic.workerPython = python
        started = time.perf_counter()
        job = logic.startSegmentation(volume, device="cpu")
        while not job.done:
            _ = job.fraction
            if held:
                holding.usleep(int(args.poll_ms * 1000))
            else:
                time.sleep(args.poll_ms / 1000)
        node = logic.finishSegmentation(job)
        seconds = time.perf_counter() - started
        scene.RemoveNode(node)
        return seconds

    kinds = [("thread, lock released", None, False), ("thread, lock held", None, True),
             ("process, lock released", sys.executable, False), ("process, lock held", sys.executable, True)]
    for _, python, _held in kinds[::2]:
        run(python, False)  # warm: imports, runtimes, the exported models
    for name, python, held in kinds:
        times = [run(python, held) for _ in range(args.repeat)]
        print(f"{name:24s} median {statistics.median(times):6.2f} s  ({', '.join(f'{t:.2f}' for t in times)})",
              flush=True)


if __name__ == "__main__":
    main()
