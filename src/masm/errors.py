"""User-facing errors.

Everything a user can get wrong (a path, a key, a config value, a file) raises :class:`MasmError` with a
message that names the file or key. The command line prints such errors as one line and exits non-zero;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class MasmError(Exception):
    """An error caused by input, configuration or environment, with a message meant for the user."""


class ConfigError(MasmError):
    """An unknown key, a wrong type or an invalid value in a configuration."""


class CheckpointError(MasmError):
    """A checkpoint directory that is missing, tampered with, truncated or does not fit the model."""


class DataError(MasmError):
    """A dataset index, layout or file that cannot be read as specified."""
