"""A stateful loopback emulator of Exoscale's API v2 whose running instances are lab hosts.

    python -m harness.lab.emulators.exoscale serve [--lab NAME] [--port P] [--zone ch-gva-2]

One stdlib HTTP server answers under ``/v2`` (the real base URL is https://api-{zone}.exoscale.com/v2) with the
paths, JSON keys and operation objects of the OpenAPI spec that ships with the official client
(``exoscale`` 0.16.4: exoscale/openapi.json), so ``exoscale.api.v2.Client(key, secret, url=emu.url)`` runs
unchanged:

    GET    /v2/zone                              {"zones": [{name, api-endpoint, sos-endpoint}]} (unsigned: the
                                                 official client sends list-zones without credentials)
    GET    /v2/instance-type[/{id}]              {"instance-types": [{id, family, size, cpus, gpus, memory (bytes),
                                                 authorized, zones}]}; gpus only on GPU families
    GET    /v2/template[/{id}]                   ?visibility=public (default) | private, ?family=...
    POST   /v2/ssh-key {name, public-key}        -> operation;  GET /v2/ssh-key[/{name}], DELETE /v2/ssh-key/{name}
    POST   /v2/security-group {name, description} -> operation; GET /v2/security-group[/{id}], DELETE .../{id}
    POST   /v2/security-group/{id}/rules {flow-direction, protocol, start-port, end-port, network |
                                          security-group: {id | name}, icmp, description} -> operation
    DELETE /v2/security-group/{id}/rules/{rule-id}                        -> operation
    POST   /v2/instance {name, instance-type: {id}, template: {id}, disk-size, ssh-key: {name}, ssh-keys: [{name}],
                         security-groups: [{id}], labels, user-data (base64), public-ip-assignment} -> operation
    GET    /v2/instance (?ip-address=), GET /v2/instance/{id}, DELETE /v2/instance/{id} -> operation
    GET    /v2/operation/{id}                    {id, state: pending|success|failure, reference: {id, link, command},
                                                 reason and message on failure}
    GET    /v2/quota, /v2/quota/{entity}         {"quotas": [{resource, usage, limit}]} / {resource, usage, limit}
    /_emulator/state | faults | quota | reset     not Exoscale: see below (never signed, never faulted)

Where each behaviour comes from:
- Paths, bodies, enums (instance-state, operation state and reason, rule protocol/flow-direction, disk-size 10..51200,
  zone names) and the list wrappers ("instance-types", "templates", "ssh-keys", "security-groups", "instances",
  "quotas", "zones"): the bundled openapi.json. Instances refer to their type and template as {"id": ...} only
  (egoscale reads only the ids).
- Signature: requests_exoscale_auth.ExoscaleV2Auth (the official client's auth). The string to sign is
  ``"{METHOD} {path}\\n{body}\\n{values of signed-query-args, sorted by name, concatenated}\\n\\n{expires}"``
  (path as sent, percent-encoded, without the query; multi-valued args are listed but contribute no value), the
  signature is base64(HMAC-SHA256(secret, that)) and the header reads ``EXO2-HMAC-SHA256 credential=KEY[,
  signed-query-args=a;b],expires=UNIX,signature=B64``.
- Error bodies are ``{"message": "..."}`` (what egoscale v3's errors.go parses; python-exoscale's tests use
  403 ``{"message":"Invalid request signature"}``, 404 ``{"message":"Instance not found"}``). The official client
  raises ExoscaleAPIAuthException on 403, ExoscaleAPIClientException on other 4xx, ExoscaleAPIServerException on 5xx.
  Texts this emulator had to invent (no public source found): "Request has expired", the 401 for a missing
  header, "Quota exceeded ...", the no-capacity operation message, the security group in use text (CloudStack's,
  which Exoscale runs on), 429/500/504 messages. A provider should match on status and operation state/reason,
  never on these texts.
- Quota resource names ("instance", "gpu", per-family "gpu2", "gpu3", "gpua30", ...): exoscale/cli cmd/limits.go.
- Operations: every mutating call answers an operation. ssh-key and security-group calls are done at once (state
  "success"); an instance create is "pending" while the instance is "starting" and turns "success" when it is
  "running" (or "failure", reason "unavailable", when no host is free: the instance is then gone); a delete is
  "pending" while the instance is "destroying". client.wait polls every 3 s at least; poll get-operation yourself
  for speed.

Lab backing. Given the lab's state (``harness.lab.hosts``), a new instance takes a free lab host (any type fits any host:
the lab has no GPUs, a host stands for a VM of any size); its public-ip is the host's address from the start; when
it turns running its ssh key(s) are authorized on the host (labhost.authorize). Exoscale has no console log, so
host keys travel the other way: user-data ``#cloud-config`` with ``ssh_keys: {ed25519_private, ed25519_public}``
(or ecdsa_/rsa_) becomes the host's key: the lab's hostkey/hostkey.pub move to hostkey.lab/hostkey.lab.pub, the
given pair takes their place and the host's sshd gets SIGHUP (it re-executes itself, same pid, and reads the new
HostKey). Deleting the instance (or reset, or stop) releases the host (labhost.release) and restores the lab's
key the same way. Without a lab, instances get addresses in NO_LAB_SUBNET that nothing answers on.

Fault switches (``POST /_emulator/faults`` {name: count}, 0 disarms; ``GET`` lists armed ones and descriptions):
FAULTS below. rate_limit and internal_error hit every /v2 request. Quotas: constructor ``quota`` and
``POST /_emulator/quota`` ({"instance": 2, "gpu": 4}; -1 is unlimited). ``GET /_emulator/state`` (also the health
URL) lists instances with their lab host, non-default security groups, ssh keys and pending operations ("empty" is
true when none is left); ``POST /_emulator/reset`` deletes everything, disarms faults and restores the quotas.
"""
from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import hmac
import ipaddress
import json
import os
import re
import secrets
import signal
import socket
import sys
import threading
import time
import traceback
import uuid
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from harness.lab.emulators import labhost

PREFIX = "/v2"
ZONES = ("at-vie-1", "at-vie-2", "bg-sof-1", "ch-dk-2", "ch-gva-2", "de-fra-1", "de-muc-1", "hr-zag-1")
# Without a lab: private addresses inside the lab block 10.213/16, outside every lab subnet (10.213.100-199) and
# the OpenStack emulator's 10.213.0/24, so nothing answers there.
NO_LAB_SUBNET = "10.213.1.0/24"
KEY, SECRET = "EXOcloudbenchlab0000000000", "cloudbench-lab-exoscale-secret"
GIB = 1 << 30
# family -> {size: (cpus, memory GiB, gpus)} (Exoscale's published sizes; gpus None for CPU families)
TYPES = {
    "standard": {"micro": (1, 0.5, None), "tiny": (1, 1, None), "small": (2, 2, None), "medium": (2, 4, None),
                 "large": (4, 8, None), "extra-large": (4, 16, None), "huge": (8, 32, None)},
    "cpu": {"extra-large": (16, 16, None), "huge": (32, 32, None)},
    "gpu2": {"small": (8, 60, 1), "medium": (16, 90, 2), "large": (24, 120, 3), "huge": (48, 225, 4)},
    "gpu3": {"small": (12, 56, 1), "medium": (24, 120, 2), "large": (48, 224, 4)},
    "gpua30": {"small": (8, 56, 1), "medium": (16, 112, 2)},
}
UNAUTHORIZED_FAMILIES = ("gpua30",)  # "authorized": false, as GPU families are until support enables them
DEFAULT_QUOTA = {"instance": 20, "gpu": 8, "gpu2": 8, "gpu3": 8, "gpua30": 0, "snapshot": 50, "template": 10,
                 "elastic-ip": 5, "private-network": 10}
SSH_KEY_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9._-]{0,254}")
PROTOCOLS = ("ah", "all", "esp", "gre", "icmp", "icmpv6", "ipip", "tcp", "udp")
HOSTKEY_TYPES = ("ed25519", "ecdsa", "rsa")  # cloud-init ssh_keys: <type>_private / <type>_public

FAULTS = {
    "quota": "the next N POST /v2/instance answer 403 {\"message\": \"Quota exceeded ...\"}",
    "no_capacity": "the next N instances fail: their create operation ends in state failure, reason unavailable, "
                   "message 'Insufficient capacity for instance type T in zone Z' (the instance is gone)",
    "rate_limit": "the next N /v2 requests answer 429 with Retry-After: 1",
    "internal_error": "the next N /v2 requests answer 500",
    "lost_answer": "the next N POST /v2/... creates are carried out but answered 504 Gateway Timeout",
    "slow_start": "instances created while armed stay 'starting' S seconds: {\"slow_start\": S} until disarmed "
                  "with 0, or {\"slow_start\": {\"seconds\": S, \"count\": N}} for the next N instances",
}


def _iso(t=None):
    return datetime.fromtimestamp(t if t is not None else time.time(), timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _sid(*parts):
    """A stable UUID for a built-in resource (instance types, templates): the same on every run."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "cloudbench-exoscale/" + "/".join(parts)))


def sign(method, path, body, query, expires, key, secret):
    """The Authorization header value of ExoscaleV2Auth for one request (``query``: parse_qs of the query)."""
    names = sorted(query)
    values = "".join(query[n][0] for n in names if len(query[n]) == 1)
    msg = b"\n".join([f"{method} {path}".encode(), body or b"", values.encode(), b"", str(expires).encode()])
    sig = base64.standard_b64encode(hmac.new(secret.encode(), msg, hashlib.sha256).digest()).decode()
    head = f"EXO2-HMAC-SHA256 credential={key}"
    if names:
        head += ",signed-query-args=" + ";".join(names)
    return head + f",expires={expires},signature={sig}"


def host_key_from_user_data(user_data):
    """(private, public) host key pair from base64 cloud-init user-data's ``ssh_keys``, or None."""
    import yaml

    try:
        text = base64.b64decode(user_data or "", validate=True).decode()
        doc = yaml.safe_load(text) if text.lstrip().startswith("#cloud-config") else None
    except (binascii.Error, ValueError, yaml.YAMLError):
        return None
    keys = (doc or {}).get("ssh_keys") if isinstance(doc, dict) else None
    if not isinstance(keys, dict):
        return None
    for kind in HOSTKEY_TYPES:
        priv, pub = keys.get(f"{kind}_private"), keys.get(f"{kind}_public")
        if isinstance(priv, str) and "PRIVATE KEY" in priv and labhost.key_blob(pub):
            return priv.strip() + "\n", pub.strip() + "\n"
    return None


def _sighup(host, timeout=3.0):
    """sshd re-executes itself on SIGHUP (same pid) and reads its HostKey again; wait until it listens again so
    that an instance is not reported running before its host key is served."""
    try:
        os.kill(host["sshd_pid"], signal.SIGHUP)
    except (KeyError, TypeError, ProcessLookupError):
        return
    time.sleep(0.1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host["address"], 22), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)


def install_host_key(host, private, public):
    """The host's sshd presents this key from now on (the lab's own is kept as hostkey.lab)."""
    d = Path(host["dir"])
    if not (d / "hostkey.lab").exists():
        os.replace(d / "hostkey.pub", d / "hostkey.lab.pub")
        os.replace(d / "hostkey", d / "hostkey.lab")
    tmp = d / ".hostkey.new"
    tmp.write_text(private)
    os.chmod(tmp, 0o600)  # sshd refuses a private host key others can read
    os.replace(tmp, d / "hostkey")
    labhost.write_atomic(d / "hostkey.pub", public)
    _sighup(host)


def restore_host_key(host):
    """Back to the lab's own host key (no-op when it was never replaced)."""
    d = Path(host["dir"])
    if (d / "hostkey.lab").exists():
        os.replace(d / "hostkey.lab.pub", d / "hostkey.pub")
        os.replace(d / "hostkey.lab", d / "hostkey")
        _sighup(host)


class ApiError(Exception):
    def __init__(self, status, message, headers=None):
        super().__init__(message)
        self.status, self.body, self.headers = status, {"message": message}, headers or {}


_ID = r"([^/]+)"
_ROUTES = [(m, re.compile(p + "$"), name, auth) for m, p, name, auth in [
    ("GET", "/v2/zone", "zones", False),
    ("GET", "/v2/instance-type", "type_list", True),
    ("GET", f"/v2/instance-type/{_ID}", "type_get", True),
    ("GET", "/v2/template", "template_list", True),
    ("GET", f"/v2/template/{_ID}", "template_get", True),
    ("GET", "/v2/ssh-key", "key_list", True),
    ("POST", "/v2/ssh-key", "key_create", True),
    ("GET", f"/v2/ssh-key/{_ID}", "key_get", True),
    ("DELETE", f"/v2/ssh-key/{_ID}", "key_delete", True),
    ("GET", "/v2/security-group", "sg_list", True),
    ("POST", "/v2/security-group", "sg_create", True),
    ("GET", f"/v2/security-group/{_ID}", "sg_get", True),
    ("DELETE", f"/v2/security-group/{_ID}", "sg_delete", True),
    ("POST", f"/v2/security-group/{_ID}/rules", "rule_create", True),
    ("DELETE", f"/v2/security-group/{_ID}/rules/{_ID}", "rule_delete", True),
    ("GET", "/v2/instance", "instance_list", True),
    ("POST", "/v2/instance", "instance_create", True),
    ("GET", f"/v2/instance/{_ID}", "instance_get", True),
    ("DELETE", f"/v2/instance/{_ID}", "instance_delete", True),
    ("GET", f"/v2/operation/{_ID}", "operation_get", True),
    ("GET", "/v2/quota", "quota_list", True),
    ("GET", f"/v2/quota/{_ID}", "quota_get", True),
    ("GET", "/_emulator/state", "emu_state", False),
    ("POST", "/_emulator/reset", "emu_reset", False),
    ("GET", "/_emulator/faults", "emu_faults_get", False),
    ("POST", "/_emulator/faults", "emu_faults_set", False),
    ("GET", "/_emulator/quota", "emu_quota_get", False),
    ("POST", "/_emulator/quota", "emu_quota_set", False),
]]


class Request:
    def __init__(self, method, path, query, headers, raw):
        self.method, self.path, self.query, self.headers, self.raw = method, path, query, headers, raw

    @property
    def json(self):
        if not self.raw:
            return {}
        try:
            body = json.loads(self.raw)
        except ValueError:
            raise ApiError(400, "Invalid JSON body") from None
        if not isinstance(body, dict):
            raise ApiError(400, "Request body must be a JSON object")
        return body

    def arg(self, name):
        v = self.query.get(name)
        return v[0] if v else None


class ExoscaleEmulator:
    """The emulated organization in one zone, lab hosts (or none) as the hypervisors.

    ``lab_state`` is the lab's state dict or None; ``quota`` overrides DEFAULT_QUOTA entries. ``url`` ends in /v2
    (give it to ``exoscale.api.v2.Client(key, secret, url=...)``); ``credentials`` is the key pair."""

    def __init__(self, lab_state=None, host="127.0.0.1", port=0, zone="ch-gva-2", build_seconds=1.0, quota=None,
                 verbose=False):
        if zone not in ZONES:
            raise ValueError(f"unknown zone {zone!r} (expected one of: {', '.join(ZONES)})")
        unknown = set(quota or {}) - set(DEFAULT_QUOTA)
        if unknown:
            raise ValueError(f"unknown quota {sorted(unknown)} (known: {', '.join(DEFAULT_QUOTA)})")
        self.lab_state, self.zone, self.verbose = lab_state, zone, verbose
        self.build_seconds = float(build_seconds)
        self._base_quota = {**DEFAULT_QUOTA, **(quota or {})}
        self.quota = dict(self._base_quota)
        self.key, self.secret = KEY, SECRET
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._threads = []
        self._httpd = labhost.http_server(self, host, port)
        self.hosts = labhost.lab_hosts(lab_state)
        self._net_prefix = NO_LAB_SUBNET.rsplit(".", 1)[0]
        self.types = self._make_types()
        self.templates = self._make_templates()
        self.faults = {}
        self._clear()
        for h in self.hosts or ():  # a previous emulator's keys and host keys belong to no instance now
            labhost.unauthorize(h)
            restore_host_key(h)

    # -- lifecycle ------------------------------------------------------------------------------
    @property
    def url(self):
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}{PREFIX}"

    @property
    def health_url(self):
        return self.url[:-len(PREFIX)] + "/_emulator/state"

    @property
    def credentials(self):
        return {"key": self.key, "secret": self.secret}

    def start(self):
        """Serve in daemon threads (the HTTP server and a ticker that finishes builds on time)."""
        for target in (lambda: self._httpd.serve_forever(poll_interval=0.1), self._tick_loop):
            t = threading.Thread(target=target, daemon=True, name="exoscale-emulator")
            t.start()
            self._threads.append(t)
        return self

    def stop(self):
        """Stop serving; every lab host an instance held is released (key lines, processes, host key)."""
        self._stop.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        for t in self._threads:
            t.join(timeout=5)
        with self._lock:
            for inst in list(self.instances.values()):
                self._release(inst)
            for h in self.hosts or ():
                labhost.unauthorize(h)
                restore_host_key(h)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def _tick_loop(self):
        while not self._stop.wait(0.05):
            with self._lock:
                self._advance()

    # -- built-in resources ---------------------------------------------------------------------
    def _make_types(self):
        out = {}
        for family, sizes in TYPES.items():
            for size, (cpus, mem, gpus) in sizes.items():
                tid = _sid("instance-type", family, size)
                t = {"id": tid, "family": family, "size": size, "cpus": cpus, "memory": int(mem * GIB),
                     "authorized": family not in UNAUTHORIZED_FAMILIES, "zones": list(ZONES)}
                if gpus:
                    t["gpus"] = gpus
                out[tid] = t
        return out

    def _make_templates(self):
        out = {}
        for name, vis, user, family, size, desc in (
                ("Linux Ubuntu 22.04 LTS 64-bit", "public", "ubuntu", "ubuntu", 10 * GIB, ""),
                ("Linux Ubuntu 24.04 LTS 64-bit", "public", "ubuntu", "ubuntu", 10 * GIB, ""),
                ("cloudbench-lab", "private", "root", "other", 8 * GIB, "the lab hosts' system (this machine's)")):
            tid = _sid("template", name)
            out[tid] = {"id": tid, "name": name, "description": desc, "visibility": vis, "family": family,
                        "default-user": user, "size": size, "ssh-key-enabled": True,
                        "password-enabled": vis == "public",
                        "boot-mode": "uefi" if vis == "public" else "legacy", "zones": [self.zone],
                        "checksum": hashlib.md5(name.encode()).hexdigest(), "created-at": "2024-01-01T00:00:00Z",
                        "maintainer": "Exoscale" if vis == "public" else "cloudbench",
                        "version": "22.04" if "22.04" in name else ("24.04" if "24.04" in name else "1"),
                        "build": "2024-01-01-000000", "application-consistent-snapshot-enabled": False}
        return out

    def _clear(self):
        self.instances, self.ssh_keys, self.operations = {}, {}, {}
        self.security_groups = {}
        self._seq = 0
        gid = str(uuid.uuid4())
        self.default_sg = gid
        self.security_groups[gid] = {"id": gid, "name": "default", "description": "Default Security Group",
                                     "rules": [], "external-sources": []}

    # -- request handling -----------------------------------------------------------------------
    def handle(self, method, target, headers, raw):
        """Answer one HTTP request: (status, body, headers)."""
        split = urlsplit(target)
        path = split.path.rstrip("/") or "/"
        req = Request(method, path, parse_qs(split.query), headers, raw)
        req.raw_path = split.path
        try:
            with self._lock:
                self._advance()
                api = path == PREFIX or path.startswith(PREFIX + "/")
                if api:
                    self._injected_faults()
                status, body = self._dispatch(req)
                if api and method == "POST" and status == 200 and self._take("lost_answer"):
                    raise ApiError(504, "Gateway Timeout")
            return status, body, {}
        except ApiError as e:
            return e.status, e.body, e.headers
        except Exception:  # noqa: BLE001 (an emulator bug must still answer, as a 500)
            traceback.print_exc()
            return 500, {"message": "Internal Server Error"}, {}

    def _injected_faults(self):
        if self._take("rate_limit"):
            raise ApiError(429, "Too Many Requests", {"Retry-After": "1"})
        if self._take("internal_error"):
            raise ApiError(500, "Internal Server Error")

    def _dispatch(self, req):
        allowed = False
        for method, pattern, name, auth in _ROUTES:
            m = pattern.match(req.path)
            if not m:
                continue
            if req.method != method:
                allowed = True
                continue
            if auth:
                self._authenticate(req)
            return getattr(self, "h_" + name)(req, *m.groups())
        if allowed:
            raise ApiError(405, "Method Not Allowed")
        raise ApiError(404, "Not Found")

    def _authenticate(self, req):
        """Check the EXO2-HMAC-SHA256 signature as the API does (see the module docstring)."""
        head = req.headers.get("Authorization") or ""
        if not head.startswith("EXO2-HMAC-SHA256 "):
            raise ApiError(401, "Missing or malformed Authorization header (expected EXO2-HMAC-SHA256)")
        fields = dict(kv.split("=", 1) for kv in head[len("EXO2-HMAC-SHA256 "):].split(",") if "=" in kv)
        try:
            expires = int(fields["expires"])
            key, given = fields["credential"], fields["signature"]
        except (KeyError, ValueError):
            raise ApiError(401, "Missing or malformed Authorization header (expected EXO2-HMAC-SHA256)") from None
        if expires < time.time():
            raise ApiError(403, "Request has expired")
        names = [n for n in fields.get("signed-query-args", "").split(";") if n]
        query = {n: req.query.get(n, []) for n in names}
        want = sign(req.method, req.raw_path, req.raw, {n: v for n, v in query.items()}, expires, self.key,
                    self.secret).rsplit("signature=", 1)[1]
        if key != self.key or not hmac.compare_digest(want, given):
            raise ApiError(403, "Invalid request signature")

    def _take(self, name):
        """Consume one occurrence of an armed fault switch; True when it fired."""
        n = self.faults.get(name)
        if not n or isinstance(n, dict):
            return False
        self.faults[name] = n - 1
        if n == 1:
            del self.faults[name]
        return True

    # -- operations -----------------------------------------------------------------------------
    def _operation(self, kind, rid, state="success", link=None):
        oid = str(uuid.uuid4())
        op = {"id": oid, "state": state,
              "reference": {"id": rid, "link": link or f"{PREFIX}/{kind}/{rid}", "command": f"get-{kind}"}}
        self.operations[oid] = op
        return op

    def _fail_op(self, oid, reason, message):
        op = self.operations.get(oid)
        if op:
            op.update(state="failure", reason=reason, message=message)

    def h_operation_get(self, req, oid):
        op = self.operations.get(oid)
        if not op:
            raise ApiError(404, "Operation not found")
        return 200, op

    # -- zones, types, templates, quotas --------------------------------------------------------
    def h_zones(self, req):
        # Only the zone served here: a client must never be sent to the real API with the emulator's key.
        return 200, {"zones": [{"name": self.zone, "api-endpoint": self.url,
                                "sos-endpoint": f"https://sos-{self.zone}.exo.io"}]}

    def h_type_list(self, req):
        return 200, {"instance-types": list(self.types.values())}

    def h_type_get(self, req, tid):
        t = self.types.get(tid)
        if not t:
            raise ApiError(404, "Instance type not found")
        return 200, t

    def h_template_list(self, req):
        vis = req.arg("visibility") or "public"
        if vis not in ("public", "private"):
            raise ApiError(400, f"Invalid visibility {vis!r}: expected public or private")
        fam = req.arg("family")
        return 200, {"templates": [t for t in self.templates.values()
                                   if t["visibility"] == vis and (fam is None or t["family"] == fam)]}

    def h_template_get(self, req, tid):
        t = self.templates.get(tid)
        if not t:
            raise ApiError(404, "Template not found")
        return 200, t

    def _usage(self):
        used = dict.fromkeys(self.quota, 0)
        for inst in self.instances.values():
            t = self.types[inst["type_id"]]
            used["instance"] += 1
            if t.get("gpus"):
                used["gpu"] += t["gpus"]
                if t["family"] in used:
                    used[t["family"]] += t["gpus"]
        return used

    def h_quota_list(self, req):
        used = self._usage()
        return 200, {"quotas": [{"resource": k, "usage": used[k], "limit": v} for k, v in self.quota.items()]}

    def h_quota_get(self, req, entity):
        if entity not in self.quota:
            raise ApiError(404, f"Quota for resource {entity} not found")
        return 200, {"resource": entity, "usage": self._usage()[entity], "limit": self.quota[entity]}

    # -- ssh keys -------------------------------------------------------------------------------
    @staticmethod
    def _fingerprint(public_key):
        digest = hashlib.md5(base64.b64decode(labhost.key_blob(public_key)[1])).hexdigest()
        return ":".join(digest[i:i + 2] for i in range(0, 32, 2))

    def _key_view(self, k):
        return {"name": k["name"], "fingerprint": k["fingerprint"]}

    def h_key_list(self, req):
        return 200, {"ssh-keys": [self._key_view(k) for k in self.ssh_keys.values()]}

    def _key(self, name):
        k = self.ssh_keys.get(name)
        if not k:
            raise ApiError(404, "SSH key not found")
        return k

    def h_key_get(self, req, name):
        return 200, self._key_view(self._key(name))

    def h_key_create(self, req):
        body = req.json
        name, pub = body.get("name"), body.get("public-key")
        if not isinstance(name, str) or not SSH_KEY_NAME.fullmatch(name):
            raise ApiError(400, "Invalid SSH key name: expected ^[a-zA-Z0-9]{1}[a-zA-Z0-9._-]{0,254}$")
        if not labhost.key_blob(pub):
            raise ApiError(400, "Invalid public-key: expected an OpenSSH public key")
        if name in self.ssh_keys:
            raise ApiError(409, f"SSH key {name!r} already exists")
        self.ssh_keys[name] = {"name": name, "public-key": pub.strip(), "fingerprint": self._fingerprint(pub)}
        return 200, self._operation("ssh-key", _sid("ssh-key", name), link=f"{PREFIX}/ssh-key/{name}")

    def h_key_delete(self, req, name):
        self._key(name)
        del self.ssh_keys[name]
        return 200, self._operation("ssh-key", _sid("ssh-key", name), link=f"{PREFIX}/ssh-key/{name}")

    # -- security groups ------------------------------------------------------------------------
    def _sg(self, gid):
        g = self.security_groups.get(gid)
        if not g:
            raise ApiError(404, "Security Group not found")
        return g

    def h_sg_list(self, req):
        vis = req.arg("visibility") or "private"
        if vis not in ("public", "private"):
            raise ApiError(400, f"Invalid visibility {vis!r}: expected public or private")
        return 200, {"security-groups": list(self.security_groups.values()) if vis == "private" else []}

    def h_sg_get(self, req, gid):
        return 200, self._sg(gid)

    def h_sg_create(self, req):
        body = req.json
        name, desc = body.get("name"), body.get("description", "")
        if not isinstance(name, str) or not 1 <= len(name) <= 255:
            raise ApiError(400, "Invalid Security Group name: 1 to 255 characters expected")
        if any(g["name"] == name for g in self.security_groups.values()):
            raise ApiError(409, f"Security Group {name!r} already exists")
        gid = str(uuid.uuid4())
        self.security_groups[gid] = {"id": gid, "name": name, "description": desc or "", "rules": [],
                                     "external-sources": []}
        return 200, self._operation("security-group", gid)

    def h_sg_delete(self, req, gid):
        g = self._sg(gid)
        if gid == self.default_sg:
            raise ApiError(403, "The default Security Group cannot be deleted")
        users = [i for i in self.instances.values() if gid in i["sg_ids"]]
        if users:
            raise ApiError(409, "Cannot delete group when it's in use by virtual machines")
        for other in self.security_groups.values():  # rules of other groups naming it go with it
            other["rules"] = [r for r in other["rules"] if (r.get("security-group") or {}).get("id") != gid]
        del self.security_groups[g["id"]]
        return 200, self._operation("security-group", gid)

    def h_rule_create(self, req, gid):
        g = self._sg(gid)
        body = req.json
        direction, proto = body.get("flow-direction"), body.get("protocol")
        if direction not in ("ingress", "egress"):
            raise ApiError(400, "Invalid flow-direction: expected ingress or egress")
        if proto not in PROTOCOLS:
            raise ApiError(400, f"Invalid protocol: expected one of {', '.join(PROTOCOLS)}")
        rule = {"id": str(uuid.uuid4()), "flow-direction": direction, "protocol": proto,
                "description": body.get("description", "")}
        if proto in ("tcp", "udp"):
            lo, hi = body.get("start-port"), body.get("end-port")
            if not all(isinstance(p, int) and 1 <= p <= 65535 for p in (lo, hi)) or lo > hi:
                raise ApiError(400, "start-port and end-port (1 to 65535, start <= end) are required for tcp and udp")
            rule.update({"start-port": lo, "end-port": hi})
        elif proto in ("icmp", "icmpv6"):
            rule["icmp"] = {"type": (body.get("icmp") or {}).get("type", -1),
                            "code": (body.get("icmp") or {}).get("code", -1)}
        net, ref = body.get("network"), body.get("security-group")
        if (net is None) == (ref is None):
            raise ApiError(400, "Exactly one of network and security-group is required")
        if net is not None:
            try:
                rule["network"] = str(ipaddress.ip_network(net, strict=False))
            except ValueError:
                raise ApiError(400, f"Invalid network {net!r}: expected a CIDR") from None
        else:
            other = (self.security_groups.get(ref.get("id")) if ref.get("id") else
                     next((x for x in self.security_groups.values() if x["name"] == ref.get("name")), None))
            if not other:
                raise ApiError(404, "Security Group not found")
            rule["security-group"] = {"id": other["id"], "name": other["name"]}
        g["rules"].append(rule)
        return 200, self._operation("security-group", gid)

    def h_rule_delete(self, req, gid, rid):
        g = self._sg(gid)
        if not any(r["id"] == rid for r in g["rules"]):
            raise ApiError(404, "Security Group rule not found")
        g["rules"] = [r for r in g["rules"] if r["id"] != rid]
        return 200, self._operation("security-group", gid)

    # -- instances ------------------------------------------------------------------------------
    def _instance(self, iid):
        inst = self.instances.get(iid)
        if not inst:
            raise ApiError(404, "Instance not found")
        return inst

    def _instance_view(self, inst):
        keys = [self._key_view(k) for k in inst["keys"]]
        out = {"id": inst["id"], "name": inst["name"], "state": inst["state"], "created-at": inst["created"],
               "instance-type": {"id": inst["type_id"]}, "template": {"id": inst["template_id"]},
               "disk-size": inst["disk_size"], "labels": dict(inst["labels"]),
               "security-groups": [{"id": g} for g in inst["sg_ids"]], "ssh-keys": keys,
               "public-ip-assignment": inst["ip_assignment"], "mac-address": inst["mac"], "private-networks": [],
               "elastic-ips": [], "anti-affinity-groups": [], "snapshots": [], "secureboot-enabled": False,
               "tpm-enabled": False}
        if keys:
            out["ssh-key"] = keys[0]
        if inst["address"] and inst["ip_assignment"] != "none":
            out["public-ip"] = inst["address"]
        if inst["user_data"]:
            out["user-data"] = inst["user_data"]
        return out

    def h_instance_list(self, req):
        bad = {"labels", "manager-id", "manager-type"} & set(req.query)
        if bad:  # silently ignoring a filter would hand a caller everything (and a gc would delete it)
            raise ApiError(400, f"Filter {sorted(bad)[0]} is not supported by this emulator; filter client-side")
        ip = req.arg("ip-address")
        items = sorted(self.instances.values(), key=lambda i: i["seq"])
        return 200, {"instances": [self._instance_view(i) for i in items if ip is None or i["address"] == ip]}

    def h_instance_get(self, req, iid):
        return 200, self._instance_view(self._instance(iid))

    def h_instance_create(self, req):
        body = req.json
        ref = lambda k: (body.get(k) or {}).get("id") if isinstance(body.get(k), dict) else None  # noqa: E731
        missing = [k for k in ("disk-size", "instance-type", "template") if k not in body]
        if missing:
            raise ApiError(400, f"Missing required field(s): {', '.join(missing)}")
        t = self.types.get(ref("instance-type"))
        if not t:
            raise ApiError(404, "Instance type not found")
        if not t["authorized"]:
            raise ApiError(403, f"Instance type {t['family']}.{t['size']} is not authorized for this organization")
        tpl = self.templates.get(ref("template"))
        if not tpl:
            raise ApiError(404, "Template not found")
        size = body["disk-size"]
        if not isinstance(size, int) or isinstance(size, bool) or not 10 <= size <= 51200:
            raise ApiError(400, "Invalid disk-size: expected an integer from 10 to 51200 (GiB)")
        names = [(body.get("ssh-key") or {}).get("name")] + [k.get("name") for k in body.get("ssh-keys") or []]
        keys = [self._key(n) for n in dict.fromkeys(n for n in names if n)]
        sg_ids = [self._sg(g.get("id"))["id"] for g in body.get("security-groups") or []] or [self.default_sg]
        assignment = body.get("public-ip-assignment", "inet4")
        if assignment not in ("inet4", "dual", "none"):
            raise ApiError(400, "Invalid public-ip-assignment: expected inet4, dual or none")
        labels = body.get("labels") or {}
        if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
            raise ApiError(400, "Invalid labels: expected an object of strings")
        user_data = body.get("user-data")
        if user_data is not None:
            try:
                base64.b64decode(user_data, validate=True)
            except (binascii.Error, ValueError, TypeError):
                raise ApiError(400, "Invalid user-data: expected base64") from None
        self._check_quota(t)
        return 200, self._build(body.get("name") or None, t, tpl, size, keys, sg_ids, assignment, labels, user_data)

    def _check_quota(self, t):
        used, q = self._usage(), self.quota
        need = {"instance": 1}
        if t.get("gpus"):
            need["gpu"] = t["gpus"]
            if t["family"] in q:
                need[t["family"]] = t["gpus"]
        over = [k for k, n in need.items() if q[k] >= 0 and used[k] + n > q[k]]
        if self._take("quota") and not over:
            over = ["instance"]
        if over:
            k = over[0]
            raise ApiError(403, f"Quota exceeded for resource {k}: limit {q[k]}, usage {used[k]}, "
                                f"requested {need[k]}")

    def _free_host(self):
        taken = {i["host"] for i in self.instances.values() if i["host"]}
        if self.hosts is None:
            for n in range(10, 255):
                addr = f"{self._net_prefix}.{n}"
                if addr not in taken:
                    return {"name": addr, "address": addr, "virtual": True}
            return None
        return next((h for h in self.hosts if h["name"] not in taken), None)

    def _build(self, name, t, tpl, size, keys, sg_ids, assignment, labels, user_data):
        iid = str(uuid.uuid4())
        self._seq += 1
        seconds = self.build_seconds
        slow = self.faults.get("slow_start")
        if slow:
            seconds = slow["seconds"]
            if slow["count"] is not None:
                slow["count"] -= 1
                if slow["count"] <= 0:
                    del self.faults["slow_start"]
        host = None if self._take("no_capacity") else self._free_host()
        inst = {"id": iid, "name": name or f"instance-{iid[:8]}", "state": "starting", "created": _iso(),
                "type_id": t["id"], "template_id": tpl["id"], "disk_size": size, "keys": keys, "sg_ids": sg_ids,
                "ip_assignment": assignment, "labels": dict(labels), "user_data": user_data, "seq": self._seq,
                "mac": "06:%02x:%02x:%02x:%02x:%02x" % tuple(secrets.token_bytes(5)),
                "host": host["name"] if host else None, "address": host["address"] if host else None,
                "ready_at": time.monotonic() + seconds, "gone_at": None, "host_key": False}
        self.instances[iid] = inst
        op = self._operation("instance", iid, state="pending")
        inst["op"] = op["id"]
        if host is None:
            inst["fail"] = f"Insufficient capacity for instance type {t['family']}.{t['size']} in zone {self.zone}"
        return op

    def _lab_host(self, inst):
        if not self.hosts or not inst["host"]:
            return None
        return next((h for h in self.hosts if h["name"] == inst["host"]), None)

    def _advance(self):
        """Due transitions: starting -> running (or the create fails), destroying -> gone."""
        now = time.monotonic()
        for inst in list(self.instances.values()):
            if inst["state"] == "starting" and now >= inst["ready_at"]:
                if inst.get("fail"):
                    self._fail_op(inst["op"], "unavailable", inst["fail"])
                    del self.instances[inst["id"]]
                    continue
                host = self._lab_host(inst)
                if host:
                    for k in inst["keys"]:
                        labhost.authorize(host, k["public-key"], inst["id"])
                    pair = host_key_from_user_data(inst["user_data"])
                    if pair:
                        install_host_key(host, *pair)
                        inst["host_key"] = True
                inst["state"] = "running"
                self.operations[inst["op"]]["state"] = "success"
            elif inst["state"] == "destroying" and now >= inst["gone_at"]:
                self.operations[inst["op"]]["state"] = "success"
                del self.instances[inst["id"]]

    def _release(self, inst):
        """Free the instance's lab host: its key lines, its processes, the host key it brought."""
        host = self._lab_host(inst)
        if host:
            labhost.release(host, inst["id"])
            if inst["host_key"]:
                restore_host_key(host)
        inst["host"], inst["host_key"] = None, False

    def h_instance_delete(self, req, iid):
        inst = self._instance(iid)
        if inst["state"] == "destroying":
            raise ApiError(409, "Instance is already being destroyed")
        if inst["state"] == "starting" and inst["op"] in self.operations:
            self._fail_op(inst["op"], "interrupted", "Instance deleted while starting")
        self._release(inst)
        op = self._operation("instance", iid, state="pending")
        inst.update(state="destroying", gone_at=time.monotonic() + min(self.build_seconds, 0.5) / 2, op=op["id"])
        return 200, op

    # -- the emulator's own endpoints -----------------------------------------------------------
    def h_emu_faults_get(self, req):
        return 200, {"faults": json.loads(json.dumps(self.faults)), "known": FAULTS}

    def h_emu_faults_set(self, req):
        body = req.json
        unknown = set(body) - set(FAULTS)
        if unknown:
            raise ApiError(400, f"unknown fault {sorted(unknown)[0]!r}; known: {', '.join(FAULTS)}")
        for name, value in body.items():
            if name == "slow_start":
                spec = value if isinstance(value, dict) else {"seconds": value, "count": None}
                try:
                    seconds = float(spec.get("seconds") or 0)
                    count = None if spec.get("count") is None else int(spec["count"])
                except (TypeError, ValueError):
                    raise ApiError(400, "slow_start takes seconds or {seconds, count}") from None
                if seconds <= 0 or count == 0:
                    self.faults.pop(name, None)
                else:
                    self.faults[name] = {"seconds": seconds, "count": count}
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ApiError(400, f"fault {name} takes a count >= 0, not {value!r}")
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
            raise ApiError(400, f"unknown quota {sorted(unknown)[0]!r}; known: {', '.join(DEFAULT_QUOTA)}")
        for k, v in body.items():
            if not isinstance(v, int) or isinstance(v, bool) or v < -1:
                raise ApiError(400, f"quota {k} takes an integer >= -1 (unlimited), not {v!r}")
        self.quota.update(body)
        return 200, {"quota": dict(self.quota)}

    def state(self):
        """Every resource (the default security group aside), pending operations and the lab hosts' use."""
        with self._lock:
            self._advance()
            out = {
                "instances": [{"id": i["id"], "name": i["name"], "state": i["state"], "host": i["host"],
                               "address": i["address"], "labels": dict(i["labels"]), "host_key": i["host_key"],
                               "type": "{family}.{size}".format(**self.types[i["type_id"]])}
                              for i in sorted(self.instances.values(), key=lambda i: i["seq"])],
                "security_groups": [{"id": g["id"], "name": g["name"], "rules": len(g["rules"])}
                                    for g in self.security_groups.values() if g["id"] != self.default_sg],
                "ssh_keys": sorted(self.ssh_keys),
                "operations": [o for o in self.operations.values() if o["state"] == "pending"]}
            out["empty"] = not any(out.values())
            taken = {i["host"]: i["id"] for i in self.instances.values() if i["host"]}
            out["hosts"] = ({h["name"]: taken.get(h["name"]) for h in self.hosts} if self.hosts is not None
                            else dict(taken))
            out["faults"], out["quota"] = json.loads(json.dumps(self.faults)), dict(self.quota)
            return out

    def h_emu_state(self, req):
        return 200, self.state()

    def reset(self):
        """Delete everything (lab hosts freed as deletions free them); faults off, quotas as built."""
        with self._lock:
            for inst in list(self.instances.values()):
                self._release(inst)
            self._clear()
            self.faults.clear()
            self.quota = dict(self._base_quota)

    def h_emu_reset(self, req):
        self.reset()
        return 200, self.state()


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m harness.lab.emulators.exoscale",
                                 description="A loopback Exoscale API v2 whose instances are lab hosts.")
    sub = ap.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve in the foreground; prints one JSON line once listening")
    serve.add_argument("--lab", help="the lab whose hosts back the instances (default: none, unreachable addresses)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=0, help="0 picks a free port (see the JSON line)")
    serve.add_argument("--zone", default="ch-gva-2", choices=ZONES)
    serve.add_argument("--build-seconds", type=float, default=1.0)
    serve.add_argument("--verbose", action="store_true", help="log every request to stderr")
    args = ap.parse_args(argv)
    state = labhost.load_lab(args.lab) if args.lab else None
    emu = ExoscaleEmulator(lab_state=state, host=args.host, port=args.port, zone=args.zone,
                           build_seconds=args.build_seconds, verbose=args.verbose).start()
    labhost.serve_until_signal({"url": emu.url, "auth_url": emu.health_url, "zone": emu.zone, "pid": os.getpid(),
                                "lab": args.lab, "credentials": emu.credentials}, emu.stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
