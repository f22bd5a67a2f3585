"""Reports over one or more runs: a tidy frame in, a table per (provider, instance type, device, GPUs) out.

Per point: median samples/s over repetitions with its spread, speed-up over the run's 1-GPU median,
scaling efficiency E(N) = thr(N) / (N thr(1)), time per epoch for the plan's epoch size, and cost per
epoch from the price recorded at launch (unknown price stays unknown: NaN). Written as report.md and a
self-contained report.html (PNG plots inlined) next to a CSV of the table.
"""
from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd

from harness import scaling
from providers.errors import CloudbenchError
from harness.results import RunStore

KEYS = ["run_id", "provider", "instance_type", "device", "gpus"]


def load(run_dirs) -> pd.DataFrame:
    """All samples of the given run directories, with each run's epoch size attached."""
    frames = []
    for d in run_dirs:
        store = RunStore.open(d)
        df = store.samples()
        plan = store.read_json("run.json", {}).get("plan", {})
        df["epoch_events"] = plan.get("epoch_events") or np.nan
        frames.append(df)
    frames = [f for f in frames if len(f)]
    if not frames:
        raise CloudbenchError("no samples in " + ", ".join(map(str, run_dirs)))
    return pd.concat(frames, ignore_index=True)


FLAG_TOLERANCE = 0.10  # a point is flagged when its interval lies more than this below the prediction's


def _intervals(agg, ok):
    """95 % intervals (harness.stats: t-intervals on log throughput) of throughput, speed-up and efficiency."""
    from harness import stats

    samples = ok.groupby(KEYS)["samples_per_s"].agg(list).to_dict()
    cols = {c: [] for c in ("samples_per_s_lo", "samples_per_s_hi", "speedup_lo", "speedup_hi",
                            "efficiency_lo", "efficiency_hi", "ci_rel_half_width")}
    for _, r in agg.iterrows():
        key = tuple(r[k] for k in KEYS)
        mine, one = samples.get(key, []), samples.get(key[:-1] + (1,), [])
        _, lo, hi = stats.mean_ci(mine)
        _, slo, shi = stats.ratio_ci(mine, one) if r["gpus"] != 1 else (1.0, 1.0, 1.0)
        cols["samples_per_s_lo"].append(lo)
        cols["samples_per_s_hi"].append(hi)
        cols["speedup_lo"].append(slo)
        cols["speedup_hi"].append(shi)
        cols["efficiency_lo"].append(slo / r["gpus"])
        cols["efficiency_hi"].append(shi / r["gpus"])
        cols["ci_rel_half_width"].append(stats.relative_half_width(mine))
    for c, v in cols.items():
        agg[c] = np.asarray(v, dtype=float)


def _prediction_interval(agg):
    """The model's prediction with its own error carried through: the 1-GPU step time's interval (from the
    1-GPU throughput interval) and the calibrated busy step's standard error (x 1.96), never above ideal."""
    t1 = agg[agg["gpus"] == 1].set_index(KEYS[:-1])
    lo, hi = [], []
    for _, r in agg.iterrows():
        p = r["predicted_efficiency"]
        key = tuple(r[k] for k in KEYS[:-1])
        if np.isnan(p) or key not in t1.index:
            lo.append(np.nan)
            hi.append(np.nan)
            continue
        one = t1.loc[key]
        rel = [one["samples_per_s"] / one["samples_per_s_hi"], one["samples_per_s"] / one["samples_per_s_lo"]] \
            if np.isfinite(one["samples_per_s_lo"]) else [1.0, 1.0]
        se = r.get("compute_step_se_s", np.nan)
        comp = r["compute_step_s"] if np.isfinite(r["compute_step_s"]) else one["step_time_s"]
        crel = 1.96 * se / comp if np.isfinite(se) and comp else 0.0
        # E = t1 / (compute + comm): lower with a short t1 and a long compute, higher the other way round.
        lo.append(min(1.0, p * rel[0] / (1 + crel)))
        hi.append(min(1.0, p * rel[1] / max(1e-9, 1 - crel)))
    agg["predicted_lo"], agg["predicted_hi"] = lo, hi


def _link(r):
    """(bandwidth, latency) for the model: Horovod's measured allreduce figures when the run calibrated
    them at this point, else the provider's raw link."""
    if not np.isnan(r["allreduce_bandwidth_Bps"]):
        return r["allreduce_bandwidth_Bps"], r["allreduce_latency_s"]
    return r["link_bandwidth_Bps"], 0.0 if np.isnan(r["link_latency_s"]) else r["link_latency_s"]


def aggregate(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (run, provider, instance type, device, GPUs) from the successful repetitions."""
    ok = df[df["status"] == "ok"]
    failed = df[df["status"] != "ok"].groupby(KEYS).size().rename("failed")
    g = ok.groupby(KEYS, sort=True)
    thr = g["samples_per_s"]
    agg = pd.DataFrame({
        "repetitions": thr.size(),
        "samples_per_s": thr.median(),
        "samples_per_s_min": thr.min(),
        "samples_per_s_max": thr.max(),
        "samples_per_s_std": thr.std(),
        "step_time_s": g["step_time_mean_s"].median(),
        "price_per_hour": g["price_per_hour"].first(),
        "epoch_events": g["epoch_events"].first(),
        "variant": g["variant"].first(),
        "batch_size_per_rank": g["batch_size_per_rank"].first(),
        "grad_bytes_d": g["grad_bytes_d"].median(),
        "grad_bytes_g": g["grad_bytes_g"].median(),
        "link_bandwidth_Bps": g["link_bandwidth_Bps"].median(),
        "link_latency_s": g["link_latency_s"].median(),
        "allreduce_bandwidth_Bps": g["allreduce_bandwidth_Bps"].median(),
        "allreduce_latency_s": g["allreduce_latency_s"].median(),
        "compute_step_s": g["compute_step_s"].median(),
        "compute_step_se_s": g["compute_step_se_s"].median(),
        "cpu_model": g["cpu_model"].first(),
        "hardware_id": g["hardware_id"].agg(lambda v: ",".join(sorted({str(x) for x in v.dropna()})) or None),
    })
    agg = agg.join(failed, how="outer").reset_index()
    agg["failed"] = agg["failed"].fillna(0).astype(int)
    agg["repetitions"] = agg["repetitions"].fillna(0).astype(int)
    agg["spread_pct"] = 100 * (agg["samples_per_s_max"] - agg["samples_per_s_min"]) / agg["samples_per_s"]
    one = agg[agg["gpus"] == 1].set_index(KEYS[:-1])["samples_per_s"]
    base = agg.set_index(KEYS[:-1]).index.map(one.to_dict())
    agg["speedup"] = agg["samples_per_s"].to_numpy() / np.asarray(base, dtype=float)
    agg["efficiency"] = agg["speedup"] / agg["gpus"]
    _intervals(agg, ok)
    t1 = agg[agg["gpus"] == 1].set_index(KEYS[:-1])["step_time_s"].to_dict()
    agg["predicted_efficiency"] = [
        scaling.predicted_efficiency(t1.get(tuple(r[k] for k in KEYS[:-1]), np.nan), int(r["gpus"]),
                                     [r["grad_bytes_d"]] * 2 + [r["grad_bytes_g"]] * 2, *_link(r),
                                     compute_s=r["compute_step_s"])
        for _, r in agg.iterrows()]
    agg["predicted_efficiency"] = agg["predicted_efficiency"].clip(upper=1.0)  # never above ideal
    _prediction_interval(agg)
    # Flag a point only when its whole interval lies below the predicted interval by more than the
    # tolerance (no interval, or no prediction: no flag).
    agg["below_prediction"] = agg["efficiency_hi"] < (1 - FLAG_TOLERANCE) * agg["predicted_lo"]
    agg["epoch_time_s"] = agg["epoch_events"] / agg["samples_per_s"]
    agg["cost_per_epoch"] = agg["price_per_hour"] * agg["epoch_time_s"] / 3600.0
    return agg.sort_values(KEYS).reset_index(drop=True)


TABLE = [("provider", "provider", "{}"), ("instance_type", "instance", "{}"), ("device", "device", "{}"),
         ("gpus", "GPUs", "{:d}"), ("repetitions", "reps", "{:d}"), ("samples_per_s", "samples/s (median)", "{:.2f}"),
         ("ci_rel_half_width", "95% CI +-%", "{:.1f}"), ("speedup", "speed-up", "{:.2f}"),
         ("efficiency", "efficiency", "{:.2f}"), ("efficiency_ci", "efficiency 95% CI", "{}"),
         ("predicted_efficiency", "predicted", "{:.2f}"), ("below_prediction", "flag", "{}"),
         ("epoch_time_s", "epoch h", "{:.2f}"), ("cost_per_epoch", "cost/epoch", "{:.2f}"), ("failed", "failed", "{:d}")]


def _cell(value, fmt, col):
    if col == "ci_rel_half_width" and value is not None and np.isfinite(value):
        value = 100 * value
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "unknown" if col == "cost_per_epoch" else "n/a"
    if col == "epoch_time_s":
        value = value / 3600.0
    if col == "below_prediction":
        return "BELOW MODEL" if value else ""
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def table_rows(agg):
    agg = agg.copy()
    agg["efficiency_ci"] = [f"{lo:.2f}-{hi:.2f}" if np.isfinite(lo) and r["gpus"] > 1 else None
                            for lo, hi, (_, r) in zip(agg["efficiency_lo"], agg["efficiency_hi"], agg.iterrows())]
    return [[_cell(r[c], f, c) for c, _, f in TABLE] for _, r in agg.iterrows()]


def markdown(agg, title="cloudbench report"):
    head = [h for _, h, _ in TABLE]
    lines = [f"# {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(agg)]
    runs = ", ".join(sorted(agg["run_id"].unique()))
    ev = agg["epoch_events"].dropna().unique()
    lines += ["", f"Runs: {runs}.", f"Epoch = {', '.join(f'{int(e):,}' for e in ev)} training events; "
              "efficiency E(N) = thr(N) / (N thr(1)); predicted = t(1) / (compute + ring allreduce time of the "
              "step's gradients), with compute the step without communication while all ranks compute at once and "
              "the allreduce latency and bandwidth, both measured on the fleet by gan.commbench (t(1) and the raw "
              "link when not calibrated); BELOW MODEL = the measured 95 % interval lies more than 10 % below the prediction's interval; "
              "the model leaves out, on CPU workers, the CPU that Horovod's and Gloo's threads take on a rank's own cores "
              "(measured: about 0.1 s per 2.4 s step on 2 cores), so with short steps it is optimistic by that share; "
              "95% CI +-% = half the 95 % t-interval of the mean log throughput over the repetitions, relative; "
              "cost from the price recorded at launch (unknown when the provider has no price)."]
    return "\n".join(lines) + "\n"


def text_table(agg):
    head = [h for _, h, _ in TABLE]
    rows = table_rows(agg)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    out = ["  ".join(h.rjust(w) for h, w in zip(head, widths))]
    out += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    if agg.attrs.get("machines"):
        out += ["", "machines:", *agg.attrs["machines"]]
    return "\n".join(out)


def plots(agg):
    """(throughput PNG, efficiency PNG) as bytes: one line per run/provider, error bars min-max."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = []
    for metric, ylabel in (("samples_per_s", "samples/s (median, min-max)"), ("efficiency", "scaling efficiency")):
        fig, ax = plt.subplots(figsize=(6.4, 4))
        for (run, prov, inst, dev), grp in agg.groupby(KEYS[:-1]):
            grp = grp.sort_values("gpus")
            label = f"{prov} {inst} ({dev}) {run}"
            if metric == "samples_per_s":
                err = [grp["samples_per_s"] - grp["samples_per_s_min"], grp["samples_per_s_max"] - grp["samples_per_s"]]
                ax.errorbar(grp["gpus"], grp[metric], yerr=err, marker="o", capsize=3, label=label)
            else:
                ax.plot(grp["gpus"], grp[metric], marker="o", label=label)
        if metric == "efficiency":
            ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_ylim(bottom=0)
        ax.set_xlabel("GPUs (ranks)")
        ax.set_ylabel(ylabel)
        ax.set_xticks(sorted(agg["gpus"].unique()))
        if agg.groupby(KEYS[:-1]).ngroups <= 12:  # beyond that a legend hides the plot
            ax.legend(fontsize=7)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        plt.close(fig)
        images.append(buf.getvalue())
    return images


def html_report(agg, pngs, title="cloudbench report"):
    head = "".join(f"<th>{html.escape(h)}</th>" for _, h, _ in TABLE)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in table_rows(agg))
    imgs = "".join(f'<img alt="plot" src="data:image/png;base64,{base64.b64encode(p).decode()}">' for p in pngs)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
            "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}img{max-width:48%;margin:1em 1% 0 0}"
            f"</style></head><body><h1>{html.escape(title)}</h1><table><tr>{head}</tr>{body}</table>{imgs}"
            "<p>Efficiency E(N) = thr(N) / (N thr(1)); 95% CI +-% = half the 95 % t-interval of the mean log "
            "throughput over the repetitions, relative; cost from the price recorded at launch.</p><h2>Machines</h2><pre>"
            + html.escape("\n".join(agg.attrs.get("machines") or [])) + "</pre></body></html>\n")


def machines_section(run_dirs) -> list:
    """Lines naming the machines of each run (from the nodes' fingerprints), heterogeneous fleets, and what
    differs between runs that ran on different hardware or software (shown; ``regress`` refuses them)."""
    from harness import machines

    lines, first = [], None
    for d in run_dirs:
        store = RunStore.open(d)
        nodes = machines.nodes(store)
        lines.append(f"- {store.run_id}: " + ("; ".join(machines.summary_lines(nodes)) if nodes
                                              else "no fingerprint recorded (a run from before fingerprints)"))
        if machines.heterogeneous(nodes):
            lines.append("  - HETEROGENEOUS FLEET: its nodes differ in hardware; its figures mix machines")
        if first is None:
            first = (store.run_id, nodes)
        elif nodes or first[1]:
            diffs = machines.differences(first[1], nodes)
            if diffs:
                lines.append(f"  - NOT COMPARABLE with {first[0]}: " + "; ".join(
                    why or f"{field} {a!r} vs {b!r}" for field, a, b, why in diffs))
    return lines


def write(run_dirs, out_dir=None, with_plots=True):
    """Build the report; returns (aggregate frame, {"md": path, "html": path, "csv": path})."""
    from harness.results import write_atomic

    agg = aggregate(load(run_dirs))
    agg.attrs["machines"] = machines_section(run_dirs)
    out = Path(out_dir or run_dirs[0])
    out.mkdir(parents=True, exist_ok=True)
    paths = {"md": out / "report.md", "html": out / "report.html", "csv": out / "report.csv"}
    write_atomic(paths["md"], (markdown(agg) + "\n## Machines\n\n" + "\n".join(agg.attrs["machines"]) + "\n").encode())
    write_atomic(paths["html"], html_report(agg, plots(agg) if with_plots else []).encode())
    write_atomic(paths["csv"], agg.to_csv(index=False).encode())
    return agg, {k: str(v) for k, v in paths.items()}


def rows_json(agg):
    return json.loads(agg.to_json(orient="records"))
