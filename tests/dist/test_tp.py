"""Tensor parallelism does not change the math (docs/architecture.md, invariant 2), 2 gloo
processes.

One spawn runs every check: the tp=2 model against the single-process reference built from
the same seed (weights exactly, loss/gradients/logits to 1e-5 relative) for MHA and GQA, and
the parallel layers and vocab-parallel loss against their unsharded versions.
"""
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from tests.harness import run_dist

pytestmark = pytest.mark.dist

RTOL = 1e-5


def _close(got, want, what, errs):
    # Elementwise rtol, with an atol scaled to the tensor: entries near zero (cancellations
    # in a sum) cannot be held to 1e-5 of themselves, only of the tensor they belong to.
    scale = want.abs().max().item()
    torch.testing.assert_close(got, want, rtol=RTOL, atol=RTOL * scale, msg=lambda m: f"{what}: {m}")
    diff = (got - want).abs().max().item()
    errs["abs"] = max(errs["abs"], diff)
    errs["rel"] = max(errs["rel"], diff / scale)


def _same_on_all_ranks(t, group):
    pieces = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(pieces, t.detach().contiguous(), group=group)
    assert all(torch.equal(p, pieces[0]) for p in pieces)


def _check_model(cfg, ctx, errs):
    from ds_parallel.model import build_model
    from ds_parallel.parallel.groups import ParallelContext
    from ds_parallel.parallel.shard import gather_full, shards_of
    from ds_parallel.parallel.tensor_parallel import gather_logits

    ref = build_model(cfg, ParallelContext.single(), seed=11)
    model = build_model(cfg, ctx, seed=11)
    ref_params = dict(ref.named_parameters())
    assert ref_params.keys() == dict(model.named_parameters()).keys()
    for name, p in model.named_parameters():
        assert torch.equal(gather_full(p, shards_of(p), ctx), ref_params[name]), f"init differs: {name}"

    g = torch.Generator().manual_seed(5)  # same batch on both ranks
    ids = torch.randint(0, cfg.vocab_size, (2, 32), generator=g)
    labels = ids.roll(-1, dims=1)
    labels[:, -1] = -100
    labels[0, :3] = -100
    out_ref, out = ref(ids, labels=labels), model(ids, labels=labels)
    out_ref.loss.backward()
    out.loss.backward()
    _close(out.loss, out_ref.loss, "loss", errs)
    _same_on_all_ranks(out.loss, ctx.tp_group)
    assert out.logits.shape[-1] == cfg.vocab_size // ctx.tp
    _close(gather_logits(out.logits, ctx), out_ref.logits, "logits", errs)
    for name, p in model.named_parameters():
        _close(gather_full(p.grad, shards_of(p), ctx), ref_params[name].grad, f"grad {name}", errs)


def _check_layers(ctx, errs):
    from ds_parallel.parallel.shard import local_slice, shards_of
    from ds_parallel.parallel.tensor_parallel import (
        ColumnParallelLinear,
        RowParallelLinear,
        VocabParallelEmbedding,
        vocab_parallel_cross_entropy,
    )

    g = torch.Generator().manual_seed(6)
    # Embedding: ids from both halves of the vocab, compared with the full table.
    table = torch.randn(64, 16, generator=g)
    emb = VocabParallelEmbedding(64, 16, ctx)
    emb.weight.data.copy_(local_slice(table, shards_of(emb.weight)))
    ids = torch.randint(0, 64, (3, 10), generator=g)
    full = table.clone().requires_grad_()
    upstream = torch.randn(3, 10, 16, generator=g)
    (emb(ids) * upstream).sum().backward()
    (F.embedding(ids, full) * upstream).sum().backward()
    _close(emb(ids), F.embedding(ids, table), "embedding", errs)
    _close(emb.weight.grad, local_slice(full.grad, shards_of(emb.weight)), "embedding grad", errs)

    # Cross-entropy over vocab shards, with ignored labels, vs F.cross_entropy on the full logits.
    logits = torch.randn(3, 10, 64, generator=g) * 3
    labels = torch.randint(0, 64, (3, 10), generator=g)
    labels[1, 2:7] = -100
    full = logits.clone().requires_grad_()
    want = F.cross_entropy(full.flatten(0, 1), labels.flatten(), ignore_index=-100)
    want.backward()
    local = logits.chunk(ctx.tp, dim=-1)[ctx.tp_rank].clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(local, labels, ctx)
    loss.backward()
    _close(loss, want, "cross-entropy", errs)
    _same_on_all_ranks(loss, ctx.tp_group)
    _close(local.grad, full.grad.chunk(ctx.tp, dim=-1)[ctx.tp_rank], "cross-entropy grad", errs)

    # The gather/scatter paths: column with gathered output, row with a replicated input.
    w1, w2 = torch.randn(12, 8, generator=g), torch.randn(8, 12, generator=g)
    x = torch.randn(4, 8, generator=g)
    col = ColumnParallelLinear(8, 12, ctx, gather_output=True)
    row = RowParallelLinear(12, 8, ctx, input_is_parallel=False)
    col.weight.data.copy_(local_slice(w1, shards_of(col.weight)))
    row.weight.data.copy_(local_slice(w2, shards_of(row.weight)))
    xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    F.linear(F.linear(xf, w1), w2).square().sum().backward()
    y = row(col(xr))
    y.square().sum().backward()
    _close(y, F.linear(F.linear(x, w1), w2), "col(gather) -> row(scatter)", errs)
    _close(xr.grad, xf.grad, "col/row input grad", errs)


def _check_tp(rank, world):
    from ds_parallel.config.load import config_from_dict
    from ds_parallel.parallel.groups import build_parallel_context
    from ds_parallel.parallel.topology import Topology

    torch.manual_seed(0)
    ctx = build_parallel_context(Topology(world, tp=2))
    assert ctx.tp == 2 and ctx.tp_rank == rank
    errs = {"abs": 0.0, "rel": 0.0}
    for preset in ("debug_dense", "debug_dense_gqa"):
        _check_model(config_from_dict({"model": {"preset": preset}}).model, ctx, errs)
    _check_model(config_from_dict({"model": {"preset": "debug_dense", "rope_interleave": True}}).model, ctx, errs)
    _check_layers(ctx, errs)
    if rank == 0:
        print(f"\ntp=2 parity: max abs err {errs['abs']:.3g}, max err / max|ref| {errs['rel']:.3g}", flush=True)


def test_tensor_parallel_matches_single_process():
    run_dist(_check_tp, 2)
