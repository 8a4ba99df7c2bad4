"""Checkpoints of the outer loop's pytree state, written atomically as .npz."""
from __future__ import annotations

import json
import os
import zipfile
import zlib
from pathlib import Path
from typing import Any

import jax
import numpy as np

from dd_jax.errors import ConfigError, DataError

# what reading a damaged .npz raises
UNREADABLE = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error)


def save_checkpoint(path: Path, state: Any, meta: dict) -> None:
    """Writes every leaf of `state` plus a JSON `meta` dict; a crash mid-write keeps the old file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.npz")
    leaves = {f"leaf_{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(state))}
    np.savez(tmp, meta=np.array(json.dumps(meta)), **leaves)
    os.replace(tmp, path)


def unreadable(path: Path, error: Exception) -> DataError:
    """The one-line error for a checkpoint that cannot be read."""
    return DataError(
        f"checkpoint {path} is unreadable ({type(error).__name__}: {error}); it cannot be "
        "resumed: delete it to start this run afresh, or start a new run with --output_dir=DIR"
    )


def checkpoint_meta(path: Path) -> dict:
    """The JSON `meta` dict a checkpoint was saved with."""
    try:
        with np.load(path) as f:
            return json.loads(str(f["meta"]))
    except UNREADABLE as e:
        raise unreadable(path, e) from None


def restore_checkpoint(path: Path, template: Any) -> tuple[Any, dict]:
    """(state shaped like `template`, meta) from a checkpoint written by `save_checkpoint`."""
    meta = checkpoint_meta(path)
    leaves, treedef = jax.tree.flatten(template)
    try:
        with np.load(path) as f:
            stored = [f[f"leaf_{i}"] for i in range(len(leaves)) if f"leaf_{i}" in f]
            extra = f"leaf_{len(leaves)}" in f
    except UNREADABLE as e:
        raise unreadable(path, e) from None
    if extra or len(stored) != len(leaves) or any(
            a.shape != np.shape(b) for a, b in zip(stored, leaves)):
        raise ConfigError(
            f"checkpoint {path} was written by a different configuration; resume with the "
            "run's own config (drop the changed flags) or start a new --output_dir"
        )
    return jax.tree.unflatten(treedef, [jax.numpy.asarray(a) for a in stored]), meta
