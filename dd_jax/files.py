"""How every file of the package reaches the disk: whole or not at all (`atomic_path`), and
parameter trees as flat '/'-joined keys in .npz files (`flat_arrays`, `nested`)."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from flax import traverse_util


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """``with atomic_path(p) as tmp:`` write tmp; on leaving it is renamed to `p` in one step
    (a reader sees the old file or the new one, never half of one); on an error it is removed.
    `suffix` ends the temporary name (``np.savez`` needs '.npz')."""
    path = Path(path)
    tmp = path.with_name(path.name + suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def flat_arrays(tree: Any, prefix: str = "") -> dict[str, np.ndarray]:
    """A nested dict of arrays as {prefix + 'layer/name': array}."""
    return {prefix + k: np.asarray(v) for k, v in traverse_util.flatten_dict(tree, sep="/").items()}


def nested(flat: dict[str, Any], prefix: str = "") -> dict | None:
    """The inverse of `flat_arrays` for the keys starting with `prefix` (None if there are none)."""
    picked = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
    return traverse_util.unflatten_dict(picked, sep="/") if picked else None
