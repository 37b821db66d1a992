"""MAE's optimisation recipe: AdamW parameter groups and the warm-up + cosine learning-rate schedule,
with one AdamW per stage so a stage can be stepped as soon as its gradients are final.

The optimizer's saved state is keyed by parameter name, not by torch's position in a parameter
list, so it does not depend on how the parameters are grouped: a checkpoint resumes under
``update: stage`` or ``step``, and on any split of the stages over processes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from ..core.errors import InputError
from .config import TrainConfig
from .model import BimModel

STATE_FORMAT = "adamw-by-name"  # train_state.pt's "optimizer" format; older files hold torch's own


def _decays(model: BimModel, named: Iterable[tuple[str, nn.Parameter]]):
    """Splits ``named`` into (decay, no_decay) lists of (name, parameter), trainable ones only."""
    skip = {f"encoder.{n}" for n in model.encoder.no_weight_decay()}
    decay, no_decay = [], []
    for name, p in named:
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name in skip or name.endswith("token") else decay).append((name, p))
    return decay, no_decay


def param_groups(model: BimModel, weight_decay: float, named: Iterable[tuple[str, nn.Parameter]] | None = None
                 ) -> list[dict]:
    """AdamW groups: decay on weight matrices only (not norms, biases, position embeddings, tokens).

    Args:
        named: the (name, parameter) pairs to group (default: the whole model's).
    """
    decay, no_decay = _decays(model, model.named_parameters() if named is None else named)
    return [{"params": [p for _, p in decay], "weight_decay": weight_decay},
            {"params": [p for _, p in no_decay], "weight_decay": 0.0}]


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to the peak, then half-cosine to ``min_lr`` (MAE), for optimizer step ``step``."""
    peak, warm = cfg.peak_lr, cfg.warmup
    if step < warm:
        return peak * (step + 1) / warm
    t = (step - warm) / max(1, cfg.steps - warm)
    return cfg.min_lr + (peak - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


class StageOptimizer:
    """One AdamW per stage, each with MAE's two weight-decay groups.

    AdamW works parameter by parameter, so stepping the stages one by one is the same update as
    one optimizer over the whole model, whenever each stage's gradients are final.

    Args:
        model: the model, already on its device (fused kernels need the parameters there).
        cfg: lr (set per step from the schedule), betas and weight decay.
        fused: ``True``: torch's fused AdamW kernel (CUDA); ``False``: the multi-tensor (foreach)
            one; None: fused on CUDA, foreach elsewhere.
        stages: the stages this process steps (default: all); a process that holds some stages
            of a stage-parallel layout saves and loads the state of those only.
    """

    def __init__(self, model: BimModel, cfg: TrainConfig, fused: bool | None = None,
                 stages: Iterable[int] | None = None):
        params = list(model.parameters())
        if fused is None:
            fused = bool(params) and params[0].device.type == "cuda"
        impl = {"fused": True} if fused else {"foreach": True}
        self.stages = list(range(model.num_stages) if stages is None else stages)
        self.names: dict[int, list[str]] = {}  # per stage, in the order of its optimizer's groups
        self.optimizers: dict[int, torch.optim.AdamW] = {}
        self._model_names = {n for n, _ in model.named_parameters()}
        # the parameter order of the single AdamW older checkpoints saved (param_groups' order)
        legacy = _decays(model, model.named_parameters())
        self._legacy_order = [n for group in legacy for n, _ in group]
        self._legacy_sizes = [len(group) for group in legacy]
        for i in self.stages:
            decay, no_decay = _decays(model, model.stage_parameters(i))
            self.names[i] = [n for n, _ in decay + no_decay]
            groups = [{"params": [p for _, p in decay], "weight_decay": cfg.weight_decay},
                      {"params": [p for _, p in no_decay], "weight_decay": 0.0}]
            self.optimizers[i] = torch.optim.AdamW(groups, lr=cfg.peak_lr, betas=cfg.betas, **impl)

    def params(self, stage: int | None = None) -> list[nn.Parameter]:
        """The parameters of one stage, or of all this optimizer's stages (``None``)."""
        opts = self.optimizers.values() if stage is None else [self.optimizers[stage]]
        return [p for opt in opts for g in opt.param_groups for p in g["params"]]

    def set_lr(self, lr: float) -> None:
        for opt in self.optimizers.values():
            for g in opt.param_groups:
                g["lr"] = lr

    def clip_stage(self, stage: int, max_norm: float) -> torch.Tensor:
        """Clips one stage's gradients to total norm ``max_norm``; returns the norm before clipping."""
        return torch.nn.utils.clip_grad_norm_(self.params(stage), max_norm)

    def step_stage(self, stage: int) -> None:
        """Steps one stage and frees its gradients (the memory they held is free for the next stage)."""
        self.optimizers[stage].step()
        self.optimizers[stage].zero_grad(set_to_none=True)

    def step(self) -> None:
        for i in self.stages:
            self.step_stage(i)

    # ---------------------------------------------------------------- saved state

    def state_dict(self) -> dict:
        """``{"format": STATE_FORMAT, "state": {parameter name: {"step", "exp_avg", "exp_avg_sq"}}}``."""
        state = {}
        for stage, opt in self.optimizers.items():
            names = self.names[stage]
            state.update({names[i]: s for i, s in opt.state_dict()["state"].items()})
        return {"format": STATE_FORMAT, "state": state}

    def load_state_dict(self, saved: dict, source: str | Path = "train_state.pt") -> None:
        """Loads the state of :meth:`state_dict`, or of an older checkpoint's single torch AdamW
        (positions mapped to names by the model's parameter order, as that optimizer listed them).

        Hyper-parameters (betas, weight decay) stay this run's: they come from the training settings.
        The state of stages this optimizer does not hold is left out.

        Raises:
            InputError: state of parameters this model does not have, or an older state whose
                parameter count does not match (the message names ``source``).
        """
        by_name = self._by_name(saved, source)
        unknown = sorted(set(by_name) - self._model_names)
        if unknown:
            raise InputError(f"{source}: optimizer state of parameters this model does not have "
                             f"({', '.join(unknown[:3])}{' ...' if len(unknown) > 3 else ''})")
        for stage, opt in self.optimizers.items():
            names = self.names[stage]
            # torch's own format for this stage's optimizer: its current groups, state by position
            current = opt.state_dict()
            opt.load_state_dict({"param_groups": current["param_groups"],
                                 "state": {i: by_name[n] for i, n in enumerate(names) if n in by_name}})

    def _by_name(self, saved: dict, source) -> dict[str, dict]:
        if not isinstance(saved, dict):
            raise InputError(f"{source}: optimizer state is a {type(saved).__name__}, expected a mapping")
        if saved.get("format") == STATE_FORMAT:
            return dict(saved["state"])
        if "param_groups" in saved and "state" in saved:  # torch's format: one AdamW, MAE's two groups
            sizes = [len(g["params"]) for g in saved["param_groups"]]
            if sizes != self._legacy_sizes:
                raise InputError(f"{source}: optimizer state of an older layout has parameter groups of "
                                 f"{'/'.join(map(str, sizes))} parameters, this model's are "
                                 f"{'/'.join(map(str, self._legacy_sizes))}; it cannot be matched to names")
            positions = [i for g in saved["param_groups"] for i in g["params"]]
            return {self._legacy_order[k]: saved["state"][i] for k, i in enumerate(positions) if i in saved["state"]}
        raise InputError(f"{source}: optimizer state in an unknown format "
                         f"(keys {', '.join(map(str, list(saved)[:4]))})")
