"""candidates.py on the tiny checkpoint: graphs made once per form and shared, pruning at its threshold,
parity on the all-exits graph, the table rows handed to the selector, and inverted latency tables.

The pipeline-level cases (exports shared across a run's profiles, parity rejection, measured timing,
re-measuring an inverted table) are in test_pipeline.py; these stay at fp32 and predicted latency, so
that nothing here converts a precision or times a model.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bim_export.model.checkpoint import exit_quality, load_checkpoint
from bim_export.deploy import candidates as cand
from bim_export.deploy.candidates import PRUNE_FACTOR, Trial, Workshop, evaluate_candidates, load_images
from bim_export.deploy.latency.measure import LatencyResult
from bim_export.deploy.latency.predict import uncalibrated_error
from bim_export.runtime.session import fixed_batch, session
from bim_export.deploy.profiles import Budgets, Profile, load_profile


pytestmark = pytest.mark.usefixtures("shared_exports")  # exports memoized across the module


@pytest.fixture(scope="module")
def shop(tiny_checkpoint, tmp_path_factory):
    ckpt = load_checkpoint(tiny_checkpoint)
    return Workshop(ckpt, load_images(None, ckpt.config), tmp_path_factory.mktemp("work"))


def _fp32(name: str, **budgets) -> Profile:
    """A shipped profile at fp32 only, with the given budgets."""
    return load_profile(name).model_copy(update={"precisions": ["fp32"], "budgets": Budgets(**budgets)})


def test_profiles_with_the_same_needs_share_one_file_and_a_phone_gets_its_own_form(shop):
    pi, jetson, phone = (load_profile(n) for n in ("raspberry-pi-5", "jetson-orin-nano", "android-snapdragon-8-gen-2"))
    assert pi.opset == jetson.opset
    assert shop.model(2, "fp32", pi) == shop.model(2, "fp32", jetson)  # same opset and form: one file
    assert shop.full_graph("fp32", pi) == shop.full_graph("fp32", jetson)
    phone_model = shop.model(2, "fp32", phone)
    assert phone_model != shop.model(2, "fp32", pi)  # fixed batch and the ops NNAPI lacks rewritten
    assert fixed_batch(session(phone_model)) == phone.batch
    assert fixed_batch(session(shop.model(2, "fp32", pi))) is None
    # the rewritten form computes what PyTorch computes, like any candidate
    graph, suffixed = shop.parity_graph(2, "fp32", phone)
    result = cand.check_parity(shop, 2, "fp32", graph, phone, multi_exit=suffixed)
    assert result.passed, result.failures
    assert result.runs["batch1"].label == f"fp32 batch {phone.batch} (fixed)"


def test_references_and_onnx_outputs_are_computed_once(shop):
    pi = load_profile("raspberry-pi-5")
    assert shop.reference(2) is shop.reference(2)
    full = shop.full_graph("fp32", pi)
    assert shop.onnx_outputs(full) is shop.onnx_outputs(full)
    outs = shop.onnx_outputs(full)
    assert set(outs) == {"batch1", "batchN"}
    assert len(outs["batchN"]["embedding_4"]) == len(shop.images.parity) == cand.PARITY_IMAGES
    assert len(outs["batch1"]["embedding_4"]) == cand.PARITY_BATCH1


def test_parity_on_the_all_exits_graph_is_the_parity_of_the_cut_graph(shop):
    pi = load_profile("raspberry-pi-5")
    for depth in (2, 4):
        on_full = cand.check_parity(shop, depth, "fp32", shop.full_graph("fp32", pi), pi, multi_exit=True)
        on_cut = cand.check_parity(shop, depth, "fp32", shop.model(depth, "fp32", pi), pi)
        assert on_full.passed and on_cut.passed
        assert on_full.cosine == pytest.approx(on_cut.cosine, abs=1e-6)
        assert on_full.max_abs == pytest.approx(on_cut.max_abs, abs=1e-5)
        assert on_full.images == on_cut.images == cand.PARITY_IMAGES


def test_pruning_drops_exactly_what_is_predicted_over_twice_the_budget(shop):
    generous = evaluate_candidates(shop, _fp32("raspberry-pi-5", latency_ms=1e6))
    predicted = {t.depth: t.predicted.p90 for t in generous}
    assert predicted[2] < predicted[4]
    assert not any(t.pruned for t in generous)
    # a budget whose double lies between the two predictions: the deeper one goes, the other is checked
    budget = (predicted[2] + predicted[4]) / 2 / PRUNE_FACTOR
    trials = evaluate_candidates(shop, _fp32("raspberry-pi-5", latency_ms=budget))
    shallow, deep = sorted(trials, key=lambda t: t.depth)
    assert not shallow.pruned and shallow.parity.passed
    assert deep.pruned == f"predicted {predicted[4]:.3g} ms is over 2x the {budget:g} ms budget"
    assert deep.parity is None  # never run


def test_rows_for_the_selector_carry_each_trials_figures(shop):
    profile = _fp32("raspberry-pi-5", latency_ms=1e6, latency_stat="p90")
    trials = evaluate_candidates(shop, profile)
    rows = cand.to_candidates(trials, profile)
    assert [(c.depth, c.precision) for c in rows] == [(2, "fp32"), (4, "fp32")]
    for t, c in zip(trials, rows):
        assert c.quality == exit_quality(shop.ckpt.metrics, t.depth) is not None
        assert c.latency_ms == t.latency.p90 and c.latency_stat == "p90"
        assert c.latency_source == "predicted"
        assert c.expected_error == uncalibrated_error(profile.device_class, "fp32").error
        assert c.size_mb == pytest.approx(Path(t.model).stat().st_size / 1e6)
        assert c.memory_mb == t.memory_mb > 0
        assert c.parity_passed and c.parity_note == t.parity.brief()
    # a pruned trial: rejected on latency by the selector, its parity never checked
    tight = _fp32("raspberry-pi-5", latency_ms=1e-6)
    pruned = cand.to_candidates(evaluate_candidates(shop, tight), tight)
    assert all(c.parity_note == "not checked (pruned)" and c.latency_source == "predicted (pruned: not run)"
               for c in pruned)


def _timed(depth: int, precision: str, ms: float, error: float) -> Trial:
    t = Trial(depth, precision, Path(f"d{depth}-{precision}.onnx"), None, 1.0)
    t.latency = LatencyResult(mean=ms, p50=ms, p90=ms, p99=ms, source="measured", batch=1, model=str(t.model),
                              expected_error=error, errors={"p50": error, "p90": error})
    return t


def test_an_inversion_is_a_deeper_model_faster_beyond_both_errors():
    trials = [_timed(6, "fp32", 10.0, 0.05), _timed(9, "fp32", 7.0, 0.05), _timed(12, "fp32", 12.0, 0.05),
              _timed(9, "int8", 3.0, 0.05)]
    assert cand._inversions(trials, ["p50", "p90"]) == [(0, 1)]  # not across precisions
    # within their errors, a deeper model reading faster is noise, not a contradiction
    assert cand._inversions([_timed(6, "fp32", 10.0, 0.2), _timed(9, "fp32", 7.0, 0.2)], ["p90"]) == []
