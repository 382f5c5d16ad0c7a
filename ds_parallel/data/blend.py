"""Blended training data: several indexed datasets mixed by weight, as Megatron's
BlendedDataset mixes them (DeepSeek LLM §2.1 "remixing" raises under-represented domains),
with weights that may change at a step without disturbing what was already consumed.

    data:
      source: indexed
      blend:                              # each a Megatron .bin/.idx prefix and its weight
        - {path: data/web_text_document, weight: 0.7}
        - {path: data/code_text_document, weight: 0.3}
      blend_schedule:                     # optional: new weights from a step on
        - {step: 1000, weights: [0.5, 0.5]}

Each source is packed on its own (data/loader.py PackedSamples: documents with EOS, windows of
seq_len + 1) and read as an endless stream: the source's j-th sample is window
order_e[j mod n] of epoch e = j div n, with order_e a permutation seeded by (seed, source,
e). A global-batch slot is given to a source by virtual emission times: within a phase of
the schedule (weights w, starting at step S), source i emits its k-th sample at time
(k + 1/2) / w_i, and the phase's t-th slot is its t-th emission in (time, source) order. So
after any t slots of a phase source i has had round(w_i t) of them, within one sample: the
token share of every source follows its weight at every step (not only on average), and
slot -> (source, j) is a pure function of (schedule, slot), computed for a step's slots alone
(`BlendedLoader.sample_ids`), so resuming needs nothing but the step. A new phase continues
each source's stream where the phase before left it: samples already consumed are neither
repeated nor reshuffled. Megatron's BlendedDataset assigns by the same rule in spirit (the
source whose count lags its weight most); it cannot change weights mid-run.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ds_parallel.data.indexed import DOCUMENT_SUFFIX
from ds_parallel.data.loader import GlobalBatchLoader, PackedSamples


@dataclass(frozen=True)
class BlendPhase:
    start_step: int
    weights: tuple[float, ...]  # normalised to sum 1


def blend_phases(data_cfg, steps: int) -> list[BlendPhase]:
    """The weight schedule of data.blend / data.blend_schedule, checked (one-line ValueErrors)."""
    blend = data_cfg.blend
    for i, entry in enumerate(blend):
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str) or set(entry) - {"path", "weight",
                                                                                                    "name"}:
            raise ValueError(f"data.blend[{i}]={entry!r} must be a mapping with path and weight (and an optional name)")
    names = source_names(data_cfg)
    if len(set(names)) != len(names):
        raise ValueError(f"data.blend: source names {names} repeat; give each entry a distinct name")
    raw = [(0, [entry.get("weight") for entry in blend], "data.blend[*].weight")]
    for i, change in enumerate(data_cfg.blend_schedule):
        if not isinstance(change, dict) or set(change) != {"step", "weights"}:
            raise ValueError(f"data.blend_schedule[{i}]={change!r} must be a mapping with step and weights")
        raw.append((change["step"], change["weights"], f"data.blend_schedule[{i}].weights"))
    phases = []
    for start, weights, where in raw:
        if not isinstance(weights, list) or len(weights) != len(blend) or not all(
                isinstance(w, (int, float)) and not isinstance(w, bool) and w >= 0 for w in weights) or not sum(weights):
            raise ValueError(f"{where}={weights!r} must be {len(blend)} non-negative numbers, not all 0 (one per "
                             f"data.blend entry)")
        if not isinstance(start, int) or start <= (phases[-1].start_step if phases else -1) or (phases and
                                                                                                 start >= steps):
            raise ValueError(f"data.blend_schedule step {start!r} must be an integer above the one before and below "
                             f"train.steps={steps}")
        total = float(sum(weights))
        phases.append(BlendPhase(start, tuple(w / total for w in weights)))
    return phases


def source_names(data_cfg) -> list[str]:
    """Each source's name in the metrics (tokens/<name>): its `name`, else its path's basename."""
    return [str(e.get("name") or os.path.basename(e["path"]).removesuffix(DOCUMENT_SUFFIX)) for e in data_cfg.blend]


def _emissions_before(weights: np.ndarray, time: float) -> np.ndarray:
    """Per source, emissions with time (k + 1/2) / w strictly before `time`."""
    with np.errstate(divide="ignore", invalid="ignore"):
        n = np.ceil(weights * time - 0.5)
    return np.maximum(n, 0).astype(np.int64)


def phase_slots(weights: Sequence[float], lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """(source, k) of a phase's slots lo..hi-1: the t-th emission in (time, source) order
    (module docstring); k counts that source's emissions in the phase before it."""
    w = np.asarray(weights, dtype=np.float64)
    margin = len(w) + 1  # |emissions before T - T| <= n/2 for every T, since sum(w) = 1
    t_lo, t_hi = max(0.0, lo - margin), hi + margin
    first = _emissions_before(w, t_lo)
    last = _emissions_before(w, t_hi)
    src = np.concatenate([np.full(b - a, i, dtype=np.int64) for i, (a, b) in enumerate(zip(first, last))])
    k = np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in zip(first, last)])
    with np.errstate(divide="ignore"):
        times = (k + 0.5) / w[src]
    order = np.lexsort((src, times))
    base = int(first.sum())  # emissions before the window
    pick = order[lo - base: hi - base]
    return src[pick], k[pick]


def phase_counts(weights: Sequence[float], n: int) -> np.ndarray:
    """Per source, its slots among a phase's first n: the emissions before a window near n,
    plus the window's up to n."""
    w = np.asarray(weights, dtype=np.float64)
    first = _emissions_before(w, max(0.0, n - len(w) - 1))
    src, _ = phase_slots(w, int(first.sum()), n)
    return first + np.bincount(src, minlength=len(w))


class BlendedSamples:
    """The sources' windows as one index space: source i's window j is id offsets[i] + j."""

    def __init__(self, sources: Sequence[PackedSamples]) -> None:
        self.sources = list(sources)
        self.offsets = np.cumsum([0] + [len(s) for s in self.sources])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _split(self, ids):
        ids = np.asarray(ids, dtype=np.int64)
        which = np.searchsorted(self.offsets, ids, side="right") - 1
        return ids, which

    def __getitem__(self, ids) -> np.ndarray:
        ids, which = self._split(ids)
        return np.stack([self.sources[s][int(i - self.offsets[s])] for i, s in zip(ids, which)])

    def inputs_and_labels(self, ids):
        import torch

        ids, which = self._split(ids)
        parts = [self.sources[s].inputs_and_labels([int(i - self.offsets[s])]) for i, s in zip(ids, which)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


class BlendedLoader(GlobalBatchLoader):
    """GlobalBatchLoader over blended sources: step s's slots [s*GBS, (s+1)*GBS) are dealt to
    sources by the schedule (module docstring); the rest (rank positions) as the base class."""

    def __init__(self, sources: Sequence[PackedSamples], phases: Sequence[BlendPhase], global_batch_size: int,
                 micro_batch_size: int, dp_rank: int, dp: int, seed: int) -> None:
        for i, s in enumerate(sources):
            if len(s) == 0:
                raise ValueError(f"data.blend[{i}] holds no complete sample of train.seq_len + 1 tokens")
        super().__init__(BlendedSamples(sources), global_batch_size, micro_batch_size, dp_rank, dp, seed)
        self.phases = list(phases)
        # Per phase: each source's samples consumed before it (its stream continues from there).
        self._consumed = [np.zeros(len(sources), dtype=np.int64)]
        for before, after in zip(self.phases, self.phases[1:]):
            n = (after.start_step - before.start_step) * global_batch_size
            self._consumed.append(self._consumed[-1] + phase_counts(before.weights, n))
        self._source_orders: dict[tuple[int, int], np.ndarray] = {}
        self._step_slots: tuple[int, np.ndarray, np.ndarray] = (-1, None, None)  # the last step's, per micro-batch

    def _phase(self, step: int) -> int:
        return max(i for i, p in enumerate(self.phases) if p.start_step <= step)

    def _source_window(self, source: int, j: np.ndarray) -> np.ndarray:
        n = len(self.samples.sources[source])
        epochs, within = np.divmod(j, n)
        out = np.empty_like(j)
        for epoch in np.unique(epochs):
            key = (source, int(epoch))
            if key not in self._source_orders:
                if len(self._source_orders) > 4 * len(self.phases[0].weights):
                    self._source_orders.pop(next(iter(self._source_orders)))
                self._source_orders[key] = np.random.default_rng([self.seed, source, int(epoch)]).permutation(n)
            here = epochs == epoch
            out[here] = self._source_orders[key][within[here]]
        return out

    def slot_sources(self, step: int, positions=None) -> tuple[np.ndarray, np.ndarray]:
        """(source, j: the source's sample number) of `positions` of step's global batch."""
        if positions is None:
            positions = np.arange(self.global_batch_size)
        positions = np.asarray(positions, dtype=np.int64)
        if self._step_slots[0] != step:  # once per step, not once per micro-batch
            p = self._phase(step)
            phase = self.phases[p]
            lo = (step - phase.start_step) * self.global_batch_size
            src, k = phase_slots(phase.weights, lo, lo + self.global_batch_size)
            self._step_slots = (step, src, self._consumed[p][src] + k)
        _, src, j = self._step_slots
        return src[positions], j[positions]

    def sample_ids(self, step: int, positions=None) -> np.ndarray:
        src, j = self.slot_sources(step, positions)
        out = np.empty_like(j)
        for s in np.unique(src):
            here = src == s
            out[here] = self.samples.offsets[s] + self._source_window(int(s), j[here])
        return out

    def samples_per_source(self, steps: int) -> np.ndarray:
        """Per source, the samples of the first `steps` optimizer steps."""
        p = self._phase(max(steps - 1, 0)) if steps else 0
        phase = self.phases[p]
        n = (steps - phase.start_step) * self.global_batch_size if steps else 0
        return self._consumed[p] + phase_counts(phase.weights, max(n, 0))


def tokens_per_source(loader: BlendedLoader, names: Sequence[str], steps: int, seq_len: int) -> dict[str, int]:
    """tokens/<name>: training tokens each source has given in the first `steps` steps."""
    return {f"tokens/{name}": int(c) * seq_len for name, c in zip(names, loader.samples_per_source(steps))}
