"""The BIM model: a timm VisionTransformer split into stages, each with an exit norm and a light decoder.

Block-wise masked image modeling (BIM, arXiv 2311.17218): the encoder's blocks are cut at the
exits (e.g. after blocks 3/6/9/12). Each exit has a LayerNorm (the final norm of the backbone of that
depth) and an MAE-style decoder that reconstructs the normalized pixels of the masked patches. In
``bim`` mode each stage's loss is back-propagated as soon as it is computed and the next stage starts
from the detached output, so peak activation memory is about one stage plus its decoder. With
``overlap`` N (interlocking backward) the cut moves N blocks down: stage k's loss also trains the
last N blocks of stage k - 1, whose graph is kept until stage k's backward. ``e2e``
mode is plain MAE (one decoder at the last exit, gradients through every block), the baseline.

Conventions: ``mask: [B, N], 1 = masked (hidden from the encoder), 0 = visible``; one mask per image,
shared by every stage. Token tensors are ``[B, P + n, D]`` with the ``P`` prefix tokens (class,
registers) first.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..core.errors import InputError
from ..model.architecture import BimConfig, create_vit, describe_encoder, exit_tokens
from .decoder import MaeDecoder


# ------------------------------------------------------------------------------ BIM model


@dataclass
class MaskedBatch:
    """One micro-batch as every stage sees it: the images and what their shared mask makes of them.

    Shapes: ``imgs`` [B, 3, H, W]; ``target`` [B, N, patch_dim] float32; ``mask`` [B, N] (1 = masked);
    ``ids_keep`` [B, n_keep] (the visible patches, in the encoder's token order); ``ids_restore`` [B, N].
    """

    imgs: torch.Tensor
    target: torch.Tensor
    mask: torch.Tensor
    ids_keep: torch.Tensor
    ids_restore: torch.Tensor


@dataclass
class StepLosses:
    """Per-stage reconstruction losses of one forward (detached), keyed by exit depth, and the last
    stage's output tokens, detached (the next stage's input where the stages run apart)."""

    losses: dict[int, torch.Tensor]
    tokens: torch.Tensor | None = None

    def floats(self) -> dict[int, float]:
        return {d: float(v) for d, v in self.losses.items()}


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


class BimModel(nn.Module):
    """A timm ViT encoder with an exit norm per stage exit and MAE decoders (one per exit, or one at the end).

    Stage ``i`` runs the blocks between exits ``i - 1`` and ``i``. It owns those blocks, its exit norm
    and its decoder; the first stage also owns the patch and position embeddings and the prefix
    tokens. The stage API (:meth:`stage_parameters`, :meth:`forward_stage`, :meth:`backward_stage`)
    is what a trainer needs to step, reduce or place each stage on its own; :meth:`forward_backward`
    runs them all in one process.

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
            MaeDecoder(D, P, tuple(enc.patch_embed.grid_size), self.patch_dim, dec.depth, dec.width, dec.heads,
                       mlp_ratio=4.0) for dec in map(cfg.decoder_of, cfg.decoded_exits)])
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
        """The model of a checkpoint (a :class:`~bim_export.model.checkpoint.Checkpoint` or its path) with its
        weights, eval mode, float32.

        Raises:
            InputError: a config.json no model can be built from, or weights that do not match it
                (the message names the file).
        """
        from ..model.checkpoint import CONFIG, WEIGHTS, Checkpoint, load_checkpoint

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
        """Recompute every encoder and decoder block in backward (trades compute for activation memory).

        Each block keeps only its input for backward, so a stage holds its block inputs plus one
        block's activations at a time; it composes with stage-by-stage backward and updates.
        """
        self.grad_checkpointing = enable
        for dec in self.decoders:
            dec.grad_checkpointing = enable

    def compile_blocks(self, **options) -> None:
        """``torch.compile`` every encoder and decoder block in place (``options`` go to torch.compile).

        Per block, as large-model trainers do: every block has the same code, so one compiled graph
        serves them all, and activation checkpointing wraps compiled blocks unchanged. Parameter
        names and the state dict stay as they are.
        """
        for blk in [*self.encoder.blocks, *(b for dec in self.decoders for b in dec.blocks)]:
            blk.compile(**options)

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

    def masking(self, noise: torch.Tensor):
        # noise: [B, N] -> ids_keep [B, n_keep], mask [B, N] (1 = masked), ids_restore [B, N]
        B, N = noise.shape
        n_keep = int(N * (1 - self.config.mask_ratio))
        ids_shuffle = torch.argsort(noise, dim=1)  # ascending: small noise is kept
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        mask = torch.ones(B, N, device=noise.device)
        mask[:, :n_keep] = 0
        return ids_shuffle[:, :n_keep], torch.gather(mask, 1, ids_restore), ids_restore

    def random_masking(self, x: torch.Tensor, noise: torch.Tensor):
        # x: [B, N, D] patch tokens, noise: [B, N]
        # -> visible x [B, n_keep, D], mask [B, N] (1 = masked), ids_restore [B, N]
        ids_keep, mask, ids_restore = self.masking(noise.to(x.device))
        return torch.gather(x, 1, ids_keep[..., None].expand(-1, -1, x.shape[2])), mask, ids_restore

    def masked_batch(self, imgs: torch.Tensor, noise: torch.Tensor) -> MaskedBatch:
        """The target and the mask of a micro-batch, shared by every stage."""
        ids_keep, mask, ids_restore = self.masking(noise.to(imgs.device))
        return MaskedBatch(imgs, self.target(imgs), mask, ids_keep, ids_restore)

    def embed(self, imgs: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        # imgs: [B, 3, H, W], ids_keep: [B, n_keep] -> tokens [B, P + n_keep, D] of the visible patches
        enc = self.encoder
        x = enc._pos_embed(enc.patch_embed(imgs))  # patch_drop is left out: the mask is the dropout here
        P = enc.num_prefix_tokens
        vis = torch.gather(x[:, P:], 1, ids_keep[..., None].expand(-1, -1, x.shape[2]))
        return enc.norm_pre(torch.cat([x[:, :P], vis], dim=1))

    def embed_masked(self, imgs: torch.Tensor, noise: torch.Tensor):
        # imgs: [B, 3, H, W], noise: [B, N] -> tokens [B, P + n_keep, D], mask [B, N], ids_restore [B, N]
        ids_keep, mask, ids_restore = self.masking(noise.to(imgs.device))
        return self.embed(imgs, ids_keep), mask, ids_restore

    def token_shape(self, batch: int) -> tuple[int, int, int]:
        """The shape of a stage's output tokens for ``batch`` images: [B, P + n_keep, D]."""
        n_keep = int(self.num_patches * (1 - self.config.mask_ratio))
        return batch, self.encoder.num_prefix_tokens + n_keep, self.encoder.embed_dim

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

    # ---------------------------------------------------------------- evaluation

    def forward_intermediates(self, imgs: torch.Tensor) -> list[torch.Tensor]:
        """Normed tokens at every exit, no masking. Returns one [B, P + N, D] tensor per exit."""
        return exit_tokens(self.encoder, imgs, self.exits, self.exit_norms)

    def pool_exit(self, tokens: torch.Tensor) -> torch.Tensor:
        # tokens: [B, P + N, D] normed exit tokens -> [B, D], pooled as the backbone's forward_head does
        return self.encoder.pool(tokens)

    # ---------------------------------------------------------------- stages

    @property
    def num_stages(self) -> int:
        return len(self.config.exits)

    def stage_of(self, name: str) -> int:
        """The stage that owns parameter ``name`` (a name of :meth:`named_parameters`)."""
        parts = name.split(".")
        if parts[0] == "encoder":  # blocks by position; the stem (embeddings, prefix tokens) is stage 0's
            if parts[1] == "blocks":
                block = int(parts[2])
                return next(i for i, (_, end) in enumerate(self.stage_bounds()) if block < end)
            return 0
        if parts[0] == "exit_norms":
            return int(parts[1])
        if parts[0] == "decoders":
            return self.exits.index(self.decoded_exits[int(parts[1])])
        raise ValueError(f"parameter {name!r} belongs to no stage")

    def stage_parameters(self, i: int) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) of everything stage ``i`` owns, in :meth:`named_parameters` order."""
        return [(n, p) for n, p in self.named_parameters() if self.stage_of(n) == i]

    def tail_start(self, i: int) -> int:
        """The first block of stage ``i``'s tail: its last ``overlap`` blocks, which the next stage's
        loss trains too (the stage's end where there is no overlap, and for the last stage)."""
        end = self.stage_bounds()[i][1]
        return end if i == self.num_stages - 1 else end - self.config.overlap

    def _exit_loss(self, i: int, x: torch.Tensor, batch: MaskedBatch) -> torch.Tensor | None:
        # x: stage i's output tokens [B, P + n_keep, D] -> its exit's reconstruction loss (None: no decoder)
        end = self.exits[i]
        if end not in self.decoded_exits:
            return None
        pred = self.decoders[self.decoded_exits.index(end)](self.exit_norms[i](x), batch.ids_restore)
        return self.recon_loss(pred, batch.target, batch.mask)

    def forward_stage(self, i: int, x: torch.Tensor | None, batch: MaskedBatch,
                      amp_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Stage ``i``'s forward.

        Args:
            i: the stage.
            x: the previous stage's output tokens [B, P + n_keep, D] (None for stage 0, which embeds
                ``batch.imgs``).
            batch: the micro-batch's target and mask (:meth:`masked_batch`).
            amp_dtype: autocast dtype (None: full precision).

        Returns:
            this stage's output tokens [B, P + n_keep, D] (before the exit norm), and its exit's
            reconstruction loss (None where the exit has no decoder).
        """
        with _autocast(batch.imgs.device, amp_dtype):
            if i == 0:
                x = self.embed(batch.imgs, batch.ids_keep)
            start, end = self.stage_bounds()[i]
            x = self.run_blocks(x, start, end)
            return x, self._exit_loss(i, x, batch)

    def backward_stage(self, i: int, x: torch.Tensor | None, batch: MaskedBatch, loss_scale: float = 1.0,
                       amp_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """BIM's step of one stage: its forward and the backward of its weighted loss.

        Without overlap the backward frees the stage's graph and adds this micro-batch's share to the
        gradients of the stage's parameters, and of nothing else: stages are cut apart by detaching.
        With ``overlap`` (interlocking backward) the loss also reaches the previous stage's tail,
        through ``x``, and frees that tail's graph; this stage's own tail (:meth:`tail_start`) keeps
        its graph for the next stage's loss. A stage's gradients are then final only after the next
        stage's backward.

        Args:
            x: the previous stage's output as this method returned it (None for stage 0).

        Returns:
            the output tokens, the next stage's input: detached, or with overlap attached to the
            graph of this stage's tail only (the next loss stops at the tail's input); and the
            unweighted loss, detached.
        """
        if self.config.mode != "bim":
            raise ValueError("backward_stage needs mode bim: in e2e the loss reaches every stage")
        weight = self.config.loss_weights[i] * loss_scale
        start, end = self.stage_bounds()[i]
        split = self.tail_start(i)
        if split == end and self.config.overlap == 0:
            x, loss = self.forward_stage(i, x, batch, amp_dtype)
            (loss * weight).backward()
            return x.detach(), loss.detach()
        with _autocast(batch.imgs.device, amp_dtype):
            if i == 0:
                x = self.embed(batch.imgs, batch.ids_keep)
            head = self.run_blocks(x, start, split)  # x: [B, P + n_keep, D]
            tail_in = head.detach().requires_grad_() if split < end else None
            out = self.run_blocks(tail_in, split, end) if tail_in is not None else head
            loss = self._exit_loss(i, out, batch)
        if tail_in is None:  # the last stage: one backward, through the previous stage's tail too
            (loss * weight).backward()
            return out.detach(), loss.detach()
        (loss * weight).backward(retain_graph=True)  # the tail's graph serves the next stage's loss too
        head.backward(tail_in.grad)  # the rest of the stage, then the previous stage's tail (freed)
        return out, loss.detach()

    def forward_backward(self, imgs: torch.Tensor, noise: torch.Tensor, loss_scale: float = 1.0,
                         amp_dtype: torch.dtype | None = None,
                         on_stage_end: Callable[[int], None] | None = None, stages: Sequence[int] | None = None,
                         x: torch.Tensor | None = None) -> StepLosses:
        """One training forward with the backward passes; gradients accumulate in ``.grad``.

        ``bim``: every stage's weighted loss is back-propagated as soon as it is computed, which frees
        that stage's graph; the next stage starts from the detached output. ``e2e``: one loss at the
        last exit, one backward through every block.

        Args:
            imgs: [B, 3, H, W] normalized images.
            noise: [B, N] masking noise (see :meth:`mask_noise`).
            loss_scale: multiplies every loss before backward (1 / accumulation steps).
            amp_dtype: autocast dtype for the forward passes (None: full precision).
            on_stage_end: called with ``i`` once stage ``i``'s gradients of this micro-batch are all
                in (``bim``: right after its backward, before the next stage runs; with overlap,
                after the next stage's backward, which also trains its tail; ``e2e``: after the one
                backward, for every stage in order).
            stages: ``bim`` only: run these consecutive stages (default: all), as a process of a
                stage-parallel layout does (not with overlap).
            x: the output tokens of the stage before ``stages[0]`` (None when it is stage 0).

        Returns:
            the unweighted per-stage losses and the last stage's output, detached.
        """
        batch = self.masked_batch(imgs, noise)
        losses: dict[int, torch.Tensor] = {}
        if self.config.mode == "bim":
            lag = 1 if self.config.overlap else 0  # overlap: stage i's tail gets gradients from stage i + 1
            run = list(range(self.num_stages) if stages is None else stages)
            for i in run:
                x, losses[self.exits[i]] = self.backward_stage(i, x, batch, loss_scale, amp_dtype)
                if on_stage_end is not None and i - lag >= run[0]:
                    on_stage_end(i - lag)
            if on_stage_end is not None and lag:
                on_stage_end(run[-1])
            return StepLosses(losses, x)
        if stages is not None or x is not None:
            raise ValueError("mode e2e runs every stage in one backward: stages and x need mode bim")
        for i, end in enumerate(self.exits):
            x, loss = self.forward_stage(i, x, batch, amp_dtype)
            if loss is not None:
                losses[end] = loss
        total = sum(losses[d] * w for d, w in zip(self.decoded_exits, self.config.loss_weights))
        (total * loss_scale).backward()
        if on_stage_end is not None:
            for i in range(self.num_stages):
                on_stage_end(i)
        return StepLosses({d: v.detach() for d, v in losses.items()}, x.detach())
