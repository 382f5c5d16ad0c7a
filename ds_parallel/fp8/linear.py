"""Blockwise FP8 linear: the three GEMMs of DeepSeek-V3's FP8 recipe (V3 §3.3).

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
accumulator. `fp8_gemm` here offers four forms of it (`impl`):

  * "dequant" (what training uses off Hopper): dequantise both operands to fp32 and run one
    fp32 GEMM. sum_kb (sum_k qa qb) sa sb = sum_k (qa sa)(qb sb) exactly in real
    arithmetic; in fp32 it is the kernel's result up to fp32 rounding (every partial sum is
    fp32, the limit of "promote every N_C elements"). One BLAS call: the fast path on CPU.
  * "blockwise": the kernel's loop, one K block at a time, scales applied per block.
  * "scaled_mm": the same loop with `torch._scaled_mm` (real FP8 operands, row-wise scales)
    per K block, where the running torch accepts FP8 there (CPU does).
  * "scaled_mm_blockwise": one call of `torch.nn.functional.scaled_mm` with the recipe's own
    scalings (`ScalingType.BlockWise1x128` / `BlockWise128x128`), which torch runs on cuBLASLt's
    blockwise FP8 kernels (CUDA 12.9+) on Hopper only: torch rejects other architectures, sm100
    included. Real FP8 tensor-core GEMMs, fp32 output (bf16 is not forced: torch accepts
    fp32 for these recipes); how the tensor cores sum inside a K block before the fp32
    promotion is cuBLAS's choice, hence agreement to ~1e-3, not fp32 rounding. Fprop is 1x128 x 128x128; Dgrad is
    1x128 x 128x128 too, W^T's blocks being W's blocks transposed (no re-quantisation; W's FP8
    bytes and block scales are copied transposed into the layout cuBLAS reads); Wgrad is
    1x128 x 1x128 (cuBLAS's 1D x 1D case): dy^T's and x^T's rows are our 128x1 token columns.
    `scaled_mm_blockwise_operands` pads and lays out the operands (see there). Routed
    experts run one such GEMM per expert (torch has no grouped GEMM with 128x128 scales).
    **Unverified: no GPU has run it yet** (tests/gpu/test_fp8_gpu.py checks it against
    "blockwise" where an sm90 GPU is present).
"auto" (the default of the FP8 linears) picks "scaled_mm_blockwise" where
`scaled_mm_blockwise_available` says torch can run it on the operands' device, "dequant"
elsewhere (CPU, other GPUs): `select_gemm_impl`. Tests check that all of them agree.

Layout. Fprop and Dgrad tiles are per token, so they do not depend on how tokens are split
over ranks or micro-batches. Wgrad's 128x1 tiles run along tokens, so its quantisation does:
data-parallel layouts agree to fp32 rounding when each rank's micro-batch holds a multiple of
128 tokens (no tile straddles two ranks), otherwise to FP8 precision. Under EP an expert's
Wgrad runs over the rows every rank sent it, in one GEMM, as on a real grouped kernel.

`BlockwiseFP8Gemm` is the `gemm(x, weight)` callable that `fp8/recipe.py` injects into the
linears of parallel/tensor_parallel.py; `BlockwiseFP8GroupedGemm` does the same for the
routed experts' grouped GEMMs (kernels.py `grouped_linear`), with Wgrad tiles cut per
expert so that no 128-token tile mixes two experts (the layout-independent choice: an
expert's tiles do not depend on which rank or offset its tokens land at).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

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
from ds_parallel.fp8.recipe import scaled_mm_blockwise_available
from ds_parallel.kernels import grouped_linear


def _pad_k(q: torch.Tensor, block_size: int) -> torch.Tensor:
    """Zero-pad the last dim of an FP8 tensor to a multiple of block_size (padding works on
    the uint8 view: byte 0 is +0.0 in E4M3)."""
    pad = -q.shape[-1] % block_size
    if not pad:
        return q
    return F.pad(q.view(torch.uint8), (0, pad)).view(FP8_DTYPE)


SCALED_MM_BLOCKWISE = "scaled_mm_blockwise"
IMPLS = ("dequant", "blockwise", "scaled_mm", SCALED_MM_BLOCKWISE, "auto")
GEMM_IMPLS = {"auto": "auto", "emulated": "dequant", "cublas": SCALED_MM_BLOCKWISE}  # precision.fp8.gemm -> impl


def select_gemm_impl(device: torch.device | str, block_size: int = 128) -> str:
    """impl="auto": cuBLAS's blockwise FP8 GEMM where torch offers it for 128-wide tiles,
    the emulation (dequantise, one fp32 GEMM) everywhere else."""
    return SCALED_MM_BLOCKWISE if block_size == 128 and scaled_mm_blockwise_available(device) else "dequant"


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _pad_fp8(q: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Zero-pad a 2-D FP8 tensor to (rows, cols), contiguous (on the uint8 view, as _pad_k)."""
    pad_r, pad_c = rows - q.shape[0], cols - q.shape[1]
    if not pad_r and not pad_c:
        return q.contiguous()
    return F.pad(q.contiguous().view(torch.uint8), (0, pad_c, 0, pad_r)).view(FP8_DTYPE)


def scaled_mm_blockwise_operands(a_q: torch.Tensor, a_s: torch.Tensor, b_q: torch.Tensor, b_s: torch.Tensor,
                                 b_blocks: bool, block_size: int = 128):
    """Our C = A B^T operands -> the arguments of F.scaled_mm(mat_a, mat_b, ...) = mat_a @ mat_b.

    In: A (M, K), B (N, K) in E4M3; a_s (M, KB) one scale per row per 128-wide K block;
    b_s (NB, KB) 128x128 blocks if b_blocks, else (N, KB) per row (KB = ceil(K/128)).
    Out: (mat_a, scale_a, mat_b, scale_b, recipe_b), with the shapes and strides torch's
    CUDA implementation checks (aten/src/ATen/native/cuda/ScaledBlas.cpp):

        mat_a    (Mp, Kp)  row-major                      mat_b (Kp, Np) column-major (= B^T)
        scale_a  (Mp, KB)  strides (1, Mp)                BlockWise1x128, "outer-dim-major"
        scale_b  (L4, NB)  strides (1, L4), L4 = KB rounded up to 4     BlockWise128x128
             or  (Np, KB)  strides (1, Np)                              BlockWise1x128

    and out[m, n] = sum_kb scale_a[m, kb] * scale_b[kb, n // 128] (or scale_b[n, kb])
    * sum_{k in block kb} mat_a[m, k] mat_b[k, n], accumulated in fp32.
    Padding: K and N up to multiples of 128 (torch's shape checks use K // 128 and N // 128
    in places, and cuBLAS needs K, N % 16), M up to a multiple of 16 (16-byte aligned scale
    columns). Padded elements are FP8 zeros, so they add nothing whatever their scale (1.0
    for padded rows, 0 for the L4 filler); the caller cuts the result back to (M, N)."""
    if block_size != 128:
        raise ValueError(f"precision.fp8.block_size={block_size}: cuBLAS's blockwise FP8 GEMM takes 128 only; "
                         "use block_size=128 or another fp8_gemm impl")
    from torch.nn.functional import ScalingType

    (m, k), n = a_q.shape, b_q.shape[0]
    mp, kp, np_ = _round_up(m, 16), _round_up(k, 128), _round_up(n, 128)
    kb = kp // 128
    mat_a = _pad_fp8(a_q, mp, kp)  # (Mp, Kp)
    mat_b = _pad_fp8(b_q, np_, kp).t()  # (Kp, Np), column-major
    scale_a = F.pad(a_s.float(), (0, 0, 0, mp - m), value=1.0).t().contiguous().t()  # (Mp, KB), strides (1, Mp)
    if b_blocks:
        l4 = _round_up(kb, 4)
        scale_b = F.pad(b_s.float(), (0, l4 - kb)).contiguous().t()  # (NB, L4) -> (L4, NB), strides (1, L4)
        return mat_a, scale_a, mat_b, scale_b, ScalingType.BlockWise128x128
    scale_b = F.pad(b_s.float(), (0, 0, 0, np_ - n), value=1.0).t().contiguous().t()  # (Np, KB), strides (1, Np)
    return mat_a, scale_a, mat_b, scale_b, ScalingType.BlockWise1x128


def _scaled_mm_blockwise(a_q, a_s, b_q, b_s, block_size: int, b_blocks: bool) -> torch.Tensor:
    from torch.nn.functional import ScalingType

    m, n = a_q.shape[0], b_q.shape[0]
    mat_a, scale_a, mat_b, scale_b, recipe_b = scaled_mm_blockwise_operands(a_q, a_s, b_q, b_s, b_blocks, block_size)
    # fp32 output: the accumulator is written as is (torch accepts fp32 for these recipes),
    # so nothing is rounded to bf16 before the caller's cast to the activation dtype.
    out = F.scaled_mm(mat_a, mat_b, scale_a, ScalingType.BlockWise1x128, scale_b, recipe_b,
                      output_dtype=torch.float32)
    return out[:m, :n]


def fp8_gemm(a_q: torch.Tensor, a_s: torch.Tensor, b_q: torch.Tensor, b_s: torch.Tensor, block_size: int = 128,
             impl: str = "dequant", b_blocks: bool = False) -> torch.Tensor:
    """C = A B^T in fp32 from A (M, K), B (N, K) in E4M3 with one scale per row per K block:
    a_s (M, ceil(K/b)), b_s (N, ceil(K/b)), or with `b_blocks` B's b x b block scales
    (ceil(N/b), ceil(K/b)). See the module docstring for `impl`."""
    if impl == "auto":
        impl = select_gemm_impl(a_q.device, block_size)
    if impl == SCALED_MM_BLOCKWISE:
        return _scaled_mm_blockwise(a_q, a_s, b_q, b_s, block_size, b_blocks)
    if b_blocks:
        b_s = expand_block_scales(b_s, b_q.shape[0], block_size)
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
            raise ValueError(f"fp8_gemm impl={impl!r}: expected one of {', '.join(IMPLS)}")
    return out


class FP8LinearFunction(torch.autograd.Function):
    """y = x W^T with all three GEMMs in blockwise FP8; x (..., K), W (N, K) -> (..., N)."""

    @staticmethod
    def forward(fctx, x, weight, block_size: int, power_of_two: bool, impl: str):
        n, k = weight.shape
        x2 = x.reshape(-1, k)  # (M, K)
        xq, xs = quantize_tiles(x2, block_size, power_of_two)  # (M, K), (M, KB)
        wq, ws = quantize_blocks(weight, block_size, power_of_two)  # (N, K), (NB, KB)
        y = fp8_gemm(xq, xs, wq, ws, block_size, impl, b_blocks=True)  # (M, N)
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
        n = wq.shape[0]
        dy2 = dy.reshape(-1, n)  # (M, N)
        dx = dw = None
        if fctx.needs_input_grad[0]:
            # Dgrad: dy in 1x128 tiles along N (its K here); W^T (K, N) reuses W's blocks, (KB, NB).
            dyq, dys = quantize_tiles(dy2, block_size, power_of_two, GRAD_AMAX_FLOOR)  # (M, N), (M, NB)
            dx = fp8_gemm(dyq, dys, wq.t(), ws.t(), block_size, impl, b_blocks=True).to(x_dtype).reshape(x_shape)
        if fctx.needs_input_grad[1]:
            # Wgrad: dy^T (N, M) @ x (M, K), both in 128x1 tiles along the token dim M.
            dycq, dycs = quantize_columns(dy2, block_size, power_of_two, GRAD_AMAX_FLOOR)  # (M, N), (MB, N)
            dw = fp8_gemm(dycq.t(), dycs.t(), xcq.t(), xcs.t(), block_size, impl).to(w_dtype)  # (N, K)
        return dx, dw, None, None, None


class BlockwiseFP8Gemm:
    """The `gemm(x, weight)` callable of an FP8 linear (parallel/tensor_parallel.py hook).
    A plain object, so modules holding it still pickle and deep-copy."""

    def __init__(self, block_size: int = 128, power_of_two: bool = False, impl: str = "auto"):
        assert block_size > 0, f"block_size={block_size} must be positive"
        assert impl in IMPLS, f"impl={impl!r}: expected one of {IMPLS}"
        self.block_size, self.power_of_two, self.impl = block_size, power_of_two, impl

    def __call__(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return FP8LinearFunction.apply(x, weight, self.block_size, self.power_of_two, self.impl)

    def __repr__(self) -> str:
        return f"BlockwiseFP8Gemm(block_size={self.block_size}, power_of_two={self.power_of_two}, impl={self.impl})"


def _split_rows(t: torch.Tensor, counts: list[int]) -> list[torch.Tensor]:
    return list(t.split(counts))


def _grouped_fp8_gemm(aq, a_s, bq, b_s, sizes: list[int], block_size: int, impl: str) -> torch.Tensor:
    """rows of group g times B_g^T, one fp8_gemm per group (B_g with 128x128 block scales):
    aq (P, K), a_s (P, KB), bq (G, N, K), b_s (G, NB, KB) -> (P, N) fp32."""
    outs = [fp8_gemm(aq_g, as_g, bq[g], b_s[g], block_size, impl, b_blocks=True) if aq_g.shape[0]
            else aq_g.new_zeros(0, bq.shape[1], dtype=torch.float32)
            for g, (aq_g, as_g) in enumerate(zip(_split_rows(aq, sizes), _split_rows(a_s, sizes)))]
    return torch.cat(outs)


class FP8GroupedLinearFunction(torch.autograd.Function):
    """Grouped y_g = x_g W_g^T over rows sorted by group, all GEMMs in blockwise FP8:
    x (P, K), w (G, N, K), counts (G,) -> (P, N). Fprop/Dgrad tiles are per row, hence
    independent of grouping; Wgrad's 128x1 tiles are cut within each group. With
    impl="dequant" Fprop and Dgrad are one grouped GEMM of the dequantised operands; any
    other impl runs one fp8_gemm per group (torch has no grouped GEMM with 128x128 scales)."""

    @staticmethod
    def forward(fctx, x, w, counts, block_size: int, power_of_two: bool, use_grouped_mm: bool, impl: str):
        b = block_size
        impl = select_gemm_impl(x.device, b) if impl == "auto" else impl
        xq, xs = quantize_tiles(x, b, power_of_two)
        wq, ws = quantize_blocks(w, b, power_of_two)  # per expert: (G, N, K), (G, NB, KB)
        sizes = counts.tolist()
        if impl == "dequant":
            y = grouped_linear(dequantize(xq, xs, (1, b)), dequantize(wq, ws, (b, b)), counts, use_grouped_mm)
        else:
            y = _grouped_fp8_gemm(xq, xs, wq, ws, sizes, b, impl)
        if fctx.needs_input_grad[1]:
            cols = [quantize_columns(x_g, b, power_of_two) for x_g in _split_rows(x, sizes)]
            xcq, xcs = torch.cat([c[0] for c in cols]), torch.cat([c[1] for c in cols])  # (P, K), (sum MB_g, K)
        else:
            xcq = xcs = None
        fctx.save_for_backward(wq, ws, xcq, xcs, counts)
        fctx.cfg = (b, power_of_two, use_grouped_mm, sizes, x.dtype, w.dtype, impl)
        return y.to(x.dtype)

    @staticmethod
    def backward(fctx, dy):
        wq, ws, xcq, xcs, counts = fctx.saved_tensors
        b, power_of_two, use_grouped_mm, sizes, x_dtype, w_dtype, impl = fctx.cfg
        dx = dw = None
        if fctx.needs_input_grad[0]:
            dyq, dys = quantize_tiles(dy, b, power_of_two, GRAD_AMAX_FLOOR)
            if impl == "dequant":
                w_t = dequantize(wq, ws, (b, b)).transpose(-2, -1).contiguous()  # (G, K, N)
                dx = grouped_linear(dequantize(dyq, dys, (1, b)), w_t, counts, use_grouped_mm).to(x_dtype)
            else:  # W_g^T's blocks are W_g's, transposed
                w_t, ws_t = wq.transpose(-2, -1), ws.transpose(-2, -1)  # (G, K, N), (G, KB, NB)
                dx = _grouped_fp8_gemm(dyq, dys, w_t, ws_t, sizes, b, impl).to(x_dtype)
        if fctx.needs_input_grad[1]:
            x_cols = zip(_split_rows(xcq, sizes), xcs.split([n_blocks(c, b) for c in sizes]))
            grads = []
            for dy_g, (xq_g, xs_g) in zip(_split_rows(dy, sizes), x_cols):
                if not dy_g.shape[0]:  # no tokens: a K = 0 GEMM, which not every kernel takes
                    grads.append(dy_g.new_zeros(dy_g.shape[1], xq_g.shape[1], dtype=torch.float32))
                    continue
                dyq_g, dys_g = quantize_columns(dy_g, b, power_of_two, GRAD_AMAX_FLOOR)
                grads.append(fp8_gemm(dyq_g.t(), dys_g.t(), xq_g.t(), xs_g.t(), b, impl))  # (N, K)
            dw = torch.stack(grads).to(w_dtype)
        return dx, dw, None, None, None, None, None


class BlockwiseFP8GroupedGemm:
    """Drop-in for moe/experts.py `grouped_linear(x, w, counts, use_grouped_mm)`."""

    def __init__(self, block_size: int = 128, power_of_two: bool = False, impl: str = "auto"):
        assert block_size > 0, f"block_size={block_size} must be positive"
        assert impl in IMPLS, f"impl={impl!r}: expected one of {IMPLS}"
        self.block_size, self.power_of_two, self.impl = block_size, power_of_two, impl

    def __call__(self, x: torch.Tensor, w, counts: torch.Tensor, use_grouped_mm: bool = True):
        if isinstance(w, (tuple, list)):  # several weights on the same rows: one GEMM each
            return tuple(self(x, wi, counts, use_grouped_mm) for wi in w)
        return FP8GroupedLinearFunction.apply(x, w, counts, self.block_size, self.power_of_two, use_grouped_mm,
                                              self.impl)

    def __repr__(self) -> str:
        return (f"BlockwiseFP8GroupedGemm(block_size={self.block_size}, power_of_two={self.power_of_two}, "
                f"impl={self.impl})")
