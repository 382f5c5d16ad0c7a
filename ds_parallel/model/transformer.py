"""The decoder-only Transformer: embed -> blocks -> RMSNorm -> head.

    logits = head(norm(block_L(... block_1(embed(ids)))))

Input embedding and output head are separate matrices (untied, DeepSeek LLM and V2/V3).
Both are split over the vocab with tensor parallelism; the logits stay sharded,
(B, T, V/tp), and the loss is computed on the shards (`vocab_parallel_cross_entropy`).
Use `parallel.tensor_parallel.gather_logits` where the full distribution is needed.

Labels are aligned with positions: `labels[:, t]` is the token that should follow
`input_ids[:, :t+1]` (the data loader shifts, as in Megatron); -100 marks no target.

Layers live in a ModuleDict keyed by global layer id, so parameter names
(`layers.7.attn.wq.weight`) stay the same when a pipeline stage holds only some layers;
names are what init and checkpoints key on.

With `mtp_depth = D > 0` the model also trains D multi-token-prediction depths (`mtp.0` ...,
model/mtp.py, V3 §2.2) on the normed final hidden state, sharing `embed` and `head`:

    loss = lm_loss + aux_loss + mtp_loss,   mtp_loss = mtp_lambda / D * sum_k L_k

L_k is depth k's mean cross-entropy over its valid targets labels[:, k:]. MTP runs only
when labels are given; inference returns the main logits alone. `forward` weighs MTP by
cfg.mtp_lambda; a training loop passes the step's value to `finish` (V3 §4.2: 0.3 for the
first 10T tokens, 0.1 for the last 4.8T) through its objective.

A loop that minimises something else (SFT masks, GRPO's clipped ratio) passes
`forward(ids, objective=fn)`: the model runs embed and blocks and returns `fn(model, trunk)`,
where `trunk` (Trunk) holds the last block's output, the balance losses and the embedding;
`fn` calls `finish` for logits or losses. Going through `forward` keeps the DeepSpeed
engine's call path; pipeline stages build the same Trunk (train/pipeline.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from ds_parallel.model.block import Block
from ds_parallel.model.cache import Rows
from ds_parallel.model.norm import RMSNorm
from ds_parallel.model.mla import precompute_mla_freqs_cis
from ds_parallel.model.mtp import MultiTokenPrediction
from ds_parallel.model.rope import precompute_freqs_cis
from ds_parallel.parallel.tensor_parallel import ColumnParallelLinear, VocabParallelEmbedding, vocab_parallel_cross_entropy


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (B, T, V/tp): this rank's vocab shard
    loss: Optional[torch.Tensor] = None  # lm_loss + aux_loss (+ mtp_loss); None without labels
    lm_loss: Optional[torch.Tensor] = None  # mean next-token cross-entropy
    aux_loss: Optional[torch.Tensor] = None  # sum of MoE balance losses (MTP blocks included); 0 for dense
    mtp_loss: Optional[torch.Tensor] = None  # mtp_lambda / D * sum_k L_k; None without MTP or labels
    mtp_losses: Optional[torch.Tensor] = None  # (D,) unweighted L_k, detached, for logging


def model_freqs_cis(cfg) -> torch.Tensor:
    """RoPE rotations for the model's attention type, (max_seq_len, rope_dim/2) complex64.
    MHA rotates whole heads with plain RoPE; MLA rotates only the decoupled
    qk_rope_head_dim channels, with YaRN when rope_factor > 1 (V3 §4.3)."""
    if cfg.attention == "mla":
        return precompute_mla_freqs_cis(cfg)
    return precompute_freqs_cis(cfg.mha_head_dim, cfg.max_seq_len, cfg.rope_theta)


@dataclass
class Trunk:
    """Embed and blocks done, head not yet: what an objective starts from."""
    h: torch.Tensor  # (B, T, D) last block's output, before the final norm
    aux_loss: torch.Tensor  # () running sum of the blocks' MoE balance losses
    emb: Optional[torch.Tensor]  # (B, T, D) the embedding lookup of the ids (MTP reads it); None without MTP
    freqs_cis: torch.Tensor


class Transformer(nn.Module):
    """The whole model, or one pipeline rank's part of it: `layer_ids` (default all),
    `has_embed`, `has_head` (final norm, head and MTP) pick what this rank builds; names stay
    global, so init and checkpoints see the same names under every layout. Only the whole
    model has a `forward`; train/pipeline.py runs the parts of a partial one."""

    def __init__(self, cfg, ctx, layer_ids: Optional[Sequence[int]] = None, has_embed: bool = True,
                 has_head: bool = True):
        super().__init__()
        self.cfg, self.ctx = cfg, ctx
        ids = range(cfg.n_layers) if layer_ids is None else layer_ids
        self.complete = has_embed and has_head and list(ids) == list(range(cfg.n_layers))
        self.embed = VocabParallelEmbedding(cfg.vocab_size, cfg.dim, ctx) if has_embed else None
        self.layers = nn.ModuleDict({str(i): Block(i, cfg, ctx) for i in ids})
        self.norm = self.head = self.mtp = None
        if has_head:
            self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
            # The head stays in high precision (V3 §3.3): no FP8 gemm is ever injected here.
            self.head = ColumnParallelLinear(cfg.dim, cfg.vocab_size, ctx)
            self.mtp = MultiTokenPrediction(cfg, ctx)  # empty (no parameters) when mtp_depth = 0
        # Derived from the config, so not saved in checkpoints.
        self.register_buffer("freqs_cis", model_freqs_cis(cfg), persistent=False)

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) casts complex buffers too, and a complex -> bf16 cast silently
        # drops the imaginary half of every rotation. Keep freqs_cis complex64; only move it.
        freqs_cis = self._buffers.pop("freqs_cis")
        try:
            super()._apply(fn, recurse)
        finally:
            device = next((p.device for p in self.parameters()), freqs_cis.device)
            self._buffers["freqs_cis"] = freqs_cis.to(device)
        return self

    def forward(self, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None, *,
                objective: Optional[Callable[["Transformer", Trunk], torch.Tensor]] = None):
        """ModelOutput (loss fields when `labels` are given); with `objective`, its result."""
        assert self.complete, "a pipeline stage's part of the model runs through train/pipeline.py"
        freqs_cis = self.rope(input_ids.shape[1])
        emb = self.embed(input_ids)  # (B, T, D)
        h, aux_loss = self.run_layers(emb, self.layers.values(), freqs_cis)
        if objective is not None:
            return objective(self, Trunk(h, aux_loss, emb if len(self.mtp) else None, freqs_cis))
        return self.finish(h, aux_loss, labels, emb if labels is not None else None, freqs_cis)

    @torch.no_grad()
    def decode(self, input_ids: torch.Tensor, cache, pos, slots=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens input_ids (b, T), row i at positions pos[i].. of cache slot slots[i]
        (model/cache.py ModelCache; prefill, decode and verification are all this call).
        Returns the logits (b, T, V/tp) and the normed final hidden state (b, T, D), MTP's h^0."""
        assert self.complete, "decoding runs on a whole model (pipeline layouts are not supported)"
        rows = Rows.of(self.freqs_cis, input_ids.shape[1], pos, slots, input_ids.shape[0])  # once for every layer
        h = self.embed(input_ids)
        for i, layer in self.layers.items():
            h = layer.forward_decode(h, self.freqs_cis, cache.layers[int(i)], rows)
        h = self.norm(h)
        return self.head(h), h

    @torch.no_grad()
    def mtp_decode(self, depth: int, h_prev: torch.Tensor, next_ids: torch.Tensor, cache, pos,
                   slots=None) -> tuple[torch.Tensor, torch.Tensor]:
        """MTP depth `depth` (1-based) at cached positions: h_prev = h^{depth-1} (b, T, D) and
        next_ids = t_{i+depth} (b, T). Returns its logits (b, T, V/tp) and h^depth."""
        rows = Rows.of(self.freqs_cis, next_ids.shape[1], pos, slots, next_ids.shape[0])
        h = self.mtp[depth - 1].forward_decode(h_prev, self.embed(next_ids), self.freqs_cis, cache.mtp[depth - 1], rows)
        return self.head(h), h

    def rope(self, seqlen: int) -> torch.Tensor:
        assert seqlen <= self.cfg.max_seq_len, f"sequence length {seqlen} > model.max_seq_len={self.cfg.max_seq_len}"
        return self.freqs_cis[:seqlen]

    @staticmethod
    def run_layers(h: torch.Tensor, layers, freqs_cis: torch.Tensor,
                   aux_loss: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """h through `layers` in order; returns h and the running sum of MoE balance losses."""
        if aux_loss is None:
            aux_loss = h.new_zeros((), dtype=torch.float32)
        for layer in layers:
            h, aux = layer(h, freqs_cis)
            aux_loss = aux_loss + aux
        return h, aux_loss

    def finish(self, h: torch.Tensor, aux_loss: torch.Tensor, labels: Optional[torch.Tensor],
               emb: Optional[torch.Tensor], freqs_cis: torch.Tensor,
               mtp_lambda: Optional[float] = None) -> ModelOutput:
        """Final norm, head, loss and MTP from the last layer's output. `emb` is the main
        embedding lookup of the input ids (MTP depth k reads emb[:, k:]); `mtp_lambda`
        defaults to cfg.mtp_lambda."""
        h = self.norm(h)  # also h^0 of MTP
        logits = self.head(h)  # (B, T, V/tp)
        if labels is None:
            return ModelOutput(logits=logits, aux_loss=aux_loss)
        lm_loss = vocab_parallel_cross_entropy(logits, labels, self.ctx)
        if len(self.mtp) == 0:
            return ModelOutput(logits=logits, loss=lm_loss + aux_loss, lm_loss=lm_loss, aux_loss=aux_loss)
        hidden, mtp_aux = self.mtp(h, emb, freqs_cis)
        losses = torch.stack([
            vocab_parallel_cross_entropy(self.head(h_k), labels[:, k:], self.ctx)  # targets t_{i+k+1}
            for k, h_k in enumerate(hidden, start=1)
        ])  # (D,)
        mtp_lambda = self.cfg.mtp_lambda if mtp_lambda is None else mtp_lambda
        mtp_loss = mtp_lambda / len(self.mtp) * losses.sum()
        aux_loss = aux_loss + mtp_aux
        return ModelOutput(
            logits=logits, loss=lm_loss + aux_loss + mtp_loss, lm_loss=lm_loss, aux_loss=aux_loss,
            mtp_loss=mtp_loss, mtp_losses=losses.detach(),
        )
