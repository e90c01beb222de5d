"""A 3D image held in numpy (`Volume`) and NIfTI reading (NIfTI-1 and -2) and writing (NIfTI-1) without SimpleITK.

`deepwml segment` on a NIfTI file reads it into a `Volume`, runs, and writes its NIfTI and
`.seg.nrrd` outputs from it, so the command never imports SimpleITK: that import alone is about
0.1 s of a 2 s run (see `deepwml bench`). Everything else in the library (DICOM, NRRD, MetaImage,
the Slicer module, evaluation, training) keeps using `SimpleITK.Image`; `Volume.to_sitk` converts.

Geometry follows SimpleITK exactly (tested on real and synthetic files): LPS physical space; size,
spacing and origin in voxel axis order (i, j, k); direction as 9 numbers, row-major, whose columns
are the voxel axes; the numpy array in (k, j, i) order like `sitk.GetArrayFromImage`.

Reading covers the unambiguous NIfTI-1 (and NIfTI-2) files clinical software writes: one 3D volume (or 4D with
one time point), a plain integer or float data type, no intensity scaling, lengths in mm (or units
unset), and a qform and/or sform that describe the same rigid grid with the header's voxel sizes.
Anything else returns None, and the caller reads the file with SimpleITK, whose rules then decide.
SimpleITK cannot read NIfTI-2 at all (ITK 5.4), so for NIfTI-2 this reader is the only one: the same
rules applied to its wider fields.
"""

from __future__ import annotations

import itertools
import math
import struct
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

_DTYPES = {2: "u1", 4: "i2", 8: "i4", 16: "f4", 64: "f8", 256: "i1", 512: "u2", 768: "u4", 1024: "i8", 1280: "u8"}
_CODES = {np.dtype(v).newbyteorder("=").str[1:]: k for k, v in _DTYPES.items()}
_LPS = np.diag([-1.0, -1.0, 1.0])  # RAS (NIfTI) <-> LPS (ITK): flip x and y
_TOLERANCE = 1e-4
_PIECE = 1 << 24  # bytes of voxels compressed at a time when writing


class Volume:
    """A scalar 3D image: numpy voxels (k, j, i) plus SimpleITK-style geometry.

    Offers the part of the `SimpleITK.Image` interface the segmentation path uses, so functions
    that only read geometry and voxels take either.
    """

    __slots__ = ("array", "_spacing", "_origin", "_direction")

    def __init__(self, array: np.ndarray, spacing, origin, direction):
        if array.ndim != 3:
            raise ValueError(f"a Volume is 3D, got {array.ndim}D")
        self.array = array
        self._spacing = tuple(float(v) for v in spacing)
        self._origin = tuple(float(v) for v in origin)
        self._direction = tuple(float(v) for v in direction)

    def GetSize(self) -> tuple:
        return tuple(int(n) for n in self.array.shape[::-1])

    def GetSpacing(self) -> tuple:
        return self._spacing

    def GetOrigin(self) -> tuple:
        return self._origin

    def GetDirection(self) -> tuple:
        return self._direction

    def GetDimension(self) -> int:
        return 3

    def GetNumberOfComponentsPerPixel(self) -> int:
        return 1

    def to_sitk(self):
        return like(self.array, self._spacing, self._origin, self._direction)

    def __repr__(self) -> str:
        return f"Volume(size={self.GetSize()}, dtype={self.array.dtype}, spacing={self._spacing})"


def voxels(image) -> np.ndarray:
    """The voxels of a `Volume` or a `SimpleITK.Image` as numpy (k, j, i), without a copy."""
    if isinstance(image, Volume):
        return image.array
    import SimpleITK as sitk

    return sitk.GetArrayViewFromImage(image)


def like(array: np.ndarray, spacing, origin, direction, kind: type | None = None):
    """An image of `kind` (Volume, or SimpleITK.Image when None) with these voxels and geometry."""
    if kind is Volume:
        return Volume(array, spacing, origin, direction)
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(spacing))
    image.SetOrigin(tuple(origin))
    image.SetDirection(tuple(direction))
    return image


# ---------------------------------------------------------------------------------------------
# NIfTI-1


def _quaternion_matrix(b: float, c: float, d: float) -> np.ndarray:
    a = 1.0 - (b * b + c * c + d * d)
    if a < 1e-7:  # a 180 degree rotation: the header stores b, c, d of a unit quaternion
        a, scale = 0.0, 1.0 / math.sqrt(b * b + c * c + d * d)
        b, c, d = b * scale, c * scale, d * scale
    else:
        a = math.sqrt(a)
    return np.array([
        [a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
        [2 * (b * c + a * d), a * a + c * c - b * b - d * d, 2 * (c * d - a * b)],
        [2 * (b * d - a * c), 2 * (c * d + a * b), a * a + d * d - c * c - b * b],
    ])


def _matrix_quaternion(r: np.ndarray) -> tuple[float, float, float]:
    """(b, c, d) of the unit quaternion of a proper rotation matrix (a >= 0)."""
    trace = r[0, 0] + r[1, 1] + r[2, 2]
    if trace > 0:
        s = 2 * math.sqrt(1 + trace)
        a, b, c, d = s / 4, (r[2, 1] - r[1, 2]) / s, (r[0, 2] - r[2, 0]) / s, (r[1, 0] - r[0, 1]) / s
    elif r[0, 0] > r[1, 1] and r[0, 0] > r[2, 2]:
        s = 2 * math.sqrt(1 + r[0, 0] - r[1, 1] - r[2, 2])
        a, b, c, d = (r[2, 1] - r[1, 2]) / s, s / 4, (r[0, 1] + r[1, 0]) / s, (r[0, 2] + r[2, 0]) / s
    elif r[1, 1] > r[2, 2]:
        s = 2 * math.sqrt(1 + r[1, 1] - r[0, 0] - r[2, 2])
        a, b, c, d = (r[0, 2] - r[2, 0]) / s, (r[0, 1] + r[1, 0]) / s, s / 4, (r[1, 2] + r[2, 1]) / s
    else:
        s = 2 * math.sqrt(1 + r[2, 2] - r[0, 0] - r[1, 1])
        a, b, c, d = (r[1, 0] - r[0, 1]) / s, (r[0, 2] + r[2, 0]) / s, (r[1, 2] + r[2, 1]) / s, s / 4
    if a < 0:
        b, c, d = -b, -c, -d
    return float(b), float(c), float(d)


def _orthonormal(direction: np.ndarray) -> bool:
    return bool(np.allclose(direction.T @ direction, np.eye(3), atol=_TOLERANCE))


# Where NIfTI-1 and NIfTI-2 keep the fields read here: (format, offset); NIfTI-2 has the same fields in
# 64-bit integers and doubles, in another order (nifti2.h)
_LAYOUTS = {
    348: {"magic": (344, b"n+1\0"), "dims": ("8h", 40), "datatype": ("h", 70), "pixdim": ("8f", 76),
          "vox_offset": ("f", 108), "scaling": ("2f", 112), "units": ("B", 123), "codes": ("2h", 252),
          "quatern": ("3f", 256), "qoffset": ("3f", 268), "srow": ("4f", 280)},
    540: {"magic": (4, b"n+2\0"), "dims": ("8q", 16), "datatype": ("h", 12), "pixdim": ("8d", 104),
          "vox_offset": ("q", 168), "scaling": ("2d", 176), "units": ("i", 500), "codes": ("2i", 344),
          "quatern": ("3d", 352), "qoffset": ("3d", 376), "srow": ("4d", 400)},
}


def nifti_version(data: bytes) -> tuple[int, str] | None:
    """(1 or 2, the byte order "<" or ">") of a NIfTI header, by its size field; None when it is neither."""
    if len(data) >= 4:
        for endian in "<>":
            size = struct.unpack(endian + "i", data[:4])[0]
            if size in _LAYOUTS:
                return (1 if size == 348 else 2), endian
    return None


def parse_nifti(data: bytes, native: bool = True) -> Volume | None:
    """A NIfTI-1 or NIfTI-2 single-file image (.nii bytes) as a Volume, or None when it is outside the
    unambiguous subset this reader covers (see the module docstring). With `native` False, a big-endian file's
    voxels stay a view of `data` in their byte order (no copy), for a caller that converts them anyway."""
    version = nifti_version(data)
    if version is None:
        return None
    layout = _LAYOUTS[348 if version[0] == 1 else 540]
    endian = version[1]
    at, magic = layout["magic"]
    if len(data) < (352 if version[0] == 1 else 544) or data[at:at + 4] != magic:
        return None

    def field(name: str, offset: int = 0):
        fmt, at = layout[name]
        return struct.unpack_from(endian + fmt, data, at + offset)

    dims = field("dims")
    datatype = field("datatype")[0]
    pixdim = field("pixdim")
    vox_offset = int(field("vox_offset")[0])
    slope, inter = field("scaling")
    qform_code, sform_code = field("codes")
    units = field("units")[0]
    if datatype not in _DTYPES or not (dims[0] == 3 or (dims[0] == 4 and dims[4] == 1)):
        return None
    # No scaling: slope 0 (NIfTI's "unset": the intercept is ignored too) or 1 with intercept 0. ITK adds an intercept
    # even beside a slope of 0 (float32 voxels): such a NIfTI-1 file goes to SimpleITK, whose reading Slicer shares.
    if not (slope == 0 or (slope == 1 and inter == 0)) or math.isnan(slope) or math.isnan(inter) \
            or (slope == 0 and inter != 0 and version[0] == 1):
        return None
    if units & 0x07 not in (0, 2):  # lengths in metres or microns: SimpleITK converts them to mm
        return None
    size = [int(n) for n in dims[1:4]]
    spacing = np.array(pixdim[1:4], float)
    if min(size) < 1 or not np.all(np.isfinite(spacing)) or spacing.min() <= 0:
        return None
    if vox_offset < (352 if version[0] == 1 else 544):
        return None  # voxels inside the header: SimpleITK's rules decide
    affines = []
    if qform_code > 0:
        b, c, d = field("quatern")
        qfac = -1.0 if pixdim[0] < 0 else 1.0
        rotation = _quaternion_matrix(b, c, d)
        rotation[:, 2] *= qfac
        affines.append((rotation, np.array(field("qoffset"), float)))
    if sform_code > 0:
        step = struct.calcsize(layout["srow"][0])
        rows = np.array([field("srow", step * row) for row in range(3)], float)
        norms = np.linalg.norm(rows[:, :3], axis=0)
        if not np.allclose(norms, spacing, rtol=_TOLERANCE) or norms.min() <= 0:
            return None
        affines.append((rows[:, :3] / norms, rows[:, 3]))
    if not affines:
        return None
    if qform_code > 0 and sform_code > 1 and version[0] == 1:  # (NIfTI-2: SimpleITK cannot read it at all)
        # both set, the sform aligned to another scan or a template (codes 2-5): ITK takes the sform only when
        # a comparison of the two (element-wise, then by SVD) says they match, else the qform, whose float32
        # quaternion gives directions a few 1e-6 away: beyond SimpleITK's 1e-6 same-space tolerance, so a mask
        # written on the other one would not be on the FLAIR's grid for ITK. SimpleITK decides.
        return None
    rotation, offset = affines[0]
    for other_rotation, other_offset in affines[1:]:
        if not (np.allclose(other_rotation, rotation, atol=_TOLERANCE)
                and np.allclose(other_offset, offset, atol=_TOLERANCE * max(1.0, float(np.abs(offset).max())))):
            return None  # qform and sform disagree: SimpleITK's rules decide
    if not _orthonormal(rotation):
        return None
    # ITK takes a scanner-anatomical sform (code 1) when it is a rotation, or the only one set.
    rotation, offset = affines[-1]
    n = size[0] * size[1] * size[2]
    dtype = np.dtype(endian + _DTYPES[datatype])
    if len(data) < vox_offset + n * dtype.itemsize:
        return None  # truncated: the caller's checks explain it
    array = np.frombuffer(data, dtype=dtype, count=n, offset=vox_offset).reshape(size[::-1])
    if native:
        array = array.astype(dtype.newbyteorder("="), copy=False)
    direction = _LPS @ rotation
    origin = _LPS @ offset
    return Volume(array, spacing, origin, direction.ravel())


@dataclass(frozen=True)
class NiftiGeometry:
    """The fields of a NIfTI header that place its voxels in space (`nifti_geometry`), carried from an input to
    its NIfTI outputs (`nifti_bytes`) as they stand: where qform and sform disagree (an sform aligned by FSL or SPM
    beside the scanner's qform) or lengths are not mm, SimpleITK (and 3D Slicer) takes one rule, FSL and nibabel
    another; an output with the input's own fields lies where each of them places the input."""
    size: tuple[int, int, int]
    qform_code: int
    sform_code: int
    quatern: tuple[float, float, float]  # b, c, d
    qoffset: tuple[float, float, float]
    pixdim: tuple[float, float, float, float]  # qfac, then the voxel sizes along i, j, k
    srow: tuple[float, ...]  # srow_x, srow_y, srow_z: 12 numbers
    length_unit: int  # xyzt_units & 7


def nifti_geometry(header: bytes) -> NiftiGeometry | None:
    """The NiftiGeometry of a NIfTI-1 or -2 header (a file's first 540 bytes, or a pair's .hdr); None when it is
    none."""
    version = nifti_version(header)
    if version is None or len(header) < (348 if version[0] == 1 else 540):
        return None
    layout, endian = _LAYOUTS[348 if version[0] == 1 else 540], version[1]

    def field(name: str, count: int | None = None) -> tuple:
        fmt, at = layout[name]
        if count is not None:  # `count` numbers from the field's start
            fmt = f"{count}{fmt[-1]}"
        return struct.unpack_from(endian + fmt, header, at)

    return NiftiGeometry(tuple(int(n) for n in field("dims")[1:4]), *(int(c) for c in field("codes")),
                         field("quatern"), field("qoffset"), field("pixdim", 4), field("srow", 12),  # rows contiguous
                         int(field("units")[0]) & 0x07)


def nifti_bytes(image, compresslevel: int = 1, time: tuple[float, float] | None = None,
                geometry: NiftiGeometry | None = None, description: str = "") -> bytes:
    """A NIfTI-1 file (gzip-compressed when compresslevel > 0) of a Volume or SimpleITK.Image,
    with qform and sform both set (scanner anatomical), millimetres, like SimpleITK writes it; with `geometry`
    (the input's, of the image's size), with the input's own placing fields instead.
    With `time` (origin, spacing), stored 4D with one time point: X, Y, Z, 1. `description`: the header's descrip
    (ASCII, at most 79 characters)."""
    return b"".join(nifti_pieces(image, compresslevel, time, geometry, description))


def nifti_pieces(image, compresslevel: int = 1, time: tuple[float, float] | None = None,
                 geometry: NiftiGeometry | None = None, description: str = "") -> Iterator:
    """nifti_bytes' file as pieces (bytes-like) to write one after another, so that a file is written without
    all of it in memory: the compressed probability map of a 1024 x 1024 x 400 scan (0.9 GB) was held twice, as
    its pieces and joined, the peak of --save-probabilities. The image is checked and the header made at once,
    not when the first piece is asked for."""
    array = np.ascontiguousarray(voxels(image))
    if array.ndim != 3:
        raise ValueError(f"NIfTI writing here covers 3D images, got {array.ndim}D")
    code = _CODES.get(array.dtype.newbyteorder("=").str[1:])
    if code is None:
        raise ValueError(f"no NIfTI data type for {array.dtype}")
    array = array.astype(array.dtype.newbyteorder("<"), copy=False)
    spacing = np.array(image.GetSpacing(), float)
    direction = np.array(image.GetDirection(), float).reshape(3, 3)
    rotation = _LPS @ direction  # columns: voxel axes in RAS
    offset = _LPS @ np.array(image.GetOrigin(), float)
    qfac = 1.0
    if np.linalg.det(rotation) < 0:
        qfac = -1.0
    proper = rotation.copy()
    proper[:, 2] *= qfac
    b, c, d = _matrix_quaternion(proper)
    srow = np.column_stack([rotation * spacing[None, :], offset])
    codes, length_unit = (1, 1), 2  # scanner anatomical; millimetres
    if geometry is not None:
        if geometry.size != array.shape[::-1]:
            raise ValueError(f"a geometry of size {geometry.size} for an image of size {array.shape[::-1]}")
        codes, length_unit = (geometry.qform_code, geometry.sform_code), geometry.length_unit
        qfac, spacing, (b, c, d), offset = geometry.pixdim[0], geometry.pixdim[1:], geometry.quatern, geometry.qoffset
        srow = np.reshape(geometry.srow, (3, 4))
    header = bytearray(352)
    struct.pack_into("<i", header, 0, 348)
    struct.pack_into("<8h", header, 40, 3 if time is None else 4, *array.shape[::-1], 1, 1, 1, 1)
    struct.pack_into("<2h", header, 70, code, array.dtype.itemsize * 8)
    struct.pack_into("<8f", header, 76, qfac, *spacing, 1.0 if time is None else time[1], 1.0, 1.0, 1.0)
    if time is not None:
        struct.pack_into("<f", header, 136, time[0])  # toffset (132 is slice_duration)
    struct.pack_into("<f", header, 108, 352.0)
    struct.pack_into("<2f", header, 112, 1.0, 0.0)
    header[123] = length_unit | 8  # xyzt_units: the length unit, seconds
    struct.pack_into("<2h", header, 252, *codes)  # qform_code, sform_code
    struct.pack_into("<3f", header, 256, b, c, d)
    struct.pack_into("<3f", header, 268, *offset)
    for row in range(3):
        struct.pack_into("<4f", header, 280 + 16 * row, *srow[row])
    if len(description.encode("ascii")) > 79:
        raise ValueError(f"a NIfTI descrip holds 79 characters, not {len(description)}")
    header[148:148 + len(description)] = description.encode("ascii")  # descrip (80 bytes, 0-terminated)
    header[344:348] = b"n+1\0"
    # The voxels as they lie, not copied into bytes and again into header + bytes: at 1024 x 1024 x 400 the
    # probability map (--save-probabilities) was 3.4 GB of copies, the peak of the whole run.
    body = memoryview(array).cast("B")
    if compresslevel <= 0:
        return iter((bytes(header), body))
    return gzip_pieces(itertools.chain((bytes(header),), (body[start:start + _PIECE]
                                                            for start in range(0, len(body), _PIECE))), compresslevel)


def gzip_pieces(pieces: Iterable, compresslevel: int) -> Iterator[bytes]:
    """gzip.compress(b"".join(pieces), compresslevel, mtime=0) (zlib's gzip wrapper) a piece at a time: neither the
    pieces joined nor the whole compressed file is held at once."""
    deflate = zlib.compressobj(compresslevel, zlib.DEFLATED, 31)
    for piece in pieces:
        yield deflate.compress(piece)
    yield deflate.flush()
