"""The exoscale provider against the Exoscale API v2 emulator, whose instances are lab hosts (SSH deploy and
horovodrun for real): the done-when run, host keys handed over in user data, faults (quota, no capacity,
429, 500, lost answers), kill -9 then gc. The lab and emulator start once for the module."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from providers.errors import PlanError, ProviderError
from providers.exoscale import ExoscaleProvider, sign
from conftest import BIN
import labcloud
from labcloud import emulator, lab_cloud
from test_run_local import ROOT, cloudbench, run_ok

SMALL = ["--variant", "small", "--steps", "20", "--warmup", "5", "--no-progress"]
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root")


def test_signature_matches_the_official_client():
    """The provider's EXO2-HMAC-SHA256 header is the one Exoscale's own Python client computes."""
    import requests
    from exoscale_auth import ExoscaleV2Auth  # what exoscale.api.v2.Client signs with

    req = requests.Request("GET", "https://api-ch-gva-2.exoscale.com/v2/template",
                           params={"visibility": "public", "family": "ubuntu"}).prepare()
    theirs = ExoscaleV2Auth("EXOkey", "secret")(req).headers["Authorization"]
    expires = int(dict(p.split("=", 1) for p in theirs.split(",") if "=" in p)["expires"])
    assert sign("GET", "/v2/template", {"visibility": "public", "family": "ubuntu"}, "", "EXOkey", "secret",
                expires) == theirs


def test_settings_and_credentials_are_checked(monkeypatch):
    for k in ("EXOSCALE_API_KEY", "EXOSCALE_API_SECRET", "EXOSCALE_API_ENDPOINT", "CLOUDBENCH_EXOSCALE_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(PlanError, match="EXOSCALE_API_KEY"):
        ExoscaleProvider().api
    with pytest.raises(PlanError, match="one of"):
        ExoscaleProvider(instance_tpyes="x")
    with pytest.raises(PlanError, match="ch-gva-2"):
        ExoscaleProvider(zone="eu-west-1").zone
    with pytest.raises(PlanError, match="generic, lab"):
        ExoscaleProvider(profile="aws")


@pytest.fixture(scope="module")
def cloud():
    yield from lab_cloud("exl", "exoscale")


def leftovers(cloud):
    st = emulator(cloud, "state")
    return {k: v for k, v in st.items() if k in ("instances", "security_groups", "ssh_keys", "ssh-keys",
                                                  "security-groups") and v}


@pytest.fixture
def clean(cloud):
    emulator(cloud, "reset", {})
    yield cloud
    assert not leftovers(cloud), leftovers(cloud)


def provision(run_id, tmp_path, slots=2, **options):
    p = ExoscaleProvider(**options)
    fleet, records = labcloud.provision(p, run_id, tmp_path, slots)
    return p, fleet


@root_only
def test_done_when_run_on_the_emulated_zone_leaves_nothing(clean, tmp_path):
    out, d, df = run_ok(tmp_path, "--provider", "exoscale", "--gpus", 2, "--sweep", 2, *SMALL, "--repetitions", 1)
    assert len(df) == 1 and set(df["instance_type"]) == {"standard.micro"}
    fleet = json.loads((d / "fleet.json").read_text())
    lab_hosts = {h["address"]: h["name"] for h in clean["lab"]["hosts"]}
    assert {n["address"] for n in fleet["nodes"]} == set(lab_hosts)
    # the host keys SSH checked are the ones cloudbench handed over in the user data
    known = (d / "exoscale" / "known_hosts").read_text()
    for i in range(2):
        assert (d / "exoscale" / f"hostkey-{i}.pub").read_text().split()[1] in known
    two = df[df["gpus"] == 2].iloc[0]
    summary = json.loads((d / two["metrics_path"]).read_text().splitlines()[-1])
    assert {r["host"] for r in summary["ranks_placement"]} == set(lab_hosts.values())
    assert df["price_per_hour"].isna().all()  # the catalog has no published price for it: unknown, not 0
    assert not leftovers(clean)


@root_only
def test_faults_are_retried_reconciled_or_named(clean, tmp_path):
    emulator(clean, "faults", {"rate_limit": 2, "internal_error": 1, "lost_answer": 2})
    p, fleet = provision("exof1", tmp_path)
    st = emulator(clean, "state")
    assert len(st["instances"]) == 2 and len(fleet.nodes) == 2  # lost creates were found, not repeated
    p.teardown("exof1", fleet)
    assert not leftovers(clean)
    emulator(clean, "faults", {"no_capacity": 1})
    with pytest.raises(ProviderError, match="(?i)insufficient capacity"):
        provision("exof2", tmp_path / "2")
    assert not leftovers(clean)
    emulator(clean, "faults", {"quota": 1})
    with pytest.raises(ProviderError, match="(?i)quota"):
        provision("exof3", tmp_path / "3")


@root_only
def test_kill_9_during_provisioning_then_gc_leaves_nothing(clean, tmp_path):
    emulator(clean, "faults", {"slow_start": 60})  # both instances stay "starting"
    exe = BIN / "cloudbench"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "harness.cli"]
    proc = subprocess.Popen(cmd + ["run", "--provider", "exoscale", "--gpus", "2", *SMALL, "--results",
                                   str(tmp_path)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 60
    while len(leftovers(clean).get("instances", [])) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else "slow"
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    emulator(clean, "faults", {"slow_start": 0})
    dry = cloudbench("gc", "--provider", "exoscale", "--results", tmp_path, "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    kinds = {r["kind"] for r in json.loads(dry.stdout)["resources"]}
    assert kinds >= {"instance", "security_group", "ssh_key"}, kinds
    p = cloudbench("gc", "--provider", "exoscale", "--results", tmp_path)
    assert p.returncode == 0, p.stderr
    assert not leftovers(clean)
