"""A shipped profile copied to a YAML file of its own with some fields changed (the file's stem is
the copy's canonical name)."""

from __future__ import annotations

from pathlib import Path

import yaml

from bim_export.core.resources import resource_dir


def profile_copy(folder: Path, base: str, name: str | None = None, **changes) -> Path:
    """``profiles/<base>.yaml`` with ``changes`` applied, written to ``folder/<name>.yaml``
    (default name: ``<base>-test``); returns its path."""
    data = yaml.safe_load((resource_dir("profiles") / f"{base}.yaml").read_text())
    data.update(changes)
    path = Path(folder) / f"{name or base + '-test'}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path
