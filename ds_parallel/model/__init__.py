"""DeepSeek-family models built once, layout-independent, from a ModelConfig and a context."""
from __future__ import annotations

from ds_parallel.model.init import init_weights
from ds_parallel.model.transformer import ModelOutput, Transformer


def build_model(model_cfg, ctx, seed: int) -> Transformer:
    """Construct with the parallel context (each rank allocates only its shards), then
    initialise from `seed` (same full weights for every layout). In that order: init
    reads the shard specs that construction attached."""
    return init_weights(Transformer(model_cfg, ctx), seed)


__all__ = ["ModelOutput", "Transformer", "build_model", "init_weights"]
