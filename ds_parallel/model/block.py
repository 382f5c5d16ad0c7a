"""One pre-norm transformer block, and the two switch points that pick its parts.

    h = x + attn(attn_norm(x))
    y = h + ffn(ffn_norm(h))

`build_attention` and `build_ffn` are the only places that decide which attention (MHA/GQA
or MLA) and which FFN (dense SwiGLU or DeepSeekMoE) a layer gets; new kinds are added
there, never as `if` inside the block. An FFN may return `y` or `(y, aux_loss)` (MoE
balance losses); the block always returns `(x, aux_loss)` so the Transformer can sum them.

With a `region` (train.recompute=full; model/recompute.py injects a checkpointing runner)
the block keeps only its input for backward and recomputes the rest (Megatron's full
recompute): a dense block as one region; a MoE block as the attention half plus ffn_norm,
and inside the MoE layer the experts and shared experts (moe/layer.py `experts_region`), so
that routing and the EP all-to-alls run once and the recomputed experts see the same routed rows.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ds_parallel.model.attention import Attention
from ds_parallel.model.mla import MLA
from ds_parallel.model.mlp import MLP
from ds_parallel.model.norm import RMSNorm
from ds_parallel.moe.layer import MoE


def build_attention(layer_id: int, cfg, ctx) -> nn.Module:
    """Module with forward(x (B, T, D), freqs_cis, mask=None) -> (B, T, D)."""
    if cfg.attention == "mla":
        return MLA(layer_id, cfg, ctx)
    return Attention(cfg, ctx)


def build_ffn(layer_id: int, cfg, ctx) -> nn.Module:
    """Module with forward(x (B, T, D)) -> (B, T, D) or ((B, T, D), aux_loss).
    DeepSeekMoE keeps the first `n_dense_layers` layers dense (first_k_dense_replace)."""
    if cfg.is_moe_layer(layer_id):
        return MoE(layer_id, cfg, ctx)
    return MLP(cfg.dim, cfg.inter_dim, ctx)


class Block(nn.Module):
    def __init__(self, layer_id: int, cfg, ctx):
        super().__init__()
        self.layer_id = layer_id
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = build_attention(layer_id, cfg, ctx)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = build_ffn(layer_id, cfg, ctx)
        self.region = None  # runner of the whole block under full recompute; None: direct

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor,
                mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`mask`: None for causal attention, else (B, 1, T, T) bool for packed rows (transformer.Segments)."""
        if self.region is None or not torch.is_grad_enabled():
            return self._forward(x, freqs_cis, mask)
        if not isinstance(self.ffn, MoE):
            return self.region(self._forward, x, freqs_cis, mask)
        x, h = self.region(self._attend, x, freqs_cis, mask)
        out, aux = self.ffn(h)  # its experts recompute themselves (ffn.experts_region)
        return x + out, aux

    def _forward(self, x: torch.Tensor, freqs_cis: torch.Tensor,
                 mask: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x, h = self._attend(x, freqs_cis, mask)
        out = self.ffn(h)
        out, aux = out if isinstance(out, tuple) else (out, x.new_zeros((), dtype=torch.float32))
        return x + out, aux

    def _attend(self, x: torch.Tensor, freqs_cis: torch.Tensor,
                mask: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The attention half and the FFN's input: (x + attn(attn_norm(x)), ffn_norm of that)."""
        x = x + self.attn(self.attn_norm(x), freqs_cis, mask)  # (B, T, D)
        return x, self.ffn_norm(x)

    @torch.no_grad()
    def forward_decode(self, x: torch.Tensor, freqs_cis: torch.Tensor, cache, pos, slots=None) -> torch.Tensor:
        """The block over cached attention (model/cache.py); balance losses are not needed."""
        x = x + self.attn.forward_decode(self.attn_norm(x), freqs_cis, cache, pos, slots)
        out = self.ffn(self.ffn_norm(x))
        return x + (out[0] if isinstance(out, tuple) else out)
