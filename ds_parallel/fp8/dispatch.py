"""The FP8 payload of the MoE dispatch (V3 §3.3.3; docs/architecture.md): a codec for
moe/dispatch.py, which does the all-to-all, the autograd and the byte count.

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
model computes the same numbers whatever the EP degree.
"""
from __future__ import annotations

import torch

from ds_parallel.fp8.quant import FP8_DTYPE, dequantize, quantize_tiles


class FP8Codec:
    """Token rows (S, dim) as E4M3 bytes (S, dim) plus fp32 scales (S, ceil(dim/b)); the MoE
    layer's `dispatch_codec` (set by fp8/apply.py `apply_fp8`)."""

    def __init__(self, block_size: int = 128):
        assert block_size > 0, f"block_size={block_size} must be positive"
        self.block_size = block_size

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        q, s = quantize_tiles(x, self.block_size, power_of_two=True)
        return [q.view(torch.uint8), s]

    def decode(self, parts: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        q, s = parts
        return dequantize(q.view(FP8_DTYPE), s, (1, self.block_size), dtype)

    def row_bytes(self, x: torch.Tensor) -> int:
        return x.shape[1] + 4 * -(-x.shape[1] // self.block_size)  # 1 byte per channel, 4 per tile

    def __repr__(self) -> str:
        return f"FP8Codec(block_size={self.block_size})"
