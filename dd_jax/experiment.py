"""A whole run, as `python -m experiments.run` does it.

`run` dispatches on the config's `kind` through RUNNERS. The 'distill' kind is
data -> distill -> evaluate -> outputs; its run directory holds config.json, metrics.jsonl,
checkpoint/, distilled.npz, distilled.png, curves.png (metrics.jsonl plotted) and
results.json. A 'pretrain_pool' run (`run_pool`) trains a pool of networks and holds
config.json, pool.npz and results.json.
Every kind writes config.json and results.json (the keys `python -m experiments.report` reads:
experiment, dataset, init_regime, images, test_acc, test_acc_std, eval_nets, distill_seconds,
optionally rows). A poisoning run also writes poisoning.png.
"""
from __future__ import annotations

import importlib
import platform
import subprocess
import time
from pathlib import Path

import flax.linen as nn
import jax

import dd_jax
from dd_jax.checkpoint import checkpoint_meta, has_checkpoint
from dd_jax.data import Dataset, load_dataset
from dd_jax.errors import ConfigError
from dd_jax.evaluation import Evaluator, accuracy_row, evaluate, summarise
from dd_jax.models import as_model, get_model
from dd_jax.outer import CHECKPOINT, METRICS, distill, validate_config
from dd_jax.outputs import (MetricsLog, read_metrics, save_curves, save_distilled,
                            save_image_grid, write_json)
from dd_jax.pretrain import POOL_FILE, save_pool, train_pool, validate_pool_config
from dd_jax.poison import poison_results, save_poison_chart

CONFIG = "config.json"
CURVES = "curves.png"
RESULTS = "results.json"

# config.kind -> "module:function" that runs one experiment of that kind:
# fn(config, workdir, *, name, resume, progress) -> the dict it wrote to results.json.
# A new kind adds one entry; modules are imported on use, so they may import this one.
RUNNERS: dict[str, str] = {
    "distill": "dd_jax.experiment:run_distillation",
    "baselines": "dd_jax.baselines:run_experiment",
    "linear": "dd_jax.linear:run_linear",
    "pretrain_pool": "dd_jax.experiment:run_pool",
}


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


def start_run(config, workdir: Path, name: str, resume: bool = False) -> None:
    """`check_run_dir`, then creates `workdir` and writes the run's config.json; a directory
    that cannot be created or written is a ConfigError."""
    check_run_dir(workdir, resume)
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        write_json(workdir / CONFIG, {"experiment": name, **config.to_dict()})
    except OSError as e:
        raise ConfigError(f"cannot write the output directory {workdir} ({e.strerror or e}); "
                          "choose a writable one with --output_dir=DIR") from None


def load_data_and_model(config) -> tuple[Dataset, nn.Module]:
    """The config's dataset (subset as configured) and its model for that many classes."""
    dataset = load_dataset(config.dataset, config.data_dir or None)
    dataset = dataset.subset(config.train_subset, config.test_subset)
    return dataset, get_model(config.model, dataset.num_classes, config.conv)


def git_state() -> tuple[str | None, bool | None]:
    """(commit, whether tracked files differ from it) of the git checkout that dd_jax is
    imported from; (None, None) outside one or without git."""
    root = Path(dd_jax.__file__).resolve().parent.parent
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
    versions, and the git commit of dd_jax's checkout (null outside one)."""
    commit, dirty = git_state()
    return {"platform": platform.platform(), "devices": [str(d) for d in jax.devices()],
            "jax": jax.__version__, "dd_jax": dd_jax.__version__, "git_commit": commit,
            "git_dirty": dirty}


def run(config, workdir: str | Path, *, name: str = "", resume: bool = False,
        progress: bool = True) -> dict:
    """Runs one experiment of kind `config.kind` into `workdir`; returns what results.json holds."""
    kind = config.get("kind", "distill")
    if kind not in RUNNERS:
        raise ConfigError(f"unknown kind {kind!r}; choose one of: {', '.join(RUNNERS)}")
    module, function = RUNNERS[kind].split(":")
    runner = getattr(importlib.import_module(module), function)
    return runner(config, workdir, name=name, resume=resume, progress=progress)


def run_distillation(config, workdir: str | Path, *, name: str = "", resume: bool = False,
                     progress: bool = True) -> dict:
    """Distils, evaluates and writes every output of a 'distill' run into `workdir`."""
    workdir = Path(workdir)
    validate_config(config)
    dataset, model = load_data_and_model(config)
    check_run_dir(workdir, resume)
    resume = resume and has_checkpoint(workdir / CHECKPOINT)
    writer = jax.process_index() == 0  # in a multi-host run process 0 alone writes the files
    metrics: list[MetricsLog] = []

    def begin(iteration: int) -> None:  # the checkpoint is restored: now files are written
        if writer:
            start_run(config, workdir, name, resume)
            metrics.append(MetricsLog(workdir / METRICS, iteration if resume else None))

    distilled = distill(dataset, model, config, workdir=workdir, resume=resume,
                        progress=progress, log=lambda row: metrics and metrics[0](row),
                        on_start=begin)
    if writer:
        save_distilled(workdir / "distilled.npz", distilled, model=config.model)
        save_image_grid(workdir / "distilled.png", distilled)
        save_curves(workdir / CURVES, read_metrics(workdir / METRICS))

    distill_seconds = checkpoint_meta(workdir / CHECKPOINT)["seconds"]
    t1 = time.perf_counter()
    if config.poison_class >= 0:  # one evaluation gives the attack figures and the accuracies
        poison = poison_results(distilled, dataset, model, config, distill_seconds)
        before, after = poison["rows"]
        acc = {**summarise(after["test_accs"]),
               "untrained": summarise(before["test_accs"])}
    else:
        acc = evaluate(distilled, dataset, model, n_nets=config.n_eval_nets, devices=config.devices)
    results = {
        "experiment": name,
        "dataset": config.dataset,
        "init_regime": config.init_regime,
        "images": int(distilled.labels.size),
        "steps": distilled.steps,
        "epochs": distilled.epochs,
        "test_examples": int(len(dataset.test_y)),
        "test_acc": acc["mean"],
        "test_acc_std": acc["std"],
        "eval_nets": acc["n_nets"],
        "test_accs": acc["accuracies"],
        "untrained_acc": acc["untrained"]["mean"],
        "untrained_acc_std": acc["untrained"]["std"],
        "step_sizes": distilled.step_sizes.tolist(),
        "distill_seconds": distill_seconds,
        "eval_seconds": time.perf_counter() - t1,
        "machine": machine_info(),
    }
    if distilled.selected is not None:
        results["selected"] = distilled.selected
    if distilled.pool is not None:
        results.update(_pretrained_rows(distilled, acc, distill_seconds))
    if config.poison_class >= 0:
        results.update(poison)
    if writer:
        if config.poison_class >= 0:
            save_poison_chart(workdir / "poisoning.png", results)
        write_json(workdir / RESULTS, results)
    return results


def _pretrained_rows(distilled, acc: dict, seconds: float) -> dict:
    """results.json additions of a pretrained-regime run: the pool, and 'before' (the pool's
    networks as they are) / 'after' (trained on the distilled data) rows."""
    return {"pool": distilled.pool, "pool_source": distilled.pool["dataset"],
            "rows": [{**accuracy_row("before", acc["untrained"]), "seconds": 0.0},
                     {**accuracy_row("after", acc), "seconds": seconds}]}


def run_pool(config, workdir: str | Path, *, name: str = "", resume: bool = False,
             progress: bool = True) -> dict:
    """Trains config.pool_size networks on the config's dataset; writes pool.npz (with each
    network's test accuracy) and results.json (their mean +- std) into `workdir`."""
    refuse_resume(config, resume)
    workdir = Path(workdir)
    validate_pool_config(config)
    dataset, model = load_data_and_model(config)
    start_run(config, workdir, name)
    t0 = time.perf_counter()
    params, epoch_losses = train_pool(dataset, model, config, progress=progress)
    jax.block_until_ready(params)
    seconds = time.perf_counter() - t0
    accs = Evaluator(as_model(model).apply, 1, dataset.test_x, dataset.test_y).untrained(params)
    acc = summarise(accs)
    train = {k: config[k] for k in ("pool_optimizer", "pool_lr", "pool_epochs", "pool_batch_size",
                                    "beta1", "beta2", "init_dist", "init_gain", "seed", "train_subset")}
    meta = save_pool(workdir / POOL_FILE, params, {
        "dataset": config.dataset, "model": config.model, "num_classes": dataset.num_classes,
        "image_shape": list(dataset.image_shape), "mean": list(dataset.mean), "std": list(dataset.std),
        "train": train, "train_examples": int(len(dataset.train_y)), "test_examples": int(len(dataset.test_y)),
        "test_accs": acc["accuracies"], "train_seconds": seconds,
    })
    results = {
        "experiment": name, "kind": "pretrain_pool", "dataset": config.dataset, "init_regime": "random",
        "images": int(len(dataset.train_y)), "test_examples": int(len(dataset.test_y)),
        "test_acc": acc["mean"], "test_acc_std": acc["std"], "eval_nets": acc["n_nets"],
        "test_accs": acc["accuracies"], "final_train_loss": float(epoch_losses[-1].mean()),
        "pool_size": meta["pool_size"], "pool_path": str(workdir / POOL_FILE),
        "fingerprint": meta["fingerprint"], "train": train, "distill_seconds": seconds,
        "machine": machine_info(),
    }
    write_json(workdir / RESULTS, results)
    return results
