"""A classifier's answer: class probabilities (softmax of the logits) and the top-k labels.

One implementation for a bundle's ``infer.py`` (which prints them) and its HTTP server (which
answers them as JSON). numpy only.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    """Class probabilities of logits [..., C], over the last axis, in float64 (shifted by the
    maximum: no overflow)."""
    z = np.asarray(logits, dtype=np.float64)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def top_labels(logits: np.ndarray, labels: Sequence[str], k: int = 5) -> list[list[tuple[str, float]]]:
    """Per row of logits [N, C], the ``k`` most likely labels (at most C) with their probabilities,
    most likely first; ties keep the labels' order."""
    probs = softmax(logits)
    k = max(1, min(k, probs.shape[1]))
    idx = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return [[(labels[j] if j < len(labels) else str(j), float(probs[i, j])) for j in row] for i, row in enumerate(idx)]
