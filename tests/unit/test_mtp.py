"""Multi-token prediction (V3 §2.2) against a hand-written loop over depths, fp32.

The reference below rebuilds every depth from the model's weights: embedding rows, RMSNorm
by formula, [Emb; h] @ eh_proj^T, the depth's block, head matmul, F.cross_entropy. Its
inputs and targets come from the token stream t_0..t_T (t_T = last label), position by
position: depth k at position i reads t_{i+k} and targets t_{i+k+1}. The last test runs a
tp=2 copy against the single-process model (2 gloo processes).
"""
import pytest
import torch
import torch.nn.functional as F

from ds_parallel.config.load import config_from_dict
from ds_parallel.model import build_model
from ds_parallel.model.mtp import MTPModule
from ds_parallel.model.norm import RMSNorm
from ds_parallel.moe import MoE
from ds_parallel.moe.layer import moe_layers
from ds_parallel.parallel.groups import ParallelContext
from tests.harness import run_dist

CTX = ParallelContext.single()
SMALL = dict(vocab_size=64, dim=32, n_layers=2, n_heads=4, inter_dim=64, max_seq_len=64)
MOE_MLA = dict(
    attention="mla", n_routed_experts=4, n_activated_experts=2, n_shared_experts=1, moe_inter_dim=16,
    n_dense_layers=1, seq_aux_alpha=0.01, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
    rope_interleave=True,
)


def model_cfg(**fields):
    return config_from_dict({"model": {**SMALL, **fields}}).model


def randomise(model, seed=0, std=0.2):
    # Far from the 0.006 init, so that a wrong target or input shifts every loss visibly.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.1 * noise if name.endswith("norm.weight") else std * noise)
    return model


def stream_batch(cfg, bsz=3, seqlen=16, seed=1):
    """Token stream t_0..t_T (B, T+1) and the loader's view: input_ids = t_0..t_{T-1},
    labels[:, t] = t_{t+1}."""
    stream = torch.randint(0, cfg.vocab_size, (bsz, seqlen + 1), generator=torch.Generator().manual_seed(seed))
    return stream, stream[:, :-1], stream[:, 1:].clone()


def rms(x, weight, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight


def reference(model, stream, keep):
    """(lm_loss, aux_loss, [L_1..L_D], mtp_loss, loss) by explicit loops; keep (B, T) bool:
    is labels[:, t] = t_{t+1} supervised."""
    cfg, seqlen = model.cfg, stream.shape[1] - 1
    E, W = model.embed.weight, model.head.weight

    def ce(h, targets, mask):  # targets (B, n), mask (B, n)
        logits = h @ W.T
        return F.cross_entropy(logits.flatten(0, 1), targets.masked_fill(~mask, -100).flatten(), ignore_index=-100)

    h = F.embedding(stream[:, :seqlen], E)
    aux = torch.zeros(())
    for layer in model.layers.values():
        h, a = layer(h, model.freqs_cis[:seqlen])
        aux = aux + a
    h = rms(h, model.norm.weight, cfg.norm_eps)  # h^0
    lm = ce(h, stream[:, 1:], keep)
    losses = []
    for k in range(1, cfg.mtp_depth + 1):
        depth = model.mtp[k - 1]
        n = seqlen - k
        next_tok = torch.stack([stream[:, i + k] for i in range(n)], dim=1)  # t_{i+k}
        target = torch.stack([stream[:, i + k + 1] for i in range(n)], dim=1)  # t_{i+k+1}
        mask = torch.stack([keep[:, i + k] for i in range(n)], dim=1)
        e = rms(F.embedding(next_tok, E), depth.enorm.weight, cfg.norm_eps)
        x = torch.cat([e, rms(h[:, :n], depth.hnorm.weight, cfg.norm_eps)], dim=-1) @ depth.eh_proj.weight.T
        x, a = depth.block(x, model.freqs_cis[:n])
        aux = aux + a
        h = rms(x, depth.norm.weight, cfg.norm_eps)  # h^k, read by the head and by depth k+1
        losses.append(ce(h, target, mask))
    mtp = cfg.mtp_lambda / cfg.mtp_depth * sum(losses)
    return lm, aux, losses, mtp, lm + aux + mtp


def assert_matches_reference(model, stream, labels, keep):
    out = model(stream[:, :-1], labels=labels)
    lm, aux, losses, mtp, loss = reference(model, stream, keep)
    tol = dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.lm_loss, lm, **tol)
    torch.testing.assert_close(out.aux_loss, aux, **tol)
    torch.testing.assert_close(out.mtp_losses, torch.stack(losses).detach(), **tol)
    torch.testing.assert_close(out.mtp_loss, mtp, **tol)
    torch.testing.assert_close(out.loss, loss, **tol)
    return out, losses


def test_parameter_names_and_shapes():
    cfg = model_cfg(mtp_depth=2)
    params = dict(build_model(cfg, CTX, seed=0).named_parameters())
    for k in range(2):
        assert params[f"mtp.{k}.enorm.weight"].shape == (32,)
        assert params[f"mtp.{k}.hnorm.weight"].shape == (32,)
        assert params[f"mtp.{k}.eh_proj.weight"].shape == (32, 64)  # (dim, 2*dim), HF eh_proj layout
        assert params[f"mtp.{k}.norm.weight"].shape == (32,)
        assert f"mtp.{k}.block.attn.wq.weight" in params and f"mtp.{k}.block.ffn.w1.weight" in params
    # Shared, not copied: no embedding or head under mtp.
    assert not any(n.startswith("mtp.") and ("embed" in n or "head" in n) for n in params)
    assert all(isinstance(m, MTPModule) for m in build_model(cfg, CTX, seed=0).mtp)


def test_dense_mtp_loss_matches_hand_loop():
    cfg = model_cfg(mtp_depth=2, mtp_lambda=0.3)
    model = randomise(build_model(cfg, CTX, seed=0))
    stream, _, labels = stream_batch(cfg)
    out, losses = assert_matches_reference(model, stream, labels, torch.ones_like(labels, dtype=torch.bool))
    assert 0.5 < losses[0].item() and out.mtp_loss.item() > 0.1  # far from trivially zero
    # Negative control: depth 1 scored against t_{i+k} (off by one) is 1e4 x the tolerance off.
    h1 = model.mtp(model.norm(_trunk(model, stream[:, :-1])), model.embed(stream[:, :-1]), model.freqs_cis)[0][0]
    wrong = F.cross_entropy(model.head(h1).flatten(0, 1), stream[:, 1:-1].flatten())
    assert abs(wrong.item() - out.mtp_losses[0].item()) > 1e-2


def _trunk(model, ids):
    h = model.embed(ids)
    for layer in model.layers.values():
        h, _ = layer(h, model.freqs_cis[: ids.shape[1]])
    return h


def test_moe_mla_mtp_matches_hand_loop_and_adds_aux_losses():
    cfg = model_cfg(mtp_depth=2, mtp_lambda=0.1, **MOE_MLA)
    model = randomise(build_model(cfg, CTX, seed=0))
    # Global layer ids continue the main stack (HF: model.layers.<n_layers>), so the dense /
    # MoE rule of the main stack applies and the bias update sees the MTP routers.
    assert [m.block.layer_id for m in model.mtp] == [2, 3]
    assert all(isinstance(m.block.ffn, MoE) for m in model.mtp)
    assert [m.layer_id for m in moe_layers(model)] == [1, 2, 3]
    stream, _, labels = stream_batch(cfg, seed=2)
    out, _ = assert_matches_reference(model, stream, labels, torch.ones_like(labels, dtype=torch.bool))
    without = model(stream[:, :-1])  # no labels: main stack only
    assert out.aux_loss.item() > without.aux_loss.item() > 0  # MTP blocks' balance losses are in


def test_masked_labels_and_sequence_end_are_excluded():
    cfg = model_cfg(mtp_depth=2)
    model = randomise(build_model(cfg, CTX, seed=0), seed=3)
    stream, _, labels = stream_batch(cfg, seed=4)
    keep = torch.ones_like(labels, dtype=torch.bool)
    keep[:, -3:] = False  # padded tail
    keep[0, :6] = False  # answer-only style prompt mask
    keep[1, 7] = False
    out, _ = assert_matches_reference(model, stream, labels.masked_fill(~keep, -100), keep)
    # Depth k sees positions 0..T-k-1 only; with only labels[:, 0] kept, depth 1 and 2 have
    # no target at all: 0, not nan.
    keep = torch.zeros_like(keep)
    keep[:, 0] = True
    out = model(stream[:, :-1], labels=labels.masked_fill(~keep, -100))
    assert torch.equal(out.mtp_losses, torch.zeros(2)) and torch.isfinite(out.loss)


def test_main_model_is_unchanged_by_adding_mtp():
    base = build_model(model_cfg(), CTX, seed=7)
    with_mtp = build_model(model_cfg(mtp_depth=2), CTX, seed=7)
    mtp_params = dict(with_mtp.named_parameters())
    extra = set(mtp_params) - {n for n, _ in base.named_parameters()}
    assert extra and all(n.startswith("mtp.") for n in extra)
    for name, p in base.named_parameters():  # init is seeded by name: same draws
        assert torch.equal(p, mtp_params[name]), name
    cfg = base.cfg
    _, ids, labels = stream_batch(cfg)
    a, b = base(ids, labels=labels), with_mtp(ids, labels=labels)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.lm_loss, b.lm_loss)
    assert a.mtp_loss is None and b.mtp_loss is not None
    torch.testing.assert_close(b.loss, b.lm_loss + b.aux_loss + b.mtp_loss, rtol=0, atol=0)


def test_inference_skips_mtp():
    model = build_model(model_cfg(mtp_depth=1), CTX, seed=0)
    calls = []
    model.mtp[0].register_forward_hook(lambda *_: calls.append(1))
    _, ids, labels = stream_batch(model.cfg)
    out = model(ids)
    assert out.loss is None and out.mtp_loss is None and out.mtp_losses is None and calls == []
    assert torch.equal(out.logits, model(ids, labels=labels).logits) and calls == [1]


def test_mtp_gradient_reaches_shared_embedding_and_head():
    cfg = model_cfg(mtp_depth=1, mtp_lambda=0.0)
    model = randomise(build_model(cfg, CTX, seed=0))
    _, ids, labels = stream_batch(cfg)
    shared = [model.head.weight, model.embed.weight]

    out0 = model(ids, labels=labels)
    out0.loss.backward()
    g0 = [p.grad.clone() for p in shared]
    for name, p in model.named_parameters():  # lambda = 0: MTP weights get exactly nothing
        if name.startswith("mtp."):
            assert not p.grad.any(), name
    model.zero_grad()

    out = model(ids, objective=lambda m, t: m.finish(t.h, t.aux_loss, labels, t.emb, t.freqs_cis, mtp_lambda=0.3))
    g_mtp = torch.autograd.grad(out.mtp_loss, shared, retain_graph=True)
    out.loss.backward()
    for p, before, extra in zip(shared, g0, g_mtp):
        assert extra.norm() > 0.05 * before.norm()  # a real contribution, not rounding
        torch.testing.assert_close(p.grad, before + extra, rtol=1e-5, atol=1e-7)
    assert model.mtp[0].eh_proj.weight.grad.abs().sum() > 0


def test_depth_two_reads_depth_one_hidden_states():
    cfg = model_cfg(mtp_depth=2)
    model = randomise(build_model(cfg, CTX, seed=0), seed=5)
    _, ids, labels = stream_batch(cfg)
    with torch.no_grad():
        before = model(ids, labels=labels)
        noise = torch.randn(model.mtp[0].eh_proj.weight.shape, generator=torch.Generator().manual_seed(11))
        model.mtp[0].eh_proj.weight.add_(0.05 * noise)
        after = model(ids, labels=labels)
    assert torch.equal(after.lm_loss, before.lm_loss)
    assert (after.mtp_losses - before.mtp_losses).abs().min() > 1e-3  # depth 2 moves with depth 1
    with torch.no_grad():
        model.mtp[1].eh_proj.weight.mul_(1.5)
        last = model(ids, labels=labels)
    assert last.mtp_losses[0] == after.mtp_losses[0] and abs(last.mtp_losses[1] - after.mtp_losses[1]) > 1e-3


def test_depth_k_at_position_i_sees_tokens_up_to_i_plus_k():
    cfg = model_cfg(mtp_depth=2)
    model = randomise(build_model(cfg, CTX, seed=0), std=0.1)
    _, ids, _ = stream_batch(cfg, seqlen=20)
    changed = ids.clone()
    p = 12
    changed[:, p] = (ids[:, p] + 1) % cfg.vocab_size

    def hidden(x):
        return model.mtp(model.norm(_trunk(model, x)), model.embed(x), model.freqs_cis)[0]

    with torch.no_grad():
        for k, (a, b) in enumerate(zip(hidden(ids), hidden(changed)), start=1):
            torch.testing.assert_close(a[:, : p - k], b[:, : p - k], rtol=0, atol=1e-6)
            assert (a[:, p - k] - b[:, p - k]).abs().amax(-1).min() > 1e-4  # i = p-k reads t_p


def test_mtp_lambda_schedule_hook():
    """The trainer's schedule reaches the MTP weight through the objective's finish() call;
    forward() weighs by cfg.mtp_lambda."""
    cfg = model_cfg(mtp_depth=2, mtp_lambda=0.3)
    model = build_model(cfg, CTX, seed=0)
    _, ids, labels = stream_batch(cfg)
    a = model(ids, labels=labels)
    b = model(ids, objective=lambda m, t: m.finish(t.h, t.aux_loss, labels, t.emb, t.freqs_cis, mtp_lambda=0.1))
    torch.testing.assert_close(b.mtp_loss, a.mtp_loss / 3, rtol=1e-6, atol=0)
    torch.testing.assert_close(a.mtp_loss, 0.3 / 2 * a.mtp_losses.sum(), rtol=1e-6, atol=0)
    torch.testing.assert_close(b.lm_loss, a.lm_loss, rtol=0, atol=0)  # the same trunk and head


def _check_mtp_tp(rank, world):
    from ds_parallel.parallel.groups import build_parallel_context
    from ds_parallel.parallel.shard import gather_full, shards_of
    from ds_parallel.parallel.topology import Topology

    ctx = build_parallel_context(Topology(world, tp=2))
    for extra in ({}, {"attention": "mla", "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 8}):
        cfg = model_cfg(mtp_depth=2, **extra)
        ref, model = build_model(cfg, CTX, seed=3), build_model(cfg, ctx, seed=3)
        _, ids, labels = stream_batch(cfg)
        labels[:, -2:] = -100
        out_ref, out = ref(ids, labels=labels), model(ids, labels=labels)
        out_ref.loss.backward()
        out.loss.backward()
        torch.testing.assert_close(out.mtp_loss, out_ref.mtp_loss, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(out.loss, out_ref.loss, rtol=1e-5, atol=1e-7)
        ref_params = dict(ref.named_parameters())
        for name, p in model.named_parameters():
            want = ref_params[name].grad
            got = gather_full(p.grad, shards_of(p), ctx)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item(), msg=lambda m: f"{name}: {m}")


@pytest.mark.dist
def test_mtp_tp2_equals_single_process():
    run_dist(_check_mtp_tp, 2)
