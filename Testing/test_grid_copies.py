"""Testing/benchmarks/grid_copies.py: a model file copied onto another network grid keeps its weights."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "benchmarks"))

from grid_copies import grid_copy  # noqa: E402
from DeepWMLLib.checkpoint import load_model, save_model  # noqa: E402
from DeepWMLLib.errors import DeepWMLError  # noqa: E402
from DeepWMLLib.model import build_model  # noqa: E402
from DeepWMLLib.preprocessing import PreprocessingConfig  # noqa: E402


def test_a_copy_runs_on_the_new_grid_with_the_same_weights(tmp_path):
    config = {"base_channels": 4, "depth": 2, "batch_norm": True}
    source = save_model(tmp_path / "m.pt", build_model(config), config, PreprocessingConfig())
    copy = grid_copy(source, tmp_path, 0.8, 288)
    assert copy.name == "m_g80.pt"
    a, b = load_model(source), load_model(copy)
    assert (b.preprocessing.grid_size, b.preprocessing.grid_spacing_mm) == ((288, 288), 0.8)
    assert b.preprocessing.normalisation == a.preprocessing.normalisation
    assert all(torch.equal(a.model.state_dict()[k], v) for k, v in b.model.state_dict().items())
    assert "m.pt on a 288x288 grid of 0.8 mm" in b.provenance["grid_copy"]
    with pytest.raises(DeepWMLError):  # a grid the network cannot take is refused when loaded
        load_model(grid_copy(source, tmp_path / "", 0.9, 250))
