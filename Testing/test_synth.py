"""Synthetic FLAIR generator: geometry, masks that match the image, determinism, data hygiene, CLI."""

import csv

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from conftest import make_volume
from DeepWMLLib import synth
from DeepWMLLib.cli import main as cli_main
from DeepWMLLib.errors import DeepWMLError

needs_shared = pytest.mark.skipif(
    synth.shared_data_dir() is None,
    reason="shared data (../shared/data or DEEPWML_SHARED_DATA) not found: synthetic cases need its "
           "MNI152 label map and lesion library")
pytestmark = pytest.mark.shared


@pytest.fixture(scope="module")
def csvd_case():
    return synth.generate_case(11, disease="synth-csvd", matrix=256, slice_thickness=3.0, skull=True)


@needs_shared
def test_flair_and_mask_share_an_oblique_clinical_grid(csvd_case):
    flair, mask, _ = csvd_case
    assert flair.GetPixelID() == sitk.sitkUInt16 and mask.GetPixelID() == sitk.sitkUInt8
    assert flair.GetSize() == mask.GetSize()
    assert np.allclose(flair.GetOrigin(), mask.GetOrigin())
    assert np.allclose(flair.GetSpacing(), mask.GetSpacing())
    assert np.allclose(flair.GetDirection(), mask.GetDirection())
    sx, sy, sz = flair.GetSpacing()
    assert 0.4 <= sx == sy <= 1.0 and 3.0 <= sz <= 8.0
    direction = np.array(flair.GetDirection()).reshape(3, 3)
    assert np.allclose(direction @ direction.T, np.eye(3), atol=1e-6)
    assert direction[2, 2] > 0.9  # slices stack from foot to head, nearly axial
    assert set(np.unique(sitk.GetArrayViewFromImage(mask))) <= {0, 1}


@needs_shared
def test_mask_marks_the_painted_bright_lesions(csvd_case):
    flair, mask, meta = csvd_case
    image = sitk.GetArrayFromImage(flair).astype(float)
    lesions = sitk.GetArrayFromImage(mask).astype(bool)
    assert meta["lesion_ml"] > 0.3
    assert meta["mask_ml"] == pytest.approx(meta["lesion_ml"], rel=0.35)
    around = np.zeros_like(lesions)
    for z in range(lesions.shape[0]):  # in-plane ring: thick slices differ too much across z
        around[z] = ndimage.binary_dilation(lesions[z], iterations=4) & ~ndimage.binary_dilation(lesions[z], iterations=1)
    assert image[lesions].mean() > 1.15 * image[around].mean()


def test_rim_grade_rises_from_the_lesion_edge_to_its_core():
    z, y, x = np.mgrid[:40, :40, :40]
    ball = (np.sqrt((z - 20.0) ** 2 + (y - 20.0) ** 2 + (x - 20.0) ** 2) <= 9).astype(np.float32)
    for seed in range(5):
        grade = synth._rim_grade(np.random.default_rng(seed), ball)
        inside = ball > 0
        edge = inside & ~ndimage.binary_erosion(inside)
        assert 0.35 <= grade[edge].min() and grade[edge].max() <= 0.65 + 0.35 * 0.5 / 1.5
        assert grade[20, 20, 20] == 1.0 and grade.max() == 1.0
        profile = grade[20, 20, 11:21]  # edge to centre along one axis
        assert np.all(np.diff(profile) >= 0) and profile[0] < profile[-1]


@needs_shared
def test_graded_rims_change_only_lesion_intensities_and_darken_edges_more_than_cores(csvd_case):
    """The same case with graded rims: same mask and, away from the lesions, the same image (but for
    painted lesion traces too thin to reach the mask); inside the lesions the edge loses more
    brightness than the core."""
    flair, mask, meta = csvd_case
    assert "graded_rims" not in meta
    rim_flair, rim_mask, rim_meta = synth.generate_case(11, disease="synth-csvd", matrix=256, slice_thickness=3.0,
                                                        skull=True, graded_rims=1.0)
    assert rim_meta["graded_rims"] == 1  # this case's lesions are not of the faint kind
    lesions = sitk.GetArrayFromImage(mask).astype(bool)
    assert np.array_equal(lesions, sitk.GetArrayFromImage(rim_mask))
    plain = sitk.GetArrayFromImage(flair).astype(float)
    graded = sitk.GetArrayFromImage(rim_flair).astype(float)
    far = ~ndimage.binary_dilation(lesions, iterations=8)
    assert np.mean(plain[far] != graded[far]) < 1e-4
    edge, core = np.zeros_like(lesions), np.zeros_like(lesions)
    for z in range(lesions.shape[0]):
        edge[z] = lesions[z] & ~ndimage.binary_erosion(lesions[z])
        core[z] = ndimage.binary_erosion(lesions[z], iterations=3)
    assert edge.sum() > 100 and core.sum() > 20
    edge_ratio = graded[edge].mean() / plain[edge].mean()
    core_ratio = graded[core].mean() / plain[core].mean()
    assert edge_ratio < core_ratio - 0.03 and core_ratio <= 1.0
    with pytest.raises(DeepWMLError, match="probability"):
        synth.generate_case(11, matrix=64, graded_rims=1.5)


@needs_shared
@pytest.mark.parametrize("matrix", [64, 128])
def test_a_small_matrix_takes_coarser_pixels_not_a_cropped_head(matrix):
    """--matrix below the clinical 256: the field of view still holds the whole head (skull included),
    with pixels over 1 mm, and the intracranial volume is an adult's, as at 256."""
    flair, _, meta, brain = synth.generate_case(synth.case_rng(7, 3), matrix=matrix, slice_thickness=8.0, skull=True,
                                                intracranial=True)
    image, icv = sitk.GetArrayFromImage(flair), sitk.GetArrayFromImage(brain)
    assert flair.GetSize()[0] <= matrix + 8 and flair.GetSpacing()[0] > 1.0
    head = image > 0.2 * np.percentile(image, 99)
    border = np.concatenate([head[:, 0, :], head[:, -1, :], head[:, :, 0], head[:, :, -1]], axis=1)
    assert border.mean() < 0.02  # nothing of the head cut by the image's edge
    ml = icv.sum() * np.prod(flair.GetSpacing()) / 1000
    assert 900 < ml < 2200, ml


@pytest.mark.parametrize("rectangular,size", [(False, (64, 64)), (True, (51, 64))])
def test_matrix_is_the_long_side_as_readme_says(rectangular, size):
    """--matrix 64 gave 51x64 on a simulated scanner with a rectangular field of view, where README said every case
    had that matrix: README now says so, with this example (a brain 120 mm wide and 150 mm long)."""
    from types import SimpleNamespace

    from conftest import REPO

    assert "--matrix 64: 51x64" in (REPO / "README.md").read_text(encoding="utf-8")
    surface = np.array([[x, y, z] for x in (-60, 60) for y in (-75, 75) for z in (-50, 50)], float)
    atlas = SimpleNamespace(surface_points=surface, brain_centre=np.zeros(3), ventricle_centre=np.zeros(3))
    scanner = {"thickness": 5.0, "matrix": 64, "fov": 230.0, "rectangular": rectangular}
    assert synth._acquisition(np.random.default_rng(0), atlas, scanner)["size"][:2] == size


@needs_shared
def test_same_seed_same_case_other_seed_other_case():
    a = synth.generate_case(synth.case_rng(5, 1), matrix=256, slice_thickness=6.0)
    b = synth.generate_case(synth.case_rng(5, 1), matrix=256, slice_thickness=6.0)
    c = synth.generate_case(synth.case_rng(5, 2), matrix=256, slice_thickness=6.0)
    for x, y in zip(a[:2], b[:2]):
        assert np.array_equal(sitk.GetArrayViewFromImage(x), sitk.GetArrayViewFromImage(y))
        assert x.GetOrigin() == y.GetOrigin() and x.GetDirection() == y.GetDirection()
    assert a[2] == b[2]
    assert a[0].GetOrigin() != c[0].GetOrigin()


def test_evaluation_patients_never_enter_the_lesion_library(tmp_path):
    folder = tmp_path / "open_ms" / "lesion_masks_mni"
    folder.mkdir(parents=True)
    for number in range(1, 31):
        (folder / f"patient{number:02d}.nii.gz").touch()
    names = {p.name for p in synth.lesion_library(tmp_path)}
    assert len(names) == 27
    assert not names & {"patient07.nii.gz", "patient19.nii.gz", "patient26.nii.gz"}


@needs_shared
def test_real_lesion_cases_use_training_patients_only():
    sources = {synth.generate_case(synth.case_rng(0, i), disease="synth-ms", matrix=256,
                                   slice_thickness=8.0)[2]["lesion_source"] for i in range(2)}
    assert sources and all(s.startswith("patient") for s in sources)
    assert not sources & synth.EXCLUDED_PATIENTS


@needs_shared
def test_cli_writes_cases_and_manifest(tmp_path, capsys):
    assert cli_main(["synth", "-n", "2", "-o", str(tmp_path / "out"), "--seed", "3", "--matrix", "256",
                     "--intracranial"]) == 0
    manifest = tmp_path / "out" / "manifest.csv"
    with open(manifest, newline="", encoding="utf-8-sig") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2
    assert list(rows[0])[:5] == ["case", "flair", "mask", "centre", "disease"]
    for row in rows:
        assert row["centre"].startswith("synth-scanner") and row["disease"] in synth.DISEASES
        flair = sitk.ReadImage(str(manifest.parent / row["flair"]))
        mask = sitk.ReadImage(str(manifest.parent / row["mask"]))
        brain = sitk.ReadImage(str(manifest.parent / row["intracranial"]))
        assert flair.GetSize() == mask.GetSize() == brain.GetSize()
        assert np.allclose(brain.GetOrigin(), flair.GetOrigin()) and np.allclose(brain.GetDirection(), flair.GetDirection())


@needs_shared
def test_intracranial_mask_holds_brain_and_lesions_but_not_the_scalp():
    """The brain-mask target: asking for it changes nothing else; every lesion lies inside it; the
    scalp and skull of a skull-on case lie outside; its volume is an adult's intracranial volume."""
    plain = synth.generate_case(synth.case_rng(7, 3), matrix=256, slice_thickness=5.0, skull=True)
    flair, mask, meta, brain = synth.generate_case(synth.case_rng(7, 3), matrix=256, slice_thickness=5.0,
                                                   skull=True, intracranial=True)
    image, lesion, icv = (sitk.GetArrayFromImage(x) for x in (flair, mask, brain))
    assert np.array_equal(image, sitk.GetArrayFromImage(plain[0]))
    assert np.array_equal(lesion, sitk.GetArrayFromImage(plain[1])) and meta == plain[2]
    assert brain.GetPixelID() == sitk.sitkUInt8 and set(np.unique(icv)) == {0, 1}
    assert np.allclose(brain.GetOrigin(), flair.GetOrigin()) and np.allclose(brain.GetSpacing(), flair.GetSpacing())
    assert lesion.sum() > 0 and (icv[lesion > 0] > 0).mean() > 0.99
    head = image > 0.2 * np.percentile(image, 99)
    assert (head & (icv == 0)).sum() > 0.1 * head.sum()  # scalp and marrow: head, not intracranial
    ml = icv.sum() * np.prod(flair.GetSpacing()) / 1000
    assert 900 < ml < 2200, ml


@needs_shared
def test_ventricle_mask_lies_inside_the_brain_is_dark_and_changes_nothing_else():
    """The ventricle network's target: asking for it changes nothing else; it lies inside the intracranial
    space, holds no lesion, is darker than the white matter on the FLAIR (CSF), and has an adult's volume."""
    plain = synth.generate_case(synth.case_rng(7, 3), matrix=256, slice_thickness=5.0, skull=True)
    flair, mask, meta, brain, vent = synth.generate_case(synth.case_rng(7, 3), matrix=256, slice_thickness=5.0,
                                                         skull=True, intracranial=True, ventricles=True)
    image, lesion, icv, inside = (sitk.GetArrayFromImage(x) for x in (flair, mask, brain, vent))
    assert np.array_equal(image, sitk.GetArrayFromImage(plain[0])) and np.array_equal(lesion, sitk.GetArrayFromImage(plain[1]))
    assert meta == plain[2] and vent.GetPixelID() == sitk.sitkUInt8 and set(np.unique(inside)) == {0, 1}
    assert np.allclose(vent.GetOrigin(), flair.GetOrigin()) and np.allclose(vent.GetDirection(), flair.GetDirection())
    assert icv[inside > 0].all() and not (lesion[inside > 0]).any()
    assert np.median(image[inside > 0]) < 0.6 * np.median(image[(icv > 0) & (inside == 0)])
    ml = inside.sum() * np.prod(flair.GetSpacing()) / 1000
    assert 5 < ml < 150, ml
    _, _, _, only_vent = synth.generate_case(synth.case_rng(7, 3), matrix=256, slice_thickness=5.0, skull=True,
                                             ventricles=True)
    assert np.array_equal(sitk.GetArrayFromImage(only_vent), inside)  # without the intracranial mask too


@needs_shared
def test_dark_deep_grey_darkens_only_the_deep_grey_matter():
    """--dark-deep-grey: the basal ganglia and thalami drawn darker than white matter; the masks, the
    metadata but its flag, and the image away from the deep grey matter stay as without it."""
    plain = synth.generate_case(synth.case_rng(7, 3), matrix=256, slice_thickness=5.0, skull=True, ventricles=True)
    dark = synth.generate_case(synth.case_rng(7, 3), matrix=256, slice_thickness=5.0, skull=True, ventricles=True,
                               dark_deep_grey=1.0)
    off = synth.generate_case(synth.case_rng(7, 3), matrix=256, slice_thickness=5.0, skull=True, ventricles=True,
                              dark_deep_grey=1e-9)  # drawn, never darkened: the same image
    a, b = (sitk.GetArrayFromImage(x[0]).astype(float) for x in (plain, dark))
    assert np.array_equal(sitk.GetArrayFromImage(off[0]), sitk.GetArrayFromImage(plain[0])) and off[2]["dark_deep_grey"] == 0
    for k in (1, 3):
        assert np.array_equal(sitk.GetArrayFromImage(plain[k]), sitk.GetArrayFromImage(dark[k]))
    assert dark[2]["dark_deep_grey"] == 1 and {**dark[2], "dark_deep_grey": None} == {**plain[2], "dark_deep_grey": None}
    changed = np.abs(b - a) > 0.05 * np.percentile(a, 99)
    assert changed.any() and (b[changed] < a[changed]).mean() > 0.8  # darker where changed ...
    assert changed.mean() < 0.02  # ... and only in a small central part of the volume
    rows, cols = np.nonzero(changed.any(axis=0))
    assert abs(rows.mean() / a.shape[1] - 0.5) < 0.15 and abs(cols.mean() / a.shape[2] - 0.5) < 0.15


def test_cli_rejects_an_empty_data_set_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as usage:  # a usage error: argparse exits 2
        cli_main(["synth", "-n", "0", "-o", str(tmp_path)])
    assert usage.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "at least 1" in err
    for option, value, says in (("--graded-rims", "1.5", "between 0 and 1"), ("--skull-base-mimics", "-0.1", "between 0 and 1"),
                                ("--dark-deep-grey", "2", "between 0 and 1"),
                                ("--matrix", "2000", "from 64 to 1024"), ("--thickness", "20", "from 0.5 to 10")):
        with pytest.raises(SystemExit) as usage:
            cli_main(["synth", "-n", "2", "-o", str(tmp_path), option, value])
        assert usage.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and option in err and says in err and value in err
    with pytest.raises(DeepWMLError, match="--skull-base-mimics is a probability"):  # the API checks it too
        synth.generate_dataset(2, tmp_path, skull_base_mimics=-0.1)
    with pytest.raises(DeepWMLError, match="--dark-deep-grey is a probability"):
        synth.generate_dataset(2, tmp_path, dark_deep_grey=1.5)
    for option in (["--ventricles"], ["--dark-deep-grey", "0.5"]):  # real scans bring their own anatomy
        assert cli_main(["synth", "-n", "1", "-o", str(tmp_path / "x"), *option, "--backgrounds", str(tmp_path)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and option[0] in err and "cannot be combined with --backgrounds" in err
    assert not any(tmp_path.iterdir())


def test_synth_refuses_to_write_over_a_data_set_unless_asked(tmp_path, capsys, monkeypatch):
    (tmp_path / "old_flair.nii.gz").write_text("x")
    (tmp_path / "old_mask.nii.gz").write_text("x")
    (tmp_path / "notes.txt").write_text("the user's own file")
    (tmp_path / "manifest.csv").write_text("case,flair,mask\nold,old_flair.nii.gz,old_mask.nii.gz\n")
    assert cli_main(["synth", "-n", "1", "-o", str(tmp_path)]) == 1
    assert "holds a data set already" in capsys.readouterr().err
    assert (tmp_path / "old_flair.nii.gz").exists()
    calls = []
    monkeypatch.setattr(synth, "generate_dataset", lambda *a, **k: calls.append(a) or tmp_path / "manifest.csv")
    monkeypatch.setattr(synth, "_require_shared_dir", lambda: tmp_path)  # checked before the old set goes
    assert cli_main(["synth", "-n", "1", "-o", str(tmp_path), "--overwrite"]) == 0 and len(calls) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # the old set's files went, nothing else


@pytest.mark.parametrize("missing", ["shared data", "background scan", "readable background"])
def test_overwrite_keeps_the_old_data_set_when_the_new_run_cannot_start(missing, tmp_path, capsys, monkeypatch):
    """--overwrite deleted the old data set, then the run was refused for want of the shared data or of a background
    scan (a typo): the user lost the old set for nothing. What the run needs is checked before anything is deleted.
    Backgrounds none of which can be read as a FLAIR (a damaged file, a label mask) were refused only after the
    templates and networks had loaded (and the old set had gone): they are read first."""
    old = tmp_path / "set"
    old.mkdir()
    (old / "old_flair.nii.gz").write_text("x")
    (old / "manifest.csv").write_text("case,flair,mask\nold,old_flair.nii.gz,\n")
    argv = ["synth", "-n", "1", "-o", str(old), "--overwrite"]
    said = {"shared data": "DEEPWML_SHARED_DATA", "background scan": "does not exist",
            "readable background": "none of the 2 background scan(s) could be used"}[missing]
    if missing == "shared data":
        monkeypatch.setenv("DEEPWML_SHARED_DATA", str(tmp_path / "nowhere"))
    elif missing == "background scan":
        argv += ["--backgrounds", str(tmp_path / "typo.nii.gz")]
    else:
        (tmp_path / "damaged.nii.gz").write_text("not an image")
        _, mask = make_volume(size=(32, 32, 4), blobs=((0.5, 0.5, 0.5, 5.0),))
        sitk.WriteImage(mask, str(tmp_path / "mask.nii.gz"))
        argv += ["--backgrounds", str(tmp_path / "damaged.nii.gz"), str(tmp_path / "mask.nii.gz")]
        monkeypatch.setattr(synth, "_require_shared_dir", lambda: pytest.fail("the backgrounds were refused late"))
    assert cli_main(argv) == 1
    assert said in capsys.readouterr().err
    assert sorted(p.name for p in old.iterdir()) == ["manifest.csv", "old_flair.nii.gz"]
    assert cli_main([*argv[:4], str(tmp_path / "new"), *argv[5:]]) == 1  # a new folder: refused, and not made
    assert not (tmp_path / "new").exists()


def test_backgrounds_none_of_which_reads_as_a_flair_are_refused_before_any_analysis(tmp_path, monkeypatch):
    """generate_on_backgrounds read each scan only as it analysed it, after loading the templates and networks
    (seconds) and making OUTDIR: a damaged file and a label mask given as backgrounds are left out, each with its
    warning, and the run refused before anything loads or is made."""
    from DeepWMLLib import realbg

    (tmp_path / "damaged.nii.gz").write_text("not an image")
    _, mask = make_volume(size=(32, 32, 4), blobs=((0.5, 0.5, 0.5, 5.0),))
    sitk.WriteImage(mask, str(tmp_path / "mask.nii.gz"))
    monkeypatch.setattr(synth, "_require_shared_dir", lambda: pytest.fail("the backgrounds were refused late"))
    with pytest.warns(UserWarning) as said, pytest.raises(DeepWMLError, match=r"none of the 2 background scan\(s\)"):
        realbg.generate_on_backgrounds([tmp_path], 1, tmp_path / "out")
    left_out = [str(w.message) for w in said if "background left out" in str(w.message)]
    assert len(left_out) == 2 and "truncated or corrupt" in left_out[0] and "label mask" in left_out[1]
    assert not (tmp_path / "out").exists()


def test_missing_templates_say_where_to_point(tmp_path, monkeypatch):
    monkeypatch.setenv("DEEPWML_SHARED_DATA", str(tmp_path))
    with pytest.raises(DeepWMLError, match="DEEPWML_SHARED_DATA"):
        synth.generate_case(0)


def test_extracranial_spots_are_lesion_bright_and_stay_outside_the_skull_inner_surface():
    """The unlabelled bright spots in scalp and bone: as bright as lesions at their centres, only in
    the band outside the intracranial space (distance 0.5 mm to the soft tissue's depth, plus blur)."""
    z, y, x = np.mgrid[:60, :60, :60]
    d = np.maximum(np.sqrt((z - 30.0) ** 2 + (y - 30.0) ** 2 + (x - 30.0) ** 2) - 15, 0).astype(np.float32)
    depth = np.full((60, 1, 1), 8.0, np.float32)
    spots = synth._extracranial_spots(np.random.default_rng(0), d, depth, bright=2.0)
    assert spots.max() > 0.6 * 2.0
    blur = 3 * 1.4
    assert not np.any(spots[d > 8.0 + blur + 1] > 1e-3)  # never beyond the soft tissue
    # Seeds lie outside the intracranial space; only blur reaches in (and rendering multiplies the
    # layers by 1 - intracranial fraction), so little of the spots' mass lies inside.
    assert spots[d == 0].sum() < 0.15 * spots.sum()


@needs_shared
def test_intracranial_mimics_are_lesion_bright_and_stay_off_lesion_territory():
    """The unlabelled mimics inside the skull (CSF patches, vessel and flow spots): some as bright as
    lesions, seeded only in sulci, cisterns and cortex at least 2 voxels from where lesions may be
    painted, so only faint blur reaches lesion territory; never in the ventricles' bodies."""
    atlas = synth._atlas(synth._require_shared_dir())
    territory = atlas.allowed
    near = ndimage.binary_dilation(territory, iterations=1)
    sites = np.zeros(territory.shape, bool)
    sites.flat[atlas.mimic_sites] = True
    assert atlas.mimic_sites.size > 10000 and not np.any(sites & near)
    for seed in range(3):
        mimics = synth._intracranial_mimics(np.random.default_rng(seed), atlas, bright=2.0)
        assert mimics.max() > 0.5 * 2.0
        assert mimics[territory].max() < 0.35 * 2.0
        assert mimics[territory].sum() < 0.1 * mimics.sum()


@needs_shared
def test_skull_base_mimics_sit_on_low_cortex_and_change_nothing_else(csvd_case):
    """The unlabelled skull-base patches: seeded on cortex in the lowest 35 % of the intracranial
    space within 12 mm of its surface, off lesion territory, as bright as lesions at their peak; the
    same case with them has the same mask and, above the skull base, the same image."""
    atlas = synth._atlas(synth._require_shared_dir())
    sites = np.zeros(atlas.gm.shape, bool)
    sites.flat[atlas.base_sites] = True
    z_sites = np.nonzero(sites.any(axis=(1, 2)))[0]
    z_head = np.nonzero(atlas.icv.max(axis=(1, 2)) > 0.5)[0]
    assert atlas.base_sites.size > 1000
    assert z_sites.max() < z_head.min() + 0.4 * (z_head.max() - z_head.min())
    assert not np.any(sites & atlas.allowed)
    patches = synth._skull_base_mimics(np.random.default_rng(3), atlas, bright=2.0)
    assert 0.3 * 2.0 * 0.5 < patches.max() <= 0.8 * 2.0 * 1.5
    assert patches[atlas.allowed].sum() < 0.2 * patches.sum()

    flair, mask, meta = csvd_case
    assert "skull_base_mimics" not in meta
    with_flair, with_mask, with_meta = synth.generate_case(11, disease="synth-csvd", matrix=256, slice_thickness=3.0,
                                                           skull=True, skull_base_mimics=1.0)
    assert with_meta["skull_base_mimics"] == 1
    assert np.array_equal(sitk.GetArrayFromImage(mask), sitk.GetArrayFromImage(with_mask))
    plain = sitk.GetArrayFromImage(flair).astype(float)
    changed = np.abs(sitk.GetArrayFromImage(with_flair).astype(float) - plain) > 0.5
    assert changed.sum() > 50
    rows = np.nonzero(changed.any(axis=(1, 2)))[0]
    head = np.nonzero(plain.max(axis=(1, 2)) > 0)[0]
    # On this 3 mm axial case the changes stay in the lower half of the slices that hold the head.
    assert rows.max() < head.min() + 0.5 * (head.max() - head.min())
    with pytest.raises(DeepWMLError, match="probability"):
        synth.generate_case(11, matrix=64, skull_base_mimics=2.0)
