"""The fine-tuning bench's runs: cached pretraining checkpoints, the labelled folders a fine-tuning
run reads, one fine-tuning run, and the kNN contrast.

Every function that runs in a worker process imports what it needs lazily.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from quality_runs import MEAN, STD, _data, model_settings

CACHE = Path(__file__).resolve().parent / ".cache" / "finetune"


# ------------------------------------------------------------------------------ pretraining


def start_settings(cfg: dict, start: str) -> tuple[str, int]:
    """(mode, depth) of a pretraining start: ``bim`` and ``none`` are the whole model with every exit
    (``none``: the same initialization, untrained), ``mae<d>`` end-to-end MAE of depth ``d``."""
    if start in ("bim", "none"):
        return "bim", cfg["model_args"]["depth"]
    return "e2e", int(start.removeprefix("mae"))


def cache_key(cfg: dict, set_name: str, start: str, seed: int) -> str:
    """The cache directory name of a start: everything the checkpoint depends on, hashed."""
    mode, depth = start_settings(cfg, start)
    what = {"settings": model_settings(cfg, mode, depth, {}), "steps": 0 if start == "none" else cfg["steps"],
            "batch_size": cfg["batch_size"], "lr": cfg["lr"], "warmup_steps": cfg["warmup_steps"],
            "eval_limit": cfg.get("eval_limit"), "mean": MEAN, "std": STD}
    digest = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:12]
    return f"{set_name}-{start}-seed{seed}-{digest}"


def pretrain_job(job: dict) -> dict:
    """The checkpoint of one start (``job``: set, folder, cfg, start, seed), trained on the set's
    reference part unless it is in the cache already; returns where it is and what it cost."""
    import torch

    from bim_export.model.architecture import BimConfig
    from bim_export.model.checkpoint import save_checkpoint
    from bim_export.train.config import TrainConfig
    from bim_export.train.model import BimModel
    from bim_export.train.run_state import config_json
    from bim_export.train.trainer import train

    cfg, start, seed = job["cfg"], job["start"], job["seed"]
    path = Path(job.get("cache", CACHE)) / cache_key(cfg, job["set"], start, seed)
    out = {"set": job["set"], "start": start, "seed": seed, "checkpoint": str(path)}
    record = path.with_name(path.name + ".json")  # what the pretraining cost, beside the checkpoint
    if (path / "config.json").exists() and record.exists():
        return {**out, "cached": True, **json.loads(record.read_text())}
    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    x, _, tr, _ = _data(job["folder"], cfg["model_args"]["img_size"], cfg.get("eval_limit"))
    mode, depth = start_settings(cfg, start)
    steps = cfg["steps"]
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tc = TrainConfig(out=tmp, **model_settings(cfg, mode, depth, {}), mean=MEAN, std=STD, steps=steps,
                     batch_size=cfg["batch_size"], lr=cfg["lr"], seed=seed, warmup_steps=cfg["warmup_steps"],
                     num_workers=0, progress=False, save_every=steps, log_every=10, save_train_state=False,
                     device="cpu")
    t0 = time.perf_counter()
    if start == "none":  # the trainer's own initialization (it seeds, then builds), saved untrained
        torch.manual_seed(seed)
        model = BimModel(BimConfig.from_settings(**model_settings(cfg, mode, depth, {})))
        save_checkpoint(tmp, model.state_dict(), config_json(model, tc, 0))
    else:
        train(tc, dataset=torch.utils.data.TensorDataset(torch.from_numpy(x[tr])))
    info = {"train_s": time.perf_counter() - t0, "steps": 0 if start == "none" else steps}
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    record.write_text(json.dumps(info) + "\n")
    return {**out, "cached": False, **info}


# ------------------------------------------------------------------------------ labelled folders


def _split_paths(folder: str, limit: int | None):
    """The set's image paths and labels in ``_data``'s order (the same seeded sample under a limit),
    with its reference and query indices."""
    import numpy as np

    from bim_export.model.images import scan_image_folder
    from bim_export.model.splits import stratified_indices

    images = scan_image_folder(folder, verify=False)
    idx = np.arange(len(images))
    if limit is not None and limit < len(idx):  # as load_image_array samples
        idx = np.sort(np.random.default_rng(0).choice(idx, size=limit, replace=False))
    paths = [images.paths[i] for i in idx]
    labels = np.asarray([images.labels[i] for i in idx])
    return paths, labels, *stratified_indices(labels)


def few_labels(labels, reference, per_class: int, seed: int):
    """A seeded draw of ``per_class`` reference images per class (indices into the set, sorted)."""
    import numpy as np

    rng = np.random.default_rng(1000 + seed)
    pick = [rng.choice(reference[labels[reference] == c], size=per_class, replace=False)
            for c in np.unique(labels[reference])]
    return np.sort(np.concatenate(pick))


def _link_folder(dest: Path, paths, labels, idx) -> str:
    """A class-folder copy (hard links where possible) of the images ``idx``."""
    for i in idx:
        src = Path(paths[i])
        d = dest / src.parent.name
        d.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, d / src.name)
        except OSError:
            shutil.copyfile(src, d / src.name)
    return str(dest)


def labelled_folders(root: Path, name: str, folder: str, cfg: dict) -> dict:
    """Under ``root``: the set's query part, its whole reference part, and per seed a draw of
    ``cfg["few"]`` reference images per class; {"query", "all", "few<seed>"} -> folder, plus the
    indices (into ``_data``'s arrays) of each labelled part."""
    paths, labels, tr, va = _split_paths(folder, cfg.get("eval_limit"))
    out = {"query": _link_folder(root / name / "query", paths, labels, va),
           "all": _link_folder(root / name / "all", paths, labels, tr), "index": {"all": tr.tolist()}}
    for seed in cfg["seeds"]:
        few = few_labels(labels, tr, cfg["few"], seed)
        out[f"few{seed}"] = _link_folder(root / name / f"few{seed}", paths, labels, few)
        out["index"][f"few{seed}"] = few.tolist()
    return out


# ------------------------------------------------------------------------------ one fine-tuning run


def finetune_job(job: dict) -> dict:
    """Fine-tunes one start (``job``: set, cfg, checkpoint, start, mode, labels, seed, data, query,
    folder) and scores it: the fine-tuned checkpoint's held-out top-1 per exit (the query part), its
    training time, and for a joint model per exit the top-1 and confidence of every query image
    (for the early-exit figures)."""
    import numpy as np
    import torch

    from bim_export.model.backbone import build_backbone
    from bim_export.train.finetune import finetune
    from bim_export.train.finetune_config import FinetuneConfig

    cfg = job["cfg"]
    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    budget = cfg["finetune_" + job["labels"]]
    budget = budget.get(job["set"], budget)  # per set, or the same for every set
    settings = dict(cfg["finetune"], **budget, mode=job["mode"], seed=job["seed"], device="cpu")
    out = {k: job[k] for k in ("set", "start", "mode", "labels", "seed")}
    with tempfile.TemporaryDirectory(prefix="bench-ft-") as tmp:
        t0 = time.perf_counter()
        path = finetune(job["checkpoint"], job["data"], Path(tmp) / "ft", val_data=job["query"],
                        config=FinetuneConfig(**settings))
        out["train_s"] = time.perf_counter() - t0
        metrics = json.loads((Path(path) / "metrics.json").read_text())
        out["task_top1"] = {d: m["task_top1"] for d, m in metrics["exits"].items() if "task_top1" in m}
        out["task_ece"] = {d: m.get("task_ece") for d, m in metrics["exits"].items() if "task_top1" in m}
        if job["mode"] != "joint":
            return out
        # a joint model's every query image's prediction per exit, from the fine-tuned backbones (the
        # bench's arrays), for the early-exit figures
        x, y, _, va = _data(job["folder"], cfg["model_args"]["img_size"], cfg.get("eval_limit"))
        out["query"] = {}
        for d in out["task_top1"]:
            model = build_backbone(path, int(d)).eval()
            with torch.inference_mode():
                probs = torch.cat([model(torch.from_numpy(x[va][s:s + 500])).softmax(-1)
                                   for s in range(0, len(va), 500)]).numpy()
            out["query"][d] = {"correct": (probs.argmax(1) == y[va]).astype(int).tolist(),
                               "confidence": np.round(probs.max(1), 5).tolist()}
    return out


def knn_job(job: dict) -> dict:
    """kNN top-1 (k = 20) of a pretrained start's exits on the query part, with each labelled part
    (``job["index"]``: name -> reference indices) as the labelled images."""
    import torch

    from bim_export.model.backbone import build_backbone
    from bim_export.model.checkpoint import load_checkpoint
    from bim_export.runtime.knn import knn_top1
    from bim_export.train.evaluate import extract_features

    cfg = job["cfg"]
    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    x, y, _, va = _data(job["folder"], cfg["model_args"]["img_size"], cfg.get("eval_limit"))
    ckpt = load_checkpoint(job["checkpoint"])
    out = {k: job[k] for k in ("set", "start", "seed")}
    out["knn"] = {}
    for d in ckpt.config["exits"]:
        model = build_backbone(ckpt, d)
        f = extract_features(model, x, batch_size=500)[d]
        out["knn"][str(d)] = {name: knn_top1(f[idx], y[idx], f[va], y[va]) for name, idx in job["index"].items()}
    return out
