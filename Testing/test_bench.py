"""`deepwml bench` measures what it says on a small input: every figure present, sane and consistent."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import make_volume, tiny_model_file
from DeepWMLLib.bench import format_table, run_benchmark
from DeepWMLLib.cli import main
from DeepWMLLib.errors import DeepWMLError


def test_bench_reports_every_figure(tmp_path, tiny_model, capsys, monkeypatch):
    import tempfile

    image, _ = make_volume(size=(48, 40, 8))
    path = tmp_path / "flair.nii.gz"
    sitk.WriteImage(image, str(path), True)
    scratch = tmp_path / "scratch"  # the benchmark's temporary folder goes here, and must be gone after
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    result = run_benchmark(str(path), [str(tiny_model)], slices=6, repeat=1, threads=1, brain_model=None)
    assert list(scratch.iterdir()) == []
    assert result["slices"] == 6 and 0 < result["slices_run_by_deepwml"] <= 6
    for key in ("a_reference_s", "b_deepwml_inference_s", "b_network_only_s", "c_end_to_end_s", "startup_floor_s",
                "e_peak_rss_mb", "gflop_per_slice"):
        assert result[key] > 0, key
    # (timings are not compared here: a fresh process that segments took 0.416 s against its 0.463 s start-up floor
    # in a CI run on loaded cores; the benchmark prints the figures, the test checks they are made and reported)
    # the ratio is taken before the times are rounded to 1 ms (b of this tiny case is a few ms)
    c, b = result["c_end_to_end_s"], result["b_deepwml_inference_s"]
    assert c / (b + 0.0005) - 0.01 <= result["c_over_b"] <= c / max(b - 0.0005, 1e-9) + 0.01
    assert result["c_over_b_paired"] == result["c_over_b"]  # one repetition: the same ratio
    # five cases in one process, each timed
    assert result["c_batch_cases"] == 5 and result["c_batch_per_case_s"] > 0
    assert "5 cases in one run" in format_table(result)
    assert 0 <= result["mask_dice_b_vs_a"] <= 1
    assert result["e_peak_rss_mb"] < 4000
    assert "start-up floor" in format_table(result)
    # the floor with the networks loaded and run once, and the lowest c/b it leaves for one fresh case
    ready = result["startup_floor_networks_ready_s"]
    assert ready > 0 and "with the networks ready" in format_table(result)
    lowest = result["c_over_b_lowest_possible"]  # from times before rounding, as c/b above
    blank = result["b_network_only_s"] / result["slices_run_by_deepwml"]  # one slice of the networks' work
    assert ((b + ready - blank - 0.0015) / (b + 0.0005) - 0.01 <= lowest
            <= (b + ready - blank + 0.0015) / max(b - 0.0005, 1e-9) + 0.01)
    assert result["brain_model"] is None and len(result["gflop_per_slice_each"]) == 1
    # (f) the CPU's fp32 matrix rate, and the networks' share of it (from the unrounded network rate)
    assert result["f_fp32_matmul_gflops"] > 0 and result["cpu"]
    share = result["b_network_gflops"] / result["f_fp32_matmul_gflops"]
    assert abs(result["b_network_share_of_matmul"] - share) < 0.01 + 0.1 * share
    assert "(f) fp32 matrix product here" in format_table(result) and "\nCPU " in format_table(result)

    # With a brain-mask network (on a coarser grid), every timing runs both networks.
    brain = tiny_model_file(tmp_path / "brain.pt", grid=(32, 32), spacing_mm=2.0,
                            labels={"0": "background", "1": "intracranial"})
    out = tmp_path / "bench.json"
    assert main(["bench", "--input", str(path), "--model", str(tiny_model), "--slices", "4", "--repeat", "1",
                 "--brain-model", str(brain), "--json", str(out)]) == 0
    both = json.loads(out.read_text(encoding="utf-8"))
    assert both["slices"] == 4 and both["brain_model"] == "brain.pt"
    wmh_flops, brain_flops = both["gflop_per_slice_each"]
    assert wmh_flops == result["gflop_per_slice_each"][0] and 0 < brain_flops < wmh_flops
    assert 0 <= both["brain_mask_dice_b_vs_a"] <= 1
    table = capsys.readouterr().out
    assert "(c) deepwml segment end to end" in table and "brain.pt" in table


def test_peak_memory_is_the_commands_own_not_the_benchmarks():
    """Linux charges a child with the memory of the process it was forked from; the launcher keeps
    the benchmark's own memory (here 300 MB held by the test) out of (e)."""
    import os
    import sys

    import numpy as np

    from DeepWMLLib.bench import _Launcher

    held = np.ones(300 * 2**20 // 8)  # 300 MB, touched
    launcher = _Launcher(dict(os.environ))
    try:
        _, idle = launcher.run([sys.executable, "-c", "pass"])
        seconds, busy = launcher.run([sys.executable, "-c", "import numpy; a = numpy.ones(200 * 2**20 // 8)"])
        with pytest.raises(RuntimeError, match="failed"):
            launcher.run([sys.executable, "-c", "import sys; sys.exit(3)"])
    finally:
        launcher.close()
    assert idle < 100 and busy > 200 and seconds > 0
    assert held.sum() > 0


def test_bench_runs_every_member_of_an_ensemble_in_the_reference_too(tmp_path, tiny_model):
    """(a) must do the same work as (b): with an ensemble, every member, averaged as segment does,
    so that the masks of (a) and (b) agree and the FLOPs count both members."""
    image, _ = make_volume(size=(48, 40, 8))
    path = tmp_path / "flair.nii.gz"
    sitk.WriteImage(image, str(path), True)
    (tmp_path / "seed1").mkdir()
    other = tiny_model_file(tmp_path / "seed1" / "tiny.pt", seed=1)  # one file name: the members told apart, as segment's
    one = run_benchmark(str(path), [str(tiny_model)], slices=4, repeat=1, threads=1, brain_model=None)
    two = run_benchmark(str(path), [str(tiny_model), str(other)], slices=4, repeat=1, threads=1, brain_model=None)
    assert one["model"] == ["tiny.pt"] and two["model"] == [f"{tmp_path.name}/tiny.pt", "seed1/tiny.pt"]
    assert two["gflop_per_slice_each"] == one["gflop_per_slice_each"] * 2
    assert two["gflop_per_slice"] == pytest.approx(2 * one["gflop_per_slice"], abs=0.002)
    assert two["mask_dice_b_vs_a"] >= 0.99


def test_the_model_row_describes_each_member_of_an_ensemble(tmp_path, tiny_model):
    """An ensemble of members of different widths or grids was described by its first member's settings alone
    ("tiny.pt, wide.pt (base 4, depth 2)"): the row said the wide member was as narrow as the first."""
    import torch

    from DeepWMLLib.checkpoint import save_model
    from DeepWMLLib.model import build_model
    from DeepWMLLib.preprocessing import PreprocessingConfig

    image, _ = make_volume(size=(48, 40, 8))
    path = tmp_path / "flair.nii.gz"
    sitk.WriteImage(image, str(path), True)
    torch.manual_seed(1)
    wide = tmp_path / "wide.pt"
    save_model(wide, build_model({"base_channels": 8, "depth": 2}), {"base_channels": 8, "depth": 2},
               PreprocessingConfig(grid_size=(32, 32)), 0.8, {"kind": "test fixture"})  # a threshold of its own
    other = tiny_model_file(tmp_path / "other.pt", seed=1)
    result = run_benchmark(str(path), [str(tiny_model), str(wide), str(other)], slices=4, repeat=1, threads=1,
                           brain_model=None)
    # masks compared at the threshold deepwml segment marks an ensemble's with (its members' mean), not the first's
    from DeepWMLLib.segment import load_models

    assert result["threshold"] == pytest.approx(float(np.mean([m.threshold for m in load_models(
        [str(tiny_model), str(wide), str(other)])])))
    row = next(line for line in format_table(result).splitlines() if line.startswith("model "))
    assert row.split(None, 1)[1] == ("tiny.pt, other.pt (base 4, depth 2, grid 64×64); "
                                     "wide.pt (base 8, depth 2, grid 32×32)")
    # members alike: one description, as before, and a result of an earlier version (no member's own settings)
    alike = {**result, "model": ["a.pt", "b.pt"], "architecture_each": [{"base_channels": 4, "depth": 2}] * 2,
             "grid_each": [[64, 64]] * 2}
    assert "a.pt, b.pt (base 4, depth 2, grid 64×64)\n" in format_table(alike)
    earlier = {k: v for k, v in result.items() if k not in ("architecture_each", "grid_each")}
    assert "tiny.pt, wide.pt, other.pt (base 4, depth 2)\n" in format_table(earlier)


def test_negative_slice_count_is_a_usage_error(capsys):
    from DeepWMLLib.cli import main

    with pytest.raises(SystemExit) as usage:
        main(["bench", "--slices", "-3", "--repeat", "1"])
    assert usage.value.code == 2 and "--slices" in capsys.readouterr().err


def test_threads_apply_to_the_in_process_runners_as_to_the_fresh_processes(tmp_path, tiny_model, monkeypatch):
    """--threads N: (b) runs on N threads as (c) does. OpenVINO and ONNX Runtime take their thread count from
    OMP_NUM_THREADS (else every CPU), which only (c)'s processes were given: (b) ran on every CPU while the
    table said N, and c/b compared runs on different numbers of cores."""
    import os

    from DeepWMLLib import inference

    image, _ = make_volume(size=(48, 40, 8))
    path = tmp_path / "flair.nii.gz"
    sitk.WriteImage(image, str(path), True)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    threads = len(os.sched_getaffinity(0)) + 1 if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1) + 1
    counted = []
    cpu_threads = inference._cpu_threads
    monkeypatch.setattr(inference, "_cpu_threads", lambda: counted.append(cpu_threads()) or counted[-1])
    import torch

    before = torch.get_num_threads()
    try:
        for backend, module in (("onnx", "onnxruntime"), ("openvino", "openvino")):
            pytest.importorskip(module)
            result = run_benchmark(str(path), [str(tiny_model)], slices=3, repeat=1, threads=threads, backend=backend,
                                   brain_model=None)
            assert counted and set(counted) == {threads}, (backend, counted)
            assert result["threads"] == threads
            counted.clear()
    finally:
        torch.set_num_threads(before)  # more threads than CPUs would slow the tests run after this one
    assert "OMP_NUM_THREADS" not in os.environ  # put back as it was


def test_without_shared_data_the_bundled_sample_is_timed(tmp_path, monkeypatch):
    """`deepwml bench` with no --input on a machine without ../shared (a hospital's) failed: its synthetic input
    needs ../shared's templates ('shared data ... not found: set DEEPWML_SHARED_DATA'). It times the bundled sample."""
    from DeepWMLLib import bench, io

    monkeypatch.setenv("DEEPWML_SHARED_DATA", str(tmp_path / "absent"))
    assert io.shared_data_dir() is None
    path, source = bench._benchmark_input(None, 4, tmp_path)
    assert "sample" in source and "central 4 of 21 slices" in source
    assert sitk.ReadImage(str(path)).GetSize()[2] == 4
    # without the sample too: a message that says what to do
    monkeypatch.setattr(bench, "SAMPLE", tmp_path / "no_sample.nii.gz")
    with pytest.raises(DeepWMLError, match="--input"):
        bench._benchmark_input(None, 4, tmp_path)


def test_a_gpu_is_refused_with_a_word_that_bench_times_the_cpu(capsys):
    """`deepwml bench --device cuda` (segment's option) was argparse's 'unrecognized arguments', which did not say
    that bench times the CPU only, nor how to time a GPU."""
    assert main(["bench", "--device", "cuda", "--repeat", "1"]) == 1
    err = capsys.readouterr().err
    assert "times the CPU only" in err and "segment --device cuda" in err
    # and it names every figure bench measures, (f) included since the fp32 matrix product was added
    from DeepWMLLib import bench

    last = sorted(re.findall(r"^\(([a-z])\) ", bench.__doc__, re.M))[-1]
    assert last >= "f" and f"(a) to ({last})" in err


@pytest.mark.parametrize("platform,unit", [("linux", 1 << 10), ("darwin", 1 << 20)])
def test_peak_memory_is_in_mib_where_the_system_counts_bytes_too(platform, unit, monkeypatch, capsys):
    """ru_maxrss counts KiB on Linux but bytes on macOS, where (e) was divided by 1024 all the same: a peak of 242 MiB
    read 247808 MiB."""
    import io
    import os
    import sys
    import types

    from DeepWMLLib.bench import _LAUNCHER

    if not hasattr(os, "wait4"):
        pytest.skip("no os.wait4 (Windows): no peak memory")

    def wait4(pid, options):  # the child reaped as the launcher reaps it, its peak the system's count of 300 MiB
        _, status = os.waitpid(pid, options)
        return pid, status, types.SimpleNamespace(ru_maxrss=300 * unit)

    monkeypatch.setattr(os, "wait4", wait4)
    monkeypatch.setattr(sys, "platform", platform)
    monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps([sys.executable, "-c", "pass"]) + "\n"))
    exec(_LAUNCHER, {})
    seconds, peak, code, _ = json.loads(capsys.readouterr().out)
    assert code == 0 and peak == 300


def test_bench_without_the_brain_mask_times_the_wmh_network_alone_in_c_too(tmp_path, tiny_model, monkeypatch):
    """(b) ran the WMH network alone, while (c), `deepwml segment --no-brain-mask`, also ran the shipped brain
    network (for the checks it makes): c/b compared different work. (c)'s runs make no brain mask now."""
    from DeepWMLLib import bench

    image, _ = make_volume(size=(48, 40, 6))
    path = tmp_path / "flair.nii.gz"
    sitk.WriteImage(image, str(path), True)
    brains = []
    run = bench._Launcher.run

    def run_and_read(self, command):
        answer = run(self, command)
        if "segment" in command and Path(command[command.index("-o") + 1]).is_dir():
            for report in Path(command[command.index("-o") + 1]).glob("*_report.json"):
                brains.append(json.loads(report.read_text(encoding="utf-8"))["brain_model"])
        return answer

    monkeypatch.setattr(bench._Launcher, "run", run_and_read)
    run_benchmark(str(path), [str(tiny_model)], slices=4, repeat=1, threads=1, brain_model=None)
    assert brains and brains == [None] * len(brains)


def test_bf16_on_a_cpu_without_it_is_refused_before_the_scan_is_read(monkeypatch, capsys):
    """`deepwml bench --precision bf16` on a CPU without native bf16 read the scan and loaded the networks (9 s on the
    Zen 3) before its runner refused it: refused first now, as deepwml segment refuses it (inference.check_runtime)."""
    from DeepWMLLib import bench, inference

    monkeypatch.setattr(inference, "torch_cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(inference, "_openvino_computes_bf16", lambda core: False)

    def timed(*args, **kwargs):
        raise AssertionError("the benchmark ran")

    monkeypatch.setattr(bench, "run_benchmark", timed)
    assert main(["bench", "--precision", "bf16", "--repeat", "1"]) == 1
    assert "--precision bf16 needs a CPU with native bf16 (AMX or AVX512-BF16)" in capsys.readouterr().err


def test_cpu_description_names_the_vector_units_that_decide_the_precision():
    """The table names the CPU and the units that decide how the networks run (bf16 natively, else fp32): the
    first processor's model name and flags of /proc/cpuinfo, the units from the widest down."""
    from DeepWMLLib.bench import cpu_description

    zen3 = ("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse avx f16c avx2 fma\n\n"
            "processor\t: 1\nmodel name\t: other\nflags\t\t: avx512f avx512_bf16\n")
    assert cpu_description(zen3) == "AMD EPYC (AVX2)"
    xeon = ("model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz\n"
            "flags\t\t: avx avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n")
    assert cpu_description(xeon) == "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz (AVX2, AVX-512, AVX512-BF16, AMX-BF16)"
    zen4 = "model name\t: AMD EPYC 9B14\nflags\t\t: avx2 avx512f avx512_bf16\n"
    assert cpu_description(zen4) == "AMD EPYC 9B14 (AVX2, AVX-512, AVX512-BF16)"
    arm = "processor\t: 0\nFeatures\t: fp asimd\n"  # no model name, no units of the list
    assert cpu_description(arm) and "(" not in cpu_description(arm)


def test_fp32_matmul_rate_is_a_product_timed_in_its_own_process(monkeypatch):
    """(f): a float32 product of two n x n matrices is 2 n^3 floating-point operations; the figure is that over the
    best time, from a process with the threads asked for. A failing process gives None, not a made-up rate."""
    import subprocess

    from DeepWMLLib import bench

    seen = {}
    real_run = subprocess.run

    def spy(command, **kwargs):
        seen["env"] = kwargs["env"]
        return real_run(command, **kwargs)

    monkeypatch.setattr(subprocess, "run", spy)
    rate = bench.fp32_matmul_gflops(1, repeat=2, size=256)
    assert rate is not None and 0.1 < rate < 1e5
    assert seen["env"]["OMP_NUM_THREADS"] == seen["env"]["OPENBLAS_NUM_THREADS"] == "1"
    # every BLAS numpy ships with or is built against: Apple's Accelerate (numpy 2's macOS wheels) ran on every core
    assert all(seen["env"][name] == "1" for name in ("MKL_NUM_THREADS", "BLIS_NUM_THREADS", "VECLIB_MAXIMUM_THREADS"))
    monkeypatch.setattr(bench.sys, "executable", "/nonexistent/python")
    assert bench.fp32_matmul_gflops(1, repeat=1, size=8) is None


def test_bf16_is_allowed_on_a_cpu_that_computes_it_whatever_torch_version(monkeypatch):
    """PyTorch asks the CPU for bf16 (torch.cpu._is_avx512_bf16_supported, _is_amx_tile_supported) only from 2.11;
    pyproject allows torch 2.0 on, where both are missing: every CPU was then answered False, and --precision bf16
    refused up front (inference.check_runtime) on a Zen 4 or a Sapphire Rapids, the CPUs README's bf16 figures were
    measured on. Without the queries Linux's CPU flags answer; with them (a Zen 4 simulated) bf16 is allowed, with
    PyTorch and with OpenVINO where it would run."""
    import torch

    from DeepWMLLib import inference

    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.delattr(torch.cpu, name, raising=False)  # torch before 2.11
    monkeypatch.setattr(inference, "_linux_cpu_flags", lambda: {"avx2", "avx512f", "avx512_bf16"},  # a Zen 4
                        raising=False)
    assert inference.torch_cpu_has_native_bf16()
    assert inference.check_runtime("cpu", "torch", "bf16") == "cpu"
    monkeypatch.setattr(inference, "_linux_cpu_flags", lambda: {"avx2", "amx_tile", "amx_bf16"})  # a Sapphire Rapids
    assert inference.torch_cpu_has_native_bf16()
    monkeypatch.setattr(inference, "_linux_cpu_flags", lambda: {"avx2", "fma"})  # a Zen 3
    assert not inference.torch_cpu_has_native_bf16()
    with pytest.raises(inference.PrecisionUnavailable):
        inference.check_runtime("cpu", "torch", "bf16")

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)  # torch 2.11 on a Zen 4
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert inference.torch_cpu_has_native_bf16()
    monkeypatch.setattr(inference, "_openvino_computes_bf16", lambda core: True)
    for backend in ("auto", "openvino", "torch"):
        assert inference.check_runtime("cpu", backend, "bf16") == "cpu"


def test_bf16_on_a_gpu_is_judged_as_a_gpu_not_by_the_cpu(monkeypatch):
    """--device cuda, or auto on a machine with a GPU, with --precision bf16: refused as bf16 on a GPU whatever the CPU
    computes (its runtimes are not asked), as the runner refuses it."""
    from DeepWMLLib import inference

    monkeypatch.setattr(inference, "_cuda_usable", lambda: True)

    def asked(*args):
        raise AssertionError("the CPU was asked")

    monkeypatch.setattr(inference, "cpu_computes_bf16", asked)
    for device in ("cuda", "auto"):
        with pytest.raises(inference.PrecisionUnavailable, match="--precision bf16 is for the CPU; on a GPU"):
            inference.check_runtime(device, "auto", "bf16")
        assert inference.check_runtime(device, "auto", "auto") == "cuda"
