"""A backbone's quality measured at a resolution: the figure metrics.json holds, at another input size.

metrics.json scores each exit at the checkpoint's own resolution: kNN top-1 of the pooled embedding
on a labelled evaluation set (a pretrained checkpoint), or top-1 of the exit's logits on the split it
held out (a fine-tuned one). A resolution changes the features, so a backbone at another resolution is
scored again, at that resolution, on the same images by the same protocol (:mod:`.splits`, the
kNN of :mod:`bim_export.runtime.knn`). Where the images are: ``--eval-data``, else the folder the
checkpoint records (training's ``eval_data``; fine-tuning's held-out split).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.errors import InputError
from ..runtime.knn import KNN_K, knn_loo_top1, knn_top1
from . import classifier
from .images import IMAGENET_MEAN, IMAGENET_STD, load_image_array
from .splits import EVAL_LIMIT, _subset, load_eval_data, task_data


@dataclass(frozen=True)
class Measured:
    """Every exit's top-1 at one resolution and what scored it.

    Attributes:
        resolution: the input size (px, square) it was measured at.
        top1: {exit depth: top-1 in [0, 1]}.
        metric: ``task_top1`` (fine-tuned) or ``knn_top1``.
        dataset: the set's ``name``, ``size`` and ``protocol`` (as metrics.json records them).
    """

    resolution: int
    top1: dict[int, float]
    metric: str
    dataset: dict


def recorded_eval_folder(ckpt) -> Path | None:
    """The labelled folder the checkpoint's quality was scored on, where it still exists: the
    folder a fine-tuned checkpoint held images out of, else training's ``eval_data`` (a relative
    path of the checkpoint that ships is read inside the package)."""
    from ..core.atomic import is_shipped
    from ..core.resources import heldout_images_dir

    info = classifier.finetune_info(ckpt.config)
    if info is not None:
        split = info.get("split") or {}
        folder = split.get("val_data") or split.get("data")
    else:
        folder = (ckpt.config.get("train") or {}).get("eval_data")
    if not folder:
        return None
    path = Path(folder)
    if path.is_dir():
        return path
    if is_shipped(ckpt.path) and path.name == heldout_images_dir().name:
        return heldout_images_dir()
    return None


def eval_folder(ckpt, eval_data: Path | None, why: str) -> Path:
    """``eval_data``, else :func:`recorded_eval_folder`.

    Raises:
        InputError: neither is there (``why`` says what needed the images).
    """
    if eval_data is not None:
        return Path(eval_data)
    folder = recorded_eval_folder(ckpt)
    if folder is None:
        raise InputError(f"{ckpt.path}: {why} needs its labelled evaluation images, and the checkpoint records "
                         "no folder that exists; pass --eval-data DIR")
    return folder


def measure_quality(ckpt, resolution: int, folder: Path) -> Measured:
    """Every exit of ``ckpt`` scored at ``resolution`` on the labelled ``folder``: task top-1 on its
    held-out images for a fine-tuned checkpoint (every image of another folder), else kNN top-1 of the
    embedding by the evaluation protocol of :func:`~bim_export.model.splits.load_eval_data`.

    Raises:
        InputError: the folder is missing, unlabelled, or (fine-tuned) holds classes that are not labels.
    """
    from .backbone import build_backbone

    cfg = ckpt.config
    mean, std = cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD)
    finetuned = classifier.finetune_info(cfg) is not None
    data = task_data(ckpt, folder) if finetuned else load_eval_data(folder)
    models = {d: build_backbone(ckpt, d, resolution) for d in ckpt.exits}
    if finetuned:
        x, y = load_image_array(_subset(data.images, data.val_idx), resolution, mean, std)
        top1 = {d: float((_logits(m, x).argmax(1) == y).mean()) for d, m in models.items()}
        return Measured(resolution, top1, "task_top1",
                        {"name": data.name, "size": len(y), "protocol": data.protocol})
    if data.leave_one_out:
        x, y = load_image_array(data.images, resolution, mean, std)
        top1 = {d: knn_loo_top1(_embedding(m, x), y, k=KNN_K) for d, m in models.items()}
        return Measured(resolution, top1, "knn_top1", {"name": data.name, "size": len(y), "protocol": data.protocol})
    xtr, ytr = load_image_array(_subset(data.images, data.train_idx), resolution, mean, std, limit=EVAL_LIMIT)
    xva, yva = load_image_array(_subset(data.images, data.val_idx), resolution, mean, std, limit=EVAL_LIMIT)
    top1 = {d: knn_top1(_embedding(m, xtr), ytr, _embedding(m, xva), yva, k=KNN_K) for d, m in models.items()}
    return Measured(resolution, top1, "knn_top1",
                    {"name": data.name, "size": len(ytr) + len(yva), "protocol": data.protocol})


def _embedding(model, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    # x: [N, 3, H, W] -> the backbone's pooled embedding [N, D]
    import torch

    with torch.inference_mode():
        return np.concatenate([model.forward_head(model.forward_features(torch.as_tensor(x[s:s + batch_size])),
                                                  pre_logits=True).float().numpy()
                               for s in range(0, len(x), batch_size)])


def _logits(model, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    # x: [N, 3, H, W] -> a classifier's logits [N, C]
    import torch

    with torch.inference_mode():
        return np.concatenate([model(torch.as_tensor(x[s:s + batch_size])).float().numpy()
                               for s in range(0, len(x), batch_size)])
