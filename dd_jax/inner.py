"""Stage 4 - the inner loop: T = steps x epochs gradient-descent steps on distilled data.

Step t trains on distilled batch ``t mod steps`` with its own step size eta_t:
``theta_t = theta_{t-1} - eta_t * grad_theta loss(apply(theta_{t-1}, x_{t mod S}), y_{t mod S})``,
the loss being cross-entropy unless a ``loss_fn(outputs, targets) -> scalar`` is given. The
labels are hard (S, n) class indices, or learned (S, n, K) label vectors (soft targets).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

Params = Any
ApplyFn = Callable[[Params, jax.Array], jax.Array]
LossFn = Callable[[jax.Array, jax.Array], jax.Array]
StepFn = Callable[[Params, jax.Array, jax.Array, jax.Array], Params]


# Inner loops of at most this many steps are unrolled in full (`inner_train`).
UNROLL_UP_TO = 8


def example_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """(N,) softmax cross-entropy per image; logits (N, K), integer labels (N,) or real-valued
    label vectors (N, K): then sum_c y_c * CE(logits, c) = -sum_c y_c log softmax(logits)_c,
    the vectors taken as they are (not normalised, any sign)."""
    if labels.ndim == logits.ndim:
        return optax.softmax_cross_entropy(logits, labels)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean of `example_cross_entropy` over the N images: a scalar."""
    return example_cross_entropy(logits, labels).mean()


def gd_step(
    apply_fn: ApplyFn, params: Params, x: jax.Array, y: jax.Array, lr: jax.Array,
    loss_fn: LossFn = cross_entropy,
) -> Params:
    """One plain gradient-descent step on loss_fn(apply_fn(params, x), y) with step size lr."""
    grads = jax.grad(lambda p: loss_fn(apply_fn(p, x), y))(params)
    return descend(params, grads, lr)


def descend(params: Params, direction: Params, lr: jax.Array) -> Params:
    """params - lr * direction, leaf by leaf, written p + (-lr) d: the same bits, and its
    reverse pass scales the cotangent by -lr instead of negating a parameter-sized array."""
    return jax.tree.map(lambda p, d: p + (-lr) * d, params, direction)


def unroll_schedule(images: jax.Array, labels: jax.Array, epochs: int) -> tuple[jax.Array, jax.Array]:
    """(S, n, H, W, C), (S, n) or (S, n, K) -> the T = S*epochs batches in training order."""
    tile = lambda a: jnp.tile(a, (epochs,) + (1,) * (a.ndim - 1))
    return tile(images), tile(labels)


def checkpointed_scan(step: Callable, carry: Any, xs: jax.Array) -> Any:
    """``lax.scan(step, carry, xs)``'s final carry, in reverse mode holding about 2 sqrt(T)
    carries (T = len(xs)) instead of every step's intermediates.

    The T steps run as blocks of k = ceil(sqrt(T)) (the last T mod k steps on their own); each
    block and each step is recomputed in the backward pass (jax.checkpoint), so the backward
    pass stores the carry at each block start, then one block's carries, then one step's
    intermediates. The price: every step's forward pass runs three times instead of once.
    """
    n = xs.shape[0]
    k = math.isqrt(max(n - 1, 0)) + 1
    blocks = n // k
    step = jax.checkpoint(step)

    def block(c, block_xs):
        return jax.lax.scan(step, c, block_xs)[0], None

    blocked = xs[: blocks * k].reshape(blocks, k, *xs.shape[1:])
    carry, _ = jax.lax.scan(jax.checkpoint(block), carry, blocked)
    return jax.lax.scan(step, carry, xs[blocks * k :])[0]


def inner_train(
    apply_fn: ApplyFn, params: Params, images: jax.Array, labels: jax.Array,
    step_sizes: jax.Array, epochs: int, remat: bool = False, loss_fn: LossFn = cross_entropy,
    step_fn: StepFn | None = None,
) -> Params:
    """Trains from `params` on the distilled data; returns theta_T.

    images (S, n, H, W, C), labels (S, n) or (S, n, K), step_sizes (S*epochs,). `step_fn`
    (params, x, y, lr) -> params, when given, is the step: the same function as `gd_step`
    with `apply_fn` and `loss_fn`, computed another way (`dense_step.fused_gd_step`). Reverse mode
    stores every step's activations; with ``remat`` the steps are recomputed in the backward
    pass instead (`checkpointed_scan`, step t indexing batch t mod S), so that its memory grows
    with sqrt(T) parameter sets, not with T steps' activations.
    """

    def step(p, batch):
        x, y, lr = batch
        if step_fn is not None:
            return step_fn(p, x, y, lr), None
        return gd_step(apply_fn, p, x, y, lr, loss_fn), None

    if remat:  # steps index their batch: the tiled xs would be T batches in memory
        steps = images.shape[0]
        return checkpointed_scan(
            lambda p, t: step(p, (images[t % steps], labels[t % steps], step_sizes[t])),
            params, jnp.arange(steps * epochs),
        )
    xs, ys = unroll_schedule(images, labels, epochs)
    # Up to UNROLL_UP_TO steps are unrolled (XLA fuses across them); longer unrolls loop one
    # step per iteration. Either way the backward pass reads every step's stored activations
    # (results/benchmarks/inner_remat.md: faster on XLA:CPU than recomputing each step).
    unroll = len(step_sizes) if len(step_sizes) <= UNROLL_UP_TO else 1
    return jax.lax.scan(step, params, (xs, ys, step_sizes), unroll=unroll)[0]
