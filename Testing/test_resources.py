"""Resources: GPU out-of-memory falls back, memory stays bounded, any grid comes back unchanged."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from DeepWMLLib import inference, io
from DeepWMLLib.errors import DeepWMLError
from DeepWMLLib.inference import MIN_INPLANE_PIXELS
from DeepWMLLib.segment import load_models, segment_image

from conftest import make_volume, rotation, tiny_model_file


class FakeOOM(Exception):
    pass


class GreedyRunner:
    """A runner that 'runs out of GPU memory' above a batch size, like a small GPU would."""

    out_of_memory = (FakeOOM,)

    def __init__(self, limit: int):
        self.limit = limit
        self.released = 0
        self.loaded = None

    def release_memory(self):
        self.released += 1

    def __call__(self, batch):
        if batch.shape[0] > self.limit:
            raise FakeOOM()
        return batch * 2.0


def test_out_of_memory_halves_the_batch():
    slices = np.random.default_rng(0).normal(size=(10, 16, 16)).astype(np.float32)
    runner = GreedyRunner(limit=2)
    with pytest.warns(UserWarning, match="batch size reduced"):
        out = inference.predict_network_slices(slices, runner, batch_size=8)
    assert np.allclose(out, 1 / (1 + np.exp(-2 * slices)), atol=1e-6)
    assert runner.released == 2  # 8 -> 4 -> 2


def test_out_of_memory_at_one_slice_moves_to_cpu(tmp_path, monkeypatch):
    (loaded,) = load_models([tiny_model_file(tmp_path / "m.pt")])
    runner = GreedyRunner(limit=0)
    runner.loaded = loaded
    slices = np.zeros((3, 64, 64), np.float32)
    with pytest.warns(UserWarning, match="continuing on the CPU"):
        out = inference.predict_network_slices(slices, runner, batch_size=1)
    cpu = inference.predict_network_slices(slices, inference.TorchRunner(loaded, "cpu"), batch_size=1)
    assert np.allclose(out, cpu)


def test_memory_bounded_for_a_large_matrix(tmp_path):
    """A 1024×1024×40 volume (160 MB as float32) whose every voxel the untrained model calls lesion
    (the worst case for labelling and the report) stays within a bounded multiple of its size
    (measured: 2.7 GB peak for the whole CLI process, dominated by whole-volume label/probability arrays)."""
    image, _ = make_volume(size=(1024, 1024, 40), spacing=(0.25, 0.25, 4.0), blobs=((0.5, 0.5, 0.5, 6.0),))
    path = tmp_path / "big.nii.gz"
    sitk.WriteImage(sitk.Cast(image, sitk.sitkUInt16), str(path))
    model = tiny_model_file(tmp_path / "m.pt")
    # The child's own peak: VmHWM of its address space. Its ru_maxrss would also count the memory of
    # this pytest worker at the fork (Linux charges it at exec), which grows with the runners and
    # models earlier tests left in the worker.
    code = (
        "import re, sys\n"
        "from DeepWMLLib.cli import main\n"
        f"code = main(['segment', {str(path)!r}, '-o', {str(tmp_path / 'o')!r}, '--model', {str(model)!r}, '--device', 'cpu'])\n"
        "print(int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)) // 1024)\n"
        "sys.exit(code)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=600)
    assert proc.returncode == 0, proc.stderr[-1000:]
    peak_mb = int(proc.stdout.strip().splitlines()[-1])
    assert peak_mb < 3500, f"peak {peak_mb} MB"


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    return load_models([tiny_model_file(tmp_path_factory.mktemp("m") / "m.pt")])


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    angles=st.tuples(*[st.floats(-np.pi, np.pi) for _ in range(3)]),
    spacing=st.tuples(*[st.floats(0.3, 8.0) for _ in range(3)]),
    size=st.tuples(st.integers(8, 40), st.integers(8, 40), st.integers(1, 12)),
    flip=st.booleans(),
    origin=st.tuples(*[st.floats(-500, 500) for _ in range(3)]),
)
def test_output_grid_always_equals_input_grid(tiny_models, angles, spacing, size, flip, origin):
    direction = rotation(*angles) @ (np.diag([-1.0, 1.0, 1.0]) if flip else np.eye(3))
    image, _ = make_volume(size=size, spacing=spacing, direction=direction, origin=origin, blobs=((0.5, 0.5, 0.5, 1.0),))
    stack, _ = io.to_axial_stack(image)
    if min(stack.shape[1:]) < MIN_INPLANE_PIXELS:  # a slab of one to three slices tilted so far it is not axial
        with pytest.raises(DeepWMLError, match="too narrow to segment"):
            segment_image(image, tiny_models, device="cpu")
        return
    result = segment_image(image, tiny_models, device="cpu")
    assert io.grid_difference(result.mask, image) is None
    assert io.grid_difference(result.probabilities, image) is None
    assert result.mask.GetSize() == image.GetSize()
    prob = sitk.GetArrayViewFromImage(result.probabilities)
    assert np.isfinite(prob).all() and prob.min() >= 0 and prob.max() <= 1


def test_three_hundred_slices_go_through(tiny_models):
    """A 300-slice (1 mm, 3D-acquired) volume is segmented slice-wise in chunks, every slice reported."""
    image, _ = make_volume(size=(48, 48, 300), spacing=(1.0, 1.0, 1.0))
    result = segment_image(image, tiny_models, device="cpu")
    assert io.grid_difference(result.mask, image) is None
    assert len(result.report["slices"]) == 300
