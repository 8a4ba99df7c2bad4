"""Stage 2 - the network: LeNet as in the paper, and the `Model` init/apply pair.

`model_fn`, wherever the library takes one, is either a Flax module (anything with
``init(key, x) -> variables`` and ``apply(variables, x) -> logits``, variables holding only
``'params'``) or a `Model` built from your own pure functions. Inputs are NHWC float32 images,
outputs are logits of shape (N, num_classes).
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

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


def _toeplitz_kernel(kernel: jax.Array, width: int, phases: int) -> jax.Array:
    """HWIO kernel (kh, kw, ci, co) -> (kh*width*ci, wo*co) row-Toeplitz matrix, wo = width-kw+1.

    Row block i maps one padded input row (width*ci values) to kernel row i's contribution to
    one output row. Columns are ordered (q, x', o) for output column x = phases*x' + q:
    entry [(i, a, c), (q, x', o)] = kernel[i, a-x, c, o] where 0 <= a-x < kw, else 0.
    """
    kh, kw, ci, co = kernel.shape
    wo = width - kw + 1
    a, q, x, j = np.ogrid[:width, :phases, : wo // phases, :kw]
    shift = (a == phases * x + q + j).astype(kernel.dtype)
    return jnp.einsum("aqxj,ijco->iacqxo", shift, kernel).reshape(kh * width * ci, wo * co)


class ToeplitzConv(nn.Module):
    """Stride-1 2-D convolution as kh row slices and one matmul with a row-Toeplitz kernel,
    optionally followed by 2x2 max pooling.

    Same parameters (``kernel`` HWIO, ``bias``) and the same function as
    ``nn.Conv(features, kernel_size, padding=padding)``, or with ``pool=True`` as
    ``max_pool_2x2`` of it. Each output row is ``concat(kh input rows) @ T``: the slices copy
    whole rows (no per-pixel patches), and the forward pass, the kernel gradient and the input
    gradient are each one large matmul, which XLA:CPU runs several times faster than its native
    convolution or an im2col. With ``pool``, even and odd output rows are computed as two row
    sets and T's columns are ordered (column parity, x // 2, feature), so the pooling is an
    elementwise max of four contiguous blocks and the bias is added after it (max commutes
    with adding a per-feature constant).
    x (N, H, W, Ci) -> (N, Ho, Wo, features), Ho = H + 2p - kh + 1 (halved with ``pool``).
    """

    features: int
    kernel_size: tuple[int, int]
    padding: int = 0
    pool: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kh, kw = self.kernel_size
        n, _, _, cin = x.shape
        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(), (kh, kw, cin, self.features)
        )
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        p = self.padding
        if p:
            x = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
        h, w = x.shape[1], x.shape[2]
        ho, wo, s = h - kh + 1, w - kw + 1, 2 if self.pool else 1
        if ho % s or wo % s:
            raise ConfigError(f"2x2 pooling needs an even convolution output, got {ho}x{wo}")
        x_rows = x.reshape(n, h, w * cin)
        # rows[r, n, y'] = the kh input rows under output row y = s*y' + r, side by side
        rows = jnp.stack([
            jnp.concatenate([x_rows[:, r + i : r + i + ho - s + 1 : s] for i in range(kh)], axis=-1)
            for r in range(s)
        ])
        out = (rows @ _toeplitz_kernel(kernel, w, s)).reshape(s, n, ho // s, s, wo // s, self.features)
        out = out.max(axis=(0, 3)) if self.pool else out[0, :, :, 0]
        return out + bias


# What a model's ``conv`` field selects: the same function, the same parameters.
# 'toeplitz' (ToeplitzConv) is the fast one on XLA:CPU; 'xla' is flax.linen.Conv.
CONVS = ("toeplitz", "xla")


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max pooling, stride 2, as a reshape + max (faster to differentiate on XLA:CPU than
    nn.max_pool's select-and-scatter; the same function for even H and W)."""
    n, h, w, c = x.shape
    return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class LeNet(nn.Module):
    """LeNet-5 of the paper: conv5x5-6, pool, conv5x5-16, pool, fc120, fc84, fc(classes), ReLU.

    28x28 inputs are zero-padded by 2 in the first convolution (as the authors' code does), so
    both 28x28 and 32x32 inputs reach a 5x5x16 feature map. ``conv='toeplitz'`` (default) and
    ``conv='xla'`` compute the same function with the same parameter tree.
    """

    num_classes: int = 10
    conv: str = "toeplitz"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.conv not in CONVS:
            raise ConfigError(f"LeNet conv must be one of {', '.join(CONVS)}; got {self.conv!r}")
        pad = 2 if x.shape[1] == 28 else 0

        def conv_pool(x, features, padding, name):
            """max_pool_2x2(conv(x)): with relu after it, the same as pooling relu(conv(x))."""
            if self.conv == "toeplitz":
                return ToeplitzConv(features, (5, 5), padding, pool=True, name=name)(x)
            return max_pool_2x2(nn.Conv(features, (5, 5), padding=padding, name=name)(x))

        x = nn.relu(conv_pool(x, 6, pad, "conv1"))
        x = nn.relu(conv_pool(x, 16, 0, "conv2"))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(120, name="fc1")(x))
        x = nn.relu(nn.Dense(84, name="fc2")(x))
        return nn.Dense(self.num_classes, name="fc3")(x)


MODELS: dict[str, Callable[..., nn.Module]] = {"lenet": LeNet}


def get_model(name: str, num_classes: int, conv: str = "toeplitz") -> nn.Module:
    """The named architecture of a config (``config.model``)."""
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")
    return MODELS[name](num_classes=num_classes, conv=conv)
