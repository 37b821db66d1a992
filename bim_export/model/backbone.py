"""Backbones: the depth-d cut of a BIM checkpoint as a plain timm VisionTransformer.

A backbone of depth ``d`` is ``timm.create_model(arch, num_classes=0, **model_args)`` (``model_args``
holding ``depth=d``) with the checkpoint's ``blocks[:d]`` and the exit norm of depth ``d`` as its final
``norm``. Nothing project-specific is needed to load a saved one::

    timm.create_model(arch, pretrained=True, num_classes=0,
                      pretrained_cfg_overlay=dict(file="OUT/model.safetensors"), **model_args)

with ``arch`` (``architecture``) and ``model_args`` from ``OUT/config.json``, which is timm's own
format: ``model_args`` is complete (``depth`` included) because timm's ``local-dir:`` and ``hf-hub:``
sources build the model from it alone (``timm.create_model("local-dir:OUT", pretrained=True)``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..core.atomic import OutputKind, atomic_dir, check_destination
from ..core.errors import InputError
from . import classifier
from .architecture import create_vit, encoder_args
from .checkpoint import CONFIG as CHECKPOINT_CONFIG
from .checkpoint import WEIGHTS as CHECKPOINT_WEIGHTS
from .checkpoint import Checkpoint, load_checkpoint

WEIGHTS, CONFIG = "model.safetensors", "config.json"
# What a later ``bim-export backbone --out`` to the same folder may replace.
BACKBONE = OutputKind("backbone", keys=("architecture", "bim_export"), marker=CONFIG,
                      names=frozenset({WEIGHTS, CONFIG}))


def backbone_model_args(config: dict, depth: int) -> dict:
    """The ``timm.create_model`` overrides of the depth-``depth`` backbone of a checkpoint config."""
    return {**encoder_args(config.get("model_args", {})), "depth": depth}


def _check_depth(ckpt: Checkpoint, depth: int) -> None:
    try:
        ckpt.bim_config.check_depth(depth)
    except InputError as e:
        raise InputError(f"{ckpt.path}: {e}") from None


def check_resolution(config: dict, resolution: int, where: str) -> None:
    """Raises InputError (naming ``where``: a flag or a profile field) for a resolution the
    checkpoint's patches do not tile: not a positive multiple of its patch size."""
    patch = int(config.get("patch_size") or 16)
    if resolution <= 0 or resolution % patch:
        raise InputError(f"{where}: resolution {resolution} px is not a positive multiple of the checkpoint's "
                         f"patch size ({patch} px)")


def build_backbone(ckpt_or_path: Checkpoint | str | os.PathLike, depth: int, resolution: int | None = None):
    """The depth-``depth`` backbone of a checkpoint: a timm VisionTransformer, eval mode, float32.

    With ``resolution`` (px, square) other than the checkpoint's ``img_size``, the model takes that
    input size through timm's own ``set_input_size``: the position embedding is resampled by
    ``resample_abs_pos_embed`` (bicubic over the patch grid, prefix tokens kept), the patch size
    unchanged.

    Built from the checkpoint's encoder weights and that exit's norm alone (no decoders); a
    fine-tuned checkpoint's backbone also has that exit's head (``num_classes`` = its labels), so
    ``forward`` gives the logits.
    ``forward_features(x)`` gives the exit's normed tokens [B, N, D]; ``forward_head(t, pre_logits=True)``
    the pooled embedding [B, D] (the checkpoint's ``global_pool``).

    Raises:
        InputError: ``depth`` is not one of the checkpoint's exits (the message lists them),
            config.json / the weights do not describe a model (the message names the file), or
            ``resolution`` is not a multiple of the patch size.
    """
    ckpt = ckpt_or_path if isinstance(ckpt_or_path, Checkpoint) else load_checkpoint(ckpt_or_path)
    _check_depth(ckpt, depth)
    config = ckpt.bim_config
    try:
        model = create_vit(config.arch, {**config.model_args, "depth": depth},
                           num_classes=classifier.num_classes(ckpt.config))
    except InputError as e:  # model_args that no model can be built from
        raise InputError(f"{ckpt.path / CHECKPOINT_CONFIG}: {e}") from None
    try:
        model.load_state_dict(classifier.timm_state_dict(ckpt.state_dict, ckpt.config, config, depth), strict=True)
    except RuntimeError as e:  # missing, unexpected or mis-shaped weights
        raise InputError(f"{ckpt.path / CHECKPOINT_WEIGHTS}: weights do not match config.json "
                         f"({str(e).splitlines()[-1].strip()[:200]})") from None
    if resolution is not None and resolution != ckpt.config["img_size"]:
        check_resolution(ckpt.config, resolution, f"{ckpt.path}: resolution")
        model.set_input_size(img_size=(resolution, resolution))
    return model.float().eval()


def save_backbone(ckpt_or_path: Checkpoint | str | os.PathLike, depth: int, out: str | os.PathLike) -> str:
    """Saves the depth-``depth`` backbone as ``model.safetensors`` + timm ``config.json`` (atomically).

    Returns:
        a short summary with the line of Python that loads it.

    Raises:
        InputError: a bad checkpoint or depth; ``out`` holds something other than a backbone, or
            cannot be written (nothing is written).
    """
    from safetensors.torch import save_file

    ckpt = ckpt_or_path if isinstance(ckpt_or_path, Checkpoint) else load_checkpoint(ckpt_or_path)
    _check_depth(ckpt, depth)
    out = check_destination(out, BACKBONE)
    model = build_backbone(ckpt, depth)
    cfg = ckpt.config
    model_args = backbone_model_args(cfg, depth)
    size = list(model.patch_embed.img_size)
    timm_config = {
        "architecture": cfg["arch"],
        "num_classes": model.num_classes,
        "num_features": model.num_features,
        "global_pool": model.global_pool,
        "model_args": model_args,
        "pretrained_cfg": {
            "input_size": [3, *size], "fixed_input_size": True, "interpolation": "bicubic",
            "crop_pct": 1.0, "crop_mode": "center", "mean": list(cfg["mean"]), "std": list(cfg["std"]),
            "num_classes": model.num_classes, "first_conv": "patch_embed.proj", "classifier": "head",
        },
        **({"label_names": classifier.labels(cfg)} if classifier.labels(cfg) else {}),
        "bim_export": {"source_checkpoint": str(Path(ckpt.path).resolve().name), "depth": depth,
                       "exits": ckpt.exits, "step": cfg.get("step"),
                       "metrics": ckpt.metrics.get("exits", {}).get(str(depth), {})},
    }
    with atomic_dir(out, BACKBONE) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / WEIGHTS),
                  metadata={"format": "pt"})
        (tmp / CONFIG).write_text(json.dumps(timm_config, indent=2) + "\n")
    args = ", ".join(f"{k}={v!r}" for k, v in model_args.items())
    n_params = sum(p.numel() for p in model.parameters())
    return (f"{out}: depth-{depth} backbone of {cfg['arch']} ({n_params / 1e6:.2f} M parameters)\n"
            f"load: timm.create_model({cfg['arch']!r}, pretrained=True, num_classes={model.num_classes}, "
            f"pretrained_cfg_overlay=dict(file={str(out / WEIGHTS)!r}), {args})\n"
            f"  or: timm.create_model({'local-dir:' + str(out)!r}, pretrained=True)")
