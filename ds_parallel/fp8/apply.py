"""`apply_fp8`: the one place a model gets its FP8 GEMMs, and what measures them.

The model is built in high precision; `apply_fp8(model, cfg.precision)` then swaps the
hooks of the eligible layers (docs/architecture.md: no `if fp8` in model code, and no
second way in: the layers' constructors take no GEMM):

    parallel linears (Linear / ColumnParallelLinear / RowParallelLinear)  .gemm
        attention wq/wk/wv/wo; MLA wq|wq_a, wq_b, wkv_a, wkv_b, wo; dense MLP w1/w2/w3;
        MTP eh_proj; the shared experts' w1/w2/w3
    routed experts (GroupedExperts)                 .grouped_gemm          torch backend only
    MoE dispatch (precision.fp8.dispatch)           .dispatch_codec        FP8 rows + scales

and leaves in high precision, as V3 §3.3 does: the embedding and the output head (the head
is a ColumnParallelLinear, excluded by name), the router (its own fp32 GEMM), the
norms and the attention core (kernels.attention), plus anything matching precision.fp8.keep_high_precision
(fp8/recipe.py decides which modules and which backend, from the config alone).
MLA's absorbed decode (`forward_decode`) reads wkv_b.weight directly and so runs in high
precision: it is an inference path, and the master weights stay high precision.

Parameters, names and shards are untouched, so checkpoints, ZeRO and TP/EP are unaffected.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from ds_parallel.fp8.dispatch import FP8Codec
from ds_parallel.kernels import grouped_linear, linear
from ds_parallel.fp8.linear import GEMM_IMPLS, BlockwiseFP8Gemm, BlockwiseFP8GroupedGemm
from ds_parallel.fp8.recipe import TE_EXPERTS_RULE, build_te_recipe, is_kept, keep_patterns, resolve_backend
from ds_parallel.fp8.te import TEGemm
from ds_parallel.moe.experts import GroupedExperts
from ds_parallel.moe.layer import MoE
from ds_parallel.parallel.tensor_parallel import ColumnParallelLinear, Linear, RowParallelLinear

_PARALLEL_LINEARS = (Linear, ColumnParallelLinear, RowParallelLinear)


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

    if backend == "torch":
        impl = GEMM_IMPLS[fp8.gemm]
        gemm = BlockwiseFP8Gemm(fp8.block_size, fp8.power_of_two_scales, impl)
        make_gemm = lambda module: gemm  # noqa: E731  (stateless: one object serves all)
        grouped = BlockwiseFP8GroupedGemm(fp8.block_size, fp8.power_of_two_scales, impl)
    else:
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
            module.dispatch_codec = FP8Codec(fp8.block_size)
            changed.append(name)
    return changed


@contextmanager
def high_precision_gemms(model: nn.Module):
    """Within the block, every GEMM and MoE dispatch `apply_fp8` swapped runs its default
    high-precision code again (for side-by-side measurements); restored on exit."""
    saved = []
    for module in list(model.modules()):
        for attr, default, kind in (("gemm", linear, _PARALLEL_LINEARS), ("grouped_gemm", grouped_linear, GroupedExperts),
                                    ("dispatch_codec", None, MoE)):
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
