"""From timed rounds to latency figures with errors that two measurements agree within.

The worker (:mod:`bim_export.deploy.latency.worker`) times each model in rounds and notes, for each
model's block of a round, how disturbed it was (run-queue wait of its threads, CPU used by other
processes). Here, pure Python:

- **Which rounds count**: every quiet block of the model when there are at least ``rounds`` of
  them (quiet rounds that disagree beyond :data:`ERROR_TARGETS` get extra rounds: a shared host
  has slow spells no probe sees); otherwise the ``rounds`` least disturbed, and the figure is
  marked disturbed.
- **The figures**: every statistic (p50, p90, p99, mean) is computed per round and the headline is
  the median across rounds. A per-round p90 of a few samples can be one hiccup; the median of
  several rounds cannot, and the median of round medians is not biased low the way the lowest of
  them is.
- **The error**: rounds are the independent units. The standard error of a headline comes from a
  bootstrap over the rounds (whole rounds drawn with replacement, the headline recomputed); what
  rounds in one process cannot see, the level shift between processes (memory layout, thread
  placement, a virtual machine's slow spells), is added in quadrature as :data:`LEVEL_SHIFT`. The
  stated error is :data:`Z` standard errors: about a 95 % interval for the figure, so that two
  measurements agree within their summed errors (``intervals_overlap``, the selector's ties) in
  about 95 % of pairs or more. Its smallest value is :data:`MIN_ERROR`.
- **The p99** of a round of ten runs is little more than the round's slowest run: its error is
  as wide as its rounds disagree, and the host decides on the p90.
- **A disturbed measurement** is biased high by an amount it cannot know: its error reaches from
  the figure down to a floor the quiet machine cannot beat (single-thread CPU time over the thread
  count), less the floor's own margin, and no further. It is marked disturbed only with a cause
  above :data:`QUIET`, and its description names only such causes.

Pure Python (no numpy) so it is tested with plain numbers.
"""

from __future__ import annotations

import math
import random
import statistics
from dataclasses import dataclass, field

STATS = ("p50", "p90", "p99", "mean")
# Standard errors in a stated error: about a 95 % interval of the figure.
Z = 2.0
# The level shift between worker processes that rounds in one process cannot see (memory layout,
# thread placement, a shared host's slow spells), as a relative standard deviation.
# bench/latency_repeat.py measures what is left beyond the rounds' standard error on quiet
# repetitions (its "level shift" line): 7.7-8.3 % on the quiet 2-core EPYC VMs of
# bench/results/latency_repeat*.md. Two figures agree when they lie within the SUM of their errors,
# a test that needs less than each figure's full shift: 6 % keeps >= 95 % of quiet pairs within it
# there (4 % kept 91 %), at stated errors a third wider.
LEVEL_SHIFT = 0.06
# The smallest error of a measured figure: rounds that agree exactly still leave the level shift.
MIN_ERROR = Z * LEVEL_SHIFT
# The single-thread floor is itself measured, on a busy machine: the quiet margin below it.
FLOOR_MARGIN = 0.10
# Errors a quiet measurement aims at: quiet rounds that disagree more get extra rounds (up to the
# measurement's max_rounds), and every quiet round counts.
ERROR_TARGETS = {"p50": 0.10, "p90": 0.20}
# Bootstrap resamples of the rounds (a fixed seed: the same samples always state the same error).
BOOTSTRAP = 1000
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


def causes(wait: float | None, others: float | None, threads: int, cores: int) -> dict[str, float]:
    """How much of the session's thread-time each cause took (0 = none): ``wait``, the run-queue
    wait fraction of its threads; ``others``, the CPU other processes used beyond the cores the
    session leaves free, per session thread. A cause above :data:`QUIET` disturbs."""
    excess = 0.0 if others is None else max(0.0, others - max(0, cores - threads)) / max(1, threads)
    return {"wait": wait or 0.0, "others": excess}


def disturbance(wait: float | None, others: float | None, threads: int, cores: int) -> float:
    """One figure for how disturbed a stretch was: its largest cause (see :func:`causes`)."""
    return max(causes(wait, others, threads, cores).values())


def standard_error(units: list, estimate, resamples: int = BOOTSTRAP, seed: int = 0) -> float:
    """Relative standard error of ``estimate(units)`` from a bootstrap over the independent units.

    The units are drawn with replacement and the variance is scaled by n / (n - 1), the
    bootstrap's small-sample bias. A fixed seed: the same units always give the same error.
    """
    value, n = estimate(units), len(units)
    if value <= 0 or n < 2:
        return 0.0
    rng = random.Random(seed)
    draws = [estimate([units[rng.randrange(n)] for _ in range(n)]) for _ in range(resamples)]
    return math.sqrt(statistics.pvariance(draws) * n / (n - 1)) / value


def nested_standard_error(groups: list[list[float]], resamples: int = BOOTSTRAP, seed: int = 0) -> float:
    """Relative standard error of the median of all values in ``groups`` (one group per worker
    process, its rounds' values), from a two-level bootstrap: processes drawn with replacement, then
    rounds within each drawn process. A level shift between the processes shows as spread."""
    pooled = [v for g in groups for v in g]
    value, n = statistics.median(pooled), len(groups)
    if value <= 0 or n < 2:
        return 0.0
    rng = random.Random(seed)
    draws = []
    for _ in range(resamples):
        picked = [groups[rng.randrange(n)] for _ in range(n)]
        draws.append(statistics.median([g[rng.randrange(len(g))] for g in picked for _ in g]))
    return math.sqrt(statistics.pvariance(draws) * n / (n - 1)) / value


def stated_error(se: float, processes: int = 1) -> float:
    """The stated relative error of a figure with relative standard error ``se`` from its rounds,
    pooled over ``processes`` worker processes (each with a level shift of its own, so the one no
    process can see shrinks with their number)."""
    shift = LEVEL_SHIFT / math.sqrt(max(1, processes))
    return Z * math.sqrt(se * se + shift * shift)


def round_errors(samples: list[list[float]], names: tuple[str, ...] = STATS,
                 processes: list[int] | None = None) -> dict[str, float]:
    """The stated error of each statistic's median across the rounds ``samples``.

    Rounds are the units: the samples of one round share its slow or fast spell, so resampling
    whole rounds (each statistic's per-round values) keeps that. Rounds from several worker
    processes (``processes``: the process of each round) are resampled process by process, then
    round by round, so that a level shift between the processes widens the error. A single round
    has nothing to compare with: its samples are the units then (an underestimate that the level
    shift and the minimum cover in part).
    """
    if len(samples) == 1:
        return {name: stated_error(standard_error(samples[0], lambda xs, k=name: round_stats(xs)[k]))
                for name in names}
    per_round = [round_stats(ms) for ms in samples]
    tags = sorted(set(processes or []))
    if len(tags) > 1:
        return {name: stated_error(nested_standard_error([[r[name] for r, p in zip(per_round, processes) if p == t]
                                                          for t in tags]), len(tags)) for name in names}
    return {name: stated_error(standard_error([r[name] for r in per_round], statistics.median)) for name in names}


@dataclass
class Summary:
    """The figures of one model from its rounds.

    Attributes:
        values: p50 / p90 / p99 / mean in ms (median across the rounds used).
        errors: relative error of each: about a 95 % interval, so that two measurements agree
            within their summed errors.
        disturbed: empty when the rounds used were quiet, else the causes above threshold, in words.
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
    causes: dict[str, float] = field(default_factory=dict)  # what disturbed them (disturbing_causes)

    @property
    def expected_error(self) -> float:
        """One error for the whole result: the larger of the p50's and the p90's."""
        return max(self.errors["p50"], self.errors["p90"])


def summarize(blocks: list[dict], rounds: int, floor_ms: float | None = None, cores: int | None = None,
              threads: int | None = None) -> Summary:
    """Figures and errors of one model from its timed blocks.

    Args:
        blocks: one per round the model ran: ``ms`` (samples), ``score`` (disturbance, 0 = quiet),
            ``quiet``, and the ``wait`` / ``others`` it was judged on (None where not observable).
        rounds: how many rounds the figures should come from at least (every quiet one, or the
            quietest ones).
        floor_ms: a latency the model cannot beat on a quiet machine (used when disturbed).
        cores: logical cores of the machine (default: ``threads``).
        threads: the session's intra-op threads (default: ``cores``, or 1).
    """
    if not blocks or any(not b["ms"] for b in blocks):
        raise ValueError("every round needs samples")
    threads = threads or cores or 1
    cores = cores or threads
    order = sorted(range(len(blocks)), key=lambda i: (blocks[i].get("score") or 0.0, i))
    quiet = [i for i, b in enumerate(blocks) if b.get("quiet", True)]
    used = quiet if len(quiet) >= rounds else sorted(order[:rounds])
    samples = [blocks[i]["ms"] for i in used]
    per_round = [round_stats(ms) for ms in samples]
    values = {name: statistics.median(r[name] for r in per_round) for name in STATS}
    errors = round_errors(samples, processes=[blocks[i].get("process", 0) for i in used])
    # a tail is never below the body: keep p50 <= p90 <= p99 after taking medians separately
    values["p90"] = max(values["p90"], values["p50"])
    values["p99"] = max(values["p99"], values["p90"])
    wait = _median([blocks[i].get("wait") for i in used])
    others = _median([blocks[i].get("others") for i in used])
    found = disturbing_causes([blocks[i] for i in used if not blocks[i].get("quiet", True)], threads, cores)
    disturbed = describe_disturbance(found, cores)
    for name in STATS:
        if disturbed and floor_ms is not None and values[name] > floor_ms:
            # Busy rounds vary with the load, not with the model: what is known is that a quiet run lies
            # between the floor (itself measured on a busy machine: the quiet margin below it) and here.
            errors[name] = max(MIN_ERROR, 1.0 - floor_ms * (1 - FLOOR_MARGIN) / values[name])
    return Summary(values, errors, disturbed, used, floor_ms, wait, others, found)


def disturbing_causes(noisy: list[dict], threads: int, cores: int) -> dict[str, float]:
    """The causes above :data:`QUIET` in the blocks ``noisy`` (the same test as the blocks' quiet
    flag, :func:`causes`), each with its median over the blocks it disturbed: ``wait`` as a
    fraction of the time, ``others`` in cores. Empty when none is above it."""
    found: dict[str, list[float]] = {"wait": [], "others": []}
    for b in noisy:
        for name, share in causes(b.get("wait"), b.get("others"), threads, cores).items():
            if share > QUIET:
                found[name].append(b[name])
    return {name: statistics.median(xs) for name, xs in found.items() if xs}


def describe_disturbance(found: dict[str, float], cores: int) -> str:
    """``busy machine: threads waited 35% of the time for a core, other processes used 1.3 of 2
    cores`` from :func:`disturbing_causes` (only the causes it found); empty when it found none."""
    parts = []
    if "wait" in found:
        parts.append(f"threads waited {found['wait']:.0%} of the time for a core")
    if "others" in found:
        parts.append(f"other processes used {found['others']:.1f} of {cores} cores")
    return "busy machine: " + ", ".join(parts) if parts else ""


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
