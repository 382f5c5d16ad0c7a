"""The training CLI end to end: exact resume, and no hang when a rank dies.

Real `deepspeed` launcher, real engines, 2 gloo processes, the real run directory.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

pytestmark = pytest.mark.dist

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN = os.path.join(ROOT, "launchers", "train.py")
ENV = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")


def deepspeed_train(*overrides, timeout=300, nprocs=2):
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--master_port", str(_free_port()),
           "--num_gpus", str(nprocs), TRAIN, *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def losses(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as fh:
        return {r["step"]: r["loss"] for r in map(json.loads, fh)}


def test_resume_continues_the_exact_loss_curve(tmp_path):
    """The default tiny DeepSeek-V3 (MTP, MoE) on 4 processes as pp=2 x ep=2 (dp=2, ZeRO-1):
    the stage-0 rank holds the dense layer and the embedding, the last stage the MoE layer,
    head, MTP and the embedding copy. A run stopped early (train.max_steps_this_run) and the
    same command rerun: tests/dist/test_post_train_cli.py."""
    common = ["train.steps=12", "train.log_every=1", "train.save_every=6", "train.warmup_steps=3",
              "train.micro_batch_size=8"]
    pipe = ["parallel.pp=2", "parallel.ep=2"]
    straight = tmp_path / "straight"
    deepspeed_train(*common, *pipe, f"train.out_dir={straight}", nprocs=4)
    a = losses(straight)
    assert sorted(a) == list(range(1, 13)) and a[12] < a[1]
    assert open(straight / "checkpoints" / "latest").read().strip() == "step_12"
    assert (straight / "plots" / "loss.png").exists() and (straight / "config.yaml").exists()

    def resume_from_step_6(name, *layout, nprocs=2):
        """A run directory holding only the straight run's step-6 checkpoint, resumed."""
        run = tmp_path / name
        (run / "checkpoints").mkdir(parents=True)
        shutil.copytree(straight / "checkpoints" / "step_6", run / "checkpoints" / "step_6")
        (run / "checkpoints" / "latest").write_text("step_6\n")
        out = deepspeed_train(*common, f"train.out_dir={run}", *layout, nprocs=nprocs)
        assert "resumed from" in out and "at step 6" in out
        b = losses(run)
        assert sorted(b) == list(range(7, 13))
        return b

    # The same layout continues the curve bit for bit (fp32 CPU).
    b = resume_from_step_6("resumed", *pipe, nprocs=4)
    for step in range(7, 13):
        assert a[step] == b[step], (step, a[step], b[step])

    # Layout-free: the step-6 checkpoint (pp=2, ep=2, dp=2, ZeRO-1) resumes on 2 processes
    # without a pipeline (pp=1, ep=1: dp=2 with ZeRO-2) and under tp=2, and continues the same
    # curve (not bit-identical: reductions differ).
    for layout in (["parallel.pp=1", "parallel.ep=1", "parallel.zero_stage=2"], ["parallel.tp=2", "parallel.ep=1"]):
        c = resume_from_step_6("other_" + "_".join(layout), *layout)
        for step in range(7, 13):
            assert c[step] == pytest.approx(a[step], rel=1e-5), (layout, step, c[step], a[step])

    # launchers/convert.py exports the pipeline checkpoint to the HF layout; transformers'
    # DeepseekV3ForCausalLM on it gives our logits (load_model rebuilds the one-process model).
    from ds_parallel.checkpoint import load_model
    from tests.unit.test_hf import hf_logits, input_ids, our_logits

    hf_dir = tmp_path / "hf"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "launchers", "convert.py"), "ds-to-hf", "--ckpt",
                           str(straight / "checkpoints" / "step_6"), "--out", str(hf_dir)],
                          capture_output=True, text=True, timeout=300, env=ENV, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ids = input_ids(vocab=128)
    ours = our_logits(load_model(str(straight / "checkpoints" / "step_6")), ids)
    torch.testing.assert_close(hf_logits(hf_dir, ids), ours, rtol=1e-5, atol=1e-5)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_metrics(out_dir, procs, deadline):
    path = out_dir / "metrics.jsonl"
    while time.time() < deadline:
        if path.exists() and path.read_text().count("\n") >= 2:
            return
        assert all(p.poll() is None for p in procs), "training ended before it could be interrupted"
        time.sleep(0.5)
    raise AssertionError("training did not start")


def test_killed_rank_ends_the_job_without_launcher_help(tmp_path):
    """Two bare processes (as srun or mpirun would start them): when rank 1 is SIGKILLed,
    rank 0 must fail on its next collective and exit non-zero, not hang."""
    out_dir = tmp_path / "run"
    port = _free_port()
    procs = []
    for rank in range(2):
        env = dict(ENV, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port))
        procs.append(subprocess.Popen(
            [sys.executable, TRAIN, f"train.out_dir={out_dir}", "train.steps=100000", "train.log_every=1",
             "train.save_every=0", "parallel.timeout_s=30"],
            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        ))
    try:
        _wait_for_metrics(out_dir, procs, time.time() + 120)
        procs[1].send_signal(signal.SIGKILL)
        t0 = time.time()
        out, _ = procs[0].communicate(timeout=90)
        elapsed = time.time() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert procs[0].returncode not in (0, None)
    assert elapsed < 60, elapsed
    assert "rank 0 failed:" in out


def test_killed_rank_ends_the_deepspeed_launcher(tmp_path):
    out_dir = tmp_path / "run"
    launcher = subprocess.Popen(
        [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", TRAIN, f"train.out_dir={out_dir}",
         "train.steps=100000", "train.log_every=1", "train.save_every=0", "parallel.timeout_s=30"],
        env=ENV, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        _wait_for_metrics(out_dir, [launcher], time.time() + 120)
        ranks = subprocess.run(["pgrep", "-f", f"{TRAIN} --local_rank=1"], capture_output=True, text=True).stdout.split()
        assert ranks, "rank 1 not found"
        os.kill(int(ranks[0]), signal.SIGKILL)
        t0 = time.time()
        launcher.communicate(timeout=90)
        elapsed = time.time() - t0
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode != 0
    assert elapsed < 60, elapsed


def test_trains_on_a_megatron_indexed_dataset(tmp_path):
    """data.source=indexed: token ids from a .bin/.idx pair (written here by our writer,
    byte-compatible with megatron-core's, see tests/unit/test_data.py)."""
    import numpy as np

    from ds_parallel.data.indexed import IndexedDatasetWriter

    rng = np.random.default_rng(0)
    prefix = str(tmp_path / "tokens")
    with IndexedDatasetWriter(prefix, dtype=np.uint16) as writer:
        for _ in range(200):  # documents of a repeating pattern: learnable
            start = int(rng.integers(0, 100))
            writer.add_document(np.arange(start, start + int(rng.integers(20, 80))) % 120 + 3)
    out_dir = tmp_path / "run"
    deepspeed_train("--config", os.path.join(ROOT, "configs", "smoke_dense_cpu.yaml"), f"train.out_dir={out_dir}",
                    "data.source=indexed", f"data.path={prefix}", "train.steps=30", "train.log_every=1",
                    "train.lr=3e-3")
    curve = losses(out_dir)
    assert curve[30] < 0.5 * curve[1], curve
    assert not (out_dir / "summary.json").read_text().count("exact_match")  # no held-out problems here
