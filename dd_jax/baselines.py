"""Baselines: real-image sets in the distilled data's layout, trained and tested like it.

Each baseline is a `DistilledData`: S x n images with the labels of `meta.distilled_labels`
(every step holds `images_per_class` images of every class), one FIXED step size repeated for
all T = S x E steps, and the networks of the distilled data of the same config and seed (fixed
regime: the same theta_0; random regime: the same held-out draws `evaluation.evaluate` uses).

- ``random_real``: S x ipc random training images per class;
- ``optimised_real``: the best of `optimised_candidates` random sets (the first candidate is
  random_real's set), each scored at random_real's step size; then its own step size is searched;
- ``kmeans``: the S x ipc k-means centres of each class (scikit-learn, random_state = seed);
- ``mean``: the class's mean image, repeated in every slot of that class (S x ipc copies; with
  one image per class per step, every step trains on the same ten means - as the authors'
  ``average_train`` does).

Sets are built from the training set minus a held-out slice of `score_holdout` images (drawn with
the run's key). Every choice - a set's step size from `step_size_grid`, optimised_real's set - is
made by the mean accuracy on that slice of networks trained from the regime's TRAINING inits
(`train_inits(0)`: theta_0 in the fixed regime, `n_nets` training draws in the random one), never
on the test set. `baseline_run` runs them as an experiment.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dd_jax.config import require
from dd_jax.dataset import Dataset, split_holdout
from dd_jax.distilled import DistilledData
from dd_jax.errors import ConfigError
from dd_jax.evaluation import Evaluator
from dd_jax.meta import distilled_labels
from dd_jax.models import as_model
from dd_jax.regimes import make_regime
from dd_jax.validation import validate_config

Params = Any
BASELINES = ("random_real", "optimised_real", "kmeans", "mean")
# A stream of the run's root key, apart from the ones regimes.py numbers: the held-out split and
# the random real sets come from it, so baselines never reuse the distillation's draws.
BASELINES_STREAM = 101
SPLIT, CANDIDATES = 0, 1


# --------------------------------------------------------------------------- config


def parse_methods(text: str) -> list[str]:
    """'random_real,kmeans' -> ['random_real', 'kmeans']; unknown or repeated names raise."""
    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in BASELINES]
    if not methods or unknown or len(set(methods)) != len(methods):
        raise ConfigError(
            f"--baselines={text!r}: expected distinct names from {', '.join(BASELINES)}, "
            "comma-separated"
        )
    return methods


def parse_grid(text: str) -> list[float]:
    """'0.01,0.1' -> [0.01, 0.1]; anything but positive numbers raises."""
    try:
        grid = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        grid = []
    if not grid or not all(np.isfinite(v) and v > 0 for v in grid):
        raise ConfigError(
            f"--step_size_grid={text!r}: expected comma-separated positive numbers, e.g. 0.01,0.1,1"
        )
    return grid


def validate_baselines_config(config) -> None:
    """Raises ConfigError for a baselines field that cannot work (distillation fields: outer)."""
    validate_config(config)
    parse_methods(config.baselines)
    parse_grid(config.step_size_grid)
    require(config, at_least_one=("optimised_candidates", "score_holdout", "knn_k"))
    for name, plain in (("learn_labels", False), ("images_per_step", 0), ("inner_optimizer", "gd"),
                        ("inner_lr", 0.0), ("window", 0)):
        if config[name] != plain:
            raise ConfigError(f"--{name}={config[name]}: baselines are hard-label sets in the "
                              f"images_per_class layout, trained by plain GD; drop --{name}")


# --------------------------------------------------------------------------- the sets


def class_members(y: np.ndarray, num_classes: int, needed: int) -> list[np.ndarray]:
    """Indices of each class in y; raises if a class has fewer than `needed` examples."""
    members = [np.flatnonzero(y == c) for c in range(num_classes)]
    short = [c for c, m in enumerate(members) if len(m) < needed]
    if short:
        raise ConfigError(
            f"classes {short} have fewer than the {needed} training images (steps x "
            "images_per_class) a baseline needs; raise --train_subset or lower --score_holdout"
        )
    return members


def to_layout(per_class: np.ndarray, images_per_class: int) -> np.ndarray:
    """(C, S*ipc, H, W, ch) per-class images -> (S, C*ipc, H, W, ch) in distilled_labels' order:
    slot j of step s holds class j // ipc, its image s*ipc + j % ipc."""
    c, k = per_class.shape[:2]
    steps = k // images_per_class
    x = per_class.reshape(c, steps, images_per_class, *per_class.shape[2:])
    return np.swapaxes(x, 0, 1).reshape(steps, c * images_per_class, *per_class.shape[2:])


def random_real_images(key: jax.Array, x: np.ndarray, y: np.ndarray, steps: int,
                       images_per_class: int, num_classes: int) -> np.ndarray:
    """(S, C*ipc, H, W, ch): S*ipc distinct random images of each class, drawn with `key`."""
    k = steps * images_per_class
    members = class_members(y, num_classes, k)
    picks = [m[np.asarray(jax.random.permutation(jax.random.fold_in(key, c), len(m)))[:k]]
             for c, m in enumerate(members)]
    return to_layout(np.stack([x[p] for p in picks]), images_per_class)


def kmeans_images(x: np.ndarray, y: np.ndarray, steps: int, images_per_class: int,
                  num_classes: int, seed: int) -> np.ndarray:
    """(S, C*ipc, H, W, ch): the S*ipc k-means centres of each class (Euclidean, k-means++ init,
    one run, random_state=seed)."""
    from sklearn.cluster import KMeans

    k = steps * images_per_class
    members = class_members(y, num_classes, k)
    centres = [
        KMeans(n_clusters=k, n_init=1, random_state=seed).fit(x[m].reshape(len(m), -1)).cluster_centers_
        for m in members
    ]
    return to_layout(np.stack(centres).reshape(num_classes, k, *x.shape[1:]).astype(np.float32),
                     images_per_class)


def mean_images(x: np.ndarray, y: np.ndarray, steps: int, images_per_class: int,
                num_classes: int) -> np.ndarray:
    """(S, C*ipc, H, W, ch): each class's mean image in all S*ipc slots of that class."""
    members = class_members(y, num_classes, 1)
    means = np.stack([x[m].mean(axis=0, dtype=np.float64) for m in members]).astype(np.float32)
    per_class = np.broadcast_to(means[:, None], (num_classes, steps * images_per_class, *x.shape[1:]))
    return to_layout(np.ascontiguousarray(per_class), images_per_class)


# --------------------------------------------------------------------------- choosing on training data


class SetScorer:
    """Mean accuracy on held-out TRAINING images of networks trained from `inits` (leading axis)
    by T GD steps on a set (S, n, H, W, ch) with one fixed step size."""

    def __init__(self, apply_fn, inits: Params, labels: np.ndarray, epochs: int,
                 holdout_x: np.ndarray, holdout_y: np.ndarray):
        self._evaluator = Evaluator(apply_fn, epochs, holdout_x, holdout_y,
                                    chunk=min(2000, len(holdout_y)))
        self._inits, self._labels = inits, jnp.asarray(labels)
        self._steps = labels.shape[0] * epochs

    def __call__(self, images: np.ndarray, step_size: float) -> float:
        step_sizes = jnp.full((self._steps,), step_size, jnp.float32)
        return float(np.mean(self._evaluator(self._inits, jnp.asarray(images), self._labels, step_sizes)))


def search_step_size(score: Callable[[float], float], grid: Sequence[float]) -> tuple[float, dict]:
    """The grid value with the highest score (the smallest of tied ones) and {value: score}."""
    scores = {float(lr): score(float(lr)) for lr in grid}
    return max(scores, key=lambda lr: (scores[lr], -lr)), scores


def best_candidate(candidates: Sequence[np.ndarray], score: Callable[[np.ndarray], float]
                   ) -> tuple[int, list[float]]:
    """Index of the highest-scoring candidate (the first of tied ones) and every score."""
    scores = [score(c) for c in candidates]
    return int(np.argmax(scores)), scores


# --------------------------------------------------------------------------- baselines


@dataclasses.dataclass
class Baseline:
    """One baseline: its set as DistilledData (step_sizes = the chosen value T times), the
    holdout score of every grid step size and, for optimised_real, of every candidate set."""

    method: str
    data: DistilledData
    step_size: float
    step_size_scores: dict[float, float]
    candidate_scores: list[float] | None = None

    @property
    def score(self) -> float:
        return self.step_size_scores[self.step_size]


class BaselineMaker:
    """Builds the baselines of one (dataset, model, config): the shared split, labels, regime
    and scorer, then `make(method)`."""

    def __init__(self, dataset: Dataset, model_fn, config):
        validate_baselines_config(config)
        self.dataset, self.config = dataset, config
        self.grid = parse_grid(config.step_size_grid)
        model = as_model(model_fn)
        key = jax.random.PRNGKey(config.seed)
        regime = make_regime(
            config.init_regime, key, model, jnp.asarray(dataset.train_x[:1]), n_nets=config.n_nets,
            dist=config.init_dist, gain=config.init_gain,
        )
        self.init_params = (None if regime.fixed_params is None
                            else jax.tree.map(np.asarray, regime.fixed_params))
        stream = jax.random.fold_in(key, BASELINES_STREAM)
        self.split = split_holdout(jax.random.fold_in(stream, SPLIT), dataset.train_x,
                                   dataset.train_y, config.score_holdout, "score_holdout")
        self.candidates_key = jax.random.fold_in(stream, CANDIDATES)
        self.labels = np.asarray(distilled_labels(config.steps, config.images_per_class,
                                                  dataset.num_classes))
        class_members(self.split.learn_y, dataset.num_classes,  # raises now if a class is short
                      config.steps * config.images_per_class)
        if config.knn_k > self.labels.size:
            raise ConfigError(f"knn_k={config.knn_k} must be at most the {self.labels.size} "
                              "images of a set; lower --knn_k")
        self._made: dict[str, Baseline] = {}
        self.scorer = SetScorer(model.apply, regime.train_inits(0), self.labels, config.epochs,
                                self.split.holdout_x, self.split.holdout_y)

    def random_set(self, i: int) -> np.ndarray:
        """Candidate i of the random real sets (candidate 0 is random_real's)."""
        c = self.config
        return random_real_images(jax.random.fold_in(self.candidates_key, i), self.split.learn_x,
                                  self.split.learn_y, c.steps, c.images_per_class,
                                  self.dataset.num_classes)

    def tuned(self, method: str, images: np.ndarray, candidate_scores=None) -> Baseline:
        """`images` with the grid step size that scores best on the holdout."""
        lr, scores = search_step_size(lambda lr: self.scorer(images, lr), self.grid)
        return Baseline(method, self.as_distilled(images, lr), lr, scores, candidate_scores)

    def make(self, method: str) -> Baseline:
        """The named baseline (built once; optimised_real builds random_real first)."""
        if method not in self._made:
            self._made[method] = self._build(method)
        return self._made[method]

    def _build(self, method: str) -> Baseline:
        c, split, classes = self.config, self.split, self.dataset.num_classes
        if method == "random_real":
            return self.tuned(method, self.random_set(0))
        if method == "optimised_real":
            reference = self.make("random_real").step_size
            candidates = [self.random_set(i) for i in range(c.optimised_candidates)]
            best, scores = best_candidate(candidates, lambda x: self.scorer(x, reference))
            return self.tuned(method, candidates[best], scores)
        if method == "kmeans":
            return self.tuned(method, kmeans_images(split.learn_x, split.learn_y, c.steps,
                                                    c.images_per_class, classes, c.seed))
        if method == "mean":
            return self.tuned(method, mean_images(split.learn_x, split.learn_y, c.steps,
                                                  c.images_per_class, classes))
        raise ConfigError(f"unknown baseline {method!r}; choose from {', '.join(BASELINES)}")

    def as_distilled(self, images: np.ndarray, step_size: float) -> DistilledData:
        """The set as DistilledData: trained like distilled data of this config would be."""
        c = self.config
        return DistilledData(
            images=np.asarray(images, np.float32), labels=self.labels,
            step_sizes=np.full((c.steps * c.epochs,), step_size, np.float32), epochs=c.epochs,
            mean=tuple(self.dataset.mean), std=tuple(self.dataset.std), init_regime=c.init_regime,
            init_dist=c.init_dist, init_gain=c.init_gain, seed=c.seed, init_params=self.init_params,
        )
