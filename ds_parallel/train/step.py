"""One optimizer step on any layout, pipelined or not.

    lr and the MoE/MTP schedules for the step -> this rank's micro-batches on its device ->
    forward and backward (through the DeepSpeed engine, which accumulates and reduces, or
    with pp > 1 through the pipeline schedule and then the engine's reduction) -> the global
    gradient norm before clipping -> optimizer step -> MoE bias update from the global
    batch's expert loads -> global-batch means of the losses, identical on every rank.

Everything here is a pure function of the step number and the batch, which is what makes
resume exact. The training loop calls `train_step`; later loops (SFT, GRPO) can call it with
their own batches.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from ds_parallel.moe import moe_layers, update_moe_biases
from ds_parallel.train.engine import global_grad_norm, reports_grad_norm, set_lr
from ds_parallel.train.metrics import LOSSES
from ds_parallel.train.schedule import bias_update_speed_at, lr_at, mtp_lambda_at
from ds_parallel.train.setup import TrainParts

Batch = list[tuple[torch.Tensor, torch.Tensor]]  # this rank's (input_ids, labels) micro-batches


@dataclass
class StepResult:
    losses: dict[str, float]  # global-batch means, keyed by train.metrics.LOSSES
    grad_norm: float  # of the full gradient, before clipping (nan where not computed)
    lr: float
    expert_loads: Optional[dict[int, torch.Tensor]]  # this rank's MoE layers: tokens per expert


def train_step(parts: TrainParts, micro: Batch, step: int) -> StepResult:
    """Optimizer step `step` (0-based) on `micro`. Collective over the world."""
    cfg, ctx, engine = parts.cfg, parts.ctx, parts.engine
    lr = lr_at(step, cfg.train)
    set_lr(engine, lr)
    apply_step_schedules(parts.model, step, cfg)
    micro = to_device(micro, ctx.device)
    sums, norm = _forward_backward(parts, micro)
    loads = update_moe_biases(parts.model, ctx) if cfg.model.moe_layer_ids() else None
    groups = [ctx.dp_group, ctx.pp_group if parts.runner is not None else None]
    losses = _mean_over(sums, groups, len(micro) * ctx.dp, ctx.device)
    return StepResult(losses, float(norm) if norm is not None else float("nan"), lr, loads)


def _forward_backward(parts: TrainParts, micro: Batch) -> tuple[dict[str, float], Optional[float]]:
    """This rank's loss sums over its micro-batches and the global gradient norm; the
    optimizer has stepped when it returns."""
    engine, runner = parts.engine, parts.runner
    if runner is not None:  # the schedule reduces, clips over every stage and keeps the norm
        sums = runner.forward_backward(micro)
        engine.step()
        return sums, runner.grad_norm
    # ZeRO and bf16 engines compute the global norm; a plain fp32 engine does not (exactly).
    own_norm = reports_grad_norm(engine)
    sums, norm = dict.fromkeys(LOSSES, 0.0), None
    for i, (input_ids, labels) in enumerate(micro):
        out = engine(input_ids, labels=labels)
        engine.backward(out.loss)
        if i == len(micro) - 1 and not own_norm:  # reduced, not yet clipped
            norm = global_grad_norm(parts.model, parts.ctx)
        engine.step()  # a no-op until the last micro-batch (gradient accumulation)
        for key in sums:
            value = getattr(out, key, None)
            if value is not None:
                sums[key] += float(value.detach())
    return sums, engine.get_global_grad_norm() if own_norm else norm


def _mean_over(sums: dict[str, float], groups, count: int, device: torch.device) -> dict[str, float]:
    """Global-batch means of per-rank sums: one all-reduce per group for every metric (dp,
    then pp, where only the last stage's ranks hold nonzero sums)."""
    t = torch.tensor(list(sums.values()), dtype=torch.float64, device=device)
    for group in groups:
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(t, group=group)
    return dict(zip(sums, (t / count).tolist()))


def to_device(micro: Batch, device: torch.device) -> Batch:
    """The loader yields CPU tensors; the engine does not move its inputs."""
    if device.type == "cpu":
        return micro
    return [(x.to(device, non_blocking=True), y.to(device, non_blocking=True)) for x, y in micro]


def apply_step_schedules(model: torch.nn.Module, step: int, cfg) -> None:
    """The MTP loss weight and the router-bias update speed of step `step` (V3 §4.2)."""
    if cfg.model.mtp_depth:
        model.set_mtp_lambda(mtp_lambda_at(step, cfg.model, cfg.train))
    speed = bias_update_speed_at(step, cfg.model, cfg.train)
    for layer in moe_layers(model):
        layer.gate.bias_update_speed = speed
