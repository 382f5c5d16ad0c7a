"""Transformer Engine: the ONLY module that imports `transformer_engine` (docs/architecture.md,
invariant 6).

Everything here is imported lazily inside functions, so importing ds_parallel never touches
TE. `te_available()` is False on CPU machines (TE needs CUDA; a half-installed TE raises
RuntimeError, not ImportError, on import, hence the broad except), and every other entry
point raises `TEUnavailableError` naming the config key to change.

With TE, an eligible linear keeps its own weight (and hence its tensor-parallel shard,
names and checkpoints); its `gemm` hook becomes a `TEGemm` submodule (registered, so
DeepSpeed and `state_dict` see TE's FP8 metadata) holding a `te.pytorch.Linear` built for the
local shard shape, in the weight's final dtype and on its device (train/engine.py casts and
moves the model before the FP8 swap), whose `weight` *is* that parameter. It runs inside
TE's FP8 autocast with the configured recipe and the amax reduction group of the rank's
pipeline stage (`ParallelContext.amax_group`: tp x cp x dp), so every rank that shares a
tensor agrees on its scale under delayed and current scaling. Communication stays in
parallel/tensor_parallel.py. Routed experts are not run by TE (its GroupedLinear owns its
weights, ours are stored by global expert id): validation refuses them unless
`precision.fp8.keep_high_precision` lists "experts".

Not exercised on CPU machines (TE needs CUDA); tests/gpu runs these paths where
`te_available()` is True. The project's checkpoints store parameters and buffers, not TE's
amax history: a delayed-scaling run restarts its history on resume.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

_FIX = ("install Transformer Engine (pip install transformer-engine[pytorch]) on a CUDA machine, "
        "or set precision.fp8.backend=torch with precision.fp8.recipe=blockwise")


class TEUnavailableError(RuntimeError):
    pass


def te_available() -> bool:
    """True where `transformer_engine.pytorch` imports (needs CUDA and a matching build)."""
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # ImportError, or RuntimeError from a build without its CUDA libraries
        return False
    return True


def require_te() -> None:
    if not te_available():
        raise TEUnavailableError(f"precision.fp8.backend=te: transformer_engine is not importable here: {_FIX}")


def build_recipe(class_name: str, kwargs: dict[str, Any]):
    """A TE recipe object from `recipe.te_recipe_spec` output: class name in
    transformer_engine.common.recipe, and kwargs where `fp8_format` is a Format member name."""
    require_te()
    from transformer_engine.common import recipe as te_recipe

    kwargs = dict(kwargs)
    if "fp8_format" in kwargs:
        kwargs["fp8_format"] = getattr(te_recipe.Format, kwargs["fp8_format"])
    return getattr(te_recipe, class_name)(**kwargs)


def autocast(recipe, amax_reduction_group=None):
    """TE's FP8 autocast context: `te.pytorch.autocast` (TE >= 2.8) or `fp8_autocast`."""
    require_te()
    import transformer_engine.pytorch as te_pt

    if hasattr(te_pt, "autocast"):
        return te_pt.autocast(enabled=True, recipe=recipe, amax_reduction_group=amax_reduction_group)
    return te_pt.fp8_autocast(enabled=True, fp8_recipe=recipe, fp8_group=amax_reduction_group)


class TEGemm(nn.Module):
    """`gemm(x, weight)` through a TE Linear that shares `weight` (out, in) with our module.

    A submodule of the linear it serves: `named_parameters` lists the shared weight once,
    under the linear's own name (it is registered there first), so optimizer groups, ZeRO
    and checkpoints see one parameter."""

    def __init__(self, weight: nn.Parameter, recipe, amax_group=None):
        super().__init__()
        require_te()
        import transformer_engine.pytorch as te_pt

        out_features, in_features = weight.shape
        self.linear = te_pt.Linear(in_features, out_features, bias=False, params_dtype=weight.dtype,
                                   device=weight.device)
        self.linear.weight = weight  # replace TE's own parameter: one weight, our name and shard
        self.recipe, self.amax_group = recipe, amax_group

    def forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        assert weight is self.linear.weight, "TEGemm called with a weight it was not built for"
        with autocast(self.recipe, self.amax_group):
            return self.linear(x)

    def extra_repr(self) -> str:
        return type(self.recipe).__name__
