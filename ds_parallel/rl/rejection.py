"""Rejection sampling (DeepSeek-R1 §2.3.3): SFT data from a checkpoint's own verified samples.

    the first n_prompts training prompts of post_train.prompts (rl/prompts.py), in chunks
    -> N samples each by inference/engine.py's Generator on the run's layout (tp and ep as the
       GRPO rollout; the prompts of a chunk dealt to data-parallel ranks, p % dp), sample s of
       prompt p drawn from its own seed eval_seed(seed, p, s)
    -> rule rewards (rl/rewards.py): a sample is verified if its accuracy is 1, or with
       min_reward set, if its weighted reward reaches it
    -> `select`, in (prompt id, sample index) order, each dropped sample counted under the
       first rule that drops it:
           unverified, truncated, format (R1's tags), language (the language reward's word
           share), length, repetition (share of repeated word n-grams), code (``` fences)
           -- per sample --
           pass_rate (the prompt's share of verified samples outside [pass_rate_min, max]),
           duplicate (the same (prompt, completion) kept before), max_per_prompt
    -> samples.jsonl: {"prompt", "response"} lines, the SFT format (data/sft.py), with
       provenance: the reference answer, source_checkpoint, prompt_id, sample_index, rewards.

R1 keeps only correct samples and filters out chains of thought with mixed languages, long
paragraphs and code blocks; the pass-rate band is the usual extra (prompts every sample
solves teach little). So drawn = kept + the dropped counts, and the kept set depends on
(seed, prompts, checkpoint, settings) alone: not on dp, nor, with `batch_invariant`
(kernels.py), on how requests share a forward.

Resume. Chunk c holds prompts [c C, (c+1) C). After each, rank 0 appends its kept lines to
samples.jsonl, fsyncs it, then replaces progress.json atomically (atomic.py) with the chunks
done, the file's length in bytes and the running counts. A restarted run cuts samples.jsonl
back to that length (lines of a chunk that was not recorded), rebuilds the dedup set from it
and continues with the next chunk, so no prompt is written twice and the output equals an
uninterrupted run's. progress.json also holds the settings the output depends on; a rerun
with others is refused. A finished run reruns as a no-op.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch
import torch.distributed as dist

from ds_parallel import checkpoint as ckpt
from ds_parallel.atomic import write_atomic
from ds_parallel.config.load import dump_yaml
from ds_parallel.config.schema import Config, RejectionConfig
from ds_parallel.inference.engine import Generator
from ds_parallel.inference.load import Tokenizer, policy_tokenizer
from ds_parallel.inference.sampling import SamplingParams
from ds_parallel.interop.hf import is_hf_directory
from ds_parallel.kernels import batch_invariant
from ds_parallel.model import build_model
from ds_parallel.parallel.groups import ParallelContext
from ds_parallel.rl.evaluate import eval_seed
from ds_parallel.rl.prompts import Prompt, build_prompts
from ds_parallel.rl.rewards import Sample, check_rewards, format_reward, language_reward, score
from ds_parallel.train.metrics import pyplot, save_plot
from ds_parallel.train.setup import load_initial_weights

# Every rule of `select`, in the order it is applied.
FILTERS = ("unverified", "truncated", "format", "language", "length", "repetition", "code", "pass_rate",
           "duplicate", "max_per_prompt")
# Settings that do not change the output (resuming with other values is allowed).
_FREE = ("generation_batch", "batch_invariant", "max_chunks_this_run")


def check_rejection(cfg: Config, world_size: int) -> None:
    """Rules of a rejection-sampling run, before any process group starts (one-line ValueErrors)."""
    r, p = cfg.post_train.rejection, cfg.parallel
    if p.pp > 1:
        raise ValueError(f"parallel.pp={p.pp}: generation needs the whole model on each rank; use tp/ep/dp "
                         "(parallel.pp=1)")
    for name in ("samples_per_prompt", "max_new_tokens", "generation_batch", "chunk_prompts", "repeat_ngram"):
        if getattr(r, name) < 1:
            raise ValueError(f"post_train.rejection.{name}={getattr(r, name)} must be >= 1")
    for name in ("n_prompts", "max_length", "max_per_prompt", "max_chunks_this_run"):
        if getattr(r, name) < 0:
            raise ValueError(f"post_train.rejection.{name}={getattr(r, name)} must be >= 0 (0: no limit)")
    if r.temperature <= 0:
        raise ValueError(f"post_train.rejection.temperature={r.temperature} must be > 0: N greedy samples of a "
                         "prompt are one sample")
    if not 0 < r.top_p <= 1:
        raise ValueError(f"post_train.rejection.top_p={r.top_p} must lie in (0, 1]")
    if not 0 <= r.pass_rate_min <= r.pass_rate_max <= 1:
        raise ValueError(f"post_train.rejection.pass_rate_min={r.pass_rate_min} and pass_rate_max={r.pass_rate_max} "
                         "must satisfy 0 <= min <= max <= 1")
    if r.max_repeat_share is not None and not 0 <= r.max_repeat_share <= 1:
        raise ValueError(f"post_train.rejection.max_repeat_share={r.max_repeat_share} must lie in [0, 1] (null: off)")
    if not 0 <= r.min_language_share <= 1:
        raise ValueError(f"post_train.rejection.min_language_share={r.min_language_share} must lie in [0, 1]")
    if r.language is not None:
        try:
            language_reward(Sample("", "", "", "", 0, False), r.language)
        except ValueError as exc:
            raise ValueError(f"post_train.rejection.language: {exc} (null: no language filter)") from None
    if r.max_new_tokens >= cfg.model.max_seq_len:
        raise ValueError(f"post_train.rejection.max_new_tokens={r.max_new_tokens} leaves no room for the prompt in "
                         f"model.max_seq_len={cfg.model.max_seq_len}: lower it")
    reward_options(r)


def reward_options(r: RejectionConfig) -> dict[str, dict]:
    """check_rewards on post_train.rejection.rewards, its errors naming this section."""
    try:
        return check_rewards(r.rewards, r.reward_options, max_new_tokens=r.max_new_tokens)
    except ValueError as exc:
        raise ValueError(str(exc).replace("post_train.grpo.", "post_train.rejection.")) from None


# ---------------------------------------------------------------------------- selection


@dataclass(frozen=True)
class Candidate:
    """One sample as `select` sees it."""
    prompt_id: int
    sample_index: int
    prompt: str
    completion: str
    completion_tokens: int
    truncated: bool  # cut by max_new_tokens before a stop token
    rewards: dict[str, float]  # each reward of the run (accuracy always), and "total": the weighted sum
    verified: bool
    answer: str = ""  # the prompt's reference answer (the distillation baseline trains on it; data/sft.py)


@dataclass
class Selection:
    kept: list[Candidate] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FILTERS, 0))
    histogram: list[int] = field(default_factory=list)  # prompts by their number of verified samples, 0..N


def repeat_share(text: str, n: int) -> float:
    """1 - distinct / all of the word n-grams of `text` (words: whitespace-separated); 0 with
    fewer than n words. "a b a b a b" at n=2: 5 bigrams, 2 distinct, 0.6."""
    words = text.split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def sample_filter(c: Candidate, r: RejectionConfig) -> Optional[str]:
    """The first per-sample rule of FILTERS that drops `c`, or None."""
    if not c.verified:
        return "unverified"
    if r.drop_truncated and c.truncated:
        return "truncated"
    sample = Sample(c.prompt, c.completion, "", "", c.completion_tokens, c.truncated)
    if r.format and format_reward(sample) != 1.0:
        return "format"
    if r.language is not None and language_reward(sample, r.language) < r.min_language_share:
        return "language"
    if r.max_length and c.completion_tokens > r.max_length:
        return "length"
    if r.max_repeat_share is not None and repeat_share(c.completion, r.repeat_ngram) > r.max_repeat_share:
        return "repetition"
    if r.drop_code and "```" in c.completion:
        return "code"
    return None


def select(candidates: list[Candidate], r: RejectionConfig, seen: set[tuple[str, str]]) -> Selection:
    """Kept samples and counts of whole prompts (all N samples of each, any order), in
    (prompt id, sample index) order. `seen`: (prompt, completion) pairs kept earlier, updated."""
    n = r.samples_per_prompt
    by_prompt: dict[int, list[Candidate]] = {}
    for c in candidates:
        by_prompt.setdefault(c.prompt_id, []).append(c)
    out = Selection(histogram=[0] * (n + 1))
    for pid in sorted(by_prompt):
        group = sorted(by_prompt[pid], key=lambda c: c.sample_index)
        assert len(group) == n, f"prompt {pid}: {len(group)} samples, expected {n}"
        n_verified = sum(c.verified for c in group)
        out.histogram[n_verified] += 1
        # the band on counts: n_verified / n in [min, max], without rounding k / n
        in_band = r.pass_rate_min * n <= n_verified + 1e-9 and n_verified <= r.pass_rate_max * n + 1e-9
        taken = 0
        for c in group:
            why = sample_filter(c, r)
            if why is None and not in_band:
                why = "pass_rate"
            if why is None and r.dedup and (c.prompt, c.completion) in seen:
                why = "duplicate"
            if why is None and r.max_per_prompt and taken >= r.max_per_prompt:
                why = "max_per_prompt"
            if why is not None:
                out.dropped[why] += 1
                continue
            seen.add((c.prompt, c.completion))
            out.kept.append(c)
            taken += 1
    return out


def sft_line(c: Candidate, source: Optional[str]) -> str:
    """One samples.jsonl line: data/sft.py reads prompt and response, the rest is provenance."""
    return json.dumps({"prompt": c.prompt, "response": c.completion, "answer": c.answer, "source_checkpoint": source,
                       "prompt_id": c.prompt_id, "sample_index": c.sample_index, "rewards": c.rewards}) + "\n"


# ---------------------------------------------------------------------------- progress


@dataclass
class Progress:
    """progress.json: what is written, and the counts so far."""
    settings: dict[str, Any]
    chunks_done: int = 0
    bytes: int = 0  # of samples.jsonl holding exactly the chunks done
    prompts: int = 0
    drawn: int = 0
    kept: int = 0
    reward_failures: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FILTERS, 0))
    histogram: list[int] = field(default_factory=list)

    def add(self, sel: Selection, n_prompts: int, n_drawn: int, failures: int, n_bytes: int) -> None:
        self.chunks_done += 1
        self.bytes = n_bytes
        self.prompts += n_prompts
        self.drawn += n_drawn
        self.kept += len(sel.kept)
        self.reward_failures += failures
        for k, v in sel.dropped.items():
            self.dropped[k] += v
        self.histogram = [a + b for a, b in zip(self.histogram, sel.histogram)]


def _settings(cfg: Config, source: Optional[str]) -> dict[str, Any]:
    """What the output depends on (module docstring, "Resume")."""
    r = {k: v for k, v in asdict(cfg.post_train.rejection).items() if k not in _FREE}
    return json.loads(json.dumps({"rejection": r, "prompts": asdict(cfg.post_train.prompts), "seed": cfg.train.seed,
                                  "source_checkpoint": source, "model": asdict(cfg.model)}))


def _resume(out_dir: str, settings: dict[str, Any], n_samples: int) -> tuple[Progress, set[tuple[str, str]]]:
    """Rank 0: the progress record (new if none), samples.jsonl cut back to it, and the kept
    (prompt, completion) pairs in it."""
    path, samples = os.path.join(out_dir, "progress.json"), os.path.join(out_dir, "samples.jsonl")
    if not os.path.isfile(path):
        if os.path.exists(samples):
            os.remove(samples)  # written before the first chunk was recorded
        return Progress(settings, histogram=[0] * (n_samples + 1)), set()
    with open(path) as fh:
        progress = Progress(**json.load(fh))
    changed = _changed(progress.settings, settings)
    if changed:
        raise ValueError(f"train.out_dir={out_dir!r} holds a rejection run with other settings "
                         f"({', '.join(changed)}): use another train.out_dir, or delete it to start over")
    size = os.path.getsize(samples) if os.path.exists(samples) else 0
    if size < progress.bytes:
        raise ValueError(f"{samples} holds {size} bytes, fewer than the {progress.bytes} progress.json records: "
                         "the run directory is damaged; delete it to start over")
    if not size:
        return progress, set()
    if size > progress.bytes:
        os.truncate(samples, progress.bytes)
    with open(samples, encoding="utf-8") as fh:
        return progress, {(row["prompt"], row["response"]) for row in map(json.loads, fh)}


def _changed(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Keys of `new` (section.key for mappings) whose values differ in `old`."""
    out = []
    for section, value in new.items():
        before = old.get(section)
        if isinstance(value, dict) and isinstance(before, dict):
            out += [f"{section}.{k}" for k in value if before.get(k) != value[k]]
        elif before != value:
            out.append(section)
    return out


def _broadcast(value: Any, ctx: ParallelContext) -> Any:
    """Rank 0's `value` on every rank."""
    if ctx.world_size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, group=ctx.world_group)
    return box[0]


# ---------------------------------------------------------------------------- the run


def _source_name(init: Optional[str]) -> Optional[str]:
    """The checkpoint samples come from: the step directory of ours, the HF directory, or
    None for the seed's weights."""
    if not init:
        return None
    return os.path.abspath(init if is_hf_directory(init) else ckpt.resolve_checkpoint(init))


def _chunk(run: "_Run", chunk: int) -> tuple[list[Candidate], int, int]:
    """This chunk's candidates gathered from every data-parallel rank, its prompt count and
    this rank group's reward failures (collective)."""
    r, ctx = run.r, run.ctx
    ids = range(chunk * r.chunk_prompts, min((chunk + 1) * r.chunk_prompts, len(run.prompts)))
    mine = [(p, s) for p in ids if p % ctx.dp == ctx.dp_rank for s in range(r.samples_per_prompt)]
    encoded = {p: run.tokenizer.encode(run.prompts[p].text) for p, _ in mine}
    params = [SamplingParams(max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
                             seed=eval_seed(run.seed, p, s), stop_token_ids=run.tokenizer.eos_ids) for p, s in mine]
    with batch_invariant(r.batch_invariant):
        outs = run.generator.generate([encoded[p] for p, _ in mine], params)
    prompts: list[Prompt] = [run.prompts[p] for p, _ in mine]
    samples = [Sample(prompt=q.text, completion=run.tokenizer.decode(c.token_ids), answer=q.answer, task=q.task,
                      completion_tokens=len(c.token_ids), truncated=c.finish_reason == "length", entry=q.entry)
               for q, c in zip(prompts, outs)]
    result = score(samples, r.rewards, run.options)
    verified = result.correct if r.min_reward is None else result.total >= r.min_reward
    local = []
    for i, ((p, s), sample) in enumerate(zip(mine, samples)):
        rewards = {name: float(v[i]) for name, v in result.per_reward.items()}
        rewards["total"] = float(result.total[i])
        local.append(asdict(Candidate(p, s, sample.prompt, sample.completion, sample.completion_tokens,
                                      sample.truncated, rewards, bool(verified[i]), sample.answer)))
    failures = torch.tensor([float(sum(result.failures.values()))], dtype=torch.float64)
    parts = [local]
    if ctx.dp > 1:
        parts = [None] * ctx.dp
        dist.all_gather_object(parts, local, group=ctx.dp_group)
        dist.all_reduce(failures, group=ctx.dp_group)
    return [Candidate(**c) for part in parts for c in part], len(ids), int(failures.item())


@dataclass
class _Run:
    r: RejectionConfig
    ctx: ParallelContext
    prompts: list[Prompt]
    tokenizer: Tokenizer
    generator: Generator
    options: dict[str, dict]
    seed: int


def rejection_sample(cfg: Config, ctx: ParallelContext, init: Optional[str] = None) -> dict[str, Any]:
    """The run: config + parallel context -> run directory (config.yaml, samples.jsonl,
    progress.json, rejection_stats.json, plots/pass_rate.png, summary.json). Rerunning resumes."""
    r, t = cfg.post_train.rejection, cfg.train
    init = init if init is not None else cfg.post_train.init
    out_dir, is_rank0 = t.out_dir, ctx.rank == 0
    train_prompts, _ = build_prompts(cfg.post_train.prompts, t.seed, cfg.data)
    n_prompts = r.n_prompts or len(train_prompts)
    if n_prompts > len(train_prompts):
        raise ValueError(f"post_train.rejection.n_prompts={r.n_prompts} exceeds the {len(train_prompts)} training "
                         "prompts of post_train.prompts: lower it (0: all)")
    prompts = train_prompts[:n_prompts]
    n_chunks = math.ceil(n_prompts / r.chunk_prompts)
    source = _source_name(init)
    summary_path = os.path.join(out_dir, "summary.json")
    progress, seen, done, error = None, set(), None, None  # rank 0 reads; every rank gets its answer
    if is_rank0:
        os.makedirs(out_dir, exist_ok=True)
        try:
            progress, seen = _resume(out_dir, _settings(cfg, source), r.samples_per_prompt)
        except ValueError as exc:
            error = str(exc)
        if progress is not None and progress.chunks_done == n_chunks and os.path.isfile(summary_path):
            with open(summary_path) as fh:
                done = json.load(fh)
            if done.get("finished"):
                print(f"rejection sampling: finished earlier ({out_dir})", flush=True)
            else:  # killed after the last chunk was recorded, before the summary said so
                done = None
    progress, done, error = _broadcast((progress, done, error), ctx)
    if error:
        raise ValueError(error)
    if done is not None:
        return done
    stop = n_chunks if not r.max_chunks_this_run else min(n_chunks, progress.chunks_done + r.max_chunks_this_run)
    if progress.chunks_done < stop:
        run = _build(cfg, ctx, init, prompts)
        if is_rank0:
            write_atomic(os.path.join(out_dir, "config.yaml"), dump_yaml(cfg))
            print(f"rejection sampling: {n_prompts} prompts x {r.samples_per_prompt} samples from "
                  f"{source or 'the seed'}, chunks {progress.chunks_done}..{stop - 1} of {n_chunks}", flush=True)
        tic, first = time.perf_counter(), progress.chunks_done
        for chunk in range(progress.chunks_done, stop):
            candidates, n_here, failures = _chunk(run, chunk)
            if is_rank0:
                _record(out_dir, progress, select(candidates, r, seen), source, n_here, len(candidates), failures)
                done = chunk + 1 - first
                eta = (time.perf_counter() - tic) / done * (stop - chunk - 1)
                if done == 1 or (chunk + 1) % 8 == 0 or chunk + 1 == stop:
                    print(f"chunk {chunk + 1}/{n_chunks} | kept {progress.kept} of {progress.drawn} | "
                          f"ETA {eta:.0f}s", flush=True)
            else:
                progress.chunks_done += 1
    finished = progress.chunks_done == n_chunks
    summary: dict[str, Any] = {"finished": finished, "chunks_done": progress.chunks_done, "chunks": n_chunks}
    if is_rank0:
        stats = _stats(progress, r.samples_per_prompt)
        summary.update({k: stats[k] for k in ("prompts", "drawn", "kept", "kept_share")})
        write_atomic(os.path.join(out_dir, "rejection_stats.json"), json.dumps(stats, indent=1))
        write_atomic(summary_path, json.dumps(summary, indent=1))
        plot_pass_rate(out_dir, stats)
        print(f"rejection sampling: kept {stats['kept']} of {stats['drawn']} samples"
              + ("" if finished else f"; stopped after chunk {progress.chunks_done - 1}, rerun to continue"),
              flush=True)
    # Rank 0's summary on every rank, sent once samples.jsonl is complete: the phase after this
    # one reads the file on every rank (without this, another rank could open it first).
    return _broadcast(summary, ctx)


def _build(cfg: Config, ctx: ParallelContext, init: Optional[str], prompts: list[Prompt]) -> _Run:
    """The model (this rank's shard of `init`, or the seed's), its tokenizer and generator."""
    r = cfg.post_train.rejection
    tokenizer = policy_tokenizer(init, cfg.post_train.prompts, "rejection sampling")
    model = build_model(cfg.model, ctx, seed=cfg.train.seed)  # whole on each rank: pp = 1
    if init:
        load_initial_weights(model, init)
    dtype = torch.bfloat16 if cfg.precision.dtype == "bf16" else torch.float32
    model.to(device=ctx.device, dtype=dtype).requires_grad_(False).eval()
    longest = max(len(tokenizer.encode(p.text)) for p in prompts)
    if longest + r.max_new_tokens > cfg.model.max_seq_len:
        raise ValueError(f"post_train.rejection.max_new_tokens={r.max_new_tokens}: a prompt of {longest} tokens plus "
                         f"it exceeds model.max_seq_len={cfg.model.max_seq_len}; lower it")
    generator = Generator(model, ctx, max_batch=r.generation_batch, max_len=longest + r.max_new_tokens,
                          vocab_size=tokenizer.vocab_size, detokenize=tokenizer.decode, seed=cfg.train.seed)
    return _Run(r, ctx, prompts, tokenizer, generator, reward_options(r), cfg.train.seed)


def _record(out_dir: str, progress: Progress, sel: Selection, source: Optional[str], n_prompts: int, n_drawn: int,
            failures: int) -> None:
    """Rank 0: append a chunk's kept lines durably, then record it (module docstring, "Resume")."""
    path = os.path.join(out_dir, "samples.jsonl")
    with open(path, "a", encoding="utf-8") as fh:
        fh.write("".join(sft_line(c, source) for c in sel.kept))
        fh.flush()
        os.fsync(fh.fileno())
    progress.add(sel, n_prompts, n_drawn, failures, os.path.getsize(path))
    write_atomic(os.path.join(out_dir, "progress.json"), json.dumps(asdict(progress), indent=1))


def _stats(progress: Progress, n: int) -> dict[str, Any]:
    return {"prompts": progress.prompts, "samples_per_prompt": n, "drawn": progress.drawn, "kept": progress.kept,
            "kept_share": progress.kept / max(1, progress.drawn), "dropped": progress.dropped,
            "reward_failures": progress.reward_failures,
            "pass_rate_histogram": {f"{k}/{n}": count for k, count in enumerate(progress.histogram)}}


def plot_pass_rate(out_dir: str, stats: dict[str, Any]) -> str:
    """plots/pass_rate.png: prompts by their share of verified samples, and the samples each
    rule dropped."""
    plt = pyplot()

    fig, (ax, ax_drop) = plt.subplots(1, 2, figsize=(11, 4))
    bins = stats["pass_rate_histogram"]
    ax.bar(range(len(bins)), list(bins.values()), color="tab:blue")
    ax.set_xticks(range(len(bins)), list(bins), fontsize=8)
    ax.set_xlabel("verified samples per prompt")
    ax.set_ylabel("prompts")
    ax.grid(alpha=0.3, axis="y")
    names = [k for k, v in stats["dropped"].items() if v] or list(stats["dropped"])
    ax_drop.barh(names, [stats["dropped"][k] for k in names], color="tab:red")
    ax_drop.set_xlabel(f"samples dropped (kept {stats['kept']} of {stats['drawn']})")
    ax_drop.invert_yaxis()
    ax_drop.grid(alpha=0.3, axis="x")
    fig.suptitle(os.path.basename(os.path.abspath(out_dir)))
    return save_plot(fig, out_dir, "pass_rate.png")
