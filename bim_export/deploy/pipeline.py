"""The main job: ``bim-export --target NAME`` from checkpoint to deployable bundle.

For each target profile::

    candidates = checkpoints x resolutions x exits x profile precisions   (deploy.sources)
      -> prune by predicted latency (nothing measured yet)
      -> parity vs PyTorch at batch 1 and batch n (a failed precision rejects that candidate only)
      -> latency for the profile (measured on host / calibrated profiles, predicted otherwise)
      -> selector -> bundle

Work is shared (see :mod:`bim_export.deploy.candidates`): each depth x precision x opset is exported (or
converted) once into a work folder under ``out/`` and reused by every profile of the run, and so are
the PyTorch reference outputs and the ONNX Runtime outputs used for parity. ``--target all`` runs
every shipped profile in one go and prints one summary table.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import InputError, NoCandidateError, ValidationError
from ..core.progress import SILENT, Progress
from ..core.table import format_table
from .bundle import BundleSpec, bundle_kind, write_bundle
from .candidates import (Trial, Workshop, check_parity, evaluate_candidates, source_label,
                         to_candidates)
from ..runtime.parity import ParityResult
from .pareto import PlotPoint
from .profiles import Profile, list_profiles, load_profile
from .selector import quality_label, select

log = logging.getLogger(__name__)

REFERENCE_IMAGES = 4  # inputs + PyTorch outputs stored in the bundle


# ------------------------------------------------------------------------------------- targets


def resolve_targets(target: str) -> list:
    """``all`` -> every shipped profile; else one profile (name, alias or YAML path).

    Raises:
        InputError: unknown name (listing the valid ones and close matches) or a bad YAML file.
    """
    if target == "all":
        return [load_profile(name) for name in list_profiles()]
    return [load_profile(target)]


# ------------------------------------------------------------------------------------- profile


@dataclass
class Outcome:
    """What one profile's export produced (for the summary)."""

    profile: str
    bundle: Path | None = None
    choice: Trial | None = None
    error: str = ""
    table: str = ""
    stat: str = "p50"
    budget_ms: float | None = None
    latency_source: str = ""


def export_profile(shops: Workshop | list[Workshop], profile: Profile, out: Path, multi_exit: bool = False,
                   progress: Progress = SILENT, early_exit: tuple | None = None,
                   quality: tuple[str, str | None] | None = None, labelled: tuple[bool, bool] = (False, False)
                   ) -> Outcome:
    """Candidates -> selector -> bundle for one profile, each step told to ``progress``; with
    ``early_exit`` (held-out images, accuracy loss in points), the stage segments beside the choice.

    Args:
        shops: the workshop of each (checkpoint, resolution) whose candidates compete.
        quality: the candidates' quality metric and the set that scored it (default: metrics.json's).
        labelled: whether the table names each candidate's checkpoint, and its resolution.

    Raises:
        NoCandidateError: nothing meets the budgets (with the candidate table).
        ValidationError: fp32 parity failed (an export bug); nothing is written.
    """
    from ..model.checkpoint import quality_metric, quality_source

    shops = shops if isinstance(shops, list) else [shops]
    trials = evaluate_candidates(shops, profile, progress, labelled)
    metrics = shops[0].ckpt.metrics
    metric, qsource = quality or (quality_metric(metrics) or "knn_top1", quality_source(metrics))
    selection = select(to_candidates(trials, profile), profile, qsource, metric)
    choice = next(t for t in trials if t.key == selection.choice.key)
    shop = choice.shop
    stat, budget = profile.budgets.latency_stat, profile.budgets.latency_ms
    with progress.stage("bundle", 2 + bool(profile.dynamic_batch_file) + multi_exit, profile.name) as st:
        item = choice.step
        st.step(f"{item}: parity of the file that ships", "check")
        shipped = verify_file(shop, choice, choice.model, profile)
        n = min(REFERENCE_IMAGES, len(shop.images.parity))
        ref = shop.reference(choice.depth)
        # pixels, tokens, embedding (and a classifier's logits), and the images' labels
        reference = {"pixels": shop.images.parity[:n], **{k: v[:n] for k, v in ref.items()},
                     "labels": shop.images.labels[:n]}
        dynamic, dynamic_parity = None, None
        if profile.dynamic_batch_file:  # the second file the profile asks for: same graph, batch axis dynamic
            st.step(f"{item}: its dynamic-batch file", "check")
            dynamic = shop.model(choice.depth, choice.precision, profile, dynamic=True)
            dynamic_parity = verify_file(shop, choice, dynamic, profile)
        model, exit_parity = None, {}
        if multi_exit:
            st.step(f"{item}: one graph of every exit up to it", "export")
            model, exit_parity = multi_exit_model(shop, choice, profile)
            for d in exit_parity:
                reference.update({f"{k}_{d}": v[:n] for k, v in shop.reference(int(d)).items()})
        points = [PlotPoint(t.depth, t.precision, None if t.latency is None else t.latency.stat(stat),
                            t.quality, rejected=_rejection(selection, t), chosen=t is choice,
                            source="" if t.latency is None else source_label(t.latency),
                            error=None if t.latency is None else t.latency.error(stat),
                            checkpoint=t.checkpoint, resolution=t.resolution)
                  for t in trials]
        early = None
        if early_exit is not None:
            from .early_exit import build_early_exit

            early = build_early_exit(shop, profile, *early_exit, progress=progress)
        chosen_row = next(r for r in selection.rows if r.status == "chosen")
        lat_ms = choice.latency.stat(stat)
        why = (f"Depth {choice.depth} in {choice.precision}{_where(choice)}: {chosen_row.reason}. Its latency is {lat_ms:.2f} ms {stat}"
               f"{_error_text(choice.latency, stat)} ({source_label(choice.latency)})"
               + (f" against a budget of {budget:g} ms" if budget else "")
               + f"; parity {choice.parity.brief()}. The rule: among candidates that pass parity and every budget, "
               + ("the deepest (no quality figure for every exit)" if selection.quality_metric == "depth" else
                  f"the best quality (the exit's {quality_label(selection.quality_metric)}); within half a point of "
                  "it, the lowest latency."))
        spec = BundleSpec(profile=profile, selection=selection, choice=choice, parity=shipped,
                          checkpoint=shop.config, metrics=shop.ckpt.metrics, source=source_record(shop),
                          data=shop.images.describe(),
                          conversion=shop.conversions.get(choice.model, {"precision": "fp32", "method": "export"}),
                          reference=reference, points=points, why=why, model_path=model, exit_parity=exit_parity,
                          mobile=mobile_record(trials, choice, profile), dynamic_model=dynamic,
                          dynamic_parity=dynamic_parity, early_exit=early)
        st.step(f"{item} to {Path(out) / profile.name}", "write")
        bundle = write_bundle(out, spec)
        return Outcome(profile.name, bundle, choice, table=selection.table(), stat=stat, budget_ms=budget,
                       latency_source=source_label(choice.latency))


def source_record(shop: Workshop) -> dict:
    """What manifest.json's ``checkpoint`` adds on the chosen candidate's source: its folder, how
    tables name it, its own size and the chosen resolution, and the set that measured its quality
    there (where it is not metrics.json's)."""
    record = {"source": str(shop.ckpt.path), "img_size": shop.ckpt.config["img_size"], "resolution": shop.resolution}
    if shop.name:
        record["name"] = shop.name
    if shop.measured is not None:
        record["quality_dataset"] = {**shop.measured.dataset, "resolution": shop.resolution}
    return record


def _where(t: Trial) -> str:
    """`` at 48 px of vit-s`` for a candidate named by resolution or checkpoint."""
    return (f" at {t.resolution} px" if t.resolution else "") + (f" of {t.checkpoint}" if t.checkpoint else "")


def mobile_record(trials: list[Trial], choice: Trial, profile: Profile) -> dict | None:
    """For a profile with NNAPI, CoreML or XNNPACK: the graph form, ORT's usability check of the
    chosen file per EP, where it is predicted, and every candidate's check in a line."""
    from .rewrite import form_for
    from .usability import is_mobile

    if not is_mobile(profile):
        return None
    return {"graph_form": form_for(profile).to_dict(), "runs_on": choice.runs_on,
            "usability": {ep: c.to_dict() for ep, c in choice.usability.items()},
            "candidates": {t.label: {ep: c.brief() for ep, c in t.usability.items()} | {"runs_on": t.runs_on}
                           for t in trials}}


def verify_file(shop: Workshop, choice: Trial, model: Path, profile: Profile):
    """Parity of the very file that ships (candidates were judged on the graph it was cut from)."""
    result = check_parity(shop, choice.depth, choice.precision, model, profile)
    if not result.passed:
        raise ValidationError(f"{choice.label}: the exported file fails parity ({result.brief()}) although its "
                              f"source graph passed; no bundle written")
    return result


def multi_exit_model(shop: Workshop, choice: Trial, profile: Profile) -> tuple[Path, dict[str, ParityResult]]:
    """The chosen precision as one graph with an output per exit up to the chosen depth, and its
    parity per exit (the single-exit graph passed; a failing exit here is an export bug)."""
    shop = choice.shop or shop
    model = shop.model(choice.depth, choice.precision, profile, multi_exit=True)
    per_exit = {}
    for d in (d for d in shop.ckpt.config["exits"] if d <= choice.depth):
        result = check_parity(shop, d, choice.precision, model, profile, multi_exit=True)
        if not result.passed and (d == choice.depth or choice.precision == "fp32"):
            raise ValidationError(f"multi-exit graph, exit {d} ({choice.precision}): parity failed "
                                  f"({result.brief()}); no bundle written")
        per_exit[str(d)] = result
    return model, per_exit


def _rejection(selection, trial: Trial) -> str | None:
    for row in selection.rows:
        if row.candidate.key == trial.key:
            return row.reason if row.status == "rejected" else None
    return trial.pruned or None


# --------------------------------------------------------------------------------------- run


def run_export(target: str, checkpoint: Path | list[Path] | None = None, out: Path = Path("exports"),
               data: Path | None = None, multi_exit: bool = False, progress: Progress = SILENT,
               early_exit: float | None = None, eval_data: Path | None = None,
               resolutions: list[int] | None = None) -> str:
    """Exports the best backbone for ``target`` (a profile, alias, YAML path or ``all``), telling
    ``progress`` each stage of the work (silent by default).

    ``checkpoint`` may be several, or a folder of runs, and ``resolutions`` (px; 0 for a checkpoint's
    own) overrides each profile's ``resolutions``: their candidates compete in one table
    (:mod:`~bim_export.deploy.sources`), quality measured at each candidate's resolution.

    With ``early_exit`` (the held-out accuracy, in points, the cascade may lose against the deepest
    exit) a joint fine-tuned checkpoint's stage segments go into each bundle, with thresholds fitted
    on its held-out split, or on the labelled folder ``eval_data``. ``eval_data`` also re-scores every
    candidate's quality where checkpoints were scored on different sets, or resolutions other than a
    checkpoint's own compete.

    Returns:
        A human summary: the bundle(s), choice, latency with its source, parity.

    Raises:
        InputError: unknown target, bad checkpoint, resolution or data, checkpoints whose quality does
            not compare, or an ``out/<profile>`` that holds something other than a bundle or cannot be
            written (exit 2; checked before any work).
        NoCandidateError: nothing meets the budget (exit 3; for ``all``, after the other bundles).
        ValidationError: fp32 parity failed (exit 4; no bundle for that profile).
    """
    from ..core.atomic import check_destination, work_dir
    from ..core.resources import default_checkpoint_dir
    from .sources import open_sources

    profiles = resolve_targets(target)
    paths = checkpoint if isinstance(checkpoint, list) else [checkpoint] if checkpoint is not None else []
    out = Path(out)
    sources = open_sources(paths or [default_checkpoint_dir()], profiles, data, out, resolutions, eval_data)
    ckpt = sources.ckpts[0]
    if multi_exit:
        for c in sources.ckpts:
            check_multi_exit(c)
    for profile in profiles:  # every bundle's place, before minutes of work
        check_destination(out / profile.name, bundle_kind())
    heldout = None
    if early_exit is not None:  # before any work: a checkpoint that cannot, or no images to fit on
        from .early_exit import check_joint, heldout_images

        if len(sources.planned) > 1:
            raise InputError("--early-exit: serves one checkpoint at its own resolution; leave out the other "
                             "checkpoints and --resolutions")
        check_joint(ckpt)
        if early_exit < 0:
            raise InputError(f"--early-exit: the accuracy loss must be >= 0 points (got {early_exit:g})")
        heldout = (heldout_images(ckpt, eval_data), early_exit)
    sources.images(0, ckpt.config["img_size"])  # a bad --data folder is exit 2 before any work
    labelled = sources.labelled(profiles)
    out.mkdir(parents=True, exist_ok=True)
    sources.work = work_dir(out)  # scratch exports of this run; those of killed runs are removed first
    outcomes: list[Outcome] = []
    try:
        with progress.stage("target", len(profiles) if len(profiles) > 1 else 0) as st:
            for profile in profiles:
                if len(profiles) > 1:
                    st.step(profile.name)
                shops = sources.workshops(profile)
                try:
                    outcomes.append(export_profile(shops, profile, out, multi_exit, progress, heldout,
                                                   sources.quality(shops), labelled))
                except NoCandidateError as e:
                    if len(profiles) == 1:
                        raise
                    log.warning("%s: %s", profile.name, e)
                    outcomes.append(Outcome(profile.name, error=str(e), table=e.table,
                                            budget_ms=profile.budgets.latency_ms))
    finally:
        shutil.rmtree(sources.work, ignore_errors=True)
    if len(profiles) == 1:
        return describe(outcomes[0])
    text = summary_table(outcomes)
    failed = [o for o in outcomes if o.error]
    if failed:
        raise NoCandidateError(f"no candidate met the budget for {', '.join(o.profile for o in failed)} "
                               f"(the other bundles were written)", text)
    return text


def check_multi_exit(ckpt) -> None:
    """Raises InputError for a checkpoint one multi-exit graph cannot serve: a per-exit fine-tuned one."""
    from ..model.classifier import mode

    if mode(ckpt.config) == "per_exit":
        raise InputError(f"{ckpt.path / 'config.json'}: finetune.mode is per_exit: its depths were fine-tuned "
                         "separately and share no weights, so no multi-exit graph serves them; export without "
                         "--multi-exit, or fine-tune with mode joint")


def describe(o: Outcome) -> str:
    c = o.choice
    lat = c.latency.stat(o.stat)
    return "\n".join([
        o.table.rstrip(), "",
        f"{o.profile}: depth {c.depth} {c.precision}{_where(c)}, {lat:.2f} ms {o.stat}{_error_text(c.latency, o.stat)} "
        f"({o.latency_source})"
        + (f", budget {o.budget_ms:g} ms" if o.budget_ms else "") + f", parity {c.parity.brief()}",
        f"bundle: {o.bundle}",
    ])


def _error_text(result, stat: str) -> str:
    err = result.error(stat)
    return "" if err is None else f" ±{err:.0%}"


def summary_table(outcomes: list[Outcome]) -> str:
    """One line per profile: choice, latency with source, budget, quality, bundle (or the error)."""
    head = ("profile", "depth", "prec", "latency", "source", "budget", "quality", "bundle")
    rows = []
    for o in outcomes:
        if o.error:
            rows.append((o.profile, "-", "-", "-", "-", f"{o.budget_ms or '-'}", "-", f"no candidate: {o.error}"))
            continue
        c = o.choice
        rows.append((o.profile, f"{c.depth}{_where(c)}", c.precision, f"{c.latency.stat(o.stat):.2f} ms {o.stat}",
                     o.latency_source, f"{o.budget_ms:g} ms" if o.budget_ms else "none",
                     f"{c.quality:.1%}" if c.quality is not None else "n/a", str(o.bundle)))
    return format_table(head, rows, rule=True)
