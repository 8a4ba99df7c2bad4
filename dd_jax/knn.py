"""k-nearest-neighbour classification with a distilled or baseline set as the reference: how
much of the test set the set's images label by proximity alone, without training a network
(the baselines run reports it beside each set's trained accuracy)."""
from __future__ import annotations

import numpy as np

from dd_jax.dataset import Dataset
from dd_jax.distilled import DistilledData
from dd_jax.errors import ConfigError


def knn_accuracy(ref_x: np.ndarray, ref_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                 k: int = 1, chunk: int = 2000) -> float:
    """Accuracy on (test_x, test_y) of k-nearest-neighbour classification against the reference
    images ref_x (M, ...) with labels ref_y (M,): Euclidean distance in normalised pixel space,
    majority vote among the k nearest (ties: the smallest label)."""
    ref = np.asarray(ref_x, np.float64).reshape(len(ref_y), -1)
    ref_y = np.asarray(ref_y)
    if not 1 <= k <= len(ref_y):
        raise ConfigError(f"knn_k={k} must be between 1 and the {len(ref_y)} reference images")
    n_labels = int(max(ref_y.max(), np.max(test_y))) + 1
    ref_sq = np.sum(ref**2, axis=1)
    correct = 0
    for i in range(0, len(test_y), chunk):
        x = np.asarray(test_x[i:i + chunk], np.float64).reshape(-1, ref.shape[1])
        dist = np.sum(x**2, axis=1)[:, None] - 2 * x @ ref.T + ref_sq[None]
        nearest = np.argsort(dist, axis=1, kind="stable")[:, :k]
        votes = np.zeros((len(x), n_labels), np.int64)
        np.add.at(votes, (np.arange(len(x))[:, None], ref_y[nearest]), 1)
        correct += int(np.sum(votes.argmax(axis=1) == test_y[i:i + chunk]))
    return correct / len(test_y)


def knn_of(data: DistilledData, dataset: Dataset, k: int) -> float:
    """`knn_accuracy` of the whole test set with all of `data`'s images as the reference."""
    return knn_accuracy(data.images.reshape(-1, *data.images.shape[2:]), data.labels.reshape(-1),
                        dataset.test_x, dataset.test_y, k)
