"""Training data for 3DGAN: the authors' HDF5 layout, their preprocessing, sharded per Horovod rank.

Fixed-angle files (EleEscan_*.h5): ``ECAL`` (N,25,25,25) visible GeV, ``target`` (N,>=2), Ep = column 1.
Preprocessing (EcalEnergyTrain.GetprocData): cells < 1e-6 set to 0, x100; y = Ep/100; ecal = sum(x).

Variable-angle files: ``ECAL`` (N,51,51,25) in GeV x 50, ``energy``, ``mtheta`` (+ theta, eta, sum).
Preprocessing (AngleTrain3dGAN.GetDataAngle): drop events with sum <= 10; ecal = sum(x); x = x**0.85;
y = energy/100; angle = mtheta.

Every element is a dict: image (x,y,z,1) float32, energy (Ep/100), ecal, and angle for the angle variant.
"""
from __future__ import annotations

import glob
import os

import numpy as np

from gan import model as gm

CHUNK = 512  # events read from HDF5 at a time


def list_files(source):
    """Sorted HDF5 files of ``source``: a file, a directory, or a glob pattern. Raises if none."""
    if os.path.isdir(source):
        files = sorted(glob.glob(os.path.join(source, "*.h5")))
    elif any(c in source for c in "*?["):
        files = sorted(glob.glob(source))
    else:
        files = [source] if os.path.exists(source) else []
    if not files:
        raise FileNotFoundError(f"no HDF5 data at {source!r} (expected a .h5 file, a directory of them, or a glob)")
    return files


def preprocess(variant, block):
    """Turn one block of raw arrays (authors' keys) into training arrays; see the module docstring."""
    s = gm.spec(variant)
    if variant in ("fixed", "small"):
        if "ECAL" not in block or "target" not in block:
            raise KeyError("fixed-angle data needs datasets 'ECAL' and 'target' (Ep in column 1)")
        x = np.asarray(block["ECAL"], dtype=np.float32)
        x = np.where(x < 1e-6, 0.0, x) * np.float32(s.xscale)
        ep = np.asarray(block["target"], dtype=np.float32)
        ep = ep[:, 1] if ep.ndim == 2 else ep.reshape(len(x), -1)[:, 1]
        out = {"image": x[..., None], "energy": ep / 100.0, "ecal": x.sum(axis=(1, 2, 3))}
    elif variant == "angle":
        missing = {"ECAL", "energy", "mtheta"} - set(block)
        if missing:
            raise KeyError(f"variable-angle data needs datasets ECAL, energy, mtheta; missing {sorted(missing)}")
        x = np.asarray(block["ECAL"], dtype=np.float32) * np.float32(s.xscale)
        ecal = x.sum(axis=(1, 2, 3))
        keep = ecal > 10.0
        x = x[keep]
        out = {
            "image": np.power(x, np.float32(s.power))[..., None],
            "energy": np.asarray(block["energy"], dtype=np.float32)[keep] / 100.0,
            "angle": np.asarray(block["mtheta"], dtype=np.float32)[keep],
            "ecal": ecal[keep],
        }
    else:
        raise ValueError(f"unknown variant {variant!r}")
    return {k: v.astype(np.float32) for k, v in out.items()}


def _raw_keys(variant):
    return ("ECAL", "target") if variant in ("fixed", "small") else ("ECAL", "energy", "mtheta")


def shard_ranges(files, rank, size):
    """Per file, the contiguous event range [lo, hi) that ``rank`` of ``size`` reads; equal-sized shards."""
    import h5py

    ranges = []
    for f in files:
        with h5py.File(f, "r") as h:
            if "ECAL" not in h:
                raise KeyError(f"{f}: no 'ECAL' dataset (found {sorted(h.keys())})")
            n = h["ECAL"].shape[0]
        per = n // size
        if per > 0:
            ranges.append((f, rank * per, (rank + 1) * per))
    if not ranges:
        raise ValueError(f"too few events in {files} for {size} ranks")
    return ranges


def iterate_shard(files, variant, rank=0, size=1, seed=0, epochs=None):
    """Yield preprocessed single events of this rank's shard, chunk order shuffled each epoch."""
    import h5py

    ranges = shard_ranges(files, rank, size)
    chunks = [(f, a, min(a + CHUNK, hi)) for f, lo, hi in ranges for a in range(lo, hi, CHUNK)]
    epoch = 0
    while epochs is None or epoch < epochs:
        rng = np.random.default_rng([seed, rank, epoch])
        for i in rng.permutation(len(chunks)):
            f, a, b = chunks[i]
            with h5py.File(f, "r") as h:
                block = preprocess(variant, {k: h[k][a:b] for k in _raw_keys(variant)})
            for j in rng.permutation(len(block["image"])):
                yield {k: v[j] for k, v in block.items()}
        epoch += 1


def _signature(variant):
    import tensorflow as tf

    s = gm.spec(variant)
    sig = {"image": tf.TensorSpec(s.image_shape, tf.float32), "energy": tf.TensorSpec((), tf.float32),
           "ecal": tf.TensorSpec((), tf.float32)}
    if variant == "angle":
        sig["angle"] = tf.TensorSpec((), tf.float32)
    return sig


def file_dataset(source, variant, batch_size, rank=0, size=1, seed=0, shuffle_buffer=None):
    """Infinite tf.data pipeline over HDF5 files: rank's shard, shuffled, batched, prefetched."""
    import tensorflow as tf

    files = list_files(source)
    ds = tf.data.Dataset.from_generator(lambda: iterate_shard(files, variant, rank, size, seed),
                                        output_signature=_signature(variant))
    ds = ds.shuffle(shuffle_buffer or 4 * batch_size, seed=seed + rank)
    return ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def simulated_block(variant, events, seed):
    """Preprocessed arrays of ``events`` freshly simulated showers (the small model uses fixed-angle data)."""
    from gan import showers

    geometry = "angle" if variant == "angle" else "fixed"
    blocks = [preprocess(variant, b) for b in showers.generate(geometry, events, seed=seed)]
    return {k: np.concatenate([b[k] for b in blocks]) for k in blocks[0]}


def synthetic_dataset(variant, batch_size, rank=0, seed=0, pool_events=None):
    """Infinite pipeline over an in-memory pool of simulated showers (different per rank), for benchmarks."""
    import tensorflow as tf

    pool = simulated_block(variant, pool_events or max(4 * batch_size, 64), seed=[seed, rank])
    ds = tf.data.Dataset.from_tensor_slices(pool).shuffle(len(pool["image"]), seed=seed + rank).repeat()
    return ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
