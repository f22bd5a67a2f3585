"""Report benchmark: build a report from N tidy sample rows and print the time of each stage.

    python -m harness.bench.report [--rows 1000000] [--runs 100]

The rows are written as one run directory's samples.parquet (runs x GPU counts x repetitions), then
``cloudbench report`` does what it always does: read, aggregate, write report.md/html/csv with plots.
Goal: under 3 s for 1,000,000 rows.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from harness import report
from harness.results import COLUMNS, RunStore
from harness.bench import machine_line


def synthetic_run(directory, rows, runs, seed=0):
    rng = np.random.default_rng(seed)
    gpus = np.array([1, 2, 4, 8, 16, 32, 64, 128])
    n = rows
    g = gpus[np.arange(n) % len(gpus)]
    run = np.arange(n) // (n // runs + 1)
    thr = 35.0 * g * (0.95 ** np.log2(g)) * rng.normal(1.0, 0.02, n)
    df = pd.DataFrame({c: None for c in COLUMNS}, index=range(n))
    df = df.assign(run_id=[f"run{r:04d}" for r in run], provider=np.where(run % 2, "aws", "openstack"),
                   instance_type=np.where(run % 2, "p3.16xlarge", "g1.v100x8"), gpu_model="V100", device="gpu",
                   nodes=np.maximum(1, g // 8), gpus=g, repetition=np.arange(n) // (len(gpus) * runs) + 1,
                   status="ok", samples_per_s=thr, samples_per_s_per_rank=thr / g, step_time_mean_s=96 / thr,
                   step_time_std_s=0.01, batch_size_per_rank=96, variant="angle", price_per_hour=3.06 * g)
    store = RunStore.create(directory, "bench-1m")
    store.write_json("run.json", {"run_id": "bench-1m", "state": "finished", "plan": {"epoch_events": 125000}})
    df.to_parquet(store.samples_path, index=False)
    return store.dir


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m harness.bench.report", description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--runs", type=int, default=100)
    args = ap.parse_args(argv)
    print(machine_line(), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        d = synthetic_run(Path(tmp), args.rows, args.runs)
        t0 = time.perf_counter()
        df = report.load([d])
        t1 = time.perf_counter()
        agg = report.aggregate(df)
        t2 = time.perf_counter()
        _, paths = report.write([d])
        t3 = time.perf_counter()
    print(f"rows {len(df):,} -> {len(agg):,} table rows")
    print(f"read parquet   {t1 - t0:6.3f} s")
    print(f"aggregate      {t2 - t1:6.3f} s")
    print(f"full report    {t3 - t2:6.3f} s  (read + aggregate + report.md/html/csv + 2 PNG plots)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
