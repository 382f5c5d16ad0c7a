"""The DeepSeekMoE layer with expert parallelism (V3 §2.1.2; docs/architecture.md, invariant 8):

    h'_t = sum_{shared} FFN_s(u_t) + sum_{i in topK} g_{i,t} FFN_i(u_t)

in phases: route (router.py) -> permute (permute.py, index math) -> dispatch (dispatch.py,
all-to-all; one copy of a token per destination rank) -> local experts (experts.py,
grouped GEMM) -> gate-weighted combine on the expert's rank -> reverse all-to-all ->
unpermute (sum of a token's rows). With ep == 1 the all-to-alls are identities.

`forward` returns (y, aux_loss): the balance losses of this micro-batch, computed from
local tokens only (every loss is per sequence), to be added to the training loss.
Per-expert loads accumulate in each router over micro-batches; `update_moe_biases` sums
them over the data-parallel ranks once per optimizer step, moves the V3 bias and resets
them. Residual connection and normalisation belong to the block, not here.

Full recompute of a MoE block (train.recompute=full, model/block.py) injects
`experts_region`, a checkpointing runner (model/recompute.py): the expert computation on the
received rows (sort, grouped SwiGLU, gate-weighted sum) and the shared experts run under it,
while routing, the dispatch plan and both all-to-alls stay outside. So backward keeps the
received rows and the routing, the recomputed experts see exactly the routed rows (routing
is never re-run, so it cannot route differently and the expert loads are counted once), and
no all-to-all is repeated.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from ds_parallel.moe.dispatch import combine, dispatch
from ds_parallel.moe.experts import GroupedExperts, SwiGLU
from ds_parallel.moe.permute import capacity_mask, plan_dispatch, scatter_weights, sort_by_expert, sum_rows, unpermute
from ds_parallel.moe.replay import current_tape
from ds_parallel.moe.router import Router


class MoE(nn.Module):
    def __init__(self, layer_id: int, cfg, ctx, n_devices: Optional[int] = None):
        super().__init__()
        self.layer_id = layer_id
        self.n_experts = cfg.n_routed_experts
        self.ep, self.ep_rank, self.ep_group = ctx.ep, ctx.ep_rank, ctx.ep_group
        self.capacity_factor = cfg.capacity_factor
        self.gate = Router(cfg, ctx, n_devices)
        self.experts = GroupedExperts(cfg, ctx)
        self.shared_experts = None
        if cfg.n_shared_experts:
            self.shared_experts = SwiGLU(cfg.dim, cfg.n_shared_experts * cfg.moe_inter_dim, cfg.init_std)
        self.last_comm = {"dispatch_bytes": 0, "combine_bytes": 0}  # bytes to other ranks, last forward
        # How token rows cross the dispatch all-to-all: None sends them as they are;
        # fp8/apply.py sets fp8/dispatch.py's FP8Codec (FP8 payloads, V3 §3.3.3).
        self.dispatch_codec = None
        self.experts_region = None  # runner of the expert computation (full recompute); None: direct

    def capacity(self, seqlen: int) -> int:
        """Pairs one expert may take from one sequence (capacity_factor > 0). Per sequence,
        so which pairs drop does not depend on how sequences are spread over ranks."""
        return math.ceil(self.capacity_factor * seqlen * self.gate.topk / self.n_experts)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        bsz, seqlen, dim = x.shape
        h = x.reshape(-1, dim)  # (N, D)
        tape = current_tape()
        forced = tape.forced(self.layer_id) if tape is not None else None
        r = self.gate(h, forced)
        if tape is not None:
            tape.seen(self.layer_id, r.indices.view(bsz, seqlen, -1))
        aux_loss = self.gate.aux_loss(r, bsz)
        keep = None
        if self.capacity_factor > 0 and self.training:  # V2 §2.2.4: drop in training only
            affinity = r.scores.detach().gather(1, r.indices).view(bsz, seqlen, -1)
            keep = capacity_mask(r.indices.view(bsz, seqlen, -1), affinity, self.n_experts, self.capacity(seqlen))
            keep = keep.view_as(r.indices)
        region = self.experts_region if torch.is_grad_enabled() else None
        if self.ep == 1 and self.dispatch_codec is None and keep is None:
            y = self._local(h, r, region)
        else:
            y = self._dispatched(h, r, keep, region)
        if self.shared_experts is not None:
            y = y + (region(self.shared_experts, h) if region is not None else self.shared_experts(h))
        return y.view(bsz, seqlen, dim), aux_loss

    def _dispatched(self, h: torch.Tensor, r, keep: Optional[torch.Tensor], region) -> torch.Tensor:
        """Routed experts through the dispatch plan and the EP all-to-alls: (N, D) -> (N, D)."""
        plan = plan_dispatch(r.indices, self.n_experts, self.ep, keep)
        gates = scatter_weights(plan, r.weights.to(h.dtype))  # (S, n_local)
        x_recv, gates_recv, mask_recv, handle = dispatch(h.index_select(0, plan.send_token), gates, plan.local_mask,
                                                         plan.send_counts, self.ep_group, self.ep_rank,
                                                         self.dispatch_codec)
        rows, experts, counts = sort_by_expert(mask_recv)
        pair_gates = gates_recv[rows, experts]
        fn = self._pair_sums
        y_recv = region(fn, x_recv, rows, pair_gates, counts) if region is not None else fn(x_recv, rows, pair_gates, counts)
        y = unpermute(combine(y_recv, handle), plan.send_token, h.shape[0])
        self.last_comm = {"dispatch_bytes": handle.dispatch_bytes, "combine_bytes": handle.combine_bytes}
        return y

    def _local(self, h: torch.Tensor, r, region) -> torch.Tensor:
        """Every expert on this rank and no pair dropped (ep = 1, no FP8 dispatch): the pairs
        sorted by expert straight from the routing, without the dispatch plan. The same pair
        order and sums as the dispatch path, so the same numbers; it saves the plan's index
        math (a decode step of a few tokens is mostly that, and at 64 experts a training
        step spends a tenth of its time there)."""
        flat = r.indices.reshape(-1)  # (N*K,) token-major
        order = flat.argsort(stable=True)  # pairs grouped by expert, tokens ascending within
        rows = order // r.indices.shape[1]
        counts = torch.bincount(flat, minlength=self.n_experts)
        pair_gates = r.weights.to(h.dtype).reshape(-1).index_select(0, order)
        self.last_comm = {"dispatch_bytes": 0, "combine_bytes": 0}
        fn = self._pair_sums
        return region(fn, h, rows, pair_gates, counts) if region is not None else fn(h, rows, pair_gates, counts)

    def _pair_sums(self, x: torch.Tensor, rows: torch.Tensor, pair_gates: torch.Tensor,
                   counts: torch.Tensor) -> torch.Tensor:
        """Rows x (S, D) and their (row, local expert) pairs sorted by expert (`rows`, gate
        values, `counts` per expert) -> (S, D), each row the gate-weighted sum of its experts'
        outputs (the experts apply the gates, `GroupedExperts.forward`). Under full recompute
        this is what the checkpoint re-runs. Rows are gathered with index_select: on CPU
        advanced indexing (x[rows]) and its accumulating backward take several times longer."""
        return sum_rows(self.experts(x.index_select(0, rows), counts, pair_gates), rows, x.shape[0])


def moe_layers(model: nn.Module) -> list[MoE]:
    """Every MoE layer of `model` (of this pipeline stage), by layer id."""
    return sorted((m for m in model.modules() if isinstance(m, MoE)), key=lambda m: m.layer_id)


@torch.no_grad()
def update_moe_biases(model: nn.Module, ctx, speed: Optional[float] = None) -> dict[int, torch.Tensor]:
    """Once per optimizer step: sum each layer's accumulated loads over every rank that saw
    distinct tokens (ctx.dp_group; tp ranks share tokens and are not in it), apply the
    bias update at `speed` (the step's gamma; default the config's), reset the accumulators. Returns {layer_id: (E,) float load} for metrics.
    Collective over ctx.dp_group (one all-reduce for all layers)."""
    layers = moe_layers(model)
    if not layers:
        return {}
    loads = torch.stack([m.gate.load for m in layers])  # (L, E) int64
    if ctx.dp > 1 and ctx.dp_group is not None:
        dist.all_reduce(loads, group=ctx.dp_group)
    out = {}
    for m, load in zip(layers, loads):
        m.gate.update_bias(load, speed)
        m.gate.reset_load()
        out[m.layer_id] = load.float().cpu()
    return out


def expert_load_imbalance(loads: dict[int, torch.Tensor]) -> float:
    """max/mean tokens per expert of the worst layer (1.0 = perfectly balanced)."""
    worst = 1.0
    for load in loads.values():
        if load.sum() > 0:
            worst = max(worst, (load.max() / load.mean()).item())
    return worst
