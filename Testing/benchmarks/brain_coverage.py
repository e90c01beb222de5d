"""The brain mask's figures on the real scans: its size against the head mask's, and the coverage check's.

    python Testing/benchmarks/brain_coverage.py [--crops] [--scans NAME ...]

Scans: the 11 clinical FLAIRs (../shared/data/open_ms/clinical_flair), the 3 labelled cases at 1 mm and re-sliced to
5 and 8 mm (labelled_cases.thick_slices; evaluation only: nothing here tunes a model), also cut so that the highest
5 or 8 mm slice just reaches the top of the brain ("top"), and the bundled sample. Per
scan, as `deepwml segment` computes them with the shipped brain-mask network: the brain mask / head mask voxel ratio
(segment's BRAIN_COVERAGE warning), the brain's distance in mm from each edge of the field of view (right, left,
anterior, posterior), the brain on the highest and lowest slice as a share of its largest cross-section
(`brain_at_fov_edge`) and what the check calls cut. The brain network stands in for the lesion network, which
neither figure reads (the head mask and the brain network's grid do not depend on it): seconds a scan, not 20.

--crops: also the crops the check's margins were set by, of the clinical FLAIRs and the labelled cases at 1 and
5 mm: the field of view moved 10, 20 and 30 mm into the brain from each side (the longest contact of the brain
with that edge on one slice, in mm; the check needs FOV_EDGE_CONTACT_MM; and how far short of the edge the mask
stops, between pixel centres), the top 20 mm of the brain cut off, and
the slab ending 90 and 110 mm below the top of the brain (the end slice's share; the check needs FOV_END_SHARE).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from DeepWMLLib import io  # noqa: E402
from DeepWMLLib.preprocessing import plan_volume  # noqa: E402
from DeepWMLLib.segment import FOV_EDGE_BAND_MM, FOV_SIDES, load_brain_model, segment_image  # noqa: E402
from labelled_cases import CASES, thick_slices  # noqa: E402

SIDE_DEPTHS_MM = (10, 20, 30)
TOP_CUT_MM = 20
BOTTOM_CUTS_MM = (90, 110)  # the slab ends this far below the top of the brain


def scans(shared: Path):
    """(name, a reader of the image, whether its crops are measured) of every scan, read as `deepwml segment` reads
    them."""
    for path in sorted((shared / "open_ms" / "clinical_flair").glob("*.nii.gz")):
        yield path.name[:-len(".nii.gz")], (lambda p=path: io.read_image(p)), True
    for case in CASES:
        for mm in (1, 5, 8):
            yield (f"{case}@{mm}mm",
                   (lambda c=case, t=mm: thick_slices(io.read_image(shared / "open_ms" / "labelled" / c / "flair.nii.gz"),
                                                      t)), mm < 8)
        for mm in (5, 8):
            yield (f"{case}@{mm}mm top",
                   (lambda c=case, t=mm: to_the_top(io.read_image(shared / "open_ms" / "labelled" / c / "flair.nii.gz"),
                                                    t)), False)
    yield "sample", (lambda: io.read_image(REPO / "Resources" / "Sample" / "sample_flair.nii.gz")), False


def to_the_top(image: sitk.Image, thickness: int) -> sitk.Image:
    """A skull-stripped scan cut to the slices with brain and re-sliced to `thickness` mm slices of which the highest
    ends at the top of the brain, as a slab planned to just reach it would (on the labelled cases' own grid the
    highest thick slice lies above the brain: it holds none)."""
    stack, frame = io.to_axial_stack(image)
    brain = np.flatnonzero(stack.any(axis=(1, 2)))
    cut = crop(image, frame, slices=(brain[0], brain[-1] + 1))
    return thick_slices(cut, thickness, offset=(brain.size % thickness) if frame.inferior_first else 0)


def measure(image: sitk.Image, brain) -> dict:
    """The figures of one scan, from the run `deepwml segment` makes, and its brain mask as an axial stack."""
    result = segment_image(image, [brain], device="cpu", brain_model=brain, ventricle_model=None)
    stack, frame = io.to_axial_stack(result.brain, dtype=np.uint8)
    head = plan_volume(io.to_axial_stack(image, copy=False)[0], frame, ()).head_voxels  # as predict_maps plans it
    fov = result.report["brain_at_fov_edge"]
    cols, rows = np.flatnonzero(stack.any(axis=(0, 1))), np.flatnonzero(stack.any(axis=(0, 2)))
    gaps = (cols[0] * frame.col_spacing_mm, (stack.shape[2] - 1 - cols[-1]) * frame.col_spacing_mm,
            rows[0] * frame.row_spacing_mm, (stack.shape[1] - 1 - rows[-1]) * frame.row_spacing_mm)
    return {"coverage": int(np.count_nonzero(stack)) / max(1, head), "edge_mm": dict(zip(FOV_SIDES, gaps)),
            "top": fov["top_slice_share"], "bottom": fov["bottom_slice_share"], "cut": fov["cut"],
            "seconds": result.report["seconds"], "stack": stack, "frame": frame}


def contact_mm(stack: np.ndarray, frame: io.SliceFrame, side: str) -> float:
    """The longest stretch of `side`'s edge band (FOV_EDGE_BAND_MM) the brain mask touches on one axial slice, in mm."""
    rows = max(1, math.ceil(FOV_EDGE_BAND_MM / frame.row_spacing_mm - 1e-9))
    cols = max(1, math.ceil(FOV_EDGE_BAND_MM / frame.col_spacing_mm - 1e-9))
    band = {"right": stack[:, :, :cols].any(axis=2), "left": stack[:, :, -cols:].any(axis=2),
            "anterior": stack[:, :rows, :].any(axis=1), "posterior": stack[:, -rows:, :].any(axis=1)}[side]
    mm = frame.row_spacing_mm if side in ("right", "left") else frame.col_spacing_mm
    return float(band.sum(axis=1).max(initial=0) * mm)


def crop(image: sitk.Image, frame: io.SliceFrame, slices=None, rows=None, cols=None) -> sitk.Image:
    """`image` cut to the axial stack's [first, last) slices, rows and columns (None: all of them)."""
    index = [slice(None)] * 3
    for axis, kept, flip in ((frame.slice_axis, slices, False), (frame.row_axis, rows, frame.flip_row),
                             (frame.col_axis, cols, frame.flip_col)):
        if kept is not None:
            first, last = kept
            n = frame.size[axis]
            index[axis] = slice(n - last, n - first) if flip else slice(first, last)
    return image[tuple(index)]


def crops(image: sitk.Image, whole: dict):
    """(what, cropped image, side or end it cuts) for each crop, placed from the whole scan's brain mask."""
    stack, frame = whole["stack"], whole["frame"]
    n_slices, n_rows, n_cols = stack.shape
    cols, rows = np.flatnonzero(stack.any(axis=(0, 1))), np.flatnonzero(stack.any(axis=(0, 2)))
    for mm in SIDE_DEPTHS_MM:
        c, r = round(mm / frame.col_spacing_mm), round(mm / frame.row_spacing_mm)
        yield f"right {mm} mm", crop(image, frame, cols=(cols[0] + c, n_cols)), "right"
        yield f"left {mm} mm", crop(image, frame, cols=(0, cols[-1] + 1 - c)), "left"
        yield f"anterior {mm} mm", crop(image, frame, rows=(rows[0] + r, n_rows)), "anterior"
        yield f"posterior {mm} mm", crop(image, frame, rows=(0, rows[-1] + 1 - r)), "posterior"
    slices = np.flatnonzero(stack.any(axis=(1, 2)))
    top = slices[-1] if frame.inferior_first else slices[0]  # the brain's highest slice

    def below_top(mm):  # the slice `mm` below the top of the brain
        step = round(mm / frame.slice_thickness_mm)
        return top - step if frame.inferior_first else top + step

    up = frame.inferior_first
    cut = below_top(TOP_CUT_MM)
    yield f"top {TOP_CUT_MM} mm", crop(image, frame, slices=(0, cut + 1) if up else (cut, n_slices)), "top"
    for mm in BOTTOM_CUTS_MM:
        end = below_top(mm)
        yield f"bottom at {mm} mm", crop(image, frame, slices=(end, n_slices) if up else (0, end + 1)), "bottom"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--crops", action="store_true", help="also the crops the coverage check's margins were set by")
    parser.add_argument("--scans", nargs="+", help="only these scans (names as printed)")
    args = parser.parse_args(argv)
    shared = io.shared_data_dir()
    if shared is None:
        raise SystemExit("../shared/data is absent: the clinical FLAIRs and the labelled cases are needed")
    brain = load_brain_model("default")
    print("scan                 brain/head  right  left  ant.  post. (mm from the edge)  top  bottom  cut       s")
    for name, read, cropped in scans(shared):
        if args.scans and name not in args.scans:
            continue
        image = read()
        whole = measure(image, brain)
        edges = "  ".join(f"{whole['edge_mm'][side]:5.1f}" for side in FOV_SIDES)
        print(f"{name:20s} {whole['coverage']:9.3f}  {edges}                    {whole['top']:5.3f} "
              f"{whole['bottom']:5.3f}  {','.join(whole['cut']) or '-':9s} {whole['seconds']:5.1f}", flush=True)
        if not (args.crops and cropped):
            continue
        start = time.perf_counter()
        found = []
        for what, part, side in crops(image, whole):
            got = measure(part, brain)
            figure = (f"{contact_mm(got['stack'], got['frame'], side):.3g} mm, {got['edge_mm'][side]:.1f} mm short"
                      if side in FOV_SIDES else f"{got[side]:.3f}")
            found.append(f"{what}: {figure}{'' if side in got['cut'] else ' (not said)'}")
        print(f"    crops ({time.perf_counter() - start:.0f} s): " + "; ".join(found), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
