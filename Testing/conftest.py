"""Shared fixtures: synthetic volumes with awkward geometry and a tiny model that runs in milliseconds."""

from __future__ import annotations

import hashlib
import math
import os
import re
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from DeepWMLLib.io import shared_data_dir

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
# DeepWMLSlicerLib.CoreLogic.STARTED_JOBS_ATTRIBUTE: the jobs started by every Slicer logic of the process
STARTED_JOBS_ATTRIBUTE = "_deepWMLStartedJobs"


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Model metadata and ONNX exports of test models go to a throw-away cache, not the user's."""
    import os

    if "DEEPWML_CACHE_DIR" not in os.environ:
        os.environ["DEEPWML_CACHE_DIR"] = str(tmp_path_factory.mktemp("deepwml-cache"))
    yield


@pytest.fixture(autouse=True)
def no_slicer_jobs_of_other_tests():
    """The Slicer module's record of the jobs started (CoreLogic.startedJobs, on the `slicer` module, shared by every
    logic of the process) starts empty in each test and is forgotten after it: a job an earlier test cancelled and
    left ending would refuse the next test's job."""
    def forget():
        slicer = sys.modules.get("slicer")
        if slicer is not None and hasattr(slicer, STARTED_JOBS_ATTRIBUTE):
            delattr(slicer, STARTED_JOBS_ATTRIBUTE)

    forget()
    yield
    forget()


@pytest.fixture(autouse=True)
def folders_written_long_ago(monkeypatch):
    """A test reads a DICOM folder moments after writing it, where a run reads an export written minutes before: io's
    header cache keeps no answer of files written within io._RACY_NS (3 s) of its reading, so its clock is put an hour
    on (as if the folder had been written that long before). The tests of that rule set the clock themselves."""
    import time

    from DeepWMLLib import io

    monkeypatch.setattr(io, "_now_ns", lambda: time.time_ns() + 3600 * 10**9)


# Work a test worker does once and shares between tests (a module fixture, or a per-worker memo: _ALIGNMENTS,
# test_change's _PAIR_IMAGES) is done again on the other worker for every test that needs it there.
# Under `--dist loadgroup` (pyproject.toml) the tests of one xdist_group run on one worker, one after another, and the
# rest are spread a test at a time as `load` spreads them; so the tests that share such work are grouped here.
# pytest-xdist 3.8's own loadgroup tells the controller a test's group by appending '@group' to item._nodeid, which
# pytest 9 no longer reads (Node.nodeid is made from item._id): every test was its own group, so the grouped tests
# were spread over both workers as under `load`. Here each worker writes its tests' groups to a file instead
# (DEEPWML_TEST_GROUPS, a folder the controller makes) and the controller's scheduler (pytest_xdist_make_scheduler)
# reads them.
_PHANTOM_PAIR_NAMES = {"change_pair_images", "phantom_pair_nodes"}  # test_change's phantom pair and its registrations


def _names_in(code) -> set[str]:
    """The global and attribute names `code` and the functions nested in it read."""
    import types

    names, todo = set(), [code]
    while todo:
        code = todo.pop()
        names.update(code.co_names)
        todo.extend(c for c in code.co_consts if isinstance(c, types.CodeType))
    return names


def shared_work_group(item) -> str | None:
    """The xdist group of a test that shares a worker's work with others (None: nothing shared): 'phantom_pair' (the
    phantom pair of test_change and its memoized registrations: the `pair` fixture, or change_pair_images or
    phantom_pair_nodes called), or the test's module (a module-scoped fixture of its own module: built once).
    test_train's and test_adapt's memoized FLAIR checks are not grouped: kept on one worker they saved 3 s of 108 s
    CPU (two-worker run of both files) and lost their spread over both workers."""
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return None
    definitions = [d for defs in info.name2fixturedefs.values() for d in defs]
    names = _names_in(item.function.__code__) if hasattr(item, "function") else set()
    for definition in definitions:
        if hasattr(definition.func, "__code__"):
            names |= _names_in(definition.func.__code__)
    if "pair" in info.names_closure or names & _PHANTOM_PAIR_NAMES:
        return "phantom_pair"
    module = getattr(item, "module", None)
    for definition in definitions:
        if definition.scope == "module" and module is not None and \
                getattr(definition.func, "__module__", None) == module.__name__:
            return module.__name__
    return None


_GROUPS_FOLDER = "DEEPWML_TEST_GROUPS"


def _xdist_group(item) -> str | None:
    """The test's xdist_group names joined (as pytest-xdist joins them), None without one."""
    names = {str(m.args[0] if m.args else m.kwargs.get("name", "default")) for m in item.iter_markers("xdist_group")}
    return "_".join(sorted(names)) if names else None


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook reads the groups
def pytest_collection_modifyitems(config, items):
    import json

    for item in items:
        group = shared_work_group(item)
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))
    folder, worker = os.environ.get(_GROUPS_FOLDER), os.environ.get("PYTEST_XDIST_WORKER")
    if folder and worker:  # a worker of a loadgroup run: its tests' groups for the controller's scheduler
        groups = {item.nodeid: group for item in items if (group := _xdist_group(item)) is not None}
        path = Path(folder) / f"{worker}.json"
        path.with_suffix(".part").write_text(json.dumps(groups), encoding="utf-8")
        path.with_suffix(".part").replace(path)


def pytest_configure(config):
    if config.pluginmanager.hasplugin("xdist") and not os.environ.get("PYTEST_XDIST_WORKER") and \
            config.getoption("dist", "no") == "loadgroup" and config.getoption("numprocesses", None):
        import tempfile

        os.environ[_GROUPS_FOLDER] = tempfile.mkdtemp(prefix="deepwml-test-groups-")  # the workers start after


def pytest_unconfigure(config):
    import shutil

    if not os.environ.get("PYTEST_XDIST_WORKER") and os.environ.get(_GROUPS_FOLDER):
        shutil.rmtree(os.environ.pop(_GROUPS_FOLDER), ignore_errors=True)


@pytest.hookimpl(tryfirst=True, optionalhook=True)  # optional: a run without pytest-xdist has no such hook
def pytest_xdist_make_scheduler(config, log):
    """--dist loadgroup: pytest-xdist's loadgroup scheduling (a group's tests a unit given to one worker, the largest
    units first, the other tests each a unit of its own), told each test's group by the files the workers wrote."""
    folder = os.environ.get(_GROUPS_FOLDER)
    if config.getoption("dist", "no") != "loadgroup" or not folder:
        return None
    import json
    import warnings

    try:
        from xdist.scheduler import LoadScopeScheduling
    except ImportError:
        LoadScopeScheduling = None
    if LoadScopeScheduling is None or not callable(getattr(LoadScopeScheduling, "_split_scope", None)):
        # _split_scope is pytest-xdist's own (private) way of naming a test's unit: a version without it runs the
        # tests under its own loadgroup (each test its own group under pytest 9): slower, never wrong
        warnings.warn("this pytest-xdist has no LoadScopeScheduling._split_scope: the tests sharing a worker's work "
                      "are not grouped (Testing/conftest.py, pytest_xdist_make_scheduler)")
        return None

    class SharedWorkScheduling(LoadScopeScheduling):
        groups: dict | None = None

        def _split_scope(self, nodeid: str) -> str:
            if self.groups is None:  # first asked once every worker has collected (and written its file)
                self.groups = {}
                for path in sorted(Path(folder).glob("*.json")):
                    self.groups.update(json.loads(path.read_text(encoding="utf-8")))
            return self.groups.get(nodeid, nodeid)

    return SharedWorkScheduling(config, log)


def counting_outline_reads(monkeypatch) -> list:
    """Each outline image's header read from now on (dicom_outline._reader's paths), with no verdict kept from before
    (dicom_outline._VERDICTS emptied)."""
    from DeepWMLLib import dicom_outline

    reads = []
    reader = dicom_outline._reader

    def counted(path, *args):
        reads.append(path)
        return reader(path, *args)

    monkeypatch.setattr(dicom_outline, "_reader", counted)
    monkeypatch.setattr(dicom_outline, "_VERDICTS", {})
    return reads


def users_images_in(source: Path, folder: Path) -> dict:
    """`folder` made to hold the DICOM files of `source` (a FLAIR series) under an outline series' names
    (IM00001.dcm, ...), as a PACS export names its images, in place of whatever it held (an outline series DeepWML
    wrote there); returns each file's bytes by name."""
    import shutil

    if folder.is_dir():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for k, path in enumerate(sorted(source.iterdir()), start=1):
        shutil.copyfile(path, folder / f"IM{k:05d}.dcm")
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def rotation(ax: float, ay: float, az: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = math.cos(ax), math.sin(ax), math.cos(ay), math.sin(ay), math.cos(az), math.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def make_volume(size=(48, 40, 10), spacing=(0.9, 0.9, 5.0), direction=None, origin=(-20.0, 15.0, -30.0),
                blobs=((0.5, 0.5, 0.5, 4.0),), seed=0, dtype=sitk.sitkFloat32) -> tuple[sitk.Image, sitk.Image]:
    """A head-like ellipse of tissue with bright spherical lesions; returns (flair, true mask).

    `blobs` are (fx, fy, fz, radius_mm) with positions as fractions of the grid along i, j, k.
    """
    rng = np.random.default_rng(seed)
    k, j, i = np.meshgrid(*(np.arange(n) for n in size[::-1]), indexing="ij")
    sp = np.array(spacing)
    centre = (np.array(size) - 1) / 2
    d = ((i - centre[0]) * sp[0]) ** 2 / (0.42 * size[0] * sp[0]) ** 2 + ((j - centre[1]) * sp[1]) ** 2 / (0.42 * size[1] * sp[1]) ** 2
    head = d < 1
    flair = np.where(head, 300.0, 20.0) + rng.normal(0, 4, head.shape)
    mask = np.zeros(head.shape, np.uint8)
    for fx, fy, fz, radius in blobs:
        c = np.array([fx, fy, fz]) * (np.array(size) - 1)
        r2 = ((i - c[0]) * sp[0]) ** 2 + ((j - c[1]) * sp[1]) ** 2 + ((k - c[2]) * sp[2]) ** 2
        mask |= (r2 <= radius**2).astype(np.uint8)
    flair[mask > 0] = 700.0
    image = sitk.GetImageFromArray(flair.astype(np.float32))
    image = sitk.Cast(image, dtype)
    truth = sitk.GetImageFromArray(mask)
    for im in (image, truth):
        im.SetSpacing(spacing)
        im.SetOrigin(origin)
        im.SetDirection(tuple(np.eye(3).ravel() if direction is None else np.asarray(direction, float).ravel()))
    return image, truth


def nifti2_of(nifti1: bytes) -> bytes:
    """The NIfTI-2 file (uncompressed, little-endian) of an uncompressed little-endian NIfTI-1 file without
    extensions: the same header fields, widened and moved where nifti2.h puts them (written by hand, as
    SimpleITK cannot write NIfTI-2)."""
    def get(fmt: str, offset: int) -> tuple:
        return struct.unpack_from("<" + fmt, nifti1, offset)

    header = bytearray(544)  # 540 and the 4-byte extension flag
    struct.pack_into("<i", header, 0, 540)
    header[4:12] = b"n+2\0\r\n\x1a\n"
    struct.pack_into("<2h", header, 12, *get("2h", 70))  # datatype, bitpix
    struct.pack_into("<8q", header, 16, *get("8h", 40))  # dim
    struct.pack_into("<8d", header, 104, *get("8f", 76))  # pixdim
    struct.pack_into("<q", header, 168, 544)  # vox_offset
    struct.pack_into("<2d", header, 176, *get("2f", 112))  # scl_slope, scl_inter
    struct.pack_into("<2i", header, 344, *get("2h", 252))  # qform_code, sform_code
    struct.pack_into("<6d", header, 352, *get("6f", 256))  # quatern_b..d, qoffset_x..z
    struct.pack_into("<12d", header, 400, *get("12f", 280))  # srow_x, srow_y, srow_z
    struct.pack_into("<i", header, 500, nifti1[123])  # xyzt_units
    return bytes(header) + nifti1[int(get("f", 108)[0]):]


def write_dicom_series(folder: Path, image: sitk.Image, uid: str = "1.2.3.4.5", description: str | None = None,
                       inversion_ms: float | None = None, repetition_ms: float | None = None, prefix: str = "slice",
                       number: int | None = None, extra: dict | None = None, instance_numbers=None,
                       positions=None) -> Path:
    """Write a 3D image as a DICOM MR series (one file per slice) into `folder`, with its own series
    UID and, when given, description, inversion and repetition time, series number and `extra` tags;
    slice k's Instance Number is k + 1, or `instance_numbers[k]`, and its Image Position (Patient) where the
    image puts it, or `positions[k]` (x, y, z in mm: slices placed off the image's grid)."""
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    d = image.GetDirection()
    spacing = image.GetSpacing()
    for k in range(image.GetDepth()):
        piece = image[:, :, k]
        tags = {
            "0008|0060": "MR", "0020|000d": "1.2.3.4", "0020|000e": uid,
            "0020|0013": str(k + 1 if instance_numbers is None else instance_numbers[k]),
            "0020|0032": "\\".join(f"{v:.4f}" for v in (image.TransformIndexToPhysicalPoint((0, 0, k)) if positions is None
                                                        else positions[k])),
            "0020|0037": "\\".join(f"{v:.6f}" for v in (d[0], d[3], d[6], d[1], d[4], d[7])),
            "0028|0030": f"{spacing[1]:g}\\{spacing[0]:g}", "0018|0050": f"{spacing[2]:g}",
        }
        if description is not None:
            tags["0008|103e"] = description
        if inversion_ms is not None:
            tags["0018|0082"] = f"{inversion_ms:g}"
        if repetition_ms is not None:
            tags["0018|0080"] = f"{repetition_ms:g}"
        if number is not None:
            tags["0020|0011"] = str(number)
        tags.update(extra or {})
        for key, value in tags.items():
            piece.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"{prefix}{k:03d}.dcm"))
        writer.Execute(piece)
    return folder


def stepped_positions(image: sitk.Image, steps, noise_mm: float = 0.0) -> list:
    """Image Positions for `write_dicom_series` of slices `steps` mm apart along the image's slice normal from its
    origin (len(steps) + 1 slices), each coordinate moved by up to `noise_mm` at random (float noise)."""
    normal = np.array(image.GetDirection()).reshape(3, 3)[:, 2]
    noise = np.random.default_rng(7).uniform(-noise_mm, noise_mm, (len(steps) + 1, 3))
    return [np.array(image.GetOrigin()) + normal * a + n for a, n in zip(np.concatenate([[0.0], np.cumsum(steps)]), noise)]


def _element(tag: int, vr: str, value, explicit: bool) -> bytes:
    group, element = tag >> 16, tag & 0xFFFF
    if vr == "SQ":
        value = b"".join(struct.pack("<HHI", 0xFFFE, 0xE000, len(item)) + item for item in value)
    elif isinstance(value, str):
        value = value.encode()
        value += (b"\0" if vr == "UI" else b" ") * (len(value) % 2)
    if not explicit:
        return struct.pack("<HHI", group, element, len(value)) + value
    if vr in ("OB", "OW", "SQ"):
        return struct.pack("<HH2sHI", group, element, vr.encode(), 0, len(value)) + value
    return struct.pack("<HH2sH", group, element, vr.encode(), len(value)) + value


def _data_set(elements, explicit: bool) -> bytes:
    return b"".join(_element(*e, explicit) for e in sorted(elements, key=lambda e: e[0]))


def write_enhanced_mr(path: Path, image: sitk.Image, order=None, explicit: bool = True, uid: str = "1.2.3.4.77",
                      description: str = "AX FLAIR", inversion_ms: float | None = None,
                      repetition_ms: float | None = None, orientation: str | None = None,
                      thickness_mm: float | None = None, positions=None, b_values=None, frame_type: str | None = None,
                      directionality=None, frame_of_reference: str | None = None) -> Path:
    """Write a 3D int16 image as one Enhanced MR Image Storage file (all slices as frames; as Siemens XA and
    Philips scanners export), its geometry in the functional groups: Pixel Measures and Plane Orientation
    shared, each frame's Plane Position its own. `order`: the slices stored as frames, in that order
    (default: all, in slice order); `explicit`: explicit or implicit VR little endian. The inversion and
    repetition times, when given, go in the shared MR Modifier and MR Timing groups, as enhanced MR has them.
    `orientation`: the Image Orientation (Patient) text, when not the image's own to 6 digits; `thickness_mm`: the
    shared Pixel Measures' Slice Thickness, when not the spacing of the slices; `positions`: each slice's Image
    Position (Patient) (as `stepped_positions` gives them), when not its place on the image's grid.
    `b_values`: each slice's Diffusion b-value (FD) in its frame's own MR Diffusion group, with a Diffusion
    Directionality of NONE for b = 0 and DIRECTIONAL else (or `directionality`'s, one a slice; a b-value of None:
    the directionality alone); `frame_type`: a shared MR Image Frame Type group with that Frame Type;
    `frame_of_reference`: its Frame of Reference UID (none when not given)."""
    order = list(range(image.GetDepth())) if order is None else list(order)
    array = sitk.GetArrayFromImage(image)[order].astype("<i2")
    d, spacing = image.GetDirection(), image.GetSpacing()
    sop, syntax = "1.2.840.10008.5.1.4.1.1.4.1", "1.2.840.10008.1.2.1" if explicit else "1.2.840.10008.1.2"
    text = lambda values: "\\".join(f"{v:.6g}" for v in values)  # noqa: E731
    meta = _data_set([(0x00020001, "OB", b"\0\1"), (0x00020002, "UI", sop), (0x00020003, "UI", f"{uid}.{order[0] + 1}"),
                      (0x00020010, "UI", syntax)], True)
    shared = _data_set([(0x00289110, "SQ", [_data_set([(0x00280030, "DS", text((spacing[1], spacing[0]))),
                                                        (0x00180050, "DS", text([thickness_mm or spacing[2]]))], explicit)]),
                        (0x00209116, "SQ", [_data_set([(0x00200037, "DS", orientation
                                                        or text((d[0], d[3], d[6], d[1], d[4], d[7])))],
                                                      explicit)])]
                       + ([(0x00189115, "SQ", [_data_set([(0x00189079, "FD", struct.pack("<d", inversion_ms))],
                                                          explicit)])] if inversion_ms is not None else [])
                       + ([(0x00189112, "SQ", [_data_set([(0x00180080, "DS", f"{repetition_ms:g}")], explicit)])]
                          if repetition_ms is not None else [])
                       + ([(0x00189226, "SQ", [_data_set([(0x00089007, "CS", frame_type)], explicit)])]
                          if frame_type is not None else []), explicit)
    place = (lambda k: image.TransformIndexToPhysicalPoint((0, 0, k))) if positions is None else positions.__getitem__

    def diffusion(k: int) -> list:
        if b_values is None:
            return []
        way = directionality[k] if directionality is not None else ("NONE" if not b_values[k] else "DIRECTIONAL")
        return [(0x00189117, "SQ", [_data_set([(0x00189075, "CS", way)] + ([] if b_values[k] is None else
                                              [(0x00189087, "FD", struct.pack("<d", b_values[k]))]), explicit)])]

    frames = [_data_set([(0x00209113, "SQ", [_data_set([(0x00200032, "DS", text(place(k)))], explicit)])]
                        + diffusion(k), explicit) for k in order]
    us = lambda value: struct.pack("<H", value)  # noqa: E731
    body = _data_set([(0x00080016, "UI", sop), (0x00080018, "UI", f"{uid}.{order[0] + 1}"), (0x00080060, "CS", "MR"),
                      (0x0008103E, "LO", description), (0x0020000D, "UI", "1.2.3.4"), (0x0020000E, "UI", uid),
                      (0x00200013, "IS", "1"), (0x00280002, "US", us(1)), (0x00280004, "CS", "MONOCHROME2"),
                      (0x00280008, "IS", str(len(order))), (0x00280010, "US", us(array.shape[1])),
                      (0x00280011, "US", us(array.shape[2])), (0x00280100, "US", us(16)), (0x00280101, "US", us(16)),
                      (0x00280102, "US", us(15)), (0x00280103, "US", us(1)), (0x52009229, "SQ", [shared]),
                      (0x52009230, "SQ", frames), (0x7FE00010, "OW", array.tobytes())]
                     + ([(0x00200052, "UI", frame_of_reference)] if frame_of_reference else []), explicit)
    path.parent.mkdir(parents=True, exist_ok=True)
    group_length = _element(0x00020000, "UL", struct.pack("<I", len(meta)), True)
    path.write_bytes(b"\0" * 128 + b"DICM" + group_length + meta + body)
    return path


def drop_pixel_spacing(folder: Path) -> None:
    """Rename Pixel Spacing (0028,0030) to Zoom Factor (0028,0031), the next tag, in every file of a series
    `write_dicom_series` wrote (implicit VR little endian), so the images lose it as a screen capture lacks it."""
    for path in folder.iterdir():
        data, count = re.subn(rb"\x28\x00\x30\x00(....)(?=[0-9.])", lambda m: b"\x28\x00\x31\x00" + m.group(1),
                              path.read_bytes(), count=1, flags=re.S)
        assert count == 1, path
        path.write_bytes(data)


def encoded_dicom_series(folder: Path, image: sitk.Image, syntax: str, rows: int | None = None, pad: bytes = b"") -> Path:
    """An int16 axial image as a DICOM MR series written by hand in explicit VR big endian or deflated explicit VR
    little endian, encoded as those syntaxes are (SimpleITK writes implicit VR little endian only); `rows` another
    Rows than the image's (a damaged header), `pad` bytes after each slice's pixels in its Pixel Data."""
    big = syntax == "1.2.840.10008.1.2.2"
    order = ">" if big else "<"
    array = sitk.GetArrayFromImage(image).astype(order + "i2")
    spacing = image.GetSpacing()

    def element(tag: int, vr: str, value) -> bytes:
        value = value.encode() + (b"\0" if vr == "UI" else b" ") * (len(value) % 2) if isinstance(value, str) else value
        if vr == "OW":
            return struct.pack(order + "HH2sHI", tag >> 16, tag & 0xFFFF, b"OW", 0, len(value)) + value
        return struct.pack(order + "HH2sH", tag >> 16, tag & 0xFFFF, vr.encode(), len(value)) + value

    def meta_element(tag: int, vr: str, value) -> bytes:
        value = value.encode() + b"\0" * (len(value) % 2) if isinstance(value, str) else value
        if vr == "OB":
            return struct.pack("<HH2sHI", 2, tag, b"OB", 0, len(value)) + value
        return struct.pack("<HH2sH", 2, tag, vr.encode(), len(value)) + value

    folder.mkdir(parents=True)
    us = lambda value: struct.pack(order + "H", value)  # noqa: E731
    for k in range(array.shape[0]):
        sop = f"1.2.3.4.88.{k + 1}"
        meta = (meta_element(1, "OB", b"\0\1") + meta_element(2, "UI", "1.2.840.10008.5.1.4.1.1.4")
                + meta_element(3, "UI", sop) + meta_element(0x10, "UI", syntax))
        position = "\\".join(f"{v:.4f}" for v in image.TransformIndexToPhysicalPoint((0, 0, k)))
        body = b"".join([element(0x00080016, "UI", "1.2.840.10008.5.1.4.1.1.4"), element(0x00080018, "UI", sop),
                         element(0x00080060, "CS", "MR"), element(0x0008103E, "LO", "AX FLAIR"),
                         element(0x00180050, "DS", f"{spacing[2]:g}"), element(0x0020000D, "UI", "1.2.3.4"),
                         element(0x0020000E, "UI", "1.2.3.4.88"), element(0x00200013, "IS", str(k + 1)),
                         element(0x00200032, "DS", position), element(0x00200037, "DS", "1\\0\\0\\0\\1\\0"),
                         element(0x00280002, "US", us(1)), element(0x00280004, "CS", "MONOCHROME2"),
                         element(0x00280010, "US", us(rows or array.shape[1])),
                         element(0x00280011, "US", us(array.shape[2])),
                         element(0x00280030, "DS", f"{spacing[1]:g}\\{spacing[0]:g}"), element(0x00280100, "US", us(16)),
                         element(0x00280101, "US", us(16)), element(0x00280102, "US", us(15)),
                         element(0x00280103, "US", us(1)), element(0x7FE00010, "OW", array[k].tobytes() + pad)])
        if not big:
            packer = zlib.compressobj(9, zlib.DEFLATED, -15)
            body = packer.compress(body) + packer.flush()
            body += b"\0" * (len(body) % 2)
        (folder / f"slice{k:03d}.dcm").write_bytes(b"\0" * 128 + b"DICM" + meta_element(0, "UL", struct.pack("<I", len(meta)))
                                                   + meta + body)
    return folder


def set_orientation(folder: Path, text: str | None) -> None:
    """Give every file of a `write_dicom_series` series (implicit VR little endian) another Image Orientation
    (Patient) (0020,0037) value, or none (None: the tag renamed (0020,0035), which no reader takes for it)."""
    for path in folder.iterdir():
        data = path.read_bytes()
        at = data.index(b"\x20\x00\x37\x00", 132)
        if text is None:
            path.write_bytes(data[:at] + b"\x20\x00\x35\x00" + data[at + 4:])
            continue
        end = at + 8 + struct.unpack_from("<I", data, at + 4)[0]
        value = text.encode() + b" " * (len(text) % 2)
        path.write_bytes(data[:at + 4] + struct.pack("<I", len(value)) + value + data[end:])


def relabel_transfer_syntax(folder: Path, uid: str, names=None) -> None:
    """Give every file of a series `write_dicom_series` wrote (or those of `names`) another Transfer Syntax UID
    (0002,0010) in its file meta group (the group's length (0002,0000) kept right), as files compressed in that
    syntax are labelled."""
    value = uid.encode() + b"\0" * (len(uid) % 2)
    for path in folder.iterdir() if names is None else (folder / name for name in names):
        data = bytearray(path.read_bytes())
        at = data.index(b"\x02\x00\x10\x00UI", 132)
        length = struct.unpack_from("<H", data, at + 6)[0]
        data[at + 6:at + 8 + length] = struct.pack("<H", len(value)) + value
        group = data.index(b"\x02\x00\x00\x00UL", 132)
        struct.pack_into("<I", data, group + 8, struct.unpack_from("<I", data, group + 8)[0] + len(value) - length)
        path.write_bytes(bytes(data))


def mni_t1_thick(thickness_mm: int = 5, smooth: bool = False) -> sitk.Image:
    """nilearn's MNI152 T1 template (a real T1-weighted average, brain-extracted) on axial slices of
    `thickness_mm` (with `smooth`, averaged across each slice first, like a slice profile); skips the
    test when nilearn or its template is missing."""
    nilearn = pytest.importorskip("nilearn")
    template = Path(nilearn.__file__).parent / "datasets" / "data" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    if not template.is_file():
        pytest.skip("nilearn without its MNI152 template")
    t1 = sitk.ReadImage(str(template), sitk.sitkFloat32)
    grid = sitk.Image([t1.GetSize()[0], t1.GetSize()[1], t1.GetSize()[2] // thickness_mm], sitk.sitkFloat32)
    grid.SetSpacing((1.0, 1.0, float(thickness_mm)))
    grid.SetOrigin(t1.GetOrigin())
    grid.SetDirection(t1.GetDirection())
    source = sitk.SmoothingRecursiveGaussian(t1, (0.1, 0.1, thickness_mm / 2.5)) if smooth else t1
    return sitk.Resample(source, grid, sitk.Transform(), sitk.sitkLinear)


def located_by_the_whole_map(lesion: np.ndarray, ventricles: np.ndarray, spacing) -> tuple[dict, np.ndarray]:
    """The reference for `location.locate`, which measures only at the lesion voxels: the `location` entry made
    from the whole ventricle distance map (bool `lesion` and `ventricles` stacks), and that map."""
    from DeepWMLLib import location

    whole = location.ventricle_distance(ventricles, spacing)
    voxel_mm3 = float(np.prod(spacing))
    entry = {"rule": location.RULE, "ventricles_ml": round(np.count_nonzero(ventricles) * voxel_mm3 / 1000, 3),
             "judged": True, **location.split_volumes(whole[lesion], voxel_mm3)}
    return entry, whole


def process_status(field: str) -> int:
    """A size in /proc/self/status (VmRSS, VmHWM: Linux), in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def resident_peak(function, *args):
    """(result, the most memory the process held at once during the call beyond what it held before, in bytes):
    what SimpleITK, VTK and torch hold too, which tracemalloc does not see (Linux's /proc/self/clear_refs)."""
    before = process_status("VmRSS")
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # the peak starts again from what is held now
    result = function(*args)
    return result, process_status("VmHWM") - before


def tiny_model_file(path: Path, grid=(64, 64), spacing_mm=None, seed=0, labels=None) -> Path:
    from DeepWMLLib.checkpoint import save_model
    from DeepWMLLib.model import build_model
    from DeepWMLLib.preprocessing import PreprocessingConfig

    torch.manual_seed(seed)
    config = {"base_channels": 4, "depth": 2}
    save_model(path, build_model(config), config, PreprocessingConfig(grid_size=grid, grid_spacing_mm=spacing_mm),
               0.5, {"kind": "test fixture"}, labels)
    return path


@pytest.fixture
def tiny_model(tmp_path) -> Path:
    return tiny_model_file(tmp_path / "tiny.pt")


@pytest.fixture
def header_reads(monkeypatch):
    """How many times each file's DICOM header was read (SimpleITK's ImageFileReader.ReadImageInformation, which
    io._scan_series reads every file of a folder with), by path, from now on: a collections.Counter."""
    import collections

    counted = collections.Counter()
    read = sitk.ImageFileReader.ReadImageInformation

    def watched(self):
        counted[os.path.abspath(self.GetFileName())] += 1
        return read(self)

    monkeypatch.setattr(sitk.ImageFileReader, "ReadImageInformation", watched)
    return counted


def in_folder(counted, folder) -> dict:
    """`header_reads` of the files in `folder` (not below it): {times read: how many files}."""
    import collections

    folder = os.path.abspath(folder)
    return dict(collections.Counter(n for path, n in counted.items() if os.path.dirname(path) == folder))


@pytest.fixture
def precisions_asked(monkeypatch) -> list:
    """The precision each network runner is made with from now on (inference.make_runner watched, not changed)."""
    from DeepWMLLib import inference

    asked = []
    make_runner = inference.make_runner

    def watched(loaded, device, backend="auto", precision="auto"):
        asked.append(precision)
        return make_runner(loaded, device, backend, precision)

    monkeypatch.setattr(inference, "make_runner", watched)
    return asked


@pytest.fixture
def shared_data() -> Path:
    root = shared_data_dir()
    if root is None:
        pytest.skip("../shared/data (or DEEPWML_SHARED_DATA) is absent: real-data tests skipped")
    return root


BRAIN_LABELS = {"0": "background", "1": "intracranial"}


def oracle_network(monkeypatch, level: float = 3.0, brain: str = "head") -> None:
    """Replace the network by 'bright means lesion' so geometry is tested independently of any
    weights. A brain-mask model (the shipped one gates by default) marks, by `brain`: "head", every
    voxel clearly above the background (as on a skull-stripped image); "left half", the left half
    of its network grid (so gating has something to drop); "nothing" (a failed brain mask). A
    ventricle model marks the central sixteenth of its grid."""
    import DeepWMLLib.inference as inference

    def predict(slices, runner, batch_size, tta=False, on_batch=None, cancel=None, ran=None):
        if getattr(runner, "loaded", None) is not None and runner.loaded.labels.get("1") == "lateral_ventricles":
            out = np.zeros(slices.shape, np.float32)  # a ventricle model: the central sixteenth of its grid
            rows, cols = slices.shape[-2:]
            out[..., rows * 3 // 8: rows * 5 // 8, cols * 3 // 8: cols * 5 // 8] = 1.0
            return out
        if getattr(runner, "loaded", None) is not None and runner.loaded.labels.get("1") == "intracranial":
            if brain == "head":
                return (slices > -1.5).astype(np.float32)
            out = np.zeros(slices.shape, np.float32)
            if brain == "left half":
                out[..., : slices.shape[-1] // 2] = 1.0
            return out
        return 1.0 / (1.0 + np.exp(-4.0 * (slices - level)))

    monkeypatch.setattr(inference, "predict_network_slices", predict)


def oracle_networks_with_brain(monkeypatch, level: float = 3.0) -> None:
    """oracle_network whose brain-mask model marks the left half of its grid."""
    oracle_network(monkeypatch, level, brain="left half")


def record_syncs_and_renames(monkeypatch) -> list:
    """A list that gathers, in order, ("sync", stat) for each os.fsync and ("rename", stat of the source) for each
    os.replace while the test runs (both still done): what reached the disk before which name."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("sync", os.fstat(fd)))
        return real_fsync(fd)

    def replace(source, target):
        events.append(("rename", os.stat(source)))
        return real_replace(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


def another_run_holds(out: Path, case: str = "a", note: str = "the other run", when=None, then=None):
    """Another DeepWML run holding `case`'s lock in OUTDIR `out` until this run has left that case: returns a
    segment.ProgressBar subclass (a progress_factory for segment_cases, or put in its place for the batch script)
    that releases the lock once, when the case's row is finished and `when(row)` (if given) accepts it, then calls
    `then(row)` (what the other run does next, if given)."""
    from DeepWMLLib import io, segment

    lock = io.exclusive(out / f".{case}.deepwml-lock", note)
    lock.__enter__()
    held = [True]

    class Bar(segment.ProgressBar):
        def finish(self, row):
            super().finish(row)
            if row["case"] == case and held[0] and (when is None or when(row)):
                held[0] = False
                lock.__exit__(None, None, None)
                if then is not None:
                    then(row)

    return Bar



_FLAIR_CHECKS: dict = {}  # a worker's FLAIR checks of training cases, by what decides them (memoize_flair_checks)


def _image_key(image) -> tuple | None:
    """An image's grid, pixel type and a digest of its voxels."""
    if image is None:
        return None
    voxels = sitk.GetArrayViewFromImage(image)
    return (image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection(), image.GetPixelIDValue(),
            hashlib.sha256(voxels.tobytes()).hexdigest())


def _patches(monkeypatch) -> int:
    """How many attributes, items and environment variables `monkeypatch` has set so far (-1: not known)."""
    try:
        return len(monkeypatch._setattr) + len(monkeypatch._setitem)
    except AttributeError:
        return -1


def memoize_flair_checks(monkeypatch) -> None:
    """train.flair_checker's check (the shipped brain-mask network run on every case of a training run: most of the
    time of a tiny run) computed once per test worker for the same scan, mask, device, threads and brain model, and
    given again (a copy) to later runs that check them. Only while the test has patched nothing else with its
    `monkeypatch`; the functions the check runs through are in the key too. The check is deterministic: a run gets
    what it would compute. Tests of the check itself patch the network (oracle_network), so they run it."""
    import copy
    import inspect

    from DeepWMLLib import contrast, inference, io, train

    made = train.flair_checker
    mine = _patches(monkeypatch) + 1  # with this one

    def checker(device="auto", threads=None):
        check = made(device, threads)
        if check is None:
            return None
        brain = inspect.getclosurevars(check).nonlocals.get("brain_model")

        def memoized(image, mask=None):
            if brain is None or mine <= 0 or _patches(monkeypatch) != mine:
                return check(image, mask)  # the test patched something else: the check runs as it is
            key = (device, threads, brain.path, brain.digest, inference.predict_maps, inference.predict_network_slices,
                   inference.make_runner, inference.resolve_device, contrast.flair_contrast, io.axial_view,
                   _image_key(image), _image_key(mask))
            if key not in _FLAIR_CHECKS:
                _FLAIR_CHECKS[key] = check(image, mask)
            return copy.deepcopy(_FLAIR_CHECKS[key])

        return memoized

    monkeypatch.setattr(train, "flair_checker", checker)


_ALIGNMENTS: dict = {}  # a worker's registrations (change.align), by what decides them (memoize_alignments)


def _names_reached(function, module) -> list[str]:
    """The names of `module`'s globals that `function`'s code reads, and the code of the module's own functions it
    reaches reads, and so on (nested functions and lambdas too): what its result can depend on in that module."""
    import inspect
    import types

    names, todo, seen = [], [function.__code__], set()
    while todo:
        code = todo.pop()
        if code in seen:
            continue
        seen.add(code)
        todo.extend(c for c in code.co_consts if isinstance(c, types.CodeType))
        for name in code.co_names:
            if name in vars(module) and name not in names:
                names.append(name)
                value = vars(module)[name]
                if inspect.isfunction(value) and value.__module__ == module.__name__:
                    todo.append(value.__code__)
    return names


def _alignment(made, followup, baseline, seed, patched=()):
    """`made(followup, baseline, seed)` (change.align, or what stands for it), computed once per test worker for
    the same two images, seed, SimpleITK threads, `made` and every global of the change module its code reaches
    (a function or a setting a test patched there gives another key), and a copy of it (its own transform) given.
    Computed afresh, not kept, while the test has patched (`patched`: its monkeypatch's (target, name) pairs) an
    attribute of a module the registration goes through (SimpleITK, numpy...) or of an object in one."""
    import dataclasses

    from DeepWMLLib import change

    reached = {name: vars(change)[name] for name in _names_reached(made, change)}
    modules = {v for v in reached.values() if isinstance(v, type(change)) and v is not change}
    roots = {m.__name__.split(".")[0] for m in modules}
    for target, name in patched:
        owner = target if isinstance(target, type(change)) else None
        root = (owner.__name__ if owner else str(getattr(target, "__module__", ""))).split(".")[0]
        if owner in modules or root in roots:
            return made(followup, baseline, seed)
    key = (made, tuple((name, value if isinstance(value, (int, float, str)) else id(value))
                       for name, value in reached.items()),
           sitk.ProcessObject.GetGlobalDefaultNumberOfThreads(), _image_key(followup), _image_key(baseline), seed)
    if key not in _ALIGNMENTS:
        _ALIGNMENTS[key] = (made(followup, baseline, seed), list(reached.values()))  # the values kept: ids unique
    found = _ALIGNMENTS[key][0]
    return dataclasses.replace(found, transform=type(found.transform)(found.transform))


def aligned_once(followup, baseline, seed=1):
    """change.align(followup, baseline, seed), memoized as `memoize_alignments` does (for module fixtures, where
    no test has patched anything)."""
    from DeepWMLLib import change

    return _alignment(change.align, followup, baseline, seed)


def memoize_alignments(monkeypatch) -> None:
    """change.align (a rigid registration: tens of seconds on a loaded CPU for the phantom pair) run once per test
    worker for the same follow-up, baseline and seed, each later call given a copy of its result (its own
    transform). The registration is deterministic for a seed (change.align), so a call gets what it would compute.
    The key holds every function and setting of the change module the registration reaches (`_alignment`), as they
    are at the call: a test that patches one (change._correlation) gets the registration its patch makes, not one
    made without it; while it has patched (with `monkeypatch`) SimpleITK, numpy or another module the registration
    goes through, nothing is memoized. A test that patches change.align itself afterwards replaces this."""
    from DeepWMLLib import change

    made = change.align

    def align(followup, baseline, seed=1):
        patched = [(target, name) for target, name, _ in getattr(monkeypatch, "_setattr", ())
                   if not (target is change and name == "align")]
        return _alignment(made, followup, baseline, seed, patched)

    monkeypatch.setattr(change, "align", align)
