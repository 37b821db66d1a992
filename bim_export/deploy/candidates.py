"""Candidates for a device: every checkpoint x resolution x exit depth x precision, built, pruned,
parity-checked and timed.

One :class:`~bim_export.deploy.workshop.Workshop` per checkpoint and resolution builds every
candidate's graph and the outputs parity compares, once, for every profile of the run. For one
profile, :func:`evaluate_candidates` then:

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
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.errors import ValidationError
from ..core.progress import SILENT, Progress
from ..runtime.parity import ParityResult, compare_outputs, emulation_note, merge_results
from .presets import preset as find_preset
from .workshop import (  # noqa: F401 - re-exported: callers import the shared artefacts from here
    CALIB_IMAGES, MIN_PARITY_IMAGES, ONNX_PROVIDER, PARITY_BATCH1, PARITY_IMAGES, Workshop, load_images)

if TYPE_CHECKING:
    from .profiles import Profile

log = logging.getLogger(__name__)

PRUNE_FACTOR = 2.0  # predicted latency above this many budgets is rejected before anything is measured
# Host timing: every candidate in one worker, interleaved; warm-up, then `rounds` rounds of `repeats`
# runs, disturbed rounds re-run up to `max_rounds`. Fewer than a benchmark's: host budgets are tens
# of ms, and a run times up to a dozen candidates.
MEASURE = {"warmup": 3, "repeats": 10, "rounds": 5, "max_rounds": 10}


# ------------------------------------------------------------------------------------ parity


def check_parity(shop: Workshop, depth: int, precision: str, model: Path, profile: Profile,
                 multi_exit: bool = False) -> ParityResult:
    """ONNX Runtime vs PyTorch at batch 1 and batch n, against the profile's tolerances.

    With ``multi_exit``, compares the graph's ``tokens_<depth>`` / ``embedding_<depth>`` (/ ``logits_<depth>``) outputs.

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
    """One depth x precision (of one checkpoint at one resolution) for one profile, as far as it got."""

    depth: int
    precision: str
    model: Path | None  # None: not built (see ``skipped``)
    quality: float | None
    size_mb: float | None
    predicted: Any = None  # LatencyResult from the cost model
    pruned: str = ""  # why it was dropped before parity / measuring
    parity: ParityResult | None = None
    latency: Any = None  # LatencyResult used for the budget check
    memory_mb: float | None = None
    usability: dict = field(default_factory=dict)  # {ep: EpCoverage} from ORT's checker (mobile profiles)
    runs_on: str = ""  # the EP whose device figures predict it: an accelerator that takes it, else the CPU
    shop: Any = None  # the Workshop of its checkpoint and resolution
    skipped: str = ""  # why it was not built at all (its workshop cannot hold the choice)
    checkpoint: str = ""  # its checkpoint as tables name it ("" in a run of one checkpoint)
    resolution: int | None = None  # its input size, px (None where the run has only the checkpoint's own)

    @property
    def label(self) -> str:
        return candidate_label(self.checkpoint, self.resolution, f"d{self.depth}", self.precision)

    @property
    def step(self) -> str:
        """How progress lines name it: ``depth 6 fp16``."""
        return candidate_label(self.checkpoint, self.resolution, f"depth {self.depth}", self.precision)

    @property
    def key(self) -> tuple:
        """What tells it apart from every other candidate of the run."""
        return self.checkpoint, self.resolution, self.depth, self.precision


def candidate_label(checkpoint: str, resolution: int | None, depth: str, precision: str) -> str:
    """``d6 fp16``; ``vit-s d6 @48px fp16`` where the run has several checkpoints or resolutions."""
    return " ".join(filter(None, [checkpoint, depth, f"@{resolution}px" if resolution else "", precision]))


def source_label(result) -> str:
    """``measured``, ``predicted``, ``calibrated``, with a note such as ``host-emulated fp16``."""
    return f"{result.source} ({result.note})" if result.note else result.source


def evaluate_candidates(shops: Workshop | list[Workshop], profile: Profile, progress: Progress = SILENT,
                        labelled: tuple[bool, bool] = (False, False)) -> list[Trial]:
    """Builds, prunes, checks parity of and times every depth x precision of every workshop (a
    checkpoint at a resolution) for ``profile``, telling ``progress`` each step (stages
    ``candidates``, ``predict``, ``parity``, ``time``); ``labelled``: whether the trials name their
    (checkpoint, resolution).

    Where several workshops compete and every exit has a quality figure (measured before anything is
    exported), they are taken best first, by their best exit. A workshop whose best exit is more than
    the selector's quality window below a candidate already within every budget cannot be chosen (the
    rule takes the best quality within budget, and trades latency only within that window): its
    candidates are listed, not built, so no graph of it is exported, checked or timed for this profile.
    """
    from .selector import QUALITY_WINDOW, within_budgets

    shops = shops if isinstance(shops, list) else [shops]
    tops = [_best_quality(s) for s in shops]
    ranked = len(shops) > 1 and all(q is not None for q in tops)
    order = sorted(range(len(shops)), key=lambda i: -tops[i]) if ranked else list(range(len(shops)))
    done: dict[int, list[Trial]] = {}
    best: Trial | None = None  # the best-quality built candidate within every budget so far
    for i in order:
        shop = shops[i]
        tag = (shop.name if labelled[0] else "", shop.resolution if labelled[1] else None)
        if ranked and best is not None and tops[i] < best.quality - QUALITY_WINDOW:
            why = (f"not built: its best exit scores {tops[i]:.1%}, more than {QUALITY_WINDOW * 100:g} point below "
                   f"{best.label} ({best.quality:.1%}), which is within every budget")
            done[i] = [Trial(d, p, None, shop.exit_quality(d), None, skipped=why, shop=shop, checkpoint=tag[0],
                             resolution=tag[1]) for d in shop.ckpt.config["exits"] for p in profile.precisions]
            continue
        done[i] = _evaluate_shop(shop, profile, progress, tag)
        if ranked:
            fits = [t for t, c in zip(done[i], to_candidates(done[i], profile)) if within_budgets(c, profile.budgets)]
            best = max([t for t in (best, *fits) if t is not None], key=lambda t: t.quality, default=None)
    return [t for i in range(len(shops)) for t in done[i]]


def _best_quality(shop: Workshop) -> float | None:
    """The best exit's quality of ``shop`` (None where an exit has no figure)."""
    qualities = [shop.exit_quality(d) for d in shop.ckpt.config["exits"]]
    return None if any(q is None for q in qualities) else max(qualities)


def _evaluate_shop(shop: Workshop, profile: Profile, progress: Progress, tag: tuple) -> list[Trial]:
    """Every depth x precision of one workshop for ``profile``: built, predicted and pruned, parity
    checked, and timed."""
    from .latency.costmodel import predict_memory
    from .placement import predict_on_device
    from .usability import check_model, is_mobile

    budget = profile.budgets.latency_ms
    stat = profile.budgets.latency_stat
    trials = []
    total = len(shop.ckpt.config["exits"]) * len(profile.precisions)
    with progress.stage("candidates", total, profile.name) as st:
        for depth in shop.ckpt.config["exits"]:
            for precision in profile.precisions:
                st.step(candidate_label(*tag, f"depth {depth}", precision), shop.pending(depth, precision, profile))
                model = shop.model(depth, precision, profile)
                trials.append(Trial(depth, precision, model, shop.exit_quality(depth), model.stat().st_size / 1e6,
                                    shop=shop, checkpoint=tag[0], resolution=tag[1]))
    # Predict from the graph (cheap) and prune before anything is run or timed. For a profile that is
    # not measured here the prediction is also the latency figure (what latency_for_profile returns
    # for it, labelled predicted or calibrated); host has no hardware figures and is only measured.
    if is_mobile(profile):  # what the phone's accelerator takes of each graph decides where it is predicted
        with progress.stage("usability", len(trials), profile.name) as st:
            for t in trials:
                st.step(t.step)
                t.usability = check_model(t.model, profile)
    predictable = trials if profile.hardware is not None else []  # host has no figures: only measured
    with progress.stage("predict", len(predictable), profile.name) as st:
        for t in predictable:
            st.step(t.step)
            t.predicted = t.latency = predict_on_device(t.model, t.usability, profile)
            t.runs_on = t.predicted.settings["runs_on"]
            t.memory_mb = t.predicted.peak_memory_mb
            pred = t.predicted.stat(stat)
            if budget is not None and pred > PRUNE_FACTOR * budget:
                t.pruned = f"predicted {pred:.3g} ms is over {PRUNE_FACTOR:g}x the {budget:g} ms budget"
    checked = [t for t in trials if not t.pruned]
    with progress.stage("parity", len(checked), profile.name) as st:
        for t in checked:
            st.step(t.step)
            # Judged on the all-exits graph the candidate was cut from (the same nodes; one session per
            # precision instead of one per depth); the chosen file is re-checked before it is bundled.
            graph, suffixed = t.shop.parity_graph(t.depth, t.precision, profile)
            t.parity = check_parity(t.shop, t.depth, t.precision, graph, profile, multi_exit=suffixed)
            if t.precision == "fp32" and not t.parity.passed:
                raise ValidationError(
                    f"fp32 parity failed at {t.label} ({t.parity.brief()}): the ONNX export does not "
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

    # only graphs of one checkpoint at one resolution and precision nest inside each other
    return sorted({pair for stat in stats for pair in depth_inversions(
        [(t.depth, (t.checkpoint, t.resolution, t.precision), t.latency.stat(stat), t.latency.error(stat) or 0.0)
         for t in trials])})


def to_candidates(trials: list[Trial], profile: Profile) -> list:
    from .selector import Candidate

    stat = profile.budgets.latency_stat
    out = []
    for t in trials:
        if t.skipped:  # rejected by the selector with its reason; nothing was built
            passed, note = True, "not checked (not built)"
        elif t.pruned:  # rejected on latency by the selector; parity was never run
            passed, note = True, "not checked (pruned)"
        else:
            passed, note = t.parity.passed, t.parity.brief()
        out.append(Candidate(
            depth=t.depth, precision=t.precision, checkpoint=t.checkpoint, resolution=t.resolution, quality=t.quality, parity_passed=passed, parity_note=note,
            latency_ms=t.latency.stat(stat) if t.latency is not None else None,
            latency_stat=stat,
            latency_source=("none" if t.latency is None else source_label(t.latency))
            + (" (pruned: not run)" if t.pruned else " (not built)" if t.skipped else ""),
            expected_error=None if t.latency is None else t.latency.error(stat),
            latency_disturbed=bool(getattr(t.latency, "disturbed", "")),
            memory_mb=t.memory_mb, size_mb=t.size_mb,
            launch_share=(None if t.predicted is None or t.latency is not t.predicted
                          else t.predicted.settings.get("launch_share")),
            float_weight_share=None if t.predicted is None else t.predicted.settings.get("float_weight_share"),
            skipped=t.skipped))
    return out
