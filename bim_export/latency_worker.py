"""The timing worker: runs in its own process, so the only thing in it is ONNX Runtime.

``python -m bim_export.latency_worker`` reads one JSON request on stdin and writes one JSON answer
on stdout. Requests:

- ``{"task": "sessions", "jobs": [{"path", "batch"}...], "providers", "threads", "warmup",
  "repeats", "rounds"}``: one session per job (fixed intra-op threads, sequential execution), a
  warm-up, then ``rounds`` rounds in which every job runs ``repeats`` times, the jobs interleaved
  (and rotated) within each round. Only ``session.run`` is timed, by the wall clock, or with
  ``"clock": "thread_cpu"`` (one thread only) by the CPU time of the calling thread.
- ``{"task": "providers"}``: the execution providers available here.
- ``{"task": "hardware", "threads"}``: GEMM throughput (fp32 MatMul, int8 MatMulInteger) and
  memory bandwidth (a large Add) of this machine through ONNX Runtime.

Peak memory is the rise of the process's RSS high-water mark while a session is created and run.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time

import numpy as np


def _maxrss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024.0 if sys.platform != "darwin" else kb / 1e6


def _session(model, providers, threads):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
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


def _stats(samples: list[float], round_medians: list[float]) -> dict:
    a = np.asarray(samples) * 1e3
    return {"mean_ms": float(a.mean()), "p50_ms": float(min(round_medians) * 1e3),
            "p90_ms": float(np.percentile(a, 90)), "p99_ms": float(np.percentile(a, 99)),
            "min_ms": float(a.min()), "round_medians_ms": [m * 1e3 for m in round_medians], "samples": len(a)}


def time_sessions(req: dict) -> dict:
    rng = np.random.default_rng(0)
    threads = req["threads"]
    jobs = []
    for job in req["jobs"]:
        before = _maxrss_mb()
        sess = _session(job["path"], req.get("providers"), threads)
        feeds = _feeds(sess, job["batch"], rng)
        for _ in range(max(1, req["warmup"])):
            sess.run(None, feeds)
        jobs.append({"sess": sess, "feeds": feeds, "samples": [], "medians": [],
                     "memory_mb": max(0.0, _maxrss_mb() - before)})
    # thread_time: CPU time of this (the only) thread, blind to other processes on a shared machine
    clock = time.thread_time if req.get("clock") == "thread_cpu" else time.perf_counter
    for r in range(req["rounds"]):
        order = jobs[r % len(jobs):] + jobs[: r % len(jobs)]
        for job in order:
            sess, feeds, times = job["sess"], job["feeds"], []
            for _ in range(req["repeats"]):
                t0 = clock()
                sess.run(None, feeds)
                times.append(clock() - t0)
            job["samples"] += times
            job["medians"].append(float(np.median(times)))
    out = []
    for job in jobs:
        res = _stats(job["samples"], job["medians"])
        res.update(providers=job["sess"].get_providers(), peak_memory_mb=job["memory_mb"])
        out.append(res)
    import onnxruntime as ort

    return {"results": out, "onnxruntime": ort.__version__, "threads": threads}


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
