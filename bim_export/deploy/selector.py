"""Choosing the backbone depth x precision for a device: a pure function over a table of candidates.

The rule (docs/design.md, "Selection rule"): a candidate passes only if its parity passed and it is within
every budget the profile sets (a budget the profile leaves out is not checked). Quality is the exit's
held-out task top-1 for a fine-tuned checkpoint, else its kNN top-1 (where every candidate has one;
otherwise deeper is better). Among passing candidates take
the best quality; among those within half a point (0.005) of it, the lowest latency. Nothing passes:
:class:`~bim_export.core.errors.NoCandidateError` naming the closest candidate and the budget it misses.

Latencies within their stated errors tie, and the better quality, then the smaller file, settles the
tie (then depth, then bits), not the noise. Measured latencies carry a measurement error: two whose
error intervals overlap are a tie. A predicted latency's error is mostly a scale shared by every
candidate of the device, so predictions are ranked by their values, except that two predictions
closer than :data:`PREDICTION_RESOLUTION` tie (a difference the model cannot resolve). Every row a
tie decided says ``tie on latency`` and names the rule that settled it. A measurement taken on a busy
machine is biased high: its budgets are checked against the low end of its error, and its row says so.

Pure Python: no torch, onnxruntime or numpy.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Optional

from ..core.errors import NoCandidateError
from .candidate_table import QUALITY_LABELS, candidate_table, num as _num, quality_label  # noqa: F401 - re-exported
from .latency.stats import intervals_overlap
from .profile_text import describe_budgets
from .profiles import Budgets, Profile

QUALITY_WINDOW = 0.005  # half a point of top-1: within it, latency decides
# Two predictions (or calibrated predictions) of one device closer than this fraction tie. A prediction
# sums per-node roofline times with factors fitted on measurements that repeat within 10 % at best, and
# its held-out checks err by 5 % or more: a difference of under 1 % (fp16 and fp32 of a launch-bound
# graph, both shown as 3.68 ms) is below anything it was checked to tell apart.
PREDICTION_RESOLUTION = 0.01
_PRECISION_RANK = {"fp32": 0, "fp16": 1, "int8": 2}  # at equal quality and latency, keep more bits
_EPS = 1e-9


@dataclass(frozen=True)
class Candidate:
    """One exported (or prunable) backbone: a depth at a precision, with its figures."""

    depth: int
    precision: str  # fp32 | fp16 | int8
    checkpoint: str = ""  # the source checkpoint, as the table names it ("" in a run of one checkpoint)
    resolution: Optional[int] = None  # the input size in px (None where the run has only the checkpoint's own)
    quality: Optional[float] = None  # top-1 of this exit in [0, 1] (Selection.quality_metric); None: not measured
    parity_passed: bool = True
    parity_note: str = ""  # e.g. "cosine 0.981 < 0.995"
    latency_ms: Optional[float] = None  # at latency_stat, at the profile's batch
    latency_stat: str = "p90"  # p50 | p90 | p99
    latency_source: str = "predicted"  # measured | predicted | calibrated
    expected_error: Optional[float] = None  # relative error expected of latency_ms (0.15 = +-15 %)
    latency_disturbed: bool = False  # measured on a busy machine: latency_ms is biased high
    memory_mb: Optional[float] = None  # peak memory of the inference session
    size_mb: Optional[float] = None  # model file size, 10^6 bytes
    launch_share: Optional[float] = None  # of a predicted latency, the share that is per-node launch overhead
    float_weight_share: Optional[float] = None  # of the weight bytes, the share stored as float
    skipped: str = ""  # why it was not built (it cannot be chosen); a rejection with that reason

    @property
    def label(self) -> str:
        return " ".join(filter(None, [self.checkpoint, f"depth {self.depth}",
                                      f"@{self.resolution}px" if self.resolution else "", self.precision]))

    @property
    def key(self) -> tuple:
        """What tells it apart from every other candidate: (checkpoint, resolution, depth, precision)."""
        return self.checkpoint, self.resolution, self.depth, self.precision


@dataclass(frozen=True)
class Row:
    """A candidate with its verdict: status chosen | ok | rejected, and why."""

    candidate: Candidate
    status: str
    reason: str
    excess: float = 0.0  # sum of relative overshoots of the budgets it misses (for "closest")

    def to_dict(self) -> dict[str, Any]:
        row = asdict(self.candidate)
        for axis in ("checkpoint", "resolution", "skipped"):  # only where the run has more than one / any
            if not row[axis]:
                del row[axis]
        return {**row, "status": self.status, "reason": self.reason}


@dataclass(frozen=True)
class Selection:
    """The choice and the table of every candidate with its status and reason."""

    profile: str
    budgets: dict[str, Any]
    rows: list[Row]
    quality_metric: str  # "task_top1", "knn_top1" or "depth" (deeper is better)
    quality_source: str | None = None  # the set and protocol that scored the quality column

    @property
    def choice(self) -> Optional[Candidate]:
        for row in self.rows:
            if row.status == "chosen":
                return row.candidate
        return None

    def table(self) -> str:
        """Every candidate as a plain-text table, deepest first, with the budgets underneath."""
        table = candidate_table(self.rows, self.quality_metric, self.quality_source)
        return f"{table}\nbudgets of {self.profile}: {describe_budgets(self.budgets)}"

    def to_dict(self) -> dict[str, Any]:
        choice = self.choice
        return {
            "profile": self.profile,
            "budgets": self.budgets,
            "rule": "parity passed and within every budget; best quality; within "
                    f"{QUALITY_WINDOW * 100:g} point of it, lowest latency; measured latencies within each "
                    f"other's error, and predicted ones within {PREDICTION_RESOLUTION:.0%} of each other, are "
                    "ties, settled by quality, then the smaller file",
            "quality_metric": self.quality_metric,
            "quality_label": quality_label(self.quality_metric),
            "quality_source": self.quality_source if self.quality_metric in QUALITY_LABELS else None,
            "choice": None if choice is None else {
                "depth": choice.depth, "precision": choice.precision,
                **({"checkpoint": choice.checkpoint} if choice.checkpoint else {}),
                **({"resolution": choice.resolution} if choice.resolution else {})},
            "candidates": [row.to_dict() for row in self.rows],
        }


def select(candidates: list[Candidate], profile: Profile, quality_source: str | None = None,
           quality_metric: str = "knn_top1") -> Selection:
    """Picks the best candidate within the profile's budgets.

    Args:
        candidates: every depth x precision considered; latency at the profile's statistic.
        profile: the device (only ``name`` and ``budgets`` are read).
        quality_source: which images scored the quality, and how (shown under the table).
        quality_metric: what the candidates' quality is (:data:`QUALITY_LABELS`).

    Returns:
        The selection; ``.choice`` is the chosen candidate.

    Raises:
        NoCandidateError: no candidate passes parity and every budget; the message names the closest
            candidate, the budget it misses and by how much; ``.table`` holds the full table.
        ValueError: a candidate's latency is given at another statistic than the budget's, or its
            quality is not a fraction (a caller bug, not bad user input).
    """
    budgets = profile.budgets
    for c in candidates:
        if budgets.latency_ms is not None and c.latency_ms is not None and c.latency_stat != budgets.latency_stat:
            raise ValueError(f"{c.label}: latency is {c.latency_stat}, the budget is {budgets.latency_stat}")
        if c.quality is not None and not 0.0 <= c.quality <= 1.0:
            raise ValueError(f"{c.label}: quality is a top-1 fraction in [0, 1] (got {c.quality})")
    use_quality = bool(candidates) and all(c.quality is not None for c in candidates)
    metric = quality_metric if use_quality else "depth"
    checked = [(c, *_check(c, budgets)) for c in candidates]
    passing = [c for c, failures, _, _ in checked if not failures]

    chosen, why, ties = _choose(passing, use_quality)
    best = max((_quality(c, use_quality) for c in passing), default=0.0)
    rows = []
    for c, failures, excess, caveats in checked:
        if failures:
            rows.append(Row(c, "rejected", "; ".join(failures), excess))
        elif c is chosen:
            head = "best within budget" + (f"; {why}" if why.startswith("tie") else f" ({why})" if why else "")
            rows.append(Row(c, "chosen", "; ".join([head, *caveats])))
        else:
            rows.append(Row(c, "ok", "; ".join([_why_not(c, chosen, best, use_quality, ties), *caveats])))
    rows = [_with_precision_notes(r, candidates) for r in rows]
    rows.sort(key=lambda r: (r.candidate.checkpoint, -(r.candidate.resolution or 0), -r.candidate.depth,
                             _PRECISION_RANK.get(r.candidate.precision, 9)))
    selection = Selection(profile.name, budgets.model_dump(mode="json"), rows, metric, quality_source)
    if chosen is None:
        raise NoCandidateError(_nothing_fits(profile.name, rows), table=selection.table())
    return selection


# ------------------------------------------------------------------------------------ the rule


def within_budgets(c: Candidate, budgets: Budgets) -> bool:
    """Whether ``c`` passes parity and every budget (what the rule chooses among)."""
    return not _check(c, budgets)[0]


def _check(c: Candidate, budgets: Budgets) -> tuple[list[str], float, list[str]]:
    """Failures of one candidate (parity, then each budget), its total relative overshoot, and the
    caveats of a pass (a busy-machine latency over budget but within it by its error)."""
    if c.skipped:  # never the closest: nothing of it was measured
        return [c.skipped], math.inf, []
    failures: list[str] = []
    caveats: list[str] = []
    excess = 0.0
    if not c.parity_passed:
        failures.append("parity failed" + (f": {c.parity_note}" if c.parity_note else ""))
    for value, budget, what, unit in (
        (c.latency_ms, budgets.latency_ms, f"latency {budgets.latency_stat}", "ms"),
        (c.memory_mb, budgets.peak_memory_mb, "peak memory", "MB"),
        (c.size_mb, budgets.model_size_mb, "model size", "MB"),
    ):
        if budget is None:
            continue
        if value is None:
            failures.append(f"no {what} figure (budget {budget:g} {unit})")
            excess += 1.0
            continue
        checked = value
        if unit == "ms" and c.latency_disturbed and c.expected_error:
            checked = value * (1 - c.expected_error)  # the busy machine only ever added time
        if checked > budget * (1 + _EPS):
            over = checked - budget
            shown = f"{_num(value)} {unit}" + (f" (busy machine; at least {_num(checked)} {unit})"
                                               if checked < value else "")
            failures.append(f"{what} {shown} > budget {budget:g} {unit} (+{_num(over)} {unit}, +{over / budget:.0%})")
            excess += over / budget
        elif value > budget * (1 + _EPS):
            caveats.append(f"{what} {_num(value)} {unit} is over the {budget:g} {unit} budget as measured on a "
                           f"busy machine, within it by its ±{c.expected_error:.0%} error")
    return failures, excess, caveats


def _quality(c: Candidate, use_quality: bool) -> float:
    return c.quality if use_quality else float(c.depth)


def _latency(c: Candidate) -> float:
    return math.inf if c.latency_ms is None else c.latency_ms


def _size(c: Candidate) -> float:
    return math.inf if c.size_mb is None else c.size_mb


def _measured(c: Candidate) -> bool:
    return c.latency_source.startswith("measured")


def _tied(a: Candidate, b: Candidate) -> bool:
    """Equal latencies, measured ones whose error intervals overlap, or predictions closer than the
    prediction's resolution."""
    if a.latency_ms is None or b.latency_ms is None:
        return a.latency_ms is None and b.latency_ms is None
    gap = abs(a.latency_ms - b.latency_ms)
    if gap <= _EPS * max(a.latency_ms, b.latency_ms):
        return True
    if all(_measured(c) for c in (a, b)):
        return bool(a.expected_error and b.expected_error) and intervals_overlap(
            a.latency_ms, a.expected_error, b.latency_ms, b.expected_error)
    if not any(_measured(c) for c in (a, b)):
        return gap < PREDICTION_RESOLUTION * max(a.latency_ms, b.latency_ms)
    return False


def _choose(passing: list[Candidate], use_quality: bool) -> tuple[Optional[Candidate], str, list[Candidate]]:
    """Best quality; within QUALITY_WINDOW of it (same depth when ranking by depth), lowest latency,
    where latencies tied with the fastest go to quality, then the smaller file, then depth, then bits.

    Returns:
        The choice, why (for its row), and the candidates tied on latency with the fastest.
    """
    if not passing:
        return None, "", []
    best = max(_quality(c, use_quality) for c in passing)
    window = QUALITY_WINDOW if use_quality else 0.0
    near = [c for c in passing if _quality(c, use_quality) >= best - window - _EPS]
    fastest = min(near, key=lambda c: (_latency(c), -_quality(c, use_quality), _size(c)))
    ties = sorted((c for c in near if _tied(c, fastest)), key=lambda c: _settle_key(c, use_quality))
    chosen = ties[0]
    if len(near) == 1:
        return chosen, "", ties
    if len(ties) > 1:
        runner_up = ties[1]
        others = ", ".join(c.label for c in ties[1:])
        return chosen, (f"tie on latency with {others} {_tie_figures(chosen, runner_up)}: "
                        f"{_settled(chosen, runner_up, use_quality, of_winner=True)}"), ties
    if use_quality and _quality(chosen, True) < best - _EPS:
        return chosen, f"fastest within {QUALITY_WINDOW * 100:g} point of the best quality", ties
    return chosen, "fastest of the best", ties


def _settle_key(c: Candidate, use_quality: bool) -> tuple:
    """How latency ties are settled: quality, then the smaller file, then latency, depth, bits."""
    return (-_quality(c, use_quality), _size(c), _latency(c), -c.depth, _PRECISION_RANK.get(c.precision, 9),
            -(c.resolution or 0), c.checkpoint)


def _settled(winner: Candidate, loser: Candidate, use_quality: bool, of_winner: bool) -> str:
    """The rule that settled a latency tie between two candidates, said of the winner or of the loser:
    ``smaller file (8.15 vs 16.3 MB)`` / ``larger file (16.3 vs 8.15 MB)``."""
    a, b = (winner, loser) if of_winner else (loser, winner)
    if _quality(winner, use_quality) > _quality(loser, use_quality) + _EPS:
        if use_quality:
            return f"{'higher' if of_winner else 'lower'} quality ({a.quality:.1%} vs {b.quality:.1%})"
        return f"{'deeper' if of_winner else 'shallower'} (depth {a.depth} vs {b.depth})"
    if _size(winner) < _size(loser) - _EPS:
        return f"{'smaller' if of_winner else 'larger'} file ({_num(_size(a))} vs {_num(_size(b))} MB)"
    if _latency(winner) < _latency(loser) - _EPS:
        return f"{'faster' if of_winner else 'slower'} ({_num(_latency(a))} vs {_num(_latency(b))} ms)"
    if winner.depth != loser.depth:
        return f"{'deeper' if of_winner else 'shallower'} (depth {a.depth} vs {b.depth})"
    return f"{'more' if of_winner else 'fewer'} bits ({a.precision} vs {b.precision})"


def _tie_figures(a: Candidate, b: Candidate) -> str:
    """The two latencies of a tie and what made them one: ``(5.3 vs 5.6 ms ±5%)``,
    ``(3.68 vs 3.68 ms, predicted within 1%)``."""
    if a.latency_ms is None or b.latency_ms is None:
        return "(no latency figures)"
    la, lb = _num(a.latency_ms), _num(b.latency_ms)
    if abs(a.latency_ms - b.latency_ms) <= _EPS * max(a.latency_ms, b.latency_ms):
        return f"({la} ms each)"
    if _measured(a) and _measured(b):
        ea, eb = f"±{a.expected_error:.0%}", f"±{b.expected_error:.0%}"
        return f"({la} vs {lb} ms {ea})" if ea == eb else f"({la} {ea} vs {lb} {eb} ms)"
    return f"({la} vs {lb} ms, predicted within {PREDICTION_RESOLUTION:.0%})"


def _why_not(c: Candidate, chosen: Candidate, best: float, use_quality: bool, ties: list[Candidate]) -> str:
    """Why a passing candidate was not chosen (``best``: the best quality among passing ones)."""
    if use_quality:
        if c.quality < best - QUALITY_WINDOW - _EPS:
            return f"lower quality ({c.quality:.1%}, best {best:.1%})"
    elif c.depth < chosen.depth:
        return f"shallower (depth {c.depth} vs {chosen.depth})"
    if any(c is t for t in ties):
        return f"tie on latency {_tie_figures(c, chosen)}: {_settled(chosen, c, use_quality, of_winner=False)}"
    if _latency(c) > _latency(chosen) + _EPS:
        return f"slower ({_num(_latency(c))} vs {_num(_latency(chosen))} ms)"
    return f"tie on quality and latency: {_settled(chosen, c, use_quality, of_winner=False)}"


LAUNCH_BOUND = 0.5  # launches over half the predicted time: fewer bytes or FLOPs barely help


def precision_notes(c: Candidate, fp32: Optional[Candidate]) -> list[str]:
    """Why a lower precision is no smaller or no faster than the fp32 candidate of its depth, where
    the candidate's figures say why: a QDQ graph that keeps its weights in float (TensorRT's form)
    is as large; a run dominated by per-node launch overhead (a GPU at small batch) gains little from
    cheaper nodes and pays for the extra Q/DQ nodes. (Without such a figure the table's size and
    latency columns show the comparison as it is.)"""
    if fp32 is None or c.precision == "fp32":
        return []
    notes = []
    if (c.size_mb is not None and fp32.size_mb and c.size_mb > 0.95 * fp32.size_mb
            and (c.float_weight_share or 0) > 0.5):
        notes.append(f"not smaller than fp32 ({_num(c.size_mb)} vs {_num(fp32.size_mb)} MB): "
                     f"its QDQ graph keeps float weights")
    if (c.latency_ms is not None and fp32.latency_ms is not None and c.latency_ms >= fp32.latency_ms
            and (c.launch_share or 0) > LAUNCH_BOUND):
        notes.append(f"no faster than fp32 ({_num(c.latency_ms)} vs {_num(fp32.latency_ms)} ms predicted): "
                     f"launch-bound, {c.launch_share:.0%} of it per-node launch overhead")
    return notes


def _with_precision_notes(row: Row, candidates: list[Candidate]) -> Row:
    c = row.candidate
    fp32 = next((o for o in candidates if o.key == (*c.key[:3], "fp32")), None)
    notes = precision_notes(c, fp32)
    return replace(row, reason="; ".join([row.reason, *notes])) if notes else row


def _nothing_fits(profile: str, rows: list[Row]) -> str:
    if not rows:
        return f"no candidates to choose from for {profile}"
    parity_ok = [r for r in rows if r.candidate.parity_passed]
    if not parity_ok:
        first = rows[0]
        return (f"no candidate meets {profile}: every candidate failed parity "
                f"(e.g. {first.candidate.label}: {first.reason})")
    closest = min(parity_ok, key=lambda r: (r.excess, -r.candidate.depth))
    return f"no candidate meets the budgets of {profile}; closest: {closest.candidate.label}: {closest.reason}"
