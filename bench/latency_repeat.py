"""Repeatability of host latency: the same files measured again and again, as an export measures them.

The candidates of the shipped checkpoint (each exit x fp32 / int8) are built once, then measured
``--reps`` times, each time in a fresh worker, all candidates interleaved, with the export's settings
(``candidates.MEASURE``). From the very same samples, two protocols:

- before: p50 = the lowest round median, p90 = the p90 of the pooled samples, error = (slowest -
  fastest round median) / fastest, over the first ``rounds`` rounds (no re-measuring). Only its
  statistics: exports then also timed each candidate in a worker of its own, not interleaved;
- now: :mod:`bim_export.deploy.latency.stats` (the quietest rounds after re-measuring disturbed ones, every
  statistic the median across rounds of that round's value, the error with a floor and, on a busy
  machine, reaching down to the single-thread floor).

Per candidate: the spread of the p90 across repetitions ((max - min) / median), the median stated
error, and the share of repetition pairs whose p90 +- error intervals overlap (the claim: a second
measurement falls within the stated error). Per repetition: depth inversions at one precision (a
table contradicting itself) and the host profile's choice (before: lowest latency; now: with ties).

With ``--spinners N``, every second repetition runs while N processes spin on the CPU: the busy
machine of the shared host, on purpose, so that pairs of a quiet and a busy measurement are
compared too (5.00 ms in one export and 21.36 ms in the next was the complaint).

    python bench/latency_repeat.py                  # 6 repetitions as the machine is: latency_repeat.md
    python bench/latency_repeat.py --spinners 2     # half of them busy: latency_repeat_spinners.md
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from export_latency import cpu_flags  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def build_candidates(work: Path):
    """(depth, precision, file) of every candidate of the shipped checkpoint, and the checkpoint."""
    from bim_export.core.resources import default_checkpoint_dir
    from bim_export.deploy.candidates import Workshop, load_images
    from bim_export.model.checkpoint import load_checkpoint

    ckpt = load_checkpoint(default_checkpoint_dir())
    shop = Workshop(ckpt, load_images(None, ckpt.config), work)
    return [(d, p, shop.model(d, p, 17)) for d in ckpt.config["exits"] for p in ("fp32", "int8")], ckpt


def before(blocks: list[dict], rounds: int) -> dict:
    """The earlier protocol on the first ``rounds`` rounds: lowest median, pooled p90, range over lowest."""
    from bim_export.deploy.latency.stats import percentile

    first = blocks[:rounds]
    medians = [percentile(b["ms"], 50) for b in first]
    pooled = [x for b in first for x in b["ms"]]
    p50 = min(medians)
    return {"p50": p50, "p90": max(percentile(pooled, 90), p50), "error": (max(medians) - p50) / p50,
            "pooled_median": percentile(pooled, 50)}


def now(blocks: list[dict], rounds: int, floor_ms, cores: int) -> dict:
    from bim_export.deploy.latency.stats import summarize

    s = summarize(blocks, rounds, floor_ms, cores)
    return {"p50": s.values["p50"], "p90": s.values["p90"], "error": s.errors["p90"], "error_p50": s.errors["p50"],
            "disturbed": s.disturbed}


def choice(rows: list[dict], method: str, cands, ckpt) -> str:
    """The host profile's pick from one repetition's table."""
    from bim_export.deploy.candidates import exit_quality
    from bim_export.deploy.profiles import load_profile
    from bim_export.deploy.selector import Candidate, select

    table = []
    for (depth, precision, path), row in zip(cands, rows):
        m = row[method]
        table.append(Candidate(depth=depth, precision=precision, quality=exit_quality(ckpt.metrics, depth),
                               latency_ms=m["p90"], latency_stat="p90", latency_source="measured",
                               expected_error=m["error"] if method == "now" else None,
                               latency_disturbed=bool(m.get("disturbed")), size_mb=path.stat().st_size / 1e6,
                               memory_mb=1.0))
    c = select(table, load_profile("host")).choice
    return f"d{c.depth} {c.precision}"


def inversions(rows: list[dict], method: str, cands) -> int:
    from bim_export.deploy.latency.stats import depth_inversions

    err = "error" if method == "now" else None
    return len(depth_inversions([(d, p, r[method]["p90"], r[method][err] if err else 0.0)
                                 for (d, p, _), r in zip(cands, rows)]))


def summarize_reps(reps: list[list[dict]], cands) -> list[dict]:
    out = []
    for k, (depth, precision, _) in enumerate(cands):
        row = {"candidate": f"d{depth} {precision}"}
        for method in ("before", "now"):
            p90 = [rep[k][method]["p90"] for rep in reps]
            err = [rep[k][method]["error"] for rep in reps]
            pairs = list(itertools.combinations(range(len(reps)), 2))
            agree = sum(abs(p90[i] - p90[j]) <= err[i] * p90[i] + err[j] * p90[j] + 1e-12 for i, j in pairs)
            row[method] = {"p90_ms": p90, "p50_ms": [rep[k][method]["p50"] for rep in reps], "p90_error": err,
                           "p90_spread": (max(p90) - min(p90)) / statistics.median(p90),
                           "median_error": statistics.median(err), "pairs_within_error": agree / len(pairs),
                           "lowest_low_end_ms": min(p * (1 - e) for p, e in zip(p90, err))}
        row["disturbed_reps"] = sum(bool(rep[k]["now"]["disturbed"]) for rep in reps)
        pooled = [rep[k]["before"]["pooled_median"] for rep in reps]
        row["pooled_median_ms"] = statistics.median(pooled)
        out.append(row)
    return out


def render(result: dict) -> str:
    m = result["machine"]
    lines = [
        "# Host latency repeatability", "",
        f"Machine: {m['cpu']}, {m['logical_cores']} logical cores; CPU flags: {', '.join(result['cpu_flags'])}; "
        f"ONNX Runtime {m.get('onnxruntime')}; {result['threads']} threads. Load average (1 min) per repetition: "
        f"{', '.join(f'{v:.1f}' for v in result['load_average_per_rep'])}; processes spinning on the CPU per "
        f"repetition: {', '.join(map(str, result['spinners_per_rep']))}. Settings: {result['settings']}. "
        f"{result['reps']} repetitions, each a fresh worker timing all {len(result['rows'])} candidates interleaved; "
        f"total {result['seconds']:.0f} s.", "",
        "p90 spread = (max - min) / median of the p90 over the repetitions; error = median stated error of the "
        "p90; low = the lowest p90 x (1 - error) of any repetition (how far down the stated intervals reach: a "
        "quiet machine's figure should be above it); within = share of repetition pairs whose p90s lie within "
        "their stated errors of each other (|a - b| <= ea a + eb b). p50 / pooled = median over repetitions of "
        "p50 / (median of all samples of the rounds).", "",
        "| candidate | before: p90 ms (min-max) | spread | error | low | within | now: p90 ms (min-max) | spread "
        "| error | low | within | busy reps | p50 / pooled before, now |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        b, n = r["before"], r["now"]
        bias = [statistics.median(x["p50_ms"]) / r["pooled_median_ms"] for x in (b, n)]
        lines.append(
            f"| {r['candidate']} | {statistics.median(b['p90_ms']):.2f} ({min(b['p90_ms']):.2f}-{max(b['p90_ms']):.2f}) "
            f"| {b['p90_spread']:.0%} | ±{b['median_error']:.0%} | {b['lowest_low_end_ms']:.2f} "
            f"| {b['pairs_within_error']:.0%} "
            f"| {statistics.median(n['p90_ms']):.2f} ({min(n['p90_ms']):.2f}-{max(n['p90_ms']):.2f}) "
            f"| {n['p90_spread']:.0%} | ±{n['median_error']:.0%} | {n['lowest_low_end_ms']:.2f} "
            f"| {n['pairs_within_error']:.0%} | {r['disturbed_reps']}/{result['reps']} | {bias[0]:.2f}, {bias[1]:.2f} |")
    lines += ["", "Per repetition: choice for the host profile and depth inversions (a deeper model faster than a "
              "shallower one of the same precision; before: by the figures, now: beyond the errors).", "",
              "| rep | load | spinners | before: choice | inversions | now: choice | inversions |",
              "|---|---|---|---|---|---|---|"]
    for i, rep in enumerate(result["per_rep"]):
        lines.append(f"| {i + 1} | {result['load_average_per_rep'][i]:.1f} | {result['spinners_per_rep'][i]} | "
                     f"{rep['before']['choice']} | {rep['before']['inversions']} | {rep['now']['choice']} | "
                     f"{rep['now']['inversions']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=6)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="intra-op threads (host: every core)")
    p.add_argument("--spinners", type=int, default=0, help="processes spinning on the CPU in every second repetition")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")

    from bim_export.deploy.candidates import MEASURE
    from bim_export.deploy.latency.measure import _run_worker
    from bim_export.deploy.latency.stats import QUIET
    from bim_export.runtime.machine import machine_description

    t0 = time.perf_counter()
    reps, per_rep, loads, spun = [], [], [], []
    with tempfile.TemporaryDirectory(prefix="latency-repeat-") as work:
        cands, ckpt = build_candidates(Path(work))
        print(f"built {len(cands)} candidates ({time.perf_counter() - t0:.0f} s)", flush=True)
        settings = {**MEASURE, "max_rounds": MEASURE.get("max_rounds") or 2 * MEASURE["rounds"]}
        for i in range(args.reps):
            spin = args.spinners if i % 2 else 0
            spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(spin)]
            try:
                time.sleep(1.0 if spin else 0.0)
                loads.append(os.getloadavg()[0])
                # the request measure_many sends, kept whole here so both protocols see the same samples
                answer = _run_worker({"task": "sessions", "jobs": [{"path": str(f), "batch": 1} for _, _, f in cands],
                                      "providers": None, "threads": args.threads, "quiet": QUIET, "clock": "wall",
                                      **settings}, timeout=1800)
            finally:
                for proc in spinners:
                    proc.kill()
                    proc.wait()
            spun.append(spin)
            rows = [{"before": before(r["rounds"], settings["rounds"]),
                     "now": now(r["rounds"], settings["rounds"], r["floor_ms"], answer["cores"])}
                    for r in answer["results"]]
            reps.append(rows)
            per_rep.append({m: {"choice": choice(rows, m, cands, ckpt), "inversions": inversions(rows, m, cands)}
                            for m in ("before", "now")})
            print(f"rep {i + 1}: load {loads[-1]:.1f}, {spin} spinners; " + "  ".join(
                f"d{d} {pr}: {r['before']['p90']:.2f} / {r['now']['p90']:.2f} ±{r['now']['error']:.0%}"
                for (d, pr, _), r in zip(cands, rows)), flush=True)
    import onnxruntime

    result = {"machine": {**machine_description(), "onnxruntime": onnxruntime.__version__},
              "cpu_flags": cpu_flags(), "threads": args.threads, "settings": settings, "reps": args.reps,
              "load_average_per_rep": loads, "spinners_per_rep": spun, "seconds": time.perf_counter() - t0,
              "rows": summarize_reps(reps, cands), "per_rep": per_rep}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "latency_repeat_spinners" if args.spinners else "latency_repeat"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    text = render(result)
    (args.out / f"{stem}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
