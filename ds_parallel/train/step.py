"""One optimizer step on any layout, pipelined or not.

    the step's lr -> this rank's micro-batches on its device -> forward and backward of
    the run's objective (train/objective.py; through the DeepSpeed engine, which
    accumulates and reduces, or with pp > 1 through the pipeline schedule and then the
    engine's reduction) -> the global gradient norm before clipping -> optimizer step ->
    MoE bias update (the step's speed) from the global batch's expert loads -> global-batch
    means of the objective's metrics, identical on every rank.

Everything here is a pure function of the step number and the batch (the schedules are read
at their point of use, nothing is stored in modules), which is what makes resume exact. The
training loop calls `train_step`; later loops (SFT, GRPO) call it with their own batches
and objectives.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Optional

import torch
import torch.distributed as dist

from ds_parallel.moe import update_moe_biases
from ds_parallel.moe.replay import replaying
from ds_parallel.train.engine import global_grad_norm, reports_grad_norm, set_lr
from ds_parallel.train.objective import MicroBatch
from ds_parallel.train.schedule import bias_update_speed_at, lr_at
from ds_parallel.train.setup import TrainParts


@dataclass
class StepResult:
    losses: dict[str, float]  # global-batch means, keyed by the objective's metrics
    grad_norm: float  # of the full gradient, before clipping (nan where not computed)
    lr: float
    expert_loads: Optional[dict[int, torch.Tensor]]  # this rank's MoE layers: tokens per expert


def train_step(parts: TrainParts, micro: list[MicroBatch], step: int) -> StepResult:
    """Optimizer step `step` (0-based) on this rank's micro-batches, minimising
    `parts.objective`. Collective over the world."""
    cfg, ctx, engine = parts.cfg, parts.ctx, parts.engine
    lr = lr_at(step, cfg.train)
    set_lr(engine, lr)
    micro = to_device(micro, ctx.device)
    sums, norm = _forward_backward(parts, micro, step)
    loads = None
    if cfg.model.moe_layer_ids():
        loads = update_moe_biases(parts.model, ctx, bias_update_speed_at(step, cfg.model, cfg.train))
    groups = [ctx.dp_group, ctx.pp_group if parts.runner is not None else None]
    losses = _mean_over(sums, groups, len(micro) * ctx.dp, ctx.device)
    return StepResult(losses, float(norm) if norm is not None else float("nan"), lr, loads)


def _forward_backward(parts: TrainParts, micro: list[MicroBatch], step: int
                      ) -> tuple[dict[str, float], Optional[float]]:
    """This rank's metric sums over its micro-batches and the global gradient norm; the
    optimizer has stepped when it returns."""
    engine, runner, objective = parts.engine, parts.runner, parts.objective
    if runner is not None:  # the schedule reduces, clips over every stage and keeps the norm
        sums = runner.forward_backward(micro, step)
        engine.step()
        return sums, runner.grad_norm
    # ZeRO and bf16 engines compute the global norm; a plain fp32 engine does not (exactly).
    own_norm = reports_grad_norm(engine)
    sums, norm = dict.fromkeys(objective.metrics, 0.0), None
    for i, batch in enumerate(micro):
        with replaying(batch.get("routes"), parts.cfg.model.trunk_moe_layer_ids()):  # RL route replay
            metrics = engine(batch["input_ids"], segment_ids=batch.get("segment_ids"),  # packed rows (SFT)
                             objective=partial(_bound, objective, batch, step))
        engine.backward(metrics[0])
        if i == len(micro) - 1 and not own_norm:  # reduced, not yet clipped
            norm = global_grad_norm(parts.model, parts.ctx)
        engine.step()  # a no-op until the last micro-batch (gradient accumulation)
        for key, value in zip(sums, metrics.detach().tolist()):
            sums[key] += value
    return sums, engine.get_global_grad_norm() if own_norm else norm


def _bound(objective, batch: MicroBatch, step: int, model, trunk):
    return objective(model, trunk, batch, step)


def _mean_over(sums: dict[str, float], groups, count: int, device: torch.device) -> dict[str, float]:
    """Global-batch means of per-rank sums: one all-reduce per group for every metric (dp,
    then pp, where only the last stage's ranks hold nonzero sums)."""
    t = torch.tensor(list(sums.values()), dtype=torch.float64, device=device)
    for group in groups:
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(t, group=group)
    return dict(zip(sums, (t / count).tolist()))


def to_device(micro: list[MicroBatch], device: torch.device) -> list[MicroBatch]:
    """The loader yields CPU tensors; the engine does not move its inputs."""
    if device.type == "cpu":
        return micro
    return [{k: v.to(device, non_blocking=True) for k, v in mb.items()} for mb in micro]


def lm_micro_batches(pairs) -> list[MicroBatch]:
    """The data loader's (input_ids, labels) pairs as micro-batches."""
    return [{"input_ids": x, "labels": y} for x, y in pairs]
