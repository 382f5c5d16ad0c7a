"""DeepSeekMoE in one process: routing and outputs vs transformers' DeepSeek-V2/V3 MoE,
bias update vs megatron-core, balance losses vs direct formulas, the dispatch index math
(including a simulated 2-rank all-to-all) and grouped experts vs a per-expert loop."""
import math

import pytest
import torch

from ds_parallel.config.schema import ModelConfig
from ds_parallel.moe import MoE, expert_load_imbalance, update_moe_biases
from ds_parallel.moe.experts import GroupedExperts
from ds_parallel.moe.permute import capacity_mask, plan_dispatch, scatter_weights, sort_by_expert, sum_rows, unpermute
from ds_parallel.parallel.groups import ParallelContext

SINGLE = ParallelContext.single()


def moe_cfg(**kw):
    base = dict(dim=32, n_routed_experts=8, n_shared_experts=1, n_activated_experts=3, moe_inter_dim=16, init_std=0.1)
    return ModelConfig(**{**base, **kw})


def copy_from_hf(ours, hf):
    inter = ours.experts.w1.shape[1]
    with torch.no_grad():
        ours.gate.weight.copy_(hf.gate.weight)
        if hasattr(hf.gate, "e_score_correction_bias"):
            ours.gate.e_score_correction_bias.copy_(hf.gate.e_score_correction_bias)
        ours.experts.w1.copy_(hf.experts.gate_up_proj[:, :inter])
        ours.experts.w3.copy_(hf.experts.gate_up_proj[:, inter:])
        ours.experts.w2.copy_(hf.experts.down_proj)
        for name, hf_name in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
            getattr(ours.shared_experts, name).weight.copy_(getattr(hf.shared_experts, hf_name).weight)


def randomise(module, std=0.1):
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(std=std)


def check_against_hf(ours, hf, x):
    """Outputs and gradients (input, router, experts) of our MoE equal the HF module's."""
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref = hf(x1)
    y, _ = ours(x2)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    cot = torch.randn_like(y)
    (y_ref * cot).sum().backward()
    (y * cot).sum().backward()
    inter = ours.experts.w1.shape[1]
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.gate.weight.grad, hf.gate.weight.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.experts.w1.grad, hf.experts.gate_up_proj.grad[:, :inter], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.experts.w2.grad, hf.experts.down_proj.grad, rtol=1e-5, atol=1e-6)
    assert ours.gate.weight.grad.abs().sum() > 0


def test_v3_sigmoid_group_limited_matches_transformers():
    from transformers.models.deepseek_v3.configuration_deepseek_v3 import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    torch.manual_seed(0)
    hf_cfg = DeepseekV3Config(hidden_size=32, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=3,
                              n_group=4, topk_group=2, n_shared_experts=1, norm_topk_prob=True,
                              routed_scaling_factor=2.5, num_attention_heads=4, num_key_value_heads=4)
    hf = DeepseekV3MoE(hf_cfg)
    randomise(hf)
    hf.gate.e_score_correction_bias.normal_(std=0.05)  # big enough to change selections
    ours = MoE(0, moe_cfg(score_func="sigmoid", n_expert_groups=4, n_limited_groups=2, route_scale=2.5,
                          norm_topk_prob=True), SINGLE)
    copy_from_hf(ours, hf)
    check_against_hf(ours, hf, torch.randn(3, 7, 32))


def test_v2_softmax_group_limited_matches_transformers():
    # transformers' V2 router: softmax, group max, top-k, x routed_scaling_factor, never
    # renormalised: our softmax router with norm_topk_prob=False.
    from transformers.models.deepseek_v2.configuration_deepseek_v2 import DeepseekV2Config
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe

    torch.manual_seed(1)
    hf_cfg = DeepseekV2Config(hidden_size=32, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=3,
                              n_group=4, topk_group=2, n_shared_experts=2, topk_method="group_limited_greedy",
                              routed_scaling_factor=16.0, num_attention_heads=4, num_key_value_heads=4)
    hf = DeepseekV2Moe(hf_cfg)
    randomise(hf)
    ours = MoE(0, moe_cfg(n_shared_experts=2, score_func="softmax", n_expert_groups=4, n_limited_groups=2,
                          route_scale=16.0), SINGLE)
    copy_from_hf(ours, hf)
    x = torch.randn(3, 7, 32)
    check_against_hf(ours, hf, x)
    # norm_topk_prob on softmax (V2-Lite style renormalisation): HF's weights / their sum.
    ours.gate.norm_topk_prob = True
    _, w_ref, i_ref = hf.gate(x)
    r = ours.gate(x.view(-1, 32))
    torch.testing.assert_close(r.indices.sort(-1).values, i_ref.sort(-1).values)
    torch.testing.assert_close(r.weights.sum(-1), torch.full((21,), 16.0))
    torch.testing.assert_close(r.weights.sort(-1).values, (w_ref / w_ref.sum(-1, keepdim=True) * 16.0).sort(-1).values)


def test_load_accumulation_and_bias_update_match_megatron(monkeypatch):
    from megatron.core.transformer.moe import moe_utils

    monkeypatch.setattr(moe_utils.parallel_state, "get_tensor_and_data_parallel_group", lambda **kw: None)
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda tensor, group=None: None)
    torch.manual_seed(2)
    moe = MoE(4, moe_cfg(score_func="sigmoid", bias_update_speed=1e-3), SINGLE)
    with torch.no_grad():
        moe.gate.e_score_correction_bias.normal_(std=0.01)
    bias0 = moe.gate.e_score_correction_bias.clone()
    xs = [torch.randn(2, 5, 32) for _ in range(2)]  # two micro-batches
    counts = sum(torch.bincount(moe.gate(x.view(-1, 32)).indices.flatten(), minlength=8) for x in xs)
    moe.gate.reset_load()
    for x in xs:
        moe(x)
    assert torch.equal(moe.gate.load, counts)
    loads = update_moe_biases(moe, SINGLE)
    expected = moe_utils.get_updated_expert_bias(counts.float(), bias0, 1e-3)
    torch.testing.assert_close(moe.gate.e_score_correction_bias, expected, rtol=0, atol=1e-7)
    assert torch.equal(loads[4], counts.float()) and moe.gate.load.sum() == 0
    assert expert_load_imbalance(loads) == pytest.approx((counts.max() / counts.float().mean()).item())
    # A load equal to the mean leaves its bias alone (sign(0) = 0), as in megatron-core.
    moe.gate.update_bias(torch.tensor([1, 3, 2, 2, 2, 2, 2, 2]))
    delta = moe.gate.e_score_correction_bias - expected
    torch.testing.assert_close(delta, torch.tensor([1, -1, 0, 0, 0, 0, 0, 0]) * 1e-3, rtol=0, atol=1e-7)


def direct_losses(weight, x, indices, bsz, K, D, M):
    """Balance losses written straight from the formulas, one sequence at a time."""
    E = weight.shape[0]
    logits = x @ weight.t()
    out = {}
    for name, score_fn in (("sigmoid", torch.sigmoid), ("softmax", lambda z: z.softmax(-1))):
        s = score_fn(logits).view(bsz, -1, E)
        T = s.shape[1]
        terms = {k: [] for k in ("seq", "expert", "device", "comm")}
        for b in range(bsz):
            P = (s[b] / s[b].sum(-1, keepdim=True)).mean(0)
            top = s[b].detach().topk(K, -1).indices
            chosen = indices.view(bsz, T, K)[b]
            f_seq = torch.tensor([(top == i).sum().item() for i in range(E)]) * E / (K * T)
            f = torch.tensor([(chosen == i).sum().item() for i in range(E)]) * E / (K * T)
            per = E // D
            f_dev = torch.stack([f[d * per:(d + 1) * per].mean() for d in range(D)])
            P_dev = torch.stack([P[d * per:(d + 1) * per].sum() for d in range(D)])
            sent = torch.tensor([sum(((chosen[t] // per) == d).any().item() for t in range(T)) for d in range(D)])
            terms["seq"].append((f_seq * P).sum())
            terms["expert"].append((f * P).sum())
            terms["device"].append((f_dev * P_dev).sum())
            terms["comm"].append((sent * D / (M * T) * P_dev).sum())
        out[name] = {k: torch.stack(v).mean() for k, v in terms.items()}
    out["z"] = torch.logsumexp(logits, -1).square().mean()
    return out


@pytest.mark.parametrize("score_func", ["sigmoid", "softmax"])
def test_balance_losses_match_direct_formulas(score_func):
    torch.manual_seed(3)
    alphas = dict(seq_aux_alpha=0.5, expert_aux_alpha=0.25, device_aux_alpha=0.125, comm_aux_alpha=0.0625)
    cfg = moe_cfg(score_func=score_func, n_expert_groups=4, n_limited_groups=2, z_loss_coeff=0.03, **alphas)
    router = MoE(0, cfg, SINGLE, n_devices=2).gate
    bsz, x = 3, torch.randn(15, 32)
    r = router(x)
    w = router.weight.detach().clone().requires_grad_()
    ref = direct_losses(w, x, r.indices, bsz, K=3, D=2, M=router.device_limit())
    assert router.device_limit() == 2
    names = {"seq_aux_alpha": "seq", "expert_aux_alpha": "expert", "device_aux_alpha": "device", "comm_aux_alpha": "comm"}
    total_ref = 0.03 * ref["z"]
    for key, name in names.items():
        total_ref = total_ref + alphas[key] * ref[score_func][name]
    loss = router.aux_loss(r, bsz)
    torch.testing.assert_close(loss, total_ref, rtol=1e-5, atol=1e-7)
    loss.backward()
    total_ref.backward()  # the counts f carry no gradient, only P and the z-loss do
    torch.testing.assert_close(router.weight.grad, w.grad, rtol=1e-5, atol=1e-8)


def simulate_ep(xs, indices, weights, keeps, expert_mats, ep):
    """Run the dispatch index math for `ep` ranks in one process, with the all-to-alls
    done by hand: rank r's tokens xs[r] (N_r, D), experts y = x @ expert_mats[e]."""
    E = expert_mats.shape[0]
    n_local = E // ep
    plans = [plan_dispatch(indices[r], E, ep, keeps[r]) for r in range(ep)]
    sends = [[c.split(p.send_counts.tolist()) for c in
              (xs[r][p.send_token], scatter_weights(p, weights[r]), p.local_mask)] for r, p in enumerate(plans)]
    returned = [[None] * ep for _ in range(ep)]
    for d in range(ep):  # receiver d: chunks from every sender, in sender order
        x_recv, g_recv, m_recv = (torch.cat([sends[s][i][d] for s in range(ep)]) for i in range(3))
        rows, experts, counts = sort_by_expert(m_recv)
        assert counts.sum() == m_recv.sum()
        out = torch.stack([x_recv[row] @ expert_mats[d * n_local + e] for row, e in zip(rows, experts)]) \
            if rows.numel() else x_recv.new_zeros(0, x_recv.shape[1])
        y_recv = sum_rows(out * g_recv[rows, experts].unsqueeze(-1), rows, x_recv.shape[0])
        for s, chunk in enumerate(y_recv.split([len(sends[s][0][d]) for s in range(ep)])):
            returned[s][d] = chunk
    return [unpermute(torch.cat(returned[r]), plans[r].send_token, xs[r].shape[0]) for r in range(ep)], plans


def test_dispatch_index_math_dedup_and_round_trip():
    torch.manual_seed(4)
    E, K, D, ep, N = 8, 3, 6, 2, 11
    mats = torch.randn(E, D, D)
    xs = [torch.randn(N, D) for _ in range(ep)]
    indices = [torch.rand(N, E).topk(K, -1).indices for _ in range(ep)]
    weights = [torch.rand(N, K) for _ in range(ep)]
    keeps = [torch.rand(N, K) > 0.25 for _ in range(ep)]
    keeps[0][0] = False  # a token with every pair dropped: not sent, routed output 0
    ys, plans = simulate_ep(xs, indices, weights, keeps, mats, ep)
    for r in range(ep):
        ref = torch.zeros(N, D)
        for n in range(N):
            for k in range(K):
                if keeps[r][n, k]:
                    ref[n] += weights[r][n, k] * (xs[r][n] @ mats[indices[r][n, k]])
        torch.testing.assert_close(ys[r], ref)
        # Dedup: one row per (token, destination rank) holding a kept pair, rank-major.
        plan, dest = plans[r], indices[r] // (E // ep)
        for d in range(ep):
            expected = torch.nonzero(((dest == d) & keeps[r]).any(1)).flatten()
            got = plan.send_token[plan.send_counts[:d].sum():plan.send_counts[:d + 1].sum()]
            assert torch.equal(got, expected)
        assert plan.local_mask.sum() == keeps[r].sum() < N * K
        assert plan.send_counts.sum() < keeps[r].sum()  # some tokens had 2+ experts on one rank
    # ep = 1: every token with a kept pair is sent once to itself; same outputs.
    ys1, _ = simulate_ep(xs[:1], indices[:1], weights[:1], keeps[:1], mats, 1)
    torch.testing.assert_close(ys1[0], ys[0])


def test_capacity_mask_keeps_highest_affinity_per_sequence_and_expert():
    torch.manual_seed(5)
    B, T, K, E, cap = 3, 10, 2, 4, 3
    indices = torch.rand(B, T, E).topk(K, -1).indices
    affinity = torch.rand(B, T, K)
    keep = capacity_mask(indices, affinity, E, cap)
    for b in range(B):
        for e in range(E):
            pairs = [(affinity[b, t, k].item(), t, k) for t in range(T) for k in range(K) if indices[b, t, k] == e]
            kept = {(t, k) for _, t, k in sorted(pairs, key=lambda p: -p[0])[:cap]}
            assert {(t, k) for _, t, k in pairs if keep[b, t, k]} == kept
    moe = MoE(0, moe_cfg(n_activated_experts=2, capacity_factor=0.5), SINGLE)
    assert moe.capacity(10) == math.ceil(0.5 * 10 * 2 / 8)
    dropless = MoE(0, moe_cfg(n_activated_experts=2), SINGLE)
    dropless.load_state_dict(moe.state_dict())
    x = torch.randn(2, 10, 32)
    assert not torch.allclose(moe(x)[0], dropless(x)[0])  # training: overflow pairs dropped
    moe.eval()
    torch.testing.assert_close(moe(x)[0], dropless(x)[0])  # V2 drops in training only


def test_grouped_experts_equal_per_expert_loop():
    torch.manual_seed(6)
    cfg = moe_cfg()
    experts = GroupedExperts(cfg, SINGLE)
    counts = torch.tensor([3, 0, 5, 1, 0, 4, 2, 0])  # empty experts included
    x = torch.randn(int(counts.sum()), 32)
    outs = {}
    for use_grouped_mm in (True, False):
        experts.use_grouped_mm = use_grouped_mm
        experts.zero_grad()
        xg = x.clone().requires_grad_()
        y = experts(xg, counts)
        y.sum().backward()  # an expanded gradient: the case the CPU kernel rejects raw
        outs[use_grouped_mm] = (y, xg.grad, experts.w1.grad.clone(), experts.w2.grad.clone())
    ref = []
    for e, chunk in enumerate(x.split(counts.tolist())):
        w1, w2, w3 = experts.w1[e], experts.w2[e], experts.w3[e]
        ref.append((torch.nn.functional.silu(chunk @ w1.t()) * (chunk @ w3.t())) @ w2.t())
    torch.testing.assert_close(outs[True][0], torch.cat(ref), rtol=1e-5, atol=1e-6)
    for a, b in zip(outs[True], outs[False]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_bias_buffer_state_and_deepspeed_expert_tags():
    from deepspeed.moe.utils import is_moe_param, split_params_into_different_moe_groups_for_optimizer

    moe = MoE(0, moe_cfg(), SINGLE).to(torch.bfloat16)
    assert moe.gate.e_score_correction_bias.dtype == torch.float32  # 1e-3 steps survive bf16 casts
    assert moe.gate.load.dtype == torch.int64
    keys = set(moe.state_dict())
    assert "gate.e_score_correction_bias" in keys and "gate.load" not in keys
    assert "gate.e_score_correction_bias" not in dict(moe.named_parameters())
    for name, p in moe.named_parameters():
        assert is_moe_param(p) == name.startswith("experts."), name
    assert all(p.group_name == "ep_size_1" and p.init_per_expert for p in moe.experts.parameters())
    groups = split_params_into_different_moe_groups_for_optimizer({"params": list(moe.parameters()), "name": "all"})
    assert sorted(len(g["params"]) for g in groups) == [3, 4] and any(g.get("moe") for g in groups)


def test_ep1_skips_the_dispatch_plan_with_identical_outputs_and_gradients():
    """At ep = 1 (no capacity, no FP8 dispatch) the pairs are sorted by expert straight from
    the routing (MoE._local) instead of going through the dispatch plan (MoE._dispatched,
    what ep > 1 runs). Same pairs, same order, same sums: outputs and every gradient equal
    bit for bit, for the V3 (sigmoid, groups, shared expert) and V2 (softmax) routers."""
    for cfg in (moe_cfg(score_func="sigmoid", n_expert_groups=4, n_limited_groups=2, n_shared_experts=1),
                moe_cfg(score_func="softmax")):
        moe = MoE(1, cfg, SINGLE).train()
        torch.manual_seed(0)
        for p in moe.parameters():
            p.data.normal_(0, 0.2)
        x = torch.randn(3, 5, cfg.dim)
        h = x.reshape(-1, cfg.dim)
        results = []
        for run in (lambda r: moe._dispatched(h, r, None, None), lambda r: moe._local(h, r, None)):
            moe.zero_grad(set_to_none=True)
            y = run(moe.gate(h))
            (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
            results.append((y.detach(), {n: p.grad.clone() for n, p in moe.named_parameters() if p.grad is not None}))
        (via_plan, g_plan), (local, g_local) = results
        assert moe.last_comm == {"dispatch_bytes": 0, "combine_bytes": 0}
        assert torch.equal(local, via_plan)
        assert g_plan.keys() == g_local.keys() and "gate.weight" in g_plan and "experts.w1" in g_plan
        for name in g_plan:
            assert torch.equal(g_local[name], g_plan[name]), name
        with torch.no_grad():  # and forward takes the local path in training and evaluation alike
            assert torch.equal(moe.train()(x)[0].reshape(-1, cfg.dim), via_plan + moe.shared_experts(h)
                               if moe.shared_experts is not None else via_plan)
            assert torch.equal(moe.eval()(x)[0], moe.train()(x)[0])
