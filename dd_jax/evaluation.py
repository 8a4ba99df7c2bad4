"""Stage 7 - evaluation: train fresh networks on distilled data, test on the full test set.

Fixed regimes: the one theta_0 the data was distilled for. Random regime: `n_nets` held-out
initialisations (never drawn in training); random_pretrained: `n_nets` of the pool members held
out from training. Reported as mean +- std over them.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dd_jax.errors import DataError
from dd_jax.inner import ApplyFn, inner_train
from dd_jax.models import Model, as_model
from dd_jax.pretrain import Pool, check_pool, load_pool
from dd_jax.regimes import make_regime
from dd_jax.sharding import TEST, eval_mesh, select_devices
from dd_jax.unroll import InnerSpec, optimizer_train

Params = Any


class Evaluator:
    """Compiled once, then: accuracy on the whole test set of networks trained on distilled data.

    test_x (N, H, W, C), test_y (N,) are split into equal chunks of at most `chunk` images (the
    last one padded with label -1, which never counts as correct), the chunks evenly over
    `devices` (default: the first device), each counting its hits (dd_jax.sharding).
    Networks train by all T steps of plain GD, or of `inner`'s optimiser (its window unused);
    labels may be hard (S, n) or soft (S, n, K).
    """

    def __init__(self, apply_fn: ApplyFn, epochs: int, test_x, test_y, chunk: int = 2000,
                 devices: Sequence[jax.Device] | None = None, inner: InnerSpec | None = None):
        mesh = eval_mesh(devices or jax.devices()[:1])
        n = len(test_y)
        n_chunks = mesh.size * -(-n // (chunk * mesh.size))
        chunk = -(-n // n_chunks)
        pad = n_chunks * chunk - n
        x = np.concatenate([np.asarray(test_x, np.float32),
                            np.zeros((pad, *test_x.shape[1:]), np.float32)])
        y = np.concatenate([np.asarray(test_y, np.int32), np.full((pad,), -1, np.int32)])
        split = NamedSharding(mesh, P(TEST))
        self._x = jax.device_put(x.reshape(n_chunks, chunk, *x.shape[1:]), split)
        self._y = jax.device_put(y.reshape(n_chunks, chunk), split)
        self._n = n

        def count(params, x, y):
            hits = jax.lax.map(
                lambda xy: jnp.sum(jnp.argmax(apply_fn(params, xy[0]), -1) == xy[1]), (x, y)
            )
            return jax.lax.psum(jnp.sum(hits), TEST)

        correct = jax.shard_map(count, mesh=mesh, in_specs=(P(), P(TEST), P(TEST)), out_specs=P())

        def train(params, images, labels, step_sizes):
            if inner is None or inner.optimizer == "gd":
                return inner_train(apply_fn, params, images, labels, step_sizes, epochs)
            return optimizer_train(apply_fn, params, images, labels, step_sizes, epochs, inner)

        def train_and_count(params, images, labels, step_sizes, x, y):
            return correct(train(params, images, labels, step_sizes), x, y)

        def predict(params, x):
            return jax.lax.map(lambda xc: jnp.argmax(apply_fn(params, xc), -1), x).reshape(-1)

        def train_and_predict(params, images, labels, step_sizes, x):
            return predict(train(params, images, labels, step_sizes), x)

        self._correct = jax.jit(correct)
        self._train_and_count = jax.jit(train_and_count)
        self._predict = jax.jit(predict)
        self._train_and_predict = jax.jit(train_and_predict)

    def untrained(self, init_params: Params) -> np.ndarray:
        """Accuracy of each theta_0 (leading axis) before any training."""
        return np.array([
            int(self._correct(p, self._x, self._y)) / self._n for p in _unstack(init_params)
        ])

    def __call__(self, init_params: Params, images, labels, step_sizes) -> np.ndarray:
        """Accuracy of each theta_0 (leading axis) after training on (images, labels, step_sizes)."""
        return np.array([
            int(self._train_and_count(p, images, labels, step_sizes, self._x, self._y)) / self._n
            for p in _unstack(init_params)
        ])

    def predictions(self, init_params: Params, images=None, labels=None, step_sizes=None) -> np.ndarray:
        """(n_nets, N) predicted class of every test image by each theta_0 (leading axis): as it
        is, or after training on (images, labels, step_sizes) when they are given."""
        if images is None:
            preds = [self._predict(p, self._x) for p in _unstack(init_params)]
        else:
            preds = [self._train_and_predict(p, images, labels, step_sizes, self._x)
                     for p in _unstack(init_params)]
        return np.stack([np.asarray(p)[: self._n] for p in preds])


def _unstack(tree: Params) -> list[Params]:
    n = jax.tree.leaves(tree)[0].shape[0]
    return [jax.tree.map(lambda a: a[i], tree) for i in range(n)]


def summarise(accs: np.ndarray) -> dict:
    """{'mean', 'std', 'n_nets', 'accuracies'} of per-network accuracies."""
    return {
        "mean": float(np.mean(accs)),
        "std": float(np.std(accs)),
        "n_nets": int(len(accs)),
        "accuracies": [float(a) for a in accs],
    }


def default_eval_inits(distilled, dataset, model: Model, n_nets: int | None) -> Params:
    """The theta_0 (leading axis) that `distilled` is tested from: its own theta_0 for the fixed
    regimes; for random, `n_nets` (default 20) held-out draws of its distribution (the run's
    evaluation key stream, never used in training); for random_pretrained, `n_nets` (default
    all) of the pool members held out from training, read from the pool file the data was made
    for (distilled.pool['path'], checked against its fingerprint)."""
    if distilled.init_params is not None:
        return jax.tree.map(lambda a: jnp.asarray(a)[None], distilled.init_params)
    if distilled.init_regime == "random_pretrained":
        pool = _distilled_pool(distilled, model, dataset)
        regime = make_regime("random_pretrained", jax.random.PRNGKey(distilled.seed), model, None,
                             pool=pool.params, pool_eval_nets=distilled.pool["eval_nets"])
        return regime.eval_inits(n_nets or distilled.pool["eval_nets"])
    regime = make_regime(
        "random", jax.random.PRNGKey(distilled.seed), model,
        jnp.asarray(dataset.train_x[:1]), dist=distilled.init_dist, gain=distilled.init_gain,
    )
    return regime.eval_inits(n_nets or 20)


def evaluate(
    distilled, dataset, model_fn, init_params: Params | None = None, n_nets: int | None = None,
    devices: int = 1,
) -> dict:
    """Trains networks on `distilled` (a DistilledData) and tests them on dataset's test set.

    init_params: theta_0 batch with a leading axis. By default the fixed regimes use
    distilled.init_params, the random regime `n_nets` (default 20) held-out draws of its
    distribution (the run's evaluation key stream, never used in training), random_pretrained
    `n_nets` (default all) of the pool members held out from training, read from the pool file
    the data was made for (distilled.pool['path'], checked against its fingerprint).
    devices: how many devices split the test set (0 = all; see dd_jax.sharding).
    Returns `summarise` of the accuracies, plus 'untrained' (the same nets before training).
    """
    evaluator, init_params, trained_on = evaluation_setup(distilled, dataset, model_fn, init_params,
                                                          n_nets, devices)
    accs = evaluator(init_params, *trained_on)
    return {**summarise(accs), "untrained": summarise(evaluator.untrained(init_params))}


def evaluation_setup(
    distilled, dataset, model_fn, init_params: Params | None = None, n_nets: int | None = None,
    devices: int = 1,
) -> tuple[Evaluator, Params, tuple[jax.Array, jax.Array, jax.Array]]:
    """What testing `distilled` needs: an Evaluator on dataset's test set split over `devices`,
    the theta_0 batch (init_params, or `default_eval_inits`) and (images, labels, step_sizes),
    the labels being what the networks train on (`DistilledData.train_labels`: soft if learned);
    the evaluator trains with the data's inner optimiser."""
    model = as_model(model_fn)
    if init_params is None:
        init_params = default_eval_inits(distilled, dataset, model, n_nets)
    evaluator = Evaluator(model.apply, distilled.epochs, dataset.test_x, dataset.test_y,
                          devices=select_devices(devices), inner=distilled.inner)
    trained_on = (jnp.asarray(distilled.images), jnp.asarray(distilled.train_labels),
                  jnp.asarray(distilled.step_sizes))
    return evaluator, init_params, trained_on


def accuracy_row(method: str, acc: dict) -> dict:
    """A results.json row of `summarise`d accuracies: method, test_acc, test_acc_std, eval_nets
    and test_accs."""
    return {"method": method, "test_acc": acc["mean"], "test_acc_std": acc["std"],
            "eval_nets": acc["n_nets"], "test_accs": acc["accuracies"]}


def _distilled_pool(distilled, model, dataset) -> Pool:
    """The pool `distilled` was made for, from the path it records, verified by fingerprint."""
    record = distilled.pool or {}
    try:
        params, meta = load_pool(record["path"])
    except (KeyError, DataError) as e:
        raise DataError(
            f"random_pretrained data is evaluated on its pool's held-out members, but its pool "
            f"{record.get('path', '(not recorded)')} cannot be read ({e}); put the pool file there or "
            "pass init_params=... explicitly"
        ) from None
    if meta["fingerprint"] != record["fingerprint"]:
        raise DataError(
            f"the pool at {record['path']} is not the one this data was distilled for (fingerprint "
            f"{meta['fingerprint'][:12]}..., expected {record['fingerprint'][:12]}...); restore that "
            "pool or pass init_params=... explicitly"
        )
    pool = Pool(params, meta, record["path"])
    check_pool(pool, model, dataset)
    return pool
