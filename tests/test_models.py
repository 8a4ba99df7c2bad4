"""LeNet's convolution paths against plain flax layers, and how the library accepts a model."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import make_tiny_mlp
from dd_jax import conv
from dd_jax.errors import ConfigError
from dd_jax.inner import cross_entropy
from dd_jax.models import MODELS, LeNet, Model, as_model, get_model


def _assert_trees_close(a, b, rtol, atol):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.shape == y.shape
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def assert_same_outputs_and_grads(a, b, params, x, y, grad_rtol: float = 1e-4):
    """Flax modules `a` and `b` applied with the same `params`: logits within rtol 1e-4 (atol
    1e-5 of the largest logit: float32 rounding grows with it), and each leaf of the
    cross-entropy gradient on (x, y) non-zero and within grad_rtol (atol 1e-4 of the leaf's
    largest entry). Returns both logits."""

    @jax.jit
    def outputs_and_grads(params):
        loss = lambda m, p: cross_entropy(m.apply({"params": p}, x), y)
        return [(m.apply({"params": params}, x), jax.grad(lambda p: loss(m, p))(params))
                for m in (a, b)]

    (o1, g1), (o2, g2) = outputs_and_grads(params)
    np.testing.assert_allclose(np.asarray(o1), np.asarray(o2), rtol=1e-4,
                               atol=max(1e-4, 1e-5 * float(jnp.max(jnp.abs(o2)))))
    for (path, ga), gb in zip(jax.tree_util.tree_leaves_with_path(g1), jax.tree.leaves(g2)):
        scale = float(jnp.max(jnp.abs(gb)))
        assert scale > 0, path
        np.testing.assert_allclose(np.asarray(ga), np.asarray(gb), rtol=grad_rtol,
                                   atol=1e-4 * scale, err_msg=jax.tree_util.keystr(path))
    return o1, o2


class AuthorsLeNet(nn.Module):
    """The reference: the authors' layer order with plain flax.linen layers
    (conv, ReLU, max-pool; conv, ReLU, max-pool; fc120, fc84, fc10), same parameter names."""

    @nn.compact
    def __call__(self, x):
        pad = 2 if x.shape[1] == 28 else 0
        x = nn.max_pool(nn.relu(nn.Conv(6, (5, 5), padding=pad, name="conv1")(x)), (2, 2), (2, 2))
        x = nn.max_pool(nn.relu(nn.Conv(16, (5, 5), padding=0, name="conv2")(x)), (2, 2), (2, 2))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(120, name="fc1")(x))
        x = nn.relu(nn.Dense(84, name="fc2")(x))
        return nn.Dense(10, name="fc3")(x)


@pytest.mark.parametrize("conv", conv.CONVS)
@pytest.mark.parametrize("shape", [(28, 28, 1), (32, 32, 1), (32, 32, 3)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("batch", [3, 70], ids=["batch3", "batch70"])
def test_lenet_equals_plain_flax_lenet(shape, conv, batch):
    """Every conv path computes the authors' LeNet: same parameter tree, outputs and gradients
    (the 'toeplitz' and 'native' paths convolve 3 images from patches, 70 with the Toeplitz
    matmul or the C++ kernels)."""
    rng = np.random.default_rng(sum(shape))
    x = jnp.asarray(rng.normal(size=(batch, *shape)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, size=batch), jnp.int32)
    ours, ref = LeNet(num_classes=10, conv=conv), AuthorsLeNet()

    # same parameter tree (names, shapes, dtypes)
    key = jax.random.PRNGKey(0)
    s_ours = jax.eval_shape(ours.init, key, x[:1])
    s_ref = jax.eval_shape(ref.init, key, x[:1])
    assert jax.tree.structure(s_ours) == jax.tree.structure(s_ref)
    for a, b in zip(jax.tree.leaves(s_ours), jax.tree.leaves(s_ref)):
        assert (a.shape, a.dtype) == (b.shape, b.dtype)
    assert set(s_ours["params"]) == {"conv1", "conv2", "fc1", "fc2", "fc3"}
    assert s_ours["params"]["conv1"]["kernel"].shape == (5, 5, shape[-1], 6)
    assert s_ours["params"]["fc1"]["kernel"].shape == (5 * 5 * 16, 120)

    # non-trivial parameters (random biases too, so the bias path is compared)
    params = jax.tree.map(
        lambda s: jnp.asarray(rng.normal(size=s.shape) * 0.3, jnp.float32), s_ours)["params"]

    logits, _ = assert_same_outputs_and_grads(ours, ref, params, x, y)
    assert logits.shape == (batch, 10)


@pytest.mark.parametrize("patches_up_to, native", [(0, False), (64, False), (0, True)],
                         ids=["toeplitz", "patches", "native"])
@pytest.mark.parametrize("pool", [False, True], ids=["conv", "conv+pool"])
@pytest.mark.parametrize(
    "x_shape, kernel, padding",
    [((2, 8, 7, 3), (3, 2), 1), ((2, 8, 9, 2), (3, 4), 0), ((1, 6, 6, 1), (5, 5), 2)],
    ids=["3x2-pad1", "3x4-pad0", "5x5-pad2"],
)
def test_toeplitz_conv_matches_flax_conv(x_shape, kernel, padding, pool, patches_up_to, native):
    """The building block alone (non-square kernels, padding, several channels), with and
    without the fused 2x2 max-pool, from the Toeplitz matmul, from patches and from the C++
    kernels: outputs and gradients w.r.t. input and parameters."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=x_shape), jnp.float32)
    a = conv.ToeplitzConv(4, kernel, padding, pool=pool, patches_up_to=patches_up_to, native=native)
    b = nn.Conv(4, kernel, padding=padding)
    sa = jax.eval_shape(a.init, jax.random.PRNGKey(0), x)
    sb = jax.eval_shape(b.init, jax.random.PRNGKey(0), x)
    assert jax.tree.map(jnp.shape, sa) == jax.tree.map(jnp.shape, sb)
    p = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape), jnp.float32), sa)
    ref = (lambda p, x: nn.max_pool(b.apply(p, x), (2, 2), (2, 2))) if pool else b.apply
    w = jnp.asarray(rng.normal(size=ref(p, x).shape), jnp.float32)

    @jax.jit
    def both(p, x):
        return [(f(p, x), jax.grad(lambda p, x: jnp.sum(w * f(p, x)), (0, 1))(p, x))
                for f in (a.apply, ref)]

    (ya, ga), (yb, gb) = both(p, x)
    assert ya.shape == yb.shape
    np.testing.assert_allclose(np.asarray(ya), np.asarray(yb), rtol=1e-5, atol=1e-5)
    _assert_trees_close(ga, gb, rtol=1e-4, atol=1e-4)


def test_max_pool_blocks_gives_ties_gradient_to_the_first_maximum():
    """On ties (MNIST's blank background) the whole gradient goes to the first maximum of the
    window in row-major order, as PyTorch's MaxPool2d does; otherwise to the maximum."""
    c = 3
    x = jnp.zeros((2, 4 * c)).at[1, 2 * c + 1].set(5.0)  # row 1, column 1: block 2 wins
    g = jax.grad(lambda x: jnp.sum(jnp.arange(1.0, 7.0).reshape(2, c) * conv.max_pool_blocks(x)))(x)
    expected = np.zeros((2, 4 * c))
    expected[0, :c] = [1, 2, 3]  # all four blocks tie at 0: block 0 takes it
    expected[1, :c] = [4, 0, 6]
    expected[1, 2 * c + 1] = 5
    np.testing.assert_array_equal(np.asarray(g), expected)
    np.testing.assert_array_equal(np.asarray(conv.max_pool_blocks(x)), [[0, 0, 0], [0, 5, 0]])


def test_toeplitz_pool_needs_even_output():
    x = jnp.zeros((1, 8, 8, 1))  # a 2x2 kernel leaves 7x7
    with pytest.raises(ConfigError, match="even"):
        jax.eval_shape(conv.ToeplitzConv(2, (2, 2), pool=True).init, jax.random.PRNGKey(0), x)


def test_max_pool_2x2_equals_flax_max_pool():
    """The pooling of LeNet's 'xla' path."""
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(2, 10, 8, 3)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(2, 5, 4, 3)), jnp.float32)

    @jax.jit
    def both(x):
        ours = lambda x: conv.max_pool_2x2(x)
        ref = lambda x: nn.max_pool(x, (2, 2), (2, 2))
        return ours(x), ref(x), jax.grad(lambda x: jnp.sum(w * ours(x)))(x), \
            jax.grad(lambda x: jnp.sum(w * ref(x)))(x)

    y1, y2, g1, g2 = both(x)
    assert y1.shape == (2, 5, 4, 3)
    np.testing.assert_array_equal(np.asarray(y1), np.asarray(y2))
    np.testing.assert_allclose(np.asarray(g1), np.asarray(g2), rtol=1e-6, atol=1e-6)


def test_lenet_rejects_unknown_conv():
    with pytest.raises(ConfigError, match="conv"):
        jax.eval_shape(LeNet(conv="fft").init, jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))


# --------------------------------------------------------------------------- as_model


def _check_model(model: Model, params_expected_keys=("fc1", "fc2")):
    x = jnp.ones((2, 4, 4, 1))
    params = model.init(jax.random.PRNGKey(0), x)
    assert set(params) == set(params_expected_keys)  # the bare params tree, no {'params': ...}
    logits = model.apply(params, x)
    assert logits.shape == (2, 10)
    return params, logits


def test_as_model_accepts_flax_module():
    module = make_tiny_mlp()
    model = as_model(module)
    assert isinstance(model, Model)
    params, logits = _check_model(model)
    np.testing.assert_allclose(
        np.asarray(logits), np.asarray(module.apply({"params": params}, jnp.ones((2, 4, 4, 1)))))


def test_as_model_passes_model_through():
    m = as_model(make_tiny_mlp())
    assert as_model(m) is m


def test_as_model_accepts_init_apply_pair():
    module = make_tiny_mlp()
    init = lambda key, x: module.init(key, x)["params"]
    apply = lambda p, x: module.apply({"params": p}, x)
    model = as_model((init, apply))
    assert isinstance(model, Model)
    assert model.init is init and model.apply is apply
    _check_model(model)


@pytest.mark.parametrize(
    "bad",
    [
        "lenet",
        None,
        42,
        LeNet,  # the class, not a module instance
        [lambda k, x: None, lambda p, x: None],  # a list, not a pair
        (lambda k, x: None,),  # one function
        (lambda k, x: None, lambda p, x: None, lambda: None),  # three
        (lambda k, x: None, "apply"),  # not callable
        {"init": lambda k, x: None, "apply": lambda p, x: None},
    ],
    ids=["str", "None", "int", "class", "list", "1-tuple", "3-tuple", "non-callable", "dict"],
)
def test_as_model_rejects_other_things(bad):
    with pytest.raises(ConfigError, match="model_fn must be"):
        as_model(bad)


def test_get_model():
    m = get_model("lenet", 7, conv="xla")
    assert isinstance(m, LeNet) and m.num_classes == 7 and m.conv == "xla"
    assert set(MODELS) >= {"lenet"}


@pytest.mark.parametrize("name", ["resnet", "LeNet", ""])
def test_get_model_unknown_name(name):
    with pytest.raises(ConfigError, match="unknown model") as e:
        get_model(name, 10)
    assert "lenet" in str(e.value)  # names the valid choices
    assert isinstance(e.value, ValueError)
