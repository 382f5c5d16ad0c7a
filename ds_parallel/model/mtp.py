"""Multi-token prediction (DeepSeek-V3 §2.2): D extra depths, each predicting one token further.

Depth k = 1..D keeps the causal chain. At position i it combines the previous depth's
representation of token i with the embedding of token t_{i+k} and predicts t_{i+k+1}:

    h'^k_i = M_k [enorm(Emb(t_{i+k})); hnorm(h^{k-1}_i)]        M_k = eh_proj, (dim, 2*dim)
    h^k    = norm_k(TRM_k(h'^k_{0:T-k}))                           (B, T-k, D)
    P^k_i  = softmax(OutHead(h^k_i))                               target t_{i+k+1}

Emb and OutHead are the main model's modules (shared, not copied); each depth owns enorm,
hnorm, eh_proj, one Block (TRM_k) and a final RMSNorm `norm` (`shared_head.norm` in the HF
checkpoint). The Transformer does the embedding lookup and the head, so no module here holds
a second reference to them (and no parameter gets two names).

Conventions, with where they come from:

- Concatenation order: embedding FIRST, then hidden state. The paper writes [h; emb], but
  DeepSeek's released MTP implementations (vLLM/SGLang `deepseek_mtp`, megatron-core's MTP
  layer) concatenate the embedding first, and the checkpoint's `eh_proj` columns follow the
  implementations: columns [0, dim) read Emb, [dim, 2*dim) read h. The two orders are the
  same model up to a permutation of M_k's columns.
- h^0 is the main model's final hidden state AFTER its final RMSNorm, i.e. exactly what the
  main head reads ("the representation given by the main model", V3 §2.2). megatron-core
  hands the decoder output after `final_layernorm` to MTP, and vLLM's target model returns
  its post-norm state as `previous_hidden_states`. Likewise each depth passes on h^k after
  its own `norm`, the same tensor its head reads, so every depth sees its input the same way.
- Positions: depth k runs on the T-k positions 0..T-k-1 that have a target (the paper's
  h^k_{1:T-k}); nothing past the sequence is padded or computed, so MoE balance losses and
  expert loads count only real tokens. RoPE uses positions 0..T-k-1; attention depends only
  on relative positions, so a common offset (Megatron rolls positions by k) is equivalent.
- Labels (`labels[:, t]` = target of position t, -100 = none; see transformer.py):
  depth k at position i targets t_{i+k+1} = labels[:, i+k], i.e. `labels[:, k:]`. Its
  embedding input t_{i+k} equals labels[:, i+k-1] where that is not masked; it is read from
  `input_ids[:, k:]` instead (the same token, and it is there even where a loss mask put
  -100 into the labels). A -100 in labels[:, i+k] drops that position from depth k's loss.
- Packed rows (V3 §5.1, transformer.Segments): depth k's position i belongs to the example of
  token i (its h^{k-1}), so its attention mask is the main one cut to the first T-k positions,
  mask[..., :T-k, :T-k]. Where token i+k lies in the next example, Emb(t_{i+k}) comes from
  that example; the target is dropped (Segments.mtp_labels) and no position of its own
  example reads it (the mask keeps every query inside its example, and a valid position
  j < i' of the same example has j + k <= i' + k inside it too).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ds_parallel.model.block import Block
from ds_parallel.model.norm import RMSNorm
from ds_parallel.parallel.tensor_parallel import Linear


class MTPModule(nn.Module):
    """Depth `index + 1`: (h^{k-1} (B, T', D), Emb(t_{i+k}) (B, T', D)) -> (h^k (B, T', D), aux).

    eh_proj is a replicated Linear, the same (dim, 2*dim) matrix on every tp rank: its two
    inputs and its output are all replicated activations (the residual stream between
    blocks), so it needs no communication, and its gradient is identical on every tp rank
    because the first column-parallel layers of the block all-reduce dL/dx in backward (as
    for the RMSNorm gains). Splitting it would save 2*dim^2 weights per rank (about 0.015%
    of V3) at the price of an all-gather forward and an all-reduce backward.
    """

    def __init__(self, index: int, cfg, ctx):
        super().__init__()
        self.index = index
        self.enorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.hnorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.eh_proj = Linear(2 * cfg.dim, cfg.dim)
        # Global layer id n_layers + index, as the checkpoint stores it (V3: model.layers.61):
        # the dense/MoE choice and MoE bookkeeping treat it as the layer after the main stack.
        self.block = Block(cfg.n_layers + index, cfg, ctx)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, h_prev: torch.Tensor, emb: torch.Tensor, freqs_cis: torch.Tensor,
                mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        x, aux = self.block(self._merge(h_prev, emb), freqs_cis, mask)
        return self.norm(x), aux

    def _merge(self, h_prev: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """M_k [enorm(emb); hnorm(h_prev)] (B, T', D): the block's input (a region model/compile.py compiles)."""
        return self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h_prev)], dim=-1))

    @torch.no_grad()
    def forward_decode(self, h_prev: torch.Tensor, emb: torch.Tensor, freqs_cis: torch.Tensor, cache, pos,
                       slots=None) -> torch.Tensor:
        """h^k at cached positions (drafting, inference/speculative.py): h_prev = h^{k-1} and
        emb = Emb(t_{i+k}) at the rows' positions i; the block attends over its own cache."""
        x = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h_prev)], dim=-1))
        return self.norm(self.block.forward_decode(x, freqs_cis, cache, pos, slots))


class MultiTokenPrediction(nn.ModuleList):
    """The D depths, as `mtp.0`, `mtp.1`, ... Empty when mtp_depth = 0."""

    def __init__(self, cfg, ctx):
        super().__init__(MTPModule(i, cfg, ctx) for i in range(cfg.mtp_depth))

    def forward(self, h0: torch.Tensor, emb: torch.Tensor, freqs_cis: torch.Tensor,
                mask: Optional[torch.Tensor] = None) -> tuple[list[torch.Tensor], torch.Tensor]:
        """h0: main model's normed final hidden states (B, T, D); emb: Emb(input_ids) (B, T, D);
        mask: the main attention mask (B, 1, T, T) of packed rows, or None (causal).
        Returns [h^1 (B, T-1, D), ..., h^D (B, T-D, D)] and the summed MoE aux loss."""
        seqlen = h0.shape[1]
        assert seqlen > len(self), f"sequence length {seqlen} leaves no target for mtp_depth={len(self)}"
        aux_loss = h0.new_zeros((), dtype=torch.float32)
        hidden, h = [], h0
        for k, module in enumerate(self, start=1):
            n = seqlen - k  # positions i = 0..T-k-1, whose target t_{i+k+1} is in the sequence
            h, aux = module(h[:, :n], emb[:, k:], freqs_cis[:n], None if mask is None else mask[..., :n, :n])
            hidden.append(h)
            aux_loss = aux_loss + aux
        return hidden, aux_loss
