"""FP8 under expert parallelism (2 gloo processes): the FP8 dispatch sends uint8 rows plus fp32
scales, and an ep=2 MoE layer with FP8 computes what one process with FP8 computes on the
whole batch, outputs and every gradient, to fp32 rounding (docs/architecture.md, invariant 2,
for the FP8 model). Then the real engine: build_engine applies FP8 (precision.fp8.enabled) and ep=2 +
ZeRO-1 training tracks a one-process FP8 reference.

One caveat is inherent to the recipe: Wgrad quantises 128-token tiles, so it depends on which
tokens share a GEMM. The layer test gives each rank 128 tokens, so tiles coincide; see the
engine test for where they cannot."""
import pytest
import torch
import torch.distributed as dist

from tests.harness import run_dist

pytestmark = pytest.mark.dist

TOL = dict(rtol=1e-5, atol=1e-5)


def _moe_cfg():
    from ds_parallel.config.schema import ModelConfig

    return ModelConfig(dim=128, n_routed_experts=8, n_shared_experts=1, n_activated_experts=3, moe_inter_dim=128,
                       init_std=0.2, score_func="sigmoid", n_expert_groups=4, n_limited_groups=2, route_scale=2.5,
                       norm_topk_prob=True, bias_update_speed=1e-3, seq_aux_alpha=0.1)


def _check_moe_layer(rank, world):
    import warnings

    warnings.filterwarnings("ignore")
    import ds_parallel.moe.dispatch as moe_dispatch
    from ds_parallel.config.schema import PrecisionConfig
    from ds_parallel.fp8.apply import apply_fp8
    from ds_parallel.moe import MoE
    from ds_parallel.parallel.groups import ParallelContext, build_parallel_context
    from ds_parallel.parallel.shard import gather_full, local_slice
    from ds_parallel.parallel.topology import Topology

    ctx = build_parallel_context(Topology(world, ep=2))
    single = ParallelContext.single()
    cfg = _moe_cfg()
    precision = PrecisionConfig()
    precision.fp8.enabled, precision.fp8.backend = True, "torch"

    torch.manual_seed(0)  # same reference (full weights, tokens) on every rank
    ref = MoE(0, cfg, single, n_devices=2)
    with torch.no_grad():  # uneven routing: expert 1 takes every token, expert 6 none
        ref.gate.e_score_correction_bias[1] = 2.0
        ref.gate.e_score_correction_bias[6] = -10.0
    ref32 = MoE(0, cfg, single, n_devices=2)
    ref32.load_state_dict(ref.state_dict())
    moe = MoE(0, cfg, ctx)
    full = dict(ref.named_parameters()) | dict(ref.named_buffers())
    with torch.no_grad():
        for name, t in list(moe.named_parameters()) + list(moe.named_buffers()):
            if name != "gate.load":
                t.copy_(local_slice(full[name], getattr(t, "shards", ())))
    assert {"experts", "shared_experts.w1", ""} <= set(apply_fp8(ref, precision))
    apply_fp8(moe, precision)

    # Record what crosses the wire (every all-to-all of the ep=2 layer, forward and backward;
    # the one-process reference layers send nothing): each tensor's dtype and the bytes of
    # its rows that go to the other rank (rows to rank d: in_splits[d]).
    wire = []
    original = moe_dispatch._all_to_all

    def recording(x, out_splits, in_splits, ep_group):  # (dtype, bytes per row, bytes to the other rank)
        row = x[0].numel() * x.element_size()
        wire.append((x.dtype, row, (sum(in_splits) - in_splits[rank]) * row))
        return original(x, out_splits, in_splits, ep_group)

    moe_dispatch._all_to_all = recording
    try:
        # 128 tokens per rank: Wgrad's 128x1 token tiles of the data-parallel layers (shared
        # expert) are then the same tiles on one process and on two (see fp8/linear.py).
        bsz, seqlen = 2, 64
        x_all = torch.randn(world * bsz, seqlen, cfg.dim) * 2
        cot_all = torch.randn(world * bsz, seqlen, cfg.dim)
        mine = slice(rank * bsz, (rank + 1) * bsz)
        outs = {}
        for label, layer in (("ref", ref), ("ref32", ref32)):
            xr = x_all.clone().requires_grad_()
            y, aux = layer(xr)
            ((y * cot_all).sum() + aux).backward()
            outs[label] = (y.detach(), xr.grad)
        x = x_all[mine].clone().requires_grad_()
        y, aux = moe(x)
        n_forward = len(wire)
        ((y * cot_all[mine]).sum() + aux / world).backward()
    finally:
        moe_dispatch._all_to_all = original
    # Forward: the dispatch (FP8 rows as bytes, their fp32 scales, fp32 gates, bool masks),
    # then the combine's fp32 rows. Backward: only fp32 gradients, the token rows' at full
    # width (the combine's and the dispatch's, dim * 4 bytes a row) and the gates'.
    forward, combine, backward = wire[:n_forward - 1], wire[n_forward - 1], wire[n_forward:]
    n_local = cfg.n_routed_experts // 2
    assert [d for d, _, _ in backward] == [torch.float32] * 3, backward
    assert sorted(row for _, row, _ in backward) == [n_local * 4, cfg.dim * 4, cfg.dim * 4], backward
    assert combine[:2] == (torch.float32, cfg.dim * 4) and moe.last_comm["combine_bytes"] == combine[2] > 0

    y_ref, gx_ref = outs["ref"]
    torch.testing.assert_close(y.detach(), y_ref[mine], **TOL)
    torch.testing.assert_close(x.grad, gx_ref[mine], **TOL)
    ref_params = dict(ref.named_parameters())
    for name, p in moe.named_parameters():
        shards = getattr(p, "shards", ())
        if shards:
            grad = gather_full(p.grad, shards, ctx)
        else:
            grad = p.grad.clone()
            dist.all_reduce(grad)
        torch.testing.assert_close(grad, ref_params[name].grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
    assert gather_full(moe.experts.w1.grad, moe.experts.w1.shards, ctx)[6].abs().sum() == 0

    # FP8 really changed the numbers, by FP8's error and no more (three chained FP8 GEMMs
    # per expert: measured 0.069).
    y32 = outs["ref32"][0]
    err = ((y_ref - y32).norm() / y32.norm()).item()
    assert 0.01 < err < 0.12, err
    # The layer's dispatch_bytes is what really went to the other rank in the forward
    # (uint8 rows, fp32 scales, fp32 gates, bool masks), and a token row took 1 byte per
    # channel + 4 per 128 channels: about a quarter of the fp32 row the backward sends.
    grad_row = cfg.dim * 4
    assert [d for d, _, _ in forward] == [torch.uint8, torch.float32, torch.float32, torch.bool], forward
    assert moe.last_comm["dispatch_bytes"] == sum(b for _, _, b in forward) > 0, (moe.last_comm, forward)
    row_bytes = forward[0][1] + forward[1][1]  # FP8 payload + scales
    assert 0.25 * grad_row < row_bytes < 0.27 * grad_row, (row_bytes, grad_row)


def test_fp8_ep2_matches_one_process():
    run_dist(_check_moe_layer, 2)


STEPS = 2
BASE = ["model.preset=debug_v3_fp8", "model.mtp_depth=0", "train.global_batch_size=4", "train.micro_batch_size=2",
        "train.seq_len=32", "train.lr=1e-2", "train.warmup_steps=1", "train.grad_clip=0.5", "train.eps=1e-4",
        "precision.fp8.enabled=true", "precision.fp8.backend=torch"]


def _reference(cfg):
    """Losses and first-step gradients of the plain-PyTorch one-process reference with the
    same FP8 swap."""
    from ds_parallel.data import GlobalBatchLoader, build_datasets
    from ds_parallel.fp8.apply import apply_fp8
    from tests.dist.test_engine_parity import _reference_steps

    t = cfg.train
    loader = GlobalBatchLoader(build_datasets(cfg.data, t, cfg.model.vocab_size).train, t.global_batch_size,
                               t.micro_batch_size, 0, 1, t.seed)
    _, history = _reference_steps(cfg, loader, t.seed, steps=STEPS,
                                  transform=lambda model: apply_fp8(model, cfg.precision))
    return [loss for loss, _ in history], history[0][1]


def _check_first_grads(engine, ctx, ref_grads):
    """Step 0's reduced gradients, gathered to full shape, against the one-process FP8
    reference. FP8 quantisation is per token (Fprop, Dgrad) or per 128-token tile of one
    GEMM (Wgrad), so every gradient but the routed experts' equals the reference to fp32
    rounding (measured <= 4e-8). An expert's Wgrad GEMM runs over both ranks' tokens at once
    here, one micro-batch at a time there: its 128-token tiles differ, and FP8 rounds them
    differently (measured 1.9-2.1%, FP8's error for that GEMM, not a missing reduction)."""
    from tests.dist.test_engine_parity import _full_grad

    for name, p in engine.module.named_parameters():
        g, want = _full_grad(p, ctx), ref_grads[name]
        err = ((g - want).norm() / want.norm()).item()
        assert err < (0.04 if ".experts." in name else 1e-6), (name, err)


def _check_engine(rank, world):
    import warnings

    warnings.filterwarnings("ignore")
    from ds_parallel import kernels
    from ds_parallel.config.load import load_config
    from ds_parallel.data import GlobalBatchLoader, build_datasets
    from ds_parallel.fp8.linear import BlockwiseFP8Gemm, BlockwiseFP8GroupedGemm
    from ds_parallel.model import build_model
    from ds_parallel.moe import update_moe_biases
    from ds_parallel.parallel.groups import build_parallel_context
    from ds_parallel.parallel.topology import Topology
    from ds_parallel.train.engine import build_engine, set_lr
    from ds_parallel.train.schedule import lr_at

    cfg = load_config(None, BASE + ["parallel.ep=2", "parallel.zero_stage=1"], world_size=world)
    t = cfg.train
    ref_losses, ref_grads = _reference(cfg)
    ctx = build_parallel_context(Topology(world, ep=2))
    engine = build_engine(build_model(cfg.model, ctx, t.seed), cfg, ctx)
    layer = engine.module.layers["1"]
    assert isinstance(layer.attn.wkv_b.gemm, BlockwiseFP8Gemm) and engine.module.head.gemm is kernels.linear
    assert isinstance(layer.ffn.experts.grouped_gemm, BlockwiseFP8GroupedGemm)
    loader = GlobalBatchLoader(build_datasets(cfg.data, t, cfg.model.vocab_size).train, t.global_batch_size,
                               t.micro_batch_size, ctx.dp_rank, ctx.dp, t.seed)
    for step in range(STEPS):
        set_lr(engine, lr_at(step, t))
        micro = loader.micro_batches(step)
        total = 0.0
        for i, (x, y) in enumerate(micro):
            out = engine(x, labels=y)
            engine.backward(out.loss)
            if step == 0 and i == len(micro) - 1:  # reduced, not yet clipped or stepped
                _check_first_grads(engine, ctx, ref_grads)
            engine.step()
            total += out.loss.item()
        update_moe_biases(engine.module, ctx)
        loss = torch.tensor([total / len(micro)], dtype=torch.float64)
        dist.all_reduce(loss, group=ctx.dp_group)
        # Step 0: same model, same micro-batches, and FP8 forward tiles are per token, so the
        # loss matches to fp32 rounding. Its gradients do not, exactly: under ep=2 an expert's
        # Wgrad runs over the rows of both ranks' micro-batches at once, and its 128-token
        # tiles straddle them, where the reference tiles each micro-batch alone; both are FP8
        # gradients of the same batch (measured: step-1 loss 1.6e-4 apart).
        tol = 1e-5 if step == 0 else 1e-3
        assert abs(loss.item() / ctx.dp - ref_losses[step]) <= tol * ref_losses[step], (step, loss.item(), ref_losses)
    engine.destroy()


def test_fp8_engine_ep2_zero1_matches_one_process():
    run_dist(_check_engine, 2)
