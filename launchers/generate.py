"""Generate completions: `python launchers/generate.py (--ckpt DIR | --hf DIR) --prompts IN.jsonl --out OUT.jsonl`.

--ckpt: one of our run directories (its latest checkpoint) or a step directory; --hf: an HF
DeepSeek-V2/V3 directory.

Each input line is {"prompt": "text"} (needs a tokenizer, inference/load.py) or
{"prompt_ids": [ids]}; each output line, in input order: prompt_ids, completion_ids,
completion (text, with a tokenizer), logprobs (log-probabilities of the completion under the
raw model) and finish_reason ("stop": the tokenizer's EOS; "length": --max-new-tokens).
--temperature 0 is greedy; --speculative mtp drafts with every MTP depth of the model
(greedy output unchanged, sampled output identically distributed: inference/engine.py).

Layouts: `deepspeed --num_gpus N` / torchrun / srun with parallel.tp=... parallel.ep=...
overrides (pp must be 1: every rank holds the whole model or its tp/ep shard). Prompts are
split over the data-parallel ranks and gathered to rank 0, which writes --out atomically.
Each prompt samples from its own seed (--seed and its place in the file), so the output does not
depend on the layout. bf16 on CUDA, fp32 on the CPU (--dtype overrides). Exit status: 0
done, 1 failed, 2 bad input (reported before any process group starts where possible).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("DS_ACCELERATOR", "cpu" if not os.path.exists("/dev/nvidia0") else "cuda")

PEER_GRACE_S = 5.0  # as launchers/train.py: let every rank print its error before the launcher stops them
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", help="run directory (its latest checkpoint) or checkpoints/step_<N>")
    parser.add_argument("--hf", help="Hugging Face DeepSeek-V2/V3 directory (config.json, *.safetensors)")
    parser.add_argument("--prompts", required=True, help='JSONL input: {"prompt": "..."} or {"prompt_ids": [...]}')
    parser.add_argument("--out", required=True, help="JSONL output, one line per prompt in input order")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0, help="0: off")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--speculative", choices=["mtp"], default=None, help="draft with the model's MTP depths")
    parser.add_argument("--max-batch", type=int, default=16, help="sequences decoded at once per rank")
    parser.add_argument("--dtype", choices=["auto", *DTYPES], default="auto", help="auto: bf16 on CUDA, else fp32")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="parallel.* overrides, e.g. parallel.tp=2 parallel.ep=2")
    return parser.parse_args(argv)


def layout_config(source, overrides: list[str], world_size: int):
    """A Config of the checkpoint's model and the parallel.* overrides, validated for this
    world (the training-only rules are filled so that they pass). ConfigError otherwise."""
    from ds_parallel.config import ConfigError
    from ds_parallel.config.load import config_from_dict, parse_overrides
    from ds_parallel.config.validate import validate

    tree = parse_overrides(overrides)
    other = sorted(set(tree) - {"parallel"})
    if other:
        raise ConfigError(f"override section {other[0]!r}: generate takes parallel.* overrides only (the model "
                          f"comes from the checkpoint), e.g. parallel.tp=2")
    m = source.model_cfg
    cfg = config_from_dict({"model": dataclasses.asdict(m),
                            "parallel": {"megatron_groups": False, **tree.get("parallel", {})},
                            # Training-only rules made to pass: no sequence is trained, no gradient clipped.
                            "train": {"seq_len": min(64, m.max_seq_len), "grad_clip": 0.0}})
    validate(cfg, None, purpose="plan")
    p = cfg.parallel
    if p.pp != 1:
        raise ConfigError(f"parallel.pp={p.pp}: generation needs the whole model on each rank: use parallel.tp / "
                          f"parallel.ep and set parallel.pp=1")
    if world_size % p.tp:
        raise ConfigError(f"world size {world_size} is not divisible by parallel.tp={p.tp}: launch a multiple of "
                          f"{p.tp} processes")
    if (world_size // p.tp) % p.ep:
        raise ConfigError(f"parallel.ep={p.ep} must divide the data-parallel degree {world_size // p.tp}")
    return cfg


def read_prompts(path: str, tokenizer, vocab_size: int) -> list[list[int]]:
    """Token ids of every line of `path` (blank lines skipped). ValueError naming the line
    and the field."""
    prompts = []
    with open(path) as fh:
        for n, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"--prompts {path} line {n}"
            try:
                item = json.loads(line)
            except ValueError as exc:
                raise ValueError(f"{where} is not valid JSON ({exc}): write one JSON object per line") from None
            if not isinstance(item, dict) or ("prompt" in item) == ("prompt_ids" in item):
                raise ValueError(f"{where}: give exactly one of \"prompt\" (text) and \"prompt_ids\" (token ids)")
            if "prompt" in item:
                if tokenizer is None:
                    raise ValueError(f"{where}: \"prompt\" is text but the checkpoint has no tokenizer: give "
                                     f"\"prompt_ids\" instead")
                if not isinstance(item["prompt"], str):
                    raise ValueError(f"{where}: \"prompt\" must be a string")
                try:
                    ids = tokenizer.encode(item["prompt"])
                except ValueError as exc:  # e.g. a character outside the arithmetic vocabulary
                    raise ValueError(f"{where}: \"prompt\": {exc}") from None
            else:
                ids = item["prompt_ids"]
                if not isinstance(ids, list) or not all(type(i) is int and 0 <= i < vocab_size for i in ids):
                    raise ValueError(f"{where}: \"prompt_ids\" must be a list of token ids in [0, {vocab_size})")
            if not ids:
                raise ValueError(f"{where}: the prompt is empty: give at least one token")
            prompts.append(ids)
    if not prompts:
        raise ValueError(f"--prompts {path!r} holds no prompts: write one JSON object per line")
    return prompts


def check_lengths(prompts: list[list[int]], max_new: int, drafts: int, max_seq_len: int, path: str) -> None:
    for i, ids in enumerate(prompts):
        if len(ids) + max_new + drafts > max_seq_len:
            extra = f" + {drafts} drafts" if drafts else ""
            raise ValueError(f"--prompts {path} prompt {i + 1}: {len(ids)} tokens + --max-new-tokens {max_new}{extra} "
                             f"exceed model.max_seq_len={max_seq_len}: lower --max-new-tokens or shorten the prompt")


def prepare(args, world_size: int):
    """Everything checkable before a process group: (source, config, prompts, params, drafts)."""
    from ds_parallel.inference import SamplingParams
    from ds_parallel.inference.load import open_source

    if (args.ckpt is None) == (args.hf is None):
        raise ValueError("give exactly one of --ckpt (a run or step directory of ours) and --hf (an HF directory)")
    if not os.path.isfile(args.prompts):
        raise ValueError(f"--prompts {args.prompts!r} does not exist: pass a JSONL file of {{\"prompt\": ...}} or "
                         f"{{\"prompt_ids\": [...]}} lines")
    if args.max_batch < 1:
        raise ValueError(f"--max-batch {args.max_batch} must be at least 1")
    try:
        source = open_source(args.ckpt, args.hf)
    except (ValueError, FileNotFoundError) as exc:
        raise ValueError(f"{'--ckpt' if args.ckpt else '--hf'}: {exc}") from None
    cfg = layout_config(source, args.overrides, world_size)
    drafts = source.model_cfg.mtp_depth if args.speculative else 0
    if args.speculative and not drafts:
        raise ValueError("--speculative mtp: the model has no MTP depths (model.mtp_depth=0): drop --speculative")
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, stop_token_ids=source.tokenizer.eos_ids if source.tokenizer else ())
    prompts = read_prompts(args.prompts, source.tokenizer, source.model_cfg.vocab_size)
    check_lengths(prompts, args.max_new_tokens, drafts, source.model_cfg.max_seq_len, args.prompts)
    return source, cfg, prompts, params, drafts


class Progress:
    """Rank 0's finished sequences on one stderr line."""

    def __init__(self, total: int, enabled: bool):
        self.done, self.total, self.enabled = 0, total, enabled

    def __call__(self, n: int) -> None:
        self.done += n
        if self.enabled:
            print(f"\rgenerate: {self.done}/{self.total} sequences (rank 0's share)", end="", file=sys.stderr,
                  flush=True)

    def close(self) -> None:
        if self.enabled and self.done:
            print(file=sys.stderr, flush=True)


def generate(args, source, prompts, params, drafts, ctx) -> None:
    """This rank's share of the prompts through the Generator; rank 0 gathers, writes and reports."""
    import torch
    import torch.distributed as dist

    from ds_parallel.inference import Generator
    from ds_parallel.inference.load import load_source
    from ds_parallel.parallel.init import use_cuda

    dtype = args.dtype if args.dtype != "auto" else ("bf16" if use_cuda() else "fp32")
    loaded = load_source(source, getattr(torch, DTYPES[dtype]), ctx)
    mine = list(range(ctx.dp_rank, len(prompts), ctx.dp))  # interleaved: every rank gets short and long ones
    tok = loaded.tokenizer
    gen = Generator(loaded.model, ctx, max_batch=args.max_batch,
                    max_len=max(len(p) for p in prompts) + args.max_new_tokens + drafts,
                    vocab_size=loaded.vocab_size, seed=args.seed)
    per_prompt = [dataclasses.replace(params, seed=args.seed * 1_000_003 + i) for i in mine]
    progress = Progress(len(mine), ctx.rank == 0)
    completions = gen.generate([prompts[i] for i in mine], per_prompt, speculative=drafts, progress=progress)
    progress.close()
    rows = []
    for i, c in zip(mine, completions):
        row = {"prompt_ids": c.prompt_ids, "completion_ids": c.token_ids}
        if tok is not None:
            row["completion"] = tok.decode(c.token_ids)
        rows.append((i, {**row, "logprobs": c.logprobs, "finish_reason": c.finish_reason}))
    s = gen.stats
    local = (rows, ctx.tp_rank == 0, (s.tokens, s.seconds, s.main_steps, s.drafted, s.accepted))
    gathered = [None] * ctx.world_size if ctx.rank == 0 else None
    dist.gather_object(local, gathered, dst=0)
    if ctx.rank == 0:
        write_and_report(args, gathered, len(prompts), drafts)


def write_and_report(args, gathered, n_prompts: int, drafts: int) -> None:
    from ds_parallel.atomic import atomic_open

    by_index = {i: row for rows, _, _ in gathered for i, row in rows}  # tp peers hold the same rows
    assert sorted(by_index) == list(range(n_prompts)), "a prompt was lost in the gather"
    with atomic_open(args.out) as fh:
        for i in range(n_prompts):
            fh.write(json.dumps(by_index[i]) + "\n")
    stats = [st for _, first_tp, st in gathered if first_tp]  # one per distinct share of prompts
    tokens, steps = sum(st[0] for st in stats), sum(st[2] for st in stats)
    seconds = max(st[1] for st in stats)
    print(f"wrote {args.out}: {n_prompts} completions, {tokens} tokens in {seconds:.2f} s "
          f"({tokens / seconds if seconds else 0.0:.1f} tokens/s)", flush=True)
    if drafts:
        drafted = [sum(st[3][j] for st in stats) for j in range(drafts)]
        accepted = [sum(st[4][j] for st in stats) for j in range(drafts)]
        rates = ", ".join(f"{a / d if d else 0.0:.3f}" for a, d in zip(accepted, drafted))
        print(f"speculative (mtp, {drafts} drafts): acceptance per draft position [{rates}], "
              f"{tokens / steps if steps else 0.0:.2f} tokens per main-model forward", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    from ds_parallel.checkpoint import CheckpointError
    from ds_parallel.config import ConfigError
    from ds_parallel.parallel.init import detect_env

    env = detect_env()
    try:
        source, cfg, prompts, params, drafts = prepare(args, env.world_size)
    except (ConfigError, CheckpointError, ValueError) as exc:
        print(f"generate: error: {exc}", file=sys.stderr, flush=True)
        if env.world_size > 1:
            time.sleep(PEER_GRACE_S)
        return 2

    from ds_parallel.parallel.init import init_parallel, report_failure

    try:
        generate(args, source, prompts, params, drafts, init_parallel(cfg, env))
    except ValueError as exc:  # a request the loaded model refuses (the Generator's checks)
        print(f"generate: error: {exc}", file=sys.stderr, flush=True)
        return 2
    except Exception as exc:  # one line on every rank; the traceback above it for debugging
        return report_failure(f"rank {env.rank}", exc)
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown: a peer that died can leave gloo threads that hang exit.
    os._exit(code)
