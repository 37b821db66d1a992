"""Stage-parallel BIM: throughput and per-rank memory of 2 stage ranks against one process, and a
projection for 4 GPUs with the bytes each step sends.

* throughput: the trainer (``train()``) on in-memory images, one torch thread per process: one
  process against ``stage_parallel: 2`` over 2 gloo ranks (2 of the 4 stages each). img/s from the
  difference of a long and a short run (``TrainResult.seconds`` on rank 0, which ends after the last
  rank's last step), so neither warm-up nor the pipeline's fill counts.
* memory: each process's peak resident set (``ru_maxrss``), and the same above the process's
  resident set after its imports (the interpreter, torch and timm: the same in every process).
* projection: each stage's step time (its forward and backward, scaled from the small batch measured
  here to batch 256, linear in the batch; the AdamW step of its parameters, as measured); on 4
  GPUs, one stage each, a step takes the slowest stage once the pipeline is full, while the tokens
  of the other stages are in flight. The H100 step times are the recorded whole-model times of
  ``results/train_memory_cuda.json`` (ViT-B/16, batch 256, bf16, on an H100: measured) split by the per-stage
  shares measured here; ViT-L/16 has no H100 record, so its H100 time is the ViT-B record times
  the ViT-L / ViT-B ratio measured here (a projection). Bytes per step are arithmetic.
  With ``--device cuda`` the per-stage times are measured on the GPU itself.

Usage::

    flock /tmp/bim-bench.lock python bench/stage_parallel.py            # all (about 6 min on 2 cores)
    python bench/stage_parallel.py --quick                              # tiny sizes, a check of the script
    python bench/stage_parallel.py --device cuda --skip-throughput      # per-stage times on the GPU

Writes bench/results/stage_parallel{,_quick,_cuda}.json and .md with the machine and the load.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
H100 = RESULTS / "train_memory_cuda.json"  # bench/train_memory.py --device cuda, run on an H100

# a small ViT at 4 stages: ViT-S/16 at 128 px (64 patches), the default BIM decoder (1 x 256)
SMALL = dict(model="vit_small_patch16_224", model_args={"img_size": 128}, exits=[3, 6, 9, 12])
SIZES = {
    # memory where the model and its optimizer state dominate, as in the runs stage-parallel is for:
    # ViT-B/16 at 64 px (16 patches), a few steps (not timed)
    "full": dict(small=SMALL, batch=8, short=6, long=30, images=16, memory_steps=3,
                 memory_model=dict(model="vit_base_patch16_224", model_args={"img_size": 64}, exits=[3, 6, 9, 12]),
                 project=[("vit_base_patch16_224", 8), ("vit_large_patch16_224", 4)], repeats=3),
    "quick": dict(small=dict(model="vit_tiny_patch16_224", exits=[1, 2, 3, 4],
                             model_args={"img_size": 32, "patch_size": 8, "depth": 4, "embed_dim": 32,
                                         "num_heads": 2}),
                  batch=8, short=2, long=5, images=16, memory_steps=2,
                  memory_model=dict(model="vit_tiny_patch16_224", model_args={"img_size": 64}, exits=[3, 6, 9, 12]),
                  project=[("vit_tiny_patch16_224", 2)], repeats=1),
}
BATCH = 256  # the batch of the projection


# ------------------------------------------------------------------------------ throughput and memory


def _images(n: int, size: int):
    import torch

    return torch.utils.data.TensorDataset(torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0)))


def _settings(size: dict, out: str, steps: int, stage_parallel: int) -> dict:
    return dict(out=out, **size["small"], decoder_width=256, decoder_heads=8, steps=steps,
                batch_size=size["batch"], lr=1e-4, warmup_steps=1, num_workers=0, save_every=10_000,
                log_every=10_000, progress=False, stage_parallel=stage_parallel)


def _worker(rank: int, world: int, port: int, size: dict, out: str, steps: int, result: str) -> None:
    """One process of a run: trains, then writes its seconds and memory to ``result``.rank."""
    import timm
    import torch

    from bim_export.train.config import TrainConfig
    from bim_export.train.trainer import train

    torch.set_num_threads(1)
    timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, embed_dim=8, num_heads=1)
    base_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # torch, timm and the package, used once
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                          LOCAL_RANK=str(rank))

    # the peak of the training steps: read as the run's only save (its last step) begins, before rank 0
    # gathers the whole checkpoint in host memory
    from bim_export.train import trainer

    steps_kib, checkpoint = [], trainer._checkpoint

    def timed_checkpoint(*args, **kwargs):
        steps_kib.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
        return checkpoint(*args, **kwargs)

    trainer._checkpoint = timed_checkpoint
    cfg = TrainConfig(**_settings(size, out, steps, world))
    res = train(cfg, dataset=_images(size["images"], cfg.bim.model_args.get("img_size", 224)))
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    Path(f"{result}.{rank}").write_text(json.dumps({"seconds": res.seconds, "steps_peak_mib": steps_kib[0] / 1024,
                                                    "peak_mib": peak_kib / 1024, "base_mib": base_kib / 1024}))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(size: dict, world: int, steps: int) -> list[dict]:
    """A run of ``steps`` steps on ``world`` processes (fresh ones); each process's figures."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        result = f"{tmp}/result"
        mp.spawn(_worker, args=(world, _free_port(), size, f"{tmp}/out", steps, result), nprocs=world, join=True)
        return [json.loads(Path(f"{result}.{r}").read_text()) for r in range(world)]


def memory(size: dict) -> dict:
    """Per-process peak memory of 1 process and of 2 stage ranks training ``memory_model``."""
    big = {**size, "small": size["memory_model"]}
    one, two = (_run(big, world, size["memory_steps"]) for world in (1, 2))
    above = lambda r: r["steps_peak_mib"] - r["base_mib"]  # noqa: E731
    return {"model": size["memory_model"], "batch": size["batch"], "steps": size["memory_steps"],
            "single": one, "stage_parallel_2": two,
            "steps_peak_x": [r["steps_peak_mib"] / one[0]["steps_peak_mib"] for r in two],
            "steps_peak_above_imports_x": [above(r) / above(one[0]) for r in two],
            "peak_with_save_x": [r["peak_mib"] / one[0]["peak_mib"] for r in two]}


def throughput(size: dict) -> dict:
    """img/s and per-process memory of 1 process and of 2 stage ranks, ``repeats`` times interleaved;
    the best img/s of each (the least disturbed by other load)."""
    runs = {1: [], 2: []}
    for _ in range(size["repeats"]):
        for world in (1, 2):
            short, long = _run(size, world, size["short"]), _run(size, world, size["long"])
            rate = (size["long"] - size["short"]) * size["batch"] / (long[0]["seconds"] - short[0]["seconds"])
            runs[world].append({"img_per_s": rate, "ranks": long})
            print(f"  {world} process(es): {rate:.2f} img/s; peak RSS of the steps "
                  + ", ".join(f"{r['steps_peak_mib']:.0f} MiB" for r in long), flush=True)
    best = {w: max(r, key=lambda x: x["img_per_s"]) for w, r in runs.items()}
    one, two = best[1], best[2]
    above = lambda r: r["steps_peak_mib"] - r["base_mib"]  # noqa: E731
    return {
        "model": size["small"], "batch": size["batch"], "steps": [size["short"], size["long"]],
        "single": one, "stage_parallel_2": two, "all_runs": runs,
        "speedup": two["img_per_s"] / one["img_per_s"],
        "steps_peak_x": [r["steps_peak_mib"] / one["ranks"][0]["steps_peak_mib"] for r in two["ranks"]],
        "steps_peak_above_imports_x": [above(r) / above(one["ranks"][0]) for r in two["ranks"]],
        "peak_with_save_x": [r["peak_mib"] / one["ranks"][0]["peak_mib"] for r in two["ranks"]],
    }


# ------------------------------------------------------------------------------ per-stage times


def stage_times(arch: str, batch: int, device: str, repeats: int = 3) -> dict:
    """Each stage's step (forward, backward, AdamW step of its parameters) in seconds, the median of
    ``repeats`` after a warm-up, and the model's figures for the byte counts."""
    import torch

    from bim_export.model.architecture import BimConfig
    from bim_export.train.config import TrainConfig
    from bim_export.train.model import BimModel
    from bim_export.train.optim import StageOptimizer

    torch.manual_seed(0)
    cfg = TrainConfig(out="unused", model=arch, exits=[3, 6, 9, 12] if "large" not in arch else [6, 12, 18, 24],
                      batch_size=batch)
    model = BimModel(BimConfig.model_validate(cfg.bim.model_dump())).to(device).train()
    opt = StageOptimizer(model, cfg)
    amp = torch.bfloat16 if device == "cuda" else None
    size = model.encoder.patch_embed.img_size[0]
    imgs = torch.randn(batch, 3, size, size, device=device)
    batch_ = model.masked_batch(imgs, model.mask_noise(batch).to(device))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = {i: [] for i in range(model.num_stages)}  # (forward + backward, AdamW step) per repeat
    for rep in range(repeats + 1):
        x = None
        for i in range(model.num_stages):
            sync()
            t0 = time.perf_counter()
            x, _ = model.backward_stage(i, x, batch_, 1.0, amp)
            sync()
            t1 = time.perf_counter()
            opt.step_stage(i)
            sync()
            if rep:  # the first pass warms up
                times[i].append((t1 - t0, time.perf_counter() - t1))
    shape = model.token_shape(BATCH)
    med = lambda i, k: statistics.median(t[k] for t in times[i])  # noqa: E731
    return {"arch": arch, "exits": model.exits, "measured_batch": batch, "device": device,
            "stage_s": [med(i, 0) + med(i, 1) for i in range(model.num_stages)],
            "compute_s": [med(i, 0) for i in range(model.num_stages)],
            "adamw_s": [med(i, 1) for i in range(model.num_stages)],
            "params": sum(p.numel() for p in model.parameters()),
            "tokens_per_image": shape[1], "embed_dim": shape[2]}


def projection(measured: dict, h100: dict | None) -> dict:
    """The 4-GPU projection of one model from its measured per-stage times."""
    scale = BATCH / measured["measured_batch"]  # the forward and backward scale with the batch, AdamW not
    stage_256 = [c * scale + a for c, a in zip(measured["compute_s"], measured["adamw_s"])]
    total = sum(stage_256)
    shares = [t / total for t in stage_256]
    # the residual stream that crosses stays fp32 under bf16 autocast (x + block(x) promotes)
    boundary = BATCH * measured["tokens_per_image"] * measured["embed_dim"] * 4
    out = {"arch": measured["arch"], "exits": measured["exits"], "params_m": measured["params"] / 1e6,
           f"{measured['device']}_stage_ms_at_256": [t * 1e3 for t in stage_256],
           "stage_shares": shares,
           "bytes_per_boundary_per_step": boundary, "bytes_sent_per_step": 3 * boundary,
           # data parallel on 4 GPUs for comparison: a ring all-reduce of the fp32 gradients
           "data_parallel_bytes_per_gpu_per_step": 2 * 3 / 4 * measured["params"] * 4}
    out[f"{measured['device']}_speedup_4_stage_ranks"] = total / max(stage_256)
    if h100 is not None:
        ms = h100["ms"] * h100.get("ratio", 1.0)
        out["h100_step_ms_one_gpu"] = ms
        out["h100_source"] = h100["source"]
        out["h100_stage_ms"] = [ms * s for s in shares]
        out["h100_4gpu_step_ms"] = max(out["h100_stage_ms"])
        out["h100_4gpu_speedup"] = ms / out["h100_4gpu_step_ms"]
        out["h100_4gpu_img_per_s"] = BATCH / out["h100_4gpu_step_ms"] * 1e3
        # the tokens of one boundary in a stage's time: the link it needs to hide the sends
        out["link_gb_per_s_needed"] = boundary / (out["h100_4gpu_step_ms"] / 1e3) / 1e9
    return out


def _h100_record() -> dict | None:
    if not H100.is_file():
        return None
    data = json.loads(H100.read_text())
    if data["size"]["arch"] != "vit_base_patch16_224" or data["size"]["batch"] != BATCH:
        return None
    return {"ms": data["variants"]["bim_1x256"]["ms_per_step"], "gpu": data["machine"].get("gpu")}


# ------------------------------------------------------------------------------ report


def machine() -> dict:
    import torch

    from bim_export.runtime.machine import machine_description

    return {**machine_description(), "torch": torch.__version__, "load_1min": os.getloadavg()[0],
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def report(res: dict) -> str:
    m = res["machine"]
    lines = ["# Stage-parallel BIM", "",
             f"Machine: {m['cpu']} ({', '.join(m['cpu_flags'])}), {m['logical_cores']} logical cores, "
             f"torch {m['torch']}; load (1 min) {m['load_before']:.2f} before, {m['load_1min']:.2f} after; "
             f"{m['date']}.", ""]
    tp = res.get("throughput")
    if tp:
        one, two = tp["single"], tp["stage_parallel_2"]
        lines += ["## 1 process against 2 stage ranks (1 torch thread each, gloo)", "",
                  f"Model: {tp['model']['model']} {tp['model'].get('model_args', {})}, exits {tp['model']['exits']}, "
                  f"batch {tp['batch']}; img/s over steps {tp['steps'][0]}..{tp['steps'][1]}, best of "
                  f"{len(tp['all_runs'][1])} interleaved runs.", "",
                  "| layout | img/s | peak RSS of the steps (MiB) | the same above imports (MiB) | peak RSS "
                  "with the final save (MiB) |", "|---|---|---|---|---|",
                  _row("1 process", one), _row("2 stage ranks", two), "",
                  f"Speed-up {tp['speedup']:.2f}x (target >= 1.7x). Peak of the training steps per rank "
                  + " / ".join(f"{x:.2f}x" for x in tp["steps_peak_x"]) + " of the single process's (RSS), "
                  + " / ".join(f"{x:.2f}x" for x in tp["steps_peak_above_imports_x"])
                  + " above the imports (target <= 0.6x); with the final save "
                  + " / ".join(f"{x:.2f}x" for x in tp["peak_with_save_x"])
                  + " (rank 0 gathers the whole checkpoint in host memory to write it).", ""]
    mem = res.get("memory")
    if mem:
        lines += [f"## Memory where the weights and optimizer state dominate: {mem['model']['model']} "
                  f"{mem['model']['model_args']}, batch {mem['batch']}, {mem['steps']} steps", "",
                  "| layout | peak RSS of the steps (MiB) | the same above imports (MiB) | peak RSS with the final "
                  "save (MiB) |", "|---|---|---|---|",
                  _row("1 process", {"ranks": mem["single"]}),
                  _row("2 stage ranks", {"ranks": mem["stage_parallel_2"]}), "",
                  "Peak of the training steps per rank "
                  + " / ".join(f"{x:.2f}x" for x in mem["steps_peak_x"]) + " of the single process's (RSS), "
                  + " / ".join(f"{x:.2f}x" for x in mem["steps_peak_above_imports_x"])
                  + " above the imports; with the final save "
                  + " / ".join(f"{x:.2f}x" for x in mem["peak_with_save_x"]) + ".", ""]
    lines += ["## Projection: 4 GPUs, one stage each, batch 256", "",
              "| model | params (M) | per-stage ms at 256 (" + res["stage_device"] + ", measured at small batch, "
              "scaled) | H100 1 GPU ms | H100 per-stage ms | H100 4-GPU step ms | speed-up | bytes sent per step "
              "| per boundary | link to hide it | data parallel all-reduce per GPU |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in res["projection"]:
        key = next(k for k in p if k.endswith("_stage_ms_at_256"))
        h = p.get("h100_step_ms_one_gpu")
        lines.append(
            f"| {p['arch']} | {p['params_m']:.0f} | {' / '.join(f'{t:.0f}' for t in p[key])} | "
            + (f"{h:.1f} ({p['h100_source']}) | {' / '.join(f'{t:.1f}' for t in p['h100_stage_ms'])} | "
               f"{p['h100_4gpu_step_ms']:.1f} | {p['h100_4gpu_speedup']:.2f}x | " if h else "- | - | - | - | ")
            + f"{p['bytes_sent_per_step'] / 1e6:.1f} MB | {p['bytes_per_boundary_per_step'] / 1e6:.1f} MB | "
            + (f"{p['link_gb_per_s_needed']:.1f} GB/s | " if h else "- | ")
            + f"{p['data_parallel_bytes_per_gpu_per_step'] / 1e6:.0f} MB |")
    lines += ["", "Tokens cross as fp32 (the residual stream stays fp32 under bf16 autocast); masks and targets are "
              "recomputed by each group from the seeded stream (0 bytes). A 4-GPU step takes the slowest stage once "
              "the pipeline is full; the sends overlap the next micro-batch's compute where the link carries one "
              "boundary's tokens within a stage's time.", ""]
    return "\n".join(lines)


def _row(name: str, run: dict) -> str:
    """A table row: img/s where measured, then the memory figures of each rank."""
    ranks = run["ranks"]
    cell = lambda f: " / ".join(f"{f(r):.0f}" for r in ranks)  # noqa: E731
    rate = f" {run['img_per_s']:.2f} |" if "img_per_s" in run else ""
    return (f"| {name} |{rate} {cell(lambda r: r['steps_peak_mib'])} | "
            f"{cell(lambda r: r['steps_peak_mib'] - r['base_mib'])} | {cell(lambda r: r['peak_mib'])} |")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a check of the script, not figures")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the per-stage times are measured")
    ap.add_argument("--skip-throughput", action="store_true", help="only the per-stage times and the projection")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    size = SIZES["quick" if args.quick else "full"]
    res = {"machine": {"load_before": os.getloadavg()[0]}}
    if not args.skip_throughput and args.device == "cpu":
        print("throughput and memory", flush=True)
        res["throughput"] = throughput(size)
        print("memory", flush=True)
        res["memory"] = memory(size)
    record = _h100_record()
    res["stage_device"] = args.device
    res["projection"], measured = [], {}
    for arch, batch in size["project"]:
        print(f"per-stage times: {arch} at batch {batch} on {args.device}", flush=True)
        measured[arch] = stage_times(arch, batch, args.device)
    base = measured.get("vit_base_patch16_224")
    for arch, m in measured.items():
        h100 = None
        if record is not None and base is not None:
            if arch == "vit_base_patch16_224":
                h100 = {"ms": record["ms"], "source": f"recorded on {record['gpu']}"}
            else:  # no H100 record of this model: the ViT-B record times the ratio measured here
                at = lambda r: sum(r["compute_s"]) / r["measured_batch"]  # noqa: E731 - per image
                ratio = at(m) / at(base)
                h100 = {"ms": record["ms"], "ratio": ratio,
                        "source": f"ViT-B record x {ratio:.2f} ({args.device}-measured ratio)"}
        res["projection"].append({**projection(m, h100), "measured": m})
    res["machine"].update(machine())
    name = "stage_parallel" + ("_quick" if args.quick else "") + ("_cuda" if args.device == "cuda" else "")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(res, indent=1))
    text = report(res)
    (RESULTS / f"{name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
