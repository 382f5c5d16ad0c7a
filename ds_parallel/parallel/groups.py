"""The only place that creates process groups (docs/architecture.md, invariant 1).

`build_parallel_context` turns a `Topology` into a `ParallelContext`: every group of the
layout is created once, in the same order on every rank (as `new_group` requires), and
the groups this rank belongs to are kept. Model code receives the context and never looks
anything up globally; a degree-1 group is `None` and collectives over it are no-ops.

The same groups are then handed to DeepSpeed (as a Megatron-style `mpu` plus its expert
group registry) and, optionally, megatron-core's `parallel_state` is initialised from the
same degrees and order, so all three agree rank for rank (tested in tests/dist).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

from ds_parallel.parallel.topology import Topology

ProcessGroup = dist.ProcessGroup


@dataclass
class ParallelContext:
    topo: Topology
    rank: int = 0
    # Groups this rank belongs to. None only without torch.distributed; model code skips
    # collectives when the degree is 1, so the single-process path is the same code.
    tp_group: Optional[ProcessGroup] = None
    pp_group: Optional[ProcessGroup] = None
    dp_group: Optional[ProcessGroup] = None  # dense data parallel (includes cp ranks)
    mp_group: Optional[ProcessGroup] = None  # tp x pp: one model replica
    ep_group: Optional[ProcessGroup] = None
    edp_group: Optional[ProcessGroup] = None  # expert data parallel
    world_group: Optional[ProcessGroup] = None
    # Every rank of my pipeline stage (tp x cp x dp): where FP8 amax values must agree
    # (Transformer Engine's amax reduction group, as megatron-core's).
    amax_group: Optional[ProcessGroup] = None
    # First and last pipeline rank of my pp group (pp > 1 only): where a 1F1B pipeline with
    # MTP holds two copies of the embedding whose gradients are summed (Megatron's
    # embedding group). None on the ranks in between.
    embed_group: Optional[ProcessGroup] = None
    ranks: dict[str, list[int]] = field(default_factory=dict)  # name -> members of my group
    # The one home for "where this rank computes": every tensor the trainer, the pipeline
    # runner, metrics, norms, checkpoints and evaluation create goes here, and collectives on
    # the default group use tensors on it (NCCL reduces CUDA tensors only). CPU under gloo.
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def world_size(self) -> int:
        return self.topo.world_size

    @property
    def coords(self) -> dict[str, int]:
        return self.topo.coords(self.rank)

    # Degrees and coordinates, named as in the rest of the code base.
    tp = property(lambda self: self.topo.tp)
    pp = property(lambda self: self.topo.pp)
    ep = property(lambda self: self.topo.ep)
    cp = property(lambda self: self.topo.cp)
    dp = property(lambda self: self.topo.dp * self.topo.cp)
    edp = property(lambda self: self.topo.edp)
    tp_rank = property(lambda self: self.coords["tp"])
    pp_rank = property(lambda self: self.coords["pp"])
    dp_rank = property(lambda self: self.coords["dp"] * self.topo.cp + self.coords["cp"])
    ep_rank = property(lambda self: self.coords["ep"])
    edp_rank = property(lambda self: self.coords["edp"])

    @classmethod
    def single(cls) -> "ParallelContext":
        """One process, every degree 1: the reference for parity tests."""
        return cls(topo=Topology(1), rank=0)


# Context group attribute -> topology dims of that group.
_CONTEXT_GROUPS = {
    "tp_group": "tp",
    "pp_group": "pp",
    "dp_group": "cp-dp",
    "mp_group": "tp-pp",
    "ep_group": "ep",
    "edp_group": "edp",
    "amax_group": "tp-cp-dp",
}


def default_device() -> torch.device:
    """The device of the default process group: this rank's current CUDA device under NCCL
    (parallel/init.py selected it from the local rank), the CPU under gloo or without one."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def build_parallel_context(topo: Topology) -> ParallelContext:
    """Create every group of `topo` (collective: all ranks must call this)."""
    device = default_device()
    if not dist.is_initialized():
        if topo.world_size != 1:
            raise RuntimeError("build_parallel_context needs an initialised process group for world_size > 1")
        return ParallelContext(topo=topo, device=device)
    rank = dist.get_rank()
    if topo.world_size == 1:
        world = dist.group.WORLD
        ranks = {a.removesuffix("_group"): [0] for a in _CONTEXT_GROUPS}
        groups = dict.fromkeys(_CONTEXT_GROUPS, world)
        return ParallelContext(topo, 0, world_group=world, ranks=ranks, device=device, **groups)
    if dist.get_world_size() != topo.world_size:
        raise RuntimeError(f"process group has {dist.get_world_size()} ranks, topology expects {topo.world_size}")
    ctx = ParallelContext(topo=topo, rank=rank, world_group=dist.group.WORLD, device=device)
    for attr, dims in _CONTEXT_GROUPS.items():
        for members in topo.groups(dims):
            # new_group is collective over the whole world even for groups we are not in.
            group = dist.new_group(members)
            if rank in members:
                setattr(ctx, attr, group)
                ctx.ranks[attr.removesuffix("_group")] = members
    if topo.pp > 1:
        for members in topo.groups("pp"):
            ends = [members[0], members[-1]]
            group = dist.new_group(ends)
            if rank in ends:
                ctx.embed_group, ctx.ranks["embed"] = group, ends
    return ctx


class MegatronMPU:
    """The `mpu` interface DeepSpeed expects (Megatron's parallel_state names), backed by
    our context. DeepSpeed uses it for data-parallel reduction and model-parallel norms."""

    def __init__(self, ctx: ParallelContext):
        self.ctx = ctx

    def get_data_parallel_group(self):
        return self.ctx.dp_group

    def get_data_parallel_world_size(self):
        return self.ctx.dp

    def get_data_parallel_rank(self):
        return self.ctx.dp_rank

    def get_tensor_model_parallel_group(self):
        return self.ctx.tp_group

    def get_tensor_model_parallel_world_size(self):
        return self.ctx.tp

    def get_tensor_model_parallel_rank(self):
        return self.ctx.tp_rank

    def get_model_parallel_group(self):
        return self.ctx.mp_group

    def get_model_parallel_world_size(self):
        return self.ctx.tp * self.ctx.pp

    def get_model_parallel_rank(self):
        return self.ctx.ranks.get("mp", [self.ctx.rank]).index(self.ctx.rank)

    def get_pipeline_model_parallel_group(self):
        return self.ctx.pp_group

    def get_pipeline_model_parallel_world_size(self):
        return self.ctx.pp

    def get_pipeline_model_parallel_rank(self):
        return self.ctx.pp_rank

    def get_expert_model_parallel_world_size(self):
        return self.ctx.ep

    def get_expert_data_parallel_group(self):
        return self.ctx.edp_group


def apply_deepspeed_groups(ctx: ParallelContext) -> MegatronMPU:
    """Register our expert groups with DeepSpeed under its naming ("ep_size_<ep>"), so its
    MoE parameter groups reduce expert gradients over our edp group. Returns the mpu to pass
    to `deepspeed.initialize`."""
    from deepspeed.utils import groups as ds_groups

    name = f"ep_size_{ctx.ep}"
    ds_groups._EXPERT_PARALLEL_GROUP[name] = ctx.ep_group
    ds_groups._EXPERT_DATA_PARALLEL_GROUP[name] = ctx.edp_group
    ds_groups._EXPERT_PARALLEL_GROUP_RANKS[name] = ctx.ranks.get("ep", [ctx.rank])
    ds_groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[name] = ctx.ranks.get("edp", [ctx.rank])
    mpu = MegatronMPU(ctx)
    ds_groups.mpu = mpu
    return mpu


def init_megatron_parallel_state(ctx: ParallelContext, timeout_s: float = 120.0) -> bool:
    """Initialise megatron-core's parallel_state from the same degrees and order. Returns
    False when megatron-core is not installed. (megatron-core creates its own group
    objects; tests/dist proves their membership equals ours.)"""
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from megatron.core import parallel_state
    except ImportError:
        return False
    if parallel_state.model_parallel_is_initialized():
        return True
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=ctx.tp,
        pipeline_model_parallel_size=ctx.pp,
        context_parallel_size=ctx.cp,
        expert_model_parallel_size=ctx.ep,
        order="tp-cp-ep-dp-pp",
        distributed_timeout_minutes=max(1, int(timeout_s // 60)),
        create_gloo_process_groups=False,
    )
    return True
