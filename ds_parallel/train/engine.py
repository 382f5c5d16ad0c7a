"""Config -> DeepSpeed engine.

The optimizer is torch's AdamW handed to DeepSpeed (no JIT-compiled op, so a fresh CPU
machine trains at once). Parameter groups: weights decay, norms (1-D) do not; routed-expert
parameters (tagged `allreduce = False` by moe/layer.py) go to DeepSpeed's MoE groups so
ZeRO reduces their gradients over the expert-data-parallel group only. The learning rate
is set by `train/schedule.py` before each optimizer step, so it is a pure function of the
step and resume needs no scheduler state.
"""
from __future__ import annotations

from typing import Any

import torch

from ds_parallel.config.schema import Config
from ds_parallel.fp8.recipe import apply_fp8
from ds_parallel.parallel.groups import ParallelContext, apply_deepspeed_groups


def gradient_accumulation_steps(cfg: Config, dp: int) -> int:
    return cfg.train.global_batch_size // (cfg.train.micro_batch_size * dp)


def deepspeed_config(cfg: Config, dp: int) -> dict[str, Any]:
    t = cfg.train
    # Under pipeline parallelism the schedule runs the micro-batches (parallel/pipeline.py):
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
    for key, value in cfg.deepspeed.items():  # passthrough wins, merged one level deep
        if isinstance(value, dict) and isinstance(ds.get(key), dict):
            ds[key] = {**ds[key], **value}
        else:
            ds[key] = value
    return ds


def optimizer_param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]
    groups = [g for g in groups if g["params"]]
    if any(not getattr(p, "allreduce", True) for g in groups for p in g["params"]):
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

        groups = split_params_into_different_moe_groups_for_optimizer(groups)
    return groups


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
    """Wrap `model` in a DeepSpeed engine whose groups are ours (see parallel/groups.py)."""
    import deepspeed

    mpu = apply_deepspeed_groups(ctx)
    apply_fp8(model, cfg.precision)  # FP8 GEMMs swapped in, if precision.fp8.enabled
    _register_moe_layers(model)
    t = cfg.train
    if cfg.precision.dtype == "bf16":
        model = model.to(torch.bfloat16)
    optimizer = torch.optim.AdamW(
        optimizer_param_groups(model, t.weight_decay), lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps,
        foreach=False,
    )
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


@torch.no_grad()
def global_grad_norm(model: torch.nn.Module, ctx: ParallelContext) -> float:
    """L2 norm of the full (unsharded) gradient from reduced local gradients: pieces split
    over tp or ep are summed over their group, replicated ones counted once, and pipeline
    stages summed over pp (a tied embedding copy, `ds_pipe_replicated`, counted once)."""
    import torch.distributed as dist

    from ds_parallel.parallel.shard import shards_of

    sq = {"": torch.zeros((), dtype=torch.float64), "tp": torch.zeros((), dtype=torch.float64),
          "ep": torch.zeros((), dtype=torch.float64)}
    for param in model.parameters():
        if param.grad is not None and not getattr(param, "ds_pipe_replicated", False):
            groups = {s.group for s in shards_of(param)}
            key = "tp" if "tp" in groups else "ep" if "ep" in groups else ""
            sq[key] += param.grad.double().pow(2).sum()
    for key, group in (("tp", ctx.tp_group), ("ep", ctx.ep_group)):
        if getattr(ctx, key) > 1:
            dist.all_reduce(sq[key], group=group)
    total = sum(sq.values())
    if ctx.pp > 1:
        dist.all_reduce(total, group=ctx.pp_group)
    return total.sqrt().item()
