"""What a finished bundle holds, what was chosen and how it was checked: ``bim-export info BUNDLE``.

Reads only the bundle folder (its manifest and the sizes of its files); runs nothing, changes nothing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..core.errors import InputError
from .bundle import BUNDLE, MANIFEST
from .profile_text import describe_budgets


def read_bundle_manifest(bundle: str | Path) -> dict[str, Any]:
    """The manifest of a bim-export bundle folder.

    Raises:
        InputError: the path is missing, not a folder, or not a bundle (no manifest.json, or one
            that is not a bundle's).
    """
    root = Path(bundle)
    if not root.exists():
        raise InputError(f"{root}: no such bundle folder")
    if not root.is_dir():
        raise InputError(f"{root}: not a bundle folder (a file)")
    path = root / MANIFEST
    if not path.is_file():
        raise InputError(f"{root}: not a bim-export bundle (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: unreadable manifest ({e})") from None
    missing = [k for k in BUNDLE.keys if not isinstance(manifest, dict) or k not in manifest]
    if missing:
        raise InputError(f"{path}: not a bim-export bundle's manifest (no {', '.join(missing)})")
    return manifest


def bundle_info(bundle: str | Path) -> str:
    """A printable account of a bundle: its files with their sizes, its choice (profile, depth,
    precision, quality, latency with its source and error, budgets) and its validations (the
    export's parity and every device validation recorded since).

    Raises:
        InputError: not a bundle (see :func:`read_bundle_manifest`).
    """
    root = Path(bundle)
    m = read_bundle_manifest(root)
    made = f"bim-export {m.get('bim_export_version', '?')}" + (f", {m['created']}" if m.get("created") else "")
    return "\n".join([f"{root}: bundle for {m['profile']} ({made})", *_files(root, m), *_choice(m),
                      *_validations(m)])


def _files(root: Path, m: dict) -> list[str]:
    listed = m.get("files") or {}
    present = {p.relative_to(root).as_posix(): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}
    rows, folders = [], {}
    for name in sorted(set(listed) | {MANIFEST} | set(present)):
        if "/" in name:  # a folder (runtime/, a model repository) is one row: its file count and size
            folder = folders.setdefault(name.split("/", 1)[0] + "/", [0, 0, 0])
            folder[0] += 1
            folder[1] += present.get(name, 0)
            folder[2] += name not in present
        elif name not in present:
            rows.append((name, "missing"))
        else:
            rows.append((name, _size(present[name]) + ("" if name in listed or name == MANIFEST else "  (added later)")))
    for name, (count, size, missing) in folders.items():
        rows.append((name, f"{_size(size)} in {count} files" + (f", {missing} missing" if missing else "")))
    width = max(len(n) for n, _ in rows)
    return ["files", *(f"  {n:<{width}}  {s}" for n, s in rows)]


def _choice(m: dict) -> list[str]:
    depth, precision = m.get("depth"), m.get("precision")
    exits = ", ".join(str(e) for e in (m.get("checkpoint") or {}).get("exits") or m.get("exits") or [])
    pooling = m.get("pooling")
    prefix = m.get("prefix_tokens")
    shape = (m.get("input") or {}).get("shape")
    model = [f"depth {depth}" + (f" of exits {exits}" if exits else ""), str(precision), f"opset {m.get('opset')}"]
    if pooling:
        model.append(f"{pooling} pooling")
    if prefix is not None:
        model.append(f"{prefix} prefix token{'s' * (prefix != 1)}")
    if shape:
        model.append(f"input [{', '.join(map(str, shape))}]")
    source = m.get("checkpoint") or {}
    if source.get("resolution") and source.get("resolution") != source.get("img_size"):
        model.append(f"at {source['resolution']} px (the checkpoint's own: {source.get('img_size')} px)")
    if source.get("name"):
        model.append(f"checkpoint {source['name']}")
    labels = m.get("labels")
    if labels:
        shown = ", ".join(labels[:5]) + (", ..." if len(labels) > 5 else "")
        model.append(f"classifier of {len(labels)} labels ({shown})")
    q = m.get("quality") or {}
    ds = q.get("dataset") or {}
    name = q.get("label") or ("held-out task top-1" if q.get("metric") == "task_top1" else "kNN top-1")
    quality = "-" if q.get("value") is None else f"{name} {q['value']:.1%}"
    if ds:
        quality += f" on {ds.get('name', '?')} ({ds.get('size', '?')} images)"
    lat = m.get("latency") or {}
    stat = lat.get("stat") or (m.get("budgets") or {}).get("latency_stat", "p90")
    latency = "-"
    if lat.get("ms") is not None:
        err = lat.get("expected_error")
        latency = (f"{lat['ms']:.3g} ms {stat}" + (f" ±{err:.0%}" if err is not None else "")
                   + f" ({lat.get('source', '?')}) at batch {lat.get('batch', m.get('batch', '?'))}")
    cands = ((m.get("candidates") or {}).get("candidates")) or []
    counts = {s: sum(c.get("status") == s for c in cands) for s in ("chosen", "ok", "rejected")}
    lines = [
        "choice",
        f"  profile      {m['profile']} ({m.get('device_class', '?')}): {m.get('description', '')}".rstrip(": "),
        f"  model        {', '.join(model)}",
        f"  quality      {quality}",
        f"  latency      {latency}",
    ]
    if lat.get("error_basis"):
        lines.append(f"               error: {lat['error_basis']}")
    lines += [
        f"  size         {_mb(m.get('size_mb'))} file, {_mb(m.get('memory_mb'))} peak memory",
        f"  budgets      {describe_budgets(m.get('budgets') or {})}",
        f"  candidates   {len(cands)} ({counts['chosen']} chosen, {counts['ok']} within budget, "
        f"{counts['rejected']} rejected; the table is in report.md)",
    ]
    return lines


def _validations(m: dict) -> list[str]:
    lines = ["validations", f"  parity       {_parity(m.get('parity') or {})} (at export, "
                            f"{(m.get('parity') or {}).get('provider', '?')})"]
    records = m.get("device_validations") or []
    if not records:
        lines.append("  on devices   none recorded (bim-export validate BUNDLE, or python validate.py, on the device)")
    for i, r in enumerate(records):
        lat = r.get("latency") or {}
        stat = lat.get("stat", "p90")
        latency = f"latency {stat} {lat[stat]:.3g} ms" if isinstance(lat.get(stat), (int, float)) else "latency -"
        if lat.get("within_budget") is not None:
            latency += " within budget" if lat["within_budget"] else " over budget"
            latency += "" if r.get("latency_checked") else " (not checked there)"
        verdict = "passed" if r.get("passed") else f"FAILED ({'; '.join(r.get('failures') or [])})"
        machine = (r.get("machine") or {}).get("cpu", "?")
        lines.append(f"  device [{i}]   {r.get('time', '?')} on {machine} ({', '.join(r.get('providers') or [])}): "
                     f"{verdict}; parity {_parity(r.get('parity') or {})}; {latency}")
    return lines


def _parity(p: dict) -> str:
    if not p:
        return "-"
    parts = ["passed" if p.get("passed") else "FAILED"]
    if p.get("cosine_min") is not None:
        parts.append(f"worst cosine {p['cosine_min']:.5f}")
    if p.get("neighbour_agreement") is not None:
        parts.append(f"agreement {p['neighbour_agreement']:.0%}")
    if p.get("max_abs") is not None:
        parts.append(f"max abs {p['max_abs']:.2g}")
    if p.get("images"):
        parts.append(f"{p['images']} images")
    return ", ".join(parts)


def _size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 100_000 else f"{n / 1e3:.1f} kB"


def _mb(x) -> str:
    return "-" if x is None else f"{x:.3g} MB"
