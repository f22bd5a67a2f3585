"""The lab: N hosts on this machine as network namespaces on a bridge, each with its own sshd.

    cloudbench lab up --hosts 2 [--bandwidth 1gbit] [--name lab]
    cloudbench lab status [--name lab] [--json]
    cloudbench lab down [--name lab]

Host i of lab <name> is namespace ``cbl-<name>-<i>`` with address 10.213.<k>.<10+i>/24 on bridge
``cbl-<name>`` (10.213.<k>.1 in the root namespace), an optional egress rate limit (tc tbf on its link),
its own hostname (``<name>-h<i>``, a UTS namespace) and /etc/hosts (a private mount namespace), its own
cores (CPU affinity; shared round-robin once hosts x slots exceeds this machine's cores), and its own
sshd (key-only, a lab key pair, host keys listed in the lab's known_hosts). The lab writes an inventory
YAML for the ssh provider (with its leases and scratch inside the lab's state directory). State lives in
/run/cloudbench-lab/<name>/. A failed ``up`` undoes what it did; ``down`` removes everything (leases
included) and is safe to repeat. The lab only uses addresses it created.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
import zlib
from pathlib import Path

from harness.errors import CloudbenchError

STATE_ROOT = Path(os.environ.get("CLOUDBENCH_LAB_DIR", "/run/cloudbench-lab"))
SSHD = "/usr/sbin/sshd"
RATE = re.compile(r"^\d+(\.\d+)?(bit|kbit|mbit|gbit|tbit)$")


class LabError(CloudbenchError):
    pass


def _run(*cmd, check=True, ns=None):
    full = (["ip", "netns", "exec", ns] if ns else []) + [str(c) for c in cmd]
    p = subprocess.run(full, capture_output=True, text=True)
    if check and p.returncode != 0:
        raise LabError(f"`{' '.join(full)}` failed: {p.stderr.strip() or p.stdout.strip()}")
    return p


def _names(name, n):
    if not re.fullmatch(r"[a-z0-9]{1,6}", name):
        raise LabError(f"invalid lab name {name!r} (expected 1-6 lower-case letters or digits)")
    octet = 100 + zlib.crc32(name.encode()) % 100  # 10.213.100-199.0/24, one subnet per lab name
    return {"bridge": f"cbl-{name}", "subnet": f"10.213.{octet}",
            "hosts": [{"name": f"{name}-h{i}", "netns": f"cbl-{name}-{i}", "veth": f"cbl{name}{i}",
                       "address": f"10.213.{octet}.{10 + i}"} for i in range(n)]}


def state_dir(name):
    return STATE_ROOT / name


def preflight():
    if os.geteuid() != 0:
        raise LabError("the lab needs root (network namespaces, a bridge and sshd); run as root")
    for tool in ("ip", "tc", "ssh-keygen"):
        if not shutil.which(tool):
            raise LabError(f"the lab needs `{tool}` (apt-get install iproute2 openssh-client)")
    if not os.access(SSHD, os.X_OK):
        raise LabError(f"the lab needs {SSHD} (apt-get install openssh-server)")
    probe = f"cbl-probe-{os.getpid()}"
    p = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if p.returncode != 0:
        raise LabError(f"this kernel or container does not allow network namespaces: {p.stderr.strip()}")
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)


def up(hosts=2, bandwidth=None, name="lab", slots=None):
    """Create the lab; returns its status. Undoes everything on failure."""
    if hosts < 1 or hosts > 50:
        raise LabError(f"invalid --hosts {hosts} (expected 1 to 50)")
    if bandwidth is not None and not RATE.match(bandwidth):
        raise LabError(f"invalid --bandwidth {bandwidth!r} (expected a tc rate such as 100mbit or 1gbit)")
    preflight()
    d = state_dir(name)
    if (d / "state.json").exists():
        raise LabError(f"lab {name!r} is already up ({d}); `cloudbench lab down --name {name}` first")
    plan = _names(name, hosts)
    d.mkdir(parents=True, exist_ok=True)
    state = {"name": name, "bridge": plan["bridge"], "subnet": plan["subnet"] + ".0/24", "bandwidth": bandwidth,
             "hosts": [], "dir": str(d)}
    state["bridge_created"] = False
    try:
        _run("ip", "link", "add", plan["bridge"], "type", "bridge")
        state["bridge_created"] = True
        _run("ip", "addr", "add", plan["subnet"] + ".1/24", "dev", plan["bridge"])
        _run("ip", "link", "set", plan["bridge"], "up")
        _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"cloudbench-lab-{name}", "-f", d / "id_ed25519")
        known = []
        cores = sorted(os.sched_getaffinity(0))
        per_host = slots or max(1, len(cores) // hosts)
        for i, h in enumerate(plan["hosts"]):
            # Each host gets its own cores while there are enough (a real machine's cores are its own);
            # beyond that hosts share them round-robin (oversubscribed: fine for function, not for figures).
            h["slots"] = per_host
            h["cpus"] = sorted({cores[(i * per_host + j) % len(cores)] for j in range(per_host)})
            state["hosts"].append(h)
            _host_up(d, plan, h, bandwidth)
            key = (d / h["name"] / "hostkey.pub").read_text().split(" ")
            known.append(f"{h['address']} {key[0]} {key[1]}")
        (d / "known_hosts").write_text("\n".join(known) + "\n")
        _wait_ssh(state)
        state["inventory"] = str(write_inventory(d, state))
        (d / "state.json").write_text(json.dumps(state, indent=1))
    except BaseException:
        _teardown(state)
        shutil.rmtree(d, ignore_errors=True)
        raise
    return status(name)


def _host_up(d, plan, h, bandwidth):
    hd = d / h["name"]
    hd.mkdir()
    h["netns_created"] = False
    _run("ip", "netns", "add", h["netns"])
    h["netns_created"] = True
    _run("ip", "link", "add", h["veth"], "type", "veth", "peer", "name", h["veth"] + "p")
    _run("ip", "link", "set", h["veth"], "master", plan["bridge"])
    _run("ip", "link", "set", h["veth"], "up")
    _run("ip", "link", "set", h["veth"] + "p", "netns", h["netns"])
    ns = h["netns"]
    _run("ip", "link", "set", "lo", "up", ns=ns)
    _run("ip", "link", "set", h["veth"] + "p", "name", "eth0", ns=ns)
    _run("ip", "addr", "add", h["address"] + "/24", "dev", "eth0", ns=ns)
    _run("ip", "link", "set", "eth0", "up", ns=ns)
    _run("ip", "route", "add", "default", "via", plan["subnet"] + ".1", ns=ns)
    if bandwidth:
        # Egress shaping of the host's link (netem is absent on these kernels; tbf is not).
        _run("tc", "qdisc", "add", "dev", "eth0", "root", "tbf", "rate", bandwidth, "burst", "256kbit",
             "latency", "50ms", ns=ns)
    _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", hd / "hostkey")
    shutil.copy(d / "id_ed25519.pub", hd / "authorized_keys")
    cfg = hd / "sshd_config"
    cfg.write_text("\n".join([
        f"ListenAddress {h['address']}", "Port 22", f"HostKey {hd / 'hostkey'}", f"PidFile {hd / 'sshd.pid'}",
        f"AuthorizedKeysFile {hd / 'authorized_keys'}", "PasswordAuthentication no",
        "KbdInteractiveAuthentication no", "PermitRootLogin prohibit-password", "StrictModes no", "UsePAM no",
        "Subsystem sftp /usr/lib/openssh/sftp-server", "PermitUserEnvironment no", "MaxStartups 100:30:200",
    ]) + "\n")
    Path("/run/sshd").mkdir(exist_ok=True)  # privilege-separation directory sshd insists on
    # The host's own hostname (a UTS namespace), /etc/hosts naming every lab host (a private mount
    # namespace: Gloo resolves its own hostname) and cores (affinity), all inherited by every session.
    (hd / "hosts").write_text("127.0.0.1 localhost\n" + "".join(
        f"{x['address']} {x['name']}\n" for x in plan["hosts"]))
    cpus = ",".join(map(str, h["cpus"]))
    _run("unshare", "--uts", "--mount", "--propagation", "private", "sh", "-c",
         f"hostname {h['name']} && mount --bind {hd / 'hosts'} /etc/hosts && "
         f"exec taskset -c {cpus} {SSHD} -f {cfg} -E {hd / 'sshd.log'}", ns=ns)
    deadline = time.monotonic() + 10
    while not (hd / "sshd.pid").exists():
        if time.monotonic() > deadline:
            raise LabError(f"sshd of {h['name']} did not start: {(hd / 'sshd.log').read_text()[-500:]}")
        time.sleep(0.05)
    h["sshd_pid"] = int((hd / "sshd.pid").read_text())


def ssh_command(state, host, *remote):
    d = Path(state["dir"])
    return ["ssh", "-i", str(d / "id_ed25519"), "-o", f"UserKnownHostsFile={d / 'known_hosts'}",
            "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-o", "ConnectTimeout=5",
            f"root@{host['address']}", *remote]


def _wait_ssh(state, timeout=20):
    for h in state["hosts"]:
        deadline = time.monotonic() + timeout
        while True:
            p = subprocess.run(ssh_command(state, h, "true"), capture_output=True, text=True)
            if p.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise LabError(f"cannot ssh to lab host {h['name']} ({h['address']}): {p.stderr.strip()}")
            time.sleep(0.2)


def write_inventory(d, state):
    import yaml

    inv = {"instance_type": f"lab-{state['name']}", "user": "root", "port": 22,
           "key": str(d / "id_ed25519"), "known_hosts": str(d / "known_hosts"),
           "workdir": str(d / "work"), "lease_dir": str(d / "leases"),
           "hosts": [{"name": h["name"], "address": h["address"], "slots": h["slots"],
                      "labels": {"lab": state["name"], "bandwidth": state["bandwidth"] or "unlimited",
                                 "cpus": ",".join(map(str, h["cpus"]))}}
                     for h in state["hosts"]]}
    path = d / "inventory.yaml"
    path.write_text(yaml.safe_dump(inv, sort_keys=False))
    return path


def _teardown(state):
    """Remove what ``state`` says exists; ignores what is already gone."""
    for h in state.get("hosts", []):
        if not h.get("netns_created", True):
            continue  # its namespace was never made by us (up failed there): not ours to delete
        pid = h.get("sshd_pid")
        if pid:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        # Anything else still running inside the namespace (sessions, trainers) goes too.
        pids = subprocess.run(["ip", "netns", "pids", h["netns"]], capture_output=True, text=True).stdout.split()
        for p in pids:
            try:
                os.kill(int(p), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        subprocess.run(["ip", "link", "del", h["veth"]], capture_output=True)
        subprocess.run(["ip", "netns", "del", h["netns"]], capture_output=True)
    if state.get("bridge") and state.get("bridge_created", True):
        subprocess.run(["ip", "link", "del", state["bridge"]], capture_output=True)


def down(name="lab"):
    """Remove the lab; safe to repeat. Returns what was removed."""
    d = state_dir(name)
    try:
        state = json.loads((d / "state.json").read_text())
    except FileNotFoundError:
        # No record: still remove anything carrying this lab's names (a crash between create and record).
        state = {"bridge": f"cbl-{name}", "hosts": [
            {"netns": ns, "veth": f"cbl{name}{ns.rsplit('-', 1)[1]}"}
            for ns in _netns_list() if ns.startswith(f"cbl-{name}-")]}
    _teardown(state)
    shutil.rmtree(d, ignore_errors=True)
    return {"name": name, "removed_hosts": len(state.get("hosts", []))}


def _netns_list():
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def status(name="lab"):
    d = state_dir(name)
    try:
        state = json.loads((d / "state.json").read_text())
    except FileNotFoundError:
        return {"name": name, "up": False, "hosts": []}
    hosts = []
    for h in state["hosts"]:
        alive = h.get("sshd_pid") and Path(f"/proc/{h['sshd_pid']}").exists()
        hosts.append({"name": h["name"], "address": h["address"], "port": 22, "netns": h["netns"],
                      "slots": h["slots"], "cpus": h.get("cpus"), "rate": state["bandwidth"] or "unlimited",
                      "sshd": bool(alive)})
    return {"name": name, "up": True, "subnet": state["subnet"], "bridge": state["bridge"], "hosts": hosts,
            "inventory": state["inventory"], "key": str(d / "id_ed25519"), "known_hosts": str(d / "known_hosts")}
