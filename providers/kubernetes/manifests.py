"""What the kubernetes provider writes and reads, without a cluster: MPIJob manifests, the launcher script,
names and labels, node shapes, and the trainer's JSON lines in a launcher log.

Nothing here imports the kubernetes client, so ``--dry-run`` and the unit tests need no cluster.
"""
from __future__ import annotations

import json
import math
import re
import shlex
from dataclasses import dataclass
from typing import Optional

from providers.base import TAG, Offering

GROUP, PLURAL, KIND = "kubeflow.org", "mpijobs", "MPIJob"
VERSIONS = ("v2beta1", "v1")  # mpi-operator; training-operator's MPIJob
OWNER = "cloudbench-owner"
POINT = "cloudbench-point"  # the MPIJob's name on it and on its pods: one point's objects, exactly
OWNER_ANNOTATION = "cloudbench/owner"  # the owner verbatim (the label is encoded and may be shortened)
GPU = "nvidia.com/gpu"
GPU_PRODUCT = "nvidia.com/gpu.product"
JOB_NAME, JOB_ROLE = "training.kubeflow.org/job-name", "training.kubeflow.org/job-role"
HOSTFILE = "/etc/mpi/hostfile"
WORKDIR = "/opt/cloudbench"  # the image's workdir (gan/Dockerfile)
DEFAULT_IMAGE = "cloudbench/trainer:tf2.15.1-hvd0.28.1"
INSTALL = ("install the MPI operator (kubeflow.org/v2beta1): kubectl apply --server-side -f "
           "https://raw.githubusercontent.com/kubeflow/mpi-operator/v0.6.0/deploy/v2beta1/mpi-operator.yaml")
# The training operator's kubeflow.org/v1 MPIJob starts ranks with kubectl exec and mounts no ssh keys, so the
# launcher's horovodrun --gloo (ssh to the workers) cannot run there: it is recognised and refused.
V1_REFUSED = ("the cluster serves only the training operator's kubeflow.org/v1 MPIJob, which starts ranks with "
              "kubectl exec and gives the launcher no ssh keys; cloudbench's launcher (horovodrun over ssh) needs "
              "the MPI operator: ")
LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")
QUANTITY = re.compile(r"([0-9.]+(?:[eE][-+]?[0-9]+)?)([a-zA-Z]*)")
SUFFIX = {"": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30,
          "Ti": 2**40}


@dataclass(frozen=True)
class Settings:
    """How the provider's manifests look: the image and what runs inside it."""

    namespace: str = "default"
    image: str = DEFAULT_IMAGE
    python: str = "python3"
    pythonpath: str = WORKDIR
    horovodrun: str = "horovodrun"
    api_version: str = "v2beta1"
    ttl_seconds: int = 300
    clean_pod_policy: str = "Running"
    resolve_timeout: int = 300  # seconds the launcher waits for every worker's name to resolve
    start_timeout: int = 120  # horovodrun --start-timeout (ssh to every worker and the task services)


# -- names and labels ------------------------------------------------------------------------------
def label_value(text, limit=63):
    """``text`` as a Kubernetes label value: characters outside [A-Za-z0-9_.-] become "_", at most ``limit``
    characters, starting and ending alphanumeric ("" stays "")."""
    v = re.sub(r"[^A-Za-z0-9_.-]", "_", str(text))[:limit]
    v = re.sub(r"^[^A-Za-z0-9]+|[^A-Za-z0-9]+$", "", v)
    assert LABEL_VALUE.fullmatch(v), v
    return v


def owner_label(owner):
    """A harness owner "host:pid" as a label value "host_pid"; a long host name loses its start, never the pid."""
    host, _, pid = str(owner).rpartition(":")
    host = re.sub(r"[^A-Za-z0-9_.-]", "-", host)[-(62 - len(pid)):] if pid else host
    return label_value(f"{host}_{pid}" if pid else owner)


def owner_from_label(value):
    """The "host:pid" an owner label stands for (the host may be shortened: owner_alive then says True)."""
    host, sep, pid = str(value or "").rpartition("_")
    return f"{host}:{pid}" if sep and pid.isdigit() else None


def short_run_id(run_id):
    """The run id without the provider's name: "20261126-120000-kubernetes-ab12" -> "20261126-120000-ab12"."""
    parts = [p for p in re.split(r"[^a-z0-9]+", str(run_id).lower()) if p and p != "kubernetes"]
    return "-".join(parts) or "run"


def job_name(run_id, ranks, n):
    """``cb-<short run id>-<ranks>r-<n>``: a DNS-1123 label short enough for ``<name>-worker-<i>`` pods and
    the operator's ``<name>-launcher``/``<name>-worker`` services (<= 63 characters)."""
    tail = f"-{ranks}r-{n}"
    head = f"cb-{short_run_id(run_id)}"[:40 - len(tail)].rstrip("-")
    return head + tail


def labels(run_id, owner, name):
    return {TAG: label_value(run_id), OWNER: owner_label(owner), POINT: name}


# -- what the nodes offer --------------------------------------------------------------------------
def quantity(text):
    """A Kubernetes quantity ("4", "3920m", "16Gi") as a number; raises ValueError on anything else."""
    m = QUANTITY.fullmatch(str(text).strip())
    if not m or m.group(2) not in SUFFIX:
        raise ValueError(f"not a Kubernetes quantity: {text!r}")
    return float(m.group(1)) * SUFFIX[m.group(2)]


@dataclass(frozen=True)
class NodeShape:
    """One schedulable node as the provider sees it: its free GPUs and cores."""

    name: str
    gpus: int
    cpus: int
    gpu_model: Optional[str] = None


def node_shape(node, used=None):
    """A NodeShape from a node object (dict, as the API returns it); None when pods cannot go there
    (cordoned, or tainted NoSchedule/NoExecute other than for GPUs). ``used``: {resource: amount} already
    requested on it by running pods."""
    spec, meta, status = node.get("spec") or {}, node.get("metadata") or {}, node.get("status") or {}
    if spec.get("unschedulable"):
        return None
    for t in spec.get("taints") or []:
        if t.get("effect") in ("NoSchedule", "NoExecute") and t.get("key") != GPU:
            return None
    alloc, used = status.get("allocatable") or {}, used or {}
    gpus = int(quantity(alloc.get(GPU, 0)) - used.get(GPU, 0))
    cpus = int(math.floor(quantity(alloc.get("cpu", 0)) - used.get("cpu", 0) + 1e-9))
    model = (meta.get("labels") or {}).get(GPU_PRODUCT)
    return NodeShape(name=meta.get("name", "?"), gpus=max(0, gpus), cpus=max(0, cpus), gpu_model=model)


def offers_from(shapes, device="auto", gpu_model=None, price_per_gpu_hour=None, currency=None):
    """One Offering per distinct (GPU product, GPUs per node), most GPUs first; CPU offerings (slots = cores)
    when ``device`` is cpu or no node has a GPU. ``gpu_model`` keeps that product only."""
    gpu_nodes = [s for s in shapes if s.gpus > 0] if device != "cpu" else []
    if device == "gpu" and not gpu_nodes:
        return []
    if gpu_model:
        gpu_nodes = [s for s in gpu_nodes if (s.gpu_model or "").lower() == str(gpu_model).lower()]
        if not gpu_nodes:
            return []
    out = {}
    for s in gpu_nodes:
        t = "k8s-" + label_value(f"{s.gpu_model or 'gpu'}-x{s.gpus}".lower())
        price = None if price_per_gpu_hour is None else price_per_gpu_hour * s.gpus
        out[t] = Offering(instance_type=t, gpu_model=s.gpu_model, gpus=s.gpus, slots=s.gpus, price_per_hour=price,
                          currency=currency if price is not None else None)
    if not gpu_nodes:
        for s in shapes:
            if s.cpus > 0:
                t = f"k8s-cpu-x{s.cpus}"
                out[t] = Offering(instance_type=t, gpu_model=None, gpus=0, slots=s.cpus)
    return sorted(out.values(), key=lambda o: (-o.slots, o.instance_type))


def workers_for(ranks, per_node):
    """(workers, slotsPerWorker) for ``ranks`` ranks on nodes of ``per_node`` slots: fewest workers, ranks
    spread evenly (16 on 8-slot nodes: 2 x 8; 6 on 4-slot nodes: 2 x 3)."""
    workers = math.ceil(ranks / per_node)
    return workers, math.ceil(ranks / workers)


def fits(shapes, offer, workers, spw):
    """Whether ``workers`` pods of ``spw`` slots find a node each (one worker per node)."""
    free = [s.gpus if offer.gpus else s.cpus for s in shapes]
    return sum(1 for f in free if f >= spw) >= workers


# -- the launcher ----------------------------------------------------------------------------------
def wait_script(settings: Settings):
    """POSIX sh: read the operator's hostfile, write a clean copy to $hostfile_clean, and wait until every
    worker's name resolves (the launcher often starts before the workers' DNS records exist)."""
    py = shlex.quote(settings.python)
    t = int(settings.resolve_timeout)
    return f"""set -eu
hostfile="${{OMPI_MCA_orte_default_hostfile:-{HOSTFILE}}}"
if [ ! -r "$hostfile" ]; then
  echo "cloudbench: no hostfile at $hostfile: is this the launcher of an MPIJob?" >&2; exit 3
fi
hostfile_clean="${{TMPDIR:-/tmp}}/cloudbench-hostfile.$$"
grep -v -e '^[[:space:]]*#' -e '^[[:space:]]*$' "$hostfile" > "$hostfile_clean" || true
hosts=$(awk '{{print $1}}' "$hostfile_clean")
if [ -z "$hosts" ]; then
  echo "cloudbench: the hostfile $hostfile names no worker" >&2; rm -f "$hostfile_clean"; exit 3
fi
deadline=$(( $(date +%s) + {t} ))
for h in $hosts; do
  h=${{h%%:*}}
  until getent hosts "$h" >/dev/null 2>&1 || \\
      {py} -c 'import socket, sys; socket.getaddrinfo(sys.argv[1], None)' "$h" >/dev/null 2>&1; do
    if [ "$(date +%s)" -ge "$deadline" ]; then
      echo "cloudbench: worker $h from $hostfile does not resolve after {t} s (pod pending or not ready?)" >&2
      rm -f "$hostfile_clean"; exit 3
    fi
    sleep 1
  done
done
echo "cloudbench: $(echo $hosts | wc -w) worker(s) resolve: $(echo $hosts)" >&2
"""


def trainer_command(settings: Settings, module, trainer_args, name, cpus_per_rank=None, device="gpu"):
    cmd = [settings.python, "-m", module, *trainer_args, "--metrics-out", f"/tmp/{name}.jsonl"]
    if cpus_per_rank and device == "cpu":
        cmd += ["--cpus-per-rank", str(cpus_per_rank)]
    return cmd


def launcher_script(settings: Settings, ranks, trainer):
    """The launcher's whole program: wait for the workers, then horovodrun over the hostfile (Gloo; rank 0's
    stdout, the trainer's JSON lines, comes back to the launcher's stdout)."""
    run = [settings.horovodrun, "--gloo", "-np", str(ranks), "--start-timeout", str(settings.start_timeout)]
    cd = shlex.quote(settings.pythonpath.split(":")[0]) if settings.pythonpath else "."
    return (wait_script(settings) + f"cd {cd} 2>/dev/null || true\n"
            + "exec " + " ".join(map(shlex.quote, run)) + ' --hostfile "$hostfile_clean" '
            + " ".join(map(shlex.quote, trainer)) + "\n")


# -- the MPIJob ------------------------------------------------------------------------------------
def env(settings: Settings, run_id):
    from providers.local import ENV_TAG

    pairs = {"PYTHONPATH": settings.pythonpath, "TF_CPP_MIN_LOG_LEVEL": "2", ENV_TAG: run_id,
             "PYTHONUNBUFFERED": "1"}
    return [{"name": k, "value": str(v)} for k, v in pairs.items() if v]


def mpijob(settings: Settings, *, name, run_id, owner, ranks, per_node, device, module="gan.train",
           trainer_args=(), cpus_per_rank=None, timeout_s=None, gpu_model=None):
    """The MPIJob (a dict ready for the API or YAML) running one sweep point of ``ranks`` ranks on workers of
    at most ``per_node`` slots. GPU workers get ``nvidia.com/gpu`` limits of their slots (and land on nodes of
    ``gpu_model`` when known: one point never mixes GPU models); CPU workers request their slots' cores
    (x cpus_per_rank)."""
    workers, spw = workers_for(ranks, per_node)
    lab = labels(run_id, owner, name)
    trainer = trainer_command(settings, module, trainer_args, name, cpus_per_rank, device)
    if device == "gpu":
        resources = {"limits": {GPU: spw}}
    else:
        cores = spw * (cpus_per_rank or 1)
        resources = {"requests": {"cpu": str(cores)}, "limits": {"cpu": str(cores)}}
    def template(role, container, node_selector=None):
        spec = {"containers": [{"name": role, "image": settings.image,
                                "imagePullPolicy": "IfNotPresent", "env": env(settings, run_id), **container}]}
        if node_selector:
            spec["nodeSelector"] = node_selector
        if role == "worker" and device == "gpu":  # GPU nodes are often tainted for GPU pods only
            spec["tolerations"] = [{"key": GPU, "operator": "Exists", "effect": "NoSchedule"}]
        return {"metadata": {"labels": dict(lab), "annotations": {OWNER_ANNOTATION: str(owner)}}, "spec": spec}

    # backoffLimit 0: a failed launcher fails the point (the runner decides about retries), never a silent rerun
    run_policy = {"cleanPodPolicy": settings.clean_pod_policy, "ttlSecondsAfterFinished": int(settings.ttl_seconds),
                  "backoffLimit": 0}
    if timeout_s:  # the cluster stops the job even when the harness that watches it is gone
        run_policy["activeDeadlineSeconds"] = int(math.ceil(timeout_s)) + 60
    return {
        "apiVersion": f"{GROUP}/{settings.api_version}", "kind": KIND,
        "metadata": {"name": name, "namespace": settings.namespace, "labels": dict(lab),
                     "annotations": {OWNER_ANNOTATION: str(owner)}},
        "spec": {
            "slotsPerWorker": spw,
            "runPolicy": run_policy,
            "mpiReplicaSpecs": {
                "Launcher": {"replicas": 1, "restartPolicy": "Never", "template": template("launcher", {
                    "command": ["/bin/sh", "-c", launcher_script(settings, ranks, trainer)]})},
                "Worker": {"replicas": workers, "restartPolicy": "Never", "template": template("worker", {
                    "command": ["/usr/sbin/sshd", "-De"], "resources": resources},
                    {GPU_PRODUCT: gpu_model} if device == "gpu" and gpu_model else None)},
            },
        },
    }


def to_yaml(docs):
    """YAML documents; multi-line strings (the launcher script) as literal blocks, readable as written."""
    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    def text(dumper, value):
        style = "|" if "\n" in value and not any(line != line.rstrip() for line in value.splitlines()) else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    Dumper.add_representer(str, text)
    return yaml.dump_all(docs, Dumper=Dumper, sort_keys=False, width=120)


# -- the launcher's log ----------------------------------------------------------------------------
# horovodrun (0.28.1, horovod/runner/common/util/safe_shell_exec.py) forwards each rank's lines as
# "[<rank>]<stdout>:<line>", with a time.asctime() stamp in front under --prefix-output-with-timestamp.
PREFIXED = re.compile(r"^(?:[A-Z][a-z]{2} [A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d \d{4})?\[(\d+)\]<(stdout|stderr)>:(.*)$")


def trainer_lines(log_text):
    """Rank 0's JSON lines from a launcher log, in order: lines prefixed "[0]<stdout>:" (or unprefixed, as
    from a single-process launcher) that hold a JSON object. Other ranks, stderr and log noise are left
    out; a line that starts like a record but does not parse is kept as is, so the summary parser reports it."""
    out = []
    for raw in log_text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        m = PREFIXED.match(raw)
        if m:
            if m.group(1) != "0" or m.group(2) != "stdout":
                continue
            raw = m.group(3)
        line = raw.strip()
        if not line.startswith("{"):
            continue
        try:
            if isinstance(json.loads(line), dict):
                out.append(line)
        except json.JSONDecodeError:
            if line.startswith('{"event"'):
                out.append(line)
    return out
