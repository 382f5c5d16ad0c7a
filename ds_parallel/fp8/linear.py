"""Emulated blockwise FP8 linear: the three GEMMs of DeepSeek-V3's FP8 recipe (V3 §3.3).

For y = x W^T with x (M, K) (tokens x in) and W (N, K) (out x in):

    Fprop  y  = x  W^T    x: 1x128 tiles along K        W: 128x128 blocks
    Dgrad  dx = dy W      dy: 1x128 tiles along N       W: the same 128x128 blocks (transposed)
    Wgrad  dW = dy^T x    dy, x: 128x1 tiles along M    (the K of this GEMM is the token dim)

Every operand is E4M3 with per-tile fp32 scales (fp8/quant.py); products are accumulated
in fp32. dy's tiles are scaled with quant.GRAD_AMAX_FLOOR, not act_quant's 1e-4 clamp:
gradients of a mean loss are routinely 1e-6 and smaller. Activation gradients are never quantised in 128x128 blocks: V3 App. B.2 saw a 16B
MoE diverge when dgrad used them. x is kept for Wgrad only in FP8 (128x1 tiles, quantised
once in the forward from the full-precision x), a quarter of an fp32 copy.

How the accumulation is emulated. The kernel (inference/kernel.py `fp8_gemm`) multiplies
each 128-wide K block in FP8 and adds `partial * a_s[m, kb] * b_s[n, kb]` to an fp32
accumulator. `fp8_gemm` here offers three equivalent forms:

  * "dequant" (default, what training uses): dequantise both operands to fp32 and run one
    fp32 GEMM. sum_kb (sum_k qa qb) sa sb = sum_k (qa sa)(qb sb) exactly in real
    arithmetic; in fp32 it is the kernel's result up to fp32 rounding (every partial sum is
    fp32, the limit of "promote every N_C elements"). One BLAS call: the fast path on CPU.
  * "blockwise": the kernel's loop, one K block at a time, scales applied per block.
  * "scaled_mm": the same loop with `torch._scaled_mm` (real FP8 operands, row-wise scales)
    per K block, where the running torch accepts FP8 there (CPU does).
Tests check that the three agree.

Layout. Fprop and Dgrad tiles are per token, so they do not depend on how tokens are split
over ranks or micro-batches. Wgrad's 128x1 tiles run along tokens, so its quantisation does:
data-parallel layouts agree to fp32 rounding when each rank's micro-batch holds a multiple of
128 tokens (no tile straddles two ranks), otherwise to FP8 precision. Under EP an expert's
Wgrad runs over the rows every rank sent it, in one GEMM, as on a real grouped kernel.

`BlockwiseFP8Gemm` is the `gemm(x, weight)` callable that `fp8/recipe.py` injects into the
linears of parallel/tensor_parallel.py; `BlockwiseFP8GroupedGemm` does the same for the
routed experts' grouped GEMMs (moe/experts.py `grouped_linear`), with Wgrad tiles cut per
expert so that no 128-token tile mixes two experts (the layout-independent choice: an
expert's tiles do not depend on which rank or offset its tokens land at).
"""
from __future__ import annotations

import torch

from ds_parallel.fp8.quant import (
    FP8_DTYPE,
    GRAD_AMAX_FLOOR,
    dequantize,
    expand_block_scales,
    n_blocks,
    quantize_blocks,
    quantize_columns,
    quantize_tiles,
)
from ds_parallel.moe.experts import grouped_linear


def _pad_k(q: torch.Tensor, block_size: int) -> torch.Tensor:
    """Zero-pad the last dim of an FP8 tensor to a multiple of block_size (padding works on
    the uint8 view: byte 0 is +0.0 in E4M3)."""
    pad = -q.shape[-1] % block_size
    if not pad:
        return q
    return torch.nn.functional.pad(q.view(torch.uint8), (0, pad)).view(FP8_DTYPE)


def fp8_gemm(a_q: torch.Tensor, a_s: torch.Tensor, b_q: torch.Tensor, b_s: torch.Tensor, block_size: int = 128,
             impl: str = "dequant") -> torch.Tensor:
    """C = A B^T in fp32 from A (M, K), B (N, K) in E4M3 with one scale per row per K block:
    a_s (M, ceil(K/b)), b_s (N, ceil(K/b)). See the module docstring for `impl`."""
    tile = (1, block_size)
    if impl == "dequant":
        return dequantize(a_q, a_s, tile) @ dequantize(b_q, b_s, tile).t()
    a_q, b_q = _pad_k(a_q, block_size), _pad_k(b_q, block_size)
    out = torch.zeros(a_q.shape[0], b_q.shape[0], dtype=torch.float32, device=a_q.device)
    for kb in range(a_q.shape[1] // block_size):
        blk = slice(kb * block_size, (kb + 1) * block_size)
        sa, sb = a_s[:, kb : kb + 1].float(), b_s[:, kb].float().reshape(1, -1)  # (M, 1), (1, N)
        if impl == "blockwise":
            out += (a_q[:, blk].float() @ b_q[:, blk].float().t()) * sa * sb  # promote per K block
        elif impl == "scaled_mm":
            out += torch._scaled_mm(a_q[:, blk].contiguous(), b_q[:, blk].contiguous().t(), scale_a=sa.contiguous(),
                                    scale_b=sb.contiguous(), out_dtype=torch.float32)
        else:
            raise ValueError(f"fp8_gemm impl={impl!r}: expected dequant, blockwise or scaled_mm")
    return out


class FP8LinearFunction(torch.autograd.Function):
    """y = x W^T with all three GEMMs in blockwise FP8; x (..., K), W (N, K) -> (..., N)."""

    @staticmethod
    def forward(fctx, x, weight, block_size: int, power_of_two: bool, impl: str):
        n, k = weight.shape
        x2 = x.reshape(-1, k)  # (M, K)
        xq, xs = quantize_tiles(x2, block_size, power_of_two)  # (M, K), (M, KB)
        wq, ws = quantize_blocks(weight, block_size, power_of_two)  # (N, K), (NB, KB)
        y = fp8_gemm(xq, xs, wq, expand_block_scales(ws, n, block_size), block_size, impl)  # (M, N)
        if fctx.needs_input_grad[1]:  # X for Wgrad: 128x1 tiles, kept in FP8 only
            xcq, xcs = quantize_columns(x2, block_size, power_of_two)  # (M, K), (MB, K)
        else:
            xcq = xcs = None
        fctx.save_for_backward(wq, ws, xcq, xcs)
        fctx.cfg = (block_size, power_of_two, impl, x.shape, x.dtype, weight.dtype)
        return y.to(x.dtype).reshape(*x.shape[:-1], n)

    @staticmethod
    def backward(fctx, dy):
        wq, ws, xcq, xcs = fctx.saved_tensors
        block_size, power_of_two, impl, x_shape, x_dtype, w_dtype = fctx.cfg
        n, k = wq.shape
        dy2 = dy.reshape(-1, n)  # (M, N)
        dx = dw = None
        if fctx.needs_input_grad[0]:
            # Dgrad: dy in 1x128 tiles along N (its K here); W^T (K, N) reuses W's blocks.
            dyq, dys = quantize_tiles(dy2, block_size, power_of_two, GRAD_AMAX_FLOOR)  # (M, N), (M, NB)
            w_t_s = expand_block_scales(ws.t(), k, block_size)  # (K, NB)
            dx = fp8_gemm(dyq, dys, wq.t(), w_t_s, block_size, impl).to(x_dtype).reshape(x_shape)
        if fctx.needs_input_grad[1]:
            # Wgrad: dy^T (N, M) @ x (M, K), both in 128x1 tiles along the token dim M.
            dycq, dycs = quantize_columns(dy2, block_size, power_of_two, GRAD_AMAX_FLOOR)  # (M, N), (MB, N)
            dw = fp8_gemm(dycq.t(), dycs.t(), xcq.t(), xcs.t(), block_size, impl).to(w_dtype)  # (N, K)
        return dx, dw, None, None, None


class BlockwiseFP8Gemm:
    """The `gemm(x, weight)` callable of an FP8 linear (parallel/tensor_parallel.py hook).
    A plain object, so modules holding it still pickle and deep-copy."""

    def __init__(self, block_size: int = 128, power_of_two: bool = False, impl: str = "dequant"):
        assert block_size > 0, f"block_size={block_size} must be positive"
        self.block_size, self.power_of_two, self.impl = block_size, power_of_two, impl

    def __call__(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return FP8LinearFunction.apply(x, weight, self.block_size, self.power_of_two, self.impl)

    def __repr__(self) -> str:
        return f"BlockwiseFP8Gemm(block_size={self.block_size}, power_of_two={self.power_of_two})"


def _split_rows(t: torch.Tensor, counts: list[int]) -> list[torch.Tensor]:
    return list(t.split(counts))


class FP8GroupedLinearFunction(torch.autograd.Function):
    """Grouped y_g = x_g W_g^T over rows sorted by group, all GEMMs in blockwise FP8:
    x (P, K), w (G, N, K), counts (G,) -> (P, N). Fprop/Dgrad tiles are per row, hence
    independent of grouping; Wgrad's 128x1 tiles are cut within each group."""

    @staticmethod
    def forward(fctx, x, w, counts, block_size: int, power_of_two: bool, use_grouped_mm: bool):
        b = block_size
        n, k = w.shape[-2:]
        xq, xs = quantize_tiles(x, b, power_of_two)
        wq, ws = quantize_blocks(w, b, power_of_two)  # per expert: (G, N, K), (G, NB, KB)
        y = grouped_linear(dequantize(xq, xs, (1, b)), dequantize(wq, ws, (b, b)), counts, use_grouped_mm)
        sizes = counts.tolist()
        if fctx.needs_input_grad[1]:
            cols = [quantize_columns(x_g, b, power_of_two) for x_g in _split_rows(x, sizes)]
            xcq, xcs = torch.cat([c[0] for c in cols]), torch.cat([c[1] for c in cols])  # (P, K), (sum MB_g, K)
        else:
            xcq = xcs = None
        fctx.save_for_backward(wq, ws, xcq, xcs, counts)
        fctx.cfg = (b, power_of_two, use_grouped_mm, sizes, x.dtype, w.dtype)
        return y.to(x.dtype)

    @staticmethod
    def backward(fctx, dy):
        wq, ws, xcq, xcs, counts = fctx.saved_tensors
        b, power_of_two, use_grouped_mm, sizes, x_dtype, w_dtype = fctx.cfg
        dx = dw = None
        if fctx.needs_input_grad[0]:
            dyq, dys = quantize_tiles(dy, b, power_of_two, GRAD_AMAX_FLOOR)
            w_t = dequantize(wq, ws, (b, b)).transpose(-2, -1).contiguous()  # (G, K, N)
            dx = grouped_linear(dequantize(dyq, dys, (1, b)), w_t, counts, use_grouped_mm).to(x_dtype)
        if fctx.needs_input_grad[1]:
            x_cols = zip(_split_rows(xcq, sizes), xcs.split([n_blocks(c, b) for c in sizes]))
            grads = []
            for dy_g, (xq_g, xs_g) in zip(_split_rows(dy, sizes), x_cols):
                dyq_g, dys_g = quantize_columns(dy_g, b, power_of_two, GRAD_AMAX_FLOOR)
                grads.append(fp8_gemm(dyq_g.t(), dys_g.t(), xq_g.t(), xs_g.t(), b))  # (N, K)
            dw = torch.stack(grads).to(w_dtype)
        return dx, dw, None, None, None, None


class BlockwiseFP8GroupedGemm:
    """Drop-in for moe/experts.py `grouped_linear(x, w, counts, use_grouped_mm)`."""

    def __init__(self, block_size: int = 128, power_of_two: bool = False):
        assert block_size > 0, f"block_size={block_size} must be positive"
        self.block_size, self.power_of_two = block_size, power_of_two

    def __call__(self, x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, use_grouped_mm: bool = True) -> torch.Tensor:
        return FP8GroupedLinearFunction.apply(x, w, counts, self.block_size, self.power_of_two, use_grouped_mm)

    def __repr__(self) -> str:
        return f"BlockwiseFP8GroupedGemm(block_size={self.block_size}, power_of_two={self.power_of_two})"
