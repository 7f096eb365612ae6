"""The one exception type for mistakes in a user's input.

The command line prints a `UserError` as one line and exits non-zero; any other exception is a bug and keeps its
traceback. It subclasses `ValueError` so that code catching bad values keeps working.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input from the user (an option, a file, a config key): reported in one line, without a traceback."""
