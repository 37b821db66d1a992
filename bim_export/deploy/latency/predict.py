"""Latency of an ONNX model on a device: measured where we can, predicted where we cannot.

:func:`predict_latency` costs the graph per node (:mod:`~bim_export.deploy.latency.costmodel`) and puts
it on a roofline (:mod:`~bim_export.deploy.latency.roofline`) of the profile's hardware figures, with
efficiency factors fitted on measurements (a calibration file made on the device when there is one,
:mod:`~bim_export.deploy.latency.calibration`). :func:`latencies_for_profile` picks: measured
(:mod:`~bim_export.deploy.latency.measure`) for the ``host`` profile, predicted for every other. Every
result says which it is.
"""

from __future__ import annotations

import os

from ..profiles import load_profile
from .calibration import load_calibration
from .costmodel import graph_cost
from .measure import LatencyResult, measure_many
from .roofline import Hardware, default_factors, roofline_features, roofline_seconds

# Relative error a prediction for an uncalibrated device is expected to stay within: the factors
# were fitted on another machine, so only the roofline's shape carries over.
UNCALIBRATED_ERROR = 0.5


def model_precision(path: str | os.PathLike) -> str:
    """fp32, fp16 or int8, from the model's metadata or else its weights."""
    import onnx
    from onnx import TensorProto

    from ..export import read_metadata

    m = onnx.load(os.fspath(path), load_external_data=False)
    meta = read_metadata(m)
    if meta.get("precision") in ("fp32", "fp16", "int8"):
        return meta["precision"]
    types = {i.data_type for i in m.graph.initializer}
    if types & {TensorProto.INT8, TensorProto.UINT8}:
        return "int8"
    return "fp16" if TensorProto.FLOAT16 in types else "fp32"


def predict_latency(path: str | os.PathLike, profile, batch: int | None = None, *, factors=None,
                    hardware: Hardware | None = None) -> LatencyResult:
    """Predicts the latency of an ONNX model on a profile's device from its graph.

    Uses the profile's calibration file when there is one (``source="calibrated"``), otherwise the
    default factors of its device class (``source="predicted"``). ``factors`` / ``hardware``
    override both (the benchmark fits its own).
    """
    profile = load_profile(profile)
    batch = int(batch or profile.batch)
    hw = hardware or Hardware.from_profile(profile)
    source, error, note = "predicted", UNCALIBRATED_ERROR, ""
    if factors is None:
        cal = load_calibration(profile)
        if cal is not None:
            factors, source, error = cal.factors, "calibrated", cal.expected_error
            note = f"calibrated on {cal.machine.get('cpu', 'the device')}"
        else:
            factors = default_factors(profile.device_class, hw)
    else:
        error = None
    cost = graph_cost(path, batch)
    # TensorRT builds int8 engines from QDQ graphs by fusing each Q/DQ pair into its neighbours.
    fuse_qdq = bool(profile.execution_providers) and profile.execution_providers[0] == "TensorrtExecutionProvider"
    ms = roofline_seconds(roofline_features(cost, hw, fuse_qdq=fuse_qdq), factors) * 1e3
    return LatencyResult(mean=ms, p50=ms, p90=ms, p99=ms, source=source, batch=batch, model=os.fspath(path),
                         profile=profile.name, providers=list(profile.execution_providers),
                         settings={"factors": factors.to_dict(), "hardware": hw.signature(),
                                   "gflop": cost.flops / 1e9},
                         peak_memory_mb=(cost.weights_bytes + cost.peak_activation_bytes) / 1e6,
                         expected_error=error, note=note)


def latency_for_profile(path: str | os.PathLike, profile, batch: int | None = None, *, threads: int | None = None,
                        warmup: int = 5, repeats: int = 20, rounds: int = 5,
                        max_rounds: int | None = None) -> LatencyResult:
    """Measured latency for a measured profile (``host``), predicted for every other.

    A prediction uses the profile's calibration file when one exists (labelled ``calibrated``).
    An fp16 model measured on a CPU execution provider is labelled ``host-emulated fp16``.
    """
    return latencies_for_profile([path], profile, batch, threads=threads, warmup=warmup, repeats=repeats,
                                 rounds=rounds, max_rounds=max_rounds)[0]


def latencies_for_profile(paths: list[str | os.PathLike], profile, batch: int | None = None, *,
                          threads: int | None = None, warmup: int = 5, repeats: int = 20, rounds: int = 5,
                          max_rounds: int | None = None) -> list[LatencyResult]:
    """:func:`latency_for_profile` of several models; measured ones are timed interleaved in one worker,
    so that a slow spell of the machine falls on all of them rather than on one."""
    profile = load_profile(profile)
    batch = int(batch or profile.batch)
    if not profile.measured:
        return [predict_latency(p, profile, batch) for p in paths]
    if not paths:
        return []
    results = measure_many([(p, batch) for p in paths], providers=list(profile.execution_providers),
                           threads=threads or profile.threads, warmup=warmup, repeats=repeats, rounds=rounds,
                           max_rounds=max_rounds)
    for path, res in zip(paths, results):
        res.profile = profile.name
        if model_precision(path) == "fp16" and all(p == "CPUExecutionProvider" for p in res.providers):
            res.note = ", ".join(filter(None, ["host-emulated fp16", res.note]))
    return results
