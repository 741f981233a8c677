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


class SettingsError(ConfigError):
    """Values of named settings that are invalid, alone (out of range) or together (contradicting each
    other, e.g. making a requested mechanism a no-op).

    ``keys`` are dotted paths relative to the config dataclass that raised it; the config loader
    (:func:`masm.config.from_dict`) puts that dataclass's own path in front, so the message names the keys
    as a user writes them (``'method.masm.semantic_guard'``)."""

    def __init__(self, keys: list[str] | tuple[str, ...], reason: str):
        self.keys, self.reason = tuple(keys), reason
        super().__init__(f"{', '.join(repr(key) for key in self.keys)}: {reason}")

    def within(self, where: str) -> SettingsError:
        """The same error, its keys inside the config at dotted path ``where``."""
        return SettingsError([f"{where}.{key}" for key in self.keys], self.reason) if where else self


class CheckpointError(MasmError):
    """A checkpoint directory that is missing, tampered with, truncated or does not fit the model."""


class DataError(MasmError):
    """A dataset index, layout or file that cannot be read as specified."""
