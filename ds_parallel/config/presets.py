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
    # DeepSeek LLM 7B (arXiv 2401.02954; shapes UNCONFIRMED against a primary checkpoint).
    "deepseek_llm_7b": dict(
        vocab_size=102400, dim=4096, n_layers=30, n_heads=32, n_kv_heads=None, inter_dim=11008, max_seq_len=4096
    ),
    # DeepSeek LLM 67B: GQA with 8 KV heads.
    "deepseek_llm_67b": dict(
        vocab_size=102400, dim=8192, n_layers=95, n_heads=64, n_kv_heads=8, inter_dim=22016, max_seq_len=4096
    ),
}
