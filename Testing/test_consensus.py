"""Two-rater consensus: verdict, where the raters disagree, lesions drawn by one rater only, cohorts."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import rotation

from DeepWMLLib import io
from DeepWMLLib.cli import main
from DeepWMLLib.consensus import consensus_check
from DeepWMLLib.errors import DeepWMLError

SPACING = (0.6, 0.8, 4.0)
DIRECTION = rotation(0.2, -0.1, 0.7)
ORIGIN = (31.0, -12.0, 5.5)


def image(array, spacing=SPACING) -> sitk.Image:
    im = sitk.GetImageFromArray(np.asarray(array, np.uint8))
    im.SetSpacing(spacing)
    im.SetDirection(tuple(DIRECTION.ravel()))
    im.SetOrigin(ORIGIN)
    return im


def raters() -> tuple[np.ndarray, np.ndarray]:
    """B draws two lesions; A draws them slightly differently and adds a lesion of its own."""
    b = np.zeros((8, 30, 30), np.uint8)
    b[2:4, 5:15, 5:15] = 1          # 200 voxels
    b[6, 20:24, 20:24] = 1          # 16 voxels
    a = b.copy()
    a[3, 5:15, 5:15] = 0            # A leaves out one slice of the first lesion (100 voxels)
    a[6, 2:5, 24:28] = 1            # and draws a lesion B does not have (12 voxels)
    return a, b


def test_consensus_check_reports_dice_slices_and_lesions_of_one_rater_only():
    a, b = raters()
    result = consensus_check(image(a), image(b))
    assert result["dice"] == pytest.approx(2 * 116 / (128 + 216))
    assert result["passed"] is False and result["threshold"] == 0.85
    pixel = 0.6 * 0.8
    assert [s["index"] for s in result["slices"]] == [2, 3, 6]
    slice3 = result["slices"][1]
    assert slice3 == {"index": 3, "dice": 0.0, "area_a_mm2": 0.0, "area_b_mm2": pytest.approx(100 * pixel),
                      "disagreement_mm2": pytest.approx(100 * pixel)}
    assert result["worst_slices"] == [3, 6]  # slice 2 agrees perfectly
    assert result["unmatched_lesions_b"] == []
    [extra] = result["unmatched_lesions_a"]
    assert extra["voxels"] == 12 and extra["volume_mm3"] == pytest.approx(12 * 0.6 * 0.8 * 4.0)
    assert extra["slices"] == [6, 6]
    centre = image(a).TransformContinuousIndexToPhysicalPoint((25.5, 3.0, 6.0))  # (i, j, k) mean
    assert extra["centroid_lps_mm"] == pytest.approx(centre, abs=0.01)



def test_a_mask_stored_with_its_slices_the_other_way_says_whose_slice_numbers_are_shown():
    """Rater A's mask saved with its slices from the top down (another voxel order: reordered onto B's exactly, the
    figures unchanged) was listed under B's slice numbers unsaid, so A's slice 1 was shown as slice 6: a note now
    says so and maps them; a mask stored another way whose slice numbers stay the same (rows flipped) gets none."""
    a, b = raters()
    top_down = sitk.Flip(image(a), [False, False, True])  # the same voxels in space, slice k stored as 7 - k
    result = consensus_check(top_down, image(b))
    assert result["dice"] == pytest.approx(2 * 116 / (128 + 216)) and result["worst_slices"] == [3, 6]
    assert result["notes"] == ["rater A's mask stores its slices in another order than the grid compared on (it was "
                               "reordered onto it, exactly, nothing interpolated): the slice numbers shown are that "
                               "grid's, and slices 0 to 7 shown are rater A's mask's own slices 7 to 0"]
    assert consensus_check(sitk.Flip(image(a), [True, True, False]), image(b))["notes"] == []
    assert consensus_check(image(a), image(b))["notes"] == []

@pytest.mark.parametrize("scan", [False, True])
def test_a_mask_in_another_voxel_order_is_reordered_once(monkeypatch, scan):
    """Rater A's mask stored top down was reordered (a copy of every voxel: 57 ms for 512 x 512 x 40) onto B's grid to
    compare them, then again to tell whether it lay on the same grid (for the scan held against it, and for the note
    of whose slice numbers are shown): three times, four with the FLAIR given. Now once; the rest is told from the
    geometry alone (io.reorders_onto), the figures and the note as they were."""
    a, b = raters()
    top_down = sitk.Flip(image(a), [False, False, True])
    reorders = []
    orient = sitk.DICOMOrient

    def counted(*args, **kwargs):
        reorders.append(args[0].GetSize())
        return orient(*args, **kwargs)

    monkeypatch.setattr(sitk, "DICOMOrient", counted)
    result = consensus_check(top_down, image(b), flair=image(b) if scan else None)
    assert result["dice"] == pytest.approx(2 * 116 / (128 + 216)) and result["worst_slices"] == [3, 6]
    assert result["notes"][-1].endswith("slices 0 to 7 shown are rater A's mask's own slices 7 to 0")
    assert len(reorders) == 1


def test_each_slice_shows_its_dice_and_both_raters_areas_in_mm2():
    """The slices `deepwml consensus` and the Slicer table show, by hand from `raters()`: slice 2, both raters the
    same 100 voxels (Dice 1); slice 6, B 16 voxels, A the same 16 and 12 more: Dice 2 x 16 / (28 + 16) = 8/11,
    areas 28 and 16 pixels of 0.6 x 0.8 mm, 12 of them marked by A only."""
    a, b = raters()
    slices = {s["index"]: s for s in consensus_check(image(a), image(b))["slices"]}
    pixel = 0.6 * 0.8
    assert slices[2] == {"index": 2, "dice": 1.0, "area_a_mm2": pytest.approx(100 * pixel),
                         "area_b_mm2": pytest.approx(100 * pixel), "disagreement_mm2": 0.0}
    assert slices[6] == {"index": 6, "dice": pytest.approx(8 / 11), "area_a_mm2": pytest.approx(28 * pixel),
                         "area_b_mm2": pytest.approx(16 * pixel), "disagreement_mm2": pytest.approx(12 * pixel)}


def test_lesions_of_one_rater_only_are_those_the_other_does_not_touch_largest_first():
    """A draws three lesions, B one voxel of the third only: the first two are A's alone, listed largest first
    (the 6-voxel one on slice 5 before the 2-voxel one on slice 1, which comes first in the file); the third,
    touched by one voxel of B, is not."""
    a, b = np.zeros((8, 12, 12), np.uint8), np.zeros((8, 12, 12), np.uint8)
    a[1, 1, 1:3] = 1  # 2 voxels
    a[5, 8, 2:8] = 1  # 6 voxels
    a[3, 5, 5:9] = 1  # 4 voxels...
    b[3, 5, 8] = 1  # ...one of which B marks
    result = consensus_check(image(a), image(b))
    assert [(lesion["voxels"], lesion["slices"]) for lesion in result["unmatched_lesions_a"]] == [(6, [5, 5]), (2, [1, 1])]
    assert result["unmatched_lesions_b"] == []


def test_each_raters_volume_and_lesion_count_are_their_own():
    """From `raters()`: A 100 + 16 + 12 = 128 voxels in 3 lesions, B 200 + 16 = 216 in 2; voxels 0.6 x 0.8 x 4 =
    1.92 mm3, so A 0.24576 ml and B 0.41472 ml."""
    a, b = raters()
    result = consensus_check(image(a), image(b))
    assert (result["volume_a_ml"], result["volume_b_ml"]) == pytest.approx((0.24576, 0.41472))
    assert (result["n_lesions_a"], result["n_lesions_b"]) == (3, 2)


def test_threshold_is_inclusive():
    b = np.zeros((3, 10, 10), np.uint8)
    b[1, 0:4, 0:5] = 1    # 20 voxels
    a = b.copy()
    a[1, 3, 2:5] = 0      # 17 voxels in common
    a[1, 5, 0:3] = 1      # 20 voxels each: Dice 34/40 = 0.85 exactly
    assert consensus_check(image(a), image(b))["passed"] is True
    assert consensus_check(image(a), image(b), threshold=0.851)["passed"] is False


def test_two_empty_masks_agree():
    empty = np.zeros((3, 5, 5), np.uint8)
    result = consensus_check(image(empty), image(empty))
    assert (result["dice"], result["passed"], result["slices"]) == (1.0, True, [])


def test_masks_on_different_grids_are_refused():
    a, b = raters()
    with pytest.raises(DeepWMLError, match="rater A's mask and rater B's mask are on different voxel grids"):
        consensus_check(image(a), image(b, spacing=(0.6, 0.8, 5.0)))


def test_masks_given_as_files_are_read_as_evaluate_case_reads_them(tmp_path):
    """consensus_check took images only (a path: 'must be an image ... got str') where evaluate_case takes a path too:
    a file (str or pathlib.Path) is read as `deepwml consensus` reads it, and named in an error."""
    a, b = raters()
    sitk.WriteImage(image(a * 255), str(tmp_path / "a.nii.gz"))  # a two-valued 0/255 file: 255 is lesion
    sitk.WriteImage(image(b), str(tmp_path / "b.nrrd"))
    expected = consensus_check(image(a), image(b))
    assert consensus_check(str(tmp_path / "a.nii.gz"), tmp_path / "b.nrrd")["dice"] == expected["dice"]
    with pytest.raises(DeepWMLError, match="does not exist"):
        consensus_check(tmp_path / "missing.nii.gz", image(b))
    with pytest.raises(DeepWMLError, match=f"rater A's mask {tmp_path / 'a.nii.gz'} and rater B's mask are on "):
        consensus_check(tmp_path / "a.nii.gz", image(b, spacing=(0.6, 0.8, 5.0)))


def test_cli_prints_the_verdict_and_exits_zero_on_fail(tmp_path, capsys):
    a, b = raters()
    io.write_image(image(a), tmp_path / "a.nii.gz")
    io.write_image(image(b), tmp_path / "b.nii.gz")
    assert main(["consensus", str(tmp_path / "a.nii.gz"), str(tmp_path / "b.nii.gz"),
                 "--json", str(tmp_path / "c.json")]) == 0
    out = capsys.readouterr().out
    assert "FAIL" in out and "lesions drawn by rater A only: 1" in out and "rater B only: none" in out
    data = json.loads((tmp_path / "c.json").read_text(encoding="utf-8"))
    assert {"dice", "threshold", "passed", "slices", "unmatched_lesions_a", "unmatched_lesions_b"} <= set(data)
    assert set(data["slices"][0]) >= {"index", "dice", "area_a_mm2", "area_b_mm2"}
    assert main(["consensus", str(tmp_path / "a.nii.gz"), str(tmp_path / "b.nii.gz"), "--threshold", "0.5"]) == 0
    assert "PASS" in capsys.readouterr().out


def test_cli_shows_dice_and_threshold_so_that_they_read_as_the_verdict(tmp_path, capsys):
    a, b = raters()  # Dice 2 * 116 / (128 + 216) = 0.6744...
    io.write_image(image(a), tmp_path / "a.nii.gz")
    io.write_image(image(b), tmp_path / "b.nii.gz")
    assert main(["consensus", str(tmp_path / "a.nii.gz"), str(tmp_path / "b.nii.gz"), "--threshold", "0.6744"]) == 0
    assert "Dice 0.6744 (threshold 0.6744): PASS" in capsys.readouterr().out  # not "0.674 (threshold 0.67)"
    assert main(["consensus", str(tmp_path / "a.nii.gz"), str(tmp_path / "b.nii.gz"), "--threshold", "0.6745"]) == 0
    assert "Dice 0.674 (threshold 0.6745): FAIL" in capsys.readouterr().out  # 3 digits already read right
    # a --json that cannot be written is said before the check, which prints nothing
    assert main(["consensus", str(tmp_path / "a.nii.gz"), str(tmp_path / "b.nii.gz"),
                 "--json", str(tmp_path / "missing" / "c.json")]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and "does not exist" in captured.err


def test_a_cohort_shows_dice_so_that_it_reads_as_the_verdict(tmp_path, capsys, monkeypatch):
    """The single pair's verdict showed enough digits (above), but a cohort's progress line and its pictures'
    titles gave three: 'Dice 0.674 PASS' at a threshold of 0.6744."""
    from DeepWMLLib import consensus

    a, b = raters()  # Dice 0.67442
    io.write_image(image(a), tmp_path / "a.nii.gz")
    io.write_image(image(b), tmp_path / "b.nii.gz")
    io.write_image(image(np.zeros_like(a)), tmp_path / "flair.nii.gz")
    titles = []
    monkeypatch.setattr(consensus, "pair_picture", lambda flair, ma, mb, title=None: titles.append(title) or b"png")
    (tmp_path / "raters.csv").write_text("case,rater_a,rater_b,flair\npair,a.nii.gz,b.nii.gz,flair.nii.gz\n")
    assert main(["consensus", "--manifest", str(tmp_path / "raters.csv"), "-o", str(tmp_path / "out"),
                 "--threshold", "0.6744"]) == 0
    assert "pair: Dice 0.6744 PASS" in capsys.readouterr().err
    assert titles == ["pair: Dice 0.6744"]


@pytest.mark.parametrize("args, message, code", [
    (["consensus", "nowhere_a.nii.gz", "nowhere_b.nii.gz"], "does not exist", 1),
    (["consensus", "a", "b", "--threshold", "85"], "between 0 and 1", 2),  # usage errors exit 2
    (["consensus", "only_one.nii.gz"], "give two masks", 2),
    (["consensus", "--manifest", "raters.csv"], "needs -o OUTDIR", 2),
])
def test_cli_errors_exit_non_zero_with_one_line(capsys, args, message, code):
    try:
        assert main(args) == code
    except SystemExit as exc:  # argparse's own
        assert exc.code == code
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_cohort_lists_cases_to_relabel_and_records_broken_cases(tmp_path, capsys):
    a, b = raters()
    for name, array in (("a", a), ("b", b)):
        io.write_image(image(array), tmp_path / f"{name}.nii.gz")
    (tmp_path / "raters.csv").write_text(
        "case,rater_a,rater_b\n"
        "agree,b.nii.gz,b.nii.gz\n"
        "disagree,a.nii.gz,b.nii.gz\n"
        "broken,a.nii.gz,missing.nii.gz\n"
        "both,gone_a.nii.gz,gone_b.nii.gz\n")
    out = tmp_path / "out"
    assert main(["consensus", "--manifest", str(tmp_path / "raters.csv"), "-o", str(out)]) == 1
    assert "broken" in capsys.readouterr().err
    with open(out / "consensus.csv", newline="", encoding="utf-8-sig") as f:
        rows = {r["case"]: r for r in csv.DictReader(f)}
    assert rows["agree"]["passed"] == "True" and rows["disagree"]["passed"] == "False"
    assert rows["disagree"]["n_unmatched_lesions_a"] == "1" and rows["disagree"]["worst_slice"] == "3"
    assert "does not exist" in rows["broken"]["error"] and rows["broken"]["dice"] == ""
    assert "gone_a.nii.gz and " in rows["both"]["error"] and "gone_b.nii.gz do not exist" in rows["both"]["error"]
    assert (out / "relabel.txt").read_text(encoding="utf-8") == "disagree\n"
    details = json.loads((out / "consensus.json").read_text(encoding="utf-8"))
    assert details["relabel"] == ["disagree"] and details["failed"][0]["case"] == "broken"


def test_output_into_a_closed_pipe_ends_quietly(tmp_path, monkeypatch, capsys):
    """`deepwml consensus A B | head -1`: the reader leaving is no internal error."""
    import sys

    mask = sitk.Image(8, 8, 3, sitk.sitkUInt8)
    mask[2, 2, 1] = 1
    sitk.WriteImage(mask, str(tmp_path / "a.nii.gz"))

    class ClosedPipe:
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            pass

    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert main(["consensus", str(tmp_path / "a.nii.gz"), str(tmp_path / "a.nii.gz")]) == 141
    assert "error" not in capsys.readouterr().err


def test_an_empty_mask_is_said_in_words(tmp_path, capsys):
    """Two empty masks printed 'Dice 1.000: PASS' with nothing saying that neither rater drew anything."""
    empty, (a, _) = np.zeros((3, 5, 5), np.uint8), raters()
    assert consensus_check(image(empty), image(empty))["notes"] == [
        "both raters' masks are empty: they agree by convention (Dice 1)"]
    assert consensus_check(image(a), image(np.zeros_like(a)))["notes"] == ["rater B's mask is empty: Dice 0"]
    for name, array in (("a", empty), ("b", empty)):
        io.write_image(image(array), tmp_path / f"{name}.nii.gz")
    assert main(["consensus", str(tmp_path / "a.nii.gz"), str(tmp_path / "b.nii.gz")]) == 0
    assert "note: both raters' masks are empty" in capsys.readouterr().out
    (tmp_path / "raters.csv").write_text("case,rater_a,rater_b\nnone,a.nii.gz,b.nii.gz\n")
    main(["consensus", "--manifest", str(tmp_path / "raters.csv"), "-o", str(tmp_path / "out")])
    with open(tmp_path / "out" / "consensus.csv", newline="", encoding="utf-8-sig") as f:
        assert next(csv.DictReader(f))["notes"] == "both raters' masks are empty: they agree by convention (Dice 1)"


def test_a_cohort_of_masks_saved_cropped_counts_slices_on_the_flair_when_given(tmp_path):
    """Two raters' masks each saved cropped to their lesions (Slicer's 'Crop to minimum extent'): refused before
    ('both saved cropped'). Now the verdict is the whole masks'; without a FLAIR the slice numbers count from the
    extent of both (a voxel before rater B's first lesion slice: slice 3 of the scan is 2 there) and a note says
    so; with the case's FLAIR in the manifest they are the scan's, and the picture is drawn."""
    a, b = raters()
    whole = consensus_check(image(a), image(b))
    flair = sitk.GetImageFromArray(np.random.default_rng(0).normal(300, 30, a.shape).astype(np.float32))
    flair.CopyInformation(image(a))
    io.write_image(flair, tmp_path / "flair.nii.gz")
    for name, array in (("a", a), ("b", b)):
        k, j, i = (slice(n.min(), n.max() + 1) for n in np.nonzero(array))
        io.write_segmentation(image(array)[i, j, k], tmp_path / f"{name}.seg.nrrd")
    (tmp_path / "raters.csv").write_text("case,rater_a,rater_b,flair\n"
                                         "alone,a.seg.nrrd,b.seg.nrrd,\n"
                                         "with_flair,a.seg.nrrd,b.seg.nrrd,flair.nii.gz\n")
    out = tmp_path / "out"
    code = main(["consensus", "--manifest", str(tmp_path / "raters.csv"), "-o", str(out)])
    with open(out / "consensus.csv", newline="", encoding="utf-8-sig") as f:
        rows = {r["case"]: r for r in csv.DictReader(f)}
    for row in rows.values():
        assert not row["error"] and float(row["dice"]) == pytest.approx(whole["dice"], abs=1e-6)
        assert row["passed"] == str(whole["passed"])
    assert code == 0  # no case failed: both were read and compared
    assert whole["worst_slices"][0] == 3
    assert rows["alone"]["worst_slice"] == "2" and "slice numbers count from" in rows["alone"]["notes"]
    assert rows["with_flair"]["worst_slice"] == "3" and "slice numbers" not in rows["with_flair"]["notes"]
    assert len(list((out / "qc").glob("*.png"))) == 1


def test_a_mask_over_a_larger_extent_counts_slices_on_the_flair_when_given(tmp_path):
    """Rater A's mask on the scan's grid, rater B's over a larger extent of the same voxels (padded by a tool:
    3 slices before the scan's first): A's was padded onto B's grid, so with the case's FLAIR given the worst slice
    was numbered from B's extent (6) while the picture, drawn on the FLAIR, showed the scan's (3). With the FLAIR
    the masks are now compared on its grid: the scan's slice numbers, the same figures; without it, as before."""
    from DeepWMLLib import evaluation

    a, b = raters()
    whole = consensus_check(image(a), image(b))
    assert whole["worst_slices"][0] == 3
    flair = sitk.GetImageFromArray(np.random.default_rng(0).normal(300, 30, a.shape).astype(np.float32))
    flair.CopyInformation(image(a))
    io.write_image(flair, tmp_path / "flair.nii.gz")
    larger = sitk.ConstantPad(image(b), (2, 1, 3), (1, 2, 2), 0)
    for flair_given in (flair, str(tmp_path / "flair.nii.gz")):
        result = consensus_check(image(a), larger, flair=flair_given)
        assert result["worst_slices"] == whole["worst_slices"], result["worst_slices"]
        assert result["dice"] == pytest.approx(whole["dice"]) and result["notes"] == whole["notes"]
        case = evaluation.evaluate_case(image(a), larger, flair=flair_given)
        assert [s["index"] for s in case["slices"]] == [s["index"] for s in evaluation.evaluate_case(
            image(a), image(b))["slices"]]
    assert consensus_check(image(a), larger)["worst_slices"][0] == 6  # no FLAIR: B's extent, as before


def test_a_cohort_manifest_is_read_as_training_reads_it(tmp_path, monkeypatch, capsys):
    """consensus read its manifest without what training's reader learned: a manifest made on Windows
    (..\\masks\\a.nii.gz) named no file, and paths typed relative to the current folder failed every pair with
    'does not exist' and no word of why."""
    a, b = raters()
    (tmp_path / "masks").mkdir()
    (tmp_path / "lists").mkdir()
    for name, array in (("a", a), ("b", b)):
        io.write_image(image(array), tmp_path / "masks" / f"{name}.nii.gz")
    windows = tmp_path / "lists" / "windows.csv"
    windows.write_text("case,rater_a,rater_b\nagree,..\\masks\\b.nii.gz,..\\masks\\b.nii.gz\n")
    assert main(["consensus", "--manifest", str(windows), "-o", str(tmp_path / "out")]) == 0
    with open(tmp_path / "out" / "consensus.csv", newline="", encoding="utf-8-sig") as f:
        assert [(r["case"], r["passed"]) for r in csv.DictReader(f)] == [("agree", "True")]
    typed_here = tmp_path / "lists" / "here.csv"
    typed_here.write_text("case,rater_a,rater_b\ndisagree,masks/a.nii.gz,masks/b.nii.gz\n")
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["consensus", "--manifest", str(typed_here), "-o", str(tmp_path / "here")]) == 1
    err = capsys.readouterr().err
    assert "not from the current folder, where 2 of them exist (e.g. masks/a.nii.gz)" in err and err.count("\n") == 1
    assert not (tmp_path / "here").exists()


def test_a_mask_over_a_larger_extent_says_what_lies_outside_the_other_raters_scan():
    """Rater B's mask over a larger extent than rater A's (the scan), with a lesion beyond A's grid: compared over
    B's extent, that lesion counts as disagreement and nothing said why. The notes now say how many ml lie outside
    A's grid, in either order; nothing when B's lesions all lie within it."""
    a, b = raters()
    larger = np.zeros((11,) + b.shape[1:], np.uint8)
    larger[:8] = b
    within = consensus_check(image(a), image(larger))
    assert not any("outside" in n for n in within["notes"]), within["notes"]
    larger[10, 5:10, 5:10] = 1  # 25 voxels beyond A's last slice
    ml = 25 * np.prod(SPACING) / 1000
    for first, second, whose, grid in ((a, larger, "rater B's mask", "rater A's mask's grid"),
                                       (larger, a, "rater A's mask", "rater B's mask's grid")):
        result = consensus_check(image(first), image(second))
        outside = [n for n in result["notes"] if "outside" in n]
        assert outside == [f"{ml:.2f} ml (25 voxels) of {whose} lie outside {grid} (the scan it was drawn on): they "
                           "were compared over the larger extent, where they count as disagreement (lowering Dice)"]
        assert result["dice"] < within["dice"]


def test_a_rerun_into_the_same_folder_leaves_nothing_of_the_earlier_run_beside_its_own(tmp_path, monkeypatch):
    """consensus rerun into its folder: a case's picture of a first run with a flair column stayed after a
    second run without one; and a run stopped before its consensus.json left the earlier run's beside its
    new consensus.csv. Now an earlier run's files go first."""
    a, b = raters()
    for name, array in (("a", a), ("b", b)):
        io.write_image(image(array), tmp_path / f"{name}.nii.gz")
    noise = np.random.default_rng(0).normal(100, 10, b.shape)
    flair = sitk.GetImageFromArray((noise + 80 * b).astype(np.float32))
    flair.CopyInformation(image(b))
    io.write_image(flair, tmp_path / "flair.nii.gz")
    (tmp_path / "pictured.csv").write_text("case,rater_a,rater_b,flair\ndisagree,a.nii.gz,b.nii.gz,flair.nii.gz\n")
    (tmp_path / "plain.csv").write_text("case,rater_a,rater_b\ndisagree,a.nii.gz,b.nii.gz\nagree,b.nii.gz,b.nii.gz\n")
    out = tmp_path / "out"
    assert main(["consensus", "--manifest", str(tmp_path / "pictured.csv"), "-o", str(out)]) == 0
    assert (out / "qc" / "disagree_qc.png").is_file()
    assert main(["consensus", "--manifest", str(tmp_path / "plain.csv"), "-o", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["consensus.csv", "consensus.json", "relabel.txt"]
    write_text = io.write_text

    def stopped(text, path):
        if path.name == "relabel.txt":
            raise KeyboardInterrupt
        return write_text(text, path)

    monkeypatch.setattr(io, "write_text", stopped)
    assert main(["consensus", "--manifest", str(tmp_path / "pictured.csv"), "-o", str(out)]) == 130  # Ctrl-C
    monkeypatch.setattr(io, "write_text", write_text)
    assert sorted(p.name for p in out.iterdir()) == ["consensus.csv", "qc"]  # no earlier run's verdicts beside it


def test_the_printed_verdict_lists_the_five_worst_slices_and_three_largest_lesions_by_hand():
    """format_check on a result written by hand: six slices of disagreement, of which the five largest are listed
    (slice 9, the sixth, is not); four lesions drawn by rater A only, of which the three largest are listed with
    their total (10 + 8 + 6 + 4 = 28 mm3); a lesion over slices 5 to 7 said "slices 5-7", one on slice 2 "slice 2"."""
    from DeepWMLLib.consensus import format_check

    slices = [{"index": k, "dice": 0.5, "area_a_mm2": 1.0, "area_b_mm2": 2.0, "disagreement_mm2": d}
              for k, d in ((1, 6.0), (3, 5.0), (4, 4.0), (6, 3.0), (8, 2.0), (9, 1.0))]
    lesions = [{"voxels": v, "volume_mm3": v, "centroid_lps_mm": [1.0, 2.0, 3.0], "slices": s}
               for v, s in ((10.0, [5, 7]), (8.0, [2, 2]), (6.0, [1, 1]), (4.0, [9, 9]))]
    result = {"dice": 0.5, "threshold": 0.85, "passed": False, "volume_a_ml": 0.03, "volume_b_ml": 0.02,
              "n_lesions_a": 4, "n_lesions_b": 0, "slices": slices, "worst_slices": [1, 3, 4, 6, 8, 9],
              "unmatched_lesions_a": lesions, "unmatched_lesions_b": [], "notes": []}
    lines = format_check(result).splitlines()
    assert lines[:2] == ["Dice 0.500 (threshold 0.85): FAIL (re-label)",
                         "rater A 0.03 ml in 4 lesions; rater B 0.02 ml in 0 lesions"]
    table = lines[lines.index("  slice   Dice   A mm2    B mm2    disagreement mm2") + 1:]
    assert [int(line.split()[0]) for line in table[:5]] == [1, 3, 4, 6, 8]
    assert table[0].split() == ["1", "0.500", "1.0", "2.0", "6.0"]  # A's area, then B's
    assert table[5] == "lesions drawn by rater A only: 4 (28.0 mm3), largest:"
    assert [line.split(", ")[-1] for line in table[6:9]] == ["slices 5-7", "slice 2", "slice 1"]
    assert table[9:] == ["lesions drawn by rater B only: none"]


def test_a_cohort_says_how_many_cases_pass_and_which_need_re_labelling(tmp_path, capsys):
    """Three cases, one of them unreadable: 2 checked, 1 passes (the same mask twice), 1 needs re-labelling."""
    a, b = raters()
    for name, array in (("a", a), ("b", b)):
        io.write_image(image(array), tmp_path / f"{name}.nii.gz")
    (tmp_path / "raters.csv").write_text("case,rater_a,rater_b\nagree,b.nii.gz,b.nii.gz\n"
                                         "disagree,a.nii.gz,b.nii.gz\nbroken,a.nii.gz,missing.nii.gz\n")
    main(["consensus", "--manifest", str(tmp_path / "raters.csv"), "-o", str(tmp_path / "out")])
    assert capsys.readouterr().out.splitlines()[0] == \
        "2 cases checked at Dice >= 0.85: 1 pass, 1 need re-labelling (disagree)"
    header = (tmp_path / "out" / "consensus.csv").read_text(encoding="utf-8-sig").splitlines()[0]
    assert header == ("case,dice,threshold,passed,volume_a_ml,volume_b_ml,n_lesions_a,n_lesions_b,n_unmatched_lesions_a,"
                      "n_unmatched_lesions_b,worst_slice,rater_a,rater_b,notes,error")


def test_a_threshold_of_zero_is_a_threshold_every_pair_passes():
    a, b = raters()
    result = consensus_check(image(a), image(b), threshold=0.0)
    assert result["passed"] is True and result["threshold"] == 0.0


def test_masks_that_barely_overlap_ask_whether_they_are_of_the_same_scan(tmp_path, capsys):
    """Two raters' masks of different patients (or visits) on one grid gave only a very low Dice (0.008), nothing
    saying why. Both raters marking lesions that barely overlap (Dice under 0.05) now asks to check both masks were
    drawn on the same scan of the same patient; a rater's eroded, dilated or thinned-out copy of the other's does not."""
    rng = np.random.default_rng(3)
    a, other = np.zeros((12, 40, 40), np.uint8), np.zeros((12, 40, 40), np.uint8)
    for mask in (a, other):  # ten blobs each, placed at random: another patient's lesions
        for _ in range(10):
            k, i, j = rng.integers((1, 3, 3), (11, 36, 36))
            mask[k - 1:k + 1, i - 2:i + 3, j - 2:j + 3] = 1
    mask_a = image(a)
    eroded, dilated = sitk.BinaryErode(mask_a, [1, 1, 0]), sitk.BinaryDilate(mask_a, [1, 1, 0])
    thinned = sitk.GetArrayFromImage(mask_a).copy()
    thinned[:6] = 0  # half the lesions left out
    for close in (eroded, dilated, image(thinned)):
        result = consensus_check(mask_a, close)
        assert result["dice"] >= 0.05 and not any("same scan" in n for n in result["notes"]), result["notes"]
    result = consensus_check(mask_a, image(other))
    assert result["dice"] < 0.05
    note = ("both raters marked lesions but they barely overlap (Dice %.3f, under 0.05): check that both masks were "
            "drawn on the same scan of the same patient (not another patient's, or another visit's)" % result["dice"])
    assert result["notes"] == [note]
    for name, array in (("a", a), ("b", other)):
        io.write_image(image(array), tmp_path / f"{name}.nii.gz")
    assert main(["consensus", str(tmp_path / "a.nii.gz"), str(tmp_path / "b.nii.gz")]) == 0
    assert f"note: {note}" in capsys.readouterr().out
    (tmp_path / "raters.csv").write_text("case,rater_a,rater_b\nmixed,a.nii.gz,b.nii.gz\nsame,a.nii.gz,a.nii.gz\n")
    main(["consensus", "--manifest", str(tmp_path / "raters.csv"), "-o", str(tmp_path / "out")])
    with open(tmp_path / "out" / "consensus.csv", newline="", encoding="utf-8-sig") as f:
        assert [row["notes"] for row in csv.DictReader(f)] == [note, ""]


def test_a_dice_just_under_the_low_overlap_bound_is_not_said_as_the_bound():
    """The low-overlap note said its Dice to 3 decimals: 0.0495 read 'Dice 0.050, under 0.05'."""
    a, b = np.zeros(12 * 40 * 40, np.uint8), np.zeros(12 * 40 * 40, np.uint8)
    a[:1010], b[960:1970] = 1, 1  # 50 voxels shared of 1010 each: Dice 100/2020 = 0.0495
    result = consensus_check(image(a.reshape(12, 40, 40)), image(b.reshape(12, 40, 40)))
    (note,) = [n for n in result["notes"] if "barely overlap" in n]
    assert "(Dice 0.0495, under 0.05)" in note, note


def test_two_masks_cropped_to_one_box_say_that_slice_numbers_count_from_the_box(tmp_path, capsys):
    """Both raters' masks saved cropped to one box (two segments of one segmentation, saved cropped together), no
    FLAIR given: compared on that box, so the worst slices were 1 and 4 for the scan's 3 and 6, and nothing said so
    (masks cropped to two different boxes have the joint-extent note). A note now says it, wherever the
    joint-extent note is: printed, consensus.csv's notes, the JSON; with the FLAIR, the scan's numbers and no note."""
    a, b = raters()
    k, j, i = (slice(n.min(), n.max() + 1) for n in np.nonzero(a | b))  # the box of both: slices 2 to 6 of 0-7
    whole = consensus_check(image(a), image(b))
    cropped = consensus_check(image(a)[i, j, k], image(b)[i, j, k])
    assert whole["worst_slices"] == [3, 6] and cropped["worst_slices"] == [1, 4]
    assert cropped["dice"] == pytest.approx(whole["dice"])
    assert cropped["notes"] == whole["notes"] + [io.ONE_BOX_NOTE]
    assert "count from the box's first slice" in io.ONE_BOX_NOTE and "--flair" in io.ONE_BOX_NOTE
    assert io.ONE_BOX_NOTE not in consensus_check(image(a)[i, j, k], image(b))["notes"]  # padded onto the scan's
    flair = sitk.GetImageFromArray(np.random.default_rng(0).normal(300, 30, a.shape).astype(np.float32))
    flair.CopyInformation(image(a))
    assert io.ONE_BOX_NOTE not in consensus_check(image(a)[i, j, k], image(b)[i, j, k], flair=flair)["notes"]
    for name, array in (("a", a), ("b", b)):
        io.write_image(image(array)[i, j, k], tmp_path / f"{name}.nii.gz")
    assert main(["consensus", str(tmp_path / "a.nii.gz"), str(tmp_path / "b.nii.gz"),
                 "--json", str(tmp_path / "c.json")]) == 0
    assert f"note: {io.ONE_BOX_NOTE}" in capsys.readouterr().out
    assert io.ONE_BOX_NOTE in json.loads((tmp_path / "c.json").read_text(encoding="utf-8"))["notes"]
    (tmp_path / "raters.csv").write_text("case,rater_a,rater_b\nboxed,a.nii.gz,b.nii.gz\n")
    assert main(["consensus", "--manifest", str(tmp_path / "raters.csv"), "-o", str(tmp_path / "out")]) == 0
    with open(tmp_path / "out" / "consensus.csv", newline="", encoding="utf-8-sig") as f:
        row = next(csv.DictReader(f))
    assert row["worst_slice"] == "1" and io.ONE_BOX_NOTE in row["notes"].split(" | ")
    details = json.loads((tmp_path / "out" / "consensus.json").read_text(encoding="utf-8"))["details"]
    assert io.ONE_BOX_NOTE in details["boxed"]["notes"]


def test_a_cohort_prints_each_cases_notes_under_its_line(tmp_path, capsys):
    """A cohort printed 'CASE: Dice 0.000 FAIL' alone: a note such as 'rater A's mask is empty' or 'both raters
    marked lesions but they barely overlap' was only in consensus.csv and consensus.json. Each case's notes are now
    printed under its line, indented, one a line, as one pair's are; a case without notes prints its line alone."""
    a, b = raters()
    far = np.zeros_like(a)
    far[5:7, 20:28, 2:10] = 1  # lesions nowhere near rater B's
    for name, array in (("a", a), ("b", b), ("empty", np.zeros_like(a)), ("far", far)):
        io.write_image(image(array), tmp_path / f"{name}.nii.gz")
    (tmp_path / "raters.csv").write_text("case,rater_a,rater_b\nempty,empty.nii.gz,b.nii.gz\nfar,far.nii.gz,b.nii.gz\n"
                                         "same,b.nii.gz,b.nii.gz\n")
    assert main(["consensus", "--manifest", str(tmp_path / "raters.csv"), "-o", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err.splitlines()
    details = json.loads((tmp_path / "out" / "consensus.json").read_text(encoding="utf-8"))["details"]
    assert details["empty"]["notes"] == ["rater A's mask is empty: Dice 0"]
    assert any("barely overlap" in note for note in details["far"]["notes"]) and details["same"]["notes"] == []
    lines = {case: err.index(next(line for line in err if f"] {case}: Dice" in line)) for case in details}
    for case, start in lines.items():
        assert err[start + 1:start + 1 + len(details[case]["notes"])] == [
            f"       note: {note}" for note in details[case]["notes"]], err
    assert sum("note:" in line for line in err) == 1 + len(details["far"]["notes"])
