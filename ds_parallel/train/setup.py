"""Config + parallel context -> everything a loop needs before its first step.

`setup_training` is the one place a run is built and resumed: the latest checkpoint is
verified before anything is written, the model is built from the seed (each rank its own
shard), weights come back before the DeepSpeed engine exists and optimizer state, step and
RNG after it, and a pipeline runner is made when pp > 1. The training loop (train/trainer.py)
and later loops (SFT, GRPO) start from its `TrainParts`; the order of calls here is what
makes a resumed run continue the exact loss curve, so keep it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from ds_parallel import checkpoint as ckpt
from ds_parallel.config.schema import Config
from ds_parallel.interop.hf import HFCheckpoint, is_hf_directory, load_hf_weights
from ds_parallel.model import apply_recompute, build_model
from ds_parallel.model.compile import apply_compile
from ds_parallel.parallel.groups import ParallelContext
from ds_parallel.parallel.plan import PipelineLayout, pipeline_layout
from ds_parallel.train.engine import build_engine, gradient_accumulation_steps
from ds_parallel.train.objective import LanguageModeling, Objective
from ds_parallel.train.optim import moment_bytes_report
from ds_parallel.train.pipeline import PipelineRunner


@dataclass
class TrainParts:
    cfg: Config
    ctx: ParallelContext
    layout: PipelineLayout
    model: torch.nn.Module  # this rank's shard (its pipeline stages), inside `engine`
    engine: object  # the DeepSpeed engine: ZeRO, gradient reduction, the optimizer step
    runner: Optional[PipelineRunner]  # pp > 1: the schedule that runs forward and backward
    objective: Objective  # what train_step minimises (train/objective.py)
    start_step: int  # optimizer steps already taken (0, or the resumed checkpoint's)
    resumed_from: Optional[str]  # the checkpoint directory, when resumed


def setup_training(cfg: Config, ctx: ParallelContext, objective: Optional[Objective] = None,
                   init: Optional[str] = None) -> TrainParts:
    """Build (or resume) the model, engine and pipeline runner of `cfg` on this rank, to
    minimise `objective` (default: language modelling). A run with no checkpoint yet starts
    from the seed, or from the weights at `init` (post-training: our run / step directory or
    an HF directory; `load_initial_weights`). Collective: every rank calls it. Raises
    CheckpointError, before anything is loaded, when the latest checkpoint is incomplete or
    damaged."""
    t = cfg.train
    objective = objective or LanguageModeling(cfg)
    resume_dir = ckpt.latest_checkpoint(t.out_dir, group=dist.group.WORLD if dist.is_initialized() else None)
    torch.manual_seed(t.seed)
    layout = pipeline_layout(cfg.model, ctx.pp, cfg.parallel.pp_schedule, cfg.parallel.pp_layers)
    model = build_model(cfg.model, ctx, seed=t.seed, layout=layout)
    # Which activations backward keeps (model/recompute.py): flags on the modules, no
    # parameter changes, so its place among the post-construction steps does not matter.
    apply_recompute(model, t.recompute, t.recompute_modules, t.recompute_layers,
                    [layout.stages[s] for s in layout.stages_of(ctx.pp_rank)], layout.has_head(ctx.pp_rank))
    if t.compile:  # after recompute: it makes the recompute runners traceable (model/compile.py)
        apply_compile(model, verbose=ctx.rank == 0, backend=t.compile_backend)
    start_step = 0
    if resume_dir:
        reader = ckpt.CheckpointReader(resume_dir)
        meta = ckpt.read_meta(resume_dir)
        ckpt.load_model_weights(model, reader)  # before the engine: ZeRO partitions what it is given
        start_step = meta["step"]
    elif init:
        load_initial_weights(model, init)
    engine = build_engine(model, cfg, ctx)
    if ctx.rank == 0 and cfg.precision.optimizer_moments == "bf16":
        print(moment_bytes_report(engine.basic_optimizer, torch.bfloat16), flush=True)
    runner = None
    if ctx.pp > 1:
        runner = PipelineRunner(engine, model, layout, ctx, gradient_accumulation_steps(cfg, ctx.dp),
                                t.micro_batch_size, t.seq_len, objective, t.grad_clip)
    if resume_dir:
        same_layout = meta["layout"]["world_size"] == ctx.world_size and all(
            meta["layout"][k] == getattr(ctx, k) for k in ("tp", "pp", "ep", "dp"))
        ckpt.load_optimizer_state(engine, reader, meta, ctx.rank, same_layout)  # RNG too, same layout only
        if ctx.rank == 0:
            print(f"resumed from {resume_dir} at step {start_step}", flush=True)
    return TrainParts(cfg, ctx, layout, model, engine, runner, objective, start_step, resume_dir)


def load_initial_weights(model: torch.nn.Module, path: str) -> None:
    """This rank's shard of `model` from `path`: our checkpoint (a run directory, whose latest
    step is read, or a step directory; any layout) or an HF DeepSeek directory (config.json +
    safetensors). Weights only: a post-training run starts its own optimizer."""
    if is_hf_directory(path):
        load_hf_weights(model, HFCheckpoint(path))
        return
    ckpt.load_model_weights(model, ckpt.CheckpointReader(ckpt.resolve_checkpoint(path)))
