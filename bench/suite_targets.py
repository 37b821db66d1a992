"""The GPU suite's targets, in one place: every GPU projection and target of README.md, bench/README.md
and docs/training.md, the figure of the suite's results that checks it, and the Markdown report.

A target reads the figures of the steps it names (``bench/gpu_suite.py``); where one of them was not
measured (skipped, failed, or still to come), the target is "not measured", never met or missed.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Callable
from dataclasses import dataclass

from train_memory_report import summarize

VITB, VITL = "vit_base_patch16_224", "vit_large_patch16_224"


@dataclass(frozen=True)
class Target:
    key: str
    claim: str  # what is checked
    op: str  # "<=", ">=", "<"
    threshold: float
    projected: str  # what the READMEs say now, and from what
    figure: Callable[[dict], tuple[float, str] | None]  # measured results -> (figure, what it is) or None


def _memory(measured: dict, arch: str) -> dict:
    """The memory variants of ``arch`` measured so far, with ratios and MFU (train_memory_report)."""
    short = "vitl" if arch == VITL else "vitb"
    runs = {k[len(short) + 1:]: copy.deepcopy(v) for k, v in measured.items() if k.startswith(short + "_")}
    if runs:  # CUDA figures carry peak_gib, a CPU dry run's peak_above_base_mib
        summarize(runs, "cuda" if any("peak_gib" in r for r in runs.values()) else "cpu")
    return runs


def _ratio(arch: str, variant: str, key: str) -> Callable[[dict], tuple[float, str] | None]:
    def f(measured: dict):
        r = _memory(measured, arch).get(variant, {})
        return (r[key], variant) if key in r else None
    return f


def _best_mfu(arch: str) -> Callable[[dict], tuple[float, str] | None]:
    def f(measured: dict):
        bim = {n: r for n, r in _memory(measured, arch).items() if n.startswith("bim") and "mfu" in r}
        if not bim:
            return None
        name = max(bim, key=lambda n: bim[n]["mfu"])
        return bim[name]["mfu"], f"best BIM variant measured: {name}"
    return f


def _cli(pipeline: str):
    def f(measured: dict):
        share = measured.get("cli_throughput", {}).get("cli_share", {})
        return (share[pipeline], f"{pipeline} pipeline") if pipeline in share else None
    return f


def _speedup(arch: str):
    def f(measured: dict):
        r = measured.get("stage_times", {}).get(arch)
        return (r["speedup_4"], "sum / slowest of the 4 measured stage times") if r else None
    return f


def _latency(protocol: str, key: str):
    def f(measured: dict):
        r = measured.get("latency_model")
        return (r[protocol][key], protocol) if r else None
    return f


def _quality(key: str):
    def f(measured: dict):
        s = measured.get("quality_short", {}).get("summary", {}).get("mnist")
        if not s:
            return None
        g = s["goals"]["bim"]
        return (g["worst_knn_gap"], "worst exit, kNN points, 1 seed") if key == "gap" else (
            float(g["deepest_best_knn"]), "1 = yes (kNN, 1 seed)")
    return f


TARGETS = [
    Target("vitl_stage_ckpt_peak", "ViT-L/16 BIM, update: stage + grad_checkpointing: peak x standard MAE", "<=",
           0.22, "0.214 (projected from the H100 update: step run - 0.85 GiB of gradients)",
           _ratio(VITL, "bim_stage_ckpt", "peak_x")),
    Target("vitl_stage_ckpt_peak_vs_ckpt", "ViT-L/16 same: peak x checkpointed MAE", "<", 1.0, "0.65 (projected)",
           _ratio(VITL, "bim_stage_ckpt", "peak_x_ckpt")),
    Target("vitl_stage_ckpt_time_vs_ckpt", "ViT-L/16 same: step time x checkpointed MAE", "<=", 0.80,
           "0.74 (the update: step run's time)", _ratio(VITL, "bim_stage_ckpt", "time_x_ckpt")),
    Target("vitb_stage_peak", "ViT-B/16 BIM, update: stage: peak x standard MAE", "<=", 0.22,
           "0.249 (projected: missed)", _ratio(VITB, "bim_stage", "peak_x")),
    Target("vitb_stage_ckpt_peak", "ViT-B/16 BIM, update: stage + grad_checkpointing: peak x standard MAE", "<=",
           0.22, "~0.18 (estimated from ViT-L)", _ratio(VITB, "bim_stage_ckpt", "peak_x")),
    Target("vitb_stage_ckpt_time", "ViT-B/16 same: step time x standard MAE", "<=", 0.70,
           "~0.70 (estimated from ViT-L)", _ratio(VITB, "bim_stage_ckpt", "time_x")),
    Target("vitb_stage_ckpt_compile_time", "ViT-B/16 same + compile: step time x standard MAE", "<=", 0.70,
           "not projected (the setting the README says to check)", _ratio(VITB, "bim_stage_ckpt_compile", "time_x")),
    Target("vitb_mfu", "ViT-B/16 BIM: MFU (model FLOPs / measured bf16 GEMM rate)", ">=", 0.35,
           "16 % (update: step, before fused AdamW and compile)", _best_mfu(VITB)),
    Target("vitl_mfu", "ViT-L/16 BIM: MFU", ">=", 0.35, "27 % (same)", _best_mfu(VITL)),
    Target("cli_cpu", "train CLI img/s x compute-only, cpu pipeline (ViT-B/16, batch 256, 15 workers)", ">=", 0.90,
           "not measured on a GPU", _cli("cpu")),
    Target("cli_gpu", "train CLI img/s x compute-only, gpu pipeline (nvJPEG)", ">=", 0.90, "not measured on a GPU",
           _cli("gpu")),
    # no target is written for 4 GPUs; 3.4x is the 2-rank target's scaling efficiency (1.7x of 2) at 4
    Target("stage4_vitb", "ViT-B/16 on 4 stage ranks: speed-up over 1 GPU", ">=", 3.4,
           "3.46x (H100 record split by 2-core EPYC stage shares)", _speedup(VITB)),
    Target("stage4_vitl", "ViT-L/16 on 4 stage ranks: speed-up over 1 GPU", ">=", 3.4,
           "3.77x (projected from ViT-B x a CPU-measured ratio)", _speedup(VITL)),
    Target("latency_calibrated_median", "latency model, GPU torch eager, calibrated on ViT-S depths 3 and 12: "
           "median error", "<=", 0.10, "12.6 % (recorded H100 run: missed)", _latency("held_out", "median_error")),
    Target("latency_calibrated_worst", "same: worst error", "<=", 0.30, "22.8 %", _latency("held_out", "worst_error")),
    Target("latency_lodo_median", "latency model, leave one depth out: median error", "<=", 0.10, "6.9 %",
           _latency("leave_one_depth_out", "median_error")),
    Target("latency_lodo_worst", "same: worst error", "<=", 0.30, "25.7 %", _latency("leave_one_depth_out", "worst_error")),
    Target("quality_exit_gap", "short GPU quality run: every exit within 1 point of MAE of its depth (kNN)", ">=",
           -1.0, "never run on a GPU (CPU: -2.0 points at MNIST exit 2, within seed noise)", _quality("gap")),
    Target("quality_deepest_best", "short GPU quality run: the deepest exit the best (kNN)", ">=", 1.0,
           "never run on a GPU", _quality("deepest")),
]
_OPS = {"<=": operator.le, ">=": operator.ge, "<": operator.lt}


def judge(record: dict) -> list[dict]:
    """Every target against the figures measured so far in ``record`` (suite_budget.run_steps's)."""
    measured = {n: s["result"] for n, s in record["steps"].items() if s["status"] == "measured"}
    rows = []
    for t in TARGETS:
        got = t.figure(measured)
        row = {"key": t.key, "claim": t.claim, "target": f"{t.op} {t.threshold:g}", "projected": t.projected}
        if got is None:
            row.update(figure=None, verdict="not measured")
        else:
            fig, what = got
            met = _OPS[t.op](fig, t.threshold)
            row.update(figure=fig, what=what, met=met,
                       verdict="met" if met else f"missed by {abs(fig - t.threshold):.3g}")
        rows.append(row)
    return rows


def markdown(report: dict) -> str:
    m = report["machine"]
    where = (f"{m['gpu']}, " if "gpu" in m else "") + (f"{m['cpu']} ({', '.join(m['cpu_flags']) or 'no AVX2'}), "
                                                       f"{m['cores']} cores, load {m['load_avg']}, torch {m['torch']}")
    lines = [f"# GPU suite: {report['mode']}", "", f"{where}; {m['date']}; {report['wall_s']:.0f} s in all "
             f"(budget {report['budget_s']:.0f} s).", ""]
    if "dry run" in report["mode"]:
        lines += ["**Dry run: tiny models on the CPU. The figures check the machinery; met or missed below means "
                  "nothing.**", ""]
    lines += ["| step | status | estimated s | took s | note |", "|---|---|---|---|---|"]
    for name, s in report["steps"].items():
        lines.append(f"| {name} | {s['status']} | {s['est_s']:.0f} | {s['wall_s']:.0f} | "
                     f"{s.get('reason') or s.get('error') or ''} |")
    lines += ["", "| target | figure | target | README now | verdict |", "|---|---|---|---|---|"]
    for t in report["targets"]:
        fig = "-" if t["figure"] is None else f"{t['figure']:.3g} ({t['what']})"
        verdict = t["verdict"] if t["verdict"] in ("met", "not measured") else f"**{t['verdict']}**"
        lines.append(f"| {t['claim']} | {fig} | {t['target']} | {t['projected']} | {verdict} |")
    return "\n".join(lines) + "\n"
