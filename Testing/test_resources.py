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


class FullGPU(inference.TorchRunner):
    """A PyTorch runner on a second device ("meta" stands in for the GPU) with no memory left at all."""

    def __init__(self, loaded, device="meta", precision="auto"):
        super().__init__(loaded, device, precision)
        self.out_of_memory = (FakeOOM,)

    def release_memory(self):
        pass

    def __call__(self, batch):
        raise FakeOOM()


def test_cpu_fallback_runs_its_own_copy_of_the_network_at_the_asked_precision(tmp_path, monkeypatch):
    """After a GPU out-of-memory at one slice the CPU runner has a network of its own: the GPU runner's
    stays on its device for the next block and case (runners are kept in _RUNNERS). The fallback keeps
    the asked precision, and the report's runner says the CPU ran."""
    (loaded,) = load_models([tiny_model_file(tmp_path / "m.pt")])
    slices = np.random.default_rng(0).normal(size=(3, 64, 64)).astype(np.float32)
    cpu = inference.TorchRunner(loaded, "cpu", "fp32")
    expected = inference.predict_network_slices(slices, cpu, batch_size=1)
    gpu = FullGPU(loaded, precision="fp32")
    assert gpu.model is not cpu.model and next(cpu.model.parameters()).device.type == "cpu"
    ran = []
    with pytest.warns(UserWarning, match="continuing on the CPU"):
        out = inference.predict_network_slices(slices, gpu, batch_size=1, ran=ran)
    assert np.allclose(out, expected, atol=1e-6)  # fp32 as asked, not bf16 (CPUs with native bf16 would take that)
    assert ran == [f"torch ({inference.CPU_FALLBACK})"]
    assert next(gpu.model.parameters()).device.type == "meta"  # the GPU runner's network did not move
    assert np.allclose(inference.predict_network_slices(slices, cpu, batch_size=1), expected)

    monkeypatch.setattr(inference, "make_runner", lambda m, device, backend, precision: FullGPU(m, precision=precision))
    facts = {}
    image, _ = make_volume(size=(40, 36, 3))
    with pytest.warns(UserWarning, match="continuing on the CPU"):
        inference.predict_maps(image, [loaded], None, "cpu", 1, facts=facts, precision="fp32")
    assert facts["runner"] == f"torch ({inference.CPU_FALLBACK})"


def test_report_names_every_runtime_that_ran(tmp_path):
    """An ensemble whose members ran on different runtimes (a model file with ONNX Runtime or
    OpenVINO, an in-memory copy with PyTorch) names them all; one runtime stays one name."""
    from DeepWMLLib.checkpoint import LoadedModel

    pytest.importorskip("onnxruntime")
    (loaded,) = load_models([tiny_model_file(tmp_path / "m.pt")])
    copy = LoadedModel(loaded.config, loaded.preprocessing, loaded.threshold, loaded.labels, {}, model=loaded.model)
    image, _ = make_volume(size=(40, 36, 3))
    facts = {}
    inference.predict_maps(image, [loaded, copy], None, "cpu", facts=facts, precision="fp32")
    names = facts["runner"].split(", ")
    assert len(names) == 2 and names[0].split()[0] in ("openvino", "onnxruntime") and names[1] == "torch"
    facts = {}
    inference.predict_maps(image, [loaded, loaded], None, "cpu", facts=facts, backend="torch", precision="fp32")
    assert facts["runner"] == "torch"


def _stop_after(calls: int):
    """A cancel check that stops a run after `calls` checks (an endless loop ends as Cancelled)."""
    count = iter(range(calls))
    return lambda: next(count, None) is None


@pytest.mark.parametrize("batch_size", [-1, 0, 2.5, True])
def test_batch_size_must_be_a_positive_whole_number(tmp_path, batch_size):
    """A batch size of 0 is not the default and a negative one does not loop for ever: both refused."""
    (loaded,) = load_models([tiny_model_file(tmp_path / "m.pt")])
    image, _ = make_volume(size=(40, 36, 3))
    with pytest.raises(DeepWMLError, match="batch size must be a positive whole number"):
        segment_image(image, [loaded], "cpu", batch_size=batch_size, backend="torch", brain_model=None,
                      ventricle_model=None, cancel=_stop_after(1000))
    with pytest.raises(DeepWMLError, match="batch size must be a positive whole number"):
        inference.predict_network_slices(np.zeros((3, 64, 64), np.float32), inference.TorchRunner(loaded, "cpu"),
                                         batch_size, cancel=_stop_after(1000))


@pytest.mark.parametrize("settings,words", [
    ({"exclude_edge_fraction": 0.5}, "exclude_edge_fraction must be in [0, 0.5), got 0.5"),
    ({"exclude_edge_fraction": -0.1}, "exclude_edge_fraction must be in [0, 0.5), got -0.1"),
    ({"min_lesion_mm3": -1.0}, "min_lesion_mm3 must be a number of mm³ >= 0"),
    ({"models": []}, "models is empty"),
])
def test_python_api_refuses_bad_settings_clearly(tmp_path, settings, words):
    """segment_image's own checks: a DeepWMLError saying what is wrong, before any network runs (an
    empty list of models is not the default model)."""
    (loaded,) = load_models([tiny_model_file(tmp_path / "m.pt")])
    image, _ = make_volume(size=(40, 36, 3))
    arguments = {"models": [loaded], "device": "cpu", "brain_model": None, "ventricle_model": None,
                 "cancel": lambda: True, **settings}
    with pytest.raises(DeepWMLError) as info:
        segment_image(image, **arguments)
    assert words in str(info.value)


def test_python_api_takes_model_files_as_paths(tmp_path):
    """models may name model files (str or Path, alone or in a list, mixed with loaded models)."""
    path = tiny_model_file(tmp_path / "m.pt")
    (loaded,) = load_models([path])
    image, _ = make_volume(size=(40, 36, 3))
    expected = segment_image(image, [loaded], "cpu", brain_model=None, ventricle_model=None)
    for models in ([str(path)], path, [path, loaded]):
        result = segment_image(image, models, "cpu", brain_model=None, ventricle_model=None)
        assert result.report["model"] == ["m.pt"] * (2 if isinstance(models, list) and len(models) == 2 else 1)
        assert np.array_equal(sitk.GetArrayViewFromImage(result.mask), sitk.GetArrayViewFromImage(expected.mask))
    with pytest.raises(DeepWMLError, match="models must be model files or loaded models"):
        segment_image(image, [42], "cpu", brain_model=None, ventricle_model=None)


def test_an_unwritable_cache_costs_the_export_not_the_run(tmp_path, monkeypatch):
    """--backend onnx (or openvino) with a cache folder that cannot be written: the network is exported
    into a folder of the process (removed at its end), with a warning that names the cache."""
    pytest.importorskip("onnxruntime")
    blocked = tmp_path / "a file"
    blocked.write_text("not a folder")
    monkeypatch.setenv("DEEPWML_CACHE_DIR", str(blocked / "cache"))  # under a file: unwritable even for root
    (loaded,) = load_models([tiny_model_file(tmp_path / "m.pt")])
    image, _ = make_volume(size=(40, 36, 3))
    with pytest.warns(UserWarning, match=r"model cache .*a file/cache cannot be written"):
        maps = inference.predict_maps(image, [loaded], None, "cpu", backend="onnx", precision="fp32")
    assert np.isfinite(maps[0]).all()
    folder = inference._PROCESS_FOLDER
    assert folder is not None and (folder / f"{loaded.digest}.onnx").is_file()
    inference.remove_process_folder()
    assert not folder.exists()


def test_the_cache_follows_xdg_cache_home(monkeypatch, tmp_path):
    from DeepWMLLib.checkpoint import cache_dir

    monkeypatch.delenv("DEEPWML_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "deepwml"
    monkeypatch.setenv("DEEPWML_CACHE_DIR", str(tmp_path / "own"))
    assert cache_dir() == tmp_path / "own"


def test_two_threads_on_a_models_first_use_build_one_runner_and_agree(tmp_path, monkeypatch):
    """The first use of a model exports it (torch.onnx.export is not thread-safe): two segmentations started
    together in threads (a script, two Slicer jobs) must run on the same runtime and give the same masks."""
    import threading
    import warnings

    monkeypatch.setenv("DEEPWML_CACHE_DIR", str(tmp_path / "fresh cache"))
    (loaded,) = load_models([tiny_model_file(tmp_path / "m.pt")])
    image, _ = make_volume(size=(40, 36, 4))
    results, facts = {}, {0: {}, 1: {}}
    barrier = threading.Barrier(2)

    def run(k):
        barrier.wait()
        results[k] = inference.predict_maps(image, [loaded], None, "cpu", facts=facts[k], precision="fp32")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        threads = [threading.Thread(target=run, args=(k,)) for k in (0, 1)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert not [w for w in caught if "unavailable" in str(w.message)]
    assert facts[0]["runner"] == facts[1]["runner"]
    np.testing.assert_array_equal(results[0][0], results[1][0])


def test_library_calls_take_what_a_script_naturally_passes(tmp_path):
    from DeepWMLLib.evaluation import evaluate_case
    from DeepWMLLib.volume import Volume

    path = tiny_model_file(tmp_path / "m.pt")
    assert [m.digest for m in load_models(str(path))] == [m.digest for m in load_models([path])]  # one path
    image, truth = make_volume(size=(40, 36, 4))
    with pytest.raises(DeepWMLError, match="not an image: pass a SimpleITK image"):
        segment_image(sitk.GetArrayFromImage(image), load_models([path]))
    as_volume = Volume(sitk.GetArrayFromImage(truth), truth.GetSpacing(), truth.GetOrigin(), truth.GetDirection())
    assert evaluate_case(as_volume, truth)["dice"] == 1.0  # what segment_image returns for a Volume input
