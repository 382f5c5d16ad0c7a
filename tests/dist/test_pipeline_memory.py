"""The planner's per-rank memory against what a real pipeline step holds, on 2 gloo ranks.

For 1F1B and DualPipeV (tiny DeepSeek-V3 with MTP, pp=2, ZeRO-0 so gradients stay in
param.grad): the peak of live saved activations during one step's schedule (unique
storages handed to autograd's pack hook, parameters excluded, released when autograd
drops them), the weights, the gradients and the AdamW state, per rank, against
`parallel.plan.plan`'s StagePlan for that rank.
"""
import pytest
import torch

from tests.harness import run_dist

pytestmark = pytest.mark.dist

BASE = ["model.preset=debug_v3", "model.n_layers=4", "model.mtp_depth=1", "parallel.pp=2",
        "parallel.zero_stage=0", "train.global_batch_size=16", "train.micro_batch_size=4", "train.seq_len=64"]


class _LiveBytes:
    """saved_tensors_hooks pair that tracks the bytes of saved storages alive right now."""

    def __init__(self, exclude):
        self.exclude, self.refs, self.live, self.peak = exclude, {}, 0, 0

    def pack(self, tensor):
        return _Held(self, tensor)

    @staticmethod
    def unpack(held):
        return held.tensor


class _Held:
    def __init__(self, tracker, tensor):
        self.tracker, self.tensor = tracker, tensor
        storage = tensor.untyped_storage()
        self.key = storage.data_ptr() if storage.data_ptr() not in tracker.exclude else None
        if self.key is not None:
            self.nbytes = storage.nbytes()
            tracker.refs[self.key] = tracker.refs.get(self.key, 0) + 1
            if tracker.refs[self.key] == 1:
                tracker.live += self.nbytes
                tracker.peak = max(tracker.peak, tracker.live)

    def __del__(self):
        if self.key is not None:
            tracker = self.tracker
            tracker.refs[self.key] -= 1
            if tracker.refs[self.key] == 0:
                del tracker.refs[self.key]
                tracker.live -= self.nbytes


def _measure(rank, world, schedules):
    import torch.distributed as dist

    from ds_parallel.config.load import load_config
    from ds_parallel.data import GlobalBatchLoader, build_datasets
    from ds_parallel.model import build_model
    from ds_parallel.parallel.groups import build_parallel_context
    from ds_parallel.train.objective import LanguageModeling
    from ds_parallel.train.pipeline import PipelineRunner
    from ds_parallel.train.step import lm_micro_batches
    from ds_parallel.parallel.plan import pipeline_layout, plan
    from ds_parallel.parallel.topology import Topology
    from ds_parallel.train.engine import build_engine, gradient_accumulation_steps

    for schedule in schedules:
        cfg = load_config(None, BASE + [f"parallel.pp_schedule={schedule}"], world_size=world)
        t, p = cfg.train, cfg.parallel
        ctx = build_parallel_context(Topology(world, pp=p.pp))
        layout = pipeline_layout(cfg.model, p.pp, p.pp_schedule, p.pp_layers)
        engine = build_engine(build_model(cfg.model, ctx, t.seed, layout), cfg, ctx)
        n_micro = gradient_accumulation_steps(cfg, ctx.dp)
        runner = PipelineRunner(engine, engine.module, layout, ctx, n_micro, t.micro_batch_size, t.seq_len,
                                LanguageModeling(cfg))
        data = build_datasets(cfg.data, t, cfg.model.vocab_size)
        micro = GlobalBatchLoader(data.train, t.global_batch_size, t.micro_batch_size, 0, 1, t.seed).micro_batches(0)
        params = list(engine.module.parameters())
        tracker = _LiveBytes({q.untyped_storage().data_ptr() for q in params})
        with torch.autograd.graph.saved_tensors_hooks(tracker.pack, tracker.unpack):
            runner.forward_backward(lm_micro_batches(micro), 0)
        grads = sum(q.grad.numel() * q.grad.element_size() for q in params if q.grad is not None)
        engine.step()
        optim = sum(v.numel() * v.element_size() for s in engine.basic_optimizer.state.values()
                    for k, v in s.items() if k != "step")
        weights = sum(q.numel() * q.element_size() for q in params)
        est = plan(cfg, world)["stages"][ctx.pp_rank]
        measured = {"activations": tracker.peak, "weights": weights, "grads": grads, "optimizer": optim}
        print(f"{schedule} rank {rank}: measured {measured}, estimated activations {est.activation_bytes:.0f} "
              f"total {est.total_bytes:.0f} vs {sum(measured.values())}", flush=True)
        assert est.weights_bytes == weights and est.grads_bytes == grads and est.optimizer_bytes == optim, \
            (schedule, rank, measured, est)
        # DualPipeV's rank 0 was 16% over while the planner added each chunk's own peak count
        # (4 + 2 micro-batches); its schedule never holds both at once (parallel/plan.py
        # `dualpipev_live`: 4 + 1 or 3 + 2)
        assert est.activation_bytes == pytest.approx(tracker.peak, rel=0.1), (schedule, rank, measured, est)
        assert est.total_bytes == pytest.approx(sum(measured.values()), rel=0.1), (schedule, rank)
        engine.destroy()
        dist.barrier()


def test_planner_memory_matches_each_pipeline_rank():
    run_dist(_measure, 2, ["1f1b", "dualpipev"])
