"""Latency of an ONNX model on a device: measured where we can, predicted where we cannot.

- :func:`measure_onnx` / :func:`measure_many` time ``session.run`` with ONNX Runtime in a separate
  process (fixed intra-op threads, warm-up, interleaved repeats in several rounds). Each round notes
  how much other processes got in the way; disturbed rounds are re-measured, and a figure that stays
  disturbed says so and widens its error (:mod:`bim_export.deploy.latency.stats`: every statistic is the
  median across rounds of that round's statistic).
- :func:`predict_latency` costs the graph per node (:mod:`bim_export.deploy.latency.costmodel`) and puts it on a
  roofline (:mod:`bim_export.deploy.latency.roofline`) of a profile's hardware figures, with efficiency factors
  fitted on measurements (a calibration file made on the device when there is one).
- :func:`latency_for_profile` picks: measured for the ``host`` profile, predicted (from the device's
  calibration where one exists) for every other. Every result says which it is.

onnxruntime is only imported in the worker process (:mod:`bim_export.deploy.latency.worker`).
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .costmodel import GraphCost, graph_cost, predict_memory
from .roofline import Hardware, default_factors, roofline_features, roofline_seconds
from ...errors import InputError
from ..validate import machine_description

__all__ = ["LatencyResult", "measure_onnx", "measure_many", "measure_host_hardware", "measure_gemm_throughput",
           "graph_cost", "GraphCost", "predict_latency", "predict_memory", "latency_for_profile",
           "latencies_for_profile", "calibrate",
           "machine_description"]

# Relative error a prediction for an uncalibrated device is expected to stay within: the factors
# were fitted on another machine, so only the roofline's shape carries over.
UNCALIBRATED_ERROR = 0.5
# GPUs are launch-bound at the batch sizes of an embedding service; their L2 (40-50 MB on A100 /
# H100) keeps a ViT's activations on chip, so no node is costed as DRAM-bound below that.
GPU_CACHE_MB = 40.0


@dataclass
class LatencyResult:
    """Latency of one model at one batch size, in milliseconds, with where the figure comes from.

    Attributes:
        source: ``measured`` (timed here), ``predicted`` (cost model, default factors) or
            ``calibrated`` (cost model with factors fitted on the device itself).
        expected_error: relative error the figure is expected to be within (0.1 = 10 %); for a
            measurement, a bound a second measurement of the same file stays within (the larger of
            the p50's and the p90's; ``errors`` has each statistic's).
        errors: relative error per statistic (p50, p90, p99, mean), measured results only.
        disturbed: empty, or what disturbed a measurement that could not get quiet rounds (its
            figures are then biased high and its errors reach down to a quiet-machine floor).
        note: e.g. ``host-emulated fp16`` when an fp16 model was timed on a CPU execution provider,
            ``busy machine`` for a disturbed measurement.
    """

    mean: float
    p50: float
    p90: float
    p99: float
    source: str
    batch: int
    model: str
    profile: str | None = None
    providers: list[str] = field(default_factory=list)
    settings: dict = field(default_factory=dict)
    peak_memory_mb: float | None = None
    machine: dict = field(default_factory=dict)
    expected_error: float | None = None
    errors: dict = field(default_factory=dict)
    disturbed: str = ""
    note: str = ""

    def stat(self, name: str) -> float:
        """The value of statistic ``name`` (p50, p90, p99 or mean) in ms."""
        if name not in ("p50", "p90", "p99", "mean"):
            raise InputError(f"latency statistic must be p50, p90, p99 or mean (got '{name}')")
        return float(getattr(self, name))

    def error(self, name: str) -> float | None:
        """The relative error of statistic ``name`` (the result's ``expected_error`` when it has no
        per-statistic errors, as a prediction)."""
        self.stat(name)
        return self.errors.get(name, self.expected_error)

    @property
    def label(self) -> str:
        """``measured``, ``predicted +-50 %``, ... with the note, for tables and reports."""
        text = self.source
        if self.source != "measured" and self.expected_error is not None:
            text += f" ±{self.expected_error * 100:.0f} %"
        return f"{text} ({self.note})" if self.note else text

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------- measuring


def _run_worker(request: dict, timeout: float) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(request["threads"]))
    try:
        proc = subprocess.run([sys.executable, "-m", "bim_export.deploy.latency.worker"], input=json.dumps(request),
                              capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise InputError(f"latency measurement took longer than {timeout:.0f} s; use fewer repeats") from None
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["no message"]
        paths = ", ".join(j["path"] for j in request.get("jobs", []))
        if "onnxruntime" in proc.stderr and ("Load model" in proc.stderr or "INVALID" in proc.stderr):
            raise InputError(f"{paths}: ONNX Runtime cannot load the model ({tail[0][:200]})")
        raise RuntimeError(f"latency worker failed (exit {proc.returncode}): {tail[0]}")
    return json.loads(proc.stdout)


def _default_threads(threads: int | None) -> int:
    return int(threads) if threads else (os.cpu_count() or 1)


def measure_many(jobs: list[tuple[str | os.PathLike, int]], providers: list[str] | None = None,
                 threads: int | None = None, warmup: int = 5, repeats: int = 20, rounds: int = 5,
                 timeout: float = 1800, clock: str = "wall", max_rounds: int | None = None) -> list[LatencyResult]:
    """Times several (model, batch) pairs in one worker, interleaved round by round.

    Interleaving spreads slow spells of a shared machine over every model instead of one. A model
    whose block of a round was disturbed (its threads waited for a core, or other processes used
    the cores it needs) gets extra rounds, up to ``max_rounds`` (default ``2 * rounds``); its
    figures come from its ``rounds`` quietest blocks. One that never got enough quiet ones is marked
    ``disturbed`` (note ``busy machine``) and its error widened down to a floor the quiet machine
    cannot beat. Peak memory of each is the rise of the worker's RSS high-water mark while its
    session is created and warmed up (sessions are created one after another).
    ``clock="thread_cpu"`` (with ``threads=1``) times by the CPU time of the running thread instead
    of the wall clock: a diagnostic that other processes on a shared machine barely disturb.
    """
    from .stats import QUIET, percentile, summarize

    for path, batch in jobs:
        if not Path(path).is_file():
            raise InputError(f"{path}: ONNX file not found")
        if int(batch) < 1:
            raise InputError(f"batch must be >= 1 (got {batch})")
    if min(warmup, repeats, rounds) < 1:
        raise InputError(f"warmup, repeats and rounds must be >= 1 (got {warmup}, {repeats}, {rounds})")
    max_rounds = 2 * rounds if max_rounds is None else max(rounds, int(max_rounds))
    threads = _default_threads(threads)
    if clock not in ("wall", "thread_cpu") or (clock == "thread_cpu" and threads != 1):
        raise InputError(f"clock must be 'wall', or 'thread_cpu' with threads=1 (got {clock!r}, {threads} threads)")
    req = {"task": "sessions", "jobs": [{"path": os.fspath(p), "batch": int(b)} for p, b in jobs],
           "providers": providers, "threads": threads, "warmup": warmup, "repeats": repeats, "rounds": rounds,
           "max_rounds": max_rounds, "quiet": QUIET, "clock": clock}
    answer = _run_worker(req, timeout)
    machine = {**machine_description(), "onnxruntime": answer["onnxruntime"]}
    settings = {"threads": threads, "warmup": warmup, "repeats": repeats, "rounds": rounds, "max_rounds": max_rounds,
                "clock": clock, "interleaved_with": len(jobs),
                "statistic": "each of p50/p90/p99/mean is the median over the quietest rounds of that round's value"}
    out = []
    for (path, batch), r in zip(jobs, answer["results"]):
        blocks = r["rounds"]
        s = summarize(blocks, rounds, r["floor_ms"], answer["cores"])
        record = {"round_medians_ms": [percentile(b["ms"], 50) for b in blocks],
                  "rounds_run": len(blocks), "rounds_used": s.used, "quiet_rounds": sum(b["quiet"] for b in blocks),
                  "samples": sum(len(blocks[i]["ms"]) for i in s.used),
                  "run_queue_wait": s.wait, "other_processes_cores": s.others,
                  "load_average": answer["load_average"], "observed": answer["observed"]}
        if s.floor_ms is not None:
            record["floor_ms"] = s.floor_ms
        out.append(LatencyResult(mean=s.values["mean"], p50=s.values["p50"], p90=s.values["p90"],
                                 p99=s.values["p99"], source="measured", batch=int(batch), model=os.fspath(path),
                                 providers=r["providers"], settings={**settings, **record},
                                 peak_memory_mb=r["peak_memory_mb"], machine=machine,
                                 expected_error=s.expected_error, errors=s.errors, disturbed=s.disturbed,
                                 note="busy machine" if s.disturbed else ""))
    return out


def measure_onnx(path: str | os.PathLike, batch: int = 1, providers: list[str] | None = None,
                 threads: int | None = None, warmup: int = 5, repeats: int = 20, rounds: int = 5,
                 timeout: float = 600, max_rounds: int | None = None) -> LatencyResult:
    """Measures one ONNX model with ONNX Runtime in a separate process.

    Args:
        path: the ONNX file; its first input axis is the batch.
        providers: execution providers in fallback order (those not available here are skipped;
            the result lists the ones the session actually used). Default: CPU.
        threads: intra-op threads (default: every logical core). Inter-op threads are 1.
        warmup: untimed runs after session creation.
        repeats: timed runs per round; each statistic is the median over ``rounds`` quiet rounds
            of that round's value (disturbed rounds are re-run, up to ``max_rounds`` in all).
    """
    return measure_many([(path, batch)], providers, threads, warmup, repeats, rounds, timeout,
                        max_rounds=max_rounds)[0]


@functools.lru_cache(maxsize=1)
def available_providers() -> list[str]:
    """ONNX Runtime's available execution providers here (asked in a worker process)."""
    return _run_worker({"task": "providers", "threads": 1}, timeout=120)["providers"]


@functools.lru_cache(maxsize=4)
def measure_host_hardware(threads: int | None = None, clock: str = "wall") -> Hardware:
    """This machine's fp32 / int8 GEMM throughput and memory bandwidth through ONNX Runtime."""
    threads = _default_threads(threads)
    ans = _run_worker({"task": "hardware", "threads": threads, "clock": clock}, timeout=600)
    peaks = dict(ans["peak_gflops"])
    peaks.setdefault("fp16", peaks["fp32"])  # CPU EPs run fp16 graphs through fp32 kernels
    return Hardware(peak_gflops=peaks, mem_bandwidth_gbs=ans["mem_bandwidth_gbs"], launch_overhead_us=0.0)


def measure_gemm_throughput(threads: int | None = None) -> dict[str, float]:
    """GFLOP/s of a 1024^3 GEMM on this machine: ``{"fp32": ..., "int8": ...}`` (for roofline fractions)."""
    hw = measure_host_hardware(threads)
    return {"fp32": hw.peak_gflops["fp32"], "int8": hw.peak_gflops["int8"]}


# --------------------------------------------------------------------------------- predicting


def _profile(profile):
    from ..profiles import load_profile

    return load_profile(profile)


def profile_hardware(profile) -> Hardware:
    """The roofline figures of a profile; a measured profile without figures gets this machine's."""
    hw = profile.hardware
    if hw is None:
        return measure_host_hardware(profile.threads)
    peaks = {k: v for k, v in hw.peak_gflops.model_dump().items() if v}
    return Hardware(peak_gflops=peaks, mem_bandwidth_gbs=hw.mem_bandwidth_gbs, launch_overhead_us=hw.launch_overhead_us,
                    cache_mb=GPU_CACHE_MB if profile.device_class == "gpu" else Hardware.cache_mb)


def model_precision(path: str | os.PathLike) -> str:
    """fp32, fp16 or int8, from the model's metadata or else its weights."""
    import onnx
    from onnx import TensorProto

    m = onnx.load(os.fspath(path), load_external_data=False)
    meta = {p.key: p.value for p in m.metadata_props}
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
    from .calibration import load_calibration

    profile = _profile(profile)
    batch = int(batch or profile.batch)
    hw = hardware or profile_hardware(profile)
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
    profile = _profile(profile)
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


def calibrate(profile, out: str | os.PathLike | None = None, **kwargs) -> str:
    """Measures reference models on this device and writes the profile's calibration file.

    See :func:`bim_export.deploy.latency.calibration.calibrate`.
    """
    from .calibration import calibrate as _calibrate

    return _calibrate(profile, out=out, **kwargs)
