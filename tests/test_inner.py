"""The inner loop (scan of GD steps) and the meta-objective's building blocks."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import make_tiny_mlp
from dd_jax.inner import cross_entropy, gd_step, inner_train, unroll_schedule
from dd_jax.meta import Learned, distilled_labels, init_learned, meta_loss, raw_step_size
from dd_jax.models import as_model

STEPS, EPOCHS, K, IPC, HW = 2, 3, 4, 2, 4


@pytest.fixture(scope="module")
def problem():
    """A tiny MLP problem in float32: (model, init_params (3 nets), learned, labels, real_x, real_y)."""
    model = as_model(make_tiny_mlp(hidden=6, num_classes=K))
    rng = np.random.default_rng(0)
    # 3 initialisations; shapes by tracing, values from numpy (no eager XLA compilations)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, HW, HW, 1)))
    init_params = jax.tree.map(
        lambda s: jnp.asarray(rng.normal(size=(3, *s.shape)) * 0.5, jnp.float32), shapes)
    labels = jnp.asarray(np.tile(np.repeat(np.arange(K), IPC), (STEPS, 1)), jnp.int32)
    learned = Learned(
        images=jnp.asarray(rng.normal(size=(STEPS, IPC * K, HW, HW, 1)), jnp.float32),
        raw_step_sizes=jnp.asarray(rng.uniform(-1.5, 0.5, size=STEPS * EPOCHS), jnp.float32),
    )
    real_x = jnp.asarray(rng.normal(size=(16, HW, HW, 1)), jnp.float32)
    real_y = jnp.asarray(rng.integers(0, K, size=16), jnp.int32)
    return model, init_params, learned, labels, real_x, real_y


def _net(tree, i):
    return jax.tree.map(lambda a: a[i], tree)


def _assert_trees_close(a, b, rtol, atol):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.shape == y.shape
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def test_inner_train_equals_python_loop(problem):
    """theta_t = theta_{t-1} - eta_t grad CE(x_{t mod S}); float64 so equality is tight."""
    model, init_params, learned, labels, _, _ = problem
    with jax.enable_x64():
        theta0 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), _net(init_params, 1))
        images = jnp.asarray(learned.images, jnp.float64)
        etas = jnp.asarray(learned.step_sizes, jnp.float64)
        scanned = jax.jit(functools.partial(inner_train, model.apply, epochs=EPOCHS))(
            theta0, images, labels, etas)

        step = jax.jit(functools.partial(gd_step, model.apply))
        looped = theta0
        for t in range(STEPS * EPOCHS):
            looped = step(looped, images[t % STEPS], labels[t % STEPS], etas[t])
        _assert_trees_close(scanned, looped, rtol=1e-10, atol=1e-12)

        # the test is not vacuous: training moved theta, and the batch order matters
        moved = max(float(jnp.max(jnp.abs(a - b)))
                    for a, b in zip(jax.tree.leaves(scanned), jax.tree.leaves(theta0)))
        assert moved > 1e-2
        wrong = theta0
        for t in range(STEPS * EPOCHS):  # epoch-major order instead of t mod S
            wrong = step(wrong, images[t // EPOCHS], labels[t // EPOCHS], etas[t])
        diff = max(float(jnp.max(jnp.abs(a - b)))
                   for a, b in zip(jax.tree.leaves(scanned), jax.tree.leaves(wrong)))
        assert diff > 1e-6


def test_looped_unroll_equals_unrolled(problem, monkeypatch):
    """Inner loops longer than UNROLL_UP_TO run as a loop, one step per iteration: the same
    meta-loss and meta-gradient (images and step sizes, several nets) as the unrolled form."""
    from dd_jax import inner

    model, init_params, learned, labels, real_x, real_y = problem
    loss = functools.partial(meta_loss, apply_fn=model.apply, epochs=EPOCHS)
    with jax.enable_x64():
        learned64, inits64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), (learned, init_params))
        results = {}
        for unroll_up_to in (STEPS * EPOCHS, STEPS * EPOCHS - 1):  # unrolled, then looped
            monkeypatch.setattr(inner, "UNROLL_UP_TO", unroll_up_to)
            value_and_grad = jax.jit(jax.value_and_grad(loss))  # traced anew for each form
            results[unroll_up_to] = value_and_grad(learned64, labels, inits64, real_x, real_y)
    (unrolled_loss, unrolled), (looped_loss, looped) = results.values()
    np.testing.assert_allclose(float(looped_loss), float(unrolled_loss), rtol=1e-12)
    _assert_trees_close(looped, unrolled, rtol=1e-9, atol=1e-12)
    assert float(jnp.max(jnp.abs(unrolled.raw_step_sizes))) > 1e-3


def test_gd_step_is_plain_gradient_descent(problem):
    model, init_params, learned, labels, _, _ = problem
    theta0 = _net(init_params, 0)
    x, y = learned.images[0], labels[0]

    @jax.jit
    def both(theta0):
        grads = jax.grad(lambda p: cross_entropy(model.apply(p, x), y))(theta0)
        expected = jax.tree.map(lambda p, g: p - 0.37 * g, theta0, grads)
        return gd_step(model.apply, theta0, x, y, jnp.float32(0.37)), expected, grads

    new, expected, grads = both(theta0)
    _assert_trees_close(new, expected, rtol=1e-6, atol=1e-7)
    assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads)) > 1e-3


def test_cross_entropy_is_mean_nll():
    logits = jnp.array([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    labels = jnp.array([0, 1])
    logp = jax.nn.log_softmax(logits)
    expected = -(logp[0, 0] + logp[1, 1]) / 2
    np.testing.assert_allclose(float(cross_entropy(logits, labels)), float(expected), rtol=1e-6)


def test_unroll_schedule_order():
    images = jnp.arange(STEPS * 3, dtype=jnp.float32).reshape(STEPS, 3, 1, 1, 1)
    labels = jnp.arange(STEPS * 3, dtype=jnp.int32).reshape(STEPS, 3)
    xs, ys = unroll_schedule(images, labels, EPOCHS)
    assert xs.shape == (STEPS * EPOCHS, 3, 1, 1, 1)
    assert ys.shape == (STEPS * EPOCHS, 3)
    for t in range(STEPS * EPOCHS):
        np.testing.assert_array_equal(xs[t], images[t % STEPS])
        np.testing.assert_array_equal(ys[t], labels[t % STEPS])


def test_remat_gives_same_params_and_meta_gradient(problem):
    model, init_params, learned, labels, real_x, real_y = problem
    theta0 = _net(init_params, 0)

    @jax.jit
    def train_and_grad(learned):
        out = {}
        for remat in (False, True):
            theta_t = inner_train(model.apply, theta0, learned.images, labels,
                                  learned.step_sizes, EPOCHS, remat=remat)
            f = functools.partial(meta_loss, labels=labels, init_params=init_params,
                                  real_x=real_x, real_y=real_y, apply_fn=model.apply,
                                  epochs=EPOCHS, remat=remat)
            out[remat] = (theta_t, *jax.value_and_grad(f)(learned))
        return out

    out = train_and_grad(learned)
    (p0, l0, g0), (p1, l1, g1) = out[False], out[True]
    _assert_trees_close(p1, p0, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6)
    _assert_trees_close(g1, g0, rtol=1e-4, atol=1e-6)
    assert float(jnp.max(jnp.abs(g0.images))) > 1e-4  # a real, non-zero gradient


def test_meta_loss_vmap_is_mean_over_nets(problem):
    model, init_params, learned, labels, real_x, real_y = problem
    f = functools.partial(meta_loss, apply_fn=model.apply, epochs=EPOCHS)

    @jax.jit
    def losses(init_params):
        together = f(learned, labels, init_params, real_x, real_y)
        per_net, single = [], []
        for i in range(3):  # a plain loop over the nets, no vmap
            theta_t = inner_train(model.apply, _net(init_params, i), learned.images, labels,
                                  learned.step_sizes, EPOCHS)
            per_net.append(cross_entropy(model.apply(theta_t, real_x), real_y))
            # the meta-loss of a batch of one net (leading axis 1) is that net's loss
            single.append(f(learned, labels, jax.tree.map(lambda a: a[i : i + 1], init_params),
                            real_x, real_y))
        return together, jnp.stack(per_net), jnp.stack(single)

    together, per_net, single = map(np.asarray, losses(init_params))
    np.testing.assert_allclose(single, per_net, rtol=1e-5)
    np.testing.assert_allclose(together, np.mean(per_net), rtol=1e-5)
    assert np.ptp(per_net) > 1e-4  # the nets really differ, so the mean is a real check


@pytest.mark.parametrize("steps, ipc, k", [(1, 1, 10), (3, 2, 4), (2, 5, 3)])
def test_distilled_labels_layout(steps, ipc, k):
    labels = np.asarray(distilled_labels(steps, ipc, k))
    assert labels.shape == (steps, ipc * k)
    assert labels.dtype == np.int32
    expected_row = np.repeat(np.arange(k), ipc)  # [0]*ipc + [1]*ipc + ...
    for s in range(steps):
        np.testing.assert_array_equal(labels[s], expected_row)
        assert np.all(np.bincount(labels[s], minlength=k) == ipc)  # every class in every step


@pytest.mark.parametrize("eta", [1e-3, 0.02, 0.1, 1.0, 5.0])
def test_raw_step_size_inverts_softplus(eta):
    raw = raw_step_size(eta)
    assert isinstance(raw, float)
    np.testing.assert_allclose(raw, np.log(np.expm1(eta)), rtol=1e-5, atol=1e-6)
    learned = Learned(jnp.zeros((1, 1, 1, 1, 1)), jnp.full((3,), raw, jnp.float32))
    np.testing.assert_allclose(np.asarray(learned.step_sizes), eta, rtol=1e-5)


def test_init_learned_layout():
    labels = distilled_labels(3, 2, 5)
    learned = init_learned(jax.random.PRNGKey(0), labels, (6, 6, 1), epochs=4, step_size=0.05)
    assert learned.images.shape == (3, 10, 6, 6, 1)
    assert learned.images.dtype == jnp.float32
    assert learned.raw_step_sizes.shape == (12,)
    np.testing.assert_allclose(np.asarray(learned.step_sizes), 0.05, rtol=1e-5)
    # images ~ N(0, 1)
    imgs = np.asarray(learned.images)
    assert abs(imgs.mean()) < 0.15 and 0.85 < imgs.std() < 1.15
    # deterministic in the key, different for another key
    again = init_learned(jax.random.PRNGKey(0), labels, (6, 6, 1), epochs=4, step_size=0.05)
    np.testing.assert_array_equal(np.asarray(again.images), imgs)
    other = init_learned(jax.random.PRNGKey(1), labels, (6, 6, 1), epochs=4, step_size=0.05)
    assert not np.allclose(np.asarray(other.images), imgs)


def test_init_learned_image_scale():
    """image_scale multiplies the same N(0, 1) draw; the step sizes and labels do not move."""
    labels = distilled_labels(2, 1, 3)
    unit = init_learned(jax.random.PRNGKey(3), labels, (4, 4, 1), epochs=2, num_classes=3)
    small = init_learned(jax.random.PRNGKey(3), labels, (4, 4, 1), epochs=2, num_classes=3,
                         image_scale=0.01)
    np.testing.assert_allclose(np.asarray(small.images), 0.01 * np.asarray(unit.images), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(small.raw_step_sizes), np.asarray(unit.raw_step_sizes))
    np.testing.assert_array_equal(np.asarray(small.labels), np.asarray(unit.labels))
