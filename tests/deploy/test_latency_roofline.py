"""The roofline's time models (nodes summed on a CPU, the launch queue on a GPU) and their fit."""

from __future__ import annotations

import numpy as np
import pytest

from bim_export.deploy.latency.costmodel import graph_cost
from bim_export.deploy.latency.predict import predict_latency
from bim_export.deploy.latency.roofline import (MAX_EFFICIENCY, CostFactors, Hardware, NodeTimes, default_factors,
                                                fit_factors, node_times, path_features, predict_seconds,
                                                roofline_seconds)
from bim_export.core.errors import InputError
from bim_export.deploy.profiles import load_profile

EFF = {"gemm": 0.6, "matmul": 0.3, "softmax": 0.5, "norm": 0.5, "elementwise": 0.5, "quant": 0.5, "layout": 0.5}


def _queue(node_us: float, fixed_us: float = 0.0, eff=None) -> CostFactors:
    return CostFactors(dict(eff or EFF), node_overhead_us=node_us, fixed_overhead_us=fixed_us, overlap="queue")


def _simulate(times: NodeTimes, f: CostFactors) -> float:
    """The launch queue written out as two timelines: the host launches every node one after the
    other; the device starts a kernel once it is launched and the device is free."""
    host_done, device_free = [], 0.0
    t = 0.0
    for w in times.launches:
        t += w * f.node_overhead_us * 1e-6
        host_done.append(t)
    for launched, cls, sec in zip(host_done, times.classes, times.seconds):
        if sec > 0:
            device_free = max(device_free, launched) + sec / f.eff(cls)
    return max(device_free, host_done[-1]) + f.fixed_overhead_us * 1e-6


def _random_times(rng, n: int, scale: float) -> NodeTimes:
    classes = list(rng.choice(["gemm", "matmul", "softmax", "elementwise", "view"], size=n))
    seconds = [0.0 if c == "view" else float(s) for c, s in zip(classes, rng.exponential(scale, n))]
    return NodeTimes(classes, seconds, [0.25 if c == "view" else 1.0 for c in classes])


def test_queue_time_is_the_event_simulation():
    rng = np.random.default_rng(0)
    f = _queue(node_us=8.0, fixed_us=30.0)
    for scale in (1e-6, 8e-6, 50e-6):  # kernels shorter than, like, and longer than their launches
        for _ in range(20):
            t = _random_times(rng, 40, scale)
            assert predict_seconds(t, f) == pytest.approx(_simulate(t, f), rel=1e-12)
            # the path's features give the same time through the linear formula the fit uses
            assert roofline_seconds(path_features(t, f), f) == pytest.approx(_simulate(t, f), rel=1e-12)


def test_queue_costs_the_larger_of_launch_and_compute_and_sum_adds_them():
    f = _queue(node_us=10.0)
    short = NodeTimes(["gemm"] * 100, [1e-6 * 0.6] * 100, [1.0] * 100)  # 1 us kernels, 10 us launches
    long = NodeTimes(["gemm"] * 100, [30e-6 * 0.6] * 100, [1.0] * 100)  # 30 us kernels
    assert predict_seconds(short, f) == pytest.approx(100 * 10e-6 + 1e-6)  # launch-bound
    assert predict_seconds(long, f) == pytest.approx(10e-6 + 100 * 30e-6)  # device-bound
    summed = CostFactors.from_dict({**f.to_dict(), "overlap": "sum"})
    assert predict_seconds(short, summed) == pytest.approx(100 * 11e-6)
    assert predict_seconds(long, summed) == pytest.approx(100 * 40e-6)


def test_fit_recovers_queue_factors_across_regimes():
    truth = _queue(node_us=9.0, fixed_us=60.0)
    rng = np.random.default_rng(1)
    samples = [(t, predict_seconds(t, truth)) for t in
               (_random_times(rng, int(rng.integers(60, 300)), s) for s in np.geomspace(5e-7, 6e-5, 14))]
    prior = _queue(node_us=4.0, fixed_us=20.0, eff={k: v * 1.7 for k, v in EFF.items()})
    fit = fit_factors(samples, prior, ridge=1e-9)
    assert fit.overlap == "queue"
    for t, y in samples:
        assert predict_seconds(t, fit) == pytest.approx(y, rel=1e-3)
    assert fit.node_overhead_us == pytest.approx(9.0, rel=1e-2)
    assert fit.eff("gemm") == pytest.approx(0.6, rel=2e-2)


def test_fit_caps_efficiency_and_rejects_summed_features_for_the_queue():
    rng = np.random.default_rng(2)
    truth = _queue(node_us=2.0, eff={k: 3.0 for k in EFF})  # "faster than the roofline"
    samples = [(t, predict_seconds(t, truth)) for t in (_random_times(rng, 80, 2e-5) for _ in range(8))]
    capped = fit_factors(samples, _queue(node_us=2.0), max_efficiency=MAX_EFFICIENCY["gpu"])
    assert max(capped.eff(c) for c in EFF) == pytest.approx(1.0)
    assert max(fit_factors(samples, _queue(node_us=2.0)).eff(c) for c in EFF) > 2.0
    with pytest.raises(InputError, match="node times"):
        fit_factors([(t.features(), y) for t, y in samples], _queue(node_us=2.0))
    with pytest.raises(InputError, match="overlap must be one of sum, queue"):
        CostFactors(dict(EFF), 1.0, 1.0, overlap="parallel")
    assert CostFactors.from_dict({"efficiency": EFF, "node_overhead_us": 1, "fixed_overhead_us": 1}).overlap == "sum"


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    """A tiny timm ViT of two blocks through the TorchScript exporter (fast)."""
    import timm
    import torch

    torch.set_num_threads(1)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, depth=2, embed_dim=32,
                              num_heads=2, img_size=32, patch_size=8).eval()
    path = tmp_path_factory.mktemp("vit") / "vit.onnx"
    torch.onnx.export(model, (torch.randn(1, 3, 32, 32),), path, input_names=["pixels"], output_names=["embedding"],
                      dynamic_axes={"pixels": {0: "batch"}}, opset_version=17, dynamo=False)
    return path


def test_gpu_profiles_queue_launches_and_do_not_split_at_a_cache(vit, monkeypatch, tmp_path):
    """The recorded H100 bug: ViT-Ti at batch 32 was as launch-bound as at batch 1 and took the same
    time; summing launches and compute charged both. Here a tiny ViT at batch 1024 is that case."""
    monkeypatch.setenv("BIM_EXPORT_CALIBRATION_DIR", str(tmp_path))
    profile = load_profile("server-gpu")
    hw = Hardware.from_profile(profile)
    assert hw.cache_mb is None and default_factors("gpu", hw).overlap == "queue"
    times = {b: node_times(graph_cost(vit, b), hw) for b in (1, 1024)}
    assert not any(c.endswith("_dram") for c in times[1024].classes)
    queue = default_factors("gpu", hw)
    summed = CostFactors.from_dict({**queue.to_dict(), "overlap": "sum"})
    assert predict_seconds(times[1024], queue) == pytest.approx(predict_seconds(times[1], queue), rel=0.02)
    assert predict_seconds(times[1024], summed) > 1.05 * predict_seconds(times[1], summed)
    assert predict_latency(vit, profile, 1024).p50 == pytest.approx(predict_seconds(times[1024], queue) * 1e3)
    # CPUs run nodes back to back
    assert default_factors("cpu", hw).overlap == "sum" and default_factors("edge", hw).overlap == "sum"
