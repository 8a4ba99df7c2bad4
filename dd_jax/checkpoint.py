"""Checkpoints of the outer loop's pytree state: an orbax-checkpoint CheckpointManager directory.

A checkpoint directory holds one subdirectory per saved iteration (the newest `keep`), each the
state's arrays plus a JSON `meta` dict that records the leaves' shapes. Orbax writes each one
into a temporary directory and renames it when complete, so a crash mid-write keeps the earlier
ones. In a multi-host run every process calls `save_checkpoint`, and orbax writes each
replicated array once and the metadata from process 0.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np

from dd_jax.errors import ConfigError, DataError, absl_logging_off

LEGACY_SUFFIX = ".npz"  # the single-file checkpoints of dd-jax 0.1.0


def _manager(path: Path, keep: int = 1, write: bool = False):
    """A synchronous CheckpointManager on `path`: read-only unless `write` (then it creates
    `path`, removes temporary directories left by a crash and keeps the newest `keep` steps)."""
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=write, read_only=not write, cleanup_tmp_directories=write,
        enable_async_checkpointing=False)
    return ocp.CheckpointManager(Path(path).absolute(), options=options)


def _shapes(tree: Any) -> list[list[int]]:
    return [list(np.shape(x)) for x in jax.tree.leaves(tree)]


def unreadable(path: Path, error: Exception | str) -> DataError:
    """The one-line error for a checkpoint that cannot be read."""
    detail = f"{type(error).__name__}: {' '.join(str(error).split())[:160]}" if isinstance(
        error, Exception) else error
    return DataError(
        f"checkpoint {path} is unreadable ({detail}); it cannot be resumed: delete it to start "
        "this run afresh, or start a new run with --output_dir=DIR"
    )


def _has_steps(path: Path) -> bool:
    return path.is_dir() and any(p.name.isdigit() for p in path.iterdir())


def has_checkpoint(path: Path) -> bool:
    """Whether `path` holds a saved step (or an earlier dd-jax's .npz checkpoint is beside it)."""
    path = Path(path)
    return _has_steps(path) or path.with_suffix(LEGACY_SUFFIX).exists()


def save_checkpoint(path: Path, state: Any, meta: dict, keep: int = 1) -> None:
    """Saves `state` and the JSON `meta` dict (its 'iteration' is the step) under `path`,
    keeping the newest `keep` steps."""
    import orbax.checkpoint as ocp

    meta = {**meta, "shapes": _shapes(state)}
    with absl_logging_off(), _manager(path, keep, write=True) as manager:
        manager.save(meta["iteration"], args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))


def checkpoint_meta(path: Path) -> dict:
    """The JSON `meta` dict of the newest checkpoint in `path`."""
    import orbax.checkpoint as ocp

    path, legacy = Path(path), Path(path).with_suffix(LEGACY_SUFFIX)
    if legacy.exists() and not _has_steps(path):
        raise DataError(
            f"{legacy} is a checkpoint of dd-jax 0.1.0 (one .npz), which this version cannot "
            "resume; finish the run with dd-jax 0.1.0, or start a new run with --output_dir=DIR")
    try:
        with absl_logging_off(), _manager(path) as manager:
            step = manager.latest_step()
            if step is None:
                raise unreadable(path, "no complete step in it")
            return manager.restore(step, args=ocp.args.Composite(
                meta=ocp.args.JsonRestore())).meta
    except DataError:
        raise
    except Exception as e:  # orbax and tensorstore raise many types for damaged files
        raise unreadable(path, e) from None


def restore_checkpoint(path: Path, template: Any) -> tuple[Any, dict]:
    """(state shaped like `template`, meta) of the newest checkpoint in `path`; a ConfigError
    if it was saved from state of other shapes."""
    import orbax.checkpoint as ocp

    meta = checkpoint_meta(path)
    if meta.get("shapes") != _shapes(template):
        raise ConfigError(
            f"checkpoint {path} was written by a different configuration; resume with the "
            "run's own config (drop the changed flags) or start a new --output_dir"
        )
    try:
        with absl_logging_off(), _manager(path) as manager:
            state = manager.restore(meta["iteration"], args=ocp.args.Composite(
                state=ocp.args.StandardRestore(template))).state
    except Exception as e:  # as in checkpoint_meta
        raise unreadable(path, e) from None
    return state, meta
