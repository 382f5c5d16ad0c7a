"""A real one-node Slurm cluster for the `slurm` tests, set up from nothing.

When `sinfo` already answers (a CI image or a developer machine with Slurm running) the
tests use that cluster. Otherwise the session fixture installs what is missing with
apt-get (Debian's slurmctld, slurmd, slurm-client, munge, libpmix2), writes a slurm.conf
into a scratch directory (exported as SLURM_CONF, so nothing under /etc/slurm changes),
starts munged, slurmctld and slurmd in the foreground as children of pytest, waits for the
node to go idle, and stops exactly those daemons when the session ends.

Without systemd nothing starts the daemons for us; the settings below are the ones that
work on a 2-core container (Slurm 22.05, as Debian ships it):
- MinJobAge=4: the default 300 makes `sbatch --wait` poll at 2, 10, 42, 74 s.
- FirstJobId random: Slurm's PMIx plugin keeps /tmp/spmix_appdir_<uid>_<job>.<step>, and a
  cluster killed mid-job leaves it behind; the next cluster's job of the same id then fails
  to launch its step (srun: "task 0 launch failed"), so ids do not repeat across clusters.
- task/none, proctrack/linuxproc, no accounting: no cgroups or database needed.
- SlurmdParameters=config_overrides: CPUs=2 is taken as given, so a smaller or larger
  machine neither drains the node nor offers more slots than the tests plan for.
- Ports are picked free at start-up, so a leftover cluster from a crashed session cannot
  collide with this one.
- `srun --mpi=pmix` needs libpmix-dev before slurmd starts: Slurm's mpi/pmix plugin
  dlopens the unversioned libpmix.so (libpmix2 ships only libpmix.so.2), and slurmd loads
  the plugin once, at start-up. Without it every pmix step fails ("pmi/pmix: can not load
  PMIx library"); the other tests do not need it, so its install is best-effort.
"""
from __future__ import annotations

import os
import pwd
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time

import pytest

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge", "libpmix2")
PMIX_PACKAGES = ("libpmix-dev",)
COMMANDS = ("slurmctld", "slurmd", "sinfo", "sbatch", "srun", "scontrol", "munged")
# The node advertises 8 GPUs without device files, like one H800/H100 node, so the job
# scripts' `#SBATCH --gpus-per-node=8` default is satisfiable unchanged; nothing can use them.
FAKE_GPUS = 8


def _sinfo_answers(env: dict[str, str]) -> bool:
    if not shutil.which("sinfo"):
        return False
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and bool(out.stdout.strip())


def _apt_install(packages: tuple[str, ...]) -> str | None:
    """Install with apt-get; refresh the package lists once if the first try fails.
    Returns None on success, else the reason (for the skip message)."""
    if not shutil.which("apt-get"):
        return "apt-get is not available"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, text=True)
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        return f"apt-get install {' '.join(packages)} failed: {(out.stderr or out.stdout).strip()[-300:]}"
    return None


def _dpkg_installed(package: str) -> bool:
    if not shutil.which("dpkg-query"):
        return False
    out = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True)
    return out.returncode == 0 and out.stdout.endswith(" installed")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def _start_munged(scratch: str) -> tuple[subprocess.Popen, str]:
    """A munged of our own on a private socket, so that this cluster neither depends on
    nor disturbs any other munged on the machine (another test session's, or the system's).
    Returns the process and its socket."""
    munge = pwd.getpwnam("munge")
    key = "/etc/munge/munge.key"
    if not os.path.exists(key):  # the Debian package makes one; create it where it did not
        os.makedirs(os.path.dirname(key), exist_ok=True)
        with open(key, "wb") as fh:
            fh.write(os.urandom(1024))
        os.chown(key, munge.pw_uid, munge.pw_gid)
        os.chmod(key, 0o400)
    run_dir = os.path.join(scratch, "munge")
    os.makedirs(run_dir, mode=0o755)
    os.chown(run_dir, munge.pw_uid, munge.pw_gid)
    socket_path = os.path.join(run_dir, "munge.socket")
    files = {"--socket": socket_path, "--pid-file": f"{run_dir}/munged.pid",
             "--log-file": f"{run_dir}/munged.log", "--seed-file": f"{run_dir}/munged.seed"}
    proc = subprocess.Popen(
        ["munged", "--foreground", "--force", *(f"{k}={v}" for k, v in files.items())],
        user=munge.pw_uid, group=munge.pw_gid, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 20
    while True:
        cred = subprocess.run(["munge", "-n", "-S", socket_path], capture_output=True)
        if cred.returncode == 0:
            return proc, socket_path
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise RuntimeError(f"munged did not start: {cred.stderr.decode()[-300:]}")
        time.sleep(0.2)


def _slurm_conf(scratch: str, host: str, munge_socket: str) -> str:
    mem_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
    return f"""\
ClusterName=dsptest
SlurmctldHost={host}
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={munge_socket}
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
MinJobAge=4
FirstJobId={1000 + secrets.randbelow(10**6)}
StateSaveLocation={scratch}/state
SlurmdSpoolDir={scratch}/spool
SlurmctldPidFile={scratch}/slurmctld.pid
SlurmdPidFile={scratch}/slurmd.pid
SlurmctldLogFile={scratch}/slurmctld.log
SlurmdLogFile={scratch}/slurmd.log
GresTypes=gpu
NodeName={host} CPUs=2 RealMemory={int(mem_mb * 0.9)} Gres=gpu:{FAKE_GPUS} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def _wait_idle(env: dict[str, str], procs: list[subprocess.Popen], timeout: float = 60) -> None:
    deadline = time.time() + timeout
    state = ""
    while time.time() < deadline:
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}")
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=env, capture_output=True, text=True)
        state = out.stdout.strip()
        if out.returncode == 0 and state == "idle":
            return
        time.sleep(0.3)
    raise RuntimeError(f"the Slurm node did not become idle in {timeout:.0f}s (state {state!r})")


class Cluster:
    """What the tests need: the environment that points the Slurm clients at the cluster,
    and the sbatch flags that make the GPU nodes' job defaults fit it. `pmix_note` says why
    PMIx may be missing (its install failed), for the pmix test's skip message."""

    def __init__(self, env: dict[str, str], scratch: str | None, pmix_note: str = ""):
        self.env = env
        self.scratch = scratch
        self.pmix_note = pmix_note
        gres = subprocess.run(["sinfo", "-h", "-o", "%G"], env=env, capture_output=True, text=True).stdout
        # A cluster without GPU GRES rejects `#SBATCH --gpus-per-node=8`; zero overrides it.
        self.sbatch_flags = [] if "gpu" in gres else ["--gpus-per-node=0"]

    def daemon_logs(self) -> str:
        """The tails of the daemons' logs (for failure messages), without debug chatter."""
        if not self.scratch:
            return ""
        text = []
        for name in ("slurmctld.log", "slurmd.log"):
            path = os.path.join(self.scratch, name)
            if os.path.exists(path):
                lines = [line for line in open(path).read().splitlines() if "debug" not in line]
                text.append(f"\n--- {name}\n" + "\n".join(lines[-40:]))
        return "\n".join(text)


@pytest.fixture(scope="session")
def slurm_cluster():
    env = dict(os.environ)
    if _sinfo_answers(env):
        yield Cluster(env, None)
        return
    if os.geteuid() != 0:
        pytest.skip("no Slurm cluster answers and starting one needs root (apt-get, munged, slurmd)")
    missing = [c for c in COMMANDS if not shutil.which(c)]
    if missing:
        reason = _apt_install(PACKAGES)
        if reason:
            pytest.skip(reason)
    pmix_note = ""
    if not all(_dpkg_installed(p) for p in PMIX_PACKAGES):
        pmix_note = _apt_install(PMIX_PACKAGES) or ""

    scratch = tempfile.mkdtemp(prefix="dsp-slurm-")
    os.chmod(scratch, 0o755)  # munged runs as the munge user and must reach its folder
    host = socket.gethostname().split(".")[0]
    conf = os.path.join(scratch, "slurm.conf")
    env["SLURM_CONF"] = conf
    saved_conf = os.environ.get("SLURM_CONF")
    started: list[subprocess.Popen] = []
    try:
        for sub in ("state", "spool", "dev"):
            os.makedirs(os.path.join(scratch, sub))
        munged, munge_socket = _start_munged(scratch)
        started.append(munged)
        with open(conf, "w") as fh:
            fh.write(_slurm_conf(scratch, host, munge_socket))
        # Slurm wants a device file per GPU: character devices like /dev/null (1, 3) stand in.
        for i in range(FAKE_GPUS):
            os.mknod(os.path.join(scratch, "dev", f"fakegpu{i}"), 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        with open(os.path.join(scratch, "gres.conf"), "w") as fh:  # read from slurm.conf's folder
            fh.write(f"NodeName={host} Name=gpu File={scratch}/dev/fakegpu[0-{FAKE_GPUS - 1}]\n")
        quiet = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        # -i: ignore state from an earlier cluster with this scratch layout (there is none).
        started.append(subprocess.Popen(["slurmctld", "-D", "-i", "-f", conf], **quiet))
        started.append(subprocess.Popen(["slurmd", "-D", "-f", conf, "-N", host], **quiet))
        try:
            _wait_idle(env, started)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}\n{Cluster(env, scratch).daemon_logs()}") from None
        # Jobs inherit the submitter's environment, so Slurm clients inside them
        # (scontrol show hostnames, scontrol requeue) find this cluster too.
        os.environ["SLURM_CONF"] = conf
        yield Cluster(env, scratch, pmix_note)
    finally:
        if saved_conf is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = saved_conf
        if len(started) > 1:
            # Jobs first, so that no slurmstepd outlives the daemons.
            subprocess.run(["scancel", "--full", "--user", "root"], env=env, capture_output=True, timeout=30)
            deadline = time.time() + 30
            while time.time() < deadline:
                out = subprocess.run(["squeue", "-h"], env=env, capture_output=True, text=True)
                if out.returncode != 0 or not out.stdout.strip():
                    break
                time.sleep(0.5)
        for proc in reversed(started):  # slurmd, slurmctld, then munged
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        _kill_leftovers(conf)
        shutil.rmtree(scratch, ignore_errors=True)


@pytest.fixture(scope="session")
def pmix(slurm_cluster):
    """Skips unless `srun --mpi=pmix` starts 2 tasks that each see their PMIx rank."""
    cmd = ["srun", "--mpi=pmix", "-n", "2", "printenv", "PMIX_RANK"]
    try:
        out = subprocess.run(cmd, env=slurm_cluster.env, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:  # e.g. a step that never starts
        out = subprocess.CompletedProcess(cmd, 124, "", "no answer in 60 s")
    if out.returncode != 0 or sorted(out.stdout.split()) != ["0", "1"]:
        note = f" ({slurm_cluster.pmix_note})" if slurm_cluster.pmix_note else ""
        pytest.skip(f"`{' '.join(cmd)}` failed (exit {out.returncode}){note}: "
                    f"{(out.stderr or out.stdout).strip()[-600:]}")


def _kill_leftovers(conf: str) -> None:
    """SIGKILL whatever still runs with this cluster's SLURM_CONF in its environment
    (slurmstepd and job processes whose daemons went first): nothing else carries it."""
    marker = f"SLURM_CONF={conf}".encode()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as fh:
                if marker in fh.read().split(b"\0"):
                    os.kill(int(pid), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            continue
