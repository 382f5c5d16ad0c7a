"""What a GRPO optimizer step minimises, as the trainer sees it (train/objective.py protocol):
the clipped policy loss of rl/losses.py on micro-batches of rollout samples, with the loss
configuration a run's post_train.grpo section names."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ds_parallel.config.schema import Config
from ds_parallel.parallel.tensor_parallel import vocab_parallel_logprobs
from ds_parallel.rl.losses import LossConfig, policy_loss, preset


def loss_config(cfg: Config) -> LossConfig:
    """The LossConfig of post_train.grpo: the named preset, its KL coefficient, Dr. GRPO's
    constant normaliser (the generation budget), then loss_overrides."""
    g = cfg.post_train.grpo
    fields: dict[str, Any] = {"kl_coef": g.kl_coef}
    if g.loss == "dr_grpo":
        fields["max_len"] = g.max_new_tokens
    return preset(g.loss, **{**fields, **g.loss_overrides})


@dataclass(frozen=True)
class PolicyObjective:
    """The clipped policy loss of rl/losses.py on micro-batches of rollout samples, as a
    train/objective.py objective. Batch keys: input_ids, targets (the next tokens), mask
    (1 on completion targets), advantages (B,), old_logp, ref_logp (with a KL term), and the
    step's global counts n_tokens, n_seqs (B,) (every row the same)."""
    loss: LossConfig
    temperature: float
    scale: float  # global_batch / micro_batch: see rl/grpo.py's docstring, "Normalisers"
    ctx: Any
    metrics: tuple[str, ...] = ("loss", "policy_loss", "kl", "clip_fraction", "entropy", "ratio", "aux_loss")

    def __call__(self, model, trunk, batch, step: int) -> torch.Tensor:
        logits = model.finish(trunk.h, trunk.aux_loss, None, None, trunk.freqs_cis).logits
        logp, entropy = vocab_parallel_logprobs(logits / self.temperature, batch["targets"], self.ctx, entropy=True)
        loss, m = policy_loss(self.loss, logp, batch["old_logp"], batch["advantages"], batch["mask"],
                              n_tokens=batch["n_tokens"][0], n_seqs=batch["n_seqs"][0],
                              ref_logp=batch.get("ref_logp"), entropy=entropy)
        zero = loss.new_zeros(())
        parts = [loss, m.get("kl", zero), m["clip_frac"], m["entropy"], m["ratio"]]
        policy = [v * self.scale for v in parts]
        return torch.stack([policy[0] + trunk.aux_loss, *policy, trunk.aux_loss.detach()])
