"""DeepSeek-family models built once, layout-independent, from a ModelConfig and a context."""
from __future__ import annotations

from ds_parallel.model.init import init_weights
from ds_parallel.model.recompute import apply_recompute
from ds_parallel.model.transformer import ModelOutput, Transformer


def construct_model(model_cfg, ctx, layout=None) -> Transformer:
    """This rank's part of the model, uninitialised: only its shards under the parallel
    context, and with a `parallel.plan.PipelineLayout` only its pipeline stages' parts."""
    if layout is None or layout.pp == 1:
        return Transformer(model_cfg, ctx)
    r = ctx.pp_rank
    return Transformer(model_cfg, ctx, layout.layers_of(r), layout.has_embed(r), layout.has_head(r))


def build_model(model_cfg, ctx, seed: int, layout=None) -> Transformer:
    """Construct (construct_model), then initialise from `seed` (same full weights for every
    layout). In that order: init reads the shard specs that construction attached."""
    return init_weights(construct_model(model_cfg, ctx, layout), seed)


__all__ = ["ModelOutput", "Transformer", "apply_recompute", "build_model", "construct_model", "init_weights"]
