"""The lab: N hosts on this machine as network namespaces on a bridge, each with its own sshd.

    cloudbench lab up --hosts 2 [--bandwidth 1gbit] [--name lab] [--emulate openstack|aws|exoscale|kubernetes]
    eval "$(cloudbench lab env [--name lab])"
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

``--emulate openstack`` also starts a loopback OpenStack API (``harness.lab.emulators.openstack``, a daemon whose
ACTIVE servers are the lab hosts) and writes ``<state>/clouds.yaml`` with its entry ``cloudbench-lab``.
``--emulate aws`` starts moto behind a proxy whose EC2 instances are lab hosts (``harness.lab.emulators.aws``; S3
too) and writes ``aws-config``/``aws-credentials`` with profile ``cloudbench-lab``; ``--emulate exoscale``
starts the Exoscale API v2 emulator. Both listen on the bridge address, so lab hosts reach them too (S3
downloads). ``--emulate kubernetes`` starts a Kubernetes API (kmock) whose nodes are the lab hosts, with a fake
Kubeflow MPIJob controller that runs each job's launcher on them, and writes ``kubeconfig``. ``cloudbench lab
env`` prints the variables that point every provider at the emulators.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import zlib
from pathlib import Path

from harness.lab.common import (CLOUD_NAME, STATE_ROOT, LabError, kubeconfig, signal_all, ssh_command, state_dir,
                                subnet_user)

SSHD = "/usr/sbin/sshd"
RATE = re.compile(r"^\d+(\.\d+)?(bit|kbit|mbit|gbit|tbit)$")
# --emulate name -> module run as a daemon
EMULATORS = {"openstack": "harness.lab.emulators.openstack", "aws": "harness.lab.emulators.aws",
             "exoscale": "harness.lab.emulators.exoscale", "kubernetes": "harness.lab.emulators.kubernetes"}
# The lab's AWS instances: a CPU type of one core (DefaultCores 1), as a lab host has.
AWS_LAB_SETTINGS = {"device": "cpu", "instance_types": "c5.large", "user": "root"}
_DAEMONS = {}  # pid -> Popen of emulators this process started (reaped when down kills them)


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


def up(hosts=2, bandwidth=None, name="lab", slots=None, emulate=(), openstack=None):
    """Create the lab (and the cloud APIs named in ``emulate``; ``openstack="real"``: a real OpenStack control
    plane, harness.lab.openstack); returns its status. Undoes everything on failure."""
    if openstack not in (None, "emulated", "real"):
        raise LabError(f"invalid --openstack {openstack!r} (expected emulated or real)")
    emulate = tuple(dict.fromkeys((*(emulate or ()), *(["openstack"] if openstack == "emulated" else []))))
    if openstack == "real" and "openstack" in emulate:
        raise LabError("--openstack real and --emulate openstack both want the lab's OpenStack: choose one")
    for kind in emulate:
        if kind not in EMULATORS:
            raise LabError(f"unknown emulator {kind!r} (expected one of: {', '.join(EMULATORS)})")
    if hosts < 1 or hosts > 50:
        raise LabError(f"invalid --hosts {hosts} (expected 1 to 50)")
    if bandwidth is not None and not RATE.match(bandwidth):
        raise LabError(f"invalid --bandwidth {bandwidth!r} (expected a tc rate such as 100mbit or 1gbit)")
    preflight()
    d = state_dir(name)
    if (d / "state.json").exists():
        raise LabError(f"lab {name!r} is already up ({d}); `cloudbench lab down --name {name}` first")
    plan = _names(name, hosts)
    taken = subnet_user(plan["subnet"])
    if taken:  # another lab whose name hashes to the same subnet: both would break
        raise LabError(f"subnet {plan['subnet']}.0/24 of lab {name!r} is already used by {taken} "
                       "(another lab?); pick another --name")
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
        for kind in emulate:  # they read state.json, so after it is written
            _emulator_up(d, state, kind)
            (d / "state.json").write_text(json.dumps(state, indent=1))
        if openstack == "real":
            from harness.lab.openstack import control

            state.setdefault("emulators", {})["openstack"] = {"real": True}  # so that a failure below is undone
            rec = control.up(state)
            state["emulators"]["openstack"] = {
                "real": True, "url": f"http://127.0.0.1:{rec['ports']['nova']}/v2.1",
                "auth_url": f"http://127.0.0.1:{rec['ports']['keystone']}/v3", "clouds_yaml": rec["clouds_yaml"],
                "dir": rec["dir"], "start_seconds": rec["start_seconds"], "rss_mb": rec["rss_mb"]}
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
        # Every address of the host's own namespace: its lab address and any floating IP an emulator adds.
        "ListenAddress 0.0.0.0", "Port 22", f"HostKey {hd / 'hostkey'}", f"PidFile {hd / 'sshd.pid'}",
        f"AuthorizedKeysFile {hd / 'authorized_keys'}", "PasswordAuthentication no",
        "KbdInteractiveAuthentication no", "PermitRootLogin prohibit-password", "StrictModes no", "UsePAM no",
        "Subsystem sftp /usr/lib/openssh/sftp-server", "PermitUserEnvironment no", "MaxStartups 100:30:200",
        # Lab hosts share this machine's files, root's shell start-up included. A session killed as its host
        # "dies" can leave pyenv's rehash lock behind, and every later login would wait 60 s on it; 3 s still
        # covers logins that merely overlap (0 made them print a warning).
        "SetEnv PYENV_REHASH_TIMEOUT=3",
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
    pid = ""
    while not pid.strip().isdigit():  # sshd creates the file before it writes the pid into it
        if time.monotonic() > deadline:
            raise LabError(f"sshd of {h['name']} did not start: {(hd / 'sshd.log').read_text()[-500:]}")
        time.sleep(0.05)
        try:
            pid = (hd / "sshd.pid").read_text()
        except FileNotFoundError:
            pid = ""
    h["sshd_pid"] = int(pid)


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


def _emulator_up(d, state, kind):
    """Start emulator ``kind`` as a daemon (own session, log in the state dir) and record where it listens."""
    log = d / f"{kind}-emulator.log"
    cmd = [sys.executable, "-m", EMULATORS[kind], "serve", "--lab", state["name"], "--port", "0"]
    if kind in ("aws", "exoscale", "kubernetes"):  # on the bridge: reachable from here and from the hosts
        cmd += ["--host", state["subnet"].rsplit(".", 1)[0] + ".1"]
    with open(log, "w") as out:
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                             start_new_session=True, cwd=str(Path(__file__).resolve().parents[2]))
    _DAEMONS[p.pid] = p
    state.setdefault("emulators", {})[kind] = {"pid": p.pid, "log": str(log)}
    deadline = time.monotonic() + 30
    info = None
    while info is None:
        for line in log.read_text().splitlines():  # it prints one JSON line once it listens
            if line.startswith("{"):
                try:
                    info = json.loads(line)
                except ValueError:
                    continue
        if info is None and p.poll() is not None:
            raise LabError(f"the {kind} emulator exited ({p.returncode}): {log.read_text()[-500:]}")
        if info is None and time.monotonic() > deadline:
            raise LabError(f"the {kind} emulator did not start within 30 s: {log.read_text()[-500:]}")
        time.sleep(0.05)
    try:  # and answers
        urllib.request.urlopen(info["auth_url"], timeout=10).read()
    except OSError as e:
        raise LabError(f"the {kind} emulator at {info['url']} does not answer: {e}") from None
    rec = {"pid": p.pid, "url": info["url"], "auth_url": info["auth_url"], "log": str(log),
           "credentials": info.get("credentials")}
    if kind == "openstack":
        rec["clouds_yaml"] = str(_write_clouds_yaml(d, info))
    elif kind == "aws":
        rec.update(region=info["region"], image_id=info.get("image_id"), profile=CLOUD_NAME,
                   **_write_aws_config(d, info))
    elif kind == "exoscale":
        rec.update(zone=info["zone"])
    elif kind == "kubernetes":
        import yaml

        path = d / "kubeconfig"
        with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:  # holds a token
            f.write(yaml.safe_dump(kubeconfig(info["url"], info["token"], info["namespace"], CLOUD_NAME)))
        rec.update(kubeconfig=str(path), context=CLOUD_NAME, namespace=info["namespace"])
    state["emulators"][kind] = rec


def _write_aws_config(d, info):
    """AWS config and credentials files with profile ``cloudbench-lab``: the emulator's endpoint, region and
    keys, and cloudbench's lab settings as ``cloudbench_*`` keys (botocore ignores keys it does not know)."""
    c = info["credentials"]
    settings = {**AWS_LAB_SETTINGS, **({"ami": info["image_id"]} if info.get("image_id") else {})}
    config, creds = d / "aws-config", d / "aws-credentials"
    config.write_text(f"[profile {CLOUD_NAME}]\nregion = {info['region']}\nendpoint_url = {info['url']}\n"
                      + "".join(f"cloudbench_{k} = {v}\n" for k, v in settings.items()))
    with os.fdopen(os.open(creds, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:  # never readable
        f.write(f"[{CLOUD_NAME}]\naws_access_key_id = {c['aws_access_key_id']}\n"
                f"aws_secret_access_key = {c['aws_secret_access_key']}\n")
    return {"aws_config": str(config), "aws_credentials": str(creds)}


def env(name="lab"):
    """The standard variables that point every provider's client at the lab's emulators (for
    ``eval "$(cloudbench lab env)"``): OpenStack's clouds.yaml, boto3's profile, endpoint and keys, Exoscale's
    key, secret, endpoint and zone."""
    try:
        state = json.loads((state_dir(name) / "state.json").read_text())
    except FileNotFoundError:
        raise LabError(f"lab {name!r} is not up (`cloudbench lab up --name {name} --emulate ...` first)") from None
    out = {}
    for kind, e in (state.get("emulators") or {}).items():
        if kind == "openstack":
            out.update(OS_CLIENT_CONFIG_FILE=e["clouds_yaml"], OS_CLOUD=CLOUD_NAME)
        elif kind == "aws":
            c = e["credentials"]
            out.update(AWS_CONFIG_FILE=e["aws_config"], AWS_SHARED_CREDENTIALS_FILE=e["aws_credentials"],
                       AWS_PROFILE=CLOUD_NAME, AWS_ENDPOINT_URL=e["url"], AWS_DEFAULT_REGION=e["region"],
                       AWS_ACCESS_KEY_ID=c["aws_access_key_id"], AWS_SECRET_ACCESS_KEY=c["aws_secret_access_key"])
        elif kind == "exoscale":
            c = e["credentials"]
            out.update(EXOSCALE_API_KEY=c["key"], EXOSCALE_API_SECRET=c["secret"], EXOSCALE_API_ENDPOINT=e["url"],
                       EXOSCALE_ZONE=e["zone"], CLOUDBENCH_EXOSCALE_PROFILE="lab")
        elif kind == "kubernetes":
            out.update(KUBECONFIG=e["kubeconfig"], CLOUDBENCH_KUBERNETES_PROFILE="lab")
    return out


def _write_clouds_yaml(d, info):
    """clouds.yaml (openstacksdk's format) with the emulator as cloud ``cloudbench-lab`` (password auth) and
    ``cloudbench-lab-appcred`` (its application credential); ``cloudbench:`` selects the provider's lab profile."""
    import yaml

    c = info["credentials"]
    def common():  # a fresh mapping per entry (a shared one would be written as a YAML anchor)
        return {"region_name": info["region"], "interface": "public", "identity_api_version": 3,
                "cloudbench": {"profile": "lab"}}

    doc = {"clouds": {
        CLOUD_NAME: {"auth": {"auth_url": info["auth_url"], "username": c["user"], "password": c["password"],
                              "project_name": c["project"], "user_domain_name": c["domain"],
                              "project_domain_name": c["domain"]}, **common()},
        CLOUD_NAME + "-appcred": {"auth_type": "v3applicationcredential", "auth": {
            "auth_url": info["auth_url"], "application_credential_id": c["app_cred_id"],
            "application_credential_secret": c["app_cred_secret"]}, **common()}}}
    path = d / "clouds.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    path.chmod(0o600)  # it holds the (lab-only) password and secret
    return path


def _emulator_pids(name, state):
    """Pids of the lab's emulator daemons: recorded ones that still run one, else found by command line."""
    def ours(pid):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        if b"serve" not in argv or b"--lab" not in argv:
            return False
        i = argv.index(b"--lab")
        return argv[i + 1:i + 2] == [name.encode()] and any(m.encode() in argv for m in EMULATORS.values())

    recorded = [e.get("pid") for e in (state.get("emulators") or {}).values() if e.get("pid")]
    if recorded:
        return [pid for pid in recorded if ours(pid)]
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and ours(int(p.name))]


def _alive(pid):
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited


def _emulators_down(name, state):
    """SIGTERM the lab's emulators (SIGKILL after 5 s) and reap the ones this process started."""
    pids = _emulator_pids(name, state)
    signal_all(pids, signal.SIGTERM)
    deadline = time.monotonic() + 5
    for pid in pids:
        while _alive(pid) and time.monotonic() < deadline:
            if pid in _DAEMONS and _DAEMONS[pid].poll() is not None:
                break
            time.sleep(0.05)
        if _alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        p = _DAEMONS.pop(pid, None)
        if p is not None:
            p.wait(timeout=5)


def _teardown(state):
    """Remove what ``state`` says exists; ignores what is already gone."""
    if state.get("name"):
        _emulators_down(state["name"], state)  # first: they act on the hosts
        from harness.lab.openstack import control

        control.down(state["name"])  # a real control plane's processes (found by their mark; none: no cost)
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
        state = {"name": name, "bridge": f"cbl-{name}", "hosts": [
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
    def alive(e):
        if e.get("real"):
            from harness.lab.openstack import control

            return bool(control.pids(name))
        return bool(e.get("pid")) and e["pid"] in _emulator_pids(name, state) and _alive(e["pid"])

    emulators = {kind: {**{k: v for k, v in e.items() if k not in ("pid", "log")}, "alive": alive(e)}
                 for kind, e in (state.get("emulators") or {}).items()}
    return {"name": name, "up": True, "subnet": state["subnet"], "bridge": state["bridge"], "hosts": hosts,
            "inventory": state["inventory"], "key": str(d / "id_ed25519"), "known_hosts": str(d / "known_hosts"),
            "emulators": emulators}
