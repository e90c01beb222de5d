"""The 11 real clinical FLAIRs (skull, real headers, oblique, uint16) end to end with the shipped model.

Each scan is its own test (pytest-xdist spreads them over its workers; they took 205 s as one), segmented as a
folder of its own (folder mode: summary.csv) into its own OUTDIR."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from DeepWMLLib import io
from DeepWMLLib.cli import main

CLINICAL = ["patient01_study1.nii.gz", "patient01_study2.nii.gz", "patient03_study1.nii.gz",
            "patient03_study2.nii.gz", "patient04_study1.nii.gz", "patient09_study2.nii.gz",
            "patient12_study1.nii.gz", "patient12_study2.nii.gz", "patient19_study1.nii.gz",
            "patient19_study2.nii.gz", "patient20_study2.nii.gz"]


@pytest.mark.shared
@pytest.mark.parametrize("name", CLINICAL)
def test_clinical_flair_end_to_end(shared_data, tmp_path, name):
    folder = shared_data / "open_ms" / "clinical_flair"
    assert sorted(p.name for p in folder.glob("*.nii.gz")) == CLINICAL  # the 11 scans, each a test
    path = folder / name
    alone = tmp_path / "in"  # a folder of this scan alone: the folder (cohort) mode, summary.csv
    alone.mkdir()
    shutil.copyfile(path, alone / name)
    out = tmp_path / "out"
    assert main(["segment", str(alone), "-o", str(out), "--device", "cpu"]) == 0
    with open(out / "summary.csv", newline="", encoding="utf-8-sig") as f:
        rows = list(csv.DictReader(f))
    case = io.case_name(path)
    assert [(r["case"], r["status"]) for r in rows] == [(case, "ok")]
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
