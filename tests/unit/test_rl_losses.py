"""rl/losses.py against numbers computed here by hand, in plain Python floats and math, from
the papers' formulas (DeepSeekMath arXiv 2402.03300 eq. 3-4, DAPO arXiv 2503.14476, Dr. GRPO
arXiv 2503.20783, GSPO arXiv 2507.18071), never with the functions under test.

The loss batch: B=3 completions, T=4 positions, lengths 4, 2, 3 (a ragged mask). Per token,
the log-ratio delta = log pi - log old is chosen so that every clip regime occurs: above
1 + 0.28 (0.3), between 1.2 and 1.28 (0.22, clipped by GRPO, not by DAPO), below 1 - 0.2 with
A > 0 (unclipped) and with A < 0 (clipped), a ratio of 4.48 with A < 0 (the dual clip's
case), and a third row inside GSPO's [1 - 3e-4, 1 + 4e-4] at the sequence level. Padded
positions hold garbage (log-ratios of 80, which overflow exp in fp32) that must never reach
the loss or its gradient."""
import math

import pytest
import torch

from ds_parallel.rl import (LossConfig, dr_grpo_advantages, dynamic_sampling_mask, grpo_advantages, kl_estimate,
                            overlong_penalty, policy_loss, preset)

MASK = [[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]]
LENGTHS = [4, 2, 3]
OLD = [[-1.0, -2.0, -0.5, -3.0], [-0.7, -2.5, -40.0, -40.0], [-1.5, -0.2, -0.9, -40.0]]
DELTA = [[0.3, 0.22, -0.5, 0.0], [-0.4, 1.5, 80.0, 80.0], [3e-4, -6e-4, 6e-4, 80.0]]  # log pi - log old
X_REF = [[math.log(2), -0.3, 0.1, 0.0], [0.5, -1.0, -70.0, 70.0], [0.2, 0.0, -0.2, 90.0]]  # log ref - log pi
ENTROPY = [[1.0, 0.5, 2.0, 0.1], [0.3, 0.7, 99.0, 99.0], [1.2, 0.4, 0.9, 99.0]]
ADV = [0.8, -1.2, 0.5]
N_TOKENS, N_SEQS, MAX_LEN = 9, 3, 8


# ---------------------------------------------------------------- the formulas, by hand

def _k(x, estimator):
    """KL(pi || ref) estimators of x = log ref - log pi (DeepSeekMath eq. 4 is k3)."""
    return {"k1": -x, "k2": 0.5 * x * x, "k3": math.exp(x) - x - 1}[estimator]


def _ppo(r, a, lo, hi, dual):
    """(per-token loss, clipped?) = max(-A r, -A clip(r)) [min with -c A for A < 0]."""
    unclipped, clipped = -a * r, -a * min(max(r, 1 - lo), 1 + hi)
    loss, cut = max(unclipped, clipped), clipped > unclipped
    if dual is not None and a < 0 and loss > -a * dual:
        loss, cut = -a * dual, True
    return loss, cut


def _expected(cfg: LossConfig):
    """(loss, metrics) for the module's batch, with the global counts N_TOKENS, N_SEQS."""
    loss_rows, clip, ratio_sum, kl_sum, ent_sum = [], 0, 0.0, 0.0, 0.0
    for i, n in enumerate(LENGTHS):
        seq_ratio = math.exp(sum(DELTA[i][:n]) / n)
        row = []
        for t in range(n):
            r = seq_ratio if cfg.level == "sequence" else math.exp(DELTA[i][t])
            pg, cut = _ppo(r, ADV[i], cfg.clip_low, cfg.clip_high, cfg.dual_clip)
            kl = _k(X_REF[i][t], cfg.kl_estimator)
            row.append(pg + cfg.kl_coef * kl - cfg.entropy_coef * ENTROPY[i][t])
            clip, ratio_sum, kl_sum, ent_sum = clip + cut, ratio_sum + r, kl_sum + kl, ent_sum + ENTROPY[i][t]
        loss_rows.append(row)
    if cfg.aggregation == "seq_mean_token_mean":
        loss = sum(sum(row) / len(row) for row in loss_rows) / N_SEQS
    elif cfg.aggregation == "token_mean":
        loss = sum(map(sum, loss_rows)) / N_TOKENS
    else:
        loss = sum(map(sum, loss_rows)) / (N_SEQS * cfg.max_len)
    metrics = {"clip_frac": clip / N_TOKENS, "ratio": ratio_sum / N_TOKENS, "kl": kl_sum / N_TOKENS,
               "entropy": ent_sum / N_TOKENS}
    return loss, metrics


def _batch(dtype=torch.float64, rows=slice(None)):
    old = torch.tensor(OLD, dtype=dtype)[rows]
    logp = (old + torch.tensor(DELTA, dtype=dtype)[rows]).requires_grad_()
    ref = logp.detach() + torch.tensor(X_REF, dtype=dtype)[rows]
    entropy = torch.tensor(ENTROPY, dtype=dtype)[rows].requires_grad_()
    return dict(logp=logp, old_logp=old, advantages=torch.tensor(ADV, dtype=dtype)[rows],
                mask=torch.tensor(MASK)[rows], ref_logp=ref, entropy=entropy)


CONFIGS = {
    "grpo": preset("grpo"),
    "dr_grpo": preset("dr_grpo", max_len=MAX_LEN),
    "dapo": preset("dapo"),
    "gspo": preset("gspo"),
    # everything else at once: dual clip, entropy bonus, k2 in the loss, clip-higher
    "dual_entropy_k2": LossConfig(clip_low=0.2, clip_high=0.28, aggregation="token_mean", dual_clip=3.0,
                                  kl_coef=0.1, kl_estimator="k2", entropy_coef=0.01),
}


# ---------------------------------------------------------------- the loss family

def test_presets_are_the_papers_settings():
    g, d, a, s = (CONFIGS[k] for k in ("grpo", "dr_grpo", "dapo", "gspo"))
    assert (g.clip_low, g.clip_high, g.kl_coef, g.kl_estimator, g.aggregation) == (0.2, 0.2, 0.001, "k3",
                                                                                  "seq_mean_token_mean")
    assert (d.aggregation, d.max_len, d.kl_coef, d.advantages) == ("seq_mean_token_sum_norm", MAX_LEN, 0.0, "dr_grpo")
    assert (a.clip_low, a.clip_high, a.kl_coef, a.aggregation) == (0.2, 0.28, 0.0, "token_mean")
    assert (s.level, s.clip_low, s.clip_high, s.kl_coef) == ("sequence", 3e-4, 4e-4, 0.0)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_loss_and_metrics_match_the_hand_computation(name):
    cfg = CONFIGS[name]
    loss, metrics = policy_loss(cfg, **_batch(), n_tokens=N_TOKENS, n_seqs=N_SEQS)
    want, want_metrics = _expected(cfg)
    assert abs(loss.item() - want) <= 1e-12 * max(1.0, abs(want)), (loss.item(), want)
    assert set(metrics) == set(want_metrics)
    for key, value in metrics.items():
        assert not value.requires_grad
        assert abs(value.item() - want_metrics[key]) <= 1e-12, (key, value.item(), want_metrics[key])


def test_the_hand_numbers_cover_every_regime():
    """The batch is not degenerate: the presets clip different token counts, and the dual clip
    acts (literal: A = -1.2, r = e^1.5 = 4.48 > c = 3 -> the token's loss is 3 * 1.2 = 3.6)."""
    clip = {k: round(_expected(c)[1]["clip_frac"] * N_TOKENS) for k, c in CONFIGS.items()}
    # grpo: 0.3, 0.22 (A > 0, above 1.2) and -0.4 (A < 0, below 0.8); dapo lets 0.22 through;
    # gspo clips rows 0 and 1 (s = e^0.005 > 1.0004 with A > 0, e^0.55 is not cut for A < 0)
    assert clip == {"grpo": 3, "dr_grpo": 3, "dapo": 2, "gspo": 4, "dual_entropy_k2": 3}
    assert _ppo(math.exp(1.5), -1.2, 0.2, 0.28, 3.0) == (pytest.approx(3.6), True)
    assert _ppo(math.exp(1.5), -1.2, 0.2, 0.28, None)[0] == pytest.approx(1.2 * math.exp(1.5))
    losses = {k: _expected(c)[0] for k, c in CONFIGS.items()}
    assert len({round(v, 9) for v in losses.values()}) == len(losses)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_each_kl_estimator_in_the_grpo_loss(estimator):
    cfg = preset("grpo", kl_estimator=estimator, kl_coef=0.5)
    loss, metrics = policy_loss(cfg, **_batch(), n_tokens=N_TOKENS, n_seqs=N_SEQS)
    want, want_metrics = _expected(cfg)
    assert abs(loss.item() - want) <= 1e-12 and abs(metrics["kl"].item() - want_metrics["kl"]) <= 1e-12
    # the KL term moves the loss: same config without it differs by 0.5 * its aggregate
    assert abs(want - _expected(preset("grpo", kl_coef=0.0))[0]) > 1e-3


def test_kl_estimators_golden():
    """x = log ref - log pi: k1 = -x, k2 = x^2 / 2, k3 = e^x - x - 1 (literal values)."""
    ref = torch.tensor([math.log(2), -1.0, 0.0], dtype=torch.float64)
    logp = torch.zeros(3, dtype=torch.float64)
    torch.testing.assert_close(kl_estimate(logp, ref, "k1"),
                               torch.tensor([-math.log(2), 1.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(kl_estimate(logp, ref, "k2"),
                               torch.tensor([0.5 * math.log(2) ** 2, 0.5, 0.0], dtype=torch.float64))
    # k3(ln 2) = 2 - ln 2 - 1 = 0.306852..., k3(-1) = 1/e = 0.367879...
    torch.testing.assert_close(kl_estimate(logp, ref, "k3"),
                               torch.tensor([0.30685281944005469, 0.36787944117144233, 0.0], dtype=torch.float64))


def test_padding_never_reaches_the_loss_or_its_gradient():
    b = _batch(torch.float32)
    loss, metrics = policy_loss(CONFIGS["dual_entropy_k2"], **b, n_tokens=N_TOKENS, n_seqs=N_SEQS)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in metrics.values())
    pad = torch.tensor(MASK) == 0
    assert (b["logp"].grad[pad] == 0).all() and (b["entropy"].grad[pad] == 0).all()
    assert (b["logp"].grad[~pad] != 0).all()


SPLITS = [[[0], [1], [2]], [[0], [1, 2]], [[0, 1], [2]], [[2, 0], [1]]]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_sum_over_any_split_equals_the_whole_batch(name):
    """Micro-batches (or data-parallel ranks) each given the global counts: the contributions
    and their gradients add up to the whole batch's, in fp32, to 1e-6."""
    cfg = CONFIGS[name]
    whole = _batch(torch.float32)
    loss, metrics = policy_loss(cfg, **whole, n_tokens=N_TOKENS, n_seqs=N_SEQS)
    loss.backward()
    for split in SPLITS:
        parts = [_batch(torch.float32, rows=torch.tensor(rows)) for rows in split]
        outs = [policy_loss(cfg, **p, n_tokens=N_TOKENS, n_seqs=N_SEQS) for p in parts]
        total = sum(o[0] for o in outs)
        total.backward()
        assert abs(total.item() - loss.item()) <= 1e-6, (split, total.item(), loss.item())
        for key in metrics:
            assert abs(sum(o[1][key] for o in outs).item() - metrics[key].item()) <= 1e-6, (split, key)
        for field in ("logp", "entropy") if cfg.entropy_coef > 0 else ("logp",):
            grad = torch.zeros_like(whole[field])
            for rows, p in zip(split, parts):
                grad[rows] = p[field].grad
            torch.testing.assert_close(grad, whole[field].grad, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name, weight", [
    ("grpo", lambda i: 1 / (LENGTHS[i] * N_SEQS)),
    ("dapo", lambda i: 1 / N_TOKENS),
    ("dr_grpo", lambda i: 1 / (MAX_LEN * N_SEQS)),
])
def test_on_policy_gradient_is_the_weighted_policy_gradient(name, weight):
    """old = pi (first step on fresh samples), no KL: every ratio is 1, nothing clips, and the
    loss gradient is sum_{i,t} -A_i * w_i * grad log pi(o_{i,t}), with the aggregation's weight
    w_i (grpo: 1/(|o_i| n_seqs), dapo: 1/n_tokens, dr_grpo: 1/(max_len n_seqs)). The policy is
    a real parametrised softmax over 5 tokens."""
    cfg = CONFIGS[name] if name != "grpo" else preset("grpo", kl_coef=0.0)
    gen = torch.Generator().manual_seed(0)
    theta = torch.randn(3, 4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, 5, (3, 4), generator=gen)
    mask = torch.tensor(MASK)

    def logp():
        return torch.log_softmax(theta, -1).gather(-1, tokens[..., None])[..., 0]

    loss, metrics = policy_loss(cfg, logp(), logp().detach(), torch.tensor(ADV, dtype=torch.float64), mask,
                                n_tokens=N_TOKENS, n_seqs=N_SEQS)
    (got,) = torch.autograd.grad(loss, theta)
    coef = torch.tensor([[-ADV[i] * weight(i) * MASK[i][t] for t in range(4)] for i in range(3)], dtype=torch.float64)
    (want,) = torch.autograd.grad((coef * logp()).sum(), theta)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    assert metrics["clip_frac"].item() == 0 and abs(metrics["ratio"].item() - 1) <= 1e-12
    assert got.abs().max() > 1e-3


# ---------------------------------------------------------------- advantages, filters, rewards

def test_grpo_advantages_use_the_sample_std():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    # row 0: mean 1/2, sample std sqrt((4 * 1/4) / 3) = sqrt(1/3); row 1: mean 3/4, std 1/2
    s0 = 0.5 / (math.sqrt(1 / 3) + 1e-6)
    want = torch.tensor([[s0, -s0, -s0, s0], [0.25 / 0.500001, 0.25 / 0.500001, 0.25 / 0.500001, -0.75 / 0.500001]],
                        dtype=torch.float64)
    torch.testing.assert_close(grpo_advantages(rewards), want, rtol=1e-12, atol=0)
    # G = 2, rewards {1, 0}: sample std 1/sqrt(2) -> +-1/sqrt(2) (the population std would give +-1)
    got = grpo_advantages(torch.tensor([[1.0, 0.0]], dtype=torch.float64), eps=0.0)
    torch.testing.assert_close(got, torch.tensor([[0.5 ** 0.5, -0.5 ** 0.5]], dtype=torch.float64))
    # flat with group ids, in any order and with any labels: the same numbers
    flat = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0], dtype=torch.float64)
    ids = torch.tensor([7, 3, 7, 3, 7, 3, 7, 3])  # group 7: 1, 0, 0, 1; group 3: 1, 1, 1, 0
    torch.testing.assert_close(grpo_advantages(flat, ids), torch.stack([want[0], want[1]], 1).reshape(-1),
                               rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="G >= 2"):
        grpo_advantages(torch.tensor([1.0, 0.0, 1.0]), torch.tensor([0, 0, 1]))


def test_dr_grpo_advantages_have_no_std():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 0.0]])
    want = torch.tensor([[0.5, -0.5, -0.5, 0.5], [0.25, 0.25, 0.25, -0.75]])
    torch.testing.assert_close(dr_grpo_advantages(rewards), want)
    flat = torch.tensor([2.0, 1.0, 0.0, 5.0])  # group 0: 2, 0 (mean 1); group 1: 1, 5 (mean 3)
    torch.testing.assert_close(dr_grpo_advantages(flat, torch.tensor([0, 1, 0, 1])),
                               torch.tensor([1.0, -2.0, -1.0, 2.0]))
    torch.testing.assert_close(dr_grpo_advantages(torch.tensor([[3, 1]])), torch.tensor([[1.0, -1.0]]))  # int rewards


def test_dynamic_sampling_keeps_groups_with_some_but_not_all_correct():
    correct = torch.tensor([[True, True, True], [True, False, False], [False, False, False], [False, True, True]])
    assert dynamic_sampling_mask(correct).tolist() == [False, True, False, True]
    flat = torch.tensor([True, False, True, True, False, False])
    ids = torch.tensor([0, 0, 1, 1, 2, 2])
    assert dynamic_sampling_mask(flat, ids).tolist() == [True, True, False, False, False, False]
    with pytest.raises(ValueError, match="correct has dtype"):
        dynamic_sampling_mask(torch.tensor([[1.0, 0.0]]))


def test_overlong_penalty():
    """L_max = 16, L_cache = 4: 0 up to 12, then (12 - L) / 4, -1 beyond 16."""
    lengths = torch.tensor([0, 12, 13, 14, 15, 16, 17, 100])
    assert overlong_penalty(lengths, 16, 4).tolist() == [0.0, 0.0, -0.25, -0.5, -0.75, -1.0, -1.0, -1.0]
    for bad in (0, 17):
        with pytest.raises(ValueError, match=f"cache_len={bad}"):
            overlong_penalty(lengths, 16, bad)


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("field, value", [
    ("clip_low", 0.0), ("clip_low", 1.0), ("clip_high", 0.0), ("dual_clip", 1.0), ("kl_coef", -0.1),
    ("kl_estimator", "k4"), ("level", "seq"), ("aggregation", "mean"), ("max_len", 0), ("entropy_coef", -1.0),
    ("advantages", "ppo"),
])
def test_bad_config_names_the_field(field, value):
    base = "dr_grpo" if field == "max_len" else "grpo"
    with pytest.raises(ValueError, match=rf"^LossConfig\.{field}=") as err:
        preset(base, **{field: value})
    assert "\n" not in str(err.value)


def test_bad_presets_and_inputs():
    with pytest.raises(ValueError, match=r"^LossConfig\.max_len=None: aggregation=seq_mean_token_sum_norm"):
        preset("dr_grpo")
    with pytest.raises(ValueError, match=r"^LossConfig\.max_len=8: used only by"):
        preset("dapo", max_len=8)
    with pytest.raises(ValueError, match="preset 'ppo'"):
        preset("ppo")
    b = _batch()
    with pytest.raises(ValueError, match="ref_logp is None with kl_coef=0.001"):
        policy_loss(preset("grpo"), **{**b, "ref_logp": None}, n_tokens=9, n_seqs=3)
    with pytest.raises(ValueError, match="entropy is None with entropy_coef"):
        policy_loss(CONFIGS["dual_entropy_k2"], **{**b, "entropy": None}, n_tokens=9, n_seqs=3)
    with pytest.raises(ValueError, match=r"mask of shape \(3, 3\)"):
        policy_loss(preset("dapo"), **{**b, "mask": b["mask"][:, :3]}, n_tokens=9, n_seqs=3)
    with pytest.raises(ValueError, match=r"advantages of shape \(3, 1\)"):
        policy_loss(preset("dapo"), **{**b, "advantages": b["advantages"][:, None]}, n_tokens=9, n_seqs=3)
    with pytest.raises(ValueError, match="n_tokens=0"):
        policy_loss(preset("dapo"), **b, n_tokens=0, n_seqs=3)
