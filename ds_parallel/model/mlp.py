"""SwiGLU feed-forward (Shazeer 2020), DeepSeek-V3 inference/model.py `MLP`:

    y = w2( silu(w1 x) * w3 x )

w1 and w3 (gate and up, dim -> inter) are column parallel and w2 (down, inter -> dim) row
parallel, so the gating is purely local: each tp rank owns inter/tp hidden units end to
end. Forward costs one all-reduce (after w2); backward one per column layer (w1, w3).

`swiglu_region` (train.recompute=selective with "swiglu", model/recompute.py): silu(w1 x) *
w3 x runs under a checkpoint, so backward keeps its two inputs and recomputes silu
(moe/experts.py `swiglu`).
"""
from __future__ import annotations

import torch
from torch import nn

from ds_parallel.moe.experts import swiglu
from ds_parallel.parallel.tensor_parallel import ColumnParallelLinear, RowParallelLinear


class MLP(nn.Module):
    def __init__(self, dim: int, inter_dim: int, ctx):
        super().__init__()
        assert inter_dim % ctx.tp == 0, f"inter_dim={inter_dim} is not divisible by tp={ctx.tp}"
        self.w1 = ColumnParallelLinear(dim, inter_dim, ctx)
        self.w2 = RowParallelLinear(inter_dim, dim, ctx)
        self.w3 = ColumnParallelLinear(dim, inter_dim, ctx)
        self.swiglu_region = None  # `swiglu`'s runner; None: no checkpoint

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(swiglu(self.w1(x), self.w3(x), self.swiglu_region))  # (B, T, D)
