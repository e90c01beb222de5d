"""A 3D image held in numpy (`Volume`) and NIfTI-1 reading and writing without SimpleITK.

`deepwml segment` on a NIfTI file reads it into a `Volume`, runs, and writes its NIfTI and
`.seg.nrrd` outputs from it, so the command never imports SimpleITK: that import alone is about
0.1 s of a 2 s run (see `deepwml bench`). Everything else in the library (DICOM, NRRD, MetaImage,
the Slicer module, evaluation, training) keeps using `SimpleITK.Image`; `Volume.to_sitk` converts.

Geometry follows SimpleITK exactly (tested on real and synthetic files): LPS physical space; size,
spacing and origin in voxel axis order (i, j, k); direction as 9 numbers, row-major, whose columns
are the voxel axes; the numpy array in (k, j, i) order like `sitk.GetArrayFromImage`.

Reading covers the unambiguous NIfTI-1 files clinical software writes: one 3D volume (or 4D with
one time point), a plain integer or float data type, no intensity scaling, lengths in mm (or units
unset), and a qform and/or sform that describe the same rigid grid with the header's voxel sizes.
Anything else returns None, and the caller reads the file with SimpleITK, whose rules then decide.
"""

from __future__ import annotations

import gzip
import math
import struct

import numpy as np

_DTYPES = {2: "u1", 4: "i2", 8: "i4", 16: "f4", 64: "f8", 256: "i1", 512: "u2", 768: "u4", 1024: "i8", 1280: "u8"}
_CODES = {np.dtype(v).newbyteorder("=").str[1:]: k for k, v in _DTYPES.items()}
_LPS = np.diag([-1.0, -1.0, 1.0])  # RAS (NIfTI) <-> LPS (ITK): flip x and y
_TOLERANCE = 1e-4


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


def parse_nifti(data: bytes) -> Volume | None:
    """A NIfTI-1 single-file image (.nii bytes) as a Volume, or None when it is outside the
    unambiguous subset this reader covers (see the module docstring)."""
    if len(data) < 352:
        return None
    for endian in "<>":
        if struct.unpack(endian + "i", data[:4])[0] == 348:
            break
    else:
        return None  # NIfTI-2 or not NIfTI
    if data[344:348] != b"n+1\0":
        return None

    def field(fmt: str, offset: int):
        return struct.unpack_from(endian + fmt, data, offset)

    dims = field("8h", 40)
    datatype = field("h", 70)[0]
    pixdim = field("8f", 76)
    vox_offset = int(field("f", 108)[0])
    slope, inter = field("2f", 112)
    qform_code, sform_code = field("2h", 252)
    if datatype not in _DTYPES or not (dims[0] == 3 or (dims[0] == 4 and dims[4] == 1)):
        return None
    if not (slope == 0 or (slope == 1 and inter == 0)) or math.isnan(slope) or math.isnan(inter):
        return None
    if data[123] & 0x07 not in (0, 2):  # lengths in metres or microns: SimpleITK converts them to mm
        return None
    size = [int(n) for n in dims[1:4]]
    spacing = np.array(pixdim[1:4], float)
    if min(size) < 1 or not np.all(np.isfinite(spacing)) or spacing.min() <= 0:
        return None
    affines = []
    if qform_code > 0:
        b, c, d = field("3f", 256)
        qfac = -1.0 if pixdim[0] < 0 else 1.0
        rotation = _quaternion_matrix(b, c, d)
        rotation[:, 2] *= qfac
        affines.append((rotation, np.array(field("3f", 268), float)))
    if sform_code > 0:
        rows = np.array([field("4f", 280), field("4f", 296), field("4f", 312)], float)
        norms = np.linalg.norm(rows[:, :3], axis=0)
        if not np.allclose(norms, spacing, rtol=_TOLERANCE) or norms.min() <= 0:
            return None
        affines.append((rows[:, :3] / norms, rows[:, 3]))
    if not affines:
        return None
    rotation, offset = affines[0]
    for other_rotation, other_offset in affines[1:]:
        if not (np.allclose(other_rotation, rotation, atol=_TOLERANCE)
                and np.allclose(other_offset, offset, atol=_TOLERANCE * max(1.0, float(np.abs(offset).max())))):
            return None  # qform and sform disagree: SimpleITK's rules decide
    if not _orthonormal(rotation):
        return None
    # ITK takes the sform when it has one (and it is a rotation), else the qform.
    rotation, offset = affines[-1]
    n = size[0] * size[1] * size[2]
    dtype = np.dtype(endian + _DTYPES[datatype])
    if len(data) < vox_offset + n * dtype.itemsize:
        return None  # truncated: the caller's checks explain it
    array = np.frombuffer(data, dtype=dtype, count=n, offset=vox_offset).reshape(size[::-1])
    array = array.astype(dtype.newbyteorder("="), copy=False)
    direction = _LPS @ rotation
    origin = _LPS @ offset
    return Volume(array, spacing, origin, direction.ravel())


def nifti_bytes(image, compresslevel: int = 1, time: tuple[float, float] | None = None) -> bytes:
    """A NIfTI-1 file (gzip-compressed when compresslevel > 0) of a Volume or SimpleITK.Image,
    with qform and sform both set (scanner anatomical), millimetres, like SimpleITK writes it.
    With `time` (origin, spacing), stored 4D with one time point: X, Y, Z, 1."""
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
    header = bytearray(352)
    struct.pack_into("<i", header, 0, 348)
    struct.pack_into("<8h", header, 40, 3 if time is None else 4, *array.shape[::-1], 1, 1, 1, 1)
    struct.pack_into("<2h", header, 70, code, array.dtype.itemsize * 8)
    struct.pack_into("<8f", header, 76, qfac, *spacing, 1.0 if time is None else time[1], 1.0, 1.0, 1.0)
    if time is not None:
        struct.pack_into("<f", header, 136, time[0])  # toffset (132 is slice_duration)
    struct.pack_into("<f", header, 108, 352.0)
    struct.pack_into("<2f", header, 112, 1.0, 0.0)
    header[123] = 2 | 8  # xyzt_units: millimetres, seconds
    struct.pack_into("<2h", header, 252, 1, 1)  # qform_code, sform_code: scanner anatomical
    struct.pack_into("<3f", header, 256, b, c, d)
    struct.pack_into("<3f", header, 268, *offset)
    for row in range(3):
        struct.pack_into("<4f", header, 280 + 16 * row, *srow[row])
    header[344:348] = b"n+1\0"
    raw = bytes(header) + array.tobytes()
    return gzip.compress(raw, compresslevel=compresslevel, mtime=0) if compresslevel > 0 else raw
