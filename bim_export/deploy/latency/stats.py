"""From timed rounds to latency figures with an error that a second measurement stays within.

The worker (:mod:`bim_export.deploy.latency.worker`) times each model in rounds and notes, for each
model's block of a round, how disturbed it was (run-queue wait of its threads, CPU used by other
processes). Here, pure Python:

- **Which rounds count**: the ``rounds`` least disturbed blocks of the model (all of them quiet
  when the machine let us; otherwise the quietest there were, and the figure is marked disturbed).
- **The figures**: every statistic (p50, p90, p99, mean) is computed per round and the headline is
  the median across rounds. A per-round p90 of a few samples can be one hiccup; the median of
  several rounds cannot, and the median of round medians is not biased low the way the lowest of
  them is.
- **The error**: the relative range of the round values (a second run's median of rounds falls
  inside it with margin), at least :data:`MIN_ERROR` (what rounds in one process cannot see:
  another process's memory layout and thread placement, a virtual machine's level shifts). A disturbed measurement is biased
  high by an amount it cannot know: its error reaches from the figure down to a floor the quiet
  machine cannot beat (single-thread CPU time over the thread count), and no further.

Pure Python (no numpy) so it is tested with plain numbers.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

STATS = ("p50", "p90", "p99", "mean")
# What rounds in one process cannot see: another process's memory layout and thread placement, and
# the level shifts of a shared or virtual machine (medians of 6.5 to 7.5 ms for one model in
# back-to-back processes on the quiet 2-core VM of bench/results/latency_repeat.md).
MIN_ERROR = 0.10
# A block is quiet when its threads waited for a core at most this fraction of the time, and other
# processes used at most this much of a core per session thread beyond the cores it leaves free.
QUIET = 0.1


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation (numpy's default)."""
    xs = sorted(values)
    if not xs:
        raise ValueError("no values")
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def round_stats(samples: list[float]) -> dict[str, float]:
    """p50, p90, p99 and mean of one round's samples."""
    return {"p50": percentile(samples, 50), "p90": percentile(samples, 90), "p99": percentile(samples, 99),
            "mean": sum(samples) / len(samples)}


@dataclass
class Summary:
    """The figures of one model from its rounds.

    Attributes:
        values: p50 / p90 / p99 / mean in ms (median across the rounds used).
        errors: relative error of each, a bound a second measurement is expected to stay within.
        disturbed: empty when every round used was quiet, else what disturbed them.
        used: indices (into the model's blocks) of the rounds the figures come from.
        floor_ms: the quiet-machine lower bound, when one was measured.
    """

    values: dict[str, float]
    errors: dict[str, float]
    disturbed: str = ""
    used: list[int] = field(default_factory=list)
    floor_ms: float | None = None
    wait: float | None = None  # median run-queue wait fraction of the rounds used
    others: float | None = None  # median CPU of other processes during them, in cores

    @property
    def expected_error(self) -> float:
        """One error for the whole result: the larger of the p50's and the p90's."""
        return max(self.errors["p50"], self.errors["p90"])


def summarize(blocks: list[dict], rounds: int, floor_ms: float | None = None, cores: int | None = None) -> Summary:
    """Figures and errors of one model from its timed blocks.

    Args:
        blocks: one per round the model ran: ``ms`` (samples), ``score`` (disturbance, 0 = quiet),
            ``quiet``, and the ``wait`` / ``others`` it was judged on (None where not observable).
        rounds: how many rounds the figures should come from (the quietest ones).
        floor_ms: a latency the model cannot beat on a quiet machine (used when disturbed).
        cores: logical cores of the machine, for the description of a disturbance.
    """
    if not blocks or any(not b["ms"] for b in blocks):
        raise ValueError("every round needs samples")
    order = sorted(range(len(blocks)), key=lambda i: (blocks[i].get("score") or 0.0, i))
    used = sorted(order[:rounds])
    per_round = [round_stats(blocks[i]["ms"]) for i in used]
    values, errors = {}, {}
    for name in STATS:
        xs = [r[name] for r in per_round]
        values[name] = statistics.median(xs)
        errors[name] = (max(xs) - min(xs)) / values[name] if values[name] > 0 else 0.0
    # a tail is never below the body: keep p50 <= p90 <= p99 after taking medians separately
    values["p90"] = max(values["p90"], values["p50"])
    values["p99"] = max(values["p99"], values["p90"])
    wait = _median([blocks[i].get("wait") for i in used])
    others = _median([blocks[i].get("others") for i in used])
    disturbed = ""
    if not all(blocks[i].get("quiet", True) for i in used):
        disturbed = describe_disturbance(wait, others, cores)
    for name in STATS:
        if disturbed and floor_ms is not None and values[name] > floor_ms:
            # Busy rounds vary with the load, not with the model: what is known is that a quiet run lies
            # between the floor (itself measured on a busy machine: the quiet margin below it) and here.
            errors[name] = max(MIN_ERROR, 1.0 - floor_ms * (1 - MIN_ERROR) / values[name])
        else:
            errors[name] = max(MIN_ERROR, errors[name])
    return Summary(values, errors, disturbed, used, floor_ms, wait, others)


def describe_disturbance(wait: float | None, others: float | None, cores: int | None) -> str:
    """``busy machine: threads waited 35 % of the time for a core, other processes used 1.3 of 2 cores``."""
    parts = []
    if wait is not None and wait > 0.005:
        parts.append(f"threads waited {wait:.0%} of the time for a core")
    if others is not None:
        parts.append(f"other processes used {others:.1f}" + (f" of {cores} cores" if cores else " cores"))
    return "busy machine" + (": " + ", ".join(parts) if parts else "")


def intervals_overlap(a: float, ea: float, b: float, eb: float) -> bool:
    """Whether a ± ea·a and b ± eb·b (relative errors) share a value."""
    return a * (1 - ea) <= b * (1 + eb) and b * (1 - eb) <= a * (1 + ea)


def depth_inversions(rows: list[tuple[int, str, float, float]]) -> list[tuple[int, int]]:
    """Pairs of rows where a deeper model is faster than a shallower one of the same precision,
    beyond both errors (a table that contradicts itself: the deeper graph holds the shallower one).

    Args:
        rows: ``(depth, precision, ms, relative error)`` per candidate.

    Returns:
        ``(shallow index, deep index)`` pairs.
    """
    bad = []
    for i, (d1, p1, v1, e1) in enumerate(rows):
        for j, (d2, p2, v2, e2) in enumerate(rows):
            if p1 == p2 and d1 < d2 and v2 * (1 + e2) < v1 * (1 - e1):
                bad.append((i, j))
    return bad


def _median(xs: list[float | None]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None
