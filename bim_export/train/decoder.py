"""MAE's light decoder: the per-exit head that reconstructs the masked patches from an exit's tokens."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


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
