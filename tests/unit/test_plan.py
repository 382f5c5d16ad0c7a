"""Dry-run planner: parameter counts against built models and the V3 paper, memory
estimates against measured tensor bytes, bubble formulas, stage splits."""
import os
import subprocess
import sys

import pytest
import torch

from ds_parallel.config.load import config_from_dict
from ds_parallel.model import build_model
from ds_parallel.model.recompute import saved_activation_bytes
from ds_parallel.parallel.groups import ParallelContext
from ds_parallel.config import ConfigError, load_config
from ds_parallel.parallel.plan import (GIB, bubble_fraction, check_memory, dualpipev_live, model_params, peak_bytes,
                                       pipeline_layout, plan, rank_params, split_layers, stage_params, suggest_layout)
from ds_parallel.parallel.topology import Topology

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("preset", ["debug_dense", "debug_dense_gqa", "debug_v2", "debug_v3", "qwen2_like"])
def test_parameter_counts_match_built_models(preset):
    # qwen2_like: GQA with q/k/v biases and tied embeddings (the head is the embedding's Parameter)
    model_cfg = ({"preset": "debug_dense_gqa", "qkv_bias": True, "tie_embeddings": True} if preset == "qwen2_like"
                 else {"preset": preset})
    cfg = config_from_dict({"model": model_cfg})
    model = build_model(cfg.model, ParallelContext.single(), 1)
    counts = model_params(cfg.model)
    main = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("mtp."))
    mtp = sum(p.numel() for n, p in model.named_parameters() if n.startswith("mtp."))
    assert (main, mtp) == (counts["total"], counts["mtp_total"])
    if preset == "qwen2_like":  # and by name, on each tp=2 shard
        for rank in range(2):
            ctx = ParallelContext(topo=Topology(2, tp=2), rank=rank)
            built = {n: q.numel() for n, q in build_model(cfg.model, ctx, 1).named_parameters()}
            planned = {q.name: q.local(2, 1) for q in stage_params(cfg.model, range(cfg.model.n_layers), True, True)}
            assert planned == built, set(planned.items()) ^ set(built.items())


# (preset, tp, pp, ep, pp_schedule, pp_layers): every rank of each layout is built in this
# process (construction only reads ctx.tp_rank, ctx.ep_rank, ctx.pp_rank).
LAYOUTS = [
    ("debug_v3", 2, 1, 1, "1f1b", None),
    ("debug_v3", 1, 1, 2, "1f1b", None),
    ("debug_v3", 1, 2, 1, "1f1b", None),  # MTP on the last rank with a tied embedding copy
    ("debug_v3", 1, 2, 1, "dualpipev", "1,0,0,1"),
    ("debug_v3", 2, 2, 2, "1f1b", None),
    ("debug_dense", 2, 1, 1, "1f1b", None),
    ("debug_dense", 2, 2, 1, "1f1b", None),
]


@pytest.mark.parametrize("preset, tp, pp, ep, schedule, pp_layers", LAYOUTS)
def test_per_rank_counts_match_each_built_shard(preset, tp, pp, ep, schedule, pp_layers):
    world = tp * pp * 2
    cfg = config_from_dict({"model": {"preset": preset},
                            "parallel": {"tp": tp, "pp": pp, "ep": ep, "pp_schedule": schedule, "pp_layers": pp_layers,
                                         "zero_stage": 1},
                            "train": {"global_batch_size": 8, "micro_batch_size": 1}})
    stages = plan(cfg, world)["stages"]
    layout = pipeline_layout(cfg.model, pp, schedule, pp_layers)
    for rank in range(world):
        ctx = ParallelContext(topo=Topology(world, tp=tp, pp=pp, ep=ep), rank=rank)
        built = {n: q.numel() for n, q in build_model(cfg.model, ctx, 1, layout).named_parameters()}
        planned = {q.name: q.local(tp, ep) for q in rank_params(cfg.model, layout, ctx.pp_rank)}
        assert planned == built, (rank, set(planned.items()) ^ set(built.items()))
        assert stages[ctx.pp_rank].params == sum(built.values()), rank
        assert stages[ctx.pp_rank].expert_params == sum(n for k, n in built.items() if ".experts." in k), rank


def test_deepseek_v3_counts_match_the_paper():
    # V3 report / README_WEIGHTS: 671B total, ~37B activated; MTP module ~11.5-11.6B unique.
    counts = model_params(config_from_dict({"model": {"preset": "deepseek_v3"}}).model)
    assert counts["total"] / 1e9 == pytest.approx(671.0, abs=0.5)
    assert counts["active"] / 1e9 == pytest.approx(37.55, abs=0.1)
    assert counts["mtp_total"] / 1e9 == pytest.approx(11.6, abs=0.1)


def _measured_bytes(cfg, ctx):
    """Tensor bytes of one fp32 training step on one process: saved activations (unique
    storages seen by autograd's pack hook, parameters excluded), weights, grads, AdamW.
    A tp=2 shard runs alone (its groups are None, so collectives are identities): the values
    are not the model's, the shapes and so the bytes are tp rank 0's."""
    model = build_model(cfg.model, ctx, 1)
    t = cfg.train
    ids = torch.randint(0, cfg.model.vocab_size, (t.micro_batch_size, t.seq_len))
    outputs = []
    activations = saved_activation_bytes(model, lambda: outputs.append(model(ids, labels=ids)))
    out = outputs[0]
    out.loss.backward()
    opt = torch.optim.AdamW(model.parameters())
    opt.step()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters())
    optim = sum(v.numel() * v.element_size() for s in opt.state.values() for k, v in s.items() if k != "step")
    return activations, weights, grads, optim


@pytest.mark.parametrize("preset, tp", [("debug_dense", 1), ("debug_v3", 1), ("debug_dense", 2), ("debug_v3", 2)])
def test_memory_estimate_within_20_percent_of_measured(preset, tp):
    cfg = config_from_dict({"model": {"preset": preset}, "parallel": {"tp": tp},
                            "train": {"global_batch_size": 8, "micro_batch_size": 8, "seq_len": 64}})
    stage = plan(cfg, tp)["stages"][0]
    activations, weights, grads, optim = _measured_bytes(cfg, ParallelContext(topo=Topology(tp, tp=tp), rank=0))
    assert stage.activation_bytes == pytest.approx(activations, rel=0.2)
    assert stage.weights_bytes == weights and stage.grads_bytes == grads and stage.optimizer_bytes == optim
    total = activations + weights + grads + optim
    assert stage.total_bytes == pytest.approx(total, rel=0.2)


def test_bubble_fractions():
    assert bubble_fraction("1f1b", 1, 8) == 0.0
    for p, m in [(2, 4), (4, 8), (16, 120)]:
        assert bubble_fraction("1f1b", p, m) == pytest.approx((p - 1) / (m + p - 1))
        assert bubble_fraction("dualpipev", p, m) < bubble_fraction("1f1b", p, m)
    assert bubble_fraction("dualpipev", 2, 4) == 0.0  # (p/2 - 1) = 0


def test_dualpipev_live_follows_torchs_schedule():
    """The planner's walk of DualPipeV (`dualpipev_live`) against the action list torch's
    ScheduleDualPipeV runs (the schedule the trainer uses): after every forward, the
    micro-batches each chunk of the rank holds. Forwards add one; a full backward frees one;
    an input backward frees its micro-batch after the chunk's next forward (the rule
    tests/dist/test_pipeline_memory.py measures); overlapped F/B pairs run F first."""
    from types import SimpleNamespace

    from torch.distributed.pipelining.schedules import ScheduleDualPipeV, _ComputationType

    def torch_states(pp, rank, n_micro):
        fake = SimpleNamespace(pp_group_size=pp, _n_microbatches=n_micro)
        actions = ScheduleDualPipeV._calculate_single_rank_operations(fake, rank)
        first = rank  # the V: rank r runs stages r and 2 pp - 1 - r
        live, pending, states = [0, 0], [0, 0], []
        for action in actions:
            for a in (action.sub_actions if action.sub_actions else (action,)):
                chunk = 0 if a.stage_index == first else 1
                kind = a.computation_type
                if kind == _ComputationType.FORWARD:
                    live[chunk] += 1
                    states.append(tuple(live))
                    live[chunk] -= pending[chunk]
                    pending[chunk] = 0
                elif kind == _ComputationType.FULL_BACKWARD:
                    live[chunk] -= 1
                elif kind == _ComputationType.BACKWARD_INPUT:
                    pending[chunk] += 1
        return states

    for pp in (2, 4, 8):
        for n_micro in (2 * pp, 2 * pp + 3, 4 * pp):
            for rank in range(pp):
                assert dualpipev_live(pp, rank, n_micro) == torch_states(pp, rank, n_micro), (pp, rank, n_micro)
    # rank 0 of pp = 2: its first chunk peaks at 4, its second at 2, never both at once
    assert max(a for a, _ in dualpipev_live(2, 0, 4)) == 4 and max(b for _, b in dualpipev_live(2, 0, 4)) == 2
    assert (4, 2) not in dualpipev_live(2, 0, 4)


def test_stage_splits():
    m = config_from_dict({"model": {"preset": "deepseek_v3"}}).model
    stages = split_layers(m, 16)
    assert [i for s in stages for i in s] == list(range(61)) and len(stages) == 16 and all(stages)
    assert split_layers(m, 2, "30,31") == [list(range(30)), list(range(30, 61))]
    with pytest.raises(ValueError, match="must list 2 layer counts"):
        split_layers(m, 2, "30,30")


def test_plan_cli_on_the_v3_layout():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "launchers", "plan.py"), "--config",
                          os.path.join(ROOT, "configs", "v3_671b.yaml"), "--world", "2048", "--gpu-mem-gib", "80"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "671.03B parameters, 37.55B activated" in out.stdout
    assert "tp 1 x pp 16 x dp 128 (ep 64 x edp 2)" in out.stdout and "dualpipev" in out.stdout
    assert len([line for line in out.stdout.splitlines() if line.strip()[:2].strip().isdigit()]) == 16
    assert "memory: fits: parallel layout tp=1 pp=16 ep=64 zero_stage=1 on 2048 ranks needs an estimated" in out.stdout
    bad = subprocess.run([sys.executable, os.path.join(ROOT, "launchers", "plan.py"), "--config",
                          os.path.join(ROOT, "configs", "v3_671b.yaml"), "--world", "1000"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert bad.returncode == 2 and "world size 1000 is not divisible" in bad.stderr


SMOKE = os.path.join(ROOT, "configs", "smoke_dense_cpu.yaml")


def test_memory_check_refuses_a_layout_over_budget_and_names_one_that_fits():
    cfg = load_config(SMOKE, [], world_size=2)
    peak = peak_bytes(plan(cfg, 2))  # 28.2 MiB, 23.3 of them activations
    if not torch.cuda.is_available():
        check_memory(cfg, 2)  # no budget on CPU: no check
    cfg.parallel.memory_budget_gib = peak / GIB
    check_memory(cfg, 2)  # exactly the estimate fits
    cfg.parallel.memory_budget_gib = 0.8 * peak / GIB
    with pytest.raises(ConfigError, match=r"needs an estimated 28.2 MiB per rank .*budget 22.5 MiB "
                                          r"\(parallel.memory_budget_gib\): set parallel.tp=2 \(18.7 MiB per rank\)"):
        check_memory(cfg, 2)
    assert suggest_layout(cfg, 2, 0.8 * peak) == ({"tp": 2}, pytest.approx(18.7 * 2**20, rel=0.01))
    cfg.parallel.tp = 2
    check_memory(cfg, 2)  # the suggestion passes the same check
    cfg.parallel.memory_budget_gib = 0.5 * peak / GIB
    with pytest.raises(ConfigError, match="no tp/pp/ep/zero_stage layout of 2 ranks fits"):
        check_memory(cfg, 2)


def test_train_refuses_an_over_budget_layout_before_starting(tmp_path):
    # One process told it is rank 0 of 2: the check runs before any process group, so it
    # exits without waiting for the peer.
    out_dir = tmp_path / "run"
    env = dict(os.environ, RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "launchers", "train.py"), "--config", SMOKE,
                           f"parallel.memory_budget_gib={0.8 * 28.2 / 1024}", f"train.out_dir={out_dir}"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("config error: does not fit: parallel layout tp=1 pp=1"), lines
    assert "needs an estimated 28.2 MiB per rank" in lines[0] and "set parallel.tp=2" in lines[0]
    assert not out_dir.exists()
