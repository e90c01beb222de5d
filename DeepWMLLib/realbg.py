"""Synthetic lesions inserted into real FLAIR scans ("real backgrounds"), for training.

`synth` draws every voxel of its images from one template, so a network trained on it alone has
never seen real anatomy, real normal FLAIR brightness (cortex at the skull base, flow, vessels) or a
real scanner's texture. Here the image is a real scan and only the lesions are synthetic:

- Each background is analysed once: the shipped brain-mask network gives its intracranial space,
  an affine registration of that space to the template's maps the template (MNI) into the scan,
  and the shipped WMH model (or default ensemble), at a low threshold (0.2), marks where the scan
  probably has lesions of its own, which nobody labelled; so does deep white matter (template white
  matter >= 0.9, >= 15 mm inside the intracranial space) at least 1.12 x as bright as the local
  normal-appearing white matter (`faint_hyperintensities`): faint lesions that model may not mark,
  which must not train as background next to painted faint lesions that train as lesion.
- Each case draws lesions exactly as `synth` does (real lesion shapes from the open MS library,
  never the evaluation patients, plus procedural caps, bands and punctate lesions), carries them
  through the registration onto the scan's grid with its slice profile (5 sub-slices averaged per
  slice), keeps them where the scan looks like white matter (inside the intracranial space, 3 mm or
  more from its edge, not darker (smoothed in-plane) than 0.85 of the deep tissue's median, away from the marked
  voxels), and brightens the scan there: intensity × (1 + partial volume × (contrast - 1)), so the
  scan's own texture and noise stay. Contrast over the tissue: 1.12-1.3 in three cases in ten
  (faint), else 1.3-2.0, varied by smooth noise (0.8-1.2) and, in 60 % of the non-faint cases,
  graded from 0.35-0.65 of full at the lesion edge to full 1.5-4 mm inside (as `synth --graded-rims`).
- The mask: 1 where the inserted lesion fills at least half a voxel; IGNORE_VALUE (2) on the voxels
  the WMH model marked inside the intracranial space (dilated by 1 voxel in-plane): the scan's own
  lesions, which must count as neither lesion nor background. Train with `--ignore-label 2`.

Outputs keep each background's exact grid (size, spacing, origin, direction), as float32 NIfTI.
"""

from __future__ import annotations

import csv
import time
import warnings
from dataclasses import dataclass
from io import StringIO
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from . import io
from .errors import Cancelled, DeepWMLError

IGNORE_VALUE = 2
SUBSLICES = 5
MARK_THRESHOLD = 0.2
FAINT_RATIO = 1.12  # white matter this much brighter than the local normal white matter is marked too
CORE_WHITE = 0.9  # template white matter probability of the core white matter, where faint marks may go
OWN_RIM_MM = 2.0  # how far (in-plane) a confident own lesion's faint rim may reach
FAINT_DEPTH_MM = 15.0  # ... and this deep inside the intracranial space (away from the cortex)
MIN_OVERLAP = 0.8  # Dice of the registered template intracranial space with the scan's

MANIFEST_COLUMNS = ("case", "flair", "mask", "centre", "disease", "lesion_ml", "ignored_ml", "background",
                    "lesion_source", "contrast", "graded_rims", "marked_by", "faint_ratio", "own_lesion_ml")


@dataclass
class Background:
    """A real scan analysed once: its axial stack, masks and the affine from it to the template."""

    name: str
    image: sitk.Image  # float32, the scan's grid
    stack: np.ndarray  # [slice, row, col]
    frame: io.SliceFrame
    intracranial: np.ndarray  # bool stack
    marked: np.ndarray  # bool stack: the scan's own probable lesions (inside the intracranial space)
    plausible: np.ndarray  # float stack in [0, 1]: where inserted lesions may go
    to_template: sitk.Transform  # scan physical point -> template physical point
    overlap: float  # Dice of the registered template intracranial space with the scan's
    own: Optional[np.ndarray] = None  # bool stack: the scan's own lesions labelled lesion (pseudo-labels), if asked


def _register(scan_icv: sitk.Image, template_icv: sitk.Image) -> sitk.Transform:
    """Affine from the scan's to the template's physical space, matching intracranial masks."""
    fixed = sitk.SmoothingRecursiveGaussian(scan_icv, 2.0)
    moving = sitk.SmoothingRecursiveGaussian(template_icv, 2.0)
    initial = sitk.CenteredTransformInitializer(fixed, moving, sitk.AffineTransform(3),
                                                sitk.CenteredTransformInitializerFilter.MOMENTS)
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMeanSquares()
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(0.2, seed=1)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-4, numberOfIterations=200,
                                                    gradientMagnitudeTolerance=1e-8)
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel([4, 2])
    method.SetSmoothingSigmasPerLevel([2.0, 1.0])
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    method.SetInitialTransform(initial, inPlace=False)
    return method.Execute(fixed, moving)


def analyse_background(path: Union[str, Path], atlas, models, brain_model,
                       faint_ratio: Optional[float] = FAINT_RATIO, own_lesions: bool = False) -> Background:
    """Read a real FLAIR and prepare it as a background (see the module docstring). `faint_ratio`:
    white matter this much brighter than the local normal-appearing white matter is marked as well
    (None or 0: only what the WMH model marks). `own_lesions`: the scan's confident lesions and their
    faint rims (`own_lesion_labels`) become lesion labels (pseudo-labels) instead of being ignored."""
    from .inference import predict_maps

    path = Path(path)
    image = sitk.Cast(io.read_image(path), sitk.sitkFloat32)
    lesion, brain, _, frame = predict_maps(image, models, brain_model, "cpu")
    stack, frame = io.to_axial_stack(image)
    intracranial = brain > 0.5
    if intracranial.sum() < 1000:
        raise DeepWMLError(f"{path}: the brain-mask network found no intracranial space; not usable as a background")
    template_icv = sitk.GetImageFromArray((atlas.icv > 0.5).astype(np.float32))
    template_icv.CopyInformation(atlas.reference)
    scan_icv = io.from_axial_stack(intracranial.astype(np.float32), frame)
    transform = _register(scan_icv, template_icv)
    back = sitk.Resample(template_icv, scan_icv, transform, sitk.sitkLinear, 0.0)
    registered = io.to_axial_stack(back)[0] > 0.5
    overlap = 2 * float((registered & intracranial).sum()) / max(1.0, float(registered.sum() + intracranial.sum()))

    spacing = (frame.slice_thickness_mm, frame.row_spacing_mm, frame.col_spacing_mm)
    depth = ndimage.distance_transform_edt(intracranial, sampling=spacing)
    # Judged on the image smoothed in-plane, so that noise does not punch holes into a lesion.
    smooth = ndimage.gaussian_filter(stack, sigma=(0, 1.5, 1.5))
    marked = (lesion > MARK_THRESHOLD) & intracranial
    white = template_on_scan(atlas.wm, atlas, image, transform) if (faint_ratio or own_lesions) else None
    own = (own_lesion_labels(lesion, stack, smooth, intracranial, depth, marked, white, spacing,
                             faint_ratio or FAINT_RATIO) if own_lesions else None)
    if faint_ratio:
        marked |= faint_hyperintensities(stack, smooth, intracranial & (depth >= FAINT_DEPTH_MM), marked, white, spacing,
                                         faint_ratio)
    marked = ndimage.binary_dilation(marked, structure=np.array([[[0, 1, 0], [1, 1, 1], [0, 1, 0]]], bool),
                                     iterations=1)
    marked &= intracranial
    if own is not None:
        marked |= own
    deep = (depth >= 10) & ~marked
    tissue = float(np.median(stack[deep])) if deep.any() else float(np.median(stack[intracranial]))
    # Softened at its edges, so that an inserted lesion fades out where the white matter ends.
    allowed = intracranial & ~marked & (depth >= 3) & (smooth >= 0.85 * tissue)
    plausible = np.clip(ndimage.gaussian_filter(allowed.astype(np.float32), sigma=(0, 0.7, 0.7)), 0, 1) * allowed
    return Background(io.case_name(path), image, stack, frame, intracranial, marked, plausible, transform, overlap,
                      own)


def _local_level(stack: np.ndarray, normal: np.ndarray, spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """(level, weight): the Gaussian-weighted mean intensity of the `normal` voxels over about 15 mm
    around each voxel (so that a bias field does not count), and how much normal tissue backs it."""
    sigma = tuple(15.0 / s for s in spacing)
    weight = ndimage.gaussian_filter(normal.astype(np.float32), sigma)
    level = ndimage.gaussian_filter(np.where(normal, stack, 0).astype(np.float32), sigma) / np.maximum(weight, 1e-6)
    return level, weight


def own_lesion_labels(lesion: np.ndarray, stack: np.ndarray, smooth: np.ndarray, intracranial: np.ndarray,
                      depth: np.ndarray, marked: np.ndarray, white: np.ndarray, spacing: Sequence[float],
                      ratio: float) -> np.ndarray:
    """Pseudo-labels of a scan's own lesions: where the WMH model is confident (>= 0.5), grown by their
    faint rims (voxels within OWN_RIM_MM in-plane of one, 3 mm or more inside the intracranial space,
    whose smoothed intensity is at least `ratio` x the local normal-appearing white matter), which
    raters outline and a model trained on drawn lesions tends to leave out."""
    seeds = (lesion >= 0.5) & intracranial
    inside = intracranial & (depth >= 3)
    level, weight = _local_level(stack, inside & (white >= CORE_WHITE) & ~marked, spacing)
    bright = inside & (weight > 0.05) & (smooth >= ratio * level)
    near = np.zeros_like(seeds)
    for k in np.flatnonzero(seeds.any(axis=(1, 2))):
        near[k] = ndimage.distance_transform_edt(~seeds[k], sampling=spacing[1:]) <= OWN_RIM_MM
    return seeds | (bright & near)


def faint_hyperintensities(stack: np.ndarray, smooth: np.ndarray, inside: np.ndarray, marked: np.ndarray,
                           white: np.ndarray, spacing: Sequence[float], ratio: float) -> np.ndarray:
    """Core white matter (template probability >= CORE_WHITE on the scan) whose in-plane smoothed
    intensity is at least `ratio` times the local normal-appearing white matter (core white matter, not
    marked; `_local_level`): faint hyperintensities the WMH model may not mark, which a rater may well
    call lesion."""
    local, weight = _local_level(stack, inside & (white >= CORE_WHITE) & ~marked, spacing)
    return inside & (white >= CORE_WHITE) & (weight > 0.05) & (smooth >= ratio * local)


def _fine_reference(image: sitk.Image) -> tuple[sitk.Image, int]:
    """The image's grid with SUBSLICES sub-slices across each slice of its acquisition axis."""
    axis = io.acquisition_axis(image)
    spacing, size = list(image.GetSpacing()), list(image.GetSize())
    direction = np.array(image.GetDirection()).reshape(3, 3)
    shift = direction[:, axis] * spacing[axis] * (-(SUBSLICES - 1) / (2 * SUBSLICES))
    spacing[axis] /= SUBSLICES
    size[axis] *= SUBSLICES
    fine = sitk.Image(size, sitk.sitkFloat32)
    fine.SetSpacing(spacing)
    fine.SetDirection(image.GetDirection())
    fine.SetOrigin(tuple(np.array(image.GetOrigin()) + shift))
    return fine, axis


def lesion_fraction_on_scan(lesions: np.ndarray, atlas, background: Background) -> np.ndarray:
    """A template-grid lesion fraction carried onto the scan's slices (axial stack), slice profile included."""
    return template_on_scan(lesions, atlas, background.image, background.to_template)


def template_on_scan(values: np.ndarray, atlas, image: sitk.Image, to_template: sitk.Transform) -> np.ndarray:
    """A template-grid map carried onto the slices of `image` (axial stack), slice profile included."""
    template = sitk.GetImageFromArray(values.astype(np.float32))
    template.CopyInformation(atlas.reference)
    fine, axis = _fine_reference(image)
    sampled = sitk.GetArrayFromImage(sitk.Resample(template, fine, to_template, sitk.sitkLinear, 0.0))
    numpy_axis = 2 - axis
    shape = list(sampled.shape)
    shape[numpy_axis:numpy_axis + 1] = [shape[numpy_axis] // SUBSLICES, SUBSLICES]
    averaged = sampled.reshape(shape).mean(axis=numpy_axis + 1)
    on_scan = sitk.GetImageFromArray(averaged.astype(np.float32))
    on_scan.CopyInformation(image)
    return io.to_axial_stack(on_scan)[0]


def _depth_in_plane(label: np.ndarray, frame: io.SliceFrame) -> np.ndarray:
    """Each lesion voxel's in-plane distance (mm) to the lesion's edge, slice by slice (thick slices)."""
    depth = np.zeros(label.shape, np.float32)
    for k in np.flatnonzero(label.any(axis=(1, 2))):
        depth[k] = ndimage.distance_transform_edt(label[k], sampling=(frame.row_spacing_mm, frame.col_spacing_mm))
    return depth


def insert_case(rng: np.random.Generator, background: Background, atlas, library: Sequence[Path]) -> tuple:
    """(image, mask, meta) of one case on `background`: synthetic lesions painted into the scan."""
    from .synth import DISEASES, _paint_lesions, _rim_factor, _smooth_noise

    disease = str(rng.choice(DISEASES, p=[0.25, 0.35, 0.4]))
    lesions, meta = _paint_lesions(rng, atlas, disease, list(library))
    fraction = lesion_fraction_on_scan(lesions, atlas, background) * background.plausible
    painted = fraction >= 0.5
    faint = bool(rng.random() < 0.3)
    contrast = rng.uniform(1.12, 1.3) if faint else rng.uniform(1.3, 2.0)
    gain = (contrast - 1) * (0.8 + 0.4 * _smooth_noise(rng, fraction.shape, 4))
    graded = (not faint) and bool(rng.random() < 0.6)
    if graded:
        gain = gain * _rim_factor(rng, _depth_in_plane(painted, background.frame))
    stack = background.stack * (1 + fraction * gain)
    label = painted if background.own is None else painted | background.own
    mask = np.where(label, 1, np.where(background.marked, IGNORE_VALUE, 0)).astype(np.uint8)
    voxel_ml = background.frame.slice_thickness_mm * background.frame.pixel_area_mm2 / 1000
    meta.update(disease=disease, lesion_ml=round(float(painted.sum()) * voxel_ml, 3),
                own_lesion_ml=round(float(background.own.sum()) * voxel_ml, 3) if background.own is not None else 0.0,
                ignored_ml=round(float((mask == IGNORE_VALUE).sum()) * voxel_ml, 3), background=background.name,
                contrast=round(float(contrast), 3), graded_rims=int(graded))
    image = io.from_axial_stack(stack.astype(np.float32), background.frame)
    mask_image = io.from_axial_stack(mask, background.frame)
    return image, mask_image, meta


def background_files(backgrounds: Sequence[Union[str, Path]]) -> list[Path]:
    """The image files the backgrounds given stand for (a folder: the images in it); refused when one does not
    exist or none is found."""
    files = []
    for b in backgrounds:
        b = Path(b)
        if b.is_dir():
            files += sorted(p for p in b.iterdir() if io.is_image_file(p))
        elif b.is_file():
            files.append(b)
        else:
            raise DeepWMLError(f"background {b} does not exist")
    if not files:
        raise DeepWMLError("no background scans found; give real FLAIR files or folders of them")
    return files


def readable_backgrounds(files: Sequence[Path]) -> list[Path]:
    """The background files that read as a FLAIR volume (io.read_image: not damaged, 3D, not constant, not a label
    mask); one that does not is left out with a warning, and none refused: a cheap check, made before the
    templates and networks load and each scan's analysis (which reads it again, so that the scans are not all held
    in memory at once)."""
    readable = []
    for f in files:
        try:
            io.read_image(f)
        except DeepWMLError as exc:
            warnings.warn(f"background left out: {exc}", stacklevel=2)
            continue
        readable.append(f)
    if not readable:
        raise DeepWMLError(_none_usable(files))
    return readable


def _none_usable(files: Sequence[Path]) -> str:
    return f"none of the {len(files)} background scan(s) could be used (see the warnings above)"


def generate_on_backgrounds(backgrounds: Sequence[Union[str, Path]], n: int, out_dir: Union[str, Path], seed: int = 0,
                            progress: Optional[Callable[[float, str], None]] = None,
                            cancel: Optional[Callable[[], bool]] = None,
                            faint_ratio: Optional[float] = FAINT_RATIO, own_lesions: bool = False,
                            clear: Optional[Callable[[], None]] = None) -> Path:
    """Write `n` cases and `manifest.csv` into `out_dir`. Case i goes on usable background i modulo
    their number (scans that cannot serve are left out with a warning), with lesions drawn from
    (seed, i); the centre column names the background, so a stratified split spreads each scan's cases.
    `clear` is called once the backgrounds are known usable, before anything is written (`deepwml synth
    --overwrite` removes the old data set then: a run refused keeps it)."""
    from .segment import default_model_paths, load_brain_model, load_models
    from .synth import _atlas, _require_shared_dir, case_rng, lesion_library

    if n < 1:
        raise DeepWMLError(f"number of cases must be at least 1, got {n}")
    files = background_files(backgrounds)
    readable = readable_backgrounds(files)
    shared = _require_shared_dir()
    atlas, library = _atlas(shared), lesion_library(shared)
    models, brain_model = load_models(default_model_paths()), load_brain_model("default")
    if brain_model is None:
        raise DeepWMLError("inserting lesions into real scans needs the shipped brain-mask model")
    analysed = []
    for i, f in enumerate(readable):
        if cancel and cancel():
            raise Cancelled()
        if progress:
            progress(0.0, f"analysing background {i + 1}/{len(readable)} ({f.name})")
        try:
            bg = analyse_background(f, atlas, models, brain_model, faint_ratio, own_lesions)
        except DeepWMLError as exc:
            warnings.warn(f"background left out: {exc}", stacklevel=2)
            continue
        if bg.overlap < MIN_OVERLAP:
            warnings.warn(f"background left out: {f}: the template did not register onto it (intracranial "
                          f"overlap {bg.overlap:.2f} < {MIN_OVERLAP})", stacklevel=2)
            continue
        analysed.append(bg)
    if not analysed:
        raise DeepWMLError(_none_usable(files))
    if clear:
        clear()
    out = io.make_output_dir(out_dir)
    started = time.perf_counter()
    marked_by = "+".join(m.name for m in models)  # the default model, or every member of a default ensemble
    rows = []
    for i in range(n):
        if cancel and cancel():
            raise Cancelled()
        bg = analysed[i % len(analysed)]
        image, mask, meta = insert_case(case_rng(seed, i), bg, atlas, library)
        name = f"real{seed}_{i:05d}"
        io.write_image(image, out / f"{name}_flair.nii.gz")
        io.write_image(mask, out / f"{name}_mask.nii.gz")
        rows.append({"case": name, "flair": f"{name}_flair.nii.gz", "mask": f"{name}_mask.nii.gz",
                     "centre": f"real-{bg.name}", **meta, "marked_by": marked_by,
                     "faint_ratio": faint_ratio or 0})
        if progress:
            elapsed = time.perf_counter() - started
            progress((i + 1) / n, f"case {i + 1}/{n} ({elapsed / (i + 1):.1f} s/case)")
    table = StringIO()
    writer = csv.DictWriter(table, fieldnames=list(MANIFEST_COLUMNS), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return io.write_csv_text(table.getvalue(), out / "manifest.csv")
