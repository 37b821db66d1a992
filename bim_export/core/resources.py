"""Where the files that ship with bim-export live.

In a wheel, ``profiles/``, ``targets/`` and ``assets/`` sit inside the package; in a source
checkout (editable install) ``profiles/`` and ``targets/`` sit at the top of the repository.
"""

from __future__ import annotations

import os
from pathlib import Path

_PKG = Path(__file__).resolve().parent.parent  # bim_export/, this file being bim_export/core/resources.py


def resource_dir(name: str) -> Path:
    """Returns the directory of shipped resource ``name`` (profiles, targets, assets)."""
    for candidate in (_PKG / name, _PKG.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"bim-export resource folder '{name}' is missing from the installation")


def shipped_roots() -> list[Path]:
    """The folders whose files ship with bim-export (the package, ``profiles/``, ``targets/``),
    resolved. Every command treats them as read-only."""
    roots = [_PKG]
    for name in ("profiles", "targets"):
        try:
            roots.append(resource_dir(name))
        except FileNotFoundError:
            pass
    return [Path(os.path.realpath(r)) for r in roots]


def default_checkpoint_dir() -> Path:
    """The BIM checkpoint that ships with the package (used when no --checkpoint is given)."""
    return resource_dir("assets") / "default_checkpoint"


def sample_images_dir() -> Path:
    """The real photo crops that ship with the package (demo, calibration, tests)."""
    return resource_dir("assets") / "sample_images"


def heldout_images_dir() -> Path:
    """Real photo crops of photos no sample image comes from: the default checkpoint's evaluation set."""
    return resource_dir("assets") / "heldout_images"
