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
  where on FLAIR about half or more are. A scan much brighter at its centre than at its edge (3 T's
  dielectric effect without correction) lowers that share: README ("Is it a FLAIR?") gives what an
  audit measured, and why comparing the cortex with the white matter just under it was not taken.

Depths are Euclidean distances in mm to the surface of the intracranial mask with its holes filled
slice by slice, measured on in-plane blocks of about 2 mm with numpy alone (`deepwml segment` on a
NIfTI file imports neither SciPy nor SimpleITK): 0.03-0.21 s from the sample to a 1 mm 182-slice volume
(session 24, 2 cores; 0.06-0.28 s before the blocks were summed by offset and the windows sliced).
The deep median stands for the white matter (the deep brain is mostly white matter; voxels the model
marked as lesion are left out). Nothing is judged when the deep brain is under `MIN_DEEP_ML` (a brain
mask that failed, a partial field of view) or when there is no brain mask.
Levels are measured from the image's black (`image_black`: the air, or the zeros around a stripped
brain), so a FLAIR stored with an offset or a scale, or z-scored, gets the same figures as the scanner's
own; an image with no black around the brain (z-scored inside it, 0 outside) is not judged.

How the bounds were set and checked (`python Testing/benchmarks/contrast_check.py`, 5.5 min): they were
chosen on 21 real FLAIRs (the 11 clinical scans, the sample, the 3 labelled cases at 1 / 5 / 8 mm),
nilearn's MNI152 T1 template at 1 / 5 / 8 mm and synthetic heads rendered with FLAIR, T1, T2 and PD
contrast (seeds 0-3 and 100-107), with an exact distance map; the held-out draw (seeds 200-207), run
with it and again with this numpy one (bounds unchanged), and what it caught are in README ("Is it a
FLAIR?"). Shipped code: real FLAIRs dark fraction 0.011-0.16, cortex brighter 0.47-0.77; real T1 cortex
brighter 0.14-0.15. No real T2 or PD scan was available: those figures are synthetic.

`bright_line` looks for another cause of marks that are not lesions: a straight bright line through every slice (an
RF zipper, a stripe artefact), which the network marks where it crosses the brain.
"""
from __future__ import annotations

import numpy as np

DEEP_MM = 20.0
SHELL_MM = (3.0, 10.0)
MIN_DEEP_ML = 50.0
DARK_RATIO = 0.5
DARK_FRACTION_MIN = 0.004
CORTEX_BRIGHTER_MIN = 0.35

FLAIR_DARK_RANGE = "1.1-16 %"  # what the real FLAIRs above gave, quoted in the warnings
FLAIR_CORTEX_RANGE = "47-77 %"


# A CT in Hounsfield units is no MRI: its air lies near -1000 and its skull above several hundred, with the brain at
# 20-40 between (its ventricles, 0-15, are not dark against that black, so it was called T2- or PD-weighted). Such
# values outside the brain cannot come from a magnitude MRI (nothing below 0 but padding; its brightest tissue a few
# times the white matter's level, never ten times it at a white matter of 100 or less).
CT_BRAIN = (-20.0, 100.0)  # the deep brain's median on a CT (white matter 20-35, with some CSF)
CT_AIR, CT_BONE = -500.0, 500.0  # outside the brain: air is below the one, bone above the other
CT_AIR_MIN, CT_BONE_MIN = 0.1, 0.01  # of the voxels outside the brain
# A CT stored without its rescale (the raw stored values: 0 HU at 1024, air near 24 and the padding at 0, as a uint16
# NIfTI of such a series holds them) is the same CT shifted by CT_RAW_OFFSET: its air, brain and bone are looked for
# there too, but only when its ventricles are not dark (dark fraction under DARK_FRACTION_MIN: CSF at 1029-1039 against
# air at 24), so that no FLAIR, whose ventricles are dark, can be taken for one (a FLAIR's white matter may lie
# near 1024 and its scalp fat at 1.0-1.6 times that, above 1524). The dark fraction is measured here against the CT's
# own air (24 stored), not the image's black, which lands on the brain when the air and the padding lie far below it.
CT_RAW_OFFSET = 1024.0
CT_AIR_HU = -1000.0
# A brain-windowed CT (0-80 HU clipped and scaled to 0-255 or 0-4095) has a FLAIR's contrast inside the brain (CSF
# dark, grey matter brighter than white), but its skull is clipped to the window's top: a ring of voxels at the
# image's very top value. On an MRI the top value is a single voxel's (one of 1.2-4.9 M on each of the 11 clinical
# FLAIRs, the sample and synthetic FLAIRs of `deepwml synth`); on the windowed phantoms of
# Testing/benchmarks/non_flair_kinds.py (seeds 0-3) 7.9-9.1 % of the voxels outside the brain hold it, and the top
# lies 2.9-3.6 times as far above the black as the deep brain does. So: at least CT_TOP_MIN of the voxels outside
# the brain within CT_TOP_TOLERANCE of the image's range from its top, that top at least CT_TOP_RATIO times the deep
# brain's level (both from the black).
CT_TOP_MIN = 0.01
CT_TOP_TOLERANCE = 0.002
CT_TOP_RATIO = 2.0

# An MRI with its contrast inverted (its values negated, or subtracted from its top: a wrong conversion, or a
# display-inverted export) has its air, the most of what lies outside the brain, brighter than the brain: at or
# near the image's top value. It was called a CT in a brain window (its air at the top value taken for a clipped
# skull: 73-83 % of the voxels outside the brain on the sample and patient12_study1 negated, where a windowed CT's
# skull is 7.9-9.1 % and its air is dark). So: at least INVERTED_BRIGHT_MIN of the voxels outside the brain above
# the middle between the deep brain's level and the image's top (`_high`); on a FLAIR only scalp fat and skin are.
# A FLAIR whose background an exporter filled with a bright value (its top, a mid value) cannot be told apart by this
# (each of the 11 clinical FLAIRs, the sample and the 3 labelled ones, its air filled with its max, its middle value or
# its head's 99th percentile: mostly 'inverted', 0.51-0.92; before, 'not judged' (no black background) or a CT): the
# warning names both.
INVERTED_BRIGHT_MIN = 0.5

OUTSIDE_DARK_MIN = 0.1  # the share of the voxels outside the brain that must be dark (air, or stripped away):
# 91-100 % on the 11 clinical scans, the sample and the 3 labelled ones (black 0 on each of them)
BLACK_PERCENTILE = 0.5  # the image's black: this low percentile of its voxels (a few stray ones below it)
PADDING_GAP = 10.0  # ... unless it lies this many times the rest's range below the rest (reslice padding),
OWN_BLACK = (0.05, 0.1)  # or over the range below a rest with a black of its own: a tenth of it in its lowest 5 %
# (or, when that black is the scanner's 0, any way below it: -1024 lies under a FLAIR of 0-1500 or 0-4095)

COARSE_MM = 2.0  # the depth is measured on in-plane blocks of about this size
# the voxels outside the brain are counted this many (whole slices) at a time, 4 M (at 16 M a slab's copies and the
# indices of its voxels outside the brain, 7 bytes a voxel, 0.11 GB, were the peak of a 1024 x 1024 x 400 scan's run)
SLAB_VOXELS = 1 << 22


def _fill_holes_in_plane(mask: np.ndarray) -> np.ndarray:
    """Each slice's mask with its holes filled: the background not reached from the slice's border
    through background (4-connected) becomes mask."""
    background = ~mask
    reached = np.zeros_like(mask)
    reached[:, 0, :], reached[:, -1, :], reached[:, :, 0], reached[:, :, -1] = (
        background[:, 0, :], background[:, -1, :], background[:, :, 0], background[:, :, -1])
    while True:
        grown = reached.copy()
        grown[:, 1:, :] |= reached[:, :-1, :]
        grown[:, :-1, :] |= reached[:, 1:, :]
        grown[:, :, 1:] |= reached[:, :, :-1]
        grown[:, :, :-1] |= reached[:, :, 1:]
        grown &= background
        if np.array_equal(grown, reached):
            return ~reached
        reached = grown


def _depth_mm(inside: np.ndarray, spacing: tuple[float, float, float], limit: float) -> np.ndarray:
    """Euclidean distance in mm from each voxel of `inside` to the nearest voxel centre outside it
    (slices beyond the stack count as outside; 0 outside), exact below `limit` and at least `limit`
    (possibly inf) beyond. Separable: the squared distance along the slices, then a minimum over
    parabolas along rows and along columns, each over the offsets that can give less than `limit`."""
    n = inside.shape[0]
    steps = [max(1, int(np.ceil(limit / s))) for s in spacing]
    outside = np.pad(~inside, ((steps[0], steps[0]), (0, 0), (0, 0)), constant_values=True)
    squared = np.where(inside, np.float32(np.inf), np.float32(0))
    for k in range(1, steps[0] + 1):
        cost = np.float32((k * spacing[0]) ** 2)
        near = outside[steps[0] + k:steps[0] + k + n] | outside[steps[0] - k:steps[0] - k + n]
        squared[near] = np.minimum(squared[near], cost)
    for axis in (1, 2):
        w = steps[axis]
        widths = [(0, 0)] * 3
        widths[axis] = (w, w)
        padded = np.pad(squared, widths, constant_values=np.inf)  # the image's in-plane edge is not outside
        size = squared.shape[axis]
        best = squared.copy()
        window = [slice(None)] * 3
        for k in range(1, w + 1):
            cost = np.float32((k * spacing[axis]) ** 2)
            for start in (w + k, w - k):
                window[axis] = slice(start, start + size)
                np.minimum(best, padded[tuple(window)] + cost, out=best)
        squared = best
    return np.sqrt(squared)


def _region_bands(intracranial: np.ndarray, spacing: tuple[float, float, float],
                  bands: tuple[tuple[float, float], ...]) -> tuple[list[np.ndarray], tuple[int, int]]:
    """For each (low, high) of `bands`, the in-plane blocks of the stack whose depth in mm under the surface of
    the intracranial mask with its holes filled lies in [low, high] (bool, [slice, block row, block column]), and
    the blocks' size in voxels (rows, columns): blocks of about COARSE_MM, inside where at least half their voxels
    are. The depth is measured on the blocks (numpy alone, a few tenths of a second for a 512 x 512 x 48 scan; the
    regions it bounds are tens of mm across) and compared there; `_band_planes` brings a band back to the voxels
    a slice at a time (not a float32 map of the whole volume and its copies: over 5 GB at 1024 x 1024 x 400)."""
    n, rows, cols = intracranial.shape
    fr, fc = (max(1, int(COARSE_MM / s + 1e-6)) for s in spacing[1:])
    r, c = rows // fr * fr, cols // fc * fc
    if r == 0 or c == 0:
        return [np.zeros((n, r // fr, c // fc), bool) for _ in bands], (fr, fc)
    inside = intracranial[:, :r, :c].view(np.uint8)
    counts = np.zeros((n, r // fr, c // fc), np.int32)
    for i in range(fr):  # each block's voxels inside, added one offset at a time (strided sums are slow)
        for j in range(fc):
            counts += inside[:, i::fr, j::fc]
    blocks = 2 * counts >= fr * fc  # at least half of the block inside
    # Measured in the blocks' in-plane bounding box and a ring of one block around it (where the image's edge is not
    # there): every block beyond is air reached from the edge, so holds no hole and has depth 0, and the ring's blocks
    # lie nearer to each block inside than any beyond, so the depths are the same to the bit (on the clinical FLAIRs
    # the box was half the slice, and the filling and the depth took half the time)
    found = [np.full(blocks.shape, low <= 0 <= high) for low, high in bands]
    rows_inside, cols_inside = np.flatnonzero(blocks.any(axis=(0, 2))), np.flatnonzero(blocks.any(axis=(0, 1)))
    if rows_inside.size:
        box = (slice(None), slice(max(0, rows_inside[0] - 1), rows_inside[-1] + 2),
               slice(max(0, cols_inside[0] - 1), cols_inside[-1] + 2))
        depth = _depth_mm(_fill_holes_in_plane(blocks[box]), (spacing[0], spacing[1] * fr, spacing[2] * fc),
                          DEEP_MM + 1)
        for band, (low, high) in zip(found, bands):
            band[box] = (depth >= low) & (depth <= high)
    return found, (fr, fc)


def _band_planes(band: np.ndarray, block: tuple[int, int], plane_shape: tuple[int, int]):
    """Each slice of a band of blocks (`_region_bands`) over its voxels (bool, `plane_shape`), one slice at a time:
    a byte a voxel of one slice, not two whole volumes of them held through the check (0.8 GB at 1024 x 1024 x
    400). Voxels in the last rows or columns left over by the blocks are in no band."""
    fr, fc = block
    rows, cols = band.shape[1] * fr, band.shape[2] * fc
    for blocks in band:
        plane = np.zeros(plane_shape, bool)
        plane[:rows, :cols] = blocks.repeat(fr, axis=0).repeat(fc, axis=1)
        yield plane


def image_black(stack: np.ndarray) -> float:
    """The image's black, where its levels are measured from: the BLACK_PERCENTILE-th percentile of its
    voxels, i.e. the air around the head or the zeros around a stripped brain (0 on the scanner's own
    images; an offset, a scale or a z-score moves it with the tissue, so the figures do not change). A few
    voxels below it (interpolation's undershoot, -20 on the labelled scans) do not move it, and neither does
    padding below the rest (a band of -32768 or -1024 from a reslice): a gap under the rest more than PADDING_GAP
    times the rest's range, or more than its range where the rest has a black of its own (its air or zeros: at
    least OWN_BLACK[1] of it in the lowest OWN_BLACK[0] of its range), or by any gap when that black is 0 (a
    magnitude image holds nothing below 0 but padding and undershoot: -1024 lies less than one range under a
    scanner's FLAIR of 0-1500 or 0-4095). Not head_mask's gap of one range alone: a stripped brain's narrow range, as
    on PD, passes it, and the brain has no such dense floor (and does not start at 0)."""
    from .preprocessing import tail_percentiles

    # no copies of the sample or of the voxels above its black to sort (0.1 GB each at 1024 x 1024 x 400, once the
    # peak of the FLAIR check on such a scan): only their tails are sorted, in copies of those few voxels
    sample = (stack[::2, ::3, ::3] if stack.size > 2_000_000 else stack).ravel()
    black, top = tail_percentiles(sample, [BLACK_PERCENTILE, 99.5])
    above = sample[sample > black]
    del sample
    if above.size:
        floor = tail_percentiles(above, 0.5)[0]
        gap, span = floor - black, top - floor
        own_black = np.mean(above <= floor + OWN_BLACK[0] * span) >= OWN_BLACK[1]
        at_zero = black < 0 <= floor <= OWN_BLACK[0] * span  # below a rest whose black is the scanner's 0
        if gap > PADDING_GAP * span or ((gap > span or at_zero) and own_black):
            black = floor
    return float(black)


def _dark_shares_outside(stack: np.ndarray, intracranial: np.ndarray, levels) -> list[float | None]:
    """For each (black, level) of `levels`, the share of the voxels outside `intracranial` less than `level` above
    `black` (None when there are none), counted a slab of slices at a time: no mask and no float copy of everything
    outside the brain (2 GB at 1024 x 1024 x 400 voxels); the voxels are picked once for all the levels (each
    picking is a pass over the scan, 3-5 ms of the bench's)."""
    step = max(1, SLAB_VOXELS // max(1, stack[0].size))
    dark, total = [0] * len(levels), 0
    for k in range(0, stack.shape[0], step):
        outside = stack[k:k + step][~intracranial[k:k + step]]
        for i, (black, level) in enumerate(levels):
            dark[i] += int(np.count_nonzero(outside - black < level))
        total += outside.size
    return [count / total if total else None for count in dark]


def _high(stack: np.ndarray) -> float:
    """The image's top level: its 99.5th percentile (of a sample of a large scan, as `image_black` takes its black),
    which a few stray bright voxels (or padding above the rest) do not move."""
    from .preprocessing import tail_percentiles

    sample = (stack[::2, ::3, ::3] if stack.size > 2_000_000 else stack).ravel()
    return float(tail_percentiles(sample, [99.5])[0])


def flair_contrast(stack: np.ndarray, intracranial: np.ndarray, lesion: np.ndarray,
                   spacing: tuple[float, float, float], progress=None) -> dict:
    """Figures of the check and its verdict for an axial stack ([slice, row, col]) with its
    intracranial and lesion masks (same shape, bool) and spacing (slice, row, col) in mm.
    `progress(fraction, message)`, when given, hears of its steps (seconds each on a large scan).

    `looks_like`: "FLAIR", "T1-weighted", "T2- or PD-weighted", "inverted" (an MRI with its values
    negated: its air bright, with `bright_outside_fraction`), "CT" (with `stored`: "Hounsfield units" or "raw, 0 HU
    at 1024", with `deep_median` (HU), `air_fraction` and `bone_fraction`; "brain window", with `top_fraction` and
    `top_to_deep`), or None when not judged."""
    from .preprocessing import median

    tell = progress or (lambda fraction, message: None)
    tell(0.0, "FLAIR check: depth inside the brain")
    # Holes filled slice by slice: on a scan that is not a FLAIR the brain-mask network may leave out
    # the ventricles or cut the brain into pieces, and the depth is measured from the skull inwards.
    (deep, shell), block = _region_bands(np.asarray(intracranial, bool), spacing, ((DEEP_MM, np.inf), SHELL_MM))
    lesion = np.asarray(lesion, bool)
    voxel_ml = float(np.prod(spacing)) / 1000
    deep_ml = float(np.count_nonzero(deep) * block[0] * block[1]) * voxel_ml
    result = {"deep_ml": round(deep_ml, 1), "dark_fraction": None, "cortex_brighter_fraction": None,
              "looks_like": None, "not_judged": None}
    if deep_ml < MIN_DEEP_ML:
        result["not_judged"] = (f"{deep_ml:.0f} ml of brain 20 mm or more under the brain mask's surface (under "
                                f"{MIN_DEEP_ML:g} ml: a brain mask that failed, or a partial field of view)")
        return result
    tell(0.65, "FLAIR check: white matter, black levels")
    # The white matter's level: the deep brain the model did not mark (all of it when the model marked
    # most of it, as it does on T2, where CSF is bright).
    def in_deep(volume: np.ndarray) -> np.ndarray:  # volume[deep], picked a slice at a time in the same order
        return np.concatenate([volume[k][plane] for k, plane in enumerate(_band_planes(deep, block, stack.shape[1:]))])

    values = in_deep(stack)
    normal = values[~in_deep(lesion)]  # picked from the deep voxels: no more masks of the whole volume
    reference = float(median(normal if normal.size * voxel_ml >= MIN_DEEP_ML else values))
    cortex = brighter_count = 0  # the shell's voxels not marked as lesion, and those brighter than the reference
    for k, plane in enumerate(_band_planes(shell, block, stack.shape[1:])):
        plane &= ~lesion[k]
        cortex += int(np.count_nonzero(plane))
        brighter_count += int(np.count_nonzero(stack[k][plane] > reference))
    # Levels are measured from the image's black (its air and the zeros around the brain): the same
    # figures for a scan stored with an offset or a scale, or z-scored, as for the scanner's own.
    black = image_black(stack)
    if reference - black <= 0 or not cortex:
        result["not_judged"] = "no intensity level to judge by (the deep brain is no brighter than the image's black)"
        return result
    tell(0.8, "FLAIR check: background outside brain")
    # where a CT's 0 HU lies: Hounsfield units, or raw stored values (only for ventricles that are not dark against
    # the CT's air, -1000 HU: the image's black may be its brain, as air and padding lie far below the rest)
    offsets = [offset for offset in (0.0, CT_RAW_OFFSET) if CT_BRAIN[0] <= reference - offset <= CT_BRAIN[1]
               and (offset == 0 or np.mean(values < (reference + offset + CT_AIR_HU) / 2) < DARK_FRACTION_MIN)]
    top = float(stack.max())
    windowed = top - black >= CT_TOP_RATIO * (reference - black)  # a top well above the brain: a clipped skull?
    levels = [level for offset in offsets for level in ((0.0, offset + CT_AIR), (0.0, offset + CT_BONE))]
    if windowed:
        levels.append((0.0, top - CT_TOP_TOLERANCE * (top - black)))
    *shares, outside_bright, outside_dark = _dark_shares_outside(
        stack, np.asarray(intracranial, bool),
        [*levels, (reference, DARK_RATIO * (_high(stack) - reference)), (black, DARK_RATIO * (reference - black))])
    outside_bright = None if outside_bright is None else 1 - outside_bright
    for i, offset in enumerate(offsets):
        air, bone = shares[2 * i:2 * i + 2]
        if air is not None and air >= CT_AIR_MIN and 1 - bone >= CT_BONE_MIN:
            result.update(looks_like="CT", stored="raw, 0 HU at 1024" if offset else "Hounsfield units",
                          deep_median=round(reference - offset, 1), air_fraction=round(air, 3),
                          bone_fraction=round(1 - bone, 3))
            return result
    if outside_bright is not None and outside_bright >= INVERTED_BRIGHT_MIN:  # air bright: an inverted MRI, no CT
        result.update(looks_like="inverted", bright_outside_fraction=round(outside_bright, 3))
        return result
    if windowed and shares[-1] is not None and 1 - shares[-1] >= CT_TOP_MIN:
        result.update(looks_like="CT", stored="brain window", top_fraction=round(1 - shares[-1], 3),
                      top_to_deep=round((top - black) / (reference - black), 2))
        return result
    if outside_dark is not None and outside_dark < OUTSIDE_DARK_MIN:
        result["not_judged"] = ("no black background to measure levels from: almost nothing outside the brain is "
                                "dark (a scan whose background was filled with another value, e.g. z-scored inside "
                                "the brain with 0 outside?)")
        return result
    dark = float(np.mean(values - black < DARK_RATIO * (reference - black)))
    brighter = brighter_count / cortex  # np.mean's figure: the count of 0/1 is exact in float64 too
    looks_like = "FLAIR"
    if dark < DARK_FRACTION_MIN:
        looks_like = "T2- or PD-weighted"
    elif brighter < CORTEX_BRIGHTER_MIN:
        looks_like = "T1-weighted"
    result.update(dark_fraction=round(dark, 4), cortex_brighter_fraction=round(brighter, 3), looks_like=looks_like)
    return result


LINE_OFFSET = 5  # voxels: a line's level is compared with the image's this far to each side of it
LINE_EXCESS_MAX = 0.05  # of the image's range (black to its 99.5th percentile): 0 or below on the 11 clinical FLAIRs,
# the sample, the 3 stripped labelled ones at 1 mm, MNI152's T1 and synthetic heads 200-207; 0.09 and 0.18 for a stripe
# of a twentieth and a tenth of the scan's top added on 3 columns, which took patient01_study1's lesion volume from 0.80
# to 1.01 and 2.34 ml (marked where it crosses the brain)
LINE_SAMPLE = 1 << 16  # voxels sampled (whole lines) for each direction's levels: 250-odd voxels a line; the same
# excess as 1 << 19 on the 11 clinical FLAIRs and the sample (0 without a stripe; 0.076-0.152 against 0.077-0.149 with
# one of a twentieth of the top on 3 columns), in 3-8 ms a scan against 30-130 ms (2 busy cores)


def bright_line(stack: np.ndarray) -> dict | None:
    """A straight bright line through the axial slices of `stack` ([slice, row, col]), as an RF zipper or a stripe
    artefact puts it through every slice at one place (the network marks it as lesion where it crosses the brain): a
    row or column brighter than both voxels LINE_OFFSET to each side of it by more than LINE_EXCESS_MAX of the image's
    range, at most of its voxels, head and air alike (the median of that excess over the line's voxels of every slice).
    `{"along": "column" or "row", "index", "excess"}` for the most marked, or None. A stripped brain (zeros around it)
    shows no line outside it, so is not judged; a line through under half the slices is not seen."""
    from .preprocessing import percentiles

    every = max(1, round((stack.size / LINE_SAMPLE) ** (1 / 3)))  # the black of a sample as large as a direction's:
    black = image_black(stack[::every, ::every, ::every])  # the whole scan's was a copy of it (4 bytes a voxel)
    found = None
    for axis, along in ((2, "column"), (1, "row")):
        lines = np.moveaxis(stack, axis, -1)  # [slice, across, line]: each line's voxels over the first two axes
        step = max(1, int(np.sqrt(lines.shape[0] * lines.shape[1] * lines.shape[2] / LINE_SAMPLE)))
        sample = lines[::step, ::step].reshape(-1, lines.shape[2]).astype(np.float32)  # no wrap-around of integers
        if sample.shape[1] <= 2 * LINE_OFFSET:
            continue
        span = float(percentiles(sample, 99.5)[0]) - black
        if span <= 0:
            continue
        # voxel by voxel: a line's level against the brighter of its two sides, whose median over the line is ~0 or
        # below wherever the anatomy goes (not the median level of each line, which jumps where the head fills half)
        above = sample[:, LINE_OFFSET:-LINE_OFFSET] - np.maximum(sample[:, :-2 * LINE_OFFSET], sample[:, 2 * LINE_OFFSET:])
        above = np.ascontiguousarray(above.T)  # a line's voxels side by side: partitioned in place, not strided
        middle = above.shape[1] // 2  # np.median imports numpy.ma (20 ms of start-up); the partition does not
        excess = np.partition(above, middle, axis=1)[:, middle].astype(np.float64) / span
        index = int(np.argmax(excess))
        if excess[index] > LINE_EXCESS_MAX and (found is None or excess[index] > found["excess"]):
            found = {"along": along, "index": index + LINE_OFFSET, "excess": round(float(excess[index]), 3)}
    return found


def bright_line_warning(line: dict, frame) -> str:
    """The warning for a bright line through the axial slices (`bright_line` of the axial stack of an image, whose
    `frame`, io.SliceFrame, it came by). The line's place is the image's own voxel index, as Slicer's Data Probe shows
    it: the stack's column or row runs against it where the file's axis does (a NIfTI file stored as RAS)."""
    column = line["along"] == "column"
    way = "from front to back" if column else "from side to side"
    axis, flip = (frame.col_axis, frame.flip_col) if column else (frame.row_axis, frame.flip_row)
    index = frame.size[axis] - 1 - line["index"] if flip else line["index"]
    return (f"a straight bright line runs {way} through the axial slices (at voxel index {'ijk'[axis]} = {index} "
            f"(IJK, as Slicer's Data Probe shows it), {line['excess']:.0%} of the image's range brighter than beside "
            "it; 0 % on the real FLAIRs checked): an artefact (RF zipper, stripe) that DeepWML marks as lesion where it "
            "crosses the brain; look at the mask there (in Slicer, or the picture of deepwml segment --qc) and repeat "
            "the scan if need be")


# A scan exported in a display window (8-bit, or any window narrower than its values) has its brightest voxels cut to
# one value: lesions brighter than the cut are flattened with the scalp fat and cortex, and the network marks little of
# them. The real FLAIRs have 1-2 voxels at their top value (under 0.0003 % of the head on the 11 clinical FLAIRs, the
# 3 labelled ones and the sample); patient01_study1, patient12_study1 and patient19_study2 windowed to 8 bits at their
# head's 99.7th, 99th, 97th, 90th and 80th percentiles put 0.56-0.67, 1.8-2.2, 5.4-6.6, 21 and 41 % of the head at it,
# and their lesion volumes went from 0.78 / 9.88 / 20.88 ml to 0.84 / 10.82 / 22.24 (99.7th), 0.83 / 13.53 / 22.89
# (97th), 0.18 / - / 1.76 (90th) and 0.00 / - / 0.08 ml (80th), with no other warning.
CLIPPED_SHARE_MIN = 0.001  # of the head's voxels at the top value: 300 times the real FLAIRs', a sixth of 99.7th's
CLIPPED_VOXELS_MIN = 100  # and at least this many voxels (a small image's handful says nothing)


def clipped_top(stack: np.ndarray, head_voxels: int) -> dict | None:
    """{"share": of the head's voxels, "voxels", "top"} when more of the image's voxels than CLIPPED_SHARE_MIN of
    `head_voxels` (the head mask's count) hold its top value (within CT_TOP_TOLERANCE of its range), as a scan
    clipped by a display window has them; else None. Counted a slab at a time (preprocessing's slabs, read as float32
    as the networks read them): no mask of the volume."""
    if not head_voxels or not stack.size:
        return None
    top, black = float(stack.max()), image_black(stack)
    if not top > black:
        return None
    from .preprocessing import _float32_slabs

    level = top - CT_TOP_TOLERANCE * (top - black)
    voxels = sum(int(np.count_nonzero(slab >= level)) for _, slab in _float32_slabs(stack))
    share = voxels / head_voxels
    if voxels < CLIPPED_VOXELS_MIN or share < CLIPPED_SHARE_MIN:
        return None
    return {"share": share, "voxels": voxels, "top": top}


def clipped_warning(clipped: dict) -> str:
    """The warning for a scan whose top value many voxels share (clipped_top)."""
    return (f"{clipped['share']:.2%} of the head's voxels hold the image's top value, {clipped['top']:g} (1-2 voxels on "
            "the real FLAIRs checked): the scan looks clipped, as one exported in a display window is (8-bit, say); "
            "lesions brighter than the cut are flattened to it and DeepWML's marks change (a cut at the head's 97th "
            "percentile moved lesion volumes by up to 37 %, one at the 90th lost 92 % of a 20.9 ml load): segment "
            "the scan as the scanner stored it (its DICOM series, or a conversion of it)")


def why_not_flair(check: dict) -> str | None:
    """Why a scan the check judged does not look like a FLAIR, with its figure and the real FLAIRs' (None when
    it looks like one, or was not judged)."""
    if check.get("looks_like") == "CT" and check.get("stored") == "brain window":
        return (f"its skull is clipped to the image's top value as a CT's in a brain window is, not an MRI's "
                f"({check['top_fraction']:.0%} of the voxels outside the brain at the top value, "
                f"{check['top_to_deep']:g} times the deep brain's level; a single voxel on the real FLAIRs checked)")
    if check.get("looks_like") == "CT":
        offset = CT_RAW_OFFSET if check.get("stored") == "raw, 0 HU at 1024" else 0.0
        units = ("a CT's stored without its rescale (0 HU at 1024)" if offset else "a CT's in Hounsfield units")
        return (f"its values are {units}, not an MRI's (the deep brain at {check['deep_median']:g} HU, "
                f"{check['air_fraction']:.0%} of the voxels outside the brain below {offset + CT_AIR:g} as air is and "
                f"{check['bone_fraction']:.0%} above {offset + CT_BONE:g} as bone is)")
    if check.get("looks_like") == "inverted":
        return (f"what lies around the brain is brighter than the brain ({check['bright_outside_fraction']:.0%} of the "
                "voxels outside the brain nearer the image's top than the white matter's level; on a FLAIR as the "
                "scanner stores it only its scalp fat and skin are): either its contrast is inverted, its CSF not dark "
                "nor its lesions bright, or its background was filled with a bright value (a FLAIR padded with its top "
                "or a mid value by an exporter is taken for inverted too)")
    if check.get("looks_like") == "T2- or PD-weighted":
        return (f"the ventricles are not dark ({check['dark_fraction']:.2%} of the deep brain is darker than half its "
                f"median; {FLAIR_DARK_RANGE} on the real FLAIRs checked)")
    if check.get("looks_like") == "T1-weighted":
        return (f"the cortex is darker than the white matter (only {check['cortex_brighter_fraction']:.0%} of it is "
                f"brighter than the deep white matter; {FLAIR_CORTEX_RANGE} on the real FLAIRs checked)")
    return None


def contrast_warnings(check: dict) -> list[str]:
    """The warning for a scan that does not look like a FLAIR (none otherwise)."""
    if check.get("looks_like") == "T2- or PD-weighted":
        return [f"this does not look like a FLAIR: {why_not_flair(check)}, as on a T2- or PD-weighted scan or a "
                "diffusion ADC map, where DeepWML marks CSF as lesion: check the series"]
    if check.get("looks_like") == "inverted":
        return [f"this does not look like a FLAIR as stored: {why_not_flair(check)}; an image whose values were "
                "negated or subtracted from their top (a wrong conversion or export) gives figures that mean nothing, "
                "and a bright background is no air to measure levels from: segment the scan as the scanner stored it"]
    if check.get("looks_like") == "CT":
        return [f"this looks like a CT, not an MRI: {why_not_flair(check)}; DeepWML segments FLAIR MRI only and its "
                "marks and figures mean nothing here: give the FLAIR series"]
    if check.get("looks_like") == "T1-weighted":
        return [f"this does not look like a FLAIR: {why_not_flair(check)}, as on a T1-weighted scan, where lesions are "
                "not bright and the figures mean nothing: check the series"]
    if check.get("not_judged"):  # silence would read as "a FLAIR"; the brain outline fails on T2-weighted scans
        deep = check.get("deep_ml")
        why = (f"only {deep:.0f} ml of brain lies 20 mm or more inside its outline (under {MIN_DEEP_ML:g} ml: a "
               "partial field of view, or an outline that failed, as it does on T2-weighted scans)"
               if deep is not None and deep < MIN_DEEP_ML else check["not_judged"])
        return [f"whether this scan is a FLAIR could not be checked: {why}; make sure the series is a FLAIR"]
    return []
