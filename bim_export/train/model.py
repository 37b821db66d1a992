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
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..architecture import BimConfig, create_vit, describe_encoder, exit_tokens
from ..errors import InputError


# ------------------------------------------------------------------------------ decoder


def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding as in MAE. Returns [grid_h * grid_w, dim]."""
    if dim % 4:
        raise ValueError(f"a sine-cosine embedding needs a width divisible by 4 (got {dim})")
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
        config: the architecture (arch + model_args, exits, mode, decoder, mask ratio, loss); defaults
            are resolved against the encoder (``self.config`` is the resolved copy).
    """

    def __init__(self, config: BimConfig):
        super().__init__()
        # The exit norms stand in for the encoder's final norm (timm's final_norm=False).
        self.encoder = create_vit(config.arch, config.model_args, final_norm=False)
        self.config = config.resolved(len(self.encoder.blocks))
        cfg, enc = self.config, self.encoder
        D, P = enc.embed_dim, enc.num_prefix_tokens
        ph, pw = enc.patch_embed.patch_size
        self.patch_dim = ph * pw * 3
        self.exit_norms = nn.ModuleList([nn.LayerNorm(D, eps=1e-6) for _ in cfg.exits])
        self.decoders = nn.ModuleList([
            MaeDecoder(D, P, tuple(enc.patch_embed.grid_size), self.patch_dim, cfg.decoder.depth,
                       cfg.decoder.width, cfg.decoder.heads, mlp_ratio=4.0) for _ in cfg.decoded_exits])
        self.grad_checkpointing = False

    # ---------------------------------------------------------------- description

    @property
    def exits(self) -> list[int]:
        return self.config.exits

    @property
    def decoded_exits(self) -> list[int]:
        return self.config.decoded_exits

    @property
    def num_patches(self) -> int:
        return self.encoder.patch_embed.num_patches

    def arch_config(self) -> dict:
        """The architecture part of config.json: the config and the resolved encoder's figures."""
        return {**self.config.to_json(), **describe_encoder(self.encoder)}

    @classmethod
    def from_checkpoint(cls, ckpt) -> BimModel:
        """The model of a checkpoint (a :class:`~bim_export.checkpoint.Checkpoint` or its path) with its
        weights, eval mode, float32.

        Raises:
            InputError: a config.json no model can be built from, or weights that do not match it
                (the message names the file).
        """
        from ..checkpoint import CONFIG, WEIGHTS, Checkpoint, load_checkpoint

        ckpt = ckpt if isinstance(ckpt, Checkpoint) else load_checkpoint(ckpt)
        try:
            model = cls(ckpt.bim_config)
        except InputError as e:  # model_args, exits, decoder... that no model can be built from
            raise InputError(f"{ckpt.path / CONFIG}: {e}") from None
        try:
            missing, unexpected = model.load_state_dict(ckpt.state_dict, strict=False)
        except RuntimeError as e:  # shape mismatch
            raise InputError(f"{ckpt.path / WEIGHTS}: weights do not match config.json "
                             f"({str(e).splitlines()[-1].strip()})") from e
        if missing or unexpected:
            raise InputError(f"{ckpt.path / WEIGHTS}: weights do not match config.json "
                             f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        return model.eval()

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
        if self.config.norm_pix_loss:
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
        n_keep = int(N * (1 - self.config.mask_ratio))
        ids_shuffle = torch.argsort(noise, dim=1)  # ascending: small noise is kept
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :n_keep]
        x = torch.gather(x, 1, ids_keep[..., None].expand(-1, -1, D))
        mask = torch.ones(B, N, device=x.device)
        mask[:, :n_keep] = 0
        return x, torch.gather(mask, 1, ids_restore), ids_restore

    def embed_masked(self, imgs: torch.Tensor, noise: torch.Tensor):
        # imgs: [B, 3, H, W], noise: [B, N] -> tokens [B, P + n_keep, D], mask [B, N], ids_restore [B, N]
        enc = self.encoder
        x = enc._pos_embed(enc.patch_embed(imgs))  # patch_drop is left out: the mask is the dropout here
        P = enc.num_prefix_tokens
        vis, mask, ids_restore = self.random_masking(x[:, P:], noise.to(x.device))
        return enc.norm_pre(torch.cat([x[:, :P], vis], dim=1)), mask, ids_restore

    def stage_bounds(self) -> list[tuple[int, int]]:
        """(first block, end block) of each stage."""
        return self.config.stage_bounds()

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

    def forward_intermediates(self, imgs: torch.Tensor) -> list[torch.Tensor]:
        """Normed tokens at every exit, no masking. Returns one [B, P + N, D] tensor per exit."""
        return exit_tokens(self.encoder, imgs, self.exits, self.exit_norms)

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
            if self.config.mode == "bim":
                (loss * (self.config.loss_weights[k] * loss_scale)).backward()  # frees this stage's graph
                x = x.detach()
                losses[end] = loss.detach()
            else:
                losses[end] = loss
        if self.config.mode == "e2e":
            total = sum(losses[d] * w for d, w in zip(self.decoded_exits, self.config.loss_weights))
            (total * loss_scale).backward()
            losses = {d: v.detach() for d, v in losses.items()}
        return StepLosses(losses)
