"""What an optimizer step minimises: the objective a loop hands to `setup_training`.

An objective maps the model's trunk output (model.transformer.Trunk: the last block's
hidden state, the MoE balance losses, the embedding) and one micro-batch to a vector of
metrics, `metrics[0]` being the loss that backward differentiates:

    objective(model, trunk, batch, step) -> (len(objective.metrics),) tensor

`batch` maps names to tensors whose first dimension is the micro-batch ("input_ids" and
whatever else the loop's data carries: labels, per-token masks, advantages, old
log-probabilities), so the pipeline schedule splits every entry into micro-batches alike.
The same call runs on any layout: without a pipeline through the DeepSpeed engine's forward
(`model(ids, objective=...)`), with one on the last stage (train/pipeline.py). Metrics are
summed over the step's micro-batches and averaged over the global batch by train_step.

`LanguageModeling` is pre-training's objective and SFT's (prompt tokens carry label -100; an
SFT batch also carries "loss_denominator", so the loss is a mean over the global batch's
supervised tokens, and packed rows carry "segment_ids").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Protocol

import torch

from ds_parallel.config.schema import Config
from ds_parallel.model.transformer import Trunk
from ds_parallel.train.metrics import LOSSES
from ds_parallel.train.schedule import mtp_lambda_at

MicroBatch = Mapping[str, torch.Tensor]


class Objective(Protocol):
    metrics: tuple[str, ...]  # names of the returned vector's entries; metrics[0] is minimised

    def __call__(self, model: torch.nn.Module, trunk: Trunk, batch: MicroBatch, step: int) -> torch.Tensor:
        ...


@dataclass(frozen=True)
class LanguageModeling:
    """Next-token cross-entropy on batch["labels"] (-100: no target) + MoE balance losses +
    the MTP loss with the step's weight (V3 §4.2): train.metrics.LOSSES."""
    cfg: Config
    metrics: tuple[str, ...] = LOSSES

    def __call__(self, model, trunk: Trunk, batch: MicroBatch, step: int) -> torch.Tensor:
        mtp_lambda = mtp_lambda_at(step, self.cfg.model, self.cfg.train)
        # SFT batches (data/sft.py) carry the global-batch normaliser and, packed, the examples
        # of each row (trunk.segments); pre-training batches neither.
        denominator = batch.get("loss_denominator")
        out = model.finish(trunk.h, trunk.aux_loss, batch["labels"], trunk.emb, trunk.freqs_cis, mtp_lambda,
                           segments=trunk.segments,
                           n_targets=denominator.sum() if denominator is not None else None)
        zero = out.loss.new_zeros(())
        return torch.stack([v if (v := getattr(out, name)) is not None else zero for name in self.metrics])
