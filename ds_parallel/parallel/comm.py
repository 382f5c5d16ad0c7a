"""Autograd-aware collectives over a given process group (Megatron's f and g operators).

A tensor-parallel layer pair computes y = W2 (act(W1 x)) with W1 split by output rows and
W2 by input columns. Every rank holds the same (replicated) x, so:

    copy_to_group      f: forward identity,   backward all-reduce   (entering a TP region)
    reduce_from_group  g: forward all-reduce, backward identity     (leaving a TP region)
    gather_from_group     forward all-gather along the last dim, backward keep own slice
    scatter_to_group      forward keep own slice, backward all-gather along the last dim

f and g are conjugate: the backward of one is the forward of the other. Both rest on one
assumption, true everywhere in this code base: the computation after the region is
replicated on every rank of the group, so each rank's gradient of a replicated tensor is
already the full gradient.

A group of size 1 (or None, the single-process context) makes every function the identity,
so the single-process model is the same code (docs/architecture.md, invariant 1). These
functions only *use* groups; creating them is parallel/groups.py's job.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

ProcessGroup = dist.ProcessGroup


def group_size(group: Optional[ProcessGroup]) -> int:
    # None means "no group" (ParallelContext.single()); never fall back to WORLD.
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: Optional[ProcessGroup]) -> int:
    return 0 if group is None else dist.get_rank(group)


def all_reduce(t: torch.Tensor, group: Optional[ProcessGroup], op=dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce outside autograd (statistics, max for a stable softmax)."""
    if group_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


def _all_reduce_copy(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    out = x.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(out, group=group)
    return out


def _all_gather_last(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    x = x.contiguous()
    pieces = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(pieces, x, group=group)
    return torch.cat(pieces, dim=-1)


def _own_slice_last(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    size = dist.get_world_size(group)
    assert x.shape[-1] % size == 0, f"last dim {x.shape[-1]} not divisible by group size {size}"
    return x.chunk(size, dim=-1)[dist.get_rank(group)].contiguous()


class _CopyToGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce_copy(grad, ctx.group), None


class _ReduceFromGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce_copy(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherFromGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather_last(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _own_slice_last(grad, ctx.group), None


class _ScatterToGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _own_slice_last(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_last(grad, ctx.group), None


def copy_to_group(x: torch.Tensor, group: Optional[ProcessGroup]) -> torch.Tensor:
    """f: identity forward; gradients from all ranks are summed in backward."""
    return x if group_size(group) == 1 else _CopyToGroup.apply(x, group)


def reduce_from_group(x: torch.Tensor, group: Optional[ProcessGroup]) -> torch.Tensor:
    """g: sum of the partial results of all ranks; gradient passes through unchanged."""
    return x if group_size(group) == 1 else _ReduceFromGroup.apply(x, group)


def gather_from_group(x: torch.Tensor, group: Optional[ProcessGroup]) -> torch.Tensor:
    """(..., N/g) shards -> (..., N) concatenated in group-rank order."""
    return x if group_size(group) == 1 else _GatherFromGroup.apply(x, group)


def scatter_to_group(x: torch.Tensor, group: Optional[ProcessGroup]) -> torch.Tensor:
    """(..., N) replicated -> this rank's (..., N/g) piece."""
    return x if group_size(group) == 1 else _ScatterToGroup.apply(x, group)
