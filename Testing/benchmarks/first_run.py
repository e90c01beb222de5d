"""What the first network runs of a fresh process cost, by batch size (ONNX Runtime on the CPU).

    python Testing/benchmarks/first_run.py [--model FILE] [--batch-sizes 1 2 4] [--repeat 6] [--json OUT]

Each repetition starts one fresh Python process per batch size (taking turns, so a busy moment of
the machine hits every batch size alike). The process builds the ONNX Runtime session of the model
(the shipped default WMH model unless --model) as `deepwml segment` does, then runs 12 slices on
the model's grid in batches of the given size and reports, for the first 4 slices and for the next
4: wall time, user and system CPU time and minor page faults. "extra" is the first 4 slices' time
minus the mean of the next two groups of 4: the one-off cost of a fresh process at that batch size.
Prints medians over the repetitions.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

CHILD = r"""
import json, resource, sys, time
import numpy as np
sys.path.insert(0, sys.argv[3])
from DeepWMLLib.inference import OnnxRunner
from DeepWMLLib.segment import load_models

def usage():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return np.array([time.perf_counter(), r.ru_utime, r.ru_stime, r.ru_minflt])

(loaded,) = load_models([sys.argv[1]])
batch = int(sys.argv[2])
runner = OnnxRunner(loaded)
size = tuple(loaded.preprocessing.grid_size)
x = np.random.default_rng(0).standard_normal((12, 1, *size)).astype(np.float32)
marks = [usage()]
for start in range(0, 12, batch):
    runner(x[start:start + batch])
    if (start + batch) % 4 == 0:
        marks.append(usage())
first, second, third = (marks[i + 1] - marks[i] for i in range(3))
print(json.dumps({"batch": batch, "first4_s": first[0], "next4_s": (second[0] + third[0]) / 2,
                  "extra_s": first[0] - (second[0] + third[0]) / 2,
                  "first4_user_s": first[1], "next4_user_s": second[1], "first4_sys_s": first[2],
                  "next4_sys_s": second[2], "first4_faults": int(first[3]), "next4_faults": int(second[3])}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="WMH model file (default: the shipped default)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--repeat", type=int, default=6)
    parser.add_argument("--json")
    args = parser.parse_args()
    if any(b not in (1, 2, 4) for b in args.batch_sizes):
        raise SystemExit("batch sizes must divide 4: 1, 2 or 4")
    sys.path.insert(0, str(REPO))
    from DeepWMLLib.inference import OnnxRunner
    from DeepWMLLib.segment import default_model_paths, load_models

    model = args.model or default_model_paths()[0]
    OnnxRunner(load_models([model])[0])  # export and optimise into the cache before timing
    runs = {b: [] for b in args.batch_sizes}
    for _ in range(args.repeat):
        for b in args.batch_sizes:
            out = subprocess.run([sys.executable, "-c", CHILD, str(model), str(b), str(REPO)],
                                 capture_output=True, text=True, check=True)
            runs[b].append(json.loads(out.stdout.strip().splitlines()[-1]))
    summary = {}
    print(f"{Path(model).name}, {args.repeat} fresh processes per batch size, medians")
    print("batch  first 4 (ms)  next 4 (ms)  extra (ms)  sys first/next (ms)  faults first/next")
    for b, rows in runs.items():
        med = {k: statistics.median(r[k] for r in rows) for k in rows[0] if k != "batch"}
        summary[b] = med
        print(f"{b:5d}  {med['first4_s'] * 1e3:12.0f}  {med['next4_s'] * 1e3:11.0f}  {med['extra_s'] * 1e3:10.0f}"
              f"  {med['first4_sys_s'] * 1e3:8.0f} / {med['next4_sys_s'] * 1e3:<8.0f}"
              f"  {med['first4_faults']:7.0f} / {med['next4_faults']:.0f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": str(model), "repeat": args.repeat,
                                               "medians": summary, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
