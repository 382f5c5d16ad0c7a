"""The training loop: config + parallel context -> run directory.

Order of events (each step is a pure function of the step number, which is what makes
resume exact): lr from the schedule -> this rank's micro-batches of the global batch ->
forward/backward through the DeepSpeed engine (which accumulates and reduces), or with
pp > 1 through the pipeline schedule (train/pipeline.py) and then the engine's reduction -> optimizer
step -> MoE bias update from the global batch's expert loads -> global-batch loss reduced
over data parallel -> metrics line, checkpoint, preemption check.
"""
from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

import torch
import torch.distributed as dist

from ds_parallel import checkpoint as ckpt
from ds_parallel.atomic import write_atomic
from ds_parallel.config.load import dump_yaml, to_dict
from ds_parallel.config.schema import Config
from ds_parallel.data import GlobalBatchLoader, build_datasets
from ds_parallel.fp8.apply import fp8_memory_report
from ds_parallel.model import build_model
from ds_parallel.moe import expert_load_imbalance, moe_layers, update_moe_biases
from ds_parallel.parallel.groups import ParallelContext
from ds_parallel.parallel.plan import pipeline_layout
from ds_parallel.train.engine import (build_engine, global_grad_norm, gradient_accumulation_steps,
                                     reports_grad_norm, set_lr)
from ds_parallel.train.evaluate import exact_match
from ds_parallel.train.optim import moment_bytes_report
from ds_parallel.train.metrics import LOSSES, MetricsLog, plot_run, step_record
from ds_parallel.train.pipeline import PipelineForward, PipelineRunner, gather_layer_tensors
from ds_parallel.train.schedule import bias_update_speed_at, lr_at, mtp_lambda_at


# Exit status of a rank that stopped for preemption after writing its checkpoint:
# EX_TEMPFAIL from sysexits.h ("try again later"). launchers/train.py exits with it and
# slurm/v3_pretrain.sh requeues the job when srun reports it; rerunning resumes from latest.
EXIT_PREEMPTED = 75


class PreemptionFlag:
    """SIGTERM / SIGUSR1 (Slurm's warning signal) ask for a checkpoint and a clean exit.
    The flag is agreed across ranks each step, so every rank saves together, and every
    rank then exits with EXIT_PREEMPTED."""

    def __init__(self, device: torch.device):
        self.raised, self.device = False, device
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.raised = True

    def agreed(self) -> bool:
        flag = torch.tensor([1.0 if self.raised else 0.0], device=self.device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def _write_config(cfg: Config, out_dir: str) -> None:
    write_atomic(os.path.join(out_dir, "config.yaml"), dump_yaml(cfg))


def _mean_over(sums: dict[str, float], groups, count: int, device: torch.device) -> dict[str, float]:
    """Global-batch means of per-rank sums: one all-reduce per group for every metric (dp,
    then pp, where only the last stage's ranks hold nonzero sums)."""
    t = torch.tensor(list(sums.values()), dtype=torch.float64, device=device)
    for group in groups:
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(t, group=group)
    return dict(zip(sums, (t / count).tolist()))


def train(cfg: Config, ctx: ParallelContext) -> dict[str, Any]:
    t = cfg.train
    out_dir = t.out_dir
    is_rank0 = ctx.rank == 0
    # Verified before anything is written: a damaged checkpoint leaves the run directory as it was.
    resume_dir = ckpt.latest_checkpoint(out_dir, group=dist.group.WORLD if dist.is_initialized() else None)
    if is_rank0:
        os.makedirs(out_dir, exist_ok=True)
        _write_config(cfg, out_dir)

    torch.manual_seed(t.seed)
    layout = pipeline_layout(cfg.model, ctx.pp, cfg.parallel.pp_schedule, cfg.parallel.pp_layers)
    model = build_model(cfg.model, ctx, seed=t.seed, layout=layout)
    start_step = 0
    if resume_dir:
        reader = ckpt.CheckpointReader(resume_dir)
        meta = ckpt.read_meta(resume_dir)
        ckpt.load_model_weights(model, reader)
        start_step = meta["step"]
    engine = build_engine(model, cfg, ctx)
    if is_rank0 and cfg.precision.optimizer_moments == "bf16":
        print(moment_bytes_report(engine.basic_optimizer, torch.bfloat16), flush=True)
    runner = None
    if ctx.pp > 1:
        n_micro = gradient_accumulation_steps(cfg, ctx.dp)
        runner = PipelineRunner(engine, model, layout, ctx, n_micro, t.micro_batch_size, t.seq_len, t.grad_clip)
    if resume_dir:
        same_layout = meta["layout"]["world_size"] == ctx.world_size and all(
            meta["layout"][k] == getattr(ctx, k) for k in ("tp", "pp", "ep", "dp")
        )
        ckpt.load_optimizer_state(engine, reader, meta, ctx.rank, same_layout)
        if is_rank0:
            print(f"resumed from {resume_dir} at step {start_step}", flush=True)

    data = build_datasets(cfg.data, t, cfg.model.vocab_size)
    loader = GlobalBatchLoader(data.train, t.global_batch_size, t.micro_batch_size, ctx.dp_rank, ctx.dp, t.seed)
    if cfg.precision.fp8.enabled and runner is None:  # measured once, on the first micro-batch
        report = fp8_memory_report(model, *_on(ctx.device, loader.micro_batches(start_step))[0])
        if is_rank0:
            print(report, flush=True)
    metrics = MetricsLog(out_dir, is_rank0, t.steps, start_step)
    preempt = PreemptionFlag(ctx.device)
    m = cfg.model
    moe_ids = m.moe_layer_ids()

    own_norm = reports_grad_norm(engine)
    last = start_step
    stop_at = t.steps if not t.max_steps_this_run else min(t.steps, start_step + t.max_steps_this_run)
    tokens_per_step = t.global_batch_size * t.seq_len
    for step in range(start_step, stop_at):
        tic = time.perf_counter()
        set_lr(engine, lr_at(step, t))
        _apply_moe_mtp_schedules(model, step, cfg)
        sums = dict.fromkeys(LOSSES, 0.0)
        micro = _on(ctx.device, loader.micro_batches(step))
        if runner is not None:
            sums = runner.forward_backward(micro)
            norm = runner.grad_norm
            engine.step()
        else:
            norm = None
            for i, (input_ids, labels) in enumerate(micro):
                out = engine(input_ids, labels=labels)
                engine.backward(out.loss)
                if i == len(micro) - 1 and not own_norm:  # reduced, not yet clipped
                    norm = global_grad_norm(model, ctx)
                engine.step()
                for key in sums:
                    value = getattr(out, key, None)
                    if value is not None:
                        sums[key] += float(value.detach())
            norm = engine.get_global_grad_norm() if own_norm else norm
        loads = update_moe_biases(model, ctx) if moe_ids else None  # this rank's layers
        n = len(micro) * ctx.dp
        means = _mean_over(sums, [ctx.dp_group, ctx.pp_group if runner else None], n, ctx.device)
        tokens_per_s = tokens_per_step / (time.perf_counter() - tic)
        last = step + 1
        if last == 1 or last % t.log_every == 0 or last == t.steps:
            imbalance = None
            if moe_ids:  # every layer's loads and biases, gathered over pipeline stages
                loads = gather_layer_tensors(loads, moe_ids, m.n_routed_experts, ctx)
                biases = {g.layer_id: g.gate.e_score_correction_bias for g in moe_layers(model)}
                biases = gather_layer_tensors(biases, moe_ids, m.n_routed_experts, ctx)
                imbalance = expert_load_imbalance(loads)
            metrics.log(step_record(last, means, lr_at(step, t), float(norm) if norm is not None else float("nan"),
                                    tokens_per_s, moe=bool(moe_ids), mtp=bool(m.mtp_depth),
                                    expert_load_imbalance=imbalance))
            if moe_ids:
                metrics.log_experts(last, loads, biases)
        stop = preempt.agreed()
        if stop or last == stop_at or (t.save_every and last % t.save_every == 0):
            ckpt.save_checkpoint(out_dir, last, engine, ctx, to_dict(cfg))
        if stop:
            if is_rank0:
                print(f"preempted: checkpoint written at step {last}; exiting with {EXIT_PREEMPTED} for requeue",
                      flush=True)
            return {"step": last, "preempted": True}

    summary: dict[str, Any] = {"step": last, "preempted": False}
    if last == t.steps and data.heldout:
        summary.update(exact_match(engine.module if runner is None else PipelineForward(runner), ctx, data))
        if is_rank0:
            print(
                f"held-out exact match: {summary['exact_match']:.3f} over {summary['n_eval']} problems "
                f"(chance {summary['chance']:.4f})",
                flush=True,
            )
    if is_rank0:
        write_atomic(os.path.join(out_dir, "summary.json"), json.dumps(summary, indent=1))
        plot_run(out_dir)
    return summary


def _on(device: torch.device, micro: list[tuple[torch.Tensor, torch.Tensor]]):
    """The loader yields CPU tensors; the engine does not move its inputs."""
    if device.type == "cpu":
        return micro
    return [(x.to(device, non_blocking=True), y.to(device, non_blocking=True)) for x, y in micro]


def _apply_moe_mtp_schedules(model: torch.nn.Module, step: int, cfg: Config) -> None:
    if cfg.model.mtp_depth:
        model.set_mtp_lambda(mtp_lambda_at(step, cfg.model, cfg.train))
    speed = bias_update_speed_at(step, cfg.model, cfg.train)
    for layer in moe_layers(model):
        layer.gate.bias_update_speed = speed
