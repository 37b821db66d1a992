"""Fine-tuned checkpoints: classification heads on the exits, their labels, and how they were tuned.

A fine-tuned checkpoint is the same directory as a pretrained one (:mod:`.checkpoint`); config.json
keeps every architecture key and adds ``finetune``::

    "finetune": {
        "mode": "joint" | "per_exit",
        "labels": ["class a", "class b", ...],      # class names in order; index = logit
        "source": {"checkpoint": NAME, "step": S},  # the pretrained checkpoint it started from
        "split": {...},                             # the held-out images: set, size, protocol, seed
        "settings": {...},                          # the fine-tuning recipe (FinetuneConfig)
        "preprocessing": {"img_size", "mean", "std", "resize"}
    }

weights.safetensors (decoders are not kept: a classifier does not reconstruct):

- ``joint``: one encoder shared by every exit, as in pretraining (``encoder.*``, ``exit_norms.<i>.*``),
  plus one linear head per exit, ``heads.<i>.weight`` [classes, D] and ``heads.<i>.bias`` (``i`` is
  the exit's index in ``exits``). One multi-exit graph serves every depth.
- ``per_exit``: each exit is its own model, ``exit<d>.`` + the state dict of a timm
  VisionTransformer of ``d`` blocks with its final norm and head (``head.weight``, ``head.bias``).

metrics.json per exit adds ``task_top1``, ``task_ece`` and ``task_dataset`` (name, size, protocol)
for the held-out split; the selector ranks on ``task_top1`` where it is present.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..core.errors import InputError
from .architecture import BimConfig, backbone_state_dict

FINETUNE = "finetune"
MODES = ("per_exit", "joint")


def finetune_info(config: dict) -> dict | None:
    """config.json's ``finetune`` block, or None for a pretrained (not fine-tuned) checkpoint."""
    info = config.get(FINETUNE)
    return info if isinstance(info, dict) else None


def labels(config: dict) -> list[str] | None:
    """The class names in logit order, or None for a pretrained checkpoint."""
    info = finetune_info(config)
    return list(info["labels"]) if info else None


def num_classes(config: dict) -> int:
    """Logits per image: the number of labels, 0 for a pretrained checkpoint (no head)."""
    return len(labels(config) or [])


def mode(config: dict) -> str | None:
    """``joint`` or ``per_exit`` for a fine-tuned checkpoint, None otherwise."""
    info = finetune_info(config)
    return info.get("mode") if info else None


def per_exit_prefix(depth: int) -> str:
    """The key prefix of the depth-``depth`` model in a per-exit checkpoint's weights."""
    return f"exit{depth}."


def timm_state_dict(state_dict: dict, config: dict, bim: BimConfig, depth: int) -> dict:
    """The weights of the depth-``depth`` timm ViT of a checkpoint: blocks, exit norm, and the head
    (``head.weight``, ``head.bias``) where the checkpoint is fine-tuned.

    Args:
        state_dict: the checkpoint's weights.
        config: its config.json.
        bim: its :class:`BimConfig` (``Checkpoint.bim_config``).
        depth: one of the exits.
    """
    bim.check_depth(depth)
    if mode(config) == "per_exit":
        prefix = per_exit_prefix(depth)
        return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    out = backbone_state_dict(state_dict, bim, depth)
    if finetune_info(config):
        head = f"heads.{bim.exits.index(depth)}."
        out.update({f"head.{k[len(head):]}": v for k, v in state_dict.items() if k.startswith(head)})
    return out


def joint_state_dict(encoder: dict, exit_norms: list[dict], heads: list[dict]) -> dict:
    """A joint checkpoint's weights from the shared encoder's, each exit norm's and each head's."""
    out = {f"encoder.{k}": v for k, v in encoder.items()}
    for i, norm in enumerate(exit_norms):
        out.update({f"exit_norms.{i}.{k}": v for k, v in norm.items()})
    for i, head in enumerate(heads):
        out.update({f"heads.{i}.{k}": v for k, v in head.items()})
    return out


def per_exit_state_dict(models: dict[int, dict]) -> dict:
    """A per-exit checkpoint's weights from ``{depth: that depth's timm ViT state dict (with head)}``."""
    return {per_exit_prefix(d) + k: v for d, sd in models.items() for k, v in sd.items()}


def finetuned_config(source_config: dict, *, mode: str, labels: list[str], source: dict, split: dict,
                     settings: dict, step: int) -> dict:
    """config.json of a fine-tuned checkpoint: the source's architecture keys plus ``finetune``.

    Raises:
        InputError: an unknown mode, or fewer than two labels.
    """
    if mode not in MODES:
        raise InputError(f"finetune mode must be one of {', '.join(MODES)} (got '{mode}')", field="mode")
    if len(labels) < 2:
        raise InputError(f"a classifier needs at least two classes (got {len(labels)})", field="labels")
    keep = {k: v for k, v in source_config.items()
            if k not in ("format_version", "bim_export_version", "weights_dtype", FINETUNE, "train", "step")}
    img_size = (source_config.get("model_args") or {}).get("img_size")
    return {**keep, "step": step, FINETUNE: {
        "mode": mode, "labels": list(labels), "source": dict(source), "split": dict(split),
        "settings": dict(settings),
        "preprocessing": {"img_size": img_size, "mean": list(source_config.get("mean", [])),
                          "std": list(source_config.get("std", [])),
                          "resize": "shorter side to img_size / 0.875, centre crop (bim_export.runtime.preprocess)"},
    }}


def check_same_labels(config: dict, wanted: list[str], where: str | os.PathLike) -> None:
    """Raises InputError when a fine-tuned checkpoint's labels differ from ``wanted`` (listing the difference)."""
    have = labels(config)
    if have is None or have == list(wanted):
        return
    missing, extra = sorted(set(wanted) - set(have)), sorted(set(have) - set(wanted))
    diff = "; ".join(filter(None, [f"new: {', '.join(missing)}" if missing else "",
                                   f"gone: {', '.join(extra)}" if extra else "",
                                   "same classes in another order" if not (missing or extra) else ""]))
    raise InputError(f"{Path(where) / 'config.json'}: finetune.labels: the checkpoint is already fine-tuned on "
                     f"other labels ({diff}); pass --set head=new to replace its heads")


def labels_json(config: dict) -> str | None:
    """The labels as one JSON string (ONNX ``metadata_props`` value), or None without labels."""
    names = labels(config)
    return json.dumps(names) if names else None


def head_tensors(linear: torch.nn.Linear) -> dict:
    """A head's weights as a state dict (``weight``, ``bias``), detached on the CPU."""
    return {"weight": linear.weight.detach().cpu(), "bias": linear.bias.detach().cpu()}
