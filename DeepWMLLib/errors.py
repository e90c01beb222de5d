"""The one exception type for problems a user can cause and fix."""

from __future__ import annotations

import sys


class DeepWMLError(Exception):
    """A bad input, file or setting. The message says what is wrong and what to do.

    The CLI prints it on one line and exits non-zero; the Slicer module shows it in a dialog.
    """


class UsageError(DeepWMLError):
    """Options that cannot go together, or a missing one: the command line exits 2, as argparse does."""


class Cancelled(Exception):
    """Raised when a cancel check returns True during a long operation."""


def torch_missing(exc: BaseException) -> str | None:
    """What to do when `exc` is PyTorch missing from this Python (it reads model files, exports them for the
    faster runtimes and runs them where no exported copy is cached), else None. It was reported as an internal
    error (ModuleNotFoundError), which says neither what is missing nor how to get it."""
    if isinstance(exc, ModuleNotFoundError) and (exc.name or "").split(".")[0] == "torch":
        return (f"PyTorch is not installed in this Python ({sys.executable}); DeepWML needs it to read "
                "model files and to train: install it (pip install torch==2.13.0, as README's set-up does; in Slicer the "
                "module offers to install it through PyTorch Utils)")
    return None


def case_error(exc: BaseException) -> str:
    """One line saying why a case failed: a DeepWMLError's own message, PyTorch missing said so, anything else
    an internal error."""
    if isinstance(exc, DeepWMLError):
        return str(exc)
    return torch_missing(exc) or f"internal error: {type(exc).__name__}: {exc}"
