"""Synthetic lesions inserted into a real clinical FLAIR (DeepWMLLib/realbg.py); needs ../shared."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from DeepWMLLib import io

pytestmark = pytest.mark.shared

SCAN = "open_ms/clinical_flair/patient01_study1.nii.gz"


@pytest.fixture(scope="module")
def prepared():
    from DeepWMLLib import realbg
    from DeepWMLLib.segment import default_model_paths, load_brain_model, load_models
    from DeepWMLLib.synth import _atlas, lesion_library

    shared = io.shared_data_dir()
    if shared is None or not (shared / SCAN).is_file():
        pytest.skip("needs ../shared/data (set DEEPWML_SHARED_DATA)")
    pytest.importorskip("nilearn")
    atlas = _atlas(shared)
    background = realbg.analyse_background(shared / SCAN, atlas, load_models(default_model_paths()),
                                           load_brain_model("default"))
    return background, atlas, lesion_library(shared)


def analysed_once(monkeypatch, prepared) -> list:
    """realbg.analyse_background, called on SCAN with the module's atlas, the shipped models, the shipped brain-mask
    model and the default settings (all that `prepared` analysed it with), gives a copy of `prepared`'s analysis
    instead of computing it again (the networks and the registration on the real scan: 40 s on a loaded CPU); called
    on anything else, or with anything else, it computes as it is. The analysis is deterministic (CPU networks, a
    seeded registration), so a run gets what it would compute. Returns the list of paths it gave the copy for."""
    import copy

    from DeepWMLLib import realbg
    from DeepWMLLib.segment import default_model_paths, load_brain_model

    made = realbg.analyse_background
    background, atlas, _ = prepared
    scan = (io.shared_data_dir() / SCAN).resolve()
    shipped = [str(Path(p).resolve()) for p in default_model_paths()]
    brain = load_brain_model("default")
    given = []

    def analyse(path, atlas_given, models, brain_model, faint_ratio=realbg.FAINT_RATIO, own_lesions=False):
        same = (Path(path).resolve() == scan and atlas_given is atlas and faint_ratio == realbg.FAINT_RATIO
                and not own_lesions and [str(Path(m.path).resolve()) for m in models] == shipped
                and brain_model is not None and (brain_model.path, brain_model.digest) == (brain.path, brain.digest))
        if not same:
            return made(path, atlas_given, models, brain_model, faint_ratio, own_lesions)
        given.append(path)
        return copy.deepcopy(background)

    monkeypatch.setattr(realbg, "analyse_background", analyse)
    return given


def test_inserted_lesions_keep_the_scan_its_grid_texture_and_own_lesions_apart(prepared):
    from DeepWMLLib import realbg
    from DeepWMLLib.synth import case_rng

    background, atlas, library = prepared
    assert background.overlap >= realbg.MIN_OVERLAP  # the template registered onto the scan
    original = sitk.ReadImage(str(io.shared_data_dir() / SCAN), sitk.sitkFloat32)
    cases = [realbg.insert_case(case_rng(5, i), background, atlas, library) for i in range(4)]
    image, mask, meta = max(cases, key=lambda c: c[2]["lesion_ml"])
    assert meta["lesion_ml"] > 0.5 and meta["background"] == "patient01_study1"
    for out in (image, mask):  # the scan's exact grid
        assert out.GetSize() == original.GetSize() and out.GetSpacing() == original.GetSpacing()
        assert out.GetOrigin() == original.GetOrigin() and out.GetDirection() == original.GetDirection()
    before = io.to_axial_stack(original)[0]
    after, labels = io.to_axial_stack(image)[0], io.to_axial_stack(mask, np.uint8)[0]
    assert set(np.unique(labels)) <= {0, 1, realbg.IGNORE_VALUE}
    lesion = labels == 1
    # brighter where labelled, by a lesion's contrast; untouched away from the inserted lesions
    ratio = after[lesion] / np.maximum(before[lesion], 1e-3)
    assert ratio.min() > 1.0 and 1.1 < np.median(ratio) < 2.1
    # away from the labelled lesion only the faint partial-volume edges of lesions too thin to fill
    # half a thick slice change (unlabelled, as in `synth`), by less than the labelled lesion's contrast
    rise = after / np.maximum(before, 1e-3) - 1
    changed = after != before
    far = changed & ~ndimage.binary_dilation(lesion, iterations=4)
    assert np.percentile(rise[far], 95) < np.median(rise[lesion])
    assert not (changed & ~background.intracranial).any()
    # the scan's own probable lesions are left out, never labelled lesion
    ignored = labels == realbg.IGNORE_VALUE
    assert ignored.any() and not (ignored & ~background.marked).any() and not (lesion & background.marked).any()
    # the same seed gives the same case
    again = realbg.insert_case(case_rng(5, cases.index((image, mask, meta))), background, atlas, library)
    assert np.array_equal(sitk.GetArrayFromImage(again[0]), sitk.GetArrayFromImage(image))


def test_synth_command_with_backgrounds_writes_a_training_manifest(prepared, tmp_path, monkeypatch):
    """`deepwml synth --backgrounds` (in this process: the scan's analysis the module's, `analysed_once`) writes
    its cases and a training manifest; the command refusing an option that does not go with it runs as a process."""
    from DeepWMLLib.cli import main

    out = tmp_path / "real"
    scan = io.shared_data_dir() / SCAN
    given = analysed_once(monkeypatch, prepared)
    assert main(["synth", "-n", "2", "-o", str(out), "--seed", "3", "--backgrounds", str(scan)]) == 0
    assert [Path(p).resolve() for p in given] == [scan.resolve()]  # the analysis asked for: the one `prepared` made
    rows = list(csv.DictReader(open(out / "manifest.csv", newline="", encoding="utf-8-sig")))
    assert [r["case"] for r in rows] == ["real3_00000", "real3_00001"]
    assert all(r["centre"] == "real-patient01_study1" for r in rows)
    for r in rows:
        mask = sitk.ReadImage(str(out / r["mask"]))
        assert io.grid_difference(mask, sitk.ReadImage(str(out / r["flair"]))) is None
    bad = subprocess.run([sys.executable, "-m", "DeepWMLLib.cli", "synth", "-n", "1", "-o", str(tmp_path / "x"),
                          "--graded-rims", "0.5", "--backgrounds", str(scan)], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "cannot be combined with --backgrounds" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


def test_a_scan_that_cannot_serve_as_background_is_left_out_with_a_warning(prepared, tmp_path):
    from DeepWMLLib import realbg
    from DeepWMLLib.errors import DeepWMLError

    blank = sitk.Image([64, 64, 6], sitk.sitkFloat32)  # no head at all
    blank.SetSpacing((0.9, 0.9, 5.0))
    path = tmp_path / "blank.nii.gz"
    sitk.WriteImage(blank, str(path))
    with pytest.warns(UserWarning, match="background left out"), pytest.raises(DeepWMLError, match="none of the 1"):
        realbg.generate_on_backgrounds([path], 1, tmp_path / "out")


def test_an_output_folder_that_cannot_be_made_is_said_in_words(prepared, tmp_path, monkeypatch):
    """`deepwml synth --backgrounds` into a path that is a file, or on a read-only or full disk, ended in
    'internal error: FileExistsError' once the backgrounds were analysed."""
    from DeepWMLLib import realbg
    from DeepWMLLib.errors import DeepWMLError

    monkeypatch.setattr(realbg, "analyse_background", lambda *args, **kwargs: prepared[0])
    (tmp_path / "taken").write_text("a note")
    with pytest.raises(DeepWMLError, match=r"cannot create output folder .*taken \(a file of that name exists\)"):
        realbg.generate_on_backgrounds([io.shared_data_dir() / SCAN], 1, tmp_path / "taken")


def test_faint_white_matter_hyperintensities_are_marked_despite_a_bias_field():
    """Pure arrays (no ../shared needed at run time, but the module's marker applies): a faint blob in
    deep white matter is marked, the same white matter brightened smoothly by a bias field is not,
    nor is bright tissue outside the core white matter."""
    from DeepWMLLib.realbg import faint_hyperintensities

    shape = (12, 64, 64)
    z, y, x = np.mgrid[:shape[0], :shape[1], :shape[2]]
    bias = 1 + 0.3 * x / shape[2]  # 30 % brighter on one side, slowly
    stack = 100.0 * bias
    white = np.zeros(shape, np.float32)
    white[:, 8:56, 8:48] = 1.0
    blob = ((y - 30) ** 2 + (x - 40) ** 2 <= 16) & (np.abs(z - 6) <= 1)
    stack = np.where(blob, stack * 1.25, stack)
    cortex = (white == 0) & (x >= 50) & (x < 58) & (y > 20) & (y < 40)
    stack = np.where(cortex, stack * 1.3, stack)
    inside = np.ones(shape, bool)
    smooth = ndimage.gaussian_filter(stack, sigma=(0, 1.5, 1.5))
    found = faint_hyperintensities(stack, smooth, inside, np.zeros(shape, bool), white, (3.0, 1.0, 1.0), 1.12)
    assert found[blob].mean() > 0.5  # the faint lesion's core
    assert not found[~ndimage.binary_dilation(blob, iterations=3)].any()  # not the bias field, not the cortex
    assert not faint_hyperintensities(stack, smooth, inside, np.zeros(shape, bool), white, (3.0, 1.0, 1.0), 1.3).any()


def test_own_lesions_become_labels_with_their_faint_rims_only():
    """Pseudo-labels: a confident lesion plus the bright rim next to it; not a bright patch farther away,
    not a dim neighbourhood, not what the model is unsure of."""
    from DeepWMLLib.realbg import OWN_RIM_MM, own_lesion_labels

    shape = (5, 64, 64)
    z, y, x = np.mgrid[:shape[0], :shape[1], :shape[2]]
    r = np.sqrt((y - 32.0) ** 2 + (x - 32.0) ** 2)
    stack = np.full(shape, 100.0)
    stack[r <= 7] = 118.0  # a faint rim: 1.18 x the white matter
    stack[r <= 4] = 160.0  # the bright core
    far = (np.abs(y - 10) <= 2) & (np.abs(x - 54) <= 2)
    stack[far] = 130.0  # a faint patch away from any confident lesion
    lesion = np.where(r <= 4, 0.9, 0.05)
    lesion[far] = 0.3  # unsure
    white = np.ones(shape, np.float32)
    inside = np.ones(shape, bool)
    depth = np.full(shape, 20.0)
    smooth = ndimage.gaussian_filter(stack, sigma=(0, 1.5, 1.5))
    own = own_lesion_labels(lesion, stack, smooth, inside, depth, lesion > 0.2, white, (3.0, 1.0, 1.0), 1.12)
    assert own[r <= 4].all()  # the core
    assert own[(r > 4.5) & (r <= 4 + OWN_RIM_MM - 0.5)].mean() > 0.9  # the rim next to it
    assert not own[r > 4 + OWN_RIM_MM + 0.5].any()  # nothing farther: not the faint patch, not the dim tissue
    # a dim neighbourhood is not grown into
    dim = np.where(r <= 4, 160.0, 100.0)
    own = own_lesion_labels(lesion, dim, ndimage.gaussian_filter(dim, sigma=(0, 0.3, 0.3)), inside, depth,
                            lesion > 0.2, white, (3.0, 1.0, 1.0), 1.12)
    assert own.sum() == (r <= 4).sum()


def test_synth_refuses_real_background_options_without_backgrounds(tmp_path):
    for extra in (["--own-lesions"], ["--faint-ignore", "1.12"]):
        result = subprocess.run([sys.executable, "-m", "DeepWMLLib.cli", "synth", "-n", "1", "-o", str(tmp_path / "x"),
                                 *extra], capture_output=True, text=True)
        assert result.returncode != 0 and "--backgrounds" in result.stderr
    result = subprocess.run([sys.executable, "-m", "DeepWMLLib.cli", "synth", "-n", "1", "-o", str(tmp_path / "y"),
                             "--backgrounds", str(tmp_path), "--faint-ignore", "0.9"], capture_output=True, text=True)
    assert result.returncode != 0 and "above 1" in result.stderr
