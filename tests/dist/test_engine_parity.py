"""Real DeepSpeed engines on 2 gloo ranks train exactly like one plain-PyTorch process.

Layouts: dp=2 with ZeRO 1, 2 and 3, and tp=2 (ZeRO 1), on the same global batch; and bf16
runs (ZeRO 1), checked against the fp32 reference to a tolerance set from bf16's own noise
(see BF16_TOL). The reference is independent of DeepSpeed: torch AdamW + clip_grad_norm_ on
the full batch. Checked: the global-batch loss at every step (1e-5 relative), every gradient
of the first step (gathered to full shape, 1e-5 of each tensor's scale), and each
parameter's total update after the last step. Pipeline layouts also check PipelineForward
(the evaluation path) against the unpipelined model's logits.
"""
import pytest
import torch

from tests.harness import run_dist

pytestmark = pytest.mark.dist

STEPS = 3

# bf16 against the fp32 reference: relative norm error over all tensors at once, of the
# step-0 gradients and of the whole updates p - p_init after the last step. The floor is
# bf16's own noise, measured with ONE process (the same bf16 ZeRO-1 engine, dp=1) against
# the fp32 reference: gradients 0.0046 (dense) / 0.0060 (tiny V3 with MTP), updates
# 0.0102 / 0.032. Tolerance: 3x the larger floor. Without the data-parallel gradient
# reduction (ZeRO's average_tensor made a no-op) the dense dp=2 run is 0.36 / 0.46 off.
BF16_TOL = {"grad": 3 * 0.0060, "update": 3 * 0.032}


def _assert_close(actual, expected, what, atol=None):
    scale = expected.abs().max().clamp_min(1e-12)
    atol = 1e-5 * scale.item() if atol is None else atol
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=atol, msg=lambda m: f"{what}: {m}")


def _full_grad(param, ctx):
    from deepspeed.utils import safe_get_full_grad

    from ds_parallel.parallel.shard import gather_full, shards_of

    from ds_parallel.parallel.shard import local_shape

    hp = hasattr(param, "_hp_mapping") or hasattr(param, "ds_id")
    grad = safe_get_full_grad(param) if hp else param.grad
    # clone: step() clips gradients in place, and the comparison happens after it
    return gather_full(grad.view(local_shape(param)), shards_of(param), ctx).clone()


def _bf16_within(what, kind, pairs):
    """Relative norm error of a bf16 run against the fp32 reference over all tensors at once,
    {name: (bf16, fp32)}, against BF16_TOL[kind]; returns it. Over all tensors, since a
    single expert's gradient depends on which tokens bf16 routing sends it."""
    diff = sum((a.double() - b.double()).pow(2).sum() for a, b in pairs.values())
    err = (diff / sum(b.double().pow(2).sum() for _, b in pairs.values())).sqrt().item()
    assert err <= BF16_TOL[kind], (what, kind, err, BF16_TOL[kind])
    return err


def _reference_steps(cfg, loader_full, seed, steps=None, transform=None):
    """Plain PyTorch: one process, the whole global batch per step. `transform(model)` is
    applied after building (e.g. the FP8 swap)."""
    from ds_parallel.model import build_model
    from ds_parallel.moe import update_moe_biases
    from ds_parallel.parallel.groups import ParallelContext
    from ds_parallel.train.engine import adamw, optimizer_param_groups
    from ds_parallel.train.schedule import lr_at

    t = cfg.train
    model = build_model(cfg.model, ParallelContext.single(), seed)
    if transform is not None:
        transform(model)
    opt = adamw(optimizer_param_groups(model, t.weight_decay), t)
    history = []
    for step in range(STEPS if steps is None else steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, t)
        micro = loader_full.micro_batches(step)
        loss = sum(model(x, labels=y).loss for x, y in micro) / len(micro)
        opt.zero_grad()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        if t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        update_moe_biases(model, ParallelContext.single())  # no-op for dense models
        history.append((loss.item(), grads))
    return model, history


def _check_pipeline_forward(runner, cfg, ctx, ids, bf16):
    """PipelineForward (evaluation through the stages, no schedule) gives the logits of the
    whole model in one process, before any step: same weights, the same ops in the same
    order. In eval mode, so the routers count no load (the training step follows)."""
    from ds_parallel.model import build_model
    from ds_parallel.parallel.groups import ParallelContext
    from ds_parallel.train.pipeline import PipelineForward

    full = build_model(cfg.model, ParallelContext.single(), cfg.train.seed).eval()
    if bf16:
        full = full.to(torch.bfloat16)
    assert len(full.mtp) == cfg.model.mtp_depth > 0  # the stages hold MTP modules it must skip
    forward = PipelineForward(runner).eval()
    ids = ids.to(ctx.device)
    try:
        got = forward(ids).logits
    finally:
        forward.train()
    with torch.no_grad():
        want = full(ids).logits.chunk(ctx.tp, -1)[ctx.tp_rank]  # this tp rank's vocab shard
    torch.testing.assert_close(got.cpu(), want, rtol=1e-6, atol=1e-6)


def _check_layouts(rank, world, base, layouts):
    import torch.distributed as dist

    from ds_parallel.config.load import load_config
    from ds_parallel.data import GlobalBatchLoader, build_datasets
    from ds_parallel.model import build_model
    from ds_parallel.parallel.groups import build_parallel_context
    from deepspeed.utils import safe_get_full_fp32_param

    from ds_parallel.parallel.shard import gather_full, local_shape, shards_of
    from ds_parallel.parallel.topology import Topology
    from ds_parallel.moe import moe_layers, update_moe_biases
    from ds_parallel.train.objective import LanguageModeling
    from ds_parallel.train.pipeline import PipelineRunner
    from ds_parallel.train.step import lm_micro_batches
    from ds_parallel.parallel.plan import pipeline_layout
    from ds_parallel.train.engine import (build_engine, global_grad_norm, gradient_accumulation_steps,
                                         reports_grad_norm, set_lr)
    from ds_parallel.train.schedule import lr_at

    for extra in layouts:
        bf16 = "precision.dtype=bf16" in extra
        cfg = load_config(None, base + extra, world_size=world)
        t = cfg.train
        data = build_datasets(cfg.data, t, cfg.model.vocab_size)
        ref_model, history = _reference_steps(cfg, GlobalBatchLoader(data.train, t.global_batch_size,
                                                                     t.micro_batch_size, 0, 1, t.seed), t.seed)
        p = cfg.parallel
        ctx = build_parallel_context(Topology(world, tp=p.tp, pp=p.pp, ep=p.ep))
        layout = pipeline_layout(cfg.model, p.pp, p.pp_schedule, p.pp_layers)
        engine = build_engine(build_model(cfg.model, ctx, t.seed, layout), cfg, ctx)
        runner = None
        if p.pp > 1:
            runner = PipelineRunner(engine, engine.module, layout, ctx, gradient_accumulation_steps(cfg, ctx.dp),
                                    t.micro_batch_size, t.seq_len, LanguageModeling(cfg), t.grad_clip)
        loader = GlobalBatchLoader(data.train, t.global_batch_size, t.micro_batch_size, ctx.dp_rank, ctx.dp, t.seed)
        if runner is not None:
            _check_pipeline_forward(runner, cfg, ctx, loader.micro_batches(0)[0][0], bf16)
        for step in range(STEPS):
            set_lr(engine, lr_at(step, t))
            micro = loader.micro_batches(step)
            total = 0.0
            if runner is not None:  # gradients are reduced after the schedule, until step()
                total = runner.forward_backward(lm_micro_batches(micro), step)["loss"]
                grads = {n: _full_grad(p, ctx) for n, p in engine.module.named_parameters()}  # clipped
                own_norm = runner.grad_norm
                engine.step()
            for i, (x, y) in enumerate(micro if runner is None else []):
                out = engine(x, labels=y)
                engine.backward(out.loss)
                total += out.loss.item()
                if i == len(micro) - 1:  # gradients are reduced and available until step()
                    grads = {n: _full_grad(p, ctx) for n, p in engine.module.named_parameters()}
                    own_norm = None if reports_grad_norm(engine) else global_grad_norm(engine.module, ctx)
                engine.step()
            update_moe_biases(engine.module, ctx)
            loss = torch.tensor([total / len(micro)], dtype=torch.float64)
            dist.all_reduce(loss, group=ctx.dp_group)
            if runner is not None:  # only the last stage's ranks hold the loss
                dist.all_reduce(loss, group=ctx.pp_group)
            ref_loss, ref_grads = history[step]
            # bf16 (8-bit mantissa) against the fp32 reference: agreement to bf16 precision.
            tol = 2e-2 if bf16 else 1e-5
            assert abs(loss.item() / ctx.dp - ref_loss) <= tol * abs(ref_loss), (extra, step, loss.item(), ref_loss)
            if bf16:
                if step == 0:
                    clipped = runner is not None and t.grad_clip > 0
                    ref_norm = torch.sqrt(sum(g.double().pow(2).sum() for g in ref_grads.values())).item()
                    scale = min(1.0, t.grad_clip / (ref_norm + 1e-6)) if clipped else 1.0
                    _bf16_within(extra, "grad", {n: (g.float(), ref_grads[n] * scale) for n, g in grads.items()})
                continue
            # Step 0 starts from identical parameters: every gradient to 1e-5 of its tensor's
            # scale. Later steps start from parameters AdamW moved differently by ~1e-7 (see
            # below), so from then on the losses and the whole updates are compared.
            ref_norm = torch.sqrt(sum(g.double().pow(2).sum() for g in ref_grads.values())).item()
            norm = own_norm if own_norm is not None else engine.get_global_grad_norm()
            assert abs(norm - ref_norm) <= 1e-5 * ref_norm, (extra, step, norm, ref_norm)
            if step == 0:
                # The pipeline runner clips before the step, so its gradients come clipped.
                clipped = runner is not None and t.grad_clip > 0
                scale = min(1.0, t.grad_clip / (ref_norm + 1e-6)) if clipped else 1.0
                for name, grad in grads.items():
                    _assert_close(grad, ref_grads[name] * scale, f"{extra} grad {name}")
        # Elementwise, AdamW amplifies ~1e-7 gradient noise where a gradient is ~0 (m/sqrt(v)
        # flips); so compare each tensor's whole update: |p - p_ref| / |p_ref - p_init|.
        ref_moes = {m.layer_id: m for m in moe_layers(ref_model)}
        for moe in moe_layers(engine.module):  # under pp, this rank's stages' layers
            ref_moe = ref_moes[moe.layer_id]
            bias = moe.gate.e_score_correction_bias
            # bf16 loads may tip an expert across the mean: the sign update then differs.
            assert bf16 or torch.equal(bias, ref_moe.gate.e_score_correction_bias), (extra, moe.layer_id)
            assert bias.abs().sum() > 0  # the update did move it
        ref_params = dict(ref_model.named_parameters())
        init = dict(build_model(cfg.model, ctx.__class__.single(), t.seed).named_parameters())
        updates = {}
        for name, p in engine.module.named_parameters():
            master = hasattr(p, "ds_id") or (bf16 and hasattr(p, "_hp_mapping"))  # bf16: the fp32 master
            local = safe_get_full_fp32_param(p) if master else p.detach()
            full = gather_full(local.view(local_shape(p)), shards_of(p), ctx)
            updates[name] = (full.float() - init[name].detach(), ref_params[name].detach() - init[name].detach())
        if bf16:
            _bf16_within(extra, "update", updates)
        else:
            for name, (update, ref_update) in updates.items():
                # Plus one fp32 ulp of the parameter per element: an RMSNorm weight near 1 moves
                # a few ulps in these steps, and its last bit may round either way.
                ulp = torch.finfo(torch.float32).eps * ref_params[name].detach().norm()
                err = (update - ref_update).norm()
                assert err < 1e-4 * ref_update.norm() + ulp, (extra, name, (err / ref_update.norm()).item())
        engine.destroy()


BASE = ["train.global_batch_size=8", "train.micro_batch_size=2", "train.seq_len=32", "train.lr=1e-2",
        "train.warmup_steps=1", "train.grad_clip=0.5",
        # A larger AdamW eps keeps m/(sqrt(v)+eps) smooth where gradients are ~0, so 1e-7
        # reduction-order noise cannot flip an update's sign (see the parameter check).
        "train.eps=1e-4"]


PIPE_V3 = ["model.preset=debug_v3", "model.n_layers=4", "model.mtp_depth=1", "model.bias_update_speed=1e-2",
           "model.seq_aux_alpha=1e-2"]


def test_dp_zero123_tp_and_bf16_match_single_process():
    layouts = [["parallel.zero_stage=1"], ["parallel.zero_stage=2"], ["parallel.zero_stage=3"],
               ["parallel.tp=2", "parallel.zero_stage=1"], ["parallel.zero_stage=1", "precision.dtype=bf16"]]
    run_dist(_check_layouts, 2, BASE + ["model.n_kv_heads=2"], layouts)


def test_expert_parallel_with_zero_matches_single_process():
    """Tiny DeepSeek-V3 (MLA + MoE with bias balancing, no MTP) with ep=2 under ZeRO 0/1/2:
    expert gradients must be reduced over expert-data-parallel and scaled by the full dp."""
    moe = ["model.preset=debug_v3", "model.mtp_depth=0", "model.bias_update_speed=1e-2", "model.seq_aux_alpha=1e-2"]
    # ZeRO-0 without clipping: DeepSpeed's stage-0 clip averages per-rank norms, which is
    # inexact for experts, so config validation rejects ep>1 + ZeRO-0 + clipping.
    layouts = [["parallel.ep=2", "parallel.zero_stage=0", "train.grad_clip=0"]]
    layouts += [["parallel.ep=2", f"parallel.zero_stage={z}"] for z in (1, 2)] + [["parallel.tp=2"]]
    run_dist(_check_layouts, 2, BASE + moe, layouts)


def test_four_process_compositions_match_single_process():
    """4 gloo processes: tp=2 x dp=2 (ZeRO-1) on the dense model, tp=2 x ep=2 (ZeRO-1,
    experts replicated over tp, dispatched over ep) on the tiny DeepSeek-V3, and the two
    pipeline compositions pp=2 x ep=2 and pp=2 x tp=2."""
    layouts = [["parallel.tp=2", "parallel.zero_stage=1", "model.n_kv_heads=2"],
               ["parallel.tp=2", "parallel.ep=2", "parallel.zero_stage=1", "model.preset=debug_v3",
                "model.mtp_depth=1", "model.bias_update_speed=1e-2"],
               # Pipelines (tiny V3 with MTP): pp=2 x ep=2 (dp=2, experts reduced over edp=1
               # per stage) and pp=2 x tp=2 (DualPipeV), both ZeRO-1.
               PIPE_V3 + ["parallel.pp=2", "parallel.ep=2", "parallel.zero_stage=1"],
               # ZeRO-0 with experts and clipping: allowed under pp, whose clipping is exact.
               PIPE_V3 + ["parallel.pp=2", "parallel.ep=2", "parallel.zero_stage=0"],
               PIPE_V3 + ["parallel.pp=2", "parallel.tp=2", "parallel.pp_schedule=dualpipev", "parallel.zero_stage=1"],
               # 1F1B x tp=2: each tp rank's vocab shard of the embedding is tied to its copy.
               PIPE_V3 + ["parallel.pp=2", "parallel.tp=2", "parallel.zero_stage=1"]]
    run_dist(_check_layouts, 4, BASE, layouts)


def test_pipeline_1f1b_and_dualpipev_match_single_process():
    """Tiny DeepSeek-V3 with MTP over pp=2: 1F1B (embedding copy on the last stage, tied
    gradients) and DualPipeV (4 stages in a V; rank 0 holds embedding, head and MTP), ZeRO-1;
    DualPipeV under ZeRO-0 with an explicit uneven split that leaves one stage empty; 1F1B
    in bf16 (ZeRO-1), to bf16 precision of the fp32 reference; DualPipeV with 2 MTP depths."""
    layouts = [["parallel.pp=2", "parallel.zero_stage=1"],
               ["parallel.pp=2", "parallel.pp_schedule=dualpipev", "parallel.zero_stage=1"],
               ["parallel.pp=2", "parallel.pp_schedule=dualpipev", "parallel.zero_stage=0", "parallel.pp_layers=1,2,0,1"],
               ["parallel.pp=2", "parallel.zero_stage=1", "precision.dtype=bf16"],
               ["parallel.pp=2", "parallel.pp_schedule=dualpipev", "parallel.zero_stage=1", "model.mtp_depth=2"]]
    run_dist(_check_layouts, 2, BASE + PIPE_V3, layouts)
