"""A Kubernetes API (kmock's KubernetesEmulator over real HTTP) whose nodes are lab hosts, with a fake Kubeflow
MPIJob controller that runs each job's launcher for real on a lab host.

    python -m harness.lab.emulators.kubernetes serve [--lab NAME] [--host H] [--port 0] [--gpus-per-node K] [--verbose]

prints one JSON line once listening ({"url", "auth_url", "pid", "lab", "token", "namespace"}) and serves until
SIGTERM/SIGINT. Any bearer token is accepted. Besides the Kubernetes API: GET /healthz (and /livez, /readyz),
GET /version(/), and the control surface GET /_emulator/state, POST /_emulator/reset, POST /_emulator/crd
{"installed": bool}.

The controller (a thread) reconciles MPIJobs of kubeflow.org/v2beta1 and v1 with v2beta1 semantics: it creates
the launcher and worker pods, schedules workers onto nodes with room (cpu, nvidia.com/gpu), and once every
worker runs it writes a hostfile (``<lab dir>/k8s/<ns>/<job>/hostfile``) and runs the launcher container's
command over ``ssh -A`` (the lab key in a per-job ssh-agent) on the lab host of worker 0. Its combined output
is the launcher pod's log; its exit code decides Succeeded/Failed. Without a lab there are no nodes and every
MPIJob fails at once with the message "no lab hosts to run on".
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import datetime
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import aiohttp.web
import kmock
from kmock._internal import parsing

from harness.lab.common import ssh_command
from harness.lab.emulators import labhost

MPI_RESOURCES = ("kubeflow.org/v2beta1/mpijobs", "kubeflow.org/v1/mpijobs")
CRD_NAME = "mpijobs.kubeflow.org"
RUN_LABEL = "cloudbench-run"
TRACKED = ("v1/pods", "v1/configmaps", "v1/secrets", "v1/services")
GPU = "nvidia.com/gpu"
GPU_PRODUCT = "NVIDIA-A100-SXM4-40GB"
SEEDED_NAMESPACES = ("default", "kube-system", "cloudbench")
LOG_LIMIT = 4 << 20  # bytes of launcher output kept per job (the tail)
VERSION = {"major": "1", "minor": "29", "gitVersion": "v1.29.4-cloudbench-kmock", "gitTreeState": "clean",
           "gitCommit": "0000000000000000000000000000000000000000",
           "buildDate": "2024-04-16T00:00:00Z", "goVersion": "go1.21.9", "compiler": "gc", "platform": "linux/amd64"}


def _patch_kmock():
    """Two fixes to kmock 0.8's request parsing: kubernetes-python sends ``watch=True`` (kmock only
    recognises ``watch=true``), and /api/v1/namespaces[/NAME[/status]] is the Namespace resource itself
    (kmock takes it for a namespace prefix and fails)."""
    if getattr(parsing.guess_k8s, "_cloudbench", False):
        return
    original, original_path = parsing.guess_k8s, parsing.parse_path

    def parse_path(path):
        parts = path.strip("/").split("/")
        rest = parts[2:] if parts[:1] == ["api"] else parts[3:] if parts[:1] == ["apis"] else None
        if rest and rest[0] == "namespaces" and (len(rest) <= 2 or rest[2] in ("status", "finalize")):
            group = "" if parts[0] == "api" else parts[1]
            return parsing.ParsedPath(group, parts[1] if parts[0] == "api" else parts[2], "namespaces", None,
                                      rest[1] if len(rest) > 1 else None, rest[2] if len(rest) > 2 else None)
        return original_path(path)

    def guess_k8s(k8s, method, query):
        if "watch" in query:
            query = {**query, "watch": str(query["watch"]).lower()}
        return original(k8s, method, query)

    guess_k8s._cloudbench = True
    parsing.guess_k8s, parsing.parse_path = guess_k8s, parse_path


def now():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- selectors and quantities --------------------------------------------------------------------------------

def _terms(selector):
    return [t.strip() for t in re.split(r",(?![^(]*\))", selector or "") if t.strip()]


def label_match(selector, labels):
    """Kubernetes label-selector semantics: k=v, k==v, k!=v, k, !k, k in (a,b), k notin (a,b)."""
    labels = labels or {}
    for t in _terms(selector):
        m = re.fullmatch(r"([\w./-]+)\s+(in|notin)\s+\((.*)\)", t)
        if m:
            values = {v.strip() for v in m.group(3).split(",")}
            if (labels.get(m.group(1)) in values) != (m.group(2) == "in"):
                return False
        elif "!=" in t:
            k, v = (x.strip() for x in t.split("!=", 1))
            if labels.get(k) == v:
                return False
        elif "=" in t:
            k, v = (x.strip() for x in re.split(r"==?", t, maxsplit=1))
            if labels.get(k) != v:
                return False
        elif t.startswith("!"):
            if t[1:].strip() in labels:
                return False
        elif t not in labels:
            return False
    return True


def field_match(selector, obj):
    """Field selectors on dotted paths (metadata.name=x, status.phase!=Running)."""
    for t in _terms(selector):
        neg = "!=" in t
        k, v = (x.strip() for x in re.split(r"!=|==?", t, maxsplit=1))
        cur = obj
        for part in k.split("."):
            cur = cur.get(part) if isinstance(cur, dict) else None
        if (str(cur if cur is not None else "") == v) == neg:
            return False
    return True


def cpu_quantity(q):
    """Cores of a cpu quantity: 2, "1.5", "500m"."""
    s = str(q).strip()
    return int(s[:-1]) / 1000 if s.endswith("m") else float(s)


def requests_of(container):
    """(cpu cores, gpus) a container requests (limits stand in for missing requests, as in Kubernetes)."""
    res = container.get("resources") or {}
    req = {**(res.get("limits") or {}), **(res.get("requests") or {})}
    return cpu_quantity(req.get("cpu", 0)), int(req.get(GPU, 0) or 0)


def pod_requests(pod):
    cpu = gpu = 0
    for c in (pod.get("spec") or {}).get("containers") or []:
        a, b = requests_of(c)
        cpu, gpu = cpu + a, gpu + b
    return cpu, gpu


# --- the API server -----------------------------------------------------------------------------------------

class Api(kmock.KubernetesEmulator):
    """kmock's emulator plus what clients of a real apiserver rely on: uid/resourceVersion/creationTimestamp,
    label and field selectors, list kinds, watch timeouts, PUT, deletecollection, pod logs, /version/,
    /healthz, the MPIJob CRD (removable) and the /_emulator/ control surface (``owner`` answers it)."""

    def __attrs_post_init__(self):
        super().__attrs_post_init__()
        self.owner = None
        self.crd_installed = True
        self.rv = 1
        self.holds = labhost.Holds()  # /_emulator/hold: answers held back so a signal lands in an API call

    def next_rv(self):
        self.rv += 1
        return str(self.rv)

    # -- request entry point
    async def _handle(self, request):
        path = request.url.path
        if path in ("/healthz", "/livez", "/readyz"):
            return aiohttp.web.Response(text="ok")
        if path in ("/version", "/version/"):
            return aiohttp.web.json_response(VERSION)
        if path.rstrip("/") == "/_emulator/hold":
            status, body = self.holds.control(request.method, request.data if request.method == "POST" else None)
            return aiohttp.web.json_response(body, status=status)
        if path.startswith("/_emulator/"):
            status, body = await asyncio.get_running_loop().run_in_executor(
                None, self.owner.control, request.method, path[len("/_emulator/"):], request.data)
            return aiohttp.web.json_response(body, status=status)
        target = str(request.url)
        seconds = self.holds.seconds(request.method, target)
        if seconds:  # a test's signal lands inside this API call
            try:
                await asyncio.sleep(seconds)
            finally:
                self.holds.done()
        if path.startswith("/apis/kubeflow.org") and not self.crd_installed:
            raise kmock.KubernetesResourceNotFoundError(
                message="the server could not find the requested resource (MPIJob CRD not installed)")
        res = request.resource
        if res is not None:
            if res.plural == "pods" and request.subresource == "log" and request.method == "GET":
                return await self._serve_log(request)
            if request.method == "PUT" and request.name:
                return aiohttp.web.json_response(await self._replace(request))
            if request.method == "DELETE" and request.name is None and res.plural:
                return aiohttp.web.json_response(await self._delete_collection(request))
            if request.action == kmock.action.CREATE and isinstance(request.data, dict):
                self._complete(request)
            elif request.action == kmock.action.UPDATE and isinstance(request.data, dict):
                request.data.setdefault("metadata", {})["resourceVersion"] = self.next_rv()
        response = await super()._handle(request)
        if request.action == kmock.action.CREATE and self.owner is not None:
            self.owner.wake()
        return response

    def _info(self, res):
        try:
            return self.resources[res]
        except (KeyError, LookupError):
            return None

    def _kind(self, res):
        info = self._info(res)
        return info.kind if info is not None and info.kind else (res.plural or "").capitalize()

    def _complete(self, request):
        """Fill in the fields the apiserver sets on create."""
        data, meta = request.data, request.data.setdefault("metadata", {})
        if request.namespace:
            meta["namespace"] = request.namespace  # else kmock stores it without and namespaced watches miss it
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + secrets.token_hex(3)[:5]
        meta.setdefault("uid", str(uuid.uuid4()))
        meta["resourceVersion"] = self.next_rv()
        meta.setdefault("creationTimestamp", now())
        meta.setdefault("generation", 1)
        res = request.resource
        data.setdefault("apiVersion", f"{res.group}/{res.version}" if res.group else res.version)
        data.setdefault("kind", self._kind(res))

    # -- lists and watches with selectors
    def _selected(self, request, raw):
        p = request.params
        return label_match(p.get("labelSelector"), (raw.get("metadata") or {}).get("labels")) and \
            field_match(p.get("fieldSelector"), raw)

    async def _serve_list(self, request):
        if request.resource not in self._get_resources():
            raise kmock.KubernetesResourceNotFoundError()
        async with self._lock:
            items = [o.raw for (r, ns, _), o in self._objects.items()
                     if r == request.resource and (request.namespace is None or ns == request.namespace)
                     and not o.deleted]
        res = request.resource
        return {"apiVersion": f"{res.group}/{res.version}" if res.group else res.version,
                "kind": self._kind(res) + "List", "metadata": {"resourceVersion": str(self.rv)},
                "items": [i for i in items if self._selected(request, i)]}

    async def _serve_watch(self, request):
        # Unlike kmock's own, the bus is marked under the same lock as the listing: no event is lost between.
        yield b""
        timeout = request.params.get("timeoutSeconds")
        deadline = time.monotonic() + float(timeout) if timeout else None
        res, bus = request.resource, self._buses[request.resource]

        def wanted(raw):
            meta = raw.get("metadata") or {}
            return (request.namespace is None or meta.get("namespace") == request.namespace) and \
                (request.name is None or meta.get("name") == request.name) and self._selected(request, raw)
        async with self._lock:
            mark = await bus.mark()
            initial = [o.raw for (r, _, _), o in self._objects.items() if r == res and not o.deleted]
        events = bus.stream(since=mark)
        try:
            for raw in initial:
                if wanted(raw):
                    yield {"type": "ADDED", "object": raw}
            while True:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return
                try:
                    event = await asyncio.wait_for(events.__anext__(), left)
                except (StopAsyncIteration, asyncio.TimeoutError):
                    return
                if wanted(event.get("object") or {}):
                    yield event
        finally:
            await events.aclose()
            await bus.unmark(mark)

    # -- what kmock lacks
    async def _serve_log(self, request):
        async with self._lock:
            key = (request.resource, request.namespace, request.name)
            if key not in self._objects or self._objects[key].deleted:
                raise kmock.KubernetesObjectNotFoundError(message=f'pods "{request.name}" not found')
        text = self.owner.log(request.namespace, request.name) if self.owner else ""
        tail = request.params.get("tailLines")
        if tail:
            lines = text.splitlines(keepends=True)
            text = "".join(lines[-int(tail):]) if int(tail) > 0 else ""
        return aiohttp.web.Response(text=text, content_type="text/plain")

    async def _replace(self, request):
        key = (request.resource, request.namespace, request.name)
        async with self._lock:
            if key not in self._objects or self._objects[key].deleted:
                raise kmock.KubernetesObjectNotFoundError()
            obj = self._objects[key]
            old = obj.raw
            new = dict(request.data or {})
            if request.subresource == "status":
                new = {**old, "status": new.get("status")}
            meta = {**(old.get("metadata") or {}), **(new.get("metadata") or {})}
            for k in ("uid", "creationTimestamp", "namespace", "name"):
                if k in (old.get("metadata") or {}):
                    meta[k] = old["metadata"][k]
            meta["resourceVersion"] = self.next_rv()
            new["metadata"] = meta
            obj.create(new)
            await self._buses[request.resource].put({"type": "MODIFIED", "object": new})
            return new

    async def _delete_collection(self, request):
        if request.resource not in self._get_resources():
            raise kmock.KubernetesResourceNotFoundError()
        async with self._lock:
            keys = [k for k, o in self._objects.items() if k[0] == request.resource and not o.deleted
                    and (request.namespace is None or k[1] == request.namespace)
                    and self._selected(request, o.raw)]
            gone = []
            for k in keys:
                gone.append(self._objects[k].raw)
                self._objects[k].delete()
                await self._buses[k[0]].put({"type": "DELETED", "object": gone[-1]})
        if self.owner is not None:
            self.owner.wake()
        return {"apiVersion": "v1", "kind": "Status", "status": "Success", "metadata": {},
                "details": {"kind": request.resource.plural, "deleted": len(gone)}}

    # -- used by the controller (on the loop)
    async def put(self, res, ns, name, obj):
        """Create or replace an object; announce it to watchers."""
        res = kmock.resource(res)
        meta = obj.setdefault("metadata", {})
        meta.update(name=name, resourceVersion=self.next_rv())
        if ns:
            meta["namespace"] = ns
        meta.setdefault("uid", str(uuid.uuid4()))
        meta.setdefault("creationTimestamp", now())
        async with self._lock:
            key = (res, ns, name)
            kind = "MODIFIED" if key in self._objects and not self._objects[key].deleted else "ADDED"
            if key in self._objects:
                self._objects[key].create(obj)
            else:
                self._objects[key] = obj
            await self._buses[res].put({"type": kind, "object": obj})
        return obj

    async def patch(self, res, ns, name, changes, status_keys=()):
        """Merge-patch an object (``status_keys`` of its status replaced, not merged); None when it is gone."""
        res = kmock.resource(res)
        changes = {**changes, "metadata": {**(changes.get("metadata") or {}), "resourceVersion": self.next_rv()}}
        async with self._lock:
            key = (res, ns, name)
            if key not in self._objects or self._objects[key].deleted:
                return None
            if status_keys:
                self._objects[key].patch({"status": {k: None for k in status_keys}})
            self._objects[key].patch(changes)
            raw = self._objects[key].raw
            await self._buses[res].put({"type": "MODIFIED", "object": raw})
            return raw

    async def remove(self, res, ns, name):
        res = kmock.resource(res)
        async with self._lock:
            key = (res, ns, name)
            if key not in self._objects or self._objects[key].deleted:
                return False
            raw = self._objects[key].raw
            self._objects[key].delete()
            await self._buses[res].put({"type": "DELETED", "object": raw})
            return True

    async def snapshot(self, *resources):
        """{resource string: [object]} of live objects."""
        wanted = {r: kmock.resource(r) for r in resources}
        out = {r: [] for r in resources}
        async with self._lock:
            for (res, _, _), o in self._objects.items():
                if o.deleted:
                    continue
                for name, r in wanted.items():
                    if res == r:
                        out[name].append(o.raw)
        return out


# --- the emulator: API server, nodes, MPIJob controller -----------------------------------------------------

class Job:
    """What the controller knows of one MPIJob beyond its object."""

    def __init__(self, res, obj):
        self.res, self.obj = res, obj
        meta = obj["metadata"]
        self.ns, self.name, self.uid = meta["namespace"], meta["name"], meta["uid"]
        self.phase = "new"  # new -> scheduling -> running -> done
        self.proc = self.agent = self.agent_dir = None
        self.rc = None
        self.hosts = []  # lab hosts of workers 0..N-1
        self.started = self.finished = None
        self.log = bytearray()
        self.lock = threading.Lock()
        self.reported = set()  # pods with a FailedScheduling event already recorded
        self.evicted = set()  # worker indices whose pod was deleted while the job ran

    @property
    def key(self):
        return self.ns, self.name


class KubeEmulator:
    """The API server on a thread of its own (kmock is asyncio) and the MPIJob controller on another."""

    def __init__(self, lab_state=None, host="127.0.0.1", port=0, gpus_per_node=0, verbose=False):
        _patch_kmock()
        self.lab = lab_state
        self.hosts = labhost.lab_hosts(lab_state) or []
        self.bind, self.port, self.gpus = host, port, int(gpus_per_node)
        self.verbose = verbose
        self.token = secrets.token_hex(16)
        self.jobs = {}
        self.api = None
        self._loop = self._thread = self._ctl = None
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._ready = threading.Event()
        self._error = None
        self._stop_async = None
        self._rlock = threading.RLock()  # the controller's loop, reset and stop take turns

    # -- lifecycle
    @property
    def url(self):
        return f"http://{self.bind}:{self.port}"

    def start(self):
        self._thread = threading.Thread(target=self._serve, name="kube-api", daemon=True)
        self._thread.start()
        self._ready.wait(30)
        if self._error or not self._ready.is_set():
            raise RuntimeError(f"the Kubernetes emulator did not start: {self._error!r}")
        self.seed()
        self._ctl = threading.Thread(target=self._control_loop, name="mpijob-controller", daemon=True)
        self._ctl.start()
        return self

    def _serve(self):
        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._main())
        except BaseException as e:  # reported by start()
            self._error = e
            self._ready.set()
        finally:
            self._loop.close()

    async def _main(self):
        self.api = Api()
        self.api.owner = self
        self.api.resources.load_bundled()
        for r in MPI_RESOURCES:
            self.api.resources[r] = {"kind": "MPIJob", "namespaced": True, "singular": "mpijob",
                                     "subresources": ["status"], "shortnames": ["mpij"]}
        self.api.resources["apiextensions.k8s.io/v1/customresourcedefinitions"] = {
            "kind": "CustomResourceDefinition", "namespaced": False, "singular": "customresourcedefinition"}
        done = asyncio.Event()
        self._stop_async = done
        async with self.api, kmock.Server(self.api, host=self.bind, port=self.port or None) as srv:
            self.port = srv.port
            self._ready.set()
            await done.wait()

    def stop(self):
        self._stopping.set()
        self._wake.set()
        if self._ctl:
            self._ctl.join(10)
        for job in list(self.jobs.values()):
            self._kill(job)
            self._cleanup_files(job)
        self.jobs.clear()
        if self._loop and self._stop_async:
            self._loop.call_soon_threadsafe(self._stop_async.set)
        if self._thread:
            self._thread.join(10)

    def call(self, coro, timeout=30):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def wake(self):
        self._wake.set()

    # -- seed objects
    def seed(self):
        for ns in SEEDED_NAMESPACES:
            self.call(self.api.put("v1/namespaces", None, ns, {
                "apiVersion": "v1", "kind": "Namespace", "metadata": {"labels": {"kubernetes.io/metadata.name": ns}},
                "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}}))
        for h in self.hosts:
            self.call(self.api.put("v1/nodes", None, h["name"], self.node(h)))
        self.set_crd(True)

    def node(self, h):
        labels = {"kubernetes.io/hostname": h["name"], "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
                  "node.kubernetes.io/instance-type": f"lab-{self.lab['name']}"}
        cap = {"cpu": str(h.get("slots", 1)), "memory": "4Gi", "pods": "110", "ephemeral-storage": "20Gi"}
        if self.gpus:
            labels[GPU + ".product"] = GPU_PRODUCT
            labels[GPU + ".count"] = str(self.gpus)
            cap[GPU] = str(self.gpus)
        return {"apiVersion": "v1", "kind": "Node", "metadata": {"labels": labels},
                "spec": {}, "status": {
                    "capacity": dict(cap), "allocatable": dict(cap),
                    "addresses": [{"type": "InternalIP", "address": h["address"]},
                                  {"type": "Hostname", "address": h["name"]}],
                    "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                                    "message": "kubelet is posting ready status", "lastHeartbeatTime": now(),
                                    "lastTransitionTime": now()}],
                    "nodeInfo": {"architecture": "amd64", "operatingSystem": "linux", "kubeletVersion": "v1.29.4",
                                 "kubeProxyVersion": "v1.29.4", "osImage": "cloudbench lab host",
                                 "containerRuntimeVersion": "ssh://lab", "kernelVersion": os.uname().release,
                                 "bootID": h["name"], "machineID": h["name"], "systemUUID": h["name"]}}}

    def set_crd(self, installed):
        self.api.crd_installed = bool(installed)
        if not installed:
            self.call(self.api.remove("apiextensions.k8s.io/v1/customresourcedefinitions", None, CRD_NAME))
            return
        schema = {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}}
        names = {"kind": "MPIJob", "listKind": "MPIJobList", "plural": "mpijobs", "singular": "mpijob",
                 "shortNames": ["mpij"]}
        self.call(self.api.put("apiextensions.k8s.io/v1/customresourcedefinitions", None, CRD_NAME, {
            "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition", "metadata": {},
            "spec": {"group": "kubeflow.org", "names": names, "scope": "Namespaced", "versions": [
                {"name": v, "served": True, "storage": v == "v2beta1", "schema": schema,
                 "subresources": {"status": {}}} for v in ("v2beta1", "v1")]},
            "status": {"acceptedNames": names, "storedVersions": ["v2beta1"], "conditions": [
                {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts",
                 "message": "no conflicts found", "lastTransitionTime": now()},
                {"type": "Established", "status": "True", "reason": "InitialNamesAccepted",
                 "message": "the initial names have been accepted", "lastTransitionTime": now()}]}}))

    # -- control surface
    def control(self, method, path, body):
        if method == "GET" and path == "state":
            return 200, self.state()
        if method == "POST" and path == "reset":
            self.reset()
            return 200, {"reset": True}
        if method == "POST" and path == "crd":
            if not isinstance(body, dict) or not isinstance(body.get("installed"), bool):
                return 400, {"error": 'expected {"installed": true|false}'}
            self.set_crd(body["installed"])
            return 200, {"installed": self.api.crd_installed}
        return 404, {"error": f"unknown control {method} /_emulator/{path}"}

    def state(self):
        snap = self.call(self.api.snapshot(*TRACKED, *MPI_RESOURCES))
        objects = {}
        for r in TRACKED:
            objects[r.split("/")[1]] = [self._brief(o) for o in snap[r]
                                        if RUN_LABEL in ((o.get("metadata") or {}).get("labels") or {})]
        mpijobs = [{**self._brief(o), "apiVersion": o.get("apiVersion"),
                    "conditions": [c["type"] for c in (o.get("status") or {}).get("conditions") or []
                                   if c.get("status") == "True"]}
                   for r in MPI_RESOURCES for o in snap[r]]
        launchers = [{"job": f"{j.ns}/{j.name}", "pid": j.proc.pid, "host": j.hosts[0]["name"]}
                     for j in list(self.jobs.values()) if j.proc is not None and j.proc.poll() is None]
        empty = not any(objects.values()) and not any(
            RUN_LABEL in (j.get("labels") or {}) for j in mpijobs)
        return {"lab": self.lab and self.lab["name"], "crd_installed": self.api.crd_installed,
                "nodes": [h["name"] for h in self.hosts], "objects": objects, "mpijobs": mpijobs,
                "launchers": launchers, "empty": empty}

    @staticmethod
    def _brief(o):
        meta = o.get("metadata") or {}
        out = {"namespace": meta.get("namespace"), "name": meta.get("name"), "labels": meta.get("labels") or {}}
        if o.get("kind") == "Pod":
            out.update(phase=(o.get("status") or {}).get("phase"), node=(o.get("spec") or {}).get("nodeName"))
        return out

    def reset(self):
        """Kill every job, delete every object but nodes, namespaces and the CRD (reinstalled)."""
        with self._rlock:
            for job in list(self.jobs.values()):
                self._kill(job)
                self._cleanup_files(job)
            self.jobs.clear()
            snap = self.call(self.api.snapshot(*TRACKED, *MPI_RESOURCES, "v1/events"))
            for r, objs in snap.items():
                for o in objs:
                    self.call(self.api.remove(r, o["metadata"].get("namespace"), o["metadata"]["name"]))
            self.set_crd(True)

    def log(self, ns, pod):
        for job in list(self.jobs.values()):
            if job.ns == ns and pod == f"{job.name}-launcher":
                with job.lock:
                    return job.log.decode("utf-8", "replace")
        return ""

    # -- the controller
    def _control_loop(self):
        while not self._stopping.is_set():
            self._wake.wait(0.2)
            self._wake.clear()
            if self._stopping.is_set():
                break
            try:
                with self._rlock:
                    self.reconcile()
            except Exception as e:  # keep reconciling; a real controller logs and retries
                if self.verbose:
                    import traceback
                    traceback.print_exc()
                else:
                    print(f"mpijob-controller: {e!r}", file=sys.stderr)

    def reconcile(self):
        snap = self.call(self.api.snapshot("v1/pods", *MPI_RESOURCES))
        seen = set()
        for r in MPI_RESOURCES:
            for obj in snap[r]:
                meta = obj["metadata"]
                key = (meta.get("namespace"), meta["name"])
                seen.add(key)
                job = self.jobs.get(key)
                if job is not None and job.uid != meta.get("uid"):
                    self._teardown(job)
                    job = None
                if job is None:
                    job = self.jobs[key] = Job(r, obj)
                job.obj = obj
                self._advance(job, snap["v1/pods"])
        for key in [k for k in self.jobs if k not in seen]:
            self._teardown(self.jobs.pop(key))

    def _advance(self, job, pods):
        if job.phase == "new":
            self._create(job)
        if job.phase == "scheduling":
            self._schedule(job, pods)
        if job.phase == "running":
            self._evict_deleted_workers(job, pods)
            if job.rc is not None:
                self._finish(job)
            else:
                deadline = ((job.obj.get("spec") or {}).get("runPolicy") or {}).get("activeDeadlineSeconds")
                if deadline is not None and time.monotonic() - job.started > float(deadline):
                    self._kill(job)
                    self._finish(job, deadline=True)
        if job.phase == "done":
            ttl = ((job.obj.get("spec") or {}).get("runPolicy") or {}).get("ttlSecondsAfterFinished")
            if ttl is not None and time.monotonic() - job.finished >= float(ttl):
                self.call(self.api.remove(job.res, job.ns, job.name))
                self.wake()

    def _evict_deleted_workers(self, job, pods):
        """A worker pod deleted while its job runs (evicted, drained, `kubectl delete pod`): as the kubelet
        would, kill what that pod runs on its lab host; the launcher's horovodrun then sees its ranks die."""
        present = {p["metadata"]["name"] for p in pods if p["metadata"].get("namespace") == job.ns}
        for i, h in enumerate(job.hosts):
            name = f"{job.name}-worker-{i}"
            if name not in present and i not in job.evicted:
                job.evicted.add(i)
                if h["name"] in self._hosts_of_other_jobs(job) or \
                        any(x["name"] == h["name"] for x in job.hosts[:i] + job.hosts[i + 1:]):
                    _kill_marked(h, job.uid)  # the host also runs other pods: only this job's processes
                else:
                    labhost.kill_sessions(h)

    def _specs(self, job):
        spec = job.obj.get("spec") or {}
        reps = spec.get("mpiReplicaSpecs") or {}
        return spec, reps.get("Launcher") or {}, reps.get("Worker") or {}

    def _condition(self, job, ctype, reason, message, status="True"):
        return _conditions((job.obj.get("status") or {}).get("conditions"), ctype, reason, message, status)

    def _set_status(self, job, **status):
        obj = self.call(self.api.patch(job.res, job.ns, job.name, {"status": status}, status_keys=list(status)))
        if obj is not None:
            job.obj = obj

    def _pod(self, job, name, role, template, index=None):
        labels = {**((job.obj["metadata"].get("labels")) or {}),
                  **(((template.get("metadata") or {}).get("labels")) or {}),
                  "training.kubeflow.org/job-name": job.name, "training.kubeflow.org/job-role": role,
                  "training.kubeflow.org/operator-name": "mpijob-controller"}
        if index is not None:
            labels["training.kubeflow.org/replica-index"] = str(index)
        api_version = job.obj.get("apiVersion") or "kubeflow.org/v2beta1"
        spec = json.loads(json.dumps(template.get("spec") or {}))
        spec.setdefault("restartPolicy", "Never")
        spec["hostname"] = name
        return {"apiVersion": "v1", "kind": "Pod", "metadata": {
            "labels": labels, "annotations": dict(((template.get("metadata") or {}).get("annotations")) or {}),
            "ownerReferences": [{"apiVersion": api_version, "kind": "MPIJob", "name": job.name, "uid": job.uid,
                                 "controller": True, "blockOwnerDeletion": True}]},
            "spec": spec, "status": {"phase": "Pending", "qosClass": "BestEffort"}}

    def _workers(self, job):
        return int(self._specs(job)[2].get("replicas", 1) or 0)

    def _create(self, job):
        ident = f"{job.ns}/{job.name}"
        conds = self._condition(job, "Created", "MPIJobCreated", f"MPIJob {ident} is created.")
        if not self.hosts:
            conds = _conditions(conds, "Failed", "MPIJobFailed",
                                f"MPIJob {ident} has failed: no lab hosts to run on (emulator started without --lab)")
            self._set_status(job, conditions=conds, startTime=now(), completionTime=now(),
                             replicaStatuses={"Launcher": {}, "Worker": {}})
            job.phase, job.finished = "done", time.monotonic()
            return
        _, launcher, worker = self._specs(job)
        self.call(self.api.put("v1/pods", job.ns, f"{job.name}-launcher",
                               self._pod(job, f"{job.name}-launcher", "launcher", launcher.get("template") or {})))
        for i in range(self._workers(job)):
            self.call(self.api.put("v1/pods", job.ns, f"{job.name}-worker-{i}",
                                   self._pod(job, f"{job.name}-worker-{i}", "worker",
                                             worker.get("template") or {}, i)))
        self._set_status(job, conditions=conds, replicaStatuses={"Launcher": {}, "Worker": {}})
        job.phase = "scheduling"

    def _schedule(self, job, pods):
        """Bind workers that fit (least-loaded node first); start the launcher once all are bound."""
        used = collections.defaultdict(lambda: [0.0, 0, 0])  # node -> cpu, gpus, pods of this job
        mine = {}
        for p in pods:
            node = (p.get("spec") or {}).get("nodeName")
            meta = p["metadata"]
            if meta.get("namespace") == job.ns and meta["name"].startswith(f"{job.name}-worker-"):
                mine[meta["name"]] = p
            if not node or (p.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
                continue
            if meta["name"].endswith("-launcher"):
                continue  # the launcher needs no node resources
            cpu, gpu = pod_requests(p)
            used[node][0] += cpu
            used[node][1] += gpu
            if any(o.get("uid") == job.uid for o in meta.get("ownerReferences") or []):
                used[node][2] += 1
        _, _, worker = self._specs(job)
        n = self._workers(job)
        by_name = {h["name"]: h for h in self.hosts}
        for i in range(n):
            name = f"{job.name}-worker-{i}"
            pod = mine.get(name)
            if pod is None:
                continue  # deleted under us: the job is being torn down
            if (pod.get("spec") or {}).get("nodeName"):
                continue
            cpu, gpu = pod_requests(pod)
            reasons = collections.Counter()
            fits = []
            for h in self.hosts:
                free_cpu = h.get("slots", 1) - used[h["name"]][0]
                free_gpu = self.gpus - used[h["name"]][1]
                if cpu > free_cpu + 1e-9:
                    reasons["Insufficient cpu"] += 1
                if gpu > free_gpu:
                    reasons[f"Insufficient {GPU}"] += 1
                if cpu <= free_cpu + 1e-9 and gpu <= free_gpu:
                    fits.append(h)
            if not fits:
                msg = f"0/{len(self.hosts)} nodes are available: " + ", ".join(
                    f"{c} {r}" for r, c in sorted(reasons.items())) + "."
                self._unschedulable(job, pod, msg)
                continue
            h = min(fits, key=lambda h: (used[h["name"]][2], used[h["name"]][1], used[h["name"]][0]))
            used[h["name"]][0] += cpu
            used[h["name"]][1] += gpu
            used[h["name"]][2] += 1
            self.call(self.api.patch("v1/pods", job.ns, name, {
                "spec": {"nodeName": h["name"]}, "status": self._running_status(pod, h)}))
            mine[name] = {**pod, "spec": {**pod["spec"], "nodeName": h["name"]}}
        bound = [(mine.get(f"{job.name}-worker-{i}") or {}).get("spec", {}).get("nodeName") for i in range(n)]
        if n and all(bound):
            job.hosts = [by_name[b] for b in bound]
            self._launch(job)

    def _unschedulable(self, job, pod, msg):
        name = pod["metadata"]["name"]
        old = [c for c in (pod.get("status") or {}).get("conditions") or [] if c.get("type") == "PodScheduled"]
        if not old or old[0].get("message") != msg:
            self.call(self.api.patch("v1/pods", job.ns, name, {"status": {"phase": "Pending", "conditions": [
                {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": msg,
                 "lastProbeTime": None, "lastTransitionTime": now()}]}}))
        if name not in job.reported:
            job.reported.add(name)
            self.call(self.api.put("v1/events", job.ns, f"{name}.{secrets.token_hex(8)}", {
                "apiVersion": "v1", "kind": "Event", "metadata": {},
                "involvedObject": {"apiVersion": "v1", "kind": "Pod", "name": name, "namespace": job.ns,
                                   "uid": pod["metadata"].get("uid")},
                "reason": "FailedScheduling", "message": msg, "type": "Warning", "count": 1,
                "source": {"component": "default-scheduler"}, "reportingComponent": "default-scheduler",
                "firstTimestamp": now(), "lastTimestamp": now(), "eventTime": None}))

    @staticmethod
    def _running_status(pod, h):
        return {"phase": "Running", "hostIP": h["address"], "podIP": h["address"],
                "podIPs": [{"ip": h["address"]}], "startTime": now(), "conditions": [
                    {"type": t, "status": "True", "lastProbeTime": None, "lastTransitionTime": now()}
                    for t in ("Initialized", "Ready", "ContainersReady", "PodScheduled")],
                "containerStatuses": _container_statuses(pod, {"running": {"startedAt": now()}}, True)}

    def _job_dir(self, job):
        return Path(self.lab["dir"]) / "k8s" / job.ns / job.name

    def _launch(self, job):
        spec, launcher, _ = self._specs(job)
        c = (((launcher.get("template") or {}).get("spec") or {}).get("containers") or [{}])[0]
        d = self._job_dir(job)
        d.mkdir(parents=True, exist_ok=True)
        slots = int(spec.get("slotsPerWorker", 1) or 1)
        hostfile = d / "hostfile"
        hostfile.write_text("".join(f"{h['name']} slots={slots}\n" for h in job.hosts))
        known = d / "known_hosts"  # lab host names and addresses, for launchers that ssh by name (mpirun)
        known.write_text("".join(f"{h['name']},{h['address']} {labhost.host_key(h)}\n" for h in self.hosts))
        env = {e["name"]: str(e.get("value", "")) for e in c.get("env") or [] if "name" in e and "valueFrom" not in e}
        env.setdefault("OMPI_MCA_plm_rsh_args", f"-o UserKnownHostsFile={known} -o BatchMode=yes")
        env.update(OMPI_MCA_orte_default_hostfile=str(hostfile), K_MPI_JOB_ROLE="launcher",
                   CLOUDBENCH_MPIJOB=job.uid)
        argv = list(c.get("command") or []) + list(c.get("args") or [])
        remote = "exec env " + " ".join(shlex.quote(f"{k}={v}") for k, v in env.items()) + " " + shlex.join(argv)
        if c.get("workingDir"):
            remote = f"cd {shlex.quote(c['workingDir'])} && {remote}"
        job.agent_dir = tempfile.mkdtemp(prefix="cbk8s-")
        sock = os.path.join(job.agent_dir, "agent.sock")
        job.agent = subprocess.Popen(["ssh-agent", "-D", "-a", sock], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        agent_env = {**os.environ, "SSH_AUTH_SOCK": sock}
        for _ in range(100):
            if os.path.exists(sock):
                break
            time.sleep(0.02)
        key = str(Path(self.lab["dir"]) / "id_ed25519")
        subprocess.run(["ssh-add", "-q", key], env=agent_env, capture_output=True, timeout=10)
        cmd = ssh_command(self.lab, job.hosts[0], remote)
        cmd[1:1] = ["-A", "-T"]
        job.proc = subprocess.Popen(cmd, env=agent_env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        job.started, job.phase = time.monotonic(), "running"
        threading.Thread(target=self._pump, args=(job, job.proc), daemon=True).start()
        h0 = job.hosts[0]
        pod = self.call(self.api.snapshot("v1/pods"))["v1/pods"]
        lp = next((p for p in pod if p["metadata"]["name"] == f"{job.name}-launcher"
                   and p["metadata"].get("namespace") == job.ns), None)
        if lp is not None:
            self.call(self.api.patch("v1/pods", job.ns, f"{job.name}-launcher", {
                "spec": {"nodeName": h0["name"]}, "status": self._running_status(lp, h0)}))
        ident = f"{job.ns}/{job.name}"
        conds = self._condition(job, "Running", "MPIJobRunning", f"MPIJob {ident} is running.")
        self._set_status(job, conditions=conds,
                         replicaStatuses={"Launcher": {"active": 1}, "Worker": {"active": len(job.hosts)}},
                         startTime=now())

    def _pump(self, job, proc):
        for chunk in iter(lambda: proc.stdout.read1(65536), b""):
            with job.lock:
                job.log += chunk
                if len(job.log) > LOG_LIMIT:
                    del job.log[:len(job.log) - LOG_LIMIT]
        job.rc = proc.wait()
        self.wake()

    def _finish(self, job, deadline=False):
        ident = f"{job.ns}/{job.name}"
        rc = job.rc
        ok = rc == 0 and not deadline
        if deadline:
            conds = self._condition(job, "Failed", "DeadlineExceeded",
                                    f"MPIJob {ident} has failed because it was active longer than specified deadline")
        elif ok:
            conds = self._condition(job, "Succeeded", "MPIJobSucceeded", f"MPIJob {ident} successfully completed.")
        else:
            conds = self._condition(job, "Failed", "MPIJobFailed",
                                    f"MPIJob {ident} has failed: launcher exited with code {rc}")
        stamp = now()
        launcher = next((p for p in self.call(self.api.snapshot("v1/pods"))["v1/pods"]
                         if p["metadata"].get("namespace") == job.ns
                         and p["metadata"]["name"] == f"{job.name}-launcher"), {})
        term = {"exitCode": 0 if ok else (rc if rc not in (None, 0) else 137),
                "reason": "Completed" if ok else ("DeadlineExceeded" if deadline else "Error"),
                "startedAt": stamp, "finishedAt": stamp}
        self.call(self.api.patch("v1/pods", job.ns, f"{job.name}-launcher", {"status": {
            "phase": "Succeeded" if ok else "Failed",
            "conditions": [{"type": t, "status": "False" if t in ("Ready", "ContainersReady") else "True",
                            "lastProbeTime": None, "lastTransitionTime": stamp}
                           for t in ("Initialized", "Ready", "ContainersReady", "PodScheduled")],
            "containerStatuses": _container_statuses(launcher, {"terminated": term}, False)}}))
        policy = ((job.obj.get("spec") or {}).get("runPolicy") or {}).get("cleanPodPolicy") or "Running"
        workers = [f"{job.name}-worker-{i}" for i in range(self._workers(job))]
        if policy in ("Running", "All"):
            self._kill(job)  # as the kubelet does for a deleted pod: what the workers still run dies with them
            for w in workers:
                self.call(self.api.remove("v1/pods", job.ns, w))
        if policy == "All":
            self.call(self.api.remove("v1/pods", job.ns, f"{job.name}-launcher"))
        self._set_status(job, conditions=conds, completionTime=stamp, replicaStatuses={
            "Launcher": {"succeeded": 1} if ok else {"failed": 1},
            "Worker": {"active": len(workers)} if policy == "None" else {}})
        self._stop_agent(job)
        job.phase, job.finished = "done", time.monotonic()

    # -- teardown
    def _stop_agent(self, job):
        if job.agent is not None:
            if job.agent.poll() is None:
                job.agent.kill()
            job.agent.wait()
            job.agent = None
        if job.agent_dir:
            shutil.rmtree(job.agent_dir, ignore_errors=True)
            job.agent_dir = None

    def _hosts_of_other_jobs(self, job):
        """Names of the lab hosts that other running jobs use (their processes there must be spared)."""
        return {h["name"] for j in self.jobs.values() if j is not job and j.phase == "running" for h in j.hosts}

    def _kill(self, job):
        """Kill the launcher session and what it started on the job's lab hosts."""
        if job.proc is not None and job.proc.poll() is None:
            try:
                os.killpg(job.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if job.proc is not None:
            try:
                job.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        others = self._hosts_of_other_jobs(job)
        for h in {h["name"]: h for h in job.hosts}.values():
            if h["name"] in others:
                _kill_marked(h, job.uid)  # shared with another job: only this job's processes
            else:
                labhost.kill_sessions(h)
        self._stop_agent(job)

    def _cleanup_files(self, job):
        if self.lab:
            shutil.rmtree(self._job_dir(job), ignore_errors=True)

    def _teardown(self, job):
        """The MPIJob is gone: kill its processes, delete its pods (cascade), remove its files. A finished
        job's workers may still run what the launcher started on them (ranks a dead horovodrun left behind, or
        pods kept by cleanPodPolicy None): the cascade kills them too."""
        if job.hosts:
            self._kill(job)
        else:
            self._stop_agent(job)
        pods = self.call(self.api.snapshot("v1/pods"))["v1/pods"]
        for p in pods:
            meta = p["metadata"]
            if any(o.get("uid") == job.uid for o in meta.get("ownerReferences") or []):
                self.call(self.api.remove("v1/pods", meta.get("namespace"), meta["name"]))
        self._cleanup_files(job)


def _container_statuses(pod, state, ready):
    return [{"name": c.get("name", "main"), "image": c.get("image") or "unknown", "imageID": "",
             "containerID": "", "ready": ready, "started": ready, "restartCount": 0, "state": state}
            for c in (pod.get("spec") or {}).get("containers") or [{}]]


def _conditions(conds, ctype, reason, message, status="True"):
    """The job's conditions with ``ctype`` set, written as mpi-operator writes them."""
    conds = [dict(c) for c in conds or [] if c.get("type") != ctype]
    if ctype in ("Succeeded", "Failed"):  # as mpi-operator: a finished job is no longer Running
        for c in conds:
            if c.get("type") == "Running" and c.get("status") == "True":
                c.update(status="False", lastUpdateTime=now(), lastTransitionTime=now())
    conds.append({"type": ctype, "status": status, "reason": reason, "message": message,
                  "lastUpdateTime": now(), "lastTransitionTime": now()})
    return conds


def _kill_marked(host, uid):
    """Kill the processes in the host's namespace whose environment carries the job's marker."""
    out = subprocess.run(["ip", "netns", "pids", host["netns"]], capture_output=True, text=True).stdout
    mark = f"CLOUDBENCH_MPIJOB={uid}".encode()
    for pid in (int(x) for x in out.split() if x.isdigit()):
        try:
            if mark in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m harness.lab.emulators.kubernetes", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="serve the Kubernetes API emulator until SIGTERM/SIGINT")
    s.add_argument("--lab", help="lab whose hosts are the nodes (none: no nodes, MPIJobs fail)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=0)
    s.add_argument("--gpus-per-node", type=int, default=0)
    s.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)
    state = labhost.load_lab(args.lab) if args.lab else None
    emu = KubeEmulator(state, host=args.host, port=args.port, gpus_per_node=args.gpus_per_node,
                       verbose=args.verbose).start()
    labhost.serve_until_signal({"url": emu.url, "auth_url": emu.url + "/healthz", "pid": os.getpid(),
                                "lab": args.lab, "token": emu.token, "namespace": "cloudbench"}, emu.stop)


if __name__ == "__main__":
    main()
