"""Rejection sampling (rl/rejection.py) on dp=2, tp=2 (tiny dense model) and ep=2 (tiny
DeepSeek-V3: MLA, MoE) writes the bytes one process writes from the same weights and seeds:
prompts dealt to data-parallel ranks (the last chunk leaves rank 1 without a prompt, so it
runs the generator's dummy forwards), samples seeded by (seed, prompt, sample), generation
batch-invariant; every rank returns rank 0's summary once the samples file is whole."""
import pytest

from tests.harness import run_dist
from tests.unit.test_rejection import BASE

pytestmark = pytest.mark.dist

V3 = ["model.preset=debug_v3"]
LAYOUTS = {"dp": [], "tp": ["parallel.tp=2"], "ep": V3 + ["parallel.ep=2", "parallel.zero_stage=1"]}


def _check(rank, world, out_dir):
    import torch.distributed as dist

    from ds_parallel.parallel.groups import build_parallel_context
    from ds_parallel.parallel.topology import Topology
    from ds_parallel.rl.rejection import rejection_sample
    from ds_parallel.rl.run import plan_phases

    for layout, extra in LAYOUTS.items():
        cfg = plan_phases(None, BASE + extra + [f"train.out_dir={out_dir}/{layout}"], world)[0].cfg
        ctx = build_parallel_context(Topology(world, tp=cfg.parallel.tp, pp=1, ep=cfg.parallel.ep))
        assert (ctx.dp, ctx.tp, ctx.ep) == {"dp": (2, 1, 1), "tp": (1, 2, 1), "ep": (2, 1, 2)}[layout]
        summary = rejection_sample(cfg, ctx)
        assert summary["finished"], (layout, summary)
        # Every rank returns rank 0's summary, and only once samples.jsonl is whole: the next
        # phase (SFT on the samples) opens it on every rank straight away.
        summaries = [None] * world
        dist.all_gather_object(summaries, summary)
        assert summaries[0] == summaries[1] and summary["kept"] > 0, (layout, summaries)
        with open(f"{out_dir}/{layout}/samples.jsonl") as fh:
            assert sum(1 for _ in fh) == summary["kept"], layout
        dist.barrier()


def test_kept_set_is_the_same_for_one_and_two_ranks(tmp_path):
    from ds_parallel.parallel.groups import ParallelContext
    from ds_parallel.rl.rejection import rejection_sample
    from ds_parallel.rl.run import plan_phases

    for name, extra in (("dense", []), ("v3", V3)):
        cfg = plan_phases(None, BASE + extra + [f"train.out_dir={tmp_path}/one_{name}"], 1)[0].cfg
        rejection_sample(cfg, ParallelContext.single())
    run_dist(_check, 2, str(tmp_path))
    for layout in LAYOUTS:
        one = tmp_path / ("one_v3" if layout == "ep" else "one_dense")
        expected = (one / "samples.jsonl").read_bytes()
        assert expected.count(b"\n") > 0, layout
        assert (tmp_path / layout / "samples.jsonl").read_bytes() == expected, layout
        assert (tmp_path / layout / "rejection_stats.json").read_text() == (one / "rejection_stats.json").read_text()
