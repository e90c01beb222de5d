"""The result as a DICOM Segmentation object for PACS: `deepwml segment --dicom-seg` on a DICOM input.

Hospitals send segmentations to PACS as DICOM SEG (Segmentation Storage, PS3.3 A.51 and C.8.20), which PACS
viewers, OHIF and 3D Slicer (with its QuantitativeReporting extension) show as an overlay on the series it
was made from. This writes one such file per case, CASE_wmh_seg.dcm, encoded here (SimpleITK and GDCM
cannot write the functional groups; pydicom and highdicom are test dependencies only):

- a DICOM Part 10 file: preamble, "DICM", the file meta group (its group length, Explicit VR Little Endian,
  DeepWML's Implementation Class UID and version name), then the data set, Explicit VR Little Endian, its
  elements sorted by tag, every sequence and item of defined length, every value of even length (text padded
  with a space, UIDs and binary values with a NUL);
- Patient, General Study (and the patient's age) copied from the source's first image as the outline series
  copies them (`dicom_outline.source_attributes`: in the source's character set, written as UTF-8, Specific
  Character Set ISO_IR 192; those the source leaves empty or out written empty), and its Frame of Reference
  UID (a source without one is refused: the segmentation could not be placed on it); nothing else of the
  source, none of its private tags;
- a new series (Modality SEG, a new Series Instance UID, Series Number the source's + 2000, - 2000 where that
  would pass the largest IS (the series numbers below); Series Description "DeepWML WMH segmentation (<the source's>)"), DeepWML as its
  equipment (General and Enhanced General Equipment: Manufacturer and Model "DeepWML", the models' checksums
  as the Device Serial Number, DeepWML's version as Software Versions);
- one binary segment, "WMH": Segmented Property Category SCT 49755003 "Morphologically abnormal structure"
  (DICOM CID 7150), Type SCT 52988006 "Lesion" (CID 7159, which CID 7194 lists for that category), Anatomic
  Region SCT 68523003 "Cerebral white matter" (as DICOM CID 7140 codes it), algorithm AUTOMATIC "DeepWML"
  (`deepwml export`, a mask edited or drawn by hand: SEMIAUTOMATIC "DeepWML", or MANUAL without an algorithm name),
  its Recommended Display CIELab Value the red of the QC picture and the outline;
- Content Creator's Name (Type 2: the operator who made the content): for `deepwml export` the person
  `--creator` names (Family^Given), else empty, DeepWML's own results (AUTOMATIC) included: no person is made up,
  DeepWML being named as the segment's algorithm (AUTOMATIC, SEMIAUTOMATIC) or not at all (MANUAL);
- a frame on each slice of the source that holds a voxel of the mask, and on its first and last slices (empty
  there where the mask has nothing), the slices between without a voxel left out (as highdicom's default,
  `omit_empty_frames`, leaves them out; OHIF, Slicer and highdicom read such a sparse SEG, each frame placing
  itself): a SEG of no lesion is those two empty frames, still saying "looked, found
  none", and the first and last frames keep a SEG read on its own (`io.read_dicom_seg`, Spacing Between Slices
  given) on the source's very slices. The frame on slice k is the mask on the k-th slice as read, in the
  source's own rows and columns, at that slice's own Image Position (Patient)
  (`dicom_outline.source_positions`: each file's, or each frame's of an enhanced multi-frame file), each
  frame deriving from its source image (Derivation Image Sequence: the source's SOP Class and Instance UID,
  and for a multi-frame source its Referenced Frame Number), the source series and all its instances named in
  the Common Instance Reference (every instance, those of slices without a frame too); Pixel Measures (Pixel
  Spacing, Slice Thickness, Spacing Between Slices: the slices' step, so that frames on slices 0, 2 and 4
  only are still read on the source's grid) and Plane Orientation shared, Frame Content (Dimension Index
  Values: segment number, and the frame's slice among the slices that have a frame, 1, 2, ... from the
  first), Plane Position and Segment Identification per frame;
- 1 bit a pixel, the frames' bits one run, the first pixel in the lowest bit, padded with zeros to an even
  length.

`deepwml change --dicom-seg` writes the change label map the same way on the follow-up's series
(`labelled_segmentation`, change.change_seg): one binary segment per call present, numbered 1, 2, ... in the
order of their label values, each with a frame on the slices holding a voxel of its call (and segment 1's on
the first and last slices); its frames segment 1's, slice by slice, then segment 2's, ...

Series numbers: each output series of a study has its own, the source's + an offset (- it where + would pass
the largest IS), so that PACS never lists two of them under one number: `segment --dicom-outline` + 1000
(dicom_outline.SERIES_NUMBER_OFFSET), `segment --dicom-seg` + 2000 (SERIES_NUMBER_OFFSET), `change
--dicom-outline` + 3000 (dicom_outline.CHANGE_SERIES_NUMBER_OFFSET) and `change --dicom-seg` + 4000
(CHANGE_SERIES_NUMBER_OFFSET) on the follow-up's series, which `segment` may have written its own two on.
Read back as a mask (`io.read_dicom_seg`), a change SEG (Content Label CHANGE, its segments' labels the calls)
gives the follow-up's lesions: its stable, new, enlarging, not assessable and small new segments; gone and small
gone (baseline lesions no longer there) are left out, and a warning says so.

The mask files and the report remain the result; the SEG carries the same mask, to PACS.
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass

import numpy as np

from . import io
from .dicom_outline import _array, _decimal, _reader, new_uid, series_description, series_number, source_attributes
from .dicom_outline import source_positions
from .errors import DeepWMLError
from .report import lesion_count_text

SEGMENTATION_STORAGE = io.SEGMENTATION_STORAGE  # Segmentation Storage (the SOP class io reads as a mask)
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
# DeepWML's Implementation Class UID (PS3.7 D.3.3.2): a 2.25 UID made once for it from a random UUID
IMPLEMENTATION_CLASS_UID = "2.25.92185420594283948901816642640925842785"
SERIES_NUMBER_OFFSET = 2000  # beside the source in PACS, apart from the outline series' (+ 1000)
CHANGE_SERIES_NUMBER_OFFSET = 4000  # the change SEG's: apart from the WMH SEG's and both outlines' (module docstring)
TITLE = "DeepWML WMH segmentation"
FILE_SUFFIX = "_wmh_seg.dcm"
# coded concepts: (code value, coding scheme designator, code meaning)
CATEGORY = ("49755003", "SCT", "Morphologically abnormal structure")  # CID 7150 Segmentation Property Category
PROPERTY_TYPE = ("52988006", "SCT", "Lesion")  # CID 7159 Lesion Segmentation Type (CID 7194)
ANATOMIC_REGION = ("68523003", "SCT", "Cerebral white matter")  # as CID 7140 codes it
DERIVATION = ("113076", "DCM", "Segmentation")  # CID 7203 Image Derivation
PURPOSE = ("121322", "DCM", "Source image for image processing operation")  # CID 7202
# Segment Algorithm Type (0062,0008), PS3.3 C.8.20.2: DeepWML's own result AUTOMATIC; `deepwml export` writes a mask
# a person edited (SEMIAUTOMATIC) or drew (MANUAL)
ALGORITHM_TYPES = ("AUTOMATIC", "SEMIAUTOMATIC", "MANUAL")
DISPLAY_RGB = (255, 40, 40)  # qc.LESION_RGB: the red of the QC picture and the outline series

# the attributes copied from the source (`source_attributes`' tags) and their value representations
_COPIED_VR = {"0010|0010": "PN", "0010|0020": "LO", "0010|0021": "LO", "0010|0030": "DA", "0010|0040": "CS",
              "0010|1010": "AS", "0020|000d": "UI", "0008|0020": "DA", "0008|0030": "TM", "0020|0010": "SH",
              "0008|0050": "SH", "0008|0090": "PN", "0008|1030": "LO", "0020|0052": "UI", "0018|0015": "CS"}
_LONG_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "UC", "UN", "UR", "UT"}  # a 4-byte length after 2 reserved
_ITEM, _LONG_STRING, _SHORT_TEXT = 0xFFFEE000, 64, 1024


# PS3.5 6.2: a Person Name's component group holds at most 64 characters; dciodvfy takes at most 64 bytes of the whole
# value ("Length invalid for this VR = 81, expected <= 64" of 40 letters=40 letters), and written in UTF-8 (ISO_IR
# 192) a character outside ASCII takes 2-4 bytes: a name is kept to 64 bytes in all, which every reader takes
PN_BYTES = 64
PN_COMPONENTS = 5  # family^given^middle^prefix^suffix
PN_GROUPS = 3  # alphabetic=ideographic=phonetic
# no control character (Cc), no half of a UTF-16 pair (Cs: bytes that were not UTF-8, as Python decodes a command
# line typed in another encoding; they cannot be written), no line or paragraph separator (Zl, Zp)
PN_REFUSED_CATEGORIES = {"Cc": "a control character", "Cs": "bytes that are not UTF-8 text",
                         "Zl": "a line separator", "Zp": "a paragraph separator"}


def person_name(text: str) -> str:
    """`text` checked as a DICOM Person Name (PS3.5 6.2, VR PN: the name of the person who made a mask, written as
    Content Creator's Name): at most 5 components separated by ^ (family^given^middle^prefix^suffix) in each of at
    most 3 component groups separated by = (alphabetic, ideographic, phonetic), at most 64 bytes in UTF-8 in all
    (64 ASCII characters, fewer of others: `PN_BYTES`), no backslash (DICOM's value separator), no control
    character.
    Returned without the spaces around it and without trailing empty components and groups, nor the spaces ending a
    group before them (DICOM leaves them out, and pydicom reads "Doe^Jane=" back as "Doe^Jane", "Doe^Jane " as
    "Doe^Jane": the report names the person as the SEG reads);
    ValueError saying what is wrong otherwise."""
    import unicodedata

    name = str(text).strip(" ")
    if not name.strip("^= "):
        raise ValueError(f"{text!r} names no one: give the family name, then the given name, as Family^Given")
    if "\\" in name:
        raise ValueError(f"{text!r} holds a backslash, which separates DICOM values: write the name as Family^Given")
    refused = next((c for c in name if unicodedata.category(c) in PN_REFUSED_CATEGORIES), None)
    if refused is not None:
        raise ValueError(f"{text!r} holds {PN_REFUSED_CATEGORIES[unicodedata.category(refused)]} ({refused!r}), "
                         "which a Person Name may not")
    groups = name.split("=")
    if len(groups) > PN_GROUPS:
        raise ValueError(f"{text!r} has {len(groups)} component groups separated by =; a DICOM Person Name has at most "
                         f"{PN_GROUPS} (alphabetic=ideographic=phonetic)")
    for group in groups:
        if group.count("^") >= PN_COMPONENTS:
            raise ValueError(f"{group!r} has {group.count('^') + 1} components separated by ^; a DICOM Person Name has "
                             f"at most {PN_COMPONENTS} (Family^Given^Middle^Prefix^Suffix)")
    # spaces ending a group are padding a reader drops ("Doe^Jane ^" is read back as "Doe^Jane"), so they go with the
    # empty components after them
    name = "=".join(group.rstrip("^ ") for group in groups).rstrip("=")
    size = len(name.encode("utf-8"))
    if size > PN_BYTES:
        raise ValueError(f"{name!r} is {size} bytes long in UTF-8 ({len(name)} characters); a DICOM Person Name is "
                         f"written here in at most {PN_BYTES} bytes, as validators (dciodvfy) take it")
    return name


def _tag(text: str) -> int:
    group, element = text.split("|")
    return int(group, 16) << 16 | int(element, 16)


def _value(vr: str, value) -> bytes:
    """An element's value, encoded and padded to an even length."""
    if vr == "SQ":
        return b"".join(struct.pack("<2HI", 0xFFFE, 0xE000, len(item)) + item
                        for item in (encode(data_set) for data_set in value))
    if isinstance(value, bytes):
        data = value
    elif vr in ("US", "UL"):
        values = value if isinstance(value, (list, tuple)) else [value]
        data = struct.pack(f"<{len(values)}{'H' if vr == 'US' else 'I'}", *(int(v) for v in values))
    elif vr == "AT":
        data = b"".join(struct.pack("<2H", tag >> 16, tag & 0xFFFF) for tag in value)
    else:  # text: several values joined by backslashes
        data = ("\\".join(value) if isinstance(value, (list, tuple)) else str(value)).encode("utf-8")
    if len(data) % 2:
        data += b"\0" if vr in ("UI", "OB", "UN") else b" "
    return data


def encode(data_set: dict) -> bytes:
    """A data set, {tag (int): (VR, value)}, in Explicit VR Little Endian, its elements sorted by tag and every
    sequence and item of defined length. A value: bytes as they are; numbers for US, UL; tags for AT; a list
    of items (data sets) for SQ; else text, a list of texts for several values."""
    out = []
    for tag in sorted(data_set):
        vr, value = data_set[tag]
        data = _value(vr, value)
        if vr in _LONG_VRS:
            out.append(struct.pack("<2H2s2xI", tag >> 16, tag & 0xFFFF, vr.encode(), len(data)))
        else:
            if len(data) > 0xFFFF:
                raise ValueError(f"({tag >> 16:04X},{tag & 0xFFFF:04X}) {vr}: {len(data)} bytes, over 65534")
            out.append(struct.pack("<2H2sH", tag >> 16, tag & 0xFFFF, vr.encode(), len(data)))
        out.append(data)
    return b"".join(out)


def part10(data_set: dict, sop_class: str, sop_instance: str) -> bytes:
    """A DICOM Part 10 file of `data_set`: the preamble, "DICM", the file meta group, then the data set, all in
    Explicit VR Little Endian."""
    from . import __version__

    meta = encode({0x00020001: ("OB", b"\0\1"), 0x00020002: ("UI", sop_class), 0x00020003: ("UI", sop_instance),
                   0x00020010: ("UI", EXPLICIT_VR_LITTLE_ENDIAN), 0x00020012: ("UI", IMPLEMENTATION_CLASS_UID),
                   0x00020013: ("SH", f"DEEPWML_{__version__}"[:16])})
    length = encode({0x00020000: ("UL", len(meta))})
    return b"\0" * 128 + b"DICM" + length + meta + encode(data_set)


def _code(concept: tuple) -> dict:
    value, scheme, meaning = concept
    return {0x00080100: ("SH", value), 0x00080102: ("SH", scheme), 0x00080104: ("LO", meaning)}


def cielab(rgb) -> list[int]:
    """An sRGB colour as DICOM's Recommended Display CIELab Value (PS3.3 C.10.7.1.1): L*, a*, b* (D65 white),
    L* 0..100 and a*, b* -128..127 scaled to 0..65535."""
    linear = [c / 255 / 12.92 if c / 255 <= 0.04045 else ((c / 255 + 0.055) / 1.055) ** 2.4 for c in rgb]
    matrix = ((0.4124564, 0.3575761, 0.1804375), (0.2126729, 0.7151522, 0.0721750), (0.0193339, 0.1191920, 0.9503041))
    xyz = [sum(m * c for m, c in zip(row, linear)) for row in matrix]
    white = (0.95047, 1.0, 1.08883)

    def f(t: float) -> float:
        return t ** (1 / 3) if t > (6 / 29) ** 3 else t / (3 * (6 / 29) ** 2) + 4 / 29

    fx, fy, fz = (f(v / w) for v, w in zip(xyz, white))
    lightness, a, b = 116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)
    return [round(lightness * 65535 / 100), round((a + 128) * 65535 / 255), round((b + 128) * 65535 / 255)]


def source_frames(series: io.DicomSeries, slices: int) -> list[tuple[str, str, int | None]]:
    """The source image of each slice of the volume as read (slice k: the series' k-th file, or a multi-frame
    file's k-th frame as stored, as GDCM reads them and `dicom_outline.source_positions` places them): (SOP
    Class UID, SOP Instance UID, frame number, None for a file that is not multi-frame). Refused where a
    file has no SOP Instance UID or the files do not give one image a slice: the SEG could not name its
    source."""
    if len(series.files) == 1 and slices > 1:
        files = [(series.files[0], k + 1) for k in range(slices)]
    elif len(series.files) == slices:
        files = [(file, 0) for file in series.files]
    else:
        raise DeepWMLError(f"the FLAIR series' {len(series.files)} files do not hold its {slices} slices one to a file "
                           "nor all in one, so the DICOM SEG could not name each slice's image; rerun without "
                           "--dicom-seg")
    headers: dict = {}
    found = []
    for file, frame in files:
        if file not in headers:
            reader = _reader(file, "DICOM SEG")

            def tag(key: str) -> str:
                return reader.GetMetaData(key).strip(" \0") if reader.HasMetaDataKey(key) else ""

            headers[file] = (tag("0008|0016"), tag("0008|0018"), bool(tag("0028|0008")))
        sop_class, sop_instance, multi_frame = headers[file]
        if not sop_class or not sop_instance:
            raise DeepWMLError(f"{file}: no SOP {'Class' if not sop_class else 'Instance'} UID, so the DICOM SEG "
                               "could not name the image it segments; rerun without --dicom-seg")
        found.append((sop_class, sop_instance, (frame or 1) if multi_frame else None))
    return found


def checked_source(series: io.DicomSeries) -> dict:
    """The attributes a SEG copies from `series` (`dicom_outline.source_attributes`, refused as the outline refuses
    them), refused when it has no Frame of Reference UID: the SEG could not be placed on it. A check that `deepwml
    change` makes before its work, as `labelled_segmentation` makes it."""
    attributes = source_attributes(series, "--dicom-seg")
    if not attributes.get("0020|0052"):
        raise DeepWMLError("the FLAIR series has no Frame of Reference UID (0020,0052), so a DICOM SEG could not be "
                           "placed on it; rerun without --dicom-seg")
    return attributes


@dataclass(frozen=True)
class Segment:
    """One segment of a SEG (`labelled_segmentation`): the voxels of the label map equal to `value`, with its Segment
    Label (at most 64 characters), Segment Description (at most 1024), display colour (sRGB 0-255) and codes."""

    value: int
    label: str
    description: str
    rgb: tuple[int, int, int]
    category: tuple = CATEGORY
    property_type: tuple = PROPERTY_TYPE
    anatomic_region: tuple | None = ANATOMIC_REGION
    algorithm_type: str = "AUTOMATIC"  # Segment Algorithm Type: AUTOMATIC, SEMIAUTOMATIC or MANUAL (ALGORITHM_TYPES)

    def item(self, number: int) -> dict:
        """Its Segment Sequence item as segment `number`: Segment Algorithm Name "DeepWML" unless the segment is
        MANUAL (PS3.3 C.8.20.2: required, type 1C, only where the type is not MANUAL)."""
        if self.algorithm_type not in ALGORITHM_TYPES:
            raise ValueError(f"Segment Algorithm Type must be one of {', '.join(ALGORITHM_TYPES)}, got {self.algorithm_type!r}")
        item = {
            0x00620004: ("US", number), 0x00620005: ("LO", self.label[:_LONG_STRING]),
            0x00620006: ("ST", self.description[:_SHORT_TEXT]),
            0x00620008: ("CS", self.algorithm_type),
            0x0062000D: ("US", cielab(self.rgb)),
            0x00620003: ("SQ", [_code(self.category)]), 0x0062000F: ("SQ", [_code(self.property_type)]),
        }
        if self.algorithm_type != "MANUAL":
            item[0x00620009] = ("LO", "DeepWML")
        if self.anatomic_region is not None:
            item[0x00082218] = ("SQ", [_code(self.anatomic_region)])
        return item


@dataclass
class SegObject:
    """A DICOM SEG made in memory (`segmentation`, `labelled_segmentation`), to be written with `io.write_bytes`."""

    data: bytes
    series_uid: str
    sop_instance_uid: str
    series_number: int
    frames: int
    segments: dict | None = None  # {segment number: its label}, recorded for a SEG of several possible segments

    def as_dict(self, file: str) -> dict:
        """What the report records of it."""
        found = {"file": file, "series_uid": self.series_uid, "sop_instance_uid": self.sop_instance_uid,
                 "series_number": self.series_number, "frames": self.frames}
        if self.segments is not None:
            found["segments"] = {str(number): label for number, label in self.segments.items()}
        return found


def segmentation(image, mask, series: io.DicomSeries, report: dict, algorithm_type: str = "AUTOMATIC",
                 creator: str | None = None) -> SegObject:
    """The DICOM SEG of a segmentation (module docstring), made whole before anything is written, so that a
    failure here leaves no output behind. `image`: the FLAIR as read from `series`; `mask` on its grid;
    `report`: the segmentation's (its models' checksums, volume and lesion count are described). Its one segment,
    WMH, has a frame on each slice holding a voxel of the mask and on the first and last slices, an empty mask's
    those two, empty. `algorithm_type` (ALGORITHM_TYPES): AUTOMATIC, DeepWML's own result; SEMIAUTOMATIC (a
    DeepWML mask edited by hand) or MANUAL (a rater's) for `deepwml export`: then its descriptions say so, its
    Series Description "DeepWML WMH segmentation, edited" (or ", manual"), and a MANUAL segment names no algorithm.
    `creator`: the person who edited or drew the mask (`deepwml export --creator`, a DICOM Person Name checked by
    `person_name`), its Content Creator's Name; without one, that Type 2 attribute is empty (no person is made up:
    DeepWML is named as the segment's algorithm, AUTOMATIC or SEMIAUTOMATIC)."""
    from . import __version__

    models = list(report.get("model_sha256") or [])
    figures = f"{report.get('volume_ml', 0):.2f} ml, {lesion_count_text(report.get('lesion_count', 0))}"
    if algorithm_type == "AUTOMATIC":
        described = (f"White matter hyperintensities on FLAIR by DeepWML {__version__} (models {', '.join(models)}): "
                     f"{figures}. Research use, not for diagnosis.")
        title, content = TITLE, "White matter hyperintensities (DeepWML)"
    else:
        how = "edited by hand" if algorithm_type == "SEMIAUTOMATIC" else "drawn by hand"
        described = (f"White matter hyperintensities on FLAIR, {how} ({algorithm_type}), exported by DeepWML "
                     f"{__version__}: {figures}. Research use, not for diagnosis.")
        title = f"{TITLE}, {'edited' if algorithm_type == 'SEMIAUTOMATIC' else 'manual'}"
        content = f"White matter hyperintensities ({algorithm_type.lower()})"
    binary = (np.asarray(_array(mask)) > 0).astype(np.uint8)
    return labelled_segmentation(image, binary, series, [Segment(1, "WMH", described, DISPLAY_RGB,
                                                                 algorithm_type=algorithm_type)], models,
                                 title, "WMH", content,
                                 creator=person_name(creator) if creator else "")


def labelled_segmentation(image, labels, series: io.DicomSeries, segments, models, title: str, content_label: str,
                          content_description: str, offset: int = SERIES_NUMBER_OFFSET,
                          creator: str = "") -> SegObject:
    """A BINARY DICOM SEG of a label map (`labels`, a SimpleITK image or numpy k, j, i array on `image`'s grid): one
    segment per item of `segments` (`Segment`, at least one), numbered 1, 2, ... in their order, each where the
    label map equals its value, a frame on each slice of the source where it has a voxel, and segment 1's on the
    first and last slices where no segment has one (its frames those of segment 1, slice by slice, then segment
    2's, ...: Dimension Index Values (segment number, the slice's place among the slices with a frame), Segment
    Identification per frame). `offset`: the Series Number's from the source's (module docstring).
    `models`: the models' checksums (the Device Serial Number); `title`: the Series Description before the source's
    in brackets; `content_label` (CS, at most 16 characters) and `content_description`: Content Label and
    Description; `creator`: Content Creator's Name (PN, type 2: may be empty). Made whole in memory, so that a failure leaves no output behind."""
    from . import __version__

    segments = list(segments)
    if not segments:
        raise ValueError("a DICOM SEG needs at least one segment")
    if image.GetDimension() != 3:
        raise DeepWMLError(f"the DICOM SEG needs a 3D image, got {image.GetDimension()}D")
    attributes = checked_source(series)
    values = np.asarray(_array(labels))
    if values.shape != tuple(reversed(image.GetSize())):
        raise ValueError(f"mask {values.shape[::-1]} and image {image.GetSize()} differ")
    slices, rows, columns = values.shape
    frames = source_frames(series, slices)
    positions = source_positions(series, slices) or [image.TransformIndexToPhysicalPoint((0, 0, k))
                                                    for k in range(slices)]
    spacing, direction = image.GetSpacing(), image.GetDirection()
    now = time.localtime()
    date, clock = time.strftime("%Y%m%d", now), time.strftime("%H%M%S", now)
    series_uid, sop_uid, organisation = new_uid(), new_uid(), new_uid()
    number = series_number(series, offset)
    data_set = {_tag(tag): (_COPIED_VR[tag], value) for tag, value in attributes.items() if tag in _COPIED_VR}
    shared = {
        0x00289110: ("SQ", [{0x00280030: ("DS", [_decimal(spacing[1]), _decimal(spacing[0])]),
                             0x00180050: ("DS", _decimal(series.slice_thickness_mm or spacing[2])),
                             0x00180088: ("DS", _decimal(spacing[2]))}]),
        0x00209116: ("SQ", [{0x00200037: ("DS", [_decimal(v) for v in (direction[0], direction[3], direction[6],
                                                                       direction[1], direction[4], direction[7])])}]),
    }
    per_slice = []  # each slice's Derivation Image and Plane Position, the same in every segment's frames
    for (sop_class, sop_instance, frame), position in zip(frames, positions):
        source = {0x00081150: ("UI", sop_class), 0x00081155: ("UI", sop_instance),
                  0x0028135A: ("CS", "YES"),  # Spatial Locations Preserved: the frame's pixels are the source's
                  0x0040A170: ("SQ", [_code(PURPOSE)])}
        if frame is not None:
            source[0x00081160] = ("IS", str(frame))
        per_slice.append((("SQ", [{0x00089215: ("SQ", [_code(DERIVATION)]), 0x00082112: ("SQ", [source])}]),
                          ("SQ", [{0x00200032: ("DS", [_decimal(float(v)) for v in position])}])))
    # the frames: each segment's slices holding a voxel of it, and the first and last slices (segment 1's frame, empty,
    # where no segment has one there), so that the SEG read on its own spans the source's slices and a SEG of no
    # lesion still says its slices were looked at; sorted by segment, then slice
    planes = [(values == segment.value).reshape(slices, rows * columns) for segment in segments]
    held = [set(np.flatnonzero(plane.any(axis=1)).tolist()) for plane in planes]
    held[0] |= {0, slices - 1} - set().union(*held)
    chosen = [(number, k) for number, found in enumerate(held, start=1) for k in sorted(found)]
    present = sorted({k for _, k in chosen})  # the slices with a frame: the position dimension's values, 1, 2, ...
    position_index = {k: i + 1 for i, k in enumerate(present)}
    per_frame = [{0x00089124: per_slice[k][0], 0x00209111: ("SQ", [{0x00209157: ("UL", [number, position_index[k]])}]),
                  0x00209113: per_slice[k][1], 0x0062000A: ("SQ", [{0x0062000B: ("US", number)}])}
                 for number, k in chosen]
    instances = {}  # each source image once, in slice order: the whole series, its slices without a frame too
    for sop_class, sop_instance, _ in frames:
        instances.setdefault(sop_instance, sop_class)
    bits = np.packbits(np.concatenate([planes[number - 1][k] for number, k in chosen]), bitorder="little").tobytes()
    data_set.update({
        0x00080005: ("CS", "ISO_IR 192"),
        0x00080008: ("CS", ["DERIVED", "PRIMARY"]),
        0x00080012: ("DA", date), 0x00080013: ("TM", clock),
        0x00080016: ("UI", SEGMENTATION_STORAGE), 0x00080018: ("UI", sop_uid),
        0x00080021: ("DA", date), 0x00080031: ("TM", clock), 0x00080023: ("DA", date), 0x00080033: ("TM", clock),
        0x00080060: ("CS", "SEG"),
        0x00080070: ("LO", "DeepWML"), 0x00081090: ("LO", "DeepWML"),
        0x0008103E: ("LO", series_description(title, series)),
        0x00081115: ("SQ", [{0x0020000E: ("UI", series.uid),
                             0x0008114A: ("SQ", [{0x00081150: ("UI", sop_class), 0x00081155: ("UI", sop_instance)}
                                                 for sop_instance, sop_class in instances.items()])}]),
        0x00181000: ("LO", ("+".join(models) or "none")[:_LONG_STRING]),
        0x00181020: ("LO", str(__version__)),
        0x0020000E: ("UI", series_uid), 0x00200011: ("IS", str(number)), 0x00200013: ("IS", "1"),
        0x00201040: ("LO", ""),  # Position Reference Indicator (Type 2): the source's frame, not restated
        0x00209221: ("SQ", [{0x00209164: ("UI", organisation)}]),
        0x00209222: ("SQ", [{0x00209164: ("UI", organisation), 0x00209165: ("AT", [0x0062000B]),
                             0x00209167: ("AT", [0x0062000A]), 0x00209421: ("LO", "Segment Number")},
                            {0x00209164: ("UI", organisation), 0x00209165: ("AT", [0x00200032]),
                             0x00209167: ("AT", [0x00209113]), 0x00209421: ("LO", "Image Position (Patient)")}]),
        0x00280002: ("US", 1), 0x00280004: ("CS", "MONOCHROME2"), 0x00280008: ("IS", str(len(per_frame))),
        0x00280010: ("US", rows), 0x00280011: ("US", columns),
        0x00280100: ("US", 1), 0x00280101: ("US", 1), 0x00280102: ("US", 0), 0x00280103: ("US", 0),
        0x00282110: ("CS", "00"),
        0x00620001: ("CS", "BINARY"),
        0x00620002: ("SQ", [segment.item(n) for n, segment in enumerate(segments, start=1)]),
        0x00700080: ("CS", content_label), 0x00700081: ("LO", content_description[:_LONG_STRING]),
        0x00700084: ("PN", creator),
        0x52009229: ("SQ", [shared]), 0x52009230: ("SQ", per_frame),
        0x7FE00010: ("OB", bits),
    })
    return SegObject(part10(data_set, SEGMENTATION_STORAGE, sop_uid), series_uid, sop_uid, number, len(per_frame))
