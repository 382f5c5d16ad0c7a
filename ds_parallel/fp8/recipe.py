"""Config -> FP8 recipe, as pure data: which backend runs (`resolve_backend`), which TE recipe
class and arguments (`te_recipe_spec`), which modules stay in high precision (`keep_patterns`,
`is_kept`) and the shape of every FP8 GEMM (`fp8_gemm_shapes`).

Nothing here imports torch, the MoE or the tensor-parallel layers at module level, so config
validation uses it without building anything; fp8/apply.py `apply_fp8` is what changes a
model. TE itself is reached only through fp8/te.py, lazily (`resolve_backend` under
backend=auto asks whether it imports).

Backends: "torch" = fp8/linear.py (blockwise recipe only, any device); "te" = Transformer
Engine via fp8/te.py, with the recipe objects mapped from the config by `te_recipe_spec`.
"""
from __future__ import annotations

from fnmatch import fnmatch
from functools import lru_cache
from typing import Any

# precision.fp8.recipe -> transformer_engine.common.recipe class.
TE_RECIPE_CLASSES = {
    "delayed": "DelayedScaling",  # per-tensor scale from an amax history
    "current": "Float8CurrentScaling",  # per-tensor scale from the current amax
    "blockwise": "Float8BlockScaling",  # V3: 1x128 activations, 128x128 weights
    "mxfp8": "MXFP8BlockScaling",  # 1x32 blocks, E8M0 scales; Blackwell tensor cores
}
TE_FORMATS = {"e4m3": "E4M3", "hybrid": "HYBRID"}
TORCH_RECIPES = ("blockwise",)  # what fp8/linear.py implements
ALWAYS_HIGH_PRECISION = ("head",)  # the output head (V3 §3.3); embedding and router are not linears
# Checked by config validation, and again by apply_fp8 for models built outside the trainer.
TE_EXPERTS_RULE = ("precision.fp8.backend=te keeps routed experts in high precision (TE's grouped GEMM owns its "
                   "weights; ours are stored by global expert id): add \"experts\" to "
                   "precision.fp8.keep_high_precision to accept that, or use precision.fp8.backend=torch")


def resolve_backend(fp8) -> str:
    """precision.fp8 -> "te" or "torch". auto picks TE where it imports (its kernels are the
    fast path) and torch otherwise; recipes or formats only TE has resolve to te (validation
    then says that TE is missing)."""
    if fp8.backend != "auto":
        return fp8.backend
    if fp8.recipe not in TORCH_RECIPES or fp8.format != "e4m3":
        return "te"
    from ds_parallel.fp8.te import te_available

    return "te" if te_available() else "torch"


def te_recipe_spec(fp8) -> tuple[str, dict[str, Any]]:
    """(class name in transformer_engine.common.recipe, kwargs with Format member names).
    Pure data, so the mapping is testable without TE; fp8/te.py `build_recipe` makes the object."""
    kwargs: dict[str, Any] = {"fp8_format": TE_FORMATS[fp8.format]}
    if fp8.recipe == "delayed":
        kwargs.update(amax_history_len=1024, amax_compute_algo="max")  # TE's defaults, stated
    return TE_RECIPE_CLASSES[fp8.recipe], kwargs


def build_te_recipe(fp8):
    from ds_parallel.fp8 import te

    return te.build_recipe(*te_recipe_spec(fp8))


def keep_patterns(fp8) -> list[str]:
    user = [p.strip() for p in fp8.keep_high_precision.split(",") if p.strip()]
    return list(ALWAYS_HIGH_PRECISION) + user


def is_kept(name: str, patterns: list[str]) -> bool:
    """fnmatch on the qualified module name; a pattern also matches as a dotted suffix."""
    return any(fnmatch(name, p) or fnmatch(name, "*." + p) for p in patterns)


def fp8_gemm_shapes(model_cfg, tp: int = 1) -> dict[str, tuple[int, int]]:
    """(N, K) of each kind of FP8 GEMM of one rank, by module name inside a block (pure
    arithmetic on the config, for validation). Head and router are not in it."""
    m = model_cfg
    shapes: dict[str, tuple[int, int]] = {}
    if m.attention == "mla":
        qk = m.qk_nope_head_dim + m.qk_rope_head_dim
        if m.q_lora_rank == 0:
            shapes["attn.wq"] = (m.n_heads * qk // tp, m.dim)
        else:
            shapes["attn.wq_a"] = (m.q_lora_rank, m.dim)
            shapes["attn.wq_b"] = (m.n_heads * qk // tp, m.q_lora_rank)
        shapes["attn.wkv_a"] = (m.kv_lora_rank + m.qk_rope_head_dim, m.dim)
        shapes["attn.wkv_b"] = (m.n_heads * (m.qk_nope_head_dim + m.v_head_dim) // tp, m.kv_lora_rank)
        shapes["attn.wo"] = (m.dim, m.n_heads * m.v_head_dim // tp)
    else:
        head_dim = m.head_dim or m.dim // m.n_heads
        n_kv = m.n_kv_heads or m.n_heads
        shapes["attn.wq"] = (m.n_heads * head_dim // tp, m.dim)
        shapes["attn.wk"] = shapes["attn.wv"] = (n_kv * head_dim // tp, m.dim)
        shapes["attn.wo"] = (m.dim, m.n_heads * head_dim // tp)
    if m.n_routed_experts == 0 or m.n_dense_layers > 0:
        shapes["ffn.w1"] = shapes["ffn.w3"] = (m.inter_dim // tp, m.dim)
        shapes["ffn.w2"] = (m.dim, m.inter_dim // tp)
    if m.n_routed_experts > 0:
        shapes["ffn.experts.w1"] = shapes["ffn.experts.w3"] = (m.moe_inter_dim, m.dim)
        shapes["ffn.experts.w2"] = (m.dim, m.moe_inter_dim)
        if m.n_shared_experts:
            shared = m.n_shared_experts * m.moe_inter_dim
            shapes["ffn.shared_experts.w1"] = shapes["ffn.shared_experts.w3"] = (shared, m.dim)
            shapes["ffn.shared_experts.w2"] = (m.dim, shared)
    if m.mtp_depth:
        shapes["mtp.eh_proj"] = (m.dim, 2 * m.dim)
    return shapes


@lru_cache(maxsize=None)
def scaled_mm_blockwise_available(device) -> bool:
    """Whether torch's blockwise scaled_mm runs on `device`: torch has F.scaled_mm with the
    DeepSeek scalings, the device is a CUDA GPU of compute capability 9.x (torch checks
    `major == 9`: Hopper only), and torch was built against CUDA >= 12.9 (cuBLASLt added
    the blockwise scale modes there). Cached per device: the FP8 linears ask on every call."""
    import torch
    import torch.nn.functional as F

    device = torch.device(device)
    scaling = getattr(F, "ScalingType", None)
    if device.type != "cuda" or not hasattr(F, "scaled_mm") or not hasattr(scaling, "BlockWise1x128"):
        return False
    cuda = tuple(int(v) for v in (torch.version.cuda or "0.0").split(".")[:2])
    return cuda >= (12, 9) and torch.cuda.get_device_capability(device)[0] == 9
