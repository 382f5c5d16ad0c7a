"""The two all-to-alls of expert parallelism, as autograd functions.

dispatch: the send rows of `permute.plan_dispatch` (grouped by destination rank) go to
          the ranks holding their experts, with their gate values and expert masks;
combine:  the rows come back, each already the gate-weighted sum of its local experts.

Both ride on `torch.distributed.all_to_all_single` with split sizes: the only form gloo
supports with unequal splits (its list-form `all_to_all` rejects them). The backward of an
all-to-all is the same all-to-all with the splits swapped, so gradients retrace the
tokens' path. Receive counts come from a small split-size exchange first. With ep == 1
(or no group) every call returns its input: the single-process model is the same code.

The token rows may cross the wire encoded by a payload codec (the MoE layer's
`dispatch_codec`; fp8/dispatch.py `FP8Codec` sends V3's FP8 rows + scales): it encodes even
with ep == 1, so the model computes the same numbers whatever the EP degree, and the
gradient goes back un-encoded, in the rows' own dtype (straight through the codec).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol

import torch
import torch.distributed as dist


class PayloadCodec(Protocol):
    """How token rows (S, dim) cross the wire."""

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Tensors of S rows each, in dtypes every backend sends (gloo: no fp8 dtypes)."""

    def decode(self, parts: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """The received parts -> rows (S', dim) in `dtype`."""

    def row_bytes(self, x: torch.Tensor) -> int:
        """Bytes `encode` puts on the wire for one row of x."""


def _all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], ep_group) -> torch.Tensor:
    x = x.contiguous()
    out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x, out_splits, in_splits, group=ep_group)
    return out


class AllToAll(torch.autograd.Function):
    """Rows of x, split by `in_splits` over the ranks of `ep_group`, arrive as a tensor
    split by `out_splits` (row counts from each rank); encoded on the way by `codec` if one
    is given. The gradient takes the reverse path in its own dtype."""

    @staticmethod
    def forward(fctx, x, out_splits, in_splits, ep_group, codec):
        fctx.splits = (out_splits, in_splits, ep_group)
        parts = codec.encode(x) if codec is not None else [x]
        if _active(ep_group):
            parts = [_all_to_all(p, out_splits, in_splits, ep_group) for p in parts]
        return codec.decode(parts, x.dtype) if codec is not None else parts[0]

    @staticmethod
    def backward(fctx, grad):
        out_splits, in_splits, ep_group = fctx.splits
        if _active(ep_group):
            grad = _all_to_all(grad, in_splits, out_splits, ep_group)
        return grad, None, None, None, None


def _active(ep_group) -> bool:
    return ep_group is not None and dist.get_world_size(ep_group) > 1


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], ep_group,
               codec: Optional[PayloadCodec] = None) -> torch.Tensor:
    if codec is not None:  # encodes even with ep == 1 (module docstring)
        return AllToAll.apply(x, out_splits, in_splits, ep_group, codec)
    if not _active(ep_group):
        return x
    if x.requires_grad:
        return AllToAll.apply(x, out_splits, in_splits, ep_group, None)
    return _all_to_all(x, out_splits, in_splits, ep_group)


def exchange_counts(send_counts: torch.Tensor, ep_group) -> torch.Tensor:
    """(ep,) rows this rank sends to each rank -> (ep,) rows it receives from each."""
    if not _active(ep_group):
        return send_counts
    recv = torch.empty_like(send_counts)
    dist.all_to_all_single(recv, send_counts.contiguous(), group=ep_group)
    return recv


@dataclass
class DispatchHandle:
    """What combine needs to send the rows back, plus bytes for benchmarks."""

    send_splits: list[int]
    recv_splits: list[int]
    ep_group: Optional[object]
    ep_rank: int
    dispatch_bytes: int = 0  # sent to other ranks by dispatch (tokens, gates, masks)
    combine_bytes: int = 0  # sent to other ranks by combine

    def bytes_to_others(self, splits: list[int], row_bytes: int) -> int:
        return row_bytes * (sum(splits) - splits[self.ep_rank])


def dispatch(x: torch.Tensor, gates: torch.Tensor, mask: torch.Tensor, send_counts: torch.Tensor, ep_group, ep_rank: int,
             codec: Optional[PayloadCodec] = None):
    """Send rows x (S, dim), gates (S, n_local) and masks (S, n_local) to their ranks, x
    encoded by `codec` if given. Returns the received (S', dim), (S', n_local), (S', n_local)
    and a DispatchHandle."""
    recv_counts = exchange_counts(send_counts, ep_group)
    send_splits, recv_splits = send_counts.tolist(), recv_counts.tolist()
    handle = DispatchHandle(send_splits, recv_splits, ep_group, ep_rank)
    x_bytes = codec.row_bytes(x) if codec is not None else x.shape[1] * x.element_size()
    row_bytes = x_bytes + gates.shape[1] * gates.element_size() + mask.shape[1]
    handle.dispatch_bytes = handle.bytes_to_others(send_splits, row_bytes)
    x_recv = all_to_all(x, recv_splits, send_splits, ep_group, codec)
    gates_recv = all_to_all(gates, recv_splits, send_splits, ep_group)
    mask_recv = all_to_all(mask, recv_splits, send_splits, ep_group)
    return x_recv, gates_recv, mask_recv, handle


def combine(y: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
    """Received rows' outputs (S', dim) -> back to their senders, in send order (S, dim)."""
    handle.combine_bytes = handle.bytes_to_others(handle.recv_splits, y.shape[1] * y.element_size())
    return all_to_all(y, handle.send_splits, handle.recv_splits, handle.ep_group)
