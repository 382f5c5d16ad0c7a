"""Index math of the MoE dispatch (docs/architecture.md, invariant 8): pure tensor ops, no
processes.

Sender side: N tokens, each with K (token, slot) pairs naming a global expert; expert e
lives on rank e // n_local.
- `plan_dispatch`: one send row per (token, destination rank) with at least one kept pair
  there, grouped by rank (rank-major, token order within a rank). A token whose K experts
  share a rank crosses the wire once, not K times. Each row carries a multi-hot mask over
  the destination's local experts and (`scatter_weights`) its gate values for them.
Receiver side: S rows with their masks.
- `sort_by_expert`: the (row, local expert) pairs sorted by expert, and per-expert counts:
  the contiguous layout grouped GEMMs take.
- `sum_rows`: the sum of each received row's pair outputs (already gate-weighted by the
  experts, moe/experts.py).
Sender side again, after the reverse all-to-all:
- `unpermute`: sum of each token's rows (one per destination rank it was sent to).

`capacity_mask` optionally drops the lowest-affinity pairs of over-full experts, per
sequence, so the decision does not depend on how sequences are spread over ranks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class DispatchPlan:
    send_token: torch.Tensor  # (S,) source token of each send row, grouped by destination rank
    send_counts: torch.Tensor  # (ep,) int64 rows for each destination rank
    local_mask: torch.Tensor  # (S, n_local) bool: destination-local experts the row feeds
    pair_slot: torch.Tensor  # (N, K) int64 row * n_local + local expert of each pair; -1 = dropped


def plan_dispatch(indices: torch.Tensor, n_experts: int, ep: int, keep: Optional[torch.Tensor] = None) -> DispatchPlan:
    """indices (N, K) global expert ids -> the deduplicated send plan for `ep` ranks.
    `keep` (N, K) bool excludes dropped pairs (a token with none left is not sent)."""
    n_tokens, k = indices.shape
    n_local = n_experts // ep
    device = indices.device
    if keep is None:
        keep = torch.ones_like(indices, dtype=torch.bool)
    dest = indices // n_local  # (N, K)
    token = torch.arange(n_tokens, device=device).unsqueeze(1).expand(n_tokens, k)
    hit = torch.zeros(ep, n_tokens, dtype=torch.bool, device=device)
    hit[dest[keep], token[keep]] = True
    row_rank, send_token = hit.nonzero(as_tuple=True)  # rank-major: rows grouped by rank
    n_rows = send_token.numel()
    row_id = torch.full((ep, n_tokens), -1, dtype=torch.int64, device=device)
    row_id[row_rank, send_token] = torch.arange(n_rows, device=device)
    pair_slot = row_id[dest, token] * n_local + indices % n_local
    pair_slot = pair_slot.masked_fill(~keep, -1)
    local_mask = torch.zeros(n_rows * n_local, dtype=torch.bool, device=device)
    local_mask[pair_slot[keep]] = True
    return DispatchPlan(send_token, hit.sum(1), local_mask.view(n_rows, n_local), pair_slot)


def scatter_weights(plan: DispatchPlan, weights: torch.Tensor) -> torch.Tensor:
    """Gate values (N, K) -> (S, n_local), zero where a row does not feed an expert.
    Differentiable in `weights` (each slot is written by exactly one pair)."""
    keep = plan.pair_slot >= 0
    n_rows, n_local = plan.local_mask.shape
    flat = weights.new_zeros(n_rows * n_local).index_put((plan.pair_slot[keep],), weights[keep])
    return flat.view(n_rows, n_local)


def sort_by_expert(local_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(S, n_local) mask -> rows (P,), experts (P,) of every pair, sorted by expert (rows
    ascending within), and counts (n_local,) pairs per expert."""
    experts, rows = local_mask.t().nonzero(as_tuple=True)
    return rows, experts, local_mask.sum(0)


class _SumRows(torch.autograd.Function):
    """out[i] = sum of source[j] with index[j] == i, for i < n_rows. As zeros.index_add, but
    backward keeps only the index: autograd's index_add keeps `source` as well (its formula
    reads source's shape), a hidden-wide tensor per pair or per received row."""

    @staticmethod
    def forward(fctx, source, index, n_rows):
        fctx.save_for_backward(index)
        return source.new_zeros(n_rows, source.shape[-1]).index_add_(0, index, source)

    @staticmethod
    def backward(fctx, grad):
        (index,) = fctx.saved_tensors
        return grad.index_select(0, index), None, None


def sum_rows(source: torch.Tensor, index: torch.Tensor, n_rows: int) -> torch.Tensor:
    """(P, dim) rows -> (n_rows, dim), row i the sum of the rows with index i."""
    return _SumRows.apply(source, index, n_rows)


def unpermute(rows_out: torch.Tensor, send_token: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """Returned rows (S, dim), in send order -> (N, dim), summing each token's rows.
    Tokens that were not sent (all pairs dropped) get zeros."""
    return sum_rows(rows_out, send_token, n_tokens)


def capacity_mask(indices: torch.Tensor, affinity: torch.Tensor, n_experts: int, capacity: int) -> torch.Tensor:
    """indices, affinity (B, T, K) -> keep (B, T, K) bool: in each sequence, each expert keeps
    its `capacity` highest-affinity pairs (earlier tokens win ties) and drops the rest."""
    bsz = indices.shape[0]
    key = (torch.arange(bsz, device=indices.device).view(-1, 1, 1) * n_experts + indices).flatten()
    order = affinity.flatten().argsort(descending=True, stable=True)
    order = order[key[order].argsort(stable=True)]  # grouped by (sequence, expert), best first
    sorted_key = key[order]
    counts = torch.bincount(sorted_key, minlength=bsz * n_experts)
    starts = counts.cumsum(0) - counts
    rank_in_group = torch.arange(order.numel(), device=order.device) - starts[sorted_key]
    keep = torch.empty(order.numel(), dtype=torch.bool, device=order.device)
    keep[order] = rank_in_group < capacity
    return keep.view_as(indices)
