"""MAE's optimisation recipe: AdamW parameter groups and the warm-up + cosine learning-rate schedule."""

from __future__ import annotations

import math

from .config import TrainConfig
from .model import BimModel


def param_groups(model: BimModel, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on weight matrices only (not norms, biases, position embeddings, tokens)."""
    skip = {f"encoder.{n}" for n in model.encoder.no_weight_decay()}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name in skip or name.endswith("token") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to the peak, then half-cosine to ``min_lr`` (MAE), for optimizer step ``step``."""
    peak, warm = cfg.peak_lr, cfg.warmup
    if step < warm:
        return peak * (step + 1) / warm
    t = (step - warm) / max(1, cfg.steps - warm)
    return cfg.min_lr + (peak - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))
