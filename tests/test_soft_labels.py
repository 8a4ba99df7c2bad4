"""Learned labels: the soft-target loss, their meta-gradient against finite differences
(float64), layouts with fewer images than classes, and distilled.npz versions 1 and 2."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dd_jax
from conftest import assert_matches_finite_difference, finite_difference_check, make_tiny_convnet, make_tiny_mlp
from dd_jax.distilled import save_distilled
from dd_jax.evaluation import Evaluator
from dd_jax.inner import cross_entropy
from dd_jax.meta import Learned, distilled_labels, init_learned, meta_loss
from dd_jax.models import as_model

STEPS, EPOCHS, K, HW, N_IMAGES = 2, 2, 3, 4, 2  # 2 images per step for 3 classes


def test_soft_cross_entropy_is_the_label_weighted_sum():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(5, 4)), jnp.float32)
    hard = jnp.asarray([0, 3, 1, 1, 2], jnp.int32)
    np.testing.assert_allclose(float(cross_entropy(logits, jax.nn.one_hot(hard, 4))),
                               float(cross_entropy(logits, hard)), rtol=1e-6)
    y = jnp.asarray(rng.normal(size=(5, 4)), jnp.float32)  # any real values, any sign
    per_class = -jax.nn.log_softmax(logits)  # CE(logits, c) for every c
    np.testing.assert_allclose(float(cross_entropy(logits, y)),
                               float(jnp.mean(jnp.sum(y * per_class, -1))), rtol=1e-5)


@pytest.mark.parametrize("model_name, n_nets, remat", [
    ("mlp", 1, False), ("mlp", 3, True), ("conv-pool", 2, False)])
def test_label_meta_gradient_matches_finite_differences(model_name, n_nets, remat):
    with jax.enable_x64():
        model = as_model(make_tiny_mlp(hidden=5, num_classes=K) if model_name == "mlp"
                         else make_tiny_convnet(K, pool=True))
        rng = np.random.default_rng(n_nets)
        shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, HW, HW, 1)))
        fan_in = lambda s: int(np.prod(s.shape[:-1])) if len(s.shape) > 1 else 4
        init_params = jax.tree.map(
            lambda s: jnp.asarray(rng.normal(size=(n_nets, *s.shape)) / np.sqrt(fan_in(s))), shapes)
        hard = distilled_labels(STEPS, 1, K, images_per_step=N_IMAGES)
        learned = Learned(
            images=jnp.asarray(rng.normal(size=(STEPS, N_IMAGES, HW, HW, 1))),
            raw_step_sizes=jnp.asarray(rng.uniform(-2.0, 0.0, size=STEPS * EPOCHS)),
            labels=jax.nn.one_hot(hard, K, dtype=jnp.float64)
            + jnp.asarray(0.2 * rng.normal(size=(STEPS, N_IMAGES, K))),
        )
        real_x = jnp.asarray(rng.normal(size=(12, HW, HW, 1)))
        real_y = jnp.asarray(rng.integers(0, K, size=12), jnp.int32)
        check = finite_difference_check(functools.partial(
            meta_loss, labels=hard, init_params=init_params, real_x=real_x, real_y=real_y,
            apply_fn=model.apply, epochs=EPOCHS, remat=remat), 1e-5)
        zero = jax.tree.map(jnp.zeros_like, learned)
        unit = lambda a: jnp.asarray(a / np.linalg.norm(a))
        directions = [zero.replace(labels=unit(rng.normal(size=learned.labels.shape)))
                      for _ in range(2)]
        for s in range(STEPS):  # single label entries of every step
            e = np.zeros(learned.labels.shape)
            e[s, rng.integers(N_IMAGES), rng.integers(K)] = 1.0
            directions.append(zero.replace(labels=jnp.asarray(e)))
        directions.append(jax.tree.map(lambda a: unit(rng.normal(size=a.shape)), learned))
        for v in directions:
            grad, analytic, numeric = check(learned, v)
            assert_matches_finite_difference(analytic, numeric, 1e-4)
        assert grad.labels.shape == learned.labels.shape and grad.labels.dtype == jnp.float64
        # the hard labels are ignored once labels are learned
        other = functools.partial(meta_loss, init_params=init_params, real_x=real_x,
                                  real_y=real_y, apply_fn=model.apply, epochs=EPOCHS)
        assert float(other(learned, hard)) == float(other(learned, (hard + 1) % K))


@pytest.mark.parametrize("steps, n, k, expected", [
    (1, 5, 10, [[0, 1, 2, 3, 4]]),
    (2, 5, 10, [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]),
    (2, 4, 3, [[0, 1, 2, 0], [1, 2, 0, 1]]),
    (1, 20, 10, [list(range(10)) * 2]),
])
def test_images_per_step_assigns_classes_in_turn(steps, n, k, expected):
    labels = distilled_labels(steps, 1, k, images_per_step=n)
    assert labels.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(labels), expected)
    learned = init_learned(jax.random.PRNGKey(0), labels, (3, 3, 1), epochs=2, num_classes=k)
    assert learned.labels.shape == (steps, n, k) and learned.labels.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(learned.labels), np.eye(k)[np.asarray(expected)])
    assert init_learned(jax.random.PRNGKey(0), labels, (3, 3, 1), epochs=2).labels is None


def test_five_images_for_ten_classes_distil_and_evaluate_on_soft_labels(digits28, tmp_path):
    rows = []
    model = make_tiny_convnet(10)
    d = dd_jax.distill(digits28, model, iterations=6, real_batch_size=32,
                       learn_labels=True, images_per_step=5, eval_every=3, log_every=1,
                       n_eval_nets_during=1, progress=False, log=rows.append)
    assert d.images.shape == (1, 5, 28, 28, 1) and d.soft_labels.shape == (1, 5, 10)
    np.testing.assert_array_equal(d.labels, d.soft_labels.argmax(-1))
    assert not np.allclose(d.soft_labels, np.eye(10)[:5][None])  # learned
    assert all(np.isfinite(r["meta_loss"]) for r in rows)
    # the evaluation trains on the soft labels: it equals an Evaluator given them, not the argmax
    result = dd_jax.evaluate(d, digits28, model)
    evaluator = Evaluator(as_model(model).apply, d.epochs, digits28.test_x, digits28.test_y)
    init = jax.tree.map(lambda a: jnp.asarray(a)[None], d.init_params)
    args = (jnp.asarray(d.images), jnp.asarray(d.soft_labels), jnp.asarray(d.step_sizes))
    assert result["accuracies"] == evaluator(init, *args).tolist()
    assert rows[-1]["test_acc"] == result["mean"]  # the periodic evaluation too
    save_distilled(tmp_path / "d.npz", d, model="tiny")
    assert dd_jax.evaluate(dd_jax.load_distilled(tmp_path / "d.npz"), digits28, model) == result


def _distilled(soft: bool, optimizer: str = "gd") -> dd_jax.DistilledData:
    rng = np.random.default_rng(0)
    labels = np.asarray(distilled_labels(2, 1, 10, images_per_step=5))
    return dd_jax.DistilledData(
        images=rng.normal(size=(2, 5, 28, 28, 1)).astype(np.float32), labels=labels,
        step_sizes=np.array([0.1, 0.2, 0.3, 0.4], np.float32), epochs=2, mean=(0.1307,),
        std=(0.3081,), init_regime="random", init_dist="xavier_normal", init_gain=1.0, seed=3,
        soft_labels=rng.normal(size=(2, 5, 10)).astype(np.float32) if soft else None,
        inner_optimizer=optimizer, inner_momentum=0.8)


def test_version_1_file_loads(tmp_path):
    """A file with the version-1 keys only (as earlier dd_jax wrote them) loads, hard labels."""
    d = _distilled(soft=False)
    np.savez(tmp_path / "v1.npz", format_version=np.int32(1), images=d.images, labels=d.labels,
             step_sizes=d.step_sizes, steps=np.int32(2), epochs=np.int32(2),
             mean=np.float32([0.1307]), std=np.float32([0.3081]), init_regime=np.array("random"),
             init_dist=np.array("xavier_normal"), init_gain=np.float32(1.0), seed=np.int64(3),
             model=np.array("lenet"))
    back = dd_jax.load_distilled(tmp_path / "v1.npz")
    assert back.soft_labels is None and back.inner_optimizer == "gd" and back.inner is None
    np.testing.assert_array_equal(back.train_labels, d.labels)
    np.testing.assert_array_equal(back.images, d.images)
    # hard-label plain-GD data is still written as version 1, with exactly those keys
    save_distilled(tmp_path / "again.npz", back, model="lenet")
    with np.load(tmp_path / "again.npz") as f:
        assert int(f["format_version"]) == 1
        assert "soft_labels" not in f.files and "inner_optimizer" not in f.files


@pytest.mark.parametrize("soft, optimizer", [(True, "gd"), (False, "adam"), (True, "momentum")])
def test_version_2_round_trip(tmp_path, soft, optimizer):
    d = _distilled(soft, optimizer)
    save_distilled(tmp_path / "v2.npz", d, model="lenet")
    with np.load(tmp_path / "v2.npz") as f:
        assert int(f["format_version"]) == 2
    back = dd_jax.load_distilled(tmp_path / "v2.npz")
    np.testing.assert_array_equal(back.labels, d.labels)
    if soft:
        assert back.soft_labels.dtype == np.float32
        np.testing.assert_array_equal(back.soft_labels, d.soft_labels)
        np.testing.assert_array_equal(back.train_labels, d.soft_labels)
    else:
        assert back.soft_labels is None
    assert (back.inner_optimizer, back.inner_momentum) == (optimizer, pytest.approx(0.8))
    assert back.inner == (None if optimizer == "gd" else dd_jax.unroll.InnerSpec(optimizer, back.inner_momentum))


def test_unknown_format_version_is_refused(tmp_path):
    np.savez(tmp_path / "v3.npz", format_version=np.int32(3), images=np.zeros(3))
    with pytest.raises(dd_jax.DataError, match="format 1 or 2"):
        dd_jax.load_distilled(tmp_path / "v3.npz")


def test_baselines_refuse_learned_labels():
    from dd_jax.baselines import validate_baselines_config
    from experiments.configs import mnist_baselines

    config = mnist_baselines()
    config.learn_labels = True
    with pytest.raises(dd_jax.ConfigError, match="--learn_labels=True: baselines are hard-label"):
        validate_baselines_config(config)
