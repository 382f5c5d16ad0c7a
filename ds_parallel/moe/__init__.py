"""DeepSeekMoE with expert parallelism: router -> permute -> dispatch -> experts -> combine."""
from ds_parallel.moe.layer import MoE, expert_load_imbalance, moe_layers, update_moe_biases
from ds_parallel.moe.router import Router, Routing

__all__ = ["MoE", "Router", "Routing", "expert_load_imbalance", "moe_layers", "update_moe_biases"]
