"""Checkpoints of the outer loop's pytree state, written atomically as .npz."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np

from dd_jax.errors import ConfigError


def save_checkpoint(path: Path, state: Any, meta: dict) -> None:
    """Writes every leaf of `state` plus a JSON `meta` dict; a crash mid-write keeps the old file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.npz")
    leaves = {f"leaf_{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(state))}
    np.savez(tmp, meta=np.array(json.dumps(meta)), **leaves)
    os.replace(tmp, path)


def checkpoint_meta(path: Path) -> dict:
    """The JSON `meta` dict a checkpoint was saved with."""
    with np.load(path) as f:
        return json.loads(str(f["meta"]))


def restore_checkpoint(path: Path, template: Any) -> tuple[Any, dict]:
    """(state shaped like `template`, meta) from a checkpoint written by `save_checkpoint`."""
    meta = checkpoint_meta(path)
    with np.load(path) as f:
        leaves, treedef = jax.tree.flatten(template)
        stored = [f[f"leaf_{i}"] for i in range(len(leaves)) if f"leaf_{i}" in f]
    if len(stored) != len(leaves) or any(a.shape != np.shape(b) for a, b in zip(stored, leaves)):
        raise ConfigError(
            f"checkpoint {path} was written by a different configuration; resume with the "
            "run's own config (drop the changed flags) or start a new --output_dir"
        )
    return jax.tree.unflatten(treedef, [jax.numpy.asarray(a) for a in stored]), meta
