"""Quality of every exit: kNN top-1 and linear-probe top-1 on pooled features of a labelled folder.

Features come from the model's exit API (:meth:`BimModel.forward_intermediates`, pooled as each
backbone pools) or from a timm backbone; the kNN is :mod:`bim_export.runtime.knn`, the linear probe
:mod:`bim_export.train.probe`, and which images are reference and query is
:mod:`bim_export.model.splits`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from ..core.errors import InputError
from ..core.table import format_table
from ..model.images import IMAGENET_MEAN, IMAGENET_STD, ImageList, load_image_array
from ..model.splits import EVAL_LIMIT, PROBE_FOLDS, EvalData, _subset, load_eval_data, make_eval_data, task_data
from ..runtime.knn import KNN_K, knn_loo_top1, knn_top1
from .probe import linear_probe_kfold_top1, linear_probe_top1

log = logging.getLogger(__name__)

RECON_SEED = 0  # the masks of the evaluation's reconstruction loss: the same on every run


# ------------------------------------------------------------------------------ features


def _is_timm_vit(model) -> bool:
    return hasattr(model, "forward_features") and hasattr(model, "forward_head") and hasattr(model, "blocks")


def exit_depths(model) -> list[int]:
    """The exit depths a model's features come from: a BIM model's exits, a backbone's depth."""
    from .model import BimModel

    if isinstance(model, BimModel):
        return [int(e) for e in model.exits]
    if _is_timm_vit(model):
        return [len(model.blocks)]
    raise TypeError(f"cannot extract features from {type(model).__name__}: "
                    "expected a BIM model or a timm VisionTransformer")


def _exit_embeddings(model, x) -> list:
    # x: [B, 3, H, W] -> one pooled embedding [B, D] per exit, pooled as each backbone pools
    from .model import BimModel

    if isinstance(model, BimModel):
        return [model.pool_exit(t) for t in model.forward_intermediates(x)]
    return [model.forward_head(model.forward_features(x), pre_logits=True)]


def extract_features(model, x, batch_size: int = 256, device=None) -> dict[int, np.ndarray]:
    """Pooled features of every exit, in eval mode, no masking.

    Args:
        model: a BIM model (its exits' normed tokens, pooled as each backbone pools) or a timm
            VisionTransformer backbone (its ``forward_head(pre_logits=True)`` embedding).
        x: preprocessed images, float32 [N, 3, H, W] (numpy or torch).
        batch_size: images per forward pass.
        device: where to run (default: where the model's parameters are).

    Returns:
        {exit depth: float32 [N, D]}.
    """
    import torch

    depths = exit_depths(model)
    if device is None:
        device = next(model.parameters()).device
    x = torch.as_tensor(x)
    was_training = model.training
    model.eval()
    feats: dict[int, list[np.ndarray]] = {d: [] for d in depths}
    try:
        with torch.inference_mode():
            for s in range(0, len(x), batch_size):
                xb = x[s:s + batch_size].to(device=device, dtype=torch.float32)
                for d, p in zip(depths, _exit_embeddings(model, xb)):
                    feats[d].append(p.float().cpu().numpy())
    finally:
        model.train(was_training)
    return {d: np.concatenate(f) for d, f in feats.items()}


def reconstruction_losses(model, x, batch_size: int = 256, seed: int = RECON_SEED) -> dict[int, float]:
    """Masked-patch reconstruction loss of every decoded exit of a BIM model on images ``x``.

    The training objective (mean squared error over the masked patches, at the model's mask ratio),
    in eval mode, with masks drawn from a generator seeded with ``seed``: the same images give the
    same figure on every run and machine, and two checkpoints are compared on the same masks.

    Args:
        model: a :class:`~bim_export.train.model.BimModel`.
        x: preprocessed images, float32 [N, 3, H, W] (numpy or torch).

    Returns:
        {exit depth: loss averaged over every masked patch of every image}.
    """
    import torch

    device = next(model.parameters()).device
    x = torch.as_tensor(x)
    generator = torch.Generator().manual_seed(seed)
    total: dict[int, float] = {}
    patches: dict[int, float] = {}
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for s in range(0, len(x), batch_size):
                xb = x[s:s + batch_size].to(device=device, dtype=torch.float32)
                batch = model.masked_batch(xb, model.mask_noise(len(xb), generator))  # mask: [B, N], 1 = masked
                masked = float(batch.mask.sum())
                tokens = None
                for i, depth in enumerate(model.exits):
                    tokens, loss = model.forward_stage(i, tokens, batch)
                    if loss is not None:
                        total[depth] = total.get(depth, 0.0) + float(loss) * masked
                        patches[depth] = patches.get(depth, 0.0) + masked
    finally:
        model.train(was_training)
    return {d: total[d] / patches[d] for d in total}


# ------------------------------------------------------------------------------ per-exit metrics


def evaluate_model(
    model,
    images: ImageList | EvalData,
    img_size: int,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    *,
    k: int = KNN_K,
    limit: int | None = EVAL_LIMIT,
    batch_size: int = 256,
    probe: bool = True,
    recon: bool = False,
) -> dict[str, dict]:
    """kNN top-1 and linear-probe top-1 of every exit of ``model`` on a labelled image set.

    Args:
        model: a BIM model or a timm ViT backbone (see :func:`extract_features`).
        images: a labelled ImageList (scored as :func:`make_eval_data` decides) or an :class:`EvalData`.
        img_size, mean, std: the model's preprocessing.
        k: kNN neighbours.
        limit: at most this many reference and this many query images (seeded samples); None for all.
        probe: also train the linear probe.
        recon: also the reconstruction loss of each decoded exit on the same images
            (:func:`reconstruction_losses`; a BIM model only), as ``eval_recon_loss``.

    Returns:
        {exit depth as str: {"knn_top1", "knn_dataset": {name, size, protocol[, train, val]},
        "linear_probe_top1"[, "eval_recon_loss"]}}.
    """
    data = images if isinstance(images, EvalData) else make_eval_data(images)
    out: dict[str, dict] = {}
    if data.leave_one_out:
        x, y = load_image_array(data.images, img_size, mean, std)
        feats = extract_features(model, x, batch_size=batch_size)
        dataset = {"name": data.name, "size": len(y), "protocol": data.protocol}
        for d, f in feats.items():
            out[str(d)] = {"knn_top1": knn_loo_top1(f, y, k=k), "knn_dataset": dict(dataset)}
            if probe:
                out[str(d)]["linear_probe_top1"] = linear_probe_kfold_top1(f, y, PROBE_FOLDS)
        if recon:
            _add_recon(out, model, [x], batch_size)
        return out
    if len(data.val_idx) == 0:
        raise InputError(f"{data.images.root}: no query images to evaluate on")
    xtr, ytr = load_image_array(_subset(data.images, data.train_idx), img_size, mean, std, limit=limit)
    xva, yva = load_image_array(_subset(data.images, data.val_idx), img_size, mean, std, limit=limit)
    ftr = extract_features(model, xtr, batch_size=batch_size)
    fva = extract_features(model, xva, batch_size=batch_size)
    dataset = {"name": data.name, "size": len(ytr) + len(yva), "protocol": data.protocol,
               "train": len(ytr), "val": len(yva)}
    for d in ftr:
        out[str(d)] = {"knn_top1": knn_top1(ftr[d], ytr, fva[d], yva, k=k), "knn_dataset": dict(dataset)}
        if probe:
            out[str(d)]["linear_probe_top1"] = linear_probe_top1(ftr[d], ytr, fva[d], yva)
    if recon:
        _add_recon(out, model, [xtr, xva], batch_size)
    return out


def _add_recon(out: dict[str, dict], model, arrays: list[np.ndarray], batch_size: int) -> None:
    from .model import BimModel

    if isinstance(model, BimModel):
        for d, loss in reconstruction_losses(model, np.concatenate(arrays), batch_size).items():
            out[str(d)]["eval_recon_loss"] = loss


def format_metrics_table(metrics: dict, title: str = "", recon: str = "recon_loss") -> str:
    """A fixed-width table of per-exit metrics (one row per exit depth); the reconstruction-loss
    column shows ``recon`` (``recon_loss``: training's; ``eval_recon_loss``: on the evaluated images)."""
    def cell(m: dict, key: str) -> str:
        return f"{m[key]:.4f}" if isinstance(m.get(key), (int, float)) else "-"

    rows = [(d, *(cell(metrics[d], k) for k in ("knn_top1", "linear_probe_top1", recon)))
            for d in sorted(metrics, key=int)]
    table = format_table(("exit", "kNN top-1", "probe top-1", "recon loss"), rows, align="rrrr")
    return f"{title}\n{table}" if title else table


def evaluate_checkpoint(path: str | Path, data_dir: str | Path, metrics_out: str | Path | None = None) -> str:
    """Evaluates every exit of a checkpoint on a labelled folder and records the figures.

    Where they go: with ``metrics_out``, to that file (metrics.json's format: the checkpoint's
    figures with the new ones merged in; the checkpoint is not touched); else into the checkpoint's
    ``metrics.json`` (rewritten atomically; other entries, such as the reconstruction loss, kept),
    except for the checkpoint that ships with bim-export: its metrics.json is what default exports
    select on, so it is never rewritten and the figures are only printed.

    Returns:
        A printable summary table, and where the figures were written (or that they were not).

    Raises:
        InputError: bad data or checkpoint; ``metrics_out`` is not a metrics file, or the place to
            write cannot be written (checked before evaluating).
    """
    from ..core.atomic import atomic_write_bytes, check_destination, check_writable, is_shipped
    from ..model import checkpoint as ckpt_io

    from ..model import classifier

    ckpt = ckpt_io.load_checkpoint(path, weights=False)
    finetuned = classifier.finetune_info(ckpt.config) is not None
    # bad data fails before the weights are read
    data = task_data(ckpt, data_dir) if finetuned else load_eval_data(data_dir)
    ckpt.load_weights()
    shipped = metrics_out is None and is_shipped(ckpt.path)
    if metrics_out is not None:
        metrics_out = check_destination(metrics_out, ckpt_io.METRICS_FILE)
    elif not shipped:
        try:
            check_writable(ckpt.path)
        except InputError as e:
            raise InputError(f"{e}; pass --metrics-out FILE to write the figures elsewhere") from None
    from .model import BimModel

    cfg = ckpt.config
    if finetuned:
        results = evaluate_classifier(ckpt, data)
    else:
        model = BimModel.from_checkpoint(ckpt)
        img_size = model.encoder.patch_embed.img_size[0]
        results = evaluate_model(model, data, img_size, cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD),
                                 recon=True)
    if metrics_out is not None:
        metrics = ckpt_io.merge_exit_metrics(ckpt.metrics, results)
        atomic_write_bytes(metrics_out, (json.dumps(metrics, indent=2) + "\n").encode(), ckpt_io.METRICS_FILE)
        where = f"written to {metrics_out} ({ckpt.path} unchanged)"
    elif shipped:
        metrics = ckpt_io.merge_exit_metrics(ckpt.metrics, results)
        where = (f"not written: {ckpt.path} ships with bim-export and is read-only "
                 f"(pass --metrics-out FILE to keep these figures)")
    else:
        metrics = ckpt_io.update_exit_metrics(ckpt.path, results)
        where = f"written to {Path(ckpt.path) / ckpt_io.METRICS}"

    if finetuned:
        ds = next(iter(results.values()))["task_dataset"]
        rows = [(d, f"{m['task_top1']:.4f}", f"{m['task_ece']:.4f}") for d, m in
                sorted(metrics.get("exits", {}).items(), key=lambda kv: int(kv[0])) if "task_top1" in m]
        table = format_table(("exit", "task top-1", "ECE"), rows, align="rrr")
        return f"{ckpt.path}: {ds['name']} ({ds['size']} images; {ds['protocol']})\n{table}\n{where}"
    ds = next(iter(results.values()))["knn_dataset"]
    title = f"{ckpt.path}: {ds['name']} ({ds['size']} images; {ds['protocol']}), kNN k={KNN_K}"
    table = format_metrics_table(metrics.get("exits", {}), title, recon="eval_recon_loss")
    note = (f"recon loss: each exit's masked-patch loss on these {ds['size']} images "
            f"(mask ratio {model.config.mask_ratio:g}, masks seeded {RECON_SEED})")
    return f"{table}\n{note}\n{where}"


# ------------------------------------------------------------------------------ fine-tuned checkpoints


def classifier_logits(model, x, batch_size: int = 256) -> np.ndarray:
    """Logits [N, C] of a timm classifier on preprocessed images ``x`` [N, 3, H, W], eval mode, fp32."""
    import torch

    with torch.inference_mode():
        return np.concatenate([model(torch.as_tensor(x[s:s + batch_size])).float().numpy()
                               for s in range(0, len(x), batch_size)])


def evaluate_classifier(ckpt, data: EvalData) -> dict[str, dict]:
    """Task top-1 and ECE of every exit of a fine-tuned checkpoint (its depth's timm classifier,
    :func:`~bim_export.model.backbone.build_backbone`) on ``data``'s query images."""
    from ..model.backbone import build_backbone
    from .task import task_metrics

    cfg = ckpt.config
    model = build_backbone(ckpt, ckpt.exits[0])
    x, y = load_image_array(_subset(data.images, data.val_idx), model.patch_embed.img_size[0],
                            cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD))
    dataset = {"name": data.name, "size": len(y), "protocol": data.protocol}
    out = {}
    for d in ckpt.exits:
        model = build_backbone(ckpt, d)
        out[str(d)] = {**task_metrics(classifier_logits(model, x), y), "task_dataset": dict(dataset)}
    return out
