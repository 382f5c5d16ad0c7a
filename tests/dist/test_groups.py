"""Our groups, DeepSpeed's and megatron-core's agree rank for rank (2 gloo processes)."""
import pytest
import torch
import torch.distributed as dist

from tests.harness import run_dist

pytestmark = pytest.mark.dist


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
        t = torch.tensor([float(rank)])
        dist.all_reduce(t, group=ctx.tp_group)
        assert t.item() == sum(topo.group_of("tp", rank))

        mpu = apply_deepspeed_groups(ctx)
        name = f"ep_size_{ep}"
        assert members(ds_groups._get_expert_parallel_group(name)) == topo.group_of("ep", rank)
        assert members(ds_groups._get_expert_data_parallel_group(name)) == topo.group_of("edp", rank)
        assert members(mpu.get_data_parallel_group()) == topo.group_of("cp-dp", rank)

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
