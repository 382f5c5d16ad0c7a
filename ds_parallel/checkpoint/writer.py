"""Saving a training state: every rank's pieces of the parameters, their fp32 masters and
AdamW moments (gathered over data parallel, optimizer.py), persistent buffers and RNG,
into one step directory of our format (format.py; docs/architecture.md, "Checkpoints")."""
from __future__ import annotations

import json
import os
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from ds_parallel.checkpoint.format import (FORMAT_VERSION, CheckpointError, begin_checkpoint, file_digest,
                                           publish_checkpoint)
from ds_parallel.checkpoint.optimizer import full_optimizer_state, optimizer_step_count
from ds_parallel.checkpoint.weights import persistent_buffers
from ds_parallel.parallel.shard import ShardSpec, full_shape, local_shape, shards_of


def _spec_json(specs: tuple[ShardSpec, ...]) -> list[list]:
    return [[s.dim, s.index, s.count, s.group] for s in specs]


def _owns(param: torch.Tensor, ctx) -> bool:
    """One writer per distinct piece: dp rank 0 for replicated pieces, expert-dp rank 0 for
    expert-parallel pieces (those are replicated over edp only)."""
    if any(s.group == "ep" for s in shards_of(param)):
        return ctx.edp_rank == 0
    return ctx.dp_rank == 0


def save_checkpoint(run_dir: str, step: int, engine, ctx, config_dict: dict[str, Any]) -> str:
    """Collective: every rank calls it. Returns the final checkpoint directory."""
    ckpt_root = os.path.join(run_dir, "checkpoints")
    tmp = os.path.join(ckpt_root, f".tmp_step_{step}")
    if ctx.rank == 0:
        begin_checkpoint(ckpt_root, step)
    if dist.is_initialized():
        dist.barrier()

    module = engine.module
    tensors: dict[str, torch.Tensor] = {}
    header: dict[str, Any] = {}
    for name, param in module.named_parameters():
        state = full_optimizer_state(engine, param)  # collective over dp: every rank calls
        if not _owns(param, ctx):
            continue
        spec = {"full_shape": list(full_shape(param)), "shards": _spec_json(shards_of(param))}
        for key, value in state.items():
            tensors[f"{name}::{key}"] = value.detach().float().reshape(local_shape(param)).contiguous().cpu()
            header[f"{name}::{key}"] = spec
    for name, buf in persistent_buffers(module) if ctx.dp_rank == 0 else []:
        tensors[f"{name}::buffer"] = buf.detach().cpu().contiguous()
        header[f"{name}::buffer"] = {"full_shape": list(full_shape(buf)), "shards": _spec_json(shards_of(buf))}
    mine = [f"shard-{ctx.rank:05d}.safetensors", f"rng-{ctx.rank:05d}.safetensors"]
    save_file(tensors, os.path.join(tmp, mine[0]), metadata={"specs": json.dumps(header)})
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    save_file(rng, os.path.join(tmp, mine[1]))
    files = {fname: file_digest(os.path.join(tmp, fname)) for fname in mine}  # also fsyncs them
    if dist.is_initialized() and dist.get_world_size() > 1:  # also the barrier: every file is written
        per_rank: list = [None] * dist.get_world_size()
        dist.all_gather_object(per_rank, files)
        files = {k: v for d in per_rank for k, v in d.items()}

    error = [None]
    if ctx.rank == 0:
        layout = {"world_size": ctx.world_size, "tp": ctx.tp, "pp": ctx.pp, "ep": ctx.ep, "dp": ctx.dp}
        meta = {"format_version": FORMAT_VERSION, "step": step, "optimizer_step": optimizer_step_count(engine),
                "layout": layout, "config": config_dict}
        try:
            publish_checkpoint(ckpt_root, step, meta, files)
        except CheckpointError as exc:  # every rank raises it, none waits on a barrier
            error = [str(exc)]
    if dist.is_initialized():
        dist.broadcast_object_list(error, src=0)
    if error[0]:
        raise CheckpointError(error[0])
    return os.path.join(ckpt_root, f"step_{step}")


