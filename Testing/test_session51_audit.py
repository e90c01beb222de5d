"""Session 51's mutation audit (mut51) of this session's new code: precision auto measured once where bf16 is native
(inference._bf16_key, bf16_known, bf16_measured, bf16_is_faster and its lock, TorchRunner and OpenVinoRunner with
precision auto), deepwml bench's row of what auto measured (bench._precision_measured, _precision_choice), the
precision outputs added to a case done before run in (segment.rerun_precision), an OUTDIR's outline series or SEG not
taken for a study (segment._earlier_outputs_only), an outline folder its report does not list (_segment_case) and
check_outline_folder's order. Each test names the mutants it kills.

Mutants of the code as of 243b321 (git diff aeb9b30 243b321 -- DeepWMLLib DeepWML) and their fate: 88 made by hand, one
at a time, each run against the tests covering its code (test_precision_choice.py; test_cli_segment.py -k "precision or
bf16 or openvino or rerun or add"; test_bench.py for bench.py; test_dicom_outline.py and test_session49_audit.py for
dicom_outline.py and the outline/OUTDIR rules). 64 killed before, 23 killed by these tests, 1 equivalent, no bug in the
code (one order-dependent test fixed: test_openvino_backend_agrees_with_torch_in_fp32_and_closely_in_bf16).
  inference key (8): killed before I1 runtime, I2 version, I3 threads, I5 grid, I6 weights' digest in the key (each
    out of it or added), I8 the CPU out of the key (only because an OpenVINO version string holds '/', which made the
    memo's path a folder); killed here I4 the network's settings out of the key, I7 sort_keys dropped (one network
    stored in another key order measured again), I8 (by a CPU of its own).
  bf16_known / bf16_measured (6): killed before I11 any non-None 'bf16' taken, I12 ValueError not caught, I13 no dict
    check, I35 bf16_measured's key without the version (also here); killed here I9 the process's memo not asked, I10
    the record read from the cache not kept in the process.
  _bf16_is_faster and its lock (21): killed before I14 'if known' (a cached False measured again), I15 no warm-up
    run, I16 one round fewer, I20 margin on fp32's side, I21 fp32 and bf16 swapped, I23 margin 1.0, I24 the record's
    ms swapped, I28 not written to the cache, I30 'except ValueError', I31 no lock, I32 the cache asked outside the
    lock (both threads measure), I33 a batch of 2, I34 float64 input, I18 the last round only (by sleep noise; here
    for certain); killed here I17 one round, I19 '<' at exactly the margin, I22 margin 1.3 (README says 1.15),
    I25 seconds in the record, I26 another margin recorded, I27 the answer not kept in the process, I29 the
    temporary file left when the memo cannot be replaced.
  TorchRunner (9): killed before T1 measured without native bf16, T2 answer ignored, T3 runs swapped, T4 measured not
    kept, T6 _run on self.bf16 (both runs bf16), T7 fp16 set after the measurement (AttributeError), T8 always bf16;
    killed here T5 bf16_measured asked with another version (no bench row), T9 the thread count out of the key.
  OpenVinoRunner (11): killed before O1 measured for bf16 asked, O2 measured without native bf16, O3 cached answer
    inverted, O4 cache not asked (both compiled), O5 measured again when cached, O6 answer inverted, O7 fp32 named
    but the bf16 request kept, O8 runs swapped, O9 measured not kept, O10 precision hint inverted, O11 the cache asked
    for 1 thread (only where the CPU has more than one; here for certain).
  bench (10): killed before B1 non-dict records, B2 True taken for a figure, B3 0 allowed, B4 fields swapped, B5 any
    for all, B7 timings swapped in the row, B8 a row for None, B9 nothing recorded; killed here B6 always 'fp32:', B10
    the margin written in rather than the record's.
  rerun_precision (9): killed before S2 bf16 not taken, S6 auto kept, S7 the call site passing auto, S8 the top-level
    field read, S3 any recorded precision passed on (only where the tiny networks' timings gave "bf16+fp32"; here
    for certain); killed here S1 fp32/bf16 asked overridden, S4 check_runtime not asked, S5 fp32 where bf16 does not
    run, S9 check_runtime asked for the precision given.
  _earlier_outputs_only (7): killed before E1 no filter, E2 any for all, E4 the outline's listing above not asked, E7
    the outline's folder looked up in itself; killed here E3 the SEG's listing beside it not asked, E6 each folder's
    listing read again for every file; equivalent E5 'bool(files) and' dropped (dicom_catalogue makes a study only
    of series read from files: never empty).
  an outline folder the report does not list (5): killed before L1 not added, L3 'in' for 'not in', L5 without
    '"dicom_outline" in paths' (KeyError); killed here L2 a report without `outputs` ('in None'), L4 without
    'exists()' (the outline missing twice: 'added flair_outline_dicom, flair_outline_dicom').
  check_outline_folder (2): killed before K1 the foreign images checked last (the old order), K2 not checked.
"""
from __future__ import annotations

import copy
import json
import re
import time
from pathlib import Path

import pytest

from DeepWMLLib import inference
from DeepWMLLib.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def fresh_choices(tmp_path, monkeypatch):
    """A cache of this test's own, no answer known to this process."""
    monkeypatch.setenv("DEEPWML_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(inference, "_BF16_CHOICES", {})
    return tmp_path / "cache" / "precision"


@pytest.fixture
def loaded(tiny_model):
    from DeepWMLLib.segment import load_models

    (model,) = load_models([tiny_model])
    return model


class _Clock:
    """time as inference sees it, its perf_counter moved on only by the runs below: timings exact to the bit."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now

    def __getattr__(self, name):
        return getattr(time, name)


def _scripted(monkeypatch, fp32, bf16, calls=None):
    """Runs for bf16_is_faster taking the seconds given, in turn (the warm-up run first), on a fake clock."""
    clock = _Clock()
    monkeypatch.setattr(inference, "time", clock)
    left = {"fp32": list(fp32), "bf16": list(bf16)}

    def run(name):
        def go(x):
            if calls is not None:
                calls.append(name)
            clock.now += left[name].pop(0)
        return go
    return {"fp32": run("fp32"), "bf16": run("bf16")}


def _quick(monkeypatch, calls=None):
    """Runs on the fake clock, fp32 1 s and bf16 2 s each (fp32 the faster), as many as asked, each listed in `calls`."""
    return _scripted(monkeypatch, [1] * 50, [2] * 50, calls)


# ---- bf16_is_faster: the fastest round each, the record -------------------------------------------------------------

def test_the_fastest_of_the_rounds_decides_and_the_record_says_it_in_ms(loaded, fresh_choices, monkeypatch):
    """Times worked out by hand (fake clock, seconds; one warm-up run each first, not counted):
    fp32 50, 50, 20 -> fastest 20; bf16 16, 40, 40 -> fastest 16; 16 x 1.15 = 18.4 <= 20: bf16. The last round alone
    (bf16 40 x 1.15 = 46 > fp32 20) would say fp32. The record holds milliseconds (20000, 16000) and the margin used,
    and this process's bf16_measured hands it back at once (deepwml bench's row).
    (Kills: I18 the last round only, I25 seconds in the record, I26 another margin recorded, I27 the record not kept in
    the process, I35 bf16_measured's key without the version.)"""
    runs = _scripted(monkeypatch, [99, 50, 50, 20], [99, 16, 40, 40])
    assert inference.bf16_is_faster("torch", "9.9", loaded, 2, runs) is True
    record = {"bf16": True, "fp32_ms": 20000.0, "bf16_ms": 16000.0, "runtime": "torch 9.9", "threads": 2,
              "faster_by_needed": inference.BF16_FASTER_BY}
    assert inference.bf16_measured("torch", "9.9", loaded, 2) == record
    (memo,) = fresh_choices.glob("torch-*-2t-*.json")
    assert json.loads(memo.read_text(encoding="utf-8")) == record


def test_one_slow_round_does_not_decide(loaded, fresh_choices, monkeypatch):
    """A hiccup of a shared machine in bf16's first timed run (60 s against 10 s in the others; fp32 20 s each):
    fastest bf16 10 x 1.15 = 11.5 <= 20: bf16. One round alone would have timed the hiccup: 69 > 20, fp32.
    (Kills: I17 _BF16_ROUNDS = 1.)"""
    assert inference._BF16_ROUNDS >= 2
    runs = _scripted(monkeypatch, [99, 20, 20, 20], [99, 60, 10, 10])
    assert inference.bf16_is_faster("torch", "1", loaded, 2, runs) is True


def test_a_gain_of_exactly_the_margin_keeps_bf16(loaded, fresh_choices, monkeypatch):
    """'At least BF16_FASTER_BY faster' (README): the margin itself is enough. With the margin 1.25 (exact in binary),
    bf16 4 s and fp32 5 s: 4 x 1.25 = 5 <= 5, bf16; fp32 4.5 s: 5 > 4.5, fp32. (Kills: I19 '<'.)"""
    monkeypatch.setattr(inference, "BF16_FASTER_BY", 1.25)
    assert inference.bf16_is_faster("torch", "a", loaded, 2, _scripted(monkeypatch, [1, 5, 5, 5], [1, 4, 4, 4])) is True
    assert inference.bf16_is_faster("torch", "b", loaded, 2,
                                     _scripted(monkeypatch, [1, 4.5, 4.5, 4.5], [1, 4, 4, 4])) is False


def test_the_margin_is_the_one_the_readme_states():
    """README: bf16 kept 'where it is at least 1.15× faster'. (Kills: I22 BF16_FASTER_BY = 1.3.)"""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    stated = re.findall(r"keeps bf16 only\s+where it is at least (\d+(?:\.\d+)?)\s*×\s*faster", readme)
    assert [float(x) for x in stated] == [inference.BF16_FASTER_BY]


# ---- the process's memo and the cache --------------------------------------------------------------------------------

def test_a_process_whose_cache_cannot_be_written_measures_once(loaded, fresh_choices, monkeypatch):
    """The docstring's rule: an unwritable cache costs the timing once in each process, not in each runner (a batch
    of ensembles builds several). (Kills: I9 bf16_known not asking the process's memo, I27 the answer not kept in
    it.)"""
    fresh_choices.parent.mkdir(parents=True)
    fresh_choices.write_text("a file where the folder goes", encoding="utf-8")
    calls = []
    assert inference.bf16_is_faster("torch", "1", loaded, 2, _quick(monkeypatch, calls)) is False
    measured = len(calls)
    assert measured and inference.bf16_known("torch", "1", loaded, 2) is False
    assert inference.bf16_is_faster("torch", "1", loaded, 2, _quick(monkeypatch, calls)) is False
    assert len(calls) == measured  # not timed again


def test_an_answer_read_from_the_cache_gives_its_record_too(loaded, fresh_choices, monkeypatch):
    """A later process reads the answer from the cache (bf16_known) and deepwml bench's row its figures
    (bf16_measured): the record read is kept in the process. (Kills: I10 the record read not kept.)"""
    runs = _scripted(monkeypatch, [1, 8, 8, 8], [1, 2, 2, 2])
    assert inference.bf16_is_faster("openvino", "1", loaded, 2, runs) is True
    record = inference.bf16_measured("openvino", "1", loaded, 2)
    monkeypatch.setattr(inference, "_BF16_CHOICES", {})  # a fresh process
    assert inference.bf16_measured("openvino", "1", loaded, 2) is None
    assert inference.bf16_known("openvino", "1", loaded, 2) is True
    assert inference.bf16_measured("openvino", "1", loaded, 2) == record


def test_an_answer_that_cannot_replace_the_memo_leaves_no_temporary_file(loaded, fresh_choices, monkeypatch):
    """The memo's name taken by a folder (os.replace refuses): the answer stands, and the temporary file written
    beside it is removed, not left in precision/ in every process. (Kills: I29 the temporary file not removed.)"""
    inference.bf16_is_faster("torch", "1", loaded, 2, _quick(monkeypatch))
    (memo,) = fresh_choices.glob("*.json")
    memo.unlink()
    memo.mkdir()
    inference._BF16_CHOICES.clear()
    assert inference.bf16_is_faster("torch", "1", loaded, 2, _quick(monkeypatch)) is False
    assert sorted(p.name for p in fresh_choices.iterdir()) == [memo.name]


def test_the_key_is_the_networks_settings_in_any_order_and_the_cpu(loaded, fresh_choices, monkeypatch):
    """One answer per network shape: other settings on the same grid are measured again, the same settings stored in
    another order (a checkpoint of another version) are not; another CPU (_machine_key) is measured again.
    (Kills: I4 the settings out of the key, I7 the key of the settings' order, I8 the CPU out of the key.)"""
    calls = []
    inference.bf16_is_faster("torch", "1", loaded, 2, _quick(monkeypatch, calls))
    once = len(calls)
    reordered = copy.copy(loaded)
    reordered.config = dict(reversed(list(loaded.config.items())))
    assert list(reordered.config) != list(loaded.config)
    inference.bf16_is_faster("torch", "1", reordered, 2, _quick(monkeypatch, calls))
    assert len(calls) == once
    wider = copy.copy(loaded)
    wider.config = {**loaded.config, "base_channels": 2 * loaded.config["base_channels"]}
    inference.bf16_is_faster("torch", "1", wider, 2, _quick(monkeypatch, calls))
    assert len(calls) == 2 * once
    monkeypatch.setattr(inference, "_machine_key", lambda version: f"another-cpu-{version}")
    inference.bf16_is_faster("torch", "1", loaded, 2, _quick(monkeypatch, calls))
    assert len(calls) == 3 * once


# ---- the runners -----------------------------------------------------------------------------------------------------

def test_the_torch_runner_keeps_the_record_of_its_own_measurement(loaded, fresh_choices, monkeypatch):
    """PyTorch with precision auto where bf16 is native, measured for real (the tiny network, milliseconds): the runner
    holds the record of that measurement (bench's row), its answer the runner's precision; another thread count is
    another measurement. (Kills: T5 bf16_measured asked with another version, T9 the thread count out of the key.)"""
    import torch

    monkeypatch.setattr(inference, "torch_cpu_has_native_bf16", lambda: True)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = inference.TorchRunner(loaded, "cpu", "auto")
        torch.set_num_threads(2)
        two = inference.TorchRunner(loaded, "cpu", "auto")
    finally:
        torch.set_num_threads(threads)
    for runner, count in ((one, 1), (two, 2)):
        assert runner.measured is not None and runner.measured["threads"] == count
        assert runner.measured["bf16"] is runner.bf16
    assert len(list(fresh_choices.glob("torch-*.json"))) == 2


def test_openvino_asks_the_cache_with_its_own_thread_count(loaded, fresh_choices, monkeypatch):
    """Measured before for 3 threads (fp32 the faster): OpenVINO with 3 threads compiles fp32 alone; with 1 thread it
    is measured (both compiled). (Kills: O11 bf16_known asked for another thread count.)"""
    openvino = pytest.importorskip("openvino")
    inference.bf16_is_faster("openvino", openvino.__version__, loaded, 3, _quick(monkeypatch))
    native = inference._openvino_computes_bf16(inference._openvino_core())
    compile_, compiled = inference.OpenVinoRunner._compile, []

    def spied(core, path, precision, threads):
        compiled.append((precision, threads))
        return compile_(core, path, precision if native else "fp32", threads)

    monkeypatch.setattr(inference.OpenVinoRunner, "_compile", staticmethod(spied))
    monkeypatch.setattr(inference, "_openvino_computes_bf16", lambda core: True)
    monkeypatch.setattr(inference, "bf16_is_faster", lambda *measure: False)
    assert inference.OpenVinoRunner(loaded, "auto", threads=3).name == "openvino fp32"
    assert compiled == [("fp32", 3)]
    compiled.clear()
    inference.OpenVinoRunner(loaded, "auto", threads=1)
    assert sorted(compiled) == [("bf16", 1), ("fp32", 1)]


# ---- deepwml bench's row ---------------------------------------------------------------------------------------------

def test_the_bench_row_names_bf16_when_chosen_and_the_records_margin():
    """The row for a runner that kept bf16, from a record made with another margin (an earlier version's, kept in the
    cache): 'bf16: ... 8 ms in bf16, 20 ms in fp32 (bf16 kept only where 1.2x faster'. (Kills: B6 always fp32, B10 the
    margin written in rather than the record's.)"""
    from DeepWMLLib.bench import _precision_choice

    row = _precision_choice({"runner": "openvino bf16",
                             "precision_auto_ms": {"fp32": 20.0, "bf16": 8.0, "faster_by_needed": 1.2}})
    assert row.startswith("bf16: ") and "8 ms in bf16, 20 ms in fp32" in row and "where 1.2x faster" in row


# ---- rerun_precision -------------------------------------------------------------------------------------------------

@pytest.fixture
def native(monkeypatch):
    """Whether this CPU computes bf16 natively, as the test says (both runtimes)."""
    def set_(value):
        monkeypatch.setattr(inference, "torch_cpu_has_native_bf16", lambda: value)
        monkeypatch.setattr(inference, "_openvino_computes_bf16", lambda core: value)
    return set_


def _earlier(precision):
    return {"settings": {"precision": precision}}


def test_outputs_added_run_in_the_recorded_precision_only_for_auto(native):
    """Cases worked out by hand from the docstring: auto takes the earlier run's fp32 or bf16 (bf16 where it runs
    here); fp32 or bf16 asked stays as asked; a mixed or GPU precision recorded ("bf16+fp32", "fp16") or none leaves
    auto. (Kills: S1 the precision asked overridden, S3 any recorded precision passed on.)"""
    from DeepWMLLib.segment import rerun_precision

    native(True)
    assert rerun_precision("auto", _earlier("bf16"), "cpu", "torch") == "bf16"
    assert rerun_precision("auto", _earlier("fp32"), "cpu", "torch") == "fp32"
    assert rerun_precision("fp32", _earlier("bf16"), "cpu", "torch") == "fp32"
    assert rerun_precision("bf16", _earlier("fp32"), "cpu", "torch") == "bf16"
    for recorded in ("fp16", "bf16+fp32", None):
        assert rerun_precision("auto", _earlier(recorded), "cpu", "torch") == "auto", recorded
    assert rerun_precision("auto", {"threshold": 0.5}, "cpu", "torch") == "auto"  # a report before settings


def test_an_earlier_bf16_where_bf16_does_not_run_leaves_auto(native):
    """The earlier run's bf16 on a CPU without native bf16 (check_runtime refuses it): auto, not bf16 (refused by the
    runner: the case failed) nor fp32. (Kills: S4 check_runtime not asked, S5 fp32 where it refuses, S9 asked for the
    precision given rather than bf16.)"""
    from DeepWMLLib.segment import rerun_precision

    native(False)
    assert rerun_precision("auto", _earlier("bf16"), "cpu", "torch") == "auto"
    assert rerun_precision("auto", _earlier("fp32"), "cpu", "torch") == "fp32"  # fp32 runs everywhere
    assert rerun_precision("auto", _earlier("bf16"), "cpu", "onnx") == "auto"  # ONNX Runtime: fp32 alone


# ---- an OUTDIR's outline series and SEG; an outline folder the report does not list -----------------------------------

@pytest.fixture(scope="module")
def _outline_run(tmp_path_factory):
    """A DICOM FLAIR segmented once with --dicom-outline --dicom-seg (the tiny network), for the module."""
    from conftest import tiny_model_file
    from test_dicom_outline import oblique_flair

    tmp = tmp_path_factory.mktemp("mut51")
    folder, _ = oblique_flair(tmp)
    model = tiny_model_file(tmp / "tiny.pt")
    out = tmp / "out"
    assert main(["segment", str(folder), "-o", str(out), "--model", str(model), "--device", "cpu", "--dicom-outline",
                 "--dicom-seg", "--backend", "torch", "--precision", "fp32"]) == 0
    return folder, out, model


def test_an_outdir_with_an_outline_series_and_a_seg_is_the_earlier_runs_outputs(_outline_run, tmp_path, monkeypatch):
    """OUTDIR after --dicom-outline --dicom-seg given as INPUT: its one study is the outline series (listed by the
    report in the folder above its images) and the SEG (listed by the report beside it), so no study: the folder is
    called the earlier run's outputs. Each folder's reports are read once, not once per image (6 outline images).
    (Kills: E3 the SEG's own listing not asked, E6 the listing read again for every file.)"""
    import collections
    import shutil

    from DeepWMLLib import segment
    from test_dicom_outline import read_summary_error

    _, out, model = _outline_run
    given = tmp_path / "given"
    shutil.copytree(out, given)
    assert (given / "flair_wmh_seg.dcm").is_file() and len(list((given / "flair_outline_dicom").iterdir())) == 6
    asked, listed = collections.Counter(), segment._outputs_of_earlier_runs

    def counted(folder):
        asked[Path(folder).name] += 1
        return listed(folder)

    monkeypatch.setattr(segment, "_outputs_of_earlier_runs", counted)
    assert [case for case, _, study in segment.expand_inputs([str(given)]) if study is not None] == []
    assert asked["flair_outline_dicom"] == 1
    monkeypatch.setattr(segment, "_outputs_of_earlier_runs", listed)
    again = tmp_path / "again"
    assert main(["segment", str(given), "-o", str(again), "--model", str(model), "--device", "cpu"]) == 1
    error = read_summary_error(again)
    assert "holds only the outputs of an earlier DeepWML run (1 case(s): flair)" in error, error


def test_an_older_report_without_its_list_of_outputs_keeps_its_outline(_outline_run, tmp_path):
    """A report of a version before `outputs` (no list): its case's outline folder cannot be told from a user's, so it
    is taken as the case's, as before: the rerun asking --dicom-outline skips the case, no error.
    (Kills: L2 the list's absence not checked: 'in None' failed the case.)"""
    import csv
    import shutil

    folder, out, model = _outline_run
    mine = tmp_path / "out"
    shutil.copytree(out, mine)
    report = json.loads((mine / "flair_report.json").read_text(encoding="utf-8"))
    del report["outputs"]
    (mine / "flair_report.json").write_text(json.dumps(report), encoding="utf-8")
    assert main(["segment", str(folder), "-o", str(mine), "--model", str(model), "--device", "cpu", "--dicom-outline",
                 "--backend", "torch", "--precision", "fp32"]) == 0
    with open(mine / "summary.csv", newline="", encoding="utf-8-sig") as f:
        assert [(r["case"], r["status"]) for r in csv.DictReader(f)] == [("flair", "skipped")]


def test_an_outline_added_is_named_once(_outline_run, tmp_path):
    """A case done without --dicom-outline (its report lists no outline folder, none there), rerun with it: the outline
    is added, and the row names it once ('added flair_outline_dicom from the saved ...'), not twice (the folder both
    missing and 'not listed'). (Kills: L4 the unlisted-folder rule without 'exists': dicom_outline missing twice.)"""
    import csv
    import shutil

    folder, out, model = _outline_run
    mine = tmp_path / "out"
    shutil.copytree(out, mine)
    shutil.rmtree(mine / "flair_outline_dicom")
    report = json.loads((mine / "flair_report.json").read_text(encoding="utf-8"))
    report["outputs"].remove("flair_outline_dicom")
    del report["dicom_outline"]
    (mine / "flair_report.json").write_text(json.dumps(report), encoding="utf-8")
    assert main(["segment", str(folder), "-o", str(mine), "--model", str(model), "--device", "cpu", "--dicom-outline",
                 "--dicom-seg", "--backend", "torch", "--precision", "fp32"]) == 0
    with open(mine / "summary.csv", newline="", encoding="utf-8-sig") as f:
        (row,) = csv.DictReader(f)
    assert row["status"] == "added" and row["error"].startswith("added flair_outline_dicom from the saved "), row
    assert (mine / "flair_outline_dicom").is_dir()
