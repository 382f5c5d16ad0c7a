"""Named model shapes. A preset fills `model.*`; explicit fields in a config override it.

CPU-sized debug presets are what CI trains; the paper shapes are for planning and clusters.
"""
from __future__ import annotations

from typing import Any

MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # LLaMA-style dense model small enough to train in seconds on 2 CPU cores.
    "debug_dense": dict(
        vocab_size=128, dim=128, n_layers=2, n_heads=4, n_kv_heads=None, inter_dim=344, max_seq_len=256
    ),
    # Same block with grouped-query attention (2 KV heads for 4 query heads).
    "debug_dense_gqa": dict(
        vocab_size=128, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, inter_dim=344, max_seq_len=256
    ),
    # Tiny DeepSeek-V3: MLA with query compression, DeepSeekMoE (sigmoid gate, 4 groups of 2
    # experts, top-2 groups, aux-loss-free bias, sequence-wise loss, 1 shared expert), one
    # dense first layer, 1-depth MTP. The CPU stand-in for the 671B shape below.
    "debug_v3": dict(
        vocab_size=128, dim=128, n_layers=2, n_heads=4, inter_dim=344, max_seq_len=256,
        attention="mla", q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
        rope_interleave=True,
        n_routed_experts=8, n_shared_experts=1, n_activated_experts=2, moe_inter_dim=64, n_dense_layers=1,
        score_func="sigmoid", n_expert_groups=4, n_limited_groups=2, route_scale=2.5, norm_topk_prob=True,
        bias_update_speed=1e-3, seq_aux_alpha=1e-4, mtp_depth=1, mtp_lambda=0.3,
    ),
    # debug_v3 with every FP8 GEMM dimension a multiple of 128 (the V3 tile), so the
    # blockwise recipe runs without padding: wq_a 128x128, wq_b 384x128, wkv_a 256x128,
    # wkv_b 256x128, wo 128x128, dense MLP 384/128, experts and shared expert 128x128,
    # MTP eh_proj 128x256. kv_lora_rank + qk_rope_head_dim (wkv_a's output) and
    # kv_lora_rank (wkv_b's input) are both multiples of 128 only if the rope dim is.
    "debug_v3_fp8": dict(
        vocab_size=128, dim=128, n_layers=2, n_heads=2, inter_dim=384, max_seq_len=256,
        attention="mla", q_lora_rank=128, kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=128, v_head_dim=64,
        rope_interleave=True,
        n_routed_experts=8, n_shared_experts=1, n_activated_experts=2, moe_inter_dim=128, n_dense_layers=1,
        score_func="sigmoid", n_expert_groups=4, n_limited_groups=2, route_scale=2.5, norm_topk_prob=True,
        bias_update_speed=1e-3, seq_aux_alpha=1e-4, mtp_depth=1, mtp_lambda=0.3,
    ),
    # Tiny DeepSeek-V2(-Lite): MLA without query compression, softmax gate with group max,
    # 2 shared experts, V2's expert-level balance loss, no MTP.
    "debug_v2": dict(
        vocab_size=128, dim=128, n_layers=2, n_heads=4, inter_dim=344, max_seq_len=256,
        attention="mla", q_lora_rank=0, kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
        rope_interleave=True,
        n_routed_experts=8, n_shared_experts=2, n_activated_experts=2, moe_inter_dim=64, n_dense_layers=1,
        score_func="softmax", n_expert_groups=2, n_limited_groups=1, route_scale=1.0, norm_topk_prob=False,
        expert_aux_alpha=3e-3,
    ),
    # DeepSeek-V2-Lite (16B), deepseek-ai/DeepSeek-V3 inference/configs/config_16B.json.
    "deepseek_v2_lite": dict(
        vocab_size=102400, dim=2048, n_layers=27, n_heads=16, inter_dim=10944, max_seq_len=4096,
        attention="mla", q_lora_rank=0, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        rope_interleave=True, rope_factor=40.0, original_max_seq_len=4096, mscale=0.707, mscale_all_dim=0.707,
        n_routed_experts=64, n_shared_experts=2, n_activated_experts=6, moe_inter_dim=1408, n_dense_layers=1,
        score_func="softmax", n_expert_groups=1, n_limited_groups=1, route_scale=1.0, expert_aux_alpha=1e-3,
    ),
    # DeepSeek-V3 (671B total, ~37B activated), inference/configs/config_671B.json + V3 §4.2.
    "deepseek_v3": dict(
        vocab_size=129280, dim=7168, n_layers=61, n_heads=128, inter_dim=18432, max_seq_len=4096,
        attention="mla", q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
        v_head_dim=128, rope_interleave=True,
        n_routed_experts=256, n_shared_experts=1, n_activated_experts=8, moe_inter_dim=2048, n_dense_layers=3,
        score_func="sigmoid", n_expert_groups=8, n_limited_groups=4, route_scale=2.5, norm_topk_prob=True,
        bias_update_speed=1e-3, seq_aux_alpha=1e-4, mtp_depth=1, mtp_lambda=0.3,
    ),
    # DeepSeek LLM 7B (arXiv 2401.02954; shapes UNCONFIRMED against a primary checkpoint).
    "deepseek_llm_7b": dict(
        vocab_size=102400, dim=4096, n_layers=30, n_heads=32, n_kv_heads=None, inter_dim=11008, max_seq_len=4096
    ),
    # DeepSeek LLM 67B: GQA with 8 KV heads.
    "deepseek_llm_67b": dict(
        vocab_size=102400, dim=8192, n_layers=95, n_heads=64, n_kv_heads=8, inter_dim=22016, max_seq_len=4096
    ),
}
