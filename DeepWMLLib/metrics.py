"""Segmentation metrics: overlap, distance, lesion-wise, volume and per-slice lesion-volume groups.

Three families of metrics, each as its paper defines it:

* DeepWML (Zhang et al., Neuroradiology 2021): Dice, sensitivity and precision per case and per 2D
  image. A 2D image is an axial slice of `io.to_axial_stack`: slice k is voxel index k along
  `io.axial_axis`. Its lesion volume LV = reference lesion area x slice thickness, and its LV group
  is G1 < 0.2 ml <= G2 < 0.7 ml <= G3 < 2 ml <= G4 < 5 ml <= G5 (`lv_group`). The slice thickness is
  the voxel spacing along that axis (a gap between acquired slices counts towards it), so on 1 mm
  volumes the images' LV are small and G3-G5 rare: compare groups across the paper's 3-8 mm slices.
* MICCAI 2017 WMH segmentation challenge (Kuijf et al.), per case: Dice; HD95 in mm (boundary =
  mask minus its 2D erosion with a 3x3 square in the axial planes above, the image border counting
  as foreground as in SimpleITK's BinaryErode; the challenge code erodes in the planes of the
  stored voxel index instead, the same for axially stored volumes, so here HD95 does not change
  when a file stores its axes in another order; boundary voxels placed at their physical LPS
  positions using origin, spacing and direction; the larger of the two directed 95th percentiles of nearest-boundary
  distances; a mask filling whole slices, which has no such boundary, uses all its voxels);
  AVD = |V_pred - V_ref| / V_ref in %; lesion recall and lesion F1 on 3D 26-connected
  components, a lesion counting as detected when any of its voxels overlaps.
* CSVD-WMH (Tiantan): lesion-wise precision, recall and Dice, where a reference lesion (26-connected
  component) is found when at least 40 % of its voxels are marked by the prediction, and the same
  rule from the other side: a predicted lesion is correct when at least 40 % of its voxels lie in
  the reference. So an outline far too generous (a 108-voxel blob around a 4-voxel lesion) finds its
  lesion but is itself a false detection, and one blob over a whole hemisphere cannot score as
  precise. Lesion-wise Dice = (found reference lesions + correct predicted lesions) / (reference
  lesions + predicted lesions), which is 2TP / (2TP + FP + FN) when lesions match one to one (it
  counts each side's lesions, so it is not the F1 of lesion-wise precision and recall when they do
  not). Broken down by lesion size: small
  < 20, medium 20..150 (inclusive), large > 150 voxels by default; bounds are configurable, in
  voxels or mm3. ROC AUC of a probability map against the reference (ties count one half).

Label conventions. Reference: 0 background, 1 lesion, 2 "ignore" (the challenge's other
pathology): voxels labelled 2 are removed from prediction and reference alike before any count,
component, distance, volume or AUC, so a prediction there is neither right nor wrong. Any other
reference value is an error, except in a two-valued mask (0 and one positive whole number other than
2, e.g. 0/255 as many tools export; `io.read_mask` reads files of 0-255, and a two-valued one above
255 such as 0/65535 as 0/1), whose non-zero value is read as lesion. A reference of 0 and 2 alone is refused: nothing in it
would be lesion, and it is more likely a mask whose lesion value is 2. Prediction (and both raters in
`binary_pair`): a voxel is lesion when its value is >= 0.5, i.e. any positive label of an integer mask
(files are read with `io.read_mask`, which refuses non-integer values: threshold a probability map
first). Probability maps are scores; only their order matters for AUC.

Empty masks. Undefined values are NaN (JSON null), never silently 0 or 1, and `case_metrics`'s `notes`
say in words which ones and why (what `deepwml evaluate` prints under the figures):

    metric                 ref & pred empty   only ref empty   only pred empty
    Dice                   1                  0                0
    sensitivity            NaN                NaN              0
    precision              NaN                0                NaN
    HD95                   0                  NaN              NaN
    AVD                    0                  NaN              100
    lesion recall (MICCAI) 1                  1                0          (challenge convention)
    lesion F1 (MICCAI)     1                  0                0          (challenge convention)
    lesion-wise recall     NaN                NaN              0
    lesion-wise precision  NaN                0                NaN
    lesion-wise Dice       1                  0                0
    ROC AUC                NaN (needs lesion and non-lesion voxels)

Grids. Masks (and the probability map) must share one voxel grid within the tolerance of
`io.check_same_grid`, else DeepWMLError; nothing is resampled behind the user's back (a mask that
stores the reference's grid in another voxel order, LPS against RAS say, is only reordered onto it,
`io.align_voxel_order`; slice indices are then the reference's; one with the other's sizes in another order, an
array's axes swapped, is refused, `io.refuse_swapped_axes`); a mask on the other's very voxels
over a smaller extent (saved cropped to its lesions) is padded with zeros onto the other's grid, which
is exact (`io.onto_common_grid`); two masks each saved cropped to their lesions are both padded onto the
case's FLAIR's grid when it is given, else onto the extent of both, and a note then says that slice numbers
count from its first slice (`MaskPair.from_images`); masks on two different extents are likewise put on the
FLAIR's grid when it is given (one over a larger extent than the scan: slice numbers the scan's), and so are two
masks cropped to one box their lesions fill, else compared on the box with a note likewise (`io.extent_note`). Distances and volumes are in physical units from the reference's
spacing and direction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np

from . import io
from .errors import DeepWMLError
from .postprocessing import label_components
from .volume import Volume, voxels

if TYPE_CHECKING:
    import SimpleITK as sitk

# Upper bounds (exclusive) of the DeepWML paper's per-image lesion-volume groups G1..G4 in ml;
# G5 is everything from the last bound up.
LV_GROUP_BOUNDS_ML = (0.2, 0.7, 2.0, 5.0)
LV_GROUPS = tuple(f"G{i + 1}" for i in range(len(LV_GROUP_BOUNDS_ML) + 1))

IGNORE_LABEL = 2
FOUND_FRACTION = 0.4  # CSVD paper: a lesion counts as found when >= 40 % of its voxels are marked
SIZE_BOUNDS_VOXELS = (20, 150)  # CSVD paper: small < 20 <= medium <= 150 < large
SIZE_CLASSES = ("small", "medium", "large")
SIZE_UNITS = ("voxels", "mm3")


def _ndimage():
    """scipy.ndimage, imported on first use: `deepwml segment` needs only `lv_group` from here,
    and importing scipy.ndimage costs about half a second."""
    from scipy import ndimage

    return ndimage


def image_lv_ml(area_mm2: float, thickness_mm: float) -> float:
    """A 2D image's lesion volume in ml (area x slice thickness; DeepWML paper), rounded so that floating-point
    noise cannot move an image across an LV group bound (0.8 x 0.7 mm pixels: 0.6999999999999998)."""
    return round(float(area_mm2) * float(thickness_mm) / 1000.0, 9)


def lv_group(lv_ml: float) -> str:
    """Return "G1".."G5" for a 2D image's lesion volume (area x slice thickness) in ml.

    Intervals are closed below and open above: 0.2 ml is G2, 5 ml is G5.
    """
    if not math.isfinite(lv_ml) or lv_ml < 0:
        raise DeepWMLError(f"lesion volume must be a finite number >= 0 ml, got {lv_ml!r}")
    for i, bound in enumerate(LV_GROUP_BOUNDS_ML):
        if lv_ml < bound:
            return LV_GROUPS[i]
    return LV_GROUPS[-1]


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator) / float(denominator) if denominator else math.nan


def dice_of_counts(tp: float, n_pred: float, n_ref: float) -> float:
    """Dice from voxel counts: both marked, marked in the prediction, in the reference (two empty masks: 1)."""
    return 1.0 if n_pred + n_ref == 0 else 2.0 * tp / (n_pred + n_ref)


def _check_volume(image: sitk.Image, what: str) -> None:
    import SimpleITK as sitk

    if not isinstance(image, (sitk.Image, Volume)):
        raise DeepWMLError(f"{what} must be an image (SimpleITK or DeepWML Volume), got {type(image).__name__}; "
                           "read it with io.read_mask")
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise DeepWMLError(
            f"{what} must be a 3D single-channel image, got {image.GetDimension()}D with "
            f"{image.GetNumberOfComponentsPerPixel()} component(s)"
        )


def _binary(image: sitk.Image) -> np.ndarray:
    return voxels(image) >= 0.5


def reference_labels(reference: sitk.Image, what: str = "reference") -> tuple[np.ndarray, np.ndarray]:
    """(lesion, ignore) boolean arrays; `what` names the reference in an error.

    Labels 0, 1 and 2 as the module docstring says; a binary mask that marks lesion with another single
    value (0/255, as many tools export) is read as 0/1. Any other mix of values is refused."""
    array = voxels(reference)
    lesion_value = 1
    positive = array[array != 0]
    if positive.size and not np.any(positive == 1) and not np.any(positive == IGNORE_LABEL):
        first = positive.flat[0]
        if np.all(positive == first) and first > 0 and first == round(float(first)):
            lesion_value = first  # a two-valued mask: its non-zero value is lesion
    lesion = array == lesion_value
    ignore = array == IGNORE_LABEL
    if ignore.any() and not lesion.any():
        raise DeepWMLError(
            f"{what} holds only 0 and 2 ({int(ignore.sum())} voxels of 2): 2 means 'ignore' (MICCAI's other "
            "pathology, judged neither way), so it would hold no lesion at all and the prediction be judged "
            "nowhere; if 2 marks lesion in this file, relabel it 1"
        )
    bad = ~(lesion | ignore | (array == 0))
    if bad.any():
        found = np.unique(array[bad])
        shown = ", ".join(f"{v:g}" for v in found[:5]) + (", ..." if len(found) > 5 else "")
        raise DeepWMLError(
            f"{what} has value{'s' if len(found) > 1 else ''} {shown} in {int(bad.sum())} voxels; a reference mask may only hold "
            "0 (background), 1 (lesion) and 2 (ignore), or be two-valued (0 and one lesion value such as 255) "
            "— relabel it first"
        )
    return lesion, ignore


@dataclass(frozen=True)
class SizeClasses:
    """Lesion size classes: small < lo <= medium <= hi < large, in voxels or mm3."""

    bounds: tuple[float, float] = SIZE_BOUNDS_VOXELS
    unit: str = "voxels"

    def __post_init__(self):
        if self.unit not in SIZE_UNITS:
            raise DeepWMLError(f"lesion size unit must be one of {', '.join(SIZE_UNITS)}, got {self.unit!r}")
        lo, hi = self.bounds
        if not (0 < lo <= hi and math.isfinite(hi)):
            raise DeepWMLError(f"lesion size bounds must satisfy 0 < small/medium <= medium/large, got {self.bounds}")

    def classify(self, sizes: np.ndarray) -> np.ndarray:
        """Index into SIZE_CLASSES of each size (same unit as `unit`)."""
        lo, hi = self.bounds
        return np.where(sizes < lo, 0, np.where(sizes <= hi, 1, 2))

    def describe(self) -> dict:
        lo, hi = self.bounds
        unit = self.unit
        return {"small": f"< {lo:g} {unit}", "medium": f"{lo:g}-{hi:g} {unit}", "large": f"> {hi:g} {unit}"}


FLAIR_GRID = "the FLAIR's grid"


def _one_grid(a: sitk.Image, b: sitk.Image, names: tuple[str, str], scan=None,
              ignore_in_b: bool = False) -> tuple[sitk.Image, sitk.Image, str | None, list[tuple[int, int, str]]]:
    """(a, b) on one grid (`io.onto_common_grid`), and the note when that grid is the extent of both masks (both
    saved cropped, `io.on_joint_extent`) or one box both were saved cropped to, where slice numbers are not the
    scan's (`io.extent_note`; None otherwise). With `scan`, the case's FLAIR (an image, or its
    file, read only then), masks on two different extents, or on one grid their lesions fill (both cropped to one
    box), are put on the FLAIR's grid instead when both can go there and it is not already theirs (in another voxel
    order, the masks' is kept, as the picture keeps it): the
    extent of both, or the grid of a mask over a larger extent than the scan's, the other padded onto it, whose
    slice numbers were not the scan's either (the picture's, on the FLAIR's grid, were). When they cannot go there,
    they stay where they were put (for the extent of both the notes say so; the FLAIR's picture says why). Last,
    what of each mask lies outside the scan, compared over the larger extent (`_outside_scan`; `ignore_in_b`: b's
    voxels labelled 2 left out, as a reference's ignored region is)."""
    import SimpleITK as sitk

    common = io.onto_common_grid(a, b, *names)
    note = io.extent_note(common, a, b)
    # masks on two extents, or on one grid whose lesions reach every side of it (both cropped to one box, two
    # segments of one segmentation saved cropped: `note` is then io.ONE_BOX_NOTE), not the scan's grid either
    if scan is not None and (note is not None or not io.reorders_onto(a, b)):
        image = None
        try:
            image = scan if isinstance(scan, (sitk.Image, Volume)) else io.read_any(scan, light=True)
            if io.reorders_onto(image, common[1]):
                return (*common, None, [])  # the scan's grid already: its slice numbers
            return (io.onto_grid(a, image, names[0], "the FLAIR"), io.onto_grid(b, image, names[1], "the FLAIR"),
                    None, [])
        except DeepWMLError:
            if image is not None:  # a mask reaches beyond the FLAIR: how much, of each
                return (*common, note, _outside_scan((a, b), common[1], [(image, FLAIR_GRID)] * 2,
                                                         ignore_in_b))
    # no FLAIR: the scan is the grid of a mask padded onto the other's larger extent, unless cropped to its lesions
    scans = [(mask, None) if io.reorders_onto(mask, common[1])
             or io._fills_its_extent(io.voxels(mask)) else (mask, f"{name}'s grid (the scan it was drawn on)")
             for mask, name in zip((a, b), names)]
    return (*common, note, _outside_scan((a, b), common[1], scans[::-1], ignore_in_b))


def _outside_scan(masks, common: sitk.Image, scans, ignore_in_b: bool = False) -> list[tuple[int, int, str]]:
    """(which mask, how many of its non-zero voxels, the grid named) for each mask with voxels beyond the grid of
    the scan it is held against (`scans`, one (image, its name) per mask; None for no scan): compared over the
    larger extent of `common`, they are voxels the other mask cannot have marked (of the second mask, those labelled
    2 left out with `ignore_in_b`)."""
    import SimpleITK as sitk

    outside = []
    for index, (mask, (scan, grid_name)) in enumerate(zip(masks, scans)):
        if grid_name is None:
            continue  # no scan to hold it against (every non-zero voxel of both lies on `common`)
        placement = io._lattice_placement(mask, scan)
        if placement is not None and index == 1 and ignore_in_b:
            stored = placement[0]
            placement = (sitk.Mask(stored, sitk.NotEqual(stored, IGNORE_LABEL)), placement[1])
        count = io._nonzero_outside(*placement, scan) if placement is not None else None
        if count:
            outside.append((index, count, grid_name))
    return outside


def _renumbered(masks, names, grid: sitk.Image) -> list[tuple[str, int, int, int]]:
    """(name, the grid's last slice number, own slice of the grid's first slice, of its last) for each mask whose own axial slice numbers are not the
    slice numbers of `grid`, the grid the pair was compared on: one stored in another voxel order (RAS against LPS,
    slices from the top down, sagittal-first) and reordered onto it (`io.align_voxel_order`, by `_one_grid`; told here
    from the geometry alone, `io.reorders_onto`, not reordered a second time). Masks padded or cropped onto another
    extent are said by the other notes; only the same extent is judged here."""
    axis = io.axial_axis(grid)
    last = grid.GetSize()[axis] - 1
    found = []
    for mask, name in zip(masks, names):
        if mask.GetSize() == grid.GetSize() and io.grid_difference(mask, grid) is None:
            continue  # stored as compared: its own numbers
        if not io.reorders_onto(mask, grid):
            continue  # not the same extent (padded, cropped, or the FLAIR's grid): other notes say so
        own_axis = io.axial_axis(mask)
        ends = []
        for k in (0, last):
            index = [0, 0, 0]
            index[axis] = k
            point = grid.TransformIndexToPhysicalPoint(index)
            ends.append(int(round(mask.TransformPhysicalPointToContinuousIndex(point)[own_axis])))
        if ends != [0, last]:
            found.append((name, last, *ends))
    return found


class MaskPair:
    """Two binary masks on one grid, prepared once so that every metric reuses the same arrays.

    `prediction` and `reference` are boolean numpy arrays in SimpleITK's (k, j, i) order with
    ignored voxels already removed; `geometry` is an image carrying the shared grid.
    """

    def __init__(self, prediction: np.ndarray, reference: np.ndarray, geometry: sitk.Image):
        self.prediction = prediction
        self.reference = reference
        self.spacing = np.array(geometry.GetSpacing(), dtype=float)
        self.origin = np.array(geometry.GetOrigin(), dtype=float)
        self.direction = np.array(geometry.GetDirection(), dtype=float).reshape(3, 3)
        self.axial_axis = io.axial_axis(geometry)
        self.voxel_volume_mm3 = float(np.prod(self.spacing))
        self.ignored_voxels = 0  # reference voxels labelled 2, left out of both masks (`from_images`)
        self.predicted_ignored = 0  # of them, those the prediction marked
        self.extent_note = None  # both saved cropped: on the extent of both or their one box, not the scan's (`io.extent_note`)
        self.outside_scan = []  # (which mask, voxels, the scan's grid named): compared beyond the scan (`_one_grid`)
        self.raters = False  # two raters' masks (`binary_pair`): voxels outside the scan are disagreement, not missed
        self.renumbered = []  # (a mask's name, the grid's last slice, its own numbers of the grid's first and last): slices
        # stored in another order than the grid compared on (`_renumbered`), so their numbers are not the mask's own

    @classmethod
    def from_images(cls, prediction: sitk.Image, reference: sitk.Image,
                    names: tuple[str, str] = ("prediction", "reference"), scan=None) -> "MaskPair":
        """A prediction against a reference with labels 0/1/2 (2 = ignore, removed from both); `names`
        name them in an error (e.g. with their files); `scan`: the case's FLAIR (`_one_grid`), or None."""
        _check_volume(prediction, names[0])
        _check_volume(reference, names[1])
        originals = (prediction, reference)
        prediction, reference, extent_note, outside = _one_grid(prediction, reference, names, scan, ignore_in_b=True)
        lesion, ignore = reference_labels(reference, names[1])
        predicted = _binary(prediction)
        predicted_ignored = int(np.count_nonzero(predicted & ignore))
        if predicted_ignored:
            predicted &= ~ignore
        pair = cls(predicted, lesion, reference)
        pair.ignored_voxels = int(np.count_nonzero(ignore))
        pair.predicted_ignored = predicted_ignored
        pair.extent_note = extent_note
        pair.outside_scan = [(index, count, grid if grid == FLAIR_GRID else "the prediction's grid (the scan it was made on)")
                             for index, count, grid in outside if index == 1]  # a prediction is made on the scan
        pair.renumbered = _renumbered(originals, names, reference)
        return pair

    @classmethod
    def binary_pair(cls, a: sitk.Image, b: sitk.Image, what_a: str, what_b: str, scan=None) -> "MaskPair":
        """Two masks treated alike (any positive label is lesion), e.g. two raters; `scan`: see `from_images`."""
        _check_volume(a, what_a)
        _check_volume(b, what_b)
        originals = (a, b)
        a, b, extent_note, outside = _one_grid(a, b, (what_a, what_b), scan)
        pair = cls(_binary(a), _binary(b), b)
        pair.extent_note = extent_note
        pair.outside_scan = outside
        pair.renumbered = _renumbered(originals, (what_a, what_b), b)
        pair.raters, pair.names = True, (what_a, what_b)
        return pair

    # -- voxel overlap -----------------------------------------------------------------------

    @cached_property
    def counts(self) -> tuple[int, int, int]:
        """(true positives, predicted voxels, reference voxels)."""
        tp = int(np.count_nonzero(self.prediction & self.reference))
        return tp, int(np.count_nonzero(self.prediction)), int(np.count_nonzero(self.reference))

    def overlap(self) -> dict:
        tp, n_pred, n_ref = self.counts
        return {
            "dice": dice_of_counts(tp, n_pred, n_ref),
            "sensitivity": _ratio(tp, n_ref),
            "precision": _ratio(tp, n_pred),
        }

    def volumes_ml(self) -> dict:
        _, n_pred, n_ref = self.counts
        return {
            "prediction_volume_ml": n_pred * self.voxel_volume_mm3 / 1000.0,
            "reference_volume_ml": n_ref * self.voxel_volume_mm3 / 1000.0,
        }

    def notes(self) -> list[str]:
        """Plain-language notes on what the figures mean for this pair: why a metric is undefined (an empty
        mask) or fixed by convention (both empty), and how many voxels the ignore label left out."""
        _, n_pred, n_ref = self.counts
        notes = []
        if n_pred == 0 and n_ref == 0:
            notes.append("prediction and reference are both empty: Dice 1, HD95 0 mm, AVD 0 %, lesion recall and F1 1 "
                         "by convention; sensitivity, precision and lesion-wise recall and precision are undefined")
        elif n_ref == 0:
            notes.append("the reference is empty (no lesion): sensitivity, HD95, AVD and lesion-wise recall are "
                         "undefined; Dice, precision and lesion F1 are 0, as every marked voxel is false (lesion "
                         "recall 1: the challenge's convention)")
        elif n_pred == 0:
            # not empty when it marked voxels the reference says to ignore (a reference with label 2 has lesion)
            counted = (f"all {self.predicted_ignored} voxels of the prediction lie in the reference's ignored region "
                       "(label 2), so none is counted" if self.predicted_ignored else "the prediction is empty")
            notes.append(f"{counted}: precision, HD95 and lesion-wise precision are undefined; Dice, sensitivity and "
                         "lesion recall are 0, AVD 100 %")
        if self.ignored_voxels:
            notes.append(f"{self.ignored_voxels} reference voxels labelled 2 (ignore) were left out of both masks")
        return notes + self.grid_notes()

    def grid_notes(self) -> list[str]:
        """What the grid the masks were compared on means for slice numbers (`io.extent_note`), and how much
        of a mask lies outside the scan (over a larger extent), counted as missed or as disagreement."""
        notes = [self.extent_note] if self.extent_note else []
        for name, grid_last, first, last in self.renumbered:  # a mask in another voxel order: whose slice numbers are shown
            notes.append(f"{name} stores its slices in another order than the grid compared on (it was reordered "
                         f"onto it, exactly, nothing interpolated): the slice numbers shown are that grid's, and "
                         f"slices 0 to {grid_last} shown are {name}'s own slices "
                         f"{first} to {last}")
        for index, count, grid in self.outside_scan:
            ml = f"{count * self.voxel_volume_mm3 / 1000.0:.2f} ml ({count} voxels)"
            if self.raters:
                notes.append(f"{ml} of {self.names[index]} lie outside {grid}: they were "
                             "compared over the larger extent, where they count as disagreement (lowering Dice)")
            else:
                notes.append(f"{ml} of the reference lie outside {grid}: they were "
                             "compared over the reference's larger extent, where they count as missed (lowering "
                             "Dice and sensitivity)")
        return notes

    def avd_percent(self) -> float:
        _, n_pred, n_ref = self.counts
        if n_ref == 0:
            return 0.0 if n_pred == 0 else math.nan
        return abs(n_pred - n_ref) / n_ref * 100.0

    # -- per 2D image -------------------------------------------------------------------------

    @property
    def slice_thickness_mm(self) -> float:
        return float(self.spacing[self.axial_axis])

    @property
    def pixel_area_mm2(self) -> float:
        return float(np.prod(np.delete(self.spacing, self.axial_axis)))

    def slice_counts(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per axial slice k: (true positives, predicted pixels, reference pixels)."""
        in_plane = tuple(ax for ax in range(3) if ax != 2 - self.axial_axis)
        tp = np.count_nonzero(self.prediction & self.reference, axis=in_plane)
        return tp, np.count_nonzero(self.prediction, axis=in_plane), np.count_nonzero(self.reference, axis=in_plane)

    def slices(self) -> list[dict]:
        """DeepWML per-image metrics for every axial slice whose reference has lesion."""
        tp, n_pred, n_ref = self.slice_counts()
        area = self.pixel_area_mm2
        rows = []
        for k in np.flatnonzero(n_ref):
            lv_ml = image_lv_ml(n_ref[k] * area, self.slice_thickness_mm)
            rows.append({
                "index": int(k),
                "dice": dice_of_counts(tp[k], n_pred[k], n_ref[k]),
                "sensitivity": _ratio(tp[k], n_ref[k]),
                "precision": _ratio(tp[k], n_pred[k]),
                "reference_area_mm2": round(float(n_ref[k] * area), 4),  # as the segment report writes areas
                "prediction_area_mm2": round(float(n_pred[k] * area), 4),
                "lv_ml": float(lv_ml),
                "lv_group": lv_group(lv_ml),
            })
        return rows

    # -- distances ----------------------------------------------------------------------------

    def physical_points(self, indices: np.ndarray) -> np.ndarray:
        """LPS mm of numpy (k, j, i) indices: TransformIndexToPhysicalPoint, vectorised."""
        ijk = indices[:, ::-1].astype(float)
        return self.origin + (ijk * self.spacing) @ self.direction.T

    def _boundary_indices(self, mask: np.ndarray) -> np.ndarray:
        """Indices of mask voxels removed by a 3x3 in-plane erosion (image border = foreground)."""
        found = np.argwhere(mask)
        lo = np.maximum(found.min(axis=0) - 1, 0)
        hi = np.minimum(found.max(axis=0) + 2, mask.shape)
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        structure = np.zeros((3, 3, 3), dtype=bool)
        plane = [slice(None)] * 3
        plane[2 - self.axial_axis] = 1
        structure[tuple(plane)] = True
        crop = mask[box]
        eroded = _ndimage().binary_erosion(crop, structure=structure, border_value=1)
        boundary = np.argwhere(crop & ~eroded) + lo
        # A mask filling whole slices has no in-plane boundary: then every voxel stands for it.
        return boundary if len(boundary) else found

    def hd95_mm(self) -> float:
        _, n_pred, n_ref = self.counts
        if n_pred == 0 or n_ref == 0:
            return 0.0 if n_pred == n_ref else math.nan
        from scipy.spatial import cKDTree

        pred_points = self.physical_points(self._boundary_indices(self.prediction))
        ref_points = self.physical_points(self._boundary_indices(self.reference))
        pred_to_ref = cKDTree(ref_points).query(pred_points, k=1)[0]
        ref_to_pred = cKDTree(pred_points).query(ref_points, k=1)[0]
        return float(max(np.percentile(pred_to_ref, 95), np.percentile(ref_to_pred, 95)))

    # -- lesions ------------------------------------------------------------------------------

    # 26-connected, as the challenge's components: scipy's labels with a full 3x3x3 structure, but a byte a voxel
    # under 256 lesions (scipy's int32 labels of both masks were the peak of the Slicer module's Dice readout: 400 MiB
    # at 512 x 512 x 200 voxels)
    @cached_property
    def reference_components(self) -> tuple[np.ndarray, int]:
        return label_components(self.reference, compact=True)

    @cached_property
    def prediction_components(self) -> tuple[np.ndarray, int]:
        return label_components(self.prediction, compact=True)

    @staticmethod
    def _sizes_and_overlap(labels: np.ndarray, n: int, other: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Voxels of each component 1..n, and how many of them `other` marks."""
        inside = labels > 0
        sizes = np.bincount(labels[inside], minlength=n + 1)[1:]
        covered = np.bincount(labels[inside & other], minlength=n + 1)[1:]
        return sizes, covered

    @cached_property
    def reference_lesions(self) -> tuple[np.ndarray, np.ndarray]:
        labels, n = self.reference_components
        return self._sizes_and_overlap(labels, n, self.prediction)

    @cached_property
    def predicted_lesions(self) -> tuple[np.ndarray, np.ndarray]:
        labels, n = self.prediction_components
        return self._sizes_and_overlap(labels, n, self.reference)

    def lesion_detection(self) -> dict:
        """MICCAI challenge lesion recall and F1 (any overlap detects; its empty-mask conventions)."""
        ref_sizes, ref_covered = self.reference_lesions
        pred_sizes, pred_covered = self.predicted_lesions
        recall = float(np.count_nonzero(ref_covered)) / ref_sizes.size if ref_sizes.size else 1.0
        precision = float(np.count_nonzero(pred_covered)) / pred_sizes.size if pred_sizes.size else 1.0
        f1 = 0.0 if precision + recall == 0 else 2.0 * precision * recall / (precision + recall)
        return {
            "lesion_recall": recall,
            "lesion_f1": f1,
            "n_reference_lesions": int(ref_sizes.size),
            "n_predicted_lesions": int(pred_sizes.size),
        }

    def lesionwise(self, found_fraction: float = FOUND_FRACTION, size_classes: SizeClasses | None = None) -> dict:
        """CSVD-paper lesion-wise precision, recall and Dice, overall and per lesion size class."""
        if not 0 < found_fraction <= 1:
            raise DeepWMLError(f"found fraction must be in (0, 1], got {found_fraction}")
        size_classes = size_classes or SizeClasses()
        scale = 1.0 if size_classes.unit == "voxels" else self.voxel_volume_mm3
        ref_sizes, ref_covered = self.reference_lesions
        pred_sizes, pred_covered = self.predicted_lesions
        # covered / size, not covered >= fraction x size: the division is exact at the bound (55 of 100 voxels is
        # 0.55), where 0.55 x 100 is 55.00000000000001 and a lesion marked at exactly the fraction went unfound
        ref_found = ref_covered / np.maximum(ref_sizes, 1) >= found_fraction
        pred_correct = pred_covered / np.maximum(pred_sizes, 1) >= found_fraction
        # sizes in mm3 rounded as `image_lv_ml` rounds, so that floating-point noise cannot move a lesion across a
        # bound (625 voxels of 0.4 x 0.4 x 1.5 mm: 150.00000000000003 mm3, large instead of medium)
        ref_class = size_classes.classify(np.round(ref_sizes * scale, 9))
        pred_class = size_classes.classify(np.round(pred_sizes * scale, 9))

        def summary(ref_in: np.ndarray, pred_in: np.ndarray) -> dict:
            n_ref, n_pred = int(ref_in.sum()), int(pred_in.sum())
            n_found, n_correct = int((ref_found & ref_in).sum()), int((pred_correct & pred_in).sum())
            return {
                "n_reference": n_ref,
                "n_found": n_found,
                "n_predicted": n_pred,
                "n_correct": n_correct,
                "recall": _ratio(n_found, n_ref),
                "precision": _ratio(n_correct, n_pred),
                "dice": 1.0 if n_ref + n_pred == 0 else (n_found + n_correct) / (n_ref + n_pred),
            }

        result = summary(np.ones(ref_sizes.size, bool), np.ones(pred_sizes.size, bool))
        result["found_fraction"] = found_fraction
        result["size_unit"] = size_classes.unit
        result["size_bounds"] = list(size_classes.bounds)
        result["by_size"] = {
            name: {"range": size_classes.describe()[name], **summary(ref_class == i, pred_class == i)}
            for i, name in enumerate(SIZE_CLASSES)
        }
        return result

    def lesion_table(self, which: str) -> list[dict]:
        """Lesions of one mask ("prediction" or "reference") that no voxel of the other touches."""
        labels, n = self.prediction_components if which == "prediction" else self.reference_components
        sizes, covered = self.predicted_lesions if which == "prediction" else self.reference_lesions
        lonely = np.flatnonzero(covered == 0) + 1
        if lonely.size == 0:
            return []
        voxels = np.nonzero(labels)
        owner = labels[voxels]
        centres = np.stack([np.bincount(owner, weights=axis, minlength=n + 1)[lonely] for axis in voxels], axis=1)
        centres /= sizes[lonely - 1][:, None]
        extents = _ndimage().find_objects(labels)
        axis = 2 - self.axial_axis
        rows = []
        for label, centre in zip(lonely, self.physical_points(centres)):
            extent = extents[label - 1][axis]
            rows.append({
                "voxels": int(sizes[label - 1]),
                "volume_mm3": float(sizes[label - 1] * self.voxel_volume_mm3),
                "centroid_lps_mm": [round(float(c), 2) for c in centre],
                "slices": [int(extent.start), int(extent.stop - 1)],
            })
        return sorted(rows, key=lambda row: -row["voxels"])


def _on_the_scores_grid(probabilities: sitk.Image, reference: sitk.Image) -> tuple[sitk.Image, sitk.Image]:
    """The probability map and the reference on one grid, nothing interpolated: the map's (the scan's) when the
    reference lies within it (saved cropped to its lesions: padded with zeros), else the reference's
    (`io.onto_grid`). Not `io.onto_common_grid`, which is for two masks: a map whose scores are non-zero on every
    face of the scan looks to it like a mask cropped to its lesions, and the two were compared on their joint extent,
    a ring of voxels of score 0 counted as background beyond the scan (ROC AUC 0.866 read as 0.890)."""
    probabilities = io.align_voxel_order(probabilities, reference)
    if io.grid_difference(probabilities, reference) is None:
        return probabilities, reference
    placement = io._lattice_placement(reference, probabilities)
    if placement is not None and io._holds(probabilities, *placement):
        return probabilities, io.onto_grid(reference, probabilities, "reference", "probability map")
    return io.onto_grid(probabilities, reference, "probability map", "reference"), reference


def check_probability_map(probabilities: sitk.Image, what: str = "the file given as probability map") -> sitk.Image:
    """Refuse a map given as a case's probabilities (`what` names it) that is no image or holds values outside 0 to 1.
    roc_auc ranks any scores, so a FLAIR given by mistake gave a plausible AUC (0.98 on a labelled case). 0.1 of
    slack: a map resampled with a higher-order interpolator overshoots 0 and 1 a little."""
    import SimpleITK as sitk

    if not isinstance(probabilities, (sitk.Image, Volume)):
        raise DeepWMLError(f"{what} is a {type(probabilities).__name__}, not an image: pass a SimpleITK image on its "
                           "scan's grid")
    values = voxels(probabilities)
    finite = values[np.isfinite(values)] if values.dtype.kind == "f" else values
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    if low < -0.1 or high > 1.1:
        raise DeepWMLError(f"{what} holds values from {low:g} to {high:g}: it is not a "
                           "probability map (0 to 1), perhaps the FLAIR; give the map of the model's probabilities "
                           "(deepwml segment --save-probabilities writes CASE_prob), one stored 0-255 or in percent "
                           "rescaled to 0-1")
    return probabilities


def roc_auc(probabilities: sitk.Image, reference: sitk.Image) -> float:
    """Area under the ROC curve of voxel scores against the reference (ignored voxels left out)."""
    _check_volume(probabilities, "probability map")
    _check_volume(reference, "reference")
    probabilities, reference = _on_the_scores_grid(probabilities, reference)
    lesion, ignore = reference_labels(reference)
    scores = voxels(probabilities)
    if ignore.any():
        keep = ~ignore
        scores, lesion = scores[keep], lesion[keep]
    scores, lesion = scores.ravel(), lesion.ravel()
    if not np.isfinite(scores).all():
        raise DeepWMLError("probability map has NaN or infinite voxels; re-export it from the model")
    n_pos = int(np.count_nonzero(lesion))
    n_neg = lesion.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    # Mann-Whitney form: P(score of a lesion voxel > score of a background voxel), ties count 1/2.
    # Sorting the background scores once and bisecting the few lesion scores is far faster than
    # ranking every voxel of a brain volume.
    background = np.sort(scores[~lesion])
    positives = scores[lesion]
    below = np.searchsorted(background, positives, side="left")
    not_above = np.searchsorted(background, positives, side="right")
    wins = np.sum(below, dtype=np.float64) + 0.5 * np.sum(not_above - below, dtype=np.float64)
    return float(wins / (n_pos * float(n_neg)))


def overlap(prediction: sitk.Image, reference: sitk.Image) -> dict:
    """Case Dice, sensitivity and precision (DeepWML)."""
    return MaskPair.from_images(prediction, reference).overlap()


def slice_metrics(prediction: sitk.Image, reference: sitk.Image) -> list[dict]:
    """Per 2D image (axial slice with reference lesion): Dice, sensitivity, precision, LV, LV group."""
    return MaskPair.from_images(prediction, reference).slices()


def hd95_mm(prediction: sitk.Image, reference: sitk.Image) -> float:
    """MICCAI WMH challenge 95th-percentile Hausdorff distance in mm."""
    return MaskPair.from_images(prediction, reference).hd95_mm()


def avd_percent(prediction: sitk.Image, reference: sitk.Image) -> float:
    """Absolute volume difference in % of the reference volume."""
    return MaskPair.from_images(prediction, reference).avd_percent()


def lesion_detection(prediction: sitk.Image, reference: sitk.Image) -> dict:
    """MICCAI WMH challenge lesion recall and lesion F1."""
    return MaskPair.from_images(prediction, reference).lesion_detection()


def lesionwise(prediction: sitk.Image, reference: sitk.Image, found_fraction: float = FOUND_FRACTION,
               size_classes: SizeClasses | None = None) -> dict:
    """CSVD-paper lesion-wise precision, recall and Dice, overall and by lesion size class."""
    return MaskPair.from_images(prediction, reference).lesionwise(found_fraction, size_classes)


def case_metrics(prediction: sitk.Image, reference: sitk.Image, probabilities: sitk.Image | None = None,
                 found_fraction: float = FOUND_FRACTION, size_classes: SizeClasses | None = None,
                 names: tuple[str, str] = ("prediction", "reference"), scan=None) -> dict:
    """Every per-case metric above in one flat dict (plus `lesionwise`, `slices` and `notes`); `names`
    name the two masks in an error; `scan`: the case's FLAIR, image or file (`MaskPair.from_images`)."""
    pair = MaskPair.from_images(prediction, reference, names, scan)
    result = {
        **pair.overlap(),
        "hd95_mm": pair.hd95_mm(),
        "avd_percent": pair.avd_percent(),
        **pair.lesion_detection(),
        **pair.volumes_ml(),
        "roc_auc": roc_auc(check_probability_map(probabilities), reference) if probabilities is not None else math.nan,
        "slice_thickness_mm": pair.slice_thickness_mm,
        "lesionwise": pair.lesionwise(found_fraction, size_classes),
        "slices": pair.slices(),
        "notes": pair.notes(),
    }
    return result
