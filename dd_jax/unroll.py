"""The inner loop beyond plain gradient descent: momentum and Adam inner optimisers, and
truncated unrolls with a random window (random-truncated BPTT, Feng, Vedantam and Kempe,
"Embarrassingly Simple Dataset Distillation", ICLR 2024).

Step t (0-based) trains on distilled batch ``t mod S`` with step size eta_t, like
`inner.inner_train`, but the update is the chosen optimiser's (`optimizer_update`):

- ``gd``: ``theta -= eta_t g``;
- ``momentum``: ``v = mu v + g; theta -= eta_t v`` (PyTorch's SGD momentum, v_0 = 0);
- ``adam``: ``m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2;
  theta -= eta_t (m / (1 - b1^(t+1))) / (sqrt(v / (1 - b2^(t+1)) + ADAM_EPS_ROOT) + ADAM_EPS)``
  with b1 = mu, b2 = ADAM_B2 (optax.scale_by_adam with eps_root, which keeps the second
  derivative finite where a gradient entry is exactly zero).

A truncated unroll (`InnerSpec.window` = W > 0) stops at step N (`window_stop`: uniform in
[W, T], a pure function of the run's key and the outer iteration) and returns theta_N: steps
0 .. N-W-1 run forward only (under stop_gradient, in a while loop that keeps no tape), steps
N-W .. N-1 are differentiated. The meta-loss is taken at theta_N, the end of the window, as
in Feng et al.: a loss at theta_T would need the tape of every step after the window too. The
steps before and after the window therefore get no gradient in that outer iteration (their
step sizes' gradients are exactly zero); N = T puts the window at the end of the full unroll.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from dd_jax.inner import ApplyFn, LossFn, checkpointed_scan, cross_entropy, descend

Params = Any
INNER_OPTIMIZERS = ("gd", "momentum", "adam")
ADAM_B2 = 0.999
ADAM_EPS = 1e-8
ADAM_EPS_ROOT = 1e-16


@dataclasses.dataclass(frozen=True)
class InnerSpec:
    """How the inner loop trains (static, hashable): `optimizer` (INNER_OPTIMIZERS), `momentum`
    (momentum's coefficient mu, Adam's b1) and `window` (W steps differentiated, 0 = all)."""

    optimizer: str = "gd"
    momentum: float = 0.9
    window: int = 0


def optimizer_init(spec: InnerSpec, params: Params) -> Any:
    """The optimiser's state before step 0: () for gd, v = 0 for momentum, (m, v) = 0 for adam."""
    zeros = lambda: jax.tree.map(jnp.zeros_like, params)
    if spec.optimizer == "gd":
        return ()
    if spec.optimizer == "momentum":
        return zeros()
    return zeros(), zeros()


def optimizer_update(
    spec: InnerSpec, params: Params, state: Any, grads: Params, lr: jax.Array, t: jax.Array,
) -> tuple[Params, Any]:
    """(params, state) after step t (0-based) with gradient `grads` and step size `lr`."""
    if spec.optimizer == "gd":
        return descend(params, grads, lr), state
    if spec.optimizer == "momentum":
        v = jax.tree.map(lambda v, g: spec.momentum * v + g, state, grads)
        return descend(params, v, lr), v
    b1 = spec.momentum
    m = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state[0], grads)
    v = jax.tree.map(lambda v, g: ADAM_B2 * v + (1 - ADAM_B2) * g * g, state[1], grads)
    count = jnp.asarray(t + 1).astype(jax.tree.leaves(params)[0].dtype)
    c1, c2 = 1 - b1**count, 1 - ADAM_B2**count
    step = lambda p, m, v: p - lr * (m / c1) / (jnp.sqrt(v / c2 + ADAM_EPS_ROOT) + ADAM_EPS)
    return jax.tree.map(step, params, m, v), (m, v)


def window_stop(key: jax.Array, iteration: jax.Array, window: int, total: int) -> jax.Array:
    """The step N at which outer iteration `iteration`'s truncated unroll stops: uniform in
    [window, total], drawn from fold_in(key, iteration)."""
    return jax.random.randint(jax.random.fold_in(key, iteration), (), window, total + 1)


def optimizer_train(
    apply_fn: ApplyFn, params: Params, images: jax.Array, labels: jax.Array,
    step_sizes: jax.Array, epochs: int, spec: InnerSpec, *, stop: jax.Array | None = None,
    remat: bool = False, loss_fn: LossFn = cross_entropy,
) -> Params:
    """Trains from `params` with `spec`'s optimiser; returns theta_T, or theta_stop.

    images (S, n, H, W, C), labels (S, n) or (S, n, K), step_sizes (T,) with T = S*epochs.
    stop None: all T steps, all differentiated. stop = N (a traced int in [spec.window, T]):
    steps 0 .. N-W-1 forward only, N-W .. N-1 differentiated (module docstring). With `remat`
    the differentiated steps are recomputed in the backward pass (`inner.checkpointed_scan`).
    """
    n_batches = images.shape[0]

    def make_step(images, labels, step_sizes):
        def step(carry, t):
            p, state = carry
            x, y = images[t % n_batches], labels[t % n_batches]
            grads = jax.grad(lambda q: loss_fn(apply_fn(q, x), y))(p)
            return optimizer_update(spec, p, state, grads, step_sizes[t], t), None

        return step

    step = make_step(images, labels, step_sizes)
    carry = (params, optimizer_init(spec, params))
    if stop is None:
        ts = jnp.arange(n_batches * epochs)
    else:
        start = stop - spec.window
        frozen = make_step(*jax.lax.stop_gradient((images, labels, step_sizes)))
        carry = jax.lax.fori_loop(0, start, lambda t, c: frozen(c, t)[0],
                                  jax.lax.stop_gradient(carry))
        ts = start + jnp.arange(spec.window)
    if remat:
        return checkpointed_scan(step, carry, ts)[0]
    return jax.lax.scan(step, carry, ts)[0][0]
