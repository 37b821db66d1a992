"""The root of bim-export's error hierarchy and the errors a device can meet (standard library only).

:mod:`bim_export.core.errors` re-exports these with the rest of the hierarchy; the device runtime
raises them itself, so a bundle's validator exits with the same codes as ``bim-export validate``.
"""

from __future__ import annotations


class BimExportError(Exception):
    """Base class of every expected failure. The message is one line naming file/field/value."""

    exit_code = 2


class InputError(BimExportError):
    """Bad input or usage: a broken file, an unknown name, a value out of range (exit 2).

    Attributes:
        field: the setting at fault, where the raiser knows it but not where the value came from
            (a model given ``exits`` cannot tell a YAML file from a flag); the caller that knows
            names the source.
    """

    exit_code = 2

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class ValidationError(BimExportError):
    """A finished export failed parity or latency validation (exit 4)."""

    exit_code = 4
