"""The Tent experiment (Testing/benchmarks/adapt_entropy.py): its entropy, and that only the batch-norm
scales and shifts move, towards more certain predictions."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "benchmarks"))

from adapt_entropy import binary_entropy, mean_entropy, minimise_entropy  # noqa: E402
from DeepWMLLib.model import build_model  # noqa: E402


def test_entropy_from_logits_is_the_binary_entropy_of_the_probabilities():
    z = torch.tensor([-30.0, -3.0, -0.5, 0.0, 0.7, 4.0, 30.0])
    p = torch.sigmoid(z).double()
    direct = -(p * p.clamp_min(1e-300).log() + (1 - p) * (1 - p).clamp_min(1e-300).log())
    assert torch.allclose(binary_entropy(z).double(), direct.mean(), atol=1e-6)
    assert abs(float(binary_entropy(torch.zeros(3))) - np.log(2)) < 1e-6  # p = 0.5: the most uncertain


def test_only_batch_norm_scales_and_shifts_move_and_the_entropy_falls():
    torch.manual_seed(0)
    model = build_model({"base_channels": 4, "depth": 2, "batch_norm": True}).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    crops = np.random.default_rng(0).normal(size=(32, 32, 32)).astype(np.float32)
    start = mean_entropy(model, crops)
    minimise_entropy(model, crops, epochs=3, lr=1e-2, batch_size=8, log=lambda *_: None)
    assert mean_entropy(model, crops) < start
    after = model.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    bn = {name for name, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert moved and moved <= {f"{n}.weight" for n in bn} | {f"{n}.bias" for n in bn}
    assert not any(p.requires_grad for p in model.parameters())  # frozen again for inference
