"""The Kubernetes emulator (kmock) and its fake MPIJob controller, through the official `kubernetes` client over
HTTP: nodes, the CRD, MPIJobs whose launchers run for real on a two-host lab, logs, scheduling, cleanup."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from harness.lab import hosts as lab
from harness.lab.emulators import kubernetes as kemu
from harness.lab.emulators import labhost
from harness.lab.common import kubeconfig
from labcloud import running, until

k8s = pytest.importorskip("kubernetes")
from kubernetes import client, config, watch  # noqa: E402

LAB = "k8a"
NS = "cloudbench"
GROUP, VERSION, PLURAL = "kubeflow.org", "v2beta1", "mpijobs"


def api_client(url, token="t"):
    cfg = client.Configuration()
    cfg.host = url
    cfg.api_key = {"authorization": "Bearer " + token}
    return client.ApiClient(cfg)


@pytest.fixture(scope="module")
def cloud():
    if os.geteuid() != 0:
        pytest.skip("the lab needs root")
    lab.down(LAB)
    lab.up(hosts=2, name=LAB, slots=1)
    emu = None
    try:
        emu = kemu.KubeEmulator(labhost.load_lab(LAB)).start()
        yield emu
    finally:
        if emu is not None:
            emu.stop()
        lab.down(LAB)


@pytest.fixture
def apis(cloud):
    cloud.reset()
    api = api_client(cloud.url)
    yield client.CoreV1Api(api), client.CustomObjectsApi(api)
    cloud.reset()


def mpijob(name, run, launcher, workers=2, worker_resources=None, **run_policy):
    container = {"name": "worker", "image": "horovod/horovod:0.28.1"}
    if worker_resources:
        container["resources"] = worker_resources
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "MPIJob",
            "metadata": {"name": name, "namespace": NS, "labels": {"cloudbench-run": run}},
            "spec": {"slotsPerWorker": 1, "runPolicy": {"cleanPodPolicy": "Running", **run_policy},
                     "mpiReplicaSpecs": {
                         "Launcher": {"replicas": 1, "template": {"spec": {"containers": [
                             {"name": "launcher", "image": "horovod/horovod:0.28.1", "command": launcher,
                              "env": [{"name": "CB_GREETING", "value": "hello from env"}]}]}}},
                         "Worker": {"replicas": workers, "template": {
                             "metadata": {"labels": {"app": "bench"}}, "spec": {"containers": [container]}}}}}}


def watch_until(co, run, ctype, timeout=20):
    """Watch the MPIJobs of run ``run`` until one has condition ``ctype`` True; that object."""
    w = watch.Watch()
    deadline = time.monotonic() + timeout
    for ev in w.stream(co.list_namespaced_custom_object, GROUP, VERSION, NS, PLURAL,
                       label_selector=f"cloudbench-run={run}", timeout_seconds=timeout):
        conds = {c["type"]: c for c in (ev["object"].get("status") or {}).get("conditions") or []
                 if c["status"] == "True"}
        if ctype in conds:
            w.stop()
            return ev["object"]
        if time.monotonic() > deadline:
            break
    raise AssertionError(f"MPIJob of run {run} never reached {ctype}")


def pods_of(core, job):
    return {p.metadata.name: p for p in core.list_namespaced_pod(
        NS, label_selector=f"training.kubeflow.org/job-name={job}").items}


def test_nodes_crd_version_and_health(cloud):
    api = api_client(cloud.url)
    nodes = client.CoreV1Api(api).list_node().items
    assert [n.metadata.name for n in nodes] == ["k8a-h0", "k8a-h1"]
    n = nodes[0]
    assert n.status.allocatable["cpu"] == "1" and n.status.allocatable["memory"] == "4Gi"
    assert "nvidia.com/gpu" not in n.status.allocatable and "nvidia.com/gpu.product" not in n.metadata.labels
    assert n.metadata.labels["kubernetes.io/hostname"] == "k8a-h0"
    assert n.status.addresses[0].address == cloud.hosts[0]["address"]
    assert {c.type: c.status for c in n.status.conditions}["Ready"] == "True"
    crd = client.ApiextensionsV1Api(api).read_custom_resource_definition("mpijobs.kubeflow.org")
    assert {v.name: (v.served, v.storage) for v in crd.spec.versions} == {"v2beta1": (True, True),
                                                                          "v1": (True, False)}
    assert client.VersionApi(api).get_code().major == "1"
    assert NS in [x.metadata.name for x in client.CoreV1Api(api).list_namespace().items]
    import urllib.request
    assert urllib.request.urlopen(cloud.url + "/healthz", timeout=5).read() == b"ok"


def test_mpijob_runs_launcher_on_lab_hosts(apis, cloud):
    core, co = apis
    # ssh to worker 1 by name proves the forwarded agent and the names in /etc/hosts.
    script = ("cat $OMPI_MCA_orte_default_hostfile; hostname; echo $CB_GREETING $K_MPI_JOB_ROLE; "
              "ssh -o BatchMode=yes -o UserKnownHostsFile=$(dirname $OMPI_MCA_orte_default_hostfile)/known_hosts "
              "k8a-h1 hostname")
    co.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL,
                                       mpijob("ok", "r1", ["sh", "-c", script], ttlSecondsAfterFinished=2))
    done = watch_until(co, "r1", "Succeeded")
    conds = {c["type"]: c for c in done["status"]["conditions"]}
    assert conds["Created"]["reason"] == "MPIJobCreated" and conds["Running"]["status"] == "False"
    assert conds["Succeeded"]["reason"] == "MPIJobSucceeded"
    assert done["status"]["completionTime"] and done["status"]["startTime"]
    assert done["status"]["replicaStatuses"]["Launcher"] == {"succeeded": 1}
    log = core.read_namespaced_pod_log("ok-launcher", NS)
    assert log.splitlines() == ["k8a-h0 slots=1", "k8a-h1 slots=1", "k8a-h0", "hello from env launcher", "k8a-h1"]
    assert core.read_namespaced_pod_log("ok-launcher", NS, tail_lines=1) == "k8a-h1\n"
    pods = pods_of(core, "ok")
    assert list(pods) == ["ok-launcher"]  # cleanPodPolicy Running deleted the workers
    launcher = pods["ok-launcher"]
    assert launcher.status.phase == "Succeeded" and launcher.spec.node_name == "k8a-h0"
    assert launcher.metadata.labels["cloudbench-run"] == "r1"
    assert launcher.metadata.labels["training.kubeflow.org/job-role"] == "launcher"
    assert launcher.metadata.owner_references[0].uid == done["metadata"]["uid"]
    # ttlSecondsAfterFinished: the job and its pods go away on their own
    until("ttl deletion", lambda: cloud.state()["empty"], timeout=10)
    with pytest.raises(client.ApiException) as e:
        co.get_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "ok")
    assert e.value.status == 404
    assert not (lab.state_dir(LAB) / "k8s" / NS / "ok").exists()  # the hostfile dir went with the job


def test_failed_launcher_and_clean_pod_policy_none(apis):
    core, co = apis
    co.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL,
                                       mpijob("bad", "r2", ["sh", "-c", "echo oops; exit 3"], cleanPodPolicy="None"))
    done = watch_until(co, "r2", "Failed")
    failed = [c for c in done["status"]["conditions"] if c["type"] == "Failed"][0]
    assert failed["reason"] == "MPIJobFailed" and "code 3" in failed["message"]
    pods = pods_of(core, "bad")
    assert pods["bad-launcher"].status.phase == "Failed"
    assert pods["bad-launcher"].status.container_statuses[0].state.terminated.exit_code == 3
    assert {pods[f"bad-worker-{i}"].status.phase for i in range(2)} == {"Running"}
    assert {pods[f"bad-worker-{i}"].spec.node_name for i in range(2)} == {"k8a-h0", "k8a-h1"}
    assert pods["bad-worker-0"].metadata.labels["app"] == "bench"
    assert core.read_namespaced_pod_log("bad-launcher", NS) == "oops\n"


def test_unschedulable_worker_stays_pending(apis):
    core, co = apis
    co.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, mpijob(
        "big", "r3", ["true"], workers=1, worker_resources={"limits": {"nvidia.com/gpu": 4}}))
    msg = "0/2 nodes are available: 2 Insufficient nvidia.com/gpu."

    def pending():
        p = pods_of(core, "big").get("big-worker-0")
        conds = (p and p.status.conditions) or []
        return p if any(c.type == "PodScheduled" and c.reason == "Unschedulable" for c in conds) else None
    pod = until("an Unschedulable condition", pending)
    assert pod.status.phase == "Pending"
    cond = pod.status.conditions[0]
    assert (cond.status, cond.message) == ("False", msg)
    events = core.list_namespaced_event(NS).items
    assert [(e.reason, e.message, e.involved_object.name) for e in events] == [
        ("FailedScheduling", msg, "big-worker-0")]
    time.sleep(0.5)
    job = co.get_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "big")
    assert [c["type"] for c in job["status"]["conditions"]] == ["Created"]


def test_deleting_a_running_job_kills_its_processes(apis, cloud):
    core, co = apis
    co.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, mpijob("slow", "r4", ["sleep", "60"]))
    watch_until(co, "r4", "Running")
    h0 = cloud.hosts[0]
    pids = until("sleep 60 on the lab host", lambda: sleepers(h0, "60"))
    state = cloud.state()
    assert [x["job"] for x in state["launchers"]] == [f"{NS}/slow"] and not state["empty"]
    assert {p["name"]: p["phase"] for p in state["objects"]["pods"]} == {
        "slow-launcher": "Running", "slow-worker-0": "Running", "slow-worker-1": "Running"}
    co.delete_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "slow")
    until("the launcher's process killed", lambda: not any(running(p) for p in pids), timeout=10)
    until("the pods deleted", lambda: not pods_of(core, "slow"), timeout=10)
    assert cloud.state()["empty"] and not cloud.state()["launchers"]


def test_what_a_finished_launcher_left_on_a_worker_host_dies_with_the_worker_pod(apis, cloud):
    """horovodrun that dies of a lost rank may leave the other ranks running on their hosts (ssh without a tty
    does not hang them up). The kubelet kills a pod's processes when the pod is deleted: by cleanPodPolicy
    Running as the job finishes, or by the cascade when the MPIJob is deleted (policy None)."""
    core, co = apis
    h0 = cloud.hosts[0]
    left = ["sh", "-c", "setsid sleep 61 </dev/null >/dev/null 2>&1 & exit 1"]
    co.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, mpijob("kept", "r6", left, cleanPodPolicy="None"))
    watch_until(co, "r6", "Failed")
    pids = until("the rank left on the lab host", lambda: sleepers(h0, "61"))
    time.sleep(0.5)
    assert all(running(p) for p in pids)  # policy None keeps the workers, and what runs in them
    co.delete_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "kept")
    until("the rank killed with the MPIJob", lambda: not any(running(p) for p in pids), timeout=10)

    co.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, mpijob("gone", "r7", left))
    watch_until(co, "r7", "Failed")
    until("the rank killed with the worker pods", lambda: not sleepers(h0, "61"), timeout=10)
    assert not {n for n in pods_of(core, "gone") if "worker" in n}


def sleepers(host, seconds):
    """Pids of `sleep <seconds>` in the lab host's namespace."""
    out = subprocess.run(["ip", "netns", "pids", host["netns"]], capture_output=True, text=True).stdout.split()
    found = []
    for pid in out:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f.read().split(b"\0")[:2] == [b"sleep", seconds.encode()]:
                    found.append(int(pid))
        except OSError:
            pass
    return found


def test_crd_removal(apis, cloud):
    api = api_client(cloud.url)
    ext = client.ApiextensionsV1Api(api)
    cloud.control("POST", "crd", {"installed": False})
    with pytest.raises(client.ApiException) as e:
        ext.read_custom_resource_definition("mpijobs.kubeflow.org")
    assert e.value.status == 404
    with pytest.raises(client.ApiException) as e:
        apis[1].list_namespaced_custom_object(GROUP, VERSION, NS, PLURAL)
    assert e.value.status == 404
    cloud.control("POST", "crd", {"installed": True})
    assert ext.read_custom_resource_definition("mpijobs.kubeflow.org").spec.group == GROUP


def test_gpu_nodes():
    """--gpus-per-node: allocatable nvidia.com/gpu and the GPU product label."""
    emu = kemu.KubeEmulator({"name": "x", "dir": "/nonexistent", "hosts": [
        {"name": "x-h0", "address": "10.0.0.1", "slots": 4}]}, gpus_per_node=8)
    node = emu.node(emu.hosts[0])
    assert node["status"]["allocatable"] == {"cpu": "4", "memory": "4Gi", "pods": "110",
                                             "ephemeral-storage": "20Gi", "nvidia.com/gpu": "8"}
    assert node["metadata"]["labels"]["nvidia.com/gpu.product"] == "NVIDIA-A100-SXM4-40GB"
    assert kemu.cpu_quantity("500m") == 0.5 and kemu.requests_of(
        {"resources": {"limits": {"cpu": "2", "nvidia.com/gpu": 1}, "requests": {"cpu": "250m"}}}) == (0.25, 1)
    assert kemu.label_match("cloudbench-run=r1,app in (a, b),!gone", {"cloudbench-run": "r1", "app": "b"})
    assert not kemu.label_match("cloudbench-run!=r1", {"cloudbench-run": "r1"})


def test_cli_serve_without_lab(tmp_path):
    """The daemon's JSON line, a kubeconfig the client loads, and an MPIJob failing for want of lab hosts."""
    p = subprocess.Popen([sys.executable, "-m", "harness.lab.emulators.kubernetes", "serve", "--gpus-per-node", "2"],
                         stdout=subprocess.PIPE, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    try:
        info = json.loads(p.stdout.readline())
        assert set(info) == {"url", "auth_url", "pid", "lab", "token", "namespace"} and info["pid"] == p.pid
        path = tmp_path / "kubeconfig"
        path.write_text(yaml.safe_dump(kubeconfig(info["url"], info["token"])))
        api = config.new_client_from_config(config_file=str(path))
        assert client.CoreV1Api(api).list_node().items == []
        co = client.CustomObjectsApi(api)
        co.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, mpijob("nolab", "r5", ["true"]))
        failed = watch_until(co, "r5", "Failed", timeout=10)
        assert "no lab hosts to run on" in [c for c in failed["status"]["conditions"]
                                            if c["type"] == "Failed"][0]["message"]
    finally:
        p.send_signal(signal.SIGTERM)
        assert p.wait(10) == 0


def test_active_deadline_kills_the_launcher(apis):
    core, co = apis
    co.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL,
                                       mpijob("late", "r6", ["sleep", "60"], activeDeadlineSeconds=1))
    done = watch_until(co, "r6", "Failed", timeout=15)
    failed = [c for c in done["status"]["conditions"] if c["type"] == "Failed"][0]
    assert failed["reason"] == "DeadlineExceeded"
    assert pods_of(core, "late")["late-launcher"].status.phase == "Failed"
