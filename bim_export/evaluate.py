"""Quality of every exit: kNN top-1 and linear-probe top-1 on pooled features of a labelled folder.

The kNN is plain numpy (cosine similarity, similarity-weighted vote with DINO's temperature), so
the parity check of exported models can use it without torch; torch is imported only inside the
functions that run a model or train the linear probe.

Protocol: a labelled folder with ``train/`` and ``val/`` sub-folders (each ImageFolder style) is
used as given; a small labelled folder (under 500 images) is scored leave-one-out (kNN) and by
5-fold cross-validation (linear probe) over all its images, so that exits can still be told apart;
any other labelled folder is split per class, deterministically (seeded), into a reference part
and a query part. The metrics record which (``knn_dataset.protocol``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .data import IMAGENET_MEAN, IMAGENET_STD, ImageList, load_image_array, scan_image_folder
from .errors import InputError

log = logging.getLogger(__name__)

KNN_K = 20
KNN_TEMPERATURE = 0.07  # DINO's weighted kNN: weight = exp(cosine / T)
VAL_FRACTION = 0.2
EVAL_LIMIT = 10_000  # images per split at most, a seeded sample beyond that
LOO_MAX = 500  # smaller labelled sets are scored leave-one-out: a held-out fifth would be too coarse
PROBE_FOLDS = 5


# ------------------------------------------------------------------------------ kNN (numpy)


def _l2_normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def knn_predict(
    train_feats: np.ndarray,
    train_labels: np.ndarray,
    query_feats: np.ndarray,
    k: int = KNN_K,
    temperature: float = KNN_TEMPERATURE,
    num_classes: int | None = None,
    chunk: int = 1024,
    exclude_self: bool = False,
) -> np.ndarray:
    """Labels of ``query_feats`` by a similarity-weighted vote of their k nearest training features.

    Similarity is cosine; each of the k neighbours votes for its label with weight
    ``exp(cosine / temperature)`` (the weighted kNN of DINO / InstDisc).

    Args:
        train_feats: [N, D] reference features.
        train_labels: [N] integer labels >= 0.
        query_feats: [M, D] features to label.
        k: neighbours per query (clamped to N).
        temperature: softness of the vote; small values approach a plain nearest-neighbour vote.
        num_classes: number of classes (default: max label + 1).
        chunk: queries per block, bounding memory to ``chunk x N`` similarities.
        exclude_self: the queries are the training features themselves (leave-one-out): query i
            never counts training feature i as a neighbour.

    Returns:
        int64 [M] predicted labels.
    """
    train = _l2_normalize(train_feats)
    query = _l2_normalize(query_feats)
    labels = np.asarray(train_labels, dtype=np.int64)
    if train.ndim != 2 or query.ndim != 2 or train.shape[1] != query.shape[1]:
        raise ValueError(f"feature shapes differ: train {train.shape}, query {query.shape}")
    if len(labels) != len(train) or len(train) == 0:
        raise ValueError(f"{len(train)} training features but {len(labels)} labels")
    if labels.min() < 0:
        raise ValueError("training labels must be >= 0")
    if exclude_self and len(query) != len(train):
        raise ValueError("exclude_self needs the queries to be the training features")
    n_cls = int(labels.max()) + 1 if num_classes is None else num_classes
    k = max(1, min(k, len(train) - exclude_self))
    out = np.empty(len(query), dtype=np.int64)
    for s in range(0, len(query), chunk):
        sim = query[s:s + chunk] @ train.T  # [m, N]
        if exclude_self:
            rows = np.arange(len(sim))
            sim[rows, s + rows] = -np.inf  # weight exp(-inf) = 0 and never among the top k
        if k < sim.shape[1]:
            idx = np.argpartition(-sim, k - 1, axis=1)[:, :k]  # [m, k], unordered
        else:
            idx = np.broadcast_to(np.arange(sim.shape[1]), sim.shape)
        top_sim = np.take_along_axis(sim, idx, axis=1)
        weight = np.exp((top_sim - 1.0) / temperature)  # shifted by the max cosine (1): no overflow
        votes = np.zeros((len(idx), n_cls), dtype=np.float64)
        np.add.at(votes, (np.arange(len(idx))[:, None], labels[idx]), weight)
        out[s:s + chunk] = votes.argmax(axis=1)
    return out


def knn_top1(
    train_feats: np.ndarray,
    train_labels: np.ndarray,
    test_feats: np.ndarray,
    test_labels: np.ndarray,
    k: int = KNN_K,
    temperature: float = KNN_TEMPERATURE,
) -> float:
    """Top-1 accuracy in [0, 1] of :func:`knn_predict` on labelled test features."""
    test_labels = np.asarray(test_labels, dtype=np.int64)
    n_cls = int(max(np.max(train_labels), np.max(test_labels))) + 1
    pred = knn_predict(train_feats, train_labels, test_feats, k=k, temperature=temperature, num_classes=n_cls)
    return float(np.mean(pred == test_labels))


def knn_loo_top1(feats: np.ndarray, labels: np.ndarray, k: int = KNN_K, temperature: float = KNN_TEMPERATURE) -> float:
    """Leave-one-out kNN top-1 over one labelled set: each image is labelled by all the others.

    Used for small sets, where a held-out fifth would be a handful of images and its accuracy too
    coarse to rank exits.
    """
    labels = np.asarray(labels, dtype=np.int64)
    pred = knn_predict(feats, labels, feats, k=k, temperature=temperature, exclude_self=True)
    return float(np.mean(pred == labels))


# ------------------------------------------------------------------------------ linear probe


def linear_probe_predict(
    train_feats: np.ndarray,
    train_labels: np.ndarray,
    test_feats: np.ndarray,
    num_classes: int | None = None,
    steps: int = 300,
    lr: float = 0.05,
    weight_decay: float = 1e-4,
) -> np.ndarray:
    """Labels of ``test_feats`` by a multinomial logistic regression on standardized features.

    Full-batch AdamW from zero weights with a fixed cosine schedule: the problem is convex and the
    run has no randomness, so the result is reproducible for the same features.

    Returns:
        int64 [M] predicted labels.
    """
    import torch

    train_feats = np.asarray(train_feats, dtype=np.float32)
    mu = train_feats.mean(axis=0, keepdims=True)
    sd = train_feats.std(axis=0, keepdims=True)
    sd = np.where(sd > 1e-6, sd, 1.0)  # constant features: leave them at zero rather than blow up
    xtr = torch.from_numpy(((train_feats - mu) / sd).astype(np.float32))
    xte = torch.from_numpy(((np.asarray(test_feats, dtype=np.float32) - mu) / sd).astype(np.float32))
    ytr = torch.from_numpy(np.asarray(train_labels, dtype=np.int64))
    n_cls = int(ytr.max().item()) + 1 if num_classes is None else num_classes

    weight = torch.zeros(xtr.shape[1], n_cls, requires_grad=True)
    bias = torch.zeros(n_cls, requires_grad=True)
    opt = torch.optim.AdamW([weight, bias], lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(xtr @ weight + bias, ytr)
            loss = loss + 0.5 * weight_decay * weight.pow(2).sum()  # L2 on weights, not the bias
            loss.backward()
            opt.step()
            sched.step()
    with torch.no_grad():
        return (xte @ weight + bias).argmax(dim=1).numpy().astype(np.int64)


def linear_probe_top1(
    train_feats: np.ndarray,
    train_labels: np.ndarray,
    test_feats: np.ndarray,
    test_labels: np.ndarray,
    **kwargs,
) -> float:
    """Top-1 accuracy in [0, 1] of :func:`linear_probe_predict` on labelled test features."""
    test_labels = np.asarray(test_labels, dtype=np.int64)
    n_cls = int(max(np.max(train_labels), np.max(test_labels))) + 1
    pred = linear_probe_predict(train_feats, train_labels, test_feats, num_classes=n_cls, **kwargs)
    return float(np.mean(pred == test_labels))


def linear_probe_kfold_top1(feats: np.ndarray, labels: np.ndarray, folds: int = 5, seed: int = 0, **kwargs) -> float:
    """Top-1 accuracy of out-of-fold linear-probe predictions over one labelled set (stratified,
    seeded folds): every image is predicted once, by a probe that never saw it."""
    labels = np.asarray(labels, dtype=np.int64)
    fold = stratified_folds(labels, folds, seed)
    pred = np.full(len(labels), -1, dtype=np.int64)
    n_cls = int(labels.max()) + 1
    for f in range(folds):
        test = fold == f
        if test.any() and (~test).any():
            pred[test] = linear_probe_predict(feats[~test], labels[~test], feats[test], num_classes=n_cls, **kwargs)
    return float(np.mean(pred == labels))


# ------------------------------------------------------------------------------ features


def _is_timm_vit(model) -> bool:
    return hasattr(model, "forward_features") and hasattr(model, "forward_head") and hasattr(model, "blocks")


def exit_depths(model) -> list[int]:
    """The exit depths a model's features come from: a BIM model's exits, a backbone's depth."""
    if hasattr(model, "forward_exits"):
        return [int(e) for e in model.exits]
    if _is_timm_vit(model):
        return [len(model.blocks)]
    raise TypeError(f"cannot extract features from {type(model).__name__}: "
                    "expected a BIM model (forward_exits) or a timm VisionTransformer")


def extract_features(model, x, batch_size: int = 256, device=None) -> dict[int, np.ndarray]:
    """Pooled features of every exit, in eval mode, no masking.

    Args:
        model: a BIM model (``forward_exits`` -> normed tokens per exit) or a timm
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
                if hasattr(model, "forward_exits"):
                    pooled = [model.pool_exit(t) for t in model.forward_exits(xb)]  # the backbone's own pooling
                else:
                    pooled = [model.forward_head(model.forward_features(xb), pre_logits=True)]
                for d, p in zip(depths, pooled):
                    feats[d].append(p.float().cpu().numpy())
    finally:
        model.train(was_training)
    return {d: np.concatenate(f) for d, f in feats.items()}


# ------------------------------------------------------------------------------ data split


@dataclass
class EvalData:
    """A labelled evaluation set and how it is scored.

    Attributes:
        name: the data set's name (its folder name).
        images: every image of the set.
        train_idx, val_idx: reference and query images; both None for a small set, which is scored
            leave-one-out (kNN) and by k-fold (linear probe) over all its images.
        protocol: how it is scored, recorded in the metrics.
    """

    name: str
    images: ImageList
    train_idx: np.ndarray | None
    val_idx: np.ndarray | None
    protocol: str

    @property
    def leave_one_out(self) -> bool:
        return self.train_idx is None

    @property
    def size(self) -> int:
        return len(self.images)


def _require_labelled(images: ImageList) -> None:
    if not images.labelled:
        unl = sum(lbl < 0 for lbl in images.labels)
        raise InputError(f"{images.root}: evaluation needs a labelled folder (one sub-folder per class); "
                         f"{unl} of {len(images)} images sit directly in it without a class")
    if len(images.classes) < 2:
        raise InputError(f"{images.root}: evaluation needs at least 2 classes, found {len(images.classes)}")


def _subset(images: ImageList, idx) -> ImageList:
    return ImageList(images.root, [images.paths[i] for i in idx], [images.labels[i] for i in idx],
                     images.classes, [])


def stratified_indices(labels, val_fraction: float = VAL_FRACTION, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Seeded per-class split of labels >= 0: about ``val_fraction`` of each class to the query part
    (at least one where a class has two or more images), the rest to the reference part.

    Returns:
        (reference indices, query indices), each sorted.
    """
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    train_idx, val_idx = [], []
    for c in np.unique(labels[labels >= 0]):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        n_val = 0 if len(idx) < 2 else min(len(idx) - 1, max(1, round(val_fraction * len(idx))))
        val_idx.extend(idx[:n_val])
        train_idx.extend(idx[n_val:])
    return np.sort(np.asarray(train_idx, dtype=np.int64)), np.sort(np.asarray(val_idx, dtype=np.int64))


def stratified_folds(labels, folds: int = 5, seed: int = 0) -> np.ndarray:
    """Seeded fold number per sample, dealt round-robin within each class (so every fold holds
    each class about equally)."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    fold = np.zeros(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        fold[idx[rng.permutation(len(idx))]] = np.arange(len(idx)) % folds
    return fold


def stratified_split(images: ImageList, val_fraction: float = VAL_FRACTION, seed: int = 0):
    """:func:`stratified_indices` applied to a labelled list.

    Returns:
        (train ImageList, val ImageList).
    """
    train_idx, val_idx = stratified_indices(images.labels, val_fraction, seed)
    return _subset(images, train_idx), _subset(images, val_idx)


def make_eval_data(images: ImageList, name: str | None = None, seed: int = 0) -> EvalData:
    """Scores a labelled folder leave-one-out when it is small (under ``LOO_MAX`` images), else on a
    seeded stratified split.

    Raises:
        InputError: unlabelled folder or fewer than 2 classes (the message names the folder).
    """
    _require_labelled(images)
    name = name or images.root.resolve().name
    if len(images) < LOO_MAX:
        return EvalData(name, images, None, None,
                        f"leave-one-out kNN, {PROBE_FOLDS}-fold linear probe (under {LOO_MAX} images)")
    train_idx, val_idx = stratified_indices(images.labels, VAL_FRACTION, seed)
    return EvalData(name, images, train_idx, val_idx,
                    f"stratified {1 - VAL_FRACTION:.0%}/{VAL_FRACTION:.0%} split, seed {seed}")


def load_eval_data(data_dir: str | Path, seed: int = 0) -> EvalData:
    """Reads a labelled folder for evaluation: its ``train/`` and ``val/`` sub-folders when both
    exist (reference and query images), else the whole folder (see :func:`make_eval_data`).

    Raises:
        InputError: missing, empty or unlabelled folder (the message names it).
    """
    root = Path(data_dir)
    if not ((root / "train").is_dir() and (root / "val").is_dir()):
        return make_eval_data(scan_image_folder(root), seed=seed)
    train, val = scan_image_folder(root / "train"), scan_image_folder(root / "val")
    for part in (train, val):
        _require_labelled(part)
    index = {c: i for i, c in enumerate(train.classes)}
    missing = sorted(set(val.classes) - set(index))
    if missing:
        raise InputError(f"{root / 'val'}: classes not in {root / 'train'}: {', '.join(missing[:5])}")
    both = ImageList(root, train.paths + val.paths,
                     train.labels + [index[val.classes[lbl]] for lbl in val.labels], train.classes,
                     train.unreadable + val.unreadable)
    return EvalData(root.resolve().name, both, np.arange(len(train)), np.arange(len(train), len(both)),
                    "train/ and val/ folders")


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
) -> dict[str, dict]:
    """kNN top-1 and linear-probe top-1 of every exit of ``model`` on a labelled image set.

    Args:
        model: a BIM model or a timm ViT backbone (see :func:`extract_features`).
        images: a labelled ImageList (scored as :func:`make_eval_data` decides) or an :class:`EvalData`.
        img_size, mean, std: the model's preprocessing.
        k: kNN neighbours.
        limit: at most this many reference and this many query images (seeded samples); None for all.
        probe: also train the linear probe.

    Returns:
        {exit depth as str: {"knn_top1", "knn_dataset": {name, size, protocol[, train, val]},
        "linear_probe_top1"}}.
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
    return out


def format_metrics_table(metrics: dict, title: str = "") -> str:
    """A fixed-width table of per-exit metrics (one row per exit depth)."""
    rows = [f"{'exit':>5}  {'kNN top-1':>9}  {'probe top-1':>11}  {'recon loss':>10}"]
    for d in sorted(metrics, key=int):
        m = metrics[d]
        cell = lambda key, w: f"{m[key]:>{w}.4f}" if isinstance(m.get(key), (int, float)) else f"{'-':>{w}}"  # noqa: E731
        rows.append(f"{d:>5}  {cell('knn_top1', 9)}  {cell('linear_probe_top1', 11)}  {cell('recon_loss', 10)}")
    return "\n".join(([title] if title else []) + rows)


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
    from . import checkpoint as ckpt_io
    from .atomic import atomic_write_bytes, check_destination, check_writable, is_shipped

    data = load_eval_data(data_dir)  # bad data fails before the weights are read
    ckpt = ckpt_io.load_checkpoint(path)
    shipped = metrics_out is None and is_shipped(ckpt.path)
    if metrics_out is not None:
        metrics_out = check_destination(metrics_out, ckpt_io.METRICS_FILE)
    elif not shipped:
        try:
            check_writable(ckpt.path)
        except InputError as e:
            raise InputError(f"{e}; pass --metrics-out FILE to write the figures elsewhere") from None
    model = ckpt.build_model()
    cfg = ckpt.config
    img_size = model.encoder.patch_embed.img_size[0]
    results = evaluate_model(model, data, img_size, cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD))
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

    ds = next(iter(results.values()))["knn_dataset"]
    title = f"{ckpt.path}: {ds['name']} ({ds['size']} images; {ds['protocol']}), kNN k={KNN_K}"
    return format_metrics_table(metrics.get("exits", {}), title) + f"\n{where}"
