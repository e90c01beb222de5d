"""The per-case lesion report: total volume, 3D lesion count, per-slice LV groups, per-lesion table.

Conventions:
- volumes from the voxel grid: voxel count × product of spacings, in ml (1 ml = 1000 mm³);
- lesions are 3D 26-connected components of the mask;
- the report states these conventions itself (`conventions`, `conventions()`), so that it reads on its own;
- slices are the axial planes of `io.to_axial_stack`; `index` is the voxel index along that axis
  in the input file (0 first, as Slicer and ITK count); for a DICOM input, `deepwml segment` adds each
  slice's Instance Number (`dicom_instance`, the image number PACS shows) and each lesion's
  `dicom_instance_range`;
- per slice, LV = lesion area × slice thickness (DeepWML paper), and its group G1–G5
  (`metrics.lv_group`); slices without lesion have `lv_group` null (the paper groups images with lesion);
- lesion centroids are physical LPS millimetres (the DICOM/ITK convention; Slicer shows RAS,
  which flips the signs of x and y).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import numpy as np

from .io import SliceFrame, axial_axis, ijk_to_lps, label_mask, to_axial_stack
from .metrics import LV_GROUP_BOUNDS_ML, LV_GROUPS, image_lv_ml, lv_group
from .postprocessing import label_components
from .volume import Volume, voxels

if TYPE_CHECKING:
    import SimpleITK as sitk


def lesion_count_text(n: int) -> str:
    """A lesion count as said to the reader: "1 lesion", "0 lesions", "12 lesions"."""
    return f"{n} lesion{'s' * (n != 1)}"


# The words of `conventions` that the change report (change.conventions) shares
VOLUMES = "ml (1 ml = 1000 mm3): voxel count x voxel volume"
LESIONS = "3D 26-connected components of the mask (voxels touching by a face, an edge or a corner are one lesion)"
LPS = ("LPS millimetres (x to the patient's left, y to posterior, z to superior: DICOM and ITK); Slicer shows RAS, "
       "the signs of x and y flipped")


def conventions() -> dict:
    """What the report's figures mean, written into it (`conventions`), so that a report read on its own, without
    this docstring or the README, still says how lesions were counted and which way its coordinates point: LPS
    x grows to the patient's left, Slicer's RAS x to the right; a centroid read as RAS lands on the other side."""
    bounds = " <= ".join(f"{group} < {bound:g} ml" for group, bound in zip(LV_GROUPS, LV_GROUP_BOUNDS_ML))
    return {
        "volumes": VOLUMES,
        "lesions": f"{LESIONS}, id 1 the largest",
        "coordinates": f"centroid_mm and point_mm: {LPS}",
        "slice_index": "slices' index and lesions' slice_range: voxel index along the file's axial axis, 0 first (a "
                       "DICOM input's dicom_instance and dicom_instance_range: the image numbers PACS shows)",
        "lv": f"per slice: lv_ml = area_mm2 x slice_thickness_mm / 1000 (the spacing of the axial planes); "
              f"lv_group {bounds} <= {LV_GROUPS[-1]}, null without lesion",
    }


def voxel_volume_mm3(frame: SliceFrame) -> float:
    return float(np.prod(frame.spacing))


def slice_table(counts: np.ndarray, frame: SliceFrame) -> list[dict]:
    """Lesion area, LV and LV group of every axial slice, from the lesion voxels on each (`counts`)."""
    areas = np.asarray(counts, np.int64) * frame.pixel_area_mm2
    rows = []
    for index, area in enumerate(areas):
        lv_ml = image_lv_ml(area, frame.slice_thickness_mm)
        group = lv_group(lv_ml) if area > 0 else None
        shown = round(lv_ml, 6)
        if group is not None and lv_group(shown) != group:  # 0.19999998 ml (40 mm² at a float32 pixdim of
            shown = lv_ml  # 4.9999995 mm) is G1: written 0.2, it would read as G2
        rows.append({
            "index": index,
            "area_mm2": round(float(area), 4),
            "lv_ml": shown,
            "lv_group": group,
        })
    return rows


def index_to_lps(points_ijk: np.ndarray, image: sitk.Image) -> np.ndarray:
    """Continuous voxel indices (N×3, i j k) to physical LPS millimetres."""
    matrix = ijk_to_lps(image)
    return np.asarray(points_ijk, dtype=float) @ matrix[:3, :3].T + matrix[:3, 3]


def lesion_geometry(labels: np.ndarray, count: int, axis: int, voxels_per_chunk: int = 2_000_000):
    """Voxel count, centroid (numpy k, j, i) and first/last index along `axis` of labels 1..count,
    in one pass a few slices at a time.

    ndimage.center_of_mass builds float64 copies of the whole volume per axis; this keeps memory
    to a few slices however large the scan or the lesion load.
    """
    sizes = np.zeros(count + 1)
    sums = np.zeros((3, count + 1))
    first = np.full(count + 1, np.iinfo(np.int64).max)
    last = np.full(count + 1, -1)
    chunk = max(1, voxels_per_chunk // max(1, labels[0].size))
    for k0 in range(0, labels.shape[0], chunk):
        block = labels[k0:k0 + chunk]
        flat = np.flatnonzero(block)
        ids = block.ravel()[flat]
        sizes += np.bincount(ids, minlength=count + 1)
        positions = list(np.unravel_index(flat, block.shape))
        positions[0] = positions[0] + k0
        for a, position in enumerate(positions):
            sums[a] += np.bincount(ids, weights=position, minlength=count + 1)
        np.minimum.at(first, ids, positions[axis])
        np.maximum.at(last, ids, positions[axis])
    return sizes[1:].astype(np.int64), (sums[:, 1:] / sizes[1:]).T, first[1:], last[1:]


def nearest_voxels(labels: np.ndarray, count: int, centroids_kji: np.ndarray, spacing_kji) -> np.ndarray:
    """For each label 1..count, the (k, j, i) of its voxel nearest its centroid in millimetres (`spacing_kji`:
    the voxel size along k, j and i; the grid's axes are orthogonal, so this is the physical distance): a place
    on the lesion itself, where a curved one's centroid (a periventricular cap, a band) may lie outside it."""
    flat = np.flatnonzero(labels)
    ids = labels.ravel()[flat].astype(np.int64) - 1
    positions = np.stack(np.unravel_index(flat, labels.shape), axis=1)
    distance = (((positions - centroids_kji[ids]) * np.asarray(spacing_kji, dtype=float)) ** 2).sum(axis=1)
    order = np.lexsort((distance, ids))  # by lesion, nearest first
    first = order[np.r_[True, ids[order][1:] != ids[order][:-1]]]
    nearest = np.zeros((count, 3), np.int64)
    nearest[ids[first]] = positions[first]
    return nearest


def _per_lesion(labels: np.ndarray, count: int, values: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean, lowest and highest of `values` (numpy (k, j, i) like `labels`, or its values at the labelled voxels
    only, in their order: np.flatnonzero's) over each lesion 1..count."""
    flat = np.flatnonzero(labels)
    values = np.asarray(values)
    if values.shape != labels.shape and values.shape != flat.shape:
        raise ValueError(f"{name} {values.shape} do not match the mask {labels.shape}")
    ids = labels.ravel()[flat]
    picked = (values if values.shape == flat.shape else values.ravel()[flat]).astype(np.float64)
    mean = np.bincount(ids, weights=picked, minlength=count + 1)[1:] / np.maximum(1, np.bincount(ids, minlength=count + 1)[1:])
    low, high = np.full(count + 1, np.inf), np.full(count + 1, -np.inf)
    np.minimum.at(low, ids, picked)
    np.maximum.at(high, ids, picked)
    return mean, low[1:], high[1:]


def _integer_mask(mask):
    """`mask` as integers: a float one checked and converted (`io.label_mask`: 0.9 was a lesion to the lesion count
    but no voxel to the volume, cast to 0), as is anything but an image. An integer mask (segment_image's, Slicer's)
    is taken as it is, without a pass over its voxels. SimpleITK is not imported for the asking: a NIfTI case runs
    without it, and a SimpleITK image cannot exist before it is imported."""
    sitk = sys.modules.get("SimpleITK")
    if (isinstance(mask, Volume) or sitk is not None and isinstance(mask, sitk.Image)) \
            and voxels(mask).dtype.kind in "uib":
        return mask
    return label_mask(mask, "the mask")


def lesion_table(mask: sitk.Image, probabilities: np.ndarray | None = None,
                 ventricle_distance: np.ndarray | None = None) -> list[dict]:
    """One row per 3D lesion: id (largest first), volume, centroid (LPS mm), a point on it (`point_mm`, LPS: its
    voxel nearest the centroid, where a viewer shows the lesion), axial slice range; with
    `probabilities` (numpy (k, j, i) on the mask's grid: the network's map), the mean and the highest
    probability over the lesion's voxels, which tell a confident lesion from one only just over the threshold;
    with `ventricle_distance` (the same layout, or only its values at the mask's voxels in their order,
    np.flatnonzero's: mm to the lateral ventricles, location.py), the lesion's shortest distance to them and the
    share of its voxels within the periventricular distance."""
    from .location import PERIVENTRICULAR_MM

    mask = _integer_mask(mask)
    labels, count = label_components(voxels(mask), compact=True)  # numpy (k, j, i)
    if count == 0:
        return []
    if probabilities is not None:
        mean_probability, _, max_probability = _per_lesion(labels, count, probabilities, "probabilities")
    if ventricle_distance is not None:
        _, nearest, _ = _per_lesion(labels, count, ventricle_distance, "ventricle distances")
        near_share, _, _ = _per_lesion(labels, count, np.asarray(ventricle_distance) <= PERIVENTRICULAR_MM,
                                       "ventricle distances")
    frame_axis = 2 - axial_axis(mask)
    voxel_ml = float(np.prod(mask.GetSpacing())) / 1000.0
    sizes, centroids_kji, first, last = lesion_geometry(labels, count, frame_axis)
    centroids_lps = index_to_lps(centroids_kji[:, ::-1], mask)
    points_lps = index_to_lps(nearest_voxels(labels, count, centroids_kji, mask.GetSpacing()[::-1])[:, ::-1], mask)
    order = np.argsort(-sizes, kind="stable")
    rows = []
    for rank, j in enumerate(order, start=1):
        rows.append({
            "id": rank,
            "volume_ml": round(float(sizes[j]) * voxel_ml, 6),
            "voxels": int(sizes[j]),
            "centroid_mm": [round(float(v), 2) for v in centroids_lps[j]],
            "point_mm": [round(float(v), 2) for v in points_lps[j]],
            "slice_range": [int(first[j]), int(last[j])],
        })
        if probabilities is not None:
            rows[-1].update(mean_probability=round(float(mean_probability[j]), 3),
                            max_probability=round(float(max_probability[j]), 3))
        if ventricle_distance is not None:
            rows[-1].update(ventricle_distance_mm=round(float(nearest[j]), 2),
                            periventricular_share=round(float(near_share[j]), 3))
    return rows


def lesion_report(mask: sitk.Image, probabilities: np.ndarray | None = None,
                  ventricle_distance: np.ndarray | None = None) -> dict:
    """The report of a 0/1 mask on its own grid (see module docstring for conventions; a float mask of whole numbers is
    read as its integers, one of other values or anything but an image refused); `probabilities` and
    `ventricle_distance` as for `lesion_table`."""
    mask = _integer_mask(mask)
    lesions = lesion_table(mask, probabilities, ventricle_distance)  # first: its labels need no stack beside them
    stack, frame = to_axial_stack(mask, dtype=np.uint8, copy=False)
    # counted a slice at a time: a 0/1 copy of the mask and its bool (0.84 GB at 1024 x 1024 x 400) were the peak
    # of a large scan's run
    counts = np.fromiter((np.count_nonzero(plane) for plane in stack), np.int64, stack.shape[0])
    volume_ml = float(counts.sum()) * voxel_volume_mm3(frame) / 1000.0
    return {
        "volume_ml": round(volume_ml, 6),
        "lesion_count": len(lesions),
        "conventions": conventions(),
        "slice_thickness_mm": round(frame.slice_thickness_mm, 4),
        "slices": slice_table(counts, frame),
        "lesions": lesions,
    }
