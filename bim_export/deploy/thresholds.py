"""Confidence thresholds of an early-exit cascade, fitted on held-out images (numpy only).

An image leaves at the first exit whose confidence (top softmax probability) reaches that exit's
threshold (:func:`bim_export.runtime.early_exit.exit_index`); the last exit takes every image left.
The fit chooses the thresholds that make the cascade cheapest on the held-out images (the mean, over
the images, of the cost of the segments each one runs) while its accuracy stays within ``loss`` of
the deepest exit's on the same images:

1. every combination of a coarse grid of thresholds per exit (quantiles of that exit's confidences,
   and "never"), as many per exit as keep the combinations under :data:`GRID_COMBINATIONS`;
2. then each exit's threshold in turn over a fine grid, the others held, until nothing improves.

"Never" (no image leaves there) is always allowed, so the deepest exit alone is a valid answer and
the fit never fails: it can only find something cheaper.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass

import numpy as np

from ..runtime.early_exit import confidence, exit_index

GRID_COMBINATIONS = 20_000  # coarse search: threshold combinations tried at once, at most
FINE_GRID = 256  # refinement: candidate thresholds per exit
CHUNK_ELEMENTS = 8_000_000  # booleans evaluated at once (memory)
NEVER = math.inf


@dataclass
class Fit:
    """The fitted thresholds and what they give on the held-out images.

    Attributes:
        thresholds: per exit; None where no image leaves (the last exit's is 0: it takes the rest).
        accuracy: the cascade's top-1 on the held-out images.
        fixed_accuracy: each exit's top-1 on them, as if it were the only one.
        exit_share: the fraction of images leaving at each exit.
        cost: the cascade's mean cost per image, in the unit of ``costs``.
        fixed_cost: each fixed depth's cost per image (the segments up to it).
        loss: the accuracy the cascade was allowed to lose against the deepest exit (fraction).
        images: held-out images the fit used.
    """

    thresholds: list[float | None]
    accuracy: float
    fixed_accuracy: list[float]
    exit_share: list[float]
    cost: float
    fixed_cost: list[float]
    loss: float
    images: int

    def to_dict(self) -> dict:
        return asdict(self)


def _evaluate(conf: np.ndarray, correct: np.ndarray, cum: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Correct images and mean cost of each threshold vector: ``t`` [C, K-1] -> ([C], [C])."""
    k, n = conf.shape
    rights, costs = [], []
    step = max(1, CHUNK_ELEMENTS // max(1, (k - 1) * n))
    for i in range(0, len(t), step):
        part = t[i:i + step]
        leaves = conf[None, :-1, :] >= part[:, :, None]  # [C, K-1, N]
        idx = np.where(leaves.any(axis=1), leaves.argmax(axis=1), k - 1)  # [C, N]
        rights.append(correct[idx, np.arange(n)].sum(axis=1))
        costs.append(cum[idx].mean(axis=1))
    return np.concatenate(rights), np.concatenate(costs)


def _best(t: np.ndarray, right: np.ndarray, cost: np.ndarray, needed: int) -> int | None:
    """Index of the cheapest vector with at least ``needed`` correct (ties: more correct, then higher
    thresholds), or None."""
    ok = np.flatnonzero(right >= needed)
    if not len(ok):
        return None
    # lexsort: the last key is the primary one
    order = np.lexsort((-np.nan_to_num(t[ok], posinf=2.0).sum(axis=1), -right[ok], cost[ok]))
    return int(ok[order[0]])


def _grid(conf: np.ndarray, n: int) -> np.ndarray:
    """Up to ``n`` candidate thresholds of one exit: quantiles of its confidences, and never."""
    values = np.unique(conf)
    if len(values) > n - 1:
        values = np.unique(np.quantile(conf, np.linspace(0.0, 1.0, max(1, n - 1)), method="lower"))
    return np.append(values, NEVER)


def fit_thresholds(logits: list[np.ndarray], labels: np.ndarray, costs: list[float], loss: float) -> Fit:
    """Fits one confidence threshold per exit.

    Args:
        logits: each exit's logits on the held-out images, shallowest first, [N, C] each.
        labels: their classes, [N].
        costs: each segment's cost (its blocks, or its measured time); an image leaving at exit k pays
            the segments 0..k.
        loss: the accuracy (a fraction: 0.005 is half a point) the cascade may lose against the deepest exit.

    Returns:
        the :class:`Fit`.
    """
    labels = np.asarray(labels)
    conf = np.stack([confidence(z) for z in logits])  # [K, N]
    correct = np.stack([np.argmax(z, axis=-1) == labels for z in logits])  # [K, N]
    k, n = conf.shape
    cum = np.cumsum(np.asarray(costs, dtype=np.float64))
    needed = int(correct[-1].sum()) - int(math.floor(loss * n + 1e-9))
    best = np.full(k - 1, NEVER)
    if k > 1 and n:
        per_exit = max(2, int(GRID_COMBINATIONS ** (1.0 / (k - 1))))
        grids = [_grid(conf[i], per_exit) for i in range(k - 1)]
        combos = np.array(list(itertools.product(*grids)), dtype=np.float64)
        right, cost = _evaluate(conf, correct, cum, combos)
        best = combos[_best(combos, right, cost, needed)]  # all-never is among them and always qualifies
        for _ in range(10):  # refine one exit at a time until nothing improves
            before = best.copy()
            for i in range(k - 1):
                fine = _grid(conf[i], FINE_GRID)
                cand = np.repeat(best[None], len(fine), axis=0)
                cand[:, i] = fine
                cand = np.vstack([best[None], cand])  # the current one first: kept on a tie
                right, cost = _evaluate(conf, correct, cum, cand)
                best = cand[_best(cand, right, cost, needed)]
            if np.array_equal(before, best):
                break
    idx = exit_index(conf, best) if n else np.zeros(0, int)
    share = [float(np.mean(idx == i)) if n else 0.0 for i in range(k)]
    return Fit(thresholds=[None if math.isinf(t) else float(t) for t in best] + [0.0],
               accuracy=float(correct[idx, np.arange(n)].mean()) if n else float("nan"),
               fixed_accuracy=[float(c.mean()) if n else float("nan") for c in correct],
               exit_share=share, cost=float(cum[idx].mean()) if n else 0.0, fixed_cost=[float(c) for c in cum],
               loss=float(loss), images=int(n))
