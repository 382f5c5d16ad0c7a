"""Activation recomputation (model/recompute.py) on one process: the numbers do not move, the
saved bytes do, by what the planner predicts.

- Each mode and each selective module gives the loss and every gradient of `none` (fp32, to
  1e-6; in fact bit-identical) on the dense model, GQA, the tiny DeepSeek-V3 (MLA with query
  compression, MoE, MTP, packed rows) and V2 (MLA without it), and the same expert loads:
  routing is not re-run in a recomputed block, so nothing is counted twice.
- Saved-activation bytes (unique storages handed to autograd's pack hook, parameters
  excluded, as tests/unit/test_plan.py measures them): what selective recompute removes
  agrees with `parallel.plan`'s prediction to 10% (per module and together, fp32 and bf16,
  tp 1 and 2), and a fully recomputed block keeps what `full_bytes_per_token` says.
- The choice of blocks under train.recompute_layers, config validation, and the planner's
  report of all three modes for configs/v3_671b.yaml.
"""
import os
import re
import subprocess
import sys
import threading

import pytest
import torch
from torch.utils.checkpoint import CheckpointError, checkpoint

from ds_parallel.config.errors import ConfigError
from ds_parallel.config.load import config_from_dict, load_config
from ds_parallel.kernels import batch_invariant
from ds_parallel.model import apply_recompute, build_model
from ds_parallel.model.recompute import recompute_region, saved_activation_bytes
from ds_parallel.model.block import Block
from ds_parallel.moe.layer import MoE
from ds_parallel.parallel.groups import ParallelContext
from ds_parallel.parallel.plan import (full_bytes_per_token, full_recompute_blocks, plan, selective_saving_per_token,
                                       stage_blocks)
from ds_parallel.parallel.topology import Topology

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ALL = ["norm", "mla_up_proj", "swiglu"]


def _step(model, ids, segment_ids=None):
    """Loss, gradients and router loads of one forward + backward."""
    out = model(ids, labels=ids, segment_ids=segment_ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    loads = {m.layer_id: m.gate.load.clone() for m in model.modules() if isinstance(m, MoE)}
    return out.loss.detach(), grads, loads


@pytest.mark.parametrize("preset", ["debug_dense", "debug_dense_gqa", "debug_v3", "debug_v2"])
def test_every_mode_gives_the_loss_and_gradients_of_none(preset):
    cfg = config_from_dict({"model": {"preset": preset, "n_layers": 3}})
    ids = torch.randint(0, cfg.model.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    # packed rows on the model with MTP: two examples per row (masks reach every region)
    segments = (torch.arange(24) >= 10).long().expand(2, -1) if preset == "debug_v3" else None
    ctx = ParallelContext.single()
    ref_loss, ref_grads, ref_loads = _step(build_model(cfg.model, ctx, 3), ids, segments)
    assert len(ref_grads) == len(list(build_model(cfg.model, ctx, 3).parameters()))
    modes = [("selective", ALL), ("full", []), ("full_1", [])] + [("selective", [m]) for m in ALL]
    for mode, modules in modes:
        model = build_model(cfg.model, ctx, 3)
        apply_recompute(model, mode.split("_")[0], modules, recompute_layers=1 if mode == "full_1" else 0)
        loss, grads, loads = _step(model, ids, segments)
        what = f"{preset} {mode} {modules}"
        torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0, msg=lambda m: f"{what} loss: {m}")
        assert grads.keys() == ref_grads.keys(), what
        for name, grad in grads.items():
            torch.testing.assert_close(grad, ref_grads[name], rtol=1e-6, atol=1e-6 * ref_grads[name].abs().max().item(),
                                       msg=lambda m: f"{what} grad {name}: {m}")
        assert loads.keys() == ref_loads.keys() and all(torch.equal(loads[k], ref_loads[k]) for k in loads), what


def test_recomputed_fp8_gemms_give_the_same_numbers():
    """Emulated blockwise FP8 (fp8/apply.py) inside the regions: the recomputation quantises
    the same inputs again, so selective and full give none's loss and gradients."""
    from ds_parallel.fp8.apply import apply_fp8

    cfg = load_config(None, ["model.preset=debug_v3_fp8", "precision.fp8.enabled=true"])
    ids = torch.randint(0, cfg.model.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    runs = {}
    for mode in ("none", "selective", "full"):
        model = build_model(cfg.model, ParallelContext.single(), 3)
        assert apply_fp8(model, cfg.precision)
        runs[mode] = _step(apply_recompute(model, mode), ids)
    for mode in ("selective", "full"):
        assert torch.equal(runs[mode][0], runs["none"][0]), mode
        for name, grad in runs["none"][1].items():
            torch.testing.assert_close(runs[mode][1][name], grad, rtol=1e-6, atol=1e-6 * grad.abs().max().item())


def _grads_with_backward_on_another_thread(model, ids):
    """Forward inside kernels.batch_invariant(), backward on a fresh thread (where the context
    variable has its default, as in CUDA's backward threads)."""
    with batch_invariant():
        loss = model(ids, labels=ids).loss
    errors = []

    def backward():
        try:
            loss.backward()
        except Exception as exc:  # surfaced below
            errors.append(exc)

    thread = threading.Thread(target=backward)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_recomputation_runs_in_the_kernel_mode_of_the_forward():
    cfg = config_from_dict({"model": {"preset": "debug_v3"}})
    ids = torch.randint(0, cfg.model.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    ctx = ParallelContext.single()
    ref = _grads_with_backward_on_another_thread(build_model(cfg.model, ctx, 3), ids)
    for mode in ("selective", "full"):
        grads = _grads_with_backward_on_another_thread(apply_recompute(build_model(cfg.model, ctx, 3), mode), ids)
        assert all(torch.equal(grads[n], g) for n, g in ref.items()), mode
    # a plain checkpoint recomputes with the default kernels there, which save other tensors
    model = apply_recompute(build_model(cfg.model, ctx, 3), "full")
    for m in model.modules():
        if isinstance(m, (Block, MoE)) and (m.region if isinstance(m, Block) else m.experts_region) is not None:
            plain = lambda fn, *args: checkpoint(fn, *args, use_reentrant=False)  # noqa: E731
            if isinstance(m, Block):
                m.region = plain
            else:
                m.experts_region = plain
    with pytest.raises(CheckpointError, match="different metadata"):
        _grads_with_backward_on_another_thread(model, ids)


def test_routing_inside_a_recomputed_region_would_count_loads_twice():
    """Why routing stays outside the regions (moe/layer.py): re-running the router in backward
    adds every token's experts to the loads a second time (and could pick other experts)."""
    cfg = config_from_dict({"model": {"preset": "debug_v3"}})
    moe = build_model(cfg.model, ParallelContext.single(), 3).layers["1"].ffn
    x = torch.randn(2, 8, cfg.model.dim, requires_grad=True)
    out, aux = checkpoint(moe, x, use_reentrant=False)
    once = moe.gate.load.clone()
    (out.sum() + aux).backward()
    assert torch.equal(moe.gate.load, 2 * once) and once.sum() == 2 * 8 * 2
    moe.gate.reset_load()
    moe.experts_region = recompute_region  # what full recompute injects: the experts alone recompute
    out, aux = moe(x)
    (out.sum() + aux).backward()
    assert torch.equal(moe.gate.load, once)


def test_eval_and_decode_paths_run_without_checkpoints():
    cfg = config_from_dict({"model": {"preset": "debug_v3"}})
    ids = torch.randint(0, 128, (2, 16))
    plain = build_model(cfg.model, ParallelContext.single(), 3).eval()
    full = apply_recompute(build_model(cfg.model, ParallelContext.single(), 3).eval(), "full")
    with torch.no_grad():
        torch.testing.assert_close(full(ids).logits, plain(ids).logits, rtol=0, atol=0)


def test_full_recompute_picks_the_first_blocks_of_each_stage():
    assert stage_blocks([[0, 1, 2], [3, 4]], 5, 1) == [[0, 1, 2], [3, 4, 5]]
    assert full_recompute_blocks([[0, 1, 2], [3, 4, 5]], 0) == [0, 1, 2, 3, 4, 5]
    assert full_recompute_blocks([[0, 1, 2], [3, 4, 5]], 2) == [0, 1, 3, 4]
    cfg = config_from_dict({"model": {"preset": "debug_v3", "n_layers": 4}})
    # DualPipeV rank 0 of pp=2: stages 0 (layers 0) and 3 (layer 3, head, MTP block 4)
    ctx = ParallelContext.single()
    model = apply_recompute(build_model(cfg.model, ctx, 1), "full", recompute_layers=1, stage_layers=[[0, 1], [2, 3]])
    blocks = {m.layer_id: m.region is not None for m in model.modules() if isinstance(m, Block)}
    assert blocks == {0: True, 1: False, 2: True, 3: False, 4: False}
    assert model.layers["2"].ffn.experts_region is not None and model.layers["3"].ffn.experts_region is None
    model = apply_recompute(model, "selective", ["swiglu"])  # a second call replaces the first
    assert all(m.region is None for m in model.modules() if isinstance(m, Block))
    assert model.layers["2"].ffn.experts.swiglu_region is not None and model.norm.region is None


def _saved_bytes(cfg, tp=1, dtype=torch.float32, mode="none", modules=(), n_layers=None):
    """Saved-activation bytes of one forward (tp rank 0's shapes, its groups None)."""
    model_cfg = cfg.model if n_layers is None else config_from_dict(
        {"model": {"preset": cfg.model.preset, "n_layers": n_layers, "mtp_depth": 0}}).model
    model = build_model(model_cfg, ParallelContext(topo=Topology(tp, tp=tp), rank=0), 1).to(dtype)
    apply_recompute(model, mode, modules)
    t = cfg.train
    ids = torch.randint(0, model_cfg.vocab_size, (t.micro_batch_size, t.seq_len),
                        generator=torch.Generator().manual_seed(0))
    return saved_activation_bytes(model, lambda: model(ids, labels=ids))


def _cfg(preset, tp=1, dtype="fp32", **train):
    return config_from_dict({"model": {"preset": preset}, "parallel": {"tp": tp}, "precision": {"dtype": dtype},
                             "train": dict(global_batch_size=4, micro_batch_size=4, seq_len=32, **train)})


@pytest.mark.parametrize("preset, tp, dtype", [("debug_dense", 1, "fp32"), ("debug_v3", 1, "fp32"),
                                               ("debug_v3", 2, "fp32"), ("debug_v2", 1, "fp32"),
                                               ("debug_v3", 1, "bf16")])
def test_selective_recompute_saves_what_the_planner_predicts(preset, tp, dtype):
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    base = _cfg(preset, tp, dtype)
    measured_none = _saved_bytes(base, tp, torch_dtype)
    planned_none = plan(base, tp)["stages"][0].activation_bytes
    for modules in [[m] for m in ALL] + [ALL]:
        cfg = _cfg(preset, tp, dtype, recompute="selective", recompute_modules=modules)
        saved = measured_none - _saved_bytes(cfg, tp, torch_dtype, "selective", modules)
        predicted = planned_none - plan(cfg, tp)["stages"][0].activation_bytes
        if modules == ["mla_up_proj"] and cfg.model.attention != "mla":
            assert saved == predicted == 0
            continue
        assert saved > 0 and predicted == pytest.approx(saved, rel=0.1), (modules, saved, predicted)
    # V3's whole set on the tiny V3 removes about a fifth of the saved bytes (fp32, tp=1)
    if (preset, tp, dtype) == ("debug_v3", 1, "fp32"):
        assert 0.15 < saved / measured_none < 0.3


def test_a_fully_recomputed_block_keeps_what_the_planner_says():
    """The bytes one more dense / MoE block adds under full recompute (differences of models
    with 2 and 3 layers, so the embedding and head cancel) against full_bytes_per_token."""
    cfg = _cfg("debug_v3", recompute="full")
    tokens = cfg.train.micro_batch_size * cfg.train.seq_len
    two, three = (_saved_bytes(cfg, mode="full", n_layers=n) for n in (2, 3))
    moe_block = (three - two) / tokens
    assert moe_block == pytest.approx(full_bytes_per_token(cfg.model, 2, 1, 4), rel=0.1)
    dense = _cfg("debug_dense", recompute="full")
    two, three = (_saved_bytes(dense, mode="full", n_layers=n) for n in (2, 3))
    assert (three - two) / tokens == full_bytes_per_token(dense.model, 2, 1, 4)  # its input, exactly
    # and the whole mode removes what the planner predicts of the blocks (its head term is the
    # same in every mode: it cancels), to 15%
    none, full = _saved_bytes(_cfg("debug_v3")), _saved_bytes(cfg, mode="full")
    predicted = plan(_cfg("debug_v3"), 1)["stages"][0].activation_bytes - plan(cfg, 1)["stages"][0].activation_bytes
    assert predicted == pytest.approx(none - full, rel=0.15)


def test_selective_saving_formula_by_hand():
    """debug_v3's MoE layer, fp32, all three modules: norms (attn, ffn, q, kv: their fp32
    normalised x and rsqrt), the normed latents, two SwiGLU hiddens per routed pair (silu(w1 x)
    and its product with w3 x, which the gate multiplies) and one of the shared expert."""
    m = config_from_dict({"model": {"preset": "debug_v3"}}).model
    norms = (128 + 128 + 64 + 32) * 4 + 4 * 4
    assert selective_saving_per_token(m, 1, 1, 4, ALL) == norms + (64 + 32) * 4 + (2 * 2 + 1) * 64 * 4


@pytest.mark.parametrize("overrides, message", [
    (["train.recompute_modules=[norm,attention]"], "train.recompute_modules has unknown ['attention']: use any of"),
    (["train.recompute=selective", "train.recompute_modules=[]"], "empty train.recompute_modules recomputes nothing"),
    (["train.recompute=full", "train.recompute_layers=-1"], "train.recompute_layers=-1 must be >= 0"),
    (["train.recompute=selective", "train.recompute_layers=2"], "applies to train.recompute=full only"),
])
def test_validation_names_the_field_and_the_fix(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, ["model.preset=debug_v3"] + overrides)
    for mode in ("none", "selective", "full"):
        load_config(None, ["model.preset=debug_v3", f"train.recompute={mode}", "train.recompute_layers=0"])


def test_plan_cli_reports_every_mode_for_v3():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "launchers", "plan.py"), "--config",
                          os.path.join(ROOT, "configs", "v3_671b.yaml"), "--world", "2048"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    lines = {line.split()[1]: line for line in out.stdout.splitlines() if line.startswith("recompute ")}
    assert set(lines) == {"none", "selective", "full"}, out.stdout
    gib = {mode: float(line.split("activations")[1].split()[0]) for mode, line in lines.items()}
    assert gib["none"] > gib["selective"] > gib["full"] > 0, gib
