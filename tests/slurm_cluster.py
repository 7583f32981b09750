"""A one-host Slurm cluster on loopback for the tests: munged, slurmctld and slurmd from Debian's packages
(slurmctld, slurmd, slurm-client, munge), each with its own key, sockets, ports, state and spool folders
under a temp folder, two stand-in GPUs as a GRES (device files /dev/null and /dev/zero: slurmd refuses a
count-only gpu GRES), stopped by pid."""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")


def missing() -> list[str]:
    return [d for d in (*DAEMONS, "sbatch", "squeue", "scontrol", "scancel", "sinfo")
            if shutil.which(d) is None and not Path("/usr/sbin", d).exists()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _exe(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


class SlurmCluster:
    def __init__(self, root: Path, gpus: int = 2) -> None:
        self.root = root
        self.conf = root / "slurm.conf"
        self.procs: list[subprocess.Popen] = []
        user = getpass.getuser()
        for sub in ("state", "spool", "log"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        key = root / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self.munge_socket = root / "munge.sock"
        devices = ",".join(["/dev/null", "/dev/zero"][:gpus])
        self.conf.write_text("\n".join([
            "ClusterName=fleetdeck-test", "SlurmctldHost=localhost(127.0.0.1)",
            f"SlurmctldPort={_free_port()}", f"SlurmdPort={_free_port()}",
            "AuthType=auth/munge", f"AuthInfo=socket={self.munge_socket}", "CredType=cred/munge",
            f"SlurmUser={user}", f"SlurmdUser={user}",
            f"StateSaveLocation={root / 'state'}", f"SlurmdSpoolDir={root / 'spool'}",
            f"SlurmctldPidFile={root / 'slurmctld.pid'}", f"SlurmdPidFile={root / 'slurmd.pid'}",
            f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}", f"SlurmdLogFile={root / 'log' / 'slurmd.log'}",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "MpiDefault=none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core", "GresTypes=gpu",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none", "SchedulerType=sched/backfill", "SchedulerParameters=sched_interval=1",
            "ReturnToService=2", "MinJobAge=600", "KillWait=5", "InactiveLimit=0",
            f"NodeName=fdnode NodeHostname={socket.gethostname()} NodeAddr=127.0.0.1 CPUs=2 RealMemory=1000 "
            f"Gres=gpu:{gpus} State=UNKNOWN",
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
            "PartitionName=gpu Nodes=ALL MaxTime=INFINITE State=UP",
        ]) + "\n")
        (root / "gres.conf").write_text(f"NodeName=fdnode Name=gpu File={devices}\n")

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def _start(self, argv: list[str], log: str) -> None:
        out = open(self.root / "log" / log, "ab")
        self.procs.append(subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                           start_new_session=True))

    def start(self, timeout: float = 60) -> "SlurmCluster":
        r = self.root
        self._start([_exe("munged"), "-F", "-f", f"--socket={self.munge_socket}", f"--key-file={r / 'munge.key'}",
                     f"--log-file={r / 'log' / 'munged.log'}", f"--pid-file={r / 'munged.pid'}",
                     f"--seed-file={r / 'munged.seed'}"], "munged.out")
        self._wait(lambda: self.munge_socket.exists(), timeout, "munged")
        self._start([_exe("slurmctld"), "-D", "-i", "-f", str(self.conf)], "slurmctld.out")
        self._start([_exe("slurmd"), "-D", "-N", "fdnode", "-f", str(self.conf)], "slurmd.out")
        self._wait(lambda: self.sinfo_state() in ("idle", "mixed", "allocated"), timeout, "slurmd registering")
        return self

    def sinfo_state(self) -> str:
        p = subprocess.run([_exe("sinfo"), "-h", "-N", "-o", "%T"], capture_output=True, text=True, env=self.env)
        return p.stdout.strip().splitlines()[0] if p.returncode == 0 and p.stdout.strip() else ""

    def _wait(self, cond, timeout: float, what: str) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if cond():
                return
            if any(p.poll() is not None for p in self.procs):
                break
            time.sleep(0.3)
        logs = "\n".join(f"--- {f.name}\n{f.read_text(errors='replace')[-1500:]}"
                         for f in sorted((self.root / "log").iterdir()))
        self.stop()
        raise RuntimeError(f"the test Slurm cluster did not come up ({what}):\n{logs}")

    def sbatch(self, *args: str) -> str:
        p = subprocess.run([_exe("sbatch"), "--parsable", *args], capture_output=True, text=True, env=self.env, check=True)
        return p.stdout.strip().split(";")[0]

    def stop(self) -> None:
        # Every job first, and wait for Slurm to reap them: a slurmstepd outlives a stopped slurmd.
        if self.procs and all(p.poll() is None for p in self.procs):
            subprocess.run([_exe("scancel"), f"--user={getpass.getuser()}"], env=self.env, capture_output=True)
            deadline = time.time() + 30
            while time.time() < deadline:
                q = subprocess.run([_exe("squeue"), "-h"], env=self.env, capture_output=True, text=True)
                if q.returncode != 0 or not q.stdout.strip():
                    break
                time.sleep(0.3)
        for p in reversed(self.procs):  # slurmd, slurmctld, munged: each by its own pid
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(self.procs):
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)
        self.procs.clear()
