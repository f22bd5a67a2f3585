"""The kubernetes provider against the Kubernetes emulator (kmock + a fake MPIJob controller whose launchers
run horovodrun for real on lab hosts): the done-when run, a worker that never schedules, the CRD check and gc.
The lab and emulator start once for the module."""
import json
import socket

import pytest

from providers.errors import ProviderError
from providers.kubernetes import KubernetesProvider
from labcloud import emulator, lab_cloud
from test_run_local import cloudbench, run_ok

SMALL = ["--variant", "small", "--steps", "20", "--warmup", "5", "--no-progress"]


@pytest.fixture(scope="module")
def cloud():
    yield from lab_cloud("k8l", "kubernetes")


def leftovers(cloud, run_id=None):
    """Objects labelled with a run (that run when given) the cluster still holds."""
    st = emulator(cloud, "state")
    found = [o for kind in st["objects"].values() for o in kind] + st["mpijobs"]
    return [o for o in found if "cloudbench-run" in o.get("labels", {})
            and (run_id is None or o["labels"]["cloudbench-run"] == run_id)]


@pytest.fixture
def clean(cloud):
    emulator(cloud, "reset", {})
    yield cloud
    assert not leftovers(cloud), leftovers(cloud)


def test_done_when_run_as_mpijobs_leaves_nothing(clean, tmp_path):
    out, d, df = run_ok(tmp_path, "--provider", "kubernetes", "--gpus", 2, "--sweep", 2, *SMALL,
                        "--repetitions", 1)
    assert len(df) == 1 and df.iloc[0]["nodes"] == 2
    summary = json.loads((d / df.iloc[0]["metrics_path"]).read_text().splitlines()[-1])
    lab_hosts = {h["name"] for h in clean["lab"]["hosts"]}
    assert {r["host"] for r in summary["ranks_placement"]} == lab_hosts  # one rank on each lab host
    manifest = (d / df.iloc[0]["log_path"]).with_suffix(".mpijob.yaml")  # what was submitted, kept
    assert manifest.exists() and "kubeflow.org/v2beta1" in manifest.read_text()
    assert not leftovers(clean, out["run_id"])


def test_a_worker_that_never_schedules_fails_its_point_with_the_reason(clean, tmp_path):
    p = cloudbench("run", "--provider", "kubernetes", "--gpus", 2, "--sweep", 2, *SMALL, "--repetitions", 1,
                   "--option", "slots_per_worker=2", "--option", "pending_timeout=5", "--json", "--results", tmp_path)
    assert p.returncode == 1 and "every point failed" in p.stderr, p.stderr[-2000:]
    import pandas as pd

    run = next(tmp_path.iterdir())
    df = pd.read_parquet(run / "samples.parquet")
    err = df.iloc[0]["error"]
    assert df.iloc[0]["status"] == "failed" and "Unschedulable" in err and "Insufficient cpu" in err, err
    assert not leftovers(clean, run.name)


def test_check_names_the_missing_crd_and_how_to_install_it(clean):
    emulator(clean, "crd", {"installed": False})
    try:
        with pytest.raises(ProviderError, match="mpi-operator"):
            KubernetesProvider().check()
    finally:
        emulator(clean, "crd", {"installed": True})
    KubernetesProvider().check()


def test_gc_deletes_what_a_dead_harness_left(clean):
    p = KubernetesProvider()
    run = "20260101-000000-kubernetes-dead"
    meta = {"name": "cb-left", "labels": {"cloudbench-run": run},
            "annotations": {"cloudbench/owner": f"{socket.gethostname()}:999999"}}
    p._req("POST", f"/api/v1/namespaces/{p.namespace}/configmaps", body={"metadata": meta, "data": {}})
    assert leftovers(clean, run)
    dry = cloudbench("gc", "--provider", "kubernetes", "--dry-run", "--json")
    assert dry.returncode == 0 and run in dry.stdout, dry.stderr
    g = cloudbench("gc", "--provider", "kubernetes")
    assert g.returncode == 0, g.stderr
    assert not leftovers(clean, run)
