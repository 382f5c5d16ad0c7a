"""Tensor-parallel layers (Megatron-LM, Shoeybi et al. 2019 §3; DeepSeek-V3 inference/model.py).

Each layer holds only its shard and says which one via `set_shards` (parallel/shard.py), so
initialisation and checkpoints can rebuild the full tensor:

    ColumnParallelLinear  W (out/tp, in)   y_r = x W_r^T          output split on last dim
    RowParallelLinear     W (out, in/tp)   y = sum_r x_r W_r^T    output replicated
    VocabParallelEmbedding E (V/tp, D)     rows outside my vocab range are zero, then summed

A column layer followed by a row layer (attention heads, the SwiGLU MLP) needs one
all-reduce forward and one backward. The output head is column parallel over the vocab,
and `vocab_parallel_cross_entropy` takes its sharded logits without ever gathering them.

Every linear does its matmul through its `gemm(x, weight)` attribute, `kernels.linear` when built:
fp8/apply.py `apply_fp8` swaps it after construction, the one way FP8 reaches a linear
(docs/architecture.md), rather than a switch inside.
No biases: DeepSeek's linears have none.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ds_parallel.kernels import exp, linear, log
from ds_parallel.parallel.comm import (
    all_reduce,
    copy_to_group,
    gather_from_group,
    reduce_from_group,
    scatter_to_group,
)
from ds_parallel.parallel.shard import ShardSpec, set_shards

Gemm = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x, weight (out, in)) -> x @ weight^T


class Linear(nn.Module):
    """Replicated linear (same weight on every tp rank), for small projections that are not
    worth splitting (e.g. MLA's down-projections). Same `gemm` hook as the parallel ones."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.gemm: Gemm = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gemm(x, self.weight)


class ColumnParallelLinear(nn.Module):
    """y = x W^T with W split by output rows: replicated x (..., in) -> (..., out/tp),
    or the full (..., out) with `gather_output=True`."""

    def __init__(self, in_features: int, out_features: int, ctx, gather_output: bool = False):
        super().__init__()
        assert out_features % ctx.tp == 0, f"out_features={out_features} is not divisible by tp={ctx.tp}"
        self.in_features, self.out_features = in_features, out_features
        self.part_out_features = out_features // ctx.tp
        self.weight = nn.Parameter(torch.empty(self.part_out_features, in_features))
        set_shards(self.weight, ShardSpec(0, ctx.tp_rank, ctx.tp, "tp"))
        self.gemm: Gemm = linear
        self.gather_output, self.tp_group = gather_output, ctx.tp_group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x is replicated; every rank's slice of the output contributes to dL/dx: sum them.
        y = self.gemm(copy_to_group(x, self.tp_group), self.weight)  # (..., out/tp)
        return gather_from_group(y, self.tp_group) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """y = x W^T with W split by input columns: x (..., in/tp) (a column layer's output) ->
    replicated (..., out), summed over ranks. `input_is_parallel=False` cuts a replicated x."""

    def __init__(self, in_features: int, out_features: int, ctx, input_is_parallel: bool = True):
        super().__init__()
        assert in_features % ctx.tp == 0, f"in_features={in_features} is not divisible by tp={ctx.tp}"
        self.in_features, self.out_features = in_features, out_features
        self.part_in_features = in_features // ctx.tp
        self.weight = nn.Parameter(torch.empty(out_features, self.part_in_features))
        set_shards(self.weight, ShardSpec(1, ctx.tp_rank, ctx.tp, "tp"))
        self.gemm: Gemm = linear
        self.input_is_parallel, self.tp_group = input_is_parallel, ctx.tp_group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_group(x, self.tp_group)
        return reduce_from_group(self.gemm(x, self.weight), self.tp_group)  # (..., out)


class VocabParallelEmbedding(nn.Module):
    """Rows [r*V/tp, (r+1)*V/tp) of the table on rank r. Each rank looks up the ids it owns,
    writes zeros for the rest, and the all-reduce assembles the full embedding. Kept in high
    precision: no gemm hook (V3 §3.3: embedding is not FP8)."""

    def __init__(self, vocab_size: int, dim: int, ctx):
        super().__init__()
        assert vocab_size % ctx.tp == 0, f"vocab_size={vocab_size} is not divisible by tp={ctx.tp}"
        self.vocab_size, self.dim = vocab_size, dim
        self.part_vocab_size = vocab_size // ctx.tp
        self.vocab_start = ctx.tp_rank * self.part_vocab_size
        self.weight = nn.Parameter(torch.empty(self.part_vocab_size, dim))
        set_shards(self.weight, ShardSpec(0, ctx.tp_rank, ctx.tp, "tp"))
        self.tp, self.tp_group = ctx.tp, ctx.tp_group

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.part_vocab_size)
        y = F.embedding(local.masked_fill(outside, 0), self.weight)  # (B, T, D)
        y = y.masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_group(y, self.tp_group)


def gather_logits(logits: torch.Tensor, ctx) -> torch.Tensor:
    """Local vocab shard (..., V/tp) -> full logits (..., V), same on every tp rank."""
    return gather_from_group(logits, ctx.tp_group)


def vocab_parallel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ctx, ignore_index: int = -100) -> torch.Tensor:
    """Mean next-token loss from logits sharded on the vocab dim, identical on all tp ranks.
    Labels equal to `ignore_index` are excluded from the mean; a batch with no valid label
    gives 0 (F.cross_entropy would give nan). Computed in fp32."""
    valid = labels != ignore_index
    logp, _ = vocab_parallel_logprobs(logits, labels.masked_fill(~valid, 0), ctx)
    nll = torch.where(valid, -logp, torch.zeros_like(logp))
    return nll.sum() / valid.sum().clamp(min=1)


def vocab_parallel_logprobs(logits: torch.Tensor, targets: torch.Tensor, ctx, entropy: bool = False
                            ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Per-token log p(target) from logits sharded on the vocab dim (..., V/tp), and with
    `entropy` the distribution's entropy H = log S - sum_v p_v z_v; fp32, same on every tp rank.

    With m = max_v z_v (global) and z <- z - m, S = sum_v e^{z_v}: log p(y) = z_y - log S.
    The max is a constant (no gradient: nothing depends on it); S, the target logit and
    sum_v e^{z_v} z_v are partial sums over ranks, added by `reduce_from_group`, whose
    identity backward gives each rank exactly its slice of the gradient.
    """
    z = logits.float()  # (..., V/tp)
    part_vocab = z.shape[-1]
    m = all_reduce(z.detach().amax(dim=-1, keepdim=True), ctx.tp_group, torch.distributed.ReduceOp.MAX)
    z = z - m
    e = exp(z)
    log_s = log(reduce_from_group(e.sum(dim=-1), ctx.tp_group))  # (...)
    local = targets - ctx.tp_rank * part_vocab
    mine = (local >= 0) & (local < part_vocab)
    z_y = z.gather(-1, local.clamp(0, part_vocab - 1).unsqueeze(-1)).squeeze(-1)
    z_y = reduce_from_group(torch.where(mine, z_y, torch.zeros_like(z_y)), ctx.tp_group)
    h = None
    if entropy:
        h = log_s - reduce_from_group((e * z).sum(dim=-1), ctx.tp_group) / log_s.exp()
    return z_y - log_s, h
