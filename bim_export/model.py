"""The BIM model: a timm VisionTransformer split into stages, each with an exit norm and a light decoder.

Block-wise masked image modeling (BIM, arXiv 2311.17218): the encoder's blocks are cut at the
exits (e.g. after blocks 3/6/9/12). Each exit has a LayerNorm (the final norm of the backbone of that
depth) and an MAE-style decoder that reconstructs the normalized pixels of the masked patches. In
``bim`` mode each stage's loss is back-propagated as soon as it is computed and the next stage starts
from the detached output, so peak activation memory is about one stage plus its decoder. ``e2e``
mode is plain MAE (one decoder at the last exit, gradients through every block), the baseline.

Conventions: ``mask: [B, N], 1 = masked (hidden from the encoder), 0 = visible``; one mask per image,
shared by every stage. Token tensors are ``[B, P + n, D]`` with the ``P`` prefix tokens (class,
registers) first.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .errors import InputError, close_matches

MODES = ("bim", "e2e")
DEFAULT_DECODER = {"bim": (1, 256, 8), "e2e": (8, 512, 16)}  # (depth, width, heads)
SUPPORTED_POOLS = ("token", "avg", "avgmax", "max", "")
PLAIN_VIT_MODULES = ("timm.models.vision_transformer", "timm.models.deit")  # where timm defines plain ViTs


# ------------------------------------------------------------------------------ encoder


def create_encoder(arch: str, model_args: dict | None = None):
    """A headless timm VisionTransformer ``arch`` with ``model_args`` overrides (no pretrained weights).

    Raises:
        InputError: unknown name (close names suggested), not a VisionTransformer, bad argument.
    """
    import timm
    from timm.models.vision_transformer import VisionTransformer

    check_model_name(arch)
    module = timm.models.model_entrypoint(arch).__module__
    if module not in PLAIN_VIT_MODULES:
        raise InputError(f"model '{arch}' (from {module}) is not a plain timm VisionTransformer "
                         f"(pick a vit_* model, e.g. vit_tiny_patch16_224)", field="model")
    try:
        enc = timm.create_model(arch, pretrained=False, num_classes=0, **encoder_args(model_args or {}))
    except (TypeError, ValueError, AssertionError, RuntimeError) as e:
        raise InputError(f"model '{arch}' with model_args {model_args}: {e}", field="model_args") from e
    if not isinstance(enc, VisionTransformer) or type(enc.patch_embed).__name__ != "PatchEmbed":
        raise InputError(f"model '{arch}' is a {type(enc).__name__}, not a plain timm VisionTransformer "
                         f"(pick a vit_* model, e.g. vit_tiny_patch16_224)", field="model")
    if enc.global_pool not in SUPPORTED_POOLS:
        raise InputError(f"model '{arch}': global_pool '{enc.global_pool}' has a learned pooling head that "
                         f"masked image modeling does not train; use global_pool token or avg", field="model_args")
    return enc


def check_model_name(arch: str) -> None:
    """Raises InputError for a name timm does not know, naming the 5 closest plain ViTs it has."""
    import timm

    if not isinstance(arch, str) or not timm.is_model(arch):
        vits = [n for n in timm.list_models(["vit_*", "deit_*"])
                if timm.models.model_entrypoint(n).__module__ in PLAIN_VIT_MODULES]
        raise InputError(f"unknown model '{arch}'; {close_matches(str(arch), vits, n=5, what='plain timm ViTs')}")


def encoder_args(model_args: dict) -> dict:
    """``model_args`` with the final norm kept on the tokens (``fc_norm=False``).

    The exit norm is applied to the tokens, so an ``avg``-pooled backbone pools normed tokens, as the
    BIM encoder computes them; timm would otherwise move the norm after the pooling.
    """
    return {"fc_norm": False, **model_args}


def describe_encoder(enc) -> dict:
    """The resolved architecture of a timm ViT, for config.json (informative; rebuilt from arch + model_args)."""
    blk = enc.blocks[0]
    square = lambda hw: int(hw[0]) if hw[0] == hw[1] else [int(v) for v in hw]  # noqa: E731
    return {
        "img_size": square(enc.patch_embed.img_size),
        "patch_size": square(enc.patch_embed.patch_size),
        "embed_dim": enc.embed_dim,
        "depth": len(enc.blocks),
        "num_heads": blk.attn.num_heads,
        "mlp_ratio": blk.mlp.fc1.out_features / enc.embed_dim,
        "num_prefix_tokens": enc.num_prefix_tokens,
        "class_token": enc.has_class_token,
        "reg_tokens": enc.num_reg_tokens,
        "global_pool": enc.global_pool,
    }


def validate_exits(exits: Sequence[int], depth: int) -> list[int]:
    """Checks stage exits (block counts): strictly increasing, within 1..depth, last = depth."""
    exits = [int(e) for e in exits]
    if not exits:
        raise InputError("exits: at least one exit is needed", field="exits")
    if any(b <= a for a, b in zip(exits, exits[1:])):
        raise InputError(f"exits must be strictly increasing (got {exits})", field="exits")
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


# ------------------------------------------------------------------------------ decoder


def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding as in MAE. Returns [grid_h * grid_w, dim]."""
    if dim % 4:
        raise InputError(f"decoder width must be a multiple of 4 (got {dim})", field="decoder_width")
    ys, xs = torch.meshgrid(torch.arange(grid_h, dtype=torch.float64),
                            torch.arange(grid_w, dtype=torch.float64), indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))

    def emb(pos):  # pos: [L] -> [L, dim / 2]
        out = pos.reshape(-1, 1) * omega.reshape(1, -1)
        return torch.cat([out.sin(), out.cos()], dim=1)

    return torch.cat([emb(ys), emb(xs)], dim=1).float()


class MaeDecoder(nn.Module):
    """MAE's light decoder: embed to its width, fill in mask tokens, add position, blocks, predict pixels."""

    def __init__(self, embed_dim: int, num_prefix_tokens: int, grid: tuple[int, int], patch_dim: int,
                 depth: int, width: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        from timm.models.vision_transformer import Block

        self.num_prefix_tokens = num_prefix_tokens
        self.embed = nn.Linear(embed_dim, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.register_buffer("pos_embed", sincos_pos_embed_2d(width, *grid)[None], persistent=False)
        self.blocks = nn.Sequential(*[Block(width, heads, mlp_ratio, qkv_bias=True, norm_layer=nn.LayerNorm)
                                      for _ in range(depth)])
        self.norm = nn.LayerNorm(width)
        self.pred = nn.Linear(width, patch_dim)
        self.grad_checkpointing = False
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(_init_linear)

    def forward(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        # x: [B, P + n_keep, D], ids_restore: [B, N] -> pixel predictions [B, N, patch_dim]
        P = self.num_prefix_tokens
        x = self.embed(x)
        prefix, vis = x[:, :P], x[:, P:]
        B, N = ids_restore.shape
        masked = self.mask_token.expand(B, N - vis.shape[1], -1)
        patches = torch.cat([vis, masked], dim=1)  # [B, N, W] in shuffled order
        patches = torch.gather(patches, 1, ids_restore[..., None].expand(-1, -1, patches.shape[2]))
        x = torch.cat([prefix, patches + self.pos_embed], dim=1)  # prefix tokens carry no position
        recompute = self.grad_checkpointing and torch.is_grad_enabled()
        for blk in self.blocks:
            x = checkpoint(blk, x, use_reentrant=False) if recompute else blk(x)
        return self.pred(self.norm(x)[:, P:])


def _init_linear(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):  # MAE: xavier_uniform, zero bias
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


# ------------------------------------------------------------------------------ BIM model


@dataclass
class StepLosses:
    """Per-stage reconstruction losses of one forward (detached), keyed by exit depth."""

    losses: dict[int, torch.Tensor]

    def floats(self) -> dict[int, float]:
        return {d: float(v) for d, v in self.losses.items()}


class BimModel(nn.Module):
    """A timm ViT encoder with an exit norm per stage exit and MAE decoders (one per exit, or one at the end).

    Args:
        arch: a registered timm ViT name (e.g. ``vit_tiny_patch16_224``).
        model_args: overrides passed to ``timm.create_model`` (img_size, patch_size, embed_dim, depth,
            num_heads, class_token, reg_tokens, global_pool, ...).
        exits: block counts after which a stage ends (default: 4 equal stages).
        mode: ``bim`` (a decoder per exit, gradients stop between stages) or ``e2e`` (MAE baseline:
            one decoder at the last exit, gradients through every block).
        decoder_depth, decoder_width, decoder_heads: decoder size (default per mode, DEFAULT_DECODER).
        mask_ratio: fraction of patches hidden from the encoder.
        loss_weights: one weight per decoder (default 1.0 each).
        norm_pix_loss: reconstruct per-patch normalized pixels (MAE's ``norm_pix_loss``).
    """

    def __init__(self, arch: str, model_args: dict | None = None, exits: Sequence[int] | None = None,
                 mode: str = "bim", decoder_depth: int | None = None, decoder_width: int | None = None,
                 decoder_heads: int | None = None, mask_ratio: float = 0.75,
                 loss_weights: Sequence[float] | None = None, norm_pix_loss: bool = True):
        super().__init__()
        if mode not in MODES:
            raise InputError(f"mode must be one of {', '.join(MODES)} (got '{mode}')")
        if not 0.0 < mask_ratio < 1.0:
            raise InputError(f"mask_ratio must be in (0, 1) (got {mask_ratio})")
        self.arch, self.model_args, self.mode = arch, dict(model_args or {}), mode
        self.encoder = create_encoder(arch, self.model_args)
        self.encoder.norm = nn.Identity()  # replaced by the exit norms
        depth = len(self.encoder.blocks)
        self.exits = validate_exits(exits if exits is not None else default_exits(depth), depth)
        self.mask_ratio, self.norm_pix_loss = mask_ratio, norm_pix_loss
        d_depth, d_width, d_heads = DEFAULT_DECODER[mode]
        self.decoder_cfg = {"depth": decoder_depth or d_depth, "width": decoder_width or d_width,
                            "heads": decoder_heads or d_heads}
        decoded = self.exits if mode == "bim" else self.exits[-1:]
        self.decoded_exits = list(decoded)
        weights = list(loss_weights) if loss_weights is not None else [1.0] * len(decoded)
        if len(weights) != len(decoded):
            raise InputError(f"loss_weights: {len(decoded)} values needed, one per decoder at exits "
                             f"{decoded} (got {len(weights)})", field="loss_weights")
        self.loss_weights = [float(w) for w in weights]

        enc = self.encoder
        D, P = enc.embed_dim, enc.num_prefix_tokens
        ph, pw = enc.patch_embed.patch_size
        self.patch_dim = ph * pw * 3
        self.exit_norms = nn.ModuleList([nn.LayerNorm(D, eps=1e-6) for _ in self.exits])
        self.decoders = nn.ModuleList([
            MaeDecoder(D, P, tuple(enc.patch_embed.grid_size), self.patch_dim, **self.decoder_cfg,
                       mlp_ratio=4.0) for _ in decoded])
        self.grad_checkpointing = False

    # ---------------------------------------------------------------- description

    @property
    def num_patches(self) -> int:
        return self.encoder.patch_embed.num_patches

    def arch_config(self) -> dict:
        """Everything needed to rebuild this model (the architecture part of config.json)."""
        return {"arch": self.arch, "model_args": encoder_args(self.model_args), **describe_encoder(self.encoder),
                "exits": list(self.exits), "mode": self.mode, "decoder": dict(self.decoder_cfg),
                "decoded_exits": list(self.decoded_exits), "mask_ratio": self.mask_ratio,
                "loss_weights": list(self.loss_weights), "norm_pix_loss": self.norm_pix_loss}

    @classmethod
    def from_config(cls, config: dict) -> BimModel:
        """Rebuilds a model from :meth:`arch_config` (or a checkpoint's config.json)."""
        dec = config.get("decoder", {})
        return cls(config["arch"], config.get("model_args", {}), config["exits"], config.get("mode", "bim"),
                   dec.get("depth"), dec.get("width"), dec.get("heads"), config.get("mask_ratio", 0.75),
                   config.get("loss_weights"), config.get("norm_pix_loss", True))

    @classmethod
    def from_checkpoint(cls, ckpt) -> BimModel:
        """The model of a checkpoint (a :class:`~bim_export.checkpoint.Checkpoint` or its path), eval mode."""
        from .checkpoint import Checkpoint, load_checkpoint

        return (ckpt if isinstance(ckpt, Checkpoint) else load_checkpoint(ckpt)).build_model()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute every encoder and decoder block in backward (trades compute for activation memory)."""
        self.grad_checkpointing = enable
        for dec in self.decoders:
            dec.grad_checkpointing = enable

    # ---------------------------------------------------------------- pieces

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        # imgs: [B, 3, H, W] -> [B, N, ph * pw * 3], patches in the patch embedding's row-major order
        ph, pw = self.encoder.patch_embed.patch_size
        gh, gw = self.encoder.patch_embed.grid_size
        x = imgs.reshape(imgs.shape[0], 3, gh, ph, gw, pw)
        return torch.einsum("nchpwq->nhwpqc", x).reshape(imgs.shape[0], gh * gw, self.patch_dim)

    def target(self, imgs: torch.Tensor) -> torch.Tensor:
        # imgs: [B, 3, H, W] -> reconstruction target [B, N, patch_dim] (float32)
        t = self.patchify(imgs.float())
        if self.norm_pix_loss:
            mean, var = t.mean(dim=-1, keepdim=True), t.var(dim=-1, keepdim=True)
            t = (t - mean) / (var + 1e-6) ** 0.5
        return t

    def mask_noise(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Uniform noise [batch, N] whose argsort defines the masks (drawn on CPU, reproducible)."""
        return torch.rand(batch, self.num_patches, generator=generator)

    def random_masking(self, x: torch.Tensor, noise: torch.Tensor):
        # x: [B, N, D] patch tokens, noise: [B, N]
        # -> visible x [B, n_keep, D], mask [B, N] (1 = masked), ids_restore [B, N]
        B, N, D = x.shape
        n_keep = int(N * (1 - self.mask_ratio))
        ids_shuffle = torch.argsort(noise, dim=1)  # ascending: small noise is kept
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :n_keep]
        x = torch.gather(x, 1, ids_keep[..., None].expand(-1, -1, D))
        mask = torch.ones(B, N, device=x.device)
        mask[:, :n_keep] = 0
        return x, torch.gather(mask, 1, ids_restore), ids_restore

    def embed(self, imgs: torch.Tensor) -> torch.Tensor:
        # imgs: [B, 3, H, W] -> tokens [B, P + N, D] with prefix tokens and position embedding
        enc = self.encoder
        return enc.norm_pre(enc.patch_drop(enc._pos_embed(enc.patch_embed(imgs))))

    def embed_masked(self, imgs: torch.Tensor, noise: torch.Tensor):
        # imgs: [B, 3, H, W], noise: [B, N] -> tokens [B, P + n_keep, D], mask [B, N], ids_restore [B, N]
        enc = self.encoder
        x = enc._pos_embed(enc.patch_embed(imgs))  # patch_drop is left out: the mask is the dropout here
        P = enc.num_prefix_tokens
        vis, mask, ids_restore = self.random_masking(x[:, P:], noise.to(x.device))
        return enc.norm_pre(torch.cat([x[:, :P], vis], dim=1)), mask, ids_restore

    def stage_bounds(self) -> list[tuple[int, int]]:
        """(first block, end block) of each stage."""
        return list(zip([0, *self.exits[:-1]], self.exits))

    def run_blocks(self, x: torch.Tensor, start: int, end: int) -> torch.Tensor:
        # x: [B, L, D] -> [B, L, D] through blocks[start:end]
        for blk in self.encoder.blocks[start:end]:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return x

    def recon_loss(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # pred, target: [B, N, patch_dim], mask: [B, N] -> mean squared error over masked patches
        per_patch = ((pred.float() - target) ** 2).mean(dim=-1)
        return (per_patch * mask).sum() / mask.sum()

    # ---------------------------------------------------------------- forward passes

    def forward_exits(self, imgs: torch.Tensor) -> list[torch.Tensor]:
        """Normed tokens at every exit, no masking. Returns one [B, P + N, D] tensor per exit."""
        x = self.embed(imgs)
        outs, start = [], 0
        for i, end in enumerate(self.exits):
            x = self.run_blocks(x, start, end)
            outs.append(self.exit_norms[i](x))
            start = end
        return outs

    def pool_exit(self, tokens: torch.Tensor) -> torch.Tensor:
        # tokens: [B, P + N, D] normed exit tokens -> [B, D], pooled as the backbone's forward_head does
        return self.encoder.pool(tokens)

    def forward_backward(self, imgs: torch.Tensor, noise: torch.Tensor, loss_scale: float = 1.0,
                         amp_dtype: torch.dtype | None = None) -> StepLosses:
        """One training forward with the backward passes; gradients accumulate in ``.grad``.

        ``bim``: every stage's weighted loss is back-propagated as soon as it is computed, which frees
        that stage's graph; the next stage starts from the detached output. ``e2e``: one loss at the
        last exit, one backward through every block.

        Args:
            imgs: [B, 3, H, W] normalized images.
            noise: [B, N] masking noise (see :meth:`mask_noise`).
            loss_scale: multiplies every loss before backward (1 / accumulation steps).
            amp_dtype: autocast dtype for the forward passes (None: full precision).

        Returns:
            the unweighted per-stage losses, detached.
        """
        amp = (torch.autocast(imgs.device.type, dtype=amp_dtype) if amp_dtype is not None
               else contextlib.nullcontext())
        target = self.target(imgs)
        losses: dict[int, torch.Tensor] = {}
        with amp:
            x, mask, ids_restore = self.embed_masked(imgs, noise)
        for i, (start, end) in enumerate(self.stage_bounds()):
            with amp:
                x = self.run_blocks(x, start, end)
                if end not in self.decoded_exits:
                    continue
                k = self.decoded_exits.index(end)
                pred = self.decoders[k](self.exit_norms[i](x), ids_restore)
                loss = self.recon_loss(pred, target, mask)
            if self.mode == "bim":
                (loss * (self.loss_weights[k] * loss_scale)).backward()  # frees this stage's graph
                x = x.detach()
                losses[end] = loss.detach()
            else:
                losses[end] = loss
        if self.mode == "e2e":
            total = sum(losses[d] * w for d, w in zip(self.decoded_exits, self.loss_weights))
            (total * loss_scale).backward()
            losses = {d: v.detach() for d, v in losses.items()}
        return StepLosses(losses)

    def backbone_state_dict(self, depth: int) -> dict[str, torch.Tensor]:
        """Weights of the plain timm ViT of ``depth`` blocks: blocks[:depth] and that exit's norm as ``norm``."""
        if depth not in self.exits:
            raise InputError(f"depth {depth} is not an exit of this checkpoint; exits: "
                             f"{', '.join(map(str, self.exits))}")
        out = {}
        for k, v in self.encoder.state_dict().items():
            if k.startswith("blocks.") and int(k.split(".")[1]) >= depth:
                continue
            out[k] = v
        i = self.exits.index(depth)
        for k, v in self.exit_norms[i].state_dict().items():
            out[f"norm.{k}"] = v
        return out
