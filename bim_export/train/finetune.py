"""Fine-tuning every exit of a checkpoint on a labelled folder: the loop, resume, torchrun, metrics.

A run is a function of its settings and ``seed``: the images of step ``s``, their augmentation
(:class:`~bim_export.train.finetune_data.AugmentedImages`) and the step's drop path are seeded by
``(seed, s)``, so a run resumed from a step checkpoint (``train_state.pt``, saved every
``save_every`` steps) ends with the weights of an uninterrupted one, and W processes under torchrun
see the global batch of one (gradients averaged by
:class:`~bim_export.train.distributed.GradientReducer`).

The checkpoint written to ``out`` is the fine-tuned layout of :mod:`bim_export.model.classifier`;
its metrics.json gives per exit ``task_top1`` and ``task_ece`` on the held-out images.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from ..core.atomic import check_destination
from ..core.errors import InputError, TrainingError
from ..core.progress import SILENT, Progress
from ..model import checkpoint as ckpt_io
from ..model import classifier
from .distributed import DistInfo, GradientReducer, average_tensor, barrier, broadcast_parameters, init_distributed, \
    shutdown
from .finetune_config import FinetuneConfig, load_finetune_config
from .finetune_data import AugmentedImages, HeldOut, LabelledSplit, load_labelled, train_transform
from .finetune_model import build_classifier, finetuned_arch, probe_heads
from .run_state import check_same_checkpoint
from .loader import StepSampler, _mix
from .task import task_metrics

log = logging.getLogger(__name__)


def finetune(checkpoint: str | os.PathLike, data: str | os.PathLike, out: str | os.PathLike, *,
             val_data: str | os.PathLike | None = None, config: FinetuneConfig | None = None,
             resume: bool | str | None = None, progress: Progress = SILENT) -> Path:
    """Fine-tunes every exit of ``checkpoint`` (or ``config.exits``) on the labelled folder ``data``.

    Args:
        checkpoint: a pretrained checkpoint, or a fine-tuned one (same labels: its heads are the start;
            ``head: new``: fresh heads).
        data: labelled images, one sub-folder per class.
        out: the fine-tuned checkpoint's directory (written atomically at every save).
        val_data: held-out images (same classes); default: a stratified ``val_fraction`` of ``data``.
        config: the settings (default :class:`FinetuneConfig`); resuming without one takes the run's
            stored settings.
        resume: None / False: start (``out`` must hold no checkpoint); True: continue the run in
            ``out``, which must exist; ``"auto"``: continue it if there is one, else start.
        progress: receives a line per epoch (loss, training and held-out accuracy).

    Returns:
        ``out``.

    Raises:
        InputError: bad data, settings or checkpoint, or an ``out`` that may not be written (all
            checked before training; nothing is written). TrainingError: a non-finite loss.
    """
    if resume not in (None, False, True, "auto"):
        raise InputError(f"resume must be None, True or 'auto' (got {resume!r})")
    out = check_destination(out, ckpt_io.CHECKPOINT)
    has_run = (out / ckpt_io.CONFIG).exists()
    if has_run and not resume:
        raise InputError(f"{out}: already holds a checkpoint; pass --resume to continue it or pick another --out")
    if resume is True and not has_run:
        raise InputError(f"{out}: no checkpoint to resume from (no {ckpt_io.CONFIG} there); check --out, "
                         f"or pass '--resume auto' to start when there is none")
    prev = _resumable(out) if resume and has_run else None
    if config is None:
        config = (load_finetune_config(stored=classifier.finetune_info(prev.config)["settings"],
                                       stored_from=str(out / ckpt_io.CONFIG)) if prev else FinetuneConfig())
    src = ckpt_io.load_checkpoint(checkpoint)
    split = load_labelled(data, val_data, config.val_fraction, config.seed)
    keep = classifier.finetune_info(src.config) is not None and config.head == "keep"
    if keep:
        classifier.check_same_labels(src.config, split.classes, src.path)
    exits = _exits(config, src)
    if prev is not None:
        _check_same_run(prev, config, split, exits)
    device = _device(config)
    info = init_distributed(device.type, config.comm_timeout)
    try:
        check_same_checkpoint(out, info)  # across nodes: one --out, or ranks would start from different steps
        return _run(config, src, prev, split, exits, keep, out, device, info, progress)
    finally:
        shutdown(info)


def _resumable(out: Path) -> ckpt_io.Checkpoint:
    prev = ckpt_io.load_checkpoint(out)
    if classifier.finetune_info(prev.config) is None:
        raise InputError(f"{out}: holds a pretrained checkpoint, not a fine-tuning run to resume; pick another --out")
    return prev


def _exits(cfg: FinetuneConfig, src: ckpt_io.Checkpoint) -> list[int]:
    have = list(src.exits)
    wanted = sorted(set(cfg.exits)) if cfg.exits else have
    wrong = [d for d in wanted if d not in have]
    if wrong:
        raise InputError(f"{cfg.where('exits')}: {', '.join(map(str, wrong))} not an exit of {src.path}; "
                         f"exits: {', '.join(map(str, have))}")
    return wanted


def _check_same_run(prev: ckpt_io.Checkpoint, cfg: FinetuneConfig, split: LabelledSplit, exits: list[int]) -> None:
    """A resumed run must be the one in ``out``: same mode, exits, labels and held-out images."""
    info, where = classifier.finetune_info(prev.config), prev.path / ckpt_io.CONFIG
    for name, have, want in (("mode", info["mode"], cfg.mode), ("exits", prev.exits, exits),
                             ("labels", info["labels"], split.classes),
                             ("split.heldout_files", info["split"].get("heldout_files"),
                              split.record["heldout_files"])):
        if have != want:
            raise InputError(f"{where}: finetune.{name}: the run in it differs from this one's "
                             f"({_short(have)} there, {_short(want)} now); pick another --out to start afresh")


def _short(v) -> str:
    return f"{len(v)} files" if isinstance(v, list) and len(v) > 6 else json.dumps(v)


def _device(cfg: FinetuneConfig) -> torch.device:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise InputError(f"{cfg.where('device')}: cuda requested but no CUDA device is available")
    return torch.device("cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
                        else "cpu")


def _run(cfg: FinetuneConfig, src: ckpt_io.Checkpoint, prev: ckpt_io.Checkpoint | None, split: LabelledSplit,
         exits: list[int], keep: bool, out: Path, device: torch.device, info: DistInfo, progress: Progress) -> Path:
    n_classes, mean, std = len(split.classes), src.config["mean"], src.config["std"]
    if cfg.batch_size % info.world_size:
        raise InputError(f"{cfg.where('batch_size')}: {cfg.batch_size} is not divisible by the "
                         f"{info.world_size} processes")
    local = cfg.batch_size // info.world_size
    if (cfg.mixup or cfg.cutmix) and local % 2:
        raise InputError(f"{cfg.where('batch_size')}: Mixup / CutMix need an even batch per process (got {local})")
    start = prev if prev is not None else src
    torch.manual_seed(cfg.seed)
    model = build_classifier(start, cfg.mode, exits, n_classes, keep or prev is not None, cfg.drop_path, cfg.seed)
    model.to(device).train()
    if prev is None and not keep and cfg.head_init == "probe":
        train_images = HeldOut(split.train, model.img_size, mean, std)
        probe_heads(model, train_images.batches(), train_images.labels, n_classes, cfg.label_smoothing)
    from timm.optim import create_optimizer_v2
    from timm.scheduler import CosineLRScheduler

    optimizer = create_optimizer_v2(model.param_groups(cfg.weight_decay, cfg.layer_decay), opt="adamw", lr=cfg.lr,
                                    weight_decay=cfg.weight_decay)
    steps, warmup, per_epoch = cfg.steps_for(len(split.train))
    schedule = CosineLRScheduler(optimizer, t_initial=steps, lr_min=cfg.min_lr, warmup_t=warmup,
                                 warmup_lr_init=cfg.min_lr, t_in_epochs=False)
    step, log_lines = 0, []
    window: list[tuple[list[float], list[float]]] = []  # (losses, top-1) per exit of each step since the last log line
    if prev is not None:
        state = prev.load_train_state()
        optimizer.load_state_dict(state["optimizer"])
        step, window = int(state["step"]), [tuple(w) for w in state.get("window", [])]
        log_lines = (prev.path / ckpt_io.LOG).read_text().splitlines() if (prev.path / ckpt_io.LOG).exists() else []
    broadcast_parameters(model, info)
    img_size = model.img_size
    heldout = HeldOut(split.heldout, img_size, mean, std) if info.is_main else None
    loader = _loader(cfg, split, img_size, mean, std, step, steps, info, device)
    criterion, mixup = _criterion(cfg, n_classes)
    amp = torch.bfloat16 if cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda") else None
    reducer = GradientReducer(info)
    params = [p for p in model.parameters() if p.requires_grad]
    progress = progress if info.is_main else SILENT
    record = _Record(cfg, src if prev is None else prev, split, exits, out, log_lines, prev)
    epochs = math.ceil(steps / per_epoch)
    epoch_end = lambda k: min(steps, k * per_epoch)  # noqa: E731 - the step that ends epoch k
    done_epochs = sum(epoch_end(k) <= step for k in range(1, epochs + 1))
    epoch_window: list[tuple[list[float], list[float]]] = []  # for the progress line
    t0 = time.perf_counter()
    with progress.stage("fine-tune", total=epochs, scope=f"{out.name}: {cfg.mode}") as stage:
        stage.done = done_epochs
        for x, y in loader:
            torch.manual_seed(_mix(cfg.seed, 6, step, info.rank))  # this step's drop path, whatever ran before
            schedule.step_update(step)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            target = y
            if mixup is not None:
                np.random.seed(_mix(cfg.seed, 5, step, info.rank) % 2**32)
                x, target = mixup(x, y)
            with torch.autocast(device.type, dtype=amp) if amp is not None else _null():
                logits = model(x)
            losses = [criterion(z.float(), target) for z in logits]
            optimizer.zero_grad(set_to_none=True)
            sum(losses).backward()
            reducer.launch("all", params)
            reducer.wait("all")
            if cfg.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            figures = torch.stack([torch.stack([loss.detach() for loss in losses]),
                                   torch.stack([(z.detach().argmax(1) == y).float().mean() for z in logits])])
            figures = average_tensor(figures, info).cpu().tolist()
            if not all(math.isfinite(v) for v in figures[0]):
                kept = f"last good checkpoint kept: {out}" if record.saved else "no checkpoint was saved yet"
                raise TrainingError(f"non-finite loss at step {step + 1} ({figures[0]}); lower lr (now "
                                    f"{optimizer.param_groups[-1]['lr']:.3g}) or fine-tune in fp32; {kept}")
            step += 1
            window.append((figures[0], figures[1]))
            epoch_window.append((figures[0], figures[1]))
            if step % cfg.log_every == 0 or step == steps:
                record.log(step, optimizer.param_groups[-1]["lr"], window, time.perf_counter() - t0)
                window = []
            if step == epoch_end(done_epochs + 1):
                done_epochs += 1
                scores = _score(model, heldout, exits, device) if heldout is not None and (
                    cfg.eval_each_epoch or step == steps) else None
                stage.step(_epoch_line(done_epochs, epochs, epoch_window, scores, exits), what="epoch")
                epoch_window = []
            if step % cfg.save_every == 0 or step == steps:
                final = step == steps
                if info.is_main:
                    scores = _score(model, heldout, exits, device) if final else None
                    record.save(model, optimizer, step, window, scores)
                barrier(info)
    return out


def _null():
    import contextlib

    return contextlib.nullcontext()


def _loader(cfg: FinetuneConfig, split: LabelledSplit, img_size: int, mean, std, start: int, steps: int,
            info: DistInfo, device: torch.device):
    transform = train_transform(img_size, mean, std, cfg.crop_scale, cfg.hflip, cfg.randaugment)
    sampler = StepSampler(len(split.train), cfg.batch_size, 1, info, cfg.seed, start, steps)
    return torch.utils.data.DataLoader(AugmentedImages(split.train, transform, cfg.seed), sampler=sampler,
                                       batch_size=cfg.batch_size // info.world_size, num_workers=cfg.num_workers,
                                       pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(0))


def _criterion(cfg: FinetuneConfig, n_classes: int):
    """The loss and, when Mixup or CutMix is on, timm's batch mixer (whose soft targets carry the smoothing)."""
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if cfg.mixup > 0 or cfg.cutmix > 0:
        return SoftTargetCrossEntropy(), Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix,
                                               label_smoothing=cfg.label_smoothing, num_classes=n_classes)
    if cfg.label_smoothing > 0:
        return LabelSmoothingCrossEntropy(cfg.label_smoothing), None
    return torch.nn.CrossEntropyLoss(), None


def exit_logits(model, batches, device: torch.device) -> list[np.ndarray]:
    """Logits [N, C] per exit of a classifier (a model whose forward gives one tensor per exit), eval mode, fp32."""
    was = model.training
    model.eval()
    outs: list[list[np.ndarray]] = []
    try:
        with torch.inference_mode():
            for x in batches:
                got = model(torch.as_tensor(x).to(device))
                outs = outs or [[] for _ in got]
                for acc, z in zip(outs, got):
                    acc.append(z.float().cpu().numpy())
    finally:
        model.train(was)
    return [np.concatenate(o) for o in outs]


def _score(model, heldout: HeldOut, exits: list[int], device: torch.device) -> dict[int, dict]:
    return {d: task_metrics(z, heldout.labels) for d, z in zip(exits, exit_logits(model, heldout.batches(), device))}


def _epoch_line(k: int, epochs: int, window, scores: dict | None, exits: list[int]) -> str:
    loss = np.mean([w[0] for w in window], axis=0)
    acc = np.mean([w[1] for w in window], axis=0)
    text = (f"{k}/{epochs}: loss {' / '.join(f'{v:.3f}' for v in loss)}, "
            f"train top-1 {' / '.join(f'{v:.3f}' for v in acc)}")
    if scores:
        text += ", held-out top-1 " + " / ".join(f"{scores[d]['task_top1']:.3f}" for d in exits)
    return text + f" (exit{'s' * (len(exits) > 1)} {' / '.join(map(str, exits))})"


class _Record:
    """What the run writes: log lines, step checkpoints and the final one with its metrics (rank 0)."""

    def __init__(self, cfg: FinetuneConfig, start: ckpt_io.Checkpoint, split: LabelledSplit, exits: list[int],
                 out: Path, log_lines: list[str], prev: ckpt_io.Checkpoint | None):
        self.cfg, self.split, self.exits, self.out, self.lines = cfg, split, exits, out, list(log_lines)
        self.saved = prev is not None
        if prev is not None:
            self.source = classifier.finetune_info(prev.config)["source"]
        else:
            self.source = {"checkpoint": Path(start.path).resolve().name, "step": start.config.get("step")}
        self.arch = finetuned_arch(start.config, exits)
        self.pending: list[str] = []
        self.last_loss: dict[str, float] = {}  # of the last log line

    def log(self, step: int, lr: float, window, seconds: float) -> None:
        self.last_loss = {str(d): round(float(np.mean([w[0][i] for w in window])), 6) for i, d in enumerate(self.exits)}
        self.pending.append(json.dumps({
            "step": step, "lr": lr, "elapsed_s": round(seconds, 3), "loss": self.last_loss,
            "train_top1": {str(d): round(float(np.mean([w[1][i] for w in window])), 6)
                           for i, d in enumerate(self.exits)}}))

    def save(self, model, optimizer, step: int, window, scores: dict | None) -> None:
        self.lines += self.pending
        self.pending = []
        if not self.last_loss and self.lines:
            self.last_loss = json.loads(self.lines[-1]).get("loss", {})
        exits = {str(d): ({"train_loss": self.last_loss[str(d)]} if str(d) in self.last_loss else {})
                 for d in self.exits}
        split = self.split.record
        for d, m in (scores or {}).items():
            exits[str(d)].update(m, task_dataset={"name": split["name"], "size": split["size"],
                                                  "protocol": split["protocol"]})
        config = classifier.finetuned_config(self.arch, mode=self.cfg.mode, labels=self.split.classes,
                                             source=self.source, split=split,
                                             settings=self.cfg.model_dump(mode="json"), step=step)
        state = {"optimizer": optimizer.state_dict(), "step": step, "window": [list(w) for w in window]}
        ckpt_io.save_checkpoint(self.out, model.checkpoint_state(), config, {"step": step, "exits": exits}, state,
                                self.lines)
        self.saved = True


def summary(out: str | os.PathLike) -> str:
    """A few lines on a fine-tuned checkpoint: what it was tuned on and its held-out figures per exit."""
    ck = ckpt_io.load_checkpoint(out, weights=False)
    info = classifier.finetune_info(ck.config) or {}
    split = info.get("split", {})
    lines = [f"{out}: fine-tuned ({info.get('mode')}) from {info.get('source', {}).get('checkpoint')}, "
             f"{len(info.get('labels', []))} classes, step {ck.config.get('step')}; held-out: {split.get('name')} "
             f"({split.get('size')} images; {split.get('protocol')})"]
    for d, m in sorted(ck.metrics.get("exits", {}).items(), key=lambda kv: int(kv[0])):
        if "task_top1" in m:
            lines.append(f"  exit {d}: top-1 {m['task_top1']:.3f}, ECE {m['task_ece']:.3f}")
    return "\n".join(lines)


def finetune_from_cli(checkpoint, data, out, val_data=None, config_file=None, overrides=None, resume=None,
                      progress: Progress = SILENT) -> str:
    """``bim-export finetune``: settings from the YAML file and ``--set`` (on top of the run's stored
    settings when resuming); returns the summary (empty on ranks other than 0)."""
    out = Path(out)
    stored = None
    if resume and (out / ckpt_io.CONFIG).is_file():
        stored = (classifier.finetune_info(_resumable(out).config) or {}).get("settings")
    cfg = load_finetune_config(config_file, overrides, stored=stored, stored_from=str(out / ckpt_io.CONFIG))
    finetune(checkpoint, data, out, val_data=val_data, config=cfg, resume=resume, progress=progress)
    return summary(out) if int(os.environ.get("RANK", "0")) == 0 else ""
