"""Stage 3 - initialisation regimes: where the networks that train on distilled data start.

- ``fixed``: one known theta_0 (from the seed), the same in training and in evaluation;
- ``random``: a fresh batch of theta_0 every outer iteration; evaluation uses held-out draws
  from a key stream that training never touches.

Parameters are drawn by `sample_init` from a named distribution (``INIT_DISTRIBUTIONS``):
weights (every parameter with ndim >= 2) from the distribution, biases zero, as the authors'
``init_weights`` does. Fan-in/fan-out follow PyTorch (a conv kernel HWIO counts H*W*I in,
H*W*O out), so ``xavier_normal`` matches ``torch.nn.init.xavier_normal_``.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.nn import initializers

from dd_jax.errors import ConfigError
from dd_jax.models import Model

Params = Any
Initializer = Callable[[jax.Array, tuple[int, ...], Any], jax.Array]

# Streams of the run's root key: what is drawn from one never reappears in another.
TRAIN_STREAM, EVAL_STREAM, DATA_STREAM, FIXED_STREAM, IMAGES_STREAM = range(5)


def _orthogonal(gain: float) -> Initializer:
    ortho = initializers.orthogonal(gain)

    def init(key, shape, dtype=jnp.float32):
        # PyTorch flattens all but the output dim; so does this, for conv kernels too.
        flat = ortho(key, (math.prod(shape[:-1]), shape[-1]), dtype)
        return flat.reshape(shape)

    return init


INIT_DISTRIBUTIONS: dict[str, Callable[[float], Initializer]] = {
    "xavier_normal": lambda g: initializers.variance_scaling(g**2, "fan_avg", "normal"),
    "xavier_uniform": lambda g: initializers.variance_scaling(g**2, "fan_avg", "uniform"),
    "kaiming_normal": lambda g: initializers.variance_scaling(2.0 * g**2, "fan_in", "normal"),
    "kaiming_uniform": lambda g: initializers.variance_scaling(2.0 * g**2, "fan_in", "uniform"),
    "lecun_normal": lambda g: initializers.variance_scaling(g**2, "fan_in", "truncated_normal"),
    "orthogonal": _orthogonal,
}


def sample_init(
    key: jax.Array, model: Model, sample_x: jax.Array, dist: str = "xavier_normal",
    gain: float = 1.0,
) -> Params:
    """One theta_0: the model's parameter tree with weights drawn from `dist`, biases zero.

    ``dist='model'`` keeps the model's own initialisers. sample_x: (1, H, W, C).
    """
    params = model.init(key, sample_x)
    if dist == "model":
        return params
    if dist not in INIT_DISTRIBUTIONS:
        raise ConfigError(
            f"unknown init distribution {dist!r}; choose one of: "
            f"{', '.join([*INIT_DISTRIBUTIONS, 'model'])}"
        )
    weight_init = INIT_DISTRIBUTIONS[dist](gain)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.fold_in(key, 1), len(leaves))
    new = [
        weight_init(k, p.shape, p.dtype) if p.ndim >= 2 else jnp.zeros_like(p)
        for k, p in zip(keys, leaves)
    ]
    return jax.tree.unflatten(treedef, new)


def sample_inits(
    key: jax.Array, n: int, model: Model, sample_x: jax.Array, dist: str, gain: float
) -> Params:
    """n independent theta_0, stacked along a leading axis of every leaf."""
    return jax.vmap(lambda k: sample_init(k, model, sample_x, dist, gain))(
        jax.random.split(key, n)
    )


@dataclasses.dataclass(frozen=True)
class InitRegime:
    """Where theta_0 comes from, for training (per outer iteration) and for evaluation.

    train_inits(iteration) -> params with a leading n_nets axis;
    eval_inits(n) -> params with a leading n axis, never seen in training.
    fixed_params is theta_0 for the fixed regime, else None.
    """

    name: str
    train_inits: Callable[[jax.Array], Params]
    eval_inits: Callable[[int], Params]
    fixed_params: Params | None = None


def make_regime(
    name: str, key: jax.Array, model: Model, sample_x: jax.Array, *, n_nets: int = 1,
    dist: str = "xavier_normal", gain: float = 1.0,
) -> InitRegime:
    """The named regime ('fixed' or 'random') drawing from the run's root `key`."""
    add_axis = lambda p, n: jax.tree.map(lambda a: jnp.broadcast_to(a, (n, *a.shape)), p)
    if name == "fixed":
        if n_nets != 1:
            raise ConfigError(
                f"the fixed regime trains one known network, so n_nets must be 1 (got {n_nets}); "
                "use --init_regime=random to average over initialisations"
            )
        theta0 = sample_init(jax.random.fold_in(key, FIXED_STREAM), model, sample_x, dist, gain)
        return InitRegime(name, lambda it: add_axis(theta0, 1), lambda n: add_axis(theta0, n), theta0)
    if name == "random":
        train_key = jax.random.fold_in(key, TRAIN_STREAM)
        eval_key = jax.random.fold_in(key, EVAL_STREAM)
        return InitRegime(
            name,
            lambda it: sample_inits(jax.random.fold_in(train_key, it), n_nets, model, sample_x, dist, gain),
            lambda n: sample_inits(eval_key, n, model, sample_x, dist, gain),
        )
    raise ConfigError(f"unknown init regime {name!r}; choose one of: fixed, random")
