"""The one error hierarchy of bim-export.

The library raises these; only ``cli.py`` catches :class:`BimExportError`, prints its one-line
message prefixed with ``error:`` and exits with :attr:`BimExportError.exit_code`. Any other
exception is a bug and keeps its traceback (exit 1).

The root and the two errors a device can meet (:class:`InputError`, :class:`ValidationError`) are
defined in :mod:`bim_export.runtime.errors`, so that the device runtime raises these very classes
without importing the rest of the package; this module adds the others.
"""

from __future__ import annotations

from ..runtime.errors import BimExportError, InputError, ValidationError

__all__ = ["BimExportError", "InputError", "NoCandidateError", "ValidationError", "TrainingError", "close_matches"]


class NoCandidateError(BimExportError):
    """No depth x precision meets the device's budgets (exit 3).

    Attributes:
        table: the rendered candidate table, printed on stdout by the CLI.
    """

    exit_code = 3

    def __init__(self, message: str, table: str = ""):
        super().__init__(message)
        self.table = table


class TrainingError(BimExportError):
    """Training cannot go on: non-finite loss, resume from another architecture (exit 2)."""

    exit_code = 2


LISTED_NAMES = 30  # an error line lists every valid name up to this many, else only the closest


def close_matches(name: str, valid: list[str], n: int = 3, what: str = "") -> str:
    """Formats ``valid`` names for an error line, close matches to ``name`` first.

    A short list is given whole; of a long one (timm's ViTs), only the ``n`` closest names, and
    how many there are of ``what``.
    """
    import difflib

    close = difflib.get_close_matches(name, valid, n=n, cutoff=0.5)
    if len(valid) <= LISTED_NAMES:
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        return f"valid: {', '.join(sorted(valid))}{hint}"
    closest = close or difflib.get_close_matches(name, valid, n=n, cutoff=0.0)
    return f"closest: {', '.join(closest)} (of {len(valid)}{' ' + what if what else ''})"
