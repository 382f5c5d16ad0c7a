"""Our groups, DeepSpeed's and megatron-core's agree rank for rank, and DeepSpeed's gradient
reduction uses them: a real engine over our tiny DeepSeek-V3 averages dense gradients over
data parallel and reduces routed-expert gradients over expert-data parallel only, scaled by
the full data-parallel size (2 gloo processes)."""
import pytest
import torch
import torch.distributed as dist

from tests.harness import run_dist

pytestmark = pytest.mark.dist


def _check_reduction(rank, ctx, zero_stage):
    """One backward on rank-dependent tokens, the local gradients kept, then the engine's own
    reduction; every gradient compared with the reduction computed from all ranks' locals."""
    from deepspeed.utils import groups as ds_groups
    from deepspeed.utils import safe_get_full_grad

    from ds_parallel.config.load import load_config
    from ds_parallel.model import build_model
    from ds_parallel.train.engine import build_engine

    cfg = load_config(None, ["model.preset=debug_v3", "model.mtp_depth=0", "train.global_batch_size=4",
                             "train.micro_batch_size=2", f"parallel.ep={ctx.ep}", f"parallel.zero_stage={zero_stage}",
                             "train.grad_clip=0"], world_size=ctx.world_size)
    engine = build_engine(build_model(cfg.model, ctx, seed=0), cfg, ctx)
    # The dp group whose size DeepSpeed divides expert gradients by (deepspeed.comm is up now).
    assert dist.get_process_group_ranks(ds_groups._get_data_parallel_group()) == ctx.ranks["dp"]
    ids = torch.randint(0, cfg.model.vocab_size, (2, 16), generator=torch.Generator().manual_seed(rank))
    out = engine.module(ids.to(ctx.device), labels=ids.roll(-1, 1).to(ctx.device))
    out.loss.backward()  # plain autograd: this rank's local gradients, not yet reduced
    params = dict(engine.module.named_parameters())
    local = {n: p.grad.detach().clone() for n, p in params.items()}
    engine.allreduce_gradients()  # what engine.backward runs at the accumulation boundary
    edp = ctx.ranks.get("edp", [rank])
    n_expert = 0
    for name, p in params.items():
        everyone = [torch.empty_like(local[name]) for _ in range(ctx.world_size)]
        dist.all_gather(everyone, local[name])
        reduced = safe_get_full_grad(p) if zero_stage > 0 else p.grad
        if getattr(p, "allreduce", True):
            want = sum(everyone) / ctx.dp
        else:  # DeepSpeed: summed over edp, divided by dp (an expert's grad is independent of ep)
            want = sum(everyone[r] for r in edp) / ctx.dp
            n_expert += 1
        torch.testing.assert_close(reduced.view_as(want), want, rtol=1e-5, atol=1e-9,
                                   msg=lambda m: f"ep={ctx.ep} zero={zero_stage} {name}: {m}")
    assert n_expert == 3, n_expert  # w1, w2, w3 of the one MoE layer were checked as experts
    engine.destroy()


def _check_groups(rank, world, layouts):
    import warnings

    warnings.filterwarnings("ignore")
    from deepspeed.utils import groups as ds_groups
    from megatron.core import parallel_state as ps

    from ds_parallel.parallel.groups import apply_deepspeed_groups, build_parallel_context, init_megatron_parallel_state
    from ds_parallel.parallel.topology import Topology

    for tp, ep in layouts:
        topo = Topology(world, tp=tp, ep=ep)
        ctx = build_parallel_context(topo)
        members = lambda g: dist.get_process_group_ranks(g)
        # Our groups hold exactly the topology's members.
        assert members(ctx.tp_group) == topo.group_of("tp", rank)
        assert members(ctx.dp_group) == topo.group_of("cp-dp", rank)
        assert members(ctx.ep_group) == topo.group_of("ep", rank)
        assert members(ctx.edp_group) == topo.group_of("edp", rank)
        # A collective over the tp group sums exactly the tp members' ranks.
        t = torch.tensor([float(rank)], device=ctx.device)
        dist.all_reduce(t, group=ctx.tp_group)
        assert t.item() == sum(topo.group_of("tp", rank))

        # DeepSpeed's lookup, through its own accessors, finds groups with the right members
        # (with ep=2 on 2 ranks, edp is this rank alone; with ep=1, both ranks).
        mpu = apply_deepspeed_groups(ctx)
        name = f"ep_size_{ep}"
        assert members(ds_groups._get_expert_parallel_group(name)) == topo.group_of("ep", rank)
        assert members(ds_groups._get_expert_data_parallel_group(name)) == topo.group_of("edp", rank)
        assert members(mpu.get_data_parallel_group()) == topo.group_of("cp-dp", rank)
        if tp == 1:
            for zero_stage in (0, 1):
                _check_reduction(rank, ctx, zero_stage)

        assert init_megatron_parallel_state(ctx)
        assert members(ps.get_tensor_model_parallel_group()) == topo.group_of("tp", rank)
        assert members(ps.get_data_parallel_group()) == topo.group_of("dp", rank)
        assert members(ps.get_pipeline_model_parallel_group()) == topo.group_of("pp", rank)
        assert members(ps.get_expert_model_parallel_group()) == topo.group_of("ep", rank)
        assert members(ps.get_expert_data_parallel_group()) == topo.group_of("edp", rank)
        assert ps.get_tensor_model_parallel_rank() == ctx.tp_rank
        assert ps.get_data_parallel_rank() == ctx.dp_rank
        ps.destroy_model_parallel()


def test_groups_agree_with_deepspeed_and_megatron():
    run_dist(_check_groups, 2, [(2, 1), (1, 2), (1, 1)])
