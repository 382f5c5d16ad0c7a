"""Per-request sampling settings, the distributions they define, and seeded draws.

Each request samples from its own `torch.Generator` (seeded from its `seed`), one float64
uniform draw u per token inverted through the distribution's float64 CDF (the first token
with mass whose cumulative probability reaches u times the total), so its output does not
depend on which other requests share its batch, on the batch size or on the tensor-parallel
rank.

The work is batched over the rows of a decode step without giving that up: rows with equal
settings get their distributions in one pass (every op involved computes a row from that
row alone, in an order that does not depend on the batch: elementwise ops, softmax, top-k,
sort, cumsum, searchsorted; no row sum, see `_probs`), and only the uniforms are drawn row
by row, each from its own generator (`draw`). A row's probabilities, CDF and token are
therefore the same bits alone or in any batch, on any number of CPU threads.

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

    @property
    def distribution(self) -> tuple[float, int, float]:
        """What the sampling distribution depends on: rows equal in it are computed together."""
        return self.temperature, self.top_k, self.top_p


def sampling_probs(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """(n, V) logits -> (n, V) float32 probabilities of each row's sampling distribution
    (a one-hot of the argmax for greedy rows), one pass per distinct `distribution`."""
    logits = logits.float()
    groups: dict[tuple[float, int, float], list[int]] = {}
    for i, p in enumerate(params):
        groups.setdefault(p.distribution, []).append(i)
    if len(groups) == 1:
        return _probs(logits, *next(iter(groups)))
    out = torch.empty_like(logits)
    for setting, rows in groups.items():
        index = torch.tensor(rows, device=logits.device)
        out[index] = _probs(logits[index], *setting)
    return out


def _probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """(n, V) float32 logits -> the distribution of one setting, row by row."""
    vocab = logits.shape[-1]
    if temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(-1), vocab).float()
    logits = logits / temperature
    if top_k and top_k < vocab:
        kth = logits.topk(top_k, -1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if top_p < 1:
        sorted_probs, order = probs.sort(-1, descending=True)
        keep = sorted_probs.cumsum(-1) - sorted_probs < top_p  # the mass ranked above is short of top_p
        # Renormalised by the kept mass summed in rank order by a cumsum (sequential within the
        # row): a row sum on the CPU is split over threads for a long row alone, not in a batch.
        kept = sorted_probs.masked_fill(~keep, 0.0).cumsum(-1)[:, -1:]
        drop = torch.empty_like(keep).scatter_(-1, order, ~keep)
        probs = probs.masked_fill(drop, 0.0) / kept
    return probs


def draw(probs: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """(n, V) distributions -> one token per row (n,) long, row i inverting one uniform of
    generators[i] (drawn on the CPU, where the generators live)."""
    u = torch.cat([torch.rand(1, generator=generator, dtype=torch.float64) for generator in generators])
    cdf = probs.double().cumsum(-1)
    target = u.to(cdf.device) * cdf[:, -1]
    index = torch.searchsorted(cdf, target.unsqueeze(-1)).squeeze(-1).clamp_max(probs.shape[-1] - 1)
    first = (probs > 0).int().argmax(-1)  # only for u = 0 before the first token with mass
    return torch.where(probs.gather(-1, index.unsqueeze(-1)).squeeze(-1) > 0, index, first)


def choose(probs: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator]
           ) -> torch.Tensor:
    """Each row's token (n,) long: the argmax for greedy rows (drawing nothing), a `draw`
    for the others."""
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    if len(sampled) == len(params):
        return draw(probs, generators)
    tokens = probs.argmax(-1)
    if sampled:
        index = torch.tensor(sampled, device=probs.device)
        tokens[index] = draw(probs[index], [generators[i] for i in sampled])
    return tokens


def uniform(generator: torch.Generator) -> float:
    return torch.rand((), generator=generator, dtype=torch.float64).item()


def request_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)
