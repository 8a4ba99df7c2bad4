"""Stage 4, fast path - one inner gradient-descent step whose fully connected head runs in C++.

A network whose last layers are a dense ReLU chain (LeNet: fc1, fc2, fc3) trains its head in
one FFI call per step, `dense_head_step` (``_native/dense.cc``): the head's forward pass, the
softmax cross-entropy gradient, the backward pass and the update of every head layer, in one
pass over each kernel. Its VJP is a second call that recomputes the step from its inputs, so
that a loop of steps stores the inputs only. XLA would run the same step as dozens of small
ops over kernel-sized arrays (and, under a vmap over networks, batched matmuls); the body of
the network (the convolutions) keeps its own derivatives.

`fused_gd_step(module)` is the same function as ``inner.gd_step(apply, ., ., ., .)`` with the
cross-entropy loss, for a Flax module that declares its head (`HeadModule`: LeNet) when the C++
kernels are enabled (`native.enabled`); `meta_loss` takes it as ``step_fn``, and the outer loop
gives it to plain-GD inner loops (`outer_step.build_outer_loop`).
"""
from __future__ import annotations

from typing import Any, Protocol

import jax
import jax.numpy as jnp

from dd_jax import native
from dd_jax.errors import ConfigError
from dd_jax.inner import StepFn, descend

Params = Any
Layers = tuple[tuple[jax.Array, jax.Array], ...]


class HeadModule(Protocol):
    """A Flax module whose logits are a dense ReLU chain over its flattened features:
    ``head_layers`` names its ``nn.Dense`` layers in order (ReLU between them, none after the
    last), and the clone with ``features_only=True`` returns the (N, D_0) features they take."""

    head_layers: tuple[str, ...]
    features_only: bool


@jax.custom_vjp
def dense_head_step(layers: Layers, features: jax.Array, targets: jax.Array,
                    lr: jax.Array) -> tuple[Layers, jax.Array]:
    """One GD step of a dense ReLU head on the mean softmax cross-entropy of its logits.

    layers ((kernel (D_{l-1}, D_l), bias (D_l,)), ...), features (N, D_0), targets (N, K)
    (one-hot or any label vectors: the loss is -sum_k targets[n, k] log softmax[n, k]), lr ()
    -> (the layers after the step, the loss gradient at the features (N, D_0)).
    Differentiable once, in reverse mode (the C++ VJP): enough for the meta-gradient through
    the inner loop; forward mode (``jax.jvp``) and second derivatives raise.
    """
    return _step_call(layers, features, targets, lr)


def _shapes(*arrays) -> list[tuple[tuple[int, ...], jnp.dtype]]:
    """The (shape, dtype) of each array: FFI results shaped as they are."""
    return [(a.shape, a.dtype) for a in arrays]


def _step_call(layers, features, targets, lr):
    if not native.available():
        raise ConfigError("dense_head_step needs the C++ kernels (dd_jax.native), which are "
                          "unavailable here; differentiate the model instead (inner.gd_step)")
    flat = jax.tree.leaves(layers)  # W_1, b_1, .., W_L, b_L
    e0, *new = native.ffi_call("dd_jax_dense_step", _shapes(features, *flat), features, targets,
                               jnp.asarray(lr, features.dtype), *flat)
    return jax.tree.unflatten(jax.tree.structure(layers), new), e0


def _step_fwd(layers, features, targets, lr):
    return _step_call(layers, features, targets, lr), (layers, features, targets, lr)


def _step_bwd(residuals, cotangents):
    layers, features, targets, lr = residuals
    layers_bar, e0_bar = cotangents
    lr_array = jnp.asarray(lr, features.dtype)
    flat = jax.tree.leaves(layers)
    f_bar, t_bar, lr_bar, *flat_bar = native.ffi_call(
        "dd_jax_dense_step_vjp", _shapes(features, targets, lr_array, *flat), features, targets,
        lr_array, *flat, e0_bar, *jax.tree.leaves(layers_bar))
    like = native.like_primal
    layers_out = jax.tree.unflatten(jax.tree.structure(layers), map(like, flat_bar, flat))
    return (layers_out, like(f_bar, features), like(t_bar, targets),
            like(lr_bar, lr_array).astype(jnp.result_type(lr)))


dense_head_step.defvjp(_step_fwd, _step_bwd)


def fused_gd_step(module: Any) -> StepFn | None:
    """The inner GD step on cross-entropy, (params, x (N, H, W, C), labels (N,) or (N, K),
    lr) -> params (params: the module's 'params' collection, as `models.as_model` takes them),
    with `module`'s head in `dense_head_step`; None where `module` declares no
    head (`HeadModule`), its convolutions are not the C++ kernels or those are not enabled."""
    names = getattr(module, "head_layers", ())
    if not names or getattr(module, "conv", "native") != "native" or not native.enabled():
        return None
    body_module = module.clone(features_only=True)

    def step(params: Params, x: jax.Array, y: jax.Array, lr: jax.Array) -> Params:
        body = {k: v for k, v in params.items() if k not in names}
        features, body_vjp = jax.vjp(lambda b: body_module.apply({"params": b}, x), body)
        layers = tuple((params[n]["kernel"], params[n]["bias"]) for n in names)
        classes = layers[-1][0].shape[-1]
        targets = y.astype(features.dtype) if y.ndim == 2 else jax.nn.one_hot(y, classes, dtype=features.dtype)
        layers, feature_grad = dense_head_step(layers, features, targets, lr)
        body = descend(body, body_vjp(feature_grad)[0], lr)
        return {**body, **{n: {"kernel": k, "bias": b} for n, (k, b) in zip(names, layers)}}

    return step
