"""Causal multi-head / grouped-query attention with RoPE (DeepSeek LLM v1, LLaMA-style).

    q = x wq^T, k = x wk^T, v = x wv^T          per head, head_dim channels
    q, k <- RoPE(q), RoPE(k)
    o_h = softmax(q_h k_g^T / sqrt(head_dim) + causal) v_g,   g = h // (n_heads / n_kv_heads)
    y = [o_1; ...; o_H] wo^T

GQA (DeepSeek LLM 67B: 64 query heads, 8 KV heads) lets n_heads / n_kv_heads query heads
share one key/value head; n_kv_heads = n_heads is plain MHA.

Tensor parallelism splits heads: wq/wk/wv are column parallel, so rank r owns query heads
[r*H/tp, (r+1)*H/tp) and KV heads [r*G/tp, (r+1)*G/tp), which are exactly the KV heads
those query heads read (the head-to-group map is contiguous). wo is row parallel. The
attention core runs in fp32 (V3 §3.3 keeps attention operators in high precision).

With `qkv_bias` (Qwen2) q, k and v get biases, `bq`, `bk`, `bv` (o has none); each is cut
over tp with its weight's output rows, so a rank adds exactly its heads' biases.

`mask` (B, 1, T, T) bool, True where query i may read key j, replaces the causal mask for
rows that pack several examples (transformer.Segments: causal and within one example).
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from ds_parallel.kernels import attention
from ds_parallel.model.cache import KVCache, Rows
from ds_parallel.model.rope import apply_rotary
from ds_parallel.parallel.shard import ShardSpec, set_shards
from ds_parallel.parallel.tensor_parallel import ColumnParallelLinear, RowParallelLinear


def _column_bias(linear: ColumnParallelLinear, ctx) -> nn.Parameter:
    """A bias for a column-parallel linear: this rank's out/tp entries, split like its rows."""
    bias = nn.Parameter(torch.empty(linear.part_out_features))
    set_shards(bias, ShardSpec(0, ctx.tp_rank, ctx.tp, "tp"))
    bias.init_constant = 0.0  # model/init.py
    return bias


class Attention(nn.Module):
    def __init__(self, cfg, ctx):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.mha_kv_heads
        self.head_dim = cfg.mha_head_dim
        assert self.n_heads % self.n_kv_heads == 0, f"n_heads={self.n_heads} not divisible by n_kv_heads={self.n_kv_heads}"
        assert self.n_heads % ctx.tp == 0, f"n_heads={self.n_heads} is not divisible by tp={ctx.tp}"
        assert self.n_kv_heads % ctx.tp == 0, f"n_kv_heads={self.n_kv_heads} is not divisible by tp={ctx.tp}"
        self.n_local_heads = self.n_heads // ctx.tp
        self.n_local_kv_heads = self.n_kv_heads // ctx.tp
        self.interleaved = cfg.rope_interleave
        self.softmax_scale = self.head_dim**-0.5
        self.wq = ColumnParallelLinear(cfg.dim, self.n_heads * self.head_dim, ctx)
        self.wk = ColumnParallelLinear(cfg.dim, self.n_kv_heads * self.head_dim, ctx)
        self.wv = ColumnParallelLinear(cfg.dim, self.n_kv_heads * self.head_dim, ctx)
        self.wo = RowParallelLinear(self.n_heads * self.head_dim, cfg.dim, ctx)
        for name, linear in (("bq", self.wq), ("bk", self.wk), ("bv", self.wv)):
            self.register_parameter(name, _column_bias(linear, ctx) if cfg.qkv_bias else None)

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Projections of x (B, T, D) to this rank's heads: q (B, T, H, Dh), k and v (B, T, G, Dh)."""
        bsz, seqlen, _ = x.shape
        q, k, v = self.wq(x), self.wk(x), self.wv(x)
        if self.bq is not None:
            q, k, v = q + self.bq, k + self.bk, v + self.bv
        return (q.view(bsz, seqlen, self.n_local_heads, self.head_dim),
                k.view(bsz, seqlen, self.n_local_kv_heads, self.head_dim),
                v.view(bsz, seqlen, self.n_local_kv_heads, self.head_dim))

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        q, k, v = self._qkv(x)  # (B, T, H, Dh), (B, T, G, Dh), (B, T, G, Dh)
        q = apply_rotary(q, freqs_cis, self.interleaved)
        k = apply_rotary(k, freqs_cis, self.interleaved)
        # Heads before time; query head h reads KV head h // (H/G) (kernels.attention).
        q, k, v = (t.transpose(1, 2).float() for t in (q, k, v))  # (B, H|G, T, Dh)
        o = attention(q, k, v, mask, self.softmax_scale)  # (B, H, T, Dh)
        o = o.transpose(1, 2).reshape(bsz, seqlen, self.n_local_heads * self.head_dim).to(x.dtype)
        return self.wo(o)  # (B, T, D)

    @torch.no_grad()
    def forward_decode(self, x: torch.Tensor, freqs_cis: torch.Tensor, cache: KVCache,
                       pos: Union[int, torch.Tensor, Rows], slots: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Tokens x (b, T, D), row i at positions pos[i].. of cache slot slots[i] (or `Rows`),
        attending to its slot's cached keys and values (model/cache.py). freqs_cis is the full
        table."""
        bsz, seqlen, _ = x.shape
        rows = pos if isinstance(pos, Rows) else Rows.of(freqs_cis, seqlen, pos, slots, bsz)
        rot = rows.rotations
        q, k, v = self._qkv(x)
        q, k = apply_rotary(q, rot, self.interleaved), apply_rotary(k, rot, self.interleaved)
        k, v = cache.write_read(rows, k=k, v=v)  # (b, S, G, Dh)
        q, k, v = (t.transpose(1, 2).float() for t in (q, k, v))
        o = attention(q, k, v, rows.visible.unsqueeze(1), self.softmax_scale)
        o = o.transpose(1, 2).reshape(bsz, seqlen, self.n_local_heads * self.head_dim).to(x.dtype)
        return self.wo(o)
