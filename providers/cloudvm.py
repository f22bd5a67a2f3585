"""What the VM clouds (openstack, aws, exoscale) share once their API has made the machines: a per-run SSH
key, host keys known before the first connection, and a per-run ssh inventory, so deploy and launch are
exactly the ssh provider's (deploy check, horovodrun from the first machine)."""
from __future__ import annotations

import logging
import math
import re
import subprocess
import time
from pathlib import Path

import yaml

from providers.errors import PlanError, ProviderError
from providers.base import Fleet, FleetSpec, Node
from providers.ssh import SSHProvider

log = logging.getLogger("cloudbench")
OWNER = "cloudbench-owner"  # tag/label with the harness that made a resource (host:pid)
RUN_ID = re.compile(r"\d{8}-\d{6}-[a-z0-9_.-]+-[0-9a-f]{4}")  # harness.results.new_run_id
HOST_KEY_MODES = {"console", "userdata", "tofu"}
HOST_KEYS = re.compile(r"-----BEGIN SSH HOST KEY KEYS-----(.*?)-----END SSH HOST KEY KEYS-----", re.S)


def fit(offers, slots, ordered=False):
    """(offering, machines) for ``slots`` ranks: every offering in its given order when ``ordered`` (the plan
    named them), else the exact fits (no idle slot) before the others, fewest machines first."""
    shaped = [(o, math.ceil(slots / o.slots)) for o in offers]
    if ordered:
        return shaped
    exact = [(o, n) for o, n in shaped if n * o.slots == slots]
    return sorted(exact or shaped, key=lambda s: (s[1] * s[0].slots - slots, s[1], s[0].instance_type))


def shape_text(offer, n):
    what = f"{offer.gpus} {offer.gpu_model or 'GPU'}" if offer.gpus else f"{offer.slots} vCPU"
    return f"shape {n}x{offer.slots}: {n} machine(s) of {what} each"


def keygen(d, name="id_ed25519"):
    """The run's own ssh key in directory d (kept with its results, so `cloudbench down` and resume can still
    log in); returns the public key line."""
    key = Path(d) / name
    if not key.exists():
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"cloudbench-{Path(d).parent.name}",
                        "-f", str(key)], check=True, capture_output=True)
    return key.with_name(name + ".pub").read_text().strip()


def console_host_keys(text, address):
    """known_hosts lines from cloud-init's host key block in a console log, or None when it is not there yet."""
    m = HOST_KEYS.search(text or "")
    if not m:
        return None
    keys = [line.split()[:2] for line in m.group(1).strip().splitlines() if line.strip()]
    return [f"{address} {k[0]} {k[1]}" for k in keys if len(k) == 2] or None


def host_keys(provider, name, address, console, mode, timeout):
    """known_hosts lines for a new machine: from its console log (``console()`` returns the text, or None) when
    mode is "console", else what ssh-keyscan sees (trust on first use, said in the log)."""
    deadline = time.monotonic() + timeout
    while mode == "console":
        found = console_host_keys(console(), address)
        if found:
            return found
        if time.monotonic() > deadline:
            raise ProviderError(f"{provider}: {name}: no SSH host keys in its console log after {timeout:.0f} s "
                                "(an image without cloud-init? --option host_keys=tofu trusts what ssh-keyscan "
                                "sees instead)")
        time.sleep(2)
    while True:
        p = subprocess.run(["ssh-keyscan", "-T", "5", "-t", "ed25519,ecdsa,rsa", address], capture_output=True,
                           text=True)
        lines = [line for line in p.stdout.splitlines() if line and not line.startswith("#")]
        if lines:
            log.warning("%s: trusting the host keys ssh-keyscan saw on %s (host_keys=tofu)", provider, address)
            return lines
        if time.monotonic() > deadline:
            raise ProviderError(f"{provider}: {name}: no SSH on {address} after {timeout:.0f} s")
        time.sleep(2)


def caller_cidr(cloud, api_url, setting=None, public=True):
    """Where this machine's SSH comes from as the cloud sees it: ``setting`` (ssh_cidr) when given, else the
    address this machine uses towards the API; behind NAT towards a public API that is not what the
    instances see, so the run asks for it."""
    if setting:
        return str(setting)
    import ipaddress
    import socket
    from urllib.parse import urlparse

    target = socket.gethostbyname(urlparse(api_url).hostname)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((target, 443))
        mine = s.getsockname()[0]
    if public and ipaddress.ip_address(mine).is_private and not ipaddress.ip_address(target).is_private:
        raise PlanError("ssh_cidr", None, f"the public address {cloud} sees this machine as (this machine is "
                                          f"{mine}, behind NAT): --option ssh_cidr=A.B.C.D/32")
    return mine + "/32"


def save(d, inv, known):
    """The run's inventory.yaml and known_hosts in d."""
    (Path(d) / "known_hosts").write_text("\n".join(known) + "\n")
    (Path(d) / "inventory.yaml").write_text(yaml.safe_dump(inv, sort_keys=False))


def ssh_for(d):
    return SSHProvider(inventory=str(Path(d) / "inventory.yaml"))


def wait_ssh(provider, ssh, timeout):
    deadline = time.monotonic() + timeout
    for h in ssh.inv.hosts:
        while True:
            try:
                ssh.remote(h, "true", timeout=30)
                break
            except ProviderError as e:
                if time.monotonic() > deadline:
                    raise ProviderError(f"{provider}: {h.name}: SSH did not come up within {timeout:.0f} s: {e}") \
                        from None
                time.sleep(2)


def ssh_fleet(provider, spec, offer, machines, d, *, user, workdir, python=None, ssh_timeout=300.0, extra=(),
              on_record=None):
    """The fleet over SSH: writes known_hosts and inventory.yaml in d, waits for SSH, probes every machine
    (a GPU instance type whose GPUs nvidia-smi does not find is refused) and returns (Fleet, SSHProvider).

    ``machines``: dicts with name, address, known (known_hosts lines for that address), id, and optionally
    internal_address (how the machines reach each other when it differs: floating or public IPs)."""
    d = Path(d)
    hosts, known = [], []
    for m in machines:
        known += m["known"]
        host = {"name": m["name"], "address": m["address"], "slots": offer.slots, "user": user,
                **({"gpu_model": offer.gpu_model} if offer.gpus else {})}
        if m.get("internal_address") and m["internal_address"] != m["address"]:
            host["internal_address"] = m["internal_address"]
            known += [f"{m['internal_address']} {k.split(' ', 1)[1]}" for k in m["known"]]
        hosts.append(host)
    inv = {"instance_type": offer.instance_type, "user": user, "key": str(d / "id_ed25519"),
           "known_hosts": str(d / "known_hosts"), "workdir": workdir, "lease_dir": f"{workdir}/leases",
           "deploy": "auto", "hosts": hosts}
    if python:
        inv["python"] = python
    if offer.price_per_hour is not None:
        inv["price_per_hour"], inv["currency"] = offer.price_per_hour, offer.currency
    save(d, inv, known)
    ssh = ssh_for(d)
    wait_ssh(provider, ssh, ssh_timeout)
    facts = ssh.each(list(ssh.inv.hosts), ssh._probe_host)
    device = "gpu" if offer.gpus else "cpu"
    for h, f in zip(ssh.inv.hosts, facts):
        if device == "gpu" and f["gpus"] < offer.gpus:
            raise ProviderError(f"{provider}: instance type {offer.instance_type} promises {offer.gpus} GPU(s) but "
                                f"nvidia-smi on {h.name} finds {f['gpus']} (does the image carry the NVIDIA driver?)")
    nodes = tuple(Node(name=h.name, address=h.address, slots=h.slots, device=device,
                       gpu_model=offer.gpu_model if offer.gpus else None,
                       extra=(("user", h.user), ("port", h.port), ("server", m["id"])))
                  for h, m in zip(ssh.inv.hosts, machines))
    fleet = Fleet(run_id=spec.run_id, provider=provider, instance_type=offer.instance_type, nodes=nodes,
                  price_per_hour=offer.price_per_hour, currency=offer.currency, engine=spec.engine,
                  extra=(*extra, ("inventory", str(d / "inventory.yaml")),
                         *ssh.fleet_facts(list(ssh.inv.hosts), facts, device)))
    if on_record:
        on_record(fleet)
    log.info("%s: %s ready", provider, ", ".join(f"{h['name']} {h['address']}" for h in hosts))
    return fleet, ssh


def listed(value):
    """A comma-separated setting as a list (empty entries dropped)."""
    return [v.strip() for v in str(value or "").split(",") if v.strip()]


class OverSSH:
    """Deploy, data staging and launch as the ssh provider does them, on the SSHProvider that
    ``_fleet_ssh(fleet)`` gives (openstack, terraform, aws, exoscale)."""

    def deploy(self, fleet):
        self._fleet_ssh(fleet).deploy(fleet)

    def stage(self, fleet, assignments):
        return self._fleet_ssh(fleet).stage(fleet, assignments)

    def launch(self, fleet, job, on_progress=None):
        return self._fleet_ssh(fleet).launch(fleet, job, on_progress)


class VMProvider(OverSSH):
    """What the aws and exoscale providers share: per-run state with the results, shapes from offerings,
    and deploy/stage/launch over SSH on the run's inventory. Subclasses give ``name``, ``setting()``,
    ``where`` (their region or zone), ``offerings()`` and the cloud calls."""

    name = "vm"

    def state_dir(self, spec_or_run):
        if isinstance(spec_or_run, FleetSpec) and spec_or_run.workdir:
            return Path(spec_or_run.workdir) / self.name
        run_id = spec_or_run.run_id if isinstance(spec_or_run, FleetSpec) else spec_or_run
        return Path.home() / ".cache/cloudbench" / self.name / run_id

    def pick(self, types, allowed, make):
        """The offerings the plan allows (``instance_types``, in its order), else ``None`` for 'every one'."""
        if not allowed:
            return None
        missing = [a for a in allowed if a not in types]
        if missing:
            raise PlanError("instance_types", ",".join(missing), f"instance types of {self.where}: "
                            + ", ".join(sorted(types)[:40]))
        return [make(a, types[a]) for a in allowed]

    def by_model(self, offers):
        """The offerings with the ``gpu_model`` setting's GPU, when it is set."""
        want = str(self.setting("gpu_model") or "").lower()
        if not want:
            return offers
        found = [o for o in offers if (o.gpu_model or "").lower() == want]
        if not found:
            raise PlanError("gpu_model", self.setting("gpu_model"), f"a GPU model of {self.where}: " + ", ".join(
                sorted({o.gpu_model for o in offers if o.gpu_model})))
        return found

    def shapes(self, slots, instance_type=None):
        offers = self.offerings()
        if instance_type:
            offers = [o for o in offers if o.instance_type == instance_type]
            if not offers:
                raise PlanError("instance-type", instance_type, f"an instance type of {self.where}")
        if not offers:
            raise ProviderError(f"{self.name}: {self.where} has no {self.setting('device')} instance type")
        return fit(offers, slots, ordered=bool(instance_type or self.setting("instance_types")))

    def _fleet_ssh(self, fleet):
        if fleet.run_id not in self._ssh:
            self._ssh[fleet.run_id] = ssh_for(dict(fleet.extra)["state_dir"])
        return self._ssh[fleet.run_id]

    @staticmethod
    def with_owners(found, owners):
        """Resources with owner_alive from the owner each run recorded (host:pid)."""
        from providers.base import Resource
        from providers.local import owner_alive

        return [Resource(**{**r.__dict__, "owner_alive": owner_alive(owners.get(r.run_id))}) for r in found]
