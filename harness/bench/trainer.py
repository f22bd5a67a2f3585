"""Trainer benchmark: samples/s and model FLOP utilisation over ranks x per-rank batch sizes.

    python -m harness.bench.trainer                       # full fixed-angle model, batch 8,16,32 x 1,2 ranks
    python -m harness.bench.trainer --variant small --batches 8 --ranks 1,2 --steps 10 --json-out results.json

Each point is one ``horovodrun -np R -H localhost:R --gloo python -m gan.train`` (ranks pinned to their
own cores, intra-op threads = cores / ranks); figures come from the trainer's JSON summary, warm-up
excluded. MFU = achieved training FLOP/s (gan.model FLOPs per sample x samples/s) / this CPU's fp32
peak. The peak is cores x clock x FLOP/cycle of the widest FMA unit at the clock /proc/cpuinfo reports,
or the best SGEMM rate TensorFlow measures here if that is higher (virtual machines report the base
clock, not the turbo clock the cores run at), scaled to the cores a point uses. Every batch size also
runs one rank pinned to one core: per-core efficiency = samples/s / (cores used x that one-core rate),
so 2 Horovod ranks on 2 cores compare with 1 rank using 2 cores' threads on the same footing.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from harness.bench import machine_line


def nominal_peak_flops():
    """(peak fp32 FLOP/s, description) from /proc/cpuinfo: cores x MHz x FLOP/cycle (2 FMA pipes assumed)."""
    cores = len(os.sched_getaffinity(0))
    mhz, flags = None, set()
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("cpu MHz") and mhz is None:
                mhz = float(line.split(":")[1])
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":")[1].split())
    if "avx512f" in flags:
        per_cycle, isa = 64, "AVX-512"
    elif "avx2" in flags and "fma" in flags:
        per_cycle, isa = 32, "AVX2+FMA"
    else:
        per_cycle, isa = 8, "SSE"
    if not mhz:
        return None, "unknown clock"
    return cores * mhz * 1e6 * per_cycle, f"{cores} cores x {mhz:.0f} MHz x {per_cycle} FLOP/cycle ({isa}, 2 FMA pipes)"


def measured_gemm_flops(n=2048, repeats=10):
    """Best fp32 matmul rate TensorFlow reaches on all cores (a practical ceiling)."""
    import tensorflow as tf

    a = tf.random.normal((n, n))
    b = tf.random.normal((n, n))
    mm = tf.function(lambda x, y: tf.matmul(x, y))
    mm(a, b).numpy()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        mm(a, b).numpy()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def horovodrun_path():
    """horovodrun beside this Python (the venv's), else on PATH; None when Horovod is not installed."""
    return shutil.which("horovodrun", path=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])


def run_trainer(trainer_args, ranks=1, cpus_per_rank=None, timeout=1800, horovod=True, code_dir=None):
    """One ``gan.train`` launch on this machine; returns its summary line (the last of --metrics-out).

    ``ranks`` Horovod ranks under ``horovodrun --gloo``, or with ``horovod=False`` one process run with
    ``--no-horovod``. ``code_dir``: the checkout whose gan/ runs (default: the one importable here).
    """
    if not horovod and ranks != 1:
        raise ValueError("run_trainer: more than one rank needs Horovod")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "m.jsonl")
        trainer = ["-m", "gan.train", *trainer_args, "--metrics-out", out]
        if cpus_per_rank:
            trainer += ["--cpus-per-rank", str(cpus_per_rank)]
        if horovod:
            horovodrun = horovodrun_path()
            if not horovodrun:
                raise SystemExit("horovodrun not found; run `bash harness/setup.sh` first")
            cmd = [horovodrun, "-np", str(ranks), "-H", f"localhost:{ranks}", "--gloo", sys.executable, *trainer]
        else:
            cmd = [sys.executable, *trainer, "--no-horovod"]
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
        if code_dir:
            env["PYTHONPATH"] = str(code_dir)
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=code_dir, env=env)
        if p.returncode != 0:
            where = f" (in {code_dir})" if code_dir else ""
            raise RuntimeError(f"{' '.join(cmd)}{where} exited {p.returncode}:\n{p.stderr[-2000:]}")
        with open(out) as f:
            return json.loads(f.read().strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m harness.bench.trainer", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--variant", default="fixed", choices=("fixed", "angle", "small"))
    ap.add_argument("--batches", default="8,16,32", help="per-rank batch sizes")
    ap.add_argument("--ranks", default="1,2")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16", "auto"))
    ap.add_argument("--bn", default="keras2", choices=("keras2", "fused"), help="gan.train --bn")
    ap.add_argument("--data", default="synthetic", help="gan.train --data: synthetic or HDF5 files")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per point")
    ap.add_argument("--json-out", default=None, help="also write all figures as JSON here")
    args = ap.parse_args(argv)
    print(machine_line(), flush=True)
    try:
        batches = [int(b) for b in args.batches.split(",")]
        ranks = [int(r) for r in args.ranks.split(",")]
    except ValueError:
        ap.error("--batches and --ranks take comma-separated integers, e.g. 8,16,32")
    if not horovodrun_path():
        print("harness.bench.trainer: horovodrun not found; run `bash harness/setup.sh` first", file=sys.stderr)
        return 1

    nominal, peak_desc = nominal_peak_flops()
    gemm = measured_gemm_flops()
    peak = max(nominal or 0.0, gemm)
    print(f"# {args.variant} model, {args.precision}, BN {args.bn}, data {args.data}, "
          f"steps {args.steps} (+{args.warmup} warm-up) per point")
    print(f"# nominal peak {(nominal or 0) / 1e9:.0f} GFLOP/s = {peak_desc}; best SGEMM {gemm / 1e9:.0f} GFLOP/s;"
          f" MFU is against {peak / 1e9:.0f} GFLOP/s")
    print(f"{'ranks':>5} {'cores':>5} {'batch/rank':>10} {'samples/s':>10} {'per rank':>9} {'step s':>14} "
          f"{'GFLOP/s':>8} {'MFU %':>6} {'of SGEMM %':>10} {'per-core eff':>12}")
    cores = len(os.sched_getaffinity(0))
    rows = []
    for b in batches:
        # The one-core, one-rank point is the baseline: per-core efficiency = thr / (cores x thr_1core).
        points = [(1, 1)] + [(r, None) for r in ranks]
        base = None
        for r, cpr in points:
            s = run_trainer(["--variant", args.variant, "--batch-size", str(b), "--steps", str(args.steps),
                             "--warmup", str(args.warmup), "--precision", args.precision, "--bn", args.bn,
                             "--data", args.data], ranks=r, cpus_per_rank=cpr, timeout=args.timeout)
            used = s["cpus_per_rank"] * r
            flops = s["achieved_flops_per_s"]
            if base is None:
                base = s["samples_per_s"]
            eff = s["samples_per_s"] / (used * base)
            row = {"ranks": r, "cores": used, "batch_size_per_rank": b, "samples_per_s": s["samples_per_s"],
                   "samples_per_s_per_rank": s["samples_per_s_per_rank"], "step_time_mean_s": s["step_time_mean_s"],
                   "step_time_std_s": s["step_time_std_s"], "achieved_gflops": flops / 1e9,
                   "mfu": flops / (peak * used / cores), "of_sgemm": flops / (gemm * used / cores),
                   "per_core_efficiency": eff, "intra_op_threads": s["intra_op_threads"],
                   "flops_per_sample": s["flops_per_sample"]}
            rows.append(row)
            print(f"{r:>5} {used:>5} {b:>10} {row['samples_per_s']:>10.2f} {row['samples_per_s_per_rank']:>9.2f} "
                  f"{row['step_time_mean_s']:>7.2f} ± {row['step_time_std_s']:<5.2f} {row['achieved_gflops']:>8.1f} "
                  f"{100 * row['mfu']:>6.1f} {100 * row['of_sgemm']:>10.1f} {eff:>12.2f}"
                  + (f"  {s['precision']}" if args.precision == "auto" else "")
                  + (f"  GPU MFU {100 * s['mfu_datasheet']:.1f} % of the {s['datasheet_peak_basis']}"
                     if "mfu_datasheet" in s else ""), flush=True)
            row.update({k: s[k] for k in ("precision", "mfu_datasheet", "datasheet_peak_basis") if k in s})
    if args.json_out:
        meta = {"variant": args.variant, "precision": args.precision, "bn": args.bn, "data": args.data,
                "steps": args.steps, "warmup": args.warmup,
                "nominal_peak_gflops": nominal / 1e9 if nominal else None, "peak_basis": peak_desc,
                "mfu_peak_gflops": peak / 1e9,
                "sgemm_gflops": gemm / 1e9, "cpu_count": len(os.sched_getaffinity(0)), "points": rows}
        with open(args.json_out, "w") as f:
            json.dump(meta, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
