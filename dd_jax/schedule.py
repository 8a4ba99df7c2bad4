"""The outer optimiser: Adam on the distilled data with the run's learning-rate schedule, and
the run's length in outer iterations."""
from __future__ import annotations

import optax

from dd_jax.errors import ConfigError

LR_SCHEDULES = ("step", "cosine")  # the outer learning rate's schedules (make_optimizer)


def run_length(config, iters_per_pass: int) -> int:
    """Outer iterations of the run: config.iterations, or passes x iterations per pass."""
    return config.iterations or config.passes * iters_per_pass


def check_lr_schedule(config) -> None:
    """Raises ConfigError for an unknown lr_schedule or a negative warmup_iterations."""
    if config.lr_schedule not in LR_SCHEDULES:
        raise ConfigError(f"unknown lr_schedule {config.lr_schedule!r}; choose one of: {', '.join(LR_SCHEDULES)}")
    if config.warmup_iterations < 0:
        raise ConfigError(f"warmup_iterations must be >= 0, got {config.warmup_iterations}")


def make_optimizer(config, iters_per_pass: int) -> optax.GradientTransformation:
    """Adam(outer_lr, b1, b2) with the config's learning-rate schedule: ``step`` (the authors':
    x decay_factor every decay_passes passes) or ``cosine`` (linear warm-up over
    warmup_iterations, then a cosine decay to 0 at the run's last iteration)."""
    if config.lr_schedule == "step":
        schedule = optax.exponential_decay(
            config.outer_lr, transition_steps=max(1, config.decay_passes * iters_per_pass),
            decay_rate=config.decay_factor, staircase=True,
        )
    else:  # cosine
        total = run_length(config, iters_per_pass)
        if config.warmup_iterations >= total:
            raise ConfigError(f"warmup_iterations ({config.warmup_iterations}) must be shorter "
                              f"than the run ({total} iterations)")
        schedule = optax.warmup_cosine_decay_schedule(
            0.0, config.outer_lr, warmup_steps=config.warmup_iterations, decay_steps=total)
    return optax.adam(schedule, b1=config.beta1, b2=config.beta2)
