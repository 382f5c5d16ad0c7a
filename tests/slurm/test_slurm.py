"""slurm/v3_pretrain.sh on a real (local, one-node) Slurm cluster, CPU profile, 2 tasks.

One reference run under the `deepspeed` launcher, then jobs, each checked against it or
against a bound: a plain job (bit-identical losses), the same with `srun --mpi=pmix`, the
DeepSpeed-launcher job script, a job warned with SIGUSR1 mid-run (checkpoint, requeue,
resume: still bit-identical), and a job whose rank 1 is killed (ends FAILED, quickly, with
the rank's error in the log). fp32, same seed, same layout (ep=2 over the two ranks,
ZeRO-1), so equal means equal.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from .conftest import free_port

pytestmark = pytest.mark.slurm

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "slurm", "v3_pretrain.sh")
TRAIN = os.path.join(ROOT, "launchers", "train.py")
STEPS = 40
COMMON = f"train.steps={STEPS} train.log_every=1 train.save_every=0"
JOB_TIMEOUT_S = 240


def _clean_env(extra: dict[str, str], base=os.environ) -> dict[str, str]:
    """The submitter's environment minus anything that names ranks or another job: the job
    inherits it, and a stray RANK or SLURM_PROCID would decide the ranks."""
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in {**base, **extra}.items()
           if k not in drop and (not k.startswith("SLURM_") or k == "SLURM_CONF")}
    env.update(PYTHON=sys.executable, PYTHONUNBUFFERED="1")
    return env


def _losses(out_dir) -> dict[int, float]:
    with open(os.path.join(out_dir, "metrics.jsonl")) as fh:
        return {r["step"]: r["loss"] for r in map(json.loads, fh)}


def _steps_logged(out_dir) -> int:
    path = os.path.join(out_dir, "metrics.jsonl")
    return open(path).read().count("\n") if os.path.exists(path) else 0


class Job:
    """`sbatch --wait` of the job script in the background, from a scratch submit dir (so
    the default `--output=logs/%x-%j.out` lands there), with CLUSTER=cpu. MASTER_PORT is a
    free port: the scripts' default (20000 + job id) would collide between test sessions
    running side by side, whose clusters all number their jobs from 1."""

    def __init__(self, cluster, submit_dir, overrides: str, script: str = SCRIPT, name: str = "v3-pretrain",
                 extra_env: dict[str, str] | None = None):
        os.makedirs(os.path.join(submit_dir, "logs"), exist_ok=True)
        env = _clean_env({**cluster.env, "CLUSTER": "cpu", "OVERRIDES": overrides, "DSP_REPO": ROOT,
                          **(extra_env or {})})
        env["MASTER_PORT"] = str(free_port())
        cmd = ["sbatch", "--wait", "--parsable",
               "--nodes=1", "--ntasks-per-node=2", *cluster.sbatch_flags, script]
        self.t0 = time.time()
        self.proc = subprocess.Popen(cmd, cwd=submit_dir, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.job_id = self.proc.stdout.readline().strip().split(";")[0]
        assert self.job_id.isdigit(), self.job_id + self.proc.stdout.read()
        self.env = env
        self.log_path = os.path.join(submit_dir, "logs", f"{name}-{self.job_id}.out")

    def wait(self) -> int:
        """sbatch --wait's status: the job's exit code (a job that never starts, e.g. asking
        for more CPUs than the node has, would wait forever: hence the timeout)."""
        try:
            self.proc.communicate(timeout=JOB_TIMEOUT_S)
        finally:
            self.stop_waiting()
        return self.proc.returncode

    def stop_waiting(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
            self.cancel()

    def log(self) -> str:
        return open(self.log_path).read() if os.path.exists(self.log_path) else "(no log)"

    def squeue_state(self) -> str:
        out = subprocess.run(["squeue", "-h", "-j", self.job_id, "-o", "%T %r"], env=self.env,
                             capture_output=True, text=True)
        return out.stdout.strip()

    def show(self) -> str:
        return subprocess.run(["scontrol", "show", "job", self.job_id], env=self.env, capture_output=True,
                              text=True).stdout

    def cancel(self) -> None:
        subprocess.run(["scancel", self.job_id], env=self.env, capture_output=True)

    def final_state(self, timeout: float) -> str:
        """Poll the controller until the job is COMPLETED or FAILED and return that state.
        `sbatch --wait` cannot be trusted across a requeue: in Slurm 22.05 a poll that lands
        while the requeue is under way (the old run shows as CANCELLED or FAILED for a
        moment) makes it return 1 although the job goes on."""
        deadline = time.time() + timeout
        state = "(never seen)"
        while time.time() < deadline:
            out = subprocess.run(["scontrol", "-o", "show", "job", self.job_id], env=self.env,
                                 capture_output=True, text=True)
            if out.returncode != 0:  # purged after MinJobAge: the last state seen stands
                return state
            state = out.stdout.split("JobState=")[1].split()[0]
            if state in ("COMPLETED", "FAILED"):
                return state
            time.sleep(0.3)
        raise AssertionError(f"job {self.job_id} still {state} after {timeout:.0f}s:\n{self.log()[-3000:]}")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same config under `deepspeed --num_gpus 2 launchers/train.py`, on a free port
    (the launcher's default 29500 may be taken by another run on the machine)."""
    out_dir = tmp_path_factory.mktemp("reference")
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
           TRAIN, *COMMON.split(), f"train.out_dir={out_dir}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=_clean_env({"DS_ACCELERATOR": "cpu"}), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    losses = _losses(out_dir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    return losses


def test_job_trains_on_both_tasks_with_the_launcher_losses(slurm_cluster, reference, tmp_path):
    out_dir = tmp_path / "run"
    job = Job(slurm_cluster, str(tmp_path), f"{COMMON} train.out_dir={out_dir}")
    rc = job.wait()
    log = job.log()
    assert rc == 0, log[-4000:] + slurm_cluster.daemon_logs()
    assert "cluster=cpu nodes=1 ranks=2" in log and "env CUDA_VISIBLE_DEVICES=" in log
    # srun --label: both tasks ran the trainer (each prints a line prefixed with its rank).
    assert any(line.startswith("1: ") for line in log.splitlines()), log[-3000:]
    assert _losses(out_dir) == reference


def test_job_under_srun_mpi_pmix_gives_the_same_losses(slurm_cluster, pmix, reference, tmp_path):
    """SRUN_ARGS=--mpi=pmix, as on sites whose MPI stacks bootstrap through PMIx: srun
    serves PMIx to each rank (the `pmix` fixture checks PMIX_RANK), and the ranks still take
    rank and world from SLURM_PROCID/SLURM_NTASKS, so the curve is the launcher's."""
    out_dir = tmp_path / "run"
    job = Job(slurm_cluster, str(tmp_path), f"{COMMON} train.out_dir={out_dir}",
              extra_env={"SRUN_ARGS": "--mpi=pmix"})
    rc = job.wait()
    elapsed = time.time() - job.t0
    log = job.log()
    assert rc == 0, log[-4000:] + slurm_cluster.daemon_logs()
    assert "launch: srun --nodes=1 --ntasks=2 " in log and " --label --mpi=pmix env " in log, log[-3000:]
    assert _losses(out_dir) == reference
    assert elapsed < 60, elapsed


def test_deepspeed_multinode_job_gives_the_same_losses(slurm_cluster, reference, tmp_path):
    """DeepSpeed's own launcher with a hostfile from the node list (one node: no ssh)."""
    out_dir = tmp_path / "run"
    job = Job(slurm_cluster, str(tmp_path), f"{COMMON} train.out_dir={out_dir}",
              script=os.path.join(ROOT, "slurm", "deepspeed_multinode.sh"), name="ds-multinode")
    rc = job.wait()
    log = job.log()
    assert rc == 0, log[-4000:]
    assert "deepspeed.launcher.runner --hostfile" in log and "dist_world_size=2" in log
    assert _losses(out_dir) == reference


def test_preempted_job_checkpoints_requeues_and_resumes_the_same_curve(slurm_cluster, reference, tmp_path):
    out_dir = tmp_path / "run"
    job = Job(slurm_cluster, str(tmp_path), f"{COMMON} train.out_dir={out_dir}")
    try:
        deadline = time.time() + 120
        while _steps_logged(out_dir) < 2:
            assert job.proc.poll() is None and time.time() < deadline, job.log()[-3000:]
            time.sleep(0.2)
        # What Slurm does --signal=B:USR1@600 before the time limit: warn the batch shell.
        subprocess.run(["scancel", "--signal=USR1", "--batch", job.job_id], env=job.env, check=True)
        # Slurm holds a requeued job ~2 minutes (PENDING, reason BeginTime) before it may
        # start again. Release it once the node is idle and a few seconds have passed:
        # slurmd refuses a restart whose credential is dated the same second as the old
        # run's revocation ("Killing non-startable batch job: Job credential revoked").
        deadline = time.time() + 90
        seen = []
        while f"job {job.job_id} start 1:" not in job.log():
            state = job.squeue_state(), node_state(job.env)
            if not seen or seen[-1][1] != state:
                seen.append((round(time.time() - deadline + 90, 1), state))
            assert time.time() < deadline, (seen, job.show(), job.log()[-3000:], slurm_cluster.daemon_logs())
            if state == ("PENDING BeginTime", "idle"):
                time.sleep(3.0)
                subprocess.run(["scontrol", "update", f"JobId={job.job_id}", "StartTime=now"], env=job.env,
                               capture_output=True)
                time.sleep(1.0)
            time.sleep(0.2)
        # The old run passes through CANCELLED/FAILED while the requeue is under way: only
        # the state after the second start counts.
        state = job.final_state(JOB_TIMEOUT_S)
    finally:
        job.stop_waiting()
    log = job.log()
    assert state == "COMPLETED", log[-4000:] + slurm_cluster.daemon_logs()
    stopped = [line for line in log.splitlines() if "preempted: checkpoint written at step" in line]
    assert len(stopped) == 1, log[-4000:]
    step = int(stopped[0].split("at step ")[1].split(";")[0])
    assert 2 <= step < STEPS
    assert "exit code 75" in log and f"requeueing job {job.job_id}" in log
    assert f"resumed from {out_dir}/checkpoints/step_{step} at step {step}" in log
    losses = _losses(out_dir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert losses == reference  # bit-identical before and after the requeue


def node_state(env) -> str:
    return subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=env, capture_output=True, text=True).stdout.strip()


def _rank_pids(out_dir, rank: int) -> list[int]:
    """Training processes of this run (by their out_dir argument) with SLURM_PROCID=rank."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
            if f"train.out_dir={out_dir}".encode() not in cmdline or not any(a.endswith(b"train.py") for a in cmdline):
                continue
            environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        if f"SLURM_PROCID={rank}".encode() in environ:
            pids.append(int(pid))
    return pids


def test_job_with_a_dead_rank_fails_quickly_with_its_error_in_the_log(slurm_cluster, tmp_path):
    out_dir = tmp_path / "run"
    job = Job(slurm_cluster, str(tmp_path), f"train.steps=100000 train.log_every=1 train.save_every=0 "
                                      f"parallel.timeout_s=30 train.out_dir={out_dir}")
    try:
        deadline = time.time() + 120
        while _steps_logged(out_dir) < 2:
            assert job.proc.poll() is None and time.time() < deadline, job.log()[-3000:]
            time.sleep(0.2)
        pids = _rank_pids(out_dir, 1)
        assert len(pids) == 1, pids
        os.kill(pids[0], signal.SIGKILL)
        t0 = time.time()
        rc = job.wait()
        elapsed = time.time() - t0
    finally:
        job.stop_waiting()
    log = job.log()
    assert rc != 0, log[-4000:]
    assert elapsed < 60, (elapsed, log[-3000:])
    assert "task 1: Killed" in log, log[-3000:]  # srun names the dead rank
    assert "0: rank 0 failed:" in log, log[-3000:]  # its peer fails on the next collective
    state = subprocess.run(["scontrol", "show", "job", job.job_id], env=job.env, capture_output=True, text=True)
    if state.returncode == 0:  # still remembered (MinJobAge)
        assert "JobState=FAILED" in state.stdout, state.stdout


def test_post_train_job_runs_packed_sft(slurm_cluster, tmp_path):
    """slurm/post_train.sh starts launchers/post_train.py on both tasks: packed SFT with
    DeepSeek-V3's tokenizer and chat template (configs/sft_cpu.yaml shrunk) learns, with MTP on."""
    out_dir = tmp_path / "sft"
    overrides = (f"train.steps=4 train.log_every=1 train.seq_len=64 train.global_batch_size=4 "
                 f"train.micro_batch_size=2 post_train.sft.eval_fraction=0.01 train.out_dir={out_dir}")
    job = Job(slurm_cluster, str(tmp_path), overrides, script=os.path.join(ROOT, "slurm", "post_train.sh"),
              name="post-train", extra_env={"CONFIG": "configs/sft_cpu.yaml"})
    rc = job.wait()
    log = job.log()
    assert rc == 0, log[-4000:] + slurm_cluster.daemon_logs()
    assert "phase sft (sft)" in log and "held-out loss" in log
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["step"] == 4 and summary["heldout_loss"] > 0
    assert summary["rows"] < summary["examples"]  # packed: several examples per row
    lines = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4] and lines[-1]["loss"] < lines[0]["loss"]
    assert lines[0]["mtp_loss"] > 0  # MTP kept on
