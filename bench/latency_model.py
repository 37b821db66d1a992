"""How well does the cost model predict latency? Leave-one-out on the host, calibrate-and-predict on a GPU.

Host (``--device cpu``, the default): timm ViT-Ti and ViT-S (patch 16, 224 px, random weights) at depths
3/6/9/12, batch 1 and 8, exported to ONNX and timed with ONNX Runtime by the latency module's protocol
(separate process, fixed threads, warm-up, every model interleaved in each of several rounds, the lowest
round median). For each depth, the cost model's factors are fitted on the other three depths (both
widths, both batches) and the held-out depth is predicted. Targets: median |pred - measured| / measured
<= 10 %, worst <= 25 %.

GPU (``--device cuda``, an H100/H200): ONNX Runtime's GPU build does not run there, so the models are
timed with torch eager (CUDA events through synchronisation, same rounds protocol, peak memory from
``torch.cuda.max_memory_allocated``); the cost is the ONNX graph's, the hardware figures are the
server-gpu profile's. Calibrated on two depths (3, 12) of ViT-S at batch 1 and 32, the other depths and
ViT-Ti are predicted. Target: median error <= 20 %. ``--device torch-cpu`` runs that protocol with
torch on the CPU (a dry run of the GPU path at tiny size).

    python bench/latency_model.py [--quick] [--device cpu|cuda|torch-cpu]

Writes bench/results/latency_model[_quick|_gpu].json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bim_export.deploy.latency.calibration import export_reference_vit
from bim_export.deploy.latency.costmodel import graph_cost
from bim_export.deploy.latency.roofline import (DEFAULT_FACTORS, Hardware, default_factors, fit_factors, roofline_features,
                                                roofline_seconds)
from bim_export.deploy.latency.measure import measure_many
from bim_export.machine import machine_description

WIDTHS = {"ViT-Ti": (192, 3), "ViT-S": (384, 6)}
DEPTHS = (3, 6, 9, 12)
RESULTS = Path(__file__).resolve().parent / "results"


def spec(width: str, depth: int, img: int) -> dict:
    dim, heads = WIDTHS[width]
    return {"embed_dim": dim, "num_heads": heads, "depth": depth, "img_size": img, "patch_size": 16}


def errors_table(rows: list[dict]) -> dict:
    errs = [r["error"] for r in rows]
    return {"median_error": statistics.median(errs), "worst_error": max(errs), "n": len(errs)}


# ---------------------------------------------------------------------------------------- host


def run_host(args) -> dict:
    img = 112 if args.quick else 224
    warmup, repeats, rounds = (2, 3, 3) if args.quick else (3, 8, 5)
    t0 = time.time()
    clock = args.clock.replace("-", "_")
    threads = 1 if clock == "thread_cpu" else args.threads
    hw = Hardware.measured(threads, clock)
    print(f"host: fp32 GEMM {hw.peak_gflops['fp32']:.1f} GFLOP/s, int8 {hw.peak_gflops['int8']:.1f} GOP/s, "
          f"bandwidth {hw.mem_bandwidth_gbs:.1f} GB/s", flush=True)
    widths = ("ViT-Ti",) if args.quick else tuple(WIDTHS)
    with tempfile.TemporaryDirectory(prefix="latency-model-") as tmp:
        models = {}
        for w in widths:
            for d in DEPTHS:
                models[(w, d)] = export_reference_vit(spec(w, d, img), Path(tmp) / f"{w}-d{d}.onnx")
        keys = [(w, d, b) for (w, d) in models for b in (1, 8)]
        print(f"exported {len(models)} graphs ({time.time() - t0:.0f} s); timing {len(keys)} model x batch ...", flush=True)
        measured = measure_many([(models[(w, d)], b) for w, d, b in keys], threads=threads,
                                warmup=warmup, repeats=repeats, rounds=rounds, clock=clock)
        feats = {k: roofline_features(graph_cost(models[k[:2]], k[2]), hw) for k in keys}
        gflop = {k: graph_cost(models[k[:2]], k[2]).flops / 1e9 for k in keys}
    ms = {k: r.p50 for k, r in zip(keys, measured)}
    prior = DEFAULT_FACTORS["cpu"]
    rows = []
    for held in DEPTHS:
        train = [(feats[k], ms[k] / 1e3) for k in keys if k[1] != held]
        fac = fit_factors(train, prior, label=f"host, depths != {held}")
        for k in keys:
            if k[1] == held:
                pred = roofline_seconds(feats[k], fac) * 1e3
                rows.append({"width": k[0], "depth": k[1], "batch": k[2], "gflop": gflop[k], "measured_ms": ms[k],
                             "predicted_ms": pred, "error": abs(pred - ms[k]) / ms[k],
                             "roofline_fraction": gflop[k] / hw.peak_gflops["fp32"] / (ms[k] / 1e3),
                             "spread": measured[keys.index(k)].expected_error})
    all_fit = fit_factors([(feats[k], ms[k] / 1e3) for k in keys], prior, label="host, all depths")
    return {
        "mode": "host", "quick": args.quick, "img_size": img, "clock": clock, "protocol": measured[0].settings | {"round_medians_ms": None},
        "hardware_measured": hw.signature(), "rows": rows, "leave_one_out": errors_table(rows),
        "targets": {"median_error": 0.10, "worst_error": 0.25}, "factors_all_depths": all_fit.to_dict(),
        "wall_s": time.time() - t0,
        "machine": measured[0].machine,
    }


# ----------------------------------------------------------------------------------------- gpu


def time_torch(models: dict, batches: tuple[int, ...], img: int, device: str, warmup: int, repeats: int,
               rounds: int, dtype=None) -> dict:
    """Torch eager p50 (lowest round median, ms) and peak memory per (model key, batch), interleaved."""
    import torch

    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    inputs = {b: torch.randn(b, 3, img, img, device=device, dtype=dtype) for b in batches}
    keys = [(k, b) for k in models for b in batches]
    memory = {}
    with torch.no_grad():
        for k, b in keys:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            for _ in range(warmup):
                models[k](inputs[b])
            sync()
            memory[(k, b)] = torch.cuda.max_memory_allocated() / 1e6 if cuda else None
        medians = {kb: [] for kb in keys}
        for r in range(rounds):
            for k, b in keys[r % len(keys):] + keys[: r % len(keys)]:
                ts = []
                for _ in range(repeats):
                    sync()
                    t = time.perf_counter()
                    models[k](inputs[b])
                    sync()
                    ts.append(time.perf_counter() - t)
                medians[(k, b)].append(statistics.median(ts))
    return {kb: {"ms": min(m) * 1e3, "spread": (max(m) - min(m)) / min(m), "peak_memory_mb": memory[kb]}
            for kb, m in medians.items()}


def run_gpu(args) -> dict:
    import timm
    import torch

    from bim_export.deploy.profiles import load_profile

    device = "cuda" if args.device == "cuda" else "cpu"
    if device == "cpu":
        torch.set_num_threads(1)  # OpenMP threads on a shared 2-core machine wait out whole time slices
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda but torch sees no CUDA device")
    tiny = args.device == "torch-cpu" or args.quick
    img, batches = (64, (1, 2)) if args.device == "torch-cpu" else (224, (1, 32))
    warmup, repeats, rounds = (2, 3, 3) if tiny else (10, 20, 5)
    # the CPU dry run predicts against this machine's measured figures, the GPU run against the profile's
    profile = load_profile(args.profile or ("server-gpu" if device == "cuda" else "host"))
    hw = Hardware.from_profile(profile)
    card = torch.cuda.get_device_name(0) if device == "cuda" else "cpu (torch eager dry run)"
    t0 = time.time()
    models, costs = {}, {}
    with tempfile.TemporaryDirectory(prefix="latency-model-gpu-") as tmp:
        for w in WIDTHS:
            for d in DEPTHS:
                s = spec(w, d, img)
                path = export_reference_vit(s, Path(tmp) / f"{w}-d{d}.onnx")
                for b in batches:
                    costs[((w, d), b)] = roofline_features(graph_cost(path, b), hw)
                models[(w, d)] = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0,
                                                   **s).eval().to(device)
    timed = time_torch(models, batches, img, device, warmup, repeats, rounds)
    calib_keys = [(("ViT-S", d), b) for d in (3, 12) for b in batches]
    prior = default_factors(profile.device_class, hw)
    fac = fit_factors([(costs[k], timed[k]["ms"] / 1e3) for k in calib_keys], prior, label=f"torch eager on {card}")
    rows = []
    for k in costs:
        pred = roofline_seconds(costs[k], fac) * 1e3
        uncal = roofline_seconds(costs[k], prior) * 1e3
        m = timed[k]["ms"]
        rows.append({"width": k[0][0], "depth": k[0][1], "batch": k[1], "measured_ms": m, "predicted_ms": pred,
                     "error": abs(pred - m) / m, "uncalibrated_ms": uncal, "calibration_point": k in calib_keys,
                     "spread": timed[k]["spread"], "peak_memory_mb": timed[k]["peak_memory_mb"]})
    held = [r for r in rows if not r["calibration_point"]]
    return {"mode": args.device, "quick": args.quick, "card": card, "img_size": img, "batches": list(batches),
            "profile": profile.name, "hardware_profile": hw.signature(), "timing": "torch eager (ONNX Runtime GPU not available)",
            "protocol": {"warmup": warmup, "repeats": repeats, "rounds": rounds, "statistic": "lowest round median"},
            "rows": rows, "held_out": errors_table(held), "targets": {"median_error": 0.20},
            "factors": fac.to_dict(), "uncalibrated": errors_table([{"error": abs(r["uncalibrated_ms"] - r["measured_ms"])
                                                                    / r["measured_ms"]} for r in rows]),
            "wall_s": time.time() - t0, "machine": machine_description() | {"torch": torch.__version__}}


# --------------------------------------------------------------------------------------- report


def markdown(res: dict) -> str:
    summary = res.get("leave_one_out") or res.get("held_out")
    load = res["load_average"]
    lines = [f"# Latency model: {res['mode']}{' (quick)' if res['quick'] else ''}", "",
             f"Machine: {json.dumps(res['machine'])}; load average {load['before'][0]:.1f} before, "
             f"{load['after'][0]:.1f} after the run.", ""]
    if res["mode"] == "host":
        hw = res["hardware_measured"]
        lines += [f"Measured: fp32 GEMM {hw['peak_gflops']['fp32']:.1f} GFLOP/s, int8 {hw['peak_gflops']['int8']:.1f} "
                  f"GOP/s, bandwidth {hw['mem_bandwidth_gbs']:.1f} GB/s. Leave-one-depth-out over {summary['n']} "
                  f"predictions at {res['img_size']} px.", ""]
    else:
        lines += [f"Card: {res['card']}; timing: {res['timing']}; profile figures: {res['profile']}. "
                  f"Calibrated on ViT-S depths 3 and 12, batches {res['batches']}.", ""]
    if res.get("clock") == "thread_cpu":
        lines += ["Clock: CPU time of the one timing thread (cross-check; not the wall-clock protocol).", ""]
    lines += ["Round spread: (slowest - fastest round median) / fastest; large values mean a busy machine.", "",
              f"**median error {summary['median_error']:.1%}, worst {summary['worst_error']:.1%}** "
              f"(targets: {', '.join(f'{k} <= {v:.0%}' for k, v in res['targets'].items())})", "",
              "| width | depth | batch | measured ms | predicted ms | error | round spread | note |",
              "|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        note = "calibration point" if r.get("calibration_point") else (
            f"roofline fraction {r['roofline_fraction']:.2f}" if "roofline_fraction" in r else "")
        lines.append(f"| {r['width']} | {r['depth']} | {r['batch']} | {r['measured_ms']:.3f} | {r['predicted_ms']:.3f} "
                     f"| {r['error']:.1%} | {r['spread']:.0%} | {note} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="ViT-Ti only, 112 px, fewer repeats (< 1 min)")
    ap.add_argument("--device", choices=("cpu", "cuda", "torch-cpu"), default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: all cores)")
    ap.add_argument("--clock", choices=("wall", "thread-cpu"), default="wall",
                    help="thread-cpu: one thread, timed by its CPU time (a cross-check on a busy shared machine; "
                         "the protocol's figures are wall-clock)")
    ap.add_argument("--profile", default=None,
                    help="profile whose hardware figures are used (default: server-gpu; host for torch-cpu)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    load_before = os.getloadavg()
    res = run_host(args) if args.device == "cpu" else run_gpu(args)
    res["load_average"] = {"before": load_before, "after": os.getloadavg(),
                           "note": "1/5/15-min load averages; above the core count the timings include contention"}
    stem = ("latency_model" + ("_gpu" if args.device != "cpu" else "") + ("_cpuclock" if args.clock != "wall" else "")
            + ("_quick" if args.quick or args.device == "torch-cpu" else ""))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(res, indent=2) + "\n")
    md = markdown(res)
    (args.out / f"{stem}.md").write_text(md)
    print(md)
    print(f"wrote {args.out / stem}.json/.md in {res['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
