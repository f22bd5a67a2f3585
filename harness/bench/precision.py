"""Does bf16 train the same physics? The validation metric of bf16 runs against fp32's seed-to-seed spread.

    python -m harness.bench.precision                                 # small model, 3 seeds, 400 steps
    python -m harness.bench.precision --variant fixed --seeds 1,2,3 --steps 300 --json-out p.json

For every seed and precision: a fresh GANTrainer (seeded; the same seed gives both precisions the same
initial weights up to rounding and the same data order) trains ``--steps`` batches of
simulated fixed-angle showers read from HDF5 (gan.showers, written once), then gan.validate's metrics
compare 1,000 generated showers with the reference file. bf16 passes when its mean total metric lies
within the fp32 runs' seed-to-seed range widened by nothing: min(fp32) <= mean(bf16) <= max(fp32), and
a Welch test on the totals finds no difference at the 5 % level. The step time of each run is printed too.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

from harness.bench import machine_line


def train_and_validate(variant, precision, seed, steps, batch, real_path):
    from gan import data, dist, train, validate

    trainer = train.GANTrainer(variant, dist.Single(), precision=precision, seed=seed)
    batches = iter(data.file_dataset(real_path, variant, batch_size=batch, seed=seed))
    t0 = time.perf_counter()
    for _ in range(steps):
        losses = trainer.train_step(next(batches))
    seconds = time.perf_counter() - t0
    m, _ = validate.evaluate_generator(trainer.generator, variant, real_path, limit=1000, seed=seed + 100)
    return {"variant": variant, "precision": precision, "seed": seed, "steps": steps, "batch": batch,
            "seconds": seconds, "final_losses": losses, **{k: float(v) for k, v in m.items()
                                                           if isinstance(v, (int, float))}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m harness.bench.precision", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--variant", default="small", choices=("small", "fixed"))
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--events", type=int, default=4000, help="simulated reference showers")
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args(argv)
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        ap.error("--seeds takes comma-separated integers, e.g. 1,2,3")
    precisions = args.precisions.split(",")
    bad = [p for p in precisions if p not in ("fp32", "bf16")]
    if bad:
        ap.error(f"--precisions: {', '.join(bad)} not among fp32, bf16 (fp16 needs a GPU)")
    if "fp32" not in precisions or len(seeds) < 2:
        ap.error("the comparison needs fp32 among --precisions and at least two --seeds")
    machine = machine_line()  # the fingerprint is read once, printed first and stored with the figures
    print(machine, flush=True)
    from gan import showers
    from scipy import stats

    rows = []
    with tempfile.TemporaryDirectory(prefix="cb-prec-") as tmp:
        real = os.path.join(tmp, "showers.h5")
        showers.write(real, "fixed", args.events, seed=0)
        print(f"# {args.variant} model, {args.steps} steps of batch {args.batch} on {args.events} simulated "
              f"showers; metric on 1,000 generated vs the reference", flush=True)
        print(f"{'precision':>9} {'seed':>4} {'total':>7} {'sf_mre':>7} {'shape':>7} {'moment':>7} {'s/step':>7}")
        for seed in seeds:
            for prec in precisions:
                r = train_and_validate(args.variant, prec, seed, args.steps, args.batch, real)
                rows.append(r)
                print(f"{prec:>9} {seed:>4} {r['total']:7.3f} {r['sf_mre']:7.3f} {r['shape_error']:7.3f} "
                      f"{r['moment_error']:7.3f} {r['seconds'] / args.steps:7.3f}", flush=True)
    ref = [r["total"] for r in rows if r["precision"] == "fp32"]
    verdicts = {}
    print(f"\nfp32 totals: mean {statistics.fmean(ref):.3f}, range [{min(ref):.3f}, {max(ref):.3f}], "
          f"sd {statistics.stdev(ref):.3f}")
    for prec in precisions:
        if prec == "fp32":
            continue
        tot = [r["total"] for r in rows if r["precision"] == prec]
        m = statistics.fmean(tot)
        p = float(stats.ttest_ind(tot, ref, equal_var=False).pvalue) if len(tot) > 1 else float("nan")
        within = min(ref) <= m <= max(ref)
        ok = within and not p < 0.05
        speed = (statistics.fmean(r["seconds"] for r in rows if r["precision"] == "fp32")
                 / statistics.fmean(r["seconds"] for r in rows if r["precision"] == prec))
        verdicts[prec] = {"mean_total": m, "within_fp32_range": within, "welch_p": p, "ok": ok,
                          "speed_vs_fp32": speed}
        why = [w for w, bad in (("mean outside the fp32 seed range", not within),
                                ("Welch test differs at 5 %", p < 0.05)) if bad]
        print(f"{prec} totals: mean {m:.3f} ({'within' if within else 'OUTSIDE'} the fp32 seed range), "
              f"Welch p = {p:.2f} ({'significant' if p < 0.05 else 'not significant'} at 5 %): "
              f"{'same physics' if ok else 'refused: ' + ' and '.join(why)}; training {speed:.2f}x fp32's speed")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"machine": machine, "args": vars(args), "runs": rows, "verdicts": verdicts}, f,
                      indent=1)
    return 0 if all(v["ok"] for v in verdicts.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
