"""`deepwml bench`: how fast segmentation runs here, against the plain way of running the network.

On one input (a real clinical FLAIR from ../shared when present, else the bundled synthetic sample)
it measures
(a) the network run the plain way: PyTorch eager, fp32, one slice at a time, every slice;
(b) DeepWML's inference path (`inference.predict_maps`: normalisation, resampling, batched
    runner — OpenVINO (bf16 where the CPU computes it natively and faster than fp32), ONNX Runtime or channels-last PyTorch —
    head-less slices skipped, resampling back);
(c) `deepwml segment` end to end as a user sees it, in a fresh process (start-up, read, preprocess,
    infer, post-process, write every output); and per case when a folder of 5 copies of the input is
    segmented in one process, as a cohort would be (start-up and loading the networks paid once);
(d) network FLOPs per slice and the GFLOP/s achieved by (a) and (b);
(e) peak resident memory of (c), that process's own (started from a small launcher process, as
    Linux would otherwise count the benchmark's own memory in it);
(f) what this CPU does at best in fp32: a large float32 matrix product (numpy's BLAS, in a process of its own
    with the threads the networks have), the dense work CPUs run closest to their peak; the networks' GFLOP/s
    of (b) as a share of it tells how much faster fp32 could go here at all (on a CPU without native bf16,
    where (b) runs fp32, that bounds (b) against (a));
when a brain-mask network is used (the shipped one by default), (a), (b) and (c) run it too;
plus the agreement (Dice) of the masks from (a) and (b), and the start-up floor: the time a process
takes only to import numpy and the runtime (and SimpleITK, for inputs other than NIfTI) and exit,
which (c) cannot go below (OpenVINO imported as the command line imports it: through DeepWML's
inference module, without OpenVINO's model converter); and that floor with the networks ready (the same
process also loads every network as `segment` does and runs each once on a blank slice): with (b), the
lowest c/b any fresh process could reach for one case. a, b, c and the floors take turns in each
repetition; medians are reported. Prints a table and writes JSON.

Before timing (c), DeepWML's own bytecode cache is written (`compileall`), as the first import does
on an ordinary machine and `pip install` does for a regular install. Where Python is told never to
write it (PYTHONDONTWRITEBYTECODE, as on some build machines) every run would otherwise recompile
the package, about 50 ms that no user pays twice.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from . import resources_dir


BATCH_CASES = 5
# The input timed when none is given and ../shared is absent (as on any machine but the project's own)
SAMPLE = resources_dir() / "Sample" / "sample_flair.nii.gz"


def _cache_bytecode() -> bool:
    """Write DeepWMLLib's bytecode cache (see the module docstring); False when the folder is read-only."""
    import compileall

    try:
        return bool(compileall.compile_dir(str(Path(__file__).resolve().parent), quiet=2))
    except OSError:
        return False


def _benchmark_input(path: str | None, slices: int, workdir: Path) -> tuple[Path, str]:
    """A FLAIR file to time, cut to `slices` central axial slices."""
    import SimpleITK as sitk

    from . import io

    if path is None:
        shared = io.shared_data_dir()
        candidate = shared / "open_ms" / "clinical_flair" / "patient20_study2.nii.gz" if shared else None
        if candidate is not None and candidate.is_file():
            path, source = str(candidate), "real clinical FLAIR patient20_study2 (256×256, 3 mm)"
        elif SAMPLE.is_file():  # a hospital's machine has no ../shared: the synthetic generator needs its templates
            path, source = str(SAMPLE), "the bundled sample, a synthetic FLAIR (256×256, 6 mm; ../shared absent)"
        else:
            from .errors import DeepWMLError
            from .synth import generate_case

            try:
                flair, _, _ = generate_case(0)
            except DeepWMLError:
                raise DeepWMLError(f"no FLAIR to time here (neither ../shared nor the bundled sample {SAMPLE}): "
                                   "give one with --input") from None
            path = str(workdir / "synthetic.nii.gz")
            io.write_image(flair, path)
            source = "synthetic FLAIR (../shared absent)"
    else:
        source = str(path)
    image = io.read_any(path)
    axis = io.axial_axis(image)
    n = image.GetSize()[axis]
    if slices and slices < n:
        start = (n - slices) // 2
        index, size = [0, 0, 0], list(image.GetSize())
        index[axis], size[axis] = start, slices
        image = sitk.RegionOfInterest(image, size, index)
        source += f", central {slices} of {n} slices"
    out = workdir / "bench_input.nii.gz"
    io.write_image(image, out)
    return out, source


# Linux counts, in a child's peak resident memory, the memory of the process it was forked from
# (the kernel records the old address space's high-water mark at exec). Started from this process,
# which holds PyTorch, the model and the inputs (several hundred MB), every child would report at
# least that. So the timed commands are started by a small launcher process instead; its children
# start from its few MB. It times each command the same way (fork, exec, wait) and answers in JSON.
_LAUNCHER = """
import json, os, subprocess, sys, time
for line in sys.stdin:
    command = json.loads(line)
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stderr = proc.stderr.read()
    if hasattr(os, "wait4"):
        _, status, usage = os.wait4(proc.pid, 0)
        # ru_maxrss counts KiB on Linux, bytes on macOS: MiB either way
        code, peak = os.waitstatus_to_exitcode(status), usage.ru_maxrss / (1 << 20 if sys.platform == "darwin" else 1 << 10)
    else:  # Windows: no os.wait4, so no peak memory of the child
        code, peak = proc.wait(), None
    seconds = time.perf_counter() - start
    proc.stderr.close()
    print(json.dumps([seconds, peak, code, stderr.decode("utf-8", "replace").strip()[-300:]]), flush=True)
"""


class _Launcher:
    """Runs commands in fresh processes started by a small helper process (see above)."""

    def __init__(self, env: dict):
        self.proc = subprocess.Popen([sys.executable, "-c", _LAUNCHER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=env, text=True)

    def run(self, command: list[str]) -> tuple[float, float]:
        """Wall time (s) and the command's own peak resident memory (MiB, from ru_maxrss: KiB on Linux, bytes on macOS;
        None on Windows)."""
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        if not answer:
            raise RuntimeError("the benchmark's launcher process stopped")
        seconds, peak_mb, returncode, stderr = json.loads(answer)
        if returncode != 0:
            raise RuntimeError(f"{command[3:5]} failed: {stderr}")
        return seconds, peak_mb

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


# The CPU's vector units that decide how the networks run: bf16 natively (AMX or AVX512-BF16, where the default
# runs bf16 if it is measured faster than fp32: inference.bf16_is_faster), AVX-512 or AVX2 (fp32).
# Linux's /proc/cpuinfo flag names.
CPU_FEATURES = (("amx_bf16", "AMX-BF16"), ("avx512_bf16", "AVX512-BF16"), ("avx512f", "AVX-512"), ("avx2", "AVX2"))


def cpu_description(cpuinfo: str | None = None) -> str:
    """"AMD EPYC (AVX2)", "Intel(R) Xeon(R) ... (AVX-512, AVX512-BF16, AMX-BF16)": the CPU's model name and the
    vector units of CPU_FEATURES it has, from Linux's /proc/cpuinfo (`cpuinfo`: its text); elsewhere the processor's
    name as Python's platform module gives it (Windows: "Intel64 Family 6 Model 85 ...", which names no units)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                cpuinfo = f.read(1 << 20)
        except OSError:
            return platform.processor() or platform.machine()
    name, flags = None, None
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and name is None:
            name = value.strip()
        elif key in ("flags", "Features") and flags is None:
            flags = set(value.split())
    units = [label for flag, label in reversed(CPU_FEATURES) if flags and flag in flags]
    name = name or platform.processor() or platform.machine()
    return f"{name} ({', '.join(units)})" if units else name


MATMUL_SIZE = 2048  # 17.2 GFLOP a product: about 0.1 s at 150 GFLOP/s


def fp32_matmul_gflops(threads: int | None, repeat: int = 5, size: int = MATMUL_SIZE) -> float | None:
    """GFLOP/s of the best of `repeat` float32 products of two `size` x `size` matrices, in a fresh process whose BLAS
    has `threads` threads (None: its default); None when that process fails."""
    code = "\n".join([
        "import time, numpy as np",
        f"n = {size}",
        "a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)",
        "b = a.T.copy()",
        "a @ b",  # BLAS's threads started, its buffers touched
        "best = float('inf')",
        f"for _ in range({repeat}):",
        "    start = time.perf_counter()",
        "    a @ b",
        "    best = min(best, time.perf_counter() - start)",
        "print(2 * n ** 3 / best / 1e9)"])
    env = dict(os.environ)
    if threads:
        # numpy's BLAS: OpenBLAS (Linux, Windows wheels), MKL, BLIS, or Apple's Accelerate (numpy 2's macOS wheels)
        for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS",
                     "VECLIB_MAXIMUM_THREADS"):
            env[name] = str(threads)
    try:
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
        return float(done.stdout.split()[-1]) if done.returncode == 0 else None
    except (subprocess.SubprocessError, OSError, ValueError, IndexError):
        return None


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * np.logical_and(a, b).sum() / total)


def run_benchmark(input_path: str | None = None, model_paths=None, slices: int = 25, repeat: int = 3,
                  threads: int | None = None, backend: str = "auto", brain_model="default",
                  precision: str = "auto") -> dict:
    """`brain_model` as in `segment_image` ("default": the shipped brain-mask network, if any; None:
    none; or a file): when one is used, (a), (b) and (c) all run it as well as the WMH network."""
    import torch

    from .segment import default_model_paths

    saved = os.environ.get("OMP_NUM_THREADS")
    if threads:
        torch.set_num_threads(threads)
        # OpenVINO's and ONNX Runtime's runners take their thread count from OMP_NUM_THREADS (else every CPU), as
        # the fresh `segment` processes of (c) do: without it here, (b) ran on every CPU while (c) and the table
        # had `threads`, and c/b compared runs on different numbers of cores
        os.environ["OMP_NUM_THREADS"] = str(threads)
    model_paths = list(model_paths or default_model_paths())
    workdir = Path(tempfile.mkdtemp(prefix="deepwml-bench-"))
    try:  # the input, the copies and every output are written here; none is left behind
        return _measure(workdir, input_path, model_paths, slices, repeat, threads, backend, brain_model, precision)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        if threads:
            if saved is None:
                os.environ.pop("OMP_NUM_THREADS", None)
            else:
                os.environ["OMP_NUM_THREADS"] = saved


def _measure(workdir: Path, input_path, model_paths: list, slices: int, repeat: int, threads, backend: str,
             brain_model, precision: str) -> dict:
    import torch

    from . import io
    from .inference import make_runner, predict_maps, predict_network_slices
    from .model import count_flops, validate_config
    from .preprocessing import plan_volume
    from .segment import MODELS_DIR_ENV, load_brain_model, load_models

    path, source = _benchmark_input(input_path, slices, workdir)
    image = io.read_image(path)
    models = load_models(model_paths)
    loaded = models[0]
    brain = load_brain_model(brain_model)
    networks = list(models) + ([brain] if brain is not None else [])  # every member of an ensemble
    stack, frame = io.to_axial_stack(image)
    plan = plan_volume(stack, frame, {m.preprocessing for m in networks})
    nets = [plan.network_slices(stack, np.arange(stack.shape[0]), m.preprocessing) for m in networks]
    flops_each = [count_flops(m.model, tuple(m.preprocessing.grid_size)) for m in networks]
    flops = sum(flops_each)

    # (a) the plain way: eager fp32, NCHW, one slice at a time, every slice, each network
    plains = [m.model.to("cpu").eval() for m in networks]

    def reference():
        with torch.inference_mode():
            return [plan.grids[m.preprocessing].to_input(np.concatenate(
                [torch.sigmoid(plain(torch.from_numpy(net[i:i + 1, None]))).numpy()[:, 0] for i in range(net.shape[0])]))
                for m, plain, net in zip(networks, plains, nets)]

    ref_maps = reference()  # also the warm-up
    ref_prob = np.mean(ref_maps[:len(models)], axis=0)  # an ensemble averages its members, as segment does

    # (b) DeepWML's inference path, as `segment` calls it, and (c) + (e) `deepwml segment` end to end in
    # a fresh process. a, b, c and the floor take turns in every repetition, so that a busy (or
    # quiet) moment of a shared machine, which can change speed by half, hits all of them alike.
    runner = make_runner(loaded, "cpu", backend, precision)
    runner_name = runner.name
    precision_auto_ms = _precision_measured(runner)  # the WMH network's (`runner` is reused for each network below)
    predict_maps(image, models, brain, "cpu", backend=backend, precision=precision)  # warm-up (and ONNX export)
    out_dir = workdir / "out"
    options = ["--overwrite", "--device", "cpu", "--backend", backend, "--precision", precision, "--model",
               *(m.path for m in models)]
    env = dict(os.environ)  # with OMP_NUM_THREADS set to `threads` (run_benchmark)
    if brain is None:
        # `deepwml segment --no-brain-mask` still runs the shipped brain network (for its checks), so (c) would do
        # work (b) does not: its processes see a model registry without one, and run the WMH network alone
        registry = workdir / "no-brain-model"
        registry.mkdir()
        (registry / "models.json").write_text('{"models": []}', encoding="utf-8")
        env[MODELS_DIR_ENV] = str(registry)
    else:
        options += ["--brain-model", brain.path]
    segment = [sys.executable, "-m", "DeepWMLLib.cli", "segment"]
    command = [*segment, str(path), "-o", str(out_dir), *options]
    # (c) for a folder of BATCH_CASES scans in one process: what each scan costs in a cohort, where
    # start-up and loading the networks are paid once
    batch_dir = workdir / "batch"
    batch_dir.mkdir()
    for i in range(BATCH_CASES):
        shutil.copyfile(path, batch_dir / f"case{i + 1}.nii.gz")
    batch_command = [*segment, str(batch_dir), "-o", str(workdir / "out_batch"), *options]
    bytecode_cached = _cache_bytecode()
    launcher = _Launcher(env)
    launcher.run(command)  # warm the ONNX cache and the disk cache
    # The floor: the interpreter plus what `deepwml segment` cannot do without on this input (a NIfTI
    # file is read without SimpleITK; other formats need it).
    light = io.is_nifti(path)
    runtime = {"openvino": "; from DeepWMLLib import cli, inference; cli.OWN_PROCESS = True; inference._import_openvino()",
               "onnxruntime": "; import onnxruntime"}.get(runner_name.split()[0], "; import torch")
    floor_command = [sys.executable, "-c", "import os, numpy" + ("" if light else ", SimpleITK") + runtime
                     + "; os._exit(0)"]
    # ... and with the networks ready: the same process also loads every network as `segment` does
    # (compiled ones from the cache) and runs each once on one blank slice, which sets up its kernels.
    # No process can segment a scan for less; what (c) spends beyond it is the case's own work.
    ready = ("; from DeepWMLLib.segment import load_models, load_brain_model"
             f"; nets = load_models({[m.path for m in models]!r})"
             + (f" + [load_brain_model({brain.path!r})]" if brain is not None else "")
             + f"; [inference.make_runner(m, 'cpu', {backend!r}, {precision!r})"
             "(numpy.zeros((1, 1, *m.preprocessing.grid_size), numpy.float32)) for m in nets]")
    ready_command = [sys.executable, "-c", "import os, numpy" + ("" if light else ", SimpleITK")
                     + "; from DeepWMLLib import cli, inference; cli.OWN_PROCESS = True" + ready + "; os._exit(0)"]
    runners = [make_runner(m, "cpu", backend, precision) for m in networks]
    nets_run = [net[plan.kept] for net in nets]
    t_refs, t_opt, t_nets, e2e, peaks, floor, batch, ready_floor = [], [], [], [], [], [], [], []
    for _ in range(repeat):
        start = time.perf_counter()
        for runner, net_run in zip(runners, nets_run):
            predict_network_slices(net_run, runner, runner.default_batch_size)
        t_nets.append(time.perf_counter() - start)
        start = time.perf_counter()
        reference()
        t_refs.append(time.perf_counter() - start)
        start = time.perf_counter()
        predict_maps(image, models, brain, "cpu", backend=backend, precision=precision)
        t_opt.append(time.perf_counter() - start)
        seconds, peak = launcher.run(command)
        e2e.append(seconds)
        peaks.append(peak)
        floor.append(launcher.run(floor_command)[0])
        ready_floor.append(launcher.run(ready_command)[0])
        batch.append(launcher.run(batch_command)[0] / BATCH_CASES)
    launcher.close()
    matmul = fp32_matmul_gflops(int(env["OMP_NUM_THREADS"]) if env.get("OMP_NUM_THREADS", "").isdigit() else None)
    t_ref, t_opt, t_net, t_e2e, t_floor, t_batch, t_ready = (float(np.median(v)) for v in
                                                             (t_refs, t_opt, t_nets, e2e, floor, batch, ready_floor))
    opt_prob, opt_brain, _, _ = predict_maps(image, models, brain, "cpu", backend=backend, precision=precision)
    slices_run = int(plan.kept.size)
    threshold = float(np.mean([m.threshold for m in models]))  # an ensemble's, as deepwml segment marks its mask
    mask_dice = _dice(ref_prob >= threshold, opt_prob >= threshold)
    peak_mb = None if None in peaks else max(peaks)

    n = stack.shape[0]
    result = {
        "input": source,
        "slices": n,
        "slices_run_by_deepwml": slices_run,
        "threshold": threshold,  # the masks compared in mask_dice_b_vs_a
        "grid": list(loaded.preprocessing.grid_size),
        "model": [m.name for m in models],
        "architecture": loaded.config,
        # each member's own: an ensemble's members may differ in width, depth or grid
        "architecture_each": [validate_config(m.config) for m in models],
        "grid_each": [list(m.preprocessing.grid_size) for m in models],
        "brain_model": None if brain is None else brain.name,
        "brain_architecture": None if brain is None else brain.config,
        "brain_grid": None if brain is None else list(brain.preprocessing.grid_size),
        "runner": runner_name,
        # precision auto on a CPU with native bf16: one slice of the WMH network in each, as measured once here
        # (inference.bf16_is_faster); None where nothing was measured (fp32 or bf16 asked, or no native bf16)
        "precision_auto_ms": precision_auto_ms,
        "threads": torch.get_num_threads(),
        "machine": f"{platform.machine()}, {os.cpu_count()} logical CPUs, {platform.system()}",
        "cpu": cpu_description(),
        "gflop_per_slice": round(flops / 1e9, 3),
        "gflop_per_slice_each": [round(f / 1e9, 3) for f in flops_each],
        "a_reference_s": round(t_ref, 3),
        "a_reference_s_per_slice": round(t_ref / n, 4),
        "a_reference_gflops": round(flops * n / t_ref / 1e9, 1),
        "b_deepwml_inference_s": round(t_opt, 3),
        "b_network_only_s": round(t_net, 3),
        "b_network_gflops": round(flops * slices_run / t_net / 1e9, 1),
        "b_speedup_vs_a": round(t_ref / t_opt, 2),
        "c_end_to_end_s": round(t_e2e, 3),
        "c_over_b": round(t_e2e / t_opt, 2),
        "c_minus_b_s": round(t_e2e - t_opt, 3),
        "c_over_b_paired": round(float(np.median(np.array(e2e) / np.array(t_opt))), 2),
        "b_speedup_vs_a_paired": round(float(np.median(np.array(t_refs) / np.array(t_opt))), 2),
        "startup_floor_s": round(t_floor, 3),
        "startup_floor_networks_ready_s": round(t_ready, 3),
        # the blank runs include one slice of every network's work, which (b) pays as well
        "c_over_b_lowest_possible": round((t_opt + t_ready - t_net / max(1, int(plan.kept.size))) / t_opt, 2),
        "c_batch_cases": BATCH_CASES,
        "c_batch_per_case_s": round(t_batch, 3),
        "c_batch_per_case_over_b": round(t_batch / t_opt, 2),
        "e_peak_rss_mb": None if peak_mb is None else round(peak_mb, 1),
        "mask_dice_b_vs_a": round(mask_dice, 5),
        "brain_mask_dice_b_vs_a": None if brain is None else round(_dice(ref_maps[-1] >= 0.5, opt_brain >= 0.5), 5),
        "f_fp32_matmul_gflops": None if matmul is None else round(matmul, 1),
        "b_network_share_of_matmul": None if matmul is None else round(flops * slices_run / t_net / 1e9 / matmul, 2),
        "repeat": repeat,
        "bytecode_cached": bytecode_cached,
    }
    return result


def _models_described(r: dict) -> str:
    """The model row: the models' names with their width, depth and grid; members of an ensemble that differ are
    described group by group ("a.pt, c.pt (base 16, ...); b.pt (base 32, ...)"), not all as the first."""
    if not r.get("architecture_each"):  # a result of an earlier version: the first model's settings alone
        return f"{', '.join(r['model'])} (base {r['architecture']['base_channels']}, depth {r['architecture']['depth']})"
    groups = {}
    for name, config, grid in zip(r["model"], r["architecture_each"], r["grid_each"]):
        groups.setdefault((config["base_channels"], config["depth"], *grid), []).append(name)
    return "; ".join(f"{', '.join(names)} (base {base}, depth {depth}, grid {height}×{width})"
                     for (base, depth, height, width), names in groups.items())


def _precision_measured(runner) -> dict | None:
    """{"fp32", "bf16": ms, "faster_by_needed"} as precision auto measured them for `runner` (its `measured`
    record, inference.bf16_measured); None where nothing was measured or the cache's record lacks them."""
    measured = getattr(runner, "measured", None)
    names = {"fp32": "fp32_ms", "bf16": "bf16_ms", "faster_by_needed": "faster_by_needed"}
    if not isinstance(measured, dict):
        return None
    figures = {key: measured.get(name) for key, name in names.items()}
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in figures.values()):
        return None
    return figures


def _precision_choice(r: dict) -> str:
    """"fp32: one slice of the WMH network took 129 ms in bf16, 71 ms in fp32 (...)": what precision auto measured
    (inference.bf16_is_faster) and chose, the runner's precision."""
    ms = r["precision_auto_ms"]
    choice = "bf16" if "bf16" in r["runner"] else "fp32"
    return (f"{choice}: one slice of the WMH network took {ms['bf16']:g} ms in bf16, {ms['fp32']:g} ms in fp32 (bf16 "
            f"kept only where {ms['faster_by_needed']:g}x faster; measured once on this machine, kept in the cache)")


def format_table(r: dict) -> str:
    rows = [
        ("input", r["input"]),
        ("model", _models_described(r)),
        ("brain-mask model", "none" if not r.get("brain_model") else
         f"{r['brain_model']} (base {r['brain_architecture']['base_channels']}, grid {r['brain_grid'][0]}×{r['brain_grid'][1]})"),
        ("machine / threads", f"{r['machine']} / {r['threads']}"),
        ("CPU", r.get("cpu") or "not recorded"),
        ("(d) network FLOPs per slice", f"{r['gflop_per_slice']} GFLOP" + (
            f" ({' + '.join(str(f) for f in r['gflop_per_slice_each'])})" if len(r["gflop_per_slice_each"]) > 1 else "")),
        ("(a) eager fp32, 1 slice at a time", f"{r['a_reference_s']:.2f} s ({r['a_reference_s_per_slice']:.3f} s/slice, {r['a_reference_gflops']} GFLOP/s)"),
        (f"(b) DeepWML inference [{r['runner']}]", f"{r['b_deepwml_inference_s']:.2f} s ({r['b_speedup_vs_a']}x faster than a; {r['slices_run_by_deepwml']}/{r['slices']} slices hold head)"),
        ("    network only", f"{r['b_network_only_s']:.2f} s ({r['b_network_gflops']} GFLOP/s)"),
        *([("    precision auto chose", _precision_choice(r))] if r.get("precision_auto_ms") else []),
        ("(c) deepwml segment end to end", f"{r['c_end_to_end_s']:.2f} s (c/b = {r['c_over_b']}, median of each repetition's own c/b {r['c_over_b_paired']}; c - b = {r['c_minus_b_s']:.2f} s)"),
        (f"    per case, {r['c_batch_cases']} cases in one run", f"{r['c_batch_per_case_s']:.2f} s (= {r['c_batch_per_case_over_b']} x b; start-up and loading paid once)"),
        ("    start-up floor", f"{r['startup_floor_s']:.2f} s (a process that only imports what (c) cannot do without, then exits)"),
        ("    ... with the networks ready", f"{r['startup_floor_networks_ready_s']:.2f} s (also loads every network and runs "
         f"each once on a blank slice; so c/b >= {r['c_over_b_lowest_possible']} for one case in a fresh process)"),
        ("(e) peak memory of (c)", "not measured on this system (no os.wait4: Windows)" if r["e_peak_rss_mb"] is None
         else f"{r['e_peak_rss_mb']:.0f} MiB"),
        ("(f) fp32 matrix product here", "not measured" if r.get("f_fp32_matmul_gflops") is None else
         f"{r['f_fp32_matmul_gflops']} GFLOP/s (the networks of (b) at {r['b_network_share_of_matmul']:.0%} of it; "
         "a CPU runs little fp32 work faster)"),
        ("mask agreement b vs a", f"Dice {r['mask_dice_b_vs_a']:.4f}" + (
            "" if r.get("brain_mask_dice_b_vs_a") is None else f" (brain mask {r['brain_mask_dice_b_vs_a']:.4f})")),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def register(subparsers) -> None:
    from .cli import add_debug_flag, help_path, non_negative_int, positive_int

    p = subparsers.add_parser("bench", help="measure segmentation speed and memory on this machine",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--input", help="FLAIR file (default: a real clinical FLAIR from ../shared, else the bundled "
                   f"sample, {help_path(SAMPLE)})")
    p.add_argument("--model", nargs="+", help="model file(s), or the name of a shipped model or ensemble (e.g. "
                   "ensemble-v8), as in deepwml segment (default: the shipped default model)")
    p.add_argument("--slices", type=non_negative_int, default=25, help="central axial slices to keep (default 25; 0 = all)")
    p.add_argument("--repeat", type=positive_int, default=3, help="timed repetitions (median reported; default 3)")
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads (default: torch's default)")
    p.add_argument("--backend", default="auto", choices=("auto", "openvino", "onnx", "torch"))
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                   help="as in deepwml segment (auto: bf16 with OpenVINO where the CPU computes it natively and "
                        "it is measured faster than fp32 there)")
    p.add_argument("--brain-model", metavar="FILE", help="brain-mask model (default: the shipped one, if any)")
    p.add_argument("--no-brain-mask", action="store_true",
                   help="time the WMH network alone: no brain-mask network in (a), (b) or (c)")
    p.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"),
                   help="cpu, the only one timed (auto: the CPU too); a GPU is not benchmarked here")
    p.add_argument("--json", help="also write the figures to this JSON file")
    add_debug_flag(p)
    p.set_defaults(func=_run)


def _run(args) -> int:
    from . import io
    from .errors import DeepWMLError
    from .segment import model_files

    if args.device == "cuda":  # an option of segment's, tried here: said plainly, not argparse's 'unrecognized'
        raise DeepWMLError("deepwml bench times the CPU only (every figure, (a) to (f), is a CPU run); to time a GPU, "
                           "run deepwml segment --device cuda on a folder of scans (it prints seconds per case)")
    from .inference import check_runtime

    # --precision bf16 on a CPU without native bf16, a backend not installed: refused before the scan is read and the
    # networks loaded (9 s here), as deepwml segment refuses them
    check_runtime("cpu", args.backend, args.precision)
    args.model = model_files(args.model)  # a shipped model's or ensemble's name stands for its file(s)
    if args.json:
        io.check_output_file(args.json)  # before minutes of timing, not after
    brain = None if args.no_brain_mask else (args.brain_model or "default")
    result = run_benchmark(args.input, args.model, args.slices, args.repeat, args.threads, args.backend, brain,
                           args.precision)
    print(format_table(result))
    if args.json:
        io.write_text(json.dumps(result, indent=1), args.json)
    return 0
