import json

import numpy as np
import pytest
import tensorflow as tf

from conftest import run_module
from gan import model as gm
from gan import showers

# Counted from the authors' layer lists (svalleco/3Dgan Energy-gan / Anglegan), Keras counting BN's
# moving statistics as parameters.
REFERENCE = {"fixed": (872_948, 73_450), "angle": (1_365_047, 87_402)}


@pytest.mark.parametrize("variant", ["fixed", "angle"])
def test_parameter_counts_equal_reference(variant):
    info = gm.summary(variant)
    assert (info["generator_params"], info["discriminator_params"]) == REFERENCE[variant]


def test_cli_prints_reference_counts_as_json():
    p = run_module("gan.model", "--variant", "fixed", "--json")
    assert p.returncode == 0, p.stderr
    info = json.loads(p.stdout.strip().splitlines()[-1])
    assert info["generator_params"] == 872_948 and info["discriminator_params"] == 73_450
    assert info["flops_per_sample"] == 7 * info["generator_forward_flops"] + 10 * info["discriminator_forward_flops"]


@pytest.mark.parametrize("variant,image,latent,heads", [("fixed", (25, 25, 25, 1), 200, 3),
                                                        ("angle", (51, 51, 25, 1), 256, 4),
                                                        ("small", (25, 25, 25, 1), 200, 3)])
def test_shapes_and_heads(variant, image, latent, heads):
    g, d = gm.build(variant)
    assert tuple(g.input_shape[1:]) == (latent,)
    assert tuple(g.output_shape[1:]) == image
    out = d(tf.zeros((2,) + image), training=False)
    assert len(out) == heads and all(o.shape == (2, 1) for o in out)


def test_forward_flops_by_hand():
    inp = tf.keras.Input((4, 4, 4, 2))
    x = tf.keras.layers.Conv3D(3, (3, 3, 3), padding="valid")(inp)  # 2x2x2 output
    out = tf.keras.layers.Dense(5)(tf.keras.layers.Flatten()(x))
    m = tf.keras.Model(inp, out)
    assert gm.forward_flops(m) == 2 * 8 * 27 * 2 * 3 + 2 * 24 * 5


def test_leaky_relu_slope_is_keras2_default():
    g, d = gm.build("fixed")
    slopes = {round(float(l.alpha), 6) for l in d.layers if isinstance(l, tf.keras.layers.LeakyReLU)}
    assert slopes == {0.3}


def test_frozen_batchnorm_uses_batch_stats_but_keeps_moving_stats():
    bn = gm.Keras2BatchNorm()
    x = tf.random.normal((8, 3, 3, 3, 4), mean=5.0, stddev=2.0)
    bn(x, training=True)  # build + one update
    before = [bn.moving_mean.numpy().copy(), bn.moving_variance.numpy().copy()]
    inference = bn(x, training=False).numpy()
    with gm.frozen_batchnorm(tf.keras.Sequential([bn])):
        frozen_train = tf.function(lambda t: bn(t, training=True))(x).numpy()
    np.testing.assert_array_equal(bn.moving_mean.numpy(), before[0])
    np.testing.assert_array_equal(bn.moving_variance.numpy(), before[1])
    # Batch statistics, not the (barely moved) moving ones: output is normalised to ~zero mean.
    assert abs(frozen_train.mean()) < 1e-3 and abs(inference.mean()) > 1.0
    bn(x, training=True)  # unfrozen again: statistics move
    assert not np.allclose(bn.moving_mean.numpy(), before[0])


def test_fused_batchnorm_equals_the_keras2_path():
    """The fused kernel (--bn fused) normalises, updates the moving statistics (biased variance, as Keras 2)
    and differentiates as moments + batch_normalization do."""
    x = tf.random.normal((4, 5, 6, 7, 3), mean=2.0, stddev=3.0, seed=3)
    w = tf.random.normal(x.shape, seed=4)  # a loss whose gradients are far from zero everywhere
    out = {}
    for fused in (False, True):
        bn = gm.Keras2BatchNorm(momentum=0.0)  # the moving statistics are this batch's: a wrong variance shows
        bn.fused = fused
        bn.build(x.shape)
        bn.gamma.assign([1.5, 0.5, 2.0])
        bn.beta.assign([0.1, -0.2, 0.3])
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = bn(x, training=True)
            loss = tf.reduce_sum(y * w)
        grads = tape.gradient(loss, [x, bn.gamma, bn.beta])
        out[fused] = [y, bn.moving_mean, bn.moving_variance, *grads]
    for a, b in zip(out[False], out[True]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)


def test_discriminator_ecal_head_is_the_sum():
    _, d = gm.build("fixed")
    img = tf.random.uniform((3, 25, 25, 25, 1))
    ecal = d(img, training=False)[2].numpy()[:, 0]
    np.testing.assert_allclose(ecal, img.numpy().sum(axis=(1, 2, 3, 4)), rtol=1e-5)


def test_angle_head_matches_numpy_measurement():
    rng = np.random.default_rng(0)
    theta = np.radians([70.0, 90.0, 110.0])
    img = showers.simulate(np.array([100.0, 150.0, 200.0]), thetas=theta, shape=(51, 51, 25), rng=rng) * 50
    power = 0.85
    ang_tf = gm.ecal_angle(tf.constant(np.power(img, power)[..., None]), power).numpy()[:, 0]
    np.testing.assert_allclose(ang_tf, showers.measure_angle(img), rtol=2e-3)
    assert gm.ecal_angle(tf.zeros((1, 51, 51, 25, 1)), power).numpy()[0, 0] == 100.0


def test_unknown_variant_names_the_choices():
    with pytest.raises(ValueError, match="fixed, angle, small"):
        gm.spec("huge")


@pytest.mark.parametrize("variant", ["fixed", "angle"])
def test_fast_layers_compute_the_same_model_as_keras_layers(variant, monkeypatch, tmp_path):
    """--layers fast trains the same model: the same weights in the same order (checkpoints interchange), the
    same outputs and the same gradients as Keras' UpSampling3D and ZeroPadding3D + valid Conv3D, with D in
    inference mode where dropout is the identity (the fast Dropout is tested on its own below)."""
    built = {}
    for layers in ("keras", "fast"):
        monkeypatch.setattr(gm, "LAYERS", layers)
        built[layers] = gm.build(variant)
    (gk, dk), (gf, df) = built["keras"], built["fast"]
    for a, b in ((gk, gf), (dk, df)):
        assert [w.shape for w in a.weights] == [w.shape for w in b.weights]
        b.set_weights(a.get_weights())
    assert gm.training_flops_per_sample(gk, dk) == gm.training_flops_per_sample(gf, df)
    z = tf.random.stateless_normal((2, gk.input_shape[-1]), seed=(1, 2))
    out = {}
    for name, (g, d) in built.items():
        with tf.GradientTape() as tape:
            img = g(z, training=True)  # BN on batch statistics: every layer of G in its training form
            loss = tf.add_n([tf.reduce_sum(o) for o in d(img, training=False)])
        out[name] = (img.numpy(), loss.numpy(), [v.numpy() for v in tape.gradient(loss, g.trainable_variables)])
    np.testing.assert_allclose(out["fast"][0], out["keras"][0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["fast"][1], out["keras"][1], rtol=1e-4)
    for a, b in zip(out["fast"][2], out["keras"][2]):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5 * float(np.abs(b).max()))
    if variant == "fixed":  # two of the three pad + valid pairs of D became one "same" convolution
        pads = lambda m: sum(isinstance(lyr, tf.keras.layers.ZeroPadding3D) for lyr in m.layers)  # noqa: E731
        assert (pads(dk), pads(df)) == (3, 1)
    # Checkpoints interchange: weights saved from the Keras-layer model load into a fresh fast-layer one.
    monkeypatch.setattr(gm, "LAYERS", "fast")
    for i, keras_model in enumerate((gk, dk)):
        keras_model.save_weights(tmp_path / f"m{i}.weights.h5")
        fresh = gm.build(variant)[i]
        fresh.load_weights(tmp_path / f"m{i}.weights.h5")
        for a, b in zip(keras_model.get_weights(), fresh.get_weights()):
            np.testing.assert_array_equal(a, b)
    # The fast model is built of the fast layers, and their calls never fall back to Keras' own.
    kinds = {type(lyr) for m in (gf, df) for lyr in m.layers}
    fast = {gm.UpSampling3D, gm.Dropout, gm.ZeroPadding3D, gm.LeakyReLU}
    assert fast <= kinds
    assert not {c.__mro__[1] for c in fast} & kinds

    def keras_call(*a, **kw):
        raise AssertionError("a fast layer fell back to Keras' call")

    for c in fast:
        monkeypatch.setattr(c.__mro__[1], "call", keras_call)
    df(gf(z, training=True), training=True)


def test_leaky_relu_gradient_from_the_output_is_keras_gradient_bit_for_bit():
    x = tf.constant(np.random.default_rng(0).normal(size=(4, 7, 7, 7, 3)).astype(np.float32))
    x = tf.tensor_scatter_nd_update(x, [[0, 0, 0, 0, 0]], [0.0])  # zero itself: both take the slope side
    dy = tf.constant(np.random.default_rng(1).normal(size=x.shape).astype(np.float32))
    grads = []
    for layer in (gm.LeakyReLU(alpha=0.3), tf.keras.layers.LeakyReLU(alpha=0.3)):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x)
        grads.append((y.numpy(), tape.gradient(y, x, output_gradients=dy).numpy()))
    np.testing.assert_array_equal(grads[0][0], grads[1][0])
    np.testing.assert_array_equal(grads[0][1], grads[1][1])


def test_mixed_precision_keeps_the_physics_edges_in_float32():
    """Under bf16: G's energy-conditioned Dense and last convolution, and D's first convolution, compute in
    float32; the rest in bf16; every weight stays float32 (checkpoints load across precisions)."""
    tf.keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        g, d = gm.build("fixed")
    finally:
        tf.keras.mixed_precision.set_global_policy("float32")
    computes = lambda m, kind: [l.compute_dtype for l in m.layers if isinstance(l, kind)]  # noqa: E731
    assert computes(g, tf.keras.layers.Dense) == ["float32"]
    assert computes(g, tf.keras.layers.Conv3D) == ["bfloat16"] * 3 + ["float32"]
    assert computes(d, tf.keras.layers.Conv3D) == ["float32"] + ["bfloat16"] * 3
    assert {w.dtype for m in (g, d) for w in m.weights} == {tf.float32}
    img = g(tf.ones((1, 200)), training=False)
    assert img.dtype == tf.float32
    assert all(o.dtype == tf.float32 for o in d(img, training=False))
    g32, _ = gm.build("fixed")
    assert [w.shape for w in g.weights] == [w.shape for w in g32.weights]


def test_fast_dropout_keeps_the_rate_and_scales_like_keras():
    drop = gm.Dropout(0.2)
    x = tf.ones((64, 25, 25, 25, 1))
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = drop(x, training=True)
    dx = tape.gradient(y, x).numpy()
    y = y.numpy()
    assert set(np.unique(y)) == {0.0, 1.25}
    assert abs((y == 0).mean() - 0.2) < 0.002  # 1M draws: sd 0.0004
    np.testing.assert_array_equal(dx, y)  # the gradient is the same mask
    assert np.array_equal(drop(x, training=False).numpy(), x.numpy())
    yb = gm.Dropout(0.2, dtype="mixed_bfloat16")(tf.ones((64, 25, 25, 25, 1), tf.bfloat16), training=True)
    assert yb.dtype == tf.bfloat16 and abs(float(tf.reduce_mean(tf.cast(yb == 0, tf.float32))) - 0.2) < 0.002
