"""Training settings: one pydantic model, loaded from YAML, CLI flags and ``--set key=value`` overrides."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from ..model import architecture
from ..model import checkpoint as ckpt_io
from ..model.architecture import BimConfig, check_loss_weights, check_model_name, check_overlap
from ..core.errors import InputError

FLAGS = {"data": "--data", "model": "--model", "exits": "--exits", "out": "--out", "eval_data": "--eval-data",
         "init": "--init"}


class TrainConfig(BaseModel):
    """Every setting of a BIM (or end-to-end MAE) pretraining run."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    # where each top-level setting came from (a YAML file, a flag, --set), for error lines
    _origins: dict[str, str] = PrivateAttr(default_factory=dict)
    _default_origin: str = PrivateAttr("training settings")
    # the checkpoint a resumed run continues from, read once here (config.json and metrics.json; its
    # weights and training state are read when the run resumes); None: none, or not resuming
    _resume_from: ckpt_io.Checkpoint | None = PrivateAttr(None)

    # -- data and output
    data: Path | None = Field(None, description="image folder (recursive, class sub-folders optional); "
                                                "null: the built-in sample images")
    out: Path = Field(..., description="checkpoint directory written (atomically) during and after training")
    eval_data: Path | None = Field(None, description="labelled image folder: kNN / linear probe per exit at the end")
    data_pipeline: Literal["auto", "cpu", "gpu"] = Field(
        "auto", description="where images are decoded and augmented: gpu = JPEGs decoded (nvJPEG), cropped, "
                            "resized and flipped on the GPU in batches, other files by PIL in the loader workers; "
                            "cpu = all by PIL in the workers; auto = gpu when training on CUDA")
    # -- model: given as the flat settings of architecture.SETTINGS
    bim: BimConfig = Field(default_factory=BimConfig, description="the model: timm ViT, exits, decoder, mask "
                           "and loss (stored in config.json); set through the flat settings "
                           + ", ".join(architecture.SETTINGS))
    init: str | None = Field(None, description="pretrained weights for the encoder (and the last exit norm): a "
                             "safetensors or .pth file, a bim-export checkpoint or backbone folder, or a timm model "
                             "name with pretrained weights, e.g. vit_base_patch16_224.mae; not re-applied on resume")
    mean: tuple[float, float, float] = Field((0.485, 0.456, 0.406), description="input normalization mean")
    std: tuple[float, float, float] = Field((0.229, 0.224, 0.225), description="input normalization std")
    # -- optimization (MAE's recipe)
    steps: int = Field(1000, ge=1, description="optimizer steps in total")
    batch_size: int = Field(64, ge=1, description="images per optimizer step over all processes and "
                            "accumulation steps (the global batch)")
    accum_steps: int = Field(1, ge=1, description="gradient accumulation: micro-batches per optimizer step")
    base_lr: float = Field(1.5e-4, gt=0, description="learning rate per 256 images: lr = base_lr x batch / 256")
    lr: float | None = Field(None, gt=0, description="absolute learning rate (overrides base_lr)")
    min_lr: float = Field(0.0, ge=0, description="learning rate at the end of the cosine schedule")
    warmup_steps: int | None = Field(None, ge=0, description="linear warm-up steps (default: 5% of steps)")
    weight_decay: float = Field(0.05, ge=0, description="AdamW weight decay (not on norms, biases, "
                                "position embeddings, tokens)")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas")
    grad_clip: float | None = Field(None, gt=0, description="clip the gradient norm to this (off by default)")
    grad_clip_mode: Literal["global", "stage"] = Field(
        "global", description="global: clip by the norm over all parameters (needs every stage's gradients "
        "first, so the run uses update: step); stage: clip each stage by its own norm (works with update: stage)")
    update: Literal["stage", "step"] = Field(
        "stage", description="when parameters are stepped. stage: each stage's AdamW step as soon as its "
        "gradients are final (its backward of the step's last micro-batch), and its gradients freed; the "
        "same result as step with one stage's gradients alive at a time. step: every stage after the whole "
        "backward. stage falls back to step where it would differ (mode e2e; grad_clip with grad_clip_mode "
        "global) and the run's start line says so")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="autocast: auto = bf16 on CUDA, "
                                                       "fp32 on CPU")
    grad_checkpointing: bool = Field(False, description="recompute every encoder block (inside each stage) and "
                                     "every decoder block in backward, keeping only block inputs: less "
                                     "activation memory for about a fifth more compute; same result")
    compile: bool = Field(False, description="torch.compile every encoder and decoder block: faster steps after "
                          "a compile of a minute or so at the start; same result within rounding")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="where to train")
    stage_parallel: int = Field(1, ge=1, description="under torchrun: the stages over this many groups of ranks "
                                "(neighbouring stages together; N / stage_parallel ranks per group are data "
                                "parallel); only forward tokens cross between groups, and the result is the "
                                "single process's. mode bim only")
    comm_timeout: float = Field(600.0, gt=0, description="seconds a process waits on another (a collective or "
                                "point-to-point call) before the run stops, naming the rank that stopped; "
                                "rank 0's checkpoint saves must fit in it")
    seed: int = Field(0, description="seed of initialization, data order, augmentation and masks")
    num_workers: int = Field(2, ge=0, description="data-loading worker processes per training process")
    # -- bookkeeping
    log_every: int = Field(10, ge=1, description="steps between log lines (log.jsonl in the checkpoint)")
    save_every: int = Field(500, ge=1, description="steps between checkpoint saves (and at the end)")
    weights_dtype: Literal["fp32", "fp16"] = Field("fp32", description="dtype of the weights of the last save "
                                                   "(fp16 halves the size, loaded back as fp32); periodic saves "
                                                   "stay fp32 so resume is exact")
    save_train_state: bool = Field(True, description="store optimizer and RNG state for resume")
    eval_limit: int | None = Field(2000, ge=1, description="images per evaluation split at most")
    progress: bool = Field(True, description="show a progress bar")

    @model_validator(mode="before")
    @classmethod
    def _nest_model_settings(cls, data):
        """Moves the flat model settings into ``bim`` (over what a nested ``bim`` mapping says)."""
        flat = {k: v for k, v in data.items() if k in architecture.SETTINGS} if isinstance(data, dict) else {}
        if not flat:
            return data
        bim = data.get("bim", {})
        bim = bim.model_dump() if isinstance(bim, BimConfig) else dict(bim or {})
        rest = {k: v for k, v in data.items() if k not in flat}
        return {**rest, "bim": architecture.nest_settings(flat, bim)}

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.batch_size % self.accum_steps:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by accum_steps {self.accum_steps}")
        return self

    def where(self, key: str) -> str:
        """Names a setting for an error line with its source: ``run.yaml: loss_weights``,
        ``--exits``, ``--set model_args.depth``, or ``training settings: steps`` (not given)."""
        return _where(self._origins, self._default_origin, key)

    @property
    def resume_from(self) -> ckpt_io.Checkpoint | None:
        """The checkpoint this (resumed) run continues from, as read with its settings, if any."""
        return self._resume_from

    @property
    def stored_from(self) -> Path | None:
        """The checkpoint config.json whose stored settings this (resumed) run's start from, if any."""
        return self._resume_from.path / ckpt_io.CONFIG if self._resume_from is not None else None

    def given_over_stored(self) -> list[str]:
        """Settings given on top of a checkpoint's stored ones (``steps (--set)``), ``out`` left out."""
        if self.stored_from is None:
            return []
        stored = str(self.stored_from)
        return [f"{k} ({o})" for k, o in self._origins.items() if k != "out" and not o.startswith(stored)]

    @property
    def warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else max(1, self.steps // 20)

    @property
    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else self.base_lr * self.batch_size / 256


def parse_overrides(items: list[str]) -> dict:
    """``["a=1", "model_args.depth=4"]`` -> ``{"a": 1, "model_args": {"depth": 4}}`` (values parsed as YAML)."""
    out: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InputError(f"--set {item}: expected KEY=VALUE")
        try:
            parsed = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError as e:
            raise InputError(f"--set {item}: value is not valid YAML ({e})") from e
        node = out
        *parents, leaf = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = parsed
    return out


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out



def read_settings_file(config_file: str | os.PathLike) -> dict:
    """A YAML file of settings, as a mapping.

    Raises:
        InputError: the file cannot be read, is not YAML, or is not a mapping (the message names it).
    """
    path = Path(config_file)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except OSError as e:
        raise InputError(f"{path}: cannot read config file ({e.strerror or e})") from e
    except yaml.YAMLError as e:
        raise InputError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from e
    if not isinstance(raw, dict):
        raise InputError(f"{path}: expected a mapping of settings, got {type(raw).__name__}")
    return raw

def load_train_config(config_file: str | os.PathLike | None = None, overrides: list[str] | None = None,
                      resume: bool = False, **fields) -> TrainConfig:
    """Builds a :class:`TrainConfig`: the YAML file, then ``fields`` (flags; None = not given), then ``--set``.

    With ``resume`` and a checkpoint in ``out``, the settings it was trained with (its config.json's
    ``train``) come first, and the file, flags and ``--set`` change only what they name.
    Relative paths are relative to the working directory, as on the command line.

    Raises:
        InputError: unreadable YAML, unknown key or bad value (the message names the file and field).
    """
    raw: dict = {}
    source = "training settings"
    origins: dict[str, str] = {}
    if config_file is not None:
        source = str(config_file)
        raw = read_settings_file(config_file)
        origins = dict.fromkeys(map(str, raw), source)
    flags = {k: v for k, v in fields.items() if v is not None}
    origins.update({k: FLAGS.get(k, f"--{k}") for k in flags})
    overridden = parse_overrides(overrides or [])
    origins.update(dict.fromkeys(overridden, "--set"))
    raw = _merge(_merge(raw, flags), overridden)
    resume_from = None
    if resume and raw.get("out") is not None:
        stored, resume_from = _stored_settings(Path(raw["out"]))
        if stored is not None:
            label = f"{resume_from.path / ckpt_io.CONFIG} (train)"
            origins = {**dict.fromkeys([*map(str, stored), *architecture.SETTINGS], label), **origins}
            raw = _merge(stored, raw)
    try:
        cfg = TrainConfig(**raw)
    except ValidationError as e:
        err = e.errors()[0]
        field = setting_name(".".join(str(p) for p in err["loc"]))
        where = _where(origins, source, field) if field else f"{source}: (settings)"
        got = f" (got {err['input']!r})" if err["type"] != "missing" and not isinstance(err["input"], dict) else ""
        more = f" [+{len(e.errors()) - 1} more]" if len(e.errors()) > 1 else ""
        raise InputError(f"{where}: {err['msg']}{got}{more}") from None
    cfg._origins, cfg._default_origin, cfg._resume_from = origins, source, resume_from
    _check_combinations(cfg)
    return cfg


def _stored_settings(out: Path) -> tuple[dict | None, ckpt_io.Checkpoint | None]:
    """The training settings a checkpoint in ``out`` was made with (config.json ``train``), and the
    checkpoint (read here, once, without its weights); (None, None) where ``out`` holds no checkpoint."""
    if not (out / ckpt_io.CONFIG).is_file():
        return None, None
    checkpoint = ckpt_io.load_checkpoint(out, weights=False)
    stored = checkpoint.config.get("train") or {}
    if not isinstance(stored, dict):
        raise InputError(f"{out / ckpt_io.CONFIG}: train: expected a mapping of settings, got {type(stored).__name__}")
    return {k: v for k, v in stored.items() if k != "out"}, checkpoint


def setting_name(field: str) -> str:
    """The name a user gives a setting: ``bim.decoder.width`` -> ``decoder_width``."""
    return architecture.setting_name(field[len("bim."):]) if field.startswith("bim.") else field


def _where(origins: dict[str, str], default: str, key: str) -> str:
    origin = origins.get(key.split(".")[0], default)
    if origin == "--set":
        return f"--set {key}"
    return origin if origin.startswith("--") else f"{origin}: {key}"


def _check_combinations(cfg: TrainConfig) -> None:
    """What one field cannot check alone, named by where each setting came from."""
    bim = cfg.bim
    try:
        check_model_name(bim.arch)
    except InputError as e:
        raise InputError(f"{cfg.where('model')}: {e}") from None
    _check_stage_parallel(cfg)
    if bim.loss_weights is not None and bim.exits is not None:
        try:
            check_loss_weights(bim.loss_weights, bim.decoded_exits)
        except InputError:  # said with where the weights and the exits came from
            raise InputError(
                f"{cfg.where('loss_weights')}: {len(bim.loss_weights)} weights for {len(bim.decoded_exits)} decoders "
                f"(mode {bim.mode}, exits {bim.exits} from {cfg.where('exits')}); give one weight per decoder") from None
    try:
        check_overlap(bim.overlap, bim.mode, bim.exits if bim.exits is not None else [])
    except InputError as e:
        if bim.exits is not None or bim.mode != "bim":  # default exits: checked when the model is built
            raise InputError(f"{cfg.where('overlap')}: {e}") from None


def _check_stage_parallel(cfg: TrainConfig) -> None:
    """What stage-parallel training cannot do: every setting that makes a stage's step need another
    stage's gradients belongs here (e.g. a loss that reaches back into the stage before)."""
    if cfg.stage_parallel == 1:
        return
    where = cfg.where("stage_parallel")
    if cfg.bim.mode != "bim":
        raise InputError(f"{where}: stage_parallel {cfg.stage_parallel} needs mode bim ({cfg.where('mode')} is "
                         f"{cfg.bim.mode}: its one backward runs through every stage)")
    if cfg.grad_clip is not None and cfg.grad_clip_mode == "global":
        raise InputError(f"{where}: stage_parallel {cfg.stage_parallel} cannot clip by the global gradient norm "
                         f"(every group would wait for the last stage's gradients each step); set "
                         f"grad_clip_mode: stage")
    if cfg.bim.overlap:
        raise InputError(f"{cfg.where('overlap')}: overlap {cfg.bim.overlap} cannot run with stage_parallel "
                         f"{cfg.stage_parallel} ({where}): the next stage's loss would have to send its gradient "
                         f"back to the previous stage's processes; use overlap 0 or stage_parallel 1")
