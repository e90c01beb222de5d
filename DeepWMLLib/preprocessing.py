"""Intensity normalisation and per-slice resampling to the network grid and back.

Normalisation ("head-median-iqr"): the paper works on FLAIR *without* skull stripping, so the
statistics come from a *head* mask (everything clearly above background noise: brain, and scalp and
skull when present), not a brain mask. Voxels are centred on the median of the head and scaled by
its inter-quartile range (as a robust standard deviation, IQR / 1.349). Lesions are a few per cent
of the head even at 50 ml, so median and IQR barely move with lesion load; whether scalp is present
shifts them far less than a mean/std or min/max would. Values are clipped to [-8, 16] so a few
extreme voxels (fat, vessels, artefacts) cannot dominate.

Network grid: every axial slice is resampled in-plane (bilinear, with a Gaussian anti-alias filter
when shrinking by more than 1.2x) to a fixed grid, `grid_size` pixels of `grid_spacing_mm`, centred on the head. A
fixed physical pixel size keeps the brain the same size in network pixels whatever the scanner's
field of view and matrix (256–512, 0.4–1.0 mm); the centre is rounded to a lattice of whole network pixels
fixed in the scanner's space, so a scan cropped or padded on its own voxel grid is sampled at the same points. With `grid_spacing_mm = None` the whole slice field
of view is fitted into the grid instead, as the paper's plain resize to 256×256 did (aspect-preserving;
on a non-square grid the axis with the least room sets the pixel size). Nothing is interpolated
across slices. The network's probabilities are resampled back onto the input's own slice grid with
the inverse mapping; pixels of the input outside the network field of view get probability 0.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from functools import cached_property

import numpy as np

from .io import SliceFrame

_CLIP = (-8.0, 16.0)

# A slice whose head covers less than this fraction of its pixels holds no brain worth segmenting
# (air above the vertex, the neck): inference skips it, training never sees it.
MIN_HEAD_FRACTION = 0.005
# An adult head measures about 230 mm from the vertex to the chin, and the brain ends some 150 mm below
# the vertex (the cerebellum; a head tilted 30 degrees reaches about 190 mm). Slices further below the top
# of the head hold the neck and shoulders of a large-coverage scan (a sagittal 3D FLAIR, a head-and-neck
# protocol): they are not segmented, and their wide soft tissue stays out of the head mask, so it moves
# neither the normalisation statistics nor the network grid's centre (on a real scan padded with 150 mm
# of neck and shoulders, the IQR scale rose 17 % and the lesion mask's Dice fell to 0.87).
HEAD_HEIGHT_MM = 200.0


@dataclass(frozen=True)
class PreprocessingConfig:
    normalisation: str = "head-median-iqr"
    grid_size: tuple = (256, 256)
    grid_spacing_mm: float | None = 0.9

    def to_dict(self) -> dict:
        d = asdict(self)
        d["grid_size"] = list(self.grid_size)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PreprocessingConfig":
        d = dict(d or {})
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown preprocessing settings {sorted(unknown)}")
        cfg = cls(**d)
        if cfg.normalisation != "head-median-iqr":
            raise ValueError(f"unknown normalisation {cfg.normalisation!r}")
        size = tuple(int(v) for v in cfg.grid_size)
        if len(size) != 2 or min(size) < 16:
            raise ValueError(f"grid_size must be two integers >= 16, got {cfg.grid_size!r}")
        spacing = None if cfg.grid_spacing_mm is None else float(cfg.grid_spacing_mm)
        if spacing is not None and not spacing > 0:
            raise ValueError(f"grid_spacing_mm must be positive, got {cfg.grid_spacing_mm!r}")
        return cls(cfg.normalisation, size, spacing)


def percentiles(values: np.ndarray, q) -> np.ndarray:
    """np.percentile(values, q) (linear interpolation) by partial sorting. The same numbers; it only
    skips the np.unique call inside np.percentile that imports numpy.ma, 20 ms of every start-up."""
    flat, position, low, high = _percentile_ranks(values, q)
    part = np.partition(flat, sorted(set(low.tolist()) | set(high.tolist())))
    return _interpolated(part[low], part[high], position, low)


def tail_percentiles(values: np.ndarray, q) -> np.ndarray:
    """percentiles(values, q), the same numbers, for q in the tails (the image's black, 0.5, and top, 99.5): each tail
    is partially sorted alone, the values beyond a bound that a sample of every TAIL_STRIDE-th value sets, and not
    at all when the ranks wanted all hold the bound itself (a scan's air, 0 over half of it): 1 ms against 7-9 for
    the 1.6 M voxels of `deepwml bench`'s scan. `values` is left as it is."""
    flat, position, low, high = _percentile_ranks(values, q)
    found = _ranked_values(flat, np.concatenate([low, high]))
    return _interpolated(found[:low.size], found[low.size:], position, low)


def _percentile_ranks(values: np.ndarray, q):
    """`values` flattened, and the place of each percentile of `q` among them sorted (np.percentile's linear
    interpolation): the place, and the ranks just below and above it."""
    flat = np.asarray(values).ravel()
    q = np.atleast_1d(np.asarray(q, dtype=np.float64))
    if flat.size == 0:
        raise ValueError("percentiles of an empty array")
    position = q / 100 * (flat.size - 1)
    low = np.floor(position).astype(np.intp)
    return flat, position, low, np.minimum(low + 1, flat.size - 1)


def _interpolated(a: np.ndarray, b: np.ndarray, position: np.ndarray, low: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return a + (b - a) * (position - low)


TAIL_STRIDE = 64  # tail_percentiles' sample: every this many values


def _ranked_values(flat: np.ndarray, ranks: np.ndarray) -> np.ndarray:
    """np.sort(flat)[ranks] (NaN sorting last, as np.sort and np.partition place it), taking the ranks below and above
    the middle apart: those of one side from the values up to (down to) a bound that a sample sets beyond the
    farthest of them, or all of `flat` where that bound falls short (ranks near the middle, an unlucky sample)."""
    n = flat.size
    found = np.empty(ranks.size, flat.dtype)
    sample = flat[::TAIL_STRIDE].copy()
    for lower in (True, False):
        side = ranks < n // 2 if lower else ranks >= n // 2
        if not side.any():
            continue
        wanted = ranks[side]
        reach = wanted.max() if lower else n - 1 - wanted.min()  # the ranks' farthest from that side's end
        j = min(sample.size - 1, 2 * (int(reach) // TAIL_STRIDE) + 16)
        bound = np.partition(sample, j if lower else sample.size - 1 - j)[j if lower else sample.size - 1 - j]
        below = np.count_nonzero(flat < bound)  # the first ranks; NaN is neither below nor at the bound
        at = np.count_nonzero(flat == bound)  # the ranks after those hold the bound
        if below <= wanted.min() and wanted.max() < below + at:
            found[side] = bound
            continue
        if lower and wanted.max() < below + at:  # every rank wanted among the values up to the bound
            part, first = flat[flat <= bound], 0
        elif not lower and below <= wanted.min():  # ... among those from the bound on (NaN included)
            part, first = flat[~(flat < bound)], below
        else:
            part, first = flat.copy(), 0
        part.partition(wanted - first)
        found[side] = part[wanted - first]
    return found


def median(values: np.ndarray) -> np.floating:
    """np.median(values): the same number (np.mean of the middle one or two values of a partial sort, in the values'
    own precision; NaN where one is NaN), without np.median's check for NaN, which imports numpy.ma (10-20 ms of a
    `deepwml segment` run, the FLAIR check's only use of it)."""
    flat = np.asarray(values).ravel()
    if flat.size == 0:
        raise ValueError("the median of an empty array")
    half = flat.size // 2
    middle = [half - 1, half] if flat.size % 2 == 0 else [half]
    inexact = flat.dtype.kind in "fc"
    part = np.partition(flat, middle + [-1] if inexact else middle)  # NaN sorts last, as np.median finds it
    if inexact and np.isnan(part[-1]):
        return part[-1]
    return np.mean(part[middle[0]:half + 1])


def _index_percentiles(counts: np.ndarray, q) -> np.ndarray:
    """np.percentile(np.repeat(np.arange(counts.size), counts), q) without building the repeat."""
    cumulative = np.cumsum(counts)
    position = np.asarray(q, dtype=np.float64) / 100 * (cumulative[-1] - 1)
    low = np.floor(position)
    a = np.searchsorted(cumulative, low, side="right")
    b = np.searchsorted(cumulative, np.minimum(low + 1, cumulative[-1] - 1), side="right")
    return a + (b - a) * (position - low)


# A stack of another voxel type than float32 (a uint16 or float64 scan, as the Slicer module and Python callers give
# segment_image) is read as float32 this many voxels at a time: the values of a float32 copy of the volume, without
# one (4 bytes a voxel, held beside the caller's scan through the networks)
SLAB_VOXELS = 1 << 22


def _float32_slabs(stack: np.ndarray):
    """(first slice, its slab of a few slices as float32) over the stack: views of a float32 stack, copies of others'."""
    step = max(1, SLAB_VOXELS // max(1, int(np.prod(stack.shape[1:]))))
    for first in range(0, stack.shape[0], step):
        yield first, np.asarray(stack[first:first + step], dtype=np.float32)


def _above(stack: np.ndarray, level) -> np.ndarray:
    """`stack > level` as the stack's float32 values compare, whatever its voxel type."""
    above = np.empty(stack.shape, dtype=bool)
    for first, slab in _float32_slabs(stack):
        np.greater(slab, level, out=above[first:first + len(slab)])
    return above


def head_mask(stack: np.ndarray) -> np.ndarray:
    """Voxels clearly above background: an Otsu threshold on a subsample, robust to hot voxels. The stack's values
    are read as float32, as the networks read them, whatever its voxel type."""
    sample = stack[::2, ::3, ::3].ravel() if stack.size > 2_000_000 else stack.ravel()
    sample = np.asarray(sample, dtype=np.float32)
    hi = percentiles(sample, 99.5)[0]
    lo = sample.min()
    above = sample[sample > lo] if lo < 0 else sample[:0]
    if above.size:
        # Reslice padding (e.g. -32768 in a band of rows) or a stray voxel far below everything else would
        # squeeze the whole scan into the histogram's top bins: then the range starts at the rest's bottom.
        # Only below zero, where MR intensities are not: a background of exactly 0 is the scan's own.
        floor = percentiles(above, 0.5)[0]
        if floor - lo > hi - floor:
            lo = floor
    if hi <= lo:
        return _above(stack, lo)
    hist, edges = np.histogram(np.clip(sample, lo, hi), bins=128, range=(lo, hi))
    centres = (edges[:-1] + edges[1:]) / 2
    weights = hist.astype(np.float64)
    w0 = np.cumsum(weights)
    w1 = w0[-1] - w0
    m0 = np.cumsum(weights * centres) / np.maximum(w0, 1)
    m1 = (np.sum(weights * centres) - np.cumsum(weights * centres)) / np.maximum(w1, 1)
    between = w0 * w1 * (m0 - m1) ** 2
    threshold = centres[int(np.argmax(between))]
    return _above(stack, threshold)


def intensity_reference(stack: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """(centre, scale) of the normalisation: the head's median and IQR / 1.349, of its float32 values."""
    values = _sampled(stack, mask if mask.any() else None)
    q25, median, q75 = percentiles(values, [25, 50, 75])
    scale = (q75 - q25) / 1.349
    if not scale > 0:
        scale = float(values.std()) or 1.0
    return float(median), float(scale)


def _sampled(stack: np.ndarray, mask: np.ndarray | None, most: int = 1_000_000) -> np.ndarray:
    """`stack[mask]` (with no mask, all of the stack) as float32, and of its n values every (n // `most`)-th from the
    first when n > `most`; picked a slab at a time: no copy of all the head's voxels, nor of the volume as float32."""
    count = stack.size if mask is None else int(np.count_nonzero(mask))
    step = count // most if count > most else 1
    parts, seen = [], 0
    for first, slab in _float32_slabs(stack):
        picked = slab.ravel() if mask is None else slab[mask[first:first + len(slab)]]
        parts.append(picked[(-seen) % step::step])
        seen += picked.size
    return np.concatenate(parts)


def apply_normalisation(stack: np.ndarray, centre: float, scale: float) -> np.ndarray:
    out = (np.asarray(stack, dtype=np.float32) - np.float32(centre)) / np.float32(scale)
    return np.clip(out, *_CLIP, out=out)


def normalise_intensity(stack: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Median/IQR normalisation over the head (see module docstring). Returns float32."""
    stack = np.asarray(stack, dtype=np.float32)
    return apply_normalisation(stack, *intensity_reference(stack, head_mask(stack) if mask is None else mask))


@dataclass(frozen=True)
class NetworkGrid:
    """The in-plane affine map between one volume's axial slices and the network grid."""

    input_shape: tuple  # (rows, cols) of the input slices
    grid_size: tuple  # (rows, cols) of the network grid
    zoom: tuple  # input pixels per network pixel, (rows, cols)
    offset: tuple  # input (row, col) coordinate of network pixel (0, 0)

    @classmethod
    def plan(cls, frame: SliceFrame, config: PreprocessingConfig, mask: np.ndarray | None = None) -> "NetworkGrid":
        rows = frame.size[frame.row_axis]
        cols = frame.size[frame.col_axis]
        spacing = np.array([frame.row_spacing_mm, frame.col_spacing_mm])
        grid = np.array(config.grid_size, dtype=float)
        if config.grid_spacing_mm is None:
            pixel = float(max(rows * spacing[0] / grid[0], cols * spacing[1] / grid[1]))  # the whole slice fits
            centre = np.array([(rows - 1) / 2, (cols - 1) / 2])
        else:
            pixel = float(config.grid_spacing_mm)
            centre = _on_scanner_lattice(_head_centre(mask, rows, cols), frame, grid_centre_step_mm(pixel))
        zoom = pixel / spacing
        offset = centre - (grid - 1) / 2 * zoom
        return cls((rows, cols), tuple(int(g) for g in grid), tuple(zoom.tolist()), tuple(offset.tolist()))

    def shifted(self, rows: float, cols: float) -> "NetworkGrid":
        """This grid moved by (`rows`, `cols`) of its own pixels (fractions too) over the input slices."""
        return replace(self, offset=(self.offset[0] + rows * self.zoom[0], self.offset[1] + cols * self.zoom[1]))

    def to_network(self, stack: np.ndarray) -> np.ndarray:
        """[n, rows, cols] input slices -> [n, H, W] network slices (float32).

        Linear interpolation (outside the input: the slice's minimum), after a Gaussian
        anti-aliasing blur along axes that are shrunk by more than 1.2×.
        """
        stack = np.asarray(stack, dtype=np.float32)
        rows, cols, outside = self._network_taps
        out = _apply(stack, rows, cols)
        if outside.any():
            out[:, outside] = stack.reshape(stack.shape[0], -1).min(axis=1)[:, None]
        return out

    def to_input(self, stack: np.ndarray) -> np.ndarray:
        """[n, H, W] network maps -> [n, rows, cols] on the input slice grid (float32, 0 outside)."""
        rows, cols = self._input_taps
        return _apply(np.asarray(stack, dtype=np.float32), rows, cols)

    # The sampling taps depend on the grid only: built once per volume, not once per chunk of slices.
    @cached_property
    def _network_taps(self):
        sigma = [0.5 * np.sqrt(z * z - 1) if z > 1.2 else 0.0 for z in self.zoom]
        rows, row_inside = _axis_matrix(self.grid_size[0], self.input_shape[0], self.zoom[0], self.offset[0], sigma[0])
        cols, col_inside = _axis_matrix(self.grid_size[1], self.input_shape[1], self.zoom[1], self.offset[1], sigma[1])
        return _taps(rows), _taps(cols), ~(row_inside[:, None] & col_inside[None, :])

    @cached_property
    def _input_taps(self):
        inv_zoom = 1.0 / np.array(self.zoom)
        inv_offset = -np.array(self.offset) * inv_zoom
        rows, _ = _axis_matrix(self.input_shape[0], self.grid_size[0], inv_zoom[0], inv_offset[0], 0.0)
        cols, _ = _axis_matrix(self.input_shape[1], self.grid_size[1], inv_zoom[1], inv_offset[1], 0.0)
        return _taps(rows), _taps(cols)


def _gaussian_matrix(n: int, sigma: float) -> np.ndarray:
    """[n, n] Gaussian blur along one axis (truncated at 4 sigma, edges repeated), as a matrix."""
    radius = int(4.0 * sigma + 0.5)
    taps = np.arange(-radius, radius + 1)
    weights = np.exp(-0.5 * (taps / sigma) ** 2)
    weights /= weights.sum()
    matrix = np.zeros((n, n))
    source = np.clip(np.arange(n)[:, None] + taps[None, :], 0, n - 1)
    np.add.at(matrix, (np.repeat(np.arange(n), taps.size), source.ravel()), np.tile(weights, n))
    return matrix


def _axis_matrix(n_out: int, n_in: int, zoom: float, offset: float, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """Linear interpolation at input coordinates offset + zoom × (0..n_out-1) as an [n_out, n_in]
    matrix (rows outside the input are zero; `inside` marks the others), after an optional blur.

    The same sampling as scipy.ndimage.affine_transform(order=1, mode="constant") along one axis;
    applying one such matrix per axis is exact for the axis-aligned maps used here.
    """
    x = offset + zoom * np.arange(n_out, dtype=np.float64)
    inside = (x >= -1e-9) & (x <= n_in - 1 + 1e-9)
    x = np.clip(x, 0, n_in - 1)
    low = np.minimum(np.floor(x).astype(np.int64), max(n_in - 2, 0))
    weight = x - low
    matrix = np.zeros((n_out, n_in))
    index = np.arange(n_out)
    matrix[index, low] = 1.0 - weight
    if n_in > 1:
        matrix[index, low + 1] += weight
    matrix[~inside] = 0.0
    if sigma > 0:
        matrix = matrix @ _gaussian_matrix(n_in, sigma)
    return matrix.astype(np.float32), inside


def _taps(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A banded [n_out, n_in] matrix as (index, weight) arrays of shape [n_out, K]."""
    nonzero = matrix != 0
    k = max(1, int(nonzero.sum(axis=1).max()))
    order = np.argsort(~nonzero, axis=1, kind="stable")[:, :k]
    weight = np.take_along_axis(matrix, order, axis=1)
    return order, weight.astype(np.float32)


def _gather_rows(stack: np.ndarray, taps: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """[n, r, c] -> [n, r', c]: each output row the weighted sum of the input rows its taps name."""
    index, weight = taps
    out = weight[None, :, 0, None] * stack[:, index[:, 0], :]
    for k in range(1, index.shape[1]):
        out += weight[None, :, k, None] * stack[:, index[:, k], :]
    return out


def _apply(stack: np.ndarray, rows: tuple, cols: tuple) -> np.ndarray:
    """rows @ slice @ cols.T for every slice of [n, r, c] (float32), from the matrices' taps.

    The matrices are banded (2 taps, or a short blur kernel), so weighted gathers beat BLAS and
    need no thread pool of their own next to the network's. Both passes gather whole rows (the
    second on the transposed array), which is much faster than gathering columns.
    """
    half = np.ascontiguousarray(_gather_rows(stack, rows).transpose(0, 2, 1))
    return np.ascontiguousarray(_gather_rows(half, cols).transpose(0, 2, 1))

def _head_centre(mask: np.ndarray | None, rows: int, cols: int) -> np.ndarray:
    """Centre of the head's in-plane extent (robust 1st–99th percentile box), else the slice centre."""
    if mask is None or not mask.any():
        return np.array([(rows - 1) / 2, (cols - 1) / 2])
    projection = mask.any(axis=0)
    rr = _index_percentiles(projection.sum(axis=1), [1, 99])
    cc = _index_percentiles(projection.sum(axis=0), [1, 99])
    return np.array([rr.mean(), cc.mean()])


# The network grid's centre is put on a lattice fixed in the scanner's space: whole multiples of this many network
# pixels along the slices' rows and columns. The network's marks change with the sub-pixel phase at which the
# slices are sampled (the grid moved by half a 0.72 mm pixel: lesion Dice 0.87 and 0.93 against the unmoved grid's
# on two clinical scans), and the head's centre moves by such fractions when a scan is cropped or padded on its
# own voxel grid (the top 25 mm cut off: Dice 0.89). A step of whole network pixels puts every grid's pixels on
# one lattice of points, so a crop that moves the head's centre to the next lattice point shifts the grid by whole
# pixels, not by a fraction; 16 of them, the 2 x 2 poolings of a depth-4 U-Net (and of shallower ones), shift its
# max-pool windows by whole windows too (on a clinical scan, lesion Dice against the unmoved grid's: 0.98 for
# 16 pixels, 0.93 for 8, 0.81 for the 8 mm = 8.9 pixels an 8 mm lattice moved it by). The grid stays within half
# a step (7.2 mm at 0.9 mm) of the head's centre: the 11 clinical scans' heads, scalp included, keep 8 mm or
# more inside its 230 mm (10.8 mm on an 8 mm lattice, 14.3 mm at the head's centre). A coarser grid (the brain-mask
# and ventricle networks' 1.8 mm pixels) takes 8 pixels, and so on down, so that no step exceeds
# GRID_CENTRE_STEP_MAX_MM: 16 of its pixels (28.8 mm) put its grid up to 14.4 mm off the head's centre, and the
# ventricle network then marked 6-22 % less of the labelled cases' ventricles.
GRID_CENTRE_STEP_PIXELS = 16
GRID_CENTRE_STEP_MAX_MM = 15.0


def grid_centre_step_mm(pixel_mm: float) -> float:
    """The lattice step of a grid of `pixel_mm` pixels: GRID_CENTRE_STEP_PIXELS of them, halved while over
    GRID_CENTRE_STEP_MAX_MM."""
    pixels = GRID_CENTRE_STEP_PIXELS
    while pixels > 1 and pixels * pixel_mm > GRID_CENTRE_STEP_MAX_MM:
        pixels //= 2
    return pixels * pixel_mm


def _on_scanner_lattice(centre: np.ndarray, frame: SliceFrame, step_mm: float) -> np.ndarray:
    """The stack's (row, col) point nearest `centre` whose scanner coordinates along the stack's rows and columns
    are whole multiples of `step_mm` (the rows and columns are perpendicular to the slices, so the same for every
    slice)."""
    direction = np.array(frame.direction).reshape(3, 3)
    spacing = np.array(frame.spacing, dtype=float)
    corner = np.zeros(3)  # the file index of the stack's pixel (0, 0)
    corner[frame.row_axis] = frame.size[frame.row_axis] - 1 if frame.flip_row else 0
    corner[frame.col_axis] = frame.size[frame.col_axis] - 1 if frame.flip_col else 0
    first = np.array(frame.origin) + direction @ (corner * spacing)
    snapped = []
    for value, axis, flip in ((centre[0], frame.row_axis, frame.flip_row), (centre[1], frame.col_axis, frame.flip_col)):
        start = float(first @ (-direction[:, axis] if flip else direction[:, axis]))  # mm along the stack's axis
        position = np.round((start + value * spacing[axis]) / step_mm) * step_mm
        snapped.append((position - start) / spacing[axis])
    return np.array(snapped)


@dataclass(frozen=True)
class VolumePlan:
    """Everything preprocessing decides once per volume, shared by inference and training."""

    centre: float  # normalisation centre and scale (see intensity_reference)
    scale: float
    kept: np.ndarray  # indices of the slices with enough head to segment
    grids: dict  # PreprocessingConfig -> NetworkGrid
    head_voxels: int = 0  # voxels of the head mask (brain, and scalp and skull when present)
    below_head: int = 0  # slices with head left out as more than HEAD_HEIGHT_MM below the top of the head

    def shifted(self, rows: float, cols: float) -> "VolumePlan":
        """This plan with every network grid moved by (`rows`, `cols`) network pixels (NetworkGrid.shifted)."""
        return replace(self, grids={config: grid.shifted(rows, cols) for config, grid in self.grids.items()})

    def network_slices(self, stack: np.ndarray, indices: np.ndarray, config: PreprocessingConfig) -> np.ndarray:
        """Normalised slices `indices` of the axial stack (its values read as float32) on the network grid of `config`."""
        return self.grids[config].to_network(apply_normalisation(_float32_slices(stack, indices), self.centre,
                                                                 self.scale))


def _float32_slices(stack: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """`stack[indices]` as float32, put in a slice at a time: no copy of a chunk's slices in a wider type first (a
    float64 scan's 8 bytes a voxel)."""
    picked = np.empty((len(indices),) + stack.shape[1:], dtype=np.float32)
    for number, index in enumerate(indices):
        picked[number] = stack[index]
    return picked


def plan_volume(stack: np.ndarray, frame: SliceFrame, configs) -> VolumePlan:
    """Head mask, normalisation statistics, slices to keep and network grids for an axial stack.

    The statistics subsample large volumes; they are taken with the slices running inferior to
    superior whatever order the file stores them in, so a scan stored upside down gives the same result."""
    ascending = frame.inferior_first
    ordered = stack if ascending else stack[::-1]
    head = head_mask(ordered)
    with_head = _slices_with_head(head)
    first = _head_bottom(with_head, frame.slice_thickness_mm)
    below_head = int(np.count_nonzero(with_head < first))  # empty slices below (padding) are not told as left out
    if first:  # the scan reaches below the head: the head mask and its statistics from the head's slices alone
        head[:first] = False
        head[first:] = head_mask(ordered[first:])
    centre, scale = intensity_reference(ordered, head)
    head = head if ascending else head[::-1]
    return VolumePlan(centre, scale, _slices_with_head(head), {c: NetworkGrid.plan(frame, c, head) for c in configs},
                      int(np.count_nonzero(head)), below_head)


def _slices_with_head(head: np.ndarray) -> np.ndarray:
    """Indices of the slices with enough head to segment."""
    return np.flatnonzero(head.reshape(head.shape[0], -1).mean(axis=1) >= MIN_HEAD_FRACTION)


def _head_bottom(with_head: np.ndarray, slice_mm: float) -> int:
    """The first slice (slices running inferior to superior) within HEAD_HEIGHT_MM below the top of the head: the
    highest of `with_head`, the slices with enough head to segment."""
    if not with_head.size:
        return 0
    return max(0, int(with_head[-1]) - int(np.floor(HEAD_HEIGHT_MM / slice_mm + 1e-9)))
