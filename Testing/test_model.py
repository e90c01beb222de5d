"""The U-Net's shapes and size, and the self-describing model file."""

from __future__ import annotations

import pytest
import torch

from DeepWMLLib.checkpoint import FORMAT_VERSION, load_model, load_payload, save_model
from DeepWMLLib.errors import DeepWMLError
from DeepWMLLib.model import PAPER_CONFIG, build_model, count_flops
from DeepWMLLib.preprocessing import PreprocessingConfig


def test_paper_unet_shape_and_size():
    model = build_model(PAPER_CONFIG)
    # The original U-Net with 64..1024 channels and padded 3x3 convolutions has 31.0 M parameters.
    assert sum(p.numel() for p in model.parameters()) == 31_030_593
    with torch.inference_mode():
        out = model(torch.zeros(1, 1, 64, 64))
    assert out.shape == (1, 1, 64, 64)
    assert count_flops(model, (256, 256)) == pytest.approx(96.2e9, rel=0.01)


@pytest.mark.parametrize("base,depth,bn", [(8, 2, False), (4, 3, True)])
def test_config_variants(base, depth, bn):
    model = build_model({"base_channels": base, "depth": depth, "batch_norm": bn})
    assert model.head.in_channels == base
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == bn
    assert model(torch.zeros(2, 1, 32, 32)).shape == (2, 1, 32, 32)


def test_bad_config_refused():
    with pytest.raises(ValueError):
        build_model({"name": "resnet"})
    with pytest.raises(ValueError):
        build_model({"base_channels": 0})


@pytest.mark.parametrize("fp16", [False, True])
def test_model_file_round_trip(tmp_path, fp16):
    torch.manual_seed(1)
    config = {"base_channels": 4, "depth": 2, "batch_norm": True}
    model = build_model(config).eval()
    prep = PreprocessingConfig(grid_size=(128, 96), grid_spacing_mm=1.1)
    path = save_model(tmp_path / "m.pt", model, config, prep, 0.35, {"epochs": 3}, fp16=fp16)
    loaded = load_model(path)
    assert loaded.config["base_channels"] == 4 and loaded.config["batch_norm"] is True
    assert loaded.preprocessing == prep
    assert loaded.threshold == 0.35
    assert loaded.labels["1"] == "WMH"
    assert loaded.provenance["epochs"] == 3 and "created" in loaded.provenance
    x = torch.randn(1, 1, 32, 32)
    with torch.inference_mode():
        assert torch.allclose(loaded.model(x), model(x), atol=2e-2 if fp16 else 1e-6)
    payload = load_payload(path)  # loads with weights_only=True: plain types and tensors only
    assert payload["format_version"] == FORMAT_VERSION


def test_corrupt_and_foreign_model_files(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(DeepWMLError, match="not a readable"):
        load_model(tmp_path / "junk.pt")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    with pytest.raises(DeepWMLError, match="not a DeepWML model"):
        load_model(tmp_path / "foreign.pt")
    with pytest.raises(DeepWMLError, match="does not exist"):
        load_model(tmp_path / "missing.pt")


def test_bare_weights_given_as_a_model_file_say_what_they_lack_and_how_to_make_one(tmp_path, capsys):
    """A PyTorch state_dict (torch.save(model.state_dict(), f), or one under 'state_dict') given as a model got
    "no 'deepwml-model' header", which said nothing of what it lacks nor what to do; deepwml train --export takes
    model files only, so it cannot make one of them. The error says both."""
    from DeepWMLLib import cli

    network = build_model({"base_channels": 4, "depth": 1})
    torch.save(network.state_dict(), tmp_path / "weights.pt")
    torch.save({"epoch": 7, "state_dict": network.state_dict()}, tmp_path / "wrapped.pt")
    for name in ("weights.pt", "wrapped.pt"):
        with pytest.raises(DeepWMLError) as info:
            load_model(tmp_path / name)
        assert str(info.value) == (
            f"{tmp_path / name} is not a DeepWML model file: it holds network weights only (a PyTorch state_dict), "
            "without the settings DeepWML runs them with (architecture, preprocessing, threshold). Give the model file "
            "they came from (a DeepWML training's best.pt, or its `deepwml train --export` copy; --export takes model "
            "files only), or make one in Python: load the weights into DeepWMLLib.model.build_model(architecture) and "
            "write it with DeepWMLLib.checkpoint.save_model(OUT, network, architecture, preprocessing, threshold)")
    assert cli.main(["train", "--export", str(tmp_path / "weights.pt"), str(tmp_path / "out.pt")]) == 1
    assert "holds network weights only (a PyTorch state_dict)" in capsys.readouterr().err
    assert not (tmp_path / "out.pt").exists()
    # the way it names: weights loaded into the network, written with its settings, make a model that loads
    save_model(tmp_path / "made.pt", network, {"base_channels": 4, "depth": 1}, PreprocessingConfig(grid_size=(32, 32)))
    assert load_model(tmp_path / "made.pt").config["base_channels"] == 4


def test_newer_format_version_refused(tmp_path):
    config = {"base_channels": 4, "depth": 1}
    path = save_model(tmp_path / "m.pt", build_model(config), config, PreprocessingConfig())
    payload = torch.load(path, weights_only=True)
    payload["format_version"] = FORMAT_VERSION + 1
    torch.save(payload, path)
    with pytest.raises(DeepWMLError, match="update DeepWML"):
        load_model(path)


def test_truncated_model_file(tmp_path):
    config = {"base_channels": 4, "depth": 1}
    path = save_model(tmp_path / "m.pt", build_model(config), config, PreprocessingConfig())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DeepWMLError):
        load_model(path)


def test_file_digest_is_remembered_but_follows_changes(tmp_path, monkeypatch):
    import hashlib
    import os

    from DeepWMLLib import checkpoint

    monkeypatch.setenv("DEEPWML_CACHE_DIR", str(tmp_path / "cache"))

    path = tmp_path / "weights.pt"
    path.write_bytes(b"first version")
    first = checkpoint.file_digest(path)
    assert first == hashlib.sha256(b"first version").hexdigest()[:24]
    assert checkpoint.file_digest(path) == first  # from the memo
    memo = list((checkpoint.cache_dir() / "digests").iterdir())
    assert len(memo) == 1
    path.write_bytes(b"second version, longer")
    assert checkpoint.file_digest(path) == hashlib.sha256(b"second version, longer").hexdigest()[:24]
    # same size, same mtime as recorded, different content: a rewrite in place keeps the inode, so
    # force the recorded key stale the way an editor would (new mtime) and check it re-hashes
    path.write_bytes(b"second version, LONGER")
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert checkpoint.file_digest(path) == hashlib.sha256(b"second version, LONGER").hexdigest()[:24]
    memo[0].write_text("not json")
    assert checkpoint.file_digest(path) == hashlib.sha256(b"second version, LONGER").hexdigest()[:24]
    # same size, and the modification time set back to the recorded one (a copy that keeps times):
    # the status-change time still tells, so the new content is hashed, not the memo's digest returned
    recorded = path.stat()
    path.write_bytes(b"second version, lonGER")
    os.utime(path, ns=(recorded.st_atime_ns, recorded.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns, path.stat().st_ino) == (
        recorded.st_size, recorded.st_mtime_ns, recorded.st_ino)
    assert checkpoint.file_digest(path) == hashlib.sha256(b"second version, lonGER").hexdigest()[:24]


@pytest.mark.parametrize("depth,bn", [(2, True), (3, False)])
def test_widen_doubles_every_width_and_keeps_the_function(depth, bn):
    from DeepWMLLib.model import widen

    torch.manual_seed(0)
    narrow = build_model({"base_channels": 4, "depth": depth, "batch_norm": bn})
    if bn:  # trained-looking BatchNorm statistics, so that copying them matters
        for m in narrow.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.data.uniform_(0.5, 1.5)
    narrow.eval()
    x = torch.randn(3, 1, 32, 32)
    wide = widen(narrow, noise=0.0, seed=1).eval()
    assert wide.head.in_channels == 8 and [e[0].out_channels for e in wide.encoders] == [8 * 2**k for k in range(depth + 1)]
    assert sum(p.numel() for p in wide.parameters()) > 3 * sum(p.numel() for p in narrow.parameters())
    with torch.no_grad():
        reference = narrow(x)
        assert torch.allclose(wide(x), reference, atol=1e-4)
        noisy = widen(narrow, noise=0.05, seed=1).eval()(x)
    assert not torch.allclose(noisy, reference, atol=1e-4)  # the copies differ, so training can separate them
    assert torch.allclose(noisy, reference, atol=0.5 * float(reference.abs().max()))


def test_widen_on_the_command_line_writes_the_wider_model_file(tmp_path, capsys):
    from DeepWMLLib.cli import main

    torch.manual_seed(0)
    source = save_model(tmp_path / "narrow.pt", build_model({"base_channels": 4, "depth": 2, "batch_norm": True}),
                        {"base_channels": 4, "depth": 2, "batch_norm": True}, PreprocessingConfig(grid_size=(32, 32)))
    assert main(["train", "--widen", str(source), "--out", str(tmp_path / "wide.pt"), "--widen-noise", "0"]) == 0
    wide = load_model(tmp_path / "wide.pt")
    assert wide.config["base_channels"] == 8 and wide.provenance["widened_from"]["file"] == "narrow.pt"
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(wide.model.eval()(x), load_model(source).model.eval()(x), atol=1e-4)
    assert main(["train", "--widen", str(source)]) == 2  # --out is required: a usage error
    assert "--widen needs --out" in capsys.readouterr().err


def test_training_checkpoint_given_as_model_file_says_what_it_is(tmp_path):
    """A run's last.pt (training state) is named as such, with best.pt as the file to give; a run
    folder's hint names best.pt only."""
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"format": "deepwml-training-state", "format_version": 1, "epoch": 3}, run / "last.pt")
    with pytest.raises(DeepWMLError, match=r"last\.pt is a training checkpoint \(for `deepwml train --resume`\), "
                                           r"not a model file: give the run folder's best\.pt") as info:
        load_model(run / "last.pt")
    assert "no 'deepwml-model' header" not in str(info.value)
    with pytest.raises(DeepWMLError, match=r"a training run folder: give its best\.pt\)") as info:
        load_model(run)
    assert "last.pt" not in str(info.value)


def _payload_file(path, in_channels: int = 1, threshold: float = 0.5):
    """A model file as save_model writes one, with another input channel count or stored threshold."""
    from DeepWMLLib.checkpoint import model_payload
    from DeepWMLLib.model import UNet2D

    config = {"base_channels": 4, "depth": 1}
    payload = model_payload(build_model(config), config, PreprocessingConfig(grid_size=(32, 32)), 0.5)
    if in_channels != 1:
        payload["architecture"]["in_channels"] = in_channels
        payload["state_dict"] = UNet2D(in_channels, 4, 1).state_dict()
    payload["threshold"] = threshold
    torch.save(payload, path)
    return path


@pytest.mark.parametrize("channels", [2, 3])
def test_model_file_with_more_than_one_input_channel_refused_at_load(tmp_path, channels):
    """DeepWML feeds one FLAIR channel: a network that reads more is refused when the file is loaded,
    naming the file, not with an internal error on every case."""
    from DeepWMLLib.segment import load_models

    path = _payload_file(tmp_path / f"rgb{channels}.pt", in_channels=channels)
    for load in (load_model, lambda p: load_models([p])):
        with pytest.raises(DeepWMLError, match=rf"rgb{channels}\.pt holds a network DeepWML cannot run .*in_channels must be 1"):
            load(path)
    with pytest.raises(ValueError, match="in_channels must be 1"):
        build_model({"in_channels": channels, "base_channels": 4, "depth": 1})


@pytest.mark.parametrize("threshold", [0.0, 1.0, float("nan")])
def test_model_file_with_a_threshold_outside_0_1_refused_at_load(tmp_path, monkeypatch, threshold):
    """A stored threshold of 0, 1 or NaN is refused at load, naming the file; also when the model's
    settings come from the metadata cache (written for the file by an earlier version)."""
    import json

    from DeepWMLLib import checkpoint
    from DeepWMLLib.segment import load_models

    monkeypatch.setenv("DEEPWML_CACHE_DIR", str(tmp_path / "cache"))
    path = _payload_file(tmp_path / "bad_threshold.pt", threshold=threshold)
    for load in (load_model, lambda p: load_models([p])):
        with pytest.raises(DeepWMLError, match=r"bad_threshold\.pt stores the probability threshold"):
            load(path)
    good = _payload_file(tmp_path / "good.pt")
    cached = checkpoint._metadata_path(checkpoint.file_digest(good))
    load_model(good)
    meta = json.loads(cached.read_text(encoding="utf-8"))
    meta["threshold"] = threshold
    cached.write_text(json.dumps(meta), encoding="utf-8")
    with pytest.raises(DeepWMLError, match=r"good\.pt stores the probability threshold"):
        load_models([good])


def test_the_metadata_cache_keeps_no_case_name_or_path_of_a_model_file(tmp_path, monkeypatch):
    """Loading a model copied its provenance into the per-user cache, which outlives the model file: the
    training data's folders and the names of skipped cases (patient identifiers, maybe) stayed there."""
    from DeepWMLLib import checkpoint

    monkeypatch.setenv("DEEPWML_CACHE_DIR", str(tmp_path / "cache"))
    config = {"base_channels": 4, "depth": 2}
    provenance = {"command": "deepwml train '/data/Doe John/cases.csv' --run-dir /data/runs/a",
                  "training_config": {"manifest": "/data/Doe John/cases.csv", "patch_size": 32},
                  "data": {"skipped_cases": ["MRN123"]}}
    path = save_model(tmp_path / "m.pt", build_model(config), config, PreprocessingConfig(grid_size=(64, 64)),
                      provenance=provenance)
    assert load_model(path).provenance.items() >= provenance.items()  # the file itself keeps it all
    cached = (tmp_path / "cache" / "models").glob("*.json")
    text = "".join(p.read_text(encoding="utf-8") for p in cached)
    assert '"patch_size": 32' in text and "MRN123" not in text and "Doe" not in text and "/data" not in text
    settings = checkpoint.load_model_settings(path)  # read from the cache
    assert settings.config["base_channels"] == 4 and settings.provenance["training_config"]["manifest"] == "cases.csv"


def test_a_metadata_cache_entry_of_an_older_version_is_replaced_without_its_case_names(tmp_path, monkeypatch):
    """Entries written before the cache kept only the shareable provenance would have stayed for good."""
    import json

    from DeepWMLLib import checkpoint

    monkeypatch.setenv("DEEPWML_CACHE_DIR", str(tmp_path / "cache"))
    config = {"base_channels": 4, "depth": 2}
    provenance = {"training_config": {"manifest": "/data/Doe John/cases.csv"}, "data": {"skipped_cases": ["MRN123"]}}
    path = save_model(tmp_path / "m.pt", build_model(config), config, PreprocessingConfig(grid_size=(64, 64)),
                      provenance=provenance)
    entry = checkpoint._metadata_path(checkpoint.file_digest(path))
    entry.parent.mkdir(parents=True)
    entry.write_text(json.dumps({"config": {**config, "name": "unet2d", "in_channels": 1, "batch_norm": False},
                                 "preprocessing": PreprocessingConfig(grid_size=(64, 64)).to_dict(),
                                 "threshold": 0.5, "labels": checkpoint.DEFAULT_LABELS,
                                 "provenance": provenance}), encoding="utf-8")  # as an older DeepWML wrote it
    settings = checkpoint.load_model_settings(path)
    assert settings.config["base_channels"] == 4
    text = entry.read_text(encoding="utf-8")
    assert "MRN123" not in text and "Doe" not in text and json.loads(text)["shareable"] is True


def test_a_model_file_whose_weights_changed_on_the_way_is_refused(tmp_path, monkeypatch):
    """Bytes of a weight changed inside the file (a bad copy, a failing disk): torch.load reads it without a
    word, so the zip records' checksums are checked the first time a file of that content is loaded."""
    import zipfile

    from DeepWMLLib.segment import load_models

    monkeypatch.setenv("DEEPWML_CACHE_DIR", str(tmp_path / "cache"))
    torch.manual_seed(0)
    config = {"base_channels": 8, "depth": 2}
    path = save_model(tmp_path / "m.pt", build_model(config), config, PreprocessingConfig(grid_size=(64, 64)))
    with zipfile.ZipFile(path) as archive:
        record = max(archive.infolist(), key=lambda info: info.file_size)  # a weight tensor, stored uncompressed
    data = bytearray(path.read_bytes())
    middle = record.header_offset + 30 + len(record.filename) + 64 + record.file_size // 2  # inside its bytes
    data[middle:middle + 4] = b"\xff\xff\x7f\x7f"
    damaged = tmp_path / "copied.pt"
    damaged.write_bytes(bytes(data))
    assert torch.load(damaged, weights_only=True)["format"] == "deepwml-model"  # what torch alone says: fine
    with pytest.raises(DeepWMLError, match=r"copied.pt is a damaged DeepWML model file \(its part .* fails its checksum\)"):
        load_models([damaged])
    assert len(load_models([path])) == 1 and load_model(path).model is not None  # the intact file, and again from the cache


def test_a_model_with_nan_weights_is_refused_not_run_to_an_empty_mask(tmp_path):
    """NaN weights make every probability NaN, which no threshold passes: 0 lesions, "ok", before."""
    config = {"base_channels": 4, "depth": 2}
    model = build_model(config)
    path = save_model(tmp_path / "m.pt", model, config, PreprocessingConfig(grid_size=(64, 64)))
    payload = torch.load(path, weights_only=True)
    payload["state_dict"]["head.weight"][0, 0] = float("nan")
    torch.save(payload, tmp_path / "diverged.pt")
    with pytest.raises(DeepWMLError, match=r"diverged.pt holds NaN or infinite weights \(head.weight\)"):
        load_model(tmp_path / "diverged.pt")


def test_the_nan_weights_check_leaves_a_model_load_as_fast_as_before(tmp_path, monkeypatch):
    """The check ran torch.isfinite over every weight on every load: 0.1-0.9 s for v9 on a busy 2-core machine
    (its threads waiting on the cores), load_model 1.2-1.7 s instead of 0.35-0.5 s, in each Slicer run and
    `deepwml segment`. numpy counts the CPU's weights (5 ms); the check still refuses NaN and infinity, of fp32
    weights and of the fp16 ones an --fp16 export holds."""
    from DeepWMLLib import checkpoint

    config = {"base_channels": 4, "depth": 2}
    path = save_model(tmp_path / "m.pt", build_model(config), config, PreprocessingConfig(grid_size=(64, 64)))
    payload = torch.load(path, weights_only=True)
    payload["state_dict"]["head.weight"][0, 0] = float("inf")
    torch.save(payload, tmp_path / "inf.pt")
    monkeypatch.setattr(torch, "isfinite", lambda v: pytest.fail("torch.isfinite over the weights of a load"))
    assert load_model(path).model is not None
    with pytest.raises(DeepWMLError, match=r"inf.pt holds NaN or infinite weights \(head.weight\)"):
        load_model(tmp_path / "inf.pt")
    half = {"a": torch.ones(3, dtype=torch.float16), "b": torch.tensor([1.0, float("nan")], dtype=torch.float16),
            "steps": torch.tensor(3)}
    assert checkpoint._non_finite(half) == ["b"]


def test_fp16_export_of_weights_float16_cannot_hold_is_refused(tmp_path, capsys):
    """A batch-norm variance above 65504 became infinity in an --fp16 export, silently."""
    from DeepWMLLib.cli import main

    config = {"base_channels": 4, "depth": 2, "batch_norm": True}
    model = build_model(config)
    with torch.no_grad():
        model.encoders[0][1].running_var[0] = 1e6
    source = save_model(tmp_path / "best.pt", model, config, PreprocessingConfig(grid_size=(64, 64)))
    assert main(["train", "--export", str(source), str(tmp_path / "small.pt"), "--fp16"]) == 1
    err = capsys.readouterr().err
    assert "encoders.0.1.running_var: up to 1e+06, float16 stops at 65504" in err and "(without --fp16;" in err
    assert not (tmp_path / "small.pt").exists()
    assert main(["train", "--export", str(source), str(tmp_path / "full.pt")]) == 0  # fp32 holds it
    assert load_model(tmp_path / "full.pt").model.encoders[0][1].running_var[0] == 1e6


def test_a_model_file_that_cannot_be_read_is_an_error_not_an_internal_error(tmp_path, monkeypatch, capsys):
    """A model file the user may not read (another account's, a share's permissions): its digest, now taken before
    torch reads it, raised PermissionError as "internal error ... (report it)" in `deepwml train --export` (and in
    `deepwml segment --model`, whose settings are read by digest first, before too)."""
    import builtins
    from pathlib import Path

    from DeepWMLLib.cli import main

    monkeypatch.setenv("DEEPWML_CACHE_DIR", str(tmp_path / "cache"))
    config = {"base_channels": 4, "depth": 2}
    path = save_model(tmp_path / "theirs.pt", build_model(config), config, PreprocessingConfig(grid_size=(64, 64)))
    real_open = builtins.open

    def refusing_open(file, *args, **kwargs):  # as for an account without read permission (these tests run as root)
        if Path(str(file)).name == "theirs.pt":
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", refusing_open)
    scan = tmp_path / "scan.nii.gz"
    for argv in (["train", "--export", str(path), str(tmp_path / "small.pt")],
                 ["segment", str(scan), "-o", str(tmp_path / "out"), "--model", str(path)]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert f"model file {path} cannot be read (Permission denied)" in err and "internal error" not in err, err


def test_a_damaged_model_file_an_earlier_deepwml_loaded_is_checked_too(tmp_path, monkeypatch):
    """The records' checksums were checked only for a file with no metadata cache entry: a damaged copy an earlier
    DeepWML had loaded (its entry written then, unchecked) ran on, wrongly, for good. An entry now says the file
    was checked; one that does not say so gets the file checked once, and is rewritten."""
    import json
    import zipfile

    from DeepWMLLib import checkpoint
    from DeepWMLLib.segment import load_models

    monkeypatch.setenv("DEEPWML_CACHE_DIR", str(tmp_path / "cache"))
    torch.manual_seed(0)
    config = {"base_channels": 8, "depth": 2}
    path = save_model(tmp_path / "m.pt", build_model(config), config, PreprocessingConfig(grid_size=(64, 64)))
    with zipfile.ZipFile(path) as archive:
        record = max(archive.infolist(), key=lambda info: info.file_size)
    data = bytearray(path.read_bytes())
    middle = record.header_offset + 30 + len(record.filename) + 64 + record.file_size // 2
    data[middle:middle + 4] = b"\x00\x00\x80\x3f"  # 1.0: finite, as most changed bytes are
    damaged = tmp_path / "copied.pt"
    damaged.write_bytes(bytes(data))
    earlier = {"config": config, "preprocessing": PreprocessingConfig(grid_size=(64, 64)).to_dict(), "threshold": 0.5,
               "labels": {"0": "background", "1": "WMH"}, "provenance": {}, "shareable": True}  # as it wrote them
    for model in (damaged, path):
        entry = checkpoint._metadata_path(checkpoint.file_digest(model))
        entry.parent.mkdir(parents=True, exist_ok=True)
        entry.write_text(json.dumps(earlier), encoding="utf-8")
    (loaded,) = load_models([damaged])  # its settings from the entry
    with pytest.raises(DeepWMLError, match=r"copied.pt is a damaged DeepWML model file \(its part .* fails its checksum\)"):
        loaded.model
    assert load_model(path).model is not None
    assert json.loads(entry.read_text(encoding="utf-8"))["records_checked"] is True  # not checked again
    monkeypatch.setattr(checkpoint, "_failed_checksum", lambda p: pytest.fail(f"{p} checked again"))
    assert load_model(path).model is not None  # seen and checked: 40 ms a load (v9) not spent again
