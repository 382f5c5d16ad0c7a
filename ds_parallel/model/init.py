"""Layout-independent initialisation (docs/architecture.md, invariant 3).

Every parameter is drawn as its FULL tensor from generators seeded by (seed, name), then
this rank keeps its piece (`shard.local_slice`). A tp=1 and a tp=8 run with the same seed
therefore start from the same model, bit for bit, and no draw depends on the order in
which parameters happen to be visited.

    weights        N(0, cfg.init_std)   (DeepSeek LLM / V3: std 0.006)
    init_constant  a parameter attribute (RMSNorm gains: 1.0) fills it with that value

Expert weights (`param.init_per_expert = True`, dim 0 = experts) are drawn one expert at a
time, seeded by (seed, name, global expert id): expert e gets the same weights whatever
expert-parallel degree places it, and the full (n_experts, ...) tensor is never built.
"""
from __future__ import annotations

import hashlib
import math

import torch
from torch import nn

from ds_parallel.parallel.shard import ShardSpec, full_shape, local_slice, shards_of


def _draw(shape: tuple[int, ...], std: float, seed: int, key: str) -> torch.Tensor:
    """N(0, std^2) of `shape`, a pure function of (seed, key).

    torch's CPU generator (mt19937) keeps only the low 32 bits of a seed, so one stream per
    key would collide with probability ~n^2/2^33 over n keys (about 1/4 for V3's ~47k
    expert tensors). Two streams from independent 32-bit halves of a stable 64-bit hash,
    summed and rescaled, are still exactly N(0, std^2) and collide only if both halves do.
    (Python's hash() is salted per process, hence blake2b.)"""
    digest = hashlib.blake2b(f"{seed}/{key}".encode(), digest_size=8).digest()
    z = torch.zeros(shape, dtype=torch.float32)
    for half in (digest[:4], digest[4:]):
        g = torch.Generator().manual_seed(int.from_bytes(half, "little"))
        z += torch.randn(shape, dtype=torch.float32, generator=g)
    return z * (std / math.sqrt(2.0))


@torch.no_grad()
def _init_per_expert(param: torch.Tensor, name: str, std: float, seed: int) -> None:
    specs = shards_of(param)
    assert all(s.group == "ep" for s in specs if s.dim == 0), f"{name}: dim 0 of an expert weight may only be split by ep"
    ep = next((s for s in specs if s.dim == 0), None)
    # The other splits (e.g. tp inside an expert) act on one expert's tensor, one dim lower.
    inner = tuple(ShardSpec(s.dim - 1, s.index, s.count, s.group) for s in specs if s.dim != 0)
    expert_shape = full_shape(param)[1:]
    n_local = param.shape[0]
    for i in range(n_local):
        e = (ep.index * n_local if ep else 0) + i  # global expert id
        param[i].copy_(local_slice(_draw(expert_shape, std, seed, f"{name}#expert{e}"), inner))


@torch.no_grad()
def init_weights(model: nn.Module, seed: int, std: float | None = None) -> nn.Module:
    """Initialise `model` in place from `seed`; the result depends only on the parameter
    names, full shapes and seed, never on the parallel layout. std defaults to
    `model.cfg.init_std`."""
    std = model.cfg.init_std if std is None else std
    for name, param in model.named_parameters():
        if hasattr(param, "init_constant"):
            param.fill_(param.init_constant)
        elif getattr(param, "init_per_expert", False):
            _init_per_expert(param, name, std, seed)
        else:
            param.copy_(local_slice(_draw(full_shape(param), std, seed, name), shards_of(param)))
    return model
