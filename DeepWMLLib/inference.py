"""Volume in, probability map out: slice-wise U-Net inference with batching, device choice,
progress and cancel, ensembles (probabilities averaged, MICCAI winner) and flip test-time augmentation.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import numpy as np
import SimpleITK as sitk
import torch

from .checkpoint import LoadedModel
from .errors import Cancelled, DeepWMLError
from .io import SliceFrame, to_axial_stack
from .model import size_multiple
from .preprocessing import NetworkGrid, head_mask, normalise_intensity

Progress = Callable[[float, str], None]

# A slice whose head covers less than this fraction of its pixels holds no brain worth segmenting
# (air above the vertex, the neck); skipping it saves time and removes noise detections.
MIN_HEAD_FRACTION = 0.005


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if isinstance(device, torch.device):
        return device
    name = str(device).lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeepWMLError("--device cuda was asked for but no CUDA GPU is usable here; use --device cpu or auto")
        return torch.device(name)
    if name == "cpu":
        return torch.device("cpu")
    raise DeepWMLError(f"unknown device {device!r}; use auto, cpu or cuda")


def default_batch_size(device: torch.device) -> int:
    return 16 if device.type == "cuda" else 4


def _forward(model: torch.nn.Module, batch: torch.Tensor, tta: bool) -> torch.Tensor:
    probabilities = torch.sigmoid(model(batch))
    if tta:  # left-right flip: the brain is roughly symmetric, the network's errors are not
        probabilities = (probabilities + torch.sigmoid(model(batch.flip(-1))).flip(-1)) / 2
    return probabilities


def predict_network_slices(slices: np.ndarray, loaded: LoadedModel, device: torch.device, batch_size: int,
                           tta: bool = False, progress: Progress | None = None, cancel=None,
                           done: float = 0.0, share: float = 1.0) -> np.ndarray:
    """[n, H, W] normalised network-grid slices -> [n, H, W] probabilities (float32)."""
    multiple = size_multiple(loaded.config)
    if slices.shape[1] % multiple or slices.shape[2] % multiple:
        raise DeepWMLError(f"network grid {slices.shape[1:]} must be a multiple of {multiple} for this model")
    model = loaded.model.to(device)
    out = np.zeros(slices.shape, dtype=np.float32)
    n = slices.shape[0]
    autocast = torch.autocast("cuda", dtype=torch.float16) if device.type == "cuda" else contextlib.nullcontext()
    with torch.inference_mode(), autocast:
        for start in range(0, n, batch_size):
            if cancel is not None and cancel():
                raise Cancelled()
            batch = torch.from_numpy(slices[start:start + batch_size]).unsqueeze(1)
            batch = batch.to(device, non_blocking=True)
            out[start:start + batch_size] = _forward(model, batch, tta)[:, 0].float().cpu().numpy()
            if progress is not None:
                progress(done + share * min(n, start + batch_size) / n, f"{loaded.name}: slice {min(n, start + batch_size)}/{n}")
    return out


def predict_probabilities(image: sitk.Image, models: Sequence[LoadedModel], device: str | torch.device = "auto",
                          batch_size: int | None = None, tta: bool = False, progress: Progress | None = None,
                          cancel=None) -> tuple[np.ndarray, SliceFrame]:
    """Probability of WMH for every voxel, as an axial stack on the input grid (see io.to_axial_stack).

    With several models, each model's map is resampled back to the input grid and the maps are averaged.
    """
    if not models:
        raise DeepWMLError("no model given")
    dev = resolve_device(device)
    batch_size = batch_size or default_batch_size(dev)
    stack, frame = to_axial_stack(image)
    if progress:
        progress(0.0, "normalising")
    head = head_mask(stack)
    normalised = normalise_intensity(stack, head)
    keep = head.reshape(head.shape[0], -1).mean(axis=1) >= MIN_HEAD_FRACTION
    total = np.zeros(stack.shape, dtype=np.float32)
    prepared: dict = {}
    for m, loaded in enumerate(models):
        key = loaded.preprocessing
        if key not in prepared:  # ensemble members sharing a grid share one resampling
            grid = NetworkGrid.plan(frame, loaded.preprocessing, head)
            prepared[key] = (grid, grid.to_network(normalised[keep]))
        grid, net = prepared[key]
        share = 1.0 / len(models)
        probabilities = predict_network_slices(net, loaded, dev, batch_size, tta, progress, cancel, m * share, share)
        total[keep] += grid.to_input(probabilities)
    if progress:
        progress(1.0, "done")
    return total / len(models), frame
