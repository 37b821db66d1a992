"""The fine-tuning bench's report: mean and standard deviation over seeds per start and exit, the
targets, joint against per-exit (quality, cost, early exit), and the Markdown tables."""

from __future__ import annotations

import statistics

import numpy as np

ROWS = {  # row -> (start, mode), in table order
    "none": ("none", "per_exit"),
    "mae": ("mae", "per_exit"),
    "bim": ("bim", "per_exit"),
    "bim_joint": ("bim", "joint"),
}
TITLES = {"none": "no pretraining", "mae": "MAE of that depth", "bim": "BIM, per_exit", "bim_joint": "BIM, joint"}
REGIMES = {"all": "all labels", "few": "{few} labelled images per class"}
EARLY_LOSS = 0.5  # points of top-1 the early exit may lose against the deepest exit


def _stats(values: list[float]) -> dict:
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def _row(r: dict) -> str:
    start = "mae" if r["start"].startswith("mae") else r["start"]
    return start + ("_joint" if r["mode"] == "joint" else "")


# ------------------------------------------------------------------------------ early exit


def cascade(q: dict, exits: list[str], thresholds: list[float], idx) -> dict:
    """Top-1 and mean blocks run of a confidence cascade over ``idx`` of the query images: an image
    stops at the first exit whose confidence reaches that exit's threshold (the last always)."""
    n = len(idx)
    correct = np.zeros(n)
    blocks = np.zeros(n)
    left = np.ones(n, dtype=bool)
    for d, t in zip(exits, [*thresholds, -1.0]):
        conf = np.asarray(q[d]["confidence"])[idx]
        stop = left & (conf >= t)
        correct[stop] = np.asarray(q[d]["correct"])[idx][stop]
        blocks[stop] = int(d)
        left &= ~stop
    return {"top1": float(correct.mean()), "blocks": float(blocks.mean()),
            "early": float((blocks < int(exits[-1])).mean())}


def early_exit(q: dict) -> dict:
    """Two exits: the exit-2 threshold is fitted on the even query images (the lowest that loses at
    most ``EARLY_LOSS`` points of the deepest exit's top-1 there), then measured on the odd ones."""
    exits = sorted(q, key=int)
    n = len(q[exits[0]]["correct"])
    fit, test = np.arange(0, n, 2), np.arange(1, n, 2)
    deep_fit = cascade(q, exits, [2.0] * (len(exits) - 1), fit)["top1"]
    best = 2.0
    for t in sorted(set(np.asarray(q[exits[0]]["confidence"])[fit].tolist()) | {2.0}):
        if 100 * (deep_fit - cascade(q, exits, [t], fit)["top1"]) <= EARLY_LOSS:
            best = t
            break
    res = cascade(q, exits, [best], test)
    deep = cascade(q, exits, [2.0], test)
    return {"threshold": best, "top1": res["top1"], "deepest_top1": deep["top1"],
            "loss_points": 100 * (deep["top1"] - res["top1"]), "early": res["early"],
            "blocks_fraction": res["blocks"] / int(exits[-1])}


def compact(result: dict) -> None:
    """Replaces each run's per-image predictions by its early-exit figures (joint runs) in place."""
    for r in result["finetune"]:
        q = r.pop("query", None)
        if q is not None and r["mode"] == "joint":
            r["early_exit"] = early_exit(q)


# ------------------------------------------------------------------------------ summary


def summarize(result: dict, cfg: dict) -> dict:
    out: dict = {}
    for name in cfg["sets"]:
        out[name] = {}
        for regime in REGIMES:
            runs = [r for r in result["finetune"] if r["set"] == name and r["labels"] == regime]
            cells: dict = {}
            for r in runs:
                for d, v in r["task_top1"].items():
                    cells.setdefault(_row(r), {}).setdefault(d, []).append(v)
            table = {row: {d: _stats(v) for d, v in exits.items()} for row, exits in cells.items()}
            knn: dict = {}
            for r in result["knn"]:
                if r["set"] == name:
                    start = "mae" if r["start"].startswith("mae") else r["start"]
                    for d, v in r["knn"].items():
                        key = "all" if regime == "all" else f"few{r['seed']}"
                        knn.setdefault(start, {}).setdefault(d, []).append(v[key])
            cost = {row: _stats([sum(r["train_s"] for r in runs if _row(r) == row and r["seed"] == seed)
                                 for seed in cfg["seeds"]]) for row in cells}  # per seed, every exit
            early = [r["early_exit"] for r in runs if r.get("early_exit")]
            out[name][regime] = {
                "table": table, "knn": {s: {d: _stats(v) for d, v in e.items()} for s, e in knn.items()},
                "train_s": cost, "targets": targets(table),
                "early_exit": {k: _stats([e[k] for e in early]) for k in early[0]} if early else None}
    return out


def targets(t: dict) -> dict:
    """Per BIM row: every exit >= 1 point above no pretraining; within 1 point of MAE of that depth;
    the deepest exit the best of its run. Each with its worst margin in points."""
    out = {}
    for row in ("bim", "bim_joint"):
        if row not in t:
            continue
        exits = sorted(t[row], key=int)
        m = {d: 100 * t[row][d]["mean"] for d in exits}
        # points, rounded to far below a query image's weight so that float sums do not decide a tie
        above = round(min(m[d] - 100 * t["none"][d]["mean"] for d in exits), 6)
        vs_mae = round(min(m[d] - 100 * t["mae"][d]["mean"] for d in exits), 6)
        deepest = round(m[exits[-1]] - max(m[d] for d in exits[:-1]), 6)
        out[row] = {"above_none": {"margin": above - 1.0, "met": above >= 1.0, "points": above},
                    "vs_mae": {"margin": vs_mae + 1.0, "met": vs_mae >= -1.0, "points": vs_mae},
                    "deepest_best": {"margin": deepest, "met": deepest >= 0.0, "points": deepest}}
    return out


# ------------------------------------------------------------------------------ Markdown


def _pm(s: dict | None, n: int) -> str:
    if s is None:
        return "-"
    fewer = f" (n={s['n']})" if s["n"] < n else ""
    return f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f}{fewer}"


def _met(t: dict) -> str:
    return f"{'met' if t['met'] else '**missed**'} ({t['points']:+.1f}; margin {t['margin']:+.2f})"


def _pretrain_line(pre: list[dict]) -> str:
    """What the pretraining checkpoints cost when they were trained (the cache keeps the figure)."""
    by: dict = {}
    for r in pre:
        by.setdefault(r["start"], []).append(r["train_s"])
    each = ", ".join(f"{s} {statistics.mean(v):.0f} s" for s, v in by.items() if s != "none")
    return (f"Pretraining: {len(pre)} checkpoints, {sum(map(sum, by.values())) / 60:.0f} min of worker time when "
            f"trained (2 at a time); per run, mean: {each}.")


def markdown(report: dict) -> str:
    cfg, summ, m = report["config"], report["summary"], report["machine"]
    n = len(cfg["seeds"])
    ft = cfg["finetune"]
    lines = [f"# Fine-tuning bench ({report['name']}): every exit fine-tuned, per start", "",
             f"Machine: {m['cpu']} ({', '.join(m['cpu_flags']) or 'no listed flags'}), {m['logical_cores']} "
             f"logical cores, {cfg['workers']} runs at a time x {cfg.get('threads') or 'default'} torch thread(s), "
             f"torch {m['torch']}; load average before {m['load_before']}, after {report['load_after']}; "
             f"{m['date']}; {report['wall_s'] / 60:.1f} min ({report['pretrain_s'] / 60:.1f} of them pretraining, "
             f"{report['pretrained_cached']} of {report['pretrained_total']} checkpoints from the cache).", "",
             *([report["note"], ""] if report.get("note") else []),
             _pretrain_line(report["result"]["pretrain"]), "",
             f"Model: timm {cfg['model']} with {cfg['model_args']}, exits {cfg['exits']}. Pretraining: "
             f"{cfg['steps']} steps x {cfg['batch_size']} images of the reference part, lr {cfg['lr']}, decoder "
             f"{'x'.join(map(str, cfg['decoder'][:2]))}, mask {cfg['mask_ratio']}; BIM one run, MAE `mode: e2e` "
             "at each exit's depth with the same steps, no pretraining = the BIM run's initialization. "
             f"Fine-tuning (`bim_export.train.finetune`): {ft}; all labels: {cfg['finetune_all']}, "
             f"{cfg['few']} per class: {cfg['finetune_few']}. Scored on the fixed query part (`--val-data`). "
             f"Seeds {cfg['seeds']} (initialization, pretraining, the draw of labelled images, fine-tuning). "
             "Figures: top-1 in %, mean ± standard deviation over the seeds.", ""]
    for name, regimes in summ.items():
        d0 = report["result"]["data"][name]
        lines += [f"## {name} ({d0['images']} images: {d0['reference']} reference, {d0['query']} query)", ""]
        for regime, s in regimes.items():
            t, k = s["table"], s["knn"]
            exits = sorted(t["none"], key=int)
            lines += [f"### {REGIMES[regime].format(few=cfg['few'])}", "",
                      "| exit | " + " | ".join(f"fine-tuned: {TITLES[r]}" for r in ROWS if r in t)
                      + " | kNN: none | kNN: MAE | kNN: BIM |",
                      "|---" * (1 + sum(r in t for r in ROWS) + 3) + "|"]
            for d in exits:
                cells = [_pm(t[r].get(d), n) for r in ROWS if r in t]
                cells += [_pm(k.get(st, {}).get(d), n) for st in ("none", "mae", "bim")]
                lines.append(f"| {d} | " + " | ".join(cells) + " |")
            lines += ["", "Targets:", ""]
            for row, g in s["targets"].items():
                lines.append(f"- {TITLES[row]}: every exit ≥ 1 point above no pretraining: {_met(g['above_none'])}; "
                             f"within 1 point of MAE of that depth: {_met(g['vs_mae'])}; the deepest exit the best "
                             f"of its run: {_met(g['deepest_best'])}.")
            c = s["train_s"]
            lines += ["", "Fine-tuning time, s, every exit of a start (mean over seeds; per_exit trains the exits in turn, MAE is "
                      "one run per depth): "
                      + ", ".join(f"{TITLES[r]} {c[r]['mean']:.0f}" for r in ROWS if r in c) + "."]
            e = s["early_exit"]
            if e:
                lines.append(f"Early exit of the joint model (exit-2 threshold fitted on the even query images for "
                             f"≤ {EARLY_LOSS} point lost, measured on the odd ones): top-1 "
                             f"{100 * e['top1']['mean']:.1f} ± {100 * e['top1']['std']:.1f} against the deepest exit's "
                             f"{100 * e['deepest_top1']['mean']:.1f} (lost {e['loss_points']['mean']:.2f} ± "
                             f"{e['loss_points']['std']:.2f} points), {100 * e['early']['mean']:.0f} % of the images "
                             f"stop at exit 2: {e['blocks_fraction']['mean']:.2f}x the deepest exit's blocks.")
            lines.append("")
    return "\n".join(lines)
