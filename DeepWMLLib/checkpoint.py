"""Self-describing model files: everything inference needs in one file, loaded with weights_only.

A model file is a `torch.save`d dict of plain types and tensors:
    format            "deepwml-model"
    format_version    FORMAT_VERSION
    architecture      config for `model.build_model`
    preprocessing     config for `preprocessing.PreprocessingConfig` (normalisation, network grid)
    threshold         default probability threshold
    labels            {"0": "background", "1": "WMH"}
    provenance        how it was made: training command, data, epochs, metrics, code version, date
    state_dict        weights (fp16 or fp32; loaded as fp32)
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import shlex
from pathlib import Path

from . import __version__, io
from .errors import DeepWMLError
from .io import write_atomically, write_text
from .preprocessing import PreprocessingConfig

FORMAT = "deepwml-model"
FORMAT_VERSION = 1
DEFAULT_LABELS = {"0": "background", "1": "WMH"}


def cache_dir() -> Path:
    """Per-user cache for derived files (model metadata, ONNX exports): $DEEPWML_CACHE_DIR, else
    $XDG_CACHE_HOME/deepwml, else on Windows %LOCALAPPDATA%\\deepwml (the profile's local part: a roaming
    profile on a server does not carry it), else ~/.cache/deepwml."""
    if os.environ.get("DEEPWML_CACHE_DIR"):
        return Path(os.environ["DEEPWML_CACHE_DIR"])
    if not os.environ.get("XDG_CACHE_HOME") and io.WINDOWS and os.environ.get("LOCALAPPDATA"):
        return Path(os.environ["LOCALAPPDATA"]) / "deepwml"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "deepwml"


class LoadedModel:
    """A model file's settings, with the network itself built on first use of `.model`.

    Reading the settings from the metadata cache lets the ONNX Runtime path run without importing
    torch at all, which is most of a short job's start-up time.
    """

    def __init__(self, config: dict, preprocessing: PreprocessingConfig, threshold: float, labels: dict,
                 provenance: dict, path: str = "", digest: str = "", model=None):
        self.config = config
        self.preprocessing = preprocessing
        self.threshold = threshold
        self.labels = labels
        self.provenance = provenance
        self.path = str(path)
        self.name = Path(path).name if path else "in-memory model"
        self.digest = digest
        self._model = model

    @property
    def model(self):
        if self._model is None:
            self._model = load_model(self.path)._model
        return self._model


_DIGEST_TAIL = 65536  # bytes at the end of a file that file_digest's cache key covers


def file_digest(path: str | os.PathLike) -> str:
    """Content hash of a file (sha256, 24 hex digits). Remembered in the cache against the file's
    size, modification time, inode, status-change time and last 64 KiB, so an unchanged model file is not
    re-read and hashed on every run (20-30 ms of each `deepwml segment` on a small CPU); any change to the
    file re-hashes it. The times and inode alone do not tell on Windows: st_ctime is the creation time there,
    which a file copied over another in place keeps (shutil.copy2, robocopy, Explorer), FAT and exFAT keep
    times in steps of up to 2 s and give st_ino 0, and models of one architecture have one size. A model
    file's tail is its zip directory, which holds every record's CRC-32 and the save's serialization id:
    another file has another tail."""
    p = Path(path).resolve()
    stat = p.stat()
    with open(p, "rb") as f:
        f.seek(max(0, stat.st_size - _DIGEST_TAIL))
        tail = hashlib.sha1(f.read()).hexdigest()
    key = [stat.st_size, stat.st_mtime_ns, stat.st_ino, stat.st_ctime_ns, tail]
    memo = cache_dir() / "digests" / f"{hashlib.sha1(str(p).encode('utf-8')).hexdigest()}.json"
    try:
        saved = json.loads(memo.read_text(encoding="utf-8"))
        if saved["key"] == key and len(saved["digest"]) == 24:
            return saved["digest"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    digest = hashlib.sha256(p.read_bytes()).hexdigest()[:24]
    tmp = memo.with_suffix(f".{os.getpid()}.part")
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"path": str(p), "key": key, "digest": digest}), encoding="utf-8")
        os.replace(tmp, memo)
    except OSError:  # a read-only or full cache only costs the hashing next time; a partial file goes
        with contextlib.suppress(OSError):
            tmp.unlink()
    return digest


def model_payload(model, config: dict, preprocessing: PreprocessingConfig | dict,
                  threshold: float = 0.5, provenance: dict | None = None, labels: dict | None = None,
                  fp16: bool = False) -> dict:
    """The dict a model file holds (also what training checkpoints embed)."""
    from .model import validate_config

    if isinstance(preprocessing, dict):
        preprocessing = PreprocessingConfig.from_dict(preprocessing)
    state = {k: (v.detach().to("cpu").half() if fp16 and v.is_floating_point() else v.detach().to("cpu").clone())
             for k, v in model.state_dict().items()}
    unfit = _non_finite(state) if fp16 else []  # NaN in fp32 weights is refused when read (load_model); a
    # training's best.pt is written as it is, not stopping the run (a raise on rank 0 alone would hang the others)
    original = model.state_dict()
    overflow = [k for k in unfit if bool(original[k].isfinite().all())]
    if overflow:  # a weight above 65504 became infinity: every map NaN, nothing marked, silently
        largest = max(float(original[k].detach().float().abs().max()) for k in overflow)
        raise DeepWMLError(f"the weights hold values float16 cannot store ({', '.join(overflow[:3])}: up to {largest:.3g}, "
                           "float16 stops at 65504): store it in float32 (without --fp16; `deepwml adapt`: --fp32)")
    prov = {"created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "deepwml_version": __version__}
    prov.update(provenance or {})
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": validate_config(config),
        "preprocessing": preprocessing.to_dict(),
        "threshold": float(threshold),
        "labels": dict(labels or DEFAULT_LABELS),
        "provenance": prov,
        "state_dict": state,
    }


def _non_finite(state: dict) -> list[str]:
    """The names of a state dict's floating-point tensors that hold NaN or infinity. Counted by numpy on the CPU's
    tensors: torch.isfinite took 0.1-0.9 s for v9's 7.8 million weights (its threads waiting on busy cores), on
    every model load, which it tripled; numpy takes 5 ms."""
    import numpy as np
    import torch

    def finite(v) -> bool:
        if v.device.type == "cpu" and v.dtype in (torch.float16, torch.float32, torch.float64):
            return bool(np.isfinite(v.detach().numpy()).all())
        return bool(torch.isfinite(v).all())

    return [k for k, v in state.items() if v.is_floating_point() and not finite(v)]


def save_torch(obj, path) -> None:
    """torch.save through an open file: the archive inside is then named "archive", not after the
    (temporary, random) file name, so the same content gives the same bytes."""
    import torch

    with open(path, "wb") as f:
        torch.save(obj, f)


def save_model(path: str | os.PathLike, model, config: dict,
               preprocessing: PreprocessingConfig | dict, threshold: float = 0.5,
               provenance: dict | None = None, labels: dict | None = None, fp16: bool = False) -> Path:
    payload = model_payload(model, config, preprocessing, threshold, provenance, labels, fp16)
    return write_atomically(path, lambda tmp: save_torch(payload, tmp))


def not_a_model_file(p: Path) -> str:
    """Why `p` cannot be read as a model file: missing, or a folder (a training run's: name its best.pt; an
    ensemble's run, `deepwml train --ensemble N`: its members' model_k/best.pt)."""
    if p.is_dir():
        if any((p / name).is_file() for name in ("best.pt", "last.pt")):
            return f"{p} is a folder, not a model file (a training run folder: give its best.pt)"
        members = sorted(p.glob("model_*/best.pt"))
        if members:
            return (f"{p} is a folder, not a model file (the training run folder of an ensemble of {len(members)}: "
                    f"its members' model files are {p / 'model_*' / 'best.pt'})")
        return f"{p} is a folder, not a model file"
    return f"model file {p} does not exist"


def _model_digest(p: Path) -> str:
    """`file_digest` of a model file, or a DeepWMLError when the file cannot be read (no permission to read it, a
    network share gone): it was "internal error: PermissionError ... (report it)"."""
    try:
        return file_digest(p)
    except OSError as exc:
        raise DeepWMLError(f"model file {p} cannot be read ({exc.strerror or type(exc).__name__}): check that your "
                           "account may read it, or copy it to a folder of your own") from exc


def _failed_checksum(p: Path) -> str | None:
    """The name of the first record of a model file (a zip archive) whose CRC-32 does not match its bytes, or
    None (all match, or an old-style file without them). torch.load does not check them: a model whose weights
    changed on the way loads and segments, wrongly. About 40 ms for a 15 MB model (v9), so `load_model`
    checks a file once, when its content is new to the metadata cache."""
    import zipfile
    import zlib

    try:
        with zipfile.ZipFile(p) as archive:
            return archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error, ValueError):
        return None  # not a zip file: the old pickle format, which torch read


def _why_unreadable(p: Path, exc: Exception) -> str:
    """What to do about a file torch cannot load: a PyTorch file (a zip archive, or an old pickle) was cut
    short or damaged, or holds Python objects (another program's model: weights_only refuses them); anything
    else is some other file: a scan (given with --model by mistake), a text file."""
    from .io import _content_format, is_image_file

    try:
        with open(p, "rb") as f:
            head = f.read(4)
    except OSError:
        head = b"PK"
    if not head:
        return "the file is empty (0 bytes): copy it again"
    if not head.startswith(b"PK") and head[:1] != b"\x80":  # neither a zip archive nor an old-style pickle
        image = _content_format(p)
        if image or is_image_file(p):
            return (f"it is an image ({image or 'by its name'}), a scan rather than a model: give the scan as INPUT "
                    "and a model file (.pt, as `deepwml train` writes) with --model")
        return "it is not a PyTorch file at all: give a model file (.pt, as `deepwml train` writes)"
    if "Weights only load failed" in str(exc):  # torch's words since 1.13 for objects other than tensors
        return ("it is a PyTorch file that holds Python objects (another program's model or checkpoint?), which "
                "DeepWML does not run; give a DeepWML model file (.pt, as `deepwml train` writes)")
    return "check that it is the .pt file you meant, or copy it again if it was cut short"


TRAINING_STATE = "deepwml-training-state"  # train.STATE_FORMAT: a run's last.pt


def check_settings(loaded: LoadedModel) -> LoadedModel:
    """`loaded` itself, or a DeepWMLError naming its file when its settings cannot segment (a stored
    threshold outside (0, 1), a network that does not read one channel). Without torch (model.py
    imports it): the settings may come from the metadata cache."""
    channels = loaded.config.get("in_channels", 1)
    if channels != 1:  # as model.validate_config, for settings an older version cached
        raise DeepWMLError(f"{loaded.path} holds a network DeepWML cannot run (architecture in_channels must be 1 "
                           f"(DeepWML networks read one FLAIR channel), got {channels!r})")
    if not 0 < loaded.threshold < 1:  # also NaN
        raise DeepWMLError(f"{loaded.path} stores the probability threshold {loaded.threshold}, not between 0 and 1 "
                           "(exclusive): the model file was written wrongly")
    return loaded


def load_payload(path: str | os.PathLike, check_records: bool = True) -> dict:
    """A model file's dict, or a DeepWMLError naming the file and what is wrong with it. `check_records`:
    check every record against its checksum (`_failed_checksum`), which a file seen before needs not."""
    import torch

    p = Path(path)
    if not p.is_file():
        raise DeepWMLError(not_a_model_file(p))
    try:
        payload = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a corrupt or foreign file
        raise DeepWMLError(f"{p} is not a readable DeepWML model file ({type(exc).__name__}); "
                           + _why_unreadable(p, exc)) from exc
    damaged = _failed_checksum(p) if check_records else None
    if damaged:  # torch reads a record whose bytes changed (a bad copy, a failing disk) without a word
        raise DeepWMLError(f"{p} is a damaged DeepWML model file (its part {damaged} fails its checksum); "
                           "copy it again")
    if isinstance(payload, dict) and payload.get("format") == TRAINING_STATE:
        raise DeepWMLError(f"{p} is a training checkpoint (for `deepwml train --resume`), not a model file: give the "
                           "run folder's best.pt (`deepwml train --export` makes a compact copy of it)")
    if _bare_weights(payload):
        raise DeepWMLError(f"{p} is not a DeepWML model file: it holds network weights only (a PyTorch state_dict), "
                           "without the settings DeepWML runs them with (architecture, preprocessing, threshold). Give "
                           "the model file they came from (a DeepWML training's best.pt, or its `deepwml train "
                           "--export` copy; --export takes model files only), or make one in Python: load the weights "
                           "into DeepWMLLib.model.build_model(architecture) and write it with "
                           "DeepWMLLib.checkpoint.save_model(OUT, network, architecture, preprocessing, threshold)")
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise DeepWMLError(f"{p} is not a DeepWML model file (no '{FORMAT}' header)")
    version = payload.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise DeepWMLError(
            f"{p} has model format version {version}; this DeepWML reads up to version {FORMAT_VERSION} — update DeepWML"
        )
    return payload


def _bare_weights(payload) -> bool:
    """Whether a file's content is a network's weights alone (a PyTorch state_dict: names to tensors, as
    torch.save(model.state_dict(), f) writes them, or such a dict under 'state_dict' or 'model_state_dict'), with
    none of a model file's settings: it got "no 'deepwml-model' header", which said nothing of what it lacks."""
    import torch

    if not isinstance(payload, dict) or "format" in payload:
        return False
    for key in ("state_dict", "model_state_dict"):
        if isinstance(payload.get(key), dict):
            payload = payload[key]
            break
    return bool(payload) and all(isinstance(v, torch.Tensor) for v in payload.values())


def load_model(path: str | os.PathLike, device: str = "cpu") -> LoadedModel:
    """Load a model file for inference (eval mode, fp32 weights) and refresh its metadata cache."""
    from .model import build_model, size_multiple, validate_config

    digest = _model_digest(Path(path)) if Path(path).is_file() else ""
    # a file of this content loaded before was checked then (its metadata cache entry written after, saying so); an
    # entry an earlier DeepWML wrote does not say it: a damaged copy it loaded would never have been checked
    entry = _shareable_entry(_metadata_path(digest)) if digest else None
    payload = load_payload(path, check_records=not (entry and entry.get("records_checked") is True))
    if isinstance(payload.get("architecture"), dict):  # else the generic "damaged" below
        try:
            validate_config(payload["architecture"])
        except (ValueError, TypeError) as exc:
            raise DeepWMLError(f"{path} holds a network DeepWML cannot run ({exc})") from exc
    try:
        config = validate_config(payload["architecture"])
        model = build_model(config)
        state = {k: v.float() if v.is_floating_point() else v for k, v in payload["state_dict"].items()}
        model.load_state_dict(state)
        preprocessing = PreprocessingConfig.from_dict(payload["preprocessing"])
        multiple = size_multiple(config)
        if any(size % multiple for size in preprocessing.grid_size):
            raise ValueError(f"grid {preprocessing.grid_size} is not a multiple of {multiple} for depth {config['depth']}")
    except (KeyError, ValueError, RuntimeError, TypeError) as exc:
        raise DeepWMLError(f"{path} is a damaged DeepWML model file ({type(exc).__name__}: {str(exc)[:120]})") from exc
    unfit = _non_finite(state)
    if unfit:  # every map NaN: nothing marked (0 lesions), with no word of why
        raise DeepWMLError(f"{path} holds NaN or infinite weights ({', '.join(unfit[:3])}), with which it would mark "
                           "nothing: its training diverged (take an earlier checkpoint) or the file is damaged")
    model.eval().to(device)
    try:
        threshold = float(payload.get("threshold", 0.5))
    except (TypeError, ValueError) as exc:
        raise DeepWMLError(f"{path} is a damaged DeepWML model file (threshold {payload.get('threshold')!r})") from exc
    loaded = check_settings(LoadedModel(config, preprocessing, threshold, dict(payload.get("labels", DEFAULT_LABELS)),
                                        dict(payload.get("provenance", {})), str(path), digest, model))
    _write_metadata_cache(loaded)
    return loaded


def shareable_provenance(provenance: dict) -> dict:
    """A model file's provenance fit to leave the hospital (`deepwml train --export`; also all the metadata
    cache keeps of it, which outlives the model file): absolute paths (in the command line too)
    become file names, and the names of skipped cases and of the scans batch norm was adapted on (`deepwml
    adapt`), which may be patient identifiers, their count. A path with spaces loses its folders whole: in
    the command line each argument as the shell quoted it, elsewhere the whole value."""
    def clean(value, key=None):
        if isinstance(value, dict):
            return {k: (len(v) if k in ("skipped_cases", "scans") and isinstance(v, list) else clean(v, k))
                    for k, v in value.items()}
        if isinstance(value, list):
            return [clean(v, key) for v in value]
        if isinstance(value, str) and ("/" in value or "\\" in value):
            return _shareable_command(value) if key == "command" else _file_name(value)
        return value

    return clean(provenance)


def _shareable_command(command: str) -> str:
    """A command line (shlex.join of sys.argv) with each argument's folders left out (`--opt=PATH` too)."""
    try:
        arguments = shlex.split(command)
    except ValueError:  # not one shlex.join wrote
        arguments = command.split(" ")
    kept = []
    for argument in arguments:
        option, equals, path = argument.partition("=")
        if equals and option.startswith("-") and "/" not in option and "\\" not in option:
            kept.append(f"{option}={_file_name(path)}")
        else:
            kept.append(_file_name(argument))
    return shlex.join(kept)


def _file_name(token: str) -> str:
    if "/" not in token and "\\" not in token:
        return token
    return token.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]


def _metadata_path(digest: str) -> Path:
    return cache_dir() / "models" / f"{digest}.json"


def _write_metadata_cache(loaded: LoadedModel) -> None:
    target = _metadata_path(loaded.digest)
    entry = _shareable_entry(target)
    if entry is not None and entry.get("records_checked") is True:
        return
    try:  # new, or written by an older DeepWML with the whole provenance (case names, data paths): replaced
        target.parent.mkdir(parents=True, exist_ok=True)
        write_text(json.dumps({"config": loaded.config, "preprocessing": loaded.preprocessing.to_dict(),
                               "threshold": loaded.threshold, "labels": loaded.labels,
                               "provenance": shareable_provenance(loaded.provenance), "shareable": True,
                               "records_checked": True}), target)  # load_model's only caller: checked
    except (OSError, DeepWMLError):
        pass  # a read-only home only costs start-up time


def _shareable_entry(target: Path) -> dict | None:
    """A metadata cache entry written with the shareable provenance, or None (none, unreadable, or an
    older DeepWML's with the whole provenance)."""
    try:
        meta = json.loads(target.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("shareable") is True else None


def load_model_settings(path: str | os.PathLike) -> LoadedModel:
    """The model's settings without building the network, from the cache when this exact file was seen before."""
    if not isinstance(path, (str, os.PathLike)):  # Path(True) was a TypeError from deep inside pathlib
        raise DeepWMLError(f"a model is given by its file (a path: str or pathlib.Path), got a {type(path).__name__}: "
                           f"{path!r}")
    p = Path(path)
    if not p.is_file():
        raise DeepWMLError(not_a_model_file(p))
    digest = _model_digest(p)
    try:
        meta = _shareable_entry(_metadata_path(digest))  # an older entry: loaded from the file, and replaced
        loaded = LoadedModel(meta["config"], PreprocessingConfig.from_dict(meta["preprocessing"]), float(meta["threshold"]),
                             meta["labels"], meta["provenance"], str(p), digest)
    except (OSError, ValueError, KeyError, TypeError):
        return load_model(p)
    return check_settings(loaded)
