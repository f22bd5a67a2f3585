"""A real Slurm cluster on this machine: slurmctld and N slurmd "nodes" (Debian slurm-wlm, needs root).

    python -m harness.lab.slurm up [--nodes 2] [--cpus 1] [--name cb]   # prints {"conf": ..., "partition": ...}
    python -m harness.lab.slurm down [--name cb]

Each node is its own slurmd (``NodeName=<name>[1-N]``, all on 127.0.0.1 with their own ports, the way
Debian's multiple-slurmd build allows) pinned to its own cores, so ranks on different nodes do not share
a core while there are enough. Point the slurm commands (and the slurm provider's ``slurm_conf`` option)
at the printed slurm.conf. munged is started when none runs and stopped again by ``down``. State lives in
/run/cloudbench-slurm/<name>/; ``down`` is safe to repeat.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import zlib
from pathlib import Path

from providers.errors import CloudbenchError

STATE_ROOT = Path(os.environ.get("CLOUDBENCH_SLURM_DIR", "/run/cloudbench-slurm"))
MUNGE_SOCKET = Path("/run/munge/munge.socket.2")


class SlurmLabError(CloudbenchError):
    pass


def _ports(name):
    base = 17000 + 20 * (zlib.crc32(name.encode()) % 100)  # controller, then one per node
    return base, base + 1


def _write_conf(d, name, nodes, cpus):
    ctl_port, node_port = _ports(name)
    host = socket.gethostname().split(".")[0]
    lines = [
        f"ClusterName=cb{name}", f"SlurmctldHost={host}(127.0.0.1)", f"SlurmctldPort={ctl_port}",
        "SlurmUser=root", "SlurmdUser=root", f"StateSaveLocation={d}/state", f"SlurmdSpoolDir={d}/spool-%n",
        f"SlurmctldPidFile={d}/slurmctld.pid", f"SlurmdPidFile={d}/slurmd-%n.pid",
        f"SlurmctldLogFile={d}/slurmctld.log", f"SlurmdLogFile={d}/slurmd-%n.log",
        "AuthType=auth/munge", "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
        "AccountingStorageType=accounting_storage/none", "JobAcctGatherType=jobacct_gather/none",
        "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core", "ReturnToService=2", "MpiDefault=none",
        "SchedulerType=sched/backfill", "InactiveLimit=0", "KillWait=5", "MinJobAge=600", "SlurmdTimeout=60",
        f"NodeName={name}[1-{nodes}] NodeHostname={host} NodeAddr=127.0.0.1 Port={node_port}-{node_port + nodes - 1} "
        f"CPUs={cpus} State=UNKNOWN",
        f"PartitionName={name} Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
    ]
    conf = d / "slurm.conf"
    conf.write_text("\n".join(lines) + "\n")
    return conf


def _env(conf):
    return {**os.environ, "SLURM_CONF": str(conf)}


def up(nodes=2, cpus=None, name="cb"):
    if os.geteuid() != 0:
        raise SlurmLabError("the Slurm lab needs root (slurmd runs jobs as any user)")
    for tool in ("slurmctld", "slurmd", "munged", "sinfo"):
        if not shutil.which(tool) and not os.access(f"/usr/sbin/{tool}", os.X_OK):
            raise SlurmLabError(f"the Slurm lab needs `{tool}` (apt-get install slurm-wlm)")
    if not re.fullmatch(r"[a-z]{1,6}", name):
        raise SlurmLabError(f"invalid name {name!r} (expected 1-6 lower-case letters)")
    d = STATE_ROOT / name
    if (d / "state.json").exists():
        raise SlurmLabError(f"Slurm lab {name!r} is already up; `python -m harness.lab.slurm down --name {name}`")
    cores = sorted(os.sched_getaffinity(0))
    cpus = cpus or max(1, len(cores) // nodes)
    d.mkdir(parents=True, exist_ok=True)
    (d / "state").mkdir(exist_ok=True)
    state = {"name": name, "dir": str(d), "pids": [], "munged": None, "partition": name,
             "nodes": [f"{name}{i}" for i in range(1, nodes + 1)]}
    try:
        if not MUNGE_SOCKET.exists():
            Path("/run/munge").mkdir(exist_ok=True)
            shutil.chown("/run/munge", "munge", "munge")
            subprocess.run(["su", "-s", "/bin/sh", "munge", "-c", "/usr/sbin/munged"], check=True,
                           capture_output=True)
            state["munged"] = int(Path("/run/munge/munged.pid").read_text())
        conf = _write_conf(d, name, nodes, cpus)
        state["conf"] = str(conf)
        env = _env(conf)
        log = open(d / "daemons.log", "ab")
        state["pids"].append(subprocess.Popen(["slurmctld", "-D", "-i", "-f", str(conf)], env=env, stdout=log,
                                              stderr=log, start_new_session=True).pid)
        for i, node in enumerate(state["nodes"]):
            mine = ",".join(str(cores[(i * cpus + j) % len(cores)]) for j in range(cpus))
            (d / f"spool-{node}").mkdir(exist_ok=True)
            state["pids"].append(subprocess.Popen(["taskset", "-c", mine, "slurmd", "-D", "-N", node, "-f", str(conf)],
                                                  env=env, stdout=log, stderr=log, start_new_session=True).pid)
        (d / "state.json").write_text(json.dumps(state))
        deadline = time.monotonic() + 60
        while True:
            p = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=env, capture_output=True, text=True)
            states = dict(line.split() for line in p.stdout.splitlines() if line.strip())
            if len(states) == nodes and all(s == "idle" for s in states.values()):
                break
            if time.monotonic() > deadline:
                raise SlurmLabError(f"Slurm nodes did not become idle: {states or p.stderr.strip()}; "
                                    f"see {d}/slurmctld.log")
            time.sleep(0.3)
    except BaseException:
        _stop(state)
        shutil.rmtree(d, ignore_errors=True)
        raise
    return status(name)


def _stop(state):
    env = _env(state.get("conf", "/nonexistent"))
    if state.get("conf"):
        subprocess.run(["scancel", "--full", "--partition", state["partition"]], env=env, capture_output=True)
    for pid in reversed(state.get("pids", [])):
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
    deadline = time.monotonic() + 10
    for pid in state.get("pids", []):
        while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
            time.sleep(0.05)
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if state.get("munged"):
        try:
            os.kill(state["munged"], signal.SIGTERM)
        except ProcessLookupError:
            pass


def down(name="cb"):
    d = STATE_ROOT / name
    try:
        state = json.loads((d / "state.json").read_text())
    except FileNotFoundError:
        shutil.rmtree(d, ignore_errors=True)
        return {"name": name, "removed": False}
    _stop(state)
    shutil.rmtree(d, ignore_errors=True)
    return {"name": name, "removed": True}


def status(name="cb"):
    d = STATE_ROOT / name
    try:
        state = json.loads((d / "state.json").read_text())
    except FileNotFoundError:
        return {"name": name, "up": False}
    return {"name": name, "up": True, "conf": state["conf"], "partition": state["partition"],
            "nodes": state["nodes"], "env": {"SLURM_CONF": state["conf"]}}


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m harness.lab.slurm", description=__doc__.split("\n\n")[0])
    ap.add_argument("action", choices=("up", "down", "status"))
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--cpus", type=int, default=None, help="CPUs per node (default: cores / nodes)")
    ap.add_argument("--name", default="cb")
    args = ap.parse_args(argv)
    try:
        out = up(args.nodes, args.cpus, args.name) if args.action == "up" else \
            down(args.name) if args.action == "down" else status(args.name)
    except CloudbenchError as e:
        print(f"harness.lab.slurm: error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
