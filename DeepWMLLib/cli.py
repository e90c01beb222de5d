"""The `deepwml` command line: thin argument parsing over the DeepWMLLib API.

Each sub-command lives next to the code it drives: a module listed in `_COMMAND_MODULES` exposes
`register(subparsers)`, which adds its parser and sets `func(args) -> int` as the handler. Those
modules must not import torch at import time, so `deepwml --help` and the metrics commands start fast.

Exit codes: 0 success, 1 a case or input failed (a one-line message on stderr), 2 usage error, 130 when
interrupted (Ctrl-C), 128 + the signal's number when stopped by SIGTERM or SIGHUP (a scheduler's time limit,
`timeout`, a closed ssh session) or, on Windows, SIGBREAK (Ctrl-Break), which clean up as Ctrl-C does.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import shutil
import signal
import sys
import threading
import warnings
from typing import Sequence

from . import __version__
from .errors import Cancelled, DeepWMLError, UsageError, torch_missing

_COMMAND_MODULES = {
    "segment": "DeepWMLLib.segment",
    "evaluate": "DeepWMLLib.evaluation",
    "consensus": "DeepWMLLib.consensus",
    "synth": "DeepWMLLib.synth",
    "train": "DeepWMLLib.train",
    "bench": "DeepWMLLib.bench",
    "adapt": "DeepWMLLib.adapt",
    "change": "DeepWMLLib.change",
    "export": "DeepWMLLib.export",
}


def _distributed_process() -> tuple[str | None, bool]:
    """(this process's rank, whether it stays quiet about input and usage errors) under torchrun;
    (None, False) otherwise.

    The processes of one node read the same options and files and meet the same input error, so
    only the node's first process (LOCAL_RANK 0) says it, and a process other than rank 0 names
    itself. An error rank 0 met and shared with every process (`DeepWMLError.from_rank_0`) is said
    by rank 0 alone; one a process met alone (`DeepWMLError.this_process_only`: its partner gone) by that process."""
    if os.environ.get("WORLD_SIZE", "1") in ("", "0", "1"):
        return None, False
    return os.environ.get("RANK", "0"), os.environ.get("LOCAL_RANK", "0") != "0"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # usage errors: one line, exit 2
        # named after the sub-command whose option it is (`deepwml segment`), as the errors main() prints
        # are: a bare `deepwml --help` lists the commands, not the option the message is about
        rank, quiet = _distributed_process()
        where = f" (process {rank})" if rank not in (None, "0") else ""
        self.exit(2, "" if quiet else f"{self.prog}{where}: error: {message} (see {self.prog} --help)\n")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; with `command`, only that sub-command's module is imported (fast start-up)."""
    parser = _Parser(prog="deepwml", description="White matter hyperintensity segmentation on FLAIR MRI.")
    parser.add_argument("--version", action="version", version=f"deepwml {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    parser.commands = subparsers.choices  # for main(): an unknown option is the sub-command's error
    names = [_COMMAND_MODULES[command]] if command in _COMMAND_MODULES else _COMMAND_MODULES.values()
    for name in names:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:  # a missing dependency inside an existing module is a real error
                raise
            continue
        module.register(subparsers)
    return parser


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be 0 or more (and finite), got {text}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a number > 0."""
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
    return value


def open_unit_interval(text: str) -> float:
    """argparse type: a number strictly between 0 and 1 (a probability threshold)."""
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (exclusive), got {text}")
    return value


def number_in(low: float, high: float, kind=float, low_open: bool = False):
    """argparse type: a `kind` number from `low` to `high` (above `low` when `low_open`)."""
    def parse(text: str):
        value = kind(text)
        if not ((low < value) if low_open else (low <= value)) or not value <= high:
            bound = (f"above {low:g}" if low_open else f"at least {low:g}") if high == float("inf") else (
                f"above {low:g} and at most {high:g}" if low_open else f"from {low:g} to {high:g}")
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its own messages
    return parse


def unit_interval(text: str) -> float:
    """argparse type: a number in [0, 1]."""
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def help_path(path) -> str:
    """`path` for an argparse help text, which is %-formatted: a % in it (a folder named "100%") broke --help."""
    return str(path).replace("%", "%%")


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")


# The progress line open on a terminal now (drawn with "\r" and no newline yet, rewritten in place): its stream and
# text, or None. A warning or message said meanwhile (a runtime's fallback, a scan skipped) landed on the end of it.
_open_line: list = [None, ""]
# Held while the line is drawn and while say clears and draws it again: a bar is drawn by another thread too
# (segment.reading_progress's ticker), and drawn between say's clearing and its message it took the message on its end.
_line_lock = threading.RLock()


def progress_line(stream, text: str | None, drawn: str = "") -> None:
    """Write `drawn` on the terminal `stream` (every command's progress display draws its line here: "\r" and the
    line, or what ends or clears it) and record `text` as the progress line now open there; None: the line was
    ended or cleared."""
    with _line_lock:
        if drawn:
            stream.write(drawn)
            stream.flush()
        _open_line[:] = [stream, text] if text else [None, ""]


def end_progress_line() -> None:
    """End a progress line left open on the terminal (progress_line), so that what is said next (the command's
    error, or the shell's prompt) starts a line of its own."""
    with _line_lock:
        if _open_line[0] is not None:
            progress_line(_open_line[0], None, "\n")


def say(text: str, file=None) -> None:
    """Print `text` as a line of its own: a progress line open on the terminal (progress_line) is cleared first
    and drawn again below it, so that the bar goes on, whole, after the message."""
    with _line_lock:
        stream, line = _open_line
        if stream is not None:
            width = min(len(line), max(1, shutil.get_terminal_size((80, 24)).columns - 1))
            stream.write("\r" + " " * width + "\r")
            stream.flush()
        print(text, file=file or sys.stderr, flush=True)
        if stream is not None:
            stream.write(line)
            stream.flush()


def warning_printer(name: str, debug: bool = False):
    """A `warnings.showwarning` that says a warning as one line, "NAME: warning: ..." (`debug`: where it came from,
    as Python says it), and never on the end of a progress line (say): `deepwml` and the Slicer batch script alike."""
    def said(message, category, filename, lineno, file=None, line=None):
        say(warnings.formatwarning(message, category, filename, lineno, line).rstrip() if debug
            else f"{name}: warning: {message}", file)

    return said


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised as Ctrl-C's KeyboardInterrupt is, so that the same clean-up runs."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _stop(signum, frame):
    raise Stopped(signum)


def _catch_stop_signals() -> dict:
    """Handle SIGTERM, SIGHUP and (Windows) SIGBREAK as Ctrl-C (only the main thread may); returns the
    handlers replaced."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    replaced = {}
    for name in ("SIGTERM", "SIGHUP", "SIGBREAK"):  # SIGBREAK: Ctrl-Break in a Windows console
        number = getattr(signal, name, None)
        if number is not None and signal.getsignal(number) in (signal.SIG_DFL, None):
            replaced[number] = signal.signal(number, _stop)
    return replaced


@contextlib.contextmanager
def stop_signals_as_interrupts():
    """Inside, SIGTERM, SIGHUP and SIGBREAK stop the run as Ctrl-C does (Stopped), its handlers given back after:
    `deepwml` and the Slicer batch script alike."""
    replaced = _catch_stop_signals()
    try:
        yield
    finally:
        for number, handler in replaced.items():
            signal.signal(number, handler)


def interruption(exc: KeyboardInterrupt) -> tuple[str, int]:
    """What a run stopped by Ctrl-C or a stop signal (Stopped) says of it, and its exit status: 'interrupted' and
    130, or 'stopped by SIGTERM' and 128 + the signal's number, as a shell reports a process the signal ended."""
    if isinstance(exc, Stopped):
        return f"stopped by {signal.Signals(exc.signum).name}", 128 + exc.signum
    return "interrupted", 130


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv[0] if argv else None)
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # named after the sub-command (`deepwml segment: error: unrecognized arguments: --thread 2`)
        commands = getattr(parser, "commands", None) or {}
        commands.get(getattr(args, "command", None), parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    shown = warnings.showwarning
    warnings.showwarning = warning_printer(f"deepwml {args.command}", getattr(args, "debug", False))
    # Under torchrun: see _distributed_process. An unexpected fault may be one process's own, so every
    # process reports it, naming itself.
    rank, quiet = _distributed_process()
    where = f" (process {rank})" if rank not in (None, "0") else ""
    from . import io  # (every command's module imported it already)

    try:
        # a DICOM folder's headers read once in the run however often its series are asked for (io's cache, kept
        # while the folder is unchanged)
        with stop_signals_as_interrupts(), io.dicom_headers_read_once():
            try:
                return int(args.func(args) or 0)
            finally:
                end_progress_line()
    except UsageError as exc:
        if not quiet:
            print(f"deepwml {args.command}{where}: error: {exc} (see deepwml {args.command} --help)", file=sys.stderr)
        return 2
    except DeepWMLError as exc:
        if getattr(args, "debug", False):
            raise
        if not ((quiet and not getattr(exc, "this_process_only", False))
                or (where and getattr(exc, "from_rank_0", False))):
            print(f"deepwml {args.command}{where}: error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # the output went into a pipe whose reader stopped (| head): nothing to say
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        except (OSError, ValueError, AttributeError):
            pass
        return 141  # 128 + SIGPIPE, as a command killed by the closed pipe would end
    except Cancelled:
        print(f"deepwml {args.command}: cancelled", file=sys.stderr)
        return 130
    except KeyboardInterrupt as exc:  # Ctrl-C, or a stop signal (Stopped)
        words, status = interruption(exc)
        print(f"deepwml {args.command}: {words}", file=sys.stderr)
        return status
    except Exception as exc:  # an unexpected fault still gets one line; --debug shows where
        if getattr(args, "debug", False):
            raise
        missing = torch_missing(exc)
        if missing:
            print(f"deepwml {args.command}{where}: error: {missing}", file=sys.stderr)
            return 1
        where = f" (process {rank})" if rank is not None else ""  # rank 0 named too: every process reports
        print(f"deepwml {args.command}{where}: internal error: {type(exc).__name__}: {exc} "
              "(rerun with --debug and report it)", file=sys.stderr)
        return 1
    finally:
        warnings.showwarning = shown


# Commands that only read and write files: after their outputs are closed, the process ends at once
# instead of tearing the interpreter down (freeing every module of numpy, SimpleITK and ONNX Runtime
# takes 0.1 s, a tenth of a whole segmentation on a small CPU).
_QUICK_EXIT = frozenset({"segment", "evaluate", "consensus", "export"})


# True in a process started as the `deepwml` command (run() below), which owns the whole process;
# False when DeepWMLLib is used as a library (e.g. inside Slicer). See inference._import_openvino.
OWN_PROCESS = False


def run(argv: Sequence[str] | None = None) -> None:
    """The `deepwml` console entry point."""
    global OWN_PROCESS
    OWN_PROCESS = True
    argv = list(sys.argv[1:] if argv is None else argv)
    code = main(argv)
    if argv and argv[0] in _QUICK_EXIT:
        inference = sys.modules.get("DeepWMLLib.inference")
        if inference is not None:  # os._exit runs no atexit handler
            inference.remove_process_folder()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    # `python -m DeepWMLLib.cli` runs this file as __main__; the package's own module is the one the
    # rest of DeepWML sees (OWN_PROCESS), so run through it
    from DeepWMLLib import cli

    cli.run()
