"""Plain-text tables: the one formatter of every table the CLI prints (pure Python)."""

from __future__ import annotations

from collections.abc import Sequence


def format_table(head: Sequence[str], rows: Sequence[Sequence[object]], *, align: str = "",
                 rule: bool = False) -> str:
    """Columns two spaces apart, each as wide as its widest cell, trailing spaces stripped.

    Args:
        head: the column titles.
        rows: one sequence of cells per row (converted with ``str``).
        align: ``l`` or ``r`` per column (default: every column left-aligned).
        rule: underline the head with dashes.
    """
    lines = [[str(c) for c in head], *([str(c) for c in r] for r in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    align = align.ljust(len(head), "l")

    def render(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if a == "r" else c.ljust(w) for c, w, a in zip(cells, widths, align)).rstrip()

    out = [render(lines[0])]
    if rule:
        out.append(render(["-" * w for w in widths]))
    return "\n".join(out + [render(cells) for cells in lines[1:]])
