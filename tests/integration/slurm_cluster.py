"""A real one-node Slurm cluster on this machine, for integration tests.

Debian's ``slurm-wlm`` and ``munge`` run without systemd or cgroups when configured for it:
``munged`` with its own key and socket, ``slurmctld`` and ``slurmd`` as root with Linux-process
tracking and no task plugin, every state, spool, pid and log file in one temporary directory.
Client commands (``sbatch``, ``squeue``, ``scontrol``) reach this cluster through ``SLURM_CONF``,
which :meth:`SlurmCluster.env` sets; jobs inherit it, so a job can submit jobs too.

Usage (the session-scoped pytest fixture ``slurm`` below is the intended use)::

    from slurm_cluster import slurm  # noqa: F401  (the fixture: a started cluster)

    def test_something(slurm):
        job = slurm.sbatch(["--wrap", "true"], wait=True)

    # or by hand
    from slurm_cluster import SlurmCluster

    with SlurmCluster(tmp_dir) as cluster:                 # installs Slurm if missing, starts it
        job = cluster.sbatch(["--wrap", "true"], wait=True)
        assert cluster.job(job)["JobState"] == "COMPLETED"
    # leaving the block cancels every job and stops the three daemons it started, by pid file

Slurm details that matter here (measured on Debian 12, Slurm 22.05):

* ``SelectTypeParameters=CR_CPU``: counting memory makes a job without ``--mem`` take the whole node.
* ``SchedulerParameters=batch_sched_delay=0``: jobs start in about 1 s instead of 3 s; short
  scheduling intervals start a job whose begin time has come (a requeued one) within seconds.
* ``AuthInfo=…,cred_expire=15``: a requeued job may start again after ``cred_expire`` seconds
  (default 120), so a preempted-and-requeued test run resumes quickly.
* No ``sacct`` without slurmdbd: job facts come from ``scontrol show job``, kept for an hour
  after a job ends (``MinJobAge``) so a test can inspect them.
* The node may be declared with more CPUs than the machine has (``SlurmdParameters=
  config_overrides``): a 2-core CI machine then still runs a driver job that only waits
  (``cross_corpus.sh``) beside a 2-rank training job.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

SBIN = ("/usr/sbin", "/sbin", "/usr/local/sbin")


class SlurmClusterError(RuntimeError):
    """The test cluster could not be installed, started or asked something."""


def _which(name: str) -> str | None:
    path = os.environ.get("PATH", "") + os.pathsep + os.pathsep.join(SBIN)
    return shutil.which(name, path=path)


def ensure_slurm_installed() -> None:
    """Install Debian's ``slurm-wlm`` and ``munge`` when ``slurmctld`` is missing.

    Runs ``apt-get install --no-install-recommends -y slurm-wlm munge``, and once more after
    ``apt-get update`` when the package lists are missing or stale.

    Raises:
        SlurmClusterError: not root, no apt-get, or the install failed (with apt's output).
    """
    if all(_which(n) for n in ("slurmctld", "slurmd", "munged", "sbatch")):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise SlurmClusterError("slurmctld is not installed and this is not a root Debian machine: "
                                "install slurm-wlm and munge (apt-get install slurm-wlm munge)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "--no-install-recommends", "-y", "slurm-wlm", "munge"]
    r = subprocess.run(install, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, capture_output=True, text=True)
        r = subprocess.run(install, env=env, capture_output=True, text=True)
    if r.returncode != 0 or not _which("slurmctld"):
        raise SlurmClusterError(f"apt-get install slurm-wlm munge failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _total_memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    return 1024


def parse_scontrol(text: str) -> dict[str, str]:
    """``Key=Value`` pairs of one ``scontrol show … -o`` line (values run to the next key)."""
    # Values may hold spaces (Reason=..., Comment=...); a key is a word followed by '='
    # at the start or after a space.
    out = {}
    for m in re.finditer(r"(?:^|\s)([A-Za-z][A-Za-z0-9_:/]*)=(.*?)(?=\s[A-Za-z][A-Za-z0-9_:/]*=|$)", text.strip()):
        out[m.group(1)] = m.group(2)
    return out


class SlurmCluster:
    """One ``munged`` + ``slurmctld`` + ``slurmd`` on this machine, configured in ``root``.

    Args:
        root: an empty directory for the config, keys, state, spool, pid and log files.
        cpus: CPUs the node declares (default: this machine's, at least ``min_cpus``).
        min_cpus: lower bound for ``cpus`` (see the module docstring).
    """

    def __init__(self, root: Path, cpus: int | None = None, min_cpus: int = 4):
        self.root = Path(root).resolve()
        self.node = socket.gethostname().split(".")[0]
        self.cpus = cpus or max(os.cpu_count() or 1, min_cpus)
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket.2"
        self.pid_files = {"slurmd": self.root / "slurmd.pid", "slurmctld": self.root / "slurmctld.pid",
                          "munged": self.root / "munge" / "munged.pid"}
        self.started: list[str] = []

    # -- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> "SlurmCluster":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout: float = 60.0) -> None:
        """Install if needed, write the configs, start the daemons, wait until jobs can run."""
        ensure_slurm_installed()
        self.root.mkdir(parents=True, exist_ok=True)
        self._start_munge()
        self._write_slurm_conf()
        for daemon in ("slurmctld", "slurmd"):
            r = subprocess.run([_which(daemon), "-f", str(self.conf)], env=self.env(),
                               capture_output=True, text=True)
            if r.returncode != 0:
                raise SlurmClusterError(f"{daemon} did not start: {r.stderr.strip()}\n{self.logs()}")
            self.started.append(daemon)
        self.wait_until_ready(timeout)

    def _start_munge(self) -> None:
        mdir = self.munge_socket.parent
        mdir.mkdir(mode=0o755, exist_ok=True)
        mdir.chmod(0o755)  # munged refuses a socket directory others can write to
        key = self.root / "munge.key"
        subprocess.run(["dd", "if=/dev/urandom", f"of={key}", "bs=1", "count=1024"],
                       check=True, capture_output=True)
        key.chmod(0o600)
        r = subprocess.run([_which("munged"), f"--socket={self.munge_socket}", f"--key-file={key}",
                            f"--pid-file={self.pid_files['munged']}", f"--log-file={mdir / 'munged.log'}",
                            f"--seed-file={mdir / 'munged.seed'}", "--force"],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise SlurmClusterError(f"munged did not start: {r.stderr.strip()}")
        self.started.append("munged")

    def _write_slurm_conf(self) -> None:
        for d in ("state", "spool", "log"):
            (self.root / d).mkdir(exist_ok=True)
        mem = int(_total_memory_mb() * 0.9)
        self.conf.write_text(f"""\
# One-node test cluster written by tests/integration/slurm_cluster.py
ClusterName=dser-test
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={self.munge_socket},cred_expire=15
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_interval=2,bf_interval=2
SlurmdParameters=config_overrides
ReturnToService=2
MinJobAge=3600
KillWait=10
InactiveLimit=0
StateSaveLocation={self.root / 'state'}
SlurmdSpoolDir={self.root / 'spool'}
SlurmctldPidFile={self.pid_files['slurmctld']}
SlurmdPidFile={self.pid_files['slurmd']}
SlurmctldLogFile={self.root / 'log' / 'slurmctld.log'}
SlurmdLogFile={self.root / 'log' / 'slurmd.log'}
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={mem} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")

    def wait_until_ready(self, timeout: float = 60.0) -> None:
        """Wait until slurmd has registered (not just until the node reads idle)."""
        deadline = time.monotonic() + timeout
        node = {}
        while time.monotonic() < deadline:
            r = self.run(["scontrol", "show", "node", self.node, "-o"], check=False)
            node = parse_scontrol(r.stdout) if r.returncode == 0 else {}
            start = node.get("SlurmdStartTime", "None")
            if node.get("State", "").startswith("IDLE") and "*" not in node.get("State", "") \
                    and start not in ("None", "Unknown", ""):
                return
            time.sleep(0.3)
        raise SlurmClusterError(f"node {self.node} never became ready: {node.get('State')} "
                                f"{node.get('Reason', '')}\n{self.logs()}")

    def stop(self, timeout: float = 60.0) -> None:
        """Cancel every job, then stop the daemons this object started, by their pid files."""
        if "slurmctld" in self.started:
            self.run(["scancel", "--full", "--user", str(os.getuid())], check=False)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                r = self.run(["squeue", "-h", "-o", "%i"], check=False)
                if r.returncode != 0 or not r.stdout.strip():
                    break
                time.sleep(0.5)
        for daemon in ("slurmd", "slurmctld", "munged"):
            if daemon in self.started:
                self._stop_pid(daemon, timeout=20.0)
                self.started.remove(daemon)
        self._kill_leftovers()

    def _kill_leftovers(self) -> None:
        """Kill what the jobs left running once the daemons are gone, and say what it was.

        Linux-process tracking finds a job's processes by their parents: a process whose parent
        died first (a hung DataLoader worker of a killed rank) escapes ``scancel`` and would
        keep whatever it holds, a rendezvous port the next test run's job of the same id needs.
        Job processes are recognised by this cluster's ``SLURM_CONF`` in their environment.
        """
        mark = f"SLURM_CONF={self.conf}".encode()
        for proc in Path("/proc").glob("[0-9]*"):
            pid = int(proc.name)
            try:
                if pid == os.getpid() or mark not in (proc / "environ").read_bytes().split(b"\0"):
                    continue
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:200]
                os.kill(pid, signal.SIGKILL)
            except (OSError, ValueError):  # gone meanwhile, or not ours
                continue
            print(f"slurm_cluster: killed pid {pid} left behind by a job: {cmd}", flush=True)

    def _stop_pid(self, daemon: str, timeout: float) -> None:
        pid_file = self.pid_files[daemon]
        try:
            pid = int(pid_file.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return
        cmdline = Path(f"/proc/{pid}/cmdline")
        # Never signal a recycled pid: only a process that is still this daemon.
        if not cmdline.exists() or daemon not in cmdline.read_bytes().decode(errors="replace"):
            return
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and cmdline.exists():
            time.sleep(0.1)
        if cmdline.exists():
            os.kill(pid, signal.SIGKILL)

    # -- asking the cluster ----------------------------------------------------------------

    def env(self, base: dict | None = None) -> dict:
        """An environment whose Slurm commands talk to this cluster."""
        env = dict(os.environ if base is None else base)
        env["SLURM_CONF"] = str(self.conf)
        env["PATH"] = env.get("PATH", "") + os.pathsep + os.pathsep.join(SBIN)
        return env

    def run(self, cmd: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
        """A Slurm client command against this cluster (text output captured)."""
        kw.setdefault("env", self.env())
        r = subprocess.run(cmd, capture_output=True, text=True, **kw)
        if check and r.returncode != 0:
            raise SlurmClusterError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()}")
        return r

    def sbatch(self, args: list[str], wait: bool = False, **kw) -> str:
        """Submit a batch job; returns its id (``wait``: return when it has ended)."""
        cmd = ["sbatch", "--parsable", *(["--wait"] if wait else []), *args]
        r = self.run(cmd, check=False, **kw)
        if r.returncode != 0 and not (wait and r.stdout.strip()):
            raise SlurmClusterError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()}")
        return r.stdout.strip().splitlines()[0].split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` of one job as a dict (JobState, ExitCode, StartTime, …)."""
        r = self.run(["scontrol", "show", "job", "-o", str(job_id)])
        return parse_scontrol(r.stdout.splitlines()[0])

    def jobs(self) -> list[dict[str, str]]:
        """Every job the controller still knows about."""
        r = self.run(["scontrol", "show", "job", "-o"], check=False)
        return [parse_scontrol(line) for line in r.stdout.splitlines() if line.startswith("JobId=")]

    def wait_for(self, job_ids: list[str], timeout: float) -> dict[str, dict[str, str]]:
        """Wait until every job has ended (or is pending on a dependency that can never be met).

        Returns:
            job id → its ``scontrol show job`` dict.
        """
        deadline = time.monotonic() + timeout
        while True:
            info = {j: self.job(j) for j in job_ids}
            if all(_finished(i) for i in info.values()):
                return info
            if time.monotonic() > deadline:
                states = ", ".join(f"{j}:{i.get('JobState')}({i.get('Reason')})" for j, i in info.items())
                raise SlurmClusterError(f"jobs still running after {timeout:.0f} s: {states}")
            time.sleep(1.0)

    def logs(self, lines: int = 30) -> str:
        """The tails of the daemons' logs (for failure messages)."""
        out = []
        for f in (self.root / "log" / "slurmctld.log", self.root / "log" / "slurmd.log",
                  self.munge_socket.parent / "munged.log"):
            if f.is_file():
                out.append(f"--- {f}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(out)


@pytest.fixture(scope="session")
def slurm(tmp_path_factory) -> SlurmCluster:
    """A running one-node Slurm cluster for the whole test session, stopped at its end.

    Use it from a test module with ``from slurm_cluster import slurm  # noqa: F401`` (the fixture).
    """
    with SlurmCluster(tmp_path_factory.mktemp("slurm")) as cluster:
        yield cluster


FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED"}


def _finished(info: dict[str, str]) -> bool:
    state = info.get("JobState", "")
    return state in FINAL_STATES or (state == "PENDING" and info.get("Reason") == "DependencyNeverSatisfied")
