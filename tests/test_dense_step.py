"""The fused inner step (`dd_jax.dense_step`): the C++ head step and its VJP against JAX's own
derivatives, and LeNet's fused GD step against the differentiated apply (its meta-gradient:
tests/test_meta_gradient.py)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dd_jax import native
from dd_jax.dense_step import dense_head_step, fused_gd_step
from dd_jax.inner import gd_step
from dd_jax.models import LeNet, as_model

pytestmark = pytest.mark.skipif(not native.available(), reason="no C++ compiler here")


def _reference_step(layers, features, targets, lr):
    """`dense_head_step` by autodiff: grad of the mean cross-entropy, then p - lr g."""

    def loss(layers, features):
        a = features
        for i, (kernel, bias) in enumerate(layers):
            a = a @ kernel + bias
            if i < len(layers) - 1:
                a = jax.nn.relu(a)
        return -(targets * jax.nn.log_softmax(a)).sum(-1).mean()

    g_layers, g_features = jax.grad(loss, (0, 1))(layers, features)
    new = tuple((k - lr * gk, b - lr * gb) for (k, b), (gk, gb) in zip(layers, g_layers))
    return new, g_features


def _head(rng, dims, n, soft):
    layers = tuple((jnp.asarray(rng.normal(size=(a, b)) / np.sqrt(a)), jnp.asarray(rng.normal(size=b) * 0.3))
                   for a, b in zip(dims[:-1], dims[1:]))
    features = jnp.asarray(rng.normal(size=(n, dims[0])))
    if soft:  # label vectors, not normalised
        targets = jnp.asarray(rng.uniform(-0.2, 1.0, size=(n, dims[-1])))
    else:
        targets = jax.nn.one_hot(jnp.asarray(rng.integers(0, dims[-1], size=n)), dims[-1], dtype=jnp.float64)
    return layers, features, targets


@pytest.mark.parametrize("dims, n, soft", [
    ((400, 120, 84, 10), 10, False),  # LeNet's head, a 10-image step
    ((37, 19, 5), 23, True),          # two blocks of rows, widths off the register size
    ((8, 3), 1, True),                # one layer, one row
], ids=["lenet-10", "2layers-23rows-soft", "1layer-1row"])
def test_head_step_and_vjp_equal_autodiff(dims, n, soft):
    """The step's outputs and its VJP (every input: layers, features, targets, lr) equal JAX's
    derivatives of the same step, float64; under a vmap over networks with shared targets too."""
    with jax.enable_x64():
        rng = np.random.default_rng(3)
        layers, features, targets = _head(rng, dims, n, soft)
        lr = jnp.float64(0.4)
        out, vjp = jax.vjp(dense_head_step, layers, features, targets, lr)
        ref, ref_vjp = jax.vjp(_reference_step, layers, features, targets, lr)
        cotangent = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape)), ref)
        for got, want in zip(jax.tree.leaves((out, vjp(cotangent))), jax.tree.leaves((ref, ref_vjp(cotangent)))):
            np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)

        nets = jax.tree.map(lambda a: jnp.stack([a, 0.7 * a, -a]), (layers, features))
        loss = lambda step: lambda L, f, t, lr: sum(  # noqa: E731
            jnp.sum(jnp.sin(x)) for x in jax.tree.leaves(jax.vmap(step, (0, 0, None, None))(L, f, t, lr)))
        got = jax.jit(jax.grad(loss(dense_head_step), (0, 1, 2, 3)))(*nets, targets, lr)
        want = jax.grad(loss(_reference_step), (0, 1, 2, 3))(*nets, targets, lr)
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-12)


def test_lenet_fused_step_equals_gd_step():
    """LeNet's `fused_gd_step` computes `inner.gd_step` on its apply (float64, hard and
    learned labels); models without a declared head, or without the C++ convolutions, get none."""
    with jax.enable_x64():
        model, step = as_model(LeNet()), fused_gd_step(LeNet())
        assert step is not None and fused_gd_step(LeNet(conv="toeplitz")) is None
        assert fused_gd_step(as_model(LeNet())) is None
        rng = np.random.default_rng(5)
        params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))
        params = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape) * 0.2), params)
        x = jnp.asarray(rng.normal(size=(10, 28, 28, 1)))
        for y in (jnp.arange(10) % 10, jnp.asarray(rng.uniform(size=(10, 10)))):
            got = jax.jit(step)(params, x, y, jnp.float64(0.3))
            want = gd_step(model.apply, params, x, y, jnp.float64(0.3))
            for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
                np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-12)
