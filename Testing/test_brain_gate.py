"""Brain-mask gating: lesion components mostly outside the intracranial mask are dropped; the brain
mask is a model of its own (label 1 "intracranial"), shipped or given, and can be switched off."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from DeepWMLLib.cli import main
from DeepWMLLib.errors import DeepWMLError
from DeepWMLLib.postprocessing import keep_inside, postprocess

from conftest import BRAIN_LABELS, make_volume, oracle_network, oracle_networks_with_brain, tiny_model_file


def test_keep_inside_drops_components_mostly_outside():
    mask = np.zeros((4, 20, 20), np.uint8)
    mask[1:3, 2:6, 2:6] = 1  # 32 voxels, 24 inside below
    mask[1:3, 12:16, 12:16] = 1  # 32 voxels, 8 inside below
    inside = np.zeros(mask.shape, bool)
    inside[:, :, :5] = True  # columns 2-4 of the first (3 of 4), none of the second...
    inside[1:3, 12:16, 12] = True  # ...except its first column (1 of 4)
    kept = keep_inside(mask, inside)
    assert kept[1:3, 2:6, 2:6].all() and not kept[:, 10:].any()
    assert keep_inside(mask, inside, min_fraction=0.8).sum() == 0
    assert keep_inside(mask, np.ones(mask.shape, bool)).sum() == mask.sum()
    with pytest.raises(ValueError):
        keep_inside(mask, inside[:2])
    with pytest.raises(ValueError):
        keep_inside(mask, inside, min_fraction=0)
    # In postprocess, the gate comes after the threshold and the small-component removal.
    prob = mask.astype(np.float32) * 0.9
    assert np.array_equal(postprocess(prob, 0.5, 1.0, 0.0, brain_probabilities=inside.astype(np.float32)), kept)


def two_lesion_case(folder):
    image, truth = make_volume(size=(64, 48, 8), blobs=((0.3, 0.5, 0.5, 5.0), (0.72, 0.5, 0.5, 5.0)))
    path = folder / "two.nii.gz"
    sitk.WriteImage(sitk.Cast(image, sitk.sitkUInt16), str(path))
    return path, truth


def components(array):
    from DeepWMLLib.postprocessing import label_components

    labels, count = label_components(array)
    return [labels == k for k in range(1, count + 1)]


def test_segment_drops_the_lesion_outside_the_brain_mask(tmp_path, tiny_model, monkeypatch):
    oracle_networks_with_brain(monkeypatch)
    brain_model = tiny_model_file(tmp_path / "brain.pt", labels=BRAIN_LABELS)
    path, truth = two_lesion_case(tmp_path)
    gated, plain = tmp_path / "gated", tmp_path / "plain"
    assert main(["segment", str(path), "-o", str(gated), "--model", str(tiny_model), "--device", "cpu",
                 "--brain-model", str(brain_model), "--save-brain-mask"]) == 0
    assert main(["segment", str(path), "-o", str(plain), "--model", str(tiny_model), "--device", "cpu",
                 "--no-brain-mask", "--brain-model", str(brain_model)]) == 0  # the model for the checks
    both = sitk.GetArrayFromImage(sitk.ReadImage(str(plain / "two_wmh.nii.gz")))
    one = sitk.GetArrayFromImage(sitk.ReadImage(str(gated / "two_wmh.nii.gz")))
    brain_image = sitk.ReadImage(str(gated / "two_brain.nii.gz"))
    brain = sitk.GetArrayFromImage(brain_image)
    assert brain_image.GetPixelID() == sitk.sitkUInt8 and np.allclose(brain_image.GetOrigin(), truth.GetOrigin())
    assert len(components(both)) == 2 and len(components(one)) == 1
    kept = components(one)[0]
    dropped = [c for c in components(both) if not (c & kept).any()][0]
    assert brain[kept].mean() > 0.5 > brain[dropped].mean()
    assert np.array_equal(one > 0, (both > 0) & ~dropped)
    report = json.loads((gated / "two_report.json").read_text(encoding="utf-8"))
    voxel_ml = np.prod(truth.GetSpacing()) / 1000
    assert report["brain_model"] == "brain.pt"
    assert report["outside_brain_removed_ml"] == pytest.approx(dropped.sum() * voxel_ml, abs=1e-3)
    assert report["intracranial_ml"] == pytest.approx(brain.sum() * voxel_ml, abs=1e-2)
    ungated = json.loads((plain / "two_report.json").read_text(encoding="utf-8"))
    assert report["brain_mask"] == "gates the marks" and ungated["brain_mask"] == "not applied to the marks"
    assert ungated["brain_model"] == "brain.pt" and ungated["outside_brain_removed_ml"] == 0
    assert ungated["intracranial_ml"] == report["intracranial_ml"]  # the brain mask still read: the same one
    assert set(ungated["contrast"]) == set(report["contrast"])  # the FLAIR check ran


def test_models_of_the_wrong_kind_are_refused_in_one_line(tmp_path, tiny_model):
    from DeepWMLLib.segment import load_brain_model, load_models

    brain_model = tiny_model_file(tmp_path / "brain.pt", labels=BRAIN_LABELS)
    with pytest.raises(DeepWMLError, match="brain-mask model, not a WMH model"):
        load_models([brain_model])
    with pytest.raises(DeepWMLError, match="not a brain-mask model"):
        load_brain_model(str(tiny_model))
    assert load_brain_model(None) is None
    path, _ = two_lesion_case(tmp_path)
    # the brain mask is made with --no-brain-mask too (for the checks), so it can be written
    assert main(["segment", str(path), "-o", str(tmp_path / "o"), "--model", str(tiny_model), "--device", "cpu",
                 "--no-brain-mask", "--save-brain-mask", "--brain-model", str(brain_model)]) == 0
    assert (tmp_path / "o" / "two_brain.nii.gz").exists()


def test_a_brain_model_given_as_true_or_as_no_path_is_understood_or_refused_in_one_line(tiny_model):
    """brain_model=True (as False is none) is the shipped brain-mask model, not a TypeError from inside pathlib; a
    model given as something other than a path is refused saying how to give one, as in load_models."""
    from DeepWMLLib.segment import (VENTRICLE_ROLE, default_role_model_path, load_brain_model, load_models,
                                    load_ventricle_model)

    shipped = load_brain_model("default")
    assert shipped is not None and load_brain_model(True).digest == shipped.digest
    assert load_brain_model(False) is None and load_ventricle_model(False) is None
    assert (load_ventricle_model(True) is None) == (default_role_model_path(VENTRICLE_ROLE) is None)
    for given in (1, 2.5, {"path": str(tiny_model)}):
        with pytest.raises(DeepWMLError, match="a model is given by its file \\(a path: str or pathlib.Path\\)"):
            load_brain_model(given)
    with pytest.raises(DeepWMLError, match="got a int"):
        load_models([str(tiny_model), 7])


def test_brain_model_runs_on_its_own_grid(tmp_path, tiny_model):
    """A brain network with a coarser grid than the WMH network: both maps come back on the input grid."""
    from DeepWMLLib.inference import predict_maps, predict_probabilities
    from DeepWMLLib.segment import load_brain_model, load_models

    brain = load_brain_model(str(tiny_model_file(tmp_path / "b.pt", grid=(32, 32), spacing_mm=2.0, labels=BRAIN_LABELS)))
    image, _ = make_volume(size=(40, 36, 5))
    models = load_models([tiny_model])
    lesion, brain_map, _, frame = predict_maps(image, models, brain, "cpu")
    alone, _ = predict_probabilities(image, models, "cpu")
    assert brain_map.shape == lesion.shape == alone.shape
    assert np.allclose(lesion, alone, atol=1e-6)  # the brain network does not touch the WMH map
    assert 0 <= brain_map.min() and brain_map.max() <= 1 and brain_map.std() > 0


def test_one_pass_filter_equals_size_then_brain_filter_on_random_masks():
    """filter_components (one labelling) = small-component removal, then the brain rule, and the
    removed count is what the brain rule took away."""
    from DeepWMLLib.postprocessing import filter_components, label_components, remove_small_components

    rng = np.random.default_rng(3)
    for _ in range(30):
        mask = (rng.random((6, 24, 24)) < rng.uniform(0.05, 0.3)).astype(np.uint8)
        brain = rng.random(mask.shape).astype(np.float32)
        small = remove_small_components(mask, 1.0, 3.0)
        labels, count = label_components(small)
        expected = np.zeros_like(small)
        for k in range(1, count + 1):
            part = labels == k
            if (brain[part] >= 0.5).mean() >= 0.5:
                expected[part] = 1
        got, removed = filter_components(mask, 1.0, 3.0, brain, inside_level=0.5)
        assert np.array_equal(got, expected)
        assert removed == int(small.sum() - expected.sum())
        gated, n = postprocess(mask.astype(np.float32), 0.5, 1.0, 3.0, brain_probabilities=brain, return_removed=True)
        assert np.array_equal(gated, expected) and n == removed


@pytest.mark.parametrize("brain_found, warned", [("nothing", True), ("head", False)])
def test_a_brain_mask_that_finds_no_brain_is_reported(tmp_path, tiny_model, monkeypatch, brain_found, warned):
    """A brain mask far smaller than the head (a failure on an unusual scan) drops every lesion: the
    report and the command line then say so; a brain mask like the head raises nothing."""
    from DeepWMLLib.segment import load_brain_model, load_models, segment_image

    oracle_network(monkeypatch, brain=brain_found)
    image, _ = make_volume(size=(64, 48, 8), blobs=((0.4, 0.5, 0.5, 5.0),))
    brain = load_brain_model(str(tiny_model_file(tmp_path / "brain.pt", labels=BRAIN_LABELS)))
    result = segment_image(image, load_models([tiny_model]), "cpu", brain_model=brain)
    messages = [w for w in result.report["warnings"] if "brain mask" in w]
    assert bool(messages) == warned
    if warned:
        assert result.report["volume_ml"] == 0 and result.report["outside_brain_removed_ml"] > 0
        assert "--no-brain-mask" in messages[0]
    else:
        assert result.report["lesion_count"] == 1


@pytest.mark.parametrize("radius_mm, warned", [(5.0, False), (14.0, True)])
def test_a_lesion_load_no_flair_gives_is_questioned(tmp_path, tiny_model, monkeypatch, radius_mm, warned):
    """More than 5 % of the intracranial volume marked (a T2 series, whose CSF is bright, got 8.9 %;
    real FLAIRs at most 1.6 %): a warning that asks to check the input is a FLAIR. Smaller: none."""
    from DeepWMLLib.segment import IMPLAUSIBLE_LOAD, load_brain_model, load_models, segment_image

    oracle_network(monkeypatch, brain="head")
    image, _ = make_volume(size=(64, 48, 8), blobs=((0.5, 0.5, 0.5, radius_mm),))
    brain = load_brain_model(str(tiny_model_file(tmp_path / "brain.pt", labels=BRAIN_LABELS)))
    report = segment_image(image, load_models([tiny_model]), "cpu", brain_model=brain).report
    load = report["volume_ml"] / report["intracranial_ml"]
    assert (load > IMPLAUSIBLE_LOAD) is warned
    messages = [w for w in report["warnings"] if "of the intracranial volume" in w]
    assert bool(messages) == warned
    if warned:
        assert "check that the input is a FLAIR" in messages[0] and f"{load:.1%}" in messages[0]


def test_a_failed_brain_mask_with_no_brain_mask_says_so_without_a_lesion_load(tmp_path, tiny_model, monkeypatch):
    """--no-brain-mask on a scan whose brain mask finds nothing (a probability map of an earlier run, measured: 0 ml):
    the marks are kept, the brain mask's failure is said, and no lesion load is made of a share of 0 ml (it was
    "28632900000.0% of the intracranial volume")."""
    from DeepWMLLib.segment import load_brain_model, load_models, segment_image

    oracle_network(monkeypatch, brain="nothing")
    image, _ = make_volume(size=(64, 48, 8), blobs=((0.5, 0.5, 0.5, 8.0),))
    brain = load_brain_model(str(tiny_model_file(tmp_path / "brain.pt", labels=BRAIN_LABELS)))
    report = segment_image(image, load_models([tiny_model]), "cpu", brain_model=brain, brain_gate=False).report
    assert report["volume_ml"] > 0 and report["intracranial_ml"] == 0 and report["brain_mask"] == "not applied to the marks"
    assert any("the brain mask covers 0% of the head mask" in w and "not applied to the marks" in w
               for w in report["warnings"]), report["warnings"]
    assert not any("of the intracranial volume" in w for w in report["warnings"]), report["warnings"]
