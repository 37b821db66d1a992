"""Measured latency: ONNX Runtime timing in a separate process, and the result type of every latency.

:func:`measure_onnx` / :func:`measure_many` time ``session.run`` with ONNX Runtime in a worker process
(:mod:`bim_export.deploy.latency.worker`: fixed intra-op threads, warm-up, interleaved repeats in
several rounds). Each round notes how much other processes got in the way; disturbed rounds are
re-measured, and a figure that stays disturbed says so and widens its error
(:mod:`bim_export.deploy.latency.stats`: every statistic is the median across rounds of that round's
statistic). :func:`measure_host_hardware` measures this machine's GEMM throughput and bandwidth for
the roofline. onnxruntime is only imported in the worker.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ...core.errors import InputError
from ...runtime.machine import machine_description
from .stats import QUIET, Z, percentile, stated_error, summarize


@dataclass
class LatencyResult:
    """Latency of one model at one batch size, in milliseconds, with where the figure comes from.

    Attributes:
        source: ``measured`` (timed here), ``predicted`` (cost model, default factors) or
            ``calibrated`` (cost model with factors fitted on the device itself).
        expected_error: relative error the figure is expected to be within (0.1 = 10 %); for a
            measurement, about a 95 % interval, so that two measurements of the same file agree
            within their summed errors (the larger of the p50's and the p90's; ``errors`` has each
            statistic's).
        errors: relative error per statistic (p50, p90, p99, mean), measured results only.
        disturbed: empty, or what disturbed a measurement that could not get quiet rounds (its
            figures are then biased high and its errors reach down to a quiet-machine floor).
        error_basis: where ``expected_error`` comes from, in a line for reports: the spread of a
            measurement's rounds and the level shift between processes, a calibration fit's
            residual, or the held-out error measured for uncalibrated predictions of the device
            class (``predict.UNCALIBRATED_ERRORS``).
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
    error_basis: str = ""

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


# Worker processes one measurement pools, one after another, each with its share of the rounds:
# every process has a level shift of its own (memory layout, thread placement, a shared host's slow
# spells) that its rounds cannot show, and between processes it shows (stats.round_errors). On a
# quiet 2-core VM (bench/results/latency_repeat*.md) one process stated p50 errors of ±14-19 % that
# held for 78-98 % of pairs; two, ±26 % (a bootstrap over two processes is coarse); three, ±16 %
# that held for 100 %, for about 20 % more time.
PROCESSES = 3


def time_sessions(request: dict, processes: int = PROCESSES, timeout: float = 1800) -> dict:
    """Runs a worker's ``sessions`` request in ``processes`` workers one after another, the rounds
    (and extra rounds) shared out between them; one answer, each model's rounds tagged ``process``.
    """
    processes = max(1, int(processes))
    rounds = -(-int(request["rounds"]) // processes)  # at least the rounds asked for, in all
    share = {"rounds": rounds, "max_rounds": max(rounds, int(request.get("max_rounds") or 0) // processes)}
    answers = [_run_worker({**request, **share}, timeout) for _ in range(processes)]
    results = []
    for per_job in zip(*(a["results"] for a in answers)):
        floors = [r["floor_ms"] for r in per_job if r.get("floor_ms") is not None]
        peaks = [r["peak_memory_mb"] for r in per_job if r.get("peak_memory_mb") is not None]
        results.append({**per_job[0], "rounds": [{**b, "process": k} for k, r in enumerate(per_job) for b in r["rounds"]],
                        "floor_ms": min(floors) if floors else None, "peak_memory_mb": max(peaks) if peaks else None})
    return {**answers[0], "results": results, "processes": processes,
            "load_average": [answers[0]["load_average"][0], answers[-1]["load_average"][1]]}


def _default_threads(threads: int | None) -> int:
    return int(threads) if threads else (os.cpu_count() or 1)


def measure_many(jobs: list[tuple[str | os.PathLike, int]], providers: list[str] | None = None,
                 threads: int | None = None, warmup: int = 5, repeats: int = 20, rounds: int = 5,
                 timeout: float = 1800, clock: str = "wall", max_rounds: int | None = None,
                 processes: int = PROCESSES) -> list[LatencyResult]:
    """Times several (model, batch) pairs in ``processes`` workers, one after another, interleaved
    round by round in each (the rounds shared out between the workers).

    Interleaving spreads slow spells of a shared machine over every model instead of one. A model
    whose block of a round was disturbed (its threads waited for a core, or other processes used
    the cores it needs) gets extra rounds, up to ``max_rounds`` (default ``2 * rounds``); its
    figures come from its ``rounds`` quietest blocks. One that never got enough quiet ones is marked
    ``disturbed`` (note ``busy machine``) and its error widened down to a floor the quiet machine
    cannot beat. Peak memory of each is the worker's RSS high-water mark while its session is
    created and warmed up, above the RSS just before (sessions are created one after another), or
    None where the system cannot tell.
    ``clock="thread_cpu"`` (with ``threads=1``) times by the CPU time of the running thread instead
    of the wall clock: a diagnostic that other processes on a shared machine barely disturb.
    """
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
    answer = time_sessions(req, processes, timeout)
    machine = {**machine_description(), "onnxruntime": answer["onnxruntime"]}
    settings = {"threads": threads, "warmup": warmup, "repeats": repeats, "rounds": rounds, "max_rounds": max_rounds,
                "processes": answer["processes"], "clock": clock, "interleaved_with": len(jobs),
                "statistic": "each of p50/p90/p99/mean is the median over the quietest rounds of that round's value "
                             f"(a round's p99 of {repeats} runs is little more than its slowest run)",
                "error": f"{Z:g} standard errors: a bootstrap over the processes and their rounds, and the level "
                         "shift no process can see"}
    out = []
    for (path, batch), r in zip(jobs, answer["results"]):
        blocks = r["rounds"]
        s = summarize(blocks, rounds, r["floor_ms"], answer["cores"], threads)
        record = {"round_medians_ms": [percentile(b["ms"], 50) for b in blocks],
                  "rounds_run": len(blocks), "rounds_used": s.used, "quiet_rounds": sum(b["quiet"] for b in blocks),
                  "samples": sum(len(blocks[i]["ms"]) for i in s.used),
                  "run_queue_wait": s.wait, "other_processes_cores": s.others,
                  "load_average": answer["load_average"], "observed": answer["observed"]}
        if s.floor_ms is not None:
            record["floor_ms"] = s.floor_ms
        if s.causes:
            record["disturbed_by"] = s.causes
        out.append(LatencyResult(mean=s.values["mean"], p50=s.values["p50"], p90=s.values["p90"],
                                 p99=s.values["p99"], source="measured", batch=int(batch), model=os.fspath(path),
                                 providers=r["providers"], settings={**settings, **record},
                                 peak_memory_mb=r["peak_memory_mb"], machine=machine,
                                 expected_error=s.expected_error, errors=s.errors, disturbed=s.disturbed,
                                 note="busy machine" if s.disturbed else "",
                                 error_basis=("measured on a busy machine: the error reaches down to the quiet "
                                              "floor" if s.disturbed else f"measured: {Z:g} standard errors of "
                                              f"{len(s.used)} quiet rounds in {answer['processes']} processes "
                                              f"(bootstrap) and of the level shift no process can see "
                                              f"(at least {stated_error(0.0, answer['processes']):.0%})")))
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
def measure_host_hardware(threads: int | None = None, clock: str = "wall") -> dict:
    """This machine's fp32 / int8 GEMM throughput (GFLOP/s of a 1024^3 GEMM) and memory bandwidth
    (GB/s) through ONNX Runtime: ``{"peak_gflops": {"fp32", "int8"}, "mem_bandwidth_gbs"}``."""
    threads = _default_threads(threads)
    ans = _run_worker({"task": "hardware", "threads": threads, "clock": clock}, timeout=600)
    return {"peak_gflops": dict(ans["peak_gflops"]), "mem_bandwidth_gbs": ans["mem_bandwidth_gbs"]}


def bundle_timer(model: Path, batch: int, providers, input_shape) -> dict:
    """A bundle validator's timer (:func:`bim_export.runtime.validate.validate_bundle`): this module's
    separate-process protocol, as a plain dict."""
    r = measure_onnx(model, batch=batch, providers=list(providers or []) or None)
    return {**{k: getattr(r, k) for k in ("p50", "p90", "p99", "mean")}, "providers": list(r.providers),
            "settings": dict(r.settings), "peak_memory_mb": r.peak_memory_mb, "expected_error": r.expected_error,
            "errors": dict(r.errors), "disturbed": r.disturbed}
