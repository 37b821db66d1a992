"""Linear probe on frozen features: multinomial logistic regression, reproducible, in torch."""

from __future__ import annotations

import numpy as np

from ..model.splits import PROBE_FOLDS, stratified_folds


def _fit(train_feats, train_labels, num_classes, steps: int, lr: float, weight_decay: float):
    """The probe on standardized features: (mu, sd, weight [D, C], bias [C]) as torch tensors."""
    import torch

    train_feats = np.asarray(train_feats, dtype=np.float32)
    mu = train_feats.mean(axis=0, keepdims=True)
    sd = train_feats.std(axis=0, keepdims=True)
    sd = np.where(sd > 1e-6, sd, 1.0)  # constant features: leave them at zero rather than blow up
    xtr = torch.from_numpy(((train_feats - mu) / sd).astype(np.float32))
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
    return torch.from_numpy(mu), torch.from_numpy(sd), weight.detach(), bias.detach()


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

    mu, sd, weight, bias = _fit(train_feats, train_labels, num_classes, steps, lr, weight_decay)
    xte = (torch.from_numpy(np.asarray(test_feats, dtype=np.float32)) - mu) / sd
    with torch.no_grad():
        return (xte @ weight + bias).argmax(dim=1).numpy().astype(np.int64)


def linear_probe_head(train_feats: np.ndarray, train_labels: np.ndarray, num_classes: int, steps: int = 300,
                      lr: float = 0.05, weight_decay: float = 1e-4):
    """The probe of :func:`linear_probe_predict` as a linear layer on the raw features (the
    standardization folded in): (weight [C, D], bias [C]) float32 torch tensors."""
    mu, sd, weight, bias = _fit(train_feats, train_labels, num_classes, steps, lr, weight_decay)
    # ((x - mu) / sd) @ weight + bias = x @ (weight / sd^T) + (bias - (mu / sd) @ weight)
    return (weight / sd.T).T.contiguous(), bias - ((mu / sd) @ weight).squeeze(0)


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


def linear_probe_kfold_top1(feats: np.ndarray, labels: np.ndarray, folds: int = PROBE_FOLDS, seed: int = 0, **kwargs) -> float:
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
