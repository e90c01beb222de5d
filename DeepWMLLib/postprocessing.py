"""From a probability map to the final mask: threshold, edge slices, small components, and
components outside the brain mask.

All steps work on the axial stack (slice, row, col) of `io.to_axial_stack`, so "first/last
slices" means the ends of the axial axis whatever order the file stores its axes in.
"""

from __future__ import annotations

import numpy as np


DEFAULT_MIN_LESION_MM3 = 5.0
# A voxel is intracranial when the brain-mask network gives it at least this probability.
BRAIN_THRESHOLD = 0.5
PAINT_VOXELS = 1 << 24  # label_components paints its labels this many voxels (whole slices) at a time


def _runs(binary: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The foreground as runs along the last axis: row number (k * rows + j), first and last
    column of each run, in raster order. Found PAINT_VOXELS voxels (whole slices) at a time: the rows' changes,
    and the rows of a cropped box, marked whole were two more masks of the box (0.4 GB each at 1024 x 1024 x 400)."""
    n_k, n_j, n_i = binary.shape
    step = max(1, PAINT_VOXELS // (n_j * n_i))
    found = []
    for k0 in range(0, n_k, step):
        rows = binary[k0:k0 + step].reshape(-1, n_i)
        # Where a row changes between background and foreground (a virtual background column on each
        # side): the changes of a row alternate run start, run end + 1.
        change = np.empty((rows.shape[0], n_i + 1), bool)
        change[:, 0] = rows[:, 0]
        np.not_equal(rows[:, 1:], rows[:, :-1], out=change[:, 1:-1])
        change[:, -1] = rows[:, -1]
        row, column = np.nonzero(change)
        found.append((row[0::2] + k0 * n_j, column[0::2], column[1::2] - 1))
    return tuple(np.concatenate(part) for part in zip(*found))


def _touching_runs(row: np.ndarray, start: np.ndarray, end: np.ndarray, n_j: int, n_i: int):
    """Pairs (p, q) of runs that touch in 26-connectivity, q in one of the four rows after p's
    (same slice next row; next slice rows j-1, j, j+1)."""
    width = n_i + 2
    key_start = row * width + start
    key_end = row * width + end
    k, j = np.divmod(row, n_j)
    pairs_p, pairs_q = [], []
    for dk, dj in ((0, 1), (1, -1), (1, 0), (1, 1)):
        ok = (j + dj >= 0) & (j + dj < n_j)
        p = np.flatnonzero(ok)
        target = row[p] + dk * n_j + dj
        # Runs of the target row that touch [start - 1, end + 1]: a contiguous range, since the
        # runs of a row are disjoint and sorted.
        lo = np.searchsorted(key_end, target * width + start[p] - 1, side="left")
        hi = np.searchsorted(key_start, target * width + end[p] + 1, side="right")
        count = np.maximum(hi - lo, 0)
        if count.sum() == 0:
            continue
        p_rep = np.repeat(p, count)
        offsets = np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count)
        pairs_p.append(p_rep)
        pairs_q.append(np.repeat(lo, count) + offsets)
    if not pairs_p:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(pairs_p), np.concatenate(pairs_q)


def _union(n: int, p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """For each of n nodes, the smallest node of its connected component (edges p-q)."""
    root = np.arange(n)
    while True:
        rp, rq = root[p], root[q]
        differ = rp != rq
        if not differ.any():
            return root
        low = np.minimum(rp[differ], rq[differ])
        np.minimum.at(root, rp[differ], low)
        np.minimum.at(root, rq[differ], low)
        while True:  # path compression: every node points at its root
            jumped = root[root]
            if np.array_equal(jumped, root):
                break
            root = jumped


def _binary(mask: np.ndarray) -> np.ndarray:
    """A 3D mask as bool: a bool mask, or a mask of 0/1 bytes (DeepWML's), as it lies (a copy of it was the
    report's peak on a large scan); others as `mask > 0`."""
    binary = np.asarray(mask)
    if binary.dtype == np.uint8 and binary.size and binary.max() <= 1:
        binary = binary.view(bool)
    elif binary.dtype != bool:
        binary = binary > 0
    if binary.ndim != 3:
        raise ValueError(f"label_components needs a 3D mask, got {binary.ndim}D")
    return binary


def _component_runs(binary: np.ndarray):
    """The 26-connected components of a bool 3D mask as runs along its rows: (the components' bounding box (slices),
    the runs' rows in the box (k * rows + j), first and last columns, component numbers 1..count (raster order of
    their first voxel), count); box None and no runs for an empty mask."""
    box = tuple(np.flatnonzero(binary.any(axis=axes)) for axes in ((1, 2), (0, 2), (0, 1)))
    if box[0].size == 0:
        nothing = np.zeros(0, np.int64)
        return None, nothing, nothing, nothing, nothing, 0
    box = tuple(slice(int(b[0]), int(b[-1]) + 1) for b in box)  # work on the lesions' bounding box
    _, n_j, n_i = binary[box].shape
    row, start, end = _runs(binary[box])
    p, q = _touching_runs(row, start, end, n_j, n_i)
    root = _union(row.size, p, q)
    # Roots are the raster-first run of each component, so numbering roots in order numbers the
    # components in raster order of their first voxel.
    is_root = root == np.arange(row.size)
    return box, row, start, end, np.cumsum(is_root)[root], int(np.count_nonzero(is_root))


def label_components(mask: np.ndarray, compact: bool = False) -> tuple[np.ndarray, int]:
    """26-connected components of a 3D mask, labelled 1..count in raster order (int32; with `compact`, the
    smallest unsigned integer type that holds count: uint8 up to 255 components, uint16 up to 65535, a half
    or a quarter of int32's memory over the lesions' bounding box, 1.1 GB of int32 at 1024 x 1024 x 400).

    The same labels as scipy.ndimage.label with a full 3×3×3 structure (tested), in numpy alone:
    importing scipy.ndimage (or SimpleITK) would add 0.1-0.5 s to every `deepwml segment`. Works on
    runs along the rows, so the cost follows the number of runs, not of voxels.
    """
    binary = _binary(mask)
    box, row, start, end, run_label, count = _component_runs(binary)
    dtype = np.int32 if not compact else np.uint8 if count <= 0xFF else np.uint16 if count <= 0xFFFF else np.uint32
    labels = np.zeros(binary.shape, dtype)
    if box is None:
        return labels, 0
    # Paint, a slab of slices at a time (a whole painted box beside `labels` was 1.6 GB more at 1024 x 1024 x
    # 400 voxels): a slab, flattened, is gap, run, gap, run, ..., gap; one np.repeat writes it.
    target = labels[box]
    n_k, n_j, n_i = target.shape
    plane = n_j * n_i
    slab = max(1, PAINT_VOXELS // plane)
    bounds = np.searchsorted(row, np.arange(0, n_k + slab, slab) * n_j)  # the runs of each slab (raster order)
    for number_of_slab, k0 in enumerate(range(0, n_k, slab)):
        a, b = bounds[number_of_slab], bounds[number_of_slab + 1]
        if a == b:
            continue
        k1 = min(k0 + slab, n_k)
        first = row[a:b] * n_i + start[a:b] - k0 * plane
        last = row[a:b] * n_i + end[a:b] - k0 * plane
        lengths = np.empty(2 * (b - a) + 1, np.int64)
        lengths[0] = first[0]
        lengths[2:-1:2] = first[1:] - last[:-1] - 1
        lengths[-1] = (k1 - k0) * plane - last[-1] - 1
        lengths[1::2] = end[a:b] - start[a:b] + 1
        values = np.zeros(2 * (b - a) + 1, dtype)
        values[1::2] = run_label[a:b]
        target[k0:k1] = np.repeat(values, lengths).reshape(k1 - k0, n_j, n_i)
    return labels, count


def _run_voxels(shape: tuple, box: tuple, row: np.ndarray, start: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The flat positions, in a volume of `shape`, of the voxels of runs found in its `box` (`_component_runs`),
    run after run."""
    k, j = np.divmod(row, box[1].stop - box[1].start)
    first = ((k + box[0].start) * shape[1] + j + box[1].start) * shape[2] + start + box[2].start
    positions = np.arange(int(lengths.sum()), dtype=np.int64)
    positions += np.repeat(first - (np.cumsum(lengths) - lengths), lengths)
    return positions


def filter_components(mask: np.ndarray, voxel_volume_mm3: float, min_volume_mm3: float = 0.0,
                      inside: np.ndarray | None = None, min_fraction: float = 0.5,
                      inside_level: float = 0.5) -> tuple[np.ndarray, int]:
    """Drop 3D components smaller than `min_volume_mm3`, then, with `inside` (the brain mask: a bool
    mask, or probabilities where >= `inside_level` is inside; same shape), those with less than
    `min_fraction` of their voxels inside it. One labelling for both, and `inside` is only read at
    the marked voxels. Returns the mask and the number of voxels the `inside` rule removed."""
    if not 0 < min_fraction <= 1:
        raise ValueError(f"inside fraction must be in (0, 1], got {min_fraction}")
    if inside is not None and inside.shape != mask.shape:
        raise ValueError(f"brain mask shape {inside.shape} differs from the lesion mask's {mask.shape}")
    if (min_volume_mm3 <= 0 and inside is None) or not mask.any():
        return mask, 0
    # from the components' runs: no volume of labels (a byte a voxel over the lesions' box, 0.4 GB at 1024 x 1024 x
    # 400 voxels, at the peak of such a scan's post-processing), and the marked voxels' positions only where `inside`
    # is read and for the components kept
    box, row, start, end, component, count = _component_runs(_binary(mask))
    lengths = end - start + 1
    sizes = np.bincount(component, weights=lengths, minlength=count + 1).astype(np.int64)
    keep = sizes * voxel_volume_mm3 >= min_volume_mm3 if min_volume_mm3 > 0 else np.ones(count + 1, bool)
    keep[0] = False
    removed = 0
    if inside is not None:
        voxels = _run_voxels(mask.shape, box, row, start, lengths)
        within_runs = np.add.reduceat(np.ravel(inside)[voxels] >= inside_level, np.cumsum(lengths) - lengths,
                                      dtype=np.int64)
        del voxels
        within = np.bincount(component, weights=within_runs, minlength=count + 1)
        gated = keep & (within >= min_fraction * sizes)
        removed = int(sizes[keep & ~gated].sum())
        keep = gated
    kept = keep[component]
    out = np.zeros(mask.shape, mask.dtype)
    out.ravel()[_run_voxels(mask.shape, box, row[kept], start[kept], lengths[kept])] = 1  # a new array: ravel() views it
    return out, removed


def remove_small_components(mask: np.ndarray, voxel_volume_mm3: float, min_volume_mm3: float) -> np.ndarray:
    """Drop 3D components smaller than `min_volume_mm3` (noise specks, single hot voxels)."""
    return filter_components(mask, voxel_volume_mm3, min_volume_mm3)[0]


def keep_inside(mask: np.ndarray, inside: np.ndarray, min_fraction: float = 0.5) -> np.ndarray:
    """Drop 3D components with less than `min_fraction` of their voxels in `inside` (the brain
    mask): marks in scalp, muscle, orbits and neck go; a lesion that touches the brain's edge, or
    that the brain mask clips by a voxel or two, stays whole."""
    return filter_components(mask, 1.0, 0.0, inside, min_fraction)[0]


def edge_slice_count(slices: int, fraction: float) -> int:
    """How many axial slices `exclude_edge_slices` clears at each end of `slices`: floor(fraction x slices)."""
    if not 0 <= fraction < 0.5:
        raise ValueError(f"edge-slice fraction must be in [0, 0.5), got {fraction}")
    return int(np.floor(round(slices * fraction, 9)))


def exclude_edge_slices(mask: np.ndarray, fraction: float) -> np.ndarray:
    """Clear the first and last `fraction` of axial slices (MICCAI winner: false positives there).

    The count is rounded down, so a fraction below 1/n_slices changes nothing; a product that is a whole
    number in decimals is that number (0.29 of 100 slices is 29, where the binary product is 28.999...).
    """
    n = edge_slice_count(mask.shape[0], fraction)
    if n == 0:
        return mask
    out = mask.copy()
    out[:n] = 0
    out[-n:] = 0
    return out


def at_least(probabilities: np.ndarray, threshold: float) -> np.ndarray:
    """`probabilities >= threshold` (an axial stack) as bool, written only on the rows that hold a voxel over it: the
    mask's other pages are never written, and the system gives them no memory (the whole mask written was 0.42 GB
    at 1024 x 1024 x 400, at the peak of such a scan's post-processing)."""
    mask = np.zeros(probabilities.shape, bool)
    for k, plane in enumerate(probabilities):
        over = plane >= threshold
        rows = np.flatnonzero(over.any(axis=1))
        if rows.size:
            mask[k, rows] = over[rows]
    return mask


def postprocess(probabilities: np.ndarray, threshold: float, voxel_volume_mm3: float,
                min_lesion_mm3: float = DEFAULT_MIN_LESION_MM3, exclude_edge_fraction: float = 0.0,
                brain_probabilities: np.ndarray | None = None, return_removed: bool = False):
    """Axial probability stack -> uint8 0/1 mask stack. With `brain_probabilities` (the brain-mask
    network's map on the same stack), components mostly outside the brain (probability below
    BRAIN_THRESHOLD) are dropped after the small ones; `return_removed` also returns how many
    voxels that removed: (mask, voxels)."""
    if not 0 < threshold < 1:
        raise ValueError(f"threshold must be between 0 and 1, got {threshold}")
    # bool, as label_components reads it without a copy, and bytes at the end by a view: no second mask beside
    mask = exclude_edge_slices(at_least(probabilities, threshold), exclude_edge_fraction)
    mask, removed = filter_components(mask, voxel_volume_mm3, min_lesion_mm3, brain_probabilities,
                                      inside_level=BRAIN_THRESHOLD)
    mask = mask.view(np.uint8)
    return (mask, removed) if return_removed else mask
