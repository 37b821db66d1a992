"""Fine-tuning settings: one pydantic model, loaded from YAML and ``--set key=value`` as training's are.

The recipe is the field's (BEiT / MAE fine-tuning, built from timm's parts): AdamW with layer-wise
learning-rate decay, linear warm-up then cosine, label smoothing, drop path; Mixup / CutMix and
RandAugment are there but off by default, since they slow learning on a few hundred images. New
heads start as linear probes of the frozen exits (LP-FT), so a short run starts from what the
frozen features give.
"""

from __future__ import annotations

import math
import os
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from ..core.errors import InputError
from .config import _merge, _where, parse_overrides, read_settings_file


class FinetuneConfig(BaseModel):
    """Every setting of a fine-tuning run (stored in the checkpoint's ``finetune.settings``)."""

    model_config = ConfigDict(extra="forbid")
    _origins: dict[str, str] = PrivateAttr(default_factory=dict)
    _default_origin: str = PrivateAttr("fine-tuning settings")

    # -- what is fine-tuned
    mode: Literal["joint", "per_exit"] = Field(
        "joint", description="joint: one encoder shared by every exit, a head per exit, the exits' losses "
        "summed (one multi-exit graph serves every depth); per_exit: each exit's backbone fine-tuned on its own")
    exits: Optional[list[int]] = Field(None, description="the exits to fine-tune (default: every exit of the "
                                       "checkpoint); the fine-tuned checkpoint has only these")
    head: Literal["keep", "new"] = Field(
        "keep", description="a checkpoint fine-tuned before: keep continues from its heads (its labels must be "
        "the data's); new starts fresh heads (any labels)")
    head_init: Literal["probe", "zero"] = Field(
        "probe", description="how a new head starts. probe: a linear probe fitted on the frozen exit's features of "
        "the training images (LP-FT, Kumar et al. 2022): fine-tuning starts from the frozen features' accuracy, "
        "which a few hundred images and steps need, since masked-image-modeling features vary little "
        "between images; zero: near-zero weights (MAE)")
    # -- schedule
    epochs: float = Field(10.0, gt=0, description="passes over the training images")
    batch_size: int = Field(32, ge=1, description="images per optimizer step over all processes (global batch)")
    lr: float = Field(3e-5, gt=0, description="peak learning rate of the last layer and the heads (AdamW moves "
                      "every weight by about this much a step; 1e-4 already undoes the features a probe-started "
                      "head reads on a few hundred images)")
    layer_decay: float = Field(0.75, gt=0, le=1, description="layer-wise learning-rate decay: block i of L gets "
                               "lr x layer_decay^(L + 1 - i); the patch embedding the least (1: no decay)")
    weight_decay: float = Field(0.05, ge=0, description="AdamW weight decay (not on norms, biases, tokens, "
                                "position embeddings)")
    warmup_epochs: float = Field(1.0, ge=0, description="linear warm-up, in epochs")
    min_lr: float = Field(1e-6, ge=0, description="learning rate at the end of the cosine schedule")
    grad_clip: Optional[float] = Field(None, gt=0, description="clip the gradient norm to this (off by default)")
    # -- regularization and augmentation
    label_smoothing: float = Field(0.1, ge=0, lt=1, description="label smoothing of the cross-entropy")
    drop_path: float = Field(0.0, ge=0, lt=1, description="stochastic depth rate of the deepest block (0.1 for "
                             "sets of thousands of images; on a few hundred it shifts the features the heads "
                             "start from)")
    mixup: float = Field(0.0, ge=0, description="Mixup alpha (0: off)")
    cutmix: float = Field(0.0, ge=0, description="CutMix alpha (0: off)")
    randaugment: Optional[str] = Field(None, description="timm RandAugment config, e.g. rand-m9-mstd0.5-inc1 "
                                       "(null: off)")
    crop_scale: Optional[tuple[float, float]] = Field(
        None, description="random-resized-crop area range (fractions of the image), e.g. [0.35, 1]; null: no crop, "
        "the images as deployed (resized, centre crop). Crops help sets of thousands of images; on a few hundred "
        "they move the features more than the classes differ")
    hflip: float = Field(0.5, ge=0, le=1, description="horizontal flip probability (0 for digits or text)")
    # -- held-out split (without --val-data)
    val_fraction: float = Field(0.2, gt=0, lt=1, description="fraction of each class held out")
    seed: int = Field(0, description="seed of the split, heads, data order, augmentation and drop path")
    # -- where and how
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="where to train")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="autocast: auto = bf16 on CUDA, "
                                                       "fp32 on CPU")
    num_workers: int = Field(2, ge=0, description="data-loading worker processes per training process")
    comm_timeout: float = Field(600.0, gt=0, description="seconds a process waits on another under torchrun")
    eval_each_epoch: bool = Field(True, description="score the held-out images after every epoch (progress); "
                                  "the final score is always taken")
    log_every: int = Field(10, ge=1, description="steps between log lines (log.jsonl)")
    save_every: int = Field(200, ge=1, description="steps between checkpoint saves (and at the end), for resume")

    @field_validator("crop_scale")
    @classmethod
    def _range(cls, v: Optional[tuple[float, float]]) -> Optional[tuple[float, float]]:
        if v is not None and not 0 < v[0] <= v[1] <= 1:
            raise ValueError(f"expected 0 < low <= high <= 1 (got {list(v)})")
        return v

    @field_validator("randaugment")
    @classmethod
    def _rand(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and not v.startswith("rand"):
            raise ValueError(f"expected a timm RandAugment string such as rand-m9-mstd0.5 (got '{v}')")
        return v

    def where(self, key: str) -> str:
        """Names a setting with its source: ``ft.yaml: mode``, ``--set lr`` or ``fine-tuning settings: lr``."""
        return _where(self._origins, self._default_origin, key)

    def steps_for(self, images: int) -> tuple[int, int, int]:
        """(optimizer steps in all, warm-up steps, steps per epoch) for ``images`` training images
        (an epoch: enough steps to see every image once, the last batch filled from the next pass)."""
        per_epoch = max(1, math.ceil(images / self.batch_size))
        steps = max(1, round(self.epochs * per_epoch))
        return steps, min(steps - 1, round(self.warmup_epochs * per_epoch)), per_epoch


def load_finetune_config(config_file: str | os.PathLike | None = None, overrides: list[str] | None = None,
                         stored: dict | None = None, stored_from: str = "") -> FinetuneConfig:
    """A :class:`FinetuneConfig` from the YAML file, then ``--set`` (on top of ``stored``, the settings a
    resumed run was started with, when given).

    Raises:
        InputError: unreadable YAML, unknown key or bad value (the message names the file and field).
    """
    raw: dict = dict(stored or {})
    origins: dict[str, str] = dict.fromkeys(raw, f"{stored_from} (finetune.settings)") if stored else {}
    source = "fine-tuning settings"
    if config_file is not None:
        source = str(config_file)
        given = read_settings_file(config_file)
        origins.update(dict.fromkeys(map(str, given), source))
        raw = _merge(raw, given)
    overridden = parse_overrides(overrides or [])
    origins.update(dict.fromkeys(overridden, "--set"))
    raw = _merge(raw, overridden)
    try:
        cfg = FinetuneConfig(**raw)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(p) for p in err["loc"])
        where = _where(origins, source, field) if field else f"{source}: (settings)"
        got = f" (got {err['input']!r})" if err["type"] != "missing" and not isinstance(err["input"], dict) else ""
        raise InputError(f"{where}: {err['msg']}{got}") from None
    cfg._origins, cfg._default_origin = origins, source
    return cfg
