"""Stage 7 - evaluation: train fresh networks on distilled data, test on the full test set.

Fixed regime: the one theta_0 the data was distilled for. Random regime: `n_nets` held-out
initialisations (never drawn in training); reported as mean +- std over them.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dd_jax.inner import ApplyFn, inner_train
from dd_jax.models import Model, as_model
from dd_jax.regimes import make_regime

Params = Any


class Evaluator:
    """Compiled once, then: accuracy on the whole test set of networks trained on distilled data.

    test_x (N, H, W, C), test_y (N,) are split into chunks of `chunk` (the last one padded with
    label -1, which never counts as correct).
    """

    def __init__(self, apply_fn: ApplyFn, epochs: int, test_x, test_y, chunk: int = 2000):
        n = len(test_y)
        pad = -n % chunk
        x = jnp.concatenate([jnp.asarray(test_x), jnp.zeros((pad, *test_x.shape[1:]), jnp.float32)])
        y = jnp.concatenate([jnp.asarray(test_y, jnp.int32), jnp.full((pad,), -1, jnp.int32)])
        self._x = x.reshape(-1, chunk, *x.shape[1:])
        self._y = y.reshape(-1, chunk)
        self._n = n

        def correct(params, x, y):
            hits = jax.lax.map(
                lambda xy: jnp.sum(jnp.argmax(apply_fn(params, xy[0]), -1) == xy[1]), (x, y)
            )
            return jnp.sum(hits)

        def train_and_count(params, images, labels, step_sizes, x, y):
            return correct(inner_train(apply_fn, params, images, labels, step_sizes, epochs), x, y)

        def predict(params, x):
            return jax.lax.map(lambda xc: jnp.argmax(apply_fn(params, xc), -1), x).reshape(-1)

        def train_and_predict(params, images, labels, step_sizes, x):
            return predict(inner_train(apply_fn, params, images, labels, step_sizes, epochs), x)

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


def default_eval_inits(distilled, dataset, model: Model, n_nets: int) -> Params:
    """The theta_0 (leading axis) that `distilled` is tested from: its own theta_0 for the fixed
    regime, else `n_nets` held-out draws of its distribution (the run's evaluation key stream,
    never used in training)."""
    if distilled.init_params is not None:
        return jax.tree.map(lambda a: jnp.asarray(a)[None], distilled.init_params)
    regime = make_regime(
        "random", jax.random.PRNGKey(distilled.seed), model,
        jnp.asarray(dataset.train_x[:1]), dist=distilled.init_dist, gain=distilled.init_gain,
    )
    return regime.eval_inits(n_nets)


def evaluate(
    distilled, dataset, model_fn, init_params: Params | None = None, n_nets: int = 20
) -> dict:
    """Trains networks on `distilled` (a DistilledData) and tests them on dataset's test set.

    init_params: theta_0 batch with a leading axis. By default the fixed regime uses
    distilled.init_params, the random regime `n_nets` held-out draws of its distribution
    (the run's evaluation key stream, never used in training).
    Returns `summarise` of the accuracies, plus 'untrained' (the same nets before training).
    """
    model = as_model(model_fn)
    if init_params is None:
        init_params = default_eval_inits(distilled, dataset, model, n_nets)
    evaluator = Evaluator(model.apply, distilled.epochs, dataset.test_x, dataset.test_y)
    accs = evaluator(
        init_params, jnp.asarray(distilled.images), jnp.asarray(distilled.labels),
        jnp.asarray(distilled.step_sizes),
    )
    return {**summarise(accs), "untrained": summarise(evaluator.untrained(init_params))}
