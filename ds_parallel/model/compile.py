"""Regional compilation (train.compile): torch.compile per transformer block, as torchtitan
does, with the distributed parts left outside the compiled regions.

    dense block          Block._forward: norms, attention, residuals, SwiGLU MLP (one graph)
    MoE block            Block._attend (attention half and ffn_norm), the shared experts,
                         the router's scores and group-limited top-k (Router.route) and the
                         routed experts' SwiGLU (GroupedExperts.swiglu_fn); the load count,
                         the dispatch plan, both EP all-to-alls (moe/dispatch.py), the routed
                         experts' grouped GEMMs and the combine run eagerly between them
    MTP depth            MTPModule._merge (enorm, hnorm, eh_proj) and its block as above

Compiling a whole MoE block would put the dispatch and the all-to-alls in the graph: their
split sizes are data-dependent, so dynamo would break the graph there anyway, and the
routed experts' grouped GEMM is one kernel already (kernels.grouped_linear: MKL's batch GEMM,
called through ctypes, on CPU in fp32; torch._grouped_mm, which has no fp32 meta kernel to
trace on CPU, elsewhere). Its neighbours are what a compiler can fuse: the router's sigmoid, bias,
group scores, masks and normalisation, and the SwiGLU's silu and product (forward and
backward). In a compiled attention half, causal MLA on CPU (kernels.causal_blocks, which
skips the keys no query block can see, eagerly too) is traced through its autograd function,
its softmax and gradient accumulations fused by inductor.
Pipeline send/recv is between stages, never inside a block (1F1B trains compiled to 1e-5 of
eager). Refused in config validation for now: tensor parallelism (its all-reduces are
autograd functions inside the attention and MLP), DualPipeV (its split backward runs
backward twice through a graph, which AOTAutograd's donated buffers forbid) and ZeRO-3.

Compiled code gives the numbers of eager to rounding (inductor fuses elementwise ops and
reorders their arithmetic; tests/unit/test_compile.py checks 1e-5 over training steps). It
cannot honour kernels.batch_invariant (that mode is a context variable the traced graph does
not see, and fusion changes the rounding it pins down), so a region runs its eager function
while the mode is on: GRPO's scoring and updates under post_train.grpo.batch_invariant stay
bit-identical to the rollout, and only lose the speed-up.

Recompute composes: a region under full recompute checkpoints the compiled function (the
checkpoint stays outside the graph, and the recomputation runs the same compiled code);
the selective regions live inside compiled functions, where dynamo traces
torch.utils.checkpoint as a higher-order op and inductor recomputes what it marks.

`apply_compile` wraps the functions of a built model (this rank's part) in place; nothing
is compiled until the first call. The first forward of every region is timed and the sum
printed once on rank 0 (the backward graphs compile during the first backward, which is not
in that number).
"""
from __future__ import annotations

import time
from typing import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ds_parallel.kernels import is_batch_invariant
from ds_parallel.model.block import Block
from ds_parallel.model.mtp import MTPModule
from ds_parallel.moe.layer import MoE


class CompileClock:
    """Sums the first call of every region of one model; prints the total once, when the last
    region has run (rank 0 only, `verbose`)."""

    def __init__(self, verbose: bool):
        self.verbose, self.pending, self.seconds, self.n_regions = verbose, 0, 0.0, 0

    def add(self) -> None:
        self.pending += 1
        self.n_regions += 1

    def done(self, seconds: float) -> None:
        self.seconds += seconds
        self.pending -= 1
        if self.pending == 0 and self.verbose:
            print(f"torch.compile: {self.n_regions} regions compiled in {self.seconds:.1f} s "
                  f"(first forward; backward graphs compile in the first backward)", flush=True)


class CompiledRegion:
    """`fn` compiled with torch.compile; `fn` itself while kernels.batch_invariant is on."""

    def __init__(self, fn: Callable, clock: CompileClock, backend: str = "inductor"):
        self.eager = fn
        self.compiled = torch.compile(fn, fullgraph=True, backend=backend)
        self.clock, self.first = clock, True
        clock.add()

    def __call__(self, *args):
        if is_batch_invariant():
            return self.eager(*args)
        if not self.first:
            return self.compiled(*args)
        start = time.perf_counter()
        out = self.compiled(*args)
        self.first = False
        self.clock.done(time.perf_counter() - start)
        return out


class TraceableRegion:
    """A recompute runner (model/recompute.py) that dynamo can trace: inside a compiled region
    a plain non-reentrant checkpoint (dynamo cannot trace the runner's `context_fn`, which
    only carries the kernels' mode, and that mode is off wherever compiled code runs);
    elsewhere the runner itself."""

    def __init__(self, runner: Callable):
        self.runner = runner

    def __call__(self, fn: Callable, *args):
        if torch.compiler.is_compiling():
            return checkpoint(fn, *args, use_reentrant=False)
        return self.runner(fn, *args)


def _compile_moe(moe: MoE, clock: CompileClock, **options) -> None:
    """The MoE layer's shared experts, its router's scores and top-k, and the routed experts'
    SwiGLU between their grouped GEMMs; the load count, dispatch, the grouped GEMMs and
    combine stay eager (module docstring)."""
    if moe.shared_experts is not None:
        moe.shared_experts.forward = CompiledRegion(moe.shared_experts.forward, clock, **options)
    moe.gate.route = CompiledRegion(moe.gate.route, clock, **options)
    moe.experts.swiglu_fn = CompiledRegion(moe.experts.swiglu_fn, clock, **options)


def apply_compile(model: nn.Module, verbose: bool = False, backend: str = "inductor") -> nn.Module:
    """Compile the blocks (and MTP depths) of `model` in place (module docstring), after
    apply_recompute; `verbose`: print the compilation time once (pass True on rank 0);
    `backend`: torch.compile's ("aot_eager" traces the same graphs without code generation)."""
    clock, options = CompileClock(verbose), dict(backend=backend)
    for m in model.modules():
        for name, runner in list(vars(m).items()):  # the recompute runners, `*region` (model/recompute.py)
            if name.endswith("region") and runner is not None and not isinstance(runner, TraceableRegion):
                setattr(m, name, TraceableRegion(runner))
        if isinstance(m, MTPModule):
            m._merge = CompiledRegion(m._merge, clock, **options)
        if not isinstance(m, Block):
            continue
        if isinstance(m.ffn, MoE):
            m._attend = CompiledRegion(m._attend, clock, **options)
            _compile_moe(m.ffn, clock, **options)
        else:
            m._forward = CompiledRegion(m._forward, clock, **options)
    return model
