"""Blockwise FP8 (E4M3) quantisation in plain torch (DeepSeek-V3 §3.3, App. B).

One rule, applied to tiles of different shapes over the last two dims of a tensor:

    amax = max |x| over the tile, clamped to >= 1e-4       (inference/kernel.py act_quant;
                                                            gradients: >= 1e-30, see below)
    s    = amax / 448                                       448 = largest finite E4M3
    s    = 2^ceil(log2 s)             with power_of_two     (V3.1 "ue8m0"; V3 §3.3.3 dispatch)
    q    = fp8_e4m3(x / s)            stored next to s; x ~= q * s ("scale_inv" in HF files)

    tiles    1 x 128    activations / dY for Fprop and Dgrad     s: (..., M, ceil(K/128))
    columns  128 x 1    X and dY for Wgrad (K of that GEMM = tokens)  s: (..., ceil(M/128), K)
    blocks   128 x 128  weights                                  s: (..., ceil(N/128), ceil(K/128))
    tensor   one scale  the coarse baseline the benchmarks compare against

Shapes that are not multiples of the tile are zero-padded before the amax (zeros never
raise it) and the padding is cut off again, as for DeepSeek's released weights: q keeps
x's shape. Each tile's largest element maps to +-448, so its relative rounding error is at
most half an E4M3 ULP, 2^-4, for every element whose scaled value |x/s| is a normal E4M3
number (>= 2^-6); smaller ones are subnormal, with an absolute error of at most 2^-10 * s.
Why tiles: one outlier channel sets the scale of only its own 128 values instead of the
whole tensor, so the rest keep their mantissa bits (benchmarks/fp8_gemm.py measures it).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
AMAX_FLOOR = 1e-4  # act_quant's clamp: an all-zero tile gets a finite scale
# Gradients get a floor that only guards against zero. act_quant's 1e-4 is an inference
# constant for O(1) activations; the gradients of a mean loss are far smaller (measured on
# debug_v3_fp8 at init: dy tiles with amax 1e-13 .. 1e-5, median ~1e-6), and under a 1e-4
# floor they would keep a fraction of a bit or flush to zero. Scaling is otherwise
# magnitude-invariant, so this floor changes nothing for tiles above it.
GRAD_AMAX_FLOOR = 1e-30


def compute_scale(amax: torch.Tensor, power_of_two: bool = False, amax_floor: float = AMAX_FLOOR) -> torch.Tensor:
    """Dequantisation multiplier s (fp32) for tiles whose max |x| is `amax`."""
    s = amax.float().clamp(min=amax_floor) / FP8_MAX
    if power_of_two:
        s = torch.exp2(torch.ceil(torch.log2(s)))  # rounds s up: x / s still fits in 448
    return s


def _pad_to(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Zero-pad the last two dims of x up to multiples of (rows, cols)."""
    pad_r, pad_c = -x.shape[-2] % rows, -x.shape[-1] % cols
    return F.pad(x, (0, pad_c, 0, pad_r)) if pad_r or pad_c else x


def quantize(x: torch.Tensor, tile: tuple[int, int], power_of_two: bool = False,
             amax_floor: float = AMAX_FLOOR) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise x (..., M, K) with one scale per `tile` = (rows, cols) of its last two dims.
    Returns q (..., M, K) float8_e4m3fn and s (..., ceil(M/rows), ceil(K/cols)) fp32."""
    assert x.dim() >= 2, f"quantize needs (..., M, K), got shape {tuple(x.shape)}"
    rows, cols = tile
    m, k = x.shape[-2:]
    xp = _pad_to(x.float(), rows, cols)
    lead, mp, kp = xp.shape[:-2], xp.shape[-2], xp.shape[-1]
    tiles = xp.reshape(*lead, mp // rows, rows, kp // cols, cols)  # (..., MB, rows, KB, cols)
    s = compute_scale(tiles.abs().amax(dim=(-3, -1)), power_of_two, amax_floor)  # (..., MB, KB)
    q = (tiles / s[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    q = q.reshape(*lead, mp, kp)[..., :m, :k]
    return q.contiguous(), s


def dequantize(q: torch.Tensor, s: torch.Tensor, tile: tuple[int, int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of `quantize`: q (..., M, K) and s (..., MB, KB) -> q * s of x's shape."""
    rows, cols = tile
    m, k = q.shape[-2:]
    qp = _pad_to(q.float(), rows, cols)
    lead, mp, kp = qp.shape[:-2], qp.shape[-2], qp.shape[-1]
    x = qp.reshape(*lead, mp // rows, rows, kp // cols, cols) * s[..., :, None, :, None]
    return x.reshape(*lead, mp, kp)[..., :m, :k].to(dtype)


# The four granularities of the recipe, by name.

def quantize_tiles(x: torch.Tensor, block_size: int = 128, power_of_two: bool = False, amax_floor: float = AMAX_FLOOR):
    """1 x block_size tiles along the last dim (act_quant): s (..., M, ceil(K/b))."""
    return quantize(x, (1, block_size), power_of_two, amax_floor)


def quantize_columns(x: torch.Tensor, block_size: int = 128, power_of_two: bool = False,
                     amax_floor: float = AMAX_FLOOR):
    """block_size x 1 tiles along dim -2 (tokens): s (..., ceil(M/b), K)."""
    return quantize(x, (block_size, 1), power_of_two, amax_floor)


def quantize_blocks(w: torch.Tensor, block_size: int = 128, power_of_two: bool = False):
    """block_size x block_size weight blocks: s (..., ceil(N/b), ceil(K/b))."""
    return quantize(w, (block_size, block_size), power_of_two)


def quantize_tensor(x: torch.Tensor, power_of_two: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One scale for the whole tensor (per-tensor current scaling): s of shape ()."""
    s = compute_scale(x.detach().abs().amax(), power_of_two)
    return (x.float() / s).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), s


def dequantize_tensor(q: torch.Tensor, s: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.float() * s).to(dtype)


def expand_block_scales(s: torch.Tensor, n: int, block_size: int) -> torch.Tensor:
    """Weight block scales (NB, KB) -> one row of K-block scales per output row, (n, KB):
    the form a GEMM with per-row, per-K-block scales (and torch._scaled_mm row-wise) takes."""
    return s.repeat_interleave(block_size, dim=-2)[..., :n, :]


def n_blocks(n: int, block_size: int) -> int:
    return math.ceil(n / block_size)
