"""Training: tiny volumes built here (not the synthetic generator), a tiny U-Net, one CPU thread."""

from __future__ import annotations

import csv
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from DeepWMLLib import checkpoint, io, train as training
from DeepWMLLib.errors import DeepWMLError
from DeepWMLLib.preprocessing import PreprocessingConfig

REPO = Path(__file__).resolve().parents[1]
SIZE = 64


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def flair_checks_once(monkeypatch):
    """Each case's FLAIR check (the brain-mask network) run once per worker, not again by every run of the same
    cases (conftest.memoize_flair_checks)."""
    from conftest import memoize_flair_checks

    memoize_flair_checks(monkeypatch)


def write_volume(array: np.ndarray, path: Path, spacing=(0.9, 0.9, 5.0), origin=(10.0, -20.0, 3.0)) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    # Oblique in-plane direction so the axial stack has to permute and flip axes.
    image.SetDirection((0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    sitk.WriteImage(image, str(path))


def make_dataset(folder: Path, n_cases: int = 6, slices: int = 8, seed: int = 0) -> Path:
    """Elliptic 'heads' with bright round 'lesions' on the inner slices; two centres."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    head = ((yy - SIZE / 2) / (0.4 * SIZE)) ** 2 + ((xx - SIZE / 2) / (0.35 * SIZE)) ** 2 < 1
    rows = ["case,flair,mask,centre,disease"]
    for i in range(n_cases):
        image = np.zeros((slices, SIZE, SIZE), np.float32)
        mask = np.zeros((slices, SIZE, SIZE), np.uint8)
        for k in range(slices):
            image[k][head] = 100
            if 1 <= k < slices - 1:
                for _ in range(int(rng.integers(1, 4))):
                    cy, cx = rng.integers(int(SIZE * 0.3), int(SIZE * 0.7), 2)
                    blob = (yy - cy) ** 2 + (xx - cx) ** 2 < rng.uniform(2, 4) ** 2
                    image[k][blob] = 200
                    mask[k][blob] = 1
        image += rng.normal(0, 5, image.shape).astype(np.float32)
        write_volume(image, folder / f"c{i}_flair.nii.gz")
        write_volume(mask, folder / f"c{i}_mask.nii.gz")
        rows.append(f"c{i},c{i}_flair.nii.gz,c{i}_mask.nii.gz,{'AB'[i % 2]},svd")
    manifest = folder / "manifest.csv"
    manifest.write_text("\n".join(rows) + "\n")
    return manifest


def tiny_config(manifest: Path, **overrides) -> dict:
    config = {
        "manifest": str(manifest),
        "architecture": {"name": "unet2d", "base_channels": 4, "depth": 2, "batch_norm": True},
        "preprocessing": {"grid_size": [SIZE, SIZE], "grid_spacing_mm": None},
        "epochs": 2,
        "batch_size": 4,
        "learning_rate": 0.01,
        "samples_per_epoch": 32,
        "lesion_fraction": 0.7,
        "threads": 1,
    }
    config.update(overrides)
    return config


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    best = training.train(tiny_config(dataset, epochs=4), run)
    return run, best


def read_history(run: Path) -> list[dict]:
    with open(run / "history.csv", newline="", encoding="utf-8-sig") as f:
        return list(csv.DictReader(f))


def test_training_lowers_the_loss_and_its_best_model_segments_lesions(trained, dataset):
    run, best = trained
    history = read_history(run)
    assert [int(r["epoch"]) for r in history] == [1, 2, 3, 4]
    assert list(history[0]) == list(training.HISTORY_COLUMNS)
    assert float(history[-1]["train_loss"]) < float(history[0]["train_loss"])

    loaded = checkpoint.load_model(best)
    assert loaded.provenance["data"]["manifest_sha256"]
    assert loaded.provenance["epoch"] == max(range(4), key=lambda i: float(history[i]["val_dice"])) + 1
    assert loaded.preprocessing == PreprocessingConfig.from_dict(tiny_config(dataset)["preprocessing"])

    val_case = next(r["case"] for r in csv.DictReader(open(run / "split.csv", encoding="utf-8-sig")) if r["split"] == "val")
    folder = dataset.parent
    image = sitk.ReadImage(str(folder / f"{val_case}_flair.nii.gz"), sitk.sitkFloat32)
    mask = sitk.ReadImage(str(folder / f"{val_case}_mask.nii.gz"))
    slices, labels, _ = training.prepare_volume(image, mask, loaded.preprocessing)
    with torch.no_grad():
        probability = torch.sigmoid(loaded.model(torch.from_numpy(slices).unsqueeze(1)))[:, 0].numpy()
    predicted = probability > loaded.threshold
    lesion = labels == 1
    dice = 2 * (predicted & lesion).sum() / (predicted.sum() + lesion.sum())
    assert dice > 0.5


def test_run_folder_holds_split_cache_and_checkpoints(trained):
    run, best = trained
    assert best == run / "best.pt"
    for name in ("config.json", "split.csv", "history.csv", "last.pt", "best.pt", "cache/train_images.npy"):
        assert (run / name).is_file(), name
    images = np.load(run / "cache" / "train_images.npy", mmap_mode="r")
    labels = np.load(run / "cache" / "train_labels.npy", mmap_mode="r")
    assert images.dtype == np.float16 and labels.dtype == np.uint8 and images.shape[1:] == (SIZE, SIZE)
    assert set(np.unique(labels)) == {0, 1}


def test_prepared_slices_are_what_inference_sees(dataset):
    """Orientation and grid: the label must sit on the bright blobs of the prepared image."""
    folder = dataset.parent
    image = sitk.ReadImage(str(folder / "c0_flair.nii.gz"), sitk.sitkFloat32)
    mask = sitk.ReadImage(str(folder / "c0_mask.nii.gz"))
    slices, labels, missed = training.prepare_volume(image, mask, PreprocessingConfig(grid_size=(SIZE, SIZE), grid_spacing_mm=None))
    assert slices.shape == labels.shape and slices.shape[1:] == (SIZE, SIZE)
    assert missed == 0
    assert set(np.unique(labels)) == {0, 1}
    lesion = labels == 1
    assert slices[lesion].mean() > slices[~lesion].mean() + 1.0


def test_split_is_stratified_and_deterministic():
    cases = [training.Case(f"a{i}", "f", "m", "A", "svd") for i in range(10)]
    cases += [training.Case(f"b{i}", "f", "m", "B", "ms") for i in range(5)]
    cases += [training.Case(f"c{i}", "f", "m", f"C{i}", "ms") for i in range(5)]  # one-case strata
    split = training.stratified_split(cases, seed=1)
    assert split == training.stratified_split(list(reversed(cases)), seed=1)
    assert split != training.stratified_split(cases, seed=2)
    counts = {s: sum(v == s for v in split.values()) for s in training.SPLITS}
    assert counts == {"train": 12, "val": 4, "test": 4}
    for prefix, n in (("a", 10), ("b", 5)):
        stratum = [split[f"{prefix}{i}"] for i in range(n)]
        assert abs(stratum.count("train") - 0.6 * n) <= 1 and abs(stratum.count("val") - 0.2 * n) <= 1
    assert len({split[f"c{i}"] for i in range(5)}) > 1  # single-case strata do not all go to training


def test_given_split_file_is_used(dataset, tmp_path):
    split = tmp_path / "my_split.csv"
    split.write_text("case,split\nc0,train\nc1,train\nc2,train\nc3,val\nc4,test\nc5,test\n")
    run = tmp_path / "run"
    training.train(tiny_config(dataset, split=str(split), epochs=1, samples_per_epoch=8), run)
    written = {r["case"]: r["split"] for r in csv.DictReader(open(run / "split.csv", encoding="utf-8-sig"))}
    assert written == {"c0": "train", "c1": "train", "c2": "train", "c3": "val", "c4": "test", "c5": "test"}
    assert json.loads((run / "cache" / "val.json").read_text(encoding="utf-8"))["cases"] == ["c3"]


def test_a_mistyped_case_in_a_split_file_is_refused_naming_the_manifest_cases_it_is_close_to(tmp_path):
    """A split file's case with a typo was refused as "not in the manifest" alone, one name per run; now every one
    is named at once (the first three and a count) with the manifest's nearest names, the unassigned first."""
    from types import SimpleNamespace

    cases = [SimpleNamespace(case=name) for name in ("sub-01", "sub-02", "sub-03", "patient_A", "Case7", "ctrl")]
    split = tmp_path / "split.csv"
    split.write_text("case,split\nsub-01,train\nsub-02,train\nsub-3,val\npatient_A,train\nctrl,test\ncase7,test\n")
    with pytest.raises(DeepWMLError) as error:
        training.read_split(split, cases)
    assert str(error.value) == (f"split file {split}: 2 case(s) not in the manifest: 'sub-3' (did you mean 'sub-03'?); "
                                "'case7' (did you mean 'Case7'?); name each case as the manifest's case column does")
    split.write_text("case,split\n" + "".join(f"{name},train\n" for name in ("sub-1", "xyzzy", "patient-A", "sub-9")))
    with pytest.raises(DeepWMLError) as error:
        training.read_split(split, cases)
    message = str(error.value)
    assert message.startswith(f"split file {split}: 4 case(s) not in the manifest: 'sub-1' (did you mean 'sub-01'"), message
    assert "'xyzzy'; 'patient-A' (did you mean 'patient_A'?); and 1 more;" in message and "sub-9" not in message
    split.write_text("case,split\nsub-01,train\nsub-3,val\nsub-3,test\n")  # a typo listed twice: said once
    with pytest.raises(DeepWMLError, match="case 'sub-3' is listed twice"):
        training.read_split(split, cases)


def test_a_split_file_saved_by_excel_with_semicolons_is_read_as_a_manifest_is(tmp_path):
    """Manifests from Excel's 'CSV UTF-8' with ';' between columns (German, French... settings) were read, but the
    split file, the one most often edited in a spreadsheet, was refused: 'needs the columns case, split'."""
    from types import SimpleNamespace

    cases = [SimpleNamespace(case=name) for name in ("c0", "Müller, H", "c2")]
    split = tmp_path / "split.csv"
    split.write_bytes("\ufeffcase;split\r\nc0;train\r\nMüller, H;val\r\nc2;test\r\n".encode("utf-8"))
    assert training.read_split(split, cases) == {"c0": "train", "Müller, H": "val", "c2": "test"}


def test_case_names_a_spreadsheet_would_take_for_formulas_are_text_in_split_csv_and_the_run_resumes(dataset, tmp_path):
    """A case "-AX FLAIR" showed #NAME? in split.csv opened in Excel or LibreOffice, which take a cell beginning with
    - (or =, +, @) for a formula: it is written with an apostrophe before it, which the spreadsheet does not show,
    and read back without, so that the run goes on with its split."""
    names = ["-AX FLAIR", "=1+1", "+C AX", "@c3", "c4", "c5"]
    lines = dataset.read_text().splitlines()
    manifest = dataset.parent / "formula_names.csv"
    manifest.write_text("\n".join([lines[0]] + [name + line[2:] for name, line in zip(names, lines[1:])]) + "\n")
    run = tmp_path / "run"
    training.train(tiny_config(manifest, epochs=1, samples_per_epoch=8), run)
    written = [r["case"] for r in csv.DictReader(open(run / "split.csv", encoding="utf-8-sig"))]
    assert sorted(written) == sorted(["'-AX FLAIR", "'=1+1", "'+C AX", "'@c3", "c4", "c5"])
    training.train(tiny_config(manifest, epochs=2, samples_per_epoch=8), run)
    assert [row["epoch"] for row in read_history(run)] == ["1", "2"]


def test_epoch_sampling_follows_the_lesion_fraction_and_the_seed():
    lesion = np.array([5] * 20 + [0] * 80)
    slices = training.SliceSet(np.zeros((100, 1, 1)), np.zeros((100, 1, 1)), np.zeros(100), lesion, [], 0)
    drawn = training.epoch_samples(slices, epoch=3, seed=0, n_samples=1000, lesion_fraction=0.7)
    assert 0.65 < np.mean(lesion[drawn] > 0) < 0.75
    assert np.array_equal(drawn, training.epoch_samples(slices, 3, 0, 1000, 0.7))
    assert not np.array_equal(drawn, training.epoch_samples(slices, 4, 0, 1000, 0.7))
    natural = training.epoch_samples(slices, epoch=1, seed=0, n_samples=100, lesion_fraction=None)
    assert sorted(natural.tolist()) == list(range(100))  # every slice once per epoch


def test_augmentation_moves_image_and_label_together():
    g = torch.Generator().manual_seed(0)
    labels = torch.zeros(16, 1, SIZE, SIZE)
    labels[:, :, 20:30, 10:25] = 1
    images = labels * 10.0
    geometry_only = dict(training.DEFAULT_AUGMENTATION, contrast=None, gamma=None, bias_field=None, noise_std=None)
    out_images, out_labels = training.augment(images, labels, geometry_only, g)
    assert set(out_labels.unique().tolist()) <= {0.0, 1.0}
    assert not torch.equal(out_labels, labels)
    agree = ((out_images > 5) == (out_labels > 0.5)).float().mean()
    assert agree > 0.995
    _, intensity_labels = training.augment(images, labels, dict(training.DEFAULT_AUGMENTATION, flip=False, rotate_deg=0,
                                                                  shear_deg=0, scale=None), g)
    assert torch.equal(intensity_labels, labels)


def test_patch_crops_contain_lesion_when_the_slice_has_some():
    labels = torch.zeros(8, 1, SIZE, SIZE)
    labels[:4, :, 50:53, 3:6] = 1
    images = torch.randn(8, 1, SIZE, SIZE)
    crops, crop_labels = training.random_crops(images, labels, 16, np.random.default_rng(0))
    assert crops.shape == (8, 1, 16, 16)
    assert all(crop_labels[i].sum() > 0 for i in range(4))


def test_export_writes_a_smaller_fp16_model_that_loads(trained, tmp_path):
    _, best = trained
    out = training.export_model(best, tmp_path / "shipped.pt", fp16=True)
    assert out.stat().st_size < best.stat().st_size
    loaded = checkpoint.load_model(out)
    assert loaded.provenance["exported_fp16"] is True
    data = checkpoint.load_model(best).provenance["data"]
    assert loaded.provenance["data"] == dict(data, manifest=Path(data["manifest"]).name, skipped_cases=0)


def test_average_of_two_models_is_their_weight_mean_and_refuses_mixed_kinds(trained, tmp_path):
    _, best = trained
    first = checkpoint.load_model(best)
    # A second model of the same kind with other weights: every tensor shifted by a known amount.
    other = {k: (v + 0.5 if v.is_floating_point() else v) for k, v in first.model.state_dict().items()}
    first.model.load_state_dict(other)
    shifted = checkpoint.save_model(tmp_path / "shifted.pt", first.model, first.config, first.preprocessing,
                                    first.threshold, {}, first.labels)
    out = training.average_models([best, shifted], tmp_path / "soup.pt", [0.75, 0.25])
    soup = checkpoint.load_model(out).model.state_dict()
    original = checkpoint.load_model(best).model.state_dict()
    for key, value in original.items():
        expected = value + 0.125 if value.is_floating_point() else value
        assert torch.allclose(soup[key], expected, atol=1e-6), key
    provenance = checkpoint.load_model(out).provenance
    assert [p["weight"] for p in provenance["averaged_from"]] == [0.75, 0.25]
    assert provenance["averaged_from"][0]["provenance"]["data"] == checkpoint.load_model(best).provenance["data"]

    with pytest.raises(DeepWMLError, match="sum to 1"):
        training.average_models([best, shifted], tmp_path / "bad.pt", [0.5, 0.6])
    with pytest.raises(DeepWMLError, match="one weight per model"):
        training.average_models([best, shifted], tmp_path / "bad.pt", [1.0])
    wider = dict(first.config, base_channels=first.config["base_channels"] * 2)
    from DeepWMLLib.model import build_model
    other_kind = checkpoint.save_model(tmp_path / "wider.pt", build_model(wider), wider, first.preprocessing,
                                       first.threshold, {}, first.labels)
    with pytest.raises(DeepWMLError, match=f"^{re.escape(str(other_kind))} and {re.escape(str(best))} differ in their "
                                           r"architecture \(.*\); only models of one kind can be averaged$"):
        training.average_models([best, other_kind], tmp_path / "bad.pt")
    relabelled = checkpoint.save_model(tmp_path / "relabelled.pt", first.model, first.config, first.preprocessing,
                                       first.threshold, {}, {"0": "background", "1": "lesion"})
    with pytest.raises(DeepWMLError, match=" differ in their labels "):  # was 'has another labels than'
        training.average_models([best, relabelled], tmp_path / "bad.pt")
    assert not (tmp_path / "bad.pt").exists()


def test_average_on_the_command_line(trained, tmp_path, capsys):
    from DeepWMLLib.cli import main

    _, best = trained
    assert main(["train", "--average", str(best), str(best), "--out", str(tmp_path / "same.pt"), "--fp16"]) == 0
    assert Path(capsys.readouterr().out.strip()) == tmp_path / "same.pt"
    same = checkpoint.load_model(tmp_path / "same.pt").model.state_dict()
    for key, value in checkpoint.load_model(best).model.state_dict().items():
        assert torch.allclose(same[key], value, atol=2e-3 * (1 + value.abs().max().item())), key
    assert main(["train", "--average", str(best), str(best)]) == 2  # a usage error
    assert "--average needs --out" in capsys.readouterr().err


def test_bad_manifests_stop_before_training(dataset, tmp_path):
    with pytest.raises(DeepWMLError, match="does not exist"):
        training.train(tiny_config(tmp_path / "nope.csv"), tmp_path / "r0")
    assert not (tmp_path / "r0").exists()
    bad_columns = tmp_path / "columns.csv"
    bad_columns.write_text("name,image\nx,y\n")
    with pytest.raises(DeepWMLError, match="case, flair, mask"):
        training.train(tiny_config(bad_columns), tmp_path / "r1")
    missing = tmp_path / "missing.csv"
    missing.write_text(dataset.read_text(encoding="utf-8").replace("c2_mask", "absent_mask").replace(",c", f",{dataset.parent}/c"))
    with pytest.raises(DeepWMLError, match="do not exist"):
        training.train(tiny_config(missing), tmp_path / "r2")
    assert not (tmp_path / "r2" / "last.pt").exists()


def test_a_started_run_prepared_with_skip_bad_cases_keeps_a_missing_case_out_when_rerun_without_it(dataset, tmp_path,
                                                                                                     caplog):
    """A run that started with --skip-bad-cases (a case's file missing) keeps its cases on a rerun (its config.json
    records the option it was prepared with), but a rerun without the option was refused for that missing file,
    where an unreadable case stayed out: it now stays out too, named again."""
    missing = tmp_path / "missing.csv"
    missing.write_text(dataset.read_text(encoding="utf-8").replace("c5_mask", "absent_mask").replace(",c", f",{dataset.parent}/c"))
    run = tmp_path / "run"
    training.train(tiny_config(missing, skip_bad_cases=True, epochs=1, samples_per_epoch=8), run)
    # which of the case's files is gone, not just that one is: a manifest of hundreds is mended from this
    gone = f"a file does not exist: {tmp_path / 'absent_mask.nii.gz'}"
    assert gone in (run / "skipped_cases.csv").read_text(encoding="utf-8-sig")
    caplog.set_level("WARNING", logger="DeepWMLLib")
    training.train(tiny_config(missing, epochs=2, samples_per_epoch=8), run)
    assert len(read_history(run)) == 2 and f"skipping case c5: {gone}" in caplog.text
    assert json.loads((run / "config.json").read_text(encoding="utf-8"))["skip_bad_cases"] is True
    with pytest.raises(DeepWMLError, match="do not exist"):  # a new run folder is refused, as before
        training.train(tiny_config(missing, epochs=1, samples_per_epoch=8), tmp_path / "new")


def test_a_case_whose_flair_sidecar_says_it_is_not_a_flair_is_named_in_a_warning(tmp_path, caplog):
    """A manifest whose flair column points at a diffusion image (dcm2niix's sidecar beside it says so) trains, as the
    picture passes, but the case is named in a warning, as segment warns of such a scan."""
    manifest = make_dataset(tmp_path / "data")
    (manifest.parent / "c3_flair.json").write_text(json.dumps({"SeriesDescription": "ep2d_diff_tra_TRACEW",
                                                                "ImageType": ["DERIVED", "PRIMARY", "DIFFUSION", "TRACEW"]}))
    caplog.set_level("WARNING", logger="DeepWMLLib")
    training.train(tiny_config(manifest, epochs=1, samples_per_epoch=8), tmp_path / "run")
    said = [r.getMessage() for r in caplog.records if "may not be a FLAIR" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("case c3: the scan may not be a FLAIR: its description "
                                                 "'ep2d_diff_tra_TRACEW' names a diffusion image") and "(c3_flair.json)" in said[0]


def test_a_validation_set_emptied_by_skipped_cases_is_said_so(dataset, tmp_path):
    """The one val case's mask missing, --skip-bad-cases: 'no training or no validation slice is left' said neither
    which nor why; it names the split and the skipped cases' table."""
    missing = tmp_path / "missing.csv"
    missing.write_text(dataset.read_text(encoding="utf-8").replace("c0_mask", "absent_mask").replace(",c", f",{dataset.parent}/c"))
    split = _split_file(tmp_path / "split.csv", {"c0": "val", "c1": "train", "c2": "train", "c3": "train", "c4": "train",
                                                 "c5": "test"})
    run = tmp_path / "run"
    with pytest.raises(DeepWMLError, match=re.escape(f"no validation slice is left after preparation: every val case was "
                                                     f"skipped (see {run / 'skipped_cases.csv'})")):
        training.train(tiny_config(missing, split=str(split), skip_bad_cases=True, epochs=1), run)


def test_validation_masks_without_lesion_are_said_with_how_to_mend_the_split(tmp_path, caplog):
    folder = tmp_path / "data"
    manifest = make_dataset(folder, n_cases=5)
    sitk.WriteImage(sitk.ReadImage(str(folder / "c0_mask.nii.gz")) * 0, str(folder / "c0_mask.nii.gz"))
    split = _split_file(tmp_path / "split.csv", {"c0": "val", "c1": "train", "c2": "train", "c3": "train", "c4": "test"})
    with caplog.at_level("WARNING", logger="DeepWMLLib"):
        training.train(tiny_config(manifest, split=str(split), epochs=1, samples_per_epoch=8), tmp_path / "run")
    assert ("no validation mask holds lesion: val Dice is 1 for predicting nothing, so it cannot choose the best "
            "epoch; put cases with lesion in val: --split with a CSV of case, split, or another --seed") in caplog.text


def test_a_mask_on_another_grid_stops_or_is_skipped_on_request(dataset, tmp_path):
    folder = tmp_path / "data"
    manifest = make_dataset(folder, n_cases=6)
    mask = sitk.ReadImage(str(folder / "c1_mask.nii.gz"))
    mask.SetSpacing((1.0, 1.0, 5.0))
    sitk.WriteImage(mask, str(folder / "c1_mask.nii.gz"))
    with pytest.raises(DeepWMLError, match="case c1.*different voxel grids.*--skip-bad-cases"):
        training.train(tiny_config(manifest), tmp_path / "stop")
    assert not (tmp_path / "stop" / "last.pt").exists()
    run = tmp_path / "skip"
    training.train(tiny_config(manifest, skip_bad_cases=True, epochs=1, samples_per_epoch=8), run)
    assert "c1" in (run / "skipped_cases.csv").read_text(encoding="utf-8-sig")
    assert (run / "best.pt").is_file()


def test_a_path_too_long_to_look_up_is_its_case_s_error_or_skipped_on_request(tmp_path):
    """A manifest path the file system cannot look up (a name over 255 bytes; a folder the account may not
    open) ended every training in 'internal error: OSError: File name too long', --skip-bad-cases or not."""
    folder = tmp_path / "data"
    manifest = make_dataset(folder, n_cases=6)
    manifest.write_text(manifest.read_text(encoding="utf-8").replace("c1_flair.nii.gz", "x" * 300 + ".nii.gz"),
                        encoding="utf-8")
    with pytest.raises(DeepWMLError, match=r"case c1: .*cannot be looked up \(File name too long\).*--skip-bad-cases"):
        training.train(tiny_config(manifest), tmp_path / "stop")
    run = tmp_path / "skip"
    training.train(tiny_config(manifest, skip_bad_cases=True, epochs=1, samples_per_epoch=8), run)
    assert "c1,".encode() in (run / "skipped_cases.csv").read_bytes()
    assert (run / "best.pt").is_file()


def test_settings_added_later_count_as_their_defaults_when_resuming():
    """A run folder written before a setting existed resumes: the missing key is its default."""
    current = training.TrainConfig(manifest="m.csv").to_dict()
    stored = {k: v for k, v in current.items() if k not in ("mask_column", "label_name")}
    assert training._config_differences(stored, current) == []
    assert training._config_differences(stored, dict(current, mask_column="intracranial")) == ["mask_column"]


def test_a_run_folder_refuses_other_settings(trained, dataset):
    run, _ = trained
    with pytest.raises(DeepWMLError, match="other settings.*learning_rate"):
        training.train(tiny_config(dataset, learning_rate=0.5), run)


def _last_state(run: Path) -> dict:
    return torch.load(run / "last.pt", weights_only=True)


@pytest.mark.parametrize("skip_bad_cases", [False, True])
@pytest.mark.parametrize("full", ["_flair_check", "cases"])
def test_a_full_disk_preparing_the_cache_stops_the_run_and_leaves_out_no_case(dataset, tmp_path, monkeypatch,
                                                                                skip_bad_cases, full):
    """A full disk as the slice cache was prepared was a case's fault, 'case c0: cannot write ... (or pass
    --skip-bad-cases to leave it out)', and with --skip-bad-cases cases were left out of training for good (cache.json
    lists them skipped); a full disk as its folder was made an internal error. Now the run stops, saying so."""
    import errno

    real_sync, real_mkdir = io._sync, Path.mkdir

    def sync(path):
        if full in path.name:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_sync(path)

    def mkdir(path, *args, **kwargs):
        if path.name == full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(io, "_sync", sync)
    monkeypatch.setattr(Path, "mkdir", mkdir)
    with pytest.raises(DeepWMLError, match="No space left on device.*the disk is full") as caught:
        training.train(tiny_config(dataset, skip_bad_cases=skip_bad_cases), tmp_path / "run")
    assert "skip-bad-cases" not in str(caught.value)
    assert not (tmp_path / "run" / "skipped_cases.csv").exists()


def test_resume_after_sigkill_is_bit_identical(dataset, tmp_path, capsys):
    from DeepWMLLib.cli import main

    config = tiny_config(dataset, epochs=3, samples_per_epoch=48)
    reference = tmp_path / "reference"
    training.train(config, reference)

    killed = tmp_path / "killed"
    command = [sys.executable, "-m", "DeepWMLLib.train", str(dataset), "--run-dir", str(killed), "--base-channels", "4",
               "--depth", "2", "--batch-norm", "--grid-size", str(SIZE), "--grid-spacing", "none", "--epochs", "3",
               "--batch-size", "4", "--lr", "0.01", "--samples-per-epoch", "48", "--lesion-fraction", "0.7", "--threads", "1"]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not (killed / "last.pt").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, process.stderr.read().decode()
    assert 1 <= _last_state(killed)["epoch"] < 3  # killed mid-run, not after the end

    assert main(["train", "--resume", str(killed)]) == 0
    assert "resuming" in capsys.readouterr().err
    a, b = _last_state(reference), _last_state(killed)
    assert a["epoch"] == b["epoch"] == 3
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    drop_time = [{k: v for k, v in row.items() if k != "seconds"} for row in a["history"]]
    assert drop_time == [{k: v for k, v in row.items() if k != "seconds"} for row in b["history"]]
    assert len(read_history(killed)) == 3


_KILLED_WRITING = """
import os, signal, sys
from pathlib import Path
from DeepWMLLib import io
from DeepWMLLib.cli import main

replace = io._replace

def killed_at(tmp, path):  # the process dies as the file sys.argv[1] is renamed into place, sys.argv[2] that
    if Path(path).name == sys.argv[1] and sys.argv[2] == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    replace(tmp, path)
    if Path(path).name == sys.argv[1]:
        os.kill(os.getpid(), signal.SIGKILL)

io._replace = killed_at
main(["train", *sys.argv[3:]])
"""


def _killed_writing(dataset: Path, run: Path, name: str, when: str) -> dict:
    """Train in `run` in another process, killed (SIGKILL) as the file `name` is renamed into place, `when` before
    or after; then resume it here."""
    killed = subprocess.run([sys.executable, "-c", _KILLED_WRITING, name, when, str(dataset), "--run-dir", str(run),
                             "--base-channels", "4", "--depth", "2", "--grid-size", str(SIZE), "--grid-spacing", "none",
                             "--epochs", "1", "--samples-per-epoch", "8", "--threads", "1"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    return tiny_config(dataset, epochs=1, samples_per_epoch=8, architecture={
        "name": "unet2d", "base_channels": 4, "depth": 2, "batch_norm": False})


@pytest.mark.parametrize("name", ["train_images.npy", "last.pt"])
def test_a_run_killed_while_writing_a_file_leaves_no_temporary_copy_once_resumed(name, dataset, tmp_path):
    """A kill while a file was being written left its hidden temporary copy in the run folder for good (a split's
    slices: as large as the data set)."""
    run = tmp_path / "run"
    config = _killed_writing(dataset, run, name, "before")
    assert [p for p in run.rglob("*") if ".part" in p.name]  # what the kill left

    training.train(config, run)
    assert [int(r["epoch"]) for r in read_history(run)] == [1]
    assert not [p for p in run.rglob("*") if ".part" in p.name]


@pytest.mark.parametrize("lost", ["train_images.npy", "val_index.npz"])
def test_a_file_of_the_prepared_cache_deleted_since_is_prepared_again(lost, dataset, tmp_path):
    """A cache deleted whole is prepared again on the next run, but one of its files deleted (a large .npy, to save
    space) stopped every rerun on "internal error: FileNotFoundError"."""
    run = tmp_path / "run"
    config = tiny_config(dataset, epochs=1, samples_per_epoch=8)
    training.train(config, run)
    before = np.load(run / "cache" / lost)
    before = before["lesion_pixels"] if lost.endswith(".npz") else np.array(before)
    (run / "cache" / lost).unlink()
    training.train(dict(config, epochs=2), run)
    assert [int(r["epoch"]) for r in read_history(run)] == [1, 2]
    after = np.load(run / "cache" / lost)
    assert np.array_equal(before, after["lesion_pixels"] if lost.endswith(".npz") else after)


def test_a_started_run_whose_cache_is_prepared_again_keeps_the_cases_it_started_with(tmp_path):
    """A started run keeps its cases (--skip-bad-cases as it started, whatever the resume says), but a file of its
    cache deleted since was prepared again by the resume's decisions: without --skip-bad-cases, the case the run
    left out stopped the resume ("or pass --skip-bad-cases"), as it would a new run. Prepared again as it started."""
    folder = tmp_path / "data"
    manifest = make_dataset(folder, n_cases=6)
    mask = sitk.ReadImage(str(folder / "c1_mask.nii.gz"))
    mask.SetSpacing((1.0, 1.0, 5.0))
    sitk.WriteImage(mask, str(folder / "c1_mask.nii.gz"))
    run = tmp_path / "skip"
    training.train(tiny_config(manifest, skip_bad_cases=True, epochs=1, samples_per_epoch=8), run)
    before = np.array(np.load(run / "cache" / "train_labels.npy"))
    (run / "cache" / "train_images.npy").unlink()
    training.train(tiny_config(manifest, epochs=2, samples_per_epoch=8), run)
    assert [int(r["epoch"]) for r in read_history(run)] == [1, 2]
    assert "c1" in (run / "skipped_cases.csv").read_text(encoding="utf-8-sig")
    assert np.array_equal(np.load(run / "cache" / "train_labels.npy"), before)


def test_a_run_killed_as_its_cache_was_done_keeps_no_copy_of_the_cases_slices(dataset, tmp_path):
    """Killed between marking the cache done (cache.json) and removing each case's prepared slices (cache/cases,
    another copy of the data set), the run kept that copy for good: a resume found the cache done and never
    removed it."""
    run = tmp_path / "run"
    config = _killed_writing(dataset, run, "cache.json", "after")
    assert list((run / "cache" / "cases").iterdir())  # what the kill left

    training.train(config, run)
    assert [int(r["epoch"]) for r in read_history(run)] == [1]
    assert not (run / "cache" / "cases").exists()


def test_cli_reports_a_bad_manifest_in_one_line(tmp_path, capsys):
    from DeepWMLLib.cli import main

    assert main(["train", str(tmp_path / "none.csv"), "--run-dir", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "none.csv does not exist" in err


def test_early_stopping_and_plateau_follow_the_validation_dice(dataset, tmp_path):
    run = tmp_path / "run"
    # A learning rate this small cannot change the validation Dice: every epoch after the first is a plateau.
    config = tiny_config(dataset, epochs=6, samples_per_epoch=8, learning_rate=1e-12, plateau_patience=0,
                         early_stopping_patience=2)
    training.train(config, run)
    history = read_history(run)
    assert len(history) == 3
    assert [float(r["lr"]) for r in history] == pytest.approx([1e-12, 1e-12, 5e-13])
    state = _last_state(run)
    assert state["finished"] and state["best_epoch"] == 1
    training.train(config, run)  # a finished run stays finished
    assert len(read_history(run)) == 3


def test_ensemble_members_differ_and_segment_together(dataset, tmp_path, capsys):
    from DeepWMLLib.cli import main

    run = tmp_path / "ensemble"
    best = training.train(tiny_config(dataset, ensemble=2, epochs=1, samples_per_epoch=8), run)
    assert best == [run / "model_0" / "best.pt", run / "model_1" / "best.pt"]
    a, b = (checkpoint.load_model(p) for p in best)
    assert (a.provenance["seed"], b.provenance["seed"]) == (0, 1)
    assert not torch.equal(a.model.state_dict()["head.weight"], b.model.state_dict()["head.weight"])
    assert a.provenance["data"]["split_sha256"] == b.provenance["data"]["split_sha256"]
    out = tmp_path / "out"
    assert main(["segment", str(dataset.parent / "c5_flair.nii.gz"), "-o", str(out), "--model", *map(str, best),
                 "--device", "cpu"]) == 0
    mask = sitk.ReadImage(str(out / "c5_flair_wmh.nii.gz"))
    assert mask.GetSize() == sitk.ReadImage(str(dataset.parent / "c5_flair.nii.gz")).GetSize()
    # the run folder given for its models: which files they are (segment said 'put INPUT before --model')
    members = f"(the training run folder of an ensemble of 2: its members' model files are {run / 'model_*' / 'best.pt'})"
    for command in (["segment", str(dataset.parent / "c5_flair.nii.gz"), "-o", str(tmp_path / "o2"), "--model", str(run)],
                    ["train", "--export", str(run), str(tmp_path / "one.pt")]):
        assert main(command) == 1
        assert f"{run} is a folder, not a model file {members}" in capsys.readouterr().err


@pytest.mark.slow
def test_torchrun_with_two_cpu_processes(dataset, tmp_path):
    run = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "DeepWMLLib.train", str(dataset), "--run-dir", str(run), "--base-channels", "4", "--depth", "2",
               "--batch-norm", "--grid-size", str(SIZE), "--grid-spacing", "none", "--epochs", "1", "--batch-size", "4",
               "--samples-per-epoch", "16", "--device", "cpu"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=240,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("best.pt") == 1  # only rank 0 reports and writes
    assert len(read_history(run)) == 1
    loaded = checkpoint.load_model(run / "best.pt")
    assert loaded.provenance["world_size"] == 2


@pytest.mark.parametrize("rank,local_rank,shown", [("0", "0", "deepwml train: error"), ("1", "1", None),
                                                    ("2", "0", "deepwml train (process 2): error")])
def test_under_torchrun_each_node_prints_an_input_error_once(rank, local_rank, shown, tmp_path, monkeypatch, capsys):
    """Rank 0 says it; the other processes of its node keep quiet; another node's first process says
    it too (its files may differ), naming itself. An error rank 0 shared with everyone: rank 0 only."""
    from DeepWMLLib.cli import main

    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    monkeypatch.setenv("WORLD_SIZE", "4")
    argv = ["train", "m.csv", "--run-dir", str(tmp_path / "r"), "--out", "x.pt"]
    assert main(argv) == 2  # every process fails alike
    err = capsys.readouterr().err
    assert (err.startswith(shown) and "--weights and --out go with --average" in err) if shown else err == ""
    with pytest.raises(SystemExit) as exit_info:  # argparse's own usage errors alike
        main(["train", "m.csv", "--epochs", "0"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert ("--epochs: must be at least 1" in err) if shown else err == ""

    def shared_failure(args):
        error = DeepWMLError("the manifest lists no cases")
        error.from_rank_0 = True  # as _Dist.run_on_main raises rank 0's error on every process
        raise error

    monkeypatch.setattr(training, "_run", shared_failure)
    assert main(["train", "m.csv", "--run-dir", str(tmp_path / "r")]) == 1
    assert ("no cases" in capsys.readouterr().err) is (rank == "0")
    monkeypatch.setenv("WORLD_SIZE", "1")  # not distributed: always said
    assert main(["train", "m.csv", "--run-dir", str(tmp_path / "r")]) == 1 and "no cases" in capsys.readouterr().err


def test_off_switches_a_range_augmentation_off_in_the_config(tmp_path):
    from DeepWMLLib.cli import build_parser

    args = build_parser().parse_args(["train", "m.csv", "--run-dir", str(tmp_path / "r"), "--scale", "off",
                                      "--contrast", "0", "--rotate", "0"])
    augmentation = training.config_from_args(args)[0]["augmentation"]
    assert (augmentation["scale"], augmentation["contrast"], augmentation["rotate_deg"]) == (None, None, 0.0)
    assert augmentation["gamma"] == training.DEFAULT_AUGMENTATION["gamma"] is not None  # not given: the default


def test_every_training_option_is_either_fixed_by_a_run_or_may_change_on_resume():
    """A new option must be sorted into one of the lists, or --resume would silently ignore it."""
    from DeepWMLLib.cli import build_parser

    parser = build_parser("train")
    sub = next(a for a in parser._actions if isinstance(getattr(a, "choices", None), dict)).choices["train"]
    not_settings = {"help", "debug", "manifest", "run_dir", "resume", "config", "grid_spacing",  # grid_spacing: see _SETTING_OPTIONS
                    "export", "average", "weights", "widen", "widen_noise", "out", "fp16"}  # these write a model file, no run
    dests = {a.dest for a in sub._actions}
    assert dests - not_settings == set(training._SETTING_OPTIONS) | set(training._RESUMABLE_OPTIONS)
    assert not set(training._SETTING_OPTIONS) & set(training._RESUMABLE_OPTIONS)


def test_init_takes_a_shipped_model_s_name_as_segment_s_model_does(tmp_path):
    """`--init unet32-v9` (the name segment's --model takes) was 'model file .../unet32-v9 does not exist'."""
    from DeepWMLLib.cli import build_parser
    from DeepWMLLib.errors import UsageError
    from DeepWMLLib.segment import shipped_models

    shipped = {entry["name"]: entry["path"] for entry in shipped_models()}
    name = next(iter(shipped))

    def init(spec):
        args = build_parser().parse_args(["train", "m.csv", "--run-dir", str(tmp_path / "r"), "--init", spec])
        return training.TrainConfig.coerce(training.config_from_args(args)[0]).init

    assert init(name) == str(Path(shipped[name]).resolve())
    with pytest.raises(UsageError, match="is an ensemble of 4 models, and fine-tuning starts from one: give one of its "
                                         "members"):
        init("ensemble-v8")
    with pytest.raises(UsageError, match="--init no-such-model: no such model file, nor a shipped model"):
        init("no-such-model")


def test_command_line_flags_become_the_training_config(tmp_path):
    from DeepWMLLib.cli import build_parser

    args = build_parser().parse_args(["train", "m.csv", "--run-dir", str(tmp_path / "r"), "--base-channels", "16",
                                      "--depth", "3", "--batch-norm", "--grid-size", "192", "--grid-spacing", "none",
                                      "--patch-size", "96", "--lesion-fraction", "0.7", "--no-augment", "--rotate", "5",
                                      "--scale", "0.8,1.2", "--early-stopping", "20", "--ensemble", "3",
                                      "--init", "base.pt", "--mask-column", "intracranial", "--label-name", "intracranial",
                                      "--ignore-label", "9", "--cpu-bf16", "--allow-non-flair"])
    config, run = training.config_from_args(args)
    assert run == tmp_path / "r"
    cfg = training.TrainConfig.coerce(config)
    assert cfg.architecture == {"name": "unet2d", "in_channels": 1, "base_channels": 16, "depth": 3, "batch_norm": True}
    assert cfg.preprocessing["grid_size"] == [192, 192] and cfg.preprocessing["grid_spacing_mm"] is None
    assert (cfg.patch_size, cfg.lesion_fraction, cfg.early_stopping_patience, cfg.ensemble) == (96, 0.7, 20, 3)
    assert cfg.augmentation["rotate_deg"] == 5 and cfg.augmentation["scale"] == [0.8, 1.2]
    assert not cfg.augmentation["flip"] and cfg.augmentation["noise_std"] is None
    assert cfg.init == str(Path("base.pt").resolve())
    assert (cfg.mask_column, cfg.label_name, cfg.ignore_label) == ("intracranial", "intracranial", 9)
    assert cfg.cpu_bf16 and not training.TrainConfig().cpu_bf16
    assert cfg.allow_non_flair and not training.TrainConfig().allow_non_flair
    with pytest.raises(DeepWMLError, match="multiple of 8"):
        training.TrainConfig.coerce(dict(config, patch_size=100))


def test_cancel_stops_and_a_rerun_finishes(dataset, tmp_path):
    from DeepWMLLib.errors import Cancelled

    run = tmp_path / "run"
    calls = []
    with pytest.raises(Cancelled):
        training.train(tiny_config(dataset, epochs=1, samples_per_epoch=8), run,
                       progress=lambda f, m: calls.append(m), cancel=lambda: len(calls) > 3)
    assert not (run / "best.pt").exists()
    assert training.train(tiny_config(dataset, epochs=1, samples_per_epoch=8), run) == run / "best.pt"


def test_a_training_stopped_by_a_signal_says_how_to_go_on(trained, dataset, tmp_path, monkeypatch, capsys):
    """A stop (Ctrl-C, a scheduler's SIGTERM) said only 'stopped by SIGTERM': not that the run keeps its epochs, nor
    that rerunning the command goes on."""
    from DeepWMLLib.cli import main

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "train", stopped)
    run, _ = trained
    assert main(["train", "--resume", str(run)]) == 130
    assert (f"{run} keeps every finished epoch: rerun the same command, or `deepwml train --resume {run}`, to go on "
            "from the last") in capsys.readouterr().err
    assert main(["train", str(dataset), "--run-dir", str(tmp_path / "new")]) == 130
    assert "no epoch was finished: rerun the same command to start again" in capsys.readouterr().err


def test_cli_export_writes_an_fp16_model(trained, tmp_path, capsys):
    from DeepWMLLib.cli import main

    _, best = trained
    assert main(["train", "--export", str(best), str(tmp_path / "small.pt"), "--fp16"]) == 0
    payload = torch.load(tmp_path / "small.pt", weights_only=True)
    assert payload["state_dict"]["head.weight"].dtype == torch.float16
    assert checkpoint.load_model(tmp_path / "small.pt").threshold == checkpoint.load_model(best).threshold
    # A threshold chosen after training goes into the exported file; the training one is kept on record.
    assert main(["train", "--export", str(best), str(tmp_path / "t.pt"), "--threshold", "0.35"]) == 0
    exported = checkpoint.load_model(tmp_path / "t.pt")
    assert exported.threshold == pytest.approx(0.35)
    assert exported.provenance["threshold_during_training"] == checkpoint.load_model(best).threshold
    with pytest.raises(SystemExit) as usage:  # out of range: a usage error, exit 2
        main(["train", "--export", str(best), str(tmp_path / "u.pt"), "--threshold", "1.5"])
    assert usage.value.code == 2
    assert not (tmp_path / "u.pt").exists()
    with pytest.raises(DeepWMLError, match="between 0 and 1"):  # the API refuses it too
        training.export_model(best, tmp_path / "u.pt", threshold=1.5)
    # the exported file names no folder of the training data and no case
    source = checkpoint.load_model(best).provenance
    assert str(Path(source["training_config"]["manifest"]).parent) in json.dumps(source)
    shared = checkpoint.load_model(tmp_path / "small.pt").provenance
    text = json.dumps(shared)
    assert str(Path(source["training_config"]["manifest"]).parent) not in text and str(tmp_path) not in text
    assert shared["training_config"]["manifest"] == "manifest.csv" and shared["data"]["skipped_cases"] == 0
    assert shared["metrics"] == source["metrics"] and shared["training_config"]["epochs"] == 4
    assert training.shareable_provenance({"data": {"skipped_cases": ["MRN123", "MRN456"]},
                                          "command": "deepwml train /h/cohort.csv --run-dir /h/r --lr 1e-4"}) == {
        "data": {"skipped_cases": 2}, "command": "deepwml train cohort.csv --run-dir r --lr 1e-4"}
    adapted = {"adapted_batch_norm": {"scans": [{"scan": "DOE_JOHN", "slices": 20}, {"scan": "p01.nii.gz"}],
                                      "earlier": {"scans": [{"scan": "MRN123"}]}, "slices": 40}}
    assert training.shareable_provenance(adapted) == {"adapted_batch_norm": {"scans": 2, "earlier": {"scans": 1},
                                                                             "slices": 40}}



def test_a_model_written_over_the_file_it_is_made_from_is_refused(trained, tmp_path, capsys):
    """`--export runs/a/best.pt runs/a/best.pt --fp16` (a slip) replaced the run's best.pt by its fp16 copy, its
    provenance stripped; --average and --widen wrote over a source as well. Refused, the file left as it was."""
    from DeepWMLLib.cli import main

    (tmp_path / "run").mkdir()
    best = tmp_path / "run" / "best.pt"
    best.write_bytes(trained[1].read_bytes())
    before = best.read_bytes()
    for command in (["--export", str(best), str(tmp_path / "run" / ".." / "run" / "best.pt"), "--fp16"],
                    ["--average", str(trained[1]), str(best), "--out", str(best)],
                    ["--widen", str(best), "--out", str(best)]):
        assert main(["train", *command]) == 1
        assert f"would replace {best}, the model file it is made from" in capsys.readouterr().err
        assert best.read_bytes() == before


def test_shareable_provenance_drops_every_folder_of_paths_with_spaces():
    """A path with spaces in it (quoted in the command line, or a setting's value) lost only its last folder
    but one: the folders named 'Smith Anna 1960' and 'Doe John' stayed in part in an exported model file."""
    command = shlex.join(["deepwml", "train", "/data/Smith Anna 1960/cases.csv", "--run-dir", "/runs/Doe John/r1",
                          "--split=C:\\Users\\Doe John\\split.csv", "--lr", "1e-4"])
    shared = training.shareable_provenance({"command": command,
                                            "training_config": {"manifest": "/data/Smith Anna 1960/cases.csv"}})
    assert shared == {"command": "deepwml train cases.csv --run-dir r1 --split=split.csv --lr 1e-4",
                      "training_config": {"manifest": "cases.csv"}}

def test_fine_tuning_starts_from_the_given_model(trained, dataset, tmp_path):
    _, best = trained
    source_dice = float(checkpoint.load_model(best).provenance["metrics"]["val_dice"])
    assert source_dice > 0.5
    # A learning rate this small leaves the weights where they start: from the model, validation
    # is about as good as the model's own; from scratch it is not.
    tuned = training.train(tiny_config(dataset, epochs=1, learning_rate=1e-9, init=str(best)), tmp_path / "tuned")
    fresh = training.train(tiny_config(dataset, epochs=1, learning_rate=1e-9), tmp_path / "fresh")
    tuned_dice = float(read_history(tmp_path / "tuned")[0]["val_dice"])
    fresh_dice = float(read_history(tmp_path / "fresh")[0]["val_dice"])
    assert tuned_dice > source_dice - 0.15 and tuned_dice > fresh_dice + 0.2
    provenance = checkpoint.load_model(tuned).provenance
    assert provenance["initialised_from"] == {"file": "best.pt", "sha256": checkpoint.file_digest(best)}
    assert checkpoint.load_model(fresh).provenance.get("initialised_from") is None


def test_a_fine_tuning_run_resumes_without_its_init_file_and_names_the_file_it_started_from(trained, dataset, tmp_path,
                                                                                          monkeypatch):
    """A started run has its weights in last.pt, but a resume read --init's file again: moved or deleted since, the
    run was refused ("model file ... does not exist"); trained on since (another run's best.pt), its best.pt named
    the digest of the file as it was then, not of the weights it started from."""
    _, best = trained
    source = tmp_path / "source.pt"
    source.write_bytes(Path(best).read_bytes())
    started_from = checkpoint.file_digest(source)
    dice = iter([0.1, 0.2, 0.3])  # each epoch better than the last, so each writes best.pt
    monkeypatch.setattr(training, "validate", lambda *args, **kwargs: {
        "val_loss": 1.0, "val_dice": next(dice), "val_sensitivity": 0.5, "val_precision": 0.5})
    config = tiny_config(dataset, epochs=1, samples_per_epoch=8, init=str(source))
    training.train(config, tmp_path / "tuned")
    source.unlink()
    tuned = training.train(dict(config, epochs=2), tmp_path / "tuned")
    assert [int(r["epoch"]) for r in read_history(tmp_path / "tuned")] == [1, 2]
    provenance = checkpoint.load_model(tuned).provenance
    assert provenance["epoch"] == 2
    assert provenance["initialised_from"] == {"file": "source.pt", "sha256": started_from}


def test_an_ensemble_resumed_with_a_member_yet_to_start_checks_its_init_file_before_any_training(trained, dataset,
                                                                                                   tmp_path):
    """--init is read no more once a run has its weights in last.pt, but an ensemble with a member that has not
    started yet needs the file for it: the check of it up front was left out as soon as one member had a last.pt, so
    a file moved since was refused only when that member came, after the others had trained on (hours). Refused
    up front again, before any epoch."""
    _, best = trained
    source = tmp_path / "source.pt"
    source.write_bytes(Path(best).read_bytes())
    config = tiny_config(dataset, epochs=1, samples_per_epoch=8, init=str(source), ensemble=2)
    run = tmp_path / "tuned"
    training.train(config, run)
    __import__("shutil").rmtree(run / "model_1")  # the second member not started yet (the run stopped during the first)
    source.unlink()
    with pytest.raises(DeepWMLError, match="source.pt"):
        training.train(dict(config, epochs=2), run)
    assert [int(r["epoch"]) for r in read_history(run / "model_0")] == [1]


def test_fine_tuning_on_another_grid_says_how_to_keep_the_model_s(trained, dataset, tmp_path, caplog):
    _, best = trained
    with caplog.at_level("WARNING", logger="DeepWMLLib"):
        training.train(tiny_config(dataset, epochs=1, samples_per_epoch=8, init=str(best),
                                   preprocessing={"grid_size": [48, 48], "grid_spacing_mm": 1.5}), tmp_path / "other")
    assert f"(to fine-tune it on the grid it learnt on, give --grid-size {SIZE} {SIZE} --grid-spacing none)" in caplog.text


def test_fine_tuning_refuses_another_architecture(trained, dataset, tmp_path):
    _, best = trained
    wider = tiny_config(dataset, epochs=1, init=str(best))
    wider["architecture"] = dict(wider["architecture"], base_channels=8)
    with pytest.raises(DeepWMLError, match="architecture"):
        training.train(wider, tmp_path / "wider")
    with pytest.raises(DeepWMLError, match="--init: model file .*missing.pt does not exist"):
        training.train(tiny_config(dataset, epochs=1, init=str(tmp_path / "missing.pt")), tmp_path / "missing")
    # a run folder was 'no such model file', though it is there: what to give instead
    with pytest.raises(DeepWMLError, match=r"--init: .* is a folder, not a model file \(a training run folder: give its best\.pt"):
        training.train(tiny_config(dataset, epochs=1, init=str(best.parent)), tmp_path / "folder")


def test_another_mask_column_trains_a_brain_mask_model(dataset, tmp_path):
    """--mask-column picks the target (here the whole head, as a brain-mask network learns the
    intracranial space); --label-name says in the model file what label 1 is."""
    folder = dataset.parent
    lines = dataset.read_text(encoding="utf-8").splitlines()
    rows = [lines[0] + ",head"]
    for line in lines[1:]:
        case = line.split(",")[0]
        flair = sitk.ReadImage(str(folder / f"{case}_flair.nii.gz"))
        head = sitk.Cast(flair > 50, sitk.sitkUInt8)
        sitk.WriteImage(head, str(tmp_path / f"{case}_head.nii.gz"))
        rows.append(f"{line.replace(case + '_', str(folder) + '/' + case + '_')},{tmp_path}/{case}_head.nii.gz")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("\n".join(rows) + "\n")
    run = tmp_path / "run"
    best = training.train(tiny_config(manifest, epochs=1, samples_per_epoch=8, mask_column="head",
                                      label_name="intracranial"), run)
    labels = np.load(run / "cache" / "train_labels.npy", mmap_mode="r")
    assert labels.mean() > 0.3  # the head, not the few lesion pixels
    loaded = checkpoint.load_model(best)
    assert loaded.labels == {"0": "background", "1": "intracranial"}
    assert loaded.provenance["training_config"]["mask_column"] == "head"
    with pytest.raises(DeepWMLError, match=r"lacks column\(s\) brain; its header must be: case, flair, brain"):
        training.train(tiny_config(manifest, epochs=1, mask_column="brain"), tmp_path / "missing")


def _with_unlabelled_blobs(dataset: Path, folder: Path, value: int) -> Path:
    """The dataset's cases plus one more bright blob per inner slice, marked `value` in the mask
    (as an unlabelled lesion a generator could not vouch for would be)."""
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    blob = (yy - SIZE // 2) ** 2 + (xx - int(SIZE * 0.36)) ** 2 < 9
    lines = dataset.read_text(encoding="utf-8").splitlines()
    rows = [lines[0]]
    for line in lines[1:]:
        case = line.split(",")[0]
        image = sitk.ReadImage(str(dataset.parent / f"{case}_flair.nii.gz"))
        mask = sitk.ReadImage(str(dataset.parent / f"{case}_mask.nii.gz"))
        a, m = sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(mask)
        a[1:-1][:, blob] = 200
        m[1:-1][:, blob & (m[1:-1] == 0).all(axis=0)] = value
        for array, src, name in ((a, image, "flair"), (m, mask, "mask")):
            out = sitk.GetImageFromArray(array)
            out.CopyInformation(src)
            sitk.WriteImage(out, str(folder / f"{case}_{name}.nii.gz"))
        rows.append(line)
    manifest = folder / "manifest.csv"
    manifest.write_text("\n".join(rows) + "\n")
    return manifest


def test_ignore_label_marks_pixels_left_out_of_loss_and_validation(dataset, tmp_path):
    """--ignore-label N: mask voxels N are neither lesion nor background for training; without the
    option they are lesion, as any positive label is."""
    manifest = _with_unlabelled_blobs(dataset, tmp_path / "data", 3)
    image = sitk.ReadImage(str(tmp_path / "data" / "c0_flair.nii.gz"), sitk.sitkFloat32)
    mask = sitk.ReadImage(str(tmp_path / "data" / "c0_mask.nii.gz"))
    config = PreprocessingConfig(grid_size=(SIZE, SIZE), grid_spacing_mm=None)
    _, plain, _ = training.prepare_volume(image, mask, config)
    _, left_out, _ = training.prepare_volume(image, mask, config, ignore_label=3)
    assert set(np.unique(plain)) == {0, 1} and set(np.unique(left_out)) == {0, 1, training.IGNORED}
    assert ((left_out == 1) == ((plain == 1) & (left_out != training.IGNORED))).all()
    assert (left_out == training.IGNORED).sum() > 50

    # the loss does not see ignored pixels: changing the logits there changes nothing
    target = torch.zeros(1, 1, 8, 8)
    target[..., 2:4, 2:4] = 1
    kept = torch.ones(1, 1, 8, 8)
    kept[..., 5:, 5:] = 0
    logits = torch.randn(1, 1, 8, 8, requires_grad=True)
    loss = training.loss_terms(logits, target, 1.0, kept)
    loss.backward()
    assert float(logits.grad[..., 5:, 5:].abs().max()) == 0.0 and float(logits.grad.abs().max()) > 0
    changed = logits.detach().clone()
    changed[..., 5:, 5:] += 50
    assert torch.isclose(training.loss_terms(changed, target, 1.0, kept), loss.detach())
    assert not torch.isclose(training.loss_terms(changed, target, 1.0), training.loss_terms(logits.detach(), target, 1.0))

    # validation: a network that marks everything is charged for background, not for ignored pixels
    labels = np.zeros((2, 16, 16), np.uint8)
    labels[:, 2:6, 2:6] = 1
    labels[:, 8:, 8:] = training.IGNORED
    val = training.SliceSet(np.zeros((2, 16, 16), np.float16), labels, np.zeros(2, np.int32),
                            (labels == 1).reshape(2, -1).sum(1), ["v"], 0)

    class Everywhere(torch.nn.Module):
        def forward(self, x):
            return torch.full_like(x, 10.0)

    cfg = training.TrainConfig.coerce(tiny_config(manifest, ignore_label=3))
    metrics = training.validate(Everywhere(), val, cfg, torch.device("cpu"))
    tp, fp = 2 * 16, 2 * (256 - 16 - 64)
    assert metrics["val_dice"] == pytest.approx(2 * tp / (2 * tp + fp))
    assert metrics["val_precision"] == pytest.approx(tp / (tp + fp))

    # a run with the option trains, caches the ignored pixels and records the setting
    run = tmp_path / "run"
    best = training.train(tiny_config(manifest, epochs=1, samples_per_epoch=8, ignore_label=3), run)
    cached = np.load(run / "cache" / "train_labels.npy", mmap_mode="r")
    assert (cached == training.IGNORED).any() and (cached == 1).any()
    assert checkpoint.load_model(best).provenance["training_config"]["ignore_label"] == 3
    for bad in (0, 1, 256, True, 2.5):
        with pytest.raises(DeepWMLError, match="ignore label"):
            training.TrainConfig.coerce(tiny_config(manifest, ignore_label=bad))


def test_an_ignore_label_no_mask_holds_is_pointed_out(dataset, tmp_path, caplog):
    """Raters' uncertain voxels marked 9, and --ignore-label 2 given (as README's synth example has it): nothing is
    left out and the 9s train as lesion. That was silent (the several-values warning is held back once
    --ignore-label is given); it is said, with the values the masks hold."""
    manifest = _with_unlabelled_blobs(dataset, tmp_path / "data", 9)
    with caplog.at_level("WARNING", logger="DeepWMLLib"):
        training.train(tiny_config(manifest, epochs=1, samples_per_epoch=8, ignore_label=2), tmp_path / "wrong")
    assert ("--ignore-label 2: no mask of the 5 case(s) prepared holds value 2, so no voxel is left out of the loss "
            "and validation, and every value they hold (1, 9) trains as lesion") in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="DeepWMLLib"):
        training.train(tiny_config(manifest, epochs=1, samples_per_epoch=8, ignore_label=9), tmp_path / "right")
    assert "--ignore-label" not in caplog.text and "several lesion values" not in caplog.text


def test_cpu_bf16_training_lowers_the_loss_and_its_model_runs_in_fp32(dataset, tmp_path, monkeypatch):
    """--cpu-bf16 (bf16 autocast, channels-last) where the CPU computes bf16 natively; a clear error elsewhere."""
    if not training.cpu_has_native_bf16():
        with pytest.raises(DeepWMLError, match="natively"):
            training.train(tiny_config(dataset, cpu_bf16=True), tmp_path / "run")
        return
    run = tmp_path / "run"
    best = training.train(tiny_config(dataset, epochs=4, cpu_bf16=True), run)
    history = read_history(run)
    assert float(history[-1]["train_loss"]) < float(history[0]["train_loss"])
    assert json.loads((run / "config.json").read_text(encoding="utf-8"))["cpu_bf16"] is True
    loaded = checkpoint.load_model(best)  # an ordinary fp32 model file
    assert all(t.dtype == torch.float32 for t in loaded.model.state_dict().values() if t.is_floating_point())
    assert max(float(r["val_dice"]) for r in history) > 0.5
    monkeypatch.setattr(training, "cpu_has_native_bf16", lambda: False)
    with pytest.raises(DeepWMLError, match="natively"):
        training.train(tiny_config(dataset, cpu_bf16=True), tmp_path / "other")


def test_a_widened_model_fine_tunes_as_a_wider_network(trained, dataset, tmp_path):
    """`deepwml train --widen` then `--init`: training starts from the narrow model's function at
    twice the width (the first epoch's validation is close to the narrow model's, not a random start's)."""
    run, best = trained
    wide = training.widen_model(best, tmp_path / "wide.pt", noise=0.01, seed=0)
    narrow_config = tiny_config(dataset)
    config = tiny_config(dataset, epochs=1, init=str(wide), learning_rate=1e-4,
                         architecture=dict(narrow_config["architecture"], base_channels=8))
    finetuned = checkpoint.load_model(training.train(config, tmp_path / "run"))
    assert finetuned.config["base_channels"] == 8
    history = read_history(tmp_path / "run")
    narrow_best = max(float(r["val_dice"]) for r in read_history(run))
    assert float(history[0]["val_dice"]) > narrow_best - 0.1
    with pytest.raises(DeepWMLError, match="another architecture|architecture"):
        training.train(tiny_config(dataset, epochs=1, init=str(wide)), tmp_path / "refused")


def _split_file(path: Path, assignment: dict) -> Path:
    path.write_text("case,split\n" + "".join(f"{case},{split}\n" for case, split in assignment.items()))
    return path


def test_test_split_cases_are_checked_too(tmp_path):
    """The test cases are the ones a user evaluates on: a bad one is refused like any other."""
    folder = tmp_path / "data"
    manifest = make_dataset(folder, n_cases=4)
    mask = sitk.ReadImage(str(folder / "c3_mask.nii.gz"))
    mask.SetSpacing((1.0, 1.0, 5.0))
    sitk.WriteImage(mask, str(folder / "c3_mask.nii.gz"))
    split = _split_file(tmp_path / "split.csv", {"c0": "train", "c1": "train", "c2": "val", "c3": "test"})
    with pytest.raises(DeepWMLError, match="case c3.*different voxel grids"):
        training.train(tiny_config(manifest, split=str(split), epochs=1), tmp_path / "run")
    run = tmp_path / "skip"
    training.train(tiny_config(manifest, split=str(split), epochs=1, samples_per_epoch=8, skip_bad_cases=True), run)
    assert "c3" in (run / "skipped_cases.csv").read_text(encoding="utf-8-sig")
    data = checkpoint.load_model(run / "best.pt").provenance["data"]
    assert data["cases"] == {"train": 2, "val": 1, "test": 0} and data["skipped_cases"] == ["c3"]


def test_lesion_on_slices_inference_skips_counts_in_network_pixels():
    """Validation counts everything in network pixels; lesion on a slice without head must too."""
    array = np.zeros((3, SIZE, SIZE), np.float32)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    array[:2][:, ((yy - SIZE / 2) / 25.0) ** 2 + ((xx - SIZE / 2) / 22.0) ** 2 < 1] = 100
    labels = np.zeros(array.shape, np.uint8)
    labels[2, 20:40, 20:40] = 1  # 400 voxels on the slice without head
    image, mask = sitk.GetImageFromArray(array), sitk.GetImageFromArray(labels)
    for volume in (image, mask):
        volume.SetSpacing((0.45, 0.45, 5.0))
    config = PreprocessingConfig(grid_size=(32, 32), grid_spacing_mm=1.8)  # 4 x 4 input pixels per network pixel
    images, network_labels, missed = training.prepare_volume(image, mask, config)
    assert images.shape[0] == 2 and not network_labels.any()
    assert missed == 25


def test_split_and_manifest_mistakes_are_named_before_any_data_is_read(dataset, tmp_path):
    twice = _split_file(tmp_path / "twice.csv", {f"c{i}": "train" for i in range(6)})
    twice.write_text(twice.read_text(encoding="utf-8") + "c4,val\n")
    with pytest.raises(DeepWMLError, match="'c4' is listed twice"):
        training.train(tiny_config(dataset, split=str(twice)), tmp_path / "r0")
    short = _split_file(tmp_path / "short.csv", {"c0": "val", "c1": "train", "c2": "train"})
    with pytest.raises(DeepWMLError, match=r"does not assign 3 manifest case\(s\) \(c3, c4, c5\); give each a row "
                                           r"\(train, val or test\), or take them out of the manifest$"):
        training.train(tiny_config(dataset, split=str(short)), tmp_path / "short")
    no_val = _split_file(tmp_path / "noval.csv", {f"c{i}": "train" for i in range(5)} | {"c5": "test"})
    with pytest.raises(DeepWMLError, match="5 case.s. in train and 0 in val"):
        training.train(tiny_config(dataset, split=str(no_val)), tmp_path / "r1")
    assert not (tmp_path / "r1" / "cache").exists()
    same_scan = tmp_path / "same.csv"
    same_scan.write_text(dataset.read_text(encoding="utf-8").replace(",c", f",{dataset.parent}/c")
                         + f"c9,{dataset.parent}/c2_flair.nii.gz,{dataset.parent}/c2_mask.nii.gz,A,svd\n")
    with pytest.raises(DeepWMLError, match="'c9' has the FLAIR of case 'c2'"):
        training.read_manifest(same_scan)
    header_only = tmp_path / "header.csv"
    header_only.write_text("case,flair,mask\n")
    with pytest.raises(DeepWMLError, match="header but no case rows"):
        training.read_manifest(header_only)
    # Excel's 'CSV UTF-8' in a German or French locale: ';' between columns, the byte-order mark, CRLF
    semicolons = tmp_path / "semi.csv"
    lines = [line.split(",") for line in dataset.read_text(encoding="utf-8-sig").splitlines()]
    lines[1:] = [[case, f"{dataset.parent}/{flair}", f"{dataset.parent}/{mask}", *rest]
                 for case, flair, mask, *rest in lines[1:]]
    semicolons.write_bytes(("\ufeff" + "".join(";".join(line) + "\r\n" for line in lines)).encode("utf-8"))
    assert training.read_manifest(semicolons) == training.read_manifest(dataset)
    with pytest.raises(DeepWMLError, match="is a folder"):
        training.read_manifest(tmp_path)


def test_a_run_that_failed_on_its_data_can_be_rerun_with_the_manifest_fixed(tmp_path):
    folder = tmp_path / "data"
    manifest = make_dataset(folder, n_cases=5)
    good = manifest.read_text(encoding="utf-8")
    manifest.write_text(good + "c9,c1_mask.nii.gz,c1_flair.nii.gz,B,svd\n")  # columns swapped: refused
    run = tmp_path / "run"
    with pytest.raises(DeepWMLError, match="case c9"):
        training.train(tiny_config(manifest, epochs=1, samples_per_epoch=8), run)
    assert (run / "split.csv").is_file() and not (run / "last.pt").exists()
    manifest.write_text(good)
    training.train(tiny_config(manifest, epochs=1, samples_per_epoch=8, learning_rate=0.02), run)  # other settings too
    assert (run / "last.pt").is_file() and "c9" not in (run / "split.csv").read_text(encoding="utf-8-sig")
    with pytest.raises(DeepWMLError, match="other settings"):  # once an epoch is done, the run is kept as it is
        training.train(tiny_config(manifest, epochs=1, samples_per_epoch=8), run)


def test_masks_without_lesion_or_with_several_values_are_pointed_out(tmp_path, caplog):
    folder = tmp_path / "data"
    manifest = make_dataset(folder, n_cases=5)
    for i in range(5):
        path = folder / f"c{i}_mask.nii.gz"
        mask = sitk.ReadImage(str(path))
        sitk.WriteImage(mask * 0, str(path))
    with pytest.raises(DeepWMLError, match="nothing to learn"):
        training.train(tiny_config(manifest, epochs=1), tmp_path / "empty")
    several = make_dataset(tmp_path / "several", n_cases=5)
    path = several.parent / "c0_mask.nii.gz"
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    array[array == 1] = 2
    array[0, :4, :4] = 1
    relabelled = sitk.GetImageFromArray(array)
    relabelled.CopyInformation(sitk.ReadImage(str(path)))
    sitk.WriteImage(relabelled, str(path))
    with caplog.at_level("WARNING", logger="DeepWMLLib"):
        training.train(tiny_config(several, epochs=1, samples_per_epoch=8), tmp_path / "several_run")
    assert "several lesion values (c0 (1, 2))" in caplog.text and "--ignore-label" in caplog.text


def test_a_run_folder_in_use_is_refused(dataset, tmp_path):
    pytest.importorskip("fcntl")
    run = tmp_path / "run"
    run.mkdir()
    training._lock_run_dir(run)  # as a training running in it holds it
    try:
        with pytest.raises(DeepWMLError, match="another deepwml train is running"):
            training.train(tiny_config(dataset, epochs=1, samples_per_epoch=8), run)
    finally:
        training._unlock_run_dir(run)
    training.train(tiny_config(dataset, epochs=1, samples_per_epoch=8), run)  # released: it runs


def test_training_options_out_of_range_are_usage_errors(dataset, tmp_path, capsys):
    from DeepWMLLib.cli import main

    base = ["train", str(dataset), "--run-dir", str(tmp_path / "r")]
    for option in (["--epochs", "0"], ["--lr", "-1"], ["--threshold", "1.5"], ["--dice-weight", "-1"],
                   ["--early-stopping", "0"], ["--threads", "0"], ["--samples-per-epoch", "0"], ["--scale", "1.2,0.8"],
                   ["--ignore-label", "1"]):
        with pytest.raises(SystemExit) as usage:
            main(base + option)
        assert usage.value.code == 2, option
        assert option[0] in capsys.readouterr().err
    assert main(["train", str(dataset)]) == 2  # no --run-dir
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "config.json").write_text(json.dumps(tiny_config(dataset)))
    capsys.readouterr()
    assert main(["train", "--resume", str(tmp_path / "r"), "--lr", "0.5"]) == 2
    assert "--lr given" in capsys.readouterr().err
    for option in (["--rotate", "0"], ["--noise", "0.0"], ["--scale", "off"], ["--dice-weight", "0"]):
        assert main(["train", "--resume", str(tmp_path / "r"), *option]) == 2, option  # 0 and off are values too
        assert f"{option[0]} given" in capsys.readouterr().err
    assert main(["train", "--export", "a.pt", "b.pt", "c.pt"]) == 2
    with pytest.raises(DeepWMLError, match="wrong type"):
        training.TrainConfig.coerce(tiny_config(dataset, learning_rate="1e-3"))
    with pytest.raises(DeepWMLError, match="JSON object"):
        training.TrainConfig.coerce([1])


def test_the_prepared_cache_follows_the_split_it_was_made_for(tmp_path):
    """A run set up again with another split (or seed) into the same folder must not train on the old
    split's cases: the cache is made anew when any case changes split."""
    folder = tmp_path / "data"
    manifest = make_dataset(folder, n_cases=4)
    cases = training.read_manifest(manifest)
    preprocessing = {"grid_size": [SIZE, SIZE], "grid_spacing_mm": None}
    cache = tmp_path / "cache"
    first = {"c0": "train", "c1": "train", "c2": "val", "c3": "test"}
    second = {"c0": "test", "c1": "val", "c2": "train", "c3": "train"}
    for assignment in (first, second, first):
        training.prepare_cache(cases, assignment, preprocessing, cache, skip_bad_cases=False)
        for split in ("train", "val"):
            listed = json.loads((cache / f"{split}.json").read_text(encoding="utf-8"))["cases"]
            assert sorted(listed) == sorted(c for c, s in assignment.items() if s == split), (assignment, split)


def test_odd_split_config_and_manifest_files_get_one_line_errors(tmp_path, capsys):
    """A split row with an extra field is read (the field left out); a split file that is not UTF-8, a
    --config that is not a JSON object, batch norm on one-pixel bottoms with a batch of 1, a run folder
    given as a model file: each a clear error, no traceback. A manifest's line numbers count blank lines."""
    from DeepWMLLib.cli import main

    folder = tmp_path / "data"
    manifest = make_dataset(folder, n_cases=4)
    cases = training.read_manifest(manifest)
    extra = tmp_path / "extra.csv"
    extra.write_text("case,split\nc0,train,x\nc1,train\nc2,val\nc3,test\n")
    assert training.read_split(extra, cases) == {"c0": "train", "c1": "train", "c2": "val", "c3": "test"}
    binary = tmp_path / "binary.csv"
    binary.write_bytes(b"\xff\xfecase,split\n")
    with pytest.raises(DeepWMLError, match="not a readable CSV"):
        training.read_split(binary, cases)
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    assert main(["train", str(manifest), "--run-dir", str(tmp_path / "r"), "--config", str(listed)]) == 1
    err = capsys.readouterr().err
    assert "must hold an object of settings" in err and "Traceback" not in err and "internal error" not in err
    with pytest.raises(DeepWMLError, match="a batch of 1 slice needs more than one pixel"):
        training.TrainConfig.coerce(tiny_config(manifest, batch_size=1, patch_size=4))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "best.pt").write_bytes(b"")
    assert main(["train", "--export", str(tmp_path / "run"), str(tmp_path / "out.pt")]) == 1
    assert "is a folder, not a model file (a training run folder: give its best.pt" in capsys.readouterr().err
    lines = manifest.read_text(encoding="utf-8").splitlines()
    gapped = tmp_path / "gapped.csv"
    gapped.write_text("\n".join([lines[0], "", ",,", *lines[1:], lines[1]]) + "\n", encoding="utf-8")
    with pytest.raises(DeepWMLError, match=f"line {len(lines) + 3}: case 'c0' appears twice"):
        training.read_manifest(gapped)


def test_a_resumed_run_refuses_training_data_changed_since_it_started(tmp_path, capsys):
    """--resume continues on the data the run started with: a case whose file changed since (same manifest,
    same names) is refused, naming it, rather than prepared again and trained on unsaid. The same content
    written again (a copy: a new modification time) resumes."""
    from DeepWMLLib.cli import main

    manifest = make_dataset(tmp_path / "data", n_cases=4)
    run = tmp_path / "run"
    training.train(tiny_config(manifest, epochs=1, samples_per_epoch=8), run)
    with open(run / "split.csv", newline="", encoding="utf-8-sig") as f:
        name = next(row["case"] for row in csv.DictReader(f) if row["split"] == "train")
    mask_file = tmp_path / "data" / f"{name}_mask.nii.gz"
    original = mask_file.read_bytes()
    write_volume(np.zeros((8, SIZE, SIZE), np.uint8), mask_file)  # the labels redrawn (here: emptied)
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--epochs", "2"]) == 1
    err = capsys.readouterr().err
    assert f"the training data changed since {run} started (changed: {name})" in err and "new run folder" in err
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 1
    mask_file.write_bytes(original)
    assert main(["train", "--resume", str(run), "--epochs", "2"]) == 0
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 2


def test_changed_data_is_seen_beyond_the_first_mib_and_older_runs_still_resume(tmp_path):
    """Two uncompressed scans on one template grid (SPM's wFLAIR.nii) share their size and first MiB, the empty
    slices below the head: a scan replaced by another such one is 'changed data' for a resume. A data.json an
    earlier version wrote (first MiB alone) still matches the unchanged files."""
    empty = bytes(3 << 20)
    flair = tmp_path / "wFLAIR.nii"
    flair.write_bytes(empty[: 2 << 20] + b"\x01" * (1 << 20))
    mask = tmp_path / "mask.nii"
    mask.write_bytes(b"\x00" * 1000)
    cases = [training.Case("c0", str(flair), str(mask))]
    started = training._data_fingerprints(cases, {"c0": "train"})
    older = {case: [value.split("~")[0] for value in values] for case, values in started.items()}
    training._check_same_data(older, started, tmp_path)  # an earlier version's data.json, nothing changed
    training._check_same_data(started, started, tmp_path)
    flair.write_bytes(empty[: 2 << 20] + b"\x02" * (1 << 20))  # another patient, same grid
    now = training._data_fingerprints(cases, {"c0": "train"})
    with pytest.raises(DeepWMLError, match=r"the training data changed .*\(changed: c0\)"):
        training._check_same_data(started, now, tmp_path)


def test_manifest_paths_written_from_the_current_folder_are_explained(tmp_path, monkeypatch):
    """Paths typed relative to where the command runs (data/c0_flair.nii.gz, the manifest in lists/) are
    read from the manifest's folder and missing there: the error says so, and that they exist from here."""
    make_dataset(tmp_path / "data", n_cases=4)
    (tmp_path / "lists").mkdir()
    manifest = tmp_path / "lists" / "cohort.csv"
    manifest.write_text("case,flair,mask\n" + "".join(f"c{i},data/c{i}_flair.nii.gz,data/c{i}_mask.nii.gz\n"
                                                      for i in range(4)))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DeepWMLError, match=r"8 file\(s\).*read from the manifest's folder .*lists, not from the current "
                                           r"folder, where 8 of them exist \(e.g. data/c0_flair.nii.gz\)"):
        training.train(tiny_config(manifest), tmp_path / "run")
    assert not (tmp_path / "run").exists()
    monkeypatch.chdir(tmp_path / "lists")  # from the manifest's folder nothing is found either: no such hint
    with pytest.raises(DeepWMLError, match="do not exist") as error:
        training.train(tiny_config(manifest), tmp_path / "run")
    assert "current folder" not in str(error.value)


def test_a_copy_of_one_scan_under_two_case_names_is_refused(tmp_path):
    """The same FLAIR copied to a second file (a patient exported twice) would put one scan in training and in
    validation or test at once, as the same path twice would: refused, naming both cases, before any run."""
    manifest = make_dataset(tmp_path / "data", n_cases=6)
    folder = manifest.parent
    for part in ("flair", "mask"):
        (folder / f"c9_{part}.nii.gz").write_bytes((folder / f"c2_{part}.nii.gz").read_bytes())
    manifest.write_text(manifest.read_text(encoding="utf-8") + "c9,c9_flair.nii.gz,c9_mask.nii.gz,A,svd\n")
    with pytest.raises(DeepWMLError, match="case 'c9' has a copy of the FLAIR of case 'c2'"):
        training.train(tiny_config(manifest), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_run_folder_that_cannot_be_written_in_gets_a_one_line_error(dataset, tmp_path, capsys):
    """A run folder that exists but cannot be written in (read-only, another user's) was an 'internal error'.
    Its lock file is made a folder here, which cannot be opened for writing even by root, as a read-only
    folder's cannot by a user."""
    from DeepWMLLib.cli import main

    run = tmp_path / "run"
    (run / ".lock").mkdir(parents=True)
    assert main(["train", str(dataset), "--run-dir", str(run), "--epochs", "1"]) == 1
    err = capsys.readouterr().err
    assert f"error: cannot write in the run folder {run}" in err and "internal error" not in err


def test_cases_added_to_or_taken_from_the_manifest_of_a_started_run_are_named(tmp_path):
    """Rerunning the command after adding newly labelled cases to the manifest (or taking some out) said
    'split file RUN_DIR/split.csv does not assign 1 manifest case(s)', of a split file the user never gave."""
    manifest = make_dataset(tmp_path / "data", n_cases=6)
    rows = manifest.read_text(encoding="utf-8").splitlines()
    manifest.write_text("\n".join(rows[:6]) + "\n")  # c0..c4
    run = tmp_path / "run"
    training.train(tiny_config(manifest, epochs=1, samples_per_epoch=8), run)
    manifest.write_text("\n".join(rows) + "\n")
    with pytest.raises(DeepWMLError, match=r"lists other cases than the run in .*run started with \(1 added: c5\); "
                                           r"a started run keeps its cases.*new run folder"):
        training.train(tiny_config(manifest, epochs=2, samples_per_epoch=8), run)
    split = dict(row.split(",")[::3] for row in (run / "split.csv").read_text(encoding="utf-8-sig").splitlines()[1:])
    manifest.write_text("\n".join(rows[:5]) + "\n")
    with pytest.raises(DeepWMLError, match=rf"\(1 no longer listed: c4 \({split['c4']}\)\)"):
        training.train(tiny_config(manifest, epochs=2, samples_per_epoch=8), run)
    manifest.write_text("\n".join(rows[:6]) + "\n")  # put back: it resumes
    training.train(tiny_config(manifest, epochs=2, samples_per_epoch=8), run)
    assert len(read_history(run)) == 2


def _on_a_small_disk(folder: Path, size_kib: int, command: list[str]) -> subprocess.CompletedProcess | None:
    """Run `command` with a tmpfs of `size_kib` KiB mounted on `folder` in a mount namespace of its own (unshare;
    an unprivileged user may where user namespaces are on); None where that cannot be done."""
    import shutil

    if not sys.platform.startswith("linux") or shutil.which("unshare") is None:
        return None
    folder.mkdir()
    script = f"mount -t tmpfs -o size={size_kib}k tmpfs {shlex.quote(str(folder))} || exit 99; {shlex.join(command)}"
    result = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    return None if result.returncode == 99 or "unshare:" in result.stderr else result


def test_a_disk_that_fills_while_the_cache_is_gathered_gets_a_one_line_error(dataset, tmp_path):
    """The prepared slices of a split were gathered into a memmap: a disk that filled up on the way killed
    training with SIGBUS ('Bus error', no word of the disk). On a disk that holds the cases' prepared slices
    but not also the whole training split, it is now the one-line 'No space left' error, exit 1."""
    reference = tmp_path / "reference"
    training.train(tiny_config(dataset, epochs=1, samples_per_epoch=8), reference)
    gathered = {p.name: p.stat().st_size for p in (reference / "cache").glob("*.npy")}
    size_kib = (sum(gathered.values()) + gathered["train_images.npy"] // 2) // 1024
    small = tmp_path / "small"
    command = [sys.executable, "-m", "DeepWMLLib.train", str(dataset), "--run-dir", str(small / "run"),
               "--base-channels", "4", "--depth", "2", "--batch-norm", "--grid-size", str(SIZE), "--grid-spacing", "none",
               "--epochs", "1", "--batch-size", "4", "--samples-per-epoch", "8", "--threads", "1"]
    result = _on_a_small_disk(small, size_kib, command)
    if result is None:
        pytest.skip("no small file system can be mounted here (needs Linux and unshare)")
    assert result.returncode == 1, result.stderr
    assert f"cannot write {small / 'run' / 'cache' / 'train_images.npy'} (No space left on device)" in result.stderr


def test_a_slicer_segmentation_of_several_segments_as_mask_is_pointed_out(tmp_path, caplog):
    """A rater's .seg.nrrd with a 'Lesion' and a 'Brain' segment is read as their union: the whole brain
    trained as lesion, --ignore-label or not, without a word. Now a warning names the case and its segments;
    a segmentation whose lesion segment is named WMH (read alone) gets none, nor one of two WMH segments in two
    letter cases (both read as lesion)."""
    from DeepWMLLib import io

    manifest = make_dataset(tmp_path / "data", n_cases=5)
    folder = manifest.parent
    for case, names in (("c0", ("Lesion", "Brain")), ("c1", ("WMH", "Brain")), ("c2", ("WMH", "wmh"))):
        mask = sitk.ReadImage(str(folder / f"{case}_mask.nii.gz"))
        flair = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / f"{case}_flair.nii.gz")))
        labels = np.where(sitk.GetArrayFromImage(mask) > 0, 1, np.where(flair > 50, 2, 0)).astype(np.uint8)
        labelled = sitk.GetImageFromArray(labels)
        labelled.CopyInformation(mask)
        io.write_label_segmentation(labelled, folder / f"{case}.seg.nrrd", [(1, names[0], (1, 0, 0)), (2, names[1], (0, 1, 0))])
        manifest.write_text(manifest.read_text(encoding="utf-8").replace(f"{case}_mask.nii.gz", f"{case}.seg.nrrd"))
    split = _split_file(tmp_path / "split.csv", {"c0": "train", "c1": "train", "c2": "train", "c3": "val", "c4": "test"})
    with caplog.at_level("WARNING", logger="DeepWMLLib"):
        training.train(tiny_config(manifest, split=str(split), epochs=1, samples_per_epoch=8), tmp_path / "run")
    assert ("1 case(s) are segmentations (Slicer .seg.nrrd, DICOM SEG) of several segments, none named WMH "
            "(c0 (Lesion, Brain))") in caplog.text


def test_one_mask_with_lesion_listed_for_two_cases_is_pointed_out(tmp_path, caplog):
    """On scans of one grid (here all are, as scans registered to a template are) a case given another case's
    mask by a copy-paste slip trained on it unsaid; a warning names both. An empty mask that healthy controls
    share is fine and gets none."""
    manifest = make_dataset(tmp_path / "data", n_cases=6)
    folder = manifest.parent
    empty = sitk.ReadImage(str(folder / "c0_mask.nii.gz")) * 0
    sitk.WriteImage(empty, str(folder / "empty.nii.gz"))
    text = manifest.read_text(encoding="utf-8").replace("c3_mask.nii.gz", "c2_mask.nii.gz")
    manifest.write_text(text.replace("c4_mask.nii.gz", "empty.nii.gz").replace("c5_mask.nii.gz", "empty.nii.gz"))
    with caplog.at_level("WARNING", logger="DeepWMLLib"):
        training.train(tiny_config(manifest, epochs=1, samples_per_epoch=8), tmp_path / "run")
    assert "1 mask file(s) with lesion are listed for several cases (c2_mask.nii.gz: c2, c3)" in caplog.text
    assert "empty.nii.gz" not in caplog.text


def test_a_center_column_stratifies_the_split_as_centre_does(dataset, tmp_path):
    """A manifest written with the American 'center' column was split as if no centre were given, unsaid."""
    american = tmp_path / "center.csv"
    header, *rows = dataset.read_text(encoding="utf-8").splitlines()
    american.write_text("\n".join([header.replace("centre", "center")] + [row.replace(",c", f",{dataset.parent}/c")
                                                                          for row in rows]) + "\n")
    cases = training.read_manifest(american)
    assert [c.centre for c in cases] == [c.centre for c in training.read_manifest(dataset)] == list("ABABAB")


def test_the_learning_rate_is_halved_on_the_epochs_early_stopping_calls_no_better(dataset, tmp_path, monkeypatch):
    """An epoch a little better than the best (less than PyTorch's default 1e-4, relative) wrote best.pt and reset
    early stopping's count, but counted as no better for --plateau-patience, which halved the learning rate."""
    dice = iter([0.5, 0.50001, 0.50002, 0.50002])
    monkeypatch.setattr(training, "validate", lambda *args, **kwargs: {
        "val_loss": 1.0, "val_dice": next(dice), "val_sensitivity": 0.5, "val_precision": 0.5})
    run = tmp_path / "run"
    training.train(tiny_config(dataset, epochs=4, samples_per_epoch=8, plateau_patience=0), run)
    assert [float(r["lr"]) for r in read_history(run)] == [0.01, 0.01, 0.01, 0.01]
    state = _last_state(run)
    assert state["best_epoch"] == 3 and state["epochs_since_best"] == 1
    assert state["optimizer"]["param_groups"][0]["lr"] == 0.005  # epoch 4 was no better: halved for epoch 5


def test_weights_gone_nan_stop_the_run_and_last_pt_keeps_the_epoch_before(dataset, tmp_path, monkeypatch):
    """A loss that ran away (NaN) left NaN weights that last.pt kept and every later epoch, and every resume, went on
    from, in silence."""
    run = tmp_path / "run"
    config = tiny_config(dataset, epochs=1, samples_per_epoch=8)
    training.train(config, run)
    loss_terms = training.loss_terms
    monkeypatch.setattr(training, "loss_terms", lambda *args, **kwargs: loss_terms(*args, **kwargs) * float("nan"))
    with pytest.raises(DeepWMLError, match=r"weights became NaN or infinite in epoch 2 \(train loss nan\).*last.pt keeps "
                                           r"epoch 1.*lower --lr"):
        training.train(dict(config, epochs=3), run)
    state = _last_state(run)
    assert state["epoch"] == 1 and all(bool(torch.isfinite(t).all()) for t in state["model"].values()
                                       if t.is_floating_point())
    assert [int(r["epoch"]) for r in read_history(run)] == [1]


def test_more_epochs_for_a_run_that_stopped_early_say_why_nothing_trains(dataset, tmp_path, caplog):
    """Resuming an early-stopped run with a larger --epochs trained nothing and said only 'already finished'."""
    run = tmp_path / "run"
    config = tiny_config(dataset, epochs=4, samples_per_epoch=8, learning_rate=1e-12, early_stopping_patience=1)
    training.train(config, run)
    assert len(read_history(run)) == 2  # the weights hardly move: no better val Dice after epoch 1
    with caplog.at_level("INFO", logger="DeepWMLLib"):
        training.train(dict(config, epochs=8), run)
    assert "stopped early after epoch 2 (no better val Dice in 1 epochs), so more --epochs do not train it on" in caplog.text
    assert len(read_history(run)) == 2


def test_a_run_started_on_the_cpu_resumes_with_loss_scaling_as_on_a_gpu(dataset, tmp_path, monkeypatch):
    """--device may change on resume, but a run started on the CPU (its fp16 loss scaler off, its saved state
    empty) resumed with --device cuda stopped on RuntimeError 'The source state dict is empty'. A GPU's enabled
    scaler is stood in for by the CPU's."""
    run = tmp_path / "run"
    config = tiny_config(dataset, epochs=1, samples_per_epoch=8)
    training.train(config, run)
    monkeypatch.setattr(training, "grad_scaler", lambda enabled: torch.amp.GradScaler("cpu", enabled=True))
    training.train(dict(config, epochs=2), run)
    assert [int(r["epoch"]) for r in read_history(run)] == [1, 2]
    assert _last_state(run)["scaler"]["scale"] > 0  # the enabled scaler's state, kept for the next resume


def test_a_run_resumed_in_another_number_of_processes_says_it_does_not_go_on_as_it_started(dataset, tmp_path,
                                                                                        monkeypatch, caplog):
    """--batch-size is per process: a run resumed under torchrun with another --nproc_per_node (or without torchrun)
    trains on with steps of another size and the epochs' slices dealt out otherwise, and nothing said so. Two
    processes are stood in for by a process group of one that the run takes for two."""
    import torch.distributed as dist

    run = tmp_path / "run"
    config = tiny_config(dataset, epochs=1, samples_per_epoch=8)
    training.train(config, run)
    dist.init_process_group("gloo", init_method=(tmp_path / "rendezvous").as_uri(), rank=0, world_size=1)
    start_distributed = training._start_distributed
    monkeypatch.setattr(training, "_start_distributed", lambda device: training._Dist(0, 2, 0, owns_group=True))
    with caplog.at_level("WARNING", logger="DeepWMLLib"):
        training.train(dict(config, epochs=2), run)
    assert not dist.is_initialized()
    assert "this run trained in 1 process(es) and resumes in 2: with --batch-size 4 per process a step now takes 8 " \
           "slices instead of 4" in caplog.text
    assert _last_state(run)["world_size"] == 2
    caplog.clear()
    monkeypatch.setattr(training, "_start_distributed", start_distributed)
    with caplog.at_level("WARNING", logger="DeepWMLLib"):
        training.train(dict(config, epochs=3), run)  # back in one process: said again
    assert "trained in 2 process(es) and resumes in 1" in caplog.text


def test_a_run_resumed_on_other_cpu_threads_says_it_is_not_bit_for_bit(dataset, tmp_path, caplog):
    """A resume is bit for bit on the thread count the run trained on; one on another (--threads, or another
    machine's default) went on in silence."""
    run = tmp_path / "run"
    config = tiny_config(dataset, epochs=1, samples_per_epoch=8)
    training.train(config, run)
    assert _last_state(run)["threads"] == 1
    with caplog.at_level("INFO", logger="DeepWMLLib"):
        training.train(dict(config, epochs=2), run)  # the same threads: nothing to say
    assert "CPU thread" not in caplog.text
    with caplog.at_level("INFO", logger="DeepWMLLib"):
        training.train(dict(config, epochs=3, threads=2), run)
    assert "trained on 1 CPU thread(s) and resumes on 2: its weights may differ in the last bits" in caplog.text
    assert _last_state(run)["threads"] == 2


def test_a_cohort_too_small_for_a_test_case_is_told_so(tmp_path, caplog):
    """Three cases split 60/20/20 give two for training, one for validation and none for test: said, as the run's
    provenance would otherwise be the only place to find that nothing was kept to evaluate the model on."""
    manifest = make_dataset(tmp_path / "data", n_cases=3)
    with caplog.at_level("WARNING", logger="DeepWMLLib"):
        training.train(tiny_config(manifest, epochs=1, samples_per_epoch=8), tmp_path / "run")
    assert "the 60/20/20 split of 3 case(s) keeps no case for test" in caplog.text
    assert sorted(row.split(",")[-1] for row in (tmp_path / "run" / "split.csv").read_text(encoding="utf-8-sig").split()[1:]) \
        == ["train", "train", "val"]
    caplog.clear()  # fractions given: said as given, not as the default 60/20/20
    with caplog.at_level("WARNING", logger="DeepWMLLib"):
        training.train(tiny_config(manifest, epochs=1, samples_per_epoch=8, val_fraction=0.15, test_fraction=0.15),
                       tmp_path / "custom")
    assert "the 70/15/15 split of 3 case(s) keeps no case for test (too few cases for a test fraction of 0.15)" \
        in caplog.text


def test_flairs_given_as_dicom_folders_are_known_by_their_series(tmp_path):
    """A FLAIR given as a DICOM folder had no fingerprint (None in data.json): its series replaced by another
    trained on unsaid after a resume, and one series copied into two cases' folders was not seen. The series'
    UIDs now stand for it: both are refused, naming the case; a data.json of an earlier version still resumes."""
    import shutil

    from conftest import write_dicom_series

    manifest = make_dataset(tmp_path / "data", n_cases=5)
    folder = manifest.parent
    flair = sitk.Cast(sitk.ReadImage(str(folder / "c0_flair.nii.gz")), sitk.sitkInt16)
    write_dicom_series(folder / "c0_dicom", flair, uid="1.2.3.10", description="AX FLAIR")
    manifest.write_text(manifest.read_text(encoding="utf-8").replace("c0_flair.nii.gz", "c0_dicom"))
    split = _split_file(tmp_path / "split.csv", {"c0": "train", "c1": "train", "c2": "train", "c3": "val", "c4": "test"})
    run = tmp_path / "run"
    config = tiny_config(manifest, split=str(split), epochs=1, samples_per_epoch=8)
    training.train(config, run)
    data = json.loads((run / "data.json").read_text(encoding="utf-8"))
    assert data["c0"][0].startswith("dicom:")
    earlier = dict(data, c0=[None, data["c0"][1]])  # as a version without DICOM fingerprints wrote it
    (run / "data.json").write_text(json.dumps(earlier), encoding="utf-8")
    training.train(dict(config, epochs=2), run)
    for path in (folder / "c0_dicom").iterdir():
        path.unlink()
    write_dicom_series(folder / "c0_dicom", flair, uid="1.2.3.11", description="AX FLAIR")  # another series
    with pytest.raises(DeepWMLError, match=r"the training data changed .*\(changed: c0\)"):
        training.train(dict(config, epochs=3), run)

    shutil.copytree(folder / "c0_dicom", folder / "c1_dicom")  # one patient's series exported twice
    manifest.write_text(manifest.read_text(encoding="utf-8").replace("c1_flair.nii.gz", "c1_dicom"))
    with pytest.raises(DeepWMLError, match="case 'c1' has a copy of the FLAIR of case 'c0'"):
        training.train(config, tmp_path / "another")


@pytest.mark.skipif(os.sep != "/", reason="backslashes separate folders on Windows anyway")
def test_a_manifest_written_on_windows_is_read_on_linux_or_told(tmp_path):
    """A manifest made on Windows and carried to a Linux server: its relative paths with backslashes
    (..\\data\\c0_flair.nii.gz) named no file; they are read with slashes now. A drive path (D:\\cohort\\...)
    cannot be reached there: the error says it is a Windows path."""
    make_dataset(tmp_path / "data", n_cases=4)
    (tmp_path / "lists").mkdir()
    manifest = tmp_path / "lists" / "cohort.csv"
    manifest.write_text("case,flair,mask\n" + "".join(f"c{i},..\\data\\c{i}_flair.nii.gz,..\\data\\c{i}_mask.nii.gz\n"
                                                      for i in range(4)))
    cases = training.read_manifest(manifest)
    assert [c.mask for c in cases] == [str((tmp_path / "data" / f"c{i}_mask.nii.gz").resolve()) for i in range(4)]
    manifest.write_text("case,flair,mask\n" + "".join(f"c{i},D:\\cohort\\c{i}_flair.nii.gz,D:\\cohort\\c{i}_mask.nii.gz\n"
                                                      for i in range(4)))
    with pytest.raises(DeepWMLError, match=r"D:\\cohort\\c0_flair.nii.gz is a Windows path"):
        training.train(tiny_config(manifest), tmp_path / "run")
    # a network share as Windows names it (UNC): the hint said nothing, only 'X does not exist'
    manifest.write_text("case,flair,mask\n" + "".join(f"c{i},\\\\nas01\\mri\\c{i}_flair.nii.gz,"
                                                      f"\\\\nas01\\mri\\c{i}_mask.nii.gz\n" for i in range(4)))
    with pytest.raises(DeepWMLError) as error:
        training.train(tiny_config(manifest), tmp_path / "run")
    assert "\\\\nas01\\mri\\c0_flair.nii.gz is a Windows network path (a manifest made on Windows?): write the " \
           "paths as this computer reaches the files (where the share is mounted here)" in str(error.value)


def test_a_folder_with_files_of_a_run_but_no_training_is_not_written_over(dataset, tmp_path):
    """A cohort folder given as the run folder (--run-dir .) had its own split.csv replaced by the run's, unsaid."""
    folder = tmp_path / "cohort"
    folder.mkdir()
    own = "case,split\nc0,test\n"
    (folder / "split.csv").write_text(own)
    with pytest.raises(DeepWMLError, match="cohort holds split.csv but no DeepWML training, and a run would write over it"):
        training.train(tiny_config(dataset, epochs=1, samples_per_epoch=8), folder)
    assert (folder / "split.csv").read_text() == own and not (folder / "config.json").exists()


def test_a_started_run_whose_config_was_deleted_is_named_so(dataset, tmp_path, capsys):
    """A run folder that trained an epoch, its config.json deleted since (last.pt, history.csv and split.csv there),
    was refused as holding 'no DeepWML training', as a cohort folder is, and --resume said it 'holds no training':
    it says the folder holds a started run whose config.json is missing, and what to do. Nothing is written over."""
    from DeepWMLLib.cli import main

    run = tmp_path / "run"
    training.train(tiny_config(dataset, epochs=1, samples_per_epoch=8), run)
    (run / "config.json").unlink()
    before = (run / "last.pt").read_bytes()
    with pytest.raises(DeepWMLError) as error:
        training.train(tiny_config(dataset, epochs=2, samples_per_epoch=8), run)
    said = str(error.value)
    assert "no DeepWML training" not in said
    named = re.search(r"holds a started training \((.*)\) whose config\.json is missing", said)
    assert named and {"last.pt", "history.csv", "split.csv"} <= set(named.group(1).split(", "))
    assert "restore" in said and "new run folder" in said
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 1
    err = capsys.readouterr().err
    assert "whose config.json is missing" in err and "holds no training" not in err
    assert (run / "last.pt").read_bytes() == before and not (run / "config.json").exists()


def test_a_started_ensemble_whose_config_was_deleted_is_pointed_to_a_member_s_weights(tmp_path):
    """An ensemble's run folder keeps its weights in model_k/ (no best.pt at its top): with its config.json deleted,
    the refusal's 'train in a new run folder (--init RUN/best.pt ...)' named a file that does not exist."""
    run = tmp_path / "run"
    for member in ("model_0", "model_1"):
        (run / member).mkdir(parents=True)
        (run / member / "last.pt").write_bytes(b"state")
        (run / member / "best.pt").write_bytes(b"weights")
    (run / "split.csv").write_text("case,split\nc0,train\n")
    with pytest.raises(DeepWMLError) as error:
        training._check_run_folder(run)
    said = str(error.value)
    assert "model_0/last.pt, model_1/last.pt" in said and "whose config.json is missing" in said
    assert f"--init {run / 'model_0' / 'best.pt'}" in said and f"--init {run / 'best.pt'}" not in said


def test_a_started_ensemble_whose_config_was_deleted_is_told_how_a_member_s_last_pt_differs_from_it(dataset, tmp_path):
    """An ensemble's config.json deleted: the refusal said 'last.pt keeps them in its config entry', but each member's
    model_k/last.pt keeps its own settings ('ensemble' 1, the run's seed + k), from which a restored config.json was
    refused as 'other settings' (or, as a single model, trained another run). It names the member's file and what to
    change there; done so, the restored settings are the run's."""
    run = tmp_path / "run"
    training.train(tiny_config(dataset, ensemble=2, epochs=1, samples_per_epoch=8, seed=5), run)
    original = json.loads((run / "config.json").read_text(encoding="utf-8"))
    (run / "config.json").unlink()
    for k in (0, 1):
        with pytest.raises(DeepWMLError) as error:
            training._check_run_folder(run)
        said = str(error.value)
        assert f"'config' entry of model_{k}/last.pt" in said and "set 'ensemble' (1 there) to the run's number of " \
               "models (at least 2)" in said and ("'seed' to the one there less 1" in said) == (k == 1)
        stored = training.load_state(run / f"model_{k}" / "last.pt")["config"]
        assert training._config_differences(original, stored) == ["ensemble"] + ["seed"] * k  # what it says to change
        restored = dict(stored, ensemble=2, seed=stored["seed"] - k)
        assert training._config_differences(original, restored) == []
        (run / "model_0" / "last.pt").unlink(missing_ok=True)  # then model_1's is the one named


def _refuse_reading(monkeypatch, path: Path) -> None:
    """Opening `path` (as DeepWMLLib.io opens scans) raises PermissionError, as for a user without read access
    (root reads any file)."""
    from DeepWMLLib import io

    locked = str(path.resolve())

    def refused(opener):
        def fake(name, *args, **kwargs):
            if os.fspath(name) == locked:
                raise PermissionError(13, "Permission denied", os.fspath(name))
            return opener(name, *args, **kwargs)
        return fake

    monkeypatch.setattr(io, "open", refused(open), raising=False)
    monkeypatch.setattr(io.gzip, "open", refused(io.gzip.open))


def test_a_scan_without_read_access_is_named_or_skipped_not_an_internal_error(tmp_path, monkeypatch):
    """A FLAIR the user may not read (another group's file on a share) was read for the copy check before any case:
    PermissionError, 'internal error ... report it', even with
    --skip-bad-cases, where a test case's was skipped before. It is now named, as when the case is read, or
    skipped. Access is refused by the open calls here, as root reads any file."""
    manifest = make_dataset(tmp_path / "data", n_cases=4)
    _refuse_reading(monkeypatch, tmp_path / "data" / "c3_flair.nii.gz")
    split = _split_file(tmp_path / "split.csv", {"c0": "train", "c1": "train", "c2": "val", "c3": "test"})
    with pytest.raises(DeepWMLError, match=r"case c3: .*c3_flair.nii.gz cannot be read \(permission denied\)"):
        training.train(tiny_config(manifest, split=str(split), epochs=1), tmp_path / "run")
    run = tmp_path / "skip"
    training.train(tiny_config(manifest, split=str(split), epochs=1, samples_per_epoch=8, skip_bad_cases=True), run)
    assert "permission denied" in (run / "skipped_cases.csv").read_text(encoding="utf-8-sig")


def test_a_split_file_kept_in_the_run_folder_may_be_given_as_the_split(dataset, tmp_path):
    """--split RUN_DIR/split.csv (the split put into the new run folder first) trained before the check for a
    folder with files of a run's names; it was refused as if the run would write over a file of the user's own.
    A folder refused leaves as it was: no lock file is made in it."""
    run = tmp_path / "run"
    run.mkdir()
    split = _split_file(run / "split.csv", {"c0": "train", "c1": "train", "c2": "train", "c3": "val", "c4": "val",
                                            "c5": "test"})
    training.train(tiny_config(dataset, split=str(split), epochs=1, samples_per_epoch=8), run)
    assert len(read_history(run)) == 1 and "c5,B,svd,test" in split.read_text(encoding="utf-8-sig")
    cohort = tmp_path / "cohort"
    cohort.mkdir()
    _split_file(cohort / "split.csv", {"c0": "test"})
    with pytest.raises(DeepWMLError, match="cohort holds split.csv but no DeepWML training"):
        training.train(tiny_config(dataset, split=str(split), epochs=1, samples_per_epoch=8), cohort)
    assert sorted(p.name for p in cohort.iterdir()) == ["split.csv"]


def test_a_run_started_with_two_copies_of_one_scan_is_not_told_to_list_it_once(tmp_path):
    """A run begun by a version before the copy check, with one scan under two names, is refused on resume; it said
    'list it once', and the manifest with the copy left out was then refused as 'other cases than the run started
    with'. The error now says the run holds both (and where) and cannot go on."""
    manifest = make_dataset(tmp_path / "data", n_cases=5)
    folder = manifest.parent
    for part in ("flair", "mask"):
        (folder / f"c9_{part}.nii.gz").write_bytes((folder / f"c2_{part}.nii.gz").read_bytes())
    manifest.write_text(manifest.read_text(encoding="utf-8") + "c9,c9_flair.nii.gz,c9_mask.nii.gz,A,svd\n")
    split = _split_file(tmp_path / "split.csv", {"c0": "train", "c1": "train", "c2": "val", "c3": "train", "c4": "test",
                                                 "c9": "train"})
    run = tmp_path / "run"
    config = tiny_config(manifest, split=str(split), epochs=1, samples_per_epoch=8)
    with pytest.MonkeyPatch.context() as patch:  # as a version without the check started it
        patch.setattr(training, "_scan_fingerprint", lambda path: None)
        training.train(config, run)
    with pytest.raises(DeepWMLError, match=r"list it once; the run in .*run started with both \(c2 in val, c9 in "
                                           r"train\) and keeps its cases, so it cannot go on: train in a new run folder"):
        training.train(dict(config, epochs=2), run)
    with pytest.raises(DeepWMLError, match=r"case 'c9' has a copy of the FLAIR of case 'c2' .*list it once$"):
        training.train(config, tmp_path / "new")


def _as_slice_list(image: sitk.Image, folder: Path) -> Path:
    """`image` as a MetaImage whose voxels lie in a LIST of 2D slice files (folder/flair.mhd, slice000.raw...):
    the header holds the grid alone, byte for byte the same for any scan on that grid."""
    folder.mkdir()
    array = sitk.GetArrayFromImage(sitk.Cast(image, sitk.sitkInt16))
    for k, plane in enumerate(array):
        plane.astype("<i2").tofile(folder / f"slice{k:03d}.raw")
    header = ["ObjectType = Image", "NDims = 3", "DimSize = " + " ".join(map(str, image.GetSize())),
              "ElementType = MET_SHORT", "ElementSpacing = " + " ".join(f"{v:g}" for v in image.GetSpacing()),
              "Offset = " + " ".join(f"{v:g}" for v in image.GetOrigin()),
              "TransformMatrix = " + " ".join(f"{v:g}" for v in image.GetDirection()), "ElementByteOrderMSB = False",
              "ElementDataFile = LIST 2D"] + [f"slice{k:03d}.raw" for k in range(len(array))]
    (folder / "flair.mhd").write_text("\n".join(header) + "\n")
    return folder / "flair.mhd"


def test_two_scans_whose_headers_alone_agree_are_not_taken_for_copies(tmp_path):
    """Two patients' scans on one grid stored as MetaImage headers with their voxels in a LIST of slice files have
    byte-identical headers, which are all their fingerprints read: training refused them as 'a copy of the FLAIR
    of' each other, though every voxel differs. Scans whose fingerprints agree are now compared whole; a real
    copy is still refused."""
    import shutil

    manifest = make_dataset(tmp_path / "data", n_cases=4)
    folder = manifest.parent
    for case in ("c0", "c1"):
        _as_slice_list(sitk.ReadImage(str(folder / f"{case}_flair.nii.gz")), folder / f"{case}_slices")
        manifest.write_text(manifest.read_text(encoding="utf-8").replace(f"{case}_flair.nii.gz", f"{case}_slices/flair.mhd"))
    assert (folder / "c0_slices" / "flair.mhd").read_bytes() == (folder / "c1_slices" / "flair.mhd").read_bytes()
    training._check_distinct_scans(training.read_manifest(manifest), tmp_path / "run")
    shutil.rmtree(folder / "c1_slices")
    shutil.copytree(folder / "c0_slices", folder / "c1_slices")
    with pytest.raises(DeepWMLError, match="case 'c1' has a copy of the FLAIR of case 'c0'"):
        training._check_distinct_scans(training.read_manifest(manifest), tmp_path / "run")


def test_a_shared_mask_marking_only_voxels_to_leave_out_is_not_taken_for_lesion(tmp_path, caplog):
    """Healthy controls that share one mask marking only voxels to leave out (--ignore-label 2: an artefact region
    of the template, no lesion) were warned of as 'mask file(s) with lesion are listed for several cases'. Without
    --ignore-label those voxels train as lesion, so it is said then; a shared mask with lesion is said either way."""
    manifest = make_dataset(tmp_path / "data", n_cases=6)
    folder = manifest.parent
    lesion = sitk.ReadImage(str(folder / "c0_mask.nii.gz"))
    left_out = sitk.Cast(lesion * 0 + 2, sitk.sitkUInt8)
    sitk.WriteImage(left_out, str(folder / "left_out.nii.gz"))
    text = manifest.read_text(encoding="utf-8").replace("c4_mask.nii.gz", "left_out.nii.gz")
    manifest.write_text(text.replace("c5_mask.nii.gz", "left_out.nii.gz").replace("c3_mask.nii.gz", "c2_mask.nii.gz"))
    split = _split_file(tmp_path / "split.csv", {"c0": "train", "c1": "val", "c2": "train", "c3": "train", "c4": "train",
                                                 "c5": "test"})
    with caplog.at_level("WARNING", logger="DeepWMLLib"):
        training.train(tiny_config(manifest, split=str(split), epochs=1, samples_per_epoch=8, ignore_label=2),
                       tmp_path / "run")
    assert "1 mask file(s) with lesion are listed for several cases (c2_mask.nii.gz: c2, c3)" in caplog.text
    assert "left_out" not in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="DeepWMLLib"):
        training._warn_shared_masks(training.read_manifest(manifest))
    assert "2 mask file(s) with lesion" in caplog.text and "left_out.nii.gz: c4, c5" in caplog.text


def test_a_scan_that_became_unreadable_is_not_said_to_have_changed(tmp_path, monkeypatch):
    """A train case's FLAIR whose read access was taken away after the run started: a resume said 'the training data
    changed (changed: c0)' and to put the files back, of a file nobody changed (before, 'internal error:
    PermissionError'). It now says the file cannot be read, so whether it changed cannot be told."""
    manifest = make_dataset(tmp_path / "data", n_cases=4)
    split = _split_file(tmp_path / "split.csv", {"c0": "train", "c1": "train", "c2": "val", "c3": "test"})
    run = tmp_path / "run"
    config = tiny_config(manifest, split=str(split), epochs=1, samples_per_epoch=8)
    training.train(config, run)
    _refuse_reading(monkeypatch, tmp_path / "data" / "c0_flair.nii.gz")
    with pytest.raises(DeepWMLError, match=r"case c0: .*c0_flair.nii.gz cannot be read \(no read access\?\), so whether "
                                           r"it changed since .*run started cannot be told"):
        training.train(dict(config, epochs=2), run)


# Tissue levels (relative to white matter 1) of the phantom heads below: cortex, ventricles, lesion.
CONTRASTS = {"FLAIR": (1.25, 0.3, 1.8), "T1-weighted": (0.7, 0.3, 0.8), "T2- or PD-weighted": (1.2, 3.0, 1.8)}


def make_contrast_cohort(folder: Path, odd: str | None = "T1-weighted", n_cases: int = 5) -> Path:
    """Ellipsoidal 'brains' large enough for the FLAIR check (5 mm slices, 2 mm pixels): FLAIR contrast, but the
    last case (c4) with the contrast `odd` (a T1- or T2-weighted series exported as the FLAIR); lesions in the
    white matter. The check sees the brain as conftest.oracle_network's brain-mask network outlines it."""
    folder.mkdir(parents=True, exist_ok=True)
    shape, spacing = (32, 110, 90), (5.0, 2.0, 2.0)
    z, y, x = np.ogrid[:shape[0], :shape[1], :shape[2]]
    centre = [(n - 1) / 2 for n in shape]
    offsets = [(z - centre[0]) * spacing[0], (y - centre[1]) * spacing[1], (x - centre[2]) * spacing[2]]
    r = np.sqrt(sum((o / radius) ** 2 for o, radius in zip(offsets, (70.0, 85.0, 70.0))))
    inside, cortex = r < 1, (r < 1) & (r >= 0.89)
    ventricles = sum((o / radius) ** 2 for o, radius in zip(offsets, (25.0, 35.0, 12.0))) < 1
    rng = np.random.default_rng(0)
    rows = ["case,flair,mask"]
    for i in range(n_cases):
        levels = CONTRASTS[odd if i == n_cases - 1 and odd else "FLAIR"]
        lesion = np.zeros(shape, bool)
        for _ in range(6):
            k, j, m = rng.integers([10, 25, 20], [22, 85, 70])
            lesion |= (((z - k) * spacing[0]) ** 2 + ((y - j) * spacing[1]) ** 2 + ((x - m) * spacing[2]) ** 2) < 36
        lesion &= inside & ~cortex & ~ventricles
        image = np.where(inside, 1.0, 0.0)
        image[cortex], image[ventricles], image[lesion] = levels
        image = (300 * image + rng.normal(0, 9, shape) * inside).astype(np.float32)
        write_volume(image, folder / f"c{i}_flair.nii.gz", spacing=spacing[::-1])
        write_volume(lesion.astype(np.uint8), folder / f"c{i}_mask.nii.gz", spacing=spacing[::-1])
        rows.append(f"c{i},c{i}_flair.nii.gz,c{i}_mask.nii.gz")
    (folder / "manifest.csv").write_text("\n".join(rows) + "\n")
    return folder / "manifest.csv"


def _contrast_config(manifest: Path, tmp_path: Path, **overrides) -> dict:
    split = _split_file(tmp_path / "split.csv", {"c0": "train", "c1": "train", "c4": "train", "c2": "val", "c3": "test"})
    return tiny_config(manifest, **{"split": str(split), "epochs": 1, "samples_per_epoch": 8, **overrides})


def _counting_checks(monkeypatch) -> list:
    """Record each case the FLAIR check judges."""
    judged, made = [], training.flair_checker

    def checker(device="auto", threads=None):
        check = made(device, threads)

        def counted(image, mask):
            judged.append(image.GetSize())
            return check(image, mask)
        return counted
    monkeypatch.setattr(training, "flair_checker", checker)
    return judged


@pytest.mark.parametrize("odd,why", [("T1-weighted", "the cortex is darker than the white matter"),
                                     ("T2- or PD-weighted", "the ventricles are not dark")])
def test_a_case_whose_scan_does_not_look_like_a_flair_is_refused_naming_it(odd, why, tmp_path, monkeypatch):
    """A T1- or T2-weighted series exported as a case's FLAIR trained silently with the FLAIRs; `deepwml segment`
    warns about such a scan. Training now refuses before it starts, naming the case, what it looks like and why,
    and the options that go on; every case's figures are in flair_check.csv."""
    from conftest import oracle_network

    oracle_network(monkeypatch)
    manifest = make_contrast_cohort(tmp_path / "data", odd)
    run = tmp_path / "run"
    with pytest.raises(DeepWMLError, match=rf"1 case\(s\) of the manifest do not look like a FLAIR .*flair_check.csv\): "
                                           rf"case c4 looks {re.escape(odd)}: {why} .*--skip-bad-cases.*--allow-non-flair"):
        training.train(_contrast_config(manifest, tmp_path), run)
    assert not (run / "last.pt").exists() and not (run / "cache" / "train_images.npy").exists()
    with open(run / "flair_check.csv", newline="", encoding="utf-8-sig") as f:
        looks = {row["case"]: row["looks_like"] for row in csv.DictReader(f)}
    assert looks == {"c0": "FLAIR", "c1": "FLAIR", "c2": "FLAIR", "c3": "FLAIR", "c4": odd}


def test_a_case_that_does_not_look_like_a_flair_is_said_as_soon_as_it_is_judged(tmp_path, monkeypatch):
    """The refusal came only once every case was prepared (minutes on a large cohort), the bad case unsaid until
    then: it is now said as it is judged, before the next case is read, so that the run can be stopped at once.
    Not said so with --skip-bad-cases or --allow-non-flair, whose own words come after preparation."""
    import logging

    from conftest import oracle_network

    oracle_network(monkeypatch)
    manifest = make_contrast_cohort(tmp_path / "data", "T1-weighted")
    events, read = [], io.read_image

    def reading(path, *args, **kwargs):
        events.append(f"read {Path(path).name}")
        return read(path, *args, **kwargs)

    class Told(logging.Handler):
        def emit(self, record):
            if "does not look like a FLAIR" in record.getMessage():
                events.append(record.getMessage())

    monkeypatch.setattr(io, "read_image", reading)
    told = Told(logging.WARNING)
    logging.getLogger("DeepWMLLib").addHandler(told)
    try:
        with pytest.raises(DeepWMLError, match="case c4 looks T1-weighted"):
            training.train(_contrast_config(manifest, tmp_path), tmp_path / "run")
        at = events.index("read c4_flair.nii.gz")
        assert events[at + 1].startswith("case c4 does not look like a FLAIR, it looks T1-weighted: the cortex is darker")
        assert "once every case is prepared (pass --skip-bad-cases" in events[at + 1]
        assert events[at + 2:] == ["read c3_flair.nii.gz"]  # the test case, judged after it
        for option in ("skip_bad_cases", "allow_non_flair"):
            events.clear()
            training.train(_contrast_config(manifest, tmp_path, **{option: True}), tmp_path / option)
            assert not [e for e in events if e.startswith("case c4 does not look")]
    finally:
        logging.getLogger("DeepWMLLib").removeHandler(told)


def test_the_flair_check_keeps_to_the_threads_training_is_given(tmp_path, monkeypatch):
    """--threads caps training's PyTorch threads, but the FLAIR check ran the brain-mask network with OpenVINO (where
    installed), which takes every core of the machine: with --threads it now runs in PyTorch, on those threads;
    without, as segment does."""
    from conftest import oracle_network

    from DeepWMLLib import inference

    oracle_network(monkeypatch)
    asked, made = [], inference.make_runner

    def recording(loaded, device, backend="auto", precision="auto"):
        asked.append((backend, __import__("torch").get_num_threads()))
        return made(loaded, device, backend, precision)

    monkeypatch.setattr(inference, "make_runner", recording)
    manifest = make_contrast_cohort(tmp_path / "data", None)
    training.train(_contrast_config(manifest, tmp_path, threads=1), tmp_path / "run")
    assert asked and all(a == ("torch", 1) for a in asked)
    asked.clear()
    training.train(_contrast_config(manifest, tmp_path, threads=None), tmp_path / "run2")
    assert asked and all(backend == "auto" for backend, _ in asked)


def test_allow_non_flair_trains_on_it_without_judging_the_cases_again(tmp_path, monkeypatch, caplog):
    """--allow-non-flair, named in the refusal, trains on the case (said at the start of each run); the rerun does
    not judge the cases again (their checks are kept with the run), nor does a resume."""
    from conftest import oracle_network

    oracle_network(monkeypatch)
    judged = _counting_checks(monkeypatch)
    manifest = make_contrast_cohort(tmp_path / "data", "T1-weighted")
    run = tmp_path / "run"
    with pytest.raises(DeepWMLError, match="case c4 looks T1-weighted"):
        training.train(_contrast_config(manifest, tmp_path), run)
    assert len(judged) == 5
    caplog.set_level("WARNING", logger="DeepWMLLib")
    training.train(_contrast_config(manifest, tmp_path, allow_non_flair=True), run)
    assert len(judged) == 5
    assert "training on 1 case(s) that do not look like a FLAIR, as --allow-non-flair asks: c4 (T1-weighted)" in caplog.text
    assert "c4" in json.loads((run / "cache" / "train.json").read_text(encoding="utf-8"))["cases"]
    assert len(read_history(run)) == 1
    caplog.clear()
    training.train(_contrast_config(manifest, tmp_path, allow_non_flair=True, epochs=2), run)
    assert len(judged) == 5 and len(read_history(run)) == 2
    assert "c4 (T1-weighted)" in caplog.text


def test_skip_bad_cases_leaves_a_case_that_does_not_look_like_a_flair_out_and_counts_it(tmp_path, monkeypatch, caplog):
    from conftest import oracle_network

    oracle_network(monkeypatch)
    manifest = make_contrast_cohort(tmp_path / "data", "T1-weighted")
    run = tmp_path / "run"
    caplog.set_level("WARNING", logger="DeepWMLLib")
    training.train(_contrast_config(manifest, tmp_path, skip_bad_cases=True), run)
    assert "skipping case c4: it does not look like a FLAIR, it looks T1-weighted: the cortex is darker" in caplog.text
    assert "1 case(s) skipped (see skipped_cases.csv); training on 2, validating on 1, 1 kept for test" in caplog.text
    with open(run / "skipped_cases.csv", newline="", encoding="utf-8-sig") as f:
        (row,) = csv.DictReader(f)
    assert row["case"] == "c4" and row["reason"].startswith("does not look like a FLAIR, it looks T1-weighted")
    assert json.loads((run / "cache" / "train.json").read_text(encoding="utf-8"))["cases"] == ["c0", "c1"]
    data = checkpoint.load_model(run / "best.pt").provenance["data"]
    assert data["cases"] == {"train": 2, "val": 1, "test": 1} and data["skipped_cases"] == ["c4"]


def test_a_cohort_of_flairs_trains_as_without_the_check(tmp_path, monkeypatch, caplog):
    """Cases that look like FLAIRs are judged so (flair_check.csv), nothing is said about them, and the trained
    weights are bit for bit those of the same run without the check."""
    from conftest import oracle_network

    oracle_network(monkeypatch)
    manifest = make_contrast_cohort(tmp_path / "data", None)
    caplog.set_level("WARNING", logger="DeepWMLLib")
    training.train(_contrast_config(manifest, tmp_path), tmp_path / "checked")
    with open(tmp_path / "checked" / "flair_check.csv", newline="", encoding="utf-8-sig") as f:
        assert [row["looks_like"] for row in csv.DictReader(f)] == ["FLAIR"] * 5
    assert "FLAIR" not in caplog.text
    monkeypatch.setattr(training, "flair_checker", lambda device="auto", threads=None: None)
    training.train(_contrast_config(manifest, tmp_path), tmp_path / "unchecked")
    checked, unchecked = (_last_state(tmp_path / name)["model"] for name in ("checked", "unchecked"))
    assert all(torch.equal(checked[k], unchecked[k]) for k in checked)


def test_a_changed_flair_decision_before_any_epoch_is_followed(tmp_path, monkeypatch, caplog):
    """A run prepared with --allow-non-flair (or --skip-bad-cases) and stopped before its first epoch (Ctrl-C at the
    warning) was set up again with the other option, but its prepared cache kept the first decision: the case the
    user now left out was trained on, 'as --allow-non-flair asks' though it was not asked, and the other way round
    the case the user now allowed stayed out. A run that has not trained an epoch follows the new command (the
    checks are not run again); one that has keeps its cases and says so."""
    from conftest import oracle_network

    oracle_network(monkeypatch)
    judged = _counting_checks(monkeypatch)
    manifest = make_contrast_cohort(tmp_path / "data", "T1-weighted")
    run = tmp_path / "run"
    class Stopped(Exception):
        pass

    monkeypatch.setattr(training, "_train_member", lambda *a, **k: (_ for _ in ()).throw(Stopped()))
    with pytest.raises(Stopped):  # prepared with --allow-non-flair, stopped before any epoch
        training.train(_contrast_config(manifest, tmp_path, allow_non_flair=True), run)
    assert "c4" in json.loads((run / "cache" / "train.json").read_text(encoding="utf-8"))["cases"]
    caplog.set_level("WARNING", logger="DeepWMLLib")
    caplog.clear()
    with pytest.raises(Stopped):
        training.train(_contrast_config(manifest, tmp_path, skip_bad_cases=True), run)
    assert json.loads((run / "cache" / "train.json").read_text(encoding="utf-8"))["cases"] == ["c0", "c1"]
    assert "as --allow-non-flair asks" not in caplog.text and "skipping case c4: it does not look like a FLAIR" in caplog.text
    caplog.clear()
    with pytest.raises(Stopped):
        training.train(_contrast_config(manifest, tmp_path, allow_non_flair=True), run)
    assert "c4" in json.loads((run / "cache" / "train.json").read_text(encoding="utf-8"))["cases"]
    assert "as --allow-non-flair asks: c4 (T1-weighted)" in caplog.text
    assert len(judged) == 5  # judged once


def test_skip_bad_cases_dropped_before_any_epoch_is_followed(dataset, tmp_path, monkeypatch):
    """A run prepared with --skip-bad-cases and stopped before its first epoch, rerun without it, kept the cases
    the first run had left out out (an unreadable case, one that does not look like a FLAIR), where a new run
    would refuse them: it now prepares again and refuses them, naming them; with --skip-bad-cases given again it
    goes on."""
    from conftest import oracle_network

    class Stopped(Exception):
        pass

    stop = lambda *a, **k: (_ for _ in ()).throw(Stopped())  # noqa: E731
    folder = tmp_path / "data"
    manifest = make_dataset(folder, n_cases=6)
    mask = sitk.ReadImage(str(folder / "c1_mask.nii.gz"))
    mask.SetSpacing((1.0, 1.0, 5.0))
    sitk.WriteImage(mask, str(folder / "c1_mask.nii.gz"))
    monkeypatch.setattr(training, "_train_member", stop)
    run = tmp_path / "run"
    with pytest.raises(Stopped):
        training.train(tiny_config(manifest, skip_bad_cases=True), run)
    with pytest.raises(DeepWMLError, match="case c1.*different voxel grids.*--skip-bad-cases"):
        training.train(tiny_config(manifest), run)
    with pytest.raises(Stopped):
        training.train(tiny_config(manifest, skip_bad_cases=True), run)

    oracle_network(monkeypatch)
    manifest = make_contrast_cohort(tmp_path / "contrast", "T1-weighted")
    run = tmp_path / "contrast_run"
    with pytest.raises(Stopped):
        training.train(_contrast_config(manifest, tmp_path, skip_bad_cases=True), run)
    with pytest.raises(DeepWMLError, match="case c4 looks T1-weighted"):
        training.train(_contrast_config(manifest, tmp_path), run)


def test_a_refused_rerun_without_skip_bad_cases_keeps_the_flair_checks(dataset, tmp_path, monkeypatch):
    """A run prepared with --skip-bad-cases (an unreadable case left out), stopped before its first epoch and rerun
    without it, is prepared again and refused at the unreadable case; the FLAIR checks of the cases after it were
    lost with the prepared cache, and the next run judged them again (seconds a case, minutes on a large cohort),
    where README says the cases are prepared again 'not checking them again'. Each case is judged once."""
    from conftest import oracle_network

    class Stopped(Exception):
        pass

    oracle_network(monkeypatch)
    judged = _counting_checks(monkeypatch)
    folder = tmp_path / "data"
    manifest = make_dataset(folder, n_cases=6)
    mask = sitk.ReadImage(str(folder / "c1_mask.nii.gz"))
    mask.SetSpacing((1.0, 1.0, 5.0))
    sitk.WriteImage(mask, str(folder / "c1_mask.nii.gz"))
    monkeypatch.setattr(training, "_train_member", lambda *a, **k: (_ for _ in ()).throw(Stopped()))
    run = tmp_path / "run"
    with pytest.raises(Stopped):
        training.train(tiny_config(manifest, skip_bad_cases=True), run)
    assert len(judged) == 5  # every case but the unreadable c1
    with pytest.raises(DeepWMLError, match="case c1.*different voxel grids"):
        training.train(tiny_config(manifest), run)
    with pytest.raises(Stopped):
        training.train(tiny_config(manifest, skip_bad_cases=True), run)
    assert len(judged) == 5  # none judged again


def test_a_started_run_keeps_its_cases_and_says_why(tmp_path, monkeypatch, caplog):
    """A run that has trained an epoch keeps the cases it was prepared with (a resume trains on the same data): rerun
    without --allow-non-flair it still trains on the case, and is told so truthfully, not 'as --allow-non-flair
    asks'; rerun with it after --skip-bad-cases left the case out, it is told the case stays out."""
    from conftest import oracle_network

    oracle_network(monkeypatch)
    manifest = make_contrast_cohort(tmp_path / "data", "T1-weighted")
    run = tmp_path / "run"
    training.train(_contrast_config(manifest, tmp_path, allow_non_flair=True), run)
    caplog.set_level("WARNING", logger="DeepWMLLib")
    caplog.clear()
    saved, train_member = [], training._train_member
    monkeypatch.setattr(training, "_train_member", lambda cfg, *a: saved.append(cfg) or train_member(cfg, *a))
    training.train(_contrast_config(manifest, tmp_path, epochs=2), run)
    assert len(read_history(run)) == 2
    assert "as --allow-non-flair asks" not in caplog.text
    assert re.search(r"this run trains on 1 case\(s\) that do not look like a FLAIR \(c4 \(T1-weighted\)\): it was "
                     r"prepared with --allow-non-flair.*new run folder", caplog.text)
    # what the run trains on is what it records: config.json and the model's provenance said allow_non_flair false
    assert json.loads((run / "config.json").read_text(encoding="utf-8"))["allow_non_flair"] is True
    assert saved and all(cfg.allow_non_flair for cfg in saved)  # the settings best.pt's provenance records
    other = tmp_path / "other"
    training.train(_contrast_config(manifest, tmp_path, skip_bad_cases=True), other)
    caplog.clear()
    training.train(_contrast_config(manifest, tmp_path, allow_non_flair=True, epochs=2), other)
    assert json.loads((other / "cache" / "train.json").read_text(encoding="utf-8"))["cases"] == ["c0", "c1"]
    assert re.search(r"--allow-non-flair does not add c4 to this run.*new run folder", caplog.text)
    stored = json.loads((other / "config.json").read_text(encoding="utf-8"))
    assert (stored["allow_non_flair"], stored["skip_bad_cases"]) == (False, True)


def test_a_started_run_whose_cache_is_prepared_again_says_what_it_keeps(tmp_path, monkeypatch, caplog):
    """A started run whose cache is prepared again (a file of it deleted) keeps the cases it started with, but said
    nothing of it: rerun with --allow-non-flair after --skip-bad-cases left c4 out, it named c4 'skipping' and never
    that --allow-non-flair does not add it; rerun without --allow-non-flair after training on c4, it said 'as
    --allow-non-flair asks'. It says what it says with its cache kept."""
    from conftest import oracle_network

    oracle_network(monkeypatch)
    manifest = make_contrast_cohort(tmp_path / "data", "T1-weighted")
    caplog.set_level("WARNING", logger="DeepWMLLib")
    left_out = tmp_path / "left_out"
    training.train(_contrast_config(manifest, tmp_path, skip_bad_cases=True), left_out)
    (left_out / "cache" / "train_images.npy").unlink()
    caplog.clear()
    training.train(_contrast_config(manifest, tmp_path, allow_non_flair=True, epochs=2), left_out)
    assert json.loads((left_out / "cache" / "train.json").read_text(encoding="utf-8"))["cases"] == ["c0", "c1"]
    assert re.search(r"--allow-non-flair does not add c4 to this run.*new run folder", caplog.text)
    trained = tmp_path / "trained"
    training.train(_contrast_config(manifest, tmp_path, allow_non_flair=True), trained)
    (trained / "cache" / "val_labels.npy").unlink()
    caplog.clear()
    training.train(_contrast_config(manifest, tmp_path, epochs=2), trained)
    assert "c4" in json.loads((trained / "cache" / "train.json").read_text(encoding="utf-8"))["cases"]
    assert "as --allow-non-flair asks" not in caplog.text
    assert re.search(r"this run trains on 1 case\(s\) that do not look like a FLAIR \(c4 \(T1-weighted\)\): it was "
                     r"prepared with --allow-non-flair.*new run folder", caplog.text)


def test_training_without_the_shipped_models_is_not_refused(tmp_path, monkeypatch, caplog):
    """Where the shipped models are not installed (the library installed without Resources/Models, or
    DEEPWML_MODELS_DIR naming a folder without a registry), deepwml train failed with 'no model registry ...; pass
    --model FILE', an option train does not have; it trains, saying the cases' contrast is not checked."""
    from conftest import oracle_network

    oracle_network(monkeypatch)
    monkeypatch.setenv("DEEPWML_MODELS_DIR", str(tmp_path / "nothing"))
    manifest = make_contrast_cohort(tmp_path / "data", None)
    caplog.set_level("WARNING", logger="DeepWMLLib")
    training.train(_contrast_config(manifest, tmp_path), tmp_path / "run")
    assert len(read_history(tmp_path / "run")) == 1
    assert "whether each scan is a FLAIR is not checked" in caplog.text


def test_a_case_judged_before_an_interruption_is_not_judged_again(tmp_path, monkeypatch):
    """A preparation stopped between a case's check and its slices (killed, a full disk) judged that case again on
    the rerun, though its check was kept."""
    from conftest import oracle_network

    oracle_network(monkeypatch)
    judged = _counting_checks(monkeypatch)
    manifest = make_contrast_cohort(tmp_path / "data", None)
    prepare, calls = training.prepare_volume, []

    def stopping(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return prepare(*args, **kwargs)
    monkeypatch.setattr(training, "prepare_volume", stopping)
    with pytest.raises(OSError):
        training.train(_contrast_config(manifest, tmp_path), tmp_path / "run")
    assert len(judged) == 2
    training.train(_contrast_config(manifest, tmp_path), tmp_path / "run")
    assert len(judged) == 5 and len(read_history(tmp_path / "run")) == 1


def test_a_brain_network_that_fails_does_not_refuse_the_cases(tmp_path, monkeypatch, caplog):
    """The brain-mask network giving NaN (bf16 overflowing on a CPU that computes it natively) refused every case,
    'case c0: brain8-synth-v1 gave NaN probabilities ...: rerun with --precision fp32 (or pass --skip-bad-cases ...)',
    an option train does not have, for a scan that trains well: the case is not judged, and said so."""
    import DeepWMLLib.inference as inference
    from conftest import oracle_network

    oracle_network(monkeypatch)
    predict = inference.predict_network_slices

    def nan_brain(slices, runner, *args, **kwargs):
        out = predict(slices, runner, *args, **kwargs)
        return out * np.nan if runner.loaded.labels.get("1") == "intracranial" else out
    monkeypatch.setattr(inference, "predict_network_slices", nan_brain)
    manifest = make_contrast_cohort(tmp_path / "data", None)
    caplog.set_level("WARNING", logger="DeepWMLLib")
    training.train(_contrast_config(manifest, tmp_path), tmp_path / "run")
    assert len(read_history(tmp_path / "run")) == 1
    assert re.search(r"whether 5 case\(s\) are FLAIRs could not be checked \(c0, .*gave NaN probabilities", caplog.text)


def test_validation_marks_a_probability_at_the_threshold_as_inference_does(tmp_path):
    """Inference marks a voxel whose probability equals the threshold (postprocess: >=); validation did not (>),
    so a network whose output sat exactly on it (fp16/bf16 logits round to such values) was scored on other marks
    than it gives."""
    import torch

    manifest = make_dataset(tmp_path / "data", n_cases=2)
    labels = np.zeros((2, 16, 16), np.uint8)
    labels[:, 2:6, 2:6] = 1
    val = training.SliceSet(np.zeros((2, 16, 16), np.float16), labels, np.zeros(2, np.int32),
                            (labels == 1).reshape(2, -1).sum(1), ["v"], 0)

    class OnTheThreshold(torch.nn.Module):
        def forward(self, x):  # sigmoid(0) = 0.5 exactly: marked where the lesion is, below it elsewhere
            out = torch.full_like(x, -10.0)
            out[..., 2:6, 2:6] = 0.0
            return out

    cfg = training.TrainConfig.coerce(tiny_config(manifest, threshold=0.5))
    metrics = training.validate(OnTheThreshold(), val, cfg, torch.device("cpu"))
    assert metrics["val_dice"] == 1.0 and metrics["val_sensitivity"] == 1.0


@pytest.mark.parametrize("raised", [
    RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:29500"),
    RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:598] Connection reset by peer"),
])
def test_a_process_whose_partner_stopped_says_so_and_how_to_resume(raised, dataset, tmp_path, monkeypatch, capsys):
    """torchrun with 2 processes, one killed (out of memory, a node lost): the other said 'internal error:
    RuntimeError: [gloo pair.cc] Connection closed by peer ... report it', a bug to report, not a run to resume."""
    from DeepWMLLib.cli import main

    monkeypatch.setattr(training, "_start_distributed", lambda device: training._Dist(rank=1, world=2))
    monkeypatch.setattr(training._Dist, "barrier", lambda self: None)

    def partner_gone(self, fn):
        raise raised
    monkeypatch.setattr(training._Dist, "run_on_main", partner_gone)
    with pytest.raises(DeepWMLError, match="another process of this training stopped") as caught:
        training.train(tiny_config(dataset), tmp_path / "run")
    assert "rerun the same command" in str(caught.value)
    for name, value in (("WORLD_SIZE", "2"), ("RANK", "1"), ("LOCAL_RANK", "1")):  # torchrun's second process
        monkeypatch.setenv(name, value)
    assert main(["train", str(dataset), "--run-dir", str(tmp_path / "run2"), "--threads", "1"]) == 1
    err = capsys.readouterr().err
    assert "another process of this training stopped" in err and "internal error" not in err and "(process 1)" in err
    monkeypatch.setattr(training._Dist, "run_on_main", lambda self, fn: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):  # other errors stay what they are
        training.train(tiny_config(dataset), tmp_path / "run3")
