"""DeepSeek-family models built once, layout-independent, from a ModelConfig and a context."""
from __future__ import annotations

from ds_parallel.model.init import init_weights
from ds_parallel.model.transformer import ModelOutput, Transformer


def build_model(model_cfg, ctx, seed: int, layout=None) -> Transformer:
    """Construct with the parallel context (each rank allocates only its shards, and with a
    `parallel.plan.PipelineLayout` only its pipeline stages' parts), then initialise from
    `seed` (same full weights for every layout). In that order: init reads the shard specs
    that construction attached."""
    if layout is None or layout.pp == 1:
        return init_weights(Transformer(model_cfg, ctx), seed)
    r = ctx.pp_rank
    part = Transformer(model_cfg, ctx, layout.layers_of(r), layout.has_embed(r), layout.has_head(r))
    return init_weights(part, seed)


__all__ = ["ModelOutput", "Transformer", "build_model", "init_weights"]
