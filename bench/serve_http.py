"""Throughput and latency of a bundle served over HTTP (``infer.py --serve``) on this host's CPU.

The shipped checkpoint is exported for the server-gpu profile (or ``--bundle`` names a bundle), then
its infer.py serves it on loopback, once per setting, each in a fresh process:

- batch 1, one client at a time: the latency of one request, nothing to batch;
- batch 1, many concurrent clients: requests queue, each runs alone;
- the profile's batch, as many concurrent clients: the micro-batcher groups them.

Clients are threads of this process, each with its own keep-alive connection, sending the sample
images' JPEG files in turn; every answer is checked (status 200, an embedding of the model's width).
Per setting: requests per second, p50 / p99 latency as a client sees it, and the batches the server
formed (from GET /v1/model). The clients share the CPU with the server: on a machine of few cores
they take part of it, so the figures are the whole loop's, client included, as a load test's are.

    python bench/serve_http.py                        # bench/results/serve_http.{json,md}
    python bench/serve_http.py --bundle exports/h100-sxm --rounds 1 --requests 160 --stem serve_http_quick
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from export_latency import cpu_flags  # noqa: E402
from results_io import write_results  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def export_bundle(work: Path) -> Path:
    """The shipped checkpoint's server-gpu bundle, exported into ``work``."""
    from bim_export.core.resources import default_checkpoint_dir
    from bim_export.deploy.pipeline import run_export

    run_export("server-gpu", default_checkpoint_dir(), work / "exports")
    return next(p for p in (work / "exports").iterdir() if (p / "manifest.json").is_file())


class Server:
    """The bundle's ``infer.py --serve`` on a free loopback port, in its own process."""

    def __init__(self, bundle: Path, batch: int, max_wait_ms: float, threads: int | None):
        cmd = [sys.executable, str(bundle / "infer.py"), "--serve", "--port", "0", "--batch", str(batch),
               "--max-wait-ms", str(max_wait_ms), "--queue", str(max(64, 4 * batch))]
        cmd += ["--threads", str(threads)] if threads else []
        self.proc = subprocess.Popen(cmd, cwd=bundle, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("serving: http://"):
            self.proc.kill()
            raise SystemExit(f"error: the server did not start: {line}{self.proc.stderr.read()}")
        self.port = int(line.split()[1].rsplit(":", 1)[1])

    def get(self, path: str) -> dict:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        conn.request("GET", path)
        body = json.loads(conn.getresponse().read())
        conn.close()
        return body

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.communicate(timeout=30)


def load(port: int, images: list[bytes], clients: int, per_client: int, dim: int) -> tuple[list[float], float]:
    """``clients`` threads each sending ``per_client`` requests back to back; returns every request's
    latency (ms) and the wall time (s) from the first request to the last answer."""
    times: list[list[float]] = [[] for _ in range(clients)]
    errors: list[str] = []
    start = threading.Barrier(clients + 1)

    def client(c: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        start.wait()
        for i in range(per_client):
            body = images[(c * per_client + i) % len(images)]
            t0 = time.perf_counter()
            conn.request("POST", "/v1/infer", body=body, headers={"Content-Type": "image/jpeg"})
            response = conn.getresponse()
            answer = response.read()
            times[c].append((time.perf_counter() - t0) * 1e3)
            if response.status != 200 or len(json.loads(answer)["embedding"]) != dim:
                errors.append(f"{response.status}: {answer[:200]!r}")
        conn.close()

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise SystemExit(f"error: {len(errors)} requests failed, first: {errors[0]}")
    return [t for part in times for t in part], wall


def model_alone(bundle: Path, batch: int, threads: int | None, providers: list[str], reps: int = 7) -> float:
    """Median ms of one onnxruntime run of the bundle's model at ``batch`` on the server's providers,
    in this process (no HTTP)."""
    from bim_export.runtime.session import make_session

    session = make_session(bundle / "model.onnx", providers, threads)
    size = session.get_inputs()[0].shape[-1]
    x = np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(np.float32)
    session.run(None, {"pixels": x})
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        session.run(None, {"pixels": x})
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


def measure(bundle: Path, batch: int, clients: int, requests: int, max_wait_ms: float, threads: int | None,
            images: list[bytes], dim: int) -> dict:
    server = Server(bundle, batch, max_wait_ms, threads)
    try:
        load(server.port, images, min(clients, 8), max(2, batch // 4), dim)  # warm-up
        before = server.get("/v1/model")["batching"]
        per_client = max(1, requests // clients)
        lat, wall = load(server.port, images, clients, per_client, dim)
        after = server.get("/v1/model")["batching"]
    finally:
        server.stop()
    formed = {k: v - before["batches"].get(k, 0) for k, v in after["batches"].items()
              if v - before["batches"].get(k, 0) > 0}
    n_batches = sum(formed.values())
    run_ms = sum(v - before["run_ms"].get(k, 0) for k, v in after["run_ms"].items())
    lat_a = np.asarray(lat)
    return {"batch": batch, "clients": clients, "requests": len(lat), "max_wait_ms": max_wait_ms,
            "requests_per_s": len(lat) / wall, "p50_ms": float(np.percentile(lat_a, 50)),
            "p99_ms": float(np.percentile(lat_a, 99)), "mean_ms": float(lat_a.mean()), "wall_s": wall,
            "batches_formed": dict(sorted(formed.items(), key=lambda kv: int(kv[0]))),
            "mean_batch": len(lat) / n_batches if n_batches else None,
            "server_run_ms_per_batch": run_ms / n_batches if n_batches else None,
            "server_busy_share": run_ms / 1e3 / wall}


def median_row(runs: list[dict], alone_ms: float) -> dict:
    """One setting over its rounds: each figure's median across rounds, the batches formed summed,
    the requests/s range, and every round kept under ``rounds``."""
    row = {k: runs[0][k] for k in ("batch", "clients", "max_wait_ms")}
    for k in ("requests_per_s", "p50_ms", "p99_ms", "mean_ms", "mean_batch", "server_run_ms_per_batch",
              "server_busy_share"):
        row[k] = float(np.median([r[k] for r in runs]))
    formed: dict[str, int] = {}
    for r in runs:
        for k, v in r["batches_formed"].items():
            formed[k] = formed.get(k, 0) + v
    row.update(requests=sum(r["requests"] for r in runs),
               batches_formed=dict(sorted(formed.items(), key=lambda kv: int(kv[0]))),
               requests_per_s_range=[min(r["requests_per_s"] for r in runs), max(r["requests_per_s"] for r in runs)],
               model_alone_ms=alone_ms, rounds=runs)
    return row


def markdown(report: dict) -> str:
    b = report["bundle"]
    on_cpu = report["providers"][0] == "CPUExecutionProvider"
    lines = [
        f"# A bundle served over HTTP on {'the host CPU' if on_cpu else report['providers'][0]} (`infer.py --serve`)",
        "",
        f"Bundle: {b['profile']} profile, the shipped checkpoint at depth {b['depth']} {b['precision']} "
        f"({b['img_size']} px, embedding width {b['dim']}), its batch {b['profile_batch']}; "
        f"run on {', '.join(report['providers'])}" + (" (fp16 on the CPU is host-emulated)"
                                                      if b["precision"] == "fp16" else "") + ".",
        f"Machine: {report['machine']['cpu']} ({report['machine']['logical_cores']} logical cores), CPU flags "
        f"{' '.join(report['cpu_flags']) or 'none'}; onnxruntime {report['versions']['onnxruntime']}, "
        f"starlette {report['versions']['starlette']}, uvicorn {report['versions']['uvicorn']}; "
        f"intra-op threads {report['threads'] or 'onnxruntime default'}.",
        f"Load average (1/5/15 min) before {' '.join(f'{v:.2f}' for v in report['load_before'])}, after "
        f"{' '.join(f'{v:.2f}' for v in report['load_after'])}: a shared machine; the clients run on it too.", "",
        f"Each setting ran {report['rounds']} times, the settings interleaved; each figure is the median across "
        "rounds (requests/s with its range), the batches formed are summed over the rounds.", "",
        "| server batch | concurrent clients | requests | requests/s (range) | p50 ms | p99 ms "
        "| batches formed (size: count) "
        "| mean batch | server: ms per run (share of wall time running) | model alone: ms per batch (images/s) |",
        "|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for r in report["rows"]:
        formed = ", ".join(f"{k}: {v}" for k, v in r["batches_formed"].items())
        lo, hi = r["requests_per_s_range"]
        lines.append(f"| {r['batch']} | {r['clients']} | {r['requests']} | "
                     f"{r['requests_per_s']:.1f} ({lo:.1f}–{hi:.1f}) | "
                     f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {formed} | {r['mean_batch']:.1f} | "
                     f"{r['server_run_ms_per_batch']:.1f} ({r['server_busy_share'] * 100:.0f} %) | "
                     f"{r['model_alone_ms']:.1f} ({r['batch'] / r['model_alone_ms'] * 1e3:.1f}) |")
    lines += ["", "Latency is a client's: sending the JPEG, decoding and preprocessing on the server, waiting in "
              f"the queue and for the batch to fill (at most {report['rows'][-1]['max_wait_ms']:g} ms), the run, "
              "the JSON answer. `model alone` is one onnxruntime run at that batch in the bench's process, no "
              "HTTP (median of 7 runs, median across rounds): the ceiling the server approaches. "
              "`server: ms per run` is the inference "
              "thread's own time in onnxruntime per batch during the load, and the share of the wall time it "
              "spent there (100 %: the model is the bottleneck, not HTTP). "
              + ("These are CPU figures of this host: a GPU's are another device's and are not measured here."
                 if on_cpu else f"Machine's GPUs: {', '.join(report['machine'].get('accelerators') or ['?'])}."), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, default=None, help="a server-gpu bundle (default: export the shipped one)")
    p.add_argument("--requests", type=int, default=320, help="requests per setting and round (default 320)")
    p.add_argument("--rounds", type=int, default=3, help="rounds, the settings interleaved (default 3)")
    p.add_argument("--clients", type=int, default=None, help="concurrent clients (default 2 x the profile's batch)")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="the server's batch wait (default 5 ms)")
    p.add_argument("--threads", type=int, default=None, help="the server's intra-op threads (default: onnxruntime's)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--stem", default="serve_http")
    args = p.parse_args(argv)

    import onnxruntime
    import starlette
    import uvicorn

    from bim_export.core.resources import sample_images_dir
    from bim_export.runtime.machine import machine_description

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        bundle = args.bundle or export_bundle(Path(tmp))
        manifest = json.loads((bundle / "manifest.json").read_text())
        images = [p.read_bytes() for p in sorted(sample_images_dir().rglob("*.jpg"))[:64]]
        server = Server(bundle, 1, 0, args.threads)
        try:
            info = server.get("/v1/model")
            dim = len(json.loads(_post(server.port, images[0]))["embedding"])
        finally:
            server.stop()
        profile_batch = int(manifest["batch"])
        clients = args.clients or 2 * profile_batch
        load_before = list(os.getloadavg())
        settings = [(1, 1, max(50, args.requests // 4)), (1, clients, args.requests),
                    (profile_batch, clients, args.requests)]
        alone: dict[int, list[float]] = {b: [] for b in {1, profile_batch}}
        rounds: list[list[dict]] = [[] for _ in settings]
        for r in range(args.rounds):  # interleaved: a busy spell of the machine hits every setting alike
            for b in alone:
                alone[b].append(model_alone(bundle, b, args.threads, info["providers"]))
            for i, (batch, c, n) in enumerate(settings):
                print(f"round {r + 1}/{args.rounds}: batch {batch}, {c} clients, {n} requests ...", file=sys.stderr,
                      flush=True)
                rounds[i].append(measure(bundle, batch, c, n, args.max_wait_ms, args.threads, images, dim))
        rows = [median_row(runs, float(np.median(alone[runs[0]["batch"]]))) for runs in rounds]
    report = {"machine": machine_description(), "cpu_flags": cpu_flags(), "threads": args.threads,
              "load_before": load_before, "load_after": list(os.getloadavg()), "providers": info["providers"],
              "versions": {"onnxruntime": onnxruntime.__version__, "starlette": starlette.__version__,
                           "uvicorn": uvicorn.__version__},
              "bundle": {"profile": manifest.get("profile"), "depth": manifest.get("depth"),
                         "precision": manifest.get("precision"), "img_size": manifest["preprocessing"]["img_size"],
                         "dim": dim, "profile_batch": profile_batch},
              "rounds": args.rounds, "rows": rows, "wall_s": time.perf_counter() - t0}
    write_results(args.out, args.stem, report, markdown)
    return 0


def _post(port: int, body: bytes) -> bytes:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/v1/infer", body=body, headers={"Content-Type": "image/jpeg"})
    answer = conn.getresponse().read()
    conn.close()
    return answer


if __name__ == "__main__":
    sys.exit(main())
