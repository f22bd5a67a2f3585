"""Nightly history: runs of one comparable configuration in time order, and the change points in them.

A series is one (provider, instance type, device, variant, per-rank batch, hardware id, GPUs, metric); its
values are each run's median over repetitions (throughput; efficiency for N > 1). Change points come from
E-Divisive with a permutation test (MongoDB's signal-processing-algorithms, made for performance CI), kept
only when the segments on either side differ by at least ``min_change`` (relative, of their medians): a
change too small to act on is not reported. The permutation test is seeded, so a history gives the same
answer every time. Exit code for CI: 1 when a change point lowers a metric, 0 otherwise, 2 nothing to read.
"""
from __future__ import annotations

import base64
import html
import io
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from harness.results import RunStore
from providers.errors import CloudbenchError

class NothingToRead(CloudbenchError):
    """No run, or no successful point, in what was given (exit 2, as regress when nothing matches)."""

    exit_code = 2


SERIES = ["provider", "instance_type", "device", "variant", "batch_size_per_rank", "hardware_id", "gpus"]


@dataclass(frozen=True)
class ChangePoint:
    series: str
    metric: str
    index: int  # the first run after the change
    run_id: str
    commit: str
    before: float
    after: float
    change_pct: float


def run_dirs(paths) -> list:
    """Run directories from paths that are runs or folders of runs."""
    out = []
    for p in map(Path, paths):
        if (p / "run.json").is_file():
            out.append(p)
        elif p.is_dir():
            out += sorted(d for d in p.iterdir() if (d / "run.json").is_file())
        else:
            raise NothingToRead(f"{p} is neither a run directory nor a folder of runs")
    if not out:
        raise NothingToRead("no runs in " + ", ".join(map(str, paths)))
    return out


def table(paths) -> pd.DataFrame:
    """One row per (run, point, metric): the run's median, its time and its version."""
    rows = []
    for d in run_dirs(paths):
        store = RunStore.open(d)
        df = store.samples()
        ok = df[df["status"] == "ok"]
        if not len(ok):
            continue
        env = store.read_json("environment.json", {}) or {}
        when = env.get("harness_started_at") or store.run_id
        version = env.get("commit") or env.get("cloudbench_version") or "unknown"
        ok = ok.assign(hardware_id=ok["hardware_id"].fillna("unrecorded"))
        med = ok.groupby(SERIES, dropna=False)["samples_per_s"].median()
        one = {k[:-1]: v for k, v in med.items() if k[-1] == 1}
        for key, thr in med.items():
            base = dict(zip(SERIES, key), run_id=store.run_id, started_at=when, commit=version)
            rows.append({**base, "metric": "samples_per_s", "value": float(thr)})
            if key[-1] > 1 and key[:-1] in one:
                rows.append({**base, "metric": "efficiency", "value": float(thr / (key[-1] * one[key[:-1]]))})
    if not rows:
        raise NothingToRead("no successful points in the given runs")
    return pd.DataFrame(rows).sort_values(["started_at", "run_id"]).reset_index(drop=True)


def change_points(values, pvalue=0.01, permutations=200, min_change=0.05, seed=0) -> list:
    """Indices where the series changes (each the first value after a change), in order."""
    from signal_processing_algorithms.energy_statistics.energy_statistics import e_divisive

    values = [float(v) for v in values]
    if len(values) < 4:
        return []
    state = np.random.get_state()
    np.random.seed(seed)  # the permutation test shuffles with numpy's global generator
    try:
        found = sorted(e_divisive(values, pvalue=pvalue, permutations=permutations))
    finally:
        np.random.set_state(state)
    kept = []
    while True:  # drop the smallest change below min_change, re-judge its neighbours without it
        bounds = [0] + found + [len(values)]
        rel = [abs(_rel(values[bounds[i - 1]:c], values[c:bounds[i + 1]])) for i, c in enumerate(found, 1)]
        if not rel or min(rel) >= min_change:
            kept = found
            break
        found.pop(int(np.argmin(rel)))
    return kept


def _rel(before, after):
    b, a = float(np.median(before)), float(np.median(after))
    return (a - b) / b if b else math.nan


def analyse(df, **kw) -> list:
    out = []
    for key, s in df.groupby(SERIES + ["metric"], dropna=False, sort=True):
        s = s.reset_index(drop=True)
        name = "{} {} {} {} b{} hw {} {}x".format(*key[:-1])
        bounds = change_points(s["value"].tolist(), **kw)
        edges = [0] + bounds + [len(s)]
        for i, c in enumerate(bounds, 1):
            before, after = s["value"][edges[i - 1]:c], s["value"][c:edges[i + 1]]
            out.append(ChangePoint(series=name, metric=key[-1], index=c, run_id=s["run_id"][c],
                                   commit=str(s["commit"][c]), before=float(np.median(before)),
                                   after=float(np.median(after)), change_pct=100 * _rel(before, after)))
    return out


def exit_code(points) -> int:
    return 1 if any(p.change_pct < 0 for p in points) else 0


def text(df, points) -> str:
    lines = [f"{len(df['run_id'].unique())} runs, {df.groupby(SERIES + ['metric'], dropna=False).ngroups} series; "
             f"{len(points)} change point(s)"]
    for p in points:
        lines.append(f"{'DROP' if p.change_pct < 0 else 'rise'} {p.series} {p.metric}: {p.before:.4g} -> "
                     f"{p.after:.4g} ({p.change_pct:+.1f} %) from run #{p.index + 1} {p.run_id} (version {p.commit})")
    return "\n".join(lines)


def html_report(df, points) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = []
    for key, s in df.groupby(SERIES + ["metric"], dropna=False, sort=True):
        s = s.reset_index(drop=True)
        name = "{} {} {} {} b{} hw {} {}x {}".format(*key)
        fig, ax = plt.subplots(figsize=(7, 3))
        ax.plot(range(len(s)), s["value"], marker="o")
        for p in points:
            if p.series in name and p.metric == key[-1]:
                ax.axvline(p.index - 0.5, color="red", ls="--")
        ax.set_xlabel("run (time order)")
        ax.set_ylabel(key[-1])
        ax.set_title(name, fontsize=8)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=90)
        plt.close(fig)
        parts.append(f'<img alt="series" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">')
    runs = df.drop_duplicates("run_id")[["run_id", "started_at", "commit"]]
    rows = "".join(f"<tr><td>{i}</td><td>{html.escape(str(r.run_id))}</td><td>{html.escape(str(r.started_at))}</td>"
                   f"<td>{html.escape(str(r.commit))}</td></tr>" for i, r in enumerate(runs.itertuples()))
    cps = "".join(f"<li>{html.escape(t)}</li>" for t in text(df, points).splitlines()[1:])
    return ("<!doctype html><html><head><meta charset='utf-8'><title>cloudbench history</title></head><body>"
            f"<h1>cloudbench history</h1><ul>{cps or '<li>no change point</li>'}</ul>{''.join(parts)}"
            f"<h2>Runs</h2><table><tr><th>#</th><th>run</th><th>started</th><th>version</th></tr>{rows}</table>"
            "</body></html>\n")


def to_json(points):
    return [asdict(p) for p in points]
