"""A loop's own objective through the trainer's parts (setup_training + train_step), the way
SFT and GRPO will use them: a loss that reads per-token and per-sample tensors beyond
input_ids and labels, on dp=2 and on a 2-stage pipeline (where every batch entry must be
split into micro-batches by the schedule and reach the last stage), against one plain
process computing the same objective on the whole batch.

The objective: cross-entropy on the tokens where batch["mask"] is 1, times the micro-batch
mean of batch["weight"] (one number per sample). Both vary per sample, so a mask or weight
routed to the wrong micro-batch changes the loss and the gradient."""
import pytest
import torch

from tests.harness import run_dist

pytestmark = pytest.mark.dist

BASE = ["model.n_layers=2", "train.global_batch_size=8", "train.micro_batch_size=2", "train.seq_len=16",
        "train.lr=1e-2", "train.warmup_steps=1", "train.grad_clip=0"]


class MaskedWeighted:
    metrics = ("loss", "lm_loss")

    def __call__(self, model, trunk, batch, step):
        labels = batch["labels"].masked_fill(batch["mask"] == 0, -100)
        out = model.finish(trunk.h, trunk.aux_loss, labels, trunk.emb, trunk.freqs_cis)
        return torch.stack([out.lm_loss * batch["weight"].float().mean(), out.lm_loss])


def _global_batch(cfg, step):
    g = torch.Generator().manual_seed(100 + step)
    n, t, v = cfg.train.global_batch_size, cfg.train.seq_len, cfg.model.vocab_size
    ids = torch.randint(0, v, (n, t + 1), generator=g)
    mask = (torch.rand(n, t, generator=g) < 0.6).long()
    weight = torch.rand(n, generator=g) * 2
    return {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "mask": mask, "weight": weight}


def _micro(batch, size, lo, hi):
    return [{k: v[i:i + size] for k, v in batch.items()} for i in range(lo, hi, size)]


def _check(rank, world, layouts, out_dir):
    import torch.distributed as dist

    from ds_parallel.config import load_config
    from ds_parallel.model import build_model
    from ds_parallel.parallel.groups import ParallelContext, build_parallel_context
    from ds_parallel.parallel.topology import Topology
    from ds_parallel.train.setup import setup_training
    from ds_parallel.train.step import train_step

    objective = MaskedWeighted()
    for extra in layouts:
        cfg = load_config(None, BASE + extra + [f"train.out_dir={out_dir}"], world_size=world)
        t, p = cfg.train, cfg.parallel
        ctx = build_parallel_context(Topology(world, tp=p.tp, pp=p.pp, ep=p.ep))
        parts = setup_training(cfg, ctx, objective)
        share = t.global_batch_size // ctx.dp
        batch = _global_batch(cfg, 0)
        result = train_step(parts, _micro(batch, t.micro_batch_size, ctx.dp_rank * share, (ctx.dp_rank + 1) * share), 0)

        ref = build_model(cfg.model, ParallelContext.single(), t.seed)
        metrics = [ref(mb["input_ids"], objective=lambda m, tr, mb=mb: objective(m, tr, mb, 0))
                   for mb in _micro(batch, t.micro_batch_size, 0, t.global_batch_size)]
        mean = torch.stack(metrics).mean(0)
        mean[0].backward()
        ref_norm = torch.sqrt(sum(q.grad.double().pow(2).sum() for q in ref.parameters())).item()
        for name, value in zip(objective.metrics, mean.tolist()):
            assert abs(result.losses[name] - value) <= 1e-5 * abs(value), (extra, name, result.losses[name], value)
        assert abs(result.grad_norm - ref_norm) <= 1e-5 * ref_norm, (extra, result.grad_norm, ref_norm)
        # The weight matters: without it the loss would be lm_loss.
        assert abs(result.losses["loss"] - result.losses["lm_loss"]) > 1e-3 * result.losses["lm_loss"]
        parts.engine.destroy()
        dist.barrier()


def test_custom_objective_on_dp_and_pipeline_matches_single_process(tmp_path):
    layouts = [["parallel.zero_stage=1"], ["parallel.pp=2", "parallel.zero_stage=1"]]
    run_dist(_check, 2, layouts, str(tmp_path))
