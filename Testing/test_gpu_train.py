"""Testing/benchmarks/gpu_train.py: the slices that travel to a device machine are train's own, and train there.

Packed slices must come back as the cache `deepwml train` prepares (labels exact, intensities within the
8-bit step and JPEG error), chunks must stay under their budget with every slice with lesion kept before
any without, and `run` must train a job from the unpacked cache into an exported model file.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "benchmarks"))

import gpu_train  # noqa: E402
from DeepWMLLib import checkpoint, train  # noqa: E402
from test_train import make_dataset  # noqa: E402


def test_quantise_round_trip_is_within_half_a_step():
    x = np.linspace(gpu_train.LO, gpu_train.HI, 1001, dtype=np.float32)
    back = gpu_train.dequantise(gpu_train.quantise(x)).astype(np.float32)
    step = (gpu_train.HI - gpu_train.LO) / 255
    assert np.abs(back - x).max() <= step / 2 + 0.01  # + float16 rounding
    assert gpu_train.quantise(np.array([-100.0, 100.0])).tolist() == [0, 255]


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu")
    manifest = make_dataset(root / "data", n_cases=5, slices=8)
    with open(manifest, newline="", encoding="utf-8-sig") as f:
        cases = [r["case"] for r in csv.DictReader(f)]
    split = root / "split.csv"
    split.write_text("case,split\n" + "".join(f"{c},{'val' if i == 0 else 'train'}\n" for i, c in enumerate(cases)))
    # a budget for about a third of the training slices in each of two chunks
    assert gpu_train.main(["pack", "--manifest", str(manifest), "--split", str(split), "--cache", str(root / "cache"),
                           "--budget-mb", "0.05", "--chunks", "2", "--val-mb", "1", "-o", str(root / "packed")]) == 0
    return root


def test_pack_keeps_lesion_slices_first_and_the_budget(packed):
    cache = train.SliceSet.open(packed / "cache", "train")
    has = (np.asarray(cache.labels).reshape(len(cache), -1) == 1).any(axis=1)
    sent = []
    for name in ("chunk0", "chunk1"):
        folder = packed / "packed" / name
        assert sum(f.stat().st_size for f in folder.glob("train_*")) <= 0.05 * 2**20 * 1.1
        sent.extend(np.load(folder / "train_index.npz")["slice_index"].tolist())
    assert len(sent) == len(set(sent)) and 0 < len(sent) < len(cache)
    # alternating order: as many with lesion as without while both last, so both kinds travel
    assert has[sent].any() and (~has[sent]).any()


def test_unpack_gives_train_cache_back(packed, tmp_path):
    meta = gpu_train.unpack([packed / "packed" / "chunk0", packed / "packed" / "chunk1"], tmp_path / "cache")
    original = train.SliceSet.open(packed / "cache", "train")
    back = train.SliceSet.open(tmp_path / "cache", "train")
    index = np.concatenate([np.load(packed / "packed" / c / "train_index.npz")["slice_index"] for c in ("chunk0", "chunk1")])
    assert len(back) == len(index) == meta["splits"]["train"]["n"]
    np.testing.assert_array_equal(back.labels, np.asarray(original.labels)[index])
    np.testing.assert_array_equal(back.case_index, np.asarray(original.case_index)[index])
    assert back.lesion_pixels.tolist() == (np.asarray(back.labels) == 1).reshape(len(back), -1).sum(axis=1).tolist()
    error = np.abs(np.asarray(back.images, np.float32) - np.clip(np.asarray(original.images, np.float32)[index],
                                                                 gpu_train.LO, gpu_train.HI))
    assert error.mean() < 0.1 and error.max() < 1.0, (error.mean(), error.max())
    val = train.SliceSet.open(tmp_path / "cache", "val")
    assert len(val) == len(train.SliceSet.open(packed / "cache", "val"))  # the val budget held them all


def test_run_trains_a_job_from_the_packed_slices(packed, tmp_path):
    jobs = tmp_path / "jobs.json"
    jobs.write_text(json.dumps({"T": {"architecture": {"name": "unet2d", "base_channels": 4, "depth": 2, "batch_norm": True},
                                      "epochs": 2, "batch_size": 4, "samples_per_epoch": 8, "lesion_fraction": 0.5,
                                      "device": "cpu", "threads": 1, "seed": 0}}))
    stash = tmp_path / "stash"
    stash.mkdir()
    (stash / "chunk1").symlink_to(packed / "packed" / "chunk1")
    out = tmp_path / "out"
    out.mkdir()
    assert gpu_train.main(["run", "--data", str(packed / "packed"), "--extra", str(stash), "--jobs", str(jobs),
                           "--minutes", "5", "--work", str(tmp_path / "work"), "--out", str(out)]) == 0
    with open(out / "T_history.csv", newline="", encoding="utf-8-sig") as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [1, 2]
    model = checkpoint.load_model(out / "T.pt")
    assert model.config["base_channels"] == 4
    assert model.provenance["data"]["packed_for_transfer"]["slices"]["train"][0] > 0
