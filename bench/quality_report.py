"""The quality bench's report: mean and standard deviation over seeds, gaps to MAE, the goal
checks, and the Markdown tables."""

from __future__ import annotations

import statistics

from quality_runs import SCALE

LABELS = {"bim": "BIM", "overlap1": "BIM overlap 1", "overlap2": "BIM overlap 2",
          "lastdec2": "BIM, deepest decoder 2 blocks", "overlap1_w": "BIM overlap 1, loss weights 0.5 / 1"}


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
