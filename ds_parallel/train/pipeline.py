"""Pipeline-parallel execution: torch.distributed.pipelining schedules driving our stages.

Why this engine. DeepSpeed's `PipelineModule` runs 1F1B only, wants the model rewritten as
a flat layer list with tuple-of-tensor activations, and lets only the last stage's output
reach the loss, so MoE balance losses on earlier stages would need a side channel; it has no
DualPipe. torch.distributed.pipelining ships `Schedule1F1B` and `ScheduleDualPipeV` (the
V-shaped DualPipe of DeepSeek-V3, with split input/weight backward) over any nn.Module
stage, passes keyword inputs to every stage, and leaves the optimizer alone. So the
schedule runs forward and backward of the micro-batches on this rank's stages, and the
DeepSpeed engine keeps what it does well: ZeRO-1 partitioning, gradient reduction over
data parallel (experts over expert-data parallel, with their own scaling) and the step.
The engine is told nothing about the pipeline: its gradient accumulation is 1 (one
pipeline step per optimizer step), and `PipelineRunner.step` calls
`engine.allreduce_gradients()` after the schedule, as DeepSpeed's own pipeline engine does.

What crosses stages. Each stage gets (h, aux): the residual stream (mb, T, D) and the
running sum of MoE balance losses (1,), which every stage adds its layers' terms to, so the
aux losses of every stage reach the backward pass through the same send/recv as h. The last
stage hands them with h to the step's objective (train/objective.py), which returns its
metrics vector per micro-batch (pre-training: train.metrics.LOSSES, [loss, lm, aux, mtp]);
the schedule's loss function keeps it for the metrics and takes metrics[0] / n_micro, the
same scaling as gradient accumulation over micro-batches without a pipeline. The micro-batch
(input_ids, labels, whatever the objective reads) travels as keyword inputs, which torch's
schedules split and hand to every stage: the first stage embeds the ids, the last computes
the objective, and with MTP embeds the ids again (MTP depth k reads Emb(t_{i+k})). Under DualPipeV that is the same embedding module (rank 0 holds stage 0 and
the last stage); under 1F1B the last rank holds a copy, initialised identically (init is
by name), whose gradient is summed with the first rank's over `ctx.embed_group` before the
optimizer step, so the two copies stay equal, and which DeepSpeed's norm skips
(`ds_pipe_replicated`).

Activation recomputation needs nothing here: its regions are non-reentrant checkpoints
inside the blocks (model/recompute.py, applied by train/setup.py per stage, the first
train.recompute_layers blocks of each of this rank's stages), which both schedules'
backwards, DualPipeV's split input / weight backward included, recompute on use. The split
backward recomputes a region in each of its two passes (torch's checkpoint releases what it
recomputed once it has been read), so recompute costs DualPipeV more time than 1F1B.
tests/dist/test_recompute.py checks gradients and the measured cut against the planner.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from ds_parallel.model.transformer import ModelOutput, Trunk
from ds_parallel.parallel.plan import PipelineLayout
from ds_parallel.train.engine import clip_grad_norm_
from ds_parallel.train.objective import MicroBatch, Objective


class StageChunk(nn.Module):
    """One pipeline stage: a view over the rank's partial Transformer (the same modules,
    so the engine's parameters are what the schedule's backward writes into). The last
    stage returns `loss(model, trunk, batch)`, the runner's objective at its current step."""

    def __init__(self, model: nn.Module, layout: PipelineLayout, stage: int, loss=None):
        super().__init__()
        self.first, self.last = stage == 0, stage == layout.n_stages - 1
        self.stage = stage
        self.layers = nn.ModuleList(model.layers[str(i)] for i in layout.stages[stage])
        self.embed = model.embed if self.first or (self.last and layout.mtp) else None
        if self.last:
            self.norm, self.head, self.mtp = model.norm, model.head, model.mtp
        object.__setattr__(self, "model", model)  # not a child: its other parts are not this stage's
        self.loss = loss

    def forward(self, x: torch.Tensor, aux: Optional[torch.Tensor] = None, **batch: torch.Tensor):
        model, tokens = self.model, batch["input_ids"]
        freqs_cis = model.rope(tokens.shape[1])
        if self.first:
            x = self.embed(tokens)
            aux = x.new_zeros(1, dtype=torch.float32)
        h, aux = model.run_layers(x, self.layers, freqs_cis, aux.reshape(()))
        if not self.last:  # outputs must not be views: the schedule detaches them in place
            return h, aux.reshape(1).clone()
        emb = self.embed(tokens) if len(model.mtp) else None
        return self.loss(model, Trunk(h, aux, emb, freqs_cis), batch)


class PipelineRunner:
    """Runs one optimizer step's micro-batches through the pipeline schedule."""

    def __init__(self, engine, model: nn.Module, layout: PipelineLayout, ctx, n_micro: int, micro_batch: int,
                 seq_len: int, objective: Objective, grad_clip: float = 0.0):
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleDualPipeV

        self.engine, self.model, self.layout, self.ctx, self.n_micro = engine, model, layout, ctx, n_micro
        self.grad_clip, self.objective = grad_clip, objective
        self._metrics: list[torch.Tensor] = []  # the last stage's metrics vector per micro-batch, this step
        self._step = 0  # the optimizer step being run (the objective's schedules read it)
        self.grad_norm = float("nan")  # global norm of the last step's gradients, before clipping
        rank = ctx.pp_rank
        self.chunks = [StageChunk(model, layout, s, self._objective) for s in layout.stages_of(rank)]
        dtype = next(model.parameters()).dtype
        ids = torch.zeros(micro_batch, seq_len, dtype=torch.long, device="meta")
        acts = (torch.empty(micro_batch, seq_len, model.cfg.dim, dtype=dtype, device="meta", requires_grad=True),
                torch.empty(1, dtype=torch.float32, device="meta", requires_grad=True))
        metrics = torch.empty(len(objective.metrics), dtype=torch.float32, device="meta")
        device = ctx.device
        # DualPipeV splits backward into an input step and a weight step. torch 2.13's weight
        # step cannot run the last stage once the head is reused by two or more MTP depths
        # (its parameter groups then share graph nodes, and the second autograd.grad finds
        # them freed), so that stage does its whole backward in the input step (a no-op
        # weight runner, torch's `dw_builder` hook). Tested in tests/dist (mtp_depth=2).
        whole = lambda: (lambda: None)  # noqa: E731
        self.stages = [
            PipelineStage(chunk, chunk.stage, layout.n_stages, device,
                          input_args=(ids,) if chunk.first else acts,
                          output_args=metrics if chunk.last else acts, group=ctx.pp_group,
                          dw_builder=whole if chunk.last and len(model.mtp) > 1 else None)
            for chunk in self.chunks
        ]
        loss_fn = self._loss
        if layout.is_dualpipe:
            self.schedule = ScheduleDualPipeV(self.stages, n_micro, loss_fn=loss_fn, scale_grads=False)
        else:
            (stage,) = self.stages
            self.schedule = Schedule1F1B(stage, n_micro, loss_fn=loss_fn, scale_grads=False)
        self.holds_last = layout.has_head(rank)
        if layout.tied_embedding and self.holds_last:
            model.embed.weight.ds_pipe_replicated = True  # counted once (on the first rank) in norms

    def _objective(self, model: nn.Module, trunk: Trunk, batch: MicroBatch) -> torch.Tensor:
        return self.objective(model, trunk, batch, self._step)

    def _loss(self, output: torch.Tensor, target) -> torch.Tensor:
        self._metrics.append(output.detach())
        return output[0] / self.n_micro

    def forward_backward(self, micro: list[MicroBatch], step: int) -> dict[str, float]:
        """Forward and backward of this rank's micro-batches at optimizer step `step`;
        gradients end up reduced (dp, edp, tied embedding), clipped by their global norm over
        every stage (`grad_norm`), and ready for `engine.step()`. Returns per-metric sums
        over the micro-batches on the rank holding the last stage, zeros elsewhere."""
        batch = {key: torch.cat([mb[key] for mb in micro]) for key in micro[0]}
        tokens = batch["input_ids"]
        # return_outputs=False: a kept output would keep its micro-batch's graph (retained by
        # DualPipeV's split backward) alive to the end of the step; metrics come via _loss.
        self._metrics, self._step = [], step
        args = (tokens,) if self.layout.stages_of(self.ctx.pp_rank)[0] == 0 else ()
        self.schedule.step(*args, target=tokens, return_outputs=False, **batch)
        if self.layout.tied_embedding and self.ctx.embed_group is not None:
            grad = self.model.embed.weight.grad
            dist.all_reduce(grad, group=self.ctx.embed_group)
        self.engine.allreduce_gradients()
        self.grad_norm = clip_grad_norm_(self.model, self.ctx, self.grad_clip)
        names = self.objective.metrics
        if not self.holds_last:
            return dict.fromkeys(names, 0.0)
        return dict(zip(names, torch.stack(self._metrics).sum(0).tolist()))


class PipelineForward(nn.Module):
    """Inference through the stages in order, without a schedule (evaluation, generation):
    each rank runs its stages when their input arrives, and the last stage's logits are
    broadcast over the pp group, so every rank returns the same ModelOutput(logits)."""

    def __init__(self, runner: PipelineRunner):
        super().__init__()
        self.model = runner.model  # a child, so eval()/train() reach the routers
        object.__setattr__(self, "runner", runner)

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor) -> ModelOutput:
        runner, model = self.runner, self.model
        layout, ctx = runner.layout, runner.ctx
        me, peers = ctx.pp_rank, ctx.ranks["pp"]
        freqs_cis = model.rope(input_ids.shape[1])
        dtype = next(model.parameters()).dtype
        input_ids = input_ids.to(ctx.device)
        h = torch.empty(*input_ids.shape, model.cfg.dim, dtype=dtype, device=ctx.device)
        logits = torch.empty(*input_ids.shape, model.cfg.vocab_size // ctx.tp, dtype=dtype, device=ctx.device)
        last = layout.n_stages - 1
        for stage in range(layout.n_stages):
            owner = layout.rank_of(stage)
            if owner != me:
                continue
            if stage == 0:
                h = model.embed(input_ids)
            elif layout.rank_of(stage - 1) != me:
                dist.recv(h, src=peers[layout.rank_of(stage - 1)], group=ctx.pp_group)
            h, _ = model.run_layers(h, [model.layers[str(i)] for i in layout.stages[stage]], freqs_cis)
            if stage == last:
                logits = model.finish(h, h.new_zeros(()), None, None, freqs_cis).logits.contiguous()
            elif layout.rank_of(stage + 1) != me:
                dist.send(h.contiguous(), dst=peers[layout.rank_of(stage + 1)], group=ctx.pp_group)
        dist.broadcast(logits, src=peers[layout.rank_of(last)], group=ctx.pp_group)
        return ModelOutput(logits=logits)


def gather_layer_tensors(values: dict[int, torch.Tensor], layer_ids: list[int], width: int,
                         ctx) -> dict[int, torch.Tensor]:
    """{layer: (width,) tensor} for every id in `layer_ids`, from each pp rank's own layers
    (per-layer expert loads and router biases, for the metrics rank 0 writes). Collective
    over the pp group; without a pipeline `values` already holds every layer."""
    if ctx.pp == 1:
        return values
    table = torch.zeros(len(layer_ids), width, dtype=torch.float64, device=ctx.device)
    for row, layer in enumerate(layer_ids):
        if layer in values:
            table[row] = values[layer].double()
    dist.all_reduce(table, group=ctx.pp_group)  # each layer lives on one pp rank: the sum assembles
    return {layer: table[row].float().cpu() for row, layer in enumerate(layer_ids)}
