"""Bytes on the wire per expert-parallel dispatch: the MoE layer at ep = 2 over 2 gloo
processes, each with its own 2048 tokens (hidden 256, fp32), routed by a sigmoid router
with random weights (near-uniform loads) over 8..64 experts, top-2..6.

For each configuration, per rank, summed over both ranks:

  ours      `MoE.last_comm["dispatch_bytes"]` of one forward: the rows this rank sends to
            the *other* rank (rows for its own experts are a local copy, not counted), each
            row = hidden activations + gate values and expert mask for the destination's
            n_local experts (fp32 + bool).
  wire      the same, measured independently: `all_to_all_single` is wrapped and every byte
            its input holds for another rank is counted (x, gates, masks; the tiny
            split-size exchange is listed apart).
  minimum   activations only, one copy per (token, distinct *other* destination rank):
            sum_t |{rank(e) : e in topk(t)} - {my rank}| x hidden x 4 bytes.
  naive     one activation copy per (token, expert) pair whose expert is on the other rank.
  combine   `last_comm["combine_bytes"]`: the returned rows (activations only).

Ratios: ours / minimum (the metadata overhead; 1.00 would be activations alone) and
naive / ours (what deduplicating per rank saves). The backward pass sends the mirror
image (gradients of the combine go out as dispatch-sized rows, and vice versa).

    .venv/bin/python benchmarks/ep_dispatch_bytes.py
"""
from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from common import table  # first: puts the repo on sys.path

from tests.harness import run_dist

DIM, INTER, BSZ, SEQLEN, EP = 256, 128, 4, 512, 2
# (label, routed experts, top-k, expert groups, groups kept)
CONFIGS = [
    ("E=8 top-2, 4 groups keep 2 (debug_v3)", 8, 2, 4, 2),
    ("E=16 top-4, no group limit", 16, 4, 1, 1),
    ("E=64 top-6, no group limit (V2-Lite-like)", 64, 6, 1, 1),
    ("E=64 top-6, 8 groups keep 4 (V3-like)", 64, 6, 8, 4),
    ("E=64 top-6, 2 groups = ranks keep 1", 64, 6, 2, 1),
]


class WireCounter:
    """Wraps dist.all_to_all_single; counts the bytes of each call's input bound for other ranks."""

    def __init__(self, rank: int):
        self.rank, self.calls = rank, []
        self._orig = dist.all_to_all_single

    def __enter__(self):
        def counted(output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
            world = dist.get_world_size(group)
            splits = input_split_sizes or [input.shape[0] // world] * world
            row_bytes = input[:1].numel() * input.element_size() if input.shape[0] else 0
            if input.dim() == 1 and not input_split_sizes:  # the split-size exchange: one value per rank
                row_bytes = input.element_size()
            self.calls.append(row_bytes * (sum(splits) - splits[self.rank]))
            return self._orig(output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op)

        dist.all_to_all_single = counted
        return self

    def __exit__(self, *exc):
        dist.all_to_all_single = self._orig


def _measure(rank: int, world: int, out_rows: list) -> None:
    warnings.filterwarnings("ignore")
    from ds_parallel.config.schema import ModelConfig
    from ds_parallel.moe import MoE
    from ds_parallel.parallel.groups import build_parallel_context
    from ds_parallel.parallel.topology import Topology

    ctx = build_parallel_context(Topology(world, ep=EP))
    rows = []
    for label, n_experts, topk, n_groups, n_limited in CONFIGS:
        cfg = ModelConfig(dim=DIM, moe_inter_dim=INTER, n_routed_experts=n_experts, n_activated_experts=topk,
                          n_shared_experts=1, score_func="sigmoid", n_expert_groups=n_groups,
                          n_limited_groups=n_limited, route_scale=2.5, norm_topk_prob=True, init_std=0.02)
        layer = MoE(0, cfg, ctx).eval()
        gen = torch.Generator().manual_seed(0)  # the same router on both ranks
        with torch.no_grad():
            layer.gate.weight.copy_(torch.randn(layer.gate.weight.shape, generator=gen) * 0.02)
            layer.gate.e_score_correction_bias.copy_(torch.randn(n_experts, generator=gen) * 0.01)
        x = torch.randn(BSZ, SEQLEN, DIM, generator=torch.Generator().manual_seed(1 + rank))  # this rank's tokens

        with torch.no_grad():
            indices = layer.gate(x.view(-1, DIM)).indices  # (N, K): what forward will route
            with WireCounter(rank) as wire:
                layer(x)
        n_local = n_experts // EP
        dest = indices // n_local  # (N, K) destination rank of each pair
        remote_pairs = (dest != rank).sum().item()
        hit = torch.zeros(indices.shape[0], EP, dtype=torch.bool).scatter_(1, dest, True)
        remote_rows = hit.sum().item() - hit[:, rank].sum().item()  # (token, other rank) pairs
        elem = x.element_size()
        counts_bytes, *payload_calls = wire.calls  # first call: the split-size exchange
        stats = torch.tensor([
            x.shape[0] * x.shape[1], remote_pairs, remote_rows, remote_rows * DIM * elem,
            layer.last_comm["dispatch_bytes"], sum(payload_calls[:3]), counts_bytes,
            remote_pairs * DIM * elem, layer.last_comm["combine_bytes"], payload_calls[3],
        ], dtype=torch.float64)
        dist.all_reduce(stats)  # totals over both ranks
        rows.append([label, n_local] + stats.tolist())
        if rank == 0:
            print(f"  {label}: done", flush=True)
    if rank == 0:
        out_rows.extend(rows)
        _report(rows)


def _report(rows: list) -> None:
    mb = lambda b: f"{b / 2**20:.3f}"  # noqa: E731
    body = []
    for label, n_local, tokens, pairs, trows, minimum, ours, wire, counts, naive, combine, wire_combine in rows:
        assert ours == wire, f"{label}: last_comm says {ours} bytes, the wire carried {wire}"
        assert combine == wire_combine == minimum, f"{label}: combine bytes {combine} / {wire_combine} vs {minimum}"
        body.append([label, f"{int(tokens)}", f"{int(pairs)}", f"{int(trows)}", mb(minimum), mb(ours), mb(wire),
                     f"{ours / minimum:.3f}", mb(naive), f"{naive / ours:.2f}", f"{naive / minimum:.2f}", mb(combine),
                     f"{int(counts)}"])
    print()
    print(f"EP dispatch, ep={EP}, 2 gloo processes, hidden {DIM} fp32, {BSZ * SEQLEN} tokens per rank; "
          "bytes summed over both ranks, one forward; MB = 2^20 bytes; only bytes to the *other* rank count "
          "(the layer copies rows for its own experts locally and does not report them)")
    print(table(["routing", "tokens", "remote (tok,expert) pairs", "remote (tok,rank) rows", "minimum MB",
                 "ours MB (last_comm)", "wire MB (measured)", "ours / min", "naive MB", "naive / ours",
                 "naive / min", "combine MB", "count-exchange B"], body))


def main() -> None:
    print(f"spawning 2 gloo processes (~10 s), {len(CONFIGS)} routing configurations", flush=True)
    run_dist(_measure, EP, [])


if __name__ == "__main__":
    main()
