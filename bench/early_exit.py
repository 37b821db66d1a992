"""Early exit on a joint fine-tuned checkpoint: the cascade's accuracy and mean host latency against
the deepest exit's, on a labelled query folder.

    python bench/early_exit.py --checkpoint runs/mnist-ft --query QUERY_DIR [--eval-data DIR] [--loss 0.5]

The thresholds are fitted as ``bim-export --early-exit`` fits them: on the checkpoint's held-out split
(or ``--eval-data``), for at most ``--loss`` points of accuracy below the deepest exit, with each
segment's measured time as its cost. The figures are then measured on the query folder (class
sub-folders named as the checkpoint's labels), which the fit never saw.

Latency, two ways, both on this machine at batch 1:
- graphs: every segment and every fixed-depth graph (fp32, opset 17, dynamic batch) timed together by
  bim_export.deploy.latency.measure (separate processes, fixed threads, interleaved rounds, the median
  across rounds); the cascade's mean is, over the query images, the segments each one ran, summed;
- end to end: the device runtime's cascade (one session call per segment, numpy in between) and the
  deepest graph, one image at a time over the query images, interleaved rounds in this process.

Target: within 0.5 point of the deepest exit's accuracy at <= 0.70x its mean host latency.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import write_results  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_POINTS, TARGET_RATIO = 0.5, 0.70


def end_to_end_ms(cascade, deepest, x: np.ndarray, rounds: int) -> tuple[float, float]:
    """Mean per-image wall time of the cascade and of the deepest graph, one image at a time; the
    median over ``rounds`` interleaved rounds."""
    name = deepest.get_inputs()[0].name
    cascade(x[:2], 1)  # warm-up
    deepest.run(None, {name: x[:1]})
    ours, theirs = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for i in range(len(x)):
            cascade(x[i:i + 1], 1)
        ours.append((time.perf_counter() - t0) * 1e3 / len(x))
        t0 = time.perf_counter()
        for i in range(len(x)):
            deepest.run(None, {name: x[i:i + 1]})
        theirs.append((time.perf_counter() - t0) * 1e3 / len(x))
    return float(np.median(ours)), float(np.median(theirs))


def run(checkpoint: Path, query: Path, eval_data: Path | None, loss: float, timed_images: int, rounds: int,
        threads: int | None) -> dict:
    import torch

    from bim_export.deploy.early_exit import check_joint, export_segments, heldout_images, host_latency
    from bim_export.deploy.export import export_onnx
    from bim_export.deploy.thresholds import fit_thresholds
    from bim_export.model.backbone import build_backbone
    from bim_export.model.checkpoint import load_checkpoint
    from bim_export.runtime.early_exit import Cascade, confidence, exit_index
    from bim_export.runtime.machine import machine_description
    from bim_export.runtime.session import make_session

    torch.set_num_threads(threads or os.cpu_count() or 1)
    start = time.time()
    ckpt = load_checkpoint(checkpoint)
    check_joint(ckpt)
    exits, size = list(ckpt.exits), ckpt.config["img_size"]
    held, asked = heldout_images(ckpt, eval_data), heldout_images(ckpt, query)
    backbones = {d: build_backbone(ckpt, d) for d in exits}
    with tempfile.TemporaryDirectory() as tmp:
        graphs = export_segments(backbones.get, exits, Path(tmp), opset=17, img_size=size)
        fixed = [export_onnx(backbones[d], Path(tmp) / f"depth_{d}.onnx", opset=17, img_size=size) for d in exits]
        lat = host_latency([g.path for g in graphs] + fixed, 1, threads)
        seg_ms, fixed_ms = [r.mean for r in lat[:len(exits)]], [r.mean for r in lat[len(exits):]]
        cascade = Cascade([g.path for g in graphs], exits, [None] * len(exits), threads=threads)
        fit = fit_thresholds([o["logits"] for o in cascade.run_all(held.x, 64)], held.y, seg_ms, loss / 100)
        logits = [o["logits"] for o in cascade.run_all(asked.x, 64)]
        idx = exit_index(np.stack([confidence(z) for z in logits]), fit.thresholds)
        correct = np.stack([z.argmax(1) == asked.y for z in logits])
        acc = float(correct[idx, np.arange(len(idx))].mean())
        fixed_acc = [float(c.mean()) for c in correct]
        cascade.thresholds = [np.inf if t is None else t for t in fit.thresholds]
        n = min(timed_images, len(asked.x))
        e2e = end_to_end_ms(cascade, make_session(fixed[-1], ["CPUExecutionProvider"], threads), asked.x[:n], rounds)
    cascade_ms = float(np.cumsum(seg_ms)[idx].mean())
    drop = (fixed_acc[-1] - acc) * 100
    ratio = cascade_ms / fixed_ms[-1]
    return {
        "checkpoint": str(checkpoint), "exits": exits, "labels": len(ckpt.config["finetune"]["labels"]),
        "fit": {**fit.to_dict(), "held_out": held.source, "accuracy_loss_points": loss, "costs_ms": seg_ms},
        "query": asked.source,
        "accuracy": {"cascade": acc, "fixed": dict(zip(map(str, exits), fixed_acc)), "drop_points": drop},
        "exit_distribution": {str(d): float(np.mean(idx == i)) for i, d in enumerate(exits)},
        "latency": {"segments_ms": seg_ms, "fixed_ms": dict(zip(map(str, exits), fixed_ms)),
                    "cascade_ms": cascade_ms, "ratio": ratio,
                    "disturbed": [Path(r.model).stem for r in lat if r.disturbed],
                    "settings": lat[0].settings,
                    "end_to_end": {"cascade_ms": e2e[0], "deepest_ms": e2e[1], "ratio": e2e[0] / e2e[1],
                                   "images": n, "rounds": rounds}},
        "target": {"points": TARGET_POINTS, "ratio": TARGET_RATIO,
                   "met": bool(drop <= TARGET_POINTS + 1e-9 and ratio <= TARGET_RATIO),
                   "accuracy_met": bool(drop <= TARGET_POINTS + 1e-9), "latency_met": bool(ratio <= TARGET_RATIO)},
        "machine": machine_description(), "threads": threads or os.cpu_count(), "load_average": list(os.getloadavg()),
        "wall_s": time.time() - start,
    }


def markdown(r: dict) -> str:
    exits, acc, lat, tgt = r["exits"], r["accuracy"], r["latency"], r["target"]
    m, e2e = r["machine"], lat["end_to_end"]
    thresholds = " / ".join("never" if t is None else f"{t:.3f}" for t in r["fit"]["thresholds"][:-1])
    lines = ["# Early exit", "",
             f"Checkpoint `{Path(r['checkpoint']).name}` (exits {', '.join(map(str, exits))}, {r['labels']} classes). "
             f"Thresholds ({thresholds}) fitted on {r['fit']['held_out']['name']} ({r['fit']['held_out']['size']} images, "
             f"{r['fit']['held_out']['protocol']}) for at most {r['fit']['accuracy_loss_points']} point below the "
             f"deepest exit; measured on the query set {r['query']['name']} ({r['query']['size']} images).", "",
             "| model | query top-1 | mean latency, graphs (ms) | images leaving at each exit |", "|---|---|---|---|",
             f"| early exit | {acc['cascade']:.2%} | {lat['cascade_ms']:.2f} | "
             + ", ".join(f"{d}: {r['exit_distribution'][str(d)]:.0%}" for d in exits) + " |"]
    lines += [f"| depth {d} | {acc['fixed'][str(d)]:.2%} | {lat['fixed_ms'][str(d)]:.2f} | |" for d in exits]
    lines += ["",
              f"Cascade against the deepest exit: {acc['drop_points']:+.2f} points of accuracy lost (target <= "
              f"{tgt['points']}: {'met' if tgt['accuracy_met'] else 'missed'}), latency {lat['ratio']:.2f}x (target <= "
              f"{tgt['ratio']:.2f}x: {'met' if tgt['latency_met'] else 'missed by ' + format(lat['ratio'] - tgt['ratio'], '.2f') + 'x'}). "
              f"End to end (the runtime's cascade, one image at a time, {e2e['images']} images, median of "
              f"{e2e['rounds']} interleaved rounds): {e2e['cascade_ms']:.2f} ms vs {e2e['deepest_ms']:.2f} ms, "
              f"{e2e['ratio']:.2f}x.", "",
              f"Machine: {m.get('cpu')}, {m.get('logical_cores')} logical cores, {r['threads']} threads; CPU flags: "
              f"{' '.join(m.get('cpu_flags') or []) or 'none listed'}; load average "
              f"{', '.join(f'{v:.2f}' for v in r['load_average'])}"
              + (f"; disturbed timings: {len(lat['disturbed'])}" if lat["disturbed"] else "") + ".", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, required=True, help="a joint fine-tuned checkpoint")
    ap.add_argument("--query", type=Path, required=True, help="labelled folder the figures are measured on")
    ap.add_argument("--eval-data", type=Path, default=None,
                    help="labelled folder to fit the thresholds on (default: the checkpoint's held-out split)")
    ap.add_argument("--loss", type=float, default=TARGET_POINTS, help="accuracy points the fit may lose (default 0.5)")
    ap.add_argument("--timed-images", type=int, default=200, help="query images the end-to-end timing runs")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--stem", default="early_exit")
    args = ap.parse_args(argv)
    report = run(args.checkpoint, args.query, args.eval_data, args.loss, args.timed_images, args.rounds, args.threads)
    write_results(args.out, args.stem, report, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
