"""Normalisation is robust to lesion load and to a skull; post-processing rules do what they say."""

from __future__ import annotations

import numpy as np
import pytest

from DeepWMLLib.postprocessing import exclude_edge_slices, postprocess, remove_small_components
from DeepWMLLib.preprocessing import PreprocessingConfig, head_mask, normalise_intensity


def phantom(lesion_fraction=0.0, skull=False, scale=1.0, seed=0):
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(np.arange(20), np.arange(96), np.arange(96), indexing="ij")
    r = np.sqrt((y - 48) ** 2 + (x - 48) ** 2)
    vol = np.full(r.shape, 10.0)
    brain = r < 36
    vol[brain] = 400 + rng.normal(0, 20, brain.sum())
    if skull:
        vol[(r >= 38) & (r < 41)] = 800  # scalp fat: bright on FLAIR
        vol[(r >= 36) & (r < 38)] = 60  # bone: dark
    if lesion_fraction:
        lesion = brain & (rng.random(r.shape) < lesion_fraction)
        vol[lesion] = 900
    return vol * scale


def test_normalised_brain_level_barely_moves_with_lesion_load():
    base = normalise_intensity(phantom())
    heavy = normalise_intensity(phantom(lesion_fraction=0.05))
    brain = np.sqrt((np.arange(96)[:, None] - 48) ** 2 + (np.arange(96)[None] - 48) ** 2) < 30
    assert abs(np.median(base[:, brain]) - np.median(heavy[:, brain])) < 0.2


def test_normalised_brain_level_barely_moves_with_skull():
    stripped = normalise_intensity(phantom())
    with_skull = normalise_intensity(phantom(skull=True))
    brain = np.sqrt((np.arange(96)[:, None] - 48) ** 2 + (np.arange(96)[None] - 48) ** 2) < 30
    assert abs(np.median(stripped[:, brain]) - np.median(with_skull[:, brain])) < 0.3


def test_normalisation_is_scale_invariant_and_bounded():
    a = normalise_intensity(phantom(lesion_fraction=0.01))
    b = normalise_intensity(phantom(lesion_fraction=0.01, scale=37.5))
    assert np.allclose(a, b, atol=1e-3)
    assert a.dtype == np.float32 and a.min() >= -8 and a.max() <= 16


def test_head_mask_ignores_background():
    vol = phantom(skull=True)
    mask = head_mask(vol)
    assert not mask[:, :5, :5].any()
    assert mask[:, 48, 48].all()


def test_preprocessing_config_validation():
    assert PreprocessingConfig.from_dict({"grid_size": [128, 128], "grid_spacing_mm": None}).grid_spacing_mm is None
    with pytest.raises(ValueError):
        PreprocessingConfig.from_dict({"grid_size": [8, 8]})
    with pytest.raises(ValueError):
        PreprocessingConfig.from_dict({"colour": "blue"})


def test_small_components_removed_by_volume():
    mask = np.zeros((5, 20, 20), np.uint8)
    mask[2, 2:4, 2:4] = 1  # 4 voxels
    mask[1:4, 10:15, 10:15] = 1  # 75 voxels
    kept = remove_small_components(mask, voxel_volume_mm3=2.0, min_volume_mm3=10.0)
    assert kept[2, 2:4, 2:4].sum() == 0 and kept.sum() == 75


def test_diagonal_voxels_are_one_lesion():
    mask = np.zeros((3, 3, 3), np.uint8)
    mask[0, 0, 0] = mask[1, 1, 1] = mask[2, 2, 2] = 1  # 26-connected
    assert remove_small_components(mask, 1.0, 3.0).sum() == 3


def test_edge_slices_excluded_only_when_asked():
    mask = np.ones((10, 4, 4), np.uint8)
    assert exclude_edge_slices(mask, 0.0).sum() == 160
    out = exclude_edge_slices(mask, 0.1)
    assert out[0].sum() == 0 and out[-1].sum() == 0 and out[1:-1].all()


def test_threshold_applies():
    prob = np.linspace(0, 1, 1000, dtype=np.float32).reshape(10, 10, 10)
    assert postprocess(prob, 0.5, 1.0, 0.0).sum() == 500
    with pytest.raises(ValueError):
        postprocess(prob, 1.5, 1.0)
