"""Latency figures from timed rounds, on plain numbers: which rounds count, the statistics, the error."""

from __future__ import annotations

import random

import pytest

from bim_export.deploy.latency.stats import (MIN_ERROR, depth_inversions, intervals_overlap, percentile, round_stats,
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
    assert s.errors["p50"] == pytest.approx((5.8 - 5.0) / 5.4)
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
    assert low == pytest.approx(4.0 * (1 - MIN_ERROR))  # down to the floor, with the floor's margin
    # rounds that vary with the load do not push the interval below the floor
    jumpy = [_block([x] * 10, score=0.7, wait=0.7) for x in (8.0, 20.0, 40.0)]
    s = summarize(jumpy, rounds=3, floor_ms=4.0)
    assert s.values["p50"] == 20.0 and s.errors["p50"] == pytest.approx(1 - 4.0 * (1 - MIN_ERROR) / 20.0)


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
