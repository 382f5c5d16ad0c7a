"""The torch FP8 backend's real FP8 GEMMs on Hopper: cuBLAS's blockwise kernels through
torch.nn.functional.scaled_mm (fp8/linear.py impl="scaled_mm_blockwise") against the
kernel's emulation (impl="blockwise", the same numerics test as the emulated path runs on
CPU in tests/unit/test_fp8.py). Skipped without an sm90 GPU and a torch that has the
blockwise recipes; run by benchmarks/gpu_suite.sh on GPU machines."""
from __future__ import annotations

import math
import time

import pytest
import torch

from ds_parallel.fp8.linear import (
    SCALED_MM_BLOCKWISE,
    BlockwiseFP8Gemm,
    BlockwiseFP8GroupedGemm,
    fp8_gemm,
    scaled_mm_blockwise_available,
    select_gemm_impl,
)
from ds_parallel.fp8.quant import GRAD_AMAX_FLOOR, quantize_blocks, quantize_columns, quantize_tiles
from tests.gpu.common import requires_cuda, train

HOPPER = torch.cuda.is_available() and scaled_mm_blockwise_available("cuda")
pytestmark = [*requires_cuda, pytest.mark.skipif(
    not HOPPER, reason="needs an sm90 GPU and torch with F.scaled_mm's blockwise recipes (CUDA >= 12.9)")]

# Both sides write fp32; what differs is the order of the fp32 additions and how the tensor
# cores accumulate inside a 128-wide K block before cuBLAS promotes the partial sum to fp32
# (V3 §3.3.2). FP8 rounding itself is ~3.6% RMS (tests/unit/test_fp8.py), so a layout or
# scale mix-up shows as an O(1) error, far above this bound.
GEMM_RTOL = 1e-3


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _operands(m, k, n, device="cuda"):
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(m, k, generator=gen, device=device) * 10.0 ** torch.empty(m, 1, device=device).uniform_(
        -2, 2, generator=gen)
    w = torch.randn(n, k, generator=gen, device=device) / math.sqrt(k)
    dy = torch.randn(m, n, generator=gen, device=device) * 1e-6
    return x, w, dy


@pytest.mark.parametrize("m,k,n", [(256, 512, 384), (200, 300, 130), (1000, 7168, 2048)])
def test_fprop_dgrad_wgrad_match_the_kernel_loop(m, k, n):
    """The three GEMMs of the recipe, ragged shapes included (padded by the Hopper path)."""
    x, w, dy = _operands(m, k, n)
    xq, xs = quantize_tiles(x)
    wq, ws = quantize_blocks(w)
    dyq, dys = quantize_tiles(dy, amax_floor=GRAD_AMAX_FLOOR)
    dycq, dycs = quantize_columns(dy, amax_floor=GRAD_AMAX_FLOOR)
    xcq, xcs = quantize_columns(x)
    gemms = {
        "fprop": (xq, xs, wq, ws, True),  # y = x W^T
        "dgrad": (dyq, dys, wq.t(), ws.t(), True),  # dx = dy W
        "wgrad": (dycq.t(), dycs.t(), xcq.t(), xcs.t(), False),  # dW = dy^T x
    }
    for name, (a_q, a_s, b_q, b_s, b_blocks) in gemms.items():
        got = fp8_gemm(a_q, a_s, b_q, b_s, 128, SCALED_MM_BLOCKWISE, b_blocks=b_blocks)
        want = fp8_gemm(a_q, a_s, b_q, b_s, 128, "blockwise", b_blocks=b_blocks)
        assert got.dtype == torch.float32 and got.shape == want.shape, name
        assert rel(got, want) < GEMM_RTOL, (name, rel(got, want))


def test_fp8_linears_use_hopper_and_match_the_emulation():
    """impl="auto" picks cuBLAS here; the FP8 linear's output and both gradients, and the
    grouped experts' (an empty group included), agree with the kernel's emulation."""
    assert select_gemm_impl("cuda") == SCALED_MM_BLOCKWISE
    x, w, dy = _operands(150, 200, 130)
    res = {}
    for impl in ("auto", "blockwise"):
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = BlockwiseFP8Gemm(impl=impl)(xi.reshape(3, 50, 200), wi)
        y.backward(dy.reshape(3, 50, 130))
        res[impl] = (y.detach().reshape(150, 130), xi.grad, wi.grad)
    for name, got, want in zip(("y", "dx", "dw"), res["auto"], res["blockwise"]):
        assert rel(got, want) < GEMM_RTOL, (name, rel(got, want))

    counts = torch.tensor([130, 0, 70], device="cuda")
    xg, dyg = torch.randn(200, 256, device="cuda"), torch.randn(200, 384, device="cuda") * 1e-5
    wg = torch.randn(3, 384, 256, device="cuda") / 16
    res = {}
    for impl in ("auto", "dequant"):
        xi, wi = xg.clone().requires_grad_(), wg.clone().requires_grad_()
        y = BlockwiseFP8GroupedGemm(impl=impl)(xi, wi, counts)
        y.backward(dyg)
        res[impl] = (y.detach(), xi.grad, wi.grad)
    for name, got, want in zip(("y", "dx", "dw"), res["auto"], res["dequant"]):
        assert rel(got, want) < GEMM_RTOL, ("grouped", name, rel(got, want))


def test_debug_v3_fp8_on_hopper_tracks_the_emulation(tmp_path):
    """debug_v3_fp8 with the torch FP8 backend, fp32 elsewhere: 8 steps on the GPU (cuBLAS's
    FP8 GEMMs) and on the CPU (the emulation) from the same seed and batches give the same
    losses to 1% (the same recipe; only fp32 summation order and tensor-core accumulation
    differ, amplified by the training steps)."""
    args = ("model.preset=debug_v3_fp8", "precision.fp8.enabled=true", "precision.fp8.backend=torch",
            "precision.dtype=fp32", "train.steps=8", "train.log_every=1", "train.save_every=0")
    gpu = train(str(tmp_path / "gpu"), *args)
    cpu = train(str(tmp_path / "cpu"), *args, cpu=True)
    assert [r["step"] for r in gpu] == [r["step"] for r in cpu] == list(range(1, 9))
    for g, c in zip(gpu, cpu):
        assert g["loss"] == pytest.approx(c["loss"], rel=1e-2), (g["step"], g["loss"], c["loss"])


def _time_ms(fn, iters=10):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters * 1e3


def test_timing_hopper_vs_dequant(capsys):
    """Not an assertion: one Fprop GEMM of M=4096 tokens, K=7168, N=2048, cuBLAS's blockwise
    FP8 against the emulation (dequantise both operands, one fp32 GEMM)."""
    m, k, n = 4096, 7168, 2048
    x, w, _ = _operands(m, k, n)
    xq, xs = quantize_tiles(x)
    wq, ws = quantize_blocks(w)
    flops = 2 * m * k * n
    line = [f"fp8 gemm {m}x{k}x{n}:"]
    for impl in (SCALED_MM_BLOCKWISE, "dequant"):
        ms = _time_ms(lambda impl=impl: fp8_gemm(xq, xs, wq, ws, 128, impl, b_blocks=True))
        line.append(f"{impl} {ms:.3f} ms ({flops / ms / 1e9:.0f} TFLOP/s)")
    with capsys.disabled():
        print("\n" + "  ".join(line) + f"  [{torch.cuda.get_device_name()}]")
