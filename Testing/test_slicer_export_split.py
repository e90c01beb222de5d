"""The Slicer module's statistics (and so Save results) of a segmentation DeepWML did not compute, a manual one,
with the periventricular/deep split made as `deepwml export` makes it for a mask given (segment.mask_location),
on real MRML nodes (slicer-core)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import SimpleITK as sitk
import slicer

sys.path.insert(0, str(Path(__file__).parent / "slicer" / "support"))

from conftest import REPO  # noqa: E402
from DeepWMLLib.cli import main  # noqa: E402
from slicer_fixtures import countNetworkRuns, scene  # noqa: E402,F401 (fixtures)

from DeepWMLSlicerLib import MRMLConversion as mrml  # noqa: E402
from DeepWMLSlicerLib.CoreLogic import RUN_ATTRIBUTE, DeepWMLCoreLogic  # noqa: E402

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
    assert split.pop("ventricles").startswith("the ventricle network on 'sample_flair' (as deepwml export makes them; ")
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


def test_the_split_networks_run_once_per_volume_and_the_segmentations_edits_still_count(scene, monkeypatch):
    """Show statistics, Review lesions, Compare and Save results each computed the statistics, and with the split of a
    manual segmentation each ran the ventricle and brain networks again on the same volume (1-2 s on the sample, on
    the main thread). They are kept by the volume and the settings: a second update runs no network, yet an edit of
    the segmentation between updates changes the split; an edit of the volume's voxels, of where it lies, or another
    brain-mask switch, device or precision runs them again."""
    runs = countNetworkRuns(monkeypatch)
    flair = sitk.ReadImage(str(SAMPLE))
    volume = mrml.volumeFromImage(flair, "sample_flair")
    truth = sitk.ReadImage(str(MANUAL)) > 0
    manual = mrml.segmentationFromMask(truth, volume, name="rater")
    logic = DeepWMLCoreLogic()

    def statistics(**settings):
        return logic.lesionStatistics(manual, volume, ventricleModel=str(VENTRICLES), **{"device": "cpu", **settings})

    first = statistics()
    assert len(runs) == 1 and first["location"]["judged"]
    assert statistics() == first and len(runs) == 1  # the same volume, the same segmentation: nothing runs
    edited = sitk.Image(truth)
    edited[:, :, 11:] = 0  # the rater removes the lesions above slice 10
    mrml.segmentationFromMask(edited, volume, manual)
    after = statistics()
    assert len(runs) == 1 and after["volume_ml"] < first["volume_ml"]
    assert after["location"]["periventricular_ml"] + after["location"]["deep_ml"] < \
        first["location"]["periventricular_ml"] + first["location"]["deep_ml"]
    assert after["location"]["ventricles_ml"] == first["location"]["ventricles_ml"]  # the volume's, kept
    fresh = DeepWMLCoreLogic().lesionStatistics(manual, volume, ventricleModel=str(VENTRICLES), device="cpu")
    assert after == fresh and len(runs) == 2  # what the networks run anew give
    statistics(brainMask=False)
    statistics(precision="fp32")
    assert len(runs) == 4
    statistics(precision="fp32")
    assert len(runs) == 4
    voxels = slicer.util.arrayFromVolume(volume)
    voxels[:, :128, :] = 0  # the volume edited (half of it blanked), as an extension's filter may
    slicer.util.arrayFromVolumeModified(volume)
    blanked = statistics(precision="fp32")
    assert len(runs) == 5 and blanked["location"]["ventricles_ml"] != first["location"]["ventricles_ml"]
    spacing = list(volume.GetSpacing())
    volume.SetSpacing(spacing[0], spacing[1], 2 * spacing[2])  # where it lies
    statistics(precision="fp32")
    assert len(runs) == 6


def test_a_ventricle_segment_added_later_takes_priority_over_the_kept_networks(scene, monkeypatch):
    """The split of a manual segmentation made by the networks (kept for the volume) gives way to a 'Lateral
    ventricles' segment added to the segmentation later (DeepWML's, perhaps edited): it is measured from that
    segment, and no network runs; removed again, the kept networks' split comes back without a run."""
    runs = countNetworkRuns(monkeypatch)
    flair = sitk.ReadImage(str(SAMPLE))
    volume = mrml.volumeFromImage(flair, "sample_flair")
    manual = mrml.segmentationFromMask(sitk.ReadImage(str(MANUAL)) > 0, volume, name="rater")
    logic = DeepWMLCoreLogic()
    networks = logic.lesionStatistics(manual, volume, ventricleModel=str(VENTRICLES), device="cpu")
    assert networks["location"]["ventricles"].startswith("the ventricle network") and len(runs) == 1
    drawn = sitk.Cast(flair > 1e9, sitk.sitkUInt8)
    drawn[100:140, 100:140, 8:12] = 1
    mrml.segmentationFromMask(drawn, volume, manual, segmentName=mrml.VENTRICLE_SEGMENT_NAME)
    segment = logic.lesionStatistics(manual, volume, ventricleModel=str(VENTRICLES), device="cpu")
    assert segment["location"]["ventricles"].startswith("segment 'Lateral ventricles'") and len(runs) == 1
    assert segment["location"]["ventricles_ml"] != networks["location"]["ventricles_ml"]
    segmentation = manual.GetSegmentation()
    segmentation.RemoveSegment(segmentation.GetSegmentIdBySegmentName(mrml.VENTRICLE_SEGMENT_NAME))
    assert logic.lesionStatistics(manual, volume, ventricleModel=str(VENTRICLES), device="cpu") == networks
    assert len(runs) == 1


def test_a_split_made_by_the_networks_says_how_they_ran_beside_the_runs_own_settings(scene):
    """The statistics of a segmentation DeepWML made without the split (its run's device and brain mask in the report)
    with the split made here by the networks, on the panel's device, precision and brain-mask switch, said nothing of
    how the split was made, and the panel called its ventricles the hidden segment 'Lateral ventricles', which that
    segmentation does not hold. The split's `ventricles` says how its networks ran (device, runner, precision asked,
    brain mask); the run's own device and brain mask stay the report's; the panel names where the ventricles come
    from. A manual segmentation's report takes the split's device, runner and brain mask, as export's does."""
    from DeepWMLLib.export import BRAIN_MASK_NOT_APPLIED

    volume = mrml.volumeFromImage(sitk.ReadImage(str(SAMPLE)), "sample_flair")
    truth = sitk.ReadImage(str(MANUAL)) > 0
    logic = DeepWMLCoreLogic()
    manual = mrml.segmentationFromMask(truth, volume, name="rater")
    report = logic.lesionStatistics(manual, volume, ventricleModel=str(VENTRICLES), device="cpu", precision="fp32",
                                    brainMask=False)
    made = report["location"]["ventricles"]
    assert made.startswith("the ventricle network on 'sample_flair'")
    assert f"cpu, {report['runner']}, precision fp32, brain mask {BRAIN_MASK_NOT_APPLIED}" in made, made
    assert report["device"] == "cpu" and report["brain_mask"] == BRAIN_MASK_NOT_APPLIED
    text = logic.formatReport(report)
    assert "hidden segment" not in text and f"ventricles: {made}" in text

    deepwml = mrml.segmentationFromMask(truth, volume, name="sample_flair WMH")  # DeepWML's, run without the split
    deepwml.SetAttribute(RUN_ATTRIBUTE, json.dumps({"device": "cuda", "runner": "torch fp16",
                                                    "brain_mask": "applied to the marks"}))
    report = logic.lesionStatistics(deepwml, volume, ventricleModel=str(VENTRICLES), device="cpu", precision="fp32",
                                    brainMask=False)
    assert (report["device"], report["runner"], report["brain_mask"]) == ("cuda", "torch fp16", "applied to the marks")
    assert report["location"]["ventricles"] == made
