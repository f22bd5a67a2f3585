"""How sure is a scaling figure? The 95 % interval of the default sweep's throughput, speed-up and efficiency
at 3 and at 5 repetitions, from one real run of 5 (the first 3 of them are the 3-repetition answer).

    python -m harness.bench.uncertainty [--run RUN_DIR] [cloudbench run flags after --]

Without ``--run`` it runs the default sweep on the local provider with ``--repetitions 5`` (the full
fixed-angle model: about 10 minutes on 2 cores). Intervals are harness.stats' (t-intervals on log
throughput; Welch for ratios), the ones the report and the regression gate use. Writes
results/benchmarks/uncertainty-<hardware id>.{txt,json}.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from harness.bench import machine, machine_line

ROOT = Path(__file__).resolve().parents[2]


def intervals(df, reps):
    from harness import stats

    ok = df[(df["status"] == "ok") & (df["repetition"] <= reps)]
    one = ok[ok["gpus"] == 1]["samples_per_s"].tolist()
    rows = []
    for gpus, g in ok.groupby("gpus"):
        thr = g["samples_per_s"].tolist()
        m, lo, hi = stats.mean_ci(thr)
        row = {"repetitions": reps, "gpus": int(gpus), "samples_per_s": m, "samples_per_s_lo": lo,
               "samples_per_s_hi": hi, "throughput_half_width_pct": 100 * (hi - lo) / 2 / m}
        if gpus > 1:
            r, rlo, rhi = stats.ratio_ci(thr, one)
            row.update(efficiency=r / gpus, efficiency_lo=rlo / gpus, efficiency_hi=rhi / gpus,
                       efficiency_half_width=(rhi - rlo) / 2 / gpus)
        rows.append(row)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m harness.bench.uncertainty", description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", help="an existing run directory with 5 repetitions (default: make one)")
    ap.add_argument("--out", default=str(ROOT / "results" / "benchmarks"))
    ap.add_argument("extra", nargs="*", help="cloudbench run flags (after --)")
    args = ap.parse_args(argv)
    fp = machine()
    line = machine_line(fp)
    print(line, flush=True)
    run = args.run
    if not run:
        p = subprocess.run([sys.executable, "-m", "harness.cli", "run", "--repetitions", "5", "--no-progress",
                            "--json", *args.extra], cwd=ROOT, capture_output=True, text=True)
        if p.returncode != 0:
            print(p.stderr[-3000:], file=sys.stderr)
            return p.returncode
        run = json.loads(p.stdout)["results_dir"]
    import pandas as pd

    from harness import machines

    df = pd.read_parquet(Path(run) / "samples.parquet")
    rows = intervals(df, 3) + intervals(df, 5)
    lines = [line, f"run {run}: {df['variant'].iloc[0]} model, batch {df['batch_size_per_rank'].iloc[0]}/rank, "
             f"{df['steps'].iloc[0]} steps; 95 % intervals (t on log throughput; Welch for the ratio)",
             f"{'reps':>4} {'ranks':>5} {'samples/s':>10} {'95% CI':>17} {'+-%':>6} {'efficiency':>10} "
             f"{'95% CI':>13} {'+-':>6}"]
    for r in rows:
        eff = (f"{r['efficiency']:10.3f} {r['efficiency_lo']:6.3f}-{r['efficiency_hi']:.3f} "
               f"{r['efficiency_half_width']:6.3f}") if "efficiency" in r else ""
        lines.append(f"{r['repetitions']:>4} {r['gpus']:>5} {r['samples_per_s']:10.3f} "
                     f"{r['samples_per_s_lo']:8.3f}-{r['samples_per_s_hi']:<8.3f} {r['throughput_half_width_pct']:6.1f} "
                     + eff)
    text = "\n".join(lines)
    print("\n".join(lines[1:]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    hw = machines.ids({"here": fp})["hardware_id"]
    (out / f"uncertainty-{hw}.txt").write_text(text + "\n")
    (out / f"uncertainty-{hw}.json").write_text(json.dumps({"machine": line, "run": str(run), "rows": rows},
                                                           indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
