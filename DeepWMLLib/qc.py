"""A quality-control picture of one segmentation: axial FLAIR slices with the WMH mask outlined.

`deepwml segment --qc` writes it as CASE_qc.png next to the mask, so a batch of cases can be looked
over in an image viewer without opening each in Slicer. It is for checking, not for diagnosis: the
mask file is the result.

How it is drawn:
- the axial planes of `io.to_axial_stack`, in the radiological view (patient left on the image right,
  anterior at the top), from the bottom of the head up whatever order the file stores its slices in,
  cropped to the in-plane box of the head and of every mark over all slices (plus 5 mm; a mark in the
  background stays in view) and resampled to square pixels, so a
  scan with anisotropic pixels is not stretched (FLAIR: nearest neighbour; the masks: a display pixel
  is marked when any voxel under it is, so a lesion smaller than a display pixel still shows);
- the slices from the first to the last that hold head or lesion, all of them when there are at most
  `max_tiles`; else every slice with lesion and evenly spaced others up to `max_tiles` (and when more
  than `max_tiles` slices have lesion, evenly spaced ones of those);
- grey levels: FLAIR from its 1st to its 99.5th percentile within the head (voxels more than a tenth
  of the way from the 0.5th percentile, the background, to the 99.5th), the same window on every slice;
- lesion: its in-plane outline in red (the voxels inside the mask next to one outside it), so the
  FLAIR signal under it stays visible;
- each slice is labelled with its `index` in the report (the voxel index along the axial axis, 0 first;
  for a DICOM input, its Instance Number, the image number PACS shows, `dicom_instance` in the report),
  yellow on black in the top left corner (left out on a tile too small to hold it whole); the first tile
  has "R" at the middle of its left edge and "L" at its right (the patient's right and left, as on every
  tile; left out on a narrow tile);
- a band above the tiles names the case with its volume and lesion count (`deepwml segment`), and a
  comparison's legend, so a picture read on its own still says what it shows.

`deepwml evaluate --flair FLAIR --qc PNG` (and a cohort manifest's `flair` column) draws a prediction
against a reference instead: both masks filled, half transparent, green where they agree, red where
only the prediction marks lesion, blue where only the reference does; `deepwml consensus` draws two
raters the same way (rater A as the prediction), and the Slicer batch script its result against a
reference. `deepwml change --qc` fills its change labels (new, enlarging, stable, gone, not assessable)
over the follow-up FLAIR (`render_labels`).

Every mask drawn must lie on the FLAIR's voxel grid (size, spacing, origin and direction, within the
tolerance of `io.grid_difference`; a comparison's prediction on its reference's, as the metrics take it);
one that does not is refused with a DeepWMLError naming the difference, never drawn over the wrong voxels.

Only numpy and zlib are used (the PNG is written here), so the picture costs no extra dependency.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

from . import io
from .volume import like, voxels

MAX_TILES = 40
TILE_PX = 224  # the longer side of each slice's tile
CROP_MARGIN_MM = 5.0
COLUMNS = 8
GAP_PX = 2
LESION_RGB = (255, 40, 40)
VENTRICLE_RGB = (60, 160, 255)  # the lateral ventricles of the periventricular/deep split, outlined
LABEL_RGB = (255, 220, 0)
SIDES_2X_PX, SIDES_1X_PX = 96, 48  # the narrowest tiles that get their R and L at 2x, at 1x
COMPARISON_RGB = {1: (40, 220, 40), 2: (255, 40, 40), 3: (40, 120, 255)}  # both, prediction only, reference only

# A 3 x 5 pixel font (rows top to bottom, 1 = ink) for slice labels, titles and legends; capitals only.
_GLYPHS = {
    "0": "111 101 101 101 111", "1": "010 110 010 010 111", "2": "111 001 111 100 111", "3": "111 001 011 001 111",
    "4": "101 101 111 001 001", "5": "111 100 111 001 111", "6": "111 100 111 101 111", "7": "111 001 010 010 010",
    "8": "111 101 111 101 111", "9": "111 101 111 001 111",
    "A": "010 101 111 101 101", "B": "110 101 110 101 110", "C": "011 100 100 100 011", "D": "110 101 101 101 110",
    "E": "111 100 110 100 111", "F": "111 100 110 100 100", "G": "011 100 101 101 011", "H": "101 101 111 101 101",
    "I": "111 010 010 010 111", "J": "001 001 001 101 010", "K": "101 101 110 101 101", "L": "100 100 100 100 111",
    "M": "101 111 111 101 101", "N": "110 101 101 101 101", "O": "010 101 101 101 010", "P": "110 101 110 100 100",
    "Q": "010 101 101 110 011", "R": "110 101 110 101 101", "S": "011 100 010 001 110", "T": "111 010 010 010 010",
    "U": "101 101 101 101 111", "V": "101 101 101 101 010", "W": "101 101 111 111 101", "X": "101 101 010 101 101",
    "Y": "101 101 010 010 010", "Z": "111 001 010 100 111", " ": "000 000 000 000 000", ".": "000 000 000 000 010",
    ",": "000 000 000 010 100", ":": "000 010 000 010 000", "-": "000 000 111 000 000", "%": "101 001 010 100 101",
    "/": "001 001 010 100 100", "(": "010 100 100 100 010", ")": "010 001 001 001 010", "_": "000 000 000 000 111",
    "=": "000 111 000 111 000", "?": "111 001 010 000 010", "+": "000 010 111 010 000",
}
_GLYPH_MASKS = {char: np.array([[c == "1" for c in row] for row in rows.split()]) for char, rows in _GLYPHS.items()}
HEADER_RGB = (235, 235, 235)


def text_width(text: str, scale: int) -> int:
    return max(0, len(text) * 4 * scale - scale)


def draw_text(canvas: np.ndarray, y: int, x: int, text: str, rgb, scale: int = 2) -> int:
    """Draw `text` (capitals; unknown characters as '?') with its top left at (y, x), glyph by glyph
    while whole glyphs fit; returns the x after the last one drawn."""
    for char in text.upper():
        glyph = np.kron(_GLYPH_MASKS.get(char, _GLYPH_MASKS["?"]), np.ones((scale, scale), bool))
        if y + glyph.shape[0] > canvas.shape[0] or x + glyph.shape[1] > canvas.shape[1]:
            break
        canvas[y:y + glyph.shape[0], x:x + glyph.shape[1]][glyph] = rgb
        x += 4 * scale
    return x


def choose_slices(head: np.ndarray, lesion_per_slice: np.ndarray, max_tiles: int) -> list[int]:
    """Indices of the slices to show (see the module docstring), in order."""
    shown = np.flatnonzero(head | lesion_per_slice)  # a lesion on a slice with little head is shown too
    first, last = (int(shown[0]), int(shown[-1])) if shown.size else (0, len(head) - 1)
    candidates = np.arange(first, last + 1)
    if candidates.size <= max_tiles:
        return candidates.tolist()
    lesion_slices = [int(k) for k in np.flatnonzero(lesion_per_slice)]
    if len(lesion_slices) >= max_tiles:  # more slices with lesion than tiles: evenly spaced ones of them
        return [lesion_slices[i] for i in np.round(np.linspace(0, len(lesion_slices) - 1, max_tiles)).astype(int)]
    rest = [int(k) for k in candidates if not lesion_per_slice[k]]
    picks = np.round(np.linspace(0, len(rest) - 1, max_tiles - len(lesion_slices))).astype(int) if rest else []
    return sorted(set(lesion_slices) | {rest[i] for i in picks})


def _resample_indices(n: int, spacing: float, pixel_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """(the voxel at each display pixel's centre, the first voxel of each display pixel's footprint)."""
    count = max(1, int(round(n * spacing / pixel_mm)))
    centres = (np.arange(count) + 0.5) * pixel_mm / spacing - 0.5
    starts = np.floor(np.arange(count) * pixel_mm / spacing + 1e-9).astype(int)
    return np.clip(np.round(centres).astype(int), 0, n - 1), np.clip(starts, 0, n - 1)


def _pooled(mask: np.ndarray, row_starts: np.ndarray, col_starts: np.ndarray) -> np.ndarray:
    """A 2D mask on the display grid: a display pixel is set when any voxel of its footprint is, so no
    lesion is lost when the tile has fewer pixels than the slice (a pixel that enlarges a voxel shows it)."""
    rows = np.maximum.reduceat(mask.astype(np.uint8), row_starts, axis=0)
    return np.maximum.reduceat(rows, col_starts, axis=1).astype(bool)


def _quantiles(values: np.ndarray, fractions) -> tuple[float, ...]:
    """Nearest-rank quantiles by partial sorting (np.percentile would import numpy.ma, 20 ms of start-up)."""
    ranks = [min(values.size - 1, int(round(f * (values.size - 1)))) for f in fractions]
    ordered = np.partition(values, ranks)
    return tuple(float(ordered[r]) for r in ranks)


def _box(present: np.ndarray, spacing_mm: float) -> tuple[int, int]:
    """[first, last + 1) of the True entries widened by CROP_MARGIN_MM; the whole axis when none."""
    where = np.flatnonzero(present)
    if where.size == 0:
        return 0, len(present)
    margin = int(np.ceil(CROP_MARGIN_MM / spacing_mm))
    return max(0, int(where[0]) - margin), min(len(present), int(where[-1]) + 1 + margin)


def in_plane_outline(mask: np.ndarray) -> np.ndarray:
    """The in-plane outline of a 2D mask: its voxels next to one outside it (4-neighbours; the image edge is outside)."""
    padded = np.pad(mask, 1)
    inside = (padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:])
    return mask & ~inside


def _draw_number(tile: np.ndarray, number: int) -> bool:
    """Draw `number` in the tile's top left corner on a black backing, at 2x or, when that does not fit,
    1x; a tile too small for the whole number gets none (never a cut-off, wrong one). Whether drawn."""
    text = str(number)
    for scale in (2, 1):
        width, height = text_width(text, scale), 5 * scale
        if 2 + height + 1 <= tile.shape[0] and 2 + width + 1 <= tile.shape[1]:
            break
    else:
        return False
    tile[1:3 + height, 1:3 + width] = 0
    draw_text(tile, 2, 2, text, LABEL_RGB, scale)
    return True


def _draw_sides(tile: np.ndarray) -> bool:
    """'R' at the middle of the tile's left edge and 'L' at its right, on a black backing: the tiles show the
    patient's right on the left (`io.slice_frame` turns any voxel order and direction so), which a picture read
    on its own does not say. At 2x on a tile at least SIDES_2X_PX wide, 1x down to SIDES_1X_PX; a narrower tile
    gets none (the letters would cover much of it). Whether drawn."""
    rows, width = tile.shape[:2]
    scale = 2 if width >= SIDES_2X_PX else 1 if width >= SIDES_1X_PX else 0
    if not scale or rows < 5 * scale + 4:
        return False
    y = (rows - 5 * scale) // 2
    for x, letter in ((2, "R"), (width - 2 - 3 * scale, "L")):
        tile[y - 1:y + 5 * scale + 1, x - 1:x + 3 * scale + 1] = 0
        draw_text(tile, y, x, letter, LABEL_RGB, scale)
    return True


HEADER_PX = 5 * 2 + 8  # the band above the mosaic that holds its title and legend (one line of them)


def _word_lines(text: str, rgb, width: int, scale: int) -> list:
    """`text` as (line, rgb) pieces, each at most `width` pixels wide where its words allow, broken at spaces."""
    if text_width(text, scale) <= width:
        return [(text, rgb)]
    lines = []
    for word in text.split(" "):
        if lines and text_width(lines[-1] + " " + word, scale) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return [(line, rgb) for line in lines if line]


def _with_header(canvas: np.ndarray, parts) -> np.ndarray:
    """The mosaic under a black band holding `parts`, (text, colour) pairs written one after another,
    a part that does not fit the line starting the next one (so a narrow mosaic keeps its whole
    legend); a part wider than the mosaic is broken between words over lines (a title's figures are never
    cut), and only a single word wider than the mosaic is cut a whole character at a time."""
    scale, gap, width = 2, 2 * 4 * 2, canvas.shape[1]
    parts = [piece for text, rgb in parts if text for piece in _word_lines(text, rgb, width - 8, scale)]
    if not parts:
        return canvas
    lines, x = [[]], 4
    for text, rgb in parts:
        if lines[-1] and x + text_width(text, scale) > width - 4:
            lines.append([])
            x = 4
        lines[-1].append((x, text, rgb))
        x += text_width(text, scale) + gap
    band = np.zeros((HEADER_PX + (len(lines) - 1) * (HEADER_PX - 4), width, 3), np.uint8)
    for number, line in enumerate(lines):
        for x, text, rgb in line:
            draw_text(band, 4 + number * (HEADER_PX - 4), x, text, rgb, scale)
    return np.concatenate([band, canvas], axis=0)


def render(image, mask, title: str | None = None, max_tiles: int = MAX_TILES, tile_px: int = TILE_PX,
           columns: int = COLUMNS, ventricles=None, slice_labels=None) -> np.ndarray:
    """The QC mosaic of an image and its 0/1 mask on the same grid, as an RGB uint8 array: the mask
    outlined; with `title`, a band above it says it (e.g. the case and its volume). With `ventricles` (a
    0/1 mask on the grid: the lateral ventricles the periventricular/deep split measured from), those
    outlined in blue under the lesions, with a legend; the slices shown are chosen by the lesions alone.
    `slice_labels`: the number to write on each axial slice (e.g. a DICOM series' Instance Numbers) instead
    of its index. Raises DeepWMLError when a mask is not on the image's grid."""
    check_on_grid(image, {"the mask": mask, "the ventricle mask": ventricles})
    lesion, _ = io.to_axial_stack(mask, dtype=np.uint8)
    labels = (lesion > 0).astype(np.uint8)
    colours, legend = {1: LESION_RGB}, []
    if ventricles is not None:
        inside, _ = io.to_axial_stack(ventricles, dtype=np.uint8)
        labels[(labels == 0) & (inside > 0)] = 2
        colours, legend = {2: VENTRICLE_RGB, 1: LESION_RGB}, [("WMH", LESION_RGB), ("lateral ventricles", VENTRICLE_RGB)]
    canvas = _mosaic(image, labels, colours, outline=True, max_tiles=max_tiles, tile_px=tile_px, columns=columns,
                     chosen_by=1, slice_labels=slice_labels)
    return _with_header(canvas, [(title, HEADER_RGB), *legend])


def render_comparison(image, prediction, reference, title: str | None = None,
                      names: tuple[str, str] = ("prediction", "reference"), max_tiles: int = MAX_TILES,
                      tile_px: int = TILE_PX, columns: int = COLUMNS) -> np.ndarray:
    """The mosaic of a prediction against a reference (both on the image's grid), filled by agreement:
    both (true positive) green, prediction only (false positive) red, reference only (false negative)
    blue, half transparent over the FLAIR, under a band with `title` and the legend (the two masks
    called `names`). Reference labels as in `metrics` (2 = ignore: coloured in neither), and every
    slice with either mask's lesion counts as a lesion slice."""
    from .metrics import reference_labels

    # each against the one it is checked against by the metrics and the commands: io's tolerance does not
    # add up, so two grids each within it of the reference's may be twice it apart
    check_on_grid(image, {f"the {names[1]} mask": reference})
    check_on_grid(reference, {f"the {names[0]} mask": prediction})
    lesion, ignore = reference_labels(reference)
    predicted = (voxels(prediction) >= 0.5) & ~ignore
    lesion = lesion & ~ignore
    categories = np.zeros(lesion.shape, np.uint8)
    categories[predicted & lesion] = 1
    categories[predicted & ~lesion] = 2
    categories[~predicted & lesion] = 3
    legend = [("both", COMPARISON_RGB[1]), (f"{names[0]} only", COMPARISON_RGB[2]), (f"{names[1]} only", COMPARISON_RGB[3])]
    return render_labels(image, like(categories, reference.GetSpacing(), reference.GetOrigin(), reference.GetDirection()),
                         COMPARISON_RGB, legend, title, max_tiles, tile_px, columns)


def render_labels(image, labels, colours: dict, legend, title: str | None = None, max_tiles: int = MAX_TILES,
                  tile_px: int = TILE_PX, columns: int = COLUMNS) -> np.ndarray:
    """The mosaic of a label map on the image's grid, each label in `colours` (value -> RGB) filled half
    transparent over the FLAIR, under a band with `title` and `legend` ((text, RGB) pairs); every slice
    with a non-zero label counts as a lesion slice (`deepwml change` draws its change labels so)."""
    check_on_grid(image, {"the label map": labels})
    stack, _ = io.to_axial_stack(labels, dtype=np.uint8)
    stack = np.where(np.isin(stack, list(colours)), stack, 0).astype(np.uint8)
    canvas = _mosaic(image, stack, colours, outline=False, max_tiles=max_tiles, tile_px=tile_px, columns=columns)
    return _with_header(canvas, [(title, HEADER_RGB), *legend])


def check_on_grid(image, overlays: dict) -> None:
    """Raise DeepWMLError when an overlay ({name: image}; None: none) is not on the image's voxel grid
    (within io's tolerance): drawn anyway, it would mark the wrong voxels, or fail on its shape."""
    for name, overlay in overlays.items():
        if overlay is not None:
            io.check_same_grid(overlay, image, name, "the FLAIR image drawn under it")


def grey_levels(voxels: np.ndarray) -> tuple[float | None, float, float]:
    """(the head threshold, or None when the image is flat; the grey window's low and high end): the head
    is above a tenth of the way from the background (0.5th percentile) to the bright end (99.5th), which
    holds for images offset or scaled anyhow; the window runs from the head's 1st to its 99.5th percentile."""
    if io.non_finite_count(voxels):
        finite = voxels[np.isfinite(voxels)]
        sample = finite[:: max(1, finite.size // 2_000_000)]
    else:  # the same sample, taken where the voxels lie: no copy of the volume (0.3 GB at 512 x 512 x 300)
        sample = voxels.flat[:: max(1, voxels.size // 2_000_000)]
    floor, top = _quantiles(sample, (0.005, 0.995)) if sample.size else (0.0, 1.0)
    threshold = floor + 0.1 * (top - floor)
    head_values = sample[sample > threshold]
    low, high = _quantiles(head_values, (0.01, 0.995)) if head_values.size else (floor, top)
    if not high > low:
        low, high = float(np.min(sample, initial=0)), float(np.max(sample, initial=1))
        high = high if high > low else low + 1
    return (threshold if top > floor else None), low, high


def _mosaic(image, labels: np.ndarray, colours: dict, outline: bool, max_tiles: int, tile_px: int,
            columns: int, chosen_by: int | None = None, slice_labels=None) -> np.ndarray:
    """The mosaic; the lesion slices it favours are those with any label, or with `chosen_by` only that one."""
    stack, frame = io.to_axial_stack(image, copy=False)  # only read: float32 voxels are not copied
    threshold, low, high = grey_levels(stack)
    voxel_head = stack > threshold if threshold is not None else np.ones(stack.shape, bool)
    head = voxel_head.reshape(stack.shape[0], -1).mean(axis=1) > 0.01
    marked = labels if chosen_by is None else labels == chosen_by
    slices = choose_slices(head, marked.reshape(labels.shape[0], -1).any(axis=1), max_tiles)
    direction = np.array(frame.direction).reshape(3, 3)
    if direction[2, frame.slice_axis] < 0:  # stored superior to inferior: shown from the bottom up all the same
        slices = slices[::-1]

    # the tiles show the in-plane box of the head and every label over all slices (and CROP_MARGIN_MM around
    # it), not the empty field: a mark outside the head (a false positive in the background) stays in view
    shown = voxel_head | (labels > 0)
    (r0, r1), (c0, c1) = _box(shown.any(axis=(0, 2)), frame.row_spacing_mm), _box(shown.any(axis=(0, 1)), frame.col_spacing_mm)
    rows_n, cols_n = r1 - r0, c1 - c0
    extent_rows, extent_cols = rows_n * frame.row_spacing_mm, cols_n * frame.col_spacing_mm
    pixel_mm = max(extent_rows, extent_cols) / tile_px
    row_index, row_starts = (r0 + i for i in _resample_indices(rows_n, frame.row_spacing_mm, pixel_mm))
    col_index, col_starts = (c0 + i for i in _resample_indices(cols_n, frame.col_spacing_mm, pixel_mm))
    th, tw = len(row_index), len(col_index)
    columns = max(1, min(columns, len(slices)))
    grid_rows = -(-len(slices) // columns)
    canvas = np.zeros((grid_rows * (th + GAP_PX) + GAP_PX, columns * (tw + GAP_PX) + GAP_PX, 3), np.uint8)
    for n, k in enumerate(slices):
        grey = stack[k][np.ix_(row_index, col_index)]
        grey = np.nan_to_num((grey - low) / (high - low), nan=0.0)
        tile = np.repeat((np.clip(grey, 0, 1) * 255).astype(np.uint8)[..., None], 3, axis=2)
        for value, rgb in colours.items():  # in order: later colours (the errors) over earlier ones
            where = _pooled(labels[k][r0:r1, c0:c1] == value, row_starts - r0, col_starts - c0)
            if outline:
                tile[in_plane_outline(where)] = rgb
            else:
                tile[where] = (0.45 * tile[where] + 0.55 * np.array(rgb)).astype(np.uint8)
        _draw_number(tile, k if slice_labels is None else slice_labels[k])
        if n == 0:  # on every tile, one tile's L stood beside the next one's R ("L R") across the narrow gap
            _draw_sides(tile)
        y, x = GAP_PX + (n // columns) * (th + GAP_PX), GAP_PX + (n % columns) * (tw + GAP_PX)
        canvas[y:y + th, x:x + tw] = tile
    return canvas


def png_bytes(rgb: np.ndarray) -> bytes:
    """An RGB uint8 array (rows, columns, 3) as PNG file bytes (8-bit truecolour, no filter)."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected rows x columns x 3, got {rgb.shape}")
    h, w, _ = rgb.shape
    raw = np.concatenate([np.zeros((h, 1), np.uint8), rgb.reshape(h, w * 3)], axis=1).tobytes()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")
