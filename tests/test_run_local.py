"""End to end on the local provider: real horovodrun launches of the small model."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import BIN, ROOT
from providers.local import LocalProvider

RUN = ["--variant", "small", "--steps", "20", "--warmup", "5", "--no-progress"]


def cloudbench(*args, timeout=900, **kw):
    exe = BIN / "cloudbench"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "harness.cli"]
    return subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True, timeout=timeout, cwd=ROOT, **kw)


def run_ok(results, *args):
    """`cloudbench run ARGS --json` that must succeed with every point ok: (its JSON, run dir, samples)."""
    p = cloudbench("run", *args, "--json", "--results", results)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout)
    d = Path(out["results_dir"])
    df = pd.read_parquet(d / "samples.parquet")
    assert (df["status"] == "ok").all(), df[["gpus", "status", "error"]]
    return out, d, df


def tagged(run_id):
    return [r for r in LocalProvider().list_tagged() if r.run_id == run_id]


def trainer_pids(run_id):
    return [int(r.id) for r in tagged(run_id) if "gan.train" in r.detail]


def test_run_sweep_json_results_and_report(tmp_path):
    p = cloudbench("run", "--gpus", 2, *RUN, "--repetitions", 2, "--json", "--results", tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout)
    d = Path(out["results_dir"])
    assert out["state"] == "finished" and d.parent == tmp_path and d.name == out["run_id"]
    for name in ("samples.parquet", "report.html", "report.md", "fleet.json", "run.json", "environment.json"):
        assert (d / name).is_file(), name
    df = pd.read_parquet(d / "samples.parquet")
    assert sorted(zip(df["gpus"], df["repetition"])) == [(g, r) for g in (1, 2) for r in (1, 2)]
    assert (df["status"] == "ok").all() and (df["samples_per_s"] > 0).all()
    assert set(df["device"]) == {"cpu"} and df["price_per_hour"].isna().all()
    assert all((d / lp).is_file() for lp in df["log_path"])
    assert (df["link_bandwidth_Bps"] > 1e7).all()  # measured loopback link
    calib = json.loads((d / "commbench.json").read_text())["2"]  # Horovod allreduce calibration at 2 ranks
    assert calib["ranks"] == 2 and calib["bandwidth_Bps"] > 1e6 and 0 < calib["latency_s"] < 0.1
    assert 0 < calib["compute_step_s"] < 10 and calib["g_bytes"] == 4 * (324_960 - 24)
    two = df[df["gpus"] == 2]
    assert (two["allreduce_bandwidth_Bps"] == calib["bandwidth_Bps"]).all() and two["compute_step_s"].notna().all()
    # fp32 gradients of the trainable weights (parameters less BN moving statistics) of small G and D
    assert (df["grad_bytes_g"] == 4 * (324_960 - 24)).all() and (df["grad_bytes_d"] == 4 * (11_758 - 8)).all()
    assert len(out["points"]) == 4
    report = (d / "report.md").read_text()
    assert "| local |" in report and "efficiency" in report and "predicted" in report
    assert not tagged(out["run_id"])  # nothing left running


def test_sigint_keeps_finished_points_and_resume_completes(tmp_path):
    exe = BIN / "cloudbench"
    # Two points (1 and 2 ranks): the interrupt lands in the second, after the first has finished.
    cmd = [str(exe), "run", "--gpus", "2", *RUN, "--repetitions", "1", "--json", "--results", str(tmp_path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    deadline = time.monotonic() + 600
    run_dir = None
    while time.monotonic() < deadline:  # wait for one finished point and the next trainer running
        dirs = list(tmp_path.iterdir())
        if dirs:
            run_dir = dirs[0]
            samples = run_dir / "samples.parquet"
            if samples.exists() and len(pd.read_parquet(samples)) >= 1 and trainer_pids(run_dir.name):
                break
        time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("the run never reached its second point")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "--resume" in err
    assert not tagged(run_dir.name), "a trainer process survived the interrupt"
    state = json.loads((run_dir / "run.json").read_text())
    assert state["state"] == "interrupted"
    before = pd.read_parquet(run_dir / "samples.parquet")
    assert len(before) == 1 and (before["status"] == "ok").all()

    p = cloudbench("run", "--resume", run_dir.name, "--json", "--results", tmp_path, "--no-progress")
    assert p.returncode == 0, p.stderr[-3000:]
    after = pd.read_parquet(run_dir / "samples.parquet")
    assert len(after) == 2 and (after["status"] == "ok").all()
    kept = after.merge(before, on=["gpus", "repetition"], suffixes=("", "_before"))
    assert (kept["started_at"] == kept["started_at_before"]).all()  # finished points were not redone


def test_a_dying_worker_fails_its_point_and_the_sweep_goes_on(tmp_path):
    exe = BIN / "cloudbench"
    cmd = [str(exe), "run", "--sweep", "1,2", "--gpus", "2", *RUN, "--repetitions", "1", "--json",
           "--results", str(tmp_path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    killed = False
    deadline = time.monotonic() + 300
    while not killed and time.monotonic() < deadline and proc.poll() is None:
        for d in tmp_path.iterdir():
            pids = trainer_pids(d.name)
            if pids:
                os.kill(pids[0], signal.SIGKILL)  # the first point's worker dies
                killed = True
        time.sleep(0.2)
    out, err = proc.communicate(timeout=600)
    assert killed and proc.returncode == 0, err[-2000:]
    res = json.loads(out)
    df = pd.read_parquet(Path(res["results_dir"]) / "samples.parquet").set_index("gpus")
    assert df.loc[1, "status"] == "failed" and "exited with code" in df.loc[1, "error"]
    assert "rank 0 on host" in df.loc[1, "error"] and "(killed)" in df.loc[1, "error"], df.loc[1, "error"]
    assert (Path(res["results_dir"]) / df.loc[1, "log_path"]).is_file()
    assert df.loc[2, "status"] == "ok" and res["failed_points"] == 1


def test_invalid_flags_exit_2_and_start_nothing(tmp_path):
    p = cloudbench("run", "--gpus", 0, "--results", tmp_path)
    assert p.returncode == 2 and "invalid gpus: '0' (expected an integer >= 1)" in p.stderr
    p = cloudbench("run", "--sweep", "1,8", "--gpus", 2, "--results", tmp_path)
    assert p.returncode == 2 and "invalid sweep" in p.stderr
    p = cloudbench("run", "--gpus", 64, "--variant", "small", "--results", tmp_path, "--no-progress")
    assert p.returncode == 2 and "invalid gpus: 64 (expected at most" in p.stderr and "one machine" in p.stderr
    assert not list(tmp_path.iterdir())  # refused before anything started: no run directory
    p = cloudbench("run", "--provider", "nosuch", "--results", tmp_path)
    assert p.returncode == 1 and "available providers: " in p.stderr and " local," in p.stderr
    assert not any(d for d in tmp_path.iterdir() if (d / "samples.parquet").exists())


def test_dry_run_buys_nothing(tmp_path):
    p = cloudbench("run", "--dry-run", "--json", "--results", tmp_path)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["sweep"] == [1, 2] and out["repetitions"] == 3 and out["cost_upper_bound"] is None
    assert not list(tmp_path.iterdir())


def test_gc_finds_and_removes_orphans_and_down_is_idempotent(tmp_path):
    env = {**os.environ, "CLOUDBENCH_RUN": "20200101-000000-local-dead", "CLOUDBENCH_OWNER": "999999999"}
    orphan = subprocess.Popen(["sleep", "300"], env=env)
    # A process whose launching harness (here: this test) is alive belongs to a live run: gc spares it.
    owned = subprocess.Popen(["sleep", "300"], env={**os.environ, "CLOUDBENCH_RUN": "20200101-000000-local-live",
                                                    "CLOUDBENCH_OWNER": str(os.getpid())})
    try:
        p = cloudbench("gc", "--provider", "local", "--dry-run", "--json", "--results", tmp_path)
        assert p.returncode == 0
        found = json.loads(p.stdout)["resources"]
        assert any(r["id"] == str(orphan.pid) and r["run_id"] == "20200101-000000-local-dead" for r in found)
        assert orphan.poll() is None  # dry run touches nothing
        assert not any(r["id"] == str(owned.pid) for r in found)
        p = cloudbench("gc", "--provider", "local", "--json", "--results", tmp_path)
        assert p.returncode == 0
        orphan.wait(timeout=10)
        assert owned.poll() is None
    finally:
        for proc in (orphan, owned):
            if proc.poll() is None:
                proc.kill()
    p = cloudbench("providers", "--json")
    assert any(r["name"] == "local" for r in json.loads(p.stdout)["providers"])


def test_down_tears_down_a_run_from_its_record(tmp_path):
    from harness.results import RunStore

    store = RunStore.create(tmp_path, "20200101-000000-local-beef")
    store.write_json("run.json", {"run_id": store.run_id, "state": "running", "pid": 999999,
                                  "plan": {"provider": "local"}})
    store.write_json("fleet.json", {"run_id": store.run_id, "provider": "local", "instance_type": "local-x",
                                    "nodes": [{"name": "x", "address": "127.0.0.1", "slots": 2, "device": "cpu"}]})
    worker = subprocess.Popen(["sleep", "300"], env={**os.environ, "CLOUDBENCH_RUN": store.run_id})
    try:
        p = cloudbench("down", store.run_id, "--results", tmp_path, "--json")
        assert p.returncode == 0, p.stderr
        assert [r["id"] for r in json.loads(p.stdout)["removed"]] == [str(worker.pid)]
        worker.wait(timeout=10)
        assert json.loads((store.dir / "run.json").read_text())["state"] == "interrupted"
        again = cloudbench("down", store.run_id, "--results", tmp_path, "--json")
        assert again.returncode == 0 and json.loads(again.stdout)["removed"] == []
    finally:
        if worker.poll() is None:
            worker.kill()
