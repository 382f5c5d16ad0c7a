"""Layout-free, atomic, pickle-free checkpoints (DESIGN invariant 7).

A checkpoint is a directory `checkpoints/step_<N>/`:

    meta.json                 step, layout, resolved config, file list
    shard-<rank>.safetensors  pieces of parameters, fp32 master weights and AdamW moments,
                              each under its global name, with its ShardSpecs in the header
    rng-<rank>.safetensors    each rank's RNG state

Every tensor is stored by global parameter name with the ShardSpecs that place it in the
full tensor, so a checkpoint saved under one (tp, ep, dp, zero) layout loads under
another: the loader rebuilds each full tensor from whatever pieces exist and cuts its own.
Optimizer moments come from DeepSpeed gathered to full (per-parameter) shape over data
parallel, whatever the ZeRO stage, via its fragment API (`deepspeed.utils.tensor_fragment`).

Writes go to a temporary directory renamed into place once every rank has finished, then
`latest` is replaced atomically: an interrupted save never damages an earlier checkpoint.
Loading uses safetensors and JSON only; nothing is unpickled.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from ds_parallel.parallel.shard import ShardSpec, full_shape, local_index, local_shape, shards_of

FORMAT_VERSION = 1
ADAM_KEYS = ("exp_avg", "exp_avg_sq")


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _spec_json(specs: tuple[ShardSpec, ...]) -> list[list]:
    return [[s.dim, s.index, s.count, s.group] for s in specs]


# ---------------------------------------------------------------- optimizer state access
# ZeRO 1/2 and DeepSpeed's bf16 optimizer keep fp32 masters in flat per-group partitions;
# each model parameter's `_hp_mapping` says which slice of which flat tensor holds which
# slice of the parameter (the mapping DeepSpeed's universal checkpoint uses). We read the
# AdamW moments through that mapping directly from the base optimizer's state, keyed by
# the flat tensor, rather than through DeepSpeed's per-fragment cache, which in 0.19.8
# stays empty for every group but the first.

def _flat_slices(param: torch.Tensor):
    """(flat fp32 partition, slice of it, slice of the flattened param) or None."""
    m = getattr(param, "_hp_mapping", None)
    if m is None:
        return None
    flat = m.hp_fragment._base if m.hp_fragment._base is not None else m.hp_fragment
    hp, lp = m.hp_fragment_address, m.lp_fragment_address
    return flat, slice(hp.start, hp.start + hp.numel), slice(lp.start, lp.start + lp.numel)


def _full_optimizer_state(engine, param: torch.Tensor) -> dict[str, torch.Tensor]:
    """fp32 master and AdamW moments of `param` at its local (TP/EP-sharded) shape,
    gathered over data parallel. Collective over the param's data-parallel group."""
    if hasattr(param, "ds_id"):  # ZeRO-3: DeepSpeed gathers its partitions for us
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        out = {"master": safe_get_full_fp32_param(param)}
        for key in ADAM_KEYS:
            out[key] = safe_get_full_optimizer_state(param, key)
        return {k: v.view(param.ds_shape) for k, v in out.items()}
    state = engine.basic_optimizer.state
    if hasattr(param, "_hp_mapping"):
        out = {}
        where = _flat_slices(param)
        for key in ("master", *ADAM_KEYS):
            buf = torch.zeros(param.numel(), dtype=torch.float32)
            if where is not None:
                flat, hp, lp = where
                src = flat if key == "master" else state[flat][key]
                buf[lp] = src[hp].float()
            dist.all_reduce(buf, group=param._dp_group)  # pieces are disjoint: the sum assembles
            out[key] = buf.view(param.shape)
        return out
    st = state.get(param, {})
    out = {"master": param.detach().float()}
    for key in ADAM_KEYS:
        out[key] = st[key] if key in st else torch.zeros_like(param, dtype=torch.float32)
    return out


def _optimizer_step_count(engine) -> int:
    for state in engine.basic_optimizer.state.values():
        if "step" in state:
            return int(state["step"])
    return 0


def _materialise_optimizer_state(engine, step: int) -> None:
    """AdamW creates its state lazily at the first step; resume needs it now: zero moments
    with the saved step count for every tensor the base optimizer owns."""
    opt = engine.basic_optimizer
    owned = [p for group in opt.param_groups for p in group["params"]]
    # ZeRO-3 swaps its flat fp32 sub-groups in and out of the base optimizer's groups.
    owned += list(getattr(engine.optimizer, "fp32_partitioned_groups_flat", []))
    dtype = getattr(opt, "moment_dtype", None)  # train/optim.py keeps moments in bf16
    for p in owned:
        if p not in opt.state or "exp_avg" not in opt.state[p]:
            opt.state[p] = {
                "step": torch.tensor(float(step)),
                "exp_avg": torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format),
            }


def _set_optimizer_state(engine, param: torch.Tensor, values: dict[str, torch.Tensor]) -> None:
    if hasattr(param, "ds_id"):
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        safe_set_full_fp32_param(param, values["master"])
        for key in ADAM_KEYS:
            safe_set_full_optimizer_state(param, values[key], key)
        return
    state = engine.basic_optimizer.state
    if hasattr(param, "_hp_mapping"):
        where = _flat_slices(param)
        if where is not None:
            flat, hp, lp = where
            for key in ("master", *ADAM_KEYS):
                dst = flat if key == "master" else state[flat][key]
                dst[hp] = values[key].flatten()[lp].to(dst.dtype)
        return
    for key in ADAM_KEYS:
        state[param][key].copy_(values[key])


# ---------------------------------------------------------------------------- saving
def _owns(param: torch.Tensor, ctx) -> bool:
    """One writer per distinct piece: dp rank 0 for replicated pieces, expert-dp rank 0 for
    expert-parallel pieces (those are replicated over edp only)."""
    if any(s.group == "ep" for s in shards_of(param)):
        return ctx.edp_rank == 0
    return ctx.dp_rank == 0


def save_checkpoint(run_dir: str, step: int, engine, ctx, config_dict: dict[str, Any]) -> str:
    """Collective: every rank calls it. Returns the final checkpoint directory."""
    ckpt_root = os.path.join(run_dir, "checkpoints")
    final = os.path.join(ckpt_root, f"step_{step}")
    tmp = os.path.join(ckpt_root, f".tmp_step_{step}")
    if ctx.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    _barrier()

    module = engine.module
    tensors: dict[str, torch.Tensor] = {}
    header: dict[str, Any] = {}
    for name, param in module.named_parameters():
        state = _full_optimizer_state(engine, param)  # collective over dp: every rank calls
        if not _owns(param, ctx):
            continue
        spec = {"full_shape": list(full_shape(param)), "shards": _spec_json(shards_of(param))}
        for key, value in state.items():
            tensors[f"{name}::{key}"] = value.detach().float().reshape(local_shape(param)).contiguous().cpu()
            header[f"{name}::{key}"] = spec
    for name, buf in module.named_buffers():
        if name.split(".")[-1] in _non_persistent(module, name) or ctx.dp_rank != 0:
            continue
        tensors[f"{name}::buffer"] = buf.detach().cpu().contiguous()
        header[f"{name}::buffer"] = {"full_shape": list(full_shape(buf)), "shards": _spec_json(shards_of(buf))}
    save_file(tensors, os.path.join(tmp, f"shard-{ctx.rank:05d}.safetensors"), metadata={"specs": json.dumps(header)})

    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    save_file(rng, os.path.join(tmp, f"rng-{ctx.rank:05d}.safetensors"))
    _barrier()

    if ctx.rank == 0:
        meta = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "optimizer_step": _optimizer_step_count(engine),
            "layout": {"world_size": ctx.world_size, "tp": ctx.tp, "pp": ctx.pp, "ep": ctx.ep, "dp": ctx.dp},
            "config": config_dict,
        }
        with open(os.path.join(tmp, "meta.json"), "w") as fh:
            json.dump(meta, fh, indent=1)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        pointer = os.path.join(ckpt_root, "latest")
        with open(pointer + ".tmp", "w") as fh:
            fh.write(f"step_{step}\n")
        os.replace(pointer + ".tmp", pointer)
    _barrier()
    return final


def _non_persistent(module: torch.nn.Module, buffer_name: str) -> set[str]:
    owner = module
    for part in buffer_name.split(".")[:-1]:
        owner = getattr(owner, part)
    return owner._non_persistent_buffers_set


# --------------------------------------------------------------------------- loading
def latest_checkpoint(run_dir: str) -> str | None:
    pointer = os.path.join(run_dir, "checkpoints", "latest")
    if not os.path.exists(pointer):
        return None
    with open(pointer) as fh:
        name = fh.read().strip()
    path = os.path.join(run_dir, "checkpoints", name)
    if not name.startswith("step_") or not os.path.isfile(os.path.join(path, "meta.json")):
        raise RuntimeError(f"checkpoint pointer {pointer} names {name!r}, which is not a complete checkpoint")
    return path


def read_meta(ckpt_dir: str) -> dict[str, Any]:
    with open(os.path.join(ckpt_dir, "meta.json")) as fh:
        meta = json.load(fh)
    if meta.get("format_version") != FORMAT_VERSION:
        raise RuntimeError(f"{ckpt_dir}: checkpoint format {meta.get('format_version')} != {FORMAT_VERSION}")
    return meta


class CheckpointReader:
    """Rebuilds full tensors from the saved pieces of any layout and cuts local pieces."""

    def __init__(self, ckpt_dir: str):
        self.dir = ckpt_dir
        self.index: dict[str, list[tuple[str, dict]]] = {}
        for fname in sorted(os.listdir(ckpt_dir)):
            if not fname.startswith("shard-"):
                continue
            path = os.path.join(ckpt_dir, fname)
            with safe_open(path, framework="pt") as f:
                header = json.loads(f.metadata()["specs"])
            for key, spec in header.items():
                self.index.setdefault(key, []).append((path, spec))

    def has(self, key: str) -> bool:
        return key in self.index

    def full(self, key: str) -> torch.Tensor:
        pieces = self.index.get(key)
        if not pieces:
            raise KeyError(f"{self.dir} has no tensor {key!r}")
        shape = tuple(pieces[0][1]["full_shape"])
        out = None
        for path, spec in pieces:
            specs = tuple(ShardSpec(*s) for s in spec["shards"])
            with safe_open(path, framework="pt") as f:
                piece = f.get_tensor(key)
            if out is None:
                out = torch.empty(shape, dtype=piece.dtype)
            out[local_index(specs, shape)] = piece
        return out

    def local(self, key: str, like: torch.Tensor) -> torch.Tensor:
        full = self.full(key)
        if tuple(full.shape) != full_shape(like):
            raise RuntimeError(f"{key}: checkpoint shape {tuple(full.shape)} != model shape {full_shape(like)}")
        return full[local_index(shards_of(like), tuple(full.shape))]

    def rng(self, rank: int) -> dict[str, torch.Tensor] | None:
        path = os.path.join(self.dir, f"rng-{rank:05d}.safetensors")
        if not os.path.exists(path):
            return None
        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}


def load_model_weights(module: torch.nn.Module, reader: CheckpointReader) -> None:
    """Before the engine exists: parameters from fp32 masters, persistent buffers as saved."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            param.copy_(reader.local(f"{name}::master", param).to(param.dtype))
        for name, buf in module.named_buffers():
            if reader.has(f"{name}::buffer"):
                buf.copy_(reader.local(f"{name}::buffer", buf))


def load_optimizer_state(engine, reader: CheckpointReader, meta: dict[str, Any], rank: int, same_layout: bool) -> None:
    """After the engine exists: AdamW moments, step count, fp32 masters, RNG."""
    _materialise_optimizer_state(engine, meta["optimizer_step"])
    with torch.no_grad():
        for name, param in engine.module.named_parameters():
            values = {key: reader.local(f"{name}::{key}", param) for key in ("master", *ADAM_KEYS)}
            _set_optimizer_state(engine, param, values)
    rng = reader.rng(rank) if same_layout else None
    if rng is not None:
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
