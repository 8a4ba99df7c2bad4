"""A distillation config checked before anything is built: each impossible value is one
ConfigError naming it and what would work."""
from __future__ import annotations

from dd_jax.config import require
from dd_jax.errors import ConfigError
from dd_jax.pretrain import pool_path
from dd_jax.regimes import PRETRAINED_REGIMES, check_regime
from dd_jax.schedule import check_clipping, check_lr_schedule
from dd_jax.sharding import select_devices
from dd_jax.unroll import INNER_OPTIMIZERS


def validate_config(config) -> None:
    """Raises ConfigError naming the first impossible value and what would work."""
    require(config, at_least_one=("steps", "epochs", "images_per_class", "n_nets", "real_batch_size",
                                  "passes", "n_eval_nets", "checkpoint_every", "eval_every",
                                  "log_every", "keep_checkpoints"),
            positive=("outer_lr", "step_size_init", "image_init_scale", "decay_factor", "init_gain"))
    select_devices(config.devices)  # raises unless that many devices are available
    check_lr_schedule(config)
    check_clipping(config)
    if config.val_size < 0:
        raise ConfigError(f"val_size must be >= 0 (0: no validation holdout), got {config.val_size}")
    if config.iterations < 0:
        raise ConfigError(f"iterations must be >= 0 (0: passes x batches per pass), got {config.iterations}")
    check_regime(config.init_regime, config.n_nets, config.init_dist)
    check_unroll(config)
    if config.init_regime == "random_pretrained":
        for name in ("n_eval_nets", "n_eval_nets_during"):
            if getattr(config, name) > config.pool_eval_nets:
                raise ConfigError(
                    f"{name}={getattr(config, name)} but only pool_eval_nets={config.pool_eval_nets} "
                    f"pool members are held out for evaluation; set --{name} <= --pool_eval_nets"
                )
    if config.init_regime in PRETRAINED_REGIMES:
        pool_path(config)  # raises if the run names no pool


def check_unroll(config) -> None:
    """Raises ConfigError for an impossible inner optimiser, inner_momentum, inner_lr, window
    or images_per_step (its fit to the dataset's classes: `check_layout`)."""
    if config.inner_optimizer not in INNER_OPTIMIZERS:
        raise ConfigError(f"unknown inner_optimizer {config.inner_optimizer!r}; choose one of: "
                          f"{', '.join(INNER_OPTIMIZERS)}")
    if not 0 <= config.inner_momentum < 1:
        raise ConfigError(f"inner_momentum must be in [0, 1), got {config.inner_momentum}")
    if config.inner_lr < 0:
        raise ConfigError(f"inner_lr must be >= 0 (0: learned step sizes), got {config.inner_lr}")
    total = config.steps * config.epochs
    if not 0 <= config.window <= total:
        raise ConfigError(f"window={config.window} must be between 0 (all steps) and the "
                          f"T = steps x epochs = {total} inner steps; lower --window or raise --epochs")
    if config.images_per_step < 0:
        raise ConfigError(f"images_per_step must be >= 0 (0: images_per_class x classes), got "
                          f"{config.images_per_step}")


def check_layout(config, num_classes: int) -> None:
    """Raises ConfigError if hard labels cannot give every class the same number of the
    images_per_step images of a step."""
    if config.images_per_step % num_classes and not config.learn_labels:
        raise ConfigError(
            f"images_per_step={config.images_per_step} is not a multiple of the {num_classes} "
            f"classes, so hard labels cannot cover them evenly; use a multiple of {num_classes} "
            "or --learn_labels=true")
