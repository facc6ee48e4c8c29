"""The zoo's own error type for problems in what the user gave it (files, configs, checkpoints).

The ``zoo`` command prints a ``ZooError`` as one paragraph (what is wrong, where, what to do) and exits with
status 2, with no traceback unless ``ZOO_DEBUG=1``. Anything else is a bug and keeps its traceback.
``ZooError`` is a ``ValueError`` and ``MissingFileError`` also a ``FileNotFoundError``, so code that catches
the built-in types keeps working.
"""

from __future__ import annotations

__all__ = ["MissingFileError", "ZooError"]


class ZooError(ValueError):
    """Bad input: the message names the file (and line or key) and says what to do."""


class MissingFileError(ZooError, FileNotFoundError):
    """A file or folder the user named does not exist."""
