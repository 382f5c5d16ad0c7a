"""The training loop: config + parallel context -> run directory.

    setup_training (train/setup.py: build or resume model, engine, pipeline runner)
    -> config.yaml, data, metrics log
    -> per step: train_step (train/step.py) on the step's global batch -> metrics line
       -> checkpoint (every train.save_every, at the end, on preemption)
    -> held-out evaluation, summary.json, plots.

Each step is a pure function of the step number, which is what makes resume exact.
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
from ds_parallel.data.blend import BlendedLoader, blend_phases, source_names, tokens_per_source
from ds_parallel.fp8.apply import fp8_memory_report
from ds_parallel.moe import expert_load_imbalance, moe_layers
from ds_parallel.parallel.groups import ParallelContext
from ds_parallel.train.evaluate import exact_match, heldout_lm_loss
from ds_parallel.train.metrics import MetricsLog, plot_run, step_record
from ds_parallel.train.pipeline import PipelineForward, gather_layer_tensors
from ds_parallel.train.setup import setup_training
from ds_parallel.train.step import lm_micro_batches, to_device, train_step


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


def train(cfg: Config, ctx: ParallelContext) -> dict[str, Any]:
    t, m = cfg.train, cfg.model
    out_dir, is_rank0 = t.out_dir, ctx.rank == 0
    parts = setup_training(cfg, ctx)  # a damaged checkpoint is refused before anything is written
    if is_rank0:
        os.makedirs(out_dir, exist_ok=True)
        _write_config(cfg, out_dir)
    model, start_step = parts.model, parts.start_step

    data = build_datasets(cfg.data, t, m.vocab_size)
    if data.sources:  # data.blend: several sources mixed by weight (data/blend.py)
        names = source_names(cfg.data)
        loader = BlendedLoader(data.sources, blend_phases(cfg.data, t.steps), t.global_batch_size,
                               t.micro_batch_size, ctx.dp_rank, ctx.dp, t.seed)
    else:
        loader = GlobalBatchLoader(data.train, t.global_batch_size, t.micro_batch_size, ctx.dp_rank, ctx.dp, t.seed)
    if cfg.precision.fp8.enabled and parts.runner is None:  # measured once, on the first micro-batch
        first = to_device(lm_micro_batches(loader.micro_batches(start_step)), ctx.device)[0]
        report = fp8_memory_report(model, first["input_ids"], first["labels"])
        if is_rank0:
            print(report, flush=True)
    metrics = MetricsLog.for_run(cfg, is_rank0, start_step)
    preempt = PreemptionFlag(ctx.device)
    moe_ids = m.moe_layer_ids()

    last = start_step
    stop_at = t.steps if not t.max_steps_this_run else min(t.steps, start_step + t.max_steps_this_run)
    tokens_per_step = t.global_batch_size * t.seq_len
    for step in range(start_step, stop_at):
        tic = time.perf_counter()
        result = train_step(parts, lm_micro_batches(loader.micro_batches(step)), step)
        tokens_per_s = tokens_per_step / (time.perf_counter() - tic)
        last = step + 1
        if last == 1 or last % t.log_every == 0 or last == t.steps:
            imbalance = loads = biases = None
            if moe_ids:  # every layer's loads and biases, gathered over pipeline stages
                loads = gather_layer_tensors(result.expert_loads, moe_ids, m.n_routed_experts, ctx)
                biases = {g.layer_id: g.gate.e_score_correction_bias for g in moe_layers(model)}
                biases = gather_layer_tensors(biases, moe_ids, m.n_routed_experts, ctx)
                imbalance = expert_load_imbalance(loads)
            record = step_record(last, result.losses, result.lr, result.grad_norm, tokens_per_s,
                                 moe=bool(moe_ids), mtp=bool(m.mtp_depth), expert_load_imbalance=imbalance)
            if data.sources:
                record.update(tokens_per_source(loader, names, last, t.seq_len))
            metrics.log(record)
            if moe_ids:
                metrics.log_experts(last, loads, biases)
        if t.eval_every and (last % t.eval_every == 0 or last == t.steps) and data.eval is not None:
            loss = heldout_lm_loss(parts.engine.module, data.eval, t.eval_samples)
            metrics.log_eval({"step": last, "valid_loss": loss})
        stop = preempt.agreed()
        if stop or last == stop_at or (t.save_every and last % t.save_every == 0):
            ckpt.save_checkpoint(out_dir, last, parts.engine, ctx, to_dict(cfg))
        if stop:
            if is_rank0:
                print(f"preempted: checkpoint written at step {last}; exiting with {EXIT_PREEMPTED} for requeue",
                      flush=True)
            return {"step": last, "preempted": True}

    summary: dict[str, Any] = {"step": last, "preempted": False}
    if last == t.steps and data.heldout:
        evaluated = parts.engine.module if parts.runner is None else PipelineForward(parts.runner)
        summary.update(exact_match(evaluated, ctx, data))
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
