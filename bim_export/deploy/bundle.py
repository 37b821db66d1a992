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
    early_exit/     with --early-exit: one graph per stage segment and their reference outputs
    triton/         GPU profiles: a Triton model repository, triton/<model>/config.pbtxt + 1/model.onnx
    build_engine.sh Jetson profiles: the trtexec line that builds model.engine; trt_engine.md beside it

Each kind of output is a :class:`Writer`, registered in the order it runs (:data:`WRITERS`); a new
output kind (a Triton model repository, an engine build script) is one :func:`register_writer` here
and its test. The manifest is built here and only here (:func:`build_manifest`), from what the
pipeline chose, and written last, with the sha256 of every file the writers wrote.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from functools import cached_property
from typing import Any

import numpy as np

from ..core.atomic import OutputKind, atomic_dir
from ..core.resources import resource_dir
from ..model import classifier
from ..runtime.machine import sha256_file
from ..runtime.parity import ParityResult
from .candidates import Trial
from .device_scripts import COMMON, SCRIPTS
from .early_exit import FOLDER as EARLY_EXIT
from .manifest import DYNAMIC_MODEL, MANIFEST, MODEL, build_manifest
from .ortformat import OPS_CONFIG, ORT_MODEL, make_ort
from .pareto import PlotPoint, plot_pareto
from .registry import Registry
from .report import render_report
from . import tensorrt, triton

REFERENCE, REPORT, PARETO = "reference.npz", "report.md", "pareto.png"
INFER = "infer.py"
# The standalone validator and the runtime/ package it and infer.py import (see validator_files).
VALIDATOR, RUNTIME = "validate.py", "runtime"
# The runtime's modules as loose copies beside validate.py, as bundles of earlier versions shipped them:
# a new export may replace them.
LOOSE_RUNTIME = ("parity.py", "knn.py", "machine.py")
# What the bundle's own scripts add beside its files on the device (mobile.py's model.ort,
# jetson.py's TensorRT engine cache, the bytecode of common.py).
ADDED_ON_DEVICE = ("trt_cache", "__pycache__")


@dataclass
class BundleSpec:
    """Everything a bundle records; :func:`write_bundle` turns it into files.

    Attributes:
        profile: the :class:`~bim_export.deploy.profiles.Profile` exported for.
        selection: the selector's :class:`~bim_export.deploy.selector.Selection` (every candidate).
        choice: the chosen candidate (depth, precision, its file, latency, memory, size, quality).
        parity: parity of the very file that ships.
        checkpoint: config.json of the source checkpoint (``img_size``: the chosen resolution);
            ``metrics`` its metrics.json.
        source: where the chosen candidate comes from (``pipeline.source_record``): the checkpoint's
            folder and own size, the resolution, and the set that measured its quality there.
        data: what parity and calibration ran on (:meth:`bim_export.model.images.Images.describe`).
        conversion: how the precision was made (QuantInfo as a dict), for the chosen file.
        reference: arrays for reference.npz (pixels, tokens, embedding, a classifier's logits, labels).
        points: every candidate, for pareto.png.
        why: one or two sentences on the choice.
        model_path: the ONNX file to ship (default: the choice's; a multi-exit graph replaces it).
        exit_parity: with a multi-exit graph, parity per exit depth.
        extra_files: more files to copy in, by name.
        mobile: for an ORT Mobile profile: the graph form, ORT's usability check per EP and where
            each candidate is predicted (``pipeline.mobile_record``); ``model.ort`` and
            ``required_operators.config`` are then made and checked here.
        dynamic_model: the profile's second, dynamic-batch file, and ``dynamic_parity`` its parity.
        early_exit: with ``--early-exit``, the segment graphs and their record
            (:class:`~bim_export.deploy.early_exit.EarlyExit`).
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
    early_exit: Any = None
    source: dict = field(default_factory=dict)

    @property
    def model(self) -> Path:
        return self.model_path or self.choice.model

    @property
    def multi_exit(self) -> bool:
        return bool(self.exit_parity)


@dataclass
class BundleDraft:
    """A bundle being written: the temporary folder the writers fill, and what they write from.

    Attributes:
        dir: the temporary folder (renamed over the destination once every writer is done).
        spec: what the bundle records.
    """

    dir: Path
    spec: BundleSpec

    @cached_property
    def manifest(self) -> dict[str, Any]:
        """manifest.json as it stands: built from the spec and the written model on first use;
        writers add their sections to it."""
        return build_manifest(self.spec, self.dir / MODEL)


@dataclass(frozen=True)
class Writer:
    """One kind of output in a bundle.

    Attributes:
        name: what it writes, in a word (``reference``).
        files: every name it may write into the bundle (what a later export may replace).
        write: writes its files into ``draft.dir`` (and its section into ``draft.manifest``, if any).
    """

    name: str
    files: tuple[str, ...]
    write: Callable[[BundleDraft], None]


WRITERS: Registry[Writer] = Registry("bundle writer")


def register_writer(name: str, files: tuple[str, ...]) -> Callable[[Callable[[BundleDraft], None]], Callable]:
    """Decorator: registers ``fn(draft)`` as the writer ``name`` of ``files``, run after those
    registered before it."""

    def wrap(fn: Callable[[BundleDraft], None]) -> Callable[[BundleDraft], None]:
        WRITERS.register(Writer(name, files, fn))
        return fn

    return wrap


def bundle_kind(spec: BundleSpec | None = None) -> OutputKind:
    """What ``out_dir/<profile>/`` may hold to be replaced by a new bundle: every registered writer's
    files, the manifest, what the bundle's scripts add on the device (and ``spec``'s extra files)."""
    names = {MANIFEST, *ADDED_ON_DEVICE, *LOOSE_RUNTIME, *(f for w in WRITERS for f in w.files)}
    extra = set(spec.extra_files) if spec is not None else set()
    return OutputKind("bundle", keys=("format_version", "bim_export_version", "profile", "files"), marker=MANIFEST,
                      names=frozenset(names | extra))


def write_bundle(out_dir: str | Path, spec: BundleSpec) -> Path:
    """Writes ``out_dir/<profile>/`` atomically, every registered writer in order, then the
    manifest with the sha256 of every file; returns its path.

    Raises:
        InputError: ``out_dir/<profile>`` holds something other than a bundle, or cannot be written
            (see :func:`bim_export.core.atomic.check_destination`); nothing is written.
    """
    dest = Path(out_dir) / spec.profile.name
    with atomic_dir(dest, bundle_kind(spec)) as tmp:
        draft = BundleDraft(tmp, spec)
        for writer in WRITERS:
            writer.write(draft)
        manifest = draft.manifest
        manifest["files"] = file_hashes(tmp)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=_json_default) + "\n", encoding="utf-8")
    return dest


# --------------------------------------------------------------------------- the writers, in order


@register_writer("model", (MODEL, f"{MODEL}.data", DYNAMIC_MODEL))
def _write_models(draft: BundleDraft) -> None:
    spec = draft.spec
    stamp = {"profile": spec.profile.name, "precision": spec.choice.precision}
    write_model(spec.model, draft.dir / MODEL, stamp)
    if spec.dynamic_model is not None:
        write_model(spec.dynamic_model, draft.dir / DYNAMIC_MODEL, stamp)


@register_writer("reference", (REFERENCE,))
def _write_reference(draft: BundleDraft) -> None:
    np.savez(draft.dir / REFERENCE, **draft.spec.reference)


@register_writer("phone", (ORT_MODEL, OPS_CONFIG))
def _write_phone_files(draft: BundleDraft) -> None:
    """ORT Mobile profiles: the file an app loads, made and checked against model.onnx here."""
    spec = draft.spec
    if spec.mobile is None:
        return
    ort_format = make_ort(draft.dir / MODEL, draft.dir, spec.reference, spec.choice.precision, spec.profile)
    draft.manifest["mobile"]["ort"] = ort_format.to_dict()


@register_writer("infer", (INFER, COMMON))
def _write_infer_script(draft: BundleDraft) -> None:
    targets = resource_dir("targets")
    shutil.copyfile(targets / SCRIPTS[draft.spec.profile.target_script].file, draft.dir / INFER)
    shutil.copyfile(targets / COMMON, draft.dir / COMMON)


@register_writer("validator", (VALIDATOR, RUNTIME))
def _write_validator(draft: BundleDraft) -> None:
    for name, src in validator_files().items():
        (draft.dir / name).parent.mkdir(exist_ok=True)
        shutil.copyfile(src, draft.dir / name)


@register_writer("extra", ())
def _write_extra_files(draft: BundleDraft) -> None:
    for name, src in draft.spec.extra_files.items():
        shutil.copyfile(src, draft.dir / name)


@register_writer("triton", (triton.FOLDER,))
def _write_triton_repository(draft: BundleDraft) -> None:
    """GPU profiles (and any with ``triton: true``): the model repository, of the dynamic-batch file where one ships."""
    spec = draft.spec
    if spec.profile.serves_triton:
        model = draft.dir / (DYNAMIC_MODEL if spec.dynamic_model is not None else MODEL)
        draft.manifest["triton"] = triton.write_repository(draft.dir, spec.profile, spec.choice.precision, model,
                                                           classifier.labels(spec.checkpoint))


@register_writer("tensorrt", (tensorrt.SCRIPT, tensorrt.NOTES))
def _write_engine_files(draft: BundleDraft) -> None:
    """Jetson profiles: build_engine.sh (trtexec) and trt_engine.md."""
    spec = draft.spec
    if spec.profile.target_script == "jetson":
        draft.manifest["tensorrt"] = tensorrt.write_engine_files(draft.dir, spec.profile, spec.choice.precision,
                                                                 draft.dir / MODEL)


@register_writer("early_exit", (EARLY_EXIT,))
def _write_early_exit(draft: BundleDraft) -> None:
    if draft.spec.early_exit is not None:
        draft.manifest[EARLY_EXIT] = draft.spec.early_exit.write(draft.dir)


@register_writer("pareto", (PARETO,))
def _write_pareto(draft: BundleDraft) -> None:
    profile = draft.spec.profile
    budget = profile.budgets.latency_ms
    stat = profile.budgets.latency_stat
    plot_pareto(draft.spec.points, budget if budget is not None else float("nan"), draft.dir / PARETO,
                title=f"{profile.name}: latency ({stat}) vs quality", stat=stat,
                quality_source=draft.spec.selection.quality_source,
                quality_metric=draft.spec.selection.quality_metric)


@register_writer("report", (REPORT,))
def _write_report(draft: BundleDraft) -> None:
    text = render_report(draft.manifest, draft.spec.selection.table(), draft.spec.why)
    (draft.dir / REPORT).write_text(text, encoding="utf-8")


BUNDLE = bundle_kind()  # the shipped writers' bundle


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
