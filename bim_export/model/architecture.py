"""The architecture of a BIM model, shared by training and deployment: ``BimConfig`` and the timm encoder.

:class:`BimConfig` is the one config object of the model (nanoGPT's ``GPTConfig``): which timm ViT
(``arch`` + ``model_args``), where its stages end (``exits``), the decoders, the mask and the loss.
``TrainConfig`` nests it, ``config.json`` stores it, ``BimModel(config)`` takes it, and the backbones
and the exporter read it back from a checkpoint.

:func:`exit_tokens` is the one exit API: normed tokens after ``blocks[:d]`` for each exit ``d``,
through timm's public ``forward_intermediates``. The BIM model's evaluation, the multi-exit ONNX graph
and the backbones all compute their exits with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..core.errors import InputError, close_matches

MODES = ("bim", "e2e")
DEFAULT_DECODER = {"bim": (1, 256, 8), "e2e": (8, 512, 16)}  # (depth, width, heads)
SUPPORTED_POOLS = ("token", "avg", "avgmax", "max", "")
PLAIN_VIT_MODULES = ("timm.models.vision_transformer", "timm.models.deit")  # where timm defines plain ViTs
# The model's settings as users give them (YAML keys, flags, --set), flat: name -> path in BimConfig.
SETTINGS = {"model": "arch", "model_args": "model_args", "exits": "exits", "mode": "mode",
            "decoder_depth": "decoder.depth", "decoder_width": "decoder.width", "decoder_heads": "decoder.heads",
            "mask_ratio": "mask_ratio", "loss_weights": "loss_weights", "norm_pix_loss": "norm_pix_loss",
            "overlap": "overlap",
            "last_decoder_depth": "last_decoder.depth", "last_decoder_width": "last_decoder.width",
            "last_decoder_heads": "last_decoder.heads"}


class DecoderConfig(BaseModel):
    """An MAE-style light decoder; a size left out takes the mode's default (``DEFAULT_DECODER``)."""

    model_config = ConfigDict(extra="forbid")

    depth: Optional[int] = Field(None, ge=1, description="decoder blocks (default: 1 for bim, 8 for e2e)")
    width: Optional[int] = Field(None, ge=4, description="decoder width (default: 256 for bim, 512 for e2e)")
    heads: Optional[int] = Field(None, ge=1, description="decoder attention heads (default: 8 for bim, 16 for e2e)")


class BimConfig(BaseModel):
    """Everything that defines a BIM (or end-to-end MAE) model, and nothing about how it is trained."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    arch: str = Field("vit_tiny_patch16_224", description="registered timm ViT name")
    model_args: dict = Field(default_factory=dict, description="timm.create_model overrides: img_size, "
                             "patch_size, embed_dim, depth, num_heads, class_token, reg_tokens, global_pool ...")
    exits: Optional[list[int]] = Field(None, description="stage exits as block counts (default: 4 equal stages)")
    mode: Literal["bim", "e2e"] = Field("bim", description="bim: a decoder per exit, gradients stop between "
                                        "stages; e2e: MAE baseline, one decoder at the last exit")
    decoder: DecoderConfig = Field(default_factory=DecoderConfig, description="decoder size")
    mask_ratio: float = Field(0.75, gt=0, lt=1, description="fraction of patches masked")
    loss_weights: Optional[list[float]] = Field(None, description="one weight per decoder (default 1.0 each)")
    norm_pix_loss: bool = Field(True, description="reconstruct per-patch normalized pixels (MAE)")
    overlap: int = Field(0, ge=0, description="bim: the loss of stage k also trains the last `overlap` blocks of "
                         "stage k - 1 (interlocking backward; 0: stages are trained apart)")
    last_decoder: DecoderConfig = Field(default_factory=DecoderConfig, description="the deepest exit's decoder "
                                        "size; a size left out is the decoder's")

    @field_validator("exits")
    @classmethod
    def _increasing(cls, exits: Optional[list[int]]) -> Optional[list[int]]:
        if exits is not None:
            try:
                check_increasing(exits)
            except InputError as e:
                raise ValueError(str(e)) from None  # pydantic reports ValueErrors with the field
        return exits

    @classmethod
    def from_settings(cls, **settings) -> BimConfig:
        """A config from the flat settings users write (``model=``, ``exits=``, ``decoder_width=`` ...)."""
        return cls(**nest_settings(settings))

    # ------------------------------------------------------------------ derived

    @property
    def decoded_exits(self) -> list[int]:
        """The exits with a decoder: every exit in ``bim`` mode, the last in ``e2e``."""
        if self.exits is None:
            raise ValueError("exits are not resolved yet (BimConfig.resolved)")
        return list(self.exits) if self.mode == "bim" else list(self.exits[-1:])

    def stage_bounds(self) -> list[tuple[int, int]]:
        """(first block, end block) of each stage."""
        return list(zip([0, *self.exits[:-1]], self.exits))

    def resolved(self, depth: int) -> BimConfig:
        """This config with every default filled in for an encoder of ``depth`` blocks, and checked.

        Raises:
            InputError: exits that do not fit the encoder, or a loss weight count that does not
                match the decoders (``field`` names the setting).
        """
        exits = validate_exits(self.exits if self.exits is not None else default_exits(depth), depth)
        d_depth, d_width, d_heads = DEFAULT_DECODER[self.mode]
        decoder = DecoderConfig(depth=self.decoder.depth or d_depth, width=self.decoder.width or d_width,
                                heads=self.decoder.heads or d_heads)
        last = DecoderConfig(depth=self.last_decoder.depth or decoder.depth,
                             width=self.last_decoder.width or decoder.width,
                             heads=self.last_decoder.heads or decoder.heads)
        for name, dec in (("decoder", decoder), ("last_decoder", last)):
            if dec.width % 4:
                raise InputError(f"{name} width must be a multiple of 4 (got {dec.width})", field=f"{name}_width")
            if dec.width % dec.heads:
                raise InputError(f"{name} width {dec.width} is not divisible by its {dec.heads} heads",
                                 field=f"{name}_heads")
        check_overlap(self.overlap, self.mode, exits)
        out = self.model_copy(update={"exits": exits, "decoder": decoder, "last_decoder": last})
        return out.model_copy(update={"loss_weights": check_loss_weights(self.loss_weights, out.decoded_exits)})

    def decoder_of(self, exit_depth: int) -> DecoderConfig:
        """The decoder size of an exit: ``last_decoder`` at the deepest exit, ``decoder`` elsewhere."""
        return self.last_decoder if exit_depth == self.exits[-1] else self.decoder

    def check_depth(self, depth: int) -> None:
        """Raises InputError unless ``depth`` is one of the exits (a backbone exists only there)."""
        if depth not in (self.exits or []):
            raise InputError(f"depth {depth} is not an exit of this checkpoint; "
                             f"exits: {', '.join(map(str, self.exits or []))}")

    # ------------------------------------------------------------------ config.json

    def to_json(self) -> dict:
        """The architecture part of a checkpoint's config.json (a resolved config)."""
        return {"arch": self.arch, "model_args": encoder_args(self.model_args), "exits": list(self.exits),
                "mode": self.mode, "decoder": self.decoder.model_dump(), "decoded_exits": self.decoded_exits,
                "mask_ratio": self.mask_ratio, "loss_weights": list(self.loss_weights or []),
                "norm_pix_loss": self.norm_pix_loss,
                "overlap": self.overlap,
                "last_decoder": self.last_decoder.model_dump()}

    @classmethod
    def from_json(cls, config: dict) -> BimConfig:
        """Reads the architecture back from a checkpoint's config.json (other keys are ignored)."""
        return cls(**{k: config[k] for k in cls.model_fields if k in config})


def check_overlap(overlap: int, mode: str, exits: Sequence[int]) -> None:
    """Raises InputError unless ``overlap`` fits: 0 in e2e; at most the blocks of every stage but the last.

    A stage's tail of ``overlap`` blocks is trained by its own loss and the next stage's, so a stage
    with fewer blocks has no such tail.
    """
    if overlap == 0:
        return
    if mode != "bim":
        raise InputError(f"overlap {overlap} applies to mode bim (e2e back-propagates through every block "
                         f"already); use overlap 0", field="overlap")
    sizes = [end - start for start, end in zip([0, *exits[:-1]], exits)][:-1]
    if not sizes or overlap > min(sizes):
        raise InputError(f"overlap {overlap} is more than the blocks of a stage that has a next stage "
                         f"(exits {list(exits)}: {sizes or 'a single stage'})", field="overlap")


def nest_settings(settings: dict, config: dict | None = None) -> dict:
    """``config`` (BimConfig fields) updated with flat ``settings`` (see :data:`SETTINGS`).

    Raises:
        KeyError: a setting that is not one of :data:`SETTINGS`.
    """
    out = dict(config or {})
    for flat, value in settings.items():
        node = out
        *parents, leaf = SETTINGS[flat].split(".")
        for p in parents:
            node[p] = node = dict(node.get(p) or {})
        node[leaf] = value
    return out


def setting_name(path: str) -> str:
    """The flat name of a BimConfig field path: ``decoder.width`` -> ``decoder_width``."""
    for flat, field in SETTINGS.items():
        if path == field or path.startswith(field + "."):
            return flat + path[len(field):]
    return path


# ------------------------------------------------------------------------------ the timm encoder


def check_model_name(arch: str) -> None:
    """Raises InputError for a name timm does not know, naming the 5 closest plain ViTs it has."""
    import timm

    if not isinstance(arch, str) or not timm.is_model(arch):
        vits = [n for n in timm.list_models(["vit_*", "deit_*"])
                if timm.models.model_entrypoint(n).__module__ in PLAIN_VIT_MODULES]
        raise InputError(f"unknown model '{arch}'; {close_matches(str(arch), vits, n=5, what='plain timm ViTs')}",
                         field="model")


def encoder_args(model_args: dict) -> dict:
    """``model_args`` with the final norm kept on the tokens (``fc_norm=False``).

    The exit norm is applied to the tokens, so an ``avg``-pooled backbone pools normed tokens, as the
    BIM encoder computes them; timm would otherwise move the norm after the pooling.
    """
    return {"fc_norm": False, **model_args}


def create_vit(arch: str, model_args: dict | None = None, num_classes: int = 0, **overrides):
    """A timm VisionTransformer ``arch`` with ``model_args`` (+ ``overrides``), no weights; headless
    unless ``num_classes`` (a fine-tuned checkpoint's linear head).

    Raises:
        InputError: unknown name (close names suggested), not a plain VisionTransformer, bad
            argument, or a learned pooling head (``field`` names the setting).
    """
    import timm
    from timm.models.vision_transformer import VisionTransformer

    check_model_name(arch)
    module = timm.models.model_entrypoint(arch).__module__
    if module not in PLAIN_VIT_MODULES:
        raise InputError(f"model '{arch}' (from {module}) is not a plain timm VisionTransformer "
                         f"(pick a vit_* model, e.g. vit_tiny_patch16_224)", field="model")
    try:
        vit = timm.create_model(arch, pretrained=False, num_classes=num_classes, **encoder_args(model_args or {}), **overrides)
    except (TypeError, ValueError, AssertionError, RuntimeError) as e:
        raise InputError(f"model '{arch}' with model_args {model_args}: {e}", field="model_args") from e
    if not isinstance(vit, VisionTransformer) or type(vit.patch_embed).__name__ != "PatchEmbed":
        raise InputError(f"model '{arch}' is a {type(vit).__name__}, not a plain timm VisionTransformer "
                         f"(pick a vit_* model, e.g. vit_tiny_patch16_224)", field="model")
    if vit.global_pool not in SUPPORTED_POOLS:
        raise InputError(f"model '{arch}': global_pool '{vit.global_pool}' has a learned pooling head that "
                         f"masked image modeling does not train; use global_pool token or avg", field="model_args")
    return vit


def describe_encoder(vit) -> dict:
    """The resolved architecture of a timm ViT, for config.json (informative; rebuilt from arch + model_args)."""
    blk = vit.blocks[0]
    square = lambda hw: int(hw[0]) if hw[0] == hw[1] else [int(v) for v in hw]  # noqa: E731
    return {
        "img_size": square(vit.patch_embed.img_size),
        "patch_size": square(vit.patch_embed.patch_size),
        "embed_dim": vit.embed_dim,
        "depth": len(vit.blocks),
        "num_heads": blk.attn.num_heads,
        "mlp_ratio": blk.mlp.fc1.out_features / vit.embed_dim,
        "num_prefix_tokens": vit.num_prefix_tokens,
        "class_token": vit.has_class_token,
        "reg_tokens": vit.num_reg_tokens,
        "global_pool": vit.global_pool,
    }


def check_increasing(exits: Sequence[int]) -> None:
    """The one check that stage exits (block counts) strictly increase; raises InputError."""
    if any(b <= a for a, b in zip(exits, exits[1:])):
        raise InputError(f"exits must be strictly increasing (got {list(exits)})", field="exits")


def check_loss_weights(weights: Optional[Sequence[float]], decoded_exits: Sequence[int]) -> list[float]:
    """The one check of the loss weights: one per decoder (default 1.0 each); returns them as floats.

    Raises:
        InputError: a count other than the decoders' (``field`` is ``loss_weights``).
    """
    weights = list(weights) if weights is not None else [1.0] * len(decoded_exits)
    if len(weights) != len(decoded_exits):
        raise InputError(f"loss_weights: {len(decoded_exits)} values needed, one per decoder at exits "
                         f"{list(decoded_exits)} (got {len(weights)})", field="loss_weights")
    return [float(w) for w in weights]


def validate_exits(exits: Sequence[int], depth: int) -> list[int]:
    """Checks stage exits (block counts): strictly increasing, within 1..depth, last = depth."""
    exits = [int(e) for e in exits]
    if not exits:
        raise InputError("exits: at least one exit is needed", field="exits")
    check_increasing(exits)
    if exits[0] < 1 or exits[-1] > depth:
        raise InputError(f"exits must lie in 1..{depth}, the model depth (got {exits})", field="exits")
    if exits[-1] != depth:
        raise InputError(f"the last exit must be the model depth {depth} (got {exits}): blocks after it "
                         f"would never train; set model_args.depth={exits[-1]} for a shallower model", field="exits")
    return exits


def default_exits(depth: int, stages: int = 4) -> list[int]:
    """``stages`` equal stages (as equal as the depth allows): 12 -> [3, 6, 9, 12]."""
    stages = min(stages, depth)
    return sorted({round(depth * (i + 1) / stages) for i in range(stages)})


# ------------------------------------------------------------------------------ exits


def exit_tokens(vit, x, depths: Sequence[int], norms: Sequence) -> list:
    """Normed tokens after ``blocks[:d]`` for each ``d`` in ``depths``, in one pass through the blocks.

    Args:
        vit: a timm VisionTransformer with at least ``max(depths)`` blocks.
        x: images [B, 3, H, W].
        depths: exit depths, increasing.
        norms: one norm per depth (the exit's LayerNorm).

    Returns:
        One tensor [B, P + N, D] per exit, prefix tokens (class, registers) first.
    """
    import torch

    out = vit.forward_intermediates(x, indices=[d - 1 for d in depths], norm=False, stop_early=True,
                                    output_fmt="NLC", intermediates_only=True,
                                    return_prefix_tokens=vit.num_prefix_tokens > 0)
    if vit.num_prefix_tokens:
        out = [torch.cat([prefix, tokens], dim=1) for tokens, prefix in out]
    return [norm(t) for norm, t in zip(norms, out)]


def backbone_state_dict(state_dict: dict, config: BimConfig, depth: int) -> dict:
    """The weights of the plain timm ViT of ``depth`` blocks, out of a BIM model's state dict.

    ``encoder.*`` minus the blocks past ``depth``, and that exit's norm as the ViT's final ``norm``;
    decoders and the other exit norms are left out.
    """
    config.check_depth(depth)
    out = {}
    for k, v in state_dict.items():
        if not k.startswith("encoder."):
            continue
        k = k[len("encoder."):]
        if k.startswith("blocks.") and int(k.split(".")[1]) >= depth:
            continue
        out[k] = v
    prefix = f"exit_norms.{config.exits.index(depth)}."
    out.update({f"norm.{k[len(prefix):]}": v for k, v in state_dict.items() if k.startswith(prefix)})
    return out
