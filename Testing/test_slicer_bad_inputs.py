"""Bad inputs reaching the Slicer Logic as MRML nodes get the same one-line DeepWMLError as files do."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).parent / "slicer" / "support"))

from conftest import make_volume  # noqa: E402
from DeepWMLLib.errors import DeepWMLError  # noqa: E402
from slicer_fixtures import onnxCache, scene  # noqa: E402,F401 (fixtures)

from DeepWMLSlicerLib import MRMLConversion as mrml  # noqa: E402
from DeepWMLSlicerLib.CoreLogic import DeepWMLCoreLogic  # noqa: E402


def _volume_with(values: np.ndarray, name: str):
    image, _ = make_volume(size=(24, 24, 4))
    bad = sitk.GetImageFromArray(values.astype(np.float32))
    bad.CopyInformation(image)
    return mrml.volumeFromImage(bad, name)


@pytest.mark.parametrize("kind,words", [("constant", "constant"), ("nan", "non-finite")])
def test_unusable_volume_nodes_are_refused(scene, tiny_model, kind, words):
    values = np.zeros((4, 24, 24)) if kind == "constant" else np.random.default_rng(0).random((4, 24, 24))
    if kind == "nan":
        values[1, 2, 3] = np.nan
    volume = _volume_with(values, f"{kind} volume")
    before = scene.GetNumberOfNodes() if hasattr(scene, "GetNumberOfNodes") else None
    with pytest.raises(DeepWMLError, match=words) as info:
        DeepWMLCoreLogic().segmentVolume(volume, device="cpu", modelPaths=[str(tiny_model)])
    assert "\n" not in str(info.value)
    if before is not None:
        assert scene.GetNumberOfNodes() == before  # no half-made segmentation left behind


def test_corrupt_model_file_is_refused(scene, tmp_path):
    image, _ = make_volume(size=(24, 24, 4))
    volume = mrml.volumeFromImage(image, "flair")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a model")
    with pytest.raises(DeepWMLError, match="not a readable DeepWML model"):
        DeepWMLCoreLogic().segmentVolume(volume, device="cpu", modelPaths=[str(bad)])
