"""train/optim.py: AdamW with low-precision moments against torch's AdamW."""
import pytest
import torch

from ds_parallel.train.optim import LowPrecisionMomentAdamW, moment_bytes_report


def _run(make_opt, steps=30, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(64, 32, generator=gen)), torch.nn.Parameter(torch.randn(32, generator=gen))]
    start = [p.detach().clone() for p in params]
    opt = make_opt([{"params": params[:1], "weight_decay": 0.1}, {"params": params[1:], "weight_decay": 0.0}])
    for step in range(steps):
        for p in params:
            # gradients spanning 1e-6 .. 1: the small ones are where bf16 moments lose digits
            p.grad = torch.randn(p.shape, generator=gen) * 10.0 ** torch.randint(-6, 1, p.shape, generator=gen)
        opt.step()
    return params, start, opt


def test_fp32_moments_equal_torch_adamw():
    kw = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    ours, _, _ = _run(lambda g: LowPrecisionMomentAdamW(g, moment_dtype=torch.float32, **kw))
    ref, _, _ = _run(lambda g: torch.optim.AdamW(g, foreach=False, **kw))
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_bf16_moments_halve_the_state_and_track_fp32():
    kw = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    ours, start, opt = _run(lambda g: LowPrecisionMomentAdamW(g, moment_dtype=torch.bfloat16, **kw))
    ref, _, _ = _run(lambda g: torch.optim.AdamW(g, foreach=False, **kw))
    for state in opt.state.values():
        assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.bfloat16
    for a, b, p0 in zip(ours, ref, start):
        rel = ((a - b).norm() / (b - p0).norm()).item()  # error relative to the whole update
        assert 1e-6 < rel < 2e-2, rel  # not fp32-exact (bf16 storage), but close
    report = moment_bytes_report(opt, torch.bfloat16)
    numel = 64 * 32 + 32
    assert f"{4 * numel / 2**20:.1f} MiB on this rank ({4 * numel / 2**20:.1f} MiB saved" in report


@pytest.mark.dist
def test_trainer_with_bf16_moments_resumes_exactly(tmp_path):
    from tests.harness import run_dist

    run_dist(_train_twice, 1, str(tmp_path))


def _train_twice(rank, world, tmp):
    import json
    import os

    from ds_parallel.config.load import load_config
    from ds_parallel.parallel.groups import build_parallel_context
    from ds_parallel.parallel.topology import Topology
    from ds_parallel.train.trainer import train

    def run(out, extra):
        cfg = load_config(None, ["model.preset=debug_v3", "parallel.zero_stage=1", "precision.optimizer_moments=bf16",
                                 "train.steps=8", "train.log_every=1", "train.save_every=0", "train.global_batch_size=4",
                                 "train.micro_batch_size=2", "train.seq_len=32", f"train.out_dir={out}", *extra],
                          world_size=1)
        train(cfg, build_parallel_context(Topology(1)))
        with open(os.path.join(out, "metrics.jsonl")) as fh:
            return {r["step"]: r["loss"] for r in map(json.loads, fh)}

    straight = run(f"{tmp}/a", [])
    run(f"{tmp}/b", ["train.max_steps_this_run=4"])
    resumed = run(f"{tmp}/b", ["train.max_steps_this_run=4"])
    assert [resumed[s] for s in range(5, 9)] == [straight[s] for s in range(5, 9)]
    assert straight[8] < straight[1]
