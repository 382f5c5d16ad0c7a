"""Held-out evaluation the DeepSeek-R1 way: greedy accuracy and pass@1 over k samples.

R1 (§3.1, evaluation setup) samples k responses per question at temperature 0.6 and top-p
0.95 and reports

    pass@1 = (1/k) sum_i p_i,     p_i = 1 if response i is correct, else 0,

averaged over the questions (k from 4 to 64 by benchmark size), because greedy decoding of
long reasoning repeats itself more and varies more between checkpoints; greedy accuracy is
reported beside it. Both come from one call here, on the policy's own ranks and layout:

- prompts are split over the data-parallel ranks (rank r takes prompts r, r + dp, ...), and
  every count is summed over them, so the result does not depend on dp;
- sample i of prompt p draws from its own seed, `eval_seed(seed, p, i)`, a function of the
  prompt's place in the held-out list, so the completions do not depend on the layout;
- "correct" is the accuracy reward of rl/rewards.py (math-verify, the task's own check, or
  a reasoning-gym scorer), the check GRPO trains on.

Every post-training phase evaluates through this module (GRPO's held-out curve, the
pipeline's results table), and `launchers/evaluate.py` from the shell.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from ds_parallel.inference.engine import Generator
from ds_parallel.inference.sampling import SamplingParams
from ds_parallel.rl.prompts import Prompt, build_prompts
from ds_parallel.rl.rewards import Sample, score


@dataclass(frozen=True)
class EvalResult:
    n_prompts: int
    k: int  # samples per prompt behind pass_at_1 (0: greedy only)
    greedy_accuracy: float  # share of prompts whose greedy completion is correct
    pass_at_1: Optional[float]  # mean over prompts and k samples of correctness; None when k = 0
    format_rate: float  # share of the scored completions (sampled if k > 0, else greedy) in R1's format
    mean_length: float  # their mean length in tokens

    def as_dict(self) -> dict:
        return asdict(self)


def check_eval(ecfg) -> None:
    """post_train.eval's values (one-line ValueErrors naming the key)."""
    checks = [("k", ecfg.k >= 0, "use 0 (greedy only) or a number of samples per prompt (R1: 4 to 64)"),
              ("temperature", ecfg.temperature > 0, "use a positive value (R1: 0.6); k=0 gives greedy only"),
              ("top_p", 0 < ecfg.top_p <= 1, "use a value in (0, 1] (R1: 0.95)"),
              ("max_new_tokens", ecfg.max_new_tokens >= 0, "use 0 (post_train.grpo.max_new_tokens) or a count")]
    for name, ok, fix in checks:
        if not ok:
            raise ValueError(f"post_train.eval.{name}={getattr(ecfg, name)!r} is invalid: {fix}")


def eval_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """The seed of sample `sample_index` of held-out prompt `prompt_index` (a 63-bit mix)."""
    mixed = (seed * 0x9E3779B1 + prompt_index * 0x85EBCA77 + sample_index * 0xC2B2AE3D + 0x27D4EB2F) % (2**63 - 1)
    return int(mixed)


def _samples(prompts: Sequence[Prompt], outs, tokenizer) -> list[Sample]:
    return [Sample(prompt=p.text, completion=tokenizer.decode(c.token_ids), answer=p.answer, task=p.task,
                   completion_tokens=len(c.token_ids), truncated=c.finish_reason == "length", entry=p.entry)
            for p, c in zip(prompts, outs)]


def tally(greedy: Sequence[Sample], scored: Sequence[Sample]) -> torch.Tensor:
    """(4,) float64 counts of one rank: greedy completions correct, scored completions correct,
    scored completions in R1's format, scored completion tokens."""
    counts = torch.zeros(4, dtype=torch.float64)
    if greedy:
        counts[0] = float(score(list(greedy), {"accuracy": 1.0}, {}).correct.sum())
    if scored:
        result = score(list(scored), {"accuracy": 1.0, "format": 1.0}, {})
        counts[1] = float(result.correct.sum())
        counts[2] = float((result.per_reward["format"] == 1.0).sum())
        counts[3] = float(sum(s.completion_tokens for s in scored))
    return counts


def evaluate(generator, tokenizer, prompts: Sequence[Prompt], ctx, max_new_tokens: int, k: int = 0,
             temperature: float = 0.6, top_p: float = 0.95, seed: int = 0) -> EvalResult:
    """Greedy accuracy of `prompts`, and with k > 0 pass@1 over k samples at `temperature`,
    `top_p` (R1: 0.6, 0.95). Collective over the data-parallel group (and over the model's
    tp/ep group through the generator): every rank calls it with the same arguments."""
    if k < 0:
        raise ValueError(f"post_train.eval.k={k} must be 0 (greedy only) or a number of samples per prompt")
    mine = list(range(ctx.dp_rank, len(prompts), ctx.dp))
    stop = tuple(tokenizer.eos_ids)
    encoded = [tokenizer.encode(prompts[i].text) for i in mine]
    greedy = generator.generate(encoded, SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0,
                                                        stop_token_ids=stop))
    greedy_samples = _samples([prompts[i] for i in mine], greedy, tokenizer)
    scored_samples = greedy_samples
    if k:
        params = [SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                 seed=eval_seed(seed, i, s), stop_token_ids=stop) for i in mine for s in range(k)]
        sampled = generator.generate([ids for ids in encoded for _ in range(k)], params)
        scored_samples = _samples([prompts[i] for i in mine for _ in range(k)], sampled, tokenizer)
    counts = tally(greedy_samples, scored_samples)
    if ctx.dp > 1 and ctx.dp_group is not None:
        dist.all_reduce(counts, group=ctx.dp_group)
    n = len(prompts)
    n_scored = max(1, n * (k or 1))
    return EvalResult(n_prompts=n, k=k, greedy_accuracy=float(counts[0]) / max(1, n),
                      pass_at_1=float(counts[1]) / n_scored if k else None,
                      format_rate=float(counts[2]) / n_scored, mean_length=float(counts[3]) / n_scored)


def evaluate_heldout(model, tokenizer, cfg, ctx, max_batch: int = 64) -> EvalResult:
    """`evaluate` on the held-out prompts of cfg.post_train.prompts (rl/prompts.py; for the
    arithmetic task with cfg.data's digits and ops) with cfg.post_train.eval's settings:
    what every phase of a pipeline and launchers/evaluate.py report."""
    e, pt = cfg.post_train.eval, cfg.post_train
    check_eval(e)
    _, heldout = build_prompts(pt.prompts, cfg.train.seed, cfg.data)
    max_new = e.max_new_tokens or pt.grpo.max_new_tokens
    longest = max((len(tokenizer.encode(p.text)) for p in heldout), default=0)
    if longest + max_new > model.cfg.max_seq_len:
        raise ValueError(f"post_train.eval.max_new_tokens={max_new}: a held-out prompt of {longest} tokens plus it "
                         f"exceeds model.max_seq_len={model.cfg.max_seq_len}; lower it")
    generator = Generator(model, ctx, max_batch=max_batch, max_len=longest + max_new,
                          vocab_size=tokenizer.vocab_size, detokenize=tokenizer.decode, seed=cfg.train.seed)
    was_training = model.training
    model.eval()
    try:
        return evaluate(generator, tokenizer, heldout, ctx, max_new, e.k, e.temperature, e.top_p, cfg.train.seed)
    finally:
        model.train(was_training)


def results_table(rows: Sequence[tuple[str, dict]]) -> str:
    """A Markdown table of named EvalResult dicts (one row per phase or checkpoint)."""
    lines = ["| run | prompts | greedy accuracy | pass@1 (k) | format | mean length |",
             "|---|---|---|---|---|---|"]
    for name, r in rows:
        p1 = f"{r['pass_at_1']:.3f} ({r['k']})" if r.get("pass_at_1") is not None else "-"
        lines.append(f"| {name} | {r['n_prompts']} | {r['greedy_accuracy']:.3f} | {p1} | {r['format_rate']:.3f} | "
                     f"{r['mean_length']:.1f} |")
    return "\n".join(lines)
