"""What a run saves and resumes from: the checkpoint of a step (weights, config, metrics, log) and
the state a resumed run continues with (optimizer, step, RNG).

The state is passed as plain dictionaries, not as the model and optimizer themselves, so that a
stage-parallel run can save what its ranks gathered: the checkpoint is the same whatever layout
made it, and any layout resumes it.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..core.errors import InputError, TrainingError
from ..model import checkpoint as ckpt_io
from .config import TrainConfig
from .distributed import DistInfo
from .model import BimModel

ARCH_KEYS = ("arch", "model_args", "exits", "mode", "decoder", "last_decoder")  # must match to resume


def rng_state() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def config_json(model: BimModel, cfg: TrainConfig, step: int) -> dict:
    return {**model.arch_config(), "mean": list(cfg.mean), "std": list(cfg.std), "step": step,
            "train": cfg.model_dump(mode="json")}


def resume_checkpoint(cfg: TrainConfig, out: Path) -> ckpt_io.Checkpoint:
    """The checkpoint a resumed run continues from: the one its settings were read with, else read
    here, once (without its weights: :func:`resume_state` reads those)."""
    return cfg.resume_from if cfg.resume_from is not None else ckpt_io.load_checkpoint(out, weights=False)


def resume_state(model: BimModel, cfg: TrainConfig, ck: ckpt_io.Checkpoint) -> tuple[int, list[str], dict]:
    """Loads the model's weights, the step and the RNG from the checkpoint ``ck`` (read once, see
    :func:`resume_checkpoint`); returns (step, log lines, the optimizer's saved state).

    Raises:
        TrainingError: the checkpoint is of another architecture.
    """
    new = model.arch_config()
    stored = {"last_decoder": ck.config.get("decoder"), **ck.config}  # older checkpoints: one decoder size
    diff = [k for k in ARCH_KEYS if json.dumps(stored.get(k), sort_keys=True) != json.dumps(new[k], sort_keys=True)]
    if diff:
        k = diff[0]
        raise TrainingError(f"{cfg.out}: cannot resume, the checkpoint's {k} is {stored.get(k)} but this run's "
                            f"is {new[k]} (another architecture; pick a new --out)")
    model.load_state_dict(ck.load_weights())
    state = ck.load_train_state()
    set_rng_state(state["rng"])
    lines = (ck.path / ckpt_io.LOG).read_text().splitlines() if (ck.path / ckpt_io.LOG).exists() else []
    return int(state["step"]), lines, state["optimizer"]


def saved_step(out: Path) -> int | None:
    """The step of the checkpoint in ``out`` as on disk now (None: none there, or unreadable): what a
    stage-parallel rank names when another process may have written it since it last heard."""
    try:
        return json.loads((out / ckpt_io.CONFIG).read_text()).get("step")
    except (OSError, json.JSONDecodeError):
        return None


def check_same_checkpoint(out: Path, info: DistInfo) -> None:
    """Checks that every rank sees the same checkpoint in ``out`` (or none): each node reads its own
    ``out``, so a run across nodes needs it on storage they share (or the same copy on each), or
    ranks would start from different steps.

    Raises:
        InputError: on every rank, naming the first rank whose view differs from rank 0's.
    """
    if not info.enabled:
        return
    views: list = [None] * info.world_size
    dist.all_gather_object(views, saved_step(out), group=info.group)
    odd = next((r for r, v in enumerate(views) if v != views[0]), None)
    if odd is not None:
        def seen(step):
            return "no checkpoint" if step is None else f"the checkpoint of step {step}"

        raise InputError(f"{out}: rank {odd} sees {seen(views[odd])} there but rank 0 sees {seen(views[0])}: "
                         f"--out must be one folder every node reads (shared storage), or the same copy on each")


def save(cfg: TrainConfig, config: dict, state_dict: dict[str, torch.Tensor], optimizer_state: dict, step: int,
         recent: dict[int, list[float]], log_lines: list[str], final: bool, bad_images: dict | None = None) -> dict:
    """Writes the checkpoint of step ``step`` to ``cfg.out`` (atomically); returns its metrics.json.

    Args:
        config: config.json's content (:func:`config_json`).
        state_dict: the whole model's weights.
        optimizer_state: :meth:`~bim_export.train.optim.StageOptimizer.state_dict` of every stage.
        recent: the last logged losses per decoded exit (their mean goes to metrics.json).
        final: the run's last save (stored in ``cfg.weights_dtype``; the others stay fp32).
    """
    metrics = {"step": step, "exits": {str(d): {"recon_loss": float(np.mean(v))} for d, v in recent.items() if v}}
    if bad_images:
        metrics["bad_images"] = bad_images
    train_state = None
    if cfg.save_train_state:
        train_state = {"optimizer": optimizer_state, "step": step, "rng": rng_state(),
                       "schedule": {"name": "cosine", "warmup_steps": cfg.warmup, "steps": cfg.steps,
                                    "peak_lr": cfg.peak_lr, "min_lr": cfg.min_lr}}
    ckpt_io.save_checkpoint(cfg.out, state_dict, config, metrics, train_state, log_lines,
                            cfg.weights_dtype if final else "fp32")
    return json.loads(json.dumps(metrics))  # as a reader of metrics.json sees it
