"""Stage 5 - the meta-objective: loss on real data after training on distilled data.

The learned quantities are the distilled images and one raw step size per GD step
(eta = softplus(raw)); labels stay fixed, or are learned too (one real-valued label vector per
image, Sucholutsky & Schonlau, arXiv 1910.02551). `meta_loss` averages over a batch of
initialisations with `jax.vmap`; its gradient flows through every inner step, or through a
window of them (`dd_jax.unroll`).
"""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from dd_jax.inner import ApplyFn, LossFn, StepFn, cross_entropy, inner_train
from dd_jax.unroll import InnerSpec, optimizer_train

Params = Any


@flax.struct.dataclass
class Learned:
    """What the outer loop optimises: images (S, n, H, W, C), raw step sizes (T,) and, when
    labels are learned, label vectors (S, n, K) (None: the fixed hard labels train)."""

    images: jax.Array
    raw_step_sizes: jax.Array
    labels: jax.Array | None = None

    @property
    def step_sizes(self) -> jax.Array:
        return jax.nn.softplus(self.raw_step_sizes)


def raw_step_size(eta: float) -> float:
    """The raw parameter whose softplus is eta: log(expm1(eta))."""
    return float(jnp.log(jnp.expm1(jnp.asarray(eta, jnp.float32))))


def init_learned(
    key: jax.Array, labels: jax.Array, image_shape: tuple[int, ...], epochs: int,
    step_size: float = 0.02, num_classes: int = 0, image_scale: float = 1.0,
) -> Learned:
    """Distilled images ~ N(0, image_scale^2) in normalised pixel space, all step sizes
    `step_size`; with num_classes > 0 also learned label vectors, initialised one-hot:
    one_hot(labels).

    labels (S, n) fixes the layout: S steps of n images.
    """
    steps, n = labels.shape
    return Learned(
        images=image_scale * jax.random.normal(key, (steps, n, *image_shape), jnp.float32),
        raw_step_sizes=jnp.full((steps * epochs,), raw_step_size(step_size), jnp.float32),
        labels=jax.nn.one_hot(labels, num_classes, dtype=jnp.float32) if num_classes else None,
    )


def distilled_labels(steps: int, images_per_class: int, num_classes: int,
                     images_per_step: int = 0) -> jax.Array:
    """(S, n) hard labels. images_per_step = 0: n = images_per_class * num_classes, each step
    holds every class, images_per_class of each in a row; images_per_step = n > 0: the classes
    in turn, continuing across steps (image j of step s is class (s n + j) mod num_classes)."""
    if images_per_step:
        return jnp.arange(steps * images_per_step, dtype=jnp.int32).reshape(
            steps, images_per_step) % num_classes
    per_step = jnp.repeat(jnp.arange(num_classes, dtype=jnp.int32), images_per_class)
    return jnp.tile(per_step, (steps, 1))


def meta_loss(
    learned: Learned, labels: jax.Array, init_params: Params, real_x: jax.Array,
    real_y: jax.Array, *, apply_fn: ApplyFn, epochs: int, remat: bool = False,
    loss_fn: LossFn = cross_entropy, inner: InnerSpec | None = None,
    stop: jax.Array | None = None, step_fn: StepFn | None = None,
) -> jax.Array:
    """Mean over the n_nets initialisations (leading axis of init_params) of the real-batch
    loss after inner training. real_x (B, H, W, C), real_y (B,). `loss_fn` (outputs, targets)
    is both the inner training loss and the real-batch loss. The inner loop trains on
    learned.labels when they are learned (soft targets), else on `labels` (S, n).

    inner None: plain GD through all T steps (`inner_train`, its steps `step_fn` when given,
    with loss_fn cross-entropy: `dense_step.fused_gd_step`); else `unroll.optimizer_train`
    with that optimiser, and with inner.window > 0 the unroll stops at step `stop`, the window
    before it differentiated (the meta-loss is then taken at theta_stop).
    """
    targets = labels if learned.labels is None else learned.labels

    def one_net(theta0):
        if inner is None:
            theta_t = inner_train(apply_fn, theta0, learned.images, targets, learned.step_sizes,
                                  epochs, remat, loss_fn, step_fn)
        else:
            theta_t = optimizer_train(apply_fn, theta0, learned.images, targets,
                                      learned.step_sizes, epochs, inner, stop=stop, remat=remat,
                                      loss_fn=loss_fn)
        return loss_fn(apply_fn(theta_t, real_x), real_y)

    if jax.tree.leaves(init_params)[0].shape[0] == 1:
        # one net without a vmap axis: XLA:CPU then keeps the real batch's activations in
        # matmul-friendly layouts (faster per meta-step)
        return one_net(jax.tree.map(lambda a: a[0], init_params))
    return jnp.mean(jax.vmap(one_net)(init_params))
