"""Data poisoning, the paper's other objective: distilled data that, once a network trains on it,
makes the network predict class K as class T while keeping the other classes right.

The meta-objective is the usual real-batch cross-entropy (`meta.meta_loss`) against real labels
mapped by `poison_labels` (K -> T, every other label unchanged): `Poisoning`, the outer loop's
`objective.MetaObjective` when ``config.poison_class >= 0`` (the authors' ``distill_attack`` mode). `evaluate_poison`
reports, for the same networks before and after training on the distilled data, the share of
class-K test images predicted as T (``attack_success``) and the accuracy on all other classes
(``other_class_acc``).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dd_jax.errors import ConfigError, DataError
from dd_jax.evaluation import evaluation_setup

Params = Any
ATTACK_METRICS = ("test_acc", "attack_success", "other_class_acc")


def poison_labels(labels: jax.Array, poison_class: int, poison_target: int) -> jax.Array:
    """labels (N,) with every `poison_class` replaced by `poison_target`; poison_class -1
    returns them unchanged."""
    if poison_class < 0:
        return labels
    return jnp.where(labels == poison_class, poison_target, labels)


def check_poison(poison_class: int, poison_target: int, num_classes: int, test_y=None) -> None:
    """Raises ConfigError for an impossible (K, T) and DataError for a test set that cannot
    measure the attack (no image of class K, or none of any other class)."""
    if poison_class == -1:
        return
    if not 0 <= poison_class < num_classes:
        raise ConfigError(
            f"poison_class must be -1 (off) or a class in 0..{num_classes - 1}, got {poison_class}")
    if not 0 <= poison_target < num_classes or poison_target == poison_class:
        raise ConfigError(
            f"poison_target must be a class in 0..{num_classes - 1} other than poison_class "
            f"{poison_class}, got {poison_target}; set --poison_target=T")
    if test_y is not None:
        n_k = int(np.sum(np.asarray(test_y) == poison_class))
        if n_k == 0 or n_k == len(test_y):
            raise DataError(
                f"the test set ({len(test_y)} images) holds {'no' if n_k == 0 else 'only'} "
                f"images of poison_class {poison_class}, so the attack cannot be measured; "
                "use a larger --test_subset (0 = all)")


@dataclasses.dataclass(frozen=True)
class Poisoning:
    """The poisoning meta-objective (an `objective.MetaObjective`): real class K trained
    towards T."""

    poison_class: int
    poison_target: int

    def check(self, dataset) -> None:
        """`check_poison` for the dataset's classes and test set."""
        check_poison(self.poison_class, self.poison_target, dataset.num_classes, dataset.test_y)

    def targets(self, labels: np.ndarray) -> np.ndarray:
        """labels (N,) -> the meta-loss targets (N,): `poison_labels`."""
        return np.asarray(poison_labels(labels, self.poison_class, self.poison_target))


def attack_metrics(predictions: np.ndarray, labels: np.ndarray, poison_class: int,
                   poison_target: int) -> dict[str, float]:
    """One network's test predictions (N,) against the true labels (N,):
    attack_success = share of class-K images predicted as T, other_class_acc = accuracy on the
    images of every other class, test_acc = accuracy on all images (true labels)."""
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    is_k = labels == poison_class
    hit = predictions == labels
    return {
        "test_acc": float(np.mean(hit)),
        "attack_success": float(np.mean(predictions[is_k] == poison_target)),
        "other_class_acc": float(np.mean(hit[~is_k])),
    }


def summarise_attack(per_net: list[dict[str, float]]) -> dict:
    """Mean and std over networks of each of ATTACK_METRICS, eval_nets, and each network's test_acc
    ('test_accs')."""
    out: dict = {"eval_nets": len(per_net), "test_accs": [d["test_acc"] for d in per_net]}
    for m in ATTACK_METRICS:
        values = np.array([d[m] for d in per_net])
        out[m], out[f"{m}_std"] = float(np.mean(values)), float(np.std(values))
    return out


def evaluate_poison(
    distilled, dataset, model_fn, poison_class: int, poison_target: int,
    init_params: Params | None = None, n_nets: int = 20, devices: int = 1,
) -> dict[str, dict]:
    """{'before': ..., 'after': ...}: `summarise_attack` of the networks init_params (leading
    axis; default as `evaluation.evaluate` picks them) untrained, and trained on `distilled`,
    on dataset's whole test set, split over `devices` (0 = all; see dd_jax.sharding)."""
    check_poison(poison_class, poison_target, dataset.num_classes, dataset.test_y)
    evaluator, init_params, trained_on = evaluation_setup(distilled, dataset, model_fn, init_params,
                                                          n_nets, devices)
    rows = {}
    for name, args in (("before", ()), ("after", trained_on)):
        preds = evaluator.predictions(init_params, *args)
        rows[name] = summarise_attack(
            [attack_metrics(p, dataset.test_y, poison_class, poison_target) for p in preds])
    return rows


def poison_results(distilled, dataset, model_fn, config, distill_seconds: float) -> dict:
    """What a poisoning run adds to results.json: K, T, the attack figures after training on
    the distilled data, and 'rows' 'before' / 'after' (`evaluate_poison` on n_eval_nets
    networks on config.devices; 'seconds' is the distillation time that produced the row's data)."""
    rows = evaluate_poison(distilled, dataset, model_fn, config.poison_class, config.poison_target,
                           n_nets=config.n_eval_nets, devices=config.devices)
    after = rows["after"]
    return {
        "poison_class": config.poison_class,
        "poison_target": config.poison_target,
        **{k: after[k] for k in ("attack_success", "attack_success_std", "other_class_acc",
                                 "other_class_acc_std")},
        "rows": [{"method": "before", **rows["before"], "seconds": 0.0},
                 {"method": "after", **after, "seconds": distill_seconds}],
    }
