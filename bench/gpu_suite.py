"""Every GPU figure the READMEs project, measured in one run of at most 8 minutes on one H100/H200.

The steps, in order of value (each one a function of the bench that owns it; nothing is measured here):

1. ViT-L/16 (exits 6/12/18/24) then ViT-B/16 (exits 3/6/9/12), batch 256, bf16, 3 warm-up + 10 timed
   steps, one fresh process per variant (``bench/train_memory.py``): standard MAE, checkpointed MAE,
   BIM with ``update: stage`` without and with ``grad_checkpointing``: peak memory
   (``torch.cuda.max_memory_allocated``), step time, MFU against the bf16 GEMM rate measured in the
   same process;
2. the train CLI's img/s against the compute-only rate, both data pipelines, on generated JPEGs
   (``bench/train_throughput.py``);
3. per-stage times of ViT-B/16 and ViT-L/16 at batch 256: the 4-GPU stage-parallel speed-up
   (``bench/stage_parallel.py``);
4. BIM with ``compile`` (ViT-B: with ``grad_checkpointing``, the setting the README names; ViT-L: without);
5. the latency model's torch timing (ViT-Ti/S, depths 3-12, batch 1 and 32; ``bench/latency_model.py``);
6. if time is left: a shortened GPU quality configuration (``bench/quality.py``: one seed, MNIST).

Each result is written as soon as it is measured (``gpu_suite.jsonl``, and ``gpu_suite.json`` rewritten
after every step), a step that would start past its time share is skipped and marked, one still
running when the budget ends is stopped (``bench/suite_budget.py``), and the run ends with one
table: each target, its figure, met or missed (``bench/suite_targets.py``; ``gpu_suite.md``).

Usage::

    python bench/gpu_suite.py                   # on the GPU machine -> bench/results/gpu_suite/
    python bench/gpu_suite.py --dry-run         # the whole sequence at tiny size on the CPU
    python bench/gpu_suite.py --plan            # print the plan and exit
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import train_memory  # noqa: E402
from results_io import write_results  # noqa: E402
from suite_budget import Step, plan, plan_table, run_steps  # noqa: E402
from suite_targets import judge, markdown  # noqa: E402
from train_projection import MEASURED  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "gpu_suite"
BUDGET_S = 480.0

# ---------------------------------------------------------------------------- estimates (H100 seconds)
# Step times: the H100 80GB records made before per-stage updates (train_projection.MEASURED, from
# bench/results/train_memory_cuda.json and the ViT-L run), batch 256, bf16. Not recorded there, and
# estimated: a variant's process start, model build and CUDA context (8 s, bench/gpu_train.py's
# figure), its GEMM-rate measurement (1 s) and the meta-device FLOP count in this process (2 s); a
# compile (90 s: "a minute or two", docs/training.md); ViT-B with checkpointing (ViT-B's BIM step x
# ViT-L's checkpointing ratio, 131.7 / 111.9 ms).
START_S, GEMM_S, FLOPS_S, COMPILE_S = 8.0, 1.0, 2.0, 90.0
WARMUP, STEPS = 3, 10
VITB, VITL = "vit_base_patch16_224", "vit_large_patch16_224"
_MS = {(a, v): MEASURED[a][k][1] for a in MEASURED for v, k in
       (("mae_8x512", "mae"), ("mae_8x512_ckpt", "mae_ckpt"), ("bim_stage", "bim"), ("bim_stage_compile", "bim"))}
_MS[(VITL, "bim_stage_ckpt")] = MEASURED[VITL]["bim_ckpt"][1]
_MS[(VITB, "bim_stage_ckpt")] = MEASURED[VITB]["bim"][1] * MEASURED[VITL]["bim_ckpt"][1] / MEASURED[VITL]["bim"][1]
_MS[(VITB, "bim_stage_ckpt_compile")] = _MS[(VITB, "bim_stage_ckpt")]
# BIM with the trainer's default 1 x 256 decoders: ViT-B recorded (train_memory_cuda.json, bim_1x256);
# ViT-L scaled from its 1 x 128 record by ViT-B's 1 x 256 / 1 x 128 ratio
VITB_MS_256 = 64.7
VITL_MS_256 = MEASURED[VITL]["bim"][1] * VITB_MS_256 / MEASURED[VITB]["bim"][1]
# the train CLI: compute-only (a fresh process: 8 s, + 23 steps), two CLI runs (start, listing, 15
# workers: ~12 s each, + 50 steps), 600 JPEGs written at ~10 ms each (13-15 ms on the 2-core EPYC at load 7.5)
THROUGHPUT = dict(images=600, steps=50, warm=20, log_every=5, compute_steps=20)
THROUGHPUT_S = 8 + 23 * VITB_MS_256 / 1e3 + 2 * (12 + 50 * VITB_MS_256 / 1e3) + 600 * 0.010
# per-stage times: two models built and moved (~5 s each), 4 passes of each stage, CUDA start here (3 s)
STAGES_S = 3 + 2 * 5 + 4 * (VITB_MS_256 + VITL_MS_256) / 1e3
# the latency model: the recorded H100 run's own wall time (bench/results/latency_model_cuda_h100_measured.json)
LATENCY_S = 53.0
# the short quality run was never timed on a GPU: MNIST written and loaded (~6 s), 5 trainings of 200
# steps at ~15 ms (launch-bound 16-token model; the recorded ViT-Ti batch-1 forward is 1.4 ms at depth 3)
# plus ~2 s set-up each, kNN and probe per run (~2 s x 6), activations counted on the CPU (~5 s)
QUALITY = dict(steps=200, warmup_steps=10, seeds=[0], sets={"mnist": ["bim"]}, equal_time=[])
QUALITY_S = 6 + 5 * (2 + 200 * 0.015) + 6 * 2 + 5
DRY_COMPILE = {"backend": "aot_eager"}  # the dry run traces and differentiates; inductor is a GPU run's
# the dry run's CPU seconds are not the plan's H100 seconds: it starts every step within this limit
DRY_LIMIT_S = 1800.0


def _variant_est(arch: str, name: str) -> float:
    return START_S + GEMM_S + FLOPS_S + (COMPILE_S if "compile" in name else 0) + (WARMUP + STEPS) * _MS[(arch, name)] / 1e3


# ---------------------------------------------------------------------------- steps


def _variant(arch: str, name: str):
    (v,) = [v for v in train_memory.variants(arch, ["scale"], compile=True) if v["name"] == name]
    short = "vitl" if arch == VITL else "vitb"

    def run(ctx: dict) -> dict:
        size = train_memory.size(ctx["device"], arch, ctx["dry"])
        if not ctx["dry"]:
            size.update(warmup=WARMUP, steps=STEPS)
        # dry run: one torch thread (OpenMP threads on a small shared CPU wait out each other's time slices)
        spec = {**v, **size, "device": ctx["device"], "threads": 1 if ctx["dry"] else None}
        if ctx["dry"] and v["compile"]:
            spec["compile_options"] = DRY_COMPILE
        r = train_memory.measure_variant(spec, timeout=max(30.0, ctx["deadline_s"]))
        if "error" in r:
            raise RuntimeError(r["error"])
        return {"arch": arch, "label": v["label"], "size": size, **r}

    return Step(f"{short}_{name}", f"{arch}: {v['label']}", round(_variant_est(arch, name)),
                "recorded H100 step time x 13 steps + process start, GEMM rate, FLOP count"
                + (" + a compile (not recorded: ~90 s)" if v["compile"] else ""), run)


def _throughput(ctx: dict) -> dict:
    import train_throughput as tt

    size = dict(tt.SIZES["quick"], device="cpu") if ctx["dry"] else dict(tt.SIZES["cuda"], device="cuda", **THROUGHPUT)
    data = tt.make_jpegs(ctx["tmp"] / "jpegs", size["images"])
    r = tt.training_rates(size, data, ctx["tmp"], loader=False)
    return {"size": size, "images": tt.photos()[1], **r,
            "cli_share": {p: x["cli"]["img_per_s"] / r["compute"]["img_per_s"]
                          for p, x in r["pipelines"].items() if "cli" in x}}


def _stages(ctx: dict) -> dict:
    import stage_parallel as sp

    out = {}
    for arch in (VITB, VITL):  # the dry run measures ViT-Ti (224 px, batch 2) in their place
        m = sp.stage_times("vit_tiny_patch16_224", 2, "cpu") if ctx["dry"] else sp.stage_times(arch, 256, "cuda")
        p = sp.projection(m, None)
        out[arch] = {**p, "speedup_4": p[f"{ctx['device']}_speedup_4_stage_ranks"], "measured": m}
    if ctx["device"] == "cuda":  # the next steps' processes share the card: hand back what this one cached
        import torch

        torch.cuda.empty_cache()
    return out


def _latency(ctx: dict) -> dict:
    import latency_model
    from latency_model_report import markdown as latency_md

    res = latency_model.run_gpu(argparse.Namespace(device="torch-cpu" if ctx["dry"] else "cuda", quick=False,
                                                   profile=None, recorded=None))
    (ctx["out"] / "latency_model.md").write_text(latency_md(res))
    return res


def _quality(ctx: dict) -> dict:
    import quality
    from quality_report import summarize
    from quality_runs import write_sets

    cfg = dict(quality.CONFIGS["gpu"], **QUALITY)
    if ctx["dry"]:
        cfg = quality.dry(cfg)
    result = quality.bench(cfg, write_sets(ctx["tmp"] / "sets", cfg["sets"]))
    return {"config": cfg, "summary": summarize(result, cfg), "runs": result["runs"]}


def steps() -> list[Step]:
    """The suite, in order of value."""
    memory = [_variant(a, n) for a in (VITL, VITB) for n in ("mae_8x512", "mae_8x512_ckpt", "bim_stage_ckpt", "bim_stage")]
    return [
        *memory,
        Step("cli_throughput", "train CLI img/s against compute-only, cpu and gpu pipelines, ViT-B/16, batch 256",
             round(THROUGHPUT_S), "recorded ViT-B step 64.7 ms; CLI and process start-up estimated", _throughput),
        Step("stage_times", "per-stage step times of ViT-B/16 and ViT-L/16 at batch 256: 4-GPU speed-up",
             round(STAGES_S), "recorded ViT-B step 64.7 ms, ViT-L scaled; model builds estimated", _stages),
        _variant(VITB, "bim_stage_ckpt_compile"),
        _variant(VITL, "bim_stage_compile"),
        Step("latency_model", "torch eager timing of ViT-Ti/S, depths 3-12, batch 1 and 32, and the latency model's "
             "errors", LATENCY_S, "the recorded H100 run's wall time (52.6 s)", _latency, needs=("onnx", "onnxscript")),
        Step("quality_short", "shortened GPU quality configuration: MNIST, seed 0, 200 steps, BIM against MAE "
             "of each exit's depth", round(QUALITY_S), "not recorded: launch-bound step ~15 ms, set-up estimated",
             _quality, needs=("mlxtend",)),
    ]


# ---------------------------------------------------------------------------- main


def machine(device: str) -> dict:
    import os

    info = train_memory.machine(device, None)
    info["load_avg"] = [round(x, 2) for x in os.getloadavg()]
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget-s", type=float, default=BUDGET_S, help="seconds for the whole suite (default 480)")
    ap.add_argument("--dry-run", action="store_true", help="the whole sequence at tiny size on the CPU "
                                                           "(results to a temporary folder unless --out)")
    ap.add_argument("--plan", action="store_true", help="print the plan and exit")
    ap.add_argument("--only", default=None, help="comma-separated step names, in the plan's order")
    ap.add_argument("--out", type=Path, default=None,
                    help="results folder (default: bench/results/gpu_suite/; a temporary one with --dry-run)")
    args = ap.parse_args(argv)
    all_steps = steps()
    if args.only:
        names = args.only.split(",")
        unknown = sorted(set(names) - {s.name for s in all_steps})
        if unknown:
            ap.error(f"--only: unknown step(s) {', '.join(unknown)} (steps: {', '.join(s.name for s in all_steps)})")
        all_steps = [s for s in all_steps if s.name in names]
    planned, extras = plan(all_steps, args.budget_s)
    print("Plan (estimated seconds on an H100):\n\n" + plan_table(planned, extras, args.budget_s), flush=True)
    if args.plan:
        return 0
    import torch

    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        ap.error("no CUDA device here: run on the GPU machine, or --dry-run for the sequence on the CPU")
    if args.dry_run:  # the steps run in this process: one thread, as in each variant's process
        torch.set_num_threads(1)
    try:  # every step trains: the package's training dependencies must be here (a bare GPU image lacks some)
        import bim_export.train.trainer  # noqa: F401  (the import is the check)
    except ImportError as e:
        ap.error(f"the training code cannot be imported here ({e}): install the project's dependencies, "
                 "or put them on PYTHONPATH")
    out = args.out or (Path(tempfile.mkdtemp(prefix="gpu-suite-dry-")) if args.dry_run else OUT)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-suite-") as tmp:
        ctx = {"dry": args.dry_run, "device": device, "out": out, "tmp": Path(tmp)}
        base = {"mode": "dry run on the CPU (tiny sizes: not figures)" if args.dry_run else "GPU",
                "machine": machine(device)}
        limit = max(args.budget_s, DRY_LIMIT_S) if args.dry_run else args.budget_s
        record = run_steps(planned + extras, limit, out, "gpu_suite", ctx,
                           report=lambda rec: {**base, "targets": judge(rec)})
    report = {**base, **record, "targets": judge(record), "wall_s": time.perf_counter() - t0,
              "load_avg_after": machine(device)["load_avg"]}
    write_results(out, "gpu_suite", report, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
