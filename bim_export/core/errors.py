"""The one error hierarchy of bim-export.

The library raises these; only ``cli.py`` catches :class:`BimExportError`, prints its one-line
message prefixed with ``error:`` and exits with :attr:`BimExportError.exit_code`. Any other
exception is a bug and keeps its traceback (exit 1).
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


class NoCandidateError(BimExportError):
    """No depth x precision meets the device's budgets (exit 3).

    Attributes:
        table: the rendered candidate table, printed on stdout by the CLI.
    """

    exit_code = 3

    def __init__(self, message: str, table: str = ""):
        super().__init__(message)
        self.table = table


class ValidationError(BimExportError):
    """A finished export failed parity or latency validation (exit 4)."""

    exit_code = 4


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
