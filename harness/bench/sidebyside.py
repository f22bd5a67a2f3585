"""Side by side: this checkout's trainer against another commit's, in one run, with intervals.

    python -m harness.bench.sidebyside --base a101bf5                       # fp32, batch 8, HDF5, 1 process
    python -m harness.bench.sidebyside --base a101bf5 --precisions fp32,bf16 --layouts 1x2,2x1 \\
        --data hdf5,synthetic --repeats 5 --json-out sbs.json

The machine behind these 2 cores changes from one day to the next, so a speed-up only counts when both
trainers run on the same machine in the same hour. The base commit is checked out in a temporary git
worktree; each cell (code x precision x data x layout) is one ``gan.train --variant fixed`` process, and
the cells are interleaved round by round (their order rotated every round) so that a drift of the machine
falls on all of them alike. Layouts: ``1x2`` is one process on both cores (``--no-horovod --cpus-per-rank
2``), ``2x1`` two Horovod ranks of one core each (``horovodrun --gloo``, batch per rank). HDF5 input is
a set of files written once by ``gan.showers`` (the authors' layout) and read by both trainers.

Each cell prints its geometric-mean samples/s with the 95 % t-interval over its repetitions (harness.stats),
the achieved GFLOP/s (gan.model's training FLOPs per sample) and MFU against the best SGEMM rate measured
on these cores in this run and against the nominal peak (cores x clock x FLOP/cycle). Then each ratio
with its 95 % Welch interval on logs: this checkout over the base, and bf16 over fp32.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import stats
from harness.bench import machine_line
from harness.bench.trainer import measured_gemm_flops, nominal_peak_flops, run_trainer

ROOT = Path(__file__).resolve().parents[2]


def worktree(rev, where):
    """A detached git worktree of ``rev`` at ``where``; returns its full commit id."""
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", f"{rev}^{{commit}}"],
                            capture_output=True, text=True)
    if commit.returncode != 0:
        raise SystemExit(f"harness.bench.sidebyside: --base {rev}: not a commit of {ROOT} "
                         f"({commit.stderr.strip()})")
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-f", str(where), rev],
                   check=True, capture_output=True)
    return commit.stdout.strip()


def write_showers(directory, events, files=2):
    """``files`` HDF5 files of ``events`` simulated fixed-angle showers in all (gan.showers)."""
    os.makedirs(directory, exist_ok=True)
    for i in range(files):
        subprocess.run([sys.executable, "-m", "gan.showers", "--variant", "fixed", "--events",
                        str(events // files), "--seed", str(i), "--out", os.path.join(directory, f"showers_{i}.h5")],
                       check=True, capture_output=True, cwd=ROOT)
    return directory


def run_cell(code_dir, precision, data, layout, args, extra=()):
    procs, cores = (int(x) for x in layout.split("x"))
    return run_trainer(["--variant", "fixed", "--batch-size", str(args.batch), "--steps", str(args.steps),
                        "--warmup", str(args.warmup), "--precision", precision, "--data", data, *extra],
                       ranks=procs, cpus_per_rank=cores, timeout=args.timeout, horovod=procs > 1, code_dir=code_dir)


def _fmt_ci(m, lo, hi):
    return f"{m:6.2f} [{lo:5.2f}, {hi:5.2f}]" if lo == lo else f"{m:6.2f} [  -  ,   -  ]"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m harness.bench.sidebyside", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--base", default=None, help="a commit to measure beside this checkout (default: none)")
    ap.add_argument("--precisions", default="fp32")
    ap.add_argument("--data", default="hdf5", help="comma list of hdf5, synthetic")
    ap.add_argument("--layouts", default="1x2", help="comma list of PROCESSESxCORES: 1x2, 2x1")
    ap.add_argument("--batch", type=int, default=8, help="per process")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3, help="processes per cell (interleaved rounds)")
    ap.add_argument("--head-args", default="", help="extra gan.train options for this checkout only")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per process")
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args(argv)
    precisions = args.precisions.split(",")
    datas = args.data.split(",")
    layouts = args.layouts.split(",")
    for p in precisions:
        if p not in ("fp32", "bf16", "fp16"):
            ap.error(f"--precisions: {p!r} is not one of fp32, bf16, fp16")
    for d in datas:
        if d not in ("hdf5", "synthetic"):
            ap.error(f"--data: {d!r} is not one of hdf5, synthetic")
    for layout in layouts:
        parts = layout.split("x")
        if len(parts) != 2 or not all(x.isdigit() and int(x) > 0 for x in parts):
            ap.error(f"--layouts: {layout!r} is not PROCESSESxCORES, e.g. 1x2 or 2x1")
    if args.repeats < 2:
        ap.error("--repeats must be at least 2 for an interval")

    machine = machine_line()  # the fingerprint is read once, printed first and stored with the figures
    print(machine, flush=True)
    nominal, peak_desc = nominal_peak_flops()
    gemm = measured_gemm_flops()
    print(f"# nominal peak {(nominal or 0) / 1e9:.0f} GFLOP/s = {peak_desc}; best SGEMM here {gemm / 1e9:.0f} GFLOP/s")
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip() or "this checkout"
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "gan"], capture_output=True,
                           text=True).stdout.strip()
    head_label = head + ("+changes" if dirty else "")
    with tempfile.TemporaryDirectory(prefix="cb-sbs-") as tmp:
        codes = [(head_label, ROOT, shlex.split(args.head_args))]
        base_dir = Path(tmp) / "base"
        if args.base:
            base_commit = worktree(args.base, base_dir)
            codes.append((base_commit[:7], base_dir, []))
        try:
            return _measure(args, codes, precisions, datas, layouts, gemm, nominal, tmp, machine)
        finally:
            if args.base:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base_dir)],
                               capture_output=True)
                subprocess.run(["git", "-C", str(ROOT), "worktree", "prune"], capture_output=True)


def _measure(args, codes, precisions, datas, layouts, gemm, nominal, tmp, machine):
    """Write the HDF5 input, run the interleaved rounds, print the table and the ratios."""
    h5 = None
    if "hdf5" in datas:
        events = max(256, args.batch * 2 * (args.steps + args.warmup))
        t0 = time.monotonic()
        h5 = write_showers(os.path.join(tmp, "showers"), events)
        print(f"# HDF5 input: {events} simulated fixed-angle showers in 2 files (gan.showers, "
              f"{time.monotonic() - t0:.0f} s to write), read by every cell", flush=True)
    print(f"# gan.train --variant fixed, batch {args.batch} per process, {args.steps} measured steps after "
          f"{args.warmup} warm-up, {args.repeats} processes per cell, interleaved", flush=True)
    cells = list(itertools.product(range(len(codes)), precisions, datas, layouts))
    results = {c: [] for c in cells}
    flops = {}
    for r in range(args.repeats):
        k = r % len(cells)
        for c in cells[k:] + cells[:k]:
            ci, prec, data, layout = c
            label, code_dir, extra = codes[ci]
            s = run_cell(code_dir, prec, h5 if data == "hdf5" else "synthetic", layout, args, extra)
            results[c].append(s["samples_per_s"])
            flops[c] = s.get("flops_per_sample")
            print(f"  round {r + 1}: {label:>14} {prec:>5} {data:>9} {layout:>4}  "
                  f"{s['samples_per_s']:.2f} samples/s", flush=True)
    print(f"\n{'code':>14} {'prec':>5} {'data':>9} {'layout':>6}  {'samples/s [95% CI]':>22} {'GFLOP/s':>8} "
          f"{'of fp32 SGEMM':>13} {'of fp32 nominal':>15}   (bf16 cells: against fp32 peaks, not AMX's)")
    rows = []
    for c in cells:
        ci, prec, data, layout = c
        m, lo, hi = stats.mean_ci(results[c])
        gf = m * flops[c] / 1e9 if flops.get(c) else float("nan")
        used = int(layout.split("x")[0]) * int(layout.split("x")[1])
        share = used / len(os.sched_getaffinity(0))
        mfu_g = gf * 1e9 / (gemm * share)
        mfu_n = gf * 1e9 / (nominal * share) if nominal else float("nan")
        rows.append({"code": codes[ci][0], "precision": prec, "data": data, "layout": layout,
                     "samples_per_s": results[c], "geomean": m, "ci95": [lo, hi], "gflops": gf,
                     "mfu_sgemm": mfu_g, "mfu_nominal": mfu_n})
        print(f"{codes[ci][0]:>14} {prec:>5} {data:>9} {layout:>6}  {_fmt_ci(m, lo, hi):>22} {gf:8.1f} "
              f"{100 * mfu_g:12.1f}% {100 * mfu_n:14.1f}%")
    ratios = []

    def ratio(name, a, b):
        r, lo, hi = stats.ratio_ci(results[a], results[b])
        ratios.append({"ratio": name, "value": r, "ci95": [lo, hi]})
        print(f"  {name:<58} {r:5.2f}x [{lo:.2f}, {hi:.2f}]")

    print("\nratios (95 % Welch interval on logs):")
    for ci, prec, data, layout in cells:
        if args.base and ci == 0:
            ratio(f"{codes[0][0]} / {codes[1][0]}, {prec} {data} {layout}", (0, prec, data, layout),
                  (1, prec, data, layout))
    if "fp32" in precisions:
        for ci, prec, data, layout in cells:
            if prec != "fp32":
                ratio(f"{prec} / fp32, {codes[ci][0]} {data} {layout}", (ci, prec, data, layout),
                      (ci, "fp32", data, layout))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"machine": machine, "sgemm_gflops": gemm / 1e9,
                       "nominal_gflops": nominal / 1e9 if nominal else None, "batch": args.batch,
                       "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats,
                       "head_args": args.head_args, "cells": rows, "ratios": ratios}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
