"""Inference benchmark: showers per second from the trained-size generator and from the parametric simulator.

    python -m gan.infer --variant fixed --events 1000 --json

Both produce showers of the same geometry on this machine; the ratio is what a fast-simulation user asks
("how much faster than the simulation it replaces?"). Here the reference simulation is the parametric
model of gan.showers, itself much faster than Geant4, so the ratio is a lower bound on the speed-up
over full simulation. Generator weights are random unless --checkpoint is given: speed does not depend
on them.
"""
from __future__ import annotations

import argparse
import json
import sys
import time


def time_generator(variant, events, batch, checkpoint=None, threads=None):
    import tensorflow as tf

    from gan import model as gm
    from gan import validate

    if threads:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
    if checkpoint:
        g, variant = validate.load_generator(checkpoint)
    else:
        g, _ = gm.build(variant)
    s = gm.spec(variant)
    infer = tf.function(lambda z: g(z, training=False))
    z = tf.random.normal((batch, s.latent_size))
    infer(z).numpy()  # trace and warm up
    done, t0 = 0, time.perf_counter()
    while done < events:
        infer(z).numpy()
        done += batch
    return done / (time.perf_counter() - t0)


def time_simulator(variant, events, seed=0):
    from gan import showers

    geometry = "angle" if variant == "angle" else "fixed"
    list(showers.generate(geometry, min(events, 256), seed=seed))  # warm up
    t0 = time.perf_counter()
    n = sum(len(b["ECAL"]) for b in showers.generate(geometry, events, seed=seed))
    return n / (time.perf_counter() - t0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gan.infer", description=__doc__.split("\n")[0])
    ap.add_argument("--variant", choices=("fixed", "angle", "small"), default="fixed")
    ap.add_argument("--events", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads (default: all cores)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.events < 1 or args.batch_size < 1:
        ap.error("--events and --batch-size must be >= 1")
    gen = time_generator(args.variant, args.events, args.batch_size, args.checkpoint, args.threads)
    sim = time_simulator(args.variant, args.events)
    res = {"variant": args.variant, "events": args.events, "batch_size": args.batch_size,
           "generator_showers_per_s": gen, "simulator_showers_per_s": sim, "generator_over_simulator": gen / sim}
    if args.json:
        print(json.dumps(res))
    else:
        print(f"generator  {gen:10.1f} showers/s (batch {args.batch_size})\n"
              f"simulator  {sim:10.1f} showers/s (parametric, gan.showers)\n"
              f"ratio      {gen / sim:10.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
