"""Segmentation metrics: overlap, distance, lesion-wise, volume and per-slice lesion-volume groups."""

from __future__ import annotations

import math

from .errors import DeepWMLError

# Upper bounds (exclusive) of the DeepWML paper's per-image lesion-volume groups G1..G4 in ml;
# G5 is everything from the last bound up.
LV_GROUP_BOUNDS_ML = (0.2, 0.7, 2.0, 5.0)


def lv_group(lv_ml: float) -> str:
    """Return "G1".."G5" for a 2D image's lesion volume (area x slice thickness) in ml.

    Intervals are closed below and open above: 0.2 ml is G2, 5 ml is G5.
    """
    if not math.isfinite(lv_ml) or lv_ml < 0:
        raise DeepWMLError(f"lesion volume must be a finite number >= 0 ml, got {lv_ml!r}")
    for i, bound in enumerate(LV_GROUP_BOUNDS_ML):
        if lv_ml < bound:
            return f"G{i + 1}"
    return f"G{len(LV_GROUP_BOUNDS_ML) + 1}"
