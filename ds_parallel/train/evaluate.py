"""Held-out exact match: greedy-decode each problem's answer and compare strings (the
answer inside <answer>...</answer> when the model writes R1's format, data.cot).

Every rank decodes every problem, so tensor- and expert-parallel ranks stay in step. The
model decodes with the batched Generator (inference/engine.py: one prefill, then one token
per forward over the cache); pipeline layouts and ZeRO-3 re-run each prefix instead.
"""
from __future__ import annotations

from collections import defaultdict

import torch

from ds_parallel.data.corpus import stated_answer
from ds_parallel.inference import Generator, SamplingParams
from ds_parallel.parallel.tensor_parallel import gather_logits
from ds_parallel.train.pipeline import PipelineForward


@torch.no_grad()
def greedy_answers(model, ctx, data, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy continuation of each prompt (encoded as in training by `data.prompt_ids`),
    max_new_tokens tokens among the tokenizer's ids, cut at the end of the document (EOS:
    what follows is the model's guess at the next problem) and at the first newline.

    A model whole on each rank decodes all prompts in one Generator call, over its cache.
    Two cannot, and only they take `_recomputed_greedy` (the same greedy decoding with every
    prefix re-run through the model's forward): a `PipelineForward` (pp > 1: the stages live
    on other ranks), and a ZeRO-3 engine's module, whose parameters are gathered only by
    module-call hooks while decoding reads some directly (MLA's absorbed W^UK, W^UV)."""
    tokenizer = data.tokenizer
    encoded = [data.prompt_ids(p) for p in prompts]
    zero3 = any(hasattr(p, "ds_id") for p in model.parameters())  # DeepSpeed's partitioned parameters
    if isinstance(model, PipelineForward) or zero3:
        rows = _recomputed_greedy(model, ctx, encoded, max_new_tokens, tokenizer.vocab_size)
    else:
        gen = Generator(model, ctx, max_batch=max(1, len(encoded)),
                        max_len=max(map(len, encoded), default=0) + max_new_tokens, vocab_size=tokenizer.vocab_size)
        greedy = SamplingParams(max_new_tokens=max_new_tokens, temperature=0, stop_token_ids=(tokenizer.eos_id,))
        rows = [c.token_ids for c in gen.generate(encoded, greedy)]
    eos = tokenizer.eos_id
    return [tokenizer.decode(row[:row.index(eos)] if eos in row else row).split("\n")[0] for row in rows]


def _recomputed_greedy(model, ctx, encoded: list[list[int]], max_new_tokens: int, vocab_size: int) -> list[list[int]]:
    """Generated ids per prompt, each token from a forward over the whole prefix; prompts
    batched by length (no padding needed for a causal model), logits gathered over tp."""
    was_training = model.training
    model.eval()
    by_len: dict[int, list[int]] = defaultdict(list)
    for i, ids in enumerate(encoded):
        by_len[len(ids)].append(i)
    rows: list[list[int]] = [[] for _ in encoded]
    for n, idx in sorted(by_len.items()):
        ids = torch.tensor([encoded[i] for i in idx], dtype=torch.long, device=ctx.device)
        for _ in range(max_new_tokens):
            logits = gather_logits(model(ids).logits[:, -1:], ctx)
            # The model's vocabulary may be padded past the tokenizer's: never emit those ids.
            ids = torch.cat([ids, logits[..., :vocab_size].argmax(-1)], dim=1)
        for row, i in zip(ids.tolist(), idx):
            rows[i] = row[n:]
    model.train(was_training)
    return rows


def exact_match(model, ctx, data) -> dict:
    """Fraction of `data.heldout` (prompt, answer) pairs answered exactly, with chance level."""
    problems = data.heldout
    prompts = [p for p, _ in problems]
    targets = [a for _, a in problems]
    answers = greedy_answers(model, ctx, data, prompts, data.completion_chars)  # one token per character
    hits = sum(stated_answer(a) == t.strip() for a, t in zip(answers, targets))
    out = {"exact_match": hits / len(problems), "n_eval": len(problems)}
    out["chance"] = data.chance_accuracy
    return out


@torch.no_grad()
def heldout_lm_loss(model, samples, n_samples: int, batch_size: int = 32) -> float:
    """Mean next-token cross-entropy of the first `n_samples` windows of `samples` (a
    PackedSamples), every window weighted by its labelled tokens. Single pipeline stage
    only (the model's own forward); under tp the loss is the vocab-parallel one."""
    was_training = model.training
    model.eval()
    n = min(n_samples, len(samples))
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, n, batch_size):
        inputs, labels = samples.inputs_and_labels(list(range(start, min(start + batch_size, n))))
        labelled = int((labels != -100).sum())
        total += float(model(inputs.to(device), labels=labels.to(device)).lm_loss) * labelled
        count += labelled
    model.train(was_training)
    return total / max(count, 1)
