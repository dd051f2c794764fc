"""The error every reader raises for a bad data file: always names the file (and the line / row)."""

from __future__ import annotations


class DataError(ValueError):
    """A data file that is missing, unreadable, truncated, corrupt or holds invalid values.

    The message starts with the file's path (``path:line`` for TSV lines, ``path: row N`` for
    binary rows). A ``ValueError``, so code that caught the readers' ``ValueError`` still does.
    """
