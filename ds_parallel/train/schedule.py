"""Learning-rate schedules as pure functions of the optimizer step (0-based).

- cosine: linear warmup to `lr`, then cosine decay to `lr * min_lr_ratio` at the last step.
- multistep (DeepSeek LLM, arXiv 2401.02954 §2.3): linear warmup, then `lr` until 80% of
  training tokens, 31.6% of it until 90%, 10% after. With a fixed global batch, tokens are
  proportional to steps.
- constant: warmup, then `lr`.
"""
from __future__ import annotations

import math

from ds_parallel.config.schema import TrainConfig


def lr_at(step: int, t: TrainConfig) -> float:
    if t.warmup_steps and step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    if t.lr_schedule == "constant":
        return t.lr
    if t.lr_schedule == "multistep":
        progress = step / t.steps
        return t.lr * (1.0 if progress < 0.8 else 0.316 if progress < 0.9 else 0.1)
    span = max(1, t.steps - 1 - t.warmup_steps)
    progress = min(1.0, (step - t.warmup_steps) / span)
    floor = t.lr * t.min_lr_ratio
    return floor + (t.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
