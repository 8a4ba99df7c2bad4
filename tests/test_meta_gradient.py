"""The meta-gradient (through every inner GD step) against central finite differences, float64."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_matches_finite_difference, finite_difference_check, make_tiny_convnet, make_tiny_mlp
from dd_jax.meta import Learned, meta_loss
from dd_jax.models import as_model

STEPS, EPOCHS, IPC, K, HW = 2, 2, 1, 3, 4
H_FD = 1e-5
RTOL = 1e-4


def _problem(model_fn, n_nets: int, seed: int):
    """A tiny float64 meta-learning problem: (Learned, labels, init_params, real_x, real_y, apply).

    Random draws come from numpy so that setting up costs no eager XLA compilations.
    """
    model = as_model(model_fn)
    rng = np.random.default_rng(seed)
    # parameter shapes by tracing only; values from numpy (no XLA compilation needed)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, HW, HW, 1)))
    fan_in = lambda s: int(np.prod(s.shape[:-1])) if len(s.shape) > 1 else 4  # biases: std 0.5
    init_params = jax.tree.map(
        lambda s: jnp.asarray(rng.normal(size=(n_nets, *s.shape)) / np.sqrt(fan_in(s))), shapes
    )
    labels = jnp.asarray(np.tile(np.repeat(np.arange(K), IPC), (STEPS, 1)), jnp.int32)
    learned = Learned(
        images=jnp.asarray(rng.normal(size=(STEPS, IPC * K, HW, HW, 1))),
        # step sizes around 0.1-0.5: large enough that the inner loop really moves theta
        raw_step_sizes=jnp.asarray(rng.uniform(-2.0, 0.0, size=(STEPS * EPOCHS,))),
    )
    real_x = jnp.asarray(rng.normal(size=(12, HW, HW, 1)))
    real_y = jnp.asarray(rng.integers(0, K, size=12), jnp.int32)
    return learned, labels, init_params, real_x, real_y, model.apply


def _checker(labels, init_params, real_x, real_y, apply_fn, remat):
    """Jitted (learned, v) -> (grad, <grad, v>, central difference along v) of meta_loss."""
    return finite_difference_check(functools.partial(
        meta_loss, labels=labels, init_params=init_params, real_x=real_x, real_y=real_y,
        apply_fn=apply_fn, epochs=EPOCHS, remat=remat), H_FD)


def _unit(a):
    return jnp.asarray(a / np.linalg.norm(a.ravel()))


CASES = [
    pytest.param("mlp", 1, False, id="mlp-1net"),
    pytest.param("mlp", 3, False, id="mlp-3nets-vmap"),
    pytest.param("mlp", 1, True, id="mlp-1net-remat"),
    pytest.param("mlp", 3, True, id="mlp-3nets-vmap-remat"),
    pytest.param("conv", 3, True, id="conv-3nets-vmap-remat"),
    # max pooling's hand-written gradient (conv.max_pool_blocks), differentiated twice
    pytest.param("conv-pool", 1, False, id="conv-pool-1net"),
    pytest.param("conv-pool", 3, True, id="conv-pool-3nets-vmap-remat"),
    # as LeNet runs: the distilled batches (3 images) from patches, the real batch (12) through
    # the Toeplitz matmul
    pytest.param("conv-pool-mixed", 1, False, id="conv-pool-mixed-1net"),
    pytest.param("conv-pool-mixed", 3, True, id="conv-pool-mixed-3nets-vmap-remat"),
    # the C++ kernels (dd_jax.native) for every batch, so also differentiated twice in the
    # inner loop, and as LeNet runs by default: the real batch only
    pytest.param("conv-pool-native", 1, False, id="conv-pool-native-1net"),
    pytest.param("conv-pool-native", 3, True, id="conv-pool-native-3nets-vmap-remat"),
    pytest.param("conv-pool-native-mixed", 3, False, id="conv-pool-native-mixed-3nets-vmap"),
]

MODELS = {
    "mlp": lambda: make_tiny_mlp(hidden=5, num_classes=K),
    "conv": lambda: make_tiny_convnet(K),
    "conv-pool": lambda: make_tiny_convnet(K, pool=True),
    "conv-pool-mixed": lambda: make_tiny_convnet(K, pool=True, patches_up_to=IPC * K),
    "conv-pool-native": lambda: make_tiny_convnet(K, pool=True, patches_up_to=0, native=True),
    "conv-pool-native-mixed": lambda: make_tiny_convnet(K, pool=True, patches_up_to=IPC * K,
                                                        native=True),
}


@pytest.mark.parametrize("model_name, n_nets, remat", CASES)
def test_meta_gradient_matches_finite_differences(model_name, n_nets, remat):
    with jax.enable_x64():
        model_fn = MODELS[model_name]()
        learned, labels, init_params, real_x, real_y, apply_fn = _problem(model_fn, n_nets, seed=n_nets)
        assert learned.images.dtype == jnp.float64
        assert jax.tree.leaves(init_params)[0].dtype == jnp.float64
        assert jax.tree.leaves(init_params)[0].shape[0] == n_nets
        check = _checker(labels, init_params, real_x, real_y, apply_fn, remat)
        rng = np.random.default_rng(100 + n_nets)
        zeros_img = jnp.zeros_like(learned.images)
        zeros_eta = jnp.zeros_like(learned.raw_step_sizes)

        # random directions: in image space only, in step-size space only, and jointly
        directions = []
        for _ in range(2):
            directions.append(Learned(_unit(rng.normal(size=learned.images.shape)), zeros_eta))
            directions.append(Learned(zeros_img, _unit(rng.normal(size=learned.raw_step_sizes.shape))))
        directions.append(Learned(_unit(rng.normal(size=learned.images.shape)),
                                  _unit(rng.normal(size=learned.raw_step_sizes.shape))))
        # single coordinates: every raw step size (each of the T steps separately, including the
        # later epochs' steps that reuse the same images) ...
        for t in range(STEPS * EPOCHS):
            e = np.zeros(learned.raw_step_sizes.shape)
            e[t] = 1.0
            directions.append(Learned(zeros_img, jnp.asarray(e)))
        # ... and a few pixels of each distilled step
        for s in range(STEPS):
            for _ in range(2):
                e = np.zeros(learned.images.shape)
                e[s, rng.integers(IPC * K), rng.integers(HW), rng.integers(HW), 0] = 1.0
                directions.append(Learned(jnp.asarray(e), zeros_eta))

        for v in directions:
            grad, analytic, numeric = check(learned, v)
            assert_matches_finite_difference(analytic, numeric, RTOL)
        assert grad.images.shape == learned.images.shape
        assert grad.raw_step_sizes.shape == learned.raw_step_sizes.shape
        assert grad.images.dtype == jnp.float64
        assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grad))
        # every inner step contributes: each step size gets a non-zero gradient
        assert bool(jnp.all(jnp.abs(grad.raw_step_sizes) > 0))


@pytest.mark.parametrize("n_nets, remat", [(1, False), (2, True)], ids=["1net", "2nets-vmap-remat"])
def test_lenet_meta_gradient_native_equals_pure_xla(n_nets, remat):
    """LeNet's meta-loss and meta-gradient (images and step sizes, second order through every
    inner step) with its two convolution layers chained through the C++ kernels (10-image
    batches: 6 padding lanes of each block carried from one layer to the next), and with the
    dense head's inner steps fused too (`dense_step.fused_gd_step`), equal the pure-XLA
    Toeplitz path's, in float64."""
    from dd_jax import native
    from dd_jax.dense_step import fused_gd_step
    from dd_jax.models import LeNet
    if not native.available():
        pytest.skip("no C++ compiler here")
    with jax.enable_x64():
        rng = np.random.default_rng(7)
        shapes = jax.eval_shape(LeNet().init, jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))
        init_params = jax.tree.map(lambda s: jnp.asarray(
            rng.normal(size=(n_nets, *s.shape)) / np.sqrt(max(4, np.prod(s.shape[:-1])))), shapes)
        learned = Learned(images=jnp.asarray(rng.normal(size=(2, 10, 28, 28, 1))),
                          raw_step_sizes=jnp.asarray(rng.uniform(-3.0, -1.0, size=(4,))))
        labels = jnp.asarray(np.tile(np.arange(10), (2, 1)), jnp.int32)
        real_x = jnp.asarray(rng.normal(size=(12, 28, 28, 1)))
        real_y = jnp.asarray(rng.integers(0, 10, size=12), jnp.int32)
        results = {}
        for name, conv, step_fn in (("native", "native", None), ("toeplitz", "toeplitz", None),
                                    ("fused", "native", fused_gd_step(LeNet()))):
            loss = functools.partial(meta_loss, labels=labels, init_params=init_params["params"],
                                     real_x=real_x, real_y=real_y,
                                     apply_fn=as_model(LeNet(conv=conv)).apply, epochs=2,
                                     remat=remat, step_fn=step_fn)
            results[name] = jax.jit(jax.value_and_grad(loss))(learned)
        value_xla, grad_xla = results["toeplitz"]
        for value, grad in (results["native"], results["fused"]):
            np.testing.assert_allclose(value, value_xla, rtol=1e-10)
            for g, g_xla in zip(jax.tree.leaves(grad), jax.tree.leaves(grad_xla)):
                assert float(jnp.max(jnp.abs(g_xla))) > 0
                np.testing.assert_allclose(g, g_xla, rtol=1e-8, atol=1e-10 * float(jnp.max(jnp.abs(g_xla))))
