"""Activation recomputation: which activations backward keeps, and which it recomputes.

    none       every layer keeps what autograd saves
    selective  the modules named in train.recompute_modules recompute their intermediates
               (V3 §3.2.3; Megatron's --recompute-granularity selective):
                 norm         every RMSNorm keeps only its input; its fp32 intermediates are
                              recomputed (its output is what the next projection keeps)
                 mla_up_proj  MLA's q_norm -> wq_b and kv_norm -> wkv_b, the RoPE and the
                              per-head concatenation: backward keeps the two latents and the
                              attention's q, k, v, not the normed latents or the RoPE inputs
                 swiglu       silu(w1 x) * w3 x of the dense MLPs, routed and shared experts:
                              backward keeps w1 x and w3 x, not silu(w1 x)
    full       whole blocks keep only their input (Megatron's full recompute, "block"
               method): the first train.recompute_layers blocks of each pipeline stage, all
               with 0; a stage's MTP blocks count after its main layers

Every region is `recompute_region`: a non-reentrant `torch.utils.checkpoint` (which keeps
and restores the RNG state around the recomputation; no dropout exists today) whose
recomputation runs in the kernels' mode of the forward (kernels.batch_invariant, a context
variable: a backward on another thread, as on CUDA, would otherwise recompute with other
kernels and silently round differently). Nothing inside a selective region communicates.
In a fully recomputed MoE block the router, the dispatch plan and the two EP all-to-alls
are outside the regions (model/block.py, moe/layer.py): routing is computed once and reused
as the recomputed experts' input, the aux-loss-free expert loads are counted once, and no
all-to-all is repeated; the attention half (with its TP all-reduce under tp > 1) is
recomputed. Regions run only when grad is enabled, so evaluation and decoding take the
plain path.

`apply_recompute` injects the runner into the modules of a built model (this rank's part of
it; each module holds a `*region` attribute, None by default, so moe/ needs no checkpoint
code of its own); parallel/plan.py predicts the saved bytes of each mode
(`selective_saving_per_token`, `full_bytes_per_token`).
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Iterable, Optional, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ds_parallel.config.validate import RECOMPUTE_MODULES
from ds_parallel.kernels import batch_invariant, is_batch_invariant
from ds_parallel.model.block import Block
from ds_parallel.model.mla import MLA
from ds_parallel.model.mlp import MLP
from ds_parallel.model.norm import RMSNorm
from ds_parallel.moe.experts import GroupedExperts, SwiGLU
from ds_parallel.moe.layer import MoE
from ds_parallel.parallel.plan import full_recompute_blocks, stage_blocks

RECOMPUTE_MODES = ("none", "selective", "full")


class _KernelMode:
    """Re-enterable: DualPipeV's split backward recomputes a region once for the input
    gradients and again for the weight gradients, entering the same context twice."""

    def __init__(self, invariant: bool):
        self.invariant, self.active = invariant, []

    def __enter__(self):
        self.active.append(batch_invariant(self.invariant))
        self.active[-1].__enter__()

    def __exit__(self, *exc):
        return self.active.pop().__exit__(*exc)


def recompute_region(fn, *args):
    """fn(*args), keeping only args for backward and running fn again there, in the
    forward's kernel mode."""
    mode = _KernelMode(is_batch_invariant())
    return checkpoint(fn, *args, use_reentrant=False, context_fn=lambda: (nullcontext(), mode))


def saved_activation_bytes(model: nn.Module, forward) -> int:
    """Bytes autograd keeps for backward while `forward()` runs (one forward of `model`):
    distinct storages of the tensors saved for backward, the model's parameters excluded.
    What the planner's activation estimates are checked against (tests/unit/test_recompute.py,
    benchmarks/recompute.py)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for ptr, n in storages.items() if ptr not in params)


def _runner(on: bool):
    return recompute_region if on else None


def apply_recompute(model: nn.Module, mode: str, modules: Iterable[str] = RECOMPUTE_MODULES,
                    recompute_layers: int = 0, stage_layers: Optional[Sequence[Sequence[int]]] = None,
                    last_stage: Optional[bool] = None) -> nn.Module:
    """Set `mode` on `model` (a Transformer or one pipeline rank's part) in place.
    `stage_layers`: the layer ids of this rank's stages in order (default: one stage with the
    model's layers); `last_stage`: whether its last stage holds the MTP blocks (default: whether
    the model holds the head)."""
    if mode not in RECOMPUTE_MODES:
        raise ValueError(f"train.recompute={mode!r}: use one of {', '.join(RECOMPUTE_MODES)}")
    modules = set(modules) if mode == "selective" else set()
    unknown = modules - set(RECOMPUTE_MODULES)
    if unknown:
        raise ValueError(f"train.recompute_modules has {sorted(unknown)}: use any of {list(RECOMPUTE_MODULES)}")
    for m in model.modules():
        if isinstance(m, RMSNorm):
            m.region = _runner("norm" in modules)
        elif isinstance(m, MLA):
            m.up_proj_region = _runner("mla_up_proj" in modules)
        elif isinstance(m, (MLP, SwiGLU, GroupedExperts)):
            m.swiglu_region = _runner("swiglu" in modules)
    full = set()
    if mode == "full":
        if stage_layers is None:
            stage_layers = [[int(i) for i in model.layers]]
        if last_stage is None:
            last_stage = model.head is not None
        mtp = model.cfg.mtp_depth if last_stage else 0
        full = set(full_recompute_blocks(stage_blocks(stage_layers, model.cfg.n_layers, mtp), recompute_layers))
    for m in model.modules():
        if isinstance(m, Block):
            m.region = _runner(m.layer_id in full)
            if isinstance(m.ffn, MoE):
                m.ffn.experts_region = m.region
    return model

