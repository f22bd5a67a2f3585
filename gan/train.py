"""Data-parallel 3DGAN training with Horovod: the authors' recipe in a TF2 custom loop.

    python -m gan.train --variant small --steps 20 --warmup 5
    horovodrun -np 2 -H localhost:2 --gloo python -m gan.train --variant fixed --batch-size 8 \\
        --steps 20 --warmup 5 --metrics-out m.jsonl

Per batch (EcalEnergyTrain.py / AngleTrain3dGAN.py): one discriminator update on real showers, one on
generated showers (generator in inference mode, as Keras' predict), then two generator updates through
the discriminator (batch statistics, moving statistics frozen). Labels of D updates flip with
probability 0.05. RMSprop(lr x ranks, rho 0.9) for D and G; losses BCE + MAPE (+ MAE on the angle) with
the authors' weights. Horovod: DistributedGradientTape on every update, variables broadcast from rank 0
after the first step, BN moving statistics averaged over ranks before a checkpoint and at the end.

Output: JSON lines from rank 0 (stdout and --metrics-out): "start", one "step" per step, "summary" last.
Warm-up steps are excluded from the timing figures.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import socket
import statistics
import sys
import time

import tensorflow as tf

from gan import dist as gdist
from gan import model as gm

PRECISIONS = {"fp32": "float32", "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m gan.train", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--variant", choices=gm.VARIANTS, default="fixed")
    ap.add_argument("--batch-size", type=int, default=None, help="per rank (default: the variant's recipe)")
    ap.add_argument("--steps", type=int, default=20, help="measured steps after warm-up")
    ap.add_argument("--warmup", type=int, default=5, help="steps run first and excluded from timing")
    ap.add_argument("--data", default="synthetic",
                    help="'synthetic' (simulated showers held in memory) or an HDF5 file, directory or glob")
    ap.add_argument("--data-shard", choices=("global", "local"), default="global",
                    help="global: every rank reads its share of every file; local: each node holds its own files "
                         "(staged from object storage) and its ranks share them")
    ap.add_argument("--lr", type=float, default=0.001, help="base learning rate, multiplied by the ranks")
    ap.add_argument("--loss-weights", default=None, help="comma list, one per D head (default: the authors')")
    ap.add_argument("--precision", choices=sorted(PRECISIONS) + ["auto"], default="fp32",
                    help="auto: bf16 where it was measured to pay and to train the same physics on that kind of "
                         "machine (see BF16_PHYSICS: AMD Zen 4 for now), else fp32; the start record says which and "
                         "why")
    ap.add_argument("--xla", action="store_true", help="jit-compile the step (slow for Conv3D on CPUs)")
    ap.add_argument("--bn", choices=("fused", "keras2"), default="keras2",
                    help="batch norm in training mode: one fused kernel, or moments + normalisation ops (the same "
                         "results; see gan.model.Keras2BatchNorm)")
    ap.add_argument("--layers", choices=("fast", "keras"), default="fast",
                    help="fast: UpSampling3D, Dropout and pad-then-convolve in fewer kernels, same functions; "
                         "keras: Keras' own layers (for comparison)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads per rank (default cores/ranks)")
    ap.add_argument("--no-pin", action="store_true", help="do not pin each local rank to its own cores")
    ap.add_argument("--cpus-per-rank", type=int, default=None, help="cores per local rank (default cores/ranks)")
    ap.add_argument("--no-horovod", action="store_true", help="one process even if Horovod is installed")
    ap.add_argument("--checkpoint-dir", default=None, help="rank 0 writes generator/discriminator weights here")
    ap.add_argument("--checkpoint-every", type=int, default=0, help="also every N steps (0: only at the end)")
    ap.add_argument("--metrics-out", default=None, help="JSON lines file (rank 0)")
    ap.add_argument("--mllog", default=None, help="MLLOG file (needs the mlperf-logging package)")
    ap.add_argument("--dump-weights", default=None, help="every rank writes weights-rank<R>.npz here (tests)")
    args = ap.parse_args(argv)
    if args.batch_size is None:
        args.batch_size = gm.spec(args.variant).default_batch
    for name in ("batch_size", "steps"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        ap.error(f"--warmup must be >= 0, got {args.warmup}")
    n_heads = 4 if args.variant == "angle" else 3
    if args.loss_weights is None:
        args.loss_weights = gm.spec(args.variant).loss_weights
    else:
        try:
            args.loss_weights = tuple(float(w) for w in args.loss_weights.split(","))
        except ValueError:
            ap.error(f"--loss-weights must be {n_heads} comma-separated numbers, got {args.loss_weights!r}")
        if len(args.loss_weights) != n_heads:
            ap.error(f"--loss-weights needs {n_heads} values for variant {args.variant}, got {len(args.loss_weights)}")
    return args


# ------------------------------------------------------------------------------------- placement
def place(local_rank, local_size, threads=None, pin=True, cpus_per_rank=None):
    """Pin this rank to its share of the cores and size TF's thread pools; returns (cpus, intra_threads).

    Must run before TensorFlow executes its first op. With 2 cores and 2 ranks each rank gets one core
    and one intra-op thread, so ranks do not fight for cores and scaling figures mean something.
    ``cpus_per_rank`` overrides the share (e.g. 1 to measure a one-core baseline).
    """
    cpus = sorted(os.sched_getaffinity(0))
    share = cpus_per_rank or max(1, len(cpus) // max(1, local_size))
    if cpus_per_rank and cpus_per_rank * local_size > len(cpus):
        raise ValueError(f"--cpus-per-rank {cpus_per_rank} x {local_size} local ranks needs "
                         f"{cpus_per_rank * local_size} cores; this host offers {len(cpus)}")
    mine = cpus
    if pin and share * local_size <= len(cpus):
        mine = cpus[local_rank * share:(local_rank + 1) * share]
        for tid in os.listdir("/proc/self/task"):
            try:
                os.sched_setaffinity(int(tid), mine)
            except OSError:
                pass
    intra = threads or share
    os.environ.setdefault("OMP_NUM_THREADS", str(intra))
    tf.config.threading.set_intra_op_parallelism_threads(intra)
    tf.config.threading.set_inter_op_parallelism_threads(1 if intra <= 2 else 2)
    return mine, intra


def select_device(local_rank):
    """One GPU per local rank (memory growth on), or the CPU. Returns a label for the results."""
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return "cpu"
    gpu = gpus[local_rank % len(gpus)]
    tf.config.set_visible_devices(gpu, "GPU")
    tf.config.experimental.set_memory_growth(gpu, True)
    details = tf.config.experimental.get_device_details(gpu)
    return f"gpu:{details.get('device_name', gpu.name)}"


# Does bf16 train the same physics as fp32? harness.bench.precision's verdicts (small model, 400 steps of batch
# 16; bf16's mean total metric within fp32's seed range and a Welch test not significant at 5 %), by the kind of
# machine they were measured on; auto picks bf16 only where the check passed and bf16 was measured to pay. A kind
# without a verdict (GPUs, for now) gets fp32. The physics' edges are in float32 in both (gm._edge).
BF16_PHYSICS = {
    "amd_avx512_bf16": (True, "6 seeds on a Zen 4 EPYC: total 13.50 within fp32's 12.87-14.39, Welch p = 0.73"),
    "amx": (False, "3 seeds on an AMX Xeon: total 13.33 outside fp32's 12.22-13.08, Welch p = 0.10"),
}


def _bf16_if_same_physics(kind, pays, otherwise=""):
    passed, how = BF16_PHYSICS.get(kind, (False, None))
    if passed:
        return "bf16", f"{pays}; it passed the physics check ({how}; harness.bench.precision)"
    why = f"its physics check failed ({how})" if how else "its physics has not been checked on this kind of machine"
    return "fp32", f"{pays}, but bf16 is refused: {why}; see harness.bench.precision{otherwise}"


def choose_precision(device, cpu_flags=(), gpu_capability=None, cpu_vendor=None):
    """(precision, reason) for --precision auto, from what was measured (docs/trainer.md#precision).
    cpu_vendor is /proc/cpuinfo's vendor_id: AVX512-BF16 without AMX paid on AMD's Zen 4, not on Intel."""
    if device.startswith("gpu"):
        if gpu_capability and tuple(gpu_capability) >= (8, 0):
            cc = f"{gpu_capability[0]}.{gpu_capability[1]}"
            return _bf16_if_same_physics("gpu", f"GPU compute capability {cc} has bf16 tensor cores",
                                         "; fp32 runs as TF32 on its tensor cores")
        return "fp32", "GPU older than Ampere: no bf16 tensor cores (fp16 with loss scaling is --precision fp16)"
    flags = set(cpu_flags)
    if "amx_bf16" in flags:
        return _bf16_if_same_physics("amx", "CPU has AMX-BF16: bf16 measured 1.73x fp32 samples/s on a 2-core Xeon "
                                            "(with the physics' edges in float32)")
    if "avx512_bf16" in flags and cpu_vendor == "AuthenticAMD":
        return _bf16_if_same_physics("amd_avx512_bf16", "AMD CPU with AVX512-BF16: bf16 measured 1.43x [1.21, 1.68] "
                                                        "fp32 samples/s on a 2-core Zen 4 EPYC")
    if "avx512_bf16" in flags:
        return "fp32", ("CPU has AVX512-BF16 but no AMX: bf16 measured 0.73-0.77x fp32 on a 2-core Intel Xeon "
                        "(casts and element-wise ops cost more than the convolutions gain)")
    return "fp32", "CPU has no bf16 instructions"


# ------------------------------------------------------------------------------------------ losses
# Keras' definitions, computed in float32 whatever the mixed-precision policy.
def bce(y, p):
    """Keras binary_crossentropy: probabilities clipped to [1e-7, 1 - 1e-7]."""
    p = tf.clip_by_value(tf.cast(p, tf.float32), 1e-7, 1.0 - 1e-7)
    return -tf.reduce_mean(y * tf.math.log(p) + (1.0 - y) * tf.math.log(1.0 - p))


def mape(y, yhat):
    """Keras mean_absolute_percentage_error, in percent (denominator clipped at 1e-7)."""
    y = tf.cast(y, tf.float32)
    return 100.0 * tf.reduce_mean(tf.abs(y - tf.cast(yhat, tf.float32)) / tf.maximum(tf.abs(y), 1e-7))


def mae(y, yhat):
    return tf.reduce_mean(tf.abs(tf.cast(y, tf.float32) - tf.cast(yhat, tf.float32)))


def ecal_fit(ep_over_100, xscale=100.0):
    """GetEcalFit mod 1: expected ECAL sum of scaled images for Ep/100 (Geant4 sampling-fraction fit)."""
    e = ep_over_100
    poly = (((0.0018 * e - 0.023) * e + 0.11) * e - 0.28) * e + 2.21
    return tf.cast(poly * e * xscale, tf.float32)


class GANTrainer:
    """Holds G, D, optimisers and the compiled step; knows nothing of files or launchers."""

    def __init__(self, variant, engine, lr=0.001, loss_weights=None, precision="fp32", xla=False, seed=1):
        self.variant = variant
        self.spec = gm.spec(variant)
        self.engine = engine
        self.weights = tuple(loss_weights or self.spec.loss_weights)
        tf.keras.mixed_precision.set_global_policy(PRECISIONS[precision])
        tf.keras.utils.set_random_seed(seed * 7919 + engine.rank)  # ranks start apart: broadcast matters
        self.generator, self.discriminator = gm.build(variant)
        lr = lr * engine.size
        self.opt_d = tf.keras.optimizers.RMSprop(lr, rho=0.9, epsilon=1e-7, jit_compile=False)
        self.opt_g = tf.keras.optimizers.RMSprop(lr, rho=0.9, epsilon=1e-7, jit_compile=False)
        self.loss_scale = precision == "fp16"
        if self.loss_scale:
            self.opt_d = tf.keras.mixed_precision.LossScaleOptimizer(self.opt_d)
            self.opt_g = tf.keras.mixed_precision.LossScaleOptimizer(self.opt_g)
        self.rng = tf.random.Generator.from_seed(seed * 104729 + engine.rank)
        self.step = tf.function(self._step, jit_compile=xla)
        self.steps_done = 0

    # -- one batch ------------------------------------------------------------------------------
    def _flip(self, value, n):
        flip = self.rng.uniform((n,)) < 0.05
        labels = tf.fill((n,), float(value))
        return tf.where(flip, 1.0 - labels, labels)

    def _losses(self, outs, targets):
        """Weighted total and per-head losses: BCE, MAPE(energy), [MAE(angle)], MAPE(ecal)."""
        fns = [bce, mape] + ([mae] if self.variant == "angle" else []) + [mape]
        parts = [fn(t, o[:, 0]) for fn, o, t in zip(fns, outs, targets)]
        return sum(w * p for w, p in zip(self.weights, parts)), parts

    def _update(self, model, opt, tape_fn):
        with tf.GradientTape() as tape:
            total, parts = tape_fn()
            scaled = opt.get_scaled_loss(total) if self.loss_scale else total
        tape = self.engine.tape(tape)
        grads = tape.gradient(scaled, model.trainable_variables)
        if self.loss_scale:
            grads = opt.get_unscaled_gradients(grads)
        opt.apply_gradients(zip(grads, model.trainable_variables))
        return total

    def _latent(self, energy, angle, n):
        if self.spec.conditioning == "multiply":
            return energy[:, None] * self.rng.normal((n, self.spec.latent_size))
        noise = self.rng.normal((n, self.spec.latent_size - 2))
        return tf.concat([energy[:, None], angle[:, None], noise], axis=1)

    def _conditions(self, energy, angle, ecal, n):
        """Conditioning energies for G and D's targets after the real/fake label.

        Fixed angle: fresh Ep'/100 ~ U(0.1, 5) (10-500 GeV) and the Geant4 ECAL-sum fit for it.
        Variable angle: the real batch's Ep, angle and ECAL sum (the authors' AngleTrain3dGAN).
        """
        if self.spec.conditioning == "multiply":
            e = self.rng.uniform((n,), 0.1, 5.0)
            return e, [e, ecal_fit(e, self.spec.xscale)]
        return energy, [energy, angle, ecal]

    def _step(self, batch):
        G, D = self.generator, self.discriminator
        images, energy, ecal = batch["image"], batch["energy"], batch["ecal"]
        angle = batch.get("angle")
        n = tf.shape(images)[0]
        angle_t = [angle] if angle is not None else []

        # D on real showers.
        loss_real = self._update(D, self.opt_d, lambda: self._losses(
            D(images, training=True), [self._flip(1, n), energy] + angle_t + [ecal]))

        # D on generated showers; G runs in inference mode (Keras' generator.predict).
        e_fake, fake_targets = self._conditions(energy, angle, ecal, n)
        fakes = G(self._latent(e_fake, angle, n), training=False)
        loss_fake = self._update(D, self.opt_d, lambda: self._losses(
            D(fakes, training=True), [self._flip(0, n)] + fake_targets))

        # Two G updates through D: D in training mode (batch statistics) with frozen moving statistics.
        loss_g = []
        with gm.frozen_batchnorm(D):
            for _ in range(2):
                e_g, g_targets = self._conditions(energy, angle, ecal, n)
                z = self._latent(e_g, angle, n)
                loss_g.append(self._update(G, self.opt_g, lambda: self._losses(
                    D(G(z, training=True), training=True), [tf.ones((n,))] + g_targets)))
        return {"loss_d_real": loss_real, "loss_d_fake": loss_fake, "loss_g": (loss_g[0] + loss_g[1]) / 2.0}

    # -- around the step --------------------------------------------------------------------------
    def train_step(self, batch):
        losses = self.step(batch)
        self.steps_done += 1
        if self.steps_done == 1:
            # Ranks started from different weights; rank 0's weights and optimiser state win.
            self.engine.broadcast_variables(self.all_variables())
        return {k: float(v) for k, v in losses.items()}

    def all_variables(self):
        return (self.generator.variables + self.discriminator.variables
                + self.opt_d.variables + self.opt_g.variables)

    def sync_statistics(self):
        """Average the BN moving statistics (not covered by gradient averaging) over ranks."""
        self.engine.average_variables([v for m in (self.generator, self.discriminator)
                                       for v in m.non_trainable_variables])

    @staticmethod
    def gradient_bytes(model):
        return int(sum(v.shape.num_elements() * v.dtype.size for v in model.trainable_variables))

    def digest(self):
        h = hashlib.sha256()
        for v in self.generator.variables + self.discriminator.variables:
            h.update(v.numpy().tobytes())
        return h.hexdigest()[:16]

    def save(self, directory, extra=None):
        os.makedirs(directory, exist_ok=True)
        for name, m in (("generator", self.generator), ("discriminator", self.discriminator)):
            tmp = os.path.join(directory, f".{name}.weights.h5")
            m.save_weights(tmp)
            os.replace(tmp, os.path.join(directory, f"{name}.weights.h5"))
        meta = {"variant": self.variant, "steps": self.steps_done, **(extra or {})}
        _write_atomic(os.path.join(directory, "checkpoint.json"), json.dumps(meta, indent=1))


def _write_atomic(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


class Emitter:
    """Rank 0's JSON-lines output to stdout and the metrics file (line-buffered, flushed per record)."""

    def __init__(self, rank, path=None):
        self.on = rank == 0
        self.file = None
        if self.on and path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self.file = open(path, "w", buffering=1)

    def __call__(self, record):
        if not self.on:
            return
        line = json.dumps(record, default=str)
        print(line, flush=True)
        if self.file:
            self.file.write(line + "\n")
            self.file.flush()

    def close(self):
        if self.file:
            self.file.close()


def make_dataset(args, engine, device="cpu"):
    from gan import data

    if args.data == "synthetic":
        ds = data.synthetic_dataset(args.variant, args.batch_size, rank=engine.rank, seed=args.seed)
    else:
        rank, size = (engine.local_rank, engine.local_size) if args.data_shard == "local" else (engine.rank,
                                                                                                 engine.size)
        ds = data.file_dataset(args.data, args.variant, args.batch_size, rank=rank, size=size, seed=args.seed)
    return to_device(ds, device)


def to_device(ds, device, target="/GPU:0"):
    """On a GPU, batches are copied to it ahead of the step that needs them (``target``: the rank's only
    visible GPU). On a CPU the pipeline's own prefetch already runs ahead."""
    if device.startswith("gpu"):
        return ds.apply(tf.data.experimental.prefetch_to_device(target, buffer_size=2))
    return ds


def gpu_peak(device, precision):
    """(datasheet peak FLOP/s of this rank's GPU at ``precision``, basis) or (None, why)."""
    from gan import sysinfo

    if not device.startswith("gpu"):
        return None, "not a GPU"
    return sysinfo.gpu_datasheet_peak(device.split(":", 1)[1], precision,
                                      tf32=tf.config.experimental.tensor_float_32_execution_enabled())


def _mllogger(path, rank):
    if not path or rank != 0:
        return None
    from mlperf_logging import mllog

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    mllog.config(filename=path)
    return mllog.get_mllogger()


def run(args, hold=None) -> dict:
    """Train as ``args`` say; returns the summary. ``hold`` receives the TF objects (to outlive the call)."""
    local_rank, local_size = gdist.local_position()
    node_cores = len(os.sched_getaffinity(0))  # the node's, before this rank pins itself to its share
    cpus, intra = place(local_rank, local_size, args.threads, pin=not args.no_pin, cpus_per_rank=args.cpus_per_rank)
    engine = gdist.init(use_horovod=not args.no_horovod)
    device = select_device(engine.local_rank)
    precision_reason = None
    if args.precision == "auto":
        capability = None
        if device.startswith("gpu"):
            gpu = tf.config.get_visible_devices("GPU")[0]
            capability = tf.config.experimental.get_device_details(gpu).get("compute_capability")
        from gan import sysinfo

        cpu = sysinfo.cpu()  # the fingerprint's reading of the CPU: its ISA flags and vendor
        args.precision, precision_reason = choose_precision(device, cpu["isa"], capability, cpu["vendor"])
    if args.precision == "fp16" and device == "cpu":
        raise ValueError("--precision fp16 needs a GPU (TensorFlow has no float16 Conv3D/AvgPool3D kernels "
                         "for CPUs); use --precision bf16 on CPUs")

    emit = Emitter(engine.rank, args.metrics_out)
    ml = _mllogger(args.mllog, engine.rank)
    if ml:
        ml.event(key=ml_const("SUBMISSION_BENCHMARK"), value="3dgan")
        ml.event(key=ml_const("GLOBAL_BATCH_SIZE"), value=args.batch_size * engine.size)
        ml.event(key=ml_const("OPT_NAME"), value="rmsprop")
        ml.event(key=ml_const("OPT_BASE_LR"), value=args.lr * engine.size)
        ml.start(key=ml_const("INIT_START"))
    gm.Keras2BatchNorm.fused = args.bn == "fused"
    gm.LAYERS = args.layers
    trainer = GANTrainer(args.variant, engine, lr=args.lr, loss_weights=args.loss_weights,
                         precision=args.precision, xla=args.xla, seed=args.seed)
    flops = gm.training_flops_per_sample(trainer.generator, trainer.discriminator)
    # A launcher may name the node (Slurm's node name when several slurmd share a machine).
    node = os.environ.get("CLOUDBENCH_NODE_NAME") or socket.gethostname()
    hosts = engine.allgather_object({"rank": engine.rank, "host": node, "cpus": cpus,
                                     "device": device})
    # The machine behind the figures: each node's fingerprint, taken on the node by its first local rank.
    from gan import sysinfo

    prints = engine.allgather_object((node, sysinfo.collect(cores_visible=node_cores))
                                     if engine.local_rank == 0 else None)
    fingerprints = dict(p for p in prints if p)
    emit({"event": "start", "variant": args.variant, "ranks": engine.size, "batch_size_per_rank": args.batch_size,
          "steps": args.steps, "warmup": args.warmup, "data": args.data, "precision": args.precision,
          **({"precision_auto": precision_reason} if precision_reason else {}),
          "xla": args.xla, "engine": engine.name, "ranks_placement": hosts})
    ds = iter(make_dataset(args, engine, device))
    if hold:
        hold((trainer, ds))
    if ml:
        ml.end(key=ml_const("INIT_STOP"))
        ml.start(key=ml_const("RUN_START"))
    times, last = [], {}
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        batch = next(ds)
        last = trainer.train_step(batch)
        dt = time.perf_counter() - t0
        measured = i >= args.warmup
        if measured:
            times.append(dt)
        emit({"event": "step", "step": i + 1, "warmup": not measured, "time_s": round(dt, 6), **last})
        if not all(math.isfinite(v) for v in last.values()):
            raise FloatingPointError(f"non-finite loss at step {i + 1}: {last}")
        if args.checkpoint_dir and args.checkpoint_every and (i + 1) % args.checkpoint_every == 0:
            trainer.sync_statistics()
            if engine.rank == 0:
                trainer.save(args.checkpoint_dir)
    trainer.sync_statistics()
    digests = engine.allgather_object(trainer.digest())
    if args.dump_weights:
        _dump_weights(trainer, args.dump_weights, engine.rank)
    if args.checkpoint_dir and engine.rank == 0:
        trainer.save(args.checkpoint_dir, {"lr": args.lr, "ranks": engine.size, "seed": args.seed})

    total = sum(times)
    thr = engine.size * args.batch_size * len(times) / total
    summary = {
        "event": "summary",
        "samples_per_s": thr,
        "samples_per_s_per_rank": thr / engine.size,
        "step_time_mean_s": statistics.fmean(times),
        "step_time_std_s": statistics.stdev(times) if len(times) > 1 else 0.0,
        "step_time_median_s": statistics.median(times),
        "steps": len(times),
        "warmup": args.warmup,
        "ranks": engine.size,
        "batch_size_per_rank": args.batch_size,
        "global_batch_size": args.batch_size * engine.size,
        "learning_rate": args.lr * engine.size,
        "variant": args.variant,
        "flops_per_sample": flops,
        # Gradient bytes each allreduce of a step carries: D (real), D (fake), G, G.
        "allreduce_bytes_per_step": [trainer.gradient_bytes(trainer.discriminator)] * 2
                                    + [trainer.gradient_bytes(trainer.generator)] * 2,
        "achieved_flops_per_s": thr * flops,
        **_gpu_mfu(device, args.precision, thr / engine.size * flops),
        "precision": args.precision, "bn": args.bn, "layers": args.layers,
        "xla": args.xla,
        "intra_op_threads": intra,
        "cpus_per_rank": len(cpus),
        "data": args.data,
        "engine": engine.name,
        "tf_version": tf.__version__,
        "horovod_version": engine.version,
        "python_version": platform.python_version(),
        "device": device,
        "hosts": sorted({h["host"] for h in hosts}),
        "ranks_placement": hosts,
        "fingerprints": fingerprints,
        "weights_digest": digests,
        "weights_identical": len(set(digests)) == 1,
        "final_losses": last,
    }
    if ml:
        ml.event(key="tracked_stats", value={"throughput": thr}, metadata={"step": args.warmup + args.steps})
        ml.end(key=ml_const("RUN_STOP"), metadata={"status": "success"})
    emit(summary)
    emit.close()
    return summary


def _gpu_mfu(device, precision, flops_per_s_per_gpu):
    """MFU of one GPU (each rank has one) against its datasheet peak, where the device is a known GPU."""
    peak, basis = gpu_peak(device, precision)
    if peak is None:
        return {} if not device.startswith("gpu") else {"datasheet_peak_basis": basis}
    return {"datasheet_peak_flops": peak, "datasheet_peak_basis": basis,
            "mfu_datasheet": flops_per_s_per_gpu / peak}


def ml_const(name):
    from mlperf_logging.mllog import constants

    return getattr(constants, name)


def _fast_exit():
    """Leave without destroying the trained model's traced graphs, which takes ~10 s for the full model on
    one core; everything the run produces is written and flushed by now. Horovod is shut down first."""
    try:
        import horovod.tensorflow as hvd

        if hvd.is_initialized():
            hvd.shutdown()
    except ImportError:
        pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _dump_weights(trainer, directory, rank):
    import numpy as np

    os.makedirs(directory, exist_ok=True)
    arrays = {f"{m.name}/{i}:{v.name}": v.numpy() for m in (trainer.generator, trainer.discriminator)
              for i, v in enumerate(m.variables)}
    np.savez(os.path.join(directory, f"weights-rank{rank}.npz"), **arrays)


def main(argv=None) -> int:
    args = parse_args(argv)
    held = []  # the trainer and dataset stay alive until _fast_exit: see there
    try:
        run(args, hold=held.append)
        _fast_exit()
    except (FileNotFoundError, KeyError, ValueError, FloatingPointError, RuntimeError) as e:
        print(f"gan.train: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # Records already written are whole lines; checkpoints are replaced atomically.
        print("gan.train: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
