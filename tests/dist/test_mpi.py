"""`mpirun -n 2 python launchers/train.py` (MPI only: no RANK/WORLD_SIZE, ranks from mpi4py)
trains the default smoke config to exactly the losses of `deepspeed --num_gpus 2`.

The MPI runtime is the `mpich` wheel's mpirun next to the interpreter (the venv's bin/).
"""
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.dist

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN = os.path.join(ROOT, "launchers", "train.py")
COMMON = ["train.steps=12", "train.log_every=1", "train.save_every=0"]
MPIRUN = os.path.join(os.path.dirname(sys.executable), "mpirun")


def _env() -> dict[str, str]:
    """No launcher variables at all, so ranks can only come from MPI."""
    launcher_vars = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items()
           if k not in launcher_vars and not k.startswith(("SLURM_", "OMPI_", "PMI_", "PMIX_", "MPI_"))}
    env.update(DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    return env


def _run(cmd, timeout=600) -> str:  # generous: a loaded 2-core machine runs it 5x slower
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def _losses(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as fh:
        return {r["step"]: r["loss"] for r in map(json.loads, fh)}


def test_mpirun_trains_to_the_deepspeed_launcher_losses(tmp_path):
    # mpi4py must talk to the MPI that launched it: the venv's own mpirun, not one on PATH.
    if not os.path.exists(MPIRUN):
        pytest.skip(f"no {MPIRUN}: pip install mpich mpi4py into this environment")
    pytest.importorskip("mpi4py")
    ref, mpi = tmp_path / "deepspeed", tmp_path / "mpirun"
    _run([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", TRAIN, *COMMON,
          f"train.out_dir={ref}"])
    out = _run([MPIRUN, "-n", "2", sys.executable, TRAIN, *COMMON, f"train.out_dir={mpi}"])
    assert "held-out exact match" in out  # rank 0 finished the whole run
    a, b = _losses(ref), _losses(mpi)
    assert sorted(b) == list(range(1, 13))
    assert a == b  # bit-identical: same seed, layout (ep=2, ZeRO-1) and fp32
