"""A model's weights <-> our checkpoint, without a DeepSpeed engine: what generation,
post-training and the converter need (docs/architecture.md, "Checkpoints").

`load_model` builds a model of any layout (tp/ep through the parallel context, pipeline
stages through a PipelineLayout) from a run directory or one of its step directories, saved
under any layout: each rank allocates only its own part and reads only that from the fp32
masters. `save_model` writes a one-process model as step 0 of a run directory, so that
`launchers/train.py` resumes from it.
"""
from __future__ import annotations

import contextlib
import json
import os
from typing import Iterator, Optional

import torch
from torch import nn

from ds_parallel.atomic import write_atomic
from ds_parallel.checkpoint.format import (ADAM_KEYS, FORMAT_VERSION, begin_checkpoint, latest_checkpoint,
                                           publish_checkpoint, read_meta)
from ds_parallel.checkpoint.reader import CheckpointReader
from ds_parallel.checkpoint.stream import TensorItem, write_safetensors
from ds_parallel.config.load import config_from_dict, dump_yaml, to_dict
from ds_parallel.config.schema import Config, ModelConfig, TrainConfig
from ds_parallel.model import Transformer, construct_model
from ds_parallel.parallel.groups import ParallelContext


def persistent_buffers(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The buffers a checkpoint holds (the router bias), not the derived ones (RoPE tables)."""
    for name, buf in module.named_buffers():
        owner_name, _, leaf = name.rpartition(".")
        if leaf not in module.get_submodule(owner_name)._non_persistent_buffers_set:
            yield name, buf


def load_model_weights(module: nn.Module, reader: CheckpointReader) -> None:
    """Parameters from the fp32 masters, persistent buffers as saved (for training: before
    the engine exists)."""
    params = dict(module.named_parameters())
    buffers = {name: buf for name, buf in module.named_buffers() if reader.has(f"{name}::buffer")}
    reader.check({**{f"{n}::master": p for n, p in params.items()}, **{f"{n}::buffer": b for n, b in buffers.items()}})
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(reader.local(f"{name}::master", param).to(param.dtype))
        for name, buf in buffers.items():
            buf.copy_(reader.local(f"{name}::buffer", buf))


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_uninitialised(cfg: ModelConfig, ctx: ParallelContext, dtype: torch.dtype, layout=None) -> Transformer:
    """This rank's part (model.construct_model) allocated directly in `dtype`, no fp32 copy of
    a bf16 model; the router bias and the RoPE table pick their own dtypes. For loaders,
    which overwrite every weight."""
    with _default_dtype(dtype):
        model = construct_model(cfg, ctx, layout)
    return model.to(dtype)


def resolve_checkpoint(path: str) -> str:
    """The step directory `path` names: itself (it holds meta.json), or a run directory's
    verified `latest`. FileNotFoundError naming the path otherwise."""
    step_dir = path if os.path.isfile(os.path.join(path, "meta.json")) else latest_checkpoint(path)
    if step_dir is None:
        raise FileNotFoundError(f"{path}: neither a checkpoint (meta.json) nor a run directory with checkpoints/latest")
    return step_dir


def saved_model_config(step_dir: str) -> ModelConfig:
    """The model a checkpoint holds, from its meta.json. Only the model section: runs saved
    by older versions may hold since-removed train keys."""
    return config_from_dict({"model": read_meta(step_dir)["config"]["model"]}).model


def load_model(path: str, dtype: torch.dtype = torch.float32, ctx: Optional[ParallelContext] = None,
               layout=None) -> Transformer:
    """A model (eval mode) from one of our checkpoints: a `step_<N>` directory, or a run
    directory (its verified `latest`), saved under any layout. With a parallel `ctx` (and a
    PipelineLayout), each rank builds and reads only its own part."""
    step_dir = resolve_checkpoint(path)
    model = build_uninitialised(saved_model_config(step_dir), ctx or ParallelContext.single(), dtype, layout)
    load_model_weights(model, CheckpointReader(step_dir))
    return model.eval()


def save_model(model: Transformer, out_dir: str, config: Optional[Config] = None) -> str:
    """Write a one-process `model` as step 0 of run directory `out_dir` (fp32
    `<name>::master` weights, zero AdamW moments, persistent buffers, meta.json, `latest`,
    config.yaml), so `launchers/train.py` with train.out_dir=out_dir resumes from it.
    Returns the checkpoint directory."""
    if model.ctx.world_size != 1:
        raise ValueError("save_model writes single-process checkpoints; parallel runs save with "
                         "checkpoint.save_checkpoint")
    config = config or Config(model=model.cfg, train=TrainConfig(
        out_dir=out_dir, seq_len=min(TrainConfig.seq_len, model.cfg.max_seq_len)))
    root = os.path.join(out_dir, "checkpoints")
    tmp = begin_checkpoint(root, 0)
    items, specs = [], {}
    for name, t in [*model.named_parameters(), *persistent_buffers(model)]:
        shape = tuple(t.shape)
        spec = {"full_shape": list(shape), "shards": []}
        if isinstance(t, nn.Parameter):
            items.append(TensorItem(f"{name}::master", shape, torch.float32, lambda t=t: t.detach().float()))
            for key in ADAM_KEYS:
                items.append(TensorItem(f"{name}::{key}", shape, torch.float32, lambda s=shape: torch.zeros(s)))
            keys = ("master", *ADAM_KEYS)
        else:
            items.append(TensorItem(f"{name}::buffer", shape, t.dtype, lambda t=t: t.detach()))
            keys = ("buffer",)
        specs.update({f"{name}::{key}": spec for key in keys})
    write_safetensors(os.path.join(tmp, "shard-00000.safetensors"), items, {"specs": json.dumps(specs)})
    meta = {
        "format_version": FORMAT_VERSION, "step": 0, "optimizer_step": 0,
        "layout": {"world_size": 1, "tp": 1, "pp": 1, "ep": 1, "dp": 1}, "config": to_dict(config),
    }
    final = publish_checkpoint(root, 0, meta)  # meta.json with the file list, fsyncs, renames, latest
    write_atomic(os.path.join(out_dir, "config.yaml"), dump_yaml(config))
    return final
