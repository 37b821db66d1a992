"""The BIM training loop: AdamW with MAE's recipe, block-wise backward and per-stage updates, resume,
torchrun data parallel.

A run is a function of its settings and ``seed`` (see :mod:`bim_export.train.loader`), so a resumed
run continues exactly as an uninterrupted one would, and a run on W processes sees the same global
batch and masks as a run on one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from ..core.atomic import check_destination
from ..core.errors import InputError, TrainingError
from ..model import checkpoint as ckpt_io
from .bad_images import BadImages
from .config import TrainConfig, load_train_config
from .distributed import DistInfo, average_tensor, barrier, broadcast_parameters, init_distributed, shutdown
from .images import resolve_pipeline, training_images
from .loader import TrainStream, mask_noise
from .model import BimModel
from .optim import StageOptimizer, lr_at
from .pretrained import InitReport, init_encoder
from .run_state import check_same_checkpoint, config_json, resume_checkpoint, resume_state, save
from .stage_parallel import StageParallel, plan_layout, release_other_stages, restore_stages
from .update import Stepper, resolve_update

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------ the run


@dataclass
class TrainResult:
    """What a finished run produced."""

    path: Path
    step: int
    losses: dict[int, float]
    seconds: float
    images_per_s: float
    metrics: dict = field(default_factory=dict)
    # the trained model (on every rank; under stage_parallel, whole on rank 0, the others' stages elsewhere)
    model: BimModel | None = field(default=None, repr=False)
    is_main: bool = True  # rank 0 (or a single process): the one that wrote the checkpoint
    resumed_from: int | None = None  # the step a resumed run continued from; None: started from scratch
    init: InitReport | None = None  # the pretrained weights the encoder started from (--init)
    bad_images: str | None = None  # the unreadable images met, one line (None: all were readable)

    def summary(self) -> str:
        loss = ", ".join(f"exit {d}: {v:.4f}" for d, v in self.losses.items())
        lines = [_start_line(self.path, self.resumed_from, self.init),
                 f"{self.path}: step {self.step}, {self.seconds:.0f} s, {self.images_per_s:.1f} img/s; "
                 f"recon loss {loss}"]
        if self.bad_images:
            lines.append(self.bad_images)
        for d, m in self.metrics.get("exits", {}).items():
            if "knn_top1" in m:
                lines.append(f"  exit {d}: kNN top-1 {m['knn_top1']:.3f}"
                             + (f", linear probe {m['linear_probe_top1']:.3f}" if "linear_probe_top1" in m else ""))
        return "\n".join(lines)


def _device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise InputError("device: cuda requested but no CUDA device is available")
    return torch.device("cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
                        else "cpu")


def train(cfg: TrainConfig, resume: bool | Literal["auto"] = False, dataset=None) -> TrainResult:
    """Pretrains a BIM (or end-to-end MAE) model and writes its checkpoint to ``cfg.out``.

    Args:
        cfg: the settings.
        resume: True: continue from the checkpoint in ``cfg.out`` (model, optimizer, step, RNG), which
            must exist; ``"auto"``: continue if it exists, else start (requeued jobs); False: start,
            and ``cfg.out`` must hold no checkpoint.
        dataset: images to train on instead of ``cfg.data`` (``ds[i]`` -> tensor [3, H, W] or
            (tensor, label); float tensors are used as is, uint8 ones scaled and normalized, neither
            augmented).

    Raises:
        InputError: bad settings, data or ``--init`` weights; ``cfg.out`` holds something other than
            a checkpoint or cannot be written (all checked before training); a checkpoint in
            ``cfg.out`` without ``resume``, or none with ``resume=True``; no readable image in a
            whole batch's worth of the stream. TrainingError: non-finite loss (the last saved
            checkpoint is kept), resume from another architecture.
    """
    if resume not in (True, False, "auto"):
        raise InputError(f"resume must be True, False or 'auto' (got {resume!r})")
    device = _device(cfg)
    info = init_distributed(device.type, cfg.comm_timeout)
    try:
        return _train(cfg, resume, dataset, device, info)
    finally:
        shutdown(info)


def _train(cfg: TrainConfig, resume: bool | str, dataset, device: torch.device, info: DistInfo) -> TrainResult:
    # before any work: --out must be empty, missing or a checkpoint, and writable (else the first
    # save, minutes in, would fail or replace the user's files)
    out = check_destination(cfg.out, ckpt_io.CHECKPOINT)
    check_same_checkpoint(out, info)  # across nodes: one --out, or ranks would start from different steps
    has_ckpt = (out / ckpt_io.CONFIG).exists()
    if has_ckpt and not resume:
        raise InputError(f"{out}: already holds a checkpoint; pass --resume to continue it or pick another --out")
    if resume is True and not has_ckpt:  # a mistyped --out must not silently restart a long run
        raise InputError(f"{out}: no checkpoint to resume from (no {ckpt_io.CONFIG} there); check --out, "
                         f"or pass '--resume auto' to start when there is none")
    torch.manual_seed(cfg.seed)
    model = _build_model(cfg)  # whole, on the CPU: every layout starts from the same weights
    layout = (plan_layout(model, cfg.stage_parallel, info.world_size, info.rank, cfg.where("stage_parallel"))
              if cfg.stage_parallel > 1 else None)
    data_ranks = layout.data if layout else info.world_size
    if cfg.batch_size % (cfg.accum_steps * data_ranks):
        raise InputError(f"batch_size {cfg.batch_size} must be divisible by accum_steps x data-parallel processes "
                         f"({cfg.accum_steps} x {data_ranks})")
    sp = StageParallel(layout, info, cfg.comm_timeout, out) if layout else None
    with contextlib.ExitStack() as stack:
        if sp is not None:
            stack.callback(sp.close)
            stack.enter_context(sp.guard())
        return _run(cfg, resume, dataset, device, info, model, out, has_ckpt, sp)


def _run(cfg: TrainConfig, resume: bool | str, dataset, device: torch.device, info: DistInfo, model: BimModel,
         out: Path, has_ckpt: bool, sp: StageParallel | None) -> TrainResult:
    resuming = bool(resume) and has_ckpt
    # a resumed run's weights come from its checkpoint: --init is not read again
    init = init_encoder(model, cfg.init, cfg.where("init")) if cfg.init is not None and not resuming else None
    model.set_grad_checkpointing(cfg.grad_checkpointing)
    img_size = model.encoder.patch_embed.img_size[0]
    if dataset is None:
        dataset = _training_images(cfg, img_size, device)
    eval_set = _eval_set(cfg) if info.is_main else None  # bad eval data fails before training, not after
    resume_from = resume_checkpoint(cfg, out) if resuming else None  # the one read of it in this run
    step, log_lines, saved_optimizer = resume_state(model, cfg, resume_from) if resuming else (0, [], None)
    resumed = step if resuming else None
    saved, saved_metrics = resumed, resume_from.metrics if resuming else {}  # the last checkpoint in out
    data_info = sp.data_info if sp else info  # the ranks this one shares its stages' gradients with
    if sp is not None:
        release_other_stages(model, sp.stages)
        sp.saved_step = resumed
    model.to(device).train()
    optimizer = StageOptimizer(model, cfg, stages=sp.stages if sp else None)  # on the device: fused on CUDA
    if saved_optimizer is not None:
        optimizer.load_state_dict(saved_optimizer, out / ckpt_io.TRAIN_STATE)
    update, update_line = resolve_update(cfg)
    stepper = Stepper(optimizer, data_info, update, cfg.grad_clip, cfg.grad_clip_mode)
    if info.is_main:
        layout_line = f"; {sp.describe()}" if sp else ""
        _announce(cfg, f"{_start_line(out, resumed, init)}{_settings_note(cfg, resumed)}; {update_line}{layout_line}")
    broadcast_parameters(model, data_info)
    if cfg.compile:
        model.compile_blocks()
    amp = torch.bfloat16 if cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda") else None
    bad = BadImages(getattr(dataset, "root", "data"), saved_metrics.get("bad_images"),
                    (lambda line: _announce(cfg, line, logging.WARNING)) if info.is_main else None)
    stream = TrainStream(dataset, batch_size=cfg.batch_size, accum_steps=cfg.accum_steps, seed=cfg.seed,
                         steps=cfg.steps, start_step=step, num_workers=cfg.num_workers, info=data_info,
                         device=device, mean=cfg.mean, std=cfg.std, bad=bad)
    decoded = sp.decoded(model) if sp else model.decoded_exits  # the losses this rank computes
    recent: dict[int, list[float]] = {d: [] for d in model.decoded_exits}
    pending: list[dict] = []  # log entries since the last save (their losses filled in at the save)
    window: dict[int, dict[int, float]] = {}  # this rank's losses of each step since the last save
    bar = _progress(cfg, info, step)
    t0, imgs_done = time.perf_counter(), 0
    batches = iter(stream)
    while step < cfg.steps:
        lr = lr_at(step, cfg)
        stepper.begin(lr)
        values = _accumulate_gradients(model, batches, cfg, step, data_info, amp, device, stepper.stage_done, sp,
                                       decoded)
        stepper.finish()  # a non-finite loss below ends the run: what this step did is never saved
        values = average_tensor(values, data_info).tolist()
        if not all(math.isfinite(v) for v in values):
            raise TrainingError(
                f"non-finite loss at step {step + 1} ({', '.join(f'exit {d}: {v}' for d, v in zip(decoded, values))}); "
                f"lower the learning rate (now {lr:.3g}) or train in fp32; "
                + (f"last good checkpoint kept: {out} (step {saved})" if saved is not None
                   else "no checkpoint was saved yet"))
        step += 1
        imgs_done += cfg.batch_size
        window[step] = dict(zip(decoded, values))
        for d, v in zip(decoded, values):
            recent[d] = (recent[d] + [v])[-cfg.log_every:]
        rate = imgs_done / (time.perf_counter() - t0)
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(" ".join(f"L{d}={v:.3f}" for d, v in zip(decoded, values)) + f" {rate:.1f}img/s")
        at_log = step % cfg.log_every == 0 or step == cfg.steps
        at_save = step % cfg.save_every == 0 or step == cfg.steps
        data = bad.pool(data_info) if at_log or at_save else {}  # a step meeting a new bad image is logged
        if at_log or "bad_images_new" in data:
            pending.append({"step": step, "lr": lr, "img_per_s": round(rate, 2),
                            "elapsed_s": round(time.perf_counter() - t0, 3), "loss": None, **data})
        if at_save:
            saved_metrics = _checkpoint(model, cfg, optimizer, step, recent, window, pending, log_lines, bad, info,
                                        sp) or saved_metrics
            saved, pending, window = step, [], {}
            if sp is not None:
                sp.saved(step)
            else:
                barrier(info)
    if sp is not None:
        sp.flush()
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - t0
    metrics = {}
    if info.is_main:
        metrics = saved_metrics
        if eval_set is not None:
            metrics = _evaluate(model, cfg, eval_set, out)
    means = {d: float(np.mean(v)) for d, v in recent.items() if v}
    return TrainResult(out, step, means, seconds, imgs_done / max(seconds, 1e-9), metrics, model.eval(),
                       info.is_main, resumed, init, bad.summary())


def _checkpoint(model: BimModel, cfg: TrainConfig, optimizer: StageOptimizer, step: int,
                recent: dict[int, list[float]], window: dict[int, dict[int, float]], pending: list[dict],
                log_lines: list[str], bad: BadImages, info: DistInfo, sp: StageParallel | None) -> dict | None:
    """Saves step ``step`` from rank 0 and returns its metrics.json there (None elsewhere); a
    stage-parallel run first gathers every group's weights, optimizer state and losses there (the
    checkpoint is the single process's)."""
    state = {k: v for k, v in model.state_dict().items() if v.numel()}  # released stages are empty
    opt_state = optimizer.state_dict() if cfg.save_train_state else {"state": {}}
    if sp is not None:
        own = set(sp.decoded(model))
        shares = sp.gather({"state": state, "optimizer": opt_state["state"], "losses": window,
                            "recent": {d: v for d, v in recent.items() if d in own}}, step)
        if shares is None:
            return None
        state, opt_state["state"] = shares[0]["state"], shares[0]["optimizer"]
        for share in shares[1:]:
            state.update(share["state"])
            opt_state["state"].update(share["optimizer"])
            recent.update(share["recent"])
            for s, losses in share["losses"].items():
                window[s].update(losses)
    if not info.is_main:
        return None
    for entry in pending:
        entry["loss"] = {str(d): round(window[entry["step"]][d], 6) for d in model.decoded_exits}
    log_lines += [json.dumps(entry) for entry in pending]
    final = step == cfg.steps
    metrics = save(cfg, config_json(model, cfg, step), state, opt_state, step, recent, log_lines, final,
                   bad.record())
    if sp is not None and final:
        restore_stages(model, state)  # rank 0 returns (and evaluates) the whole trained model
    return metrics


def _training_images(cfg: TrainConfig, img_size: int, device: torch.device):
    """The images of ``cfg.data`` (else the built-in sample set), listed, a sample decoded; JPEGs left
    to the GPU on the gpu pipeline."""
    from ..core.resources import sample_images_dir

    pipeline = resolve_pipeline(cfg.data_pipeline, device, cfg.where("data_pipeline"))
    data = cfg.data if cfg.data is not None else sample_images_dir()
    images = training_images(data, img_size, decode_on_device=pipeline == "gpu", seed=cfg.seed)
    log.info("%s: %d images, %s pipeline", data, len(images), pipeline)
    return images


def _build_model(cfg: TrainConfig) -> BimModel:
    try:
        return BimModel(cfg.bim)
    except InputError as e:
        if e.field is None:
            raise
        message = str(e).removeprefix(f"{e.field}: ")
        raise InputError(f"{cfg.where(e.field)}: {message}", field=e.field) from None


def _accumulate_gradients(model: BimModel, batches, cfg: TrainConfig, step: int, info: DistInfo, amp,
                          device: torch.device, stage_done, sp: StageParallel | None = None,
                          decoded: list[int] | None = None) -> torch.Tensor:
    """Forward + backward of this rank's micro-batches of one step; returns the mean loss per decoder
    of ``decoded`` (default: all).

    ``stage_done(i)`` runs once stage ``i``'s gradients of the step are complete: after its backward
    of the last micro-batch (the earlier micro-batches only add to the gradients). Under
    stage-parallel, the rank's stages start from the previous group's tokens, and their output goes
    on to the next group.
    """
    decoded = model.decoded_exits if decoded is None else decoded
    totals = torch.zeros(len(decoded), device=device)
    for a in range(cfg.accum_steps):
        imgs = next(batches).to(device, non_blocking=True)
        noise = mask_noise(model, cfg.seed, step, a, cfg.accum_steps, cfg.batch_size, info)
        last = a == cfg.accum_steps - 1
        x = None
        if sp is not None and sp.prev is not None:
            x = sp.recv(model.token_shape(imgs.shape[0]), device, step, more=step < cfg.steps - 1 or not last)
        losses = model.forward_backward(imgs, noise, 1.0 / cfg.accum_steps, amp, stage_done if last else None,
                                        stages=sp.stages if sp else None, x=x)
        if sp is not None:
            sp.send(losses.tokens, step)
        totals += torch.stack([losses.losses[d] for d in decoded]) / cfg.accum_steps
    return totals


def _start_line(out: Path, resumed: int | None, init: InitReport | None = None) -> str:
    if resumed is not None:
        return f"{out}: resumed from step {resumed}"
    return f"{out}: " + (f"started from pretrained weights {init.describe()}" if init else "started from scratch")


def _settings_note(cfg: TrainConfig, resumed: int | None) -> str:
    """For the start line of a resumed run: whose training settings it runs with."""
    if resumed is None or cfg.stored_from is None:
        return ""
    given = cfg.given_over_stored()
    return (f" with the training settings stored in {cfg.stored_from}"
            + (f", changed: {', '.join(given)}" if given else ""))


def _announce(cfg: TrainConfig, line: str, level: int = logging.INFO) -> None:
    """A line for the run's log: through the progress bar's channel when there is one, else logged
    at ``level``."""
    if not cfg.progress:
        log.log(level, line)
        return
    import sys

    from tqdm import tqdm

    log.info(line)
    tqdm.write(line, file=sys.stderr)


def _progress(cfg: TrainConfig, info: DistInfo, step: int):
    if not (cfg.progress and info.is_main):
        return None
    from tqdm import tqdm

    return tqdm(total=cfg.steps, initial=step, desc="bim" if cfg.bim.mode == "bim" else "mae", unit="step",
                dynamic_ncols=True)


def _eval_set(cfg: TrainConfig):
    if cfg.eval_data is None:
        return None
    from .evaluate import load_eval_data

    return load_eval_data(cfg.eval_data)


def _evaluate(model: BimModel, cfg: TrainConfig, eval_set, out: Path) -> dict:
    """kNN / linear probe of every exit on the evaluation set, merged into metrics.json."""
    from .evaluate import evaluate_model

    model.eval()
    results = evaluate_model(model, eval_set, model.encoder.patch_embed.img_size[0], cfg.mean, cfg.std,
                             limit=cfg.eval_limit)
    return ckpt_io.update_exit_metrics(out, results)


def train_from_cli(config_file=None, data=None, model=None, exits=None, out=None, eval_data=None, init=None,
                   overrides=None, resume: bool | Literal["auto"] = False) -> str:
    """``bim-export train``: settings from the YAML file, flags and ``--set`` (on top of the checkpoint's
    stored settings when resuming); returns a short summary."""
    cfg = load_train_config(config_file, overrides, resume=bool(resume), data=data, model=model, exits=exits,
                            out=out, eval_data=eval_data, init=init)
    result = train(cfg, resume=resume)
    return result.summary() if result.is_main else ""
