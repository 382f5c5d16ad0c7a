"""How a local parameter relates to its full, layout-free tensor.

Every parameter that is split across ranks carries a `ShardSpec` list in `param.shards`:
each entry says "dimension `dim` of the full tensor is cut into `count` equal pieces along
the `group` axis and this rank holds piece `index`". Replicated parameters carry none.
Initialisation (`model/init.py`), checkpoints (`checkpoint/`) and parity tests
all go through this one description, which is what makes them layout-independent
(docs/architecture.md, invariants 3 and 7).

Tensor-parallel shards also get Megatron's `tensor_model_parallel = True` so DeepSpeed's
gradient-norm code counts them once per shard rather than once per rank.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ShardSpec:
    dim: int  # dimension of the full tensor that is split
    index: int  # which piece this rank holds
    count: int  # number of equal pieces
    group: str  # context group attribute the pieces live on: "tp" or "ep"


def set_shards(param: torch.Tensor, *specs: ShardSpec) -> torch.Tensor:
    specs = tuple(s for s in specs if s.count > 1)
    param.shards = specs
    if any(s.group == "tp" for s in specs):
        param.tensor_model_parallel = True
        param.partition_dim = next(s.dim for s in specs if s.group == "tp")
    return param


def shards_of(param: torch.Tensor) -> tuple[ShardSpec, ...]:
    return getattr(param, "shards", ())


def local_shape(param: torch.Tensor) -> tuple[int, ...]:
    """This rank's shape of `param`; under ZeRO-3 the tensor itself is an empty stub and
    DeepSpeed keeps the real shape in `ds_shape`."""
    return tuple(getattr(param, "ds_shape", param.shape))


def full_shape(param: torch.Tensor) -> tuple[int, ...]:
    shape = list(local_shape(param))
    for spec in shards_of(param):
        shape[spec.dim] *= spec.count
    return tuple(shape)


def local_slice(full: torch.Tensor, specs: tuple[ShardSpec, ...]) -> torch.Tensor:
    """This rank's piece of a full tensor."""
    out = full
    for spec in specs:
        out = out.chunk(spec.count, dim=spec.dim)[spec.index]
    return out


def local_index(specs: tuple[ShardSpec, ...], shape: tuple[int, ...]) -> tuple[slice, ...]:
    """Index into the full tensor (shape = full shape) selecting this rank's piece."""
    index = [slice(None)] * len(shape)
    for spec in specs:
        size = shape[spec.dim] // spec.count
        index[spec.dim] = slice(spec.index * size, (spec.index + 1) * size)
    return tuple(index)


def gather_full(tensor: torch.Tensor, specs: tuple[ShardSpec, ...], ctx) -> torch.Tensor:
    """All-gather a sharded tensor (a parameter, its gradient or optimizer state) back to
    full shape on every rank of its groups. Collective over each spec's group."""
    out = tensor.detach()
    for spec in reversed(specs):
        group = getattr(ctx, f"{spec.group}_group")
        pieces = [torch.empty_like(out) for _ in range(spec.count)]
        dist.all_gather(pieces, out.contiguous(), group=group)
        out = torch.cat(pieces, dim=spec.dim)
    return out
