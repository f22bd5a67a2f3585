"""The kubernetes provider without a cluster: MPIJob manifests against the MPI operator's CRD schema, node
shapes, labels, the launcher script, Horovod-prefixed logs and the trainer image's pins."""
import copy
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pytest
import yaml

from providers.errors import PlanError, PointFailed, ProviderError
from harness.runner import parse_summary
from providers.base import Fleet, Job, Node
from providers.kubernetes import KubernetesProvider, manifests as mf, pending_reason

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"
DNS1123 = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


def strict(schema):
    """The CRD's structural schema as JSON Schema: x-kubernetes-* markers dropped, and unknown fields refused
    where the CRD lists the properties (as the API server's strict field validation)."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items() if not k.startswith("x-kubernetes-")}
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


@pytest.fixture(scope="module")
def validator():
    crd = yaml.safe_load((DATA / "mpijob-crd.yaml").read_text())
    assert crd["metadata"]["name"] == "mpijobs.kubeflow.org"
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v2beta1"]
    return jsonschema.Draft7Validator(strict(version["schema"]["openAPIV3Schema"]))


def settings(**kw):
    return mf.Settings(namespace="bench", **kw)


def gpu_job(ranks=16, per_node=8, **kw):
    return mf.mpijob(settings(**kw), name=mf.job_name("20261126-120000-kubernetes-ab12", ranks, 1),
                     run_id="20261126-120000-kubernetes-ab12", owner="box:4242", ranks=ranks, per_node=per_node,
                     device="gpu", trainer_args=("--variant", "fixed", "--batch-size", "64"), timeout_s=1800,
                     gpu_model="NVIDIA-A100-SXM4-80GB")


def test_gpu_mpijob_validates_and_has_what_the_operator_reads(validator):
    doc = gpu_job()
    validator.validate(doc)
    spec = doc["spec"]
    assert doc["apiVersion"] == "kubeflow.org/v2beta1" and doc["kind"] == "MPIJob"
    assert spec["slotsPerWorker"] == 8 and spec["mpiReplicaSpecs"]["Worker"]["replicas"] == 2
    assert spec["runPolicy"] == {"cleanPodPolicy": "Running", "ttlSecondsAfterFinished": 300, "backoffLimit": 0,
                                 "activeDeadlineSeconds": 1860}
    worker = spec["mpiReplicaSpecs"]["Worker"]["template"]
    assert worker["spec"]["containers"][0]["resources"] == {"limits": {"nvidia.com/gpu": 8}}
    assert worker["spec"]["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
    launcher = spec["mpiReplicaSpecs"]["Launcher"]["template"]["spec"]["containers"][0]
    assert launcher["command"][:2] == ["/bin/sh", "-c"]
    assert "horovodrun --gloo -np 16" in launcher["command"][2]
    labels = doc["metadata"]["labels"]
    assert labels["cloudbench-run"] == "20261126-120000-kubernetes-ab12" and labels["cloudbench-owner"] == "box_4242"
    assert worker["metadata"]["labels"] == labels
    assert DNS1123.fullmatch(doc["metadata"]["name"]) and len(doc["metadata"]["name"] + "-worker-99") <= 63


def test_cpu_mpijob_requests_cores_and_passes_cpus_per_rank(validator):
    doc = mf.mpijob(settings(), name="cb-x-3r-1", run_id="r", owner="h:1", ranks=3, per_node=2, device="cpu",
                    trainer_args=("--variant", "small"), cpus_per_rank=1)
    validator.validate(doc)
    assert doc["spec"]["slotsPerWorker"] == 2 and doc["spec"]["mpiReplicaSpecs"]["Worker"]["replicas"] == 2
    res = doc["spec"]["mpiReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["resources"]
    assert res == {"requests": {"cpu": "2"}, "limits": {"cpu": "2"}}
    script = doc["spec"]["mpiReplicaSpecs"]["Launcher"]["template"]["spec"]["containers"][0]["command"][2]
    assert "--cpus-per-rank 1" in script and "nodeSelector" not in json.dumps(doc)


def test_schema_check_can_fail(validator):
    doc = gpu_job()
    bad = copy.deepcopy(doc)
    bad["spec"]["slotPerWorker"] = bad["spec"].pop("slotsPerWorker")  # a typo
    with pytest.raises(jsonschema.ValidationError):
        validator.validate(bad)
    bad = copy.deepcopy(doc)
    bad["spec"]["mpiReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["resources"]["limits"] = {
        "nvidia.com/gpu": "eight"}
    with pytest.raises(jsonschema.ValidationError):
        validator.validate(bad)


def test_a_failed_launcher_is_not_rerun_and_gpu_workers_tolerate_the_gpu_taint():
    doc = gpu_job()
    assert doc["spec"]["runPolicy"]["backoffLimit"] == 0
    worker = doc["spec"]["mpiReplicaSpecs"]["Worker"]["template"]["spec"]
    assert worker["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert "tolerations" not in doc["spec"]["mpiReplicaSpecs"]["Launcher"]["template"]["spec"]


def test_a_cluster_with_only_the_training_operators_v1_mpijob_is_refused(monkeypatch):
    p = KubernetesProvider(namespace="bench")
    monkeypatch.setattr(p, "served_versions", lambda: ["v1"])
    with pytest.raises(ProviderError, match="kubectl exec.*mpi-operator"):
        p.api_version()
    monkeypatch.setattr(p, "served_versions", lambda: [])
    with pytest.raises(ProviderError, match="no MPIJob CRD.*mpi-operator"):
        p.api_version()


def test_names_and_labels():
    assert mf.owner_label("node-1.cern.ch:1234") == "node-1.cern.ch_1234"
    assert mf.owner_from_label("node-1.cern.ch_1234") == "node-1.cern.ch:1234"
    long = mf.owner_label("h" * 80 + ":98765")
    assert len(long) <= 63 and long.endswith("_98765") and mf.LABEL_VALUE.fullmatch(long)
    assert mf.label_value("a b/c:") == "a_b_c" and mf.label_value("-x-") == "x"
    name = mf.job_name("20261126-120000-kubernetes-ab12", 16, 3)
    assert name == "cb-20261126-120000-ab12-16r-3"
    name = mf.job_name("X" * 90, 1024, 12345)
    assert DNS1123.fullmatch(name) and len(name) <= 40 and name.endswith("-1024r-12345")


def nodes(*specs):
    out = []
    for name, gpus, cpu, product in specs:
        n = {"metadata": {"name": name, "labels": {"nvidia.com/gpu.product": product} if product else {}},
             "spec": {}, "status": {"allocatable": {"cpu": cpu, "memory": "64Gi"}}}
        if gpus:
            n["status"]["allocatable"]["nvidia.com/gpu"] = str(gpus)
        out.append(n)
    return out


def fake_cluster(provider, node_list, pods=()):
    def req(method, path, query=None, body=None, ok404=False, timeout=60):
        if path == "/api/v1/nodes":
            return {"items": node_list}
        if path == "/api/v1/pods":
            return {"items": list(pods)}
        raise AssertionError(path)
    provider._req = req
    return provider


def test_shapes_pick_workers_times_slots_that_fit():
    p = fake_cluster(KubernetesProvider(namespace="bench"), nodes(
        ("a1", 8, "96", "NVIDIA-A100-SXM4-80GB"), ("a2", 8, "96", "NVIDIA-A100-SXM4-80GB"),
        ("t1", 4, "32", "Tesla-T4"), ("t2", 4, "32", "Tesla-T4"), ("cpu", 0, "3920m", None)))
    offers = p.offerings()
    assert [(o.instance_type, o.gpus, o.gpu_model) for o in offers] == [
        ("k8s-nvidia-a100-sxm4-80gb-x8", 8, "NVIDIA-A100-SXM4-80GB"), ("k8s-tesla-t4-x4", 4, "Tesla-T4")]
    (best, n), *rest = p.shapes(16)
    assert (best.gpus, n) == (8, 2) and not rest  # 4 T4 nodes would be needed, 2 exist
    assert [(o.gpus, n) for o, n in p.shapes(8)] == [(8, 1), (4, 2)]
    with pytest.raises(ProviderError, match="24 slots do not fit"):
        p.shapes(24)
    with pytest.raises(PlanError):
        p.shapes(4, "k8s-v100-x8")


def test_busy_gpus_and_cpu_nodes():
    busy = {"spec": {"nodeName": "a1", "containers": [{"resources": {"limits": {"nvidia.com/gpu": "6"}}}]},
            "status": {"phase": "Running"}}
    p = fake_cluster(KubernetesProvider(), nodes(("a1", 8, "96", "A100"), ("a2", 8, "96", "A100")), [busy])
    assert [(o.slots, n) for o, n in p.shapes(8)] == [(8, 1)]
    with pytest.raises(ProviderError, match="do not fit"):
        p.shapes(16)
    lab = fake_cluster(KubernetesProvider(profile="lab"), nodes(("h1", 0, "1", None), ("h2", 0, "1", None)))
    (offer, n), = lab.shapes(2)
    assert (offer.instance_type, offer.gpus, offer.slots, n) == ("k8s-cpu-x1", 0, 1, 2)
    assert lab.base.python == sys.executable and lab.base.pythonpath == str(ROOT)
    cordoned = nodes(("c", 8, "8", "A100"))
    cordoned[0]["spec"]["taints"] = [{"key": "node-role.kubernetes.io/control-plane", "effect": "NoSchedule"}]
    assert mf.node_shape(cordoned[0]) is None


def test_options_are_checked():
    with pytest.raises(PlanError, match="pending_timeout"):
        KubernetesProvider(inventory="hosts.yaml")
    for bad in ({"api_version": "v1"}, {"api_version": "v3"}, {"clean_pod_policy": "All"}):
        with pytest.raises(PlanError):
            KubernetesProvider(**bad)
    assert KubernetesProvider(deadline="12").pending_timeout == 12


def test_dry_run_needs_no_cluster(validator, monkeypatch, tmp_path):
    from harness import plan as hplan
    from harness.runner import dry_run_jobs

    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "none"))
    p = KubernetesProvider(slots_per_worker="8", gpu_model="A100", namespace="bench")
    (offer, n), = p.shapes(16)
    plan = hplan.resolve(hplan.build({}, provider="kubernetes", gpus=16), offer)
    docs = list(yaml.safe_load_all(p.dry_run_manifests(dry_run_jobs(plan, offer), offer)))
    assert [d["spec"]["mpiReplicaSpecs"]["Worker"]["replicas"] for d in docs] == [1, 1, 1, 1, 2]
    for d in docs:
        validator.validate(d)


def run_sh(script, timeout=20):
    return subprocess.run(["/bin/sh", "-c", script], capture_output=True, text=True, timeout=timeout)


def test_launcher_waits_for_workers_to_resolve(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\ncb-no-such-worker-0.invalid slots=1\n")
    t0 = time.monotonic()
    p = run_sh(f"export OMPI_MCA_orte_default_hostfile={hostfile} TMPDIR={tmp_path}\n"
               + mf.wait_script(settings(resolve_timeout=2, python=sys.executable)))
    assert p.returncode == 3, p.stderr
    assert "cb-no-such-worker-0.invalid" in p.stderr and "does not resolve after 2 s" in p.stderr
    assert time.monotonic() - t0 < 8
    assert not list(tmp_path.glob("cloudbench-hostfile.*")), "the failed wait leaves its hostfile copy"
    p = run_sh("export OMPI_MCA_orte_default_hostfile=/nonexistent\n" + mf.wait_script(settings()))
    assert p.returncode == 3 and "no hostfile at /nonexistent" in p.stderr


def test_launcher_runs_horovodrun_over_the_clean_hostfile(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# the operator's\nlocalhost slots=2\n\n127.0.0.1 slots=2\n")
    s = settings(horovodrun="echo", python="py3", pythonpath=str(tmp_path))
    trainer = mf.trainer_command(s, "gan.commbench", ("--variant", "small"), "cb-x-4r-1")
    p = run_sh(f"export OMPI_MCA_orte_default_hostfile={hostfile} TMPDIR={tmp_path}\n"
               + mf.launcher_script(s, 4, trainer))
    assert p.returncode == 0, p.stderr
    assert "2 worker(s) resolve: localhost 127.0.0.1" in p.stderr
    out = p.stdout.split()
    assert out[:6] == ["--gloo", "-np", "4", "--start-timeout", "120", "--hostfile"]
    assert out[7:] == ["py3", "-m", "gan.commbench", "--variant", "small", "--metrics-out", "/tmp/cb-x-4r-1.jsonl"]
    assert Path(out[6]).read_text() == "localhost slots=2\n127.0.0.1 slots=2\n"


LOG = """\
cloudbench: 2 worker(s) resolve: cb-a-2r-1-worker-0.cb-a-2r-1.bench.svc cb-a-2r-1-worker-1.cb-a-2r-1.bench.svc
[1]<stderr>:2026-11-26 12:00:01.000 I tensorflow/core/platform/cpu_feature_guard.cc:182] ...
[0]<stdout>:{"event": "start", "ranks": 2}
[1]<stdout>:{"event": "start", "ranks": 2}
[0]<stderr>:{"event": "not-stdout"}
[0]<stdout>:{"event": "step", "step": 1, "time_s": 0.5}
Thu Nov 26 12:00:03 2026[0]<stdout>:{"event": "step", "step": 2, "time_s": 0.4}\r
[0]<stdout>:plain text from rank 0
{"event": "summary", "samples_per_s": 10.0, "samples_per_s_per_rank": 5.0, "ranks": 2}
"""


def test_trainer_lines_from_horovod_prefixed_log(tmp_path):
    lines = mf.trainer_lines(LOG)
    assert [json.loads(x)["event"] for x in lines] == ["start", "step", "step", "summary"]
    out = tmp_path / "m.jsonl"
    out.write_text("\n".join(lines) + "\n")
    assert parse_summary(out)["samples_per_s"] == 10.0
    cut = mf.trainer_lines('[0]<stdout>:{"event": "summary", "samples_')
    assert cut == ['{"event": "summary", "samples_']
    out.write_text(cut[0] + "\n")
    with pytest.raises(PointFailed, match="unreadable"):
        parse_summary(out)


def test_unschedulable_worker_fails_the_point(tmp_path, monkeypatch):
    pod = {"metadata": {"name": "cb-a-16r-1-worker-1"}, "status": {"phase": "Pending", "conditions": [
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
         "message": "0/2 nodes are available: 2 Insufficient nvidia.com/gpu."}]}}
    assert pending_reason(pod)[0] == "Unschedulable"
    assert pending_reason({"status": {"phase": "Running"}}) is None
    p = KubernetesProvider(namespace="bench", pending_timeout="0")

    def req(method, path, query=None, body=None, ok404=False, timeout=60):
        if path.endswith("/pods"):
            return {"items": [pod]}
        return {"metadata": {"name": "cb-a-16r-1"}, "status": {"conditions": [
            {"type": "Created", "status": "True", "reason": "MPIJobCreated"}]}}
    p._req = req
    monkeypatch.setattr(p, "_wait_change", lambda *a: time.sleep(0.01))
    job = Job(run_id="r", ranks=16, trainer_args=(), metrics_path=str(tmp_path / "m"), log_path=str(tmp_path / "l"),
              timeout_s=60)
    with pytest.raises(PointFailed, match="Unschedulable: 0/2 nodes are available: 2 Insufficient nvidia.com/gpu"):
        p._wait("cb-a-16r-1", "v2beta1", job, None)


def test_fleet_manifest_uses_the_job_module():
    p = KubernetesProvider(namespace="bench", api_version="v2beta1")
    fleet = Fleet(run_id="r", provider="kubernetes", instance_type="k8s-cpu-x2", extra=(("api_version", "v2beta1"),),
                  nodes=(Node(name="worker-0", address="", slots=2, device="cpu"),))
    job = Job(run_id="r", ranks=2, trainer_args=("--variant", "small"), metrics_path="m", log_path="l",
              timeout_s=60, cpus_per_rank=1, module="gan.commbench")
    doc = p.manifest(fleet, job, "cb-r-2r-1")
    script = doc["spec"]["mpiReplicaSpecs"]["Launcher"]["template"]["spec"]["containers"][0]["command"][2]
    assert "-m gan.commbench --variant small" in script and doc["apiVersion"] == "kubeflow.org/v2beta1"


def test_dockerfile_pins():
    text = (ROOT / "gan" / "Dockerfile").read_text()
    for pin in ("ARG DEVICE=gpu", "FROM nvidia/cuda:12.2.2-cudnn8-devel-ubuntu22.04 AS base-gpu",
                "FROM python:3.11-slim-bookworm AS base-cpu", "FROM base-${DEVICE}", "TF_PACKAGE=tensorflow==2.15.1",
                "TF_PACKAGE=tensorflow-cpu==2.15.1", "horovod==0.28.1", "HOROVOD_WITH_TENSORFLOW=1",
                "HOROVOD_WITH_GLOO=1", "HOROVOD_WITHOUT_MPI=1", "--no-build-isolation", '"numpy>=1.23.5,<2"',
                "pip install cloudpickle psutil pyyaml packaging", "openssh-server", "openssh-client",
                "WORKDIR /opt/cloudbench", "COPY gan/ gan/"):
        assert pin in text, pin
    assert mf.WORKDIR == "/opt/cloudbench"
    assert max(map(len, text.splitlines())) <= 120
