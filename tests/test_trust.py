"""Numbers people can trust: fingerprints decide comparability, intervals everywhere a decision is made, a
scaling model that never predicts above ideal and flags only what its interval allows, steady state."""
import copy
import json
import math

import numpy as np
import pytest

from gan import sysinfo
from harness import machines, regress, report, stats
from test_plan_report import FINGERPRINT, make_run, run_module


def test_this_machines_fingerprint_names_its_cpu_and_software():
    fp = sysinfo.collect()
    assert fp["cpu"]["model"] and fp["cpu"]["cores_visible"] >= 1 and isinstance(fp["cpu"]["isa"], list)
    assert fp["gpu"]["count"] == 0 and fp["gpu"]["model"] is None  # a CPU machine: null, never guessed
    assert fp["software"]["tensorflow"] == "2.15.1" and fp["software"]["horovod"] == "0.28.1"
    assert fp["software"]["python"] and fp["software"]["kernel"]
    assert "cores visible" in sysinfo.summary(fp)


def test_ids_flag_a_heterogeneous_fleet():
    other = copy.deepcopy(FINGERPRINT)
    other["cpu"]["model"] = "AMD EPYC 7B13"
    same = machines.ids({"a": FINGERPRINT, "b": copy.deepcopy(FINGERPRINT)})
    mixed = machines.ids({"a": FINGERPRINT, "b": other})
    assert not same["heterogeneous"] and same["hardware_id"] != machines.MIXED
    assert mixed["heterogeneous"] and mixed["hardware_id"] == machines.MIXED and "AMD EPYC" in mixed["cpu_model"]


def test_regress_compares_like_with_like_only(tmp_path):
    thr = {1: [10.0, 10.2, 9.9], 2: [19.0, 19.4, 18.8]}
    other = copy.deepcopy(FINGERPRINT)
    other["cpu"]["model"] = "AMD EPYC 7B13"
    make_run(tmp_path, "base", thr)
    make_run(tmp_path, "same", thr)
    make_run(tmp_path, "amd", thr, fingerprint=other)
    make_run(tmp_path, "old", thr, fingerprint=None)
    same = run_module("harness.cli", "regress", "--baseline", tmp_path / "base", "--current", tmp_path / "same")
    assert same.returncode == 0, same.stderr
    p = run_module("harness.cli", "regress", "--baseline", tmp_path / "base", "--current", tmp_path / "amd", "--json")
    assert p.returncode == regress.NOT_COMPARABLE == 3
    diffs = json.loads(p.stdout)["differences"]
    assert {"field": "cpu.model", "baseline": "Intel(R) Xeon(R) Processor", "current": "AMD EPYC 7B13",
            "why": ""} in diffs
    assert "AMD EPYC 7B13" in p.stderr and "--compare-anyway" in p.stderr
    anyway = run_module("harness.cli", "regress", "--baseline", tmp_path / "base", "--current", tmp_path / "amd",
                        "--compare-anyway")
    assert anyway.returncode == 0 and "comparing anyway" in anyway.stderr
    old = run_module("harness.cli", "regress", "--baseline", tmp_path / "old", "--current", tmp_path / "base")
    assert old.returncode == 3 and "baseline records no fingerprint" in old.stderr
    # report shows, never refuses
    agg, paths = report.write([tmp_path / "base", tmp_path / "amd"], out_dir=tmp_path / "rep", with_plots=False)
    md = open(paths["md"]).read()
    assert "NOT COMPARABLE with base" in md and "AMD EPYC 7B13" in md


def test_intervals_t_based_on_logs():
    m, lo, hi = stats.mean_ci([10.0, 10.0, 10.0])
    assert m == pytest.approx(10) and lo == pytest.approx(10) and hi == pytest.approx(10)
    m, lo, hi = stats.mean_ci([9.0, 10.0, 11.0])
    assert lo < 9.5 < m < 10.5 < hi  # t(0.975, 2) = 4.30: wide with three repetitions, as it should be
    assert math.isnan(stats.mean_ci([10.0])[1])  # one repetition: no interval, not a made-up one
    r, rlo, rhi = stats.ratio_ci([20.0, 19.0, 21.0], [10.0, 10.5, 9.5])
    assert rlo < 2.0 < rhi and r == pytest.approx(2.0, rel=0.01)
    assert stats.p_less([10.0, 10.2, 9.9], [8.0, 8.1, 7.9]) < 0.01
    assert stats.p_less([10.0, 10.2, 9.9], [10.1, 10.0, 10.2]) > 0.5


def test_report_carries_intervals_and_never_predicts_above_ideal(tmp_path):
    d = make_run(tmp_path, "r", {1: [10.0, 10.4, 9.7], 2: [19.0, 19.6, 18.5]}).dir
    agg = report.aggregate(report.load([d]))
    two = agg[agg["gpus"] == 2].iloc[0]
    assert two["efficiency_lo"] < two["efficiency"] < two["efficiency_hi"]
    assert two["samples_per_s_lo"] < two["samples_per_s"] < two["samples_per_s_hi"]
    assert "efficiency 95% CI" in report.text_table(agg)
    # A model that would predict super-linear scaling (compute faster than t(1)) is capped at 1.
    assert (agg["predicted_efficiency"].dropna() <= 1.0).all()


def _agg_with_prediction(eff_samples, predicted, lo, hi):
    import pandas as pd

    agg = pd.DataFrame({"gpus": [2], "efficiency": [np.median(eff_samples)],
                        "efficiency_hi": [stats.mean_ci(eff_samples)[2]], "predicted_efficiency": [predicted],
                        "predicted_lo": [lo], "predicted_hi": [hi]})
    return agg["efficiency_hi"] < (1 - report.FLAG_TOLERANCE) * agg["predicted_lo"]


def test_a_point_is_flagged_only_when_its_interval_lies_below_the_prediction():
    # measured 0.70 +- 0.01, predicted 0.90 [0.85, 0.95]: the whole interval is below -> flagged
    assert _agg_with_prediction([0.69, 0.70, 0.71], 0.9, 0.85, 0.95).iloc[0]
    # measured 0.80 but noisy (0.6-1.0): its interval reaches the prediction -> not flagged
    assert not _agg_with_prediction([0.6, 0.8, 1.0], 0.9, 0.85, 0.95).iloc[0]
    # close below the prediction's interval, within the tolerance -> not flagged
    assert not _agg_with_prediction([0.82, 0.83, 0.84], 0.9, 0.87, 0.95).iloc[0]


def test_steady_state_drops_unsettled_warmup_only():
    assert stats.steady_state([3.0, 2.0, 1.0, 1.0, 1.02, 0.98, 1.01, 1.0]) == (2, True)
    assert stats.steady_state([1.0, 1.0, 3.0, 1.0, 1.0, 1.0]) == (0, True)  # a late slow step is noise
    assert stats.steady_state([5.0, 4.0, 3.0, 2.5, 2.0, 1.5, 1.0, 1.0]) == (0, False)  # never settled


def test_a_plan_that_cannot_be_met_is_refused_before_anything_starts(tmp_path):
    from test_run_local import cloudbench

    p = cloudbench("run", "--gpus", 100000, "--dry-run")
    assert p.returncode == 2 and "at most" in p.stderr and "one machine" in p.stderr, p.stderr
    p = cloudbench("run", "--data", tmp_path / "missing.h5", "--variant", "small", "--results", tmp_path / "runs")
    assert p.returncode == 2 and "exists on this machine" in p.stderr, p.stderr
    assert not (tmp_path / "runs").exists()  # nothing started, no run directory


def _series(tmp_path, values, fingerprint=FINGERPRINT):
    root = tmp_path / "nightly"
    for i, v in enumerate(values):
        run = f"2026{1 + i // 28:02d}{1 + i % 28:02d}-000000-local-{i:04d}"
        store = make_run(root, run, {1: [v * f for f in (0.99, 1.0, 1.01)], 2: [1.8 * v * f for f in (0.99, 1.0, 1.01)]},
                         fingerprint=fingerprint)
        store.write_json("environment.json", {**store.read_json("environment.json"),
                                              "harness_started_at": f"2026-01-{1 + i:02d}T00:00:00",
                                              "commit": f"c{i:03d}"})
    return root


def test_history_finds_a_15_percent_step_and_nothing_in_noise(tmp_path):
    from test_run_local import cloudbench

    rng = np.random.default_rng(7)
    noise = 1 + 0.02 * rng.standard_normal(20)
    step = [10.0 * n * (0.85 if i >= 11 else 1.0) for i, n in enumerate(noise)]  # runs 12..20 are 15 % slower
    p = cloudbench("history", _series(tmp_path / "a", step), "--json", "--html", tmp_path / "h.html")
    out = json.loads(p.stdout)
    assert p.returncode == 1, p.stderr  # a drop
    assert {(c["metric"], c["index"]) for c in out["change_points"]} == {("samples_per_s", 11)}, out
    drop = [c for c in out["change_points"] if c["metric"] == "samples_per_s"]
    assert all(c["index"] == 11 and c["commit"] == "c011" and -17 < c["change_pct"] < -13 for c in drop), drop
    assert "c011" in (tmp_path / "h.html").read_text()
    quiet = cloudbench("history", _series(tmp_path / "b", [10.0 * n for n in noise]), "--json")
    assert quiet.returncode == 0 and json.loads(quiet.stdout)["change_points"] == [], quiet.stdout


def test_ci_target_adds_repetitions_until_the_interval_is_narrow(tmp_path):
    """A real local sweep of the small model: with a target no 2 repetitions can meet by chance... up to the cap."""
    from test_run_local import run_ok

    out, d, df = run_ok(tmp_path, "--variant", "small", "--sweep", "1", "--gpus", "1", "--steps", "8", "--warmup",
                        "2", "--repetitions", "2", "--ci-target", "0.0001", "--max-repetitions", "3", "--no-progress")
    assert sorted(df["repetition"]) == [1, 2, 3]  # the target was not met: the cap stops it
    assert df["hardware_id"].notna().all() and df["cpu_model"].notna().all()
    env = json.loads((d / "environment.json").read_text())
    assert len(env["nodes"]) == 1 and env["commit"]
    fp = next(iter(env["nodes"].values()))
    assert fp["cpu"]["model"] and fp["software"]["horovod"] == "0.28.1"
    p = run_module("harness.cli", "report", str(d))
    assert "machines:" in p.stdout and "cores visible" in p.stdout, p.stdout


def test_the_committed_baseline_has_fingerprints_and_refuses_another_cpu(tmp_path):
    import shutil

    from conftest import ROOT

    base = ROOT / "results" / "baselines" / "local-2core-fixed"
    nodes = json.loads((base / "environment.json").read_text())["nodes"]
    assert nodes and all(fp["cpu"]["model"] and fp["software"]["tensorflow"] for fp in nodes.values())
    same = run_module("harness.cli", "regress", "--baseline", base, "--current", base)
    assert same.returncode == 0, same.stderr
    other = tmp_path / "other"
    shutil.copytree(base, other)
    env = json.loads((other / "environment.json").read_text())
    for fp in env["nodes"].values():
        fp["cpu"]["model"] = "AMD EPYC 7B13 64-Core Processor"
    (other / "environment.json").write_text(json.dumps(env))
    p = run_module("harness.cli", "regress", "--baseline", base, "--current", other)
    assert p.returncode == 3 and "cpu.model" in p.stderr and "AMD EPYC 7B13" in p.stderr, p.stderr
