"""Per-request sampling settings, the distributions they define, and seeded draws.

Each request samples from its own `torch.Generator` (seeded from its `seed`), one uniform
draw per token inverted through the distribution's CDF, so its output does not depend on
which other requests share its batch, on the batch size or on the tensor-parallel rank.

Two log-probabilities are reported per generated token: under the raw model
(log_softmax of the logits, what RL's ratios and KL need) and under the distribution that
was sampled from (temperature, then top-k, then top-p; 0 for greedy).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 1.0  # 0: greedy (argmax)
    top_k: int = 0  # keep the k most likely tokens; 0: all
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches top_p
    seed: Optional[int] = None  # None: the generator's seed combined with the request's index
    stop_token_ids: tuple[int, ...] = ()  # e.g. EOS; the stop token is kept in the output
    stop_strings: tuple[str, ...] = ()  # needs the generator's detokenizer

    def __post_init__(self):
        checks = [("max_new_tokens", self.max_new_tokens >= 1, "set it to 1 or more"),
                  ("temperature", self.temperature >= 0, "use 0 for greedy or a positive value"),
                  ("top_k", self.top_k >= 0, "use 0 (off) or a positive count"),
                  ("top_p", 0 < self.top_p <= 1, "use a value in (0, 1]")]
        for name, ok, fix in checks:
            if not ok:
                raise ValueError(f"sampling {name}={getattr(self, name)!r} is invalid: {fix}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def sampling_probs(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """(n, V) logits -> (n, V) float32 probabilities of each row's sampling distribution
    (a one-hot of the argmax for greedy rows)."""
    logits = logits.float()
    out = torch.empty_like(logits)
    for i, p in enumerate(params):
        row = logits[i]
        if p.greedy:
            out[i] = torch.nn.functional.one_hot(row.argmax(), row.numel()).float()
            continue
        row = row / p.temperature
        if p.top_k and p.top_k < row.numel():
            kth = row.topk(p.top_k).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        probs = row.softmax(-1)
        if p.top_p < 1:
            sorted_probs, order = probs.sort(descending=True)
            before = sorted_probs.cumsum(0) - sorted_probs  # mass of the tokens ranked above
            drop = torch.zeros_like(probs, dtype=torch.bool)
            drop[order] = before >= p.top_p
            probs = probs.masked_fill(drop, 0.0)
            probs = probs / probs.sum()
        out[i] = probs
    return out


def draw(probs: torch.Tensor, generator: torch.Generator) -> int:
    """One token from a (V,) distribution with one uniform draw of `generator`."""
    u = torch.rand((), generator=generator, dtype=torch.float64).item()
    cdf = probs.double().cumsum(0)
    index = int(torch.searchsorted(cdf, torch.tensor([u * float(cdf[-1])], dtype=torch.float64, device=cdf.device)))
    index = min(index, probs.numel() - 1)
    if probs[index] <= 0:  # only for u = 0 before the first token with mass
        index = int((probs > 0).nonzero()[0])
    return index


def uniform(generator: torch.Generator) -> float:
    return torch.rand((), generator=generator, dtype=torch.float64).item()


def request_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)
