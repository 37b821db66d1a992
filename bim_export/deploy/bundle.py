"""The deployable bundle: ``exports/<profile>/``, self-describing and re-checkable on the device.

Layout (written atomically: built in a temporary sibling, renamed over the destination at the end,
so an interrupted export leaves only what was there before)::

    model.onnx      the chosen depth x precision
    manifest.json   what, how, how well: profile, depth, precision, opset, exporter, versions, sha256
                    of every other file, parity and latency with their source, every candidate
    reference.npz   a few real preprocessed inputs and the PyTorch outputs for them
    report.md       the choice and why, for a person
    pareto.png      latency vs quality of every candidate, the budget line, the choice
    infer.py        the inference script for this device class (from targets/), + common.py
    validate.py     the standalone validator (a copy of bim_export/validate.py)
"""

from __future__ import annotations

import dataclasses
import json
import platform
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..atomic import OutputKind, atomic_dir
from ..resources import resource_dir
from ..machine import sha256_file

FORMAT_VERSION = 1
SCRIPT_NOTES = {
    "cpu.py": "infer.py runs on onnxruntime's CPU execution provider; `--threads N` fixes the thread count.",
    "jetson.py": ("infer.py tries TensorRT (fp16 on, engine cached in `trt_cache/` next to the model: the first "
                  "run builds it, which takes minutes on an Orin Nano), then CUDA, then the CPU, and prints "
                  "which one ran."),
    "server_gpu.py": ("infer.py runs on the CUDA execution provider with IO binding (inputs copied to the GPU "
                      "once, outputs fetched at the end), else on the CPU."),
    "mobile.py": ("infer.py converts model.onnx to model.ort (onnxruntime's mobile format, for onnxruntime-android "
                  "/ -ios apps) with `python -m onnxruntime.tools.convert_onnx_models_to_ort`, checks that the "
                  ".ort model matches the .onnx one on the reference inputs, then embeds the images with it "
                  "(XNNPACK / NNAPI where available, else CPU). Ship model.ort in the app."),
}
MODEL, MANIFEST, REFERENCE, REPORT, PARETO = "model.onnx", "manifest.json", "reference.npz", "report.md", "pareto.png"
INFER, COMMON = "infer.py", "common.py"
# The standalone validator and the modules it imports, copied beside it (see validator_files).
VALIDATOR = ("validate.py", "parity.py", "knn.py", "machine.py")
# What a later export of the same profile may replace: the bundle's files, and what its own scripts
# add beside them on the device (mobile.py's model.ort, jetson.py's TensorRT engine cache, the
# bytecode of common.py).
BUNDLE = OutputKind("bundle", keys=("format_version", "bim_export_version", "profile", "files"), marker=MANIFEST,
                    names=frozenset({MODEL, f"{MODEL}.data", MANIFEST, REFERENCE, REPORT, PARETO, INFER, COMMON,
                                     *VALIDATOR, "model.ort", "trt_cache", "__pycache__"}))


@dataclass
class PlotPoint:
    """One candidate on the Pareto plot.

    Attributes:
        depth: the exit depth.
        precision: fp32, fp16 or int8.
        latency_ms: the latency used for the budget check (None if never estimated).
        quality: the exit's quality (kNN top-1 in [0, 1]), or None.
        rejected: the reason it was rejected, or None if it met every budget.
        chosen: whether this is the selected candidate.
        source: ``measured`` / ``predicted`` / ...
    """

    depth: int
    precision: str
    latency_ms: float | None
    quality: float | None
    rejected: str | None = None
    chosen: bool = False
    source: str = ""

    @property
    def label(self) -> str:
        return f"d{self.depth} {self.precision}"


@dataclass
class BundleSpec:
    """Everything a bundle records; :func:`write_bundle` turns it into files.

    Attributes:
        profile_name: canonical profile name (the folder name).
        script: the targets/ script fitting the device (``jetson.py`` ...).
        model_path: the ONNX file to ship (copied as model.onnx).
        reference: arrays for reference.npz (pixels, tokens, embedding, labels).
        manifest: JSON-ready fields (profile, depth, precision, parity, latency, candidates, ...);
            versions, files, format_version and time are added here.
        table: the rendered candidate table, for report.md.
        points: every candidate, for pareto.png.
        budget_ms: the latency budget (the plot's budget line).
        latency_stat: which statistic the budget applies to (p50/p90/p99).
        why: one or two sentences on the choice.
    """

    profile_name: str
    script: str
    model_path: Path
    reference: dict[str, np.ndarray]
    manifest: dict[str, Any]
    table: str
    points: list[PlotPoint]
    budget_ms: float
    latency_stat: str = "p50"
    why: str = ""
    extra_files: dict[str, Path] = field(default_factory=dict)


def bundle_kind(spec: BundleSpec | None = None) -> OutputKind:
    """What ``out_dir/<profile>/`` may hold to be replaced by a new bundle (with ``spec``'s extra files)."""
    if spec is None or not spec.extra_files:
        return BUNDLE
    return dataclasses.replace(BUNDLE, names=BUNDLE.names | set(spec.extra_files))


def write_bundle(out_dir: str | Path, spec: BundleSpec) -> Path:
    """Writes ``out_dir/<profile>/`` atomically and returns its path.

    Raises:
        InputError: ``out_dir/<profile>`` holds something other than a bundle, or cannot be written
            (see :func:`bim_export.atomic.check_destination`); nothing is written.
    """
    dest = Path(out_dir) / spec.profile_name
    with atomic_dir(dest, bundle_kind(spec)) as tmp:
        write_model(spec.model_path, tmp / MODEL, {"profile": spec.profile_name,
                                                     "precision": str(spec.manifest.get("precision", ""))})
        np.savez(tmp / REFERENCE, **spec.reference)
        targets = resource_dir("targets")
        shutil.copyfile(targets / spec.script, tmp / INFER)
        shutil.copyfile(targets / COMMON, tmp / COMMON)
        for name, src in validator_files().items():
            shutil.copyfile(src, tmp / name)
        for name, src in spec.extra_files.items():
            shutil.copyfile(src, tmp / name)
        plot_pareto(spec.points, spec.budget_ms, tmp / PARETO,
                    title=f"{spec.profile_name}: latency ({spec.latency_stat}) vs quality")
        manifest = build_manifest(spec)
        (tmp / REPORT).write_text(render_report(spec, manifest), encoding="utf-8")
        manifest["files"] = file_hashes(tmp)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=_json_default) + "\n", encoding="utf-8")
    return dest


def validator_files() -> dict[str, Path]:
    """The bundle's standalone validator and the modules it imports (numpy, onnxruntime and the
    standard library only), by file name."""
    from .. import knn, machine
    from . import parity, validate

    return {Path(m.__file__).name: Path(m.__file__) for m in (validate, parity, knn, machine)}


def write_model(src: Path, dst: Path, metadata: dict[str, str]) -> None:
    """Copies an ONNX model, setting ``metadata`` in its metadata_props (the exports are shared by
    every profile of a run, so the profile is stamped on the copy). Weights stored as external
    data (models over 2 GB) go to ``<dst>.data`` beside it."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    model = onnx.load(str(src))
    props = {p.key: p.value for p in model.metadata_props}
    props.update({k: v for k, v in metadata.items() if v})
    del model.metadata_props[:]
    for k, v in props.items():
        model.metadata_props.add(key=k, value=v)
    external = any(uses_external_data(t) for t in model.graph.initializer) or src.stat().st_size > 1_800_000_000
    onnx.save(model, str(dst), save_as_external_data=external, location=f"{dst.name}.data" if external else None)


def build_manifest(spec: BundleSpec) -> dict[str, Any]:
    """The manifest: the pipeline's fields plus format version, time, versions, io and exporter."""
    model_meta = onnx_metadata(spec.model_path)
    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "bim_export_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "exporter": model_meta.pop("exporter", "unknown"),
        "versions": package_versions(),
        "infer_script": spec.script,
    }
    manifest.update(spec.manifest)
    io = onnx_io(spec.model_path)
    manifest.setdefault("io", {"input": io["input"], "outputs": [o["name"] for o in io["outputs"]]})
    manifest.setdefault("outputs", io["outputs"])
    manifest["onnx_metadata"] = model_meta
    manifest.setdefault("device_validations", [])
    return manifest


def package_versions() -> dict[str, str]:
    """Versions of the libraries that made the bundle (read from the installed distributions)."""
    out = {"python": platform.python_version()}
    for dist in ("torch", "onnx", "onnxruntime", "timm", "bim-export"):
        try:
            out[dist.replace("-", "_")] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist.replace("-", "_")] = "not installed"
    return out


def onnx_metadata(path: Path) -> dict[str, str]:
    """The model's metadata_props (read without loading external weights)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}


def onnx_io(path: Path) -> dict[str, Any]:
    """The graph's input name and its outputs with their shapes (symbolic axes by name)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph

    def shape(vi) -> list:
        return [d.dim_param or (d.dim_value if d.HasField("dim_value") else None) for d in vi.type.tensor_type.shape.dim]

    return {"input": graph.input[0].name, "outputs": [{"name": o.name, "shape": shape(o)} for o in graph.output]}


def file_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` except the manifest (which holds them)."""
    return {p.relative_to(root).as_posix(): sha256_file(p)
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != MANIFEST}


def _json_default(obj):
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


# ------------------------------------------------------------------------------------------ plot


def plot_pareto(points: list[PlotPoint], budget_ms: float, path: Path, title: str = "") -> None:
    """Latency vs quality of every candidate.

    One colour per precision, its depths joined in order and numbered; rejected candidates hollow
    with a red x, the chosen one starred, the budget a dashed vertical line. Without kNN figures
    the y axis is the exit depth (deeper is better).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    pts = [p for p in points if p.latency_ms is not None]
    have_quality = bool(pts) and all(p.quality is not None for p in pts)

    def y(p: PlotPoint) -> float:
        return p.quality * 100 if have_quality else p.depth

    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    colors = {"fp32": "tab:blue", "fp16": "tab:green", "int8": "tab:orange"}
    for prec, c in colors.items():
        line = sorted((p for p in pts if p.precision == prec), key=lambda p: p.depth)
        if line:
            ax.plot([p.latency_ms for p in line], [y(p) for p in line], color=c, alpha=0.35, linewidth=1, zorder=1)
    rows: dict[float, list[PlotPoint]] = {}
    for p in pts:
        c = colors.get(p.precision, "tab:gray")
        if p.rejected:
            ax.scatter(p.latency_ms, y(p), s=55, facecolors="white", edgecolors=c, linewidths=1.4, zorder=2)
            ax.scatter(p.latency_ms, y(p), s=22, marker="x", color="tab:red", linewidths=1, zorder=3)
        else:
            ax.scatter(p.latency_ms, y(p), s=55, color=c, zorder=2)
        if p.chosen:
            ax.scatter(p.latency_ms, y(p), s=360, marker="*", facecolors="gold", edgecolors="black", zorder=4)
        rows.setdefault(y(p), []).append(p)
    for row in rows.values():  # depth numbers, alternately above and below along a crowded row
        for k, p in enumerate(sorted(row, key=lambda p: p.latency_ms)):
            ax.annotate(str(p.depth), (p.latency_ms, y(p)), textcoords="offset points",
                        xytext=(0, (13 if p.chosen else 8) if k % 2 == 0 else (-19 if p.chosen else -14)),
                        ha="center", fontsize=8,
                        color=colors.get(p.precision, "tab:gray"))
    if budget_ms == budget_ms:  # not NaN: the profile has a latency budget
        ax.axvline(budget_ms, color="tab:red", linestyle="--", linewidth=1.2)
        ax.annotate(f"budget {budget_ms:g} ms", (budget_ms, 0.02), xycoords=("data", "axes fraction"),
                    textcoords="offset points", xytext=(4, 0), color="tab:red", fontsize=8)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:g}"[0] in "235" else ""))
    ax.margins(x=0.12, y=0.15)
    ax.set_xlabel("latency (ms, log scale)")
    ax.set_ylabel("kNN top-1 of the exit (%)" if have_quality else "exit depth")
    if title:
        ax.set_title(title, fontsize=10)
    handles = [plt.Line2D([], [], marker="o", color=c, label=k) for k, c in colors.items()
               if any(p.precision == k for p in pts)]
    handles += [
        plt.Line2D([], [], marker="o", linestyle="", markerfacecolor="white", markeredgecolor="gray", label="rejected"),
        plt.Line2D([], [], marker="*", linestyle="", markersize=12, markerfacecolor="gold", markeredgecolor="black",
                   label="chosen"),
        plt.Line2D([], [], linestyle="--", color="tab:red", label="latency budget"),
    ]
    ax.legend(handles=handles, loc="best", fontsize=8, title="numbers: exit depth", title_fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---------------------------------------------------------------------------------------- report


def render_report(spec: BundleSpec, manifest: dict[str, Any]) -> str:
    """report.md: choice and why, candidate table, parity, latency with its source, how to run it."""
    m = manifest
    lat, par = m.get("latency", {}), m.get("parity", {})
    lines = [
        f"# bim-export bundle: {spec.profile_name}",
        "",
        f"**Chosen:** depth {m.get('depth')} ({m.get('precision')}), opset {m.get('opset')}, "
        f"{lat.get('ms', float('nan')):.2f} ms {spec.latency_stat} at batch {m.get('batch')} ({lat.get('source', '?')}).",
        "",
        spec.why,
        "",
        "## Candidates",
        "",
        "```",
        spec.table.rstrip(),
        "```",
        "",
        "![latency vs quality](pareto.png)",
        "",
        "## Parity (ONNX Runtime vs PyTorch on real images)",
        "",
    ]
    lines += ["| run | images | cosine mean / min | neighbour agreement | max abs | mean abs | passed |",
              "|---|---|---|---|---|---|---|"]
    runs = [("batch 1", par.get("batch1")), (f"batch {par.get('batch_n', 'n')}", par.get("batchN"))]
    runs += [(f"exit {d} (multi-exit graph)", r.get("batchN")) for d, r in (par.get("exits") or {}).items()]
    lines += [_parity_row(name, r) for name, r in runs if isinstance(r, dict)]
    tol = par.get("tolerances") or m.get("tolerances") or {}
    lines += ["", f"Tolerances ({m.get('precision')}): cosine >= {tol.get('cosine')}, neighbour agreement >= "
              f"{tol.get('neighbour_agreement')}. Run with ONNX Runtime's {par.get('provider', 'CPU')} here."]
    data = m.get("data")
    if isinstance(data, dict):
        lines.append(f"Images: {data.get('parity_images')} for parity, {data.get('calibration_images')} for "
                     f"calibration, drawn from {data.get('images')} in "
                     + (f"`{data['folder']}` (--data)." if data.get("folder") else "the built-in sample set."))
    if par.get("note"):
        lines.append(f"Note: {par['note']}.")
    lines += [
        "",
        "## Latency",
        "",
        f"- {lat.get('ms', float('nan')):.2f} ms ({spec.latency_stat}) at batch {m.get('batch')}, "
        f"source: **{lat.get('source', '?')}**"
        + (f", expected error ±{lat['expected_error'] * 100:.0f} %" if lat.get("expected_error") is not None else "")
        + (f", machine: {lat['machine']}" if lat.get("machine") else ""),
        f"- budget: {spec.budget_ms:g} ms ({spec.latency_stat})",
    ]
    if lat.get("note"):
        lines.append(f"- note: {lat['note']}")
    lines += [
        "",
        "Predicted figures come from the graph's cost model and the profile's hardware figures; run",
        "`python validate.py .` on the device to measure them there (recorded in manifest.json).",
        "",
        "## Run it on the device",
        "",
        "```sh",
        f"pip install {'onnxruntime-gpu' if spec.script in ('jetson.py', 'server_gpu.py') else 'onnxruntime'} numpy pillow"
        + ("   # on Jetson: the onnxruntime-gpu wheel for your JetPack" if spec.script == "jetson.py" else ""),
        "python infer.py path/to/images/            # embeddings, with timing",
        "python infer.py query.jpg --gallery gallery/ --top-k 5",
        "python validate.py .                        # parity vs reference.npz + latency, on this machine",
        "```",
        "",
        SCRIPT_NOTES.get(spec.script, ""),
        "",
        f"Preprocessing (done by infer.py): shorter side to {m.get('preprocessing', {}).get('img_size')} px bicubic, "
        f"centre crop, normalize with mean {m.get('preprocessing', {}).get('mean')} and std {m.get('preprocessing', {}).get('std')}.",
        "",
        f"Made by bim-export {m.get('bim_export_version')} (torch {m['versions'].get('torch')}, "
        f"onnx {m['versions'].get('onnx')}, onnxruntime {m['versions'].get('onnxruntime')}); exporter: {m.get('exporter')}.",
        "",
    ]
    return "\n".join(lines)


def _parity_row(name: str, r: dict) -> str:
    """One markdown table row of a ParityResult dict."""
    agree = r.get("neighbour_agreement")
    agree_text = "n/a" if agree is None else f"{agree:.1%} ({r.get('agreement_kind', '?')})"
    nan = float("nan")
    return (f"| {name} | {r.get('images', '?')} | {r.get('cosine', nan):.6f} / {r.get('cosine_min', nan):.6f} | "
            f"{agree_text} | {r.get('max_abs', nan):.3g} | {r.get('mean_abs', nan):.3g} | "
            f"{'yes' if r.get('passed') else 'NO'} |")
