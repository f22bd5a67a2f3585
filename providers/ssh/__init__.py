"""The ssh provider: bare-metal and on-prem hosts listed in an inventory YAML.

Nothing is bought and no host is ever destroyed. Provision *leases* hosts: an exclusive lease file per
host (created atomically on the host, naming the run and the harness that holds it) that survives a crash
of the harness and is released by teardown, ``cloudbench down`` or ``cloudbench gc``. Deploy makes the
trainer runnable on every host (the same checkout and interpreter on a shared path, or a copy of the
source next to the inventory's interpreter) and refuses to launch unless the source, TensorFlow and
Horovod versions match this harness. Launch runs ``horovodrun --gloo`` on the first host (the head, as on
any cluster) over SSH to the others; every hop verifies host keys against the inventory's known_hosts.

Inventory (keys at the top are defaults for every host; a host may override user, port, slots, labels,
gpu_model, price_per_hour; ``internal_address`` is how the other hosts reach it when that differs from
``address``, e.g. a cloud's fixed address behind a floating IP: Horovod and the head's ssh use it)::

    key: ~/.ssh/id_ed25519          # private key; loaded into a per-launch ssh-agent forwarded to the head
    known_hosts: ~/.ssh/known_hosts  # host keys are checked against it (never trust-on-first-use)
    user: root
    port: 22
    python: /opt/venv/bin/python     # interpreter with TF 2.15.1 + Horovod 0.28.1 (default: this harness's)
    workdir: /var/tmp/cloudbench     # per-run scratch on the hosts
    lease_dir: /var/tmp/cloudbench/leases
    deploy: auto                     # auto | shared | copy
    instance_type: dgx-a100          # a name for reports (default bare-metal)
    currency: CHF
    hosts:
      - {name: node1, address: 10.0.0.11, slots: 8, gpu_model: A100, price_per_hour: 12.0}
      - {name: node2, address: 10.0.0.12, slots: 8, labels: {rack: b}}
"""
from __future__ import annotations

import concurrent.futures as cf
import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from providers.errors import PlanError, PointFailed, ProviderError
from providers.base import (KILLED, TAG, Capabilities, Fleet, FleetSpec, Job, JobResult, Node, Offering, Resource,
                            failed_rank, watch)
from providers.local import ENV_OWNER, ENV_TAG, harness_owner, kill_group, owner_alive

log = logging.getLogger("cloudbench")
ROOT = Path(__file__).resolve().parents[2]  # the checkout this harness runs from
PACKAGES = ("gan", "harness", "providers")
TOP_KEYS = {"hosts", "key", "known_hosts", "user", "port", "python", "workdir", "lease_dir", "deploy",
            "instance_type", "currency", "slots", "gpu_model", "price_per_hour", "labels"}
HOST_KEYS = {"name", "address", "internal_address", "user", "port", "slots", "labels", "gpu_model",
             "price_per_hour"}
DEPLOY_MODES = ("auto", "shared", "copy")
SSH_OPTS = ("-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10",
            "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3", "-o", "LogLevel=ERROR")


@dataclass(frozen=True)
class Host:
    name: str
    address: str
    user: str
    port: int
    slots: int
    labels: tuple = ()
    gpu_model: Optional[str] = None
    price_per_hour: Optional[float] = None
    internal_address: Optional[str] = None  # how the other hosts reach it (a cloud's fixed address behind a
    # floating IP); default: address

    @property
    def where(self):
        return f"{self.name} ({self.user}@{self.address}:{self.port})"


@dataclass(frozen=True)
class Inventory:
    path: str
    hosts: tuple
    key: Optional[str]
    known_hosts: str
    python: str
    workdir: str
    lease_dir: str
    deploy: str
    instance_type: str
    currency: Optional[str]

    def host(self, name):
        for h in self.hosts:
            if h.name == name:
                return h
        raise ProviderError(f"host {name!r} is not in the inventory {self.path}")


def _positive_int(value, field, path):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PlanError(f"{field} in {path}", value, "a positive integer")
    return value


def load_inventory(path) -> Inventory:
    """Read and validate an inventory YAML; every problem names the file, the field and what is expected."""
    import yaml

    if not path:
        raise PlanError("inventory", path, "an inventory YAML path: --inventory hosts.yaml")
    p = Path(os.path.expanduser(str(path)))
    try:
        doc = yaml.safe_load(p.read_text())
    except FileNotFoundError:
        raise PlanError("inventory", str(path), "an existing inventory YAML file") from None
    except yaml.YAMLError as e:
        raise PlanError("inventory", str(path), f"valid YAML ({e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("hosts"), list) or not doc["hosts"]:
        raise PlanError(f"hosts in {p}", (doc or {}).get("hosts") if isinstance(doc, dict) else doc,
                        "a non-empty list of hosts, each with at least an address")
    unknown = set(doc) - TOP_KEYS
    if unknown:
        raise PlanError(f"key in {p}", sorted(unknown)[0], "one of " + ", ".join(sorted(TOP_KEYS)))
    deploy = doc.get("deploy", "auto")
    if deploy not in DEPLOY_MODES:
        raise PlanError(f"deploy in {p}", deploy, " or ".join(DEPLOY_MODES))
    defaults = {"user": doc.get("user", os.environ.get("USER", "root")), "port": doc.get("port", 22),
                "slots": doc.get("slots", 1), "gpu_model": doc.get("gpu_model"),
                "price_per_hour": doc.get("price_per_hour"), "labels": doc.get("labels") or {}}
    hosts, names = [], set()
    for i, h in enumerate(doc["hosts"]):
        if not isinstance(h, dict) or not h.get("address"):
            raise PlanError(f"hosts[{i}] in {p}", h, "a mapping with an address (and name, slots, ...)")
        bad = set(h) - HOST_KEYS
        if bad:
            raise PlanError(f"hosts[{i}] key in {p}", sorted(bad)[0], "one of " + ", ".join(sorted(HOST_KEYS)))
        v = {**defaults, **h}
        name = str(v.get("name") or v["address"])
        if name in names:
            raise PlanError(f"hosts[{i}].name in {p}", name, "a name no other host has")
        names.add(name)
        price = v["price_per_hour"]
        if price is not None and (isinstance(price, bool) or not isinstance(price, (int, float)) or price < 0):
            raise PlanError(f"hosts[{i}].price_per_hour in {p}", price, "a non-negative number or nothing")
        hosts.append(Host(name=name, address=str(v["address"]), user=str(v["user"]),
                          port=_positive_int(v["port"], f"hosts[{i}].port", p),
                          slots=_positive_int(v["slots"], f"hosts[{i}].slots", p),
                          labels=tuple(sorted((str(a), str(b)) for a, b in dict(v["labels"]).items())),
                          gpu_model=v["gpu_model"], price_per_hour=price,
                          internal_address=str(v["internal_address"]) if v.get("internal_address") else None))
    key = doc.get("key")
    if key:
        key = os.path.expanduser(str(key))
        if not os.path.isfile(key):
            raise PlanError(f"key in {p}", key, "an existing private key file")
    known = os.path.expanduser(str(doc.get("known_hosts", "~/.ssh/known_hosts")))
    if not os.path.isfile(known):
        raise PlanError(f"known_hosts in {p}", known, "an existing known_hosts file holding every host's key "
                        "(collect them with ssh-keyscan and check the fingerprints)")
    return Inventory(path=str(p), hosts=tuple(hosts), key=key, known_hosts=known,
                     python=str(doc.get("python") or sys.executable),
                     workdir=str(doc.get("workdir", "/var/tmp/cloudbench")),
                     lease_dir=str(doc.get("lease_dir", "/var/tmp/cloudbench/leases")), deploy=deploy,
                     instance_type=str(doc.get("instance_type", "bare-metal")), currency=doc.get("currency"))


def source_digest(root=ROOT):
    """A digest of the trainer's source, so every host runs exactly this harness's code."""
    h = hashlib.sha1()
    for pkg in PACKAGES:
        for f in sorted(Path(root, pkg).rglob("*.py")):
            h.update(str(f.relative_to(root)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:12]


PROBE = """
import json, os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
out = {"python": sys.executable}
try:
    from providers.ssh import source_digest
    import gan.train, tensorflow as tf, horovod, horovod.tensorflow as hvd
    out.update(source=source_digest(sys.argv[1]), tensorflow=tf.__version__, horovod=horovod.__version__,
               gloo=hvd.gloo_built(), mpi=hvd.mpi_built())
except Exception as e:
    out["error"] = f"{type(e).__name__}: {e}"
print(json.dumps(out))
"""

LINK_SERVER = """
import socket, struct, sys
s = socket.create_server(("0.0.0.0", 0)); print(s.getsockname()[1], flush=True)
s.settimeout(60); c, _ = s.accept(); c.settimeout(60)
def take(n, keep):
    got = []
    while n:
        d = c.recv(min(1 << 20, n))
        if not d: sys.exit(0)
        n -= len(d)
        if keep: got.append(d)
    return b"".join(got)
while True:
    kind, n = struct.unpack("!cQ", take(9, True))
    if kind == b"d":
        take(n, False); c.sendall(b"k")
    elif kind == b"p":
        c.sendall(b"p")
    else:
        break
"""

LINK_CLIENT = """
import json, socket, struct, sys, time
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=60)
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
def send(n):
    t = time.perf_counter(); c.sendall(struct.pack("!cQ", b"d", n)); buf = bytes(1 << 20); left = n
    while left:
        k = min(left, len(buf)); c.sendall(buf[:k]); left -= k
    c.recv(1); return n / (time.perf_counter() - t)
bw = send(1 << 20)
bw = send(int(min(256 << 20, max(1 << 20, bw * 1.5))))
rtt = []
for _ in range(30):
    t = time.perf_counter(); c.sendall(struct.pack("!cQ", b"p", 0)); c.recv(1); rtt.append(time.perf_counter() - t)
c.sendall(struct.pack("!cQ", b"q", 0)); rtt.sort()
print(json.dumps({"bandwidth_Bps": bw, "latency_s": rtt[len(rtt) // 2] / 2}))
"""


def _groups_naming(path):
    """Process groups of this machine's processes whose command line names ``path`` (a launch's agent)."""
    out = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if path.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                out.add(os.getpgid(int(pid)))
        except OSError:
            continue
    out.discard(os.getpgrp())  # never the harness's own group
    return sorted(out)


class SSHProvider:
    name = "ssh"
    description = "bare-metal or on-prem hosts from an inventory YAML (leased, never destroyed)"
    capabilities = Capabilities(gpus=True, multi_node=True, spot=False, prices=True, engines=("gloo",),
                                notes="--inventory hosts.yaml; prices from the inventory (per host and hour)")

    def __init__(self, inventory=None, **options):
        self.options = {"inventory": inventory, **options}
        self._inv = None
        self._deployed = {}  # run_id -> {"python": ..., "pythonpath": ...}
        self.owner = harness_owner()

    # -- inventory and ssh ------------------------------------------------------------------------
    @property
    def inv(self) -> Inventory:
        if self._inv is None:
            self._inv = load_inventory(self.options.get("inventory"))
        return self._inv

    def ssh(self, host: Host, *extra):
        key = ["-i", self.inv.key, "-o", "IdentitiesOnly=yes"] if self.inv.key else []
        return ["ssh", *SSH_OPTS, "-o", f"UserKnownHostsFile={self.inv.known_hosts}", "-p", str(host.port), *key,
                *extra, f"{host.user}@{host.address}"]

    def remote(self, host: Host, script, input=None, timeout=120, check=True):
        """Run a shell script on the host; an unreachable host raises ProviderError naming it and why."""
        env = _untagged_env()
        try:
            p = subprocess.run(self.ssh(host) + [script], input=input, capture_output=True, timeout=timeout,
                               env=env, text=input is None or isinstance(input, str))
        except subprocess.TimeoutExpired:
            raise ProviderError(f"host {host.where}: no answer within {timeout} s") from None
        err = p.stderr if isinstance(p.stderr, str) else p.stderr.decode(errors="replace")
        if p.returncode == 255:
            raise ProviderError(f"cannot reach host {host.where}: {err.strip() or 'ssh exited 255'}")
        if check and p.returncode != 0:
            raise ProviderError(f"host {host.where}: command failed ({p.returncode}): {err.strip()[-400:]}")
        return p

    def each(self, hosts, fn):
        """fn(host) on every host in parallel; results in order; the first error is raised after all finish."""
        with cf.ThreadPoolExecutor(max_workers=min(16, len(hosts)) or 1) as ex:
            futures = [ex.submit(fn, h) for h in hosts]
            cf.wait(futures)
        return [f.result() for f in futures]

    # -- what it offers ---------------------------------------------------------------------------
    def offerings(self):
        h = self.inv.hosts[0]
        return [Offering(instance_type=self.inv.instance_type, gpu_model=h.gpu_model,
                         gpus=h.slots if h.gpu_model else 0,
                         slots=h.slots, price_per_hour=h.price_per_hour,
                         currency=self.inv.currency if h.price_per_hour is not None else None)]

    def check(self):
        self.inv  # noqa: B018 (validates the inventory)
        require_tools(self.name, ("ssh", "ssh-agent", "ssh-add"))

    # -- provision: lease hosts -------------------------------------------------------------------
    def provision(self, spec: FleetSpec, on_record):
        inv = self.inv
        chosen, total = [], 0
        for h in inv.hosts:
            if total >= spec.slots:
                break
            chosen.append(h)
            total += h.slots
        if total < spec.slots:
            raise ProviderError(f"inventory {inv.path} has {total} slots on {len(inv.hosts)} host(s); "
                                f"the plan needs {spec.slots}")
        prices = [h.price_per_hour for h in chosen]
        fleet = Fleet(run_id=spec.run_id, provider=self.name, instance_type=inv.instance_type,
                      nodes=tuple(self._node(h, "cpu") for h in chosen), engine=spec.engine,
                      price_per_hour=None if None in prices else sum(prices) / len(prices),
                      currency=inv.currency if None not in prices else None, extra=(("inventory", inv.path),))
        on_record(fleet)  # before touching any host: `cloudbench down` can always release what follows
        facts = self.each(chosen, self._probe_host)
        leased = []
        try:
            for h in chosen:
                self._lease(h, spec.run_id)
                leased.append(h)
        except BaseException:
            self.each(leased, lambda h: self._release(h, spec.run_id))
            raise
        gpus = [f["gpus"] for f in facts]
        device = "gpu" if all(gpus) else "cpu"
        for h, f in zip(chosen, facts):
            if device == "gpu" and f["gpus"] < h.slots:
                raise ProviderError(f"host {h.where} has {f['gpus']} GPU(s); the inventory gives it {h.slots} slots")
            if device == "cpu" and f["cores"] < h.slots:
                log.warning("host %s has %d core(s) for %d slots: ranks will share cores", h.name, f["cores"],
                            h.slots)
        extra = [("inventory", inv.path), *self.fleet_facts(chosen, facts, device)]
        fleet = dataclasses.replace(fleet, nodes=tuple(self._node(h, device, f) for h, f in zip(chosen, facts)),
                                    extra=tuple(extra))
        on_record(fleet)
        return fleet

    def fleet_facts(self, hosts, facts, device):
        """What every fleet reached over SSH records: cores per host, the CPU share of a rank on CPU hosts, and
        the raw TCP link from host 0 to host 1 (the scaling model's fallback)."""
        extra = [("cores", [f["cores"] for f in facts])]
        if device == "cpu":
            extra.append(("cpus_per_rank", max(1, min(f["cores"] // h.slots for h, f in zip(hosts, facts)))))
        if len(hosts) > 1:
            link = self.measure_link(hosts[0], hosts[1])
            extra += [("link_bandwidth_Bps", link["bandwidth_Bps"]), ("link_latency_s", link["latency_s"])]
        return extra

    def _node(self, h: Host, device, facts=None):
        model = h.gpu_model or (facts or {}).get("gpu_model") if device == "gpu" else None
        return Node(name=h.name, address=h.address, slots=h.slots, device=device, gpu_model=model,
                    extra=(("user", h.user), ("port", h.port)))

    def _probe_host(self, h: Host):
        p = self.remote(h, "nproc; (nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null || true)",
                        timeout=30)
        lines = [x.strip() for x in p.stdout.splitlines() if x.strip()]
        return {"cores": int(lines[0]), "gpus": len(lines) - 1, "gpu_model": lines[1] if len(lines) > 1 else None}

    def _lease_path(self, h: Host):
        return f"{self.inv.lease_dir}/{h.name}.lease"

    def _lease(self, h: Host, run_id):
        doc = json.dumps({"run_id": run_id, "owner": self.owner, "host": h.name,
                          "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        f = shlex.quote(self._lease_path(h))
        script = (f"mkdir -p {shlex.quote(self.inv.lease_dir)} && if (set -C; printf '%s\\n' {shlex.quote(doc)} "
                  f"> {f}) 2>/dev/null; then echo LEASED; else echo HELD; cat {f}; fi")
        out = self.remote(h, script, timeout=30).stdout.splitlines()
        if out and out[0] == "LEASED":
            return
        try:
            holder = json.loads(out[1])
        except (IndexError, json.JSONDecodeError):
            raise ProviderError(f"host {h.where}: unreadable lease {self._lease_path(h)}; remove it by hand") from None
        if holder.get("run_id") == run_id:  # a resumed run keeps its own lease
            return
        raise ProviderError(f"host {h.where} is leased by run {holder.get('run_id')} (harness {holder.get('owner')}, "
                            f"since {holder.get('since')}); if that run is gone: cloudbench gc --provider ssh "
                            f"--inventory {self.inv.path}")

    def _release(self, h: Host, run_id):
        f = shlex.quote(self._lease_path(h))
        p = self.remote(h, f"grep -qF {shlex.quote(json.dumps({'run_id': run_id})[1:-1])} {f} 2>/dev/null "
                           f"&& rm -f {f} && echo RELEASED || true", timeout=30)
        return "RELEASED" in p.stdout

    def measure_link(self, a: Host, b: Host):
        """Bandwidth and latency of TCP from host a to host b (a's egress is what a rate limit shapes)."""
        py = "python3"
        srv = subprocess.Popen(self.ssh(b) + [f"{py} -c {shlex.quote(LINK_SERVER)}"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
        try:
            port = srv.stdout.readline().strip()
            if not port.isdigit():
                raise ProviderError(f"link probe on host {b.where} did not start: {srv.stderr.read()[-300:]}")
            out = self.remote(a, f"{py} -c {shlex.quote(LINK_CLIENT)} {b.internal_address or b.address} {port}",
                              timeout=120).stdout
            return json.loads(out.strip().splitlines()[-1])
        finally:
            try:
                srv.wait(timeout=10)
            except subprocess.TimeoutExpired:
                srv.kill()
                srv.wait()

    # -- deploy: the same trainer everywhere ------------------------------------------------------
    def deploy(self, fleet: Fleet):
        # What the hosts must match: the same probe, run here with this harness's interpreter and checkout.
        p = subprocess.run([sys.executable, "-c", PROBE, str(ROOT)], capture_output=True, text=True, timeout=300,
                           cwd=ROOT, env={**_untagged_env(), "PYTHONPATH": str(ROOT)})
        try:
            want = json.loads(p.stdout.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            raise ProviderError(f"the trainer does not import here ({sys.executable}): "
                                f"{p.stderr.strip()[-500:]}") from None
        if "error" in want:
            raise ProviderError(f"the trainer does not import here ({sys.executable}): {want['error']}")
        hosts = [self.inv.host(n.name) for n in fleet.nodes]
        inv = self.inv
        setup = None
        if inv.deploy in ("auto", "shared"):
            found = self.each(hosts, lambda h: self._probe_trainer(h, inv.python, str(ROOT)))
            bad = [(h, f) for h, f in zip(hosts, found) if self._mismatch(f, want)]
            if not bad:
                setup = {"python": inv.python, "pythonpath": str(ROOT), "mode": "shared"}
            elif inv.deploy == "shared":
                h, f = bad[0]
                raise ProviderError(f"host {h.where}: {self._mismatch(f, want)} (deploy: shared)")
        if setup is None:
            dest = f"{inv.workdir}/src-{want['source']}"
            blob = self._source_tarball()
            self.each(hosts, lambda h: self.remote(
                h, f"mkdir -p {shlex.quote(dest)} && tar -xzf - -C {shlex.quote(dest)}", input=blob, timeout=300))
            found = self.each(hosts, lambda h: self._probe_trainer(h, inv.python, dest))
            for h, f in zip(hosts, found):
                if self._mismatch(f, want) and "error" not in f and f.get("gloo") and \
                        (f.get("tensorflow"), f.get("horovod")) == (want["tensorflow"], want["horovod"]):
                    raise ProviderError(f"host {h.where}: {self._mismatch(f, want)}: the project's source changed "
                                        "here while it was being copied (files edited during the run?); run again")
                if self._mismatch(f, want):
                    raise ProviderError(f"host {h.where}: {self._mismatch(f, want)}; install TensorFlow "
                                        f"{want['tensorflow']} and Horovod {want['horovod']} for {inv.python} "
                                        f"(bash harness/setup.sh on the host) or set `python:` in the inventory")
            setup = {"python": inv.python, "pythonpath": dest, "mode": "copy"}
        # The head runs horovodrun: give it the known_hosts and an ssh that checks host keys.
        head = hosts[0]
        rdir = f"{inv.workdir}/{fleet.run_id}"
        real_ssh = self.remote(head, "command -v ssh").stdout.strip()
        wrapper = "#!/bin/sh\nexec " + " ".join(shlex.quote(x) for x in (
            real_ssh, *SSH_OPTS, "-o", f"UserKnownHostsFile={rdir}/known_hosts")) + ' "$@"\n'
        files = {"bin/ssh": wrapper, "known_hosts": Path(inv.known_hosts).read_text()}
        self.remote(head, f"mkdir -p {shlex.quote(rdir)} && tar -xzf - -C {shlex.quote(rdir)}",
                    input=_tarball(files, mode=0o755), timeout=60)
        self._deployed[fleet.run_id] = {**setup, "rdir": rdir}
        log.info("deployed (%s) on %s", setup["mode"], ", ".join(h.name for h in hosts))

    def stage(self, fleet: Fleet, assignments):
        """Each node downloads its files ([(name, url)] per node, in fleet order) into the run's scratch, which
        teardown removes; returns that directory (the same path on every node)."""
        from providers import objstore

        d = self._deployed[fleet.run_id]
        dest = f"{d['rdir']}/data"
        hosts = [self.inv.host(n.name) for n in fleet.nodes]
        cmd = " ".join(shlex.quote(x) for x in objstore.fetch_command(d["python"], dest))
        got = self.each(hosts, lambda h: self.remote(h, cmd, input=json.dumps(assignments[hosts.index(h)]),
                                                     timeout=3600))
        for h, p in zip(hosts, got):
            log.info("staged on %s: %s", h.name, p.stdout.strip().splitlines()[-1])
        return dest

    def _probe_trainer(self, h: Host, python, pythonpath):
        cmd = (f"cd {shlex.quote(pythonpath)} 2>/dev/null && PYTHONPATH={shlex.quote(pythonpath)} "
               f"{shlex.quote(python)} -c {shlex.quote(PROBE)} {shlex.quote(pythonpath)}")
        p = self.remote(h, cmd, timeout=300, check=False)
        try:
            return json.loads(p.stdout.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            return {"error": f"{python} or {pythonpath} is not usable there: {(p.stderr or '').strip()[-300:]}"}

    @staticmethod
    def _mismatch(found, want):
        if "error" in found:
            return f"the trainer does not run: {found['error']}"
        if not found.get("gloo"):
            return "Horovod there is built without Gloo"
        for k in ("tensorflow", "horovod", "source"):
            if found.get(k) != want[k]:
                return f"{k} {found.get(k)} there, {want[k]} here"
        return ""

    def _source_tarball(self):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            for pkg in PACKAGES:
                for f in sorted(Path(ROOT, pkg).rglob("*.py")):
                    tar.add(f, arcname=str(f.relative_to(ROOT)))
        return buf.getvalue()

    # -- launch -----------------------------------------------------------------------------------
    def command(self, fleet: Fleet, job: Job):
        d = self._deployed[fleet.run_id]
        place = fleet.placement(job.ranks)
        head = self.inv.host(place[0][0].name)
        remote_metrics = f"{d['rdir']}/{os.path.basename(job.metrics_path)}"
        trainer = [d["python"], "-m", job.module, *job.trainer_args, "--metrics-out", remote_metrics]
        if job.cpus_per_rank and fleet.device == "cpu":
            trainer += ["--cpus-per-rank", str(job.cpus_per_rank)]
        hvd = [d["python"], "-m", "horovod.runner.launch", "-np", str(job.ranks), "--gloo", "--start-timeout", "120",
               "-H", ",".join(f"{self.inv.host(n.name).internal_address or n.address}:{k}" for n, k in place)]
        if head.port != 22:
            hvd += ["-p", str(head.port)]
        env = {ENV_TAG: job.run_id, ENV_OWNER: self.owner, "PYTHONPATH": d["pythonpath"],
               "TF_CPP_MIN_LOG_LEVEL": "2", "HOROVOD_GLOO_TIMEOUT_SECONDS": "60"}
        script = (f"cd {shlex.quote(d['rdir'])} && PATH={shlex.quote(d['rdir'])}/bin:$PATH exec env "
                  + " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) + " "
                  + " ".join(shlex.quote(x) for x in hvd + trainer))
        return head, script, remote_metrics, place

    def launch(self, fleet: Fleet, job: Job, on_progress=None):
        head, script, remote_metrics, place = self.command(fleet, job)
        t0 = time.monotonic()
        failed = True
        try:
            with self._agent() as agent_env, open(job.log_path, "ab") as logf:
                logf.write(f"$ ssh {head.where} {script}\n".encode())
                logf.flush()
                proc = subprocess.Popen(self.ssh(head, "-A") + [script], stdout=logf, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, env=agent_env, start_new_session=True)
                try:
                    watch(lambda: proc.poll() is not None, job, job.log_path, on_progress,
                          timeout_message=lambda: f"timed out after {job.timeout_s:.0f} s on hosts "
                                                  f"{', '.join(n.name for n, _ in place)}")
                finally:
                    if proc.poll() is None:
                        kill_group(proc)
            rc = proc.returncode
            if rc != 0:
                raise PointFailed(self._why(rc, head, place, job.log_path), job.log_path)
            self._fetch(head, remote_metrics, job.metrics_path)
            failed = False
        finally:
            if failed:  # ranks whose ssh session died can outlive horovodrun: stop them on every host
                self._stop_run([self.inv.host(n.name) for n, _ in place], job.run_id, quiet=True)
        return JobResult(returncode=rc, metrics_path=job.metrics_path, log_path=job.log_path,
                         seconds=time.monotonic() - t0, hosts=tuple(n.name for n, _ in place))

    def _why(self, rc, head, place, log_path):
        lines = Path(log_path).read_text(errors="replace").splitlines()
        text = "\n".join(x for x in lines[-400:] if not x.startswith("$ "))  # not our own command line
        if rc == 255 and "horovod" not in text.lower():
            return f"lost the ssh connection to head host {head.where}"
        failed = failed_rank(log_path)
        if failed:
            rank, code = failed
            node, first = None, 0
            for n, k in place:
                if first <= rank < first + k:
                    node = n
                first += k
            # ssh exits 255 both when the remote process dies of a signal and when the connection drops.
            where = f"host {node.name} ({node.address})" if node else "an unknown host"
            return f"rank {rank} on {where} exited with code {code}{KILLED.get(code, '')}"
        return f"horovodrun on head host {head.name} exited with code {rc}"

    def _fetch(self, head, remote_path, local_path):
        p = self.remote(head, f"cat {shlex.quote(remote_path)}", check=False, timeout=60)
        if p.returncode != 0:
            raise PointFailed(f"no metrics on head host {head.name} ({remote_path})")
        tmp = local_path + ".part"
        with open(tmp, "w") as f:
            f.write(p.stdout)
        os.replace(tmp, local_path)

    @contextlib.contextmanager
    def _agent(self):
        """An ssh-agent holding the inventory key for this launch, forwarded to the head (-A)."""
        env = _untagged_env()
        if not self.inv.key:
            yield env  # the user's own agent (SSH_AUTH_SOCK), if any
            return
        with tempfile.TemporaryDirectory(prefix="cb-agent-") as d:
            sock = os.path.join(d, "agent.sock")
            # The agent holds the key: it must not outlive a harness killed with -9. ssh-agent is set-gid, which
            # clears a parent-death signal, so a shell holds it (setpriv: the kernel sends the shell SIGTERM when
            # the harness dies) and stops the agent on SIGTERM. The trap is set before the agent is forked (it
            # names $!), so no moment leaves an agent whose shell died untrapped. The shell and the agent lead
            # their own process group, which the harness signals as a whole when the launch ends or is
            # interrupted at any point, even before the shell has set its trap.
            cmd = ["ssh-agent", "-D", "-a", sock]
            if shutil.which("setpriv"):
                cmd = ["setpriv", "--pdeathsig", "TERM", "--", "sh", "-c",
                       'trap \'kill $! 2>/dev/null; exit 143\' TERM INT; ssh-agent -D -a "$0" & wait $!', sock]
            agent = None
            try:
                agent = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                         start_new_session=True)
                env["SSH_AUTH_SOCK"] = sock
                deadline = time.monotonic() + 10
                while not os.path.exists(sock):
                    if time.monotonic() > deadline or agent.poll() is not None:
                        raise ProviderError("ssh-agent did not start")
                    time.sleep(0.02)
                p = subprocess.run(["ssh-add", "-q", self.inv.key], env=env, capture_output=True, text=True,
                                   stdin=subprocess.DEVNULL)
                if p.returncode != 0:
                    raise ProviderError(f"ssh-add {self.inv.key} failed: {p.stderr.strip()}")
                yield env
            finally:
                # An interrupt inside Popen can leave a child that ``agent`` never named: it names the agent's
                # directory once it has exec'd (within milliseconds), and it leads its own group.
                groups = [agent.pid] if agent is not None else []
                until = time.monotonic() + 0.5
                while agent is None and not groups and time.monotonic() < until:
                    groups = _groups_naming(d)
                    time.sleep(0.01)
                for sig in (signal.SIGTERM, signal.SIGKILL):  # KILL: a TERM that landed before exec is lost
                    for pgid in groups:
                        try:
                            os.killpg(pgid, sig)
                        except OSError:  # gone already
                            pass
                    if agent is not None and sig == signal.SIGTERM:
                        agent.wait()

    # -- teardown and gc --------------------------------------------------------------------------
    def _stop_run(self, hosts, run_id, quiet=False):
        """Kill the run's processes on the hosts; returns the Resources stopped."""
        tag = f"{ENV_TAG}={run_id}"
        script = (f"pids=$(for d in /proc/[0-9]*; do tr '\\0' '\\n' < $d/environ 2>/dev/null | grep -qxF "
                  f"{shlex.quote(tag)} && echo ${{d#/proc/}}; done); [ -z \"$pids\" ] && exit 0; "
                  "kill -TERM $pids 2>/dev/null; sleep 2; kill -KILL $pids 2>/dev/null; echo $pids")

        def stop(h):
            try:
                return h, self.remote(h, script, timeout=60, check=False).stdout.split()
            except ProviderError as e:
                if not quiet:
                    log.warning("%s", e)
                return h, []

        gone = {}
        for h, pids in self.each(hosts, stop):
            for pid in pids:
                gone.setdefault(pid, Resource(kind="process", id=pid, run_id=run_id, detail=f"{TAG} on {h.name}"))
        return list(gone.values())

    def _hosts_of(self, run_id, fleet):
        if fleet is not None:
            return [self.inv.host(n.name) for n in fleet.nodes]
        return list(self.inv.hosts)

    def teardown(self, run_id, fleet=None):
        """Stop the run's processes, remove its scratch, release its leases. Never touches anything else."""
        hosts = self._hosts_of(run_id, fleet)
        gone = self._stop_run(hosts, run_id)
        rdir = shlex.quote(f"{self.inv.workdir}/{run_id}")

        def release(h):
            try:
                self.remote(h, f"rm -rf {rdir}", timeout=60, check=False)
                return h, self._release(h, run_id)
            except ProviderError as e:
                log.warning("%s; its lease stays until `cloudbench gc --provider ssh --inventory %s`", e,
                            self.inv.path)
                return h, False

        for h, released in self.each(hosts, release):
            if released:
                gone.append(Resource(kind="lease", id=h.name, run_id=run_id, detail=self._lease_path(h)))
        self._deployed.pop(run_id, None)
        return gone

    def list_tagged(self):
        """Leases and tagged processes on every inventory host (unreachable hosts are skipped with a warning)."""
        script = ("cat LEASE 2>/dev/null; echo '---'; for d in /proc/[0-9]*; do "
                  f"e=$(tr '\\0' '\\n' < $d/environ 2>/dev/null | grep -E '^({ENV_TAG}|{ENV_OWNER})=' | tr '\\n' ' ');"
                  " [ -n \"$e\" ] && echo \"${d#/proc/} $e\"; done; true")

        def scan(h):
            try:
                lease = shlex.quote(self._lease_path(h))
                return h, self.remote(h, script.replace("LEASE", lease, 1), timeout=60).stdout
            except ProviderError as e:
                log.warning("%s", e)
                return h, None

        found, seen = [], set()
        for h, out in self.each(list(self.inv.hosts), scan):
            if out is None:
                continue
            lease, _, procs = out.partition("---\n")
            if lease.strip():
                try:
                    doc = json.loads(lease)
                    found.append(Resource(kind="lease", id=h.name, run_id=doc["run_id"],
                                          detail=f"{self._lease_path(h)} held by {doc.get('owner')}",
                                          owner_alive=owner_alive(doc.get("owner"), unknown=True)))
                except (json.JSONDecodeError, KeyError):
                    log.warning("host %s: unreadable lease %s", h.name, self._lease_path(h))
            for line in procs.splitlines():
                pid, *pairs = line.split()
                tags = dict(p.split("=", 1) for p in pairs if "=" in p)
                if ENV_TAG not in tags or pid in seen:
                    continue
                seen.add(pid)
                found.append(Resource(kind="process", id=pid, run_id=tags[ENV_TAG], detail=f"{TAG} on {h.name}",
                                      owner_alive=owner_alive(tags.get(ENV_OWNER), unknown=True)))
        return found


def require_tools(provider, tools):
    """Every OpenSSH client tool a provider drives must be on PATH here."""
    for tool in tools:
        if not shutil.which(tool):
            raise ProviderError(f"the {provider} provider needs `{tool}` on this machine "
                                "(apt-get install openssh-client)")


def _untagged_env():
    """This process's environment without the run tags: the harness's own ssh clients are not the run's."""
    return {k: v for k, v in os.environ.items() if k not in (ENV_TAG, ENV_OWNER)}


def _tarball(files, mode=0o644):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), mode
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()
