"""Stage 6 - the outer loop: optimise the distilled data against the meta-objective, one
`outer_step.OuterLoop` iteration after the other, with checkpoints, evaluations and logs.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable

import jax
import numpy as np

from dd_jax.checkpoint import has_checkpoint, restore_checkpoint, save_checkpoint
from dd_jax.config import with_overrides
from dd_jax.dataset import Dataset
from dd_jax.distilled import DistilledData
from dd_jax.errors import DivergedError
from dd_jax.interrupts import stop_requests
from dd_jax.objective import MetaObjective
from dd_jax.outer_step import build_outer_loop
from dd_jax.pretrain import pool_record

CHECKPOINT = "checkpoint"  # dd_jax.checkpoint directories
BEST_CHECKPOINT = "best_checkpoint"  # with val_size: the iterate best on the holdout
METRICS = "metrics.jsonl"


def distill(
    dataset: Dataset, model_fn, config=None, *, workdir: str | Path | None = None,
    resume: bool = False, progress: bool = True, log: Callable[[dict], None] | None = None,
    on_start: Callable[[int], None] | None = None, objective: MetaObjective | None = None,
    **overrides,
) -> DistilledData:
    """Learns distilled images and step sizes for `dataset` and `model_fn` (see models.as_model).

    config: a ConfigDict (default `dd_jax.config.default_config()`); keyword `overrides` replace
    its fields, e.g. ``distill(ds, LeNet(), steps=10, passes=20)``. With `workdir`, checkpoints
    go there every `checkpoint_every` iterations and ``resume=True`` continues from the last one;
    in a single-process run called from the main thread, SIGTERM (``kill PID``, a scheduler's
    preemption) or Ctrl-C (where Python's own SIGINT handler is installed) lets the iteration
    in flight finish, checkpoints it and raises KeyboardInterrupt (a second one interrupts at
    once; one during the last iteration lets the run finish).
    `log` receives one dict per logged iteration (loss, step sizes, seconds, test accuracy).
    `on_start` is called with the first iteration to run once the state is built and any
    checkpoint restored: a caller that writes its files there leaves them untouched when the
    checkpoint cannot be resumed. `objective` is what the data is optimised for (an
    `objective.MetaObjective`; default: the one the config names, `objective.objective_for`).
    With config.val_size > 0 the returned data is the evaluated iterate (every `eval_every`
    iterations and the last) with the best accuracy on that many held-out training images
    (`BestOnValidation`; its `selected` says which); otherwise it is the last iterate.
    """
    config = with_overrides(config, overrides)
    loop = build_outer_loop(dataset, model_fn, config, objective)
    labels, total, state = loop.labels, loop.total, loop.state
    test_accuracy = loop.accuracy_on(dataset.test_x, dataset.test_y, config.n_eval_nets_during)
    best = loop.best_on_validation(config.n_eval_nets_during,
                                   Path(workdir) / BEST_CHECKPOINT if workdir is not None else None)
    if best is not None and resume:
        best.restore(state.learned)

    ckpt = Path(workdir) / CHECKPOINT if workdir is not None else None
    elapsed = 0.0
    if resume and ckpt is not None and has_checkpoint(ckpt):
        state, meta = restore_checkpoint(ckpt, state)
        elapsed = meta["seconds"]
    start_it = int(state.iteration)
    if on_start is not None:
        on_start(start_it)

    graceful = ckpt is not None and jax.process_count() == 1
    with _progress(total, start_it, progress) as bar, stop_requests(graceful) as stop:
        postfix: dict[str, str] = {}
        last_saved = start_it
        t0 = time.perf_counter() - elapsed
        for it in range(start_it, total):
            state, loss = loop.step(state, it)
            loss = float(loss)
            if not math.isfinite(loss):
                raise DivergedError(
                    f"meta-loss became {loss} at iteration {it + 1}; "
                    + (f"the last checkpoint (iteration {last_saved}) is kept. "
                       if ckpt is not None and has_checkpoint(ckpt) else "no checkpoint had been saved. ")
                    + f"Lower --outer_lr (now {config.outer_lr}) or --step_size_init "
                    f"(now {config.step_size_init}) and start again."
                )
            done = it + 1
            row = None
            if done % config.log_every == 0 or done == total:
                row = {"iteration": done, "pass": done / loop.batches.per_pass, "meta_loss": loss,
                       "seconds": time.perf_counter() - t0,
                       "step_sizes": np.asarray(state.learned.step_sizes).round(6).tolist()}
            if done % config.eval_every == 0 or done == total:
                acc = test_accuracy(state.learned)
                row = {**(row or {"iteration": done, "meta_loss": loss}),
                       "test_acc": acc["mean"], "test_acc_std": acc["std"], "eval_nets": acc["n_nets"]}
                if best is not None:
                    row["val_acc"] = best.update(state.learned, done)
                row["seconds"] = time.perf_counter() - t0
                postfix["acc"] = f"{acc['mean']:.4f}"
            if row is not None and log is not None:
                log(row)
            stopping = stop.is_set() and done < total  # read once: a later request waits
            if ckpt is not None and (done % config.checkpoint_every == 0 or done == total or stopping):
                save_checkpoint(ckpt, state, {"iteration": done, "seconds": time.perf_counter() - t0},
                                keep=config.keep_checkpoints)
                last_saved = done
            if done % 10 == 0 or done == total:
                postfix["loss"] = f"{loss:.3f}"
                bar.set_postfix(postfix, refresh=False)
            bar.update(1)
            if stopping:
                raise KeyboardInterrupt
    learned = state.learned if best is None else best.learned
    soft = None if learned.labels is None else np.asarray(learned.labels)
    return DistilledData(
        images=np.asarray(learned.images),
        labels=np.asarray(labels) if soft is None else soft.argmax(-1).astype(np.int32),
        step_sizes=np.asarray(learned.step_sizes), epochs=config.epochs,
        mean=tuple(dataset.mean), std=tuple(dataset.std), init_regime=config.init_regime,
        init_dist=config.init_dist, init_gain=config.init_gain, seed=config.seed,
        init_params=None if loop.regime.fixed_params is None
        else jax.tree.map(np.asarray, loop.regime.fixed_params),
        pool=None if loop.pool is None else pool_record(
            loop.pool, config.pool_eval_nets if config.init_regime == "random_pretrained" else 0),
        selected=None if best is None else best.selected,
        soft_labels=soft, inner_optimizer=config.inner_optimizer,
        inner_momentum=config.inner_momentum,
    )


def _progress(total: int, start: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, disable=not enabled, unit="it", dynamic_ncols=True,
                desc="distill")
