"""The result as a DICOM series for a PACS viewer: `deepwml segment --dicom-outline` on a DICOM input.

Radiologists read in their PACS viewer, not in Slicer. This writes the FLAIR series once more with the
lesions outlined in red, as a new series of the same study and patient, so the result can be sent to
PACS (or opened in any DICOM viewer) and read next to the original:

- one image per slice of the input: each image keeps the source slice's own position (`source_positions`;
  a multi-frame file's frames: each frame's Plane Position), orientation, pixel spacing
  (Image Plane attributes) and Instance Number, and the source's Frame of Reference, so a viewer that reads them links it to the FLAIR and scrolls the two together;
- the FLAIR in grey (the window of the QC picture: its 1st to 99.5th percentile within the head, the
  same on every slice), each lesion's in-plane outline in red (the voxels of the mask next to one
  outside it, as in `qc.py`), and "DEEPWML WMH OUTLINE - NOT FOR DIAGNOSIS" burned into the bottom left
  corner, so a picture seen on its own says what it is;
- Secondary Capture Image Storage (RGB is not allowed in the MR Image IOD), Modality copied, Image
  Type DERIVED\\SECONDARY, a new Series Instance UID and SOP Instance UIDs (under the 2.25 root, from
  random UUIDs), Series Number the source's + 1000 (- 1000 where + 1000 would pass the largest IS,
  2147483647; `deepwml change`'s + 3000: dicom_seg.py lists every output's), Series Description "DeepWML WMH outline" with the source's, and a Derivation Description
  naming DeepWML's version, the models' checksums, the volume and lesion count;
- patient and study attributes copied from the source's first image (COPIED: name, ID, birth date, sex,
  age, study UID, date, time, ID, accession number, referring physician, study description...), text
  read in the source's character set (`io.header_value`) and written as UTF-8 (Specific Character Set
  ISO_IR 192), nothing changed but the padding; those the source leaves empty or out are written empty
  (Type 2), never made up. A character set that cannot be read, or no Study Instance UID, is refused;
- Burned In Annotation NO (the caption names neither the patient nor the date), YES where the source's
  says its pixels, shown in the outline, do.

Nothing from the source's private tags, and no other attribute, is copied. The outline is for reading
the result, not a measurement: the mask files and the report are the result.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import io, qc
from .volume import voxels
from .errors import DeepWMLError
from .report import lesion_count_text

SECONDARY_CAPTURE = io.SECONDARY_CAPTURE_CLASS  # Secondary Capture Image Storage
SERIES_NUMBER_OFFSET = 1000
CHANGE_SERIES_NUMBER_OFFSET = 3000  # `deepwml change --dicom-outline`'s (dicom_seg.py lists them all)
_LARGEST_IS = 2**31 - 1  # the VR IS range: a Series Number past it is refused by a PACS that checks
CAPTION = "DEEPWML WMH OUTLINE - NOT FOR DIAGNOSIS"
MAKER = "DeepWML"  # every image's Secondary Capture Device Manufacturer: with its SOP Class, how DeepWML knows its own
FILE_PATTERN = "IM{:05d}.dcm"
# Attributes of the patient and the study copied from the source (and its Burned In Annotation, for the outline's):
# (tag, is text in the source's character set, written empty when the source lacks it: the IOD's Type 2, which GDCM
# would otherwise fill with today's date)
COPIED = (
    ("0010|0010", True, True), ("0010|0020", True, True), ("0010|0021", True, False), ("0010|0030", False, True),
    ("0010|0040", False, True), ("0010|1010", False, False), ("0020|000d", False, False), ("0008|0020", False, True),
    ("0008|0030", False, True), ("0020|0010", True, True), ("0008|0050", True, True), ("0008|0090", True, True),
    ("0008|1030", True, False), ("0020|0052", False, False), ("0008|0060", False, False), ("0018|0015", True, False),
    ("0018|0050", False, False), ("0028|0301", False, False),
)
_LONG_STRING = 64  # the VR LO limit (Series Description)


def new_uid() -> str:
    """A DICOM UID under the 2.25 root (ISO/IEC 9834-8: the decimal value of a random UUID)."""
    return f"2.25.{uuid.uuid4().int}"


def _decimal(value: float) -> str:
    """A DS value: at most 16 characters."""
    for digits in (12, 10, 8, 6):
        text = f"{value:.{digits}g}"
        if len(text) <= 16:
            return text
    return f"{value:.4e}"


def series_number(series: io.DicomSeries, offset: int) -> int:
    """A new series' Series Number: the source's + `offset` (- `offset` where + would pass the largest IS,
    2147483647: still next to the source's in PACS, never the same)."""
    number = (series.number or 0) + offset
    return number if number <= _LARGEST_IS else series.number - offset


def series_description(title: str, series: io.DicomSeries) -> str:
    """A new series' Series Description: `title` with the source's in brackets, one LO value (a backslash would
    split it in two), cut to 64 characters."""
    description = title + (f" ({series.description})" if series.description else "")
    description = description.replace("\\", "/")
    if len(description) > _LONG_STRING:
        description = description[:_LONG_STRING - 2] + "~)"
    return description


def _reader(path: str, what: str = "outline series"):
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    try:
        with io.itk_names(path) as (name,):
            reader.SetFileName(name)
            reader.ReadImageInformation()
    except RuntimeError as exc:
        raise DeepWMLError(f"{path}: its DICOM header cannot be read for the {what} "
                           f"({str(exc).strip().splitlines()[-1][:120]})") from exc
    return reader


def source_attributes(series: io.DicomSeries, option: str = "--dicom-outline") -> dict[str, str]:
    """The copied patient and study attributes of a series' first image, as text (see COPIED): decoded in
    the series' character set, padding stripped, nothing else changed. Refused (DeepWMLError) when the
    series has no Study Instance UID, or names in a character set DeepWML cannot read (the patient's name
    would be written wrong, and a PACS might file the series under another patient). `option`: the option
    that asked for the new series, which the refusal names (the outline's, or --dicom-seg's)."""
    what = "outline series" if option == "--dicom-outline" else "DICOM SEG"
    reader = _reader(series.files[0], what)
    charset = reader.GetMetaData("0008|0005") if reader.HasMetaDataKey("0008|0005") else ""
    found = {}
    for tag, is_text, type2 in COPIED:
        if reader.HasMetaDataKey(tag):
            raw = reader.GetMetaData(tag)
            value = io.header_value(raw, charset) if is_text else raw.strip(" \0")
            if value is None:
                raise DeepWMLError(f"the FLAIR series' character set ({charset.strip()!r}) is not one DeepWML can "
                                   f"read, so the {what} would carry the patient's name wrongly; rerun "
                                   f"without {option}")
            if value or type2:
                found[tag] = value
        elif type2:
            found[tag] = ""
    if not found.get("0020|000d"):
        raise DeepWMLError(f"the FLAIR series has no Study Instance UID, so the {what} cannot join its study; "
                           f"rerun without {option}")
    return found


def source_instance_numbers(series: io.DicomSeries, slices: int) -> list[int]:
    """The source's Instance Number of each slice in the order the image was read (by position), so that
    the outline series numbers its images as the FLAIR does; 1, 2, ... when the source's are missing,
    repeated, or not one per file (a multi-frame file)."""
    numbers = list(series.instance_numbers)
    if len(numbers) != slices or None in numbers or len(set(numbers)) != slices:
        return list(range(1, slices + 1))
    return numbers


def source_positions(series: io.DicomSeries, slices: int) -> list | None:
    """Each source image's own Image Position (Patient), x, y, z in mm, in the order the image was read (by
    position; as the series' scan read them): the slices of a series a little unevenly spaced are read on the
    regular grid of their mean step, yet each outline image shows its source image's pixels, imaged where that
    image says. Enhanced images keep it in their functional groups: a multi-frame file's, each frame's Plane
    Position (Patient), in the order the file stores the frames, which is the order they were read in (frames out
    of slice order are refused: io._check_frames). None where an image or a frame gives no position: the grid's
    places, then."""
    if len(series.files) == 1 and slices > 1:
        positions = _frame_positions(series.files[0])
    elif len(series.files) == slices:
        positions = [given if given is not None else next(iter(_frame_positions(file)), None)
                     for file, given in zip(series.files, series.image_positions)]
    else:
        return None
    if len(positions) != slices or None in positions:
        return None
    return [list(position) for position in positions]


def _frame_positions(file: str) -> list[tuple]:
    """Each frame's Plane Position (Patient) of an enhanced DICOM file; empty where it gives none."""
    geometry = io.frame_geometry(file)
    return [] if geometry is None else [tuple(float(v) for v in position) for position in geometry[0]]


def outline_images(image, labels, colours: dict | None = None, caption: str = CAPTION,
                   legend: list | None = None) -> np.ndarray:
    """[slice, row, column, RGB] uint8 in the image's voxel order (slices by position, as the series was
    read): the FLAIR in grey with each label's in-plane outline in its colour (`colours`: value -> RGB, in
    drawing order; default: any non-zero voxel, red) and the caption burned into the bottom left corner,
    with `legend` ((text, RGB) pairs) on the line above it when it fits."""
    flair = _array(image).astype(np.float32, copy=False)
    values = _array(labels)
    if values.shape != flair.shape:
        raise ValueError(f"labels {values.shape} and image {flair.shape} differ")
    if colours is None:
        values, colours = values > 0, {True: qc.LESION_RGB}
    _, low, high = qc.grey_levels(flair)
    grey = (np.clip(np.nan_to_num((flair - low) / (high - low), nan=0.0), 0, 1) * 255).astype(np.uint8)
    rgb = np.repeat(grey[..., None], 3, axis=3)
    for k in range(rgb.shape[0]):
        for value, colour in colours.items():
            where = values[k] == value
            if where.any():
                rgb[k][qc.in_plane_outline(where)] = colour
    rows, columns = rgb.shape[1:3]
    scale = 2 if columns >= 2 * (qc.text_width(caption, 1) + 8) else 1
    height = 5 * scale
    for text in (caption, "DEEPWML - NOT FOR DIAGNOSIS", "DEEPWML"):
        width = qc.text_width(text, scale)
        if width + 4 <= columns and height + 4 <= rows:
            y = rows - height - 2
            rgb[:, y - 1:y + height + 1, 1:width + 3] = 0
            for k in range(rgb.shape[0]):
                qc.draw_text(rgb[k], y, 2, text, qc.HEADER_RGB, scale)
            break
    lines: list = []  # the legend's entries, as many to a line as fit, the lines stacked above the caption
    for text, colour in legend or []:
        if lines and qc.text_width("  ".join(t for t, _ in lines[-1] + [(text, colour)]), scale) + 4 <= columns:
            lines[-1].append((text, colour))
        elif qc.text_width(text, scale) + 4 <= columns:
            lines.append([(text, colour)])
    for n, line in enumerate(lines, start=1):
        y = rows - (n + 1) * (height + 4) + 2
        if y < 2:
            break
        width = qc.text_width("  ".join(t for t, _ in line), scale)
        rgb[:, y - 1:y + height + 1, 1:width + 3] = 0
        for k in range(rgb.shape[0]):
            x = 2
            for text, colour in line:
                x = qc.draw_text(rgb[k], y, x, text, colour, scale) + 2 * 4 * scale
    return rgb


def _array(image) -> np.ndarray:
    return image if isinstance(image, np.ndarray) else voxels(image)  # a Volume or a SimpleITK image


def is_outline_image(path: str | os.PathLike, fresh: bool = False) -> bool:
    """Whether `path` is an image of an outline series DeepWML wrote, by its DICOM header alone (no pixels read): a
    file (not a link), Secondary Capture Image Storage by its SOP Class UID, with DeepWML as its Secondary Capture
    Device Manufacturer, as `outline_series` has written on every image since the first version: a series of any
    version's run is known, whatever its report records (the Series Instance UID) or with none (a run killed part
    way, which its journal lists by name alone). Anything else, or a file that cannot be read as DICOM, is not: a
    user's image, never deleted nor replaced.

    The checks before a file could be deleted (check_outline_folder before any work, the writer's check) read each
    header once while the file stays as it is (0.4 s a time for 200 images): the verdict is kept by the file's
    device, inode, size, modification and change times, and a file put there or changed since (any of them differs)
    is read again. `fresh` (the deletion itself, remove_outline_series): read now whatever is kept, since a file
    system may keep a rewritten file's key (FAT keeps no change time of its own: a same-size file copied over the
    image with its modification time kept, `cp -p`; an NFS client's cached attributes). Kept only for a file last changed more than io._RACY_NS (3 s) before it was read
    and not changed while it was read (io's rule for its header cache): a change within one tick of the file
    system's clock (2 s on FAT) may leave its times as they were. A file whose status changed while it was read (a
    link or another file put in its place: the reader follows links) is not DeepWML's: what was read may not be it."""
    began = io._now_ns()  # before the status, as io's rule takes it: a read however slow widens no margin
    try:
        status = os.lstat(path)
    except OSError:
        return False
    if not stat.S_ISREG(status.st_mode):  # a link (even to DeepWML's image), a folder, or not there
        return False
    key = _status_key(status)
    if not fresh and status.st_ino and key in _VERDICTS:
        return _VERDICTS[key]
    try:
        reader = _reader(str(path))
    except DeepWMLError:
        return False

    def tag(key: str) -> str:
        return reader.GetMetaData(key).strip(" \0") if reader.HasMetaDataKey(key) else ""

    verdict = tag("0008|0016") == SECONDARY_CAPTURE and tag("0018|1016") == MAKER
    if _status_key(path) != key:
        return False
    if status.st_ino and max(status.st_mtime_ns, status.st_ctime_ns) < began - io._RACY_NS:
        if len(_VERDICTS) >= _VERDICTS_KEPT:
            _VERDICTS.clear()
        _VERDICTS[key] = verdict
    return verdict


def _status_key(status) -> tuple | None:
    """A file's identity and state (device, inode, size, modification and change times) from its status, or its path's."""
    try:
        status = status if isinstance(status, os.stat_result) else os.lstat(status)
    except OSError:
        return None
    return status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns


_VERDICTS: dict = {}  # (device, inode, size, mtime, ctime) -> is_outline_image's verdict
_VERDICTS_KEPT = 20_000  # images (100 series of 200); then forgotten, all at once


# Files macOS Finder and Windows Explorer leave, hidden, in a folder opened there, by their exact names: gone with
# the series when it is replaced or removed (is_browser_litter), never said to be a user's files that block it.
BROWSER_FILES = frozenset({".DS_Store", "Thumbs.db", "desktop.ini", "ehthumbs.db"})
_APPLEDOUBLE_MAGIC = b"\x00\x05\x16\x07"  # an AppleDouble file's first bytes (macOS: ._NAME beside NAME)


def is_browser_litter(path: Path, images) -> bool:
    """Whether `path` is a plain file (not a link, not a folder) a file browser left in an outline series' folder:
    one of BROWSER_FILES, or an AppleDouble file (macOS, on a volume without its attributes: a network share, FAT,
    a copy) `._NAME` of one of the series' own images, NAME among `images` (their names) and its first bytes an
    AppleDouble file's. Any other file, a user's, is never deleted with the series."""
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return False
    except OSError:
        return False
    name = path.name
    if name in BROWSER_FILES:
        return True
    if not (name.startswith("._") and name[2:] in images and Path(name[2:]).match("IM*.dcm")):
        return False
    try:
        with open(path, "rb") as f:
            return f.read(4) == _APPLEDOUBLE_MAGIC
    except OSError:
        return False


def foreign_images(folder: str | os.PathLike) -> list[Path]:
    """The files named as an outline series' images (IM*.dcm) in `folder` that are not DeepWML's (is_outline_image)."""
    return sorted(image for image in Path(folder).glob("IM*.dcm") if not is_outline_image(image))


def refuse_foreign_images(folder: str | os.PathLike) -> None:
    """Refuse (DeepWMLError) an outline series folder holding images named as its own (IM*.dcm) that are not
    DeepWML's outline series by their headers (foreign_images): they would be deleted with the series. A folder
    that is a symbolic link is not looked into: its link alone is ever removed."""
    folder = Path(folder)
    if folder.is_symlink() or not folder.is_dir():
        return
    foreign = foreign_images(folder)
    if foreign:
        shown = ", ".join(f.name for f in foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise DeepWMLError(f"{folder} holds DICOM images that are not DeepWML's outline series ({len(foreign)}: "
                           f"{shown}; by their headers, not a Secondary Capture by DeepWML), which DeepWML never "
                           "deletes; move them elsewhere, or write into another output folder, before replacing "
                           "the series")


def refuse_unreplaceable(folder: str | os.PathLike) -> None:
    """Refuse (DeepWMLError) what stands where an outline series' folder is to be written and --overwrite would not
    replace either: images named as the series' own that are not DeepWML's (refuse_foreign_images; never deleted),
    files of other names in the folder, or a file of the folder's name. The commands say it before anything that
    advises --overwrite (an output there, a set of outputs without its report), which would only lead to it."""
    folder = Path(folder)
    refuse_foreign_images(folder)
    if folder.exists() and not folder.is_dir():
        raise DeepWMLError(f"{folder} is a file, where the outline series' folder is to be written; move it "
                           "elsewhere, or write into another output folder")
    if folder.is_dir():
        entries = list(folder.iterdir())
        images = {f.name for f in entries if f.match("IM*.dcm")}  # DeepWML's (refuse_foreign_images said others)
        others = sorted(f.name for f in entries if f.name not in images and not is_browser_litter(f, images))
        if others:
            shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
            raise DeepWMLError(f"{folder} holds files DeepWML did not write there ({len(others)}: {shown}); move "
                               "them before replacing the series")


def check_outline_folder(folder: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse, before any work, an outline folder that may not be written: one that exists (without
    `overwrite`), or what --overwrite would not replace either, said first (refuse_unreplaceable: a file of its
    name, files other than an outline series' images, images named as its own that are not DeepWML's)."""
    folder = Path(folder)
    refuse_unreplaceable(folder)  # first: a user's images are said to be such, not that --overwrite would do
    if folder.exists() and not overwrite:
        raise DeepWMLError(f"{folder} exists; remove it or rerun with --overwrite")
    return folder


@dataclass
class OutlineSeries:
    """An outline series made in memory (`outline_series`), to be written with `write_outline_series`."""

    images: list  # SimpleITK 2D RGB images, one per slice, their DICOM attributes set
    series_uid: str
    series_number: int

    def as_dict(self, folder: str) -> dict:
        """What the report records of it, written as `folder` (a name): folder, series UID and number, images."""
        return {"folder": folder, "series_uid": self.series_uid, "series_number": self.series_number,
                "images": len(self.images)}


def outline_series(image, mask, series: io.DicomSeries, report: dict, title: str = "DeepWML WMH outline",
                   derivation: str | None = None, offset: int = SERIES_NUMBER_OFFSET, **drawing) -> OutlineSeries:
    """The outline series of a segmentation (module docstring), every image and attribute made before
    anything is written, so that a failure here leaves no output behind. `report`: the segmentation's
    (its models' checksums, volume and lesion count go into the Derivation Description, unless `derivation`
    gives another). `title` begins the Series Description; `offset`: the Series Number's from the source's
    (`deepwml change`'s: CHANGE_SERIES_NUMBER_OFFSET); `drawing`: `outline_images`' colours, caption and
    legend, for a label map (`deepwml change`)."""
    import SimpleITK as sitk

    if image.GetDimension() != 3:
        raise DeepWMLError(f"the outline series needs a 3D image, got {image.GetDimension()}D")
    attributes = source_attributes(series)
    pictures = outline_images(image, mask, **drawing)
    spacing, direction = image.GetSpacing(), image.GetDirection()
    now = time.localtime()
    date, clock = time.strftime("%Y%m%d", now), time.strftime("%H%M%S", now)
    series_uid = new_uid()
    number = series_number(series, offset)
    description = series_description(title, series)
    from . import __version__

    derivation = (derivation or
                  f"WMH outlined in red by DeepWML {__version__} (models {', '.join(report.get('model_sha256') or [])}): "
                  f"{report.get('volume_ml', 0):.2f} ml, {lesion_count_text(report.get('lesion_count', 0))}. Research use, "
                  "not for diagnosis.")[:1024]
    common = {
        "0008|0060": "MR",
        **attributes,
        "0008|0005": "ISO_IR 192",
        "0008|0016": SECONDARY_CAPTURE,
        "0008|0008": "DERIVED\\SECONDARY",
        "0008|0064": "WSD",
        "0008|0021": date, "0008|0031": clock, "0008|0023": date, "0008|0033": clock,
        "0008|103e": description,
        "0008|2111": derivation,
        "0018|1016": MAKER, "0018|1019": str(__version__),
        "0020|000e": series_uid,
        "0020|0011": str(number),
        "0020|0037": "\\".join(_decimal(v) for v in (direction[0], direction[3], direction[6],
                                                     direction[1], direction[4], direction[7])),
        "0020|4000": f"{title} - not for diagnosis",
        # the caption names neither the patient nor the date, but the source's pixels, shown, may
        "0028|0301": "YES" if attributes.get("0028|0301", "").upper() == "YES" else "NO",
    }  # Pixel Spacing: GDCM writes it from the image's spacing
    numbers = source_instance_numbers(series, pictures.shape[0])
    positions = source_positions(series, pictures.shape[0])
    images = []
    for k in range(pictures.shape[0]):
        picture = sitk.GetImageFromArray(pictures[k:k + 1], isVector=True)
        position = positions[k] if positions else image.TransformIndexToPhysicalPoint((0, 0, k))
        picture.SetOrigin(position)
        picture.SetSpacing(spacing)
        picture.SetDirection(direction)
        tags = {**common, "0008|0018": new_uid(), "0020|0013": str(numbers[k]),
                "0020|0032": "\\".join(_decimal(v) for v in position)}
        for key, value in tags.items():
            picture.SetMetaData(key, value)
        images.append(picture)
    return OutlineSeries(images, series_uid, number)


def write_outline_series(prepared: OutlineSeries, folder: str | os.PathLike, overwrite: bool = False) -> dict:
    """Write an outline series into `folder`; built under a temporary name beside it and renamed, so an
    interrupted run leaves no half series under the name. An existing `folder` is refused, or with
    `overwrite` replaced once the new series is complete (`check_outline_folder`). Returns what the
    report records of it: folder, series UID and number, images."""
    import SimpleITK as sitk

    folder = check_outline_folder(folder, overwrite)
    try:
        building = Path(tempfile.mkdtemp(prefix=io.temporary_prefix(folder), suffix=".part", dir=folder.parent))
    except OSError as exc:
        raise DeepWMLError(f"cannot write in {folder.parent} ({exc.strerror}); "
                           f"{io.write_advice(exc, 'choose a writable output folder')}") from exc
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    old = None
    try:
        files = [building / FILE_PATTERN.format(k + 1) for k in range(len(prepared.images))]
        with io.itk_names(*files, write=True) as names:
            for name, picture in zip(names, prepared.images):
                writer.SetFileName(name)
                writer.Execute(picture)
        # on disk before the folder takes its name, as every other output is (io.write_atomically): a power cut
        # must not leave empty or cut-short images under the series' name beside a complete report
        for file in files:
            io._sync(file)
        io._sync_folder(building)
        os.chmod(building, 0o777 & ~io._UMASK)
        if folder.exists():  # an earlier run's, replaced: moved aside first, so the name never holds a mix
            old = Path(tempfile.mkdtemp(prefix=io.temporary_prefix(folder), suffix=".old", dir=folder.parent))
            io._replace(folder, old / folder.name)
        io._replace(building, folder)
        io._sync_folder(folder.parent)  # the rename too, before the report written next
    except (OSError, RuntimeError) as raised:
        exc = io.write_fault(raised, folder.parent)
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).strip().splitlines()[-1][:120]
        if io.WINDOWS and isinstance(exc, PermissionError):
            raise DeepWMLError(f"cannot write the outline series {folder} ({reason}); is it, or the series before it, "
                               f"open in another program (Explorer, a DICOM viewer)? close it there and run "
                               f"again") from raised
        hint = io.windows_path_hint(folder) if isinstance(exc, RuntimeError) else ""
        raise DeepWMLError(f"cannot write the outline series {folder} ({reason}); "
                           f"{io.write_advice(exc, 'check free space and permissions')}{hint}") from raised
    finally:  # also on Ctrl-C: no temporary folder stays, and an earlier series not replaced goes back
        if building.exists():
            shutil.rmtree(building, ignore_errors=True)
        if old is not None:
            if not folder.exists() and (old / folder.name).exists():
                io._replace(old / folder.name, folder)
            _remove_replaced(old, folder)
    return prepared.as_dict(folder.name)


def _remove_replaced(old: Path, folder: Path) -> None:
    """Delete the earlier series `write_outline_series` moved aside into `old` once the new one took its name: its
    images DeepWML wrote (remove_outline_series). A file put into the folder while the new series was built (after
    check_outline_folder looked) is never deleted: it is moved into the new series' folder, where it was put (under
    another name where the new series has one like it), with a warning; the folder is then refused as holding
    files not DeepWML's by the next run that would replace it. (Not left in `old`: a hidden folder, where the user
    would not look; no later run sweeps it, io.temporary_leftovers taking `.part` names alone, so where they cannot
    be moved they stay there, said.)"""
    import logging

    aside = old / folder.name
    if aside.is_dir() and not aside.is_symlink():
        remove_outline_series(aside)
        moved = []
        try:
            for left in sorted(aside.iterdir()) if aside.is_dir() else []:
                target, k = folder / left.name, 1
                while target.exists() or target.is_symlink():
                    target, k = folder / f"{left.stem}.kept{k}{left.suffix}", k + 1
                io._replace(left, target)
                moved.append(target.name)
        except OSError as exc:  # left where they are, said, never deleted
            logging.getLogger(__name__).warning(
                "files not DeepWML's were put into %s while its outline series was replaced; they could not be moved "
                "back into it (%s) and are in %s: move them elsewhere", folder, exc.strerror or exc, aside)
            return
        if moved:
            logging.getLogger(__name__).warning(
                "files not DeepWML's were put into %s while its outline series was replaced (%s); they were kept "
                "there, beside the new series: move them elsewhere", folder, ", ".join(moved))
        if aside.is_dir():
            aside.rmdir()
    shutil.rmtree(old, ignore_errors=True)


def remove_outline_series(folder: str | os.PathLike) -> None:
    """Delete an earlier run's outline series: its images (those DeepWML wrote, by their headers: is_outline_image),
    then the folder if nothing else is in it. Images named as its own that are not DeepWML's are left, with the
    folder (the commands refuse such a folder before any work: refuse_foreign_images). A folder that is a symbolic
    link (to a series elsewhere: the user's) loses the link alone, never the images it leads to."""
    folder = Path(folder)
    if folder.is_symlink():
        folder.unlink()
        return
    if not folder.is_dir():
        return
    deleted = set()
    for image in folder.glob("IM*.dcm"):
        if is_outline_image(image, fresh=True):  # read now, never a verdict kept: it is deleted on this one
            image.unlink()
            deleted.add(image.name)
    # what a file browser left there (.DS_Store, ._IM00001.dcm of an image deleted): with the series, when nothing
    # else is left; beside a file of the user's it stays, the folder theirs now
    with contextlib.suppress(OSError):
        left = list(folder.iterdir())
        if all(is_browser_litter(f, deleted) for f in left):
            for f in left:
                f.unlink()
    try:
        folder.rmdir()
    except OSError:
        pass  # something else was put there: left alone
