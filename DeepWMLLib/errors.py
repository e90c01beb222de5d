"""The one exception type for problems a user can cause and fix."""


class DeepWMLError(Exception):
    """A bad input, file or setting. The message says what is wrong and what to do.

    The CLI prints it on one line and exits non-zero; the Slicer module shows it in a dialog.
    """


class UsageError(DeepWMLError):
    """Options that cannot go together, or a missing one: the command line exits 2, as argparse does."""


class Cancelled(Exception):
    """Raised when a cancel check returns True during a long operation."""
