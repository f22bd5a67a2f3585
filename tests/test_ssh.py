"""The ssh provider against lab hosts: real sshd per network namespace, horovodrun across them (root only)."""
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from harness.lab import hosts as lab
from providers.errors import PlanError, ProviderError
from providers.base import FleetSpec
from providers.ssh import SSHProvider, load_inventory
from conftest import BIN
from test_run_local import cloudbench

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root")
SMALL = ["--variant", "small", "--steps", "20", "--warmup", "5", "--no-progress"]


def procs_with(tag):
    """pids whose environment holds ``tag`` (lab hosts share this machine's pid namespace)."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if tag.encode() in env:
            out.append(int(pid))
    return out


def leases(st):
    d = Path(st["inventory"]).parent / "leases"
    return sorted(p.name for p in d.glob("*.lease")) if d.is_dir() else []


@pytest.fixture(scope="module")
def twohosts():
    if os.geteuid() != 0:
        pytest.skip("the lab needs root")
    lab.down("s2")
    st = lab.up(hosts=2, name="s2", slots=1)
    yield st
    lab.down("s2")


@root_only
def test_done_when_run_spans_two_lab_hosts_then_lab_down_leaves_nothing(tmp_path):
    lab.down("s1")
    st = lab.up(hosts=2, name="s1")  # default slots: this machine's cores / hosts
    try:
        assert [h["slots"] for h in st["hosts"]] == [max(1, len(os.sched_getaffinity(0)) // 2)] * 2
        p = cloudbench("run", "--provider", "ssh", "--inventory", st["inventory"], "--gpus", 2, *SMALL,
                       "--repetitions", 1, "--json", "--results", tmp_path)
        assert p.returncode == 0, p.stderr[-3000:]
        out = json.loads(p.stdout)
        d = Path(out["results_dir"])
        df = pd.read_parquet(d / "samples.parquet")
        assert (df["status"] == "ok").all() and len(df) == 2
        two = df[df["gpus"] == 2]
        assert set(two["hosts"]) == {"s1-h0,s1-h1"} and (two["nodes"] == 2).all()
        # every rank's host is recorded by the trainer itself (its hostname in the host's UTS namespace)
        summary = json.loads(Path(d, two.iloc[0]["metrics_path"]).read_text().splitlines()[-1])
        assert {(r["rank"], r["host"]) for r in summary["ranks_placement"]} == {(0, "s1-h0"), (1, "s1-h1")}
        assert (df["link_bandwidth_Bps"] > 1e7).all() and (two["allreduce_bandwidth_Bps"] > 1e6).all()
        fleet = json.loads((d / "fleet.json").read_text())
        assert [n["name"] for n in fleet["nodes"]] == ["s1-h0", "s1-h1"]
        assert "predicted" in (d / "report.md").read_text()
        assert not leases(st) and not procs_with(f"CLOUDBENCH_RUN={out['run_id']}")
    finally:
        p = cloudbench("lab", "down", "--name", "s1")
    assert p.returncode == 0
    ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "cbl-s1" not in ns and not lab.state_dir("s1").exists()
    assert subprocess.run(["ip", "link", "show", "cbl-s1"], capture_output=True).returncode != 0
    assert not subprocess.run(["pgrep", "-f", "cloudbench-lab/s1/"], capture_output=True).stdout


def _run_until_steps(tmp_path, st, steps=3):
    """Start a long 2-rank point in the background; return (process, run dir) once rank 0 is stepping."""
    proc = subprocess.Popen([str(BIN / "cloudbench"), "run", "--provider", "ssh",
                             "--inventory", st["inventory"], "--sweep", "2", "--gpus", "2", "--variant", "small",
                             "--steps", "2000", "--warmup", "1", "--repetitions", "1", "--no-progress", "--json",
                             "--results", str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        logs = list(tmp_path.glob("*/logs/gpus2-rep1.log"))
        if logs and logs[0].read_text(errors="replace").count('"event": "step"') >= steps:
            return proc, logs[0].parents[1]
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.5)
    proc.kill()
    raise AssertionError("the point never started stepping")


@root_only
def test_killed_trainer_fails_the_point_naming_the_host_and_run_tears_down(twohosts, tmp_path):
    proc, d = _run_until_steps(tmp_path, twohosts)
    run_id = d.name
    victims = [p for p in procs_with(f"CLOUDBENCH_RUN={run_id}") if b"HOROVOD_RANK=1" in
               Path(f"/proc/{p}/environ").read_bytes().split(b"\0") and b"gan.train" in
               Path(f"/proc/{p}/cmdline").read_bytes()]
    assert victims
    t0 = time.monotonic()
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    out, err = proc.communicate(timeout=120)
    assert time.monotonic() - t0 < 60  # bounded: horovodrun sees its rank die, no waiting on the timeout
    assert proc.returncode == 1 and "every point failed" in err
    row = pd.read_parquet(d / "samples.parquet").iloc[0]
    assert row["status"] == "failed" and "rank 1 on host s2-h1" in row["error"], row["error"]
    assert not leases(twohosts) and not procs_with(f"CLOUDBENCH_RUN={run_id}")


@root_only
def test_killed_sshd_fails_the_point_naming_the_host(tmp_path):
    lab.down("s3")
    st = lab.up(hosts=2, name="s3", slots=1)
    try:
        proc, d = _run_until_steps(tmp_path, st)
        h1 = st["hosts"][1]
        sshds = [int(p) for p in subprocess.run(["ip", "netns", "pids", h1["netns"]], capture_output=True,
                                                text=True).stdout.split()
                 if Path(f"/proc/{p}/comm").read_text().strip() == "sshd"]
        t0 = time.monotonic()
        for pid in sshds:  # the listener and the session carrying rank 1: the host is gone for ssh
            os.kill(pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=180)
        assert time.monotonic() - t0 < 90
        assert proc.returncode == 1
        row = pd.read_parquet(d / "samples.parquet").iloc[0]
        assert row["status"] == "failed" and "s3-h1" in row["error"], row["error"]
        assert "cannot reach host s3-h1" in err  # teardown says which host it could not clean
        assert leases(st) == ["s3-h1.lease"]  # the unreachable host's lease stays, and is reported
        assert json.loads((d / "run.json").read_text())["state"] == "finished"  # the sweep ran; its point failed
    finally:
        lab.down("s3")
    assert not lab.state_dir("s3").exists()
    assert not procs_with(f"CLOUDBENCH_RUN={d.name}")


@root_only
def test_leases_are_exclusive_survive_a_crash_and_gc_releases_them(twohosts, tmp_path):
    inv = twohosts["inventory"]
    doc = yaml.safe_load(Path(inv).read_text())
    doc["hosts"].reverse()
    reversed_inv = tmp_path / "reversed.yaml"
    reversed_inv.write_text(yaml.safe_dump(doc))
    a = SSHProvider(inventory=str(reversed_inv))
    a.owner = "vm-that-crashed:999999"  # a harness on another machine holds s2-h1
    fleet = a.provision(FleetSpec(run_id="run-a", provider="ssh", slots=1, variant="small"), lambda f: None)
    assert leases(twohosts) == ["s2-h1.lease"] and [n.name for n in fleet.nodes] == ["s2-h1"]
    b = SSHProvider(inventory=inv)
    with pytest.raises(ProviderError, match=r"s2-h1 .* is leased by run run-a"):
        b.provision(FleetSpec(run_id="run-b", provider="ssh", slots=2, variant="small"), lambda f: None)
    assert leases(twohosts) == ["s2-h1.lease"]  # b released the lease of s2-h0 it had taken
    # A lease of a harness on another machine is not ours to judge: gc lists it as alive and keeps it.
    p = cloudbench("gc", "--provider", "ssh", "--inventory", inv, "--results", tmp_path, "--json")
    assert p.returncode == 0 and json.loads(p.stdout)["resources"] == []
    # Owned by a dead harness on this machine (a crash): gc releases it.
    import socket

    a.teardown("run-a")
    assert not leases(twohosts)
    c = SSHProvider(inventory=str(reversed_inv))
    dead = subprocess.Popen(["true"])
    dead.wait()
    c.owner = f"{socket.gethostname()}:{dead.pid}"
    c.provision(FleetSpec(run_id="run-c", provider="ssh", slots=1, variant="small"), lambda f: None)
    p = cloudbench("gc", "--provider", "ssh", "--inventory", inv, "--results", tmp_path, "--json")
    assert p.returncode == 0, p.stderr
    assert [(r["kind"], r["id"], r["run_id"]) for r in json.loads(p.stdout)["resources"]] == \
        [("lease", "s2-h1", "run-c")]
    assert not leases(twohosts)


@root_only
def test_deploy_copies_the_source_and_refuses_mismatched_versions(twohosts, tmp_path):
    inv = yaml.safe_load(Path(twohosts["inventory"]).read_text())
    inv["deploy"] = "copy"
    path = tmp_path / "copy.yaml"
    path.write_text(yaml.safe_dump(inv))
    p = SSHProvider(inventory=str(path))
    fleet = p.provision(FleetSpec(run_id="run-copy", provider="ssh", slots=2, variant="small"), lambda f: None)
    try:
        p.deploy(fleet)
        d = p._deployed["run-copy"]
        assert d["mode"] == "copy" and d["pythonpath"].startswith(inv["workdir"] + "/src-")
        assert (Path(d["pythonpath"]) / "gan" / "train.py").is_file()
        assert (Path(d["rdir"]) / "known_hosts").is_file() and os.access(Path(d["rdir"]) / "bin" / "ssh", os.X_OK)
        # The source edited while it was copied: said as such, not as a TensorFlow/Horovod install problem.
        probe = p._probe_trainer
        p._probe_trainer = lambda h, py, path: {**probe(h, py, path), "source": "edited"}
        with pytest.raises(ProviderError, match=r"source edited there, \w+ here: the project's source changed"):
            p.deploy(fleet)
        p._probe_trainer = probe
    finally:
        p.teardown("run-copy", fleet)
    inv["python"] = "/usr/bin/python3"  # no TensorFlow or Horovod there
    path.write_text(yaml.safe_dump(inv))
    p = SSHProvider(inventory=str(path))
    fleet = p.provision(FleetSpec(run_id="run-bad", provider="ssh", slots=1, variant="small"), lambda f: None)
    try:
        with pytest.raises(ProviderError, match=r"host s2-h0 .*the trainer does not run: ModuleNotFoundError"):
            p.deploy(fleet)
    finally:
        p.teardown("run-bad", fleet)
    assert not leases(twohosts)


@root_only
def test_unreachable_host_is_named_with_the_reason(twohosts, tmp_path):
    inv = yaml.safe_load(Path(twohosts["inventory"]).read_text())
    inv["hosts"][1]["address"] = twohosts["hosts"][1]["address"].rsplit(".", 1)[0] + ".99"  # nobody there
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(inv))
    p = cloudbench("run", "--provider", "ssh", "--inventory", path, "--gpus", 2, *SMALL, "--results", tmp_path)
    assert p.returncode == 1
    assert "cannot reach host s2-h1" in p.stderr and ".99:22" in p.stderr, p.stderr[-2000:]
    assert not leases(twohosts)


def test_inventory_errors_name_the_field_and_what_is_expected(tmp_path):
    known = tmp_path / "known_hosts"
    known.write_text("")

    def inv(doc):
        path = tmp_path / "inv.yaml"
        path.write_text(yaml.safe_dump({"known_hosts": str(known), **doc}))
        return path

    ok = load_inventory(inv({"hosts": [{"address": "10.0.0.1", "slots": 8, "price_per_hour": 3.5}], "user": "u"}))
    assert ok.hosts[0].name == "10.0.0.1" and ok.hosts[0].slots == 8 and ok.hosts[0].user == "u"
    cases = [({"hosts": []}, "non-empty list of hosts"),
             ({"hosts": [{"address": "a"}], "colour": 1}, "one of "),
             ({"hosts": [{"address": "a", "slots": 0}]}, "a positive integer"),
             ({"hosts": [{"address": "a", "nmae": "x"}]}, "one of address"),
             ({"hosts": [{"address": "a"}, {"address": "a"}]}, "a name no other host has"),
             ({"hosts": [{"address": "a", "price_per_hour": -1}]}, "non-negative number"),
             ({"hosts": [{"address": "a"}], "deploy": "rsync"}, "auto or shared or copy"),
             ({"hosts": [{"address": "a"}], "key": "/nonexistent"}, "an existing private key file"),
             ({"hosts": [{"name": "x"}]}, "with an address")]
    for doc, message in cases:
        with pytest.raises(PlanError, match=message):
            load_inventory(inv(doc))
    with pytest.raises(PlanError, match="an existing inventory YAML"):
        load_inventory(tmp_path / "missing.yaml")
    path = tmp_path / "nokh.yaml"
    path.write_text(yaml.safe_dump({"hosts": [{"address": "a"}], "known_hosts": str(tmp_path / "none")}))
    with pytest.raises(PlanError, match="known_hosts"):
        load_inventory(path)
    p = cloudbench("run", "--provider", "ssh", *SMALL)
    assert p.returncode == 2 and "--inventory" in p.stderr


def _agents_on(sock_dir):
    """pids whose command line names the per-launch agent directory (the shell and the ssh-agent)."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if sock_dir.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":
                    out.append(int(pid))
        except OSError:
            continue
    return out


@pytest.mark.parametrize("moment", ["inside Popen", "before its socket", "after the key is added",
                                    "after its shell died"])
def test_an_interrupt_at_any_moment_of_the_launch_agent_leaves_no_agent(tmp_path, monkeypatch, moment):
    """The campaign once found an ssh-agent orphaned by a SIGINT at launch: the shell that holds it (and stops
    it when the harness dies) was stopped after forking it but before setting its trap. The agent now leads
    its own process group, which the launch stops as a whole: "after its shell died" stands for that window
    deterministically (the shell is killed with -9, so no trap of its own can help). "inside Popen": the
    interrupt comes after the fork but before Popen returns, so the launch never held the child's pid."""
    import tempfile
    import types
    from providers import ssh as ssh_mod
    from providers.errors import Interrupted

    key = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    known = tmp_path / "known_hosts"
    known.write_text("")
    inv = tmp_path / "inv.yaml"
    inv.write_text(yaml.safe_dump({"hosts": [{"address": "10.0.0.1"}], "key": str(key), "known_hosts": str(known)}))
    p = SSHProvider(inventory=str(inv))
    dirs = []
    real_mkdtemp, delay = tempfile.mkdtemp, [0.0]

    def mkdtemp(*a, **kw):
        dirs.append(real_mkdtemp(*a, **kw))
        return dirs[-1]

    def interrupt(_):  # the first poll for the socket comes at once; the interrupt a little later each time
        time.sleep(delay[0])
        raise Interrupted("SIGINT")

    def popen_then_interrupt(*a, **kw):  # the worst case: the agent has bound its socket by then
        subprocess.Popen(*a, **kw)
        until = time.monotonic() + 5
        while not os.listdir(dirs[-1]) and time.monotonic() < until:
            time.sleep(0.005)
        raise Interrupted("SIGINT")

    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)
    if moment == "before its socket":  # the provider's own clock only, not the process's time module
        monkeypatch.setattr(ssh_mod, "time", types.SimpleNamespace(monotonic=time.monotonic, sleep=interrupt))
    if moment == "inside Popen":
        monkeypatch.setattr(ssh_mod, "subprocess", types.SimpleNamespace(
            **{k: getattr(subprocess, k) for k in ("DEVNULL", "PIPE", "run")}, Popen=popen_then_interrupt))
    for i in range(20 if moment == "before its socket" else 3):
        delay[0] = i * 0.0005
        with pytest.raises(Interrupted):
            with p._agent() as env:
                assert os.path.exists(env["SSH_AUTH_SOCK"])
                if moment == "after its shell died" and shutil.which("setpriv"):
                    shells = [pid for pid in _agents_on(dirs[-1])
                              if Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0] in (b"sh", b"setpriv")]
                    assert len(shells) == 1
                    os.kill(shells[0], signal.SIGKILL)
                raise Interrupted("SIGINT")
    deadline = time.monotonic() + 5
    while any(_agents_on(d) for d in dirs) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert dirs and not [pid for d in dirs for pid in _agents_on(d)]
