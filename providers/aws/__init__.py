"""The aws provider: a fleet of EC2 instances (boto3), reached over SSH like the ssh provider's hosts.

Credentials, region and endpoint the way AWS users have them: a profile (``--option profile=NAME`` or
``AWS_PROFILE``), the environment (``AWS_ACCESS_KEY_ID``..., ``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL``),
``--option region=``. cloudbench's own settings (SETTINGS) come from ``--option KEY=VALUE`` or from the
profile as ``cloudbench_KEY = VALUE`` lines in ~/.aws/config (botocore ignores keys it does not know).

Per run, everything tagged ``cloudbench-run=<run_id>`` and ``cloudbench-owner=<host:pid>`` and found again
by tag, never by a record alone: a key pair ``cb-<run_id>`` (a fresh ed25519 key kept with the results), a
security group ``cb-<run_id>`` (SSH from this machine, all traffic between members), a cluster placement
group ``cb-<run_id>`` for more than one instance, the instances ``cb-<run_id>-<i>`` (EFA interfaces when
the type supports EFA and the fleet has several instances), on demand or spot (``spot=true``).

GPU types and counts come from ``describe_instance_types`` (GpuInfo), so ``--gpus 16`` picks 2 x
p4d.24xlarge. InsufficientInstanceCapacity moves on to the next zone, then the next type the plan allows;
vCPU/instance limits stop with the limit named; throttling and 5xx answers are retried with backoff until
``api_deadline``; a RunInstances whose answer was lost is looked up by its attempt tag before any retry.
Host keys come from the console output (cloud-init's block). A spot instance reclaimed during a point fails
that point naming the instance and the points after it that need it fail at once, without waiting.
"""
from __future__ import annotations

import logging
import secrets
import time
from pathlib import Path

from providers.errors import CloudbenchError, PlanError, PointFailed, ProviderError
from providers import cloudvm, prices
from providers.base import TAG, Capabilities, Fleet, FleetSpec, Job, Offering, Resource
from providers.local import harness_owner
from providers.ssh import require_tools

log = logging.getLogger("cloudbench")
OWNER, RUN_ID = cloudvm.OWNER, cloudvm.RUN_ID
ATTEMPT = "cloudbench-attempt"
LIVE = ("pending", "running", "stopping", "stopped", "shutting-down")

SETTINGS = {
    "profile": "AWS profile (default: AWS_PROFILE, else the default chain)",
    "region": "region (default: the profile's or AWS_DEFAULT_REGION)",
    "endpoint_url": "EC2 endpoint (default: AWS_ENDPOINT_URL or the profile's endpoint_url, else AWS's)",
    "device": "gpu | cpu: which instance types to consider",
    "gpu_model": "only types with this GPU model (e.g. A100, H100, V100; case-insensitive)",
    "instance_types": "instance types the plan may use, in order (comma-separated); default every one that fits",
    "zones": "availability zones the plan may use, in order (comma-separated); default every zone offering it",
    "ami": "image id (default: the newest image named ami_name of owner ami_owner)",
    "ami_name": "image name pattern when no ami is given",
    "ami_owner": "owner of that image",
    "user": "login user of the image",
    "python": "interpreter on the instances",
    "workdir": "per-run scratch on the instances",
    "spot": "true: spot instances (price from the spot price history, else unknown)",
    "subnet": "subnet id (default: the default subnet of each zone)",
    "ssh_cidr": "where SSH may come from (default: this machine's address towards the endpoint)",
    "address": "public | private: the address cloudbench connects to",
    "efa": "auto (EFA interfaces on multi-instance fleets of types that support it) | off",
    "placement": "cluster (a cluster placement group for multi-instance fleets) | none",
    "host_keys": "console (cloud-init's block in the console output) | tofu (ssh-keyscan)",
    "build_timeout": "seconds an instance may stay pending",
    "ssh_timeout": "seconds to wait for host keys and SSH on a running instance",
    "api_deadline": "seconds to keep retrying throttled or 5xx answers of one call",
    "prices": "price catalog CSV (default providers/aws/prices.csv)",
    "spot_replace": "true: a reclaimed spot instance is replaced at once (the point fails; --retries relaunches it)",
}
DEFAULTS = {"device": "gpu", "ami_name": "Deep Learning Base OSS Nvidia Driver GPU AMI (Ubuntu 22.04) *",
            "ami_owner": "amazon", "user": "ubuntu", "workdir": "/var/tmp/cloudbench", "spot": "false",
            "address": "public", "efa": "auto", "spot_replace": "true", "placement": "cluster", "host_keys": "console",
            "build_timeout": 900, "ssh_timeout": 600, "api_deadline": 120}
RETRY = {"RequestLimitExceeded", "Throttling", "ThrottlingException", "InternalError", "InternalFailure",
         "ServiceUnavailable", "Unavailable"}
CAPACITY = {"InsufficientInstanceCapacity", "InsufficientHostCapacity", "InsufficientReservedInstanceCapacity",
            "InsufficientCapacityOnHost", "Unsupported", "SpotMaxPriceTooLow", "InsufficientFreeAddressesInSubnet"}
LIMITS = {"VcpuLimitExceeded", "InstanceLimitExceeded", "MaxSpotInstanceCountExceeded", "PendingVerification"}


class CapacityError(ProviderError):
    """No room for this (type, zone): the next one the plan allows may have it."""


def _truthy(v):
    return str(v).strip().lower() in ("1", "true", "yes", "on")


class AwsProvider(cloudvm.VMProvider):
    name = "aws"
    description = "EC2 instances (boto3; profiles, AWS_* variables, AWS_ENDPOINT_URL)"
    capabilities = Capabilities(gpus=True, multi_node=True, spot=True, prices=True, engines=("gloo",),
                                notes="--option region=, profile=, spot=true; prices from providers/aws/prices.csv")

    def __init__(self, **options):
        unknown = set(options) - set(SETTINGS) - {"cloud", "inventory"}
        if unknown:
            raise PlanError("option", sorted(unknown)[0], "one of " + ", ".join(sorted(SETTINGS)))
        self.options = {k: v for k, v in options.items() if v is not None}
        self.owner = harness_owner()
        self._session = self._ec2 = self._types = None
        self._ssh = {}  # run_id -> SSHProvider on the run's inventory
        self._lost = {}  # run_id -> {node name: why} of reclaimed spot instances not replaced
        self._current = {}  # run_id -> {node name: instance id}, replacements included
        self._staged = {}  # run_id -> what stage() handed out, for a replacement
        self._launched = {}  # run_id -> ids RunInstances answered (describe may not show them for a while)
        self._nonce = secrets.token_hex(3)  # per provisioning: a resumed run never reuses a ClientToken

    # -- configuration ----------------------------------------------------------------------------
    @property
    def session(self):
        if self._session is None:
            import boto3
            import botocore.exceptions

            try:
                self._session = boto3.Session(profile_name=self.options.get("profile"),
                                              region_name=self.options.get("region"))
            except botocore.exceptions.ProfileNotFound as e:
                raise PlanError("profile", self.options.get("profile"), f"a profile of your AWS config ({e})") \
                    from None
        return self._session

    def setting(self, key, default=None):
        if key in self.options:
            return self.options[key]
        try:
            scoped = self.session._session.get_scoped_config()
        except Exception:  # noqa: BLE001 (an unreadable config is reported by the first API call)
            scoped = {}
        v = scoped.get("cloudbench_" + key)
        if v is None:
            v = DEFAULTS.get(key, default)
        return v

    @property
    def region(self):
        r = self.session.region_name
        if not r:
            raise PlanError("region", None, "an AWS region (--option region=..., AWS_DEFAULT_REGION, or the "
                                            "profile's region)")
        return r

    @property
    def ec2(self):
        if self._ec2 is None:
            from botocore.config import Config

            kw = {"endpoint_url": self.options["endpoint_url"]} if self.options.get("endpoint_url") else {}
            self._ec2 = self.session.client("ec2", region_name=self.region, **kw, config=Config(
                retries={"total_max_attempts": 1}, connect_timeout=10, read_timeout=60))  # retries are ours
        return self._ec2

    def call(self, what, method, find=None, **kw):
        """One EC2 call; throttling, 5xx and lost connections are retried with backoff until api_deadline.
        ``find()``, when given, is asked before a retry whether a lost answer's request was carried out."""
        import botocore.exceptions as bex

        deadline = time.monotonic() + float(self.setting("api_deadline"))
        delay = 1.0
        while True:
            try:
                return getattr(self.ec2, method)(**kw)
            except bex.ClientError as e:
                code = e.response.get("Error", {}).get("Code", "")
                status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
                if code in CAPACITY or code in LIMITS or (code not in RETRY and status < 500):
                    raise  # InsufficientInstanceCapacity is a 500, but asking again in this zone will not help
                why = f"{code or status}: {e.response.get('Error', {}).get('Message', '')}"
            except (bex.EndpointConnectionError, bex.ConnectionClosedError, bex.ReadTimeoutError,
                    bex.ConnectTimeoutError) as e:
                why = str(e)
            except bex.NoCredentialsError:
                raise ProviderError("aws: no credentials (set AWS_PROFILE or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                                    "or run `aws configure`)") from None
            if find is not None:
                found = find()
                if found:
                    log.warning("aws: %s: the answer was lost (%s) but it was carried out", what, why)
                    return found
            if time.monotonic() + delay > deadline:
                raise ProviderError(f"aws: {what} kept failing for {self.setting('api_deadline')} s: {why}")
            log.warning("aws: %s: %s; retrying in %.0f s", what, why, delay)
            time.sleep(delay)
            delay = min(delay * 2, 20.0)

    def pages(self, method, key, **kw):
        """Every item of a paginated describe call."""
        out, token = [], None
        while True:
            page = self.call(method, method, **kw, **({"NextToken": token} if token else {}))
            out += page.get(key, [])
            token = page.get("NextToken")
            if not token:
                return out

    def check(self):
        import botocore.exceptions as bex

        require_tools(self.name, ("ssh", "ssh-keygen", "ssh-agent", "ssh-add"))
        if self.setting("device") not in ("gpu", "cpu"):
            raise PlanError("device", self.setting("device"), "gpu or cpu")
        if self.setting("host_keys") not in ("console", "tofu"):
            raise PlanError("host_keys", self.setting("host_keys"), "console or tofu")
        try:
            self.call("describe availability zones", "describe_availability_zones")
        except bex.ClientError as e:
            err = e.response.get("Error", {})
            raise ProviderError(f"aws: region {self.region}: {err.get('Code')}: {err.get('Message')}") from None

    # -- offerings ----------------------------------------------------------------------------------
    def instance_types(self):
        """{type: description} of the region's instance types (describe_instance_types), read once."""
        if self._types is None:
            offered = {o["InstanceType"] for o in self.pages(
                "describe_instance_type_offerings", "InstanceTypeOfferings", LocationType="region")}
            self._types = {t["InstanceType"]: t for t in self.pages("describe_instance_types", "InstanceTypes")
                           if not offered or t["InstanceType"] in offered}
        return self._types

    def _offer(self, t):
        gpus = t.get("GpuInfo", {}).get("Gpus") or []
        count = sum(g.get("Count", 0) for g in gpus)
        model = gpus[0].get("Name") if gpus else None
        slots = count or t.get("VCpuInfo", {}).get("DefaultCores") or 1
        price = prices.lookup(self.name, self.region, t["InstanceType"], self.setting("prices"))
        return Offering(instance_type=t["InstanceType"], gpu_model=model, gpus=count, slots=slots,
                        price_per_hour=price.price_per_hour if price else None,
                        currency=price.currency if price else None, region=self.region)

    def offerings(self):
        """GPU types (biggest first) or, with device=cpu, CPU types (smallest first); only the plan's
        instance_types when set, in that order."""
        types = self.instance_types()
        chosen = self.pick(types, cloudvm.listed(self.setting("instance_types")), lambda a, t: self._offer(t))
        if chosen is not None:
            return chosen
        gpu = self.setting("device") == "gpu"
        offers = [self._offer(t) for t in types.values() if bool(t.get("GpuInfo", {}).get("Gpus")) == gpu
                  and "x86_64" in t.get("ProcessorInfo", {}).get("SupportedArchitectures", ["x86_64"])]
        return self.by_model(sorted(offers, key=lambda o: (-o.slots if gpu else o.slots, o.instance_type)))

    @property
    def where(self):
        return f"region {self.region}"

    # -- provision ----------------------------------------------------------------------------------
    def _tags(self, run, kind, name=None):
        tags = [{"Key": TAG, "Value": run}, {"Key": OWNER, "Value": self.owner}]
        if name:
            tags.append({"Key": "Name", "Value": name})
        return [{"ResourceType": kind, "Tags": tags}]

    def provision(self, spec: FleetSpec, on_record):
        run, d = spec.run_id, self.state_dir(spec)
        shapes = self.shapes(spec.slots, spec.instance_type)
        base = (("region", self.region), ("state_dir", str(d)), ("spot", _truthy(self.setting("spot"))))
        on_record(Fleet(run_id=run, provider=self.name, instance_type=shapes[0][0].instance_type, nodes=(),
                        engine=spec.engine, extra=base))  # before anything exists: `cloudbench down` finds it by tag
        d.mkdir(parents=True, exist_ok=True)
        image = self._image()
        key = self._keypair(run, d)
        sg, vpc_subnets = None, {}
        last = None
        for offer, n in shapes:
            try:
                zones = self._zones(offer.instance_type)
            except CapacityError as e:
                log.warning("aws: %s; trying the next type the plan allows", e)
                last = e
                continue
            for zone in zones:
                subnet = vpc_subnets.get(zone) or self._subnet(zone)
                vpc_subnets[zone] = subnet
                sg = sg or self._security_group(run, subnet["VpcId"])
                where = f"{n} x {offer.instance_type} in {zone}"
                try:
                    log.info("aws: %s (%s)", where, cloudvm.shape_text(offer, n))
                    group = self._placement_group(run) if n > 1 and self.setting("placement") == "cluster" else None
                    instances = self._run_instances(run, offer, n, zone, subnet, image, key, sg, group)
                except CapacityError as e:
                    log.warning("aws: %s: %s; trying the next zone or type the plan allows", where, e)
                    last = e
                    continue
                return self._finish(spec, offer, n, zone, instances, d, base, on_record)
        raise ProviderError(f"aws: no capacity for {spec.slots} slots in {self.region}: tried "
                            + ", ".join(f"{n} x {o.instance_type}" for o, n in shapes) + f" (last: {last})")

    def _zones(self, itype):
        allowed = cloudvm.listed(self.setting("zones"))
        if self.setting("subnet"):  # a subnet lives in one zone
            allowed = [self._subnet(None)["AvailabilityZone"]]
        offered = sorted(o["Location"] for o in self.pages(
            "describe_instance_type_offerings", "InstanceTypeOfferings", LocationType="availability-zone",
            Filters=[{"Name": "instance-type", "Values": [itype]}]))
        zones = [z for z in allowed if z in offered] if allowed else offered
        if not zones:
            raise CapacityError(f"{itype} is offered in none of the zones "
                                f"{', '.join(allowed) if allowed else 'of ' + self.region}")
        return zones

    def _image(self):
        if self.setting("ami"):
            return self.setting("ami")
        imgs = self.call("describe images", "describe_images", Owners=[self.setting("ami_owner")],
                         Filters=[{"Name": "name", "Values": [self.setting("ami_name")]},
                                  {"Name": "state", "Values": ["available"]}]).get("Images", [])
        if not imgs:
            raise PlanError("ami", None, f"an image id (--option ami=ami-...): no image named "
                                         f"{self.setting('ami_name')!r} of owner {self.setting('ami_owner')} "
                                         f"in {self.region}")
        return max(imgs, key=lambda i: i.get("CreationDate", ""))["ImageId"]

    def _keypair(self, run, d):
        import botocore.exceptions as bex

        pub = cloudvm.keygen(d)
        name = f"cb-{run}"
        try:
            self.call("import key pair", "import_key_pair", KeyName=name, PublicKeyMaterial=pub.encode(),
                      TagSpecifications=self._tags(run, "key-pair"))
        except bex.ClientError as e:
            if e.response["Error"]["Code"] != "InvalidKeyPair.Duplicate":  # an earlier attempt of this run
                raise ProviderError(f"aws: key pair {name}: {e}") from None
        return name

    def _subnet(self, zone):
        if self.setting("subnet"):
            subnets = self.call("describe subnet", "describe_subnets", SubnetIds=[self.setting("subnet")])["Subnets"]
        else:
            subnets = self.call("describe subnets", "describe_subnets", Filters=[
                {"Name": "availability-zone", "Values": [zone]},
                {"Name": "default-for-az", "Values": ["true"]}])["Subnets"]
        if not subnets:
            raise PlanError("subnet", None, f"a subnet in {zone} (the region has no default VPC subnet there)")
        return subnets[0]

    def _security_group(self, run, vpc):
        import botocore.exceptions as bex

        name = f"cb-{run}"

        def find():
            got = self.call("describe security groups", "describe_security_groups", Filters=[
                {"Name": "group-name", "Values": [name]}, {"Name": f"tag:{TAG}", "Values": [run]}])
            return (got.get("SecurityGroups") or [None])[0]

        sg = find()
        if sg is None:
            try:
                sg = self.call("create security group", "create_security_group", find=find, GroupName=name, VpcId=vpc,
                               Description=f"cloudbench run {run}", TagSpecifications=self._tags(run, "security-group"))
            except bex.ClientError as e:
                raise ProviderError(f"aws: security group {name}: {e}") from None
        gid = sg["GroupId"]
        try:
            self.call("authorize ingress", "authorize_security_group_ingress", GroupId=gid, IpPermissions=[
                {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22,
                 "IpRanges": [{"CidrIp": cloudvm.caller_cidr("AWS", self.ec2.meta.endpoint_url, self.setting("ssh_cidr"),
                                                            self.setting("address") == "public"),
                                "Description": "ssh from cloudbench"}]},
                {"IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": gid, "Description": "members"}]}])
        except bex.ClientError as e:
            if e.response["Error"]["Code"] != "InvalidPermission.Duplicate":
                raise ProviderError(f"aws: security group {name} rules: {e}") from None
        return gid

    def _placement_group(self, run):
        import botocore.exceptions as bex

        name = f"cb-{run}"
        try:
            self.call("create placement group", "create_placement_group", GroupName=name, Strategy="cluster",
                      TagSpecifications=self._tags(run, "placement-group"))
        except bex.ClientError as e:
            if e.response["Error"]["Code"] != "InvalidPlacementGroup.Duplicate":
                raise ProviderError(f"aws: placement group {name}: {e}") from None
        return name

    def _efa(self, offer, n):
        t = self.instance_types().get(offer.instance_type, {})
        return n > 1 and self.setting("efa") == "auto" and bool(t.get("NetworkInfo", {}).get("EfaSupported"))

    def _run_instances(self, run, offer, n, zone, subnet, image, key, sg, group, names=None, attempt=None):
        """n instances of one type in one zone, all or none, running; CapacityError when the zone has no room.
        ``names``: the Name tags (default cb-<run>-0..n-1); ``attempt``: the idempotency token and tag that
        finds a lost answer's instances (default: one per run, type and zone)."""
        import botocore.exceptions as bex

        names = names or [f"cb-{run}-{i}" for i in range(n)]
        attempt = attempt or f"{run}-{self._nonce}-{offer.instance_type}-{zone}"
        public = self.setting("address") == "public"
        kw = dict(ImageId=image, InstanceType=offer.instance_type, MinCount=n, MaxCount=n, KeyName=key,
                  ClientToken=attempt[-64:],
                  Placement={"AvailabilityZone": zone, **({"GroupName": group} if group else {})},
                  TagSpecifications=[{"ResourceType": "instance", "Tags": [
                      {"Key": TAG, "Value": run}, {"Key": OWNER, "Value": self.owner},
                      {"Key": ATTEMPT, "Value": attempt},
                      {"Key": "Name", "Value": f"cb-{run}"}]},
                      *self._tags(run, "volume")])
        nic = {"DeviceIndex": 0, "SubnetId": subnet["SubnetId"], "Groups": [sg], "DeleteOnTermination": True,
               "AssociatePublicIpAddress": public}
        if self._efa(offer, n):
            nic["InterfaceType"] = "efa"
        kw["NetworkInterfaces"] = [nic]
        spot = _truthy(self.setting("spot"))
        if spot:
            kw["InstanceMarketOptions"] = {"MarketType": "spot", "SpotOptions": {
                "SpotInstanceType": "one-time", "InstanceInterruptionBehavior": "terminate"}}

        def find():  # all or nothing: with fewer, the retry (same ClientToken) answers for all of them
            got = self._instances(run, extra=[{"Name": f"tag:{ATTEMPT}", "Values": [attempt]}])
            return {"Instances": got} if len(got) == n else None

        try:
            out = self.call(f"run {n} x {offer.instance_type}", "run_instances", find=find, **kw)
        except bex.ClientError as e:
            code, msg = e.response["Error"].get("Code", ""), e.response["Error"].get("Message", "")
            if code in CAPACITY:
                raise CapacityError(f"{code}: {msg}") from None
            if code in LIMITS:
                raise ProviderError(f"aws: {n} x {offer.instance_type} exceeds the account's limits in {self.region}: "
                                    f"{code}: {msg} (ask for more in the Service Quotas console: the EC2 quotas "
                                    "for this instance family, on-demand or spot, count vCPUs)") from None
            raise ProviderError(f"aws: run {n} x {offer.instance_type} in {zone}: {code}: {msg}") from None
        ids = [i["InstanceId"] for i in out["Instances"]]
        self._launched.setdefault(run, set()).update(ids)
        for name, iid in zip(names, sorted(ids)):
            self._tag_new(iid, name)
        return self._wait_running(run, ids, n, offer, zone)

    def _tag_new(self, iid, name, timeout=60):
        """Name a new instance; EC2 may not know the id for a few seconds after RunInstances answered."""
        import botocore.exceptions as bex

        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.call("tag instance", "create_tags", Resources=[iid], Tags=[{"Key": "Name", "Value": name}])
            except bex.ClientError as e:
                if e.response["Error"]["Code"] != "InvalidInstanceID.NotFound" or time.monotonic() > deadline:
                    raise
                time.sleep(1)

    def _instances(self, run=None, ids=None, extra=(), states=LIVE):
        filters = [{"Name": "instance-state-name", "Values": list(states)}, *extra]
        filters.append({"Name": f"tag:{TAG}", "Values": [run]} if run else {"Name": "tag-key", "Values": [TAG]})
        if ids:  # a filter, not InstanceIds: an id EC2 does not list yet is then no error
            filters.append({"Name": "instance-id", "Values": list(ids)})
        res = self.pages("describe_instances", "Reservations", Filters=filters)
        return [i for r in res for i in r.get("Instances", [])]

    def _wait_running(self, run, ids, n, offer, zone):
        deadline = time.monotonic() + float(self.setting("build_timeout"))
        while True:
            got = {i["InstanceId"]: i for i in self._instances(run, ids=ids, states=(*LIVE, "terminated"))}
            dead = [i for i in got.values() if i["State"]["Name"] in ("shutting-down", "terminated", "stopping",
                                                                     "stopped")]
            if dead:
                why = dead[0].get("StateReason", {}).get("Message") or dead[0]["State"]["Name"]
                self._terminate(ids)
                raise CapacityError(f"instance {dead[0]['InstanceId']} ended before it ran: {why}")
            if len(got) == len(ids) and all(i["State"]["Name"] == "running" for i in got.values()):
                return [got[i] for i in sorted(ids)]
            if time.monotonic() > deadline:
                self._terminate(ids)
                raise CapacityError(f"{n} x {offer.instance_type} in {zone} not running after "
                                    f"{self.setting('build_timeout')} s")
            time.sleep(1)

    def _finish(self, spec, offer, n, zone, instances, d, base, on_record):
        spot = _truthy(self.setting("spot"))
        price = prices.lookup(self.name, self.region, offer.instance_type, self.setting("prices"))
        if spot:  # the spot price in force now, or unknown: never the on-demand list price
            hist = self.call("spot price", "describe_spot_price_history", InstanceTypes=[offer.instance_type],
                             AvailabilityZone=zone, ProductDescriptions=["Linux/UNIX"], MaxResults=1)
            sp = hist.get("SpotPriceHistory") or []
            price = prices.Price(float(sp[0]["SpotPrice"]), "USD", "EC2 spot price history",
                                 str(sp[0]["Timestamp"])[:10]) if sp else None
        offer = offer.__class__(**{**offer.__dict__, "price_per_hour": price.price_per_hour if price else None,
                                   "currency": price.currency if price else None})
        machines = []
        for i in instances:
            name = next((t["Value"] for t in i.get("Tags", []) if t["Key"] == "Name"), i["InstanceId"])
            private, public = i.get("PrivateIpAddress"), i.get("PublicIpAddress")
            addr = public if self.setting("address") == "public" and public else private
            if not addr:
                raise ProviderError(f"aws: instance {i['InstanceId']} has no address")

            machines.append({"name": name, "address": addr, "internal_address": private, "id": i["InstanceId"],
                             "known": cloudvm.host_keys(self.name, f"instance {i['InstanceId']}", addr,
                                                        self._console(i["InstanceId"]),
                                                        self.setting("host_keys"), float(self.setting("ssh_timeout")))})
        extra = [*base, ("zone", zone), ("shape", cloudvm.shape_text(offer, n)),
                 ("instances", [m["id"] for m in machines]),
                 ("efa", self._efa(offer, n)), ("placement_group", f"cb-{spec.run_id}" if n > 1 and
                                                 self.setting("placement") == "cluster" else None),
                 *(price.record() if price else (("price_source", None),))]
        fleet, self._ssh[spec.run_id] = cloudvm.ssh_fleet(
            self.name, spec, offer, machines, d, user=self.setting("user"), workdir=self.setting("workdir"),
            python=self.setting("python"), ssh_timeout=float(self.setting("ssh_timeout")), extra=extra,
            on_record=on_record)
        return fleet

    def _console(self, iid):
        return lambda: self.call("console output", "get_console_output", InstanceId=iid).get("Output")

    # -- launch: SSH, as the ssh provider does it; a reclaimed spot instance is named ------------------
    def launch(self, fleet: Fleet, job: Job, on_progress=None):
        lost = self._lost.setdefault(fleet.run_id, {})
        need = [n.name for n, _ in fleet.placement(job.ranks)]
        gone = [f"{n} ({lost[n]})" for n in need if n in lost]
        if gone:  # no point waiting for ssh timeouts on an instance that is no more
            raise PointFailed(f"instance {', '.join(gone)} is gone", job.log_path)
        try:
            return super().launch(fleet, job, on_progress)
        except PointFailed as e:
            reclaimed = self._reclaimed(fleet)
            if not reclaimed:
                raise
            what = "spot interruption: " + ", ".join(f"{k} ({v})" for k, v in reclaimed.items())
            if _truthy(self.setting("spot_replace")):
                try:
                    self._replace(fleet, reclaimed)
                except CloudbenchError as r:
                    lost.update(reclaimed)
                    raise PointFailed(f"{what}; replacing it failed: {r}", job.log_path) from None
                raise PointFailed(f"{what}; replaced, the point may be relaunched (--retries)", job.log_path,
                                  retryable=True) from None
            lost.update(reclaimed)
            raise PointFailed(f"{what}; {e}", job.log_path) from None

    def _ids(self, fleet):
        """{instance id: node name} of the fleet now (replacements included)."""
        now = self._current.setdefault(fleet.run_id, {n.name: dict(n.extra).get("server") for n in fleet.nodes})
        return {i: name for name, i in now.items() if i}

    def _reclaimed(self, fleet):
        """{node name: reason} of the fleet's instances that are no longer running."""
        ids = self._ids(fleet)
        try:
            got = self._instances(fleet.run_id, ids=list(ids), states=(*LIVE, "terminated"))
        except Exception as e:  # noqa: BLE001 (the point's own failure is reported either way)
            log.warning("aws: could not check the fleet's instances after a failed point: %s", e)
            return {}
        return {ids[i["InstanceId"]]: i.get("StateReason", {}).get("Message") or i["State"]["Name"]
                for i in got if i["State"]["Name"] != "running"}

    def _replace(self, fleet, names):
        """A new instance (same type, zone, placement group, name) for each reclaimed node; the run's inventory
        and known_hosts follow, and the trainer (and staged data) are deployed on it again."""
        ex = dict(fleet.extra)
        run, d, zone = fleet.run_id, Path(ex["state_dir"]), ex["zone"]
        offer = next(o for o in self.offerings() if o.instance_type == fleet.instance_type)
        subnet = self._subnet(zone)
        sg = self._security_group(run, subnet["VpcId"])
        gone = [i for i, name in self._ids(fleet).items() if name in names]
        stopped = self._instances(run, ids=gone, states=("pending", "running", "stopping", "stopped"))
        self._terminate([i["InstanceId"] for i in stopped], wait=False)  # reclaimed: gone; stopped: still bills
        new = self._run_instances(run, offer, len(names), zone, subnet, self._image(), f"cb-{run}", sg,
                                  ex.get("placement_group"), names=sorted(names),
                                  attempt=f"{run}-replace-{secrets.token_hex(3)}")
        try:
            self._adopt(fleet, d, new)
        except BaseException:
            self._terminate([i["InstanceId"] for i in new], wait=False)
            raise

    def _adopt(self, fleet, d, new):
        """The replacements take their nodes' places in the inventory and known_hosts; deploy (and staged data)
        follow."""
        import yaml

        run = fleet.run_id
        inv = yaml.safe_load((d / "inventory.yaml").read_text())
        known = (d / "known_hosts").read_text().splitlines()
        for i in new:
            name = next(t["Value"] for t in i.get("Tags", []) if t["Key"] == "Name")
            host = next(h for h in inv["hosts"] if h["name"] == name)
            old = {host["address"], host.get("internal_address")}
            addr = (i.get("PublicIpAddress") if self.setting("address") == "public" else None) or i["PrivateIpAddress"]
            keys = cloudvm.host_keys(self.name, f"instance {i['InstanceId']}", addr, self._console(i["InstanceId"]),
                                     self.setting("host_keys"), float(self.setting("ssh_timeout")))
            known = [k for k in known if k.split(" ", 1)[0] not in old] + keys
            if i.get("PrivateIpAddress") and i["PrivateIpAddress"] != addr:
                known += [f"{i['PrivateIpAddress']} {k.split(' ', 1)[1]}" for k in keys]
            host.update(address=addr, internal_address=i.get("PrivateIpAddress") or addr)
            self._current[run][name] = i["InstanceId"]
            log.warning("aws: %s replaced by instance %s (%s)", name, i["InstanceId"], addr)
        for h in inv["hosts"]:  # the fleet's node addresses are the old ones: Horovod uses these
            h.setdefault("internal_address", h["address"])
        cloudvm.save(d, inv, known)
        self._ssh[run] = ssh = cloudvm.ssh_for(d)
        cloudvm.wait_ssh(self.name, ssh, float(self.setting("ssh_timeout")))
        ssh.deploy(fleet)
        if run in self._staged:
            ssh.stage(fleet, self._staged[run])

    def stage(self, fleet: Fleet, assignments):
        self._staged[fleet.run_id] = assignments
        return super().stage(fleet, assignments)

    # -- teardown and gc ----------------------------------------------------------------------------
    def _terminate(self, ids, wait=True, timeout=600):
        import botocore.exceptions as bex

        if not ids:
            return
        try:
            self.call("terminate instances", "terminate_instances", InstanceIds=list(ids))
        except bex.ClientError as e:
            if e.response["Error"]["Code"] != "InvalidInstanceID.NotFound":
                raise
        deadline = time.monotonic() + timeout
        while wait:
            left = [i["InstanceId"] for i in self._instances(ids=list(ids), states=LIVE)]
            if not left:
                return
            if time.monotonic() > deadline:
                raise ProviderError(f"aws: instances {', '.join(left)} not terminated {timeout} s after the request; "
                                    "`cloudbench gc --provider aws` retries")
            time.sleep(2)

    def teardown(self, run_id, fleet=None):
        """Terminate the run's instances and wait, then delete its placement group, security group and key
        pair; all found by tag, so it works without any record and is safe to repeat."""
        import botocore.exceptions as bex

        gone = []
        instances = self._instances(run_id)
        # and those RunInstances answered that describe may not list yet (Ctrl-C right after the launch)
        launched = self._launched.pop(run_id, set())
        ended = {i["InstanceId"] for i in self._instances(run_id, ids=sorted(launched), states=("terminated",))} \
            if launched else set()
        self._terminate(sorted({i["InstanceId"] for i in instances} | (launched - ended)))
        gone += [Resource(kind="instance", id=i["InstanceId"], run_id=run_id, detail=i["InstanceType"])
                 for i in instances]
        tagged = [{"Name": f"tag:{TAG}", "Values": [run_id]}]
        for pg in self.call("describe placement groups", "describe_placement_groups",
                            Filters=tagged).get("PlacementGroups", []):
            self._delete("placement group", "delete_placement_group", GroupName=pg["GroupName"])
            gone.append(Resource(kind="placement_group", id=pg["GroupName"], run_id=run_id))
        for sg in self.call("describe security groups", "describe_security_groups",
                            Filters=tagged).get("SecurityGroups", []):
            deadline = time.monotonic() + 120
            while True:  # DependencyViolation while terminated instances' interfaces detach
                try:
                    self._delete("security group", "delete_security_group", GroupId=sg["GroupId"])
                    break
                except bex.ClientError as e:
                    if e.response["Error"]["Code"] != "DependencyViolation" or time.monotonic() > deadline:
                        raise ProviderError(f"aws: security group {sg['GroupId']}: {e}") from None
                    time.sleep(3)
            gone.append(Resource(kind="security_group", id=sg["GroupId"], run_id=run_id, detail=sg["GroupName"]))
        for kp in self._key_pairs(run_id):
            self._delete("key pair", "delete_key_pair", KeyName=kp["KeyName"])
            gone.append(Resource(kind="key_pair", id=kp["KeyName"], run_id=run_id))
        self._ssh.pop(run_id, None)
        return gone

    def _delete(self, what, method, **kw):
        import botocore.exceptions as bex

        try:
            self.call(f"delete {what}", method, **kw)
        except bex.ClientError as e:
            if not e.response["Error"]["Code"].endswith(("NotFound", ".Unknown")):
                raise

    def _key_pairs(self, run_id=None):
        pairs = self.call("describe key pairs", "describe_key_pairs").get("KeyPairs", [])
        out = []
        for kp in pairs:
            tags = {t["Key"]: t["Value"] for t in kp.get("Tags", [])}
            run = tags.get(TAG) or (kp["KeyName"][3:] if kp["KeyName"].startswith("cb-")
                                    and RUN_ID.fullmatch(kp["KeyName"][3:]) else None)
            if run and (run_id is None or run == run_id):
                out.append({**kp, "run": run, "owner": tags.get(OWNER)})
        return out

    def list_tagged(self):
        """Everything of any run in the region: instances, placement groups, security groups, key pairs."""
        found, owners = [], {}
        any_run = [{"Name": "tag-key", "Values": [TAG]}]

        def tags(x):
            return {t["Key"]: t["Value"] for t in x.get("Tags", [])}

        for i in self._instances():
            t = tags(i)
            owners.setdefault(t[TAG], t.get(OWNER))
            found.append(Resource(kind="instance", id=i["InstanceId"], run_id=t[TAG],
                                  detail=f"{i['InstanceType']} {i['State']['Name']}"))
        for pg in self.call("describe placement groups", "describe_placement_groups",
                            Filters=any_run).get("PlacementGroups", []):
            t = tags(pg)
            owners.setdefault(t[TAG], t.get(OWNER))
            found.append(Resource(kind="placement_group", id=pg["GroupName"], run_id=t[TAG]))
        for sg in self.call("describe security groups", "describe_security_groups",
                            Filters=any_run).get("SecurityGroups", []):
            t = tags(sg)
            owners.setdefault(t[TAG], t.get(OWNER))
            found.append(Resource(kind="security_group", id=sg["GroupId"], run_id=t[TAG], detail=sg["GroupName"]))
        for kp in self._key_pairs():
            owners.setdefault(kp["run"], kp["owner"])
            found.append(Resource(kind="key_pair", id=kp["KeyName"], run_id=kp["run"]))
        return self.with_owners(found, owners)
