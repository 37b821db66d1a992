"""Training memory, step time and model FLOPs utilization of BIM against end-to-end MAE.

Two suites of variants, every one in a fresh process so peak figures do not leak from one to the next:

* ``decoders`` (12-block models, exits 3/6/9/12): standard MAE (8x512 decoder, the baseline every
  ratio refers to), the same with activation checkpointing, MAE with BIM's light decoder, BIM with
  1x128 (the default here), 1x256, 1x512 and 8x512 decoders per stage, and separate end-to-end MAE
  runs of depth 3, 6, 9 (and 12) with each decoder: the cost of getting every exit without BIM.
* ``scale`` (ViT-B/16 with exits 3/6/9/12, ViT-L/16 with exits 6/12/18/24): standard MAE, MAE with
  activation checkpointing, BIM (1x128 decoders) with ``update: step`` (one optimizer step after the
  whole backward) and with ``update: stage`` (each stage stepped and its gradients freed as soon as
  its backward ends), ``update: stage`` with checkpointing inside the stages, 8 stages on ViT-L, and
  on CUDA the same with ``compile``.

Every variant runs the trainer's own code: ``BimModel.forward_backward`` with the per-stage AdamW
(fused on CUDA, foreach on CPU) and the stepper of ``bim_export.train.update``, on random images.
Peak memory is ``torch.cuda.max_memory_allocated`` on CUDA (after warm-up) and the process's peak
resident set (``VmHWM``) on CPU, given above the process's footprint before the model was built.
Step time is the median (CUDA) or lowest (CPU) of the timed steps after warm-up (forward, backward,
AdamW). Model FLOPs per step are counted by torch's ``FlopCounterMode`` on a meta-device copy
(forward and backward, no recompute: checkpointing does not count), and MFU = FLOPs / step time /
the machine's matmul rate (bf16 GEMM on CUDA, fp32 GEMM on CPU), measured in the variant's process
right after its steps: on a shared host the rate moves with the load, and so does the step time.

Quality (every exit against end-to-end MAE, with error bars) is bench/quality.py's; on CUDA this bench
also runs its short BIM training on the built-in photos (every stage's loss, first and last steps).

Usage::

    python bench/train_memory.py --quick                      # < 1 min, checks the machinery
    python bench/train_memory.py                              # CPU: ViT-Tiny at 64 px, decoders
    python bench/train_memory.py --arch vit_large_patch16_224 --suite scale  # CPU, 224 px
    python bench/train_memory.py --device cuda                # ViT-B/16, 224 px, batch 256, bf16
    python bench/gpu_train.py                                 # every GPU figure in one go (see there)

Writes bench/results/train_memory[_<model>_<device>].json and .md (figures + machine description).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from results_io import write_results
from train_memory_report import markdown, summarize

RESULTS = Path(__file__).resolve().parent / "results"

STANDARD = (8, 512, 16)  # MAE's decoder: depth, width, heads
LIGHT = (1, 128, 4)  # BIM's decoder in these benchmarks
DECODERS = {"1x128": (1, 128, 4), "1x256": (1, 256, 8), "1x512": (1, 512, 16), "8x512": STANDARD}
# name -> (short name, exits of 4 stages, exits of 8 stages or None, model_args)
ARCHS = {
    "vit_tiny_patch16_224": ("vitt", [3, 6, 9, 12], None, {"img_size": 64, "patch_size": 8}),
    "vit_base_patch16_224": ("vitb", [3, 6, 9, 12], None, {}),
    "vit_large_patch16_224": ("vitl", [6, 12, 18, 24], list(range(3, 25, 3)), {}),
}
QUICK_ARGS = {"img_size": 32, "patch_size": 8, "embed_dim": 64, "num_heads": 2}  # depth and exits kept


def size(device: str, arch: str, quick: bool) -> dict:
    """Batch, precision and step counts of a run. cuda: the reference setting (batch 256, bf16);
    cpu: small enough for a few minutes on 2 cores; quick: a check of the machinery, not figures."""
    model_args = ARCHS[arch][3]
    if quick:
        return dict(arch=arch, model_args=QUICK_ARGS, batch=8, amp=None, warmup=1, steps=2, decoder_div=4)
    if device == "cuda":
        return dict(arch=arch, model_args=model_args, batch=256, amp="bf16", warmup=5, steps=20)
    batch = {"vit_tiny_patch16_224": 32, "vit_base_patch16_224": 16, "vit_large_patch16_224": 8}[arch]
    few = arch != "vit_tiny_patch16_224"  # a 224-px step takes seconds on 2 cores
    return dict(arch=arch, model_args=model_args, batch=batch, amp=None, warmup=1 if few else 2, steps=3 if few else 5)


# ------------------------------------------------------------------------------ variants


def _v(name, label, mode="bim", decoder=LIGHT, ckpt=False, update="step", compile=False, exits=None, depth=None):
    return dict(name=name, label=label, mode=mode, decoder=decoder, ckpt=ckpt, update=update, compile=compile,
                exits=exits, depth=depth)


def variants(arch: str, suites: list[str], compile: bool) -> list[dict]:
    """The measured configurations (``exits`` None: the arch's 4 stages, or its last exit for MAE)."""
    _, exits4, exits8, _ = ARCHS[arch]
    v = [_v("mae_8x512", "MAE end-to-end, decoder 8x512 (standard)", "e2e", STANDARD),
         _v("mae_8x512_ckpt", "same, activation checkpointing on every block", "e2e", STANDARD, ckpt=True)]
    if "decoders" in suites:
        v.append(_v("mae_1x128", "MAE end-to-end, BIM's light decoder 1x128", "e2e", LIGHT))
        for key in ("8x512", "1x512", "1x256", "1x128"):
            v.append(_v(f"bim_{key}", f"BIM 4 stages, decoder {key} per stage", decoder=DECODERS[key]))
        for dec_name, dec in (("8x512", STANDARD), ("1x128", LIGHT)):
            for d in exits4[:-1]:  # the full depth is mae_8x512 / mae_1x128
                v.append(_v(f"sep_{dec_name}_d{d}", f"separate MAE run, depth {d}, decoder {dec_name}", "e2e",
                            dec, exits=[d], depth=d))
    if "scale" in suites:
        if "decoders" not in suites:
            v.append(_v("bim_1x128", "BIM 4 stages, 1x128, update: step"))
        v += [_v("bim_stage", "BIM 4 stages, 1x128, update: stage", update="stage"),
              _v("bim_stage_ckpt", "BIM 4 stages, update: stage + checkpointing", update="stage", ckpt=True)]
        if exits8:
            v += [_v("bim8_stage", "BIM 8 stages, update: stage", update="stage", exits=exits8),
                  _v("bim8_stage_ckpt", "BIM 8 stages, update: stage + checkpointing", update="stage", ckpt=True,
                     exits=exits8)]
        if compile:  # last: a compile takes a minute or two
            v += [_v("bim_stage_compile", "BIM 4 stages, update: stage + compile", update="stage", compile=True),
                  _v("bim_stage_ckpt_compile", "BIM 4 stages, update: stage + checkpointing + compile",
                     update="stage", ckpt=True, compile=True)]
    return v


def _resolved(spec: dict) -> tuple[list[int], int]:
    exits4 = ARCHS[spec["arch"]][1]
    exits = spec["exits"] or (exits4 if spec["mode"] == "bim" else exits4[-1:])
    return exits, spec["depth"] or exits4[-1]


def _build(spec: dict):
    from bim_export.model.architecture import BimConfig
    from bim_export.train.model import BimModel

    exits, depth = _resolved(spec)
    div = spec.get("decoder_div", 1)
    d_depth, d_width, d_heads = spec["decoder"][0], spec["decoder"][1] // div, max(1, spec["decoder"][2] // div)
    return BimModel(BimConfig.from_settings(
        model=spec["arch"], model_args={**spec["model_args"], "depth": depth}, exits=exits, mode=spec["mode"],
        decoder_depth=d_depth, decoder_width=d_width, decoder_heads=d_heads, mask_ratio=0.75))


# ------------------------------------------------------------------------------ workers


def _rss_mib(field: str) -> float:
    """VmRSS / VmHWM of this process in MiB (Linux), else the peak from getrusage."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def run_worker(spec: dict) -> dict:
    """Measures one variant in this process with the trainer's model, optimizer and stepper."""
    import torch

    from bim_export.train.config import TrainConfig
    from bim_export.train.distributed import DistInfo
    from bim_export.train.optim import StageOptimizer
    from bim_export.train.update import Stepper, resolve_update

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    cuda = device.type == "cuda"
    base_mib = _rss_mib("VmRSS")
    torch.manual_seed(0)
    with device:  # initialized where it trains: a ViT-L built on the CPU first takes seconds
        model = _build(spec).train()
    model.set_grad_checkpointing(spec["ckpt"])
    cfg = TrainConfig(out="unused", mode=spec["mode"], update=spec["update"], lr=1e-4, weight_decay=0.05,
                      betas=(0.9, 0.95))
    update, _ = resolve_update(cfg)
    stepper = Stepper(StageOptimizer(model, cfg), DistInfo(), update)
    if spec["compile"]:  # compile_options: e.g. a lighter backend for a check of the machinery on a CPU
        model.compile_blocks(**spec.get("compile_options", {}))
    imgs = torch.randn(spec["batch"], 3, *model.encoder.patch_embed.img_size, device=device)
    amp = torch.bfloat16 if spec["amp"] == "bf16" else None
    times, losses = [], {}
    for i in range(spec["warmup"] + spec["steps"]):
        if cuda and i == spec["warmup"]:  # steady state: compile and autotuning stay out of the peak
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        noise = model.mask_noise(spec["batch"], torch.Generator().manual_seed(i))
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        stepper.begin(1e-4)
        losses = model.forward_backward(imgs, noise, 1.0, amp, stepper.stage_done).floats()
        stepper.finish()
        if cuda:
            torch.cuda.synchronize(device)
        if i >= spec["warmup"]:
            times.append(time.perf_counter() - t0)
    # CPU: the lowest step time, since the host may be shared; CUDA: the median
    out = {"name": spec["name"], "update": update,
           "ms_per_step": 1000 * (statistics.median(times) if cuda else min(times)),
           "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
           "losses": {str(k): v for k, v in losses.items()}}
    if cuda:
        out["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        out["peak_rss_mib"] = _rss_mib("VmHWM")
        out["peak_above_base_mib"] = out["peak_rss_mib"] - base_mib
    del model, stepper, imgs
    # the matmul rate right after the steps, in the same process: on a shared host it moves with the load
    out["matmul_tflops"] = gemm_rate(spec["device"])["tflops"]
    return out


def gemm_rate(device: str) -> dict:
    """The matmul rate here: the best of several timed square GEMMs (bf16 on CUDA, fp32 on CPU)."""
    import torch

    cuda = device == "cuda"
    n, dtype, reps = (8192, torch.bfloat16, 20) if cuda else (1024, torch.float32, 10)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    best = float("inf")
    for _ in range(3):
        torch.mm(a, b)
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b)
        if cuda:
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / reps)
    return {"gemm": f"{n}x{n}x{n} {str(dtype).removeprefix('torch.')}", "tflops": 2 * n**3 / best / 1e12}


def _subprocess(args: list[str], what: str, timeout: float | None = None) -> dict:
    try:
        proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{what} failed:\ntimed out after {timeout:.0f} s") from None
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(spec: dict, timeout: float | None = None) -> dict:
    """Runs :func:`run_worker` for ``spec`` in a fresh Python process and returns its figures."""
    return _subprocess(["--worker", json.dumps(spec)], f"variant {spec['name']}", timeout)


def measure_variant(spec: dict, timeout: float | None = None) -> dict:
    """One variant's figures (:func:`measure`, then :func:`model_flops`), or ``{"error": ...}`` when its
    process failed or timed out (a compile, say), so that one failure does not lose the other variants;
    prints one line."""
    try:
        r = {**measure(spec, timeout), **model_flops(spec)}
    except RuntimeError as e:
        r = {"name": spec["name"], "error": "failed: " + str(e).splitlines()[-1][:200]}
    peak = (f"{r['peak_gib']:.2f} GiB" if "peak_gib" in r else f"{r['peak_above_base_mib']:.0f} MiB"
            if "peak_above_base_mib" in r else r["error"])
    print(f"{spec['name']:<24} {peak:>12} {r.get('ms_per_step', float('nan')):9.1f} ms/step", flush=True)
    return r


_FLOPS: dict[str, dict] = {}


def model_flops(spec: dict) -> dict:
    """FLOPs of one training step (forward + backward, no recompute) and parameters per stage,
    counted on a meta-device copy of the variant's model: nothing is computed or allocated."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    # checkpointing, update and compile change how the step runs, not the model's FLOPs
    key = json.dumps([spec[k] for k in ("arch", "model_args", "exits", "depth", "mode", "decoder", "batch")])
    if key in _FLOPS:
        return _FLOPS[key]
    with torch.device("meta"):
        model = _build(spec)
        imgs = torch.empty(spec["batch"], 3, *model.encoder.patch_embed.img_size)
        noise = torch.rand(spec["batch"], model.num_patches)
    with FlopCounterMode(display=False) as counter:
        model.forward_backward(imgs, noise)
    stage_params = [sum(p.numel() for _, p in model.stage_parameters(i)) for i in range(model.num_stages)]
    _FLOPS[key] = {"tflop_per_step": counter.get_total_flops() / 1e12,
                   "stage_params_m": [n / 1e6 for n in stage_params]}
    return _FLOPS[key]


# ------------------------------------------------------------------------------ report


def machine(device: str, threads: int | None) -> dict:
    import timm
    import torch

    from bim_export.runtime.machine import cpu_flags, cpu_model

    flags = cpu_flags()
    simd = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16") if f in flags]
    info = {"cpu": cpu_model(), "cpu_flags": simd, "cores": os.cpu_count(),
            "threads": threads or torch.get_num_threads(), "torch": torch.__version__, "timm": timm.__version__,
            "python": platform.python_version(), "os": platform.platform(), "date": time.strftime("%Y-%m-%d %H:%M")}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def stem(mode: str, arch: str, device: str) -> str:
    """Result file name: train_memory.* for the CPU ViT-Tiny study (the README's), else by model and device."""
    if mode == "cpu" and arch == "vit_tiny_patch16_224":
        return "train_memory"
    return f"train_memory_{ARCHS[arch][0]}_{'quick' if mode == 'quick' else device}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--arch", choices=sorted(ARCHS), default=None,
                    help="default: vit_tiny_patch16_224 at 64 px on CPU, vit_base_patch16_224 on CUDA")
    ap.add_argument("--suite", choices=("decoders", "scale", "all"), default=None,
                    help="default: all for 12-block models, scale for ViT-L")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="add the compile variants (default: on CUDA)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per variant (default by device)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default by device)")
    ap.add_argument("--budget-s", type=float, default=None, help="start no variant after this many seconds")
    ap.add_argument("--variant-timeout-s", type=float, default=None, help="give up on a variant after this long")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, a check of the machinery (< 1 min)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--real-images", action=argparse.BooleanOptionalAction, default=None,
                    help="a short training on real photos (default: on CUDA outside --quick)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(json.loads(args.worker))))
        return 0
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            ap.error("--device cuda: no CUDA device available")
    arch = args.arch or ("vit_base_patch16_224" if args.device == "cuda" else "vit_tiny_patch16_224")
    suite = args.suite or ("scale" if ARCHS[arch][2] else "all")
    suites = ["decoders", "scale"] if suite == "all" else [suite]
    mode = "quick" if args.quick else args.device
    size_ = size(args.device, arch, args.quick)
    size_.update({k: getattr(args, k) for k in ("steps", "warmup") if getattr(args, k)})
    compile_ = args.compile if args.compile is not None else args.device == "cuda"
    t_start = time.perf_counter()
    results, labels = {}, {}
    for v in variants(arch, suites, compile_):
        spec = {**v, **size_, "device": args.device, "threads": args.threads}
        labels[v["name"]] = v["label"]
        if args.budget_s is not None and time.perf_counter() - t_start > args.budget_s:
            results[v["name"]] = {"name": v["name"], "error": "skipped (time budget)"}
            print(f"{v['name']:<24} {results[v['name']]['error']}", flush=True)
        else:
            results[v["name"]] = measure_variant(spec, args.variant_timeout_s)
    report = {"device": args.device, "mode": mode, "size": size_, "suites": suites,
              "machine": machine(args.device, args.threads), "labels": labels, "variants": results,
              "summary": summarize(results, args.device)}
    if args.real_images if args.real_images is not None else (args.device == "cuda" and not args.quick):
        from quality_runs import real_image_losses

        report["real_images"] = real_image_losses(args.device, size_, ARCHS[arch][1], steps=10 if args.quick else 100)
    write_results(args.out, stem(mode, arch, args.device), report, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
