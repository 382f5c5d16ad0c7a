"""Environment -> process group -> parallel context -> trainer; shared by every launcher."""
from __future__ import annotations

import os

import torch

from ds_parallel.config.schema import Config
from ds_parallel.parallel.groups import build_parallel_context, init_megatron_parallel_state
from ds_parallel.parallel.init import DistEnv, init_distributed, use_cuda
from ds_parallel.parallel.topology import Topology


def run(cfg: Config, env: DistEnv) -> dict:
    if not use_cuda():
        # 2 ranks on 2 cores: one intra-op thread each avoids oversubscription.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, env.world_size)))
    init_distributed(env, cfg.parallel.timeout_s)
    p = cfg.parallel
    topo = Topology(env.world_size, tp=p.tp, pp=p.pp, cp=p.cp, ep=p.ep)
    ctx = build_parallel_context(topo)
    if p.megatron_groups:
        init_megatron_parallel_state(ctx, p.timeout_s)
    from ds_parallel.train.trainer import train

    return train(cfg, ctx)
