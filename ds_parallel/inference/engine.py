"""Batched generation on the training layout: prefill, then one main-model forward per
step over the compressed cache, optionally with MTP speculative decoding.

    Generator(model, ctx).generate(prompts, params) -> [Completion], in prompt order

Requests wait in a queue and take a free cache slot (model/cache.py) as one frees up, so a
finished sequence costs nothing more and its slot serves the next prompt. Every iteration
is: admitted prompts prefilled in one forward (rows right-padded, each row's first token
read at its own last position), then one decode forward over the active rows, each at its
own position. Nothing is recomputed. The rows of a forward are sampled together
(sampling.py: batched, yet each row's token depends only on its own logits and generator),
and their tokens and log-probabilities reach the host in one copy.

Layouts. Every rank of the world calls `generate` together with its own prompts (tensor-
parallel ranks the same ones, data-parallel ranks their share). Tensor parallel splits the
heads as in training and gathers the logits; expert parallel runs the MoE all-to-all in
every forward, so all ranks take the same number of forwards: whether anyone still has
work, or prompts to prefill, is agreed by one all-reduce per iteration, and a rank with
nothing to do runs one dummy token in a spare slot. Pipeline layouts are not supported
(the model must be whole on each rank).

Speculative decoding (`speculative=k`, k <= mtp_depth; DeepSeek-V3 §2.2 and §5.4.3): the
MTP depths draft k tokens at the last position (depth j reads depth j-1's hidden state and
the token drafted before it), one main-model forward verifies them, and each draft is kept
with probability min(1, p(x)/q(x)) under the main model's sampling distribution p and the
draft's q (both after temperature/top-k/top-p), the first rejected one replaced by a draw
from normalize(max(0, p - q)), and all-accepted runs extended by a draw from p. The output
is then distributed exactly as plain sampling from the main model (greedy: identical to
greedy decoding, since p and q are one-hot). Each depth keeps its own cache; positions
drafted past the accepted ones are recomputed at the next step. The hidden states h^0 ..
h^{k-1} of every cached position are kept for that (slots x length x dim each).
"""
from __future__ import annotations

import time
from collections import deque
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import torch
import torch.distributed as dist

from ds_parallel.inference.sampling import SamplingParams, choose, request_generator, sampling_probs, uniform
from ds_parallel.model.cache import ModelCache
from ds_parallel.moe.replay import recording
from ds_parallel.parallel.tensor_parallel import gather_logits, vocab_parallel_logprobs


@dataclass
class Completion:
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # under the raw model: log_softmax(logits)[token]
    sampling_logprobs: list[float] = field(default_factory=list)  # under the sampled distribution (greedy: 0)
    finish_reason: str = ""  # "stop" (a stop token or string) or "length" (max_new_tokens)
    # record_routes: (positions fed, MoE layers, K) expert ids of every token the model read
    # (the prompt and all generated tokens but the last), trunk MoE layers in id order
    routes: Optional[torch.Tensor] = None


@dataclass
class GenerationStats:
    tokens: int = 0  # generated tokens, this rank
    prefilled: int = 0  # of which the first token of each sequence (read off the prefill)
    seconds: float = 0.0
    main_steps: int = 0  # main-model forwards summed over sequences (prefill excluded)
    drafted: list[int] = field(default_factory=list)  # per draft position: drafts verified
    accepted: list[int] = field(default_factory=list)  # per draft position: drafts kept

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    @property
    def acceptance(self) -> list[float]:
        return [a / d if d else 0.0 for a, d in zip(self.accepted, self.drafted)]

    @property
    def tokens_per_step(self) -> float:
        """Mean tokens a sequence gains per main-model decode forward (1 without speculation)."""
        return (self.tokens - self.prefilled) / self.main_steps if self.main_steps else 0.0


@dataclass
class _Row:
    """One sequence in a cache slot."""
    index: int  # request index
    params: SamplingParams
    gen: torch.Generator
    tokens: list[int]  # prompt + generated
    out: Completion
    length: int = 0  # positions in the main cache (the last token is not yet fed)
    valid: list[int] = field(default_factory=list)  # per MTP depth: cached positions with real inputs
    routes: list[torch.Tensor] = field(default_factory=list)  # record_routes: per forward (T, L, K)


class Generator:
    """Generation with `model` (eval mode, whole on each rank) on context `ctx`.

    max_batch: cache slots (sequences decoded at once); max_len: positions per slot
    (default model.max_seq_len); vocab_size: sample only ids below it (a tokenizer smaller
    than the padded embedding); detokenize: ids -> text, for stop strings; seed: combined
    with a request's index when its params give no seed."""

    def __init__(self, model, ctx, max_batch: int = 16, max_len: Optional[int] = None,
                 vocab_size: Optional[int] = None, detokenize: Optional[Callable[[list[int]], str]] = None,
                 seed: int = 0):
        self.model, self.ctx = model, ctx
        self.max_batch = max_batch
        self.max_len = max_len or model.cfg.max_seq_len
        self.vocab_size = vocab_size or model.cfg.vocab_size
        self.detokenize = detokenize
        self.seed = seed
        self.stats = GenerationStats()
        self.cache: Optional[ModelCache] = None
        self._hidden: list[torch.Tensor] = []
        self._record, self._routes = False, None

    # ------------------------------------------------------------------ public

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]],
                 params: Union[SamplingParams, Sequence[SamplingParams]] = SamplingParams(),
                 speculative: int = 0, progress: Optional[Callable[[int], None]] = None,
                 record_routes: bool = False) -> list[Completion]:
        """Completions of `prompts` (token ids), in order. Collective over the world.
        record_routes: keep each fed token's MoE routes in Completion.routes (moe/replay.py;
        not with speculative decoding)."""
        params = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        assert len(params) == len(prompts), f"{len(params)} sampling params for {len(prompts)} prompts"
        depth = len(self.model.mtp or ())
        if not 0 <= speculative <= depth:
            raise ValueError(f"speculative={speculative} drafts need as many MTP depths; the model has {depth}")
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            if not prompt:
                raise ValueError(f"prompt {i} is empty: give at least one token")
            if len(prompt) + p.max_new_tokens + speculative > self.max_len:
                raise ValueError(f"prompt {i}: {len(prompt)} tokens + max_new_tokens={p.max_new_tokens}"
                                 f"{f' + {speculative} drafts' if speculative else ''} exceed the {self.max_len} "
                                 f"positions per sequence: lower max_new_tokens or raise max_len")
            if record_routes and speculative:
                raise ValueError("record_routes needs speculative=0: drafted positions are re-fed and re-routed")
            if p.stop_strings and self.detokenize is None:
                raise ValueError(f"prompt {i}: stop_strings need a detokenize function (a tokenizer)")
        self._allocate(speculative)
        was_training = self.model.training
        self.model.eval()
        self.stats = GenerationStats(drafted=[0] * speculative, accepted=[0] * speculative)
        self._record = record_routes
        routes: dict[int, list[torch.Tensor]] = {}  # request -> per forward (T, L, K)
        tic = time.perf_counter()
        out = [Completion(list(map(int, prompt))) for prompt in prompts]
        pending = deque(range(len(prompts)))
        rows: dict[int, _Row] = {}
        while True:
            admit = []
            for slot in range(self.max_batch):
                if slot not in rows and pending:
                    i = pending.popleft()
                    seed = params[i].seed if params[i].seed is not None else self.seed * 1_000_003 + i
                    rows[slot] = _Row(i, params[i], request_generator(seed), list(out[i].prompt_ids), out[i],
                                      valid=[0] * speculative, routes=routes.setdefault(i, []))
                    admit.append(slot)
            any_admit, any_active = self._agree(bool(admit), bool(rows))
            if not any_active:
                break
            if any_admit:
                self._prefill(rows, admit)
            active = [s for s, r in rows.items() if not r.out.finish_reason]  # a prefill may finish a row
            if speculative:
                self._speculative_step(rows, active, speculative)
            else:
                self._decode_step(rows, active)
            for slot in [s for s, r in rows.items() if r.out.finish_reason]:
                del rows[slot]
                if progress is not None:
                    progress(1)
        self.stats.seconds = time.perf_counter() - tic
        self.model.train(was_training)
        for i, parts in routes.items():
            if parts:  # recorded, and the model has MoE layers
                out[i].routes = torch.cat(parts)[: len(out[i].prompt_ids) + len(out[i].token_ids) - 1]
        return out

    # ------------------------------------------------------------------ parts

    def _allocate(self, speculative: int) -> None:
        extra = speculative + 1  # verification writes up to k + 1 positions past the last token
        if self.cache is None or self.cache.max_len < self.max_len + extra:
            self.cache = ModelCache(self.model, self.max_batch + 1, self.max_len + extra)  # + a spare slot
        if speculative and len(self._hidden) < speculative:
            p = next(self.model.parameters())
            self._hidden = [torch.zeros(self.max_batch + 1, self.max_len + extra, self.model.cfg.dim, dtype=p.dtype,
                                        device=p.device) for _ in range(speculative)]

    def _agree(self, *flags: bool) -> list[bool]:
        """The flags OR-ed over the world (every rank takes the same forwards)."""
        if self.ctx.world_size == 1:  # over the context's world: a one-process Generator talks to no one
            return list(flags)
        t = torch.tensor([float(f) for f in flags], device=self.ctx.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.ctx.world_group)
        return [bool(v) for v in t.tolist()]

    def _forward(self, ids: list[list[int]], slots: list[int], pos: list[int]):
        """Main model over rows of equal length (or one dummy token in the spare slot when
        this rank has none). Returns the logits over the whole vocabulary (b, T, V), gathered
        over tp, and h^0 (b, T, D). Sampling reads the first `vocab_size` of them."""
        device = self.ctx.device
        if not ids:
            ids, slots, pos = [[0]], [self.max_batch], [0]
        with recording() if self._record else nullcontext() as tape:
            logits, h = self.model.decode(torch.tensor(ids, device=device), self.cache,
                                          torch.tensor(pos, device=device), torch.tensor(slots, device=device))
        self._routes = None
        if tape is not None and tape.routes:  # (b, T, L, K), trunk MoE layers in id order
            self._routes = torch.stack([tape.routes[i][0] for i in sorted(tape.routes)], dim=2).cpu()
        return gather_logits(logits, self.ctx).float(), h

    def _prefill(self, rows: dict[int, _Row], admit: list[int]) -> None:
        width = max((len(rows[s].tokens) for s in admit), default=1)
        ids = [rows[s].tokens + [0] * (width - len(rows[s].tokens)) for s in admit]
        logits, h = self._forward(ids, admit, [0] * len(admit))
        if not admit:
            return
        batch = [rows[s] for s in admit]
        last = torch.tensor([len(row.tokens) - 1 for row in batch], device=logits.device)
        sampled = self._sample(batch, logits[torch.arange(len(batch), device=logits.device), last])
        for b, (slot, row) in enumerate(zip(admit, batch)):
            row.length = len(row.tokens)
            if self._hidden:
                self._hidden[0][slot, : row.length] = h[b, : row.length]
            self.stats.prefilled += 1
            if self._routes is not None:
                row.routes.append(self._routes[b, : row.length])
            self._emit(row, *sampled[b])

    def _decode_step(self, rows: dict[int, _Row], active: list[int]) -> None:
        ids = [[rows[s].tokens[-1]] for s in active]
        logits, _ = self._forward(ids, active, [rows[s].length for s in active])
        if not active:
            return
        batch = [rows[s] for s in active]
        for b, (row, sample) in enumerate(zip(batch, self._sample(batch, logits[:, 0]))):
            row.length += 1
            self.stats.main_steps += 1
            if self._routes is not None:
                row.routes.append(self._routes[b])
            self._emit(row, *sample)

    def _probs(self, logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        """Sampling distributions over the ids below `vocab_size` (n, vocab_size)."""
        return sampling_probs(logits[..., : self.vocab_size], params)

    def _sample(self, batch: list[_Row], logits: torch.Tensor) -> list[tuple[int, float, float]]:
        """Each row's next token from its (n, V) logits, with its log-probabilities under the
        model (the training side's function, `vocab_parallel_logprobs` on this rank's vocab
        shard, so that both round alike: exactly inside kernels.batch_invariant()) and under
        the sampling distribution: the batch's work in a few ops and one copy to the host.
        Collective over the tensor-parallel group."""
        params = [row.params for row in batch]
        probs = self._probs(logits, params)
        tokens = choose(probs, params, [row.gen for row in batch]).unsqueeze(-1)
        shard = logits.shape[-1] // self.ctx.tp
        local = logits[:, self.ctx.tp_rank * shard:(self.ctx.tp_rank + 1) * shard]
        raw = vocab_parallel_logprobs(local, tokens.squeeze(-1), self.ctx)[0].unsqueeze(-1)
        values = torch.cat([tokens.double(), raw.double(), probs.gather(-1, tokens).log().double()], -1)
        return [(int(t), logp, sampled) for t, logp, sampled in values.tolist()]

    def _emit(self, row: _Row, token: int, logprob: float, sampling_logprob: float) -> bool:
        """Record `token` with its log-probabilities under the model and under the sampling
        distribution (0 for greedy), and check the stops; True when finished."""
        p = row.params
        out = row.out
        row.tokens.append(token)
        out.token_ids.append(token)
        out.logprobs.append(logprob)
        out.sampling_logprobs.append(0.0 if p.greedy else sampling_logprob)
        self.stats.tokens += 1
        if token in p.stop_token_ids or (p.stop_strings and any(
                s in self.detokenize(out.token_ids) for s in p.stop_strings)):
            out.finish_reason = "stop"
        elif len(out.token_ids) >= p.max_new_tokens:
            out.finish_reason = "length"
        return bool(out.finish_reason)

    # ------------------------------------------------------------------ speculative

    def _speculative_step(self, rows: dict[int, _Row], active: list[int], k: int) -> None:
        """Draft k tokens per active row with the MTP depths, verify them in one main-model
        forward, keep the accepted prefix and one more token (module docstring)."""
        drafts: dict[int, list[int]] = {s: [] for s in active}
        draft_probs: dict[int, list[torch.Tensor]] = {s: [] for s in active}
        for depth in range(1, k + 1):
            self._draft(rows, active, depth, drafts, draft_probs)
        ids = [[rows[s].tokens[-1]] + drafts[s] for s in active]
        logits, h = self._forward(ids, active, [rows[s].length for s in active])
        if not active:
            return
        # p at positions L .. L+k of every row (b, k + 1, vocab_size), and the model's log-probs
        probs = self._probs(logits.flatten(0, 1), [rows[s].params for s in active for _ in range(k + 1)])
        probs = probs.view(len(active), k + 1, -1)
        raw = logits.log_softmax(-1)

        def emit(row: _Row, b: int, j: int, token: int) -> bool:
            return self._emit(row, token, float(raw[b, j, token]), float(torch.log(probs[b, j, token])))

        for b, slot in enumerate(active):
            row = rows[slot]
            self.stats.main_steps += 1
            start = row.length
            for j in range(k + 1):
                # tokens[-1] sits at `length`; its output at j predicts the next token.
                self._hidden[0][slot, row.length] = h[b, j]
                row.length += 1
                p = probs[b, j]
                if j == k:  # every draft kept: one more from the main model
                    emit(row, b, j, int(choose(p[None], [row.params], [row.gen])))
                    break
                x, q = drafts[slot][j], draft_probs[slot][j]
                self.stats.drafted[j] += 1
                if q[x] > 0 and uniform(row.gen) < min(1.0, float(p[x] / q[x])):  # V3 §5.4.3 / lossless rule
                    self.stats.accepted[j] += 1
                    if emit(row, b, j, x):
                        break
                    continue
                residual = (p - q).clamp_min(0)
                residual = residual / residual.sum() if residual.sum() > 0 else p
                emit(row, b, j, int(choose(residual[None], [row.params], [row.gen])))
                break
            for d in range(k):  # depth d+1's positions past the old length saw drafted tokens
                row.valid[d] = min(row.valid[d], start - d)

    def _draft(self, rows: dict[int, _Row], active: list[int], depth: int, drafts, draft_probs) -> None:
        """MTP depth `depth` over each row's positions from its first stale one to the last
        cached one (length - 1): at position i it reads h^{depth-1}_i and token t_{i+depth}
        (a draft past the sequence); its output at the last position drafts one token."""
        hidden_in = self._hidden[depth - 1]
        spans = [(rows[s].length - rows[s].valid[depth - 1]) for s in active]
        width = max(spans, default=1)
        ids, h_prev, pos = [], [], []
        for slot in active:
            row = rows[slot]
            start = max(0, row.length - width)
            seq = row.tokens + drafts[slot]  # t_0 .. t_L, then the drafts of this step
            ids.append([seq[i + depth] if i + depth < len(seq) else 0 for i in range(start, start + width)])
            h_prev.append(hidden_in[slot, start:start + width])
            pos.append(start)
        device = self.ctx.device
        if not active:  # a dummy row in the spare slot, so every rank takes the same forwards
            ids, h_prev, pos, slots = [[0]], [hidden_in[self.max_batch, :1]], [0], [self.max_batch]
        else:
            slots = active
        logits, h = self.model.mtp_decode(depth, torch.stack(h_prev), torch.tensor(ids, device=device), self.cache,
                                          torch.tensor(pos, device=device), torch.tensor(slots, device=device))
        logits = gather_logits(logits, self.ctx).float()
        if not active:
            return
        batch = [rows[s] for s in active]
        last = torch.tensor([row.length - 1 - start for row, start in zip(batch, pos)], device=logits.device)
        params = [row.params for row in batch]
        q = self._probs(logits[torch.arange(len(batch), device=logits.device), last], params)  # (b, vocab_size)
        tokens = choose(q, params, [row.gen for row in batch]).tolist()
        for b, (slot, row) in enumerate(zip(active, batch)):
            if depth < len(self._hidden):
                self._hidden[depth][slot, pos[b]:pos[b] + width] = h[b]
            row.valid[depth - 1] = row.length
            drafts[slot].append(tokens[b])
            draft_probs[slot].append(q[b])
