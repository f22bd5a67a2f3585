"""Physics validation of generated showers against reference showers: the authors' metrics.

    python -m gan.validate --real A.h5 --fake B.h5 --json [--plots DIR]
    python -m gan.validate --real A.h5 --checkpoint CKPT_DIR --json     # generate from a trained G

Metrics (Anglegan keras/analysis: SelectEpoch.py, GANutils.metric), per primary-energy bin:
  sf_mre       mean relative error of the mean sampling fraction sum(ECAL)/Ep (the best-epoch criterion)
  shape_error  relative error of the mean normalised x, y, z profiles (cells above 1 % of the peak)
  moment_error relative error of the event-averaged first two moments along x, y, z
  angle_error  (variable angle) mean |measured angle(fake) - angle(real)| / angle(real)
  total        sum of the above. Lower is better; 0 for identical samples.
Images are compared in GeV (fixed: ECAL as stored; angle: ECAL / 50).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

ENERGY_EDGES = np.array([2.0, 50, 100, 150, 200, 250, 300, 350, 400, 450, 500.0])


def load(path, limit=None):
    """(images in GeV (N,x,y,z), Ep in GeV (N,), measured angle (N,) or None) from an authors'-layout file."""
    import h5py

    with h5py.File(path, "r") as f:
        if "ECAL" not in f:
            raise KeyError(f"{path}: no 'ECAL' dataset (found {sorted(f.keys())})")
        sl = slice(0, limit)
        ecal = np.asarray(f["ECAL"][sl], dtype=np.float64)
        if "target" in f:
            return ecal, np.asarray(f["target"][sl])[:, 1].astype(np.float64), None
        if "energy" in f:
            angle = np.asarray(f["mtheta"][sl], dtype=np.float64) if "mtheta" in f else None
            return ecal / 50.0, np.asarray(f["energy"][sl], dtype=np.float64), angle
    raise KeyError(f"{path}: neither 'target' (fixed angle) nor 'energy' (variable angle) present")


def _profiles(img):
    """Per event, the x, y, z energy profiles: list of 3 arrays (N, n_axis)."""
    return [img.sum(axis=(2, 3)), img.sum(axis=(1, 3)), img.sum(axis=(1, 2))]


def _moments(profile):
    idx = np.arange(profile.shape[1]) + 0.5
    tot = np.maximum(profile.sum(1), 1e-12)
    m1 = (profile * idx).sum(1) / tot
    m2 = (profile * (idx[None, :] - m1[:, None]) ** 2).sum(1) / tot
    return m1, m2


def _rel(a, b):
    return abs(a - b) / max(abs(b), 1e-12)


def metrics(real, ep_real, fake, ep_fake, angle_real=None, angle_fake=None, edges=ENERGY_EDGES):
    """Compare two samples (images in GeV); returns the metrics dict described in the module docstring."""
    sf_r, sf_f = real.sum(axis=(1, 2, 3)) / ep_real, fake.sum(axis=(1, 2, 3)) / ep_fake
    prof_r, prof_f = _profiles(real), _profiles(fake)
    rows = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        ir, jf = (ep_real >= lo) & (ep_real < hi), (ep_fake >= lo) & (ep_fake < hi)
        if ir.sum() < 2 or jf.sum() < 2:
            continue
        row = {"e_lo": float(lo), "e_hi": float(hi), "n_real": int(ir.sum()), "n_fake": int(jf.sum()),
               "sf_real": float(sf_r[ir].mean()), "sf_fake": float(sf_f[jf].mean())}
        row["sf_rel_error"] = _rel(row["sf_fake"], row["sf_real"])
        shape, moment = [], []
        for pr, pf in zip(prof_r, prof_f):
            mr = (pr[ir] / np.maximum(pr[ir].sum(1, keepdims=True), 1e-12)).mean(0)
            mf = (pf[jf] / np.maximum(pf[jf].sum(1, keepdims=True), 1e-12)).mean(0)
            cells = mr > 0.01 * mr.max()
            shape.append(float(np.mean(np.abs(mf[cells] - mr[cells]) / mr[cells])))
            for a, b in zip(_moments(pf[jf]), _moments(pr[ir])):
                moment.append(_rel(a.mean(), b.mean()))
        row["shape_error"] = float(np.mean(shape))
        row["moment_error"] = float(np.mean(moment))
        rows.append(row)
    if not rows:
        raise ValueError("no energy bin holds at least 2 real and 2 generated showers")
    out = {
        "sf_mre": float(np.mean([r["sf_rel_error"] for r in rows])),
        "shape_error": float(np.mean([r["shape_error"] for r in rows])),
        "moment_error": float(np.mean([r["moment_error"] for r in rows])),
    }
    if angle_real is not None and angle_fake is not None:
        out["angle_error"] = float(np.mean(np.abs(angle_fake - angle_real) / np.abs(angle_real)))
    out["total"] = float(sum(out.values()))
    out["n_real"], out["n_fake"] = int(len(real)), int(len(fake))
    out["bins"] = rows
    return out


def generate(generator, variant, ep_gev, angle=None, seed=0, batch=64):
    """Showers in GeV from a generator conditioned on Ep (and angle), as the trainer feeds it."""
    import tensorflow as tf

    from gan import model as gm

    s = gm.spec(variant)
    rng = np.random.default_rng(seed)
    out = []
    for a in range(0, len(ep_gev), batch):
        e = (ep_gev[a:a + batch] / 100.0).astype(np.float32)
        if s.conditioning == "multiply":
            z = e[:, None] * rng.standard_normal((len(e), s.latent_size)).astype(np.float32)
        else:
            noise = rng.standard_normal((len(e), s.latent_size - 2)).astype(np.float32)
            z = np.concatenate([e[:, None], angle[a:a + batch, None].astype(np.float32), noise], 1)
        img = generator(tf.constant(z), training=False).numpy()[..., 0].astype(np.float64)
        img = np.power(np.maximum(img, 0), 1.0 / s.power) / s.xscale
        out.append(img / 50.0 if variant == "angle" else img)
    return np.concatenate(out)


def evaluate_generator(generator, variant, real_path, limit=None, seed=0):
    """Metrics of a generator's showers against a reference file, same Ep (and angle) per event."""
    from gan import showers

    real, ep, angle = load(real_path, limit)
    fake = generate(generator, variant, ep, angle, seed=seed)
    angle_fake = showers.measure_angle(fake) if angle is not None else None
    return metrics(real, ep, fake, ep, angle, angle_fake), (real, ep, fake)


def load_generator(checkpoint_dir):
    from gan import model as gm

    with open(os.path.join(checkpoint_dir, "checkpoint.json")) as f:
        meta = json.load(f)
    g, _ = gm.build(meta["variant"])
    g.load_weights(os.path.join(checkpoint_dir, "generator.weights.h5"))
    return g, meta["variant"]


def plot(real, ep_real, fake, ep_fake, directory):
    """PNG plots: sampling fraction against Ep and the mean x, y, z shower shapes. Returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(directory, exist_ok=True)
    paths = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for img, ep, label in ((real, ep_real, "reference"), (fake, ep_fake, "generated")):
        sf = img.sum(axis=(1, 2, 3)) / ep
        centres, means, errs = [], [], []
        for lo, hi in zip(ENERGY_EDGES[:-1], ENERGY_EDGES[1:]):
            sel = (ep >= lo) & (ep < hi)
            if sel.sum() >= 2:
                centres.append((lo + hi) / 2)
                means.append(sf[sel].mean())
                errs.append(sf[sel].std() / np.sqrt(sel.sum()))
        ax.errorbar(centres, means, yerr=errs, marker="o", label=label)
    ax.set_xlabel("primary energy Ep [GeV]")
    ax.set_ylabel("sampling fraction sum(ECAL)/Ep")
    ax.legend()
    fig.tight_layout()
    paths.append(os.path.join(directory, "sampling_fraction.png"))
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for ax, axis, pr, pf in zip(axes, "xyz", _profiles(real), _profiles(fake)):
        for p, label in ((pr, "reference"), (pf, "generated")):
            ax.plot(np.arange(p.shape[1]), (p / np.maximum(p.sum(1, keepdims=True), 1e-12)).mean(0),
                    drawstyle="steps-mid", label=label)
        ax.set_yscale("log")
        ax.set_xlabel(f"{axis} cell" if axis != "z" else "layer (depth)")
        ax.set_ylabel("mean energy fraction")
    axes[0].legend()
    fig.tight_layout()
    paths.append(os.path.join(directory, "shower_shapes.png"))
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    return paths


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gan.validate", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--real", required=True, help="reference showers (HDF5, authors' layout)")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--fake", help="generated showers (HDF5, same layout)")
    src.add_argument("--checkpoint", help="a gan.train --checkpoint-dir to generate from")
    ap.add_argument("--limit", type=int, default=None, help="use at most N events of each file")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plots", default=None, help="directory for PNG plots")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    try:
        if args.fake:
            real, ep_r, ang_r = load(args.real, args.limit)
            fake, ep_f, ang_f = load(args.fake, args.limit)
            res = metrics(real, ep_r, fake, ep_f, ang_r, ang_f)
        else:
            generator, variant = load_generator(args.checkpoint)
            res, (real, ep_r, fake) = evaluate_generator(generator, variant, args.real, args.limit, args.seed)
            ep_f = ep_r
        if args.plots:
            res["plots"] = plot(real, ep_r, fake, ep_f, args.plots)
    except (OSError, KeyError, ValueError) as e:
        print(f"gan.validate: error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(res))
    else:
        for k in ("sf_mre", "shape_error", "moment_error", "angle_error", "total"):
            if k in res:
                print(f"{k:14s} {res[k]:.4f}")
        for p in res.get("plots", []):
            print(f"plot           {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
