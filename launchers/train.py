"""Train a DeepSeek-family model: `deepspeed --num_gpus 2 launchers/train.py [--config X.yaml] [key=value ...]`.

Also runs under torchrun, srun and mpirun (rank and world from the environment). Without
--config it trains the embedded default, configs/smoke_cpu.yaml. Exit status: 0 done,
1 failed, 2 bad config or a checkpoint that fails verification (nothing loaded),
75 (EX_TEMPFAIL) preempted after checkpointing: rerun to resume.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("DS_ACCELERATOR", "cpu" if not os.path.exists("/dev/nvidia0") else "cuda")

# Seconds a rank with a bad config waits before exiting in a multi-rank job: ranks reach the
# check a few seconds apart (importing torch dominates), and launchers stop the rest at once.
PEER_GRACE_S = 5.0
DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "smoke_cpu.yaml")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help=f"YAML config (default: {os.path.relpath(DEFAULT_CONFIG)})")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.steps=50")
    args = parser.parse_args(argv)

    from ds_parallel.config import ConfigError, load_config
    from ds_parallel.parallel.init import detect_env
    from ds_parallel.parallel.plan import check_memory

    env = detect_env()
    try:
        cfg = load_config(args.config or DEFAULT_CONFIG, args.overrides, world_size=env.world_size)
        check_memory(cfg, env.world_size, env.local_rank)  # a layout that cannot fit fails here, not in an OOM
    except ConfigError as exc:
        return refuse_config(exc, env.world_size)

    from ds_parallel.parallel.init import init_parallel
    from ds_parallel.train.trainer import train

    return run_job(lambda: train(cfg, init_parallel(cfg, env)), env.rank)


def refuse_config(exc: Exception, world_size: int) -> int:
    """A bad config's one line, and exit status 2, before any process group exists."""
    print(f"config error: {exc}", file=sys.stderr, flush=True)
    if world_size > 1:  # the deepspeed launcher kills every rank at the first exit: let peers print theirs
        time.sleep(PEER_GRACE_S)
    return 2


def run_job(job, rank: int) -> int:
    """The exit status of a training job (`job()` returns its summary): 0 done, 2 a
    checkpoint refused before anything was loaded, 1 any other failure (one line on every
    rank, the traceback above it), 75 preempted after checkpointing (the job script requeues)."""
    from ds_parallel.checkpoint import CheckpointError
    from ds_parallel.parallel.init import report_failure
    from ds_parallel.train.trainer import EXIT_PREEMPTED

    try:
        summary = job()
    except CheckpointError as exc:  # refused before loading anything: like a bad config
        print(f"checkpoint error: {exc}", file=sys.stderr, flush=True)
        return 2
    except Exception as exc:
        return report_failure(f"rank {rank}", exc)
    return EXIT_PREEMPTED if summary.get("preempted") else 0


def exit_now(code: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown: a peer that died can leave gloo threads that hang exit.
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
