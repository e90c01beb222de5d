"""The shipped default model keeps its measured accuracy on the real labelled MS cases.

The floors are set from the figures measured for the model card (Resources/Models/README.md),
a little below them so that thread-count noise cannot fail the test, never above what was measured.
The labelled cases are evaluation-only: nothing was trained or tuned on them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "benchmarks"))

# median Dice over the 3 cases per slice thickness (mm), measured for the model card of the shipped
# default, v9 (deepwml_unet32_v9.pt: one 32-channel U-Net, v5 widened and fine-tuned on an H200 in
# session 23) with the shipped brain mask, on this repository's 2-core AMD machine (OpenVINO bf16,
# the default there): 1 mm 0.728, 5 mm 0.757, 8 mm 0.710; measured again in session 35 after the network
# grid's centre was put on an 8 mm lattice: 1 mm 0.715, 5 mm 0.762, 8 mm 0.710, and once more after its step became 16
# network pixels: 1 mm 0.718, 5 mm 0.753, 8 mm 0.719; floor = that figure - 0.03 (bf16 and fp32
# masks moved these cases' Dice by at most 0.0014 for v6 and v7). It was chosen by a rule fixed
# before these cases were run with it, on synthetic and label-free checks (see the model card); v8
# measured 0.676, 0.762, 0.756, v7 0.547, 0.739, 0.736, v5 alone 0.429, 0.671, 0.638.
DICE_FLOORS = {1: 0.688, 5: 0.723, 8: 0.689}


@pytest.mark.shared
@pytest.mark.parametrize("thickness", [5, 8])
def test_shipped_model_dice_on_real_thick_slices(shared_data, thickness):
    from labelled_cases import evaluate

    rows = evaluate(None, thicknesses=(thickness,))
    dice = [r["dice"] for r in rows]
    assert np.median(dice) >= DICE_FLOORS[thickness], dice


@pytest.mark.shared
@pytest.mark.slow
def test_shipped_model_dice_on_real_1mm(shared_data):
    from labelled_cases import evaluate

    rows = evaluate(None, thicknesses=(1,))
    assert np.median([r["dice"] for r in rows]) >= DICE_FLOORS[1]


def test_readmes_first_command_segments_the_bundled_sample(tmp_path, capsys):
    """README's first command, the main job: the bundled synthetic sample with the shipped default model and its QC
    picture. Every output on the sample's grid, the warning README says it gives (a 126 mm slab that stops in the
    cerebellum), and the mask against the sample's painted lesions: Dice 0.907 measured in session 35 (floor 0.03
    below), 28.44 ml as README says (bf16 against fp32 moved it 0.02 ml)."""
    import json

    import SimpleITK as sitk

    from DeepWMLLib import io
    from DeepWMLLib.cli import main

    sample = Path(__file__).resolve().parents[1] / "Resources" / "Sample"
    out = tmp_path / "sample_out"
    assert main(["segment", str(sample / "sample_flair.nii.gz"), "-o", str(out), "--qc"]) == 0
    err = capsys.readouterr().err
    assert "the scan does not cover the whole brain: the brain is still large on the lowest slice" in err
    assert sorted(p.name for p in out.iterdir()) == ["sample_flair.seg.nrrd", "sample_flair_qc.png",
                                                     "sample_flair_report.json", "sample_flair_wmh.nii.gz", "summary.csv"]
    flair, truth = (sitk.ReadImage(str(sample / name)) for name in ("sample_flair.nii.gz", "sample_flair_truth.nii.gz"))
    mask = sitk.ReadImage(str(out / "sample_flair_wmh.nii.gz"))
    assert io.grid_difference(mask, flair) is None
    marked, painted = (sitk.GetArrayFromImage(m) > 0 for m in (mask, truth))
    assert 2 * (marked & painted).sum() / (marked.sum() + painted.sum()) >= 0.877
    report = json.loads((out / "sample_flair_report.json").read_text(encoding="utf-8"))
    assert report["volume_ml"] == pytest.approx(28.44, abs=0.3)
