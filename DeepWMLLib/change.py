"""Lesion change between two scans of one patient: which lesions of the follow-up are new, which
grew, which of the baseline's are gone, and how the lesion load changed.

How (`lesion_change`):
1. The baseline FLAIR is registered rigidly to the follow-up (`align`: rotation and translation,
   Mattes mutual information, Powell's method over three resolutions), so the two may differ in
   protocol, matrix, slice thickness, angulation and head position.
2. Each scan's mask lies on its own grid (segmented there, or given), so each load is measured where
   it was acquired.
3. The baseline mask is carried onto the follow-up's grid (linear interpolation of the 0/1 mask) and
   each follow-up lesion (a 3D 26-connected component) is
   - `new`: nothing of the baseline's within `tolerance_mm` of it: no voxel it marked, even in part,
     and (when its probability map is known) none whose probability reaches `presence`;
   - `enlarging`: its volume exceeds its baseline volume by `enlarge_fraction` of that volume and by
     `enlarge_min_ml` at least. Its baseline volume: its share of the baseline lesions it matches,
     measured on the baseline's own grid (a baseline lesion matches the follow-up lesion nearest to
     any of its voxels carried onto the follow-up's grid, partly marked ones included, within
     `tolerance_mm`). One that merged with others adds its whole volume; one that split is shared
     out among its parts, each of its voxels to the part nearest to it in the follow-up's space. So
     each baseline lesion is counted once;
   - `stable`: otherwise present at baseline (shrunken lesions included; with no share of a baseline
     lesion, e.g. there only by the baseline's probability, its baseline volume and change are blank);
   - `not assessable`: some of it lies outside the baseline's field of view, where nothing can be said,
     or a baseline lesion it matches does outside the follow-up's (its change would be a cut, not a
     shrinkage; the row keeps that baseline volume and a warning says so).
4. The other way round, on the baseline's grid, each baseline lesion wholly inside the follow-up's
   field of view with nothing of the follow-up's within `tolerance_mm` (the same test) is `gone`; one
   partly outside it with nothing of the follow-up's near it is `not assessable` (a warning says how
   much lesion volume the follow-up did not cover). One that no follow-up lesion matched but that is
   still there (the follow-up's probability reaches `presence` near it, or a lesion lies just beside it)
   is listed `stable` from the baseline's side (`not assessable` when partly outside the follow-up's
   view), its change blank. So every lesion of either scan has one row, and the rows' baseline volumes
   add up to the baseline's lesion volume, the follow-up rows' volumes to the follow-up's.
5. A new or gone lesion smaller than `min_change_ml` is `small new` or `small gone`: listed and drawn,
   not counted as a change (the segmentation's own flicker between two acquisitions is mostly there).

The label map of the result lies on the follow-up's grid (the scan being read): 1 stable, 2 new,
3 enlarging, 4 not assessable, 5 gone (a baseline lesion carried onto the follow-up's grid), 6 small
new, 7 small gone; a baseline lesion's own row (gone, or kept as above) is drawn where it lay. Lesion
volumes are each scan's own: a follow-up lesion's from the follow-up grid, a baseline lesion's row
(scan "baseline") gives its baseline volume. Positions are physical LPS millimetres of the follow-up scan.

How far to trust it. The registration is checked three ways: the normalised correlation of the two
FLAIRs inside the follow-up's head, the final mutual information, and (`check`) the registration run
the other way round, whose disagreement with the first (`inverse_consistency`) is a fraction of a
millimetre when both found the true alignment. On four real same-patient pairs of the Ljubljana
collection: correlation 0.84-0.94, mutual information -0.70 to -0.90, disagreement 0.06-0.17 mm (95th
percentile); on four pairs of different patients: 0.02-0.80, -0.44 to -0.59, 3.6-16.6 mm
(`Testing/benchmarks/change_pairs.py`); the same patients' studies re-sliced to 5 mm, rescaled or tilted 6
degrees more stay inside all three limits (0.83-0.97, -0.70 to -0.93, at most 1.12 mm), and six more
different-patient pairs fail all three (`--variations`; README, Lesion change). Outside `MIN_CORRELATION`, `MAX_MUTUAL_INFORMATION` or
`MAX_INCONSISTENCY_MM` (any one of them) the registration is not reliable: the report's
`registration.reliable` is false, its first warning and the printed summary's first line say so, and
so do the picture's title and an outline series. The calls are only as steady as the segmentation between
two acquisitions: on simulated follow-ups of the 11 real clinical scans (a moved head on a new grid,
six painted new lesions and three grown ones each, nothing else changed; a draw the defaults were not
chosen on), 62 of 66 new lesions were called new and 28 of 33 grown ones enlarging, with about 4.2
false calls per scan (`Testing/benchmarks/change_simulated.py --seed 1 --grow`; README).
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from . import __version__, io
from .errors import Cancelled, DeepWMLError, UsageError
from .metrics import check_probability_map
from .postprocessing import label_components
from .report import lesion_count_text
from .volume import voxels

DEFAULT_TOLERANCE_MM = 2.0
DEFAULT_ENLARGE_FRACTION = 1.0  # rule 3 of Testing/benchmarks/change_simulated.py (README, Lesion change)
DEFAULT_ENLARGE_MIN_ML = 0.05
DEFAULT_PRESENCE = 0.15  # chosen by Testing/benchmarks/change_simulated.py's rule 1 (README, Lesion change)
DEFAULT_MIN_CHANGE_ML = 0.02  # rule 2 of the same
MIN_CORRELATION = 0.80
MAX_MUTUAL_INFORMATION = -0.65  # Mattes' metric value: the negative mutual information
MIN_SLICES = 4  # the registration's coarsest level shrinks 4 times
MAX_INCONSISTENCY_MM = 2.0  # 95th percentile of `inverse_consistency` (same-patient pairs <= 0.17, others >= 3.6)
UNRELIABLE = "REGISTRATION NOT RELIABLE"  # leads the warning, the summary and the picture when a check fails

LABELS = io.CHANGE_MAP_LABELS  # {1: "stable", 2: "new", 3: "enlarging", 4: "not assessable", 5: "gone", 6: "small new", 7: "small gone"}
COLOURS = {1: (1.0, 0.9, 0.0), 2: (1.0, 0.1, 0.1), 3: (1.0, 0.5, 0.0), 4: (0.6, 0.6, 0.6), 5: (0.2, 0.5, 1.0),
           6: (1.0, 0.6, 0.8), 7: (0.6, 0.85, 1.0)}
CSV_COLUMNS = ("id", "status", "scan", "volume_ml", "baseline_ml", "change_ml", "centroid_mm", "slice_range",
               "followup_slice")


@dataclass
class Registration:
    transform: sitk.Transform  # follow-up physical point -> baseline physical point
    correlation: float
    mutual_information: float
    iterations: int
    seconds: float

    def facts(self) -> dict:
        euler = self.transform
        angles = np.degrees(euler.GetParameters()[:3])
        return {
            "rotation_deg": [round(float(a), 3) for a in angles],
            "translation_mm": [round(float(t), 3) for t in euler.GetParameters()[3:]],
            "center_mm": [round(float(c), 3) for c in euler.GetFixedParameters()[:3]],
            "correlation": round(self.correlation, 4),
            "mutual_information": round(self.mutual_information, 4),
            "iterations": self.iterations,
            "seconds": round(self.seconds, 3),
        }


@dataclass
class ChangeResult:
    labels: sitk.Image  # uint8 on the follow-up's grid, values of LABELS
    baseline_registered: sitk.Image  # the baseline FLAIR resampled onto the follow-up's grid
    registration: Registration
    report: dict


def _float(image: sitk.Image) -> sitk.Image:
    return sitk.Cast(image, sitk.sitkFloat32)


def _head_values(array: np.ndarray) -> np.ndarray:
    """The voxels of the head: above the 30th percentile of the positive ones."""
    positive = array[array > 0]
    if positive.size == 0:
        return np.zeros(array.shape, bool)
    return array > np.percentile(positive, 30)


SAMPLES = 150_000  # voxels of the follow-up the fit looks at (a fixed, regular set)


def _method(samples: float, seed: int) -> sitk.ImageRegistrationMethod:
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(32)
    method.SetMetricSamplingStrategy(method.REGULAR)
    method.SetMetricSamplingPercentage(samples, seed)  # a fixed seed: the same samples, the same result
    method.SetInterpolator(sitk.sitkLinear)
    return method


def align(followup: sitk.Image, baseline: sitk.Image, seed: int = 1) -> Registration:
    """Rigid registration of `baseline` (moving) to `followup` (fixed); deterministic for a seed.

    The centres of intensity mass are matched (when the fit from there correlates under MIN_CORRELATION, as
    for a thin slab of the head, it is run again from the scanner's frame and the better kept), then Powell's
    method maximises Mattes mutual information
    coarse to fine (images shrunk 4, 2, 1 times, smoothed 2, 1, 0 mm), each level on a fixed regular
    sample of `SAMPLES` voxels. On a phantom with a known movement this came within 0.2-0.6 mm for eight
    sample seeds, where a regular-step gradient descent stopped 1-3 mm short (its steps end in the
    metric's small-scale roughness; Testing/test_change.py).
    The transform maps a follow-up point to the baseline point that shows the same anatomy (ITK's
    resampling direction), so `sitk.Resample(baseline, followup, transform)` puts the baseline on the
    follow-up's grid."""
    start = time.perf_counter()
    fixed, moving = _working(followup), _working(baseline)
    centres = sitk.CenteredTransformInitializer(fixed, moving, sitk.Euler3DTransform(),
                                                sitk.CenteredTransformInitializerFilter.MOMENTS)
    transform, method = _fit(fixed, moving, centres, seed)
    correlation = _correlation(fixed, moving, transform)
    if not correlation >= MIN_CORRELATION:
        # Matching the centres of mass starts a thin slab of the head tens of mm off (its centre is not the
        # head's), where Powell does not recover; the scanner's own frame (the head unmoved) is the other start,
        # and the better fit is kept.
        scanner = sitk.Euler3DTransform()
        scanner.SetCenter(fixed.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in fixed.GetSize()]))
        try:
            other, other_method = _fit(fixed, moving, scanner, seed)
        except DeepWMLError:  # the scanner's frames hardly overlap (another scanner, another patient): the first
            other = None      # fit stands, and its low correlation is reported as it is
        if other is not None:
            other_correlation = _correlation(fixed, moving, other)
            if other_correlation > correlation or not correlation == correlation:
                transform, method, correlation = other, other_method, other_correlation
    return Registration(transform, correlation, float(method.GetMetricValue()),
                        int(method.GetOptimizerIteration()), time.perf_counter() - start)


def _fit(fixed: sitk.Image, moving: sitk.Image, initial: sitk.Transform, seed: int):
    """Powell on Mattes mutual information from `initial` (see align); (the rigid transform, the method)."""
    try:
        method = _method(min(1.0, SAMPLES / max(1, int(np.prod(fixed.GetSize())))), seed)
        method.SetOptimizerAsPowell(100, 20, 1.0, 0.01, 1e-6)
        method.SetOptimizerScalesFromPhysicalShift()
        method.SetShrinkFactorsPerLevel([4, 2, 1])
        method.SetSmoothingSigmasPerLevel([2.0, 1.0, 0.0])
        method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
        method.SetInitialTransform(initial, inPlace=False)
        return _euler(method.Execute(fixed, moving)), method
    except RuntimeError as exc:
        raise DeepWMLError("the registration of the baseline to the follow-up failed "
                           f"({str(exc).strip().splitlines()[-1]}); are both scans of a head?") from exc


def _correlation(fixed: sitk.Image, moving: sitk.Image, transform: sitk.Transform) -> float:
    """The correlation of the fixed image's head voxels with the moving image carried onto them (nan: too few)."""
    resampled = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, transform, sitk.sitkLinear, -1.0))
    fixed_voxels = sitk.GetArrayViewFromImage(fixed)
    head = _head_values(fixed_voxels) & (resampled >= 0)
    if head.sum() <= 10:
        return float("nan")
    a = fixed_voxels[head].astype(np.float64)
    b = resampled[head].astype(np.float64)
    a -= a.mean()
    b -= b.mean()
    denominator = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    return float((a * b).sum() / denominator) if denominator > 0 else float("nan")


WORKING_MM = 1.0  # finer images are averaged down to about this before registration


def _working(image: sitk.Image) -> sitk.Image:
    """The image as float32, with voxels finer than WORKING_MM along an axis averaged in whole numbers
    (0.5 mm pixels: 2 x 2), the same physical space: the fit needs no finer detail, and a 0.5 mm matrix
    of 30 million voxels took 24 s and 1.4 GB to register at full size."""
    factors = [max(1, int(WORKING_MM // s)) for s in image.GetSpacing()]
    image = _float(image)
    return sitk.BinShrink(image, factors) if max(factors) > 1 else image


def _euler(transform: sitk.Transform) -> sitk.Euler3DTransform:
    """The rigid transform a registration returned (it may come wrapped in a composite)."""
    if transform.GetName() == "CompositeTransform":
        composite = sitk.CompositeTransform(transform)
        transform = composite.GetNthTransform(composite.GetNumberOfTransforms() - 1)
    euler = sitk.Euler3DTransform()
    euler.SetFixedParameters(transform.GetFixedParameters())
    euler.SetParameters(transform.GetParameters())
    return euler


def _resample(image: sitk.Image, grid: sitk.Image, transform: sitk.Transform, linear: bool = True) -> np.ndarray:
    """`image`'s voxels at `grid`'s voxel centres through `transform` (0 outside), numpy (k, j, i)."""
    interpolator = sitk.sitkLinear if linear else sitk.sitkNearestNeighbor
    out = sitk.Resample(_float(image), grid, transform, interpolator, 0.0, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out)


def _coverage(image: sitk.Image, grid: sitk.Image, transform: sitk.Transform) -> np.ndarray:
    """Which voxels of `grid` lie inside `image`'s field of view (its voxels' extent)."""
    ones = sitk.Image(image.GetSize(), sitk.sitkUInt8) + 1
    ones.CopyInformation(image)
    return _resample(ones, grid, transform, linear=False) > 0.5


def _physical(index_kji: np.ndarray, image: sitk.Image) -> np.ndarray:
    """The physical LPS points (N x 3) of voxel indices (N x 3, numpy k, j, i) of `image`."""
    return np.c_[index_kji[:, ::-1], np.ones(len(index_kji))] @ io.ijk_to_lps(image)[:3].T


def _carry(points: np.ndarray, transform: sitk.Transform) -> np.ndarray:
    """Points (N x 3) through a rigid (or any affine) transform, all at once."""
    origin = np.array(transform.TransformPoint((0.0, 0.0, 0.0)))
    matrix = np.array([np.array(transform.TransformPoint(tuple(axis))) - origin for axis in np.eye(3)]).T
    return points @ matrix.T + origin


def _spacing_kji(image: sitk.Image) -> tuple[float, float, float]:
    return tuple(float(s) for s in image.GetSpacing()[::-1])


def _box(masks, margin) -> tuple[slice, ...] | None:
    """The bounding box of the union of `masks`, grown by `margin` voxels per axis (None: all empty)."""
    union = np.logical_or.reduce([np.asarray(m, bool) for m in masks])
    spans = [np.flatnonzero(union.any(axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)]
    if spans[0].size == 0:
        return None
    return tuple(slice(max(0, int(s[0]) - m), min(n, int(s[-1]) + m + 1))
                 for s, m, n in zip(spans, margin, union.shape))


def _distance_to(mask: np.ndarray, spacing, return_indices: bool = False):
    """Euclidean distance in mm from every voxel to the nearest voxel of `mask` (inf when it is empty)."""
    from scipy import ndimage

    if not mask.any():
        distance = np.full(mask.shape, np.inf)
        return (distance, None) if return_indices else distance
    return ndimage.distance_transform_edt(~mask, sampling=spacing, return_indices=return_indices)


def _at_least(ml: float, limit: float) -> bool:
    """`ml` >= `limit`, to a billionth of a ml: volumes are whole voxels times a voxel's ml, and their differences
    carry floating-point error (0.09 - 0.04 ml is 0.049999999999999996), which called a lesion grown by exactly
    --enlarge-min-ml stable while its row showed that change."""
    return round(ml - limit, 9) >= 0


def _component_geometry(labels: np.ndarray, count: int, image: sitk.Image) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Voxel count, LPS centroid and (first, last) slice along the axial axis of components 1..count."""
    from .report import lesion_geometry, index_to_lps

    axis = 2 - io.axial_axis(image)
    sizes, centroids_kji, first, last = lesion_geometry(labels, count, axis)
    return sizes, index_to_lps(centroids_kji[:, ::-1], image), np.stack([first, last], axis=1)


def classify(followup_mask: sitk.Image, baseline_mask: sitk.Image, transform: sitk.Transform,
             tolerance_mm: float = DEFAULT_TOLERANCE_MM, enlarge_fraction: float = DEFAULT_ENLARGE_FRACTION,
             enlarge_min_ml: float = DEFAULT_ENLARGE_MIN_ML, followup_probabilities: sitk.Image | None = None,
             baseline_probabilities: sitk.Image | None = None,
             presence: float | None = None, min_change_ml: float = DEFAULT_MIN_CHANGE_ML) -> tuple[np.ndarray, list[dict]]:
    """The change label map on the follow-up's grid (numpy k, j, i, uint8, values of LABELS) and one
    row per lesion (follow-up lesions, largest first, then gone baseline lesions, largest first).

    `transform` maps follow-up points to baseline points (`align`'s). See the module docstring
    for the rules. With a scan's probability map and `presence`, a voxel whose probability reaches
    `presence` also counts as marked in that scan when deciding whether the other scan's lesion was
    there (new) or is still there (gone): a lesion just under the threshold in one scan and just over it
    in the other is then not called new or gone."""
    from scipy import ndimage
    from scipy.spatial import cKDTree

    if tolerance_mm < 0 or enlarge_fraction < 0 or enlarge_min_ml < 0:
        raise DeepWMLError("the tolerance and the enlargement thresholds cannot be negative")
    follow = np.asarray(voxels(followup_mask)) > 0
    base = np.asarray(voxels(baseline_mask)) > 0
    follow_ml = float(np.prod(followup_mask.GetSpacing())) / 1000.0
    base_ml = float(np.prod(baseline_mask.GetSpacing())) / 1000.0
    inverse = transform.GetInverse()

    # Follow-up lesions against the baseline carried onto the follow-up grid.
    base_on_follow = _resample(sitk.Cast(baseline_mask > 0, sitk.sitkUInt8), followup_mask, transform)
    base_zone = base_on_follow > 0  # partly marked counts as present
    if presence is not None and baseline_probabilities is not None:
        base_zone |= _resample(baseline_probabilities, followup_mask, transform) >= presence
    base_covers = _coverage(baseline_mask, followup_mask, transform)
    base_labels, base_count = label_components(base)
    base_volumes = np.bincount(base_labels.ravel(), minlength=base_count + 1)[1:] * base_ml  # each one's own ml
    labels, count = label_components(follow)
    out = np.zeros(follow.shape, np.uint8)
    rows = []
    # baseline lesions partly outside the follow-up's field of view: their change cannot be measured
    base_cut = np.zeros(0, bool)
    if base_count:
        follow_covers = _coverage(followup_mask, baseline_mask, inverse)
        base_cut = np.atleast_1d(ndimage.sum(~follow_covers, base_labels, np.arange(1, base_count + 1))) > 0
    pairs = np.zeros((2, 0), int)  # (follow-up lesion, the baseline lesion it matches)
    if count:
        spacing = _spacing_kji(followup_mask)
        margin = [int(math.ceil(tolerance_mm / s)) + 1 for s in spacing]
        box = _box([follow, base_zone], margin)
        distance_zone = _distance_to(base_zone[box], spacing)
        ids = np.arange(1, count + 1)
        nearest_base = np.atleast_1d(ndimage.minimum(distance_zone, labels[box], ids))
        outside = np.atleast_1d(ndimage.sum(~base_covers[box], labels[box], ids)) > 0
        # Which baseline lesions each follow-up lesion matches: those with a voxel, carried onto the
        # follow-up's grid (partly marked counts), whose nearest follow-up lesion within the tolerance is
        # this one. A carried voxel shows the baseline lesion with the nearest voxel (a partly marked one
        # has no label of its own on this grid).
        distance_follow, nearest = _distance_to(follow[box], spacing, return_indices=True)
        owner = labels[box][tuple(nearest)]
        near = (base_on_follow[box] > 0) & (distance_follow <= tolerance_mm)
        corner = np.array([s.start for s in box])
        if near.any():
            carried = _carry(_physical(np.argwhere(near) + corner, followup_mask), transform)
            base_ids = base_labels[base][cKDTree(_physical(np.argwhere(base), baseline_mask)).query(carried)[1]]
            pairs = np.unique(np.stack([owner[near], base_ids]), axis=1).astype(int)
        # A follow-up lesion's baseline volume: what it holds of the baseline lesions it matches, each
        # measured on the baseline's own grid. A baseline lesion that split into several follow-up lesions
        # is shared out: each of its voxels goes to the part nearest to it, in the follow-up's space; one
        # that merged with others into one lesion adds its own volume there. So every baseline lesion is
        # counted once, and the baseline volumes of the rows add up to the baseline's lesion volume.
        before_ml = np.zeros(count + 1)
        for number in np.unique(pairs[1]):
            parts = pairs[0][pairs[1] == number]
            if parts.size == 1:
                before_ml[parts[0]] += base_volumes[number - 1]
                continue
            follow_index = np.argwhere(np.isin(labels[box], parts)) + corner
            tree = cKDTree(_physical(follow_index, followup_mask))
            points = _carry(_physical(np.argwhere(base_labels == number), baseline_mask), inverse)
            part = labels[tuple(follow_index[tree.query(points)[1]].T)]
            before_ml += np.bincount(part, minlength=count + 1) * base_ml
        before_ml = before_ml[1:]
        cut = np.zeros(count + 1, bool)  # matched to a baseline lesion the follow-up does not wholly cover
        cut[pairs[0][base_cut[pairs[1] - 1]]] = True
        sizes, centroids, ranges = _component_geometry(labels, count, followup_mask)
        status = np.full(count, 1, np.uint8)
        for n in range(count):
            volume, before = sizes[n] * follow_ml, before_ml[n]
            if outside[n] or cut[n + 1]:
                status[n] = 4
            elif nearest_base[n] > tolerance_mm:
                status[n] = 2 if volume >= min_change_ml else 6
            elif before > 0 and _at_least(volume - before, enlarge_min_ml) and \
                    _at_least(volume, (1.0 + enlarge_fraction) * before):
                status[n] = 3  # (no baseline volume matched, e.g. only `presence` near it: not enlarging, stable)
        lookup = np.concatenate([[0], status]).astype(np.uint8)
        out = lookup[labels]
        for n in np.argsort(-sizes, kind="stable"):
            volume = float(sizes[n] * follow_ml)
            assessed = status[n] != 4
            # A lesion matched to baseline lesions keeps its share of their volume, even an incomplete one (not
            # assessable). One there before only by the baseline's probability, or beside a lesion (a part of a
            # split lesion whose every voxel lay nearer another part), has no baseline volume of its own to measure
            # a change against.
            before = float(before_ml[n]) if before_ml[n] > 0 else (0.0 if status[n] in (2, 6) else None)
            rows.append({
                "status": LABELS[int(status[n])], "scan": "follow-up", "volume_ml": round(volume, 6),
                "baseline_ml": None if before is None else round(before, 6),
                "change_ml": None if before is None or not assessed else round(volume - before, 6),
                "centroid_mm": [round(float(v), 2) for v in centroids[n]],
                "slice_range": [int(v) for v in ranges[n]],
            })
            if cut[n + 1]:
                rows[-1]["_cut"] = True  # for lesion_change's warnings, then dropped

    # Baseline lesions against the follow-up carried onto the baseline grid: the gone ones, those
    # (partly) outside the follow-up's field of view that left no trace inside it, and those still there
    # with no follow-up lesion of their own (by the follow-up's probability, or just beside a lesion):
    # every baseline lesion no follow-up lesion matched gets a row of its own.
    if base_count:
        follow_zone = _resample(sitk.Cast(followup_mask > 0, sitk.sitkUInt8), baseline_mask, inverse) > 0
        if presence is not None and followup_probabilities is not None:
            follow_zone |= _resample(followup_probabilities, baseline_mask, inverse) >= presence
        spacing = _spacing_kji(baseline_mask)
        margin = [int(math.ceil(tolerance_mm / s)) + 1 for s in spacing]
        box = _box([base, follow_zone], margin)
        ids = np.arange(1, base_count + 1)
        nearest_follow = np.atleast_1d(ndimage.minimum(_distance_to(follow_zone[box], spacing),
                                                       base_labels[box], ids))
        uncovered = base_cut
        claimed = np.zeros(base_count, bool)  # in a follow-up lesion's row
        claimed[pairs[1] - 1] = True
        gone = (nearest_follow > tolerance_mm) & ~uncovered & ~claimed
        unseen = (nearest_follow > tolerance_mm) & uncovered & ~claimed  # not assessable: outside the follow-up's view
        kept = (nearest_follow <= tolerance_mm) & ~claimed  # stable, or not assessable when partly outside the view
        if gone.any() or unseen.any() or kept.any():
            sizes, base_centroids, ranges = _component_geometry(base_labels, base_count, baseline_mask)
            small = sizes * base_ml < min_change_ml
            for value, which in ((5, gone & ~small), (7, gone & small), (1, kept & ~uncovered),
                                 (4, (kept & uncovered) | unseen)):  # not assessable: drawn where the view reaches
                if not which.any():
                    continue
                drawn = np.concatenate([[False], which])[base_labels].astype(np.uint8)
                carried = _resample(io.like_image(drawn, baseline_mask), followup_mask, transform) >= 0.5
                out[carried & (out == 0)] = value
                # a lesion smaller than the follow-up's slice gap reaches 0.5 nowhere: drawn at its centre at least
                for n in np.flatnonzero(which):
                    centre = inverse.TransformPoint(tuple(float(v) for v in base_centroids[n]))
                    i, j, k = followup_mask.TransformPhysicalPointToIndex(centre)
                    if all(0 <= a < b for a, b in zip((i, j, k), followup_mask.GetSize())) and out[k, j, i] == 0:
                        out[k, j, i] = value
            # a baseline lesion's position, said in the follow-up's space (where the picture and label map are)
            for n in np.argsort(-sizes, kind="stable"):
                if not (gone[n] or unseen[n] or kept[n]):
                    continue
                where = inverse.TransformPoint(tuple(float(v) for v in base_centroids[n]))
                volume = float(sizes[n] * base_ml)
                call = ("not assessable" if uncovered[n] else "stable") if kept[n] else \
                    "not assessable" if unseen[n] else "small gone" if small[n] else "gone"
                rows.append({  # the volume: the baseline's; kept, its follow-up extent is under the mask's threshold
                    "status": call, "scan": "baseline", "volume_ml": round(volume, 6), "baseline_ml": round(volume, 6),
                    "change_ml": round(-volume, 6) if gone[n] else None,
                    "centroid_mm": [round(float(v), 2) for v in where],
                    "slice_range": [int(v) for v in ranges[n]],  # the baseline's slice indices
                })
    for number, row in enumerate(rows, start=1):
        row["id"] = number
    return out, rows


def conventions() -> dict:
    """What the change report's figures mean, written into it (`conventions`) as the lesion report states its own
    (report.conventions), so that a report read on its own says how lesions were counted, on which scan's grid each
    figure was measured (a baseline row's slices are the baseline's, its centroid the follow-up's space) and which
    way its coordinates point (LPS; Slicer shows RAS)."""
    from .report import LESIONS, LPS, VOLUMES

    return {
        "volumes": f"{VOLUMES}, each on its own scan's grid: a row's volume_ml on the scan its scan names, baseline_ml "
                   "on the baseline's (a follow-up lesion's: its share of the baseline lesions it matches); change_ml: "
                   "the follow-up volume less the baseline volume (a gone lesion's: minus its baseline volume); "
                   "<call>_ml: the follow-up volume of the call's follow-up rows (new, small new, enlarging, stable, "
                   "not assessable: together followup_volume_ml), the baseline volume of gone and small gone; "
                   "<call>_baseline_side_ml: the baseline volume of the call's baseline rows",
        "lesions": f"{LESIONS}, of each scan's mask on its own grid; id: the follow-up's lesions, largest first, then "
                   "the baseline's with a row of their own (scan baseline), largest first",
        "coordinates": f"centroid_mm: {LPS}; in the follow-up scan's space, a baseline row's centroid carried there "
                       "through the registration",
        "slice_index": "slice_range: voxel index along the axial axis of the scan the row's scan names, 0 first (a "
                       "baseline row's: the baseline's slices); followup_slice: the follow-up's axial slice through the "
                       "centroid, 0 first",
        "slice_thickness": "baseline_slice_thickness_mm and followup_slice_thickness_mm: the spacing of each scan's "
                           "axial planes",
        "grid": "the label map and the registered baseline lie on the follow-up's grid",
    }


BASELINE_ONLY = ("gone", "small gone")  # calls of baseline lesions alone: their volumes are the baseline's


def _summary(rows: list[dict], baseline_ml: float, followup_ml: float) -> dict:
    """The report's figures: `n_<call>` counts every row of the call; `<call>_ml` is measured on one scan, never
    both: for new, small new, enlarging, stable and not assessable the follow-up volume of its follow-up rows (so
    these five add up to `followup_volume_ml`), for gone and small gone the baseline volume. A baseline lesion kept
    as stable or not assessable with no follow-up lesion of its own (a row of scan `baseline`) is counted in
    `n_stable` or `n_not_assessable` and given apart, `n_<call>_baseline_side` and `<call>_baseline_side_ml` (its
    baseline volume): adding it to the follow-up's volumes mixed two scans' figures (patient12's pair: 0.023 ml)."""
    def of(status: str, scan: str | None = None) -> list[dict]:
        return [r for r in rows if r["status"] == status and (scan is None or r["scan"] == scan)]

    summary = {
        "baseline_volume_ml": round(baseline_ml, 4),
        "followup_volume_ml": round(followup_ml, 4),
        "volume_change_ml": round(followup_ml - baseline_ml, 4),
        "volume_change_percent": round(100.0 * (followup_ml - baseline_ml) / baseline_ml, 2) if baseline_ml > 0 else None,
    }
    for status in ("new", "enlarging", "stable", "not assessable", "gone", "small new", "small gone"):
        key = status.replace(" ", "_")
        summary[f"n_{key}"] = len(of(status))
        summary[f"{key}_ml"] = round(sum(r["volume_ml"] for r in of(status, None if status in BASELINE_ONLY
                                                                           else "follow-up")), 4)
        if status in ("stable", "not assessable"):  # kept from the baseline's side: on the baseline
            summary[f"n_{key}_baseline_side"] = len(of(status, "baseline"))
            summary[f"{key}_baseline_side_ml"] = round(sum(r["volume_ml"] for r in of(status, "baseline")), 4)
    summary["enlarging_growth_ml"] = round(sum(r["change_ml"] for r in of("enlarging")), 4)
    return summary


def inverse_consistency(forward: Registration, backward: Registration, followup: sitk.Image,
                        every: int = 997) -> dict:
    """How far a follow-up head point lands from where it started when carried to the baseline by
    `forward` and back by `backward` (the registration run the other way round): median and 95th
    percentile in mm over every `every`-th head voxel. Two registrations that found the same
    alignment agree to a small fraction of a millimetre; when they disagree, at least one is wrong."""
    index = np.argwhere(_head_values(sitk.GetArrayViewFromImage(followup)))[::every]
    if index.size == 0:
        return {"median_mm": float("nan"), "p95_mm": float("nan")}
    points = np.stack([index[:, 2], index[:, 1], index[:, 0], np.ones(len(index))], axis=1) @ io.ijk_to_lps(followup)[:3].T
    back = np.array([backward.transform.TransformPoint(forward.transform.TransformPoint(tuple(p))) for p in points])
    errors = np.linalg.norm(back - points, axis=1)
    return {"median_mm": round(float(np.median(errors)), 3), "p95_mm": round(float(np.percentile(errors, 95)), 3)}


def unmeasured(value) -> bool:
    """Whether a registration figure could not be measured: nan, or null in a saved report."""
    return value is None or math.isnan(value)


def measured(value, unit: str = "") -> str:
    """A registration figure as said: two decimals, or "not measurable" (unmeasured)."""
    return "not measurable" if unmeasured(value) else f"{value:.2f}{unit}"


def failed_checks(registration: dict) -> list[str]:
    """The checks of a registration (a change report's `registration`) that failed, each with its figure and its
    limit; any one makes the registration not reliable. Each is read alone: two scans of different heads can be
    registered alike both ways (two brains in one template space: both fits stay near where they started,
    0.89 mm apart) and still not correlate at all."""
    failed = []
    correlation, information = registration["correlation"], registration["mutual_information"]
    if unmeasured(correlation):  # too few head voxels overlapping (_correlation)
        failed.append("correlation not measurable, too little of the two heads overlapping")
    elif correlation < MIN_CORRELATION:
        failed.append(f"correlation {correlation:.2f}, under {MIN_CORRELATION:.2f}")
    if unmeasured(information):
        failed.append("mutual information not measurable")
    elif information > MAX_MUTUAL_INFORMATION:
        failed.append(f"mutual information {information:.2f}, above {MAX_MUTUAL_INFORMATION:.2f}")
    consistency = registration.get("inverse_consistency")  # run both ways (lesion_change's `check`)
    if consistency and unmeasured(consistency["p95_mm"]):  # no head voxel in the follow-up (inverse_consistency)
        failed.append("run both ways not measurable, no head found in the follow-up")
    elif consistency and consistency["p95_mm"] > MAX_INCONSISTENCY_MM:
        failed.append(f"run both ways {consistency['p95_mm']:.2f} mm apart, over {MAX_INCONSISTENCY_MM:g} mm")
    return failed


def unreliable_because(registration: dict) -> str:
    """UNRELIABLE and the checks that failed; none named for a report that records the verdict but whose rounded
    figures all pass (an earlier version judged them unrounded)."""
    failed = failed_checks(registration)
    return f"{UNRELIABLE} ({'; '.join(failed)})" if failed else UNRELIABLE


def visits_reversed(baseline, followup) -> str | None:
    """A warning when the DICOM series given as the baseline was scanned after the one given as the follow-up (by
    their Study Dates; None when either is not DICOM or has no date): with the roles reversed, every 'new' lesion
    is one that went and every 'gone' one that came, and nothing else in the result would show it."""
    dates = [series.study_date if series else "" for series in (baseline, followup)]
    if not all(len(date) == 8 and date.isdigit() for date in dates) or dates[0] <= dates[1]:
        return None
    shown = [f"{date[:4]}-{date[4:6]}-{date[6:]}" for date in dates]
    return (f"the baseline was scanned after the follow-up (Study Date {shown[0]}, follow-up {shown[1]}): new and gone "
            "are then the other way round; give the earlier visit as the baseline")


def check_scans(baseline: sitk.Image, followup: sitk.Image, checked: bool = False) -> None:
    """Refuse, with the reason, two scans that cannot be compared (not volumes, or too thin to register).
    `checked`: both were read by io.read_image, which checked them as volumes (a second pass over every voxel of
    two scans saved)."""
    for image, what in ((baseline, "the baseline FLAIR"), (followup, "the follow-up FLAIR")):
        if not checked:
            io.check_volume(image, what)
        if min(image.GetSize()) < MIN_SLICES:
            raise DeepWMLError(f"{what} has only {min(image.GetSize())} voxels along one axis; comparing two scans "
                               f"needs volumes of at least {MIN_SLICES} slices")


def lesion_change(baseline: sitk.Image, followup: sitk.Image, baseline_mask: sitk.Image, followup_mask: sitk.Image,
                  tolerance_mm: float = DEFAULT_TOLERANCE_MM, enlarge_fraction: float = DEFAULT_ENLARGE_FRACTION,
                  enlarge_min_ml: float = DEFAULT_ENLARGE_MIN_ML, baseline_probabilities: sitk.Image | None = None,
                  followup_probabilities: sitk.Image | None = None, presence: float | None = None,
                  min_change_ml: float = DEFAULT_MIN_CHANGE_ML, check: bool = True, checked: bool = False,
                  progress=None) -> ChangeResult:
    """Register `baseline` to `followup` and classify every lesion (module docstring). Each mask (and
    probability map) must lie on its own FLAIR's grid (one stored in another voxel order is
    reordered; one cropped on the FLAIR's voxels is padded onto it with zeros, `io.onto_grid`). With `check`, the
    registration is also run the other way round and the two compared (`inverse_consistency`; twice the
    registration time). `checked`: check_scans has passed the two scans already. Masks hold whole numbers, any
    non-zero one lesion (0/1, or 0/255 as many tools save them); a probability map, NaN or negative values are
    refused (`io.label_mask`), as `deepwml change` refuses such files; a probability map holds 0 to 1 (one of 0-255 or
    percent is refused: rescale it). `progress(message)`, when given, is told as each registration ends (each takes
    tens of seconds on a clinical pair), so that a long silence does not read as a hang."""
    if not checked:
        check_scans(baseline, followup)
    # every voxel above 0 was lesion: a probability map given as a mask counted the whole head (7435 ml), and a
    # NaN or negative voxel counted in the volume but not as lesion, all of it called new
    baseline_mask = io.onto_grid(io.label_mask(baseline_mask, "the baseline mask"), baseline, "the baseline mask",
                                 "the baseline FLAIR")
    followup_mask = io.onto_grid(io.label_mask(followup_mask, "the follow-up mask"), followup, "the follow-up mask",
                                 "the follow-up FLAIR")
    maps = []
    for probabilities, image, what in ((baseline_probabilities, baseline, "baseline"),
                                       (followup_probabilities, followup, "follow-up")):
        if probabilities is not None:  # one cropped on the FLAIR's voxels is padded with 0 (no lesion), as a mask is
            # a map of 0-255 or percent reached `presence` wherever it was not 0
            probabilities = check_probability_map(probabilities, f"the {what} probabilities")
            probabilities = io.onto_grid(probabilities, image, f"the {what} probabilities", f"the {what} FLAIR")
        maps.append(probabilities)
    registration = align(followup, baseline)
    if progress is not None:
        progress(f"registered the baseline to the follow-up in {registration.seconds:.0f} s"
                 + ("; now the other way round, to check it ..." if check else ""))
    labels, rows = classify(followup_mask, baseline_mask, registration.transform, tolerance_mm,
                            enlarge_fraction, enlarge_min_ml, maps[1], maps[0], presence, min_change_ml)
    volume = {}
    for name, mask in (("baseline", baseline_mask), ("followup", followup_mask)):
        volume[name] = float(np.count_nonzero(voxels(mask))) * float(np.prod(mask.GetSpacing())) / 1000.0
    warnings = []
    unseen = [r for r in rows if r["status"] == "not assessable" and r["scan"] == "baseline"]
    if unseen:
        warnings.append(
            f"{sum(r['volume_ml'] for r in unseen):.2f} ml of the baseline's lesions ({len(unseen)}) lie partly or wholly "
            "outside the follow-up's field of view (listed as not assessable): the two loads cover different extents")
    beyond = [r for r in rows if r["status"] == "not assessable" and r["scan"] == "follow-up" and not r.get("_cut")]
    if beyond:
        warnings.append(
            f"{sum(r['volume_ml'] for r in beyond):.2f} ml of the follow-up's lesions ({len(beyond)}) lie partly or wholly "
            "outside the baseline's field of view (listed as not assessable): the two loads cover different extents, so "
            "the total volume change counts lesions the baseline could not show")
    cut = [r for r in rows if r.pop("_cut", False)]
    if cut:
        warnings.append(
            f"{len(cut)} follow-up lesion{'s' if len(cut) > 1 else ''} ({sum(r['volume_ml'] for r in cut):.2f} ml) "
            f"match{'' if len(cut) > 1 else 'es'} baseline lesions ({sum(r['baseline_ml'] or 0.0 for r in cut):.2f} ml) that lie "
            "partly outside the follow-up's field of view (listed as not assessable): their change, and the total "
            "volume change, cannot be measured there")
    facts = registration.facts()
    if check:
        backward = align(baseline, followup)
        if progress is not None:
            progress(f"registered the other way round in {backward.seconds:.0f} s")
        facts["inverse_consistency"] = inverse_consistency(registration, backward, followup)
    suspect = bool(failed_checks(facts))
    facts["reliable"] = not suspect
    if suspect:
        apart = facts["inverse_consistency"]["p95_mm"] if check else None
        consistency = ("" if not check else
                       ", the registration run both ways could not be compared (no head found in the follow-up)"
                       if unmeasured(apart) else
                       f", the registration run both ways disagrees by {apart:.2f} mm (95th percentile; up to 0.17 mm "
                       f"on those pairs, {MAX_INCONSISTENCY_MM:g} warns)")
        warnings.insert(0,  # first: it undoes every call after it
            f"{UNRELIABLE}: the scans may be of different patients, or the registration failed: correlation "
            f"{measured(registration.correlation)} (0.84-0.94 on the same-patient pairs it was checked on; below "
            f"{MIN_CORRELATION:.2f} warns), mutual information {registration.mutual_information:.2f} (-0.70 to -0.90; "
            f"above {MAX_MUTUAL_INFORMATION:.2f} warns){consistency}; check that both scans are of this patient and "
            "look at the registered baseline over the follow-up; no new, enlarging or gone lesion can be trusted")
    axis = io.axial_axis(followup)
    for row in rows:  # the follow-up's axial slice through each lesion's centre, for viewers to go to
        index = followup.TransformPhysicalPointToContinuousIndex(tuple(float(v) for v in row["centroid_mm"]))[axis]
        row["followup_slice"] = int(min(max(round(index), 0), followup.GetSize()[axis] - 1))
    registered = sitk.Resample(baseline, followup, registration.transform, sitk.sitkLinear, 0.0,
                               baseline.GetPixelID())
    labels_image = sitk.Cast(io.like_image(labels, followup), sitk.sitkUInt8)  # the follow-up's own header
    report = {
        **_summary(rows, volume["baseline"], volume["followup"]),
        "conventions": conventions(),
        "tolerance_mm": tolerance_mm,
        "enlarge_fraction": enlarge_fraction,
        "enlarge_min_ml": enlarge_min_ml,
        "presence": presence if presence is not None and any(m is not None for m in maps) else None,
        "min_change_ml": min_change_ml,
        "registration": facts,
        "baseline_slice_thickness_mm": round(float(baseline.GetSpacing()[io.axial_axis(baseline)]), 4),
        "followup_slice_thickness_mm": round(float(followup.GetSpacing()[io.axial_axis(followup)]), 4),
        "labels": {str(k): v for k, v in LABELS.items()},
        "warnings": warnings,
        "lesions": rows,
    }
    return ChangeResult(labels_image, registered, registration, report)


# ---------------------------------------------------------------------------------------------
# The command line: deepwml change BASELINE FOLLOWUP -o OUTDIR


def output_paths(out_dir: Path, case: str, extension: str, baseline_extension: str, segmented: tuple[bool, bool],
                 qc: bool, dicom_seg: bool = False) -> dict:
    """The output files of a change run; the report is written last."""
    paths = {
        "labels": out_dir / f"{case}_change{extension}",
        "segmentation": out_dir / f"{case}_change.seg.nrrd",
        "registered": out_dir / f"{case}_baseline_registered{extension}",
        "transform": out_dir / f"{case}_baseline_to_followup.tfm",
        "lesions": out_dir / f"{case}_change.csv",
    }
    if segmented[0]:
        paths["baseline_mask"] = out_dir / f"{case}_baseline_wmh{baseline_extension}"
    if segmented[1]:
        paths["followup_mask"] = out_dir / f"{case}_followup_wmh{extension}"
    if qc:
        paths["qc"] = out_dir / f"{case}_change_qc.png"
    if dicom_seg:
        paths["dicom_seg"] = seg_path(out_dir, case)
    paths["report"] = out_dir / f"{case}_change.json"
    return paths


def _earlier_outputs(out_dir: Path, case: str, inputs=()) -> list[Path]:
    """The files an earlier `deepwml change` run for `case` left in `out_dir`, whatever its output format; not the
    files given to this run (`inputs`: scans and masks), such as an earlier run's mask corrected in place and given
    now as --followup-mask, which is the user's, never removed as an output."""
    given = {Path(p).resolve() for p in inputs if p}
    found = []
    for extension in (".nii.gz", ".nrrd", ".mha"):
        found += [p for p in output_paths(out_dir, case, extension, extension, (True, True), True, True).values()
                  if p.is_file() and p.resolve() not in given]
    return sorted(set(found))


def _possible_outputs(out_dir: Path, case: str) -> list[Path]:
    """Every output a change run could write for `case`, in every output format, and its outline series' folder."""
    paths = {}
    for extension in (".nii.gz", ".nrrd", ".mha"):
        paths.update(dict.fromkeys(output_paths(out_dir, case, extension, extension, (True, True), True, True).values()))
    return [*paths, outline_path(out_dir, case)]


def lesions_csv(rows: list[dict]) -> str:
    return io.csv_text(CSV_COLUMNS, ({**row, "centroid_mm": " ".join(str(v) for v in row["centroid_mm"]),
                                      "slice_range": "-".join(str(v) for v in row["slice_range"])} for row in rows))


def _followup_ml(report: dict, key: str) -> str:
    """', X ml' of a call's follow-up volume for the printed summary, and the baseline lesions of the call with no
    follow-up lesion of their own, whose volume is the baseline's, said apart (`_summary`). A report written before
    they were given apart has one figure of the two scans' volumes added: not shown."""
    if f"{key}_baseline_side_ml" not in report:
        return ""
    side, elsewhere = report[f"n_{key}_baseline_side"], f"{report[f'{key}_baseline_side_ml']:.2f} ml there"
    if not side:
        return f", {report[f'{key}_ml']:.2f} ml"
    if side == report[f"n_{key}"]:  # none on the follow-up: its 0.00 ml there read as the lesions' volume
        return f", on the baseline only ({elsewhere})"
    return f", {report[f'{key}_ml']:.2f} ml on the follow-up ({side} of them on the baseline only, {elsewhere})"


def format_summary(case: str, report: dict) -> str:
    """The few lines `deepwml change` prints."""
    percent = report["volume_change_percent"]
    registration = report["registration"]
    lines = [
        f"{case}: baseline {report['baseline_volume_ml']:.2f} ml, follow-up {report['followup_volume_ml']:.2f} ml "
        f"({report['volume_change_ml']:+.2f} ml" + (f", {percent:+.1f} %" if percent is not None else "") + ")",
        f"  new: {lesion_count_text(report['n_new'])}, {report['new_ml']:.2f} ml; enlarging: {lesion_count_text(report['n_enlarging'])}, "
        f"{report['enlarging_growth_ml']:+.2f} ml; stable: {lesion_count_text(report['n_stable'])}"
        f"{_followup_ml(report, 'stable')}; gone: {lesion_count_text(report['n_gone'])}, {report['gone_ml']:.2f} ml",
    ]
    if report["n_small_new"] or report["n_small_gone"]:
        lines.append(f"  not counted, under {report['min_change_ml']:g} ml: {report['n_small_new']} small new, "
                     f"{report['n_small_gone']} small gone")
    if report["n_not_assessable"]:
        lines.append(f"  not assessable (partly outside the other scan's field of view): "
                     f"{lesion_count_text(report['n_not_assessable'])}{_followup_ml(report, 'not_assessable')}")
    consistency = registration.get("inverse_consistency")
    reliable = registration.get("reliable", True)  # reports written before the verdict was recorded
    lines.append(
        f"  registration: rotation {', '.join(f'{a:.1f}' for a in registration['rotation_deg'])} deg, translation "
        f"{', '.join(f'{t:.1f}' for t in registration['translation_mm'])} mm, correlation {measured(registration['correlation'])}"
        + ((f", both ways agree within {consistency['p95_mm']:.2f} mm" if reliable else
            f", both ways {measured(consistency['p95_mm'], ' mm apart')}") if consistency else ""))
    if not reliable:  # said first, before any figure is read
        lines.insert(0, f"{case}: {unreliable_because(registration)}: different patients, or a failed registration? "
                        "The calls below cannot be trusted")
    return "\n".join(lines)


def picture_title(case: str, report: dict) -> str:
    unreliable = "" if report.get("registration", {}).get("reliable", True) else f"{UNRELIABLE} - "
    return (f"{unreliable}{case}: {report['n_new']} new, {report['n_enlarging']} enlarging, {report['n_gone']} gone, "
            f"{report['volume_change_ml']:+.2f} ml")


def change_picture(followup: sitk.Image, labels: sitk.Image, title: str | None = None) -> bytes:
    """PNG bytes: the follow-up's axial slices with the change labels filled (new red, enlarging orange,
    stable yellow, gone blue, not assessable grey, small new pink, small gone pale blue)."""
    from .qc import png_bytes, render_labels

    order = (1, 7, 5, 4, 6, 3, 2)  # new drawn last, over the others
    colours = {value: tuple(int(round(255 * c)) for c in COLOURS[value]) for value in order}
    legend = [(LABELS[value], colours[value]) for value in (2, 3, 1, 5, 6, 7, 4)]
    return png_bytes(render_labels(followup, labels, colours, legend, title))


OUTLINE_ORDER = (1, 7, 5, 4, 6, 3, 2)  # drawing order: new last, over the others (as change_picture)
LEGEND_ORDER = (2, 3, 1, 5, 6, 7, 4)


def outline_path(out_dir: Path, case: str) -> Path:
    return out_dir / f"{case}_change_outline_dicom"


def change_outline(followup: sitk.Image, labels: sitk.Image, series, report: dict):
    """The follow-up's outline series (dicom_outline.py): each lesion outlined in its call's colour,
    with a legend of the calls present."""
    from .dicom_outline import CHANGE_SERIES_NUMBER_OFFSET, outline_series

    colours = {value: tuple(int(round(255 * c)) for c in COLOURS[value]) for value in OUTLINE_ORDER}
    present = set(np.unique(sitk.GetArrayViewFromImage(labels)).tolist())
    legend = [(LABELS[value], colours[value]) for value in LEGEND_ORDER if value in present]
    reliable = report.get("registration", {}).get("reliable", True)
    derivation = (f"Lesion change by DeepWML {__version__} against an earlier scan (baseline): {report['n_new']} new, "
                  f"{report['n_enlarging']} enlarging, {report['n_gone']} gone, {report['volume_change_ml']:+.2f} ml. "
                  + ("" if reliable else f"{unreliable_because(report['registration'])}: "
                     "different patients or a failed registration? ") + "Research use, not for diagnosis.")
    return outline_series(followup, labels, series, report.get("masks", {}).get("follow-up", {}),
                          title="DeepWML lesion change", derivation=derivation, colours=colours,
                          offset=CHANGE_SERIES_NUMBER_OFFSET,
                          caption=("DEEPWML LESION CHANGE" if reliable else f"DEEPWML: {UNRELIABLE}")
                          + " - NOT FOR DIAGNOSIS",
                          legend=legend)


def seg_path(out_dir: Path, case: str) -> Path:
    return out_dir / f"{case}_change_seg.dcm"


SEG_TITLE = "DeepWML lesion change SEG"


def segment_meanings(report: dict) -> dict:
    """What each call means, as README's Lesion change section defines it, with this run's settings (`report`: the
    change report's): the Segment Description of its segment in the change SEG."""
    tolerance, least = f"{report['tolerance_mm']:g} mm", f"{report['min_change_ml']:g} ml"
    presence = report.get("presence")
    probability = f", nor any whose lesion probability reaches {presence:g}" if presence is not None else ""
    return {
        1: "A follow-up lesion there before and not enlarging (shrunken ones included); or a baseline lesion that no "
           f"follow-up lesion matches but that is still there (within {tolerance}), drawn where it lay",
        2: f"A follow-up lesion with nothing of the baseline's within {tolerance}: no voxel the baseline marked"
           f"{probability}; {least} or more",
        3: f"A follow-up lesion grown by {100 * report['enlarge_fraction']:g} % of its baseline volume (its share of the "
           f"baseline lesions it matches, within {tolerance}) and by {report['enlarge_min_ml']:g} ml at least",
        4: "A lesion partly outside the other scan's field of view, or matched to a baseline lesion partly outside the "
           "follow-up's: its change cannot be judged",
        5: f"A baseline lesion inside the follow-up's field of view with nothing of the follow-up's within {tolerance}, "
           f"drawn where it lay (carried onto the follow-up's grid); {least} or more",
        6: f"A new lesion under {least}: listed, not counted as a change",
        7: f"A gone lesion under {least}, drawn where it lay: listed, not counted as a change",
    }


def change_seg(followup: sitk.Image, labels: sitk.Image, series, report: dict):
    """The change as a DICOM SEG on the follow-up's series (dicom_seg.py): one binary segment per call present in
    `labels`, in the order of their label values, each with a frame on the follow-up's slices holding a voxel of its
    call (`labelled_segmentation`), labelled with the call's name, described with what it means, its count and
    volume, coloured as in the picture; Series Number the follow-up's + CHANGE_SERIES_NUMBER_OFFSET. `report`: the change
    report (its calls' counts, settings, registration and the masks' models). None when `labels` holds no lesion
    (no call to segment: a SEG needs one segment at least)."""
    from .dicom_seg import CHANGE_SERIES_NUMBER_OFFSET, Segment, labelled_segmentation

    present = set(np.unique(sitk.GetArrayViewFromImage(labels)).tolist())
    values = [value for value in LABELS if value in present]
    if not values:
        return None
    reliable = report.get("registration", {}).get("reliable", True)
    caution = "" if reliable else (f"{unreliable_because(report['registration'])}: different patients or a failed "
                                   "registration? ")
    meanings = segment_meanings(report)
    segments = []
    for value in values:
        key = LABELS[value].replace(" ", "_")
        count, volume = report.get(f"n_{key}", 0), report.get(f"{key}_ml", 0.0)
        described = (f"{caution}{meanings[value]}. Here: {lesion_count_text(count)}, {volume:.2f} ml. Lesion change by "
                     f"DeepWML {__version__} against an earlier scan (baseline). Research use, not for diagnosis.")
        segments.append(Segment(value, LABELS[value], described, tuple(int(round(255 * c)) for c in COLOURS[value])))
    sources = report.get("masks", {}).values()
    models = list(dict.fromkeys(sha for source in sources if isinstance(source, dict)
                                for sha in source.get("model_sha256") or []))
    made = labelled_segmentation(followup, labels, series, segments, models, SEG_TITLE, "CHANGE",
                                 "Lesion change (DeepWML)" if reliable else "Lesion change, REGISTRATION NOT RELIABLE",
                                 CHANGE_SERIES_NUMBER_OFFSET)
    made.segments = {number: segment.label for number, segment in enumerate(segments, start=1)}
    return made


def _masks_for(args, baseline: sitk.Image, followup: sitk.Image, mask_paths: tuple, loaded: dict,
               series: tuple = (None, None)) -> tuple:
    """(baseline mask, follow-up mask, baseline probabilities, follow-up probabilities, their sources): a
    mask is read when its path is given (no probabilities then), else the scan is segmented here with
    the chosen models (loaded once into `loaded` for a whole cohort; with progress). `series`: each scan's DICOM
    series (io.DicomSeries) where it is one, by which a DICOM SEG given as its mask is placed (io.read_mask)."""
    from .segment import input_fingerprint

    masks, maps, source = {}, {}, {}
    needed = [name for name, given in zip(("baseline", "follow-up"), mask_paths) if not given]
    if needed:
        _segmentation_models(args, loaded)
    for name, given, image, other, own, others in zip(("baseline", "follow-up"), mask_paths, (baseline, followup),
                                                      (followup, baseline), series, series[::-1]):
        if given:
            masks[name] = _read_given_mask(given, name, image, other, own, others)
            maps[name] = None
            # its content: a mask corrected in place is not taken for the one a rerun would skip as done
            source[name] = {"mask": str(given), "mask_fingerprint": input_fingerprint(Path(given))}
            continue
        from .segment import ProgressBar, segment_image

        bar = ProgressBar()
        update = bar(needed.index(name) + 1, len(needed), f"segmenting the {name}")
        result = segment_image(image, loaded["models"], args.device, args.threshold, backend=args.backend,
                               brain_model=loaded["brain"], progress=update, precision=args.precision,
                               checked=True, grid_phases=args.grid_phases,  # check_scans checked it
                               brain_gate=not args.no_brain_mask)
        bar.finish({"case": f"the {name}", "status": "ok", **result.report})
        masks[name] = result.mask
        maps[name] = result.probabilities
        source[name] = {key: result.report[key] for key in ("model", "model_sha256", "brain_model", "threshold",
                                                            "runner", "warnings", "lesion_count", "volume_ml",
                                                            "settings")}
    return masks["baseline"], masks["follow-up"], maps["baseline"], maps["follow-up"], source


def _read_given_mask(path, name: str, image: sitk.Image, other: sitk.Image, series=None,
                     other_series=None) -> sitk.Image:
    """The mask given for the `name` scan (`image`, read from the DICOM series `series` where it is one: a DICOM
    SEG's frames are then placed by the images they name), put onto its grid (io.read_mask). One that is not on
    that grid but lies on the other scan's (`other`, `other_series`) is said to be that scan's: the two masks given
    the wrong way round, which the advice for another grid (resample one onto the other) would only make worse."""
    try:
        return io.read_mask(path, image, f"the {name} FLAIR", source=series)
    except DeepWMLError as exc:
        mine = exc
    other_name = "follow-up" if name == "baseline" else "baseline"
    try:
        io.read_mask(path, other, f"the {other_name} FLAIR", source=other_series)
    except DeepWMLError:
        raise mine from None
    raise DeepWMLError(f"{path}, given as the {name}'s mask, lies on the {other_name} FLAIR's grid, not the {name}'s: "
                       f"is it the {other_name}'s mask? Give the earlier scan's mask as the baseline's and the later "
                       "scan's as the follow-up's (--baseline-mask, --followup-mask; in a manifest the baseline_mask "
                       "and followup_mask columns)")


def _refused_at_once(args, segmenting: bool) -> dict:
    """What the options refuse, refused before OUTDIR is made or a scan read (each pair refused it after, leaving
    an empty OUTDIR): where a scan is to be segmented (`segmenting`), --device cuda without a GPU, a backend not
    installed, and a model file missing or of another kind. Returns the models loaded (_segmentation_models's
    `loaded`: {} when nothing is segmented)."""
    loaded: dict = {}
    if segmenting:
        from .inference import check_runtime

        check_runtime(args.device, args.backend, args.precision)
        _segmentation_models(args, loaded)
    return loaded


def _segmentation_models(args, loaded: dict) -> None:
    """The models that segment a scan without a mask, loaded once into `loaded` for a whole cohort."""
    if "models" not in loaded:
        from .segment import load_brain_model_saying_none, load_models

        loaded["models"] = load_models(args.model)
        loaded["brain"] = load_brain_model_saying_none("default")  # with --no-brain-mask too: for the checks, not the marks


def register(subparsers) -> None:  # the CLI's hook (see cli.py)
    from .cli import add_debug_flag, non_negative_float

    p = subparsers.add_parser(
        "change", help="new, enlarging and gone lesions between two scans of one patient",
        description="Compare a follow-up FLAIR with an earlier (baseline) FLAIR of the same patient: the baseline is "
                    "registered rigidly to the follow-up, each scan is segmented (or its mask given), and every "
                    "follow-up lesion is called new, enlarging, stable or not assessable, every baseline lesion "
                    "that left no trace gone. Outputs lie on the follow-up's grid.")
    p.add_argument("baseline", metavar="BASELINE", nargs="?", help="the earlier FLAIR (file or DICOM folder)")
    p.add_argument("followup", metavar="FOLLOWUP", nargs="?", help="the later FLAIR (file or DICOM folder)")
    p.add_argument("--manifest", metavar="CSV", help="many pairs: a CSV with columns case, baseline, followup "
                   "[, baseline_mask, followup_mask] (paths relative to its folder); each pair's outputs go to OUTDIR "
                   "under its case name, one row per pair to OUTDIR/change_summary.csv; a failing pair is recorded "
                   "and the others still run")
    p.add_argument("-o", "--output-dir", required=True, metavar="OUTDIR")
    p.add_argument("--case", help="the name of the outputs (default: the follow-up's file name)")
    p.add_argument("--baseline-mask", metavar="MASK", help="the baseline's lesion mask on its grid (any non-zero "
                   "voxel is lesion; default: segment the baseline)")
    p.add_argument("--followup-mask", metavar="MASK", help="the follow-up's lesion mask (default: segment it)")
    p.add_argument("--baseline-series", metavar="TEXT", help="a DICOM folder holding several series as the baseline: "
                   "which one (its series number, description or a part of it, or UID; default: the only one that "
                   "looks like a FLAIR)")
    p.add_argument("--followup-series", metavar="TEXT", help="the same for the follow-up")
    p.add_argument("--tolerance-mm", type=non_negative_float, default=DEFAULT_TOLERANCE_MM,
                   help=f"a lesion with the other scan's lesion within this distance was present in both "
                        f"(default {DEFAULT_TOLERANCE_MM:g} mm)")
    p.add_argument("--enlarge-fraction", type=non_negative_float, default=DEFAULT_ENLARGE_FRACTION,
                   help=f"a lesion is enlarging when it grew by this fraction of its baseline volume (default "
                        f"{DEFAULT_ENLARGE_FRACTION:g}) ...")
    p.add_argument("--enlarge-min-ml", type=non_negative_float, default=DEFAULT_ENLARGE_MIN_ML,
                   help=f"... and by this many ml at least (default {DEFAULT_ENLARGE_MIN_ML:g})")
    p.add_argument("--presence", default=str(DEFAULT_PRESENCE), type=_presence,
                   help=f"for a scan segmented here, a voxel whose lesion probability reaches this counts as marked "
                        f"when deciding whether the other scan's lesion is new or gone (default {DEFAULT_PRESENCE:g}; "
                        "off: the masks alone)")
    p.add_argument("--min-change-ml", type=non_negative_float, default=DEFAULT_MIN_CHANGE_ML,
                   help=f"a new lesion, or a gone one, smaller than this is listed as small new / small gone and not "
                        f"counted as a change (default {DEFAULT_MIN_CHANGE_ML:g} ml; 0 counts all)")
    p.add_argument("--model", nargs="+", metavar="FILE",
                   help="segmentation model file(s), or the name of a shipped model or ensemble (e.g. ensemble-v8), as "
                        "in deepwml segment (default: the shipped model)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--threshold", type=float, default=None, help="probability threshold (default: the model's)")
    p.add_argument("--backend", default="auto", choices=("auto", "openvino", "onnx", "torch"))
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    p.add_argument("--grid-phases", type=int, default=1, choices=(1, 4),
                   help="for a scan segmented here, as in deepwml segment: 4 averages the lesion probabilities over the "
                        "network grid moved by 0 and half a pixel, so fewer small lesions are called new or gone only "
                        "because the two scans were sampled at other points (about 4 times slower; README). Default 1")
    p.add_argument("--no-brain-mask", action="store_true", help="keep marks outside the brain (the brain mask is "
                   "still made for the checks: is it a FLAIR, is the whole brain in the scan)")
    p.add_argument("--output-format", default="same", choices=io.OUTPUT_FORMATS,
                   help="format of the image outputs (default: the follow-up's own; the baseline's mask: the baseline's)")
    p.add_argument("--qc", action="store_true", help="also write CASE_change_qc.png: the follow-up's axial slices with "
                   "each lesion in its call's colour, under a legend: new red, enlarging orange, stable yellow, gone "
                   "blue, small new pink, small gone pale blue, not assessable grey")
    p.add_argument("--dicom-outline", action="store_true", help="for a DICOM follow-up, also write "
                   "CASE_change_outline_dicom/: the follow-up FLAIR with each lesion outlined in its call's colour as a "
                   "new series of its study, to read the change in a PACS viewer")
    p.add_argument("--dicom-seg", action="store_true", help="for a DICOM follow-up, also write CASE_change_seg.dcm: "
                   "the change as a DICOM Segmentation object (SEG) on the follow-up's series, one segment per call "
                   "present (stable, new, enlarging, ...) in its colour, which PACS viewers show as an overlay")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    add_debug_flag(p)
    p.set_defaults(func=_run)


def _presence(text: str) -> str:
    import argparse

    if text == "off":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a probability between 0 and 1 or off, got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be a probability between 0 and 1 (exclusive) or off, got {text}")
    return text


SUMMARY_COLUMNS = ("case", "status", "error", "baseline_volume_ml", "followup_volume_ml", "volume_change_ml",
                   "n_new", "new_ml", "n_enlarging", "enlarging_growth_ml", "n_stable", "n_gone", "gone_ml",
                   "n_small_new", "n_small_gone", "n_not_assessable", "correlation", "registration_reliable",
                   "warnings", "seconds")


def _run(args) -> int:
    from .segment import model_files

    if args.threshold is not None and not 0 < args.threshold < 1:
        raise UsageError("--threshold must be between 0 and 1 (exclusive)")
    args.model = model_files(args.model)  # a shipped model's or ensemble's name stands for its file(s)
    if args.manifest:
        if (args.baseline or args.followup or args.case or args.baseline_mask or args.followup_mask
                or args.baseline_series or args.followup_series):
            raise UsageError("--manifest lists the pairs; leave out BASELINE, FOLLOWUP, --case and the mask and series "
                             "options (baseline_mask and followup_mask columns give masks)")
        return _run_cohort(args)
    if not (args.baseline and args.followup):
        raise UsageError("give BASELINE and FOLLOWUP (the earlier scan first), or --manifest for many pairs")
    given = bool(args.baseline_mask), bool(args.followup_mask)
    if all(given) and (args.model or args.threshold is not None or args.no_brain_mask or args.grid_phases != 1):
        raise UsageError("--model, --threshold, --no-brain-mask and --grid-phases segment a scan; with both masks given "
                         "nothing is segmented")
    if Path(args.baseline).resolve() == Path(args.followup).resolve():
        if not Path(args.baseline).is_dir():
            raise UsageError("BASELINE and FOLLOWUP are the same file; give the earlier scan first, then the later one")
        if not (args.baseline_series and args.followup_series):  # one DICOM folder holding both visits
            raise UsageError("BASELINE and FOLLOWUP are the same folder: name each visit's FLAIR series with "
                             "--baseline-series and --followup-series, or give each visit's folder")
    if args.case is not None and (not args.case.strip() or args.case in (".", "..") or any(c in args.case for c in "/\\")):
        raise UsageError(f"--case {args.case!r} must be a plain file name (no folders)")
    if args.case is not None and io.WINDOWS and any(c in args.case for c in io.WINDOWS_ILLEGAL):
        # "a:b" would write to the folder of drive A: (or a stream of file "a"), not to OUTDIR
        raise UsageError(f"--case {args.case!r} must be a plain file name: Windows allows none of {io.WINDOWS_ILLEGAL} in one")
    case = args.case or io.case_name(args.followup)
    masks = (args.baseline_mask, args.followup_mask)
    out = Path(args.output_dir)
    loaded = _refused_at_once(args, not all(given))
    try:
        if out.is_dir():  # an earlier run of the pair may be here: done before, its missing outputs added, as in a cohort
            entry = {"case": case, "baseline": args.baseline, "followup": args.followup, "baseline_mask": masks[0],
                     "followup_mask": masks[1], "baseline_series": args.baseline_series,
                     "followup_series": args.followup_series}
            status, report, how = _cohort_pair(args, out, case, entry, loaded)
        else:  # nothing there yet: run_case makes OUTDIR once the scans are checked, and takes the pair's lock
            status, report, how = "ok", run_case(args, case, args.baseline, args.followup, masks, loaded), ""
    except io.BeingWritten:  # as `deepwml segment` leaves a case another process is writing: skipped, not failed
        # (also when that process made OUTDIR after this one looked for it)
        print(f"{case}: skipped - {PAIR_LEFT_TO_ANOTHER}", file=sys.stderr)
        return 0
    if status != "ok":  # as `deepwml segment` says a case done before (exit 0): skipped, or outputs added
        print(f"{case}: {status} - {how}", file=sys.stderr)
        return 0
    print(format_summary(case, report))
    for warning in report["warnings"]:
        print(f"{case}: warning: {warning}", file=sys.stderr)
    print(f"outputs in {args.output_dir} ({report['seconds']:.1f} s)", file=sys.stderr)
    return 0


def _run_cohort(args) -> int:
    from .errors import case_error
    from .evaluation import plain_name, read_manifest, report_failed_cases
    from .segment import batch_total

    entries = read_manifest(args.manifest, ("case", "baseline", "followup"), ("baseline_mask", "followup_mask"),
                            ("baseline", "followup", "baseline_mask", "followup_mask"))
    loaded = _refused_at_once(args, any(not (e.get("baseline_mask") and e.get("followup_mask")) for e in entries))
    out = io.make_output_dir(args.output_dir)
    rows, failed, names = [], [], {}
    compared = [0, 0.0]  # pairs compared so far and the time they took: the time left, from them alone (a pair
    # skipped as done before, or refused at once, says nothing of how long the others take)
    for number, entry in enumerate(entries, start=1):
        start = time.perf_counter()
        case = plain_name(entry["case"])
        print(f"[{number}/{len(entries)}] {entry['case']}", file=sys.stderr)
        if case in names:  # "a/b" and "a_b" would write the same files
            failed.append({"case": entry["case"], "error": f"its outputs would be named {case}_*, as case "
                                                            f"{names[case]!r}'s are; rename one of them"})
            rows.append({"case": entry["case"], "status": "error", "error": failed[-1]["error"]})
            print(f"{entry['case']}: error - {failed[-1]['error']}", file=sys.stderr)
            continue
        names[case] = entry["case"]
        try:
            if Path(entry["baseline"]).resolve() == Path(entry["followup"]).resolve():
                raise DeepWMLError("baseline and followup are the same file")
            status, report, how = _cohort_pair(args, out, case, entry, loaded)
        except io.BeingWritten:  # another DeepWML run into OUTDIR holds this pair now: left to it, not a failure
            rows.append({"case": entry["case"], "status": "skipped", "error": PAIR_LEFT_TO_ANOTHER,
                         "_busy": (entry, _report_seen(out, case))})
            print(f"{entry['case']}: skipped - {PAIR_LEFT_TO_ANOTHER}", file=sys.stderr)
            _write_summary(rows, out)
            continue
        except Cancelled:
            raise
        except Exception as exc:  # one bad pair never stops the others
            failed.append({"case": entry["case"], "error": case_error(exc)})
            rows.append({"case": entry["case"], "status": "error", "error": failed[-1]["error"],
                         "seconds": round(time.perf_counter() - start, 3)})
            print(f"{entry['case']}: error - {failed[-1]['error']}", file=sys.stderr)
            continue
        if status != "ok":  # done before: skipped, or its missing outputs added
            rows.append({**_summary_row(entry["case"], report), "status": status, "error": how})
            print(f"{entry['case']}: {status} - {how}", file=sys.stderr)
            _write_summary(rows, out)
            continue
        rows.append({**_summary_row(entry["case"], report), "status": "ok", "error": ""})
        print(format_summary(entry["case"], report))
        for warning in report["warnings"]:
            print(f"{entry['case']}: warning: {warning}", file=sys.stderr)
        compared = [compared[0] + 1, compared[1] + time.perf_counter() - start]
        if number < len(entries):
            from .segment import _duration

            more = len(entries) - number
            print(f"{entry['case']}: done in {time.perf_counter() - start:.1f} s; about "
                  f"{_duration(compared[1] / compared[0] * more)} left for {more} more", file=sys.stderr)
        _write_summary(rows, out)  # after every pair: an interrupted cohort keeps what it did
    for row in rows:  # the pairs left to another process, looked at again (segment.recheck_left_to_another's rules)
        left = row.pop("_busy", None)
        if left is None:
            continue
        entry, seen = left
        case = plain_name(entry["case"])
        seen_now = _report_seen(out, case)
        own = seen_now is not None and seen_now == seen  # its report as this run found it: done before, this run's
        start = time.perf_counter()
        try:  # another process's result is checked, never replaced: this run's --overwrite only for its own
            status, report, how = _cohort_pair(args if own else _without_overwrite(args), out, case, entry, loaded)
        except io.BeingWritten:
            row["error"] = (f"{PAIR_LEFT_TO_ANOTHER}; its lock, {pair_lock_path(out, case)}, was still held at the end "
                            "of this run: if no DeepWML run is writing into this OUTDIR, here or on another computer "
                            "sharing the folder (one stopped there can leave its lock held on a network share), delete "
                            "that file and run again")
            continue
        except Cancelled:
            raise
        except Exception as exc:
            failed.append({"case": entry["case"], "error": case_error(exc)})
            row.update(status="error", error=failed[-1]["error"], seconds=round(time.perf_counter() - start, 3))
            print(f"{entry['case']}: error - {failed[-1]['error']}", file=sys.stderr)
            continue
        said = how if own or status != "skipped" else PAIR_DONE_BY_ANOTHER
        row.update({**_summary_row(entry["case"], report), "status": status, "error": said})
        print(f"{entry['case']}: {status} - {said}" if status != "ok" else format_summary(entry["case"], report),
              file=sys.stderr if status != "ok" else sys.stdout)
    _write_summary(rows, out)
    unreliable = [row["case"] for row in rows if row.get("registration_reliable") is False]
    if unreliable:  # repeated at the end, where a long cohort's output is read
        print(f"{len(unreliable)} pair(s) with {UNRELIABLE.lower()} (different patients, or a failed registration?): "
              f"{', '.join(unreliable)}", file=sys.stderr)
    print(batch_total(rows, "pairs", out / "change_summary.csv"), file=sys.stderr)
    return report_failed_cases(failed, "failed")


PAIR_LEFT_TO_ANOTHER = ("being written by another DeepWML process now, so left to it (not compared twice); its "
                        "figures are in its report when it is done")
PAIR_DONE_BY_ANOTHER = "written by another DeepWML process into this OUTDIR during this run; figures from its report"


def pair_lock_path(out: Path, case: str) -> Path:
    """The file whose lock a process working on the pair `case` in `out` holds (io.exclusive, as segment.lock_path a
    case's): a second process, `deepwml change` of one pair or of a manifest, leaves the pair to it. Not the lock of a
    segment case of the same name, whose outputs are others."""
    return out / f".{io.shortened(case)}_change.deepwml-lock"


def _report_seen(out: Path, case: str):
    """What tells the pair's report apart from one written after (segment._report_seen), or None: none there."""
    try:
        stat = (out / f"{case}_change.json").stat()
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size, stat.st_ino


def _without_overwrite(args):
    import argparse

    return argparse.Namespace(**{**vars(args), "overwrite": False})


def _given(entry: dict) -> list:
    return [entry.get(key) for key in ("baseline", "followup", "baseline_mask", "followup_mask")]


@contextlib.contextmanager
def _pair_held(out: Path, case: str):
    """The pair's lock (pair_lock_path; io.BeingWritten when another process holds it) held while the block runs;
    first the hidden temporary files a run of the pair killed while writing left are removed (as segment removes a
    case's, its lock held), not those of another pair or case."""
    with io.exclusive(pair_lock_path(out, case), f"pair {case!r} in {out}"):
        possible = [*(p for extension in io.OUTPUT_EXTENSIONS
                      for p in output_paths(out, case, extension, extension, (True, True), True, True).values()),
                    outline_path(out, case)]
        from .segment import journal_path

        prefixes = tuple(io.temporary_prefix(path) for path in [*possible, journal_path(out / f"{case}_change.json")])
        for left in io.temporary_leftovers(out):
            if left.name.startswith(prefixes):  # one that cannot be removed (Windows: open elsewhere) stays, harmless
                with contextlib.suppress(OSError):
                    shutil.rmtree(left, ignore_errors=True) if left.is_dir() else left.unlink(missing_ok=True)
        yield


def _cohort_pair(args, out: Path, case: str, entry: dict, loaded: dict) -> tuple[str, dict, str]:
    """One pair, of a manifest or given alone into an existing OUTDIR, with its lock held (_pair_held): done before
    (done_pair), else compared: ('ok', its report, ''); an incomplete set of an earlier run refused."""
    with _pair_held(out, case):
        done = done_pair(args, out, case, entry, loaded)
        if done is not None:
            return done
        earlier = _earlier_outputs(out, case, _given(entry))
        if earlier and not args.overwrite:  # the report is written last: an earlier run stopped part way
            _refuse_unreplaceable_outline(out, case)  # but a user's folder of the outline's name said first
            raise DeepWMLError(f"an earlier run left an incomplete set of outputs ({', '.join(p.name for p in earlier)}; "
                               "no report); rerun with --overwrite to replace them")
        return "ok", run_case(args, case, entry["baseline"], entry["followup"],
                              (entry.get("baseline_mask") or None, entry.get("followup_mask") or None), loaded,
                              locked=True), ""


def done_pair(args, out: Path, case: str, entry: dict, loaded: dict) -> tuple[str, dict, str] | None:
    """A pair done before in `out` (its report and outputs there; not with --overwrite), `deepwml change` of one pair
    and of a manifest alike, its lock held by the caller: checked (check_done_pair; else a DeepWMLError saying what
    differs and to use --overwrite), and the optional outputs this run asks for and `out` lacks made from its saved
    label map (add_pair_outputs): (segment.ADDED, its report, what was added); with nothing to add, ('skipped', its
    report, _skip_message). None: not done before (no report of it there, or --overwrite), to be compared.
    `entry`: the manifest's row (case, baseline, followup, baseline_mask, followup_mask), for one pair the same
    from its arguments, with baseline_series and followup_series."""
    from .segment import ADDED, refuse_stopped

    report_path = out / f"{case}_change.json"
    refuse_stopped(report_path, args.overwrite, "pair")  # a run killed part way: never a pair done, even beside its old report
    if args.overwrite or not report_path.is_file() or not _earlier_outputs(out, case, _given(entry)):
        return None
    done = check_done_pair(out, case, entry, report_path, args, loaded)
    added = add_pair_outputs(out, case, entry, done, args)  # asked for now, not made then: made now
    if added:
        return ADDED, added[0], added[1]
    # --dicom-outline/--dicom-seg of a file follow-up: nothing to add, said as a full run's report says it
    unmade = [warning for option, warning in (("dicom_outline", NO_DICOM_OUTLINE), ("dicom_seg", NO_DICOM_SEG))
              if getattr(args, option, False) and not Path(entry["followup"]).is_dir()]
    return "skipped", done, "; ".join([_skip_message(done), *unmade])


# The settings that shape a pair's result, by the option that sets them, as a report records them: a rerun into
# the same OUTDIR skips a pair only when they are the same (as `deepwml segment` skips a case). How a run goes and
# the optional outputs it adds (--qc, --dicom-outline, --dicom-seg, --output-format) do not count.
CHANGE_SETTINGS = {"tolerance_mm": "--tolerance-mm", "enlarge_fraction": "--enlarge-fraction",
                   "enlarge_min_ml": "--enlarge-min-ml", "presence": "--presence", "min_change_ml": "--min-change-ml"}
# ... and of a scan segmented here (segment.RESULT_SETTINGS, those `deepwml change` has options for)
SEGMENTATION_SETTINGS = {"model_sha256": "--model", "threshold": "--threshold", "brain_model_sha256": "--no-brain-mask",
                         "brain_mask": "--no-brain-mask", "precision": "--precision", "grid_phases": "--grid-phases"}
MASK_COLUMNS = {"baseline": "baseline_mask", "follow-up": "followup_mask"}  # the report's `masks`: the manifest's column
SCAN_COLUMNS = {"baseline": "baseline", "follow-up": "followup"}  # a scan's name in `dicom_series`: its manifest column


def planned_change_settings(args, given: tuple) -> dict:
    """CHANGE_SETTINGS as a run of `args` records them for a pair whose masks are `given` (baseline, follow-up): the
    presence only where a scan is segmented (a given mask has no probabilities)."""
    segmented = not all(given)
    return {"tolerance_mm": args.tolerance_mm, "enlarge_fraction": args.enlarge_fraction,
            "enlarge_min_ml": args.enlarge_min_ml, "min_change_ml": args.min_change_ml,
            "presence": float(args.presence) if segmented and args.presence != "off" else None}


def check_done_pair(out: Path, case: str, entry: dict, report_path: Path, args, loaded: dict) -> dict:
    """The report of an earlier run of the pair `case` in `out`, checked before the pair is skipped as done (as
    segment.check_earlier_result checks a case): made from these scans (known by their content, so also at other
    paths: moved, renamed or mounted elsewhere), with the same masks (a given one's content unchanged since, wherever
    it lies now) and the same settings (CHANGE_SETTINGS; for a scan segmented then and now,
    SEGMENTATION_SETTINGS), its outputs still there (its QC picture or outline series may have been deleted).
    Else a DeepWMLError that says what differs and what to do. `loaded`: the cohort's models (_segmentation_models)."""
    from .segment import input_fingerprint, planned_settings, recorded_settings, settings_differences

    try:
        done = json.loads(report_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DeepWMLError(f"{report_path.name} cannot be read ({exc}); rerun with --overwrite to redo the pair") from exc
    # a scan at another path is this pair's when it is the same scan, known by its content: a cohort moved, renamed
    # or mounted elsewhere keeps its pairs done, as `deepwml segment` keeps a case's results (segment.same_input)
    moved = [key for key in SCAN_COLUMNS.values()
             if isinstance(done, dict) and Path(str(done.get(key, ""))).resolve() != Path(entry[key]).resolve()]
    if not isinstance(done, dict) or not all(_moved_scan(done, name, key, Path(entry[key]))
                                             for name, key in SCAN_COLUMNS.items() if key in moved):
        then = done if isinstance(done, dict) else {}
        raise DeepWMLError(f"{report_path.name} holds another pair ({then.get('baseline')} -> {then.get('followup')}); "
                           "rename the case or use --overwrite")
    changed = [f"the {name} ({entry[key]}) has changed since" for name, key in SCAN_COLUMNS.items()
               if key not in moved and not _same_scan(done, name, key, Path(entry[key]))]
    if changed:  # a scan replaced under its name (a corrected export): its pair is not done
        raise DeepWMLError(f"{out} holds pair {case!r} made from other scans: {'; '.join(changed)}; use --overwrite "
                           "to redo it with these scans, or another OUTDIR to keep both")
    given = tuple(entry.get(column) or None for column in MASK_COLUMNS.values())
    differences = settings_differences(done, planned_change_settings(args, given), CHANGE_SETTINGS)
    series = done.get("dicom_series") if isinstance(done.get("dicom_series"), dict) else {}
    for name, key in SCAN_COLUMNS.items():  # one pair's --baseline-series/--followup-series, as segment's --series
        named, then = entry.get(f"{key}_series"), series.get(name)
        if named and Path(entry[key]).is_dir() and isinstance(then, dict) and then.get("uid"):
            chosen, _ = io.choose_dicom_series(entry[key], named, f"--{key}-series")
            if chosen.uid != then["uid"]:
                which = f"series {then['number']}" if then.get("number") is not None else f"UID {then['uid']}"
                differences.append(f"--{key}-series ({which} '{then.get('description') or ''}' then, "
                                   f"{chosen.label()} now)")
    sources = done.get("masks") if isinstance(done.get("masks"), dict) else {}
    segmented = []  # the sources of the scans segmented then and now
    for (name, column), now in zip(MASK_COLUMNS.items(), given):
        then = sources.get(name)
        if not isinstance(then, dict):  # a report of a version before its masks were recorded
            continue
        if "mask" in then and now:
            fingerprint = then.get("mask_fingerprint")
            if Path(str(then["mask"])).resolve() != Path(now).resolve():
                if not fingerprint or fingerprint != input_fingerprint(Path(now)):  # not the same mask moved
                    differences.append(f"{column} ({then['mask']} then, {now} now)")
            elif fingerprint and fingerprint != input_fingerprint(Path(now)):
                differences.append(f"{column} ({now} has changed since)")
        elif "mask" in then:
            differences.append(f"{column} ({then['mask']} then; none now, so the scan is segmented)")
        elif now:
            differences.append(f"{column} (none then: the scan was segmented; {now} now)")
        else:
            segmented.append(then)
    if segmented:
        _segmentation_models(args, loaded)
        planned = planned_settings(loaded["models"], args.threshold, brain_model=loaded["brain"], ventricle_model=None,
                                   precision=args.precision, grid_phases=args.grid_phases,
                                   brain_gate=not args.no_brain_mask)
        for then in segmented:  # both scans segmented alike: each difference said once
            differences += settings_differences(recorded_settings(then), planned, SEGMENTATION_SETTINGS)
    if differences:
        raise DeepWMLError(f"{out} holds pair {case!r} made with other settings: {'; '.join(dict.fromkeys(differences))}; "
                           "use --overwrite to replace it with this run's, or another OUTDIR to keep both")
    missing = _missing_outputs(out, case, done)
    if missing:
        raise DeepWMLError(f"an earlier run's {report_path.name} is here but not its {', '.join(missing)} (deleted?); "
                           "rerun with --overwrite to make them again")
    return done


def _same_scan(done: dict, name: str, key: str, path: Path) -> bool:
    """Whether the scan `path` (the report's `key`, its `name` in `dicom_series`) is the one the pair's report `done`
    was made from, known by its content as `deepwml segment` knows a case's scan (segment.same_input). A report of
    a version before it recorded the scans' content: by their paths alone, as then (_skip_message says so)."""
    from .segment import same_input

    series = done.get("dicom_series") if isinstance(done.get("dicom_series"), dict) else {}
    then = {"input_absolute": str(Path(str(done[key])).resolve()), "input_fingerprint": done.get(f"{key}_fingerprint"),
            "dicom_series": series.get(name) if isinstance(series.get(name), dict) else None}
    return then["input_fingerprint"] is None or same_input(then, path)


def _moved_scan(done: dict, name: str, key: str, path: Path) -> bool:
    """Whether the scan `path`, not where the pair's report `done` says its `key` was, is that scan at another path:
    by its content (_same_scan), which a report of a version before it recorded it cannot tell."""
    return bool(done.get(f"{key}_fingerprint")) and _same_scan(done, name, key, path)


def _missing_outputs(out: Path, case: str, done: dict) -> list[str]:
    """The outputs of a pair done before (its report `done`) that are no longer in `out`; its optional ones (the QC
    picture, the outline series, the SEG) are not needed."""
    # (the outline series' folder too: a rerun that added it lists it, and it may be deleted or, the run killed
    # between the report and it, never written)
    optional = (f"{case}_change_qc.png", seg_path(out, case).name, outline_path(out, case).name, f"{case}_change.json")
    listed = done.get("outputs")
    if isinstance(listed, list):
        return [n for n in listed if isinstance(n, str) and n not in optional and not (out / n).exists()]
    # a report of a version before its outputs were listed: each of them in any image format
    sources = done.get("masks") if isinstance(done.get("masks"), dict) else {}
    segmented = tuple(isinstance(sources.get(name), dict) and "mask" not in sources[name] for name in MASK_COLUMNS)
    variants = [output_paths(out, case, e, e, segmented, False) for e in io.OUTPUT_EXTENSIONS]
    return [path.name for kind, path in variants[0].items()
            if path.name not in optional and not any(v[kind].exists() for v in variants)]


def _skip_message(done: dict) -> str:
    """The summary's word on a pair skipped as done (check_done_pair); for a report of an older version, which of
    the settings it does not record, so could not be compared."""
    unrecorded = [option for key, option in CHANGE_SETTINGS.items() if key not in done]
    masks = done.get("masks")
    sources = [s for s in masks.values() if isinstance(s, dict)] if isinstance(masks, dict) else []
    if any("mask" not in s and "settings" not in s for s in sources):
        unrecorded += ["--no-brain-mask", "--precision"]
    if any(f"{key}_fingerprint" not in done for key in SCAN_COLUMNS.values()):
        unrecorded.append("the scans' content")
    if any("mask" in s and "mask_fingerprint" not in s for s in sources):
        unrecorded.append("the masks' content")
    message = "done before (use --overwrite to redo)"
    if unrecorded:
        message += (f"; made by an older DeepWML whose report does not record all its settings ({', '.join(unrecorded)}), "
                    "so this run's may differ: --overwrite makes it with them")
    return message


# the warnings of --dicom-outline and --dicom-seg for a follow-up that is not DICOM (a run's report; a rerun's skip)
NO_DICOM_OUTLINE = ("no DICOM outline series: the follow-up is not DICOM, so it has no patient or study to write one "
                    "into (--dicom-outline needs a DICOM follow-up)")
NO_DICOM_SEG = ("no DICOM SEG: the follow-up is not DICOM, so it has no patient or study to write one into (--dicom-seg "
                "needs a DICOM follow-up)")


def _outline_of(done: dict, name: str) -> bool:
    """Whether the pair's report `done` says its runs wrote the outline series' folder `name`: a full run names it in
    `dicom_outline`, a rerun that added it lists it in `outputs` too. A report that lists no outputs (an older
    version) and names none: it cannot tell, so the folder is taken for the pair's, as it was. Names alike but for
    upper/lower case are one (a follow-up typed in other letters on macOS or Windows finds the same folder)."""
    outline = done.get("dicom_outline")
    listed = done.get("outputs")
    folder = outline.get("folder") if isinstance(outline, dict) else None
    return ((isinstance(folder, str) and folder.casefold() == name.casefold())
            or (isinstance(listed, list) and name.casefold() in {n.casefold() for n in listed if isinstance(n, str)})
            or (not isinstance(listed, list) and outline is None))


def _refuse_unreplaceable_outline(out: Path, case: str) -> None:
    """A folder of the pair's outline series' name that --overwrite would not replace either (a user's images in it:
    dicom_outline.refuse_unreplaceable), refused as such before a refusal that advises --overwrite."""
    from .dicom_outline import refuse_unreplaceable

    refuse_unreplaceable(outline_path(out, case))


def add_pair_outputs(out: Path, case: str, entry: dict, done: dict, args) -> tuple[dict, str] | None:
    """For a pair done before (its report `done`, checked: check_done_pair), the optional outputs this run asks for
    and OUTDIR lacks (`--qc`'s picture; for a DICOM follow-up `--dicom-outline`'s series and `--dicom-seg`'s SEG),
    made from its saved change label map (CASE_change, the result the user has; nothing segmented or registered
    again) and the report's figures, as segment.add_outputs adds a case's: the label map checked to lie on the
    follow-up's grid and to be the one the run wrote (`labels_sha256`, recorded since; a report of an earlier
    version: its labels only checked to be calls), the files there left as they are, the report rewritten listing
    the new outputs (segment.write_added). Returns (the report, the row's words on what was added), or None when
    nothing is missing (a pair without any lesion has no SEG to add)."""
    from .segment import mask_digest, read_saved_output, write_added

    followup_path = Path(entry["followup"])
    dicom = followup_path.is_dir()
    wanted = {"qc": out / f"{case}_change_qc.png"} if args.qc else {}
    if dicom and getattr(args, "dicom_outline", False):
        wanted["dicom_outline"] = outline_path(out, case)
    if dicom and getattr(args, "dicom_seg", False):
        wanted["dicom_seg"] = seg_path(out, case)
    # a folder of the outline series' name that the report does not name (the run did not write it: a user's) is no
    # outline of the pair: to be added, so refused below as a folder in the way
    missing = {key: path for key, path in wanted.items()
               if not path.exists() or (key == "dicom_outline" and not _outline_of(done, path.name))}
    if not missing:
        return None
    listed = done.get("outputs") if isinstance(done.get("outputs"), list) else None
    names = [f"{case}_change{extension}" for extension in io.OUTPUT_EXTENSIONS]
    found = [out / name for name in names if (listed is None or name in listed) and (out / name).is_file()]
    if not found:
        raise DeepWMLError(f"the change label map of pair {case!r} is not in {out}; rerun with --overwrite to redo the pair")
    labels_file = found[0]
    chosen = None
    if dicom:  # the series the earlier run read, by its UID; a report of a version before it was recorded: the series
        # --followup-series names now (check_done_pair could not compare it), else the folder's only series
        single = not getattr(args, "manifest", None)
        uid = ((done.get("dicom_series") or {}).get("follow-up") or {}).get("uid")
        named = entry.get("followup_series")
        chosen = io.choose_dicom_series(followup_path, uid or named, "--followup-series" if single and not uid else None)
        if not uid and not named and chosen[1].startswith("the only one of"):  # picked among others: maybe not its
            raise DeepWMLError(f"{case}_change.json of pair {case!r} does not record which DICOM series of "
                               f"{followup_path} its run read (a report of an older version), and the folder holds "
                               f"several series, so the outputs asked for cannot be drawn on the right one; "
                               + ("name it with --followup-series, or rerun with --overwrite to redo the pair"
                                  if single else "rerun with --overwrite to redo the pair"))
    followup = io.read_image(followup_path, series=chosen[0] if chosen else None)
    labels = read_saved_output(labels_file, followup, "change label map", "the follow-up's", "redo the pair")
    labels.CopyInformation(followup)  # on its very geometry (within io's tolerance already)
    values = set(np.unique(sitk.GetArrayViewFromImage(labels)).tolist()) - {0}
    digest = mask_digest(labels)
    recorded = done.get("labels_sha256")
    if (isinstance(recorded, str) and recorded != digest) or not values <= set(LABELS):
        raise DeepWMLError(f"{labels_file.name} was changed since the run that made it (its labels differ from those its "
                           "report records): the outputs asked for would show it with the report's figures, which are "
                           "not its own; rerun with --overwrite to redo the pair (move the edited file elsewhere "
                           "first to keep it): that compares the scans again, it does not keep your edit")
    report = dict(done)
    made = {}
    if "qc" in missing:
        made["qc"] = change_picture(followup, labels, picture_title(case, report))
    if "dicom_outline" in missing:
        from .dicom_outline import check_outline_folder

        check_outline_folder(missing["dicom_outline"], False)
        made["dicom_outline"] = change_outline(followup, labels, chosen[0], report)
        report["dicom_outline"] = made["dicom_outline"].as_dict(missing["dicom_outline"].name)
    if "dicom_seg" in missing:
        made["dicom_seg"] = change_seg(followup, labels, chosen[0], report)
        if made["dicom_seg"] is None:  # no lesion in either scan: no SEG to make (the report says so when asked)
            del missing["dicom_seg"], made["dicom_seg"]
        else:
            report["dicom_seg"] = made["dicom_seg"].as_dict(missing["dicom_seg"].name)
    if not missing:
        return None
    added = sorted(path.name for path in missing.values())
    report["outputs"] = sorted(set(listed or []) | set(added))
    report["outputs_added"] = sorted(set(report.get("outputs_added") or []) | set(added))
    report["labels_sha256"] = digest

    def write(key: str, target: Path) -> None:
        if key == "dicom_outline":
            from .dicom_outline import write_outline_series

            write_outline_series(made[key], target)
        else:
            io.write_bytes(made[key] if key == "qc" else made[key].data, target)

    write_added(out / f"{case}_change.json", report, missing, write)
    return report, f"added {', '.join(added)} from the saved {labels_file.name}; the result is the earlier run's"


def _summary_row(case: str, report: dict) -> dict:
    return {**{k: report.get(k) for k in SUMMARY_COLUMNS}, "case": case,
            "correlation": report.get("registration", {}).get("correlation"),
            "registration_reliable": report.get("registration", {}).get("reliable"),
            "warnings": " | ".join(report.get("warnings", []))}


def _write_summary(rows: list[dict], out: Path) -> None:
    from .segment import summary_seconds

    # a pair this run did not compare (skipped, outputs added): its seconds empty, as in segment's summary.csv
    io.write_csv_text(io.csv_text(SUMMARY_COLUMNS, ({**row, "seconds": summary_seconds(row)} for row in rows)),
                      out / "change_summary.csv")


def _write_transform(transform: sitk.Transform, path: Path) -> None:
    """Write `transform`, read back to check it: ITK's transform writer says a failed write (a full disk) by no
    exception, and a file cut short reads as no movement, or not at all."""
    with io.itk_names(path, write=True) as (name,):
        sitk.WriteTransform(transform, name)
        try:
            back = sitk.ReadTransform(name)
        except RuntimeError:
            back = None
    if back is None or (back.GetParameters(), back.GetFixedParameters()) != (transform.GetParameters(),
                                                                            transform.GetFixedParameters()):
        raise OSError(errno.EIO, io.WRITTEN_SHORT)


def run_case(args, case: str, baseline_path, followup_path, mask_paths: tuple, loaded: dict,
             locked: bool = False) -> dict:
    """One pair, end to end: read, check, segment what has no mask, compare, write every output (the
    report last); returns the report. `loaded` keeps the models between the pairs of a cohort. The pair's lock
    (pair_lock_path) is taken once OUTDIR is made, unless the caller holds it (`locked`)."""
    with contextlib.ExitStack() as held:
        return _run_case(args, case, baseline_path, followup_path, mask_paths, loaded, None if locked else held)


def _run_case(args, case: str, baseline_path, followup_path, mask_paths: tuple, loaded: dict, held) -> dict:
    """run_case's work; `held`: the ExitStack that takes the pair's lock when OUTDIR is made (None: held already)."""
    start = time.perf_counter()
    given = bool(mask_paths[0]), bool(mask_paths[1])
    # A DICOM folder holding a whole study: its one FLAIR-like series (io.choose_dicom_series), named in the report.
    single = not getattr(args, "manifest", None)  # a cohort has no series options: its folders must be plain
    choices = {"baseline": (getattr(args, "baseline_series", None), "--baseline-series" if single else None),
               "follow-up": (getattr(args, "followup_series", None), "--followup-series" if single else None)}
    chosen = {name: io.choose_dicom_series(path, *choices[name]) if Path(path).is_dir() else None
              for name, path in (("baseline", baseline_path), ("follow-up", followup_path))}
    if chosen["baseline"] and chosen["follow-up"] and chosen["baseline"][0].uid == chosen["follow-up"][0].uid:
        raise DeepWMLError(f"the baseline and the follow-up are the same DICOM series ({chosen['baseline'][0].label()}); "
                           "name the earlier visit's FLAIR with --baseline-series and the later one's with --followup-series")
    baseline, followup = (io.read_image(path, series=chosen[name][0] if chosen[name] else None)
                          for name, path in (("baseline", baseline_path), ("follow-up", followup_path)))
    # a DICOM scan with a gap between its slices (Slice Thickness under their spacing) or slices unevenly spaced:
    # said, as `segment` says it
    gaps = [f"{name}: {warning}" for name, image in (("baseline", baseline), ("follow-up", followup)) if chosen[name]
            for warning in chosen[name][0].slice_warnings(image)]
    reversed_visits = visits_reversed(*(chosen[name][0] if chosen[name] else None for name in ("baseline", "follow-up")))
    from .segment import scan_header_warnings

    # what each scan's DICOM header, or the files a converter wrote beside its file, says against its being a FLAIR
    identity = [f"{name}: {warning}" for name, path in (("baseline", baseline_path), ("follow-up", followup_path))
                for warning in scan_header_warnings(Path(path), chosen[name][0] if chosen[name] else None)]
    check_scans(baseline, followup, checked=True)  # read_image checked each as a volume
    out = io.make_output_dir(args.output_dir)
    if held is not None:  # no other DeepWML process works on the pair while this one does
        held.enter_context(_pair_held(out, case))
    extension = io.output_extension(followup_path, args.output_format)
    seg = getattr(args, "dicom_seg", False) and chosen["follow-up"] is not None  # only a DICOM follow-up has a study
    paths = output_paths(out, case, extension, io.output_extension(baseline_path, args.output_format),
                         (not given[0], not given[1]), args.qc, seg)
    inputs = (baseline_path, followup_path, *mask_paths)
    written_over = [p.name for p in paths.values() if p.resolve() in {Path(i).resolve() for i in inputs if i}]
    if written_over:
        raise DeepWMLError(f"{', '.join(written_over)} in {out} would be written over, and is one of the files given; "
                           "choose another OUTDIR")
    from .segment import refuse_stopped

    refuse_stopped(paths["report"], args.overwrite, "pair")  # a run killed part way (its journal lists its files)
    earlier = _earlier_outputs(out, case, inputs)  # in any image format, optional ones included; not a file given
    earlier_outline = outline_path(out, case) if outline_path(out, case).exists() else None
    if (earlier or earlier_outline) and not args.overwrite:
        _refuse_unreplaceable_outline(out, case)  # a user's images there: said so, not that --overwrite would do
        names = [p.name for p in earlier] + ([earlier_outline.name + "/"] if earlier_outline else [])
        raise DeepWMLError(f"outputs exist ({', '.join(names)}); use --overwrite to replace them")
    outline = getattr(args, "dicom_outline", False) and chosen["follow-up"] is not None
    if outline or earlier_outline:
        from .dicom_outline import check_outline_folder

        check_outline_folder(outline_path(out, case), args.overwrite)
    if seg:  # a follow-up the SEG cannot be made for: refused before the scans are segmented and registered
        from .dicom_seg import checked_source

        checked_source(chosen["follow-up"][0])
    if outline:  # and one the outline series cannot join (no Study Instance UID, an unreadable character set)
        from .dicom_outline import source_attributes

        source_attributes(chosen["follow-up"][0], "--dicom-outline")
    mask_baseline, mask_followup, map_baseline, map_followup, source = _masks_for(
        args, baseline, followup, mask_paths, loaded,
        tuple(chosen[name][0] if chosen[name] else None for name in ("baseline", "follow-up")))
    print("registering the baseline to the follow-up (and back, to check it) ...", file=sys.stderr)
    result = lesion_change(baseline, followup, mask_baseline, mask_followup, args.tolerance_mm,
                           args.enlarge_fraction, args.enlarge_min_ml, map_baseline, map_followup,
                           None if args.presence == "off" else float(args.presence), args.min_change_ml,
                           checked=True, progress=lambda message: print(f"  {message}", file=sys.stderr, flush=True))
    # the SEG made before anything is written (a follow-up it cannot be made for is refused with nothing written);
    # a label map without any lesion has no segment to write: no SEG, and a warning says why
    segmented = change_seg(followup, result.labels, chosen["follow-up"][0], {**result.report, "masks": source}) \
        if seg else None
    if seg and segmented is None:
        del paths["dicom_seg"]
    from .segment import input_fingerprint, mask_digest

    # each scan by its content: a rerun into OUTDIR skips the pair as done only for these scans (check_done_pair)
    fingerprints = {f"{key}_fingerprint": input_fingerprint(Path(path), chosen[name][0] if chosen[name] else None)
                    for key, name, path in (("baseline", "baseline", baseline_path),
                                            ("followup", "follow-up", followup_path))}
    report = {"case": case, "baseline": str(baseline_path), "followup": str(followup_path), **fingerprints,
              **result.report,
              "masks": source, "outputs": sorted(p.name for p in paths.values()), "deepwml_version": __version__,
              "seconds": round(time.perf_counter() - start, 3),
              "labels_sha256": mask_digest(result.labels)}  # a rerun adding outputs checks the saved labels with it
    if any(chosen.values()):
        report["dicom_series"] = {name: c[0].as_dict(c[1]) for name, c in chosen.items() if c}
        report["warnings"] = [reversed_visits] * bool(reversed_visits) + [
            f"{name}: read DICOM {c[0].label()}, {c[1]}" for name, c in chosen.items()
            if c and c[1].startswith("the only one of")] + gaps + report["warnings"]
    report["warnings"] = identity + report["warnings"]
    if getattr(args, "dicom_outline", False) and not outline:
        report["warnings"] = report["warnings"] + [NO_DICOM_OUTLINE]
    if getattr(args, "dicom_seg", False) and not seg:
        report["warnings"] = report["warnings"] + [NO_DICOM_SEG]
    elif seg and segmented is None:
        report["warnings"] = report["warnings"] + [
            "no DICOM SEG: neither scan has a lesion, so there is no change to segment (a SEG needs one segment at least)"]
    picture = change_picture(followup, result.labels, picture_title(case, report)) if args.qc else None
    prepared = change_outline(followup, result.labels, chosen["follow-up"][0], report) if outline else None
    from .segment import whole_or_none, write_qc_and_dicom

    # each scan's image outputs stored as segment stores them: X, Y, Z, 1 for a scan stored so, and, from a NIfTI
    # scan, with its own qform and sform (where they disagree, FSL and nibabel place the outputs on it as Slicer does)
    stored = {name: (io.read_time_axis(path), io.read_nifti_geometry(path))
              for name, path in (("baseline", baseline_path), ("follow-up", followup_path))}
    # the pair's outputs, its outline series' folder among them where one is written
    targets = {**paths, "dicom_outline": outline_path(out, case)} if outline else paths
    # stopped part way (Ctrl-C, a full disk): the pair's outputs go, so that the same command redoes it
    with whole_or_none(targets):
        # the journal listing what this run writes and removes (killed outright, its files are listed: refused, then
        # removed by --overwrite); with --overwrite nothing of an earlier run stays beside this one's, even if writing
        # fails part way: segment's rule, by its code (only what the earlier report or a stopped run's journal lists;
        # never a file given, nor a link's target)
        from .segment import finish_report, start_outputs

        start_outputs(out, case, targets, args.overwrite, frozenset(Path(i).resolve() for i in inputs if i),
                      _possible_outputs(out, case))
        # its header says what it is: read as a mask, the follow-up's lesions (io.change_map_lesions)
        io.write_image(result.labels, paths["labels"], *stored["follow-up"], notes=io.CHANGE_MAP_NOTES)
        io.write_label_segmentation(result.labels, paths["segmentation"],
                                    [(value, name, COLOURS[value]) for value, name in LABELS.items()])
        io.write_image(result.baseline_registered, paths["registered"], *stored["follow-up"])
        io.write_atomically(paths["transform"], lambda tmp: _write_transform(result.registration.transform, tmp))
        io.write_csv_text(lesions_csv(report["lesions"]), paths["lesions"])
        if not given[0]:
            io.write_image(mask_baseline, paths["baseline_mask"], *stored["baseline"])
        if not given[1]:
            io.write_image(mask_followup, paths["followup_mask"], *stored["follow-up"])
        write_qc_and_dicom(report, targets, True, picture, prepared, segmented)
        finish_report(paths["report"], json.dumps(report, indent=1))  # the journal's end
    return report
