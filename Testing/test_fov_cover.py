"""A scan that does not cover the whole brain (the field of view cuts through it, the slab misses its top or
bottom) is said to: the lesion volume is then that of the part scanned. Found from the brain mask the run made."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import SimpleITK as sitk

from DeepWMLLib.cli import main

from conftest import BRAIN_LABELS, oracle_network, tiny_model_file

SPACING = (2.2, 2.2, 5.0)  # a thick-slice axial FLAIR: 96 x 96 pixels of 2.2 mm (211 mm), 32 slices (160 mm)


def brain_phantom(descending: bool = False) -> sitk.Image:
    """A 130 x 160 x 110 mm ellipsoid brain (left-right, front-back, up-down) in the middle of the scan, 25 mm or
    more from every edge of it. `descending`: the slices stored superior first."""
    k, j, i = np.meshgrid(np.arange(32), np.arange(96), np.arange(96), indexing="ij")
    inside = (((i - 47.5) * SPACING[0] / 65) ** 2 + ((j - 47.5) * SPACING[1] / 80) ** 2
              + ((k - 15.5) * SPACING[2] / 55) ** 2) < 1
    flair = np.where(inside, 300.0, 20.0) + np.random.default_rng(0).normal(0, 4, inside.shape)
    image = sitk.GetImageFromArray(flair.astype(np.float32))
    image.SetSpacing(SPACING)
    if descending:
        image.SetDirection((1, 0, 0, 0, 1, 0, 0, 0, -1))
    return image


def cropped(image: sitk.Image, left_mm=0.0, anterior_mm=0.0, top_mm=0.0, bottom_mm=0.0) -> sitk.Image:
    """`image` (LPS: i to the patient's left, j to posterior) with its field of view moved `mm` into the brain on
    those sides (the brain's edge is 25 mm from the scan's left, front, top and bottom)."""
    i, j = (round((25 + mm) / SPACING[0]) if mm else 0 for mm in (left_mm, anterior_mm))
    up = image.GetDirection()[8] > 0
    top, bottom = (round((25 + mm) / SPACING[2]) if mm else 0 for mm in (top_mm, bottom_mm))
    k0, k1 = (bottom, 32 - top) if up else (top, 32 - bottom)
    return image[:96 - i, j:, k0:k1]


def fov_report(image, tmp_path, monkeypatch) -> dict:
    from DeepWMLLib.segment import load_brain_model, load_models, segment_image

    oracle_network(monkeypatch, brain="head")  # the brain mask: the brain of the phantom
    brain = load_brain_model(str(tiny_model_file(tmp_path / "brain.pt", labels=BRAIN_LABELS)))
    model = load_models([tiny_model_file(tmp_path / "tiny.pt")])
    return segment_image(image, model, "cpu", brain_model=brain).report


def cover_warnings(report) -> list[str]:
    return [w for w in report["warnings"] if w.startswith("the scan does not cover the whole brain")]


@pytest.mark.parametrize("descending", [False, True])
def test_a_scan_of_the_whole_brain_is_not_questioned(tmp_path, monkeypatch, descending):
    report = fov_report(brain_phantom(descending), tmp_path, monkeypatch)
    fov = report["brain_at_fov_edge"]
    assert fov["cut"] == [] and fov["slices_at_edge"] == {"right": 0, "left": 0, "anterior": 0, "posterior": 0}
    assert fov["top_slice_share"] == fov["bottom_slice_share"] == 0
    assert cover_warnings(report) == []


@pytest.mark.parametrize("descending", [False, True])
def test_a_field_of_view_through_the_brain_is_said(tmp_path, monkeypatch, descending):
    """20 mm cut off the left of the brain and 10 mm off its front: both edges named, with their slices."""
    image = cropped(brain_phantom(descending), left_mm=20, anterior_mm=10)
    report = fov_report(image, tmp_path, monkeypatch)
    fov = report["brain_at_fov_edge"]
    assert fov["cut"] == ["left", "anterior"]
    assert fov["slices_at_edge"]["right"] == fov["slices_at_edge"]["posterior"] == 0
    assert fov["slices_at_edge"]["left"] >= 6 and fov["slices_at_edge"]["anterior"] >= 6  # of the brain's 22
    [warning] = cover_warnings(report)
    assert (f"the brain reaches the left edge on {fov['slices_at_edge']['left']} slice(s) and the anterior edge on "
            f"{fov['slices_at_edge']['anterior']} slice(s) of the field of view") in warning
    assert "lesions beyond the scan are not counted" in warning and "top" not in warning


@pytest.mark.parametrize("descending", [False, True])
def test_a_slab_that_misses_the_top_or_the_bottom_of_the_brain_is_said(tmp_path, monkeypatch, descending):
    image = cropped(brain_phantom(descending), top_mm=20)
    report = fov_report(image, tmp_path, monkeypatch)
    fov = report["brain_at_fov_edge"]
    assert fov["cut"] == ["top"] and fov["top_slice_share"] > 0.5 and fov["bottom_slice_share"] == 0
    highest = image.GetSize()[2] - 1 if not descending else 0
    [warning] = cover_warnings(report)
    assert f"still large on the highest slice (index {highest}: {fov['top_slice_share']:.0%}" in warning
    assert "misses the top of the brain (vertex)" in warning

    report = fov_report(cropped(brain_phantom(descending), bottom_mm=30), tmp_path, monkeypatch)
    assert report["brain_at_fov_edge"]["cut"] == ["bottom"]
    [warning] = cover_warnings(report)
    assert "still large on the lowest slice" in warning and "misses the bottom of the brain" in warning


def test_the_command_line_and_summary_say_so(tmp_path, monkeypatch):
    """`deepwml segment`: the warning on the terminal, in the report and in summary.csv's warnings column."""
    oracle_network(monkeypatch, brain="head")
    path = tmp_path / "cut.nii.gz"
    sitk.WriteImage(sitk.Cast(cropped(brain_phantom(), left_mm=20, top_mm=20), sitk.sitkUInt16), str(path))
    brain = tiny_model_file(tmp_path / "brain.pt", labels=BRAIN_LABELS)
    model = tiny_model_file(tmp_path / "tiny.pt")
    out = tmp_path / "out"
    assert main(["segment", str(path), "-o", str(out), "--model", str(model), "--brain-model", str(brain),
                 "--device", "cpu"]) == 0
    report = json.loads((out / "cut_report.json").read_text(encoding="utf-8"))
    assert report["brain_at_fov_edge"]["cut"] == ["left", "top"]
    [warning] = cover_warnings(report)
    with open(out / "summary.csv", newline="", encoding="utf-8-sig") as f:
        assert warning in next(csv.DictReader(f))["warnings"]
    assert main(["segment", str(path), "-o", str(tmp_path / "plain"), "--model", str(model), "--no-brain-mask",
                 "--brain-model", str(brain), "--device", "cpu"]) == 0
    plain = json.loads((tmp_path / "plain" / "cut_report.json").read_text(encoding="utf-8"))
    assert plain["brain_at_fov_edge"]["cut"] == ["left", "top"]  # the marks not gated, the scan still judged
    assert cover_warnings(plain) == [warning]


@pytest.mark.shared
def test_real_scans_cut_through_the_brain_are_said_and_whole_ones_not(shared_data):
    """A real clinical FLAIR (skull, 4 mm slices) with the shipped brain-mask network: as it is, no warning; its field
    of view moved 20 mm into the brain on the right and the top 20 mm of the brain cut off, both said. (The brain
    network stands in for the lesion network too, which the warning does not read: seconds, not 20.)"""
    from DeepWMLLib import io
    from DeepWMLLib.segment import load_brain_model, segment_image

    image = io.read_image(shared_data / "open_ms" / "clinical_flair" / "patient01_study1.nii.gz")
    brain = load_brain_model("default")
    whole = segment_image(image, [brain], device="cpu", brain_model=brain, checked=True)
    assert whole.report["brain_at_fov_edge"]["cut"] == [] and cover_warnings(whole.report) == []
    frame = io.slice_frame(image)
    stack, _ = io.to_axial_stack(whole.brain, dtype=np.uint8)
    columns = np.flatnonzero(stack.any(axis=(0, 1)))
    slices = np.flatnonzero(stack.any(axis=(1, 2)))
    right = columns[0] + round(20 / frame.col_spacing_mm)  # the stack's column 0 is the patient's right
    top = slices[-1] - round(20 / frame.slice_thickness_mm)  # the file stores the slices inferior first
    assert frame.inferior_first and not frame.flip_col and frame.col_axis == 0
    cut = segment_image(image[right:, :, :top + 1], [brain], device="cpu", brain_model=brain).report
    assert cut["brain_at_fov_edge"]["cut"] == ["right", "top"]
    assert len(cover_warnings(cut)) == 1
