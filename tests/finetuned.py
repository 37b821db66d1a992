"""Fine-tuned checkpoints for tests of the deploy side, made without training: the source's encoder
with a linear head per exit (seeded random weights, scaled so that the top-1 classes vary over
images). The layout is :mod:`bim_export.model.classifier`'s, written by its own helpers."""

from __future__ import annotations

from pathlib import Path

import torch

from bim_export.core.resources import default_checkpoint_dir
from bim_export.model import classifier
from bim_export.model.backbone import build_backbone
from bim_export.model.checkpoint import load_checkpoint, save_checkpoint


def make_finetuned(out: Path, mode: str = "joint", labels=("cat", "dog", "fish"), source=None,
                   seed: int = 0, metrics: dict | None = None) -> Path:
    """Writes a fine-tuned checkpoint of ``source`` (default: the shipped one) to ``out``."""
    src = load_checkpoint(source or default_checkpoint_dir())
    bim = src.bim_config
    gen = torch.Generator().manual_seed(seed)
    dim = int(src.state_dict["encoder.cls_token"].shape[-1]) if "encoder.cls_token" in src.state_dict else \
        int(src.state_dict["encoder.pos_embed"].shape[-1])
    heads = [{"weight": torch.randn(len(labels), dim, generator=gen) * 4 / dim ** 0.5,
              "bias": torch.randn(len(labels), generator=gen) * 0.1} for _ in bim.exits]
    if mode == "joint":
        encoder = {k[len("encoder."):]: v for k, v in src.state_dict.items() if k.startswith("encoder.")}
        norms = [{k.split(".", 2)[2]: v for k, v in src.state_dict.items() if k.startswith(f"exit_norms.{i}.")}
                 for i in range(len(bim.exits))]
        weights = classifier.joint_state_dict(encoder, norms, heads)
    else:
        models = {}
        for i, d in enumerate(bim.exits):
            sd = build_backbone(src, d).state_dict()
            sd.update({f"head.{k}": v for k, v in heads[i].items()})
            models[d] = sd
        weights = classifier.per_exit_state_dict(models)
    split = {"name": "test", "size": 30, "protocol": "untrained heads (tests)", "seed": seed}
    config = classifier.finetuned_config(src.config, mode=mode, labels=list(labels), source={"checkpoint": src.path.name},
                                         split=split, settings={}, step=0)
    return save_checkpoint(out, weights, config, metrics=metrics)
