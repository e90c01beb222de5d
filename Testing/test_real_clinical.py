"""The 11 real clinical FLAIRs (skull, real headers, oblique, uint16) end to end with the shipped model."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import SimpleITK as sitk

from DeepWMLLib import io
from DeepWMLLib.cli import main


@pytest.mark.shared
def test_clinical_flairs_end_to_end(shared_data, tmp_path):
    folder = shared_data / "open_ms" / "clinical_flair"
    inputs = sorted(folder.glob("*.nii.gz"))
    assert len(inputs) == 11
    out = tmp_path / "out"
    assert main(["segment", str(folder), "-o", str(out), "--device", "cpu"]) == 0
    with open(out / "summary.csv", newline="", encoding="utf-8-sig") as f:
        rows = list(csv.DictReader(f))
    assert [r["status"] for r in rows] == ["ok"] * 11
    for path in inputs:
        case = io.case_name(path)
        image = sitk.ReadImage(str(path))
        mask = sitk.ReadImage(str(out / f"{case}_wmh.nii.gz"))
        assert io.grid_difference(mask, image) is None, case
        report = json.loads((out / f"{case}_report.json").read_text(encoding="utf-8"))
        assert report["acquisition_plane"] == "axial"
        # the contrast check calls every real FLAIR a FLAIR (DeepWMLLib/contrast.py)
        assert report["contrast"]["looks_like"] == "FLAIR", (case, report["contrast"])
        assert not [w for w in report["warnings"] if "does not look like a FLAIR" in w], case
        assert len(report["slices"]) == image.GetSize()[2]
        # a plausible WMH load for an MS patient, not a segmented head
        head_ml = np.count_nonzero(sitk.GetArrayViewFromImage(image) > 100) * np.prod(image.GetSpacing()) / 1000
        assert report["volume_ml"] < 0.1 * head_ml, case
