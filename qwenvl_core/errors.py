"""Error types raised by qwenvl_core for user-facing problems.

Every error names the problem and where it is (a file, a field, a preset name), so callers (the CLI, the REST
API) can show the message unchanged. All derive from ``QwenVLError`` (a ``ValueError``), so a caller can catch
user mistakes in one place and never turn them into a crash.
"""

from __future__ import annotations


class QwenVLError(ValueError):
    """Base class of user-facing errors: bad input, not a bug."""


class ConfigError(QwenVLError):
    """A model config is invalid or inconsistent (field, value and file named in the message)."""


class PresetError(QwenVLError):
    """An unknown model preset was asked for."""


class ModelLoadError(QwenVLError):
    """A model directory cannot be loaded (missing files, missing or unexpected weights, shape mismatch)."""


class TokenizerError(QwenVLError):
    """A tokenizer file is missing or malformed."""


class ImageError(QwenVLError):
    """An image cannot be used: unreadable, corrupt, unsupported, or over a size limit."""


class PromptError(QwenVLError):
    """A conversation or prompt cannot be encoded (bad role, malformed image or box markup)."""
