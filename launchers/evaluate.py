"""Evaluate a checkpoint the R1 way: `python launchers/evaluate.py (--ckpt DIR | --hf DIR) [--config X.yaml]`.

Greedy accuracy and pass@1 over post_train.eval.k samples (temperature 0.6, top-p 0.95 by
default, R1 §3.1) on the held-out prompts of post_train.prompts (ds_parallel/rl/evaluate.py),
printed as one row of the results table every post-training phase writes.

The config: --config if given, else the checkpoint's own saved config (so an arithmetic model
is asked about the digits and ops it was trained on), then key=value overrides
(post_train.prompts.*, post_train.eval.*, data.*, parallel.*). The model always comes from the
checkpoint, the layout from the parallel.* overrides alone (default: one process). --out writes the result as JSON. Layouts: `deepspeed --num_gpus N` / torchrun / srun
with parallel.tp / parallel.ep (pp = 1); prompts are split over the data-parallel ranks and the
result does not depend on the layout. Exit status: 0 done, 1 failed, 2 bad input.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("DS_ACCELERATOR", "cpu" if not os.path.exists("/dev/nvidia0") else "cuda")

from launchers.train import exit_now, refuse_config  # noqa: E402  (after the path and accelerator are set)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", help="run directory (its latest checkpoint) or checkpoints/step_<N>")
    parser.add_argument("--hf", help="Hugging Face directory (config.json, *.safetensors, tokenizer.json)")
    parser.add_argument("--config", help="YAML whose post_train.prompts / post_train.eval / data sections to use")
    parser.add_argument("--out", help="write the result here as JSON")
    parser.add_argument("--name", default=None, help="the row's name in the table (default: the checkpoint path)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. post_train.eval.k=8")
    return parser.parse_args(argv)


def prepare(args, world_size: int):
    """(source, config, tokenizer), all checked before any process group starts."""
    from ds_parallel.checkpoint.format import read_meta
    from ds_parallel.config import ConfigError
    from ds_parallel.config.load import config_from_dict, merge_trees, parse_overrides, read_yaml
    from ds_parallel.config.validate import validate
    from ds_parallel.inference.load import open_source, policy_tokenizer
    from ds_parallel.rl.evaluate import check_eval

    if (args.ckpt is None) == (args.hf is None):
        raise ConfigError("give exactly one of --ckpt (a run or step directory of ours) and --hf (an HF directory)")
    try:
        source = open_source(args.ckpt, args.hf)
    except (ValueError, FileNotFoundError) as exc:
        raise ConfigError(f"{'--ckpt' if args.ckpt else '--hf'}: {exc}") from None
    base = read_yaml(args.config) if args.config else (read_meta(source.path)["config"] if source.kind == "ckpt" else {})
    # The layout is the command line's alone (parallel.* overrides), not the training run's.
    tree = merge_trees({k: v for k, v in base.items() if k in ("data", "post_train", "train")},
                       parse_overrides(list(args.overrides)))
    m = source.model_cfg
    tree["model"] = dataclasses.asdict(m)
    tree["train"] = {"seed": tree.get("train", {}).get("seed", 1234), "seq_len": min(64, m.max_seq_len),
                     "grad_clip": 0.0}  # nothing is trained: the training-only rules are made to pass
    tree.setdefault("parallel", {})["megatron_groups"] = False
    cfg = config_from_dict(tree)
    validate(cfg, None, purpose="plan")
    p = cfg.parallel
    if p.pp != 1:
        raise ConfigError(f"parallel.pp={p.pp}: evaluation needs the whole model on each rank: use parallel.tp / "
                          f"parallel.ep and set parallel.pp=1")
    if world_size % p.tp or (world_size // p.tp) % p.ep:
        raise ConfigError(f"world size {world_size} does not fit parallel.tp={p.tp} x parallel.ep={p.ep}: launch a "
                          f"multiple of tp whose quotient ep divides")
    try:
        check_eval(cfg.post_train.eval)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    try:
        tokenizer = policy_tokenizer(args.ckpt or args.hf, cfg.post_train.prompts, "evaluation")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return source, cfg, tokenizer


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    from ds_parallel.checkpoint import CheckpointError
    from ds_parallel.config import ConfigError
    from ds_parallel.parallel.init import detect_env

    env = detect_env()
    try:
        source, cfg, tokenizer = prepare(args, env.world_size)
    except (ConfigError, CheckpointError, ValueError) as exc:
        return refuse_config(exc, env.world_size)

    from ds_parallel.atomic import write_atomic
    from ds_parallel.inference.load import load_source
    from ds_parallel.parallel.init import init_parallel, report_failure
    from ds_parallel.rl.evaluate import evaluate_heldout, results_table

    try:
        ctx = init_parallel(cfg, env)
        model = load_source(source, ctx=ctx).model
        result = evaluate_heldout(model, tokenizer, cfg, ctx)
    except ValueError as exc:
        print(f"evaluate: error: {exc}", file=sys.stderr, flush=True)
        return 2
    except Exception as exc:  # one line on every rank; the traceback above it for debugging
        return report_failure(f"rank {env.rank}", exc)
    if env.rank == 0:
        e = cfg.post_train.eval
        print(f"held-out prompts: {result.n_prompts} ({cfg.post_train.prompts.source}); pass@1 over k={e.k} samples "
              f"at temperature {e.temperature}, top-p {e.top_p}")
        print(results_table([(args.name or source.path, result.as_dict())]), flush=True)
        if args.out:
            write_atomic(args.out, json.dumps({"source": source.path, **result.as_dict()}, indent=1))
    return 0


if __name__ == "__main__":
    exit_now(main())
