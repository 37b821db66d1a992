"""kNN on features: the similarity-weighted vote that scores every exit and checks parity.

Plain numpy (cosine similarity, DINO's temperature-weighted vote), so the training half's evaluation
and the deployment half's parity check share one rule, and a bundle's standalone validator runs it on
a device with numpy alone (this file ships inside every bundle).
"""

from __future__ import annotations

import numpy as np

KNN_K = 20
KNN_TEMPERATURE = 0.07  # DINO's weighted kNN: weight = exp(cosine / T)


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
