"""The 5x5 convolution layers of LeNet and AlexCifarNet, three ways with one function and
one set of parameters (`CONVS`): the C++ kernels of `dd_jax.native` on CPU, a row-Toeplitz
matmul in XLA (`ToeplitzConv`, a chain of one layer of `conv_layers`, which LeNet runs its
two through), or ``flax.linen.Conv``; and 2x2 max pooling with PyTorch's gradient
(`max_pool_blocks`, `max_pool_2x2`).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dd_jax import native
from dd_jax.errors import ConfigError


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
    back: cheaper on XLA:CPU than differentiating ``max`` over reshaped axes.
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


ConvSpec = tuple  # one layer: (kernel (kh, kw, Ci, Co), bias (Co,), padding, pool, relu)


def _xla_conv_layer(x: jax.Array, layer: ConvSpec, patches_up_to: int) -> jax.Array:
    """One layer in XLA: (N, H, W, Ci) -> (N, Ho/s, Wo/s, Co), from im2col patches for batches
    of at most `patches_up_to` images, else as a row-Toeplitz matmul; + bias, relu."""
    kernel, bias, padding, pool, relu = layer
    n, s = x.shape[0], 2 if pool else 1
    ho, wo = (x.shape[1 + a] + 2 * padding - kernel.shape[a] + 1 for a in (0, 1))
    conv = _patches_conv if n <= patches_up_to else _toeplitz_conv
    out = conv(x, kernel, padding, pool).reshape(n, ho // s, wo // s, -1) + bias
    return nn.relu(out) if relu else out


def conv_layers(x: jax.Array, layers: list[ConvSpec], native_kernels: bool = False,
                patches_up_to: int = 64) -> jax.Array:
    """Convolution layers (kernel, bias, padding, pool, relu) applied in turn: each a stride-1
    convolution (kernel HWIO (kh, kw, Ci, Co), zero padding), with ``pool`` 2x2 max pooling,
    + bias (Co,), with ``relu`` rectified. x (N, H, W, C) -> (N, H', W', C').

    In XLA (`ToeplitzConv`'s forms); with ``native_kernels``, on CPU where the C++ kernels of
    `dd_jax.native` can be built, the whole chain in their blocked layout: the images are
    blocked once and unblocked once, and the padding lanes of a block (zero images) carry
    their own activations from layer to layer, which no output reads (their gradient is zero).
    """
    h, w = x.shape[1:3]
    for kernel, _, padding, pool, _ in layers:
        h, w = h + 2 * padding - kernel.shape[0] + 1, w + 2 * padding - kernel.shape[1] + 1
        if pool and (h % 2 or w % 2):
            raise ConfigError(f"2x2 pooling needs an even convolution output, got {h}x{w}")
        h, w = (h // 2, w // 2) if pool else (h, w)
    params = [(kernel, bias) for kernel, bias, *_ in layers]  # the arrays; the rest is static
    statics = [tuple(rest) for _, _, *rest in layers]

    def in_xla(x, params):
        for (kernel, bias), rest in zip(params, statics):
            x = _xla_conv_layer(x, (kernel, bias, *rest), patches_up_to)
        return x

    def on_cpu(x, params):
        y = native.to_blocked(x)
        for (kernel, bias), (padding, pool, relu) in zip(params, statics):
            y = native.conv_layer(y, kernel, bias, padding, pool, relu)
        return native.from_blocked(y, x.shape[0])

    if native_kernels and native.enabled():
        return jax.lax.platform_dependent(x, params, cpu=on_cpu, default=in_xla)
    return in_xla(x, params)


def conv_params(module: nn.Module, kernel_size: tuple[int, int], in_features: int,
                features: int) -> tuple[jax.Array, jax.Array]:
    """Declares a convolution's parameters on `module` (from its compact method), as
    ``nn.Conv`` does: ``kernel`` (kh, kw, in_features, features), LeCun normal, then ``bias``
    (features,), zeros. Returns (kernel, bias)."""
    kernel = module.param("kernel", nn.initializers.lecun_normal(),
                          (*kernel_size, in_features, features))
    return kernel, module.param("bias", nn.initializers.zeros_init(), (features,))


class ConvParams(nn.Module):
    """A convolution layer's parameters only (`conv_params`), for a model that applies its
    layers together with `conv_layers`: ``ConvParams(features, kernel_size, name=...)(
    in_features) -> (kernel, bias)``, the parameter tree (and initial values) of
    `ToeplitzConv` of the same name."""

    features: int
    kernel_size: tuple[int, int]

    @nn.compact
    def __call__(self, in_features: int) -> tuple[jax.Array, jax.Array]:
        return conv_params(self, self.kernel_size, in_features, self.features)


class ToeplitzConv(nn.Module):
    """Stride-1 2-D convolution as one matmul of stacked input rows with a row-Toeplitz
    kernel, optionally followed by 2x2 max pooling.

    Same parameters (``kernel`` HWIO, ``bias``) and the same function as
    ``nn.Conv(features, kernel_size, padding=padding)``, or with ``pool=True`` as
    ``max_pool_2x2`` of it. Each output row is (kh input rows side by side) @ T: building the
    windows copies whole rows (no per-pixel patches), and the forward pass, the kernel
    gradient and the input gradient are each one large matmul, which XLA:CPU runs faster than
    its native convolution or an im2col at the real batch's size. With ``pool`` a window is kh+1
    rows (whole pairs of input rows, so the windows are a stack of row-pair slices) and holds
    both output rows of a pooling window; T's columns are ordered (row parity, column parity,
    x // 2, feature), so the pooling is a max over four contiguous blocks (`max_pool_blocks`)
    and the bias is added after it (max commutes with adding a per-feature constant).

    Batches of at most ``patches_up_to`` images (the distilled batches of the inner loop) are
    convolved from im2col patches instead: there the per-op cost of building T from the
    kernel at every inner step outweighs the Toeplitz form's larger matmuls. With ``native``,
    every batch is convolved by the C++ kernels of `dd_jax.native` when the program runs on
    CPU and they could be built: direct convolutions, faster than either form there (a
    10-image distilled batch in one block of 16, all vmapped networks in one call). ``relu``
    rectifies the output (fused there).
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
        kernel, bias = conv_params(self, self.kernel_size, x.shape[-1], self.features)
        layer = (kernel, bias, self.padding, self.pool, self.relu)
        return conv_layers(x, [layer], self.native, self.patches_up_to)


# What a model's ``conv`` field selects: the same function, the same parameters.
# 'native' (ToeplitzConv with the C++ kernels of dd_jax.native for every batch on CPU) is the
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
