"""Bad configs through the real training CLI: exit 2 with one `config error:` line naming
the key, before any process group and without a run directory (each process is bounded by a
120 s timeout, not timed: about 15 s on 2 quiet cores, 80 s under three other jobs).

One `deepspeed` launch (2 ranks) with an indexed dataset whose token ids exceed the
vocabulary; a few other kinds as bare processes that run at the same time (2 ranks of one
job for one of them, as srun or mpirun would start them; one process for the rest). The
deepspeed launcher kills the other ranks as soon as one exits non-zero, so only the bare
ranks show every rank's line. tests/unit/test_config.py runs every kind of rule through
the launcher's main() in-process.
"""
import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest

from ds_parallel.data.indexed import IndexedDatasetWriter

pytestmark = pytest.mark.dist

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN = os.path.join(ROOT, "launchers", "train.py")
DENSE = os.path.join(ROOT, "configs", "smoke_dense_cpu.yaml")
ENV = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
SHORT = ["train.steps=2", "train.warmup_steps=1"]  # should a rule be missing, the run ends soon


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _indexed(prefix, top_id, dtype):
    with IndexedDatasetWriter(prefix, dtype=dtype) as writer:
        writer.add_document(np.arange(3, 300) % 120 + 3)
        writer.add_document([5, top_id, 6])
    return prefix


def _config_errors(text):
    return [line for line in text.splitlines() if line.startswith("config error: ")]


def test_bad_configs_exit_2_naming_the_key(tmp_path):
    high = _indexed(str(tmp_path / "high"), 500, np.uint16)
    negative = _indexed(str(tmp_path / "negative"), -3, np.int32)
    # (overrides, the key its line must name, ranks); every run gets its own train.out_dir.
    bare = {
        "ops": (["data.ops=/"], "data.ops='/'", 2),
        "negative_id": (["data.source=indexed", f"data.path={negative}"], f"data.path={negative!r}", 1),
        "fp8_te_experts": (["model.preset=debug_v3", "precision.fp8.enabled=true", "precision.fp8.backend=te"],
                           "precision.fp8.backend=te keeps routed experts", 1),
    }
    ds_out = tmp_path / "run_deepspeed"
    launcher = subprocess.Popen(
        [sys.executable, "-m", "deepspeed.launcher.runner", "--master_port", str(_free_port()), "--num_gpus", "2",
         TRAIN, "--config", DENSE, f"train.out_dir={ds_out}", "data.source=indexed", f"data.path={high}", *SHORT],
        env=ENV, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    procs = {}
    for name, (overrides, _, ranks) in bare.items():
        port = _free_port()
        for rank in range(ranks):
            env = dict(ENV, RANK=str(rank), WORLD_SIZE=str(ranks), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port)) if ranks > 1 else ENV
            procs[name, rank] = subprocess.Popen(
                [sys.executable, TRAIN, "--config", DENSE, f"train.out_dir={tmp_path / ('run_' + name)}", *overrides,
                 *SHORT],
                env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = launcher.communicate(timeout=120)
        results = {key: (p.communicate(timeout=120), p.returncode) for key, p in procs.items()}
    finally:
        try:  # the launcher's ranks too, should a missing rule have let them start training
            os.killpg(launcher.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for p in procs.values():
            if p.poll() is None:
                p.kill()

    assert launcher.returncode == 2, out[-2000:] + err[-3000:]
    lines = _config_errors(err)
    assert lines and all(f"data.path={high!r} holds token ids in [3, 500], outside model.vocab_size=128" in line
                         for line in lines), err[-3000:]
    assert "Traceback" not in err and "failed:" not in err, err[-3000:]
    assert not ds_out.exists()
    for (name, rank), ((stdout, stderr), code) in results.items():
        assert code == 2, (name, rank, stderr[-3000:])
        assert stderr.strip().splitlines() == _config_errors(stderr), (name, rank, stderr)  # nothing else
        assert len(_config_errors(stderr)) == 1 and bare[name][1] in stderr, (name, rank, stderr)
        assert not (tmp_path / ("run_" + name)).exists()
