"""A bundle of a tiny hand-built graph, described as the pipeline would describe its choice (shared by
the bundle and umask tests)."""

from __future__ import annotations

import numpy as np
from tiny_onnx import SIZE, write_tiny_onnx

from bim_export.deploy.bundle import BundleSpec
from bim_export.deploy.candidates import Trial
from bim_export.deploy.latency.predict import predict_latency
from bim_export.deploy.profiles import load_profile
from bim_export.deploy.pareto import PlotPoint
from bim_export.deploy.selector import Candidate, select
from bim_export.runtime.parity import ParityResult, merge_results


def parity_result(images, cosine, cosine_min, max_abs, mean_abs, agreement, kind="nearest_neighbour") -> ParityResult:
    return ParityResult(passed=True, max_abs=max_abs, mean_abs=mean_abs, cosine=cosine, cosine_min=cosine_min,
                        neighbour_agreement=agreement, agreement_kind=kind, images=images, tolerances={})


def bundle_spec(tmp_path, profile="jetson-orin-nano") -> BundleSpec:
    """A bundle of a tiny hand-built graph as the pipeline would describe its choice."""
    model = write_tiny_onnx(tmp_path / "cached.onnx", {"exporter": "torch.onnx (test)", "depth": "4"})
    prof = load_profile(profile)
    stat = prof.budgets.latency_stat
    rng = np.random.default_rng(0)
    points = [
        PlotPoint(4, "fp32", 12.0, 0.61, rejected="latency p90 12 ms > 8 ms"),
        PlotPoint(4, "int8", 5.0, 0.60, chosen=True, source="predicted"),
        PlotPoint(2, "fp32", 6.5, 0.48),
        PlotPoint(2, "int8", 3.1, 0.30, rejected="parity failed: cosine 0.97 < 0.995"),
        PlotPoint(1, "int8", None, 0.2, rejected="pruned"),
    ]
    shipped = merge_results({"batch1": parity_result(4, 0.999, 0.998, 0.01, 0.001, None),
                             "batchN": parity_result(8, 0.998, 0.997, 0.02, 0.002, 1.0, "knn_top1")}, label="int8")
    latency = predict_latency(model, prof)  # the profile's uncalibrated prediction, its error and basis
    choice = Trial(4, "int8", model, quality=0.60, size_mb=model.stat().st_size / 1e6, parity=shipped,
                   latency=latency, memory_mb=8.0)
    selection = select([Candidate(4, "int8", quality=0.60, latency_ms=latency.p90, latency_stat=stat, expected_error=latency.expected_error,
                                  memory_mb=8.0, size_mb=choice.size_mb)], prof)
    reference = {"pixels": rng.standard_normal((2, 3, SIZE, SIZE)).astype(np.float32),
                 "embedding": rng.standard_normal((2, 16)).astype(np.float32), "labels": np.array([0, 1])}
    checkpoint = {"img_size": SIZE, "mean": [0.5] * 3, "std": [0.25] * 3, "exits": [2, 4], "step": 10,
                  "arch": "vit_tiny_patch16_224"}
    return BundleSpec(profile=prof, selection=selection, choice=choice, parity=shipped, checkpoint=checkpoint,
                      metrics={}, data={"source": "built-in sample images"},
                      conversion={"precision": "int8", "method": "dynamic"}, reference=reference, points=points,
                      why="Depth 4 int8 is the best within budget.")
