"""Reading and writing volumes and segmentations, and the canonical axial slice order.

Geometry stays in `SimpleITK.Image` (LPS physical space) everywhere in the library. The 2D network
works on *axial planes of the voxel grid*: the planes perpendicular to the voxel axis whose
direction is closest to physical superior (`axial_axis`). For a clinical axial 2D FLAIR that axis
is the thick acquisition axis, so every network slice is one acquired slice and nothing is
interpolated across slices. For a sagittal or coronal acquisition (thick axis left-right or
anterior-posterior) the network still runs on axial planes of the voxel grid; each such plane then
has the thick spacing along one in-plane direction, which the in-plane resampling to the network
grid accounts for. That regime was not validated; `acquisition_plane` names it so the report and
the CLI can warn (a (near-)isotropic volume, whose geometry cannot tell its plane, is named ISOTROPIC).

Converting to the axial stack only permutes and flips voxel axes (no interpolation), so
`from_axial_stack(to_axial_stack(image))` gives back the exact grid.

`read_image(path, light=True)` reads a plain NIfTI file into a numpy `volume.Volume` instead (no
SimpleITK import: `deepwml segment` uses it); the functions of the segmentation path take either,
and `from_axial_stack` returns the kind of image the stack came from.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import errno
import gzip
import json
import logging
import math
import os
import re
import shutil
import struct
import tempfile
import threading
import time
import zlib
from dataclasses import dataclass
from io import StringIO
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

import numpy as np

from .errors import DeepWMLError
from .volume import NiftiGeometry, Volume, gzip_pieces, like, nifti_geometry, nifti_pieces, nifti_version, parse_nifti, voxels

if TYPE_CHECKING:
    import SimpleITK as sitk

# .hdr (.hdr.gz): a NIfTI-1 pair's header, beside its .img (.img.gz)
IMAGE_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".hdr", ".hdr.gz")
SEGMENTATION_EXTENSION = ".seg.nrrd"

# Two grids count as the same when they differ by less than these (floating point noise from
# format conversions and the RAS/LPS round trip).
_SPACING_RTOL = 1e-4
_ORIGIN_TOL_FRACTION = 1e-2  # of the smallest voxel spacing
_DIRECTION_TOL = 1e-4

_PLANE_NAMES = ("sagittal", "coronal", "axial")
# `acquisition_plane` of a volume whose voxel sizes are within NEAR_ISOTROPIC of each other: a 3D acquisition
# (or a volume resampled so), whose plane of acquisition the geometry cannot tell
ISOTROPIC = "isotropic"
NEAR_ISOTROPIC = 1.2

_UMASK = os.umask(0)
os.umask(_UMASK)

WINDOWS = os.name == "nt"
WINDOWS_ILLEGAL = '<>:"|?*'  # characters Windows refuses in a file name (a colon names a drive or a stream)


def shared_data_dir() -> Path | None:
    """The folder of public test data (`DEEPWML_SHARED_DATA`, else `<repo>/../shared/data`), or None."""
    env = os.environ.get("DEEPWML_SHARED_DATA")
    candidate = Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"
    return candidate if candidate.is_dir() else None


def case_name(path: str | os.PathLike) -> str:
    """A case name: the file name without its image extensions, or a DICOM folder's name; for the root of
    a drive (E:\\ on Windows: `drive_E`) or of a network share (`server_share`), that name, `root` for /."""
    p = Path(path)
    name = p.name if p.name not in ("", ".", "..") else Path(os.path.abspath(p)).name  # "deepwml segment ."
    if not name:  # a drive's root (a hospital CD) or a network share's: named after the drive or share, not ""
        drive = Path(os.path.abspath(p)).drive
        if len(drive) == 2 and drive[1] == ":":
            return f"drive_{drive[0].upper()}"
        return re.sub(r"[^\w.-]+", "_", drive).strip("_.") or "root"
    for ext in (SEGMENTATION_EXTENSION,) + IMAGE_EXTENSIONS + (".dcm",):
        if name.lower().endswith(ext):
            # a file named only by its extension (".nii.gz"): its folder's name, not "" (outputs "_wmh.nii.gz")
            return name[: -len(ext)] or case_name(Path(os.path.abspath(p)).parent)
    return name


def is_nifti(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith((".nii", ".nii.gz"))


def is_nifti_pair(path: str | os.PathLike) -> bool:
    """A header of a two-file NIfTI-1 (`.hdr` + `.img`, as SPM writes; `.hdr.gz` + `.img.gz` compressed), or of
    an Analyze 7.5 pair (refused)."""
    return str(path).lower().endswith((".hdr", ".hdr.gz"))


def _pair_parts(header: Path) -> tuple[str, str, str]:
    """A pair's header name in three: its stem, '.hdr' (as written: '.HDR'...) and '.gz' when compressed, else ''."""
    name = header.name
    gz = name[-3:] if name.lower().endswith(".gz") else ""
    stem = name[:len(name) - len(gz) - 4]
    return stem, name[len(stem):len(stem) + 4], gz


def is_image_file(path: str | os.PathLike) -> bool:
    return Path(path).name.lower().endswith(IMAGE_EXTENSIONS)


OUTPUT_FORMATS = ("same", "nii.gz", "nrrd", "mha")
OUTPUT_EXTENSIONS = tuple("." + kind for kind in OUTPUT_FORMATS if kind != "same")  # what image outputs end in


def output_extension(input_path: str | os.PathLike, output_format: str = "same") -> str:
    """The extension of the image outputs for an input: `output_format`, or with "same" the input's
    own format (.nii.gz for NIfTI, .nrrd for NRRD, .mha for MetaImage) and .nrrd for a DICOM series.
    NIfTI keeps the origin and directions in single precision, so a mask written as NIfTI for an input
    read in double precision (NRRD, MetaImage, DICOM) sits a few micrometres off the input's grid,
    enough for SimpleITK to call them different spaces; in its own format the grid is exact."""
    if output_format not in OUTPUT_FORMATS:
        raise DeepWMLError(f"unknown output format {output_format!r}; choose one of {', '.join(OUTPUT_FORMATS)}")
    if output_format != "same":
        return "." + output_format
    name = Path(input_path).name.lower()
    if is_nifti(name) or is_nifti_pair(name):  # a pair's outputs: one .nii.gz file each
        return ".nii.gz"
    if name.endswith((".mha", ".mhd")):
        return ".mha"
    return ".nrrd"


def _utf8_code_page() -> bool:
    """Whether this Windows process's ANSI code page is UTF-8 (65001: Windows' 'Use Unicode UTF-8 for worldwide
    language support', or an application's manifest, as 3D Slicer's): SimpleITK's file names then reach
    Windows whole."""
    try:
        import ctypes

        return ctypes.windll.kernel32.GetACP() == 65001
    except (AttributeError, OSError):
        return False


def _narrow_name_fails(text: str) -> bool:
    """Whether SimpleITK cannot open `text` by name: on Windows, a path with letters outside ASCII while the
    code page is not UTF-8. ITK opens files by narrow (char) names, which Windows reads in the ANSI code page,
    so the UTF-8 bytes SimpleITK hands over name another file (SimpleITK #651, #795, #1255; ITK #4388, #6739)."""
    return WINDOWS and not text.isascii() and not _utf8_code_page()


def _short_path(path: str) -> str | None:
    """Windows' short (8.3) name of an existing file or folder (C:\\DONNE~1 for C:\\Données), or None. Where a
    volume makes no short names (often turned off on volumes other than the system's; many network shares)
    Windows gives the long name back, and a short name may keep letters of the OEM code page (É)."""
    try:
        import ctypes

        get = ctypes.windll.kernel32.GetShortPathNameW
    except (AttributeError, OSError):
        return None
    size = get(path, None, 0)
    buffer = ctypes.create_unicode_buffer(size or 1)
    return buffer.value if size and get(path, buffer, size) else None


def _ascii_temp_folders() -> list[str]:
    """Folders with ASCII paths for SimpleITK's private copies: the user's temporary folder (TEMP), or its short
    name (C:\\Users\\ZO~1\\... for Zoë's); else Windows' own Temp, where a user's files are readable to that
    user alone. Not C:\\Users\\Public or ProgramData: every user of the computer can read those, no place for a
    patient's scan."""
    temp = tempfile.gettempdir()
    root = os.environ.get("SystemRoot")
    found = []
    for folder in (temp, _short_path(temp), os.path.join(root, "Temp") if root else None):
        if folder and folder.isascii() and folder not in found and os.path.isdir(folder):
            found.append(folder)
    return found


COPIES_PREFIX = "deepwml-itk-"  # `itk_names`' private folders in TEMP
STALE_COPIES_S = 24 * 3600  # such a folder this long untouched was left by a run that was killed
_swept: set[str] = set()


def _sweep_stale_copies(folder: str) -> None:
    """Remove the private copies (`COPIES_PREFIX` folders) an earlier run left in `folder` when it was killed
    outright (Task Manager's End task, a power cut: no clean-up runs), untouched for over STALE_COPIES_S: scans
    of patients would stay in TEMP for good. Folders of that prefix alone; once per folder and process, before
    `itk_names` makes one there; what cannot be removed (another user's, one in use) is left, silently."""
    if folder in _swept:
        return
    _swept.add(folder)
    cutoff = time.time() - STALE_COPIES_S
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        try:
            if (entry.name.startswith(COPIES_PREFIX) and entry.is_dir(follow_symlinks=False)
                    and entry.stat(follow_symlinks=False).st_mtime < cutoff):
                shutil.rmtree(entry.path, ignore_errors=True)
        except OSError:
            continue


def windows_path_hint(path: str | os.PathLike) -> str:
    """For a path SimpleITK cannot open by name (`_narrow_name_fails`) that `itk_names` could not route either
    (no temporary folder with an ASCII path): a hint to add to an error of the image library, which says only
    that it cannot read or write. Else ""."""
    if not _narrow_name_fails(str(path)) or _ascii_temp_folders():
        return ""
    return ("; on Windows the image library cannot open paths with letters outside ASCII (é, ü, ...), and the "
            "temporary folder DeepWML copies such files to has them too: set TEMP to a folder whose path has none, "
            "move the files to such a folder, or turn on Windows' 'Use Unicode UTF-8 for worldwide language "
            "support' (Region settings)")


def _pair_data_name(header: Path) -> str | None:
    """The name of a NIfTI/Analyze `.hdr`'s voxel file: its own name with `.img` (in the header's case, else the
    other; `.img.gz` for a `.hdr.gz`), or None when there is none."""
    stem, hdr, gz = _pair_parts(header)
    for ext in ((".IMG", ".img") if hdr == ".HDR" else (".img", ".IMG")):
        if (header.parent / (stem + ext + gz)).is_file():
            return stem + ext + gz
    return None


def _data_file_field(header: Path) -> tuple[str, list[str]] | None:
    """A detached header's (.mhd: ElementDataFile; .nhdr: data file) field as written and the file names it
    gives (one, or those of a LIST); for a NIfTI pair's .hdr its .img; None for another format, an unreadable
    file or no such field."""
    if is_nifti_pair(header):
        name = _pair_data_name(header)
        return (name, [name]) if name else None
    if not header.name.lower().endswith((".mhd", ".nhdr")):
        return None
    try:
        with open(header, "rb") as f:
            text = f.read(1 << 20).decode("utf-8", "replace")  # a header, or the start of data stored after it
    except OSError:
        return None
    field = re.search(r"^[ \t]*(?:ElementDataFile[ \t]*=|data ?file[ \t]*:)[ \t]*(.*?)[ \t]*$", text,
                      re.IGNORECASE | re.MULTILINE)
    if field is None:
        return None
    value = field.group(1)
    names = text[field.end():].splitlines() if value.upper().startswith("LIST") else \
        _numbered_files(value, header) or [value]
    return value, [n.strip() for n in names if n.strip()]


# More files than any scan has slices: a numbered pattern naming more is a header written wrong, not a scan (one
# counting to 2e9 took the memory of the machine to list its names)
MAX_PATTERN_FILES = 100_000


def _numbered_files(value: str, header: Path | None = None) -> list[str] | None:
    """The file names of a detached header's numbered pattern, 'slice%03d.raw 1 24 1' (NRRD may add a
    sub-dimension after): from the first number to the second, inclusive, by the third; None for a plain name.
    A pattern of more than MAX_PATTERN_FILES files is refused."""
    parts = value.split()
    if len(parts) not in (4, 5) or "%" not in parts[0]:
        return None
    try:
        low, high, step = (int(p) for p in parts[1:4])
        numbers = range(low, high + (1 if step > 0 else -1), step) if step else None
    except (TypeError, ValueError):  # not a pattern of one whole number
        return None
    count = max(0, (high - low) // step + 1) if step else 0  # len(numbers) overflows past 2^63 numbers
    if count > MAX_PATTERN_FILES:
        raise DeepWMLError(f"{header or 'the header'}: its data file pattern '{value}' names {count:,} "
                           "files, more than any scan has slices; correct the header's first and last numbers to "
                           "those of its slice files")
    try:
        return None if numbers is None else [parts[0] % k for k in numbers]
    except (TypeError, ValueError):  # a '%' that is not one whole number's place
        return None


def _detached_data_files(header: Path) -> list[str]:
    """The data files a detached header (.mhd, .nhdr) names relative to its folder (one, or a LIST): they
    travel with it."""
    value, names = _data_file_field(header) or ("", [])
    return [n for n in names if not os.path.isabs(n) and (header.parent / n).is_file()]


def _leading_ups(name: str) -> int:
    """How many folders up a relative file name first goes ("../../v.raw": 2)."""
    parts = Path(os.path.normpath(name)).parts
    return next((k for k, part in enumerate(parts) if part != ".."), len(parts))


def _stage(source: Path, place: Path, write: bool) -> str:
    """`itk_names`' second way: the name in `place` (a new folder with an ASCII path) for `source`, which is
    copied there first unless it is to be written."""
    place.mkdir()
    if write:
        return str(place / (source.name if source.name.isascii() else "image" + _extension(source)))
    try:
        if source.is_dir():  # for GDCM to search: the folder's own files (their names mean nothing to DICOM)
            for number, f in enumerate(sorted(source.iterdir())):
                if not f.name.startswith(".") and f.is_file():
                    shutil.copyfile(f, place / (f.name if f.name.isascii() else f"file{number}"))
            return str(place)
        name = source.name if source.name.isascii() else "image" + _extension(source)
        companions = _detached_data_files(source)
        if is_nifti_pair(source) and companions:  # found by its name beside the header: renamed with it
            shutil.copyfile(source, place / name)
            stem, _, gz = _pair_parts(Path(name))
            shutil.copyfile(source.parent / companions[0], place / (stem + companions[0][-4 - len(gz):]))
            return str(place / name)
        # a data file named from a folder above ("../raw/v.raw"): the header goes as many folders down, so
        # that every copy stays inside `place` (and goes with it) instead of landing beside it in TEMP
        ups = max((_leading_ups(c) for c in companions), default=0)
        base = place.joinpath(*[f"h{k}" for k in range(ups)])
        base.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, base / name)
        for companion in companions:
            target = Path(os.path.normpath(base / companion))
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source.parent / companion, target)
        return str(base / name)
    except OSError as exc:
        raise DeepWMLError(f"{source}: the image library cannot open a path with letters outside ASCII on this Windows, "
                           f"and copying it to {place.parent} failed ({exc.strerror or exc}); free space there, or "
                           f"move the files to a folder whose path has none") from exc


@contextlib.contextmanager
def itk_names(*paths: str | os.PathLike, write: bool = False):
    """The names to give SimpleITK for `paths` (files; for reading also a folder, for GDCM to search), as a
    list; with `write`, the files SimpleITK writes under those names within the block (single-file formats: the
    outputs are NIfTI, NRRD, MetaImage .mha, DICOM and transforms) end up at `paths`.

    Where SimpleITK cannot open a path by name (`_narrow_name_fails`: Windows, letters outside ASCII),
    1. the path through the short (8.3) name of its folder (of itself, a folder), when that is ASCII and so is
       the file's own name: kept whole, as ITK chooses its reader or writer by the extension, which a short
       name cuts to three letters (FLAIR~1.NRR). Read and written in place, nothing copied. Else
    2. a private folder with an ASCII path (`_ascii_temp_folders`): each file read is copied into it first
       (with the data files a .mhd or .nhdr names; a folder's files), each file written is copied to its path
       when the block ends. A copy rather than a link: a hard link needs the same volume (the scans are often
       on another drive or a share) and a symbolic link needs rights users lack. It is removed, also on error;
       those a killed run left behind are swept the next time one is made there (`_sweep_stale_copies`).
    3. Else (TEMP under a user name with such letters, on a volume without short names) the names as they are:
       SimpleITK fails, and `windows_path_hint` says what to do."""
    texts = [text_path(p) for p in paths]
    if not any(_narrow_name_fails(t) for t in texts):
        yield texts
        return
    names: list[str | None] = [t if not _narrow_name_fails(t) else None for t in texts]
    for k, text in enumerate(texts):
        if names[k] is None:
            full = os.path.abspath(text)
            folder, name = (full, "") if os.path.isdir(full) else os.path.split(full)
            short = _short_path(folder) if name.isascii() else None
            if short and short.isascii():
                names[k] = os.path.join(short, name) if name else short
    if all(names):
        yield names
        return
    staging = None
    for folder in _ascii_temp_folders():
        _sweep_stale_copies(folder)
        try:
            staging = Path(tempfile.mkdtemp(prefix=COPIES_PREFIX, dir=folder))
            break
        except OSError:
            continue
    if staging is None:
        yield texts
        return
    staged = {}
    try:
        for k, text in enumerate(texts):
            if names[k] is None:
                names[k] = staged[k] = _stage(Path(text), staging / str(k), write)
        yield names
        for k, name in staged.items() if write else ():
            if os.path.exists(name):
                shutil.copyfile(name, texts[k])
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def text_path(path: str | os.PathLike) -> str:
    """`str(path)` for SimpleITK, refused with a one-line DeepWMLError when it is not UTF-8 text (a Latin-1
    byte in a file or folder name): ITK aborts the whole process on such a name, every other case with it."""
    text = str(path)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        shown = text.encode("utf-8", "backslashreplace").decode("ascii", "backslashreplace")
        raise DeepWMLError(f"{shown}: its name holds bytes that are not UTF-8 text, which the image library "
                           f"cannot open; rename it") from None
    return text


def _dicom_series(folder: Path) -> tuple:
    """DICOM series IDs in a folder, without ITK's 'No Series were found' warning on stderr (GDCM's scan of its files'
    headers: once within `dicom_headers_read_once` while the folder is unchanged)."""
    return _once_per_run("gdcm", folder, False, lambda: _gdcm_series_ids(folder))


def _gdcm_series_ids(folder: Path) -> tuple:
    import SimpleITK as sitk

    previous = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        with itk_names(folder) as (name,):
            return tuple(sitk.ImageSeriesReader.GetGDCMSeriesIDs(name))
    except RuntimeError as exc:  # GDCM stops at a header value no scanner writes (Samples per Pixel 0, NaN Rescale
        # Intercept): an internal error before, which said to report it
        condition = str(exc).strip().splitlines()[-1].rpartition("occurred")[2].strip() or "unreadable"
        raise DeepWMLError(f"{folder} holds a DICOM file whose header the DICOM library cannot read ({condition[:120]}: "
                           "a damaged value, such as Samples per Pixel or Rescale Intercept); export the series again "
                           "from the scanner or PACS") from exc
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(previous)


# Files that are never DICOM: a folder holding nothing else is not probed (no SimpleITK import, no scan).
_NOT_DICOM_SUFFIXES = IMAGE_EXTENSIONS + (SEGMENTATION_EXTENSION, ".csv", ".txt", ".json", ".png", ".jpg", ".md",
                                          ".tfm", ".pt", ".log")


def is_dicom_folder(path: str | os.PathLike) -> bool:
    p = Path(path)
    if not p.is_dir():
        return False
    if all(f.name.startswith(".") or f.is_dir() or f.name.lower().endswith(_NOT_DICOM_SUFFIXES) for f in p.iterdir()):
        return False
    if any(_looks_dicom(f.name) and _mislabelled_syntax(str(f)) for f in p.iterdir() if f.is_file()):
        return True  # DICOM, refused where it is read (`_read_series`), not scanned by GDCM (a minute and more)
    return bool(_dicom_series(p))


# ---------------------------------------------------------------------------------------------
# Reading


_NIFTI_FLOAT_TYPES = {16: "f4", 64: "f8"}  # NIfTI datatype codes of float32 and float64
# bits a voxel of each NIfTI datatype takes (bitpix must agree)
_NIFTI_BITS = {2: 8, 4: 16, 8: 32, 16: 32, 32: 64, 64: 64, 128: 24, 256: 8, 512: 16, 768: 32, 1024: 64, 1280: 64,
               1536: 128, 1792: 128, 2048: 256, 2304: 32}


def _gzipped(path: Path) -> bool:
    """Whether a file is gzip-compressed, by its first bytes: a NIfTI file's name may say otherwise (a
    compressed file named .nii, a plain one named .nii.gz, renamed by hand or by a PACS export), and
    SimpleITK reads by content too. By the name when the file cannot be opened, and for a file named .gz that is
    no NIfTI either (gzip then calls it corrupt)."""
    named = path.name.lower().endswith(".gz")
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return named
    return head[:2] == b"\x1f\x8b" or (named and nifti_version(head) is None)


_FORMAT_SUFFIX = {"NIfTI": ".nii", "gzip-compressed NIfTI": ".nii.gz", "NRRD": ".nrrd", "MetaImage": ".mha"}


def _content_format(path: Path) -> str | None:
    """The image format a file's first bytes show ("NIfTI", "gzip-compressed NIfTI", "NRRD", "MetaImage", "DICOM"),
    or None when they show none of these (or the file cannot be read: the reader then says why)."""
    try:
        with open(path, "rb") as f:
            head = f.read(352)
        if head[:2] == b"\x1f\x8b":
            with gzip.open(path, "rb") as f:
                inner = f.read(352)
            return "gzip-compressed NIfTI" if _nifti_magic(inner) else None
    except (OSError, EOFError, zlib.error):
        return None
    if _nifti_magic(head):
        return "NIfTI"
    if head.startswith(b"NRRD"):
        return "NRRD"
    if re.match(rb"\s*(ObjectType|NDims)\s*=", head):
        return "MetaImage"
    if head[128:132] == b"DICM":
        return "DICOM"
    return None


def _nifti_magic(head: bytes) -> bool:
    """Whether `head` begins a NIfTI-1 ("n+1", single file; "ni1", a pair's header) or NIfTI-2 file, by size and magic."""
    version = nifti_version(head)
    if version is None:
        return False
    return head[344:347] in (b"n+1", b"ni1") if version[0] == 1 else head[4:7] in (b"n+2", b"ni2")


def _check_named_as_it_is(path: Path) -> None:
    """Refuse a file whose content is another format than its name says (an NRRD named .nii.gz, a .nii.gz renamed
    .nrrd): the readers go by the name and called it "truncated or corrupt, copy it again" or "cannot be read, check
    it is complete", though the file is whole. A gzip-compressed NIfTI named .nii, and a plain one named .nii.gz,
    are read (see `_gzipped`)."""
    name = path.name.lower()
    named = next((e for e in _IMAGE_IOS if name.endswith(e)), None)
    found = _content_format(path)
    if found is None or named is None:
        return
    if named in (".nii", ".nii.gz", ".hdr", ".hdr.gz"):
        if found in ("NIfTI", "gzip-compressed NIfTI"):
            return
    elif named in (".nrrd", ".nhdr"):
        if found == "NRRD":
            return
    elif found == "MetaImage":
        return
    if found == "DICOM":
        raise DeepWMLError(f"{path} is a DICOM file, though its name ends in {path.name[-len(named):]}; give the "
                           "folder of its series (or the whole study) instead")
    stem = path.name[:-len(named)]
    raise DeepWMLError(f"{path} is in {found} format, though its name ends in {path.name[-len(named):]}; rename it "
                       f"to {stem}{_FORMAT_SUFFIX[found]}")


def _nifti_length(head: bytes) -> int | None:
    """The bytes a NIfTI-1 or -2 file announces in its header (`head`: its first 540 bytes or more): voxel
    offset plus voxel data; None when `head` is no NIfTI header."""
    version = nifti_version(head)
    if version is None or len(head) < 540:
        return None
    endian = version[1]
    if version[0] == 1:
        dims, bitpix, vox_offset = (struct.unpack_from(endian + "8h", head, 40), struct.unpack_from(endian + "h", head, 72)[0],
                                    struct.unpack_from(endian + "f", head, 108)[0])
    else:
        dims, bitpix, vox_offset = (struct.unpack_from(endian + "8q", head, 16), struct.unpack_from(endian + "h", head, 14)[0],
                                    struct.unpack_from(endian + "q", head, 168)[0])
    if not math.isfinite(vox_offset):
        return None
    ndim = max(1, min(int(dims[0]), 7))
    n_voxels = int(np.prod([max(1, int(d)) for d in dims[1 : ndim + 1]], dtype=np.int64))
    return int(vox_offset) + n_voxels * max(1, bitpix) // 8


READ_PIECE = 1 << 24  # bytes decompressed at a time into a NIfTI file's buffer


def _file_holds(path: Path, gzipped: bool, length: int) -> bool:
    """Whether `path` holds `length` bytes (decompressed: a .nii.gz's last 4 bytes give that, modulo 4 GiB), so
    that no buffer of that size is made for a truncated file or a header that announces more than there is."""
    try:
        if not gzipped:
            return length <= path.stat().st_size
        with open(path, "rb") as raw:
            raw.seek(-4, os.SEEK_END)
            return int.from_bytes(raw.read(4), "little") == length % (1 << 32)
    except OSError:
        return False


def _read_into(f, into: memoryview, reading: Callable[[int], None] | None = None) -> int:
    """Fill `into` from the open file `f`, READ_PIECE bytes at a time (gzip's readinto decompresses into a new
    bytes object as large as it is asked for, so a single call would hold the voxels twice); the count of bytes
    read (fewer at the file's end). `reading(count)` is told after each piece."""
    filled = 0
    while filled < len(into):
        got = f.readinto(into[filled:filled + READ_PIECE])
        if not got:
            break
        filled += got
        if reading is not None:
            reading(filled)
    return filled


def _read_whole(f, holds=lambda length: True, head_size: int = 540,
                reading: Callable[[float], None] | None = None) -> bytes | bytearray:
    """All of an open file's bytes. A NIfTI file's are read into one buffer of the size its header
    announces (when `holds(size)` says the file has them), READ_PIECE bytes at a time: read() collects the
    decompressed pieces of a .nii.gz and then joins them, and gzip's readinto decompresses into a new bytes
    object as large as it is asked for before copying it, so either way the voxels were held twice for a
    moment (6.7 GB for a 1024 x 1024 x 400 float64 scan). `reading(fraction)` is told after each piece the
    fraction of those bytes read (a bar sat at 0 % for the 14 s a 1024 x 1024 x 400 .nii.gz takes)."""
    head = f.read(head_size)
    expected = _nifti_length(head)
    if expected is None or expected <= len(head) or not holds(expected):
        return head + f.read()
    data = bytearray(expected)
    data[:len(head)] = head
    told = None if reading is None else (lambda count: reading((len(head) + count) / expected))
    with memoryview(data) as view, view[len(head):] as body:
        filled = len(head) + _read_into(f, body, told)
    if filled < expected:  # truncated: the checks explain it
        del data[filled:]
        return data
    rest = f.read()
    if rest:
        data += rest
    return data


def _nifti_data(path: Path, reading: Callable[[float], None] | None = None) -> bytes | bytearray:
    gzipped = _gzipped(path)
    opener = gzip.open if gzipped else open
    try:
        with opener(path, "rb") as f:
            return _read_whole(f, lambda length: _file_holds(path, gzipped, length), reading=reading)
    except PermissionError as exc:
        raise DeepWMLError(f"{path} cannot be read (permission denied); ask for read access to it") from exc
    except (EOFError, OSError, zlib.error) as exc:
        raise DeepWMLError(f"{path} is truncated or corrupt ({exc}); copy the file again from its source") from exc


def _check_nifti(path: Path, data: bytes, voxel_file: Path | None = None, mask: bool = False) -> None:
    """Checks SimpleITK skips: it zero-fills a truncated NIfTI and reads NaN/Inf voxels as 0. `voxel_file`: the
    .img of a two-file NIfTI-1 whose header `path` is, `data` the pair as one file (`_nifti_pair_data`). `mask`:
    the file is a mask (read_mask), which no scanner wrote: a refusal of NaN says what to do with a mask."""
    if len(data) < 348:
        raise DeepWMLError(f"{path} is too short to be a NIfTI file; copy it again from its source")
    for endian in "<>":
        if struct.unpack(endian + "i", data[:4])[0] == 348:
            dims = struct.unpack(endian + "8h", data[40:56])
            datatype, bitpix = struct.unpack(endian + "2h", data[70:74])
            pixdim = struct.unpack(endian + "8f", data[76:108])
            vox_offset = struct.unpack(endian + "f", data[108:112])[0]
            qform_code, sform_code = struct.unpack(endian + "2h", data[252:256])
            srow = struct.unpack(endian + "12f", data[280:328])
            quaternion = struct.unpack(endian + "6f", data[256:280])  # and the qform's offset
            units = data[123]
            magic, header_bytes = data[344:348], 348
            break
        if struct.unpack(endian + "i", data[:4])[0] == 540 and len(data) >= 540:
            datatype, bitpix = struct.unpack(endian + "2h", data[12:16])
            dims = struct.unpack(endian + "8q", data[16:80])
            pixdim = struct.unpack(endian + "8d", data[104:168])
            vox_offset = int(struct.unpack(endian + "q", data[168:176])[0])
            qform_code, sform_code = struct.unpack(endian + "2i", data[344:352])
            srow = struct.unpack(endian + "12d", data[400:496])
            quaternion = struct.unpack(endian + "6d", data[352:400])
            units = struct.unpack(endian + "i", data[500:504])[0]
            magic, header_bytes = b"n+1\0", 544  # NIfTI-2's mark is checked on parsing: SimpleITK cannot read NIfTI-2
            break
    else:
        # SimpleITK reads a header whatever its size field (and then without the NIfTI mark, below): a damaged
        # file or another format named .nii was read as a volume of whatever its bytes gave
        raise DeepWMLError(f"{path} is not a NIfTI file: its header begins with the size "
                           f"{struct.unpack('<i', data[:4])[0]}, not 348 (NIfTI-1) or 540 (NIfTI-2), so it is damaged "
                           "or another format named .nii; copy it again from its source")
    ndim = max(1, min(int(dims[0]), 7))
    # Without the NIfTI mark SimpleITK reads the file as Analyze 7.5: on its identity orientation (qform and sform
    # ignored), left and right, front and back ambiguous, as the Analyze pair refused in _nifti_pair_data
    if magic != b"n+1\0":
        raise DeepWMLError(f"{path}: its header lacks the NIfTI mark ('n+1' at byte 344; it holds {bytes(magic)!r}), "
                           "so the image library would read it as an Analyze image without orientation, on which "
                           "left and right could not be trusted; the file is damaged: copy it again from its source "
                           "(or export it again as NIfTI)")
    # A size of 0 or below along an axis: read as 1 (one slice of a scan, silently) and written back as given
    # (the mask would not open); a datatype whose voxel size is not bitpix: read by the datatype, checked for
    # truncation by bitpix; voxels starting inside the header: read from the header's bytes on. Right after a
    # NIfTI-1 header, with no 4 bytes of extension flags, is where some writers put them (vox_offset 348: MATLAB
    # toolboxes and web viewers' exporters), and the image library reads them there
    shape = [int(d) for d in dims[1:ndim + 1]]
    if min(shape) < 1:
        raise DeepWMLError(f"{path}: its header gives the image {' x '.join(map(str, shape))} voxels (dim), a size "
                           "below 1, so the file is damaged; copy it again from its source")
    if _NIFTI_BITS.get(datatype, bitpix) != bitpix:
        raise DeepWMLError(f"{path}: its header gives voxels of {bitpix} bits (bitpix) of a type of "
                           f"{_NIFTI_BITS[datatype]} bits (datatype {datatype}), so the file is damaged; copy it again "
                           "from its source")
    if not (math.isfinite(vox_offset) and header_bytes <= vox_offset < 1 << 62):
        raise DeepWMLError(f"{path}: its header has the voxels start at byte {vox_offset:g} (vox_offset), not after the "
                           f"header's {header_bytes} bytes, so the file is damaged or was written wrongly; copy it again from "
                           "its source, or convert the scan again with another tool (dcm2niix, 3D Slicer)")
    vox_offset = int(vox_offset)
    # A voxel size of 0, below 0 or NaN: SimpleITK reads 0 as 1 mm (a 6 mm slice counted as 1 mm: the lesion
    # volume 6 times too small, silently) and a negative one as a flipped axis, which other software (FSL,
    # nibabel) reads unflipped: left and right would differ between viewers. Refused.
    for axis in range(1, min(ndim, 3) + 1):
        if not (math.isfinite(pixdim[axis]) and pixdim[axis] > 0):
            raise DeepWMLError(
                f"{path}: its header gives a voxel size of {pixdim[axis]:g} mm along axis {axis} (pixdim[{axis}]), "
                "which software reads in different ways, so neither lesion volumes nor left and right could be "
                "trusted; export the image again from the scanner or PACS")
    # No orientation (qform_code and sform_code 0, NIfTI's Analyze fallback): SimpleITK, and so 3D Slicer, place the
    # voxels on its identity direction, FSL and nibabel with the front and back the other way round, and the mask
    # was written with SimpleITK's guess as scanner orientation: in FSL it no longer lay on the FLAIR. Which axis
    # is axial is a guess too. Refused, as an Analyze 7.5 pair is.
    if qform_code <= 0 and sform_code <= 0:
        raise DeepWMLError(
            f"{path}: its header gives no orientation (qform_code and sform_code 0), so software places its voxels in "
            "different ways (3D Slicer with front and back the other way round from FSL), and neither the axial "
            "slices nor the mask's place could be trusted; export it again from the scanner or PACS (or convert the "
            "DICOM series with dcm2niix), which gives the orientation")
    # A qform or sform in use that is not numbers (NaN): SimpleITK places the voxels nowhere, and its matrix
    # library prints pages of warnings before the refusal of the image (read_any)
    unplaced = [name for name, code, values in (("qform", qform_code, quaternion), ("sform", sform_code, srow))
                if code > 0 and not all(map(math.isfinite, values))]
    if unplaced:
        raise DeepWMLError(f"{path}: its header's orientation ({unplaced[0]}) holds values that are not numbers (NaN or "
                           "infinite), so where its voxels lie is unknown; the header is damaged: copy the file again "
                           "from its source, or export it again")
    # The qform's rotation beyond numbers: its handedness (qfac, pixdim[0]) NaN or infinite, read as 1 (or -1) by
    # the image library without a word; a quaternion (quatern_b, c, d) beyond a unit one's (b² + c² + d² above 1:
    # quatern_b 2 beside d 1 was read as a rotation made up by scaling them down, which nibabel refuses). Its
    # offset (qoffset) or the sform's (srow's fourth column) beyond any scanner's: the image library's reading of
    # a 1e30 mm srow was called a sheared grid. Refused naming the field.
    if qform_code > 0 and not math.isfinite(pixdim[0]):
        raise DeepWMLError(f"{path}: its header gives the qform's handedness (pixdim[0], qfac) as {pixdim[0]:g}, not 1 "
                           "or -1, so whether left and right are swapped is unknown; the header is damaged: copy the "
                           "file again from its source, or export it again")
    unit_excess = sum(v * v for v in quaternion[:3]) - 1
    if qform_code > 0 and unit_excess > 1e-4:
        raise DeepWMLError(f"{path}: its header gives the qform's rotation as quatern_b, c, d = "
                           f"{', '.join(f'{v:.4g}' for v in quaternion[:3])}, no unit quaternion's (their squares sum "
                           f"to {unit_excess + 1:.4g}, above 1), which software reads in different ways, so the scan's "
                           "orientation is unknown; the header is damaged: copy the file again from its source, or "
                           "export it again")
    for name, code, offset in (("qoffset_x, y, z", qform_code, quaternion[3:]),
                               ("srow_x[3], srow_y[3], srow_z[3]: the sform's", sform_code, srow[3::4])):
        if code > 0 and max(abs(v) for v in offset) > _MRI_ORIGIN_MM:
            raise DeepWMLError(f"{path}: its header places the first voxel at {', '.join(f'{v:.4g}' for v in offset)} "
                               f"mm ({name}), beyond any scanner's ({_MRI_ORIGIN_MM / 1000:g} m from its centre), so "
                               "the header is damaged; copy the file again from its source, or export it again")
    # Lengths in metres or microns (xyzt_units), which SimpleITK converts to mm, beside voxel sizes that are mm
    # already (a unit set wrong): a 0.9 mm pixel read as 900 mm (or 0.0009 mm), and the scan came out "ok - 0.00 ml,
    # 0 lesions". Refused where the converted sizes are no MRI's; a head truly given in metres is read in mm.
    unit = _NIFTI_LENGTH_UNITS.get(units & 0x07)
    if unit is not None and ndim >= 3:
        sizes = np.array(pixdim[1:4], float)
        mm = sizes * unit[1]
        if mm.min() < _MRI_VOXEL_MM[0] or mm.max() > _MRI_VOXEL_MM[1]:
            raise DeepWMLError(
                f"{path}: its header gives lengths in {unit[0]} (xyzt_units), which makes its voxels "
                f"{' x '.join(f'{v:.4g}' for v in mm)} mm, no MRI's size: its voxel sizes, "
                f"{' x '.join(f'{v:.3g}' for v in sizes)}, look like mm with the wrong unit; set the header's length "
                "unit to mm (nibabel: img.header.set_xyzt_units('mm')) or export the scan again")
    # An sform whose voxel sizes disagree with pixdim (a slice of 6 mm in one, 5 mm in the other): SimpleITK
    # takes pixdim, FSL and nibabel the sform, so the volume depends on the software and the mask written on
    # SimpleITK's grid would not lie on the FLAIR in the others. Refused beyond 1% (float32 rounding is far less).
    if ndim >= 3 and sform_code > 0:
        lengths = np.linalg.norm(np.array(srow, float).reshape(3, 4)[:, :3], axis=0)
        sizes = np.array(pixdim[1:4], float)
        if np.all(np.isfinite(lengths)) and np.any(np.abs(lengths - sizes) > 0.01 * sizes):
            def show(values) -> str:
                return " x ".join(f"{v:.3g}" for v in values)

            raise DeepWMLError(
                f"{path}: its header gives two voxel sizes, {show(sizes)} mm (pixdim) and {show(lengths)} mm (the "
                "sform), which software reads in different ways, so lesion volumes and the mask's place could be "
                "wrong; export the image again from the scanner or PACS")
        # An sform whose axes are not at right angles (sheared: a slice stack leaning as with a gantry tilt, axes
        # of pixdim's lengths all the same): the image library cannot place voxels on it and places the scan by its
        # qform instead, without a word, where FSL and nibabel take the sform: a stack leaning 15 degrees read
        # 3.5 % larger lesion volumes than the sform gives and placed voxels up to 16 mm from where the sform puts
        # them. Refused as a sheared NRRD or MetaImage is (_sheared_sform: beyond rounding, 0.06 degrees).
        sheared = _sheared_sform(srow)
        if sheared is not None:
            raise DeepWMLError(
                f"{path}: its header's sform places the voxels on a sheared grid (axes {sheared[0]} and {sheared[1]} "
                f"at {sheared[2]:.2f} degrees, not 90), which the image library cannot follow: it would place the scan "
                "by its qform instead, and FSL or nibabel by the sform, so lesion volumes and the mask's place would "
                "depend on the software; resample it onto a regular grid first")
    n_voxels = math.prod(shape)
    expected = vox_offset + n_voxels * max(1, bitpix) // 8
    if len(data) < expected:
        before = PAIR_HEADER if voxel_file else 0  # a pair's .img holds the bytes after the header
        raise DeepWMLError(
            f"{voxel_file or path} is truncated: it holds {len(data) - before} of the {expected - before} bytes its "
            "header announces; copy the file again from its source"
        )
    if len(data) > expected:  # (as _surplus_voxel_data refuses for NRRD and MetaImage)
        raise DeepWMLError(
            f"{voxel_file or path}: its voxel data take {len(data) - vox_offset} bytes, but its header's sizes and type "
            f"need {expected - vox_offset}, and the image library would read the first ones only (a wrong image, "
            "without an error); the header is damaged: copy the file again from its source")
    if datatype in _NIFTI_FLOAT_TYPES:
        values = np.frombuffer(data, dtype=endian + _NIFTI_FLOAT_TYPES[datatype], count=n_voxels, offset=vox_offset)
        bad = non_finite_count(values)
        if bad:
            raise DeepWMLError(f"{path} has {bad} non-finite voxels (NaN or Inf); " + (
                "a mask holds whole numbers 0–255 (0 background, 1 lesion): set them to 0 where they are background "
                "(FSL: fslmaths MASK -nan OUT) and save it again" if mask else
                "re-export the image from the scanner or PACS"))


_SFORM_SHEAR_COSINE = 1e-3  # 0.057 degrees off a right angle: 0.2 mm over a 200 mm head; float32 rounding ~1e-7


def _sheared_sform(srow) -> tuple[int, int, float] | None:
    """(axis, axis, their angle in degrees) of the sform (srow_x, y, z as 12 numbers) whose two axes are furthest
    from a right angle, where it is beyond _SFORM_SHEAR_COSINE; None for an sform at right angles (or one with an
    axis of length 0 or a value that is no number, which the checks before refuse)."""
    axes = np.array(srow, float).reshape(3, 4)[:, :3]
    lengths = np.linalg.norm(axes, axis=0)
    if not (np.all(np.isfinite(axes)) and np.all(lengths > 0)):
        return None
    cosines = (axes / lengths).T @ (axes / lengths)
    worst = max(((i, j) for i in range(3) for j in range(i + 1, 3)), key=lambda pair: abs(cosines[pair]))
    if abs(cosines[worst]) <= _SFORM_SHEAR_COSINE:
        return None
    return worst[0] + 1, worst[1] + 1, float(np.degrees(np.arccos(np.clip(cosines[worst], -1, 1))))


# NIfTI's length units other than mm (xyzt_units & 7): their name and mm per unit, as SimpleITK converts them
_NIFTI_LENGTH_UNITS = {1: ("metres", 1000.0), 3: ("microns", 0.001)}
_MRI_VOXEL_MM = (0.01, 100.0)  # far beyond any MRI voxel size either way; a wrong unit lands 1000 times outside
_MRI_ORIGIN_MM = 1e5  # 100 m from the scanner's centre: far beyond any scan's origin


PAIR_HEADER = 352  # bytes before a pair's voxels in its one-file form: the header and 4 of no extension


def _nifti_pair_data(path: Path, reading: Callable[[float], None] | None = None) -> bytearray:
    """A `.hdr` + `.img` pair whose header is NIfTI-1's ("ni1") as the bytes of one .nii file (the header marked
    so, then the .img's bytes, read into the same buffer): read once, then checked and parsed like a .nii. Its
    .img was read whole for the checks and then again by SimpleITK, which holds two copies while it reads.
    A plain Analyze 7.5 header (no NIfTI mark) is refused: it has no orientation, and software reads its left
    and right in different ways (SPM's flip setting, radiological or neurological). `reading(fraction)`: told
    the fraction of the .img's bytes read after each piece."""
    def read(file: Path, into: memoryview | None = None, size: int = 348, told=None) -> bytes | int:
        """`size` bytes of `file` (-1: all), or the count of its bytes read into `into` (all it holds, or fills;
        `told(count)` after each piece); decompressed when gzip-compressed (`.hdr.gz` + `.img.gz`)."""
        try:
            with (gzip.open if _gzipped(file) else open)(file, "rb") as f:
                return f.read(size) if into is None else _read_into(f, into, told)
        except PermissionError as exc:
            raise DeepWMLError(f"{file} cannot be read (permission denied); ask for read access to it") from exc
        except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
            raise DeepWMLError(f"{file} is truncated or corrupt ({exc}); copy the file again from its source") from exc
        except OSError as exc:
            raise DeepWMLError(f"{file} cannot be read ({exc.strerror or exc}); copy it again from its source") from exc

    header = read(path)
    if len(header) < 348 or 348 not in (struct.unpack("<i", header[:4])[0], struct.unpack(">i", header[:4])[0]):
        raise DeepWMLError(f"{path} is not a NIfTI or Analyze header (.hdr of 348 bytes); use NIfTI (.nii, .nii.gz), "
                           "NRRD, MetaImage or a DICOM series folder")
    stem, hdr, gz = _pair_parts(path)
    magic = header[344:348]
    if magic == b"n+1\0":
        raise DeepWMLError(f"{path} is a one-file NIfTI (header and voxels together) named .hdr{gz}; rename it to "
                           f".nii{gz}")
    if magic != b"ni1\0":
        raise DeepWMLError(f"{path} is an Analyze 7.5 header (.hdr/.img without the NIfTI mark), which stores no "
                           "orientation: software reads its left and right in different ways, so the mask's sides "
                           "could not be trusted; convert it to NIfTI (.nii.gz) where its orientation is known "
                           "(e.g. FSL: fslchfiletype NIFTI_GZ FILE.hdr, then check left and right), or export the "
                           "scan again from the scanner or PACS")
    data = _pair_data_name(path)
    if data is None:
        raise DeepWMLError(f"{path} is the header of a NIfTI pair, and its voxel file {stem}.img{gz} is not "
                           "beside it; copy both files")
    wanted = stem + (".IMG" if hdr == ".HDR" else ".img") + gz
    if data != wanted or hdr not in (".hdr", ".HDR"):  # the image library looks for that name alone
        raise DeepWMLError(f"{path}: the image library finds a pair's voxel file only as NAME.img beside NAME.hdr, or "
                           f"NAME.IMG beside NAME.HDR, not {data}; rename the two files so that their extensions match")
    voxel_file = path.parent / data
    header = bytearray(header)
    header[344:348] = b"n+1\0"
    endian = "<" if struct.unpack("<i", header[:4])[0] == 348 else ">"
    offset = struct.unpack_from(endian + "f", header, 108)[0]  # where the voxels start in the .img
    struct.pack_into(endian + "f", header, 108, PAIR_HEADER + offset)
    header += bytes(PAIR_HEADER - 348)
    try:
        size = voxel_file.stat().st_size
    except OSError as exc:
        raise DeepWMLError(f"{voxel_file} cannot be read ({exc.strerror or exc}); copy it again from its source") from exc
    if _gzipped(voxel_file):  # the bytes its header announces, when the .img.gz holds that many
        size = (_nifti_length(bytes(header).ljust(540, b"\0")) or PAIR_HEADER) - PAIR_HEADER
        if not _file_holds(voxel_file, True, size):  # truncated, or a header that announces too much: as it is
            return header + read(voxel_file, size=-1)
    told = None if reading is None or not size else (lambda count: reading(count / size))
    one = bytearray(PAIR_HEADER + size)
    one[:PAIR_HEADER] = header
    with memoryview(one) as view:
        got = read(voxel_file, into=view[PAIR_HEADER:], told=told)
    del one[PAIR_HEADER + got:]  # (shorter than it was a moment ago: the checks say it is truncated)
    return one


_IMAGE_IOS = {".nii.gz": "NiftiImageIO", ".nii": "NiftiImageIO", ".hdr.gz": "NiftiImageIO", ".hdr": "NiftiImageIO",
              ".nrrd": "NrrdImageIO", ".nhdr": "NrrdImageIO",
              ".mha": "MetaImageIO", ".mhd": "MetaImageIO"}


def _file_reader(path: Path):
    """A SimpleITK reader of an image file. SimpleITK picks its reader by the extension in lower case only (a
    MetaImage named SCAN.MHA, as Windows tools write it, 'cannot be read'): the reader is named for it then."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(text_path(path))
    ext = next((e for e in _IMAGE_IOS if path.name.lower().endswith(e)), None)
    if ext and not path.name.endswith(ext):
        reader.SetImageIO(_IMAGE_IOS[ext])
    return reader


@contextlib.contextmanager
def _telling(reader, reading: Callable[[float], None] | None):
    """Within the block, `reader` (SimpleITK's) tells `reading(fraction)` its progress: a DICOM series' file by
    file, a single file's (NRRD, MetaImage: ITK 5.4's readers of those formats say nothing in between) only as
    it begins and ends. What `reading` raises (Ctrl-C arrives there, as Python runs only in it during the read; a
    caller's progress callback that stops the run) is raised once the reader stops: raised into ITK, it was
    turned into "the DICOM series cannot be read (... error executing the Python Callable)", a failed case the
    batch went on past, or ended the process (C++ terminate) when ITK could not pass it on."""
    if reading is None:
        yield
        return
    import SimpleITK as sitk

    raised: list[BaseException] = []

    def command() -> None:
        try:
            if not raised:
                reading(reader.GetProgress())
        except BaseException as exc:  # never into ITK (above); told no more, and the reading stops at its next file
            raised.append(exc)
            reader.Abort()

    reader.AddCommand(sitk.sitkProgressEvent, command)
    try:
        try:
            yield
        except RuntimeError:
            if raised:  # ITK's own error, if any, came after (or of) what was raised in `reading`
                raise raised[0] from None
            raise
        if raised:
            raise raised[0]
    finally:
        reader.RemoveAllCommands()  # the command refers to the reader: a cycle Python's collector cannot see


def _header_fields(path: Path) -> dict[str, str]:
    """The fields of an NRRD ('key: value') or MetaImage ('Key = Value') header, keys in lower case; {} when
    the file cannot be read (SimpleITK's reader says why)."""
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16).decode("latin-1")
    except OSError:
        return {}
    fields = {}
    nrrd = path.name.lower().endswith((".nrrd", ".nhdr"))
    for line in head.splitlines()[1 if nrrd else 0:]:
        if nrrd and not line.strip():
            break  # the data follows
        if line.startswith("#"):
            continue
        key, sep, value = line.partition(":" if nrrd else "=")
        if sep and not (nrrd and value.startswith("=")):  # NRRD 'key:=value' pairs are free text
            fields[key.strip().lower()] = value.strip()
        if not nrrd and key.strip().lower() == "elementdatafile":
            break
    return fields


def _nrrd_length_unit(path: Path, fields: dict[str, str]) -> str | None:
    """The length unit an NRRD header gives ('space units'; `fields`: `_header_fields(path)`) when it is not mm,
    else None. SimpleITK ignores the field: lengths in m or cm are read as mm, the head 1000 or 10 times too small
    (nothing segmented)."""
    if not path.name.lower().endswith((".nrrd", ".nhdr")):
        return None
    units = re.findall(r'"([^"]*)"', fields.get("space units", ""))
    mm = ("", "mm", "millimeter", "millimeters", "millimetre", "millimetres")
    odd = [u for u in units if u.strip().lower() not in mm]
    return odd[0] if odd else None


def _nrrd_axes_off_space(path: Path, fields: dict[str, str]) -> tuple[int, ...] | None:
    """The sizes of the domain axes (of kind domain, space, time or none given) of an NRRD whose header (`fields`:
    `_header_fields(path)`) has fewer of them than 3 in a 3D space (one slice: 'space dimension: 3' or a named 3D
    space, two 'space directions'), or more than its space has dimensions (a series: a time axis beside three in
    space, its direction 'none'); else None. SimpleITK cannot read such a file ('number of domain axes ... doesn't
    match dimension of space')."""
    if not path.name.lower().endswith((".nrrd", ".nhdr")):
        return None
    space = fields.get("space", "").lower()
    try:
        dimension = int(fields.get("space dimension") or (4 if "time" in space else 3 if space else 0))
        sizes = [int(v) for v in fields.get("sizes", "").split()]
    except ValueError:
        return None
    axes = re.findall(r"\([^)]*\)|none", fields.get("space directions", ""))
    kinds = fields.get("kinds", "").lower().split() or ["???"] * len(sizes)
    if len(axes) != len(sizes) or len(kinds) != len(sizes):
        return None
    domain = [size for size, kind in zip(sizes, kinds) if kind in ("domain", "space", "time", "???", "none")]
    if 0 < len([axis for axis in axes if axis != "none"]) < min(3, dimension) or 0 < dimension < len(domain):
        return tuple(domain)
    return None


def _nrrd_geometry_fault(path: Path, fields: dict[str, str]) -> str | None:
    """What an NRRD header (`fields`: `_header_fields(path)`) gives of its voxels' place and size that is no
    place or size, else None: a 'space origin' not a number for each axis of its space (all NaN was read as
    0, 0, 0: the mask placed elsewhere in the patient, silently; one NaN or infinite value was refused in the NRRD
    library's words, 'existance of all space vector coefficients must be consistent'), 'space directions' holding
    NaN or infinite values (all NaN was read as 1 x 1 x 1 mm on the identity), a vector of length 0, or 'none' for
    one of the three axes of a volume in space (called an axis of time); 'spacings' infinite or 0, or beside a
    'space' (refused in the NRRD library's words). NRRD's 'nan'
    spacing (a length not known) is left to `_unknown_voxel_size`, a missing 'space origin' (not known: read as
    0, 0, 0, as every NRRD reader reads it) is read."""
    if not path.name.lower().endswith((".nrrd", ".nhdr")):
        return None

    def numbers(vector: str) -> list[float] | None:
        try:
            values = [float(v) for v in vector.split(",")]
        except ValueError:
            return None
        return values if all(map(math.isfinite, values)) else None

    space = fields.get("space", "").lower()
    try:
        dimension = int(fields.get("space dimension") or (4 if "time" in space else 3 if space else 0))
    except ValueError:
        return None  # the NRRD library says what is wrong
    origin = fields.get("space origin")
    if origin is not None and dimension:
        vectors = re.findall(r"\(([^)]*)\)", origin)
        values = numbers(vectors[0]) if len(vectors) == 1 else None
        if values is None or len(values) != dimension:
            return f"'space origin: {origin[:60]}', not {dimension} numbers (its voxels' place)"
    directions = fields.get("space directions")
    if directions is not None and dimension:
        axes = re.findall(r"\([^)]*\)|none", directions)
        for axis, vector in enumerate(axes):
            if vector == "none":
                continue
            values = numbers(vector[1:-1])
            if values is None or len(values) != dimension:
                return (f"'space directions: {directions[:90]}', whose vector of axis {axis} is not {dimension} "
                        "numbers (its voxels' size and orientation)")
            if not any(values):
                return (f"'space directions: {directions[:90]}', whose vector of axis {axis} has a length of 0 (its "
                        "voxels' size along it)")
        kinds = fields.get("kinds", "").lower().split() or ["domain"] * len(axes)
        if (len(axes) == 3 == len(kinds) and all(k in ("domain", "space", "???") for k in kinds)
                and 0 < axes.count("none") < 3):
            return (f"'space directions: {directions[:90]}', 'none' for one of the three axes of a volume in space "
                    "(where its slices lie)")
    spacings = fields.get("spacings")
    if spacings is not None:
        for axis, value in enumerate(spacings.split()):
            try:
                size = float(value)
            except ValueError:
                return f"'spacings: {spacings[:60]}', whose value of axis {axis} is not a number"
            if math.isinf(size) or size == 0:
                return f"'spacings: {spacings[:60]}', a voxel size of {value} along axis {axis}"
            if dimension and not math.isnan(size):  # the NRRD library's 'nrrdSpacingStatusScalarWithSpace'
                return (f"'spacings: {spacings[:60]}' beside 'space' (or 'space dimension'), which NRRD does not allow "
                        "(the voxel sizes of an image in a space are its 'space directions')")
    return None


def unstated_orientation(path: str | os.PathLike) -> str | None:
    """A warning when an image file gives its voxel sizes but not how its axes lie in the patient: an NRRD without
    'space' (or 'space dimension'), whose sizes are its 'spacings'. ITK, and so 3D Slicer, read it on the identity,
    the axes along the patient's left, posterior and superior: a scan stored right to left has its sides swapped,
    silently. (A NIfTI without orientation is refused instead: software places it in different ways.)"""
    path = Path(path)
    if not path.name.lower().endswith((".nrrd", ".nhdr")) or path.name.lower().endswith(".seg.nrrd"):
        return None
    fields = _header_fields(path)
    if not fields or "space" in fields or "space dimension" in fields:
        return None
    return ("its header states no orientation (no 'space' field, only 'spacings'): it was read as ITK and 3D Slicer "
            "read it, its axes along the patient's left, posterior and superior; if it was stored otherwise, left and "
            "right (and the report's positions) are wrong: check the sides against the scan")


def _nrrd_list_axis(path: Path, fields: dict[str, str]) -> bool:
    """Whether an NRRD header (`fields`: `_header_fields(path)`) has an axis of kind list: one value per volume, as
    3D Slicer saves a sequence of volumes (.seq.nrrd), a multi-volume or a DWI; SimpleITK reads the file as a vector
    image, one value of each volume per voxel."""
    return path.name.lower().endswith((".nrrd", ".nhdr")) and "list" in fields.get("kinds", "").lower().split()


def _unknown_voxel_size(path: Path, fields: dict[str, str]) -> str | None:
    """What an NRRD or MetaImage header (`fields`: `_header_fields(path)`) lacks to give the voxel size, or None
    (also for no fields). SimpleITK reads a missing size (or NRRD's 'nan', unknown) as 1 mm: a 6 mm slice counted
    as 1 mm, the lesion volume 6 times too small."""
    if not fields:
        return None
    if path.name.lower().endswith((".nrrd", ".nhdr")):
        # a vector per axis in space ('none' for a list or time axis): three of them give the voxel size
        if len(re.findall(r"\([^)]*\)", fields.get("space directions", ""))) >= 3:
            return None
        spacings = fields.get("spacings", "").split()
        kinds = fields.get("kinds", "").split()
        if len(kinds) == len(spacings) and any(k in ("domain", "space") for k in kinds):  # a list or time axis too
            spacings = [v for v, kind in zip(spacings, kinds) if kind in ("domain", "space")]
        spacings = spacings[:3]
        try:
            if len(spacings) == 3 and all(math.isfinite(float(v)) for v in spacings):
                return None
        except ValueError:
            pass
        return "neither 'space directions' nor 'spacings' with three lengths"
    if "elementspacing" in fields or "elementsize" in fields:
        return None
    return "no ElementSpacing"


def _attached_data_start(path: Path) -> int | None:
    """Where the voxels of an NRRD or MetaImage stored in the header's own file begin: after the NRRD header's blank
    line, the MetaImage's ElementDataFile line; None when its first 64 KiB hold no such end (or it cannot be read)."""
    nrrd = path.name.lower().endswith((".nrrd", ".nhdr"))
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
    except OSError:
        return None
    end = re.search(rb"\r?\n\r?\n" if nrrd else rb"^[ \t]*ElementDataFile[ \t]*=[^\n]*\n", head, re.MULTILINE)
    return None if end is None else end.end()


def _metaimage_packing_fault(path: Path, fields: dict[str, str]) -> str | None:
    """What a MetaImage header (`fields`: `_header_fields(path)`) of compressed voxels says wrongly of their size
    (CompressedDataSize: none for voxels in the file itself, or another size than they take), else None. SimpleITK
    then prints 'Uncompress failed' and returns a volume of whatever its memory held (the previous scan's voxels,
    in a batch), or one partly unpacked, without an error."""
    if not path.name.lower().endswith((".mha", ".mhd")) or fields.get("compresseddata", "").lower() != "true":
        return None
    source = fields.get("elementdatafile", "")
    try:
        if source.upper() == "LOCAL":
            start = _attached_data_start(path)
            if start is None:
                return None
            held = path.stat().st_size - start
        elif (path.parent / source).is_file():  # one file of voxels (not a LIST or a numbered series of them)
            held = (path.parent / source).stat().st_size
        else:
            return None
    except OSError:  # SimpleITK's reader says why
        return None
    told = fields.get("compresseddatasize")
    if told is None:
        return "no CompressedDataSize (the size of its compressed voxels)" if source.upper() == "LOCAL" else None
    try:
        if int(told) == held:
            return None
    except ValueError:
        pass
    return f"CompressedDataSize {told}, but its compressed voxels take {held} bytes"


def _metaimage_missing_files(path: Path, fields: dict[str, str]) -> tuple[int, int] | None:
    """(files named, files needed) for a MetaImage header (`fields`: `_header_fields(path)`) of a file per slice
    (ElementDataFile: a LIST, or a numbered pattern) that names fewer files than it has slices, else None. SimpleITK
    reads those named and leaves the other slices as whatever its memory held, without an error; its reader counts
    a pattern up only (from the first number to the second by the third), so one counting down names none."""
    if not path.name.lower().endswith((".mha", ".mhd")):
        return None
    value, names = _data_file_field(path) or ("", [])
    parts = value.split()
    try:
        sizes = [int(v) for v in fields.get("dimsize", "").split()]
        if value.upper().startswith("LIST"):  # 'LIST 2D': files of 2 dimensions; without one, a slice each
            per_file, named = int(parts[1].upper().rstrip("D")) if len(parts) > 1 else len(sizes) - 1, len(names)
        elif _numbered_files(value) is not None:
            low, high, step = (int(p) for p in parts[1:4])
            per_file, named = len(sizes) - 1, len(range(low, high + 1, step)) if step > 0 else 0
        else:
            return None
    except ValueError:  # a header SimpleITK's reader will refuse
        return None
    needed = int(np.prod(sizes[per_file:], dtype=np.int64))
    return (named, needed) if named < needed else None


def _metaimage_header_fault(path: Path, fields: dict[str, str]) -> str | None:
    """What a MetaImage header (`fields`: `_header_fields(path)`) gives that no image has, else None: NDims not a
    count of 2 to 5 axes (the image library hung on -1, and crashed the process on 100 or 2147483648), a DimSize of
    another count of sizes (called 'No such file or directory'), an Offset that is not a number for each axis (NaN,
    or two for three axes: read as 0, 0, 0), a TransformMatrix (Rotation, Orientation) that is no matrix of
    directions, or voxel sizes not above 0 (ElementSpacing -1 read as 1 on a flipped axis; NaN called 'a field above
    it with too few values')."""
    if not path.name.lower().endswith((".mha", ".mhd")) or "ndims" not in fields:
        return None
    ndims, sizes = fields["ndims"], fields.get("dimsize", "").split()
    if not re.fullmatch(r"[2-5]", ndims):
        return f"NDims = {ndims[:20]}, not a count of 2 to 5 axes"
    if len(sizes) != int(ndims):
        return f"NDims = {ndims} beside {len(sizes)} sizes (DimSize = {' '.join(sizes)[:40]})"
    origin = next((key for key in ("Offset", "Origin", "Position") if key.lower() in fields), None)
    if origin and len(_decimals("\\".join(fields[origin.lower()].split())) or ()) != int(ndims):  # read as 0, 0, 0
        return f"{origin} = {fields[origin.lower()][:40]}, not {ndims} numbers"
    # a matrix of NaN or infinite values, or with an axis of length 0 or two axes in one line: refused in the image
    # library's words ('Bad direction, determinant is 0'), which named no field; axes not of length 1 (a matrix
    # scaled by the voxel sizes, or 1e30): called a sheared grid
    matrix = next((key for key in ("TransformMatrix", "Rotation", "Orientation") if key.lower() in fields), None)
    if matrix:
        values = _decimals("\\".join(fields[matrix.lower()].split())) or ()
        n = int(ndims)
        if len(values) != n * n:
            return f"{matrix} = {fields[matrix.lower()][:60]}, not {n * n} numbers (its axes' directions)"
        columns = np.array(values, float).reshape(n, n)
        lengths = np.linalg.norm(columns, axis=0)
        if lengths.min() == 0 or abs(np.linalg.det(columns / lengths)) < 1e-6:
            return (f"{matrix} = {fields[matrix.lower()][:60]}, axes of length 0 or in one line (no orientation: its "
                    "axes' directions)")
        # a direction's axes are unit vectors (the voxel sizes are ElementSpacing), to check_volume's tolerance
        if np.abs(lengths ** 2 - 1).max() > 1e-4:
            return (f"{matrix} = {fields[matrix.lower()][:60]}, axes of length {', '.join(f'{v:.4g}' for v in lengths)}"
                    ", not 1 (a matrix of directions: the voxel sizes are ElementSpacing's)")
    key = "ElementSpacing" if "elementspacing" in fields else "ElementSize"
    try:
        if all(float(v) > 0 and math.isfinite(float(v)) for v in fields.get(key.lower(), "1").split()):
            return None
    except ValueError:
        pass
    return f"{key} = {fields[key.lower()][:40]}, not voxel sizes (numbers above 0)"


# The bytes of a voxel of an NRRD 'type' or MetaImage ElementType, by the first of these words in it
_VOXEL_BYTES = (("long_long", 8), ("longlong", 8), ("long long", 8), ("char", 1), ("int8", 1), ("short", 2),
                ("int16", 2), ("int64", 8), ("double", 8), ("int", 4), ("long", 4), ("float", 4))


def _surplus_voxel_data(path: Path, fields: dict[str, str]) -> tuple[int, int] | None:
    """(bytes held, bytes the header's sizes and type need) for the raw voxels of an NRRD or MetaImage whose one
    file of voxels (in the file itself, or one a detached header names) holds more than its header (`fields`:
    `_header_fields(path)`) needs, else None. The image library reads the first bytes only, without an error: a
    hand-written header's sizes, type or skip that do not fit its voxels give a wrong image."""
    nrrd = path.name.lower().endswith((".nrrd", ".nhdr"))
    raw = fields.get("encoding", "").lower() == "raw" if nrrd else fields.get("compresseddata", "").lower() != "true"
    skip = fields.get("byte skip", "0") if nrrd else fields.get("headersize", "0")
    source = fields.get("data file", fields.get("datafile", "")) if nrrd else fields.get("elementdatafile", "")
    kind = (fields.get("type", "") if nrrd else fields.get("elementtype", "")).lower()
    voxel = next((size for word, size in _VOXEL_BYTES if word in kind), None)
    if not raw or voxel is None or fields.get("line skip", "0") != "0" or source.upper().startswith("LIST") \
            or _voxels_as_text(path, fields):
        return None
    try:
        sizes = [int(v) for v in fields.get("sizes" if nrrd else "dimsize", "").split()]
        skip = int(skip)
        needed = int(np.prod(sizes, dtype=np.int64)) * voxel * int(fields.get("elementnumberofchannels", "1"))
        if skip < 0 or not sizes:
            return None
        if source and source.upper() != "LOCAL":
            held = (path.parent / source).stat().st_size - skip
        else:
            start = _attached_data_start(path)
            if start is None or skip:
                return None
            held = path.stat().st_size - start
    except (OSError, ValueError):  # a numbered series of files, or a header SimpleITK's reader will refuse
        return None
    return (held, needed) if held > needed else None


def _voxels_as_text(path: Path, fields: dict[str, str]) -> bool:
    """Whether a MetaImage header (`fields`: `_header_fields(path)`) has its voxels written as numbers in text
    (BinaryData False: MetaIO takes a value beginning T, t or 1 for True, anything else for False)."""
    binary = fields.get("binarydata", "T").startswith(("T", "t", "1"))
    return path.name.lower().endswith((".mha", ".mhd")) and not binary


_NUMBER = re.compile(rb"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def _text_voxels_misread(path: Path, fields: dict[str, str], image: sitk.Image) -> str | None:
    """How SimpleITK's `image` differs from the numbers a MetaImage with its voxels written as text holds (`fields`:
    `_header_fields(path)`), else None. It reads as many numbers as the header's sizes need and ignores the rest,
    and casts each to the header's type: -1 in a MET_USHORT file is read as 65535, 70000 as 4464, 1.7 as 1. About
    1.5 s for 1.4 million voxels (the sample, 2 busy cores), which only such files pay."""
    source = fields.get("elementdatafile", "")
    try:
        if source.upper() == "LOCAL":
            data = path.read_bytes()[_attached_data_start(path) or 0:]
        else:
            data = (path.parent / source).read_bytes()
    except OSError:  # a LIST or a numbered series of files: not looked at
        return None
    written = np.array(_NUMBER.findall(data)).astype(np.float64)
    import SimpleITK as sitk

    read = sitk.GetArrayViewFromImage(image).ravel()
    if written.size != read.size:
        return f"{written.size} numbers for its {read.size} voxels"
    if read.dtype.kind == "f":  # 0.1 is read as the float32 nearest to it, not changed
        written = written.astype(read.dtype)
    wrong = np.flatnonzero(read != written)
    return f"{written[wrong[0]]:g} read as {read[wrong[0]]:g}" if wrong.size else None


_TEXT_WORD = 256  # characters: far beyond a number's; the NRRD library's text reader overruns its buffer at about 1000


def _nrrd_text_not_numbers(path: Path, fields: dict[str, str]) -> bool:
    """Whether an NRRD header (`fields`: `_header_fields(path)`) says its voxels are text (encoding ascii), but they
    hold a run of _TEXT_WORD characters or more without a space: no numbers (binary voxels under a wrong encoding).
    The NRRD library's text reader crashes the process on a run of about 1000 (a segmentation fault: no message, no
    summary.csv, the batch's other cases lost). Reads the voxels, text files only."""
    if not path.name.lower().endswith((".nrrd", ".nhdr")) \
            or fields.get("encoding", "").lower() not in ("ascii", "text", "txt"):
        return False
    source = fields.get("data file", fields.get("datafile", ""))
    start = 0 if source else _attached_data_start(path)
    if start is None:
        return False
    try:
        with open(path.parent / source if source else path, "rb") as f:
            f.seek(start)
            data = f.read()
    except OSError:  # a LIST or numbered series of files, or none: SimpleITK's reader says what is missing
        return False
    return re.search(rb"\S{%d}" % _TEXT_WORD, data) is not None


_BODY_AXIS = {"R": 0, "L": 0, "A": 1, "P": 1, "S": 2, "I": 2}  # the LPS axis each anatomical letter lies along


def _orientation_against_matrix(path: Path, fields: dict[str, str], direction, dimension: int) -> str | None:
    """A MetaImage header's AnatomicalOrientation (`fields`: `_header_fields(path)`) that lays an image axis along
    another body axis than SimpleITK's `direction` (from its TransformMatrix, or the identity without one) does,
    else None. The matrix is read column by column: one written row by row (a sagittal or coronal scan's), or left
    out beside an orientation, puts the slices in another plane, which only the orientation tells. With a matrix,
    only letters that the matrix transposed fits (at least half of each axis along its letter's) and the matrix as
    read does not: ITK picks each axis's letter greedily over the whole matrix, which leaves a strongly oblique
    scan's axis a letter under half of it (0.47 of 20, -35 and 35 degrees about z, y and x), written right."""
    letters = fields.get("anatomicalorientation", "").upper()
    if not path.name.lower().endswith((".mha", ".mhd")) or len(letters) != 3 or not set(letters) <= set(_BODY_AXIS):
        return None
    matrix = np.array(direction, float).reshape(dimension, dimension)

    def fits(m: np.ndarray) -> bool:
        return all(abs(m[_BODY_AXIS[letter], axis]) >= 0.5 for axis, letter in enumerate(letters))

    if fits(matrix):
        return None
    if any(key in fields for key in ("transformmatrix", "rotation", "orientation")) and not fits(matrix.T):
        return None  # oblique: not a matrix written row by row
    return letters


def _misread_spacing(path: Path, fields: dict[str, str], spacing) -> str | None:
    """A MetaImage header's voxel size as written (`fields`: `_header_fields(path)`; ElementSpacing, else
    ElementSize) where SimpleITK read another (`spacing`), else None. A field before it with fewer values than the
    image has axes (a 4D file's CenterOfRotation of three) takes it from SimpleITK's parser: 1 mm, without an error."""
    if not path.name.lower().endswith((".mha", ".mhd")):
        return None
    key = "ElementSpacing" if "elementspacing" in fields else "ElementSize"
    written = fields.get(key.lower(), "").split()[:3]
    try:
        if len(written) < 3 or np.allclose([float(v) for v in written], spacing[:3], rtol=1e-6, atol=0):
            return None
    except ValueError:
        return None
    return f"{key} {' '.join(written)}"


def _float32_in_its_buffer(data) -> Volume | None:
    """parse_nifti(data) with float32 voxels (None: as parse_nifti). Voxels of 8 bytes (float64: a 1024 x 1024 x
    400 scan's 3.2 GB) in `data`, the bytearray the file was read into, are converted into the front of that
    buffer a piece at a time, and the rest of it is let go: float32 voxels beside the raw ones were 4.8 GB. The
    same values as astype, whichever the file's byte order (tested: a big-endian file's were swapped into a copy
    first, 8 GB at once)."""
    volume = parse_nifti(data, native=False)  # a big-endian file's voxels too: swapped as they are converted
    if volume is None:
        return None
    source = volume.array
    geometry = (volume.GetSpacing(), volume.GetOrigin(), volume.GetDirection())
    if not isinstance(data, bytearray) or source.dtype.itemsize != 8 or not source.flags.c_contiguous:
        return Volume(source.astype(np.float32, copy=False), *geometry)
    whole = np.frombuffer(data, np.uint8)
    start = source.__array_interface__["data"][0] - whole.__array_interface__["data"][0]
    if not 0 <= start <= len(data) - source.nbytes:  # not a view of `data`
        del whole
        return Volume(source.astype(np.float32, copy=False), *geometry)
    shape, n = source.shape, source.size
    flat = source.reshape(-1)
    out = whole[:4 * n].view(np.float32)  # the header is read: the float32 voxels go first
    step = max(1, READ_PIECE // 8)
    for a in range(0, n, step):  # piece a's float32 bytes end before piece a + 1's raw ones begin
        out[a:a + step] = flat[a:a + step]  # (numpy copies a piece that overlaps its own first)
    del source, flat, out, whole, volume  # no view of `data` may remain while it shrinks
    del data[4 * n:]  # a shrink to under half: the memory goes back
    return Volume(np.frombuffer(data, np.float32, count=n).reshape(shape), *geometry)


def _needs(mask: bool) -> str:
    """What DeepWML needs, said in a refusal of a file: a FLAIR to segment, or a mask (evaluate, consensus)."""
    return ("a 3D mask (one label image over all slices of its scan)" if mask
            else "a 3D FLAIR volume (all slices of the series)")


def _read_file(path: Path, light: bool = False, float32: bool = False, mask: bool = False,
               reading: Callable[[float], None] | None = None) -> sitk.Image | Volume:
    if not path.name.lower().endswith(IMAGE_EXTENSIONS):
        raise DeepWMLError(
            f"{path}: unsupported file type; use NIfTI (.nii, .nii.gz, or a .hdr + .img pair, compressed or not), "
            "NRRD (.nrrd, .nhdr), MetaImage (.mha, .mhd) or a DICOM series folder"
        )
    _check_named_as_it_is(path)
    pair = is_nifti_pair(path)
    if pair or is_nifti(path):
        data = _nifti_pair_data(path, reading) if pair else _nifti_data(path, reading)
        _check_nifti(path, data, path.parent / _pair_data_name(path) if pair else None, mask)
        # SimpleITK cannot open NIfTI-2, nor a compressed file named .nii: those are read here, whatever `light`;
        # a pair, read once already, too (SimpleITK holds its voxels twice while it reads)
        nifti_2 = (nifti_version(data) or (1,))[0] == 2
        misnamed = not pair and _gzipped(path) and not path.name.lower().endswith(".gz")
        if light or nifti_2 or misnamed or pair:
            volume = _float32_in_its_buffer(data) if light and float32 else parse_nifti(data)
            if volume is not None:
                return volume if light else volume.to_sitk()
        del data  # not held beside SimpleITK's copies of the voxels
        if nifti_2:
            raise DeepWMLError(f"{path} is a NIfTI-2 file the image library cannot read (DeepWML reads plain NIfTI-2 "
                               "volumes: no intensity scaling, lengths in mm, a rigid orientation); save it as "
                               "NIfTI-1 (.nii.gz)")
        if misnamed:
            raise DeepWMLError(f"{path} is gzip-compressed but named .nii, which the image library cannot read; "
                               "rename it to .nii.gz")
    import SimpleITK as sitk

    reader = _file_reader(path)
    fields = {}
    try:
        with itk_names(path) as (name,):
            reader.SetFileName(name)
            # an NRRD or MetaImage header, read once for the checks SimpleITK lacks
            fields = {} if is_nifti(path) or is_nifti_pair(path) else _header_fields(path)
            fault = _nrrd_geometry_fault(path, fields)
            if fault:
                raise DeepWMLError(f"{path}: its header gives {fault}, so the header is damaged; correct it or save "
                                   "the image again")
            off = _nrrd_axes_off_space(path, fields)
            if off and len(off) < 3:
                raise DeepWMLError(f"{path} is a 2D image {off} (one slice placed in 3D space); DeepWML needs "
                                   f"{_needs(mask)}")
            if off:
                raise DeepWMLError(f"{path} is a {len(off)}D image {off}: an axis of time (or another not in space) "
                                   "beside its three in space, which the image library cannot read; DeepWML needs "
                                   f"{_needs(mask)}: save the volume to segment as a 3D file")
            fault = _metaimage_header_fault(path, fields)
            if fault:
                raise DeepWMLError(f"{path}: its header gives {fault}, so it is damaged and the image library would "
                                   "read it wrongly (or crash); correct the header or save the image again")
            reader.ReadImageInformation()
            # complex: 2 values per voxel, not vector/RGB
            if reader.GetPixelID() in (sitk.sitkComplexFloat32, sitk.sitkComplexFloat64):
                raise DeepWMLError(f"{path} holds complex values (real and imaginary parts); DeepWML needs the "
                                   "magnitude FLAIR image: export that one")
            size, components = reader.GetSize(), reader.GetNumberOfComponents()
            # volumes, not the values of one voxel; a 2D image's stays a vector (not read as a 3D volume)
            if components > 1 and len(size) == 3 and _nrrd_list_axis(path, fields):
                size, components = (*size, components), 1
            _check_layout(path, len(size), size, components, mask)
            misread = _misread_spacing(path, fields, reader.GetSpacing())
            if misread:
                read = " x ".join(f"{v:g}" for v in reader.GetSpacing()[:3])
                raise DeepWMLError(f"{path}: its header gives {misread}, but the image library read {read} mm (a field "
                                   "above it with too few values?), so lesion volumes in ml would be wrong; save it "
                                   "again with its fields complete")
            against = _orientation_against_matrix(path, fields, reader.GetDirection(), reader.GetDimension())
            if against:
                matrix = next((key for key in ("TransformMatrix", "Rotation", "Orientation") if key.lower() in fields),
                              None)
                raise DeepWMLError(f"{path}: its header's AnatomicalOrientation {against} lays the image's axes along "
                                   "other body axes than its " + (f"{matrix} (read column by column; written row by "
                                   "row?)" if matrix else "TransformMatrix, which it lacks (read as axial)") + ", so "
                                   "the plane of its slices is unknown; save it again with both in agreement (3D "
                                   "Slicer, SimpleITK and ITK write them so)")
            packing = _metaimage_packing_fault(path, fields)
            if packing:
                raise DeepWMLError(f"{path}: its header gives {packing}, and the image library would unpack them "
                                   "wrongly without an error (a volume of leftover memory); save it again (3D Slicer, "
                                   "SimpleITK and ITK write the size)")
            missing_files = _metaimage_missing_files(path, fields)
            if missing_files:
                named, needed = missing_files
                raise DeepWMLError(f"{path}: its header names {named} voxel file{'s' * (named != 1)} (ElementDataFile) "
                                   f"for its {needed} slices, and the image library would fill the others with leftover "
                                   "memory without an error; name a file for each slice (a numbered pattern counts up: "
                                   f"'slice%03d.raw 1 {needed} 1')")
            surplus = _surplus_voxel_data(path, fields) if fields else None
            if surplus:
                raise DeepWMLError(f"{path}: its voxel data take {surplus[0]} bytes, but its header's sizes and type need "
                                   f"{surplus[1]}, and the image library would read the first ones only (a wrong image, "
                                   "without an error); correct the header's sizes, type or skip (byte skip, HeaderSize)")
            missing = _unknown_voxel_size(path, fields)
            if missing:
                raise DeepWMLError(f"{path}: its header gives no voxel size ({missing}), which the image library "
                                   "reads as 1 mm, so lesion volumes in ml would be wrong; export it again with its "
                                   "spacing")
            unit = _nrrd_length_unit(path, fields)
            if unit:
                raise DeepWMLError(f"{path}: its header gives lengths in {unit!r} (space units), which the image "
                                   "library reads as mm, so the head would be measured at the wrong scale; save it "
                                   "with lengths in mm")
            if _nrrd_text_not_numbers(path, fields):
                raise DeepWMLError(f"{path}: its header says its voxels are text (encoding: ascii), but they hold no "
                                   "numbers (binary data?), on which the NRRD library would crash; correct the header's "
                                   "encoding (raw for binary voxels) or save the image again")
            with _telling(reader, reading):
                image = reader.Execute()
            misread = _voxels_as_text(path, fields) and _text_voxels_misread(path, fields, image)
            if misread:
                raise DeepWMLError(f"{path}: its voxels are written as text (BinaryData = False), and the image "
                                   f"library reads them otherwise ({misread}) without an error; correct its header's "
                                   "DimSize or ElementType, or save it again, binary (3D Slicer, SimpleITK and ITK "
                                   "write it so)")
            if image.GetNumberOfComponentsPerPixel() == 1 and "vector" in image.GetPixelIDTypeAsString():
                # NRRD with a leading axis of size 1 (kinds: list ...): a vector of one value, which nothing casts
                image = sitk.VectorIndexSelectionCast(image, 0)
            return image
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        detail = next((line.strip() for line in first if "rror" in line.lower() or "annot" in line), "unreadable")
        # a class and an address (0x55..., or 000001D2... as MSVC prints it): nothing to the user
        detail = re.sub(r"^ITK ERROR: \w+\((?:0x)?[0-9a-fA-F]+\): ", "", detail)
        teem = [line.strip()[len("[nrrd]"):].strip() for line in first if line.strip().startswith("[nrrd]")]
        if teem:  # the NRRD library says what is wrong on its last line ("couldn't open \"x.raw\"", "bzip2 ...")
            detail = re.sub(r"^_?\w+: ", "", teem[-1]) or detail
        if "orthonormal" in detail:  # a sheared (or scaled) orientation: a complete file SimpleITK will not place
            raise DeepWMLError(f"{path}: its header places the voxels on a sheared grid (axes not at right angles), "
                               "which the image library cannot read; resample it onto a regular grid first") from exc
        if _voxels_as_text(path, fields) and "cannot be read" in detail:  # all it says of numbers it could not read
            raise DeepWMLError(f"{path}: its voxels are written as text (BinaryData = False), and the image library "
                               "could not read a number for each of its DimSize voxels (fewer numbers, the file cut "
                               "short, or a word among them); save it again, binary (3D Slicer, SimpleITK and ITK "
                               "write it so)") from exc
        if "encoding not available" in detail:  # a complete file, compressed in a way the NRRD library lacks
            raise DeepWMLError(f"{path} cannot be read as an image ({detail[:160]}); save it again with gzip or raw "
                               "encoding (3D Slicer writes gzip)") from exc
        raise DeepWMLError(f"{path} cannot be read as an image ({detail[:160]}); check the file is a complete image"
                           f"{windows_path_hint(path)}") from exc


# A series description that names a FLAIR (Siemens: "t2_tirm_tra_dark-fluid", GE / Philips: "AX T2 FLAIR"),
# and words that rule one out: T1-weighted inversion recovery ("T1 FLAIR", "t1_tirm"), STIR, double inversion
# recovery (DIR), MPRAGE, diffusion.
_FLAIR_DESCRIPTION = re.compile(r"flair|dark[\s_-]*fluid|(?<![a-z])da[_-]fl(?![a-z])|tirm|fluid[\s_-]*att",
                                re.IGNORECASE)  # da-fl: Siemens' 3D FLAIR, t2_spc_da-fl_sag_p2_iso
_NOT_FLAIR_DESCRIPTION = re.compile(r"(?<![a-z0-9])t1(?![0-9])|(?<![a-z])(stir|dir|mp-?2?rage|dwi|dti|adc|swi|diff|tracew?)"
                                    r"(?![a-z])|double[\s_-]*inv|diffusion", re.IGNORECASE)
# what each word of _NOT_FLAIR_DESCRIPTION names, for a warning that says so
_NOT_FLAIR_KINDS = ((re.compile(r"(?<![a-z0-9])t1(?![0-9])|mp-?2?rage", re.IGNORECASE), "a T1-weighted scan"),
                    (re.compile(r"(?<![a-z])stir(?![a-z])", re.IGNORECASE), "STIR"),
                    (re.compile(r"(?<![a-z0-9])dir(?![a-z])|double[\s_-]*inv", re.IGNORECASE),  # not DTI's "30dir"
                     "double inversion recovery"),
                    (re.compile(r"(?<![a-z])(dwi|dti|adc|diff|tracew?)(?![a-z])|diffusion", re.IGNORECASE),
                     "a diffusion image"),
                    (re.compile(r"(?<![a-z])swi(?![a-z])", re.IGNORECASE), "susceptibility-weighted imaging"))
# a description naming a T2- or PD-weighted scan (or T2*) and no FLAIR: evidence against one, not used to choose
_T2_DESCRIPTION = re.compile(r"(?<![a-z0-9])(t2|pd)(?![0-9a-z])|(?<![a-z])(tse|fse)(?![a-z])", re.IGNORECASE)
# Image Type (0008,0008) values of diffusion images (Siemens: ORIGINAL\PRIMARY\DIFFUSION\NONE, DERIVED\PRIMARY\
# DIFFUSION\TRACEW or \ADC; Philips: DERIVED\PRIMARY\ADC) and a Siemens sequence name of one (*ep_b1000t)
_DIFFUSION_IMAGE_TYPES = frozenset({"DIFFUSION", "ADC", "TRACEW", "EADC"})
_DIFFUSION_SEQUENCE_NAME = re.compile(r"ep_b(\d+)", re.IGNORECASE)
# BIDS file-name suffixes of scans that are not a FLAIR (sub-01_T1w.nii.gz, sub-01_dwi.nii.gz)
_NOT_FLAIR_BIDS_SUFFIX = {"T1w": "a T1-weighted scan", "T2w": "a T2-weighted scan", "PDw": "a PD-weighted scan",
                          "T2starw": "a T2*-weighted scan", "PDT2": "a PD/T2 scan", "UNIT1": "a T1-weighted scan",
                          "T1map": "a T1 map", "T2map": "a T2 map", "dwi": "a diffusion image", "bold": "a BOLD series",
                          "sbref": "a reference image of a functional or diffusion series", "angio": "an angiogram",
                          "MP2RAGE": "an MP2RAGE image"}
# FLAIR nulls CSF with a long inversion time (about 1.8-2.9 s at 1.5-3 T) and a long repetition time;
# T1-weighted inversion recovery (MPRAGE, T1-FLAIR) uses 0.7-1.2 s, STIR 0.15-0.25 s, and the second
# inversion of double inversion recovery 3 s or more. A known inversion time outside this range rules a
# series out whatever its description says. 3D FLAIRs (SPACE, CUBE, VISTA) null CSF at a shorter TI than 2D ones, their
# TR being shorter and their echo trains long, but the published protocols found stay within it (UK Biobank's 3D SPACE
# FLAIR at 3 T: TI 1800 ms, TR 5000 ms; a 3D FLAIR at 3 T in Mills et al. 2007: 2200 / 6000 ms), while MPRAGE reaches
# 1100 ms: the floor is kept (a 3D FLAIR below it is warned of, not refused; its picture decides).
SECONDARY_CAPTURE_CLASS = "1.2.840.10008.5.1.4.1.1.7"  # SOP classes of Secondary Capture images (and .1-.4)
FLAIR_INVERSION_MS = (1500.0, 3000.0)
FLAIR_MIN_REPETITION_MS = 4000.0
_LISTING_CHARS = 330  # the series listed in an error, so that the one-line message stays readable


# DICOM's character sets (Specific Character Set, PS3.3 C.12.1.1.2) and Python's codecs for them. The
# multi-byte ISO 2022 sets (Japanese, Korean, Chinese) switch with escape sequences, which iso2022_jp_2 reads.
_SINGLE_BYTE_CODECS = {"IR 6": "ascii", "IR 100": "latin_1", "IR 101": "iso8859_2", "IR 109": "iso8859_3",
                       "IR 110": "iso8859_4", "IR 144": "iso8859_5", "IR 127": "iso8859_6", "IR 126": "iso8859_7",
                       "IR 138": "iso8859_8", "IR 148": "iso8859_9", "IR 203": "iso8859_15", "IR 166": "iso8859_11",
                       "IR 13": "shift_jis"}
_OTHER_CODECS = {"ISO_IR 192": "utf_8", "GB18030": "gb18030", "GBK": "gbk"}
_ISO2022_MULTI_BYTE = ("ISO 2022 IR 87", "ISO 2022 IR 159", "ISO 2022 IR 149", "ISO 2022 IR 58")
_ESCAPE = re.compile(rb"\x1b[\x24-\x2f]{1,2}[\x40-\x7e]")


def _decode_iso2022(data: bytes, katakana: bool) -> str:
    """ISO 2022 text with escape sequences (Japanese, Korean, Chinese); with `katakana` (ISO 2022 IR 13 in
    G1, as Japanese DICOM usually writes), bytes 0xA1-0xDF are half-width katakana between the escaped runs."""
    import codecs

    decoder = codecs.getincrementaldecoder("iso2022_jp_2")()
    parts, run = [], bytearray()
    for byte in data:
        if katakana and 0xA1 <= byte <= 0xDF:
            parts.append(decoder.decode(bytes(run)))
            run.clear()
            parts.append(chr(0xFF61 + byte - 0xA1))
        else:
            run.append(byte)
    parts.append(decoder.decode(bytes(run), final=True))
    return "".join(parts)


def header_value(raw: str, charset: str = "") -> str | None:
    """A header string decoded in the series' character set (`charset`: the value of Specific Character
    Set), its padding stripped and nothing else changed; None when the character set is not one DeepWML
    knows or the bytes are not valid in it. SimpleITK hands bytes that are not UTF-8 over as lone surrogates."""
    data = raw.encode("utf-8", "surrogateescape")
    terms = [t.strip() for t in charset.split("\\")] if charset.strip() else []
    try:
        if not terms or terms == [""]:  # undeclared: UTF-8, as many exports write, else Latin-1
            try:
                text = data.decode("utf_8")
            except UnicodeDecodeError:
                text = data.decode("latin_1")
        elif any(t in _ISO2022_MULTI_BYTE for t in terms):
            text = _decode_iso2022(data, katakana="ISO 2022 IR 13" in terms)
        else:
            first = terms[0] or (terms[1] if len(terms) > 1 else "")
            if first in _OTHER_CODECS:
                codec = _OTHER_CODECS[first]
            elif first.startswith(("ISO_IR ", "ISO 2022 IR ")) and first.replace("ISO_", "").replace("ISO 2022 ", "") in _SINGLE_BYTE_CODECS:
                codec = _SINGLE_BYTE_CODECS[first.replace("ISO_", "").replace("ISO 2022 ", "")]
                data = _ESCAPE.sub(b"", data)  # an ISO 2022 designation of that one set
            else:
                return None
            text = data.decode(codec)
    except (UnicodeDecodeError, LookupError):
        return None
    return text.strip(" \0")


def _header_text(raw: str, charset: str = "") -> str:
    """A header string as one line of text, for naming a series (a character set DeepWML does not know,
    or bytes not valid in it, are read as Latin-1 rather than refused)."""
    text = header_value(raw, charset)
    if text is None:
        text = raw.encode("utf-8", "surrogateescape").decode("latin_1")
    return " ".join(re.sub(r"[\x00-\x1f\x7f]", " ", text).split())


def not_flair_evidence(description: str = "", inversion_ms: float | None = None, repetition_ms: float | None = None,
                       modality: str | None = None, image_type=(), sequence_name: str = "",
                       b_values=(), secondary_capture: bool = False, frame_type=(),
                       directionality=()) -> list[str]:
    """What a scan's own header (a DICOM series', or the JSON sidecar a converter wrote beside an image file) says
    against its being a FLAIR, each as words for a warning; empty where nothing does (a FLAIR, or a header that
    says nothing). Only positive evidence counts: a description that names no kind is not held against a scan.
    `frame_type`, `directionality`: an enhanced MR file's Frame Type values and Diffusion Directionality values
    (of its frames' functional groups)."""
    reasons = []
    if modality not in (None, "", "MR"):
        reasons.append(f"its modality is {modality}, not MR")
    if secondary_capture:
        reasons.append("it is a Secondary Capture (a picture of images, not the scanner's)")
    kinds = [kind for pattern, kind in _NOT_FLAIR_KINDS if pattern.search(description or "")]
    # a T2 (or TSE) name beside a FLAIR's timing is an inversion recovery T2 nulling CSF: a FLAIR ('t2_spc_ir')
    flair_timing = (inversion_ms is not None and FLAIR_INVERSION_MS[0] <= inversion_ms <= FLAIR_INVERSION_MS[1]
                    and (repetition_ms is None or repetition_ms >= FLAIR_MIN_REPETITION_MS))
    if (not kinds and description and not flair_timing and _T2_DESCRIPTION.search(description)
            and not _FLAIR_DESCRIPTION.search(description)):
        kinds.append("a T2- or PD-weighted scan")
    if kinds:
        reasons.append(f"its description '{description}' names {' or '.join(kinds)}")
    if inversion_ms is not None and not FLAIR_INVERSION_MS[0] <= inversion_ms <= FLAIR_INVERSION_MS[1]:
        reasons.append(f"its inversion time is {inversion_ms:g} ms (a FLAIR's is {FLAIR_INVERSION_MS[0]:g}-"
                       f"{FLAIR_INVERSION_MS[1]:g} ms)")
    elif inversion_ms is not None and repetition_ms is not None and repetition_ms < FLAIR_MIN_REPETITION_MS:
        reasons.append(f"its repetition time is {repetition_ms:g} ms (a FLAIR's is {FLAIR_MIN_REPETITION_MS:g} ms or "
                       "more)")
    diffusion_types = [v for v in image_type if str(v).strip().upper() in _DIFFUSION_IMAGE_TYPES]
    if diffusion_types:
        reasons.append(f"its Image Type names {', '.join(dict.fromkeys(str(v).strip().upper() for v in diffusion_types))}"
                       " (a diffusion image)")
    frame_types = [str(v).strip().upper() for v in frame_type if str(v).strip().upper() in _DIFFUSION_IMAGE_TYPES]
    if frame_types and not diffusion_types:
        reasons.append(f"its Frame Type names {', '.join(dict.fromkeys(frame_types))} (a diffusion image)")
    named_b = _DIFFUSION_SEQUENCE_NAME.search(sequence_name or "")
    if named_b:
        reasons.append(f"its sequence name {sequence_name.strip()} is a diffusion sequence's (b = {int(named_b.group(1))})")
    weighted = [b for b in b_values if b is not None and np.isfinite(b) and b > DIFFUSION_MIN_B]
    if weighted and not named_b:
        reasons.append(f"its diffusion b-value is {max(weighted):g} s/mm\u00b2")
    directions = [d for d in dict.fromkeys(str(v).strip().upper() for v in directionality) if d in _WEIGHTED_DIRECTIONALITY]
    if directions and not weighted and not named_b:
        reasons.append(f"its Diffusion Directionality is {', '.join(directions)} (a diffusion-weighted image)")
    return reasons


# a b-value above this (s/mm^2) is a diffusion weighting; b = 0 images of a diffusion series are T2-weighted
DIFFUSION_MIN_B = 50.0
# Diffusion Directionality (0018,9075) of a diffusion-weighted frame (PS3.3 C.8.13.5.9); NONE is a b = 0 frame
_WEIGHTED_DIRECTIONALITY = frozenset({"DIRECTIONAL", "BMATRIX", "ISOTROPIC"})
# The vendors' private b-values (s/mm^2), for series whose standard Diffusion b-value (0018,9087) is missing, as in
# classic (one image a file) exports of older software: (group, element within the creator's block, private
# creator, value representation). Each is read only where its private creator element (gggg,00xx) names it,
# and then at (gggg,xxEE) (PS3.5 7.8.1): the same element number means other things under other creators.
# GE: (0043,xx39) IS under GEMS_PARM_01, four values, the first the b-value, 1000000000 added to it by multi-b and
# synthetic DWI (the bias in (0043,107F)) ('1000001250\8\0\0' is b = 1250); it holds other sequence parameters
# on other sequences (dcm2niix issue 449), so it counts on an echo planar sequence only (Scanning Sequence EP, or
# Echo Planar Pulse Sequence YES), as GE's diffusion imaging is. Philips: Diffusion B-Factor (2001,xx03) FL under
# "Philips Imaging DD 001" (0 on images without diffusion weighting). Siemens: B_value (0019,xx0C) IS under
# "SIEMENS MR HEADER".
_PRIVATE_B_VALUES = ((0x0043, 0x39, "GEMS_PARM_01", "IS"), (0x2001, 0x03, "PHILIPS IMAGING DD 001", "FL"),
                     (0x0019, 0x0C, "SIEMENS MR HEADER", "IS"))
_PRIVATE_B_GROUPS = frozenset(f"{group:04x}" for group, *_ in _PRIVATE_B_VALUES)  # as image libraries key them
GE_B_VALUE_BIAS = 1_000_000_000
# the private elements `_mislabelled_header` reads for them: every creator slot of those groups and its b-value
_PRIVATE_B_TAGS = frozenset(tag for group, low, *_ in _PRIVATE_B_VALUES for block in range(0x10, 0x100)
                            for tag in (group << 16 | block, group << 16 | block << 8 | low))


def _private_number(value, vr: str) -> float | None:
    """A private element's first value as a number: text (IS), or with `vr` FL four bytes little endian (as
    read by hand); text an image library wrote as base64 (a value whose VR it did not know, UN) decoded first."""
    import base64
    import binascii

    if isinstance(value, str):
        try:
            number = float(value.strip(" \0").split("\\")[0])
            return number if math.isfinite(number) else None
        except ValueError:
            try:
                value = base64.b64decode(value.strip(), validate=True)
            except (binascii.Error, ValueError):
                return None
    if not isinstance(value, (bytes, bytearray)):
        return None
    if vr == "FL":
        number = struct.unpack("<f", value)[0] if len(value) == 4 else None
    else:
        try:
            number = float(bytes(value).decode("ascii").strip(" \0").split("\\")[0])
        except (UnicodeDecodeError, ValueError):
            return None
    return number if number is not None and math.isfinite(number) else None


def vendor_b_value(elements: dict, scanning_sequence: str = "", echo_planar: str = "") -> float | None:
    """The largest b-value (s/mm^2) the vendors' private elements give (`_PRIVATE_B_VALUES`), each under its own
    private creator only; None where none does. `elements`: {tag: value} of the header's elements of those groups
    (text, as an image library hands them over, or bytes, as read by hand); `scanning_sequence`, `echo_planar`:
    Scanning Sequence (0018,0020) and Echo Planar Pulse Sequence (0018,9018), for GE's."""
    found = []
    epi = "EP" in re.split(r"[\\\s]+", scanning_sequence.upper()) or echo_planar.strip(" \0").upper() == "YES"
    for group, low, creator, vr in _PRIVATE_B_VALUES:
        for block in range(0x10, 0x100):
            owner = elements.get(group << 16 | block)
            if owner is None:
                continue
            name = owner if isinstance(owner, str) else bytes(owner).decode("latin_1")
            if name.strip(" \0").upper() != creator:
                continue
            number = _private_number(elements.get(group << 16 | block << 8 | low), vr)
            if number is None or (group == 0x0043 and not epi):
                continue
            if group == 0x0043 and number >= GE_B_VALUE_BIAS:
                number %= GE_B_VALUE_BIAS
            found.append(number)
    return max(found) if found else None


def _reader_b_value(reader) -> float | None:
    """The largest b-value a file's header already read (`reader`, private elements loaded) gives: the standard
    Diffusion b-value (0018,9087), else a vendor's private one (`vendor_b_value`)."""
    elements = {}
    for key in reader.GetMetaDataKeys():
        if len(key) == 9 and key[4] == "|" and key[:4] in _PRIVATE_B_GROUPS:
            try:
                elements[int(key[:4] + key[5:], 16)] = reader.GetMetaData(key)
            except (ValueError, RuntimeError):
                continue
    vendor = vendor_b_value(elements, reader.GetMetaData("0018|0020") if reader.HasMetaDataKey("0018|0020") else "",
                            reader.GetMetaData("0018|9018") if reader.HasMetaDataKey("0018|9018") else "") \
        if elements else None
    values = [b for b in (_header_number(reader, "0018|9087"), vendor) if b is not None]
    return max(values) if values else None


def _json_number(value) -> float | None:
    """A JSON sidecar's value as a finite float; None where it is not one number (a string, a boolean, NaN, or an
    integer beyond a float's range, which JSON allows)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


# a sidecar's time above this many seconds is no MRI's inversion or repetition time in seconds: one written in ms
# (against BIDS's seconds, as hand-made sidecars are), read as ms
_SIDECAR_MS_ABOVE_S = 100.0


def _seconds_as_ms(value) -> float | None:
    """A time of a BIDS sidecar (seconds) in ms; None where it is not one number. A value above 100 (s) is taken
    to be in ms already."""
    if isinstance(value, list) and value:  # some converters write one time per echo or per volume
        value = value[0]
    number = _json_number(value)
    if number is None:
        return None
    return number if number > _SIDECAR_MS_ABOVE_S else number * 1000.0


def image_file_evidence(path: str | os.PathLike) -> tuple[list[str], list[str]]:
    """What the files a converter wrote beside an image file say against its being a FLAIR (`not_flair_evidence`):
    a JSON sidecar (dcm2niix, BIDS: SeriesDescription or ProtocolName, InversionTime and RepetitionTime in seconds
    (in ms where above 100),
    Modality, ImageType, SequenceName, DiffusionBValue), a .bval file of b-values (a diffusion series), and a BIDS
    file-name suffix (_T1w, _dwi, ...). Returns (the reasons, the names of the files they came from). A sidecar that
    cannot be read or parsed says nothing: it is not the scan, and the scan's own check still runs."""
    p = Path(path)
    stem = case_name(p)
    if not p.is_file() or stem in ("", "."):
        return [], []
    reasons, sources = [], []
    sidecar = p.with_name(stem + ".json")
    header: dict = {}
    try:
        if sidecar.is_file() and sidecar.stat().st_size <= 4_000_000:  # a converter's sidecar is a few KB
            with open(sidecar, encoding="utf-8-sig") as handle:
                loaded = json.load(handle)
            header = loaded if isinstance(loaded, dict) else {}
    except (OSError, ValueError):
        header = {}
    if header:
        def text(key):
            value = header.get(key)
            return value.strip() if isinstance(value, str) else ""
        image_type = header.get("ImageType")
        b_value = header.get("DiffusionBValue")
        found = not_flair_evidence(
            text("SeriesDescription") or text("ProtocolName"), _seconds_as_ms(header.get("InversionTime")),
            _seconds_as_ms(header.get("RepetitionTime")), text("Modality").upper() or None,
            tuple(v for v in image_type if isinstance(v, str)) if isinstance(image_type, list) else (),
            text("SequenceName"),
            (_json_number(b_value),))
        if found:
            reasons += found
            sources.append(sidecar.name)
    bval = p.with_name(stem + ".bval")
    try:
        values = [float(v) for v in bval.read_text(encoding="ascii").split()] \
            if bval.is_file() and bval.stat().st_size <= 1_000_000 else []
    except (OSError, ValueError, UnicodeDecodeError):
        values = []
    weighted = [v for v in values if np.isfinite(v) and v > DIFFUSION_MIN_B]
    if weighted:
        reasons.append(f"its b-values go up to {max(weighted):g} s/mm\u00b2 (a diffusion series)")
        sources.append(bval.name)
    suffix = re.search(r"_([A-Za-z0-9]+)$", stem)
    # (a FLAIR filed under T2w with a label saying so, 'sub-01_acq-FLAIR_T2w', is not held to its suffix)
    if suffix and suffix.group(1) in _NOT_FLAIR_BIDS_SUFFIX and not _FLAIR_DESCRIPTION.search(stem):
        reasons.append(f"its name ends _{suffix.group(1)}, the BIDS name of "
                       f"{_NOT_FLAIR_BIDS_SUFFIX[suffix.group(1)]}")
        sources.append(p.name)
    return reasons, sources


@dataclass(frozen=True)
class DicomSeries:
    """One DICOM series (of a folder, or of a catalogue's study), as its first file's header describes it."""

    uid: str
    description: str
    files: tuple  # in slice order (by position along the slice normal, else instance number, else name)
    inversion_ms: float | None = None
    repetition_ms: float | None = None
    echo_ms: float | None = None
    number: int | None = None  # the series number (0020,0011), as PACS and the console show it
    study_uid: str | None = None  # the Study Instance UID (0020,000d): which visit of which patient
    instance_numbers: tuple = ()  # (0020,0013) of each file, in the order of `files` (slice order)
    instance_uids: tuple = ()  # (0008,0018) of each file ("" where it has none), in the order of `files`
    image_positions: tuple = ()  # (0020,0032) of each file, x, y, z in mm (None where it gives none), in the order of
    # `files`
    modality: str | None = None  # (0008,0060): MR for a FLAIR
    secondary_capture: bool = False  # a picture of images (e.g. DeepWML's own outline series), never the FLAIR
    damaged: tuple = ()  # files beside its own that could not be read (empty, or DICOM that fails): maybe its own
    mislabelled: tuple = ()  # (path, (transfer syntax, encoding found)) of its files whose data set is not encoded as
    # their header says (`_mislabelled_syntax`), and of files beside its own such that their series cannot be told
    # (`_mislabelled_header`): never given to GDCM; the series is refused
    slice_thickness_mm: float | None = None  # Slice Thickness (0018,0050): how thick each slice is, not how far apart
    slice_positions_mm: tuple = ()  # each file's place along the slice normal (Image Position), in the order of `files`;
    # empty where a file gives none
    study_date: str = ""  # the Study Date (0008,0020) as the header gives it (YYYYMMDD); "" where it has none
    pixel_ids: tuple = ()  # the SimpleITK pixel types of its files as GDCM reads them (rescaled), each once; None
    # for one of several values per pixel (colour)
    image_type: tuple = ()  # Image Type (0008,0008), its values (ORIGINAL, PRIMARY, ...; DIFFUSION of a diffusion image)
    sequence_name: str = ""  # Sequence Name (0018,0024) (Siemens: *tir2d1_16 of a FLAIR, *ep_b1000t of a diffusion image)
    b_value: float | None = None  # the largest b-value (s/mm^2) its files' headers give, where any does: Diffusion
    # b-value (0018,9087) (an enhanced MR file's: of its frames' MR Diffusion groups), else a vendor's private one
    # (`vendor_b_value`)
    frame_type: tuple = ()  # an enhanced MR file's Frame Type (0008,9007) values, of all its frames
    diffusion_directionality: tuple = ()  # an enhanced MR file's Diffusion Directionality (0018,9075) values

    @property
    def diffusion(self) -> bool:
        """The header says it is a diffusion image (Image Type, Frame Type, sequence name, b-value or Diffusion
        Directionality), whatever its description."""
        return bool(any(str(v).strip().upper() in _DIFFUSION_IMAGE_TYPES for v in (*self.image_type, *self.frame_type))
                    or _DIFFUSION_SEQUENCE_NAME.search(self.sequence_name)
                    or (self.b_value is not None and self.b_value > DIFFUSION_MIN_B)
                    or any(str(v).strip().upper() in _WEIGHTED_DIRECTIONALITY for v in self.diffusion_directionality))

    @property
    def derived(self) -> bool:
        """A picture or a segmentation of other images (DeepWML's outline series, a Secondary Capture; its DICOM SEG,
        Modality SEG): never the FLAIR, nor where a study's images lie."""
        return self.secondary_capture or self.modality == "SEG"

    @property
    def unlabelled(self) -> bool:
        """Nothing in the header says what it is (no description, no inversion time, no diffusion; MR or no
        modality), as in exports that strip descriptions."""
        return (not self.description and self.inversion_ms is None and self.modality in (None, "MR")
                and not self.secondary_capture and not self.diffusion)

    def not_flair_evidence(self) -> list[str]:
        """What the series' header says against its being a FLAIR (`not_flair_evidence`)."""
        return not_flair_evidence(self.description, self.inversion_ms, self.repetition_ms, self.modality,
                                  self.image_type, self.sequence_name, (self.b_value,), self.secondary_capture,
                                  self.frame_type, self.diffusion_directionality)

    @property
    def looks_like_flair(self) -> bool:
        if (_NOT_FLAIR_DESCRIPTION.search(self.description) or self.modality not in (None, "MR")
                or self.secondary_capture or self.diffusion):
            return False
        if self.inversion_ms is not None:  # the sequence's own timing rules over its name
            return (FLAIR_INVERSION_MS[0] <= self.inversion_ms <= FLAIR_INVERSION_MS[1]
                    and (self.repetition_ms is None or self.repetition_ms >= FLAIR_MIN_REPETITION_MS))
        return bool(_FLAIR_DESCRIPTION.search(self.description))

    def label(self) -> str:
        name = self.description if len(self.description) <= 40 else self.description[:39] + "~"
        which = f"series {self.number}" if self.number is not None else f"UID ...{self.uid[-10:]}"
        timing = "".join(f", {key} {value:g} ms" for key, value in (("TI", self.inversion_ms), ("TR", self.repetition_ms))
                         if value is not None)
        return f"{which} '{name or '(no description)'}' ({len(self.files)} images{timing})"

    def as_dict(self, chosen_by: str) -> dict:
        return {"uid": self.uid, "number": self.number, "description": self.description, "images": len(self.files),
                "inversion_ms": self.inversion_ms, "repetition_ms": self.repetition_ms, "echo_ms": self.echo_ms,
                "study_uid": self.study_uid, "slice_thickness_tag_mm": self.slice_thickness_mm, "chosen_by": chosen_by}

    def slice_warnings(self, image) -> list[str]:
        """What a report warns of the slices of the series as read (`image`): a gap between them, uneven spacing."""
        return [w for w in (self.slice_gap_warning(image), self.slice_spacing_warning(image)) if w]

    def slice_gap_warning(self, image) -> str | None:
        """A warning when the header's Slice Thickness is less than the spacing of the series' slices (`image`: the
        series as read, its third axis the slices): a gap between the slices. The volumes rightly use the spacing
        (each slice stands for the tissue up to the next), but tissue between the slices was never imaged, and the
        paper's LV (area x slice thickness) would differ from ours. Slices that overlap (a 3D FLAIR reconstructed
        at half its thickness, as is common) image everything: recorded in `dicom_series`, not warned of."""
        spacing = float(image.GetSpacing()[2])
        thickness = self.slice_thickness_mm
        if thickness is None or thickness <= 0 or spacing - thickness <= _slice_tolerance_mm(spacing):
            return None
        return (f"DICOM slices {spacing:.2f} mm apart but {thickness:.2f} mm thick (Slice Thickness; a "
                f"{spacing - thickness:.2f} mm gap between them): {_volumes_use(image)} the spacing, {spacing:.2f} mm")

    def slice_spacing_warning(self, image) -> str | None:
        """A warning when the series' slices are unevenly spaced, by less than `_check_slice_spacing` refuses
        (`image`: the series as read, its third axis the slices). ITK puts them on a regular grid spaced by their
        mean step, which keeps the stack's extent, but a slice then lies off its place and stands for a slab of
        the mean thickness, not the tissue up to its neighbours: a lesion's place and volume a little off where
        the steps differ. Positions written rounded (to 0.01 or 0.1 mm) or with float noise stay within the tolerance. A
        multi-frame (enhanced) file's frames are judged by their own positions, along the volume's slice axis
        (`_check_frames` puts them on the grid of their mean step, as ITK puts a series')."""
        along, which = np.array(self.slice_positions_mm, float), "image"
        if len(self.files) == 1 and image.GetDimension() == 3 and image.GetSize()[2] > 1:
            geometry = frame_geometry(self.files[0])
            along = (np.array(geometry[0]) @ np.array(image.GetDirection()).reshape(3, 3)[:, 2] if geometry
                     else np.array([]))
            which = "frame"
        elif len(along) != len(self.files):
            return None
        if len(along) < 3 or image.GetDimension() != 3 or image.GetSize()[2] != len(along):
            return None
        spacing = float(image.GetSpacing()[2])
        steps = np.diff(along)
        off = np.abs(along - along[0] - spacing * np.arange(len(along)))  # from its place on the grid
        if max(float(np.abs(steps - spacing).max()), float(off.max())) <= max(UNEVEN_TOLERANCE_MM,
                                                                              _slice_tolerance_mm(spacing)):
            return None
        k = int(np.argmax(off))
        number = self.instance_numbers[k] if len(self.instance_numbers) == len(along) else None
        which = f"{which} {k + 1}" + (f" (instance {number})" if number is not None else "")
        return (f"DICOM slices unevenly spaced ({steps.min():.2f} to {steps.max():.2f} mm apart by their positions): "
                f"{_volumes_use(image)} their mean spacing, {spacing:.2f} mm, which puts {which} {off[k]:.2f} mm from "
                "where it was imaged (lesions there are placed as far off, and measured with the mean spacing)")


def _volumes_use(image) -> str:
    return "volumes and LV use" if axial_axis(image) == 2 else "volumes use"


# Slice Thickness and the spacing of the slices, and the steps between slices and their spacing, count as the same
# within the larger of these (positions and thicknesses are written rounded: 3 and 2.9999 mm, steps 0.01 mm off)
SLICE_TOLERANCE_MM = 0.05
SLICE_TOLERANCE = 0.02
# slices unevenly spaced are warned of from the larger of this and the above: positions written rounded to 0.1 mm
# (steps up to 0.1 mm off, a slice 0.05 mm) on a thin 3D FLAIR's 0.55 mm slices are no misplacement worth a word
UNEVEN_TOLERANCE_MM = 0.15


def _slice_tolerance_mm(spacing: float) -> float:
    return max(SLICE_TOLERANCE_MM, SLICE_TOLERANCE * spacing)


def _header_number(reader, key: str) -> float | None:
    if not reader.HasMetaDataKey(key):
        return None
    try:
        value = float(reader.GetMetaData(key).strip().split("\\")[0])
    except ValueError:
        return None
    return value if math.isfinite(value) else None  # 'nan' (a damaged header): not given


def _series_header(reader) -> tuple:
    """(description, inversion, repetition, echo, series number, study UID, modality, whether Secondary
    Capture, slice thickness, (Image Type's values, sequence name, diffusion b-value (`_reader_b_value`), Frame Type
    values, Diffusion Directionality values)) from a file's header already read (the last two an enhanced MR file's,
    `_file_series_header`)."""
    charset = reader.GetMetaData("0008|0005") if reader.HasMetaDataKey("0008|0005") else ""
    description = _header_text(reader.GetMetaData("0008|103e"), charset) if reader.HasMetaDataKey("0008|103e") else ""
    inversion, repetition, echo, number = (_header_number(reader, key) for key in
                                           ("0018|0082", "0018|0080", "0018|0081", "0020|0011"))
    study = reader.GetMetaData("0020|000d").strip(" \0") if reader.HasMetaDataKey("0020|000d") else ""
    modality = reader.GetMetaData("0008|0060").strip(" \0").upper() if reader.HasMetaDataKey("0008|0060") else ""
    sop_class = reader.GetMetaData("0008|0016").strip(" \0") if reader.HasMetaDataKey("0008|0016") else ""
    image_type = tuple(v.strip(" \0") for v in reader.GetMetaData("0008|0008").split("\\")) \
        if reader.HasMetaDataKey("0008|0008") else ()
    sequence_name = reader.GetMetaData("0018|0024").strip(" \0") if reader.HasMetaDataKey("0018|0024") else ""
    return (description, inversion, repetition, echo, None if number is None else int(number), study or None,
            modality or None, sop_class.split(".")[:10] == SECONDARY_CAPTURE_CLASS.split("."),  # SC and its multi-frame kinds
            _header_number(reader, "0018|0050"), (image_type, sequence_name, _reader_b_value(reader), (), ()))


def _file_series_header(reader, path: str) -> tuple:
    """`_series_header` of a file's header already read (`reader`), with an enhanced MR file's inversion, repetition
    and echo time and slice thickness taken from its functional groups where its top level lacks them, and what
    they say of diffusion (the largest b-value of its frames, their Frame Type and Diffusion Directionality)."""
    header = _series_header(reader)
    if reader.HasMetaDataKey("0008|0016") and reader.GetMetaData("0008|0016").strip(" \0") in _ENHANCED_MR:
        grouped = _enhanced_header(path)  # kept in the functional groups
        image_type, sequence_name, b_value = header[9][:3]
        b_values = [b for b in (b_value, grouped[4]) if b is not None]
        header = (header[0], *(given if given is not None else value for given, value in zip(header[1:4], grouped)),
                  *header[4:8], header[8] if header[8] is not None else grouped[3],
                  (image_type, sequence_name, max(b_values) if b_values else None, grouped[5], grouped[6]))
    return header


def dicom_file_evidence(path: str | os.PathLike) -> list[str]:
    """What one DICOM file's header says against its series being a FLAIR (`not_flair_evidence`; for a volume
    3D Slicer loaded from its DICOM database, whose files DeepWML did not choose). Empty where the file cannot be
    read: the scan's own check still runs."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.LoadPrivateTagsOn()  # the vendors' private b-values (`vendor_b_value`)
    previous = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        with itk_names(path) as (itk_name,):
            reader.SetFileName(itk_name)
            reader.ReadImageInformation()
        header = _file_series_header(reader, str(path))
    except (RuntimeError, OSError, DeepWMLError):
        return []
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(previous)
    image_type, sequence_name, b_value, frame_type, directionality = header[9]
    return not_flair_evidence(header[0], header[1], header[2], header[6], image_type, sequence_name, (b_value,),
                              header[7], frame_type, directionality)


def dicom_series(folder: str | os.PathLike) -> list[DicomSeries]:
    """Every DICOM series in a folder (not its subfolders), described from the headers (one pass over the
    files, as `dicom_catalogue` reads a tree), in series-number order, each one's files in slice order."""
    entries, _ = _read_series(Path(folder), recursive=False)
    return sorted((_series_of(uid, entry) for uid, entry in entries.items()), key=_by_number)


def _by_number(series: DicomSeries) -> tuple:
    return series.number is None, series.number or 0, series.uid


def _looks_dicom(name: str) -> bool:
    return not name.startswith(".") and not name.lower().endswith(_NOT_DICOM_SUFFIXES)


@dataclass(frozen=True)
class DicomStudy:
    """One study (one Study Instance UID) found under a folder by `dicom_catalogue`, as a case."""

    name: str  # the case name: the folder its files share, as a path under the searched folder
    folder: Path
    uid: str | None
    series: tuple  # DicomSeries, files in slice order
    date: str = ""


def _image_position(reader) -> tuple | None:
    """A file's Image Position (Patient), x, y, z in mm; None where it gives none, or not three numbers."""
    if not reader.HasMetaDataKey("0020|0032"):
        return None
    try:
        position = tuple(float(v) for v in reader.GetMetaData("0020|0032").split("\\"))
    except ValueError:
        return None
    return position if len(position) == 3 else None


def _slice_key(reader, path: str) -> tuple:
    """Sort key of a file within its series: position along the slice normal, else instance number, else name."""
    try:
        position = [float(v) for v in reader.GetMetaData("0020|0032").split("\\")]
        cosines = [float(v) for v in reader.GetMetaData("0020|0037").split("\\")]
        if len(cosines) != 6:  # (refused by _check_orientation_given)
            raise ValueError
        normal = np.cross(cosines[:3], cosines[3:6])
        return (0, float(np.dot(position, normal)), path)
    except (RuntimeError, ValueError, IndexError):
        pass
    direction = reader.GetDirection()
    if (reader.HasMetaDataKey("0008|0016") and reader.GetMetaData("0008|0016").strip(" \0") in _ENHANCED_MR
            and len(direction) == 9):  # its position in its functional groups, as GDCM reads them
        return (0, float(np.dot(reader.GetOrigin(), np.array(direction).reshape(3, 3)[:, 2])), path)
    number = _header_number(reader, "0020|0013")
    return (1, number if number is not None else 0.0, path)


# the header elements `_mislabelled_header` reads of a file GDCM is not given: Series and Study Instance UID,
# description, inversion, repetition and echo time, series and instance number, modality, SOP class and instance,
# slice thickness, study date, image position and orientation, character set, Image Type, sequence name, b-value,
# Scanning Sequence, Echo Planar Pulse Sequence, and the vendors' private b-values (`vendor_b_value`)
_SERIES_TAGS = frozenset({0x0020000E, 0x0020000D, 0x0008103E, 0x00180082, 0x00180080, 0x00180081, 0x00200011,
                          0x00200013, 0x00080060, 0x00080016, 0x00080018, 0x00180050, 0x00080020, 0x00200032,
                          0x00200037, 0x00080005, 0x00080008, 0x00180024, 0x00189087, 0x00180020,
                          0x00189018}) | _PRIVATE_B_TAGS


def _mislabelled_header(path: str, found: tuple[str, str]) -> dict | None:
    """Of a file `_mislabelled_syntax` found (`found`), whose data set is little endian: its series as `_read_series`
    records a file ({"uid", "header" (as `_series_header`'s), "study", "date", "file"}), read from its first 64 kB
    as the data set is encoded; None where it cannot be (no known encoding, no Series Instance UID)."""
    if found[1] not in ("implicit VR little endian", "explicit VR little endian"):
        return None
    try:
        with open(path, "rb") as f:
            head = f.read(65536)
        _, start = _dataset(head, 132, len(head), True, "meta")
        top, _ = _dataset(head, start, len(head), found[1].startswith("explicit"), "top", _SERIES_TAGS)
    except (OSError, ValueError, struct.error):
        return None

    def text(tag: int) -> str:
        value = top.get(tag)
        return bytes(value).decode("utf-8", "surrogateescape").strip(" \0") if isinstance(value, bytes) else ""

    def number(tag: int) -> float | None:
        try:
            value = float(text(tag).split("\\")[0])
        except ValueError:
            return None
        return value if math.isfinite(value) else None

    def b_value() -> float | None:  # Diffusion b-value (0018,9087): FD, 8 bytes little endian; else a vendor's
        value = top.get(0x00189087)
        found = struct.unpack("<d", value)[0] if isinstance(value, bytes) and len(value) == 8 else None
        values = [b for b in (found, vendor_b_value({tag: v for tag, v in top.items() if tag in _PRIVATE_B_TAGS},
                                                    text(0x00180020), text(0x00189018)))
                  if b is not None and math.isfinite(b)]
        return max(values) if values else None

    def numbers(tag: int, count: int) -> list | None:
        try:
            values = [float(v) for v in text(tag).split("\\")]
        except ValueError:
            return None
        return values if len(values) == count else None

    uid = text(0x0020000E)
    if not uid:
        return None
    series_number, instance = number(0x00200011), number(0x00200013)
    position, cosines = numbers(0x00200032, 3), numbers(0x00200037, 6)
    key = ((0, float(np.dot(position, np.cross(cosines[:3], cosines[3:]))), path) if position and cosines else
           (1, instance if instance is not None else 0.0, path))
    header = (_header_text(text(0x0008103E), text(0x00080005)), number(0x00180082), number(0x00180080),
              number(0x00180081), None if series_number is None else int(series_number), text(0x0020000D) or None,
              text(0x00080060).upper() or None,
              text(0x00080016).split(".")[:10] == SECONDARY_CAPTURE_CLASS.split("."), number(0x00180050),
              (tuple(v.strip(" \0") for v in text(0x00080008).split("\\")) if text(0x00080008) else (),
               text(0x00180024), b_value(), (), ()))
    return {"uid": uid, "header": header, "study": header[5], "date": text(0x00080020),
            "file": (key, path, None if instance is None else int(instance), text(0x00080018),
                     tuple(position) if position else None)}


# The headers read within `dicom_headers_read_once` ({(kind, folder as given, the working folder where that is
# relative, recursive): (its `_folder_state`, the answer, how many files and folders it was read from)}); None outside
# one. Shared by every thread of the process, each answer checked against the files as they are now, so one thread's
# cannot stand for another's changed folder.
_header_cache: dict | None = None
_header_cache_users = 0
_header_cache_lock = threading.Lock()
# the files the answers kept were read from (each counted once per answer: a folder's series and its GDCM scan, twice),
# the least recently asked for forgotten first past these; an answer of more files is not kept (a catalogue of a
# large export, asked for once). A run asks for each input's folder when the inputs are expanded (or checked, or
# fingerprinted: train) and again when its case is read, so a count of folders (32) forgot every folder of a run of
# more than about 16 before its case came: a bound of files keeps a whole run's (under 1 kB each: 50 MB at most)
_HEADER_CACHE_FILES = 50_000
# An answer is kept only where each file it was read from was last written and changed (mtime, ctime) more than this
# before the reading began ("racily clean", as git's index says): a file's times are the kernel's coarse clock (a tick,
# 1-16 ms, behind time.time()) cut down to its file system's step (ns on ext4, xfs, btrfs, tmpfs, APFS; 100 ns NTFS;
# 10 ms exFAT; 1 s ext3, HFS+; 2 s FAT), so a file rewritten later in the step it was read in keeps its times, size
# and inode, and its state would stand for headers it no longer holds. 3 s: FAT's 2 s step, the tick and a second of
# difference between this machine's clock and a file server's (which stamps a network share's files).
_RACY_NS = 3_000_000_000


def _now_ns() -> int:
    """The time a reading begins, against which its files' times are judged (`_RACY_NS`): time.time_ns(), the precise
    clock, at or ahead of the coarse one the kernel stamps files with (so a file looks newer, never older)."""
    return time.time_ns()


@contextlib.contextmanager
def dicom_headers_read_once():
    """Within it (one run: a command, a library call that reads several cases), a DICOM folder's headers are read
    once (`_read_series`; GDCM's scan for its series, `_dicom_series`, once too), however many times its series are
    asked for: --series checked up front and then chosen for its case, a FLAIR folder a DICOM SEG of each rater is
    placed by. Read again where the folder changed since (`_folder_state`: its files' names, sizes, times and
    inodes); forgotten when the outermost one ends. Also a decorator. Outside one, every call reads the headers, as
    before.

    A folder with a file written or changed (mtime, ctime) within `_RACY_NS` (3 s) of the moment its reading began is
    read again each time it is asked for, not kept, until its files are that old: a file rewritten in place in the
    same tick of the file system's clock (up to 2 s on FAT) keeps its size and times, so that its state could not tell
    the change (git's "racily clean" entries). An export written minutes before the run is read once."""
    global _header_cache, _header_cache_users
    with _header_cache_lock:
        if _header_cache_users == 0:
            _header_cache = {}
        _header_cache_users += 1
    try:
        yield
    finally:
        with _header_cache_lock:
            _header_cache_users -= 1
            if _header_cache_users == 0:
                _header_cache = None


def _folder_state(root: Path, recursive: bool) -> tuple | None:
    """What `_scan_series` of `root` is read from, without reading a file: each folder it walks (`_each_folder`) and
    each file's name and stat (device, inode, size, modification and change times in ns, mode), the folders that
    could not be listed. Two alike: the same files, unchanged (a file rewritten in place changes its times). None
    where `root` itself cannot be looked at (not cached)."""
    errors: list = []
    folders = []
    try:
        for current, files in _each_folder(root, lambda exc: errors.append((str(exc.filename), exc.errno)), recursive):
            here = os.stat(current)
            entries = [(current, here.st_dev, here.st_ino, here.st_mtime_ns)]
            for name in sorted(files):
                try:
                    found = os.stat(os.path.join(current, name))
                except OSError as exc:  # a broken link, a file gone: so noted (it changes when it comes back)
                    entries.append((name, exc.errno))
                    continue
                entries.append((name, found.st_dev, found.st_ino, found.st_size, found.st_mtime_ns, found.st_ctime_ns,
                                found.st_mode))
            folders.append(tuple(entries))
    except OSError:
        return None
    return tuple(folders), tuple(errors)


def _settled(state: tuple, began: int) -> bool:
    """Whether each file of `state` (`_folder_state`) was last written and changed (mtime, ctime) more than `_RACY_NS`
    before `began` (`_now_ns`, taken before the state): a later change of it then gives it other times."""
    newest = max((entry[i] for entries in state[0] for entry in entries[1:] if len(entry) == 7 for i in (4, 5)),
                 default=None)
    return newest is None or newest < began - _RACY_NS


def _once_per_run(kind: str, root, recursive: bool, read: Callable[[], object]):
    """`read()`'s answer of the files of `root` (and, `recursive`, of the folders below it): once within
    `dicom_headers_read_once` while they are unchanged (`_folder_state`), a copy given each time (the callers' own to
    change); each call's own outside one. An error raised is not kept (read again next time), nor an answer of files
    changed too near its reading to tell a later change (`_settled`)."""
    cache = _header_cache
    if cache is None:
        return read()
    key = (kind, str(root), None if os.path.isabs(root) else os.getcwd(), recursive)  # the files' paths are joined to it
    began = _now_ns()  # before the files are looked at: the reading begins later still
    state = _folder_state(root, recursive)
    with _header_cache_lock:
        known = cache.pop(key, None)
        if known is not None:
            cache[key] = known  # the most recently asked for
    if state is not None and known is not None and known[0] == state:
        return copy.deepcopy(known[1])
    found = read()
    if state is None:
        return found
    files = sum(len(entries) for entries in state[0])  # its folders and their files
    kept = (state, copy.deepcopy(found), files) if files <= _HEADER_CACHE_FILES and _settled(state, began) else None
    with _header_cache_lock:  # the state before the reading: a file changed while it was read is read again next time
        cache.pop(key, None)
        if kept is not None:
            cache[key] = kept
            held = sum(entry[2] for entry in cache.values())
            while held > _HEADER_CACHE_FILES:
                held -= cache.pop(next(iter(cache)))[2]
    return found


def _read_series(root: Path, recursive: bool) -> tuple[dict, list[str]]:
    """`_scan_series`, once within `dicom_headers_read_once` while the folder is unchanged (`_once_per_run`)."""
    text_path(root)
    return _once_per_run("series", root, recursive, lambda: _scan_series(root, recursive))


def _scan_series(root: Path, recursive: bool) -> tuple[dict, list[str]]:
    """The one pass over DICOM files behind `dicom_series` and `dicom_catalogue`: every file's header read
    once (symbolic links followed, each folder once; hidden ones and known non-DICOM files skipped), grouped
    by Series Instance UID. Returns ({series UID: {"files": [(slice key, path, instance number, SOP Instance
    UID)], "header",
    "study", "date"}}, the folders that could not be read)."""
    import SimpleITK as sitk

    text_path(root)
    problems: list[str] = []
    series: dict = {}
    damaged: dict = {}  # folder -> names of its files that are empty, unreadable, or DICOM that cannot be read
    mislabelled: dict = {}  # folder -> (path, `_mislabelled_syntax`) of its files not encoded as their header says
    # and whose series cannot be told (`_mislabelled_header`): refused with each series of their folder
    own: dict = {}  # series UID -> [(path, `_mislabelled_syntax`, `_mislabelled_header`)] of such files whose it can
    reader = sitk.ImageFileReader()
    reader.LoadPrivateTagsOn()  # the vendors' private b-values (`vendor_b_value`), of every file
    previous = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        folders = _each_folder(root, lambda exc: None if os.path.basename(str(exc.filename)) in SYSTEM_FOLDERS else
                               problems.append(f"{exc.filename} cannot be read ({exc.strerror})"), recursive)
        for current, files in folders:
            for name in sorted(files):
                path = os.path.join(current, name)
                if not _looks_dicom(name) or not os.path.isfile(path):
                    continue
                mislabel = _mislabelled_syntax(path)
                if mislabel:  # not given to GDCM: refused where its series (else its folder's) is read
                    header = _mislabelled_header(path, mislabel)
                    if header:
                        own.setdefault(header["uid"], []).append((path, mislabel, header))
                    else:
                        mislabelled.setdefault(current, []).append((path, mislabel))
                    continue
                try:
                    with itk_names(path) as (itk_name,):
                        reader.SetFileName(itk_name)
                        reader.ReadImageInformation()
                    uid = reader.GetMetaData("0020|000e").strip(" \0") if reader.HasMetaDataKey("0020|000e") else ""
                except DeepWMLError as exc:  # a name ITK would abort the process on, or one it cannot be given
                    problems.append(f"{path!r} cannot be read ({str(exc).split(': ', 1)[-1]})")
                    continue
                except RuntimeError:  # not DICOM, or no image; or a damaged one (a transfer cut short)
                    if name.upper() != "DICOMDIR" and (os.path.getsize(path) == 0 or not os.access(path, os.R_OK)
                                                       or _dicom_preamble(path)):
                        damaged.setdefault(current, []).append(name)
                    continue
                if not uid:
                    continue
                entry = series.get(uid)
                if entry is None:
                    header = _file_series_header(reader, path)
                    study = header[5] or f"(no study UID) {current}"
                    date = reader.GetMetaData("0008|0020").strip(" \0") if reader.HasMetaDataKey("0008|0020") else ""
                    entry = series[uid] = {"files": [], "header": header, "study": study, "date": date,
                                           "b_value": header[9][2]}
                else:  # a diffusion series' first file is often a b = 0 image: its largest b-value kept
                    b_value = _reader_b_value(reader)
                    if b_value is not None and (entry["b_value"] is None or b_value > entry["b_value"]):
                        entry["b_value"] = b_value
                number = _header_number(reader, "0020|0013")
                instance = reader.GetMetaData("0008|0018").strip(" \0") if reader.HasMetaDataKey("0008|0018") else ""
                entry["files"].append((_slice_key(reader, path), path, None if number is None else int(number),
                                       instance, _image_position(reader)))
                entry.setdefault("pixel_ids", set()).add(reader.GetPixelID() if reader.GetNumberOfComponents() == 1
                                                         else None)
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(previous)
    for uid, files in own.items():  # a series of such files only: listed all the same (refused when it is read)
        entry = series.get(uid)
        if entry is None:
            first = files[0][2]
            b_values = [header["header"][9][2] for _, _, header in files if header["header"][9][2] is not None]
            entry = series[uid] = {"files": [header["file"] for _, _, header in files], "header": first["header"],
                                   "study": first["study"] or f"(no study UID) {os.path.dirname(files[0][0])}",
                                   "date": first["date"], "b_value": max(b_values) if b_values else None}
        entry["own_mislabelled"] = [(path, mislabel) for path, mislabel, _ in files]
    for entry in series.values():
        folders = sorted({os.path.dirname(f[1]) for f in entry["files"]})
        entry["damaged"] = tuple(os.path.join(f, n) for f in folders for n in damaged.get(f, []))
        entry["mislabelled"] = tuple(sorted(entry.get("own_mislabelled", []))) + tuple(
            found for f in folders for found in mislabelled.get(f, []))
    covered = {os.path.dirname(f[1]) for entry in series.values() for f in entry["files"]}
    for folder, found in mislabelled.items():  # a folder of such files only: a failing case, not left out unsaid
        if folder not in covered:
            problems.append(f"{folder} cannot be read: " + _mislabelled_reason([f for f, _ in found], [m for _, m in found]))
    return series, problems


def _series_of(uid: str, entry: dict) -> DicomSeries:
    ordered = sorted(entry["files"], key=lambda f: f[0])
    header = entry["header"]
    return DicomSeries(uid, header[0], tuple(f[1] for f in ordered), *header[1:6], modality=header[6],
                       secondary_capture=header[7], slice_thickness_mm=header[8], instance_numbers=tuple(f[2] for f in ordered),
                       instance_uids=tuple(f[3] for f in ordered), image_positions=tuple(f[4] for f in ordered),
                       damaged=entry.get("damaged", ()),
                       mislabelled=entry.get("mislabelled", ()),
                       slice_positions_mm=tuple(f[0][1] for f in ordered) if all(f[0][0] == 0 for f in ordered) else (),
                       study_date=entry.get("date", ""), pixel_ids=tuple(entry.get("pixel_ids", ())),
                       image_type=header[9][0], sequence_name=header[9][1], b_value=entry.get("b_value", header[9][2]),
                       frame_type=header[9][3], diffusion_directionality=header[9][4])


def dicom_catalogue(root: str | os.PathLike) -> tuple[list[DicomStudy], list[str]]:
    """Every DICOM image file under `root` (`_read_series`), grouped into series (Series Instance UID,
    wherever their files lie) and studies (Study Instance UID; files without one make a study of their
    folder's). Returns (the studies, in name order; the folders that could not be read). Each study is
    named by the folder its files share, as a path under `root` joined with "_" (`root`'s own name when
    it is `root`); studies that would share a name, upper and lower case alike, get their study date, then
    the end of their UID."""
    root = Path(os.path.abspath(root))
    series, problems = _read_series(root, recursive=True)
    studies: dict = {}
    for uid, entry in series.items():
        studies.setdefault(entry["study"], []).append((_series_of(uid, entry), entry["date"]))
    found = []
    for key, members in studies.items():
        # the study's folder is where its images lie: a secondary capture or a segmentation of it (DeepWML's outline
        # series or SEG, written into an OUTDIR inside the export) must not move it, or rename the case on the next run
        images = [s for s, _ in members if not s.derived] or [s for s, _ in members]
        folder = Path(os.path.commonpath([os.path.dirname(f) for s in images for f in s.files]))
        relative = folder.relative_to(root)
        name = case_name(root) if relative == Path(".") else "_".join(relative.parts)
        ordered = tuple(sorted((s for s, _ in members), key=_by_number))
        uid = None if key.startswith("(no study UID)") else key
        found.append(DicomStudy(name, folder, uid, ordered, members[0][1]))
    counts: dict = {}
    for study in found:  # names alike but for upper/lower case clash too: one file on macOS and Windows
        counts[study.name.casefold()] = counts.get(study.name.casefold(), 0) + 1
    named = []
    for study in found:  # names that clash: the study date, then the UID's end
        if counts[study.name.casefold()] > 1:
            same_day = sum(1 for other in found if other.name.casefold() == study.name.casefold()
                           and other.date == study.date)
            suffix = study.date or "nodate"
            if same_day > 1:
                suffix += "_" + (study.uid or "nouid").replace(".", "")[-8:]
            study = DicomStudy(f"{study.name}_{suffix}", study.folder, study.uid, study.series, study.date)
        named.append(study)
    return sorted(named, key=lambda s: s.name), problems


# Folders a file system or an operating system keeps, never anyone's scans: not searched (a USB stick's
# recycle bin, readable to its owner, holds the files deleted from it)
SYSTEM_FOLDERS = frozenset({"lost+found", "System Volume Information", "$RECYCLE.BIN", "$Recycle.Bin"})


def _each_folder(root: str | os.PathLike, onerror=None, recursive: bool = True):
    """(folder, its file names) for `root` and, `recursive`, every folder below it in name order: symbolic links
    followed, each folder once (a link back into the tree is not followed again), hidden and system folders left
    out. `onerror` as os.walk's, for a folder that cannot be listed."""
    visited = set()
    for current, dirs, files in os.walk(root, followlinks=True, onerror=onerror):
        real = os.path.realpath(current)
        if real in visited:
            dirs[:] = []
            continue
        visited.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in SYSTEM_FOLDERS) if recursive else []
        yield current, files


def has_dicom_below(folder: str | os.PathLike) -> bool:
    """Whether a folder's subfolders (at any depth, symbolic links followed, each folder once) hold files
    that may be DICOM."""
    unreadable = []

    def failed(exc: OSError) -> None:
        if os.path.basename(str(exc.filename)) not in SYSTEM_FOLDERS:
            unreadable.append(exc)

    for current, files in _each_folder(folder, failed):
        if unreadable and str(unreadable[0].filename) != str(folder):
            return True  # a folder below that cannot be read: searched as an export, which names it as a failing case
        if current != str(folder) and any(_dicom_candidate(os.path.join(current, f)) for f in files):
            return True
    return bool(unreadable) and str(unreadable[0].filename) != str(folder)


_DICOM_SUFFIXES = ("", ".dcm", ".dicom", ".ima")


def _dicom_preamble(path: str) -> bool:
    """Whether a file starts as a DICOM file does ('DICM' at byte 128)."""
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


_UNCOMPRESSED = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"}


def _transfer_syntax(path: str) -> str:
    """A DICOM file's Transfer Syntax UID (0002,0010), from its file meta group (explicit VR little endian
    after the preamble, by the standard); "" where it gives none or is no DICOM file ('DICM' at byte 128)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return ""
    if head[128:132] != b"DICM":
        return ""
    at = head.find(b"\x02\x00\x10\x00UI", 132)
    if at < 0 or at + 8 > len(head):
        return ""
    return head[at + 8:at + 8 + struct.unpack_from("<H", head, at + 6)[0]].rstrip(b"\0 ").decode("ascii", "replace")


# Transfer syntaxes whose data set GDCM cannot read if it is not encoded so: read big endian, an implicit VR little
# endian data set's lengths ran to hundreds of megabytes, which GDCM set aside and cleared (about a gigabyte and
# 3 s a file, each time it is read) before it found the data set's true encoding
_CHECKED_SYNTAXES = {"1.2.840.10008.1.2.2": "Explicit VR Big Endian",
                     "1.2.840.10008.1.2.1.99": "Deflated Explicit VR Little Endian"}


def _mislabelled_syntax(path: str) -> tuple[str, str] | None:
    """(the Transfer Syntax UID, the encoding its data set shows) of a DICOM file whose file meta header says
    Explicit VR Big Endian or Deflated while its data set is not so encoded (as GDCM would find only slowly); None
    for every other file. Reads the file's first kilobytes: the meta group (explicit VR little endian, after the
    preamble) and the data set's first element: in big endian its group's high byte first and a VR after the tag,
    deflated a raw deflate stream."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return None
    if head[128:132] != b"DICM":
        return None
    pos, syntax = 132, None
    while pos + 8 <= len(head) and head[pos:pos + 2] == b"\x02\x00":  # the file meta group (0002,xxxx)
        if head[pos + 4:pos + 6] in _LONG_VRS:
            if pos + 12 > len(head):
                return None
            length, start = struct.unpack_from("<I", head, pos + 8)[0], pos + 12
        else:
            length, start = struct.unpack_from("<H", head, pos + 6)[0], pos + 8
        if head[pos + 2:pos + 4] == b"\x10\x00":
            syntax = head[start:start + length].rstrip(b"\0 ").decode("ascii", "replace")
            if syntax not in _CHECKED_SYNTAXES:
                return None  # the common case: read no further
        pos = start + length
    first = head[pos:pos + 8]
    if syntax is None or len(first) < 8:
        return None  # a meta group longer than read (a file no scanner writes): as before, GDCM's
    explicit = first[4:6].isalpha() and first[4:6].isupper()
    found = f"{'explicit' if explicit else 'implicit'} VR little endian" if first[1] == 0 else "of no known encoding"
    if syntax == "1.2.840.10008.1.2.2":
        if explicit and first[0] == 0:  # a group (0008, ...) written high byte first, its VR after the tag
            return None
        return syntax, found
    try:
        zlib.decompressobj(-15).decompress(head[pos:], 64)
    except zlib.error:
        return syntax, found
    return None


def _mislabelled_reason(files: Sequence[str], syntaxes: Sequence[tuple[str, str]]) -> str:
    """Why a series whose folder holds files `_mislabelled_syntax` found (`syntaxes`: what it found of each) is
    refused, said after the folder's name."""
    names = sorted(os.path.basename(f) for f in files)
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    syntax, found = syntaxes[0]
    return (f"{len(names)} of its DICOM files ({shown}) are labelled {_CHECKED_SYNTAXES[syntax]} (Transfer "
            f"Syntax UID {syntax} in their file meta header), but their data set is {found}: a damaged or mislabelled "
            "export, which the DICOM library reads slowly if at all (seconds and a gigabyte of memory a file); export "
            "the series again from the scanner or PACS (or move those files out of the folder if they are not the "
            "series')")


def undecodable_dicom(folder: str | os.PathLike) -> str | None:
    """Why a folder (or the folders below it) in which no DICOM series could be read holds DICOM images all the
    same: compressed in a transfer syntax GDCM does not decode (JPEG XL, a video codec; some PACS export so);
    None where it holds no such file. Said instead of "a folder without a DICOM series", which sent the user
    looking for files that are there. (Files of an uncompressed syntax that fail are not images, as reports and
    DICOMDIRs, or damaged: not told apart here.)"""
    syntaxes: dict = {}
    for current, files in _each_folder(folder):
        for name in files:
            syntax = _transfer_syntax(os.path.join(current, name))
            if syntax and syntax not in _UNCOMPRESSED:
                syntaxes[syntax] = syntaxes.get(syntax, 0) + 1
    if not syntaxes:
        return None
    return (f"{folder} holds {sum(syntaxes.values())} DICOM file(s) compressed in a way GDCM (DeepWML's DICOM reader) "
            f"cannot decode (transfer syntax {', '.join(sorted(syntaxes))}): export the series again uncompressed "
            "(Explicit VR Little Endian) or with JPEG Lossless or JPEG 2000, or decompress its files with a tool "
            "that reads that syntax")


def _dicom_candidate(path: str) -> bool:
    """Whether a file below an input folder may be DICOM: a name DICOM exports use (no extension, .dcm,
    .ima, a number such as a UID's last part), or any other name with the DICOM file preamble ('DICM' at
    byte 128); a report.pdf or notes.docx beside the images is not."""
    name = os.path.basename(path)
    if not _looks_dicom(name):
        return False
    suffix = os.path.splitext(name)[1].lower()
    return suffix in _DICOM_SUFFIXES or suffix[1:].isdigit() or _dicom_preamble(path)


def _listing(first: list, rest: list) -> str:
    """The series named in an error, `first` ahead, cut to about _LISTING_CHARS."""
    parts, shown = [], 0
    labels = [series.label() for series in first + rest]
    for series, label in zip(first + rest, labels):
        if labels.count(label) > 1:  # two visits' series alike in number and name: their UIDs tell them apart
            label += f" UID {series.uid}"
        if parts and shown + len(label) > _LISTING_CHARS:
            break
        parts.append(label)
        shown += len(label) + 2
    more = len(first) + len(rest) - len(parts)
    return "; ".join(parts) + (f"; and {more} more" if more else "")


def series_named(series: Sequence[DicomSeries], choice: str) -> list[DicomSeries]:
    """The series among `series` that `choice` (--series TEXT) names, as choose_dicom_series takes them: its UID, else
    its series number, else its whole description, else a part of it (any case); of several, the images, not a picture
    of them that shares their description (an outline series, a SEG). Read from the headers only."""
    text = choice.strip().lower()
    matches = ([s for s in series if s.uid == choice.strip()]
               or [s for s in series if text.isdigit() and s.number == int(text)]
               or [s for s in series if s.description.lower() == text]
               or [s for s in series if text in s.description.lower()])
    if len(matches) > 1:
        matches = [s for s in matches if not s.derived] or matches
    return matches


class NoFlairSeries(DeepWMLError):
    """A study found in an export without a FLAIR-like series: skipped, not failed (other exams are expected)."""


class OutlineSeriesOnly(NoFlairSeries):
    """A study found in an export holding DeepWML's outline series alone (an earlier run's output, not a scan): no
    --series would find a FLAIR in it."""


def choose_dicom_series(folder: str | os.PathLike, choice: str | None = None,
                        option: str | None = "--series", candidates: Sequence[DicomSeries] | None = None,
                        strict: bool = False) -> tuple[DicomSeries, str]:
    """The series to read from a DICOM folder and how it was chosen. `choice` (given as `option` on the
    command line; None where a command has no such option) names it: its series UID, its series number,
    its description (case-insensitive; whole, else a part); without one, the only series, else the only
    one that looks like a FLAIR (an inversion time of 1.5-3 s, or without one a FLAIR description; never
    T1, STIR or DIR). A folder without DICOM files of its own (a study exported as one folder per series)
    offers the series of every folder below it (`dicom_catalogue`); `candidates` gives the series instead
    (a study of a catalogue). `strict`: a lone series is taken only if it looks like a FLAIR or nothing
    says what it is (a study found in an export; raises NoFlairSeries otherwise). Raises DeepWMLError, listing the series (candidates
    first), when that is not exactly one."""
    folder = Path(folder)
    series = list(candidates) if candidates is not None else dicom_series(folder)
    if not series and candidates is None:  # a study exported as one folder per series: those below
        studies, _ = dicom_catalogue(folder)
        series = sorted((s for study in studies for s in study.series), key=_by_number)
    if not series:
        # where one image is wanted (evaluate's masks, a FLAIR given as a folder), a case's folder was said to hold
        # no image files
        images = sorted(p.name for p in folder.iterdir() if is_image_file(p) and p.is_file())
        if images:
            shown = ", ".join(images[:3]) + (f" and {len(images) - 3} more" if len(images) > 3 else "")
            raise DeepWMLError(f"{folder} is a folder of image files ({shown}), not one image nor a DICOM series: "
                               "give the file itself")
        mislabelled = [(os.path.join(current, name), found) for current, names in _each_folder(folder)
                       for name in sorted(names) if _looks_dicom(name)
                       for found in [_mislabelled_syntax(os.path.join(current, name))] if found]
        if mislabelled:
            raise DeepWMLError(f"{os.path.dirname(mislabelled[0][0])}: " + _mislabelled_reason(
                [f for f, _ in mislabelled], [m for _, m in mislabelled]))
        # DICOM files none of which is an image GDCM reads (every file's header damaged): not "without" them
        dicom_files = sum(_dicom_preamble(os.path.join(current, name)) for current, names in _each_folder(folder)
                          for name in names)
        raise DeepWMLError(undecodable_dicom(folder) or (
            f"{folder} holds {dicom_files} DICOM file(s), but no image series the DICOM library can read (damaged "
            "headers, or no images: reports, a DICOMDIR); export the series again from the scanner or PACS"
            if dicom_files else f"{folder} is a folder without a DICOM series or image files"))
    how = (f"choose one with {option} TEXT (its series number, its description or a part of it, or its UID)"
           if option else "put the FLAIR series in a folder of its own (deepwml segment --series chooses one)")
    if choice:
        matches = series_named(series, choice)
        if len(matches) == 1:
            return matches[0], f"{option or 'series'} {choice}"
        found = "none" if not matches else f"{len(matches)}"
        error = NoFlairSeries if strict and not matches else DeepWMLError  # in an export: another exam, skipped
        raise error(f"{folder} holds {len(series)} DICOM series and {found} match {option or 'series'} "
                           f"{choice!r}: {_listing(matches, [s for s in series if s not in matches])}; {how}")
    if len(series) == 1 and series[0].modality == "SEG" and not choice:  # a segmentation of images, no image
        # (a study of an export holding only a SEG: no FLAIR exam, skipped as the export's other exams are)
        raise (NoFlairSeries if strict else DeepWMLError)(
            f"{folder} holds only a DICOM Segmentation (Modality SEG: {series[0].label()}), a segmentation of another "
            "series, not a scan; give the folder of the FLAIR series")
    if _deepwml_outlines_only(series):  # an earlier run's --dicom-outline given for the scan (its folder, or its
        # OUTDIR; in an export, a study of them alone, a copy without its report: skipped as the export's other exams
        # are): said so, not read as a FLAIR in colour ('3 values per voxel') nor one among none, which sent the
        # user to --series and so to that
        shown = "; ".join(s.label() for s in series[:3]) + ("; ..." if len(series) > 3 else "")
        raise (OutlineSeriesOnly if strict else DeepWMLError)(
            f"{folder} holds only DeepWML's outline series, {shown}: a FLAIR drawn in colour with its lesions outlined "
            "by an earlier DeepWML run (--dicom-outline), not a scan; give the folder of the FLAIR series it was drawn "
            "from")
    if len(series) == 1 and (not strict or series[0].unlabelled):
        return series[0], "the only series in the folder"
    flair = [s for s in series if s.looks_like_flair]
    if len(flair) == 1:  # one series in all (a study's folder a level up): nothing was chosen among others
        return flair[0], ("the only series in the folder" if len(series) == 1 else
                          f"the only one of {len(series)} series that looks like a FLAIR")
    found = "none looks" if not flair else f"{len(flair)} look"
    if strict and not flair:
        raise NoFlairSeries(f"{folder} holds {len(series)} DICOM series and none looks like a FLAIR by its inversion "
                            f"time or description: {_listing([], series)}; {how}")
    raise DeepWMLError(f"{folder} holds {len(series)} DICOM series and {found} like a FLAIR by its inversion time "
                       f"or description: {_listing(flair, [s for s in series if s not in flair])}; {how}")


def _deepwml_outlines_only(series: Sequence[DicomSeries]) -> bool:
    """Whether every series is an outline series DeepWML wrote (a Secondary Capture whose first image names DeepWML
    as its maker: dicom_outline.is_outline_image), deepwml segment's or change's, so no scan among them."""
    from .dicom_outline import is_outline_image

    return bool(series) and all(s.secondary_capture and s.files and is_outline_image(s.files[0]) for s in series)


def _series_read_error(path: Path, files: list, exc: Exception) -> str:
    """Why ITK could not read a series, said so that the user can act: images of different sizes (a
    localizer or a screenshot sharing the series UID) are named; else ITK's own words, condensed."""
    import SimpleITK as sitk

    sizes: dict = {}
    reader = sitk.ImageFileReader()
    for name in files:
        try:
            with itk_names(name) as (itk_name,):
                reader.SetFileName(itk_name)
                reader.ReadImageInformation()
            sizes.setdefault(tuple(reader.GetSize()[:2]), []).append(Path(name).name)
        except (RuntimeError, DeepWMLError):
            continue
    if len(sizes) > 1:
        common = max(sizes, key=lambda k: len(sizes[k]))
        odd = [f"{n} ({k[0]}x{k[1]})" for k, names in sizes.items() if k != common for n in names]
        return (f"{path}: the series' images differ in size ({len(sizes[common])} of {common[0]}x{common[1]}, and "
                f"{', '.join(odd[:3])}{', ...' if len(odd) > 3 else ''}): another image shares its series UID (a "
                "localizer or screenshot?); move it out of the folder")
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    said = next((line for line in lines if "ERROR" in line or "rror" in line), lines[-1] if lines else str(exc))
    return f"{path}: the DICOM series cannot be read ({said[:200]})"


def _read_dicom_folder(path: Path, choice: str | DicomSeries | None = None,
                       reading: Callable[[float], None] | None = None) -> sitk.Image:
    import SimpleITK as sitk

    series = choice if isinstance(choice, DicomSeries) else choose_dicom_series(path, choice, option=None)[0]
    if series.mislabelled:
        raise DeepWMLError(f"{os.path.dirname(series.mislabelled[0][0])}: " + _mislabelled_reason(
            [f for f, _ in series.mislabelled], [m for _, m in series.mislabelled]))
    _check_copies(path, series)
    misfit = _series_pixel_misfit(series.files)
    if misfit:
        raise DeepWMLError(f"{path}: the DICOM file {os.path.basename(misfit[0])} {misfit[1]} (a damaged header: the "
                           "image library would read its pixels in a wrong shape without an error); export the series "
                           "again from the scanner or PACS")
    fault = _frame_geometry_fault(series.files[0]) if len(series.files) == 1 else None
    if fault:
        raise DeepWMLError(f"{path}: the functional groups of the multi-frame DICOM file "
                           f"{os.path.basename(series.files[0])} give {fault}, so where its frames lie (or how large "
                           "their pixels are) is unknown: a damaged file; export the series again from the scanner or "
                           "PACS")
    reader = sitk.ImageSeriesReader()
    files = list(series.files)  # in slice order
    reader.MetaDataDictionaryArrayUpdateOn()
    if len(series.pixel_ids) > 1 and None not in series.pixel_ids:
        # Slices rescaled each their own way (Philips exports; exports that tag only some slices): ITK takes the
        # series' pixel type from the first slice and casts the others' real values into it, cutting off their
        # fractions and wrapping negative ones to 65535 and up when the first is unsigned, so slices disagree
        # in brightness and the mask is wrong (a real scan so exported: 0 ml, 0 lesions; read right 2.80 ml, 55):
        # each slice's real values, as float32
        reader.SetOutputPixelType(sitk.sitkFloat32)
    previous = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # ITK's "missing slices" warning: checked and said below
    try:
        with itk_names(*files) as names:
            reader.SetFileNames(names)
            with _telling(reader, reading):
                image = reader.Execute()
    except RuntimeError as exc:
        raise DeepWMLError(_series_read_error(path, files, exc)) from exc
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(previous)
    _check_layout(path, image.GetDimension(), image.GetSize(), image.GetNumberOfComponentsPerPixel())
    image = _squeeze_4d(image)  # a multi-frame file comes X, Y, frames, 1
    if image.GetDimension() == 3 and image.GetSize()[2] == 1:  # GDCM makes up its thickness: 1 mm
        which = f"series {series.number}" if series.number is not None else "the series"
        raise DeepWMLError(f"{path}: {which} ('{series.description or 'no description'}') is a single DICOM image, a 2D "
                           "image whose slice thickness GDCM does not read (every volume would be wrong); DeepWML "
                           "needs the 3D FLAIR volume: export the whole series, all its images")
    if len(files) > 1 and image.GetDimension() == 3 and image.GetSize()[2] == len(files):
        _check_one_patient(path, reader, len(files))
    _check_pixel_spacing(path, reader)
    if len(files) == 1 and image.GetDimension() == 3 and image.GetSize()[2] > 1:
        _check_frames(path, files[0], image)  # (and puts frames unevenly spaced on their mean spacing)
        geometry = frame_geometry(files[0])
        cosines = geometry[1][0] if geometry and geometry[1] and geometry[1][0] is not None else None
        misread = _orientation_misread(cosines, image) if cosines is not None and cosines.shape == (6,) else None
        if misread:
            raise DeepWMLError(f"{path}: the multi-frame DICOM file {Path(files[0]).name} gives its frames' Image "
                               f"Orientation (Patient) as {chr(92).join(f'{v:g}' for v in cosines)!r}, and the DICOM "
                               f"library read them as {misread} instead, so the orientation of its slices is unknown: "
                               "a damaged header; export the series again from the scanner or PACS")
    if len(files) > 1 and image.GetDimension() == 3 and image.GetSize()[2] == len(files):
        _check_orientation_given(path, reader, image, len(files))
        _check_one_orientation(path, reader, files)
    if len(files) > 2 and image.GetDimension() == 3 and image.GetSize()[2] == len(files):
        positions = [reader.GetMetaData(k, "0020|0032") if reader.HasMetaDataKey(k, "0020|0032") else ""
                     for k in range(len(files))]
        if not any(positions) and reader.HasMetaDataKey(0, "0008|0016") and \
                reader.GetMetaData(0, "0008|0016").strip(" \0") in _ENHANCED_MR:
            positions = _enhanced_positions(files)  # in their functional groups
        _check_slice_spacing(path, positions, image)
    return image


def _enhanced_positions(files: list) -> list[str]:
    """Each enhanced image's position (its first frame's), as GDCM reads it from the functional groups, as
    Image Position (Patient) text."""
    import SimpleITK as sitk

    reader, positions = sitk.ImageFileReader(), []
    for name in files:
        try:
            with itk_names(name) as (itk_name,):
                reader.SetFileName(itk_name)
                reader.ReadImageInformation()
            positions.append("\\".join(repr(v) for v in reader.GetOrigin()[:3]))
        except (RuntimeError, DeepWMLError):
            positions.append("")
    return positions


IDENTITY_TAGS = {"0020|000d": "Study Instance UID", "0010|0020": "Patient ID"}


_ENHANCED_MR = ("1.2.840.10008.5.1.4.1.1.4.1", "1.2.840.10008.5.1.4.1.1.4.3", "1.2.840.10008.5.1.4.1.1.4.4")


def _check_pixel_spacing(path, reader) -> None:
    """Refuse a series of single-frame images without Pixel Spacing (0028,0030), which MR images must carry
    (a screen capture or a broken export): GDCM reads the pixels as 1 x 1 mm, so the mask would be drawn at
    another scale and every volume in ml would be wrong, silently. Multi-frame and enhanced files (also of one
    frame each) keep it in their functional groups, out of this check's sight."""
    def has(tag: str) -> bool:
        return reader.HasMetaDataKey(0, tag) and bool(reader.GetMetaData(0, tag).strip(" \0"))

    def value(tag: str) -> str:
        return reader.GetMetaData(0, tag).strip(" \0") if reader.HasMetaDataKey(0, tag) else ""

    # enhanced and legacy-converted enhanced MR images keep it in their functional groups, one frame or many
    if value("0028|0008") not in ("", "1") or value("0008|0016") in _ENHANCED_MR:
        return
    if not has("0028|0030"):
        raise DeepWMLError(f"{path}: the DICOM images give no Pixel Spacing (0028,0030) (a screen capture or an "
                           "incomplete export?), so the pixel size and every volume in ml would be wrong; export "
                           "the original FLAIR series")
    sizes = _decimals(value("0028|0030")) or []
    if len(sizes) != 2 or min(sizes) <= 0:  # GDCM reads '0\\0' as 1 x 1 mm, as it reads none
        raise DeepWMLError(f"{path}: the DICOM images give a Pixel Spacing (0028,0030) of {value('0028|0030')[:40]!r}, "
                           "not two sizes above 0 (a damaged header), so the pixel size and every volume in ml would "
                           "be wrong; export the series again from the scanner or PACS")


def _check_one_patient(path, reader, files: int) -> None:
    """Refuse a series whose images belong to more than one study or patient (one Series Instance UID in
    files of two: a mixed-up export or anonymisation): it would be segmented as one scan, and its outline
    series would file the other patient's images under the first one's name. The values are not said."""
    for tag, name in IDENTITY_TAGS.items():
        values = {reader.GetMetaData(k, tag).strip(" \0") if reader.HasMetaDataKey(k, tag) else "" for k in range(files)}
        if len(values) > 1:
            raise DeepWMLError(f"{path}: the images of one series differ in {name} ({len(values)} values): they belong "
                               f"to more than one study or patient; sort the files out before segmenting them")


def _check_copies(path, series: DicomSeries) -> None:
    """Refuse a series holding one image twice (one SOP Instance UID in two files: an export copied into the
    folder twice, "IM1" beside "IM1 (1)"), naming the copies: it was refused as "two images at one position;
    the transfer may be incomplete: export the series again", which sends the user to the wrong fix. Files
    sharing a UID are copies only where they also share an instance number and a position: a series written by
    a script from one template header gives every slice the template's UID, and is read as before."""
    first: dict = {}
    pairs = []
    for name, uid, number in zip(series.files, series.instance_uids,
                                 series.instance_numbers or (None,) * len(series.files)):
        if uid and (uid, number) in first:
            pairs.append((first[uid, number], name))
        first.setdefault((uid, number), name)
    origins = _origins({name for pair in pairs for name in pair}) if pairs else {}
    copies = [(a, b) for a, b in pairs if origins.get(a) is not None and origins.get(b) is not None
              and np.abs(origins[a] - origins[b]).max() <= 1e-3]
    if copies:
        shown = ", ".join(" = ".join(sorted((Path(a).name, Path(b).name))) for a, b in copies[:3])
        raise DeepWMLError(f"{path}: the DICOM series holds {len(copies)} image(s) twice, the same SOP Instance UID in "
                           f"two files: {shown}{', ...' if len(copies) > 3 else ''}; remove the copies (or give a "
                           "folder holding one copy of the export)")


def _origins(files) -> dict:
    """{file: its position (GDCM's origin: Image Position (Patient), or an enhanced image's first frame's)},
    None for a file whose header cannot be read."""
    import SimpleITK as sitk

    reader, origins = sitk.ImageFileReader(), {}
    for name in files:
        try:
            with itk_names(name) as (itk_name,):
                reader.SetFileName(itk_name)
                reader.ReadImageInformation()
            origins[name] = np.array(reader.GetOrigin()[:3])
        except (RuntimeError, DeepWMLError):
            origins[name] = None
    return origins


ORIENTATION_TOLERANCE = 2e-3  # of a direction read off the unit vectors Image Orientation (Patient) gives (GDCM
# takes them within 1e-3 of unit length and of right angles; beyond, it reads the identity)


def _orientation_misread(cosines: np.ndarray, image) -> str | None:
    """The directions of rows and columns the DICOM library read (`image`'s), as text, where they are not the unit
    vectors of Image Orientation (Patient) `cosines` (six numbers), else None."""
    rows = cosines.reshape(2, 3)
    lengths = np.linalg.norm(rows, axis=1)
    read = np.array(image.GetDirection(), float).reshape(3, 3)[:, :2].T  # the directions of rows and columns
    if lengths.min() > 0 and np.abs(rows / lengths[:, None] - read).max() <= ORIENTATION_TOLERANCE:
        return None
    return ", ".join(f"({', '.join(f'{v:.3g}' for v in axis)})" for axis in read)


def _frame_geometry_fault(file: str) -> str | None:
    """What the functional groups of a multi-frame (enhanced) DICOM file (`frame_geometry`) give of its frames'
    place and pixel size that is no place or size, else None: a position or orientation of NaN or infinite
    values, an orientation that is no pair of unit vectors at right angles, or a Pixel Spacing not above 0. GDCM
    refused such a file in ITK's words ('Zero-valued spacing is not supported'), which named nothing in it."""
    geometry = frame_geometry(file)
    if geometry is None:
        return None
    positions, orientations, pixel = geometry

    def shown(values) -> str:
        return "\\".join(f"{v:g}" for v in values)

    for k, position in enumerate(positions):
        if not np.all(np.isfinite(position)):
            return f"frame {k + 1}'s Image Position (Patient) as {shown(position)!r}, not three numbers"
    for k, cosines in enumerate(orientations):
        if cosines is None:
            continue
        if cosines.shape != (6,) or not np.all(np.isfinite(cosines)):
            return f"frame {k + 1}'s Image Orientation (Patient) as {shown(cosines)!r}, not six numbers"
        rows = cosines.reshape(2, 3)
        lengths = np.linalg.norm(rows, axis=1)
        if lengths.min() == 0 or abs(rows[0] @ rows[1]) / lengths.prod() > ORIENTATION_TOLERANCE:
            return (f"frame {k + 1}'s Image Orientation (Patient) as {shown(cosines)!r}, no pair of unit vectors at "
                    "right angles")
    if pixel is not None and (pixel.shape != (2,) or not np.all(np.isfinite(pixel)) or pixel.min() <= 0):
        return f"a Pixel Spacing of {shown(pixel)!r}, not two sizes above 0"
    return None


def _check_orientation_given(path, reader, image, files: int) -> None:
    """Refuse a series of classic images whose Image Orientation (Patient) (0020,0037) is missing, not six numbers
    (NaN, a word) or no pair of unit vectors at right angles (a row of zeros, rows in one line), where the DICOM
    library read another orientation than it gives. GDCM reads such a series as axial (the identity) without a
    word: a scan turned 17 degrees in its plane was segmented 'ok' on unturned axes, its mask elsewhere in the
    patient; NaN was called 'images facing another way: a localizer'. Enhanced images keep it in their functional
    groups (`_check_frames`)."""
    def value(k: int, tag: str) -> str:
        return reader.GetMetaData(k, tag).strip(" \0") if reader.HasMetaDataKey(k, tag) else ""

    if value(0, "0028|0008") not in ("", "1") or value(0, "0008|0016") in _ENHANCED_MR:
        return
    texts = [value(k, "0020|0037") for k in range(files)]
    if not texts[0]:
        raise DeepWMLError(f"{path}: the DICOM images give no Image Orientation (Patient) (0020,0037), so the "
                           "orientation of their slices is unknown (the DICOM library would read them as axial, without "
                           "a word); export the series again from the scanner or PACS")
    for k, text in enumerate(texts):
        cosines = _decimals(text) if text else []
        if text and (cosines is None or len(cosines) != 6):
            raise DeepWMLError(f"{path}: the Image Orientation (Patient) (0020,0037) of image {k + 1} of the DICOM series "
                               f"is not six numbers ({text[:60]!r}), so the orientation of its slices is unknown: a "
                               "damaged file; export the series again from the scanner or PACS")
    shown = _orientation_misread(np.array(_decimals(texts[0]), float), image)
    if shown is None:
        return
    raise DeepWMLError(f"{path}: the DICOM images' Image Orientation (Patient) (0020,0037), {texts[0][:60]!r}, is no pair "
                       "of unit vectors at right angles (the directions of their rows and columns), and the DICOM "
                       f"library read them as {shown} instead, so the orientation of their slices is unknown: a "
                       "damaged header; export the series again from the scanner or PACS")


def _check_one_orientation(path, reader, files: list) -> None:
    """Refuse a series whose images do not all face one way (a localizer or a reformat sharing its Series
    Instance UID): stacked as slices of one plane it would be a wrong volume, which the slice spacing check
    called "slices missing". The images off the plane most of them share are named."""
    planes: list = []  # [cosines, names of the images in that plane]
    for k, name in enumerate(files):
        try:
            cosines = np.array([float(v) for v in reader.GetMetaData(k, "0020|0037").split("\\")])
        except (RuntimeError, ValueError):
            continue
        if cosines.shape != (6,):
            continue
        plane = next((p for p in planes if np.abs(p[0] - cosines).max() <= 1e-3), None)
        if plane is None:
            planes.append([cosines, []])
            plane = planes[-1]
        plane[1].append(Path(name).name)
    if len(planes) > 1:
        common = max(planes, key=lambda p: len(p[1]))
        odd = [n for p in planes if p is not common for n in p[1]]
        named = f"{', '.join(odd[:3])}{', ...' if len(odd) > 3 else ''} {'faces' if len(odd) == 1 else 'face'}"
        raise DeepWMLError(f"{path}: the images of the DICOM series do not all lie in one plane ({len(common[1])} do, "
                           f"and {named} another way): a localizer or a reformat shares the FLAIR's series UID; move "
                           "it out of the folder")


# DICOM's explicit value representations with a 4-byte length (PS3.5 7.1.2), and the sequences a multi-frame
# file's geometry lies in: read by `frame_geometry` without a DICOM library (ITK's metadata leaves sequences out)
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_SHARED_GROUPS, _PER_FRAME_GROUPS = 0x52009229, 0x52009230
_PIXEL_MEASURES, _PLANE_POSITION, _PLANE_ORIENTATION = 0x00289110, 0x00209113, 0x00209116
_MR_TIMING, _MR_ECHO, _MR_MODIFIER = 0x00189112, 0x00189114, 0x00189115  # the sequence's timing groups
_MR_DIFFUSION, _MR_FRAME_TYPE = 0x00189117, 0x00189226  # MR Diffusion, MR Image Frame Type
# a DICOM Segmentation's Segment Sequence and each frame's Segment Identification (`read_dicom_seg`)
_SEGMENT_SEQUENCE, _SEGMENT_IDENTIFICATION = 0x00620002, 0x0062000A
_DERIVATION_IMAGE, _SOURCE_IMAGE = 0x00089124, 0x00082112  # a frame's Derivation Image Sequence, its Source Image Sequence
_GROUP_SEQUENCES = {_SHARED_GROUPS, _PER_FRAME_GROUPS, _PIXEL_MEASURES, _PLANE_POSITION, _PLANE_ORIENTATION,
                    _MR_TIMING, _MR_ECHO, _MR_MODIFIER, _MR_DIFFUSION, _MR_FRAME_TYPE, _SEGMENT_SEQUENCE,
                    _SEGMENT_IDENTIFICATION, _DERIVATION_IMAGE, _SOURCE_IMAGE}
# transfer syntax; position, orientation, pixel spacing, slice thickness; repetition time, inversion times,
# effective echo time; Diffusion b-value, Diffusion Directionality, Frame Type; Spacing Between Slices, Segment
# Number, Segment Label, Referenced Segment Number, and each frame's source image (Referenced SOP Instance UID and
# Frame Number, Spatial Locations Preserved, in its Derivation Image Sequence's Source Image Sequence) (a DICOM SEG's)
_WANTED = ({0x00020010, 0x00200032, 0x00200037, 0x00280030, 0x00180050, 0x00180080, 0x00189079, 0x00189082,
            0x00189087, 0x00189075, 0x00089007, 0x00180088, 0x00620004, 0x00620005, 0x0062000B, 0x00081155,
            0x00081160, 0x0028135A} | _GROUP_SEQUENCES)


def _dataset(data, pos: int, end: int, explicit: bool, level: str = "item", wanted=_WANTED,
             order: str = "<") -> tuple[dict, int]:
    """The elements of a DICOM data set from `pos` to `end` (or to its item delimiter) that `frame_geometry`
    uses (or those of `wanted`, at this level): {tag: bytes, or a list of items (data sets) for a sequence}, and
    where it ended (with `level` "top", at Pixel Data: where that element starts). `level` "meta" stops after the
    file meta group, "top" at Pixel Data; `order` ">" reads a big endian data set (never its meta group). Raises
    ValueError where the bytes are not what they say."""
    found: dict = {}
    while pos + 8 <= end:
        group, element = struct.unpack_from(order + "HH", data, pos)
        tag = group << 16 | element
        if tag == 0xFFFEE00D:  # the end of an item of undefined length
            return found, pos + 8
        if (level == "top" and tag == 0x7FE00010) or (level == "meta" and group != 2):
            break
        vr = bytes(data[pos + 4:pos + 6]) if (explicit or group == 2) and group != 0xFFFE else None
        if vr in _LONG_VRS:
            length, start = struct.unpack_from(order + "I", data, pos + 8)[0], pos + 12
        elif vr is not None:
            length, start = struct.unpack_from(order + "H", data, pos + 6)[0], pos + 8
        else:
            length, start = struct.unpack_from(order + "I", data, pos + 4)[0], pos + 8
        unknown = vr == b"UN" and length == 0xFFFFFFFF  # a sequence its writer did not know: implicit VR items
        if vr == b"SQ" or unknown or (vr is None and (tag in _GROUP_SEQUENCES or length == 0xFFFFFFFF)):
            items, pos = _items(data, start, length, end, explicit and not unknown, order)  # PS3.5 6.2.2
            if tag in wanted:
                found[tag] = items
            continue
        if length == 0xFFFFFFFF and vr in (b"OB", b"OW"):  # encapsulated pixel data (an icon): its fragments
            pos = _past_fragments(data, start, end, order)
            continue
        if length == 0xFFFFFFFF:
            raise ValueError("a value of undefined length")
        if tag in wanted:
            found[tag] = bytes(data[start:start + length])
        pos = start + length
    return found, pos


def _items(data, start: int, length: int, end: int, explicit: bool, order: str = "<") -> tuple[list, int]:
    """A sequence's items (data sets) and where the sequence ends."""
    stop = end if length == 0xFFFFFFFF else start + length
    items, pos = [], start
    while pos + 8 <= stop:
        group, element, size = struct.unpack_from(order + "HHI", data, pos)
        if (group, element) == (0xFFFE, 0xE0DD):  # the end of a sequence of undefined length
            return items, pos + 8
        if (group, element) != (0xFFFE, 0xE000):
            raise ValueError("not an item")
        item, pos = _dataset(data, pos + 8, stop if size == 0xFFFFFFFF else pos + 8 + size, explicit, order=order)
        items.append(item)
    return items, stop


def _past_fragments(data, pos: int, end: int, order: str = "<") -> int:
    """Where encapsulated pixel data (items of raw bytes up to a sequence delimiter) starting at `pos` ends."""
    while pos + 8 <= end:
        group, element, size = struct.unpack_from(order + "HHI", data, pos)
        if (group, element) == (0xFFFE, 0xE0DD):
            return pos + 8
        if (group, element) != (0xFFFE, 0xE000) or size == 0xFFFFFFFF:
            raise ValueError("not a fragment")
        pos += 8 + size
    raise ValueError("encapsulated pixel data without its end")


# Samples per Pixel, Number of Frames, Rows, Columns, Bits Allocated: what the Pixel Data's length follows from
_PIXEL_LAYOUT = (0x00280002, 0x00280008, 0x00280010, 0x00280011, 0x00280100)


def _top_level(data, pos: int, explicit: bool, wanted, order: str = "<") -> tuple[dict, int] | None:
    """`_dataset(data, pos, len(data), explicit, "top", wanted, order)` the quick way, for the common file: (the
    `wanted` elements, where Pixel Data starts); None where it does not reach Pixel Data within `data`, or meets a
    value of undefined length other than a sequence's."""
    found, end = {}, len(data)
    short, long = order + "H", order + "I"
    while pos + 12 <= end:
        group, element = struct.unpack_from(order + "HH", data, pos)
        if group == 0x7FE0 and element == 0x0010:
            return found, pos
        vr = data[pos + 4:pos + 6] if explicit else None
        if not explicit:
            length, start = struct.unpack_from(long, data, pos + 4)[0], pos + 8
        elif vr in _LONG_VRS:
            length, start = struct.unpack_from(long, data, pos + 8)[0], pos + 12
        else:
            length, start = struct.unpack_from(short, data, pos + 6)[0], pos + 8
        if length == 0xFFFFFFFF:
            if vr not in (None, b"SQ", b"UN"):
                return None
            _, pos = _items(data, start, length, end, vr == b"SQ", order)  # its items followed to the sequence's end
            continue
        if group << 16 | element in wanted:
            found[group << 16 | element] = data[start:start + length]
        pos = start + length
    return None


def _quietly(parse, *args):
    """parse(*args), None where the bytes run out or are not what they say."""
    try:
        return parse(*args)
    except (ValueError, struct.error):
        return None


_DEFLATED_SYNTAX = "1.2.840.10008.1.2.1.99"
# the uncompressed transfer syntaxes whose Pixel Data `_pixel_layout` follows: (byte order, explicit VR)
_NATIVE_SYNTAXES = {"1.2.840.10008.1.2": ("<", False), "1.2.840.10008.1.2.1": ("<", True),
                    "1.2.840.10008.1.2.2": (">", True), _DEFLATED_SYNTAX: ("<", True)}


@dataclass(frozen=True)
class _PixelLayout:
    """What an uncompressed DICOM file's header says of its Pixel Data, and where its value lies (`_pixel_layout`)."""

    path: str
    rows: int
    columns: int
    samples: int  # Samples per Pixel
    stored: int  # samples stored a pixel: 2 for 4:2:2 colour (PS3.3 C.7.6.3.1.2), else `samples`
    frames: int
    bits: int  # Bits Allocated
    signed: bool  # Pixel Representation 1
    length: int  # the Pixel Data element's length
    order: str  # "<" little endian, ">" big endian
    start: int  # where the data set starts in the file (after the file meta group)
    value: int  # where the Pixel Data's value starts: in the file, or (deflated) in the inflated data set
    deflated: bool

    @property
    def expected(self) -> int:
        """The bytes the header's Rows, Columns, samples, Bits Allocated and Number of Frames need."""
        return -(-self.rows * self.columns * self.stored * self.frames * self.bits // 8)

    def said(self) -> str:
        shape = f"{self.rows} rows x {self.columns} columns" + (f" x {self.frames} frames" if self.frames != 1 else "") + (
            f" x {self.samples} samples" if self.samples != 1 else "")
        return (f"gives {shape} of {self.bits} bits ({self.expected} bytes), but its Pixel Data holds {self.length} "
                "bytes")

    def read(self, begin: int, count: int) -> bytes:
        """`count` bytes of the Pixel Data's value from `begin` (fewer where the file ends first)."""
        with open(self.path, "rb") as f:
            if not self.deflated:
                f.seek(self.value + begin)
                return f.read(count)
            f.seek(self.start)
            data = zlib.decompress(f.read(), -15)  # (the inflated data set, once: only for files padded past a row)
        return data[self.value + begin:self.value + begin + count]


def _pixel_layout(path: str) -> _PixelLayout | None:
    """Of an uncompressed DICOM file (implicit or explicit VR little endian, explicit VR big endian, deflated):
    what its header says of its Pixel Data (`_PixelLayout`); None for every other file (compressed, without the file
    meta header or Pixel Data, or one this small parser cannot follow). The header's first 16 kB are read, then
    its first megabyte, the whole file only where its elements reach further; of a deflated file its data set's
    first 4 kB inflated, then more only where the header reaches further."""
    import mmap

    wanted = frozenset(_PIXEL_LAYOUT + (0x00280004, 0x00280103))  # and Photometric Interpretation, Pixel Representation
    try:
        with open(path, "rb") as f:
            head = f.read(16384)
            if head[128:132] != b"DICM":
                return None
            if head[132:140] == b"\x02\x00\x00\x00UL\x04\x00":  # the meta group's length, as the standard has it
                start = 144 + struct.unpack_from("<I", head, 140)[0]
                at = head.find(b"\x02\x00\x10\x00UI", 144, start)
                syntax = "" if at < 0 else head[at + 8:at + 8 + struct.unpack_from("<H", head, at + 6)[0]].decode(
                    "ascii", "replace").strip(" \0")
            else:
                meta, start = _dataset(head, 132, len(head), True, "meta")
                syntax = meta.get(0x00020010, b"").decode("ascii", "replace").strip(" \0")
            if syntax not in _NATIVE_SYNTAXES:
                return None
            order, explicit = _NATIVE_SYNTAXES[syntax]
            deflated = syntax == _DEFLATED_SYNTAX
            if deflated:  # the data set one raw deflate stream (PS3.5 A.5): inflated as far as Pixel Data's header
                f.seek(start)
                inflater = zlib.decompressobj(-15)
                head, found = b"", None
                for size in (4096, 65536, 1 << 20):  # (a header packs to a few kB)
                    head += inflater.decompress(inflater.unconsumed_tail + f.read(size), size - len(head))
                    found = _quietly(_top_level, head, 0, explicit, wanted, order)
                    if found is not None:
                        break
                if found is None:
                    head += inflater.decompress(inflater.unconsumed_tail + f.read()) + inflater.flush()
                    found = _dataset(head, 0, len(head), explicit, "top", wanted, order)
                (top, at), data = found, head
            else:
                found = _quietly(_top_level, head, start, explicit, wanted, order)
                if found is None and len(head) == 16384:  # a long header (a scanner's private ones)
                    head += f.read(1 << 20)
                    found = _quietly(_top_level, head, start, explicit, wanted, order)
                if found is None:
                    with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                        top, at = _dataset(mapped, start, len(mapped), explicit, "top", wanted, order)
                        data = bytes(mapped[:at + 12])
                else:
                    (top, at), data = found, head
            if at + 8 > len(data) or struct.unpack_from(order + "HH", data, at) != (0x7FE0, 0x0010):
                return None
            if explicit and bytes(data[at + 4:at + 6]) in _LONG_VRS:
                if at + 12 > len(data):
                    return None
                length, value = struct.unpack_from(order + "I", data, at + 8)[0], at + 12
            elif explicit:
                length, value = struct.unpack_from(order + "H", data, at + 6)[0], at + 8
            else:
                length, value = struct.unpack_from(order + "I", data, at + 4)[0], at + 8
    except (OSError, ValueError, struct.error, zlib.error):
        return None

    def number(tag: int, default: int | None) -> int | None:
        value = top.get(tag)
        if value is None:
            return default
        try:
            return (int(value.decode("ascii").strip(" \0")) if tag == 0x00280008
                    else struct.unpack(order + "H", value)[0] if len(value) == 2 else None)
        except (UnicodeDecodeError, ValueError):
            return None

    samples, frames, rows, columns, bits, signed = (number(tag, default) for tag, default in
                                                    zip(_PIXEL_LAYOUT + (0x00280103,), (1, 1, None, None, None, 0)))
    if length == 0xFFFFFFFF or None in (samples, frames, rows, columns, bits, signed):
        return None
    photometric = bytes(top.get(0x00280004, b"")).decode("ascii", "replace").strip(" \0").upper()
    # 4:2:2 colour keeps one Cb and one Cr for each two pixels (PS3.3 C.7.6.3.1.2): 2 samples a pixel stored, not 3
    stored = 2 if samples == 3 and photometric in ("YBR_FULL_422", "YBR_PARTIAL_422") else samples
    return _PixelLayout(path, rows, columns, samples, stored, frames, bits, signed == 1, length, order,
                        start, value, deflated)


def _roughness(values: np.ndarray, rows: int, columns: int) -> float:
    """How much an image read as `rows` x `columns` of `values` changes from row to row (mean absolute step down
    its columns): small for an image read in its shape, large for one read sheared (rows of another length)."""
    image = values[:rows * columns].reshape(rows, columns).astype(np.float64)
    return float(np.abs(np.diff(image, axis=0)).mean()) if rows > 1 else 0.0


def _pixel_verdict(layout: _PixelLayout) -> tuple[str | None, int, tuple | None]:
    """Whether a file's header accounts for its Pixel Data's length: (what is wrong, said, or None; the bytes past
    the image taken for padding beyond what any damaged dimension could leave (0 where none); where those bytes
    would also fit an image of more columns: (how the pixels read in the header's shape, `_roughness`, and in that
    one, its columns)).

    Excess padding after the pixels is allowed (PS3.5 8.1.1: older applications sent it); a header whose Rows,
    Columns, Number of Frames, Samples per Pixel or Bits Allocated is too small (a damaged file) leaves bytes past
    the image too, and GDCM reads the header's shape from the start of the Pixel Data without a word, so what
    follows tells them apart:
    - fewer bytes than a row of each frame, a column (all rows' pixels) of each frame, or a frame: none of those
      values too small leaves so few; padding, whatever it holds (as before: fewer than a row).
    - more: padding only in a single-frame greyscale image of 8, 16 or 32 bits, less than a frame past it (a
      too-small Frames, Samples or Bits Allocated leaves a frame and more), and one value repeated (a sample's bytes
      alike), as padding is. A too-small Rows gives bytes past the image too, its rows below it: only where those
      are one value (a blank margin) is it taken for padding, and then the rows read are the image's own, in their
      place (the blank ones left out), a correct reading all the same. A too-small Columns reads every row sheared:
      where the bytes past the image are a whole number of columns, the pixels are also read as an image of so
      many more columns, and the header's shape must read as the smoother one (`_series_pixel_misfit`, over the
      series)."""
    excess = layout.length - layout.expected
    if excess < 0:
        return layout.said(), 0, None
    row = layout.columns * layout.stored * layout.bits // 8
    column = layout.rows * layout.stored * layout.bits // 8
    frame = layout.rows * layout.columns * layout.stored * layout.bits // 8
    if excess < max(2, min(layout.frames * row, layout.frames * column, frame)):
        return None, 0, None
    if layout.frames != 1 or layout.samples != 1 or layout.bits not in (8, 16, 32) or excess >= frame:
        return layout.said(), 0, None
    size = layout.bits // 8
    tail = layout.read(layout.expected, excess)
    if len(tail) < excess or tail != (tail[:size] * (excess // size + 1))[:excess]:
        return layout.said() + f", and the {excess} bytes past the image are not padding (one value repeated)", 0, None
    for extra in (0, 1) if size == 1 else (0,):  # (an 8-bit image of an odd length is padded by one byte)
        more, left = divmod(excess - extra, column)
        if more and not left:
            dtype = np.dtype(f"{'i' if layout.signed else 'u'}{size}").newbyteorder(layout.order)
            values = np.frombuffer(layout.read(0, layout.expected + excess - extra), dtype)
            return None, excess, (_roughness(values, layout.rows, layout.columns),
                                  _roughness(values, layout.rows, layout.columns + more), layout.columns + more)
    return None, excess, None


def _series_pixel_misfit(files: Sequence[str]) -> tuple[str, str] | None:
    """(a file, what is wrong, said) of a series whose images' headers do not account for their Pixel Data
    (`_pixel_verdict`); None where every file's do, or cannot be followed (compressed, ...: as before the check,
    GDCM's). A file taken as padded past a row must give the size of the series' other images (a damaged Rows in
    one file would be read as another image sharing the series UID), and where the padding would also fit more
    columns, the series' images must read as images (`_roughness`, summed over those files) in the header's
    shape. 0.07 ms a file (200 slices 13 ms); the bytes past the image are read only where they are more than a
    row or column of pixels."""
    layouts, ambiguous = [], []
    for name in files:
        layout = _pixel_layout(name)
        if layout is None:
            continue
        misfit, padding, rough = _pixel_verdict(layout)
        if misfit:
            return name, misfit
        layouts.append((name, layout, padding))
        if rough:
            ambiguous.append((name, layout, rough))
    padded = [(name, layout) for name, layout, padding in layouts if padding]
    if not padded:
        return None
    sizes: dict = {}
    for _, layout, _ in layouts:
        sizes[layout.rows, layout.columns] = sizes.get((layout.rows, layout.columns), 0) + 1
    common = max(sizes, key=sizes.get)
    for name, layout in padded:
        if (layout.rows, layout.columns) != common:
            return name, (layout.said() + f", and the series' other images are {common[0]} rows x {common[1]} "
                          "columns")
    if ambiguous and not (sum(r[0] for _, _, r in ambiguous) < sum(r[1] for _, _, r in ambiguous)
                          or not any(r[0] or r[1] for _, _, r in ambiguous)):
        name, layout, rough = ambiguous[0]
        return name, (layout.said() + f", which {layout.rows} rows x {rough[2]} columns would hold, the shape in "
                      "which the series' pixels read as an image (a Columns too small)")
    return None


def _pixel_data_misfit(path: str) -> str | None:
    """Of an uncompressed DICOM file whose header's Rows, Columns, Samples per Pixel, Bits Allocated and Number of
    Frames do not account for its Pixel Data's length (short of it, or more beyond it than padding, `_pixel_verdict`):
    what they give and what it holds, said; None for every other file (compressed, without the file meta header or
    Pixel Data, or one this small parser cannot follow: as before the check, GDCM's). GDCM reads such a file's
    pixels into the header's shape without an error: half a slice as a whole one. The file alone; a series' files
    are judged together by `_series_pixel_misfit`."""
    found = _series_pixel_misfit([path])
    return found[1] if found else None


def _numbers(value) -> np.ndarray | None:
    try:
        return np.array([float(v) for v in value.decode("ascii").strip(" \0").split("\\")])
    except (AttributeError, UnicodeDecodeError, ValueError):
        return None


def _functional_groups(path: str) -> tuple[dict, list] | None:
    """The Shared Functional Groups (its item) and the Per-frame Functional Groups (one item a frame) of an
    enhanced DICOM file, as `_dataset` reads them; None where the file cannot be parsed (big endian, deflated)."""
    import mmap

    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            if data[128:132] != b"DICM":
                return None
            meta, start = _dataset(data, 132, len(data), True, "meta")  # always explicit VR little endian
            syntax = meta.get(0x00020010, b"").decode("ascii", "replace").strip(" \0")
            if syntax in ("1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"):  # big endian, deflated
                return None
            top, _ = _dataset(data, start, len(data), syntax != "1.2.840.10008.1.2", "top")
    except (OSError, ValueError, struct.error):
        return None
    return (top.get(_SHARED_GROUPS) or [{}])[0], top.get(_PER_FRAME_GROUPS) or []


def _group_value(groups: dict, sequence: int, tag: int, binary: bool = False) -> np.ndarray | None:
    """A value of a functional group (its first item): text numbers (DS), or with `binary` doubles (FD)."""
    items = groups.get(sequence) if isinstance(groups, dict) else None
    value = items[0].get(tag) if items and isinstance(items[0], dict) else None
    if binary:
        return np.frombuffer(value, "<f8") if isinstance(value, bytes) and value and len(value) % 8 == 0 else None
    return _numbers(value)


def _enhanced_header(path: str) -> tuple:
    """(inversion, repetition, echo time in ms, slice thickness in mm, each None where not given; the largest
    Diffusion b-value (s/mm^2) or None, the Frame Type values and the Diffusion Directionality values, each once) of
    an enhanced MR file, which keeps them in its functional groups (the times and thickness: shared, else the first
    frame's, the thickness in Pixel Measures; what says diffusion: of the shared groups and every frame's, whose
    b-values differ, b = 0 frames first), not at the top level where classic images have them and the series
    listing reads them."""
    found = _functional_groups(path)
    if found is None:
        return None, None, None, None, None, (), ()
    shared, frames = found
    values = []
    for sequence, tag, binary in ((_MR_MODIFIER, 0x00189079, True), (_MR_TIMING, 0x00180080, False),
                                  (_MR_ECHO, 0x00189082, True), (_PIXEL_MEASURES, 0x00180050, False)):
        value = _group_value(shared, sequence, tag, binary)
        if value is None and frames:
            value = _group_value(frames[0], sequence, tag, binary)
        values.append(float(value[0]) if value is not None and value.size and np.isfinite(value[0]) else None)
    b_values, frame_type, directionality = [], {}, {}
    for groups in (shared, *frames):
        b_value = _group_value(groups, _MR_DIFFUSION, 0x00189087, binary=True)
        if b_value is not None and b_value.size and np.isfinite(b_value[0]):
            b_values.append(float(b_value[0]))
        for sequence, tag, into in ((_MR_FRAME_TYPE, 0x00089007, frame_type), (_MR_DIFFUSION, 0x00189075, directionality)):
            items = groups.get(sequence) if isinstance(groups, dict) else None
            value = items[0].get(tag) if items and isinstance(items[0], dict) else None
            if isinstance(value, bytes):
                into.update(dict.fromkeys(v.strip(" \0").upper() for v in value.decode("latin_1").split("\\")))
    return (*values, max(b_values) if b_values else None, tuple(v for v in frame_type if v),
            tuple(v for v in directionality if v))


def frame_geometry(path: str) -> tuple[list, list, np.ndarray | None] | None:
    """Of a multi-frame (enhanced) DICOM file: each frame's Image Position (Patient) and Image Orientation
    (Patient) from its functional groups (per-frame, else shared), and the Pixel Spacing (row, column) they
    give; None where the file gives no per-frame positions (a legacy multi-frame file) or cannot be parsed
    (big endian, deflated)."""
    found = _functional_groups(path)
    return None if found is None else _groups_geometry(*found)


def _groups_geometry(shared: dict, frames: list,
                     shared_position: bool = False) -> tuple[list, list, np.ndarray | None] | None:
    """`frame_geometry` of functional groups already read (`_functional_groups`). `shared_position`: where no frame
    gives its own Plane Position, the Shared Functional Groups' is every frame's (a SEG may share it when all its
    frames lie on one plane: one frame, or several segments' frames of one slice; PS3.3 C.7.6.16)."""
    first = _group_value
    positions = [first(frame, _PLANE_POSITION, 0x00200032) for frame in frames]
    if shared_position and all(p is None for p in positions):
        positions = [first(shared, _PLANE_POSITION, 0x00200032)] * len(frames)
    if not frames or any(p is None or p.shape != (3,) for p in positions):
        return None
    orientations = [first(frame, _PLANE_ORIENTATION, 0x00200037) for frame in frames]
    common = first(shared, _PLANE_ORIENTATION, 0x00200037)
    orientations = [o if o is not None else common for o in orientations]
    spacing = first(shared, _PIXEL_MEASURES, 0x00280030)
    if spacing is None:
        spacing = first(frames[0], _PIXEL_MEASURES, 0x00280030)
    return positions, orientations, spacing


# how far off its place a slice may lie, beyond half a pixel, as a fraction of the stack's length: Image
# Orientation (Patient) given to 3 decimals puts the normal up to about 0.001 rad off (a tilt of 0.1 degree
# misplaces no slice by a voxel and changes no volume by 0.01 %)
_SHEAR_TOLERANCE = 2e-3


def _check_frames(path, file: str, image) -> None:
    """Refuse a multi-frame (enhanced) DICOM file whose frames do not lie where the volume read from it puts
    them. GDCM stacks the frames in the order the file stores them, from the first frame's position; frames
    stored in acquisition order (interleaved), a frame missing or repeated, or frames in more than one plane
    gave a scrambled volume, or one of 1 x 1 x 1 mm voxels, without a word. Each frame's position and
    orientation (its functional groups, `frame_geometry`) is checked against the grid. Frames unevenly spaced
    (steps within a fifth of each other; positions written rounded to 0.01 mm are enough), which GDCM reads on
    1 x 1 x 1 mm voxels, are put on the grid of their mean step, as ITK puts a series of one file per slice
    (`image`'s spacing is set), and refused as that series is when a frame would lie over half a slice from
    where it was imaged (DicomSeries.slice_spacing_warning warns of less)."""
    geometry = frame_geometry(file)
    if geometry is None:
        return
    positions, orientations, pixel = geometry
    name = Path(file).name
    if len(positions) != image.GetSize()[2]:
        # the functional groups read here disagree with the frames GDCM read: a file this small parser reads
        # wrongly (an item without its end marker merges two frames' groups) cannot be told from a damaged one,
        # so the file is read as GDCM reads it, unchecked, as before the check existed
        return
    cosines = [o for o in orientations if o is not None and o.shape == (6,)]
    if cosines and any(np.abs(o - cosines[0]).max() > 1e-3 for o in cosines):
        raise DeepWMLError(f"{path}: the frames of the multi-frame DICOM file {name} lie in more than one plane (a "
                           "localizer, or several stacks in one file); export the FLAIR stack alone")
    points = np.array(positions)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    normal = np.cross(cosines[0][:3], cosines[0][3:]) if cosines else direction[:, 2]
    along = points @ normal
    steps = np.diff(np.sort(along))
    typical = float(np.median(steps))
    spacing = image.GetSpacing()
    odd = _odd_steps(steps, typical)  # as _check_slice_spacing
    if typical <= 0:
        why = "several frames at each position: echoes, volumes or repeats"
    elif odd.any():
        k = int(np.flatnonzero(odd)[0])
        what = ("a frame repeated" if steps[k] < 0.2 * typical else "frames missing" if steps[k] > 1.5 * typical
                else "its frames unevenly spaced")
        why = f"{what}: {steps[k]:.2f} mm between two of them, {typical:.2f} mm elsewhere"
    elif (np.diff(along) < 0).any() and (np.diff(along) > 0).any():
        why = "its frames are not stored in slice order"
    elif _beyond_mean_grid(_off_mean_grid(along), (along[-1] - along[0]) / (len(along) - 1)):
        mean, off = abs(along[-1] - along[0]) / (len(along) - 1), _off_mean_grid(along)
        k = int(np.argmax(off))
        raise DeepWMLError(f"{path}: the frames of the multi-frame DICOM file {name} are unevenly spaced "
                           f"({np.abs(np.diff(along)).min():.2f} to {np.abs(np.diff(along)).max():.2f} mm apart): on a "
                           f"regular grid of their mean spacing, {mean:.2f} mm, frame {k + 1} would lie {off[k]:.1f} mm "
                           "(over half a slice) from where it was imaged; convert the file with a tool that resamples "
                           "unevenly spaced slices (dcm2niix, 3D Slicer's DICOM module) and segment the file it writes")
    elif (pixel is not None and pixel.shape == (2,)
          and np.abs(pixel[::-1] - np.array(spacing[:2])).max() > 1e-3 * pixel.max()
          and spacing != (1.0, 1.0, 1.0)):  # GDCM's own 1 x 1 x 1 mm, where its frames are unevenly spaced: set below
        why = f"its pixels are {pixel[1]:g} x {pixel[0]:g} mm and were read as {spacing[0]:g} x {spacing[1]:g} mm"
    else:
        if pixel is not None and pixel.shape == (2,) and spacing == (1.0, 1.0, 1.0):
            # GDCM read the frames in order from the first one's position but, their steps unequal, on its
            # 1 x 1 x 1 mm along the slice normal: their pixels, and their mean step (the stack's extent) the
            # way they are stored, as ITK reads such a series
            image.SetSpacing((float(pixel[1]), float(pixel[0]), abs(along[-1] - along[0]) / (len(along) - 1)))
            # the slice axis pointing from the first frame stored to the last: where GDCM read the frames evenly
            # spaced (1 x 1 x 1 mm is then their own spacing: a 1 mm isotropic 3D FLAIR) it points so already,
            # stored from the top down or not; where it took the normal's way, it is turned
            if (points[-1] - points[0]) @ direction[:, 2] < 0:  # stored from the top down
                image.SetDirection((direction * [1, 1, -1]).ravel().tolist())
            spacing = image.GetSpacing()
        grid = np.array([image.TransformIndexToPhysicalPoint((0, 0, k)) for k in range(len(positions))])
        axis = np.array(image.GetDirection()).reshape(3, 3)[:, 2]
        # each frame off its place on the grid, less how far it lies off the grid of the frames' mean step along
        # the axis (up to half a slice where they are unevenly spaced: warned of): across the axis, or a grid
        # not spaced by the frames' own step, misplaced
        along_axis = points @ axis
        uneven = along_axis - along_axis[0] - (along_axis[-1] - along_axis[0]) / (len(along) - 1) * np.arange(len(along))
        miss = np.linalg.norm(points - grid - np.outer(uneven, axis), axis=1)
        if miss.max() <= 0.5 * min(spacing[:2]) + _SHEAR_TOLERANCE * float(np.ptp(along)):
            return
        k = int(np.argmax(miss))
        why = f"frame {k + 1} lies {miss[k]:.1f} mm from where the volume read from it puts it"
    raise DeepWMLError(f"{path}: the multi-frame DICOM file {name} would be read onto a wrong grid ({why}); convert "
                       "it with a tool that sorts the frames by position (dcm2niix, 3D Slicer's DICOM module) and "
                       "segment the file it writes, or export the series as one file per slice")


def _off_mean_grid(along: np.ndarray) -> np.ndarray:
    """How far each slice lies (mm, along the slice normal) from its place on the regular grid of the stack's
    mean step, from the first slice."""
    return np.abs(along - along[0] - (along[-1] - along[0]) / (len(along) - 1) * np.arange(len(along)))


# An unevenly spaced series (or multi-frame file) is read, as ITK reads it, on the regular grid of its slices' mean
# step from the first slice, slice k on the grid's slice k: read so (warned of) where each step between neighbouring
# slices is within a fifth of the typical step (and more than positions written rounded to 0.1 mm make of a thin
# slice's) and each slice lies within half a slice of its place on the grid; refused otherwise (`_check_slice_spacing`,
# `_check_frames`). A DICOM SEG's frames on such a series' slices are placed by the same rule (`_uneven_frames_fault`).
UNEVEN_STEP_FRACTION = 0.2
UNEVEN_MAX_OFF = 0.5  # of a slice


def _odd_steps(steps: np.ndarray, typical: float) -> np.ndarray:
    """Which of the steps between neighbouring slices (mm) an unevenly spaced stack of `typical` steps may not have:
    a slice missing, two at one position, or spacing more uneven than a series is read with."""
    return np.abs(steps - typical) > max(UNEVEN_STEP_FRACTION * typical, UNEVEN_TOLERANCE_MM)


def _beyond_mean_grid(off: np.ndarray, mean: float) -> bool:
    """Whether a slice lies farther from its place on the regular grid of the mean step `mean` (`off`: each slice's
    distance, mm) than an unevenly spaced stack is read with: over half a slice."""
    return float(np.max(off, initial=0.0)) > UNEVEN_MAX_OFF * abs(mean)


def _decimals(text: str) -> list[float] | None:
    """The numbers of a DICOM decimal string ('-128.75\\-100.09\\-19.68'), None unless all are finite numbers."""
    try:
        values = [float(v) for v in text.split("\\")]
    except ValueError:
        return None
    return values if all(map(math.isfinite, values)) else None


def _check_slice_spacing(path, positions: list[str], image) -> None:
    """Refuse a series whose slices are not evenly spaced: an incomplete transfer (slices missing) or two
    images at one position would be put on a regular grid with a wrong position for every slice after it,
    and wrong volumes."""
    if not any(text.strip(" \0") for text in positions):
        return  # positions not given: nothing to check against
    damaged = [k for k, text in enumerate(positions) if len(_decimals(text) or ()) != 3]
    if damaged:  # GDCM reads what it can of them ('-19.j679' as -19): slices sorted and spaced wrongly, silently
        k = damaged[0]
        raise DeepWMLError(f"{path}: the Image Position (Patient) of image {k + 1} of the DICOM series is missing or "
                           f"not three numbers ({positions[k].strip()[:60]!r}), so its slices cannot be placed: a "
                           "damaged file; export the series again from the scanner or PACS")
    points = np.array([[float(v) for v in text.split("\\")] for text in positions])
    direction = np.array(image.GetDirection()).reshape(3, 3)
    along = points @ direction[:, 2]
    steps = np.diff(along)
    typical = float(np.median(np.abs(steps)))
    if typical <= 0:
        raise DeepWMLError(f"{path}: the DICOM series has several images at each slice position (echoes or "
                           "repeats?); export the FLAIR series alone")
    # a fifth of a step, and more than positions written rounded to 0.1 mm make of a thin slice's (0.5 and 0.6 mm
    # steps of 0.55 mm slices); a slice missing or doubled is a whole step off
    odd = np.flatnonzero(_odd_steps(np.abs(steps), typical))
    if odd.size:
        k = int(odd[0])
        missing = int(round(abs(steps[k]) / typical)) - 1
        what = (f"about {missing} slice(s) missing" if missing >= 1 else
                "two images at one position" if abs(steps[k]) < 0.2 * typical else "uneven slice spacing")
        raise DeepWMLError(f"{path}: the slices of the DICOM series are not evenly spaced ({abs(steps[k]):.2f} mm between "
                           f"images {k + 1} and {k + 2}, {typical:.2f} mm elsewhere: {what}); the transfer may be "
                           "incomplete: export the series again")
    # steps each within a fifth of the others but drifting (4.1 mm apart at one end, 5.9 mm at the other): the
    # regular grid of their mean step would put the middle slices more than half a slice from where they were
    # imaged, each lesion there measured in its neighbour's place; a warning (DicomSeries.slice_spacing_warning)
    # is not enough for that
    mean = (along[-1] - along[0]) / (len(along) - 1)
    off = _off_mean_grid(along)
    if _beyond_mean_grid(off, mean):
        k = int(np.argmax(off))
        raise DeepWMLError(f"{path}: the slices of the DICOM series are unevenly spaced ({np.abs(steps).min():.2f} to "
                           f"{np.abs(steps).max():.2f} mm apart): on a regular grid of their mean spacing, "
                           f"{abs(mean):.2f} mm, image {k + 1} would lie {off[k]:.1f} mm (over half a slice) from where it "
                           "was imaged; convert the series with a tool that resamples unevenly spaced slices (dcm2niix, "
                           "3D Slicer's DICOM module) and segment the file it writes")
    # each slice where the grid puts it: on the first one's normal. Slices shifted sideways (a gantry tilt, a
    # stack sheared by the scanner) would be stacked straight, every one misplaced, and spaced by the distance
    # between their corners, not the slab thickness: wrong lesion places and volumes, without a word
    sideways = np.linalg.norm((points - points[0]) - np.outer(along - along[0], direction[:, 2]), axis=1)
    pixel = min(image.GetSpacing()[:2])
    if sideways.max() > 0.5 * pixel + _SHEAR_TOLERANCE * float(np.ptp(along)):
        k = int(np.argmax(sideways))
        raise DeepWMLError(f"{path}: the slices of the DICOM series are not stacked straight along their normal (image "
                           f"{k + 1} lies {sideways[k]:.1f} mm sideways of where the first one's stack would put it: a "
                           "gantry tilt or a sheared stack), so the volume read from them would misplace every slice; "
                           "convert the series with a tool that corrects a tilt (dcm2niix, 3D Slicer's DICOM module) "
                           "and segment the file it writes")
    read = image.GetSpacing()[2]  # (steps checked even above: a slice missing is said so)
    if abs(read - typical) > max(0.2 * typical, UNEVEN_TOLERANCE_MM):  # the slices' geometry sought elsewhere by
        # GDCM (files labelled enhanced MR without its functional groups: 1 x 1 x 1 mm at 0, 0, 0), said "ok"
        raise DeepWMLError(f"{path}: the DICOM library read the series' slices {read:.2f} mm apart, but their Image "
                           f"Positions (Patient) are {typical:.2f} mm apart, so its geometry cannot be trusted (a "
                           "damaged header?); export the series again from the scanner or PACS")


def _check_layout(path, dimension: int, size, components: int, mask: bool = False) -> None:
    if components != 1:
        raise DeepWMLError(
            f"{path} has {components} values per voxel (vector/RGB); DeepWML needs a single-channel "
            + ("label mask (0 background, 1 lesion)" if mask else "(grey-scale) FLAIR volume")
        )
    size = tuple(int(s) for s in size)
    if dimension == 4 and size[3] == 1:
        return
    if dimension == 2 or (dimension == 3 and min(size) == 0):
        raise DeepWMLError(f"{path} is a 2D image {size}; DeepWML needs {_needs(mask)}")
    if dimension == 4 and mask:
        raise DeepWMLError(f"{path} is a 4D image {size}: {size[3]} volumes in one file; DeepWML needs {_needs(mask)}: "
                           "save the one to use as its own file and give that")
    if dimension == 4:  # echoes of a multi-echo FLAIR, or time points: which one is the FLAIR is the user's call
        raise DeepWMLError(
            f"{path} is a 4D image {size}: {size[3]} volumes (echoes or time points) in one file; DeepWML segments "
            "one 3D FLAIR volume: save the one to segment as its own file and give that (3D Slicer: load the file, "
            "pick the volume in the Sequences toolbar, then File > Save Data; FSL: fslroi IN OUT N 1 keeps volume N, "
            "counting from 0; dcm2niix writes each echo of a DICOM series to its own file)"
        )
    if dimension != 3:
        what = "mask" if mask else "FLAIR volume"
        raise DeepWMLError(f"{path} is a {dimension}D image {size}; DeepWML needs one 3D {what} — extract the {what} first")


def _squeeze_4d(image: sitk.Image) -> sitk.Image:
    import SimpleITK as sitk

    if image.GetDimension() == 4:
        size = list(image.GetSize())
        return sitk.Extract(image, size[:3] + [0], [0, 0, 0, 0], sitk.ExtractImageFilter.DIRECTIONCOLLAPSETOSUBMATRIX)
    return image


@dataclass(frozen=True)
class TimeAxis:
    """The fourth axis of an image file stored 4D with one time point (X, Y, Z, 1), as some converters write
    a volume (`read_time_axis`): it is read as 3D, and its image outputs are written 4D the same way
    (`write_image`). A NIfTI file's time step may be 0 (unset)."""
    origin: float = 0.0
    spacing: float = 1.0


# NIfTI-1 and NIfTI-2 (by header size): the dim array's format and offset, the format of reals, the offsets of
# pixdim[4] (the time step) and toffset (the time origin)
_NIFTI_TIME_FIELDS = {348: ("8h", 40, "f", 92, 136), 540: ("8q", 16, "d", 136, 216)}


def _nifti_header(path: Path) -> bytes | None:
    """The first 540 bytes of a NIfTI file (a pair's .hdr: its 348), or None where it cannot be read."""
    opener = gzip.open if _gzipped(path) else open
    try:
        with opener(path, "rb") as f:
            return f.read(540)
    except (EOFError, OSError, zlib.error):
        return None


def read_nifti_geometry(path: str | os.PathLike) -> NiftiGeometry | None:
    """The header fields that place a NIfTI file's voxels (`NiftiGeometry`), which its NIfTI outputs carry
    (`write_image`); None for another format and a file that cannot be read. Reads the header alone."""
    p = Path(path)
    if p.is_dir() or not (is_nifti(p) or is_nifti_pair(p)):
        return None
    header = _nifti_header(p)
    return None if header is None else nifti_geometry(header)


def read_time_axis(path: str | os.PathLike) -> TimeAxis | None:
    """The TimeAxis of an image file stored X, Y, Z, 1, or None (a 3D file, a DICOM folder, and a file that
    cannot be read: read_image says what is wrong with it). Reads the header alone."""
    p = Path(path)
    if p.is_dir():
        return None
    if is_nifti(p) or is_nifti_pair(p):
        header = _nifti_header(p)
        if header is None:
            return None
        for endian in "<>":
            layout = _NIFTI_TIME_FIELDS.get(struct.unpack_from(endian + "i", header)[0]) if len(header) >= 348 else None
            if layout:
                break
        else:
            return None
        dim_format, dim_at, real_format, step_at, start_at = layout
        dims = struct.unpack_from(endian + dim_format, header, dim_at)
        if dims[0] != 4 or dims[4] != 1:
            return None
        step, start = (struct.unpack_from(endian + real_format, header, at)[0] for at in (step_at, start_at))
        return TimeAxis(float(start), float(step))
    reader = _file_reader(p)
    try:
        with itk_names(p) as (name,):
            reader.SetFileName(name)
            reader.ReadImageInformation()
    except (RuntimeError, DeepWMLError):
        return None
    if reader.GetDimension() != 4 or reader.GetSize()[3] != 1:
        return None
    return TimeAxis(float(reader.GetOrigin()[3]), float(reader.GetSpacing()[3]))


def stored_size(image, time_axis: TimeAxis | None) -> list[int]:
    """The size of an image as its file stores it: X, Y, Z, or X, Y, Z, 1 with a time axis."""
    return [*image.GetSize(), *([1] if time_axis else [])]


class _Told(BaseException):
    """What `reading` raised, carried past the reading's own handling of file errors to `read_any`, which raises it
    as it was: a callback's OSError (a progress bar writing to a closed terminal or pipe) was reported as the scan's
    fault, "truncated or corrupt ...; copy the file again from its source"."""

    def __init__(self, error: BaseException):
        super().__init__(error)
        self.error = error


def _forwards(reading: Callable[[float], None] | None) -> Callable[[float], None] | None:
    """`reading` told only fractions (at most 1) above the last it was told: a NIfTI file SimpleITK reads after
    its bytes were read for the checks would begin again at 0. What it raises comes as `_Told`."""
    if reading is None:
        return None
    last = [-1.0]

    def told(fraction: float) -> None:
        if min(1.0, fraction) > last[0]:
            last[0] = min(1.0, fraction)
            try:
                reading(last[0])
            except BaseException as exc:
                raise _Told(exc) from None

    return told


def read_any(path: str | os.PathLike, light: bool = False, series: str | DicomSeries | None = None,
             float32: bool = False, mask: bool = False, reading: Callable[[float], None] | None = None
             ) -> sitk.Image | Volume:
    """Read a 3D scalar image file or DICOM folder, keeping its pixel type. Raises DeepWMLError.

    With `light`, a plain NIfTI file comes back as a numpy `Volume` (see volume.py), with `float32` as float32
    voxels (read_image). `series`: which series of a DICOM folder that holds several (`choose_dicom_series`).
    `mask`: the file is a mask (read_mask), and a refusal says a mask is needed, not a FLAIR. `reading(fraction)`:
    told the fraction read as it is read, never less than before: of a single-file NIfTI's bytes, a piece at a
    time; of a DICOM series' files, one at a time; of an NRRD or MetaImage file only 0 and 1 (SimpleITK reads it
    in one call that says nothing in between); of a NIfTI pair's .img, a piece at a time."""
    p = Path(path)
    try:
        found = p.exists()
    except OSError as exc:  # a name too long for the file system, a folder on the way without access
        raise DeepWMLError(f"{p} cannot be looked up ({exc.strerror or exc}): check the path and that your account "
                           "may open its folders") from exc
    if not found:
        if p.is_symlink():
            raise DeepWMLError(f"{p} is a link to {os.readlink(p)}, which cannot be reached (a share not mounted?)")
        raise DeepWMLError(f"{p} does not exist")
    reading = _forwards(reading)
    try:
        if p.is_dir():
            image = _read_dicom_folder(p, series, reading)
        elif p.stat().st_size == 0:
            raise DeepWMLError(f"{p} is an empty file (0 bytes); copy it again from its source")
        else:
            image = _read_file(p, light, float32, mask, reading)
    except _Told as told:
        raise told.error.with_traceback(told.error.__traceback__) from None
    _check_placement(image, str(p))
    return image if isinstance(image, Volume) else _squeeze_4d(image)


def read_image(path: str | os.PathLike, light: bool = False, series: str | DicomSeries | None = None,
               reading: Callable[[float], None] | None = None) -> sitk.Image | Volume:
    """Read a FLAIR volume as float32 with its geometry, refusing what cannot be segmented.

    With `light`, a plain NIfTI file is read without SimpleITK into a `Volume` (the same voxels
    and geometry; tested), other files as `SimpleITK.Image`. `reading`: see read_any."""
    image = read_any(path, light, series, float32=True, reading=reading)
    if isinstance(image, Volume):
        if image.array.dtype != np.float32:  # (a float64 NIfTI's come float32: converted as they were read)
            image = Volume(image.array.astype(np.float32), image.GetSpacing(), image.GetOrigin(), image.GetDirection())
    else:
        import SimpleITK as sitk

        image = sitk.Cast(image, sitk.sitkFloat32)
    return check_volume(image, str(path))


def _check_placement(image: sitk.Image | Volume, name: str,
                     advice: str = "the header is damaged; copy the file again from its source, or export it again",
                     ) -> None:
    """Refuse an image whose origin, axes or voxel sizes are not numbers (NaN or infinite, from a damaged header:
    the image library reads them so) or no MRI's (voxels of 1e30 mm, or of 0; an origin 1e30 mm away): the steps
    that place slices and measure volumes failed with an internal error, or said "ok" with volumes in ml of nonsense."""
    origin, spacing = image.GetOrigin()[:3], image.GetSpacing()[:3]  # (a fourth axis's step is time's, in any unit)
    bad = [what for what, wrong in (
        ("origin", not all(math.isfinite(v) and abs(v) <= _MRI_ORIGIN_MM for v in origin)),
        ("orientation", not all(map(math.isfinite, image.GetDirection()))),
        ("voxel size", not all(_MRI_VOXEL_MM[0] <= v <= _MRI_VOXEL_MM[1] for v in spacing))) if wrong]
    if bad:
        raise DeepWMLError(f"{name}: its {' and '.join(bad)} {'is' if len(bad) == 1 else 'are'} no MRI's (origin "
                           f"({', '.join(f'{v:.4g}' for v in origin)}) mm, voxel size "
                           f"{' x '.join(f'{v:.4g}' for v in spacing)} mm: not numbers, or beyond any scanner's), so "
                           f"{advice}")


def check_volume(image: sitk.Image | Volume, name: str = "the image") -> sitk.Image | Volume:
    """Refuse an in-memory volume that cannot be segmented (files get the same checks on reading)."""
    if not hasattr(image, "GetNumberOfComponentsPerPixel"):
        raise DeepWMLError(f"{name} is a {type(image).__name__}, not an image: pass a SimpleITK image (e.g. "
                           "io.read_image(path)), which carries the spacing and orientation the volumes need")
    _check_placement(image, name, "its geometry is wrong; give it the scan's own origin, spacing and direction (as "
                     "its file gives them; in Slicer: the Volumes module, Volume Information)")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise DeepWMLError(f"{name} has {image.GetNumberOfComponentsPerPixel()} values per voxel (vector/RGB); "
                           "DeepWML needs a single-channel (grey-scale) FLAIR volume")
    if image.GetDimension() != 3:
        raise DeepWMLError(f"{name} is a {image.GetDimension()}D image; DeepWML needs a 3D FLAIR volume")
    direction = np.array(image.GetDirection(), float).reshape(3, 3)
    lengths = np.linalg.norm(direction, axis=0)
    if np.abs(lengths ** 2 - 1).max() > 1e-4:  # an image made in memory: a direction scaled by the voxel sizes, or 0
        raise DeepWMLError(f"{name}: its direction's axes are of length {', '.join(f'{v:.4g}' for v in lengths)}, not 1 "
                           "(a matrix of directions, the voxel sizes apart: scaled by them?), so voxel volumes and "
                           "slices would not be what they seem; give it the scan's own direction (as its file gives "
                           "it)")
    if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-4):  # NRRD keeps sheared space directions
        raise DeepWMLError(f"{name}: its header places the voxels on a sheared grid (axes not at right angles), on "
                           "which voxel volumes and slices are not what they seem; resample it onto a regular grid "
                           "first")
    array = voxels(image)
    if array.size == 0:
        raise DeepWMLError(f"{name} has no voxels")
    if array.dtype.kind == "f":
        bad = non_finite_count(array)
        if bad:
            raise DeepWMLError(f"{name} has {bad} non-finite voxels (NaN or Inf); re-export the image from the scanner or PACS")
    lo, hi = float(array.min()), float(array.max())
    if lo == hi:
        raise DeepWMLError(f"{name} is constant (every voxel is {lo:g}); it holds no image — check the export")
    if array.dtype != np.float32:  # DeepWML computes in single precision: a double or wide-integer image is cast
        largest, single = max(abs(lo), abs(hi)), np.finfo(np.float32)
        if not float(single.tiny) <= largest <= float(single.max):
            raise DeepWMLError(f"{name} has voxels of at most {largest:g} in size, outside single precision's normal "
                               f"range ({float(single.tiny):.2g} to {float(single.max):.2g}) in which DeepWML computes; "
                               "rescale the image (or re-export it from the scanner or PACS)")
        if np.float32(lo) == np.float32(hi):  # every voxel one value in single precision: nothing left to segment
            raise DeepWMLError(f"{name}'s voxels ({lo:g} to {hi:g}) are all one value in single precision, in which "
                               "DeepWML computes; rescale the image (or re-export it from the scanner or PACS)")
    wrapped = _wrapped_around(array, lo, hi)
    if wrapped:
        raise DeepWMLError(f"{name} has {wrapped} voxels below -{WRAP_QUARTER} next to voxels above {WRAP_QUARTER}: "
                           "values that wrapped around (over 32767 stored in signed 16 bits turn negative, so the "
                           "brightest voxels, lesions among them, read as the darkest); convert or export it again "
                           "without the overflow (rescaled, or as float)")
    wrapped = _wrapped_past_65535(array, lo, hi)
    if wrapped:
        raise DeepWMLError(f"{name} has {wrapped} voxels below {WRAP_QUARTER} enclosed by voxels above "
                           f"{3 * WRAP_QUARTER}: values that wrapped around (over 65535 stored in unsigned 16 bits start "
                           "again from 0, so the brightest voxels, lesions among them, read as dark holes in bright "
                           "tissue); convert or export it again without the overflow (rescaled, or as float)")
    labels = _few_values(array)
    if labels is not None:
        shown = ", ".join(f"{v:g}" for v in labels[:6]) + (", ..." if len(labels) > 6 else "")
        raise LabelMaskGiven(f"{name} holds only {len(labels)} distinct values ({shown}): it looks like a label mask "
                             "or segmentation, not a FLAIR scan; give the FLAIR image", f"{len(labels)} values: {shown}")
    alike = _patches_of_one_value(array)
    if alike is not None:
        raise LabelMaskGiven(f"{name} holds whole numbers in patches of one value ({alike:.0%} of neighbouring voxels "
                             f"alike, under {LABEL_MAP_ALIKE:.0%} in a FLAIR): it looks like a label mask of many labels "
                             "(one label per lesion, or a parcellation), not a FLAIR scan; give the FLAIR image",
                             f"more than {MAX_LABEL_VALUES} values in patches of one value")
    return image


class LabelMaskGiven(DeepWMLError):
    """An image given as a FLAIR that holds a handful of values: a label mask or segmentation. Named by the user,
    an error; found in a folder beside the scans (a case's FLAIR and its manual mask), skipped."""

    def __init__(self, message: str, values: str):
        super().__init__(message)
        self.values = values  # "2 values: 0, 1"

    def __reduce__(self):  # whole from the Slicer module's worker process
        return type(self), (str(self), self.values)


def non_finite_count(array: np.ndarray, block: int = 1 << 22) -> int:
    """How many voxels are NaN or Inf, counted a block at a time: no whole-volume mask (0.4 GB for a
    1024 x 1024 x 400 scan) beside the voxels."""
    if array.size == 0:
        return 0
    step = max(1, block // max(1, array[0].size)) if array.ndim > 1 else block  # slabs along the first axis: views
    return sum(int(part.size - np.count_nonzero(np.isfinite(part)))
               for part in (array[start:start + step] for start in range(0, array.shape[0], step)))


WRAP_QUARTER = 16384  # a quarter of the 65536 values of 16 bits
WRAP_SHARE = 0.5  # of the voxels below -WRAP_QUARTER next to one above it: 0.90-1.0 where patient01_study1 times 55-100
# wrapped (8-76,311 voxels; times 80: 682, its lesion volume 0.80 ml read as 0.54); padding of -32768 is not counted
# (`_wrapped_around`): around or cut into the same scan scaled to 0-32000 its share was under 0.0001, but a padded
# slice, row or column through tissue over 16384 lies next to it all along


def _wrapped_around(array: np.ndarray, lo: float, hi: float) -> int:
    """How many voxels hold values that wrapped around in signed 16 bits (0 when none): with values both below
    -WRAP_QUARTER and above it within 16 bits' range, at least WRAP_SHARE of the low ones lie next to (in-plane or
    across slices) a high one, as the core of a bright region whose values overflowed does. Voxels of -32768, the
    padding of a reslice or a missing slice, are not counted: padding is that one value, where wrapped values spread
    over many (a padded slice, row or column through bright tissue lies next to it all along). Only such an image
    gets the (whole-volume) masks."""
    if not (lo < -WRAP_QUARTER and hi > WRAP_QUARTER and hi - lo < 4 * WRAP_QUARTER):
        return 0
    low, high = (array < -WRAP_QUARTER) & (array != -2 * WRAP_QUARTER), array > WRAP_QUARTER
    near = np.zeros_like(high)
    for axis in range(array.ndim):
        ahead = [slice(None)] * array.ndim
        behind = [slice(None)] * array.ndim
        ahead[axis], behind[axis] = slice(1, None), slice(None, -1)
        near[tuple(behind)] |= high[tuple(ahead)]
        near[tuple(ahead)] |= high[tuple(behind)]
    wrapped = int(np.count_nonzero(low & near))
    return wrapped if wrapped >= WRAP_SHARE * np.count_nonzero(low) else 0


UNSIGNED_WRAP_SHARE = 0.05  # of the voxels below WRAP_QUARTER next to one above 3 * WRAP_QUARTER in their slice, those
# enclosed (`_wrapped_past_65535`): 0.11-0.94 where the top 0.1-5 % of the 11 clinical FLAIRs, the sample and the 3
# labelled ones at 1 mm were scaled past 65535 and wrapped (0.29 or more from the top 1 %); at most 0.006 where the same
# scans were scaled to a top of 65535, or saturated there from their 97th-99.9th percentile (bright scalp beside air)
UNSIGNED_WRAP_MIN = 20  # enclosed voxels: fewer cannot be judged by a share (and wrapped would change little)


def _wrapped_past_65535(array: np.ndarray, lo: float, hi: float) -> int:
    """How many voxels hold values that wrapped past 65535 in unsigned 16 bits (0 when none): with nothing below 0 and
    values above 3 * WRAP_QUARTER within 16 bits' range, at least UNSIGNED_WRAP_SHARE (and UNSIGNED_WRAP_MIN) of the
    voxels below WRAP_QUARTER that lie next to one above 3 * WRAP_QUARTER in their slice are enclosed by such voxels:
    the nearest voxel not below WRAP_QUARTER is above 3 * WRAP_QUARTER on both sides along their row and their column,
    as in the core of a bright region whose values overflowed to near 0. A real edge of bright tissue (scalp, or a
    scan saturated at 65535) borders the air, open to the image's edge on one side. Judged a slice at a time; only
    such an image gets the masks."""
    if not (lo >= 0 and 3 * WRAP_QUARTER < hi < 4 * WRAP_QUARTER) or array.ndim != 3:
        return 0
    edge = enclosed = 0
    for plane in array:
        low, high = plane < WRAP_QUARTER, plane > 3 * WRAP_QUARTER
        beside = np.zeros_like(high)
        beside[1:] |= high[:-1]
        beside[:-1] |= high[1:]
        beside[:, 1:] |= high[:, :-1]
        beside[:, :-1] |= high[:, 1:]
        beside &= low
        count = int(np.count_nonzero(beside))
        if count:
            edge += count
            enclosed += int(np.count_nonzero(beside & _between(low, high, 1) & _between(low, high, 0)))
    return enclosed if enclosed >= max(UNSIGNED_WRAP_MIN, UNSIGNED_WRAP_SHARE * edge) else 0


def _between(low: np.ndarray, high: np.ndarray, axis: int) -> np.ndarray:
    """Which voxels of `low` (2D) lie in a run of them along `axis` with a voxel of `high` just before and just
    after the run (the image's edge is neither)."""
    n = low.shape[axis]
    shape = [1, 1]
    shape[axis] = n
    # each voxel's place times two, odd where it is high: the last (first) voxel not low at or before (after) each
    # one is a running maximum (minimum) of these, and it is high where odd; int16 where the places fit (faster)
    code = (2 * np.arange(n, dtype=np.int16 if n < 16000 else np.int32)).reshape(shape) | high
    code[low] = -2  # before the first voxel: the edge, not high
    before = np.maximum.accumulate(code, axis=axis)
    code[low] = 2 * n  # past the last voxel: the edge, not high
    after = np.flip(np.minimum.accumulate(np.flip(code, axis), axis=axis), axis)
    return low & (before & 1).astype(bool) & (after & 1).astype(bool)


MAX_LABEL_VALUES = 16  # a label map has a handful of values; a real FLAIR has hundreds or thousands


def _few_values(array: np.ndarray) -> np.ndarray | None:
    """The distinct values when there are at most MAX_LABEL_VALUES of them (a label map), else None.

    A strided sample decides first, so a real scan costs a few milliseconds; only a sample with few
    values gets the whole volume checked."""
    def distinct(values: np.ndarray) -> np.ndarray:  # np.unique would import numpy.ma (20 ms of start-up)
        values = np.sort(values)
        return values[np.concatenate(([True], values[1:] != values[:-1]))]

    flat = array.reshape(-1)
    sample = flat[:: max(1, flat.size // 200_000)]
    # a scan shows more values in a few thousand of the sample, spread over it, already: the whole sample is sorted
    # only where those are few (2.5 ms of every case)
    if len(distinct(sample[:: max(1, sample.size // 4000)])) > MAX_LABEL_VALUES \
            or len(distinct(sample)) > MAX_LABEL_VALUES:
        return None
    values = distinct(flat)
    return values if len(values) <= MAX_LABEL_VALUES else None


LABEL_MAP_ALIKE = 0.9  # of neighbouring voxels (neither background) alike along each axis: up to 15 % in real FLAIRs (8-bit
# too), 52-81 % along an axis a FLAIR was resampled 2-5 fold by nearest neighbour, 100 % in a map with one label per lesion


def _patches_of_one_value(array: np.ndarray, slices: int = 32) -> float | None:
    """The fraction of neighbouring voxel pairs (neither of the background value, the commonest) that hold one value,
    along the axis where it is least, when that is at least LABEL_MAP_ALIKE in an image of whole numbers: a label
    map of more labels than MAX_LABEL_VALUES (a lesion mask labelled one value per lesion, 49 on real patient07),
    whose labels each fill patches, where a FLAIR's neighbours differ by noise (and one resampled by nearest
    neighbour along an axis or two still differs along the others). Else None. Such a map given as the FLAIR was
    segmented as a scan (and, found in a folder beside the scans, not skipped as a mask of a few values is).
    Judged on up to `slices` pairs of slices along the first axis, all of them when those hold few pairs; a pair
    at a time, so that the judging holds a few slices' worth of memory, never a copy of the volume."""
    if array.ndim != 3 or min(array.shape) < 2:
        return None
    for step in (max(1, (array.shape[0] - 1) // slices), 1):
        starts = range(0, array.shape[0] - 1, step)  # each judged slice, and the slice after it
        if array.dtype.kind == "f" and not all(np.all(array[i] == np.round(array[i])) for i in starts):
            return None  # fractions: no label map (read_image's float FLAIRs stop here)
        every = max(1, len(starts) * array[0].size // 1_000_000)  # the background from about a million voxels
        background = _commonest(np.concatenate([array[i].reshape(-1)[::every] for i in starts]))  # of the sample
        pairs, same = np.zeros(3, np.int64), np.zeros(3, np.int64)
        for i in starts:
            first, then = array[i], array[i + 1]
            for axis, (left, right) in enumerate(((first[:, :-1], first[:, 1:]), (first[:-1], first[1:]), (first, then))):
                both = (left != background) & (right != background)
                pairs[axis] += np.count_nonzero(both)
                same[axis] += np.count_nonzero(both & (left == right))
        alike = [same[axis] / pairs[axis] for axis in range(3) if pairs[axis] >= 50]
        if alike or step == 1:
            break
    if not alike or min(alike) < LABEL_MAP_ALIKE:
        return None
    return float(min(alike))


def _commonest(values: np.ndarray):
    """The commonest of `values` (whole numbers), the least of those equally common. Counted by value where they
    span no more values than there are (a scan's 0-4095 or 0-65535: a tenth of the time of sorting the million
    values of a clinical scan's sample, some 15 ms of every case), else sorted."""
    lo, hi = values.min(), values.max()
    if float(hi) - float(lo) < values.size:
        # each value's distance above the least: a signed type's in 64 bits (int16's 32767 - -32768 overflows)
        wide = values.astype(np.int64) - np.int64(lo) if values.dtype.kind == "i" else values - lo
        whole = float(lo) if values.dtype.kind == "f" else int(lo)
        return values.dtype.type(whole + int(np.argmax(np.bincount(wide.astype(np.intp)))))
    flat = np.sort(values)
    starts = np.flatnonzero(np.concatenate(([True], flat[1:] != flat[:-1])))
    return flat[starts[np.argmax(np.diff(np.append(starts, flat.size)))]]


SCAN_FRACTION = 0.1  # of a mask's voxels non-zero: a lesion mask holds far less (50 ml is 2 % of a 320 x 320 x 48 scan)


def _scan_like(array: np.ndarray) -> str | None:
    """What shows that a file given as a mask is an image (a FLAIR), or None: more distinct values than a label map
    has (MAX_LABEL_VALUES), above 1 (a probability map of 0-1 is told so by read_mask), over more than SCAN_FRACTION
    of its voxels. A uint8 FLAIR was read as a mask of lesion labels (any positive value: 2600 ml of 'lesion', Dice
    0.007, no word) and a uint16 one told to 'relabel it'; a map with one label per lesion (a few dozen, small) is not
    caught."""
    if array.size == 0 or _few_values(array) is not None:
        return None
    finite = np.isfinite(array)
    if not finite.any() or float(array[finite].max()) <= 1:
        return None
    marked = np.count_nonzero(array) / array.size
    if marked <= SCAN_FRACTION or _probability_like(array[finite]):
        return None
    return f"{marked:.0%} of its voxels are non-zero, with more than {MAX_LABEL_VALUES} distinct values"


def _probability_like(values: np.ndarray) -> bool:
    """Whether finite values look like a probability map scaled to 0-100 (or any top): fractions, none negative,
    nine in ten of the non-zero ones within 5 % of the top (a network's map is near 0 almost everywhere, lesions
    a few % of the brain; a FLAIR's head, skull-stripped or not, lies at a good part of its top). Such a map, non-zero
    nearly everywhere, was called 'looks like a scan (was the FLAIR given instead of its mask?)': read_mask says
    it holds fractions, 'threshold a probability map first', as it did before. Judged on a strided sample."""
    sample = values[:: max(1, values.size // 200_000)].astype(np.float64)
    sample = sample[sample != 0]
    if sample.size == 0 or float(sample.min()) < 0 or np.all(sample == np.round(sample)):
        return False
    return float(np.quantile(sample, 0.9)) < 0.05 * float(values.max())


def _fraction_text(value: float) -> str:
    """A value that is no whole number, in 3 digits or as many more as show it is none (1.0003, not 1)."""
    return next(text for text in (f"{value:.{digits}g}" for digits in range(3, 18)) if float(text) % 1)


MASK_ROUND_OFF = 1e-4  # off a whole number in a float mask: float32 round-off (1.5e-5 at 255), far from a probability


def read_mask(path: str | os.PathLike, reference: sitk.Image | None = None,
              reference_name: str = "the image it is compared with", source: DicomSeries | None = None,
              change_labels: bool = False) -> sitk.Image:
    """Read a label image (0 background, 1 lesion, other small integers kept) as uint8.

    With `reference` (named `reference_name` in an error), the mask is put on the reference's grid
    (`onto_grid`: reordered, or padded when cropped to its lesions; nothing interpolated). A Slicer
    `.seg.nrrd` is read by segment (`lesion_segments`), not as a label image, a DICOM Segmentation (a file, or a
    folder holding one: `dicom_seg_file`) by its segments and frames (`read_dicom_seg`). A two-valued mask whose
    lesion value is above 255 (0/65535) is read as 0/1; a float mask's values within MASK_ROUND_OFF of whole numbers
    (0.99999994: round-off) as those numbers. `source`: the DICOM series `reference` was read from, where at hand:
    a DICOM SEG's frames off its own grid are then placed by the source images they name (`read_dicom_seg`).
    DeepWML's lesion change label map (CASE_change.nii.gz, .nrrd, .mha) is read as its follow-up's lesions, the
    gone ones left out (`change_map_lesions`), as its change SEG and CASE_change.seg.nrrd are; with `change_labels`
    as its labels (a rerun of `deepwml change` adding outputs).
    """
    # a .seg.nrrd is read by segment, even of one: its label value (2 after a segment was deleted in
    # Slicer, say) is no label of the mask conventions; a DICOM SEG (a file, or a folder holding one) by its
    # own functional groups (GDCM read one whose every frame is present as a 0/255 volume by chance, and refused
    # a SEG without its empty frames)
    seg = dicom_seg_file(path)
    segmented = bool(seg) or bool(segment_names(path))
    image = read_dicom_seg(seg, source) if seg else lesion_segments(path) if segmented else read_any(path, mask=True)
    mask = label_mask(image, str(path))
    if not segmented and not change_labels:
        mask = change_map_lesions(path, mask)
    if reference is not None:
        mask = onto_grid(mask, reference, str(path), reference_name)
    return mask


def label_mask(image: sitk.Image | Volume, name: str = "the mask") -> sitk.Image:
    """A label image in memory (`name` names it in an error) as uint8, checked as `read_mask` checks a file: a scan,
    a probability map, NaN or negative values, or several labels above 255 raise DeepWMLError; a two-valued mask
    above 255 (0/65535) becomes 0/1, a float mask's round-off its whole numbers."""
    import SimpleITK as sitk

    if not isinstance(image, (sitk.Image, Volume)):
        raise DeepWMLError(f"{name} is a {type(image).__name__}, not an image: pass a SimpleITK image on its scan's "
                           "grid (a file read with io.read_mask(path, scan))")
    if isinstance(image, Volume):
        image = image.to_sitk()
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise DeepWMLError(f"{name} has {image.GetNumberOfComponentsPerPixel()} values per voxel; a mask holds one "
                           "label a voxel (0 background, 1 lesion)")
    array = sitk.GetArrayViewFromImage(image)
    scan = _scan_like(array)
    if scan:
        raise DeepWMLError(f"{name} looks like a scan, not a label mask: {scan} (was the FLAIR given instead of its "
                           "mask?); give the mask (0 background, 1 lesion)")
    if array.dtype.kind == "f" and np.isfinite(array).all():
        whole = np.round(array)
        if np.abs(array - whole).max() <= MASK_ROUND_OFF:  # float arithmetic's 0.99999994 or 1.0000001 (FSL, resampling)
            image = like_image(whole, image)
            array = sitk.GetArrayViewFromImage(image)
    if not np.isfinite(array).all() or np.any(array < 0) or np.any(array != np.round(array)):
        finite = np.asarray(array)[np.isfinite(array)]
        if finite.size < array.size:
            found = f"{array.size - finite.size} voxels that are not numbers (NaN or Inf)"
        elif np.any(finite < 0):
            found = f"negative values (down to {float(finite.min()):g})"
        else:  # fractions: a probability map, or a mask resampled with linear interpolation
            fractions = finite[finite != np.round(finite)]
            low, high = (_fraction_text(float(value)) for value in (fractions.min(), fractions.max()))
            where = f"of {low}" if low == high else f"between {low} and {high}"  # one value: not 'between 0.7 and 0.7'
            found = (f"values that are not whole numbers ({fractions.size} voxels {where}: a probability map, or a mask "
                     "resampled with interpolation?)")
        raise DeepWMLError(
            f"{name} is not a label mask: it holds {found}; a mask holds whole numbers 0–255 (0 background, "
            "1 lesion): threshold a probability map first, resample masks with nearest neighbour"
        )
    if np.any(array > 255):
        values = np.unique(array[array != 0])
        if values.size > 1:
            shown = ", ".join(f"{v:g}" for v in values[:5]) + (", ..." if values.size > 5 else "")
            raise DeepWMLError(f"{name} holds values above 255 among several labels ({shown}); a mask holds 0 "
                               "background, 1 lesion and 2 ignore, or is two-valued (0 and one lesion value): relabel it")
        binary = sitk.GetImageFromArray((np.asarray(array) != 0).astype(np.uint8))  # two-valued, e.g. 0/65535
        binary.CopyInformation(image)
        image = binary
    return sitk.Cast(image, sitk.sitkUInt8)


def grid_difference(a: sitk.Image, b: sitk.Image) -> str | None:
    """A description of how two image grids differ, or None when they match within tolerance."""
    if a.GetDimension() != b.GetDimension():
        return f"dimension {a.GetDimension()} vs {b.GetDimension()}"
    sa, sb = np.array(a.GetSpacing()), np.array(b.GetSpacing())
    def show(values, digits: int) -> str:
        return "(" + ", ".join(f"{float(v):.{digits}f}".rstrip("0").rstrip(".") for v in values) + ")"

    spacing = None if np.allclose(sa, sb, rtol=_SPACING_RTOL, atol=0) else f"spacing {show(sa, 5)} vs {show(sb, 5)} mm"
    if a.GetSize() != b.GetSize():  # both grids in full: a size alone does not say which was resampled
        return f"size {a.GetSize()} vs {b.GetSize()}" + (f", {spacing}" if spacing else "")
    if spacing:
        return spacing
    tol = _ORIGIN_TOL_FRACTION * float(min(sa.min(), sb.min()))
    oa, ob = np.array(a.GetOrigin()), np.array(b.GetOrigin())
    if np.abs(oa - ob).max() > tol:
        return f"origin {show(oa, 3)} vs {show(ob, 3)} mm"
    da, db = np.array(a.GetDirection()), np.array(b.GetDirection())
    if np.abs(da - db).max() > _DIRECTION_TOL:
        return f"direction {show(da, 4)} vs {show(db, 4)}"
    return None


def align_voxel_order(image: sitk.Image, reference: sitk.Image) -> sitk.Image:
    """`image` with its voxel axes permuted and flipped onto the reference's when that puts it on the
    reference's grid (the same voxels stored in another order, e.g. LPS against RAS, or sagittal
    slices first); nothing is interpolated. Otherwise `image` itself, for `check_same_grid` to judge."""
    if grid_difference(image, reference) is None or image.GetDimension() != 3 or reference.GetDimension() != 3:
        return image
    import SimpleITK as sitk

    orientation = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(reference.GetDirection())
    reordered = sitk.DICOMOrient(image.to_sitk() if isinstance(image, Volume) else image, orientation)
    return reordered if grid_difference(reordered, reference) is None else image


def reorders_onto(image: sitk.Image, reference: sitk.Image) -> bool:
    """Whether `align_voxel_order(image, reference)` is on the reference's grid (`image` is, or is that grid stored in
    another voxel order), told from the geometry alone (`voxel_order_grid`): nothing is reordered."""
    if grid_difference(image, reference) is None:
        return True
    if image.GetDimension() != 3 or reference.GetDimension() != 3:
        return False
    return grid_difference(voxel_order_grid(image, reference), reference) is None


def voxel_order_grid(image: sitk.Image, reference: sitk.Image) -> Volume:
    """The grid `align_voxel_order` puts a 3D `image` on (its voxel axes permuted and flipped into the reference's
    order), from the geometry alone: no voxel is copied. The permutation and flips are DICOMOrient's, found on a
    one-voxel image of the same direction; the origin is the voxel they bring first. Whether `image` is the
    reference's grid stored in another order is then `grid_difference(voxel_order_grid(image, reference),
    reference) is None`, without reordering a mask already reordered elsewhere."""
    import SimpleITK as sitk

    orient = sitk.DICOMOrientImageFilter()
    orient.SetDesiredCoordinateOrientation(orient.GetOrientationFromDirectionCosines(reference.GetDirection()))
    proxy = sitk.Image([1, 1, 1], sitk.sitkUInt8)
    proxy.SetDirection(image.GetDirection())
    direction = orient.Execute(proxy).GetDirection()
    order, flips = orient.GetPermuteOrder(), orient.GetFlipAxes()
    size, spacing = image.GetSize(), np.array(image.GetSpacing(), float)
    first = np.zeros(3)
    for axis, flipped in zip(order, flips):
        if flipped:
            first[axis] = size[axis] - 1
    origin = np.array(image.GetOrigin(), float) + np.array(image.GetDirection(), float).reshape(3, 3) @ (first * spacing)
    shape = tuple(size[axis] for axis in order)[::-1]  # k, j, i
    return Volume(np.broadcast_to(np.zeros((), np.uint8), shape), [spacing[axis] for axis in order], origin, direction)


def lattice_offset(a: sitk.Image, b: sitk.Image) -> tuple[int, ...] | None:
    """The index on `b`'s grid of `a`'s first voxel when `a` lies on the same voxel lattice (same spacing and
    direction, origin a whole number of voxels away: one is a crop or an extension of the other), else None."""
    if a.GetDimension() != b.GetDimension():
        return None
    sa, sb = np.array(a.GetSpacing(), float), np.array(b.GetSpacing(), float)
    da, db = np.array(a.GetDirection(), float), np.array(b.GetDirection(), float)
    if not np.allclose(sa, sb, rtol=_SPACING_RTOL, atol=0) or np.abs(da - db).max() > _DIRECTION_TOL:
        return None
    n = b.GetDimension()
    shift = np.array(a.GetOrigin(), float) - np.array(b.GetOrigin(), float)
    index = db.reshape(n, n).T @ shift / sb
    whole = np.round(index)
    if np.abs((index - whole) * sb).max() > _ORIGIN_TOL_FRACTION * float(sb.min()):
        return None
    return tuple(int(v) for v in whole)


def _lattice_placement(image: sitk.Image, reference: sitk.Image):
    """(`image` in the reference's voxel order, the index on the reference's grid of its first voxel) when it
    lies on the reference's voxel lattice over another extent, else None."""
    if image.GetDimension() != 3 or reference.GetDimension() != 3:
        return None
    import SimpleITK as sitk

    orientation = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(reference.GetDirection())
    stored = sitk.DICOMOrient(image.to_sitk() if isinstance(image, Volume) else image, orientation)
    offset = lattice_offset(stored, reference)
    return None if offset is None else (stored, offset)


def refuse_swapped_axes(mask: sitk.Image, reference: sitk.Image, what: str, reference_name: str) -> None:
    """Raise DeepWMLError when `mask` lies on the reference's voxel lattice (spacing and direction) with the
    reference's voxel counts in another order, as an image made of a numpy array in (x, y, z) order is: SimpleITK's
    GetImageFromArray takes (z, y, x). Read as a crop or an extension of the reference's grid, it was padded onto it
    and compared voxel by voxel (Dice 0.05 for a mask against itself, no word)."""
    size, other = tuple(mask.GetSize()), tuple(reference.GetSize())
    if size == other or sorted(size) != sorted(other) or lattice_offset(mask, reference) is None:
        return
    # said for a file as well (saved by a script from such an array), where io.read_mask alone cannot mend it
    raise DeepWMLError(f"{what} is {size} voxels and {reference_name} {other}: the same sizes in another order, the "
                       "axes of an array swapped? SimpleITK's GetImageFromArray takes a (z, y, x) array (nibabel's are "
                       "(x, y, z)): make the mask again from the array transposed (array.transpose()), or in Python "
                       "read its file with io.read_mask")


def _coverage(stored: sitk.Image, offset: tuple[int, ...], reference: sitk.Image, whose: str) -> str:
    """'voxels (4 to 19, ...) of WHOSE (0 to 29, ...)': the part of the reference's grid that an image on its
    lattice (`_lattice_placement`) covers."""
    covered = ", ".join(f"{o} to {o + n - 1}" for o, n in zip(offset, stored.GetSize()))
    return f"voxels ({covered}) of {whose} ({', '.join(f'0 to {n - 1}' for n in reference.GetSize())})"


def _fills_its_extent(array: np.ndarray) -> bool:
    """Whether non-zero voxels reach both ends of every axis: the mark of a mask cropped to its lesions (Slicer's
    'Crop to minimum extent'), which a mask on a whole scan's grid (lesions inside the head) does not bear."""
    for axis in range(array.ndim):
        marked = np.any(array, axis=tuple(a for a in range(array.ndim) if a != axis))
        if not (marked[0] and marked[-1]):
            return False
    return True


def _window(start, shape, full):
    """(the array's part, the grid's part) where an array whose first voxel lies at index `start` of a grid of shape
    `full` meets it (numpy order, slices), or None when they do not meet."""
    own = tuple(slice(max(0, -o), min(n, m - o)) for o, n, m in zip(start, shape, full))
    if any(s.stop <= s.start for s in own):
        return None
    return own, tuple(slice(s.start + o, s.stop + o) for o, s in zip(start, own))


def _nonzero_outside(stored: sitk.Image, offset: tuple[int, ...], reference: sitk.Image) -> int | None:
    """How many non-zero voxels of an image on the reference's lattice (`_lattice_placement`) lie beyond the
    reference's grid; None when it does not meet that grid at all."""
    import SimpleITK as sitk

    array = sitk.GetArrayViewFromImage(stored)
    window = _window(offset[::-1], array.shape, reference.GetSize()[::-1])
    return None if window is None else int(np.count_nonzero(array)) - int(np.count_nonzero(array[window[0]]))


def _is_crop(stored: sitk.Image, reference: sitk.Image) -> bool:
    """Whether an image on the reference's lattice over another extent may be told a crop (or an extension) of it:
    a grid of the reference's very size a whole number of voxels off is a changed header, unless the mask fills
    it as one cropped to its lesions does."""
    import SimpleITK as sitk

    return (tuple(stored.GetSize()) != tuple(reference.GetSize())
            or _fills_its_extent(sitk.GetArrayViewFromImage(stored)))


def onto_grid(mask: sitk.Image, reference: sitk.Image, what: str = "the mask",
              reference_name: str = "the reference") -> sitk.Image:
    """`mask` on the reference's grid, nothing interpolated: as it is; reordered (`align_voxel_order`); or,
    when it lies on the reference's voxel lattice over another extent (a Slicer segmentation saved with 'Crop to
    minimum extent', a mask cropped or padded by another tool), cut and padded with zeros onto the reference's
    extent: the very voxels of the scan, so exact, as long as no non-zero voxel lies beyond the reference's grid.

    Raises DeepWMLError otherwise (`check_same_grid`'s message), saying how many of its non-zero voxels lie
    beyond the reference's grid when some do (drawn on another, larger scan)."""
    mask = align_voxel_order(mask, reference)
    diff = grid_difference(mask, reference)
    if diff is None:
        return mask
    refuse_swapped_axes(mask, reference, what, reference_name)
    placement = _lattice_placement(mask, reference)
    if placement is not None and _is_crop(placement[0], reference):
        import SimpleITK as sitk

        stored, offset = placement
        outside = _nonzero_outside(stored, offset, reference)
        if outside == 0:
            array = sitk.GetArrayViewFromImage(stored)  # k, j, i: the offset and sizes reversed
            own, grid = _window(offset[::-1], array.shape, reference.GetSize()[::-1])
            placed = np.zeros(reference.GetSize()[::-1], dtype=array.dtype)
            placed[grid] = array[own]
            # the reference's geometry (a Volume's too: what segment_image gives for a NIfTI read without SimpleITK)
            return like(placed, reference.GetSpacing(), reference.GetOrigin(), reference.GetDirection())
        if outside:
            grid_name = f"{reference_name}'s grid"
            # whose grid the voxel numbers count is named (it said 'voxels ... of its ...'), each name said twice
            raise DeepWMLError(
                f"{what} and {reference_name} are on different voxel grids ({diff}): on the same voxel lattice over "
                f"another extent, {what} covers {_coverage(stored, offset, reference, grid_name)}, "
                f"and {outside} of its non-zero voxels {'lie' if outside > 1 else 'lies'} outside that grid, where it "
                "has no voxels: drawn on another, larger scan? Give a mask on the scan's whole grid (in Slicer: save "
                "it without cropping, or export it with the FLAIR as reference volume)")
    check_same_grid(mask, reference, what, reference_name)  # raises: the grids do not match
    return mask


def _holds(grid: sitk.Image, stored: sitk.Image, offset: tuple[int, ...]) -> bool:
    """Whether the grid's extent holds the whole extent of an image on its lattice at `offset`."""
    return all(0 <= o and o + n <= m for o, n, m in zip(offset, stored.GetSize(), grid.GetSize()))


def _joint_grid(stored: sitk.Image, offset: tuple[int, ...], reference: sitk.Image):
    """An empty image (a geometry) over the extent of both `reference` and an image on its lattice at `offset`, and
    a voxel around it: no lesion then touches its border, which HD95's outline counts as lesion (`metrics`)."""
    size = np.array(reference.GetSize())
    low = np.minimum(offset, 0) - 1
    high = np.maximum(np.add(offset, stored.GetSize()), size) + 1
    n = len(size)
    spacing = np.array(reference.GetSpacing(), float)
    direction = np.array(reference.GetDirection(), float).reshape(n, n)
    origin = np.array(reference.GetOrigin(), float) + direction @ (low * spacing)
    return like(np.zeros(tuple(int(v) for v in (high - low)[::-1]), np.uint8), spacing, origin,
                reference.GetDirection(), Volume)


def onto_common_grid(a: sitk.Image, b: sitk.Image, what_a: str, what_b: str) -> tuple[sitk.Image, sitk.Image]:
    """Two masks on one grid, nothing interpolated (`onto_grid`), so that neither loses a non-zero voxel: `b`'s or
    else `a`'s, the first that holds the other's whole extent (a reference saved cropped to its lesions against a
    prediction on the whole scan), else every non-zero voxel of it, and is not itself cropped to its lesions (its
    border would cut their outline, and HD95 with it). When neither will do (both saved cropped to their lesions:
    two raters' Slicer segmentations, say), the extent of both and a voxel around it (`on_joint_extent` tells it:
    slice numbers are then not the scan's). Two grids of one size a whole number of voxels apart are refused as a
    changed header (`check_same_grid`), unless both masks fill their extents as crops do; off one lattice, too."""
    a = align_voxel_order(a, b)
    if grid_difference(a, b) is None:
        return a, b
    refuse_swapped_axes(a, b, what_a, what_b)
    forward = _lattice_placement(a, b)  # a on b's grid
    backward = _lattice_placement(b, a) if forward is not None else None
    if backward is None:
        return onto_grid(a, b, what_a, what_b), b  # raises: not on one lattice
    if not (_is_crop(forward[0], b) and _is_crop(backward[0], a)):
        check_same_grid(a, b, what_a, what_b)  # raises
    for holds in (_holds, lambda grid, stored, offset: _nonzero_outside(stored, offset, grid) == 0):
        for placement, grid in ((forward, b), (backward, a)):
            if holds(grid, *placement) and not _fills_its_extent(voxels(grid)):
                return (onto_grid(a, b, what_a, what_b), b) if grid is b else (a, onto_grid(b, a, what_b, what_a))
    joint = _joint_grid(*forward, b)
    return onto_grid(a, joint, what_a, "their joint extent"), onto_grid(b, joint, what_b, "their joint extent")


def onto_scan(scan: sitk.Image, a: sitk.Image, b: sitk.Image, scan_name: str, what_a: str,
              what_b: str) -> tuple[sitk.Image, sitk.Image, sitk.Image]:
    """(scan, a, b) on one grid for a picture: the masks' (`onto_common_grid`), the scan reordered onto it; or, when
    that is not the scan's grid (both masks saved cropped, or one over a larger extent), the scan's, each mask put
    onto it (`onto_grid`). DeepWMLError when a mask cannot be put there."""
    a, b = onto_common_grid(a, b, what_a, what_b)
    scan = align_voxel_order(scan, b)
    if grid_difference(scan, b) is not None:
        a, b = onto_grid(a, scan, what_a, scan_name), onto_grid(b, scan, what_b, scan_name)
    return scan, a, b


def on_joint_extent(common: sitk.Image, a: sitk.Image, b: sitk.Image) -> bool:
    """Whether `onto_common_grid` put `a` and `b` on `common`, the extent of both, which is neither's grid: slice
    numbers then count from its first slice, not the scan's."""
    return grid_difference(common, b) is not None and not reorders_onto(a, common)


JOINT_EXTENT_NOTE = ("both masks were saved cropped to their lesions: they were compared on the extent of both (and "
                     "a voxel around it) on their voxel lattice, which is exact (nothing interpolated: the figures are "
                     "those of the whole scan), but slice numbers count from its first slice, not the scan's; masks "
                     "saved on the scan's whole grid, or the FLAIR given (--flair, or a manifest's flair column), give "
                     "the scan's slice numbers")
ONE_BOX_NOTE = ("both masks were saved cropped to one box (their lesions reach every side of it): they were compared on "
                "it, which is exact (nothing interpolated: the figures are those of the whole scan), but slice numbers "
                "count from the box's first slice, not the scan's; masks saved on the scan's whole grid, or the FLAIR "
                "given (--flair, or a manifest's flair column), give the scan's slice numbers")


def extent_note(common: tuple[sitk.Image, sitk.Image], a: sitk.Image, b: sitk.Image) -> str | None:
    """What slice numbers count from when masks `a` and `b`, put on one grid by `onto_common_grid` (`common`, the
    pair), are compared there and it is not the scan's: the extent of both (`on_joint_extent`, JOINT_EXTENT_NOTE),
    or one box both were saved cropped to, the grid of both, which their lesions together fill (`_fills_its_extent`,
    the mark of a crop: ONE_BOX_NOTE); else None (the scan's grid, or a mask's over a larger extent, which `metrics`
    notes as lying outside the scan)."""
    if on_joint_extent(common[1], a, b):
        return JOINT_EXTENT_NOTE
    if reorders_onto(a, common[1]) and reorders_onto(b, common[1]) and _fills_its_extent(
            (voxels(common[0]) > 0) | (voxels(common[1]) > 0)):
        return ONE_BOX_NOTE
    return None


def _names_a_scan(what: str) -> bool:
    """Whether `what`, a name check_same_grid is given, names the FLAIR a mask should lie on ("the FLAIR", "the
    baseline FLAIR", "its FLAIR PATH", "FLAIR PATH", ...): its callers' own words first, not "FLAIR" anywhere, which
    a mask's file name or folder given after "reference " or "rater B's mask " may hold (sub01_FLAIR_manual.nii.gz)."""
    return re.match(r"(the |its )?((baseline|follow-up) )?FLAIR\b", what) is not None


def check_same_grid(a: sitk.Image, b: sitk.Image, what_a: str = "prediction", what_b: str = "reference") -> None:
    """Raise DeepWMLError when two images do not share a voxel grid."""
    diff = grid_difference(a, b)
    if diff:
        same_voxels = diff.startswith(("origin", "direction"))  # same size and spacing: a header changed
        placement = _lattice_placement(a, b) if diff.startswith("size") else None
        if placement is not None:
            stored, offset = placement  # the same voxels over another extent: say which part of b's grid a covers
            covered = _coverage(stored, offset, b, f"{what_b}'s")
            advice = (f"{what_a} covers {covered}: the same voxels over another extent, one of them cropped (a "
                      "Slicer segmentation saved with 'Crop to minimum extent', say); pad or crop it onto the other's "
                      "grid, no interpolation needed (in Slicer: save it without cropping, or export it with the FLAIR "
                      "as reference volume)")
        elif same_voxels:
            advice = ("if both were drawn on the same scan, a conversion changed one header: copy the scan's "
                      "geometry onto it (SimpleITK CopyInformation); otherwise resample one onto the other")
        elif _names_a_scan(what_b):  # a mask against the scan it should lie on (export, change, train): resampling
            # the scan onto the mask, as the two-mask advice allowed, would move the outputs off the scan's own grid
            advice = (f"a mask must lie on the grid of the scan it was drawn on: was it drawn on another series or "
                      f"visit? Give that scan, or put the mask onto {what_b}'s grid first (in Slicer: export the "
                      "segmentation with this FLAIR as reference volume)")
        else:
            advice = "export both on the same grid (resample one onto the other first)"
        raise DeepWMLError(f"{what_a} and {what_b} are on different voxel grids ({diff}); {advice}")


# ---------------------------------------------------------------------------------------------
# Writing


def file_fingerprint(path: str | os.PathLike) -> str:
    """What tells one file from another wherever it lies and whenever it was copied: its size and the
    SHA-256 of its first MiB (the whole of most masks; cheap for large scans, where an edit that keeps the
    size and the first MiB would go unseen)."""
    import hashlib

    with open(path, "rb") as f:
        return f"{os.fstat(f.fileno()).st_size}:{hashlib.sha256(f.read(1 << 20)).hexdigest()[:24]}"


def spread_digest(path: str | os.PathLike, chunks: int = 16, chunk: int = 1 << 16) -> str:
    """The SHA-256 of `chunks` blocks spread evenly over a file (beside `file_fingerprint`'s first MiB): two
    scans on one template grid stored uncompressed (SPM's wFLAIR.nii) share their first MiB, the empty slices
    below the head, and differ only further in."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        for k in range(chunks):
            f.seek(size * (2 * k + 1) // (2 * chunks))
            digest.update(f.read(chunk))
    return digest.hexdigest()[:16]


def content_fingerprint(path: str | os.PathLike) -> str:
    """A scan file by its content: `file_fingerprint`, after a '~' `spread_digest`, and for a detached header
    (.mhd, .nhdr, which holds the geometry alone: two patients' scans on one template grid have byte-identical
    headers) the same of each of its voxel files after a '+'."""
    def key(file) -> str:
        return f"{file_fingerprint(file)}~{spread_digest(file)}"

    return key(path) + "".join(f"+{key(data)}" for data in detached_data_files(path) if data.is_file())


def detached_data_files(path: str | os.PathLike) -> list[Path]:
    """The voxel files a detached header names (MetaImage .mhd: ElementDataFile; NRRD .nhdr: data file; one, a
    LIST or a numbered pattern of a file per slice; a NIfTI pair's .img); [] for voxels in the file itself or
    another format."""
    p = Path(path)
    value, names = _data_file_field(p) or ("", [])
    return [] if value.upper() == "LOCAL" else [p.parent / name for name in names]


def shortened(name: str, limit: int = 200) -> str:
    """`name` cut, whole characters at a time, to at most `limit` bytes in the file system's encoding."""
    while len(os.fsencode(name)) > limit:
        name = name[:-1]
    return name


def temporary_prefix(path: Path) -> str:
    """The start of the temporary names `path` is written under (hidden; short enough that a long output
    name still leaves room for mkstemp's letters and the suffix within the 255-byte name limit)."""
    return f".{shortened(path.name)}."


def _temporary_sibling(path: Path) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=temporary_prefix(path), suffix=".part" + _extension(path), dir=path.parent)
    os.close(fd)
    return Path(tmp)


# the end of the name of a case's journal (segment.journal_path): hidden like a temporary file, never swept as one
JOURNAL_SUFFIX = ".deepwml-journal"


def is_journal(name: str) -> bool:
    """Whether a file name is a case's journal (segment.journal_path: `.CASE_report.deepwml-journal`), not the
    temporary file it is written under (`..CASE_report.deepwml-journal.xxxx.part.deepwml-journal`, which ends as a
    journal does: _temporary_sibling keeps a name's suffix; a journal's own name ends `_report`, `_change` or a
    digest before the suffix, never `.part`)."""
    return name.startswith(".") and name.endswith(JOURNAL_SUFFIX) and not name.endswith(".part" + JOURNAL_SUFFIX)


def temporary_leftovers(folder: Path) -> list[Path]:
    """The folder's temporary files (`.NAME.xxxx.part...`, `_temporary_sibling`'s): a run killed while writing leaves
    them; the run that next writes there removes them, with its lock held. Not a case's journal (is_journal), which
    lists that run's files until --overwrite removes them; the temporary file a journal is written under is one."""
    try:
        return [p for p in folder.iterdir() if p.name.startswith(".") and ".part" in p.name and not is_journal(p.name)]
    except OSError:
        return []


def _extension(path: Path) -> str:
    name = path.name.lower()
    for ext in (SEGMENTATION_EXTENSION,) + IMAGE_EXTENSIONS + (".json", ".csv"):
        if name.endswith(ext):
            return ext
    return path.suffix


_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}  # no space left; over the disk quota


ALMOST_FULL_BYTES = 1 << 20  # free space below which a disk is taken for full (`write_fault`)


def write_fault(exc: BaseException, folder: Path, written: Iterable[Path] = ()) -> BaseException:
    """`exc`, a write into `folder` that failed (of the files `written`, as far as they got); an error of ITK's
    writers, which carries no errno, as the OSError it stands for where that is known: the system error its text
    names ("Reason: File too large", MetaImage's words); a file at the file-size limit (ulimit -f); or a disk with
    (almost) no space left for this user, or on which a small file cannot be written either (a disk quota used up:
    the disk itself has space). ITK says a failed write in its own words, "failed to write to file" (NRRD), "DICOM
    does not support this component type" (GDCM), or not at all (NIfTI: `WRITTEN_SHORT`)."""
    if isinstance(exc, OSError) and exc.strerror != WRITTEN_SHORT:
        return exc
    said = [code for code in (errno.EFBIG, *_DISK_FULL) if f"Reason: {os.strerror(code)}" in str(exc)]
    if said:
        return OSError(said[0], os.strerror(said[0]))
    if _at_file_size_limit(written):
        return OSError(errno.EFBIG, os.strerror(errno.EFBIG))
    try:
        full = shutil.disk_usage(folder).free < ALMOST_FULL_BYTES
    except OSError:
        full = False
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)) if full else _small_write_fault(folder) or exc


def _at_file_size_limit(written: Iterable[Path]) -> bool:
    """Whether one of the files `written` reached the process's file-size limit (ulimit -f), where a write stops."""
    try:
        import resource

        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    except (ImportError, OSError, ValueError):  # Windows has no such limit
        return False
    if limit == resource.RLIM_INFINITY:
        return False
    return any(file.is_file() and file.stat().st_size >= limit for file in written)


PROBE_BYTES = 1 << 16  # a small file written to see whether the disk takes any more (`_small_write_fault`)


def _small_write_fault(folder: Path) -> OSError | None:
    """The disk-full or quota error (`_DISK_FULL`) with which a small file cannot be written in `folder` now, with the
    failed write's file still there; else None. A quota used up leaves the disk's free space as it was."""
    try:
        with tempfile.TemporaryFile(dir=folder) as probe:
            probe.write(b"\0" * PROBE_BYTES)
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as exc:
        return exc if exc.errno in _DISK_FULL else None
    return None


def write_advice(exc: BaseException, otherwise: str) -> str:
    """What to do about a failed write `exc`: a full disk, a disk quota used up and a file over a size limit are said
    as such, not sent to look at the folder's permissions (`otherwise`, the advice for any other fault)."""
    code = getattr(exc, "errno", None)
    if code == errno.ENOSPC:
        return "the disk is full: free space on it, or choose an output folder on another disk"
    if code in _DISK_FULL:
        return ("your disk quota is used up (the disk is full for you): free space within it, or choose an output "
                "folder on another disk")
    if code == errno.EFBIG:
        return ("the file is larger than a file size limit allows (ulimit -f, or the file system's largest file): "
                "raise the limit, or choose an output folder on another disk")
    return otherwise


def why_no_folder(folder: Path, exc: OSError) -> str:
    """Why `folder` could not be made (`exc`, mkdir's error): a file of its name there is said so, not "File exists"."""
    return "a file of that name exists" if folder.exists() and not folder.is_dir() else exc.strerror


def make_output_dir(out_dir: str | os.PathLike) -> Path:
    """Create an output folder (and its parents) or raise a one-line DeepWMLError saying why not."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DeepWMLError(f"cannot create output folder {out} ({why_no_folder(out, exc)}); "
                           f"{write_advice(exc, 'choose another')}") from exc
    if not os.access(out, os.W_OK):
        raise DeepWMLError(f"output folder {out} is not writable; choose another")
    return out


def check_output_file(path: str | os.PathLike) -> Path:
    """Fail early, before long work, when `path` could not be written: its folder missing or not a folder."""
    path = Path(path)
    if path.is_dir():
        raise DeepWMLError(f"{path} is a folder; give a file name")
    if not path.parent.is_dir():
        what = "is not a folder" if path.parent.exists() else "does not exist; create it first"
        raise DeepWMLError(f"output folder {path.parent} {what}")
    return path


def try_lock(fd: int) -> bool | None:
    """Lock the open file `fd` for this process, without waiting: True when locked, False when another
    process holds it, None when there are no locks here (a file system without them, or neither fcntl
    nor msvcrt). POSIX: fcntl.flock; Windows: msvcrt.locking of the file's first byte. The operating
    system drops either when the file is closed or the process dies, so none is ever left held."""
    try:
        import fcntl
    except ImportError:
        fcntl = None
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        except OSError:  # a file system without locks (some network shares)
            return None
    try:
        import msvcrt
    except ImportError:
        return None
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        return True
    except PermissionError:  # EACCES: locked by another process
        return False
    except OSError:
        return None


class BeingWritten(DeepWMLError):
    """What `exclusive` raises when another process holds the lock: `deepwml segment` leaves such a case to that
    process (skipped, not failed)."""


@contextlib.contextmanager
def exclusive(lock: Path, what: str):
    """Hold an exclusive lock on the file `lock` (made, and removed after) while the block runs; a second
    process asking for it meanwhile gets a BeingWritten error at once, naming `what` (`try_lock`: on POSIX and
    Windows; where there are no locks, nothing is guarded)."""
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
        except OSError as exc:
            raise DeepWMLError(f"cannot write in {lock.parent} ({exc.strerror}); "
                               f"{write_advice(exc, 'choose a writable output folder')}") from exc
        locked = try_lock(fd)
        if locked is False:
            os.close(fd)
            raise BeingWritten(f"{what} is being written by another DeepWML process now; wait for it to finish, "
                               f"or choose another OUTDIR")
        if locked is None:  # run as without locks
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(lock)
            fd = None
            break
        try:
            held = os.path.samestat(os.fstat(fd), os.stat(lock))
        except FileNotFoundError:  # removed by the process that held it just before: lock the new one
            held = False
        if held:
            break
        os.close(fd)
    if fd is None:
        yield
        return
    try:
        yield
    finally:
        if WINDOWS:  # an open file cannot be removed there: closed (unlocked) first; one another process
            os.close(fd)  # has opened meanwhile stays, and is that process's lock
            with contextlib.suppress(OSError):
                os.unlink(lock)
        else:
            with contextlib.suppress(OSError):
                os.unlink(lock)
            os.close(fd)


REPLACE_TRIES_S = (0.05, 0.1, 0.2, 0.4, 0.8)  # Windows: the waits between tries of a rename that is refused


def _replace(tmp: Path, path: Path) -> None:
    """os.replace. On Windows a file that another program has open, or a folder holding one, cannot be renamed
    or replaced: a virus scanner or the search indexer that opens a new file for a moment refuses it briefly,
    so it is tried again for about 1.5 s; a file kept open (the summary in Excel) still fails."""
    for wait in REPLACE_TRIES_S if WINDOWS else ():
        try:
            os.replace(tmp, path)
            return
        except PermissionError:
            time.sleep(wait)
    os.replace(tmp, path)


WINDOWS_MAX_PATH = 260  # characters of a whole path, unless long paths are turned on (LongPathsEnabled)


def _long_path_hint(path: Path) -> str:
    """On Windows, for a path (with its temporary name, `temporary_prefix` and mkstemp's letters, up to 20
    characters longer) at or past the 260-character limit: a hint to add to the error. Else ""."""
    if not WINDOWS or len(os.path.abspath(path)) + 20 < WINDOWS_MAX_PATH:
        return ""
    return (f"; its path is near or past Windows' limit of {WINDOWS_MAX_PATH} characters: choose an output folder "
            f"with a shorter path, or turn on long paths in Windows (LongPathsEnabled)")


def _sync(path: Path) -> None:
    """Make `path`'s bytes reach the disk now. Without it a power cut can leave a file renamed into place but
    empty or cut short (the file system keeps the rename and writes the data later: ext4's delayed allocation),
    under its final name beside a complete report, and a rerun skips the case as done. A file system that cannot
    sync a file (some network shares and FUSE mounts say EINVAL or not supported) writes it as before; a failed
    write (EIO) is an error."""
    fd = os.open(path, os.O_RDWR | getattr(os, "O_BINARY", 0))
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in _NO_SYNC:
            raise
    finally:
        os.close(fd)


_NO_SYNC = {errno.EINVAL, getattr(errno, "ENOTSUP", errno.EINVAL), getattr(errno, "EOPNOTSUPP", errno.EINVAL)}


def _sync_folder(folder: Path) -> None:
    """Make the renames in `folder` reach the disk now (POSIX; Windows cannot open a folder, and NTFS journals
    its renames), so that they stay in the order they were made: a case's report, renamed last, never
    outlives a power cut that its mask does not."""
    if WINDOWS:
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # a file system that cannot (some network shares)
        pass
    finally:
        os.close(fd)


def write_atomically(path: str | os.PathLike, write) -> Path:
    """Call `write(tmp_path)` on a temporary name next to `path`, then put it on disk and rename it into place.

    A crash, a power cut, a full disk or a read-only folder never leaves a partial file under the final name.
    """
    path = check_output_file(path)
    try:
        tmp = _temporary_sibling(path)
    except OSError as exc:
        raise _no_temporary(path, exc) from exc
    try:
        write(tmp)
        _sync(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; outputs get the usual permissions
        _replace(tmp, path)
        _sync_folder(path.parent)
    except (OSError, RuntimeError) as raised:
        raise _write_failure(path, raised, [tmp]) from raised
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _no_temporary(path: Path, exc: OSError) -> DeepWMLError:
    """The error for a temporary file or folder that could not be made beside `path`."""
    return DeepWMLError(f"cannot write in {path.parent} ({exc.strerror}); "
                        f"{write_advice(exc, 'choose a writable output folder')}{_long_path_hint(path)}")


def _write_failure(path: Path, raised: BaseException, written: list[Path]) -> DeepWMLError:
    """The error for a write of `path` that failed with `raised` (an OSError, or ITK's RuntimeError), its files
    `written` as far as they got."""
    exc = write_fault(raised, path.parent, written)
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).strip().splitlines()[-1][:120]
    if WINDOWS and isinstance(exc, PermissionError) and path.exists():
        return DeepWMLError(f"cannot write {path} ({reason}); is it open in another program (Excel, an image "
                            f"viewer)? close it there and run again")
    hint = (windows_path_hint(path) if isinstance(exc, RuntimeError) else "") + _long_path_hint(path)
    return DeepWMLError(f"cannot write {path} ({reason}); {write_advice(exc, 'check free space and permissions')}"
                        f"{hint}")


def _write_detached(path: Path, write) -> Path:
    """A detached header (.mhd, .nhdr) and its data file, written by `write(name)`: ITK names the data file after the
    header it writes (out.zraw, out.raw.gz) and writes that name into the header, so both are written under their
    final names in a hidden temporary folder beside `path` (`temporary_leftovers` finds it), the data file put in
    place first and the header last. Written as one temporary file, the header was renamed into place naming a data
    file with the temporary name, which the next run there swept away as a leftover; on a full disk that data file,
    cut short, was left (the 1 MB of a 1 MB disk)."""
    path = check_output_file(path)
    try:
        folder = Path(tempfile.mkdtemp(prefix=temporary_prefix(path), suffix=".part", dir=path.parent))
    except OSError as exc:
        raise _no_temporary(path, exc) from exc
    try:
        header = folder / path.name
        write(header)
        written = [folder / name for name in _detached_data_files(header)] + [header]
        for file in written:
            _sync(file)
            os.chmod(file, 0o666 & ~_UMASK)
        for file in written:
            _replace(file, path.parent / file.name)
        _sync_folder(path.parent)
    except (OSError, RuntimeError) as raised:
        raise _write_failure(path, raised, list(folder.iterdir()) if folder.is_dir() else []) from raised
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return path


def write_bytes(data: bytes, path: str | os.PathLike) -> Path:
    """Write bytes (e.g. a PNG) atomically, as every output."""
    return write_atomically(path, lambda tmp: Path(tmp).write_bytes(data))


def write_image(image: sitk.Image | Volume, path: str | os.PathLike, time_axis: TimeAxis | None = None,
                geometry: NiftiGeometry | None = None, notes: str = "") -> Path:
    """Write an image, compressed; a `Volume` to NIfTI without SimpleITK. With `time_axis` (the input's,
    `read_time_axis`), a 3D image is written 4D with one time point, X, Y, Z, 1, as the input was stored.
    With `geometry` (a NIfTI input's, `read_nifti_geometry`; the image on its grid), a NIfTI file gets the
    input's own qform, sform, codes, voxel sizes and length unit, so that FSL and nibabel, which may read another
    grid from them than SimpleITK does, place it where they place the input; other formats ignore it. `notes`
    (ASCII, at most 79 characters): what the file is, in its header (`file_notes` reads it back): a NIfTI file's
    descrip, an NRRD or MetaImage file's ITK_FileNotes field."""
    if is_nifti(path) and (isinstance(image, Volume) or geometry is not None):
        level = 1 if str(path).lower().endswith(".gz") else 0
        pieces = nifti_pieces(image, compresslevel=level,
                              time=None if time_axis is None else (time_axis.origin, time_axis.spacing),
                              geometry=geometry, description=notes)

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                for piece in pieces:  # not joined first: the whole file, and its pieces, in memory at once
                    f.write(piece)

        return write_atomically(path, write)
    import SimpleITK as sitk

    if isinstance(image, Volume):
        image = image.to_sitk()
    if time_axis is not None:
        image = sitk.JoinSeries(image, time_axis.origin, time_axis.spacing if time_axis.spacing > 0 else 1.0)
    def write(tmp: Path) -> None:
        # the notes set on the image only while it is written, then its own fields back: a copy of it to set them on
        # was a copy of every voxel (SimpleITK copies an image's buffer when one of two holding it changes a field)
        earlier = image.GetMetaData(_FILE_NOTES) if notes and image.HasMetaDataKey(_FILE_NOTES) else None
        if notes:
            image.SetMetaData(_FILE_NOTES, notes)  # ITK writes it as NIfTI's descrip, NRRD's and MetaImage's ITK_FileNotes
        try:
            with itk_names(tmp, write=True) as (name,):
                sitk.WriteImage(image, name, True)
        finally:
            if earlier is not None:
                image.SetMetaData(_FILE_NOTES, earlier)
            elif notes:
                image.EraseMetaData(_FILE_NOTES)
        if is_nifti(path):
            _check_nifti_whole(tmp)

    return (_write_detached if _extension(Path(path)) in (".mhd", ".nhdr") else write_atomically)(Path(path), write)


def _check_nifti_whole(path: Path) -> None:
    """Raise OSError when the NIfTI file `path` holds less than its header announces. SimpleITK's NIfTI writer says
    a failed write (a full disk, a file size limit) only on stderr ("NWAD: wrote only 0 of ... bytes"), with no
    exception: the file cut short was renamed into place as a finished output."""
    gzipped = _gzipped(path)
    try:
        with (gzip.open if gzipped else open)(path, "rb") as f:
            head = f.read(540)
    except (OSError, EOFError, zlib.error):
        head = b""
    length = _nifti_length(head.ljust(540, b"\0"))  # a NIfTI-1 header is 348 bytes: a small image's file is shorter
    if length is None or not _file_holds(path, gzipped, length):
        raise OSError(errno.EIO, WRITTEN_SHORT)


WRITTEN_SHORT = "the image library wrote it incomplete; is the disk full?"  # its writers that raise no error on a failed write


def write_text(text: str, path: str | os.PathLike) -> Path:
    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8", errors="backslashreplace", newline="") as f:  # a non-UTF-8 file name
            f.write(text)

    return write_atomically(path, write)


# A text cell that begins with one of these is taken by Excel and LibreOffice as a formula: a series "-AX FLAIR"
# shows #NAME?, and a name made to be one ("=HYPERLINK(...)") runs as one (CSV injection, OWASP).
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
_SPREADSHEET_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")  # what a spreadsheet reads as a number


def spreadsheet_cell(value) -> str:
    """A CSV cell that a spreadsheet shows as it is: text that it would take for a formula gets a leading
    apostrophe, the guard OWASP recommends, which the spreadsheet does not show; a number (-0.7) stays a number.
    Text that begins with apostrophes before such a start gets one more, so that `plain_cell` gives it back."""
    text = "" if value is None else str(value)
    if (isinstance(value, (int, float)) or not text.lstrip("'").startswith(_FORMULA_STARTS)
            or _SPREADSHEET_NUMBER.fullmatch(text)):
        return text
    return "'" + text


def plain_cell(cell: str) -> str:
    """A cell of a CSV that DeepWML wrote, without the apostrophe `spreadsheet_cell` put before it."""
    guarded = cell.startswith("'") and cell.lstrip("'").startswith(_FORMULA_STARTS)
    return cell[1:] if guarded else cell


def csv_text(columns: Sequence[str], rows: Iterable[dict]) -> str:
    """A table's CSV text: `columns` as its header, then each row's values by column (none given or None: an empty
    cell), each through `spreadsheet_cell`; `write_csv_text` writes it. Lines end with a line feed, so the csv module
    quotes a cell holding one but not a cell holding a carriage return, at which spreadsheets and CSV readers end the
    row too: a row with such a cell has all its cells quoted (a quoted number is still read as a number)."""
    buffer = StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    quoting_all = csv.writer(buffer, lineterminator="\n", quoting=csv.QUOTE_ALL)
    writer.writerow(columns)
    for row in rows:
        cells = [spreadsheet_cell(row.get(column)) for column in columns]
        (quoting_all if any("\r" in cell for cell in cells) else writer).writerow(cells)
    return buffer.getvalue()


def write_csv_text(text: str, path: str | os.PathLike, unless_held: bool = False) -> Path:
    """Write a table's CSV text, UTF-8 behind a byte-order mark: Excel, which opens a CSV by a double-click in
    the system's code page (Windows-1252 in Western Europe), reads it as UTF-8 only so, and shows "Müller"
    rather than "MÃ¼ller". DeepWML reads its CSVs back with or without the mark (encoding utf-8-sig).
    With `unless_held`, a file that holds these very bytes already is left as it is: a table rewritten as a run
    goes on is not written, and synced to disk, a second time when nothing in it changed."""
    data = ("\ufeff" + text).encode("utf-8", "backslashreplace")  # as write_text writes it
    if unless_held:
        try:
            if Path(path).read_bytes() == data:
                return Path(path)
        except OSError:  # none yet, or unreadable: written (and any fault said) as always
            pass
    return write_bytes(data, path)


class GrowingCsv:
    """A table written again (write_csv_text: atomically) each time a row is added, so that a run killed at any
    moment leaves every row added so far and never half of one. Each row is formatted once, when added:
    formatting them all again after each case made a long run's summary.csv cost more a case the longer it ran
    (36 ms a case at 2000 cases, 84 ms at 5000, on 2 busy cores; the write itself 11-15 ms, mostly the sync)."""

    def __init__(self, columns: Sequence[str], path: str | os.PathLike):
        self.columns, self.path = columns, Path(path)
        self._lines = [csv_text(columns, [])]  # the header, then a line a row

    def add(self, row: dict) -> Path:
        """Add `row` (kept even when this write fails: the next one has it) and write the table."""
        self._lines.append(csv_text(self.columns, [row])[len(self._lines[0]):])
        return write_csv_text("".join(self._lines), self.path)  # a row more: never the file's bytes already

    def write(self) -> Path:
        """Write the table, unless the file holds it already (a run's last write, after its last row)."""
        return write_csv_text("".join(self._lines), self.path, unless_held=True)


# ---------------------------------------------------------------------------------------------
# Manifests: the CSVs listing a cohort's cases (train, evaluate, consensus, change read them alike)


def csv_delimiter(header: str, required: Sequence[str] = ()) -> str:
    """The column separator of a CSV whose first line is `header`: ',' or ';'. Excel's 'CSV UTF-8' separates columns
    with the system's list separator, ';' where the decimal separator is a comma (German, French, Dutch, Italian...
    settings). ';' where the header read with it names more of the `required` columns (a column of the user's own
    whose quoted name holds a comma: 'case;flair;mask;"notes, free"'), or as many and it holds ';' and no ','."""
    def named(delimiter: str) -> int:
        columns = {c.strip().lower() for c in next(csv.reader([header], delimiter=delimiter), [])}
        return sum(c in columns for c in required)

    by_comma, by_semicolon = named(","), named(";")
    if by_comma != by_semicolon:
        return ";" if by_semicolon > by_comma else ","
    return ";" if ";" in header and "," not in header else ","


def read_manifest_rows(path: str | os.PathLike, required: tuple[str, ...], optional: tuple[str, ...] = (),
                       example: str = "") -> list[tuple[int, dict[str, str]]]:
    """The rows of a manifest CSV as (line, row): the file's own line numbers (blank lines counted), column names
    lower case and cells stripped, rows of empty cells left out; columns separated by commas, or by semicolons where
    the header holds semicolons and no comma (Excel's 'CSV UTF-8' in a locale whose decimal separator is a comma).
    A column `center` (the American spelling) is
    read as `centre` where there is none. DeepWMLError, naming `required` and `optional` (shown in brackets),
    on a folder, a missing or unreadable file, a missing column or no case rows; `example` ends the message of
    a folder (where the user may find one)."""
    path = Path(path)
    expected = ", ".join(required + tuple(f"[{c}]" for c in optional))
    if path.is_dir():
        raise DeepWMLError(f"manifest {path} is a folder; pass the CSV file (columns {expected}){example}")
    if not path.is_file():
        raise DeepWMLError(f"manifest {path} does not exist; pass a CSV with columns {expected}")
    if is_image_file(path):  # a scan given where the manifest goes: not a CSV to save again as UTF-8
        raise DeepWMLError(f"manifest {path} is an image, not a manifest CSV; pass the CSV that lists the cases "
                           f"(columns {expected})")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            first = f.readline()
            f.seek(0)
            reader = csv.DictReader(f, delimiter=csv_delimiter(first, required))
            numbered = [(reader.line_num, row) for row in reader]
            header = [(c or "").strip().lower() for c in (reader.fieldnames or [])]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DeepWMLError(f"manifest {path} is not a readable CSV file ({exc}); save it as UTF-8 CSV "
                           f"(Excel: 'CSV UTF-8')") from exc
    missing = [c for c in required if c not in header]
    if missing:
        raise DeepWMLError(f"manifest {path} lacks column(s) {', '.join(missing)}; its header must be: "
                           f"{expected} (a first line such as '{','.join(required)}')")
    rows = []
    for line, row in numbered:
        row = {(k or "").strip().lower(): (v or "").strip() for k, v in row.items() if isinstance(v, str) or v is None}
        if any(row.values()):
            if "centre" not in row and "center" in row:
                row["centre"] = row["center"]
            rows.append((line, row))
    if not rows:
        raise DeepWMLError(f"manifest {path} lists no cases: it has its header but no case rows")
    return rows


def manifest_path(folder: str | os.PathLike, text: str) -> str:
    """A manifest's path made absolute from the manifest's folder. On macOS and Linux a relative path written with
    Windows' backslashes (data\\c0_flair.nii.gz, a manifest made on Windows) is read with slashes where only
    that exists: a backslash in a file name is rare there, a manifest carried to a Linux server common."""
    folder = Path(folder)
    found = (folder / text).resolve()
    if os.sep == "/" and "\\" in text and known_missing(found):
        slashed = (folder / text.replace("\\", "/")).resolve()
        if _found(slashed):
            return str(slashed)
    return str(found)


def known_missing(path: str | os.PathLike) -> bool:
    """Whether `path` is known not to exist. Path.exists raises where the look-up fails otherwise (a folder on the
    way the user may not search, on a share whose permissions changed; a name too long for the file system): such a
    path is not known missing, and reading it says why (the failure of its case, not the whole manifest's)."""
    try:
        return not Path(path).exists()
    except OSError:
        return False


def _found(path: str | os.PathLike) -> bool:
    """Whether `path` is known to exist (False where the look-up fails, as in `known_missing`)."""
    try:
        return Path(path).exists()
    except OSError:
        return False


def missing_paths_hint(manifest: str | os.PathLike, missing: list[str], written: list[str] | None = None,
                       read_here: int = 0) -> str:
    """Why manifest paths (made absolute by `manifest_path`) may be missing, where it can be told, as '; ...'
    (else ''): on macOS and Linux, a Windows path (D:\\cohort\\..., or a share's \\\\server\\share\\..., a manifest
    made on Windows); paths that, as written, exist from the current folder (written relative to where the command
    runs, but a manifest's relative paths are read from its own folder). `written`: the paths as the manifest has
    them, where known; one written in full is no relative path read from the wrong folder (without `written`,
    each is taken as written relative to the manifest's folder). `read_here`: how many of the manifest's relative
    paths name files from its folder; where fewer of the missing exist from the current folder, the manifest is
    written as it is read, and a file missing (a case whose segmentation failed) is just missing, even if the
    current folder holds a file of that name."""
    folder = Path(manifest).resolve().parent
    drive_or_share = r"[A-Za-z]:\\.*|\\\\[^\\/]+\\.*"  # D:\cohort\... or \\server\share\... (UNC)
    windows = [m for m in (re.search(drive_or_share, p) for p in missing) if m] if os.sep == "/" else []
    if windows:
        share = windows[0].group().startswith("\\\\")  # a UNC path: a network share as Windows names it
        return (f"; {windows[0].group()} is a Windows {'network ' * share}path (a manifest made on Windows?): write "
                f"the paths as this computer reaches the files{' (where the share is mounted here)' * share}, best "
                "relative to the manifest's folder")
    if folder == Path.cwd().resolve():
        return ""

    def as_written(path: str) -> str | None:
        try:
            return os.path.relpath(path, folder)
        except ValueError:  # Windows: on another drive than the manifest, so it was written in full
            return None

    if written is not None:  # only those written relative: one written in full names its file wherever it runs
        texts = [w for w in written if not os.path.isabs(w)]
        found = [w for w in texts if _found(w) or (os.sep == "/" and "\\" in w and _found(w.replace("\\", "/")))]
    else:
        found = [w for w in map(as_written, missing) if w is not None and _found(w)]
    if not found or len(found) < read_here:
        return ""
    return (f"; relative paths are read from the manifest's folder {folder}, not from the current folder, where "
            f"{len(found)} of them exist (e.g. {found[0]}): write them relative to the manifest's folder, or in full")


def ijk_to_lps(image: sitk.Image) -> np.ndarray:
    """The 4×4 matrix from voxel index (i, j, k) to physical LPS millimetres."""
    matrix = np.eye(4)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    matrix[:3, :3] = direction * np.array(image.GetSpacing())[None, :]
    matrix[:3, 3] = image.GetOrigin()
    return matrix


def _nrrd_vector(values) -> str:
    return "(" + ",".join(repr(float(v)) for v in values) + ")"


def write_segmentation(mask: sitk.Image, path: str | os.PathLike, name: str = "WMH",
                       color=(1.0, 0.9, 0.0)) -> Path:
    """Write a binary mask as a Slicer `.seg.nrrd` with one segment (label 1, layer 0) on the
    mask's own grid (every non-zero voxel is the segment)."""
    return write_label_segmentation(mask, path, [(1, name, color)], binary=True)


def like_image(array: np.ndarray, image) -> sitk.Image | Volume:
    """`array` (numpy k, j, i) on the grid of `image`."""
    return like(array, image.GetSpacing(), image.GetOrigin(), image.GetDirection(),
                Volume if isinstance(image, Volume) else None)


# A .seg.nrrd's label map is made and compressed this many voxels (whole slices) at a time
SEGMENTATION_SLAB_VOXELS = 1 << 24


def write_label_segmentation(labelmap_image: sitk.Image, path: str | os.PathLike,
                             segments: Sequence[tuple[int, str, tuple]], binary: bool = False) -> Path:
    """Write a label map as a Slicer `.seg.nrrd` on its own grid: one segment per (label value,
    name, RGB colour 0-1), all in layer 0 (labels not listed are written as they are but named by
    no segment; with `binary`, every non-zero voxel is label 1).

    The file is what Slicer's segmentation storage node writes: a gzip NRRD in LPS space with the
    Segmentation_* and SegmentN_* fields. It is written here directly rather than through slicerio
    and pynrrd, whose imports alone cost about 40 ms of every `deepwml segment`; slicerio and Slicer
    read it back (tested). The label map is made, measured and compressed a slab of slices at a time, never
    whole: at 1024 x 1024 x 400 voxels its copies (the mask as bool, as bytes, and a bool map of the segment,
    0.42 GB each) were the peak of the run.
    """
    array = voxels(labelmap_image)  # (k, j, i)
    if array.ndim != 3:
        raise DeepWMLError(f"a segmentation needs a 3D mask, got {array.ndim}D")
    step = max(1, SEGMENTATION_SLAB_VOXELS // max(1, array[0].size))

    def slabs():
        """(first slice, the label map's bytes) of each slab"""
        for k0 in range(0, array.shape[0], step):
            part = array[k0:k0 + step]
            yield k0, np.ascontiguousarray(part > 0).view(np.uint8) if binary else np.ascontiguousarray(part, np.uint8)

    # the slices, rows and columns where each segment lies, for its extent
    seen = [[np.zeros(n, bool) for n in array.shape] for _ in segments]
    for k0, slab in slabs():
        for (value, _, _), (k, j, i) in zip(segments, seen):
            where = slab == value
            k[k0:k0 + len(slab)] |= where.any(axis=(1, 2))
            j |= where.any(axis=(0, 2))
            i |= where.any(axis=(0, 1))
    matrix = ijk_to_lps(labelmap_image)
    fields = [
        ("type", "uint8"),
        ("dimension", "3"),
        ("space", "left-posterior-superior"),
        ("sizes", " ".join(str(n) for n in array.shape[::-1])),
        ("space directions", " ".join(_nrrd_vector(matrix[:3, axis]) for axis in range(3))),
        ("kinds", "domain domain domain"),
        ("encoding", "gzip"),
        ("space origin", _nrrd_vector(matrix[:3, 3])),
    ]
    keys = [
        ("Segmentation_MasterRepresentation", "Binary labelmap"),
        ("Segmentation_ContainedRepresentationNames", "Binary labelmap|"),
        ("Segmentation_ReferenceImageExtentOffset", "0 0 0"),
    ]
    for number, ((value, name, color), where) in enumerate(zip(segments, seen)):
        if where[0].any():
            k, j, i = (np.flatnonzero(along) for along in where)
            extent = [int(i[0]), int(i[-1]), int(j[0]), int(j[-1]), int(k[0]), int(k[-1])]
        else:
            extent = [0, -1, 0, -1, 0, -1]
        keys += [
            (f"Segment{number}_ID", name),
            (f"Segment{number}_Name", name),
            (f"Segment{number}_Color", " ".join(repr(float(c)) for c in color)),
            (f"Segment{number}_LabelValue", str(int(value))),
            (f"Segment{number}_Layer", "0"),
            (f"Segment{number}_Extent", " ".join(str(v) for v in extent)),
            (f"Segment{number}_Tags", "|"),
        ]
    header = "NRRD0005\n# Written by DeepWML\n" + "".join(f"{k}: {v}\n" for k, v in fields) \
        + "".join(f"{k}:={v}\n" for k, v in keys) + "\n"

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(header.encode("utf-8"))
            # NRRD's first axis varies fastest: numpy's (k, j, i) C order is exactly that. gzip level 1: a
            # sparse mask compresses nearly as well as at level 9, in a tenth of the time.
            for piece in gzip_pieces((memoryview(slab).cast("B") for _, slab in slabs()), 1):
                f.write(piece)

    return write_atomically(path, write)


# DeepWML's segment of the lateral ventricles (the periventricular/deep split's reference), never lesion.
VENTRICLE_SEGMENT = "Lateral ventricles"
# DeepWML's change SEG (`deepwml change --dicom-seg`: Content Label CHANGE, one segment per call, labelled with the
# call, change.LABELS) and change .seg.nrrd (`is_change_segmentation`): read as a mask, the follow-up's lesions are its FOLLOWUP_CALLS; its BASELINE_CALLS are baseline
# lesions no longer there, left out. Stable and not assessable also draw the few baseline lesions still there without a
# follow-up lesion of their own (below the follow-up's threshold, or partly outside its view), where they lay.
CHANGE_SEG_CONTENT_LABEL = "CHANGE"
FOLLOWUP_CALLS = ("stable", "new", "enlarging", "not assessable", "small new")
BASELINE_CALLS = ("gone", "small gone")
# The change label map's values (change.LABELS), and what its header says it is (`write_image`'s notes: a NIfTI
# file's descrip, an NRRD or MetaImage file's ITK_FileNotes): read as a mask, the follow-up's lesions
# (`change_map_lesions`), as its SEG and .seg.nrrd are read
CHANGE_MAP_LABELS = {1: "stable", 2: "new", 3: "enlarging", 4: "not assessable", 5: "gone", 6: "small new",
                     7: "small gone"}
CHANGE_MAP_NOTES = "DeepWML lesion change label map"
_FILE_NOTES = "ITK_FileNotes"  # ITK's key of a NIfTI descrip (read back as descrip too), NRRD's and MetaImage's own field


def _header(path: str | os.PathLike):
    """An ITK reader holding an image file's header (its information read, no voxels), None where ITK cannot read
    it (read_any says what is wrong with it)."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    try:
        with itk_names(path) as (name,):
            reader.SetFileName(name)
            reader.ReadImageInformation()
    except (RuntimeError, DeepWMLError):
        return None
    return reader


def file_notes(path: str | os.PathLike) -> str:
    """What an image file's header says it is (`write_image`'s notes: a NIfTI file's descrip, an NRRD or MetaImage
    file's ITK_FileNotes), "" where it says nothing or cannot be read (read_any says what is wrong with it)."""
    reader = _header(path) if Path(path).is_file() else None
    if reader is None:
        return ""
    for key in (_FILE_NOTES, "descrip"):
        if reader.HasMetaDataKey(key):
            return reader.GetMetaData(key).strip()
    return ""


def change_report_path(path: str | os.PathLike) -> Path | None:
    """The report of `deepwml change` beside a label image named as its label map (CASE_change.json beside
    CASE_change.nii.gz, .nrrd or .mha), where there is a file of that name; else None."""
    path = Path(path)
    match = re.fullmatch(r"(.+_change)(\.nii\.gz|\.nii|\.nrrd|\.mha)", path.name, re.IGNORECASE)
    report_path = path.parent / f"{match.group(1)}.json" if match else None
    return report_path if report_path is not None and report_path.is_file() else None


def _change_report_beside(path: Path, labels: sitk.Image) -> tuple[str, dict[int, str]] | None:
    """(why, its values' calls) where the report of `deepwml change` beside a label image (CASE_change.json beside
    CASE_change.nii.gz, .nrrd or .mha) shows the image is the change label map it wrote: the report's voxel digest
    (labels_sha256) is the image's (so a map saved again unchanged, in another format or by a tool that drops its
    header's notes, is known too), or for a report of an earlier version without one it lists the file among its
    outputs; else None."""
    report_path = change_report_path(path)
    if report_path is None:
        return None
    try:
        with open(report_path, encoding="utf-8") as f:
            report = json.load(f)
        calls = {int(value): name for value, name in report["labels"].items()}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None  # no change report
    if not calls or not set(calls.values()) <= set(FOLLOWUP_CALLS + BASELINE_CALLS):
        return None
    recorded = report.get("labels_sha256")
    if isinstance(recorded, str):
        if recorded != mask_digest(labels):
            return None  # another image, or the map edited since
        return f"its voxels are those its report {report_path.name} records (labels_sha256)", calls
    if path.name in (report.get("outputs") or []):
        return f"its report {report_path.name} lists it as the change label map", calls
    return None


def mask_digest(mask) -> str:
    """The report's `mask_sha256`: the first 24 hex digits of the SHA-256 of the mask's voxels (uint8, in the
    numpy order k, j, i) and their shape: what tells the saved mask from one edited since (add_outputs). Of the
    voxels, not the file: a mask opened and saved again unchanged (another compression, another header) is the
    same mask."""
    import hashlib

    array = np.ascontiguousarray(voxels(mask), dtype=np.uint8)
    digest = hashlib.sha256(repr(array.shape).encode("ascii"))
    digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()[:24]


def change_map_calls(path: str | os.PathLike, labels: sitk.Image) -> tuple[str, dict[int, str]] | None:
    """(what shows it, {value: call}) where the label image `labels`, read from `path`, is `deepwml change`'s label
    map: its file's header says so (CHANGE_MAP_NOTES), else its report beside it (`_change_report_beside`), and
    every value it holds is a call; else None (a rater's map of several labels, a map relabelled since)."""
    import SimpleITK as sitk

    path = Path(path)
    if file_notes(path) == CHANGE_MAP_NOTES:
        found = f"its header says so ({CHANGE_MAP_NOTES!r})", CHANGE_MAP_LABELS
    else:
        found = _change_report_beside(path, labels)
    if found is None or not set(np.unique(sitk.GetArrayViewFromImage(labels)).tolist()) - {0} <= set(found[1]):
        return None
    return found


def change_map_lesions(path: str | os.PathLike, labels: sitk.Image) -> sitk.Image:
    """A label image read from `path` (uint8) as a mask: where it is `deepwml change`'s label map
    (`change_map_calls`), its follow-up's lesions (values called FOLLOWUP_CALLS) as 0/1, the gone ones
    (BASELINE_CALLS: baseline lesions no longer there) left out, a warning saying so and what showed it is the
    change map; any other label image (a rater's map of several labels) as it is."""
    import SimpleITK as sitk

    found = change_map_calls(path, labels)
    if found is None:
        return labels
    why, calls = found
    array = sitk.GetArrayViewFromImage(labels)
    followup = [value for value, name in calls.items() if name in FOLLOWUP_CALLS]
    gone = [value for value, name in calls.items() if name in BASELINE_CALLS]
    lesion = sitk.GetImageFromArray(np.isin(array, followup).astype(np.uint8))
    lesion.CopyInformation(labels)
    left = int(np.count_nonzero(np.isin(array, gone)))
    logging.getLogger(__name__).warning(
        "%s: DeepWML's lesion change label map (%s), read as the follow-up's lesions (%s); %s left out (%d voxels: "
        "baseline lesions no longer there)", path, why, ", ".join(calls[v] for v in followup),
        ", ".join(calls[v] for v in gone), left)
    return lesion


def segment_names(path: str | os.PathLike) -> list[str]:
    """The segment names a `.seg.nrrd` header lists, in order ([] for any other file)."""
    if not str(path).lower().endswith(SEGMENTATION_EXTENSION) or not Path(path).is_file():
        return []
    reader = _header(path)
    if reader is None:
        return []  # read_any says what is wrong with it
    found = {}
    for key in reader.GetMetaDataKeys():
        match = re.fullmatch(r"Segment(\d+)_Name", key)
        if match:
            found[int(match.group(1))] = reader.GetMetaData(key)
    return [found[k] for k in sorted(found)]


def is_change_segmentation(names: Sequence[str]) -> bool:
    """Whether a segmentation's segments (`names`) are those of `deepwml change`'s CASE_change.seg.nrrd (one for
    each call, named as the calls) or of what is left of it: every segment named as a call (exactly), with a gone
    one among them or several (the .seg.nrrd edited in Slicer, a segment deleted: its gone ones still left out). A
    rater's one segment named 'new' is lesion either way. The Slicer module knows a change segmentation loaded
    back by the same rule (MRMLConversion.changeSegmentation)."""
    return bool(names) and all(n in FOLLOWUP_CALLS + BASELINE_CALLS for n in names) and (
        len(names) > 1 or names[0] in BASELINE_CALLS)


def lesion_segment_names(path: str | os.PathLike) -> list[str]:
    """The segments of a `.seg.nrrd` or a DICOM SEG (`dicom_seg_file`) read as lesion: its segments named WMH, else
    every segment but DeepWML's ventricles (a rater's segments of any names); of DeepWML's change SEG and change
    .seg.nrrd (`is_change_segmentation`) the follow-up's calls (`_lesion_numbers`); [] for any other file."""
    seg = dicom_seg_file(path)
    if seg:
        top = _seg_parts(Path(seg)).top
        segments = _seg_segments(Path(seg), top)
        return [segments[n] for n in _lesion_numbers(segments, top)[0]]
    names = segment_names(path)
    if is_change_segmentation(names):  # the follow-up's lesions, as its change SEG is read
        return [n for n in names if n in FOLLOWUP_CALLS]
    # names compared regardless of case, every segment of the name ('WMH' and 'wmh'), as the module reads them
    wmh = [n for n in names if n.lower() == "wmh"]
    return wmh or [n for n in names if n.lower() != VENTRICLE_SEGMENT.lower()]


def lesion_segments(path: str | os.PathLike) -> sitk.Image:
    """The lesion of a `.seg.nrrd` of several segments as a 0/1 mask (`lesion_segment_names`)."""
    import SimpleITK as sitk

    chosen = lesion_segment_names(path)
    names = segment_names(path)
    change = is_change_segmentation(names)
    if change:  # said as read_dicom_seg says it of the change SEG
        logging.getLogger(__name__).warning(
            "%s: DeepWML's lesion change segmentation, read as the follow-up's lesions (%s); %s left out (baseline "
            "lesions no longer there)", path, ", ".join(chosen) or "none",
            ", ".join(n for n in BASELINE_CALLS if n in names))
        if not chosen:  # only gone segments left: the follow-up has no lesion in it (as the module reads it)
            gone = read_segmentation(path, names[0])
            return sitk.Cast(gone * 0, sitk.sitkUInt8)
    if not chosen:
        raise DeepWMLError(f"{path} has no lesion segment (only {VENTRICLE_SEGMENT!r})")
    masks = [read_segmentation(path, name) for name in dict.fromkeys(chosen)]  # a name twice: read once
    union = masks[0]
    for mask in masks[1:]:
        union = sitk.Or(union, mask)
    return union


def read_segmentation(path: str | os.PathLike, segment: str | None = None) -> sitk.Image:
    """Read one segment of a `.seg.nrrd` (by name; the only or first segment when None) as a uint8 mask. Segments
    sharing the name (Slicer lets a rater name two 'lesion') are read as one."""
    import SimpleITK as sitk
    import slicerio

    # its place and voxel size as the checks of other NRRD files have them: a 'space origin' of NaN was an internal
    # error (ValueError of a library), a vector of length 0 one too (SimpleITK's 'Zero-valued spacing'), and
    # 'space directions' of NaN or 1e30 were called another voxel grid than the scan's
    fault = _nrrd_geometry_fault(Path(path), _header_fields(Path(path)))
    if fault:
        raise DeepWMLError(f"{path}: its header gives {fault}, so the header is damaged; correct it or save the "
                           "segmentation again (3D Slicer: Segmentations, Export to files)")
    try:
        segmentation = slicerio.read_segmentation(str(path))
    except Exception as exc:  # slicerio/pynrrd raise many types for a bad file
        raise DeepWMLError(f"{path} cannot be read as a Slicer segmentation ({exc})") from exc
    segments = segmentation.get("segments", [])
    if not segments:
        raise DeepWMLError(f"{path} holds no segments")
    chosen = segments[:1] if segment is None else [s for s in segments if s.get("name") == segment]
    if not chosen:
        raise DeepWMLError(f"{path} has no segment named {segment!r} (it has {[s.get('name') for s in segments]})")
    voxels = segmentation["voxels"]
    mask_ijk = np.zeros(voxels.shape[-3:], np.uint8)
    for each in chosen:
        layer = voxels[each.get("layer", 0)] if voxels.ndim == 4 else voxels
        mask_ijk[layer == each.get("labelValue", 1)] = 1
    image = sitk.GetImageFromArray(mask_ijk.transpose(2, 1, 0))
    matrix = np.asarray(segmentation["ijkToLPS"], dtype=float)
    spacing = np.linalg.norm(matrix[:3, :3], axis=0)
    spacing_ok = np.all(np.isfinite(spacing)) and spacing.min() > 0
    image.SetSpacing(spacing.tolist() if spacing_ok else [1.0] * 3)
    image.SetDirection((matrix[:3, :3] / spacing[None, :]).ravel().tolist() if spacing_ok else np.full(9, np.nan))
    image.SetOrigin(matrix[:3, 3].tolist())
    _check_placement(image, str(path), "the header is damaged; correct it or save the segmentation again (3D Slicer: "
                     "Segmentations, Export to files)")
    return image


# ---------------------------------------------------------------------------------------------
# A DICOM Segmentation (SEG) given as a mask: a rater's outline from PACS or OHIF, DeepWML's own --dicom-seg

SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
LABEL_MAP_SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.7"  # Label Map Segmentation Storage (Sup 243)
SEG_STORAGE_CLASSES = (SEGMENTATION_STORAGE, LABEL_MAP_SEGMENTATION_STORAGE)  # the SOP classes read as a mask
# SOP Class UID, Modality, Number of Frames, Rows, Columns, Bits Allocated, Segmentation Type, Maximum Fractional
# Value, Segment Sequence, and the functional groups (frame geometry, Referenced Segment Number)
_SEG_TOP = _WANTED | {0x00080016, 0x00080060, 0x00280008, 0x00280010, 0x00280011, 0x00280100, 0x00620001,
                      0x0062000E, 0x00700080}
_IMPLICIT_LITTLE, _EXPLICIT_LITTLE = "1.2.840.10008.1.2", "1.2.840.10008.1.2.1"
_SEG_MAX_SLICES = 4096  # a grid of more slices: frames a fraction of a slice apart, not a mask to read


def _is_dicom_seg_file(path: Path) -> bool:
    """Whether a file is a DICOM Segmentation (Part 10, its meta group's Media Storage SOP Class)."""
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
        if head[128:132] != b"DICM":
            return False
        meta, _ = _dataset(head, 132, len(head), True, "meta", {0x00020002})
    except (OSError, ValueError, struct.error):
        return False
    return meta.get(0x00020002, b"").decode("ascii", "replace").strip(" \0") in SEG_STORAGE_CLASSES


def dicom_seg_file(path: str | os.PathLike) -> Path | None:
    """The DICOM Segmentation a mask's path names: a DICOM file that is one (whatever its name: `rater.dcm`), or a
    folder whose only DICOM Segmentation series is one, alone or beside the images it segments (a SEG exported from
    PACS in its folder, or with its study; a folder without DICOM files of its own: the series of the folders below
    it, as `choose_dicom_series` offers them); None for anything else. A folder of several SEG series, or of a SEG
    series of several files, is refused (DeepWML reads a SEG of one file, as PACS and OHIF keep it)."""
    p = Path(path)
    try:
        if p.is_file():
            return p if _is_dicom_seg_file(p) else None
        if not p.is_dir():
            return None
    except OSError:
        return None  # read_any says why
    series = dicom_series(p)
    below = not series  # a study exported as one folder per series: the SEG may be in a folder below
    if below:
        series = [s for study in dicom_catalogue(p)[0] for s in study.series]
    segs = [s for s in series if s.modality == "SEG"]
    if not segs:  # a SEG the DICOM library's scan passes over (RLE-compressed 1-bit frames, a LABELMAP SEG): the
        # folder's own files, or without a series of its own those below it too (rater/SE300/IM0001), as above
        own = sorted(Path(current, name) for current, names in _each_folder(p, recursive=below) for name in names
                     if _looks_dicom(name) and os.path.isfile(os.path.join(current, name))
                     and _is_dicom_seg_file(Path(current, name)))
        if len(own) > 1:
            shown = ", ".join(str(f.relative_to(p)) for f in own)
            raise DeepWMLError(f"{p} holds {len(own)} DICOM Segmentation files ({shown}); "
                               "give the file of the one to read as the mask")
        return own[0] if own else None
    if len(segs) > 1:
        raise DeepWMLError(f"{p} holds {len(segs)} DICOM Segmentation series ({'; '.join(s.label() for s in segs)}); "
                           "give the file of the one to read as the mask")
    series = segs
    if len(series[0].files) != 1:
        raise DeepWMLError(f"{p} holds a DICOM Segmentation series of {len(series[0].files)} files "
                           f"({series[0].label()}); DeepWML reads a segmentation of one file: give that file")
    return Path(series[0].files[0])


def _us(value) -> int | None:
    """An unsigned short (US) value, little endian."""
    return struct.unpack_from("<H", value)[0] if isinstance(value, bytes) and len(value) >= 2 else None


def _text(value) -> str:
    return value.decode("utf-8", "replace").strip(" \0") if isinstance(value, bytes) else ""


@dataclass
class _SegFile:
    top: dict  # the top-level elements of _SEG_TOP
    pixels: bytes  # Pixel Data's value (native); b"" where encapsulated
    fragments: list | None = None  # RLE Lossless: each frame's fragment (PS3.5 A.4.2: exactly one a frame)


_RLE_LOSSLESS = "1.2.840.10008.1.2.5"
_SEG_SYNTAXES = (_IMPLICIT_LITTLE, _EXPLICIT_LITTLE, _DEFLATED_SYNTAX, _RLE_LOSSLESS)  # the ones read_dicom_seg decodes


def _fragments(data, pos: int, end: int) -> list:
    """Encapsulated Pixel Data's fragments from `pos` (its value's start): the items after the Basic Offset Table,
    up to the sequence delimiter (PS3.5 A.4). Raises ValueError where they are not."""
    items = []
    while pos + 8 <= end:
        group, element, size = struct.unpack_from("<HHI", data, pos)
        if (group, element) == (0xFFFE, 0xE0DD):
            return items[1:]  # (the first item: the Basic Offset Table, perhaps empty)
        if (group, element) != (0xFFFE, 0xE000) or size == 0xFFFFFFFF or pos + 8 + size > end:
            raise ValueError("encapsulated Pixel Data whose items are damaged or cut short")
        items.append(bytes(data[pos + 8:pos + 8 + size]))
        pos += 8 + size
    raise ValueError("encapsulated Pixel Data without its end")


def _seg_parts(path: Path) -> _SegFile:
    """A DICOM SEG's top-level elements and its Pixel Data, read by `_dataset`; DeepWMLError where it cannot be.
    Uncompressed (implicit or explicit VR little endian), deflated (its data set inflated here: zlib) or RLE
    Lossless (its frames' fragments, decoded by `_rle_frame`); other transfer syntaxes (JPEG 2000, JPEG-LS, big
    endian) are refused."""
    import mmap

    def fault(why: str) -> DeepWMLError:
        return DeepWMLError(f"{path}: the DICOM Segmentation {why}; export it again from PACS (or the viewer it was "
                            "drawn in)")

    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            meta, start = _dataset(data, 132, len(data), True, "meta", {0x00020010})
            syntax = meta.get(0x00020010, b"").decode("ascii", "replace").strip(" \0")
            if syntax not in _SEG_SYNTAXES:
                raise DeepWMLError(f"{path}: the DICOM Segmentation is stored in transfer syntax {syntax or 'unknown'} "
                                   "(compressed by JPEG 2000, JPEG-LS or another codec, or big endian), which DeepWML "
                                   "does not decode (it reads uncompressed, deflated and RLE Lossless ones); save it "
                                   "uncompressed, Explicit VR Little Endian (e.g. gdcmconv --raw)")
            if syntax == _DEFLATED_SYNTAX:  # the data set after the file meta group raw-deflated (PS3.5 A.5)
                inflater = zlib.decompressobj(-15)
                try:
                    body = inflater.decompress(data[start:])
                except zlib.error as exc:
                    raise fault(f"is deflated, and its deflated data set is damaged ({exc})") from exc
                if not inflater.eof:
                    raise fault("is deflated, and its deflated data set is cut short")
                data, start = body, 0
            explicit = syntax != _IMPLICIT_LITTLE
            top, at = _dataset(data, start, len(data), explicit, "top", _SEG_TOP)
            if at + 8 > len(data) or struct.unpack_from("<HH", data, at) != (0x7FE0, 0x0010):
                raise fault("holds no Pixel Data")
            length, begin = (struct.unpack_from("<I", data, at + 8)[0], at + 12) if explicit else \
                (struct.unpack_from("<I", data, at + 4)[0], at + 8)
            if syntax == _RLE_LOSSLESS:
                if length != 0xFFFFFFFF:
                    raise fault("is labelled RLE Lossless but holds its Pixel Data uncompressed")
                return _SegFile(top, b"", _fragments(data, begin, len(data)))
            if length == 0xFFFFFFFF:
                raise fault("holds its Pixel Data encapsulated (compressed) under an uncompressed transfer syntax")
            pixels = bytes(data[begin:begin + length])
            if len(pixels) < length:
                raise fault(f"is cut short: its Pixel Data holds {len(pixels)} of {length} bytes")
    except (OSError, ValueError, struct.error) as exc:
        raise fault(f"cannot be parsed ({exc})") from exc
    return _SegFile(top, pixels)


def _rle_segment(data: bytes, begin: int, end: int, size: int) -> bytes:
    """One RLE segment (PS3.5 G.3.1, PackBits) from data[begin:end], decoded to at most `size` bytes: a control
    byte n of 0 to 127 copies the n + 1 bytes that follow, of -127 to -1 repeats the next byte 1 - n times, -128
    does nothing; a last byte alone is padding. Raises ValueError where a run reaches past the segment."""
    out = bytearray()
    pos = begin
    while pos < end and len(out) < size:
        if pos + 1 == end:  # a segment's last byte alone: its padding to an even length (G.3.1), not a run
            break
        n = data[pos]
        if n < 128:
            if pos + 2 + n > end:
                raise ValueError("a literal run reaches past its segment")
            out += data[pos + 1:pos + 2 + n]
            pos += 2 + n
        elif n > 128:
            if pos + 1 >= end:
                raise ValueError("a repeated run reaches past its segment")
            out += data[pos + 1:pos + 2] * (257 - n)
            pos += 2
        else:
            pos += 1
    return bytes(out[:size])


def _rle_frame(fragment: bytes, plane: int, bits: int) -> np.ndarray:
    """An RLE Lossless frame (PS3.5 G: a 64-byte header of the segment count and 15 offsets, then one segment a
    byte of each pixel, the most significant first) as `plane` pixels: uint8, or uint16 for 16 bits. A 1-bit
    frame (BINARY) is stored either as its bits packed, the first pixel in the lowest bit (pydicom), or one byte a
    pixel (vtk-dicom, dcmjs): told apart by the segment's decoded length. Raises ValueError where it is damaged."""
    if len(fragment) < 64:
        raise ValueError(f"its RLE header is cut short ({len(fragment)} bytes)")
    header = struct.unpack_from("<16I", fragment)
    count, offsets = header[0], list(header[1:])
    need = 2 if bits == 16 else 1
    if count != need:
        raise ValueError(f"its RLE header gives {count} segments, not {need}")
    ends = offsets[1:count] + [len(fragment)]
    if any(not 64 <= offsets[k] <= ends[k] <= len(fragment) for k in range(count)):
        raise ValueError("its RLE header gives segment offsets outside the frame")
    if bits == 1:
        decoded = _rle_segment(fragment, offsets[0], ends[0], plane)
        if len(decoded) == plane:
            return (np.frombuffer(decoded, np.uint8) != 0).astype(np.uint8)
        if (plane + 7) // 8 <= len(decoded) <= (plane + 7) // 8 + 1:  # (and perhaps its even-length padding)
            return np.unpackbits(np.frombuffer(decoded, np.uint8), bitorder="little", count=plane)
        raise ValueError(f"it decodes to {len(decoded)} bytes, and {plane} 1-bit pixels need {(plane + 7) // 8} "
                         f"packed or {plane} unpacked")
    parts = [_rle_segment(fragment, offsets[k], ends[k], plane) for k in range(count)]
    if any(len(part) < plane for part in parts):
        raise ValueError(f"it decodes to {min(map(len, parts))} bytes of a {plane}-pixel plane")
    if bits == 8:
        return np.frombuffer(parts[0], np.uint8)
    return np.frombuffer(parts[0], np.uint8).astype(np.uint16) << 8 | np.frombuffer(parts[1], np.uint8)


def _seg_segments(path: Path, top: dict) -> dict[int, str]:
    """{Segment Number: Segment Label} of a SEG's Segment Sequence (a LABELMAP's segment 0, its background, left
    out: its pixels of value 0)."""
    segments = {}
    labelmap = _text(top.get(0x00620001)).upper() == "LABELMAP"
    for item in top.get(_SEGMENT_SEQUENCE) or []:
        number = _us(item.get(0x00620004)) if isinstance(item, dict) else None
        if number is not None and not (labelmap and number == 0):
            segments[number] = _text(item.get(0x00620005))
    if not segments:
        raise DeepWMLError(f"{path}: the DICOM Segmentation lists no segments (Segment Sequence); export it again "
                           "from PACS (or the viewer it was drawn in)")
    return segments


def _is_change_seg(segments: dict[int, str], top: dict) -> bool:
    """Whether a SEG is DeepWML's change SEG: Content Label CHANGE and every segment labelled with a call."""
    return (_text(top.get(0x00700080)).upper() == CHANGE_SEG_CONTENT_LABEL
            and all(label in FOLLOWUP_CALLS + BASELINE_CALLS for label in segments.values()))


def _lesion_numbers(segments: dict[int, str], top: dict | None = None) -> tuple[list[int], list[int] | None]:
    """The segments read as lesion, as `lesion_segment_names` chooses them, and for DeepWML's change SEG those left
    out (else None): of a change SEG (`_is_change_seg`, given its top-level elements `top`) the follow-up's calls
    (FOLLOWUP_CALLS), else those labelled WMH (any case), else every segment but DeepWML's ventricles."""
    if top is not None and _is_change_seg(segments, top):
        followup = [n for n, label in segments.items() if label in FOLLOWUP_CALLS]
        return followup, [n for n in segments if n not in followup]
    wmh = [n for n, label in segments.items() if label.lower() == "wmh"]
    return wmh or [n for n, label in segments.items() if label.lower() != VENTRICLE_SEGMENT.lower()], None


def _common_step(offsets: np.ndarray, smallest: float) -> float:
    """The slice spacing of a SEG that gives no Spacing Between Slices, from its frames' offsets along the normal
    (mm from the lowest): the largest step of which every offset is a whole multiple, the smallest step divided by
    1 to 16 (frames on slices 1, 4 and 6: steps of 3 and 2 slices, the spacing one slice), else the smallest step
    (its frames then refused as between slices)."""
    for parts in range(1, 17):
        step = smallest / parts
        index = offsets / step
        if float(np.abs(index - np.round(index)).max(initial=0.0)) * step <= _slice_tolerance_mm(step):
            return step
    return smallest


def _frame_sources(shared: dict, frames: list) -> list | None:
    """Each frame's source image as its Derivation Image Sequence names it (per frame, else shared): (Referenced SOP
    Instance UID, Referenced Frame Number or None); None unless every frame names one image, on whose very plane
    it lies (Spatial Locations Preserved not NO)."""
    found = []
    for frame in frames:
        items = frame.get(_DERIVATION_IMAGE) if isinstance(frame, dict) else None
        if not items and isinstance(shared, dict):
            items = shared.get(_DERIVATION_IMAGE)
        sources = [source for item in items or () if isinstance(item, dict)
                   for source in item.get(_SOURCE_IMAGE) or () if isinstance(source, dict)]
        if len(sources) != 1 or not _text(sources[0].get(0x00081155)):
            return None
        if _text(sources[0].get(0x0028135A)).upper() == "NO":
            return None
        number = _numbers(sources[0].get(0x00081160)) if sources[0].get(0x00081160) else None
        found.append((_text(sources[0].get(0x00081155)), int(number[0]) if number is not None and number.size else None))
    return found


def _uneven_frames_fault(offsets: np.ndarray, step: float, sources: list | None) -> str | None:
    """Why a SEG's frames off the regular grid of `step` (the mean step its Spacing Between Slices gives; `offsets`:
    each frame's, mm along the normal from the lowest, which lies on the source's first slice) are not the slices
    of an unevenly spaced source series on it, as DeepWML reads that series (UNEVEN_MAX_OFF, `_odd_steps`: each slice
    on the grid's slice nearest to it); None where they are, each frame then on its grid slice np.round(offset / step).
    `sources`: each frame's source image (`_frame_sources`): frames at one position must name one, frames at others
    others (a frame of its own between the source's slices names none, or a slice's that lies elsewhere)."""
    if sources is None:
        return "its frames do not each name the source image they lie on (Derivation Image Sequence)"
    positions, which = np.unique(np.round(offsets, 3), return_inverse=True)
    named: dict = {}
    for k, at in enumerate(which.ravel()):
        if named.setdefault(int(at), sources[k]) != sources[k]:
            return f"frames {k + 1} and another at one position name different source images"
    if len(set(named.values())) != len(named):
        return "frames at different positions name one source image"
    index = np.round(positions / step)
    off = np.abs(positions - index * step)  # at most half a slice (each frame on its nearest grid slice)
    if np.any(np.abs(off - UNEVEN_MAX_OFF * step) <= _slice_tolerance_mm(step)):  # (nearest to neither)
        return "a frame lies half a slice from two slices of the grid"
    if len(np.unique(index)) != len(index):
        return "two frames at different positions lie nearest to one slice of the grid"
    # each step between neighbouring frames against their typical (median) step, as `_check_slice_spacing` checks
    # the series' (against the mean step, a series it reads whose steps are skewed, 4 and 4.78 mm with one of 3.22,
    # would have its own SEG refused)
    steps, apart = np.diff(positions), np.diff(index)
    near = steps[apart == 1]
    if near.size and _odd_steps(near, float(np.median(near))).any():
        return "neighbouring frames lie more unevenly apart than the slices of a series DeepWML reads"
    return None


_SEG_BITS = {"BINARY": (1,), "FRACTIONAL": (8,), "LABELMAP": (8, 16)}  # Bits Allocated of each Segmentation Type


def _seg_pixels(seg: _SegFile, kind: str, bits: int, rows: int, columns: int, count: int, refuse) -> np.ndarray:
    """A SEG's frames (count, rows, columns): BINARY 0/1 (native: the frames' bits one run, the first pixel in the
    lowest bit), FRACTIONAL uint8, LABELMAP uint8 or uint16 (segment numbers); native or RLE Lossless
    (`_rle_frame`, one fragment a frame). `refuse(why)` gives the error of a damaged Pixel Data."""
    plane = rows * columns
    if seg.fragments is not None:
        if len(seg.fragments) > count:  # (PS3.5 A.4.2: "Each frame shall be encoded in one and only one Fragment")
            raise refuse(f"is RLE Lossless with {len(seg.fragments)} fragments of Pixel Data for its {count} frames: "
                         "DICOM stores each RLE frame in exactly one fragment (PS3.5 A.4.2), so a frame split over "
                         "several (as DCMTK's dcmcrle --fragment-size writes, non-standard) or a stray fragment is "
                         "not read; save it uncompressed (e.g. gdcmconv --raw, or dcmdrle) or export it again")
        if len(seg.fragments) < count:
            raise refuse(f"is RLE Lossless with {len(seg.fragments)} fragments of Pixel Data for its {count} frames "
                         "(DICOM stores each RLE frame in exactly one fragment): frames are missing, a damaged or cut "
                         "short file; export it again")
        frames = []
        for k, fragment in enumerate(seg.fragments):
            try:
                frames.append(_rle_frame(fragment, plane, bits))
            except ValueError as exc:
                raise refuse(f"has RLE Lossless frame {k + 1} damaged ({exc}); export it again") from exc
        return np.stack(frames).reshape(count, rows, columns)
    needed = (plane * count * bits + 7) // 8
    if len(seg.pixels) < needed:
        raise refuse(f"holds {len(seg.pixels)} bytes of Pixel Data, and {count} frames of {rows} x {columns} "
                     f"{kind} pixels need {needed}: a damaged file; export it again")
    if bits == 1:
        raw = np.frombuffer(seg.pixels, np.uint8, count=needed)
        return np.unpackbits(raw, bitorder="little", count=plane * count).reshape(count, rows, columns)
    return np.frombuffer(seg.pixels, "<u2" if bits == 16 else np.uint8, count=plane * count).reshape(count, rows, columns)


def _source_slices(series: DicomSeries, normal: np.ndarray) -> tuple[dict, np.ndarray] | None:
    """Each image of a DICOM series as read (`source_frames`' order: its files in slice order, or a multi-frame
    file's frames as stored) by its (SOP Instance UID, frame number or None): its slice; and each slice's own
    position along `normal` (mm). None where they are not all known."""
    if len(series.files) == 1:
        geometry = frame_geometry(series.files[0])
        uid = series.instance_uids[0] if series.instance_uids else ""
        if geometry is None or not uid or any(p is None for p in geometry[0]):
            return None
        return ({(uid, k + 1): k for k in range(len(geometry[0]))},
                np.array([np.asarray(p, float) @ normal for p in geometry[0]]))
    if (len(series.instance_uids) != len(series.files) or len(series.image_positions) != len(series.files)
            or not all(series.instance_uids) or any(p is None for p in series.image_positions)):
        return None
    # (an enhanced file a slice is named with its frame, 1)
    return ({(uid, frame): k for k, uid in enumerate(series.instance_uids) for frame in (None, 1)},
            np.array([np.asarray(p, float) @ normal for p in series.image_positions]))


# What a SEG whose frames each name their source image, but lie on no grid of their own, is to be read with: its
# frames between an unevenly spaced series' slices are placed by the images they name (read_dicom_seg)
SEG_SOURCE_ADVICE = ("its frames each name the source image they were drawn on: give the FLAIR's DICOM series with "
                     "it, as a folder (deepwml evaluate and consensus: --flair FOLDER; export, change and train: the "
                     "FLAIR; a manifest: its flair column), which places each frame on its image's slice")


def mask_source(flair) -> DicomSeries | None:
    """The DICOM series a FLAIR given as a folder is read from (the one read_image reads: choose_dicom_series, as
    export, change and train choose the series they read the FLAIR from and pass it on), for read_mask's `source`:
    a DICOM SEG's frames are placed by the images of it they name. None for a FLAIR given otherwise (a file, an
    image, None) or a folder whose series cannot be told (what is wrong with it is said where the FLAIR is read)."""
    if not isinstance(flair, (str, os.PathLike)) or not os.path.isdir(flair):
        return None
    try:
        return choose_dicom_series(flair, option=None)[0]
    except (DeepWMLError, OSError):
        return None


def read_dicom_seg(path: str | os.PathLike, source_series: DicomSeries | None = None) -> sitk.Image:
    """The lesion of a DICOM Segmentation file as a 0/1 uint8 mask on its own grid, read without a DICOM library.

    Segments: those labelled WMH (any case), else every segment but 'Lateral ventricles' (as a `.seg.nrrd`'s,
    `lesion_segment_names`; a warning where segments of several labels are joined); of DeepWML's change SEG the
    follow-up's calls, its gone ones left out (FOLLOWUP_CALLS; a warning names those left out). Pixels: BINARY, 1 bit a pixel,
    the frames' bits one run, the first pixel in the lowest bit; FRACTIONAL, 8 bits, a pixel lesion at half its
    Maximum Fractional Value or more; LABELMAP (Label Map Segmentation Storage), 8 or 16 bits, each pixel its
    segment's number (0 background), a frame a slice. Uncompressed, deflated or RLE Lossless (`_seg_pixels`). Each frame is placed by its Plane Position on a grid of the frames' shared
    orientation and Pixel Spacing, slices Spacing Between Slices apart (shared Pixel Measures), else the largest
    step of which every frame's offset is a whole multiple (`_common_step`), else one slice of its Slice Thickness; the grid spans the
    frames present (a SEG without its empty frames: `onto_grid` pads it onto the scan's), frames of lesion segments
    at one position joined. Frames off a given Spacing Between Slices' grid that lie as an unevenly spaced series'
    slices (DeepWML's own SEG of one: each frame at its source slice's position, the spacing their mean step) are
    placed as the FLAIR reader places that series' slices (`_uneven_frames_fault`: the grid slice nearest to each,
    within half a slice; warned of); with the `source_series` at hand (each frame naming one of its images), each
    such frame on its source image's slice of the grid the series is read on, refused where it does not lie at
    that image's position or names an image the series lacks (a SEG of another series). Other frames off that grid (between slices, shifted within their plane: a
    tilt) or in other orientations are refused."""
    import SimpleITK as sitk

    path = Path(path)
    seg = _seg_parts(path)
    top = seg.top

    def refuse(why: str) -> DeepWMLError:
        return DeepWMLError(f"{path}: the DICOM Segmentation {why}")

    kind = _text(top.get(0x00620001)).upper()
    rows, columns, bits = (_us(top.get(tag)) for tag in (0x00280010, 0x00280011, 0x00280100))
    if kind not in _SEG_BITS:
        raise refuse(f"is of Segmentation Type {kind or 'none given'}; DeepWML reads BINARY, FRACTIONAL and LABELMAP "
                     "segmentations: save it as one of those")
    if not rows or not columns:
        raise refuse("gives no Rows or Columns; export it again")
    if bits not in _SEG_BITS[kind]:
        raise refuse(f"is {kind} with Bits Allocated {bits} (a {kind} SEG has {' or '.join(map(str, _SEG_BITS[kind]))})"
                     "; export it again")
    segments = _seg_segments(path, top)
    beyond = [n for n in segments if kind == "LABELMAP" and n >= 1 << bits]
    if beyond:  # (read, the segment would be no pixel's value: a mask without it, or an internal error)
        raise refuse(f"is LABELMAP with {bits}-bit pixels, and lists segment {beyond[0]}, which they cannot hold "
                     f"(up to {(1 << bits) - 1}); export it again")
    lesion, left_out = _lesion_numbers(segments, top)
    if left_out is not None:  # DeepWML's change SEG: its follow-up's lesions (none where every call is a gone one)
        if left_out:
            logging.getLogger(__name__).warning(
                "%s: DeepWML's lesion change SEG, read as the follow-up's lesions (%s); %s left out (baseline lesions "
                "no longer there)", path, ", ".join(segments[n] for n in sorted(lesion)) or "none",
                ", ".join(segments[n] for n in sorted(left_out)))
    elif not lesion:
        raise refuse(f"has no lesion segment (only {VENTRICLE_SEGMENT!r})")
    shown = sorted({segments[n] for n in lesion}, key=str.lower)
    if left_out is None and len({name.lower() for name in shown}) > 1:
        logging.getLogger(__name__).warning(
            "%s: a DICOM Segmentation of several segments, none labelled WMH (%s); all of them are read as lesion. "
            "If one is not lesion, label the lesion segment WMH (it alone is read then)", path, ", ".join(shown))
    shared = (top.get(_SHARED_GROUPS) or [{}])[0]
    frames = top.get(_PER_FRAME_GROUPS) or []
    count = _numbers(top.get(0x00280008))
    if not frames or count is None or not count.size or int(count[0]) != len(frames):
        raise refuse(f"gives {len(frames)} frames' functional groups for Number of Frames "
                     f"{int(count[0]) if count is not None and count.size else 'none'}; export it again")
    geometry = _groups_geometry(shared, frames, shared_position=True)
    if geometry is None:
        raise refuse("does not give each frame's position (Plane Position Sequence), so its frames cannot be placed")
    positions, orientations, pixel_spacing = geometry
    if pixel_spacing is None or pixel_spacing.shape != (2,) or not np.all(pixel_spacing > 0):
        raise refuse("gives no Pixel Spacing (Pixel Measures), so its pixels' size is unknown")
    if any(o is None or o.shape != (6,) for o in orientations):
        raise refuse("does not give its frames' orientation (Plane Orientation Sequence)")
    cosines = np.array(orientations, float)
    if np.abs(cosines - cosines[0]).max() > 1e-4:
        odd = int(np.argmax(np.abs(cosines - cosines[0]).max(axis=1)))
        raise refuse(f"has frames in other orientations (frame {odd + 1}: "
                     f"{chr(92).join(f'{v:g}' for v in cosines[odd])}, frame 1: "
                     f"{chr(92).join(f'{v:g}' for v in cosines[0])}); DeepWML reads a SEG whose frames are slices of "
                     "one volume")
    row, column = cosines[0][:3], cosines[0][3:]
    if abs(np.linalg.norm(row) - 1) > 1e-3 or abs(np.linalg.norm(column) - 1) > 1e-3 or abs(row @ column) > 1e-3:
        raise refuse(f"gives an Image Orientation of no two perpendicular unit vectors "
                     f"({chr(92).join(f'{v:g}' for v in cosines[0])}): a damaged header")
    normal = np.cross(row, column)
    points = np.array(positions, float)
    along = points @ normal
    low = int(np.argmin(along))
    offsets = points - points[low]
    within = offsets - np.outer(offsets @ normal, normal)  # each frame's shift within the plane
    shift = float(np.abs(within @ np.stack([row, column], axis=1)).max(initial=0.0) if len(points) else 0.0)
    if shift > 0.1 * float(pixel_spacing.min()):
        odd = int(np.argmax(np.linalg.norm(within, axis=1)))
        raise refuse(f"has frames shifted within their plane against one another (frame {odd + 1} by "
                     f"{float(np.linalg.norm(within[odd])):.3g} mm: a tilted stack, or frames of several series), so "
                     "they lie on no one voxel grid")
    given = _group_value(shared, _PIXEL_MEASURES, 0x00180088)
    steps = np.diff(np.unique(np.round(along - along[low], 3)))
    if given is not None and given.size and np.isfinite(given[0]) and abs(float(given[0])) > 0:
        step, source = abs(float(given[0])), "its Spacing Between Slices"
    elif steps.size:
        step, source = _common_step(along - along[low], float(steps.min())), "its frames' positions"
    else:
        thickness = _group_value(shared, _PIXEL_MEASURES, 0x00180050)
        if thickness is None:
            thickness = _group_value(frames[0], _PIXEL_MEASURES, 0x00180050)
        if thickness is None or not thickness.size or not np.isfinite(thickness[0]) or thickness[0] <= 0:
            raise refuse("has frames at one position only and gives neither Spacing Between Slices nor Slice "
                         "Thickness, so its slices' spacing is unknown")
        step, source = float(thickness[0]), "its Slice Thickness"
    index = (along - along[low]) / step
    off = np.abs(index - np.round(index)) * step
    origin = points[low]
    if off.max() > _slice_tolerance_mm(step):
        # off the grid: the slices of an unevenly spaced series (DeepWML's own SEG of one: each frame at its source
        # slice's position, Spacing Between Slices the mean step), placed as the series is read; else between slices
        odd = int(np.argmax(off))
        named = _frame_sources(shared, frames)
        slices_of = _source_slices(source_series, normal) if source_series is not None and named else None
        if slices_of is not None and len(slices_of[1]) > 1:
            foreign = [k for k, name in enumerate(named) if name not in slices_of[0]]
            if foreign:  # a SEG of another series (or frames of one): its frames cannot be placed by this one's
                k = foreign[0]
                uid, number = named[k]
                mine = uid in {name[0] for name in slices_of[0]}
                what = (f"frame {number} of image {uid}, which the FLAIR series does not have" if mine and number
                        else f"image {uid} without a frame number, a multi-frame file of the FLAIR series" if mine
                        else f"image {uid}, which is not in the FLAIR series")
                raise refuse(f"has frames between slices, placed by the source images they name, and frame {k + 1} "
                             f"names {what} ({len(foreign)} of its {len(named)} frames name none of its images): a "
                             "segmentation of another series; give the FLAIR series it was made on, or export it "
                             "again on this series' slices")
            # the source at hand: each frame on its source image's slice of the grid the FLAIR reader builds of the
            # series (from its first slice, their mean step), where it lies at that image's own position
            at = np.array([slices_of[0][name] for name in named])
            miss = np.abs(along - slices_of[1][at])
            if miss.max() > _slice_tolerance_mm(step):
                k = int(np.argmax(miss))
                raise refuse(f"has frames between slices: frame {k + 1} lies {miss[k]:.3g} mm from the source image "
                             f"it names (image {at[k] + 1} of the FLAIR series); export it again on the scan's slices")
            own, count = slices_of[1], len(slices_of[1])
            step = abs(float(own[-1] - own[0])) / (count - 1)
            index = (at if own[-1] > own[0] else count - 1 - at).astype(float)  # counted up the normal
            origin = points[0] + normal * (float(own.min()) - along[0])  # the series' lowest slice
            why = None
        else:
            why = (_uneven_frames_fault(along - along[low], step, named)
                   if source == "its Spacing Between Slices" else "")
        if why is not None:
            # frames that each name their source image, read without it (a sparse SEG of an unevenly spaced series
            # whose lowest frame is not on the series' first slice, say): the series places each on its image's
            # slice; exporting the SEG again would give the same frames
            advice = (SEG_SOURCE_ADVICE if named and source_series is None and source == "its Spacing Between Slices"
                      else "export it again on the scan's slices")
            raise refuse(f"has frames between slices: frame {odd + 1} lies {index[odd]:.3g} slices from the first, on "
                         f"slices {step:.4g} mm apart ({source}); its frames lie on no one voxel grid"
                         + (f" (nor are they an unevenly spaced series' slices: {why})" if why else "")
                         + f": {advice}")
        logging.getLogger(__name__).warning(
            "%s: the DICOM Segmentation's frames lie on an unevenly spaced series' slices (frame %d %.2f mm from its "
            "place on the regular grid of their mean step, %.4g mm); each is placed on that grid as DeepWML reads the "
            "series", path, odd + 1, off[odd], step)
    index = np.round(index).astype(int)
    slices = int(index.max()) + 1
    if slices > _SEG_MAX_SLICES:
        raise refuse(f"spans {slices} slices {step:.4g} mm apart ({source}): frames a fraction of a slice apart")
    numbers = []
    for frame in frames if kind != "LABELMAP" else ():  # (a LABELMAP frame's pixels are segment numbers)
        items = frame.get(_SEGMENT_IDENTIFICATION) if isinstance(frame, dict) else None
        if not items:
            items = shared.get(_SEGMENT_IDENTIFICATION) if isinstance(shared, dict) else None
        value = _us(items[0].get(0x0062000B)) if items and isinstance(items[0], dict) else None
        if value is None and len(segments) == 1:
            value = next(iter(segments))
        if value not in segments:
            raise refuse(f"gives frame {len(numbers) + 1} the segment number {value}, which its Segment Sequence does "
                         f"not list ({', '.join(map(str, sorted(segments)))})")
        numbers.append(value)
    raw = _seg_pixels(seg, kind, bits, rows, columns, len(frames), refuse)
    if kind == "FRACTIONAL":
        maximum = _us(top.get(0x0062000E))
        if not maximum:
            raise refuse("is FRACTIONAL but gives no Maximum Fractional Value; export it again")
        # a voxel is lesion where its fraction (probability or occupancy) is one half or more
        pixels = raw.astype(np.uint16) * 2 >= maximum
    elif kind == "LABELMAP":  # each frame a slice of every segment: lesion where its value is a lesion segment's
        pixels = np.isin(raw, np.array(lesion, raw.dtype))
    else:
        pixels = raw
    array = np.zeros((slices, rows, columns), np.uint8)
    chosen = set(lesion)
    for k, at in enumerate(index):
        if kind == "LABELMAP" or numbers[k] in chosen:
            array[at] |= pixels[k].astype(np.uint8)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((float(pixel_spacing[1]), float(pixel_spacing[0]), step))
    image.SetDirection(np.column_stack([row, column, normal]).ravel().tolist())
    image.SetOrigin(origin.tolist())
    _check_placement(image, str(path), "the header is damaged; export the segmentation again")
    return image


# ---------------------------------------------------------------------------------------------
# Canonical axial slices


def axial_axis(image: sitk.Image) -> int:
    """The voxel axis (0, 1, 2 in SimpleITK order) most aligned with physical superior."""
    direction = np.array(image.GetDirection()).reshape(3, 3)
    return int(np.argmax(np.abs(direction[2, :])))


def acquisition_axis(image: sitk.Image) -> int:
    """The slice (acquisition) axis: the axis whose spacing stands apart from the other two, which is
    the thickest for a thick-slice scan (0.9 x 0.9 x 5 mm) and the thinnest for slices thinner than
    their pixels (1 x 1 x 0.8 mm); for (near-)isotropic volumes, the axial axis."""
    spacing = np.array(image.GetSpacing())
    if _near_isotropic(image):
        return axial_axis(image)
    order = np.argsort(spacing, kind="stable")
    thin, middle, thick = spacing[order]
    return int(order[2] if thick / middle >= middle / thin else order[0])


def _near_isotropic(image: sitk.Image) -> bool:
    spacing = image.GetSpacing()
    # With the tolerance of equal spacings: NIfTI stores 1.2 mm as 1.2000000477, which a 1 x 1 x 1.2 mm scan
    # saved as NRRD or MetaImage is not.
    return max(spacing) <= NEAR_ISOTROPIC * min(spacing) * (1 + _SPACING_RTOL)


def acquisition_plane(image: sitk.Image) -> str:
    """'axial', 'coronal' or 'sagittal': the plane of the acquired slices, from the geometry; ISOTROPIC for a
    (near-)isotropic volume, whose voxels do not tell how it was acquired: a 1 mm sagittal 3D FLAIR was called
    axial (segmented on its axial planes all the same, see `acquisition_axis`)."""
    if _near_isotropic(image):
        return ISOTROPIC
    direction = np.array(image.GetDirection()).reshape(3, 3)
    return _PLANE_NAMES[int(np.argmax(np.abs(direction[:, acquisition_axis(image)])))]


@dataclass(frozen=True)
class SliceFrame:
    """How an axial stack maps back onto the voxel grid of the image it came from."""

    size: tuple
    spacing: tuple
    origin: tuple
    direction: tuple
    slice_axis: int  # SimpleITK axis index of the slices
    row_axis: int
    col_axis: int
    flip_row: bool
    flip_col: bool
    kind: type | None = None  # Volume when the stack came from one; None: SimpleITK.Image

    @property
    def slice_thickness_mm(self) -> float:
        return float(self.spacing[self.slice_axis])

    @property
    def row_spacing_mm(self) -> float:
        return float(self.spacing[self.row_axis])

    @property
    def col_spacing_mm(self) -> float:
        return float(self.spacing[self.col_axis])

    @property
    def pixel_area_mm2(self) -> float:
        return self.row_spacing_mm * self.col_spacing_mm

    @property
    def inferior_first(self) -> bool:
        """Whether the stack's slices run inferior to superior (the slice axis points up), as most files store them."""
        return self.direction[6 + self.slice_axis] >= 0

    @property
    def n_slices(self) -> int:
        return int(self.size[self.slice_axis])

    @property
    def _numpy_axes(self) -> tuple:
        # GetArrayFromImage orders numpy axes (k, j, i): SimpleITK axis s is numpy axis 2 - s.
        return (2 - self.slice_axis, 2 - self.row_axis, 2 - self.col_axis)


def slice_frame(image: sitk.Image) -> SliceFrame:
    direction = np.array(image.GetDirection()).reshape(3, 3)
    s = axial_axis(image)
    a, b = [ax for ax in range(3) if ax != s]
    # Columns run towards patient left (+x in LPS), rows towards posterior (+y): the usual
    # radiological view, whatever order the file stores its axes in.
    col = a if abs(direction[0, a]) >= abs(direction[0, b]) else b
    row = b if col == a else a
    return SliceFrame(
        size=tuple(image.GetSize()),
        spacing=tuple(image.GetSpacing()),
        origin=tuple(image.GetOrigin()),
        direction=tuple(image.GetDirection()),
        slice_axis=s,
        row_axis=row,
        col_axis=col,
        flip_row=bool(direction[1, row] < 0),
        flip_col=bool(direction[0, col] < 0),
        kind=Volume if isinstance(image, Volume) else None,
    )


def axial_view(image: sitk.Image, frame: SliceFrame | None = None) -> np.ndarray:
    """The image's voxels as [slice, row, col] like `to_axial_stack`, but a read-only view of them (no
    copy; valid while the image lives), for measuring without a second copy of the volume."""
    frame = frame or slice_frame(image)
    stack = np.transpose(voxels(image), frame._numpy_axes)
    if frame.flip_row:
        stack = stack[:, ::-1, :]
    if frame.flip_col:
        stack = stack[:, :, ::-1]
    view = stack.view()
    view.flags.writeable = False
    return view


def blank_map(frame: SliceFrame):
    """A float32 image of zeros on `frame`'s grid, of its kind (a Volume or SimpleITK's), for `put_axial_slices` to
    fill: SimpleITK makes an image's voxels only as a copy of numpy's, so a map made whole in numpy and then made an
    image was held twice at once (4 bytes a voxel more, at the peak of a SimpleITK scan's post-processing). A
    Volume's zeros are numpy's, whose pages come on first write; SimpleITK writes its zeros."""
    if frame.kind is Volume:
        return Volume(np.zeros(frame.size[::-1], np.float32), frame.spacing, frame.origin, frame.direction)
    import SimpleITK as sitk

    image = sitk.Image(frame.size, sitk.sitkFloat32)
    image.SetSpacing(frame.spacing)
    image.SetOrigin(frame.origin)
    image.SetDirection(frame.direction)
    return image


def put_axial_slices(image, frame: SliceFrame, slices: np.ndarray, values: np.ndarray) -> None:
    """Write `values` ([slice, row, col], as `to_axial_stack` gives them) as the axial slices numbered `slices`
    (ascending) of `image`, a `blank_map` of `frame`, in place: a Volume's numpy voxels, or SimpleITK's through its
    paste in place (`image[...] = piece`), a run of consecutive slices at a time."""
    if frame.flip_row:
        values = values[:, ::-1, :]
    if frame.flip_col:
        values = values[:, :, ::-1]
    values = np.transpose(values, np.argsort(frame._numpy_axes))  # numpy's (k, j, i)
    if frame.kind is not Volume:
        import SimpleITK as sitk
    axis = frame._numpy_axes[0]
    starts = np.flatnonzero(np.diff(slices, prepend=-2) != 1)
    for start, stop in zip(starts, list(starts[1:]) + [len(slices)]):
        where = [slice(None)] * 3
        where[axis] = slice(int(slices[start]), int(slices[start]) + int(stop - start))
        piece = [slice(None)] * 3
        piece[axis] = slice(int(start), int(stop))
        if frame.kind is Volume:
            image.array[tuple(where)] = values[tuple(piece)]
        else:  # SimpleITK's (i, j, k) are numpy's axes reversed
            image[tuple(where[::-1])] = sitk.GetImageFromArray(np.ascontiguousarray(values[tuple(piece)]))


def axial_positions(image: sitk.Image, frame: SliceFrame | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where the image's nonzero voxels lie in `axial_view`'s [slice, row, col] (index arrays), in the order of
    the image's own voxels (np.flatnonzero of `voxels(image)`), without a stack of the volume."""
    frame = frame or slice_frame(image)
    array = voxels(image)
    position = np.nonzero(array)  # in the voxels' order, as np.flatnonzero's
    axes = frame._numpy_axes
    place, row, col = (position[axis] for axis in axes)
    if frame.flip_row:
        row = array.shape[axes[1]] - 1 - row
    if frame.flip_col:
        col = array.shape[axes[2]] - 1 - col
    return place, row, col


def to_axial_stack(image: sitk.Image, dtype=np.float32, copy: bool = True) -> tuple[np.ndarray, SliceFrame]:
    """The image as [slice, row, col] with radiological in-plane orientation (no interpolation). With
    `copy=False`, voxels that already have `dtype` come back as `axial_view` gives them: a read-only view,
    valid while the image lives, not a second copy of the volume (1.6 GB for 1024 x 1024 x 400 voxels)."""
    frame = slice_frame(image)
    array = voxels(image)
    stack = axial_view(image, frame)
    if not copy and stack.dtype == np.dtype(dtype):
        return stack, frame
    out = np.ascontiguousarray(stack, dtype=dtype)
    return (out.copy() if np.shares_memory(out, array) else out), frame  # never a view of the image


def from_axial_stack(stack: np.ndarray, frame: SliceFrame, reuse: bool = False) -> sitk.Image:
    """Put an axial stack back on the exact voxel grid it came from.

    With `reuse` the caller gives the stack up: where the file stores its voxels as the stack has them but for
    flipped rows or columns (a NIfTI file of axial slices: its x and y run against LPS), they are flipped in
    the stack's own buffer, a slice at a time, and a Volume's image holds that buffer, not a copy of it (1.6 GB
    for a float32 map of 1024 x 1024 x 400 voxels). `axial_view` of the image then reads it as the stack."""
    expected = (frame.n_slices, frame.size[frame.row_axis], frame.size[frame.col_axis])
    if tuple(stack.shape) != expected:
        raise ValueError(f"stack shape {stack.shape} does not match the frame {expected}")
    if reuse and frame._numpy_axes == (0, 1, 2) and stack.flags.c_contiguous and stack.flags.writeable:
        flip = (slice(None, None, -1 if frame.flip_row else 1), slice(None, None, -1 if frame.flip_col else 1))
        if frame.flip_row or frame.flip_col:
            for plane in stack:
                # a plane of zero bytes is its own flip: left unwritten, it holds no memory (the slices outside the head:
                # predict_maps). Its bytes, not its values: -0.0 is no zero byte.
                if plane.view(np.uint8).any():
                    plane[...] = plane[flip].copy()
        return like(stack, frame.spacing, frame.origin, frame.direction, frame.kind)
    if frame.flip_row:
        stack = stack[:, ::-1, :]
    if frame.flip_col:
        stack = stack[:, :, ::-1]
    array = np.ascontiguousarray(np.transpose(stack, np.argsort(frame._numpy_axes)))
    return like(array, frame.spacing, frame.origin, frame.direction, frame.kind)
