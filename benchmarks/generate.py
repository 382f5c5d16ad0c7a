"""Generation: our `inference.Generator` against transformers' `generate()` on the same
weights, and MTP speculative decoding against plain decoding on the trained smoke model.

Part a. A small DeepSeek-V3 written by transformers itself (`DeepseekV3ForCausalLM`,
  save_pretrained: dim 256, 4 layers (1 dense), 4 heads, MLA with q_lora_rank 128,
  kv_lora_rank 64 and 32 RoPE dims, 8 routed experts top-2 in 4 groups plus 1 shared,
  vocab 1024), loaded by us with `interop.hf.load_hf` and by transformers with
  `from_pretrained`. Greedy, prompts of 64 random tokens (all rows the same length: no
  padding on either side), 128 new tokens, no stop token, batch 1 and batch 16, the two
  candidates timed interleaved. Before timing, both generate once and must emit the same
  tokens; where a row diverges it must be at a near-tie (transformers' two candidate logits
  within 1e-3), which fp32 rounding may flip. Tokens/s = batch x new tokens / median wall
  (prefill included); ratio = ours / transformers (> 1: ours faster). Cache bytes per
  token per sequence are measured from the tensors that exist after the run: ours, every
  allocated main-layer tensor of the `ModelCache` over its slots x positions (MLA: the
  kv_lora_rank latent and the RoPE key, V3 §2.1); transformers, every key and value tensor
  in the returned `DynamicCache` over batch x cached positions (transformers 5 caches the
  same latent and RoPE key, expanding them per head at every step). Our Generator is built
  once per batch size and keeps its preallocated cache between calls (its first, checked,
  call allocates it); transformers allocates a DynamicCache per call.

Part b. `--smoke-run DIR` (default runs/smoke_cpu, written by `make smoke`): the trained
  tiny V3 with its 1-depth MTP. Greedy, prompts from the run's held-out arithmetic problems
  (as in training: EOS, then "ab+cd="), plain decoding against speculative=1 (the MTP
  module drafts the second token, the main model verifies it; DeepSeek-V3 §5.4.3). Two
  regimes: the answers only (stop at EOS, what evaluation decodes) and a free-running
  continuation (--new tokens past the answer, into problems whose operands are random).
  Both must emit identical tokens (greedy speculative decoding is exact). Printed: the
  acceptance rate of the drafted second token and tokens/s speculative / plain.

    .venv/bin/python benchmarks/generate.py            # --quick: fewer tokens, < 60 s
    python benchmarks/generate.py --device cuda --dtype bf16 --smoke-run DIR   # on a GPU

On a GPU in bf16 the token check reports identical rows instead of asserting near-ties
(bf16 rounding flips wider gaps); timings synchronise the device.
"""
from __future__ import annotations

import os
import tempfile
import warnings
from dataclasses import replace

import torch
from common import REPO, base_parser, set_threads, table, time_interleaved  # first: puts the repo on sys.path
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
from transformers.utils import logging as hf_logging

from ds_parallel.checkpoint import latest_checkpoint, load_model, read_meta
from ds_parallel.config.load import config_from_dict
from ds_parallel.data import build_datasets
from ds_parallel.inference import Generator, SamplingParams
from ds_parallel.interop.hf import load_hf
from ds_parallel.parallel.groups import ParallelContext

HF_CONFIG = dict(
    vocab_size=1024, hidden_size=256, intermediate_size=688, moe_intermediate_size=128, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=4, q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=64,
    qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, n_group=4,
    topk_group=2, first_k_dense_replace=1, routed_scaling_factor=2.5, norm_topk_prob=True,
    max_position_embeddings=512, tie_word_embeddings=False, rope_parameters={"rope_type": "default",
                                                                            "rope_theta": 10000.0},
)
TIE = 1e-3  # a greedy divergence is accepted only where transformers' two candidate logits are this close
SINGLE = ParallelContext.single()


# ----------------------------------------------------------------------------- part a
def write_hf_model(path: str, std: float = 0.05) -> None:
    """A DeepSeek-V3 saved by transformers, weights N(0, std) (norm gains 1 + N(0, std)) and
    a non-zero router bias: tests/unit/test_hf.py's `randomise`."""
    from tests.unit.test_hf import randomise

    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**HF_CONFIG))
    randomise(model, seed=0, std=std)
    model.save_pretrained(path)


def ours_generate(model, ctx, prompts: torch.Tensor, new: int):
    gen = Generator(model, ctx, max_batch=prompts.shape[0], max_len=prompts.shape[1] + new)
    params = SamplingParams(max_new_tokens=new, temperature=0.0)
    return lambda: (gen.generate(prompts.tolist(), params), gen)


def hf_generate(model, prompts: torch.Tensor, new: int, inspect: bool = False):
    """transformers' greedy generate; `inspect`: also return its cache and per-step logits
    (the checked call; the timed one returns the sequences only)."""
    def run():
        out = model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new,
                             do_sample=False, return_dict_in_generate=inspect, output_logits=inspect)
        if prompts.is_cuda:  # ours returns host lists, so it has synchronised already
            torch.cuda.synchronize()
        return out

    return run


def our_cache_bytes(gen: Generator) -> tuple[float, int]:
    """(bytes per position per sequence, total bytes) of the main-layer cache tensors allocated."""
    cache = gen.cache
    total = sum(t.nbytes for layer in cache.layers.values() for t in layer.tensors.values())
    return total / (cache.max_slots * cache.max_len), total


def hf_cache_bytes(out, batch: int) -> tuple[float, int]:
    """(bytes per position per sequence, total bytes) of the DynamicCache's key/value tensors."""
    cache = out.past_key_values
    total = sum(t.nbytes for layer in cache.layers for t in (layer.keys, layer.values))
    return total / (batch * cache.get_seq_length()), total


def check_same_tokens(ours, out, prompt_len: int, strict: bool = True) -> tuple[int, list[int]]:
    """Rows identical, and the first divergence of each other row, where it must be a
    near-tie when `strict` (fp32)."""
    theirs = out.sequences[:, prompt_len:].tolist()
    same, diverged = 0, []
    for row, (a, b) in enumerate(zip((c.token_ids for c in ours), theirs)):
        assert len(a) == len(b), f"row {row}: {len(a)} tokens from ours, {len(b)} from transformers"
        if a == b:
            same += 1
            continue
        j = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
        logits = out.logits[j][row].float()
        gap = abs(float(logits[a[j]] - logits[b[j]]))
        assert gap < TIE or not strict, f"row {row} diverges at new token {j} where transformers' logits differ by {gap:.3g}"
        diverged.append(j)
    return same, diverged


def part_a(args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        write_hf_model(tmp)
        ours = load_hf(tmp, dtype=args.torch_dtype).to(args.device)
        hf = DeepseekV3ForCausalLM.from_pretrained(tmp, dtype=args.torch_dtype, attn_implementation="sdpa")
        hf = hf.to(args.device).eval()
    hf.generation_config.eos_token_id = None  # never stop early: both sides emit exactly `new` tokens
    hf.generation_config.pad_token_id = 0
    n_ours, n_hf = sum(p.numel() for p in ours.parameters()), sum(p.numel() for p in hf.parameters())
    assert n_ours == n_hf, f"parameters: ours {n_ours:,}, transformers {n_hf:,}"
    print(f"part a: DeepSeek-V3 from transformers, {n_ours:,} parameters, {ours.cfg.n_layers} layers, dim "
          f"{ours.cfg.dim}, MLA {ours.cfg.kv_lora_rank}+{ours.cfg.qk_rope_head_dim}, {ours.cfg.n_routed_experts} "
          f"experts top-{ours.cfg.n_activated_experts}; transformers attention "
          f"{hf.config._attn_implementation}, experts {getattr(hf.config, '_experts_implementation', 'eager')}", flush=True)
    rows = []
    for batch in args.batches:
        prompts = torch.randint(0, HF_CONFIG["vocab_size"], (batch, args.prompt), generator=torch.Generator()
                                .manual_seed(batch)).to(args.device)
        fns = {"ours": ours_generate(ours, args.ctx, prompts, args.new),
               "transformers": hf_generate(hf, prompts, args.new)}
        with torch.no_grad():
            completions, gen = fns["ours"]()
            out = hf_generate(hf, prompts, args.new, inspect=True)()
            same, diverged = check_same_tokens(completions, out, args.prompt, strict=args.dtype == "fp32")
            print(f"  batch {batch}: {same}/{batch} rows identical"
                  + (f", the others diverge at near-ties (new token {diverged})" if diverged else ""), flush=True)
            ours_b, ours_total = our_cache_bytes(gen)
            hf_b, hf_total = hf_cache_bytes(out, batch)
            ms = time_interleaved(fns, args.warmup, args.repeats, label=f"batch {batch} ")
        tokens = batch * args.new
        tps = {n: tokens / (t.wall_ms / 1e3) for n, t in ms.items()}
        cpu_tps = {n: tokens / (t.cpu_ms / 1e3) for n, t in ms.items()}
        rows.append([batch, f"{tps['ours']:.0f}", f"{tps['transformers']:.0f}",
                     f"{tps['ours'] / tps['transformers']:.2f}x",
                     f"{cpu_tps['ours'] / cpu_tps['transformers']:.2f}x", f"{same}/{batch}",
                     f"{ours_b:,.0f}", f"{hf_b:,.0f}", f"{hf_b / ours_b:.2f}x",
                     f"{ours_total / 2**20:.2f} / {hf_total / 2**20:.2f}"])
    print()
    print(f"greedy, prompt {args.prompt}, {args.new} new tokens, medians of {args.repeats} interleaved rounds "
          f"({args.device}, {args.dtype}, {args.threads} thread(s)); ratio = ours / transformers (> 1: ours faster); cache = "
          "main layers, bytes per cached position per sequence, measured from the tensors")
    print(table(["batch", "ours tok/s", "transformers tok/s", "ratio wall", "ratio cpu", "same tokens",
                 "ours cache B/token", "transformers cache B/token", "transformers / ours",
                 "allocated MiB ours / transformers"], rows))


# ----------------------------------------------------------------------------- part b
def heldout_prompts(step_dir: str, vocab_size: int, n: int):
    """(prompt ids, answer width, datasets) for the first n held-out problems of the run."""
    saved = read_meta(step_dir)["config"]
    cfg = config_from_dict({"data": saved["data"], "train": {k: saved["train"][k] for k in ("seq_len", "seed")}})
    data = build_datasets(cfg.data, cfg.train, vocab_size)
    problems = data.heldout[:n]
    width = max(len(a) for _, a in problems)
    return [data.prompt_ids(p) for p, _ in problems], width, data


def part_b(args) -> None:
    run = args.smoke_run
    step_dir = latest_checkpoint(run)
    if step_dir is None:
        print(f"\npart b skipped: no trained run in {run}. Make one with `make smoke` (5-8 minutes on 2 "
              "cores, writes runs/smoke_cpu), or pass --smoke-run DIR.")
        return
    model = load_model(step_dir, dtype=args.torch_dtype).to(args.device)
    prompts, width, data = heldout_prompts(step_dir, model.cfg.vocab_size, args.smoke_prompts)
    vocab = data.tokenizer.vocab_size
    print(f"\npart b: {step_dir} ({model.cfg.preset}, MTP depth {model.cfg.mtp_depth}), {len(prompts)} held-out "
          f"problems, e.g. {data.tokenizer.decode(prompts[0])!r}", flush=True)
    regimes = {
        "answers (stop at EOS)": SamplingParams(max_new_tokens=width + 1, temperature=0.0,
                                                stop_token_ids=(data.tokenizer.eos_id,)),
        f"free-running, {args.new} tokens": SamplingParams(max_new_tokens=args.new, temperature=0.0),
    }
    rows = []
    for batch in args.smoke_batches:
        for regime, params in regimes.items():
            chosen = prompts if batch > 1 else prompts[: max(1, len(prompts) // 16)]
            max_len = max(map(len, chosen)) + params.max_new_tokens + 1  # + 1: the draft past the last token
            gens = {k: Generator(model, args.ctx, max_batch=batch, max_len=max_len, vocab_size=vocab)
                    for k in ("plain", "speculative")}
            fns = {"plain": lambda g=gens["plain"], p=chosen, q=params: g.generate(p, q),
                   "speculative": lambda g=gens["speculative"], p=chosen, q=params: g.generate(p, q, speculative=1)}
            plain, spec = fns["plain"](), fns["speculative"]()
            assert [c.token_ids for c in plain] == [c.token_ids for c in spec], \
                f"{regime}: greedy speculative decoding emitted other tokens than plain decoding"
            stats = gens["speculative"].stats
            exact = sum(data.tokenizer.decode(c.token_ids).strip() == a.strip()
                        for c, (_, a) in zip(plain, data.heldout)) / len(plain)
            ms = time_interleaved(fns, args.warmup, args.repeats, label=f"batch {batch} {regime.split(',')[0]} ")
            tokens = sum(len(c.token_ids) for c in plain)
            rows.append([batch, regime, len(chosen), tokens, f"{stats.acceptance[0]:.3f}",
                         f"{stats.tokens_per_step:.2f}", f"{tokens / ms['plain'].wall_ms * 1e3:.0f}",
                         f"{tokens / ms['speculative'].wall_ms * 1e3:.0f}",
                         f"{ms['plain'].wall_ms / ms['speculative'].wall_ms:.2f}x",
                         f"{ms['plain'].cpu_ms / ms['speculative'].cpu_ms:.2f}x",
                         f"{exact:.3f}" if regime.startswith("answers") else ""])
    print()
    print(f"greedy, speculative=1 vs plain, medians of {args.repeats} interleaved rounds ({args.device}, "
          f"{args.dtype}, {args.threads} "
          "thread(s)); ratio = speculative / plain tokens/s (> 1: speculation faster); tokens/step = tokens a "
          "sequence gains per main-model decode forward (the prefill's first token excluded; plain decoding: 1)")
    print(table(["batch", "regime", "prompts", "tokens", "2nd-token acceptance", "tokens/step", "plain tok/s",
                 "speculative tok/s", "ratio wall", "ratio cpu", "exact match"], rows))


def main() -> None:
    parser = base_parser(__doc__, repeats=3, warmup=1)
    parser.add_argument("--quick", action="store_true", help="16 new tokens, 1 round, 16 prompts (< 60 s)")
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens (part a)")
    parser.add_argument("--new", type=int, default=128, help="new tokens per sequence")
    parser.add_argument("--smoke-run", default=os.path.join(REPO, "runs", "smoke_cpu"),
                        help="run directory of `make smoke` (part b)")
    parser.add_argument("--smoke-prompts", type=int, default=64, help="held-out problems (part b)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    args = parser.parse_args()
    args.torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    args.ctx = replace(SINGLE, device=torch.device(args.device))
    args.batches, args.smoke_batches = [1, 16], [1, 16]
    if args.quick:
        args.new, args.repeats, args.warmup, args.smoke_prompts = 16, 1, 0, 16
    set_threads(args.threads)
    warnings.filterwarnings("ignore")
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    part_a(args)
    part_b(args)


if __name__ == "__main__":
    main()
