"""The exoscale provider: a fleet of Exoscale compute instances (API v2, signed HTTP), reached over SSH.

Exoscale's current API is v2 (https://api-<zone>.exoscale.com/v2; libcloud's Exoscale driver speaks the
deprecated v1 CloudStack API). Requests are signed as Exoscale's own clients sign them
(``EXO2-HMAC-SHA256``: HMAC-SHA256 of method + path, body, the sorted query values, headers (none) and the
expiry, keyed with the API secret). Credentials: ``EXOSCALE_API_KEY`` / ``EXOSCALE_API_SECRET`` (the
variables of Exoscale's CLI and Terraform provider) or ``--option key=... secret=...``; zone
``--region``/``--option zone=`` or ``EXOSCALE_ZONE`` (default ch-gva-2); ``EXOSCALE_API_ENDPOINT`` overrides
the endpoint (the lab's emulator). ``CLOUDBENCH_EXOSCALE_PROFILE`` or ``--option profile=`` picks a
settings profile (``generic``, ``lab``).

Per run: an SSH key ``cb-<run_id>``, a security group ``cb-<run_id>`` (description
``cloudbench-run=<run_id> owner=<host:pid>``; SSH from this machine, all TCP/UDP between members) and
instances ``cb-<run_id>-<i>`` labelled ``cloudbench-run`` / ``cloudbench-owner``. Exoscale has no console
log API, so each instance gets its SSH host key from cloudbench through cloud-init user data
(``ssh_keys``), and SSH checks exactly that key. Every mutating call answers an operation that is polled
to its end; a create whose answer was lost is looked up by name and label before any retry.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import re
import subprocess
import time
from urllib.parse import urlencode, urlparse

from providers.errors import PlanError, ProviderError
from providers import cloudvm, prices
from providers.base import TAG, Capabilities, Fleet, FleetSpec, Offering, Resource
from providers.local import harness_owner
from providers.ssh import require_tools

log = logging.getLogger("cloudbench")
OWNER, RUN_ID = cloudvm.OWNER, cloudvm.RUN_ID
ZONES = ("ch-gva-2", "ch-dk-2", "de-fra-1", "de-muc-1", "at-vie-1", "at-vie-2", "bg-sof-1")
# GPU model per instance-type family (the API gives the count, not the model): Exoscale's published families.
FAMILY_GPU = {"gpu": "P100", "gpu2": "V100", "gpu3": "A40", "gpua5000": "A5000", "gpu3080ti": "RTX3080Ti"}
SETTINGS = {
    "profile": "generic | lab",
    "key": "API key (default EXOSCALE_API_KEY)",
    "secret": "API secret (default EXOSCALE_API_SECRET)",
    "zone": "zone (default EXOSCALE_ZONE, else ch-gva-2)",
    "region": "the zone (as --region)",
    "endpoint": "API endpoint (default EXOSCALE_API_ENDPOINT, else https://api-<zone>.exoscale.com/v2)",
    "device": "gpu | cpu: which instance types to consider",
    "gpu_model": "only types with this GPU model (e.g. A100, H100, V100; case-insensitive)",
    "instance_types": "instance types (family.size) the plan may use, in order (comma-separated)",
    "template": "template name or id (with TensorFlow 2.15.1 + Horovod 0.28.1, or a shared checkout)",
    "disk_size": "root disk in GB",
    "user": "login user of the template",
    "python": "interpreter on the instances",
    "workdir": "per-run scratch on the instances",
    "ssh_cidr": "where SSH may come from (default: this machine's address towards the API)",
    "host_keys": "userdata (cloudbench gives each instance its host key) | tofu (ssh-keyscan)",
    "build_timeout": "seconds an instance may take to run",
    "ssh_timeout": "seconds to wait for SSH on a running instance",
    "api_deadline": "seconds to keep retrying 429/5xx answers of one call",
    "prices": "price catalog CSV (default providers/exoscale/prices.csv)",
}
PROFILES = {
    "generic": {},
    "lab": {"device": "cpu", "instance_types": "standard.micro", "template": "cloudbench-lab", "user": "root"},
}
DEFAULTS = {"profile": "generic", "device": "gpu", "template": "Linux Ubuntu 22.04 LTS 64-bit", "disk_size": 50,
            "user": "ubuntu", "workdir": "/var/tmp/cloudbench", "host_keys": "userdata", "build_timeout": 900,
            "ssh_timeout": 300, "api_deadline": 120}


class ApiError(ProviderError):
    def __init__(self, message, code=None):
        super().__init__(message)
        self.code = code


class CapacityError(ProviderError):
    """No room for this instance type in this zone: the next shape the plan allows may fit."""


class QuotaError(CapacityError):
    """The organization's quota does not allow this shape (another may fit in it)."""


def sign(method, path, query, body, key, secret, expires):
    """Exoscale's EXO2-HMAC-SHA256 Authorization header value."""
    names = sorted(query)
    message = "\n".join([f"{method} {path}", body or "", "".join(str(query[n]) for n in names), "", str(expires)])
    sig = base64.b64encode(hmac.new(secret.encode(), message.encode(), hashlib.sha256).digest()).decode()
    parts = [f"EXO2-HMAC-SHA256 credential={key}"]
    if names:
        parts.append("signed-query-args=" + ";".join(names))
    return ",".join(parts + [f"expires={expires}", f"signature={sig}"])


class Api:
    """Signed JSON calls with retries; operations followed to their end."""

    def __init__(self, endpoint, key, secret, deadline):
        import requests

        self.endpoint, self.key, self.secret, self.deadline = endpoint.rstrip("/"), key, secret, float(deadline)
        self.http = requests.Session()

    def call(self, method, path, body=None, query=None, find=None):
        import requests

        query = {k: v for k, v in (query or {}).items() if v is not None}
        data = json.dumps(body) if body is not None else ""
        url = self.endpoint + path + ("?" + urlencode(query) if query else "")
        deadline, delay = time.monotonic() + self.deadline, 1.0
        while True:
            headers = {"Authorization": sign(method, urlparse(self.endpoint + path).path, query, data, self.key,
                                             self.secret, int(time.time()) + 600),
                       "Content-Type": "application/json", "Accept": "application/json"}
            try:
                r = self.http.request(method, url, data=data or None, headers=headers, timeout=(10, 60))
            except requests.RequestException as e:
                if isinstance(e, requests.exceptions.ConnectionError) and "resolve" in str(e).lower():
                    raise ApiError(f"exoscale: cannot resolve {urlparse(url).hostname} (zone or endpoint wrong?)") \
                        from None
                why, wait = str(e), delay
            else:
                if r.status_code < 400:
                    return r.json() if r.content else {}
                try:
                    msg = r.json().get("message") or r.text
                except ValueError:
                    msg = r.text
                if r.status_code in (401, 403) and "quota" not in msg.lower():
                    raise ApiError(f"exoscale: {method} {path}: {r.status_code} {msg} (check EXOSCALE_API_KEY and "
                                   "EXOSCALE_API_SECRET and the key's role)", r.status_code)
                if r.status_code != 429 and r.status_code < 500:
                    raise ApiError(f"exoscale: {method} {path}: {r.status_code} {msg}", r.status_code)
                why = f"{r.status_code} {msg[:200]}"
                wait = float(r.headers.get("Retry-After") or delay)
            if find is not None:
                found = find()
                if found:
                    log.warning("exoscale: %s %s: the answer was lost (%s) but it was carried out", method, path, why)
                    return found
            if time.monotonic() + wait > deadline:
                raise ApiError(f"exoscale: {method} {path} kept failing for {self.deadline:.0f} s: {why}")
            log.warning("exoscale: %s %s: %s; retrying in %.0f s", method, path, why, wait)
            time.sleep(wait)
            delay = min(delay * 2, 20.0)

    def operation(self, op, timeout=600):
        """Follow an operation to its end; returns it (its reference names what it made)."""
        deadline = time.monotonic() + timeout
        while op.get("state") == "pending":
            if time.monotonic() > deadline:
                raise ApiError(f"exoscale: operation {op.get('id')} still pending after {timeout} s")
            time.sleep(0.5)
            op = self.call("GET", f"/operation/{op['id']}")
        if op.get("state") != "success":
            raise ApiError(f"exoscale: operation {op.get('id')} {op.get('state')}: "
                           f"{op.get('message') or op.get('reason') or ''}".strip(), op.get("reason"))
        return op


class ExoscaleProvider(cloudvm.VMProvider):
    name = "exoscale"
    description = "Exoscale compute instances (API v2; EXOSCALE_API_KEY/SECRET, zones)"
    capabilities = Capabilities(gpus=True, multi_node=True, spot=False, prices=True, engines=("gloo",),
                                notes="--region ZONE; prices from providers/exoscale/prices.csv")

    def __init__(self, **options):
        unknown = set(options) - set(SETTINGS) - {"cloud", "inventory"}
        if unknown:
            raise PlanError("option", sorted(unknown)[0], "one of " + ", ".join(sorted(SETTINGS)))
        self.options = {k: v for k, v in options.items() if v is not None}
        profile = self.options.get("profile") or os.environ.get("CLOUDBENCH_EXOSCALE_PROFILE") or "generic"
        if profile not in PROFILES:
            raise PlanError("profile", profile, "one of " + ", ".join(PROFILES))
        self.settings = {**DEFAULTS, **PROFILES[profile], **self.options, "profile": profile}
        self.owner = harness_owner()
        self._api = self._types = None
        self._ssh = {}

    def setting(self, key, default=None):
        v = self.settings.get(key)
        return default if v is None else v

    @property
    def zone(self):
        z = self.setting("zone") or self.setting("region") or os.environ.get("EXOSCALE_ZONE") or "ch-gva-2"
        if z not in ZONES and not (self.setting("endpoint") or os.environ.get("EXOSCALE_API_ENDPOINT")):
            raise PlanError("zone", z, "one of " + ", ".join(ZONES))
        return z

    @property
    def api(self) -> Api:
        if self._api is None:
            key = self.setting("key") or os.environ.get("EXOSCALE_API_KEY")
            secret = self.setting("secret") or os.environ.get("EXOSCALE_API_SECRET")
            if not key or not secret:
                raise PlanError("credentials", None, "EXOSCALE_API_KEY and EXOSCALE_API_SECRET (or --option key=, "
                                                     "secret=): an API key of your Exoscale organization")
            endpoint = (self.setting("endpoint") or os.environ.get("EXOSCALE_API_ENDPOINT")
                        or f"https://api-{self.zone}.exoscale.com/v2")
            self._api = Api(endpoint, key, secret, self.setting("api_deadline"))
        return self._api

    def check(self):
        require_tools(self.name, ("ssh", "ssh-keygen", "ssh-agent", "ssh-add"))
        if self.setting("device") not in ("gpu", "cpu"):
            raise PlanError("device", self.setting("device"), "gpu or cpu")
        if self.setting("host_keys") not in ("userdata", "tofu"):
            raise PlanError("host_keys", self.setting("host_keys"), "userdata or tofu")
        self.api.call("GET", "/zone")  # authenticates and proves the endpoint answers

    # -- offerings ----------------------------------------------------------------------------------
    def instance_types(self):
        if self._types is None:
            self._types = {f"{t['family']}.{t['size']}": t
                           for t in self.api.call("GET", "/instance-type").get("instance-types", [])}
        return self._types

    def _offer(self, name, t):
        gpus = int(t.get("gpus") or 0)
        price = prices.lookup(self.name, self.zone, name, self.setting("prices"))
        row = prices.catalog(self.name, self.setting("prices")).get((self.zone, name)) or {}
        model = (row.get("gpu_model") or FAMILY_GPU.get(t.get("family"))) if gpus else None
        return Offering(instance_type=name, gpu_model=model, gpus=gpus, slots=gpus or int(t.get("cpus") or 1),
                        price_per_hour=price.price_per_hour if price else None,
                        currency=price.currency if price else None, region=self.zone)

    def offerings(self):
        types = self.instance_types()
        chosen = self.pick(types, cloudvm.listed(self.setting("instance_types")), self._offer)
        if chosen is not None:
            return chosen
        gpu = self.setting("device") == "gpu"
        offers = [self._offer(n, t) for n, t in types.items() if bool(t.get("gpus")) == gpu
                  and (not t.get("zones") or self.zone in t["zones"])]
        return self.by_model(sorted(offers, key=lambda o: (-o.slots if gpu else o.slots, o.instance_type)))

    @property
    def where(self):
        return f"zone {self.zone}"

    # -- provision ----------------------------------------------------------------------------------
    def provision(self, spec: FleetSpec, on_record):
        run, d = spec.run_id, self.state_dir(spec)
        shapes = self.shapes(spec.slots, spec.instance_type)
        base = (("zone", self.zone), ("state_dir", str(d)), ("profile", self.setting("profile")))
        on_record(Fleet(run_id=run, provider=self.name, instance_type=shapes[0][0].instance_type, nodes=(),
                        engine=spec.engine, extra=base))  # before anything exists: `cloudbench down` finds it
        d.mkdir(parents=True, exist_ok=True)
        template = self._template()
        key = self._ssh_key(run, d)
        sg = self._security_group(run)
        last = None
        for offer, n in shapes:
            t = self.instance_types()[offer.instance_type]
            if t.get("authorized") is False:
                last = ProviderError(f"instance type {offer.instance_type} is not authorized for this organization "
                                     "(GPU types need a request to Exoscale support)")
                log.warning("exoscale: %s", last)
                continue
            try:
                self._check_quota(offer, n)
                log.info("exoscale: %d x %s in %s (%s)", n, offer.instance_type, self.zone,
                         cloudvm.shape_text(offer, n))
                instances = self._instances_up(run, offer, n, t, template, key, sg, d)
            except CapacityError as e:
                log.warning("exoscale: %d x %s: %s; trying the next type the plan allows", n, offer.instance_type, e)
                last = e
                continue
            return self._finish(spec, offer, n, instances, d, base, on_record)
        raise ProviderError(f"exoscale: nothing the plan allows fits {spec.slots} slots in {self.zone}: tried "
                            + ", ".join(f"{n} x {o.instance_type}" for o, n in shapes) + f" (last: {last})")

    def _template(self):
        want = self.setting("template")
        found = []
        for visibility in ("private", "public"):
            listed = self.api.call("GET", "/template", query={"visibility": visibility}).get("templates", [])
            found += [t for t in listed if want in (t.get("id"), t.get("name"))]
        if not found:
            raise PlanError("template", want, f"a template name or id in zone {self.zone}")
        return max(found, key=lambda t: t.get("created-at", ""))["id"]

    def _ssh_key(self, run, d):
        pub = cloudvm.keygen(d)
        name = f"cb-{run}"
        try:
            self.api.operation(self.api.call("POST", "/ssh-key", {"name": name, "public-key": pub}))
        except ApiError as e:
            if e.code != 409 and not self._find_ssh_key(name):  # made by an earlier attempt of this run
                raise
        return name

    def _find_ssh_key(self, name):
        return next((k for k in self.api.call("GET", "/ssh-key").get("ssh-keys", []) if k.get("name") == name), None)

    def _security_groups(self, name=None):
        groups = self.api.call("GET", "/security-group").get("security-groups", [])
        return [g for g in groups if name is None or g.get("name") == name]

    def _security_group(self, run):
        name, tag = f"cb-{run}", f"{TAG}={run} owner={self.owner}"

        def find():
            g = next((g for g in self._security_groups(name)
                      if (g.get("description") or "").startswith(f"{TAG}={run}")), None)
            return {"state": "success", "reference": {"id": g["id"]}} if g else None

        cidr = cloudvm.caller_cidr("Exoscale", self.api.endpoint, self.setting("ssh_cidr"))  # before any create
        found = find()
        if found:
            gid = found["reference"]["id"]
        else:
            op = self.api.call("POST", "/security-group", {"name": name, "description": tag}, find=find)
            gid = self.api.operation(op)["reference"]["id"]
        rules = [{"flow-direction": "ingress", "protocol": "tcp", "start-port": 22, "end-port": 22,
                  "network": cidr, "description": "ssh from cloudbench"},
                 *({"flow-direction": "ingress", "protocol": proto, "start-port": 1, "end-port": 65535,
                    "security-group": {"id": gid}, "description": "members"} for proto in ("tcp", "udp"))]

        def key(r):
            return (r.get("flow-direction"), r.get("protocol"), r.get("start-port"), r.get("network"),
                    (r.get("security-group") or {}).get("id"))

        have = {key(r) for r in self.api.call("GET", f"/security-group/{gid}").get("rules", [])}
        for rule in rules:
            if key(rule) in have:
                continue  # an earlier attempt of this run made it
            try:
                self.api.operation(self.api.call("POST", f"/security-group/{gid}/rules", rule))
            except ApiError as e:
                if e.code != 409:  # 409: made by a request whose answer was lost
                    raise
        return gid

    def _check_quota(self, offer, n):
        try:
            quotas = {q["resource"]: q for q in self.api.call("GET", "/quota").get("quotas", [])}
        except ApiError as e:
            log.warning("exoscale: no quota information (%s); creating anyway", e)
            return
        family = offer.instance_type.split(".")[0]
        for resource, need in (("instance", n), ("gpu", n * offer.gpus), (family, n * offer.gpus)):
            q = quotas.get(resource)
            if need and q and q.get("limit", -1) >= 0 and q.get("usage", 0) + need > q["limit"]:
                raise QuotaError(f"{n} x {offer.instance_type} needs {need} {resource}(s) of quota; the "
                                 f"organization uses {q.get('usage', 0)} of {q['limit']} (ask Exoscale support for "
                                 "a higher quota)")

    def _host_key(self, d, i):
        """The instance's SSH host key, made here and handed over in its user data: known before it boots."""
        path = d / f"hostkey-{i}"
        if not path.exists():
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"cb-host-{i}", "-f", str(path)],
                           check=True, capture_output=True)
        return path.read_text(), path.with_name(path.name + ".pub").read_text().strip()

    def _instances_up(self, run, offer, n, t, template, key, sg, d):
        """All n instances are asked for first (they boot in parallel), then each operation is followed."""
        ops, made = [self._create(run, i, t, template, key, sg, d) for i in range(n)], []
        try:
            for op in ops:
                made.append(op if isinstance(op, str) else self._settle(op))
            return self._wait_running(made)
        except CapacityError:  # none of this shape stays: the next shape starts from nothing
            self._delete_instances([x["id"] for x in self._tagged(run)])
            raise

    def _create(self, run, i, t, template, key, sg, d):
        """The instance's id when it exists already, else the create operation."""
        name = f"cb-{run}-{i}"
        body = {"name": name, "instance-type": {"id": t["id"]}, "template": {"id": template},
                "disk-size": int(self.setting("disk_size")), "ssh-key": {"name": key},
                "security-groups": [{"id": sg}], "labels": {TAG: run, OWNER: self.owner.replace(":", "_")},
                "public-ip-assignment": "inet4"}
        if self.setting("host_keys") == "userdata":
            private, public = self._host_key(d, i)
            body["user-data"] = base64.b64encode(("#cloud-config\nssh_deletekeys: true\nssh_keys:\n"
                                                  "  ed25519_private: |\n"
                                                  + "".join(f"    {ln}\n" for ln in private.splitlines())
                                                  + f"  ed25519_public: {public}\n").encode()).decode()

        def find():
            inst = next((x for x in self._tagged(run) if x.get("name") == name), None)
            return {"state": "success", "reference": {"id": inst["id"]}} if inst else None

        existing = find()
        if existing:
            return existing["reference"]["id"]
        try:
            return self.api.call("POST", "/instance", body, find=find)
        except ApiError as e:
            raise self._create_error(e) from None

    def _settle(self, op):
        try:
            return self.api.operation(op, timeout=float(self.setting("build_timeout")))["reference"]["id"]
        except ApiError as e:
            raise self._create_error(e) from None

    @staticmethod
    def _create_error(e):
        text = str(e).lower()
        if any(w in text for w in ("capacity", "no host", "insufficient", "unavailable")):
            return CapacityError(str(e))
        if "quota" in text:
            return ProviderError(f"{e} (the organization's quota: ask Exoscale support for more)")
        return e

    def _wait_running(self, ids):
        deadline = time.monotonic() + float(self.setting("build_timeout"))
        while True:
            got = [self.api.call("GET", f"/instance/{i}") for i in ids]
            bad = [x for x in got if x.get("state") in ("error", "destroyed", "destroying", "stopped")]
            if bad:
                raise CapacityError(f"instance {bad[0]['name']} went {bad[0]['state']}")
            if all(x.get("state") == "running" and x.get("public-ip") for x in got):
                return got
            if time.monotonic() > deadline:
                raise CapacityError(f"instances not running after {self.setting('build_timeout')} s")
            time.sleep(1)

    def _finish(self, spec, offer, n, instances, d, base, on_record):
        price = prices.lookup(self.name, self.zone, offer.instance_type, self.setting("prices"))
        machines = []
        for i, x in enumerate(sorted(instances, key=lambda x: x["name"])):
            addr = x["public-ip"]
            if self.setting("host_keys") == "userdata":
                pub = self._host_key(d, int(x["name"].rsplit("-", 1)[1]))[1].split()
                known = [f"{addr} {pub[0]} {pub[1]}"]
            else:
                known = cloudvm.host_keys(self.name, f"instance {x['name']}", addr, None, "tofu",
                                          float(self.setting("ssh_timeout")))
            machines.append({"name": x["name"], "address": addr, "id": x["id"], "known": known})
        extra = [*base, ("shape", cloudvm.shape_text(offer, n)), ("instances", [m["id"] for m in machines]),
                 *(price.record() if price else (("price_source", None),))]
        fleet, self._ssh[spec.run_id] = cloudvm.ssh_fleet(
            self.name, spec, offer, machines, d, user=self.setting("user"), workdir=self.setting("workdir"),
            python=self.setting("python"), ssh_timeout=float(self.setting("ssh_timeout")), extra=extra,
            on_record=on_record)
        return fleet

    # -- teardown and gc ----------------------------------------------------------------------------
    def _tagged(self, run=None):
        out = []
        for x in self.api.call("GET", "/instance").get("instances", []):
            r = (x.get("labels") or {}).get(TAG)
            if r and (run is None or r == run):
                out.append(x)
        return out

    def _delete_instances(self, ids, timeout=600):
        for i in ids:
            try:
                self.api.operation(self.api.call("DELETE", f"/instance/{i}"))
            except ApiError as e:
                if e.code not in (404, 409):  # 409: already being deleted
                    raise
        deadline = time.monotonic() + timeout
        while True:
            left = {x["id"] for x in self.api.call("GET", "/instance").get("instances", [])} & set(ids)
            if not left:
                return
            if time.monotonic() > deadline:
                raise ProviderError(f"exoscale: instances {', '.join(sorted(left))} still exist {timeout} s after "
                                    "deletion; `cloudbench gc --provider exoscale` retries")
            time.sleep(1)

    def teardown(self, run_id, fleet=None):
        """Delete the run's instances (and wait), then its security group and SSH key; found by label and
        name in the zone, so it works without a record and is safe to repeat."""
        gone = []
        instances = self._tagged(run_id)
        self._delete_instances([x["id"] for x in instances])
        gone += [Resource(kind="instance", id=x["id"], run_id=run_id, detail=x.get("name", "")) for x in instances]
        name = f"cb-{run_id}"
        for g in self._security_groups(name):
            if not (g.get("description") or "").startswith(f"{TAG}={run_id}"):
                continue  # named like ours, not made by cloudbench
            deadline = time.monotonic() + 60
            while True:
                try:
                    self.api.operation(self.api.call("DELETE", f"/security-group/{g['id']}"))
                    break
                except ApiError as e:
                    if e.code == 404:
                        break
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(1)  # still in use while deleted instances detach
            gone.append(Resource(kind="security_group", id=g["id"], run_id=run_id, detail=name))
        if self._find_ssh_key(name):
            try:
                self.api.operation(self.api.call("DELETE", f"/ssh-key/{name}"))
            except ApiError as e:
                if e.code != 404:
                    raise
            gone.append(Resource(kind="ssh_key", id=name, run_id=run_id))
        self._ssh.pop(run_id, None)
        return gone

    def list_tagged(self):
        found, owners = [], {}
        for x in self._tagged():
            run = x["labels"][TAG]
            owner = (x["labels"].get(OWNER) or "").rsplit("_", 1)
            owners.setdefault(run, ":".join(owner) if len(owner) == 2 else None)
            found.append(Resource(kind="instance", id=x["id"], run_id=run, detail=f"{x.get('name')} {x.get('state')}"))
        for g in self._security_groups():
            m = re.match(rf"{TAG}=(\S+)(?: owner=(\S+))?", g.get("description") or "")
            if m and g.get("name") == f"cb-{m.group(1)}":
                owners.setdefault(m.group(1), m.group(2))
                found.append(Resource(kind="security_group", id=g["id"], run_id=m.group(1), detail=g["name"]))
        runs = {r.run_id for r in found}
        for k in self.api.call("GET", "/ssh-key").get("ssh-keys", []):
            name = k.get("name", "")
            if name.startswith("cb-") and (name[3:] in runs or RUN_ID.fullmatch(name[3:])):
                found.append(Resource(kind="ssh_key", id=name, run_id=name[3:]))
        return self.with_owners(found, owners)

