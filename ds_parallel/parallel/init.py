"""Who am I? Rank, world and local rank from whichever launcher started us, then the
default process group, then the parallel context: `init_parallel` is the one launch
sequence every entry point that starts processes calls (training today; generation and
post-training reuse it).

Launchers, in the order they are recognised:
- torchrun / `deepspeed` launcher: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT
- Slurm `srun`: SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; master = first host of the
  job's node list unless MASTER_ADDR is set
- MPI (`mpirun`, `srun --mpi=pmix` without Slurm task variables): mpi4py's COMM_WORLD; rank
  0 picks the master address and a free port and broadcasts them
- none of these: a single process
"""
from __future__ import annotations

import datetime
import os
import socket
import subprocess
import sys
import traceback
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ds_parallel.config.schema import Config
from ds_parallel.parallel.groups import ParallelContext, build_parallel_context, init_megatron_parallel_state
from ds_parallel.parallel.topology import Topology

_MPI_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "MPI_LOCALRANKID")


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun", "slurm", "mpi" or "single"
    local_world_size: int = 0  # ranks on this node; 0 = unknown (taken as world_size)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def _first_slurm_host(nodelist: str) -> str:
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30)
        if out.returncode == 0 and out.stdout.split():
            return out.stdout.split()[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    # Fallback for simple lists ("node1,node2" or "node1"); bracket ranges need scontrol.
    return nodelist.split(",")[0].split("[")[0]


def detect_env(environ: dict[str, str] | None = None) -> DistEnv:
    env = os.environ if environ is None else environ
    default_port = int(env.get("MASTER_PORT", 29500))
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=default_port,
            launcher="torchrun",
            local_world_size=int(env.get("LOCAL_WORLD_SIZE", 0)),
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        master = env.get("MASTER_ADDR") or _first_slurm_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1"))
        return DistEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            master_addr=master,
            master_port=default_port,
            launcher="slurm",
            # "2" or "2(x3)": tasks on each node of a homogeneous job
            local_world_size=int(env.get("SLURM_NTASKS_PER_NODE", env.get("SLURM_TASKS_PER_NODE", "0"))
                                 .split("(")[0].split(",")[0] or 0),
        )
    if any(v in env for v in _MPI_RANK_VARS):
        from mpi4py import MPI  # only imported when an MPI launcher started us

        comm = MPI.COMM_WORLD
        rank, world = comm.Get_rank(), comm.Get_size()
        addr = env.get("MASTER_ADDR") or socket.gethostname()
        port = int(env["MASTER_PORT"]) if "MASTER_PORT" in env else _free_port()
        addr, port = comm.bcast((addr, port) if rank == 0 else None, root=0)
        node = comm.Split_type(MPI.COMM_TYPE_SHARED)
        return DistEnv(rank, world, node.Get_rank(), addr, port, "mpi", node.Get_size())
    return DistEnv(0, 1, 0, "127.0.0.1", default_port, "single")


def _disable_deepspeed_cpu_shm() -> None:
    """DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce (~110 s on 2 cores)
    the first time its comm backend starts. Collectives here go through gloo anyway, so mark
    the op incompatible before DeepSpeed probes for it."""
    try:
        import deepspeed.ops as ds_ops
    except ImportError:
        return
    ds_ops.__compatible_ops__["deepspeed_shm_comm"] = False


def use_cuda() -> bool:
    """Train on CUDA where it exists, unless DeepSpeed's accelerator is set to the CPU
    (DS_ACCELERATOR=cpu, as `make smoke` does): the engine and our tensors must agree."""
    return torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu"


def init_distributed(env: DistEnv, timeout_s: float, backend: str | None = None) -> None:
    """Start the default process group. A single process gets a world of one, so DeepSpeed
    and the collectives see the same code path at every scale. NCCL (one CUDA device per
    local rank) or gloo (CPU) decides `ParallelContext.device`."""
    if backend is None:
        backend = "nccl" if use_cuda() else "gloo"
    if backend == "gloo":
        _disable_deepspeed_cpu_shm()
    if dist.is_initialized():
        return
    if env.launcher == "single":
        env = DistEnv(0, 1, 0, "127.0.0.1", _free_port(), "single")
    if backend == "nccl":
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
    os.environ.setdefault("MASTER_ADDR", env.master_addr)
    os.environ.setdefault("MASTER_PORT", str(env.master_port))
    # DeepSpeed's engine insists on LOCAL_RANK, which srun and mpirun do not set: publish
    # what detect_env found in the names torchrun uses.
    os.environ.setdefault("RANK", str(env.rank))
    os.environ.setdefault("WORLD_SIZE", str(env.world_size))
    os.environ.setdefault("LOCAL_RANK", str(env.local_rank))
    dist.init_process_group(
        backend=backend,
        init_method=f"tcp://{env.master_addr}:{env.master_port}",
        rank=env.rank,
        world_size=env.world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )


def intra_op_threads(env: DistEnv, override: int = 0) -> int:
    """A CPU rank's intra-op threads: `override` (parallel.threads) if set; else the cores it
    owns: all of its CPU affinity when the launcher pinned it to fewer than the machine's
    cores, otherwise the machine's cores shared by the ranks on this node (more threads than
    cores make the ranks' threads preempt each other inside every parallel op)."""
    if override > 0:
        return override
    total = os.cpu_count() or 1
    owned = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else total
    if owned < total:
        return max(1, owned)
    return max(1, total // max(1, env.local_world_size or env.world_size))


# glibc mallopt parameters (malloc.h)
_M_TOP_PAD, _M_MMAP_THRESHOLD = -2, -3
_MMAP_THRESHOLD_MAX = 32 << 20  # glibc's ceiling on 64-bit (HEAP_MAX_SIZE / 2)


def keep_freed_memory(mib: int) -> bool:
    """Make glibc's malloc keep up to `mib` MiB of freed memory at the top of its heap, and
    serve blocks up to 32 MiB from the heap rather than from fresh mmaps (mallopt M_TOP_PAD,
    M_MMAP_THRESHOLD). torch's CPU tensors come from malloc: with glibc's defaults a training
    step's activations are returned to the OS as backward frees them and page-faulted back
    in by the next forward (the kernel zeroes every page again); on GPUs torch's caching
    allocator keeps them. Measured on the debug_v3 training step of benchmarks/train_step.py
    (fp32, 1 thread, ~100 ms): 2,300-3,000 page faults and 6-8 ms of system time per step
    before, under 10 faults and no system time after. The process keeps at most the memory
    its peak already touched. Returns False (nothing changed) where malloc is not glibc's or
    `mib` is 0. Process-wide: call it once, at launch."""
    if mib <= 0:
        return False
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl without mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and bool(mallopt(_M_TOP_PAD, mib << 20))


def init_parallel(cfg: Config, env: DistEnv) -> ParallelContext:
    """Launch: intra-op threads -> default process group -> every parallel group ->
    megatron-core's `parallel_state` when `parallel.megatron_groups` asks for it. DeepSpeed's
    expert-group registry is filled by `build_engine` (train/engine.py), right before the
    engine that reads it. `cfg` was validated for `env.world_size` (launchers/train.py)."""
    p = cfg.parallel
    if not use_cuda():
        torch.set_num_threads(intra_op_threads(env, p.threads))
        keep_freed_memory(p.cpu_malloc_keep_mib)
    init_distributed(env, p.timeout_s)
    ctx = build_parallel_context(Topology(env.world_size, tp=p.tp, pp=p.pp, cp=p.cp, ep=p.ep))
    if p.megatron_groups:
        init_megatron_parallel_state(ctx, p.timeout_s)
    return ctx


def report_failure(who: str, exc: BaseException) -> int:
    """A launcher's last word on an unexpected exception: the traceback for debugging, then
    one line naming `who` (a rank, a tool) and the error. Returns the exit status, 1."""
    traceback.print_exc()
    first = str(exc).splitlines()[0] if str(exc) else ""
    print(f"{who} failed: {type(exc).__name__}: {first}", file=sys.stderr, flush=True)
    return 1
