"""Config -> FP8 backend, and `apply_fp8`: the one place a model gets its FP8 GEMMs.

The model is built in high precision; `apply_fp8(model, cfg.precision)` then swaps the
GEMM hooks of the eligible layers (docs/architecture.md, invariant 6: no `if fp8` in model
code):

    parallel linears (Linear / ColumnParallelLinear / RowParallelLinear)  .gemm
        attention wq/wk/wv/wo; MLA wq|wq_a, wq_b, wkv_a, wkv_b, wo; dense MLP w1/w2/w3;
        MTP eh_proj
    shared experts (torch nn.Linear, no bias)      replaced by a Linear holding the same weight
    routed experts (GroupedExperts)                 .grouped_gemm          torch backend only
    MoE dispatch (precision.fp8.dispatch)           .dispatch_fn           FP8 rows + scales

and leaves in high precision, as V3 §3.3 does: the embedding and the output head (the head
is a ColumnParallelLinear, excluded by name), the router (its own F.linear in fp32), the
norms and the attention core (SDPA), plus anything matching precision.fp8.keep_high_precision.
MLA's absorbed decode (`forward_decode`) reads wkv_b.weight directly and so runs in high
precision: it is an inference path, and the master weights stay high precision.

Parameters, names and shards are untouched, so checkpoints, ZeRO and TP/EP are unaffected.

Backends: "torch" = fp8/linear.py (blockwise recipe only, any device); "te" = Transformer
Engine via fp8/te.py, with the recipe objects mapped from the config by `te_recipe_spec`.
"""
from __future__ import annotations

from contextlib import contextmanager
from fnmatch import fnmatch
from typing import Any

from torch import nn

from ds_parallel.fp8.dispatch import FP8Dispatch
from ds_parallel.fp8.linear import BlockwiseFP8Gemm, BlockwiseFP8GroupedGemm
from ds_parallel.parallel.tensor_parallel import ColumnParallelLinear, Linear, RowParallelLinear

# precision.fp8.recipe -> transformer_engine.common.recipe class.
TE_RECIPE_CLASSES = {
    "delayed": "DelayedScaling",  # per-tensor scale from an amax history
    "current": "Float8CurrentScaling",  # per-tensor scale from the current amax
    "blockwise": "Float8BlockScaling",  # V3: 1x128 activations, 128x128 weights
    "mxfp8": "MXFP8BlockScaling",  # 1x32 blocks, E8M0 scales; Blackwell tensor cores
}
TE_FORMATS = {"e4m3": "E4M3", "hybrid": "HYBRID"}
TORCH_RECIPES = ("blockwise",)  # what fp8/linear.py implements
ALWAYS_HIGH_PRECISION = ("head",)
# Checked by config validation, and again by apply_fp8 for models built outside the trainer.
TE_EXPERTS_RULE = ("precision.fp8.backend=te keeps routed experts in high precision (TE's grouped GEMM owns its "
                   "weights; ours are stored by global expert id): add \"experts\" to "
                   "precision.fp8.keep_high_precision to accept that, or use precision.fp8.backend=torch")  # the output head (V3 §3.3); embedding and router are not linears

_PARALLEL_LINEARS = (Linear, ColumnParallelLinear, RowParallelLinear)


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


def apply_fp8(model: nn.Module, precision, ctx=None) -> list[str]:
    """Swap in FP8 GEMMs (in place) per `precision.fp8`; returns the qualified names of the
    modules changed (empty when precision.fp8.enabled is false). Call once, after the model
    is built, loaded, cast and moved to its device, and before the optimizer / DeepSpeed wrap
    it. `ctx` (a ParallelContext) gives TE its amax reduction group."""
    fp8 = precision.fp8
    if not fp8.enabled:
        return []
    backend = resolve_backend(fp8)
    keep = keep_patterns(fp8)
    from ds_parallel.moe.experts import GroupedExperts
    from ds_parallel.moe.layer import MoE

    # Shared experts are torch nn.Linear: give them our Linear (same Parameter object, so the
    # name `...w1.weight`, its attributes and optimizer identity are unchanged).
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            if type(child) is nn.Linear and child.bias is None and not is_kept(full, keep):
                lin = Linear(child.in_features, child.out_features)
                lin.weight = child.weight
                setattr(parent, child_name, lin)

    if backend == "torch":
        gemm = BlockwiseFP8Gemm(fp8.block_size, fp8.power_of_two_scales)
        make_gemm = lambda module: gemm  # noqa: E731  (stateless: one object serves all)
        grouped = BlockwiseFP8GroupedGemm(fp8.block_size, fp8.power_of_two_scales)
    else:
        from ds_parallel.fp8.te import TEGemm

        te_recipe = build_te_recipe(fp8)
        amax_group = getattr(ctx, "amax_group", None)
        make_gemm = lambda module: TEGemm(module.weight, te_recipe, amax_group)  # noqa: E731
        grouped = None  # TE's GroupedLinear owns its weights: validation made the user keep experts

    changed = []
    for name, module in list(model.named_modules()):  # TEGemm submodules are added on the way
        if is_kept(name, keep):
            continue
        if isinstance(module, _PARALLEL_LINEARS):
            module.gemm = make_gemm(module)
            changed.append(name)
        elif isinstance(module, GroupedExperts):
            if grouped is None:
                raise ValueError(f"{name}: {TE_EXPERTS_RULE}")
            module.grouped_gemm = grouped
            changed.append(name)
        elif isinstance(module, MoE) and fp8.dispatch:
            module.dispatch_fn = FP8Dispatch(fp8.block_size)
            changed.append(name)
    return changed


@contextmanager
def high_precision_gemms(model: nn.Module):
    """Within the block, every GEMM and MoE dispatch `apply_fp8` swapped runs its default
    high-precision code again (for side-by-side measurements); restored on exit."""
    import torch.nn.functional as F

    from ds_parallel.moe.dispatch import dispatch
    from ds_parallel.moe.experts import GroupedExperts, grouped_linear
    from ds_parallel.moe.layer import MoE

    saved = []
    for module in list(model.modules()):
        for attr, default, kind in (("gemm", F.linear, _PARALLEL_LINEARS), ("grouped_gemm", grouped_linear, GroupedExperts),
                                    ("dispatch_fn", dispatch, MoE)):
            if isinstance(module, kind):
                saved.append((module, attr, getattr(module, attr)))
                module._modules.pop(attr, None)  # a TEGemm is a submodule; setattr restores it
                setattr(module, attr, default)
    try:
        yield
    finally:
        for module, attr, value in saved:
            setattr(module, attr, value)


def saved_activation_bytes(model: nn.Module, input_ids, labels) -> int:
    """Bytes autograd keeps for the backward of one forward (unique storages handed to the
    pack hook, parameters excluded). Runs in eval mode: routers do not count the tokens."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    was_training = model.training
    model.eval()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids, labels=labels)
    finally:
        model.train(was_training)
    return sum(storages.values())


def fp8_memory_report(model: nn.Module, input_ids, labels) -> str:
    """One line, measured on one micro-batch: activation bytes saved for backward with the
    FP8 GEMMs (inputs kept in FP8 for Wgrad, plus the FP8 weight copies) against the same
    forward with high-precision GEMMs. Collective where the forward is (MoE all-to-all)."""
    fp8 = saved_activation_bytes(model, input_ids, labels)
    with high_precision_gemms(model):
        high = saved_activation_bytes(model, input_ids, labels)
    return (f"FP8 activations for backward: {fp8 / 2**20:.1f} MiB per micro-batch vs {high / 2**20:.1f} MiB "
            f"with high-precision GEMMs ({(high - fp8) / 2**20:+.1f} MiB saved)")
