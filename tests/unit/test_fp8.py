"""FP8 mixed precision (fp8/): quantisation bounds, the emulated GEMMs against torch._scaled_mm
and fp32, the FP8 linear's three GEMMs, apply_fp8's choice of layers, config rules, the TE
mapping, and a short training run against fp32 (benchmarks/fp8_train.py runs the full one)."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from ds_parallel import kernels
from ds_parallel.config import load_config
from ds_parallel.config.load import ConfigError
from ds_parallel.fp8.apply import apply_fp8
from ds_parallel.fp8.dispatch import FP8Codec
from ds_parallel.fp8.linear import BlockwiseFP8Gemm, BlockwiseFP8GroupedGemm, FP8LinearFunction, fp8_gemm
from ds_parallel.fp8.quant import (
    FP8_MAX,
    GRAD_AMAX_FLOOR,
    dequantize,
    dequantize_tensor,
    expand_block_scales,
    quantize,
    quantize_blocks,
    quantize_columns,
    quantize_tensor,
    quantize_tiles,
)
from ds_parallel.fp8.recipe import TE_RECIPE_CLASSES, fp8_gemm_shapes, resolve_backend, te_recipe_spec
from ds_parallel.fp8.te import TEUnavailableError, te_available
from ds_parallel.moe.dispatch import dispatch
from ds_parallel.parallel.tensor_parallel import ColumnParallelLinear, Linear, RowParallelLinear
from tests.harness import num_threads

NO_TE = pytest.mark.skipif(te_available(), reason="checks the error raised where Transformer Engine is missing")
NEEDS_TE = pytest.mark.skipif(not te_available(), reason="Transformer Engine is not importable (needs CUDA)")
TILES = {"tiles": (1, 128), "columns": (128, 1), "blocks": (128, 128)}


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _wide_range(shape, gen):
    """Gaussian times per-row and per-column magnitudes over 6 decades, plus zeros."""
    x = torch.randn(shape, generator=gen)
    x *= 10.0 ** torch.empty(shape[0], 1).uniform_(-3, 3, generator=gen)
    x *= 10.0 ** torch.empty(1, shape[1]).uniform_(-1, 1, generator=gen)
    x[0, :5] = 0.0
    return x


# ---------------------------------------------------------------- quantisation

@pytest.mark.parametrize("kind", list(TILES))
@pytest.mark.parametrize("power_of_two", [False, True])
def test_round_trip_within_half_ulp(kind, power_of_two):
    """E4M3 has 3 mantissa bits: for scaled values in the normal range (>= 2^-6) the error is
    at most half an ULP, 2^-4 relative; below it (subnormal, spacing 2^-9) at most 2^-10 * s.
    Shapes that are not multiples of 128 exercise the zero padding."""
    gen = torch.Generator().manual_seed(0)
    x = _wide_range((300, 200), gen)
    tile = TILES[kind]
    q, s = quantize(x, tile, power_of_two)
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape
    assert s.shape == (math.ceil(300 / tile[0]), math.ceil(200 / tile[1]))
    s_full = s.repeat_interleave(tile[0], 0).repeat_interleave(tile[1], 1)[:300, :200]
    x_dq = dequantize(q, s, tile)
    err, scaled = (x_dq - x).abs(), x.abs() / s_full
    normal = scaled >= 2.0**-6
    assert normal.float().mean() > 0.3 and (~normal).any()  # both regimes are exercised
    assert (err[normal] <= 2.0**-4 * x.abs()[normal] * (1 + 1e-6)).all()
    assert (err[~normal] <= 2.0**-10 * s_full[~normal] * (1 + 1e-6)).all()
    # ... and the bound is nearly reached: this is really 3-bit rounding, not a no-op.
    assert (err[normal] / x.abs()[normal]).max() > 2.0**-4 * 0.9
    assert (x_dq[0, :5] == 0).all()
    # Scale rule (inference/kernel.py act_quant): amax / 448, or the next power of two.
    if not power_of_two:
        _, s_q = quantize(q.float(), tile)  # max |q| of each tile, / 448
        assert (s_q == 1.0).all()  # every tile's largest value maps to exactly +-448 ...
    else:
        assert torch.equal(torch.log2(s), torch.log2(s).round())  # ... or scales are 2^k
        assert ((x.abs() / s_full) <= FP8_MAX).all()


def test_scales_follow_act_quant():
    x = torch.zeros(2, 256)
    x[1, :128] = torch.linspace(-3.0, 7.0, 128)
    q, s = quantize_tiles(x)
    assert s.shape == (2, 2)
    torch.testing.assert_close(s[1, 0], torch.tensor(7.0 / 448.0))
    torch.testing.assert_close(s[0], torch.full((2,), 1e-4 / 448.0))  # all-zero tile: amax clamped to 1e-4
    assert (q[0].float() == 0).all() and q[1, 127].float() == 448.0
    _, s2 = quantize_tiles(x, power_of_two=True)
    assert s2[1, 0] == 2.0 ** math.ceil(math.log2(7.0 / 448.0))
    # Per-tensor: one scale from the global amax.
    qt, st = quantize_tensor(x)
    assert st.shape == () and torch.isclose(st, torch.tensor(7.0 / 448.0))
    torch.testing.assert_close(dequantize_tensor(qt, st), x, rtol=2.0**-4, atol=0)


def test_granularities_are_independent_tiles():
    """Changing one element changes only the scale of its own tile (1x128 / 128x1 / 128x128)."""
    x = torch.randn(256, 256)
    y = x.clone()
    y[3, 5] = 1e3
    for kind, tile in TILES.items():
        _, sx = quantize(x, tile)
        _, sy = quantize(y, tile)
        changed = (sx != sy).nonzero().tolist()
        assert changed == [[3 // tile[0], 5 // tile[1]]], kind


# ---------------------------------------------------------------- GEMMs

def test_emulated_gemm_equals_scaled_mm_on_one_k_block():
    """K = 128: one K block, so the emulation and torch._scaled_mm (real FP8 operands) compute
    the same thing, with tensor-wise and row-wise scales as _scaled_mm takes them on CPU."""
    gen = torch.Generator().manual_seed(1)
    x, w = torch.randn(64, 128, generator=gen), torch.randn(96, 128, generator=gen) * 0.1
    # Row-wise: x's 1x128 tiles are per row when K = 128; W's 128x128 blocks expand per row.
    xq, xs = quantize_tiles(x)  # (64, 1)
    wq, ws = quantize_blocks(w)  # (1, 1)
    w_rows = expand_block_scales(ws, 96, 128)  # (96, 1)
    ref = torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=w_rows.t().contiguous(), out_dtype=torch.float32)
    for impl in ("dequant", "blockwise", "scaled_mm"):
        out = fp8_gemm(xq, xs, wq, w_rows, 128, impl)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    # Tensor-wise scales.
    xq, xs = quantize_tensor(x)
    wq, ws = quantize_tensor(w)
    ref = torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws, out_dtype=torch.float32)
    out = fp8_gemm(xq, xs.expand(64, 1), wq, ws.expand(96, 1), 128)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_gemm_accumulation_and_error_on_gaussian_data():
    """Several K blocks (K = 512, plus a ragged K = 200): the dequantise-then-fp32-GEMM path
    equals the kernel's per-K-block promotion loop and _scaled_mm per block to fp32 rounding.
    Against the fp32 GEMM of the *unquantised* data the error is E4M3's own: 3 mantissa bits
    give ~2.5% RMS per operand, ~3.6% on the product, for any FP8 implementation. DeepGEMM
    tests its FP8 GEMMs by 1 - 2<a,b>/(|a|^2+|b|^2) < 1e-3 against the fp32 GEMM of the
    unquantised inputs (`calc_diff`); this one meets that bound (about half the squared
    relative error)."""
    gen = torch.Generator().manual_seed(2)
    for k in (512, 200):
        x, w = torch.randn(256, k, generator=gen), torch.randn(384, k, generator=gen) * k**-0.5
        xq, xs = quantize_tiles(x)
        wq, ws = quantize_blocks(w)
        w_rows = expand_block_scales(ws, 384, 128)
        y = {impl: fp8_gemm(xq, xs, wq, w_rows, 128, impl) for impl in ("dequant", "blockwise", "scaled_mm")}
        accumulation = max(rel(y["blockwise"], y["dequant"]), rel(y["scaled_mm"], y["dequant"]))
        assert accumulation < 1e-6, accumulation  # accumulation adds nothing measurable
        y32 = x @ w.t()
        err = rel(y["dequant"], y32)
        diff = 1 - 2 * (y["dequant"] * y32).sum() / (y["dequant"].pow(2).sum() + y32.pow(2).sum())
        assert 0.02 < err < 0.05, err  # measured 0.036-0.037
        assert diff < 1e-3, diff  # measured ~7e-4


def test_blockwise_beats_per_tensor_on_outliers():
    """1% of tokens 1e5x larger (massive activations / token-correlated gradient outliers):
    one scale per tensor flushes the other tokens toward zero, 1x128 tiles do not."""
    gen = torch.Generator().manual_seed(3)
    x, w = torch.randn(512, 256, generator=gen), torch.randn(256, 256, generator=gen) / 16
    x[torch.randperm(512, generator=gen)[:5]] *= 1e5
    y = x @ w.t()
    row_err = lambda yq: ((yq - y).norm(dim=1) / y.norm(dim=1)).median().item()  # noqa: E731
    qx, sx = quantize_tensor(x)
    qw, sw = quantize_tensor(w)
    per_tensor = row_err((qx.float() @ qw.float().t()) * sx * sw)
    qx, sx = quantize_tiles(x)
    qw, sw = quantize_blocks(w)
    blockwise = row_err(fp8_gemm(qx, sx, qw, expand_block_scales(sw, 256, 128)))
    assert blockwise < 0.05 and per_tensor > 5 * blockwise, (per_tensor, blockwise)  # measured ~0.5 vs 0.037


# ---------------------------------------------------------------- FP8 linear

def _recipe_reference(x2, w, dy2):
    """The three GEMMs written out from the recipe's tiles, in fp32."""
    t, c, b = (1, 128), (128, 1), (128, 128)
    dq = lambda q_s, tile: dequantize(*q_s, tile)  # noqa: E731
    w_dq = dq(quantize_blocks(w), b)
    y = dq(quantize_tiles(x2), t) @ w_dq.t()
    dx = dq(quantize_tiles(dy2, amax_floor=GRAD_AMAX_FLOOR), t) @ w_dq
    dw = dq(quantize_columns(dy2, amax_floor=GRAD_AMAX_FLOOR), c).t() @ dq(quantize_columns(x2), c)
    return y, dx, dw


@pytest.mark.parametrize("shape", [(2, 160, 256, 384), (3, 50, 200, 130)])  # (B, T, K, N); 2nd is ragged
def test_fp8_linear_forward_backward(shape):
    """Fprop x(1x128) W(128x128); Dgrad dy(1x128 along N) W(128x128); Wgrad dy, x (128x1 along
    tokens): equal to the recipe written out by hand, and within FP8 error of fp32."""
    bsz, seqlen, k, n = shape
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(bsz, seqlen, k, generator=gen).requires_grad_()
    w = (torch.randn(n, k, generator=gen) * k**-0.5).requires_grad_()
    dy = torch.randn(bsz, seqlen, n, generator=gen)
    y = BlockwiseFP8Gemm()(x, w)
    y.backward(dy)
    y_ref, dx_ref, dw_ref = _recipe_reference(x.detach().reshape(-1, k), w.detach(), dy.reshape(-1, n))
    torch.testing.assert_close(y.detach().reshape(-1, n), y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.reshape(-1, k), dx_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad, dw_ref, rtol=1e-4, atol=1e-4)
    x32, w32 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    F.linear(x32, w32).backward(dy)
    for got, want in ((y.detach(), x32.detach() @ w32.detach().t()), (x.grad, x32.grad), (w.grad, w32.grad)):
        assert 0.01 < rel(got, want) < 0.06  # measured 0.036-0.037: E4M3 rounding of both operands


def test_fp8_linear_backward_is_scale_invariant_for_tiny_gradients():
    """Gradients of a mean loss are tiny (dy tiles of 1e-13 .. 1e-5 in debug_v3_fp8 at init).
    act_quant's 1e-4 amax clamp would leave them a fraction of a bit; the backward must give
    the same relative precision at any magnitude: dx(c dy) = c dx(dy), dW(c dy) = c dW(dy)."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(256, 128, generator=gen).requires_grad_()
    w = (torch.randn(128, 128, generator=gen) / 11).requires_grad_()
    dy = torch.randn(256, 128, generator=gen)
    grads = {}
    for c in (1.0, 1e-9):
        x.grad = w.grad = None
        BlockwiseFP8Gemm()(x, w).backward(dy * c)
        grads[c] = (x.grad / c, w.grad / c)
    for big, small in zip(grads[1.0], grads[1e-9]):
        assert rel(small, big) < 1e-5, rel(small, big)


def test_fp8_linear_keeps_the_input_dtype():
    """bf16 activations and weights (precision.dtype=bf16): FP8 operands, fp32 accumulation,
    outputs and gradients in bf16."""
    x = torch.randn(4, 128, 128, dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(256, 128) / 11).to(torch.bfloat16).requires_grad_()
    y = BlockwiseFP8Gemm(power_of_two=True)(x, w)
    y.float().sum().backward()
    assert y.dtype == x.grad.dtype == w.grad.dtype == torch.bfloat16
    assert rel(y.float(), x.float() @ w.float().t()) < 0.06


def test_fp8_linear_saves_x_in_fp8():
    x = torch.randn(256, 128, requires_grad=True)
    w = torch.randn(128, 128, requires_grad=True)
    y = BlockwiseFP8Gemm()(x, w)
    saved = y.grad_fn.saved_tensors
    assert all(t.dtype in (torch.float8_e4m3fn, torch.float32) for t in saved)
    fp32_bytes = sum(t.numel() * t.element_size() for t in saved if t.dtype == torch.float32)
    assert fp32_bytes < x.numel() * 4 / 32  # only scales are fp32: x itself is kept as 1 byte/elt
    assert any(t.dtype == torch.float8_e4m3fn and t.shape == x.shape for t in saved)
    # No weight gradient wanted: nothing of x is kept for Wgrad.
    y2 = FP8LinearFunction.apply(x, w.detach(), 128, False, "dequant")
    assert all(t is None or t.shape != x.shape for t in y2.grad_fn.saved_tensors)


def test_fp8_grouped_linear_equals_per_group_linear():
    """Grouped expert GEMMs: each group's rows give what the FP8 linear gives on them alone
    (Wgrad tiles never straddle two experts), including an empty group (zero gradient)."""
    gen = torch.Generator().manual_seed(5)
    counts = torch.tensor([130, 0, 257, 40])
    x = torch.randn(int(counts.sum()), 128, generator=gen).requires_grad_()
    w = (torch.randn(4, 256, 128, generator=gen) / 11).requires_grad_()
    dy = torch.randn(int(counts.sum()), 256, generator=gen)
    for use_grouped_mm in (True, False):
        x.grad = w.grad = None
        BlockwiseFP8GroupedGemm()(x, w, counts, use_grouped_mm).backward(dy)
        start = 0
        for g, c in enumerate(counts.tolist()):
            xg = x.detach()[start : start + c].clone().requires_grad_()
            wg = w.detach()[g].clone().requires_grad_()
            yg = BlockwiseFP8Gemm()(xg, wg)
            if c:
                yg.backward(dy[start : start + c])
                torch.testing.assert_close(x.grad[start : start + c], xg.grad, rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(w.grad[g], wg.grad, rtol=1e-4, atol=1e-4)
            else:
                assert w.grad[g].abs().sum() == 0
            start += c


def test_fp8_dispatch_single_process_quantises_and_passes_gradient():
    """ep = 1: no wire, but rows are still quantised (so every EP degree computes the same);
    power-of-two scales make the experts' re-quantisation exact; gradients pass straight."""
    x = (torch.randn(10, 256) * 3).requires_grad_()
    gates, mask = torch.rand(10, 4), torch.rand(10, 4) > 0.5
    x_recv, g_recv, m_recv, handle = dispatch(x, gates, mask, torch.tensor([10]), None, 0, FP8Codec())
    # Written out with torch's own E4M3 cast: each 1x128 tile's scale is the power of two
    # at or above amax / 448, and the tile rounds to the nearest E4M3 number.
    tiles = x.detach().view(10, 2, 128)
    s = 2.0 ** torch.ceil(torch.log2(tiles.abs().amax(-1, keepdim=True) / FP8_MAX))
    want = ((tiles / s).to(torch.float8_e4m3fn).float() * s).view(10, 256)
    assert torch.equal(x_recv.detach(), want) and not torch.equal(want, x.detach())
    assert torch.equal(g_recv, gates) and torch.equal(m_recv, mask) and handle.dispatch_bytes == 0
    q2, s2 = quantize_tiles(x_recv.detach(), power_of_two=True)
    assert torch.equal(dequantize(q2, s2, (1, 128)), x_recv.detach())  # lossless re-quantisation
    g = torch.randn(10, 256)
    x_recv.backward(g)
    assert torch.equal(x.grad, g)


# ---------------------------------------------------------------- model / apply_fp8

def _fp8_cfg(*extra):
    return load_config(None, ["model.preset=debug_v3_fp8", "precision.fp8.enabled=true", *extra])


def _model(cfg):
    from ds_parallel.model import build_model
    from ds_parallel.parallel.groups import ParallelContext

    return build_model(cfg.model, ParallelContext.single(), seed=0)


def test_debug_v3_fp8_preset_has_every_gemm_dim_a_multiple_of_128():
    cfg = _fp8_cfg()
    for name, (n, k) in fp8_gemm_shapes(cfg.model).items():
        assert n % 128 == 0 and k % 128 == 0, (name, n, k)
    model = _model(cfg)
    changed = apply_fp8(model, cfg.precision)
    shapes = [tuple(model.get_submodule(n).weight.shape) for n in changed if hasattr(model.get_submodule(n), "weight")]
    shapes += [tuple(p.shape[1:]) for n in changed for p in model.get_submodule(n).parameters(recurse=False)
               if p.dim() == 3]
    assert len(shapes) > 20 and all(n % 128 == 0 and k % 128 == 0 for n, k in shapes), shapes


def test_apply_fp8_swaps_eligible_layers_only():
    from ds_parallel.moe import MoE
    from ds_parallel.moe.experts import GroupedExperts

    cfg = _fp8_cfg()
    model = _model(cfg)
    params_before = dict(model.named_parameters())
    changed = apply_fp8(model, cfg.precision)
    assert dict(model.named_parameters()) == params_before  # same names, same Parameter objects
    linears = {n: m for n, m in model.named_modules() if isinstance(m, (Linear, ColumnParallelLinear, RowParallelLinear))}
    for name, m in linears.items():
        if name == "head":  # V3 §3.3: output head stays high precision
            assert m.gemm is kernels.linear and name not in changed
        else:
            assert isinstance(m.gemm, BlockwiseFP8Gemm), name
    assert not any(type(m) is torch.nn.Linear for m in model.modules())  # shared experts are our Linear
    assert {"layers.1.attn.wkv_b", "layers.1.ffn.shared_experts.w2", "mtp.0.eh_proj", "layers.0.ffn.w2"} <= set(changed)
    for m in model.modules():
        if isinstance(m, GroupedExperts):
            assert isinstance(m.grouped_gemm, BlockwiseFP8GroupedGemm)
        if isinstance(m, MoE):
            assert isinstance(m.dispatch_codec, FP8Codec)
    assert not any("gate" in n or "norm" in n or "embed" in n for n in changed)  # router, norms, embedding

    # keep_high_precision patterns; dispatch switch; disabled = no-op.
    model = _model(cfg)
    cfg2 = _fp8_cfg("precision.fp8.keep_high_precision=mtp.*,wo", "precision.fp8.dispatch=false")
    changed = apply_fp8(model, cfg2.precision)
    assert not any(n.startswith("mtp.") or n.endswith(".wo") for n in changed)
    assert model.layers["1"].attn.wo.gemm is kernels.linear and isinstance(model.layers["1"].attn.wq_b.gemm, BlockwiseFP8Gemm)
    assert not isinstance(model.layers["1"].ffn.dispatch_codec, FP8Codec)
    assert apply_fp8(_model(cfg), load_config(None, ["model.preset=debug_v3_fp8"]).precision) == []
    copied = copy.deepcopy(model)  # the injected callables are plain objects
    assert isinstance(copied.layers["1"].attn.wq_b.gemm, BlockwiseFP8Gemm)


def _deepgemm_diff(a, b):
    """DeepGEMM's `calc_diff`: 1 - 2<a,b> / (|a|^2 + |b|^2); 0 when equal, 1 against zeros."""
    return (1 - 2 * (a.double() * b.double()).sum() / (a.double().pow(2).sum() + b.double().pow(2).sum())).item()


def test_fp8_model_gemms_logits_and_gradients():
    """In the whole debug_v3_fp8 model (attention, dense MLP, shared and routed experts,
    MTP): every FP8 GEMM's output, on the input it really got, against the high-precision
    GEMM of that input: E4M3 error (measured rel 0.036-0.040, DeepGEMM diff 6.3e-4-7.9e-4;
    the routed experts chain three GEMMs: 0.065, 2.1e-3). The logits against the
    high-precision model (measured 2.7e-4). Then gradients reach every parameter."""
    from ds_parallel.fp8.apply import high_precision_gemms
    from ds_parallel.moe.experts import GroupedExperts

    cfg = _fp8_cfg()
    ref, model = _model(cfg), _model(cfg)
    apply_fp8(model, cfg.precision)
    gen = torch.Generator().manual_seed(6)
    ids, labels = torch.randint(0, 128, (4, 64), generator=gen), torch.randint(0, 128, (4, 64), generator=gen)
    seen = []
    record = lambda module, args, out: seen.append((module, [a.detach() for a in args], out.detach()))  # noqa: E731
    hooks = [m.register_forward_hook(record) for m in model.modules()
             if isinstance(getattr(m, "gemm", None), BlockwiseFP8Gemm) or isinstance(m, GroupedExperts)]
    out = model(ids, labels=labels)
    for hook in hooks:
        hook.remove()
    assert len(seen) == 27  # 26 linears (the head stays high precision) and 2 routed-expert sets
    with high_precision_gemms(model):
        for module, args, got in seen:
            want = module(*args)
            chained = isinstance(module, GroupedExperts)  # w1, w3 then w2: three FP8 GEMMs
            assert 0.01 < rel(got, want) < (0.1 if chained else 0.05), (module, rel(got, want))
            assert _deepgemm_diff(got, want) < (3e-3 if chained else 1e-3), (module, _deepgemm_diff(got, want))
    with torch.no_grad():
        want = ref(ids).logits
    assert _deepgemm_diff(out.logits, want) < 1e-3, _deepgemm_diff(out.logits, want)
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_fp8_training_tracks_high_precision():
    """Short version of benchmarks/fp8_train.py: debug_v3_fp8 on the smoke job's data, FP8
    GEMMs with fp32 masters ("fp8-fp32") against the same run without them ("fp32"), from the
    same seed and batches. V3's recipe keeps BF16 outside the FP8 GEMMs; either way only the
    GEMMs differ between the two runs, and a BF16 matmul costs ~35x an fp32 one on CPUs without
    AVX512-BF16 (the BF16 pair, "fp8" vs "bf16": 49 s; this pair: 16 s). The linears' BF16 path:
    test_fp8_linear_keeps_the_input_dtype. One thread, so the numbers do not depend on the
    machine's cores. Measured at 40 steps of 16 x 32 tokens: loss 6.31 -> 2.76, mean of the
    last 10 steps within 0.2% of fp32's (the BF16 pair: 0.2%); with scales 4x too small (tiles
    clipped at 448) 6.3% away (the BF16 pair: 5.8%). Shorter runs stop while the curve still
    falls steeply, where a small shift in time is a large gap (BF16 pair at 25 steps of 64-token
    rows: 4%). Kept before the arithmetic task's loss plateau (~1.5): when a run leaves it
    depends on small perturbations (benchmarks/README.md)."""
    from benchmarks.fp8_train import smoke_config, train_curve

    cfg = smoke_config(40, ["train.global_batch_size=16", "train.micro_batch_size=16", "train.seq_len=32",
                            "train.warmup_steps=10", "train.log_every=1000"])
    with num_threads(1):
        ref, _ = train_curve(cfg, "fp32", evaluate=False)
        low, _ = train_curve(cfg, "fp8-fp32", evaluate=False)
    assert ref[-1] < 0.6 * ref[0]  # it learns
    last = lambda xs: sum(xs[-10:]) / 10  # noqa: E731
    gap = abs(last(low) - last(ref)) / last(ref)
    print(f"loss {ref[0]:.3f} -> {ref[-1]:.3f}; gap of the last 10 steps {gap:.3%}")
    assert gap < 0.01, (gap, last(low), last(ref))
    assert low != ref  # FP8 really ran


# ---------------------------------------------------------------- config and TE

def test_validation_accepts_torch_blockwise_and_auto_resolves_here():
    cfg = _fp8_cfg("precision.fp8.backend=torch", "precision.fp8.power_of_two_scales=true")
    assert resolve_backend(cfg.precision.fp8) == "torch"
    if not te_available():
        assert resolve_backend(_fp8_cfg().precision.fp8) == "torch"
    # Padding makes shapes that are not multiples of 128 legal for the torch backend.
    load_config(None, ["model.preset=debug_v3", "precision.fp8.enabled=true", "precision.fp8.backend=torch"])


def test_validating_an_fp8_config_builds_nothing():
    """fp8/recipe.py is pure: validating an FP8 config (torch backend, every rule run) loads no
    layer, GEMM or model-swap module (a fresh interpreter, so other tests' imports don't count)."""
    import subprocess
    import sys

    code = ("import sys; from ds_parallel.config import load_config; "
            "load_config(None, ['model.preset=debug_v3_fp8', 'precision.fp8.enabled=true', 'precision.fp8.backend=torch']); "
            "print(' '.join(sorted(m for m in sys.modules if m.startswith('ds_parallel'))))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert "ds_parallel.fp8.recipe" in loaded, loaded  # the FP8 rules really ran
    heavy = [m for m in loaded if m.startswith(("ds_parallel.moe", "ds_parallel.model", "ds_parallel.parallel",
                                                "ds_parallel.fp8.apply", "ds_parallel.fp8.linear",
                                                "ds_parallel.fp8.dispatch", "ds_parallel.fp8.te"))]
    assert heavy == [], heavy


@pytest.mark.parametrize("overrides, message", [
    (["precision.fp8.block_size=0"], "precision.fp8.block_size=0 must be positive"),
    (["precision.fp8.recipe=delayed", "precision.fp8.backend=torch"], "needs precision.fp8.backend=te"),
    (["precision.fp8.recipe=current", "precision.fp8.backend=torch"], "implements blockwise only"),
    (["precision.fp8.format=hybrid", "precision.fp8.backend=torch"], "precision.fp8.format=hybrid needs"),
])
def test_validation_rejects(overrides, message):
    with pytest.raises(ConfigError, match=message):
        _fp8_cfg(*overrides)


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability() >= (10, 0),
                    reason="this machine is Blackwell")
def test_mxfp8_needs_blackwell():
    with pytest.raises(ConfigError, match=r"mxfp8 needs a Blackwell \(sm100\+\) GPU"):
        _fp8_cfg("precision.fp8.recipe=mxfp8", "precision.fp8.backend=te")


@NO_TE
@pytest.mark.parametrize("overrides", [["precision.fp8.backend=te"], ["precision.fp8.recipe=delayed"],
                                       ["precision.fp8.format=hybrid", "precision.fp8.recipe=current"]])
def test_te_missing_is_a_config_error_naming_the_fix(overrides):
    overrides = [*overrides, "precision.fp8.keep_high_precision=experts"]  # past the experts rule
    with pytest.raises(ConfigError, match="precision.fp8.backend=te.*not importable.*precision.fp8.backend=torch"):
        _fp8_cfg(*overrides)


@NO_TE
def test_te_entry_points_raise_clearly():
    from ds_parallel.fp8 import te

    with pytest.raises(TEUnavailableError, match="precision.fp8.backend=te"):
        te.build_recipe("Float8BlockScaling", {"fp8_format": "E4M3"})
    with pytest.raises(TEUnavailableError, match="precision.fp8.backend=te"):
        te.TEGemm(torch.nn.Parameter(torch.zeros(16, 16)), None)


def test_te_recipe_mapping():
    cfg = _fp8_cfg("precision.fp8.backend=torch")
    fp8 = cfg.precision.fp8
    expected = {"delayed": "DelayedScaling", "current": "Float8CurrentScaling", "blockwise": "Float8BlockScaling",
                "mxfp8": "MXFP8BlockScaling"}
    assert TE_RECIPE_CLASSES == expected
    for recipe, cls in expected.items():
        for fmt, te_fmt in (("e4m3", "E4M3"), ("hybrid", "HYBRID")):
            fp8.recipe, fp8.format = recipe, fmt
            name, kwargs = te_recipe_spec(fp8)
            assert name == cls and kwargs["fp8_format"] == te_fmt
    fp8.recipe = "delayed"
    assert te_recipe_spec(fp8)[1]["amax_history_len"] == 1024


@NEEDS_TE
@pytest.mark.parametrize("recipe", ["delayed", "current", "blockwise", "mxfp8"])
def test_te_recipe_objects_are_the_real_classes(recipe):
    from transformer_engine.common import recipe as te_recipe

    from ds_parallel.fp8.recipe import build_te_recipe

    cfg = _fp8_cfg("precision.fp8.backend=torch")
    cfg.precision.fp8.recipe = recipe
    obj = build_te_recipe(cfg.precision.fp8)
    assert isinstance(obj, getattr(te_recipe, TE_RECIPE_CLASSES[recipe]))
    assert obj.fp8_format == te_recipe.Format.E4M3


def test_memory_report_measures_fp8_against_high_precision_gemms():
    """The report's two numbers: FP8 saved activations (inputs kept in FP8 for Wgrad) below
    the high-precision ones, and the high-precision ones exactly those of a model that never
    had FP8 (high_precision_gemms restores every default GEMM and dispatch)."""
    from ds_parallel.config.load import config_from_dict
    from ds_parallel.fp8.apply import fp8_memory_report, high_precision_gemms, saved_activation_bytes
    from ds_parallel.model import build_model
    from ds_parallel.parallel.groups import ParallelContext

    cfg = config_from_dict({"model": {"preset": "debug_v3_fp8"}, "precision": {"fp8": {"enabled": True, "backend": "torch"}}})
    plain = build_model(cfg.model, ParallelContext.single(), 1)
    model = build_model(cfg.model, ParallelContext.single(), 1)
    apply_fp8(model, cfg.precision)
    ids = torch.randint(0, cfg.model.vocab_size, (8, 64), generator=torch.Generator().manual_seed(0))
    fp8 = saved_activation_bytes(model, ids, ids)
    with high_precision_gemms(model):
        high = saved_activation_bytes(model, ids, ids)
        assert torch.equal(model(ids).logits, plain(ids).logits)
    assert high == saved_activation_bytes(plain, ids, ids)
    assert fp8 < 0.95 * high
    assert not torch.equal(model(ids).logits, plain(ids).logits)  # FP8 is back after the block
    assert f"({(high - fp8) / 2**20:+.1f} MiB saved)" in fp8_memory_report(model, ids, ids)


# ---------------------------------------------------------------- cuBLAS blockwise (Hopper) path

def test_auto_impl_is_the_emulation_on_cpu():
    """impl="auto" (the FP8 linears' default) resolves to "dequant" off Hopper, so CPU runs
    compute exactly what they computed before the Hopper path existed."""
    from ds_parallel.fp8.linear import scaled_mm_blockwise_available, select_gemm_impl

    assert not scaled_mm_blockwise_available("cpu")
    assert select_gemm_impl("cpu") == "dequant" and select_gemm_impl(torch.device("cpu"), 64) == "dequant"
    assert BlockwiseFP8Gemm().impl == "auto" and BlockwiseFP8GroupedGemm().impl == "auto"
    gen = torch.Generator().manual_seed(11)
    x, w = torch.randn(70, 200, generator=gen), torch.randn(130, 200, generator=gen) / 15
    dy = torch.randn(70, 130, generator=gen)
    grads = []
    for impl in ("auto", "dequant"):
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = BlockwiseFP8Gemm(impl=impl)(xi, wi)
        y.backward(dy)
        grads.append((y.detach(), xi.grad, wi.grad))
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def _contract_reference(mat_a, scale_a, mat_b, scale_b, recipe_b):
    """What F.scaled_mm's DeepSeek recipes compute, written from torch's contract: A's element
    (m, k) scaled by scale_a[m, k // 128]; B's (k, n) by scale_b[k // 128, n // 128]
    (BlockWise128x128) or scale_b[n, k // 128] (BlockWise1x128); one GEMM in float64."""
    from torch.nn.functional import ScalingType

    sa = scale_a.double().repeat_interleave(128, dim=1)  # (Mp, Kp)
    if recipe_b == ScalingType.BlockWise128x128:
        kb = mat_b.shape[0] // 128
        sb = scale_b[:kb].double().repeat_interleave(128, 0).repeat_interleave(128, 1)  # (Kp, Np)
    else:
        sb = scale_b.double().t().repeat_interleave(128, dim=0)  # (Kp, Np)
    return (mat_a.double() * sa) @ (mat_b.double() * sb)


@pytest.mark.parametrize("m,k,n", [(256, 512, 384), (200, 300, 130), (50, 128, 96)])
def test_scaled_mm_blockwise_operands_follow_torch_contract(m, k, n):
    """Our scales laid out for torch's blockwise scaled_mm (Fprop 1x128 x 128x128, Dgrad
    1x128 x W^T's 128x128 blocks, Wgrad 1x128 x 1x128 along tokens): the shapes and strides
    torch's CUDA code checks, and the product its contract defines equals the kernel's loop
    (impl="blockwise") to fp32 rounding, padding included (ragged M, K, N)."""
    from torch.nn.functional import ScalingType

    from ds_parallel.fp8.linear import scaled_mm_blockwise_operands

    gen = torch.Generator().manual_seed(12)
    x, dy = _wide_range((m, k), gen), torch.randn(m, n, generator=gen) * 1e-6
    w = torch.randn(n, k, generator=gen) * torch.empty(n, 1).uniform_(0.01, 1.0, generator=gen)
    xq, xs = quantize_tiles(x)
    wq, ws = quantize_blocks(w)
    dyq, dys = quantize_tiles(dy, amax_floor=GRAD_AMAX_FLOOR)
    dycq, dycs = quantize_columns(dy, amax_floor=GRAD_AMAX_FLOOR)
    xcq, xcs = quantize_columns(x)
    gemms = {  # name: (A, a_s, B, b_s, b_blocks) for C = A B^T
        "fprop": (xq, xs, wq, ws, True),
        "dgrad": (dyq, dys, wq.t(), ws.t(), True),
        "wgrad": (dycq.t(), dycs.t(), xcq.t(), xcs.t(), False),
    }
    for name, (a_q, a_s, b_q, b_s, b_blocks) in gemms.items():
        mat_a, scale_a, mat_b, scale_b, recipe_b = scaled_mm_blockwise_operands(a_q, a_s, b_q, b_s, b_blocks)
        (mm, kk), nn = a_q.shape, b_q.shape[0]
        mp, kp, np_ = -(-mm // 16) * 16, -(-kk // 128) * 128, -(-nn // 128) * 128
        kb, l4 = kp // 128, -(-(kp // 128) // 4) * 4
        assert mat_a.dtype == mat_b.dtype == torch.float8_e4m3fn, name
        assert mat_a.shape == (mp, kp) and mat_a.stride() == (kp, 1), name  # row-major
        assert mat_b.shape == (kp, np_) and mat_b.stride() == (1, kp), name  # column-major
        assert scale_a.dtype == scale_b.dtype == torch.float32, name
        assert scale_a.shape == (mp, kb) and (kb == 1 or scale_a.stride() == (1, mp)), name
        if b_blocks:
            assert recipe_b == ScalingType.BlockWise128x128
            assert scale_b.shape == (l4, np_ // 128) and scale_b.stride()[0] == 1
            assert np_ // 128 == 1 or scale_b.stride()[1] == l4, name
        else:
            assert recipe_b == ScalingType.BlockWise1x128
            assert scale_b.shape == (np_, kb) and (kb == 1 or scale_b.stride() == (1, np_)), name
        ref = _contract_reference(mat_a, scale_a, mat_b, scale_b, recipe_b)
        assert (ref[mm:] == 0).all() and (ref[:, nn:] == 0).all(), name  # padding adds nothing
        want = fp8_gemm(a_q, a_s, b_q, b_s, 128, "blockwise", b_blocks=b_blocks)
        assert rel(ref[:mm, :nn].float(), want) < 1e-6, name
        torch.testing.assert_close(ref[:mm, :nn].float(), want, rtol=1e-5, atol=1e-6 * want.abs().max().item())


def test_scaled_mm_blockwise_rejects_other_block_sizes():
    from ds_parallel.fp8.linear import scaled_mm_blockwise_operands

    q, s = quantize_tiles(torch.randn(4, 64), 64)
    with pytest.raises(ValueError, match="block_size=64"):
        scaled_mm_blockwise_operands(q, s, q, s, False, 64)


def test_grouped_per_group_gemms_equal_the_grouped_dequant_path():
    """The Hopper path runs experts one fp8_gemm per group; the same loop with the kernel's
    emulation (impl="blockwise") gives the grouped dequantised GEMM's outputs and gradients,
    an empty group included."""
    gen = torch.Generator().manual_seed(13)
    counts = torch.tensor([130, 0, 60])
    x = torch.randn(190, 256, generator=gen)
    w = torch.randn(3, 160, 256, generator=gen) / 16
    dy = torch.randn(190, 160, generator=gen)
    got = {}
    for impl in ("dequant", "blockwise"):
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = BlockwiseFP8GroupedGemm(impl=impl)(xi, wi, counts, False)
        y.backward(dy)
        got[impl] = (y.detach(), xi.grad, wi.grad)
    for a, b in zip(got["dequant"], got["blockwise"]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5 * a.abs().max().item())
    assert got["blockwise"][2][1].abs().sum() == 0


def test_gemm_knob_picks_the_impl_and_cublas_is_refused_without_hopper():
    """precision.fp8.gemm: emulated and auto run the emulation here (no Hopper), and
    cublas refuses to start, naming the fix, before anything is built."""
    from ds_parallel.config import ConfigError
    from ds_parallel.config.load import config_from_dict
    from ds_parallel.config.validate import validate
    from ds_parallel.fp8.apply import apply_fp8
    from ds_parallel.model.transformer import Transformer
    from ds_parallel.parallel.groups import ParallelContext

    base = {"model": {"preset": "debug_v3_fp8"}, "precision": {"fp8": {"enabled": True, "backend": "torch"}}}
    for knob, impl in (("auto", "auto"), ("emulated", "dequant")):
        cfg = config_from_dict({**base, "precision": {"fp8": {**base["precision"]["fp8"], "gemm": knob}}})
        model = Transformer(cfg.model, ParallelContext.single())
        apply_fp8(model, cfg.precision)
        assert model.layers["0"].attn.wo.gemm.impl == impl
        assert model.layers["1"].ffn.experts.grouped_gemm.impl == impl
    with pytest.raises(ConfigError, match=r"precision.fp8.gemm=cublas needs .* use precision.fp8.gemm=auto"):
        validate(config_from_dict({**base, "precision": {"fp8": {**base["precision"]["fp8"], "gemm": "cublas"}}}), 1)
