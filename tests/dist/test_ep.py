"""Expert parallelism changes no number (docs/architecture.md, invariant 2): an ep=2 MoE over
2 gloo processes, each with its own tokens, equals one process running the concatenated batch:
outputs, balance loss, gradients of every parameter and the bias update, to 1e-5."""
import pytest
import torch
import torch.distributed as dist

from tests.harness import run_dist

pytestmark = pytest.mark.dist

TOL = dict(rtol=1e-5, atol=1e-6)


def _configs():
    from ds_parallel.config.schema import ModelConfig

    base = dict(dim=16, n_routed_experts=8, n_shared_experts=1, n_activated_experts=3, moe_inter_dim=8, init_std=0.2)
    v3 = ModelConfig(**base, score_func="sigmoid", n_expert_groups=4, n_limited_groups=2, route_scale=2.5,
                     norm_topk_prob=True, bias_update_speed=1e-3, seq_aux_alpha=0.1)
    v2 = ModelConfig(**base, score_func="softmax", n_expert_groups=2, n_limited_groups=2, route_scale=4.0,
                     expert_aux_alpha=0.1, device_aux_alpha=0.2, comm_aux_alpha=0.3, z_loss_coeff=0.01,
                     capacity_factor=1.0)
    return {"v3": v3, "v2_capacity": v2}


def _check_ep(rank, world):
    import warnings

    warnings.filterwarnings("ignore")
    from ds_parallel.moe import MoE, update_moe_biases
    from ds_parallel.parallel.groups import ParallelContext, build_parallel_context
    from ds_parallel.parallel.shard import gather_full, local_slice
    from ds_parallel.parallel.topology import Topology

    ctx = build_parallel_context(Topology(world, ep=2))
    single = ParallelContext.single()
    assert ctx.ep == 2 and ctx.ep_rank == rank
    for name, cfg in _configs().items():
        torch.manual_seed(0)  # same reference (full weights, tokens) on every rank
        ref = MoE(0, cfg, single, n_devices=2)
        with torch.no_grad():
            # Uneven routing: expert 1 is chosen by every token, expert 6 by none.
            ref.gate.e_score_correction_bias[1] = 2.0
            ref.gate.e_score_correction_bias[6] = -10.0
        moe = MoE(0, cfg, ctx)
        full = dict(ref.named_parameters()) | dict(ref.named_buffers())
        with torch.no_grad():
            for pname, t in list(moe.named_parameters()) + list(moe.named_buffers()):
                if pname != "gate.load":
                    t.copy_(local_slice(full[pname], getattr(t, "shards", ())))
        bsz, seqlen = 2, 6
        x_all = torch.randn(world * bsz, seqlen, cfg.dim)
        cot_all = torch.randn(world * bsz, seqlen, cfg.dim)
        mine = slice(rank * bsz, (rank + 1) * bsz)

        x_ref = x_all.clone().requires_grad_()
        y_ref, aux_ref = ref(x_ref)
        loss_ref = (y_ref * cot_all).sum() + aux_ref
        loss_ref.backward()

        x = x_all[mine].clone().requires_grad_()
        y, aux = moe(x)
        # Rank losses sum to the reference loss: the aux loss is a mean over sequences.
        loss = (y * cot_all[mine]).sum() + aux / world
        loss.backward()

        torch.testing.assert_close(y, y_ref[mine], **TOL, msg=lambda m: f"{name} output: {m}")
        torch.testing.assert_close(x.grad, x_ref.grad[mine], **TOL, msg=lambda m: f"{name} input grad: {m}")
        assert aux_ref > 0
        total = loss.detach().clone()
        dist.all_reduce(total)
        torch.testing.assert_close(total, loss_ref.detach(), **TOL)
        aux_mean = aux.detach().clone()
        dist.all_reduce(aux_mean)
        torch.testing.assert_close(aux_mean / world, aux_ref.detach(), **TOL)

        ref_params = dict(ref.named_parameters())
        for pname, p in moe.named_parameters():
            shards = getattr(p, "shards", ())
            if shards:  # experts: this rank holds a block; its grad already sums every rank's tokens
                grad = gather_full(p.grad, shards, ctx)
            else:  # replicated (router, shared experts): data-parallel sum
                grad = p.grad.clone()
                dist.all_reduce(grad)
            torch.testing.assert_close(grad, ref_params[pname].grad, **TOL, msg=lambda m: f"{name} {pname}: {m}")
        expert_grad = gather_full(moe.experts.w1.grad, moe.experts.w1.shards, ctx)
        assert expert_grad[6].abs().sum() == 0 and expert_grad[1].abs().sum() > 0

        # Loads: expert 1 gets every token, expert 6 none; dedup sends fewer rows than pairs.
        bias0 = ref.gate.e_score_correction_bias.clone()
        loads = update_moe_biases(moe, ctx)[0]
        ref_loads = update_moe_biases(ref, single)[0]
        torch.testing.assert_close(loads, ref_loads, rtol=0, atol=0)
        assert loads[1] == world * bsz * seqlen and loads[6] == 0
        torch.testing.assert_close(moe.gate.e_score_correction_bias, ref.gate.e_score_correction_bias, rtol=0, atol=0)
        if cfg.bias_update_speed:
            assert not torch.equal(ref.gate.e_score_correction_bias, bias0)
        row_bytes = cfg.dim * 4 + (cfg.n_routed_experts // world) * (4 + 1)  # token, gates fp32, mask bool
        sent = moe.last_comm["dispatch_bytes"]
        assert 0 < sent < bsz * seqlen * cfg.n_activated_experts * row_bytes, (name, sent)
        assert sent % row_bytes == 0 and moe.last_comm["combine_bytes"] % (cfg.dim * 4) == 0


def test_ep2_matches_one_process():
    run_dist(_check_ep, 2)
