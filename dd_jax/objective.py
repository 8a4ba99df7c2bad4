"""What the distilled data is optimised for: the meta-objective, plugged into the outer loop.

The outer loop measures the meta-loss of a real batch against `MetaObjective.targets` of its
labels, after `MetaObjective.check` has accepted the dataset. `Plain` (the paper's objective)
keeps the true labels; `poison.Poisoning` (the paper's Sec. 4.4) relabels class K as T. Learned
soft labels change what the network trains on, not the objective: they live in `meta.Learned`.
Research code passes its own `MetaObjective` to `outer.distill(objective=...)`.
"""
from __future__ import annotations

import dataclasses
from typing import Protocol

import numpy as np

from dd_jax.dataset import Dataset
from dd_jax.poison import Poisoning


class MetaObjective(Protocol):
    """check(dataset) raises if the objective cannot be measured on it; targets(labels (N,))
    -> (N,) the labels the real batch's meta-loss is taken against."""

    def check(self, dataset: Dataset) -> None: ...

    def targets(self, labels: np.ndarray) -> np.ndarray: ...


@dataclasses.dataclass(frozen=True)
class Plain:
    """The paper's meta-objective: the real batch's cross-entropy against its true labels."""

    def check(self, dataset: Dataset) -> None:
        del dataset

    def targets(self, labels: np.ndarray) -> np.ndarray:
        return np.asarray(labels)


def objective_for(config) -> MetaObjective:
    """The meta-objective a config names: `Plain` for poison_class -1 (off), else `Poisoning`
    (whose check rejects an impossible class)."""
    if config.poison_class == -1:
        return Plain()
    return Poisoning(config.poison_class, config.poison_target)
