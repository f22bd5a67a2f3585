"""A stateful loopback OpenStack API emulator whose ACTIVE servers are lab hosts.

    python -m harness.lab.emulators.openstack serve --lab NAME [--port P]     # or: cloudbench lab up --emulate openstack

One stdlib HTTP server speaks the subset of Keystone v3, Nova 2.1 (microversions 2.1 to 2.79), Glance v2
and Neutron v2.0 that apache-libcloud's OpenStack driver and openstacksdk use, with the real URLs, status
codes, headers and bodies (errors included), so clients and the openstack provider run unchanged:

    /identity            Keystone: version discovery, POST /v3/auth/tokens (password with user name + domain
                         and project scope, or an application credential), token validation
    /compute/v2.1        Nova: flavors (+ extra specs), servers (+ metadata, actions, os-interface),
                         os-keypairs, limits, os-server-groups, os-availability-zone, os-quota-sets
    /image/v2            Glance: images (two: "cloudbench-lab" and "ubuntu-22.04")
    /network/v2.0        Neutron: networks ("lab-net" and the external "public"), subnets, ports,
                         security groups and rules, floating IPs (198.18.X.0/24), routers, extensions
    /_emulator/...       not OpenStack: fault switches, quotas, a dump of every resource, reset

Lab backing. Given the lab's state (``harness.lab.hosts``), a server that becomes ACTIVE *is* a free lab host: its
fixed address is the host's, its key pair's public key is appended to the host's authorized_keys (marked
``cloudbench-emulator:<server id>``) and its console log carries the host's SSH host key in cloud-init's
format. Deleting the server frees the host as deleting a VM would: the key line goes, every process in
the host's network namespace except its sshd listener is killed, its port goes and floating IPs are
disassociated. Without a lab, servers get addresses in NO_LAB_SUBNET that nothing answers on.

Scheduling. A server whose flavor needs more vCPUs or GPUs than a lab host has (its slots), or that finds
every lab host taken, goes ERROR with Nova's "No valid host" fault. GPU flavors count one GPU per lab
core: "g1.lab" (pci_passthrough:alias) and "g2.lab" (resources:VGPU) have as many GPUs as a host has slots.

Fault switches (``POST /_emulator/faults`` with {name: count}; 0 disarms; ``GET`` shows what is armed):
quota, no_valid_host, server_error, rate_limit, internal_error, lost_answer, slow_build (FAULTS below). rate_limit
and internal_error hit every API request (Keystone's included), never /_emulator/*. Quotas: the constructor's
``quota`` and ``POST /_emulator/quota`` ({"instances": 1, ...}; -1 is unlimited). ``GET /_emulator/state``
lists every resource ("empty" is true when nothing is left); ``POST /_emulator/reset`` deletes everything,
disarms the faults and restores the constructor's quotas.

Microversions: the compute answers follow the one asked for (OpenStack-API-Version: compute X.Y or
X-OpenStack-Nova-API-Version; default 2.1): flavors carry extra_specs from 2.61, servers embed their flavor
from 2.47, server groups use policy/rules from 2.64 (policies before), key pairs have a type from 2.2 (and
create/delete answer 201/204 instead of 200/202), "networks" is required from 2.37 and the network proxies'
limits are gone from 2.36, as in Nova.

State changes happen under one lock; a server's BUILD -> ACTIVE transition is done lazily by whichever
request (or the background ticker) first sees that its build time has passed, so a deletion can never
interleave with it.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import re
import secrets
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from harness.lab.emulators import labhost

MIN_VERSION, MAX_VERSION = (2, 1), (2, 79)  # Nova microversions served
ZONES = ("nova", "az2")  # every lab host is in both
NO_LAB_SLOTS = 2  # "lab host" size when there is no lab
# Without a lab: a private range (libcloud classifies 10/8 as private_ips, as for a real cloud's fixed IPs)
# inside the lab's 10.213/16 block but outside every lab subnet (10.213.100-199), so nothing answers there.
NO_LAB_SUBNET = "10.213.0.0/24"
# Floating IPs come from the benchmarking range (RFC 2544, never a real network), one /24 per lab (X = the third
# octet of the lab's subnet; 0 without a lab); routed to lab hosts only while associated with one of them.
FLOATING_RANGE = "198.18.{}.0/24"
TOKEN_SECONDS = 3600
USER, PASSWORD, PROJECT, DOMAIN = "cloudbench", "cloudbench-lab", "cloudbench", "Default"
NO_VALID_HOST = "No valid host was found. "  # as Nova 2026.2 writes the fault (older Novas added a reason)
NET_FAILED = "Build of instance {} aborted: Failed to allocate the network(s), not rescheduling."

# The fault switches. Each is armed for the next `count` occurrences (0 disarms).
FAULTS = {
    "quota": "the next POST /servers answers 403 'Quota exceeded for instances: Requested N, but already used U "
             "of L instances'",
    "no_valid_host": "the next server goes ERROR with Nova's 'No valid host was found' fault",
    "server_error": "the next server stays in BUILD, then goes ERROR with 'Build of instance X aborted: Failed to "
                    "allocate the network(s), not rescheduling.'",
    "rate_limit": "the next N API requests answer 429 with Retry-After: 1",
    "internal_error": "the next N API requests answer 500",
    "lost_answer": "the next N create requests (POST) are carried out but answered 504 Gateway Timeout",
    "slow_build": "servers created while armed stay in BUILD that many seconds: {\"slow_build\": S} until "
                  "disarmed with 0, or {\"slow_build\": {\"seconds\": S, \"count\": N}} for the next N servers",
}

# Project quotas (Nova's and Neutron's defaults); -1 is unlimited.
DEFAULT_QUOTA = {"instances": 10, "cores": 20, "ram": 51200, "key_pairs": 100, "server_groups": 10,
                 "server_group_members": 10, "metadata_items": 128, "floating_ips": 50, "ports": 500,
                 "security_groups": 10, "security_group_rules": 100}

# Nova's fault wrapper names its error bodies by status code.
NOVA_FAULT_NAMES = {400: "badRequest", 401: "unauthorized", 403: "forbidden", 404: "itemNotFound",
                    405: "badMethod", 409: "conflictingRequest", 413: "overLimit", 415: "badMediaType",
                    429: "overLimit", 501: "notImplemented", 503: "serviceUnavailable"}


def _iso(t=None, micro=False):
    """UTC timestamp as OpenStack writes it (Keystone with microseconds)."""
    d = datetime.fromtimestamp(t if t is not None else time.time(), timezone.utc)
    return d.strftime("%Y-%m-%dT%H:%M:%S.%fZ" if micro else "%Y-%m-%dT%H:%M:%SZ")


def _sid(*parts):
    """A stable UUID for a built-in resource (images, networks, ...): the same on every run."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "cloudbench-emulator/" + "/".join(parts)))


def _mac():
    return "fa:16:3e:%02x:%02x:%02x" % tuple(secrets.token_bytes(3))




def _fingerprint(blob):
    """Nova's key pair fingerprint: MD5 of the key blob, colon-separated."""
    h = hashlib.md5(base64.b64decode(blob)).hexdigest()
    return ":".join(h[i:i + 2] for i in range(0, 32, 2))




def _flavor_gpus(specs):
    """GPUs a flavor asks for, from the extra specs the emulated cloud understands."""
    n = 0
    for alias in (specs.get("pci_passthrough:alias") or "").split(","):
        if ":" in alias:
            n += int(alias.rsplit(":", 1)[1] or 0)
    for key in ("resources:VGPU", "resources:PGPU", "gpu_count"):
        n += int(specs.get(key) or 0)
    return n


def _flavors(slots):
    """The flavors: ids and names are stable; the lab ones are sized by the lab hosts' slots."""
    s = slots
    rows = [("1", "m1.small", 1, 2048, 20, {}),
            ("2", "lab.cpu", s, 2048 * s, 20, {}),
            ("10", "g1.lab", s, 4096 * s, 40, {"pci_passthrough:alias": f"lab-gpu:{s}"}),
            ("11", "g2.lab", s, 4096 * s, 40, {"resources:VGPU": str(s)}),
            # Bigger than any lab host: discovery sees them, scheduling finds no valid host.
            ("20", "p1.v100x8", 64, 491520, 500, {"pci_passthrough:alias": "nvidia-v100:8"}),
            ("21", "p2.a100x4", 32, 245760, 500, {"resources:PGPU": "4"}),
            ("22", "bm.gpu", 96, 786432, 1000, {"gpu_model": "V100", "gpu_count": "8"})]
    return {r[0]: {"id": r[0], "name": r[1], "vcpus": r[2], "ram": r[3], "disk": r[4], "extra_specs": r[5]}
            for r in rows}


class ApiError(Exception):
    """An error answer: status, body (dict or text) and extra headers."""

    def __init__(self, status, body, headers=None):
        super().__init__(status)
        self.status, self.body, self.headers = status, body, headers or {}


def nova_error(status, message):
    return ApiError(status, {NOVA_FAULT_NAMES.get(status, "computeFault"): {"code": status, "message": message}})


def neutron_error(status, kind, message):
    return ApiError(status, {"NeutronError": {"type": kind, "message": message, "detail": ""}})


def keystone_error(status, title, message):
    return ApiError(status, {"error": {"code": status, "title": title, "message": message}})


def glance_error(status, title, message):
    # Glance answers errors in text (webob's default page), not JSON.
    return ApiError(status, f"{status} {title}\n\n{message}\n\n   ")


def _service(path):
    for name in ("identity", "compute", "image", "network"):
        if path == "/" + name or path.startswith("/" + name + "/"):
            return name
    return None


def _error_for(service, status, title, message):
    """An error in the dialect of the service the path belongs to."""
    if service == "compute":
        return nova_error(status, message)
    if service == "network":
        return neutron_error(status, "HTTP" + title.replace(" ", ""), message)
    if service == "image":
        return glance_error(status, title, message)
    return keystone_error(status, title, message)


class Request:
    """One API request: method, path (no trailing slash), query (name -> [values]), headers, body."""

    def __init__(self, method, path, query, headers, raw):
        self.method, self.path, self.query, self.headers, self.raw = method, path, query, headers, raw
        self.service = _service(path)
        self.microversion = MIN_VERSION
        self.token = None

    @property
    def json(self):
        if not self.raw:
            return {}
        try:
            doc = json.loads(self.raw)
        except ValueError:
            raise _error_for(self.service, 400, "Bad Request", "Malformed request body") from None
        if not isinstance(doc, dict):
            raise _error_for(self.service, 400, "Bad Request", "Malformed request body")
        return doc

    def arg(self, name, default=None):
        values = self.query.get(name)
        return values[0] if values else default

    def mv(self, major, minor):
        """True when the request's compute microversion is at least major.minor."""
        return self.microversion >= (major, minor)


def _microversion(headers):
    """The compute microversion asked for (OpenStack-API-Version or the legacy Nova header)."""
    wanted = None
    for part in (headers.get("OpenStack-API-Version") or "").split(","):
        words = part.split()
        if len(words) == 2 and words[0].lower() == "compute":
            wanted = words[1]
    if wanted is None:
        wanted = headers.get("X-OpenStack-Nova-API-Version")
    if not wanted:
        return MIN_VERSION
    if wanted.strip().lower() == "latest":
        return MAX_VERSION
    m = re.fullmatch(r"(\d+)\.(\d+)", wanted.strip())
    if not m:
        raise nova_error(400, f"Invalid API version request string {wanted}")
    version = (int(m.group(1)), int(m.group(2)))
    if not MIN_VERSION <= version <= MAX_VERSION:
        raise nova_error(406, f"Version {wanted} is not supported by the API. Minimum is 2.1 and maximum is 2.79.")
    return version


# The routes: (methods, path pattern, handler method, needs a token). Ids are [^/]+.
ROUTES = [
    # Keystone
    ("GET", r"/identity", "identity_versions", False),
    ("GET", r"/identity/v3", "identity_version", False),
    ("POST", r"/identity/v3/auth/tokens", "token_issue", False),
    ("GET HEAD", r"/identity/v3/auth/tokens", "token_validate", True),
    ("DELETE", r"/identity/v3/auth/tokens", "token_revoke", True),
    ("GET", r"/identity/v3/auth/projects", "auth_projects", True),
    ("GET", r"/identity/v3/auth/catalog", "auth_catalog", True),
    # Nova
    ("GET", r"/compute", "compute_versions", False),
    ("GET", r"/compute/v2\.1", "compute_version", False),
    ("GET", r"/compute/v2\.1/flavors", "flavor_list", True),
    ("GET", r"/compute/v2\.1/flavors/detail", "flavor_detail", True),
    ("GET", r"/compute/v2\.1/flavors/([^/]+)", "flavor_get", True),
    ("GET", r"/compute/v2\.1/flavors/([^/]+)/os-extra_specs", "flavor_specs", True),
    ("GET", r"/compute/v2\.1/flavors/([^/]+)/os-extra_specs/([^/]+)", "flavor_spec", True),
    ("GET", r"/compute/v2\.1/servers", "server_list", True),
    ("GET", r"/compute/v2\.1/servers/detail", "server_detail", True),
    ("POST", r"/compute/v2\.1/servers", "server_create", True),
    ("GET", r"/compute/v2\.1/servers/([^/]+)", "server_get", True),
    ("PUT", r"/compute/v2\.1/servers/([^/]+)", "server_update", True),
    ("DELETE", r"/compute/v2\.1/servers/([^/]+)", "server_delete", True),
    ("POST", r"/compute/v2\.1/servers/([^/]+)/action", "server_action", True),
    ("GET", r"/compute/v2\.1/servers/([^/]+)/metadata", "metadata_get", True),
    ("POST PUT", r"/compute/v2\.1/servers/([^/]+)/metadata", "metadata_set", True),
    ("GET", r"/compute/v2\.1/servers/([^/]+)/metadata/([^/]+)", "metadata_item_get", True),
    ("PUT", r"/compute/v2\.1/servers/([^/]+)/metadata/([^/]+)", "metadata_item_set", True),
    ("DELETE", r"/compute/v2\.1/servers/([^/]+)/metadata/([^/]+)", "metadata_item_delete", True),
    ("GET", r"/compute/v2\.1/servers/([^/]+)/os-interface", "server_interfaces", True),
    ("GET", r"/compute/v2\.1/servers/([^/]+)/os-security-groups", "server_security_groups", True),
    ("GET", r"/compute/v2\.1/os-keypairs", "keypair_list", True),
    ("POST", r"/compute/v2\.1/os-keypairs", "keypair_create", True),
    ("GET", r"/compute/v2\.1/os-keypairs/([^/]+)", "keypair_get", True),
    ("DELETE", r"/compute/v2\.1/os-keypairs/([^/]+)", "keypair_delete", True),
    ("GET", r"/compute/v2\.1/limits", "limits", True),
    ("GET", r"/compute/v2\.1/os-quota-sets/([^/]+)", "quota_set", True),
    ("GET", r"/compute/v2\.1/os-server-groups", "server_group_list", True),
    ("POST", r"/compute/v2\.1/os-server-groups", "server_group_create", True),
    ("GET", r"/compute/v2\.1/os-server-groups/([^/]+)", "server_group_get", True),
    ("DELETE", r"/compute/v2\.1/os-server-groups/([^/]+)", "server_group_delete", True),
    ("GET", r"/compute/v2\.1/os-availability-zone", "availability_zones", True),
    # Glance
    ("GET", r"/image", "image_versions", False),
    ("GET", r"/image/versions", "image_versions_ok", False),
    ("GET", r"/image/v2/images", "image_list", True),
    ("GET", r"/image/v2/images/([^/]+)", "image_get", True),
    # Neutron
    ("GET", r"/network", "network_versions", False),
    ("GET", r"/network/v2\.0", "network_resources", True),
    ("GET", r"/network/v2\.0/extensions", "network_extensions", True),
    ("GET", r"/network/v2\.0/(networks|subnets|ports|security-groups|security-group-rules|floatingips|routers)",
     "neutron_list", True),
    ("GET", r"/network/v2\.0/(networks|subnets|ports|security-groups|security-group-rules|floatingips|routers)"
            r"/([^/]+)", "neutron_get", True),
    ("POST", r"/network/v2\.0/ports", "port_create", True),
    ("PUT", r"/network/v2\.0/ports/([^/]+)", "port_update", True),
    ("DELETE", r"/network/v2\.0/ports/([^/]+)", "port_delete", True),
    ("POST", r"/network/v2\.0/security-groups", "sg_create", True),
    ("PUT", r"/network/v2\.0/security-groups/([^/]+)", "sg_update", True),
    ("DELETE", r"/network/v2\.0/security-groups/([^/]+)", "sg_delete", True),
    ("POST", r"/network/v2\.0/security-group-rules", "rule_create", True),
    ("DELETE", r"/network/v2\.0/security-group-rules/([^/]+)", "rule_delete", True),
    ("POST", r"/network/v2\.0/floatingips", "fip_create", True),
    ("PUT", r"/network/v2\.0/floatingips/([^/]+)", "fip_update", True),
    ("DELETE", r"/network/v2\.0/floatingips/([^/]+)", "fip_delete", True),
    ("GET", r"/network/v2\.0/quotas/([^/]+)", "network_quota", True),
    # The emulator's own control surface (no token: it only listens on loopback)
    ("GET", r"/_emulator/faults", "emu_faults_get", False),
    ("POST", r"/_emulator/faults", "emu_faults_set", False),
    ("GET", r"/_emulator/quota", "emu_quota_get", False),
    ("POST", r"/_emulator/quota", "emu_quota_set", False),
    ("GET", r"/_emulator/state", "emu_state", False),
    ("POST", r"/_emulator/reset", "emu_reset", False),
]
_ROUTES = [(methods.split(), re.compile(pattern + r"\Z"), name, auth) for methods, pattern, name, auth in ROUTES]

# Neutron collections: URL name -> (singular body key, storage attribute)
COLLECTIONS = {"networks": ("network", "networks"), "subnets": ("subnet", "subnets"), "ports": ("port", "ports"),
               "security-groups": ("security_group", "security_groups"),
               "security-group-rules": ("security_group_rule", "rules"),
               "floatingips": ("floatingip", "floating_ips"), "routers": ("router", "routers")}
NEUTRON_NOT_FOUND = {"networks": ("NetworkNotFound", "Network {} could not be found."),
                     "subnets": ("SubnetNotFound", "Subnet {} could not be found."),
                     "ports": ("PortNotFound", "Port {} could not be found."),
                     "security-groups": ("SecurityGroupNotFound", "Security group {} does not exist"),
                     "security-group-rules": ("SecurityGroupRuleNotFound", "Security group rule {} does not exist"),
                     "floatingips": ("FloatingIPNotFound", "Floating IP {} could not be found"),
                     "routers": ("RouterNotFound", "Router {} could not be found")}


class OpenStackEmulator:
    """The emulated cloud: one project, one region, lab hosts (or none) as the hypervisors.

    ``lab_state`` is the lab's state dict (json of /run/cloudbench-lab/<name>/state.json) or None.
    ``quota`` overrides DEFAULT_QUOTA entries, e.g. {"instances": 10, "cores": 64}.
    libcloud authenticates against ``url + "/identity"`` (it appends /v3/auth/tokens), openstacksdk and
    clouds.yaml against ``auth_url`` (``url + "/identity/v3"``).
    """

    def __init__(self, lab_state=None, host="127.0.0.1", port=0, region="RegionOne", build_seconds=1.0,
                 quota=None, verbose=False):
        self.lab_state, self.region, self.build_seconds, self.verbose = lab_state, region, float(build_seconds), verbose
        unknown = set(quota or {}) - set(DEFAULT_QUOTA)
        if unknown:
            raise ValueError(f"unknown quota {sorted(unknown)} (known: {', '.join(DEFAULT_QUOTA)})")
        self._base_quota = {**DEFAULT_QUOTA, **(quota or {})}
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._threads = []
        self._httpd = labhost.http_server(self, host, port)
        # Identity: one domain, one user in one project, one application credential of that user.
        self.project_id, self.user_id = _sid("project", PROJECT).replace("-", ""), _sid("user", USER).replace("-", "")
        self.admin_project_id = _sid("project", "admin").replace("-", "")
        self.app_cred = {"id": uuid.uuid4().hex, "secret": secrets.token_urlsafe(24), "name": "cloudbench-lab"}
        self.tokens = {}  # token -> {"expires": epoch, "issued": epoch, "methods": [...], "scoped": bool}
        # Hypervisors: the lab hosts, or virtual ones with unreachable addresses.
        if lab_state:
            self.hosts = labhost.lab_hosts(lab_state)
            self.slots = min(h["slots"] for h in self.hosts)
            cidr = lab_state["subnet"]
        else:
            self.hosts, self.slots, cidr = None, NO_LAB_SLOTS, NO_LAB_SUBNET
        self.cidr = cidr
        self.floating_subnet = FLOATING_RANGE.format(cidr.split(".")[2] if lab_state else 0)
        if lab_state:
            from harness.lab.common import subnet_user

            user = subnet_user(self.floating_subnet.rsplit(".", 1)[0])
            if user:
                raise RuntimeError(f"floating IP range {self.floating_subnet} is already on interface {user} here")
        self._net_prefix = cidr.split("/")[0].rsplit(".", 1)[0]
        self.flavors = _flavors(self.slots)
        self.images = self._make_images()
        self.zones = ZONES
        self._make_networks()
        self.quota = dict(self._base_quota)
        self.faults = {}  # armed fault switches: name -> count left (slow_build: {"seconds", "count"})
        self._seq = 0  # creation order of servers (Nova lists the newest first)
        self._clear()
        if self.hosts:
            for h in self.hosts:  # a previous emulator's keys are no longer anyone's servers
                labhost.unauthorize(h)

    # -- lifecycle ------------------------------------------------------------------------------
    @property
    def url(self):
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def auth_url(self):
        return self.url + "/identity/v3"

    @property
    def credentials(self):
        return {"user": USER, "password": PASSWORD, "project": PROJECT, "domain": DOMAIN,
                "app_cred_id": self.app_cred["id"], "app_cred_secret": self.app_cred["secret"],
                "auth_url": self.auth_url, "libcloud_auth_url": self.url + "/identity", "region": self.region}

    def start(self):
        """Serve in daemon threads (the HTTP server and a ticker that finishes builds on time)."""
        for target in (lambda: self._httpd.serve_forever(poll_interval=0.1), self._tick_loop):
            t = threading.Thread(target=target, daemon=True, name="openstack-emulator")
            t.start()
            self._threads.append(t)
        return self

    def stop(self):
        self._stop.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        for t in self._threads:
            t.join(timeout=5)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def _tick_loop(self):
        while not self._stop.wait(0.1):
            with self._lock:
                self._advance()

    # -- built-in resources ---------------------------------------------------------------------
    def _make_images(self):
        created = "2024-01-01T00:00:00Z"
        out = {}
        for name, props, size in (
                ("cloudbench-lab", {"os_admin_user": "root", "os_distro": "debian", "os_type": "linux",
                                    "description": "the lab hosts' system (this machine's)"}, 2361393152),
                ("ubuntu-22.04", {"os_admin_user": "ubuntu", "os_distro": "ubuntu", "os_version": "22.04",
                                  "os_type": "linux", "hw_disk_bus": "virtio"}, 694157312)):
            iid = _sid("image", name)
            checksum = hashlib.md5(name.encode()).hexdigest()
            out[iid] = {"id": iid, "name": name, "status": "active", "visibility": "public", "protected": False,
                        "os_hidden": False, "owner": self.admin_project_id, "checksum": checksum,
                        "os_hash_algo": "sha512", "os_hash_value": hashlib.sha512(name.encode()).hexdigest(),
                        "size": size, "virtual_size": None, "min_disk": 0, "min_ram": 0, "disk_format": "qcow2",
                        "container_format": "bare", "created_at": created, "updated_at": created, "tags": [],
                        "self": f"/v2/images/{iid}", "file": f"/v2/images/{iid}/file",
                        "schema": "/v2/schemas/image", **props}
        return out

    def _make_networks(self):
        t = "2024-01-01T00:00:00Z"
        common = {"admin_state_up": True, "status": "ACTIVE", "shared": False, "mtu": 1500,
                  "availability_zone_hints": [], "availability_zones": ["nova"], "ipv4_address_scope": None,
                  "ipv6_address_scope": None, "description": "", "port_security_enabled": True, "tags": [],
                  "created_at": t, "updated_at": t, "revision_number": 1, "qos_policy_id": None}
        self.lab_net = _sid("network", "lab-net")
        self.public_net = _sid("network", "public")
        self.lab_subnet, self.public_subnet = _sid("subnet", "lab-subnet"), _sid("subnet", "public-subnet")
        self.router_id = _sid("router", "lab-router")
        self.networks = {
            self.lab_net: {**common, "id": self.lab_net, "name": "lab-net", "subnets": [self.lab_subnet],
                           "router:external": False, "is_default": False, "tenant_id": self.project_id,
                           "project_id": self.project_id},
            self.public_net: {**common, "id": self.public_net, "name": "public", "subnets": [self.public_subnet],
                              "router:external": True, "is_default": True, "tenant_id": self.admin_project_id,
                              "project_id": self.admin_project_id}}
        fp = self.floating_subnet.split("/")[0].rsplit(".", 1)[0]
        sub = {"ip_version": 4, "enable_dhcp": True, "dns_nameservers": [], "host_routes": [], "ipv6_ra_mode": None,
               "ipv6_address_mode": None, "subnetpool_id": None, "description": "", "service_types": [], "tags": [],
               "created_at": t, "updated_at": t, "revision_number": 0}
        self.subnets = {
            self.lab_subnet: {**sub, "id": self.lab_subnet, "name": "lab-subnet", "network_id": self.lab_net,
                              "cidr": self.cidr, "gateway_ip": self._net_prefix + ".1",
                              "allocation_pools": [{"start": self._net_prefix + ".2",
                                                    "end": self._net_prefix + ".254"}],
                              "tenant_id": self.project_id, "project_id": self.project_id},
            self.public_subnet: {**sub, "id": self.public_subnet, "name": "public-subnet",
                                 "network_id": self.public_net, "cidr": self.floating_subnet, "gateway_ip": fp + ".1",
                                 "enable_dhcp": False, "allocation_pools": [{"start": fp + ".10", "end": fp + ".254"}],
                                 "tenant_id": self.admin_project_id, "project_id": self.admin_project_id}}
        self.routers = {self.router_id: {
            "id": self.router_id, "name": "lab-router", "status": "ACTIVE", "admin_state_up": True,
            "tenant_id": self.project_id, "project_id": self.project_id, "description": "", "routes": [],
            "availability_zones": ["nova"], "availability_zone_hints": [], "tags": [], "created_at": t,
            "updated_at": t, "revision_number": 1, "distributed": False, "ha": False,
            "external_gateway_info": {"network_id": self.public_net, "enable_snat": True,
                                      "external_fixed_ips": [{"subnet_id": self.public_subnet,
                                                              "ip_address": fp + ".2"}]}}}

    def _clear(self):
        """Empty project: no servers, ports, floating IPs, key pairs, server groups; the default group."""
        self.servers, self.ports, self.floating_ips = {}, {}, {}
        self.keypairs, self.server_groups = {}, {}
        self.security_groups, self.rules = {}, {}
        self._virtual = {}  # no-lab "hosts": address -> server id
        self.default_sg = self._new_sg("default", "Default security group", default=True)["id"]

    # -- request handling -----------------------------------------------------------------------
    def handle(self, method, target, headers, raw):
        """Answer one HTTP request: (status, body, headers)."""
        split = urlsplit(target)
        path = split.path.rstrip("/") or "/"
        if path.startswith("/network/") and path.endswith(".json"):
            path = path[:-5]
        req = Request(method, path, parse_qs(split.query, keep_blank_values=True), headers, raw)
        rid = "req-" + str(uuid.uuid4())
        extra = {"X-OpenStack-Request-ID": rid}
        try:
            with self._lock:
                self._advance()
                if not path.startswith("/_emulator"):
                    self._injected_faults(req)
                status, body, more = self._dispatch(req)
                creates = method == "POST" and status in (200, 201, 202) and not path.endswith("/action")
                if creates and not path.startswith(("/_emulator", "/identity")) and self._take("lost_answer"):
                    # Carried out, but the answer never arrived (a proxy timed out): a client that simply
                    # retries makes the thing twice.
                    raise _error_for(req.service, 504, "Gateway Timeout", "The server didn't respond in time.")
        except ApiError as e:
            status, body, more = e.status, e.body, e.headers
        except Exception:  # noqa: BLE001 (an emulator bug must still answer, as a 500)
            traceback.print_exc()
            e = _error_for(req.service, 500, "Internal Server Error", "Unexpected API Error.")
            status, body, more = e.status, e.body, e.headers
        extra.update(more or {})
        if req.service == "compute":
            v = "%d.%d" % req.microversion
            extra.update({"OpenStack-API-Version": f"compute {v}", "X-OpenStack-Nova-API-Version": v,
                          "Vary": "OpenStack-API-Version, X-OpenStack-Nova-API-Version",
                          "X-Compute-Request-Id": rid})
        return status, body, extra

    def _injected_faults(self, req):
        if self._take("rate_limit"):
            raise ApiError(429, {"overLimit": {"code": 429, "message": "This request was rate-limited.",
                                               "details": "Only a few requests can be made per second.",
                                               "retryAfter": "1"}}, {"Retry-After": "1"})
        if self._take("internal_error"):
            if req.service == "compute":
                raise nova_error(500, "Unexpected API Error. Please report this at http://bugs.launchpad.net/nova/ "
                                      "and attach the Nova API log if possible.\n<class 'oslo_db.exception."
                                      "DBConnectionError'>")
            raise _error_for(req.service, 500, "Internal Server Error",
                             "Request Failed: internal server error while processing your request.")

    def _dispatch(self, req):
        allowed = False
        for methods, pattern, name, auth in _ROUTES:
            m = pattern.match(req.path)
            if not m:
                continue
            if req.method not in methods:
                allowed = True
                continue
            if auth:
                self._authenticate(req)
            if req.service == "compute":
                req.microversion = _microversion(req.headers)
            out = getattr(self, "h_" + name)(req, *m.groups())
            return out if len(out) == 3 else (*out, {})
        if allowed:
            raise _error_for(req.service, 405, "Method Not Allowed", "The method is not allowed for this resource.")
        raise _error_for(req.service, 404, "Not Found", "The resource could not be found.")

    def _authenticate(self, req):
        token = req.headers.get("X-Auth-Token")
        t = self.tokens.get(token or "")
        if not t or t["expires"] < time.time() or (req.service != "identity" and not t["scoped"]):
            raise ApiError(401, {"error": {"code": 401, "title": "Unauthorized",
                                           "message": "The request you have made requires authentication."}},
                           {"WWW-Authenticate": f'Keystone uri="{self.url}/identity"'})
        req.token = t

    def _take(self, name):
        """Consume one occurrence of an armed fault switch; True when it fired."""
        n = self.faults.get(name)
        if not n:
            return False
        if n > 0:
            self.faults[name] = n - 1
            if n == 1:
                del self.faults[name]
        return True

    # -- Keystone -------------------------------------------------------------------------------
    def _identity_version_doc(self):
        return {"id": "v3.14", "status": "stable", "updated": "2020-04-07T00:00:00Z",
                "links": [{"rel": "self", "href": self.url + "/identity/v3/"}],
                "media-types": [{"base": "application/json", "type": "application/vnd.openstack.identity-v3+json"}]}

    def h_identity_versions(self, req):
        return 300, {"versions": {"values": [self._identity_version_doc()]}}

    def h_identity_version(self, req):
        return 200, {"version": self._identity_version_doc()}

    def _catalog(self):
        out = []
        for kind, name, path in (("identity", "keystone", "/identity"), ("compute", "nova", "/compute/v2.1"),
                                 ("image", "glance", "/image"), ("network", "neutron", "/network")):
            out.append({"id": _sid("service", kind).replace("-", ""), "type": kind, "name": name, "endpoints": [
                {"id": _sid("endpoint", kind, iface).replace("-", ""), "interface": iface, "region": self.region,
                 "region_id": self.region, "url": self.url + path} for iface in ("public", "internal")]})
        return out

    def _token_body(self, t):
        domain = {"id": "default", "name": DOMAIN}
        tok = {"methods": t["methods"], "audit_ids": [t["audit"]], "expires_at": _iso(t["expires"], micro=True),
               "issued_at": _iso(t["issued"], micro=True),
               "user": {"domain": domain, "id": self.user_id, "name": USER, "password_expires_at": None}}
        if t["scoped"]:
            tok.update({"project": {"domain": domain, "id": self.project_id, "name": PROJECT}, "is_domain": False,
                        "roles": [{"id": _sid("role", r).replace("-", ""), "name": r} for r in ("member", "reader")],
                        "catalog": self._catalog()})
        if "application_credential" in t["methods"]:
            tok["application_credential"] = {"id": self.app_cred["id"], "name": self.app_cred["name"],
                                              "restricted": True}
        return {"token": tok}

    def h_token_issue(self, req):
        auth = req.json.get("auth")
        if not isinstance(auth, dict) or not isinstance(auth.get("identity"), dict):
            raise keystone_error(400, "Bad Request", "Expecting to find identity in auth. The server could not "
                                                     "comply with the request since it is either malformed or "
                                                     "otherwise incorrect. The client is assumed to be in error.")
        ident, scope = auth["identity"], auth.get("scope")
        methods = ident.get("methods") or []
        denied = keystone_error(401, "Unauthorized", "The request you have made requires authentication.")
        if methods == ["password"]:
            u = (ident.get("password") or {}).get("user") or {}
            who = u.get("id") == self.user_id or (u.get("name") == USER and self._domain_ok(u.get("domain")))
            if not who or u.get("password") != PASSWORD:
                raise denied
            scoped = False
            if isinstance(scope, dict) and "project" in scope:
                p = scope["project"] or {}
                named = p.get("name") == PROJECT and self._domain_ok(p.get("domain"))
                if not (p.get("id") == self.project_id or named):
                    raise denied
                scoped = True
            elif isinstance(scope, dict) and "domain" in scope and not self._domain_ok(scope["domain"]):
                raise denied
        elif methods == ["application_credential"]:
            a = ident.get("application_credential") or {}
            u = a.get("user") or {}
            owner = u.get("id") == self.user_id or (u.get("name") == USER and self._domain_ok(u.get("domain")))
            who = a.get("id") == self.app_cred["id"] or (a.get("name") == self.app_cred["name"] and owner)
            if not who or a.get("secret") != self.app_cred["secret"]:
                raise denied
            scoped = True  # an application credential is always scoped to its project
        else:
            raise denied
        token = "gAAAAA" + secrets.token_urlsafe(96)  # looks like a Fernet token
        now = time.time()
        for old in [k for k, v in self.tokens.items() if v["expires"] < now]:
            del self.tokens[old]
        t = {"issued": now, "expires": now + TOKEN_SECONDS, "methods": methods, "scoped": scoped,
             "audit": secrets.token_urlsafe(16)[:22]}
        self.tokens[token] = t
        return 201, self._token_body(t), {"X-Subject-Token": token}

    @staticmethod
    def _domain_ok(d):
        return isinstance(d, dict) and (d.get("id") == "default" or d.get("name") == DOMAIN)

    def _subject(self, req):
        subject = req.headers.get("X-Subject-Token")
        t = self.tokens.get(subject or "")
        if not t or t["expires"] < time.time():
            raise keystone_error(404, "Not Found", f"Could not find token: {subject}.")
        return subject, t

    def h_token_validate(self, req):
        subject, t = self._subject(req)
        return 200, (None if req.method == "HEAD" else self._token_body(t)), {"X-Subject-Token": subject}

    def h_token_revoke(self, req):
        subject, _ = self._subject(req)
        del self.tokens[subject]
        return 204, None

    def h_auth_projects(self, req):
        return 200, {"projects": [{"id": self.project_id, "name": PROJECT, "domain_id": "default", "enabled": True,
                                   "description": "", "is_domain": False, "parent_id": "default", "tags": [],
                                   "links": {"self": f"{self.url}/identity/v3/projects/{self.project_id}"}}],
                     "links": {"self": self.url + "/identity/v3/auth/projects", "previous": None, "next": None}}

    def h_auth_catalog(self, req):
        return 200, {"catalog": self._catalog(), "links": {"self": self.url + "/identity/v3/auth/catalog",
                                                           "previous": None, "next": None}}

    # -- Nova: versions, flavors, limits, zones -------------------------------------------------
    def _compute_version_doc(self):
        return {"id": "v2.1", "status": "CURRENT", "version": "%d.%d" % MAX_VERSION,
                "min_version": "%d.%d" % MIN_VERSION, "updated": "2013-07-23T11:33:21Z",
                "links": [{"rel": "self", "href": self.url + "/compute/v2.1/"},
                          {"rel": "describedby", "type": "text/html", "href": "http://docs.openstack.org/"}],
                "media-types": [{"base": "application/json",
                                 "type": "application/vnd.openstack.compute+json;version=2.1"}]}

    def h_compute_versions(self, req):
        doc = self._compute_version_doc()
        return 200, {"versions": [{k: doc[k] for k in ("id", "status", "version", "min_version", "updated", "links")}]}

    def h_compute_version(self, req):
        return 200, {"version": self._compute_version_doc()}

    def _links(self, kind, rid):
        return [{"rel": "self", "href": f"{self.url}/compute/v2.1/{kind}/{rid}"},
                {"rel": "bookmark", "href": f"{self.url}/compute/{kind}/{rid}"}]

    def _flavor(self, fid):
        f = self.flavors.get(fid)
        if f is None:
            raise nova_error(404, f"Flavor {fid} could not be found.")
        return f

    def _flavor_view(self, req, f, detail=True):
        out = {"id": f["id"], "name": f["name"], "links": self._links("flavors", f["id"])}
        if req.mv(2, 55):
            out["description"] = None
        if detail:
            out.update({"ram": f["ram"], "disk": f["disk"], "vcpus": f["vcpus"],
                        "swap": 0 if req.mv(2, 75) else "", "OS-FLV-EXT-DATA:ephemeral": 0,
                        "OS-FLV-DISABLED:disabled": False, "os-flavor-access:is_public": True, "rxtx_factor": 1.0})
            if req.mv(2, 61):
                out["extra_specs"] = dict(f["extra_specs"])
        return out

    def h_flavor_list(self, req):
        return 200, {"flavors": [self._flavor_view(req, f, detail=False) for f in self.flavors.values()]}

    def h_flavor_detail(self, req):
        return 200, {"flavors": [self._flavor_view(req, f) for f in self.flavors.values()]}

    def h_flavor_get(self, req, fid):
        return 200, {"flavor": self._flavor_view(req, self._flavor(fid))}

    def h_flavor_specs(self, req, fid):
        return 200, {"extra_specs": dict(self._flavor(fid)["extra_specs"])}

    def h_flavor_spec(self, req, fid, key):
        specs = self._flavor(fid)["extra_specs"]
        if key not in specs:
            raise nova_error(404, f"Flavor {fid} has no extra specs with key {key}.")
        return 200, {key: specs[key]}

    def _usage(self):
        cores = ram = 0
        for s in self.servers.values():
            f = self.flavors[s["flavor_id"]]
            cores, ram = cores + f["vcpus"], ram + f["ram"]
        return {"instances": len(self.servers), "cores": cores, "ram": ram}

    def h_limits(self, req):
        q, used = self.quota, self._usage()
        a = {"maxImageMeta": 128, "maxPersonality": 5, "maxPersonalitySize": 10240,
             "maxSecurityGroupRules": q["security_group_rules"], "maxSecurityGroups": q["security_groups"],
             "maxServerMeta": q["metadata_items"], "maxTotalCores": q["cores"],
             "maxTotalFloatingIps": q["floating_ips"], "maxTotalInstances": q["instances"],
             "maxTotalKeypairs": q["key_pairs"], "maxTotalRAMSize": q["ram"], "maxServerGroups": q["server_groups"],
             "maxServerGroupMembers": q["server_group_members"], "totalCoresUsed": used["cores"],
             "totalFloatingIpsUsed": len(self.floating_ips), "totalInstancesUsed": used["instances"],
             "totalRAMUsed": used["ram"], "totalSecurityGroupsUsed": len(self.security_groups),
             "totalServerGroupsUsed": len(self.server_groups)}
        if req.mv(2, 36):  # the network proxies' limits are gone
            for k in ("maxSecurityGroupRules", "maxSecurityGroups", "maxTotalFloatingIps", "totalFloatingIpsUsed",
                      "totalSecurityGroupsUsed"):
                del a[k]
        if req.mv(2, 39):
            del a["maxImageMeta"]
        if req.mv(2, 57):
            del a["maxPersonality"], a["maxPersonalitySize"]
        return 200, {"limits": {"rate": [], "absolute": a}}

    def h_quota_set(self, req, project):
        q = self.quota
        return 200, {"quota_set": {"id": project, "instances": q["instances"], "cores": q["cores"], "ram": q["ram"],
                                   "key_pairs": q["key_pairs"], "server_groups": q["server_groups"],
                                   "server_group_members": q["server_group_members"],
                                   "metadata_items": q["metadata_items"]}}

    def h_availability_zones(self, req):
        return 200, {"availabilityZoneInfo": [{"zoneName": z, "zoneState": {"available": True}, "hosts": None}
                                              for z in self.zones]}

    # -- Nova: servers --------------------------------------------------------------------------
    def _server(self, sid):
        s = self.servers.get(sid)
        if s is None:
            raise nova_error(404, f"Instance {sid} could not be found.")
        return s

    def _addresses(self, s):
        port = self.ports.get(s.get("port_id") or "")
        if not port:
            return {}
        rows = [{"version": 4, "addr": ip["ip_address"], "OS-EXT-IPS:type": "fixed",
                 "OS-EXT-IPS-MAC:mac_addr": port["mac_address"]} for ip in port["fixed_ips"]]
        rows += [{"version": 4, "addr": f["floating_ip_address"], "OS-EXT-IPS:type": "floating",
                  "OS-EXT-IPS-MAC:mac_addr": port["mac_address"]}
                 for f in self.floating_ips.values() if f["port_id"] == port["id"]]
        return {self.networks[port["network_id"]]["name"]: rows}

    def _server_view(self, req, s):
        f = self.flavors[s["flavor_id"]]
        states = {"BUILD": ("building", "spawning", 0), "ACTIVE": ("active", None, 1),
                  "SHUTOFF": ("stopped", None, 4), "ERROR": ("error", None, 0)}
        vm, task, power = states[s["status"]]
        out = {"id": s["id"], "name": s["name"], "status": s["status"], "tenant_id": self.project_id,
               "user_id": self.user_id, "metadata": dict(s["metadata"]),
               "hostId": hashlib.sha224((self.project_id + s["host"]).encode()).hexdigest() if s["host"] else "",
               "image": {"id": s["image_id"], "links": [{"rel": "bookmark",
                                                         "href": f"{self.url}/compute/images/{s['image_id']}"}]},
               "created": s["created"], "updated": s["updated"], "addresses": self._addresses(s),
               "accessIPv4": "", "accessIPv6": "", "links": self._links("servers", s["id"]),
               "OS-DCF:diskConfig": "MANUAL", "progress": 0 if s["status"] == "BUILD" else 100,
               "OS-EXT-AZ:availability_zone": s["zone"], "config_drive": "", "key_name": s["key_name"],
               "OS-SRV-USG:launched_at": s["launched_at"], "OS-SRV-USG:terminated_at": None,
               "OS-EXT-STS:vm_state": vm, "OS-EXT-STS:task_state": task, "OS-EXT-STS:power_state": power,
               "os-extended-volumes:volumes_attached": []}
        if s["status"] != "ERROR":
            out["security_groups"] = [{"name": n} for n in s["security_groups"]]
        if s["fault"]:
            out["fault"] = dict(s["fault"])
        if req.mv(2, 47):
            out["flavor"] = {"vcpus": f["vcpus"], "ram": f["ram"], "disk": f["disk"], "ephemeral": 0, "swap": 0,
                             "original_name": f["name"], "extra_specs": dict(f["extra_specs"])}
        else:
            out["flavor"] = {"id": f["id"], "links": [{"rel": "bookmark",
                                                       "href": f"{self.url}/compute/flavors/{f['id']}"}]}
        if req.mv(2, 9):
            out["locked"] = False
        if req.mv(2, 19):
            out["description"] = s["description"]
        if req.mv(2, 26):
            out["tags"] = []
        if req.mv(2, 73):
            out["locked_reason"] = None
        return out

    def _filtered_servers(self, req):
        servers = sorted(self.servers.values(), key=lambda s: s["seq"], reverse=True)  # newest first, as Nova
        name = req.arg("name")
        if name:
            try:
                rx = re.compile(name)
            except re.error:
                return []
            servers = [s for s in servers if rx.search(s["name"])]
        statuses = {v.upper() for v in req.query.get("status", [])}
        if statuses:
            servers = [s for s in servers if s["status"] in statuses]
        for key, field in (("flavor", "flavor_id"), ("image", "image_id"), ("key_name", "key_name"),
                           ("availability_zone", "zone")):
            if req.arg(key):
                servers = [s for s in servers if s[field] == req.arg(key)]
        if req.arg("ip"):
            rx = re.compile(re.escape(req.arg("ip")))
            servers = [s for s in servers if any(rx.search(a["addr"]) for rows in self._addresses(s).values()
                                                 for a in rows)]
        return self._page(req, servers, "servers")

    def _page(self, req, items, kind):
        """Nova's limit/marker paging: (items, links or None)."""
        marker = req.arg("marker")
        if marker:
            ids = [s["id"] for s in items]
            if marker not in ids:
                raise nova_error(400, f"marker [{marker}] not found")
            items = items[ids.index(marker) + 1:]
        links = None
        limit = req.arg("limit")
        if limit:
            if not limit.isdigit():
                raise nova_error(400, f"Invalid input for query parameters limit. Value: {limit}.")
            if len(items) > int(limit):
                items = items[:int(limit)]
                links = [{"rel": "next", "href": f"{self.url}/compute/v2.1/{kind}?limit={limit}&marker="
                                                 f"{items[-1]['id']}"}]
        return items, links

    def h_server_list(self, req):
        servers, links = self._filtered_servers(req)
        out = {"servers": [{"id": s["id"], "name": s["name"], "links": self._links("servers", s["id"])}
                           for s in servers]}
        if links:
            out["servers_links"] = links
        return 200, out

    def h_server_detail(self, req):
        servers, links = self._filtered_servers(req)
        out = {"servers": [self._server_view(req, s) for s in servers]}
        if links:
            out["servers_links"] = links
        return 200, out

    def h_server_get(self, req, sid):
        return 200, {"server": self._server_view(req, self._server(sid))}

    def h_server_update(self, req, sid):
        s = self._server(sid)
        body = req.json.get("server")
        if not isinstance(body, dict):
            raise nova_error(400, "Invalid input for field/attribute server.")
        if "name" in body:
            s["name"] = str(body["name"])
        if "description" in body and req.mv(2, 19):
            s["description"] = body["description"]
        s["updated"] = _iso()
        return 200, {"server": self._server_view(req, s)}

    def h_server_create(self, req):
        doc = req.json
        body = doc.get("server")
        if not isinstance(body, dict):
            raise nova_error(400, "Invalid input for field/attribute server. Value: None. None is not of type "
                                  "'object'")
        name = body.get("name")
        if not isinstance(name, str) or not name.strip() or len(name) > 255:
            raise nova_error(400, f"Invalid input for field/attribute name. Value: {name}.")
        flavor = self.flavors.get(str(body.get("flavorRef", "")).rstrip("/").rsplit("/", 1)[-1])
        if flavor is None:
            raise nova_error(400, "Invalid flavorRef provided.")
        image_id = str(body.get("imageRef") or "").rstrip("/").rsplit("/", 1)[-1]
        if image_id not in self.images:
            raise nova_error(400, "Can not find requested image")
        key_name = body.get("key_name")
        if key_name is not None and key_name not in self.keypairs:
            raise nova_error(400, "Invalid key_name provided.")
        zone = body.get("availability_zone") or "nova"
        if zone not in self.zones:
            raise nova_error(400, "The requested availability zone is not available")
        metadata = body.get("metadata") or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise nova_error(400, "Invalid input for field/attribute metadata.")
        if len(metadata) > self.quota["metadata_items"] >= 0:
            raise nova_error(403, f"Quota exceeded for metadata_items: Requested {len(metadata)}, "
                                  f"but already used 0 of {self.quota['metadata_items']} metadata_items")
        sg_names = []
        for g in body.get("security_groups") or [{"name": "default"}]:
            gname = (g or {}).get("name") if isinstance(g, dict) else None
            match = [x for x in self.security_groups.values() if gname in (x["name"], x["id"])]
            if not match:
                raise nova_error(400, f"Security group {gname} not found for project {self.project_id}.")
            sg_names.append(match[0]["name"])
        network = self._requested_network(req, body.get("networks"))
        try:
            lo, hi = int(body.get("min_count", 1)), int(body.get("max_count", body.get("min_count", 1)))
        except (TypeError, ValueError):
            raise nova_error(400, "Invalid input for field/attribute min_count.") from None
        if lo < 1 or hi < lo:
            raise nova_error(400, "min_count must be <= max_count")
        group = None
        hints = doc.get("os:scheduler_hints") or doc.get("OS-SCH-HNT:scheduler_hints") or {}
        if hints.get("group"):
            group = self.server_groups.get(hints["group"])
            if group is None:
                raise nova_error(400, f"Invalid server group {hints['group']}")
        count = self._check_instance_quota(lo, hi, flavor)
        if self._take("quota"):
            used, limit = len(self.servers), self.quota["instances"]
            raise nova_error(403, f"Quota exceeded for instances: Requested {hi}, but already used {used} of "
                                  f"{limit} instances")
        key_data = self.keypairs[key_name]["public_key"] if key_name else None
        created = []
        for i in range(count):
            sname = name if count == 1 else f"{name}-{i + 1}"  # Nova's multi-instance name template
            created.append(self._build(sname, flavor, image_id, key_name, key_data, zone, metadata, sg_names,
                                       network, group, body.get("description")))
        first = created[0]
        out = {"id": first["id"], "links": self._links("servers", first["id"]), "OS-DCF:diskConfig": "MANUAL",
               "security_groups": [{"name": n} for n in sg_names], "adminPass": secrets.token_urlsafe(9)}
        if body.get("return_reservation_id") or doc.get("return_reservation_id"):
            pass  # accepted and ignored: the first server's id is returned, as for a single server
        return 202, {"server": out}, {"Location": out["links"][0]["href"]}

    def _requested_network(self, req, networks):
        """The network the server's port goes on (None for networks='none')."""
        if networks is None:
            if req.mv(2, 37):
                raise nova_error(400, "Invalid input for field/attribute server. Value: {...}. 'networks' is a "
                                      "required property")
            return self.lab_net
        if isinstance(networks, str):
            if not req.mv(2, 37) or networks not in ("auto", "none"):
                raise nova_error(400, f"Invalid input for field/attribute networks. Value: {networks}.")
            return None if networks == "none" else self.lab_net
        if not isinstance(networks, list) or not networks:
            return self.lab_net
        if len(networks) > 1:
            raise nova_error(400, "The emulator attaches one network per server")
        n = networks[0] if isinstance(networks[0], dict) else {}
        if n.get("port"):
            raise nova_error(400, "The emulator cannot boot on an existing port; give the network's uuid")
        net = n.get("uuid")
        if net not in self.networks:
            raise nova_error(400, f"Network {net} could not be found.")
        if self.networks[net]["router:external"]:
            raise nova_error(403, "Policy doesn't allow network:attach_external_network to be performed.")
        return net

    def _check_instance_quota(self, lo, hi, flavor):
        """How many of min..max servers the quota allows, or Nova's 403 naming every exceeded resource."""
        used, q = self._usage(), self.quota
        per = {"instances": 1, "cores": flavor["vcpus"], "ram": flavor["ram"]}
        allowed = hi
        for k, unit in per.items():
            if q[k] >= 0:
                allowed = min(allowed, (q[k] - used[k]) // unit)
        if allowed >= lo:
            return allowed
        overs = [k for k in ("cores", "instances", "ram") if q[k] >= 0 and used[k] + lo * per[k] > q[k]]
        raise nova_error(403, "Quota exceeded for {}: Requested {}, but already used {} of {} {}".format(
            ", ".join(overs), ", ".join(str(lo * per[k]) for k in overs), ", ".join(str(used[k]) for k in overs),
            ", ".join(str(q[k]) for k in overs), ", ".join(overs)))

    def _free_host(self, zone):
        """A host nothing runs on, or None."""
        if self.hosts is None:
            for i in range(10, 255):
                addr = f"{self._net_prefix}.{i}"
                if addr not in self._virtual:
                    return {"name": f"compute-{i - 9}", "address": addr, "slots": self.slots, "virtual": True}
            return None
        taken = {s["host"] for s in self.servers.values() if s["host"]}
        return next((h for h in self.hosts if h["name"] not in taken), None)

    def _build(self, name, flavor, image_id, key_name, key_data, zone, metadata, sg_names, network, group,
               description):
        """One new server: scheduled on a free host (BUILD) or ERROR with Nova's fault."""
        now = _iso()
        sid = str(uuid.uuid4())
        s = {"id": sid, "name": name, "flavor_id": flavor["id"], "image_id": image_id, "key_name": key_name,
             "key_data": key_data, "zone": zone, "metadata": dict(metadata), "security_groups": list(sg_names),
             "created": now, "updated": now, "status": "BUILD", "host": None, "address": None, "port_id": None,
             "fault": None, "fail": None, "launched_at": None, "ready_at": None, "description": description,
             "seq": self._next_seq(), "host_key": None, "group": group["id"] if group else None}
        self.servers[sid] = s
        if group is not None:
            group["members"].append(sid)
        host = None
        if not self._take("no_valid_host") and _flavor_gpus(flavor["extra_specs"]) <= self.slots \
                and flavor["vcpus"] <= self.slots and not self._affinity_blocked(group):
            host = self._free_host(zone)
        if host is None:
            self._fail(s, NO_VALID_HOST)
            return s
        s["host"], s["address"] = host["name"], host["address"]
        if host.get("virtual"):
            self._virtual[host["address"]] = sid
            s["host_key"] = labhost.fake_host_key() + f" root@{name}"
        else:
            s["host_key"] = labhost.host_key(host)
        if network:
            port = self._new_port(network, name="", device_id=sid, device_owner="compute:" + zone,
                                  sg_ids=[self._sg_by_name(n)["id"] for n in sg_names], address=host["address"])
            port["status"] = "DOWN"
            s["port_id"] = port["id"]
        seconds = self.build_seconds
        slow = self.faults.get("slow_build")
        if slow:
            seconds = slow["seconds"]
            if slow["count"] is not None:
                slow["count"] -= 1
                if slow["count"] <= 0:
                    del self.faults["slow_build"]
        s["ready_at"] = time.monotonic() + seconds
        if self._take("server_error"):
            s["fail"] = NET_FAILED.format(sid)
        return s

    def _next_seq(self):
        self._seq += 1
        return self._seq

    def _affinity_blocked(self, group):
        """Affinity wants every member on one host; a lab host holds one server, so a second has nowhere."""
        if group is None or group["policy"] not in ("affinity",):
            return False
        return any(self.servers[m]["host"] for m in group["members"] if m in self.servers)

    def _fail(self, s, message):
        """Server to ERROR with Nova's fault; it keeps no host and no port (the build was cleaned up)."""
        self._release(s)
        s.update(status="ERROR", updated=_iso(), fault={"code": 500, "created": _iso(), "message": message})

    def _advance(self):
        """Finish every build whose time has come: ACTIVE on its host, or ERROR for a failed build."""
        now = time.monotonic()
        for s in list(self.servers.values()):
            if s["status"] != "BUILD" or now < s["ready_at"]:
                continue
            if s["fail"]:
                self._fail(s, s["fail"])
                continue
            s.update(status="ACTIVE", launched_at=_iso()[:-1] + ".000000", updated=_iso())
            port = self.ports.get(s["port_id"] or "")
            if port:
                port["status"] = "ACTIVE"
            host = self._lab_host(s)
            if host and s["key_data"]:
                labhost.authorize(host, s["key_data"], s["id"])

    def _lab_host(self, s):
        if not self.hosts or not s["host"]:
            return None
        return next((h for h in self.hosts if h["name"] == s["host"]), None)

    def _release(self, s):
        """Free the server's host (key line, processes) and network (port, floating IP associations)."""
        host = self._lab_host(s)
        if host:
            labhost.release(host, s["id"])
        port = self.ports.get(s["port_id"] or "")
        if port and port["device_id"] == s["id"]:
            self._delete_port(port["id"])  # while the server still has its host: floating IP routes go too
        s["port_id"] = None
        if s["address"] and self.hosts is None:
            self._virtual.pop(s["address"], None)
        s["host"] = s["address"] = None

    def h_server_delete(self, req, sid):
        self._delete_server(self._server(sid))
        return 204, None

    def _delete_server(self, s):
        self._release(s)
        for g in self.server_groups.values():
            if s["id"] in g["members"]:
                g["members"].remove(s["id"])
        del self.servers[s["id"]]

    def h_server_action(self, req, sid):
        s = self._server(sid)
        body = req.json
        if len(body) != 1:
            raise nova_error(400, "There is no such action: " + ", ".join(body) if body else "Malformed request body")
        action, args = next(iter(body.items()))
        args = args if isinstance(args, dict) else {}
        if action == "os-getConsoleOutput":
            return 200, {"output": self._console(s, args.get("length"))}
        if action in ("addFloatingIp", "removeFloatingIp") and not req.mv(2, 44):
            return self._floating_action(s, action, args)
        if action in ("os-stop", "os-start", "reboot"):
            want = {"os-stop": "ACTIVE", "os-start": "SHUTOFF", "reboot": None}[action]
            if s["status"] not in ("ACTIVE", "SHUTOFF") or (want and s["status"] != want):
                vm = {"BUILD": "building", "ERROR": "error", "ACTIVE": "active", "SHUTOFF": "stopped"}[s["status"]]
                raise nova_error(409, f"Cannot '{action.replace('os-', '')}' instance {sid} while it is in vm_state "
                                      f"{vm}")
            s["status"] = {"os-stop": "SHUTOFF", "os-start": "ACTIVE"}.get(action, s["status"])
            return 202, None
        if action in ("addSecurityGroup", "removeSecurityGroup"):
            g = self._sg_by_name(args.get("name"))
            if g is None:
                raise nova_error(404, f"Security group {args.get('name')} not found for project {self.project_id}.")
            names = s["security_groups"]
            if action == "addSecurityGroup" and g["name"] not in names:
                names.append(g["name"])
            elif action == "removeSecurityGroup":
                if g["name"] not in names:
                    raise nova_error(400, f"Security group {g['name']} not associated with the instance {sid}")
                names.remove(g["name"])
            port = self.ports.get(s["port_id"] or "")
            if port:
                port["security_groups"] = [self._sg_by_name(n)["id"] for n in names]
            return 202, None
        raise nova_error(400, f"There is no such action: {action}")

    def _console(self, s, length):
        if s["status"] == "ERROR" or not s["host"]:
            raise nova_error(409, f"Instance {s['id']} is not ready")
        lines = labhost.console_lines(s["name"], s["address"], s["host_key"], bool(s["key_data"]), s["created"],
                                      s["launched_at"] if s["status"] in ("ACTIVE", "SHUTOFF") else None)
        try:
            n = int(length) if length is not None else -1
        except (TypeError, ValueError):
            raise nova_error(400, f"Invalid input for field/attribute length. Value: {length}.") from None
        if n >= 0:
            lines = lines[len(lines) - n:] if n else []
        return "\n".join(lines) + "\n" if lines else ""

    def _floating_action(self, s, action, args):
        address = args.get("address")
        fip = next((f for f in self.floating_ips.values() if f["floating_ip_address"] == address), None)
        if fip is None:
            raise nova_error(404, "floating IP not found")
        if action == "addFloatingIp":
            port = self.ports.get(s["port_id"] or "")
            if port is None:
                raise nova_error(400, "No nw_info cache associated with instance")
            self._associate(fip, port["id"], error=nova_error)
        else:
            port = self.ports.get(fip["port_id"] or "")
            if port is None or port["device_id"] != s["id"]:
                raise nova_error(409, f"Floating IP {address} is not associated with instance {s['id']}.")
            self._associate(fip, None)
        return 202, None

    # -- Nova: metadata, interfaces -------------------------------------------------------------
    def h_metadata_get(self, req, sid):
        return 200, {"metadata": dict(self._server(sid)["metadata"])}

    def h_metadata_set(self, req, sid):
        s = self._server(sid)
        md = req.json.get("metadata")
        if not isinstance(md, dict) or not all(isinstance(v, str) for v in md.values()):
            raise nova_error(400, "Invalid input for field/attribute metadata.")
        s["metadata"] = dict(md) if req.method == "PUT" else {**s["metadata"], **md}
        return 200, {"metadata": dict(s["metadata"])}

    def h_metadata_item_get(self, req, sid, key):
        md = self._server(sid)["metadata"]
        if key not in md:
            raise nova_error(404, "Metadata item was not found")
        return 200, {"meta": {key: md[key]}}

    def h_metadata_item_set(self, req, sid, key):
        s = self._server(sid)
        meta = req.json.get("meta")
        if not isinstance(meta, dict) or list(meta) != [key]:
            raise nova_error(400, "Request body and URI mismatch")
        s["metadata"][key] = str(meta[key])
        return 200, {"meta": {key: s["metadata"][key]}}

    def h_metadata_item_delete(self, req, sid, key):
        md = self._server(sid)["metadata"]
        if key not in md:
            raise nova_error(404, "Metadata item was not found")
        del md[key]
        return 204, None

    def h_server_interfaces(self, req, sid):
        s = self._server(sid)
        rows = []
        for p in self.ports.values():
            if p["device_id"] == s["id"]:
                row = {"port_state": p["status"], "fixed_ips": [dict(x) for x in p["fixed_ips"]], "port_id": p["id"],
                       "net_id": p["network_id"], "mac_addr": p["mac_address"]}
                if req.mv(2, 70):
                    row["tag"] = None
                rows.append(row)
        return 200, {"interfaceAttachments": rows}

    def h_server_security_groups(self, req, sid):
        s = self._server(sid)
        out = []
        for name in s["security_groups"]:
            g = self._sg_by_name(name)
            out.append({"id": g["id"], "name": g["name"], "description": g["description"],
                        "tenant_id": self.project_id, "rules": []})
        return 200, {"security_groups": out}

    # -- Nova: key pairs ------------------------------------------------------------------------
    def _keypair_view(self, req, k, full=False):
        out = {"name": k["name"], "public_key": k["public_key"], "fingerprint": k["fingerprint"]}
        if req.mv(2, 2):
            out["type"] = k["type"]
        if full:
            out.update({"user_id": self.user_id, "id": k["seq"], "created_at": k["created_at"], "deleted": False,
                        "deleted_at": None, "updated_at": None})
        return out

    def h_keypair_list(self, req):
        return 200, {"keypairs": [{"keypair": self._keypair_view(req, k)} for k in self.keypairs.values()]}

    def h_keypair_get(self, req, name):
        k = self.keypairs.get(name)
        if k is None:
            raise nova_error(404, f"Keypair {name} not found for user {self.user_id}")
        return 200, {"keypair": self._keypair_view(req, k, full=True)}

    def h_keypair_create(self, req):
        body = req.json.get("keypair")
        if not isinstance(body, dict):
            raise nova_error(400, "Invalid input for field/attribute keypair.")
        name, kind = body.get("name"), body.get("type", "ssh")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9 _-]{1,255}", name) or not name.strip():
            raise nova_error(400, "Keypair data is invalid: Keypair name contains unsafe characters")
        if kind not in ("ssh", "x509") or ("type" in body and not req.mv(2, 2)):
            raise nova_error(400, f"Invalid input for field/attribute type. Value: {kind}.")
        if name in self.keypairs:
            raise nova_error(409, f"Key pair '{name}' already exists.")
        if len(self.keypairs) >= self.quota["key_pairs"] >= 0:
            raise nova_error(403, "Quota exceeded, too many key pairs.")
        private = None
        if body.get("public_key") is not None:
            public = str(body["public_key"]).strip()
        else:
            public, private = self._generate_key()
        kb = labhost.key_blob(public)
        if kb is None:
            raise nova_error(400, "Keypair data is invalid: failed to generate fingerprint")
        k = {"name": name, "public_key": public, "fingerprint": _fingerprint(kb[1]), "type": kind,
             "seq": len(self.keypairs) + 1, "created_at": _iso()[:-1] + ".000000"}
        self.keypairs[name] = k
        out = {**self._keypair_view(req, k), "user_id": self.user_id}
        if private:
            out["private_key"] = private
        return (201 if req.mv(2, 2) else 200), {"keypair": out}

    @staticmethod
    def _generate_key():
        """A fresh RSA key pair as Nova generates one (ssh-keygen: the standard library has no RSA)."""
        with tempfile.TemporaryDirectory() as tmp:
            key = Path(tmp) / "key"
            p = subprocess.run(["ssh-keygen", "-q", "-t", "rsa", "-b", "2048", "-m", "PEM", "-N", "",
                                "-C", "Generated-by-Nova", "-f", str(key)], capture_output=True, text=True)
            if p.returncode != 0:
                raise nova_error(501, "Key pair generation needs ssh-keygen here; import a public key instead")
            return (Path(str(key) + ".pub")).read_text().strip(), key.read_text()

    def h_keypair_delete(self, req, name):
        if self.keypairs.pop(name, None) is None:
            raise nova_error(404, f"Keypair {name} not found for user {self.user_id}")
        return (204 if req.mv(2, 2) else 202), None

    # -- Nova: server groups --------------------------------------------------------------------
    def _server_group_view(self, req, g):
        out = {"id": g["id"], "name": g["name"], "members": [m for m in g["members"] if m in self.servers]}
        if req.mv(2, 64):
            out.update({"policy": g["policy"], "rules": dict(g["rules"])})
        else:
            out.update({"policies": [g["policy"]], "metadata": {}})
        if req.mv(2, 13):
            out.update({"project_id": self.project_id, "user_id": self.user_id})
        return out

    def _server_group(self, gid):
        g = self.server_groups.get(gid)
        if g is None:
            raise nova_error(404, f"Instance group {gid} could not be found.")
        return g

    def h_server_group_list(self, req):
        return 200, {"server_groups": [self._server_group_view(req, g) for g in self.server_groups.values()]}

    def h_server_group_get(self, req, gid):
        return 200, {"server_group": self._server_group_view(req, self._server_group(gid))}

    def h_server_group_create(self, req):
        body = req.json.get("server_group")
        if not isinstance(body, dict) or not body.get("name"):
            raise nova_error(400, "Invalid input for field/attribute server_group.")
        policies = ("affinity", "anti-affinity", "soft-affinity", "soft-anti-affinity")
        key, unexpected = ("policy", "policies") if req.mv(2, 64) else ("policies", "policy")
        if unexpected in body or (not req.mv(2, 64) and "rules" in body):
            raise nova_error(400, f"Invalid input for field/attribute server_group. Value: {json.dumps(body)}. "
                                  f"Additional properties are not allowed ('{unexpected}' was unexpected)")
        policy = body.get(key)
        if isinstance(policy, list):
            policy = policy[0] if len(policy) == 1 else None
        if policy not in policies:
            raise nova_error(400, f"Invalid input for field/attribute {key}. Value: {body.get(key)}.")
        if len(self.server_groups) >= self.quota["server_groups"] >= 0:
            raise nova_error(403, "Quota exceeded, too many server groups.")
        g = {"id": str(uuid.uuid4()), "name": str(body["name"]), "policy": policy, "rules": body.get("rules") or {},
             "members": []}
        self.server_groups[g["id"]] = g
        return 200, {"server_group": self._server_group_view(req, g)}

    def h_server_group_delete(self, req, gid):
        self._server_group(gid)
        del self.server_groups[gid]
        return 204, None

    # -- Glance ---------------------------------------------------------------------------------
    def h_image_versions(self, req):
        return 300, self._image_versions()

    def h_image_versions_ok(self, req):
        return 200, self._image_versions()

    def _image_versions(self):
        return {"versions": [{"id": v, "status": "CURRENT" if v == "v2.9" else "SUPPORTED",
                              "links": [{"rel": "self", "href": self.url + "/image/v2/"}]}
                             for v in ("v2.9", "v2.7", "v2.6", "v2.5", "v2.4", "v2.3", "v2.2", "v2.1", "v2.0")]}

    def h_image_list(self, req):
        images = sorted(self.images.values(), key=lambda i: i["name"])
        for key in ("name", "status", "visibility", "os_distro", "disk_format"):
            if req.arg(key) is not None:
                images = [i for i in images if str(i.get(key)) == req.arg(key)]
        marker = req.arg("marker")
        if marker:
            ids = [i["id"] for i in images]
            if marker not in ids:
                raise glance_error(400, "Bad Request", f"marker {marker} could not be found.")
            images = images[ids.index(marker) + 1:]
        out = {"first": "/v2/images", "schema": "/v2/schemas/images"}
        limit = req.arg("limit")
        if limit and limit.isdigit() and len(images) > int(limit):
            images = images[:int(limit)]
            out["next"] = f"/v2/images?marker={images[-1]['id']}&limit={limit}"
        out["images"] = [dict(i) for i in images]
        return 200, out

    def h_image_get(self, req, iid):
        if iid not in self.images:
            raise glance_error(404, "Not Found", f"No image found with ID {iid}")
        return 200, dict(self.images[iid])

    # -- Neutron --------------------------------------------------------------------------------
    def h_network_versions(self, req):
        return 200, {"versions": [{"id": "v2.0", "status": "CURRENT",
                                   "links": [{"rel": "self", "href": self.url + "/network/v2.0/"}]}]}

    def h_network_resources(self, req):
        return 200, {"resources": [{"name": c[0], "collection": name, "links": [
            {"rel": "self", "href": f"{self.url}/network/v2.0/{name}"}]} for name, c in COLLECTIONS.items()]}

    def h_network_extensions(self, req):
        names = {"external-net": "Neutron external network", "router": "Neutron L3 Router",
                 "security-group": "security-group", "quotas": "Quota management support",
                 "port-security": "Port Security", "binding": "Port Binding", "allowed-address-pairs":
                 "Allowed Address Pairs", "extra_dhcp_opt": "Neutron Extra DHCP options",
                 "standard-attr-description": "standard-attr-description", "standard-attr-revisions":
                 "Resource revision numbers", "standard-attr-timestamp": "Resource timestamps",
                 "standard-attr-tag": "Tag support for resources with standard attribute",
                 "fip-port-details": "Floating IP Port Details Extension", "availability_zone": "Availability Zone",
                 "network_availability_zone": "Network Availability Zone", "subnet_allocation": "Subnet Allocation"}
        return 200, {"extensions": [{"alias": a, "name": n, "description": n, "updated": "2013-01-01T10:00:00-00:00",
                                     "links": []} for a, n in names.items()]}

    def _collection(self, kind):
        return getattr(self, COLLECTIONS[kind][1])

    def _neutron_item(self, kind, rid):
        item = self._collection(kind).get(rid)
        if item is None:
            t, msg = NEUTRON_NOT_FOUND[kind]
            raise neutron_error(404, t, msg.format(rid))
        return item

    def _neutron_view(self, kind, item):
        if kind == "floatingips":
            port = self.ports.get(item["port_id"] or "")
            item = {**item, "port_details": None if port is None else {
                "name": port["name"], "network_id": port["network_id"], "mac_address": port["mac_address"],
                "admin_state_up": True, "status": port["status"], "device_id": port["device_id"],
                "device_owner": port["device_owner"]}}
        if kind == "security-groups":
            item = {**item, "security_group_rules": [self.rules[r] for r in item["rule_ids"]]}
            item.pop("rule_ids")
        return json.loads(json.dumps(item))  # a deep copy

    @staticmethod
    def _matches(value, wanted):
        if isinstance(value, bool):
            return str(value).lower() in {w.lower() for w in wanted}
        if value is None:
            return any(w in ("", "None", "null") for w in wanted)
        if isinstance(value, list):
            return any(str(v) in wanted for v in value)
        return str(value) in wanted

    def h_neutron_list(self, req, kind):
        items = [self._neutron_view(kind, i) for i in self._collection(kind).values()]
        for key, wanted in req.query.items():
            if key in ("fields", "limit", "marker", "sort_key", "sort_dir", "page_reverse"):
                continue
            if key == "fixed_ips":  # ports?fixed_ips=ip_address=X or subnet_id=Y
                pairs = [w.split("=", 1) for w in wanted if "=" in w]
                items = [i for i in items if all(any(ip.get(k) == v for ip in i["fixed_ips"]) for k, v in pairs)]
                continue
            items = [i for i in items if key not in i or self._matches(i[key], wanted)]
        fields = req.query.get("fields")
        if fields:
            items = [{k: v for k, v in i.items() if k in fields} for i in items]
        return 200, {kind.replace("-", "_"): items}

    def h_neutron_get(self, req, kind, rid):
        item = self._neutron_view(kind, self._neutron_item(kind, rid))
        fields = req.query.get("fields")
        if fields:
            item = {k: v for k, v in item.items() if k in fields}
        return 200, {COLLECTIONS[kind][0]: item}

    def h_network_quota(self, req, project):
        q = self.quota
        return 200, {"quota": {"network": 100, "subnet": 100, "router": 10, "port": q["ports"],
                               "floatingip": q["floating_ips"], "security_group": q["security_groups"],
                               "security_group_rule": q["security_group_rules"]}}

    def _neutron_body(self, req, key):
        body = req.json.get(key)
        if not isinstance(body, dict):
            raise neutron_error(400, "HTTPBadRequest", f"Resource body required: '{key}'")
        return body

    @staticmethod
    def _stamp(item):
        item["updated_at"] = _iso()
        item["revision_number"] += 1

    def _over_quota(self, resource, used, key):
        if used >= self.quota[key] >= 0:
            raise neutron_error(409, "OverQuota", f"Quota exceeded for resources: ['{resource}'].")

    # ports
    def _alloc_ip(self, network, start=200):
        subnet = self.subnets[self.networks[network]["subnets"][0]]
        prefix = subnet["cidr"].split("/")[0].rsplit(".", 1)[0]
        used = {ip["ip_address"] for p in self.ports.values() for ip in p["fixed_ips"]}
        used |= {f["floating_ip_address"] for f in self.floating_ips.values()}
        used |= {h["address"] for h in self.hosts or []}
        for i in list(range(start, 255)) + list(range(10, start)):
            if f"{prefix}.{i}" not in used:
                return subnet["id"], f"{prefix}.{i}"
        raise neutron_error(409, "IpAddressGenerationFailure",
                            f"No more IP addresses available on network {network}.")

    def _new_port(self, network, name, device_id="", device_owner="", sg_ids=None, address=None, description=""):
        self._over_quota("port", len(self.ports), "ports")
        if address is None:
            subnet_id, address = self._alloc_ip(network)
        else:
            subnet_id = self.networks[network]["subnets"][0]
        now = _iso()
        p = {"id": str(uuid.uuid4()), "name": name, "network_id": network, "tenant_id": self.project_id,
             "project_id": self.project_id, "mac_address": _mac(), "admin_state_up": True,
             "status": "ACTIVE" if device_id else "DOWN", "device_id": device_id, "device_owner": device_owner,
             "fixed_ips": [{"subnet_id": subnet_id, "ip_address": address}],
             "security_groups": list(sg_ids if sg_ids is not None else [self.default_sg]),
             "allowed_address_pairs": [], "extra_dhcp_opts": [], "description": description,
             "binding:vnic_type": "normal", "port_security_enabled": True, "tags": [], "created_at": now,
             "updated_at": now, "revision_number": 1, "dns_name": "", "dns_assignment": []}
        self.ports[p["id"]] = p
        return p

    def _check_sgs(self, ids):
        for gid in ids:
            if gid not in self.security_groups:
                raise neutron_error(404, "SecurityGroupNotFound", f"Security group {gid} does not exist")

    def h_port_create(self, req):
        body = self._neutron_body(req, "port")
        net = body.get("network_id")
        if net not in self.networks:
            raise neutron_error(404, "NetworkNotFound", f"Network {net} could not be found.")
        sgs = body.get("security_groups")
        if sgs is not None:
            self._check_sgs(sgs)
        p = self._new_port(net, str(body.get("name", "")), device_id=str(body.get("device_id", "")),
                           device_owner=str(body.get("device_owner", "")), sg_ids=sgs,
                           description=str(body.get("description", "")))
        if "admin_state_up" in body:
            p["admin_state_up"] = bool(body["admin_state_up"])
        return 201, {"port": self._neutron_view("ports", p)}

    def h_port_update(self, req, pid):
        p = self._neutron_item("ports", pid)
        body = self._neutron_body(req, "port")
        bad = set(body) - {"name", "description", "security_groups", "admin_state_up", "device_id",
                           "device_owner", "allowed_address_pairs", "port_security_enabled"}
        if bad:
            raise neutron_error(400, "HTTPBadRequest", f"Cannot update read-only attribute {sorted(bad)[0]}")
        if "security_groups" in body:
            self._check_sgs(body["security_groups"] or [])
        p.update(body)
        self._stamp(p)
        return 200, {"port": self._neutron_view("ports", p)}

    def _delete_port(self, pid):
        for f in self.floating_ips.values():
            if f["port_id"] == pid:
                self._associate(f, None)
        del self.ports[pid]

    def h_port_delete(self, req, pid):
        self._neutron_item("ports", pid)
        self._delete_port(pid)
        return 204, None

    # security groups
    def _new_rule(self, group_id, direction, ethertype="IPv4", protocol=None, lo=None, hi=None, prefix=None,
                  remote_group=None, description=""):
        now = _iso()
        r = {"id": str(uuid.uuid4()), "tenant_id": self.project_id, "project_id": self.project_id,
             "security_group_id": group_id, "direction": direction, "ethertype": ethertype, "protocol": protocol,
             "port_range_min": lo, "port_range_max": hi, "remote_ip_prefix": prefix,
             "remote_group_id": remote_group, "remote_address_group_id": None, "normalized_cidr": prefix,
             "description": description, "tags": [], "created_at": now, "updated_at": now, "revision_number": 0}
        self.rules[r["id"]] = r
        self.security_groups[group_id]["rule_ids"].append(r["id"])
        return r

    def _new_sg(self, name, description, default=False):
        now = _iso()
        g = {"id": str(uuid.uuid4()), "name": name, "description": description, "tenant_id": self.project_id,
             "project_id": self.project_id, "rule_ids": [], "stateful": True, "shared": False, "tags": [],
             "created_at": now, "updated_at": now, "revision_number": 1}
        self.security_groups[g["id"]] = g
        for ethertype in ("IPv4", "IPv6"):  # every group may send anything
            self._new_rule(g["id"], "egress", ethertype)
        if default:  # and the default group lets its members talk to each other
            for ethertype in ("IPv4", "IPv6"):
                self._new_rule(g["id"], "ingress", ethertype, remote_group=g["id"])
        return g

    def _sg_by_name(self, name):
        return next((g for g in self.security_groups.values() if name in (g["name"], g["id"])), None)

    def h_sg_create(self, req):
        body = self._neutron_body(req, "security_group")
        name = str(body.get("name", ""))
        if name == "default":
            raise neutron_error(409, "SecurityGroupDefaultAlreadyExists", "Default security group already exists.")
        self._over_quota("security_group", len(self.security_groups), "security_groups")
        g = self._new_sg(name, str(body.get("description", "")))
        return 201, {"security_group": self._neutron_view("security-groups", g)}

    def h_sg_update(self, req, gid):
        g = self._neutron_item("security-groups", gid)
        body = self._neutron_body(req, "security_group")
        if g["id"] == self.default_sg and body.get("name", "default") != "default":
            raise neutron_error(409, "SecurityGroupCannotUpdateDefault", "Updating default security group not "
                                                                         "allowed.")
        for key in ("name", "description"):
            if key in body:
                g[key] = str(body[key])
        self._stamp(g)
        return 200, {"security_group": self._neutron_view("security-groups", g)}

    def h_sg_delete(self, req, gid):
        g = self._neutron_item("security-groups", gid)
        if gid == self.default_sg:
            raise neutron_error(409, "SecurityGroupCannotRemoveDefault", "Insufficient rights for removing default "
                                                                         "security group.")
        if any(gid in p["security_groups"] for p in self.ports.values()):
            raise neutron_error(409, "SecurityGroupInUse", f"Security Group {gid} in use.")
        for rid in g["rule_ids"]:
            self.rules.pop(rid, None)
        for r in list(self.rules.values()):  # rules elsewhere that name this group as their remote go too
            if r["remote_group_id"] == gid:
                self.security_groups[r["security_group_id"]]["rule_ids"].remove(r["id"])
                del self.rules[r["id"]]
        del self.security_groups[gid]
        return 204, None

    def h_rule_create(self, req):
        body = self._neutron_body(req, "security_group_rule")
        gid = body.get("security_group_id")
        if gid not in self.security_groups:
            raise neutron_error(404, "SecurityGroupNotFound", f"Security group {gid} does not exist")
        direction = body.get("direction")
        if direction not in ("ingress", "egress"):
            raise neutron_error(400, "HTTPBadRequest", f"Invalid input for direction. Reason: '{direction}' is not "
                                                       "in ['ingress', 'egress'].")
        ethertype = body.get("ethertype", "IPv4")
        if ethertype not in ("IPv4", "IPv6"):
            raise neutron_error(400, "SecurityGroupRuleInvalidEtherType", f"Security group rule for ethertype "
                                                                          f"'{ethertype}' not supported.")
        protocol = body.get("protocol")
        if protocol is not None and str(protocol).lower() not in ("tcp", "udp", "icmp", "icmpv6", "any") \
                and not str(protocol).isdigit():
            raise neutron_error(400, "SecurityGroupRuleInvalidProtocol", f"Security group rule protocol {protocol} "
                                                                         "not supported.")
        protocol = None if protocol in (None, "any") else str(protocol).lower()
        lo, hi = body.get("port_range_min"), body.get("port_range_max")
        try:
            lo = None if lo is None else int(lo)
            hi = None if hi is None else int(hi)
        except (TypeError, ValueError):
            raise neutron_error(400, "HTTPBadRequest", "Invalid value for port") from None
        if (lo is not None or hi is not None) and protocol is None:
            raise neutron_error(400, "SecurityGroupProtocolRequiredWithPorts",
                                "Must also specify protocol if port range is given.")
        if protocol in ("tcp", "udp") and lo is not None and hi is not None and lo > hi:
            raise neutron_error(400, "SecurityGroupInvalidPortRange", "For TCP/UDP protocols, port_range_min must "
                                                                      "be <= port_range_max")
        prefix, remote = body.get("remote_ip_prefix"), body.get("remote_group_id")
        if prefix and remote:
            raise neutron_error(400, "SecurityGroupRemoteGroupAndRemoteIpPrefix",
                                "Only remote_ip_prefix or remote_group_id may be provided.")
        if remote and remote not in self.security_groups:
            raise neutron_error(404, "SecurityGroupNotFound", f"Security group {remote} does not exist")
        for rid in self.security_groups[gid]["rule_ids"]:
            r = self.rules[rid]
            if (r["direction"], r["ethertype"], r["protocol"], r["port_range_min"], r["port_range_max"],
                    r["remote_ip_prefix"], r["remote_group_id"]) == (direction, ethertype, protocol, lo, hi,
                                                                    prefix, remote):
                raise neutron_error(409, "SecurityGroupRuleExists",
                                    f"Security group rule already exists. Rule id is {rid}.")
        self._over_quota("security_group_rule", len(self.rules), "security_group_rules")
        r = self._new_rule(gid, direction, ethertype, protocol, lo, hi, prefix, remote,
                           str(body.get("description", "")))
        self._stamp(self.security_groups[gid])
        return 201, {"security_group_rule": dict(r)}

    def h_rule_delete(self, req, rid):
        r = self._neutron_item("security-group-rules", rid)
        self.security_groups[r["security_group_id"]]["rule_ids"].remove(rid)
        del self.rules[rid]
        return 204, None

    # floating IPs
    def _route(self, fip, on):
        """Make a lab-backed floating IP reachable, as a cloud's router would (labhost.floating_ip_commands)."""
        port = self.ports.get(fip.get("port_id") or "")
        s = self.servers.get(port["device_id"]) if port else None
        host = self._lab_host(s) if s else None
        if not host:
            return
        cmds = labhost.floating_ip_commands(host, self.hosts, fip["floating_ip_address"], on)
        for c in cmds:
            subprocess.run(c, capture_output=True)

    def _associate(self, fip, port_id, error=None):
        """Point a floating IP at a port (or at nothing)."""
        if fip.get("port_id"):
            self._route(fip, False)
        if port_id is None:
            fip.update(port_id=None, fixed_ip_address=None, router_id=None, status="DOWN")
        else:
            port = self.ports.get(port_id)
            if port is None:
                raise (error or (lambda c, m: neutron_error(c, "PortNotFound", m)))(
                    404, f"Port {port_id} could not be found.")
            if port["network_id"] != self.lab_net:
                raise neutron_error(404, "ExternalGatewayForFloatingIPNotFound",
                                    f"External network {self.public_net} is not reachable from subnet "
                                    f"{port['fixed_ips'][0]['subnet_id']}.  Therefore, cannot associate Port "
                                    f"{port_id} with a Floating IP.")
            other = next((f for f in self.floating_ips.values() if f["port_id"] == port_id and f is not fip), None)
            if other is not None:
                raise neutron_error(409, "FloatingIPPortAlreadyAssociated",
                                    f"Cannot associate floating IP {fip['floating_ip_address']} ({fip['id']}) with "
                                    f"port {port_id} using fixed IP {port['fixed_ips'][0]['ip_address']}, as that "
                                    f"fixed IP already has a floating IP on external network {self.public_net}.")
            fip.update(port_id=port_id, fixed_ip_address=port["fixed_ips"][0]["ip_address"],
                       router_id=self.router_id, status="ACTIVE")
            self._route(fip, True)
        self._stamp(fip)

    def h_fip_create(self, req):
        body = self._neutron_body(req, "floatingip")
        net = body.get("floating_network_id")
        if net not in self.networks:
            raise neutron_error(404, "NetworkNotFound", f"Network {net} could not be found.")
        if not self.networks[net]["router:external"]:
            raise neutron_error(400, "BadRequest", f"Bad floatingip request: Network {net} is not a valid "
                                                   "external network.")
        self._over_quota("floatingip", len(self.floating_ips), "floating_ips")
        wanted = body.get("floating_ip_address")
        if wanted:
            if any(f["floating_ip_address"] == wanted for f in self.floating_ips.values()):
                raise neutron_error(409, "IpAddressAlreadyAllocated", f"IP address {wanted} already allocated in "
                                                                      f"subnet {self.public_subnet}")
            address = wanted
        else:
            address = self._alloc_ip(net, start=10)[1]
        now = _iso()
        fip = {"id": str(uuid.uuid4()), "floating_ip_address": address, "floating_network_id": net,
               "router_id": None, "port_id": None, "fixed_ip_address": None, "status": "DOWN",
               "tenant_id": self.project_id, "project_id": self.project_id,
               "description": str(body.get("description", "")), "tags": [], "port_forwardings": [],
               "qos_policy_id": None, "dns_domain": "", "dns_name": "", "created_at": now, "updated_at": now,
               "revision_number": 0}
        self.floating_ips[fip["id"]] = fip
        try:
            if body.get("port_id"):
                self._associate(fip, body["port_id"])
        except ApiError:
            del self.floating_ips[fip["id"]]
            raise
        return 201, {"floatingip": self._neutron_view("floatingips", fip)}

    def h_fip_update(self, req, fid):
        fip = self._neutron_item("floatingips", fid)
        body = self._neutron_body(req, "floatingip")
        if "port_id" in body:
            self._associate(fip, body["port_id"] or None)
        if "description" in body:
            fip["description"] = str(body["description"])
        return 200, {"floatingip": self._neutron_view("floatingips", fip)}

    def h_fip_delete(self, req, fid):
        fip = self._neutron_item("floatingips", fid)
        if fip.get("port_id"):
            self._associate(fip, None)
        del self.floating_ips[fid]
        return 204, None

    # -- the emulator's control surface ---------------------------------------------------------
    def h_emu_faults_get(self, req):
        return 200, {"faults": json.loads(json.dumps(self.faults)), "known": FAULTS}

    def h_emu_faults_set(self, req):
        body = req.json
        unknown = set(body) - set(FAULTS)
        if unknown:
            raise ApiError(400, {"error": f"unknown fault {sorted(unknown)[0]!r}; known: {', '.join(FAULTS)}"})
        for name, value in body.items():
            if name == "slow_build":
                spec = value if isinstance(value, dict) else {"seconds": value, "count": None}
                try:
                    seconds = float(spec.get("seconds") or 0)
                    count = None if spec.get("count") is None else int(spec["count"])
                except (TypeError, ValueError):
                    raise ApiError(400, {"error": "slow_build takes seconds or {seconds, count}"}) from None
                if seconds <= 0 or count == 0:
                    self.faults.pop(name, None)
                else:
                    self.faults[name] = {"seconds": seconds, "count": count}
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ApiError(400, {"error": f"fault {name} takes a count >= 0, not {value!r}"})
            if value:
                self.faults[name] = value
            else:
                self.faults.pop(name, None)
        return 200, {"faults": json.loads(json.dumps(self.faults))}

    def h_emu_quota_get(self, req):
        return 200, {"quota": dict(self.quota)}

    def h_emu_quota_set(self, req):
        body = req.json
        unknown = set(body) - set(DEFAULT_QUOTA)
        if unknown:
            raise ApiError(400, {"error": f"unknown quota {sorted(unknown)[0]!r}; known: {', '.join(DEFAULT_QUOTA)}"})
        for k, v in body.items():
            if not isinstance(v, int) or isinstance(v, bool) or v < -1:
                raise ApiError(400, {"error": f"quota {k} takes an integer >= -1 (unlimited), not {v!r}"})
        self.quota.update(body)
        return 200, {"quota": dict(self.quota)}

    def state(self):
        """Every resource of the project (the default security group aside) and the lab hosts' use."""
        with self._lock:
            self._advance()
            out = {
                "servers": [{"id": s["id"], "name": s["name"], "status": s["status"], "host": s["host"],
                             "address": s["address"], "flavor": self.flavors[s["flavor_id"]]["name"],
                             "key_name": s["key_name"], "fault": (s["fault"] or {}).get("message")}
                            for s in sorted(self.servers.values(), key=lambda s: s["seq"])],
                "ports": [{"id": p["id"], "name": p["name"], "device_id": p["device_id"],
                           "device_owner": p["device_owner"], "address": p["fixed_ips"][0]["ip_address"]}
                          for p in self.ports.values()],
                "floating_ips": [{"id": f["id"], "address": f["floating_ip_address"], "port_id": f["port_id"],
                                  "description": f["description"]} for f in self.floating_ips.values()],
                "security_groups": [{"id": g["id"], "name": g["name"], "rules": len(g["rule_ids"])}
                                    for g in self.security_groups.values() if g["id"] != self.default_sg],
                "keypairs": sorted(self.keypairs),
                "server_groups": [{"id": g["id"], "name": g["name"], "policy": g["policy"]}
                                  for g in self.server_groups.values()]}
            out["empty"] = not any(out.values())
            taken = {s["host"]: s["id"] for s in self.servers.values() if s["host"]}
            out["hosts"] = ({h["name"]: taken.get(h["name"]) for h in self.hosts} if self.hosts is not None
                            else {s["address"]: sid for sid, s in self.servers.items() if s["address"]})
            out["faults"], out["quota"] = json.loads(json.dumps(self.faults)), dict(self.quota)
            return out

    def h_emu_state(self, req):
        return 200, self.state()

    def reset(self):
        """Delete everything (lab hosts are freed as server deletions free them); faults off, quotas as built."""
        with self._lock:
            for s in list(self.servers.values()):
                self._delete_server(s)
            self._clear()
            self.faults.clear()
            self.quota = dict(self._base_quota)

    def h_emu_reset(self, req):
        self.reset()
        return 200, self.state()






def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m harness.lab.emulators.openstack",
                                 description="A loopback OpenStack API whose servers are lab hosts.")
    sub = ap.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve in the foreground; prints one JSON line once listening")
    serve.add_argument("--lab", help="the lab whose hosts back the servers (default: none, unreachable addresses)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=0, help="0 picks a free port (see the JSON line)")
    serve.add_argument("--region", default="RegionOne")
    serve.add_argument("--build-seconds", type=float, default=1.0)
    serve.add_argument("--verbose", action="store_true", help="log every request to stderr")
    args = ap.parse_args(argv)
    state = labhost.load_lab(args.lab) if args.lab else None
    emu = OpenStackEmulator(lab_state=state, host=args.host, port=args.port, region=args.region,
                            build_seconds=args.build_seconds, verbose=args.verbose).start()

    def stop():
        emu.stop()
        for h in emu.hosts or ():  # the cloud is gone: no key of its servers stays authorized
            labhost.unauthorize(h)

    labhost.serve_until_signal({"url": emu.url, "auth_url": emu.auth_url, "region": emu.region,
                                "pid": os.getpid(), "lab": args.lab, "credentials": emu.credentials}, stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
