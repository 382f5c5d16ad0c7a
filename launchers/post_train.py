"""Post-train a model: `deepspeed --num_gpus 2 launchers/post_train.py --config configs/X.yaml [key=value ...]`.

`post_train.kind` is sft, grpo, rejection_sample or pipeline (phases: pretrain, sft, grpo,
rejection_sample, each its own run directory under train.out_dir); see ds_parallel/rl/run.py. Runs under deepspeed, torchrun,
srun and mpirun like launchers/train.py. Exit status: 0 done, 1 failed, 2 bad config or a
checkpoint that fails verification (nothing loaded), 75 preempted: rerun to resume.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("DS_ACCELERATOR", "cpu" if not os.path.exists("/dev/nvidia0") else "cuda")

from launchers.train import exit_now, refuse_config, run_job  # noqa: E402  (after the path and accelerator are set)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML config with a post_train section, e.g. "
                                                        "configs/r1_zero_cpu.yaml")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.steps=50")
    args = parser.parse_args(argv)

    from ds_parallel.config import ConfigError
    from ds_parallel.parallel.init import detect_env
    from ds_parallel.rl.run import plan_phases

    env = detect_env()
    try:
        phases = plan_phases(args.config, args.overrides, env.world_size)
    except ConfigError as exc:
        return refuse_config(exc, env.world_size)

    from ds_parallel.parallel.init import init_parallel
    from ds_parallel.rl.run import run_phases

    top = os.path.dirname(phases[0].cfg.train.out_dir) if len(phases) > 1 else None  # a pipeline's summary
    return run_job(lambda: run_phases(phases, init_parallel(phases[0].cfg, env), top), env.rank)


if __name__ == "__main__":
    exit_now(main())
