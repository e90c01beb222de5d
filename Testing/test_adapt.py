"""`deepwml adapt` (AdaBN): batch-norm statistics re-estimated on unlabelled scans, layer by layer, on
crops drawn as training drew them; weights unchanged."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import make_volume
from DeepWMLLib import cli
from DeepWMLLib.adapt import adapt_batch_norm, adapt_models, adaptation_summary, crop_settings, matched_crops
from DeepWMLLib.checkpoint import load_model, save_model
from DeepWMLLib.errors import DeepWMLError
from DeepWMLLib.model import build_model
from DeepWMLLib.preprocessing import PreprocessingConfig

CONFIG = {"base_channels": 4, "depth": 2, "batch_norm": True}


@pytest.fixture(autouse=True)
def flair_checks_once(monkeypatch):
    """Each scan's FLAIR check (the brain-mask network) run once per worker, not again by every adapt run on the
    same scans (conftest.memoize_flair_checks)."""
    from conftest import memoize_flair_checks

    memoize_flair_checks(monkeypatch)


def _bn_model(seed=0):
    torch.manual_seed(seed)
    model = build_model(CONFIG)
    with torch.no_grad():  # statistics far from what the test slices give, so adapting must move them
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.fill_(5.0)
                m.running_var.fill_(0.01)
    return model.eval()


def _inputs_seen(model, slices):
    """Every batch-norm layer's inputs over all slices, with the model in eval mode."""
    seen = {}
    hooks = [m.register_forward_pre_hook(lambda mod, inp: seen.setdefault(mod, []).append(inp[0].double()))
             for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.inference_mode():
        model(torch.from_numpy(slices[:, None]))
    for h in hooks:
        h.remove()
    return {m: torch.cat(v) for m, v in seen.items()}


def test_statistics_are_the_population_figures_of_every_layer_in_turn():
    rng = np.random.default_rng(0)
    slices = (rng.normal(0.3, 1.2, (10, 32, 32))).astype(np.float32)
    model = _bn_model()
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k}
    layers = adapt_batch_norm(model, slices, batch_size=3)  # batches of 3, 3, 3, 1: not the population
    assert layers == 10  # depth 2: five double convolutions, two batch norms each
    # after adapting, what each layer sees over all slices (earlier layers adapted) has exactly its stored mean
    # and (population) variance
    for layer, x in _inputs_seen(model, slices).items():
        np.testing.assert_allclose(layer.running_mean.numpy(), x.mean(dim=(0, 2, 3)).numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(layer.running_var.numpy(), x.var(dim=(0, 2, 3), unbiased=False).numpy(),
                                   rtol=1e-4, atol=1e-6)
    for k, v in model.state_dict().items():
        if k in weights:
            assert torch.equal(v, weights[k]), f"{k} changed"
    # the output is normalised: the last layer's normalised input has mean ~0 and variance ~1 per channel
    last = list(_inputs_seen(model, slices).items())[-1]
    normed = (last[1] - last[0].running_mean.double()[None, :, None, None]) / torch.sqrt(
        last[0].running_var.double()[None, :, None, None] + last[0].eps)
    assert abs(float(normed.mean())) < 1e-3 and abs(float(normed.var(unbiased=False)) - 1) < 1e-2


def test_a_model_without_batch_norm_is_refused():
    model = build_model({"base_channels": 4, "depth": 2})
    with pytest.raises(DeepWMLError, match="no batch normalisation"):
        adapt_batch_norm(model, np.zeros((2, 32, 32), np.float32))


def _scans(tmp_path, n=2, slices=12):
    paths = []
    for seed in range(n):
        image, _ = make_volume(size=(64, 64, slices), spacing=(0.9, 0.9, 5.0), blobs=((0.4, 0.5, 0.5, 6.0),), seed=seed)
        path = tmp_path / f"scan{seed}.nii.gz"
        sitk.WriteImage(image, str(path))
        paths.append(path)
    return paths


def _model_file(path, seed=0, patch_size=32, lesion_fraction=0.25):
    provenance = {"kind": "test", "training_config": {"patch_size": patch_size, "lesion_fraction": lesion_fraction}}
    save_model(path, _bn_model(seed), CONFIG, PreprocessingConfig(grid_size=(64, 64)), 0.4, provenance)
    return path


def test_crops_follow_the_training_recorded_in_the_model(tmp_path):
    assert crop_settings(load_model(_model_file(tmp_path / "a.pt", patch_size=32, lesion_fraction=0.25))) == (32, 0.25)
    # unknown training: whole slices, half of them with lesion
    save_model(tmp_path / "b.pt", _bn_model(), CONFIG, PreprocessingConfig(grid_size=(64, 64)), 0.5, {"kind": "test"})
    assert crop_settings(load_model(tmp_path / "b.pt")) == (64, 0.5)


def test_model_files_round_trip_and_record_what_they_were_adapted_on(tmp_path):
    sources = [_model_file(tmp_path / "bn1.pt", 0), _model_file(tmp_path / "bn2.pt", 1)]
    scans = _scans(tmp_path)
    outs = [tmp_path / "out1.pt", tmp_path / "out2.pt"]
    summaries = adapt_models(sources, scans, outs, per_slice=2, fp16=False)
    for source, out, summary in zip(sources, outs, summaries):
        adapted = load_model(out)
        record = adapted.provenance["adapted_batch_norm"]
        assert record["from_model"] == source.name and record["layers"] == 10
        assert len(record["scans"]) == 2 and "scan0" not in json.dumps(record)  # counts, no names (patients')
        assert sorted(s["scan"] for s in summary["scans"]) == sorted(map(str, scans))  # printed, not stored
        assert record["slices"] == summary["slices"] == sum(s["slices"] for s in record["scans"]) > 0
        assert summary["crops"] == 2 * summary["slices"] and summary["crop_size"] == 32
        assert "bn1.pt, bn2.pt" in record["measured_on"]  # the models themselves found the lesions
        assert adapted.threshold == 0.4 and adapted.provenance["training_config"]["patch_size"] == 32
        original = load_model(source).model.state_dict()
        for k, v in adapted.model.state_dict().items():
            if "running_mean" in k:
                assert not torch.allclose(v, original[k]), f"{k} was not re-estimated"
            elif "running" not in k and "num_batches" not in k:
                assert torch.equal(v, original[k])
    # the same draw gives the same statistics
    again = adapt_models(sources[:1], scans, [tmp_path / "again.pt"], pseudo_models=sources, per_slice=2, fp16=False)
    assert again[0]["crops"] == summaries[0]["crops"]
    for k, v in load_model(tmp_path / "again.pt").model.state_dict().items():
        assert torch.equal(v, load_model(outs[0]).model.state_dict()[k])


def test_models_of_different_grids_and_scans_without_head_are_refused(tmp_path):
    source = _model_file(tmp_path / "bn.pt")
    other = tmp_path / "other.pt"
    save_model(other, _bn_model(), CONFIG, PreprocessingConfig(grid_size=(32, 32)), 0.5, {"kind": "test"})
    scans = _scans(tmp_path, 1)
    with pytest.raises(DeepWMLError, match="preprocessing") as refused:
        adapt_models([source, other], scans, [tmp_path / "o1.pt", tmp_path / "o2.pt"])
    assert "bn.pt: 64x64 px at 0.9 mm; other.pt: 32x32 px at 0.9 mm" in str(refused.value)
    assert str(refused.value).endswith("adapt them in separate runs")
    # --pseudo-models on another grid than the models adapted: 'adapt them in separate runs' was no help (each run
    # still has them); the marks are found on the adapted models' slices, so pseudo-models of that grid are needed
    with pytest.raises(DeepWMLError) as refused:
        adapt_models([source], scans, [tmp_path / "o1.pt"], pseudo_models=[other])
    assert str(refused.value) == (
        "--pseudo-models other.pt (32x32 px at 0.9 mm) do not share the preprocessing (grid and spacing) of the models "
        "adapted (64x64 px at 0.9 mm), on whose slices their marks are found; give --pseudo-models of that grid, or "
        "leave --pseudo-models out for the models adapted to mark the lesions themselves")
    with pytest.raises(DeepWMLError) as refused:  # both: each run then needs pseudo-models of its own grid
        adapt_models([source, other], scans, [tmp_path / "o1.pt", tmp_path / "o2.pt"], pseudo_models=[source])
    assert str(refused.value).endswith("adapt them in separate runs, each with --pseudo-models of its grid")
    brain = tmp_path / "brain.pt"
    save_model(brain, _bn_model(), CONFIG, PreprocessingConfig(grid_size=(64, 64)), 0.5, {"kind": "test"},
               {"0": "background", "1": "intracranial"})
    with pytest.raises(DeepWMLError, match="brain.pt is a brain-mask model; adapt WMH models"):
        adapt_models([brain], scans, [tmp_path / "o3.pt"])
    # one given to --pseudo-models: told "adapt WMH models" while adapting one, the user was not told which was wrong
    with pytest.raises(DeepWMLError, match=r"brain.pt \(--pseudo-models\) is a brain-mask model; give WMH models"):
        adapt_models([source], scans, [tmp_path / "o3.pt"], pseudo_models=[brain])
    empty = sitk.Image(64, 64, 4, sitk.sitkFloat32)
    sitk.WriteImage(empty, str(tmp_path / "empty.nii.gz"))
    with pytest.raises(DeepWMLError, match="constant"):  # check_volume: a clear message, before any network
        adapt_models([source], [tmp_path / "empty.nii.gz"], [tmp_path / "out.pt"])


def test_command_line_writes_adapted_files_and_keeps_existing_ones(tmp_path, capsys):
    source = _model_file(tmp_path / "bn.pt")
    scans = [str(p) for p in _scans(tmp_path, 2)]
    out = tmp_path / "adapted"
    args = ["adapt", "--model", str(source), "--scans", *scans, "-o", str(out), "--crops-per-slice", "2"]
    assert cli.main(args) == 0
    written = out / "bn-adapted.pt"
    assert written.is_file() and "adapted_batch_norm" in load_model(written).provenance
    err = capsys.readouterr().err
    assert "only" in err and "--model" in err  # 24 slices: the few-slices warning; how to use the result
    assert "finding lesions with bn.pt 24/24" in err and "bn.pt: batch-norm layer 10/10" in err  # progress
    assert err.index("reading scans 2/2") < err.index("finding lesions")  # the scans' reading too, before them
    assert "whether 2 scan(s) are FLAIRs could not be checked" in err  # too small for the FLAIR check: said
    # each scan's head slices, by the path given: the file records the counts alone (names may be patients'), and
    # README said the names were printed, where only the totals were
    for scan in scans:
        assert f"{scan}: 12 of 12 slices with head\n" in err
    assert cli.main(args) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert cli.main(args + ["--overwrite"]) == 0
    # a folder stands for the scans in it
    assert cli.main(["adapt", "--model", str(source), "--scans", str(tmp_path), "-o", str(out), "--overwrite"]) == 0
    record = load_model(written).provenance["adapted_batch_norm"]
    assert len(record["scans"]) == 2 and "scan0" not in json.dumps(record)
    assert "earlier" not in record
    capsys.readouterr()
    assert cli.main(["adapt", "--model", str(written), "--scans", *scans, "-o", str(tmp_path / "again")]) == 0
    # said: adapting again replaces the statistics, it does not add these scans to the earlier ones
    assert "bn-adapted.pt was adapted before (on 24 slices); its statistics are replaced" in capsys.readouterr().err
    again = load_model(tmp_path / "again" / "bn-adapted-adapted.pt").provenance["adapted_batch_norm"]
    assert again["from_model"] == "bn-adapted.pt" and again["earlier"]["from_model"] == "bn.pt"  # history kept
    with pytest.raises(SystemExit) as usage:  # out of range: a usage error
        cli.main(["adapt", "--scans", *scans, "-o", str(out), "--model", str(source), "--crops-per-slice", "0",
                  "--overwrite"])
    assert usage.value.code == 2


def test_too_few_slices_and_a_scan_given_twice_are_refused_and_leave_nothing(tmp_path, capsys):
    source = _model_file(tmp_path / "bn.pt")
    one, two = _scans(tmp_path, 2)
    out = tmp_path / "adapted"
    assert cli.main(["adapt", "--model", str(source), "--scans", str(one), "-o", str(out)]) == 1  # 12 slices
    err = capsys.readouterr().err
    assert "only 12 slice(s) with head" in err and f"{one}: 12 of 12 slices with head" in err  # which scan gave what
    copy = tmp_path / "copy.nrrd"
    sitk.WriteImage(sitk.ReadImage(str(one)), str(copy))  # the same scan in another format
    reordered = tmp_path / "reordered.nii.gz"
    sitk.WriteImage(sitk.DICOMOrient(sitk.ReadImage(str(one)), "RAS"), str(reordered))  # ... in another voxel order
    for twice in ([one, two, copy], [reordered, two, one]):
        assert cli.main(["adapt", "--model", str(source), "--scans", *map(str, twice), "-o", str(out)]) == 1
        assert "holds the same scan as" in capsys.readouterr().err
    # one file named twice: said so ("scan0.nii.gz holds the same scan as scan0.nii.gz" puzzled)
    assert cli.main(["adapt", "--model", str(source), "--scans", str(one), str(one), "-o", str(out)]) == 1
    assert f"error: {one} is given twice in --scans; give each scan once" in capsys.readouterr().err
    assert not out.exists()  # refused runs leave no empty folder


def test_an_ensemble_is_written_only_when_every_member_is_adapted(tmp_path, monkeypatch):
    import DeepWMLLib.adapt as adapt

    sources = [_model_file(tmp_path / "bn1.pt", 0), _model_file(tmp_path / "bn2.pt", 1)]
    calls = []
    real = adapt.adapt_batch_norm

    def second_fails(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as Ctrl-C during the second member
        return real(*args, **kwargs)

    monkeypatch.setattr(adapt, "adapt_batch_norm", second_fails)
    outs = [tmp_path / "out1.pt", tmp_path / "out2.pt"]
    with pytest.raises(KeyboardInterrupt):
        adapt_models(sources, _scans(tmp_path), outs, per_slice=2)
    assert not any(o.exists() for o in outs)


def test_an_ensemble_member_float16_cannot_store_leaves_no_member_written(tmp_path, monkeypatch):
    """A batch-norm variance above 65504 after adaptation (fp16 files, the default): refused, naming --fp32, and
    not after the members before it were written (half an ensemble to be used as a whole)."""
    import DeepWMLLib.adapt as adapt

    sources = [_model_file(tmp_path / "bn1.pt", 0), _model_file(tmp_path / "bn2.pt", 1)]
    calls = []
    real = adapt.adapt_batch_norm

    def second_overflows(model, *args, **kwargs):
        calls.append(1)
        layers = real(model, *args, **kwargs)
        if len(calls) == 2:
            with torch.no_grad():
                next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)).running_var[0] = 1e6
        return layers

    monkeypatch.setattr(adapt, "adapt_batch_norm", second_overflows)
    outs = [tmp_path / "out1.pt", tmp_path / "out2.pt"]
    with pytest.raises(DeepWMLError, match=r"float16 stops at 65504.*--fp32"):
        adapt_models(sources, _scans(tmp_path), outs, per_slice=2)
    assert not any(o.exists() for o in outs)


def test_matched_crops_are_drawn_as_training_draws_them():
    rng = np.random.default_rng(1)
    slices = rng.normal(0, 1, (6, 64, 64)).astype(np.float32)
    lesions = np.zeros(slices.shape, bool)
    lesions[1, 40:44, 50:54] = True  # two slices with a lesion, four without
    lesions[4, 5:7, 5:7] = True
    slices[lesions] = 100.0  # lesion pixels recognisable in the crops
    crops = matched_crops(slices, lesions, 32, per_slice=4, lesion_share=0.5, seed=3)
    assert crops.shape == (24, 32, 32)
    with_lesion = (crops == 100.0).any(axis=(1, 2))
    assert with_lesion.sum() == 12  # half of the crops, each holding its lesion
    # every crop is a piece of one of the slices
    for crop in crops:
        assert any((crop == s[i:i + 32, j:j + 32]).all() for s in slices for i in range(33) for j in range(33)
                   if s[i, j] == crop[0, 0])
    np.testing.assert_array_equal(crops, matched_crops(slices, lesions, 32, 4, 0.5, seed=3))
    # no slice with lesion: every crop is placed at random, on any slice
    plain = matched_crops(slices, np.zeros_like(lesions), 32, 2, 0.5, seed=0)
    assert plain.shape == (12, 32, 32) and 0 < (plain == 100.0).any(axis=(1, 2)).sum() < 12


def test_one_pass_statistics_equal_the_layer_by_layer_ones():
    from DeepWMLLib.adapt import adapt_batch_norm_one_pass

    slices = np.random.default_rng(2).normal(0.3, 1.2, (7, 32, 32)).astype(np.float32)
    by_layer, one_pass = _bn_model(), _bn_model()
    assert adapt_batch_norm(by_layer, slices, batch_size=3) == adapt_batch_norm_one_pass(one_pass, slices) == 10
    for (k, v), (_, w) in zip(by_layer.state_dict().items(), one_pass.state_dict().items()):
        torch.testing.assert_close(v, w, rtol=1e-5, atol=1e-6, msg=k)
    means = [v for k, v in one_pass.state_dict().items() if k.endswith("running_mean")]
    assert len(means) == 10 and not any(torch.allclose(v, torch.full_like(v, 5.0)) for v in means)  # all re-set


def test_adapting_to_a_scan_leaves_the_given_models_alone(tmp_path):
    from DeepWMLLib.adapt import adapt_to_scan
    from DeepWMLLib.segment import segment_image

    models = [load_model(_model_file(tmp_path / "bn1.pt", 0)), load_model(_model_file(tmp_path / "bn2.pt", 1))]
    before = [{k: v.clone() for k, v in m.model.state_dict().items()} for m in models]
    image = sitk.ReadImage(str(_scans(tmp_path, 1)[0]), sitk.sitkFloat32)
    adapted = adapt_to_scan(image, models, per_slice=2)
    for m, saved, a in zip(models, before, adapted):
        for k, v in m.model.state_dict().items():
            assert torch.equal(v, saved[k]), f"{k} of the given model changed"
        new = a.model.state_dict()
        for k, v in saved.items():
            if k.endswith("running_mean"):
                assert not torch.allclose(new[k], v), f"{k} was not re-estimated"
            elif "running" not in k and "num_batches" not in k:
                assert torch.equal(new[k], v)
        assert a.provenance["adapted_to_scan"]["crops"] == 2 * a.provenance["adapted_to_scan"]["slices"] > 0
        assert a.threshold == m.threshold and a.preprocessing == m.preprocessing and not a.digest
    result = segment_image(image, adapted, device="cpu", brain_model=None)  # runs in memory, on the scan's grid
    assert result.mask.GetSize() == image.GetSize() and result.mask.GetSpacing() == image.GetSpacing()


class _Stream:
    def __init__(self, tty):
        self.tty, self.text = tty, ""

    def isatty(self):
        return self.tty

    def write(self, text):
        self.text += text

    def flush(self):
        pass


def test_progress_is_a_line_in_place_on_a_terminal_and_a_few_plain_lines_in_a_log():
    from DeepWMLLib.adapt import StageProgress

    log, tty = _Stream(False), _Stream(True)
    for stream in (log, tty):
        progress = StageProgress(stream)
        for k in range(1, 101):
            progress("finding lesions with m.pt", k, 100)
        for k in range(1, 19):
            progress("m.pt", k, 18)
    lines = log.text.splitlines()
    assert "\r" not in log.text and len(lines) == 8  # a quarter at a time, each stage ending on its total
    assert lines[3] == "finding lesions with m.pt 100/100" and lines[-1] == "m.pt: batch-norm layer 18/18"
    assert tty.text.count("\r") == 118 and tty.text.count("\n") == 2


def test_a_log_hears_of_the_batch_norm_layers_at_least_every_half_minute():
    """Into a log (not a terminal), adapt said its batch-norm layers only at quarters (layers 5, 9, 14 and 18 of
    18): minutes of silence on a busy CPU (22 minutes for one clinical scan). Each batch now counts, and a line is
    said once PLAIN_EVERY_S have passed since the last, the quarters as before; a fast run says no more than them."""
    from DeepWMLLib.adapt import PLAIN_EVERY_S, StageProgress

    rng = np.random.default_rng(0)
    slices = rng.normal(0.3, 1.2, (12, 32, 32)).astype(np.float32)
    for step, most in ((7.0, None), (0.001, 4)):  # seconds a batch takes: a slow CPU, then a fast one
        now = [0.0]
        log = _Stream(False)
        progress = StageProgress(log, clock=lambda: now[0])
        stamps = []

        def told(k, n):
            now[0] += step
            before = log.text.count("\n")
            progress("m.pt", k, n)
            stamps.extend([now[0]] * (log.text.count("\n") - before))

        layers = adapt_batch_norm(_bn_model(), slices, batch_size=1, progress=told)
        lines = log.text.splitlines()
        assert lines[-1] == f"m.pt: batch-norm layer {layers}/{layers}" and "\r" not in log.text
        if most:
            assert len(lines) == most, lines
        else:
            gaps = np.diff([step, *stamps])  # from the first call (adapt: "reading scans 0/n" at once)
            assert gaps.max() <= PLAIN_EVERY_S + step, (gaps, lines)  # said at the first batch after the half minute
            assert len(lines) <= now[0] / PLAIN_EVERY_S + 4  # no more than that: not a line a batch
            assert any("%)" in line for line in lines), lines  # within a layer: its share done


def test_reading_the_scans_reports_progress_scan_by_scan(tmp_path, monkeypatch):
    """The scans' reading (the FLAIR check and the head slices: seconds a scan) said nothing: 30 scans were minutes
    of silence before the first progress line. Each scan read, or skipped, now counts, before the lesions' stage."""
    import DeepWMLLib.io as io

    source = _model_file(tmp_path / "bn.pt")
    folder = tmp_path / "scans"
    folder.mkdir()
    one, two = _scans(folder, 2)
    _, truth = make_volume(size=(64, 64, 12), spacing=(0.9, 0.9, 5.0), blobs=((0.4, 0.5, 0.5, 6.0),))
    mask = folder / "consensus_mask.nii.gz"
    sitk.WriteImage(truth, str(mask))
    events = []
    real = io.read_image
    monkeypatch.setattr(io, "read_image", lambda path, **kw: events.append(("read", Path(path).name)) or real(path, **kw))
    adapt_models([source], [one, mask, two], [tmp_path / "out.pt"], per_slice=1, found=frozenset({mask}),
                 progress=lambda what, k, n: events.append((what, k, n)), log=lambda text: events.append(("log",)))
    assert events[:8] == [("reading scans", 0, 3), ("read", "scan0.nii.gz"), ("reading scans", 1, 3),
                          ("read", "consensus_mask.nii.gz"), ("log",), ("reading scans", 2, 3),  # the mask: skipped
                          ("read", "scan1.nii.gz"), ("reading scans", 3, 3)]
    assert not [e for e in events[8:] if e[0] in ("read", "reading scans")]
    assert ("finding lesions with bn.pt", 24, 24) in events[8:]


def test_a_line_left_open_on_a_terminal_is_ended_before_a_message():
    from DeepWMLLib.adapt import StageProgress
    from DeepWMLLib.cli import end_progress_line

    tty = _Stream(True)
    progress = StageProgress(tty)
    progress("reading scans", 1, 3)
    end_progress_line()  # a scan skipped, or an error, said next: on a line of its own (cli.main ends it)
    end_progress_line()
    progress("reading scans", 3, 3)
    end_progress_line()  # the stage's line is ended already
    assert tty.text == "\rreading scans 1/3\n\rreading scans 3/3\n"


def test_the_same_adaptation_gives_the_same_bytes(tmp_path):
    """A model file's bytes depend on its content only (torch.save would name its archive after the
    temporary file), so a checksum can tell whether two runs agree."""
    import hashlib

    source = _model_file(tmp_path / "bn.pt")
    scans = _scans(tmp_path)
    outs = [tmp_path / "a" / "x.pt", tmp_path / "b" / "x.pt"]
    for out in outs:
        out.parent.mkdir()
        adapt_models([source], scans, [out], per_slice=2)
    assert len({hashlib.sha256(out.read_bytes()).hexdigest() for out in outs}) == 1


def test_the_same_scans_in_another_order_give_the_same_model(tmp_path):
    """The crops are drawn from the slices by their place: `--scans a b c` and `--scans c a b` gave two models
    (statistics 0.3-4 % apart on two clinical FLAIRs), so a rerun's checksum could not say the runs agree."""
    import hashlib

    source = _model_file(tmp_path / "bn.pt")
    scans = _scans(tmp_path, 3, slices=8)
    outs = [tmp_path / "a" / "x.pt", tmp_path / "b" / "x.pt"]
    for out, order in zip(outs, (scans, scans[::-1])):
        out.parent.mkdir()
        adapt_models([source], order, [out], per_slice=2)
    assert len({hashlib.sha256(out.read_bytes()).hexdigest() for out in outs}) == 1


def test_a_pacs_export_adapts_on_each_studys_flair(tmp_path, capsys):
    """--scans EXPORT: each study below it gives its FLAIR series (as segment picks it); a study without a
    FLAIR-like series is skipped with a line saying why, never adapted on."""
    from conftest import write_dicom_series

    source = _model_file(tmp_path / "bn.pt")
    export = tmp_path / "export"
    for number, seed in ((1, 0), (2, 1)):
        flair, _ = make_volume(size=(64, 64, 12), spacing=(0.9, 0.9, 5.0), blobs=((0.4, 0.5, 0.5, 6.0),), seed=seed,
                               dtype=sitk.sitkInt16)
        write_dicom_series(export / f"PAT{number}" / "SER1", flair, uid=f"{number}.1.1", description="AX FLAIR",
                           extra={"0020|000d": f"{number}.1"})
        t1, _ = make_volume(size=(64, 64, 5), spacing=(0.9, 0.9, 5.0), seed=seed + 5, dtype=sitk.sitkInt16)
        write_dicom_series(export / f"PAT{number}" / "SER2", t1, uid=f"{number}.1.2", description="AX T1",
                           extra={"0020|000d": f"{number}.1"})
    write_dicom_series(export / "PAT3" / "SER1", t1, uid="3.1.1", description="sag T1 mprage", extra={"0020|000d": "3.1"})
    out = tmp_path / "adapted"
    assert cli.main(["adapt", "--model", str(source), "--scans", str(export), "-o", str(out), "--crops-per-slice", "2"]) == 0
    record = load_model(out / "bn-adapted.pt").provenance["adapted_batch_norm"]
    assert [s["of"] for s in record["scans"]] == [12, 12]
    assert "PAT" not in json.dumps(load_model(out / "bn-adapted.pt").provenance)  # a patient's folder name: not kept
    assert "PAT3_SER1: skipped - " in capsys.readouterr().err


def test_a_label_mask_in_a_folder_of_scans_is_skipped_as_segment_skips_it(tmp_path, capsys):
    """A labelled cases' folder (FLAIRs and a manual mask) given to adapt: the whole run failed on the mask ('looks
    like a label mask ...; give the FLAIR image'), where deepwml segment skips it. It is skipped, saying so; a folder
    of masks alone is an error."""
    source = _model_file(tmp_path / "bn.pt")
    folder = tmp_path / "labelled"
    folder.mkdir()
    scans = _scans(folder, 2)
    _, truth = make_volume(size=(64, 64, 12), spacing=(0.9, 0.9, 5.0), blobs=((0.4, 0.5, 0.5, 6.0),))
    sitk.WriteImage(truth, str(folder / "consensus_mask.nii.gz"))
    out = tmp_path / "adapted"
    assert cli.main(["adapt", "--model", str(source), "--scans", str(folder), "-o", str(out), "--crops-per-slice", "2"]) == 0
    assert "consensus_mask: skipped - looks like a label mask" in capsys.readouterr().err
    assert len(load_model(out / "bn-adapted.pt").provenance["adapted_batch_norm"]["scans"]) == 2
    for scan in scans:
        scan.unlink()
    assert cli.main(["adapt", "--model", str(source), "--scans", str(folder), "-o", str(tmp_path / "none")]) == 1
    assert "every image file found looks like a label mask" in capsys.readouterr().err


def test_a_label_mask_named_beside_scans_is_skipped_as_segment_skips_it(tmp_path, capsys):
    """`deepwml adapt --scans data/p07/*` (the shell names consensus_mask.nii.gz beside the FLAIRs) stopped the run
    ('looks like a label mask ...; give the FLAIR image'), where deepwml segment skips such a mask with a warning.
    It is skipped with a warning; named alone, or when every input named is a mask, it stays an error."""
    source = _model_file(tmp_path / "bn.pt")
    folder = tmp_path / "p07"
    folder.mkdir()
    scans = _scans(folder, 2)
    _, truth = make_volume(size=(64, 64, 12), spacing=(0.9, 0.9, 5.0), blobs=((0.4, 0.5, 0.5, 6.0),))
    mask = folder / "consensus_mask.nii.gz"
    sitk.WriteImage(truth, str(mask))
    out = tmp_path / "adapted"
    argv = ["adapt", "--model", str(source), "--crops-per-slice", "2", "--scans"]
    assert cli.main([*argv, str(mask), *map(str, scans), "-o", str(out)]) == 0  # as the glob expands: mask first
    err = capsys.readouterr().err
    assert f"deepwml adapt: warning: skipped {mask}, given in --scans: looks like a label mask, not a FLAIR scan " \
           "(2 values: 0, 1): not used" in err
    assert len(load_model(out / "bn-adapted.pt").provenance["adapted_batch_norm"]["scans"]) == 2

    assert cli.main([*argv, str(mask), "-o", str(tmp_path / "alone")]) == 1  # named alone: the error it is
    err = capsys.readouterr().err
    assert "looks like a label mask" in err and "give the FLAIR image" in err and "warning" not in err
    other = tmp_path / "p19_mask.nii.gz"
    sitk.WriteImage(truth, str(other))
    assert cli.main([*argv, str(mask), str(other), "-o", str(tmp_path / "masks")]) == 1
    err = capsys.readouterr().err
    assert "deepwml adapt: error: every image file given looks like a label mask or segmentation, not a FLAIR " \
           "scan; give the FLAIR scans" in err and "warning" not in err
    assert not (tmp_path / "alone").exists() and not (tmp_path / "masks").exists()


def test_a_folder_in_place_of_an_output_file_is_refused_before_the_work(tmp_path, capsys):
    """A folder named as the adapted file (bn-adapted.pt/) was said to 'already exist; use --overwrite', and with
    --overwrite the run did all its work, then failed on writing ('is a folder; give a file name')."""
    source = _model_file(tmp_path / "bn.pt")
    scans = [str(p) for p in _scans(tmp_path, 2)]
    out = tmp_path / "adapted"
    (out / "bn-adapted.pt").mkdir(parents=True)
    for extra in ([], ["--overwrite"]):
        assert cli.main(["adapt", "--model", str(source), "--scans", *scans, "-o", str(out), *extra]) == 1
        err = capsys.readouterr().err
        assert "bn-adapted.pt is a folder" in err and "use --overwrite" not in err
        assert "finding lesions" not in err  # refused before reading the scans and running the networks
    assert (out / "bn-adapted.pt").is_dir()


@pytest.mark.parametrize("odd,why", [("T1-weighted", "the cortex is darker than the white matter"),
                                     ("T2- or PD-weighted", "the ventricles are not dark")])
def test_a_scan_that_does_not_look_like_a_flair_is_refused_naming_it(odd, why, tmp_path, capsys, monkeypatch):
    """A T1- or T2-weighted volume among the scans was adapted on without a word, shifting the statistics and
    spoiling the adapted model for every later patient. As `deepwml train` refuses such a case, adapt refuses
    before the work, naming the scan, what it looks like and why; --allow-non-flair adapts on it, with a warning,
    and the file records what that scan looked like (not its name)."""
    from conftest import oracle_network
    from test_train import make_contrast_cohort

    oracle_network(monkeypatch)  # the brain-mask network outlines the phantom brains, as in train's tests
    data = make_contrast_cohort(tmp_path / "data", odd).parent
    scans = [str(data / f"c{i}_flair.nii.gz") for i in range(5)]  # c4 has the contrast `odd`
    source = _model_file(tmp_path / "bn.pt")
    out = tmp_path / "adapted"
    argv = ["adapt", "--model", str(source), "--scans", *scans, "-o", str(out), "--crops-per-slice", "1",
            "--threads", "1"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert re.search(rf"error: 1 scan\(s\) do not look like a FLAIR: \S*c4_flair.nii.gz looks {re.escape(odd)}: "
                     rf"{why} .*leave them out of --scans.*--allow-non-flair", err)
    assert "finding lesions" not in err and not out.exists()  # refused before the work, leaving nothing
    assert cli.main(argv + ["--allow-non-flair"]) == 0
    err = capsys.readouterr().err
    assert re.search(rf"warning: adapting on 1 scan\(s\) that do not look like a FLAIR, as --allow-non-flair asks: "
                     rf"\S*c4_flair.nii.gz \({re.escape(odd)}\)", err)
    record = load_model(out / "bn-adapted.pt").provenance["adapted_batch_norm"]
    assert [s.get("looks_like") for s in record["scans"]].count(odd) == 1 and "c4_flair" not in json.dumps(record)
    assert adaptation_summary(load_model(out / "bn-adapted.pt").provenance)["not_flair_scans"] == 1  # segment's report
    # ... on every later run too: segment's models come from the settings' cache once a file was loaded, which keeps
    # of the scans' list its count alone; `not_flair_scans` was gone from every report but the first
    from DeepWMLLib.segment import load_models

    cached = load_models([out / "bn-adapted.pt"])[0].provenance
    assert isinstance(cached["adapted_batch_norm"]["scans"], int)  # the cache's form
    assert adaptation_summary(cached)["not_flair_scans"] == 1


def test_flairs_pass_the_check_without_a_word(tmp_path, capsys, monkeypatch):
    from conftest import oracle_network
    from test_train import make_contrast_cohort

    oracle_network(monkeypatch)
    data = make_contrast_cohort(tmp_path / "data", None, n_cases=3).parent
    source = _model_file(tmp_path / "bn.pt")
    assert cli.main(["adapt", "--model", str(source), "--scans", *(str(data / f"c{i}_flair.nii.gz") for i in range(3)),
                     "-o", str(tmp_path / "adapted"), "--crops-per-slice", "1", "--threads", "1"]) == 0
    err = capsys.readouterr().err
    assert "FLAIR" not in err and "could not be checked" not in err
    record = load_model(tmp_path / "adapted" / "bn-adapted.pt").provenance["adapted_batch_norm"]
    assert len(record["scans"]) == 3 and not any("looks_like" in s for s in record["scans"])


def test_segment_reports_how_an_adapted_model_was_adapted(tmp_path):
    """An adapted model recorded how it was adapted inside the file, but segment's report named only its file and
    checksum: nothing told a reader that the mask came from a model adapted on a site's scans, nor from which model.
    The report's `model_adapted` says it for each model (None for one not adapted), with the source model's
    checksum as reports give it."""
    from DeepWMLLib.checkpoint import file_digest

    source = _model_file(tmp_path / "bn.pt")
    scans = [str(p) for p in _scans(tmp_path, 2)]
    assert cli.main(["adapt", "--model", str(source), "--scans", *scans, "-o", str(tmp_path / "adapted"),
                     "--crops-per-slice", "1"]) == 0
    adapted = tmp_path / "adapted" / "bn-adapted.pt"
    out = tmp_path / "out"
    assert cli.main(["segment", scans[0], "-o", str(out), "--model", str(adapted), str(source), "--device", "cpu",
                     "--no-brain-mask"]) == 0
    report = json.loads((out / "scan0_report.json").read_text(encoding="utf-8"))
    said = dict(zip(report["model"], report["model_adapted"]))
    assert said == {"bn-adapted.pt": {"scans": 2, "slices": 24, "from_model": "bn.pt", "from_sha256": file_digest(source)},
                    "bn.pt": None}
    assert file_digest(source) == dict(zip(report["model"], report["model_sha256"]))["bn.pt"]  # as reports give it


def test_the_shipped_adapted_models_are_summarised_from_the_file_and_from_the_cache():
    """Ensemble v8's members, adapted from v7's: the file lists each scan, the cached settings (shareable: no
    scan names) their count; the summary is the same from either, its source checksum that of v7's member."""
    from DeepWMLLib.checkpoint import file_digest, load_model_settings
    from DeepWMLLib.segment import shipped_ensembles

    paths = {e["name"]: e["paths"] for e in shipped_ensembles()}
    sources = {Path(p).name: p for p in paths["ensemble-v7"]}
    for member in paths["ensemble-v8"]:
        record = load_model(member).provenance["adapted_batch_norm"]
        cached = load_model_settings(member).provenance
        assert isinstance(cached["adapted_batch_norm"]["scans"], int)  # the cache's form
        summary = adaptation_summary(load_model(member).provenance)
        assert summary == adaptation_summary(cached)
        assert summary["scans"] == len(record["scans"]) > 0 and summary["slices"] == record["slices"] > 0
        assert summary["from_sha256"] == file_digest(sources[summary["from_model"]])


def test_ensemble_members_of_one_file_name_are_adapted_in_one_run_named_apart(tmp_path, capsys):
    # deepwml train --ensemble writes RUN/model_0/best.pt, RUN/model_1/best.pt: adapting them together was refused
    # ("two model files have the same name"), and progress and the files' records named both best.pt
    members = []
    for k in range(2):
        (tmp_path / "run" / f"model_{k}").mkdir(parents=True)
        members.append(str(_model_file(tmp_path / "run" / f"model_{k}" / "best.pt", seed=k)))
    scans = [str(p) for p in _scans(tmp_path, 2)]
    out = tmp_path / "adapted"
    assert cli.main(["adapt", "--model", *members, "--scans", *scans, "-o", str(out), "--crops-per-slice", "1"]) == 0
    err = capsys.readouterr().err
    for k in range(2):
        written = out / f"model_{k}_best-adapted.pt"
        assert load_model(written).provenance["adapted_batch_norm"]["from_model"] == f"model_{k}/best.pt"
        assert f"finding lesions with model_{k}/best.pt 24/24" in err and f"model_{k}/best.pt: batch-norm layer" in err
    assert "crops of 32 px, 25% centred on pseudo-lesions of model_0/best.pt, model_1/best.pt" in json.dumps(
        load_model(out / "model_0_best-adapted.pt").provenance)
    # one file given twice is said so, not "the same name"
    assert cli.main(["adapt", "--model", members[0], members[0], "--scans", *scans, "-o", str(tmp_path / "b")]) == 1
    assert f"error: {members[0]} is given twice in --model; give each model once" in capsys.readouterr().err


@pytest.mark.parametrize("name,file", [("bn.pt", "bn-adapted.pt"), ("model_0/best.pt", "model_0_best-adapted.pt"),
                                       ("D:/best.pt", "D_best-adapted.pt"),  # members on two Windows drives
                                       ("//server/scans/best.pt", "server_scans_best-adapted.pt")])
def test_adapted_files_are_named_from_the_members_names_apart_as_file_names_allow(name, file):
    from DeepWMLLib.adapt import adapted_name

    assert adapted_name(name) == file  # 'D:_best-adapted.pt' held a colon, which Windows refuses in a file name


def test_one_model_scan_and_output_may_each_be_given_alone_as_a_path(tmp_path, monkeypatch):
    """adapt_models("model.pt", "scan.nii.gz", "out.pt") read each name letter by letter (one model of 8 letters
    against outputs of 6: 'one output path per model is needed'; a scan's first "/" the root folder)."""
    import DeepWMLLib.adapt as adapt

    read = adapt.network_slices

    def only_whole_paths(scans, *args, **kwargs):
        assert all(len(str(scan)) > 1 for scan in scans), "a scan's name read letter by letter"  # never read "/"
        return read(scans, *args, **kwargs)

    monkeypatch.setattr(adapt, "network_slices", only_whole_paths)
    source = _model_file(tmp_path / "bn.pt")
    [scan] = _scans(tmp_path, 1, slices=24)
    [summary] = adapt_models(str(source), str(scan), str(tmp_path / "adapted.pt"), per_slice=2, fp16=False)
    assert [s["scan"] for s in summary["scans"]] == [str(scan)]
    assert load_model(tmp_path / "adapted.pt").provenance["adapted_batch_norm"]["from_model"] == "bn.pt"


def test_a_scan_whose_own_header_says_it_is_not_a_flair_is_warned_of_naming_it(tmp_path, capsys):
    """A T1 or a diffusion image among the scans skews the statistics for every later patient, and its header may
    say so where its picture passes the FLAIR check (a diffusion image does): adapt read the scans without a word
    of it, where segment, change and train warn. Each such scan is warned of, naming it and what says so."""
    source = _model_file(tmp_path / "bn.pt")
    (tmp_path / "in").mkdir()
    scans = _scans(tmp_path / "in", 3)
    (tmp_path / "in" / "scan1.json").write_text(json.dumps({"SeriesDescription": "t1_mprage_sag", "InversionTime": 0.9}))
    (tmp_path / "in" / "scan2.bval").write_text("0 1000 1000\n")
    out = tmp_path / "adapted"
    assert cli.main(["adapt", "--model", str(source), "--scans", *map(str, scans), "-o", str(out),
                     "--crops-per-slice", "2"]) == 0
    err = capsys.readouterr().err
    assert (f"deepwml adapt: warning: {scans[1]}: the scan may not be a FLAIR: its description 't1_mprage_sag' names "
            "a T1-weighted scan; its inversion time is 900 ms") in err and "(scan1.json)" in err
    assert f"deepwml adapt: warning: {scans[2]}: the scan may not be a FLAIR: its b-values go up to 1000" in err
    assert f"{scans[0]}: the scan may not be a FLAIR" not in err
    assert len(load_model(out / "bn-adapted.pt").provenance["adapted_batch_norm"]["scans"]) == 3  # a warning only


def test_a_model_file_without_batch_norm_is_refused_before_the_scans_are_read(tmp_path, monkeypatch, capsys):
    """A model without batch normalisation has no statistics to adapt: refused from its settings, before the scans
    are read and segmented for their lesions (minutes on a real set; it was refused after them, dev46), and leaving
    no output folder."""
    from conftest import tiny_model_file
    from DeepWMLLib import adapt

    plain = tiny_model_file(tmp_path / "plain.pt")  # no batch norm

    def not_read(*args, **kwargs):
        raise AssertionError("the scans were read before the model was refused")

    monkeypatch.setattr(adapt, "network_slices", not_read)
    out = tmp_path / "out"
    assert cli.main(["adapt", "--model", str(plain), "--scans", *map(str, _scans(tmp_path, n=1)), "-o", str(out)]) == 1
    assert "plain.pt: the model has no batch normalisation; there are no statistics to adapt" in capsys.readouterr().err
    assert not out.exists()


def test_a_terminal_shows_a_layer_at_work_and_then_set_without_a_leftover_share():
    """On a terminal the line is rewritten in place: a layer's share ("m.pt: batch-norm layer 2/2 (87%)") was left
    on screen behind the shorter "...layer 2/2" that follows it, so the finished line read "2/2 (87%)"; and a layer
    all but done (its batches 799 of 800) was said "(100%)" before it was set."""
    from test_progress_lines import screen

    from DeepWMLLib.adapt import StageProgress

    tty = _Stream(True)
    progress = StageProgress(tty)
    for k in (0.5, 1, 1 + 799 / 800, 2):
        progress("m.pt", k, 2)
    assert "(100%)" not in tty.text and "2/2 (99%)" in tty.text
    assert screen(tty.text) == ["m.pt: batch-norm layer 2/2"]
