"""The regression gate: a current run against a baseline, per matching point.

A point matches on (provider, instance type, device, GPUs, variant, per-rank batch). For throughput and,
for N > 1, scaling efficiency (per repetition: thr_rep(N) / (N median thr(1)) of the same run), the point
regresses when the current median is below the baseline's by more than the tolerance AND a one-sided
Welch t-test on the log of the repetitions' figures (the statistics of the report's intervals,
harness.stats) says the drop is significant (p < alpha). Exit codes: 0 no regression,
1 regression, 2 nothing matched, 3 not comparable.

Like is compared with like only: when the two runs' machines differ (the hardware or software part of the
nodes' fingerprints: CPU model and stepping, ISA features, cores, GPUs, TensorFlow, Horovod, driver...) or
either run has no fingerprint, nothing is compared and every difference is named, unless the caller asks to
compare anyway.
"""
from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass

import numpy as np

from harness import report

MATCH = ["provider", "instance_type", "device", "gpus", "variant", "batch_size_per_rank"]


@dataclass(frozen=True)
class Check:
    point: str
    metric: str
    baseline: float
    current: float
    change_pct: float
    p_value: float
    regressed: bool
    n_baseline: int
    n_current: int


def _per_rep(df):
    """Successful repetitions with a per-repetition efficiency column."""
    ok = df[df["status"] == "ok"].copy()
    one = ok[ok["gpus"] == 1].groupby(["run_id"])["samples_per_s"].median()
    ok["efficiency"] = ok["samples_per_s"] / (ok["gpus"] * ok["run_id"].map(one))
    return ok


def one_sided_p(base, cur):
    """P-value of 'current < baseline': the one-sided Welch t-test on logs that the report's intervals use
    (harness.stats)."""
    from harness import stats

    return stats.p_less(base, cur)


NOT_COMPARABLE = 3


def comparability(baseline_dirs, current_dirs) -> list:
    """[(field, baseline value, current value, why)]: what differs between the machines of the two sides."""
    from harness import machines
    from harness.results import RunStore

    def nodes(dirs):
        out = {}
        for d in dirs:
            out.update(machines.nodes(RunStore.open(d)))
        return out

    return machines.differences(nodes(baseline_dirs), nodes(current_dirs))


def describe(diffs) -> str:
    return "; ".join(why or f"{field}: baseline {a!r}, current {b!r}" for field, a, b, why in diffs)


def compare(baseline_dirs, current_dirs, tolerance=0.05, alpha=0.05):
    b, c = _per_rep(report.load(baseline_dirs)), _per_rep(report.load(current_dirs))
    checks = []
    bg, cg = b.groupby(MATCH), c.groupby(MATCH)
    for key in sorted(set(bg.groups) & set(cg.groups), key=str):
        bb, cc = bg.get_group(key), cg.get_group(key)
        name = "{} {} {} {}x, {} b{}".format(*key)
        metrics = ["samples_per_s"] + (["efficiency"] if key[3] > 1 else [])
        for m in metrics:
            bv, cv = bb[m].dropna().to_numpy(), cc[m].dropna().to_numpy()
            if not len(bv) or not len(cv):
                continue
            bm, cm = float(np.median(bv)), float(np.median(cv))
            change = (cm - bm) / bm
            p = one_sided_p(bv, cv)
            significant = p < alpha if not math.isnan(p) else True  # one repetition: tolerance alone decides
            checks.append(Check(point=name, metric=m, baseline=bm, current=cm, change_pct=100 * change,
                                p_value=p, regressed=bool(change < -tolerance and significant),
                                n_baseline=len(bv), n_current=len(cv)))
    return checks


def markdown(checks, tolerance, alpha):
    lines = ["# cloudbench regress", "",
             f"Tolerance {100 * tolerance:.1f} %, one-sided Welch t-test on log figures at alpha {alpha}.", "",
             "| point | metric | baseline | current | change | p | verdict |", "|---|---|---|---|---|---|---|"]
    for ch in checks:
        verdict = "**REGRESSION**" if ch.regressed else "ok"
        p = "n/a" if math.isnan(ch.p_value) else f"{ch.p_value:.3g}"
        lines.append(f"| {ch.point} | {ch.metric} | {ch.baseline:.3f} | {ch.current:.3f} | "
                     f"{ch.change_pct:+.1f} % | {p} | {verdict} |")
    if not checks:
        lines.append("| (no matching points) | | | | | | |")
    bad = [ch for ch in checks if ch.regressed]
    lines += ["", f"{len(bad)} regression(s) in {len(checks)} check(s)."]
    return "\n".join(lines) + "\n"


def junit(checks, path):
    suite = ET.Element("testsuite", name="cloudbench-regress", tests=str(len(checks)),
                       failures=str(sum(ch.regressed for ch in checks)))
    for ch in checks:
        case = ET.SubElement(suite, "testcase", classname=ch.point, name=ch.metric)
        if ch.regressed:
            fail = ET.SubElement(case, "failure", message=f"{ch.metric} {ch.change_pct:+.1f} % (p={ch.p_value:.3g})")
            fail.text = f"baseline median {ch.baseline:.4f}, current median {ch.current:.4f}"
    ET.ElementTree(suite).write(path, encoding="utf-8", xml_declaration=True)


def exit_code(checks):
    if not checks:
        return 2
    return 1 if any(ch.regressed for ch in checks) else 0


def to_json(checks):
    return [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(ch).items()} for ch in checks]
