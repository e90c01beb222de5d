"""Precision auto where the CPU computes bf16 natively: bf16 only where it is measured faster than fp32 here
(inference.bf16_is_faster), measured once per runtime, CPU, thread count and network shape, and kept in the cache."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest


@pytest.fixture
def fresh_choices(tmp_path, monkeypatch):
    from DeepWMLLib import inference

    monkeypatch.setenv("DEEPWML_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(inference, "_BF16_CHOICES", {})
    return tmp_path / "cache" / "precision"


def _loaded(tiny_model):
    from DeepWMLLib.segment import load_models

    (loaded,) = load_models([tiny_model])
    return loaded


def _runs(fp32_s, bf16_s, calls):
    def run(name, seconds):
        def go(x):
            calls.append((name, x.shape, x.dtype))
            time.sleep(seconds)
        return go
    return {"fp32": run("fp32", fp32_s), "bf16": run("bf16", bf16_s)}


def test_bf16_kept_only_where_clearly_faster_and_the_answer_cached(tiny_model, fresh_choices, monkeypatch):
    from DeepWMLLib import inference

    loaded = _loaded(tiny_model)
    calls = []
    # bf16 slower (the Xeon without AMX of session 51): fp32
    assert inference.bf16_is_faster("openvino", "1.0", loaded, 2, _runs(0.004, 0.02, calls)) is False
    assert len(calls) == 2 * (inference._BF16_ROUNDS + 1)  # one warm-up run each, then alternating rounds
    assert {shape for _, shape, _ in calls} == {(1, 1, *loaded.preprocessing.grid_size)}
    assert {dtype for _, _, dtype in calls} == {np.dtype(np.float32)}
    (memo,) = fresh_choices.glob("openvino-*-2t-*.json")
    record = json.loads(memo.read_text())
    assert record["bf16"] is False and record["fp32_ms"] < record["bf16_ms"]
    assert record["runtime"] == "openvino 1.0" and record["threads"] == 2
    # asked again (this process, then a fresh one reading the cache): not timed again
    calls.clear()
    assert inference.bf16_is_faster("openvino", "1.0", loaded, 2, _runs(0.02, 0.001, calls)) is False
    monkeypatch.setattr(inference, "_BF16_CHOICES", {})
    assert inference.bf16_is_faster("openvino", "1.0", loaded, 2, _runs(0.02, 0.001, calls)) is False
    assert calls == []
    # another runtime version, thread count or runtime is another measurement
    assert inference.bf16_is_faster("openvino", "2.0", loaded, 2, _runs(0.02, 0.001, calls)) is True
    assert inference.bf16_is_faster("openvino", "1.0", loaded, 1, _runs(0.02, 0.001, calls)) is True
    assert inference.bf16_is_faster("torch", "1.0", loaded, 2, _runs(0.02, 0.001, calls)) is True
    assert len(list(fresh_choices.glob("*.json"))) == 4
    assert not list(fresh_choices.glob("*.part"))


def test_bf16_needs_a_clear_margin(tiny_model, fresh_choices):
    """bf16 rounds (masks against fp32's Dice 0.99-1.0): a gain under BF16_FASTER_BY keeps fp32."""
    from DeepWMLLib import inference

    loaded = _loaded(tiny_model)
    assert inference.BF16_FASTER_BY >= 1.1
    assert inference.bf16_is_faster("torch", "a", loaded, 2, _runs(0.021, 0.020, [])) is False  # 5 % faster
    assert inference.bf16_is_faster("torch", "b", loaded, 2, _runs(0.030, 0.010, [])) is True  # 3x faster


def test_one_answer_per_network_shape_not_per_file(tiny_model, tmp_path, fresh_choices):
    """An ensemble's members (same settings, other weights) share one measurement; another grid is measured again."""
    from DeepWMLLib import inference
    from conftest import tiny_model_file

    calls = []
    inference.bf16_is_faster("torch", "1", _loaded(tiny_model), 2, _runs(0.001, 0.001, calls))
    first = len(calls)
    inference.bf16_is_faster("torch", "1", _loaded(tiny_model_file(tmp_path / "seed1.pt", seed=1)), 2,
                             _runs(0.001, 0.001, calls))
    assert len(calls) == first
    other = _loaded(tiny_model_file(tmp_path / "wide.pt", grid=(96, 96)))
    inference.bf16_is_faster("torch", "1", other, 2, _runs(0.001, 0.001, calls))
    assert len(calls) == 2 * first
    assert {shape for _, shape, _ in calls[first:]} == {(1, 1, 96, 96)}


def test_a_damaged_or_unwritable_cache_costs_the_timing_not_the_run(tiny_model, fresh_choices, monkeypatch):
    from DeepWMLLib import inference

    loaded = _loaded(tiny_model)
    assert inference.bf16_is_faster("torch", "1", loaded, 2, _runs(0.001, 0.02, [])) is False
    (memo,) = fresh_choices.glob("*.json")
    for damaged in ("{", '{"bf16": "yes"}', "[]", ""):
        memo.write_text(damaged)
        monkeypatch.setattr(inference, "_BF16_CHOICES", {})
        calls = []
        assert inference.bf16_is_faster("torch", "1", loaded, 2, _runs(0.02, 0.001, calls)) is True
        assert calls  # measured again
        assert json.loads(memo.read_text())["bf16"] is True  # and the damaged answer replaced
    # a cache folder that is a file: answered, nothing written
    monkeypatch.setattr(inference, "_BF16_CHOICES", {})
    memo.unlink()
    fresh_choices.rmdir()
    fresh_choices.write_text("not a folder")
    assert inference.bf16_is_faster("torch", "1", loaded, 2, _runs(0.02, 0.001, [])) is True
    assert fresh_choices.read_text() == "not a folder"


@pytest.mark.parametrize("faster", [True, False])
def test_runners_follow_the_measurement_where_bf16_is_native(tiny_model, fresh_choices, monkeypatch, faster):
    """OpenVINO and PyTorch with precision auto on a CPU with native bf16 run in the precision measured faster,
    with both precisions' runs handed to the measurement; fp32 and bf16 asked for are not measured."""
    from DeepWMLLib import inference

    pytest.importorskip("openvino")
    loaded = _loaded(tiny_model)
    if not inference._openvino_computes_bf16(inference._openvino_core()):  # compiled in fp32 on a CPU without it
        compile_ = inference.OpenVinoRunner._compile
        monkeypatch.setattr(inference.OpenVinoRunner, "_compile", staticmethod(
            lambda core, path, precision, threads: compile_(core, path, "fp32", threads)))
    monkeypatch.setattr(inference, "_openvino_computes_bf16", lambda core: True)
    monkeypatch.setattr(inference, "torch_cpu_has_native_bf16", lambda: True)
    asked, ran = [], {}
    x = np.random.default_rng(0).normal(size=(1, 1, *loaded.preprocessing.grid_size)).astype(np.float32)

    def measured(runtime, version, given, threads, run):
        outputs = {name: run[name](x) for name in ("fp32", "bf16")}
        if runtime == "openvino":  # an infer request's results, its buffers reused by its next run
            outputs = {name: np.array(out[0], copy=True) for name, out in outputs.items()}
        asked.append((runtime, given is loaded, threads))
        ran[runtime] = outputs
        if runtime == "torch":
            assert all(out.shape == (1, 1, *given.preprocessing.grid_size) for out in outputs.values())
        return faster

    monkeypatch.setattr(inference, "bf16_is_faster", measured)
    auto = inference.OpenVinoRunner(loaded, "auto")
    assert auto.name == ("openvino bf16" if faster else "openvino fp32") and auto.precision in auto.name
    torch_auto = inference.TorchRunner(loaded, "cpu", "auto")
    assert torch_auto.name == ("torch bf16" if faster else "torch") and torch_auto.bf16 is faster
    assert [a[:2] for a in asked] == [("openvino", True), ("torch", True)]
    assert auto(x).shape == torch_auto(x).shape == (1, 1, *loaded.preprocessing.grid_size)
    # each run handed to the measurement computes in its precision, and the runner keeps the one chosen (where bf16
    # is not native here the OpenVINO networks are all fp32, and these hold trivially)
    chosen = "bf16" if faster else "fp32"
    references = {"openvino": {name: inference.OpenVinoRunner(loaded, name)(x) for name in ("fp32", "bf16")},
                  "torch": {name: inference.TorchRunner(loaded, "cpu", name)(x) for name in ("fp32", "bf16")}}
    for runtime, runner in (("openvino", auto), ("torch", torch_auto)):
        for name in ("fp32", "bf16"):
            assert np.allclose(ran[runtime][name], references[runtime][name], rtol=0, atol=1e-5), (runtime, name)
        assert np.allclose(runner(x), references[runtime][chosen], rtol=0, atol=1e-5), runtime
    asked.clear()
    assert inference.OpenVinoRunner(loaded, "fp32").name == "openvino fp32"
    assert inference.TorchRunner(loaded, "cpu", "fp32").name == "torch"
    assert inference.TorchRunner(loaded, "cpu", "bf16").name == "torch bf16"
    assert asked == []


def test_no_measurement_where_bf16_is_not_native(tiny_model, fresh_choices, monkeypatch):
    from DeepWMLLib import inference

    loaded = _loaded(tiny_model)
    monkeypatch.setattr(inference, "torch_cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(inference, "bf16_is_faster", lambda *a: pytest.fail("measured without native bf16"))
    assert inference.TorchRunner(loaded, "cpu", "auto").name == "torch"
    if pytest.importorskip("openvino"):
        monkeypatch.setattr(inference, "_openvino_computes_bf16", lambda core: False)
        assert inference.OpenVinoRunner(loaded, "auto").name == "openvino fp32"


def test_bench_says_what_precision_auto_measured_and_chose(tmp_path, tiny_model, fresh_choices, monkeypatch):
    """deepwml bench names auto's choice with the two timings behind it; nothing where nothing was measured."""
    import SimpleITK as sitk

    from conftest import make_volume
    from DeepWMLLib import inference
    from DeepWMLLib.bench import format_table, run_benchmark

    image, _ = make_volume(size=(48, 40, 8))
    path = tmp_path / "flair.nii.gz"
    sitk.WriteImage(image, str(path), True)
    monkeypatch.setattr(inference, "torch_cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(inference, "bf16_is_faster", lambda *measure: False)
    monkeypatch.setattr(inference, "_RUNNERS", {})  # runners built here (holding this test's record) are not kept
    record = {"bf16": False, "fp32_ms": 71.2, "bf16_ms": 129.0, "runtime": "torch x", "threads": 1,
              "faster_by_needed": 1.15}
    # the brain-mask network, on its own grid, has a record of its own: the row is the WMH network's (the bench's
    # loop over the networks' runners left the last one, the brain's, in the name the row was read from)
    from conftest import tiny_model_file

    brain = tiny_model_file(tmp_path / "brain.pt", grid=(32, 32), spacing_mm=2.0,
                            labels={"0": "background", "1": "intracranial"})
    brains = {"bf16": False, "fp32_ms": 2.1, "bf16_ms": 2.9, "runtime": "torch x", "threads": 1,
              "faster_by_needed": 1.15}
    monkeypatch.setattr(inference, "bf16_measured", lambda runtime, version, given, threads: (
        brains if tuple(given.preprocessing.grid_size) == (32, 32) else record))
    result = run_benchmark(str(path), [str(tiny_model)], slices=4, repeat=1, threads=1, brain_model=str(brain),
                           backend="torch")
    assert result["runner"] == "torch"
    assert result["precision_auto_ms"] == {"fp32": 71.2, "bf16": 129.0, "faster_by_needed": 1.15}
    row = next(line for line in format_table(result).splitlines() if "precision auto chose" in line)
    assert row.split("chose")[1].split()[0] == "fp32:"
    assert "129 ms in bf16, 71.2 ms in fp32" in row and "1.15x faster" in row
    assert "precision auto" not in format_table({**result, "precision_auto_ms": None})  # fp32 or bf16 asked
    # a cache record of another form (edited, or an earlier version's) gives no row rather than a wrong one
    from DeepWMLLib.bench import _precision_measured

    class Runner:
        measured = None

    for damaged in (None, [], {"bf16": False}, {**record, "fp32_ms": "71"}, {**record, "bf16_ms": True},
                    {**record, "faster_by_needed": 0}):
        Runner.measured = damaged
        assert _precision_measured(Runner()) is None, damaged
    Runner.measured = record
    assert _precision_measured(Runner()) == {"fp32": 71.2, "bf16": 129.0, "faster_by_needed": 1.15}


@pytest.mark.parametrize("cached", [True, False])
def test_openvino_compiles_only_the_precision_already_chosen(tiny_model, fresh_choices, monkeypatch, cached):
    """Once auto's answer is in the cache, OpenVINO compiles the network in that precision alone: it compiled (or
    loaded from its cache) both in every process, the measurement's fp32 copy too: building the two runners of the
    README's first command took 0.52 s against 0.37 s (medians of 6, a busy 2-core Xeon without AMX), in every run
    and every Slicer segmentation."""
    from DeepWMLLib import inference

    openvino = pytest.importorskip("openvino")
    loaded = _loaded(tiny_model)
    threads = inference._cpu_threads()
    inference.bf16_is_faster("openvino", openvino.__version__, loaded, threads,
                             _runs(0.02, 0.001, []) if cached else _runs(0.001, 0.02, []))
    native = inference._openvino_computes_bf16(inference._openvino_core())
    compile_, compiled = inference.OpenVinoRunner._compile, []

    def spied(core, path, precision, threads):
        compiled.append(precision)
        return compile_(core, path, precision if native else "fp32", threads)

    monkeypatch.setattr(inference.OpenVinoRunner, "_compile", staticmethod(spied))
    monkeypatch.setattr(inference, "_openvino_computes_bf16", lambda core: True)
    runner = inference.OpenVinoRunner(loaded, "auto")
    chosen = "bf16" if cached else "fp32"
    assert compiled == [chosen] and runner.name == f"openvino {chosen}" and runner.precision == chosen
    assert runner.measured["bf16"] is cached  # deepwml bench's row
    x = np.zeros((1, 1, *loaded.preprocessing.grid_size), np.float32)
    assert runner(x).shape == x.shape


def test_two_threads_measure_once_not_at_the_same_time(tiny_model, fresh_choices):
    """Runners built at once in two threads (outside make_runner's lock): one measurement, the other reads it."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from DeepWMLLib import inference

    loaded = _loaded(tiny_model)
    running, overlapped, calls = [0], [False], []
    guard = threading.Lock()

    def run(name):
        def go(x):
            with guard:
                running[0] += 1
                overlapped[0] |= running[0] > 1
            calls.append(name)
            time.sleep(0.005)
            with guard:
                running[0] -= 1
        return go

    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda _: inference.bf16_is_faster(
            "torch", "1", loaded, 2, {"fp32": run("fp32"), "bf16": run("bf16")}), range(2)))
    assert answers[0] == answers[1]
    assert not overlapped[0]
    assert len(calls) == 2 * (inference._BF16_ROUNDS + 1)  # measured once
