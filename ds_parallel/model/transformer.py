"""The decoder-only Transformer: embed -> blocks -> RMSNorm -> head.

    logits = head(norm(block_L(... block_1(embed(ids)))))

Input embedding and output head are separate matrices (untied, DeepSeek LLM and V2/V3),
or with `tie_embeddings` one: the head's weight is the embedding's Parameter (small Llama
and Qwen2.5 models), listed once by `named_parameters` as `embed.weight`. Both tables are
(V, D) and split over the vocab in the same rows, so tying holds under tp; pipeline
layouts, which put them on different stages, are refused (config/validate.py).
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

Packed rows (SFT, V3 §5.1: examples packed into one row must not see each other):
`forward(ids, segment_ids=...)` with segment_ids (B, T) naming each position's example.
`Segments` builds the (B, 1, T, T) mask, causal AND same example, once per forward; every
attention of the main blocks and of the MTP depths reads it. Positions are not reset at an
example's start: RoPE makes q_i . k_j depend on i - j alone, and the mask keeps i and j in one
example, so each example's scores equal those it gets alone in a row from position 0
(tests/unit/test_sft.py checks losses and gradients against unpacked rows). The caller puts
-100 on the label of each example's last position (its next token is another example's);
`finish` drops the MTP targets that cross into the next example itself (Segments.mtp_labels).
Without segment_ids the path is the plain causal one, unchanged.

`finish(..., n_targets=N)` divides the main and every MTP depth's summed cross-entropy by N
instead of by the micro-batch's own count of valid targets: a loop that passes the global
batch's count over its number of micro-batches gets, after the engine's averaging over
micro-batches and data-parallel ranks, the mean over every supervised token of the step
however the examples fall into rows (data/sft.py). Every depth shares N, as V3 §2.2 divides
every L_k by the same T.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn

from ds_parallel.model.block import Block
from ds_parallel.model.cache import Rows
from ds_parallel.model.norm import RMSNorm
from ds_parallel.model.mla import precompute_mla_freqs_cis
from ds_parallel.model.mtp import MultiTokenPrediction
from ds_parallel.model.rope import Llama3Scaling, precompute_freqs_cis
from ds_parallel.parallel.tensor_parallel import ColumnParallelLinear, VocabParallelEmbedding, vocab_parallel_cross_entropy


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (B, T, V/tp): this rank's vocab shard
    loss: Optional[torch.Tensor] = None  # lm_loss + aux_loss (+ mtp_loss); None without labels
    lm_loss: Optional[torch.Tensor] = None  # mean next-token cross-entropy (sum / n_targets if given)
    aux_loss: Optional[torch.Tensor] = None  # sum of MoE balance losses (MTP blocks included); 0 for dense
    mtp_loss: Optional[torch.Tensor] = None  # mtp_lambda / D * sum_k L_k; None without MTP or labels
    mtp_losses: Optional[torch.Tensor] = None  # (D,) unweighted L_k, detached, for logging


def model_freqs_cis(cfg) -> torch.Tensor:
    """RoPE rotations for the model's attention type, (max_seq_len, rope_dim/2) complex64.
    MHA rotates whole heads with plain RoPE, Llama-3.1-scaled with rope_scaling=llama3; MLA
    rotates only the decoupled qk_rope_head_dim channels, with YaRN when rope_factor > 1 (V3 §4.3)."""
    if cfg.attention == "mla":
        return precompute_mla_freqs_cis(cfg)
    llama3 = None
    if cfg.rope_scaling == "llama3":
        llama3 = Llama3Scaling(cfg.rope_factor, cfg.original_max_seq_len, cfg.rope_low_freq_factor,
                               cfg.rope_high_freq_factor)
    return precompute_freqs_cis(cfg.mha_head_dim, cfg.max_seq_len, cfg.rope_theta, llama3=llama3)


@dataclass(frozen=True)
class Segments:
    """Which example each position of a packed row belongs to, and the attention mask of
    that packing. Padding at a row's end is one more segment (data/sft.py gives it -1)."""
    ids: torch.Tensor  # (B, T) int
    mask: torch.Tensor  # (B, 1, T, T) bool: True where query i may read key j

    @classmethod
    def of(cls, segment_ids: torch.Tensor) -> "Segments":
        seqlen = segment_ids.shape[1]
        causal = torch.ones(seqlen, seqlen, dtype=torch.bool, device=segment_ids.device).tril()
        same = segment_ids[:, :, None] == segment_ids[:, None, :]  # (B, T, T)
        return cls(segment_ids, (same & causal).unsqueeze(1))

    def mtp_labels(self, labels: torch.Tensor, k: int) -> torch.Tensor:
        """MTP depth k's targets labels[:, k:] (B, T-k), -100 where position i and the
        position i + k whose label it is lie in different examples."""
        return labels[:, k:].masked_fill(self.ids[:, :-k] != self.ids[:, k:], -100)


@dataclass
class Trunk:
    """Embed and blocks done, head not yet: what an objective starts from."""
    h: torch.Tensor  # (B, T, D) last block's output, before the final norm
    aux_loss: torch.Tensor  # () running sum of the blocks' MoE balance losses
    emb: Optional[torch.Tensor]  # (B, T, D) the embedding lookup of the ids (MTP reads it); None without MTP
    freqs_cis: torch.Tensor
    segments: Optional[Segments] = None  # packed rows: pass to finish(segments=...); None = causal


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
            if cfg.tie_embeddings:
                if self.embed is None:
                    raise ValueError("model.tie_embeddings=true needs the embedding and the head on one pipeline "
                                     "stage: use parallel.pp=1")
                self.head.weight = self.embed.weight
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
                objective: Optional[Callable[["Transformer", Trunk], torch.Tensor]] = None,
                segment_ids: Optional[torch.Tensor] = None):
        """ModelOutput (loss fields when `labels` are given); with `objective`, its result.
        `segment_ids` (B, T): packed rows, each example attending only to itself."""
        assert self.complete, "a pipeline stage's part of the model runs through train/pipeline.py"
        freqs_cis = self.rope(input_ids.shape[1])
        segments = None
        if segment_ids is not None:
            assert segment_ids.shape == input_ids.shape, \
                f"segment_ids {tuple(segment_ids.shape)} must match input_ids {tuple(input_ids.shape)}"
            segments = Segments.of(segment_ids)  # once for every layer
        emb = self.embed(input_ids)  # (B, T, D)
        h, aux_loss = self.run_layers(emb, self.layers.values(), freqs_cis,
                                      mask=None if segments is None else segments.mask)
        if objective is not None:
            return objective(self, Trunk(h, aux_loss, emb if len(self.mtp) else None, freqs_cis, segments))
        return self.finish(h, aux_loss, labels, emb if labels is not None else None, freqs_cis, segments=segments)

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
    def run_layers(h: torch.Tensor, layers, freqs_cis: torch.Tensor, aux_loss: Optional[torch.Tensor] = None, *,
                   mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """h through `layers` in order; returns h and the running sum of MoE balance losses.
        `mask`: Segments.mask of packed rows, None for causal attention."""
        if aux_loss is None:
            aux_loss = h.new_zeros((), dtype=torch.float32)
        for layer in layers:
            h, aux = layer(h, freqs_cis, mask)
            aux_loss = aux_loss + aux
        return h, aux_loss

    def finish(self, h: torch.Tensor, aux_loss: torch.Tensor, labels: Optional[torch.Tensor],
               emb: Optional[torch.Tensor], freqs_cis: torch.Tensor, mtp_lambda: Optional[float] = None, *,
               segments: Optional[Segments] = None,
               n_targets: Optional[Union[float, torch.Tensor]] = None) -> ModelOutput:
        """Final norm, head, loss and MTP from the last layer's output. `emb` is the main
        embedding lookup of the input ids (MTP depth k reads emb[:, k:]); `mtp_lambda`
        defaults to cfg.mtp_lambda. `segments` (Trunk.segments) for packed rows; `n_targets`
        replaces each loss's own count of valid targets as its denominator (module docstring)."""
        h = self.norm(h)  # also h^0 of MTP
        logits = self.head(h)  # (B, T, V/tp)
        if labels is None:
            return ModelOutput(logits=logits, aux_loss=aux_loss)
        lm_loss = self._cross_entropy(logits, labels, n_targets)
        if len(self.mtp) == 0:
            return ModelOutput(logits=logits, loss=lm_loss + aux_loss, lm_loss=lm_loss, aux_loss=aux_loss)
        hidden, mtp_aux = self.mtp(h, emb, freqs_cis, None if segments is None else segments.mask)
        losses = torch.stack([
            self._cross_entropy(  # targets t_{i+k+1}
                self.head(h_k), labels[:, k:] if segments is None else segments.mtp_labels(labels, k), n_targets)
            for k, h_k in enumerate(hidden, start=1)
        ])  # (D,)
        mtp_lambda = self.cfg.mtp_lambda if mtp_lambda is None else mtp_lambda
        mtp_loss = mtp_lambda / len(self.mtp) * losses.sum()
        aux_loss = aux_loss + mtp_aux
        return ModelOutput(
            logits=logits, loss=lm_loss + aux_loss + mtp_loss, lm_loss=lm_loss, aux_loss=aux_loss,
            mtp_loss=mtp_loss, mtp_losses=losses.detach(),
        )

    def _cross_entropy(self, logits: torch.Tensor, labels: torch.Tensor,
                       n_targets: Optional[Union[float, torch.Tensor]]) -> torch.Tensor:
        """Mean over the valid targets, or their sum / n_targets."""
        loss = vocab_parallel_cross_entropy(logits, labels, self.ctx)
        if n_targets is None:
            return loss
        return loss * (labels != -100).sum() / n_targets
