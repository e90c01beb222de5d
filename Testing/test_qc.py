"""The QC picture (`deepwml segment --qc`): a readable PNG, the radiological view whatever the file's
voxel order, square millimetre pixels, the mask's outline exactly, and which slices are shown."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from DeepWMLLib import qc
from DeepWMLLib.cli import main

from conftest import make_volume, oracle_network

LPS = (1, 0, 0, 0, 1, 0, 0, 0, 1)


def volume(array_kji, spacing=(1.0, 1.0, 5.0), direction=LPS) -> sitk.Image:
    image = sitk.GetImageFromArray(np.asarray(array_kji))
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    return image


def head_with_marker(nk=5, nj=24, ni=20):
    """A bright head on every slice and, on slice 2, a very bright block at high i (patient left in
    LPS) and low j (anterior)."""
    flair = np.zeros((nk, nj, ni), np.float32)
    flair[:, 2:-2, 2:-2] = 100
    flair[2, 3:7, ni - 7:ni - 3] = 400
    mask = np.zeros_like(flair, dtype=np.uint8)
    mask[2, 3:7, ni - 7:ni - 3] = 1
    return flair, mask


def tile(canvas: np.ndarray, n: int, th: int, tw: int, columns: int = qc.COLUMNS) -> np.ndarray:
    y, x = qc.GAP_PX + (n // columns) * (th + qc.GAP_PX), qc.GAP_PX + (n % columns) * (tw + qc.GAP_PX)
    return canvas[y:y + th, x:x + tw]


def test_png_is_read_back_by_simpleitk_pixel_for_pixel(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (7, 11, 3), dtype=np.uint8)
    path = tmp_path / "x.png"
    path.write_bytes(qc.png_bytes(rgb))
    back = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    assert back.shape == (7, 11, 3) and np.array_equal(back, rgb)
    with pytest.raises(ValueError, match="rows x columns x 3"):
        qc.png_bytes(rgb[..., 0])


def test_radiological_view_whatever_the_voxel_order_and_the_outline_is_exact():
    flair, mask = head_with_marker()
    image, lesion = volume(flair), volume(mask)
    canvas = qc.render(image, lesion, tile_px=24)  # 24 x 20 mm at 1 mm pixels: tiles of 24 x 20, no resampling
    assert canvas.shape == (qc.GAP_PX + 24 + qc.GAP_PX, 5 * (20 + qc.GAP_PX) + qc.GAP_PX, 3)
    marked = tile(canvas, 2, 24, 20)
    red = np.all(marked == qc.LESION_RGB, axis=2)
    ring = np.zeros((24, 20), bool)
    ring[3:7, 13:17] = True
    ring[4:6, 14:16] = False  # the outline: mask voxels next to a voxel outside
    assert np.array_equal(red, ring)  # anterior at the top, patient left on the right
    assert not np.any(np.all(tile(canvas, 1, 24, 20) == qc.LESION_RGB, axis=2))
    for order in ("RAS", "PIR", "SLA"):  # the same grid stored in another voxel order
        assert np.array_equal(qc.render(sitk.DICOMOrient(image, order), sitk.DICOMOrient(lesion, order), tile_px=24),
                              canvas), order


def test_pixels_are_square_millimetres():
    flair, mask = head_with_marker(nj=24, ni=20)
    canvas = qc.render(volume(flair, spacing=(0.5, 1.0, 5.0)), volume(mask, spacing=(0.5, 1.0, 5.0)), tile_px=48)
    # 20 columns of 0.5 mm, 24 rows of 1 mm: 10 x 24 mm, drawn 20 x 48 pixels of 0.5 mm
    assert canvas.shape[0] == 48 + 2 * qc.GAP_PX and canvas.shape[1] == 5 * (20 + qc.GAP_PX) + qc.GAP_PX


def test_which_slices_are_shown():
    head = np.ones(100, bool)
    head[:10] = head[90:] = False
    lesion = np.zeros(100, bool)
    assert qc.choose_slices(head[:50], lesion[:50], 40) == list(range(10, 50))  # few: every head slice
    lesion[[11, 12, 13, 77]] = True
    shown = qc.choose_slices(head, lesion, 40)
    assert len(shown) == 40 and {11, 12, 13, 77} <= set(shown) and shown == sorted(shown)
    assert min(shown) == 10 and max(shown) == 89
    lesion[20:80] = True  # more slices with lesion than tiles: evenly spaced ones of them
    shown = qc.choose_slices(head, lesion, 40)
    assert len(shown) == 40 and all(lesion[k] for k in shown) and shown[0] == 11 and shown[-1] == 79


def test_segment_qc_writes_the_picture_and_counts_it_as_an_output(tmp_path, tiny_model, monkeypatch, capsys):
    oracle_network(monkeypatch)
    image, _ = make_volume(size=(48, 40, 6), blobs=((0.5, 0.5, 0.5, 6.0),))
    path = tmp_path / "case.nii.gz"
    sitk.WriteImage(sitk.Cast(image, sitk.sitkUInt16), str(path))
    out = tmp_path / "out"
    assert main(["segment", str(path), "-o", str(out), "--model", str(tiny_model), "--qc", "--device", "cpu"]) == 0
    picture = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "case_qc.png")))
    assert picture.ndim == 3 and picture.shape[2] == 3
    assert np.any(np.all(picture == qc.LESION_RGB, axis=2))  # the oracle's lesion is outlined
    before = (out / "case_qc.png").read_bytes()
    (out / "case_wmh.nii.gz").unlink()
    assert main(["segment", str(path), "-o", str(out), "--model", str(tiny_model), "--qc", "--device", "cpu"]) == 0
    assert "case_qc.png" in capsys.readouterr().err  # an earlier picture is kept: the case is skipped
    assert (out / "case_qc.png").read_bytes() == before and not (out / "case_wmh.nii.gz").exists()
