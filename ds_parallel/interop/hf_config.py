"""HF DeepSeek-V2 / V3 config.json <-> ModelConfig.

A config means what transformers 5.24 computes with it (modeling_deepseek_v2 / _v3), which is
not always what its keys say:
  * V3's router is always sigmoid + bias + group-limited (sum of top-2 per group) top-k; the
    `scoring_func` / `topk_method` keys are not read. V2's is always softmax, `greedy` or
    `group_limited_greedy` (group max), has no bias and never renormalises (`norm_topk_prob`
    is not read). Configs whose keys claim otherwise are rejected, not reinterpreted.
  * YaRN: logits x mscale(factor, mscale_all_dim)^2 (no factor when mscale_all_dim is missing
    or 0); cos/sin x attention_factor, which defaults to mscale(f, mscale) / mscale(f,
    mscale_all_dim) when both are set and to mscale(f, 1) otherwise. Our MLA models
    attention_factor == 1 only (every shipped DeepSeek config has mscale == mscale_all_dim).
  * q_a_layernorm / kv_a_layernorm use eps 1e-6 whatever rms_norm_eps says, so other eps
    values are rejected.
  * V3 with rope_interleave=False rotates split halves; the loader permutes those weights
    into our interleaved layout, so the ModelConfig always says rope_interleave=True.
  * DeepseekV3Config defaults num_key_value_heads=128 (unused by MLA; we write n_heads) and
    num_mtp_layers=1, saved as num_nextn_predict_layers, even for models without MTP weights.
Keys a hand-written config.json omits take transformers' defaults for its model_type.
"""
from __future__ import annotations

import math
from typing import Any

from ds_parallel.config.schema import Config, ModelConfig, TrainConfig
from ds_parallel.config.validate import validate

V2, V3 = "deepseek_v2", "deepseek_v3"

# transformers 5.24 defaults for keys a hand-written config.json may omit.
_HF_DEFAULTS: dict[str, dict[str, Any]] = {
    V3: dict(
        first_k_dense_replace=3, n_group=8, topk_group=4, norm_topk_prob=True, routed_scaling_factor=2.5,
        n_shared_experts=1, n_routed_experts=256, num_experts_per_tok=8, q_lora_rank=1536, kv_lora_rank=512,
        qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, moe_intermediate_size=2048,
        max_position_embeddings=4096, rope_interleave=True, num_nextn_predict_layers=1,
    ),
    V2: dict(
        first_k_dense_replace=0, n_group=None, topk_group=None, topk_method="greedy", norm_topk_prob=False,
        routed_scaling_factor=1.0, n_shared_experts=2, n_routed_experts=64, num_experts_per_tok=None,
        q_lora_rank=1536, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128,
        moe_intermediate_size=1407, max_position_embeddings=2048, num_nextn_predict_layers=0,
    ),
}
_COMMON_DEFAULTS = dict(rms_norm_eps=1e-6, hidden_act="silu", attention_bias=False, mlp_bias=False, moe_layer_freq=1)
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
LATENT_NORM_EPS = 1e-6  # transformers' q_a_layernorm / kv_a_layernorm ignore rms_norm_eps


def bad_field(key: str, value: Any, why: str) -> ValueError:
    """The one-line error for a config.json field the model cannot represent."""
    return ValueError(f"HF config {key}={value!r}: {why}")


def hf_fields(hf_config: dict[str, Any], type_defaults: dict[str, dict[str, Any]], required: tuple[str, ...],
              common_defaults: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(model_type, config.json over its type's defaults) for a supported model_type with
    every required key and a SwiGLU MLP; one-line ValueErrors otherwise."""
    model_type = hf_config.get("model_type")
    if model_type not in type_defaults:
        raise bad_field("model_type", model_type, f"expected {' or '.join(type_defaults)}")
    for key in required:
        if key not in hf_config:
            raise ValueError(f"HF config has no {key}")
    h = {**common_defaults, **type_defaults[model_type], **hf_config}
    if h["hidden_act"] != "silu":
        raise bad_field("hidden_act", h["hidden_act"], "only SwiGLU (silu) is supported")
    return model_type, h


def _yarn_mscale(factor: float, m: float) -> float:
    return 1.0 if factor <= 1.0 else 0.1 * m * math.log(factor) + 1.0


def _rope_from_hf(h: dict[str, Any]) -> dict[str, Any]:
    """rope_parameters (transformers 5) or rope_scaling + rope_theta (older configs)."""
    rope = h.get("rope_parameters") or h.get("rope_scaling") or {}
    if any(isinstance(v, dict) for v in rope.values()):
        raise bad_field("rope_parameters", rope, "per-layer-type RoPE is not supported")
    out: dict[str, Any] = {"rope_theta": float(rope.get("rope_theta", h.get("rope_theta", 10000.0)))}
    kind = rope.get("rope_type", rope.get("type")) or "default"
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise bad_field("rope_parameters.partial_rotary_factor", rope["partial_rotary_factor"], "only 1.0 is supported")
    if kind == "default":
        return out
    if kind != "yarn":
        raise bad_field("rope_parameters.rope_type", kind, "only default and yarn RoPE are supported")
    max_pos = h["max_position_embeddings"]
    # transformers gives a top-level original_max_position_embeddings priority (standardize_rope_params).
    orig = h.get("original_max_position_embeddings") or rope.get("original_max_position_embeddings") or max_pos
    factor = float(rope.get("factor") or max_pos / orig)
    if factor < 1.0:
        raise bad_field("rope_parameters.factor", factor, "YaRN needs factor >= 1")
    if rope.get("truncate", True) is False:
        raise bad_field("rope_parameters.truncate", False, "only the truncated (floor/ceil) YaRN ramp is supported")
    mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
    attention_factor = rope.get("attention_factor")
    if attention_factor is None:
        attention_factor = (
            _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
            if mscale and mscale_all_dim else _yarn_mscale(factor, 1.0)
        )
    if abs(attention_factor - 1.0) > 1e-9:
        raise bad_field("rope_parameters.mscale", mscale, f"transformers would scale cos/sin by {attention_factor:.6g}; "
                   "only 1 is modelled (set mscale == mscale_all_dim, as shipped DeepSeek configs do)")
    out.update(
        rope_factor=factor, original_max_seq_len=int(orig), beta_fast=float(rope.get("beta_fast") or 32),
        beta_slow=float(rope.get("beta_slow") or 1), mscale=float(mscale or 1.0),
        # No mscale_all_dim in HF means no logit factor; ours computes mscale(f, 0) = 1 for 0.
        mscale_all_dim=float(mscale_all_dim or 0.0),
    )
    return out


def _routing_from_hf(h: dict[str, Any], model_type: str) -> dict[str, Any]:
    n_experts, n_layers = h["n_routed_experts"] or 0, h["num_hidden_layers"]
    first_dense = h["first_k_dense_replace"] or 0
    if n_experts == 0:
        if first_dense < n_layers:
            raise bad_field("n_routed_experts", n_experts, "a dense model needs first_k_dense_replace >= num_hidden_layers")
        return dict(n_routed_experts=0, n_dense_layers=n_layers)
    if not h["num_experts_per_tok"]:
        raise bad_field("num_experts_per_tok", h["num_experts_per_tok"], "a MoE model needs a positive top-k")
    if h.get("moe_layer_freq", 1) != 1:
        raise bad_field("moe_layer_freq", h["moe_layer_freq"], "transformers: every layer from first_k_dense_replace on is MoE")
    if model_type == V3:
        if h.get("scoring_func", "sigmoid") != "sigmoid":
            raise bad_field("scoring_func", h["scoring_func"], "transformers' DeepseekV3 router is sigmoid only")
        if h.get("topk_method", "noaux_tc") != "noaux_tc":
            raise bad_field("topk_method", h["topk_method"], "transformers' DeepseekV3 router is noaux_tc only")
        score_func, n_groups = "sigmoid", h["n_group"] or 1
        n_limited, norm = h["topk_group"] or n_groups, bool(h["norm_topk_prob"])
    else:
        if h.get("scoring_func", "softmax") != "softmax":
            raise bad_field("scoring_func", h["scoring_func"], "transformers' DeepseekV2 router is softmax only")
        method = h.get("topk_method") or "greedy"
        if method == "greedy":
            n_groups = n_limited = 1
        elif method == "group_limited_greedy":
            n_groups, n_limited = h["n_group"], h["topk_group"]
            if not n_groups or not n_limited:
                raise bad_field("n_group", n_groups, "group_limited_greedy needs n_group and topk_group")
        else:
            raise bad_field("topk_method", method, "DeepseekV2 supports greedy and group_limited_greedy")
        if h["norm_topk_prob"]:
            raise bad_field("norm_topk_prob", True, "transformers' DeepseekV2 router never renormalises top-k weights")
        score_func, norm = "softmax", False
    return dict(
        n_routed_experts=n_experts, n_shared_experts=h["n_shared_experts"] or 0,
        n_activated_experts=h["num_experts_per_tok"], moe_inter_dim=h["moe_intermediate_size"],
        n_dense_layers=min(first_dense, n_layers), score_func=score_func, n_expert_groups=n_groups,
        n_limited_groups=n_limited, route_scale=float(h["routed_scaling_factor"]), norm_topk_prob=norm,
    )


def config_from_hf(hf_config: dict[str, Any]) -> ModelConfig:
    """An HF DeepSeek-V2/V3 config.json dict -> ModelConfig. ValueError (one line, naming the
    key) for anything the model cannot represent exactly."""
    model_type, h = hf_fields(hf_config, _HF_DEFAULTS, _REQUIRED, _COMMON_DEFAULTS)
    for key in ("attention_bias", "mlp_bias"):
        if h[key]:
            raise bad_field(key, h[key], "DeepSeek linears have no biases")
    if h["rms_norm_eps"] != LATENT_NORM_EPS:
        raise bad_field("rms_norm_eps", h["rms_norm_eps"], "transformers' latent norms use 1e-6 anyway; one eps is modelled")
    quant = h.get("quantization_config")
    if quant and (quant.get("quant_method") != "fp8" or quant.get("fmt", "e4m3") != "e4m3"):
        raise bad_field("quantization_config", quant, "only DeepSeek's blockwise fp8 (e4m3) weights are dequantised")
    mtp = hf_config.get("num_nextn_predict_layers", hf_config.get("num_mtp_layers", h["num_nextn_predict_layers"]))
    n_heads, dim = h["num_attention_heads"], h["hidden_size"]
    qk_head_dim = h["qk_nope_head_dim"] + h["qk_rope_head_dim"]
    cfg = ModelConfig(
        vocab_size=h["vocab_size"], dim=dim, n_layers=h["num_hidden_layers"], n_heads=n_heads,
        head_dim=qk_head_dim if dim % n_heads else None, inter_dim=h["intermediate_size"],
        max_seq_len=h["max_position_embeddings"], norm_eps=float(h["rms_norm_eps"]),
        rope_interleave=True,  # our MLA layout; split-half V3 weights are permuted on import
        attention="mla", q_lora_rank=h["q_lora_rank"] or 0, kv_lora_rank=h["kv_lora_rank"],
        qk_nope_head_dim=h["qk_nope_head_dim"], qk_rope_head_dim=h["qk_rope_head_dim"],
        v_head_dim=h["v_head_dim"], mtp_depth=int(mtp or 0),
        **_rope_from_hf(h), **_routing_from_hf(h, model_type),
    )
    validate(Config(model=cfg, train=TrainConfig(seq_len=min(TrainConfig.seq_len, cfg.max_seq_len))))
    return cfg


def hf_model_type(cfg: ModelConfig) -> str:
    return V2 if cfg.n_routed_experts and cfg.score_func == "softmax" else V3


def hf_config_from_model(cfg: ModelConfig) -> dict[str, Any]:
    """ModelConfig -> an HF config.json dict: deepseek_v3 for sigmoid routing or a dense
    MLA model, deepseek_v2 for softmax routing."""
    if cfg.attention != "mla":
        raise ValueError("model.attention=mha: HF DeepSeek-V2/V3 checkpoints hold MLA models only")
    if cfg.tie_embeddings:
        raise ValueError("model.tie_embeddings=true: HF DeepSeek-V2/V3 checkpoints have an untied head")
    if cfg.norm_eps != LATENT_NORM_EPS:
        raise ValueError(f"model.norm_eps={cfg.norm_eps}: transformers' latent norms use 1e-6; only 1e-6 exports exactly")
    model_type = hf_model_type(cfg)
    if model_type == V2 and cfg.norm_topk_prob:
        raise ValueError("model.norm_topk_prob=true with softmax routing: transformers' DeepseekV2 never renormalises")
    if model_type == V2 and cfg.mtp_depth:
        raise ValueError(f"model.mtp_depth={cfg.mtp_depth} with softmax routing: DeepseekV2 has no MTP layers")
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_factor > 1.0:
        rope = {
            "rope_type": "yarn", "rope_theta": cfg.rope_theta, "factor": cfg.rope_factor,
            "original_max_position_embeddings": cfg.original_max_seq_len,
            "beta_fast": cfg.beta_fast, "beta_slow": cfg.beta_slow,
        }
        # Our cos/sin are unscaled: make transformers' attention_factor 1 (see module docstring).
        if cfg.mscale_all_dim:
            rope.update(mscale=cfg.mscale_all_dim, mscale_all_dim=cfg.mscale_all_dim)
        else:
            rope.update(attention_factor=1.0)
    moe = cfg.n_routed_experts > 0
    grouped = moe and cfg.n_expert_groups > 1 and cfg.n_limited_groups < cfg.n_expert_groups
    out = {
        "architectures": ["DeepseekV3ForCausalLM" if model_type == V3 else "DeepseekV2ForCausalLM"],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "intermediate_size": cfg.inter_dim,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_heads,
        "q_lora_rank": cfg.q_lora_rank or None, "kv_lora_rank": cfg.kv_lora_rank,
        "qk_nope_head_dim": cfg.qk_nope_head_dim, "qk_rope_head_dim": cfg.qk_rope_head_dim,
        "v_head_dim": cfg.v_head_dim, "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "hidden_act": "silu", "attention_bias": False, "tie_word_embeddings": False, "rope_parameters": rope,
        "moe_intermediate_size": cfg.moe_inter_dim, "n_routed_experts": cfg.n_routed_experts,
        "n_shared_experts": cfg.n_shared_experts if moe else 0,
        "num_experts_per_tok": cfg.n_activated_experts if moe else None,
        # A dense model is "all layers dense" (MTP blocks included).
        "first_k_dense_replace": cfg.n_dense_layers if moe else cfg.n_layers + cfg.mtp_depth,
        "moe_layer_freq": 1, "routed_scaling_factor": cfg.route_scale,
    }
    if model_type == V3:
        out.update(
            n_group=cfg.n_expert_groups, topk_group=cfg.n_limited_groups, norm_topk_prob=cfg.norm_topk_prob,
            scoring_func="sigmoid", topk_method="noaux_tc", rope_interleave=True,
            num_nextn_predict_layers=cfg.mtp_depth,
        )
    else:
        out.update(
            n_group=cfg.n_expert_groups if grouped else None, topk_group=cfg.n_limited_groups if grouped else None,
            topk_method="group_limited_greedy" if grouped else "greedy", norm_topk_prob=False,
            scoring_func="softmax", mlp_bias=False,
        )
    return out
