"""Profiles as text: the table of shipped profiles, one profile as YAML, budgets in a line."""

from __future__ import annotations

from typing import Any

import yaml

from ..core.table import format_table
from .profiles import Profile, aliases_of, list_profiles, load_profile


def format_profile_list() -> str:
    """A table of the shipped profiles: name, aliases, class, EPs, precisions, budgets."""
    rows = []
    for name in list_profiles():
        p = load_profile(name)
        eps = ",".join(ep.removesuffix("ExecutionProvider") for ep in p.execution_providers)
        rows.append((name, ",".join(aliases_of(name)) or "-", p.device_class, eps, ",".join(p.precisions),
                     p.batch, describe_budgets(p.budgets.model_dump(), short=True) + (" (measured)" if p.measured else "")))
    return format_table(("name", "aliases", "class", "execution providers", "precisions", "batch", "budgets"), rows)


def describe_budgets(budgets: dict[str, Any], short: bool = False) -> str:
    """The budgets of a profile (``Budgets.model_dump()``) in a line: ``latency p90 <= 8 ms, peak
    memory <= 1024 MB, model size <= 64 MB``, or with ``short`` ``p90 <= 8 ms, mem <= 1024 MB, size <= 64 MB``."""
    names = ("", "mem", "size") if short else ("latency ", "peak memory", "model size")
    parts = []
    if budgets.get("latency_ms") is not None:
        parts.append(f"{names[0]}{budgets.get('latency_stat', 'p90')} <= {budgets['latency_ms']:g} ms")
    if budgets.get("peak_memory_mb") is not None:
        parts.append(f"{names[1]} <= {budgets['peak_memory_mb']:g} MB")
    if budgets.get("model_size_mb") is not None:
        parts.append(f"{names[2]} <= {budgets['model_size_mb']:g} MB")
    return ", ".join(parts) or "none"


def format_profile(profile: Profile) -> str:
    """The profile as YAML, with its canonical name, aliases and source file first."""
    data = profile.model_dump(mode="json")
    head = {"name": data.pop("name"), "aliases": aliases_of(profile.name)}
    if profile.path is not None:
        head["file"] = str(profile.path.resolve())
    return yaml.safe_dump({**head, **data}, sort_keys=False, default_flow_style=None, width=100).rstrip()
