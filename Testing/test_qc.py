"""The QC picture (`deepwml segment --qc`): a readable PNG, the radiological view whatever the file's
voxel order, square millimetre pixels, the mask's outline exactly, and which slices are shown."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from DeepWMLLib import qc
from DeepWMLLib.cli import main
from DeepWMLLib.errors import DeepWMLError

from conftest import make_volume, oracle_network, rotation

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
    for order in ("RAS", "SLA"):  # the same grid stored in another voxel order: the same picture
        assert np.array_equal(qc.render(sitk.DICOMOrient(image, order), sitk.DICOMOrient(lesion, order), tile_px=24),
                              canvas), order
    # slices stored from the top down (PIR): still shown from the bottom up; only the labels (the file's
    # own slice indices, 4 - k) differ
    flipped = qc.render(sitk.DICOMOrient(image, "PIR"), sitk.DICOMOrient(lesion, "PIR"), tile_px=24)
    below_labels = slice(qc.GAP_PX + 14, None)
    assert np.array_equal(flipped[below_labels], canvas[below_labels])
    assert not np.array_equal(flipped, canvas)


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
    # a picture that fails is drawn before anything is written: no half set of outputs is left
    monkeypatch.setattr(qc, "render", lambda *a, **k: (_ for _ in ()).throw(MemoryError("no room")))
    assert main(["segment", str(path), "-o", str(tmp_path / "out2"), "--model", str(tiny_model), "--qc",
                 "--device", "cpu"]) == 1
    assert sorted(p.name for p in (tmp_path / "out2").iterdir()) == ["summary.csv"]
    monkeypatch.undo()
    oracle_network(monkeypatch)
    capsys.readouterr()
    assert main(["segment", str(path), "-o", str(out), "--model", str(tiny_model), "--qc", "--device", "cpu"]) == 0
    assert "case_qc.png" in capsys.readouterr().err  # an earlier picture is kept: the case is skipped
    assert (out / "case_qc.png").read_bytes() == before
    (out / "case_wmh.nii.gz").unlink()  # a result whose mask is gone is not skipped as done: redone when asked
    assert main(["segment", str(path), "-o", str(out), "--model", str(tiny_model), "--qc", "--device", "cpu"]) == 1
    assert "is here but not its case_wmh.nii.gz" in capsys.readouterr().err
    assert (out / "case_qc.png").read_bytes() == before and not (out / "case_wmh.nii.gz").exists()


def test_comparison_colours_agreement_and_each_kind_of_error_and_leaves_ignored_voxels_alone():
    flair, _ = head_with_marker()
    reference = np.zeros(flair.shape, np.uint8)
    prediction = np.zeros(flair.shape, np.uint8)
    reference[2, 14:17, 10:13] = 1  # found: green (clear of the slice label, top left)
    prediction[2, 14:17, 10:13] = 1
    reference[2, 18:21, 10:13] = 1  # missed: blue
    prediction[2, 18:21, 14:17] = 1  # marked only by the prediction: red
    reference[2, 14:16, 15:17] = 2   # ignore, marked by the prediction: neither
    prediction[2, 14:16, 15:17] = 1
    picture = qc.render_comparison(volume(flair), volume(prediction), volume(reference), tile_px=24)
    band = picture.shape[0] - (24 + 2 * qc.GAP_PX)  # the band above the tiles: the whole legend, in its colours,
    legend = picture[:band]  # on as many lines as a narrow mosaic needs
    assert band > qc.HEADER_PX and all(np.any(np.all(legend == rgb, axis=2)) for rgb in qc.COMPARISON_RGB.values())
    canvas = picture[band:]
    marked = tile(canvas, 2, 24, 20).astype(int)
    grey = tile(qc.render(volume(flair), volume(np.zeros_like(prediction)), tile_px=24), 2, 24, 20).astype(int)
    for (rows, cols), colour in (((slice(14, 17), slice(10, 13)), qc.COMPARISON_RGB[1]),
                                 ((slice(18, 21), slice(10, 13)), qc.COMPARISON_RGB[3]),
                                 ((slice(18, 21), slice(14, 17)), qc.COMPARISON_RGB[2])):
        expected = (0.45 * grey[rows, cols] + 0.55 * np.array(colour)).astype(np.uint8)
        assert np.array_equal(marked[rows, cols], expected)
    changed = np.any(marked != grey, axis=2)
    assert changed.sum() == 9 + 9 + 9  # nothing else: not the ignored voxels


def test_evaluate_qc_one_case_and_a_cohort(tmp_path, capsys):
    flair, mask = head_with_marker()
    flair = flair + np.random.default_rng(0).normal(0, 1, flair.shape).astype(np.float32)  # a scan, not a label map
    files = {}
    for name, array in (("flair", flair), ("pred", mask), ("ref", mask)):
        files[name] = tmp_path / f"{name}.nii.gz"
        sitk.WriteImage(volume(array), str(files[name]))
    common = ["evaluate", "--prediction", str(files["pred"]), "--reference", str(files["ref"])]
    assert main(common + ["--qc", str(tmp_path / "a.png")]) == 2
    assert "--qc PNG needs --flair FLAIR" in capsys.readouterr().err
    assert main(common + ["--flair", str(files["flair"]), "--qc", str(tmp_path / "missing" / "a.png")]) == 1
    assert "does not exist" in capsys.readouterr().err  # refused before the work
    assert main(common + ["--flair", str(files["flair"]), "--qc", str(tmp_path / "a.png")]) == 0
    picture = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "a.png")))
    assert np.any(np.all(picture == (0.45 * 255 + 0.55 * np.array(qc.COMPARISON_RGB[1])).astype(np.uint8), axis=2))
    titled = qc.render_comparison(volume(flair), volume(mask), volume(mask),
                                  f"{tmp_path.name}/pred against {tmp_path.name}/ref: Dice 1.000")
    assert np.array_equal(picture, titled)  # the band names the case and its Dice, as a cohort's pictures do
    capsys.readouterr()
    shifted = volume(flair)
    shifted.SetOrigin((0.0, 0.0, 1.0))
    sitk.WriteImage(shifted, str(tmp_path / "other_grid.nii.gz"))
    assert main(common + ["--flair", str(tmp_path / "other_grid.nii.gz"), "--qc", str(tmp_path / "b.png"),
                          "--json", str(tmp_path / "b.json")]) == 1
    out = capsys.readouterr()
    assert "grid" in out.err and "Dice" not in out.out  # refused before any figure or file
    assert not (tmp_path / "b.png").exists() and not (tmp_path / "b.json").exists()
    manifest = tmp_path / "cohort.csv"
    manifest.write_text(f"case,prediction,reference,flair\nc1,{files['pred']},{files['ref']},{files['flair']}\n"
                        f"c2,{files['pred']},{files['ref']},\n../up/c3,{files['pred']},{files['ref']},{files['flair']}\n")
    assert main(["evaluate", "--manifest", str(manifest), "-o", str(tmp_path / "cohort")]) == 0
    # a case name is made a plain file name: nothing is written outside OUTDIR/qc
    assert sorted(p.name for p in (tmp_path / "cohort" / "qc").iterdir()) == ["_up_c3_qc.png", "c1_qc.png"]
    assert not (tmp_path / "up").exists()
    report = (tmp_path / "cohort" / "report.md").read_text(encoding="utf-8")
    assert "[qc/c1_qc.png](qc/c1_qc.png)" in report and "qc/c2_qc.png" not in report
    # a FLAIR that cannot be pictured costs the picture, not the case's figures
    manifest.write_text(f"case,prediction,reference,flair\nc1,{files['pred']},{files['ref']},{tmp_path / 'other_grid.nii.gz'}\n")
    assert main(["evaluate", "--manifest", str(manifest), "-o", str(tmp_path / "cohort2")]) == 1
    assert "c1: " in capsys.readouterr().err
    assert "## Cases without a picture" in (tmp_path / "cohort2" / "report.md").read_text(encoding="utf-8")
    per_case = (tmp_path / "cohort2" / "per_case.csv").read_text(encoding="utf-8-sig").splitlines()
    assert len(per_case) == 2 and per_case[1].startswith("c1,") and not (tmp_path / "cohort2" / "qc" / "c1_qc.png").exists()
    # two names that make one file name ("site A/p1", "site A_p1"): the second gets no picture, and says why
    manifest.write_text(f"case,prediction,reference,flair\nsite A/p1,{files['pred']},{files['ref']},{files['flair']}\n"
                        f"site A_p1,{files['pred']},{files['ref']},{files['flair']}\n")
    capsys.readouterr()
    assert main(["evaluate", "--manifest", str(manifest), "-o", str(tmp_path / "cohort3")]) == 1
    assert "as case 'site A/p1''s is" in capsys.readouterr().err
    report = (tmp_path / "cohort3" / "report.md").read_text(encoding="utf-8")
    assert report.count("(qc/site_A_p1_qc.png)") == 1 and "## Cases without a picture" in report


def test_consensus_qc_pictures_where_two_raters_differ(tmp_path, capsys):
    flair, _ = head_with_marker()
    flair = flair + np.random.default_rng(1).normal(0, 1, flair.shape).astype(np.float32)
    rater_a = np.zeros(flair.shape, np.uint8)
    rater_b = np.zeros(flair.shape, np.uint8)
    rater_a[2, 14:17, 10:13] = 1
    rater_b[2, 14:17, 10:13] = 3  # any non-zero voxel is lesion for a rater
    rater_a[2, 18:21, 14:17] = 1  # rater A only: red
    files = {}
    for name, array in (("flair", flair), ("a", rater_a), ("b", rater_b)):
        files[name] = tmp_path / f"{name}.nii.gz"
        sitk.WriteImage(volume(array), str(files[name]))
    pair = ["consensus", str(files["a"]), str(files["b"])]
    assert main(pair + ["--flair", str(files["flair"])]) == 0  # --flair alone: the masks on its grid, no picture
    assert main(pair + ["--flair", str(files["flair"]), "--qc", str(tmp_path / "pair.png")]) == 0
    capsys.readouterr()
    picture = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "pair.png")))
    expected = qc.render_comparison(volume(flair), volume(rater_a), volume((rater_b > 0).astype(np.uint8)),
                                    f"{tmp_path.name}/a against {tmp_path.name}/b: Dice 0.667", names=("rater A", "rater B"))
    assert np.array_equal(picture, expected)  # the band names the two masks, by folder and file, and their Dice
    plain = qc.render(volume(flair), volume(rater_a * 0))  # no band
    tiles = picture[picture.shape[0] - plain.shape[0]:]
    assert np.any(np.all(tile(tiles, 2, *tile_shape(tiles)) != tile(plain, 2, *tile_shape(tiles)), axis=2))
    manifest = tmp_path / "pairs.csv"
    manifest.write_text(f"case,rater_a,rater_b,flair\np1,{files['a']},{files['b']},{files['flair']}\n"
                        f"p2,{files['a']},{files['b']},{files['a']}\n")  # p2's "FLAIR" is a mask: no picture
    assert main(["consensus", "--manifest", str(manifest), "-o", str(tmp_path / "out")]) == 1
    assert "could not be pictured (their verdicts stand)" in capsys.readouterr().err
    cohort_picture = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "qc" / "p1_qc.png")))
    band = expected.shape[0] - cohort_picture.shape[0] + qc.HEADER_PX  # the pair's title may take two lines
    assert np.array_equal(cohort_picture[qc.HEADER_PX:], expected[band:])  # the band names the case and its Dice
    assert not np.array_equal(cohort_picture[:qc.HEADER_PX], expected[:qc.HEADER_PX])
    rows = (tmp_path / "out" / "consensus.csv").read_text(encoding="utf-8-sig").splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["p1", "p2"] and rows[2].split(",")[3] == "False"  # verdict stands
    manifest.write_text(f"case,rater_a,rater_b,flair\nx/p1,{files['a']},{files['b']},{files['flair']}\n"
                        f"x_p1,{files['a']},{files['b']},{files['flair']}\n")  # one picture name for both
    assert main(["consensus", "--manifest", str(manifest), "-o", str(tmp_path / "out2")]) == 1
    assert "as case 'x/p1''s is" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "out2" / "qc").iterdir()] == ["x_p1_qc.png"]


def tile_shape(canvas: np.ndarray, n_tiles: int = 5) -> tuple[int, int]:
    """(rows, columns) of each tile of a one-row mosaic of n_tiles."""
    return canvas.shape[0] - 2 * qc.GAP_PX, (canvas.shape[1] - qc.GAP_PX) // n_tiles - qc.GAP_PX


def test_a_lesion_smaller_than_a_display_pixel_still_shows():
    flair = np.zeros((3, 40, 400), np.float32)
    flair[:, 5:-5, 10:-10] = 100
    mask = np.zeros(flair.shape, np.uint8)
    mask[1, 20, 201] = 1  # one voxel; the tile has a quarter of the slice's columns
    canvas = qc.render(volume(flair, spacing=(0.5, 0.5, 5.0)), volume(mask, spacing=(0.5, 0.5, 5.0)), tile_px=100)
    shown = np.all(canvas == qc.LESION_RGB, axis=2)
    assert shown.sum() >= 1
    width = canvas.shape[1] // 3  # three tiles side by side
    assert np.flatnonzero(shown.any(axis=0))[0] // width == 1  # on the middle slice's tile


def test_slice_labels_are_whole_or_absent_and_negative_images_crop_alike():
    flair, mask = head_with_marker(nk=3)
    image = volume(flair)
    for tile_px, expected in ((24, True), (6, False)):
        canvas = qc.render(image, volume(mask), tile_px=tile_px)
        assert bool(np.any(np.all(canvas == qc.LABEL_RGB, axis=2))) is expected
    tile_rgb = np.zeros((12, 16, 3), np.uint8)
    assert qc._draw_number(tile_rgb, 123)  # 1x: 11 pixels wide, fits
    assert not qc._draw_number(np.zeros((12, 12, 3), np.uint8), 123)  # would be cut: not drawn at all
    offset = qc.render(volume(flair - 1000), volume(mask), tile_px=24)
    assert np.array_equal(offset, qc.render(image, volume(mask), tile_px=24))


def test_a_lesion_on_a_slice_with_little_head_is_shown():
    flair = np.zeros((6, 24, 20), np.float32)
    flair[:4, 2:-2, 2:-2] = 100 + np.arange(4)[:, None, None]
    mask = np.zeros(flair.shape, np.uint8)
    mask[5, 10, 10] = 1  # the top slice holds no head (e.g. the vertex, faint), but a mark
    canvas = qc.render(volume(flair), volume(mask), tile_px=24)
    assert canvas.shape[1] == 6 * (20 + qc.GAP_PX) + qc.GAP_PX
    assert np.any(np.all(tile(canvas, 5, 24, 20) == qc.LESION_RGB, axis=2))


def test_the_font_and_the_title_band():
    assert all(mask.shape == (5, 3) for mask in qc._GLYPH_MASKS.values())
    band = np.zeros((12, 40, 3), np.uint8)
    end = qc.draw_text(band, 1, 1, "a~", qc.HEADER_RGB, 2)  # capitals; an unknown character drawn as '?'
    question = np.zeros((12, 40, 3), np.uint8)
    qc.draw_text(question, 1, 9, "?", qc.HEADER_RGB, 2)
    assert end == 1 + 2 * 8 and np.array_equal(band[:, 9:15], question[:, 9:15])
    flair, mask = head_with_marker()
    plain = qc.render(volume(flair), volume(mask), tile_px=24)
    titled = qc.render(volume(flair), volume(mask), title="case: 1.00 ml, 1 lesion", tile_px=24)
    band = titled.shape[0] - plain.shape[0]  # a title wider than the mosaic takes more than one line
    assert band >= qc.HEADER_PX and np.array_equal(titled[band:], plain)
    assert np.any(np.all(titled[:qc.HEADER_PX] == qc.HEADER_RGB, axis=2))


def test_a_mark_outside_the_head_stays_in_the_picture():
    """The tiles are cropped to the head, widened to every mark: a false positive in the background
    (the kind the picture is there to catch) is not cut away."""
    flair = np.zeros((3, 60, 60), np.float32)
    flair[:, 20:40, 20:40] = 100
    mask = np.zeros(flair.shape, np.uint8)
    mask[1, 25:28, 25:28] = 1  # in the head
    mask[1, 2:5, 54:57] = 1  # in the background corner
    canvas = qc.render(volume(flair), volume(mask), tile_px=60)
    red = np.all(tile(canvas, 1, 60, 60) == qc.LESION_RGB, axis=2)
    from scipy import ndimage

    assert ndimage.label(red, np.ones((3, 3)))[1] == 2  # both outlined


def test_a_long_title_wraps_between_words_and_keeps_its_figures():
    flair, mask = head_with_marker(nk=3)
    title = "PT0001_AX_FLAIR_2MM_X: 4.46 ml, 3 lesions"
    canvas = qc.render(volume(flair), volume(mask), title=title, tile_px=24)
    width = canvas.shape[1]
    lines = qc._word_lines(title, qc.HEADER_RGB, width - 8, 2)
    assert " ".join(text for text, _ in lines) == title  # nothing cut
    assert all(qc.text_width(text, 2) <= width - 8 for text, _ in lines[1:])
    assert canvas.shape[0] > qc.HEADER_PX + 24  # more than one line in the band
    # the last line, "LESIONS", is drawn whole: its band row holds the width of 7 glyphs
    last_row = canvas[4 + (len(lines) - 1) * (qc.HEADER_PX - 4):][:10]
    lit = np.flatnonzero(np.all(last_row == qc.HEADER_RGB, axis=2).any(axis=0))
    assert lit[-1] - lit[0] + 1 == qc.text_width(lines[-1][0], 2)


def test_a_mask_off_the_image_grid_is_refused_naming_the_difference():
    from DeepWMLLib.errors import DeepWMLError

    flair, mask = head_with_marker()
    image = volume(flair)
    rotated = (np.cos(0.1), -np.sin(0.1), 0, np.sin(0.1), np.cos(0.1), 0, 0, 0, 1)
    off = {
        "size": volume(mask[:, :-1]),
        "spacing": volume(mask, spacing=(1.0, 1.0, 4.0)),
        "origin": volume(mask),
        "direction": volume(mask, direction=rotated),
    }
    off["origin"].SetOrigin((0.0, 0.0, 2.5))  # half a slice
    for what, lesion in off.items():
        drawers = {
            "render": lambda: qc.render(image, lesion, tile_px=24),
            "render with ventricles": lambda: qc.render(image, volume(mask), tile_px=24, ventricles=lesion),
            "comparison": lambda: qc.render_comparison(image, lesion, volume(mask), tile_px=24),
            "comparison reference": lambda: qc.render_comparison(image, volume(mask), lesion, tile_px=24),
            "labels": lambda: qc.render_labels(image, lesion, {1: qc.LESION_RGB}, [], tile_px=24),
        }
        for name, draw in drawers.items():
            with pytest.raises(DeepWMLError, match=f"different voxel grids \\({what} ") as info:
                draw()
            assert "\n" not in str(info.value), name
    assert "the ventricle mask and the FLAIR image" in str(pytest.raises(DeepWMLError, qc.render, image, volume(mask),
                                                                        ventricles=off["size"]).value)
    # floating point noise from a format conversion is the same grid, as everywhere else
    noisy = volume(mask, spacing=(1.0 + 1e-6, 1.0, 5.0))
    noisy.SetOrigin((1e-4, 0.0, 0.0))
    assert np.array_equal(qc.render(image, noisy, tile_px=24), qc.render(image, volume(mask), tile_px=24))


def test_evaluate_draws_a_prediction_and_flair_each_on_the_references_grid_within_tolerance(tmp_path):
    # io's tolerance (a hundredth of a voxel here) is met by each against the reference, not by the two together
    from DeepWMLLib import io
    from DeepWMLLib.evaluation import comparison_picture

    flair, mask = make_volume(size=(30, 30, 10))
    step = 0.8 * io._ORIGIN_TOL_FRACTION * min(flair.GetSpacing())

    def moved(image, by):
        image = sitk.Image(image)
        image.SetOrigin([o + by for o in image.GetOrigin()])
        return image

    sitk.WriteImage(moved(flair, step), str(tmp_path / "flair.nii.gz"))
    picture = comparison_picture(tmp_path / "flair.nii.gz", moved(mask, -step), mask)
    assert picture.startswith(b"\x89PNG")
    with pytest.raises(DeepWMLError, match="origin"):  # off the grid by more: still refused
        qc.render_comparison(flair, moved(mask, 3 * step), mask)


def test_pictures_of_two_masks_saved_cropped_are_drawn_on_the_flairs_grid_as_the_whole_masks_are(tmp_path):
    """Two masks each saved cropped to their lesions (Slicer's 'Crop to minimum extent'), each over part of the
    other's extent, drawn with the FLAIR: refused before ('both saved cropped'); now each is padded onto the FLAIR's
    grid, and the picture is the very picture of the masks saved whole, for consensus and evaluate alike."""
    from DeepWMLLib import io
    from DeepWMLLib.consensus import pair_picture
    from DeepWMLLib.evaluation import comparison_picture

    flair, truth = make_volume(size=(40, 40, 8), blobs=((0.3, 0.3, 0.3, 5.0), (0.7, 0.7, 0.7, 5.0)))
    sitk.WriteImage(flair, str(tmp_path / "flair.nii.gz"))
    drawn = sitk.GetArrayFromImage(truth)  # rater B: the second lesion, and one beyond it that rater A has not
    drawn[:, :, :20] = 0
    drawn[7, 34:37, 35:38] = 1
    other = sitk.GetImageFromArray(drawn)
    other.CopyInformation(truth)
    box = sitk.LabelShapeStatisticsImageFilter()
    cropped = []
    for mask in (truth, other):
        box.Execute(mask)
        i, j, k, ni, nj, nk = box.GetBoundingBox(1)
        cropped.append(mask[i:i + ni, j:j + nj, k:k + nk])
    placed = [io._lattice_placement(a, b) for a, b in (cropped, cropped[::-1])]  # each over part of the other's
    assert not any(io._holds(b, *placement) for placement, b in zip(placed, cropped[::-1]))
    for draw in (pair_picture, comparison_picture):
        whole = draw(tmp_path / "flair.nii.gz", truth, other)
        assert draw(tmp_path / "flair.nii.gz", *cropped) == whole


def letters_at(tile_rgb: np.ndarray, letter: str, scale: int = 2) -> list[tuple[int, int]]:
    """The top left corners of `letter` drawn whole in LABEL_RGB (every pixel of its 3 x 5 cell, ink or not)."""
    glyph = np.kron(qc._GLYPH_MASKS[letter], np.ones((scale, scale), bool))
    ink = np.all(tile_rgb == qc.LABEL_RGB, axis=2)
    return [(y, x) for y, x in zip(*np.nonzero(ink))
            if np.array_equal(ink[y:y + glyph.shape[0], x:x + glyph.shape[1]], glyph)]


@pytest.mark.parametrize("direction", [
    np.diag([-1.0, -1.0, 1.0]),  # stored right to left and posterior to anterior (a RAS-ordered file)
    rotation(0.15, -0.1, 0.45) @ np.diag([-1.0, 1.0, 1.0]),  # oblique and flipped
], ids=["RAS-ordered", "oblique-flipped"])
def test_the_patients_right_is_marked_R_on_the_side_the_tiles_show_it(direction):
    """The tiles show the patient's right on the left (radiological), but nothing in the picture said so: a
    picture read on its own did not tell left from right. Each tile now has 'R' and 'L' at its sides; a
    lesion placed on the patient's right (negative x in LPS) lies on the side marked R, whatever the voxel order."""
    size, spacing = (96, 96, 5), (1.0, 1.0, 5.0)
    image = sitk.Image(size, sitk.sitkFloat32)
    image.SetSpacing(spacing)
    image.SetDirection(tuple(direction.ravel()))
    centre = np.array(image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in size]))
    image.SetOrigin(tuple(np.array(image.GetOrigin()) - centre))  # the grid's centre at the physical origin
    k, j, i = np.meshgrid(*(np.arange(n) for n in size[::-1]), indexing="ij")
    points = np.stack([i, j, k], -1).reshape(-1, 3) * spacing @ direction.T + image.GetOrigin()
    x, y = points[:, 0].reshape(k.shape), points[:, 1].reshape(k.shape)
    head = (x / 40) ** 2 + (y / 44) ** 2 < 1
    lesion = ((x + 25) ** 2 + (y - 5) ** 2 < 36) & (k == 2)  # 25 mm to the patient's right
    flair = sitk.GetImageFromArray(np.where(head, 100.0, 0.0).astype(np.float32) + 300 * lesion)
    mask = sitk.GetImageFromArray(lesion.astype(np.uint8))
    for im in (flair, mask):
        im.CopyInformation(image)
    for canvas in (qc.render(flair, mask, tile_px=160, columns=1),
                   qc.render_comparison(flair, mask, mask, tile_px=160, columns=1)):
        shape = tile_shape(canvas.transpose(1, 0, 2), 5)[::-1]  # one column of five tiles
        marked = tile(canvas, 2, *shape, columns=1)
        where = np.nonzero(np.any(marked != marked[..., :1], axis=2) & ~np.all(marked == qc.LABEL_RGB, axis=2))
        assert where[1].size and where[1].mean() < shape[1] / 2  # the lesion (coloured) on the left half
        first = tile(canvas, 0, *shape, columns=1)  # the sides are marked once, on the first tile
        (_, right), = letters_at(first, "R")
        (_, left), = letters_at(first, "L")
        assert right < shape[1] / 4 and left > 3 * shape[1] / 4
        assert not letters_at(marked, "R") and not letters_at(marked, "L")


def test_the_crop_box_widens_by_5_mm_rounded_up_to_whole_voxels_on_both_sides():
    """Head or mark on rows 10 and 11 of 30: 5 mm at 0.8 mm a row is 6.25 rows, widened to 7 on each side, so rows
    3 to 18 are shown ([3, 19)); at 1 mm, 5 rows ([5, 17)); clipped at the edges of the slice."""
    present = np.zeros(30, bool)
    present[10:12] = True
    assert qc._box(present, 0.8) == (3, 19)
    assert qc._box(present, 1.0) == (5, 17)
    assert qc._box(present, 0.5) == (0, 22)
    assert qc._box(np.zeros(30, bool), 1.0) == (0, 30)


def test_the_grey_window_by_hand():
    """500 background voxels at 0 and a head of 1, 2, ..., 500: the background level (0.5th percentile, nearest rank
    round(0.005 x 999) = 5) is 0 and the bright end (rank 994) 495, so the head is above a tenth of the way, 49.5:
    the 451 voxels 50 to 500. Its window: their ranks round(0.01 x 450) = 4 and round(0.995 x 450) = 448, 54 to 498
    (not their lowest and highest, 50 and 500)."""
    voxels = np.concatenate([np.zeros(500), np.arange(1, 501)]).astype(np.float32).reshape(10, 10, 10)
    assert qc.grey_levels(voxels) == (49.5, 54.0, 498.0)


def test_a_slice_with_a_twentieth_of_its_voxels_in_the_head_is_a_head_slice():
    """Five 20 x 20 slices: the middle three all head, the first and the last with 20 of 400 voxels (5 %) in the head
    (over the 1 % a head slice needs): all five are shown, one tile each under the other (one column)."""
    flair = np.zeros((5, 20, 20), np.float32)
    flair[1:4] = 100
    flair[[0, 4], 0, :] = 100  # a row of 20 voxels
    canvas = qc.render(volume(flair, spacing=(1.0, 1.0, 1.0)), volume(np.zeros((5, 20, 20), np.uint8),
                                                                        spacing=(1.0, 1.0, 1.0)), columns=1)
    side = canvas.shape[1] - 2 * qc.GAP_PX  # square tiles: the head fills the 20 x 20 mm plane
    assert (canvas.shape[0] - qc.GAP_PX) / (side + qc.GAP_PX) == 5


def test_a_prediction_voxel_of_exactly_half_is_drawn_as_lesion_as_the_metrics_count_it():
    """metrics: a voxel is lesion when its value is >= 0.5; the comparison picture draws a float prediction of 0.5
    as it draws 1 (agreement green where the reference has lesion, red where not)."""
    flair, _ = head_with_marker()
    reference = np.zeros(flair.shape, np.uint8)
    reference[2, 14:17, 10:13] = 1
    half, whole = np.zeros(flair.shape, np.float32), np.zeros(flair.shape, np.float32)
    half[2, 14:17, 10:16] = 0.5
    whole[2, 14:17, 10:16] = 1.0
    drawn = [qc.render_comparison(volume(flair), volume(p), volume(reference), tile_px=24) for p in (half, whole)]
    empty = qc.render_comparison(volume(flair), volume(np.zeros(flair.shape, np.float32)), volume(reference), tile_px=24)
    assert np.array_equal(drawn[0], drawn[1]) and not np.array_equal(drawn[0], empty)


def test_each_tile_is_numbered_with_its_slice_index_0_first():
    flair, mask = head_with_marker()
    assert np.array_equal(qc.render(volume(flair), volume(mask)),
                          qc.render(volume(flair), volume(mask), slice_labels=[0, 1, 2, 3, 4]))


def test_the_comparison_legend_names_each_colour_as_the_picture_fills_it(monkeypatch):
    """Prediction only is filled red (255, 40, 40) and reference only blue (40, 120, 255): the legend says so."""
    flair, mask = head_with_marker()
    given = []
    monkeypatch.setattr(qc, "render_labels", lambda image, labels, colours, legend, *rest: given.append((colours, legend)))
    qc.render_comparison(volume(flair), volume(mask), volume(mask), names=("rater A", "rater B"))
    colours, legend = given[0]
    assert legend == [("both", (40, 220, 40)), ("rater A only", (255, 40, 40)), ("rater B only", (40, 120, 255))]
    assert colours == {1: (40, 220, 40), 2: (255, 40, 40), 3: (40, 120, 255)}


def test_a_tile_has_the_nearest_whole_number_of_display_pixels():
    """10 voxels of 1 mm shown at 0.6 mm a pixel: 16.7, so 17 pixels (not 16); at 4 mm, 2.5: 2 (round half to even);
    at 0.4 mm, 25."""
    for pixel_mm, count in ((0.6, 17), (4.0, 2), (0.4, 25)):
        centres, starts = qc._resample_indices(10, 1.0, pixel_mm)
        assert len(centres) == len(starts) == count


def test_a_lesion_inside_the_ventricle_mask_stays_a_lesion_and_only_lesions_choose_the_slices(monkeypatch):
    """The ventricles are drawn under the lesions: a lesion the ventricle mask covers whole is still outlined red.
    And the slices are chosen by the lesions alone: the ventricles on slices 0-4 do not make them lesion slices."""
    flair, mask = head_with_marker()
    ventricles = np.zeros_like(mask)
    ventricles[:, 3:12, 8:18] = 1  # covers the lesion (slice 2, rows 3-6, columns 13-16) and more, on every slice
    plain = qc.render(volume(flair), volume(mask))
    picture = qc.render(volume(flair), volume(mask), ventricles=volume(ventricles))
    tiles = picture[picture.shape[0] - plain.shape[0]:]  # below the legend's band
    assert np.any(np.all(tiles == qc.LESION_RGB, axis=2)) and np.any(np.all(tiles == qc.VENTRICLE_RGB, axis=2))
    chosen = []
    real = qc.choose_slices
    monkeypatch.setattr(qc, "choose_slices", lambda head, lesion, max_tiles: chosen.append(lesion) or real(
        head, lesion, max_tiles))
    qc.render(volume(flair), volume(mask), ventricles=volume(ventricles))
    assert chosen[0].tolist() == [False, False, True, False, False]


def test_a_slice_number_that_just_fits_at_2x_is_drawn_at_2x():
    """'0' at 2x is 6 x 10 pixels, drawn at (2, 2) on a backing one pixel wider: a 13 x 9 tile holds it exactly.
    Its top stroke ('111') then covers rows 2-3, columns 2-7; one pixel narrower, it is drawn at 1x."""
    for width, scale in ((9, 2), (8, 1)):
        tile = np.full((13, width, 3), 255, np.uint8)
        assert qc._draw_number(tile, 0)
        top = np.all(tile == qc.LABEL_RGB, axis=2)
        assert top[2:2 + scale, 2:2 + 3 * scale].all() and not top[2:2 + scale, 2 + 3 * scale:].any(), width


def test_r_and_l_are_drawn_at_2x_from_a_tile_96_pixels_wide():
    """'R' has 10 inked pixels of its 3 x 5 glyph and 'L' 7: 17 at 1x, 68 at 2x. A tile 96 pixels wide (SIDES_2X_PX)
    gets them at 2x, one of 95 at 1x, one of 48 (SIDES_1X_PX) still at 1x, one of 47 none."""
    for width, inked in ((96, 68), (95, 17), (48, 17), (47, 0)):
        tile = np.full((30, width, 3), 255, np.uint8)
        assert qc._draw_sides(tile) is (inked > 0)
        assert np.all(tile == qc.LABEL_RGB, axis=2).sum() == inked, width
    tile = np.full((30, 96, 3), 255, np.uint8)
    qc._draw_sides(tile)  # at the middle of the edges: 10 rows of 2x letters from row (30 - 10) // 2
    assert np.flatnonzero(np.all(tile == qc.LABEL_RGB, axis=2).any(axis=1)).tolist() == list(range(10, 20))


def test_the_outline_takes_the_image_edge_as_outside():
    """A 3 x 3 mask filling its image is outlined on its 8 edge pixels (the edge is outside), its centre not; a 2 x 2
    block inside a 4 x 4 image is all outline."""
    full = np.ones((3, 3), bool)
    expected = np.ones((3, 3), bool)
    expected[1, 1] = False
    assert np.array_equal(qc.in_plane_outline(full), expected)
    block = np.zeros((4, 4), bool)
    block[1:3, 1:3] = True
    assert np.array_equal(qc.in_plane_outline(block), block)
