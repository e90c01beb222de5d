"""Where the lesions lie: periventricular or deep white matter, by the 10 mm rule.

Radiologists grade WMH separately next to the ventricles and in the deep white matter (Fazekas et al.
1987); automated pipelines split the volume by distance to the lateral ventricles, a voxel within 10 mm
of them being periventricular (the "10 mm distance rule", one of the rules compared by Griffanti et al.,
NeuroImage: Clinical 2018). Here:

- the lateral ventricles come from a ventricle network (`deepwml segment --ventricle-model`; role
  "ventricles" in models.json; the shipped one, trained on synthetic FLAIR only, is not on by default:
  it marks too little of real ventricles, its card in Resources/Models/README.md), probability >= the
  model's threshold (0.5) inside the intracranial mask; 3D components under a tenth of the largest are dropped (a dark spot in
  the white matter must not make the lesions around it periventricular);
- distances are Euclidean, in mm, between voxel centres on the scan's own grid (thick slices count
  their full spacing across slices);
- totals are voxel-wise (a confluent lesion reaching from the ventricle wall into the deep white matter
  counts in both); each lesion also gets its shortest distance to the ventricles (0 where it overlaps
  them) and the share of it within 10 mm;
- lesions below the tentorium (brainstem, cerebellum) more than 10 mm from the ventricles count as deep:
  the split is meant for the supratentorial white matter;
- no ventricles found (a scan not covering them, or a network failure), or implausibly little of them:
  the split is not made and the report says why; nothing else changes.

The figures are estimates: no ventricle network here was measured against manual ventricle outlines
(none are available), so a location is a pointer for reading, not a grade.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import SimpleITK as sitk

PERIVENTRICULAR_MM = 10.0
VENTRICLE_THRESHOLD = 0.5
# Components smaller than this share of the largest are not taken for ventricle.
MIN_COMPONENT_SHARE = 0.1
# Less lateral ventricle than this (ml) and the split is not made: adult lateral ventricles hold about
# 7-70 ml; a scan that shows under 1 ml of them does not cover them, or the network failed on it.
MIN_VENTRICLES_ML = 1.0
# A scan that covers the whole brain (an intracranial volume of WHOLE_BRAIN_ML or more) with less lateral ventricle
# than SMALL_VENTRICLES_ML, the low end of adults', is split all the same, with a warning: the ventricle network
# may have marked only part of them (4.8 ml on a whole-brain clinical FLAIR, patient09_study2, that called 80 % of
# the lesion volume deep), which moves lesions from periventricular to deep.
SMALL_VENTRICLES_ML = 7.0
WHOLE_BRAIN_ML = 1000.0
RULE = f"periventricular: within {PERIVENTRICULAR_MM:g} mm of the lateral ventricles (voxel-wise); deep: further"


def ventricle_mask(probabilities: np.ndarray, brain: np.ndarray | None = None,
                   threshold: float = VENTRICLE_THRESHOLD) -> np.ndarray:
    """The lateral ventricles (bool stack) from the ventricle network's probability map (or its 0/1 mask at
    `threshold`, as predict_maps gives it): >= `threshold` (the model file's; 0.5 for the shipped one), inside
    `brain` (bool, the intracranial mask) when given, small stray components dropped (26-connected, labelled in a
    byte a voxel up to 255 components, where scipy's int32 labels were 1.7 GB at 1024 x 1024 x 400)."""
    from .postprocessing import label_components

    mask = probabilities >= threshold
    if brain is not None:
        mask &= brain
    labels, count = label_components(mask, compact=True)
    if count <= 1:
        return mask
    sizes = sum(np.bincount(plane.ravel(), minlength=count + 1) for plane in labels)[1:]  # a slice at a time: bincount
    # reads labels as 8-byte integers
    keep = np.zeros(count + 1, bool)
    keep[1:] = sizes >= MIN_COMPONENT_SHARE * sizes.max()
    return keep[labels]


def ventricle_distance(ventricles: np.ndarray, spacing: tuple[float, float, float],
                       at: tuple[np.ndarray, ...] | None = None) -> np.ndarray:
    """Distance in mm from every voxel to the nearest ventricle voxel (0 inside); `spacing` (slice, row,
    col) in mm. Needs at least one ventricle voxel. With `at` (index arrays into the stack, as np.nonzero gives
    them: the lesions' voxels), the distances there only, in that order, float32 as the map's (the map is not
    made: ITK's float32 map and its work copy were 3.4 GB at 1024 x 1024 x 400)."""
    import SimpleITK as sitk

    if not ventricles.any():
        raise ValueError("no ventricle voxel to measure distances from")
    box = (slice(None),) * 3
    if at is not None:
        # ITK measures from the stack's first voxel to just past the last ventricle or `at` voxel along each axis,
        # not over the whole stack: no ventricle voxel lies beyond, and every voxel keeps its place counted from the
        # stack's start, on which ITK's float32 positions depend (a box starting further in changed the last bits
        # of half the distances), so they are the whole map's to the bit. One voxel past the last ventricle voxel
        # gives every ventricle voxel the neighbours it has in the whole stack, so ITK finds the same contour.
        across = ventricles.any(axis=0)  # the slices ORed: one plane
        spans = (np.fromiter((plane.any() for plane in ventricles), bool, len(ventricles)),
                 across.any(axis=1), across.any(axis=0))
        box = tuple(slice(0, min(len(span), max(int(np.flatnonzero(span)[-1]) + 2, int(np.max(where, initial=-1)) + 1)))
                    for span, where in zip(spans, at))
    image = sitk.GetImageFromArray(np.ascontiguousarray(ventricles[box], bool).view(np.uint8))  # bool: no copy
    image.SetSpacing([float(spacing[2]), float(spacing[1]), float(spacing[0])])
    distance = sitk.SignedMaurerDistanceMap(image, insideIsPositive=False, squaredDistance=False,
                                            useImageSpacing=True)
    values = sitk.GetArrayViewFromImage(distance)
    return np.maximum(values if at is None else values[at], 0).astype(np.float32, copy=False)  # float32 already


def split_volumes(distance: np.ndarray, voxel_mm3: float) -> dict:
    """Periventricular and deep lesion volume (ml), by the 10 mm rule, from the distances at the lesion voxels."""
    near = np.count_nonzero(distance <= PERIVENTRICULAR_MM)
    return {"periventricular_ml": round(near * voxel_mm3 / 1000, 6),
            "deep_ml": round((distance.size - near) * voxel_mm3 / 1000, 6)}


def locate(lesion: tuple[np.ndarray, ...], ventricles: np.ndarray,
           spacing: tuple[float, float, float]) -> tuple[dict, np.ndarray | None]:
    """The report's `location` entry for the lesions and a bool ventricle stack (`spacing` (slice, row, col) in
    mm), and the distances at the lesion voxels (None when the split is not made). `lesion`: its voxels' positions
    in the stack (index arrays, as np.nonzero gives them, in any order); the distances come back in that order, and
    no map of the whole stack is made (a large scan's was 1.7 GB, and 3.4 GB while ITK made it)."""
    voxel_mm3 = float(np.prod(spacing))
    ventricles_ml = np.count_nonzero(ventricles) * voxel_mm3 / 1000
    entry = {"rule": RULE, "ventricles_ml": round(ventricles_ml, 3)}
    if ventricles_ml < MIN_VENTRICLES_ML:
        entry.update(judged=False, periventricular_ml=None, deep_ml=None,
                     why=f"{ventricles_ml:.2f} ml of lateral ventricle found (under {MIN_VENTRICLES_ML:g} ml): the scan "
                         "may not cover them, or the ventricle network failed on it; no periventricular/deep split")
        return entry, None
    distance = ventricle_distance(ventricles, spacing, at=lesion)
    entry.update(judged=True, **split_volumes(distance, voxel_mm3))
    return entry, distance


def locate_images(mask: sitk.Image, ventricles: sitk.Image) -> tuple[dict, np.ndarray | None]:
    """`locate` for a lesion mask and a ventricle mask on one grid (images, e.g. a Slicer segmentation's
    two segments): the `location` entry, and the distances at the mask's nonzero voxels in the order of its own
    voxels (np.flatnonzero of `volume.voxels`, as `report.lesion_report` reads them), None when the split is not
    made. No map of the whole volume is made: with it, copied and put back on the grid, the Slicer module's
    statistics peaked at 800 MiB on a 512 x 512 x 200 scan, 382 MiB without."""
    from . import io

    if ventricles.GetSize() != mask.GetSize():
        raise ValueError(f"the ventricle mask {ventricles.GetSize()} is not on the lesion mask's grid {mask.GetSize()}")
    frame = io.slice_frame(mask)
    inside, _ = io.to_axial_stack(ventricles, dtype=np.uint8, copy=False)
    spacing = (frame.slice_thickness_mm, frame.row_spacing_mm, frame.col_spacing_mm)
    return locate(io.axial_positions(mask, frame), inside > 0, spacing)


def small_ventricles_warning(entry: dict | None, intracranial_ml: float | None) -> str | None:
    """A warning for a split made with fewer lateral ventricles than an adult's on a scan that covers the whole
    brain (`entry`: `locate`'s; `intracranial_ml`: the brain mask's volume, None without one): the split may be
    wrong, so the reader checks the ventricle mask before reading it."""
    if not entry or not entry.get("judged") or intracranial_ml is None or intracranial_ml < WHOLE_BRAIN_ML:
        return None
    if entry["ventricles_ml"] >= SMALL_VENTRICLES_ML:
        return None
    return (f"only {entry['ventricles_ml']:.1f} ml of lateral ventricle found on a scan of {intracranial_ml:.0f} ml "
            f"intracranial volume (adults' hold about {SMALL_VENTRICLES_ML:g}-70 ml): the ventricle network may have "
            "marked only part of them, which counts periventricular lesions as deep; look at the ventricle mask "
            "(--save-ventricle-mask, or the segment in Slicer) before reading the periventricular/deep split")
