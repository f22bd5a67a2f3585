"""Horovod (Gloo) ranks under Slurm: run inside the batch script, ranks started by srun.

    python -m providers.slurm.launch [--iface IF] -- python -m gan.train ...

The batch step starts Horovod's own rendezvous server (horovod.runner.http.http_server.RendezvousServer)
with Horovod's host assignment for the job's nodes and tasks per node, then ``srun`` starts one task per
rank; each task (``--rank`` mode) takes its slot (rank, local and cross rank, hostname) from that same
assignment and execs the trainer with the environment horovodrun would give it. Horovod does the rest.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys


def tasks_per_node(spec):
    """Slurm's compressed counts, e.g. "2(x3),1" -> [2, 2, 2, 1]."""
    out = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            raise ValueError(f"unexpected SLURM_TASKS_PER_NODE {spec!r}")
        out += [int(m.group(1))] * int(m.group(2) or 1)
    return out


def assignment():
    """Horovod's slot list for this job: [{hostname, rank, local_rank, local_size, cross_rank, cross_size, size}]."""
    from horovod.runner.common.util.hosts import get_host_assignments, parse_hosts

    nodes = subprocess.run(["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]], capture_output=True,
                           text=True, check=True).stdout.split()
    counts = tasks_per_node(os.environ["SLURM_TASKS_PER_NODE"])
    ntasks = int(os.environ.get("SLURM_NTASKS") or sum(counts))
    hosts = ",".join(f"{n}:{k}" for n, k in zip(nodes, counts))
    return [dict(hostname=s.hostname, rank=s.rank, local_rank=s.local_rank, local_size=s.local_size,
                 cross_rank=s.cross_rank, cross_size=s.cross_size, size=s.size)
            for s in get_host_assignments(parse_hosts(hosts), ntasks)]


def default_iface():
    """The interface holding the address this node's hostname resolves to (lo on a one-machine lab)."""
    import psutil

    addr = socket.gethostbyname(socket.gethostname())
    for name, addrs in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == addr for a in addrs):
            return name
    raise SystemExit(f"providers.slurm.launch: no interface holds {addr}; pass --iface")


def iface_address(iface):
    import psutil

    for a in psutil.net_if_addrs().get(iface, []):
        if a.family == socket.AF_INET:
            return a.address
    raise SystemExit(f"providers.slurm.launch: interface {iface!r} has no IPv4 address on {socket.gethostname()}")


def batch(args):
    from horovod.runner.common.util.hosts import SlotInfo
    from horovod.runner.http.http_server import RendezvousServer

    slots = assignment()
    iface = args.iface or default_iface()
    server = RendezvousServer(verbose=0)
    port = server.start()
    server.init([SlotInfo(**s) for s in slots])
    env = {**os.environ, "HOROVOD_GLOO_RENDEZVOUS_ADDR": iface_address(iface),
           "HOROVOD_GLOO_RENDEZVOUS_PORT": str(port), "HOROVOD_CONTROLLER": "gloo", "HOROVOD_CPU_OPERATIONS": "gloo",
           "HOROVOD_GLOO_IFACE": iface, "NCCL_SOCKET_IFNAME": iface, "PYTHONUNBUFFERED": "1",
           "CLOUDBENCH_SLOTS": json.dumps(slots)}
    cmd = ["srun", "--ntasks", str(len(slots)), "--distribution", "block", "--kill-on-bad-exit=1", "--export=ALL",
           sys.executable, "-m", "providers.slurm.launch", "--rank", "--", *args.command]
    print(f"providers.slurm.launch: {len(slots)} ranks on {sorted({s['hostname'] for s in slots})}, rendezvous "
          f"{env['HOROVOD_GLOO_RENDEZVOUS_ADDR']}:{port} ({iface})", flush=True)
    try:
        return subprocess.run(cmd, env=env).returncode
    finally:
        server.stop()


def rank(args):
    slots = json.loads(os.environ["CLOUDBENCH_SLOTS"])
    s = slots[int(os.environ["SLURM_PROCID"])]
    node = os.environ.get("SLURMD_NODENAME", socket.gethostname())
    if s["hostname"] != node:
        raise SystemExit(f"providers.slurm.launch: rank {s['rank']} landed on {node}, Horovod expects {s['hostname']}")
    env = {**os.environ, "HOROVOD_HOSTNAME": s["hostname"], "HOROVOD_RANK": str(s["rank"]),
           "HOROVOD_SIZE": str(s["size"]), "HOROVOD_LOCAL_RANK": str(s["local_rank"]),
           "HOROVOD_LOCAL_SIZE": str(s["local_size"]), "HOROVOD_CROSS_RANK": str(s["cross_rank"]),
           "HOROVOD_CROSS_SIZE": str(s["cross_size"]), "CLOUDBENCH_NODE_NAME": node}
    env.pop("CLOUDBENCH_SLOTS", None)
    os.execvpe(args.command[0], args.command, env)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m providers.slurm.launch", description=__doc__.split("\n\n")[0])
    ap.add_argument("--iface", help="network interface the ranks talk over (default: the hostname's)")
    ap.add_argument("--rank", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("command", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    if args.command[:1] == ["--"]:
        args.command = args.command[1:]
    if not args.command:
        ap.error("expected the command to run after --")
    return rank(args) if args.rank else batch(args)


if __name__ == "__main__":
    sys.exit(main())
