"""The Slicer module's statistics (and so Save results) of a segmentation DeepWML did not compute, a manual one,
with the periventricular/deep split made as `deepwml export` makes it for a mask given (segment.mask_location),
on real MRML nodes (slicer-core)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).parent / "slicer" / "support"))

from conftest import REPO  # noqa: E402
from DeepWMLLib.cli import main  # noqa: E402
from slicer_fixtures import scene  # noqa: E402,F401 (fixtures)

from DeepWMLSlicerLib import MRMLConversion as mrml  # noqa: E402
from DeepWMLSlicerLib.CoreLogic import DeepWMLCoreLogic  # noqa: E402

SAMPLE = REPO / "Resources" / "Sample" / "sample_flair.nii.gz"
MANUAL = REPO / "Resources" / "Sample" / "sample_flair_truth.nii.gz"  # a rater's mask of the sample
VENTRICLES = REPO / "Resources" / "Models" / "deepwml_vent8_synth_v1.pt"


def test_statistics_of_a_manual_segmentation_get_exports_split_and_save_results_writes_it(scene, tmp_path):
    """A manual segmentation has no 'Lateral ventricles' segment: its statistics, and what Save results wrote of
    them, had no split (`location` null) whatever the ventricle model. Given one, lesionStatistics makes the split
    through export's code path: the same `location`, lesion distances and intracranial volume as `deepwml export
    --ventricle-model` writes for that mask on that FLAIR; the saved .json holds them. Without one, none."""
    volume = mrml.volumeFromImage(sitk.ReadImage(str(SAMPLE)), "sample_flair")
    manual = mrml.segmentationFromMask(sitk.ReadImage(str(MANUAL)) > 0, volume, name="rater")
    logic = DeepWMLCoreLogic()
    assert logic.lesionStatistics(manual, volume)["location"] is None
    report = logic.lesionStatistics(manual, volume, ventricleModel=str(VENTRICLES), device="cpu")
    assert main(["export", str(SAMPLE), str(MANUAL), "-o", str(tmp_path / "exp"), "--ventricle-model",
                 str(VENTRICLES), "--device", "cpu"]) == 0
    exported = json.loads((tmp_path / "exp" / "sample_flair_report.json").read_text())
    split = dict(report["location"])
    assert split.pop("ventricles") == "the ventricle network on 'sample_flair' (as deepwml export makes them)"
    assert exported["location"]["judged"] and split == exported["location"]
    assert report["volume_ml"] == pytest.approx(exported["volume_ml"])
    fields = ("ventricle_distance_mm", "periventricular_share")
    assert [{k: lesion[k] for k in fields} for lesion in report["lesions"]] == \
        [{k: lesion[k] for k in fields} for lesion in exported["lesions"]]
    for key in ("intracranial_ml", "brain_model", "brain_mask"):
        assert report[key] == exported[key], key
    assert "Periventricular" in logic.formatReport(report)
    logic.saveResults({"report": report}, tmp_path / "all.json")  # Save results' .json: everything shown
    saved = json.loads((tmp_path / "all.json").read_text(encoding="utf-8"))
    assert saved["report"]["location"]["periventricular_ml"] == exported["location"]["periventricular_ml"]


def test_a_segment_measured_against_its_own_ventricle_segment_is_not_split_again(scene, tmp_path):
    """Where the segmentation holds a 'Lateral ventricles' segment (DeepWML's, perhaps edited), the split is
    measured from it as before, even with a ventricle model given: the network does not override the segment."""
    flair = sitk.ReadImage(str(SAMPLE))
    volume = mrml.volumeFromImage(flair, "sample_flair")
    manual = mrml.segmentationFromMask(sitk.ReadImage(str(MANUAL)) > 0, volume, name="rater")
    drawn = sitk.Cast(flair > 1e9, sitk.sitkUInt8)
    drawn[100:140, 100:140, 8:12] = 1
    mrml.segmentationFromMask(drawn, volume, manual, segmentName=mrml.VENTRICLE_SEGMENT_NAME)
    report = DeepWMLCoreLogic().lesionStatistics(manual, volume, ventricleModel=str(VENTRICLES), device="cpu")
    assert report["location"]["ventricles"].startswith("segment 'Lateral ventricles'")
    x, y, z = flair.GetSpacing()
    assert report["location"]["ventricles_ml"] == pytest.approx(40 * 40 * 4 * x * y * z / 1000, rel=1e-3)
    assert "intracranial_ml" not in report
