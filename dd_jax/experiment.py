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

import contextlib
import time
from pathlib import Path
from typing import Callable

import jax

from dd_jax.baseline_run import run_baselines
from dd_jax.checkpoint import checkpoint_meta, has_checkpoint
from dd_jax.distilled import save_distilled
from dd_jax.errors import ConfigError
from dd_jax.evaluation import Evaluator, accuracy_row, evaluate, summarise
from dd_jax.linear import run_linear
from dd_jax.models import as_model
from dd_jax.outer import CHECKPOINT, METRICS, distill
from dd_jax.outputs import (
    MetricsLog,
    TensorBoardLog,
    read_metrics,
    save_curves,
    save_image_grid,
    save_poison_chart,
    write_json,
)
from dd_jax.poison import poison_results
from dd_jax.pretrain import POOL_FILE, save_pool, train_pool, validate_pool_config
from dd_jax.runs import RESULTS, check_run_dir, load_data_and_model, machine_info, refuse_resume, start_run
from dd_jax.validation import validate_config

CURVES = "curves.png"
TENSORBOARD = "tensorboard"  # with config.tensorboard: the event files of the metrics


def run(config, workdir: str | Path, *, name: str = "", resume: bool = False,
        progress: bool = True) -> dict:
    """Runs one experiment of kind `config.kind` into `workdir`; returns what results.json holds."""
    kind = config.get("kind", "distill")
    if kind not in RUNNERS:
        raise ConfigError(f"unknown kind {kind!r}; choose one of: {', '.join(RUNNERS)}")
    if kind != "distill" and jax.process_count() > 1:  # only a distillation splits over hosts
        raise ConfigError(f"a {kind!r} run runs on one process, this is process "
                          f"{jax.process_index()} of {jax.process_count()}; run it without --distributed")
    return RUNNERS[kind](config, workdir, name=name, resume=resume, progress=progress)


def run_distillation(config, workdir: str | Path, *, name: str = "", resume: bool = False,
                     progress: bool = True) -> dict:
    """Distils, evaluates and writes every output of a 'distill' run into `workdir`."""
    workdir = Path(workdir)
    validate_config(config)
    dataset, model = load_data_and_model(config)
    check_run_dir(workdir, resume)
    resume = resume and has_checkpoint(workdir / CHECKPOINT)
    writer = jax.process_index() == 0  # in a multi-host run process 0 alone writes the files
    logs: list[Callable[[dict], None]] = []
    started: dict = {}  # process 0's machine_info() as the run starts (`start_run`)

    def log(row: dict) -> None:
        for write in logs:
            write(row)

    with contextlib.ExitStack() as open_logs:  # closed when distill ends, interrupted too

        def begin(iteration: int) -> None:  # the checkpoint is restored: now files are written
            if writer:
                started.update(start_run(config, workdir, name, resume))
                logs.append(MetricsLog(workdir / METRICS, iteration if resume else None))
                if config.tensorboard:
                    board = TensorBoardLog(workdir / TENSORBOARD, iteration if resume else None)
                    open_logs.callback(board.close)
                    logs.append(board)

        distilled = distill(dataset, model, config, workdir=workdir, resume=resume,
                            progress=progress, log=log, on_start=begin)
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
        "machine": started or machine_info(),
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
    machine = start_run(config, workdir, name)
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
        "machine": machine,
    }
    write_json(workdir / RESULTS, results)
    return results


# config.kind -> the function that runs one experiment of that kind:
# fn(config, workdir, *, name, resume, progress) -> the dict it wrote to results.json.
RUNNERS: dict[str, Callable[..., dict]] = {
    "distill": run_distillation,
    "baselines": run_baselines,
    "linear": run_linear,
    "pretrain_pool": run_pool,
}
