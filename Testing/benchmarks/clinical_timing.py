"""Seconds per case of `deepwml segment` on the 11 real clinical FLAIRs, with a chosen network size.

    python Testing/benchmarks/clinical_timing.py [--base-channels 64] [--depth 4] [--model FILE] [--backend auto]

Without --model it writes a random-weight U-Net of the given size (default: the paper's, 64 channels
at the top, 96 GFLOP per 256×256 slice) — weights do not change the time. It runs the CLI once on
the whole folder in a fresh process and prints each case's seconds (read, preprocess, infer,
post-process and write, as `summary.csv` records them) and the process's wall time.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from DeepWMLLib.io import shared_data_dir  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-channels", type=int, default=64)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--model", help="time this model file instead of a random-weight one")
    parser.add_argument("--backend", default="auto", choices=("auto", "openvino", "onnx", "torch"))
    args = parser.parse_args(argv)
    shared = shared_data_dir()
    if shared is None:
        raise SystemExit("../shared/data is absent: the clinical FLAIRs are needed")
    folder = shared / "open_ms" / "clinical_flair"
    work = Path(tempfile.mkdtemp(prefix="deepwml-timing-"))
    model = args.model
    if model is None:
        import torch

        from DeepWMLLib.checkpoint import save_model
        from DeepWMLLib.model import build_model
        from DeepWMLLib.preprocessing import PreprocessingConfig

        torch.manual_seed(0)
        config = {"base_channels": args.base_channels, "depth": args.depth}
        model = str(save_model(work / "random.pt", build_model(config), config, PreprocessingConfig(), 0.5,
                               {"kind": "random weights for timing"}))
    out = work / "out"
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "DeepWMLLib.cli", "segment", str(folder), "-o", str(out),
                           "--model", model, "--device", "cpu", "--backend", args.backend],
                          capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        print(proc.stderr[-2000:], file=sys.stderr)
        return 1
    with open(out / "summary.csv", newline="", encoding="utf-8-sig") as f:
        rows = list(csv.DictReader(f))
    print("| case | seconds |\n|---|---|")
    for row in rows:
        print(f"| {row['case']} | {float(row['seconds']):.1f} |")
    seconds = [float(r["seconds"]) for r in rows]
    print(f"\n{len(rows)} cases, mean {sum(seconds) / len(seconds):.1f} s per case "
          f"(min {min(seconds):.1f}, max {max(seconds):.1f}); whole process {wall:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
