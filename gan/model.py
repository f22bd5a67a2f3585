"""The 3DGAN generator and discriminator, layer for layer as CERN openlab's Keras code.

Variants:
  fixed  EcalEnergyGan (svalleco/3Dgan@Energy-gan:keras/EcalEnergyGan.py): 25x25x25x1 images, latent 200,
         multiplicative conditioning (Ep/100 * noise); D heads: real/fake, Ep/100, ECAL sum.
  angle  AngleArch3dGAN (svalleco/3Dgan@Anglegan:keras/AngleArch3dGAN.py): 51x51x25x1 images, latent 256 =
         [Ep/100, angle, 254 noise]; D heads: real/fake, Ep/100, analytic angle, ECAL sum.
  small  NOT a physics model: a reduced fixed-geometry (25^3) GAN with the same heads and losses, for fast
         tests and CI only. Never report its figures as 3DGAN figures.

Keras-2 semantics kept on purpose: LeakyReLU slope 0.3, BatchNormalization momentum 0.99 (eps 1e-3 fixed,
1e-6 angle), and BN under a frozen discriminator: the generator update runs D with batch statistics (Keras'
learning phase 1) but leaves D's moving statistics untouched (a frozen Keras-2 model runs no updates).
TF2's own BatchNormalization would switch to inference mode instead; see ``Keras2BatchNorm``.

``python -m gan.model --variant fixed --json`` prints parameter counts and the training FLOPs per sample.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from dataclasses import dataclass

import tensorflow as tf

L = tf.keras.layers

# "fast": the same functions computed with fewer kernels, or in a form Grappler can optimise (UpSampling3D,
# Dropout, pad-then-convolve, LeakyReLU, ZeroPadding3D; see each);
# "keras": Keras' own layers, for comparison. Read when a model is built; set by the trainer (--layers).
LAYERS = "fast"

VARIANTS = ("fixed", "angle", "small")


def _edge():
    """Under a mixed-precision policy (bf16, fp16): float32 for the layers at the physics' edges, G's
    energy-conditioned first Dense and its last convolution, which writes the cell energies, and D's first
    convolution, which reads them. With them in bf16 the small model's sampling-fraction error doubled
    (docs/trainer.md#precision). Weights are float32 under every policy, so checkpoints load across."""
    return {"dtype": "float32"} if tf.keras.mixed_precision.global_policy().compute_dtype != "float32" else {}


@dataclass(frozen=True)
class VariantSpec:
    """Shapes and training constants of one model variant (from the authors' training scripts)."""

    name: str
    image_shape: tuple  # (x, y, z, 1)
    latent_size: int
    conditioning: str  # "multiply" (fixed) or "concat" (angle)
    power: float  # image = ECAL**power after scaling (angle model: 0.85)
    xscale: float  # image = ECAL_GeV * xscale (fixed: 100)
    loss_weights: tuple  # per D head, in head order
    default_batch: int


SPECS = {
    "fixed": VariantSpec("fixed", (25, 25, 25, 1), 200, "multiply", 1.0, 100.0, (2.0, 0.1, 0.1), 128),
    "angle": VariantSpec("angle", (51, 51, 25, 1), 256, "concat", 0.85, 1.0, (3.0, 0.1, 25.0, 0.1), 64),
    "small": VariantSpec("small", (25, 25, 25, 1), 200, "multiply", 1.0, 100.0, (2.0, 0.1, 0.1), 8),
}


def spec(variant: str) -> VariantSpec:
    try:
        return SPECS[variant]
    except KeyError:
        raise ValueError(f"unknown model variant {variant!r}; expected one of {', '.join(VARIANTS)}") from None


class Keras2BatchNorm(L.Layer):
    """BatchNormalization with Keras-2 semantics under a frozen model.

    training=True: normalise with batch statistics; update the moving statistics unless the layer is
    frozen (``frozen_batchnorm``). training=False: moving statistics. Statistics are computed in float32
    also under a mixed-precision policy.
    """

    def __init__(self, momentum=0.99, epsilon=1e-3, **kwargs):
        super().__init__(**kwargs)
        self.momentum = momentum
        self.epsilon = epsilon
        self.frozen = False  # read at trace time: a traced G step never updates D's statistics

    def build(self, input_shape):
        c = int(input_shape[-1])
        self.gamma = self.add_weight(name="gamma", shape=(c,), initializer="ones", dtype=tf.float32)
        self.beta = self.add_weight(name="beta", shape=(c,), initializer="zeros", dtype=tf.float32)
        self.moving_mean = self.add_weight(name="moving_mean", shape=(c,), initializer="zeros",
                                           trainable=False, dtype=tf.float32)
        self.moving_variance = self.add_weight(name="moving_variance", shape=(c,), initializer="ones",
                                               trainable=False, dtype=tf.float32)
        super().build(input_shape)

    # One FusedBatchNormV3 kernel (oneDNN's where TensorFlow uses it) for training-mode normalisation, instead
    # of moments + batch_normalization (about ten element-wise passes forward and more backward). Set by the
    # trainer (--bn); results equal the unfused path to float32 rounding (tests/test_model.py).
    fused = False

    def call(self, x, training=None):
        in_dtype = x.dtype
        x32 = tf.cast(x, tf.float32)
        if training and self.fused and len(x.shape) == 5:
            y, mean, var = tf.compat.v1.nn.fused_batch_norm(
                x32, tf.cast(self.gamma, tf.float32), tf.cast(self.beta, tf.float32), epsilon=self.epsilon,
                data_format="NDHWC", is_training=True)
            if not self.frozen:
                # The kernel's variance carries Bessel's correction; Keras 2 (moments) kept the biased one.
                n = tf.cast(tf.size(x32) // tf.shape(x32)[-1], tf.float32)
                var = var * (n - 1.0) / n
                m = self.momentum
                self.moving_mean.assign(tf.cast(self.moving_mean, tf.float32) * m + mean * (1.0 - m))
                self.moving_variance.assign(tf.cast(self.moving_variance, tf.float32) * m + var * (1.0 - m))
            return tf.cast(y, in_dtype)
        if training:
            axes = list(range(len(x.shape) - 1))
            mean, var = tf.nn.moments(x32, axes=axes)
            if not self.frozen:
                m = self.momentum
                self.moving_mean.assign(tf.cast(self.moving_mean, tf.float32) * m + mean * (1.0 - m))
                self.moving_variance.assign(tf.cast(self.moving_variance, tf.float32) * m + var * (1.0 - m))
        else:
            mean, var = tf.cast(self.moving_mean, tf.float32), tf.cast(self.moving_variance, tf.float32)
        # Under a mixed policy Keras hands variables out in the compute dtype: cast back to float32.
        y = tf.nn.batch_normalization(x32, mean, var, tf.cast(self.beta, tf.float32),
                                      tf.cast(self.gamma, tf.float32), self.epsilon)
        return tf.cast(y, in_dtype)

    def get_config(self):
        return {**super().get_config(), "momentum": self.momentum, "epsilon": self.epsilon}


class UpSampling3D(L.UpSampling3D):
    """Keras' UpSampling3D (nearest neighbour: every voxel repeated size[i] times along axis i), computed as one
    broadcast per axis instead of Keras' repeat_elements, which splits the tensor into one slice per voxel
    plane and concatenates the repeats for each axis in turn (and, backward, a Slice and an AddN per repeated
    plane: hundreds of small kernels per step). Same output values; the gradient sums the same repeats. Config,
    name (the class name is Keras') and weights (none) as Keras' layer, so checkpoints are interchangeable."""

    def call(self, inputs):
        if self.data_format != "channels_last" or None in inputs.shape[1:]:
            return super().call(inputs)
        x, dims = inputs, list(inputs.shape[1:])  # one axis at a time: TensorFlow broadcasts up to rank 5
        for axis, f in enumerate(self.size):
            if f == 1:
                continue
            outer = math.prod(dims[:axis])
            inner = math.prod(dims[axis + 1:])
            x = tf.reshape(x, [-1, outer * dims[axis], 1, inner])
            x = tf.broadcast_to(x, [tf.shape(x)[0], outer * dims[axis], f, inner])
            dims[axis] *= f
        return tf.reshape(x, [-1, *dims])


class Dropout(L.Dropout):
    """Keras' Dropout (each element kept with probability 1 - rate and scaled by 1 / (1 - rate)) with one
    element-wise pass less each way: the kept elements' scale is drawn as one mask (0 or 1 / (1 - rate)) that
    multiplies the input forward and the gradient backward, where tf.nn.dropout scales, then selects, and
    selects and scales again backward. The uniform draw is float32 under every policy (a bfloat16 draw
    holds 8 bits: rate 0.2 would not be 0.2)."""

    def call(self, inputs, training=None):
        if training is not True or self.noise_shape is not None or not 0 < self.rate < 1:
            return super().call(inputs, training=training)
        keep = tf.random.uniform(tf.shape(inputs), dtype=tf.float32) >= self.rate
        scale = tf.where(keep, tf.constant(1.0 / (1.0 - self.rate), inputs.dtype), tf.zeros((), inputs.dtype))
        return inputs * scale


class LeakyReLU(L.LeakyReLU):
    """Keras' LeakyReLU with its gradient taken from the output instead of the input: for a positive slope the
    output has the input's sign, so LeakyReluGrad(dy, y) is LeakyReluGrad(dy, x), bit for bit. The input is
    then needed by nothing but this layer, which lets Grappler fuse Conv3D + BiasAdd + LeakyRelu into one oneDNN
    convolution. With Keras' layer the backward pass reads the BiasAdd output, and TensorFlow 2.15's remapper,
    which fuses regardless, fails ("fanout ... LeakyReluGrad exist for missing node BiasAdd"), dropping every
    remapper rewrite of the step."""

    def call(self, inputs):
        if not self.alpha > 0:
            return super().call(inputs)
        return _leaky_relu_from_output(inputs, float(self.alpha))


def _leaky_relu_from_output(x, alpha):
    @tf.custom_gradient
    def f(x):
        y = tf.nn.leaky_relu(x, alpha)
        return y, lambda dy: tf.raw_ops.LeakyReluGrad(gradients=dy, features=y, alpha=alpha)
    return f(x)


class ZeroPadding3D(L.ZeroPadding3D):
    """Keras' ZeroPadding3D as a PadV2 (constant 0) instead of a Pad: the same values and gradient. TensorFlow
    2.15's remapper folds any Pad into the Conv3D after it, even when the backward pass still reads the padded
    tensor (the filter gradient does), and then fails ("fanout ... Conv3DBackpropFilterV2 exist for missing
    node Pad"), dropping every remapper rewrite of the step; it leaves a PadV2 alone."""

    def call(self, inputs):
        if self.data_format != "channels_last":
            return super().call(inputs)
        pads = [[0, 0], *map(list, self.padding), [0, 0]]
        return tf.raw_ops.PadV2(input=inputs, paddings=pads, constant_values=tf.zeros((), inputs.dtype))


def _layer(fast, *args, **kwargs):
    """The fast layer class, or under --layers keras its Keras parent, built with these arguments."""
    return (fast if LAYERS == "fast" else fast.__mro__[1])(*args, **kwargs)


def _zero_pad(pad):
    return _layer(ZeroPadding3D, pad)


def _upsample(size):
    return _layer(UpSampling3D, size)


def _dropout(rate=0.2):
    return _layer(Dropout, rate)


def _pad_conv(x, pad, filters, kernel):
    """ZeroPadding3D(pad) then a valid Conv3D; where the padding is what "same" pads (an odd cubic kernel of
    side 2 pad + 1) one Conv3D that pads inside the convolution: no Pad forward, no Slice backward."""
    if LAYERS == "fast" and isinstance(pad, int) and kernel == (2 * pad + 1,) * 3:
        return L.Conv3D(filters, kernel, padding="same")(x)
    x = _zero_pad(pad)(x)
    return L.Conv3D(filters, kernel, padding="valid")(x)


@contextlib.contextmanager
def frozen_batchnorm(model: tf.keras.Model):
    """Within this context (and in functions traced within it) ``model``'s BN layers keep their moving stats."""
    layers = [lyr for lyr in _all_layers(model) if isinstance(lyr, Keras2BatchNorm)]
    for lyr in layers:
        lyr.frozen = True
    try:
        yield
    finally:
        for lyr in layers:
            lyr.frozen = False


def _all_layers(model):
    for lyr in model.layers:
        yield lyr
        if isinstance(lyr, tf.keras.Model):
            yield from _all_layers(lyr)


def _lrelu():
    return _layer(LeakyReLU, alpha=0.3)  # Keras-2's default slope, which the authors relied on


# --------------------------------------------------------------------------------------------- fixed angle
def _generator_25(latent, c0, f1, k1, f, name):
    """The fixed-angle generator's layer sequence (25x25x25 output) with widths as parameters."""
    z = L.Input((latent,), name="latent")
    x = L.Dense(7 * 7 * 8 * c0, **_edge())(z)
    x = L.Reshape((7, 7, 8, c0))(x)
    x = L.Conv3D(f1, k1, padding="same", kernel_initializer="he_uniform")(x)
    x = _lrelu()(x)
    x = Keras2BatchNorm()(x)
    x = _upsample((2, 2, 2))(x)  # 14,14,16
    x = _zero_pad((2, 2, 0))(x)
    x = L.Conv3D(f, (6, 5, 8), padding="valid", kernel_initializer="he_uniform")(x)  # 13,14,9
    x = _lrelu()(x)
    x = Keras2BatchNorm()(x)
    x = _upsample((2, 2, 3))(x)  # 26,28,27
    x = _zero_pad((1, 0, 3))(x)
    x = L.Conv3D(f, (3, 3, 8), padding="valid", kernel_initializer="he_uniform")(x)  # 26,26,26
    x = _lrelu()(x)
    x = L.Conv3D(1, (2, 2, 2), padding="valid", use_bias=False, kernel_initializer="glorot_normal", **_edge())(x)
    x = L.Activation("relu", dtype="float32")(x)  # 25,25,25,1
    return tf.keras.Model(z, x, name=name)


def _generator_fixed(latent=200):
    return _generator_25(latent, c0=8, f1=64, k1=(6, 6, 8), f=6, name="generator_fixed")


def _discriminator_fixed():
    img = L.Input((25, 25, 25, 1), name="image")
    x = L.Conv3D(32, (5, 5, 5), padding="same", **_edge())(img)
    x = _lrelu()(x)
    x = _dropout(0.2)(x)
    for pad in (2, 2, 1):
        x = _pad_conv(x, pad, 8, (5, 5, 5))
        x = _lrelu()(x)
        x = Keras2BatchNorm()(x)
        x = _dropout(0.2)(x)
    x = L.AveragePooling3D((2, 2, 2))(x)
    h = L.Flatten()(x)
    return _heads(img, h, power=1.0, with_angle=False, name="discriminator_fixed")


# ------------------------------------------------------------------------------------------ variable angle
def _generator_angle(latent=256):
    z = L.Input((latent,), name="latent")
    x = L.Dense(5184, **_edge())(z)
    x = L.Reshape((9, 9, 8, 8))(x)
    x = _upsample((6, 6, 6))(x)
    x = L.Conv3D(8, (6, 6, 8), padding="valid", kernel_initializer="he_uniform")(x)
    x = L.ReLU()(x)
    x = Keras2BatchNorm(epsilon=1e-6)(x)
    for _ in range(3):
        x = _zero_pad((2, 2, 1))(x)
        x = L.Conv3D(6, (4, 4, 6), padding="valid", kernel_initializer="he_uniform")(x)
        x = L.ReLU()(x)
        x = Keras2BatchNorm(epsilon=1e-6)(x)
    x = _zero_pad((1, 1, 0))(x)
    x = L.Conv3D(6, (3, 3, 5), padding="valid", kernel_initializer="he_uniform")(x)
    x = L.ReLU()(x)
    x = Keras2BatchNorm(epsilon=1e-6)(x)
    x = _zero_pad((1, 1, 0))(x)
    x = L.Conv3D(6, (3, 3, 3), padding="valid", kernel_initializer="he_uniform")(x)
    x = L.ReLU()(x)
    x = L.Conv3D(1, (2, 2, 2), padding="valid", kernel_initializer="glorot_normal", **_edge())(x)
    x = L.Activation("relu", dtype="float32")(x)
    return tf.keras.Model(z, x, name="generator_angle")


def _discriminator_angle(power=0.85):
    img = L.Input((51, 51, 25, 1), name="image")
    x = L.Conv3D(16, (5, 6, 6), padding="same", **_edge())(img)
    x = _lrelu()(x)
    x = _dropout(0.2)(x)
    for pad in ((0, 0, 1), (0, 0, 1), None):
        if pad is not None:
            x = _zero_pad(pad)(x)
        x = L.Conv3D(8, (5, 6, 6), padding="valid")(x)
        x = _lrelu()(x)
        x = Keras2BatchNorm(epsilon=1e-6)(x)
        x = _dropout(0.2)(x)
    x = L.AveragePooling3D((2, 2, 2))(x)
    h = L.Flatten()(x)
    return _heads(img, h, power=power, with_angle=True, name="discriminator_angle")


# ------------------------------------------------------------------------------- small (tests only)
def _generator_small(latent=200):
    return _generator_25(latent, c0=4, f1=8, k1=(3, 3, 3), f=4, name="generator_small")


def _discriminator_small():
    img = L.Input((25, 25, 25, 1), name="image")
    x = L.Conv3D(8, (3, 3, 3), padding="same", **_edge())(img)
    x = _lrelu()(x)
    x = _dropout(0.2)(x)
    x = L.Conv3D(4, (3, 3, 3), padding="valid")(x)  # 23
    x = _lrelu()(x)
    x = Keras2BatchNorm()(x)
    x = _dropout(0.2)(x)
    x = L.AveragePooling3D((2, 2, 2))(x)  # 11
    h = L.Flatten()(x)
    return _heads(img, h, power=1.0, with_angle=False, name="discriminator_small")


# ---------------------------------------------------------------------------------------------- heads
def _heads(img, h, power, with_angle, name):
    fake = L.Dense(1, activation="sigmoid", name="generation", dtype="float32")(h)
    aux = L.Dense(1, activation="linear", name="auxiliary", dtype="float32")(h)
    outs = [fake, aux]
    if with_angle:
        outs.append(L.Lambda(lambda t: ecal_angle(t, power), name="angle", dtype="float32")(img))
    outs.append(L.Lambda(lambda t: ecal_sum(t, power), name="ecal", dtype="float32")(img))
    return tf.keras.Model(img, outs, name=name)


def ecal_sum(image, power=1.0):
    """Total deposited energy of each event (in the image's units, undoing the power transform)."""
    image = tf.cast(image, tf.float32)
    if power != 1.0:
        image = tf.pow(image, 1.0 / power)
    return tf.reshape(tf.reduce_sum(image, axis=[1, 2, 3, 4]), (-1, 1))


def ecal_angle(image, power=1.0):
    """The authors' analytic polar-angle measurement (radians), differentiable, no weights.

    Barycentre of the event; per layer z the barycentre (x_mid, y_mid); slope m = (y_mid - y_ref) /
    sqrt((x_mid - x_ref)^2 + (z - z_ref)^2), sign flipped for z < z_ref; angle = pi/2 - atan(m), averaged
    over non-empty layers weighted by (z + 0.5). Empty events measure 100.
    """
    img = tf.cast(image[..., 0], tf.float32)
    if power != 1.0:
        img = tf.pow(img, 1.0 / power)
    nx, ny, nz = img.shape[1], img.shape[2], img.shape[3]
    xi = tf.range(nx, dtype=tf.float32) + 0.5
    yi = tf.range(ny, dtype=tf.float32) + 0.5
    zi = tf.range(nz, dtype=tf.float32) + 0.5
    tot = tf.reduce_sum(img, axis=[1, 2, 3])
    empty = tf.equal(tot, 0.0)
    safe_tot = tf.where(empty, tf.ones_like(tot), tot)
    x_ref = tf.where(empty, tf.ones_like(tot), tf.reduce_sum(tf.reduce_sum(img, [2, 3]) * xi, 1) / safe_tot)[:, None]
    y_ref = tf.where(empty, tf.ones_like(tot), tf.reduce_sum(tf.reduce_sum(img, [1, 3]) * yi, 1) / safe_tot)[:, None]
    z_ref = tf.where(empty, tf.ones_like(tot), tf.reduce_sum(tf.reduce_sum(img, [1, 2]) * zi, 1) / safe_tot)[:, None]
    sumz = tf.reduce_sum(img, axis=[1, 2])  # (N, nz)
    zmask = tf.cast(sumz > 0.0, tf.float32)
    safe_sumz = tf.where(sumz > 0.0, sumz, tf.ones_like(sumz))
    x_mid = tf.reduce_sum(tf.reduce_sum(img, 2) * xi[None, :, None], 1) / safe_sumz * zmask
    y_mid = tf.reduce_sum(tf.reduce_sum(img, 1) * yi[None, :, None], 1) / safe_sumz * zmask
    z = zi[None, :] * tf.ones_like(z_ref)
    zproj = tf.sqrt(tf.maximum((x_mid - x_ref) ** 2 + (z - z_ref) ** 2, 1e-7))
    m = (y_mid - y_ref) / zproj
    m = tf.where(z < z_ref, -m, m)
    ang = (math.pi / 2.0 - tf.atan(m)) * zmask * z
    weights = tf.reduce_sum(z * zmask, axis=1)
    ang = tf.reduce_sum(ang, axis=1) / tf.where(weights > 0, weights, tf.ones_like(weights))
    ang = tf.where(empty, 100.0 * tf.ones_like(ang), ang)
    return ang[:, None]


_BUILDERS = {
    "fixed": (_generator_fixed, _discriminator_fixed),
    "angle": (_generator_angle, _discriminator_angle),
    "small": (_generator_small, _discriminator_small),
}


def build(variant: str):
    """Return (generator, discriminator) for ``variant``."""
    s = spec(variant)
    g_fn, d_fn = _BUILDERS[variant]
    g = g_fn(s.latent_size)
    d = d_fn(s.power) if variant == "angle" else d_fn()
    return g, d


# ----------------------------------------------------------------------------------------------- FLOPs
def forward_flops(model: tf.keras.Model) -> int:
    """Multiply-adds x 2 of the Conv3D and Dense layers for one sample (other ops are < 1 %)."""
    total = 0
    for lyr in _all_layers(model):
        if isinstance(lyr, L.Conv3D):
            out = lyr.output_shape
            k = lyr.kernel_size
            cin = lyr.input_shape[-1]
            total += 2 * out[1] * out[2] * out[3] * k[0] * k[1] * k[2] * cin * lyr.filters
        elif isinstance(lyr, L.Dense):
            total += 2 * lyr.input_shape[-1] * lyr.units
    return int(total)


def training_flops_per_sample(g: tf.keras.Model, d: tf.keras.Model) -> int:
    """FLOPs of one training sample: D on real + D on fake + two G updates through D.

    Backward = 2x forward where weight and input gradients are both needed, 1x where only input
    gradients are (D inside a G update):
      D real: 3D; D fake: G fwd + 3D; each G update: 3G + D fwd + D input-grad = 3G + 2D.
      total = 7G + 10D.
    """
    gf, df = forward_flops(g), forward_flops(d)
    return 7 * gf + 10 * df


def summary(variant: str) -> dict:
    g, d = build(variant)
    return {
        "variant": variant,
        "generator_params": int(g.count_params()),
        "discriminator_params": int(d.count_params()),
        "generator_forward_flops": forward_flops(g),
        "discriminator_forward_flops": forward_flops(d),
        "flops_per_sample": training_flops_per_sample(g, d),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gan.model", description=__doc__.split("\n")[0])
    ap.add_argument("--variant", choices=VARIANTS, default="fixed")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--summary", action="store_true", help="also print the Keras layer summaries")
    args = ap.parse_args(argv)
    info = summary(args.variant)
    if args.summary:
        g, d = build(args.variant)
        g.summary(print_fn=lambda s: print(s, file=sys.stderr))
        d.summary(print_fn=lambda s: print(s, file=sys.stderr))
    if args.json:
        print(json.dumps(info))
    else:
        for k, v in info.items():
            print(f"{k:28s} {v:,}" if isinstance(v, int) else f"{k:28s} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
