"""Candidates for a device: every exit depth x precision, built, pruned, parity-checked and timed.

One :class:`Workshop` per run exports every exit in ONE multi-exit graph, converts that graph once
per precision (and int8 preset), and cuts each depth's graph out of it; it also computes the
PyTorch reference outputs once per depth and the ONNX Runtime outputs once per graph. Every profile
of the run reuses them. For one profile, :func:`evaluate_candidates` then:

1. predicts each candidate's latency from its graph and rejects those far over the budget, before
   anything is run or timed;
2. checks parity against PyTorch on real images at batch 1 and batch n with the profile's
   tolerances (a failed precision rejects that candidate; a failed fp32 is an export bug);
3. gets the latency the budget is checked against: measured for host / calibrated profiles,
   predicted otherwise, labelled. Measured candidates are timed together, interleaved; a table in
   which a deeper model is faster than a shallower one of the same precision beyond their errors
   has those rows re-measured, and says so where they still disagree.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError, ValidationError

log = logging.getLogger(__name__)

PRUNE_FACTOR = 2.0  # predicted latency above this many budgets is rejected before anything is measured
CALIB_IMAGES = 32  # static int8 calibration
PARITY_IMAGES = 32  # parity at batch n (all of them) and batch 1 (the first PARITY_BATCH1)
PARITY_BATCH1 = 4
# Fewer images than this and parity says little: neighbour agreement moves in steps of 1/n (and
# needs 3 images at all), so a --data folder must have at least this many readable images.
MIN_PARITY_IMAGES = 16
# Host timing: every candidate in one worker, interleaved; warm-up, then `rounds` rounds of `repeats`
# runs, disturbed rounds re-run up to `max_rounds`. Fewer than a benchmark's: host budgets are tens
# of ms, and a run times up to a dozen candidates.
MEASURE = {"warmup": 3, "repeats": 10, "rounds": 5, "max_rounds": 10}


# ---------------------------------------------------------------------------- shared artefacts


@dataclass
class Images:
    """Real images for calibration and parity, preprocessed as the checkpoint was trained."""

    calib: np.ndarray  # [Nc, 3, S, S]
    parity: np.ndarray  # [Np, 3, S, S]
    labels: np.ndarray  # [Np], -1 unlabelled
    folder: Path | None = None  # the --data folder; None: the built-in sample images
    found: int = 0  # image files in it (unreadable ones not drawn into the sample included)

    def describe(self) -> dict:
        """What manifest.json records of the images parity and calibration were run on."""
        return {"folder": str(self.folder) if self.folder is not None else None,
                "source": "--data" if self.folder is not None else "built-in sample images",
                "images": self.found, "parity_images": len(self.parity), "calibration_images": len(self.calib),
                "labelled": bool(len(self.labels)) and bool((self.labels >= 0).all())}


def load_images(data: Path | None, config: dict) -> Images:
    """A seeded sample of the user's image folder (else the built-in set), preprocessed as in training.

    A large folder is not decoded whole: the files are listed, the sample is decoded, and only if
    one of those fails is the folder checked image by image (unreadable files are then skipped).

    Raises:
        InputError: the folder is missing, or holds fewer than MIN_PARITY_IMAGES readable images.
    """
    from ..data import UNREADABLE_IMAGE, sample_images, scan_image_folder

    if data is None:
        return _sample(sample_images(), config)
    try:
        images = _sample(scan_image_folder(data, verify=False), config)
    except UNREADABLE_IMAGE:  # an unreadable file was drawn
        images = _sample(scan_image_folder(data, verify=True), config)
    if len(images.parity) < MIN_PARITY_IMAGES:
        raise InputError(f"{data}: {len(images.parity)} readable image{'s' * (len(images.parity) != 1)}; parity "
                         f"and int8 calibration need at least {MIN_PARITY_IMAGES} (add images, or leave out "
                         f"--data for the built-in sample set)")
    images.folder = Path(data)
    return images


def _sample(images, config: dict) -> Images:
    from ..data import load_image_array

    size, mean, std = config["img_size"], config["mean"], config["std"]
    calib, _ = load_image_array(images, size, mean, std, limit=CALIB_IMAGES, seed=0)
    parity, labels = load_image_array(images, size, mean, std, limit=PARITY_IMAGES, seed=1)
    return Images(calib, parity, labels, found=len(images))


class Workshop:
    """Exports, conversions and outputs of one run, each made once and shared by all profiles.

    Files live in ``work/`` keyed by depth, precision and opset.
    """

    def __init__(self, ckpt, images: Images, work: Path):
        self.ckpt, self.images, self.work = ckpt, images, work
        self._backbones: dict[int, Any] = {}
        self._refs: dict[int, dict[str, np.ndarray]] = {}
        self._models: dict[tuple, Path] = {}
        self._outputs: dict[Path, dict[str, dict[str, np.ndarray]]] = {}
        self.conversions: dict[Path, dict] = {}  # QuantInfo of each converted file, for the manifest

    def backbone(self, depth: int):
        if depth not in self._backbones:
            from ..backbone import build_backbone

            self._backbones[depth] = build_backbone(self.ckpt, depth)
        return self._backbones[depth]

    def reference(self, depth: int) -> dict[str, np.ndarray]:
        """PyTorch fp32 outputs of the depth-d backbone on the parity images."""
        if depth not in self._refs:
            import torch

            bb = self.backbone(depth)
            with torch.inference_mode():
                tokens = bb.forward_features(torch.from_numpy(self.images.parity))
                emb = bb.forward_head(tokens, pre_logits=True)
            self._refs[depth] = {"tokens": tokens.numpy(), "embedding": emb.numpy()}
        return self._refs[depth]

    def metadata(self, precision: str) -> dict[str, Any]:
        cfg = self.ckpt.config
        return {"depth": max(cfg["exits"]), "exits": list(cfg["exits"]), "precision": precision,
                "mean": list(cfg["mean"]), "std": list(cfg["std"])}

    def full_graph(self, precision: str, opset: int, preset: str | None = None) -> Path:
        """The multi-exit graph of every exit at ``precision``: exported (fp32) or converted once.

        Converting the whole graph once and cutting exits out of it gives the same per-exit graphs
        as converting each depth's graph (weight quantization is per node, and calibration ranges
        of a tensor do not depend on the blocks after it), at a fraction of the cost.
        """
        key = ("full", precision, opset, preset if precision == "int8" else None)
        if key in self._models:
            return self._models[key]
        path = self.work / ("all-exits-" + "-".join(str(k) for k in key[1:] if k is not None) + ".onnx")
        if precision == "fp32":
            from .export import export_onnx

            exits = self.ckpt.config["exits"]
            log.info("exporting exits %s in one graph (opset %d)", exits, opset)
            export_onnx(self.backbone(max(exits)), path, opset=opset, img_size=self.ckpt.config["img_size"],
                        metadata=self.metadata("fp32"), multi_exit=True, exits={d: self.backbone(d) for d in exits})
        else:
            from .quantize import convert_precision

            log.info("converting the exits to %s%s", precision, f" ({preset})" if key[3] else "")
            calib = self.images.calib if precision == "int8" else None
            info = convert_precision(self.full_graph("fp32", opset), path, precision, calib_x=calib, preset=preset)
            self.conversions[path] = info.to_dict()
        self._models[key] = path
        return path

    def model(self, depth: int, precision: str, opset: int, preset: str | None = None,
              multi_exit: bool = False) -> Path:
        """The ONNX file of exit ``depth`` at ``precision`` (with ``multi_exit``: every exit up to
        ``depth`` in one graph), cut out of :meth:`full_graph` on first use."""
        key = (depth, precision, opset, preset if precision == "int8" else None, multi_exit)
        if key in self._models:
            return self._models[key]
        path = self.work / ("-".join(str(k) for k in (f"d{depth}", *key[1:4]) if k is not None)
                            + ("-multi" if multi_exit else "") + ".onnx")
        depths = [d for d in self.ckpt.config["exits"] if d <= depth] if multi_exit else [depth]
        if self.too_big_to_cut:
            self._export_depth(depth, depths, precision, opset, preset, multi_exit, path)
        else:
            full = self.full_graph(precision, opset, preset)
            cut_exits(full, path, depths, single=not multi_exit)
            if full in self.conversions:
                self.conversions[path] = {**self.conversions[full],
                                          "graph": "converted as the all-exits graph, this depth cut out of it"}
        self._models[key] = path
        return path

    @cached_property
    def too_big_to_cut(self) -> bool:
        """Whether the all-exits graph would pass protobuf's 2 GB limit (ViT-H and up): each depth is
        then exported and converted on its own, its weights as external data."""
        bb = self.backbone(max(self.ckpt.config["exits"]))
        return sum(p.numel() for p in bb.parameters()) * 4 > 1_500_000_000

    def parity_graph(self, depth: int, precision: str, opset: int, preset: str | None) -> tuple[Path, bool]:
        """The graph a candidate's parity is judged on, and whether its outputs carry the exit suffix."""
        if self.too_big_to_cut:
            return self.model(depth, precision, opset, preset), False
        return self.full_graph(precision, opset, preset), True

    def _export_depth(self, depth, depths, precision, opset, preset, multi_exit, path) -> None:
        if precision == "fp32":
            from .export import export_onnx

            exits = {d: self.backbone(d) for d in depths} if multi_exit else None
            export_onnx(self.backbone(depth), path, opset=opset, img_size=self.ckpt.config["img_size"],
                        metadata={**self.metadata("fp32"), "depth": depth}, multi_exit=multi_exit, exits=exits)
        else:
            from .quantize import convert_precision

            src = self.model(depth, "fp32", opset, multi_exit=multi_exit)
            calib = self.images.calib if precision == "int8" else None
            self.conversions[path] = convert_precision(src, path, precision, calib_x=calib, preset=preset).to_dict()

    def onnx_outputs(self, model: Path) -> dict[str, dict[str, np.ndarray]]:
        """ONNX Runtime (CPU EP) outputs on the parity images at batch 1 and batch n."""
        if model not in self._outputs:
            import onnxruntime as ort

            sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
            names = [o.name for o in sess.get_outputs()]
            x = self.images.parity
            ones = [sess.run(names, {"pixels": x[i:i + 1]}) for i in range(min(PARITY_BATCH1, len(x)))]
            full = sess.run(names, {"pixels": x})
            self._outputs[model] = {
                "batch1": {n: np.concatenate([o[j] for o in ones]) for j, n in enumerate(names)},
                "batchN": dict(zip(names, full)),
            }
        return self._outputs[model]


def cut_exits(src: Path, dst: Path, depths: list[int], single: bool) -> Path:
    """Writes the part of a multi-exit graph that computes the exits ``depths``.

    Only the nodes and weights those outputs need are kept (blocks up to the deepest, each exit's
    norm and pooling). With ``single``, the one exit's outputs ``tokens_<d>`` / ``embedding_<d>``
    are renamed to the contract's ``tokens`` / ``embedding``. metadata_props are carried over with
    ``depth`` (and ``graph_exits``) updated; the result is full-checked.
    """
    import json

    import onnx
    from onnx.utils import Extractor

    model = onnx.load(str(src))
    meta = {p.key: p.value for p in model.metadata_props}
    outputs = [f"{name}_{d}" for d in depths for name in ("tokens", "embedding")]
    part = Extractor(model).extract_model(["pixels"], outputs)
    if single:
        rename = {f"{name}_{depths[0]}": name for name in ("tokens", "embedding")}
        for node in part.graph.node:
            node.input[:] = [rename.get(n, n) for n in node.input]
            node.output[:] = [rename.get(n, n) for n in node.output]
        for vi in (*part.graph.output, *part.graph.value_info):
            vi.name = rename.get(vi.name, vi.name)
        meta.pop("graph_exits", None)
    else:
        meta["graph_exits"] = json.dumps(depths)
    meta["depth"] = str(max(depths))
    _topological_sort(part.graph)  # converters may append nodes (fp16's input Cast) out of order
    part.producer_name, part.producer_version = model.producer_name, model.producer_version
    for k, v in sorted(meta.items()):
        part.metadata_props.add(key=k, value=v)
    onnx.checker.check_model(part, full_check=True)
    onnx.save(part, str(dst))
    return dst


def _topological_sort(graph) -> None:
    """Reorders ``graph.node`` so every node comes after the producers of its inputs."""
    ready = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        rest = []
        for node in pending:
            if all(n in ready for n in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise ValueError(f"graph has a cycle or a missing input at node {rest[0].name}")
        pending = rest
    copies = [type(n)() for n in ordered]
    for c, n in zip(copies, ordered):
        c.CopyFrom(n)
    del graph.node[:]
    graph.node.extend(copies)


# ------------------------------------------------------------------------------------ parity


@dataclass
class Parity:
    """Parity of one graph at batch 1 and batch n (ParityResults of the validate module)."""

    passed: bool
    batch1: Any  # ParityResult
    batchN: Any
    note: str = ""

    def to_dict(self) -> dict:
        return {"passed": self.passed, "batch1": as_dict(self.batch1), "batchN": as_dict(self.batchN),
                "batch_n": self.batchN.images, "provider": "CPUExecutionProvider", "note": self.note}

    def summary(self) -> str:
        """One line for the candidate table: the misses if it failed, else cosine and agreement."""
        if not self.passed:
            return "; ".join(f for r in (self.batch1, self.batchN) for f in r.failures)
        r = self.batchN
        agree = "" if r.neighbour_agreement is None else f", agreement {r.neighbour_agreement:.0%}"
        return f"cosine {r.cosine:.5f}{agree}" + (f" ({self.note})" if self.note else "")


def check_parity(shop: Workshop, depth: int, precision: str, model: Path, tolerance,
                 multi_exit: bool = False) -> Parity:
    """ONNX Runtime vs PyTorch at batch 1 and batch n, against the profile's tolerances.

    With ``multi_exit``, compares the graph's ``tokens_<depth>`` / ``embedding_<depth>`` outputs.
    """
    from .validate import compare_outputs

    ref, outs = shop.reference(depth), shop.onnx_outputs(model)
    suffix = f"_{depth}" if multi_exit else ""
    got = {run: {k: outs[run][f"{k}{suffix}"] for k in ref} for run in ("batch1", "batchN")}
    labels = shop.images.labels if (shop.images.labels >= 0).all() else None
    n1 = len(got["batch1"]["embedding"])
    note = "fp16 on CPUExecutionProvider: host-emulated" if precision == "fp16" else ""
    b1 = compare_outputs({k: v[:n1] for k, v in ref.items()}, got["batch1"], tolerance,
                         labels=None if labels is None else labels[:n1], label=f"{precision} batch 1", note=note)
    bn = compare_outputs(ref, got["batchN"], tolerance, labels=labels, label=f"{precision} batch {len(ref['embedding'])}",
                         note=note)
    return Parity(bool(b1.passed and bn.passed), b1, bn, note)


def as_dict(obj) -> dict:
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    from dataclasses import asdict, is_dataclass

    return asdict(obj) if is_dataclass(obj) else dict(obj)


# ---------------------------------------------------------------------------------- candidates


@dataclass
class Trial:
    """One depth x precision for one profile, as far as it got."""

    depth: int
    precision: str
    model: Path
    quality: float | None
    size_mb: float
    predicted: Any = None  # LatencyResult from the cost model
    pruned: str = ""  # why it was dropped before parity / measuring
    parity: Parity | None = None
    latency: Any = None  # LatencyResult used for the budget check
    memory_mb: float | None = None

    @property
    def label(self) -> str:
        return f"d{self.depth} {self.precision}"


def exit_quality(metrics: dict, depth: int) -> float | None:
    """The exit's kNN top-1 from metrics.json, or None when the checkpoint has none."""
    entry = metrics.get("exits", {}).get(str(depth), {})
    q = entry.get("knn_top1")
    return float(q) if q is not None else None


def latency_value(result, stat: str) -> float:
    """The statistic the budget applies to (p50/p90/p99) of a LatencyResult, in ms."""
    return result.stat(stat)


def source_label(result) -> str:
    """``measured``, ``predicted``, ``calibrated``, with a note such as ``host-emulated fp16``."""
    return f"{result.source} ({result.note})" if result.note else result.source


def evaluate_candidates(shop: Workshop, profile, progress=None) -> list[Trial]:
    """Builds, prunes, checks parity of and times every depth x precision for ``profile``."""
    from .latency.predict import predict_latency, predict_memory

    budget = profile.budgets.latency_ms
    stat = profile.budgets.latency_stat
    trials = []
    for depth in shop.ckpt.config["exits"]:
        for precision in profile.precisions:
            preset = profile.int8_preset
            model = shop.model(depth, precision, profile.opset, preset)
            trials.append(Trial(depth, precision, model, exit_quality(shop.ckpt.metrics, depth),
                                model.stat().st_size / 1e6))
            if progress is not None:
                progress.update(1)
    # Predict from the graph (cheap) and prune before anything is run or timed. For a profile that is
    # not measured here the prediction is also the latency figure (what latency_for_profile returns
    # for it, labelled predicted or calibrated); host has no hardware figures and is only measured.
    for t in trials:
        if profile.hardware is None:
            continue
        t.predicted = t.latency = predict_latency(t.model, profile, profile.batch)
        t.memory_mb = t.predicted.peak_memory_mb
        pred = latency_value(t.predicted, stat)
        if budget is not None and pred > PRUNE_FACTOR * budget:
            t.pruned = f"predicted {pred:.3g} ms is over {PRUNE_FACTOR:g}x the {budget:g} ms budget"
    for t in trials:
        if t.pruned:
            continue
        # Judged on the all-exits graph the candidate was cut from (the same nodes; one session per
        # precision instead of one per depth); the chosen file is re-checked before it is bundled.
        graph, suffixed = shop.parity_graph(t.depth, t.precision, profile.opset, profile.int8_preset)
        t.parity = check_parity(shop, t.depth, t.precision, graph, profile.tolerance(t.precision), multi_exit=suffixed)
        if t.precision == "fp32" and not t.parity.passed:
            raise ValidationError(
                f"fp32 parity failed at depth {t.depth} ({t.parity.summary()}): the ONNX export does not "
                f"compute what PyTorch computes; no bundle written")
    timed = [t for t in trials if not t.pruned and t.parity.passed and (profile.measured or t.latency is None)]
    measure_trials(timed, profile)
    timed_ids = {id(t) for t in timed}
    for t in trials:
        if id(t) in timed_ids:
            t.memory_mb = t.latency.peak_memory_mb or predict_memory(t.model, profile.batch)
        elif t.memory_mb is None:
            t.memory_mb = predict_memory(t.model, profile.batch)
    return trials


def measure_trials(trials: list[Trial], profile, settings: dict | None = None) -> None:
    """Sets each trial's latency for ``profile``; measured ones are timed in one worker, interleaved.

    Where a deeper model comes out faster than a shallower one of the same precision beyond both
    errors (the deeper graph holds every node of the shallower one), those rows are measured again,
    together and with twice the rounds; a contradiction that survives is noted on both rows.
    """
    from .latency.predict import latencies_for_profile

    if not trials:
        return
    settings = dict(settings or MEASURE)
    for t, r in zip(trials, latencies_for_profile([t.model for t in trials], profile, profile.batch, **settings)):
        t.latency = r
    if not profile.measured:
        return
    busy = [t for t in trials if t.latency.disturbed]
    if busy:
        log.warning("%s: latency measured on a busy machine (%s); the figures are biased high and their errors "
                    "widened to match: measure on a quiet machine for tight figures", profile.name,
                    busy[0].latency.disturbed.removeprefix("busy machine: "))
    stats = sorted({"p50", profile.budgets.latency_stat})
    pairs = _inversions(trials, stats)
    if not pairs:
        return
    involved = sorted({i for pair in pairs for i in pair})
    log.info("latency table inverted (%s): re-measuring those rows", ", ".join(trials[i].label for i in involved))
    again = {**settings, "rounds": 2 * settings["rounds"],
             "max_rounds": 2 * settings["max_rounds"] if settings.get("max_rounds") else None}
    redo = latencies_for_profile([trials[i].model for i in involved], profile, profile.batch, **again)
    for i, r in zip(involved, redo):
        r.settings["remeasured"] = "a deeper model of the same precision was faster beyond both errors"
        trials[i].latency = r
    for i, j in _inversions(trials, stats):
        for t, other, word in ((trials[i], trials[j], "deeper"), (trials[j], trials[i], "shallower")):
            t.latency.note = ", ".join(filter(None, [t.latency.note, f"inconsistent with {word} {other.label}"]))
            t.latency.settings.setdefault("inconsistent_with", []).append(other.label)


def _inversions(trials: list[Trial], stats: list[str]) -> list[tuple[int, int]]:
    """(shallow, deep) index pairs whose latency, at any of ``stats``, is inverted beyond both errors."""
    from .latency.stats import depth_inversions

    return sorted({pair for stat in stats for pair in depth_inversions(
        [(t.depth, t.precision, t.latency.stat(stat), t.latency.error(stat) or 0.0) for t in trials])})


def to_candidates(trials: list[Trial], profile) -> list:
    from .selector import Candidate

    stat = profile.budgets.latency_stat
    out = []
    for t in trials:
        if t.pruned:  # rejected on latency by the selector; parity was never run
            passed, note = True, "not checked (pruned)"
        else:
            passed, note = t.parity.passed, t.parity.summary()
        out.append(Candidate(
            depth=t.depth, precision=t.precision, quality=t.quality, parity_passed=passed, parity_note=note,
            latency_ms=latency_value(t.latency, stat) if t.latency is not None else None,
            latency_stat=stat,
            latency_source=("none" if t.latency is None else source_label(t.latency))
            + (" (pruned: not run)" if t.pruned else ""),
            expected_error=None if t.latency is None else t.latency.error(stat),
            latency_disturbed=bool(getattr(t.latency, "disturbed", "")),
            memory_mb=t.memory_mb, size_mb=t.size_mb))
    return out
