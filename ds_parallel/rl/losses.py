"""GRPO and its variants as pure torch functions: advantages, KL estimators, the clipped
policy loss, DAPO's dynamic-sampling filter and overlong punishment. No model and no process
group: a post-training objective (the train/objective.py protocol) calls these on the
log-probabilities it computes.

Papers: DeepSeekMath (GRPO, arXiv 2402.03300, eq. 3-4), DAPO (arXiv 2503.14476), Dr. GRPO
(arXiv 2503.20783), GSPO (arXiv 2507.18071).

Shapes. B completions padded to T positions; `mask` (B, T) is 1 on completion tokens. `logp`,
`old_logp`, `ref_logp` (B, T) are the log-probabilities of the sampled tokens under the
policy being trained (with grad), the policy that sampled them, and the reference policy;
`advantages` (B,) one number per completion.

Normalisers. `policy_loss` returns one micro-batch's *contribution* to the loss of the
optimizer step's whole batch: it divides by the global token count and the global sequence
count that the caller passes in (reduced once over every micro-batch and data-parallel rank
before the backward), never by local counts. Summing the contributions over any split of the
batch into micro-batches and ranks therefore gives the whole batch's loss and gradient.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

Count = Union[int, float, torch.Tensor]

KL_ESTIMATORS = ("k1", "k2", "k3")
LEVELS = ("token", "sequence")
AGGREGATIONS = ("seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm")


# ---------------------------------------------------------------------------- advantages


def _groups(rewards: torch.Tensor, group_ids: Optional[torch.Tensor], name: str
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(flat values (N,) as floats, each value's group in 0..n-1 (N,), group sizes (n,)) for
    rewards (P, G) (row p is group p) or flat rewards (N,) with group_ids (N,) (any labels)."""
    if group_ids is None:
        if rewards.dim() != 2:
            raise ValueError(f"{name}: rewards of shape {tuple(rewards.shape)}: pass (P, G), or flat (N,) "
                             "with group_ids")
        p, g = rewards.shape
        index = torch.arange(p, device=rewards.device).repeat_interleave(g)
    else:
        if rewards.dim() != 1 or group_ids.shape != rewards.shape:
            raise ValueError(f"{name}: group_ids {tuple(group_ids.shape)} must match flat rewards (N,), got "
                             f"{tuple(rewards.shape)}")
        index = torch.unique(group_ids, return_inverse=True)[1]
    values = rewards.reshape(-1)
    if not values.is_floating_point():
        values = values.to(torch.get_default_dtype())
    return values, index, torch.bincount(index)


def _group_sum(values: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    return values.new_zeros(n).index_add_(0, index, values)


def _centred(rewards: torch.Tensor, group_ids: Optional[torch.Tensor], name: str):
    values, index, counts = _groups(rewards, group_ids, name)
    mean = _group_sum(values, index, len(counts)) / counts
    return values - mean[index], index, counts


def grpo_advantages(rewards: torch.Tensor, group_ids: Optional[torch.Tensor] = None, eps: float = 1e-6
                    ) -> torch.Tensor:
    """DeepSeekMath §4.1.2 (outcome supervision): A_i = (r_i - mean(r)) / (std(r) + eps) over
    the G completions of one prompt, the same A_i for every token of completion i.

    std is the sample std (Bessel-corrected, divisor G - 1). The paper writes std(r) without
    saying which; the sample estimate is torch.std's default and what the public GRPO
    implementations compute, so advantages match theirs (for G = 2 and rewards {0, 1} it
    gives +-1/sqrt(2), where the population std would give +-1). A group of one completion
    has no sample std and is refused. Shape and layout of `rewards` are kept: (P, G), or
    flat (N,) with `group_ids` (N,) naming each completion's prompt."""
    centred, index, counts = _centred(rewards, group_ids, "grpo_advantages")
    if bool((counts < 2).any()):
        raise ValueError("grpo_advantages: a group has one completion, which has no sample std; sample G >= 2 "
                         "completions per prompt (or use dr_grpo_advantages)")
    std = (_group_sum(centred.square(), index, len(counts)) / (counts - 1)).sqrt()
    return (centred / (std[index] + eps)).reshape(rewards.shape)


def dr_grpo_advantages(rewards: torch.Tensor, group_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Dr. GRPO (arXiv 2503.20783, §3.1): A_i = r_i - mean(r) over the group, without GRPO's
    division by std(r), which weights low-variance (too easy, too hard) prompts up. Same
    shapes as grpo_advantages."""
    centred, _, _ = _centred(rewards, group_ids, "dr_grpo_advantages")
    return centred.reshape(rewards.shape)


ADVANTAGES = {"grpo": grpo_advantages, "dr_grpo": dr_grpo_advantages}


def dynamic_sampling_mask(correct: torch.Tensor, group_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """DAPO's dynamic sampling (arXiv 2503.14476, eq. 11 constraint, §3.2): keep the groups
    with 0 < #correct < G. A group whose completions are all right or all wrong has zero
    advantage everywhere and gives no gradient.

    correct: bool, (P, G) -> (P,) bool, one verdict per group; or flat (N,) with group_ids
    (N,) -> (N,) bool, each completion carrying its group's verdict."""
    if correct.dtype != torch.bool:
        raise ValueError(f"dynamic_sampling_mask: correct has dtype {correct.dtype}; pass a bool tensor "
                         "(e.g. rewards > threshold)")
    values, index, counts = _groups(correct, group_ids, "dynamic_sampling_mask")
    n_correct = _group_sum(values, index, len(counts))
    keep = (n_correct > 0) & (n_correct < counts)
    return keep if group_ids is None else keep[index]


def overlong_penalty(lengths: torch.Tensor, max_len: int, cache_len: int) -> torch.Tensor:
    """DAPO's soft overlong punishment (arXiv 2503.14476, eq. 13), a reward added to the
    task reward, from each completion's length L (L_max = max_len, L_cache = cache_len):

        0                               L <= L_max - L_cache
        (L_max - L_cache - L) / L_cache  L_max - L_cache < L <= L_max
        -1                              L > L_max

    lengths: (...) integers -> (...) floats of the default dtype."""
    if not 0 < cache_len <= max_len:
        raise ValueError(f"overlong_penalty: cache_len={cache_len} must be in (0, max_len={max_len}]")
    start = max_len - cache_len
    return ((start - lengths.to(torch.get_default_dtype())) / cache_len).clamp(min=-1.0, max=0.0)


# ---------------------------------------------------------------------------- KL


def _kl_from_log_ratio(x: torch.Tensor, estimator: str) -> torch.Tensor:
    """x = log ref - log pi per token; the estimator of KL(pi || ref) (Schulman, "Approximating
    KL divergence", 2020): k1 = -x, k2 = x^2 / 2, k3 = exp(x) - x - 1 (unbiased and >= 0)."""
    if estimator == "k1":
        return -x
    if estimator == "k2":
        return 0.5 * x.square()
    if estimator == "k3":
        return torch.exp(x) - x - 1.0
    raise ValueError(f"kl_estimator={estimator!r}: expected one of {', '.join(KL_ESTIMATORS)}")


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(pi_theta || pi_ref) from the sampled tokens' log-probs, same
    shape as logp: k1 = logp - ref_logp, k2 = (logp - ref_logp)^2 / 2,
    k3 = exp(ref_logp - logp) - (ref_logp - logp) - 1 (DeepSeekMath eq. 4 uses k3)."""
    return _kl_from_log_ratio(ref_logp - logp, estimator)


# ---------------------------------------------------------------------------- loss


@dataclass(frozen=True)
class LossConfig:
    """The clipped policy-gradient loss family (`policy_loss`); `preset` names the papers'.

    clip_low, clip_high: the ratio is clipped to [1 - clip_low, 1 + clip_high] (DAPO's
        clip-higher when clip_high > clip_low).
    dual_clip: None, or c > 1: for A < 0 the per-token loss is also capped at -c * A (dual
        clip, Ye et al. 2020), so a huge ratio on a bad token cannot blow the loss up.
    kl_coef, kl_estimator: beta * KL(pi || ref) added per token (DeepSeekMath eq. 3 with the
        k3 estimator of eq. 4); 0 leaves the KL out of the loss (it is still reported when
        ref_logp is given).
    level: "token" (per-token ratios) or "sequence" (GSPO: one ratio per completion,
        exp(mean_t(log pi - log old)), clipped as a whole).
    aggregation: how per-token losses l_{i,t} become one number (n_seqs, n_tokens: the
        optimizer step's global counts; |o_i|: completion i's token count):
        "seq_mean_token_mean"     1/n_seqs * sum_i 1/|o_i| sum_t l_{i,t}   (DeepSeekMath eq. 3)
        "token_mean"              1/n_tokens * sum_{i,t} l_{i,t}            (DAPO eq. 12)
        "seq_mean_token_sum_norm" 1/(n_seqs * max_len) * sum_{i,t} l_{i,t}  (Dr. GRPO)
    max_len: the constant of "seq_mean_token_sum_norm" (the generation's max new tokens);
        set only with it.
    entropy_coef: -entropy_coef * H_{i,t} added per token (an entropy bonus).
    advantages: which estimator the loop computes the advantages with ("grpo" or
        "dr_grpo", keys of ADVANTAGES); policy_loss takes advantages as given.
    """
    clip_low: float
    clip_high: float
    aggregation: str
    dual_clip: Optional[float] = None
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    level: str = "token"
    max_len: Optional[int] = None
    entropy_coef: float = 0.0
    advantages: str = "grpo"

    def __post_init__(self):
        _require(0 < self.clip_low < 1, "clip_low", self.clip_low, "must be in (0, 1)")
        _require(self.clip_high > 0, "clip_high", self.clip_high, "must be > 0")
        _require(self.dual_clip is None or self.dual_clip > 1, "dual_clip", self.dual_clip,
                 "must be None or a constant c > 1")
        _require(self.kl_coef >= 0, "kl_coef", self.kl_coef, "must be >= 0")
        _require(self.kl_estimator in KL_ESTIMATORS, "kl_estimator", self.kl_estimator,
                 f"expected one of {', '.join(KL_ESTIMATORS)}")
        _require(self.level in LEVELS, "level", self.level, f"expected one of {', '.join(LEVELS)}")
        _require(self.aggregation in AGGREGATIONS, "aggregation", self.aggregation,
                 f"expected one of {', '.join(AGGREGATIONS)}")
        if self.aggregation == "seq_mean_token_sum_norm":
            _require(isinstance(self.max_len, int) and self.max_len > 0, "max_len", self.max_len,
                     "aggregation=seq_mean_token_sum_norm needs a positive int (the generation's max new tokens)")
        else:
            _require(self.max_len is None, "max_len", self.max_len,
                     f"used only by aggregation=seq_mean_token_sum_norm; leave it None with {self.aggregation}")
        _require(self.entropy_coef >= 0, "entropy_coef", self.entropy_coef, "must be >= 0")
        _require(self.advantages in ADVANTAGES, "advantages", self.advantages,
                 f"expected one of {', '.join(ADVANTAGES)}")


def _require(ok: bool, field: str, value, need: str) -> None:
    if not ok:
        raise ValueError(f"LossConfig.{field}={value!r}: {need}")


# The papers' settings, as LossConfig fields; `preset` builds them with overrides.
PRESETS: dict[str, dict] = {
    # DeepSeekMath eq. 3: PPO clip 0.2, beta * k3 KL per token, per-completion token mean,
    # then the mean over completions; beta = 0.001 as in DeepSeek-R1.
    "grpo": dict(clip_low=0.2, clip_high=0.2, kl_coef=0.001, kl_estimator="k3", aggregation="seq_mean_token_mean"),
    # Dr. GRPO: advantages without std, token sums over a constant max length (no 1/|o_i|),
    # no KL penalty. max_len must be given: preset("dr_grpo", max_len=...).
    "dr_grpo": dict(clip_low=0.2, clip_high=0.2, aggregation="seq_mean_token_sum_norm", advantages="dr_grpo"),
    # DAPO: clip-higher (0.2, 0.28), token mean over the whole batch (eq. 12), no KL.
    "dapo": dict(clip_low=0.2, clip_high=0.28, aggregation="token_mean"),
    # GSPO eq. 5-7: sequence-level ratio clipped to [1 - 3e-4, 1 + 4e-4] (§5.1), mean over
    # completions, no KL.
    "gspo": dict(clip_low=3e-4, clip_high=4e-4, level="sequence", aggregation="seq_mean_token_mean"),
}


def preset(name: str, **overrides) -> LossConfig:
    """The named paper's LossConfig (PRESETS), fields overridden by keyword."""
    if name not in PRESETS:
        raise ValueError(f"preset {name!r}: expected one of {', '.join(PRESETS)}")
    return LossConfig(**{**PRESETS[name], **overrides})


def policy_loss(cfg: LossConfig, logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, *, n_tokens: Count, n_seqs: Count, ref_logp: Optional[torch.Tensor] = None,
                entropy: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """This micro-batch's contribution to the step's clipped policy-gradient loss (to be
    summed over micro-batches and ranks), and its metrics.

    Per token, with ratio r_{i,t} = exp(log pi - log old) (level "token") or
    s_i = exp(mean_t(log pi - log old)) for every token of completion i (level "sequence",
    GSPO eq. 7) and A = advantages[i]:

        l_{i,t} = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high))   (DeepSeekMath eq. 3)
                  [capped at -dual_clip * A where A < 0]
                  + kl_coef * KL_{i,t} - entropy_coef * H_{i,t}

    aggregated as cfg.aggregation says (LossConfig), over the mask's tokens only.

    logp, old_logp, mask, ref_logp, entropy: (B, T); advantages: (B,). n_tokens: the number
    of completion tokens (mask ones) and n_seqs the number of completions in the optimizer
    step's whole batch, over all micro-batches and data-parallel ranks (ints or 0-dim
    tensors). Values at padded positions are never used, whatever they hold. Computed in
    fp32 (fp64 inputs stay fp64). Metrics (detached 0-dim tensors) are contributions to
    global token means, summed like the loss: "clip_frac" (tokens whose gradient a clip
    cuts), "ratio", and "kl" with ref_logp, "entropy" with entropy.
    """
    _check_inputs(cfg, logp, old_logp, advantages, mask, ref_logp, entropy, n_tokens, n_seqs)
    m = mask.bool()
    dtype = torch.promote_types(logp.dtype, torch.float32)  # bf16 -> fp32; fp64 stays
    logp = logp.to(dtype)
    log_ratio = (logp - old_logp.to(dtype)).masked_fill(~m, 0.0)
    lengths = m.sum(-1).to(logp.dtype)
    if cfg.level == "sequence":
        log_ratio = (log_ratio.sum(-1) / lengths.clamp(min=1))[:, None].expand_as(logp)
    ratio = torch.exp(log_ratio)
    adv = advantages.to(dtype)[:, None]
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1 - cfg.clip_low, 1 + cfg.clip_high)
    cut = clipped > unclipped
    per_token = torch.where(cut, clipped, unclipped)
    if cfg.dual_clip is not None:
        cap = -adv * cfg.dual_clip
        dual = (adv < 0) & (per_token > cap)
        per_token = torch.where(dual, cap, per_token)
        cut = cut | dual
    metrics = {"clip_frac": cut, "ratio": ratio}
    if ref_logp is not None:
        kl = _kl_from_log_ratio((ref_logp.to(dtype) - logp).masked_fill(~m, 0.0), cfg.kl_estimator)
        metrics["kl"] = kl
        if cfg.kl_coef > 0:
            per_token = per_token + cfg.kl_coef * kl
    if entropy is not None:
        entropy = entropy.to(dtype).masked_fill(~m, 0.0)
        metrics["entropy"] = entropy
        if cfg.entropy_coef > 0:
            per_token = per_token - cfg.entropy_coef * entropy
    loss = _aggregate(per_token, m, lengths, cfg, n_tokens, n_seqs)
    with torch.no_grad():
        metrics = {k: torch.where(m, v.to(dtype), 0.0).sum() / n_tokens for k, v in metrics.items()}
    return loss, metrics


def _aggregate(per_token: torch.Tensor, m: torch.Tensor, lengths: torch.Tensor, cfg: LossConfig,
               n_tokens: Count, n_seqs: Count) -> torch.Tensor:
    """cfg.aggregation of (B, T) per-token losses over the mask, with the global normalisers."""
    sums = torch.where(m, per_token, 0.0).sum(-1)  # (B,)
    if cfg.aggregation == "token_mean":
        return sums.sum() / n_tokens
    if cfg.aggregation == "seq_mean_token_mean":
        return (sums / lengths.clamp(min=1)).sum() / n_seqs
    return sums.sum() / (n_seqs * cfg.max_len)


def _check_inputs(cfg, logp, old_logp, advantages, mask, ref_logp, entropy, n_tokens, n_seqs) -> None:
    if logp.dim() != 2:
        raise ValueError(f"policy_loss: logp of shape {tuple(logp.shape)}: pass (B, T) per-token log-probs")
    for name, t in (("old_logp", old_logp), ("mask", mask), ("ref_logp", ref_logp), ("entropy", entropy)):
        if t is not None and t.shape != logp.shape:
            raise ValueError(f"policy_loss: {name} of shape {tuple(t.shape)} must match logp {tuple(logp.shape)}")
    if advantages.shape != logp.shape[:1]:
        raise ValueError(f"policy_loss: advantages of shape {tuple(advantages.shape)}: pass one per completion, "
                         f"({logp.shape[0]},)")
    if cfg.kl_coef > 0 and ref_logp is None:
        raise ValueError(f"policy_loss: ref_logp is None with kl_coef={cfg.kl_coef}; pass the reference log-probs "
                         "or set kl_coef=0")
    if cfg.entropy_coef > 0 and entropy is None:
        raise ValueError(f"policy_loss: entropy is None with entropy_coef={cfg.entropy_coef}; pass per-token "
                         "entropies or set entropy_coef=0")
    for name, n in (("n_tokens", n_tokens), ("n_seqs", n_seqs)):
        if not isinstance(n, torch.Tensor) and not n > 0:
            raise ValueError(f"policy_loss: {name}={n}: pass the optimizer step's global count (> 0)")
