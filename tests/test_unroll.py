"""dd_jax.unroll: momentum and Adam inner optimisers against plain Python loops, and the
random-window truncated unroll against an explicit stop-gradient implementation (float64)."""
from __future__ import annotations

import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dd_jax
from conftest import ROOT, assert_matches_finite_difference, finite_difference_check, make_tiny_convnet, make_tiny_mlp
from dd_jax.config import default_config
from dd_jax.inner import cross_entropy, inner_train
from dd_jax.meta import Learned, meta_loss
from dd_jax.models import as_model
from dd_jax.outer_step import build_outer_loop, inner_spec
from dd_jax.unroll import ADAM_B2, ADAM_EPS, ADAM_EPS_ROOT, InnerSpec, optimizer_train, optimizer_update, window_stop

STEPS, EPOCHS, K, HW = 2, 3, 3, 4
T = STEPS * EPOCHS
N_IMAGES = 4  # per step: not a multiple of K (learned labels)


def _problem(seed: int = 0, model_fn=None, n_nets: int = 2):
    """float64 (apply, init_params (n_nets), Learned with labels, hard labels, real_x, real_y);
    call inside jax.enable_x64()."""
    model = as_model(model_fn or make_tiny_mlp(hidden=5, num_classes=K))
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, HW, HW, 1)))
    fan_in = lambda s: int(np.prod(s.shape[:-1])) if len(s.shape) > 1 else 4
    init_params = jax.tree.map(
        lambda s: jnp.asarray(rng.normal(size=(n_nets, *s.shape)) / np.sqrt(fan_in(s))), shapes)
    hard = jnp.asarray(np.arange(STEPS * N_IMAGES).reshape(STEPS, N_IMAGES) % K, jnp.int32)
    learned = Learned(
        images=jnp.asarray(rng.normal(size=(STEPS, N_IMAGES, HW, HW, 1))),
        raw_step_sizes=jnp.asarray(rng.uniform(-2.0, 0.0, size=T)),
        labels=jnp.asarray(np.eye(K)[np.asarray(hard)] + 0.3 * rng.normal(size=(STEPS, N_IMAGES, K))),
    )
    real_x = jnp.asarray(rng.normal(size=(10, HW, HW, 1)))
    real_y = jnp.asarray(rng.integers(0, K, size=10), jnp.int32)
    return model.apply, init_params, learned, hard, real_x, real_y


def _net(tree, i=0):
    return jax.tree.map(lambda a: a[i], tree)


def _assert_trees_close(a, b, rtol=1e-10, atol=1e-12):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


# --------------------------------------------------------------------------- inner optimisers


def _optax_reference(name: str, mu: float) -> optax.GradientTransformation:
    """The optimiser's direction as optax computes it (the step size applied outside)."""
    if name == "momentum":
        return optax.trace(decay=mu)
    return optax.scale_by_adam(b1=mu, b2=ADAM_B2, eps=ADAM_EPS, eps_root=ADAM_EPS_ROOT)


@pytest.mark.parametrize("name, mu", [("momentum", 0.9), ("momentum", 0.5), ("adam", 0.9)])
def test_inner_optimizer_equals_a_python_loop(name, mu):
    """T steps of momentum / Adam with per-step step sizes, scanned, against optax's
    transformation applied step by step in Python."""
    with jax.enable_x64():
        apply_fn, init_params, learned, hard, _, _ = _problem()
        theta0 = _net(init_params)
        etas = learned.step_sizes * (0.01 if name == "adam" else 1.0)
        spec = InnerSpec(name, mu)
        for labels in (hard, learned.labels):
            scanned = jax.jit(functools.partial(optimizer_train, apply_fn, epochs=EPOCHS, spec=spec))(
                theta0, learned.images, labels, etas)
            reference = _optax_reference(name, mu)
            state = reference.init(theta0)
            looped = theta0
            loss_grad = jax.jit(jax.grad(lambda p, x, y: cross_entropy(apply_fn(p, x), y)))
            for t in range(T):
                g = loss_grad(looped, learned.images[t % STEPS], labels[t % STEPS])
                direction, state = reference.update(g, state, looped)
                looped = jax.tree.map(lambda p, d: p - etas[t] * d, looped, direction)
            _assert_trees_close(scanned, looped)
            # not vacuous: plain GD with the same step sizes ends elsewhere
            gd = inner_train(apply_fn, theta0, learned.images, labels, etas, EPOCHS)
            assert max(float(jnp.max(jnp.abs(a - b))) for a, b in
                       zip(jax.tree.leaves(gd), jax.tree.leaves(scanned))) > 1e-4


def test_gd_through_optimizer_train_equals_inner_train():
    with jax.enable_x64():
        apply_fn, init_params, learned, _, _, _ = _problem()
        theta0 = _net(init_params)
        a = optimizer_train(apply_fn, theta0, learned.images, learned.labels, learned.step_sizes,
                            EPOCHS, InnerSpec("gd"))
        b = inner_train(apply_fn, theta0, learned.images, learned.labels, learned.step_sizes, EPOCHS)
        _assert_trees_close(a, b)


def test_adam_update_is_finite_where_a_gradient_is_exactly_zero():
    """eps_root keeps the second derivative finite at g = 0 (a dead unit's gradient)."""
    spec = InnerSpec("adam")
    f = lambda g: optimizer_update(spec, jnp.ones(2), (jnp.zeros(2), jnp.zeros(2)), g,
                                   jnp.float32(0.1), jnp.int32(0))[0].sum()
    hess = jax.hessian(f)(jnp.array([0.0, 1.0]))
    assert bool(jnp.all(jnp.isfinite(hess)))


@pytest.mark.parametrize("name", ["momentum", "adam"])
def test_inner_optimizer_meta_gradient_matches_finite_differences(name):
    """Full unroll (no window) with learned labels: d meta-loss / d(images, step sizes, labels)."""
    with jax.enable_x64():
        apply_fn, init_params, learned, hard, real_x, real_y = _problem(seed=3)
        if name == "adam":
            learned = learned.replace(raw_step_sizes=learned.raw_step_sizes - 3.0)
        f = functools.partial(meta_loss, labels=hard, init_params=init_params, real_x=real_x,
                              real_y=real_y, apply_fn=apply_fn, epochs=EPOCHS,
                              inner=InnerSpec(name))
        check = finite_difference_check(f, 1e-5)
        rng = np.random.default_rng(7)
        unit = lambda a: jnp.asarray(a / np.linalg.norm(a))
        for _ in range(3):
            v = jax.tree.map(lambda a: unit(rng.normal(size=a.shape)), learned)
            _, analytic, numeric = check(learned, v)
            assert_matches_finite_difference(analytic, numeric, 1e-4)


# --------------------------------------------------------------------------- truncated windows


def _explicit_window_loss(learned, hard, init_params, real_x, real_y, apply_fn, spec, stop):
    """The truncated meta-loss written out: a Python loop of `stop` steps, the first
    stop - W on stop_gradient copies of everything, the last W on the learned data."""
    sg = jax.lax.stop_gradient
    n_before = stop - spec.window

    def one_net(theta0):
        params, state = sg(theta0), ()
        if spec.optimizer != "gd":
            zeros = jax.tree.map(jnp.zeros_like, theta0)
            state = zeros if spec.optimizer == "momentum" else (zeros, zeros)
        for t in range(stop):
            data = sg(learned) if t < n_before else learned
            x, y = data.images[t % STEPS], data.labels[t % STEPS]
            g = jax.grad(lambda p: cross_entropy(apply_fn(p, x), y))(params)
            params, state = optimizer_update(spec, params, state, g, data.step_sizes[t], t)
            if t == n_before - 1:
                params, state = sg((params, state))
        return cross_entropy(apply_fn(params, real_x), real_y)

    return jnp.mean(jnp.stack([one_net(_net(init_params, i))
                               for i in range(jax.tree.leaves(init_params)[0].shape[0])]))


@pytest.mark.parametrize("optimizer, window, stop, remat", [
    ("gd", 2, 5, False), ("gd", 3, 3, True), ("momentum", 2, 6, False), ("adam", 3, 4, True),
])
def test_window_gradient_equals_explicit_stop_gradient(optimizer, window, stop, remat):
    """Loss and gradient of the window (steps stop-W .. stop-1 differentiated, the steps before
    forward only, a traced stop) equal the written-out loop's; the steps outside the window get
    exactly zero step-size gradient, those inside a non-zero one."""
    with jax.enable_x64():
        apply_fn, init_params, learned, hard, real_x, real_y = _problem(seed=1)
        spec = InnerSpec(optimizer, 0.9, window)
        f = jax.jit(jax.value_and_grad(functools.partial(
            meta_loss, apply_fn=apply_fn, epochs=EPOCHS, remat=remat, inner=spec)))
        loss, grad = f(learned, hard, init_params, real_x, real_y, stop=jnp.int32(stop))
        ref_loss, ref_grad = jax.value_and_grad(_explicit_window_loss)(
            learned, hard, init_params, real_x, real_y, apply_fn, spec, stop)
        np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-12)
        _assert_trees_close(grad, ref_grad, rtol=1e-9, atol=1e-12)
        eta_grad = np.asarray(grad.raw_step_sizes)
        inside = np.zeros(T, bool)
        inside[stop - window : stop] = True
        assert np.all(eta_grad[~inside] == 0.0)
        assert np.all(np.abs(eta_grad[inside]) > 0)
        assert float(jnp.max(jnp.abs(grad.images))) > 1e-6
        assert float(jnp.max(jnp.abs(grad.labels))) > 1e-6


@pytest.mark.parametrize("optimizer", ["gd", "adam"])
def test_window_over_all_steps_is_the_full_unroll(optimizer):
    with jax.enable_x64():
        apply_fn, init_params, learned, hard, real_x, real_y = _problem(seed=2)
        full_spec = None if optimizer == "gd" else InnerSpec(optimizer)
        f = functools.partial(meta_loss, apply_fn=apply_fn, epochs=EPOCHS)
        full = jax.value_and_grad(functools.partial(f, inner=full_spec))(
            learned, hard, init_params, real_x, real_y)
        windowed = jax.value_and_grad(functools.partial(
            f, inner=InnerSpec(optimizer, 0.9, T), stop=jnp.int32(T)))(
            learned, hard, init_params, real_x, real_y)
        np.testing.assert_allclose(float(windowed[0]), float(full[0]), rtol=1e-12)
        _assert_trees_close(windowed[1], full[1], rtol=1e-9, atol=1e-12)


def test_window_stop_is_a_pure_function_of_key_and_iteration():
    key = jax.random.PRNGKey(3)
    stops = [int(window_stop(key, i, 60, 200)) for i in range(200)]
    assert all(60 <= s <= 200 for s in stops)
    assert len(set(stops)) > 50  # the position moves
    assert stops == [int(window_stop(key, i, 60, 200)) for i in range(200)]
    assert stops != [int(window_stop(jax.random.PRNGKey(4), i, 60, 200)) for i in range(200)]
    assert {int(window_stop(key, i, 5, 5)) for i in range(10)} == {5}


# --------------------------------------------------------------------------- the outer loop


def _tiny_config(**overrides):
    c = default_config()
    c.update(dict(dataset="digits", iterations=4, real_batch_size=32, eval_every=10**6,
                  log_every=1, checkpoint_every=10**6, n_eval_nets_during=1))
    c.update(overrides)
    return c


def test_flags_off_is_the_plain_inner_loop():
    """Defaults build no InnerSpec and no learned labels: meta_loss's inner_train path."""
    assert inner_spec(default_config()) is None
    assert inner_spec(_tiny_config(inner_optimizer="momentum")) == InnerSpec("momentum", 0.9, 0)
    assert inner_spec(_tiny_config(window=2)) == InnerSpec("gd", 0.9, 2)


def test_fixed_inner_lr_is_never_learned(digits28):
    rows = []
    d = dd_jax.distill(digits28, make_tiny_convnet(10), _tiny_config(
        epochs=4, inner_optimizer="adam", inner_lr=0.003, window=2), progress=False, log=rows.append)
    expected = np.asarray(Learned(jnp.zeros(1), jnp.full(4, dd_jax.meta.raw_step_size(0.003),
                                                          jnp.float32)).step_sizes)
    np.testing.assert_array_equal(d.step_sizes, expected)
    np.testing.assert_allclose(d.step_sizes, 0.003, rtol=1e-6)
    assert d.inner_optimizer == "adam" and all(np.isfinite(r["meta_loss"]) for r in rows)
    assert len({r["meta_loss"] for r in rows}) == 4


@pytest.mark.parametrize("overrides, message", [
    (dict(window=4), "window=4 must be between 0 (all steps) and the T = steps x epochs = 3"),
    (dict(window=-1), "window=-1 must be between 0"),
    (dict(inner_optimizer="sgd"), "unknown inner_optimizer 'sgd'; choose one of: gd, momentum, adam"),
    (dict(inner_lr=-0.1), "inner_lr must be >= 0"),
    (dict(inner_momentum=1.0), "inner_momentum must be in [0, 1)"),
    (dict(images_per_step=-1), "images_per_step must be >= 0"),
    (dict(images_per_step=5), "images_per_step=5 is not a multiple of the 10 classes"),
])
def test_bad_unroll_settings_are_config_errors(digits28, overrides, message):
    with pytest.raises(dd_jax.ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[")):
        build_outer_loop(digits28, make_tiny_convnet(10), _tiny_config(**overrides))


@pytest.mark.slow
def test_window_over_300_steps_fits_with_remat(digits28):
    """T = 300 with a 60-step window and remat: XLA's temporary buffers for one meta-step
    stay within 2x those of T = 30 (the window and the checkpoints, not T steps' tape)."""
    sizes = {}
    for epochs in (30, 300):
        loop = build_outer_loop(digits28, dd_jax.LeNet(), _tiny_config(
            steps=1, epochs=epochs, window=min(60, epochs), remat=True, learn_labels=True,
            inner_optimizer="adam", real_batch_size=64))
        sizes[epochs] = loop.compiled_step().memory_analysis().temp_size_in_bytes
    assert sizes[300] < 2 * sizes[30], sizes


SHARDED_CHECK = """
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
sys.path.insert(0, sys.argv[1])
import jax, jax.numpy as jnp, numpy as np
from test_unroll import _problem
from dd_jax.meta import meta_loss
from dd_jax.sharding import make_mesh, sharded_meta_loss
from dd_jax.unroll import InnerSpec
jax.config.update("jax_enable_x64", True)
apply_fn, init_params, learned, hard, real_x, real_y = _problem(seed=5)
kw = dict(apply_fn=apply_fn, epochs=3, inner=InnerSpec("adam", 0.9, 2), stop=jnp.int32(4))
one = jax.value_and_grad(meta_loss)(learned, hard, init_params, real_x, real_y, **kw)
mesh = make_mesh(jax.devices(), 2, 10)
two = jax.jit(jax.value_and_grad(lambda *a: sharded_meta_loss(mesh)(*a, **kw)))(
    learned, hard, init_params, real_x, real_y)
for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(two)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-9, atol=1e-12)
print("ok", len(jax.devices()))
"""


def test_sharded_window_equals_one_device():
    """The window's stop reaches every device: 2 simulated devices give the 1-device gradient."""
    proc = subprocess.run([sys.executable, "-c", SHARDED_CHECK, str(ROOT / "tests")],
                          capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["ok", "2"]
