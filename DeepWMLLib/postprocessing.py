"""From a probability map to the final mask: threshold, small components, edge slices.

All steps work on the axial stack (slice, row, col) of `io.to_axial_stack`, so "first/last
slices" means the ends of the axial axis whatever order the file stores its axes in.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk


DEFAULT_MIN_LESION_MM3 = 5.0


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """26-connected components of a 3D mask, labelled 1..count in raster order (int32).

    The same labels as scipy.ndimage.label with a full 3×3×3 structure; SimpleITK does it
    without importing scipy, which alone would add half a second to every `deepwml segment`.
    """
    binary = np.ascontiguousarray(mask > 0, dtype=np.uint8)
    if binary.ndim != 3:
        raise ValueError(f"label_components needs a 3D mask, got {binary.ndim}D")
    labels = sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.GetImageFromArray(binary), True)).astype(np.int32)
    return labels, int(labels.max(initial=0))


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
