"""The outer optimiser: Adam on the distilled data with the run's learning-rate schedule
(optionally with Feng et al.'s clipping of the images' gradient, and learned labels kept
non-negative or on the probability simplex), and the run's length in outer iterations."""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from dd_jax.errors import ConfigError

LR_SCHEDULES = ("step", "cosine")  # the outer learning rate's schedules (make_optimizer)


def run_length(config, iters_per_pass: int) -> int:
    """Outer iterations of the run: config.iterations, or passes x iterations per pass."""
    return config.iterations or config.passes * iters_per_pass


def check_lr_schedule(config) -> None:
    """Raises ConfigError for an unknown lr_schedule or a negative warmup_iterations."""
    if config.lr_schedule not in LR_SCHEDULES:
        raise ConfigError(f"unknown lr_schedule {config.lr_schedule!r}; choose one of: {', '.join(LR_SCHEDULES)}")
    if config.warmup_iterations < 0:
        raise ConfigError(f"warmup_iterations must be >= 0, got {config.warmup_iterations}")


def check_clipping(config) -> None:
    """Raises ConfigError for a grad_clip_ema outside [0, 1), or nonneg_labels or
    simplex_labels without learned labels."""
    if not 0 <= config.grad_clip_ema < 1:
        raise ConfigError(f"grad_clip_ema must be in [0, 1) (0: no clipping), got {config.grad_clip_ema}")
    for field, what in (("nonneg_labels", ">= 0"), ("simplex_labels", "on the simplex")):
        if config[field] and not config.learn_labels:
            raise ConfigError(f"{field} keeps learned labels {what}, but labels are not learned; "
                              f"add --learn_labels=true or drop --{field}")


class EmaNormState(NamedTuple):
    """`clip_by_ema_norm`'s state: the moving average of the gradient norms, and how many."""

    ema: jax.Array  # () float32
    count: jax.Array  # () int32


def clip_by_ema_norm(decay: float, factor: float = 2.0) -> optax.GradientTransformation:
    """Scales the updates so that their global norm is at most `factor` x an exponential moving
    average of the global norms seen so far, this one included: ema = norm at the first
    update, then ``ema = decay ema + (1 - decay) norm`` (Feng, Vedantam and Kempe, ICLR 2024:
    decay 0.9, factor 2, PyTorch's ``clip_grad_norm_`` to that bound)."""

    def init(params):
        del params
        return EmaNormState(jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32))

    def update(updates, state, params=None):
        del params
        norm = optax.tree.norm(updates)
        ema = jnp.where(state.count == 0, norm, decay * state.ema + (1 - decay) * norm)
        scale = jnp.minimum(1.0, factor * ema / (norm + 1e-6))
        return (jax.tree.map(lambda u: u * scale, updates),
                EmaNormState(ema, optax.safe_increment(state.count)))

    return optax.GradientTransformation(init, update)


def non_negative() -> optax.GradientTransformation:
    """Changes the updates so that params + updates >= 0 (params that would go negative land
    on 0): the projection onto the non-negative orthant after a step."""

    def update(updates, state, params):
        return jax.tree.map(lambda u, p: jnp.maximum(u, -p), updates, params), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def project_to_simplex(v: jax.Array) -> jax.Array:
    """The Euclidean projection of each vector along the last axis onto the probability
    simplex {w : w >= 0, sum(w) = 1}: ``max(v - theta, 0)`` with the one theta that makes it
    sum to 1 (Duchi, Shalev-Shwartz, Singer and Chandra, ICML 2008, Fig. 1).

    v: (..., K) -> (..., K)."""
    k = v.shape[-1]
    desc = -jnp.sort(-v, axis=-1)
    excess = jnp.cumsum(desc, axis=-1) - 1
    # the entries kept above 0 are a prefix of the sorted ones: count them
    kept = jnp.sum(desc * jnp.arange(1, k + 1) > excess, axis=-1, keepdims=True)
    theta = jnp.take_along_axis(excess, kept - 1, axis=-1) / kept
    return jnp.maximum(v - theta, 0.0)


def onto_simplex() -> optax.GradientTransformation:
    """Changes the updates so that params + updates is `project_to_simplex`(params +
    updates): the projection of each label vector onto the simplex after a step."""

    def update(updates, state, params):
        return jax.tree.map(lambda u, p: project_to_simplex(p + u) - p, updates, params), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def _only(field: str):
    """A mask for `optax.masked` over a `dd_jax.meta.Learned`: True for `field` alone."""
    return lambda learned: learned.replace(
        images=field == "images", raw_step_sizes=field == "raw_step_sizes",
        labels=None if learned.labels is None else field == "labels")


def make_optimizer(config, iters_per_pass: int) -> optax.GradientTransformation:
    """Adam(outer_lr, b1, b2) with the config's learning-rate schedule: ``step`` (the authors':
    x decay_factor every decay_passes passes) or ``cosine`` (linear warm-up over
    warmup_iterations, then a cosine decay to 0 at the run's last iteration).

    For a distillation (params a `dd_jax.meta.Learned`), grad_clip_ema > 0 first clips the
    images' gradient (`clip_by_ema_norm` with that decay), and nonneg_labels projects the
    learned labels onto >= 0 after each step (`non_negative`), as Feng et al.;
    simplex_labels projects each label vector onto the probability simplex instead
    (`onto_simplex`: >= 0 too, and a mass of 1). Configs without these fields (the linear
    analysis) have none of them."""
    if config.lr_schedule == "step":
        schedule = optax.exponential_decay(
            config.outer_lr, transition_steps=max(1, config.decay_passes * iters_per_pass),
            decay_rate=config.decay_factor, staircase=True,
        )
    else:  # cosine
        total = run_length(config, iters_per_pass)
        if config.warmup_iterations >= total:
            raise ConfigError(f"warmup_iterations ({config.warmup_iterations}) must be shorter "
                              f"than the run ({total} iterations)")
        schedule = optax.warmup_cosine_decay_schedule(
            0.0, config.outer_lr, warmup_steps=config.warmup_iterations, decay_steps=total)
    adam = optax.adam(schedule, b1=config.beta1, b2=config.beta2)
    clip = config.get("grad_clip_ema", 0.0)
    projection = (onto_simplex() if config.get("simplex_labels", False) else
                  non_negative() if config.get("nonneg_labels", False) else None)
    if not clip and projection is None:
        return adam
    return optax.chain(
        optax.masked(clip_by_ema_norm(clip), _only("images")) if clip else optax.identity(),
        adam,
        optax.masked(projection, _only("labels")) if projection is not None else optax.identity(),
    )
