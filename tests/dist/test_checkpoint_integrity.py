"""Resume never loads an incomplete checkpoint: the real trainer (DeepSpeed engines, ep=2,
ZeRO-1, 2 gloo ranks) either refuses with one CheckpointError line, writing nothing, or
resumes from the last complete checkpoint.

The run: steps 1-3 saved every step, rank 1 SIGKILLed halfway through writing its step-3
shard. Then: resuming with step 2 damaged (a shard deleted, a shard truncated) or with
`latest` pointing outside is refused on every rank; resuming the run as the kill left it
continues from step 2 and retraces step 3 bit for bit; and the training CLI exits 2 on
both ranks with one line and leaves the run directory as it was.
"""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from tests.harness import run_dist

pytestmark = pytest.mark.dist

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OVERRIDES = ["train.steps=10", "train.save_every=1", "train.log_every=1"]


def _train(run_dir, *extra):
    from ds_parallel.config.load import load_config
    from ds_parallel.parallel.groups import build_parallel_context
    from ds_parallel.parallel.topology import Topology
    from ds_parallel.train.trainer import train

    cfg = load_config(os.path.join(ROOT, "configs", "smoke_cpu.yaml"),
                      [*OVERRIDES, f"train.out_dir={run_dir}", *extra], world_size=2)
    p = cfg.parallel
    return train(cfg, build_parallel_context(Topology(2, tp=p.tp, pp=p.pp, cp=p.cp, ep=p.ep)))


def _die_writing_step_3(rank, world, run_dir):
    from ds_parallel.checkpoint import writer as ckpt

    real_save = ckpt.save_file

    def save_file(tensors, path, **kw):
        real_save(tensors, path, **kw)
        if rank == 1 and ".tmp_step_3" in path and "shard-" in path:
            os.truncate(path, os.path.getsize(path) // 2)  # the kill lands mid-write
            os.kill(os.getpid(), signal.SIGKILL)

    ckpt.save_file = save_file
    _train(run_dir, "train.max_steps_this_run=3")


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("ckpt") / "run"
    with pytest.raises(Exception):  # rank 1 killed; rank 0 fails on its next collective
        run_dist(_die_writing_step_3, 2, str(run))
    root = run / "checkpoints"
    assert sorted(os.listdir(root)) == [".tmp_step_3", "latest", "step_1", "step_2"]
    assert (root / "latest").read_text() == "step_2\n"
    return run


def _losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        return {r["step"]: r["loss"] for r in map(json.loads, fh)}


def _snapshot(run_dir):
    """Every file's bytes and modification time, by path: a refused resume writes nothing,
    not even the same config.yaml again."""
    out = {}
    for dirpath, _, files in os.walk(run_dir):
        for f in files:
            path = os.path.join(dirpath, f)
            digest = hashlib.sha256(open(path, "rb").read()).hexdigest()
            out[os.path.relpath(path, run_dir)] = (digest, os.stat(path).st_mtime_ns)
    return out


def _damage(run_dir, how):
    step2 = os.path.join(run_dir, "checkpoints", "step_2")
    if how == "deleted":
        os.remove(os.path.join(step2, "shard-00001.safetensors"))
    elif how == "truncated":
        os.truncate(os.path.join(step2, "shard-00000.safetensors"), 1000)
    else:
        with open(os.path.join(run_dir, "checkpoints", "latest"), "w") as fh:
            fh.write(how)


DAMAGE = {  # how -> what the one-line error must say
    "deleted": r"step_2/shard-00001.safetensors is missing",
    "truncated": r"step_2/shard-00000.safetensors has 1000 bytes, meta.json lists \d+",
    "../../etc": r"names '../../etc', not a step_<N> directory",
    "step_2_best": r"names 'step_2_best', not a step_<N> directory",
}


def _refuse_then_resume(rank, world, run_dir, scratch):
    import torch.distributed as dist

    from ds_parallel.checkpoint import CheckpointError

    for i, (how, message) in enumerate(DAMAGE.items()):
        copy = os.path.join(scratch, f"damaged_{i}")
        if rank == 0:
            shutil.copytree(run_dir, copy)
            _damage(copy, how)
        dist.barrier()
        before = _snapshot(copy)
        with pytest.raises(CheckpointError, match=message) as err:  # on every rank
            _train(copy, "train.max_steps_this_run=2")
        assert "\n" not in str(err.value)
        dist.barrier()
        assert _snapshot(copy) == before, how

    resumed = os.path.join(scratch, "resumed")  # the fixture's run stays as the kill left it
    if rank == 0:
        shutil.copytree(run_dir, resumed)
    dist.barrier()
    _train(resumed, "train.max_steps_this_run=2")  # from step 2: steps 3 and 4
    before, after = _losses(run_dir), _losses(resumed)
    assert sorted(after) == [1, 2, 3, 4]
    assert after[3] == before[3]  # the killed run logged step 3 before its save: bit-identical
    assert sorted(os.listdir(os.path.join(resumed, "checkpoints"))) == ["latest", "step_1", "step_2", "step_3",
                                                                        "step_4"]


def test_damaged_checkpoints_are_refused_and_a_killed_save_resumes_from_the_last(killed_run, tmp_path):
    assert sorted(_losses(killed_run)) == [1, 2, 3]
    run_dist(_refuse_then_resume, 2, str(killed_run), str(tmp_path))


def test_cli_exits_2_on_every_rank_and_writes_nothing(killed_run, tmp_path):
    """Two bare ranks (as srun or mpirun would start them) on the run with a deleted shard."""
    import socket

    run = tmp_path / "run"
    shutil.copytree(killed_run / "checkpoints", run / "checkpoints")
    shutil.copy(killed_run / "metrics.jsonl", run / "metrics.jsonl")
    _damage(str(run), "deleted")
    before = _snapshot(run)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = dict(os.environ, DS_ACCELERATOR="cpu", RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, os.path.join(ROOT, "launchers", "train.py"), *OVERRIDES,
                                       f"train.out_dir={run}", "parallel.timeout_s=60"],
                                      env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        outs = [p.communicate(timeout=180) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 2, out[-2000:] + err[-2000:]
        lines = [line for line in err.splitlines() if "checkpoint error" in line]
        assert len(lines) == 1 and "step_2/shard-00001.safetensors is missing" in lines[0], err[-2000:]
        assert "Traceback" not in err
    assert _snapshot(run) == before
