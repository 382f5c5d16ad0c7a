"""Timing shared by the benchmarks: fixed thread count, warm-up, then the median of N
repeats, with the candidates *interleaved* (A B A B ...), so that a burst of load from
another process on a shared machine hits every candidate alike instead of one of them.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # `python benchmarks/x.py` puts benchmarks/, not the repo, on sys.path
    sys.path.insert(0, REPO)


def base_parser(doc: str, repeats: int, warmup: int, threads: int = 1) -> argparse.ArgumentParser:
    """`threads` 0: the default leaves each process's threads to the script (train_step.py)."""
    parser = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
    parser.add_argument("--threads", type=int, default=threads,
                        help="torch.set_num_threads (default 1: see benchmarks/README.md on shared machines)" if threads
                        else "torch.set_num_threads on both sides (default: each side's own, as its users run it)")
    parser.add_argument("--repeats", type=int, default=repeats, help="timed runs per candidate (median reported)")
    parser.add_argument("--warmup", type=int, default=warmup, help="untimed runs per candidate first")
    return parser


def add_experts_args(parser: argparse.ArgumentParser) -> None:
    """The MoE shape of the training benchmarks: debug_v3 widened to 64 routed experts, top-6,
    8 groups of which 4 are kept (debug_v3 itself has 8, top-2, 4 groups keep 2)."""
    parser.add_argument("--experts", type=int, default=64, help="routed experts")
    parser.add_argument("--topk", type=int, default=6, help="activated experts per token")
    parser.add_argument("--groups", type=int, default=8, help="expert groups")
    parser.add_argument("--limited", type=int, default=4, help="groups each token may use")


def experts_fields(args: argparse.Namespace) -> dict:
    """model.* fields of `add_experts_args`."""
    return {"n_routed_experts": args.experts, "n_activated_experts": args.topk, "n_expert_groups": args.groups,
            "n_limited_groups": args.limited}


def set_threads(n: int) -> None:
    """torch.set_num_threads(n) (n 0: left as it is), printed with the load average."""
    if n:
        torch.set_num_threads(n)
    print(f"torch {torch.__version__}, torch.set_num_threads({n or 'not called'}) (get_num_threads={torch.get_num_threads()}), "
          f"{os.cpu_count()} CPUs, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)


@dataclass
class Timing:
    wall_ms: float  # median wall time
    cpu_ms: float  # median CPU time of this process (all its threads)
    wall_min_ms: float

    def __str__(self) -> str:
        return f"{self.wall_ms:.1f}"


@dataclass
class Measured:
    """What a callable returns when it timed itself where it ran (in a worker process)."""
    wall_ms: float
    cpu_ms: float


def time_interleaved(fns: dict[str, Callable[[], object]], warmup: int, repeats: int,
                     label: str = "") -> dict[str, Timing]:
    """Median wall and CPU time in ms of each callable, measured round-robin (or as the
    callable reports them, if it returns `Measured`). Prints one progress line per round.

    CPU time (`time.process_time`) is what the process itself computed. With one thread it
    does not grow when other processes take the core away, so on a shared machine it is the
    steadier of the two; with several threads it also counts OpenMP spin-waiting."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    wall: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(repeats):
        for name, fn in fns.items():
            c0, t0 = time.process_time(), time.perf_counter()
            out = fn()
            measured = out if isinstance(out, Measured) else Measured((time.perf_counter() - t0) * 1e3,
                                                                      (time.process_time() - c0) * 1e3)
            wall[name].append(measured.wall_ms)
            cpu[name].append(measured.cpu_ms)
        last = ", ".join(f"{name} {wall[name][-1]:.0f}/{cpu[name][-1]:.0f}" for name in fns)
        print(f"  {label}round {r + 1}/{repeats} (wall/cpu ms): {last}", flush=True)
    return {name: Timing(statistics.median(wall[name]), statistics.median(cpu[name]), min(wall[name])) for name in fns}


def table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table, columns padded for the terminal."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])
