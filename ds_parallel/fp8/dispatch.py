"""MoE dispatch with FP8 payloads (V3 §3.3.3; docs/architecture.md, invariant 8).

V3 quantises the activations before the MoE up-projection to FP8 *before* the dispatch,
with power-of-two scales, so each token crosses the wire in about a quarter of its fp32
bytes (half of bf16); the combine, forward and backward, stays in high precision.

    sender:   q, s = quantize_tiles(x, 128, power_of_two=True)     1x128 tiles per row
              all-to-all  q.view(uint8)  and  s (fp32)            (gloo cannot send fp8 dtypes)
    receiver: x_recv = q * s                                       fed to the FP8 expert GEMMs

Why power-of-two scales here: the expert GEMM re-quantises x_recv in the same 1x128 tiles,
and x_recv's values are already E4M3 numbers times a power of two, so they come back bit for
bit (the tile max is q_max * s with q_max in [224, 448]: the new scale is s, or s/2 with
every q doubled, exactly), and the dispatch adds no error of its own. With plain amax/448
scales the GEMM recomputes s up to fp32 rounding and the q round back to themselves.

The gradient passes straight through the quantiser (its rounding is treated as identity,
the usual straight-through estimator) and returns by the reverse all-to-all in the input's
dtype. With ep == 1 there is no wire, but the rows are still quantised and dequantised: the
model computes the same numbers whatever the EP degree (invariant 2).
"""
from __future__ import annotations

import torch

from ds_parallel.fp8.quant import FP8_DTYPE, dequantize, quantize_tiles
from ds_parallel.moe.dispatch import DispatchHandle, _active, _all_to_all, all_to_all, exchange_counts


class FP8AllToAll(torch.autograd.Function):
    """Rows of x (S, dim) -> received rows (S', dim), sent as FP8 + per-tile scales."""

    @staticmethod
    def forward(fctx, x, out_splits, in_splits, ep_group, block_size: int):
        fctx.splits = (out_splits, in_splits, ep_group)
        q, s = quantize_tiles(x, block_size, power_of_two=True)  # (S, dim) fp8, (S, dim/b) fp32
        if _active(ep_group):
            q = _all_to_all(q.view(torch.uint8), out_splits, in_splits, ep_group).view(FP8_DTYPE)
            s = _all_to_all(s, out_splits, in_splits, ep_group)
        return dequantize(q, s, (1, block_size), x.dtype)

    @staticmethod
    def backward(fctx, grad):
        out_splits, in_splits, ep_group = fctx.splits
        if _active(ep_group):
            grad = _all_to_all(grad, in_splits, out_splits, ep_group)  # high precision, like combine
        return grad, None, None, None, None


class FP8Dispatch:
    """Drop-in for moe/dispatch.py `dispatch` (the MoE layer's `dispatch_fn` hook): the token
    rows travel in FP8, the gate values and masks as before."""

    def __init__(self, block_size: int = 128):
        assert block_size > 0, f"block_size={block_size} must be positive"
        self.block_size = block_size

    def __call__(self, x: torch.Tensor, gates: torch.Tensor, mask: torch.Tensor, send_counts: torch.Tensor,
                 ep_group, ep_rank: int):
        recv_counts = exchange_counts(send_counts, ep_group)
        send_splits, recv_splits = send_counts.tolist(), recv_counts.tolist()
        handle = DispatchHandle(send_splits, recv_splits, ep_group, ep_rank)
        n_tiles = -(-x.shape[1] // self.block_size)
        row_bytes = x.shape[1] + 4 * n_tiles + gates.shape[1] * gates.element_size() + mask.shape[1]
        handle.dispatch_bytes = handle.bytes_to_others(send_splits, row_bytes)
        x_recv = FP8AllToAll.apply(x, recv_splits, send_splits, ep_group, self.block_size)
        gates_recv = all_to_all(gates, recv_splits, send_splits, ep_group)
        mask_recv = all_to_all(mask, recv_splits, send_splits, ep_group)
        return x_recv, gates_recv, mask_recv, handle

    def __repr__(self) -> str:
        return f"FP8Dispatch(block_size={self.block_size})"
