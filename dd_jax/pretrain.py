"""Pretrained networks: train a pool of normally trained networks, save it, load it back.

The pretrained initialisation regimes (``fixed_pretrained``, ``random_pretrained``, see
regimes.py) start the inner loop from members of such a pool, e.g. LeNets trained on USPS when
distilling MNIST (domain adaptation).

A pool file (``pool.npz``) holds every parameter stacked along a leading pool axis, under
``params/<layer>/<name>``, and ``meta``: one JSON string with the dataset and model it was trained
for (``dataset``, ``model``, ``num_classes``, ``image_shape``, ``mean``, ``std``), the training
config (``train``), each member's test accuracy (``test_accs``) and a ``fingerprint`` (SHA-256 of
the parameters) that distilled data made from the pool records.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from dd_jax.config import require
from dd_jax.dataset import Dataset
from dd_jax.errors import ConfigError, DataError
from dd_jax.files import atomic_path, flat_arrays, nested
from dd_jax.inner import cross_entropy
from dd_jax.models import Model, as_model
from dd_jax.regimes import DATA_STREAM, TRAIN_STREAM, sample_inits

Params = Any
POOL_FORMAT = "dd_jax_pool"
POOL_VERSION = 1
POOL_FILE = "pool.npz"
POOL_OPTIMIZERS = ("adam", "sgd")


# --------------------------------------------------------------------------- training


def validate_pool_config(config) -> None:
    """Raises ConfigError naming the first pool-training field that cannot work."""
    require(config, at_least_one=("pool_size", "pool_epochs", "pool_batch_size"), positive=("pool_lr",))
    if config.pool_optimizer not in POOL_OPTIMIZERS:
        raise ConfigError(
            f"unknown pool_optimizer {config.pool_optimizer!r}; choose one of: {', '.join(POOL_OPTIMIZERS)}"
        )


def pool_optimizer(config) -> optax.GradientTransformation:
    """Adam(pool_lr, beta1, beta2) or plain SGD(pool_lr), constant step size."""
    if config.pool_optimizer == "adam":
        return optax.adam(config.pool_lr, b1=config.beta1, b2=config.beta2)
    return optax.sgd(config.pool_lr)


def make_pool_train_steps(model: Model, optimizer: optax.GradientTransformation) -> Callable:
    """Jitted (params, opt_state, train_x, train_y, batch_idx) -> (params, opt_state, losses).

    params / opt_state have a leading pool axis (n); batch_idx (n, steps, B) holds each network's
    own minibatches. The networks train independently, one after another (lax.map: on XLA:CPU a
    vmap over networks turns LeNet's matmuls into slower batched ones), the steps
    in a lax.scan; losses (n, steps) are the minibatch losses before each step.
    """

    def one_net(params, opt_state, train_x, train_y, batch_idx):
        def step(carry, idx):
            p, s = carry
            loss, grads = jax.value_and_grad(
                lambda q: cross_entropy(model.apply(q, train_x[idx]), train_y[idx]))(p)
            updates, s = optimizer.update(grads, s, p)
            return (optax.apply_updates(p, updates), s), loss

        (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), batch_idx)
        return params, opt_state, losses

    def all_nets(params, opt_state, train_x, train_y, batch_idx):
        return jax.lax.map(lambda net: one_net(*net[:2], train_x, train_y, net[2]),
                           (params, opt_state, batch_idx))

    return jax.jit(all_nets)


def train_pool(
    dataset: Dataset, model_fn, config, *, progress: bool = True, chunk: int = 100,
) -> tuple[Params, np.ndarray]:
    """Trains config.pool_size networks on the whole training set of `dataset`.

    Network i starts from the i-th of `sample_inits` (init_dist, init_gain) of the run key and
    sees its own shuffled minibatches (pool_batch_size, the remainder of each epoch dropped)
    for pool_epochs epochs of pool_optimizer. Returns (params with a leading pool axis,
    mean minibatch loss per epoch (pool_epochs, pool_size)).
    """
    validate_pool_config(config)
    model = as_model(model_fn)
    key = jax.random.PRNGKey(config.seed)
    train_x, train_y = jnp.asarray(dataset.train_x), jnp.asarray(dataset.train_y)
    n, n_train = config.pool_size, len(dataset.train_y)
    batch = min(config.pool_batch_size, n_train)
    per_epoch = n_train // batch
    params = jax.jit(lambda k: sample_inits(k, n, model, train_x[:1], config.init_dist,
                                            config.init_gain))(jax.random.fold_in(key, TRAIN_STREAM))
    optimizer = pool_optimizer(config)
    opt_state = jax.vmap(optimizer.init)(params)
    train_steps = make_pool_train_steps(model, optimizer)
    permute = jax.jit(jax.vmap(lambda k: jax.random.permutation(k, n_train)[: per_epoch * batch]))
    data_key = jax.random.fold_in(key, DATA_STREAM)
    epoch_losses = []
    from tqdm.auto import tqdm

    with tqdm(total=config.pool_epochs * per_epoch, disable=not progress, unit="step",
              dynamic_ncols=True, desc=f"train {n} nets") as bar:
        for epoch in range(config.pool_epochs):
            order = permute(jax.random.split(jax.random.fold_in(data_key, epoch), n))
            order = order.reshape(n, per_epoch, batch)
            losses = []
            for start in range(0, per_epoch, chunk):
                params, opt_state, loss = train_steps(
                    params, opt_state, train_x, train_y, order[:, start : start + chunk])
                losses.append(np.asarray(loss))
                bar.update(losses[-1].shape[1])
                bar.set_postfix(loss=f"{losses[-1].mean():.3f}", refresh=False)
            epoch_losses.append(np.concatenate(losses, axis=1).mean(axis=1))
    return params, np.stack(epoch_losses)


# --------------------------------------------------------------------------- files


def pool_fingerprint(params: Params) -> str:
    """SHA-256 (hex) over every parameter's name, dtype, shape and bytes."""
    h = hashlib.sha256()
    for name, a in sorted(flat_arrays(params).items()):
        a = np.ascontiguousarray(a)
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def save_pool(path: str | Path, params: Params, meta: dict) -> dict:
    """Writes the pool (atomically): params with a leading pool axis, `meta` as JSON.

    Adds 'format', 'version', 'pool_size' and 'fingerprint' to meta; returns the meta written.
    """
    path = Path(path)
    if not isinstance(params, dict):
        raise ConfigError(f"a pool holds dict-of-dict parameter trees (Flax layout), got {type(params).__name__}")
    flat = flat_arrays(params)
    sizes = {a.shape[0] if a.ndim else None for a in flat.values()}
    if len(sizes) != 1 or None in sizes:
        raise ConfigError(f"pool parameters need one common leading pool axis, got sizes {sizes}")
    meta = {**meta, "format": POOL_FORMAT, "version": POOL_VERSION, "pool_size": sizes.pop(),
            "fingerprint": pool_fingerprint(params)}
    with atomic_path(path, ".tmp.npz") as tmp:
        np.savez(tmp, meta=np.array(json.dumps(meta, sort_keys=True)),
                 **{f"params/{k}": v for k, v in flat.items()})
    return meta


def load_pool(path: str | Path) -> tuple[Params, dict]:
    """(params with a leading pool axis, meta) from a file written by `save_pool`.

    Raises DataError for a missing, unreadable, foreign or corrupted file.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no network pool at {path}; train one with `python -m experiments.run "
                        "DATASET_pool` (mnist_pool, digits_pool, usps_pool, svhn_pool)")
    try:
        with np.load(path) as f:
            arrays = {k: f[k] for k in f.files}
        meta = json.loads(str(arrays.pop("meta"))) if "meta" in arrays else None
    except Exception as e:  # numpy and zipfile raise many types for a damaged or foreign file
        raise DataError(f"{path} is not a readable dd_jax pool file ({type(e).__name__}: "
                        f"{' '.join(str(e).split())[:120]})") from None
    if not isinstance(meta, dict) or meta.get("format") != POOL_FORMAT:
        raise DataError(f"{path} is not a dd_jax pool file (no '{POOL_FORMAT}' meta)")
    if meta.get("version") != POOL_VERSION:
        raise DataError(f"{path} is pool format version {meta.get('version')}; this dd_jax reads "
                        f"version {POOL_VERSION} - retrain the pool")
    params = nested(arrays, "params/")
    if params is None or pool_fingerprint(params) != meta.get("fingerprint"):
        raise DataError(f"{path} is corrupted: its parameters do not match the fingerprint "
                        "recorded when it was saved; retrain the pool")
    return params, meta


# --------------------------------------------------------------------------- use in a run


@dataclasses.dataclass(frozen=True)
class Pool:
    """A loaded pool: params (leading pool axis), its meta, and the path it came from."""

    params: Params
    meta: dict
    path: str

    @property
    def size(self) -> int:
        return int(self.meta["pool_size"])


def pool_path(config) -> Path:
    """config.pool_path, or runs/<pool_source>_pool/pool.npz (where `<source>_pool` writes it)."""
    if config.pool_path:
        return Path(config.pool_path)
    if config.pool_source:
        return Path("runs") / f"{config.pool_source}_pool" / POOL_FILE
    raise ConfigError(
        f"init_regime={config.init_regime} needs a network pool: pass --pool_path=FILE (a pool.npz "
        "written by `python -m experiments.run mnist_pool`) or --pool_source=DATASET"
    )


def check_pool(pool: Pool, model: Model, dataset: Dataset, model_name: str = "",
               source: str = "") -> None:
    """Raises ConfigError if `pool` cannot start `model` on `dataset` (or was not trained on `source`)."""
    meta, where = pool.meta, f"the pool {pool.path}"
    if source and meta.get("dataset") != source:
        raise ConfigError(f"{where} was trained on {meta.get('dataset')!r}, not {source!r}; "
                          f"point --pool_path at a {source} pool or change --pool_source")
    if model_name and meta.get("model") != model_name:
        raise ConfigError(f"{where} holds {meta.get('model')!r} networks, the run uses "
                          f"--model={model_name}; train a pool for that model")
    if meta.get("num_classes") != dataset.num_classes or tuple(meta.get("image_shape", ())) != dataset.image_shape:
        raise ConfigError(
            f"{where} was trained for {meta.get('num_classes')} classes of {tuple(meta.get('image_shape', ()))} "
            f"images ({meta.get('dataset')}); dataset {dataset.name!r} has {dataset.num_classes} classes of "
            f"{dataset.image_shape} images"
        )
    expected = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, *dataset.image_shape)))
    want = {k: (pool.size, *v.shape) for k, v in traverse_util.flatten_dict(expected, sep="/").items()}
    have = {k: v.shape for k, v in flat_arrays(pool.params).items()}
    if want != have:
        raise ConfigError(f"{where}'s parameters do not fit the model: it has {sorted(have.items())}, "
                          f"the model needs {sorted(want.items())}")


def pool_for_config(config, model_fn, dataset: Dataset) -> Pool:
    """The pool a pretrained-regime run starts from, checked against its model and dataset."""
    path = pool_path(config)
    if not path.is_file():
        source = config.pool_source or "DATASET"
        raise DataError(f"no network pool at {path}; create it with `python -m experiments.run "
                        f"{source}_pool` (or point --pool_path at a pool.npz)")
    params, meta = load_pool(path)
    pool = Pool(params, meta, str(path))
    check_pool(pool, as_model(model_fn), dataset, config.model, config.pool_source)
    return pool


def pool_record(pool: Pool, eval_nets: int) -> dict:
    """What distilled data records about the pool it was made for (saved in distilled.npz)."""
    return {"path": pool.path, "fingerprint": pool.meta["fingerprint"], "dataset": pool.meta["dataset"],
            "pool_size": pool.size, "eval_nets": eval_nets}
