"""Training throughput and MFU on one GPU: the same config through the real launcher in
bf16, with the pure-PyTorch FP8 backend, and with Transformer Engine's blockwise recipe
where TE imports. Part of benchmarks/gpu_suite.sh.

    python benchmarks/gpu_throughput.py [--config configs/moe_1b_1gpu.yaml] [--steps 30] [--out DIR]

Model FLOPs per token (training = forward + backward = 3 x forward), from the config alone:

    forward = 2 N + L_attn n_heads (d_qk + d_v) T
        N       parameters one token multiplies by: every activated matrix of the main model
                (attention, the dense or the shared + top-k routed experts, the router) and
                the output head, plus per MTP depth its block, projection and the head again;
                the embedding lookup and the norms are not multiplications
        L_attn  attention layers, the main model's and MTP's
        T       sequence length; causal attention computes half of the T x T scores and
                weighted values (2 FLOPs x T/2 each for QK^T and PV)

MFU = tokens/s x model FLOPs per token / peak, with the peak dense BF16 rate of an H100/H200
SXM (989.4 TFLOP/s, NVIDIA's datasheet; --peak-tflops to change) for every variant, FP8 too:
the FP8 columns say how much faster the same model trains, not how close FP8 GEMMs run to
their own peak. The torch FP8 backend emulates its GEMMs (FP8 operands, dequantised, fp32
GEMM), so it measures the recipe's overhead, not FP8 speed. Tokens/s is the median over the
steps after --skip warm-up steps, as the trainer logs it (whole optimizer steps).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

from common import REPO, table

from ds_parallel.config import load_config
from ds_parallel.parallel.plan import active_numel, stage_params

H100_BF16_DENSE_TFLOPS = 989.4


def flops_per_token(cfg) -> float:
    """Training FLOPs per token of `cfg` (module docstring), from the planner's parameter table."""
    m, seqlen = cfg.model, cfg.train.seq_len
    # Every matrix the trunk, the head and the MTP modules hold (no embedding lookup, no norm
    # gains), routed experts counted K of E; each MTP depth runs the shared head once more.
    matrices = [p for p in stage_params(m, range(m.n_layers), has_embed=False, has_head=True)
                if not p.name.endswith("norm.weight")]
    n = active_numel(m, matrices) + m.mtp_depth * m.vocab_size * m.dim
    d_qk, d_v = (m.qk_head_dim, m.v_head_dim) if m.attention == "mla" else (m.mha_head_dim, m.mha_head_dim)
    attn_scores = (m.n_layers + m.mtp_depth) * m.n_heads * (d_qk + d_v) * seqlen
    return 3.0 * (2 * n + attn_scores)


def run(config: str, out_dir: str, steps: int, overrides: list[str]) -> list[dict]:
    env = dict(os.environ, DS_ACCELERATOR="cuda", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, os.path.join(REPO, "launchers", "train.py"), "--config", config,
           f"train.out_dir={out_dir}", f"train.steps={steps}", "train.log_every=1", "train.save_every=0", *overrides]
    print("$", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=REPO, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[3]} {' '.join(overrides)}: exit {proc.returncode}")
    with open(os.path.join(out_dir, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--config", default=os.path.join(REPO, "configs", "moe_1b_1gpu.yaml"))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--skip", type=int, default=5, help="warm-up steps left out of the median")
    parser.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE_TFLOPS)
    parser.add_argument("--out", default=os.path.join(REPO, "runs", "gpu_throughput"))
    args = parser.parse_args()

    from ds_parallel.fp8.te import te_available

    cfg = load_config(args.config, [])
    per_token = flops_per_token(cfg)
    variants = {"bf16": [], "fp8 torch (emulated)": ["precision.fp8.enabled=true", "precision.fp8.backend=torch"]}
    if te_available():
        variants["fp8 TE blockwise"] = ["precision.fp8.enabled=true", "precision.fp8.backend=te",
                                        "precision.fp8.recipe=blockwise", "precision.fp8.keep_high_precision=experts"]
    rows, results = [], {}
    for name, overrides in variants.items():
        records = run(args.config, os.path.join(args.out, name.split()[0] + str(len(results))), args.steps, overrides)
        tps = statistics.median(r["tokens_per_s"] for r in records[args.skip:])
        mfu = tps * per_token / (args.peak_tflops * 1e12)
        results[name] = {"tokens_per_s": tps, "mfu": mfu, "final_loss": records[-1]["loss"]}
        rows.append([name, f"{tps:,.0f}", f"{mfu:.1%}", f"{records[-1]['loss']:.3f}"])
    base = results["bf16"]["tokens_per_s"]
    for row, res in zip(rows, results.values()):
        row.append(f"{res['tokens_per_s'] / base:.2f}x")
    print(f"\n{args.config}: {per_token / 1e9:.2f} GFLOP per token (training), peak {args.peak_tflops} TFLOP/s")
    print(table(["variant", "tokens/s", "MFU", "final loss", "vs bf16"], rows))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "throughput.json"), "w") as fh:
        json.dump({"config": args.config, "flops_per_token": per_token, "peak_tflops": args.peak_tflops,
                   "results": results}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
