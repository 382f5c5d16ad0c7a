"""Held-out exact match: greedy-decode each problem's answer and compare strings.

Problems are batched by prompt length (no padding needed for a causal model). Every rank
runs every problem, so tensor-parallel ranks stay in step; logits are gathered over tp.
"""
from __future__ import annotations

from collections import defaultdict

import torch

from ds_parallel.parallel.tensor_parallel import gather_logits


@torch.no_grad()
def greedy_answers(model, ctx, data, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy continuation of each prompt (encoded as in training by `data.prompt_ids`),
    cut at the first newline / end of document."""
    tokenizer = data.tokenizer
    was_training = model.training
    model.eval()
    by_len: dict[int, list[int]] = defaultdict(list)
    encoded = [data.prompt_ids(p) for p in prompts]
    for i, ids in enumerate(encoded):
        by_len[len(ids)].append(i)
    answers = [""] * len(prompts)
    for _, idx in sorted(by_len.items()):
        ids = torch.tensor([encoded[i] for i in idx], dtype=torch.long, device=ctx.device)
        for _ in range(max_new_tokens):
            logits = gather_logits(model(ids).logits[:, -1:], ctx)
            # The model's vocabulary may be padded past the tokenizer's: never emit those ids.
            ids = torch.cat([ids, logits[..., : tokenizer.vocab_size].argmax(-1)], dim=1)
        for row, i in zip(ids.tolist(), idx):
            text = tokenizer.decode(row[len(encoded[i]):])
            answers[i] = text.split("\n")[0]
    model.train(was_training)
    return answers


def exact_match(model, ctx, data) -> dict:
    """Fraction of `data.heldout` (prompt, answer) pairs answered exactly, with chance level."""
    problems = data.heldout
    prompts = [p for p, _ in problems]
    targets = [a for _, a in problems]
    max_new = max(len(data.tokenizer.encode(a)) for a in targets)
    answers = greedy_answers(model, ctx, data, prompts, max_new)
    hits = sum(a.strip() == t.strip() for a, t in zip(answers, targets))
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
