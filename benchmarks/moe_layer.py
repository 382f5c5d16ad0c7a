"""One DeepSeekMoE layer, forward + backward: ds_parallel's `MoE` vs transformers'
`DeepseekV3MoE` on identical weights and tokens (single process, fp32, CPU).

transformers 5.24 runs its routed experts through `config._experts_implementation`:
"eager" (a Python loop over the experts that were hit) or "grouped_mm" (sort the
(token, expert) pairs, then `grouped_mm`). A whole `DeepseekV3ForCausalLM` picks
"grouped_mm" by default; a standalone `DeepseekV3MoE` built from a config has None, which
means the eager loop. Both are timed. Ours runs `torch._grouped_mm` ("ours") and, for
reference, its per-expert loop fallback ("ours-loop").

Before timing, outputs and input gradients are compared (max abs diff printed); the
benchmark fails if they do not agree to 1e-4.

    .venv/bin/python benchmarks/moe_layer.py [--threads 1 --repeats 15 --warmup 2]
"""
from __future__ import annotations

import torch
from common import base_parser, set_threads, table, time_interleaved  # first: puts the repo on sys.path
from transformers.models.deepseek_v3.configuration_deepseek_v3 import DeepseekV3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

from ds_parallel.config.schema import ModelConfig
from ds_parallel.moe import MoE
from ds_parallel.parallel.groups import ParallelContext

DIM, INTER, BSZ, SEQLEN = 256, 128, 4, 512  # 2048 tokens
# (routed experts, top-k, expert groups, groups kept): V3-style group-limited sigmoid routing.
SHAPES = [(8, 2, 4, 2), (64, 6, 8, 4)]
TOL = 1e-4


def build_pair(n_experts: int, topk: int, n_groups: int, n_limited: int, seed: int = 0):
    """Our MoE with random weights, and transformers MoEs (eager, grouped_mm) holding copies."""
    cfg = ModelConfig(dim=DIM, moe_inter_dim=INTER, n_routed_experts=n_experts, n_activated_experts=topk,
                      n_shared_experts=1, score_func="sigmoid", n_expert_groups=n_groups, n_limited_groups=n_limited,
                      route_scale=2.5, norm_topk_prob=True, init_std=0.02)  # no balance loss: HF has none
    torch.manual_seed(seed)
    ours = MoE(0, cfg, ParallelContext.single()).train()
    with torch.no_grad():
        ours.gate.e_score_correction_bias.normal_(std=0.01)  # non-zero, as after some training
    theirs = {}
    for impl in ("eager", "grouped_mm"):
        hf_cfg = DeepseekV3Config(hidden_size=DIM, moe_intermediate_size=INTER, n_routed_experts=n_experts,
                                  num_experts_per_tok=topk, n_group=n_groups, topk_group=n_limited, n_shared_experts=1,
                                  norm_topk_prob=True, routed_scaling_factor=2.5, num_attention_heads=4,
                                  num_key_value_heads=4)
        hf_cfg._experts_implementation = impl
        hf = DeepseekV3MoE(hf_cfg).train()
        with torch.no_grad():
            hf.gate.weight.copy_(ours.gate.weight)
            hf.gate.e_score_correction_bias.copy_(ours.gate.e_score_correction_bias)
            hf.experts.gate_up_proj.copy_(torch.cat([ours.experts.w1, ours.experts.w3], dim=1))  # [gate; up]
            hf.experts.down_proj.copy_(ours.experts.w2)
            for name, hf_name in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
                getattr(hf.shared_experts, hf_name).weight.copy_(getattr(ours.shared_experts, name).weight)
        theirs[impl] = hf
    return ours, theirs


def step_fn(module, x: torch.Tensor, cot: torch.Tensor, ours: bool):
    params = list(module.parameters())

    def run():
        for p in params:
            p.grad = None
        xg = x.detach().requires_grad_()
        y = module(xg)
        y = y[0] if ours else y
        y.backward(cot)
        return y.detach(), xg.grad

    return run


def main() -> None:
    args = base_parser(__doc__, repeats=15, warmup=2).parse_args()
    set_threads(args.threads)
    rows = []
    for n_experts, topk, n_groups, n_limited in SHAPES:
        name = f"E={n_experts} top-{topk}"
        print(f"{name}: hidden {DIM}, moe_inter {INTER}, {BSZ * SEQLEN} tokens, {n_groups} groups keep {n_limited}, "
              "1 shared expert, fp32 forward+backward", flush=True)
        ours, theirs = build_pair(n_experts, topk, n_groups, n_limited)
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(BSZ, SEQLEN, DIM, generator=gen)
        cot = torch.randn(BSZ, SEQLEN, DIM, generator=gen)
        fns = {"ours": step_fn(ours, x, cot, True)}
        fns.update({f"hf-{impl}": step_fn(hf, x, cot, False) for impl, hf in theirs.items()})

        def ours_loop(run=fns["ours"]):
            ours.experts.use_grouped_mm = False
            try:
                return run()
            finally:
                ours.experts.use_grouped_mm = True

        fns["ours-loop"] = ours_loop
        y_ref, gx_ref = fns["ours"]()
        for label, fn in fns.items():
            if label == "ours":
                continue
            y, gx = fn()
            dy, dgx = (y - y_ref).abs().max().item(), (gx - gx_ref).abs().max().item()
            print(f"  check {label} vs ours: max |dy| = {dy:.2e}, max |dx.grad| = {dgx:.2e}", flush=True)
            assert dy < TOL and dgx < TOL, f"{name}: {label} disagrees with ours"
        ms = time_interleaved(fns, args.warmup, args.repeats, label=f"{name} ")
        o = ms["ours"]
        for label, other in (("hf eager", "hf-eager"), ("hf grouped_mm", "hf-grouped_mm"), ("ours-loop", "ours-loop")):
            t = ms[other]
            rows.append([name, label, f"{o.wall_ms:.1f}", f"{t.wall_ms:.1f}", f"{t.wall_ms / o.wall_ms:.2f}x",
                         f"{o.cpu_ms:.1f}", f"{t.cpu_ms:.1f}", f"{t.cpu_ms / o.cpu_ms:.2f}x"])
    print()
    print(f"MoE layer forward+backward, medians of {args.repeats} interleaved rounds (CPU, fp32, "
          f"{args.threads} thread(s)); ratio = theirs / ours (> 1: ours faster). "
          "ours-loop = ours with its per-expert loop instead of grouped_mm.")
    print(table(["config", "theirs", "ours wall ms", "theirs wall ms", "ratio wall", "ours cpu ms", "theirs cpu ms",
                 "ratio cpu"], rows))


if __name__ == "__main__":
    main()
