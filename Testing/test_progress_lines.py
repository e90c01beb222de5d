"""A warning or message said while a command's progress line is open on a terminal starts a line of its own, and
the progress line goes on whole below it (cli.say / cli.progress_line, one mechanism for every command)."""

from __future__ import annotations

import io as stdio
import sys
import warnings
from pathlib import Path

import pytest
import SimpleITK as sitk

from conftest import make_volume
from DeepWMLLib import cli


class Terminal(stdio.StringIO):
    def isatty(self):
        return True


def screen(text: str) -> list[str]:
    """The lines a terminal shows for `text`: a carriage return goes back to the line's start, and what is written
    then overwrites the characters there (ESC [K, which `deepwml train` writes, clears the rest of the line)."""
    lines, line, column = [], [], 0
    for char in text.replace("\033[K", "\0"):
        if char == "\0":
            del line[column:]
        elif char == "\n":
            lines.append("".join(line).rstrip())
            line, column = [], 0
        elif char == "\r":
            column = 0
        else:
            line[column:column + 1] = [char]
            column += 1
    lines.append("".join(line).rstrip())
    return [shown for shown in lines if shown]


def test_adapt_says_a_warning_on_a_line_of_its_own_while_reading_scans(tmp_path, monkeypatch):
    """`deepwml adapt`'s warnings landed on the end of its progress line ("reading scans 1/2deepwml adapt: warning:
    ...")."""
    from DeepWMLLib import adapt
    from test_adapt import _model_file, _scans

    slices, said = adapt._head_slices, []

    def warning_said(image, preprocessing):  # as a library says one while a scan is read
        said.append(len(said) + 1)
        warnings.warn(f"scan {said[-1]}'s warning")
        return slices(image, preprocessing)

    monkeypatch.setattr(adapt, "_head_slices", warning_said)
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert cli.main(["adapt", "--model", str(_model_file(tmp_path / "bn.pt")), "--crops-per-slice", "2",
                     "--scans", *map(str, _scans(tmp_path, 2)), "-o", str(tmp_path / "out")]) == 0
    shown = screen(terminal.getvalue())
    assert [line for line in shown if "'s warning" in line] == [
        "deepwml adapt: warning: scan 1's warning", "deepwml adapt: warning: scan 2's warning"], shown
    assert "reading scans 2/2" in shown


@pytest.mark.parametrize("debug", [[], ["--debug"]])
def test_segment_says_a_warning_on_a_line_of_its_own_while_its_bar_is_drawn(tmp_path, tiny_model, monkeypatch, debug):
    """`deepwml segment`: a warning said while a case's bar is drawn (a runtime's fallback, the model cache not
    writable, a GPU out of memory) started on the end of the bar's line; with --debug too (where it came from)."""
    from DeepWMLLib import segment

    image, _ = make_volume(size=(32, 32, 4))
    scan = tmp_path / "a.nii.gz"
    sitk.WriteImage(sitk.Cast(image, sitk.sitkUInt16), str(scan))
    read = segment.io.read_image

    def warning_said(*args, **kwargs):
        read_image = read(*args, **kwargs)
        warnings.warn("a runtime's fallback")
        return read_image

    monkeypatch.setattr(segment.io, "read_image", warning_said)
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert cli.main(["segment", str(scan), "-o", str(tmp_path / "out"), "--model", str(tiny_model),
                         "--device", "cpu", *debug]) == 0
    shown = screen(terminal.getvalue())
    said = [line for line in shown if line.endswith("a runtime's fallback")]
    assert said == ([f"{Path(__file__)}:{warning_said.__code__.co_firstlineno + 2}: UserWarning: a runtime's fallback"]
                    if debug else ["deepwml segment: warning: a runtime's fallback"]), shown
    assert [line for line in shown if line.startswith("a: ok - ")] and shown[-1].startswith("1/1 cases done")


def test_say_leaves_a_progress_line_whole_below_a_message_and_the_end_of_a_command_ends_it():
    terminal = Terminal()
    terminal.write("\rstep 3/10")
    cli.progress_line(terminal, "step 3/10")
    try:
        cli.say("a message", terminal)
        assert screen(terminal.getvalue()) == ["a message", "step 3/10"]
        cli.end_progress_line()
        terminal.write("next")
        assert screen(terminal.getvalue()) == ["a message", "step 3/10", "next"]
    finally:
        cli.progress_line(None, None)


def generate_warning_half_way(cases, output, seed, progress, **options):
    """deepwml synth's generator, standing in: a warning said half way through its progress."""
    progress(0.5, "case 1/2")
    warnings.warn("a background left out")
    progress(1.0, "case 2/2")
    return output / "manifest.csv"


def test_train_and_synth_progress_lines_go_on_below_a_warning(tmp_path, monkeypatch):
    """`deepwml train`'s bar (log lines were put above it, warnings were not) and `deepwml synth`'s line are open
    lines as segment's and adapt's are."""
    from DeepWMLLib.train import _Console

    console = _Console(Terminal())
    try:
        console(0.5, "epoch 1")
        warnings_line = "deepwml train: warning: a warning"
        cli.say(warnings_line, console.stream)
        assert screen(console.stream.getvalue()) == [warnings_line, f"[{'#' * 15}{'.' * 15}]  50.0% epoch 1"]
    finally:
        console.close()
    assert cli._open_line[0] is None

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)

    from DeepWMLLib import synth

    monkeypatch.setattr(synth, "generate_dataset", generate_warning_half_way)
    assert cli.main(["synth", "--cases", "2", "-o", str(tmp_path / "synthetic")]) == 0
    assert screen(terminal.getvalue()) == ["deepwml synth: warning: a background left out",
                                           f"[{'#' * 30}] case 2/2"]


def test_segment_debug_starts_a_failed_cases_traceback_on_a_line_of_its_own(tmp_path, tiny_model, monkeypatch):
    """`deepwml segment --debug`: a failed case's traceback began on the end of its bar's line ("[1/1] a |...| 0%
    reading the scan  Traceback (most recent call last):")."""
    from DeepWMLLib import segment

    image, _ = make_volume(size=(32, 32, 4))
    scan = tmp_path / "a.nii.gz"
    sitk.WriteImage(sitk.Cast(image, sitk.sitkUInt16), str(scan))

    def broken(*args, **kwargs):
        raise RuntimeError("a reader's fault")

    monkeypatch.setattr(segment.io, "read_image", broken)
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert cli.main(["segment", str(scan), "-o", str(tmp_path / "out"), "--model", str(tiny_model),
                     "--device", "cpu", "--debug"]) == 1
    shown = screen(terminal.getvalue())
    assert "Traceback (most recent call last):" in shown, shown
    assert shown[shown.index("Traceback (most recent call last):") - 1].startswith("[1/1] a |"), shown
    assert [line for line in shown if line.startswith("a: error - internal error: RuntimeError: a reader's fault")]


def test_synth_into_a_log_says_a_warning_without_blanking_its_line(tmp_path, monkeypatch):
    """`deepwml synth 2> log`: a warning said mid-run wrote a terminal's clearing (a carriage return, a line of
    blanks, another carriage return) and a copy of the progress line into the log, which is no terminal."""
    from DeepWMLLib import synth

    log = stdio.StringIO()
    monkeypatch.setattr(sys, "stderr", log)

    monkeypatch.setattr(synth, "generate_dataset", generate_warning_half_way)
    assert cli.main(["synth", "--cases", "2", "-o", str(tmp_path / "synthetic")]) == 0
    written = log.getvalue()
    assert "\r " not in written and written.count("case 1/2") == 1, repr(written)
    assert "deepwml synth: warning: a background left out\n" in written and written.endswith("case 2/2\n")
    assert cli._open_line[0] is None


def test_a_bar_drawn_by_another_thread_while_a_warning_is_said_waits_below_it():
    """A case's bar is drawn by reading_progress's ticker thread ("reading the scan (12 s)") while the main thread may
    say a warning: drawn between say's clearing and its message, the bar took the message on its end
    ("[1/1] a |...| reading the scan (12 s)deepwml segment: warning: ...") and was then drawn stale below it."""
    import threading

    from DeepWMLLib.segment import ProgressBar

    ticks = []

    class Ticking(Terminal):  # the ticker draws the bar just as the message is written
        def write(self, text):
            if "warning" in text and not ticks:
                ticks.append(threading.Thread(target=update, args=(0.1, "reading the scan (12 s)")))
                ticks[0].start()
                ticks[0].join(0.5)  # the other thread's turn, or waiting for say to end
            return super().write(text)

    terminal = Ticking()
    update = ProgressBar(terminal)(1, 1, "a")
    try:
        update(0.1, "reading the scan")
        cli.say("deepwml segment: warning: a runtime's fallback", terminal)
        ticks[0].join()
        shown = screen(terminal.getvalue())
        assert shown[0] == "deepwml segment: warning: a runtime's fallback", shown
        assert len(shown) == 2 and shown[1].startswith("[1/1] a |") and shown[1].endswith("reading the scan (12 s)"), \
            shown
    finally:
        cli.progress_line(None, None)
