"""The rank grid, checked without processes against megatron-core's own rank generator."""
import itertools
import os
import subprocess
import sys
import warnings

import pytest

from ds_parallel.parallel.init import detect_env

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ds_parallel.parallel.topology import Topology

warnings.filterwarnings("ignore")
from megatron.core.parallel_state import RankGenerator  # noqa: E402


def _layouts():
    for world in (1, 2, 4, 8, 16, 24, 64, 256, 1024, 4096):
        for tp, pp, cp, ep in itertools.product((1, 2, 4, 8), (1, 2, 4, 16), (1, 2), (1, 2, 8, 64)):
            try:
                yield Topology(world, tp=tp, pp=pp, cp=cp, ep=ep)
            except ValueError:
                pass


LAYOUTS = list(_layouts())


def test_many_layouts_are_covered():
    assert len(LAYOUTS) > 300
    assert any(t.world_size == 4096 and t.pp == 16 and t.ep == 64 for t in LAYOUTS)


@pytest.mark.parametrize("world", [2, 8, 64, 1024, 4096])
def test_groups_match_megatron_rank_generator(world):
    # Every layout up to 1024 ranks; every third at 4096 (each takes ~1 s in megatron-core).
    layouts = [t for t in LAYOUTS if t.world_size == world]
    for topo in layouts[::3] if world > 1024 else layouts:
        dense = RankGenerator(tp=topo.tp, ep=1, dp=topo.dp, pp=topo.pp, cp=topo.cp, order="tp-cp-ep-dp-pp")
        expert = RankGenerator(tp=topo.tp, ep=topo.ep, dp=topo.edp, pp=topo.pp, cp=1, order="tp-cp-ep-dp-pp")
        for dims in ("tp", "cp", "dp", "pp", "cp-dp", "tp-pp", "tp-cp"):
            assert topo.groups(dims) == dense.get_ranks(dims), (topo, dims)
        assert topo.groups("ep") == expert.get_ranks("ep"), topo
        assert topo.groups("edp") == expert.get_ranks("dp"), topo
        assert topo.groups("etp-ep") == expert.get_ranks("tp-ep"), topo


@pytest.mark.parametrize("topo", [t for t in LAYOUTS if t.world_size in (8, 64)][:60], ids=str)
def test_coords_partition_the_world(topo):
    seen = set()
    for rank in range(topo.world_size):
        c = topo.coords(rank)
        key = (c["tp"], c["cp"], c["dp"], c["pp"])
        assert key not in seen
        seen.add(key)
        assert rank == c["tp"] + topo.tp * (c["cp"] + topo.cp * (c["dp"] + topo.dp * c["pp"]))
        assert rank == c["etp"] + topo.tp * (c["ep"] + topo.ep * (c["edp"] + topo.edp * c["pp"]))
        assert rank in topo.group_of("tp", rank) and len(topo.group_of("ep", rank)) == topo.ep
    for dims in ("tp", "dp", "pp", "ep", "edp"):
        flat = sorted(r for g in topo.groups(dims) for r in g)
        assert flat == list(range(topo.world_size)), dims


def test_deepseek_v3_layout():
    # V3 §3.1: 2048 H800s, PP16, EP64 (over 8 nodes), ZeRO-1 DP, no TP.
    topo = Topology(2048, tp=1, pp=16, ep=64)
    assert (topo.dp, topo.edp) == (128, 2)
    ep_group = topo.group_of("ep", 0)
    assert ep_group == list(range(64)) and len(topo.groups("ep")) == 32
    assert topo.group_of("pp", 0) == list(range(0, 2048, 128))


def test_invalid_layouts_raise():
    with pytest.raises(ValueError, match="not divisible"):
        Topology(6, tp=4)
    with pytest.raises(ValueError, match="ep=4 must divide"):
        Topology(4, tp=2, ep=4)
    with pytest.raises(ValueError, match="mix dense and expert"):
        Topology(4).groups("tp-ep")


def test_env_detection():
    e = detect_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "h0", "MASTER_PORT": "1234"})
    assert (e.rank, e.world_size, e.local_rank, e.master_addr, e.master_port, e.launcher) == (3, 8, 1, "h0", 1234, "torchrun")
    e = detect_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "5", "SLURM_JOB_NODELIST": "gpu7,gpu8"})
    assert (e.rank, e.world_size, e.local_rank, e.master_addr, e.launcher) == (5, 16, 5, "gpu7", "slurm")
    e = detect_env({})
    assert (e.rank, e.world_size, e.launcher) == (0, 1, "single")


def test_intra_op_threads_are_the_cores_a_rank_owns(monkeypatch):
    """parallel.threads overrides; a rank pinned to some cores uses them all; otherwise the
    machine's cores are shared by the ranks on its node (not by the whole world)."""
    import os

    from ds_parallel.parallel.init import intra_op_threads

    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    four_per_node = detect_env({"RANK": "5", "WORLD_SIZE": "32", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"})
    assert intra_op_threads(four_per_node) == 4 and intra_op_threads(four_per_node, override=3) == 3
    slurm = detect_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
                        "SLURM_TASKS_PER_NODE": "8(x2)", "SLURM_JOB_NODELIST": "n1,n2"})
    assert slurm.local_world_size == 8 and intra_op_threads(slurm) == 2
    assert intra_op_threads(detect_env({"RANK": "0", "WORLD_SIZE": "2"})) == 8  # node size unknown: the world's
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {2, 3, 4})  # pinned by the launcher
    assert intra_op_threads(four_per_node) == 3


_FAULTS = """
import resource, sys, torch
from ds_parallel.parallel.init import keep_freed_memory
kept = keep_freed_memory(int(sys.argv[1]))
def step():  # a forward's worth of 4 MiB activations, freed by its backward
    acts = [torch.ones(1 << 20) for _ in range(16)]
    del acts
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_kept_freed_memory_is_not_faulted_in_again():
    """keep_freed_memory (what init_parallel applies to a CPU rank): after the first step the
    next ten reuse the freed pages (10 x 64 MiB: 163,840 pages of 4 KiB), where glibc's
    defaults return some or all of them to the OS and fault them in again (measured: 17,376
    in a pytest-xdist worker, 163,525 from a shell). Fresh processes: the setting is
    process-wide."""
    def faults(mib):
        out = subprocess.run([sys.executable, "-c", _FAULTS, str(mib)], capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONPATH": REPO}).stdout.split()
        return out[0] == "True", int(out[1])

    kept, default = faults(0)
    assert not kept  # 0: glibc's defaults left alone
    kept, n = faults(1024)
    assert kept and n < 0.02 * 163_840 and n < default, (n, default)  # measured ~1,000: one tensor's pages
