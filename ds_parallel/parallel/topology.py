"""The rank grid: degrees + world size -> coordinates and group members. Pure Python.

Megatron order: a global rank is a mixed-radix number whose fastest digit is the tensor
parallel rank, then context parallel, then data parallel, then pipeline:

    rank = tp_rank + tp * (cp_rank + cp * (dp_rank + dp * pp_rank))

Expert layers see the same ranks through a second grid (Megatron's "expert rank
generator"): the non-pipeline part of each stage, tp * cp * dp ranks, is re-read as
etp (= tp) fastest, then ep, then edp (expert data parallel):

    rank = etp_rank + tp * (ep_rank + ep * (edp_rank + edp * pp_rank))

so an expert-parallel group is a set of ranks that share a tensor-parallel rank and a
pipeline stage, and the expert-data-parallel group holds the replicas of one expert
shard; expert gradients are averaged over edp only.

A group is "every rank that differs only in these dimensions". Groups are listed in the
mixed-radix order of the fixed coordinates and members in the order of the varying ones,
which is exactly megatron-core's `RankGenerator.get_ranks` (checked by a test).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from itertools import product

from ds_parallel.config.schema import data_parallel_size

DENSE_DIMS = ("tp", "cp", "dp", "pp")
EXPERT_DIMS = ("etp", "ep", "edp", "pp")


def _groups(sizes: tuple[int, ...], varying: set[int]) -> list[list[int]]:
    """All groups of ranks that differ only along the dimensions in `varying`."""
    strides = [1]
    for s in sizes[:-1]:
        strides.append(strides[-1] * s)
    fixed = [i for i in range(len(sizes)) if i not in varying]
    moving = [i for i in range(len(sizes)) if i in varying]
    groups = []
    # itertools.product varies its last factor fastest; reverse so dim 0 is fastest.
    for fixed_coords in product(*(range(sizes[i]) for i in reversed(fixed))):
        base = sum(c * strides[i] for c, i in zip(fixed_coords, reversed(fixed)))
        members = []
        for moving_coords in product(*(range(sizes[i]) for i in reversed(moving))):
            members.append(base + sum(c * strides[i] for c, i in zip(moving_coords, reversed(moving))))
        groups.append(members)
    return groups


@dataclass(frozen=True)
class Topology:
    """Degrees of a layout over `world_size` ranks. dp is derived; ep divides tp*cp*dp/tp."""

    world_size: int
    tp: int = 1
    pp: int = 1
    cp: int = 1
    ep: int = 1

    def __post_init__(self):
        for name in ("world_size", "tp", "pp", "cp", "ep"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        mp = self.tp * self.pp * self.cp
        if self.world_size % mp:
            raise ValueError(f"world_size={self.world_size} is not divisible by tp*pp*cp={mp}")
        if (self.cp * self.dp) % self.ep:
            raise ValueError(f"ep={self.ep} must divide cp*dp={self.cp * self.dp}")

    @property
    def dp(self) -> int:
        return data_parallel_size(self.world_size, self.tp, self.pp, self.cp)

    @property
    def edp(self) -> int:
        """Expert data parallel: replicas of one expert shard within a stage."""
        return (self.cp * self.dp) // self.ep

    @cached_property
    def dense_sizes(self) -> tuple[int, ...]:
        return (self.tp, self.cp, self.dp, self.pp)

    @cached_property
    def expert_sizes(self) -> tuple[int, ...]:
        return (self.tp, self.ep, self.edp, self.pp)

    def coords(self, rank: int) -> dict[str, int]:
        """Every coordinate of `rank`: tp, cp, dp, pp and the expert view etp, ep, edp."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside world of {self.world_size}")
        out = {}
        r = rank
        for name, size in zip(DENSE_DIMS, self.dense_sizes):
            out[name] = r % size
            r //= size
        r = rank
        for name, size in zip(EXPERT_DIMS, self.expert_sizes):
            if name != "pp":
                out[name] = r % size
            r //= size
        return out

    def groups(self, dims: str) -> list[list[int]]:
        """Every group varying along `dims`, e.g. "tp", "dp", "tp-pp", "cp-dp", "ep", "edp".

        Dense names (tp, cp, dp, pp) and expert names (etp, ep, edp) may not be mixed,
        except pp, which both grids share.
        """
        names = dims.split("-")
        if all(n in DENSE_DIMS for n in names):
            dim_names, sizes = DENSE_DIMS, self.dense_sizes
        elif all(n in EXPERT_DIMS for n in names):
            dim_names, sizes = EXPERT_DIMS, self.expert_sizes
        else:
            raise ValueError(f"cannot mix dense and expert dimensions in {dims!r}")
        varying = {dim_names.index(n) for n in names}
        return _groups(sizes, varying)

    def group_of(self, dims: str, rank: int) -> list[int]:
        """The members of the `dims` group that contains `rank`."""
        for members in self.groups(dims):
            if rank in members:
                return members
        raise AssertionError("unreachable: every rank is in exactly one group")

    # Named groups, as megatron-core and DeepSpeed call them.
    GROUP_DIMS = {
        "tp": "tp",
        "pp": "pp",
        "dp": "dp",  # data parallel without cp (gradients of dense params average over dp-cp)
        "dp_cp": "cp-dp",
        "cp": "cp",
        "mp": "tp-pp",  # "model parallel": every rank holding a different part of one replica
        "ep": "ep",
        "edp": "edp",  # expert data parallel: expert gradients average over this only
        "etp_ep": "etp-ep",
    }
