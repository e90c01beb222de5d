"""Label-free check of false positives outside the brain on the unlabelled clinical FLAIRs (skull on).

    deepwml segment ../shared/data/open_ms/clinical_flair -o out_v3 --model MODEL
    python Testing/benchmarks/scalp_zone.py out_v2 out_v3 [...]

For every clinical FLAIR of ../shared and every output folder, the volume (ml) of marked voxels whose
in-plane distance to the outside of the head is at most 10 mm: scalp and skull, where no WMH can be.
Head mask per slice: FLAIR > 10 % of its 99th percentile, closed, holes filled, largest component.
Marks at the skull base deeper than 10 mm are not counted, so this is a lower bound on them.
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
    shared = shared_data_dir()
    if shared is None or len(sys.argv) < 2:
        sys.exit(__doc__)
    flairs = sorted((shared / "open_ms" / "clinical_flair").glob("*.nii.gz"))
    depths = {p.name[:-len(".nii.gz")]: head_depth(sitk.ReadImage(str(p))) for p in flairs}
    for folder in sys.argv[1:]:
        zone_total = all_total = 0.0
        per_case = []
        for case, depth in depths.items():
            mask = sitk.ReadImage(str(Path(folder) / f"{case}_wmh.nii.gz"))
            marked = sitk.GetArrayFromImage(mask) > 0
            voxel_ml = float(np.prod(mask.GetSpacing())) / 1000
            zone = float((marked & (depth <= ZONE_MM)).sum() * voxel_ml)
            total = float(marked.sum() * voxel_ml)
            zone_total += zone
            all_total += total
            per_case.append(f"{case} {zone:.2f}/{total:.2f}")
        print(f"{folder}: {zone_total:.2f} ml within {ZONE_MM:g} mm of the head surface, of {all_total:.2f} ml marked")
        print("    " + "; ".join(per_case))


if __name__ == "__main__":
    main()
