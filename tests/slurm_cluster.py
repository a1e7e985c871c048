"""A single-node SLURM cluster for the tests: munged, slurmctld and slurmd from Debian's
``slurm-wlm`` and ``munge``, owned by the test session.

Everything (slurm.conf, keys, state, logs, the job completion log) lives under one
directory. The daemons run as the current user, on free ports, so they touch no system
SLURM. ``python -m tests.slurm_cluster DIR`` starts one by hand (the README's commands
were run against it); stop it with Ctrl-C.
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil

DAEMONS = ("munged", "slurmctld", "slurmd")
PARTITION = "debug"  # the sweeps' partition; preemptible by `urgent`


def missing_binaries() -> list[str]:
    return [name for name in (*DAEMONS, "sbatch", "squeue", "scontrol", "sinfo") if shutil.which(name) is None]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SlurmCluster:
    """Start with `start()`, stop with `stop()`; `env` is what a client command needs."""

    def __init__(self, root: Path, cpus: int = 2, memory_mb: int = 4000) -> None:
        self.root = Path(root)
        self.node = socket.gethostname().split(".")[0]
        self.cpus, self.memory_mb = cpus, memory_mb
        self.conf = self.root / "slurm.conf"
        self.jobcomp_log = self.root / "jobcomp.log"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.processes: dict[str, subprocess.Popen] = {}
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def write_config(self) -> None:
        user = getpass.getuser()
        for sub in ("munge", "ctld", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        (self.root / "munge").chmod(0o700)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        r = self.root
        self.conf.write_text(f"""\
ClusterName=xmodaltest
SlurmctldHost={self.node}(127.0.0.1)
SlurmUser={user}
SlurmdUser={user}
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
CredType=cred/munge
# a requeued job waits cred_expire seconds before it starts again (default 120)
AuthInfo=socket={self.munge_socket},cred_expire=5
StateSaveLocation={r}/ctld
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
# no slurmdbd here, so no sacct: finished jobs go to the job completion log
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc={self.jobcomp_log}
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# a node set down stays down until `scontrol update state=resume`
ReturnToService=1
KillWait=5
MinJobAge=600
SlurmdTimeout=30
InactiveLimit=0
# a job exiting with 75 (EX_TEMPFAIL) is requeued by SLURM itself
RequeueExit=75
JobRequeue=1
# `urgent` preempts `debug`: the preempted task gets the user signal (USR2, submitit's checkpoint), then is requeued
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={self.memory_mb} State=UNKNOWN
PartitionName={PARTITION} Nodes={self.node} Default=YES MaxTime=60 State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=10
PartitionName=urgent Nodes={self.node} MaxTime=60 State=UP PriorityTier=2 PreemptMode=OFF
""")

    def start(self, timeout_s: float = 60) -> None:
        self.write_config()
        r = self.root
        self._spawn(
            "munged",
            [
                "munged",
                "--foreground",
                "--force",
                f"--socket={self.munge_socket}",
                f"--key-file={r}/munge/munge.key",
                f"--pid-file={r}/munge/munged.pid",
                f"--log-file={r}/log/munged.log",
                f"--seed-file={r}/munge/munged.seed",
            ],
        )
        self._wait_for(lambda: self.munge_socket.exists(), timeout_s, "munged's socket")
        self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
        self._spawn("slurmd", ["slurmd", "-D", "-f", str(self.conf), "-N", self.node])
        self._wait_for(lambda: self.sinfo_state() == "idle", timeout_s, f"node {self.node} idle in sinfo")

    def _spawn(self, name: str, args: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.stdout", "ab")
        proc = subprocess.Popen(args, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.processes[name] = proc

    def _wait_for(self, ready, timeout_s: float, what: str) -> None:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            dead = [name for name, proc in self.processes.items() if proc.poll() is not None]
            if dead:
                raise RuntimeError(f"{', '.join(dead)} exited while waiting for {what}:\n{self.logs_tail()}")
            if ready():
                return
            time.sleep(0.2)
        raise RuntimeError(f"timed out after {timeout_s:.0f} s waiting for {what}:\n{self.logs_tail()}")

    def logs_tail(self, lines: int = 15) -> str:
        return "\n".join(f"--- {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-lines:]) for p in sorted((self.root / "log").glob("*")))

    def run(self, *args: str, check: bool = True) -> str:
        """A SLURM client command (squeue, scontrol, ...) against this cluster; its stdout."""
        proc = subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=60)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc.stdout

    def sinfo_state(self) -> str:
        proc = subprocess.run(["sinfo", "-h", "-n", self.node, "-o", "%T"], env=self.env, capture_output=True, text=True, timeout=30)
        return proc.stdout.strip().splitlines()[0] if proc.returncode == 0 and proc.stdout.strip() else ""

    def jobcomp_lines(self) -> list[str]:
        return self.jobcomp_log.read_text().splitlines() if self.jobcomp_log.exists() else []

    def job_processes(self) -> list[psutil.Process]:
        """Processes of this cluster's jobs: those whose environment names its slurm.conf (jobs
        inherit it from the submitting process), the slurmstepd above them, and any slurmstepd
        with a socket in this cluster's spool folder."""
        found: dict[int, psutil.Process] = {}
        for proc in psutil.process_iter():
            try:
                if proc.name().startswith("slurmstepd") and any(str(c.laddr).startswith(str(self.root)) for c in proc.net_connections(kind="unix")):
                    found[proc.pid] = proc
                elif proc.pid != os.getpid() and proc.environ().get("SLURM_CONF") == str(self.conf):
                    found[proc.pid] = proc
                    parent = proc.parent()
                    if parent is not None and parent.name().startswith("slurmstepd"):
                        found[parent.pid] = parent
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        return [p for pid, p in found.items() if pid not in {d.pid for d in self.processes.values()}]

    def stop(self) -> list[str]:
        """Stop the jobs, then the daemons (slurmd, slurmctld, munged), by their pids; what is left running."""
        for proc in self.job_processes():  # slurmstepd leaves slurmd's tree: its jobs would outlive the daemons
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        for name in reversed(DAEMONS):
            proc = self.processes.get(name)
            if proc is None or proc.poll() is not None:
                continue
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        left = [f"{name} (pid {proc.pid})" for name, proc in self.processes.items() if _alive(proc.pid)]
        return left + [f"{p.name()} (pid {p.pid})" for p in self.job_processes() if _alive(p.pid)]


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


if __name__ == "__main__":
    import sys

    cluster = SlurmCluster(Path(sys.argv[1]).resolve())
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop the daemons on TERM as on Ctrl-C
    cluster.start()
    print(f"export SLURM_CONF={cluster.conf}", flush=True)
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        print("left running:", cluster.stop() or "none")
