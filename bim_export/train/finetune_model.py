"""The classifiers a fine-tuning run trains, built from a checkpoint and saved back in the layout of
:mod:`bim_export.model.classifier`.

- :class:`JointClassifier`: one timm encoder shared by every exit, each exit's norm and a linear head
  on its pooled tokens (:func:`~bim_export.model.architecture.exit_tokens`: all exits in one pass).
- :class:`PerExitClassifier`: one timm VisionTransformer of ``d`` blocks with its head per exit
  (:func:`~bim_export.model.backbone.build_backbone`), trained side by side on the same batches but
  sharing nothing: the summed loss gives each model its own gradient, and AdamW steps each parameter
  on its own, so this equals fine-tuning each depth in a run of its own.

Both give one logits tensor [B, classes] per exit from ``forward`` and their AdamW groups with timm's
layer-wise learning-rate decay (:func:`timm.optim.param_groups_layer_decay`).
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.errors import InputError
from ..model import classifier
from ..model.architecture import create_vit, exit_tokens
from ..model.backbone import build_backbone
from ..model.checkpoint import Checkpoint
from .loader import _mix

HEAD_INIT_STD = 2e-5  # MAE's fine-tuning head: near-zero logits at the start


def fresh_head(dim: int, classes: int, seed: int, depth: int) -> dict[str, torch.Tensor]:
    """A new head's weights, seeded by (seed, depth): the same in either mode."""
    gen = torch.Generator().manual_seed(_mix(seed, 4, depth))
    return {"weight": torch.randn(classes, dim, generator=gen) * HEAD_INIT_STD, "bias": torch.zeros(classes)}


class JointClassifier(nn.Module):
    """One encoder, an exit norm and a head per exit; ``forward(x)`` -> [logits [B, C] per exit]."""

    def __init__(self, encoder, exits: list[int], classes: int):
        super().__init__()
        self.encoder, self.exits = encoder, list(exits)
        dim = encoder.embed_dim
        self.exit_norms = nn.ModuleList([nn.LayerNorm(dim, eps=1e-6) for _ in exits])
        self.heads = nn.ModuleList([nn.Linear(dim, classes) for _ in exits])

    @property
    def img_size(self) -> int:
        return int(self.encoder.patch_embed.img_size[0])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        # x: [B, 3, H, W] -> tokens [B, P + N, D] per exit -> pooled [B, D] as the backbone pools -> logits
        tokens = exit_tokens(self.encoder, x, self.exits, self.exit_norms)
        return [head(self.encoder.forward_head(t, pre_logits=True)) for head, t in zip(self.heads, tokens)]

    def group_matcher(self, coarse: bool = False) -> dict:
        """timm's layer grouping of the encoder; exit norms and heads with the last layer."""
        return dict(stem=r"^encoder\.(?:cls_token|reg_token|pos_embed|patch_embed|norm_pre)",
                    blocks=[(r"^encoder\.blocks\.(\d+)", None), (r"^(?:exit_norms|heads)\.", (99999,))])

    def param_groups(self, weight_decay: float, layer_decay: float) -> list[dict]:
        from timm.optim import param_groups_layer_decay

        skip = [f"encoder.{n}" for n in self.encoder.no_weight_decay()]
        return param_groups_layer_decay(self, weight_decay, no_weight_decay_list=skip, layer_decay=layer_decay)

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """The weights in the joint layout (``encoder.*``, ``exit_norms.<i>.*``, ``heads.<i>.*``)."""
        return classifier.joint_state_dict(self.encoder.state_dict(), [n.state_dict() for n in self.exit_norms],
                                           [classifier.head_tensors(h) for h in self.heads])


class PerExitClassifier(nn.Module):
    """A timm ViT with its head per exit; ``forward(x)`` -> [logits [B, C] per exit]."""

    def __init__(self, models: dict[int, nn.Module]):
        super().__init__()
        self.exits = sorted(models)
        self.models = nn.ModuleDict({str(d): models[d] for d in self.exits})

    @property
    def img_size(self) -> int:
        return int(self.models[str(self.exits[0])].patch_embed.img_size[0])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self.models[str(d)](x) for d in self.exits]

    def param_groups(self, weight_decay: float, layer_decay: float) -> list[dict]:
        from timm.optim import param_groups_layer_decay

        return [g for d in self.exits for g in param_groups_layer_decay(
            self.models[str(d)], weight_decay, no_weight_decay_list=list(self.models[str(d)].no_weight_decay()),
            layer_decay=layer_decay)]

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """The weights in the per-exit layout (``exit<d>.`` + that depth's timm state dict)."""
        return classifier.per_exit_state_dict({d: self.models[str(d)].state_dict() for d in self.exits})


def build_classifier(src: Checkpoint, mode: str, exits: list[int], classes: int, keep_heads: bool,
                     drop_path: float, seed: int) -> JointClassifier | PerExitClassifier:
    """The classifier of ``exits`` to fine-tune, from checkpoint ``src`` (pretrained or fine-tuned).

    Args:
        keep_heads: start from ``src``'s heads (a fine-tuned checkpoint with the same labels); else
            fresh ones (:func:`fresh_head`).
        drop_path: stochastic depth rate of each model's deepest block.

    Raises:
        InputError: a joint run from a per-exit checkpoint (its exits share no encoder).
    """
    bim = src.bim_config
    for d in exits:
        bim.check_depth(d)
    if mode == "per_exit":
        models = {}
        for d in exits:
            state = build_backbone(src, d).state_dict()
            vit = create_vit(bim.arch, {**bim.model_args, "depth": d}, num_classes=classes, drop_path_rate=drop_path)
            if not keep_heads:
                state = {k: v for k, v in state.items() if not k.startswith("head.")}
                state.update({f"head.{k}": v for k, v in fresh_head(vit.embed_dim, classes, seed, d).items()})
            vit.load_state_dict(state)
            models[d] = vit
        return PerExitClassifier(models)
    if classifier.mode(src.config) == "per_exit":
        raise InputError(f"{src.path}: a per_exit checkpoint has no encoder its exits share, so it continues only "
                         f"in mode per_exit (pass --set mode=per_exit, or start from the pretrained checkpoint)")
    top = max(exits)
    encoder = create_vit(bim.arch, {**bim.model_args, "depth": top}, final_norm=False, drop_path_rate=drop_path)
    state = {k[len("encoder."):]: v for k, v in src.state_dict.items() if k.startswith("encoder.")
             and not (k.startswith("encoder.blocks.") and int(k.split(".")[2]) >= top)}
    encoder.load_state_dict(state)
    model = JointClassifier(encoder, exits, classes)
    for j, d in enumerate(exits):
        i = bim.exits.index(d)
        norm = {k.split(".", 2)[2]: v for k, v in src.state_dict.items() if k.startswith(f"exit_norms.{i}.")}
        model.exit_norms[j].load_state_dict(norm)
        head = ({k.split(".", 2)[2]: v for k, v in src.state_dict.items() if k.startswith(f"heads.{i}.")}
                if keep_heads else fresh_head(encoder.embed_dim, classes, seed, d))
        model.heads[j].load_state_dict(head)
    return model


def finetuned_arch(source_config: dict, exits: list[int]) -> dict:
    """The source config.json with its architecture cut to ``exits`` (the deepest one is the depth)."""
    top = max(exits)
    return {**source_config, "exits": list(exits), "depth": top,
            "model_args": {**source_config.get("model_args", {}), "depth": top}}
