"""The package's shape: the map in bim_export/__init__.py lists every module, and imports run one way.

Imports inside functions count too: a lazy import is still an arrow between two modules.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import bim_export

ROOT = Path(bim_export.__file__).parent


def _modules() -> dict[str, Path]:
    """Every module of the package by dotted name relative to it (``train.model``); packages by
    their own name (``deploy.latency``)."""
    out = {}
    for p in ROOT.rglob("*.py"):
        parts = p.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if name:
            out[name] = p
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules ``name`` imports (anywhere in the file)."""
    pkg = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[:len(pkg) - node.level + 1] + (node.module.split(".") if node.module else [])
            elif node.module and node.module.split(".")[0] == "bim_export":
                base = node.module.split(".")[1:]
            else:
                continue
            targets = [".".join(base + [a.name]) for a in node.names] + [".".join(base)]
        elif isinstance(node, ast.Import):
            targets = [a.name.removeprefix("bim_export.") for a in node.names if a.name.startswith("bim_export.")]
        found |= {t for t in targets if t in known and t != name}
    return found


def _map_order() -> list[str]:
    """The modules in the order bim_export/__init__.py's map lists them."""
    order = []
    for line in (bim_export.__doc__ or "").splitlines():
        m = re.match(r"^ {0,4}([a-z_.]+) {2,}(.*)$", line)
        if not m:
            continue
        name, text = m.groups()
        order.append(name)
        if name == "deploy.latency":  # its submodules, in the order its line gives
            order += [f"deploy.latency.{w}" for w in re.findall(r"[a-z_]+", text)]
    return order


def test_the_map_lists_every_module_once():
    listed = _map_order()
    packages = {"train", "deploy"}
    assert len(listed) == len(set(listed))
    assert set(listed) | packages == set(_modules())


def test_every_import_points_up_the_map():
    order = {name: i for i, name in enumerate(_map_order())}
    modules = _modules()
    known = set(modules)
    wrong = []
    for name, path in modules.items():
        if name in ("train", "deploy", "deploy.latency"):  # package docstrings only
            continue
        for target in _imports(name, path, known):
            if target in ("train", "deploy"):
                continue
            if order.get(target, -1) >= order[name]:
                wrong.append(f"{name} -> {target}")
    assert wrong == []


def test_train_and_deploy_never_import_each_other_and_the_bridge_neither():
    modules = _modules()
    known = set(modules)
    wrong = []
    for name, path in modules.items():
        half = name.split(".")[0] if "." in name else "bridge"
        for target in _imports(name, path, known):
            other = target.split(".")[0] if "." in target or target in ("train", "deploy") else "bridge"
            if other != "bridge" and other != half and name != "cli":
                wrong.append(f"{name} -> {target}")
    assert wrong == []
