"""Dry-run planner: parameter counts against built models and the V3 paper, memory
estimates against measured tensor bytes, bubble formulas, stage splits."""
import os
import subprocess
import sys

import pytest
import torch

from ds_parallel.config.load import config_from_dict
from ds_parallel.model import build_model
from ds_parallel.parallel.groups import ParallelContext
from ds_parallel.parallel.plan import bubble_fraction, model_params, plan, split_layers

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("preset", ["debug_dense", "debug_dense_gqa", "debug_v2", "debug_v3"])
def test_parameter_counts_match_built_models(preset):
    cfg = config_from_dict({"model": {"preset": preset}})
    model = build_model(cfg.model, ParallelContext.single(), 1)
    counts = model_params(cfg.model)
    main = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("mtp."))
    mtp = sum(p.numel() for n, p in model.named_parameters() if n.startswith("mtp."))
    assert (main, mtp) == (counts["total"], counts["mtp_total"])


def test_deepseek_v3_counts_match_the_paper():
    # V3 report / README_WEIGHTS: 671B total, ~37B activated; MTP module ~11.5-11.6B unique.
    counts = model_params(config_from_dict({"model": {"preset": "deepseek_v3"}}).model)
    assert counts["total"] / 1e9 == pytest.approx(671.0, abs=0.5)
    assert counts["active"] / 1e9 == pytest.approx(37.55, abs=0.1)
    assert counts["mtp_total"] / 1e9 == pytest.approx(11.6, abs=0.1)


def _measured_bytes(cfg):
    """Tensor bytes of one fp32 training step on one process: saved activations (unique
    storages seen by autograd's pack hook, parameters excluded), weights, grads, AdamW."""
    model = build_model(cfg.model, ParallelContext.single(), 1)
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    t = cfg.train
    ids = torch.randint(0, cfg.model.vocab_size, (t.micro_batch_size, t.seq_len))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        out = model(ids, labels=ids)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    activations = sum(v for k, v in storages.items() if k not in params)
    out.loss.backward()
    opt = torch.optim.AdamW(model.parameters())
    opt.step()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters())
    optim = sum(v.numel() * v.element_size() for s in opt.state.values() for k, v in s.items() if k != "step")
    return activations, weights, grads, optim


@pytest.mark.parametrize("preset", ["debug_dense", "debug_v3"])
def test_memory_estimate_within_20_percent_of_measured(preset):
    cfg = config_from_dict({"model": {"preset": preset},
                            "train": {"global_batch_size": 8, "micro_batch_size": 8, "seq_len": 64}})
    stage = plan(cfg, 1)["stages"][0]
    activations, weights, grads, optim = _measured_bytes(cfg)
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


def test_stage_splits():
    m = config_from_dict({"model": {"preset": "deepseek_v3"}}).model
    stages = split_layers(m, 16)
    assert [i for s in stages for i in s] == list(range(61)) and len(stages) == 16 and all(stages)
    assert split_layers(m, 2, "30,31") == [list(range(30)), list(range(30, 61))]
    with pytest.raises(ValueError, match="must list 2 counts"):
        split_layers(m, 2, "30,30")


def test_plan_cli_on_the_v3_layout():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "launchers", "plan.py"), "--config",
                          os.path.join(ROOT, "configs", "v3_671b.yaml"), "--world", "2048"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "671.03B parameters, 37.55B activated" in out.stdout
    assert "tp 1 x pp 16 x dp 128 (ep 64 x edp 2)" in out.stdout and "dualpipev" in out.stdout
    assert len([line for line in out.stdout.splitlines() if line.strip()[:2].strip().isdigit()]) == 16
    bad = subprocess.run([sys.executable, os.path.join(ROOT, "launchers", "plan.py"), "--config",
                          os.path.join(ROOT, "configs", "v3_671b.yaml"), "--world", "1000"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert bad.returncode == 2 and "world size 1000 is not divisible" in bad.stderr
