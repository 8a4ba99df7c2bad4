"""Stage 3 - initialisation regimes: where the networks that train on distilled data start.

- ``fixed``: one known theta_0 (from the seed), the same in training and in evaluation;
- ``random``: a fresh batch of theta_0 every outer iteration; evaluation uses held-out draws
  from a key stream that training never touches;
- ``fixed_pretrained``: member 0 of a pool of pretrained networks (pretrain.py), the same in
  training and in evaluation;
- ``random_pretrained``: n_nets members of the pool sampled every outer iteration from all but
  its last ``pool_eval_nets`` members; evaluation uses those held-out last members.

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
(TRAIN_STREAM, EVAL_STREAM, DATA_STREAM, FIXED_STREAM, IMAGES_STREAM, VAL_STREAM,
 WINDOW_STREAM) = range(7)
PRETRAINED_REGIMES = ("fixed_pretrained", "random_pretrained")
INIT_REGIMES = ("fixed", "random", *PRETRAINED_REGIMES)


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
    if dist == "model":
        return model.init(key, sample_x)
    check_init_dist(dist)
    # only the tree's shapes are needed: no model.init (a forward pass) to compile
    params = jax.eval_shape(model.init, key, sample_x)
    weight_init = INIT_DISTRIBUTIONS[dist](gain)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.fold_in(key, 1), len(leaves))
    new = [
        weight_init(k, p.shape, p.dtype) if p.ndim >= 2 else jnp.zeros(p.shape, p.dtype)
        for k, p in zip(keys, leaves)
    ]
    return jax.tree.unflatten(treedef, new)


def sample_inits(
    key: jax.Array, n: int, model: Model, sample_x: jax.Array, dist: str, gain: float
) -> Params:
    """n independent theta_0, stacked along a leading axis of every leaf.

    (lax.map, not vmap: the same values, and XLA:CPU compiles it in about half the time.)
    """
    return jax.lax.map(lambda k: sample_init(k, model, sample_x, dist, gain),
                       jax.random.split(key, n))


@dataclasses.dataclass(frozen=True)
class InitRegime:
    """Where theta_0 comes from, for training (per outer iteration) and for evaluation.

    train_inits(iteration, pool) -> params with a leading n_nets axis; `pool` is the regime's
    own `pool` (the jitted meta-step passes it as an argument, so that a large pool is not
    compiled in as a constant; it defaults to the regime's);
    eval_inits(n) -> params with a leading n axis, never seen in training.
    fixed_params is theta_0 for the fixed regimes, else None; pool is the pretrained networks
    (leading pool axis) random_pretrained draws from, else None.
    """

    name: str
    train_inits: Callable[..., Params]
    eval_inits: Callable[[int], Params]
    fixed_params: Params | None = None
    pool: Params | None = None


def check_init_dist(dist: str) -> None:
    """Raises ConfigError unless `dist` names a weight distribution (or 'model')."""
    if dist not in (*INIT_DISTRIBUTIONS, "model"):
        raise ConfigError(
            f"unknown init_dist {dist!r}; choose one of: {', '.join([*INIT_DISTRIBUTIONS, 'model'])}")


def check_regime(name: str, n_nets: int = 1, dist: str = "xavier_normal") -> None:
    """Raises ConfigError for an unknown regime or weight distribution, or a fixed regime
    asked to train several networks."""
    if name not in INIT_REGIMES:
        raise ConfigError(f"unknown init_regime {name!r}; choose one of: {', '.join(INIT_REGIMES)}")
    check_init_dist(dist)
    if name in ("fixed", "fixed_pretrained") and n_nets != 1:
        raise ConfigError(
            f"the {name} regime trains one known network, so n_nets must be 1 (got {n_nets}); use "
            f"--init_regime={name.replace('fixed', 'random')} to average over initialisations"
        )


def make_regime(
    name: str, key: jax.Array, model: Model, sample_x: jax.Array, *, n_nets: int = 1,
    dist: str = "xavier_normal", gain: float = 1.0, pool: Params | None = None,
    pool_eval_nets: int = 0,
) -> InitRegime:
    """The named regime (INIT_REGIMES) drawing from the run's root `key`.

    The pretrained regimes take `pool` (pretrained params with a leading pool axis);
    random_pretrained holds out its last `pool_eval_nets` members for evaluation.
    """
    check_regime(name, n_nets, dist)
    if name == "fixed":
        return _fixed_regime(name, sample_init(jax.random.fold_in(key, FIXED_STREAM), model,
                                               sample_x, dist, gain))
    if name == "random":
        train_key = jax.random.fold_in(key, TRAIN_STREAM)
        eval_key = jax.random.fold_in(key, EVAL_STREAM)
        return InitRegime(
            name,
            lambda it, pool=None: sample_inits(jax.random.fold_in(train_key, it), n_nets, model,
                                               sample_x, dist, gain),
            lambda n: sample_inits(eval_key, n, model, sample_x, dist, gain),
        )
    return _pretrained_regime(name, key, pool, n_nets, pool_eval_nets)


def _fixed_regime(name: str, theta0: Params) -> InitRegime:
    """The regime that trains and tests the one known `theta0` (fixed, fixed_pretrained)."""
    add_axis = lambda n: jax.tree.map(lambda a: jnp.broadcast_to(a, (n, *a.shape)), theta0)
    return InitRegime(name, lambda it, pool=None: add_axis(1), add_axis, theta0)


def _pretrained_regime(
    name: str, key: jax.Array, pool: Params | None, n_nets: int, pool_eval_nets: int
) -> InitRegime:
    if pool is None:
        raise ConfigError(f"init regime {name} needs a pool of pretrained networks (see dd_jax.pretrain)")
    pool = jax.tree.map(jnp.asarray, pool)
    size = jax.tree.leaves(pool)[0].shape[0]
    if name == "fixed_pretrained":
        return _fixed_regime(name, jax.tree.map(lambda a: a[0], pool))
    n_train = size - pool_eval_nets
    if pool_eval_nets < 1 or n_train < n_nets:
        raise ConfigError(
            f"random_pretrained on a pool of {size} networks with pool_eval_nets={pool_eval_nets} "
            f"held out leaves {n_train} to sample n_nets={n_nets} from; need pool_eval_nets >= 1 "
            "and n_nets <= pool size - pool_eval_nets (train a bigger pool with --pool_size)"
        )
    train_key = jax.random.fold_in(key, TRAIN_STREAM)

    def train_inits(it, members=pool):
        idx = jax.random.choice(jax.random.fold_in(train_key, it), n_train, (n_nets,), replace=False)
        return jax.tree.map(lambda a: a[idx], members)

    def eval_inits(n):
        if n > pool_eval_nets:
            raise ConfigError(f"only pool_eval_nets={pool_eval_nets} pool members are held out for "
                              f"evaluation, {n} asked for; evaluate on at most {pool_eval_nets}")
        return jax.tree.map(lambda a: a[n_train : n_train + n], pool)

    return InitRegime(name, train_inits, eval_inits, pool=pool)
