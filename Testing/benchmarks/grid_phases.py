"""How steady the lesion marks are when the network grid moves by a fraction of a pixel, with and without --grid-phases 4.

`--grid-phases 4` averages the lesion map over the grid moved by 0 and half a pixel along rows and columns.

On the real clinical FLAIRs of ../shared (no labels needed: the scans of change_pairs.SAME, or the names
given), each scan is segmented as `deepwml segment` does (shipped models) on its grid and on the grid moved
by a quarter and by half a network pixel (every phase of the set moved alike), for each phase count. Per scan
and in total: Dice of the moved result against the unmoved one, lesions of either found in none of the other's
(flicker: 'new' or 'gone' by sampling alone), the volume, and the seconds per axial slice of the whole
segmentation.

    python Testing/benchmarks/grid_phases.py [SCAN ...] [--phases 1 4] [--half]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from DeepWMLLib import io, preprocessing  # noqa: E402

QUARTER, HALF = (0.25, 0.25), (0.5, 0.5)  # moves in network pixels, along rows and columns


@contextlib.contextmanager
def moved_grid(rows: float, cols: float):
    """Every network grid planned meanwhile moved by (`rows`, `cols`) network pixels."""
    original = preprocessing.NetworkGrid.plan
    preprocessing.NetworkGrid.plan = classmethod(lambda cls, *a, **k: original.__func__(cls, *a, **k).shifted(rows, cols))
    try:
        yield
    finally:
        preprocessing.NetworkGrid.plan = original


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = np.count_nonzero(a) + np.count_nonzero(b)
    return 1.0 if total == 0 else 2.0 * np.count_nonzero(a & b) / total


def unmatched(a: np.ndarray, b: np.ndarray) -> int:
    """Lesions (26-connected components) of `a` that touch no voxel of `b`."""
    from scipy import ndimage

    labels, count = ndimage.label(a, np.ones((3, 3, 3)))
    touched = np.unique(labels[b & (labels > 0)])
    return int(count - touched.size)


def segment(image, phases: int):
    import SimpleITK as sitk

    from DeepWMLLib.segment import segment_image

    start = time.perf_counter()
    result = segment_image(image, grid_phases=phases, checked=True)
    seconds = time.perf_counter() - start
    return sitk.GetArrayFromImage(result.mask) > 0, result.report, seconds


def main() -> int:
    from change_pairs import SAME

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scans", nargs="*", default=sorted({name for pair in SAME for name in pair}))
    parser.add_argument("--phases", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--half", action="store_true", help="also move the grid by half a pixel (maps the set of "
                        "--grid-phases 4 onto itself, up to whole pixels)")
    args = parser.parse_args()
    moves = (QUARTER, HALF) if args.half else (QUARTER,)
    root = io.shared_data_dir()
    if root is None:
        print("../shared/data is absent", file=sys.stderr)
        return 1
    folder = root / "open_ms" / "clinical_flair"
    heads = " | ".join(f"Dice / flicker moved {r:g},{c:g}" for r, c in moves)
    print(f"| scan | phases | ml | lesions | {heads} | s per slice |")
    print("|---|---|---|---|" + "---|" * len(moves) + "---|")
    totals = {k: {"dice": [[] for _ in moves], "flicker": [0] * len(moves), "seconds": 0.0, "slices": 0, "ml": []}
              for k in args.phases}
    segment(io.read_image(folder / f"{args.scans[0]}.nii.gz"), 1)  # warm-up: models loaded, networks compiled
    for name in args.scans:
        image = io.read_image(folder / f"{name}.nii.gz")
        slices = image.GetSize()[io.axial_axis(image)]
        for k in args.phases:
            base, report, seconds = segment(image, k)
            cells = []
            for number, move in enumerate(moves):
                with moved_grid(*move):
                    other, _, _ = segment(image, k)
                d, f = dice(base, other), unmatched(base, other) + unmatched(other, base)
                totals[k]["dice"][number].append(d)
                totals[k]["flicker"][number] += f
                cells.append(f"{d:.3f} / {f}")
            totals[k]["seconds"] += seconds
            totals[k]["slices"] += slices
            totals[k]["ml"].append(report["volume_ml"])
            print(f"| {name} | {k} | {report['volume_ml']:.2f} | {report['lesion_count']} | {' | '.join(cells)} "
                  f"| {seconds / slices:.3f} |", flush=True)
    for k, t in totals.items():
        cells = [f"{np.mean(d):.3f} (min {np.min(d):.3f}) / {f}" for d, f in zip(t["dice"], t["flicker"])]
        print(f"| all | {k} | {np.sum(t['ml']):.2f} | | {' | '.join(cells)} | {t['seconds'] / t['slices']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
