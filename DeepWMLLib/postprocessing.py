"""From a probability map to the final mask: threshold, small components, edge slices.

All steps work on the axial stack (slice, row, col) of `io.to_axial_stack`, so "first/last
slices" means the ends of the axial axis whatever order the file stores its axes in.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

# 26-connectivity in 3D, as the report and the challenge's lesion counts use.
CONNECTIVITY_26 = np.ones((3, 3, 3), dtype=bool)

DEFAULT_MIN_LESION_MM3 = 5.0


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    labels, count = ndimage.label(mask > 0, structure=CONNECTIVITY_26)
    return labels, int(count)


def remove_small_components(mask: np.ndarray, voxel_volume_mm3: float, min_volume_mm3: float) -> np.ndarray:
    """Drop 3D components smaller than `min_volume_mm3` (noise specks, single hot voxels)."""
    if min_volume_mm3 <= 0 or not mask.any():
        return mask
    labels, count = label_components(mask)
    sizes = np.bincount(labels.ravel(), minlength=count + 1) * voxel_volume_mm3
    keep = sizes >= min_volume_mm3
    keep[0] = False
    return keep[labels].astype(mask.dtype)


def exclude_edge_slices(mask: np.ndarray, fraction: float) -> np.ndarray:
    """Clear the first and last `fraction` of axial slices (MICCAI winner: false positives there).

    The count is rounded down, so a fraction below 1/n_slices changes nothing.
    """
    if not 0 <= fraction < 0.5:
        raise ValueError(f"edge-slice fraction must be in [0, 0.5), got {fraction}")
    n = int(np.floor(mask.shape[0] * fraction))
    if n == 0:
        return mask
    out = mask.copy()
    out[:n] = 0
    out[-n:] = 0
    return out


def postprocess(probabilities: np.ndarray, threshold: float, voxel_volume_mm3: float,
                min_lesion_mm3: float = DEFAULT_MIN_LESION_MM3, exclude_edge_fraction: float = 0.0) -> np.ndarray:
    """Axial probability stack -> uint8 0/1 mask stack."""
    if not 0 < threshold < 1:
        raise ValueError(f"threshold must be between 0 and 1, got {threshold}")
    mask = (probabilities >= threshold).astype(np.uint8)
    mask = exclude_edge_slices(mask, exclude_edge_fraction)
    return remove_small_components(mask, voxel_volume_mm3, min_lesion_mm3)
