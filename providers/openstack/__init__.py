"""The openstack provider: a fleet of servers on an OpenStack cloud (on-prem, CERN-style, or T-Systems OTC).

Control plane: apache-libcloud's OpenStack driver (compute API 2.x, Keystone v3 with a password or an
application credential), configured from ``clouds.yaml`` / ``OS_*`` (see ``providers.openstack.config``).
Data plane: SSH, exactly as the ssh provider does it (deploy check, horovodrun from the first server).

Per run, everything named ``cb-<run_id>...`` and found again by tag, never by a record alone:

* a key pair ``cb-<run_id>`` (a fresh ed25519 key kept in the run's results directory),
* a security group ``cb-<run_id>`` (description ``cloudbench-run=<run_id> owner=<host:pid>``): SSH from this
  machine's address, all traffic between members,
* servers ``cb-<run_id>-<i>`` with metadata ``cloudbench-run=<run_id>`` and ``cloudbench-owner=<host:pid>``,
* floating IPs (description ``cloudbench-run=<run_id>``) only when a pool is configured.

The shape (servers x GPUs) comes from the flavors' extra specs; a server that hits "no valid host" makes the
next allowed (flavor, zone) be tried; a server in ERROR or stuck in BUILD is deleted, counted and replaced
up to ``replacements`` times; 429 and 5xx answers are retried with backoff until ``api_deadline``. Host keys
come from the console log (cloud-init prints them), so SSH never trusts on first use unless told to.
"""
from __future__ import annotations

import logging
import os
import re
import socket
import time
from pathlib import Path

from requests.exceptions import RequestException

from providers.errors import CloudbenchError, PlanError, ProviderError
from providers import cloudvm
from providers.base import TAG, Capabilities, Fleet, FleetSpec, Offering, Resource
from providers.local import harness_owner, owner_alive
from providers.openstack import config as osconfig
from providers.ssh import require_tools

log = logging.getLogger("cloudbench")
OWNER_KEY = "cloudbench-owner"
NO_VALID_HOST = ("no valid host", "not enough hosts available", "insufficient capacity")
RUN_ID = re.compile(r"\d{8}-\d{6}-[a-z0-9_.-]+-[0-9a-f]{4}")  # harness.results.new_run_id


class CapacityError(ProviderError):
    """The cloud has no room for this (flavor, zone): the next one the plan allows may have."""


class ApiError(ProviderError):
    """An OpenStack API call failed; ``code`` is the HTTP status (None: no answer)."""

    def __init__(self, message, code=None):
        super().__init__(message)
        self.code = code


UNRESOLVED = ("name or service not known", "nodename nor servname", "no address associated")


class Api:
    """The libcloud driver, with calls retried on 429/5xx/connection errors until a deadline.

    A request that creates something (POST) may have been carried out even when its answer was a 5xx or a
    timeout: it is retried only after ``find()`` says the thing does not exist (else that is returned)."""

    def __init__(self, cloud: osconfig.Cloud):
        self.cloud = cloud
        self.deadline = cloud.get("api_deadline")
        self._driver = None

    @property
    def driver(self):
        if self._driver is None:
            from libcloud.compute.providers import get_driver
            from libcloud.compute.types import Provider as LibcloudProvider

            import libcloud.security

            c = self.cloud
            if c.cacert:  # clouds.yaml `cacert:` (an on-prem cloud's own CA)
                libcloud.security.CA_CERTS_PATH = os.path.expanduser(c.cacert)
            if c.verify is False:
                log.warning("openstack: TLS verification is off for cloud %s (verify: false)", c.name)
                libcloud.security.VERIFY_SSL_CERT = False
            cls = get_driver(LibcloudProvider.OPENSTACK)
            base = re.sub(r"/v3/?$", "", c.auth_url.rstrip("/"))
            kw = {"ex_force_auth_url": base, "ex_force_service_region": c.region, "api_version": "2.0",
                  "ex_domain_name": c.user_domain, "ex_tenant_domain_id": c.project_domain_id}
            if c.auth_type == "application_credential":
                self._driver = cls(c.app_cred_id, c.app_cred_secret, ex_force_auth_version="3.x_appcred", **kw)
            else:
                self._driver = cls(c.username, c.password, ex_force_auth_version="3.x_password",
                                   ex_tenant_name=c.project_name, **kw)
        return self._driver

    def call(self, what, fn, find=None):
        from libcloud.common.types import InvalidCredsError, LibcloudError

        t0, delay = time.monotonic(), 1.0
        c = self.cloud
        while True:
            try:
                return fn()
            except InvalidCredsError as e:
                raise ApiError(f"OpenStack authentication failed at {c.auth_url} (cloud {c.name}, {c.source}, "
                               f"{c.auth_type}): {e}", 401) from None
            except Exception as e:  # noqa: BLE001 (classified below; anything else propagates)
                code = getattr(e, "code", None)
                if code is None:  # a failed Keystone call: MalformedResponseError "code: N body: ..."
                    m = re.search(r"code: (\d{3})", str(getattr(e, "body", "")))
                    code = int(m.group(1)) if m else None
                text = str(getattr(e, "message", None) or e)
                if code is None and any(u in text.lower() for u in UNRESOLVED):
                    raise ApiError(f"OpenStack {what}: cannot resolve the cloud's host ({text}); check auth_url "
                                   f"{c.auth_url} of cloud {c.name} ({c.source})") from None
                if type(e).__name__ == "SSLError":
                    raise ApiError(f"OpenStack {what}: TLS verification failed ({text}); give the cloud's CA bundle "
                                   f"as `cacert:` in its clouds.yaml entry ({c.source})") from None
                network = isinstance(e, (ConnectionError, socket.timeout, TimeoutError, RequestException))
                transient = code == 429 or (isinstance(code, int) and 500 <= code < 600) or network
                if not transient:
                    if code is None and isinstance(e, (LibcloudError, ValueError)):  # catalog and endpoint trouble
                        raise ApiError(f"OpenStack {what}: {text} (cloud {c.name}, region {c.region}: does its "
                                       "catalog have compute, network and image endpoints in that region?)") from None
                    if code is None and not hasattr(e, "message"):
                        raise
                    raise ApiError(f"OpenStack {what}: {text}", code) from None
                if find is not None and code != 429:
                    # Carried out after all? Then it must not be made twice. With no answer at all the cloud
                    # may still be working on it: look a few times before asking again.
                    for attempt in range(1 if code else 3):
                        found = find()
                        if found is not None:
                            log.info("OpenStack %s answered %s but was carried out; using it", what,
                                     code or "nothing")
                            return found
                        if code is None and attempt < 2:
                            time.sleep(2)
                wait = getattr(e, "retry_after", 0) or delay
                if time.monotonic() - t0 + wait > self.deadline:
                    raise ApiError(f"OpenStack {what}: the cloud still answers {code or type(e).__name__} after "
                                   f"{self.deadline:.0f} s of retries ({text})", code) from None
                log.info("OpenStack %s: %s, retrying in %.0f s", what, code or type(e).__name__, wait)
                time.sleep(wait)
                delay = min(delay * 2, 30)

    def compute(self, path, method="GET", data=None, headers=None, find=None):
        return self.call(f"{method} {path}", lambda: self.driver.connection.request(
            path, method=method, data=data if data is not None else "", headers=headers).object, find)

    def network(self, path, method="GET", data=None, find=None):
        return self.call(f"{method} {path}", lambda: self.driver.network_connection.request(
            "/v2.0" + path, method=method, data=data if data is not None else "").object, find)

    def listing(self, service, path, key):
        """Every item of a Nova or Neutron list, following its ``<key>_links`` "next" pages (the cloud caps the
        page size; a cloud without pagination returns everything at once). An item deleted between pages
        (its marker then fails) restarts the listing."""
        from urllib.parse import parse_qs, urlsplit

        get = self.compute if service == "compute" else self.network
        sep = "&" if "?" in path else "?"
        for _ in range(3):
            out, marker = [], None
            try:
                while True:
                    doc = get(path + (f"{sep}marker={marker}" if marker else "")) or {}
                    page = doc.get(key, [])
                    out += page
                    nxt = [x for x in doc.get(f"{key}_links") or [] if x.get("rel") == "next"]
                    if not page or not nxt:
                        return out
                    found = parse_qs(urlsplit(nxt[0].get("href", "")).query).get("marker")
                    new = found[0] if found else page[-1]["id"]
                    if new == marker:
                        return out
                    marker = new
            except ApiError as e:
                if not marker or e.code not in (400, 404):
                    raise
        raise ApiError(f"OpenStack list {path}: the list kept changing under its pages (3 attempts)")


class OpenStackProvider(cloudvm.OverSSH):
    name = "openstack"
    description = "servers on an OpenStack cloud (on-prem, CERN-style, T-Systems OTC) via clouds.yaml / OS_*"
    capabilities = Capabilities(gpus=True, multi_node=True, spot=False, prices=False, engines=("gloo",),
                                notes="--cloud NAME (clouds.yaml) or OS_*; --option profile=cern|otc|generic; "
                                      "prices only from the cloud's `prices:` setting")

    def __init__(self, cloud=None, **options):
        self.options = {"cloud": cloud, **options}
        self._cloud = None
        self._api = None
        self._ssh = {}  # run_id -> SSHProvider on the run's inventory
        self.owner = harness_owner()
        self._flavors = None

    # -- configuration ----------------------------------------------------------------------------
    @property
    def cloud(self) -> osconfig.Cloud:
        if self._cloud is None:
            opts = {k: v for k, v in self.options.items() if k not in ("cloud", "inventory")}
            unknown = set(opts) - set(osconfig.SETTINGS) - {"region"}
            if unknown:
                raise PlanError("option", sorted(unknown)[0],
                                "one of " + ", ".join(sorted([*osconfig.SETTINGS, "region", "cloud"])))
            self._cloud = osconfig.load(self.options.get("cloud"), opts)
        return self._cloud

    @property
    def api(self) -> Api:
        if self._api is None:
            self._api = Api(self.cloud)
        return self._api

    def setting(self, key, default=None):
        return self.cloud.get(key, default)

    def check(self):
        self.cloud  # noqa: B018 (validates the configuration)
        if self.setting("provisioner", "sdk") not in ("sdk", "terraform"):
            raise PlanError("provisioner", self.setting("provisioner"), "sdk or terraform")
        require_tools(self.name, ("ssh", "ssh-keygen", "ssh-agent", "ssh-add"))
        self.api.compute("/limits")  # authenticates, finds the compute endpoint, proves it answers

    # -- flavors ----------------------------------------------------------------------------------
    def flavors(self):
        """Every flavor with its extra specs (microversion 2.61 carries them in the listing); listed once per
        provider (offerings, shapes, the quota check and server creation all read it)."""
        if self._flavors is None:
            self._flavors = self._list_flavors()
        return self._flavors

    def _list_flavors(self):
        try:
            doc = self.api.compute("/flavors/detail", headers={"X-OpenStack-Nova-API-Version": "2.61"})
        except ApiError as e:
            if e.code not in (400, 406):  # a Nova older than 2.61 refuses the microversion
                raise
            doc = self.api.compute("/flavors/detail")
        out = []
        for f in doc.get("flavors", []):
            specs = f.get("extra_specs")
            if specs is None:
                specs = f.get("OS-FLV-WITH-EXT-SPECS:extra_specs")
            if specs is None:  # an older Nova: one call per flavor
                specs = self.api.compute(f"/flavors/{f['id']}/os-extra_specs").get("extra_specs", {})
            out.append({**f, "extra_specs": specs or {}})
        return out

    def offerings(self):
        """Flavors as offerings: GPU flavors (slots = GPUs) unless device=cpu, CPU flavors (slots = vCPUs) when
        device=cpu or the cloud has no GPU flavor; in the `flavors` setting's order when there is one."""
        mapping = self.setting("gpu_flavors") or {}
        prices = self.setting("prices") or {}
        gpu, cpu = [], []
        for f in self.flavors():
            model, count = osconfig.flavor_gpus(f["name"], f["extra_specs"], mapping)
            price = prices.get(f["name"])
            o = Offering(instance_type=f["name"], gpu_model=model if count else None, gpus=count,
                         slots=count or int(f.get("vcpus") or 1),
                         price_per_hour=float(price) if price is not None else None,
                         currency=self.setting("currency") if price is not None else None, region=self.cloud.region)
            (gpu if count else cpu).append(o)
        device = self.setting("device")
        chosen = gpu if device == "gpu" or (device == "auto" and gpu) else cpu
        allowed = osconfig.as_list(self.setting("flavors"))
        if allowed:
            return [o for name in allowed for o in gpu + cpu if o.instance_type == name]
        # GPU flavors: the biggest first (one 8-GPU server beats eight 1-GPU ones); CPU flavors: the smallest.
        return sorted(chosen, key=lambda o: (-o.slots if o.gpus else o.slots, o.instance_type))

    def shapes(self, slots, instance_type=None):
        """Ordered (offering, servers) the plan allows for ``slots`` ranks: the named flavor, or the flavors
        setting in its order, or else every flavor that fits exactly (fewest servers first)."""
        offers = self.offerings()
        if not offers:
            raise ProviderError(f"cloud {self.cloud.name} has no {self.setting('device')} flavor "
                                "(set `device:` or `gpu_flavors:` for it)")
        if instance_type:
            offers = [o for o in offers if o.instance_type == instance_type]
            if not offers:
                raise PlanError("instance-type", instance_type, "a flavor of cloud " + self.cloud.name)
        return cloudvm.fit(offers, slots, ordered=bool(instance_type or osconfig.as_list(self.setting("flavors"))))

    # -- provision --------------------------------------------------------------------------------
    def state_dir(self, spec_or_run):
        if isinstance(spec_or_run, FleetSpec) and spec_or_run.workdir:
            return Path(spec_or_run.workdir) / "openstack"
        run_id = spec_or_run.run_id if isinstance(spec_or_run, FleetSpec) else spec_or_run
        return Path.home() / ".cache/cloudbench/openstack" / run_id

    def provision(self, spec: FleetSpec, on_record):
        if self.setting("provisioner", "sdk") == "terraform":
            return self._terraform_provision(spec, on_record)
        run, d = spec.run_id, self.state_dir(spec)
        shapes = self.shapes(spec.slots, spec.instance_type)
        zones = osconfig.as_list(self.setting("availability_zones")) or [None]
        base_extra = (("cloud", self.cloud.name), ("region", self.cloud.region), ("state_dir", str(d)),
                      ("profile", self.setting("profile")))
        fleet = Fleet(run_id=run, provider=self.name, instance_type=shapes[0][0].instance_type, nodes=(),
                      engine=spec.engine, extra=base_extra)
        on_record(fleet)  # before anything exists in the cloud: `cloudbench down` can always find it by tag
        d.mkdir(parents=True, exist_ok=True)
        image, network = self._image(), self._network()
        key = self._keypair(run, d)
        sg = self._security_group(run, network)
        replaced, last = 0, None
        for offer, n in shapes:
            for zone in zones:
                where = f"{n} x {offer.instance_type}" + (f" in {zone}" if zone else "")
                try:
                    self._check_quota(offer, n)
                    log.info("openstack: %s (%s)", where, cloudvm.shape_text(offer, n))
                    servers, k = self._servers(run, offer, n, zone, image, network, key, sg)
                    replaced += k
                except CapacityError as e:
                    replaced += getattr(e, "replaced", 0)
                    log.warning("openstack: %s: %s; trying the next shape the plan allows", where, e)
                    last = e
                    continue
                return self._finish(spec, offer, n, zone, servers, network, d, replaced, on_record, base_extra)
        raise ProviderError(f"no capacity for {spec.slots} slots on cloud {self.cloud.name}: tried "
                            + ", ".join(f"{n} x {o.instance_type}" for o, n in shapes)
                            + (f" in zones {', '.join(zones)}" if zones != [None] else "") + f" (last: {last})")

    def _image(self):
        want = self.setting("image")
        if not want:
            raise PlanError("image", None, f"an image name or id for cloud {self.cloud.name} (--option image=NAME or "
                                           "`image:` under `cloudbench:` in clouds.yaml)")
        images = self.api.call("list images", lambda: self.api.driver.list_images())
        for im in images:
            if want in (im.id, im.name):
                return im
        raise PlanError("image", want, "one of " + ", ".join(sorted(i.name for i in images)[:20]))

    def _network(self):
        nets = self.api.network("/networks").get("networks", [])
        want = self.setting("network")
        if want:
            for n in nets:
                if want in (n["id"], n["name"]):
                    return n
            raise PlanError("network", want, "one of " + ", ".join(sorted(n["name"] for n in nets)))
        private = [n for n in nets if not n.get("router:external")]
        if len(private) == 1:
            return private[0]
        raise PlanError("network", None, "the network for the servers (--option network=NAME); candidates: "
                        + ", ".join(sorted(n["name"] for n in private)))

    def _keypair(self, run, d):
        pub = cloudvm.keygen(d)
        name = f"cb-{run}"
        try:
            self.api.compute("/os-keypairs", "POST", {"keypair": {"name": name, "public_key": pub}})
        except ApiError as e:
            if e.code != 409:  # 409: made by an earlier attempt of this run (resume, or a lost answer)
                raise
        return name

    def _caller_cidr(self, network):
        if self.setting("ssh_cidr"):
            return str(self.setting("ssh_cidr"))
        # The address this machine uses towards the servers: their subnet in private mode, the API otherwise.
        target = None
        if not self.setting("floating_ip_pool"):
            subnets = self.api.network(f"/subnets?network_id={network['id']}").get("subnets", [])
            v4 = [s for s in subnets if s.get("ip_version", 4) == 4]
            if v4:
                target = v4[0]["cidr"].split("/")[0].rsplit(".", 1)[0] + ".1"
        if target is None:
            from urllib.parse import urlparse
            target = socket.gethostbyname(urlparse(self.cloud.auth_url).hostname)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((target, 22))
            mine = s.getsockname()[0]
        import ipaddress

        if self.setting("floating_ip_pool") and ipaddress.ip_address(mine).is_private and \
                not ipaddress.ip_address(target).is_private:
            raise PlanError("ssh_cidr", None, f"the public address the cloud sees this machine as (this machine is "
                                              f"{mine}, behind NAT towards {target}): --option ssh_cidr=A.B.C.D/32")
        return mine + "/32"

    def _security_group(self, run, network):
        name = f"cb-{run}"

        def find():
            found = self.api.network(f"/security-groups?name={name}").get("security_groups", [])
            return {"security_group": found[0]} if found else None

        found = find()
        if found:
            return found["security_group"]
        sg = self.api.network("/security-groups", "POST", {"security_group": {
            "name": name, "description": f"{TAG}={run} owner={self.owner}"}}, find=find)["security_group"]
        rules = [{"protocol": "tcp", "port_range_min": 22, "port_range_max": 22,
                  "remote_ip_prefix": self._caller_cidr(network)},
                 {"remote_group_id": sg["id"]}]  # all protocols and ports between members (Horovod, Gloo)
        for r in rules:
            try:
                self.api.network("/security-group-rules", "POST", {"security_group_rule": {
                    "direction": "ingress", "ethertype": "IPv4", "security_group_id": sg["id"], **r}})
            except ApiError as e:
                if e.code != 409:  # 409: the rule exists (an earlier attempt whose answer was lost)
                    raise
        return sg

    def _check_quota(self, offer, n):
        """Refuse before creating anything when the project's limits cannot hold the shape, with the numbers."""
        a = self.api.compute("/limits").get("limits", {}).get("absolute", {})
        flavor = next((f for f in self.flavors() if f["name"] == offer.instance_type), {})
        need = {"instances": n, "cores": n * int(flavor.get("vcpus") or 0),
                "RAM (MiB)": n * int(flavor.get("ram") or 0)}
        have = {"instances": ("maxTotalInstances", "totalInstancesUsed"), "cores": ("maxTotalCores", "totalCoresUsed"),
                "RAM (MiB)": ("maxTotalRAMSize", "totalRAMUsed")}
        for what, (mx, used) in have.items():
            limit, inuse = a.get(mx, -1), a.get(used, 0)
            if limit is not None and limit >= 0 and inuse + need[what] > limit:
                raise ProviderError(f"quota exceeded on cloud {self.cloud.name}: {n} x {offer.instance_type} needs "
                                    f"{need[what]} {what}, the project uses {inuse} of {limit}; ask for more quota "
                                    "or run fewer GPUs (--gpus)")

    def _create_server(self, run, i, offer, zone, image, network, key, sg):
        name = f"cb-{run}-{i}"
        body = {"server": {"name": name, "flavorRef": next(f["id"] for f in self.flavors()
                                                          if f["name"] == offer.instance_type),
                           "imageRef": image.id, "key_name": key, "networks": [{"uuid": network["id"]}],
                           "security_groups": [{"name": sg["id"]}],  # by id: names need not be unique
                           "metadata": {TAG: run, OWNER_KEY: self.owner}}}
        if zone:
            body["server"]["availability_zone"] = zone

        def find():  # a create whose answer was lost may still have made the server: adopt it, never make two
            same = [x for x in self._tagged_servers(run) if x["name"] == name]
            return {"server": same[0]} if same else None

        try:
            return self.api.compute("/servers", "POST", body, find=find)["server"]["id"]
        except ApiError as e:
            if e.code == 403 and "quota" in str(e).lower():
                raise ApiError(f"quota exceeded on cloud {self.cloud.name} creating {name} "
                               f"({offer.instance_type}): {e}", 403) from None
            raise

    def _servers(self, run, offer, n, zone, image, network, key, sg):
        """Create n servers and wait until all are ACTIVE. Returns (servers, replaced)."""
        ids = {i: self._create_server(run, i, offer, zone, image, network, key, sg) for i in range(n)}
        started = {i: time.monotonic() for i in ids}
        replaced, limit = 0, self.setting("replacements")
        timeout = self.setting("build_timeout")
        next_index = n
        while True:
            by_id = {s["id"]: s for s in self._tagged_servers(run)}
            active = {}
            for i, sid in list(ids.items()):
                s = by_id.get(sid)
                status = (s or {}).get("status", "GONE")
                if status == "ACTIVE":
                    active[i] = s
                    continue
                # BUILD (and any other transitional state) may last build_timeout; ERROR, SHUTOFF, a server that
                # vanished or anything else that is not on its way to ACTIVE fails at once.
                stuck = time.monotonic() - started[i] > timeout
                if status in ("BUILD", "REBUILD", "HARD_REBOOT", "REBOOT", "MIGRATING") and not stuck:
                    continue
                fault = ((s or {}).get("fault") or {}).get("message") or (
                    f"still {status} after {timeout:.0f} s" if stuck else f"went {status}")
                self._delete_servers([sid])
                if any(x in fault.lower() for x in NO_VALID_HOST):
                    self._delete_servers(list(ids.values()))
                    e = CapacityError(f"server {sid} ({offer.instance_type}): {fault}")
                    e.replaced = replaced
                    raise e
                replaced += 1
                if replaced > limit:
                    raise ProviderError(f"server cb-{run}-{i} ({offer.instance_type}) failed: {fault}; "
                                        f"{replaced} server(s) failed, more than the {limit} replacements allowed")
                log.warning("openstack: server cb-%s-%d failed (%s); replacing it (%d of %d)", run, i, fault,
                            replaced, limit)
                ids[i] = self._create_server(run, next_index, offer, zone, image, network, key, sg)
                started[i] = time.monotonic()
                next_index += 1
            if len(active) == len(ids):
                return [active[i] for i in sorted(active)], replaced
            time.sleep(1.0)

    def _tagged_servers(self, run=None):
        """The project's servers tagged with the run (any run: None), every page, named cb-..."""
        # A plain prefix: a regular expression to Nova, a substring to clouds whose filter is fuzzy (OTC).
        servers = self.api.listing("compute", f"/servers/detail?name=cb-{run + '-' if run else ''}", "servers")
        return [s for s in servers if (s.get("metadata") or {}).get(TAG) and
                (run is None or s["metadata"][TAG] == run)]

    def _address(self, server, network):
        addrs = (server.get("addresses") or {}).get(network["name"]) or [
            a for v in (server.get("addresses") or {}).values() for a in v]
        fixed = [a["addr"] for a in addrs if a.get("version", 4) == 4 and a.get("OS-EXT-IPS:type") != "floating"]
        floating = [a["addr"] for a in addrs if a.get("OS-EXT-IPS:type") == "floating"]
        return (floating or fixed or [None])[0], (fixed or [None])[0]

    def _floating_ips(self, run, servers):
        pool_name = self.setting("floating_ip_pool")
        nets = self.api.network("/networks").get("networks", [])
        pool = next((n for n in nets if pool_name in (n["id"], n["name"]) and n.get("router:external")), None)
        if pool is None:
            raise PlanError("floating_ip_pool", pool_name, "an external network: " + ", ".join(
                n["name"] for n in nets if n.get("router:external")))
        out = {}
        for s in servers:
            ports = self.api.network(f"/ports?device_id={s['id']}").get("ports", [])
            if not ports:
                raise ProviderError(f"server {s['name']} has no port to attach a floating IP to")
            def find(port=ports[0]["id"]):
                mine = [f for f in self.api.listing("network", "/floatingips", "floatingips")
                        if f.get("port_id") == port and f.get("description") == f"{TAG}={run}"]
                return {"floatingip": mine[0]} if mine else None

            try:
                fip = self.api.network("/floatingips", "POST", {"floatingip": {
                    "floating_network_id": pool["id"], "port_id": ports[0]["id"],
                    "description": f"{TAG}={run}"}}, find=find)["floatingip"]
            except ApiError as e:  # 409: the port has one already (an earlier attempt got through late)
                if e.code != 409 or find() is None:
                    raise
                fip = find()["floatingip"]
            out[s["id"]] = fip["floating_ip_address"]
        return out

    def _host_keys(self, server, address):
        """known_hosts lines for the server, from the console log (cloud-init's block) or ssh-keyscan."""
        def console():
            out = self.api.compute(f"/servers/{server['id']}/action", "POST", {"os-getConsoleOutput": {"length": None}})
            return (out or {}).get("output")
        return cloudvm.host_keys(self.name, f"server {server['name']}", address, console, self.setting("host_keys"),
                                 self.setting("ssh_timeout"))

    def _finish(self, spec, offer, n, zone, servers, network, d, replaced, on_record, base_extra):
        floating = self._floating_ips(spec.run_id, servers) if self.setting("floating_ip_pool") else {}
        machines = []
        for s in servers:
            fixed = self._address(s, network)[1]
            addr = floating.get(s["id"]) or fixed
            if not addr:
                raise ProviderError(f"server {s['name']} has no IPv4 address on {network['name']}")
            machines.append({"name": s["name"], "address": addr, "internal_address": fixed, "id": s["id"],
                             "known": self._host_keys(s, addr)})
        extra = [*base_extra, ("flavor", offer.instance_type), ("shape", cloudvm.shape_text(offer, n)), ("zone", zone),
                 ("servers", [s["id"] for s in servers]), ("replaced_servers", replaced),
                 ("floating_ips", sorted(floating.values()))]
        fleet, self._ssh[spec.run_id] = cloudvm.ssh_fleet(
            self.name, spec, offer, machines, d, user=self.setting("user") or "root", workdir=self.setting("workdir"),
            python=self.setting("python"), ssh_timeout=self.setting("ssh_timeout"), extra=extra, on_record=on_record)
        if replaced:
            log.info("openstack: %d server(s) replaced", replaced)
        return fleet

    def _ssh_for(self, run, d=None):
        if run not in self._ssh:
            self._ssh[run] = cloudvm.ssh_for(d or self.state_dir(run))
        return self._ssh[run]

    # -- deploy and launch: SSH, as the ssh provider does it -----------------------------------------
    def _fleet_ssh(self, fleet):
        if self.setting("provisioner", "sdk") == "terraform":
            return self._terraform()
        return self._ssh_for(fleet.run_id, Path(dict(fleet.extra)["state_dir"]))

    # -- teardown and gc ----------------------------------------------------------------------------
    def teardown(self, run_id, fleet=None):
        """Delete everything tagged with the run: floating IPs, servers (and their ports), security group,
        key pair. Found by tag and name in the cloud, so it works without any record and is safe to repeat."""
        gone = []
        if self.setting("provisioner", "sdk") == "terraform" or (fleet and dict(fleet.extra).get("tf_dir")):
            try:
                gone += self._terraform().teardown(run_id, fleet)
            except CloudbenchError as e:  # the tag sweep below still removes what terraform made
                log.warning("openstack: terraform destroy failed (%s); deleting the run's resources by tag", e)
        inv = Path(dict(fleet.extra).get("state_dir", "")) / "inventory.yaml" if fleet else None
        if inv and inv.is_file() and fleet.nodes:
            try:  # stop the trainers first (a VM deletion would too; this also ends their ssh sessions now)
                self._ssh_for(run_id, inv.parent)._stop_run(list(self._ssh[run_id].inv.hosts), run_id, quiet=True)
            except CloudbenchError as e:
                log.warning("openstack: could not stop the run's processes before deleting servers: %s", e)
        tag = f"{TAG}={run_id}"
        for fip in self.api.listing("network", "/floatingips", "floatingips"):
            if fip.get("description") == tag:
                self._ignore_missing(lambda: self.api.network(f"/floatingips/{fip['id']}", "DELETE"))
                gone.append(Resource(kind="floating_ip", id=fip["id"], run_id=run_id,
                                     detail=fip.get("floating_ip_address", "")))
        servers = self._tagged_servers(run_id)
        ids = [s["id"] for s in servers]
        self._delete_servers(ids, wait=True)
        gone += [Resource(kind="server", id=s["id"], run_id=run_id, detail=s["name"]) for s in servers]
        prefix = f"cb-{run_id}"
        for p in self.api.listing("network", "/ports", "ports"):
            if p.get("device_id") in ids or (p.get("name", "").startswith(prefix + "-")
                                              and p.get("description") == tag):  # terraform's own ports
                self._ignore_missing(lambda: self.api.network(f"/ports/{p['id']}", "DELETE"))
                gone.append(Resource(kind="port", id=p["id"], run_id=run_id, detail=p.get("name", "")))
        for sg in self.api.network(f"/security-groups?name={prefix}").get("security_groups", []):
            if (sg.get("description") or "").split(" ")[0] != tag:
                continue  # named like ours but not made by cloudbench: not ours to delete
            self._delete_security_group(sg)
            gone.append(Resource(kind="security_group", id=sg["id"], run_id=run_id, detail=sg["name"]))
        for kp in self.api.compute("/os-keypairs").get("keypairs", []):
            name = kp.get("keypair", kp).get("name")
            if name == prefix:
                self._ignore_missing(lambda: self.api.compute(f"/os-keypairs/{name}", "DELETE"))
                gone.append(Resource(kind="keypair", id=name, run_id=run_id))
        self._ssh.pop(run_id, None)
        return gone

    @staticmethod
    def _ignore_missing(fn):
        try:
            fn()
        except ApiError as e:
            if e.code != 404:
                raise

    def _delete_servers(self, ids, wait=True, timeout=300):
        for sid in ids:
            self._ignore_missing(lambda: self.api.compute(f"/servers/{sid}", "DELETE"))
        deadline = time.monotonic() + timeout
        while wait and ids:
            left = {s["id"] for s in self.api.listing("compute", "/servers", "servers")} & set(ids)
            if not left:
                return
            if time.monotonic() > deadline:
                raise ProviderError(f"servers {', '.join(sorted(left))} still exist {timeout} s after deletion; "
                                    "`cloudbench gc --provider openstack` retries")
            time.sleep(1)

    def _delete_security_group(self, sg, timeout=60):
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self._ignore_missing(lambda: self.api.network(f"/security-groups/{sg['id']}", "DELETE"))
            except ApiError as e:  # 409 while a deleted server's port still holds it
                if e.code != 409 or time.monotonic() > deadline:
                    raise
                time.sleep(1)

    def list_tagged(self):
        """Everything of any run in the project: servers (by metadata), floating IPs (description), security
        groups and key pairs (name cb-<run>), ports of tagged servers. owner_alive from the owner recorded."""
        found, owners = [], {}
        servers = self._tagged_servers()
        for s in servers:
            run = s["metadata"][TAG]
            owners.setdefault(run, s["metadata"].get(OWNER_KEY))
        for sg in self.api.listing("network", "/security-groups", "security_groups"):
            m = re.match(rf"{TAG}=(\S+)(?: owner=(\S+))?", sg.get("description") or "")
            if m and sg.get("name") == f"cb-{m.group(1)}":
                owners.setdefault(m.group(1), m.group(2))
                found.append(Resource(kind="security_group", id=sg["id"], run_id=m.group(1), detail=sg["name"]))
        for s in servers:
            found.append(Resource(kind="server", id=s["id"], run_id=s["metadata"][TAG],
                                  detail=f"{s['name']} {s.get('status')}"))
        ids = {s["id"]: s["metadata"][TAG] for s in servers}
        for p in self.api.listing("network", "/ports", "ports"):
            if p.get("device_id") in ids:
                found.append(Resource(kind="port", id=p["id"], run_id=ids[p["device_id"]], detail=p.get("name", "")))
        for fip in self.api.listing("network", "/floatingips", "floatingips"):
            m = re.fullmatch(rf"{TAG}=(\S+)", fip.get("description") or "")
            if m:
                found.append(Resource(kind="floating_ip", id=fip["id"], run_id=m.group(1),
                                      detail=fip.get("floating_ip_address", "")))
        runs = {r.run_id for r in found}
        for kp in self.api.compute("/os-keypairs").get("keypairs", []):
            name = kp.get("keypair", kp).get("name", "")
            # Key pairs carry no tag: ours are cb-<run id> of a run id's form, or of a run seen above.
            if name.startswith("cb-") and (name[3:] in runs or RUN_ID.fullmatch(name[3:])):
                found.append(Resource(kind="keypair", id=name, run_id=name[3:]))
        return [Resource(**{**r.__dict__, "owner_alive": owner_alive(owners.get(r.run_id))}) for r in found]

    # -- the terraform provisioner ------------------------------------------------------------------
    def _terraform(self, spec=None):
        """providers.terraform on terraform/openstack, with this cloud's flavor, image, network and a run key;
        host keys still come from the console log. One instance per provider (it keeps the deploy state)."""
        if getattr(self, "_tf", None) is None:
            from providers.terraform import TerraformProvider

            kw, var = {}, None
            if spec is not None:
                d = self.state_dir(spec)
                d.mkdir(parents=True, exist_ok=True)
                offer, _ = self.shapes(spec.slots, spec.instance_type)[0]
                network = self._network()
                cloudvm.keygen(d)
                var = {"cloud": "" if self.cloud.name == "env" else self.cloud.name, "flavor": offer.instance_type,
                       "image": self._image().id, "network": network["id"],
                       "floating_ip_pool": self.setting("floating_ip_pool") or "",
                       "ssh_cidr": self._caller_cidr(network)}
                zones = osconfig.as_list(self.setting("availability_zones"))
                if zones:
                    var["availability_zone"] = zones[0]

                def host_keys(hosts):
                    by_name = {s["name"]: s for s in self._tagged_servers(spec.run_id)}
                    lines = []
                    for h in hosts:
                        keys = self._host_keys(by_name[h["name"]], h["address"])
                        lines += keys + [f"{h['internal_address']} {k.split(' ', 1)[1]}" for k in keys
                                         if h.get("internal_address") and h["internal_address"] != h["address"]]
                    (d / "known_hosts").write_text("\n".join(lines) + "\n")

                kw = {"key": str(d / "id_ed25519"), "known_hosts": str(d / "known_hosts"),
                      "user": self.setting("user") or "root", "slots": offer.slots, "gpu_model": offer.gpu_model,
                      "instance_type": offer.instance_type, "workdir": self.setting("workdir"),
                      "host_keys": host_keys, **({"python": self.setting("python")} if self.setting("python") else {})}
            if self.cloud.source != "environment":  # terraform runs elsewhere (-chdir): name the file it is in
                os.environ["OS_CLIENT_CONFIG_FILE"] = os.path.abspath(self.cloud.source)
            self._tf = TerraformProvider(module="openstack", var=var, **kw)
        return self._tf

    def _terraform_provision(self, spec, on_record):
        import dataclasses

        tf = self._terraform(spec)
        rename = lambda f: dataclasses.replace(  # noqa: E731 (the fleet is this provider's, made by terraform)
            f, provider=self.name, extra=(*f.extra, ("state_dir", str(self.state_dir(spec))),
                                          ("cloud", self.cloud.name), ("provisioner", "terraform")))
        return rename(tf.provision(spec, lambda f: on_record(rename(f))))

