"""The quality bench's runs: the labelled sets, one training + scoring run, saved activations,
step times, and a short training on the built-in real photos (also used by bench/train_memory.py).

``run_job`` runs in worker processes: everything it needs is here or imported lazily.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

MEAN = STD = (0.5, 0.5, 0.5)


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
        from bim_export.model.splits import stratified_indices

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


# ------------------------------------------------------------------------------ step times and scale


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
