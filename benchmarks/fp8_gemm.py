"""FP8 quantisation error: DeepSeek-V3's fine-grained tiles vs one scale per tensor.

E4M3 spans about 2^15 between its smallest normal (2^-6) and its largest value (448). With
one scale per tensor the largest element sets the scale; when a tensor holds outliers 1e4 or
1e5 times its typical magnitude ("massive activations" of a few channels or tokens,
Sun et al. 2024; token-correlated outliers of activation gradients, V3 App. B.2), every
ordinary element is pushed toward the subnormal range, where it keeps fewer bits or
flushes to zero. With 1x128 tiles (activations) and 128x128 blocks (weights) an outlier
only coarsens its own tile (V3 §3.3.2).

For each input distribution this prints, side by side:
  * round trip of the activation X: relative error ||dq(q(x)) - x|| / ||x|| over the
    ordinary (non-outlier) entries, and the share of them flushed to zero, for per-tensor,
    1x128, 1x128 with power-of-two scales, and 128x128 blocks (what V3 warns against for
    activation gradients: a block spans 128 tokens, so one outlier token spoils 127 others);
  * Y = X W^T against fp32 for per-tensor X and W vs 1x128 X and 128x128 W (fp8/linear.py
    `fp8_gemm`, fp32 accumulation): the median over tokens of each row's relative error;
    for the blockwise GEMM also 1 - cos(Y_fp8, Y) over the whole output, the criterion
    DeepSeek's DeepGEMM tests its FP8 GEMMs by (`calc_diff` < 1e-3 against the fp32 GEMM of
    the unquantised inputs), and the error the accumulation itself adds: torch._scaled_mm
    on each 128-wide K block, promoted into fp32 (what the GPU kernel does), against the
    same FP8 operands dequantised and multiplied in one fp32 GEMM (`fp8_gemm`'s default, the
    blockwise column).
Exits non-zero unless blockwise beats per-tensor on the round trip by >= 1.5x at 1e4x outliers
and >= 5x at 1e5x, and on the GEMM with 1e5x outlier tokens by >= 5x; and unless every
blockwise GEMM passes DeepGEMM's 1 - cos < 1e-3 and its accumulation error stays < 1e-5.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.common import base_parser, set_threads, table  # noqa: E402


# Massive activations reach ~1e4 x the median magnitude (Sun et al. 2024, LLaMA2-7B); 1e2 is
# the milder "outlier feature" scale of LLM.int8(), well inside E4M3's range either way.
CASES = [("gaussian", None, 1.0)] + [
    (f"{where} x1e{exp}", where, 10.0 ** exp) for where in ("channels", "tokens") for exp in (2, 4, 5)]


def activations(where, factor: float, tokens: int, dim: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """X (tokens, dim) with 2 of its channels or 1% of its tokens scaled by `factor`, and
    the boolean mask of its ordinary (non-outlier) entries. Massive activations sit in a
    handful of channels (Sun et al. 2024) and at a few positions per sequence."""
    x = torch.randn(tokens, dim, generator=gen)
    bulk = torch.ones_like(x, dtype=torch.bool)
    if where == "channels":
        channels = torch.randperm(dim, generator=gen)[:2]
        x[:, channels] *= factor
        bulk[:, channels] = False
    elif where == "tokens":  # attention-sink / BOS positions; gradient outliers
        rows = torch.randperm(tokens, generator=gen)[: max(1, tokens // 100)]
        x[rows] *= factor
        bulk[rows] = False
    return x, bulk


def bulk_error(x_dq: torch.Tensor, x: torch.Tensor, bulk: torch.Tensor) -> float:
    return ((x_dq - x)[bulk].norm() / x[bulk].norm()).item()


def flushed(x_dq: torch.Tensor, x: torch.Tensor, bulk: torch.Tensor) -> float:
    nz = (x != 0) & bulk
    return ((x_dq == 0) & nz).sum().item() / max(1, nz.sum().item())


def one_minus_cos(a: torch.Tensor, b: torch.Tensor) -> float:
    """DeepGEMM's calc_diff: 1 - 2<a,b> / (|a|^2 + |b|^2), in float64."""
    a, b = a.double(), b.double()
    return (1 - 2 * (a * b).sum() / (a.pow(2).sum() + b.pow(2).sum())).item()


def row_error(y_q: torch.Tensor, y: torch.Tensor) -> float:
    """Median over tokens of ||y_q[t] - y[t]|| / ||y[t]||."""
    return ((y_q - y).norm(dim=1) / y.norm(dim=1)).median().item()


def main() -> int:
    from ds_parallel.fp8.linear import fp8_gemm
    from ds_parallel.fp8.quant import dequantize, dequantize_tensor, expand_block_scales, quantize, quantize_tensor

    parser = base_parser(__doc__, repeats=1, warmup=0)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--out", type=int, default=1024)
    args = parser.parse_args()
    set_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    b = 128
    w = torch.randn(args.out, args.dim, generator=gen) * args.dim ** -0.5
    round_rows, gemm_rows, ok = [], [], True
    for kind, where, factor in CASES:
        x, bulk = activations(where, factor, args.tokens, args.dim, gen)
        dq = {}
        q, s = quantize_tensor(x)
        dq["tensor"] = dequantize_tensor(q, s)
        for name, tile, p2 in (("1x128", (1, b), False), ("1x128 pow2", (1, b), True), ("128x128", (b, b), False)):
            q, s = quantize(x, tile, p2)
            dq[name] = dequantize(q, s, tile)
        round_rows.append([kind] + [f"{bulk_error(v, x, bulk):.2e} / {flushed(v, x, bulk):.1%}" for v in dq.values()])
        # GEMM: Y = X W^T, fp32 reference.
        y = x @ w.t()
        qx, sx = quantize_tensor(x)
        qw, sw = quantize_tensor(w)
        y_tensor = (qx.float() @ qw.float().t()) * (sx * sw)
        qx, sx = quantize(x, (1, b))
        qw, sw = quantize(w, (b, b))
        y_block = fp8_gemm(qx, sx, qw, expand_block_scales(sw, w.shape[0], b), b)
        y_kernel = fp8_gemm(qx, sx, qw, expand_block_scales(sw, w.shape[0], b), b, "scaled_mm")
        e_tensor, e_block = row_error(y_tensor, y), row_error(y_block, y)
        gemm_rows.append([kind, f"{e_tensor:.2e}", f"{e_block:.2e}", f"{e_tensor / e_block:.1f}x",
                          f"{one_minus_cos(y_block, y):.1e}", f"{row_error(y_kernel, y_block):.1e}"])
        e_round_tensor, e_round_tile = bulk_error(dq["tensor"], x, bulk), bulk_error(dq["1x128"], x, bulk)
        # Blockwise must win clearly once outliers leave E4M3's range (>= 1e4x). On a GEMM with
        # outlier channels those channels' own products dominate every row, so the round trip
        # shows the gain there; outlier tokens spoil every other row under one scale.
        need = 5.0 if factor >= 1e5 else 1.5
        if factor >= 1e4 and e_round_tensor < need * e_round_tile:
            ok = False
        if where == "tokens" and factor >= 1e5 and e_tensor < 5 * e_block:
            ok = False
        if one_minus_cos(y_block, y) >= 1e-3 or row_error(y_kernel, y_block) > 1e-5:
            ok = False
    print(f"\nRound trip of X ({args.tokens} tokens x {args.dim}, outliers in 2 channels or 1% of tokens): relative error of the "
          f"ordinary entries / share of them flushed to 0")
    print(table(["activations", "per-tensor", "1x128", "1x128 pow2", "128x128"], round_rows))
    print(f"\nY = X W^T ({args.tokens} x {args.dim} x {args.out}): median over tokens of the row's relative error vs fp32")
    print(table(["activations", "per-tensor X, W", "1x128 X, 128x128 W", "per-tensor / blockwise",
                 "blockwise 1 - cos", "accumulation error"], gemm_rows))
    print("\nE4M3 keeps 3 mantissa bits: ~2.5% RMS relative rounding error per element even with a perfect "
          "scale, so ~3.6% on a GEMM of two quantised operands is the floor of any FP8 recipe. In DeepGEMM's "
          "measure, 1 - cos (about half the square of that), the blockwise GEMM stays under its 1e-3 bound; "
          "the accumulation adds nothing measurable.")
    if not ok:
        print("FAIL: blockwise scaling missed a stated margin or bound (see the module docstring)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
