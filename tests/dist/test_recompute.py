"""Activation recomputation changes no number, under every layout (2 gloo ranks, one spawn).

For dp=2, ep=2, tp=2, pp=2 with 1F1B and pp=2 with DualPipeV (its split input/weight
backward), on the tiny DeepSeek-V3 (MLA, MoE with the aux-loss-free bias, MTP): the run is
built by `setup_training` (so the config reaches the model the way a real run does) and
trained 2 steps with train.recompute = none, selective (V3's set) and full (and full with
recompute_layers=1 under DualPipeV). Every mode must give the losses, gradient norms and
updated parameters of `none` to 1e-6 (AdamW at lr 1e-2 turns any gradient difference into a
parameter difference), and the same expert loads and router biases exactly: routing is
reused, not recomputed, and loads are not counted twice. Under ep=2 every mode makes as many
all-to-all calls as `none`: no dispatch or combine is repeated by a recomputation.

Each run also measures the peak of live saved activations during its steps (as
tests/dist/test_pipeline_memory.py does), and what a mode cuts from `none`'s peak must be the
cut `parallel.plan` predicts for this rank (summed over both ranks under ep=2, whose pairs
per rank follow the routing): selective within 10%, full within 20%.
"""
import pytest
import torch

from tests.harness import run_dist

pytestmark = pytest.mark.dist

BASE = ["model.preset=debug_v3", "model.n_layers=4", "model.mtp_depth=1", "model.bias_update_speed=1e-2",
        "model.seq_aux_alpha=1e-2", "train.global_batch_size=8", "train.micro_batch_size=2", "train.seq_len=32",
        "train.lr=1e-2", "train.warmup_steps=1", "train.grad_clip=0.5", "train.eps=1e-4", "parallel.zero_stage=1",
        "train.tensorboard=false"]

LAYOUTS = {"dp2": [], "ep2": ["parallel.ep=2"], "tp2": ["parallel.tp=2"], "pp2_1f1b": ["parallel.pp=2"],
           "pp2_dualpipev": ["parallel.pp=2", "parallel.pp_schedule=dualpipev"]}

MODES = {"none": [], "selective": ["train.recompute=selective"], "full": ["train.recompute=full"]}


def _run(cfg, ctx):
    from ds_parallel.data import GlobalBatchLoader, build_datasets
    from ds_parallel.parallel.shard import gather_full, local_shape, shards_of
    from ds_parallel.train.setup import setup_training
    from ds_parallel.train.step import lm_micro_batches, train_step

    from ds_parallel.model.block import Block
    from ds_parallel.model.norm import RMSNorm

    parts = setup_training(cfg, ctx)
    # setup_training applied the config: the regions the mode names are on this rank's modules
    modules = list(parts.model.modules())
    full = [m.layer_id for m in modules if isinstance(m, Block) and m.region is not None]
    selective = any(isinstance(m, RMSNorm) and m.region is not None for m in modules)
    assert selective == (cfg.train.recompute == "selective"), cfg.train.recompute
    assert bool(full) == (cfg.train.recompute == "full"), cfg.train.recompute
    if cfg.train.recompute_layers == 1:  # DualPipeV: one block of each of this rank's two stages
        assert len(full) == 2, full
    t = cfg.train
    data = build_datasets(cfg.data, t, cfg.model.vocab_size)
    loader = GlobalBatchLoader(data.train, t.global_batch_size, t.micro_batch_size, ctx.dp_rank, ctx.dp, t.seed)
    from ds_parallel.parallel.plan import plan
    from tests.dist.test_pipeline_memory import _LiveBytes

    import torch.distributed as dist

    history = []
    tracker = _LiveBytes({q.untyped_storage().data_ptr() for q in parts.model.parameters()})
    all_to_all, calls = dist.all_to_all_single, []

    def counted(*args, **kwargs):  # the EP dispatch / combine (and their split-size exchange)
        calls.append(1)
        return all_to_all(*args, **kwargs)

    dist.all_to_all_single = counted
    try:
        for step in range(2):
            with torch.autograd.graph.saved_tensors_hooks(tracker.pack, tracker.unpack):
                result = train_step(parts, lm_micro_batches(loader.micro_batches(step)), step)
            history.append((result.losses, result.grad_norm, result.expert_loads, len(calls)))
    finally:
        dist.all_to_all_single = all_to_all
    # peak live saved-activation bytes of the schedule, and the planner's for this rank
    memory = (tracker.peak, plan(cfg, ctx.world_size)["stages"][ctx.pp_rank].activation_bytes)
    params = {}
    for name, p in parts.model.named_parameters():
        params[name] = gather_full(p.detach().view(local_shape(p)), shards_of(p), ctx).clone()
    biases = {name: b.clone() for name, b in parts.model.named_buffers() if name.endswith("e_score_correction_bias")}
    parts.engine.destroy()
    return history, params, biases, memory


def _check(rank, world, out_dir):
    import torch.distributed as dist

    from ds_parallel.config.load import load_config
    from ds_parallel.parallel.groups import build_parallel_context
    from ds_parallel.parallel.topology import Topology

    for layout, extra in LAYOUTS.items():
        modes = dict(MODES)
        if layout == "pp2_dualpipev":
            modes["full_1"] = ["train.recompute=full", "train.recompute_layers=1"]
        runs = {}
        for mode, flags in modes.items():
            cfg = load_config(None, BASE + extra + flags + [f"train.out_dir={out_dir}/{layout}_{mode}"],
                              world_size=world)
            p = cfg.parallel
            ctx = build_parallel_context(Topology(world, tp=p.tp, pp=p.pp, ep=p.ep))
            runs[mode] = _run(cfg, ctx)
            dist.barrier()
        ref_history, ref_params, ref_biases, ref_memory = runs.pop("none")
        if cfg.model.n_routed_experts:  # the biases moved
            assert ref_biases and any(b.abs().sum() > 0 for b in ref_biases.values()), layout
        for mode, (history, params, biases, memory) in runs.items():
            what = f"{layout} {mode} rank {rank}"
            for step, ((losses, norm, loads, a2a), (ref_losses, ref_norm, ref_loads, ref_a2a)) in enumerate(
                    zip(history, ref_history)):
                assert a2a == ref_a2a and (a2a > 0) == (layout == "ep2"), (what, step, "all-to-alls", a2a, ref_a2a)
                assert losses.keys() == ref_losses.keys()
                for key, value in losses.items():
                    assert abs(value - ref_losses[key]) <= 1e-6 * max(1.0, abs(ref_losses[key])), (what, step, key)
                assert abs(norm - ref_norm) <= 1e-6 * ref_norm, (what, step, norm, ref_norm)
                loads, ref_loads = loads or {}, ref_loads or {}  # None: a dense model
                assert loads.keys() == ref_loads.keys() and all(torch.equal(loads[k], ref_loads[k]) for k in loads), \
                    (what, step, "expert loads")
            assert params.keys() == ref_params.keys()
            for name, value in params.items():
                torch.testing.assert_close(value, ref_params[name], rtol=1e-6, atol=1e-6 * ref_params[name].abs().max(),
                                           msg=lambda m: f"{what} {name}: {m}")
            assert biases.keys() == ref_biases.keys()
            for name, value in biases.items():
                assert torch.equal(value, ref_biases[name]), (what, name)
            saved, predicted = ref_memory[0] - memory[0], ref_memory[1] - memory[1]
            if layout == "ep2":
                # Each rank's experts take the pairs routing sends them, the planner the mean
                # share; over both ranks the pairs are exact (N x K), so compare the sums.
                both = torch.tensor([saved, predicted], dtype=torch.float64)
                dist.all_reduce(both)
                saved, predicted = both.tolist()
            print(f"{what}: peak saved activations {memory[0]} (none {ref_memory[0]}), cut {saved}, "
                  f"planner's cut {predicted:.0f}", flush=True)
            tol = 0.2 if mode.startswith("full") else 0.1
            assert predicted == pytest.approx(saved, rel=tol), (what, saved, predicted)


def test_every_recompute_mode_matches_none_under_every_layout(tmp_path):
    run_dist(_check, 2, str(tmp_path))
