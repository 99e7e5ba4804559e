"""Exceptions raised for bad user input.

Every error that a user can cause through a config or the command line is a
:class:`ClusterlightError` with a one-line message. The console script prints
that line (``error: ...``) and exits with status 2 instead of a traceback.
"""


class ClusterlightError(ValueError):
    """Bad input: a wrong option, a missing file, an unusable dataset or checkpoint."""
