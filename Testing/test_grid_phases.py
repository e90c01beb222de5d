"""--grid-phases 4: the lesion probabilities averaged over the network grid moved by sub-pixel phases, each map
resampled onto the input's own grid before the mean (README, "Grid phases")."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from DeepWMLLib import io
from DeepWMLLib.cli import main
from DeepWMLLib.errors import DeepWMLError
from DeepWMLLib.inference import predict_maps
from DeepWMLLib.preprocessing import NetworkGrid, apply_normalisation, plan_volume
from DeepWMLLib.segment import load_models

from conftest import make_volume, oracle_network, tiny_model_file


def _bright(slices: np.ndarray) -> np.ndarray:
    """The oracle network of conftest: 'bright means lesion', non-linear, so the phases' maps differ."""
    return 1.0 / (1.0 + np.exp(-4.0 * (slices - 3.0)))


def test_the_lesion_map_is_the_mean_of_the_moved_grids_maps_on_the_input_grid(tmp_path, monkeypatch):
    oracle_network(monkeypatch)
    model = load_models([tiny_model_file(tmp_path / "tiny.pt", grid=(64, 64), spacing_mm=1.1)])[0]
    image, _ = make_volume(size=(48, 40, 6), spacing=(0.7, 0.8, 5.0), blobs=((0.4, 0.5, 0.5, 2.5), (0.6, 0.4, 0.5, 1.5)))
    stack, frame = io.to_axial_stack(image)
    plan = plan_volume(stack, frame, {model.preprocessing})
    grid = plan.grids[model.preprocessing]
    normalised = apply_normalisation(stack[plan.kept], plan.centre, plan.scale)
    by_hand = []
    for rows, cols in ((0, 0), (0.5, 0), (0, 0.5), (0.5, 0.5)):  # the grid moved by fractions of its own pixels
        moved = NetworkGrid(grid.input_shape, grid.grid_size, grid.zoom,
                            (grid.offset[0] + rows * grid.zoom[0], grid.offset[1] + cols * grid.zoom[1]))
        one = np.zeros(stack.shape, np.float32)
        one[plan.kept] = moved.to_input(_bright(moved.to_network(normalised)))
        by_hand.append(one)
    averaged, _, _, averaged_frame = predict_maps(image, [model], device="cpu", phases=4)
    single, _, _, _ = predict_maps(image, [model], device="cpu")
    assert averaged.shape == stack.shape and averaged_frame == frame  # the input's own grid, slice for slice
    np.testing.assert_allclose(single, by_hand[0], atol=1e-6)
    np.testing.assert_allclose(averaged, np.mean(by_hand, axis=0), atol=1e-6)
    assert np.abs(averaged - single).max() > 1e-3  # the phases' maps differ: the mean is not the unmoved map
    with pytest.raises(DeepWMLError, match="grid phases must be 1 or 4, got 3"):
        predict_maps(image, [model], device="cpu", phases=3)


def test_segment_grid_phases_writes_on_the_input_grid_and_reruns_compare_it(tmp_path, capsys):
    model = tiny_model_file(tmp_path / "tiny.pt")
    image, _ = make_volume(size=(32, 30, 4), spacing=(0.7, 0.8, 5.0), origin=(-11.3, 7.1, -4.2))
    path = tmp_path / "a.nii.gz"
    sitk.WriteImage(sitk.Cast(image, sitk.sitkUInt16), str(path))
    out = tmp_path / "out"

    def segment(*extra):
        return main(["segment", str(path), "-o", str(out), "--model", str(model), "--device", "cpu", *extra])

    assert segment("--grid-phases", "4", "--save-probabilities") == 0
    report = json.loads((out / "a_report.json").read_text())
    assert report["settings"]["grid_phases"] == 4
    for name in ("a_wmh.nii.gz", "a_prob.nii.gz"):
        written = sitk.ReadImage(str(out / name))
        assert written.GetSize() == image.GetSize()
        np.testing.assert_allclose(written.GetSpacing(), image.GetSpacing(), atol=1e-5)
        np.testing.assert_allclose(written.GetOrigin(), image.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(written.GetDirection(), image.GetDirection(), atol=1e-6)
    capsys.readouterr()
    assert segment() == 1  # the default (one phase) is another result: not skipped as done
    assert "--grid-phases (4 then, 1 now)" in capsys.readouterr().err
    assert segment("--overwrite") == 0
    del report["settings"]["grid_phases"]  # a report made before --grid-phases: with one phase
    (out / "a_report.json").write_text(json.dumps(report))
    assert segment() == 0
    capsys.readouterr()
    assert segment("--grid-phases", "4") == 1
    assert "--grid-phases (1 then, 4 now)" in capsys.readouterr().err
