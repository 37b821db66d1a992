"""The selector on plain tables: budgets, parity, quality ranking, the half-point window."""

from __future__ import annotations

import json

import pytest

from bim_export.errors import NoCandidateError
from bim_export.profiles import Budgets, Profile
from bim_export.selector import Candidate, select


def _profile(**budgets) -> Profile:
    return Profile(name="test-device", description="test", device_class="cpu", measured=True,
                   execution_providers=["CPUExecutionProvider"], precisions=["fp32", "fp16", "int8"],
                   budgets=Budgets(**budgets))


def _c(depth, precision="fp32", quality=None, latency=1.0, size=1.0, memory=10.0, parity=True, note=""):
    return Candidate(depth=depth, precision=precision, quality=quality, parity_passed=parity, parity_note=note,
                     latency_ms=latency, latency_stat="p90", memory_mb=memory, size_mb=size)


def _status(selection) -> dict:
    return {(r.candidate.depth, r.candidate.precision): r.status for r in selection.rows}


def test_best_quality_within_budget_wins():
    cands = [_c(3, quality=0.50, latency=2), _c(6, quality=0.60, latency=4), _c(12, quality=0.70, latency=9)]
    s = select(cands, _profile(latency_ms=5))
    assert (s.choice.depth, s.choice.precision) == (6, "fp32")
    assert _status(s) == {(12, "fp32"): "rejected", (6, "fp32"): "chosen", (3, "fp32"): "ok"}
    rejected = next(r for r in s.rows if r.status == "rejected")
    assert rejected.reason == "latency p90 9 ms > budget 5 ms (+4 ms, +80%)"


def test_within_half_a_point_the_fastest_wins():
    cands = [_c(12, "fp32", 0.700, latency=8), _c(12, "int8", 0.700, latency=3),
             _c(9, "fp32", 0.696, latency=2), _c(6, "fp32", 0.694, latency=1)]
    s = select(cands, _profile(latency_ms=10))
    # 0.696 is within 0.005 of 0.700, 0.694 is not.
    assert (s.choice.depth, s.choice.precision) == (9, "fp32")
    reasons = {(r.candidate.depth, r.candidate.precision): r.reason for r in s.rows}
    assert reasons[(6, "fp32")].startswith("lower quality")
    assert reasons[(12, "int8")].startswith("slower")


def test_window_edge_is_inclusive():
    s = select([_c(12, quality=0.700, latency=5), _c(9, quality=0.695, latency=1)], _profile())
    assert s.choice.depth == 9


def test_latency_ties_go_to_quality_then_depth_then_bits():
    s = select([_c(9, "int8", 0.70, latency=2), _c(12, "int8", 0.702, latency=2)], _profile())
    assert s.choice.depth == 12
    s = select([_c(12, "int8", 0.70, latency=2), _c(12, "fp16", 0.70, latency=2)], _profile())
    assert s.choice.precision == "fp16"


def test_missing_quality_means_deeper_is_better():
    cands = [_c(3, latency=1), _c(6, latency=2), _c(6, "int8", latency=1.5), _c(12, latency=50)]
    s = select(cands, _profile(latency_ms=10))
    assert (s.choice.depth, s.choice.precision) == (6, "int8")
    assert s.to_dict()["quality_metric"] == "depth"
    assert "deeper is better" in s.table()
    # One depth lacking kNN top-1 puts every candidate on depth order.
    s = select([_c(3, quality=0.9), _c(6, quality=None)], _profile())
    assert s.choice.depth == 6


def test_parity_failure_rejects_only_that_candidate():
    cands = [_c(12, "fp32", 0.7, latency=8), _c(12, "int8", 0.7, latency=3, parity=False, note="cosine 0.98 < 0.995"),
             _c(9, "int8", 0.69, latency=2)]
    s = select(cands, _profile())
    assert (s.choice.depth, s.choice.precision) == (12, "fp32")
    row = next(r for r in s.rows if r.candidate.precision == "int8" and r.candidate.depth == 12)
    assert row.status == "rejected" and row.reason == "parity failed: cosine 0.98 < 0.995"


def test_every_budget_is_checked_and_absent_ones_are_not():
    cands = [_c(12, latency=1, memory=600, size=5), _c(9, latency=1, memory=100, size=20), _c(6, latency=1, memory=100, size=5)]
    s = select(cands, _profile(peak_memory_mb=512, model_size_mb=12))
    assert s.choice.depth == 6
    reasons = [r.reason for r in s.rows]
    assert reasons[0] == "peak memory 600 MB > budget 512 MB (+88 MB, +17%)"
    assert reasons[1] == "model size 20 MB > budget 12 MB (+8 MB, +67%)"
    assert select(cands, _profile()).choice.depth == 12  # no budgets: nothing rejected


def test_missing_figure_fails_only_a_set_budget():
    cands = [_c(12, latency=None), _c(6, latency=1)]
    assert select(cands, _profile()).choice.depth == 12
    s = select(cands, _profile(latency_ms=5))
    assert s.choice.depth == 6 and s.rows[0].reason.startswith("no latency p90 figure")


def test_impossible_budget_names_closest_candidate_and_overshoot():
    cands = [_c(12, latency=40, size=21), _c(3, "int8", latency=6, size=1.5), _c(3, latency=12, size=5)]
    with pytest.raises(NoCandidateError) as e:
        select(cands, _profile(latency_ms=5, model_size_mb=4))
    message = str(e.value)
    assert message == ("no candidate meets the budgets of test-device; closest: depth 3 int8: "
                       "latency p90 6 ms > budget 5 ms (+1 ms, +20%)")
    assert e.value.exit_code == 3
    table = e.value.table.splitlines()
    assert table[0].startswith("depth") and [line.split()[0] for line in table[1:4]] == ["12", "3", "3"]
    assert table[-1] == "budgets of test-device: latency p90 <= 5 ms, model size <= 4 MB"


def test_all_parity_failures():
    with pytest.raises(NoCandidateError, match="every candidate failed parity"):
        select([_c(12, parity=False, note="cosine 0.5"), _c(3, "int8", parity=False)], _profile())


def test_no_candidates():
    with pytest.raises(NoCandidateError, match="no candidates"):
        select([], _profile())


def test_latency_at_another_statistic_is_a_bug():
    with pytest.raises(ValueError, match="p50"):
        select([Candidate(3, "fp32", latency_ms=1.0, latency_stat="p50")], _profile(latency_ms=5, latency_stat="p90"))


def test_table_and_dict_list_every_candidate():
    cands = [_c(d, p, 0.5 + d / 100, latency=d / 2) for d in (3, 6, 9, 12) for p in ("fp32", "int8")]
    s = select(cands, _profile(latency_ms=5))
    lines = s.table().splitlines()
    assert len(lines) == 2 + len(cands)
    assert [line.split()[0] for line in lines[1:-1]] == ["12", "12", "9", "9", "6", "6", "3", "3"]
    d = json.loads(json.dumps(s.to_dict()))
    assert d["profile"] == "test-device" and d["budgets"]["latency_ms"] == 5
    assert d["choice"] == {"depth": s.choice.depth, "precision": s.choice.precision}
    assert {c["status"] for c in d["candidates"]} == {"chosen", "ok", "rejected"}
    assert all(set(c) >= {"depth", "precision", "quality", "latency_ms", "latency_source", "reason"}
               for c in d["candidates"])


def test_quality_in_percent_is_a_bug():
    with pytest.raises(ValueError, match="fraction"):
        select([_c(3, quality=65.3)], _profile())
