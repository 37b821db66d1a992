"""Requests per second and p50/p99 latency of a server-gpu bundle's Triton repository, served by a real
tritonserver on this host's CPU, over HTTP and gRPC, at batch 1 and at the profile's batch.

The bundle is the shipped checkpoint exported for ``server-gpu`` (or ``--bundle``). Its
``triton/<model>/`` is served by ``tools/triton_server.py`` (PyTriton's tritonserver, the profile's
max batch size and dynamic batcher from config.pbtxt; onnxruntime on the CPU runs the model, as
this host has no GPU for the onnxruntime backend's TensorRT). ``--clients`` threads, each with its
own client, send requests of one batch back to back; latency is per request as a client sees it,
throughput is requests over the wall time of the whole run. Nothing here is a GPU figure.

The server runs from the environment with PyTriton (``$BIM_EXPORT_TRITON_PYTHON``, else
``.venv-triton``: ``python3 -m venv .venv-triton && .venv-triton/bin/pip install nvidia-pytriton onnxruntime``).

    python bench/serve_triton.py            # serve_triton.md / .json
    python bench/serve_triton.py --quick    # fewer requests: serve_triton_quick.md
"""

from __future__ import annotations

import argparse
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

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
CACHE = REPO / "bench" / ".cache" / "serve_triton"
SERVER = REPO / "tools" / "triton_server.py"


def triton_python() -> str:
    named = os.environ.get("BIM_EXPORT_TRITON_PYTHON") or str(REPO / ".venv-triton" / "bin" / "python")
    if not Path(named).is_file():
        sys.exit(f"error: no PyTriton environment at {named} (python3 -m venv .venv-triton && .venv-triton/bin/pip "
                 "install nvidia-pytriton onnxruntime, or set BIM_EXPORT_TRITON_PYTHON)")
    return named


def server_gpu_bundle(bundle: Path | None) -> Path:
    """``--bundle``, else the shipped checkpoint exported for server-gpu (made once, kept in bench/.cache)."""
    if bundle is not None:
        return bundle
    made = CACHE / "h100-sxm"
    if not (made / "manifest.json").is_file():
        from bim_export.deploy.pipeline import run_export

        print("exporting the shipped checkpoint for server-gpu ...", flush=True)
        run_export("server-gpu", None, CACHE)
    return made


class Server:
    """tools/triton_server.py in a subprocess; stops when its standard input closes."""

    def __init__(self, python: str, folder: Path, work: Path):
        self.log, ready = work / "server.log", work / "ready.json"
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen([python, str(SERVER), str(folder), str(ready), "--lifetime", "3600"],
                                         stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while not ready.is_file():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                sys.exit(f"error: the Triton server did not start:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.2)
        self.ports = json.loads(ready.read_text())

    def stop(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def make_call(protocol: str, ports: dict):
    """A function sending one request of pixels [B, 3, S, S] over ``protocol`` (one client each)."""
    if protocol == "http":
        import tritonclient.http as client_mod

        client = client_mod.InferenceServerClient(f"127.0.0.1:{ports['http']}")
    else:
        import tritonclient.grpc as client_mod

        client = client_mod.InferenceServerClient(f"127.0.0.1:{ports['grpc']}")
    wanted = [client_mod.InferRequestedOutput("embedding")]

    def call(x: np.ndarray) -> np.ndarray:
        inp = client_mod.InferInput("pixels", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        return client.infer(ports["model"], [inp], outputs=wanted).as_numpy("embedding")

    return call


def run_load(ports: dict, protocol: str, x: np.ndarray, clients: int, requests: int) -> dict:
    """``clients`` threads x ``requests`` requests of ``x``: per-request latency and throughput."""
    times: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()

    def worker() -> None:
        call = make_call(protocol, ports)
        call(x)  # warm-up (connection, first batch)
        mine = []
        for _ in range(requests):
            t0 = time.perf_counter()
            try:
                call(x)
            except Exception as e:  # counted and reported with the figures
                errors.append(str(e).splitlines()[0])
                continue
            mine.append((time.perf_counter() - t0) * 1e3)
        with lock:
            times.extend(mine)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    t = np.asarray(times)
    return {"protocol": protocol, "batch": int(len(x)), "clients": clients, "requests": len(times),
            "errors": len(errors), "first_error": errors[0] if errors else None, "wall_s": round(wall, 3),
            "requests_per_s": round(len(times) / wall, 2), "images_per_s": round(len(times) * len(x) / wall, 1),
            "p50_ms": round(float(np.percentile(t, 50)), 2), "p99_ms": round(float(np.percentile(t, 99)), 2)}


def markdown(report: dict) -> str:
    m, b = report["machine"], report["bundle"]
    lines = [
        "# Triton serving on this host's CPU (`bench/serve_triton.py`)", "",
        f"- machine: {m['cpu']}, {m['logical_cores']} logical cores, CPU flags {', '.join(report['cpu_flags']) or 'none'}; "
        f"load average {report['load_before']} before, {report['load_after']} after; {report['date']}",
        f"- server: tritonserver {report['tritonserver']} (PyTriton), model `{b['model']}` from the server-gpu bundle "
        f"(depth {b['depth']}, {b['precision']}, {b['img_size']} px), max_batch_size {b['max_batch_size']}, "
        f"preferred batches {b['preferred']}, queue delay {b['queue_delay_us']} us; onnxruntime "
        f"{report['onnxruntime']} on the CPU runs the model (no GPU here: no TensorRT figure"
        + ("; an fp16 graph on the CPU execution provider is host-emulated fp16" if b["precision"] == "fp16" else "")
        + ")",
        f"- load: {report['clients']} clients, each its own connection, requests back to back; per client: "
        f"{report['requests']}",
        "", "| protocol | batch | requests/s | images/s | p50 ms | p99 ms | errors |", "|---|---|---|---|---|---|---|"]
    for r in report["runs"]:
        lines.append(f"| {r['protocol']} | {r['batch']} | {r['requests_per_s']:.1f} | {r['images_per_s']:.0f} | "
                     f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['errors']} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=None, help="a server-gpu bundle (default: export the shipped checkpoint)")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=None, help="per client and run (default 200 at batch 1; quick 20)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--render", type=Path, default=None, help="re-render the .md of a results .json, measure nothing")
    args = parser.parse_args()
    if args.render is not None:
        write_results(args.render.parent, args.render.stem, json.loads(args.render.read_text()), markdown)
        return 0
    python = triton_python()
    started = time.time()
    bundle = server_gpu_bundle(args.bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    tri = manifest["triton"]
    pixels = np.load(bundle / "reference.npz")["pixels"].astype(np.float32)
    top = manifest["batch"]
    per_client = args.requests or (20 if args.quick else 200)
    load_before = " ".join(f"{v:.2f}" for v in os.getloadavg())
    runs = []
    with tempfile.TemporaryDirectory() as work:
        server = Server(python, bundle / "triton" / tri["model_name"], Path(work))
        try:
            for batch in (1, top):
                x = np.ascontiguousarray(np.resize(pixels, (batch, *pixels.shape[1:])))
                n = per_client if batch == 1 else max(5, per_client * 4 // top)
                for protocol in ("http", "grpc"):
                    runs.append(run_load(server.ports, protocol, x, args.clients, n))
                    print(runs[-1], flush=True)
        finally:
            server.stop()
        version = next((ln.split("|")[2].strip() for ln in server.log.read_text().splitlines()
                        if "| server_version" in ln), "?")
    import onnxruntime

    from bim_export.runtime.machine import machine_description

    report = {"machine": machine_description(), "cpu_flags": cpu_flags(), "load_before": load_before,
              "load_after": " ".join(f"{v:.2f}" for v in os.getloadavg()),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "tritonserver": version,
              "onnxruntime": onnxruntime.__version__, "clients": args.clients,
              "requests": f"{per_client} at batch 1, {max(5, per_client * 4 // top)} at batch {top}",
              "bundle": {"model": tri["model_name"], "depth": manifest["depth"], "precision": manifest["precision"],
                         "img_size": manifest["input"]["img_size"], "max_batch_size": tri["max_batch_size"],
                         "preferred": tri["preferred_batch_size"], "queue_delay_us": tri["max_queue_delay_microseconds"]},
              "runs": runs, "wall_s": round(time.time() - started, 1)}
    write_results(args.out, "serve_triton_quick" if args.quick else "serve_triton", report, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
