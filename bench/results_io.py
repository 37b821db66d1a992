"""How every bench writes its figures: ``STEM.json`` first (the measurements are kept even if the
table fails to render), then ``STEM.md`` from it, and the table on stdout."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path


def write_results(out: Path, stem: str, report: dict, markdown: Callable[[dict], str]) -> str:
    """Writes ``out/STEM.json`` and ``out/STEM.md`` (``markdown(report)``), prints the table and where
    it went (with ``report["wall_s"]`` when the bench timed itself); returns the table."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    md = markdown(report)
    (out / f"{stem}.md").write_text(md)
    print(md)
    took = f" ({report['wall_s']:.0f} s)" if isinstance(report.get("wall_s"), (int, float)) else ""
    print(f"written: {out / stem}.json, .md{took}")
    return md
