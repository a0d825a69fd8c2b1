#!/usr/bin/env python3
r"""A one-node SLURM cluster on this machine, for the tests and for trying ``scripts/slurm/*.sbatch`` locally.

    python scripts/slurm/local_cluster.py up        # installs slurm-wlm + munge with apt-get when missing (root)
    eval "$(python scripts/slurm/local_cluster.py env)"
    sbatch --ntasks-per-node=2 --gres=none --cpus-per-task=1 scripts/slurm/fit.sbatch \
        --config configs/demo/classification.yaml --trainer.accelerator=cpu
    python scripts/slurm/local_cluster.py status
    python scripts/slurm/local_cluster.py down      # stops the daemons by their pids, removes the folder

Everything lives in one folder (``--dir``, default ``$SWIN_SLURM_DIR`` or ``<tmp>/swin-slurm-<uid>``): a fresh
munge key and socket, ``slurm.conf`` for this host on 127.0.0.1 (free ports, no cgroups, no accounting), state,
spool, logs and the daemons' pids. Nothing under /etc is touched; clients find the cluster through ``SLURM_CONF``.
Standard library only, so the system python runs it too.
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
COMMANDS = (*DAEMONS, "sbatch", "srun", "scontrol", "squeue", "sinfo", "scancel")
PACKAGES = ("slurm-wlm", "munge")


class InstallError(RuntimeError):
    """apt-get could not install SLURM and munge."""


def default_dir() -> Path:
    return Path(os.environ.get("SWIN_SLURM_DIR") or Path(tempfile.gettempdir()) / f"swin-slurm-{os.getuid()}")


def which(name: str) -> str | None:
    """``name`` on the PATH or in /usr/sbin, /sbin (where Debian puts the daemons; not on a user's PATH)."""
    return shutil.which(name, path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin")


def missing_commands() -> list[str]:
    return [c for c in COMMANDS if which(c) is None]


def ensure_installed() -> None:
    """Install Debian's slurm-wlm and munge with apt-get (as root, or through passwordless sudo) when missing."""
    missing = missing_commands()
    if not missing:
        return
    apt = shutil.which("apt-get")
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    usable = apt is not None and (not sudo or subprocess.run([*sudo, "true"], capture_output=True).returncode == 0)
    if not usable:
        raise InstallError(f"{', '.join(missing)} missing, and apt-get is not usable here (needs root or sudo -n)")
    for cmd in ([apt, "update", "-qq"], [apt, "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]):
        proc = subprocess.run([*sudo, "env", "DEBIAN_FRONTEND=noninteractive", *cmd], capture_output=True, text=True)
        if proc.returncode != 0:
            output = proc.stdout[-2000:] + proc.stderr[-2000:]
            raise InstallError(f"`{' '.join(cmd)}` failed ({proc.returncode}):\n{output}")
    if missing := missing_commands():
        raise InstallError(f"apt-get installed {' '.join(PACKAGES)}, but {', '.join(missing)} is still missing")


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def slurm_conf(root: Path, host: str, user: str, cpus: int, ports: Sequence[int]) -> str:
    """slurm.conf: controller on ``host`` at 127.0.0.1, one node ``localhost`` (so that jobs' SLURM_NODELIST, and
    Lightning's MASTER_ADDR taken from it, resolve anywhere) with ``cpus`` CPUs, every file under ``root``."""
    return f"""\
ClusterName=swinlocal
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ports[0]}
SlurmdPort={ports[1]}
SlurmUser={user}
SlurmdUser={user}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket,cred_expire=10
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
KillWait=5
MinJobAge=300
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
MessageTimeout=20
NodeName=localhost NodeAddr=127.0.0.1 NodeHostname={host} CPUs={cpus} State=UNKNOWN
PartitionName=local Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
"""


def read_pids(root: Path) -> dict[str, int]:
    path = root / "pids.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.is_file() and stat.read_text().rsplit(")", 1)[-1].split()[0] == "Z")


def client_env(root: Path) -> dict[str, str]:
    return {**os.environ, "SLURM_CONF": str(root / "slurm.conf")}


def _start(name: str, cmd: list[str], root: Path) -> int:
    """Start a daemon in the foreground of its own session, its output in log/NAME.out; record its pid."""
    with open(root / "log" / f"{name}.out", "ab") as log:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=client_env(root),
            start_new_session=True,  # down() stops it, and what it left in its session, by this pid
        )
    pids = read_pids(root)
    pids[name] = proc.pid
    (root / "pids.json").write_text(json.dumps(pids))
    return proc.pid


def _wait(what: str, check, timeout: float, root: Path) -> None:
    """Poll ``check`` until it holds; on timeout or a daemon's exit, raise with the tails of the logs."""
    deadline = time.monotonic() + timeout
    while not check():
        dead = [name for name, pid in read_pids(root).items() if not alive(pid)]
        if dead or time.monotonic() > deadline:
            why = f"{', '.join(dead)} exited" if dead else f"not within {timeout:.0f} s"
            logs = "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted((root / "log").glob("*")))
            raise RuntimeError(f"local SLURM cluster: no {what} ({why})\n{logs}")
        time.sleep(0.2)


def node_state(root: Path) -> str:
    sinfo = [which("sinfo"), "-h", "-N", "-o", "%T"]
    proc = subprocess.run(sinfo, env=client_env(root), capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else ""


def up(root: Path, cpus: int | None = None, timeout: float = 60.0) -> Path:
    """Install when needed, write the config, start munged, slurmctld and slurmd; return the slurm.conf path."""
    ensure_installed()
    if any(alive(pid) for pid in read_pids(root).values()):
        raise RuntimeError(f"a local SLURM cluster is already running from {root}; run `down` first")
    host = socket.gethostname().split(".")[0]
    cpus = cpus or max(2, os.cpu_count() or 1)
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    for sub in ("munge", "state", "spool", "run", "log"):
        (root / sub).mkdir(mode=0o700, exist_ok=True)
    key = root / "munge" / "munge.key"
    if not key.exists():
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
    conf = root / "slurm.conf"
    conf.write_text(slurm_conf(root, host, pwd.getpwuid(os.getuid()).pw_name, cpus, free_ports(2)))

    munge = root / "munge"
    _start(
        "munged",
        [which("munged"), "--foreground", "--force", f"--key-file={key}", f"--socket={munge}/munge.socket",
         f"--pid-file={munge}/munged.pid", f"--log-file={root}/log/munged.log", f"--seed-file={munge}/munged.seed"],
        root,
    )
    _wait("munge socket", (munge / "munge.socket").exists, timeout, root)
    _start("slurmctld", [which("slurmctld"), "-D", "-c", "-f", str(conf)], root)
    _wait("answer from slurmctld", lambda: node_state(root) != "", timeout, root)
    _start("slurmd", [which("slurmd"), "-D", "-f", str(conf), "-N", "localhost"], root)
    _wait("idle node", lambda: node_state(root) == "idle", timeout, root)
    return conf


def _session_members(sid: int) -> list[int]:
    """Processes in session ``sid``: a daemon started by ``_start`` and whatever it forked without a new session."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[-1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:
            members.append(int(stat.parent.name))
    return members


def down(root: Path, timeout: float = 30.0) -> None:
    """Cancel all jobs and wait for them (their slurmstepd processes end with them), stop slurmd, slurmctld and
    munged by their pids (with anything left in their sessions), remove ``root``."""
    pids = read_pids(root)
    if pids.get("slurmctld") and alive(pids["slurmctld"]):
        env = client_env(root)
        subprocess.run([which("scancel"), "--full", "--user", str(os.getuid())], env=env, capture_output=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            squeue = [which("squeue"), "-h", "-t", "all", "-o", "%T"]
            q = subprocess.run(squeue, env=env, capture_output=True, text=True)
            if q.returncode != 0 or not set(q.stdout.split()) & {"RUNNING", "COMPLETING", "PENDING", "CONFIGURING"}:
                break
            time.sleep(0.5)
    for name in reversed(DAEMONS):
        pid = pids.get(name)
        if not pid or not alive(pid):
            continue
        group = _session_members(pid)
        for p in group:
            _signal(p, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while any(alive(p) for p in group) and time.monotonic() < deadline:
            time.sleep(0.2)
        for p in group:
            if alive(p):
                _signal(p, signal.SIGKILL)
        for p in group:
            _reap(p)
    shutil.rmtree(root, ignore_errors=True)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def status(root: Path) -> dict[str, object]:
    pids = read_pids(root)
    return {
        "dir": str(root),
        "slurm_conf": str(root / "slurm.conf"),
        "daemons": {name: {"pid": pid, "alive": alive(pid)} for name, pid in pids.items()},
        "node": node_state(root) if pids else "",
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("up", "down", "status", "env", "install"))
    parser.add_argument("--dir", type=Path, default=default_dir(), help="folder for config, state, logs, pids")
    parser.add_argument("--cpus", type=int, default=None, help="CPUs of the node (default: this machine's, at least 2)")
    args = parser.parse_args(argv)
    root = args.dir.resolve()
    try:
        if args.command == "install":
            ensure_installed()
        elif args.command == "up":
            conf = up(root, args.cpus)
            print(f"local SLURM cluster up; run: export SLURM_CONF={conf}", file=sys.stderr)
        elif args.command == "down":
            down(root)
        elif args.command == "status":
            info = status(root)
            print(json.dumps(info, indent=2))
            return 0 if info["daemons"] and all(d["alive"] for d in info["daemons"].values()) else 1
        else:
            print(f"export SLURM_CONF={root / 'slurm.conf'}")
    except InstallError as err:
        print(f"cannot install SLURM: {err}", file=sys.stderr)
        return 3
    except RuntimeError as err:
        print(err, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
