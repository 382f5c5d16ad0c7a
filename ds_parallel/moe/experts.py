"""Experts: SwiGLU MLPs, w2(silu(w1 x) * w3 x) (V3 §2.1.2; DeepSeek-V3 inference/model.py
`Expert`).

`GroupedExperts` holds this rank's routed experts as stacked weights, w1/w3
(n_local_experts, moe_inter_dim, dim) and w2 (n_local_experts, dim, moe_inter_dim), and
runs them as grouped matrix products over rows already sorted by expert
(`kernels.grouped_linear`: MKL's batch GEMM on CPU in fp32, `torch._grouped_mm` elsewhere,
a loop over experts, never over tokens, where neither takes the dtype/device). `SwiGLU` is the dense MLP of the
shared experts (one MLP of width n_shared_experts * moe_inter_dim), replicated `Linear`s with
the same `gemm` hook as every other linear.

Expert tensors are tagged for the rest of the system: `shards` (which expert block this
rank holds, for init, checkpoints and gather_full), `init_per_expert` (the model's init
seeds each expert by its global id) and DeepSpeed's MoE convention, `allreduce = False`
plus `group_name = "ep_size_<ep>"` (deepspeed/moe/utils.py `is_moe_param`), so its
optimizer groups reduce their gradients over the expert-data-parallel group only.

Selective recompute (V3 §3.2.3: SwiGLU inputs cached, its output recomputed in backward):
`swiglu_region`, a runner model/recompute.py injects, runs silu(a) * b under a checkpoint, so
backward keeps a and b and recomputes silu(a) instead of keeping it.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from ds_parallel.kernels import grouped_linear, silu
from ds_parallel.parallel.shard import ShardSpec, set_shards
from ds_parallel.parallel.tensor_parallel import Linear


def _swiglu(a: torch.Tensor, b: torch.Tensor, scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    h = silu(a) * b
    return h if scale is None else h * scale.unsqueeze(-1)


def swiglu(a: torch.Tensor, b: torch.Tensor, region=None, fn: Callable = _swiglu,
           scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """fn(a, b) = silu(a) * b, each row times `scale` (rows,) if given; with grad enabled and
    a `region` runner, as region(fn, a, b[, scale])."""
    args = (a, b) if scale is None else (a, b, scale)
    if region is not None and torch.is_grad_enabled():
        return region(fn, *args)
    return fn(*args)


def tag_expert_param(param: nn.Parameter, ctx) -> nn.Parameter:
    set_shards(param, ShardSpec(0, ctx.ep_rank, ctx.ep, "ep"))
    param.init_per_expert = True
    param.allreduce = False
    param.group_name = f"ep_size_{ctx.ep}"
    return param


class GroupedExperts(nn.Module):
    def __init__(self, cfg, ctx):
        super().__init__()
        n_experts, ep = cfg.n_routed_experts, ctx.ep
        assert n_experts % ep == 0, f"n_routed_experts={n_experts} is not divisible by parallel.ep={ep}"
        self.n_local_experts = n_experts // ep
        self.expert_offset = ctx.ep_rank * self.n_local_experts  # global id of local expert 0
        inter, dim = cfg.moe_inter_dim, cfg.dim
        self.w1 = nn.Parameter(torch.empty(self.n_local_experts, inter, dim))
        self.w3 = nn.Parameter(torch.empty(self.n_local_experts, inter, dim))
        self.w2 = nn.Parameter(torch.empty(self.n_local_experts, dim, inter))
        for p in (self.w1, self.w2, self.w3):
            # Placeholder init; the model's init re-seeds each expert by its global id.
            nn.init.normal_(p, std=cfg.init_std)
            tag_expert_param(p, ctx)
        self.use_grouped_mm = True
        # Injection point for the grouped GEMM, as `gemm` is for the linears (fp8/recipe.py
        # swaps in an FP8 one); signature of `grouped_linear` (one weight, or a tuple of weights on the same rows).
        self.grouped_gemm = grouped_linear
        self.swiglu_region = None  # `swiglu`'s runner (model/recompute.py); None: no checkpoint
        self.swiglu_fn = _swiglu  # model/compile.py swaps in a compiled region

    def forward(self, x: torch.Tensor, counts: torch.Tensor, scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x (P, dim) rows sorted by local expert, counts (n_local_experts,) -> (P, dim).
        `scale` (P,), the pairs' gate values, multiplies each row's SwiGLU output before w2,
        which is linear: w2(g h) = g w2(h), the gate-weighted expert output, computed on
        moe_inter_dim-wide rows instead of dim-wide ones and fused into the SwiGLU's region."""
        gm, gemm = self.use_grouped_mm, self.grouped_gemm
        a, b = gemm(x, (self.w1, self.w3), counts, gm)  # one grouped call for both (kernels.grouped_linear)
        h = swiglu(a, b, self.swiglu_region, self.swiglu_fn, scale)
        return gemm(h, self.w2, counts, gm)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, inter_dim: int, init_std: float = 0.006):
        super().__init__()
        self.w1 = Linear(dim, inter_dim)
        self.w2 = Linear(inter_dim, dim)
        self.w3 = Linear(dim, inter_dim)
        for lin in (self.w1, self.w2, self.w3):
            nn.init.normal_(lin.weight, std=init_std)
        self.swiglu_region = None  # as GroupedExperts'

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(swiglu(self.w1(x), self.w3(x), self.swiglu_region))
