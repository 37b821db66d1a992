"""Repeatability of host latency: the same files measured again and again, as an export measures them.

The candidates of the shipped checkpoint (each exit x fp32 / int8) are built once, then measured
``--reps`` times, each time in a fresh worker, all candidates interleaved, with the export's settings
(``candidates.MEASURE``). From the very same samples, two error rules:

- before: every statistic the median across rounds of that round's value, its error the relative
  range of the round values ((max - min) / median), at least 10 %;
- now: :func:`bim_export.deploy.latency.stats.summarize` as it stands.

On a busy machine both widen the error of a disturbed figure down to the single-thread floor.

Reported, per rule, for the p50 and the p90 (and the p99, which decides nothing on the host):
the stated errors (median, 90th percentile, largest) and the share of repetition pairs that lie
within each other's stated errors (|a - b| <= ea a + eb b, as the selector's ties), over the quiet
repetitions (other processes used less than half the cores, no spinners, figure not marked busy), over every figure not marked busy whatever the load, and over all; and the level shift
between processes beyond what the rounds explain (what ``stats.LEVEL_SHIFT`` stands for). Per
candidate: the figures' spread over the repetitions. Per repetition: depth inversions and the host
profile's choice.

With ``--spinners N``, every second repetition runs while N processes spin on the CPU (a busy
machine on purpose: pairs of a quiet and a busy measurement are compared too). Every raw sample is
kept in the JSON, so ``--from FILE`` re-scores a run with the current rule without measuring.

    python bench/latency_repeat.py                     # 8 repetitions as the machine is: latency_repeat.md
    python bench/latency_repeat.py --spinners 2        # half of them busy: latency_repeat_spinners.md
    python bench/latency_repeat.py --from bench/results/latency_repeat.json --stem latency_repeat_rescored
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
from results_io import write_results  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
STATS = ("p50", "p90", "p99")
PREVIOUS_MIN_ERROR = 0.10


def build_candidates(work: Path):
    """(depth, precision, file) of every candidate of the shipped checkpoint, and the checkpoint."""
    from bim_export.core.resources import default_checkpoint_dir
    from bim_export.deploy.candidates import Workshop, load_images
    from bim_export.deploy.profiles import load_profile
    from bim_export.model.checkpoint import load_checkpoint

    ckpt = load_checkpoint(default_checkpoint_dir())
    shop = Workshop(ckpt, load_images(None, ckpt.config), work)
    host = load_profile("host")
    return [(d, p, shop.model(d, p, host)) for d in ckpt.config["exits"] for p in ("fp32", "int8")], ckpt


def before(blocks: list[dict], rounds: int, floor_ms, cores: int, threads: int) -> dict:
    """The previous rule: the relative range of the round values, at least 10 % (same rounds, same values)."""
    from bim_export.deploy.latency.stats import round_stats, summarize

    s = summarize(blocks, rounds, floor_ms, cores, threads)
    order = sorted(range(len(blocks)), key=lambda i: (blocks[i].get("score") or 0.0, i))
    per_round = [round_stats(blocks[i]["ms"]) for i in sorted(order[:rounds])]  # the `rounds` quietest, as then
    out = {"disturbed": s.disturbed}
    for name in STATS:
        xs = [r[name] for r in per_round]
        value = statistics.median(xs)
        error = max(PREVIOUS_MIN_ERROR, (max(xs) - min(xs)) / value)
        if s.disturbed and floor_ms is not None and value > floor_ms:
            error = max(PREVIOUS_MIN_ERROR, 1.0 - floor_ms * (1 - PREVIOUS_MIN_ERROR) / value)
        out[name], out[f"{name}_error"] = value, error
    out["p90"], out["p99"] = max(out["p90"], out["p50"]), max(out["p99"], out["p90"], out["p50"])
    return out


def now(blocks: list[dict], rounds: int, floor_ms, cores: int, threads: int) -> dict:
    from bim_export.deploy.latency.stats import summarize

    s = summarize(blocks, rounds, floor_ms, cores, threads)
    return {"disturbed": s.disturbed, **{k: s.values[k] for k in STATS},
            **{f"{k}_error": s.errors[k] for k in STATS}}


RULES = {"before": before, "now": now}


def choice(rows: list[dict], rule: str, cands, ckpt) -> str:
    """The host profile's pick from one repetition's table."""
    from bim_export.model.checkpoint import exit_quality
    from bim_export.deploy.profiles import load_profile
    from bim_export.deploy.selector import Candidate, select

    table = []
    for (depth, precision, size_mb), row in zip(cands, rows):
        m = row[rule]
        table.append(Candidate(depth=depth, precision=precision, quality=exit_quality(ckpt.metrics, depth),
                               latency_ms=m["p90"], latency_stat="p90", latency_source="measured",
                               expected_error=m["p90_error"], latency_disturbed=bool(m["disturbed"]),
                               size_mb=size_mb, memory_mb=1.0))
    c = select(table, load_profile("host")).choice
    return f"d{c.depth} {c.precision}"


def inversions(rows: list[dict], rule: str, cands) -> int:
    from bim_export.deploy.latency.stats import depth_inversions

    return len(depth_inversions([(d, p, r[rule]["p90"], r[rule]["p90_error"]) for (d, p, _), r in zip(cands, rows)]))


def within(values: list[float], errors: list[float]) -> tuple[int, int]:
    """(pairs within each other's stated errors, pairs)."""
    pairs = list(itertools.combinations(range(len(values)), 2))
    ok = sum(abs(values[i] - values[j]) <= errors[i] * values[i] + errors[j] * values[j] + 1e-12 for i, j in pairs)
    return ok, len(pairs)


def level_shift(reps: list[list[dict]], rule: str, stat: str, keep: list[list[int]]) -> dict:
    """How far the figures of one file move between worker processes (the relative standard
    deviation over repetitions, root mean square over candidates), how much of that the stated
    errors' rounds explain (their standard error, root mean square), and the rest: the level shift
    between processes that ``stats.LEVEL_SHIFT`` stands for. Only for the current rule (its
    standard error is its stated error over Z, less the level shift, in quadrature)."""
    import math

    from bim_export.deploy.latency.stats import LEVEL_SHIFT, Z

    if rule != "now":
        return {}
    between, within = [], []
    for k, idx in enumerate(keep):
        rows = [reps[i][k][rule] for i in idx if not reps[i][k][rule]["disturbed"]]
        if len(rows) < 3:
            continue
        between.append(statistics.variance([math.log(r[stat]) for r in rows]))
        within += [max(0.0, (r[f"{stat}_error"] / Z) ** 2 - LEVEL_SHIFT ** 2) for r in rows]
    if not between:
        return {}
    b, w = math.sqrt(statistics.mean(between)), math.sqrt(statistics.mean(within))
    return {"between_processes_sd": b, "rounds_se": w, "level_shift": math.sqrt(max(0.0, b * b - w * w))}


def _dist(xs: list[float]) -> dict:
    if not xs:
        return {"n": 0}
    xs = sorted(xs)
    return {"n": len(xs), "median": statistics.median(xs), "p90": xs[min(len(xs) - 1, int(0.9 * len(xs)))],
            "max": xs[-1]}


def rescore(result: dict, ckpt=None) -> dict:
    cores, threads, rounds = result["machine"]["logical_cores"], result["threads"], result["settings"]["rounds"]
    cands = [(c["depth"], c["precision"], c["size_mb"]) for c in result["candidates"]]
    reps = [[{rule: fn(r["rounds"], rounds, r["floor_ms"], cores, threads) for rule, fn in RULES.items()}
             for r in rep] for rep in result["raw"]]
    others = [others_cores(rep) for rep in result["raw"]]
    quiet_rep = [o is not None and o < cores / 2 and not spin for o, spin in zip(others, result["spinners_per_rep"])]

    def kept(scope: str, rule: str, k: int) -> list[int]:
        """The repetitions of candidate k in ``scope``."""
        return [i for i, rep in enumerate(reps) if scope == "all"
                or ((quiet_rep[i] or scope == "undisturbed") and not rep[k][rule]["disturbed"])]

    rows, summary = [], {}
    for rule in RULES:
        summary[rule] = {}
        for scope in ("quiet", "undisturbed", "all"):
            s = summary[rule][scope] = {}
            keep = [kept(scope, rule, k) for k in range(len(cands))]
            for stat in STATS:
                ok = total = 0
                errs = []
                for k, idx in enumerate(keep):
                    values, errors = [reps[i][k][rule][stat] for i in idx], [reps[i][k][rule][f"{stat}_error"] for i in idx]
                    a, b = within(values, errors)
                    ok, total, errs = ok + a, total + b, errs + errors
                s[stat] = {"error": _dist(errs), "pairs": total, "pairs_within": ok / total if total else None,
                           **level_shift(reps, rule, stat, keep)}
    for k, (depth, precision, _) in enumerate(cands):
        row = {"candidate": f"d{depth} {precision}", "busy_reps": sum(bool(rep[k]["now"]["disturbed"]) for rep in reps)}
        for rule in RULES:
            row[rule] = {}
            for stat in STATS:
                v = [rep[k][rule][stat] for rep in reps]
                e = [rep[k][rule][f"{stat}_error"] for rep in reps]
                a, b = within(v, e)
                row[rule][stat] = {"ms": v, "error": e, "spread": (max(v) - min(v)) / statistics.median(v),
                                   "median_error": statistics.median(e), "pairs_within": a / b if b else None}
        rows.append(row)
    per_rep = []
    if ckpt is not None:
        per_rep = [{rule: {"choice": choice(rep, rule, cands, ckpt), "inversions": inversions(rep, rule, cands)}
                    for rule in RULES} for rep in reps]
    return {"rows": rows, "summary": summary, "per_rep": per_rep, "quiet_reps": sum(quiet_rep),
            "others_cores_per_rep": others}


def others_cores(rep: list[dict]) -> float | None:
    """The median CPU other processes used (in cores) over every block of a repetition: the load of
    the machine without the measurement's own threads (which the load average counts)."""
    xs = [b["others"] for r in rep for b in r["rounds"] if b.get("others") is not None]
    return statistics.median(xs) if xs else None


def render(result: dict) -> str:
    m, sc = result["machine"], result["scored"]
    loads = "; ".join(f"{a:.1f} -> {b:.1f}" for a, b in result["load_average_per_rep"])
    others = ", ".join("-" if o is None else f"{o:.2f}" for o in sc["others_cores_per_rep"])
    lines = [
        "# Host latency repeatability", "",
        f"Machine: {m['cpu']}, {m['logical_cores']} logical cores; CPU flags: {', '.join(result['cpu_flags'])}; "
        f"ONNX Runtime {m.get('onnxruntime')}; {result['threads']} threads. Load average (1 min) before -> after "
        f"each repetition (it counts the measurement's own {result['threads']} threads): {loads}; CPU other "
        f"processes used during each repetition (median over its blocks, in cores): {others}; processes spinning "
        f"on the CPU per repetition: {', '.join(map(str, result['spinners_per_rep']))}. Settings: "
        f"{result['settings']}. {result['reps']} repetitions ({sc['quiet_reps']} quiet: other processes used less "
        f"than {m['logical_cores'] / 2:g} cores, no spinners), each a fresh worker timing all {len(result['candidates'])} candidates interleaved; total "
        f"{result['seconds']:.0f} s.", "",
        "Stated errors (median / 90th percentile / largest over every candidate and repetition) and the share of "
        "repetition pairs within each other's stated errors (|a - b| <= ea a + eb b), per candidate, pooled. "
        "Quiet: quiet repetitions whose figure is not marked busy; undisturbed: every figure not marked busy, "
        "whatever the load average. Before: the relative range of the round "
        "values, at least 10 %; now: the current rule, on the same samples. Targets on a quiet machine: p50 "
        "error <= 10 %, p90 <= 20 %, pairs within >= 95 %.", "",
        "| rule | scope | stat | error median | error p90 | error max | pairs | within |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for rule, scopes in sc["summary"].items():
        for scope, stats in scopes.items():
            for stat, s in stats.items():
                e = s["error"]
                if not e["n"]:
                    lines.append(f"| {rule} | {scope} | {stat} | - | - | - | 0 | - |")
                    continue
                within_text = "-" if s["pairs_within"] is None else f"{s['pairs_within']:.0%}"
                lines.append(f"| {rule} | {scope} | {stat} | ±{e['median']:.0%} | ±{e['p90']:.0%} | ±{e['max']:.0%} "
                             f"| {s['pairs']} | {within_text} |")
    shifts = [f"{stat} {s['level_shift']:.1%} (between processes {s['between_processes_sd']:.1%}, rounds' standard "
              f"error {s['rounds_se']:.1%})" for stat, s in sc["summary"]["now"]["quiet"].items() if "level_shift" in s]
    from bim_export.deploy.latency.stats import LEVEL_SHIFT

    lines += ["", f"Level shift between processes beyond what the rounds explain, quiet repetitions (relative standard "
              f"deviation; stats.LEVEL_SHIFT = {LEVEL_SHIFT:.0%}): " + ("; ".join(shifts) or "too few quiet repetitions")
              + "."]
    lines += ["", "Per candidate, all repetitions: median figure (min-max), spread = (max - min) / median, median "
              "stated error, pairs within.", "",
              "| candidate | busy reps | p50 ms | spread | before: error, within | now: error, within | p90 ms | spread "
              "| before: error, within | now: error, within |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sc["rows"]:
        cells = [r["candidate"], f"{r['busy_reps']}/{result['reps']}"]
        for stat in ("p50", "p90"):
            n = r["now"][stat]
            cells += [f"{statistics.median(n['ms']):.2f} ({min(n['ms']):.2f}-{max(n['ms']):.2f})", f"{n['spread']:.0%}"]
            cells += [f"±{r[rule][stat]['median_error']:.0%}, {r[rule][stat]['pairs_within']:.0%}" for rule in RULES]
        lines.append("| " + " | ".join(cells) + " |")
    if sc["per_rep"]:
        lines += ["", "Per repetition: the host profile's choice and depth inversions beyond the p90 errors.", "",
                  "| rep | load | spinners | before: choice | inversions | now: choice | inversions |",
                  "|---|---|---|---|---|---|---|"]
        for i, rep in enumerate(sc["per_rep"]):
            lines.append(f"| {i + 1} | {result['load_average_per_rep'][i][0]:.1f} | {result['spinners_per_rep'][i]} | "
                         f"{rep['before']['choice']} | {rep['before']['inversions']} | {rep['now']['choice']} | "
                         f"{rep['now']['inversions']} |")
    return "\n".join(lines) + "\n"


def _compact(block: dict) -> dict:
    """A block with its samples to the microsecond (the JSON keeps every one)."""
    return {**block, "ms": [round(x, 3) for x in block["ms"]],
            **{k: None if block[k] is None else round(block[k], 4) for k in ("wait", "others", "score")}}


def measure(args) -> dict:
    from bim_export.deploy.candidates import MEASURE
    from bim_export.deploy.latency.measure import PROCESSES, time_sessions
    from bim_export.deploy.latency.stats import QUIET
    from bim_export.runtime.machine import machine_description

    t0 = time.perf_counter()
    raw, loads, spun = [], [], []
    settings = {**MEASURE, "max_rounds": MEASURE.get("max_rounds") or 2 * MEASURE["rounds"]}
    with tempfile.TemporaryDirectory(prefix="latency-repeat-") as work:
        cands, ckpt = build_candidates(Path(work))
        print(f"built {len(cands)} candidates ({time.perf_counter() - t0:.0f} s)", flush=True)
        for i in range(args.reps):
            spin = args.spinners if i % 2 else 0
            spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(spin)]
            try:
                time.sleep(1.0 if spin else 0.0)
                # the request measure_many sends, kept whole here so both rules see the same samples
                answer = time_sessions({"task": "sessions", "jobs": [{"path": str(f), "batch": 1} for _, _, f in cands],
                                      "providers": None, "threads": args.threads, "quiet": QUIET, "clock": "wall",
                                      **settings}, PROCESSES, timeout=1800)
            finally:
                for proc in spinners:
                    proc.kill()
                    proc.wait()
            spun.append(spin)
            loads.append(answer["load_average"])
            raw.append([{"rounds": [_compact(b) for b in r["rounds"]], "floor_ms": r["floor_ms"],
                         "peak_memory_mb": r["peak_memory_mb"]} for r in answer["results"]])
            print(f"rep {i + 1}/{args.reps}: load {loads[-1][0]:.1f} -> {loads[-1][1]:.1f}, {spin} spinners", flush=True)
        import onnxruntime

        result = {"machine": {**machine_description(), "onnxruntime": onnxruntime.__version__},
                  "cpu_flags": cpu_flags(), "threads": args.threads, "settings": {**settings, "processes": PROCESSES}, "reps": args.reps,
                  "load_average_per_rep": loads, "spinners_per_rep": spun, "seconds": time.perf_counter() - t0,
                  "candidates": [{"depth": d, "precision": p, "size_mb": f.stat().st_size / 1e6} for d, p, f in cands],
                  "raw": raw}
    return result, ckpt


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=8)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="intra-op threads (host: every core)")
    p.add_argument("--spinners", type=int, default=0, help="processes spinning on the CPU in every second repetition")
    p.add_argument("--from", dest="source", type=Path, help="re-score the raw samples of an earlier run's JSON")
    p.add_argument("--stem", help="results file name (default: latency_repeat, or latency_repeat_spinners)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")

    from bim_export.model.checkpoint import load_checkpoint
    from bim_export.core.resources import default_checkpoint_dir

    if args.source:
        result = json.loads(args.source.read_text())
        result.pop("scored", None)
        ckpt = load_checkpoint(default_checkpoint_dir())
    else:
        result, ckpt = measure(args)
    result["scored"] = rescore(result, ckpt)
    stem = args.stem or ("latency_repeat_spinners" if args.spinners else "latency_repeat")
    write_results(args.out, stem, result, render)
    return 0


if __name__ == "__main__":
    sys.exit(main())
