"""Benchmark: the scaling model against measured efficiency on lab links (needs root).

    python -m harness.bench.scaling [--rates unlimited,100mbit] [--variant small] [--batch-size 8]
                                    [--steps 40] [--repetitions 3]

For each rate: ``cloudbench lab up --hosts 2 --slots 1 --bandwidth RATE``, then the ssh provider sweeps 1
and 2 ranks (one per host) and the report's prediction (compute + ring allreduce with the allreduce
latency and bandwidth measured on that link) is printed beside the measured efficiency. Each lab is torn
down afterwards. Figures go to results/benchmarks/scaling-lab-<variant>-b<batch>.{txt,json}.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from harness.lab import hosts as lab
from harness.bench import machine_line

ROOT = Path(__file__).resolve().parents[2]


def cloudbench(*args):
    return subprocess.run([sys.executable, "-m", "harness.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT)


def one(rate, args, results):
    name = "bench"
    lab.down(name)
    try:
        st = lab.up(hosts=2, bandwidth=None if rate == "unlimited" else rate, name=name, slots=1)
        p = cloudbench("run", "--provider", "ssh", "--inventory", st["inventory"], "--sweep", "1,2", "--gpus", 2,
                       "--variant", args.variant, "--batch-size", args.batch_size, "--steps", args.steps,
                       "--warmup", args.warmup,
                       "--repetitions", args.repetitions, "--results", results, "--json", "--no-progress")
        if p.returncode != 0:
            raise SystemExit(f"run on {rate} failed:\n{p.stderr[-3000:]}")
        out = json.loads(p.stdout)
    finally:
        lab.down(name)
    from harness import report

    agg = report.aggregate(report.load([out["results_dir"]]))
    two = agg[agg["gpus"] == 2].iloc[0]
    calib = json.loads((Path(out["results_dir"]) / "commbench.json").read_text())["2"]
    return {"rate": rate, "run_id": out["run_id"],
            "samples_per_s_1": float(agg[agg["gpus"] == 1].iloc[0]["samples_per_s"]),
            "samples_per_s_2": float(two["samples_per_s"]), "efficiency": float(two["efficiency"]),
            "predicted_efficiency": float(two["predicted_efficiency"]),
            "ratio": float(two["efficiency"] / two["predicted_efficiency"]),
            "tcp_link_Bps": float(two["link_bandwidth_Bps"]), "allreduce_bandwidth_Bps": calib["bandwidth_Bps"],
            "allreduce_latency_s": calib["latency_s"], "d_seconds": calib.get("d_seconds"),
            "g_seconds": calib.get("g_seconds"), "compute_step_2_s": calib.get("compute_step_s", float("nan")),
            "step_time_1_s": float(agg[agg["gpus"] == 1].iloc[0]["step_time_s"]),
            "step_time_2_s": float(two["step_time_s"]), "batch_size_per_rank": args.batch_size}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rates", default="unlimited,100mbit")
    ap.add_argument("--variant", default="small")
    ap.add_argument("--batch-size", type=int, default=8, help="per rank")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repetitions", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "results" / "benchmarks"))
    args = ap.parse_args(argv)
    machine = machine_line()
    print(machine, flush=True)
    with tempfile.TemporaryDirectory(prefix="cb-bench-") as results:
        rows = [one(rate, args, results) for rate in args.rates.split(",")]
    lines = [f"scaling model vs measurement on lab links: 2 hosts x 1 slot, {args.variant} model, "
             f"{args.warmup}+{args.steps} steps, {args.repetitions} repetitions, batch {args.batch_size}/rank",
             f"{'link':>10} {'tcp MB/s':>9} {'allreduce MB/s':>14} {'latency ms':>10} {'thr 1':>7} {'thr 2':>7} "
             f"{'busy/t1':>7} {'measured E':>10} {'predicted E':>11} {'ratio':>6}"]
    for r in rows:
        lines.append(f"{r['rate']:>10} {r['tcp_link_Bps'] / 1e6:9.1f} {r['allreduce_bandwidth_Bps'] / 1e6:14.1f} "
                     f"{r['allreduce_latency_s'] * 1e3:10.2f} {r['samples_per_s_1']:7.2f} {r['samples_per_s_2']:7.2f} "
                     f"{r['compute_step_2_s'] / r['step_time_1_s']:7.2f} {r['efficiency']:10.2f} "
                     f"{r['predicted_efficiency']:11.2f} {r['ratio']:6.2f}")
    text = "\n".join(lines)
    print(text)
    text = machine + "\n" + text
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"scaling-lab-{args.variant}-b{args.batch_size}"
    (out / f"{stem}.txt").write_text(text + "\n")
    (out / f"{stem}.json").write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
