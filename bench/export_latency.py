"""Export and int8 figures on this machine: per depth, batch 1 and 8.

For each model and depth: torch eager vs ONNX Runtime fp32 vs int8 (dynamic and static QDQ, as
bim-export makes them), each also against the roofline (the graph's FLOPs per precision over this
machine's measured GEMM throughput, fp32 and int8); and the paths a user would take instead: timm's
``timm.utils.onnx.onnx_export`` with its defaults, and optimum's quantization preset for this CPU
applied to the whole graph. Quality of each int8 model: cosine and kNN top-1 agreement of the
embeddings with PyTorch fp32 on the built-in real images.

Models: ViT-S/16 (random weights, 224 px) and the embedded checkpoint when it is there.
ONNX Runtime timings go through bim_export.deploy.latency.measure (separate process, fixed threads, interleaved
rounds, the median across rounds); eager timings follow the same rule in this process.

    python bench/export_latency.py            # full run (<= 8 min on 2 cores), writes bench/results/
    python bench/export_latency.py --quick    # ViT-S depth 3 only, batch 1, fewer repeats (< 1 min)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
log = logging.getLogger("export_latency")


def eager_ms(backbone, x, threads: int, warmup: int, repeats: int, rounds: int) -> float:
    """Median of the round medians of backbone features + pooling, in ms."""
    import torch

    torch.set_num_threads(threads)
    xt = torch.from_numpy(x)
    with torch.inference_mode():
        for _ in range(warmup):
            backbone.forward_head(backbone.forward_features(xt), pre_logits=True)
        medians = []
        for _ in range(rounds):
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                backbone.forward_head(backbone.forward_features(xt), pre_logits=True)
                times.append((time.perf_counter() - t0) * 1000)
            medians.append(float(np.median(times)))
    return float(np.median(medians))


def roofline_ms(path: Path, batch: int, gemm_gflops: dict[str, float]) -> dict[str, float]:
    """Graph FLOPs and the time they take at the measured GEMM throughput of their precision."""
    from bim_export.deploy.latency.costmodel import graph_cost

    cost = graph_cost(path, batch)
    flops = {"fp32": 0.0, "int8": 0.0}
    for n in cost.nodes:
        flops["int8" if n.precision == "int8" else "fp32"] += n.flops
    ms = sum(f / (gemm_gflops[p] * 1e9) for p, f in flops.items()) * 1000
    return {"gflop": cost.flops / 1e9, "gflop_int8": flops["int8"] / 1e9, "roofline_ms": ms}


def timm_default_export(backbone, path: Path, size: int) -> None:
    """What timm's own helper does by default (TorchScript exporter, torch's default opset)."""
    from timm.utils.onnx import onnx_export

    onnx_export(backbone, str(path), input_size=(3, size, size), batch_size=2)


def optimum_preset_export(fp32: Path, out: Path, preset: str) -> str:
    """optimum's preset applied as its docs show: every supported op, dynamic, per-tensor defaults."""
    from optimum.onnxruntime import ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    config = getattr(AutoQuantizationConfig, preset)(is_static=False)
    with tempfile.TemporaryDirectory() as tmp:
        written = ORTQuantizer.from_pretrained(fp32.parent, file_name=fp32.name).quantize(config, tmp)
        next(Path(written).glob("*.onnx")).replace(out)
    return f"AutoQuantizationConfig.{preset}(is_static=False)"


def host_preset() -> str:
    from bim_export.runtime.machine import cpu_flags as host_flags

    flags = host_flags()
    if flags & {"avx512_vnni", "avx512vnni"}:
        return "avx512_vnni"
    if platform.machine() in ("aarch64", "arm64"):
        return "arm64"
    return "avx512" if "avx512f" in flags else "avx2"


def cpu_flags() -> list[str]:
    """The host's vector and matrix-unit flags (AVX*, AMX*, FMA, VNNI), sorted."""
    from bim_export.runtime.machine import cpu_flags as host_flags

    return sorted(f for f in host_flags() if f.startswith(("avx", "amx", "fma", "vnni")))


def model_sets(quick: bool):
    """(name, {depth: backbone}, img_size, mean, std) for each model benchmarked."""
    import torch
    import timm

    from bim_export.model.images import IMAGENET_MEAN, IMAGENET_STD

    torch.manual_seed(0)
    full = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0).eval()
    depths = [3] if quick else [3, 6, 9, 12]
    vits = {}
    for d in depths:
        m = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, depth=d).eval()
        m.load_state_dict({k: v for k, v in full.state_dict().items() if not k.startswith("blocks.")
                           or int(k.split(".")[1]) < d})
        vits[d] = m
    yield "vit_small_patch16_224 (random weights)", vits, 224, IMAGENET_MEAN, IMAGENET_STD
    if quick:
        return
    from bim_export.core.resources import default_checkpoint_dir

    ckpt_dir = default_checkpoint_dir()
    if (ckpt_dir / "config.json").is_file():
        from bim_export.model.backbone import build_backbone
        from bim_export.model.checkpoint import load_checkpoint

        ckpt = load_checkpoint(ckpt_dir)
        cfg = ckpt.config
        yield (f"embedded checkpoint ({cfg.get('arch')}, step {cfg.get('step')})",
               {d: build_backbone(ckpt, d) for d in ckpt.exits}, cfg["img_size"], cfg["mean"], cfg["std"])
    else:
        log.warning("no embedded checkpoint at %s: skipped", ckpt_dir)


def bench_model(name, backbones, size, mean, std, work: Path, args, gemm, preset) -> list[dict]:
    import torch

    from bim_export.deploy.export import export_onnx
    from bim_export.deploy.latency.measure import measure_many
    from bim_export.deploy.quantize import convert_precision
    from bim_export.model.images import load_image_array, sample_images
    from bim_export.runtime.parity import compare_outputs
    from bim_export.runtime.session import run_onnx

    x, labels = load_image_array(sample_images(), size, mean, std, limit=30 if args.quick else None)
    calib, test, test_labels = x[::2], x[1::2], labels[1::2]  # no image both calibrates and tests
    rows = []
    for depth, bb in sorted(backbones.items()):
        t0 = time.perf_counter()
        d = work / f"{abs(hash(name)) % 10**6}-d{depth}"
        d.mkdir(parents=True)
        files = {"fp32": export_onnx(bb, d / "fp32.onnx", opset=17, img_size=size, metadata={"depth": depth})}
        export_s = time.perf_counter() - t0
        files["int8 dynamic"] = d / "dyn.onnx"
        convert_precision(files["fp32"], files["int8 dynamic"], "int8", method="dynamic")
        files["int8 static"] = d / "static.onnx"
        convert_precision(files["fp32"], files["int8 static"], "int8", calib_x=calib, method="static")
        files["timm onnx_export"] = d / "timm.onnx"
        timm_default_export(bb, files["timm onnx_export"], size)
        paths = {}
        try:
            files[f"optimum {preset}"] = d / "optimum.onnx"
            paths[f"optimum {preset}"] = optimum_preset_export(files["fp32"], files[f"optimum {preset}"], preset)
        except ImportError:
            files.pop(f"optimum {preset}")
            log.warning("optimum not installed: its preset path is skipped")

        with torch.inference_mode():
            tokens = bb.forward_features(torch.from_numpy(test))
            ref = {"tokens": tokens.numpy(), "embedding": bb.forward_head(tokens, pre_logits=True).numpy()}
        import onnxruntime as ort

        quality = {}
        for label, f in files.items():
            sess = ort.InferenceSession(str(f), providers=["CPUExecutionProvider"])
            out = run_onnx(sess, test, 8)
            if "embedding" not in out:  # timm's graph: one unnamed output, the pooled features
                out = {"embedding": next(iter(out.values()))}
            r = compare_outputs({"embedding": ref["embedding"]}, {"embedding": out["embedding"]}, labels=test_labels)
            quality[label] = {"cosine": r.cosine, "cosine_min": r.cosine_min,
                              "knn_agreement": r.neighbour_agreement, "passed": r.passed}

        for batch in args.batches:
            xb = np.ascontiguousarray(np.resize(test, (batch, *test.shape[1:])))
            eager = eager_ms(bb, xb, args.threads, 2, args.repeats, args.rounds)
            jobs = list(files.items())
            timed = measure_many([(f, batch) for _, f in jobs], threads=args.threads, warmup=3,
                                 repeats=args.repeats, rounds=args.rounds)
            fp32_ms = next(t.p50 for (label, _), t in zip(jobs, timed) if label == "fp32")
            rows.append({"model": name, "depth": depth, "batch": batch, "path": "torch eager", "ms": eager,
                         "vs_ort_fp32": eager / fp32_ms})
            for (label, f), t in zip(jobs, timed):
                roof = roofline_ms(f, batch, gemm)
                rows.append({"model": name, "depth": depth, "batch": batch, "path": label, "ms": t.p50,
                             "spread": t.expected_error, "vs_ort_fp32": t.p50 / fp32_ms,
                             "vs_eager": t.p50 / eager, **roof, "x_roofline": t.p50 / roof["roofline_ms"],
                             "size_mb": f.stat().st_size / 1e6, "how": paths.get(label, ""), **quality[label]})
        log.info("%s depth %d done in %.0f s (export %.1f s)", name, depth, time.perf_counter() - t0, export_s)
        print(f"  {name} depth {depth}: {time.perf_counter() - t0:.0f} s (export {export_s:.0f} s)", flush=True)
    return rows


def render(result: dict) -> str:
    m = result["machine"]
    lines = [
        "# Export latency on this machine", "",
        f"Machine: {m['cpu']}, {m['logical_cores']} logical cores, {result['threads']} threads; CPU flags: "
        f"{', '.join(result['cpu_flags'])}. ONNX Runtime {result['versions']['onnxruntime']}, torch "
        f"{result['versions']['torch']}. Measured GEMM throughput (ONNX Runtime, 1024^3): fp32 "
        f"{result['gemm_gflops']['fp32']:.0f} GFLOP/s, int8 {result['gemm_gflops']['int8']:.0f} GFLOP/s. "
        f"Mode: {'quick' if result['quick'] else 'full'}; total {result['seconds']:.0f} s; load average at the end "
        f"{', '.join(f'{v:.1f}' for v in result['load_average_1_5_15'] or [])} (a shared machine busier than its "
        f"cores slows every figure, the roofline's GEMM throughput too).", "",
        "`x roofline` = measured / (graph FLOPs at the GEMM throughput of their precision): 1.0 is the roofline. "
        "Quality: embeddings vs PyTorch fp32 on the built-in real images (cosine mean / worst image, kNN top-1 "
        "agreement).", "",
        "| model | depth | batch | path | ms (p50) | vs ORT fp32 | x roofline | GFLOP | cosine (min) | kNN agree | MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        q = f"{r['cosine']:.4f} ({r['cosine_min']:.4f})" if "cosine" in r else ""
        agree = f"{r['knn_agreement']:.1%}" if r.get("knn_agreement") is not None else ""
        lines.append(f"| {r['model']} | {r['depth']} | {r['batch']} | {r['path']} | {r['ms']:.2f} | "
                     f"{r['vs_ort_fp32']:.2f} | {r.get('x_roofline', float('nan')):.2f} | {r.get('gflop', float('nan')):.2f} | "
                     f"{q} | {agree} | {r.get('size_mb', float('nan')):.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="ViT-S depth 3, batch 1, few repeats (< 1 min)")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    args.batches = [1] if args.quick else [1, 8]
    args.repeats, args.rounds = (5, 2) if args.quick else (6, 3)
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")

    import onnxruntime
    import torch

    from bim_export.deploy.latency.measure import measure_host_hardware
    from bim_export.runtime.machine import machine_description

    t0 = time.perf_counter()
    torch.set_num_threads(args.threads)
    gemm = measure_host_hardware(args.threads)["peak_gflops"]
    print(f"  GEMM throughput {gemm} ({time.perf_counter() - t0:.0f} s)", flush=True)
    preset = host_preset()
    rows = []
    with tempfile.TemporaryDirectory(prefix="export-latency-") as work:
        for name, backbones, size, mean, std in model_sets(args.quick):
            rows += bench_model(name, backbones, size, mean, std, Path(work), args, gemm, preset)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    result = {"machine": machine_description(), "cpu_flags": cpu_flags(), "threads": args.threads,
              "load_average_1_5_15": load,
              "quick": args.quick, "optimum_preset": preset, "gemm_gflops": gemm,
              "versions": {"onnxruntime": onnxruntime.__version__, "torch": torch.__version__},
              "seconds": time.perf_counter() - t0, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "export_latency_quick" if args.quick else "export_latency"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    text = render(result)
    (args.out / f"{stem}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
