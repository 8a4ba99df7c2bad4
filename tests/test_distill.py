"""A short real distillation run: it must beat both its start and random real images."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dd_jax
from dd_jax.evaluation import Evaluator
from dd_jax.models import LeNet, as_model
from dd_jax.config import default_config
from dd_jax.outer import make_optimizer

ITERATIONS = 300
STEP_SIZE_GRID = (0.01, 0.03, 0.1, 0.3, 1.0)


def small_config(**overrides):
    """default_config() (the paper's MNIST fixed-init setting: S=1, E=3, 1 image/class) made short.
    real_batch_size=64 and outer_lr=0.01 are also what tests/test_cli.py uses, so the compiled
    meta-step is shared through the compilation cache."""
    c = default_config()
    c.update(dict(dataset="digits", iterations=ITERATIONS, real_batch_size=64, outer_lr=0.01,
                  eval_every=10**6, log_every=10, checkpoint_every=10**6))
    c.update(overrides)
    return c


@pytest.fixture(scope="module")
def run(digits28):
    rows = []
    config = small_config()
    distilled = dd_jax.distill(digits28, LeNet(), config, progress=False, log=rows.append)
    return config, distilled, rows


def test_distilled_data_layout(run, digits28):
    config, d, rows = run
    assert isinstance(d, dd_jax.DistilledData)
    assert d.images.shape == (1, 10, 28, 28, 1) and d.images.dtype == np.float32
    np.testing.assert_array_equal(d.labels, np.arange(10)[None])
    assert d.step_sizes.shape == (3,) and np.all(d.step_sizes > 0)
    assert d.steps == 1 and d.epochs == 3 and d.seed == 0
    assert d.init_regime == "fixed" and d.init_dist == "xavier_normal"
    assert d.mean == digits28.mean and d.std == digits28.std
    assert np.all(np.isfinite(d.images))
    # learned, not the initial values
    assert not np.allclose(d.step_sizes, config.step_size_init, rtol=1e-3)
    # theta_0 is the regime's fixed init for this seed
    model = as_model(LeNet())
    regime = dd_jax.make_regime("fixed", jax.random.PRNGKey(0), model, jnp.asarray(digits28.train_x[:1]))
    for a, b in zip(jax.tree.leaves(d.init_params), jax.tree.leaves(regime.fixed_params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_log_rows_and_meta_loss_decreases(run):
    _, _, rows = run
    assert [r["iteration"] for r in rows] == list(range(10, ITERATIONS + 1, 10))
    for r in rows:
        assert np.isfinite(r["meta_loss"]) and len(r["step_sizes"]) == 3 and r["seconds"] > 0
    first = np.mean([r["meta_loss"] for r in rows[:3]])
    last = np.mean([r["meta_loss"] for r in rows[-3:]])
    assert last < first - 0.3, (first, last)
    # (the final row also holds the evaluation done at the last iteration)
    assert 0 <= rows[-1]["test_acc"] <= 1 and rows[-1]["eval_nets"] == 1


def test_distilled_beats_untrained_and_random_real_images(run, digits28):
    _, d, _ = run
    result = dd_jax.evaluate(d, digits28, LeNet())
    acc, untrained = result["mean"], result["untrained"]["mean"]
    assert result["n_nets"] == 1 and result["untrained"]["n_nets"] == 1
    assert acc > untrained + 0.2, (acc, untrained)

    # baseline: random real images, one per class per step, trained with the same T steps from
    # the same theta_0, at the best of a grid of fixed step sizes (and the best of 3 draws)
    model = as_model(LeNet())
    evaluator = Evaluator(model.apply, d.epochs, digits28.test_x, digits28.test_y)
    init = jax.tree.map(lambda a: jnp.asarray(a)[None], d.init_params)
    labels = jnp.asarray(d.labels)
    baseline = {}
    for draw in range(3):
        key = jax.random.fold_in(jax.random.PRNGKey(1234), draw)
        idx = []
        for k in range(10):
            candidates = np.flatnonzero(digits28.train_y == k)
            idx.append(candidates[int(jax.random.randint(jax.random.fold_in(key, k), (), 0, len(candidates)))])
        images = jnp.asarray(digits28.train_x[np.array(idx)])[None]  # (S=1, 10, 28, 28, 1)
        assert np.array_equal(digits28.train_y[np.array(idx)], np.asarray(labels[0]))
        for eta in STEP_SIZE_GRID:
            steps = jnp.full((d.steps * d.epochs,), eta, jnp.float32)
            baseline[(draw, eta)] = float(evaluator(init, images, labels, steps)[0])
    best = max(baseline.values())
    assert acc > best + 0.1, (acc, baseline)

    # evaluate() with explicit init_params gives the same answer
    again = dd_jax.evaluate(d, digits28, LeNet(), init_params=init)
    assert again["mean"] == acc


@pytest.mark.parametrize("schedule, overrides, expected", [
    # the authors': x0.5 every decay_passes passes (here 2 passes of 3 iterations)
    ("step", dict(decay_passes=2), lambda t: 0.01 * 0.5 ** (t // 6)),
    # linear warm-up over 4 iterations, then a cosine to 0 at iteration 20
    ("cosine", dict(warmup_iterations=4),
     lambda t: 0.01 * t / 4 if t < 4 else 0.005 * (1 + np.cos(np.pi * (t - 4) / 16))),
])
def test_outer_learning_rate_schedule(schedule, overrides, expected):
    """Adam's update on a constant gradient 1 is exactly -lr_t, so the updates show the schedule."""
    config = small_config(lr_schedule=schedule, iterations=20, outer_lr=0.01, **overrides)
    optimizer = make_optimizer(config, iters_per_pass=3)
    params = jnp.zeros(())
    state = optimizer.init(params)
    for t in range(20):
        updates, state = optimizer.update(jnp.ones(()), state, params)
        np.testing.assert_allclose(-float(updates), expected(t), rtol=1e-4, atol=1e-8)


def test_cosine_warmup_must_be_shorter_than_the_run():
    with pytest.raises(dd_jax.ConfigError, match=r"warmup_iterations \(20\) must be shorter than the run \(20 iterations\)"):
        make_optimizer(small_config(lr_schedule="cosine", iterations=20, warmup_iterations=20), 3)
