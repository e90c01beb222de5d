"""Mutation audit (mut46) of this session's new code: the DICOM Person Name check of `deepwml export --creator`
(dicom_seg.person_name), DeepWML's change label map read as a mask (io.file_notes, io.change_report_path,
io.change_map_calls, io.change_map_lesions), and a DICOM SEG's frames placed by the source images they name
(io.read_dicom_seg with the source series, _uneven_frames_fault). Expected values are worked out by hand in the
comments; each test names the mutants it kills.

Mutants left alive as equivalent are listed in the audit's report (the helper's final message)."""

from __future__ import annotations

import pytest

from DeepWMLLib.dicom_seg import person_name


# ---- dicom_seg.person_name ----------------------------------------------------------------------------------------

def test_a_person_name_of_exactly_five_components_and_64_bytes_is_taken():
    """At most 5 components (4 carets) a group and 64 bytes in all are allowed, so the limits themselves pass:
    Family^Given^Middle^Prefix^Suffix as typed, 64 ASCII letters (64 bytes), and 64 letters followed by an empty
    component and group ("D"*64 + "^=": 66 bytes typed, 64 once the empty parts DICOM leaves out are dropped).
    (Kills: 4 carets refused; 64 bytes refused; the size measured before the empty parts are dropped.)"""
    assert person_name("Doe^Jane^Mary^Dr^PhD") == "Doe^Jane^Mary^Dr^PhD"
    assert person_name("D" * 64) == "D" * 64
    assert person_name("D" * 64 + "^=") == "D" * 64
    # 32 two-byte letters: 64 bytes, taken; 33: 66 bytes, refused
    assert person_name("é" * 32) == "é" * 32
    with pytest.raises(ValueError, match="66 bytes"):
        person_name("é" * 33)


@pytest.mark.parametrize("name", ["^ ^", " ^ = ^ ", "= ="])
def test_a_person_name_of_carets_equals_signs_and_spaces_names_no_one(name):
    """Carets, equals signs and spaces only: every component empty (spaces pad a DICOM value), so no one is named.
    (Kills: the spaces between the separators not taken for empty.)"""
    with pytest.raises(ValueError, match="names no one"):
        person_name(name)


@pytest.mark.parametrize("given, kept", [("Doe^Jane ^", "Doe^Jane"), ("Doe^Jane^ =", "Doe^Jane"),
                                         ("Doe^Jane ^^=^ ", "Doe^Jane")])
def test_a_person_names_trailing_spaces_before_empty_parts_go_as_a_reader_drops_them(given, kept):
    """A component of spaces only, or spaces ending a group before the empty components dropped, are padding: a
    DICOM reader drops a value's trailing spaces (pydicom reads a PN written 'Doe^Jane ' back as 'Doe^Jane', and
    'Doe^Jane^ ' as 'Doe^Jane^'), so 'Doe^Jane ^' kept as 'Doe^Jane ' named the person in the report otherwise than
    the SEG read back. By hand: 'Doe^Jane ^' -> components Doe, 'Jane ', '' -> Doe^Jane; 'Doe^Jane^ =' -> groups
    'Doe^Jane^ ' and '' -> Doe^Jane; "Doe^Jane ^^=^ " -> groups "Doe^Jane ^^" and "^" -> Doe^Jane.
    (Kills nothing alive: a bug the rstrip('^ ') mutant showed, fixed.)"""
    assert person_name(given) == kept
    pydicom = pytest.importorskip("pydicom")
    from pydicom.filebase import DicomBytesIO
    from pydicom.filereader import read_dataset
    from pydicom.filewriter import write_dataset

    data = pydicom.Dataset()
    data.ContentCreatorName = kept
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, data)
    buffer.seek(0)
    assert str(read_dataset(buffer, False, True).ContentCreatorName) == kept

