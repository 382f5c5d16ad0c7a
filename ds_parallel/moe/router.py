"""The DeepSeekMoE gate: affinities, group-limited top-k, balance losses, bias balancing.

Per token t (V3 §2.1.2, V2 §2.2; DeepSeek-V3 inference/model.py `Gate`):

    s_t   = softmax(W u_t)  (V2)   or   sigmoid(W u_t)  (V3)        fp32, (E,)
    sel_t = s_t + b                     b: fp32 bias, selection only
    groups: keep the n_limited_groups best of n_expert_groups (group score = sum of its
            top-2 sel for sigmoid, its max for softmax), mask the rest to -inf
    idx_t = topk(sel_t, K);  g_t = s_t[idx_t] (/ sum, if norm_topk_prob) * route_scale

Gradients reach W only through g; the indices are not differentiable. The bias b is a
persistent buffer named as in HF checkpoints (`e_score_correction_bias`); it is moved
outside the optimizer by `update_bias` once per optimizer step, from the loads that
`forward` accumulates in the non-persistent `load` buffer (V3 §2.1.2).

Balance losses are all per sequence and averaged over the sequences of the micro-batch,
so a data-parallel mean of rank-local losses equals the loss of the whole batch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ds_parallel.kernels import linear, sigmoid
from ds_parallel.moe.replay import select


@dataclass
class Routing:
    """What one forward of the gate decided, for the flat tokens of a micro-batch."""

    indices: torch.Tensor  # (N, K) int64 global expert ids
    weights: torch.Tensor  # (N, K) fp32 gate values g
    scores: torch.Tensor  # (N, E) fp32 unbiased affinities s
    logits: torch.Tensor  # (N, E) fp32 router logits


def group_limited_topk(sel: torch.Tensor, k: int, n_groups: int, n_limited: int, group_score: str) -> torch.Tensor:
    """Top-k of `sel` (N, E) among the experts of the `n_limited` best of `n_groups`
    contiguous expert groups. group_score: "top2sum" (V3) or "max" (V2)."""
    if n_groups > 1 and n_limited < n_groups:
        grouped = sel.view(sel.shape[0], n_groups, -1)  # (N, G, E/G)
        if group_score == "top2sum":
            gscore = grouped.topk(2, dim=-1).values.sum(-1)
        else:
            gscore = grouped.amax(dim=-1)
        best = gscore.topk(n_limited, dim=-1).indices  # (N, n_limited)
        keep = torch.zeros_like(gscore, dtype=torch.bool).scatter_(1, best, True)
        sel = grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).view_as(sel)
    return sel.topk(k, dim=-1).indices


def count_per_expert(indices: torch.Tensor, n_experts: int) -> torch.Tensor:
    """(B, ..., K) expert ids -> (B, E) float counts per leading row (one row per sequence)."""
    flat = indices.reshape(indices.shape[0], -1)
    out = torch.zeros(flat.shape[0], n_experts, dtype=torch.float32, device=indices.device)
    return out.scatter_add_(1, flat, torch.ones_like(flat, dtype=torch.float32))


class Router(nn.Module):
    def __init__(self, cfg, ctx, n_devices: Optional[int] = None):
        super().__init__()
        self.dim = cfg.dim
        self.n_experts = cfg.n_routed_experts
        self.topk = cfg.n_activated_experts
        self.score_func = cfg.score_func
        self.n_groups = cfg.n_expert_groups
        self.n_limited = cfg.n_limited_groups
        self.route_scale = cfg.route_scale
        self.norm_topk_prob = cfg.norm_topk_prob
        self.bias_update_speed = cfg.bias_update_speed
        self.seq_aux_alpha = cfg.seq_aux_alpha
        self.expert_aux_alpha = cfg.expert_aux_alpha
        self.device_aux_alpha = cfg.device_aux_alpha
        self.comm_aux_alpha = cfg.comm_aux_alpha
        self.z_loss_coeff = cfg.z_loss_coeff
        # V2 device/communication losses: D = devices the experts are spread over. It
        # defaults to ep, so those two losses depend on the layout; a reference model can
        # pass the D of the layout it stands in for.
        self.n_devices = n_devices or ctx.ep
        E, G = self.n_experts, self.n_groups
        assert E % G == 0, f"n_routed_experts={E} is not divisible by n_expert_groups={G}"
        assert 1 <= self.n_limited <= G, f"n_limited_groups={self.n_limited} must be in [1, {G}]"
        assert self.topk <= self.n_limited * E // G, "n_activated_experts exceeds the experts of the kept groups"
        assert E % self.n_devices == 0, f"n_routed_experts={E} is not divisible by D={self.n_devices}"
        self.weight = nn.Parameter(torch.empty(E, cfg.dim))
        nn.init.normal_(self.weight, std=cfg.init_std)
        # V3 report §2.1.2: b only selects; fp32 (official "fp32 gate bias").
        self.register_buffer("e_score_correction_bias", torch.zeros(E, dtype=torch.float32))
        # Selections per expert since the last update_bias (int64: exact, and untouched by
        # module.to(dtype)).
        self.register_buffer("load", torch.zeros(E, dtype=torch.int64), persistent=False)
        self.route = self._route  # model/compile.py swaps in a compiled region

    def _apply(self, fn, recurse=True):
        # Keep the bias fp32 when the model is cast to bf16: 1e-3 steps vanish in bf16.
        super()._apply(fn, recurse)
        bias = self.e_score_correction_bias
        if bias.dtype != torch.float32:
            self._buffers["e_score_correction_bias"] = bias.float()
        return self

    def forward(self, x: torch.Tensor, forced: Optional[torch.Tensor] = None) -> Routing:
        """x (N, dim) -> Routing. Accumulates the per-expert load when training. `forced`
        (N, K) expert ids replace the selection of every row without a -1 (route replay,
        moe/replay.py); the gate values are still the live scores at those experts."""
        r = Routing(*self.route(x, forced))
        if self.training:
            self.load += torch.bincount(r.indices.flatten(), minlength=self.n_experts)
        return r

    def _route(self, x: torch.Tensor, forced: Optional[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """The fields of `Routing`, without side effects: what train.compile compiles
        (model/compile.py), through the `route` attribute."""
        logits = linear(x.float(), self.weight.float())  # (N, E)
        if self.score_func == "softmax":
            scores = logits.softmax(dim=-1)
        else:
            scores = sigmoid(logits)
        sel = scores.detach() + self.e_score_correction_bias
        group_score = "top2sum" if self.score_func == "sigmoid" else "max"
        indices = select(group_limited_topk(sel, self.topk, self.n_groups, self.n_limited, group_score), forced)
        weights = scores.gather(1, indices)  # unbiased s: the bias never weights outputs
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        weights = weights * self.route_scale
        return indices, weights, scores, logits

    @torch.no_grad()
    def update_bias(self, global_load: torch.Tensor, speed: Optional[float] = None) -> None:
        """b += gamma * sign(mean_load - load) (V3 §2.1.2; arXiv 2408.15664). `global_load`
        is the per-expert selection count over the whole global batch of one step; gamma is
        `speed` (the trainer's schedule), by default model.bias_update_speed."""
        gamma = self.bias_update_speed if speed is None else speed
        load = global_load.to(self.e_score_correction_bias)
        self.e_score_correction_bias += gamma * torch.sign(load.mean() - load)

    def reset_load(self) -> None:
        self.load.zero_()

    def aux_loss(self, r: Routing, bsz: int) -> torch.Tensor:
        """Sum of the enabled balance losses for the `bsz` sequences of `r` (scalar fp32).

        T = tokens of one sequence, E experts, K per token, P_i = mean_t s'_{i,t} with
        s' = s / sum_j s (a no-op for softmax). f_i = E/(K T) * (tokens choosing i):
        - V3 sequence-wise (eq. 17-20): f from the top-K of the unbiased s
        - V2 expert-level (§2.2.3): f from the actual selection
        - V2 device-level: f'_d = mean of f over device d's experts, P'_d = sum of P
        - V2 communication: f''_d = D/(M T) * (tokens sent to device d), P''_d = P'_d,
          M = the most devices a token can reach
        - z-loss (ST-MoE): mean_t logsumexp(logits_t)^2
        f is a count (no gradient); the gradient flows through P.
        """
        E, K = self.n_experts, self.topk
        scores = r.scores.view(bsz, -1, E)  # (B, T, E)
        seqlen = scores.shape[1]
        loss = scores.new_zeros(())
        if self.score_func == "softmax":
            P = scores.mean(1)  # (B, E)
        else:
            P = (scores / scores.sum(-1, keepdim=True)).mean(1)
        scale = E / (K * seqlen)
        if self.seq_aux_alpha:
            top = scores.detach().topk(K, dim=-1).indices  # eq. 18: unbiased, no group limit
            f = count_per_expert(top, E) * scale
            loss = loss + self.seq_aux_alpha * (f * P).sum(-1).mean()
        if self.expert_aux_alpha or self.device_aux_alpha or self.comm_aux_alpha:
            idx = r.indices.view(bsz, seqlen, K)
            f = count_per_expert(idx, E) * scale
            if self.expert_aux_alpha:
                loss = loss + self.expert_aux_alpha * (f * P).sum(-1).mean()
            D = self.n_devices
            P_dev = P.view(bsz, D, E // D).sum(-1)  # (B, D)
            if self.device_aux_alpha:
                f_dev = f.view(bsz, D, E // D).mean(-1)
                loss = loss + self.device_aux_alpha * (f_dev * P_dev).sum(-1).mean()
            if self.comm_aux_alpha:
                dev = idx // (E // D)  # (B, T, K)
                sent = torch.zeros(bsz, seqlen, D, dtype=torch.bool, device=idx.device)
                sent.scatter_(2, dev, True)
                f_comm = sent.float().sum(1) * (D / (self.device_limit() * seqlen))
                loss = loss + self.comm_aux_alpha * (f_comm * P_dev).sum(-1).mean()
        if self.z_loss_coeff:
            loss = loss + self.z_loss_coeff * torch.logsumexp(r.logits, dim=-1).square().mean()
        return loss

    def device_limit(self) -> int:
        """M of the V2 communication loss: the most devices one token can reach, K, or with
        group-limited routing n_limited_groups groups each spanning ceil(D / G) devices."""
        D, G = self.n_devices, self.n_groups
        limit = min(D, self.topk)
        if G > 1 and self.n_limited < G:
            limit = min(limit, self.n_limited * max(1, math.ceil(D / G)))
        return limit
