"""Task metrics of a classifier: top-1 accuracy and the calibration of its confidence.

ECE (expected calibration error, Guo et al. 2017): the images are binned by the softmax confidence of
their top class into ``bins`` equal-width bins over [0, 1]; ECE is the image-weighted mean, over
bins, of |accuracy - mean confidence| in the bin. 0 is perfectly calibrated.
"""

from __future__ import annotations

import numpy as np

ECE_BINS = 15


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of logits [N, C], computed stably in float64."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def ece(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error of class probabilities [N, C] against labels [N] (see the module docstring)."""
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels)
    if len(labels) == 0:
        return float("nan")
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    # bin b holds confidences in (b / bins, (b + 1) / bins]; a confidence of 0 goes to the first
    which = np.clip(np.ceil(conf * bins).astype(np.int64) - 1, 0, bins - 1)
    total = 0.0
    for b in np.unique(which):
        in_bin = which == b
        total += in_bin.sum() * abs(correct[in_bin].mean() - conf[in_bin].mean())
    return float(total / len(labels))


def task_metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """``{"task_top1": fraction correct, "task_ece": ECE of the softmax confidence}`` of logits [N, C]."""
    logits, labels = np.asarray(logits), np.asarray(labels)
    return {"task_top1": float((logits.argmax(axis=1) == labels).mean()) if len(labels) else float("nan"),
            "task_ece": ece(softmax(logits), labels)}
