"""The aws provider against moto behind the AWS emulator, whose instances are lab hosts (SSH deploy and
horovodrun for real): the done-when run with S3 data and upload, capacity/limit/throttle/lost-answer faults,
spot interruption, kill -9 then gc. The lab and emulator start once for the module."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from providers.errors import PlanError, PointFailed, ProviderError
from providers import prices
from providers.aws import AwsProvider
from providers.base import Job
from conftest import BIN
import labcloud
from labcloud import emulator, lab_cloud
from test_run_local import ROOT, cloudbench, run_ok

SMALL = ["--variant", "small", "--steps", "20", "--warmup", "5", "--no-progress"]
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root")


def test_price_catalog_unknown_is_none_and_zero_is_refused(tmp_path):
    p = prices.lookup("aws", "us-west-2", "p4d.24xlarge")
    assert p and p.price_per_hour == 32.7726 and p.currency == "USD" and p.source and p.date == "2025-03-02"
    # a figure the catalog's source got wrong is left unknown rather than guessed
    assert prices.lookup("aws", "us-east-1", "p4d.24xlarge").price_per_hour is None
    assert prices.lookup("aws", "us-east-1", "no.such") is None
    assert prices.lookup("exoscale", "ch-gva-2", "gpu2.small").price_per_hour is None  # listed, price unknown
    f = tmp_path / "p.csv"
    f.write_text(",".join(prices.COLUMNS) + "\naws,r,t,,0,0,USD,s,2025-01-01\n")
    with pytest.raises(ValueError, match="never 0"):
        prices.catalog("aws", str(f))


@pytest.fixture(scope="module")
def cloud():
    """A 2-host lab with the AWS emulator; `cloudbench lab env` is what the tests' processes see."""
    yield from lab_cloud("awl", "aws")


def leftovers(cloud):
    st = emulator(cloud, "state")
    return {k: st[k] for k in ("instances", "security_groups", "key_pairs", "placement_groups") if st.get(k)}


@pytest.fixture
def clean(cloud):
    emulator(cloud, "reset", {})
    yield cloud
    emulator(cloud, "faults", {k: 0 for k in emulator(cloud, "faults")["known"]})
    assert not leftovers(cloud), leftovers(cloud)


def provision(run_id, tmp_path, slots=2, **options):
    p = AwsProvider(**options)
    fleet, records = labcloud.provision(p, run_id, tmp_path, slots)
    return p, fleet


@root_only
def test_done_when_run_with_s3_data_and_upload_leaves_nothing(clean, tmp_path):
    import boto3

    from gan import showers

    s3 = boto3.client("s3")
    for bucket in ("cb-data", "cb-results"):
        s3.create_bucket(Bucket=bucket)
    for i in range(2):  # two files for two nodes: each node downloads its own
        showers.write(tmp_path / f"shower_{i}.h5", "fixed", 64, seed=i)
        s3.upload_file(str(tmp_path / f"shower_{i}.h5"), "cb-data", f"showers/shower_{i}.h5")
    out, d, df = run_ok(tmp_path / "runs", "--provider", "aws", "--gpus", 2, "--sweep", 2, *SMALL, "--repetitions", 1,
                        "--data", "s3://cb-data/showers", "--upload", "s3://cb-results/nightly")
    assert len(df) == 1 and set(df["instance_type"]) == {"c5.large"}
    assert list(df["price_per_hour"]) == [0.17] and list(df["currency"]) == ["USD"]  # 2 x 0.085, at launch
    fleet = json.loads((d / "fleet.json").read_text())
    extra = dict(map(tuple, fleet["extra"]))
    assert extra["price_source"].startswith("apache-libcloud") and extra["price_date"] == "2025-03-02"
    assert fleet["price_per_hour"] == 0.085 and extra["placement_group"] == f"cb-{out['run_id']}"
    lab_hosts = {h["address"]: h["name"] for h in clean["lab"]["hosts"]}
    assert {n["address"] for n in fleet["nodes"]} == set(lab_hosts)
    # each node trained from the file it downloaded; the 2-rank point ran on both lab hosts
    staged = json.loads((d / "data.json").read_text())
    assert staged["shard"] == "local" and staged["files"] == [["shower_0.h5"], ["shower_1.h5"]]
    two = df[df["gpus"] == 2].iloc[0]
    summary = json.loads((d / two["metrics_path"]).read_text().splitlines()[-1])
    assert summary["data"] == staged["path"]
    assert {r["host"] for r in summary["ranks_placement"]} == set(lab_hosts.values())
    # the results directory is in S3, the marker last
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="cb-results", Prefix="nightly/")["Contents"]}
    base = f"nightly/{out['run_id']}/"
    assert {base + "run.json", base + "samples.parquet", base + "fleet.json", base + "_UPLOADED"} <= keys
    assert out["uploaded"] == f"s3://cb-results/{base}"
    assert not leftovers(clean)


@root_only
def test_gpu_types_and_counts_come_from_describe_instance_types(clean):
    p = AwsProvider(device="gpu", instance_types="", gpu_model="a100")
    offer, n = p.shapes(16)[0]
    assert (offer.instance_type, n, offer.gpus, offer.gpu_model) == ("p4d.24xlarge", 2, 8, "A100")
    assert p._efa(offer, n) and not p._efa(offer, 1)  # EFA interfaces for a multi-instance p4d fleet
    assert {o.slots for o, _ in AwsProvider(device="gpu", instance_types="g5.xlarge").shapes(3)} == {1}
    with pytest.raises(PlanError, match="GPU model of region us-east-1"):
        AwsProvider(device="gpu", instance_types="", gpu_model="Z9000").shapes(2)


@root_only
def test_capacity_throttling_and_lost_answers_then_limits(clean, tmp_path):
    zones = sorted(z["ZoneName"] for z in AwsProvider().ec2.describe_availability_zones()["AvailabilityZones"])
    emulator(clean, "faults", {"insufficient_capacity": {"count": 5, "zones": [zones[0]]}, "throttle": 2,
                               "lost_answer": 1})
    p, fleet = provision("awsf1", tmp_path)
    extra = dict(fleet.extra)
    assert extra["zone"] != zones[0] and len(extra["instances"]) == 2
    st = emulator(clean, "state")
    assert len(st["instances"]) == 2  # the lost RunInstances answer was found by tag, not repeated
    assert len(st["placement_groups"]) == 1 and len(st["key_pairs"]) == 1
    p.teardown("awsf1", fleet)
    assert not leftovers(clean)
    emulator(clean, "faults", {"vcpu_limit": 1})
    with pytest.raises(ProviderError, match="VcpuLimitExceeded.*limit"):
        provision("awsf2", tmp_path)


def test_a_repaired_failure_is_relaunched_as_the_plan_says(tmp_path):
    """--retries: a point whose failure the provider repaired (retryable) is launched again; others are not."""
    from harness import plan as hplan
    from harness import runner
    from harness.results import RunStore
    from providers.base import Fleet, JobResult, Node

    class Flaky:
        def __init__(self, failures):
            self.failures, self.calls = list(failures), 0

        def launch(self, fleet, job, on_progress=None):
            self.calls += 1
            if self.failures:
                raise PointFailed("instance reclaimed", job.log_path, retryable=self.failures.pop(0))
            summary = {"event": "summary", "samples_per_s": 10.0, "samples_per_s_per_rank": 10.0, "ranks": 1,
                       "step_time_mean_s": 0.8, "step_time_std_s": 0.01}
            with open(job.metrics_path, "w") as f:
                f.write(json.dumps(summary) + "\n")
            return JobResult(returncode=0, metrics_path=job.metrics_path, log_path=job.log_path, seconds=1.0)

    fleet = Fleet(run_id="r", provider="aws", instance_type="c5.large",
                  nodes=(Node(name="n0", address="10.0.0.1", slots=1, device="cpu"),))
    store = RunStore.create(tmp_path, "r")
    plan = hplan.RunPlan(provider="aws", sweep=(1,), batch_size=8, retries=1)
    p = Flaky([True])
    row = runner.run_point(plan, store, p, fleet, 1, 1, 1, False)
    assert (row["status"], row["attempts"], p.calls) == ("ok", 2, 2)
    p = Flaky([False])  # not repaired: no relaunch
    row = runner.run_point(plan, store, p, fleet, 1, 2, 1, False)
    assert (row["status"], row["attempts"], p.calls) == ("failed", 1, 1)
    p = Flaky([True, True])  # repaired twice, one retry allowed
    assert runner.run_point(plan, store, p, fleet, 1, 3, 1, False)["status"] == "failed" and p.calls == 2


@root_only
def test_spot_interruption_replaces_the_instance_and_the_point_runs_again(clean, tmp_path):
    p, fleet = provision("awsspot", tmp_path, spot="true")
    try:
        extra = dict(fleet.extra)
        assert extra["spot"] is True and extra["price_source"] == "EC2 spot price history"  # never the list price
        p.deploy(fleet)
        victim = fleet.nodes[1]
        old = dict(victim.extra)["server"]
        emulator(clean, "interrupt", {"instance_id": old})
        job = Job(run_id=fleet.run_id, ranks=2, metrics_path=str(tmp_path / "m.json"), log_path=str(tmp_path / "l"),
                  timeout_s=300, trainer_args=("--variant", "small", "--batch-size", "8", "--steps", "2",
                                               "--warmup", "1"))
        with pytest.raises(PointFailed, match="Server.SpotInstanceTermination.*replaced") as e:
            p.launch(fleet, job)
        assert e.value.retryable
        live = {i["id"] for i in emulator(clean, "state")["instances"]}
        assert len(live) == 2 and old not in live
        res = p.launch(fleet, job)  # the relaunch runs on the replacement
        assert res.returncode == 0 and json.loads(open(job.metrics_path).read().splitlines()[-1])["ranks"] == 2
    finally:
        p.teardown("awsspot", fleet)


@root_only
def test_kill_9_during_provisioning_then_gc_leaves_nothing(clean, tmp_path):
    exe = BIN / "cloudbench"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "harness.cli"]
    proc = subprocess.Popen(cmd + ["run", "--provider", "aws", "--gpus", "2", *SMALL, "--results", str(tmp_path)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while len(leftovers(clean).get("instances", [])) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else "slow"
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    dry = cloudbench("gc", "--provider", "aws", "--results", tmp_path, "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    kinds = {r["kind"] for r in json.loads(dry.stdout)["resources"]}
    assert kinds >= {"instance", "security_group", "key_pair", "placement_group"}, kinds
    p = cloudbench("gc", "--provider", "aws", "--results", tmp_path)
    assert p.returncode == 0, p.stderr
    assert not leftovers(clean)
