"""MLA split over heads on 2 gloo ranks equals the single-process module (docs/architecture.md,
invariant 2): outputs, input gradients and every parameter gradient (gathered to full shape), for both
query paths, plus the absorbed decode path."""
import pytest
import torch

from tests.harness import run_dist

pytestmark = pytest.mark.dist


def _check_mla_tp(rank, world):
    from ds_parallel.model.mla import MLA, MLACache, precompute_mla_freqs_cis
    from ds_parallel.parallel.groups import ParallelContext, build_parallel_context
    from ds_parallel.parallel.shard import gather_full, local_slice, shards_of
    from ds_parallel.parallel.topology import Topology
    from tests.unit.test_mla import init_random, mla_config

    ctx = build_parallel_context(Topology(world, tp=2))

    def close(got, want, what):
        # 1e-5 relative to the tensor's scale: a gradient entry near zero is a sum of O(1)
        # terms whose order differs between layouts, so element-wise rtol alone is too tight.
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item(), msg=lambda m: f"{what}: {m}")
    for q_lora_rank, yarn in [(0, False), (24, True)]:
        cfg = mla_config(q_lora_rank, yarn)
        ref = MLA(0, cfg, ParallelContext.single())
        init_random(ref, seed=3)  # same full weights on every rank
        mla = MLA(0, cfg, ctx)
        full = dict(ref.named_parameters())
        with torch.no_grad():
            for name, p in mla.named_parameters():
                p.copy_(local_slice(full[name], shards_of(p)))
        assert mla.n_local_heads == cfg.n_heads // 2
        assert shards_of(mla.wkv_b.weight) and shards_of(mla.wo.weight) and not shards_of(mla.wkv_a.weight)

        gen = torch.Generator().manual_seed(7)
        x = torch.randn(2, 16, cfg.dim, generator=gen)
        grad_out = torch.randn(2, 16, cfg.dim, generator=gen)
        freqs_cis = precompute_mla_freqs_cis(cfg)
        x_ref, x_tp = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_ref, out_tp = ref(x_ref, freqs_cis), mla(x_tp, freqs_cis)
        out_ref.backward(grad_out)
        out_tp.backward(grad_out)
        close(out_tp, out_ref, "output")
        close(x_tp.grad, x_ref.grad, "input grad")
        for name, p in mla.named_parameters():
            close(gather_full(p.grad, shards_of(p), ctx), full[name].grad, f"{name} grad")

        # Absorbed decode with the local heads' slice of wkv_b: prefill 5, then 1 by 1.
        cache = MLACache(2, 16, cfg.kv_lora_rank, cfg.qk_rope_head_dim)
        outs = [mla.forward_decode(x[:, :5], freqs_cis, cache, 0)]
        outs += [mla.forward_decode(x[:, p : p + 1], freqs_cis, cache, p) for p in range(5, 16)]
        close(torch.cat(outs, dim=1), out_ref.detach(), "absorbed decode")


def test_mla_tp2_equals_tp1():
    run_dist(_check_mla_tp, 2)
