"""The C++ convolution kernels (dd_jax.native) against lax.conv: outputs, gradients to second
order (float64, also against finite differences), vmap, bad input, and the fallback."""
from __future__ import annotations

import functools
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from dd_jax import native
from dd_jax.errors import ConfigError
from dd_jax.models import LeNet

pytestmark = pytest.mark.skipif(not native.available(), reason="no C++ compiler here")


def reference_layer(x, kernel, bias, padding, pool, relu):
    """What `native.conv_layer` computes, from lax.conv_general_dilated, NHWC."""
    y = jax.lax.conv_general_dilated(x, kernel, (1, 1), [(padding, padding)] * 2,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     precision=jax.lax.Precision.HIGHEST)
    if pool:
        n, h, w, c = y.shape
        y = y.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))
    y = y + bias
    return jax.nn.relu(y) if relu else y


def native_layer(x, kernel, bias, padding, pool, relu, block=None):
    """`native.conv_layer` on NHWC images, through the blocked layout (blocks of `block`
    images, default `native.block_for`)."""
    y = native.conv_layer(native.to_blocked(x, block), kernel, bias, padding, pool, relu)
    return native.from_blocked(y, x.shape[0])


def _problem(rng, batch, hw, kernel_hw, cin, cout, dtype):
    x = jnp.asarray(rng.normal(size=(batch, *hw, cin)), dtype)
    kernel = jnp.asarray(rng.normal(size=(*kernel_hw, cin, cout)), dtype)
    bias = jnp.asarray(rng.normal(size=(cout,)), dtype)
    return x, kernel, bias


LAYERS = [  # (batch, image hw, kernel hw, padding, pool): batches that are not whole blocks too
    pytest.param(40, (8, 8), (3, 3), 1, True, id="3x3-pad1-pool-batch40"),
    pytest.param(32, (8, 7), (3, 2), 1, False, id="3x2-pad1-batch32"),
    pytest.param(5, (9, 9), (4, 4), 0, True, id="4x4-pad0-pool-batch5"),
    pytest.param(70, (12, 12), (5, 5), 2, True, id="5x5-pad2-pool-batch70"),
]


@pytest.mark.parametrize("block", native.BLOCKS, ids=lambda b: f"block{b}")
@pytest.mark.parametrize("relu", [False, True], ids=["linear", "relu"])
@pytest.mark.parametrize("batch, hw, kernel_hw, padding, pool", LAYERS)
def test_conv_layer_matches_lax_conv_to_second_order(batch, hw, kernel_hw, padding, pool, relu,
                                                     block):
    """float64, blocks of 16 and of 32 images: outputs, the gradient w.r.t. images, kernel and
    bias, and a second derivative (the gradient of <d loss / d kernel, v>, as the meta-gradient
    takes it) agree with lax.conv."""
    with jax.enable_x64():
        rng = np.random.default_rng(batch)
        args = _problem(rng, batch, hw, kernel_hw, 2, 3, jnp.float64)
        v = jnp.asarray(rng.normal(size=args[1].shape))
        blocked = functools.partial(native_layer, block=block)

        def derivatives(layer):
            loss = lambda x, k, b: jnp.sum(jnp.sin(layer(x, k, b, padding, pool, relu)))
            hvp = lambda x, k, b: jnp.vdot(jax.grad(loss, 1)(x, k, b), v)
            return (layer(*args, padding, pool, relu), jax.grad(loss, (0, 1, 2))(*args),
                    jax.grad(hvp, (0, 1, 2))(*args))

        ours, ref = jax.jit(lambda: derivatives(blocked))(), jax.jit(lambda: derivatives(reference_layer))()
        for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
            assert a.shape == b.shape and a.dtype == jnp.float64
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("relu", [False, True], ids=["linear", "relu"])
@pytest.mark.parametrize("differentiated", ["images", "kernel", "both"])
def test_pooled_layer_second_order_through_either_gradient(differentiated, relu):
    """float64: a second derivative through the image gradient, the kernel gradient or both
    (the pooled layer's backward pass recomputes its unpooled gradient, and leaves out the
    transpose of a gradient that nothing differentiates) agrees with lax.conv."""
    with jax.enable_x64():
        rng = np.random.default_rng(11)
        args = _problem(rng, 20, (10, 10), (5, 5), 2, 3, jnp.float64)
        u, v = (jnp.asarray(rng.normal(size=a.shape)) for a in args[:2])
        scales = {"images": (1.0, 0.0), "kernel": (0.0, 1.0), "both": (1.0, 1.0)}[differentiated]

        def second(layer):
            loss = lambda x, k, b: jnp.sum(jnp.sin(layer(x, k, b, 2, True, relu)))

            def directional(x, k, b):
                gx, gk = jax.grad(loss, (0, 1))(x, k, b)
                return sum(s * jnp.vdot(g, w) for s, g, w in zip(scales, (gx, gk), (u, v)) if s)

            return jax.grad(directional, (0, 1, 2))(*args)

        ours, ref = jax.jit(lambda: second(native_layer))(), jax.jit(lambda: second(reference_layer))()
        for a, b in zip(ours, ref):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("nets", [1, 5], ids=["1net", "5nets"])
@pytest.mark.parametrize("block", native.BLOCKS, ids=lambda b: f"block{b}")
@pytest.mark.parametrize("relu", [False, True], ids=["linear", "relu"])
def test_pooled_kernel_gradient_unpools_in_the_kernel(relu, block, nets):
    """float32, kernels vmapped over shared images: the pooled layer's kernel gradient (the
    kernel unpools its dy itself: block by block in each task, or all at once first where the
    kernel's rows are split over tasks, as for one net on two threads) equals
    `conv_weight_grad` of `unpool`'s dy to the bit; its bias gradient (from the pooled
    gradient, in the same call) is dy's sum to float32 rounding."""
    rng = np.random.default_rng(12)
    x, _, bias = _problem(rng, 40, (12, 12), (5, 5), 2, 3, jnp.float32)
    kernels = jnp.asarray(rng.normal(size=(nets, 5, 5, 2, 3)), jnp.float32)
    xb = native.to_blocked(x, block)

    def both(kernel):
        (y, index), vjp = jax.vjp(lambda k, b: native._layer(xb, k, b, (2, 2), True, relu),
                                  kernel, bias)
        g = jnp.cos(y)  # any gradient at the pooled output
        dy = native.unpool(g, y, index, relu)
        ours = vjp((g, np.zeros(index.shape, jax.dtypes.float0)))
        return ours, (native.conv_weight_grad(xb, dy, (2, 2), (5, 5)), dy.sum((0, 1, 2, 4)))

    (dkernel, dbias), (dkernel_ref, dbias_ref) = jax.jit(jax.vmap(both))(kernels)
    assert float(jnp.max(jnp.abs(dkernel_ref))) > 0 and float(jnp.max(jnp.abs(dbias_ref))) > 0
    np.testing.assert_array_equal(np.asarray(dkernel), np.asarray(dkernel_ref))
    np.testing.assert_allclose(np.asarray(dbias), np.asarray(dbias_ref), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pool", [False, True], ids=["conv", "conv+pool"])
def test_conv_layer_gradients_match_finite_differences(pool):
    """float64, first and second order, reverse mode, against central differences."""
    with jax.enable_x64():
        args = _problem(np.random.default_rng(3), 3, (6, 6), (3, 3), 2, 2, jnp.float64)
        f = lambda x, k, b: jnp.tanh(native_layer(x, k, b, 1, pool, True))
        check_grads(f, args, order=2, modes=["rev"], eps=1e-5)


def test_float32_outputs_and_gradients():
    """The float32 kernels (the ones runs use) within float32 rounding of lax.conv."""
    args = _problem(np.random.default_rng(4), 64, (14, 14), (5, 5), 6, 16, jnp.float32)
    loss = lambda layer: lambda *a: jnp.sum(layer(*a, 0, True, True) ** 2)
    for a, b in zip([native_layer(*args, 0, True, True), *jax.grad(loss(native_layer), (0, 1, 2))(*args)],
                    [reference_layer(*args, 0, True, True), *jax.grad(loss(reference_layer), (0, 1, 2))(*args)]):
        assert a.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(b))))


AWKWARD = [  # (batch, image hw, kernel hw, padding, pool, in channels, out channels): channel
    # counts that leave partial register tiles, batches that leave a partial last block of 32
    pytest.param(33, (8, 8), (3, 3), 1, True, 7, 5, id="7to5-pool-batch33"),
    pytest.param(65, (9, 7), (3, 2), 1, False, 7, 5, id="7to5-batch65"),
    pytest.param(70, (10, 10), (5, 5), 2, True, 5, 7, id="5to7-pool-batch70"),
    pytest.param(70, (6, 9), (2, 4), 1, False, 13, 9, id="13to9-batch70"),
    # one input channel (the pooled forward pass and the kernel gradient row by row over
    # zero-padded input rows), one output channel (output pixels side by side), a batch of 10
    # (one block of 16), as LeNet's inner loop
    pytest.param(10, (12, 12), (5, 5), 2, True, 1, 7, id="1to7-pool-batch10"),
    # one input channel, a kernel 7 wide: the pooled forward pass by the general kernels, the
    # kernel gradient's columns in groups of 5 and 2
    pytest.param(10, (12, 12), (3, 7), 1, True, 1, 4, id="1to4-pool-7wide-batch10"),
    pytest.param(40, (9, 11), (3, 5), 2, False, 1, 3, id="1to3-batch40"),
    pytest.param(10, (12, 13), (5, 5), 2, False, 6, 1, id="6to1-batch10"),
    # an image narrower than the kernel's reach: every kernel column partly in the padding
    pytest.param(10, (6, 1), (5, 5), 2, False, 1, 3, id="1to3-width1-batch10"),
]
F32_TOL = 2e-5  # float32 rounding (a few 1e-6 here), relative to the largest entry of an array


@pytest.mark.parametrize("batch, hw, kernel_hw, padding, pool, cin, cout", AWKWARD)
def test_float32_awkward_shapes_to_second_order(batch, hw, kernel_hw, padding, pool, cin, cout):
    """The float32 kernels (the ones runs use) with odd channel counts and batch remainders:
    outputs, the gradient w.r.t. images, kernel and bias, and a second derivative (as in the
    float64 test) agree with lax.conv in float64 on the same inputs to float32 rounding: every
    entry within F32_TOL of the array's largest (sums of up to a few thousand products, whose
    float32 errors grow about as their square root times 6e-8). Without relu: float32 rounding
    of an output near 0 would switch its gradient on or off (relu is checked in float64 above)."""
    rng = np.random.default_rng(batch + cin)
    args32 = _problem(rng, batch, hw, kernel_hw, cin, cout, jnp.float32)
    v = rng.normal(size=args32[1].shape)

    def derivatives(layer, args, v):
        loss = lambda x, k, b: jnp.sum(jnp.sin(layer(x, k, b, padding, pool, False)))
        hvp = lambda x, k, b: jnp.vdot(jax.grad(loss, 1)(x, k, b), v)
        return (layer(*args, padding, pool, False), jax.grad(loss, (0, 1, 2))(*args),
                jax.grad(hvp, (0, 1, 2))(*args))

    ours = jax.jit(derivatives, static_argnums=0)(native_layer, args32, jnp.asarray(v, jnp.float32))
    with jax.enable_x64():
        args64 = [jnp.asarray(np.asarray(a), jnp.float64) for a in args32]
        ref = jax.jit(derivatives, static_argnums=0)(reference_layer, args64, jnp.asarray(v))
        ref = jax.tree.map(np.asarray, ref)
        if pool:  # the same maximum of every 2x2 window: each window's two largest entries
            # differ by more than twice the float32 kernel's largest error before pooling
            y = np.asarray(reference_layer(*args64, padding, False, False))
            err = np.max(np.abs(np.asarray(native_layer(*args32, padding, False, False), np.float64) - y))
            n, h, w, c = y.shape
            windows = np.sort(y.reshape(n, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 5, 2, 4)
                              .reshape(-1, 4), axis=1)
            assert np.min(windows[:, 3] - windows[:, 2]) > 2 * err
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
        assert a.dtype == jnp.float32 and a.shape == b.shape
        scale = float(np.max(np.abs(b)))
        assert scale > 0
        err = float(np.max(np.abs(np.asarray(a, np.float64) - b)))
        assert err <= F32_TOL * scale, (err / scale, a.shape)


def test_vmap_over_kernels_equals_a_loop():
    """n_nets initialisations: the layer vmapped over kernels and biases (the shared images
    unbatched, as the real batch is) equals one call per net."""
    rng = np.random.default_rng(5)
    x, _, _ = _problem(rng, 33, (8, 8), (3, 3), 2, 3, jnp.float32)
    kernels = jnp.asarray(rng.normal(size=(4, 3, 3, 2, 3)), jnp.float32)
    biases = jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)
    loss = lambda k, b: jnp.sum(native_layer(x, k, b, 1, True, True) ** 2)
    batched = jax.vmap(jax.value_and_grad(loss, (0, 1)))(kernels, biases)
    looped = [jax.value_and_grad(loss, (0, 1))(k, b) for k, b in zip(kernels, biases)]
    for i, one in enumerate(looped):
        for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(batched)):
            np.testing.assert_allclose(np.asarray(b[i]), np.asarray(a), rtol=1e-6, atol=1e-5)


def test_one_call_for_nested_vmaps_equals_a_loop_to_second_order():
    """Two nested vmaps (networks x image sets), each operand batched along some of them
    (kernels along the outer, images along the inner, biases along both): one kernel call
    for all items (ffi_call's leading axes) equals one call per item, values, gradients and
    the second derivative the meta-gradient takes."""
    rng = np.random.default_rng(8)
    images = jnp.asarray(rng.normal(size=(3, 10, 8, 8, 2)), jnp.float32)
    kernels = jnp.asarray(rng.normal(size=(2, 3, 3, 2, 4)), jnp.float32)
    biases = jnp.asarray(rng.normal(size=(2, 3, 4)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(3, 3, 2, 4)), jnp.float32)

    def meta(x, k, b):  # a second-order quantity, as the inner step's meta-gradient has
        loss = lambda x, k, b: jnp.sum(jnp.tanh(native_layer(x, k, b, 1, True, True)))
        return jnp.vdot(jax.grad(loss, 1)(x, k, b), v) + loss(x, k, b)

    both = jax.value_and_grad(meta, (0, 1, 2))
    batched = jax.jit(jax.vmap(jax.vmap(both, (0, None, 0)), (None, 0, 0)))(images, kernels, biases)
    for i in range(2):
        for j in range(3):
            one = jax.jit(both)(images[j], kernels[i], biases[i, j])
            for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(batched)):
                np.testing.assert_allclose(np.asarray(b[i, j]), np.asarray(a), rtol=2e-5, atol=2e-4)


def reference_unpool(g, y, index, relu):
    """What `native.unpool` computes, from jnp.where: g (0 where relu and y <= 0) at position
    index of each 2x2 window."""
    g = jnp.where(y > 0, g, 0) if relu else g
    b, h, w, c, lanes = g.shape
    at = jnp.arange(4, dtype=jnp.int8).reshape(2, 1, 2, 1, 1)  # (u, ., v, ., .)
    spread = jnp.where(index[:, :, None, :, None] == at, g[:, :, None, :, None], 0)
    return spread.reshape(b, 2 * h, 2 * w, c, lanes)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("block", native.BLOCKS, ids=lambda b: f"block{b}")
@pytest.mark.parametrize("relu", [False, True], ids=["pool", "pool+relu"])
def test_unpool_and_pool_gather_are_the_pooling_gradient_and_its_transpose(relu, block, dtype):
    """`native.unpool` equals the jnp reference exactly, `native.pool_gather` is its transpose
    exactly, and vmapped over networks with the argmax shared each equals its loop."""
    rng = np.random.default_rng(9)
    with jax.enable_x64(dtype == jnp.float64):
        g, y = (jnp.asarray(rng.normal(size=(2, 3, 4, 5, block)), dtype) for _ in range(2))
        index = jnp.asarray(rng.integers(0, 4, size=g.shape), jnp.int8)
        dy = jnp.asarray(rng.normal(size=(2, 6, 8, 5, block)), dtype)
        assert native.unpool(g, y, index, relu).dtype == dtype
        np.testing.assert_array_equal(native.unpool(g, y, index, relu),
                                      reference_unpool(g, y, index, relu))
        transpose, = jax.linear_transpose(lambda g: reference_unpool(g, y, index, relu), g)(dy)
        np.testing.assert_array_equal(native.pool_gather(dy, y, index, relu), transpose)
        gs = jnp.stack([g, -2 * g, 3 * g])
        batched = jax.vmap(native.unpool, (0, None, None, None))(gs, y, index, relu)
        for n in range(3):
            np.testing.assert_array_equal(batched[n], native.unpool(gs[n], y, index, relu))


def test_unpool_gradients_to_second_order():
    """Differentiated twice through `unpool` and `pool_gather` (each the other's VJP): the
    reference's derivatives."""
    rng = np.random.default_rng(10)
    g, y = (jnp.asarray(rng.normal(size=(1, 2, 3, 2, 16)), jnp.float32) for _ in range(2))
    index = jnp.asarray(rng.integers(0, 4, size=g.shape), jnp.int8)
    w = jnp.asarray(rng.normal(size=(1, 4, 6, 2, 16)), jnp.float32)

    def second(unpool):
        first = jax.grad(lambda g: jnp.sum(jnp.sin(unpool(g, y, index, True)) * w))
        return jax.grad(lambda g: jnp.sum(first(g) ** 2))(g)

    np.testing.assert_allclose(second(native.unpool), second(reference_unpool), rtol=1e-5, atol=1e-6)


def test_an_empty_batch_has_a_zero_kernel_gradient():
    """No images (no blocks), or no vmapped networks: a zero or empty gradient, no crash."""
    x, dy = jnp.zeros((0, 8, 8, 2, 16)), jnp.zeros((0, 6, 6, 3, 16))
    np.testing.assert_array_equal(np.asarray(native.conv_weight_grad(x, dy, (0, 0), (3, 3))),
                                  np.zeros((3, 3, 2, 3)))
    kernels = jnp.zeros((0, 3, 3, 2, 3))
    y = jax.vmap(lambda k: native.conv_layer(jnp.ones((1, 8, 8, 2, 16)), k, jnp.zeros(3), 0))(kernels)
    assert y.shape == (0, 1, 6, 6, 3, 16)


@pytest.mark.parametrize("bad, message", [
    (dict(padding=3), "padding"),
    (dict(pool=True, hw=(7, 7)), "even"),
    (dict(dtype=jnp.float16), "float32 or float64"),
    (dict(kernel_cin=3), "channels"),
])
def test_bad_input_is_a_config_error(bad, message):
    hw, dtype = bad.get("hw", (8, 8)), bad.get("dtype", jnp.float32)
    x = native.to_blocked(jnp.zeros((2, *hw, 2), dtype))
    kernel = jnp.zeros((3, 3, bad.get("kernel_cin", 2), 4), dtype)
    with pytest.raises(ConfigError, match=message):
        native.conv_layer(x, kernel, jnp.zeros(4, dtype), bad.get("padding", 1), bad.get("pool", False))


def test_without_a_compiler_lenet_falls_back_with_a_warning(monkeypatch, tmp_path):
    """No C++ compiler: a warning naming the fix, and the 'native' LeNet computes the same
    function through the Toeplitz path."""
    x = jnp.asarray(np.random.default_rng(6).normal(size=(70, 28, 28, 1)), jnp.float32)
    params = LeNet().init(jax.random.PRNGKey(0), x[:1])
    expected = LeNet(conv="native").apply(params, x)
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("DD_JAX_CACHE_DIR", str(tmp_path))  # nothing built there
    native.available.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="Install g\\+\\+"):
            assert not native.enabled()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # warned once per process, not per call
            fallback = LeNet(conv="native").apply(params, x)
    finally:
        monkeypatch.undo()
        native.available.cache_clear()
    assert native.enabled()
    np.testing.assert_allclose(np.asarray(fallback), np.asarray(expected), rtol=1e-4, atol=1e-4)


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("DD_JAX_NATIVE", "0")
    assert not native.enabled()
    monkeypatch.delenv("DD_JAX_NATIVE")
    assert native.enabled() == (jax.default_backend() == "cpu")


@pytest.mark.slow
def test_build_is_cached(tmp_path, monkeypatch):
    """Built once per source, compiler, jaxlib and CPU: a second build returns the same file."""
    monkeypatch.setenv("DD_JAX_CACHE_DIR", str(tmp_path))
    compiler = os.environ.get("CXX") or "g++"
    first = native._build(compiler)
    mtime = first.stat().st_mtime_ns
    assert native._build(compiler) == first and first.stat().st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary files left
