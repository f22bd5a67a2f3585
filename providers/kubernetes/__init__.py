"""The kubernetes provider: a cluster with the Kubeflow MPI operator, as its users run Horovod there.

Nothing is bought: the cluster exists. Offerings come from the nodes (allocatable ``nvidia.com/gpu`` and
the ``nvidia.com/gpu.product`` label; cores where there is no GPU); provision records which workers x slots
the largest point needs. Each sweep point is one MPIJob of the MPI operator (kubeflow.org/v2beta1; the
training operator's v1 MPIJob has no ssh for horovodrun and is refused): a launcher that waits until every
worker in the operator's hostfile resolves and then runs
``horovodrun --gloo`` over it, and workers with GPU limits (or cores). The provider watches the job to its
end, copies the launcher's log (rank 0's JSON lines) into the run and deletes the job. Everything carries
``cloudbench-run=<run id>``, so teardown and ``cloudbench gc --provider kubernetes`` find it.

Options (``--option KEY=VALUE``): context, namespace (default: the context's, else "default"), kubeconfig,
image, python, pythonpath, horovodrun (what runs inside the image), device (auto|gpu|cpu), gpu_model,
pending_timeout (alias deadline; seconds a worker may stay unschedulable, default 300), ttl_seconds (300),
clean_pod_policy (Running|None), api_version (auto|v2beta1), profile (default|lab; also
$CLOUDBENCH_KUBERNETES_PROFILE), price_per_gpu_hour, currency, slots_per_worker (assume nodes of that many
slots instead of asking the cluster: ``--dry-run`` without one).
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

from providers.errors import PlanError, PointFailed, ProviderError
from providers.base import (KILLED, TAG, Capabilities, Fleet, FleetSpec, Job, JobResult, Node, Offering, Resource,
                            failed_rank)
from providers.cloudvm import fit
from providers.kubernetes import manifests as mf
from providers.local import harness_owner, owner_alive, tool

log = logging.getLogger("cloudbench")
ROOT = Path(__file__).resolve().parents[2]
OPTIONS = ("context", "namespace", "kubeconfig", "image", "python", "pythonpath", "horovodrun", "device", "gpu_model",
           "pending_timeout", "deadline", "ttl_seconds", "clean_pod_policy", "api_version", "profile",
           "price_per_gpu_hour", "currency", "slots_per_worker")
PROFILES = ("default", "lab")
RETRY_SECONDS = 120  # how long reads and deletes are retried through API server trouble
STUCK = ("ErrImagePull", "ImagePullBackOff", "InvalidImageName", "CreateContainerConfigError", "CreateContainerError")
KINDS = (("pod", "pods"), ("service", "services"), ("configmap", "configmaps"), ("secret", "secrets"))


def _number(key, value, cast=float, low=0):
    try:
        v = cast(value)
    except (TypeError, ValueError):
        raise PlanError(key, value, "a number") from None
    if v < low:
        raise PlanError(key, value, f"a number >= {low}")
    return v


class KubernetesProvider:
    name = "kubernetes"
    description = "a Kubernetes cluster with the Kubeflow MPI operator: one MPIJob per point"
    capabilities = Capabilities(gpus=True, multi_node=True, spot=False, prices=False, engines=("gloo",),
                                notes="--context/--namespace [--option image=... "
                                      "pending_timeout=300 profile=lab]")

    def __init__(self, **options):
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise PlanError("option", ",".join(unknown), "options of the kubernetes provider: " + ", ".join(OPTIONS))
        o = {k: v for k, v in options.items() if v not in (None, "")}
        profile = o.get("profile") or os.environ.get("CLOUDBENCH_KUBERNETES_PROFILE") or "default"
        if profile not in PROFILES:
            raise PlanError("profile", profile, " or ".join(PROFILES))
        if profile == "lab":  # lab hosts share this filesystem: this checkout and its interpreter, on CPUs
            o = {"python": sys.executable, "pythonpath": str(ROOT), "device": "cpu",
                 "horovodrun": tool("horovodrun") or os.path.join(os.path.dirname(sys.executable), "horovodrun"),
                 **o}
        # KUBECONFIG read now: the client library reads it once, when it is first imported
        self.profile, self.context = profile, o.get("context")
        self.kubeconfig = o.get("kubeconfig") or os.environ.get("KUBECONFIG") or None
        self._namespace = o.get("namespace")
        self.device = o.get("device", "auto")
        if self.device not in ("auto", "gpu", "cpu"):
            raise PlanError("device", self.device, "auto, gpu or cpu")
        self.gpu_model = o.get("gpu_model")
        self.api_choice = o.get("api_version", "auto")
        if self.api_choice not in ("auto", "v2beta1"):
            raise PlanError("api_version", self.api_choice, "auto or v2beta1 (the MPI operator's; the training "
                                                            "operator's v1 MPIJob has no ssh for horovodrun)")
        self.pending_timeout = _number("pending_timeout", o.get("pending_timeout", o.get("deadline", 300)))
        policy = o.get("clean_pod_policy", "Running")
        if policy not in ("Running", "None"):  # All would delete the launcher before its log is read
            raise PlanError("clean_pod_policy", policy, "Running or None (All removes the launcher's log)")
        self.base = mf.Settings(image=o.get("image", mf.DEFAULT_IMAGE), python=o.get("python", "python3"),
                                pythonpath=o.get("pythonpath", mf.WORKDIR),
                                horovodrun=o.get("horovodrun", "horovodrun"),
                                ttl_seconds=_number("ttl_seconds", o.get("ttl_seconds", 300), int),
                                clean_pod_policy=policy, resolve_timeout=int(self.pending_timeout))
        price = o.get("price_per_gpu_hour")
        self.price = None if price is None else _number("price_per_gpu_hour", price)
        self.currency = o.get("currency")
        spw = o.get("slots_per_worker")
        self.slots_per_worker = None if spw is None else _number("slots_per_worker", spw, int, 1)
        self.owner = harness_owner()
        self._api = self._version = self._nodes = None
        self._n = 0

    # -- the cluster ------------------------------------------------------------------------------
    @property
    def namespace(self):
        if self._namespace is None:
            self._namespace = self._context_namespace() or "default"
        return self._namespace

    def _context_namespace(self):
        try:
            from kubernetes import config

            contexts, active = config.list_kube_config_contexts(self.kubeconfig)
            ctx = next((c for c in contexts if c["name"] == self.context), None) if self.context else active
            return ((ctx or {}).get("context") or {}).get("namespace")
        except Exception:  # no kubeconfig: in-cluster, or no cluster at all (dry run)
            sa = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
            return sa.read_text().strip() if sa.exists() else None

    def api(self):
        if self._api is None:
            from kubernetes import client, config

            cfg = client.Configuration()
            try:
                config.load_kube_config(config_file=self.kubeconfig, context=self.context, client_configuration=cfg,
                                        persist_config=False)
            except Exception as e:
                try:
                    config.load_incluster_config(client_configuration=cfg)
                except config.ConfigException:
                    raise ProviderError(f"kubernetes: no cluster configured ({e}); set KUBECONFIG, --option "
                                        "kubeconfig=PATH or --context NAME") from None
            self._api = client.ApiClient(cfg)
        return self._api

    def _req(self, method, path, query=None, body=None, ok404=False, timeout=60, deadline=RETRY_SECONDS):
        """One API call; the JSON answer as a dict (None for a 404 when ``ok404``). Reads and deletes (safe to
        repeat) are retried on 429/5xx and lost connections for ``deadline`` seconds: one hiccup of the API
        server must not end an hour-long point."""
        from kubernetes.client.rest import ApiException

        give_up, delay = time.monotonic() + (deadline if method in ("GET", "DELETE") else 0), 1.0
        while True:
            try:
                r = self.api().call_api(path, method, query_params=list((query or {}).items()), body=body,
                                        header_params={"Accept": "application/json",
                                                       "Content-Type": "application/json"},
                                        auth_settings=["BearerToken"], _preload_content=False,
                                        _return_http_data_only=True, _request_timeout=timeout)
                break
            except ApiException as e:
                if e.status == 404 and ok404:
                    return None
                why = f"{e.status} {e.reason}: {(e.body or '')[:300]}"
                if not (e.status == 429 or e.status >= 500) or time.monotonic() + delay > give_up:
                    raise ProviderError(f"kubernetes: {method} {path}: {why}") from None
            except Exception as e:  # connection refused, TLS, timeouts (urllib3)
                why = f"the API server did not answer ({e})"
                if time.monotonic() + delay > give_up:
                    raise ProviderError(f"kubernetes: {method} {path}: {why}") from None
            log.warning("kubernetes: %s %s: %s; retrying in %.0f s", method, path, why, delay)
            time.sleep(delay)
            delay = min(delay * 2, 10.0)
        data = r.data.decode() if isinstance(r.data, bytes) else r.data
        return json.loads(data) if data else {}

    def _jobs_path(self, version, name=None):
        return f"/apis/{mf.GROUP}/{version}/namespaces/{self.namespace}/{mf.PLURAL}" + (f"/{name}" if name else "")

    def served_versions(self):
        """The MPIJob versions the cluster serves: from the CRD, else (no CRD, or no right to read CRDs) from
        API discovery of kubeflow.org."""
        try:
            crd = self._req("GET", f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{mf.PLURAL}.{mf.GROUP}",
                            ok404=True)
        except ProviderError:
            crd = None
        if crd:
            return [v["name"] for v in crd.get("spec", {}).get("versions", []) if v.get("served", True)]
        found = []
        for v in mf.VERSIONS:
            disc = self._req("GET", f"/apis/{mf.GROUP}/{v}", ok404=True)
            if disc and any(r.get("name") == mf.PLURAL for r in disc.get("resources", [])):
                found.append(v)
        return found

    def api_version(self):
        if self._version is None:
            served = self.served_versions()
            if "v2beta1" not in served:
                if served:
                    raise ProviderError(f"kubernetes: {mf.V1_REFUSED}{mf.INSTALL}")
                raise ProviderError(f"kubernetes: the cluster has no MPIJob CRD (kubeflow.org); {mf.INSTALL}")
            self._version = "v2beta1"
        return self._version

    def check(self):
        self._req("GET", f"/api/v1/namespaces/{self.namespace}/pods", {"limit": 1})
        log.info("kubernetes: namespace %s, MPIJob %s/%s", self.namespace, mf.GROUP, self.api_version())

    # -- what it offers ---------------------------------------------------------------------------
    def node_shapes(self):
        """Schedulable nodes with what is free on them (requests of running pods subtracted when visible)."""
        used = {}
        try:
            pods = self._req("GET", "/api/v1/pods")["items"]
        except ProviderError:  # no right to list pods cluster-wide: allocatable only
            pods = []
        for p in pods:
            node, phase = (p.get("spec") or {}).get("nodeName"), (p.get("status") or {}).get("phase")
            if not node or phase in ("Succeeded", "Failed"):
                continue
            for c in (p.get("spec") or {}).get("containers") or []:
                res = c.get("resources") or {}
                req = {**(res.get("limits") or {}), **(res.get("requests") or {})}
                for k in ("cpu", mf.GPU):
                    if k in req:
                        used.setdefault(node, {}).setdefault(k, 0.0)
                        used[node][k] += mf.quantity(req[k])
        nodes = self._req("GET", "/api/v1/nodes")["items"]
        self._nodes = [s for s in (mf.node_shape(n, used.get(n["metadata"]["name"])) for n in nodes) if s]
        return self._nodes

    def offerings(self):
        if self.slots_per_worker:  # no cluster needed: the user says what the nodes hold
            gpus = 0 if self.device == "cpu" else self.slots_per_worker
            shape = mf.NodeShape("assumed", gpus=gpus, cpus=self.slots_per_worker, gpu_model=self.gpu_model)
            return mf.offers_from([shape], self.device, None, self.price, self.currency)
        shapes = self.node_shapes()
        offers = mf.offers_from(shapes, self.device, self.gpu_model, self.price, self.currency)
        if not offers:
            seen = ", ".join(f"{s.name} ({s.gpus} {s.gpu_model or 'GPU'}, {s.cpus} cpu)" for s in shapes) or "none"
            want = f"{self.gpu_model} GPUs" if self.gpu_model else ("GPUs" if self.device == "gpu" else "free cores")
            raise ProviderError(f"kubernetes: no schedulable node offers {want}; nodes: {seen}")
        return offers

    def shapes(self, slots, instance_type=None):
        """[(offering, workers)] that fit ``slots`` ranks on the nodes, best first (exact, fewest workers)."""
        offers = self.offerings()
        if instance_type:
            offers = [o for o in offers if o.instance_type == instance_type]
            if not offers:
                raise PlanError("instance-type", instance_type, "one of " + ", ".join(
                    o.instance_type for o in self.offerings()))
        out = []
        for o, n in fit(offers, slots, ordered=bool(instance_type)):
            w, spw = mf.workers_for(slots, o.slots)
            nodes = [s for s in self._nodes or () if not o.gpu_model or s.gpu_model == o.gpu_model]
            if self.slots_per_worker or mf.fits(nodes, o, w, spw):
                out.append((o, n))
        if not out:
            def count(o):
                return sum(1 for s in self._nodes or () if (s.gpus if o.gpus else s.cpus) >= o.slots)
            have = ", ".join(f"{o.instance_type} on {count(o)} node(s)" for o in offers)
            raise ProviderError(f"kubernetes: {slots} slots do not fit the cluster's free nodes ({have}); "
                                "lower --gpus or free capacity")
        return out

    # -- lifecycle --------------------------------------------------------------------------------
    def settings(self, api_version=None):
        from dataclasses import replace

        return replace(self.base, namespace=self.namespace, api_version=api_version or self._version or
                       (self.api_choice if self.api_choice != "auto" else "v2beta1"))

    def provision(self, spec: FleetSpec, on_record):
        gone = self.teardown(spec.run_id)  # a resumed run: its dead harness's jobs still hold the nodes
        if gone:
            log.warning("kubernetes: deleted %d object(s) an earlier harness of run %s left", len(gone), spec.run_id)
        offer, workers = self.shapes(spec.slots, spec.instance_type)[0]
        device = "gpu" if offer.gpus else "cpu"
        nodes = tuple(Node(name=f"worker-{i}", address="", slots=offer.slots, device=device,
                           gpu_model=offer.gpu_model) for i in range(workers))
        s = self.settings(self.api_version())
        extra = (("namespace", s.namespace), ("context", self.context), ("api_version", s.api_version),
                 ("image", s.image), ("profile", self.profile))
        if device == "cpu":
            extra += (("cpus_per_rank", 1),)  # a slot is one core
        fleet = Fleet(run_id=spec.run_id, provider=self.name, instance_type=offer.instance_type, nodes=nodes,
                      price_per_hour=offer.price_per_hour, currency=offer.currency, engine=spec.engine, extra=extra)
        on_record(fleet)
        return fleet

    def deploy(self, fleet: Fleet):
        """Nothing to copy: the trainer is the image (gan/Dockerfile). A wrong image fails the first point,
        reported with the pod's reason (ErrImagePull, ...)."""

    def manifest(self, fleet: Fleet, job: Job, name):
        ex = dict(fleet.extra)
        return mf.mpijob(self.settings(ex.get("api_version")), name=name, run_id=job.run_id, owner=self.owner,
                         ranks=job.ranks, per_node=fleet.nodes[0].slots, device=fleet.device, module=job.module,
                         trainer_args=job.trainer_args, cpus_per_rank=job.cpus_per_rank, timeout_s=job.timeout_s,
                         gpu_model=fleet.nodes[0].gpu_model)

    def dry_run_manifests(self, jobs, offer: Offering):
        """The MPIJobs of the given jobs (the harness's first repetition of each point) as YAML, without a
        cluster."""
        device = "gpu" if offer.gpus else "cpu"
        docs = []
        for i, job in enumerate(jobs, 1):
            fleet = Fleet(run_id=job.run_id, provider=self.name, instance_type=offer.instance_type, nodes=(
                Node(name="worker-0", address="", slots=offer.slots, device=device, gpu_model=offer.gpu_model),))
            docs.append(self.manifest(fleet, job, mf.job_name(job.run_id, job.ranks, i)))
        return mf.to_yaml(docs)

    def launch(self, fleet: Fleet, job: Job, on_progress=None):
        version = dict(fleet.extra).get("api_version") or self.api_version()
        t0 = time.monotonic()
        for _ in range(20):  # a name left by an earlier harness of this run (resume): take the next one
            self._n += 1
            name = mf.job_name(job.run_id, job.ranks, self._n)
            doc = self.manifest(fleet, job, name)
            if self._req("GET", self._jobs_path(version, name), ok404=True) is None:
                break
        Path(os.path.splitext(job.log_path)[0] + ".mpijob.yaml").write_text(mf.to_yaml([doc]))
        with open(job.log_path, "a") as f:
            f.write(f"$ MPIJob {name} ({mf.GROUP}/{version}) in namespace {self.namespace}\n")
        self._req("POST", self._jobs_path(version), body=doc)
        text = ""
        try:
            state, why = self._wait(name, version, job, on_progress)
            text = self._launcher_log(name)
        except BaseException:
            text = self._launcher_log(name, quiet=True)
            raise
        finally:
            self._save(job, text)
            self._delete_point(name, version)
        if state != "Succeeded":
            failed, who = failed_rank(job.log_path), ""
            if failed:  # horovodrun's hostfile lists workers 0..N-1 with per-node slots each
                rank, code = failed
                who = (f"rank {rank} on worker pod {name}-worker-{rank // max(1, fleet.nodes[0].slots)} exited "
                       f"with code {code}{KILLED.get(code, '')}; ")
            raise PointFailed(f"MPIJob {name} {state}: {who}{why}{self._tail(text)}", job.log_path)
        return JobResult(returncode=0, metrics_path=job.metrics_path, log_path=job.log_path,
                         seconds=time.monotonic() - t0)

    def _save(self, job, text):
        if text:
            with open(job.log_path, "a") as f:
                f.write(text if text.endswith("\n") else text + "\n")
        lines = mf.trainer_lines(text)
        if lines:
            Path(job.metrics_path).write_text("\n".join(lines) + "\n")

    @staticmethod
    def _tail(text):
        lines = [x for x in text.splitlines() if x.strip()][-3:]
        return ("; launcher log ends: " + " | ".join(x[:200] for x in lines)) if lines else ""

    def _wait(self, name, version, job, on_progress):
        """Until the MPIJob ends: ("Succeeded"|"Failed", reason). Raises PointFailed when a worker stays
        unschedulable (or its image cannot be pulled) past pending_timeout, or the point's timeout passes."""
        t0, stuck, last_progress = time.monotonic(), {}, 0.0
        while True:
            obj = self._req("GET", self._jobs_path(version, name), ok404=True)
            if obj is None:
                return "Failed", "the MPIJob was deleted while it ran"
            done = {c.get("type"): c for c in (obj.get("status") or {}).get("conditions") or []
                    if c.get("status") == "True" and c.get("type") in ("Succeeded", "Failed")}
            for kind in ("Succeeded", "Failed"):
                if kind in done:
                    c = done[kind]
                    return kind, f"{c.get('reason') or kind}: {c.get('message') or ''}".rstrip(": ")
            now = time.monotonic()
            pods = self._pods(name)
            if not pods and now - t0 > self.pending_timeout:
                raise PointFailed(f"MPIJob {name}: no pod after {now - t0:.0f} s (is the MPI operator running, or "
                                  "does a ResourceQuota/LimitRange refuse its pods? kubectl describe mpijob "
                                  f"{name} -n {self.namespace})", job.log_path)
            for pod in pods:
                why = pending_reason(pod)
                pname = pod["metadata"]["name"]
                if not why:
                    stuck.pop(pname, None)
                    continue
                since = stuck.setdefault(pname, [now, why])[0]
                stuck[pname][1] = why
                if now - since > self.pending_timeout:
                    raise PointFailed(f"MPIJob {name}: pod {pname} pending for {now - since:.0f} s: {why[0]}: "
                                      f"{why[1]}", job.log_path)
            if now - t0 > job.timeout_s:
                waiting = "; ".join(f"{p} pending ({w[1][0]}: {w[1][1]})" for p, w in stuck.items())
                raise PointFailed(f"MPIJob {name} timed out after {job.timeout_s:.0f} s"
                                  f"{': ' + waiting if waiting else ''}", job.log_path)
            if on_progress and now - last_progress > 5:
                last_progress = now
                on_progress(sum(1 for x in mf.trainer_lines(self._launcher_log(name, quiet=True))
                                if '"event": "step"' in x))
            self._wait_change(version, name, (obj.get("metadata") or {}).get("resourceVersion"),
                              min(5.0, max(0.5, job.timeout_s - (now - t0))))

    def _wait_change(self, version, name, rv, seconds):
        """Sleep until the MPIJob changes (a watch with the point's label) or ``seconds`` pass; at least 0.5 s,
        since some API servers (and emulators) end a watch at once: then this is a poll."""
        from kubernetes import client, watch

        t0 = time.monotonic()
        w = watch.Watch()
        try:
            kw = {"label_selector": f"{mf.POINT}={name}", "timeout_seconds": max(1, int(seconds)),
                  "_request_timeout": seconds + 2}
            if rv:
                kw["resource_version"] = rv
            for _ in w.stream(client.CustomObjectsApi(self.api()).list_namespaced_custom_object, mf.GROUP, version,
                              self.namespace, mf.PLURAL, **kw):
                break
        except Exception as e:  # a watch is an optimisation: the next poll sees the state
            log.debug("kubernetes: watch of %s ended: %s", name, e)
        finally:
            w.stop()
        time.sleep(max(0.0, 0.5 - (time.monotonic() - t0)))

    def _pods(self, name):
        return self._req("GET", f"/api/v1/namespaces/{self.namespace}/pods",
                         {"labelSelector": f"{mf.POINT}={name}"}).get("items") or []

    def _launcher_log(self, name, quiet=False):
        """The launcher pod's log ("" when there is none yet). The fake controller names the pod
        ``<job>-launcher``; mpi-operator's launcher Job adds a suffix, so pods are found by label first."""
        try:
            pods = [p for p in self._pods(name) if (p["metadata"].get("labels") or {}).get(mf.JOB_ROLE) == "launcher"
                    or p["metadata"]["name"].startswith(f"{name}-launcher")]
            pods.sort(key=lambda p: p["metadata"].get("creationTimestamp") or "")
            pod = pods[-1]["metadata"]["name"] if pods else f"{name}-launcher"
            from kubernetes.client.rest import ApiException

            try:
                r = self.api().call_api(f"/api/v1/namespaces/{self.namespace}/pods/{pod}/log", "GET",
                                        auth_settings=["BearerToken"], _preload_content=False,
                                        _return_http_data_only=True, _request_timeout=60)
            except ApiException as e:
                if e.status in (400, 404):  # not started, or gone
                    return ""
                raise
            return r.data.decode(errors="replace") if isinstance(r.data, bytes) else r.data
        except Exception as e:
            if not quiet:
                log.warning("kubernetes: cannot read the launcher log of %s: %s", name, e)
            return ""

    def _delete_point(self, name, version):
        body = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"}
        try:
            self._req("DELETE", self._jobs_path(version, name), body=body, ok404=True)
            for pod in self._pods(name):  # the operator's garbage collection does this on a real cluster
                self._req("DELETE", f"/api/v1/namespaces/{self.namespace}/pods/{pod['metadata']['name']}",
                          body=body, ok404=True)
        except ProviderError as e:
            log.warning("kubernetes: %s (teardown removes what is left)", e)

    # -- teardown and gc --------------------------------------------------------------------------
    def _tagged(self, selector):
        """(kind, path, object) of every MPIJob (both versions), pod, service, configmap and secret that
        matches ``selector`` in the namespace."""
        for v in mf.VERSIONS:
            for o in (self._req("GET", self._jobs_path(v), {"labelSelector": selector}, ok404=True) or {}).get(
                    "items") or []:
                yield f"mpijob.{v}", self._jobs_path(v, o["metadata"]["name"]), o
        for kind, plural in KINDS:
            base = f"/api/v1/namespaces/{self.namespace}/{plural}"
            for o in self._req("GET", base, {"labelSelector": selector}).get("items") or []:
                yield kind, f"{base}/{o['metadata']['name']}", o

    def teardown(self, run_id, fleet=None):
        """Delete every object labelled with the run (idempotent: "already gone" is success)."""
        body = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"}
        gone = []
        for kind, path, o in list(self._tagged(f"{TAG}={mf.label_value(run_id)}")):
            self._req("DELETE", path, body=body, ok404=True)
            gone.append(self._resource(kind, o))
        return gone

    def list_tagged(self):
        return [self._resource(kind, o) for kind, _, o in self._tagged(TAG)]

    def _resource(self, kind, o):
        meta = o.get("metadata") or {}
        lab, ann = meta.get("labels") or {}, meta.get("annotations") or {}
        owner = ann.get(mf.OWNER_ANNOTATION) or mf.owner_from_label(lab.get(mf.OWNER))
        state = (o.get("status") or {}).get("phase") or next(
            (c.get("type") for c in reversed((o.get("status") or {}).get("conditions") or [])
             if c.get("status") == "True"), "")
        return Resource(kind=kind, id=meta.get("name", "?"), run_id=lab.get(TAG, "?"),
                        detail=f"namespace {meta.get('namespace', self.namespace)} {state} owner {owner or '?'}",
                        owner_alive=owner_alive(owner, unknown=True))


def pending_reason(pod):
    """(reason, message) when a pod waits on something that will not fix itself soon: the scheduler finds no
    node (Unschedulable, e.g. "0/2 nodes are available: 2 Insufficient nvidia.com/gpu."), or its image cannot
    be pulled; None otherwise."""
    st = pod.get("status") or {}
    if st.get("phase") not in (None, "Pending"):
        return None
    for c in st.get("conditions") or []:
        if c.get("type") == "PodScheduled" and c.get("status") == "False" and c.get("reason") == "Unschedulable":
            return "Unschedulable", c.get("message") or ""
    for cs in (st.get("containerStatuses") or []) + (st.get("initContainerStatuses") or []):
        waiting = (cs.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in STUCK:
            return waiting["reason"], waiting.get("message") or ""
    return None
