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

from dd_jax.conv import ConvParams, conv5x5, conv_layers, max_pool_2x2
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


class LeNet(nn.Module):
    """LeNet-5 of the paper: conv5x5-6, pool, conv5x5-16, pool, fc120, fc84, fc(classes), ReLU.

    28x28 inputs are zero-padded by 2 in the first convolution (as the authors' code does), so
    both 28x28 and 32x32 inputs reach a 5x5x16 feature map. ``conv`` 'native' (default),
    'toeplitz' and 'xla' compute the same function with the same parameter tree (`conv.CONVS`).
    ``features_only`` returns the flattened (N, 400) feature map that the head ``head_layers``
    takes (fc1, fc2, fc3, ReLU between: the inner loop's fused step, `dense_step`).
    """

    num_classes: int = 10
    conv: str = "native"
    features_only: bool = False
    head_layers = ("fc1", "fc2", "fc3")

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        pad = 2 if x.shape[1] == 28 else 0
        if self.conv in ("native", "toeplitz"):  # both layers in one `conv_layers` chain
            k1, b1 = ConvParams(6, (5, 5), name="conv1")(x.shape[-1])
            k2, b2 = ConvParams(16, (5, 5), name="conv2")(6)
            x = conv_layers(x, [(k1, b1, pad, True, True), (k2, b2, 0, True, True)],
                            native_kernels=self.conv == "native")
        else:  # relu(max_pool_2x2(conv(x))): the same as pooling relu(conv(x))
            for features, padding, name in ((6, pad, "conv1"), (16, 0, "conv2")):
                x = nn.relu(max_pool_2x2(conv5x5(self.conv, features, padding, name, "LeNet")(x)))
        x = x.reshape(x.shape[0], -1)
        if self.features_only:
            return x
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
    padding=1)``. XLA:CPU runs a convolution inside a ``lax.scan`` body (a training loop)
    slower than this matmul."""
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
