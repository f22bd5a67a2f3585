"""Horovod allreduce micro-benchmark: the fleet's collective cost, as the trainer will pay it.

    horovodrun -np 2 -H a:1,b:1 --gloo python -m gan.commbench [--variant small] [--sizes ...]

Each rank averages float32 tensors of the given byte sizes through ``hvd.allreduce`` (the path
DistributedGradientTape takes), timing each call to completion. Rank 0 prints one JSON line: the median
seconds per size and an alpha-beta fit of the ring model t = 2(n-1) alpha + 2(n-1)/n x bytes / bw, which
the report uses to predict scaling efficiency. Latency alpha therefore includes Horovod's negotiation and
cycle time, not only the wire. With ``--variant`` it also times the exact tensor lists of the model's D
and G updates (``d_seconds``, ``g_seconds``) and includes them in the fit, so the fit answers for the
messages training sends, and measures ``compute_step_s``: the trainer's own step without communication
while every rank computes at once (ranks sharing a machine's caches, memory bandwidth or clocks are
slower than one rank alone), which the model uses as the compute part of an n-rank step.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


def fit(sizes, seconds, n):
    """Least-squares alpha (s per ring hop) and bandwidth (bytes/s) of t = 2(n-1) a + 2(n-1)/n x s / bw."""
    k = len(sizes)
    mx, my = sum(sizes) / k, sum(seconds) / k
    sxx = sum((x - mx) ** 2 for x in sizes)
    slope = sum((x - mx) * (y - my) for x, y in zip(sizes, seconds)) / sxx if sxx else 0.0
    intercept = my - slope * mx
    bw = (2 * (n - 1) / n) / slope if slope > 0 else float("inf")
    return max(intercept, 0.0) / (2 * (n - 1)), bw


def busy_step(tf, hvd, variant, batch, precision="fp32"):
    """Seconds of the trainer's own step (GANTrainer, no communication) while every rank computes at once:
    what a step costs before any allreduce when ranks share a machine's cores, caches, memory bandwidth
    or clocks. The slowest rank's mean over a few steps after tracing."""
    from gan.data import synthetic_dataset
    from gan.dist import Single
    from gan.train import GANTrainer

    trainer = GANTrainer(variant, Single(), precision=precision, seed=hvd.rank() + 1)
    batches = iter(synthetic_dataset(variant, batch, rank=hvd.rank(), pool_events=2 * batch))

    def run(k):
        times = []
        for _ in range(k):
            t0 = time.perf_counter()
            {name: float(v) for name, v in trainer.step(next(batches)).items()}
            times.append(time.perf_counter() - t0)
        return times

    run(1)  # trace
    # Enough steps to bound the estimate's own error (about 8 s of stepping, 5 to 30 steps); every rank the
    # same number, decided by rank 0, so that all ranks stay busy together.
    k = max(5, min(30, int(8.0 / max(run(1)[0], 1e-3))))
    k = int(hvd.broadcast_object(k, root_rank=0))
    hvd.allreduce(tf.constant(0.0), name="cb_barrier").numpy()  # start together
    times = run(k)
    mean = statistics.fmean(times)
    se = statistics.stdev(times) / len(times) ** 0.5
    slowest = max(hvd.allgather_object((mean, se)))
    return {"compute_step_s": slowest[0], "compute_step_se_s": slowest[1], "compute_steps": k}


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m gan.commbench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="4096,262144,1048576,4194304", help="message sizes in bytes")
    ap.add_argument("--iterations", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--variant", default=None, help="also time the gradient lists of this model's D and G updates")
    ap.add_argument("--metrics-out", help="also write the JSON line here (rank 0)")
    ap.add_argument("--cpus-per-rank", type=int, default=None, help="cores per rank, as the trainer pins them")
    ap.add_argument("--batch-size", type=int, default=8, help="per-rank batch of the busy-step probe")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf
    import horovod.tensorflow as hvd

    from gan.train import place

    hvd.init()
    place(hvd.local_rank(), hvd.local_size(), cpus_per_rank=args.cpus_per_rank)  # the trainer's pinning
    n = hvd.size()
    result = {"event": "commbench", "ranks": n, "sizes": sizes, "seconds": []}

    def timed(tensors):
        # One graph per message list, as DistributedGradientTape issues them: every tensor's allreduce is
        # in flight at once and Horovod fuses them.
        fn = tf.function(lambda ts: [hvd.allreduce(t, op=hvd.Average) for t in ts])
        times = []
        for i in range(args.warmup + args.iterations):
            t0 = time.perf_counter()
            [r.numpy() for r in fn(tensors)]
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
        # Ranks finish at slightly different moments; the slowest rank's median is what a step waits for.
        return max(hvd.allgather_object(statistics.median(times)))

    for size in sizes:
        result["seconds"].append(timed([tf.ones([size // 4], tf.float32)]))
    if args.variant:
        from gan import model as gm

        G, D = gm.build(args.variant)
        for name, m in (("d", D), ("g", G)):
            ts = [tf.ones(v.shape, tf.float32) for v in m.trainable_variables]
            result[f"{name}_tensors"] = len(ts)
            result[f"{name}_bytes"] = int(sum(v.shape.num_elements() * 4 for v in m.trainable_variables))
            result[f"{name}_seconds"] = timed(ts)
        if n > 1:
            result.update(busy_step(tf, hvd, args.variant, args.batch_size))
    if n > 1:
        xs = sizes + [result[k] for k in ("d_bytes", "g_bytes") if k in result]
        ys = result["seconds"] + [result[k] for k in ("d_seconds", "g_seconds") if k in result]
        result["latency_s"], result["bandwidth_Bps"] = fit(xs, ys, n)
    if hvd.rank() == 0:
        line = json.dumps(result)
        print(line, flush=True)
        if args.metrics_out:
            with open(args.metrics_out + ".part", "w") as f:
                f.write(line + "\n")
            os.replace(args.metrics_out + ".part", args.metrics_out)
    hvd.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
