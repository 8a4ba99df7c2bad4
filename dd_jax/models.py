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


class Im2colConv(nn.Module):
    """Stride-1 2-D convolution as kh*kw static slices and one matmul.

    Same parameters (``kernel`` HWIO, ``bias``) and the same function as
    ``nn.Conv(features, kernel_size, padding=padding)``; on XLA:CPU its gradient with respect
    to the kernel is several times faster than the native convolution's.
    """

    features: int
    kernel_size: tuple[int, int]
    padding: int = 0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kh, kw = self.kernel_size
        cin = x.shape[-1]
        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(), (kh, kw, cin, self.features)
        )
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        p = self.padding
        if p:
            x = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
        ho, wo = x.shape[1] - kh + 1, x.shape[2] - kw + 1
        patches = jnp.concatenate(
            [x[:, i : i + ho, j : j + wo, :] for i in range(kh) for j in range(kw)], axis=-1
        )
        return patches @ kernel.reshape(kh * kw * cin, self.features) + bias


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max pooling, stride 2, as a reshape + max (faster to differentiate on XLA:CPU than
    nn.max_pool's select-and-scatter; the same function for even H and W)."""
    n, h, w, c = x.shape
    return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def conv5x5(kind: str, features: int, padding: int, name: str, model: str) -> nn.Module:
    """A 5x5 stride-1 convolution layer: ``kind='im2col'`` (`Im2colConv`) or ``'xla'``
    (``flax.linen.Conv``), the same function with the same parameters."""
    if kind == "im2col":
        return Im2colConv(features, (5, 5), padding, name=name)
    if kind == "xla":
        return nn.Conv(features, (5, 5), padding=padding, name=name)
    raise ConfigError(f"{model} conv must be 'im2col' or 'xla', got {kind!r}")


class LeNet(nn.Module):
    """LeNet-5 of the paper: conv5x5-6, pool, conv5x5-16, pool, fc120, fc84, fc(classes), ReLU.

    28x28 inputs are zero-padded by 2 in the first convolution (as the authors' code does), so
    both 28x28 and 32x32 inputs reach a 5x5x16 feature map. ``conv='im2col'`` (default) and
    ``conv='xla'`` compute the same function with the same parameter tree.
    """

    num_classes: int = 10
    conv: str = "im2col"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        pad = 2 if x.shape[1] == 28 else 0
        conv = lambda features, padding, name: conv5x5(self.conv, features, padding, name, "LeNet")
        x = max_pool_2x2(nn.relu(conv(6, pad, "conv1")(x)))
        x = max_pool_2x2(nn.relu(conv(16, 0, "conv2")(x)))
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
    conv: str = "im2col"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = lambda features, name: conv5x5(self.conv, features, 2, name, "AlexCifarNet")
        x = local_response_norm(max_pool_3x3_s2_p1(nn.relu(conv(64, "conv1")(x))))
        x = max_pool_3x3_s2_p1(local_response_norm(nn.relu(conv(64, "conv2")(x))))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(384, name="fc1")(x))
        x = nn.relu(nn.Dense(192, name="fc2")(x))
        return nn.Dense(self.num_classes, name="fc3")(x)


MODELS: dict[str, Callable[..., nn.Module]] = {"lenet": LeNet, "alexcifarnet": AlexCifarNet}


def get_model(name: str, num_classes: int, conv: str = "im2col") -> nn.Module:
    """The named architecture of a config (``config.model``)."""
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")
    return MODELS[name](num_classes=num_classes, conv=conv)
