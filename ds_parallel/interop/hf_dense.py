"""HF Llama / Qwen2 config.json <-> ModelConfig of the dense MHA/GQA model.

Both are our dense model (DeepSeek LLM's shape: pre-norm blocks, GQA attention with RoPE over
whole heads, SwiGLU FFN) with at most two additions, both ModelConfig fields: `qkv_bias`
(Qwen2's q/k/v biases; o has none) and `tie_embeddings`. What transformers 5.24 computes
(modeling_llama / modeling_qwen2), and how it maps:
  * RoPE rotates split halves (rotate_half). Our Attention rotates split halves with
    rope_interleave=False, so weights map 1:1 with no row permutation: a round trip is
    bit-identical and a tp slice of whole heads needs no reordering (MLA's V3 split-half
    import permutes instead, because MLA's rope rows are interleaved by our convention).
  * rope_type "default", or "llama3" (factor, low_freq_factor, high_freq_factor,
    original_max_position_embeddings; a top-level original_max_position_embeddings wins, as
    in transformers' standardize_rope_params): model/rope.py. Other types are rejected.
  * One rms_norm_eps serves every norm, any value. head_dim defaults to hidden / heads.
  * Llama's attention_bias puts a bias on o_proj too and mlp_bias on the FFN: neither is
    modelled. Qwen2 always has q/k/v biases and never an o_proj bias. Qwen2's sliding window
    (use_sliding_window, on layers from max_window_layers) is rejected where a layer uses it.
Export writes qwen2 for a model with qkv_bias, llama otherwise.
"""
from __future__ import annotations

from typing import Any

from ds_parallel.config.schema import Config, ModelConfig, TrainConfig
from ds_parallel.config.validate import validate
from ds_parallel.interop.hf_config import bad_field, hf_fields

LLAMA, QWEN2 = "llama", "qwen2"
DENSE_TYPES = (LLAMA, QWEN2)

# transformers 5.24 defaults for keys a hand-written config.json may omit.
_HF_DEFAULTS: dict[str, dict[str, Any]] = {
    LLAMA: dict(num_key_value_heads=None, max_position_embeddings=2048, attention_bias=False, mlp_bias=False),
    QWEN2: dict(num_key_value_heads=32, max_position_embeddings=32768, use_sliding_window=False,
                sliding_window=4096, max_window_layers=28, layer_types=None),
}
_COMMON_DEFAULTS = dict(hidden_act="silu", rms_norm_eps=1e-6, tie_word_embeddings=False, head_dim=None)
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def _rope_from_hf(h: dict[str, Any]) -> dict[str, Any]:
    rope = h.get("rope_parameters") or h.get("rope_scaling") or {}
    if any(isinstance(v, dict) for v in rope.values()):
        raise bad_field("rope_parameters", rope, "per-layer-type RoPE is not supported")
    if rope.get("partial_rotary_factor", h.get("partial_rotary_factor", 1.0)) != 1.0:
        raise bad_field("rope_parameters.partial_rotary_factor", rope.get("partial_rotary_factor"), "only 1.0 is supported")
    out: dict[str, Any] = {"rope_theta": float(rope.get("rope_theta", h.get("rope_theta", 10000.0)))}
    kind = rope.get("rope_type", rope.get("type")) or "default"
    if kind == "default":
        return out
    if kind != "llama3":
        raise bad_field("rope_parameters.rope_type", kind, "Llama/Qwen2 import supports default and llama3 RoPE")
    for key in ("factor", "low_freq_factor", "high_freq_factor"):
        if rope.get(key) is None:
            raise bad_field(f"rope_parameters.{key}", None, "llama3 RoPE needs it")
    orig = h.get("original_max_position_embeddings") or rope.get("original_max_position_embeddings") \
        or h["max_position_embeddings"]
    out.update(rope_scaling="llama3", rope_factor=float(rope["factor"]), original_max_seq_len=int(orig),
               rope_low_freq_factor=float(rope["low_freq_factor"]),
               rope_high_freq_factor=float(rope["high_freq_factor"]))
    return out


def _check_sliding_window(h: dict[str, Any]) -> None:
    """Qwen2Config: layer i slides when use_sliding_window and (layer_types says so, or by
    default i >= max_window_layers)."""
    if not h["use_sliding_window"] or h["sliding_window"] is None:
        return
    n_layers = h["num_hidden_layers"]
    types = h["layer_types"] or ["sliding_attention" if i >= h["max_window_layers"] else "full_attention"
                                 for i in range(n_layers)]
    if "sliding_attention" in types:
        raise bad_field("use_sliding_window", True, f"layers {types.index('sliding_attention')}.. would use a sliding "
                   f"window of {h['sliding_window']}; only full causal attention is modelled")


def dense_config_from_hf(hf_config: dict[str, Any]) -> ModelConfig:
    """An HF Llama / Qwen2 config.json dict -> ModelConfig. ValueError (one line, naming the
    key) for anything the model cannot represent exactly."""
    model_type, h = hf_fields(hf_config, _HF_DEFAULTS, _REQUIRED, _COMMON_DEFAULTS)
    if model_type == LLAMA:
        if h["attention_bias"]:
            raise bad_field("attention_bias", True, "Llama's attention_bias also biases o_proj, which is not modelled")
        if h["mlp_bias"]:
            raise bad_field("mlp_bias", True, "the SwiGLU FFN has no biases")
    else:
        _check_sliding_window(h)
    dim, n_heads = h["hidden_size"], h["num_attention_heads"]
    head_dim = h["head_dim"] or dim // n_heads
    cfg = ModelConfig(
        vocab_size=h["vocab_size"], dim=dim, n_layers=h["num_hidden_layers"], n_heads=n_heads,
        n_kv_heads=h["num_key_value_heads"] or n_heads, head_dim=None if head_dim * n_heads == dim else head_dim,
        inter_dim=h["intermediate_size"], max_seq_len=h["max_position_embeddings"],
        norm_eps=float(h["rms_norm_eps"]), attention="mha", rope_interleave=False,  # split halves: module docstring
        qkv_bias=model_type == QWEN2, tie_embeddings=bool(h["tie_word_embeddings"]), **_rope_from_hf(h),
    )
    validate(Config(model=cfg, train=TrainConfig(seq_len=min(TrainConfig.seq_len, cfg.max_seq_len))))
    return cfg


def hf_config_from_dense(cfg: ModelConfig) -> dict[str, Any]:
    """A dense MHA/GQA ModelConfig -> an HF config.json dict: qwen2 with qkv_bias, else llama."""
    if cfg.attention != "mha":
        raise ValueError(f"model.attention={cfg.attention}: HF Llama/Qwen2 checkpoints hold MHA/GQA models only")
    if cfg.n_routed_experts:
        raise ValueError(f"model.n_routed_experts={cfg.n_routed_experts}: HF Llama/Qwen2 models are dense")
    if cfg.mtp_depth:
        raise ValueError(f"model.mtp_depth={cfg.mtp_depth}: HF Llama/Qwen2 have no MTP layers")
    if cfg.rope_interleave:
        raise ValueError("model.rope_interleave=true: HF Llama/Qwen2 rotate split halves; only false exports")
    model_type = QWEN2 if cfg.qkv_bias else LLAMA
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling == "llama3":
        rope.update(rope_type="llama3", factor=cfg.rope_factor, low_freq_factor=cfg.rope_low_freq_factor,
                    high_freq_factor=cfg.rope_high_freq_factor,
                    original_max_position_embeddings=cfg.original_max_seq_len)
    out = {
        "architectures": ["Qwen2ForCausalLM" if model_type == QWEN2 else "LlamaForCausalLM"],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "intermediate_size": cfg.inter_dim,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.mha_kv_heads, "head_dim": cfg.mha_head_dim, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings, "rope_parameters": rope,
    }
    if model_type == LLAMA:
        out.update(attention_bias=False, mlp_bias=False)
    else:
        out.update(use_sliding_window=False)
    return out
