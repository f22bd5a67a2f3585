"""A loopback AWS endpoint: a thin HTTP proxy in front of an in-process moto server whose EC2 instances are lab hosts.

    python -m harness.lab.emulators.aws serve [--lab NAME] [--host 127.0.0.1] [--port 0] [--region us-east-1]

Every request (any service, any region; S3 path-style, virtual-host style and presigned URLs included) is
forwarded to moto unchanged -- method, path, query, headers (Host and Authorization too), body -- and moto's
answer relayed. EC2 calls (the query protocol: ``Action=`` in the form body or the query string) are where the
proxy adds what moto lacks, in EC2's own XML (errors: ``<Response><Errors><Error><Code/><Message/></Error>
</Errors><RequestID/></Response>``):

    RunInstances         faults first; Placement.GroupName must name a placement group; as in EC2 (moto launches
                         MinCount) as many as can be placed up to MaxCount are launched, each on a free lab host
                         (its key pair's public key authorized there); fewer free hosts than MinCount: 500
                         InsufficientInstanceCapacity and nothing launched
    RunInstances, DescribeInstances
                         a placed instance's private and public addresses (top level and its network interface)
                         are its lab host's; placement.groupName is the group it was launched into; the
                         placement-group-name filter (moto: 500) is applied here
    GetConsoleOutput     cloud-init's output with the host's SSH host key block, as real instances print it
    TerminateInstances   (or any other way an instance ends, e.g. an interruption) releases the lab host
    Create/Describe/DeletePlacementGroup(s)
                         implemented here (moto answers 500): names, strategies, tags, filters, InUse/Unknown

Any valid instance type (moto's catalogue: type validation is on) may run on a lab host: the host stands in for
whatever the type says (GPUs included), so a provider sees EC2's types and the lab's reality. Without a lab,
instances keep moto's fake, unreachable addresses. AMI ``cloudbench-lab`` (LAB_IMAGE, owned by the account) exists
in every region; AMI validation is on, so unknown images are refused as EC2 refuses them.

Not AWS, under ``/_emulator/``: ``faults`` (GET lists, POST {name: count} arms, 0 disarms; FAULTS below),
``interrupt`` (POST {"instance_id": ...}: a spot interruption), ``state`` (GET; also the health URL) and
``reset`` (POST; moto's /moto-api/reset is caught and does the same).
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import http.client
import json
import logging
import os
import secrets
import sys
import threading
import time
import traceback
import uuid
import xml.etree.ElementTree as ET
from datetime import datetime, timezone
from http.server import ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit
from xml.sax.saxutils import escape

from harness.lab.emulators import labhost

ACCOUNT = "123456789012"  # moto's default account (any access key maps to it)
CREDENTIALS = {"aws_access_key_id": "cloudbench", "aws_secret_access_key": "cloudbench-lab"}
LAB_IMAGE = {"id": "ami-0cb1ab00000000001", "name": "cloudbench-lab"}
EC2_NS = "http://ec2.amazonaws.com/doc/2016-11-15/"
XML = {"Content-Type": "text/xml;charset=UTF-8"}
SPOT_REASON = ("Server.SpotInstanceTermination", "Server.SpotInstanceTermination: Spot instance termination")
VCPU_LIMIT = 64  # the vCPU limit the vcpu_limit fault quotes, unless given
HOP_HEADERS = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade",
               "expect", "content-length"}

FAULTS = {
    "insufficient_capacity": "the next N RunInstances answer 500 InsufficientInstanceCapacity; {\"count\": N, "
                             "\"zones\": [...], \"types\": [...]} hits only requests for those zones/types",
    "throttle": "the next N EC2 calls answer 503 RequestLimitExceeded",
    "vcpu_limit": "the next N RunInstances answer 400 VcpuLimitExceeded; {\"count\": N, \"limit\": L} sets the "
                  f"limit quoted (default {VCPU_LIMIT})",
    "internal_error": "the next N EC2 calls answer 500 InternalError",
    "lost_answer": "the next N RunInstances are carried out but answered 504 Gateway Timeout; "
                   "{\"count\": N, \"mode\": \"drop\"} closes the connection without an answer instead",
}


class Ec2Error(Exception):
    def __init__(self, status, code, message):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class _Drop(Exception):
    """Close the client's connection without answering."""


def _error_xml(code, message):
    return ('<?xml version="1.0" encoding="UTF-8"?>\n<Response><Errors><Error><Code>%s</Code><Message>%s</Message>'
            "</Error></Errors><RequestID>%s</RequestID></Response>" % (code, escape(message), uuid.uuid4())).encode()


def _scope(headers, query):
    """(service, region) from the SigV4 credential scope (Authorization header or presigned query), or Nones."""
    cred = query.get("X-Amz-Credential", [""])[0]
    auth = headers.get("Authorization") or ""
    if "Credential=" in auth:
        cred = auth.split("Credential=", 1)[1].split(",", 1)[0]
    parts = cred.split("/")
    return (parts[3], parts[2]) if len(parts) >= 5 else (None, None)


def _indexed(params, prefix):
    """Values of a query-protocol list: Prefix.1, Prefix.2, ... in order."""
    out, i = [], 1
    while f"{prefix}.{i}" in params:
        out.append(params[f"{prefix}.{i}"])
        i += 1
    return out


def _filters(params):
    """[(name, [values])] of Filter.N.Name / Filter.N.Value.M."""
    out, i = [], 1
    while f"Filter.{i}.Name" in params:
        out.append((params[f"Filter.{i}.Name"], _indexed(params, f"Filter.{i}.Value")))
        i += 1
    return out


def _tag_specs(params, resource_type):
    tags, i = [], 1
    while f"TagSpecification.{i}.ResourceType" in params:
        if params[f"TagSpecification.{i}.ResourceType"] == resource_type:
            j = 1
            while f"TagSpecification.{i}.Tag.{j}.Key" in params:
                tags.append((params[f"TagSpecification.{i}.Tag.{j}.Key"],
                             params.get(f"TagSpecification.{i}.Tag.{j}.Value", "")))
                j += 1
        i += 1
    return tags


def _local(tag):
    return tag.rsplit("}", 1)[-1]


def _child(el, name, create=False):
    for c in el:
        if _local(c.tag) == name:
            return c
    if create:
        ns = el.tag[:el.tag.index("}") + 1] if el.tag.startswith("{") else ""
        return ET.SubElement(el, ns + name)
    return None


def _set(el, path, value, create=False):
    """Set the text of el/path (local names, '/'-separated) when it exists (or ``create``)."""
    for name in path.split("/"):
        el = _child(el, name, create)
        if el is None:
            return
    el.text = value


def _instance_items(root):
    """The <item> elements of every instancesSet in a RunInstances/DescribeInstances answer."""
    return [item for s in root.iter() if _local(s.tag) == "instancesSet" for item in s if _local(item.tag) == "item"]


def _text(el, path):
    for name in path.split("/"):
        el = _child(el, name) if el is not None else None
    return el.text if el is not None else None


class _ProxyHandler(labhost.Handler):
    """labhost's handler, as a proxy: chunked request bodies, relayed Content-Length on HEAD, dropped answers."""

    def _serve(self):
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            raw = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline().strip():  # trailers
                        pass
                    break
                raw += self.rfile.read(size)
                self.rfile.readline()
            raw = bytes(raw)
        else:
            n = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(n) if n > 0 else b""
        held = labhost.hold_control(self.server, self.command, self.path, raw)
        try:
            status, data, headers = (*held, []) if held else \
                self.server.emulator.handle(self.command, self.path, self.headers, raw)
        except _Drop:
            self.close_connection = True
            return
        if isinstance(data, (dict, list)):
            data, headers = json.dumps(data).encode(), [*headers, ("Content-Type", "application/json")]
        self.send_response(status)
        for k, v in headers:
            if k.lower() not in HOP_HEADERS and k.lower() not in ("server", "date"):
                self.send_header(k, v)
        if status not in (204, 304):
            length = dict((k.lower(), v) for k, v in headers).get("content-length") if self.command == "HEAD" else None
            self.send_header("Content-Length", length or str(len(data)))
        self.end_headers()
        if data and self.command != "HEAD" and status not in (204, 304):
            self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _serve


class AwsEmulator:
    """moto behind a proxy that turns EC2 instances into lab hosts (``lab_state``: the lab's state dict, or None).

    ``url`` is the endpoint for every service (boto3 ``endpoint_url``), ``auth_url`` the unauthenticated health URL.
    """

    def __init__(self, lab_state=None, host="127.0.0.1", port=0, region="us-east-1", verbose=False):
        os.environ["MOTO_EC2_ENABLE_INSTANCE_TYPE_VALIDATION"] = "true"
        os.environ["MOTO_ENABLE_AMI_VALIDATION"] = "true"
        from moto import settings
        from moto.server import ThreadedMotoServer

        settings.EC2_ENABLE_INSTANCE_TYPE_VALIDATION = settings.ENABLE_AMI_VALIDATION = True  # if imported before
        if not verbose:
            logging.getLogger("werkzeug").setLevel(logging.ERROR)
        self.lab_state, self.region, self.verbose = lab_state, region, verbose
        self.hosts = labhost.lab_hosts(lab_state)
        self._moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._httpd = ThreadingHTTPServer((host, port), _ProxyHandler)
        self._httpd.daemon_threads = True
        self._httpd.emulator = self
        self._lock = threading.RLock()
        self._threads = []
        self.faults = {}
        self._clear()
        for h in self.hosts or ():  # a previous emulator's keys are no longer anyone's instances
            labhost.unauthorize(h)

    def _clear(self):
        self.records = {}  # instance id -> {"region", "host" (name or None), "group", "spot", "host_key", "reason"}
        self.groups = {}  # (region, name) -> placement group

    # -- lifecycle --------------------------------------------------------------------------------
    @property
    def url(self):
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def auth_url(self):
        return self.url + "/_emulator/state"

    @property
    def image_id(self):
        return LAB_IMAGE["id"]

    @property
    def credentials(self):
        return dict(CREDENTIALS)

    def start(self):
        self._moto.start()
        self._moto_addr = self._moto.get_host_and_port()
        self._ensure_image(self.region)
        t = threading.Thread(target=lambda: self._httpd.serve_forever(poll_interval=0.1), daemon=True,
                             name="aws-emulator")
        t.start()
        self._threads.append(t)
        return self

    def stop(self):
        self._httpd.shutdown()
        self._httpd.server_close()
        for t in self._threads:
            t.join(timeout=5)
        with self._lock:
            for rec in self.records.values():
                self._release(rec)
        for h in self.hosts or ():
            labhost.unauthorize(h)
        self._moto.stop()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # -- moto's models, read in-process -----------------------------------------------------------
    @staticmethod
    def _backends():
        from moto.ec2.models import ec2_backends

        return ec2_backends[ACCOUNT]

    def _backend(self, region):
        return self._backends()[region]

    def _instance(self, iid):
        """moto's Instance ``iid`` (any region), or None."""
        rec = self.records.get(iid)
        regions = [rec["region"]] if rec else list(self._backends().keys())
        for r in regions:
            for inst in self._backend(r).all_instances():
                if inst.id == iid:
                    return inst
        return None

    def _ensure_image(self, region):
        """The lab image exists in ``region`` (moto creates regions lazily and forgets them on reset)."""
        from moto.ec2.models.amis import Ami

        backend = self._backend(region)
        if LAB_IMAGE["id"] not in backend.amis:
            backend.amis[LAB_IMAGE["id"]] = Ami(
                backend, ami_id=LAB_IMAGE["id"], name=LAB_IMAGE["name"], owner_id=ACCOUNT,
                description="the lab hosts' system (this machine's)", virtualization_type="hvm",
                architecture="x86_64", root_device_type="ebs", hypervisor="xen", platform=None,
                image_location=f"{ACCOUNT}/{LAB_IMAGE['name']}", boot_mode="uefi-preferred")

    # -- request handling -------------------------------------------------------------------------
    def handle(self, method, target, headers, raw):
        """Answer one request: (status, body bytes or JSON-able, [(header, value)])."""
        split = urlsplit(target)
        try:
            if split.path.startswith("/_emulator/"):
                return self._control(method, split.path[len("/_emulator/"):].strip("/"), raw)
            if split.path.rstrip("/") == "/moto-api/reset" and method == "POST":
                self.reset()
                return 200, {"status": "ok"}, []
            query = parse_qs(split.query, keep_blank_values=True)
            params = {k: v[0] for k, v in query.items()}
            ctype = (headers.get("Content-Type") or "").lower()
            if method == "POST" and ctype.startswith("application/x-www-form-urlencoded"):
                params.update({k: v[0] for k, v in parse_qs(raw.decode("utf-8", "replace"),
                                                             keep_blank_values=True).items()})
            service, region = _scope(headers, query)
            if "Action" in params and service in ("ec2", None) and not split.path.strip("/"):
                return self._ec2(params["Action"], params, region or self.region, method, target, headers, raw)
            return self._forward(method, target, headers, raw)
        except _Drop:
            raise
        except Ec2Error as e:
            return e.status, _error_xml(e.code, e.message), list(XML.items())
        except Exception:  # noqa: BLE001 (an emulator bug must still answer, as EC2's 500)
            traceback.print_exc()
            return 500, _error_xml("InternalError", "An internal error has occurred"), list(XML.items())

    def _forward(self, method, target, headers, raw):
        """Send the request to moto as it came; (status, body, header list) of moto's answer."""
        conn = http.client.HTTPConnection(*self._moto_addr, timeout=300)
        try:
            out = {k: v for k, v in headers.items() if k.lower() not in HOP_HEADERS}
            if raw or method in ("POST", "PUT", "PATCH"):
                out["Content-Length"] = str(len(raw))
            conn.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
            for k, v in out.items():
                conn.putheader(k, v)
            conn.endheaders(raw or None)
            resp = conn.getresponse()
            return resp.status, resp.read(), resp.getheaders()
        finally:
            conn.close()

    def _moto_call(self, region, params):
        """An EC2 call of the proxy's own, straight to moto: (status, XML root or None, raw answer)."""
        from urllib.parse import urlencode

        body = urlencode({"Version": "2016-11-15", **params}).encode()
        headers = {"Host": "%s:%d" % self._moto_addr, "Content-Type": "application/x-www-form-urlencoded",
                   "Authorization": f"AWS4-HMAC-SHA256 Credential=cloudbench/20240101/{region}/ec2/aws4_request, "
                                    "SignedHeaders=host, Signature=0"}
        return self._forward("POST", "/", headers, body)

    # -- EC2 ----------------------------------------------------------------------------------------
    def _ec2(self, action, params, region, method, target, headers, raw):
        with self._lock:
            self._ensure_image(region)
            self._sweep()
            if self._take("throttle"):
                raise Ec2Error(503, "RequestLimitExceeded", "Request limit exceeded.")
            if self._take("internal_error"):
                raise Ec2Error(500, "InternalError", "An internal error has occurred")
            own = {"RunInstances": self._run_instances, "GetConsoleOutput": self._console_output,
                   "CreatePlacementGroup": self._create_group, "DescribePlacementGroups": self._describe_groups,
                   "DeletePlacementGroup": self._delete_group}.get(action)
            if own:
                def forward(body=None):
                    return self._forward(method, target if body is None else "/", headers,
                                         raw if body is None else body)
                return own(params, region, forward)
            groups = None
            if action == "DescribeInstances" and any(n == "placement-group-name" for n, _ in _filters(params)):
                groups, raw, target = self._without_group_filter(params)
            status, body, hdrs = self._forward(method, target, headers, raw)
            if status == 200 and action in ("DescribeInstances", "TerminateInstances"):
                self._sweep()
                if action == "DescribeInstances":
                    body = self._rewrite(body, groups)
                    hdrs = [(k, v) for k, v in hdrs if k.lower() != "content-length"]
            return status, body, hdrs

    @staticmethod
    def _without_group_filter(params):
        """moto lacks DescribeInstances' placement-group-name filter: (wanted names, body and target without it)."""
        from urllib.parse import urlencode

        rest, groups = [], None
        for name, values in _filters(params):
            if name == "placement-group-name":
                groups = set(values) if groups is None else groups & set(values)
            else:
                rest.append((name, values))
        out = {k: v for k, v in params.items() if not k.startswith("Filter.")}
        for i, (name, values) in enumerate(rest, 1):
            out[f"Filter.{i}.Name"] = name
            out.update({f"Filter.{i}.Value.{j}": v for j, v in enumerate(values, 1)})
        return groups, urlencode(out).encode(), "/"

    def _take(self, name, matches=None):
        """Consume one shot of fault ``name`` when armed (and ``matches(spec)``); the spec, or None."""
        spec = self.faults.get(name)
        if not spec or (matches and not matches(spec)):
            return None
        spec["count"] -= 1
        if spec["count"] <= 0:
            del self.faults[name]
        return spec

    def _zone(self, params, region):
        zone = params.get("Placement.AvailabilityZone")
        subnet = params.get("SubnetId") or params.get("NetworkInterface.1.SubnetId")
        if not zone and subnet:
            try:
                zone = self._backend(region).get_subnet(subnet).availability_zone
            except Exception:  # noqa: BLE001 (moto will refuse the unknown subnet itself)
                zone = None
        return zone or f"{region}a"

    def _capacity_error(self, itype, zone, region):
        others = sorted(z.name for z in self._backend(region).describe_availability_zones() if z.name != zone)
        return Ec2Error(500, "InsufficientInstanceCapacity",
                        f"We currently do not have sufficient {itype} capacity in the Availability Zone you "
                        f"requested ({zone}). Our system will be working on provisioning additional capacity. You "
                        f"can currently get {itype} capacity by not specifying an Availability Zone in your request "
                        f"or choosing {', '.join(others)}.")

    def _run_instances(self, params, region, forward):
        itype, zone = params.get("InstanceType", "m1.small"), self._zone(params, region)
        group = params.get("Placement.GroupName")
        if self._take("insufficient_capacity", lambda s: (not s.get("zones") or zone in s["zones"]) and
                      (not s.get("types") or itype in s["types"])):
            raise self._capacity_error(itype, zone, region)
        spec = self._take("vcpu_limit")
        if spec:
            raise Ec2Error(400, "VcpuLimitExceeded",
                           f"You have requested more vCPU capacity than your current vCPU limit of "
                           f"{spec.get('limit', VCPU_LIMIT)} allows for the instance bucket that the specified "
                           "instance type belongs to. Please visit http://aws.amazon.com/contact-us/ec2-request to "
                           "request an adjustment to this limit.")
        if group and (region, group) not in self.groups:
            raise Ec2Error(400, "InvalidPlacementGroup.Unknown", f"The Placement Group '{group}' is unknown.")
        # EC2 launches as many as it can up to MaxCount (at least MinCount); moto launches MinCount.
        try:
            lo, hi = int(params.get("MinCount") or 1), int(params.get("MaxCount") or params.get("MinCount") or 1)
        except ValueError:
            lo = hi = 0  # moto answers the malformed request
        free = None
        if self.hosts is not None:
            taken = {r["host"] for r in self.records.values() if r["host"]}
            free = [h for h in self.hosts if h["name"] not in taken]
            if 0 < lo <= hi and len(free) < lo:
                raise self._capacity_error(itype, zone, region)
            hi = min(hi, len(free))
        if 0 < lo <= hi:
            from urllib.parse import urlencode

            status, body, hdrs = forward(urlencode({**params, "MinCount": hi, "MaxCount": hi}).encode())
        else:
            status, body, hdrs = forward()
        if status != 200:
            return status, body, hdrs
        root = ET.fromstring(body)
        ids = [_text(it, "instanceId") for it in _instance_items(root)]
        hosts = free[:len(ids)] if free is not None else [None] * len(ids)
        key = None
        if params.get("KeyName"):
            kp = self._backend(region).key_pairs.get(params["KeyName"])
            key = kp.material_public.decode() if kp and isinstance(kp.material_public, bytes) else (
                kp.material_public if kp else None)
        spot = params.get("InstanceMarketOptions.MarketType") == "spot"
        for iid, host in zip(ids, hosts):
            self.records[iid] = {"region": region, "host": host and host["name"], "group": group, "spot": spot,
                                 "host_key": labhost.host_key(host) if host else labhost.fake_host_key(),
                                 "address": host and host["address"], "reason": None}
            if host and key and labhost.key_blob(key):
                labhost.authorize(host, key, iid)
        spec = self._take("lost_answer")
        if spec:  # carried out, but the answer never arrives: the client must find its instances by tag
            if spec.get("mode") == "drop":
                raise _Drop()
            return 504, b"<html><body><h1>504 Gateway Time-out</h1>The server didn't respond in time.</body></html>", \
                [("Content-Type", "text/html")]
        return 200, self._rewrite_root(root), [(k, v) for k, v in hdrs if k.lower() != "content-length"]

    def _rewrite(self, body, groups=None):
        root = ET.fromstring(body)
        if groups is not None:  # keep the instances in those placement groups, and reservations left non-empty
            for rset in [s for s in root.iter() if _local(s.tag) == "reservationSet"]:
                for res in list(rset):
                    for iset in [s for s in res if _local(s.tag) == "instancesSet"]:
                        for item in list(iset):
                            if (self.records.get(_text(item, "instanceId")) or {}).get("group") not in groups:
                                iset.remove(item)
                        if not len(iset):
                            rset.remove(res)
        return self._rewrite_root(root)

    def _rewrite_root(self, root):
        """Addresses of placed instances become their lab hosts'; placement groups and spot reasons appear."""
        for item in _instance_items(root):
            rec = self.records.get(_text(item, "instanceId"))
            if not rec:
                continue
            if rec["group"]:
                _set(item, "placement/groupName", rec["group"], create=True)
                g = self.groups.get((rec["region"], rec["group"]))
                if g:
                    _set(item, "placement/groupId", g["id"], create=True)
            if rec["reason"]:
                _set(item, "stateReason/code", rec["reason"][0], create=True)
                _set(item, "stateReason/message", rec["reason"][1], create=True)
            a = rec["address"]
            if not a or _text(item, "instanceState/name") in ("terminated", "shutting-down"):
                continue
            dns = "ip-%s.ec2.internal" % a.replace(".", "-")
            for path in ("privateIpAddress", "ipAddress"):
                _set(item, path, a, create=True)
            _set(item, "privateDnsName", dns)
            for nic in _child(item, "networkInterfaceSet") or ():
                _set(nic, "privateIpAddress", a)
                _set(nic, "privateDnsName", dns)
                _set(nic, "association/publicIp", a)
                for addr in _child(nic, "privateIpAddressesSet") or ():
                    if _text(addr, "primary") == "true":
                        _set(addr, "privateIpAddress", a)
                        _set(addr, "privateDnsName", dns)
                        _set(addr, "association/publicIp", a)
        if not root.tag.startswith("{"):
            return ET.tostring(root, encoding="utf-8", xml_declaration=True)
        ET.register_namespace("", root.tag[1:root.tag.index("}")])
        return ET.tostring(root, encoding="utf-8", xml_declaration=True)

    def _release(self, rec):
        host = next((h for h in self.hosts or () if h["name"] == rec["host"]), None)
        if host:
            iid = next(i for i, r in self.records.items() if r is rec)
            labhost.release(host, iid)
        rec["host"] = None

    def _sweep(self):
        """Release the lab hosts of instances that ended, however they ended (moto's state is the truth)."""
        for iid, rec in self.records.items():
            if rec["host"]:
                inst = self._instance(iid)
                if inst is None or inst.state in ("terminated", "shutting-down"):
                    self._release(rec)

    def _console_output(self, params, region, forward):
        status, body, hdrs = forward()
        rec = self.records.get(params.get("InstanceId"))
        if status != 200 or not rec:
            return status, body, hdrs
        root = ET.fromstring(body)
        key = rec["host_key"]
        fp = base64.b64encode(hashlib.sha256(base64.b64decode(key.split()[1])).digest()).decode().rstrip("=")
        name = "ip-%s" % (rec["address"] or "10-0-0-1").replace(".", "-")
        now = datetime.now(timezone.utc).strftime("%a, %d %b %Y %H:%M:%S +0000")
        lines = ["[    0.000000] Linux version 6.1.0-1028-aws (cloudbench-emulator) #28-Ubuntu SMP",
                 "[    0.000000] Command line: BOOT_IMAGE=/boot/vmlinuz root=PARTUUID=1 ro console=tty1 console=ttyS0",
                 f"Cloud-init v. 23.1.2 running 'init' at {now}. Up 5.12 seconds.",
                 "ec2: #############################################################",
                 "ec2: -----BEGIN SSH HOST KEY FINGERPRINTS-----",
                 f"ec2: 256 SHA256:{fp} root@{name} (ED25519)",
                 "ec2: -----END SSH HOST KEY FINGERPRINTS-----",
                 "ec2: #############################################################",
                 "-----BEGIN SSH HOST KEY KEYS-----",
                 " ".join(key.split()[:2]) + f" root@{name}",
                 "-----END SSH HOST KEY KEYS-----",
                 f"Cloud-init v. 23.1.2 finished at {now}. Datasource DataSourceEc2Local.  Up 9.87 seconds"]
        _set(root, "output", base64.b64encode(("\n".join(lines) + "\n").encode()).decode(), create=True)
        return 200, self._rewrite_root(root), [(k, v) for k, v in hdrs if k.lower() != "content-length"]

    # -- placement groups (moto has none) ---------------------------------------------------------
    def _group_xml(self, g, tag="item"):
        tags = "".join(f"<item><key>{escape(k)}</key><value>{escape(v)}</value></item>" for k, v in g["tags"])
        extra = (f"<partitionCount>{g['partitions']}</partitionCount>" if g["strategy"] == "partition" else "") + (
            f"<spreadLevel>{g['spread_level']}</spreadLevel>" if g["strategy"] == "spread" else "")
        return (f"<{tag}><groupName>{escape(g['name'])}</groupName><state>available</state>"
                f"<strategy>{g['strategy']}</strategy>{extra}<groupId>{g['id']}</groupId>"
                f"<tagSet>{tags}</tagSet><groupArn>{g['arn']}</groupArn></{tag}>")

    @staticmethod
    def _answer(action, inner):
        return 200, (f'<?xml version="1.0" encoding="UTF-8"?>\n<{action}Response xmlns="{EC2_NS}">'
                     f"<requestId>{uuid.uuid4()}</requestId>{inner}</{action}Response>").encode(), list(XML.items())

    def _create_group(self, params, region, forward):
        name, strategy = params.get("GroupName"), params.get("Strategy", "cluster")
        if not name:
            raise Ec2Error(400, "MissingParameter", "The request must contain the parameter groupName")
        if strategy not in ("cluster", "spread", "partition"):
            raise Ec2Error(400, "InvalidParameterValue", f"Value ({strategy}) for parameter strategy is invalid. "
                                                         "Valid values are cluster, spread, partition.")
        if (region, name) in self.groups:
            raise Ec2Error(400, "InvalidPlacementGroup.Duplicate", f"The Placement Group '{name}' already exists.")
        g = {"name": name, "strategy": strategy, "id": "pg-" + secrets.token_hex(9)[:17], "region": region,
             "tags": _tag_specs(params, "placement-group"), "created": time.time(),
             "partitions": int(params.get("PartitionCount") or 2), "spread_level": params.get("SpreadLevel", "rack")}
        g["arn"] = f"arn:aws:ec2:{region}:{ACCOUNT}:placement-group/{name}"
        self.groups[(region, name)] = g
        return self._answer("CreatePlacementGroup", "<return>true</return>" + self._group_xml(g, "placementGroup"))

    def _describe_groups(self, params, region, forward):
        groups = [g for (r, _), g in self.groups.items() if r == region]
        names, ids = _indexed(params, "GroupName"), _indexed(params, "GroupId")
        for n in names:
            if not any(g["name"] == n for g in groups):
                raise Ec2Error(400, "InvalidPlacementGroup.Unknown", f"The Placement Group '{n}' is unknown.")
        for i in ids:
            if not any(g["id"] == i for g in groups):
                raise Ec2Error(400, "InvalidPlacementGroupId.NotFound", f"The Placement Group ID '{i}' does not exist")
        groups = [g for g in groups if (not names or g["name"] in names) and (not ids or g["id"] in ids)]
        for fname, values in _filters(params):
            def value(g, fname=fname):
                tags = dict(g["tags"])
                if fname.startswith("tag:"):
                    return [tags[fname[4:]]] if fname[4:] in tags else []
                return {"group-name": [g["name"]], "group-arn": [g["arn"]], "state": ["available"],
                        "strategy": [g["strategy"]], "tag-key": list(tags),
                        "spread-level": [g["spread_level"]] if g["strategy"] == "spread" else []}.get(fname)
            if value(groups[0] if groups else {"name": "", "arn": "", "strategy": "", "tags": [],
                                               "spread_level": ""}) is None:
                raise Ec2Error(400, "InvalidParameterValue", f"The filter '{fname}' is invalid")
            groups = [g for g in groups if set(value(g)) & set(values)]
        inner = "".join(self._group_xml(g) for g in sorted(groups, key=lambda g: g["created"]))
        return self._answer("DescribePlacementGroups", f"<placementGroupSet>{inner}</placementGroupSet>")

    def _delete_group(self, params, region, forward):
        name = params.get("GroupName")
        if (region, name) not in self.groups:
            raise Ec2Error(400, "InvalidPlacementGroup.Unknown", f"The Placement Group '{name}' is unknown.")
        for iid, rec in self.records.items():
            inst = self._instance(iid) if rec["group"] == name and rec["region"] == region else None
            if inst is not None and inst.state != "terminated":
                raise Ec2Error(400, "InvalidPlacementGroup.InUse",
                               f"The Placement Group '{name}' is in use and may not be deleted.")
        del self.groups[(region, name)]
        return self._answer("DeletePlacementGroup", "<return>true</return>")

    # -- the emulator's own endpoints -------------------------------------------------------------
    def _control(self, method, what, raw):
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            return 400, {"error": "the body is not JSON"}, []
        with self._lock:
            if what == "state" and method in ("GET", "HEAD"):
                return 200, self.state(), []
            if what == "faults" and method == "GET":
                return 200, {"faults": json.loads(json.dumps(self.faults)), "known": FAULTS}, []
            if what == "faults" and method == "POST":
                return self._set_faults(body)
            if what == "reset" and method == "POST":
                self.reset()
                return 200, self.state(), []
            if what == "interrupt" and method == "POST":
                return self._interrupt(body.get("instance_id"))
        return 404, {"error": f"no {method} /_emulator/{what} (known: GET state, GET/POST faults, POST reset, "
                              "POST interrupt)"}, []

    def _set_faults(self, body):
        if not isinstance(body, dict):
            return 400, {"error": "expected {fault: count}"}, []
        unknown = set(body) - set(FAULTS)
        if unknown:
            return 400, {"error": f"unknown fault {sorted(unknown)[0]!r}; known: {', '.join(FAULTS)}"}, []
        for name, value in body.items():
            spec = dict(value) if isinstance(value, dict) else {"count": value}
            count = spec.get("count", 1)
            if not isinstance(count, int) or isinstance(count, bool) or count < 0:
                return 400, {"error": f"fault {name} takes a count >= 0, not {count!r}"}, []
            allowed = {"insufficient_capacity": {"zones", "types"}, "vcpu_limit": {"limit"},
                       "lost_answer": {"mode"}}.get(name, set()) | {"count"}
            if set(spec) - allowed:
                return 400, {"error": f"fault {name} takes {sorted(allowed)}, not {sorted(set(spec) - allowed)}"}, []
            if name == "lost_answer" and spec.get("mode", "504") not in ("504", "drop"):
                return 400, {"error": "lost_answer mode is '504' or 'drop'"}, []
            spec["count"] = count
            if count:
                self.faults[name] = spec
            else:
                self.faults.pop(name, None)
        return 200, {"faults": json.loads(json.dumps(self.faults))}, []

    def _interrupt(self, iid):
        inst = self._instance(iid) if iid else None
        if inst is None:
            return 404, {"error": f"no instance {iid!r}"}, []
        if inst.lifecycle != "spot":
            return 409, {"error": f"instance {iid} is not a spot instance"}, []
        if inst.state == "terminated":
            return 409, {"error": f"instance {iid} is already terminated"}, []
        from moto.ec2.models.instances import StateReason

        inst.ec2_backend.terminate_instances([iid])
        inst.state_reason = StateReason(SPOT_REASON[1], SPOT_REASON[0])
        rec = self.records.setdefault(iid, {"region": inst.region_name, "host": None, "group": None, "spot": True,
                                            "host_key": labhost.fake_host_key(), "address": None})
        rec["reason"] = SPOT_REASON
        self._sweep()
        return 200, {"instance_id": iid, "state": "terminated", "state_reason": SPOT_REASON[0]}, []

    def state(self):
        """What the account holds (terminated instances and default security groups aside), lab hosts' use."""
        from moto.s3.models import s3_backends

        with self._lock:
            self._sweep()
            out = {"instances": [], "security_groups": [], "key_pairs": [], "placement_groups": []}
            for region, b in list(self._backends().items()):
                for inst in b.all_instances():
                    if inst.state == "terminated":
                        continue
                    rec = self.records.get(inst.id) or {}
                    out["instances"].append({
                        "id": inst.id, "type": inst.instance_type, "state": inst.state, "region": region,
                        "zone": inst.availability_zone, "host": rec.get("host"),
                        "address": rec.get("address") or inst.private_ip,
                        "tags": {t["key"]: t["value"] for t in inst.get_tags()},
                        "spot": inst.lifecycle == "spot", "key_name": inst.key_name,
                        "placement_group": rec.get("group")})
                for g in b.describe_security_groups():
                    if g.name != "default":
                        out["security_groups"].append({"id": g.id, "name": g.name, "region": region,
                                                       "vpc_id": g.vpc_id, "rules": len(g.ingress_rules)})
                out["key_pairs"] += [{"name": k, "region": region} for k in b.key_pairs]
            out["placement_groups"] = [{"name": g["name"], "id": g["id"], "region": g["region"],
                                        "strategy": g["strategy"], "tags": dict(g["tags"])}
                                       for g in self.groups.values()]
            out["empty"] = not any(out.values())
            buckets = {}
            for part in list(s3_backends[ACCOUNT].values()):
                for name, bucket in list(part.buckets.items()):
                    buckets[name] = len(list(bucket.keys.keys()))
            out["buckets"] = buckets
            taken = {r["host"]: i for i, r in self.records.items() if r["host"]}
            out["hosts"] = {h["name"]: taken.get(h["name"]) for h in self.hosts} if self.hosts is not None else None
            out["faults"] = json.loads(json.dumps(self.faults))
            return out

    def reset(self):
        """moto's reset (every service, every region) and the proxy's own state; lab hosts released, faults off."""
        with self._lock:
            for rec in self.records.values():
                self._release(rec)
            self._forward("POST", "/moto-api/reset", {"Host": "%s:%d" % self._moto_addr}, b"")
            self._clear()
            self.faults.clear()
            self._ensure_image(self.region)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m harness.lab.emulators.aws",
                                 description="moto behind a proxy whose EC2 instances are lab hosts.")
    sub = ap.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve in the foreground; prints one JSON line once listening")
    serve.add_argument("--lab", help="the lab whose hosts back the instances (default: none, moto's addresses)")
    serve.add_argument("--host", default="127.0.0.1", help="listen address (the lab's bridge for presigned URLs)")
    serve.add_argument("--port", type=int, default=0, help="0 picks a free port (see the JSON line)")
    serve.add_argument("--region", default="us-east-1")
    serve.add_argument("--verbose", action="store_true", help="log every request to stderr")
    args = ap.parse_args(argv)
    state = labhost.load_lab(args.lab) if args.lab else None
    emu = AwsEmulator(lab_state=state, host=args.host, port=args.port, region=args.region,
                      verbose=args.verbose).start()
    labhost.serve_until_signal({"url": emu.url, "auth_url": emu.auth_url, "region": emu.region, "pid": os.getpid(),
                                "lab": args.lab, "image_id": emu.image_id, "credentials": emu.credentials}, emu.stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
