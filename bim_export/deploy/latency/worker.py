"""The timing worker: runs in its own process, so the only thing in it is ONNX Runtime.

``python -m bim_export.deploy.latency.worker`` reads one JSON request on stdin and writes one JSON answer
on stdout. Requests:

- ``{"task": "sessions", "jobs": [{"path", "batch"}...], "providers", "threads", "warmup",
  "repeats", "rounds", "max_rounds", "quiet"}``: one session per job (fixed intra-op threads,
  sequential execution), a warm-up, then ``rounds`` rounds in which every job runs ``repeats``
  times, the jobs interleaved (and rotated) within each round. Each job's block of a round records
  how disturbed it was (:class:`Probe`); a job with fewer than ``rounds`` quiet blocks (score <=
  ``quiet``) gets extra rounds, up to ``max_rounds``, and if still short, a single-thread floor.
  Only ``session.run`` is timed, by the wall clock, or with ``"clock": "thread_cpu"`` (one thread
  only) by the CPU time of the calling thread. The answer holds every sample: the statistics are
  the caller's (:mod:`bim_export.deploy.latency.stats`).
- ``{"task": "providers"}``: the execution providers available here.
- ``{"task": "hardware", "threads"}``: GEMM throughput (fp32 MatMul, int8 MatMulInteger) and
  memory bandwidth (a large Add) of this machine through ONNX Runtime.

Peak memory of a session is the process's RSS high-water mark while the session is created and
warmed up, above its RSS just before (:class:`PeakMemory`), or None where that cannot be known.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time

import numpy as np

from .stats import ERROR_TARGETS, disturbance, round_errors

EXTRA_ROUND_PAUSE_S = 0.3
OTHERS_WINDOW_S = 0.25  # /proc/stat counts 10 ms ticks: shorter stretches are too coarse to read


def _maxrss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024.0 if sys.platform != "darwin" else kb / 1e6


def _status_mb(field: str) -> float | None:
    """``VmRSS`` (now) or ``VmHWM`` (high-water mark) of this process in MB; None where there is no /proc."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        return None
    return None


class PeakMemory:
    """The peak RSS of this process above its RSS at :meth:`start`, in MB, at :meth:`stop`.

    On Linux the high-water mark is reset to the current RSS first (``/proc/self/clear_refs``), so
    a session created after another one that peaked higher still gets its own peak. Where it cannot
    be reset, the high-water mark only tells when it rose in between (then the rise, a lower bound);
    otherwise the peak is unknown: None, never 0.
    """

    def start(self) -> None:
        try:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
                f.write("5")
            self.reset = True
        except OSError:
            self.reset = False
        self.rss, self.hwm = _status_mb("VmRSS"), _maxrss_mb()

    def stop(self) -> float | None:
        if self.reset and self.rss is not None:
            peak = _status_mb("VmHWM")
            rise = None if peak is None else peak - self.rss
        else:
            rise = _maxrss_mb() - self.hwm
        return rise if rise is not None and rise > 0 else None


def _session(model, providers, threads):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    # Idle pool threads otherwise spin for tens of ms after a run, competing with the next session's
    # runs in an interleaved round (and with the caller's own work between requests in a service).
    # Spinning within a run is unchanged; each timed run includes waking the pool.
    so.add_session_config_entry("session.force_spinning_stop", "1")
    available = ort.get_available_providers()
    chosen = [p for p in (providers or ["CPUExecutionProvider"]) if p in available] or ["CPUExecutionProvider"]
    return ort.InferenceSession(model, sess_options=so, providers=chosen)


_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
           "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(uint8)": np.uint8, "tensor(int8)": np.int8}


def _feeds(sess, batch: int, rng) -> dict:
    feeds = {}
    for i in sess.get_inputs():
        shape = [batch if k == 0 and not isinstance(d, int) else (d if isinstance(d, int) else 1)
                 for k, d in enumerate(i.shape)]
        dtype = _DTYPES.get(i.type, np.float32)
        feeds[i.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


class Probe:
    """How much the rest of the machine got in the way of a stretch of timed runs.

    - ``wait``: the time this process's threads spent runnable but not running (the kernel's
      run-queue delay, ``/proc/self/task/*/schedstat``), as a fraction of the thread-time the
      session wanted (wall x threads): other processes holding the cores.
    - ``others``: CPU used by other processes (``/proc/stat`` busy and steal time less this
      process's own), in cores: they also share caches, memory bandwidth and, on a VM, the host.

    Where the system exposes neither (not Linux), ``others`` falls back to the 1-minute load
    average less this session's threads: coarse, but it still tells a busy machine from an idle one.
    """

    def __init__(self, threads: int):
        self.threads = threads
        self.hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.observed = {"run_queue_wait": self.run_delay_ns() is not None,
                         "other_processes_cpu": self.system_busy_s() is not None}

    @staticmethod
    def run_delay_ns() -> int | None:
        total = 0
        try:
            for task in os.listdir("/proc/self/task"):
                with open(f"/proc/self/task/{task}/schedstat", "rb") as f:
                    total += int(f.read().split()[1])
        except (OSError, IndexError, ValueError):
            return None
        return total

    def system_busy_s(self) -> float | None:
        try:
            with open("/proc/stat", encoding="ascii") as f:
                v = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        # user nice system idle iowait irq softirq steal: everything but idle and iowait is busy
        return (sum(v[:3]) + sum(v[5:8])) / self.hz

    def read(self) -> tuple:
        return time.perf_counter(), time.process_time(), self.run_delay_ns(), self.system_busy_s()

    def since(self, mark: tuple, min_seconds: float = OTHERS_WINDOW_S) -> dict:
        """``wait`` and ``others`` since ``mark`` (a :meth:`read`); ``others`` is None for a stretch
        shorter than ``min_seconds``."""
        (wall0, cpu0, delay0, busy0), (wall, cpu, delay, busy) = mark, self.read()
        dt = max(wall - wall0, 1e-9)
        wait = None if delay is None or delay0 is None else (delay - delay0) / 1e9 / (dt * self.threads)
        others = None
        if busy is not None and busy0 is not None:
            others = max(0.0, (busy - busy0) - (cpu - cpu0)) / dt if dt >= min_seconds else None
        elif not any(self.observed.values()):
            load = _loadavg()
            others = None if load is None else max(0.0, load - self.threads)
        return {"wait": wait, "others": others}


def time_sessions(req: dict) -> dict:
    """Warm-up, then rounds of interleaved repeats; extra rounds (up to ``max_rounds``) for the jobs
    that have fewer than ``rounds`` quiet ones; a single-thread CPU-time floor for those still short."""
    rng = np.random.default_rng(0)
    threads = req["threads"]
    cores = os.cpu_count() or 1
    rounds, max_rounds = req["rounds"], max(req["rounds"], req.get("max_rounds") or req["rounds"])
    quiet = float(req.get("quiet", 0.1))
    load_before = _loadavg()
    jobs, memory = [], PeakMemory()
    for job in req["jobs"]:
        memory.start()
        sess = _session(job["path"], req.get("providers"), threads)
        feeds = _feeds(sess, job["batch"], rng)
        for _ in range(max(1, req["warmup"])):
            sess.run(None, feeds)
        jobs.append({"sess": sess, "feeds": feeds, "rounds": [], "memory_mb": memory.stop(),
                     "path": job["path"], "batch": job["batch"]})
    # thread_time: CPU time of this (the only) thread, blind to other processes on a shared machine
    thread_clock = req.get("clock") == "thread_cpu"
    clock = time.thread_time if thread_clock else time.perf_counter
    probe = Probe(threads)

    def quiet_rounds(job) -> int:
        return sum(b.get("quiet", False) for b in job["rounds"])

    def needs_rounds(job) -> bool:
        """Too few quiet rounds, or quiet rounds that disagree beyond the error targets (a shared
        host's slow spells, which no probe sees: more rounds, spread over more time, pin the median)."""
        quiet_ms = [b["ms"] for b in job["rounds"] if b.get("quiet")]
        if len(quiet_ms) < rounds:
            return True
        errors = round_errors(quiet_ms, tuple(ERROR_TARGETS))
        return not thread_clock and any(errors[k] > target for k, target in ERROR_TARGETS.items())

    window, unjudged = probe.read(), []

    def judge(force: bool) -> None:
        """Scores the blocks since the window opened, once it is long enough for /proc/stat's ticks
        (forced: made so by idling, which shows what the others use without us)."""
        nonlocal window, unjudged
        elapsed = time.perf_counter() - window[0]
        if elapsed < OTHERS_WINDOW_S:
            if not force:
                return
            if not thread_clock:  # the thread clock does not see other processes: nothing to judge
                time.sleep(OTHERS_WINDOW_S - elapsed)
        others = probe.since(window, min_seconds=0.0)["others"]
        for block in unjudged:
            block["others"] = others
            block["score"] = 0.0 if thread_clock else disturbance(block["wait"], others, threads, cores)
            block["quiet"] = block["score"] <= quiet
        window, unjudged = probe.read(), []

    for r in range(max_rounds):
        pending = jobs if r < rounds else [j for j in jobs if needs_rounds(j)]
        if not pending:
            break
        if r >= rounds:
            time.sleep(EXTRA_ROUND_PAUSE_S)  # let a burst of other work pass before measuring again
        order = pending[r % len(pending):] + pending[: r % len(pending)]
        for job in order:
            sess, feeds, times = job["sess"], job["feeds"], []
            # untimed: this model's weights back in cache after the others'; after a pause, the whole
            # warm-up again (an idle core comes back slower: clocks, caches, the pool's threads)
            for _ in range(req["warmup"] if r >= rounds else 1):
                sess.run(None, feeds)
            mark = probe.read()
            for _ in range(req["repeats"]):
                t0 = clock()
                sess.run(None, feeds)
                times.append((clock() - t0) * 1e3)
            block = {"ms": times, "round": r, "wait": probe.since(mark)["wait"]}
            job["rounds"].append(block)
            unjudged.append(block)
        judge(force=r >= rounds - 1)  # every block is judged before extra rounds are decided
    out = []
    for job in jobs:
        res = {"rounds": [{k: b[k] for k in ("ms", "round", "wait", "others", "score", "quiet")} for b in job["rounds"]],
               "providers": job["sess"].get_providers(), "peak_memory_mb": job["memory_mb"], "floor_ms": None}
        if not thread_clock and quiet_rounds(job) < rounds:
            res["floor_ms"] = _single_thread_floor(job, req.get("providers"), threads, req["repeats"])
        out.append(res)
    import onnxruntime as ort

    return {"results": out, "onnxruntime": ort.__version__, "threads": threads, "cores": cores,
            "load_average": [load_before, _loadavg()],
            "observed": probe.observed}


def _single_thread_floor(job: dict, providers, threads: int, repeats: int) -> float:
    """A lower bound of the quiet-machine latency: the median CPU time of a single-thread session of
    the same model, divided by the thread count (no session beats perfect scaling of its work).
    CPU time of one thread is barely touched by other processes, so this holds on a busy machine."""
    sess = _session(job["path"], providers, 1)
    feeds = _feeds(sess, job["batch"], np.random.default_rng(0))
    sess.run(None, feeds)
    times = []
    for _ in range(max(3, min(repeats, 10))):
        t0 = time.thread_time()
        sess.run(None, feeds)
        times.append((time.thread_time() - t0) * 1e3)
    return float(np.median(times)) / threads


def _loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _best_median(sess, feeds, clock, repeats=5, rounds=3) -> float:
    sess.run(None, feeds)
    meds = []
    for _ in range(rounds):
        ts = []
        for _ in range(repeats):
            t0 = clock()
            sess.run(None, feeds)
            ts.append(clock() - t0)
        meds.append(float(np.median(ts)))
    return min(meds)


def measure_hardware(req: dict) -> dict:
    from onnx import TensorProto, helper

    threads = req["threads"]
    clock = time.thread_time if req.get("clock") == "thread_cpu" else time.perf_counter
    m, k, n = 1024, 1024, 1024
    out = {}
    for prec, (ta, tb, tc, op) in {"fp32": (TensorProto.FLOAT, TensorProto.FLOAT, TensorProto.FLOAT, "MatMul"),
                                   "int8": (TensorProto.UINT8, TensorProto.INT8, TensorProto.INT32, "MatMulInteger")}.items():
        graph = helper.make_graph([helper.make_node(op, ["a", "b"], ["c"])], "gemm",
                                  [helper.make_tensor_value_info("a", ta, [m, k]), helper.make_tensor_value_info("b", tb, [k, n])],
                                  [helper.make_tensor_value_info("c", tc, [m, n])])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        sess = _session(model.SerializeToString(), None, threads)
        rng = np.random.default_rng(0)
        if prec == "fp32":
            feeds = {"a": rng.standard_normal((m, k)).astype(np.float32), "b": rng.standard_normal((k, n)).astype(np.float32)}
        else:
            feeds = {"a": rng.integers(0, 255, (m, k), dtype=np.uint8), "b": rng.integers(-127, 127, (k, n), dtype=np.int8)}
        out[prec] = 2.0 * m * k * n / _best_median(sess, feeds, clock) / 1e9
    size = 16 * 1024 * 1024  # 64 MB per fp32 operand: far beyond any cache
    graph = helper.make_graph([helper.make_node("Add", ["a", "b"], ["c"])], "stream",
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [size]) for x in "ab"],
                              [helper.make_tensor_value_info("c", TensorProto.FLOAT, [size])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    sess = _session(model.SerializeToString(), None, threads)
    feeds = {x: np.ones(size, np.float32) for x in "ab"}
    bandwidth = 3 * 4 * size / _best_median(sess, feeds, clock, repeats=3) / 1e9
    import onnxruntime as ort

    return {"peak_gflops": out, "mem_bandwidth_gbs": bandwidth, "threads": threads, "onnxruntime": ort.__version__}


def main() -> int:
    req = json.loads(sys.stdin.read())
    os.environ.setdefault("OMP_NUM_THREADS", str(req.get("threads", 1)))
    task = req.get("task")
    if task == "sessions":
        answer = time_sessions(req)
    elif task == "hardware":
        answer = measure_hardware(req)
    elif task == "providers":
        import onnxruntime as ort

        answer = {"providers": ort.get_available_providers()}
    else:
        raise SystemExit(f"unknown task {task!r}")
    json.dump(answer, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
