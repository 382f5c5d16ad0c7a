import os
import warnings

os.environ.setdefault("DS_ACCELERATOR", "cpu")
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex.*")


def pytest_configure(config):
    for marker in (
        "dist: spawns gloo processes",
        "slurm: needs the local Slurm cluster",
        "gpu: needs CUDA (skipped without it)",
        "slow: long-running",
    ):
        config.addinivalue_line("markers", marker)
