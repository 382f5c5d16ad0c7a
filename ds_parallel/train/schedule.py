"""Learning-rate schedules as pure functions of the optimizer step (0-based).

- cosine: linear warmup to `lr`, then cosine decay to `lr * min_lr_ratio` at the last step.
- multistep (DeepSeek LLM, arXiv 2401.02954 §2.3): linear warmup, then `lr` until 80% of
  training tokens, 31.6% of it until 90%, 10% after. With a fixed global batch, tokens are
  proportional to steps.
- constant: warmup, then `lr`.

Also the V3 schedules of two DeepSeek-specific coefficients: the MTP loss weight and the
speed of the aux-loss-free bias update.
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


def mtp_lambda_at(step: int, m, t: TrainConfig) -> float:
    """V3 §4.2: lambda = 0.3 for the first 10T tokens, 0.1 for the remaining 4.8T."""
    late = m.mtp_lambda_late is not None and step >= m.mtp_lambda_switch * t.steps
    return m.mtp_lambda_late if late else m.mtp_lambda


def bias_update_speed_at(step: int, m, t: TrainConfig) -> float:
    """V3 §4.2: gamma = 0.001 for the first 14.3T tokens, 0 for the last 500B."""
    return m.bias_update_speed if step < m.bias_update_stop * t.steps else 0.0
