"""The one base class of errors a user can act on.

A launcher catches `UserError` (and only it) and prints its message as one line with a
non-zero exit; anything else is an internal bug and keeps its traceback. So every error
raised for bad input, a bad flag, a changed source, a full disk or a missing file derives
from it, and its message names the flag or file and says what to do.
"""

from __future__ import annotations


class UserError(Exception):
    """An error caused by the user's input or environment, with a message saying what to do."""
