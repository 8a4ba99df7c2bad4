"""Stage 6 - the outer loop's iteration: the jitted meta-step and what it runs on, built from
(dataset, model, config).

One outer iteration = one real batch, `n_nets` initialisations from the regime, one
`jax.value_and_grad` of `meta_loss`, one optax Adam update - all in a single jitted step.
Every random draw is a pure function of (seed, iteration), so a run resumed from a checkpoint
ends exactly where the uninterrupted run would.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from dd_jax.dataset import BatchOrder, Dataset, split_holdout
from dd_jax.dense_step import fused_gd_step
from dd_jax.evaluation import Evaluator, summarise
from dd_jax.inner import StepFn
from dd_jax.meta import Learned, distilled_labels, init_learned, meta_loss
from dd_jax.models import Model, as_model
from dd_jax.objective import MetaObjective, objective_for
from dd_jax.pretrain import Pool, pool_for_config
from dd_jax.regimes import (
    DATA_STREAM,
    IMAGES_STREAM,
    PRETRAINED_REGIMES,
    VAL_STREAM,
    WINDOW_STREAM,
    InitRegime,
    make_regime,
)
from dd_jax.schedule import make_optimizer, run_length
from dd_jax.selection import BestOnValidation
from dd_jax.sharding import make_mesh, replicate, select_devices, sharded_meta_loss
from dd_jax.unroll import InnerSpec, window_stop
from dd_jax.validation import check_layout, validate_config


@flax.struct.dataclass
class DistillState:
    """The outer loop's whole state: learned data, Adam state, iteration count."""

    learned: Learned
    opt_state: optax.OptState
    iteration: jax.Array


def inner_spec(config) -> InnerSpec | None:
    """The meta-objective's inner loop: None for plain GD through all T steps (`inner_train`),
    else the `InnerSpec` of config.inner_optimizer, inner_momentum and window."""
    if config.inner_optimizer == "gd" and config.window == 0:
        return None
    return InnerSpec(config.inner_optimizer, config.inner_momentum, config.window)


def make_meta_step(
    model: Model, regime: InitRegime, labels: jax.Array, optimizer: optax.GradientTransformation,
    epochs: int, remat: bool, mesh: Mesh | None = None, inner: InnerSpec | None = None,
    window_key: jax.Array | None = None, learn_rates: bool = True, step_fn: StepFn | None = None,
) -> Callable:
    """Jitted (state, train_x, train_y, batch_idx, pool) -> (state, meta-loss); pool is
    regime.pool (an argument, not a compiled-in constant). With a ('nets', 'batch') `mesh`
    (dd_jax.sharding), the meta-loss and its gradient are split over it.

    inner: the inner loop (`meta_loss`; None = plain GD); with inner.window > 0 each iteration
    stops its unroll at `unroll.window_stop(window_key, iteration, ...)`. learn_rates False
    zeroes the step sizes' gradient, so Adam leaves them exactly as they are. step_fn: plain
    GD's inner step where it is not the model differentiated (`meta_loss`).
    """
    loss_fn = meta_loss if mesh is None else sharded_meta_loss(mesh)
    total = labels.shape[0] * epochs

    def step(state: DistillState, train_x, train_y, batch_idx, pool):
        init_params = regime.train_inits(state.iteration, pool)
        unroll = {} if inner is None else {"inner": inner}
        if inner is not None and inner.window:
            unroll["stop"] = window_stop(window_key, state.iteration, inner.window, total)
        loss, grads = jax.value_and_grad(loss_fn)(
            state.learned, labels, init_params, train_x[batch_idx], train_y[batch_idx],
            apply_fn=model.apply, epochs=epochs, remat=remat, step_fn=step_fn, **unroll,
        )
        if not learn_rates:
            grads = grads.replace(raw_step_sizes=jnp.zeros_like(grads.raw_step_sizes))
        updates, opt_state = optimizer.update(grads, state.opt_state, state.learned)
        learned = optax.apply_updates(state.learned, updates)
        return DistillState(learned, opt_state, state.iteration + 1), loss

    return jax.jit(step, donate_argnums=0)


@dataclasses.dataclass
class OuterLoop:
    """Everything one run's outer loop needs, built from (dataset, model, config).

    train_y holds the meta-objective's targets: the real labels, poisoned if configured. With
    config.val_size, (val_x, val_y) are that many training images held out of train_x: the
    meta-objective never sees them, `BestOnValidation` chooses the reported iterate with them.
    labels (S, n) are the hard labels (with learned labels: their initial classes); inner the
    meta-objective's inner loop (None: plain GD), step_fn its steps where they are not the
    model differentiated (`dense_step.fused_gd_step`).
    """

    model: Model
    regime: InitRegime
    labels: jax.Array
    batches: BatchOrder
    total: int
    state: DistillState
    meta_step: Callable
    train_x: jax.Array
    train_y: jax.Array
    epochs: int
    pool: Pool | None = None
    mesh: Mesh | None = None
    val_x: np.ndarray | None = None
    val_y: np.ndarray | None = None
    inner: InnerSpec | None = None
    step_fn: StepFn | None = None

    def step_args(self, state: DistillState, iteration: int) -> tuple:
        """`meta_step`'s arguments for one outer iteration on the real batch `iteration` draws."""
        idx = jnp.asarray(self.batches(iteration))
        return state, self.train_x, self.train_y, idx, self.regime.pool

    def step(self, state: DistillState, iteration: int) -> tuple[DistillState, jax.Array]:
        """One outer iteration on the real batch that `iteration` draws."""
        return self.meta_step(*self.step_args(state, iteration))

    def compiled_step(self, state: DistillState | None = None) -> jax.stages.Compiled:
        """The meta-step as XLA compiles it (for its cost, memory and HLO text), from `state`
        (default the initial one) on iteration 0's real batch."""
        return self.meta_step.lower(*self.step_args(
            self.state if state is None else state, 0)).compile()

    def accuracy_on(self, x: np.ndarray, y: np.ndarray, n_nets: int) -> Callable[[Learned], dict]:
        """learned -> `summarise`d accuracy on (x (N, H, W, C), y (N,)) of networks trained on
        it from the regime's evaluation inits: theta_0 in the fixed regimes, else `n_nets`
        held-out ones, by all T steps of the inner optimiser. Compiled once, on the
        meta-step's devices."""
        evaluator = Evaluator(self.model.apply, self.epochs, x, y,
                              devices=None if self.mesh is None else self.mesh.devices.ravel().tolist(),
                              inner=self.inner)
        inits = self.regime.eval_inits(1 if self.regime.fixed_params is not None else n_nets)
        return lambda learned: summarise(evaluator(
            inits, learned.images, self.labels if learned.labels is None else learned.labels,
            learned.step_sizes))

    def best_on_validation(self, n_nets: int, path: Path | None = None) -> BestOnValidation | None:
        """The `BestOnValidation` of this run's holdout (None without one), scoring with
        `accuracy_on` it; with `path`, kept in that file."""
        if self.val_x is None:
            return None
        return BestOnValidation(self.accuracy_on(self.val_x, self.val_y, n_nets), len(self.val_y), path)


def build_outer_loop(dataset: Dataset, model_fn, config,
                     objective: MetaObjective | None = None) -> OuterLoop:
    """Validates `config` and builds the regime, initial state and jitted meta-step for
    `objective` (default `objective.objective_for(config)`); with config.devices != 1, the
    state and training data replicated on the meta-step's mesh."""
    validate_config(config)
    objective = objective_for(config) if objective is None else objective
    objective.check(dataset)
    model = as_model(model_fn)
    key = jax.random.PRNGKey(config.seed)
    train_x, train_y = dataset.train_x, objective.targets(dataset.train_y)
    val_x = val_y = None
    if config.val_size:
        split = split_holdout(jax.random.fold_in(key, VAL_STREAM), train_x, train_y,
                              config.val_size, "val_size")
        train_x, train_y, val_x, val_y = split.learn_x, split.learn_y, split.holdout_x, split.holdout_y
    train_x, train_y = jnp.asarray(train_x), jnp.asarray(train_y)
    pool = pool_for_config(config, model, dataset) if config.init_regime in PRETRAINED_REGIMES else None
    regime = make_regime(
        config.init_regime, key, model, train_x[:1], n_nets=config.n_nets,
        dist=config.init_dist, gain=config.init_gain, pool=None if pool is None else pool.params,
        pool_eval_nets=config.pool_eval_nets,
    )
    check_layout(config, dataset.num_classes)
    labels = distilled_labels(config.steps, config.images_per_class, dataset.num_classes,
                              config.images_per_step)
    learned = init_learned(
        jax.random.fold_in(key, IMAGES_STREAM), labels, dataset.image_shape, config.epochs,
        config.inner_lr or config.step_size_init,
        dataset.num_classes if config.learn_labels else 0, config.image_init_scale,
    )
    batches = BatchOrder(jax.random.fold_in(key, DATA_STREAM), len(train_y), config.real_batch_size)
    optimizer = make_optimizer(config, batches.per_pass)
    state = DistillState(learned, optimizer.init(learned), jnp.zeros((), jnp.int32))
    devices = select_devices(config.devices)
    mesh = make_mesh(devices, config.n_nets, batches.batch_size) if len(devices) > 1 else None
    if mesh is not None:
        state, train_x, train_y = replicate((state, train_x, train_y), mesh)
        if regime.pool is not None:
            regime = dataclasses.replace(regime, pool=replicate(regime.pool, mesh))
    inner = inner_spec(config)
    step_fn = fused_gd_step(model_fn) if inner is None else None
    return OuterLoop(
        model=model, regime=regime, labels=labels, batches=batches,
        total=run_length(config, batches.per_pass), state=state,
        meta_step=make_meta_step(model, regime, labels, optimizer, config.epochs, config.remat,
                                 mesh, inner, jax.random.fold_in(key, WINDOW_STREAM),
                                 learn_rates=not config.inner_lr, step_fn=step_fn),
        train_x=train_x, train_y=train_y, pool=pool, mesh=mesh, epochs=config.epochs,
        val_x=val_x, val_y=val_y, inner=inner, step_fn=step_fn,
    )
