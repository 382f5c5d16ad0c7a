"""DeepSpeed's optimizer state <-> full per-parameter tensors: the fp32 master and AdamW
moments of each parameter at its (TP/EP-sharded) local shape, whatever the ZeRO stage.

ZeRO 1/2 and DeepSpeed's bf16 optimizer keep fp32 masters in flat per-group partitions;
each model parameter's `_hp_mapping` says which slice of which flat tensor holds which
slice of the parameter (the mapping DeepSpeed's universal checkpoint uses). We read the
AdamW moments through that mapping directly from the base optimizer's state, keyed by the
flat tensor, rather than through DeepSpeed's per-fragment cache, which in 0.19.8 stays
empty for every group but the first. ZeRO-3 gathers through `deepspeed.utils`'
safe_get/set_full_* helpers.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from ds_parallel.checkpoint.format import ADAM_KEYS
from ds_parallel.checkpoint.reader import CheckpointReader


def _flat_slices(param: torch.Tensor):
    """(flat fp32 partition, slice of it, slice of the flattened param) or None."""
    m = getattr(param, "_hp_mapping", None)
    if m is None:
        return None
    flat = m.hp_fragment._base if m.hp_fragment._base is not None else m.hp_fragment
    hp, lp = m.hp_fragment_address, m.lp_fragment_address
    return flat, slice(hp.start, hp.start + hp.numel), slice(lp.start, lp.start + lp.numel)


def full_optimizer_state(engine, param: torch.Tensor) -> dict[str, torch.Tensor]:
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
            # On the param's device: NCCL reduces only CUDA tensors (saved via .cpu()).
            buf = torch.zeros(param.numel(), dtype=torch.float32, device=param.device)
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


def optimizer_step_count(engine) -> int:
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
                dst[hp] = values[key].flatten()[lp].to(device=dst.device, dtype=dst.dtype)
        return
    for key in ADAM_KEYS:
        state[param][key].copy_(values[key])


def load_optimizer_state(engine, reader: CheckpointReader, meta: dict[str, Any], rank: int, same_layout: bool) -> None:
    """After the engine exists: AdamW moments, step count, fp32 masters, RNG."""
    params = dict(engine.module.named_parameters())
    reader.check({f"{name}::{key}": p for name, p in params.items() for key in ("master", *ADAM_KEYS)})
    _materialise_optimizer_state(engine, meta["optimizer_step"])
    with torch.no_grad():
        for name, param in params.items():
            values = {key: reader.local(f"{name}::{key}", param) for key in ("master", *ADAM_KEYS)}
            _set_optimizer_state(engine, param, values)
    rng = reader.rng(rank) if same_layout else None
    if rng is not None:
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
