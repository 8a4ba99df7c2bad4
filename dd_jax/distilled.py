"""The result of a distillation, `DistilledData`, and its portable .npz file.

The .npz format is documented in README.md ("The distilled-data file"): version 1 holds hard
labels and plain-GD data; version 2 adds learned label vectors (`soft_labels`) and the inner
optimiser. A file needing neither is written as version 1; both versions load.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from dd_jax.errors import DataError
from dd_jax.files import atomic_path, flat_arrays, nested
from dd_jax.unroll import InnerSpec

Params = Any
FORMAT_VERSION = 2  # the newest version written; FORMAT_VERSIONS are read
FORMAT_VERSIONS = (1, 2)


@dataclasses.dataclass
class DistilledData:
    """The result: train a network by T = steps*epochs GD steps, step t on batch t mod steps.

    images (S, n, H, W, C) normalised; labels (S, n); step_sizes (T,); init_params is theta_0
    for the fixed regimes (None for random: draw from init_dist/init_gain, held-out via seed).
    soft_labels (S, n, K), when labels were learned, are what the network trains on (soft
    targets; `train_labels`); labels then hold their argmax. inner_optimizer and
    inner_momentum say how the T steps update theta (dd_jax.unroll; 'gd': plain GD).
    pool, for the pretrained regimes, records the pool it was made for (pretrain.pool_record:
    path, fingerprint, dataset, pool_size, eval_nets). selected, for a run with a validation
    holdout (config.val_size), says which outer iteration this is and why: {'iteration',
    'val_acc', 'val_size'}; None means the last iteration.
    """

    images: np.ndarray
    labels: np.ndarray
    step_sizes: np.ndarray
    epochs: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    init_regime: str
    init_dist: str
    init_gain: float
    seed: int
    init_params: Params | None = None
    pool: dict | None = None
    selected: dict | None = None
    soft_labels: np.ndarray | None = None
    inner_optimizer: str = "gd"
    inner_momentum: float = 0.9

    @property
    def steps(self) -> int:
        return int(self.images.shape[0])

    @property
    def train_labels(self) -> np.ndarray:
        """What the network trains on: soft_labels (S, n, K) if learned, else labels (S, n)."""
        return self.labels if self.soft_labels is None else self.soft_labels

    @property
    def inner(self) -> InnerSpec | None:
        """The inner optimiser (None: plain GD, `inner.inner_train`)."""
        return None if self.inner_optimizer == "gd" else InnerSpec(self.inner_optimizer,
                                                                     self.inner_momentum)



def save_distilled(path: str | Path, d: DistilledData, model: str = "") -> None:
    """Writes `d` as an .npz (atomically); init_params, if any, as 'init/<layer>/<name>'.
    Version 2 (with 'soft_labels' (S, n, K) float32 if learned, 'inner_optimizer',
    'inner_momentum') when the data has learned labels or an inner optimiser other than plain
    GD, else version 1."""
    v2 = d.soft_labels is not None or d.inner_optimizer != "gd"
    arrays = {
        "format_version": np.int32(FORMAT_VERSION if v2 else 1),
        "images": np.asarray(d.images, np.float32),
        "labels": np.asarray(d.labels, np.int32),
        "step_sizes": np.asarray(d.step_sizes, np.float32),
        "steps": np.int32(d.steps),
        "epochs": np.int32(d.epochs),
        "mean": np.asarray(d.mean, np.float32),
        "std": np.asarray(d.std, np.float32),
        "init_regime": np.array(d.init_regime),
        "init_dist": np.array(d.init_dist),
        "init_gain": np.float32(d.init_gain),
        "seed": np.int64(d.seed),
        "model": np.array(model),
    }
    if d.init_params is not None:
        arrays.update(flat_arrays(d.init_params, "init/"))
    if d.pool is not None:
        arrays["pool"] = np.array(json.dumps(d.pool, sort_keys=True))
    if d.selected is not None:
        arrays["selected"] = np.array(json.dumps(d.selected, sort_keys=True))
    if v2:
        arrays["inner_optimizer"] = np.array(d.inner_optimizer)
        arrays["inner_momentum"] = np.float32(d.inner_momentum)
    if d.soft_labels is not None:
        arrays["soft_labels"] = np.asarray(d.soft_labels, np.float32)
    with atomic_path(path, ".tmp.npz") as tmp:
        np.savez(tmp, **arrays)


def load_distilled(path: str | Path) -> DistilledData:
    """Reads an .npz written by `save_distilled` (format version 1 or 2)."""
    try:
        with np.load(path) as f:
            flat = {k: f[k] for k in f.files}
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read distilled data from {path}: {e}") from None
    if int(flat.get("format_version", -1)) not in FORMAT_VERSIONS:
        raise DataError(f"{path} is not a dd_jax distilled-data file (format "
                        f"{' or '.join(map(str, FORMAT_VERSIONS))})")
    return DistilledData(
        images=flat["images"], labels=flat["labels"], step_sizes=flat["step_sizes"],
        epochs=int(flat["epochs"]), mean=tuple(flat["mean"].tolist()),
        std=tuple(flat["std"].tolist()), init_regime=str(flat["init_regime"]),
        init_dist=str(flat["init_dist"]), init_gain=float(flat["init_gain"]),
        seed=int(flat["seed"]), init_params=nested(flat, "init/"),
        pool=json.loads(str(flat["pool"])) if "pool" in flat else None,
        selected=json.loads(str(flat["selected"])) if "selected" in flat else None,
        soft_labels=flat.get("soft_labels"),
        inner_optimizer=str(flat.get("inner_optimizer", "gd")),
        inner_momentum=float(flat.get("inner_momentum", 0.9)),
    )


def distilled_model(path: str | Path) -> str:
    """The model name an .npz of `save_distilled` records ('' if none was given)."""
    try:
        with np.load(path) as f:
            return str(f["model"]) if "model" in f.files else ""
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read distilled data from {path}: {e}") from None
