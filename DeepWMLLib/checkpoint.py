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

import datetime
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import __version__
from .errors import DeepWMLError
from .io import write_atomically
from .model import build_model, size_multiple, validate_config
from .preprocessing import PreprocessingConfig

FORMAT = "deepwml-model"
FORMAT_VERSION = 1
DEFAULT_LABELS = {"0": "background", "1": "WMH"}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    config: dict
    preprocessing: PreprocessingConfig
    threshold: float
    labels: dict
    provenance: dict
    path: str = ""
    name: str = field(default="")


def model_payload(model: torch.nn.Module, config: dict, preprocessing: PreprocessingConfig | dict,
                  threshold: float = 0.5, provenance: dict | None = None, labels: dict | None = None,
                  fp16: bool = False) -> dict:
    """The dict a model file holds (also what training checkpoints embed)."""
    if isinstance(preprocessing, dict):
        preprocessing = PreprocessingConfig.from_dict(preprocessing)
    state = {k: (v.detach().to("cpu").half() if fp16 and v.is_floating_point() else v.detach().to("cpu").clone())
             for k, v in model.state_dict().items()}
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


def save_model(path: str | os.PathLike, model: torch.nn.Module, config: dict,
               preprocessing: PreprocessingConfig | dict, threshold: float = 0.5,
               provenance: dict | None = None, labels: dict | None = None, fp16: bool = False) -> Path:
    payload = model_payload(model, config, preprocessing, threshold, provenance, labels, fp16)
    return write_atomically(path, lambda tmp: torch.save(payload, tmp))


def load_payload(path: str | os.PathLike) -> dict:
    p = Path(path)
    if not p.is_file():
        raise DeepWMLError(f"model file {p} does not exist")
    try:
        payload = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a corrupt or foreign file
        raise DeepWMLError(f"{p} is not a readable DeepWML model file ({type(exc).__name__}); download or copy it again") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise DeepWMLError(f"{p} is not a DeepWML model file (no '{FORMAT}' header)")
    version = payload.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise DeepWMLError(
            f"{p} has model format version {version}; this DeepWML reads up to version {FORMAT_VERSION} — update DeepWML"
        )
    return payload


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> LoadedModel:
    """Load a model file for inference (eval mode, fp32 weights)."""
    payload = load_payload(path)
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
    model.eval().to(device)
    return LoadedModel(
        model=model,
        config=config,
        preprocessing=preprocessing,
        threshold=float(payload.get("threshold", 0.5)),
        labels=dict(payload.get("labels", DEFAULT_LABELS)),
        provenance=dict(payload.get("provenance", {})),
        path=str(path),
        name=Path(path).name,
    )
