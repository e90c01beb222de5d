"""Benchmarks' own arithmetic: the synthetic-validation Dice honours the ignore label of real-background
cases; the labelled-case benchmark pools 2D images as the paper did."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent / "benchmarks"))

from synthetic_validation import case_counts  # noqa: E402


def test_ignored_voxels_count_neither_way():
    mask = np.zeros((3, 8, 8), np.uint8)
    mask[1, 2:4, 2:4] = 1  # 4 painted lesion voxels
    mask[1, 5:7, 5:7] = 2  # 4 voxels of the scan's own probable lesion: ignored
    predicted = np.zeros(mask.shape, bool)
    predicted[1, 2:4, 2:4] = True  # the painted lesion, found
    predicted[1, 5:7, 5:7] = True  # the ignored lesion, also marked: neither false positive nor true
    assert case_counts(predicted, mask) == (1.0, 4, 0, 0)
    # missing the ignored lesion costs nothing; missing half the painted one does
    predicted[1, 5:7, 5:7] = False
    predicted[1, 2, 2:4] = False
    dice, tp, fp, fn = case_counts(predicted, mask)
    assert (tp, fp, fn) == (2, 0, 2) and np.isclose(dice, 2 * 2 / (2 * 2 + 2))
    # a false positive outside the ignored area counts
    predicted[0, 0, 0] = True
    assert case_counts(predicted, mask)[2] == 1


def test_empty_reference_and_prediction_is_perfect():
    mask = np.zeros((2, 4, 4), np.uint8)
    mask[0, 0, 0] = 2
    predicted = np.zeros(mask.shape, bool)
    predicted[0, 0, 0] = True
    assert case_counts(predicted, mask) == (1.0, 0, 0, 0)


def test_labelled_benchmark_reports_the_papers_per_image_medians():
    from labelled_cases import per_image_table

    def image(dice, sens, prec):
        return {"index": 0, "dice": dice, "sensitivity": sens, "precision": prec, "lv_ml": 0.1}

    rows = [{"case": "patient07", "thickness_mm": 5, "images": [image(0.0, 0.0, float("nan")), image(0.5, 0.4, 0.6)]},
            {"case": "patient19", "thickness_mm": 5, "images": [image(0.8, 0.7, 0.9)]},
            {"case": "patient07", "thickness_mm": 8, "images": []},
            {"case": "patient19", "thickness_mm": 8, "images": [image(0.6, 0.6, float("nan"))]}]
    lines = per_image_table(rows).splitlines()
    assert lines[0].startswith("| slice thickness | 2D images (07 / 19) |")
    # 5 mm: the three images of both cases pooled; precision over the two images that have a prediction
    assert lines[2] == "| 5 mm | 3 (2 / 1) | 0.500 [0.250-0.650] | 0.400 [0.200-0.550] | 0.750 [0.675-0.825] |"
    assert lines[3] == "| 8 mm | 1 (0 / 1) | 0.600 [0.600-0.600] | 0.600 [0.600-0.600] | n/a |"
