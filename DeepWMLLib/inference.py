"""Volume in, probability map out: slice-wise U-Net inference with batching, device choice,
progress and cancel, ensembles (probabilities averaged, MICCAI winner) and flip test-time augmentation.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from .checkpoint import LoadedModel, cache_dir
from .errors import Cancelled, DeepWMLError
from . import io
from .io import SliceFrame, axial_view, slice_frame
from .preprocessing import plan_volume

if TYPE_CHECKING:
    import SimpleITK as sitk

Progress = Callable[[float, str], None]


def progress_part(progress: Progress | None, start: float, end: float) -> Progress | None:
    """`progress` for one part of a longer job: the part's fractions 0-1 reported as `start`-`end`, so
    the job's 1.0 comes when its last part is done, not when this one is (None: None)."""
    if progress is None:
        return None
    return lambda fraction, message: progress(start + (end - start) * min(1.0, max(0.0, fraction)), message)


def _gpu_driver_present() -> bool:
    """Whether a driver that may offer CUDA is installed: NVIDIA's on Linux, WSL 2's GPU device, or
    NVIDIA's CUDA driver library on Windows (System32/nvcuda.dll, installed with the display driver)."""
    if io.WINDOWS:
        return os.path.exists(os.path.join(os.environ.get("SystemRoot", r"C:\Windows"), "System32", "nvcuda.dll"))
    return os.path.exists("/proc/driver/nvidia/version") or os.path.exists("/dev/dxg")


def _cuda_usable() -> bool:
    # Without a GPU driver there is no CUDA: answer without importing torch (seconds of start-up).
    if not _gpu_driver_present() and not os.environ.get("DEEPWML_PROBE_CUDA"):
        return False
    import torch

    return torch.cuda.is_available()


def resolve_device(device: str = "auto") -> str:
    """'cpu' or 'cuda[:N]' from auto/cpu/cuda; a clear error when CUDA is asked for but absent."""
    name = str(device).lower()
    if name == "auto":
        return "cuda" if _cuda_usable() else "cpu"
    if name.startswith("cuda"):
        if not _cuda_usable():
            raise DeepWMLError("--device cuda was asked for but no CUDA GPU is usable here; use --device cpu or auto")
        return name
    if name == "cpu":
        return "cpu"
    raise DeepWMLError(f"unknown device {device!r}; use auto, cpu or cuda")


def check_runtime(device: str = "auto", backend: str = "auto", precision: str = "auto") -> str:
    """The device `resolve_device` gives, once the options that choose how the networks run (--device, --backend,
    --precision) are checked as make_runner checks them for each network: refused at once, before an output folder
    is made or a scan read, in the words the runner would say them in. --precision bf16 on a CPU that does not compute
    bf16 natively is refused here too, asking the runtime that would run it (cpu_computes_bf16): PyTorch 2.13 does
    run bf16 autocast on an AVX2 CPU, but emulated, about 8 times slower than fp32 (21 s against 2.7 s for 4 slices of
    deepwml_unet32_v9 on a 2-core AMD EPYC Zen 3), and the runner refuses it, so each case was refused after its scan
    was read."""
    import importlib.util

    dev = resolve_device(device)
    _check_backend(backend, precision)
    if dev != "cpu":
        if backend in ("onnx", "openvino"):
            raise DeepWMLError(f"the {backend} backend runs on the CPU with a model file; use --device cpu")
        if precision == "bf16":
            raise PrecisionUnavailable(on_gpu=True)
        return dev
    if backend == "openvino" and importlib.util.find_spec("openvino") is None:
        raise DeepWMLError("the openvino backend needs OpenVINO: pip install openvino")
    if backend == "onnx" and importlib.util.find_spec("onnxruntime") is None:
        raise DeepWMLError("the onnx backend needs onnxruntime: pip install onnxruntime onnx")
    if precision == "bf16" and not cpu_computes_bf16(backend):
        raise PrecisionUnavailable()
    return dev


def cpu_computes_bf16(backend: str = "auto") -> bool:
    """Whether the runtime that runs --precision bf16 on this CPU with `backend` computes bf16 natively, as its runner
    asks it: OpenVINO where it runs (--backend openvino, or auto with OpenVINO installed: make_runner tries it first),
    else PyTorch (torch_cpu_has_native_bf16)."""
    if backend in ("auto", "openvino"):
        try:
            return _openvino_computes_bf16(_openvino_core())
        except Exception:  # OpenVINO not installed or not working: auto runs PyTorch (make_runner)
            if backend == "openvino":
                return True  # its runner says what is wrong with it ("OpenVINO could not run ...")
    return torch_cpu_has_native_bf16()


def default_batch_size(device: str) -> int:
    """PyTorch's batch: 16 slices on a GPU (halved on out-of-memory), 4 on the CPU."""
    return 16 if device.startswith("cuda") else 4


class PrecisionUnavailable(DeepWMLError):
    """bf16 asked for where it cannot run: on a CPU that does not compute it natively (`on_gpu` False), or on a
    GPU. The words are deepwml segment's (--precision); the Slicer module names its panel's Precision and Device
    instead (CoreLogic.precisionAdvice)."""

    def __init__(self, on_gpu: bool = False):
        self.on_gpu = bool(on_gpu)
        super().__init__("--precision bf16 is for the CPU; on a GPU PyTorch runs with fp16 autocast" if self.on_gpu
                         else "--precision bf16 needs a CPU with native bf16 (AMX or AVX512-BF16); use fp32 or auto")

    def __reduce__(self):  # whole from the Slicer module's worker process
        return type(self), (self.on_gpu,)


# Precision auto on a CPU that computes bf16 natively: bf16 is not always the faster there. The WMH network per
# 256x256 slice, 2 cores: an Intel Xeon with AMX 4.8 ms in OpenVINO bf16 against 21 ms in fp32 (session 10); an AMD
# EPYC Zen 4 (AVX512-BF16, no AMX) the README's first command 2.2 s in bf16 against 3.6 s in fp32 (session 20); but an
# Intel Xeon whose AMX the virtual machine does not pass through (AVX512-BF16 and AVX512-FP16 alone, session 51) 129 ms
# in bf16 against 71 ms in fp32 (PyTorch: 139 against 84 ms). So auto times the two once per runtime, CPU, thread count
# and network shape, keeps bf16 only where it is at least BF16_FASTER_BY faster (bf16 rounds: masks against fp32's
# Dice 0.99-1.0, so a small gain is not worth it), and keeps the answer in the cache (precision/), so that every
# later run on this machine computes in the same precision without timing again.
BF16_FASTER_BY = 1.15
_BF16_ROUNDS = 3
_BF16_CHOICES: dict = {}  # this process's measurements (as kept in the cache), by key


def _bf16_key(runtime: str, version: str, loaded: LoadedModel, threads: int) -> str:
    import hashlib
    import json

    shape = json.dumps([loaded.config, list(loaded.preprocessing.grid_size)], sort_keys=True, default=str)
    return f"{runtime}-{_machine_key(version)}-{threads}t-{hashlib.sha1(shape.encode('utf-8')).hexdigest()[:12]}"


def bf16_measured(runtime: str, version: str, loaded: LoadedModel, threads: int) -> dict | None:
    """What bf16_is_faster measured (or read) in this process for these arguments: {"bf16": the answer, "fp32_ms",
    "bf16_ms": the fastest run of each, ...}; None where it was not asked."""
    return _BF16_CHOICES.get(_bf16_key(runtime, version, loaded, threads))


def bf16_known(runtime: str, version: str, loaded: LoadedModel, threads: int) -> bool | None:
    """bf16_is_faster's answer where this process or the cache has it, without measuring; None where it has not been
    measured yet (or its record cannot be read)."""
    import json

    key = _bf16_key(runtime, version, loaded, threads)
    if key in _BF16_CHOICES:
        return _BF16_CHOICES[key]["bf16"]
    try:
        record = json.loads((cache_dir() / "precision" / f"{key}.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # not measured yet here, or unreadable: measure
    if isinstance(record, dict) and isinstance(record.get("bf16"), bool):
        _BF16_CHOICES[key] = record
        return record["bf16"]
    return None


def bf16_is_faster(runtime: str, version: str, loaded: LoadedModel, threads: int, run: dict) -> bool:
    """Whether `run["bf16"]` beats `run["fp32"]` by BF16_FASTER_BY on one slice of `loaded`'s grid (the fastest of
    _BF16_ROUNDS alternating runs each, after one run each to warm them up), as measured once for this runtime
    and version, this CPU (_machine_key), `threads` and the network's shape (its settings, not its weights: an
    ensemble's members share the answer), and kept in the cache. A cache that cannot be read or written costs the
    timing in each process, not the run. One measurement at a time in a process (_BF16_LOCK): two at once (runners
    built outside make_runner's lock: a scan-adapted model, the CPU taking over from a GPU) would slow each other
    down, and the second asks the memo the first has filled."""
    with _BF16_LOCK:
        return _bf16_is_faster(runtime, version, loaded, threads, run)


_BF16_LOCK = threading.Lock()


def _bf16_is_faster(runtime: str, version: str, loaded: LoadedModel, threads: int, run: dict) -> bool:
    import json

    known = bf16_known(runtime, version, loaded, threads)
    if known is not None:
        return known
    key = _bf16_key(runtime, version, loaded, threads)
    memo = cache_dir() / "precision" / f"{key}.json"
    x = np.random.default_rng(0).standard_normal((1, 1, *loaded.preprocessing.grid_size)).astype(np.float32)
    best = {"fp32": float("inf"), "bf16": float("inf")}
    for name in best:
        run[name](x)  # the first run of each pays for its buffers and kernels
    for _ in range(_BF16_ROUNDS):
        for name in best:
            started = time.perf_counter()
            run[name](x)
            best[name] = min(best[name], time.perf_counter() - started)
    answer = best["bf16"] * BF16_FASTER_BY <= best["fp32"]
    record = {"bf16": answer, "fp32_ms": round(best["fp32"] * 1e3, 2), "bf16_ms": round(best["bf16"] * 1e3, 2),
              "runtime": f"{runtime} {version}", "threads": threads, "faster_by_needed": BF16_FASTER_BY}
    _BF16_CHOICES[key] = record
    tmp = memo.with_name(f"{memo.name}.{os.getpid()}.part")
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(record, indent=1), encoding="utf-8")
        io._replace(tmp, memo)
    except OSError:  # an unwritable cache: measured again by the next process
        with contextlib.suppress(OSError):
            tmp.unlink()
    return answer


def torch_cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively for PyTorch (AVX512-BF16 or AMX); False when unknown. PyTorch says so
    from 2.11 (torch.cpu._is_avx512_bf16_supported, _is_amx_tile_supported); an earlier one, which pyproject allows
    and whose oneDNN computes bf16 natively all the same, has no such query: Linux's CPU flags tell it then (without
    them every such CPU, a Zen 4 or a Sapphire Rapids, was answered False and --precision bf16 refused on it)."""
    import torch

    answers = []
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        check = getattr(torch.cpu, name, None)
        try:
            if check is not None:
                answers.append(bool(check()))
        except Exception:  # an unusual build: this query unanswered
            pass
    if answers:
        return any(answers)
    return bool(_linux_cpu_flags() & {"avx512_bf16", "amx_bf16"})


def _linux_cpu_flags() -> set:
    """The first processor's flags in Linux's /proc/cpuinfo; empty elsewhere."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def _network_on(loaded: LoadedModel, device):
    """`loaded`'s network on `device` (a torch.device): the network itself when it is there already, else
    a copy there, so that runners on other devices (kept in _RUNNERS) keep theirs where it is."""
    model = loaded.model
    current = next(model.parameters()).device
    if current.type == device.type and (device.index is None or current.index == device.index):
        return model
    from .model import build_model

    copy = build_model(loaded.config)  # built on the CPU: copying to the CPU needs no room on the GPU
    copy.load_state_dict({k: v.detach().to("cpu") for k, v in model.state_dict().items()})
    return copy.to(device)


class TorchRunner:
    """Eager PyTorch: channels-last on CPU (faster convolutions), bf16 autocast on CPUs that compute
    bf16 natively (precision bf16, or auto where bf16 is measured faster: bf16_is_faster), fp16 autocast on CUDA
    (unless precision is fp32)."""

    name = "torch"
    measured = None  # precision auto where bf16 is native: bf16_measured's record

    def __init__(self, loaded: LoadedModel, device: str, precision: str = "auto"):
        import torch

        self.torch = torch
        self.loaded = loaded
        self.precision = precision
        self.device = torch.device(device)
        self.model = _network_on(loaded, self.device).eval()
        self.bf16 = False
        self.fp16 = self.device.type == "cuda" and precision != "fp32"  # fp16 autocast on a GPU unless fp32 is asked
        if self.device.type == "cpu":
            self.model = self.model.to(memory_format=torch.channels_last)
            native = torch_cpu_has_native_bf16()
            if precision == "bf16" and not native:
                raise PrecisionUnavailable()
            self.bf16 = precision == "bf16" or (precision == "auto" and native)
            if precision == "auto" and native:
                run = {"fp32": lambda x: self._run(x, bf16=False), "bf16": lambda x: self._run(x, bf16=True)}
                self.bf16 = bf16_is_faster("torch", torch.__version__, loaded, torch.get_num_threads(), run)
                self.measured = bf16_measured("torch", torch.__version__, loaded, torch.get_num_threads())
        elif precision == "bf16":
            raise PrecisionUnavailable(on_gpu=True)
        if self.bf16 or self.fp16:
            self.name = "torch bf16" if self.bf16 else "torch fp16"
        self.out_of_memory = (torch.cuda.OutOfMemoryError,)
        self.default_batch_size = default_batch_size(device)

    def release_memory(self) -> None:
        self.torch.cuda.empty_cache()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self._run(batch, self.bf16)

    def _run(self, batch: np.ndarray, bf16: bool) -> np.ndarray:
        torch = self.torch
        x = torch.from_numpy(batch).to(self.device, non_blocking=True)
        cuda = self.device.type == "cuda"
        if not cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.fp16:
            autocast = torch.autocast("cuda", dtype=torch.float16)
        elif bf16:
            autocast = torch.autocast("cpu", dtype=torch.bfloat16)
        else:
            autocast = contextlib.nullcontext()
        with torch.inference_mode(), autocast:
            return self.model(x).float().cpu().numpy()


class OnnxRunner:
    """ONNX Runtime on the CPU: several times faster than eager PyTorch for this network on small CPUs.

    The model is exported once per model file and cached (keyed by the file's content hash).
    """

    name = "onnxruntime"
    out_of_memory = ()
    # One slice per run. A fresh process pays for every new buffer ONNX Runtime touches (page faults
    # and the kernel zeroing the pages), and a batch of 4 256x256 slices touches four times the
    # memory of one. In fresh processes the WMH network's first 4 slices took 49 ms longer than the
    # next 4 in batches of 4 (103 ms of system time, 33 600 page faults) and 13 ms longer one by one
    # (26 ms, 8 400 faults), while the next 4 took 199-203 ms either way (medians of 6 fresh
    # processes each: Testing/benchmarks/first_run.py).
    default_batch_size = 1

    def release_memory(self) -> None:
        pass

    def __init__(self, loaded: LoadedModel, threads: int | None = None):
        import onnxruntime as ort

        self.loaded = loaded
        path = self._exported(loaded)
        # The graph as ONNX Runtime optimises it for this CPU is saved next to the export the first
        # time and loaded as it is afterwards: building a session then skips the optimisation passes
        # (about 30 ms of every `deepwml segment`). Some passes depend on the CPU's instruction set (the
        # convolution weights are stored in blocks of its vector width: 16 channels with AVX-512, 8 with AVX2,
        # which another CPU reads wrongly, without an error), so the saved graph is keyed by the runtime's
        # version and the CPU's instruction sets (_machine_key).
        optimised = path.with_name(f"{path.stem}.{_machine_key(ort.__version__)}.opt.onnx")
        self.session = None
        if optimised.is_file():
            try:
                self.session = self._session(ort, optimised, threads, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
            except Exception:  # unreadable (a partial copy, a foreign runtime): optimise afresh
                self.session = None
        if self.session is None:
            tmp = optimised.with_name(f"{optimised.name}.{os.getpid()}.part")
            try:
                self.session = self._session(ort, path, threads, ort.GraphOptimizationLevel.ORT_ENABLE_ALL, tmp)
                io._replace(tmp, optimised)
            except Exception:  # a read-only cache only costs the optimisation next time
                with contextlib.suppress(OSError):
                    tmp.unlink()
                if self.session is None:
                    self.session = self._session(ort, path, threads, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)

    @staticmethod
    def _session(ort, path: Path, threads: int | None, level, save_to: Path | None = None):
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or _cpu_threads()
        options.graph_optimization_level = level
        options.log_severity_level = 3
        # No memory pattern: ORT would trace the first run of each batch shape to plan one block for
        # the next runs. A `deepwml segment` process runs each shape once or a few times, so the
        # tracing was pure cost: 0.13 s against 0.04 s of first-run overhead (median of 8 fresh
        # processes each), with warm runs as fast as before (the arena still recycles buffers).
        options.enable_mem_pattern = False
        if save_to is not None:
            options.optimized_model_filepath = str(save_to)
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    @staticmethod
    def _exported(loaded: LoadedModel) -> Path:
        target = cache_dir() / "onnx" / f"{loaded.digest}.onnx"
        if target.is_file():
            return target
        try:
            return OnnxRunner._export(loaded, target)
        except OSError as exc:  # the cache cannot be written: export for this process alone
            warnings.warn(f"the model cache {cache_dir()} cannot be written ({exc.strerror or exc}): the network is "
                          f"exported anew in each run; set DEEPWML_CACHE_DIR to a writable folder", stacklevel=2)
            return OnnxRunner._export(loaded, _process_folder() / f"{loaded.digest}.onnx")

    @staticmethod
    def _export(loaded: LoadedModel, target: Path) -> Path:
        import torch

        target.parent.mkdir(parents=True, exist_ok=True)
        size = tuple(loaded.preprocessing.grid_size)
        model = _network_on(loaded, torch.device("cpu")).eval()
        tmp = target.with_suffix(f".{os.getpid()}.part")
        # torch 2.9 and later export with dynamo by default; torch before 2.5 has no dynamo argument.
        legacy = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(model, torch.zeros(1, 1, *size), str(tmp), input_names=["flair"],
                                  output_names=["logits"], dynamic_axes={"flair": {0: "batch"}, "logits": {0: "batch"}},
                                  opset_version=17, **legacy)
        except BaseException:  # a full disk, or Ctrl-C: no partial export stays in the cache
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        try:
            io._replace(tmp, target)  # retried on Windows (a virus scanner holding the new file a moment)
        except OSError:
            if not target.is_file():
                raise
            # another DeepWML process exported the same network meanwhile and holds it open (Windows refuses
            # to replace an open file): its copy is the same network
            with contextlib.suppress(OSError):
                tmp.unlink()
        return target

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"flair": np.ascontiguousarray(batch, dtype=np.float32)})[0]


_PROCESS_FOLDER = None


def _process_folder() -> Path:
    """A temporary folder of this process (removed at exit), for exports when the cache cannot be written."""
    global _PROCESS_FOLDER
    if _PROCESS_FOLDER is None:
        import atexit
        import shutil
        import tempfile

        _PROCESS_FOLDER = Path(tempfile.mkdtemp(prefix="deepwml-"))
        atexit.register(shutil.rmtree, _PROCESS_FOLDER, ignore_errors=True)
    return _PROCESS_FOLDER


def remove_process_folder() -> None:
    """Remove `_process_folder` now (the command line ends its process with os._exit, past atexit)."""
    if _PROCESS_FOLDER is not None:
        import shutil

        shutil.rmtree(_PROCESS_FOLDER, ignore_errors=True)


class OpenVinoRunner:
    """OpenVINO on the CPU, in bf16 where the CPU computes bf16 natively (AMX or AVX512-BF16) and bf16 is measured
    faster than fp32 here (bf16_is_faster), else fp32.

    It reads the same cached ONNX export as `OnnxRunner`. On a 2-core Xeon with AMX the WMH network
    took 4.8 ms per 256x256 slice in bf16 against 24 ms with ONNX Runtime (fp32) and 21 ms with
    OpenVINO in fp32 (Testing/benchmarks/README.md, session 10, where the masks are compared with fp32's).
    """

    name = "openvino"
    measured = None  # precision auto where bf16 is native: bf16_measured's record
    out_of_memory = ()
    default_batch_size = 1  # as ONNX Runtime: the least new memory for a fresh process

    def release_memory(self) -> None:
        pass

    def __init__(self, loaded: LoadedModel, precision: str = "auto", threads: int | None = None):
        core = _openvino_core()
        self.loaded = loaded
        self.precision = _openvino_precision(core, precision)
        threads = threads or _cpu_threads()
        path = str(OnnxRunner._exported(loaded))
        measure = precision == "auto" and self.precision == "bf16"
        if measure:
            import openvino

            version = openvino.__version__
            known = bf16_known("openvino", version, loaded, threads)
            if known is not None:  # measured before: only the precision chosen is compiled
                self.precision = "bf16" if known else "fp32"
        self.request = self._compile(core, path, self.precision, threads).create_infer_request()
        if measure and known is None:
            fp32 = self._compile(core, path, "fp32", threads).create_infer_request()
            run = {"fp32": lambda x: fp32.infer({0: x}), "bf16": lambda x: self.request.infer({0: x})}
            if not bf16_is_faster("openvino", version, loaded, threads, run):
                self.precision, self.request = "fp32", fp32
        if measure:
            self.measured = bf16_measured("openvino", version, loaded, threads)
        self.name = f"openvino {self.precision}"
        # Runners are kept and shared between calls (_RUNNERS); an infer request must not run twice at
        # once, so two segmentations in two threads (e.g. in Slicer) take turns on it.
        self._lock = threading.Lock()

    @staticmethod
    def _compile(core, path: str, precision: str, threads: int):
        config = {"INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
                  "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads}
        try:
            # OpenVINO keeps each network compiled for this CPU in the cache and loads it from there
            # the next time: 4 networks took 0.24 s to compile in a fresh process and 0.09 s to load.
            return core.compile_model(path, "CPU", {**config, "CACHE_DIR": str(cache_dir() / "openvino")})
        except Exception:  # an unwritable or damaged cache only costs the compilation
            return core.compile_model(path, "CPU", config)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        with self._lock:  # the request's output buffer is reused by its next run: copy it out
            return np.array(self.request.infer({0: np.ascontiguousarray(batch, dtype=np.float32)})[0], copy=True)


_OPENVINO_CORE = None


def _openvino_core():
    global _OPENVINO_CORE
    if _OPENVINO_CORE is None:
        _OPENVINO_CORE = _import_openvino().Core()
    return _OPENVINO_CORE


_OPENVINO_CONVERTER = "openvino.tools.ovc"


def _import_openvino():
    """`import openvino`; in a `deepwml` command-line process without OpenVINO's model converter.

    OpenVINO's package imports its model converter (and with it its telemetry and numpy.ma) when it
    is imported, if it can: 0.09 s against 0.03 s without it here, a sixth of what a fresh
    `deepwml segment` spends besides the networks. DeepWML never converts models with it (it reads
    the ONNX export), so the command line, which is a process of its own, blocks that import; as a
    library (in Slicer, say), where other code may want the converter, it imports OpenVINO whole.
    A version of OpenVINO that cannot do without the converter is imported whole as well.
    """
    cli = sys.modules.get(f"{__package__}.cli")
    if getattr(cli, "OWN_PROCESS", False) and "openvino" not in sys.modules and _OPENVINO_CONVERTER not in sys.modules:
        sys.modules[_OPENVINO_CONVERTER] = None  # importing it now raises ImportError, which openvino allows
        try:
            import openvino

            return openvino
        except ImportError:
            for name in [n for n in sys.modules if n == "openvino" or n.startswith("openvino.")]:
                del sys.modules[name]  # a partial import: start again below
        finally:
            if _OPENVINO_CONVERTER in sys.modules and sys.modules[_OPENVINO_CONVERTER] is None:
                del sys.modules[_OPENVINO_CONVERTER]  # a later explicit import of the converter still works
    import openvino

    return openvino


def _openvino_precision(core, precision: str) -> str:
    """'bf16' or 'fp32': 'auto' is bf16 when this CPU computes bf16 natively (OpenVINO reports BF16); the runner
    then keeps it only where it is measured faster here (bf16_is_faster)."""
    native = _openvino_computes_bf16(core)
    if precision == "auto":
        return "bf16" if native else "fp32"
    if precision == "bf16" and not native:
        raise PrecisionUnavailable()
    return precision


def _openvino_computes_bf16(core) -> bool:
    """Whether OpenVINO reports this CPU computing bf16 natively (BF16 among its optimisation capabilities)."""
    return "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def _machine_key(runtime_version: str) -> str:
    """Short key of the runtime version and this CPU's model and instruction sets: Linux's /proc/cpuinfo
    flags, elsewhere the ones numpy finds at run time. The processor's name (Windows' "Intel64 Family 6 Model
    85 Stepping 7, GenuineIntel", macOS's "i386" for every Intel Mac) does not tell them: a virtual machine,
    the BIOS or the system may turn AVX-512 off on the same model."""
    import hashlib
    import platform

    facts = [runtime_version, platform.machine()]
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features", "model name")):
                    facts.append(line.strip())
                if line.startswith(("flags", "Features")):
                    break  # the first processor's are enough
    except OSError:
        facts.append(platform.processor())
        facts.extend(sorted(name for name, found in _numpy_cpu_features().items() if found))
    return hashlib.sha1("\n".join(facts).encode()).hexdigest()[:12]


def _numpy_cpu_features() -> dict:
    """{instruction set: found} as numpy detects them at run time (what the CPU has and the system allows);
    {} where this numpy does not say."""
    try:
        from numpy._core._multiarray_umath import __cpu_features__  # numpy 2
    except ImportError:
        try:
            from numpy.core._multiarray_umath import __cpu_features__  # numpy 1.20 and later
        except ImportError:
            return {}
    return __cpu_features__


def _cpu_threads() -> int:
    env = os.environ.get("OMP_NUM_THREADS")
    return int(env) if env and env.isdigit() else len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# Runners of recently used model files, so that a cohort or repeated runs in Slicer build each ONNX
# session or device copy once. Keyed by the file's content hash; small, since each holds a network,
# but room for an ensemble of up to five members plus the brain-mask network.
_RUNNERS: dict = {}
_RUNNERS_KEPT = 6
_BUILDING = [0.0]  # seconds spent building the runners above, in all (building_seconds)


BACKENDS = ("auto", "openvino", "onnx", "torch")
PRECISIONS = ("auto", "fp32", "bf16")


def _check_backend(backend: str, precision: str) -> None:
    """--backend and --precision each one DeepWML knows, and bf16 not asked of ONNX Runtime (check_runtime, make_runner)."""
    if backend not in BACKENDS:
        raise DeepWMLError(f"unknown backend {backend!r}; use {', '.join(BACKENDS)}")
    if precision not in PRECISIONS:
        raise DeepWMLError(f"unknown precision {precision!r}; use {', '.join(PRECISIONS)}")
    if precision == "bf16" and backend == "onnx":
        raise DeepWMLError("--precision bf16 runs with the openvino or torch backend, not onnx (fp32 only)")


def make_runner(loaded: LoadedModel, device: str, backend: str = "auto", precision: str = "auto"):
    """The fastest available way to run `loaded` on `device`.

    backend: 'auto' (on the CPU: OpenVINO, else ONNX Runtime, else PyTorch), 'openvino', 'onnx' or
    'torch'. precision: 'auto' (bf16 with OpenVINO or PyTorch on a CPU that computes bf16 natively where it is
    measured faster than fp32 there, bf16_is_faster, else fp32; fp32 with ONNX Runtime, fp16 autocast on CUDA),
    'fp32', or 'bf16' (OpenVINO or PyTorch on such a CPU).
    """
    _check_backend(backend, precision)
    if not loaded.digest:
        return _new_runner(loaded, device, backend, precision)
    key = (loaded.digest, device, backend, precision, os.environ.get("OMP_NUM_THREADS"))
    with _RUNNERS_LOCK:  # two segmentations at once (threads, Slicer) build one runner, not two that may differ
        runner = _RUNNERS.pop(key, None)
        if runner is None:
            started = time.monotonic()
            runner = _new_runner(loaded, device, backend, precision)
            _BUILDING[0] += time.monotonic() - started
        _RUNNERS[key] = runner  # most recently used last
        while len(_RUNNERS) > _RUNNERS_KEPT:
            _RUNNERS.pop(next(iter(_RUNNERS)))
    return runner


def building_seconds() -> float:
    """The seconds this process has spent building the runners it keeps: a batch's progress bar leaves them out of
    its time per case left (the first case builds them, the others reuse them)."""
    return _BUILDING[0]


# Building a runner may export the network to ONNX (torch.onnx.export is not thread-safe) into one temporary
# file per process: one thread at a time.
_RUNNERS_LOCK = threading.RLock()


def _new_runner(loaded: LoadedModel, device: str, backend: str, precision: str = "auto"):
    if device != "cpu" or backend == "torch" or not loaded.digest:
        if backend in ("onnx", "openvino"):
            raise DeepWMLError(f"the {backend} backend runs on the CPU with a model file; use --device cpu")
        return TorchRunner(loaded, device, precision)
    if backend in ("auto", "openvino"):
        try:
            return OpenVinoRunner(loaded, precision)
        except ImportError:
            if backend == "openvino":
                raise DeepWMLError("the openvino backend needs OpenVINO: pip install openvino") from None
        except DeepWMLError:
            raise
        except Exception as exc:  # a runtime problem must not stop a segmentation
            if backend == "openvino":
                raise DeepWMLError(f"OpenVINO could not run {loaded.name} ({type(exc).__name__}: {exc})") from exc
            warnings.warn(f"OpenVINO unavailable for {loaded.name} ({type(exc).__name__}); using the next runtime",
                          stacklevel=2)
    if precision == "bf16":  # ONNX Runtime computes in fp32 only
        return TorchRunner(loaded, device, precision)
    try:
        return OnnxRunner(loaded)
    except ImportError:
        if backend == "onnx":
            raise DeepWMLError("the onnx backend needs onnxruntime: pip install onnxruntime onnx") from None
    except Exception as exc:  # an export or runtime problem must not stop a segmentation
        if backend == "onnx":
            raise DeepWMLError(f"ONNX Runtime could not run {loaded.name} ({type(exc).__name__}: {exc})") from exc
        warnings.warn(f"ONNX Runtime unavailable for {loaded.name} ({type(exc).__name__}); using PyTorch", stacklevel=2)
    return TorchRunner(loaded, device, precision)


def _sigmoid(logits: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(logits, -60, 60)))


def check_batch_size(batch_size) -> None:
    """A DeepWMLError unless `batch_size` is None (the runner's default) or a positive whole number."""
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer))
                                   or batch_size < 1):
        raise DeepWMLError(f"batch size must be a positive whole number of slices (or None for the default), "
                           f"got {batch_size!r}")


CPU_FALLBACK = "CPU after GPU out of memory"  # in the name of the runner that took over


def _cpu_fallback(runner) -> TorchRunner:
    """PyTorch on the CPU, at `runner`'s precision, with a network of its own (`runner` keeps its GPU copy)."""
    fallback = TorchRunner(runner.loaded, "cpu", getattr(runner, "precision", "auto"))
    fallback.name = f"{fallback.name} ({CPU_FALLBACK})"
    return fallback


def predict_network_slices(slices: np.ndarray, runner, batch_size: int, tta: bool = False,
                           on_batch: Callable[[int], None] | None = None, cancel=None,
                           ran: list | None = None) -> np.ndarray:
    """[n, H, W] normalised network-grid slices -> [n, H, W] probabilities (float32).

    `on_batch(done)` is called after each batch. On CUDA out-of-memory the batch is halved; when
    even one slice does not fit, the rest runs on the CPU. `ran`, when given, receives the name of
    each runner that ran a batch (once each).
    """
    check_batch_size(batch_size)
    out = np.zeros(slices.shape, dtype=np.float32)
    n = slices.shape[0]
    start = 0
    while start < n:
        if cancel is not None and cancel():
            raise Cancelled()
        batch = slices[start:start + batch_size, None]
        try:
            probabilities = _sigmoid(runner(batch))
            if tta:  # left-right flip: the brain is roughly symmetric, the network's errors are not
                probabilities = (probabilities + _sigmoid(runner(np.ascontiguousarray(batch[..., ::-1])))[..., ::-1]) / 2
        except runner.out_of_memory:
            runner.release_memory()
            if batch_size > 1:
                batch_size //= 2
                warnings.warn(f"GPU out of memory: batch size reduced to {batch_size}", stacklevel=2)
            else:
                warnings.warn("GPU out of memory even for one slice: continuing on the CPU", stacklevel=2)
                runner = _cpu_fallback(runner)
            continue
        if ran is not None and runner.name not in ran:
            ran.append(runner.name)
        out[start:start + batch.shape[0]] = probabilities[:, 0]
        start += batch.shape[0]
        if on_batch is not None:
            on_batch(start)
    return out


# Slices go through preprocessing, the network and back in chunks, so memory stays a small multiple
# of the input volume however many slices it has.
CHUNK_SLICES = 32
# A chunk's maps are put back on the input grid this many slices at a time: the input grid's copies of a chunk (a
# float32 map of 32 slices and its half-way pass, 0.13 GB each at 1024 x 1024) were the networks' end's peak
INPUT_SLICES = 8
MIN_INPLANE_PIXELS = 4  # an axial slice narrower than this is no cross-section of a head (one to three sagittal slices)


def predict_probabilities(image: sitk.Image, models: Sequence[LoadedModel], device: str = "auto",
                          batch_size: int | None = None, tta: bool = False, progress: Progress | None = None,
                          cancel=None, backend: str = "auto", precision: str = "auto") -> tuple[np.ndarray, SliceFrame]:
    """Probability of WMH for every voxel, as an axial stack on the input grid (see io.to_axial_stack).

    With several models, each model's map is resampled back to the input grid and the maps are averaged.
    """
    lesion, _, _, frame = predict_maps(image, models, None, device, batch_size, tta, progress, cancel, backend,
                                        precision=precision)
    return lesion, frame


def network_cost(loaded: LoadedModel) -> float:
    """A network's relative cost per slice, for the progress bar: a U-Net's convolutions cost about
    base_channels squared times the grid's pixels at every level (channels double as the sides halve)."""
    config, (rows, columns) = loaded.config, loaded.preprocessing.grid_size
    return float(config.get("base_channels", 1)) ** 2 * rows * columns * (int(config.get("depth", 0)) + 1)


class NaNProbabilities(DeepWMLError):
    """A network gave NaN probabilities, which pass no threshold: its result would mark nothing. `model` names it,
    `runner` how it ran (the runners' names: 'torch fp16', 'openvino bf16'...). The advice is deepwml segment's
    (--precision fp32 when it ran in reduced precision, which can overflow); the Slicer module names its panel's
    Precision instead (CoreLogic.nanAdvice)."""

    def __init__(self, model: str, runner: str):
        self.model, self.runner = model, runner
        if self.reduced:
            advice = "rerun with --precision fp32, and if that fails too, the model file is at fault"
        else:
            advice = "it ran in full precision (fp32), so the model file is at fault: segment with another model"
        super().__init__(f"{self.what}: its result would mark nothing; {advice}")

    @property
    def what(self) -> str:
        return f"{self.model} gave NaN probabilities (running as {self.runner})"

    @property
    def reduced(self) -> bool:
        """Whether it ran in reduced precision (fp16 or bf16), which can overflow where fp32 does not."""
        return "fp16" in self.runner or "bf16" in self.runner

    def __reduce__(self):  # whole from the Slicer module's worker process
        return type(self), (self.model, self.runner)


# Network-pixel shifts of the grid whose lesion maps `predict_maps` averages, by how many (--grid-phases): the
# network's marks depend on the sub-pixel phase at which a slice is sampled (half a pixel moved: Dice 0.78-0.90
# against the unmoved grid's on real scans), so a follow-up scan, sampled at another phase of the head, shows
# small lesions 'new' or 'gone' that are sampling noise. Averaging phases half a pixel apart steadies the map.
GRID_PHASES = {1: ((0.0, 0.0),), 4: ((0.0, 0.0), (0.5, 0.0), (0.0, 0.5), (0.5, 0.5))}


def check_grid_phases(phases) -> None:
    """A DeepWMLError unless `phases` is one of GRID_PHASES' counts."""
    if isinstance(phases, bool) or phases not in GRID_PHASES:
        raise DeepWMLError(f"grid phases must be {' or '.join(map(str, GRID_PHASES))}, got {phases!r}")


def _on_input(grid, maps: np.ndarray, chunk: np.ndarray):
    """(slices, their maps on the input grid) of a chunk's network `maps` (slices `chunk`), INPUT_SLICES at a time:
    the same numbers, each slice resampled on its own."""
    for first in range(0, chunk.size, INPUT_SLICES):
        yield chunk[first:first + INPUT_SLICES], grid.to_input(maps[first:first + INPUT_SLICES])


def predict_maps(image: sitk.Image, models: Sequence[LoadedModel], brain_model: LoadedModel | None = None,
                 device: str = "auto", batch_size: int | None = None, tta: bool = False,
                 progress: Progress | None = None, cancel=None, backend: str = "auto",
                 facts: dict | None = None, precision: str = "auto", ventricle_model: LoadedModel | None = None,
                 phases: int = 1, brain_threshold: float | None = None, ventricle_threshold: float | None = None,
                 lesion_image: bool = False) -> tuple[np.ndarray | sitk.Image, np.ndarray | None, np.ndarray | None,
                                                      SliceFrame]:
    """(lesion, brain, ventricles, frame): the WMH probability map (models averaged, as
    `predict_probabilities`), with a `brain_model` its intracranial probability map and with a
    `ventricle_model` its lateral-ventricle probability map (else None); axial stacks on the input
    grid. Slices outside the head get 0 in all. With `brain_threshold` (> 0) the brain map comes as its mask
    instead, uint8, 1 where the probability is >= it: thresholded a chunk of slices at a time, the float32 map is
    never held (1.07 GB of a 1024 x 1024 x 400 scan with 255 slices run, where the mask is 0.27 GB); so does the
    ventricle map with `ventricle_threshold`. `facts`, when given, receives `head_voxels` (the
    normalisation's head mask), `slices_run`, `slices_below_head` (slices left out as neck and shoulders:
    preprocessing.HEAD_HEIGHT_MM) and `runner` (how the networks ran: the runners' distinct names, joined by ", ").
    `phases` (GRID_PHASES): the lesion map is the mean of the maps of the grid moved by each phase's shift, each
    resampled onto the input grid; the brain and ventricle maps come from the unmoved grid. With `lesion_image` the
    lesion map comes as an image on the input grid, of the input's kind (io.blank_map), its slices written into it
    as they are done: no map of the whole volume beside it. `models` may be empty where a helper is given (`deepwml
    export`'s split of a mask given: the brain and ventricle networks alone); the lesion map is then all 0."""
    if not models and brain_model is None and ventricle_model is None:
        raise DeepWMLError("no model given")
    check_batch_size(batch_size)
    check_grid_phases(phases)
    dev = resolve_device(device)
    frame = slice_frame(image)
    # only read, slices at a time, and as float32 whatever the voxel type (preprocessing): no copy of the volume (a
    # uint16 scan's float32 copy was 4 bytes a voxel beside its own 2, through the networks)
    stack = axial_view(image, frame)
    if min(stack.shape[1:]) < MIN_INPLANE_PIXELS:
        raise DeepWMLError(f"the image's axial slices are only {stack.shape[1]} x {stack.shape[2]} pixels, too narrow to "
                           "segment (one sagittal or coronal slice, or a few?); DeepWML segments axial slices and "
                           "needs the head's whole cross-section: give the full volume")
    if progress:
        progress(0.0, "normalising")
    helpers = [m for m in (brain_model, ventricle_model) if m is not None]  # one map each, not averaged
    networks = list(models) + helpers
    plan = plan_volume(stack, frame, {m.preprocessing for m in networks})
    kept = plan.kept
    runners = [make_runner(m, dev, backend, precision) for m in networks]
    if facts is not None:
        facts.update(head_voxels=plan.head_voxels, slices_run=int(kept.size), slices_below_head=plan.below_head,
                     runner=", ".join(dict.fromkeys(r.name for r in runners)))
    if batch_size is None:
        batch_size = min(r.default_batch_size for r in runners)
    ran: list = []  # names of the runners that ran batches, a CPU fallback's included
    # numpy's zeros (a Volume's map's too) take memory on first write: the slices not run (outside the head) hold none
    # (0.6 GB of 1.6 GB at 1024 x 1024 x 400); SimpleITK writes its image's zeros
    total = io.blank_map(frame) if lesion_image else np.zeros(stack.shape, dtype=np.float32)
    for cut in (brain_threshold, ventricle_threshold):
        if cut is not None and not cut > 0:  # the slices not run are 0: outside the mask
            raise ValueError(f"a map's threshold must be > 0, got {cut}")
    cuts = [brain_threshold if m is brain_model else ventricle_threshold for m in helpers]
    helper_maps = [np.zeros(stack.shape, dtype=np.float32 if cut is None else np.uint8) for cut in cuts]
    costs = [network_cost(m) for m in networks]  # each network's share of the progress bar
    shifts = GRID_PHASES[phases]
    plans = [plan.shifted(*shift) if any(shift) else plan for shift in shifts]  # each grid's taps built once
    runs = [(number, moved) for moved in plans for number in range(len(models))] + \
        [(number, plan) for number in range(len(models), len(networks))]  # the helpers on the unmoved grid alone
    work, done = max(1e-9, kept.size * sum(costs[number] for number, _ in runs)), 0.0
    for first in range(0, kept.size, CHUNK_SLICES):
        chunk = kept[first:first + CHUNK_SLICES]
        networked, summed = {}, {}  # ensemble members' maps summed on their network grid: resampling is linear
        for number, moved in runs:
            loaded, runner, cost = networks[number], runners[number], costs[number]
            key = (id(moved), loaded.preprocessing)
            if key not in networked:
                networked[key] = moved.network_slices(stack, chunk, loaded.preprocessing)

            def on_batch(k: int, loaded=loaded, base=done, cost=cost) -> None:
                if progress:
                    progress(min(1.0, (base + k * cost) / work), f"{loaded.name}: slice {first + k}/{kept.size}")

            probabilities = predict_network_slices(networked[key], runner, batch_size, tta, on_batch, cancel, ran=ran)
            if not np.isfinite(probabilities).all():  # NaN passes no threshold: 0 lesions, and the whole ensemble's
                raise NaNProbabilities(loaded.name, ", ".join(ran) or runner.name)
            if number < len(models):
                summed[key] = (moved, probabilities if key not in summed else summed[key][1] + probabilities)
            else:
                cut = cuts[number - len(models)]
                for part, on_input in _on_input(plan.grids[loaded.preprocessing], probabilities, chunk):
                    helper_maps[number - len(models)][part] = on_input if cut is None else on_input >= cut
            done += chunk.size * cost
        # the slices' maps summed and averaged a few slices at a time, then written once
        for pieces in zip(*(_on_input(moved.grids[config], probabilities, chunk)
                            for (_, config), (moved, probabilities) in summed.items())):
            part = pieces[0][0]
            values = np.zeros((part.size,) + stack.shape[1:], np.float32)
            for _, on_input in pieces:
                values += on_input
            values /= len(models) * len(shifts)
            if lesion_image:
                io.put_axial_slices(total, frame, part, values)
            else:
                total[part] = values
    if facts is not None and ran:  # what ran, a CPU fallback's included (none ran: the runners built)
        facts["runner"] = ", ".join(ran)
    if progress:
        progress(1.0, "networks done")
    maps = iter(helper_maps)
    brain = next(maps) if brain_model is not None else None
    ventricles = next(maps) if ventricle_model is not None else None
    return total, brain, ventricles, frame
