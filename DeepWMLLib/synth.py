"""Synthetic clinical 2D axial FLAIR scans with white matter lesion masks, for training.

Each case is drawn from the MNI152 anatomy (nilearn's grey/white matter probability maps and the
shared tissue label map), deformed by a random affine, a smooth elastic field and a random
ventricular enlargement, given lesions (procedural periventricular caps/bands, punctate and
confluent deep lesions, or real lesion shapes from the open MS database, never the evaluation
patients) and rendered with FLAIR contrast for one of several simulated scanners, then "acquired"
as thick oblique axial slices with bias field and Rician noise.

Skull and scalp: nilearn's MNI152 T1 is brain-extracted, so there is no head to borrow; they are
drawn as layers by distance outside the intracranial space (inner table, marrow, outer table, then
soft tissue: a lobulated mix of fat, muscle and dark air/bone pockets, thicker low in the head),
with random thickness and texture, and strewn with unlabelled bright spots as bright as lesions
(fat lobules, vessels, marrow islands; more of them low in the head, like orbits and skull base on
real scans). About one case in five is left skull-stripped,
like the evaluation cases.

Inside the skull, normal FLAIR is not clean either: patches of incompletely nulled CSF in sulci and
cisterns (stronger low in the head) and vessel or flow spots as bright as lesions in sulci, cisterns
and cortex are added, never labelled. About three cases in ten have faint lesions, barely brighter
than cortex. With `--graded-rims P`, the other cases' lesions are, with probability P, brighter in
their core than at their edge (drawn from a stream of their own, so nothing else in a case changes).

Speed: the 1 mm template volumes are combined once into an intensity and a lesion fraction volume,
then sampled once through the composed (elastic then affine) transform, directly on a working grid
that shares the output grid's orientation: in-plane about 1 mm, a few sub-slices across each thick
slice, cropped to the head. The sub-slices are averaged with the slice profile and the result is
interpolated in-plane by an integer factor to the output matrix.

Mask rule: a voxel is lesion when its lesion partial volume -- the 1 mm lesion fraction averaged with
the same slice-profile weights as the image, then linearly interpolated in-plane -- is at least 0.5.
So the mask is what the image shows, and its volume follows the painted lesion volume.
"""

from __future__ import annotations

import argparse
import csv
import functools
import math
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from io import StringIO
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .errors import Cancelled, DeepWMLError, UsageError
from . import io
from .io import shared_data_dir, write_image

# The labelled open MS cases are the project's evaluation set: their lesion shapes never go into
# training data.
EXCLUDED_PATIENTS = frozenset({"patient07", "patient19", "patient26"})

N_SCANNERS = 12
DISEASES = ("synth-low", "synth-ms", "synth-csvd")
MANIFEST_COLUMNS = ("case", "flair", "mask", "centre", "disease", "lesion_ml", "mask_ml",
                    "slice_thickness_mm", "pixel_spacing_mm", "matrix", "skull", "seed")

_LABEL_CSF, _LABEL_GM, _LABEL_WM, _LABEL_VENTRICLES, _LABEL_INFRATENTORIAL = 1, 2, 3, 4, 5
_NILEARN_FILES = {tissue: f"mni_icbm152_{tissue}_tal_nlin_sym_09a_converted.nii.gz" for tissue in ("gm", "wm")}
_LABELS_FILE = Path("templates") / "mni152_tissue_labels.nii.gz"
_LESIONS_DIR = Path("open_ms") / "lesion_masks_mni"
# Room around the brain in the padded template for the skull and scalp.
_PAD_MM = 24
# Sub-slice spacing across a thick slice: fine enough for the 1 mm template's detail to average
# into the slice profile, coarse enough to keep a case within a few seconds.
_SUBSLICE_MM = 1.5


def _nilearn_data_dir() -> Path:
    try:
        import nilearn
    except ImportError as exc:
        raise DeepWMLError("the synthetic generator needs nilearn for the MNI152 template: "
                           "pip install 'deepwml[train]'") from exc
    return Path(nilearn.__file__).parent / "datasets" / "data"


def lesion_library(shared_dir: Optional[Path] = None) -> list[Path]:
    """Real lesion masks usable for training, evaluation patients excluded."""
    shared_dir = shared_dir or shared_data_dir()
    if shared_dir is None:
        return []
    files = sorted((Path(shared_dir) / _LESIONS_DIR).glob("patient*.nii.gz"))
    return [f for f in files if f.name.split(".")[0] not in EXCLUDED_PATIENTS]


def _read(path: Path, pixel_type: int) -> sitk.Image:
    """A template file (nilearn's data folder lies under the user's name, which may hold letters ITK cannot open)."""
    with io.itk_names(path) as (name,):
        return sitk.ReadImage(name, pixel_type)


class _Atlas:
    """Template tissue maps on one padded 1 mm grid (numpy order z, y, x), prepared once per process."""

    def __init__(self, shared_dir: Path):
        nilearn_dir = _nilearn_data_dir()
        labels_path = shared_dir / _LABELS_FILE
        missing = [p for p in [labels_path, *(nilearn_dir / f for f in _NILEARN_FILES.values())]
                   if not p.is_file()]
        if missing:
            raise DeepWMLError(f"template file missing: {missing[0]}; set DEEPWML_SHARED_DATA to the "
                               "shared data folder and install nilearn>=0.10")
        pad = [_PAD_MM] * 3
        padded = sitk.ConstantPad(_read(nilearn_dir / _NILEARN_FILES["gm"], sitk.sitkFloat32),
                                  pad, pad, 0.0)
        label_img = sitk.Resample(_read(labels_path, sitk.sitkUInt8), padded,
                                  sitk.Transform(), sitk.sitkNearestNeighbor, 0)
        labels = sitk.GetArrayFromImage(label_img)
        intracranial_img = sitk.BinaryFillhole(label_img > 0)
        intracranial = sitk.GetArrayFromImage(intracranial_img).astype(bool)
        # Signed distance (negative inside) in mm; SimpleITK's is far faster than scipy's EDT.
        signed = sitk.GetArrayFromImage(sitk.SignedMaurerDistanceMap(
            intracranial_img, insideIsPositive=False, squaredDistance=False, useImageSpacing=True))
        dist_out = np.maximum(signed, 0).astype(np.float32)
        # Everything below is computed on the head's bounding box only: half the padded grid.
        box = _bounding_box(dist_out <= _PAD_MM - 2, margin=1)
        self.reference = sitk.RegionOfInterest(padded, [int(b.stop - b.start) for b in box[::-1]],
                                               [int(b.start) for b in box[::-1]])
        self.dist_out = dist_out[box]
        labels, intracranial, signed = labels[box], intracranial[box], signed[box]
        wm_img = sitk.Resample(_read(nilearn_dir / _NILEARN_FILES["wm"], sitk.sitkFloat32),
                               self.reference, sitk.Transform(), sitk.sitkLinear, 0.0)
        # The probability maps are an average of many brains and look blurred; the label map adds
        # crisp sulci and a sharp grey/white boundary.
        self.gm = _blend(sitk.GetArrayFromImage(self.reference) / np.float32(255), labels, _LABEL_GM)
        self.wm = _blend(sitk.GetArrayFromImage(wm_img) / np.float32(255), labels, _LABEL_WM)
        self.icv = ndimage.gaussian_filter(intracranial.astype(np.float32), 0.6)
        self.csf = np.clip(self.icv - self.gm - self.wm, 0, 1)
        self.ventricles = labels == _LABEL_VENTRICLES
        self.vent_dist = np.maximum(sitk.GetArrayFromImage(sitk.SignedMaurerDistanceMap(
            sitk.GetImageFromArray(self.ventricles.astype(np.uint8)), insideIsPositive=False,
            squaredDistance=False, useImageSpacing=False)), 0).astype(np.float32)
        self.allowed = (((self.wm >= 0.4) | ((self.vent_dist <= 2.5) & np.isin(labels, (_LABEL_GM, _LABEL_WM))))
                        & ~self.ventricles & (labels != _LABEL_CSF) & intracranial)
        self.supratentorial = labels != _LABEL_INFRATENTORIAL
        # Where normal FLAIR shows bright things that are not lesions: sulcal and cisternal CSF
        # (flow, incompletely nulled CSF, vessels) and cortex away from the white matter. Kept 2 mm
        # clear of where lesions may be painted, so a mimic never sits on a lesion's territory.
        clear = ~ndimage.binary_dilation(self.allowed, iterations=2)
        sulcal = (labels == _LABEL_CSF) | ((self.csf > 0.5) & ~self.ventricles)
        cortex = (labels == _LABEL_GM) & (self.wm < 0.1)
        self.mimic_sites = np.flatnonzero(((sulcal | cortex) & intracranial & clear).ravel())
        # Cortex in the lowest 35 % of the intracranial space and within 12 mm of its surface:
        # temporal poles, inferior temporal and orbitofrontal cortex next to the skull base, where
        # real FLAIR is often bright (inflow, susceptibility, partial volume with bone and CSF).
        z_idx = np.flatnonzero(intracranial.any(axis=(1, 2)))
        low = np.arange(labels.shape[0])[:, None, None] < z_idx[0] + 0.35 * (z_idx[-1] - z_idx[0])
        self.base_sites = np.flatnonzero((cortex & clear & intracranial & low & (signed > -12)).ravel())
        self.sulcal_csf = (self.csf * ~self.ventricles).astype(np.float32)
        # Deep grey matter (basal ganglia, thalami): the grey matter of the MNI box that holds them (|x| <= 32,
        # -38 <= y <= 28, -12 <= z <= 22 mm, RAS), so not the insula or the cingulate cortex. Real FLAIR
        # often shows the pallidum and putamen dark (iron).
        k, j, i = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in labels.shape), indexing="ij", sparse=True)
        origin, spacing = np.array(self.reference.GetOrigin()), np.array(self.reference.GetSpacing())
        direction = np.array(self.reference.GetDirection()).reshape(3, 3)
        x, y, z = (origin[a] + direction[a, 0] * spacing[0] * i + direction[a, 1] * spacing[1] * j
                   + direction[a, 2] * spacing[2] * k for a in range(3))  # LPS: RAS x, y are -x, -y
        nuclei = (np.abs(x) <= 32) & (-y >= -38) & (-y <= 28) & (z >= -12) & (z <= 22)
        self.deep_grey = (self.gm * (nuclei & (labels != _LABEL_INFRATENTORIAL) & ~self.ventricles)).astype(np.float32)
        self.box = _bounding_box(self.allowed, margin=3)
        idx = np.argwhere(intracranial)
        self.brain_centre = np.array(self.reference.TransformContinuousIndexToPhysicalPoint(
            idx.mean(axis=0)[::-1].tolist()))
        surface = intracranial & (signed > -1)
        self.surface_points = _index_to_physical(self.reference, np.argwhere(surface)[::7])
        vidx = np.argwhere(self.ventricles)
        self.ventricle_centre = _index_to_physical(self.reference, vidx.mean(axis=0, keepdims=True))[0]
        self.ventricle_centre_y = vidx[:, 1].mean()
        self.ventricle_half_length = (vidx[:, 1].max() - vidx[:, 1].min()) / 2

    @functools.lru_cache(maxsize=8)
    def real_lesions(self, path: Path, mirrored: bool) -> np.ndarray:
        """A real lesion mask inside the white matter box, optionally mirrored about the MNI
        midline x = 0 (the template is symmetric, so mirroring doubles the library)."""
        flip = sitk.ScaleTransform(3, (-1.0, 1.0, 1.0)) if mirrored else sitk.Transform()
        image = sitk.Resample(_read(path, sitk.sitkUInt8), self.reference, flip,
                              sitk.sitkNearestNeighbor, 0)
        return sitk.GetArrayViewFromImage(image)[self.box] > 0


@functools.lru_cache(maxsize=2)
def _atlas(shared_dir: Path) -> _Atlas:
    return _Atlas(shared_dir)


def _require_shared_dir() -> Path:
    shared_dir = shared_data_dir()
    if shared_dir is None or not (shared_dir / _LABELS_FILE).is_file():
        raise DeepWMLError("shared data with templates/mni152_tissue_labels.nii.gz not found: set "
                           "DEEPWML_SHARED_DATA to the shared data folder")
    return shared_dir


def _blend(probability: np.ndarray, labels: np.ndarray, tissue: int) -> np.ndarray:
    """Tissue fraction: mostly the crisp label, except below the tentorium, where the label map
    only says "infratentorial" and the probability map alone tells grey from white."""
    crisp = ndimage.gaussian_filter((labels == tissue).astype(np.float32), 0.5)
    weight = 0.75 * ndimage.gaussian_filter((labels != _LABEL_INFRATENTORIAL).astype(np.float32), 1.0)
    return (probability + weight * (crisp - probability)).astype(np.float32)


def _bounding_box(mask: np.ndarray, margin: int) -> tuple[slice, ...]:
    idx = np.argwhere(mask)
    lo = np.maximum(idx.min(axis=0) - margin, 0)
    hi = np.minimum(idx.max(axis=0) + margin + 1, mask.shape)
    return tuple(slice(a, b) for a, b in zip(lo, hi))


def _index_to_physical(image: sitk.Image, zyx: np.ndarray) -> np.ndarray:
    spacing = np.array(image.GetSpacing())
    direction = np.array(image.GetDirection()).reshape(3, 3)
    return np.array(image.GetOrigin()) + (zyx[:, ::-1] * spacing) @ direction.T


def _rotation(rx: float, ry: float, rz: float) -> np.ndarray:
    """Rotation matrix from angles in degrees about x, y and z."""
    ax, ay, az = np.radians([rx, ry, rz])
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    mx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    my = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    mz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return mz @ my @ mx


def _interpolation_matrix(n: int, m: int) -> np.ndarray:
    """(n, m) weights that linearly interpolate m nodes spread over n samples (node centres as in
    scipy's grid_mode)."""
    position = np.clip((np.arange(n) + 0.5) * m / n - 0.5, 0, m - 1)
    low = np.minimum(np.floor(position).astype(int), m - 2) if m > 1 else np.zeros(n, int)
    weights = np.zeros((n, m), np.float32)
    frac = position - low
    weights[np.arange(n), low] = 1 - frac
    if m > 1:
        weights[np.arange(n), low + 1] += frac
    return weights


def _upsample(coarse: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Trilinear upsampling of a small grid to `shape`, one axis at a time (matrix products are
    far cheaper than ndimage.zoom on volumes this size)."""
    out = coarse.astype(np.float32)
    for axis, n in enumerate(shape):
        out = np.moveaxis(np.tensordot(_interpolation_matrix(n, out.shape[axis]), out, axes=(1, axis)), 0, axis)
    return out


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], cell: float) -> np.ndarray:
    """Smooth random field in [0, 1] with features about `cell` voxels wide."""
    coarse_shape = tuple(max(2, int(math.ceil(n / cell)) + 1) for n in shape)
    coarse = ndimage.gaussian_filter(rng.standard_normal(coarse_shape).astype(np.float32), 0.7)
    lo, hi = coarse.min(), coarse.max()
    return _upsample((coarse - lo) / max(hi - lo, 1e-6), shape)


def _zoom_inplane(array: np.ndarray, f: int) -> np.ndarray:
    """Linear upsampling by an integer factor along axes 1 and 2, pixel edges aligned: output pixel
    f*j+p lies at input coordinate j + (p + 0.5)/f - 0.5."""
    for axis in (1, 2):
        padded = np.concatenate([np.take(array, [0], axis), array, np.take(array, [-1], axis)], axis)
        n = array.shape[axis]
        phases = []
        for p in range(f):
            delta = (p + 0.5) / f - 0.5
            neighbour = np.take(padded, np.arange(n) + (2 if delta > 0 else 0), axis)
            phases.append((1 - abs(delta)) * array + abs(delta) * neighbour)
        array = np.stack(phases, axis=axis + 1).reshape(array.shape[:axis] + (n * f,) + array.shape[axis + 1:])
    return array


# ---------------------------------------------------------------------------------------------
# Simulated scanners: each id fixes a contrast, noise and protocol family; cases jitter around it.

def _scanner(scanner_id: int) -> dict:
    rng = np.random.default_rng([20240601, scanner_id])
    return {
        "wm": float(rng.uniform(90, 330)),
        "gm_ratio": float(rng.uniform(1.1, 1.4)),
        "csf_ratio": float(rng.uniform(0.12, 0.4)),
        "fat_ratio": float(rng.uniform(1.0, 1.6)),
        "marrow_ratio": float(rng.uniform(0.3, 0.9)),
        "bone_ratio": float(rng.uniform(0.03, 0.12)),
        "noise": float(rng.uniform(0.025, 0.07)),
        "bias": float(rng.uniform(0.08, 0.3)),
        "thickness": float(rng.choice([3.0, 3.0, 3.3, 4.0, 4.0, 5.0, 5.0, 6.0, 7.0, 8.0])),
        "matrix": int(rng.choice([256, 288, 320, 320, 384, 448, 512])),
        "fov": float(rng.uniform(205, 255)),
        "rectangular": bool(rng.random() < 0.3),
        "zero_background": bool(rng.random() < 0.75),
        "profile_sigma": float(rng.uniform(0.3, 0.6)),
        "sharpen": float(rng.uniform(0.0, 1.0)),
    }


# ---------------------------------------------------------------------------------------------
# Lesions, painted on the template grid inside the white matter box.

def _target_volume_ml(rng: np.random.Generator, disease: str) -> float:
    low, high = {"synth-low": (0.03, 2.0), "synth-ms": (0.5, 40.0), "synth-csvd": (0.3, 80.0)}[disease]
    return float(math.exp(rng.uniform(math.log(low), math.log(high))))


def _procedural_lesions(rng: np.random.Generator, atlas: _Atlas, volume_ml: float, disease: str) -> np.ndarray:
    """Binary lesions in the white matter box: a prior favouring the ventricle walls (caps at the
    horns, bands along the bodies) times smooth noise, thresholded to the target volume, plus
    punctate deep lesions."""
    box = atlas.box
    allowed = atlas.allowed[box] & atlas.supratentorial[box]
    vent_dist = atlas.vent_dist[box]
    shape = allowed.shape
    reach = rng.uniform(3.0, 12.0)
    prior = np.exp(-vent_dist / reach)
    # Caps: the frontal and occipital horns collect lesions first.
    y = np.arange(box[1].start, box[1].stop, dtype=np.float32)
    horn = np.abs(y - atlas.ventricle_centre_y) / atlas.ventricle_half_length
    prior = prior * (1 + rng.uniform(0.3, 1.5) * np.clip(horn, 0, 1.5)[None, :, None])
    deep = rng.uniform(0.05, 0.5) if disease == "synth-csvd" else rng.uniform(0.02, 0.2)
    prior = prior + deep * atlas.wm[box]
    # The power keeps heavy loads irregular instead of a uniform halo round the ventricles.
    score = prior * (0.15 + _smooth_noise(rng, shape, rng.uniform(3, 8))) ** rng.uniform(1.0, 2.5)
    score[~allowed] = 0
    # Smoothing turns the one-voxel rims along the ventricle walls, which no rater would outline
    # on thick slices, into caps and bands a few millimetres thick.
    score = ndimage.gaussian_filter(score, 1.5)
    score[~allowed] = 0
    lesions = np.zeros(shape, bool)
    punctate_share = rng.uniform(0.05, 0.4) if disease != "synth-ms" else rng.uniform(0.1, 0.5)
    n_voxels = int(volume_ml * 1000 * (1 - punctate_share))
    if n_voxels > 0:
        threshold = np.partition(score[allowed], -n_voxels)[-n_voxels] if n_voxels < allowed.sum() else 0
        lesions = score >= max(threshold, 1e-6)
    _add_punctate(rng, lesions, allowed & (vent_dist > 4), volume_ml * 1000 * punctate_share)
    return lesions


def _add_punctate(rng: np.random.Generator, lesions: np.ndarray, where: np.ndarray, n_voxels: float) -> None:
    candidates = np.argwhere(where)
    if n_voxels < 1 or len(candidates) == 0:
        return
    painted = 0.0
    while painted < n_voxels:
        radii = rng.uniform(1.2, 4.0, size=3)
        centre = candidates[rng.integers(len(candidates))]
        r = int(math.ceil(radii.max()))
        lo = np.maximum(centre - r, 0)
        hi = np.minimum(centre + r + 1, lesions.shape)
        zz, yy, xx = np.ogrid[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        blob = (((zz - centre[0]) / radii[0]) ** 2 + ((yy - centre[1]) / radii[1]) ** 2
                + ((xx - centre[2]) / radii[2]) ** 2) <= 1
        lesions[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] |= blob
        painted += 4 / 3 * math.pi * radii.prod()


def _paint_lesions(rng: np.random.Generator, atlas: _Atlas, disease: str, library: list[Path]) -> tuple[np.ndarray, dict]:
    """Lesion fraction (0..1) on the template grid and what went into it."""
    target = _target_volume_ml(rng, disease)
    source = "procedural"
    box = atlas.box
    lesions = np.zeros(atlas.allowed[box].shape, np.float32)
    if disease == "synth-ms" and library:
        path = library[rng.integers(len(library))]
        mirrored = bool(rng.random() < 0.5)
        real = atlas.real_lesions(path, mirrored).astype(np.float32)
        lesions = np.maximum(lesions, real)
        source = path.name.split(".")[0] + ("-mirrored" if mirrored else "")
        target = max(target - real.sum() / 1000, 0.0) * rng.uniform(0, 0.5)
    procedural = _procedural_lesions(rng, atlas, target, disease)
    lesions = np.maximum(lesions, ndimage.gaussian_filter(procedural.astype(np.float32), 0.5))
    lesions *= atlas.allowed[box]
    full = np.zeros(atlas.allowed.shape, np.float32)
    full[box] = lesions
    return full, {"lesion_source": source}


# ---------------------------------------------------------------------------------------------
# Rendering in template space.

def _render_template(rng: np.random.Generator, atlas: _Atlas, scanner: dict, lesions: np.ndarray,
                     skull: bool, graded_rims: float = 0.0,
                     rim_rng: Optional[np.random.Generator] = None, skull_base_mimics: float = 0.0,
                     base_rng: Optional[np.random.Generator] = None, dark_deep_grey: float = 0.0,
                     grey_rng: Optional[np.random.Generator] = None) -> tuple[np.ndarray, bool, bool, bool]:
    """FLAIR intensities on the template grid; white matter is 1 before the scanner's scaling.

    With probability `graded_rims` (not for faint cases) the lesions' contrast over white matter
    rises from their edge to their core, as on real scans where the outer millimetres of a lesion
    are clearly but less bright than its centre and raters still include them. Those draws come from
    `rim_rng`, so the rest of the case (anatomy, lesions, scanner, mask) is the same with or without
    rims. With probability `skull_base_mimics` bright patches are added to cortex next to the skull
    base (`_skull_base_mimics`), drawn from `base_rng` for the same reason. With probability
    `dark_deep_grey` the deep grey matter (basal ganglia, thalami) is drawn darker than white matter,
    as iron makes the pallidum and putamen on many real FLAIRs (from `grey_rng`: nothing else changes).
    Returns the image, whether the rims were graded, whether the patches were added and whether the
    deep grey matter was darkened."""
    rim_rng = rng if rim_rng is None else rim_rng
    base_rng = rng if base_rng is None else base_rng
    grey_rng = rng if grey_rng is None else grey_rng
    gm_jitter, csf_jitter, level_jitter = rng.uniform(0.92, 1.08, size=3)  # cases spread round their scanner
    gm = scanner["gm_ratio"] * gm_jitter
    csf = scanner["csf_ratio"] * csf_jitter
    image = atlas.gm * gm + atlas.wm + atlas.csf * csf
    darkened = bool(dark_deep_grey > 0 and grey_rng.random() < dark_deep_grey)
    if darkened:  # deep grey at 0.55-0.95 of white matter, unevenly (the pallidum darkest on real scans)
        level = grey_rng.uniform(0.55, 0.95)
        patchy = 0.6 + 0.4 * _smooth_noise(grey_rng, atlas.deep_grey.shape, 6)
        image += atlas.deep_grey * (level - gm) * patchy
    box = atlas.box
    heterogeneity = 0.75 + 0.5 * _smooth_noise(rng, lesions[box].shape, 4)
    graded = False
    if rng.random() < 0.3:
        # Faint lesions, barely brighter than cortex: the heterogeneity scales their contrast over
        # white matter, so no part of a lesion is darker than the white matter round it.
        lesion = rng.uniform(1.0, 1.15) * max(gm, 1.0)
        lesion_value = 1 + (lesion - 1) * heterogeneity
    else:
        lesion = rng.uniform(1.15, 2.0) * max(gm, 1.0)
        lesion_value = lesion * heterogeneity
        graded = bool(graded_rims > 0 and rim_rng.random() < graded_rims)
        if graded:
            lesion_value = 1 + (lesion_value - 1) * _rim_grade(rim_rng, lesions[box])
    image[box] += lesions[box] * (lesion_value - image[box])
    image += _intracranial_mimics(rng, atlas, lesion)
    based = bool(skull_base_mimics > 0 and base_rng.random() < skull_base_mimics)
    if based:
        image += _skull_base_mimics(base_rng, atlas, lesion)
    if skull:
        image += (1 - atlas.icv) * _head_layers(rng, atlas, scanner, lesion)
    return image * np.float32(scanner["wm"] * level_jitter), graded, based, darkened


def _rim_grade(rng: np.random.Generator, lesions: np.ndarray) -> np.ndarray:
    """A factor on lesion contrast: `floor` at a lesion's edge, rising linearly over `ramp` mm of
    depth (1 mm template grid) to 1 in its core. Lesions thinner than the ramp stay fainter all
    through, like small real lesions."""
    return _rim_factor(rng, ndimage.distance_transform_edt(lesions >= 0.5).astype(np.float32))


def _rim_factor(rng: np.random.Generator, depth: np.ndarray) -> np.ndarray:
    """The rim grade from each voxel's depth inside its lesion (mm), `floor` and `ramp` drawn here."""
    floor, ramp = rng.uniform(0.35, 0.65), rng.uniform(1.5, 4.0)
    return floor + (1 - floor) * np.clip((depth - 0.5) / ramp, 0, 1)


def _intracranial_mimics(rng: np.random.Generator, atlas: _Atlas, bright: float) -> np.ndarray:
    """Normal bright things inside the skull that are not lesions (never labelled), added to the
    image: in about half of the cases patches of incompletely nulled CSF in sulci and cisterns,
    stronger low in the head (inflow from the unsaturated slab edge, pulsation), and in every case
    spots 1-3 mm wide as bright as lesions in sulci, cisterns and cortex (vessels, flow). On real
    scans these, at the skull base, in the temporal lobes and at the vertex, are where a network
    trained on clean anatomy marks lesions that are not there."""
    shape = atlas.csf.shape
    z = np.arange(shape[0], dtype=np.float32)[:, None, None]
    low = np.clip((shape[0] * rng.uniform(0.35, 0.5) - z) / 40.0, 0, 1)
    out = np.zeros(shape, np.float32)
    if rng.random() < 0.5:
        patches = np.clip((_smooth_noise(rng, shape, rng.uniform(15, 30)) - rng.uniform(0.45, 0.65)) / 0.15, 0, 1)
        out += atlas.sulcal_csf * patches * (rng.uniform(0.3, 1.0) * (1 + low))
    sites = atlas.mimic_sites
    if sites.size:
        z_site = sites // (shape[1] * shape[2])
        weight = np.where(z_site < shape[0] * 0.45, 3.0, 1.0)
        for sigma in (0.6, 1.1):
            n = int(rng.integers(5, 40))
            seeds = np.zeros(shape, np.float32)
            picked = rng.choice(sites, size=n, p=weight / weight.sum())
            np.put(seeds, picked, bright * rng.uniform(0.5, 1.1, size=n) * (2 * math.pi) ** 1.5 * sigma ** 3)
            out = np.maximum(out, ndimage.gaussian_filter(seeds, sigma, truncate=3.0))
    return out


def _skull_base_mimics(rng: np.random.Generator, atlas: _Atlas, bright: float) -> np.ndarray:
    """1-4 smooth bright patches 5-12 mm wide (FWHM) on cortex next to the skull base (see
    `_Atlas.base_sites`), following the cortex and the CSF beside it, peaking 0.3-0.8 of the
    lesions' brightness above it; never labelled. On real FLAIR the temporal poles and inferior
    temporal and frontal cortex are often this bright; networks trained without them mark them."""
    shape = atlas.gm.shape
    out = np.zeros(shape, np.float32)
    if atlas.base_sites.size == 0:
        return out
    for site in rng.choice(atlas.base_sites, size=int(rng.integers(1, 5))):
        centre = np.unravel_index(site, shape)
        sigma = rng.uniform(2.0, 5.0, size=3)
        reach = np.ceil(3 * sigma).astype(int)
        window = tuple(slice(max(0, c - r), min(n, c + r + 1)) for c, r, n in zip(centre, reach, shape))
        axes = np.ogrid[window]
        blob = np.exp(-0.5 * sum(((a - c) / w) ** 2 for a, c, w in zip(axes, centre, sigma))).astype(np.float32)
        tissue = atlas.gm[window] + np.float32(0.5) * atlas.csf[window]  # only where the patch lies
        patch = bright * rng.uniform(0.3, 0.8) * blob * tissue
        out[window] = np.maximum(out[window], patch)
    return out


def _head_layers(rng: np.random.Generator, atlas: _Atlas, scanner: dict, bright: float) -> np.ndarray:
    """Skull and soft tissue as layers by distance outside the intracranial space: dark inner
    table, marrow, dark outer table, then soft tissue, which is a lobulated mix of bright fat, grey
    muscle and dark pockets (air, bone), thicker and with more muscle and air low in the head, where
    real scans cut temporal muscles, skull base, sinuses and neck. Bright spots as bright as lesions
    (fat lobules, vessels, marrow islands; never labelled) are strewn through bone and soft tissue:
    on real FLAIR these are what a network that has only seen a smooth scalp mistakes for lesions."""
    d = atlas.dist_out * (0.75 + 0.5 * _smooth_noise(rng, atlas.dist_out.shape, 40)).astype(np.float32)
    # 0 at and above the middle of the head's height, 1 from 50 mm below it (index 0 is inferior).
    z = np.arange(d.shape[0], dtype=np.float32)[:, None, None]
    low = np.clip((d.shape[0] * rng.uniform(0.42, 0.52) - z) / 50.0, 0, 1)
    bone = rng.uniform(3.5, 7.0)
    soft = rng.uniform(3.0, 6.5) * (1 + rng.uniform(1.0, 2.5) * low)
    marrow_lo, marrow_hi = bone * rng.uniform(0.25, 0.4), bone * rng.uniform(0.6, 0.75)
    b, m, f = scanner["bone_ratio"], scanner["marrow_ratio"] * rng.uniform(0.8, 1.2), scanner["fat_ratio"] * rng.uniform(0.85, 1.15)
    skull = np.interp(d, [0, 1.0, marrow_lo, marrow_lo + 1, marrow_hi - 1, marrow_hi, bone],
                      [scanner["csf_ratio"], b, b, m, m, b, b]).astype(np.float32)
    fatness = np.clip((_smooth_noise(rng, d.shape, 5) - (rng.uniform(0.35, 0.5) + 0.2 * low)) / 0.1 + 0.5, 0, 1)
    tissue = rng.uniform(0.45, 0.85) + (f - rng.uniform(0.45, 0.85)) * fatness
    air = _smooth_noise(rng, d.shape, 6) < rng.uniform(0.05, 0.15) + 0.25 * low
    tissue = np.where(air, b, tissue)
    # Soft tissue from the outer table outwards, fading to air over 1 mm at the skin.
    into_soft = np.clip(d - bone, 0, 1)
    skin = np.clip(bone + soft + 1 - d, 0, 1)
    layers = skull + (tissue - skull) * into_soft
    layers *= skin
    texture = (0.7 + 0.6 * _smooth_noise(rng, d.shape, 12)) * (1 + rng.uniform(0.2, 0.5) * (_smooth_noise(rng, d.shape, 3) - 0.5))
    layers = (layers * texture).astype(np.float32)
    return np.maximum(layers, _extracranial_spots(rng, d, bone + soft, bright))


def _extracranial_spots(rng: np.random.Generator, d: np.ndarray, depth: np.ndarray, bright: float) -> np.ndarray:
    """Blurred bright spots, 1-3 mm wide, inside the head but outside the intracranial space."""
    where = np.flatnonzero(((d > 0.5) & (d < depth)).ravel())
    spots = np.zeros(d.shape, np.float32)
    if where.size == 0:
        return spots
    # Three times as likely in the lower half of the head (index 0 of the template is inferior).
    z = where // (d.shape[1] * d.shape[2])
    weight = np.where(z < d.shape[0] // 2, 3.0, 1.0)
    for sigma in (0.7, 1.4):
        n = int(rng.integers(10, 60))
        seeds = np.zeros(d.shape, np.float32)
        picked = rng.choice(where, size=n, p=weight / weight.sum())
        np.put(seeds, picked, bright * rng.uniform(0.6, 1.3, size=n) * (2 * math.pi) ** 1.5 * sigma ** 3)
        spots = np.maximum(spots, ndimage.gaussian_filter(seeds, sigma, truncate=3.0))
    return spots


# ---------------------------------------------------------------------------------------------
# Acquisition geometry.

def _acquisition(rng: np.random.Generator, atlas: _Atlas, scanner: dict) -> dict:
    """Where the head sits (affine template -> scan) and the oblique slice grid planned on it."""
    scale = rng.uniform(0.9, 1.1) * rng.uniform(0.96, 1.04, size=3)
    pitch = rng.uniform(-12, 12)
    head_rotation = _rotation(pitch, rng.uniform(-4, 4), rng.uniform(-5, 5))
    linear = head_rotation @ np.diag(scale)
    translation = rng.uniform(-10, 10, size=3)
    centre = atlas.brain_centre
    # Slices are planned roughly along the head's own axial plane, never exactly.
    direction = _rotation(pitch * rng.uniform(0, 1) + rng.normal(0, 2), rng.normal(0, 2), rng.normal(0, 3))

    thickness = scanner["thickness"]
    matrix = int(scanner["matrix"])
    fov = scanner["fov"] * rng.uniform(0.95, 1.05)
    # Where the brain lands on the slice axes u = direction^T p.
    surface = (atlas.surface_points - centre) @ linear.T + centre + translation
    u = surface @ direction
    nx = ny = matrix
    if scanner["rectangular"]:
        nx = int(round(matrix * 0.8))
    # The field of view always holds the whole head: brain, up to ~18 mm of skull and scalp each
    # side, and the off-centre shift below.
    head_extent = u.max(axis=0) - u.min(axis=0) + 2 * (18 + 12)
    spacing = float(np.clip(max(fov / matrix, head_extent[0] / nx, head_extent[1] / ny), 0.4, 1.0))
    if matrix < 256:  # a matrix below the clinical range (--matrix 64-255): coarser pixels, still the whole head
        spacing = max(spacing, head_extent[0] / nx, head_extent[1] / ny)
    factor = max(1, int(round(1.0 / spacing)))
    nx, ny = (int(math.ceil(n / factor)) * factor for n in (nx, ny))
    u_centre = u.mean(axis=0) + np.array([rng.uniform(-8, 8), rng.uniform(-12, 12), 0])
    coverage = rng.uniform(125, 165)
    nz = max(4, int(round(coverage / thickness)))
    top = u[:, 2].max() + rng.uniform(3, 15)
    u0 = np.array([u_centre[0] - (nx - 1) / 2 * spacing, u_centre[1] - (ny - 1) / 2 * spacing,
                   top - thickness / 2 - (nz - 1) * thickness])
    return {
        "linear": linear, "translation": translation, "centre": centre, "direction": direction,
        "ventricle_centre": linear @ (atlas.ventricle_centre - centre) + centre + translation,
        "spacing": (spacing, spacing, thickness), "size": (nx, ny, nz), "origin": direction @ u0,
        "factor": factor, "u_min": u.min(axis=0), "u_max": u.max(axis=0), "u0": u0,
    }


def _template_transform(rng: np.random.Generator, geo: dict, crop_origin: np.ndarray, crop_extent: np.ndarray) -> sitk.Transform:
    """Physical point in the scan -> point in the template: smooth elastic displacement in scan
    space first, then the inverse of the head's affine placement."""
    affine = sitk.AffineTransform(3)
    affine.SetCenter((geo["centre"] + geo["translation"]).tolist())
    affine.SetMatrix(np.linalg.inv(geo["linear"]).ravel().tolist())
    affine.SetTranslation((-geo["translation"]).tolist())
    amplitude = rng.uniform(0.0, 3.0)
    node = 10.0
    shape = [int(math.ceil(e / node)) + 3 for e in crop_extent]
    field = ndimage.gaussian_filter(rng.standard_normal((shape[2], shape[1], shape[0], 3)),
                                    (1.3, 1.3, 1.3, 0)) * amplitude * 4
    field += _atrophy_displacement(geo, crop_origin - geo["direction"] @ np.full(3, node), node, shape)
    displacement = sitk.GetImageFromArray(field, isVector=True)
    displacement.SetSpacing([node] * 3)
    displacement.SetDirection(geo["direction"].ravel().tolist())
    displacement.SetOrigin((crop_origin - geo["direction"] @ np.full(3, node)).tolist())
    composite = sitk.CompositeTransform(3)
    composite.AddTransform(affine)
    composite.AddTransform(sitk.DisplacementFieldTransform(displacement))
    return composite


def _atrophy_displacement(geo: dict, origin: np.ndarray, node: float, shape: list[int]) -> np.ndarray:
    """Displacement (z, y, x, 3) that draws sampling points towards the ventricles, so that they
    and the deep CSF spaces look enlarged by about 1 / (1 - atrophy), as in older brains."""
    u = np.stack(np.meshgrid(*(np.arange(n) * node for n in shape[::-1]), indexing="ij")[::-1], axis=-1)
    offset = origin + u @ geo["direction"].T - geo["ventricle_centre"]
    along = offset @ geo["direction"]
    weight = np.exp(-0.5 * np.sum((along / np.array([22.0, 35.0, 20.0])) ** 2, axis=-1))
    return -geo["atrophy"] * offset * weight[..., None]


def _profile_weights(k: int, sigma_fraction: float) -> np.ndarray:
    """Slice profile: Gaussian-shaped weights of the k sub-slices across one slice."""
    offsets = (np.arange(k) + 0.5) / k - 0.5
    weights = np.exp(-0.5 * (offsets / sigma_fraction) ** 2)
    return (weights / weights.sum()).astype(np.float32)


def _acquire(rng: np.random.Generator, atlas: _Atlas, geo: dict, image: np.ndarray, lesions: np.ndarray,
             profile_sigma: float, sharpen: float, extra: tuple[np.ndarray, ...] = ()) -> tuple[np.ndarray, ...]:
    """Sample the template volumes on the scan grid: arrays (z, y, x) of intensity and lesion PV,
    then one partial-volume array per template map in `extra` (e.g. the intracranial space). The
    extra channels are sampled by the same transform and change nothing in the first two."""
    sx, _, sz = geo["spacing"]
    nx, ny, nz = geo["size"]
    f = geo["factor"]
    k = max(2, int(math.ceil(sz / _SUBSLICE_MM)))
    w = sx * f
    d = geo["direction"]
    # Working pixel j covers output pixels f*j .. f*j+f-1; sub-slice s sits inside slice s // k.
    w_u0 = geo["u0"] + np.array([(f - 1) / 2 * sx, (f - 1) / 2 * sx, -sz / 2 + sz / (2 * k)])
    margin = 28.0
    lo = np.floor((geo["u_min"][:2] - margin - w_u0[:2]) / w).astype(int)
    hi = np.ceil((geo["u_max"][:2] + margin - w_u0[:2]) / w).astype(int) + 1
    lo = np.clip(lo, 0, [nx // f, ny // f])
    hi = np.clip(hi, lo, [nx // f, ny // f])
    crop_size = [int(hi[0] - lo[0]), int(hi[1] - lo[1]), nz * k]
    channels = [image, lesions, *extra]
    out = [np.zeros((nz, ny, nx), np.float32) for _ in channels]
    if min(crop_size) == 0:
        return tuple(out)
    crop_u0 = w_u0 + np.array([lo[0] * w, lo[1] * w, 0.0])
    crop_origin = d @ crop_u0
    spacing = np.array([w, w, sz / k])
    reference = sitk.Image(crop_size, sitk.sitkVectorFloat32, len(channels))
    reference.SetSpacing(spacing.tolist())
    reference.SetDirection(d.ravel().tolist())
    reference.SetOrigin(crop_origin.tolist())
    source = sitk.GetImageFromArray(np.stack(channels, axis=-1), isVector=True)
    source.CopyInformation(atlas.reference)
    transform = _template_transform(rng, geo, crop_origin, spacing * np.array(crop_size))
    sampled = sitk.GetArrayFromImage(sitk.Resample(source, reference, transform, sitk.sitkLinear, 0.0))
    weights = _profile_weights(k, profile_sigma)
    slices = np.einsum("zkyxc,k->zyxc", sampled.reshape(nz, k, crop_size[1], crop_size[0], len(channels)), weights)
    # Scanners sharpen their reconstructions; an in-plane unsharp mask also offsets the blur of
    # interpolating a 1 mm template.
    blurred = ndimage.gaussian_filter(slices[..., 0], (0, 1.0, 1.0))
    slices[..., 0] += sharpen * (slices[..., 0] - blurred)
    if f > 1:
        slices = _zoom_inplane(slices, f)
    ys = slice(lo[1] * f, lo[1] * f + slices.shape[1])
    xs = slice(lo[0] * f, lo[0] * f + slices.shape[2])
    for c, array in enumerate(out):
        array[:, ys, xs] = slices[..., c]
    return tuple(out)


def _bias_field(rng: np.random.Generator, shape: tuple[int, int, int], strength: float) -> np.ndarray:
    field = _upsample(rng.standard_normal((3, 4, 4)).astype(np.float32) * strength, shape)
    return np.exp(field - field.mean())


# ---------------------------------------------------------------------------------------------
# Public API.

def case_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of case `index` in a data set made with `seed`."""
    return np.random.default_rng([int(seed), int(index)])


def _check_probabilities(**options: float) -> None:
    for name, value in options.items():
        if not 0 <= value <= 1:
            raise DeepWMLError(f"--{name.replace('_', '-')} is a probability: use 0 to 1, got {value}")


def generate_case(rng_or_seed: Union[np.random.Generator, int], disease: Optional[str] = None,
                  scanner_id: Optional[int] = None, skull: Optional[bool] = None,
                  matrix: Optional[int] = None, slice_thickness: Optional[float] = None,
                  intracranial: bool = False, graded_rims: float = 0.0, skull_base_mimics: float = 0.0,
                  ventricles: bool = False, dark_deep_grey: float = 0.0) -> tuple:
    """One synthetic clinical FLAIR (uint16) and its lesion mask (uint8 0/1) on the same grid,
    and the case's metadata: (flair, mask, meta). With `intracranial` a further item, the mask of
    the intracranial space (brain, CSF and ventricles inside the skull; uint8 0/1, same grid), the
    target of the brain-mask network; with `ventricles` a further item after it, the mask of the
    lateral ventricles (uint8 0/1, same grid, the ventricle network's target; the enlargement of
    older brains included). The first three items are the same with or without either.

    Unset options are drawn at random. `matrix` and `slice_thickness` override the scanner's
    protocol (small matrices keep tests fast). `graded_rims` is the probability that a case's
    lesions are brighter in their core than at their edge; it changes only lesion intensities, so
    the mask and everything else are the same for any value (and 0 gives the data sets made before
    it existed). `skull_base_mimics` is the probability that bright, unlabelled patches are added to
    cortex next to the skull base; likewise it changes nothing else, as `dark_deep_grey`, the
    probability that the basal ganglia and thalami are darker than white matter. Raises DeepWMLError
    when the templates are missing.
    """
    _check_probabilities(graded_rims=graded_rims, skull_base_mimics=skull_base_mimics, dark_deep_grey=dark_deep_grey)
    rng = rng_or_seed if isinstance(rng_or_seed, np.random.Generator) else np.random.default_rng(rng_or_seed)
    atlas = _atlas(_require_shared_dir())
    library = lesion_library()
    disease = disease or str(rng.choice(DISEASES, p=[0.25, 0.35, 0.4]))
    if disease not in DISEASES:
        raise DeepWMLError(f"unknown disease regime {disease!r}: use one of {', '.join(DISEASES)}")
    scanner_id = int(rng.integers(N_SCANNERS)) if scanner_id is None else int(scanner_id)
    scanner = dict(_scanner(scanner_id))
    if matrix is not None:
        if not 64 <= matrix <= 1024:
            raise DeepWMLError(f"matrix {matrix} is out of range: use 64 to 1024 (clinical: 256 to 512)")
        scanner["matrix"] = int(matrix)
    if slice_thickness is not None:
        if not 0.5 <= slice_thickness <= 10:
            raise DeepWMLError(f"slice thickness {slice_thickness} mm is out of range: use 0.5 to 10 mm")
        scanner["thickness"] = float(slice_thickness)
    else:
        scanner["thickness"] = float(np.clip(scanner["thickness"] * rng.uniform(0.9, 1.1), 3.0, 8.0))
    skull = bool(rng.random() < 0.8) if skull is None else bool(skull)

    lesions, lesion_meta = _paint_lesions(rng, atlas, disease, library)
    # Streams of their own: rims and skull-base patches change nothing else in the case (and the
    # first child is the one rims had before the second existed).
    rim_rng, base_rng, grey_rng = rng.spawn(3)
    template_image, graded, based, darkened = _render_template(rng, atlas, scanner, lesions, skull, graded_rims, rim_rng,
                                                               skull_base_mimics, base_rng, dark_deep_grey, grey_rng)
    geo = _acquisition(rng, atlas, scanner)
    geo["atrophy"] = rng.uniform(0.0, 0.3) if disease == "synth-csvd" else rng.uniform(0.0, 0.15)
    extra = ([atlas.icv] if intracranial else []) + ([atlas.ventricles.astype(np.float32)] if ventricles else [])
    clean, lesion_pv, *extra_pv = _acquire(rng, atlas, geo, template_image, lesions, scanner["profile_sigma"],
                                           scanner["sharpen"], tuple(extra))

    clean *= _bias_field(rng, clean.shape, scanner["bias"] * rng.uniform(0.6, 1.4))
    sigma = scanner["noise"] * scanner["wm"] * rng.uniform(0.7, 1.3)
    noisy = np.hypot(clean + rng.standard_normal(clean.shape, dtype=np.float32) * sigma,
                     rng.standard_normal(clean.shape, dtype=np.float32) * sigma)
    if scanner["zero_background"]:
        noisy[ndimage.uniform_filter(clean, (1, 5, 5)) < 0.03 * scanner["wm"]] = 0
    flair_array = np.clip(np.rint(noisy), 0, 65535).astype(np.uint16)
    mask_array = (lesion_pv >= 0.5).astype(np.uint8)

    flair = sitk.GetImageFromArray(flair_array)
    flair.SetSpacing(geo["spacing"])
    flair.SetOrigin(geo["origin"].tolist())
    flair.SetDirection(geo["direction"].ravel().tolist())
    mask = sitk.GetImageFromArray(mask_array)
    mask.CopyInformation(flair)
    voxel_ml = float(np.prod(geo["spacing"])) / 1000
    meta = {
        "centre": f"synth-scanner{scanner_id}",
        "disease": disease,
        "lesion_ml": round(float(lesion_pv.sum()) * voxel_ml, 4),
        "mask_ml": round(float(mask_array.sum()) * voxel_ml, 4),
        "slice_thickness_mm": round(geo["spacing"][2], 3),
        "pixel_spacing_mm": round(geo["spacing"][0], 4),
        "matrix": f"{geo['size'][0]}x{geo['size'][1]}",
        "skull": int(skull),
        **lesion_meta,
        **({"graded_rims": int(graded)} if graded_rims > 0 else {}),
        **({"skull_base_mimics": int(based)} if skull_base_mimics > 0 else {}),
        **({"dark_deep_grey": int(darkened)} if dark_deep_grey > 0 else {}),
    }
    masks = []
    for pv in extra_pv:
        image = sitk.GetImageFromArray((pv >= 0.5).astype(np.uint8))
        image.CopyInformation(flair)
        masks.append(image)
    return (flair, mask, meta, *masks)


def _write_case(args: tuple[int, int, str, dict]) -> dict:
    seed, index, out_dir, options = args
    sitk.ProcessObject_SetGlobalDefaultNumberOfThreads(1)
    flair, mask, meta, *extra = generate_case(case_rng(seed, index), **options)
    name = f"synth{seed}_{index:05d}"
    out = Path(out_dir)
    write_image(flair, out / f"{name}_flair.nii.gz")
    write_image(mask, out / f"{name}_mask.nii.gz")
    row = {"case": name, "flair": f"{name}_flair.nii.gz", "mask": f"{name}_mask.nii.gz",
           "seed": f"{seed}:{index}", **meta}
    columns = [c for c, wanted in (("intracranial", options["intracranial"]), ("ventricles", options["ventricles"]))
               if wanted]
    for column, image in zip(columns, extra):
        write_image(image, out / f"{name}_{column}.nii.gz")
        row[column] = f"{name}_{column}.nii.gz"
    return row


def generate_dataset(n: int, out_dir: Union[str, Path], seed: int = 0,
                     progress: Optional[Callable[[float, str], None]] = None,
                     cancel: Optional[Callable[[], bool]] = None, workers: int = 1,
                     matrix: Optional[int] = None, slice_thickness: Optional[float] = None,
                     intracranial: bool = False, graded_rims: float = 0.0, skull_base_mimics: float = 0.0,
                     ventricles: bool = False, dark_deep_grey: float = 0.0) -> Path:
    """Write `n` synthetic cases and `manifest.csv` (paths relative to it) into `out_dir`.

    Case i depends only on (seed, i), whatever `workers` is. `matrix` and `slice_thickness`, when
    given, replace the simulated scanners' protocols for every case. With `intracranial`, each case
    also gets `<case>_intracranial.nii.gz` (manifest column `intracranial`), for the brain-mask
    network (`deepwml train --mask-column intracranial`); with `ventricles`, `<case>_ventricles.nii.gz`
    (column `ventricles`), the lateral ventricles, for the ventricle network. `graded_rims`,
    `skull_base_mimics`, `dark_deep_grey`: see `generate_case`.
    """
    if n < 1:
        raise DeepWMLError(f"number of cases must be at least 1, got {n}")
    _check_probabilities(graded_rims=graded_rims, skull_base_mimics=skull_base_mimics, dark_deep_grey=dark_deep_grey)
    made = not Path(out_dir).exists()
    out = io.make_output_dir(out_dir)  # first: an output path that is a file is the error to tell
    try:
        _require_shared_dir()
    except DeepWMLError:
        if made:  # a refused run leaves no empty folder
            out.rmdir()
        raise
    options = {"matrix": matrix, "slice_thickness": slice_thickness, "intracranial": intracranial,
               "ventricles": ventricles, "graded_rims": graded_rims, "skull_base_mimics": skull_base_mimics,
               "dark_deep_grey": dark_deep_grey}
    jobs = [(int(seed), i, str(out), options) for i in range(n)]
    rows = []
    started = time.perf_counter()

    def done(row: dict) -> None:
        rows.append(row)
        if progress:
            elapsed = time.perf_counter() - started
            progress(len(rows) / n, f"case {len(rows)}/{n} ({elapsed / len(rows):.1f} s/case)")
        if cancel and cancel():
            raise Cancelled()

    if workers <= 1:
        for job in jobs:
            if cancel and cancel():
                raise Cancelled()
            done(_write_case(job))
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            try:
                for row in pool.map(_write_case, jobs):
                    done(row)
            except Cancelled:
                pool.shutdown(wait=False, cancel_futures=True)
                raise
    rows.sort(key=lambda r: r["case"])
    table = StringIO()
    columns = [*MANIFEST_COLUMNS, "lesion_source"] + (["intracranial"] if intracranial else []) \
        + (["ventricles"] if ventricles else []) \
        + (["graded_rims"] if graded_rims > 0 else []) + (["skull_base_mimics"] if skull_base_mimics > 0 else []) \
        + (["dark_deep_grey"] if dark_deep_grey > 0 else [])
    writer = csv.DictWriter(table, fieldnames=columns, extrasaction="ignore",
                            lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return io.write_csv_text(table.getvalue(), out / "manifest.csv")


# ---------------------------------------------------------------------------------------------
# Command line.

def register(subparsers) -> None:
    from .cli import add_debug_flag, number_in, positive_int, unit_interval

    parser = subparsers.add_parser(
        "synth", help="generate synthetic clinical FLAIR scans with lesion masks",
        description="Write N synthetic 2D axial FLAIR scans (uint16 NIfTI) with lesion masks and a "
                    "manifest.csv (case,flair,mask,centre,disease,...) for training.")
    parser.add_argument("-n", "--cases", type=positive_int, required=True, help="number of cases")
    parser.add_argument("-o", "--output", type=Path, required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="data set seed (case i uses seed, i)")
    parser.add_argument("-j", "--workers", type=positive_int, default=1, help="parallel processes")
    parser.add_argument("--matrix", type=number_in(64, 1024, int), help="in-plane matrix for every case, 64 to 1024 "
                        "(default: per simulated scanner, 256-512)")
    parser.add_argument("--thickness", type=number_in(0.5, 10), help="slice thickness in mm for every case, 0.5 to 10 "
                        "(default: per simulated scanner, 3-8)")
    parser.add_argument("--intracranial", action="store_true", help="also write each case's intracranial "
                        "mask (the brain-mask network's target; manifest column intracranial)")
    parser.add_argument("--ventricles", action="store_true", help="also write each case's lateral-ventricle "
                        "mask (the ventricle network's target; manifest column ventricles)")
    parser.add_argument("--graded-rims", type=unit_interval, default=0.0, metavar="P",
                        help="probability that a case's lesions are brighter in their core than at "
                        "their edge (default 0, as the data sets behind models v1-v4)")
    parser.add_argument("--skull-base-mimics", type=unit_interval, default=0.0, metavar="P",
                        help="probability that a case gets bright, unlabelled patches on the cortex "
                        "next to the skull base, as real FLAIR often shows (default 0)")
    parser.add_argument("--dark-deep-grey", type=unit_interval, default=0.0, metavar="P",
                        help="probability that a case's basal ganglia and thalami are darker than white matter, "
                        "as iron makes them on many real FLAIRs (default 0)")
    parser.add_argument("--backgrounds", nargs="+", type=Path, metavar="FLAIR",
                        help="insert the synthetic lesions into these real FLAIR scans (files or folders) "
                        "instead of drawing whole images; masks mark the scans' own probable lesions 2 "
                        "(train with --ignore-label 2); see DeepWMLLib/realbg.py")
    parser.add_argument("--faint-ignore", type=float, default=None, metavar="RATIO",
                        help="with --backgrounds: also mark 2 the deep white matter at least RATIO times as "
                        "bright as the local normal white matter (faint lesions the WMH model may miss; "
                        "default 1.12; 0: only what the WMH model marks, as the sets behind models v6 and v7)")
    parser.add_argument("--own-lesions", action="store_true",
                        help="with --backgrounds: label the scans' own confident lesions (the WMH model >= 0.5) "
                        "and their faint rims as lesion (pseudo-labels) instead of leaving them out")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the data set an output folder already holds: delete the files its "
                        "manifest lists, then write the new one (default: refuse)")
    add_debug_flag(parser)
    parser.set_defaults(func=_run)


def _remove_data_set(folder: Path) -> None:
    """Delete the files an earlier data set's manifest lists inside `folder`, then the manifest."""
    manifest = folder / "manifest.csv"
    root = folder.resolve()
    with open(manifest, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for column in ("flair", "mask", "intracranial", "ventricles"):
            if row.get(column):
                path = (folder / row[column]).resolve()
                if path.parent == root and path.is_file():  # only files of the data set itself
                    path.unlink()
    manifest.unlink()


def _run(args: argparse.Namespace) -> int:
    from .cli import end_progress_line, progress_line

    terminal = bool(getattr(sys.stderr, "isatty", lambda: False)())

    def progress(fraction: float, message: str) -> None:
        line = f"[{'#' * int(fraction * 30):<30}] {message}"
        # open on a terminal only: in a log (2> file) say's clearing around a warning was blanks and a copy of it
        progress_line(sys.stderr, line if terminal else None, f"\r{line}")

    # Every usage check first: an earlier data set is deleted (with --overwrite) only for a run that will go on.
    if args.backgrounds:
        other = [flag for flag, value in (("--intracranial", args.intracranial), ("--ventricles", args.ventricles),
                                          ("--graded-rims", args.graded_rims), ("--dark-deep-grey", args.dark_deep_grey),
                                          ("--skull-base-mimics", args.skull_base_mimics), ("--matrix", args.matrix),
                                          ("--thickness", args.thickness)) if value]
        if args.faint_ignore is not None and args.faint_ignore != 0 and args.faint_ignore <= 1:
            raise UsageError(f"--faint-ignore must be above 1 (a brightness ratio) or 0 (off), got {args.faint_ignore:g}")
        if other:
            raise UsageError(f"{', '.join(other)} cannot be combined with --backgrounds (the scans bring "
                             "their own anatomy, head and acquisition)")
    elif args.own_lesions or args.faint_ignore is not None:
        raise UsageError("--own-lesions and --faint-ignore need --backgrounds (they concern real scans' own lesions)")
    clear = None
    if (args.output / "manifest.csv").is_file():
        if not args.overwrite:
            raise DeepWMLError(f"{args.output} holds a data set already (manifest.csv); choose another folder, or "
                               "pass --overwrite to replace it")
        # what the run needs, checked before the old set goes: a background's typo, backgrounds none of which can
        # be used, or missing shared data refused the run only after the old set had been deleted
        if args.backgrounds:
            clear = functools.partial(_remove_data_set, args.output)  # called once generate_on_backgrounds has checked
        else:
            _require_shared_dir()
            _remove_data_set(args.output)
    if args.backgrounds:
        from .realbg import generate_on_backgrounds

        options = {} if args.faint_ignore is None else {"faint_ratio": args.faint_ignore or None}
        manifest = generate_on_backgrounds(args.backgrounds, args.cases, args.output, args.seed, progress=progress,
                                           own_lesions=args.own_lesions, clear=clear, **options)
    else:
        manifest = generate_dataset(args.cases, args.output, args.seed, progress=progress, workers=args.workers,
                                    matrix=args.matrix, slice_thickness=args.thickness,
                                    intracranial=args.intracranial, ventricles=args.ventricles,
                                    graded_rims=args.graded_rims, dark_deep_grey=args.dark_deep_grey,
                                    skull_base_mimics=args.skull_base_mimics)
    if terminal:
        end_progress_line()
    else:
        print(file=sys.stderr)  # the log's last progress line ended
    print(manifest)
    return 0


def main(argv=None) -> int:
    from .cli import main as cli_main
    return cli_main(["synth", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
