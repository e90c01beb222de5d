"""Label-free check of false positives outside the brain on the unlabelled clinical FLAIRs (skull on).

    deepwml segment ../shared/data/open_ms/clinical_flair -o out_v3 --model MODEL
    python Testing/benchmarks/scalp_zone.py out_v2 out_v3 [...] [--cases patient09_study2 ...]

For every clinical FLAIR of ../shared and every output folder, the volume (ml) of marked voxels whose
in-plane distance to the outside of the head is at most 10 mm: scalp and skull, where no WMH can be.
Head mask per slice: FLAIR > 10 % of its 99th percentile, closed, holes filled, largest component.
Marks at the skull base deeper than 10 mm are not counted, so this is a lower bound on them.

Also the volume marked in the lowest quarter of the slices that contain head (skull base, orbits,
posterior fossa), where white matter hyperintensities are rare and normal bright structures many,
and the volume marked elsewhere (deeper than 10 mm, above the lowest quarter): where WMH are.

--cases restricts the sums to these clinical FLAIRs (e.g. those a model never saw as training
backgrounds); the output folders need only those.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from DeepWMLLib.io import shared_data_dir  # noqa: E402

ZONE_MM = 10.0


def head_depth(image: sitk.Image) -> np.ndarray:
    """In-plane distance (mm) of each voxel to the outside of the head; 0 outside it."""
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    threshold = 0.1 * np.percentile(array, 99)
    spacing = image.GetSpacing()
    depth = np.zeros(array.shape, np.float32)
    for k in range(array.shape[0]):
        head = ndimage.binary_fill_holes(ndimage.binary_closing(array[k] > threshold, iterations=3))
        labels, count = ndimage.label(head)
        if count:
            head = labels == (np.argmax(np.bincount(labels.ravel())[1:]) + 1)
        depth[k] = ndimage.distance_transform_edt(head, sampling=(spacing[1], spacing[0]))
    return depth


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", help="output folders of deepwml segment over the clinical FLAIRs")
    parser.add_argument("--cases", nargs="+", help="only these clinical FLAIRs (names without .nii.gz)")
    args = parser.parse_args()
    shared = shared_data_dir()
    if shared is None:
        sys.exit("needs ../shared/data (or DEEPWML_SHARED_DATA)")
    flairs = sorted((shared / "open_ms" / "clinical_flair").glob("*.nii.gz"))
    if args.cases:
        unknown = sorted(set(args.cases) - {p.name[:-len(".nii.gz")] for p in flairs})
        if unknown:
            sys.exit(f"not a clinical FLAIR of ../shared: {', '.join(unknown)}")
        flairs = [p for p in flairs if p.name[:-len(".nii.gz")] in args.cases]
    depths = {}
    for path in flairs:
        image = sitk.ReadImage(str(path))
        depth = head_depth(image)
        # Lowest quarter below: slices ordered from inferior to superior.
        depths[path.name[:-len(".nii.gz")]] = depth if image.GetDirection()[8] >= 0 else depth[::-1]
    for folder in args.folders:
        zone_total = all_total = base_total = deep_total = 0.0
        per_case = []
        for case, depth in depths.items():
            mask = sitk.ReadImage(str(Path(folder) / f"{case}_wmh.nii.gz"))
            marked = sitk.GetArrayFromImage(mask) > 0
            if mask.GetDirection()[8] < 0:
                marked = marked[::-1]
            voxel_ml = float(np.prod(mask.GetSpacing())) / 1000
            surface = depth <= ZONE_MM
            zone = float((marked & surface).sum() * voxel_ml)
            total = float(marked.sum() * voxel_ml)
            head_slices = np.flatnonzero(depth.reshape(depth.shape[0], -1).max(axis=1) > 0)
            low = np.zeros(marked.shape[0], bool)
            if len(head_slices):
                low[:head_slices[0] + (len(head_slices) + 3) // 4] = True
            base = float(marked[low].sum() * voxel_ml)
            deep = float((marked & ~surface & ~low[:, None, None]).sum() * voxel_ml)
            zone_total += zone
            all_total += total
            base_total += base
            deep_total += deep
            per_case.append(f"{case} {zone:.2f}/{base:.2f}/{deep:.2f}/{total:.2f}")
        print(f"{folder}: {zone_total:.2f} ml within {ZONE_MM:g} mm of the head surface, {base_total:.2f} ml in the "
              f"lowest quarter of the head's slices, {deep_total:.2f} ml elsewhere, of {all_total:.2f} ml marked")
        print("    per case: surface zone / lowest quarter / elsewhere / all (ml)")
        print("    " + "; ".join(per_case))


if __name__ == "__main__":
    main()
