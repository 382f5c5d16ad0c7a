import os
import warnings

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex.*")


def pytest_configure(config):
    # Each xdist worker's in-process tests get their share of the cores, as a launched rank does
    # (parallel/init.py `intra_op_threads`); torch's default, every core per worker, makes the
    # workers' threads preempt each other inside every op. Spawned ranks set their own.
    import torch

    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    for marker in (
        "dist: spawns gloo processes",
        "slurm: needs the local Slurm cluster",
        "gpu: needs CUDA (skipped without it)",
        "slow: long demos with a short version in the default run; selected with --slow",
    ):
        config.addinivalue_line("markers", marker)


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", default=False,
                     help="also run the long demos marked `slow` (e.g. the README's full smoke job)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--slow"):
        return
    skip = pytest.mark.skip(reason="long demo: run with `make test PYTEST_ARGS=--slow`")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
