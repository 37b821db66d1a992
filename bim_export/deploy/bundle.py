"""The deployable bundle: ``exports/<profile>/``, self-describing and re-checkable on the device.

Layout (written atomically: built in a temporary sibling, renamed over the destination at the end,
so an interrupted export leaves only what was there before)::

    model.onnx      the chosen depth x precision (its batch fixed where the profile fixes it)
    model.ort       ORT Mobile profiles: the same model in ONNX Runtime's format, for apps
    required_operators.config   its operators, for ORT's reduced-size builds
    model.dynamic.onnx          where the profile asks: the same model with a dynamic batch axis
    manifest.json   what, how, how well: profile, depth, precision, opset, exporter, versions, sha256
                    of every other file, parity and latency with their source, every candidate
    reference.npz   a few real preprocessed inputs and the PyTorch outputs for them
    report.md       the choice and why, for a person
    pareto.png      latency vs quality of every candidate, the budget line, the choice
    infer.py        the inference script for this device class (from targets/), + common.py
    validate.py     the standalone validator (from targets/)
    runtime/        the device runtime both scripts import (bim_export/runtime, no torch): preprocessing,
                    sessions and provider fallback, kNN, parity, validation, the machine description

The manifest is built here and only here (:func:`build_manifest`), from what the pipeline chose.
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
from ..core.atomic import OutputKind, atomic_dir
from ..core.resources import resource_dir
from ..runtime.machine import sha256_file
from ..runtime.parity import ParityResult
from .candidates import ONNX_PROVIDER, Trial, source_label
from .ortformat import OPS_CONFIG, ORT_MODEL, make_ort
from .report import PlotPoint, plot_pareto, render_report

FORMAT_VERSION = 1
MODEL, MANIFEST, REFERENCE, REPORT, PARETO = "model.onnx", "manifest.json", "reference.npz", "report.md", "pareto.png"
DYNAMIC_MODEL = "model.dynamic.onnx"
INFER, COMMON = "infer.py", "common.py"
VALIDATOR, RUNTIME = "validate.py", "runtime"
# The runtime's modules as loose copies beside validate.py, as bundles of earlier versions shipped them.
LOOSE_RUNTIME = ("parity.py", "knn.py", "machine.py")
# What a later export of the same profile may replace: the bundle's files, and what its own scripts
# add beside them on the device (mobile.py's model.ort, jetson.py's TensorRT engine cache, the
# bytecode of common.py).
BUNDLE = OutputKind("bundle", keys=("format_version", "bim_export_version", "profile", "files"), marker=MANIFEST,
                    names=frozenset({MODEL, f"{MODEL}.data", DYNAMIC_MODEL, MANIFEST, REFERENCE, REPORT, PARETO, INFER,
                                     COMMON, VALIDATOR, RUNTIME, *LOOSE_RUNTIME, ORT_MODEL, OPS_CONFIG, "trt_cache",
                                     "__pycache__"}))


@dataclass
class BundleSpec:
    """Everything a bundle records; :func:`write_bundle` turns it into files.

    Attributes:
        profile: the :class:`~bim_export.deploy.profiles.Profile` exported for.
        selection: the selector's :class:`~bim_export.deploy.selector.Selection` (every candidate).
        choice: the chosen candidate (depth, precision, its file, latency, memory, size, quality).
        parity: parity of the very file that ships.
        checkpoint: config.json of the source checkpoint; ``metrics`` its metrics.json.
        data: what parity and calibration ran on (:meth:`bim_export.model.images.Images.describe`).
        conversion: how the precision was made (QuantInfo as a dict), for the chosen file.
        reference: arrays for reference.npz (pixels, tokens, embedding, labels).
        points: every candidate, for pareto.png.
        why: one or two sentences on the choice.
        model_path: the ONNX file to ship (default: the choice's; a multi-exit graph replaces it).
        exit_parity: with a multi-exit graph, parity per exit depth.
        extra_files: more files to copy in, by name.
        mobile: for an ORT Mobile profile: the graph form, ORT's usability check per EP and where
            each candidate is predicted (``pipeline.mobile_record``); ``model.ort`` and
            ``required_operators.config`` are then made and checked here.
        dynamic_model: the profile's second, dynamic-batch file, and ``dynamic_parity`` its parity.
    """

    profile: Any
    selection: Any
    choice: Trial
    parity: ParityResult
    checkpoint: dict
    metrics: dict
    data: dict
    conversion: dict
    reference: dict[str, np.ndarray]
    points: list[PlotPoint]
    why: str = ""
    model_path: Path | None = None
    exit_parity: dict[str, ParityResult] = field(default_factory=dict)
    extra_files: dict[str, Path] = field(default_factory=dict)
    mobile: dict | None = None
    dynamic_model: Path | None = None
    dynamic_parity: ParityResult | None = None

    @property
    def model(self) -> Path:
        return self.model_path or self.choice.model

    @property
    def multi_exit(self) -> bool:
        return bool(self.exit_parity)


def bundle_kind(spec: BundleSpec | None = None) -> OutputKind:
    """What ``out_dir/<profile>/`` may hold to be replaced by a new bundle (with ``spec``'s extra files)."""
    if spec is None or not spec.extra_files:
        return BUNDLE
    return dataclasses.replace(BUNDLE, names=BUNDLE.names | set(spec.extra_files))


def write_bundle(out_dir: str | Path, spec: BundleSpec) -> Path:
    """Writes ``out_dir/<profile>/`` atomically and returns its path.

    Raises:
        InputError: ``out_dir/<profile>`` holds something other than a bundle, or cannot be written
            (see :func:`bim_export.core.atomic.check_destination`); nothing is written.
    """
    profile = spec.profile
    dest = Path(out_dir) / profile.name
    stat = profile.budgets.latency_stat
    with atomic_dir(dest, bundle_kind(spec)) as tmp:
        stamp = {"profile": profile.name, "precision": spec.choice.precision}
        write_model(spec.model, tmp / MODEL, stamp)
        if spec.dynamic_model is not None:
            write_model(spec.dynamic_model, tmp / DYNAMIC_MODEL, stamp)
        np.savez(tmp / REFERENCE, **spec.reference)
        ort_format = None
        if spec.mobile is not None:  # the file an app loads, made and checked against model.onnx here
            ort_format = make_ort(tmp / MODEL, tmp, spec.reference, spec.choice.precision, profile)
        targets = resource_dir("targets")
        shutil.copyfile(targets / f"{profile.target_script}.py", tmp / INFER)
        shutil.copyfile(targets / COMMON, tmp / COMMON)
        for name, src in {**validator_files(), **spec.extra_files}.items():
            (tmp / name).parent.mkdir(exist_ok=True)
            shutil.copyfile(src, tmp / name)
        budget = profile.budgets.latency_ms
        plot_pareto(spec.points, budget if budget is not None else float("nan"), tmp / PARETO,
                    title=f"{profile.name}: latency ({stat}) vs quality")
        manifest = build_manifest(spec, tmp / MODEL)
        if ort_format is not None:
            manifest["mobile"]["ort"] = ort_format.to_dict()
        (tmp / REPORT).write_text(render_report(manifest, spec.selection.table(), spec.why), encoding="utf-8")
        manifest["files"] = file_hashes(tmp)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=_json_default) + "\n", encoding="utf-8")
    return dest


def validator_files() -> dict[str, Path]:
    """The bundle's standalone validator and the ``runtime/`` package it and infer.py import (the
    standard library, numpy, onnxruntime and Pillow only), by path in the bundle."""
    from .. import runtime

    package = Path(runtime.__file__).parent
    return {VALIDATOR: resource_dir("targets") / VALIDATOR,
            **{f"{RUNTIME}/{p.name}": p for p in sorted(package.glob("*.py"))}}


def write_model(src: Path, dst: Path, metadata: dict[str, str]) -> None:
    """Copies an ONNX model, setting ``metadata`` in its metadata_props (the exports are shared by
    every profile of a run, so the profile is stamped on the copy). Weights stored as external
    data (models over 2 GB) go to ``<dst>.data`` beside it."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    from .export import read_metadata, set_metadata

    model = onnx.load(str(src))
    set_metadata(model, {**read_metadata(model), **{k: v for k, v in metadata.items() if v}})
    external = any(uses_external_data(t) for t in model.graph.initializer) or src.stat().st_size > 1_800_000_000
    onnx.save(model, str(dst), save_as_external_data=external, location=f"{dst.name}.data" if external else None)


def build_manifest(spec: BundleSpec, model: Path) -> dict[str, Any]:
    """manifest.json (without ``files``, added once every file is written) of ``spec``; ``model`` is
    the ONNX file as written into the bundle."""
    from .export import read_metadata

    profile, choice, cfg = spec.profile, spec.choice, spec.checkpoint
    lat, stat = choice.latency, profile.budgets.latency_stat
    size, mean, std = cfg["img_size"], list(cfg["mean"]), list(cfg["std"])
    tolerances = profile.tolerance(choice.precision).model_dump()
    meta = read_metadata(model)
    io = onnx_io(model)
    parity = {**spec.parity.to_dict(), "batch_n": spec.parity.runs["batchN"].images, "provider": ONNX_PROVIDER,
              "tolerances": tolerances}
    if spec.multi_exit:
        parity["exits"] = {d: r.to_dict() for d, r in spec.exit_parity.items()}
    manifest = {
        "format_version": FORMAT_VERSION, "bim_export_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "exporter": meta.pop("exporter", "unknown"), "versions": package_versions(),
        "infer_script": f"{profile.target_script}.py",
        "profile": profile.name, "device_class": profile.device_class, "description": profile.description,
        "execution_providers": list(profile.execution_providers), "provider_options": profile.provider_options,
        "threads": profile.threads, "batch": profile.batch, "fixed_batch": profile.batch_is_fixed,
        "budgets": profile.budgets.model_dump(), "tolerances": tolerances,
        "depth": choice.depth, "precision": choice.precision, "opset": profile.opset,
        "multi_exit": spec.multi_exit,
        "exits": [int(d) for d in spec.exit_parity] if spec.multi_exit else list(cfg["exits"]),
        "checkpoint": {"exits": list(cfg["exits"]), "step": cfg.get("step"), "arch": cfg.get("arch")},
        "model": MODEL,
        "input": {"name": io["input"], "shape": io["input_shape"], "img_size": size, "mean": mean, "std": std},
        "preprocessing": {"img_size": size, "mean": mean, "std": std, "resize": "shorter_side_bicubic",
                          "crop": "center"},
        "io": {"input": io["input"], "outputs": [o["name"] for o in io["outputs"]]},
        "outputs": io["outputs"],
        "parity": parity,
        "data": spec.data,
        "latency": {**lat.to_dict(), "model": MODEL, "ms": lat.stat(stat), "stat": stat,
                    "expected_error": lat.error(stat), "source": source_label(lat),
                    "budget_ms": profile.budgets.latency_ms},
        "conversion": spec.conversion,
        "memory_mb": choice.memory_mb, "size_mb": choice.size_mb,
        "quality": {"metric": "knn_top1", "value": choice.quality,
                    "dataset": spec.metrics.get("exits", {}).get(str(choice.depth), {}).get("knn_dataset")},
        "candidates": spec.selection.to_dict(),
        "onnx_metadata": meta,
        "device_validations": [],
    }
    if spec.mobile is not None:
        manifest["mobile"] = dict(spec.mobile)
    if spec.dynamic_model is not None:
        manifest["dynamic_model"] = {"model": DYNAMIC_MODEL, "input_shape": onnx_io(spec.dynamic_model)["input_shape"],
                                     "parity": spec.dynamic_parity.to_dict() if spec.dynamic_parity else None}
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


def onnx_io(path: Path) -> dict[str, Any]:
    """The graph's input name and its outputs with their shapes (symbolic axes by name)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph

    def shape(vi) -> list:
        return [d.dim_param or (d.dim_value if d.HasField("dim_value") else None) for d in vi.type.tensor_type.shape.dim]

    return {"input": graph.input[0].name, "input_shape": shape(graph.input[0]),
            "outputs": [{"name": o.name, "shape": shape(o)} for o in graph.output]}


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
