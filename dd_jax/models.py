"""Stage 2 - the network: LeNet and AlexCifarNet as in the paper, and the `Model` init/apply pair.

`model_fn`, wherever the library takes one, is either a Flax module (anything with
``init(key, x) -> variables`` and ``apply(variables, x) -> logits``, variables holding only
``'params'``) or a `Model` built from your own pure functions. Inputs are NHWC float32 images,
outputs are logits of shape (N, num_classes).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dd_jax import native
from dd_jax.errors import ConfigError

Params = Any


class Model(NamedTuple):
    """A pure network: ``init(key, x) -> params`` and ``apply(params, x) -> logits``."""

    init: Callable[[jax.Array, jax.Array], Params]
    apply: Callable[[Params, jax.Array], jax.Array]


def as_model(model_fn: Any) -> Model:
    """Turns a Flax module, a `Model` or an ``(init, apply)`` pair into a `Model`."""
    if isinstance(model_fn, Model):
        return model_fn
    if isinstance(model_fn, nn.Module):
        return Model(
            init=lambda key, x: model_fn.init(key, x)["params"],
            apply=lambda params, x: model_fn.apply({"params": params}, x),
        )
    if isinstance(model_fn, tuple) and len(model_fn) == 2 and all(map(callable, model_fn)):
        return Model(*model_fn)
    raise ConfigError(
        f"model_fn must be a flax.linen.Module, a dd_jax.Model or an (init, apply) pair, "
        f"got {type(model_fn).__name__}"
    )


def _toeplitz_kernel(kernel: jax.Array, width: int, padding: int, phases: int) -> jax.Array:
    """HWIO kernel (kh, kw, ci, co) -> (rows*width*ci, phases**2*(wo//phases)*co) Toeplitz matrix,
    wo = width+2*padding-kw+1, rows = kh rounded up to a multiple of `phases` after adding
    phases-1.

    It maps a window of `rows` input rows (width*ci values each, unpadded: the zero columns of
    the padding contribute nothing and are left out) to the outputs of `phases` consecutive
    output rows. Rows are ordered (u, a, c), columns (r, q, x', o) for output row r of the
    window and output column x = phases*x' + q:
    entry = kernel[u-r, a+padding-x, c, o] where 0 <= u-r < kh and 0 <= a+padding-x < kw, else 0.
    """
    kh, kw, ci, co = kernel.shape
    wo = width + 2 * padding - kw + 1
    rows = phases * -(-(kh + phases - 1) // phases)
    u, r, i = np.ogrid[:rows, :phases, :kh]
    a, q, x, j = np.ogrid[:width, :phases, : wo // phases, :kw]
    row_shift = (u == r + i).astype(kernel.dtype)
    col_shift = (a + padding == phases * x + q + j).astype(kernel.dtype)
    return jnp.einsum("uri,aqxj,ijco->uacrqxo", row_shift, col_shift, kernel).reshape(
        rows * width * ci, phases * phases * (wo // phases) * co
    )


@jax.custom_vjp
def max_pool_blocks(x: jax.Array) -> jax.Array:
    """(M, 4C) -> (M, C): the elementwise max of the four contiguous blocks of C columns.

    With the blocks holding the (0, 0), (0, 1), (1, 0), (1, 1) positions of 2x2 windows this
    is 2x2 max pooling; the gradient goes to the first maximum in that (row-major) order, as
    in PyTorch's MaxPool2d (JAX's own max splits it between ties). One pass forward and one
    back: several times cheaper on XLA:CPU than differentiating ``max`` over reshaped axes.
    """
    return _max_pool_blocks_fwd(x)[0]


def _max_pool_blocks_fwd(x):
    blocks = x.reshape(x.shape[0], 4, -1)
    # argmax picks the first maximum; int8 keeps the saved index small
    return blocks.max(axis=1), jnp.argmax(blocks, axis=1).astype(jnp.int8)


def _max_pool_blocks_bwd(index, g):
    zero = jnp.zeros_like(g)
    return (jnp.concatenate([jnp.where(index == k, g, zero) for k in range(4)], axis=-1),)


max_pool_blocks.defvjp(_max_pool_blocks_fwd, _max_pool_blocks_bwd)


def _pool_blocks(y: jax.Array) -> jax.Array:
    """(N, H, W, C) -> (N*H/2, 4*(W/2)*C): each pair of rows as `max_pool_blocks` takes it,
    the four positions of the 2x2 windows as four contiguous blocks of (x // 2, feature)."""
    n, h, w, c = y.shape
    return y.reshape(n, h // 2, 2, w // 2, 2, c).transpose(0, 1, 2, 4, 3, 5).reshape(n * h // 2, -1)


def _toeplitz_conv(x: jax.Array, kernel: jax.Array, padding: int, pool: bool) -> jax.Array:
    """The convolution (N, H, W, Ci) -> (N*Ho/s, (Wo/s)*Co) as one matmul of stacked input
    rows with the row-Toeplitz kernel, whose columns are ordered as `_pool_blocks` for the 2x2
    max pooling of ``pool`` (s = 2)."""
    kh, kw, cin, _ = kernel.shape
    n, _, w, _ = x.shape
    p, s = padding, 2 if pool else 1
    h = x.shape[1] + 2 * p
    extra = -h % s  # a zero row so that the rows pair up; its weights are all zero
    x = x.reshape(n, h - 2 * p, w * cin)
    if p or extra:  # zero rows only: T leaves the zero columns out
        x = jnp.pad(x, ((0, 0), (p, p + extra), (0, 0)))
    t = _toeplitz_kernel(kernel, w, p, s)
    groups = x.reshape(n, (h + extra) // s, s * w * cin)  # s consecutive input rows each
    per_window = t.shape[0] // (s * w * cin)
    rows = (h - kh + 1) // s
    windows = jnp.stack([groups[:, j : j + rows] for j in range(per_window)], axis=2)
    out = windows.reshape(n * rows, -1) @ t
    return max_pool_blocks(out) if pool else out


def _patches_conv(x: jax.Array, kernel: jax.Array, padding: int, pool: bool) -> jax.Array:
    """`_toeplitz_conv`'s outputs from im2col patches, (N*Ho*Wo, kh*kw*Ci) @ the kernel:
    (N, Ho, Wo, Co), or (N*Ho/2, (Wo/2)*Co) pooled with ``pool``."""
    kh, kw, cin, co = kernel.shape
    n, h, w, _ = x.shape
    ho, wo = h + 2 * padding - kh + 1, w + 2 * padding - kw + 1
    x = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    patches = jnp.stack([x[:, i : i + ho, j : j + wo] for i in range(kh) for j in range(kw)], axis=3)
    y = (patches.reshape(n * ho * wo, kh * kw * cin) @ kernel.reshape(-1, co)).reshape(n, ho, wo, co)
    return max_pool_blocks(_pool_blocks(y)) if pool else y


def _native_conv(x: jax.Array, kernel: jax.Array, bias: jax.Array, padding: int, pool: bool,
                 relu: bool) -> jax.Array:
    """The layer's output (N, H, W, Ci) -> (N, Ho/s, Wo/s, Co) from the C++ kernels
    (`dd_jax.native`, CPU only), pooled, biased and rectified there, in their blocked layout
    (so XLA cancels the layout changes between layers)."""
    y = native.conv_layer(native.to_blocked(x), kernel, bias, padding, pool, relu)
    return native.from_blocked(y, x.shape[0])


class ToeplitzConv(nn.Module):
    """Stride-1 2-D convolution as one matmul of stacked input rows with a row-Toeplitz
    kernel, optionally followed by 2x2 max pooling.

    Same parameters (``kernel`` HWIO, ``bias``) and the same function as
    ``nn.Conv(features, kernel_size, padding=padding)``, or with ``pool=True`` as
    ``max_pool_2x2`` of it. Each output row is (kh input rows side by side) @ T: building the
    windows copies whole rows (no per-pixel patches), and the forward pass, the kernel
    gradient and the input gradient are each one large matmul, which XLA:CPU runs several
    times faster than its native convolution or an im2col at the real batch's size (1024
    MNIST images). With ``pool`` a window is kh+1
    rows (whole pairs of input rows, so the windows are a stack of row-pair slices) and holds
    both output rows of a pooling window; T's columns are ordered (row parity, column parity,
    x // 2, feature), so the pooling is a max over four contiguous blocks (`max_pool_blocks`)
    and the bias is added after it (max commutes with adding a per-feature constant).

    Batches of at most ``patches_up_to`` images (the distilled batches of the inner loop) are
    convolved from im2col patches instead: there the per-op cost of building T from the
    kernel at every inner step outweighs the Toeplitz form's larger matmuls. With ``native``,
    the larger batches are convolved by the C++ kernels of `dd_jax.native` when the program
    runs on CPU and they could be built: direct convolutions, 3x faster than the Toeplitz
    matmuls there (LeNet's real batch). ``relu`` rectifies the output (fused there).
    x (N, H, W, Ci) -> (N, Ho, Wo, features), Ho = H + 2p - kh + 1 (halved with ``pool``).
    """

    features: int
    kernel_size: tuple[int, int]
    padding: int = 0
    pool: bool = False
    patches_up_to: int = 64
    native: bool = False
    relu: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kh, kw = self.kernel_size
        n, _, _, cin = x.shape
        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(), (kh, kw, cin, self.features)
        )
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        s = 2 if self.pool else 1
        ho = x.shape[1] + 2 * self.padding - kh + 1
        wo = x.shape[2] + 2 * self.padding - kw + 1
        if ho % s or wo % s:
            raise ConfigError(f"2x2 pooling needs an even convolution output, got {ho}x{wo}")
        conv = _patches_conv if n <= self.patches_up_to else _toeplitz_conv

        def in_xla(x, kernel, bias):
            out = conv(x, kernel, self.padding, self.pool).reshape(n, ho // s, wo // s, -1) + bias
            return nn.relu(out) if self.relu else out

        if n > self.patches_up_to and self.native and native.enabled():
            on_cpu = functools.partial(_native_conv, padding=self.padding, pool=self.pool,
                                       relu=self.relu)
            return jax.lax.platform_dependent(x, kernel, bias, cpu=on_cpu, default=in_xla)
        return in_xla(x, kernel, bias)


# What a model's ``conv`` field selects: the same function, the same parameters.
# 'native' (ToeplitzConv with the C++ kernels of dd_jax.native for large batches on CPU) is the
# fast one on CPU, 'toeplitz' (ToeplitzConv) the fastest in pure XLA; 'xla' is flax.linen.Conv.
CONVS = ("native", "toeplitz", "xla")


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max pooling, stride 2, as a reshape + max (faster to differentiate on XLA:CPU than
    nn.max_pool's select-and-scatter; the same function for even H and W)."""
    n, h, w, c = x.shape
    return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def conv5x5(kind: str, features: int, padding: int, name: str, model: str) -> nn.Module:
    """A 5x5 stride-1 convolution layer of kind ``'native'`` or ``'toeplitz'`` (`ToeplitzConv`)
    or ``'xla'`` (``flax.linen.Conv``): the same function with the same parameters."""
    if kind in ("native", "toeplitz"):
        return ToeplitzConv(features, (5, 5), padding, native=kind == "native", name=name)
    if kind == "xla":
        return nn.Conv(features, (5, 5), padding=padding, name=name)
    raise ConfigError(f"{model} conv must be one of {', '.join(CONVS)}; got {kind!r}")


class LeNet(nn.Module):
    """LeNet-5 of the paper: conv5x5-6, pool, conv5x5-16, pool, fc120, fc84, fc(classes), ReLU.

    28x28 inputs are zero-padded by 2 in the first convolution (as the authors' code does), so
    both 28x28 and 32x32 inputs reach a 5x5x16 feature map. ``conv`` 'native' (default),
    'toeplitz' and 'xla' compute the same function with the same parameter tree (`CONVS`).
    """

    num_classes: int = 10
    conv: str = "native"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        pad = 2 if x.shape[1] == 28 else 0

        def conv_pool_relu(x, features, padding, name):
            """relu(max_pool_2x2(conv(x))): the same as pooling relu(conv(x))."""
            if self.conv in ("native", "toeplitz"):
                return ToeplitzConv(features, (5, 5), padding, pool=True, relu=True,
                                    native=self.conv == "native", name=name)(x)
            return nn.relu(max_pool_2x2(conv5x5(self.conv, features, padding, name, "LeNet")(x)))

        x = conv_pool_relu(x, 6, pad, "conv1")
        x = conv_pool_relu(x, 16, 0, "conv2")
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(120, name="fc1")(x))
        x = nn.relu(nn.Dense(84, name="fc2")(x))
        return nn.Dense(self.num_classes, name="fc3")(x)


def max_pool_3x3_s2_p1(x: jax.Array) -> jax.Array:
    """3x3 max pooling, stride 2, padding 1 (PyTorch ``MaxPool2d(3, 2, 1)``: the padding never
    wins), as the max of 9 strided slices; (N, H, W, C) -> (N, ceil(H/2), ceil(W/2), C)."""
    n, h, w, c = x.shape
    ho, wo = (h + 1) // 2, (w + 1) // 2
    x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
    windows = [x[:, i : i + 2 * ho - 1 : 2, j : j + 2 * wo - 1 : 2, :]
               for i in range(3) for j in range(3)]
    return functools.reduce(jnp.maximum, windows)


def local_response_norm(
    x: jax.Array, size: int = 4, alpha: float = 0.001 / 9.0, beta: float = 0.75, k: float = 1.0
) -> jax.Array:
    """PyTorch's ``LocalResponseNorm(size, alpha, beta, k)`` across channels of NHWC `x`:
    x_c / (k + alpha * mean of x_{c'}^2 over c' = c - size//2 .. c + (size-1)//2)^beta,
    channels outside the range counting as zeros."""
    c = x.shape[-1]
    sq = jnp.pad(jnp.square(x), ((0, 0),) * (x.ndim - 1) + ((size // 2, (size - 1) // 2),))
    window_sum = sum(sq[..., i : i + c] for i in range(size))
    return x / (k + alpha * window_sum / size) ** beta


class AlexCifarNet(nn.Module):
    """The authors' CIFAR-10 network (after cuda-convnet), 32x32 inputs: conv5x5-64 (pad 2),
    ReLU, max-pool 3/2/1, LRN, conv5x5-64 (pad 2), ReLU, LRN, max-pool 3/2/1, fc384, ReLU,
    fc192, ReLU, fc(classes). LRN: size 4, alpha 0.001/9, beta 0.75, k 1.

    The 8x8x64 feature map is flattened in H, W, C order (PyTorch: C, H, W). ``conv`` as LeNet.
    """

    num_classes: int = 10
    conv: str = "native"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = lambda features, name: conv5x5(self.conv, features, 2, name, "AlexCifarNet")
        x = local_response_norm(max_pool_3x3_s2_p1(nn.relu(conv(64, "conv1")(x))))
        x = max_pool_3x3_s2_p1(local_response_norm(nn.relu(conv(64, "conv2")(x))))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(384, name="fc1")(x))
        x = nn.relu(nn.Dense(192, name="fc2")(x))
        return nn.Dense(self.num_classes, name="fc3")(x)


class MLP(nn.Module):
    """A plain multilayer perceptron, for cross-architecture evaluation: flatten, ``hidden``
    fully connected ReLU layers (default two of 128 units), fc(classes).

    x (N, H, W, C) -> logits (N, num_classes). Flax's default initialisers (LeCun normal
    kernels, zero biases).
    """

    num_classes: int = 10
    hidden: tuple[int, ...] = (128, 128)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape(x.shape[0], -1)
        for i, units in enumerate(self.hidden):
            x = nn.relu(nn.Dense(units, name=f"fc{i + 1}")(x))
        return nn.Dense(self.num_classes, name=f"fc{len(self.hidden) + 1}")(x)


def conv3x3_patches(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """3x3 stride-1 convolution with zero padding 1, (N, H, W, Ci) -> (N, H, W, Co), as one
    matmul of im2col patches (the nine shifted copies of x side by side) with the HWIO kernel
    (3, 3, Ci, Co) reshaped to (9 Ci, Co): the same function as ``nn.Conv(Co, (3, 3),
    padding=1)``. XLA:CPU runs a convolution inside a ``lax.scan`` body (a training loop) many
    times slower than this matmul."""
    n, h, w, _ = x.shape
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    patches = jnp.concatenate([xp[:, i : i + h, j : j + w] for i in range(3) for j in range(3)], -1)
    out = patches.reshape(n * h * w, -1) @ kernel.reshape(-1, kernel.shape[-1])
    return out.reshape(n, h, w, -1)


class Conv3x3(nn.Module):
    """`conv3x3_patches` plus a bias: the function and the parameters (``kernel`` HWIO,
    ``bias``) of ``nn.Conv(features, (3, 3), padding=1)``. (N, H, W, Ci) -> (N, H, W, features)."""

    features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (3, 3, x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        return conv3x3_patches(x, kernel) + bias


def avg_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 average pooling, stride 2, (N, H, W, C) -> (N, H // 2, W // 2, C): an odd last row
    or column is dropped (PyTorch's ``AvgPool2d(2, 2)``)."""
    n, h, w, c = x.shape
    x = x[:, : h // 2 * 2, : w // 2 * 2]
    return x.reshape(n, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


class ConvNet(nn.Module):
    """ConvNet-3 of the later dataset-distillation papers (DC, DSA, MTT): ``depth`` blocks of
    conv 3x3 (``width`` filters, padding 1, `Conv3x3`) -> instance norm (per-channel
    affine) -> ReLU -> 2x2 average pooling (`avg_pool_2x2`), then one linear classifier.

    As their code, inputs keep their size and the pooling floors odd sizes: 28x28 MNIST gives
    28 -> 14 -> 7 -> 3, a 3x3x128 feature map (32x32 gives 4x4x128), flattened in H, W, C
    order. Instance norm is group norm with one channel per group (epsilon 1e-5), as their
    ``GroupNorm(width, width, affine=True)``. x (N, H, W, C) -> logits (N, num_classes).
    Parameters as ``nn.Conv`` (``conv<i>``: ``kernel`` HWIO, ``bias``), ``norm<i>`` and ``fc``;
    Flax's default initialisers (LeCun normal kernels, zero biases, unit norm scales).
    """

    num_classes: int = 10
    width: int = 128
    depth: int = 3

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(1, self.depth + 1):
            x = Conv3x3(self.width, name=f"conv{i}")(x)
            x = nn.GroupNorm(num_groups=self.width, epsilon=1e-5, name=f"norm{i}")(x)
            x = avg_pool_2x2(nn.relu(x))
        return nn.Dense(self.num_classes, name="fc")(x.reshape(x.shape[0], -1))


MODELS: dict[str, Callable[..., nn.Module]] = {"lenet": LeNet, "alexcifarnet": AlexCifarNet}


def get_model(name: str, num_classes: int, conv: str = "native") -> nn.Module:
    """The named architecture of a config (``config.model``)."""
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")
    return MODELS[name](num_classes=num_classes, conv=conv)
