"""Dense model pieces against hand formulas, in one process (fp32)."""
import math

import torch
import torch.nn.functional as F
from torch import nn

from ds_parallel.config.load import config_from_dict
from ds_parallel.model import ModelOutput, build_model, init_weights
from ds_parallel.model.attention import Attention
from ds_parallel.model.mlp import MLP
from ds_parallel.model.norm import RMSNorm
from ds_parallel.model.rope import YarnScaling, apply_rotary, precompute_freqs_cis
from ds_parallel.model.transformer import model_freqs_cis
from ds_parallel.parallel.groups import ParallelContext
from ds_parallel.parallel.shard import ShardSpec, set_shards
from ds_parallel.parallel.tensor_parallel import vocab_parallel_cross_entropy

CTX = ParallelContext.single()


def model_cfg(**fields):
    return config_from_dict({"model": fields}).model


def randomise(module: nn.Module, seed: int = 0, std: float = 0.3) -> nn.Module:
    # Larger than the 0.006 init so that attention patterns and gates are far from uniform.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


def test_rmsnorm_matches_formula_and_computes_in_fp32():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 3, 16, generator=g) * 5, torch.randn(16, generator=g)
    norm = RMSNorm(16, eps=1e-5)
    norm.weight.data.copy_(w)
    want = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-5) * w
    torch.testing.assert_close(norm(x), want, rtol=1e-6, atol=1e-6)
    # bf16 in -> bf16 out, but the statistics are taken in fp32 from the bf16 values.
    xb = x.bfloat16()
    out = norm(xb)
    assert out.dtype == torch.bfloat16
    xf = xb.float()
    torch.testing.assert_close(out, (xf * torch.rsqrt((xf * xf).mean(-1, keepdim=True) + 1e-5) * w).bfloat16())


def test_swiglu_matches_formula():
    mlp = randomise(MLP(16, 24, CTX))
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))
    w1, w2, w3 = mlp.w1.weight, mlp.w2.weight, mlp.w3.weight
    a = x @ w1.T
    want = ((a / (1 + torch.exp(-a))) * (x @ w3.T)) @ w2.T
    torch.testing.assert_close(mlp(x), want, rtol=1e-5, atol=1e-6)


def naive_attention(x, wq, wk, wv, wo, n_heads, freqs_cis, interleaved):
    """softmax(q k^T / sqrt(d) + causal mask) v, written out with einsum; MHA only."""
    B, T, _ = x.shape
    q = (x @ wq.T).view(B, T, n_heads, -1)
    k = (x @ wk.T).view(B, T, n_heads, -1)
    v = (x @ wv.T).view(B, T, n_heads, -1)
    q, k = apply_rotary(q, freqs_cis, interleaved), apply_rotary(k, freqs_cis, interleaved)
    scores = torch.einsum("bshd,bthd->bsht", q, k) / math.sqrt(q.shape[-1])
    future = torch.ones(T, T, dtype=torch.bool).triu(1)
    p = scores.masked_fill(future.view(1, T, 1, T), float("-inf")).softmax(-1)
    return torch.einsum("bsht,bthd->bshd", p, v).reshape(B, T, -1) @ wo.T


def test_attention_matches_naive_formula():
    cfg = model_cfg(dim=32, n_heads=4)
    attn = randomise(Attention(cfg, CTX))
    x = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(2))
    freqs = precompute_freqs_cis(8, 16, cfg.rope_theta)
    want = naive_attention(x, attn.wq.weight, attn.wk.weight, attn.wv.weight, attn.wo.weight, 4, freqs, False)
    torch.testing.assert_close(attn(x, freqs), want, rtol=1e-5, atol=1e-5)


def test_gqa_with_duplicated_kv_heads_equals_mha():
    gqa = randomise(Attention(model_cfg(dim=32, n_heads=4, n_kv_heads=2), CTX))
    mha = Attention(model_cfg(dim=32, n_heads=4), CTX)
    with torch.no_grad():
        mha.wq.weight.copy_(gqa.wq.weight)
        mha.wo.weight.copy_(gqa.wo.weight)
        # Query heads 0,1 read KV head 0 and heads 2,3 read KV head 1: duplicate accordingly.
        for name in ("wk", "wv"):
            heads = getattr(gqa, name).weight.view(2, 8, 32)
            getattr(mha, name).weight.copy_(heads.repeat_interleave(2, dim=0).reshape(32, 32))
    x = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(3))
    freqs = precompute_freqs_cis(8, 16, 10000.0)
    torch.testing.assert_close(gqa(x, freqs), mha(x, freqs), rtol=1e-5, atol=1e-6)


def test_split_half_and_interleaved_rope_agree_under_channel_permutation():
    # Interleaved pairs (2i, 2i+1) and split halves (i, i + D/2) rotate by the same
    # frequency f_i; moving channel 2i -> i and 2i+1 -> i + D/2 in every head of wq and wk
    # turns one into the other, and q.k is invariant to a shared channel permutation.
    D, H = 8, 4
    inter = randomise(Attention(model_cfg(dim=32, n_heads=H, rope_interleave=True), CTX))
    split = Attention(model_cfg(dim=32, n_heads=H, rope_interleave=False), CTX)
    perm = torch.cat([torch.arange(0, D, 2), torch.arange(1, D, 2)])
    with torch.no_grad():
        split.load_state_dict(inter.state_dict())
        for name in ("wq", "wk"):
            getattr(split, name).weight.copy_(getattr(inter, name).weight.view(H, D, 32)[:, perm].reshape(H * D, 32))
    x = torch.randn(2, 11, 32, generator=torch.Generator().manual_seed(4))
    freqs = precompute_freqs_cis(D, 16, 10000.0)
    torch.testing.assert_close(split(x, freqs), inter(x, freqs), rtol=1e-5, atol=1e-6)
    # Without the permutation the layouts really differ (the flag is not ignored).
    split.load_state_dict(inter.state_dict())
    assert (split(x, freqs) - inter(x, freqs)).abs().max() > 1e-3


def test_causal_future_token_does_not_change_earlier_logits():
    model = randomise(build_model(model_cfg(), CTX, seed=0), std=0.1)
    for norm in (m for m in model.modules() if isinstance(m, RMSNorm)):
        norm.weight.data.fill_(1.0)
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(5))
    changed = ids.clone()
    changed[:, 15] = (ids[:, 15] + 1) % 128
    a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :15], b[:, :15], rtol=0, atol=1e-6)
    assert (a[:, 15:] - b[:, 15:]).abs().amax(-1).min() > 1e-4  # every later position sees it


def test_dense_model_matches_transformers_llama():
    """The dense model (GQA, split-half RoPE, SwiGLU, pre-norm RMSNorm; DeepSeek-V1's
    architecture, which is Llama's) against transformers' LlamaForCausalLM with the same
    weights, randomised well above the init scale so every part shows in the logits: logits
    and the loss (ours takes labels already shifted, transformers shifts them itself)."""
    import transformers

    cfg = model_cfg(n_kv_heads=2)
    model = randomise(build_model(cfg, CTX, seed=0), std=0.1)
    with torch.no_grad():
        for norm in (m for m in model.modules() if isinstance(m, RMSNorm)):
            norm.weight.add_(1.0)  # gains around 1, not around 0
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.inter_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        rms_norm_eps=cfg.norm_eps, max_position_embeddings=cfg.max_seq_len, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta}, attn_implementation="eager"))
    names = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
             "head.weight": "lm_head.weight"}
    parts = {"attn.wq": "self_attn.q_proj", "attn.wk": "self_attn.k_proj", "attn.wv": "self_attn.v_proj",
             "attn.wo": "self_attn.o_proj", "ffn.w1": "mlp.gate_proj", "ffn.w3": "mlp.up_proj",
             "ffn.w2": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
    for i in range(cfg.n_layers):
        names |= {f"layers.{i}.{ours}.weight": f"model.layers.{i}.{theirs}.weight" for ours, theirs in parts.items()}
    ours = model.state_dict()
    assert set(names) == set(ours) and set(names.values()) == set(hf.state_dict())
    hf.load_state_dict({theirs: ours[name] for name, theirs in names.items()})
    ids = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(6))
    labels = ids.roll(-1, dims=1)
    labels[:, -1] = -100
    out = model(ids, labels=labels)
    with torch.no_grad():
        want = hf.eval()(ids, labels=ids)
    assert isinstance(out, ModelOutput) and out.logits.shape == (2, 40, cfg.vocab_size)
    assert want.logits.std() > 1.0  # far from the near-uniform logits of init
    torch.testing.assert_close(out.logits, want.logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.loss, want.loss, rtol=1e-5, atol=1e-5)
    assert out.aux_loss.item() == 0.0 and out.loss.item() == out.lm_loss.item()
    no_labels = model(ids)
    assert no_labels.loss is None and no_labels.lm_loss is None


def test_vocab_parallel_cross_entropy_tp1_equals_torch():
    g = torch.Generator().manual_seed(7)
    logits = (torch.randn(3, 10, 50, generator=g) * 4).requires_grad_()
    labels = torch.randint(0, 50, (3, 10), generator=g)
    labels[0, :4] = -100
    labels[2, 9] = -100
    ours = vocab_parallel_cross_entropy(logits, labels, CTX)
    (grad_ours,) = torch.autograd.grad(ours, logits)
    want = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    (grad_want,) = torch.autograd.grad(want, logits)
    torch.testing.assert_close(ours, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad_ours, grad_want, rtol=1e-5, atol=1e-7)
    # Stable for huge logits (a naive exp would overflow to inf).
    big = vocab_parallel_cross_entropy(logits.detach() + 1e4, labels, CTX)
    torch.testing.assert_close(big, want.detach(), rtol=1e-4, atol=1e-4)


def test_init_is_deterministic_and_seed_dependent():
    cfg = model_cfg()
    a, b, c = (build_model(cfg, CTX, seed=s).state_dict() for s in (1, 1, 2))
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert not torch.equal(a["layers.0.attn.wq.weight"], c["layers.0.attn.wq.weight"])
    assert torch.equal(a["norm.weight"], torch.ones(cfg.dim))
    w = torch.cat([a[k].flatten() for k in a if not k.endswith("norm.weight")])
    assert abs(w.std().item() - cfg.init_std) < 2e-4 and abs(w.mean().item()) < 2e-4
    # Two parameters of the same shape are different draws (seeded by name).
    assert not torch.equal(a["layers.0.attn.wq.weight"], a["layers.0.attn.wk.weight"])


class _Sharded(nn.Module):
    """A dense weight split on dim 1 and an expert weight split on dim 0 by a fake layout."""

    def __init__(self, tp_index=0, tp=1, ep_index=0, ep=1):
        super().__init__()
        self.w = nn.Parameter(torch.empty(6, 8 // tp))
        set_shards(self.w, ShardSpec(1, tp_index, tp, "tp"))
        self.experts = nn.Parameter(torch.empty(4 // ep, 6 // tp, 5))
        set_shards(self.experts, ShardSpec(0, ep_index, ep, "ep"), ShardSpec(1, tp_index, tp, "tp"))
        self.experts.init_per_expert = True


def test_init_is_layout_independent():
    full = init_weights(_Sharded(), seed=3, std=1.0)
    for tp_index in range(2):
        for ep_index in range(2):
            part = init_weights(_Sharded(tp_index, 2, ep_index, 2), seed=3, std=1.0)
            assert torch.equal(part.w, full.w.chunk(2, 1)[tp_index])
            want = full.experts.chunk(2, 0)[ep_index].chunk(2, 1)[tp_index]
            assert torch.equal(part.experts, want)


def test_freqs_cis_per_attention_type_and_dtype_cast():
    assert model_freqs_cis(model_cfg()).shape == (256, 16)  # head_dim 32
    mla = model_cfg(attention="mla", qk_rope_head_dim=16, rope_factor=40.0, original_max_seq_len=64)
    yarn = YarnScaling(40.0, 64, 32.0, 1.0, 1.0, 1.0)
    torch.testing.assert_close(model_freqs_cis(mla), precompute_freqs_cis(16, 256, 10000.0, yarn))
    assert not torch.allclose(model_freqs_cis(mla), precompute_freqs_cis(16, 256, 10000.0))
    # .to(bf16) must not turn the complex rotations into their real part.
    model = build_model(model_cfg(n_layers=1), CTX, seed=0).to(torch.bfloat16)
    assert model.freqs_cis.dtype == torch.complex64
    assert model.head.weight.dtype == torch.bfloat16


def test_heldout_lm_loss_is_the_token_weighted_cross_entropy():
    """Batches of unequal size and windows with few labelled tokens: the held-out loss is the
    mean over labelled tokens, computed independently with F.cross_entropy; MoE loads are
    not counted (eval mode) and the model's training flag is restored."""
    import numpy as np

    from ds_parallel.data import PackedSamples
    from ds_parallel.moe import moe_layers
    from ds_parallel.train.evaluate import heldout_lm_loss

    model = build_model(model_cfg(preset="debug_v3"), CTX, seed=0)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 100, 10 * 16 + 1)
    supervised = rng.random(tokens.size) < 0.3
    samples = PackedSamples(tokens, 16, supervised)
    got = heldout_lm_loss(model, samples, n_samples=7, batch_size=3)
    assert model.training and all(int(layer.gate.load.sum()) == 0 for layer in moe_layers(model))
    inputs, labels = samples.inputs_and_labels(list(range(7)))
    with torch.no_grad():
        logits = model(inputs).logits
    want = F.cross_entropy(logits.flatten(0, 1).double(), labels.flatten(), ignore_index=-100)
    assert abs(got - want.item()) < 1e-5 * want.item(), (got, want.item())
