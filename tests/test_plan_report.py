"""Plan validation, the result store, reports and the regression gate (no trainer launched)."""
import json
import xml.etree.ElementTree as ET

import numpy as np
import pandas as pd
import pytest

from conftest import run_module
from harness import plan as hplan
from harness import regress, report
from providers.errors import PlanError
from harness.results import RunStore, copy_run
from providers.base import Offering


def test_default_sweep_powers_of_two_then_n():
    assert hplan.default_sweep(1) == (1,)
    assert hplan.default_sweep(2) == (1, 2)
    assert hplan.default_sweep(6) == (1, 2, 4, 6)
    assert hplan.default_sweep(8) == (1, 2, 4, 8)


@pytest.mark.parametrize("flags,field", [
    ({"gpus": "0"}, "gpus"), ({"gpus": "two"}, "gpus"), ({"sweep": "1,x"}, "sweep"), ({"repetitions": "0"}, "repetitions"),
    ({"variant": "huge"}, "variant"), ({"engine": "nccl"}, "engine"), ({"warmup": "-1"}, "warmup"),
    ({"gpus": "2", "sweep": "1,4"}, "sweep"),
])
def test_invalid_plan_names_field_value_and_allowed(flags, field):
    with pytest.raises(PlanError) as e:
        hplan.build(**flags)
    assert e.value.field == field and "expected" in str(e.value)


def test_yaml_plan_merges_with_flags(tmp_path):
    f = tmp_path / "plan.yaml"
    f.write_text("provider: local\ngpus: 2\nrepetitions: 5\nvariant: small\nbatch-size: 4\n")
    p = hplan.build(hplan.load_yaml(f), repetitions="2")
    assert (p.gpus, p.repetitions, p.variant, p.batch_size) == (2, 2, "small", 4)
    f.write_text("gpus: 2\nsteps_per_epoch: 3\n")
    with pytest.raises(PlanError, match="steps_per_epoch"):
        hplan.load_yaml(f)


def test_resolve_against_a_cpu_offering():
    off = Offering(instance_type="local-x", gpu_model=None, gpus=0, slots=2)
    p = hplan.resolve(hplan.build(), off)
    assert (p.gpus, p.sweep, p.batch_size, p.epoch_events) == (2, (1, 2), 8, 180_000)
    gpu = Offering(instance_type="p4d", gpu_model="A100", gpus=8, slots=8)
    assert hplan.resolve(hplan.build(gpus="8"), gpu).batch_size == 128


FINGERPRINT = {"host": "n0", "cpu": {"model": "Intel(R) Xeon(R) Processor", "family": 6, "model_number": 143,
                                     "stepping": 8, "isa": ["avx2", "avx512f", "avx512_bf16"], "cores_visible": 2},
               "gpu": {"model": None, "count": 0, "memory_mib": None, "driver": None, "cuda": None},
               "software": {"tensorflow": "2.15.1", "horovod": "0.28.1", "python": "3.11.7"}}


def make_run(root, run_id, thr, price=None, provider="local", status=None, fingerprint=FINGERPRINT):
    """A run directory holding measured rows: thr = {gpus: [samples/s per repetition]}, made on the machine
    ``fingerprint`` describes (None: a run from before fingerprints)."""
    store = RunStore.create(root, run_id)
    store.write_json("run.json", {"run_id": run_id, "state": "finished", "plan": {"epoch_events": 180000}})
    store.write_json("environment.json", {"nodes": {"n0": fingerprint}} if fingerprint else {})
    for gpus, values in thr.items():
        for rep, v in enumerate(values, 1):
            store.add_sample({"run_id": run_id, "provider": provider, "instance_type": "t1", "device": "cpu",
                              "nodes": 1, "gpus": gpus, "repetition": rep, "status": (status or {}).get((gpus, rep), "ok"),
                              "samples_per_s": v, "samples_per_s_per_rank": v / gpus, "step_time_mean_s": 1.0,
                              "step_time_std_s": 0.01, "batch_size_per_rank": 8, "variant": "small",
                              "price_per_hour": None if price is None else price * gpus})
    return store


def test_store_replaces_a_point_and_reads_back(tmp_path):
    store = make_run(tmp_path, "r1", {1: [10.0, 11.0]})
    store.add_sample({"run_id": "r1", "provider": "local", "instance_type": "t1", "device": "cpu", "nodes": 1,
                      "gpus": 1, "repetition": 2, "status": "ok", "samples_per_s": 12.0})
    df = pd.read_parquet(store.samples_path)
    assert len(df) == 2 and sorted(df["samples_per_s"]) == [10.0, 12.0]
    assert store.done() == {(1, 1), (1, 2)}
    assert not list(store.dir.glob(".*tmp"))


def test_report_efficiency_and_unknown_cost(tmp_path):
    make_run(tmp_path, "a", {1: [10, 11, 9], 2: [18, 19, 17], 4: [30, 32, 28]})
    agg, paths = report.write([tmp_path / "a"])
    row = agg.set_index("gpus")
    assert row.loc[1, "samples_per_s"] == 10 and row.loc[2, "efficiency"] == pytest.approx(0.9)
    assert row.loc[4, "efficiency"] == pytest.approx(0.75)
    assert row.loc[4, "spread_pct"] == pytest.approx(100 * 4 / 30)
    assert np.isnan(row.loc[2, "cost_per_epoch"])  # unknown price stays unknown
    md = open(paths["md"]).read()
    assert "| local | t1 | cpu | 2 | 3 | 18.00 |" in md and "unknown" in md
    html = open(paths["html"]).read()
    assert html.count("data:image/png;base64,") == 2


def test_report_cost_per_epoch_from_price_at_launch(tmp_path):
    make_run(tmp_path, "p", {1: [100.0], 2: [180.0]}, price=3.6)
    agg = report.aggregate(report.load([tmp_path / "p"]))
    two = agg.set_index("gpus").loc[2]
    assert two["epoch_time_s"] == pytest.approx(1000.0)
    assert two["cost_per_epoch"] == pytest.approx(7.2 * 1000 / 3600)


def test_report_counts_failed_points(tmp_path):
    make_run(tmp_path, "f", {1: [10, 10], 2: [19, 0]}, status={(2, 2): "failed"})
    agg = report.aggregate(report.load([tmp_path / "f"])).set_index("gpus")
    assert agg.loc[2, "failed"] == 1 and agg.loc[2, "repetitions"] == 1 and agg.loc[2, "samples_per_s"] == 19


def test_regress_self_passes_scaled_copy_fails(tmp_path):
    thr = {1: [10.0, 10.3, 9.8], 2: [19.0, 19.5, 18.7]}
    make_run(tmp_path, "base", thr)
    make_run(tmp_path, "slow", {2: [v * 0.8 for v in thr[2]], 1: thr[1]})
    same = regress.compare([tmp_path / "base"], [tmp_path / "base"])
    assert regress.exit_code(same) == 0 and len(same) == 3
    slow = regress.compare([tmp_path / "base"], [tmp_path / "slow"])
    assert regress.exit_code(slow) == 1
    bad = [c for c in slow if c.regressed]
    assert {c.metric for c in bad} == {"samples_per_s", "efficiency"} and all("2x" in c.point for c in bad)


def test_regress_within_tolerance_or_noise_passes(tmp_path):
    make_run(tmp_path, "b", {1: [10.0, 10.5, 9.5]})
    make_run(tmp_path, "c", {1: [9.8, 10.3, 9.4]})  # -2 %: inside the 5 % tolerance
    assert regress.exit_code(regress.compare([tmp_path / "b"], [tmp_path / "c"])) == 0
    make_run(tmp_path, "n", {1: [12.0, 7.0, 9.0]})  # -10 % median but noisy: not significant
    checks = regress.compare([tmp_path / "b"], [tmp_path / "n"])
    assert checks[0].p_value > 0.05 and regress.exit_code(checks) == 0


def test_regress_cli_exit_codes_junit_and_no_match(tmp_path):
    thr = {1: [10.0, 10.2, 9.9], 2: [19.0, 19.4, 18.8]}
    make_run(tmp_path, "base", thr)
    make_run(tmp_path, "slow", {g: [v * 0.8 for v in vals] for g, vals in thr.items()})
    make_run(tmp_path, "other", thr, provider="aws")
    ok = run_module("harness.cli", "regress", "--baseline", tmp_path / "base", "--current", tmp_path / "base")
    assert ok.returncode == 0, ok.stderr
    junit = tmp_path / "junit.xml"
    p = run_module("harness.cli", "regress", "--baseline", tmp_path / "base", "--current", tmp_path / "slow",
                   "--junit", junit)
    assert p.returncode == 1 and "REGRESSION" in p.stdout and "local t1 cpu 2x" in p.stdout
    suite = ET.parse(junit).getroot()
    assert int(suite.get("failures")) >= 2 and suite.find("testcase/failure") is not None
    none = run_module("harness.cli", "regress", "--baseline", tmp_path / "base", "--current", tmp_path / "other",
                      "--json")
    assert none.returncode == 2 and json.loads(none.stdout)["checks"] == []


def test_baseline_save_copies_and_refuses_to_overwrite(tmp_path):
    make_run(tmp_path, "r", {1: [1.0]})
    root = tmp_path / "baselines"
    p = run_module("harness.cli", "baseline", "save", tmp_path / "r", "nightly", "--root", root)
    assert p.returncode == 0 and (root / "nightly" / "samples.parquet").exists()
    p = run_module("harness.cli", "baseline", "save", tmp_path / "r", "nightly", "--root", root)
    assert p.returncode == 1 and "--force" in p.stderr
    with pytest.raises(Exception, match="not a cloudbench run"):
        copy_run(tmp_path / "nothing", root / "x")


def test_nightly_workflow_example_uses_real_commands_and_flags():
    """Every cloudbench call in the shipped GitHub workflow parses with the real CLI."""
    import re
    import shlex

    import yaml

    from conftest import ROOT
    from harness.cli import parser

    wf = yaml.safe_load((ROOT / ".github/workflows/nightly-scaling.yml").read_text())
    env = wf["jobs"]["scaling"]["env"]
    calls = []
    for step in wf["jobs"]["scaling"]["steps"]:
        script = step.get("run", "").replace("\\\n", " ")
        for line in script.splitlines():
            for part in line.split(".venv/bin/cloudbench")[1:]:
                cmd = re.sub(r"\$\{\{[^}]*\}\}", "results/runs/x", part)
                cmd = re.sub(r"\"\$\(basename [^)]*\)\"?", "nightly", cmd)
                cmd = cmd.split("|")[0].split(">")[0].split(")")[0]
                cmd = re.sub(r"\"?\$(\w+)\"?", lambda m: env.get(m.group(1), "results/baselines/x"), cmd)
                calls.append(shlex.split(cmd))
    assert {c[0] for c in calls} == {"run", "regress", "gc", "baseline", "history"}
    for c in calls:
        parser().parse_args(c)  # argparse exits (SystemExit) on an unknown flag


def test_ring_allreduce_model():
    from harness import scaling

    # 2 ranks: each rank sends and receives half the message twice -> bytes / bandwidth in total.
    assert scaling.ring_allreduce_s(2, 1e9, 1e9) == pytest.approx(1.0)
    assert scaling.ring_allreduce_s(4, 1e9, 1e9, latency_s=1e-3) == pytest.approx(1.5 + 6e-3)
    assert scaling.ring_allreduce_s(1, 1e9, 1e9) == 0.0
    # 1 s compute, 4 messages of 0.25 GB over 1 GB/s at n=2 -> 1 s of communication -> E = 0.5.
    assert scaling.predicted_efficiency(1.0, 2, [0.25e9] * 4, 1e9) == pytest.approx(0.5)
    assert np.isnan(scaling.predicted_efficiency(1.0, 2, [0.25e9] * 4, float("nan")))
    from providers.netprobe import measure_tcp_link

    bw, lat = measure_tcp_link(megabytes=8)
    assert bw > 1e7 and 0 < lat < 0.01


def test_report_predicts_and_flags_points_below_the_model(tmp_path):
    store = make_run(tmp_path, "m", {1: [100.0, 100.0], 2: [190.0, 190.0], 4: [200.0, 200.0]})
    df = store.samples()
    df["grad_bytes_d"], df["grad_bytes_g"] = 1e6, 4e6
    df["link_bandwidth_Bps"], df["link_latency_s"] = 1e9, 0.0
    df.to_parquet(store.samples_path, index=False)
    agg = report.aggregate(report.load([store.dir])).set_index("gpus")
    # step time 1 s; per step 2x1 MB + 2x4 MB = 10 MB; n=2: 10 ms -> 0.990; n=4: 15 ms -> 0.985
    assert agg.loc[2, "predicted_efficiency"] == pytest.approx(1 / 1.010)
    assert agg.loc[4, "predicted_efficiency"] == pytest.approx(1 / 1.015)
    assert not agg.loc[2, "below_prediction"]  # 0.95 measured
    assert agg.loc[4, "below_prediction"]  # 0.50 measured
    assert "BELOW MODEL" in report.markdown(agg.reset_index())


def test_calibrated_allreduce_and_busy_compute_win_over_the_raw_link(tmp_path):
    from gan.commbench import fit
    from harness import scaling

    # the alpha-beta fit recovers latency and bandwidth of the ring model from timings
    sizes = [4096, 262144, 1048576, 4194304]
    for n in (2, 4):
        times = [scaling.ring_allreduce_s(n, s, 5e8, latency_s=1e-3) for s in sizes]
        lat, bw = fit(sizes, times, n)
        assert lat == pytest.approx(1e-3) and bw == pytest.approx(5e8)
    assert scaling.predicted_efficiency(1.0, 2, [0.25e9] * 4, 1e9, compute_s=1.25) == pytest.approx(1 / 2.25)
    store = make_run(tmp_path, "c", {1: [100.0, 100.0], 2: [150.0, 150.0]})
    df = store.samples()
    df["grad_bytes_d"], df["grad_bytes_g"] = 1e6, 4e6
    df["link_bandwidth_Bps"], df["link_latency_s"] = 1e12, 0.0  # the raw link would predict ~1.0
    df.loc[df["gpus"] == 2, ["allreduce_bandwidth_Bps", "allreduce_latency_s", "compute_step_s"]] = [1e8, 1e-3, 1.1]
    df.to_parquet(store.samples_path, index=False)
    agg = report.aggregate(report.load([store.dir])).set_index("gpus")
    # 1 s step; 10 MB / 100 MB/s = 0.1 s + 4 allreduces x 2 hops x 1 ms = 0.008 s; compute 1.1 s
    assert agg.loc[2, "predicted_efficiency"] == pytest.approx(1 / 1.208)
    assert not agg.loc[2, "below_prediction"]  # 0.75 measured vs 0.83 predicted: within 10 %
