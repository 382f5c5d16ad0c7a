"""MLA against transformers' DeepseekV3Attention / DeepseekV2Attention (independent
implementations) and the absorbed decode path against the training path. fp32, CPU."""
import pytest
import torch

from ds_parallel.config.schema import ModelConfig
from ds_parallel.model.mla import MLA, MLACache, precompute_mla_freqs_cis
from ds_parallel.parallel.groups import ParallelContext

# Small shapes with every width different, so a wrong split or view cannot line up by luck.
SHAPES = dict(dim=48, n_heads=4, kv_lora_rank=20, qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=10)
L0, FACTOR = 8, 40.0  # YaRN: original context 8, so a 24-token sequence is extended


def mla_config(q_lora_rank: int, yarn: bool) -> ModelConfig:
    return ModelConfig(
        attention="mla", q_lora_rank=q_lora_rank, rope_interleave=True, norm_eps=1e-6,
        rope_factor=FACTOR if yarn else 1.0, original_max_seq_len=L0,
        max_seq_len=int(L0 * FACTOR) if yarn else 64, **SHAPES,
    )


def init_random(module: torch.nn.Module, seed: int = 0, std: float = 0.15) -> None:
    """Large enough weights that attention is far from uniform; norm gains around 1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            noise = torch.randn(p.shape, generator=gen) * std
            p.copy_(1.0 + noise if "norm" in name else noise)


def hf_config(module_name: str, q_lora_rank: int, yarn: bool):
    if module_name == "v3":
        from transformers import DeepseekV3Config as Config
    else:
        from transformers import DeepseekV2Config as Config
    rope = {"rope_type": "default", "rope_theta": 10000.0}
    if yarn:
        rope = {
            "rope_type": "yarn", "rope_theta": 10000.0, "factor": FACTOR, "original_max_position_embeddings": L0,
            "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0,
        }
    cfg = Config(
        hidden_size=SHAPES["dim"], num_attention_heads=SHAPES["n_heads"], num_key_value_heads=SHAPES["n_heads"],
        q_lora_rank=q_lora_rank or None, kv_lora_rank=SHAPES["kv_lora_rank"],
        qk_nope_head_dim=SHAPES["qk_nope_head_dim"], qk_rope_head_dim=SHAPES["qk_rope_head_dim"],
        v_head_dim=SHAPES["v_head_dim"], rms_norm_eps=1e-6, attention_bias=False,
        max_position_embeddings=int(L0 * FACTOR) if yarn else 64, rope_parameters=rope,
        num_hidden_layers=1, vocab_size=32,
    )
    if module_name == "v3":
        cfg.rope_interleave = True
    cfg._attn_implementation = "eager"
    return cfg


def copy_to_hf(ours: MLA, theirs) -> None:
    """Our names -> HF names, 1:1 with no permutation (see ds_parallel/model/mla.py)."""
    pairs = {"wkv_a": "kv_a_proj_with_mqa", "kv_norm": "kv_a_layernorm", "wkv_b": "kv_b_proj", "wo": "o_proj"}
    if ours.q_lora_rank == 0:
        pairs["wq"] = "q_proj"
    else:
        pairs.update(wq_a="q_a_proj", q_norm="q_a_layernorm", wq_b="q_b_proj")
    with torch.no_grad():
        for a, b in pairs.items():
            getattr(theirs, b).weight.copy_(getattr(ours, a).weight)
    assert sum(p.numel() for p in theirs.parameters()) == sum(p.numel() for p in ours.parameters())


@pytest.mark.parametrize("module_name", ["v3", "v2"])
@pytest.mark.parametrize("q_lora_rank,yarn", [(0, False), (24, False), (24, True), (0, True)])
def test_matches_transformers(module_name, q_lora_rank, yarn):
    torch.manual_seed(0)
    cfg = mla_config(q_lora_rank, yarn)
    ours = MLA(0, cfg, ParallelContext.single())
    init_random(ours)
    hcfg = hf_config(module_name, q_lora_rank, yarn)
    if module_name == "v3":
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention as Attention
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RotaryEmbedding as Rotary
    else:
        from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Attention as Attention
        from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2RotaryEmbedding as Rotary
    theirs = Attention(hcfg, layer_idx=0).eval()
    copy_to_hf(ours, theirs)
    assert theirs.scaling == pytest.approx(ours.softmax_scale, rel=1e-12)

    bsz, seqlen = 2, 24
    x = torch.randn(bsz, seqlen, cfg.dim)
    pos_emb = Rotary(hcfg)(x, torch.arange(seqlen).unsqueeze(0))
    mask = torch.full((seqlen, seqlen), float("-inf")).triu(1).view(1, 1, seqlen, seqlen)
    if module_name == "v3":
        expected, _ = theirs(x, position_embeddings=pos_emb, attention_mask=mask)
    else:
        expected, _ = theirs(x, attention_mask=mask, position_embeddings=pos_emb)
    got = ours(x, precompute_mla_freqs_cis(cfg))
    assert expected.abs().max() > 0.1  # a non-trivial output
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_yarn_softmax_scale_is_v3_value():
    # V3 (factor 40, mscale_all_dim 1; V3 §4.3, inference/model.py): mscale^2 = 1.87385, scale 0.13523.
    cfg = ModelConfig(attention="mla", qk_nope_head_dim=128, qk_rope_head_dim=64, rope_factor=40.0)
    assert MLA(0, cfg, ParallelContext.single()).softmax_scale == pytest.approx(0.13523, abs=1e-5)


@pytest.mark.parametrize("q_lora_rank,yarn", [(0, False), (24, True)])
def test_absorbed_decode_equals_training_path(q_lora_rank, yarn):
    torch.manual_seed(1)
    cfg = mla_config(q_lora_rank, yarn)
    mla = MLA(0, cfg, ParallelContext.single())
    init_random(mla, seed=1)
    bsz, seqlen, prompt = 3, 20, 7
    x = torch.randn(bsz, seqlen, cfg.dim)
    freqs_cis = precompute_mla_freqs_cis(cfg)
    with torch.no_grad():
        full = mla(x, freqs_cis)

    cache = MLACache(bsz + 1, 32, cfg.kv_lora_rank, cfg.qk_rope_head_dim)  # larger than needed
    outs = [mla.forward_decode(x[:, :prompt], freqs_cis, cache, 0)]  # prefill the prompt
    for pos in range(prompt, seqlen):
        outs.append(mla.forward_decode(x[:, pos : pos + 1], freqs_cis, cache, pos))
    torch.testing.assert_close(torch.cat(outs, dim=1), full, rtol=1e-5, atol=1e-5)

    # The cache holds exactly kv_norm(latent) + roped k_pe per token, and those values.
    assert cache.values_per_token == cfg.kv_lora_rank + cfg.qk_rope_head_dim
    assert cache.kv.numel() + cache.pe.numel() == (bsz + 1) * 32 * cache.values_per_token
    with torch.no_grad():
        kv, k_pe = mla._latent(x, freqs_cis)
    torch.testing.assert_close(cache.kv[:bsz, :seqlen], kv)
    torch.testing.assert_close(cache.pe[:bsz, :seqlen], k_pe)
    assert cache.kv[:, seqlen:].abs().max() == 0 and cache.kv[bsz:].abs().max() == 0


def test_cache_per_layer_size_v3():
    # 671B: 512 + 64 = 576 values per token per layer (V2 §2.1.4; DeepSeek's ISCA 2025 paper, Table 1).
    cfg = ModelConfig(attention="mla", kv_lora_rank=512, qk_rope_head_dim=64)
    caches = MLACache.for_layers(cfg, n_layers=2, max_batch=1, max_seq_len=1)
    assert len(caches) == 2 and all(c.values_per_token == 576 for c in caches)
