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
from dataclasses import dataclass

from ..profiles import Profile, load_profile
from .calibration import load_calibration
from .costmodel import graph_cost
from .measure import LatencyResult, measure_many
from .roofline import Hardware, default_factors, node_times, path_features, roofline_seconds


@dataclass(frozen=True)
class ExpectedError:
    """How far uncalibrated predictions were measured to be off, and the measurement it came from."""

    error: float  # the relative error a prediction is labelled with (0.5 = +-50 %)
    basis: str  # the measurement, its machine and what was held out, in a line


_GPU = ("uncalibrated gpu defaults, worst held-out error: published H200 torch-eager timings predicted {h200} "
        "from the H100 fit (that host launches kernels faster); each (width, batch) group of the H100 run "
        "(NVIDIA H100 80GB HBM3, torch 2.11 eager) predicted from the others: median 8 %, worst 21 % "
        "(bench/results/latency_model_cuda_h100.md){extra}")
_CPU = ("uncalibrated cpu defaults, worst held-out error: each (width, batch) group of a run on a 2-core AMD "
        "EPYC (AVX2, FMA; ONNX Runtime 1.32) predicted from the others: median 18 %, worst 28 % "
        "(bench/results/latency_model_quiet.md); the defaults were fitted on that machine and no other CPU "
        "was measured{extra}")
_UNTIMED = "; {p} was not timed, the fp32 figure stands in"
# The error an uncalibrated prediction (a device class's default factors on its profile's data-sheet
# figures) is labelled with, per device class and precision: the worst error of the held-out checks
# bench/latency_model.py ran on the class's defaults (bench/README.md, "Latency prediction"). mobile and edge
# devices use the cpu factors.
UNCALIBRATED_ERRORS: dict[tuple[str, str], ExpectedError] = {
    ("gpu", "fp32"): ExpectedError(0.59, _GPU.format(h200="+43 % and +59 %", extra="")),
    ("gpu", "fp16"): ExpectedError(0.59, _GPU.format(h200="+43 % and +59 %", extra=_UNTIMED.format(p="fp16"))),
    ("gpu", "int8"): ExpectedError(0.59, _GPU.format(h200="+43 % and +59 %", extra=_UNTIMED.format(p="int8"))),
    ("cpu", "fp32"): ExpectedError(0.28, _CPU.format(extra="")),
    ("cpu", "fp16"): ExpectedError(0.28, _CPU.format(extra=_UNTIMED.format(p="fp16"))),
    ("cpu", "int8"): ExpectedError(0.28, _CPU.format(extra=_UNTIMED.format(p="int8"))),
}


def uncalibrated_error(device_class: str, precision: str) -> ExpectedError:
    """The measured error of an uncalibrated prediction for a device class and precision."""
    return UNCALIBRATED_ERRORS[("gpu" if device_class == "gpu" else "cpu", precision)]


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


def predict_latency(path: str | os.PathLike, profile: Profile | str, batch: int | None = None, *, factors=None,
                    hardware: Hardware | None = None) -> LatencyResult:
    """Predicts the latency of an ONNX model on a profile's device from its graph.

    Uses the profile's calibration file when there is one (``source="calibrated"``, its fit's
    residual as the error), otherwise the default factors of its device class (``source="predicted"``,
    the error measured for them: :data:`UNCALIBRATED_ERRORS`). ``factors`` / ``hardware`` override
    both (the benchmark fits its own; the result then has no expected error).
    """
    profile = load_profile(profile)
    batch = int(batch or profile.batch)
    hw = hardware or Hardware.from_profile(profile)
    precision = model_precision(path)
    source, error, note, basis, calibration = "predicted", None, "", "", None
    if factors is None:
        cal = load_calibration(profile)
        if cal is not None:
            factors, source, error, basis = cal.factors, "calibrated", cal.expected_error, cal.error_basis
            note, calibration = cal.label, cal.to_dict()
        else:
            factors = default_factors(profile.device_class, hw)
            expected = uncalibrated_error(profile.device_class, precision)
            error, basis = expected.error, expected.basis
    cost = graph_cost(path, batch)
    # TensorRT builds int8 engines from QDQ graphs by fusing each Q/DQ pair into its neighbours, with
    # fp16 enabled for the layers left in float (targets/jetson.py enables it for every precision).
    tensorrt = profile.execution_providers[0] == "TensorrtExecutionProvider"
    times = node_times(cost, hw, fuse_qdq=tensorrt, float16=tensorrt and precision == "int8")
    critical = path_features(times, factors)  # what decides the run's time
    seconds = roofline_seconds(critical, factors)
    ms = seconds * 1e3
    launches = critical.get("nodes", 0.0) * factors.node_overhead_us * 1e-6
    return LatencyResult(mean=ms, p50=ms, p90=ms, p99=ms, source=source, batch=batch, model=os.fspath(path),
                         profile=profile.name, providers=list(profile.execution_providers),
                         settings={"factors": factors.to_dict(), "hardware": hw.signature(),
                                   "gflop": cost.flops / 1e9,
                                   # of the predicted time, the share spent launching nodes (> 1/2: launch-bound)
                                   "launch_share": launches / seconds if seconds > 0 else 0.0,
                                   # of the weight bytes, the share stored as float (a QDQ graph for
                                   # TensorRT keeps them so, with a Q/DQ pair on each)
                                   "float_weight_share": cost.float_weights_bytes / max(cost.weights_bytes, 1),
                                   **({"calibration": calibration} if calibration else {})},
                         peak_memory_mb=(cost.weights_bytes + cost.peak_activation_bytes) / 1e6,
                         expected_error=error, note=note, error_basis=basis)


def latency_for_profile(path: str | os.PathLike, profile: Profile | str, batch: int | None = None, *, threads: int | None = None,
                        warmup: int = 5, repeats: int = 20, rounds: int = 5,
                        max_rounds: int | None = None) -> LatencyResult:
    """Measured latency for a measured profile (``host``), predicted for every other.

    A prediction uses the profile's calibration file when one exists (labelled ``calibrated``).
    An fp16 model measured on a CPU execution provider is labelled ``host-emulated fp16``.
    """
    return latencies_for_profile([path], profile, batch, threads=threads, warmup=warmup, repeats=repeats,
                                 rounds=rounds, max_rounds=max_rounds)[0]


def latencies_for_profile(paths: list[str | os.PathLike], profile: Profile | str, batch: int | None = None, *,
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
