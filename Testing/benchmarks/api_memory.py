"""The process's peak memory while the Python API (`segment.segment_image`, which the Slicer module calls too)
segments a large scan given as a SimpleITK image, in bytes a voxel (README, "Large scans").

    python Testing/benchmarks/api_memory.py [--scan patient09_study2] [--shape 512,512,200]
                                            [--types uint16,int16,float64] [--json peaks.json]

The real clinical FLAIR is resampled (linear) to the shape and cast to each voxel type; each type is segmented
in a process of its own (CPU, the shipped default models and brain mask), after a run on 8 of its slices that
loads the models, so that the peak is the segmentation's. The peak is the resident memory's (`VmHWM` after
`/proc/self/clear_refs`: Linux only) beyond what the process held before the call: what SimpleITK and torch hold
too, which tracemalloc does not see; the scan itself, held before, is not counted. `--json` also records the
SHA-256 of the mask, map and brain mask and of the report (but its seconds), to compare two checkouts' outputs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
DATA = Path(os.environ.get("DEEPWML_SHARED_DATA", REPO.parent / "shared" / "data"))


def _status(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def measure(scan: str, shape: tuple, voxel_type: str) -> dict:
    """The peak of one segmentation of the scan resampled to `shape` as `voxel_type`, and its outputs' digests."""
    import numpy as np
    import SimpleITK as sitk

    from DeepWMLLib import io, segment

    source = io.read_image(DATA / "open_ms" / "clinical_flair" / f"{scan}.nii.gz")
    spacing = [n * s / m for n, s, m in zip(source.GetSize(), source.GetSpacing(), shape)]
    image = sitk.Resample(source, shape, sitk.Transform(), sitk.sitkLinear, source.GetOrigin(), spacing,
                          source.GetDirection(), 0.0, sitk.sitkFloat32)
    image = sitk.Cast(image, getattr(sitk, "sitk" + {"uint16": "UInt16", "int16": "Int16", "float64": "Float64",
                                                     "float32": "Float32"}[voxel_type]))
    del source
    models = segment.loaded_models(None)
    segment.segment_image(image[:, :, :8], models, "cpu", checked=True)  # the models loaded, the runners made
    before = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # the peak starts again from what is held now
    result = segment.segment_image(image, models, "cpu", checked=True)
    peak = _status("VmHWM") - before
    digests = {name: hashlib.sha256(sitk.GetArrayViewFromImage(getattr(result, name)).tobytes()).hexdigest()
               for name in ("mask", "probabilities", "brain")}
    report = json.dumps({**result.report, "seconds": 0}, sort_keys=True, default=str)
    digests["report"] = hashlib.sha256(report.encode()).hexdigest()
    return {"bytes_a_voxel": round(peak / int(np.prod(shape)), 2), "peak_mib": round(peak / 2 ** 20), **digests}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scan", default="patient09_study2", help="a clinical FLAIR of ../shared/data")
    parser.add_argument("--shape", default="512,512,200")
    parser.add_argument("--types", default="uint16,int16,float64")
    parser.add_argument("--json", help="write the figures and digests here")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a voxel type, measured in this process
    args = parser.parse_args()
    shape = tuple(int(n) for n in args.shape.split(","))
    if args.one:
        print(json.dumps(measure(args.scan, shape, args.one)))
        return
    results = {}
    for voxel_type in args.types.split(","):
        run = subprocess.run([sys.executable, __file__, "--scan", args.scan, "--shape", args.shape, "--one", voxel_type],
                             check=True, capture_output=True, text=True)
        results[voxel_type] = json.loads(run.stdout.strip().splitlines()[-1])
        print(f"{args.scan} {args.shape} {voxel_type}: {results[voxel_type]['bytes_a_voxel']:.2f} bytes a voxel "
              f"({results[voxel_type]['peak_mib']} MiB)", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
