"""Copies of model files that run on another network grid (same weights): for scale test-time
augmentation (Resources/Models/README.md, "Session 15: each member at three pixel sizes").

    python Testing/benchmarks/grid_copies.py runs/ms 0.8 288 Resources/Models/deepwml_unet16_adabn_*.pt
    python Testing/benchmarks/grid_copies.py runs/ms 1.0 256 Resources/Models/deepwml_unet16_adabn_*.pt

Each copy is written as <stem>_g<spacing in 1/100 mm>.pt; its provenance says what it is a copy of.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from DeepWMLLib.checkpoint import load_payload  # noqa: E402
from DeepWMLLib.io import write_atomically  # noqa: E402
from DeepWMLLib.preprocessing import PreprocessingConfig  # noqa: E402


def grid_copy(path, out_dir, spacing_mm: float, size: int) -> Path:
    import torch

    payload = load_payload(path)
    preprocessing = dict(payload["preprocessing"], grid_spacing_mm=float(spacing_mm), grid_size=[size, size])
    PreprocessingConfig.from_dict(preprocessing)  # refuse what the loader would refuse
    payload["preprocessing"] = preprocessing
    payload["provenance"] = dict(payload.get("provenance", {}),
                                 grid_copy=f"{Path(path).name} on a {size}x{size} grid of {spacing_mm} mm")
    target = Path(out_dir) / f"{Path(path).stem}_g{round(spacing_mm * 100)}.pt"
    return write_atomically(target, lambda tmp: torch.save(payload, tmp))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("spacing_mm", type=float)
    ap.add_argument("size", type=int)
    ap.add_argument("models", nargs="+")
    args = ap.parse_args(argv)
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    for m in args.models:
        print(grid_copy(m, args.out_dir, args.spacing_mm, args.size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
