"""Config -> DeepSpeed engine.

The optimizer is torch's fused AdamW handed to DeepSpeed (no JIT-compiled op, so a fresh CPU
machine trains at once), or with `precision.optimizer_moments: bf16` the same rule with
BF16 moments (train/optim.py). Parameter groups: weights decay, norms (1-D) do not; routed-expert
parameters (tagged `allreduce = False` by moe/layer.py) go to DeepSpeed's MoE groups so
ZeRO reduces their gradients over the expert-data-parallel group only. The learning rate
is set by `train/schedule.py` before each optimizer step, so it is a pure function of the
step and resume needs no scheduler state.
"""
from __future__ import annotations

from typing import Any

import torch

from ds_parallel.config.schema import Config, micro_batches_per_step
from ds_parallel.fp8.apply import apply_fp8
from ds_parallel.parallel.groups import ParallelContext, apply_deepspeed_groups
from ds_parallel.train.optim import LowPrecisionMomentAdamW


def gradient_accumulation_steps(cfg: Config, dp: int) -> int:
    return micro_batches_per_step(cfg.train.global_batch_size, cfg.train.micro_batch_size, dp)


def deepspeed_config(cfg: Config, dp: int) -> dict[str, Any]:
    t = cfg.train
    # Under pipeline parallelism the schedule runs the micro-batches (train/pipeline.py):
    # the engine sees one micro-batch of the rank's whole share per optimizer step.
    gas = gradient_accumulation_steps(cfg, dp) if cfg.parallel.pp == 1 else 1
    ds: dict[str, Any] = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.global_batch_size // (gas * dp),
        "gradient_accumulation_steps": gas,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        "bf16": {"enabled": cfg.precision.dtype == "bf16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,  # the trainer prints its own progress line
        "wall_clock_breakdown": False,
    }
    # Under pp, train/pipeline.py computes the norm and clips over every stage: DeepSpeed
    # reduces one norm per optimizer group over tp x pp, and stages hold different groups.
    if cfg.parallel.pp > 1:
        ds["gradient_clipping"] = 0.0
        if cfg.parallel.zero_stage > 0:
            ds["zero_optimization"]["compute_grad_norm"] = False
    for key, value in cfg.deepspeed.items():  # passthrough wins, merged one level deep
        if isinstance(value, dict) and isinstance(ds.get(key), dict):
            ds[key] = {**ds[key], **value}
        else:
            ds[key] = value
    return ds


def optimizer_param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """decay / no_decay groups, each split into dense and routed-expert parameters.

    Routed-expert parameters (`allreduce = False`) go to groups marked `moe` and named by
    their DeepSpeed expert-data-parallel group (`ep_size_<ep>`), which is what makes ZeRO
    reduce them over edp (the layout of DeepSpeed's
    `split_params_into_different_moe_groups_for_optimizer`, without its size splitting).
    Pipeline stages may hold different groups (a dense-only stage has no expert group):
    DeepSpeed's per-group norm, the one collective that would need them equal, is off under
    pp (see `deepspeed_config`).
    """
    dense_groups, expert_groups = [], []
    for name, decays in (("decay", True), ("no_decay", False)):
        params = [p for p in model.parameters() if p.requires_grad and (p.ndim >= 2) == decays]
        dense = [p for p in params if getattr(p, "allreduce", True)]
        experts = [p for p in params if not getattr(p, "allreduce", True)]
        wd = weight_decay if decays else 0.0
        if dense:
            dense_groups.append({"params": dense, "weight_decay": wd, "name": name})
        if experts:
            expert_groups.append({"params": experts, "weight_decay": wd, "name": experts[0].group_name, "moe": True})
    return dense_groups + expert_groups


def adamw(groups: list[dict[str, Any]], t) -> torch.optim.Optimizer:
    """The optimizer of `train` (train.lr, beta1, beta2, eps): torch's fused AdamW, one kernel
    over each tensor instead of ~10 elementwise passes (on CPU ~6x faster than the
    single-tensor loop; HF's Trainer defaults to it as well)."""
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, fused=True)


def _register_moe_layers(model: torch.nn.Module) -> None:
    """Make DeepSpeed see our MoE layers. Its engine switches on expert handling (expert
    gradients reduced over the expert-data-parallel group and scaled by the full data-parallel
    size, MoE optimizer groups, expert-aware ZeRO partitioning) only for modules that are
    instances of `deepspeed.moe.layer.MoE`. Each of our layers gets a class that derives from
    both; ours comes first in the MRO, so only the type test and `num_experts` change. Its
    `set_deepspeed_parallelism` is a no-op: the groups were registered from our topology."""
    from deepspeed.moe.layer import MoE as DeepSpeedMoE

    from ds_parallel.moe import moe_layers

    for layer in moe_layers(model):
        if isinstance(layer, DeepSpeedMoE):
            continue
        registered = type(f"DeepSpeedRegistered{type(layer).__name__}", (type(layer), DeepSpeedMoE),
                          {"set_deepspeed_parallelism": lambda self, *a, **k: None})
        layer.__class__ = registered
        layer.num_experts = layer.n_experts


def build_engine(model: torch.nn.Module, cfg: Config, ctx: ParallelContext):
    """Wrap `model` in a DeepSpeed engine whose groups are ours (see parallel/groups.py).

    What is applied to the built (and loaded) model, in this order (docs/architecture.md):
    DeepSpeed's expert groups from our context; the cast to the training dtype and the move
    to `ctx.device`; the FP8 swap (Transformer Engine builds its layers from the final
    dtype and device); MoE registration with DeepSpeed; the optimizer and the engine."""
    import deepspeed

    mpu = apply_deepspeed_groups(ctx)
    t = cfg.train
    dtype = torch.bfloat16 if cfg.precision.dtype == "bf16" else torch.float32
    model = model.to(device=ctx.device, dtype=dtype)
    apply_fp8(model, cfg.precision, ctx)  # FP8 GEMMs swapped in, if precision.fp8.enabled
    _register_moe_layers(model)
    groups = optimizer_param_groups(model, t.weight_decay)
    if cfg.precision.optimizer_moments == "bf16":
        optimizer = LowPrecisionMomentAdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps,
                                            moment_dtype=torch.bfloat16)
    else:
        optimizer = adamw(groups, t)
    engine, optimizer, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=deepspeed_config(cfg, ctx.dp), mpu=mpu,
        dist_init_required=False,
    )
    return engine


def set_lr(engine, lr: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


def reports_grad_norm(engine) -> bool:
    """DeepSpeed computes the global gradient norm in its ZeRO and bf16 optimizers; a plain
    fp32 engine (ZeRO-0) only does so while clipping, and then with an approximation."""
    return engine.zero_optimization_stage() > 0 or engine.bfloat16_enabled()


def _reduced_grad(param: torch.Tensor) -> tuple[torch.Tensor | None, bool]:
    """This rank's piece of `param`'s reduced gradient, and whether the pieces are split over
    data parallel (ZeRO-1/2 partitions, read through DeepSpeed's fragment mapping: a view into
    the buffers the optimizer steps on) rather than replicated (ZeRO-0: param.grad)."""
    if hasattr(param, "_hp_mapping"):
        m = param._hp_mapping
        return (m.get_lp_grad_fragment(param._index_in_param_group) if m is not None else None), True
    return param.grad, False


@torch.no_grad()
def global_grad_norm(model: torch.nn.Module, ctx: ParallelContext) -> float:
    """L2 norm of the full (unsharded) gradient from reduced local gradients, under any
    layout: ZeRO partitions summed over dp (experts: edp), pieces split over tp or ep summed
    over their group, replicated ones counted once, pipeline stages summed over pp (a tied
    embedding copy, `ds_pipe_replicated`, counted once). Collective over the world: every
    rank issues the same reductions whatever it holds."""
    import itertools

    import torch.distributed as dist

    from ds_parallel.parallel.shard import shards_of

    keys = list(itertools.product((False, True), repeat=3))  # (partitioned, tp-split, expert)
    sq = {k: torch.zeros((), dtype=torch.float64, device=ctx.device) for k in keys}
    for param in model.parameters():
        if getattr(param, "ds_pipe_replicated", False):
            continue
        grad, partitioned = _reduced_grad(param)
        if grad is not None:
            groups = {s.group for s in shards_of(param)}
            sq[(partitioned, "tp" in groups, "ep" in groups)] += grad.double().pow(2).sum()
    total = torch.zeros((), dtype=torch.float64, device=ctx.device)
    for (partitioned, tp_split, expert), value in sq.items():
        reductions = [(partitioned, ctx.edp_group if expert else ctx.dp_group, ctx.edp if expert else ctx.dp),
                      (tp_split, ctx.tp_group, ctx.tp), (expert, ctx.ep_group, ctx.ep)]
        for needed, group, size in reductions:
            if needed and size > 1:
                dist.all_reduce(value, group=group)
        total += value
    if ctx.pp > 1:
        dist.all_reduce(total, group=ctx.pp_group)
    return total.sqrt().item()


@torch.no_grad()
def clip_grad_norm_(model: torch.nn.Module, ctx: ParallelContext, max_norm: float) -> float:
    """Scale the reduced gradients so their global norm is at most `max_norm` (torch's
    clip_grad_norm_ rule, max_norm / (norm + 1e-6)); returns the norm before clipping. Used
    under pipeline parallelism, where DeepSpeed's own clipping would need the same optimizer
    groups on every stage (it reduces one norm per group over tp x pp)."""
    norm = global_grad_norm(model, ctx)
    coef = max_norm / (norm + 1e-6)
    if max_norm > 0 and coef < 1:
        for param in model.parameters():
            grad, _ = _reduced_grad(param)
            if grad is not None:
                grad.mul_(coef)
    return norm
