"""Where a multi-rank CPU step's time goes: the part of the N-rank step the scaling model does not explain.

    python -m harness.bench.step_parts [--variant fixed] [--batch-size 8] [--ranks 2] [--steps 10]

On this machine, one rank per core (--cpus-per-rank 1), it measures
1. t(1): the trainer's step with one rank alone on one core;
2. the busy step: every rank stepping at once without communication (gan.commbench, with its standard error),
   and Horovod's allreduce cost of the step's gradients (the same probe's alpha-beta fit);
3. the real N-rank step, while sampling the CPU time of every thread of every rank from /proc (grouped by
   thread name: TensorFlow's compute pools, Horovod's background loop, Gloo's I/O threads, the Python main
   thread), so that what the ranks do beyond compute and the modelled allreduce is measured, not guessed.
Prints the step decomposition and the CPU seconds per step of each thread group.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness.bench import machine_line

ROOT = Path(__file__).resolve().parents[2]
TICK = os.sysconf("SC_CLK_TCK")


def _horovodrun():
    exe = Path(sys.executable).with_name("horovodrun")
    return str(exe) if exe.exists() else "horovodrun"


def _trainer(ranks, args, metrics):
    return [_horovodrun(), "-np", str(ranks), "-H", f"localhost:{ranks}", "--gloo", sys.executable, "-m",
            "gan.train", "--variant", args.variant, "--batch-size", str(args.batch_size), "--steps",
            str(args.steps), "--warmup", str(args.warmup), "--cpus-per-rank", "1", "--metrics-out", str(metrics)]


def _threads(pids):
    """{(pid, tid): (name, cpu seconds)} of every thread of the given processes."""
    out = {}
    for pid in pids:
        for t in Path(f"/proc/{pid}/task").glob("*"):
            try:
                name = (t / "comm").read_text().strip()
                fields = (t / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            out[(pid, t.name)] = (name, (int(fields[11]) + int(fields[12])) / TICK)
    return out


def _ranks(root_pid):
    """PIDs of the gan.train processes under a horovodrun."""
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes()
            except OSError:
                continue
            if b"gan.train" in cmd and b"horovodrun" not in cmd and cmd.startswith(sys.executable.encode()):
                found.append(int(d.name))
    return found


def _steps(metrics):
    try:
        return [json.loads(line) for line in Path(metrics).read_text().splitlines() if '"event": "step"' in line]
    except OSError:
        return []


def sampled_run(ranks, args, d):
    """Run the N-rank trainer; CPU seconds per thread group over the measured steps, and the summary."""
    metrics = Path(d) / f"train-{ranks}.jsonl"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    p = subprocess.Popen(_trainer(ranks, args, metrics), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    first = last = None
    while p.poll() is None:
        steps = _steps(metrics)
        measured = [s for s in steps if not s.get("warmup")]
        pids = _ranks(p.pid)
        if measured and first is None and pids:
            first = (time.monotonic(), len(measured), _threads(pids))
        if first and pids and len(measured) < args.steps:
            last = (time.monotonic(), len(measured), _threads(pids))
        time.sleep(0.2)
    summary = json.loads(metrics.read_text().splitlines()[-1])
    cpu = collections.Counter()
    if first and last and last[1] > first[1]:
        n = last[1] - first[1]
        per_thread = {}
        for key, (name, t) in last[2].items():
            per_thread[key] = (t - first[2].get(key, (name, 0.0))[1]) / n / ranks
        # TensorFlow's pools and Horovod's background loop are all named "python": tell them apart by role.
        for (pid, tid), v in per_thread.items():
            cpu["main thread (Python, TF executor)" if str(pid) == tid else "other threads (TF pools, Horovod, Gloo)"] += v
        others = sorted((v for (pid, tid), v in per_thread.items() if str(pid) != tid), reverse=True)
        cpu["  busiest other thread"] = others[0] * ranks if others else 0.0
        cpu["  threads per rank"] = len(per_thread) / ranks
        wall = (last[0] - first[0]) / n
    else:
        wall = float("nan")
    return summary, dict(cpu), wall


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m harness.bench.step_parts", description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", default="fixed")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "results" / "benchmarks"))
    args = ap.parse_args(argv)
    line = machine_line()
    print(line, flush=True)
    with tempfile.TemporaryDirectory() as d:
        one, cpu1, _ = sampled_run(1, args, d)
        comm_out = Path(d) / "commbench.json"
        c = subprocess.run([_horovodrun(), "-np", str(args.ranks), "-H", f"localhost:{args.ranks}", "--gloo",
                            sys.executable, "-m", "gan.commbench", "--variant", args.variant, "--batch-size",
                            str(args.batch_size), "--cpus-per-rank", "1", "--metrics-out", str(comm_out)],
                           cwd=ROOT, capture_output=True, text=True)
        if c.returncode != 0:
            print(c.stdout[-2000:], c.stderr[-2000:], file=sys.stderr)
            return 1
        calib = json.loads(comm_out.read_text().splitlines()[-1])
        many, cpun, wall = sampled_run(args.ranks, args, d)
    from harness import scaling

    sizes = many["allreduce_bytes_per_step"]
    comm = sum(scaling.ring_allreduce_s(args.ranks, b, calib["bandwidth_Bps"], calib["latency_s"]) for b in sizes)
    t1, tn, busy = one["step_time_median_s"], many["step_time_median_s"], calib["compute_step_s"]
    missed = tn - busy - comm
    lines = [line, f"{args.variant} model, batch {args.batch_size}/rank, {args.ranks} ranks x 1 core, "
             f"{args.steps} measured steps (medians)",
             f"t(1) one rank alone                  {t1:8.3f} s",
             f"busy step, {args.ranks} ranks computing at once  {busy:8.3f} s (+-{calib.get('compute_step_se_s', 0):.3f} "
             f"s.e., {calib.get('compute_steps')} steps)",
             f"modelled allreduces of the step      {comm:8.3f} s ({calib['bandwidth_Bps'] / 1e6:.0f} MB/s, "
             f"{calib['latency_s'] * 1e3:.2f} ms per hop)",
             f"predicted {args.ranks}-rank step                 {busy + comm:8.3f} s",
             f"measured {args.ranks}-rank step                  {tn:8.3f} s",
             f"missed by the model                  {missed:8.3f} s ({100 * missed / tn:.0f} % of the step)",
             f"CPU seconds per step and rank, by thread group ({args.ranks} ranks; wall {wall:.3f} s per step):"]
    lines += [f"  {k:<70s} {v:7.3f}" for k, v in sorted(cpun.items(), key=lambda kv: -kv[1])]
    lines += ["CPU seconds per step, 1 rank alone, by thread group:"]
    lines += [f"  {k:<70s} {v:7.3f}" for k, v in sorted(cpu1.items(), key=lambda kv: -kv[1])]
    text = "\n".join(lines)
    print("\n".join(lines[1:]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"step-parts-{args.variant}-b{args.batch_size}-r{args.ranks}.txt").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
