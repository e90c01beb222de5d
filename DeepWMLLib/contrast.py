"""Does the scan look like a FLAIR? A check of tissue contrast inside the intracranial mask.

Picking the wrong series is the commonest input mistake in clinical use: a DICOM study holds T1-,
T2- and PD-weighted series beside the FLAIR, and all of them are 3D volumes of the head. The network
then still marks something, so DeepWML looks at the scan's own contrast and warns:

* On FLAIR the ventricles are dark (CSF nulled) and the cortex is brighter than the white matter.
* On T2- and PD-weighted scans the ventricles are bright or grey, never dark: in the deep brain
  (at least `DEEP_MM` from the intracranial mask's surface, which holds the lateral ventricles and the
  deep white matter) almost no voxel is darker than half the deep median (`DARK_FRACTION_MIN`).
* On T1-weighted scans the cortex is darker than the white matter: in the cortical shell
  (`SHELL_MM` under the surface) few voxels are brighter than the deep median (`CORTEX_BRIGHTER_MIN`),
  where on FLAIR about half or more are.

The deep median stands for the white matter (the deep brain is mostly white matter; voxels the model
marked as lesion are left out). Nothing is judged when the deep brain is under `MIN_DEEP_ML` (a brain
mask that failed, a partial field of view) or when there is no brain mask.

How the bounds were set and checked (`python Testing/benchmarks/contrast_check.py`, 5 min): they were
chosen on 21 real FLAIRs (the 11 clinical scans, the sample, the 3 labelled cases at 1 / 5 / 8 mm: dark
fraction 0.011-0.17, cortex brighter 0.49-0.78), nilearn's MNI152 T1 template at 1 / 5 / 8 mm (cortex
brighter 0.15-0.16) and synthetic heads rendered with FLAIR, T1, T2 and PD contrast (seeds 0-3 and
100-107); the held-out draw (seeds 200-207) and what it caught are in README ("Is it a FLAIR?"). No
real T2 or PD scan was available: those figures are synthetic.
"""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

DEEP_MM = 20.0
SHELL_MM = (3.0, 10.0)
MIN_DEEP_ML = 50.0
DARK_RATIO = 0.5
DARK_FRACTION_MIN = 0.004
CORTEX_BRIGHTER_MIN = 0.35

FLAIR_DARK_RANGE = "1.1-17 %"  # what the real FLAIRs above gave, quoted in the warnings
FLAIR_CORTEX_RANGE = "49-78 %"


def _depth_mm(intracranial: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """Distance in mm from each intracranial voxel to the nearest voxel outside (slices beyond the
    stack count as outside). `spacing` is (slice, row, col) as the stack's axes."""
    # The distance map of the outside, read inside: the exact Euclidean distance to the nearest outside
    # voxel centre (as scipy's distance_transform_edt, about 8x faster); the map of the mask itself
    # would measure to the mask's own edge voxels, a voxel less.
    outside = np.pad(~intracranial, ((1, 1), (0, 0), (0, 0)), constant_values=True)
    image = sitk.GetImageFromArray(outside.astype(np.uint8))
    image.SetSpacing((float(spacing[2]), float(spacing[1]), float(spacing[0])))
    distance = sitk.SignedMaurerDistanceMap(image, insideIsPositive=False, squaredDistance=False,
                                            useImageSpacing=True)
    return np.maximum(sitk.GetArrayViewFromImage(distance)[1:-1], 0)


def flair_contrast(stack: np.ndarray, intracranial: np.ndarray, lesion: np.ndarray,
                   spacing: tuple[float, float, float]) -> dict:
    """Figures of the check and its verdict for an axial stack ([slice, row, col]) with its
    intracranial and lesion masks (same shape, bool) and spacing (slice, row, col) in mm.

    `looks_like`: "FLAIR", "T1-weighted", "T2- or PD-weighted", or None when not judged."""
    # Holes filled slice by slice: on a scan that is not a FLAIR the brain-mask network may leave out
    # the ventricles or cut the brain into pieces, and the depth is measured from the skull inwards.
    inside = np.stack([ndimage.binary_fill_holes(plane) for plane in np.asarray(intracranial, bool)])
    lesion = np.asarray(lesion, bool)
    depth = _depth_mm(inside, spacing)
    voxel_ml = float(np.prod(spacing)) / 1000
    deep = inside & (depth >= DEEP_MM)
    deep_ml = float(np.count_nonzero(deep)) * voxel_ml
    result = {"deep_ml": round(deep_ml, 1), "dark_fraction": None, "cortex_brighter_fraction": None,
              "looks_like": None}
    if deep_ml < MIN_DEEP_ML:
        return result
    # The white matter's level: the deep brain the model did not mark (all of it when the model marked
    # most of it, as it does on T2, where CSF is bright).
    normal = deep & ~lesion
    values = stack[deep]
    reference = float(np.median(stack[normal] if np.count_nonzero(normal) * voxel_ml >= MIN_DEEP_ML else values))
    shell = inside & (depth >= SHELL_MM[0]) & (depth <= SHELL_MM[1]) & ~lesion
    if reference <= 0 or not shell.any():
        return result
    dark = float(np.mean(values < DARK_RATIO * reference))
    brighter = float(np.mean(stack[shell] > reference))
    looks_like = "FLAIR"
    if dark < DARK_FRACTION_MIN:
        looks_like = "T2- or PD-weighted"
    elif brighter < CORTEX_BRIGHTER_MIN:
        looks_like = "T1-weighted"
    result.update(dark_fraction=round(dark, 4), cortex_brighter_fraction=round(brighter, 3), looks_like=looks_like)
    return result


def contrast_warnings(check: dict) -> list[str]:
    """The warning for a scan that does not look like a FLAIR (none otherwise)."""
    if check.get("looks_like") == "T2- or PD-weighted":
        return [f"this does not look like a FLAIR: the ventricles are not dark ({check['dark_fraction']:.1%} of the "
                f"deep brain is darker than half its median; {FLAIR_DARK_RANGE} on the real FLAIRs checked), as on a "
                "T2- or PD-weighted scan, where DeepWML marks CSF as lesion: check the series"]
    if check.get("looks_like") == "T1-weighted":
        return [f"this does not look like a FLAIR: the cortex is darker than the white matter (only "
                f"{check['cortex_brighter_fraction']:.0%} of it is brighter than the deep white matter; "
                f"{FLAIR_CORTEX_RANGE} on the real FLAIRs checked), as on a T1-weighted scan, where lesions are not "
                "bright and the figures mean nothing: check the series"]
    return []
