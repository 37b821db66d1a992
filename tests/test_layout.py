"""The package's shape: the map in bim_export/__init__.py lists every module, and imports follow it.

The map names the folders (``runtime/``, ``core/``, ``model/``, ``train/``, ``deploy/``) and ``cli``
bottom up, each with the folders it uses; a module imports only modules of its own folder listed
above it and modules of the folders its folder uses. Imports inside functions count too: a lazy
import is still an arrow between two modules.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

import bim_export

ROOT = Path(bim_export.__file__).parent
REPO = ROOT.parent
# What a device has besides the standard library: the runtime may import these and nothing else.
RUNTIME_THIRD_PARTY = {"numpy", "onnxruntime", "PIL"}
# The optional HTTP framework of a served bundle, imported lazily by these runtime modules only.
SERVING_THIRD_PARTY, SERVING_MODULES = {"starlette", "uvicorn"}, {"serve.py"}


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


def _map() -> tuple[list[str], dict[str, set[str]]]:
    """The modules in the order bim_export/__init__.py's map lists them, and the folders each folder
    uses. A folder line is ``name/  purpose`` (``cli`` is a folder of its own), the line below it
    ``uses: a, b`` (or ``uses: nothing else``), its modules indented by four."""
    order, uses, folder = [], {}, None
    for line in (bim_export.__doc__ or "").splitlines():
        if m := re.match(r"^([a-z_]+)/? {2,}\S", line):
            folder = m.group(1)
            order.append(folder) if folder == "cli" else None
            uses[folder] = set()
        elif m := re.match(r"^ +uses: (.*)$", line):
            named = m.group(1).split(";")[0]
            uses[folder] = set() if named.startswith("nothing") else {u.strip() for u in named.split(",")}
        elif m := re.match(r"^ {4}([a-z_]+) {2,}(.*)$", line):
            name, text = f"{folder}.{m.group(1)}", m.group(2)
            order.append(name)
            if name == "deploy.latency":  # its submodules, in the order its line gives
                order += [f"deploy.latency.{w}" for w in re.findall(r"[a-z_]+", text)]
    return order, uses


def _folder(name: str) -> str:
    return name.split(".")[0]


def test_the_map_lists_every_module_once():
    listed, uses = _map()
    packages = set(uses) - {"cli"}
    assert len(listed) == len(set(listed))
    assert set(listed) | packages == set(_modules())


def test_every_import_points_up_the_map():
    order = {name: i for i, name in enumerate(_map()[0])}
    modules = _modules()
    known = set(modules)
    wrong = []
    for name, path in modules.items():
        if name not in order:  # package docstrings
            continue
        for target in _imports(name, path, known):
            if target in order and order[target] >= order[name]:
                wrong.append(f"{name} -> {target}")
    assert wrong == []


def test_folders_import_only_the_folders_they_use():
    """train and deploy never import each other, runtime imports nothing but itself, nothing below
    imports what is above it."""
    _, uses = _map()
    assert uses["runtime"] == set() and "deploy" not in uses["train"] and "train" not in uses["deploy"]
    modules = _modules()
    known = set(modules)
    wrong = [f"{name} -> {target}" for name, path in modules.items() for target in _imports(name, path, known)
             if _folder(target) != _folder(name) and _folder(target) not in uses[_folder(name)]]
    assert wrong == []


def test_runtime_imports_only_the_stdlib_numpy_onnxruntime_and_pillow():
    """What a bundle runs on a device: no torch, no timm, nothing of the project outside runtime/
    (relative imports within it only, so the folder works as a bundle's own ``runtime`` package).
    Serving alone adds its HTTP framework, imported inside the functions that start a server, so a
    device that does not serve never needs it."""
    allowed = set(sys.stdlib_module_names) | RUNTIME_THIRD_PARTY
    wrong = []
    for path in sorted((ROOT / "runtime").glob("*.py")):
        tree = ast.parse(path.read_text())
        top_level = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                if node.level != 1:
                    wrong.append(f"{path.name}: from {'.' * node.level}{node.module or ''}")
                continue
            names = [node.module] if isinstance(node, ast.ImportFrom) else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            lazy_serving = path.name in SERVING_MODULES and id(node) not in top_level
            wrong += [f"{path.name}: {n}" for n in names if n.split(".")[0] not in allowed
                      and not (lazy_serving and n.split(".")[0] in SERVING_THIRD_PARTY)]
    assert wrong == []


def _defined(path: Path) -> set[str]:
    """Names a module defines at its top level (functions, classes, assignments, imports)."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for t in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names |= {n.id for n in ast.walk(t) if isinstance(n, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


@pytest.mark.parametrize("folder", ["bench", "tools"])
def test_scripts_outside_the_package_import_what_exists(folder):
    """Every ``bim_export`` import of the benchmarks and tools names a module and names it defines."""
    if not (REPO / folder).is_dir():
        pytest.skip(f"{folder}/ is not here (an installed package)")
    modules = {"bim_export": ROOT / "__init__.py", **{f"bim_export.{k}": v for k, v in _modules().items()}}
    wrong = []
    for path in sorted((REPO / folder).glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                wrong += [f"{path.name}: {a.name}" for a in node.names
                          if a.name.startswith("bim_export") and a.name not in modules]
            elif isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").startswith("bim_export"):
                if node.module not in modules:
                    wrong.append(f"{path.name}: {node.module}")
                    continue
                defined = _defined(modules[node.module])
                wrong += [f"{path.name}: {node.module}.{a.name}" for a in node.names
                          if a.name not in defined and f"{node.module}.{a.name}" not in modules]
    assert wrong == []
