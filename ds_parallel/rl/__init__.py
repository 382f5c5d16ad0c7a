"""Post-training (GRPO and its variants): the pure loss math in losses.py, on padded (B, T)
tensors, with no model and no process group."""
from ds_parallel.rl.losses import (ADVANTAGES, PRESETS, LossConfig, dr_grpo_advantages, dynamic_sampling_mask,
                                   grpo_advantages, kl_estimate, overlong_penalty, policy_loss, preset)

__all__ = ["ADVANTAGES", "PRESETS", "LossConfig", "dr_grpo_advantages", "dynamic_sampling_mask", "grpo_advantages",
           "kl_estimate", "overlong_penalty", "policy_loss", "preset"]
