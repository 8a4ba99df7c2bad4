"""What every kind of run shares: its directory (config.json written first, results.json
last, an earlier run never overwritten), its data and model, and the record of the machine
it ran on."""
from __future__ import annotations

import functools
import platform
import subprocess
from pathlib import Path

import flax.linen as nn
import jax

import dd_jax
from dd_jax.allocator import allocator_in_use
from dd_jax.checkpoint import has_checkpoint
from dd_jax.data import load_dataset
from dd_jax.dataset import Dataset
from dd_jax.errors import ConfigError
from dd_jax.models import get_model
from dd_jax.outer import CHECKPOINT
from dd_jax.outputs import write_json

CONFIG = "config.json"
RESULTS = "results.json"

def refuse_resume(config, resume: bool) -> None:
    """The first call of a runner whose runs keep no checkpoint: --resume is a one-line error,
    before any data is loaded."""
    if resume:
        raise ConfigError(f"a {config.get('kind', 'distill')!r} run keeps no checkpoint, so "
                          "nothing can be resumed; rerun without --resume (with a new "
                          "--output_dir=DIR if this one holds a finished run)")


def check_run_dir(workdir: Path, resume: bool) -> None:
    """Refuses to overwrite an earlier run's checkpoint or results, and to resume no run.

    A directory whose run stopped before its first checkpoint holds nothing worth keeping:
    a plain rerun starts afresh there, and so does --resume.
    """
    if resume and not (workdir / CONFIG).exists():
        raise ConfigError(f"nothing to resume: {workdir} holds no run; drop --resume")
    if not resume and (has_checkpoint(workdir / CHECKPOINT) or (workdir / RESULTS).exists()):
        raise ConfigError(
            f"{workdir} already holds a run; pass --resume to continue it, or choose a new "
            "directory with --output_dir=DIR"
        )


def start_run(config, workdir: Path, name: str, resume: bool = False) -> dict:
    """`check_run_dir`, then creates `workdir` and writes the run's config.json; a directory
    that cannot be created or written is a ConfigError. Returns `machine_info()` as the run
    starts, for its results.json: the commit the run imported, not a later checkout's."""
    check_run_dir(workdir, resume)
    machine = machine_info()
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        write_json(workdir / CONFIG, {"experiment": name, **config.to_dict()})
    except OSError as e:
        raise ConfigError(f"cannot write the output directory {workdir} ({e.strerror or e}); "
                          "choose a writable one with --output_dir=DIR") from None
    return machine


def load_data_and_model(config) -> tuple[Dataset, nn.Module]:
    """The config's dataset (subset as configured) and its model for that many classes."""
    dataset = load_dataset(config.dataset, config.data_dir or None)
    dataset = dataset.subset(config.train_subset, config.test_subset)
    return dataset, get_model(config.model, dataset.num_classes, config.conv)


def git_state() -> tuple[str | None, bool | None]:
    """(commit, whether tracked files differ from it) of the git checkout that dd_jax is
    imported from, as it was when this process first asked; (None, None) outside one or without git."""
    return _git_state(Path(dd_jax.__file__).resolve().parent.parent)


@functools.cache
def _git_state(root: Path) -> tuple[str | None, bool | None]:
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--show-toplevel", "HEAD"],
                              capture_output=True, text=True, timeout=30)
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain",
                                 "--untracked-files=no"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None, None
    lines = head.stdout.splitlines()
    if head.returncode or status.returncode or len(lines) != 2 or Path(lines[0]).resolve() != root:
        return None, None
    return lines[1], bool(status.stdout.strip())


def machine_info() -> dict:
    """Where and with what a run ran, for results.json: the platform, devices, jax and dd_jax
    versions, the git commit of dd_jax's checkout (null outside one) and the allocator."""
    commit, dirty = git_state()
    return {"platform": platform.platform(), "devices": [str(d) for d in jax.devices()],
            "jax": jax.__version__, "dd_jax": dd_jax.__version__, "git_commit": commit,
            "git_dirty": dirty, "malloc": allocator_in_use()}
