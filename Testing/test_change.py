"""`deepwml change`: two scans of one head on different grids, with lesions whose fate is known.

The phantom is a head defined in continuous millimetres (skull, brain, a ventricle, asymmetric
blobs so a rigid registration has something to hold on to), sampled at the voxel centres of a
baseline grid (1.5 x 1.5 x 4 mm) and, after a known head movement, of an oblique follow-up grid
(1.8 x 1.8 x 3 mm). Its lesions: one in both scans (stable), one only in the follow-up (new), one
that doubles its radius (enlarging), one only in the baseline (gone), and one above the baseline's
field of view (not assessable).
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from DeepWMLLib import change, evaluation, io
from DeepWMLLib.cli import main
from DeepWMLLib.errors import DeepWMLError

from conftest import (aligned_once, make_volume, memoize_alignments, rotation, stepped_positions, users_images_in,
                      write_dicom_series)

# the head movement between the scans: a follow-up point q shows the anatomy at baseline point MOVE(q)
MOVE_ANGLES = (np.radians(4.0), np.radians(-3.0), np.radians(6.0))
MOVE_SHIFT = np.array([5.0, -8.0, 10.0])

# lesions in baseline coordinates (mm): centre, radius at baseline (0: absent), radius at follow-up
LESIONS = {
    "stable": ((20.0, 10.0, 15.0), 5.0, 5.0),
    "new": ((-25.0, -10.0, 20.0), 0.0, 4.0),
    "enlarging": ((-15.0, 35.0, -5.0), 3.5, 7.0),
    "gone": ((30.0, -30.0, -10.0), 5.0, 0.0),
    "not assessable": ((0.0, 0.0, 56.0), 0.0, 4.0),  # above the baseline's last slice (50 mm)
}


def move(points: np.ndarray) -> np.ndarray:
    """Follow-up physical points (N x 3) -> the baseline points showing the same anatomy."""
    euler = sitk.Euler3DTransform((0.0, 0.0, 0.0), *MOVE_ANGLES, tuple(MOVE_SHIFT))
    matrix = np.array(euler.GetMatrix()).reshape(3, 3)
    return points @ matrix.T + MOVE_SHIFT


def inside(points: np.ndarray, centre, radii) -> np.ndarray:
    return np.sum(((points - np.asarray(centre)) / np.asarray(radii)) ** 2, axis=1)


def anatomy(points: np.ndarray, when: str) -> tuple[np.ndarray, np.ndarray]:
    """(FLAIR-like intensity, lesion mask) of the phantom at baseline-space points; `when` baseline/follow-up."""
    head = inside(points, (0, 0, 0), (70, 85, 62))
    value = np.where(head < 1.0, 100.0, np.where(head < 1.25, 170.0, 0.0))  # brain, then skull and scalp
    value[inside(points, (8, -5, 5), (7, 22, 12)) < 1] = 25.0  # a ventricle
    value[inside(points, (-30, 30, 10), (12, 12, 12)) < 1] = 145.0
    value[inside(points, (25, 45, -20), (10, 14, 9)) < 1] = 60.0
    value[inside(points, (-20, -50, -30), (15, 8, 10)) < 1] = 130.0
    lesion = np.zeros(len(points), bool)
    for centre, r_base, r_follow in LESIONS.values():
        r = r_base if when == "baseline" else r_follow
        if r > 0:
            lesion |= inside(points, centre, (r, r, r)) < 1
    value[lesion] = 230.0
    return value, lesion


SLICE_PROFILE = (-0.375, -0.125, 0.0, 0.125, 0.375)  # in voxels along the slice axis


def sample(size, spacing, origin, direction, when: str) -> tuple[sitk.Image, sitk.Image]:
    image = sitk.Image(size, sitk.sitkFloat32)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(tuple(np.asarray(direction, float).ravel()))
    k, j, i = np.indices(size[::-1]).reshape(3, -1).astype(float)
    value = 0.0
    for offset in SLICE_PROFILE:  # a thick slice averages the anatomy across its thickness
        points = np.stack([i, j, k + offset, np.ones_like(i)], axis=1) @ io.ijk_to_lps(image)[:3].T
        if when == "follow-up":
            points = move(points)
        part, lesion_part = anatomy(points, when)
        value = value + part / len(SLICE_PROFILE)
        if offset == 0.0:
            lesion = lesion_part
    value = value.reshape(size[::-1]) + np.random.default_rng(len(when)).normal(0, 3, size[::-1])
    flair = sitk.GetImageFromArray(value.astype(np.float32))
    flair.CopyInformation(image)
    mask = sitk.GetImageFromArray(lesion.reshape(size[::-1]).astype(np.uint8))
    mask.CopyInformation(image)
    return flair, mask


_PAIR_IMAGES: list = []  # the phantom pair, sampled once per test worker (change_pair_images)


def change_pair_images():
    """((baseline FLAIR, mask), (follow-up FLAIR, mask)) of the phantom: sampled once per test worker (seconds), a
    copy of each image given to every call."""
    if not _PAIR_IMAGES:
        baseline = sample((128, 128, 34), (1.5, 1.5, 4.0), (-95.0, -95.0, -82.0), np.eye(3), "baseline")
        followup = sample((112, 112, 52), (1.8, 1.8, 3.0), (-96.0, -110.0, -75.0), rotation(np.radians(5), 0, 0),
                          "follow-up")
        _PAIR_IMAGES.append((baseline, followup))
    return tuple(tuple(sitk.Image(image) for image in scan) for scan in _PAIR_IMAGES[0])


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    baseline, followup = change_pair_images()
    folder = tmp_path_factory.mktemp("pair")
    files = {}
    for name, image in (("baseline", baseline[0]), ("baseline_mask", baseline[1]),
                        ("followup", followup[0]), ("followup_mask", followup[1])):
        files[name] = folder / f"{name}.nii.gz"
        sitk.WriteImage(image, str(files[name]))
    return {"baseline": baseline, "followup": followup, "files": files,
            "registration": aligned_once(followup[0], baseline[0])}


@pytest.fixture(autouse=True)
def registrations_memoized(monkeypatch):
    """Each registration of the same two scans (the phantom pair, read from its files or its DICOM series; most of
    this file's time: `change` registers each pair both ways) run once per test worker, each later one given a copy
    (conftest.memoize_alignments: deterministic, and keyed by what the test may patch in the change module)."""
    memoize_alignments(monkeypatch)


def by_status(rows):
    out = {}
    for row in rows:
        out.setdefault(row["status"], []).append(row)
    return out


def _manifest(path, files, case: str = "p1", followup=None, followup_mask=None):
    """`path`, written as a manifest of one pair, `case`: `files`' baseline, follow-up (or `followup`: a DICOM
    series) and masks (the follow-up's `followup_mask` when given; "": none, segmented by the run)."""
    path.write_text("case,baseline,followup,baseline_mask,followup_mask\n"
                    f"{case},{files['baseline']},{followup or files['followup']},{files['baseline_mask']},"
                    f"{files['followup_mask'] if followup_mask is None else followup_mask}\n", encoding="utf-8")
    return path


def nearest_lesion(centroid_followup) -> str:
    """Which phantom lesion a follow-up-space centroid belongs to."""
    point = move(np.asarray([centroid_followup], float))[0]
    return min(LESIONS, key=lambda name: np.linalg.norm(point - np.asarray(LESIONS[name][0])))


def test_registration_recovers_the_head_movement(pair):
    registration = pair["registration"]
    points = np.array([[x, y, z] for x in (-40.0, 0.0, 40.0) for y in (-50.0, 0.0, 50.0) for z in (-30.0, 0.0, 30.0)])
    found = np.array([registration.transform.TransformPoint(tuple(p)) for p in points])
    error = np.linalg.norm(found - move(points), axis=1)
    assert error.max() < 1.0, error  # under a voxel of either grid
    assert registration.correlation > change.MIN_CORRELATION


def test_every_lesion_gets_its_known_fate(pair):
    result = change.lesion_change(pair["baseline"][0], pair["followup"][0], pair["baseline"][1], pair["followup"][1])
    report = result.report
    groups = by_status(report["lesions"])
    assert {k: len(v) for k, v in groups.items()} == {"stable": 1, "new": 1, "enlarging": 1, "gone": 1,
                                                      "not assessable": 1}
    for status, rows in groups.items():
        assert nearest_lesion(rows[0]["centroid_mm"]) == status  # gone: its baseline position carried over
    # the lesion above the baseline's last slice: the total change counts what the baseline could not show
    assert len(report["warnings"]) == 1 and "outside the baseline's field of view" in report["warnings"][0]
    assert f"{groups['not assessable'][0]['volume_ml']:.2f} ml of the follow-up's lesions (1)" in report["warnings"][0]
    # volumes: each scan's own, close to the spheres'
    sphere_ml = {name: 4 / 3 * np.pi * r ** 3 / 1000 for name, (_, _, r) in LESIONS.items()}
    assert groups["new"][0]["volume_ml"] == pytest.approx(sphere_ml["new"], rel=0.25)
    assert groups["enlarging"][0]["volume_ml"] == pytest.approx(sphere_ml["enlarging"], rel=0.2)
    assert groups["enlarging"][0]["baseline_ml"] == pytest.approx(4 / 3 * np.pi * 3.5 ** 3 / 1000, rel=0.5)
    assert groups["gone"][0]["volume_ml"] == pytest.approx(4 / 3 * np.pi * 5 ** 3 / 1000, rel=0.25)
    for name, mask in (("baseline", pair["baseline"][1]), ("followup", pair["followup"][1])):
        ml = np.count_nonzero(sitk.GetArrayViewFromImage(mask)) * np.prod(mask.GetSpacing()) / 1000
        assert report[f"{name}_volume_ml"] == pytest.approx(ml, abs=1e-4)
    assert report["n_new"] == 1 and report["new_ml"] == pytest.approx(groups["new"][0]["volume_ml"], abs=1e-4)
    # the label map lies on the follow-up's grid and holds each fate where its lesion is
    labels = result.labels
    assert io.grid_difference(labels, pair["followup"][0]) is None
    array = sitk.GetArrayViewFromImage(labels)
    follow = sitk.GetArrayViewFromImage(pair["followup"][1]) > 0
    assert set(np.unique(array[follow])) == {1, 2, 3, 4}  # every follow-up lesion voxel has its fate
    assert np.count_nonzero(array == 5) > 0 and not np.any(follow & (array == 5))
    assert io.grid_difference(result.baseline_registered, pair["followup"][0]) is None


def test_tolerance_and_enlargement_thresholds_move_the_calls(pair):
    strict = change.classify(pair["followup"][1], pair["baseline"][1], pair["registration"].transform, enlarge_fraction=20.0)[1]  # growth of 8x in volume is not 21x
    assert "enlarging" not in {r["status"] for r in strict}
    with pytest.raises(change.DeepWMLError, match="cannot be negative"):
        change.classify(pair["followup"][1], pair["baseline"][1], sitk.Euler3DTransform(), tolerance_mm=-1)


def test_small_changes_are_listed_not_counted(pair):
    labels, rows = change.classify(pair["followup"][1], pair["baseline"][1], pair["registration"].transform, min_change_ml=0.6)
    statuses = sorted(r["status"] for r in rows)  # new 0.27 ml and gone 0.52 ml are under 0.6 ml
    assert statuses == ["enlarging", "not assessable", "small gone", "small new", "stable"]
    assert {6, 7} <= set(np.unique(labels).tolist()) and not {2, 5} & set(np.unique(labels).tolist())
    report = change._summary(rows, 1.0, 1.0)
    assert report["n_new"] == 0 and report["n_small_new"] == 1 and report["n_small_gone"] == 1


def test_a_lesion_faintly_there_before_is_not_new_with_its_probabilities(pair):
    """The 'new' lesion, at probability 0.2 in the baseline (under the mask's threshold): new when the
    masks alone decide, not new once a probability of 0.15 counts as present."""
    baseline = pair["baseline"][0]
    k, j, i = np.indices(sitk.GetArrayViewFromImage(baseline).shape).reshape(3, -1)
    points = np.stack([i, j, k, np.ones_like(i)], axis=1) @ io.ijk_to_lps(baseline)[:3].T
    centre, _, radius = LESIONS["new"]
    faint = (inside(points, centre, (radius,) * 3) < 1).reshape(sitk.GetArrayViewFromImage(baseline).shape) * 0.2
    probabilities = sitk.GetImageFromArray(faint.astype(np.float32))
    probabilities.CopyInformation(baseline)
    transform = pair["registration"].transform
    for presence, expected in ((None, 1), (0.15, 0)):
        rows = change.classify(pair["followup"][1], pair["baseline"][1], transform,
                               baseline_probabilities=probabilities, presence=presence)[1]
        assert sum(r["status"] == "new" for r in rows) == expected


def test_a_lesion_moved_by_the_scan_not_the_disease_is_not_new(pair):
    """The identity instead of the registration: the head movement alone makes lesions look new and gone."""
    rows = change.classify(pair["followup"][1], pair["baseline"][1], sitk.Euler3DTransform())[1]
    assert by_status(rows).get("new", []).__len__() > 1  # why registration matters


def test_a_transform_file_written_short_is_an_error_not_an_output(tmp_path):
    """ITK's transform writer says a failed write (a full disk, a file size limit) by no exception: the file cut short
    (0 bytes, or cut where it reads back as no movement) was renamed into place as the pair's registration. A real
    failed write, made by a file size limit (RLIMIT_FSIZE: Python ignores SIGXFSZ, so the write fails with EFBIG)."""
    resource = pytest.importorskip("resource")
    transform = sitk.Euler3DTransform((0.5, 3.3, -7.0), 0.01, -0.02, 0.03, (1.5, -2.25, 3.0))
    path = tmp_path / "pair_baseline_to_followup.tfm"
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    for limit in (0, 100):
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
        try:
            with pytest.raises(DeepWMLError, match=f"cannot write {re.escape(str(path))} .*file size limit"):
                io.write_atomically(path, lambda tmp: change._write_transform(transform, tmp))
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        assert list(tmp_path.iterdir()) == []
    io.write_atomically(path, lambda tmp: change._write_transform(transform, tmp))
    assert sitk.ReadTransform(str(path)).GetParameters() == transform.GetParameters()


def test_command_line_with_both_masks(pair, tmp_path, capsys):
    files = pair["files"]
    out = tmp_path / "out"
    args = ["change", str(files["baseline"]), str(files["followup"]), "-o", str(out),
            "--baseline-mask", str(files["baseline_mask"]), "--followup-mask", str(files["followup_mask"]), "--qc"]
    assert main(args) == 0
    printed = capsys.readouterr()
    assert "new: 1 lesion" in printed.out and "gone: 1 lesion" in printed.out and "not assessable" in printed.out
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(f"followup_{suffix}" for suffix in (
        "baseline_registered.nii.gz", "baseline_to_followup.tfm", "change.csv", "change.json", "change.nii.gz",
        "change.seg.nrrd", "change_qc.png"))
    assert "both ways agree within" in printed.out and "NOT RELIABLE" not in printed.out + printed.err
    report = json.loads((out / "followup_change.json").read_text(encoding="utf-8"))
    assert report["n_enlarging"] == 1 and report["masks"]["baseline"] == {
        "mask": str(files["baseline_mask"]), "mask_fingerprint": io.content_fingerprint(files["baseline_mask"])}
    # what a rerun knows each scan by (as segment's input_fingerprint)
    assert [report[f"{key}_fingerprint"] for key in ("baseline", "followup")] == [
        io.content_fingerprint(files[key]) for key in ("baseline", "followup")]
    assert report["registration"]["reliable"] is True
    labels = sitk.ReadImage(str(out / "followup_change.nii.gz"))
    assert io.grid_difference(labels, sitk.ReadImage(str(files["followup"]))) is None
    # the transform file maps follow-up points onto the baseline as the registration did
    transform = sitk.ReadTransform(str(out / "followup_baseline_to_followup.tfm"))
    point = (10.0, -20.0, 5.0)
    assert np.allclose(transform.TransformPoint(point), move(np.array([point]))[0], atol=1.0)
    # Slicer's segmentation: one named segment per fate, on the same grid as the label map
    import slicerio

    segmentation = slicerio.read_segmentation(str(out / "followup_change.seg.nrrd"))
    assert [(s["name"], s["labelValue"]) for s in segmentation["segments"]] == [
        (name, value) for value, name in change.LABELS.items()]
    assert np.array_equal(np.asarray(segmentation["voxels"]).transpose(2, 1, 0), sitk.GetArrayFromImage(labels))
    rows = (out / "followup_change.csv").read_text(encoding="utf-8-sig").splitlines()
    assert rows[0] == ",".join(change.CSV_COLUMNS) and len(rows) == 1 + 5
    picture = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "followup_change_qc.png")))
    assert picture.ndim == 3 and picture.shape[2] == 3
    # a second run does not overwrite: done before, skipped (as deepwml segment skips a case); --overwrite redoes it
    assert main(args) == 0
    assert "followup: skipped - done before (use --overwrite to redo)" in capsys.readouterr().err
    assert main(args[:-1] + ["--overwrite"]) == 0  # without --qc: the earlier picture is removed
    assert not (out / "followup_change_qc.png").exists()


def test_a_dicom_study_folder_as_the_baseline(pair, tmp_path, capsys):
    """A baseline exported as a whole study (a T1 series beside the FLAIR): its FLAIR is read, the report
    and a warning name it, and the calls are those of the same scan given as a file. Its slices, 4 mm apart but
    3.5 mm thick (Slice Thickness), leave a gap between them: the report gives the tag and a warning says so."""
    files = pair["files"]
    flair = sitk.Cast(sitk.ReadImage(str(files["baseline"])) * 100, sitk.sitkInt16)  # within int16: times 1000 wrapped around
    study = tmp_path / "study"
    write_dicom_series(study, flair[:, :, :20], uid="1.2.3.1", description="AX T1 SE", prefix="t1_")
    write_dicom_series(study, flair, uid="1.2.3.2", description="AX T2 FLAIR", prefix="flair_", number=2,
                       extra={"0018|0050": "3.5"})
    out = tmp_path / "out"
    assert main(["change", str(study), str(files["followup"]), "-o", str(out), "--baseline-mask",
                 str(files["baseline_mask"]), "--followup-mask", str(files["followup_mask"])]) == 0
    assert "baseline: read DICOM series 2 'AX T2 FLAIR'" in capsys.readouterr().err
    report = json.loads((out / "followup_change.json").read_text(encoding="utf-8"))
    assert report["dicom_series"]["baseline"]["uid"] == "1.2.3.2" and "follow-up" not in report["dicom_series"]
    assert (report["n_new"], report["n_enlarging"], report["n_gone"]) == (1, 1, 1)
    assert report["dicom_series"]["baseline"]["slice_thickness_tag_mm"] == 3.5
    assert "baseline: DICOM slices 4.00 mm apart but 3.50 mm thick (Slice Thickness; a 0.50 mm gap between them): " \
           "volumes and LV use the spacing, 4.00 mm" in report["warnings"]
    # a second FLAIR-like series: refused with the list, then chosen with --baseline-series
    write_dicom_series(study, flair[:, :, :24], uid="1.2.3.3", description="AX T2 FLAIR post", inversion_ms=2500,
                       prefix="post_", number=3)
    again = ["change", str(study), str(files["followup"]), "-o", str(tmp_path / "again"), "--baseline-mask",
             str(files["baseline_mask"]), "--followup-mask", str(files["followup_mask"])]
    assert main(again) == 1
    assert "2 look like a FLAIR" in capsys.readouterr().err
    assert main(again + ["--baseline-series", "ax t2 flair"]) == 0
    assert json.loads((tmp_path / "again" / "followup_change.json").read_text(encoding="utf-8"))[
        "dicom_series"]["baseline"]["chosen_by"] == "--baseline-series ax t2 flair"


def test_visits_given_the_wrong_way_round_are_warned_of_by_their_study_dates(pair, tmp_path, capsys):
    """Two DICOM visits given in the wrong order (the later one as the baseline) gave every new lesion as gone and
    every gone one as new, and nothing said so: their Study Dates now do."""
    files = pair["files"]
    given = {}
    for name, date in (("baseline", "20260301"), ("followup", "20251102")):
        flair = sitk.Cast(sitk.ReadImage(str(files[name])) * 100, sitk.sitkInt16)  # within int16: times 1000 wrapped around
        given[name] = write_dicom_series(tmp_path / name, flair, uid=f"1.2.9.{len(given)}", description="AX FLAIR",
                                         extra={"0008|0020": date, "0020|000d": f"1.2.8.{len(given)}"})
    out = tmp_path / "out"
    assert main(["change", str(given["baseline"]), str(given["followup"]), "-o", str(out), "--baseline-mask",
                 str(files["baseline_mask"]), "--followup-mask", str(files["followup_mask"])]) == 0
    said = "the baseline was scanned after the follow-up (Study Date 2026-03-01, follow-up 2025-11-02)"
    assert said in capsys.readouterr().err
    report = json.loads((out / "followup_change.json").read_text(encoding="utf-8"))
    assert report["warnings"][0].startswith(said)
    series = [io.choose_dicom_series(given[name])[0] for name in ("followup", "baseline")]
    assert change.visits_reversed(*series) is None and change.visits_reversed(None, series[0]) is None  # in order


def test_a_scan_of_a_pair_whose_header_or_sidecar_says_it_is_not_a_flair_is_warned_of(pair, tmp_path, capsys):
    """`deepwml change` warns, as `segment` does, of a baseline whose DICOM header (a T1 by its inversion time) or a
    follow-up whose JSON sidecar (a diffusion image by its Image Type) says it is not a FLAIR."""
    files = pair["files"]
    flair = sitk.Cast(sitk.ReadImage(str(files["baseline"])) * 100, sitk.sitkInt16)
    baseline = write_dicom_series(tmp_path / "baseline", flair, uid="1.2.9.5", description="t1_mprage_tra",
                                  inversion_ms=900.0)
    followup = tmp_path / "scans" / "followup.nii.gz"
    followup.parent.mkdir()
    shutil.copyfile(files["followup"], followup)
    (followup.parent / "followup.json").write_text(json.dumps({"ImageType": ["DERIVED", "PRIMARY", "DIFFUSION", "ADC"]}))
    out = tmp_path / "out"
    assert main(["change", str(baseline), str(followup), "-o", str(out), "--baseline-mask",
                 str(files["baseline_mask"]), "--followup-mask", str(files["followup_mask"])]) == 0
    capsys.readouterr()
    warnings = json.loads((out / "followup_change.json").read_text(encoding="utf-8"))["warnings"]
    assert warnings[0].startswith("baseline: the scan may not be a FLAIR: its description 't1_mprage_tra' names a "
                                  "T1-weighted scan; its inversion time is 900 ms") and "(its DICOM header)" in warnings[0]
    assert warnings[1].startswith("follow-up: the scan may not be a FLAIR: its Image Type names DIFFUSION, ADC") \
        and "(followup.json)" in warnings[1]


def test_command_line_segments_a_scan_without_a_mask(pair, tmp_path, tiny_model, capsys):
    files = pair["files"]
    out = tmp_path / "out"
    assert main(["change", str(files["baseline"]), str(files["followup"]), "-o", str(out), "--case", "p1",
                 "--followup-mask", str(files["followup_mask"]), "--model", str(tiny_model), "--device", "cpu"]) == 0
    capsys.readouterr()
    mask = sitk.ReadImage(str(out / "p1_baseline_wmh.nii.gz"))
    assert io.grid_difference(mask, sitk.ReadImage(str(files["baseline"]))) is None  # on the baseline's own grid
    report = json.loads((out / "p1_change.json").read_text(encoding="utf-8"))
    assert report["masks"]["baseline"]["model"] and report["masks"]["follow-up"]["mask"] == str(files["followup_mask"])


def test_each_scan_of_a_pair_is_checked_once(pair, tmp_path, tiny_model, monkeypatch, capsys):
    """A scan was checked as a volume three times (on reading, before the outputs, before registering): a pass over
    every voxel each time, seconds on two large scans."""
    checked = []
    check_volume = io.check_volume
    monkeypatch.setattr(io, "check_volume", lambda image, *a: checked.append(image.GetSize()) or check_volume(image, *a))
    files = pair["files"]
    assert main(["change", str(files["baseline"]), str(files["followup"]), "-o", str(tmp_path / "out"),
                 "--followup-mask", str(files["followup_mask"]), "--model", str(tiny_model), "--device", "cpu"]) == 0
    capsys.readouterr()
    assert len(checked) == 2  # the baseline and the follow-up, each once (segmenting the baseline does not check again)


def test_bad_inputs_are_refused_clearly(pair, tmp_path, capsys):
    files = pair["files"]
    both = ["--baseline-mask", str(files["baseline_mask"]), "--followup-mask", str(files["followup_mask"])]
    base = ["change", str(files["baseline"]), str(files["followup"]), "-o", str(tmp_path / "o")]
    assert main(base + both + ["--model", "x.pt"]) == 2
    assert "nothing is segmented" in capsys.readouterr().err
    # a mask on the other scan's grid
    assert main(base + ["--baseline-mask", str(files["followup_mask"]), "--followup-mask",
                        str(files["followup_mask"])]) == 1
    assert "grid" in capsys.readouterr().err
    assert not (tmp_path / "o" / "followup_change.json").exists()
    assert main(["change", str(files["baseline"]), str(files["baseline"]), "-o", str(tmp_path / "o")]) == 2
    assert "the same file" in capsys.readouterr().err
    assert main(base + both + ["--case", "../up"]) == 2
    assert "plain file name" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        main(base + both + ["--tolerance-mm", "-1"])
    assert stop.value.code == 2 and "--tolerance-mm: must be 0 or more" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        main(base + both + ["--tolerance-mm", "inf"])  # (before: accepted, then a crash after segmenting)
    assert stop.value.code == 2 and "--tolerance-mm: must be 0 or more (and finite)" in capsys.readouterr().err


def test_scans_of_different_heads_are_warned_about(pair):
    other = sitk.GetImageFromArray(np.random.default_rng(3).normal(100, 40, (30, 90, 90)).astype(np.float32))
    other.SetSpacing((2.0, 2.0, 4.0))
    other.SetOrigin((-90.0, -90.0, -60.0))
    empty = sitk.Image(other.GetSize(), sitk.sitkUInt8)
    empty.CopyInformation(other)
    report = change.lesion_change(other, pair["followup"][0], empty, pair["followup"][1]).report
    assert report["registration"]["reliable"] is False and report["warnings"][0].startswith("REGISTRATION NOT RELIABLE")
    assert "different patients" in report["warnings"][0]
    assert report["n_new"] + report["n_not_assessable"] == 4  # nothing at baseline: every lesion new or unassessable


def test_scans_that_do_not_line_up_are_flagged_not_said_to_agree(pair, tmp_path, capsys, monkeypatch):
    """deepwml change on two patients' scans (labelled patient26 against patient07, both in MNI space) printed its
    lesion calls and 'correlation -0.00, both ways agree within 0.89 mm', as if the registration were sound: both
    fits stayed near their start, so they agreed with each other while the scans did not correlate at all. The one
    warning came last, on stderr, and nothing in the JSON or change_summary.csv said the calls were void. Now the
    summary opens with REGISTRATION NOT RELIABLE, so does the first warning and the picture's title, the report
    has registration.reliable false, the cohort's summary a registration_reliable column and a closing line."""
    monkeypatch.setattr(change, "_correlation", lambda fixed, moving, transform: -0.001)  # two heads that differ
    files = pair["files"]
    masks = ["--baseline-mask", str(files["baseline_mask"]), "--followup-mask", str(files["followup_mask"])]
    out = tmp_path / "out"
    assert main(["change", str(files["baseline"]), str(files["followup"]), "-o", str(out), *masks]) == 0
    printed = capsys.readouterr()
    assert printed.out.startswith("followup: REGISTRATION NOT RELIABLE (correlation -0.00, under 0.80): different "
                                  "patients, or a failed registration?")
    assert "agree within" not in printed.out and "both ways" in printed.out
    assert "followup: warning: REGISTRATION NOT RELIABLE: the scans may be of different patients" in printed.err
    report = json.loads((out / "followup_change.json").read_text(encoding="utf-8"))
    assert report["registration"]["reliable"] is False
    assert report["registration"]["inverse_consistency"]["p95_mm"] < change.MAX_INCONSISTENCY_MM  # it alone passed
    assert report["warnings"][0].startswith("REGISTRATION NOT RELIABLE")
    assert change.picture_title("followup", report).startswith("REGISTRATION NOT RELIABLE - followup: ")
    manifest = _manifest(tmp_path / "pairs.csv", files)
    assert main(["change", "--manifest", str(manifest), "-o", str(tmp_path / "cohort")]) == 0
    assert "1 pair(s) with registration not reliable (different patients, or a failed registration?): p1" in \
        capsys.readouterr().err
    rows = list(csv.DictReader(open(tmp_path / "cohort" / "change_summary.csv", encoding="utf-8-sig")))
    assert rows[0]["registration_reliable"] == "False"


def test_an_unreliable_registration_is_said_with_the_check_that_failed_not_a_figure_that_passed(pair, tmp_path,
                                                                                               capsys, monkeypatch):
    """Two real scans of one patient, cut to 40 mm slabs: the registration back from the follow-up failed (9.11 mm
    apart) while the correlation was 0.94. The summary opened 'REGISTRATION NOT RELIABLE (correlation 0.94; 0.84-0.94
    on scans of one patient)', a figure in its normal range as the reason, in the terminal and the Slicer module
    alike, and the outline series' Derivation Description named the correlation alone too. Now each names the
    checks that failed, with their figures and limits."""
    monkeypatch.setattr(change, "inverse_consistency", lambda *args: {"median_mm": 4.2, "p95_mm": 9.11})
    files = pair["files"]
    out = tmp_path / "out"
    assert main(["change", str(files["baseline"]), str(files["followup"]), "-o", str(out), "--baseline-mask",
                 str(files["baseline_mask"]), "--followup-mask", str(files["followup_mask"])]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first == ("followup: REGISTRATION NOT RELIABLE (run both ways 9.11 mm apart, over 2 mm): different patients, "
                     "or a failed registration? The calls below cannot be trusted")
    report = json.loads((out / "followup_change.json").read_text(encoding="utf-8"))
    assert report["registration"]["correlation"] >= change.MIN_CORRELATION and report["registration"]["reliable"] is False
    report["registration"].update(correlation=0.61, mutual_information=-0.6)  # all three fail: all three said
    assert change.format_summary("p", report).splitlines()[0].startswith(
        "p: REGISTRATION NOT RELIABLE (correlation 0.61, under 0.80; mutual information -0.60, above -0.65; run both "
        "ways 9.11 mm apart, over 2 mm): ")
    # an earlier version's verdict on unrounded figures that all pass once rounded: no empty brackets
    report["registration"].update(correlation=0.8, mutual_information=-0.7, inverse_consistency={"p95_mm": 0.1})
    assert change.format_summary("p", report).startswith("p: REGISTRATION NOT RELIABLE: different patients")
    report["registration"].update(correlation=None, inverse_consistency={"p95_mm": None})  # not measured (JSON null)
    summary = change.format_summary("p", report)
    assert "correlation not measurable, both ways not measurable" in summary and "nan" not in summary


def test_a_check_that_could_not_be_measured_is_said_so_not_as_nan_under_its_limit():
    """A correlation of too few overlapping head voxels (nan; null in the saved JSON) read 'REGISTRATION NOT RELIABLE
    (correlation nan, under 0.80)', and a follow-up without head voxels 'run both ways nan mm apart, over 2 mm'; a
    report read back from its JSON (null) raised TypeError."""
    registration = {"correlation": math.nan, "mutual_information": -0.8, "reliable": False,
                    "inverse_consistency": {"median_mm": math.nan, "p95_mm": math.nan}}
    assert change.failed_checks(registration) == ["correlation not measurable, too little of the two heads overlapping",
                                                  "run both ways not measurable, no head found in the follow-up"]
    saved = json.loads(json.dumps(evaluation.json_ready({**registration, "mutual_information": math.nan})))
    assert change.unreliable_because(saved) == (
        "REGISTRATION NOT RELIABLE (correlation not measurable, too little of the two heads overlapping; mutual "
        "information not measurable; run both ways not measurable, no head found in the follow-up)")


def test_roles_reversed_a_baseline_lesion_outside_the_follow_ups_view_is_not_assessable(pair):
    """The phantom read backwards (the follow-up as the earlier scan): what was new is gone, what was
    gone is new, the lesion above the other scan's last slice is a baseline lesion nobody can judge."""
    report = change.lesion_change(pair["followup"][0], pair["baseline"][0], pair["followup"][1],
                                  pair["baseline"][1], check=False).report
    groups = by_status(report["lesions"])
    assert {k: len(v) for k, v in groups.items()} == {"stable": 2, "new": 1, "gone": 1, "not assessable": 1}
    assert groups["not assessable"][0]["scan"] == "baseline" and groups["not assessable"][0]["change_ml"] is None
    assert any("outside the follow-up's field of view" in w for w in report["warnings"])


def test_a_lesion_that_did_not_change_keeps_its_own_baseline_volume(pair):
    """Baseline volume of the stable lesion: the whole baseline lesion measured on the baseline's own
    4 mm grid, not what survives of it on the follow-up's 3 mm grid."""
    rows = change.classify(pair["followup"][1], pair["baseline"][1], pair["registration"].transform)[1]
    stable = by_status(rows)["stable"][0]
    base = sitk.GetArrayViewFromImage(pair["baseline"][1])
    labels, count = change.label_components(base > 0)
    own = [np.count_nonzero(labels == n) * np.prod(pair["baseline"][1].GetSpacing()) / 1000 for n in range(1, count + 1)]
    assert any(stable["baseline_ml"] == pytest.approx(v, rel=1e-6) for v in own)


def test_outputs_carry_the_follow_ups_own_header_and_reruns_leave_nothing_stale(pair, tmp_path, capsys):
    files = pair["files"]
    followup_nrrd = tmp_path / "fu.nrrd"
    sitk.WriteImage(pair["followup"][0], str(followup_nrrd))  # a NIfTI mask beside it differs by ~1e-6 mm
    out = tmp_path / "out"
    base = ["change", str(files["baseline"]), str(followup_nrrd), "-o", str(out), "--baseline-mask",
            str(files["baseline_mask"]), "--followup-mask", str(files["followup_mask"])]
    assert main(base) == 0
    labels = sitk.ReadImage(str(out / "fu_change.nrrd"))
    reference = sitk.ReadImage(str(followup_nrrd))
    assert np.allclose(labels.GetOrigin(), reference.GetOrigin(), rtol=0, atol=1e-9)
    assert np.allclose(labels.GetDirection(), reference.GetDirection(), rtol=0, atol=1e-12)
    sitk.Mask(reference, labels > 0)  # SimpleITK's own test of one physical space (it raised with the mask's header)
    assert main(base + ["--overwrite", "--output-format", "nii.gz"]) == 0  # the .nrrd outputs of the first run go
    assert not list(out.glob("*.nrrd")) or sorted(p.name for p in out.glob("*.nrrd")) == ["fu_change.seg.nrrd"]
    assert main(base) == 0 and "fu: skipped - done before" in capsys.readouterr().err


def test_too_few_slices_and_a_missing_input_are_refused_before_any_output(pair, tmp_path, capsys):
    files = pair["files"]
    thin = pair["followup"][0][:, :, 20:23]
    sitk.WriteImage(thin, str(tmp_path / "thin.nii.gz"))
    out = tmp_path / "out"
    assert main(["change", str(files["baseline"]), str(tmp_path / "thin.nii.gz"), "-o", str(out)]) == 1
    assert "at least 4 slices" in capsys.readouterr().err
    assert main(["change", str(files["baseline"]), str(tmp_path / "missing.nii.gz"), "-o", str(out)]) == 1
    assert "does not exist" in capsys.readouterr().err and not out.exists()


def test_a_pair_stopped_while_its_outputs_are_written_is_redone_by_the_same_command(pair, tmp_path, monkeypatch):
    """Ctrl-C after the pair's change labels were written, before its report: the labels went with it, so that
    the same command goes on with that pair instead of failing it ('an earlier run left an incomplete set
    of outputs; rerun with --overwrite', which redoes the whole cohort)."""
    files = pair["files"]
    manifest = _manifest(tmp_path / "pairs.csv", files)
    out = tmp_path / "out"

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patched:
        patched.setattr(io, "write_label_segmentation", stopped)
        assert main(["change", "--manifest", str(manifest), "-o", str(out)]) == 130
    assert not [p.name for p in out.iterdir() if p.name.startswith(("p1", "."))]
    assert main(["change", "--manifest", str(manifest), "-o", str(out)]) == 0
    rows = list(csv.DictReader(open(out / "change_summary.csv", encoding="utf-8-sig")))
    assert [(r["case"], r["status"]) for r in rows] == [("p1", "ok")]


def test_a_cohort_of_pairs_from_a_manifest(pair, tmp_path, capsys):
    files = pair["files"]
    other_grid = tmp_path / "other.nii.gz"
    sitk.WriteImage(pair["baseline"][1], str(other_grid))
    manifest = tmp_path / "pairs.csv"
    manifest.write_text("case,baseline,followup,baseline_mask,followup_mask\n"
                        f"p1/visit2,{files['baseline']},{files['followup']},{files['baseline_mask']},{files['followup_mask']}\n"
                        f"p2,missing.nii.gz,{files['followup']},{files['baseline_mask']},{files['followup_mask']}\n"
                        f"p3,{files['baseline']},{files['followup']},{files['baseline_mask']},{other_grid}\n",
                        encoding="utf-8")
    out = tmp_path / "out"
    assert main(["change", "--manifest", str(manifest), "-o", str(out)]) == 1  # two pairs failed, one done
    err = capsys.readouterr().err
    assert "2 case(s) failed" in err and "does not exist" in err and "grid" in err
    assert "p2: error - " in err and "1/3 pairs done (2 failed, 0 skipped)" in err
    # a cohort runs for long (a slow or loaded machine: minutes, as _duration words them past 90 s)
    assert re.search(r"p1/visit2: done in [\d.]+ s; about (\d+ s|\d+ min|\d+ h \d\d min) left for 2 more\n", err)
    assert "left for 1 more" not in err  # the failed pairs say nothing of the time left
    rows = list(csv.DictReader(open(out / "change_summary.csv", encoding="utf-8-sig")))
    assert [(r["case"], r["status"]) for r in rows] == [("p1/visit2", "ok"), ("p2", "error"), ("p3", "error")]
    assert rows[0]["n_new"] == "1" and rows[0]["n_gone"] == "1"
    assert (out / "p1_visit2_change.json").is_file()  # a plain file name; nothing outside OUTDIR
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("p3")) == []  # refused before writing
    manifest.write_text("case,baseline,followup,baseline_mask,followup_mask\n"
                        f"p1/visit2,{files['baseline']},{files['followup']},{files['baseline_mask']},{files['followup_mask']}\n",
                        encoding="utf-8")
    assert main(["change", "--manifest", str(manifest), "-o", str(out)]) == 0  # done before: skipped
    err = capsys.readouterr().err  # worded as `deepwml segment` words its cases
    assert "p1/visit2: skipped - done before (use --overwrite to redo)" in err
    assert err.rstrip().endswith(f"0/1 pairs done (0 failed, 1 skipped), summary in {out / 'change_summary.csv'}")
    rows = list(csv.DictReader(open(out / "change_summary.csv", encoding="utf-8-sig")))
    assert rows[0]["status"] == "skipped" and rows[0]["n_new"] == "1"  # its figures kept from its report
    # --dicom-seg/--dicom-outline asked of the pair of NIfTI files: nothing to add; the row says why, as a full run's
    # report does (it said only 'done before (use --overwrite to redo)', which would not make them either)
    assert main(["change", "--manifest", str(manifest), "-o", str(out), "--dicom-seg", "--dicom-outline"]) == 0
    assert f"p1/visit2: skipped - done before (use --overwrite to redo); {change.NO_DICOM_OUTLINE}; " \
           f"{change.NO_DICOM_SEG}" in capsys.readouterr().err
    assert not any(p.name.endswith(("_seg.dcm", "_outline_dicom")) for p in out.iterdir())
    manifest.write_text("case,baseline,followup,baseline_mask,followup_mask\n"  # the same name, another pair
                        f"p1/visit2,{files['followup']},{files['baseline']},{files['followup_mask']},{files['baseline_mask']}\n",
                        encoding="utf-8")
    assert main(["change", "--manifest", str(manifest), "-o", str(out)]) == 1
    assert "holds another pair" in capsys.readouterr().err
    assert main(["change", str(files["baseline"]), "--manifest", str(manifest), "-o", str(out)]) == 2
    capsys.readouterr()
    manifest.write_text("case,baseline,followup,baseline_mask,followup_mask\n" + "".join(
        f"{name},{files['baseline']},{files['followup']},{files['baseline_mask']},{files['followup_mask']}\n"
        for name in ("q/1", "q_1")), encoding="utf-8")  # one file name for two cases: the second is refused
    assert main(["change", "--manifest", str(manifest), "-o", str(tmp_path / "out2")]) == 1
    assert "would be named q_1_*" in capsys.readouterr().err
    rows = list(csv.DictReader(open(tmp_path / "out2" / "change_summary.csv", encoding="utf-8-sig")))
    assert [(r["case"], r["status"]) for r in rows] == [("q/1", "ok"), ("q_1", "error")]


def test_text_a_spreadsheet_would_take_for_a_formula_is_kept_as_text_and_numbers_as_numbers(pair, tmp_path, capsys):
    """A pair named "-AX FLAIR", and a lesion's centroid_mm beginning with a minus ("-12.5 3 40"), showed #NAME? in
    Excel and LibreOffice, which take a cell beginning with - (or =, +, @) for a formula: such a text cell now begins
    with an apostrophe, which the spreadsheet does not show; a change of -0.5 ml stays a number."""
    files = pair["files"]
    manifest = _manifest(tmp_path / "pairs.csv", files, "-AX FLAIR")
    out = tmp_path / "out"
    assert main(["change", "--manifest", str(manifest), "-o", str(out)]) == 0
    capsys.readouterr()
    summary = list(csv.DictReader(open(out / "change_summary.csv", encoding="utf-8-sig")))
    assert [r["case"] for r in summary] == ["'-AX FLAIR"]
    table, = out.glob("*_change.csv")
    lesions = list(csv.DictReader(open(table, encoding="utf-8-sig")))
    centroids = [r["centroid_mm"] for r in lesions]
    assert any(c.startswith("'-") for c in centroids) and not any(c.startswith("-") for c in centroids)
    assert [[float(v) for v in io.plain_cell(c).split()] for c in centroids] == [
        [round(v, 2) for v in lesion["centroid_mm"]]
        for lesion in json.loads(table.with_suffix(".json").read_text(encoding="utf-8"))["lesions"]]
    changes = [r["change_ml"] for r in lesions if r["change_ml"]]
    assert any(c.startswith("-") and float(c) < 0 for c in changes)  # a number, as it was
    assert main(["change", "--manifest", str(manifest), "-o", str(out)]) == 0
    assert "-AX FLAIR: skipped - done before" in capsys.readouterr().err


def test_a_dicom_follow_up_with_unevenly_spaced_slices_is_warned_of(pair, tmp_path, tiny_model, capsys):
    """A follow-up series whose slices are 3 mm apart but for one 3.5 mm step (under the 20 % refused as slices
    missing) was compared on the grid of their mean step without a word, as `deepwml segment` read it: the
    change report now warns of it in `segment`'s words."""
    files = pair["files"]
    flair = sitk.Cast(sitk.ReadImage(str(files["followup"])) * 100, sitk.sitkInt16)  # within int16: times 1000 wrapped around
    steps = [3.0] * 20 + [3.5] + [3.0] * 30
    series = write_dicom_series(tmp_path / "followup", flair, uid="1.2.3.8", description="AX FLAIR",
                                positions=stepped_positions(flair, steps))
    out = tmp_path / "out"
    assert main(["change", str(files["baseline"]), str(series), "-o", str(out), "--baseline-mask",
                 str(files["baseline_mask"]), "--model", str(tiny_model), "--device", "cpu"]) == 0
    capsys.readouterr()
    report = json.loads((out / "followup_change.json").read_text(encoding="utf-8"))
    assert ["follow-up: DICOM slices unevenly spaced (3.00 to 3.50 mm apart by their positions): volumes and LV use "
            "their mean spacing, 3.01 mm, which puts image 22 (instance 22) 0.29 mm from where it was imaged (lesions "
            "there are placed as far off, and measured with the mean spacing)"] == [
        w for w in report["warnings"] if "unevenly spaced" in w]


def test_a_dicom_follow_up_gets_its_change_as_an_outline_series(pair, tmp_path, capsys):
    """--dicom-outline with a DICOM follow-up: the follow-up FLAIR with each lesion outlined in its call's
    colour (new red, drawn last) and a legend, as a new series of the follow-up's study; a follow-up
    file gets a warning instead; a rerun with --overwrite without the option removes the series."""
    from DeepWMLLib import qc
    from DeepWMLLib.dicom_outline import SECONDARY_CAPTURE

    files = pair["files"]
    flair = sitk.Cast(sitk.ReadImage(str(files["followup"])) * 100, sitk.sitkInt16)  # within int16: times 1000 wrapped around
    series = write_dicom_series(tmp_path / "followup", flair, uid="1.2.3.7", description="AX FLAIR", number=4,
                                extra={"0010|0020": "P-7", "0020|000d": "1.2.3.70"})
    out = tmp_path / "out"
    args = ["change", str(files["baseline"]), str(series), "-o", str(out), "--baseline-mask",
            str(files["baseline_mask"]), "--followup-mask", str(files["followup_mask"])]
    assert main(args + ["--dicom-outline"]) == 0
    report = json.loads((out / "followup_change.json").read_text(encoding="utf-8"))
    assert report["dicom_outline"]["folder"] == "followup_change_outline_dicom"
    names = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(out / "followup_change_outline_dicom"))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(names)
    reader.MetaDataDictionaryArrayUpdateOn()
    outline = reader.Execute()
    assert outline.GetSize() == flair.GetSize() and np.allclose(outline.GetOrigin(), flair.GetOrigin(), atol=1e-3)
    assert reader.GetMetaData(0, "0008|0016") == SECONDARY_CAPTURE and reader.GetMetaData(0, "0010|0020").strip() == "P-7"
    assert reader.GetMetaData(0, "0020|000d").strip() == "1.2.3.70"
    assert reader.GetMetaData(0, "0008|103e").strip() == "DeepWML lesion change (AX FLAIR)"
    assert "1 new, 1 enlarging, 1 gone" in reader.GetMetaData(0, "0008|2111")
    pixels = sitk.GetArrayFromImage(outline)
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "followup_change.nrrd")))
    new_rgb = tuple(int(round(255 * c)) for c in change.COLOURS[2])
    drawn = np.all(pixels == np.array(new_rgb, np.uint8), axis=-1)
    image_rows = slice(0, pixels.shape[1] - 20)  # above the caption and legend
    expected = np.stack([qc.in_plane_outline(labels[k] == 2) for k in range(labels.shape[0])])
    assert expected.any() and np.array_equal(drawn[:, image_rows], expected[:, image_rows])
    assert drawn[:, pixels.shape[1] - 20:].any()  # "NEW" in the legend, in its colour
    # the same case again from the follow-up's NIfTI file: no series to write into, so a warning, and the
    # earlier run's series goes with the rest of its outputs
    capsys.readouterr()
    assert main(["change", str(files["baseline"]), str(files["followup"]), "-o", str(out), "--baseline-mask",
                 str(files["baseline_mask"]), "--followup-mask", str(files["followup_mask"]), "--dicom-outline",
                 "--overwrite"]) == 0
    assert "no DICOM outline series: the follow-up is not DICOM" in capsys.readouterr().err
    assert not (out / "followup_change_outline_dicom").exists()


def _dicom_followup_pair(pair, tmp_path):
    """The pair's files, its follow-up written as a DICOM series (AX FLAIR), OUTDIR and `deepwml change`'s arguments
    with both masks given: the set-up of the tests of a user's folder of the outline series' name."""
    files = pair["files"]
    flair = sitk.Cast(sitk.ReadImage(str(files["followup"])) * 100, sitk.sitkInt16)
    series = write_dicom_series(tmp_path / "followup", flair, uid="1.2.3.7", description="AX FLAIR",
                                extra={"0020|000d": "1.2.3.70"})
    out = tmp_path / "out"
    args = ["change", str(files["baseline"]), str(series), "-o", str(out), "--baseline-mask",
            str(files["baseline_mask"]), "--followup-mask", str(files["followup_mask"])]
    return files, series, out, args


def test_change_overwrite_never_deletes_a_users_images_in_its_outline_folder(pair, tmp_path, capsys):
    """CASE_change_outline_dicom/ holding a FLAIR's images under the series' names (IM00001.dcm, ...): --overwrite,
    with --dicom-outline or without it, would delete them as DeepWML's. Refused before any work now, naming the
    folder, the images and the earlier result left as they were."""
    files, series, out, args = _dicom_followup_pair(pair, tmp_path)
    assert main(args + ["--dicom-outline"]) == 0
    target = out / "followup_change_outline_dicom"
    theirs = users_images_in(series, target)
    report = (out / "followup_change.json").read_bytes()
    capsys.readouterr()
    for options in (["--dicom-outline", "--overwrite"], ["--overwrite"]):
        assert main(args + options) == 1
        assert f"{target} holds DICOM images that are not DeepWML's outline series" in capsys.readouterr().err
        assert {p.name: p.read_bytes() for p in target.iterdir()} == theirs
        assert (out / "followup_change.json").read_bytes() == report


def test_a_rerun_asking_for_the_outline_does_not_take_a_users_folder_of_its_name_for_it(pair, tmp_path, capsys):
    """A pair done without --dicom-outline, a folder CASE_change_outline_dicom of the user's images beside it (its
    report does not name it): a rerun with --dicom-outline said 'skipped - done before', the user's images taken for
    the outline series asked for, none made (segment's fault, 6b2f763). Now the folder is no output of the pair's:
    the outline is to be added, and the folder, holding images that are not DeepWML's, is refused as such, left as
    it is with the report. The pair's own outline, named by its report (a full run's) or listed (added), still
    makes the rerun a skip."""
    files, series, out, args = _dicom_followup_pair(pair, tmp_path)
    assert main(args) == 0
    target = out / "followup_change_outline_dicom"
    theirs = users_images_in(series, target)
    report = (out / "followup_change.json").read_bytes()
    capsys.readouterr()
    assert main(args + ["--dicom-outline"]) == 1
    err = capsys.readouterr().err
    assert f"{target} holds DICOM images that are not DeepWML's outline series" in err, err
    assert {p.name: p.read_bytes() for p in target.iterdir()} == theirs
    assert (out / "followup_change.json").read_bytes() == report
    shutil.rmtree(target)
    assert main(args + ["--dicom-outline"]) == 0
    assert "followup: added - added followup_change_outline_dicom" in capsys.readouterr().err
    assert main(args + ["--dicom-outline"]) == 0
    assert "followup: skipped - done before" in capsys.readouterr().err
    # a full run's report names its outline in `dicom_outline` alone (not in `outputs`): a skip too
    assert main(args + ["--dicom-outline", "--overwrite"]) == 0
    assert "followup_change_outline_dicom" not in json.loads((out / "followup_change.json").read_text(
        encoding="utf-8"))["outputs"]
    capsys.readouterr()
    assert main(args + ["--dicom-outline"]) == 0
    assert "followup: skipped - done before" in capsys.readouterr().err


def test_the_pairs_own_outline_is_known_when_the_followup_is_typed_in_other_letters(pair, tmp_path, capsys):
    """On macOS and Windows (file names alike but for upper/lower case are one), a pair done with --dicom-outline, its
    follow-up .../followup, rerun with it typed .../FOLLOWUP: the report found (FOLLOWUP_change.json) names the
    folder followup_change_outline_dicom, and FOLLOWUP_change_outline_dicom there is that one; it was taken for a
    user's folder the report does not name. Here the file system is as such a one shows it: the earlier run's files
    under the names the rerun looks for, their contents as written."""
    files = pair["files"]
    flair = sitk.Cast(sitk.ReadImage(str(files["followup"])) * 100, sitk.sitkInt16)
    series = write_dicom_series(tmp_path / "followup", flair, uid="1.2.3.7", description="AX FLAIR",
                                extra={"0020|000d": "1.2.3.70"})
    out = tmp_path / "out"
    args = ["-o", str(out), "--baseline-mask", str(files["baseline_mask"]), "--followup-mask",
            str(files["followup_mask"]), "--dicom-outline"]
    assert main(["change", str(files["baseline"]), str(series)] + args) == 0
    assert json.loads((out / "followup_change.json").read_text(encoding="utf-8"))["dicom_outline"]["folder"] == \
        "followup_change_outline_dicom"
    for path in list(out.iterdir()):  # each file and the folder under both names (hard links, a link for the folder)
        for lower in ("followup", ".followup"):
            if path.name.startswith(lower):
                other = out / (lower.upper() + path.name[len(lower):])
                other.symlink_to(path.name) if path.is_dir() else os.link(path, other)
    typed = tmp_path / "FOLLOWUP"
    typed.symlink_to(series)
    capsys.readouterr()
    assert main(["change", str(files["baseline"]), str(typed)] + args) == 0
    assert "FOLLOWUP: skipped - done before" in capsys.readouterr().err


def test_a_users_folder_of_the_outlines_name_without_a_report_is_said_to_be_theirs_at_once(pair, tmp_path, capsys):
    """No report of the pair in OUTDIR, a folder CASE_change_outline_dicom of the user's images there: the pair was
    refused as 'outputs exist (followup_change_outline_dicom/); use --overwrite' (a manifest's pair, its other files
    there, as 'an incomplete set of outputs ...; rerun with --overwrite'), and --overwrite then refused the folder as
    not DeepWML's. The first refusal now says so, and what to do; the folder is left as it is."""
    files, series, out, args = _dicom_followup_pair(pair, tmp_path)
    target = out / "followup_change_outline_dicom"
    theirs = users_images_in(series, target)
    said = f"{target} holds DICOM images that are not DeepWML's outline series"
    capsys.readouterr()
    for options in (["--dicom-outline"], [], ["--dicom-outline", "--overwrite"]):
        assert main(args + options) == 1
        err = capsys.readouterr().err
        assert said in err and "use --overwrite" not in err, err
        assert sorted(p.name for p in out.iterdir()) == ["followup_change_outline_dicom"]
    # a manifest's pair whose earlier run left its files without its report
    manifest = _manifest(tmp_path / "pairs.csv", files, case="followup", followup=series)
    shutil.rmtree(target)
    assert main(["change", "--manifest", str(manifest), "-o", str(out)]) == 0
    (out / "followup_change.json").unlink()
    theirs = users_images_in(series, target)
    capsys.readouterr()
    assert main(["change", "--manifest", str(manifest), "-o", str(out), "--dicom-outline"]) == 1
    err = capsys.readouterr().err
    assert said in err and "incomplete set" not in err, err
    assert {p.name: p.read_bytes() for p in target.iterdir()} == theirs


def test_an_outdir_of_change_given_to_segment_is_an_earlier_runs_outputs(pair, tmp_path, tiny_model, capsys):
    """`deepwml change`'s OUTDIR given to `deepwml segment` (`segment out/ -o out2/`): its registered baseline was
    segmented as a new scan ("ok", exit 0), its change map and .seg.nrrd skipped as label masks, because only
    segment's own CASE_report.json was read for an earlier run's outputs, not CASE_change.json. Now a change
    report's outputs (its `outputs` list; for an older report without one, the names change writes) are an earlier
    run's outputs as segment's own: the folder refused as holding only them, such a file given alone named so, and a
    scan beside them still segmented."""
    files = pair["files"]
    out = tmp_path / "out"
    assert main(["change", str(files["baseline"]), str(files["followup"]), "-o", str(out), "--case", "p1",
                 "--baseline-mask", str(files["baseline_mask"]), "--followup-mask", str(files["followup_mask"])]) == 0
    report_path = out / "p1_change.json"
    report = json.loads(report_path.read_text(encoding="utf-8"))
    assert "p1_baseline_registered.nii.gz" in report["outputs"]
    segment = ["--model", str(tiny_model), "--device", "cpu", "--no-brain-mask"]
    older = {key: value for key, value in report.items() if key != "outputs"}  # a version before the list
    for written in (report, older):
        report_path.write_text(json.dumps(written), encoding="utf-8")
        out2 = tmp_path / f"out2_{len(written)}"
        capsys.readouterr()
        assert main(["segment", str(out), "-o", str(out2), *segment]) == 1
        err = capsys.readouterr().err
        assert (f"{out} holds only the outputs of an earlier DeepWML run (1 case(s): p1), no scan; give the folder of "
                "the FLAIRs (each report's `baseline` and `followup` name its scans)") in err, err
        assert not list(out2.glob("p1_*")), sorted(p.name for p in out2.iterdir())
        assert main(["segment", str(out / "p1_baseline_registered.nii.gz"), "-o", str(out2), *segment]) == 1
        err = capsys.readouterr().err
        assert (f"p1_baseline_registered.nii.gz is an output of an earlier DeepWML run (p1_change.json beside it lists "
                f"it), not a scan; give the FLAIR it was made from ({files['baseline']} or {files['followup']})") in err
    shutil.copyfile(files["followup"], out / "scan.nii.gz")  # a scan beside them: segmented, they are not
    capsys.readouterr()
    assert main(["segment", str(out), "-o", str(tmp_path / "out3"), *segment]) == 0
    err = capsys.readouterr().err
    assert "1/1 cases done (0 failed, 0 skipped)" in err, err
    assert not list((tmp_path / "out3").glob("p1_*"))


def test_an_outdir_of_segment_given_for_the_follow_up_is_named_as_its_outline_series(pair, tmp_path, capsys):
    """`deepwml segment --dicom-outline`'s OUTDIR (or its outline series' folder) given as the follow-up: its outline
    series, the only series below it, was read as the FLAIR and refused as 'has 3 values per voxel (vector/RGB)'.
    Now named as DeepWML's outline series, the FLAIR's folder asked for."""
    from DeepWMLLib import dicom_outline

    files = pair["files"]
    flair = sitk.Cast(sitk.ReadImage(str(files["followup"])) * 100, sitk.sitkInt16)
    series = write_dicom_series(tmp_path / "followup", flair, uid="1.2.3.7", description="AX FLAIR", number=4,
                                extra={"0020|000d": "1.2.3.70"})
    out = tmp_path / "segmented"
    out.mkdir()
    chosen, _ = io.choose_dicom_series(series)
    dicom_outline.write_outline_series(dicom_outline.outline_series(
        io.read_image(series), io.read_mask(files["followup_mask"]), chosen, {}), out / "followup_outline_dicom")
    capsys.readouterr()
    for given in (out, out / "followup_outline_dicom"):
        assert main(["change", str(files["baseline"]), str(given), "-o", str(tmp_path / "change"), "--baseline-mask",
                     str(files["baseline_mask"]), "--followup-mask", str(files["followup_mask"])]) == 1
        err = capsys.readouterr().err
        assert f"{given} holds only DeepWML's outline series, series 1004 'DeepWML WMH outline (AX FLAIR)'" in err, err
        assert "values per voxel" not in err


def test_each_registration_says_when_it_ends(pair, tmp_path, capsys):
    """The two registrations take tens of seconds each on a clinical pair (30 s the first way on patient19's, 2 CPU
    cores), after a single 'registering ...' line: each now says when it ends, so the wait does
    not read as a hang."""
    files = pair["files"]
    assert main(["change", str(files["baseline"]), str(files["followup"]), "-o", str(tmp_path / "out"),
                 "--baseline-mask", str(files["baseline_mask"]), "--followup-mask", str(files["followup_mask"])]) == 0
    err = capsys.readouterr().err
    start = err.index("registering the baseline to the follow-up (and back, to check it) ...")
    forward = err.index("  registered the baseline to the follow-up in ", start)
    assert err.index("s; now the other way round, to check it ...", forward) < err.index(
        "  registered the other way round in ", forward)

def test_a_follow_up_the_outline_cannot_join_is_refused_before_registering(pair, tmp_path, monkeypatch, capsys):
    """--dicom-outline with a DICOM follow-up without a Study Instance UID (the outline series could not join its
    study): refused from its headers before the registration and the comparison, as --dicom-seg's missing Frame
    of Reference is, not after them; nothing written."""
    def compared(*args, **kwargs):
        raise AssertionError("the scans were registered and compared")

    monkeypatch.setattr(change, "lesion_change", compared)
    files = pair["files"]
    flair = sitk.Cast(sitk.ReadImage(str(files["followup"])) * 100, sitk.sitkInt16)
    series = write_dicom_series(tmp_path / "followup", flair, uid="1.2.3.7", description="AX FLAIR", number=4,
                                extra={"0010|0020": "P-7", "0020|000d": ""})
    out = tmp_path / "out"
    assert main(["change", str(files["baseline"]), str(series), "-o", str(out), "--baseline-mask",
                 str(files["baseline_mask"]), "--followup-mask", str(files["followup_mask"]), "--dicom-outline"]) == 1
    err = capsys.readouterr().err
    assert "no Study Instance UID, so the outline series cannot join its study; rerun without --dicom-outline" in err
    assert "registering" not in err and "registered and compared" not in err
    assert not out.exists() or not list(out.iterdir())

SEG_PATIENT = {"0010|0010": "Roe^Ann", "0010|0020": "P-9", "0020|000d": "1.2.3.90", "0020|0052": "1.2.3.91",
               "0008|0020": "20260301"}


def _dicom_followup(pair, folder):
    """The pair's follow-up written as a DICOM series with a patient, study and Frame of Reference."""
    flair = sitk.Cast(sitk.ReadImage(str(pair["files"]["followup"])) * 100, sitk.sitkInt16)  # within int16
    return write_dicom_series(folder, flair, uid="1.2.3.9", description="AX FLAIR", number=5, extra=SEG_PATIENT)


@pytest.fixture(scope="module")
def change_seg_run(pair, tmp_path_factory):
    """`deepwml change --dicom-seg` of the phantom pair (stable, new, enlarging, gone, not assessable lesions) with
    its follow-up as a DICOM series and both masks given: (the follow-up's folder, OUTDIR, the report)."""
    folder = tmp_path_factory.mktemp("seg")
    series = _dicom_followup(pair, folder / "followup")
    files = pair["files"]
    with pytest.MonkeyPatch.context() as patched:  # its registrations those the tests of this series make
        memoize_alignments(patched)
        assert main(["change", str(files["baseline"]), str(series), "-o", str(folder / "out"), "--baseline-mask",
                     str(files["baseline_mask"]), "--followup-mask", str(files["followup_mask"]), "--dicom-seg"]) == 0
    report = json.loads((folder / "out" / "followup_change.json").read_text(encoding="utf-8"))
    return series, folder / "out", report


def _seg_frames(ds) -> np.ndarray:
    return ds.pixel_array.reshape((int(ds.NumberOfFrames), ds.Rows, ds.Columns))


def test_the_change_seg_has_each_call_present_as_a_segment_on_the_follow_ups_slices(change_seg_run):
    """--dicom-seg with a DICOM follow-up: CASE_change_seg.dcm on the follow-up's series, one segment per call present
    (named, described, in its colour), its frames sorted by segment then slice, each frame the change label map ==
    that call on the follow-up slice it names (found by its position, not its order), at that slice's position; a
    frame for each slice holding a voxel of its segment (and segment 1's on the first and last slices), no other
    (every segment had a frame on every slice: 7 times as many); the follow-up's patient, study, Frame of Reference and
    every instance referenced; Series Number the follow-up's + 4000 (+ 2000 was the WMH SEG's); the report lists
    it."""
    pydicom = pytest.importorskip("pydicom")
    from DeepWMLLib import dicom_seg

    series, out, report = change_seg_run
    assert "followup_change_seg.dcm" in report["outputs"]
    ds = pydicom.dcmread(out / "followup_change_seg.dcm")
    labels_image = sitk.ReadImage(str(out / "followup_change.nrrd"))
    labels = sitk.GetArrayFromImage(labels_image)
    present = [value for value in change.LABELS if (labels == value).any()]
    assert {1, 2, 3} <= set(present)  # stable, new and enlarging at least
    names = [segment.SegmentLabel for segment in ds.SegmentSequence]
    assert names == [change.LABELS[value] for value in present]
    assert [int(segment.SegmentNumber) for segment in ds.SegmentSequence] == list(range(1, len(present) + 1))
    assert report["dicom_seg"]["segments"] == {str(n): name for n, name in enumerate(names, start=1)}
    held = {(number, k) for number, value in enumerate(present, start=1) for k in range(labels.shape[0])
            if (labels[k] == value).any()}
    expected = held | {(1, k) for k in (0, labels.shape[0] - 1) if k not in {k for _, k in held}}
    assert report["dicom_seg"]["frames"] == int(ds.NumberOfFrames) == len(expected) < len(present) * labels.shape[0]
    assert ds.SOPInstanceUID == report["dicom_seg"]["sop_instance_uid"] and ds.Modality == "SEG"
    assert ds.SeriesDescription == "DeepWML lesion change SEG (AX FLAIR)" and ds.SeriesNumber == 4005
    for segment, value in zip(ds.SegmentSequence, present):
        rgb = tuple(int(round(255 * c)) for c in change.COLOURS[value])
        assert list(segment.RecommendedDisplayCIELabValue) == dicom_seg.cielab(rgb)
        assert segment.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
        assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == "52988006"
        key = change.LABELS[value].replace(" ", "_")
        assert f"Here: {report[f'n_{key}']} lesion" in segment.SegmentDescription
    new = ds.SegmentSequence[present.index(2)].SegmentDescription
    assert new.startswith("A follow-up lesion with nothing of the baseline's within 2 mm") and "not for diagnosis" in new
    sources = {d.SOPInstanceUID: d for d in (pydicom.dcmread(p) for p in sorted(series.iterdir()))}
    frames = _seg_frames(ds)
    order = []
    framed = sorted({k for _, k in expected})  # the slices with a frame: the position index counts them 1, 2, ...
    for i, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        source = sources[item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID]
        position = [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        assert np.allclose(position, [float(v) for v in source.ImagePositionPatient], atol=1e-3)
        k = labels_image.TransformPhysicalPointToIndex(position)[2]  # the label map's slice at that position
        assert np.array_equal(frames[i], labels[k] == present[number - 1]), (i, number, k)
        assert list(item.FrameContentSequence[0].DimensionIndexValues) == [number, framed.index(k) + 1]
        order.append((number, k))
    assert order == sorted(order) and set(order) == expected and len(order) == frames.shape[0]
    first = next(iter(sources.values()))
    for keyword in ("PatientName", "PatientID", "StudyInstanceUID", "FrameOfReferenceUID", "StudyDate"):
        assert ds[keyword].value == first[keyword].value, keyword
    referenced = ds.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == "1.2.3.9"
    assert sorted(r.ReferencedSOPInstanceUID for r in referenced.ReferencedInstanceSequence) == sorted(sources)


def test_highdicom_reads_each_change_segment_as_the_label_map(change_seg_run):
    """highdicom's reading of the change SEG: each segment, found by its label, over the follow-up's instances in
    slice order, is the change label map == that call."""
    pydicom = pytest.importorskip("pydicom")
    hd = pytest.importorskip("highdicom")
    series, out, _ = change_seg_run
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "followup_change.nrrd")))
    seg = hd.seg.segread(out / "followup_change_seg.dcm")
    by_position = sorted((pydicom.dcmread(p) for p in series.iterdir()), key=lambda d: float(d.ImagePositionPatient[2]))
    uids = [d.SOPInstanceUID for d in by_position]  # the slices as the label map holds them (its axis points up)
    checked = 0
    for value, name in change.LABELS.items():
        numbers = seg.get_segment_numbers(segment_label=name)
        assert len(numbers) == int((labels == value).any()), name
        if numbers:
            pixels = seg.get_pixels_by_source_instance(uids, segment_numbers=numbers)[..., 0]
            assert np.array_equal(pixels, (labels == value).astype(pixels.dtype)), name
            checked += 1
    assert checked >= 3


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) is not installed")
def test_dciodvfy_finds_no_error_in_the_change_seg(change_seg_run):
    """The DICOM standard's validator (dicom3tools' dciodvfy) finds no error in the change SEG of several segments."""
    import subprocess

    _, out, _ = change_seg_run
    found = subprocess.run(["dciodvfy", str(out / "followup_change_seg.dcm")], capture_output=True, text=True,
                           timeout=120)
    lines = (found.stdout + found.stderr).splitlines()
    assert any("Segmentation" in line for line in lines), lines
    assert [line for line in lines if line.startswith("Error")] == []


def test_the_change_seg_read_as_a_mask_is_the_follow_ups_lesions(change_seg_run, pair, caplog):
    """The change SEG given where a mask is read (evaluate, consensus, change, train: io.read_mask): the follow-up's
    lesions, its stable, new, enlarging, not assessable and small new segments, the follow-up mask itself on the
    phantom pair; gone and small gone (baseline lesions no longer there) left out, a warning naming them. Every
    segment was joined, 'gone' too, under the warning of segments 'none labelled WMH'."""
    import logging

    series, out, report = change_seg_run
    flair = io.read_image(series)
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "followup_change.nrrd")))
    assert (labels == 5).any()  # a gone lesion, which the follow-up does not hold
    with caplog.at_level(logging.WARNING):
        read = sitk.GetArrayFromImage(io.read_mask(out / "followup_change_seg.dcm", flair))
    assert np.array_equal(read, np.isin(labels, [1, 2, 3, 4, 6]).astype(np.uint8))
    followup = sitk.GetArrayFromImage(io.read_mask(pair["files"]["followup_mask"], flair)) > 0
    assert np.array_equal(read > 0, followup)
    left = ", ".join(change.LABELS[v] for v in (5, 7) if (labels == v).any())
    assert "DeepWML's lesion change SEG, read as the follow-up's lesions" in caplog.text
    assert f"; {left} left out (baseline lesions no longer there)" in caplog.text
    assert "none labelled WMH" not in caplog.text
    assert io.lesion_segment_names(out / "followup_change_seg.dcm") == [
        change.LABELS[v] for v in change.LABELS if v in (1, 2, 3, 4, 6) and (labels == v).any()]
    assert set(io.FOLLOWUP_CALLS + io.BASELINE_CALLS) == set(change.LABELS.values())
    assert io.CHANGE_SEG_CONTENT_LABEL == pytest.importorskip("pydicom").dcmread(
        out / "followup_change_seg.dcm").ContentLabel


@pytest.mark.parametrize("kind", ["nii.gz", "nrrd", "mha"])
def test_the_change_label_map_read_as_a_mask_is_the_follow_ups_lesions(kind, tmp_path, monkeypatch, caplog, capsys):
    """CASE_change.nii.gz (.nrrd, .mha) given where a mask is read (evaluate --reference, export, change
    --followup-mask, consensus, train: io.read_mask) is the follow-up's lesions, voxel for voxel its mask, as the
    change SEG and CASE_change.seg.nrrd are read; gone lesions (baseline-only voxels) left out, a warning saying so
    and how the map was known: its header (descrip, ITK_FileNotes), else (a map saved again without it, or written
    by an earlier version) its report beside it. It was read as a rater's map of several labels: every label joined,
    gone ones too (evaluate refused it or took 'new' for 'ignore'). A rater's label map is read as before, and the
    map edited since its report is no longer known by it."""
    import logging

    flairs, followup_mask, files, out = every_fate_change(tmp_path, monkeypatch, "--output-format", kind)
    labels_file = out / f"followup_change.{kind}"
    raw = sitk.GetArrayFromImage(sitk.ReadImage(str(labels_file)))
    assert (raw == 5).any() and (raw == 2).any() and (raw == 1).any()  # gone, new and stable lesions
    expected = sitk.GetArrayFromImage(followup_mask)

    def read(path, **options) -> np.ndarray:
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            return sitk.GetArrayFromImage(io.read_mask(path, flairs[1], "the follow-up FLAIR", **options))

    assert np.array_equal(read(labels_file), expected)
    assert (f"DeepWML's lesion change label map (its header says so ('{io.CHANGE_MAP_NOTES}')), read as the "
            "follow-up's lesions (stable, new, enlarging, not assessable, small new); gone, small gone left out "
            f"({int(np.count_nonzero(np.isin(raw, [5, 7])))} voxels: baseline lesions no longer there)") in caplog.text
    assert io.file_notes(labels_file) == io.CHANGE_MAP_NOTES
    assert np.array_equal(read(labels_file, change_labels=True), raw)  # change's rerun adding outputs: its labels
    # evaluate: the follow-up mask against the change map, the same lesions (Dice 1)
    capsys.readouterr()
    assert main(["evaluate", "--prediction", str(files["followup_mask"]), "--reference", str(labels_file),
                 "--json", str(tmp_path / "dice.json")]) == 0
    assert json.loads((tmp_path / "dice.json").read_text(encoding="utf-8"))["dice"] == 1.0
    if kind == "nii.gz":  # export: the follow-up's lesions, and its report says how the map was read
        assert main(["export", str(files["followup"]), str(labels_file), "-o", str(tmp_path / "export"),
                     "--case", "fu"]) == 0
        exported = json.loads((tmp_path / "export" / "fu_report.json").read_text(encoding="utf-8"))
        assert exported["volume_ml"] == pytest.approx(float(expected.sum()) * np.prod(followup_mask.GetSpacing()) / 1000)
        assert any("DeepWML's lesion change label map (its header says so" in w for w in exported["warnings"])
    # a rater's map of the same labels, elsewhere and without the header's words: read as it is
    rater = tmp_path / "rater" / f"followup_change.{kind}"
    rater.parent.mkdir()
    plain = sitk.GetImageFromArray(raw)
    plain.CopyInformation(sitk.ReadImage(str(labels_file)))
    sitk.WriteImage(plain, str(rater))
    assert io.file_notes(rater) == "" and np.array_equal(read(rater), raw) and "change" not in caplog.text
    # the map saved again without its header's words (a tool that drops them): known by its report beside it
    sitk.WriteImage(plain, str(labels_file))
    assert io.file_notes(labels_file) == ""
    assert np.array_equal(read(labels_file), expected)
    assert "change label map (its voxels are those its report followup_change.json records (labels_sha256))" \
        in caplog.text
    report_path = out / "followup_change.json"
    report = json.loads(report_path.read_text(encoding="utf-8"))
    del report["labels_sha256"]  # a report of an earlier version: it lists its label map
    report_path.write_text(json.dumps(report), encoding="utf-8")
    assert np.array_equal(read(labels_file), expected)
    assert "(its report followup_change.json lists it as the change label map)" in caplog.text
    report["labels_sha256"] = io.mask_digest(plain)
    report_path.write_text(json.dumps(report), encoding="utf-8")
    edited = raw.copy()
    edited[0, 0, 0] = 2  # edited since: its report no longer shows what it is
    plain = sitk.GetImageFromArray(edited)
    plain.CopyInformation(sitk.ReadImage(str(labels_file)))
    sitk.WriteImage(plain, str(labels_file))
    assert np.array_equal(read(labels_file), edited) and "change" not in caplog.text


def test_a_studys_outputs_never_share_a_series_number(pair, tmp_path, tiny_model):
    """`segment --dicom-seg --dicom-outline` and `change --dicom-seg --dicom-outline` on one follow-up series: its
    WMH outline, WMH SEG, change outline and change SEG each have their own series number (+ 1000, 2000, 3000,
    4000), none the source's; the change SEG had the WMH SEG's + 2000 and the change outline the WMH outline's +
    1000. Near the largest series number (where the offsets are taken off) they stay apart too."""
    from types import SimpleNamespace

    pydicom = pytest.importorskip("pydicom")
    from DeepWMLLib import dicom_outline, dicom_seg

    files = pair["files"]
    series = _dicom_followup(pair, tmp_path / "followup")
    out = tmp_path / "out"
    assert main(["segment", str(series), "-o", str(out / "segment"), "--model", str(tiny_model), "--device", "cpu",
                 "--no-brain-mask", "--dicom-seg", "--dicom-outline"]) == 0
    assert main(["change", str(files["baseline"]), str(series), "-o", str(out / "change"), "--baseline-mask",
                 str(files["baseline_mask"]), "--followup-mask", str(files["followup_mask"]), "--dicom-seg",
                 "--dicom-outline"]) == 0
    numbers = {}
    for path in sorted(out.rglob("*")):
        if path.is_file() and path.suffix == ".dcm":
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            numbers.setdefault(ds.SeriesInstanceUID, set()).add(int(ds.SeriesNumber))
    assert len(numbers) == 4 and all(len(found) == 1 for found in numbers.values())
    found = sorted(n for found in numbers.values() for n in found)
    assert found == [1005, 2005, 3005, 4005]
    offsets = (dicom_outline.SERIES_NUMBER_OFFSET, dicom_seg.SERIES_NUMBER_OFFSET,
               dicom_outline.CHANGE_SERIES_NUMBER_OFFSET, dicom_seg.CHANGE_SERIES_NUMBER_OFFSET)
    for source in (5, 2**31 - 1, 2**31 - 2500, 2**31 - 3500):
        made = [dicom_outline.series_number(SimpleNamespace(number=source), offset) for offset in offsets]
        assert len(set(made) | {source}) == 5, (source, made)


def test_the_change_seg_numbers_the_calls_present_and_marks_each_with_its_own_value(tmp_path):
    """A label map holding only new (2), gone (5) and small gone (7): three segments, numbered 1-3, each the map ==
    its own call's value (not its segment number), a frame on each slice holding a voxel of its call (4, not 12); a
    map without any lesion has no SEG (None)."""
    pydicom = pytest.importorskip("pydicom")
    image, _ = make_volume(size=(20, 16, 4), spacing=(1.0, 1.0, 3.0), dtype=sitk.sitkInt16)
    folder = write_dicom_series(tmp_path / "f", image, description="FLAIR", extra=SEG_PATIENT)
    series, _ = io.choose_dicom_series(folder)
    flair = io.read_image(folder, series=series)
    array = np.zeros(sitk.GetArrayViewFromImage(flair).shape, np.uint8)
    array[0, 2:5, 3:6], array[1, 8:9, 1:12], array[3, 10:14, 15:17] = 2, 5, 7
    array[2, 0, 0] = 5
    labels = sitk.GetImageFromArray(array)
    labels.CopyInformation(flair)
    report = {"tolerance_mm": 2.0, "min_change_ml": 0.02, "enlarge_fraction": 1.0, "enlarge_min_ml": 0.05,
              "presence": None, "n_new": 1, "new_ml": 0.01, "n_gone": 2, "gone_ml": 0.02, "n_small_gone": 1,
              "small_gone_ml": 0.01, "registration": {"reliable": True}, "masks": {}}
    made = change.change_seg(flair, labels, series, report)
    io.write_bytes(made.data, tmp_path / "s.dcm")
    ds = pydicom.dcmread(tmp_path / "s.dcm")
    assert [s.SegmentLabel for s in ds.SegmentSequence] == ["new", "gone", "small gone"]
    assert made.segments == {1: "new", 2: "gone", 3: "small gone"} and made.frames == 4 == int(ds.NumberOfFrames)
    frames = _seg_frames(ds)
    for i, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
        number, k = (int(v) for v in item.FrameContentSequence[0].DimensionIndexValues)
        assert (number, k) == [(1, 1), (2, 2), (2, 3), (3, 4)][i]
        assert int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber) == number
        assert np.array_equal(frames[i], array[k - 1] == (2, 5, 7)[number - 1]), i
    # read as a mask: the follow-up's new lesion alone (gone and small gone are baseline lesions no longer there)
    assert np.array_equal(sitk.GetArrayFromImage(io.read_mask(tmp_path / "s.dcm", flair)), (array == 2).astype(np.uint8))
    # a change SEG of gone lesions alone: an all-zero mask (the follow-up has none), not refused as no lesion segment
    gone = sitk.GetImageFromArray(np.where(array == 2, 0, array).astype(np.uint8))
    gone.CopyInformation(flair)
    io.write_bytes(change.change_seg(flair, gone, series, report).data, tmp_path / "gone.dcm")
    assert not sitk.GetArrayFromImage(io.read_mask(tmp_path / "gone.dcm", flair)).any()
    assert change.change_seg(flair, labels * 0, series, report) is None
    # a registration not reliable: every segment's description opens with the checks that failed, and the content
    # description says so
    doubtful = {**report, "registration": {"reliable": False, "correlation": 0.31, "mutual_information": -0.5}}
    ds = pydicom.dcmread(io.write_bytes(change.change_seg(flair, labels, series, doubtful).data, tmp_path / "u.dcm"))
    assert all(s.SegmentDescription.startswith("REGISTRATION NOT RELIABLE (correlation 0.31, under 0.80; mutual "
                                               "information -0.50, above -0.65)") for s in ds.SegmentSequence)
    assert "NOT RELIABLE" in ds.ContentDescription and "NOT RELIABLE" not in pydicom.dcmread(tmp_path / "s.dcm").ContentDescription


def test_the_change_seg_for_a_file_follow_up_overwrite_and_a_pair_without_lesions(pair, tmp_path, capsys):
    """A follow-up file: compared, a warning, no SEG; an earlier SEG is an output (refused without --overwrite, a new
    instance with it, removed by --overwrite without --dicom-seg); a pair without any lesion: no SEG, a warning."""
    pydicom = pytest.importorskip("pydicom")
    files = pair["files"]
    series = _dicom_followup(pair, tmp_path / "followup")
    out = tmp_path / "out"
    masks = ["--baseline-mask", str(files["baseline_mask"]), "--followup-mask", str(files["followup_mask"])]
    assert main(["change", str(files["baseline"]), str(files["followup"]), "-o", str(out), *masks, "--dicom-seg"]) == 0
    assert "no DICOM SEG: the follow-up is not DICOM" in capsys.readouterr().err
    report = json.loads((out / "followup_change.json").read_text(encoding="utf-8"))
    assert "dicom_seg" not in report and "followup_change_seg.dcm" not in report["outputs"]
    assert not (out / "followup_change_seg.dcm").exists()
    args = ["change", str(files["baseline"]), str(series), "-o", str(tmp_path / "dcm"), *masks]
    assert main(args + ["--dicom-seg"]) == 0
    first = pydicom.dcmread(tmp_path / "dcm" / "followup_change_seg.dcm").SOPInstanceUID
    capsys.readouterr()
    assert main(args + ["--dicom-seg"]) == 0  # done before: skipped, its SEG untouched
    assert "followup: skipped - done before" in capsys.readouterr().err
    assert pydicom.dcmread(tmp_path / "dcm" / "followup_change_seg.dcm").SOPInstanceUID == first
    assert main(args + ["--dicom-seg", "--overwrite"]) == 0
    again = pydicom.dcmread(tmp_path / "dcm" / "followup_change_seg.dcm")
    assert again.SOPInstanceUID != first
    assert main(args + ["--overwrite"]) == 0
    assert not (tmp_path / "dcm" / "followup_change_seg.dcm").exists()
    for path in (tmp_path / "dcm").iterdir():
        path.unlink()
    (tmp_path / "dcm" / "followup_change_seg.dcm").write_bytes(b"an earlier run's")  # an earlier SEG alone
    assert main(args + ["--dicom-seg"]) == 1
    # without its report: an incomplete set, as in a cohort
    assert "an earlier run left an incomplete set of outputs (followup_change_seg.dcm; no report)" in capsys.readouterr().err
    empty = sitk.Cast(sitk.ReadImage(str(files["followup_mask"])) * 0, sitk.sitkUInt8)
    empty_base = sitk.Cast(sitk.ReadImage(str(files["baseline_mask"])) * 0, sitk.sitkUInt8)
    sitk.WriteImage(empty, str(tmp_path / "fu0.nii.gz"))
    sitk.WriteImage(empty_base, str(tmp_path / "bl0.nii.gz"))
    assert main(["change", str(files["baseline"]), str(series), "-o", str(tmp_path / "none"), "--baseline-mask",
                 str(tmp_path / "bl0.nii.gz"), "--followup-mask", str(tmp_path / "fu0.nii.gz"), "--dicom-seg"]) == 0
    assert "no DICOM SEG: neither scan has a lesion" in capsys.readouterr().err
    report = json.loads((tmp_path / "none" / "followup_change.json").read_text(encoding="utf-8"))
    assert "followup_change_seg.dcm" not in report["outputs"] and not (tmp_path / "none" / "followup_change_seg.dcm").exists()


def test_a_cohort_with_dicom_seg_writes_skips_and_finds_an_incomplete_set(pair, tmp_path, capsys):
    """change --manifest --dicom-seg: the pair with a DICOM follow-up gets its SEG, listed; a rerun skips it as done
    (the SEG untouched, and a SEG deleted since is optional, as the picture is); a SEG left alone (no report) is an
    incomplete set, refused without --overwrite."""
    pytest.importorskip("pydicom")
    manifest = _manifest(tmp_path / "pairs.csv", pair["files"], followup=_dicom_followup(pair, tmp_path / "followup"))
    out = tmp_path / "out"
    run = ["change", "--manifest", str(manifest), "-o", str(out), "--dicom-seg"]
    assert main(run) == 0
    report = json.loads((out / "p1_change.json").read_text(encoding="utf-8"))
    assert report["dicom_seg"]["file"] == "p1_change_seg.dcm" and "p1_change_seg.dcm" in report["outputs"]
    written = (out / "p1_change_seg.dcm").stat().st_mtime_ns
    capsys.readouterr()
    assert main(run) == 0 and "p1: skipped - done before" in capsys.readouterr().err
    assert (out / "p1_change_seg.dcm").stat().st_mtime_ns == written
    (out / "p1_change_seg.dcm").unlink()  # deleted since: optional, made again from the saved label map
    assert main(run) == 0 and "p1: added - added p1_change_seg.dcm from the saved p1_change.nrrd" in \
        capsys.readouterr().err
    assert (out / "p1_change_seg.dcm").is_file()
    for path in out.iterdir():
        if path.name.startswith("p1_"):
            path.unlink()
    (out / "p1_change_seg.dcm").write_bytes(b"an earlier run's")
    assert main(run) == 1
    assert "incomplete set of outputs (p1_change_seg.dcm; no report)" in capsys.readouterr().err
    assert main(run + ["--overwrite"]) == 0 and (out / "p1_change_seg.dcm").stat().st_size > 1000


def test_a_cohort_rerun_asking_for_the_picture_outline_and_seg_adds_them_from_the_saved_labels(pair, tmp_path, capsys,
                                                                                               monkeypatch):
    """change --manifest done without --qc, --dicom-outline and --dicom-seg, rerun with them: the pair is not compared
    again (no registration), the three are made from the saved change label map, the files there left byte for
    byte, the report listing them, the row `added`; the picture the one a full run draws. Nothing missing: skipped.
    A label map edited since (its labels not those the report records) is refused, nothing written."""
    pytest.importorskip("pydicom")
    manifest = _manifest(tmp_path / "pairs.csv", pair["files"], followup=_dicom_followup(pair, tmp_path / "followup"))
    out = tmp_path / "out"
    run = ["change", "--manifest", str(manifest), "-o", str(out)]
    assert main(run) == 0
    kept = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != "p1_change.json"
            and p.name.startswith("p1")}
    report = json.loads((out / "p1_change.json").read_text(encoding="utf-8"))
    assert report["labels_sha256"]
    capsys.readouterr()
    with monkeypatch.context() as patched:
        def refused(*args, **kwargs):
            raise AssertionError("the pair was compared again")

        patched.setattr(change, "lesion_change", refused)
        assert main(run + ["--qc", "--dicom-outline", "--dicom-seg"]) == 0
    err = capsys.readouterr().err
    assert ("p1: added - added p1_change_outline_dicom, p1_change_qc.png, p1_change_seg.dcm from the saved "
            "p1_change.nrrd") in err
    for name, data in kept.items():
        assert (out / name).read_bytes() == data, name
    added = json.loads((out / "p1_change.json").read_text(encoding="utf-8"))
    assert added["outputs_added"] == ["p1_change_outline_dicom", "p1_change_qc.png", "p1_change_seg.dcm"]
    assert {"p1_change_qc.png", "p1_change_seg.dcm"} <= set(added["outputs"])
    assert added["dicom_seg"]["file"] == "p1_change_seg.dcm" and added["dicom_outline"]["images"] > 0
    with open(out / "change_summary.csv", newline="", encoding="utf-8-sig") as f:
        assert next(csv.DictReader(f))["status"] == "added"
    assert main(run + ["--qc", "--dicom-outline", "--dicom-seg"]) == 0  # nothing missing
    assert "p1: skipped - done before" in capsys.readouterr().err
    # the outline series the rerun added, deleted since (sent to PACS; or a run killed before writing it, its report
    # listing it): an optional output, as in a full run's report, which does not list it: a plain rerun skips the
    # pair (it was an error, 'not its p1_change_outline_dicom (deleted?)')
    saved_outline = tmp_path / "outline_kept"
    shutil.move(str(out / "p1_change_outline_dicom"), saved_outline)
    assert main(run) == 0
    assert "p1: skipped - done before" in capsys.readouterr().err
    shutil.move(str(saved_outline), out / "p1_change_outline_dicom")
    assert main(["change", "--manifest", str(manifest), "-o", str(tmp_path / "full"), "--qc"]) == 0
    assert (tmp_path / "full" / "p1_change_qc.png").read_bytes() == (out / "p1_change_qc.png").read_bytes()
    # the label map edited since: refused, nothing added
    (out / "p1_change_qc.png").unlink()
    _new_called_stable(out / "p1_change.nrrd")
    before = (out / "p1_change.json").read_bytes()
    assert main(run + ["--qc"]) == 1
    assert "p1_change.nrrd was changed since the run that made it" in capsys.readouterr().err
    assert not (out / "p1_change_qc.png").exists() and (out / "p1_change.json").read_bytes() == before


def _new_called_stable(path) -> None:
    """The change label map at `path` edited by hand: its new lesions called stable."""
    labels = sitk.ReadImage(str(path))
    voxels = sitk.GetArrayFromImage(labels)
    voxels[voxels == 2] = 1
    edited = sitk.GetImageFromArray(voxels)
    edited.CopyInformation(labels)
    sitk.WriteImage(edited, str(path))


def test_two_visits_in_one_dicom_folder_are_compared_by_their_series(tmp_path, capsys):
    """Both visits' series in one folder (a patient's flattened export): refused without the series
    options, and when they name one series; with one each, each visit's FLAIR is read (here the later
    one is too thin to register, which is said before anything is registered)."""
    earlier, _ = make_volume(size=(32, 32, 6), spacing=(0.9, 0.9, 5.0), dtype=sitk.sitkInt16)
    later, _ = make_volume(size=(32, 32, 3), spacing=(0.9, 0.9, 5.0), dtype=sitk.sitkInt16, seed=1)
    folder = tmp_path / "PAT1"
    write_dicom_series(folder, earlier, uid="1.1.1", description="AX FLAIR", number=3, prefix="a",
                       extra={"0020|000d": "1.1", "0008|0020": "20250101"})
    write_dicom_series(folder, later, uid="1.2.1", description="AX FLAIR", number=7, prefix="b",
                       extra={"0020|000d": "1.2", "0008|0020": "20260101"})
    args = ["change", str(folder), str(folder), "-o", str(tmp_path / "out")]
    assert main(args) == 2
    assert "--baseline-series and --followup-series" in capsys.readouterr().err
    assert main(args + ["--baseline-series", "3", "--followup-series", "3"]) == 1
    assert "the same DICOM series" in capsys.readouterr().err
    assert main(args + ["--baseline-series", "3", "--followup-series", "7"]) == 1
    assert "the follow-up FLAIR has only 3 voxels along one axis" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_lesion_the_follow_up_cuts_off_is_not_assessable_not_shrunken(pair):
    """The same scan as follow-up, its top slices cut off through the highest lesion: that lesion is
    not called stable with a false shrinkage but not assessable (its baseline volume kept), and a
    warning says the total change cannot be measured there; the others stay stable."""
    flair, mask = pair["baseline"]
    lesions = sitk.GetArrayFromImage(sitk.ConnectedComponent(mask > 0))
    highest = lesions[np.nonzero(lesions.any(axis=(1, 2)))[0][-1]].max()
    slices = np.nonzero((lesions == highest).any(axis=(1, 2)))[0]
    assert slices.size >= 2
    keep = int(slices[-1])  # the follow-up ends inside the highest lesion
    report = change.lesion_change(flair, flair[:, :, :keep], mask, mask[:, :, :keep], check=False).report
    cut = [r for r in report["lesions"] if r["status"] == "not assessable"]
    assert len(cut) == 1 and cut[0]["scan"] == "follow-up" and cut[0]["change_ml"] is None
    assert cut[0]["baseline_ml"] > cut[0]["volume_ml"]
    assert report["n_new"] == report["n_gone"] == report["n_enlarging"] == 0 and report["n_stable"] >= 1
    assert all(abs(r["change_ml"]) < 0.05 for r in report["lesions"] if r["status"] == "stable")
    assert any("cannot be measured" in w for w in report["warnings"])
    assert not any("_cut" in r for r in report["lesions"])  # classify's mark for the warning stays out of the report


def _grid(size, spacing, array=None):
    image = sitk.GetImageFromArray(np.zeros(size[::-1], np.uint8) if array is None else array)
    image.SetSpacing(spacing)
    image.SetOrigin((0.0, 0.0, 0.0))
    return image


def test_a_gone_lesion_smaller_than_the_follow_ups_slice_gap_is_still_drawn():
    """A gone lesion between two 6 mm slices' centres never reaches half a voxel there: it is counted in
    the report and must show in the label map (and so in the picture and the Slicer segments) too."""
    base = np.zeros((40, 40, 40), np.uint8)
    base[2:5, 18:22, 18:22] = 1  # 0.048 ml between the follow-up's slice centres at z = 0 and 6 mm
    baseline = _grid((40, 40, 40), (1.0, 1.0, 1.0), base)
    followup = _grid((40, 40, 7), (1.0, 1.0, 6.0))
    labels, rows = change.classify(followup, baseline, sitk.Transform(3, sitk.sitkIdentity))
    assert [r["status"] for r in rows] == ["gone"]
    assert np.count_nonzero(labels == 5) >= 1


def test_a_lesion_with_no_baseline_volume_is_not_enlarging_from_nothing():
    """Kept from 'new' only by the baseline's probability (--presence), a follow-up lesion has no baseline
    volume to have grown from: stable, with no change given (before: enlarging by its whole volume)."""
    follow = np.zeros((20, 40, 40), np.uint8)
    follow[8:12, 15:25, 15:25] = 1  # 0.4 ml
    followup = _grid((40, 40, 20), (1.0, 1.0, 1.0), follow)
    baseline = _grid((40, 40, 20), (1.0, 1.0, 1.0))
    probability = sitk.Cast(followup, sitk.sitkFloat32) * 0.3  # just under the baseline's threshold there
    labels, rows = change.classify(followup, baseline, sitk.Transform(3, sitk.sitkIdentity),
                                   baseline_probabilities=probability, presence=0.15)
    assert [r["status"] for r in rows] == ["stable"]
    assert rows[0]["baseline_ml"] is None and rows[0]["change_ml"] is None


def test_a_follow_up_that_is_a_thin_slab_of_the_head_registers(shared_data):
    """An 8-slice (24 mm) slab of a real head, unmoved: matching its centre of mass to the whole head's
    started 12 cm off and never recovered (correlation 0.41, the warning fired); the scanner's own frame,
    tried then, lands on it."""
    base = sitk.ReadImage(str(shared_data / "open_ms" / "clinical_flair" / "patient01_study2.nii.gz"), sitk.sitkFloat32)
    follow = base[:, :, 32:40]
    registration = change.align(follow, base)
    points = [follow.TransformIndexToPhysicalPoint((i, j, k)) for i in (60, 190) for j in (60, 190) for k in (0, 7)]
    error = max(np.linalg.norm(np.subtract(registration.transform.TransformPoint(p), p)) for p in points)
    assert error < 0.5 and registration.correlation > 0.95


def test_a_baseline_lesion_kept_only_by_the_follow_ups_probability_has_its_row():
    """The mirror case: a baseline lesion with no follow-up lesion, kept from 'gone' only by the follow-up's
    probability (--presence). Before, it had no row at all: it vanished from the table, the label map and the
    counts. Now it is listed as stable from the baseline's side, its baseline volume kept, its change blank."""
    base = np.zeros((20, 40, 40), np.uint8)
    base[8:12, 15:25, 15:25] = 1  # 0.4 ml
    baseline = _grid((40, 40, 20), (1.0, 1.0, 1.0), base)
    followup = _grid((40, 40, 20), (1.0, 1.0, 1.0))
    probability = sitk.Cast(baseline, sitk.sitkFloat32) * 0.3  # just under the follow-up's threshold there
    labels, rows = change.classify(followup, baseline, sitk.Transform(3, sitk.sitkIdentity),
                                   followup_probabilities=probability, presence=0.15)
    assert [(r["status"], r["scan"], r["baseline_ml"], r["change_ml"]) for r in rows] == [
        ("stable", "baseline", 0.4, None)]
    assert np.count_nonzero(labels == 1) == 400  # drawn where it was, as stable
    summary = change._summary(rows, 0.4, 0.0)
    assert summary["n_stable"] == 1 and summary["n_gone"] == 0


def test_stable_ml_is_the_follow_ups_volume_and_a_baseline_side_row_is_given_apart(monkeypatch):
    """stable_ml added the baseline volume of a baseline lesion kept by the follow-up's probability (a row of scan
    baseline) to the follow-up volumes of the stable lesions seen there: one figure of two scans (patient12's pair,
    0.023 ml). Here a lesion of 0.4 ml at baseline shrank to 0.3 ml (stable, seen on both scans), and a 0.1 ml baseline
    lesion is still there only by the follow-up's probability: stable_ml is 0.3 (the follow-up's), not 0.4, the kept
    one's 0.1 ml is given apart, and the follow-up's calls add up to its lesion volume."""
    base = np.zeros((20, 40, 40), np.uint8)
    base[8:12, 5:15, 5:15] = 1  # 0.4 ml
    base[8:12, 25:30, 25:30] = 1  # 0.1 ml: kept by the follow-up's probability
    follow = np.zeros((20, 40, 40), np.uint8)
    follow[8:11, 5:15, 5:15] = 1  # 0.3 ml: shrunk, stable
    baseline_mask, followup_mask = _grid((40, 40, 20), (1.0, 1.0, 1.0), base), _grid((40, 40, 20), (1.0, 1.0, 1.0), follow)
    probability = np.zeros((20, 40, 40), np.float32)
    probability[8:12, 25:30, 25:30] = 0.3
    flairs = _unmoved_flairs(monkeypatch, baseline_mask, followup_mask)
    report = change.lesion_change(flairs[0], flairs[1], baseline_mask, followup_mask, check=False, presence=0.15,
                                  followup_probabilities=_grid((40, 40, 20), (1.0, 1.0, 1.0), probability)).report
    assert [(r["status"], r["scan"], r["volume_ml"], r["baseline_ml"]) for r in report["lesions"]] == [
        ("stable", "follow-up", 0.3, 0.4), ("stable", "baseline", 0.1, 0.1)]
    assert (report["n_stable"], report["stable_ml"]) == (2, 0.3)
    assert (report["n_stable_baseline_side"], report["stable_baseline_side_ml"]) == (1, 0.1)
    assert (report["baseline_volume_ml"], report["followup_volume_ml"]) == (0.5, 0.3)
    followup_calls = ("new", "small_new", "enlarging", "stable", "not_assessable")
    assert sum(report[f"{key}_ml"] for key in followup_calls) == pytest.approx(report["followup_volume_ml"], abs=1e-4)
    assert "stable: 2 lesions, 0.30 ml on the follow-up (1 of them on the baseline only, 0.10 ml there)" in \
        change.format_summary("p", report).splitlines()[1]


@pytest.mark.parametrize("kept_only", [False, True])
def test_the_printed_stable_and_not_assessable_say_which_scan_their_volumes_are_on(kept_only):
    """The printed summary gave a call's follow-up volume and its baseline-only lesions' baseline volume side by side
    without saying the first was the follow-up's ('2 lesions, 0.30 ml (1 of them on the baseline only, 0.10 ml
    there)'), and where every lesion of the call was a baseline-only one it read '1 lesion, 0.00 ml (1 of them on the
    baseline only, 0.10 ml there)'. Now the follow-up's volume says so, and a call of baseline-only lesions alone
    gives their baseline volume alone."""
    rows = [{"status": "stable", "scan": "baseline", "volume_ml": 0.1},
            {"status": "not assessable", "scan": "baseline", "volume_ml": 0.05}]
    if not kept_only:
        rows += [{"status": "stable", "scan": "follow-up", "volume_ml": 0.3},
                 {"status": "not assessable", "scan": "follow-up", "volume_ml": 0.2}]
    report = {**change._summary(rows, 0.15, 0.0 if kept_only else 0.5), "volume_change_percent": None,
              "min_change_ml": 0.02, "registration": {"rotation_deg": [0.0] * 3, "translation_mm": [0.0] * 3,
                                                      "correlation": 0.9, "mutual_information": -0.8}}
    lines = change.format_summary("p", report).splitlines()
    if kept_only:
        assert "stable: 1 lesion, on the baseline only (0.10 ml there); gone" in lines[1], lines
        assert lines[2].endswith("field of view): 1 lesion, on the baseline only (0.05 ml there)"), lines
    else:
        assert "stable: 2 lesions, 0.30 ml on the follow-up (1 of them on the baseline only, 0.10 ml there)" in lines[1]
        assert lines[2].endswith(": 2 lesions, 0.20 ml on the follow-up (1 of them on the baseline only, 0.05 ml "
                                 "there)"), lines


def test_a_lesion_that_split_shares_its_baseline_volume_and_merged_ones_add_up_once():
    """A 0.48 ml baseline bar split in two (13 and 15 voxels long, 2 apart): each part got the whole 0.48 ml
    as its baseline volume (0.96 ml in the table). Now each baseline voxel goes to the nearer part (14 and 16
    columns: 0.224 and 0.256 ml). Two baseline bars merged into one lesion count each once (0.448 ml)."""
    identity = sitk.Transform(3, sitk.sitkIdentity)
    base = np.zeros((20, 40, 40), np.uint8)
    base[8:12, 10:14, 5:35] = 1
    follow = np.zeros((20, 40, 40), np.uint8)
    follow[8:12, 10:14, 5:18] = 1
    follow[8:12, 10:14, 20:35] = 1
    rows = change.classify(_grid((40, 40, 20), (1.0, 1.0, 1.0), follow), _grid((40, 40, 20), (1.0, 1.0, 1.0), base),
                           identity)[1]
    assert [(r["volume_ml"], r["baseline_ml"], r["change_ml"]) for r in rows] == [
        (0.24, 0.256, -0.016), (0.208, 0.224, -0.016)]
    # the same split seen by a follow-up of 2 mm slices: the shares still add up to the baseline lesion
    coarse = _grid((40, 40, 10), (1.0, 1.0, 2.0), follow[::2])
    rows = change.classify(coarse, _grid((40, 40, 20), (1.0, 1.0, 1.0), base), identity)[1]
    assert len(rows) == 2 and sum(r["baseline_ml"] for r in rows) == pytest.approx(0.48, abs=1e-6)
    base, follow = follow.copy(), base.copy()  # the other way round: two lesions merged into one
    rows = change.classify(_grid((40, 40, 20), (1.0, 1.0, 1.0), follow), _grid((40, 40, 20), (1.0, 1.0, 1.0), base),
                           identity)[1]
    assert [(r["status"], r["volume_ml"], r["baseline_ml"]) for r in rows] == [("stable", 0.48, 0.448)]


def _unmoved_flairs(monkeypatch, *masks) -> list[sitk.Image]:
    """A noise FLAIR on each mask's grid, and the registration of the two scans made the identity (not moved)."""
    flairs = []
    for mask in masks:
        flair = sitk.GetImageFromArray(np.random.default_rng(0).normal(100, 10, mask.GetSize()[::-1]).astype(np.float32))
        flair.CopyInformation(mask)
        flairs.append(flair)
    monkeypatch.setattr(change, "align", lambda followup, baseline: change.Registration(
        sitk.Euler3DTransform(), 1.0, -1.0, 0, 0.0))  # the scans are not moved: no registration to do
    return flairs


def _paint(size, spacing, boxes) -> sitk.Image:
    """A mask on a grid at the origin, marked where the voxel centre lies in one of the boxes (x, y, z mm)."""
    k, j, i = np.indices(size[::-1])
    centre = [i * spacing[0], j * spacing[1], k * spacing[2]]
    mask = np.zeros(size[::-1], bool)
    for box in boxes:
        mask |= np.logical_and.reduce([(low <= c) & (c < high) for c, (low, high) in zip(centre, box)])
    return _grid(size, spacing, mask.astype(np.uint8))


def _every_fate(monkeypatch):
    """(FLAIRs, baseline mask, follow-up mask, follow-up probabilities) of a scene of every fate at once (a split,
    a merge, a baseline lesion kept by the follow-up's probability, a new and a gone one, a stable one), the
    baseline on 2 mm slices, the follow-up on 1 mm; registration left out (the scans are not moved)."""
    stable = ((5, 12), (5, 12), (4, 12))
    kept = ((34, 40), (5, 11), (14, 20))
    base_boxes = [stable, ((5, 40), (20, 24), (4, 10)),  # split below
                  ((5, 14), (32, 36), (4, 10)), ((18, 28), (32, 36), (4, 10)),  # merged below
                  kept, ((40, 46), (40, 46), (2, 8))]  # kept by the follow-up's probability; gone
    follow_boxes = [stable, ((5, 18), (20, 24), (4, 10)), ((22, 40), (20, 24), (4, 10)),
                    ((5, 28), (32, 36), (4, 10)), ((34, 40), (36, 42), (14, 20))]  # ...; new
    baseline_mask = _paint((48, 48, 12), (1.0, 1.0, 2.0), base_boxes)
    followup_mask = _paint((48, 48, 24), (1.0, 1.0, 1.0), follow_boxes)
    probability = sitk.Cast(_paint((48, 48, 24), (1.0, 1.0, 1.0), [kept]), sitk.sitkFloat32) * 0.3
    flairs = _unmoved_flairs(monkeypatch, baseline_mask, followup_mask)
    return flairs, baseline_mask, followup_mask, probability


def _every_fate_files(folder, monkeypatch):
    """`_every_fate`'s scene (registration left out) written as NIfTI files under `folder`: (FLAIRs, baseline mask,
    follow-up mask, the files by name: baseline, followup, baseline_mask, followup_mask)."""
    flairs, baseline_mask, followup_mask, _ = _every_fate(monkeypatch)
    files = {}
    for name, image in (("baseline", flairs[0]), ("followup", flairs[1]), ("baseline_mask", baseline_mask),
                        ("followup_mask", followup_mask)):
        files[name] = folder / f"{name}.nii.gz"
        sitk.WriteImage(image, str(files[name]))
    return flairs, baseline_mask, followup_mask, files


def every_fate_change(tmp_path, monkeypatch, *options):
    """`deepwml change` of `_every_fate_files`' pair written under `tmp_path`, both masks given (and `options`), into
    tmp_path / "out": (FLAIRs, follow-up mask, the files by name, OUTDIR)."""
    flairs, _, followup_mask, files = _every_fate_files(tmp_path, monkeypatch)
    out = tmp_path / "out"
    assert main(["change", str(files["baseline"]), str(files["followup"]), "-o", str(out), "--baseline-mask",
                 str(files["baseline_mask"]), "--followup-mask", str(files["followup_mask"]), *options]) == 0
    return flairs, followup_mask, files, out


def test_the_table_accounts_for_every_lesion_once_and_the_summary_agrees_with_it(monkeypatch):
    """In a scene of every fate at once (`_every_fate`), the rows' baseline volumes add up to the baseline's lesion
    volume, the follow-up rows' volumes to the follow-up's, the counts and volumes of the summary to the rows',
    and every row shows in the label map with its call."""
    flairs, baseline_mask, followup_mask, probability = _every_fate(monkeypatch)
    result = change.lesion_change(flairs[0], flairs[1], baseline_mask, followup_mask, followup_probabilities=probability,
                                  presence=0.15, check=False)
    report, rows = result.report, result.report["lesions"]
    assert sorted((r["status"], r["scan"]) for r in rows) == [
        ("gone", "baseline"), ("new", "follow-up"), ("stable", "baseline"), ("stable", "follow-up"),
        ("stable", "follow-up"), ("stable", "follow-up"), ("stable", "follow-up")]
    assert report["baseline_volume_ml"] == pytest.approx(sum(r["baseline_ml"] or 0 for r in rows), abs=1e-4)
    assert report["followup_volume_ml"] == pytest.approx(sum(r["volume_ml"] for r in rows if r["scan"] == "follow-up"),
                                                         abs=1e-4)
    for status in change.LABELS.values():  # each call's volume on one scan: the baseline's for gone ones alone
        key = status.replace(" ", "_")
        scan = "baseline" if status in change.BASELINE_ONLY else "follow-up"
        assert report[f"n_{key}"] == sum(r["status"] == status for r in rows)
        assert report[f"{key}_ml"] == pytest.approx(sum(r["volume_ml"] for r in rows if r["status"] == status
                                                        and r["scan"] == scan), abs=1e-4)
        if status in ("stable", "not assessable"):  # the baseline's lesions with no follow-up lesion: given apart
            side = [r for r in rows if r["status"] == status and r["scan"] == "baseline"]
            assert report[f"n_{key}_baseline_side"] == len(side)
            assert report[f"{key}_baseline_side_ml"] == pytest.approx(sum(r["volume_ml"] for r in side), abs=1e-4)
    assert report["followup_volume_ml"] == pytest.approx(sum(report[f"{key}_ml"] for key in (
        "new", "small_new", "enlarging", "stable", "not_assessable")), abs=1e-4)
    changed = [r["change_ml"] for r in rows if r["change_ml"] is not None]
    kept_row = [r for r in rows if r["scan"] == "baseline" and r["status"] == "stable"][0]
    assert sum(changed) - kept_row["baseline_ml"] == pytest.approx(report["volume_change_ml"], abs=1e-4)
    labels = sitk.GetArrayViewFromImage(result.labels)
    code = {name: value for value, name in change.LABELS.items()}
    for row in rows:
        i, j, k = result.labels.TransformPhysicalPointToIndex(tuple(row["centroid_mm"]))
        assert labels[k, j, i] == code[row["status"]], row


def test_the_change_report_states_its_conventions_and_its_figures_follow_them(monkeypatch):
    """CASE_change.json, read on its own, said nothing of how lesions were counted, which way centroid_mm points
    (LPS: read as Slicer's RAS, a lesion lands on the other side) or that a baseline row's slice_range counts the
    baseline's slices while its centroid is in the follow-up's space. It now says so, as CASE_report.json does,
    and its figures agree: here the baseline has 2 mm slices, the follow-up 1 mm (`_every_fate`)."""
    flairs, baseline_mask, followup_mask, probability = _every_fate(monkeypatch)
    report = change.lesion_change(flairs[0], flairs[1], baseline_mask, followup_mask, followup_probabilities=probability,
                                  presence=0.15, check=False).report
    stated = report["conventions"]
    assert "26-connected" in stated["lesions"]
    assert "LPS" in stated["coordinates"] and "x to the patient's left" in stated["coordinates"]
    assert "follow-up scan's space" in stated["coordinates"] and "Slicer shows RAS" in stated["coordinates"]
    assert "the baseline's slices" in stated["slice_index"] and "0 first" in stated["slice_index"]
    assert "ml" in stated["volumes"] and "own scan's grid" in stated["volumes"]
    gone = [r for r in report["lesions"] if r["status"] == "gone"][0]  # z 2-8 mm: baseline slices 1-3 (2 mm)
    assert gone["slice_range"] == [1, 3] and gone["followup_slice"] == 4  # its centre, z 4 mm, on 1 mm slices
    assert gone["centroid_mm"] == pytest.approx([42.5, 42.5, 4.0])  # x: the voxel index i (1 mm, origin 0)
    assert report["baseline_slice_thickness_mm"] == 2.0 and "spacing" in stated["slice_thickness"]


def test_a_probability_map_saved_cropped_on_the_scans_voxels_is_padded_as_a_mask_is(monkeypatch):
    """A follow-up probability map saved cropped to where it is above zero (on the FLAIR's very voxels, stored in
    another voxel order too) was refused ('different voxel grids') where a mask cropped so is padded; now it is
    padded with 0 (no lesion) onto the FLAIR's grid: the very calls and volumes of the whole map. One reaching
    beyond the FLAIR is still refused."""
    flairs, baseline_mask, followup_mask, probability = _every_fate(monkeypatch)
    whole = change.lesion_change(flairs[0], flairs[1], baseline_mask, followup_mask, followup_probabilities=probability,
                                 presence=0.15, check=False)
    box = sitk.LabelShapeStatisticsImageFilter()
    box.Execute(sitk.Cast(probability > 0, sitk.sitkUInt8))
    i, j, k, ni, nj, nk = box.GetBoundingBox(1)
    cropped = sitk.DICOMOrient(probability[i:i + ni, j:j + nj, k:k + nk], "RAS")
    result = change.lesion_change(flairs[0], flairs[1], baseline_mask, followup_mask, followup_probabilities=cropped,
                                  presence=0.15, check=False)
    assert result.report == whole.report
    assert np.array_equal(sitk.GetArrayViewFromImage(result.labels), sitk.GetArrayViewFromImage(whole.labels))
    beyond = sitk.ConstantPad(probability, (0, 0, 0), (0, 0, 1), 0.5)  # a slice above the FLAIR, all 0.5
    with pytest.raises(change.DeepWMLError, match="the follow-up probabilities and the follow-up FLAIR are on different"):
        change.lesion_change(flairs[0], flairs[1], baseline_mask, followup_mask, followup_probabilities=beyond,
                             presence=0.15, check=False)


def test_a_poor_fit_whose_second_start_has_no_overlap_keeps_the_first(monkeypatch):
    (base, _), (follow, _) = change_pair_images()
    base = sitk.Image(base)
    base.SetOrigin([x + 1000.0 for x in base.GetOrigin()])  # another scanner's frame: a metre away
    monkeypatch.setattr(change, "_correlation", lambda fixed, moving, transform: 0.1)  # a poor first fit
    registration = change.align(follow, base)  # the retry from the scanner's frame cannot start: no overlap
    assert registration.correlation == 0.1  # the first fit kept and reported, not "registration failed"


def test_a_baseline_lesion_half_outside_the_follow_ups_view_is_drawn_where_it_can_be_judged_not():
    """A baseline lesion across the follow-up's last slice, with no trace inside its view: not assessable,
    and drawn as such in the label map where the follow-up does cover it (before: a row, nothing drawn)."""
    baseline_mask = _paint((40, 40, 20), (1.0, 1.0, 2.0), [((10, 20), (10, 20), (14, 30))])  # z 14-28 mm
    followup_mask = _paint((40, 40, 10), (1.0, 1.0, 2.0), [])  # ends at z 18 mm (slices 0-9)
    labels, rows = change.classify(followup_mask, baseline_mask, sitk.Euler3DTransform())
    assert [(r["status"], r["scan"]) for r in rows] == [("not assessable", "baseline")]
    drawn = np.argwhere(labels == 4)
    assert drawn.size and set(drawn[:, 0]) == {7, 8, 9}  # the follow-up's slices the lesion reaches


def test_a_given_mask_on_another_grid_names_the_scan_it_belongs_to(tmp_path):
    """'--baseline-mask m.nii.gz' on the wrong grid said 'm.nii.gz and the image it is compared with are on
    different voxel grids': which scan, baseline or follow-up, went unsaid."""
    baseline, followup = sitk.Image([8, 9, 10], sitk.sitkFloat32), sitk.Image([8, 9, 12], sitk.sitkFloat32)
    beyond = sitk.Image([8, 9, 14], sitk.sitkUInt8)  # a lesion voxel beyond both scans (empty slices are cut off)
    beyond[2, 2, 13] = 1
    io.write_image(beyond, tmp_path / "m.nii.gz")
    with pytest.raises(change.DeepWMLError, match="m.nii.gz and the baseline FLAIR are on different voxel grids"):
        change._masks_for(None, baseline, followup, (tmp_path / "m.nii.gz", tmp_path / "m.nii.gz"), {})
    # on the follow-up's grid: the follow-up's mask given as the baseline's (test_bad_inputs, the wrong way round)
    followup_mask = sitk.Image([8, 9, 12], sitk.sitkUInt8)
    followup_mask[2, 2, 11] = 1  # beyond the baseline
    io.write_image(followup_mask, tmp_path / "m.nii.gz")
    with pytest.raises(change.DeepWMLError, match="given as the baseline's mask, lies on the follow-up FLAIR's grid"):
        change._masks_for(None, baseline, followup, (tmp_path / "m.nii.gz", tmp_path / "m.nii.gz"), {})


def test_a_manifest_of_pairs_is_read_as_training_reads_it(pair, tmp_path, monkeypatch, capsys):
    """change read its manifest without what training's reader learned: a manifest made on Windows
    (..\\pairs\\baseline.nii.gz) named no file, and paths typed relative to the current folder failed every
    pair with 'does not exist' and no word of why."""
    (tmp_path / "pairs").mkdir()
    (tmp_path / "lists").mkdir()
    for name, path in pair["files"].items():
        (tmp_path / "pairs" / f"{name}.nii.gz").write_bytes(path.read_bytes())
    columns = ("baseline", "followup", "baseline_mask", "followup_mask")
    windows = tmp_path / "lists" / "windows.csv"
    windows.write_text("case," + ",".join(columns) + "\np1," + ",".join(f"..\\pairs\\{c}.nii.gz" for c in columns) + "\n")
    assert main(["change", "--manifest", str(windows), "-o", str(tmp_path / "out")]) == 0
    rows = list(csv.DictReader(open(tmp_path / "out" / "change_summary.csv", encoding="utf-8-sig")))
    assert [(r["case"], r["status"]) for r in rows] == [("p1", "ok")]
    typed_here = tmp_path / "lists" / "here.csv"
    typed_here.write_text("case," + ",".join(columns) + "\np1," + ",".join(f"pairs/{c}.nii.gz" for c in columns) + "\n")
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["change", "--manifest", str(typed_here), "-o", str(tmp_path / "here")]) == 1
    err = capsys.readouterr().err
    assert "not from the current folder, where 4 of them exist (e.g. pairs/baseline.nii.gz)" in err
    assert "Traceback" not in err and not (tmp_path / "here").exists()


def _small_pair_manifest(monkeypatch, folder, segmented: bool = False):
    """A manifest of one pair (`_every_fate`'s scene, registration left out) written under `folder`; with
    `segmented`, the follow-up without its mask (segmented by the run)."""
    files = _every_fate_files(folder, monkeypatch)[3]
    return _manifest(folder / "pairs.csv", files, followup_mask="" if segmented else None), files


def test_a_pair_done_with_other_settings_or_missing_an_output_is_not_skipped_as_done(tmp_path, monkeypatch, capsys):
    """change --manifest skipped a pair whose report was there and named the same scans, whatever the settings
    now: rerun with --tolerance-mm 3 or --min-change-ml 0, or after the baseline mask was corrected, the summary
    said 'skipped - done before' with the old calls; and with its lesion table deleted, too. Now it says what
    differs and to use --overwrite, as deepwml segment does."""
    manifest, files = _small_pair_manifest(monkeypatch, tmp_path)
    out = tmp_path / "out"
    run = ["change", "--manifest", str(manifest), "-o", str(out)]
    assert main(run) == 0
    capsys.readouterr()
    for options, said in ((["--tolerance-mm", "3"], "--tolerance-mm (2 then, 3 now)"),
                          (["--min-change-ml", "0"], f"--min-change-ml ({change.DEFAULT_MIN_CHANGE_ML:g} then, 0 now)")):
        assert main(run + options) == 1
        err = capsys.readouterr().err
        assert f"holds pair 'p1' made with other settings: {said}; use --overwrite" in err, err
        rows = list(csv.DictReader(open(out / "change_summary.csv", encoding="utf-8-sig")))
        assert [(r["case"], r["status"]) for r in rows] == [("p1", "error")]
    assert main(run) == 0 and "p1: skipped - done before (use --overwrite to redo)" in capsys.readouterr().err
    corrected = sitk.GetArrayFromImage(sitk.ReadImage(str(files["baseline_mask"])))
    corrected[:, :2, :2] = 1  # edited in place, under the same name
    edited = sitk.GetImageFromArray(corrected)
    edited.CopyInformation(sitk.ReadImage(str(files["baseline_mask"])))
    sitk.WriteImage(edited, str(files["baseline_mask"]))
    assert main(run) == 1
    assert f"baseline_mask ({files['baseline_mask']} has changed since)" in capsys.readouterr().err
    assert main(run + ["--overwrite"]) == 0
    (out / "p1_change.csv").unlink()
    capsys.readouterr()
    assert main(run) == 1
    assert "p1_change.json is here but not its p1_change.csv (deleted?); rerun with --overwrite" in capsys.readouterr().err
    assert main(run + ["--overwrite"]) == 0 and (out / "p1_change.csv").is_file()


def test_a_pair_whose_scan_was_replaced_under_its_name_is_not_skipped_as_done(tmp_path, monkeypatch, capsys):
    """change --manifest knew a pair done before by its scans' paths alone: a follow-up replaced under the same name
    (a corrected export) was skipped as done, its summary row giving the calls made on the old scan. Now each scan
    is known by its content, as segment knows a case's (a DICOM series by its UIDs); a report without it, of an
    older version, is compared by the paths, and the summary says the scans' content could not be."""
    manifest, files = _small_pair_manifest(monkeypatch, tmp_path)
    flair = tmp_path / "flair_dicom"  # the baseline as a DICOM folder
    write_dicom_series(flair, sitk.Cast(sitk.ReadImage(str(files["baseline"])), sitk.sitkInt16), uid="1.2.3.7")
    manifest.write_text(manifest.read_text(encoding="utf-8").replace(str(files["baseline"]), str(flair)),
                        encoding="utf-8")
    out = tmp_path / "out"
    run = ["change", "--manifest", str(manifest), "-o", str(out)]
    assert main(run) == 0
    capsys.readouterr()
    assert main(run) == 0 and "p1: skipped - done before (use --overwrite to redo)" in capsys.readouterr().err

    def summary_rows():
        return [(r["case"], r["status"]) for r in csv.DictReader(open(out / "change_summary.csv", encoding="utf-8-sig"))]

    corrected = sitk.ReadImage(str(files["followup"]))
    sitk.WriteImage(corrected * 1.01, str(files["followup"]))  # re-exported under the same name
    assert main(run) == 1
    err = capsys.readouterr().err
    assert (f"holds pair 'p1' made from other scans: the follow-up ({files['followup']}) has changed since; use "
            "--overwrite to redo it with these scans") in err, err
    assert summary_rows() == [("p1", "error")]
    assert main(run + ["--overwrite"]) == 0
    assert main(run) == 0 and summary_rows() == [("p1", "skipped")]
    capsys.readouterr()
    for path in flair.iterdir():  # the baseline exported again: the same pixels, new files (new SOP Instance UIDs)
        path.unlink()
    write_dicom_series(flair, sitk.Cast(sitk.ReadImage(str(files["baseline"])), sitk.sitkInt16), uid="1.2.3.7")
    assert main(run) == 1
    assert f"made from other scans: the baseline ({flair}) has changed since" in capsys.readouterr().err
    assert main(run + ["--overwrite"]) == 0
    report = json.loads((out / "p1_change.json").read_text(encoding="utf-8"))
    for key in ("baseline_fingerprint", "followup_fingerprint"):  # as an older version wrote it
        del report[key]
    (out / "p1_change.json").write_text(json.dumps(report), encoding="utf-8")
    capsys.readouterr()
    assert main(run) == 0
    assert ("p1: skipped - done before (use --overwrite to redo); made by an older DeepWML whose report does not "
            "record all its settings (the scans' content), so this run's may differ") in capsys.readouterr().err


def test_a_pair_whose_scans_and_masks_were_moved_is_skipped_as_done(tmp_path, monkeypatch, capsys):
    """change --manifest refused a pair whose scans and masks had been moved (a cohort copied to another disk, the
    manifest's paths changed to match) as "another pair", where `deepwml segment` keeps a moved scan's results. Now
    the same content at new paths is the pair done, skipped as segment skips it; other content there is not."""
    manifest, files = _small_pair_manifest(monkeypatch, tmp_path)
    out = tmp_path / "out"
    run = ["change", "--manifest", str(manifest), "-o", str(out)]
    assert main(run) == 0
    capsys.readouterr()
    elsewhere = tmp_path / "moved"
    elsewhere.mkdir()
    text = manifest.read_text(encoding="utf-8")
    for path in files.values():
        shutil.move(path, elsewhere / path.name)
        text = text.replace(str(path), str(elsewhere / path.name))
    manifest.write_text(text, encoding="utf-8")
    assert main(run) == 0
    assert "p1: skipped - done before (use --overwrite to redo)\n" in capsys.readouterr().err
    rows = list(csv.DictReader(open(out / "change_summary.csv", encoding="utf-8-sig")))
    assert [(r["case"], r["status"], r["n_new"]) for r in rows] == [("p1", "skipped", "1")]
    mask = sitk.ReadImage(str(elsewhere / "followup_mask.nii.gz"))
    sitk.WriteImage(mask * 0, str(elsewhere / "followup_mask.nii.gz"))  # another mask at the moved one's path
    assert main(run) == 1
    assert (f"made with other settings: followup_mask ({files['followup_mask']} then, "
            f"{elsewhere / 'followup_mask.nii.gz'} now)") in capsys.readouterr().err
    sitk.WriteImage(mask, str(elsewhere / "followup_mask.nii.gz"))
    followup = sitk.ReadImage(str(elsewhere / "followup.nii.gz"))
    sitk.WriteImage(followup * 1.01, str(elsewhere / "followup.nii.gz"))  # another scan at the moved one's path
    assert main(run) == 1
    assert f"p1_change.json holds another pair ({files['baseline']} -> {files['followup']})" in capsys.readouterr().err


def test_a_pair_segmented_with_another_threshold_is_not_skipped_as_done(tmp_path, monkeypatch, tiny_model, capsys):
    """A follow-up segmented here: the same pair rerun with another --threshold (or model) was skipped as done."""
    manifest, _ = _small_pair_manifest(monkeypatch, tmp_path, segmented=True)
    run = ["change", "--manifest", str(manifest), "-o", str(tmp_path / "out"), "--model", str(tiny_model),
           "--device", "cpu", "--no-brain-mask"]
    assert main(run) == 0
    capsys.readouterr()
    assert main(run) == 0 and "p1: skipped - done before (use --overwrite to redo)" in capsys.readouterr().err
    source = json.loads((tmp_path / "out" / "p1_change.json").read_text())["masks"]["follow-up"]
    assert source["settings"]["brain_mask"] == "not applied to the marks"  # made all the same, for the checks
    assert main(run[:-1]) == 1  # the brain mask gating the marks now
    assert "--no-brain-mask (not applied to the marks then, gates the marks now)" in capsys.readouterr().err
    assert main(run + ["--threshold", "0.3"]) == 1
    assert "made with other settings: --threshold (0.5 then, 0.3 now)" in capsys.readouterr().err
    assert main(run + ["--grid-phases", "4"]) == 1
    assert "made with other settings: --grid-phases (1 then, 4 now)" in capsys.readouterr().err
    assert main(run + ["--grid-phases", "4", "--overwrite"]) == 0
    assert json.loads((tmp_path / "out" / "p1_change.json").read_text())["masks"]["follow-up"]["settings"][
        "grid_phases"] == 4


def _single_pair(files, out, *more):
    return ["change", str(files["baseline"]), str(files["followup"]), "-o", str(out), "--baseline-mask",
            str(files["baseline_mask"]), "--followup-mask", str(files["followup_mask"]), *more]


def test_one_pair_rerun_is_skipped_when_done_and_gets_only_the_outputs_it_lacks(tmp_path, monkeypatch, capsys):
    """`deepwml change BASELINE FOLLOWUP -o OUT` for one pair, run again with --qc, refused ('outputs exist ...; use
    --overwrite'), where `change --manifest` adds the picture from the saved label map and `deepwml segment` a case's.
    Now as they do: the same settings and every output there: skipped (exit 0, the files untouched); an output asked
    for and missing: made from the saved label map, nothing compared again; an edited label map or other settings:
    refused, naming it and --overwrite; --overwrite compares the scans again."""
    _, files = _small_pair_manifest(monkeypatch, tmp_path)
    out = tmp_path / "out"
    assert main(_single_pair(files, out)) == 0
    kept = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    compare = change.lesion_change
    with monkeypatch.context() as patched:
        def refused(*args, **kwargs):
            raise AssertionError("the pair was compared again")

        patched.setattr(change, "lesion_change", refused)
        assert main(_single_pair(files, out)) == 0
        assert "followup: skipped - done before (use --overwrite to redo)" in capsys.readouterr().err
        assert main(_single_pair(files, out, "--qc")) == 0
        assert ("followup: added - added followup_change_qc.png from the saved followup_change.nii.gz; the result is "
                "the earlier run's") in capsys.readouterr().err
        for name, data in kept.items():
            if name != "followup_change.json":
                assert (out / name).read_bytes() == data, name
        assert json.loads((out / "followup_change.json").read_text(encoding="utf-8"))["outputs_added"] == [
            "followup_change_qc.png"]
        assert main(_single_pair(files, out, "--qc", "--dicom-seg")) == 0  # nothing to add: said why for the SEG
        err = capsys.readouterr().err
        assert "followup: skipped - done before" in err and "no DICOM SEG: the follow-up is not DICOM" in err
        assert main(_single_pair(files, out, "--tolerance-mm", "3")) == 1
        assert ("holds pair 'followup' made with other settings: --tolerance-mm (2 then, 3 now); use --overwrite"
                in capsys.readouterr().err)
        (out / "followup_change_qc.png").unlink()
        _new_called_stable(out / "followup_change.nii.gz")
        assert main(_single_pair(files, out, "--qc")) == 1
        assert "followup_change.nii.gz was changed since the run that made it" in capsys.readouterr().err
        assert not (out / "followup_change_qc.png").exists()
    calls = []
    monkeypatch.setattr(change, "lesion_change", lambda *args, **kwargs: calls.append(1) or compare(*args, **kwargs))
    assert main(_single_pair(files, out, "--qc", "--overwrite")) == 0 and calls == [1]
    assert (out / "followup_change_qc.png").is_file()
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # the pair's lock gone after


def test_one_pair_rerun_adding_outputs_to_an_older_report_reads_the_series_named(tmp_path, monkeypatch, capsys):
    """A report of a version before it recorded the follow-up's DICOM series (dicom_series): a rerun adding the picture
    read the folder's default series, whatever --followup-series named (two FLAIR-like series: refused as ambiguous;
    a FLAIR beside a T1, read without a word even when another series was compared). Now the series named is read,
    and without one, in a folder of several series, the rerun refuses, saying it cannot tell which."""
    _, files = _small_pair_manifest(monkeypatch, tmp_path)
    flair = sitk.Cast(sitk.ReadImage(str(files["followup"])), sitk.sitkInt16)
    study = tmp_path / "study"
    write_dicom_series(study, flair, uid="1.2.3.2", description="AX T2 FLAIR", prefix="a_", number=2)
    write_dicom_series(study, flair * 0 + 7, uid="1.2.3.3", description="AX T2 FLAIR post", inversion_ms=2500,
                       prefix="b_", number=3)
    masks = ["--baseline-mask", str(files["baseline_mask"]), "--followup-mask", str(files["followup_mask"])]

    def run(out, *more):
        return main(["change", str(files["baseline"]), str(study), "-o", str(out), *masks, *more])

    def older(out):  # the report as a version before dicom_series, the scans' content and labels_sha256 wrote it
        report_path = next(out.glob("*_change.json"))
        report = json.loads(report_path.read_text(encoding="utf-8"))
        for key in ("dicom_series", "baseline_fingerprint", "followup_fingerprint", "labels_sha256"):
            report.pop(key, None)
        report_path.write_text(json.dumps(report), encoding="utf-8")

    out = tmp_path / "out"
    assert run(out, "--followup-series", "ax t2 flair") == 0
    older(out)
    capsys.readouterr()
    assert run(out, "--followup-series", "ax t2 flair", "--qc") == 0
    assert "study: added - added study_change_qc.png" in capsys.readouterr().err
    assert run(tmp_path / "full", "--followup-series", "ax t2 flair", "--qc") == 0
    assert (tmp_path / "full" / "study_change_qc.png").read_bytes() == (out / "study_change_qc.png").read_bytes()
    # a FLAIR beside a T1, the report not saying which was read, no series named: refused, not guessed
    shutil.rmtree(study)
    write_dicom_series(study, flair, uid="1.2.3.2", description="AX T2 FLAIR", prefix="a_", number=2)
    write_dicom_series(study, flair * 0 + 7, uid="1.2.3.4", description="AX T1 SE", prefix="c_", number=4)
    out = tmp_path / "out2"
    assert run(out) == 0
    older(out)
    capsys.readouterr()
    assert run(out, "--qc") == 1
    assert ("does not record which DICOM series of" in capsys.readouterr().err
            and not (out / "study_change_qc.png").exists())
    assert run(out, "--qc", "--followup-series", "flair") == 0 and (out / "study_change_qc.png").is_file()


def test_one_pair_rerun_naming_another_series_than_its_run_is_refused(tmp_path, monkeypatch, capsys):
    """--followup-series naming another series than the one the pair was made from is another setting (as segment's
    --series): refused, naming both, not skipped as done."""
    _, files = _small_pair_manifest(monkeypatch, tmp_path)
    flair = sitk.Cast(sitk.ReadImage(str(files["followup"])), sitk.sitkInt16)
    study = tmp_path / "study"
    write_dicom_series(study, flair, uid="1.2.3.2", description="AX T2 FLAIR", prefix="a_", number=2)
    write_dicom_series(study, flair + 1, uid="1.2.3.3", description="AX T2 FLAIR post", inversion_ms=2500,
                       prefix="b_", number=3)
    run = ["change", str(files["baseline"]), str(study), "-o", str(tmp_path / "out"), "--baseline-mask",
           str(files["baseline_mask"]), "--followup-mask", str(files["followup_mask"])]
    assert main(run + ["--followup-series", "2"]) == 0
    capsys.readouterr()
    assert main(run + ["--followup-series", "2"]) == 0 and "study: skipped - done before" in capsys.readouterr().err
    assert main(run + ["--followup-series", "3"]) == 1
    err = capsys.readouterr().err
    assert "made with other settings: --followup-series (series 2 'AX T2 FLAIR' then, series 3 'AX T2 FLAIR post'" in err
    assert "now); use --overwrite" in err


def test_a_pair_another_process_is_working_on_is_left_to_it(tmp_path, monkeypatch, capsys):
    """Two `deepwml change` processes on one OUTDIR worked on one pair at once (no lock: both compared it, each
    writing over the other's files). Now the pair's lock (as segment's per case): held by another process, the pair
    is skipped, saying so (exit 0), and looked at again at the end of the run: compared then when the lock is free,
    else its row names the lock to delete if no process holds it. A lock file left by a process that died (not
    held) is taken over. One pair given alone is skipped the same way."""
    manifest, files = _small_pair_manifest(monkeypatch, tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    run = ["change", "--manifest", str(manifest), "-o", str(out)]
    lock = out / ".p1_change.deepwml-lock"
    left = "skipped - being written by another DeepWML process now, so left to it (not compared twice)"
    with io.exclusive(lock, "the other run"):
        assert main(run) == 0
        assert f"p1: {left}" in capsys.readouterr().err
        rows = list(csv.DictReader(open(out / "change_summary.csv", encoding="utf-8-sig")))
        assert rows[0]["status"] == "skipped" and f"its lock, {lock}, was still held at the end" in rows[0]["error"]
        assert not list(out.glob("p1_*"))
        assert main(_single_pair(files, out, "--case", "p1")) == 0  # one pair, the same
        assert f"p1: {left}" in capsys.readouterr().err
        assert not list(out.glob("p1_*"))
    # held when the pair is reached, free by the end of the run: compared then
    other = io.exclusive(lock, "the other run")
    other.__enter__()
    write_summary = change._write_summary

    def released(*args):
        other.__exit__(None, None, None)
        write_summary(*args)

    with monkeypatch.context() as patched:
        patched.setattr(change, "_write_summary", released)
        assert main(run) == 0
    rows = list(csv.DictReader(open(out / "change_summary.csv", encoding="utf-8-sig")))
    assert [(r["case"], r["status"]) for r in rows] == [("p1", "ok")] and (out / "p1_change.json").is_file()
    # a lock file left behind by a process killed while it held it (the lock itself went with the process)
    lock.write_text("")
    assert main(run + ["--overwrite"]) == 0
    rows = list(csv.DictReader(open(out / "change_summary.csv", encoding="utf-8-sig")))
    assert [(r["case"], r["status"]) for r in rows] == [("p1", "ok")] and not lock.exists()
    assert change.pair_lock_path(out, "p1") == lock


def test_one_pair_whose_outdir_another_process_made_and_holds_meanwhile_is_left_to_it(tmp_path, monkeypatch, capsys):
    """Two `deepwml change` of one pair started together into an OUTDIR not there yet: the first makes it and takes
    the pair's lock; the second, which found no OUTDIR when it started, failed (exit 1, 'being written by another
    DeepWML process now'), where one started a moment later (OUTDIR there) leaves the pair to the first, skipped,
    exit 0, as README says of a second process on the same OUTDIR. Now both leave it to the first."""
    _, files = _small_pair_manifest(monkeypatch, tmp_path)
    out = tmp_path / "out"
    made = io.make_output_dir
    other = []

    def made_meanwhile(path):  # the other process makes OUTDIR and takes the pair's lock first
        folder = made(path)
        other.append(io.exclusive(change.pair_lock_path(folder, "followup"), "the other run"))
        other[-1].__enter__()
        return folder

    monkeypatch.setattr(io, "make_output_dir", made_meanwhile)
    try:
        assert main(_single_pair(files, out)) == 0
        assert ("followup: skipped - being written by another DeepWML process now, so left to it (not compared twice)"
                in capsys.readouterr().err)
        assert not list(out.glob("followup_*"))
    finally:
        for held in other:
            held.__exit__(None, None, None)


def test_one_pair_killed_part_way_is_an_incomplete_set_and_its_temporary_files_go(tmp_path, monkeypatch, capsys):
    """A pair's run killed outright (kill -9, a power cut) left outputs without their report, and the hidden
    temporary file it was writing. One pair rerun said 'outputs exist (...)', as of a pair done, where a cohort and
    `deepwml segment` say 'an earlier run left an incomplete set of outputs (...; no report)'; and the temporary
    file stayed for good (--overwrite too), where segment removes the one its case left when it next runs it, its
    lock held. Now one pair says what a cohort says, and a run of the pair removes its own temporary files (not
    another's)."""
    manifest, files = _small_pair_manifest(monkeypatch, tmp_path)
    out = tmp_path / "out"
    assert main(_single_pair(files, out, "--case", "p1")) == 0
    (out / "p1_change.json").unlink()  # killed before its report
    left = [out / ".p1_change.nii.gz.x1y2.part.nii.gz", out / ".p1_change_qc.png.a1b2.part.png"]
    others = out / ".p2_change.nii.gz.x1y2.part.nii.gz"  # another pair's, maybe being written now: kept
    for path in left + [others]:
        path.write_bytes(b"partial")
    capsys.readouterr()
    assert main(_single_pair(files, out, "--case", "p1")) == 1
    err = capsys.readouterr().err
    assert "an earlier run left an incomplete set of outputs (p1_baseline_registered.nii.gz" in err, err
    assert "no report); rerun with --overwrite to replace them" in err
    assert not any(path.exists() for path in left) and others.exists()
    for path in left:
        path.write_bytes(b"partial")
    assert main(["change", "--manifest", str(manifest), "-o", str(out)]) == 1  # a cohort: the same
    assert "an earlier run left an incomplete set of outputs" in capsys.readouterr().err
    assert not any(path.exists() for path in left) and others.exists()
    for path in left:
        path.write_bytes(b"partial")
    assert main(_single_pair(files, out, "--case", "p1", "--overwrite")) == 0
    assert not any(path.exists() for path in left) and others.exists()
    for path in left:  # a run killed while adding the picture to a pair done: the next run of the pair removes it
        path.write_bytes(b"partial")
    assert main(_single_pair(files, out, "--case", "p1")) == 0
    assert "p1: skipped - done before" in capsys.readouterr().err
    assert not any(path.exists() for path in left) and others.exists()


def test_a_cohort_reruns_rows_leave_seconds_empty_for_pairs_it_did_not_compare(tmp_path, monkeypatch, capsys):
    """change_summary.csv of a cohort rerun gave a pair skipped as done, or done before with outputs added, the
    seconds its earlier run took, as if this run had compared it (summing the column overstated the rerun); segment's
    summary.csv leaves them empty (segment.summary_seconds). Now so does change's."""
    manifest, _ = _small_pair_manifest(monkeypatch, tmp_path)
    out = tmp_path / "out"
    run = ["change", "--manifest", str(manifest), "-o", str(out)]

    def rows():
        with open(out / "change_summary.csv", newline="", encoding="utf-8-sig") as f:
            return [(r["status"], r["seconds"], r["n_new"]) for r in csv.DictReader(f)]

    assert main(run) == 0
    (status, seconds, new), = rows()
    assert status == "ok" and float(seconds) > 0 and new == "1"
    assert main(run) == 0 and rows() == [("skipped", "", "1")]
    assert main(run + ["--qc"]) == 0 and rows() == [("added", "", "1")]


def test_a_mask_given_that_lies_in_outdir_under_an_output_name_is_never_removed(pair, tmp_path, capsys):
    """A first run segments the follow-up into OUTDIR (p1_followup_wmh.nii.gz); the radiologist corrects that
    mask in place and gives it back as --followup-mask (or in the manifest's followup_mask column) with
    --overwrite. The earlier run's outputs were removed before the new ones were written, the corrected mask
    among them (it is not written again: it is given), so the correction was lost. A file given to the run is
    never taken for an earlier output; one that an output would be written over is refused."""
    files = pair["files"]
    for manifest in (False, True):
        out = tmp_path / f"out{manifest}"
        out.mkdir()
        corrected = out / "p1_followup_wmh.nii.gz"
        shutil.copyfile(files["followup_mask"], corrected)
        content = corrected.read_bytes()
        if manifest:
            _manifest(tmp_path / "pairs.csv", files, followup_mask=corrected)
            command = ["change", "--manifest", str(tmp_path / "pairs.csv"), "-o", str(out)]
        else:
            command = ["change", str(files["baseline"]), str(files["followup"]), "-o", str(out), "--case", "p1",
                       "--baseline-mask", str(files["baseline_mask"]), "--followup-mask", str(corrected)]
        for overwrite in ([], ["--overwrite"]):
            assert main(command + overwrite) == 0, capsys.readouterr().err
            assert corrected.read_bytes() == content
        report = json.loads((out / "p1_change.json").read_text(encoding="utf-8"))
        assert "p1_followup_wmh.nii.gz" not in report["outputs"]
    # a scan given where an output goes: refused, the scan kept
    registered = tmp_path / "outTrue" / "p1_baseline_registered.nii.gz"
    shutil.copyfile(files["baseline"], registered)
    assert main(["change", str(registered), str(files["followup"]), "-o", str(tmp_path / "outTrue"), "--case", "p1",
                 "--baseline-mask", str(files["baseline_mask"]), "--followup-mask", str(files["followup_mask"]),
                 "--overwrite"]) == 1
    assert "p1_baseline_registered.nii.gz in " in capsys.readouterr().err and registered.read_bytes()
    assert io.grid_difference(sitk.ReadImage(str(registered)), sitk.ReadImage(str(files["baseline"]))) is None


@pytest.mark.parametrize("stored", ["3D", "X, Y, Z, 1"])
def test_nifti_outputs_carry_their_scans_own_qform_and_sform_as_segments_do(tmp_path, monkeypatch, tiny_model,
                                                                             capsys, stored):
    """A follow-up whose qform (code 2) and sform (code 4, a template's) disagree by 10 degrees, as after an
    alignment: 3D Slicer reads one grid, FSL and nibabel another. Its change label map, the registered baseline and
    its mask carry its own qform, sform, codes, voxel sizes and length unit, and the baseline's mask the baseline's
    (codes 1 and 2, 10 degrees apart the other way), as `deepwml segment`'s outputs do, so that each reader places
    them where it places the scan. A scan stored 4D with one time point gets its outputs stored so too, as
    segment's are. Before, they were written as SimpleITK writes them (both forms its own grid, codes 1)."""
    import nibabel as nib

    from conftest import oracle_network

    oracle_network(monkeypatch)
    flairs, _, _, _ = _every_fate(monkeypatch)
    files = {}
    for name, flair, codes, degrees in (("baseline", flairs[0], (1, 2), -10), ("followup", flairs[1], (2, 4), 10)):
        data = np.transpose(sitk.GetArrayFromImage(flair))  # (i, j, k) as nibabel holds it
        sform = np.diag([*flair.GetSpacing(), 1.0])
        sform[:3, 3] = (-20.0, 15.0, -30.0)
        turn = np.eye(4)
        turn[:3, :3] = rotation(0.0, 0.0, math.radians(degrees))
        turn[:3, 3] = (10.0, 0.0, 0.0)
        nifti = nib.Nifti1Image(data[..., None] if stored == "X, Y, Z, 1" else data, None)
        nifti.set_qform(turn @ sform, code=codes[0])
        nifti.set_sform(sform, code=codes[1])
        files[name] = tmp_path / f"{name}.nii.gz"
        nib.save(nifti, str(files[name]))
    out = tmp_path / "out"
    assert main(["change", str(files["baseline"]), str(files["followup"]), "-o", str(out), "--model",
                 str(tiny_model), "--device", "cpu"]) == 0
    capsys.readouterr()
    for name, scan in (("followup_change.nii.gz", "followup"), ("followup_baseline_registered.nii.gz", "followup"),
                       ("followup_followup_wmh.nii.gz", "followup"), ("followup_baseline_wmh.nii.gz", "baseline")):
        written, given = nib.load(str(out / name)), nib.load(str(files[scan]))
        for form in ("get_qform", "get_sform"):
            (got, got_code), (want, want_code) = (getattr(img, form)(coded=True) for img in (written, given))
            assert got_code == want_code, (name, form)
            np.testing.assert_allclose(got, want, atol=1e-6, err_msg=f"{name} {form}")
        assert written.header.get_xyzt_units()[0] == given.header.get_xyzt_units()[0], name
        assert written.shape == given.shape, name
        image = sitk.ReadImage(str(out / name))  # (a label map may be all 0, which read_image refuses)
        image = image[:, :, :, 0] if image.GetDimension() == 4 else image
        assert io.grid_difference(image, io.read_image(files[scan])) is None, name


def _noise_flair() -> sitk.Image:
    """A 40 x 40 x 20 scan of noise at 1 mm, for lesion_change's checks made before anything is registered."""
    noise = np.random.default_rng(0).normal(100, 10, (20, 40, 40)).astype(np.float32)
    return _grid((40, 40, 20), (1.0, 1.0, 1.0), noise)


@pytest.mark.parametrize("given,words", [
    ("probabilities", "not a label mask: it holds values that are not whole numbers"),
    ("nan", r"not numbers \(NaN or Inf\)"), ("negative", "negative values"), ("array", "is a ndarray, not an image"),
    ("path", "is a str, not an image")])
def test_lesion_change_refuses_a_mask_it_would_misread(given, words, monkeypatch):
    """lesion_change counted every voxel above 0 as lesion: a probability map given as the baseline mask was a
    baseline load of the whole head, and a NaN or negative lesion counted in the volume but not as lesion (all of
    it called new); an array or a file name failed inside ITK. Each is refused, naming the mask, before registering."""
    monkeypatch.setattr(change, "align", lambda *a, **k: pytest.fail("registered a mask it should refuse"))
    lesion = np.zeros((20, 40, 40), np.float32)
    lesion[8:12, 15:25, 15:25] = 1
    flair = _noise_flair()
    mask = _grid((40, 40, 20), (1.0, 1.0, 1.0), lesion.astype(np.uint8))
    grid = (40, 40, 20), (1.0, 1.0, 1.0)
    bad = {"probabilities": lambda: _grid(*grid, np.where(lesion > 0, 0.9, 0.02).astype(np.float32)),
           "nan": lambda: _grid(*grid, np.where(lesion > 0, np.nan, 0).astype(np.float32)),
           "negative": lambda: _grid(*grid, -lesion.astype(np.int16)),
           "array": lambda: lesion, "path": lambda: "baseline_mask.nii.gz"}[given]()
    with pytest.raises(DeepWMLError, match=words) as refused:
        change.lesion_change(flair, flair, bad, mask, check=False)
    assert str(refused.value).startswith("the baseline mask")


def test_lesion_change_reads_a_0_255_or_float_mask_as_lesion_and_background(monkeypatch):
    """A mask saved 0/255, or 0/1 as float, is the same lesion load as 0/1 (not 255 times it)."""
    lesion = np.zeros((20, 40, 40), np.uint8)
    lesion[8:12, 15:25, 15:25] = 1  # 0.4 ml
    flair = _noise_flair()
    monkeypatch.setattr(change, "align", lambda followup, baseline: change.Registration(
        sitk.Euler3DTransform(), 1.0, -1.0, 0, 0.0))
    for baseline_mask in (lesion * 255, lesion.astype(np.float64)):
        report = change.lesion_change(flair, flair, _grid((40, 40, 20), (1.0, 1.0, 1.0), baseline_mask),
                                      _grid((40, 40, 20), (1.0, 1.0, 1.0), lesion), check=False).report
        assert report["baseline_volume_ml"] == report["followup_volume_ml"] == 0.4
        assert report["n_stable"] == 1 and report["n_new"] == 0


@pytest.mark.parametrize("given,words", [("percent", "holds values from 2 to 100: it is not a probability map"),
                                         ("array", "is a ndarray, not an image")])
def test_lesion_change_refuses_a_probability_map_it_would_misread(given, words, monkeypatch):
    """A map of 0-100 (or 0-255) reached `presence` wherever it was not 0, so that no lesion beside a faint mark was
    ever new; an array failed inside ITK. Each is refused, naming the map, before registering."""
    monkeypatch.setattr(change, "align", lambda *a, **k: pytest.fail("registered with a map it should refuse"))
    lesion = np.zeros((20, 40, 40), np.uint8)
    lesion[8:12, 15:25, 15:25] = 1
    flair = _noise_flair()
    mask = _grid((40, 40, 20), (1.0, 1.0, 1.0), lesion)
    percent = np.where(lesion > 0, 100, 2).astype(np.float32)
    bad = _grid((40, 40, 20), (1.0, 1.0, 1.0), percent) if given == "percent" else percent / 100
    with pytest.raises(DeepWMLError, match=words) as refused:
        change.lesion_change(flair, flair, mask, mask, followup_probabilities=bad, presence=0.15, check=False)
    assert str(refused.value).startswith("the follow-up probabilities")


IDENTITY = sitk.Transform(3, sitk.sitkIdentity)


def _calls(rows):
    return [(r["status"], r["scan"], r["volume_ml"], r["baseline_ml"], r["change_ml"]) for r in rows]


def test_a_lesion_exactly_the_tolerance_away_was_there_before_and_one_beyond_it_is_new():
    """README: new is "nothing of the baseline's within 2 mm of it". On 1 x 1 x 2 mm grids (x, y, z), a 5 x 5 voxel
    baseline lesion on slice 2 (z 4 mm: 25 voxels x 2 mm3 = 0.05 ml) and the same square on the follow-up's slice 3
    (z 6 mm, 0.05 ml) lie exactly 2 mm apart (one slice of 2 mm, not 1 mm: the spacing along z is 2). So at the
    default 2 mm the follow-up lesion matches it: stable, baseline 0.05 ml, change 0, slices [3, 3], and the baseline
    lesion has no row of its own. At 1.9 mm the two are strangers: new (0.05 ml, from 0) and gone (-0.05 ml)."""
    baseline = _paint((20, 20, 10), (1.0, 1.0, 2.0), [((5, 10), (5, 10), (4, 5))])
    followup = _paint((20, 20, 10), (1.0, 1.0, 2.0), [((5, 10), (5, 10), (6, 7))])
    labels, rows = change.classify(followup, baseline, IDENTITY)
    assert _calls(rows) == [("stable", "follow-up", 0.05, 0.05, 0.0)]
    assert rows[0]["slice_range"] == [3, 3]
    labels, rows = change.classify(followup, baseline, IDENTITY, tolerance_mm=1.9)
    assert _calls(rows) == [("new", "follow-up", 0.05, 0.0, 0.05), ("gone", "baseline", 0.05, 0.05, -0.05)]


def test_a_probability_that_just_reaches_presence_at_the_tolerance_keeps_a_lesion_from_new_or_gone():
    """README: a lesion is not new (gone) when the other scan's probability "reaches" `--presence` within 2 mm of
    it. Same grids as above (1 x 1 x 2 mm): a 0.05 ml lesion on slice 2 of one scan, nothing in the other but a
    probability of exactly 0.25 (a binary fraction: no rounding) over the same square on slice 3, 2 mm away.
    With --presence 0.25 it reaches it: the follow-up lesion is stable with no baseline volume of its own; the baseline
    lesion keeps its own row, stable from the baseline's side (0.05 ml, change blank). With 0.3 it does not: new, and
    gone (-0.05 ml)."""
    lesion = _paint((20, 20, 10), (1.0, 1.0, 2.0), [((5, 10), (5, 10), (4, 5))])
    faint = sitk.Cast(_paint((20, 20, 10), (1.0, 1.0, 2.0), [((5, 10), (5, 10), (6, 7))]), sitk.sitkFloat32) * 0.25
    lesion_above = _paint((20, 20, 10), (1.0, 1.0, 2.0), [((5, 10), (5, 10), (6, 7))])
    faint_below = sitk.Cast(lesion, sitk.sitkFloat32) * 0.25
    empty = _paint((20, 20, 10), (1.0, 1.0, 2.0), [])
    for presence, baseline_call, followup_call in ((0.25, ("stable", "baseline", 0.05, 0.05, None),
                                                    ("stable", "follow-up", 0.05, None, None)),
                                                   (0.3, ("gone", "baseline", 0.05, 0.05, -0.05),
                                                    ("new", "follow-up", 0.05, 0.0, 0.05))):
        rows = change.classify(empty, lesion, IDENTITY, followup_probabilities=faint, presence=presence)[1]
        assert _calls(rows) == [baseline_call], presence
        rows = change.classify(lesion_above, empty, IDENTITY, baseline_probabilities=faint_below, presence=presence)[1]
        assert _calls(rows) == [followup_call], presence


def test_a_new_or_gone_lesion_of_exactly_min_change_ml_is_counted_and_one_voxel_less_is_small():
    """README: "small new, small gone: a new or gone lesion under 0.02 ml". On a 1 mm grid (1 voxel = 0.001 ml), two
    follow-up lesions on slice 2 (20 voxels = 0.02 ml: new; 19 = 0.019 ml: small new) and two baseline lesions on
    slice 7, 5 mm away (20: gone; 19: small gone), each drawn with its own code on all its voxels; a small one keeps
    its change (listed, not counted)."""
    followup = _paint((30, 30, 10), (1.0, 1.0, 1.0), [((2, 7), (2, 6), (2, 3)), ((2, 21), (12, 13), (2, 3))])
    baseline = _paint((30, 30, 10), (1.0, 1.0, 1.0), [((2, 7), (20, 24), (7, 8)), ((2, 21), (27, 28), (7, 8))])
    labels, rows = change.classify(followup, baseline, IDENTITY)
    assert _calls(rows) == [("new", "follow-up", 0.02, 0.0, 0.02), ("small new", "follow-up", 0.019, 0.0, 0.019),
                            ("gone", "baseline", 0.02, 0.02, -0.02), ("small gone", "baseline", 0.019, 0.019, -0.019)]
    assert {v: int(np.count_nonzero(labels == v)) for v in (2, 5, 6, 7)} == {2: 20, 5: 20, 6: 19, 7: 19}


def test_a_lesion_that_just_doubled_by_just_enlarge_min_ml_is_enlarging_and_the_summary_adds_its_growth():
    """README: enlarging is "at least doubled: grown by its whole baseline volume and by 0.05 ml at least". On a 1 mm
    grid a 10 x 5 voxel baseline lesion (0.05 ml) grows to 10 x 10 (0.1 ml): doubled and grown by 0.05 ml, both
    exactly: enlarging, change +0.05 ml; the summary: load 0.05 -> 0.1 ml, +0.05 ml, +100 %, growth 0.05 ml. Asking
    for 0.051 ml, or a growth of 1.01 times the baseline volume, it is stable."""
    baseline = _paint((20, 20, 10), (1.0, 1.0, 1.0), [((5, 15), (5, 10), (5, 6))])
    followup = _paint((20, 20, 10), (1.0, 1.0, 1.0), [((5, 15), (5, 15), (5, 6))])
    rows = change.classify(followup, baseline, IDENTITY)[1]
    assert _calls(rows) == [("enlarging", "follow-up", 0.1, 0.05, 0.05)]
    summary = change._summary(rows, 0.05, 0.1)
    assert (summary["volume_change_ml"], summary["volume_change_percent"], summary["n_enlarging"],
            summary["enlarging_ml"], summary["enlarging_growth_ml"]) == (0.05, 100.0, 1, 0.1, 0.05)
    for setting in ({"enlarge_min_ml": 0.051}, {"enlarge_fraction": 1.01}):
        assert [r["status"] for r in change.classify(followup, baseline, IDENTITY, **setting)[1]] == ["stable"], setting


def test_a_lesion_with_one_voxel_beyond_the_other_scans_view_is_not_assessable():
    """One voxel is enough: a 1 mm follow-up of 10 slices and a baseline of 5 (z 0-4 mm); a follow-up lesion of a
    5 x 5 square on slice 4 and one voxel on slice 5 (z 5 mm, past the baseline's last slice and its half voxel)
    is not assessable, not new. The other way round, that lesion in a baseline of 10 slices against a follow-up of
    5, nothing of it in the follow-up: not assessable from the baseline's side, not gone."""
    boxes = [((5, 10), (5, 10), (4, 5)), ((5, 6), (5, 6), (5, 6))]
    long, short = _paint((20, 20, 10), (1.0, 1.0, 1.0), boxes), _paint((20, 20, 5), (1.0, 1.0, 1.0), [])
    rows = change.classify(long, short, IDENTITY)[1]
    assert [(r["status"], r["scan"], r["volume_ml"]) for r in rows] == [("not assessable", "follow-up", 0.026)]
    rows = change.classify(short, long, IDENTITY)[1]
    assert [(r["status"], r["scan"], r["volume_ml"]) for r in rows] == [("not assessable", "baseline", 0.026)]


def test_a_baseline_lesion_partly_marked_on_the_follow_ups_grid_counts_and_is_drawn_where_it_reaches_half():
    """A baseline on 4 mm slices, a follow-up on 1 mm (both from z 0). A 5 x 5 baseline lesion on slice 2 (z 8 mm,
    0.1 ml) carried onto the follow-up's slices by linear interpolation is 1 at z 8, 0.75 at 7 and 9, 0.5 at 6 and 10,
    0.25 at 5 and 11, 0 at 4 and 12. Gone (nothing in the follow-up), it is drawn where it reaches half: slices 6-10,
    5 x 25 = 125 voxels. Marked "even in part" (README), it reaches z 11, so a follow-up lesion on slice 14 is 3 mm
    from it: within a 3 mm tolerance, stable (its baseline volume the 0.1 ml, change -0.075 ml), not new."""
    baseline = _paint((20, 20, 5), (1.0, 1.0, 4.0), [((5, 10), (5, 10), (8, 9))])
    empty = _paint((20, 20, 18), (1.0, 1.0, 1.0), [])
    labels, rows = change.classify(empty, baseline, IDENTITY)
    assert _calls(rows) == [("gone", "baseline", 0.1, 0.1, -0.1)]
    assert sorted(set(np.argwhere(labels == 5)[:, 0])) == [6, 7, 8, 9, 10] and np.count_nonzero(labels == 5) == 125
    followup = _paint((20, 20, 18), (1.0, 1.0, 1.0), [((5, 10), (5, 10), (14, 15))])
    rows = change.classify(followup, baseline, IDENTITY, tolerance_mm=3.0)[1]
    assert _calls(rows) == [("stable", "follow-up", 0.025, 0.1, -0.075)]


def test_the_follow_up_slice_of_a_row_is_the_nearest_and_its_thickness_the_axial_spacing(monkeypatch):
    """A gone baseline lesion on slices 2-3 of a 2 mm baseline (z 4 and 6 mm: centre z 5 mm) seen in a follow-up of
    3 mm slices (z 0, 3, 6, ...): the nearest follow-up slice is 2 (z 6 mm, 1 mm off; slice 1 is 2 mm off), and the
    report gives the follow-up's slice thickness as 3 mm, its axial spacing (1 mm in x and y)."""
    baseline_mask = _paint((20, 20, 10), (1.0, 1.0, 2.0), [((5, 10), (5, 10), (4, 7))])
    followup_mask = _paint((20, 20, 8), (1.0, 1.0, 3.0), [])
    flairs = _unmoved_flairs(monkeypatch, baseline_mask, followup_mask)
    report = change.lesion_change(flairs[0], flairs[1], baseline_mask, followup_mask, check=False).report
    assert [(r["status"], r["slice_range"], r["followup_slice"]) for r in report["lesions"]] == [("gone", [2, 3], 2)]
    assert (report["followup_slice_thickness_mm"], report["baseline_slice_thickness_mm"]) == (3.0, 2.0)


def test_a_growth_of_exactly_enlarge_min_ml_in_whole_voxels_is_enlarging():
    """README: enlarging is grown "by 0.05 ml at least" and by `--enlarge-fraction` of its baseline volume. On a 1 mm
    grid (1 voxel = 0.001 ml) an 8 x 5 voxel lesion (0.04 ml) grown to 9 x 10 (0.09 ml): more than doubled and grown by
    50 voxels, 0.05 ml exactly: enlarging, change +0.05 ml. In floating point 0.09 - 0.04 is 0.049999999999999996, and
    it was called stable while its row showed change_ml 0.05. Likewise 100 voxels grown to 150 with --enlarge-fraction
    0.5 (1.5 x 0.1 is 0.15000000000000002 in floating point, over 0.15)."""
    for before, after, setting, grown in (
            (((5, 13), (5, 10), (5, 6)), ((5, 14), (5, 15), (5, 6)), {}, (0.09, 0.04, 0.05)),
            (((5, 15), (5, 15), (5, 6)), ((5, 20), (5, 15), (5, 6)), {"enlarge_fraction": 0.5, "enlarge_min_ml": 0.0},
             (0.15, 0.1, 0.05))):
        baseline = _paint((20, 20, 10), (1.0, 1.0, 1.0), [before])
        followup = _paint((20, 20, 10), (1.0, 1.0, 1.0), [after])
        rows = change.classify(followup, baseline, IDENTITY, **setting)[1]
        assert _calls(rows) == [("enlarging", "follow-up", *grown)], setting


def _hand_report(baseline_ml, followup_ml, percent, **more):
    """A change report written by hand (its figures not computed by change.py) for the printing functions."""
    report = {"baseline_volume_ml": baseline_ml, "followup_volume_ml": followup_ml,
              "volume_change_ml": round(followup_ml - baseline_ml, 4), "volume_change_percent": percent,
              "n_new": 2, "new_ml": 0.12, "n_enlarging": 1, "enlarging_ml": 0.2, "enlarging_growth_ml": 0.07,
              "n_stable": 3, "n_gone": 1, "gone_ml": 0.04, "n_small_new": 0, "n_small_gone": 0, "min_change_ml": 0.02,
              "n_not_assessable": 0, "not_assessable_ml": 0.0,
              "registration": {"rotation_deg": [1.0, -2.0, 0.5], "translation_mm": [3.0, 0.0, -1.5], "correlation": 0.91,
                               "mutual_information": -0.8, "inverse_consistency": {"median_mm": 0.05, "p95_mm": 0.12},
                               "reliable": True}}
    report.update(more)
    return report


def test_the_printed_summary_and_the_picture_title_give_each_figure_with_its_sign_by_hand():
    """A load of 0.50 ml grown to 0.75 ml is +0.25 ml, +50.0 %; shrunk from 0.75 to 0.50 ml, -0.25 ml, -33.3 %. Each
    count beside its own volume: 2 new (0.12 ml), 1 enlarging (grown +0.07 ml), 3 stable, 1 gone (0.04 ml)."""
    lines = change.format_summary("p", _hand_report(0.5, 0.75, 50.0)).splitlines()
    assert lines == [
        "p: baseline 0.50 ml, follow-up 0.75 ml (+0.25 ml, +50.0 %)",
        "  new: 2 lesions, 0.12 ml; enlarging: 1 lesion, +0.07 ml; stable: 3 lesions; gone: 1 lesion, 0.04 ml",
        "  registration: rotation 1.0, -2.0, 0.5 deg, translation 3.0, 0.0, -1.5 mm, correlation 0.91, both ways agree "
        "within 0.12 mm"]
    assert change.format_summary("p", _hand_report(0.75, 0.5, -33.33)).splitlines()[0] == \
        "p: baseline 0.75 ml, follow-up 0.50 ml (-0.25 ml, -33.3 %)"
    assert change.picture_title("p", _hand_report(0.5, 0.75, 50.0)) == "p: 2 new, 1 enlarging, 1 gone, +0.25 ml"


def test_the_lesion_table_csv_has_its_columns_in_order_and_a_slice_range_first_last():
    row = {"id": 1, "status": "new", "scan": "follow-up", "volume_ml": 0.05, "baseline_ml": 0.0, "change_ml": 0.05,
           "centroid_mm": [1.5, -2.0, 3.25], "slice_range": [4, 6], "followup_slice": 5}
    lines = change.lesions_csv([row]).splitlines()
    assert lines == ["id,status,scan,volume_ml,baseline_ml,change_ml,centroid_mm,slice_range,followup_slice",
                     "1,new,follow-up,0.05,0.0,0.05,1.5 -2.0 3.25,4-6,5"]


def test_a_registration_exactly_at_each_limit_passes_and_just_past_it_fails():
    """README: the report warns "below a correlation of 0.80, above a mutual information of -0.65 or beyond 2 mm" run
    both ways: each limit itself passes."""
    at = {"correlation": 0.80, "mutual_information": -0.65, "inverse_consistency": {"median_mm": 1.0, "p95_mm": 2.0}}
    assert change.failed_checks(at) == []
    for key, value, words in (("correlation", 0.79, "correlation 0.79, under 0.80"),
                              ("mutual_information", -0.64, "mutual information -0.64, above -0.65"),
                              ("inverse_consistency", {"median_mm": 1.0, "p95_mm": 2.01},
                               "run both ways 2.01 mm apart, over 2 mm")):
        assert change.failed_checks({**at, key: value}) == [words]


def test_two_visits_of_the_same_day_are_not_said_to_be_the_wrong_way_round():
    from types import SimpleNamespace

    day = SimpleNamespace(study_date="20250301")
    later = SimpleNamespace(study_date="20250302")
    assert change.visits_reversed(day, SimpleNamespace(study_date="20250301")) is None
    assert change.visits_reversed(day, later) is None
    assert change.visits_reversed(later, day).startswith(
        "the baseline was scanned after the follow-up (Study Date 2025-03-02, follow-up 2025-03-01)")


def test_a_tolerance_of_0_mm_is_a_tolerance_and_a_negative_one_is_refused():
    """--tolerance-mm 0: a lesion in the very voxels of the baseline's is there before (0 mm away): stable."""
    lesion = _paint((20, 20, 10), (1.0, 1.0, 1.0), [((5, 10), (5, 10), (4, 5))])
    assert _calls(change.classify(lesion, lesion, IDENTITY, tolerance_mm=0.0)[1]) == [
        ("stable", "follow-up", 0.025, 0.025, 0.0)]
    with pytest.raises(DeepWMLError, match="cannot be negative"):
        change.classify(lesion, lesion, IDENTITY, tolerance_mm=-0.1)


def test_a_moved_head_matches_each_lesion_to_its_own_and_places_a_gone_one_in_the_follow_ups_space():
    """The transform maps a follow-up point to the baseline point of the same anatomy: here x + 10 mm (1 mm voxels).
    Baseline lesion A (x 25-29 mm, 25 voxels) lies at follow-up x 15-19, where the follow-up has its lesion: stable,
    0.025 ml then and now. Baseline lesion B (x 3-8 mm, 30 voxels, centre x 5.5) left nothing: gone, its centre in
    the follow-up's space at x 5.5 - 10 = -4.5 mm (the follow-up's grid starts at x -20 mm, so both scans see it)."""
    base = np.zeros((10, 20, 40), np.uint8)
    base[4, 5:10, 25:30] = 1  # A
    base[4, 5:10, 3:9] = 1  # B
    follow = np.zeros((10, 20, 60), np.uint8)
    follow[4, 5:10, 35:40] = 1  # x = i - 20: 15-19 mm
    baseline, followup = _grid((40, 20, 10), (1.0, 1.0, 1.0), base), _grid((60, 20, 10), (1.0, 1.0, 1.0), follow)
    followup.SetOrigin((-20.0, 0.0, 0.0))
    moved = sitk.TranslationTransform(3, (10.0, 0.0, 0.0))
    rows = change.classify(followup, baseline, moved)[1]
    assert _calls(rows) == [("stable", "follow-up", 0.025, 0.025, 0.0), ("gone", "baseline", 0.03, 0.03, -0.03)]
    assert [r["centroid_mm"] for r in rows] == [[17.0, 7.0, 4.0], [-4.5, 7.0, 4.0]]


def test_the_change_pictures_legend_gives_each_call_the_colour_it_is_filled_with(monkeypatch):
    """README: new red, enlarging orange, stable yellow, gone blue; each legend entry in the colour of its label."""
    from DeepWMLLib import qc

    given = []
    monkeypatch.setattr(qc, "render_labels", lambda image, labels, colours, legend, title: given.append((colours, legend)))
    monkeypatch.setattr(qc, "png_bytes", lambda rgb: b"")
    empty = _grid((10, 10, 5), (1.0, 1.0, 1.0))
    change.change_picture(empty, empty)
    colours, legend = given[0]
    code = {name: value for value, name in change.LABELS.items()}
    assert [name for name, _ in legend] == ["new", "enlarging", "stable", "gone", "small new", "small gone",
                                            "not assessable"]
    assert all(rgb == colours[code[name]] for name, rgb in legend)
    rgb = dict(legend)
    assert rgb["new"][0] == 255 and max(rgb["new"][1:]) < 50  # red
    assert rgb["enlarging"][0] == 255 and 100 < rgb["enlarging"][1] < 160 and rgb["enlarging"][2] < 50  # orange
    assert min(rgb["stable"][:2]) > 200 and rgb["stable"][2] < 50  # yellow
    assert rgb["gone"][2] > 200 and rgb["gone"][0] < 100  # blue


def test_a_dicom_seg_of_the_other_visits_series_given_as_a_mask_is_said_to_be_that_visits(tmp_path, capsys):
    """Both visits' FLAIRs unevenly spaced at the same positions, the follow-up's mask a SEG made on the
    baseline's series: read without the series at hand its frames were placed by their positions, the
    baseline's segmentation silently compared as the follow-up's (exit 0); now each scan's series places a SEG
    given as its mask by the images its frames name, and the mix-up is said, nothing written."""
    from conftest import stepped_positions, write_dicom_series
    from test_dicom_seg import PATIENT, make_seg, phantom

    image = phantom(spacing=(0.7, 0.9, 5.0))
    positions = stepped_positions(image, [5.0, 5.6, 4.4, 5.0, 5.8, 4.2])
    baseline = write_dicom_series(tmp_path / "base", image, uid="1.2.3.4.5", description="AX T2 FLAIR", number=7,
                                  extra=PATIENT, positions=positions)
    followup = write_dicom_series(tmp_path / "fol", image, uid="1.2.3.4.6", description="AX T2 FLAIR", number=8,
                                  extra=PATIENT, positions=positions)
    make_seg(baseline, tmp_path / "base_seg.dcm")
    make_seg(baseline, tmp_path / "also_base_seg.dcm")
    out = tmp_path / "out"
    assert main(["change", str(baseline), str(followup), "--baseline-mask", str(tmp_path / "base_seg.dcm"),
                 "--followup-mask", str(tmp_path / "also_base_seg.dcm"), "-o", str(out)]) == 1
    assert re.search(r"also_base_seg\.dcm, given as the follow-up's mask, lies on the baseline FLAIR's grid",
                     capsys.readouterr().err)
    assert not out.exists() or not any(out.glob("*change*"))


def test_a_change_seg_nrrd_edited_in_slicer_is_still_read_as_the_follow_ups_lesions(tmp_path, caplog):
    """CASE_change.seg.nrrd with a segment deleted in Slicer (here 'small gone'): the command line knew a change
    segmentation only with all seven calls, so the edited one was read as a rater's, its 'gone' segment joined
    to the lesions; now known as the Slicer module knows it (every segment named as a call, several or a gone
    one), its gone segment left out. With only 'gone' left the follow-up has no lesion: an empty mask (was
    refused as 'no lesion segment'). A rater's one segment named 'new' is lesion."""
    import logging

    grid = sitk.Image(6, 5, 3, sitk.sitkUInt8)
    grid.SetSpacing((1.0, 1.0, 3.0))
    labels = np.zeros((3, 5, 6), np.uint8)
    labels[0, 1, 1] = 1  # stable
    labels[1, 2, 2:4] = 2  # new
    labels[2, 3, 4] = 3  # gone
    image = sitk.GetImageFromArray(labels)
    image.CopyInformation(grid)
    path = tmp_path / "fu_change.seg.nrrd"
    io.write_label_segmentation(image, path, [(1, "stable", (0, 0, 1)), (2, "new", (1, 0, 0)), (3, "gone", (0, 1, 0))])
    with caplog.at_level(logging.WARNING):
        mask = sitk.GetArrayFromImage(io.read_mask(path))
    assert mask.sum() == 3 and mask[2].sum() == 0 and mask[0, 1, 1] == 1 and mask[1, 2, 2:4].all()
    assert "lesion change segmentation, read as the follow-up's lesions (stable, new); gone left out" in caplog.text
    only_gone = tmp_path / "gone_change.seg.nrrd"
    io.write_label_segmentation(image, only_gone, [(3, "gone", (0, 1, 0))])
    assert sitk.GetArrayFromImage(io.read_mask(only_gone)).sum() == 0
    rater = tmp_path / "rater.seg.nrrd"
    io.write_label_segmentation(image, rater, [(2, "new", (1, 0, 0))])
    assert sitk.GetArrayFromImage(io.read_mask(rater)).sum() == 2


def test_overwrite_removes_only_what_the_earlier_report_lists_as_segment_does(pair, tmp_path):
    """`deepwml change --overwrite` deleted every file of OUTDIR named like one of the pair's outputs, in any format,
    listed or not: a mask of `deepwml segment`'s case `followup_baseline` (followup_baseline_wmh.nii.gz, the name
    of a change baseline mask) in a shared OUTDIR, or a picture of the user's with no report at all. Now segment's
    rule, by its code (segment.remove_earlier_outputs): only what the earlier report lists (its picture, when
    rerun without --qc), never a file it does not list, and of a listed link the link alone."""
    files = pair["files"]
    out = tmp_path / "out"
    args = ["change", str(files["baseline"]), str(files["followup"]), "-o", str(out), "--baseline-mask",
            str(files["baseline_mask"]), "--followup-mask", str(files["followup_mask"])]
    assert main(args + ["--qc"]) == 0
    (out / "followup_baseline_wmh.nii.gz").write_bytes(b"segment's case followup_baseline")
    elsewhere = tmp_path / "picture.png"
    elsewhere.write_bytes(b"precious")
    (out / "followup_change_qc.png").unlink()
    os.symlink(elsewhere, out / "followup_change_qc.png")  # listed by the report
    assert main(args + ["--overwrite"]) == 0
    assert (out / "followup_baseline_wmh.nii.gz").read_bytes() == b"segment's case followup_baseline"
    assert not os.path.lexists(out / "followup_change_qc.png") and elsewhere.read_bytes() == b"precious"
    fresh = tmp_path / "fresh"  # no report: a file named like an output is the user's
    fresh.mkdir()
    (fresh / "followup_change_qc.png").write_bytes(b"mine")
    assert main(args[:4] + [str(fresh)] + args[5:] + ["--overwrite"]) == 0
    assert (fresh / "followup_change_qc.png").read_bytes() == b"mine"


def test_a_pair_killed_before_its_report_is_refused_then_overwrite_removes_its_files(pair, tmp_path, monkeypatch,
                                                                                   capsys):
    """`deepwml change --qc` killed outright after its outputs, before its report: --overwrite without --qc kept the
    killed run's picture (no report listed it), and a later --qc run skipped the pair as done, taking that picture
    for its own. Now the pair's journal lists it: refused as a run stopped part way, removed by --overwrite, and the
    --qc run adds the picture from the saved label map."""
    import contextlib

    from DeepWMLLib import segment

    files = pair["files"]
    out = tmp_path / "out"
    args = ["change", str(files["baseline"]), str(files["followup"]), "-o", str(out), "--baseline-mask",
            str(files["baseline_mask"]), "--followup-mask", str(files["followup_mask"])]
    real = io.write_atomically

    def killed(path, how):  # the process dies as it is about to write its report: nothing after it runs
        if os.path.basename(str(path)) == "followup_change.json":
            raise SystemExit(137)
        return real(path, how)

    with monkeypatch.context() as patched:
        patched.setattr(io, "write_atomically", killed)
        patched.setattr(segment, "whole_or_none", lambda paths: contextlib.nullcontext())
        with pytest.raises(SystemExit):
            main(args + ["--qc"])
    assert (out / "followup_change_qc.png").exists() and not (out / "followup_change.json").exists()
    capsys.readouterr()
    assert main(args) == 1
    said = capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0
    assert not (out / "followup_change_qc.png").exists()
    assert not [p.name for p in out.iterdir() if p.name.startswith(".") and "journal" in p.name]
    capsys.readouterr()
    assert main(args + ["--qc"]) == 0
    assert "added followup_change_qc.png" in "".join(capsys.readouterr())
    assert "stopped part way" in said and "--overwrite" in said and "redo the pair" in said, said


def test_the_follow_ups_five_calls_add_up_to_its_volume_on_random_pairs():
    """Property: on random small pairs (lesions cut by either field of view, grids of other spacings and origins, a
    shift, --presence with blurred probabilities, small new under --min-change, lesions touching several others, empty
    masks), every follow-up lesion has one row of scan follow-up with a call of the follow-up's, these rows add up to
    the follow-up's lesion volume, and new + small new + enlarging + stable + not assessable = followup_volume_ml (each
    rounded to 0.0001 ml)."""
    from scipy import ndimage

    def grid(array, spacing, origin):
        image = sitk.GetImageFromArray(array.astype(np.uint8))
        image.SetSpacing(spacing)
        image.SetOrigin(origin)
        return image

    for seed in range(40):
        rng = np.random.default_rng([50, seed])

        def mask(shape):
            array = np.zeros(shape, np.uint8)
            for _ in range(rng.integers(0, 6)):
                centre, half = [rng.integers(0, n) for n in shape], [rng.integers(0, 4) for _ in shape]
                array[tuple(slice(max(0, c - h), c + h + 1) for c, h in zip(centre, half))] = 1
            return array & (rng.random(shape) < 0.9)

        spacings = [tuple(float(v) for v in rng.choice([0.8, 1.0, 1.5, 3.0], 3)) for _ in range(2)]
        follow = grid(mask(tuple(int(v) for v in rng.integers(8, 20, 3))), spacings[0], (0.0, 0.0, 0.0))
        base = grid(mask(tuple(int(v) for v in rng.integers(8, 20, 3))), spacings[1],
                    tuple(float(v) for v in rng.uniform(-5, 5, 3)))
        maps = {}
        if rng.random() < 0.5:
            maps = {"presence": 0.15, **{f"{name}_probabilities": sitk.SmoothingRecursiveGaussian(
                sitk.Cast(image, sitk.sitkFloat32), 2.0) for name, image in (("followup", follow), ("baseline", base))}}
        _, rows = change.classify(follow, base, sitk.TranslationTransform(3, tuple(float(v) for v in rng.uniform(-3, 3, 3))),
                                  tolerance_mm=float(rng.choice([0, 1, 3])), min_change_ml=float(rng.choice([0, 0.005, 0.1])),
                                  **maps)
        array = sitk.GetArrayFromImage(follow)
        followup_ml = np.count_nonzero(array) * np.prod(spacings[0]) / 1000
        ours = [r for r in rows if r["scan"] == "follow-up"]
        assert len(ours) == ndimage.label(array, np.ones((3, 3, 3)))[1], seed
        assert not {r["status"] for r in ours} & set(change.BASELINE_ONLY), seed
        assert sum(r["volume_ml"] for r in ours) == pytest.approx(followup_ml, abs=1e-6), seed
        summary = change._summary(rows, 0.0, followup_ml)
        assert sum(summary[f"{key}_ml"] for key in ("new", "small_new", "enlarging", "stable", "not_assessable")) == \
            pytest.approx(summary["followup_volume_ml"], abs=1.5e-4), seed
