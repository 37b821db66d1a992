"""Candidates for a device: every exit depth x precision, built, pruned, parity-checked and timed.

One :class:`Workshop` per run exports every exit in ONE multi-exit graph, rewrites it once per graph
form a profile asks for (fixed batch, ops its accelerator lacks: :mod:`~bim_export.deploy.rewrite`),
converts that once per precision (and int8 preset), and cuts each depth's graph out of it; it also
computes the PyTorch reference outputs once per depth and the ONNX Runtime outputs once per graph. Every profile
of the run reuses them. For one profile, :func:`evaluate_candidates` then:

1. for a phone profile (NNAPI, CoreML, XNNPACK), runs ORT's usability checker on each candidate's
   graph (:mod:`~bim_export.deploy.usability`); predicts each candidate's latency from its graph where
   it runs (the accelerator that takes it, else the CPU cores: :mod:`~bim_export.deploy.placement`)
   and rejects those far over the budget, before anything is run or timed;
2. checks parity against PyTorch on real images at batch 1 and batch n with the profile's
   tolerances (a failed precision rejects that candidate; a failed fp32 is an export bug);
3. gets the latency the budget is checked against: measured for host / calibrated profiles,
   predicted otherwise, labelled. Measured candidates are timed together, interleaved; a table in
   which a deeper model is faster than a shallower one of the same precision beyond their errors
   has those rows re-measured, and says so where they still disagree.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..core.errors import ValidationError
from ..core.progress import SILENT, Progress
from ..model.checkpoint import exit_quality
from ..model.images import Images
from ..runtime.parity import ParityResult, compare_outputs, emulation_note, merge_results
from ..runtime.session import fixed_batch, run_onnx
from .export import cut_exits
from .presets import preset as find_preset
from .rewrite import GraphForm, apply_form, form_for

if TYPE_CHECKING:
    from .profiles import Profile

log = logging.getLogger(__name__)

PRUNE_FACTOR = 2.0  # predicted latency above this many budgets is rejected before anything is measured
CALIB_IMAGES = 32  # static int8 calibration
PARITY_IMAGES = 32  # parity at batch n (all of them) and batch 1 (the first PARITY_BATCH1)
PARITY_BATCH1 = 4
# Fewer images than this and parity says little: neighbour agreement moves in steps of 1/n (and
# needs 3 images at all), so a --data folder must have at least this many readable images.
MIN_PARITY_IMAGES = 16
ONNX_PROVIDER = "CPUExecutionProvider"  # what parity runs on here
# Host timing: every candidate in one worker, interleaved; warm-up, then `rounds` rounds of `repeats`
# runs, disturbed rounds re-run up to `max_rounds`. Fewer than a benchmark's: host budgets are tens
# of ms, and a run times up to a dozen candidates.
MEASURE = {"warmup": 3, "repeats": 10, "rounds": 5, "max_rounds": 10}


# ---------------------------------------------------------------------------- shared artefacts


def load_images(data: Path | None, config: dict) -> Images:
    """The calibration and parity images of an export (see :func:`bim_export.model.images.load_check_images`)."""
    from ..model.images import load_check_images

    return load_check_images(data, config, CALIB_IMAGES, PARITY_IMAGES, MIN_PARITY_IMAGES)


class Workshop:
    """Exports, conversions and outputs of one run, each made once and shared by all profiles.

    Files live in ``work/`` keyed by depth, precision, opset and int8 preset: what a profile asks of
    a graph, read from it in one place (:meth:`_graph`).
    """

    def __init__(self, ckpt, images: Images, work: Path):
        self.ckpt, self.images, self.work = ckpt, images, work
        self._backbones: dict[int, Any] = {}
        self._refs: dict[int, dict[str, np.ndarray]] = {}
        self._models: dict[tuple, Path] = {}
        self._outputs: dict[Path, dict[str, dict[str, np.ndarray]]] = {}
        self.fixed_batches: dict[Path, int | None] = {}  # each run graph's fixed batch (None: dynamic)
        self.conversions: dict[Path, dict] = {}  # QuantInfo of each converted file, for the manifest

    def backbone(self, depth: int):
        if depth not in self._backbones:
            from ..model.backbone import build_backbone

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
        """metadata_props of the exported graphs: the source, the preprocessing, and how the
        ``embedding`` output pools the tokens (``token`` / ``avg``) and how many of the ``tokens``
        output's leading tokens are prefix tokens (class and register tokens)."""
        cfg = self.ckpt.config
        bb = self.backbone(max(cfg["exits"]))
        return {"depth": max(cfg["exits"]), "exits": list(cfg["exits"]), "precision": precision,
                "mean": list(cfg["mean"]), "std": list(cfg["std"]), "resolution": cfg["img_size"],
                "pooling": bb.global_pool, "prefix_tokens": int(bb.num_prefix_tokens)}

    @staticmethod
    def _graph(precision: str, profile: Profile, dynamic: bool = False) -> tuple[str, int, str | None, GraphForm]:
        """(precision, opset, int8 preset or None, graph form): what a profile asks of a graph at
        ``precision`` (with ``dynamic``, of its second, dynamic-batch file)."""
        preset = profile.int8_preset if precision == "int8" else None
        return precision, profile.opset, preset, form_for(profile, dynamic)

    def full_graph(self, precision: str, profile: Profile, dynamic: bool = False) -> Path:
        """The multi-exit graph of every exit at ``precision`` in ``profile``'s form: exported (fp32),
        rewritten (:mod:`~bim_export.deploy.rewrite`) or converted once, and shared with every profile
        asking for the same opset, preset and form.

        Converting the whole graph once and cutting exits out of it gives the same per-exit graphs
        as converting each depth's graph (weight quantization is per node, and calibration ranges
        of a tensor do not depend on the blocks after it), at a fraction of the cost.
        """
        return self._full(*self._graph(precision, profile, dynamic))

    def _full(self, precision: str, opset: int, preset: str | None, form: GraphForm) -> Path:
        key = ("full", precision, opset, preset, form)
        if key in self._models:
            return self._models[key]
        name = "-".join(str(k) for k in (precision, opset, preset, form.key) if k)
        path = self.work / f"all-exits-{name}.onnx"
        if precision == "fp32" and form.plain:
            from .export import export_onnx

            exits = self.ckpt.config["exits"]
            log.info("exporting exits %s in one graph (opset %d)", exits, opset)
            export_onnx(self.backbone(max(exits)), path, opset=opset, img_size=self.ckpt.config["img_size"],
                        metadata=self.metadata("fp32"), multi_exit=True, exits={d: self.backbone(d) for d in exits})
        elif precision == "fp32":
            log.info("rewriting the exits' graph: %s", form.describe())
            apply_form(self._full("fp32", opset, None, GraphForm()), path, form)
        else:
            from .quantize import convert_precision

            log.info("converting the exits to %s%s", precision, f" ({preset})" if preset else "")
            calib = self.images.calib if precision == "int8" else None
            info = convert_precision(self._full("fp32", opset, None, form), path, precision, calib_x=calib,
                                     preset=preset)
            self.conversions[path] = info.to_dict()
        self._models[key] = path
        return path

    def model(self, depth: int, precision: str, profile: Profile, multi_exit: bool = False, dynamic: bool = False) -> Path:
        """The ONNX file of exit ``depth`` at ``precision`` for ``profile`` (with ``multi_exit``: every
        exit up to ``depth`` in one graph; with ``dynamic``: the profile's dynamic-batch form), cut out
        of :meth:`full_graph` on first use."""
        return self._model(depth, *self._graph(precision, profile, dynamic), multi_exit)

    def _model(self, depth: int, precision: str, opset: int, preset: str | None, form: GraphForm,
               multi_exit: bool) -> Path:
        key = (depth, precision, opset, preset, form, multi_exit)
        if key in self._models:
            return self._models[key]
        path = self.work / ("-".join(str(k) for k in (f"d{depth}", precision, opset, preset, form.key) if k)
                            + ("-multi" if multi_exit else "") + ".onnx")
        depths = [d for d in self.ckpt.config["exits"] if d <= depth] if multi_exit else [depth]
        if self.too_big_to_cut:
            self._export_depth(depth, depths, precision, opset, preset, form, multi_exit, path)
        else:
            full = self._full(precision, opset, preset, form)
            cut_exits(full, path, depths, single=not multi_exit)
            if full in self.conversions:
                self.conversions[path] = {**self.conversions[full],
                                          "graph": "converted as the all-exits graph, this depth cut out of it"}
        self._models[key] = path
        return path

    def pending(self, depth: int, precision: str, profile) -> str:
        """What :meth:`model` of this candidate still has to make, for progress lines: ``export``,
        ``rewrite``, ``convert``, ``calibrate + convert``, else ``cut`` or ``reuse`` (an earlier profile's)."""
        precision, opset, preset, form = self._graph(precision, profile)

        def made(prec: str, pre: str | None, frm: GraphForm) -> bool:
            return bool({("full", prec, opset, pre, frm), (depth, prec, opset, pre, frm, False)} & self._models.keys())

        steps = [] if made("fp32", None, GraphForm()) else ["export"]
        steps += [] if form.plain or made("fp32", None, form) else ["rewrite"]
        if precision != "fp32" and not made(precision, preset, form):
            steps.append("calibrate + convert" if precision == "int8" and getattr(find_preset(preset), "static", False) else "convert")
        return " + ".join(steps) or ("reuse" if (depth, precision, opset, preset, form, False) in self._models else "cut")

    @cached_property
    def too_big_to_cut(self) -> bool:
        """Whether the all-exits graph would pass protobuf's 2 GB limit (ViT-H and up): each depth is
        then exported and converted on its own, its weights as external data."""
        bb = self.backbone(max(self.ckpt.config["exits"]))
        return sum(p.numel() for p in bb.parameters()) * 4 > 1_500_000_000

    def parity_graph(self, depth: int, precision: str, profile: Profile) -> tuple[Path, bool]:
        """The graph a candidate's parity is judged on, and whether its outputs carry the exit suffix."""
        if self.too_big_to_cut:
            return self.model(depth, precision, profile), False
        return self.full_graph(precision, profile), True

    def _export_depth(self, depth, depths, precision, opset, preset, form, multi_exit, path) -> None:
        if precision == "fp32" and form.plain:
            from .export import export_onnx

            exits = {d: self.backbone(d) for d in depths} if multi_exit else None
            export_onnx(self.backbone(depth), path, opset=opset, img_size=self.ckpt.config["img_size"],
                        metadata={**self.metadata("fp32"), "depth": depth}, multi_exit=multi_exit, exits=exits)
        elif precision == "fp32":
            apply_form(self._model(depth, "fp32", opset, None, GraphForm(), multi_exit), path, form)
        else:
            from .quantize import convert_precision

            src = self._model(depth, "fp32", opset, None, form, multi_exit)
            calib = self.images.calib if precision == "int8" else None
            self.conversions[path] = convert_precision(src, path, precision, calib_x=calib, preset=preset).to_dict()

    def onnx_outputs(self, model: Path) -> dict[str, dict[str, np.ndarray]]:
        """ONNX Runtime (CPU EP) outputs on the parity images at batch 1 and batch n (a model with a
        fixed batch: at that batch, ``batch1`` its first images)."""
        if model not in self._outputs:
            import onnxruntime as ort

            sess = ort.InferenceSession(str(model), providers=[ONNX_PROVIDER])
            x = self.images.parity
            n1 = min(PARITY_BATCH1, len(x))
            full = run_onnx(sess, x, len(x))
            self.fixed_batches[model] = fixed_batch(sess)
            ones = {k: v[:n1] for k, v in full.items()} if self.fixed_batches[model] else run_onnx(sess, x[:n1], 1)
            self._outputs[model] = {"batch1": ones, "batchN": full}
        return self._outputs[model]


# ------------------------------------------------------------------------------------ parity


def check_parity(shop: Workshop, depth: int, precision: str, model: Path, profile: Profile,
                 multi_exit: bool = False) -> ParityResult:
    """ONNX Runtime vs PyTorch at batch 1 and batch n, against the profile's tolerances.

    With ``multi_exit``, compares the graph's ``tokens_<depth>`` / ``embedding_<depth>`` outputs.

    Returns:
        The merged result; its runs ``batch1`` and ``batchN`` hold each batch size's figures.
    """
    tolerance = profile.tolerance(precision)
    ref, outs = shop.reference(depth), shop.onnx_outputs(model)
    suffix = f"_{depth}" if multi_exit else ""
    got = {run: {k: outs[run][f"{k}{suffix}"] for k in ref} for run in ("batch1", "batchN")}
    labels = shop.images.labels if (shop.images.labels >= 0).all() else None
    n1 = len(got["batch1"]["embedding"])
    preset = find_preset(profile.int8_preset) if precision == "int8" else None
    note = emulation_note(precision, preset and preset.name, ONNX_PROVIDER,
                          native_cpus=preset.native_cpus if preset else None)
    fixed = shop.fixed_batches.get(model)
    one, many = ((f"batch {fixed} (fixed)", f"{len(ref['embedding'])} images at fixed batch {fixed}") if fixed
                 else ("batch 1", f"batch {len(ref['embedding'])}"))
    b1 = compare_outputs({k: v[:n1] for k, v in ref.items()}, got["batch1"], tolerance,
                         labels=None if labels is None else labels[:n1], label=f"{precision} {one}", note=note)
    bn = compare_outputs(ref, got["batchN"], tolerance, labels=labels, label=f"{precision} {many}", note=note)
    return merge_results({"batch1": b1, "batchN": bn}, label=precision)


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
    parity: ParityResult | None = None
    latency: Any = None  # LatencyResult used for the budget check
    memory_mb: float | None = None
    usability: dict = field(default_factory=dict)  # {ep: EpCoverage} from ORT's checker (mobile profiles)
    runs_on: str = ""  # the EP whose device figures predict it: an accelerator that takes it, else the CPU

    @property
    def label(self) -> str:
        return f"d{self.depth} {self.precision}"


def source_label(result) -> str:
    """``measured``, ``predicted``, ``calibrated``, with a note such as ``host-emulated fp16``."""
    return f"{result.source} ({result.note})" if result.note else result.source


def evaluate_candidates(shop: Workshop, profile: Profile, progress: Progress = SILENT) -> list[Trial]:
    """Builds, prunes, checks parity of and times every depth x precision for ``profile``, telling
    ``progress`` each step (stages ``candidates``, ``predict``, ``parity``, ``time``)."""
    from .latency.costmodel import predict_memory
    from .placement import predict_on_device
    from .usability import check_model, is_mobile

    budget = profile.budgets.latency_ms
    stat = profile.budgets.latency_stat
    trials = []
    exits = shop.ckpt.config["exits"]
    with progress.stage("candidates", len(exits) * len(profile.precisions), profile.name) as st:
        for depth in exits:
            for precision in profile.precisions:
                st.step(f"depth {depth} {precision}", shop.pending(depth, precision, profile))
                model = shop.model(depth, precision, profile)
                trials.append(Trial(depth, precision, model, exit_quality(shop.ckpt.metrics, depth),
                                    model.stat().st_size / 1e6))
    # Predict from the graph (cheap) and prune before anything is run or timed. For a profile that is
    # not measured here the prediction is also the latency figure (what latency_for_profile returns
    # for it, labelled predicted or calibrated); host has no hardware figures and is only measured.
    if is_mobile(profile):  # what the phone's accelerator takes of each graph decides where it is predicted
        with progress.stage("usability", len(trials), profile.name) as st:
            for t in trials:
                st.step(f"depth {t.depth} {t.precision}")
                t.usability = check_model(t.model, profile)
    predictable = trials if profile.hardware is not None else []  # host has no figures: only measured
    with progress.stage("predict", len(predictable), profile.name) as st:
        for t in predictable:
            st.step(f"depth {t.depth} {t.precision}")
            t.predicted = t.latency = predict_on_device(t.model, t.usability, profile)
            t.runs_on = t.predicted.settings["runs_on"]
            t.memory_mb = t.predicted.peak_memory_mb
            pred = t.predicted.stat(stat)
            if budget is not None and pred > PRUNE_FACTOR * budget:
                t.pruned = f"predicted {pred:.3g} ms is over {PRUNE_FACTOR:g}x the {budget:g} ms budget"
    checked = [t for t in trials if not t.pruned]
    with progress.stage("parity", len(checked), profile.name) as st:
        for t in checked:
            st.step(f"depth {t.depth} {t.precision}")
            # Judged on the all-exits graph the candidate was cut from (the same nodes; one session per
            # precision instead of one per depth); the chosen file is re-checked before it is bundled.
            graph, suffixed = shop.parity_graph(t.depth, t.precision, profile)
            t.parity = check_parity(shop, t.depth, t.precision, graph, profile, multi_exit=suffixed)
            if t.precision == "fp32" and not t.parity.passed:
                raise ValidationError(
                    f"fp32 parity failed at depth {t.depth} ({t.parity.brief()}): the ONNX export does not "
                    f"compute what PyTorch computes; no bundle written")
    timed = [t for t in checked if t.parity.passed and (profile.measured or t.latency is None)]
    measure_trials(timed, profile, progress=progress)
    timed_ids = {id(t) for t in timed}
    for t in trials:
        if id(t) in timed_ids:
            t.memory_mb = t.latency.peak_memory_mb or predict_memory(t.model, profile.batch)
        elif t.memory_mb is None:
            t.memory_mb = predict_memory(t.model, profile.batch)
    return trials


def measure_trials(trials: list[Trial], profile: Profile, settings: dict | None = None,
                   progress: Progress = SILENT) -> None:
    """Sets each trial's latency for ``profile``; measured ones are timed in one worker, interleaved.

    Where a deeper model comes out faster than a shallower one of the same precision beyond both
    errors (the deeper graph holds every node of the shallower one), those rows are measured again,
    together and with twice the rounds; a contradiction that survives is noted on both rows.
    """
    from .latency.predict import latencies_for_profile

    if not trials:
        return
    settings = dict(settings or MEASURE)
    with progress.stage("time", 1, profile.name) as st:
        st.step(f"{len(trials)} candidates" + (" on this machine, interleaved" if profile.measured else ""),
                "measure" if profile.measured else "predict")
        results = latencies_for_profile([t.model for t in trials], profile, profile.batch, **settings)
    for t, r in zip(trials, results):
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
    with progress.stage("time again", 1, profile.name) as st:
        st.step(", ".join(trials[i].label for i in involved), "measure again")
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


def to_candidates(trials: list[Trial], profile: Profile) -> list:
    from .selector import Candidate

    stat = profile.budgets.latency_stat
    out = []
    for t in trials:
        if t.pruned:  # rejected on latency by the selector; parity was never run
            passed, note = True, "not checked (pruned)"
        else:
            passed, note = t.parity.passed, t.parity.brief()
        out.append(Candidate(
            depth=t.depth, precision=t.precision, quality=t.quality, parity_passed=passed, parity_note=note,
            latency_ms=t.latency.stat(stat) if t.latency is not None else None,
            latency_stat=stat,
            latency_source=("none" if t.latency is None else source_label(t.latency))
            + (" (pruned: not run)" if t.pruned else ""),
            expected_error=None if t.latency is None else t.latency.error(stat),
            latency_disturbed=bool(getattr(t.latency, "disturbed", "")),
            memory_mb=t.memory_mb, size_mb=t.size_mb,
            launch_share=None if t.latency is not t.predicted else t.predicted.settings.get("launch_share"),
            float_weight_share=None if t.predicted is None else t.predicted.settings.get("float_weight_share")))
    return out
