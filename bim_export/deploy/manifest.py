"""manifest.json of a bundle: what it holds and why, from the export's spec (files and their sha256
are added by the bundle once every file is written).
"""

from __future__ import annotations

import platform
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from .. import __version__
from ..model import classifier
from ..model.checkpoint import quality_dataset, quality_metric
from .candidates import ONNX_PROVIDER, source_label
from .device_scripts import SCRIPTS
from .selector import quality_label

FORMAT_VERSION = 1
MODEL, MANIFEST = "model.onnx", "manifest.json"
DYNAMIC_MODEL = "model.dynamic.onnx"


def build_manifest(spec, model: Path) -> dict[str, Any]:
    """manifest.json (without ``files``, added once every file is written) of ``spec`` (a
    :class:`~bim_export.deploy.bundle.BundleSpec`); ``model`` is the ONNX file as written into the bundle."""
    from .export import read_metadata

    profile, choice, cfg = spec.profile, spec.choice, spec.checkpoint
    lat, stat = choice.latency, profile.budgets.latency_stat
    size, mean, std = cfg["img_size"], list(cfg["mean"]), list(cfg["std"])
    tolerances = profile.tolerance(choice.precision).model_dump()
    meta = read_metadata(model)
    io = onnx_io(model)
    metric, labels = quality_metric(spec.metrics) or "knn_top1", classifier.labels(cfg)
    parity = {**spec.parity.to_dict(), "batch_n": spec.parity.runs["batchN"].images, "provider": ONNX_PROVIDER,
              "tolerances": tolerances}
    if spec.multi_exit:
        parity["exits"] = {d: r.to_dict() for d, r in spec.exit_parity.items()}
    manifest = {
        "format_version": FORMAT_VERSION, "bim_export_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "exporter": meta.pop("exporter", "unknown"), "versions": package_versions(),
        "infer_script": SCRIPTS[profile.target_script].file,
        "profile": profile.name, "device_class": profile.device_class, "description": profile.description,
        # which machines are the device (validate.py compares its own machine with it); a measured
        # profile's bundle is for any machine
        "device": profile.device.model_dump() if profile.device else None, "measured": profile.measured,
        "execution_providers": list(profile.execution_providers), "provider_options": profile.provider_options,
        "threads": profile.threads, "batch": profile.batch, "fixed_batch": profile.batch_is_fixed,
        "budgets": profile.budgets.model_dump(), "tolerances": tolerances,
        "depth": choice.depth, "precision": choice.precision, "opset": profile.opset,
        "multi_exit": spec.multi_exit,
        "exits": [int(d) for d in spec.exit_parity] if spec.multi_exit else list(cfg["exits"]),
        "checkpoint": {"exits": list(cfg["exits"]), "step": cfg.get("step"), "arch": cfg.get("arch"),
                       **{k: v for k, v in spec.source.items() if k != "quality_dataset"}},
        "model": MODEL,
        **pooling(meta, cfg),
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
        # held-out task top-1 of a fine-tuned checkpoint, else kNN top-1; the set that scored it
        "quality": {"metric": metric, "label": quality_label(metric), "value": choice.quality,
                    "dataset": spec.source.get("quality_dataset") or quality_dataset(spec.metrics, choice.depth)},
        # a classifier's class names in logit order (none for an embedding model)
        **({"labels": labels, "num_classes": len(labels)} if labels else {}),
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


def pooling(meta: dict[str, str], cfg: dict) -> dict[str, Any]:
    """How the model's ``embedding`` pools its tokens (``token``: the class token; ``avg``: the mean of
    the patch tokens) and how many prefix tokens (class + registers) lead its ``tokens`` output: from
    the graph's metadata_props, else the checkpoint's config.json."""
    prefix = meta.get("prefix_tokens", cfg.get("num_prefix_tokens"))
    return {"pooling": meta.get("pooling", cfg.get("global_pool")),
            "prefix_tokens": None if prefix is None else int(prefix)}


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
