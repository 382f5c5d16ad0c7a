"""Multi-head Latent Attention (DeepSeek-V2 §2.1, V3 §2.1).

Keys and values of all heads come from one small latent per token, c = kv_norm(W^DKV h)
(kv_lora_rank wide), plus one RoPE key k^R = RoPE(W^KR h) shared by every head:

    k_i = [W^UK_i c ; k^R]      v_i = W^UV_i c      q_i = [q^C_i ; RoPE(q^R_i)]
    o_i = softmax(q_i . k_i * scale) v_i            u = W^O [o_1; ...; o_H]

The RoPE part is "decoupled" because a rotation between W^UK and the query would stop
W^UK from being folded into the query at decode time. Two forwards compute the same thing:

  * `forward` (training / prefill): expand c into per-head k and v with wkv_b and run
    causal attention over H heads of width qk_nope + qk_rope.
    Under selective recompute ("mla_up_proj", model/recompute.py) the up-projections with
    their norms run under checkpoints (`_expand_q`, `_expand_kv`), so backward keeps the
    latents, not the normed latents wq_b and wkv_b read (V3 §3.2.3).
  * `forward_decode` (absorbed; the expanded path of `forward` inside
    kernels.batch_invariant(), so that decode rounds as training does): the cache holds only c and the roped k^R per token
    (kv_lora_rank + qk_rope_head_dim values, `MLACache`). W^UK is absorbed into the query,
    attention runs over the latent itself (MQA with one key/value "head"), and W^UV is applied
    after the softmax-weighted sum. Same numbers, ~H*(2 d_h)/(d_c + d_h^R) times less cache.

Tensor parallel splits heads: wq / wq_b and wkv_b are column-parallel (rows are grouped
per head, so a row chunk is a set of whole heads), wo is row-parallel. wq_a, wkv_a and the
two norms are replicated. ColumnParallelLinear sums its input gradient over the tp group,
so the latents feeding wq_b / wkv_b get full gradients; k_pe enters the heads without a
column layer, so it crosses `copy_to_group` itself. Every replicated parameter therefore
gets the same full gradient on every tp rank.

HF checkpoint facts (established from transformers 5.24 modeling_deepseek_v3 / _v2, and
tested in tests/unit/test_mla.py):
  * No row permutation. HF's `apply_rotary_pos_emb_interleave` (rope_interleave=True) reads
    q_pe / k_pe as interleaved pairs (2i, 2i+1) exactly like ours, but writes the rotated
    result de-interleaved ([evens; odds]). It does that to q and k alike, so q.k is unchanged:
    the weights map 1:1 (q_b_proj/q_proj -> wq_b/wq, kv_a_proj_with_mqa -> wkv_a, ...).
    Only with rope_interleave=False would HF's split-half rotation need the 64 rope rows of
    each q head and of kv_a_proj_with_mqa permuted. DeepseekV2Attention uses complex
    (interleaved) RoPE and keeps the layout, also 1:1.
  * kv_b_proj (H*(nope+v), kv_lora_rank) is per head [W^UK (nope rows); W^UV (v rows)],
    the same as wkv_b; kv_a_proj_with_mqa rows are [W^DKV (kv_lora_rank); W^KR (rope)].
  * HF's softmax scale is qk_head_dim^-0.5 * mscale(factor, mscale_all_dim)^2, which is
    `yarn_softmax_scale`; its cos/sin carry mscale(f, mscale)/mscale(f, mscale_all_dim),
    equal to 1 in every shipped config (mscale == mscale_all_dim), so it is not modelled.
YaRN is on whenever rope_factor > 1 (as in HF); DeepSeek's inference code additionally
requires max_seq_len > original_seq_len.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from ds_parallel.kernels import attention, is_batch_invariant
from ds_parallel.model.cache import MLACache, Rows
from ds_parallel.model.norm import RMSNorm
from ds_parallel.model.rope import YarnScaling, apply_rotary, precompute_freqs_cis, yarn_softmax_scale
from ds_parallel.parallel.comm import copy_to_group
from ds_parallel.parallel.tensor_parallel import ColumnParallelLinear, Linear, RowParallelLinear


def yarn_scaling(cfg) -> YarnScaling:
    return YarnScaling(
        factor=cfg.rope_factor, original_max_seq_len=cfg.original_max_seq_len, beta_fast=cfg.beta_fast,
        beta_slow=cfg.beta_slow, mscale=cfg.mscale, mscale_all_dim=cfg.mscale_all_dim,
    )


def precompute_mla_freqs_cis(cfg, seqlen: Optional[int] = None) -> torch.Tensor:
    """RoPE table for the decoupled rope dims: (seqlen, qk_rope_head_dim / 2) complex64."""
    return precompute_freqs_cis(cfg.qk_rope_head_dim, seqlen or cfg.max_seq_len, cfg.rope_theta, yarn_scaling(cfg))


class MLA(nn.Module):
    def __init__(self, layer_id: int, cfg, ctx):
        super().__init__()
        assert cfg.n_heads % ctx.tp == 0, f"n_heads={cfg.n_heads} is not divisible by tp={ctx.tp}"
        self.layer_id = layer_id
        self.dim, self.n_heads, self.n_local_heads = cfg.dim, cfg.n_heads, cfg.n_heads // ctx.tp
        self.q_lora_rank, self.kv_lora_rank = cfg.q_lora_rank, cfg.kv_lora_rank
        self.qk_nope_head_dim, self.qk_rope_head_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
        self.qk_head_dim = cfg.qk_head_dim
        self.v_head_dim = cfg.v_head_dim
        self.tp_group = ctx.tp_group

        if self.q_lora_rank == 0:
            self.wq = ColumnParallelLinear(self.dim, self.n_heads * self.qk_head_dim, ctx)
        else:
            self.wq_a = Linear(self.dim, self.q_lora_rank)
            self.q_norm = RMSNorm(self.q_lora_rank, cfg.norm_eps)
            self.wq_b = ColumnParallelLinear(self.q_lora_rank, self.n_heads * self.qk_head_dim, ctx)
        self.wkv_a = Linear(self.dim, self.kv_lora_rank + self.qk_rope_head_dim)
        self.kv_norm = RMSNorm(self.kv_lora_rank, cfg.norm_eps)
        self.wkv_b = ColumnParallelLinear(self.kv_lora_rank, self.n_heads * (self.qk_nope_head_dim + self.v_head_dim), ctx)
        self.wo = RowParallelLinear(self.n_heads * self.v_head_dim, self.dim, ctx)
        # V3 §4.3 / inference/model.py: 1/sqrt(d_h + d_h^R), times mscale^2 under YaRN.
        self.softmax_scale = yarn_softmax_scale(self.qk_head_dim ** -0.5, yarn_scaling(cfg))
        self.up_proj_region = None  # runner of `_expand_q` / `_expand_kv` (selective "mla_up_proj")

    def _query(self, x: torch.Tensor, freqs_cis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        bsz, seqlen, _ = x.shape
        q = self.wq(x) if self.q_lora_rank == 0 else self.wq_b(self.q_norm(self.wq_a(x)))
        q = q.view(bsz, seqlen, self.n_local_heads, self.qk_head_dim)
        q_nope, q_pe = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        return q_nope, apply_rotary(q_pe, freqs_cis)  # (B, T, H_l, nope), (B, T, H_l, rope)

    def _latent(self, x: torch.Tensor, freqs_cis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kv, k_pe = self.wkv_a(x).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        k_pe = apply_rotary(k_pe.unsqueeze(2), freqs_cis).squeeze(2)
        return self.kv_norm(kv), k_pe  # (B, T, C), (B, T, rope): what the cache keeps

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Causal self-attention over x (B, T, D) at positions 0..T-1; freqs_cis (>= T, rope/2).
        `mask` (B, 1, T, T) bool (True: may attend) replaces the causal mask for packed rows
        (transformer.Segments). The down-projections run here; the up-projections of the
        latents in `_expand_q` / `_expand_kv`, under checkpoints when `up_proj_region` is set
        (without query compression, wq is no up-projection and its heads are kept as they are)."""
        q_lat = self.wq(x) if self.q_lora_rank == 0 else self.wq_a(x)  # (B, T, H_l*qk) or (B, T, q_lora)
        kv_a = self.wkv_a(x)  # (B, T, C + rope)
        region = self.up_proj_region if torch.is_grad_enabled() else None
        if region is not None and self.q_lora_rank:
            q = region(self._expand_q, q_lat, freqs_cis)
        else:
            q = self._expand_q(q_lat, freqs_cis)
        k, v = region(self._expand_kv, kv_a, freqs_cis) if region is not None else self._expand_kv(kv_a, freqs_cis)
        o = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, self.softmax_scale)
        return self.wo(o.transpose(1, 2).flatten(2))  # (B, T, D)

    def _expand_q(self, q_lat: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
        """Per-head queries (B, T, H_l, nope + rope): q_norm and wq_b (an up-projection, V3
        §3.2.3's recomputed set), RoPE on the rope part. `_query` and `_attend_expanded`'s steps."""
        bsz, seqlen, _ = q_lat.shape
        q = q_lat if self.q_lora_rank == 0 else self.wq_b(self.q_norm(q_lat))
        q_nope, q_pe = q.view(bsz, seqlen, self.n_local_heads, self.qk_head_dim).split(
            [self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        return torch.cat([q_nope, apply_rotary(q_pe, freqs_cis)], dim=-1)

    def _expand_kv(self, kv_a: torch.Tensor, freqs_cis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head keys (B, T, H_l, nope + rope) and values (B, T, H_l, v) from wkv_a's output:
        kv_norm and wkv_b (the other up-projection), RoPE on the shared k^R. `_latent` and
        `_attend_expanded`'s steps."""
        bsz, seqlen, _ = kv_a.shape
        kv, k_pe = kv_a.split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        k_pe = apply_rotary(k_pe.unsqueeze(2), freqs_cis).squeeze(2)
        k_pe = copy_to_group(k_pe, self.tp_group)  # shared by the local heads of every rank
        kv = self.wkv_b(self.kv_norm(kv)).view(bsz, seqlen, self.n_local_heads, self.qk_nope_head_dim + self.v_head_dim)
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        return torch.cat([k_nope, k_pe.unsqueeze(2).expand(-1, -1, self.n_local_heads, -1)], dim=-1), v

    def _attend_expanded(self, q_nope: torch.Tensor, q_pe: torch.Tensor, kv: torch.Tensor, k_pe: torch.Tensor,
                         visible: Optional[torch.Tensor]) -> torch.Tensor:
        """Per-head keys and values expanded from the latent kv (B, S, C) by wkv_b, attention of
        the queries (B, T, H_l, .) over them (causal when `visible` is None), then wo."""
        bsz, keys = kv.shape[:2]
        kv = self.wkv_b(kv).view(bsz, keys, self.n_local_heads, self.qk_nope_head_dim + self.v_head_dim)
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)  # (B, T, H_l, nope + rope)
        k = torch.cat([k_nope, k_pe.unsqueeze(2).expand(-1, -1, self.n_local_heads, -1)], dim=-1)
        # SDPA's flash / memory-efficient kernels keep the softmax statistics in fp32; on CPU
        # in fp32 (the parity tests) it is the plain math.
        o = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), visible, self.softmax_scale)
        return self.wo(o.transpose(1, 2).flatten(2))  # (B, T, D)

    @torch.no_grad()
    def forward_decode(self, x: torch.Tensor, freqs_cis: torch.Tensor, cache: MLACache,
                       pos: Union[int, torch.Tensor, Rows], slots: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Absorbed attention for tokens x (b, T, D), row i at positions pos[i]..pos[i]+T-1 of
        cache slot slots[i] (model/cache.py; an int `pos` is every row's, slots default to
        0..b-1; the model passes them worked out as `Rows`), attending to everything cached
        before them in its slot. T = 1 when decoding, the prompt when prefilling. freqs_cis
        is the full table from position 0."""
        bsz, seqlen, _ = x.shape
        rows = pos if isinstance(pos, Rows) else Rows.of(freqs_cis, seqlen, pos, slots, bsz)
        q_nope, q_pe = self._query(x, rows.rotations)
        kv, k_pe = self._latent(x, rows.rotations)
        kv_cache, pe_cache = cache.write_read(rows, kv=kv, pe=k_pe)  # (b, S, C), (b, S, rope)
        kv_cache, pe_cache = kv_cache.type_as(x), pe_cache.type_as(x)
        if is_batch_invariant():  # multiply in the training forward's order (kernels.py)
            return self._attend_expanded(q_nope, q_pe, kv_cache, pe_cache, rows.visible.unsqueeze(1))
        # (H_l, nope + v, C): rows [W^UK; W^UV] of each local head.
        wkv_b = self.wkv_b.weight.view(self.n_local_heads, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)
        w_uk, w_uv = wkv_b[:, : self.qk_nope_head_dim], wkv_b[:, self.qk_nope_head_dim :]
        q_lat = torch.einsum("bthd,hdc->bthc", q_nope, w_uk)  # W^UK absorbed: (B, T, H_l, C)
        scores = (
            torch.einsum("bthc,bsc->bths", q_lat, kv_cache) + torch.einsum("bthr,bsr->bths", q_pe, pe_cache)
        ) * self.softmax_scale  # (B, T, H_l, S)
        scores = scores.float().masked_fill(~rows.visible.unsqueeze(2), float("-inf"))  # (b, T, H_l, S)
        probs = scores.softmax(dim=-1).type_as(x)
        o_lat = torch.einsum("bths,bsc->bthc", probs, kv_cache)  # attention over the latent
        o = torch.einsum("bthc,hdc->bthd", o_lat, w_uv)  # W^UV applied after: (B, T, H_l, v)
        return self.wo(o.flatten(2))
