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
        if self.conv not in ("im2col", "xla"):
            raise ConfigError(f"LeNet conv must be 'im2col' or 'xla', got {self.conv!r}")
        pad = 2 if x.shape[1] == 28 else 0

        def conv(features, padding, name):
            if self.conv == "im2col":
                return Im2colConv(features, (5, 5), padding, name=name)
            return nn.Conv(features, (5, 5), padding=padding, name=name)

        x = max_pool_2x2(nn.relu(conv(6, pad, "conv1")(x)))
        x = max_pool_2x2(nn.relu(conv(16, 0, "conv2")(x)))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(120, name="fc1")(x))
        x = nn.relu(nn.Dense(84, name="fc2")(x))
        return nn.Dense(self.num_classes, name="fc3")(x)


MODELS: dict[str, Callable[..., nn.Module]] = {"lenet": LeNet}


def get_model(name: str, num_classes: int, conv: str = "im2col") -> nn.Module:
    """The named architecture of a config (``config.model``)."""
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")
    return MODELS[name](num_classes=num_classes, conv=conv)
