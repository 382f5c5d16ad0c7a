"""Generation on one GPU (skipped without CUDA; run by benchmarks/gpu_suite.sh): the decode
engine over the device cache gives the CPU's greedy tokens in fp32, keeps speculative greedy
identical to plain greedy, and runs in bf16."""
from __future__ import annotations

import torch

from tests.gpu.common import requires_cuda

pytestmark = requires_cuda


def _model(device, dtype=torch.float32):
    from dataclasses import replace

    from ds_parallel.config import load_config
    from ds_parallel.model import build_model
    from ds_parallel.parallel.groups import ParallelContext

    cfg = load_config(None, ["model.preset=debug_v3", "model.mtp_depth=2"]).model
    ctx = replace(ParallelContext.single(), device=torch.device(device))
    return build_model(cfg, ctx, seed=0).to(device=device, dtype=dtype).eval(), ctx


def _prompts(vocab: int, n: int = 24):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (int(torch.randint(2, 30, (), generator=g)),), generator=g).tolist() for _ in range(n)]


def test_fp32_gpu_greedy_matches_cpu_and_speculative_is_identical():
    from ds_parallel.inference import Generator, SamplingParams

    cpu_model, cpu_ctx = _model("cpu")
    gpu_model, gpu_ctx = _model("cuda")
    prompts = _prompts(cpu_model.cfg.vocab_size)
    greedy = SamplingParams(max_new_tokens=24, temperature=0)
    cpu = Generator(cpu_model, cpu_ctx, max_batch=8, max_len=64).generate(prompts, greedy)
    gen = Generator(gpu_model, gpu_ctx, max_batch=8, max_len=64)
    gpu = gen.generate(prompts, greedy)
    same = sum(a.token_ids == b.token_ids for a, b in zip(cpu, gpu))
    assert same >= len(prompts) - 1, f"{same}/{len(prompts)} sequences identical"  # one near-tie allowed
    for a, b in zip(cpu, gpu):
        n = next((i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y), len(a.token_ids))
        assert max((abs(x - y) for x, y in zip(a.logprobs[:n], b.logprobs[:n])), default=0) < 1e-4
    for k in (1, 2):
        spec = gen.generate(prompts, greedy, speculative=k)
        assert [c.token_ids for c in spec] == [c.token_ids for c in gpu], k


def test_bf16_gpu_generation_runs_and_samples():
    from ds_parallel.inference import Generator, SamplingParams

    model, ctx = _model("cuda", torch.bfloat16)
    prompts = _prompts(model.cfg.vocab_size, 32)
    out = Generator(model, ctx, max_batch=16, max_len=96).generate(
        prompts, SamplingParams(max_new_tokens=48, temperature=0.8, top_p=0.95, seed=1), speculative=1)
    assert all(len(c.token_ids) == 48 and c.finish_reason == "length" for c in out)
    assert all(torch.isfinite(torch.tensor(c.logprobs)).all() for c in out)
