"""The selector on plain tables: budgets, parity, quality ranking, the half-point window."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from bim_export.core.errors import NoCandidateError
from bim_export.deploy.profiles import Budgets, Profile
from bim_export.deploy.selector import Candidate, select


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
    assert len(lines) == 3 + len(cands)  # header, rows, what scored the quality, the budgets
    assert [line.split()[0] for line in lines[1:-2]] == ["12", "12", "9", "9", "6", "6", "3", "3"]
    d = json.loads(json.dumps(s.to_dict()))
    assert d["profile"] == "test-device" and d["budgets"]["latency_ms"] == 5
    assert d["choice"] == {"depth": s.choice.depth, "precision": s.choice.precision}
    assert {c["status"] for c in d["candidates"]} == {"chosen", "ok", "rejected"}
    assert all(set(c) >= {"depth", "precision", "quality", "latency_ms", "latency_source", "reason"}
               for c in d["candidates"])


def test_quality_in_percent_is_a_bug():
    with pytest.raises(ValueError, match="fraction"):
        select([_c(3, quality=65.3)], _profile())


# ------------------------------------------------------------------- ties within measurement error


def _m(depth, precision, quality, latency, error, size, source="measured", disturbed=False):
    return Candidate(depth=depth, precision=precision, quality=quality, latency_ms=latency, latency_stat="p90",
                     latency_source=source, expected_error=error, latency_disturbed=disturbed, memory_mb=10.0,
                     size_mb=size)


def _reasons(selection) -> dict:
    return {(r.candidate.depth, r.candidate.precision): r.reason for r in selection.rows}


def test_overlapping_measured_latencies_tie_and_the_smaller_file_wins():
    # fp32 reads faster, but 5.3 +-5 % and 5.6 +-5 % overlap: equal quality, so the smaller file wins
    cands = [_m(9, "fp32", 0.70, 5.3, 0.05, 21.6), _m(9, "int8", 0.70, 5.6, 0.05, 5.9)]
    s = select(cands, _profile(latency_ms=50))
    assert (s.choice.depth, s.choice.precision) == (9, "int8")
    reasons = _reasons(s)
    assert reasons[(9, "int8")] == ("best within budget; "
                                    "tie on latency with depth 9 fp32 (5.6 vs 5.3 ms ±5%): smaller file (5.9 vs 21.6 MB)")
    assert reasons[(9, "fp32")] == "tie on latency (5.3 vs 5.6 ms ±5%): larger file (21.6 vs 5.9 MB)"
    # the same figures without an error: the faster one, as before
    exact = [_m(9, "fp32", 0.70, 5.3, None, 21.6), _m(9, "int8", 0.70, 5.6, None, 5.9)]
    assert select(exact, _profile(latency_ms=50)).choice.precision == "fp32"


def test_latency_tie_goes_to_quality_before_size():
    # both within half a point of the best; 8.2 +-10 % and 7.9 +-10 % overlap: the better exit wins
    cands = [_m(12, "int8", 0.702, 8.2, 0.10, 6.0), _m(9, "int8", 0.700, 7.9, 0.10, 4.5)]
    s = select(cands, _profile())
    assert s.choice.depth == 12
    assert _reasons(s)[(9, "int8")] == "tie on latency (7.9 vs 8.2 ms ±10%): lower quality (70.0% vs 70.2%)"
    # outside the window, quality decides before latency is looked at
    s = select([_m(12, "int8", 0.71, 8.2, 0.10, 6.0), _m(9, "int8", 0.70, 7.9, 0.10, 4.5)], _profile())
    assert s.choice.depth == 12 and _reasons(s)[(9, "int8")].startswith("lower quality")


def test_separated_measurements_still_rank_by_latency():
    # 4.0 +-5 % and 6.0 +-5 % do not overlap: the faster (larger) file wins on latency
    cands = [_m(9, "fp32", 0.70, 4.0, 0.05, 21.6), _m(9, "int8", 0.70, 6.0, 0.05, 5.9)]
    s = select(cands, _profile())
    assert s.choice.precision == "fp32"
    assert _reasons(s)[(9, "int8")] == "slower (6 vs 4 ms)"
    assert _reasons(s)[(9, "fp32")] == "best within budget (fastest of the best)"


def test_only_candidates_tied_with_the_fastest_count():
    # 5.0 ties 5.4 (+-5 %), 5.4 ties 5.8, but 5.0 and 5.8 do not: the tie is with the fastest only
    cands = [_m(9, "fp32", 0.70, 5.0, 0.05, 20.0), _m(9, "fp16", 0.70, 5.4, 0.05, 10.0),
             _m(9, "int8", 0.70, 5.8, 0.05, 5.0)]
    s = select(cands, _profile())
    assert s.choice.precision == "fp16"
    assert _reasons(s)[(9, "int8")].startswith("slower")


def test_predicted_errors_do_not_make_ties():
    # a prediction's +-50 % is a scale shared by every candidate of the device: the order holds
    cands = [_m(9, "fp16", 0.70, 3.1, 0.5, 8.2, source="predicted"), _m(9, "int8", 0.70, 3.5, 0.5, 4.4,
                                                                         source="predicted")]
    assert select(cands, _profile()).choice.precision == "fp16"


def test_predictions_closer_than_their_resolution_tie_and_the_table_says_what_decided():
    # fp32 and fp16 of a launch-bound graph: 3.681 and 3.676 ms, both shown as 3.68 (+-59 %). The
    # 0.005 ms between them is below the prediction's resolution: a tie, settled by size.
    cands = [_m(9, "fp32", 0.744, 3.681, 0.59, 16.3, source="predicted"),
             _m(9, "fp16", 0.744, 3.676, 0.59, 8.15, source="predicted"),
             _m(12, "fp32", 0.722, 4.84, 0.59, 21.6, source="predicted")]
    s = select(cands, _profile(latency_ms=8))
    assert (s.choice.depth, s.choice.precision) == (9, "fp16")
    reasons = _reasons(s)
    assert reasons[(9, "fp32")] == ("tie on latency (3.68 vs 3.68 ms, predicted within 1%): "
                                    "larger file (16.3 vs 8.15 MB)")
    assert reasons[(9, "fp16")] == ("best within budget; tie on latency with depth 9 fp32 "
                                    "(3.68 vs 3.68 ms, predicted within 1%): smaller file (8.15 vs 16.3 MB)")
    assert reasons[(12, "fp32")] == "lower quality (72.2%, best 74.4%)"
    assert "slower" not in s.table()
    # the same tie goes to the better exit first, whatever the sizes
    s = select([_m(9, "fp16", 0.700, 3.676, 0.59, 8.15, source="predicted"),
                _m(12, "fp16", 0.702, 3.681, 0.59, 10.0, source="predicted")], _profile())
    assert s.choice.depth == 12
    assert _reasons(s)[(9, "fp16")] == ("tie on latency (3.68 vs 3.68 ms, predicted within 1%): "
                                        "lower quality (70.0% vs 70.2%)")


def test_calibrated_predictions_tie_below_the_resolution_too():
    cands = [_m(9, "fp32", 0.70, 10.05, 0.12, 21.6, source="calibrated"),
             _m(9, "int8", 0.70, 10.0, 0.12, 5.9, source="calibrated")]
    s = select(cands, _profile())
    assert s.choice.precision == "int8"
    assert _reasons(s)[(9, "fp32")].startswith("tie on latency (10.1 vs 10 ms, predicted within 1%): larger file")


def test_a_prediction_apart_by_more_than_its_resolution_is_slower_not_a_tie():
    # 3.68 vs 3.90 ms (6 %): the prediction tells them apart, so the faster wins and the other is slower
    cands = [_m(9, "fp32", 0.70, 3.68, 0.59, 16.3, source="predicted"),
             _m(9, "int8", 0.70, 3.90, 0.59, 16.4, source="predicted")]
    s = select(cands, _profile())
    assert s.choice.precision == "fp32"
    assert _reasons(s)[(9, "int8")] == "slower (3.9 vs 3.68 ms)"
    assert _reasons(s)[(9, "fp32")] == "best within budget (fastest of the best)"


def test_equal_latencies_tie_on_size_then_depth_then_bits():
    same = dict(latency=2.0, quality=0.70)
    s = select([_c(9, "fp32", size=4.0, **same), _c(9, "fp16", size=2.0, **same)], _profile())
    assert _reasons(s)[(9, "fp32")] == "tie on latency (2 ms each): larger file (4 vs 2 MB)"
    s = select([_c(12, "fp16", size=2.0, **same), _c(12, "int8", size=2.0, **same)], _profile())
    assert s.choice.precision == "fp16"
    assert _reasons(s)[(12, "int8")] == "tie on latency (2 ms each): fewer bits (int8 vs fp16)"
    s = select([_c(9, "int8", size=2.0, **same), _c(12, "int8", size=2.0, **same)], _profile())
    assert s.choice.depth == 12 and _reasons(s)[(9, "int8")] == "tie on latency (2 ms each): shallower (depth 9 vs 12)"


def test_measured_errors_of_different_width_are_both_shown():
    cands = [_m(9, "fp32", 0.70, 5.3, 0.05, 21.6), _m(9, "int8", 0.70, 5.6, 0.12, 5.9)]
    s = select(cands, _profile())
    assert _reasons(s)[(9, "fp32")] == "tie on latency (5.3 ±5% vs 5.6 ±12% ms): larger file (21.6 vs 5.9 MB)"


def test_busy_machine_latency_is_checked_against_the_low_end_of_its_error():
    cands = [_m(9, "int8", 0.70, 60.0, 0.8, 5.9, source="measured (busy machine)", disturbed=True),
             _m(12, "int8", 0.60, 200.0, 0.5, 7.0, source="measured (busy machine)", disturbed=True)]
    s = select(cands, _profile(latency_ms=50))
    assert (s.choice.depth, s.choice.precision) == (9, "int8")
    reasons = _reasons(s)
    assert reasons[(9, "int8")].endswith(
        "latency p90 60 ms is over the 50 ms budget as measured on a busy machine, within it by its ±80% error")
    assert reasons[(12, "int8")] == ("latency p90 200 ms (busy machine; at least 100 ms) > budget 50 ms "
                                     "(+50 ms, +100%)")
    # a quiet measurement over the budget is over it, error or not
    quiet = [_m(9, "int8", 0.70, 60.0, 0.8, 5.9), _m(3, "int8", 0.50, 10.0, 0.05, 2.0)]
    s = select(quiet, _profile(latency_ms=50))
    assert s.choice.depth == 3 and _reasons(s)[(9, "int8")].startswith("latency p90 60 ms > budget 50 ms")


def test_table_shows_the_error_of_measured_latencies():
    s = select([_m(9, "fp32", 0.70, 5.3, 0.05, 21.6), _m(9, "int8", 0.70, 5.6, 0.07, 5.9)], _profile())
    table = s.table()
    assert "5.3 p90 ±5%" in table and "5.6 p90 ±7%" in table
    assert "rule" in s.to_dict() and "ties" in s.to_dict()["rule"]


def test_the_table_names_the_set_that_scored_the_quality():
    from bim_export.model.checkpoint import quality_source

    ds = {"name": "heldout_images", "size": 90, "protocol": "leave-one-out kNN, 5-fold linear probe"}
    metrics = {"exits": {"6": {"knn_top1": 0.7, "knn_dataset": ds}, "12": {"knn_top1": 0.8, "knn_dataset": ds}}}
    source = quality_source(metrics)
    assert source == "heldout_images (90 images; leave-one-out kNN, 5-fold linear probe)"
    s = select([_c(6, quality=0.7, latency=1), _c(12, quality=0.8, latency=2)], _profile(), source)
    assert f"quality: the exit's kNN top-1 on {source}" in s.table()
    assert s.to_dict()["quality_source"] == source
    assert quality_source({"exits": {"6": {"recon_loss": 0.5}}}) is None
    s = select([_c(6, quality=0.7, latency=1)], _profile())
    assert "an evaluation set metrics.json does not name" in s.table()


def test_lower_precision_no_smaller_or_faster_says_why():
    """A Jetson int8 (QDQ with float weights for TensorRT, launch-bound at batch 1) is as large as fp32
    and predicted slower: its row says both, from the candidates' own figures."""
    def jetson(precision, latency, size, launch, floats):
        return Candidate(9, precision, 0.744, latency_ms=latency, latency_stat="p90", size_mb=size, memory_mb=17,
                         expected_error=0.59, launch_share=launch, float_weight_share=floats)

    fp32, int8 = jetson("fp32", 3.68, 16.3, 0.97, 1.0), jetson("int8", 3.90, 16.4, 0.98, 1.0)
    reason = _reasons(select([fp32, int8], _profile(latency_ms=8)))[(9, "int8")]
    assert reason == ("slower (3.9 vs 3.68 ms); not smaller than fp32 (16.4 vs 16.3 MB): its QDQ graph keeps float "
                      "weights; no faster than fp32 (3.9 vs 3.68 ms predicted): launch-bound, 98% of it per-node "
                      "launch overhead")
    # int8 weights and a compute-bound run: smaller and faster, nothing to explain
    lean = jetson("int8", 2.1, 4.4, 0.2, 0.05)
    assert _reasons(select([fp32, lean], _profile(latency_ms=8)))[(9, "int8")] == "best within budget (fastest of the best)"
    # as large and as slow, but no figure says why: the columns speak for themselves
    bare = [replace(c, launch_share=None, float_weight_share=None) for c in (fp32, int8)]
    assert _reasons(select(bare, _profile(latency_ms=8)))[(9, "int8")] == "slower (3.9 vs 3.68 ms)"


def test_a_finetuned_checkpoint_is_ranked_and_named_by_its_task_top1():
    from bim_export.model.checkpoint import exit_quality, quality_metric, quality_source

    task = {"name": "pets", "size": 40, "protocol": "given validation folder"}
    # kNN prefers depth 12, the fine-tuned heads depth 6: the selector follows the task
    metrics = {"exits": {"6": {"knn_top1": 0.6, "task_top1": 0.9, "task_dataset": task},
                         "12": {"knn_top1": 0.8, "task_top1": 0.7, "task_dataset": task}}}
    metric, source = quality_metric(metrics), quality_source(metrics)
    cands = [_c(d, quality=exit_quality(metrics, d), latency=d / 6) for d in (6, 12)]
    s = select(cands, _profile(), source, metric)
    assert s.choice.depth == 6 and s.to_dict()["quality_metric"] == "task_top1"
    assert s.table().splitlines()[-2] == ("quality: the exit's held-out task top-1 (fine-tuned) on "
                                          "pets (40 images; given validation folder)")
    assert s.to_dict()["quality_label"] == "held-out task top-1 (fine-tuned)"
