"""The candidate table as text: one row per candidate with its figures, status and reason, and under
it what the quality column is and which set scored it. Pure Python.
"""

from __future__ import annotations

import math
from typing import Any, Optional

from ..core.table import format_table

# What the quality column can be, as the table, report.md, pareto.png and the manifest name it.
QUALITY_LABELS = {"task_top1": "held-out task top-1 (fine-tuned)", "knn_top1": "kNN top-1"}


def quality_label(metric: str) -> str:
    """How the table, report.md, pareto.png and the manifest name a quality metric."""
    return QUALITY_LABELS.get(metric, "exit depth (deeper is better)" if metric == "depth" else metric)


def num(x: Optional[float]) -> str:
    """A figure as the table shows it (3 significant digits; ``-`` for none)."""
    if x is None or math.isinf(x):
        return "-"
    return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"


def candidate_table(rows: list[Any], quality_metric: str = "knn_top1", quality_source: str | None = None) -> str:
    """A plain-text table of candidate rows; under it, what the quality column is and which set scored it."""
    head = ("depth", "precision", "quality", "parity", "latency ms", "source", "memory MB", "size MB",
            "status", "reason")
    # the checkpoint and resolution columns only where the run has more than one of them
    axes = [(name, axis) for name, axis in (("checkpoint", "checkpoint"), ("px", "resolution"))
            if any(getattr(r.candidate, axis) for r in rows)]
    lines = []
    for r in rows:
        c = r.candidate
        quality = "-" if c.quality is None else f"{c.quality:.1%}"
        latency = num(c.latency_ms)
        if c.latency_ms is not None:
            latency = f"{latency} {c.latency_stat}"
            if c.expected_error is not None:
                latency += f" ±{c.expected_error:.0%}"
        lines.append((*(str(getattr(c, axis)) for _, axis in axes), str(c.depth), c.precision, quality,
                      "ok" if c.parity_passed else "FAIL", latency, c.latency_source, num(c.memory_mb),
                      num(c.size_mb), r.status, r.reason))
    out = format_table((*(name for name, _ in axes), *head), lines)
    if quality_metric == "depth":
        out += "\nquality: no top-1 figure for every depth, so deeper is better"
    else:
        out += (f"\nquality: the exit's {quality_label(quality_metric)} on "
                f"{quality_source or 'an evaluation set metrics.json does not name'}")
    return out
