"""Spawning gloo process groups inside pytest.

`run_dist(fn, world_size, *args)` starts `world_size` processes with a file-based
rendezvous (no port races), runs `fn(rank, world_size, *args)` in each, and re-raises a
child's exception with its traceback in the parent. Put several checks in one `fn`: each
spawn of 2 processes costs ~9 s on 2 cores. `num_threads(n)`: torch's intra-op threads set
to n inside a block (conftest.py gives each xdist worker its share of the cores).
"""
from __future__ import annotations

import datetime
import os
import tempfile
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


@contextmanager
def num_threads(n: int):
    """torch's intra-op threads set to `n` inside, restored after."""
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def _entry(rank: int, world_size: int, init_file: str, fn, args) -> None:
    from ds_parallel.parallel.init import _disable_deepspeed_cpu_shm

    _disable_deepspeed_cpu_shm()
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
        timeout=datetime.timedelta(seconds=120),
    )
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def run_dist(fn, world_size: int, *args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_entry, args=(world_size, os.path.join(tmp, "rdzv"), fn, args), nprocs=world_size, join=True)
