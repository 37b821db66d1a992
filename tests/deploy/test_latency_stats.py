"""Latency figures from timed rounds, on plain numbers: which rounds count, the statistics, the error."""

from __future__ import annotations

import itertools
import random
import statistics

import pytest

from bim_export.deploy.latency.stats import (FLOOR_MARGIN, LEVEL_SHIFT, MIN_ERROR, QUIET, Z, causes,
                                             depth_inversions, describe_disturbance, disturbing_causes,
                                             intervals_overlap, percentile, round_stats, standard_error, stated_error,
                                             summarize)


def _block(ms, score=0.0, wait=0.0, others=0.0):
    return {"ms": list(ms), "score": score, "quiet": score <= 0.1, "wait": wait, "others": others}


def test_percentile_matches_linear_interpolation():
    xs = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert percentile(xs, 50) == 3.0 and percentile(xs, 0) == 1.0 and percentile(xs, 100) == 5.0
    assert percentile(xs, 90) == pytest.approx(4.6)
    assert round_stats([1.0, 2.0, 3.0, 4.0])["mean"] == 2.5
    with pytest.raises(ValueError):
        percentile([], 50)


def test_headline_is_the_median_of_round_values_not_the_lowest():
    rounds = [_block([m] * 9 + [m * 1.2]) for m in (5.0, 5.2, 5.4, 5.6, 5.8)]
    s = summarize(rounds, rounds=5)
    assert s.values["p50"] == pytest.approx(5.4)  # the lowest round median would say 5.0
    assert s.values["p90"] == pytest.approx(5.4 * 1.02)
    assert MIN_ERROR < s.errors["p50"] < (5.8 - 5.0) / 5.4  # tighter than the rounds' whole range
    assert not s.disturbed and s.used == [0, 1, 2, 3, 4]


def test_one_hiccup_does_not_move_the_p90():
    rng = random.Random(0)
    rounds = [_block([5.0 + rng.random() * 0.2 for _ in range(10)]) for _ in range(5)]
    calm = summarize(rounds, rounds=5).values["p90"]
    rounds[2]["ms"][3] = 80.0  # one run stalled for a whole time slice
    hit = summarize(rounds, rounds=5)
    assert hit.values["p90"] == pytest.approx(calm, rel=0.03)
    pooled = percentile([x for b in rounds for x in b["ms"]], 99)
    assert pooled > 5 * hit.values["p99"]  # pooled, the tail is the hiccup; a median across rounds is not


def test_error_has_a_floor_and_p90_is_never_below_p50():
    s = summarize([_block([3.0] * 10) for _ in range(3)], rounds=3)
    assert s.errors == {k: MIN_ERROR for k in ("p50", "p90", "p99", "mean")}
    assert s.values["p50"] <= s.values["p90"] <= s.values["p99"]
    assert s.expected_error == MIN_ERROR


def test_quietest_rounds_are_used_and_a_busy_run_widens_down_to_its_floor():
    quiet = [_block([5.0] * 10) for _ in range(3)]
    busy = [_block([20.0] * 10, score=0.7, wait=0.7, others=1.4) for _ in range(4)]
    s = summarize(busy[:2] + quiet + busy[2:], rounds=3, floor_ms=4.0, cores=2)
    assert s.used == [2, 3, 4] and s.values["p50"] == 5.0 and not s.disturbed
    assert s.errors["p50"] == MIN_ERROR  # quiet rounds: the floor is not needed

    s = summarize(busy + quiet[:1], rounds=3, floor_ms=4.0, cores=2)
    assert s.disturbed == "busy machine: threads waited 70% of the time for a core, other processes used 1.4 of 2 cores"
    assert 4 in s.used  # the quiet block is among the rounds used
    low = s.values["p50"] * (1 - s.errors["p50"])
    assert low == pytest.approx(4.0 * (1 - FLOOR_MARGIN))  # down to the floor, with the floor's margin
    # rounds that vary with the load do not push the interval below the floor
    jumpy = [_block([x] * 10, score=0.7, wait=0.7) for x in (8.0, 20.0, 40.0)]
    s = summarize(jumpy, rounds=3, floor_ms=4.0)
    assert s.values["p50"] == 20.0 and s.errors["p50"] == pytest.approx(1 - 4.0 * (1 - FLOOR_MARGIN) / 20.0)


def test_a_second_busy_measurement_and_a_quiet_one_agree_within_their_errors():
    quiet = summarize([_block([5.0] * 10) for _ in range(5)], rounds=5)
    busy = summarize([_block([21.0] * 10, score=0.6, wait=0.6) for _ in range(5)], rounds=5, floor_ms=4.7)
    assert busy.disturbed
    assert intervals_overlap(quiet.values["p90"], quiet.errors["p90"], busy.values["p90"], busy.errors["p90"])


def test_intervals_overlap():
    assert intervals_overlap(5.0, 0.05, 5.5, 0.05)  # 5.25 >= 5.225
    assert not intervals_overlap(5.0, 0.05, 6.0, 0.05)
    assert intervals_overlap(2.0, 0.0, 2.0, 0.0)


def test_depth_inversions_need_the_same_precision_and_to_exceed_both_errors():
    rows = [(2, "int8", 2.93, 0.05), (4, "int8", 0.46, 0.05), (2, "fp32", 0.30, 0.05), (4, "fp32", 0.31, 0.05)]
    assert depth_inversions(rows) == [(0, 1)]
    rows[0] = (2, "int8", 0.47, 0.05)  # within the errors: no contradiction
    assert depth_inversions(rows) == []
    # deeper fp32 faster than shallower int8 is no contradiction
    assert depth_inversions([(2, "int8", 1.0, 0.0), (4, "fp32", 0.5, 0.0)]) == []


def _exact_bootstrap_se(values: list[float]) -> float:
    """The bootstrap standard error of the median of ``values``, over every resample (n ** n)."""
    n = len(values)
    draws = [statistics.median(c) for c in itertools.product(values, repeat=n)]
    return (statistics.pvariance(draws) * n / (n - 1)) ** 0.5 / statistics.median(values)


def test_error_is_z_standard_errors_of_the_rounds_and_the_level_shift():
    medians = [5.0, 5.3, 5.4, 5.5, 6.0]
    rounds = [_block([m] * 10) for m in medians]
    s = summarize(rounds, rounds=5)
    se = _exact_bootstrap_se(medians)  # independent of the implementation: every one of the 5^5 resamples
    assert standard_error(medians, statistics.median) == pytest.approx(se, rel=0.1)  # 1000 random resamples, all
    assert s.errors["p50"] == pytest.approx(Z * (se ** 2 + LEVEL_SHIFT ** 2) ** 0.5, rel=0.1)
    assert s.errors["p50"] < (6.0 - 5.0) / 5.4  # the previous rule (the relative range) was wider
    assert summarize(rounds, rounds=5).errors == s.errors  # a fixed seed: the same samples, the same error


def test_error_grows_with_disagreeing_rounds_and_shrinks_with_more_of_them():
    def err(medians):
        return summarize([_block([m] * 10) for m in medians], rounds=len(medians)).errors["p50"]

    assert err([5.0] * 5) == pytest.approx(MIN_ERROR) == pytest.approx(Z * LEVEL_SHIFT)
    assert MIN_ERROR < err([4.9, 5.0, 5.0, 5.1, 5.2]) < err([4.0, 4.6, 5.0, 5.6, 6.5])
    assert err([4.8, 5.0, 5.2] * 4) < err([4.8, 5.0, 5.2])  # the same spread, four times the rounds


def test_a_tail_whose_rounds_disagree_states_a_wide_error():
    rng = random.Random(1)
    body = [[5.0 + rng.random() * 0.1 for _ in range(10)] for _ in range(5)]
    for r, stall in zip(body, (6.0, 9.0, 5.2, 12.0, 7.0)):  # each round's slowest run: the p99's
        r[-1] = stall
    s = summarize([_block(ms) for ms in body], rounds=5)
    assert s.errors["p50"] < 1.1 * MIN_ERROR < 0.3 < s.errors["p99"]  # the body at the floor, the tail wide


def test_one_round_uses_its_samples_as_the_units():
    s = summarize([_block([5.0, 5.1, 4.9, 5.0, 5.2, 4.8])], rounds=1)
    assert MIN_ERROR < s.errors["p50"] < 0.2


def test_busy_description_names_only_causes_above_the_threshold():
    # the complaint: flagged busy with "other processes used 0.0 of 2 cores"
    waited = {"ms": [9.0] * 5, "wait": 0.7, "others": 0.0, "score": 0.7, "quiet": False}
    quiet = [_block([5.0] * 5) for _ in range(2)]
    s = summarize([waited] + quiet, rounds=3, cores=2, threads=2)
    assert s.disturbed == "busy machine: threads waited 70% of the time for a core" and s.causes == {"wait": 0.7}
    # one core free for another process's 0.9 cores: no cause, so no flag, whatever the block was marked
    shared = {"ms": [9.0] * 5, "wait": 0.05, "others": 0.9, "score": 0.5, "quiet": False}
    s = summarize([shared], rounds=1, cores=2, threads=1)
    assert not s.disturbed and not s.causes and s.errors["p50"] < 0.5
    rng = random.Random(0)
    for _ in range(300):
        cores = rng.choice([1, 2, 4, 8])
        threads = rng.randint(1, cores)
        blocks = []
        for _ in range(rng.randint(1, 6)):
            wait, others = rng.choice([None, rng.random() * 0.3]), rng.choice([None, rng.random() * cores])
            score = max(causes(wait, others, threads, cores).values())
            blocks.append({"ms": [1.0 + rng.random()], "wait": wait, "others": others, "score": score,
                           "quiet": score <= QUIET})
        s = summarize(blocks, rounds=len(blocks), cores=cores, threads=threads)
        assert bool(s.disturbed) == any(not b["quiet"] for b in blocks)  # the flag and the quiet test agree
        for name, value in s.causes.items():
            above = [b for b in blocks if causes(b["wait"], b["others"], threads, cores)[name] > QUIET]
            assert above and min(b[name] for b in above) <= value <= max(b[name] for b in above)
        assert ("threads waited" in s.disturbed) == ("wait" in s.causes)
        assert ("other processes" in s.disturbed) == ("others" in s.causes)
    assert describe_disturbance({}, 2) == "" and disturbing_causes([], 2, 2) == {}


def test_others_count_only_beyond_the_cores_the_session_leaves_free():
    assert causes(0.0, 1.0, threads=1, cores=2)["others"] == 0.0  # the spare core
    assert causes(0.0, 1.0, threads=2, cores=2)["others"] == pytest.approx(0.5)
    assert causes(None, None, threads=2, cores=2) == {"wait": 0.0, "others": 0.0}


def test_every_quiet_round_counts_once_there_are_enough():
    medians = [5.0, 5.1, 4.9, 5.0, 6.5, 5.05, 4.95]  # extra rounds after two that disagreed
    blocks = [_block([m] * 10) for m in medians] + [_block([9.0] * 10, score=0.5, wait=0.5)]
    s = summarize(blocks, rounds=5)
    assert s.used == list(range(7)) and not s.disturbed  # the busy block is left out, every quiet one counts
    assert s.values["p50"] == pytest.approx(5.0)
    assert s.errors["p50"] < summarize(blocks[:5], rounds=5).errors["p50"]  # more rounds, a tighter error


def test_a_level_shift_between_processes_widens_the_error():
    """The same round values read as one process, or as two processes of which one ran 30 % slower
    throughout: only the second shows the shift, and its error covers it."""
    fast, slow = [5.0, 5.1, 4.9], [6.5, 6.6, 6.4]
    one = summarize([_block([v] * 5) for v in fast + slow], rounds=6)
    two = summarize([{**_block([v] * 5), "process": k} for k, vs in enumerate((fast, slow)) for v in vs], rounds=6)
    assert two.errors["p50"] > one.errors["p50"]
    assert two.errors["p50"] * two.values["p50"] >= (6.5 - 5.0) / 2  # each process's figure within the error


def test_the_unseen_level_shift_shrinks_with_the_processes_pooled():
    assert stated_error(0.0, 1) == pytest.approx(MIN_ERROR)
    assert stated_error(0.0, 2) == pytest.approx(MIN_ERROR / 2 ** 0.5)
    two = summarize([{**_block([5.0] * 5), "process": k} for k in (0, 1) for _ in range(3)], rounds=6)
    assert two.errors["p50"] == pytest.approx(stated_error(0.0, 2))  # processes that agree: the floor
