"""The slurm provider against real slurm-wlm daemons on this machine: slurmctld + two slurmd nodes (root)."""
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import BIN, ROOT
from harness.lab import slurm as slurmlab
from providers.slurm import parse_gres_gpus
from providers.slurm.launch import tasks_per_node
from test_run_local import cloudbench

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="slurmd needs root")
SMALL = ["--variant", "small", "--steps", "20", "--warmup", "5", "--no-progress"]


@pytest.fixture(scope="module")
def cluster():
    if os.geteuid() != 0:
        pytest.skip("slurmd needs root")
    slurmlab.down("cbt")
    st = slurmlab.up(nodes=2, name="cbt", cpus=1)
    yield st
    slurmlab.down("cbt")
    assert not Path(st["conf"]).exists()


def opts(st):
    return ["--provider", "slurm", "--option", f"slurm_conf={st['conf']}", "--option", f"partition={st['partition']}"]


def squeue(st):
    p = subprocess.run(["squeue", "-h", "-o", "%i %j %T"], capture_output=True, text=True,
                       env={**os.environ, "SLURM_CONF": st["conf"]})
    return [line.split() for line in p.stdout.splitlines()]


@root_only
def test_sweep_runs_across_two_slurmd_nodes(cluster, tmp_path):
    p = cloudbench("run", *opts(cluster), "--gpus", 2, *SMALL, "--repetitions", 1, "--json", "--results", tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout)
    d = Path(out["results_dir"])
    df = pd.read_parquet(d / "samples.parquet")
    assert (df["status"] == "ok").all() and len(df) == 2
    two = df[df["gpus"] == 2]
    assert set(two["hosts"]) == {"cbt1,cbt2"} and (two["nodes"] == 2).all()
    script = (d / "logs" / "gpus2-rep1.sbatch").read_text()
    for line in ("--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--partition=cbt", "--time=01:00:00",
                 f"--job-name=cb-{out['run_id']}"):
        assert line in script
    assert "gres" not in script  # CPU nodes: no GPUs requested
    assert json.loads((d / "commbench.json").read_text())["2"]["ranks"] == 2
    assert not [j for j in squeue(cluster) if j[1] == f"cb-{out['run_id']}"]


@root_only
def test_pending_job_fails_its_point_with_the_reason_and_is_cancelled(cluster, tmp_path):
    env = {**os.environ, "SLURM_CONF": cluster["conf"]}
    blocker = subprocess.run(["sbatch", "--parsable", "-N2", "--job-name", "blocker", "--wrap", "sleep 600"],
                             capture_output=True, text=True, env=env, check=True).stdout.strip()
    try:
        plan = tmp_path / "plan.yaml"
        plan.write_text("point_timeout_s: 15\nsweep: [2]\nrepetitions: 1\n")
        p = cloudbench("run", *opts(cluster), "--plan", plan, "--gpus", 2, *SMALL, "--json", "--results", tmp_path)
        assert p.returncode == 1
        run = next(tmp_path.glob("*-slurm-*"))
        rows = pd.read_parquet(run / "samples.parquet")
        err = " ".join(rows["error"].astype(str))
        assert "timed out" in err and "PENDING" in err and "Resources" in err, err
        assert [j[1] for j in squeue(cluster)] == ["blocker"]  # the run's pending jobs were cancelled
    finally:
        subprocess.run(["scancel", blocker], env=env)


@root_only
def test_ctrl_c_scancels_the_running_job(cluster, tmp_path):
    proc = subprocess.Popen([str(BIN / "cloudbench"), "run", *opts(cluster), "--sweep", "2", "--gpus", "2",
                             "--variant", "small", "--steps", "2000", "--warmup", "1", "--repetitions", "1",
                             "--no-progress", "--results", str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not any(j[2] == "RUNNING" and j[1].startswith("cb-") for j in squeue(cluster)):
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Resume with" in err
    deadline = time.monotonic() + 30
    while [j for j in squeue(cluster) if j[1].startswith("cb-")]:
        assert time.monotonic() < deadline, squeue(cluster)
        time.sleep(0.5)


@root_only
def test_gc_cancels_jobs_of_a_dead_harness_only(cluster, tmp_path):
    env = {**os.environ, "SLURM_CONF": cluster["conf"]}
    dead = subprocess.Popen(["true"])
    dead.wait()
    import socket

    ids = {}
    for run, owner in (("orphan", f"{socket.gethostname()}:{dead.pid}"), ("elsewhere", "otherhost:1")):
        ids[run] = subprocess.run(["sbatch", "--parsable", "-N1", "--job-name", f"cb-{run}",
                                   f"--comment=cloudbench-owner={owner}", "--wrap", "sleep 600"],
                                  capture_output=True, text=True, env=env, check=True).stdout.strip()
    try:
        p = cloudbench("gc", "--provider", "slurm", "--option", f"slurm_conf={cluster['conf']}", "--results",
                       tmp_path, "--json")
        assert p.returncode == 0, p.stderr
        assert [(r["kind"], r["run_id"]) for r in json.loads(p.stdout)["resources"]] == [("job", "orphan")]
        names = [j[1] for j in squeue(cluster) if j[2] not in ("COMPLETING", "CANCELLED")]
        assert "cb-orphan" not in names and "cb-elsewhere" in names
    finally:
        subprocess.run(["scancel", *ids.values()], env=env)


def test_slurm_formats():
    assert parse_gres_gpus("gpu:a100:8(S:0-1)") == (8, "a100")
    assert parse_gres_gpus("gpu:4") == (4, None)
    assert parse_gres_gpus("(null)") == (0, None)
    assert parse_gres_gpus("craynetwork:4,gpu:v100:2") == (2, "v100")
    assert tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert tasks_per_node("4") == [4]
    p = cloudbench("run", "--provider", "slurm", "--option", "time_limit=soon", *SMALL)
    assert p.returncode == 2 and "a Slurm time such as 01:00:00" in p.stderr
