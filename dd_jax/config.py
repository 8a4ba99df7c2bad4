"""The configuration of a run: every field, with the authors' defaults and its meaning.

`SECTIONS` declares each field once, as `Field(name, default, meaning)`: `default_config()` is
built from it, and `python -m experiments.run --help` prints it. `default_config()` is what
`dd_jax.distill` uses when given no config; the named experiments in experiments/configs.py start
from it, and every field is a command-line flag.
"""
from __future__ import annotations

from typing import Iterable, NamedTuple

import ml_collections

from dd_jax.errors import ConfigError, did_you_mean


class Field(NamedTuple):
    """One config field: its name, default value and one-line meaning."""

    name: str
    default: bool | int | float | str
    doc: str


Sections = dict[str, tuple[Field, ...]]

SECTIONS: Sections = {
    "data and model": (
        Field("dataset", "mnist", "'mnist', 'digits', 'usps', 'svhn' or a prepared tensorflow-datasets name (see experiments.prepare_data)"),
        Field("data_dir", "", "where prepared datasets are ('' = tfds default; usps: ./data/usps)"),
        Field("train_subset", 0, "use the first N training images (0 = all)"),
        Field("test_subset", 0, "evaluate on the first N test images (0 = the full test set)"),
        Field("model", "lenet", "'lenet' (28x28 inputs) or 'alexcifarnet' (32x32x3 inputs)"),
        Field("conv", "native", "'native' (C++ kernels on CPU, elsewhere as toeplitz), 'toeplitz' or 'xla': the same function (conv.CONVS)"),
    ),
    "initialisation regime": (
        Field("init_regime", "fixed", "fixed, random, fixed_pretrained or random_pretrained (dd_jax/regimes.py)"),
        Field("init_dist", "xavier_normal", "weight distribution of theta_0: see dd_jax.INIT_DISTRIBUTIONS, or 'model' (the model's own)"),
        Field("init_gain", 1.0, "gain of init_dist"),
    ),
    "distilled data and inner loop": (
        Field("steps", 1, "S, distilled batches"),
        Field("epochs", 3, "E, passes over the S batches: T = S x E inner steps"),
        Field("images_per_class", 1, "images of each class in each distilled batch"),
        Field("step_size_init", 0.02, "initial learned step size eta of every inner step (eta = softplus(raw))"),
        Field("image_init_scale", 1.0, "distilled images start as N(0, image_init_scale^2) in normalised pixel space"),
        Field("remat", False, "recompute the inner steps in the backward pass (sqrt(T) blocks): memory about flat in T, more time"),
        Field("learn_labels", False, "learn a label vector per distilled image too (one-hot init, soft-target cross-entropy)"),
        Field("images_per_step", 0, "images per distilled step (0 = images_per_class x classes); with hard labels a multiple of the classes, with learn_labels any number (classes in turn)"),
        Field("inner_optimizer", "gd", "'gd', 'momentum' or 'adam': the inner loop's optimiser (dd_jax.unroll)"),
        Field("inner_momentum", 0.9, "momentum's coefficient, Adam's beta1"),
        Field("inner_lr", 0.0, "> 0: one fixed inner step size for every step, not learned"),
        Field("window", 0, "> 0: backpropagate through a window of this many steps at a random position (the unroll stops at the window's end; dd_jax.unroll); 0 = all T steps"),
    ),
    "outer loop": (
        Field("n_nets", 1, "initialisations per outer iteration (vmapped)"),
        Field("real_batch_size", 1024, "real images in each meta-loss"),
        Field("passes", 400, "passes over the real training set"),
        Field("iterations", 0, "if > 0, the number of outer iterations, overriding passes"),
        Field("outer_lr", 0.01, "Adam learning rate of the distilled images and step sizes"),
        Field("beta1", 0.5, "Adam beta1"),
        Field("beta2", 0.999, "Adam beta2"),
        Field("decay_passes", 40, "lr_schedule 'step': outer_lr x decay_factor every this many passes"),
        Field("decay_factor", 0.5, "lr_schedule 'step': the decay's factor"),
        Field("grad_clip_ema", 0.0, "> 0: clip the images' meta-gradient norm to 2x a moving average of its norms with this decay (Feng et al.: 0.9); 0 = no clipping"),
        Field("nonneg_labels", False, "with learn_labels: keep the learned labels >= 0 (projected after each outer step, Feng et al.)"),
        Field("simplex_labels", False, "with learn_labels: keep each learned label vector on the probability simplex (>= 0, summing to 1; projected after each outer step), so that its mass cannot grow into a larger inner step"),
        Field("lr_schedule", "step", "'step' (the authors': decay_passes, decay_factor) or 'cosine'"),
        Field("warmup_iterations", 0, "cosine: linear warm-up from 0 to outer_lr over this many iterations"),
        Field("seed", 0, "everything random derives from it: same seed, same result"),
    ),
    "data poisoning (dd_jax.poison): the meta-objective's real labels K -> T": (
        Field("poison_class", -1, "K: the attacked class (-1 = off, plain distillation)"),
        Field("poison_target", -1, "T: the class that K is to be predicted as"),
    ),
    "evaluation, logging, checkpoints": (
        Field("n_eval_nets", 20, "held-out initialisations for the final random-regime evaluation"),
        Field("n_eval_nets_during", 4, "held-out initialisations for the periodic evaluation while training"),
        Field("val_size", 0, "training images held out (never trained on) to return the evaluated iterate best on them (0 = the last iterate, as the authors report)"),
        Field("eval_every", 500, "iterations between periodic test evaluations"),
        Field("log_every", 10, "iterations between rows of metrics.jsonl"),
        Field("tensorboard", False, "also write metrics.jsonl's rows as TensorBoard scalars to <output_dir>/tensorboard (needs tensorboardX: pip install -e '.[tensorboard]')"),
        Field("checkpoint_every", 200, "iterations between checkpoints"),
        Field("keep_checkpoints", 1, "checkpoints kept in <output_dir>/checkpoint (the newest; --resume continues from the newest)"),
        Field("output_dir", "", "where the run writes ('' = runs/<experiment name>)"),
        Field("kind", "distill", "what a run does: a key of dd_jax.experiment.RUNNERS ('distill', 'baselines', ...)"),
    ),
    "baselines (dd_jax/baselines.py): real-image sets with the distilled data's layout": (
        Field("baselines", "random_real,optimised_real,kmeans,mean", "comma-separated, in table order"),
        Field("optimised_candidates", 20, "optimised_real: best of this many random real sets"),
        Field("step_size_grid", "0.01,0.02,0.03,0.05,0.07,0.1,0.15,0.2,0.3,0.5,1.0", "fixed step sizes searched"),
        Field("score_holdout", 2000, "training images held out to score sets and step sizes"),
        Field("knn_k", 1, "neighbours in the k-NN classification with each set"),
        Field("distilled", "", "a distilled.npz to add to the baselines' table (k-NN and test accuracy)"),
    ),
    "pretrained networks: pool training and the pretrained init regimes": (
        Field("pool_path", "", "pool.npz of fixed_/random_pretrained ('' = runs/<pool_source>_pool/pool.npz)"),
        Field("pool_source", "", "dataset the pool must have been trained on ('' = any)"),
        Field("pool_eval_nets", 10, "random_pretrained: last pool members held out for evaluation only"),
        Field("pool_size", 20, "pretrain_pool: networks to train"),
        Field("pool_epochs", 1, "pretrain_pool: passes over the training set"),
        Field("pool_batch_size", 64, "pretrain_pool: minibatch size"),
        Field("pool_optimizer", "adam", "'adam' (beta1, beta2 above) or 'sgd' (plain), constant step size"),
        Field("pool_lr", 1e-3, "pretrain_pool: the step size"),
    ),
    "scale-out (dd_jax.sharding): devices that split the initialisations and the real batch": (
        Field("devices", 1, "devices to use (0 = all available; on several hosts: all hosts' devices)"),
    ),
}


def config_from(sections: Sections) -> ml_collections.ConfigDict:
    """A flat ConfigDict holding every field of `sections` at its default."""
    c = ml_collections.ConfigDict()
    for fields in sections.values():
        for field in fields:
            c[field.name] = field.default
    return c


def default_config() -> ml_collections.ConfigDict:
    """The authors' defaults (MNIST, LeNet, fixed init, S=1 step x E=3 epochs, 1 image/class)."""
    return config_from(SECTIONS)


def check_known(config, names: Iterable[str], as_flags: bool = False) -> None:
    """Raises ConfigError for the first of `names` that is not a field of `config`, naming the
    near matches and the valid fields (as --flags with `as_flags`)."""
    dash = "--" if as_flags else ""
    for name in names:
        if name not in config:
            hint = did_you_mean(name, config.keys(), dash)
            raise ConfigError(f"unknown {'flag' if as_flags else 'config field'} {dash}{name}{hint}; "
                              f"valid: {', '.join(dash + k for k in config.keys())}")


def with_overrides(config, overrides: dict) -> ml_collections.ConfigDict:
    """A copy of `config` (default_config() if None) with the typed `overrides` set."""
    config = default_config() if config is None else config.copy_and_resolve_references()
    check_known(config, overrides)
    config.update(overrides)
    return config


def require(config, *, at_least_one: Iterable[str] = (), positive: Iterable[str] = (),
            non_negative: Iterable[str] = ()) -> None:
    """Raises ConfigError naming the first field out of its range: `at_least_one` (counts),
    `positive` (> 0) or `non_negative` (>= 0)."""
    for names, ok, want in ((at_least_one, lambda v: v >= 1, ">= 1"),
                            (positive, lambda v: v > 0, "> 0"),
                            (non_negative, lambda v: v >= 0, ">= 0")):
        for name in names:
            if not ok(config[name]):
                raise ConfigError(f"{name} must be {want}, got {config[name]}")
