"""A short real distillation run: it must beat both its start and random real images."""
from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dd_jax
from dd_jax.config import default_config
from dd_jax.evaluation import Evaluator
from dd_jax.meta import Learned
from dd_jax.models import LeNet, as_model
from dd_jax.outer_step import build_outer_loop
from dd_jax.schedule import clip_by_ema_norm, make_optimizer, project_to_simplex
from dd_jax.selection import BestOnValidation

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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


def test_clip_by_ema_norm_bounds_the_norm_by_twice_its_moving_average():
    """Norms 1, 10, 1: the first sets the average (no clipping), the second is clipped to
    2 x (0.9 x 1 + 0.1 x 10) = 3.8, the third passes; the direction is kept."""
    clip = clip_by_ema_norm(0.9)
    grads = [jnp.array([0.6, 0.8]), jnp.array([6.0, 8.0]), jnp.array([0.0, 1.0])]
    state = clip.init(grads[0])
    norms = []
    for g in grads:
        out, state = clip.update(g, state)
        np.testing.assert_allclose(out / jnp.linalg.norm(out), g / jnp.linalg.norm(g), rtol=1e-6)
        norms.append(float(jnp.linalg.norm(out)))
    np.testing.assert_allclose(norms, [1.0, 3.8, 1.0], rtol=1e-5)
    np.testing.assert_allclose(float(state.ema), 0.9 * 1.9 + 0.1 * 1.0, rtol=1e-6)


def test_feng_clipping_touches_only_images_and_keeps_labels_non_negative():
    """grad_clip_ema clips the images' gradient alone (Adam then sees the clipped gradient);
    nonneg_labels stops learned labels at 0 and leaves the other entries as Adam moves them."""
    config = small_config(grad_clip_ema=0.9, nonneg_labels=True, learn_labels=True, outer_lr=0.5)
    optimizer, adam = make_optimizer(config, 3), make_optimizer(small_config(outer_lr=0.5), 3)
    learned = Learned(images=jnp.ones((1, 2, 3)), raw_step_sizes=jnp.zeros(3),
                      labels=jnp.array([[[0.2, 1.0]]]))
    grads = Learned(images=jnp.full((1, 2, 3), 0.5), raw_step_sizes=jnp.ones(3),
                    labels=jnp.array([[[1.0, -1.0]]]))
    state, adam_state = optimizer.init(learned), adam.init(learned)
    for scale, clipped_scale in ((1.0, 1.0), (100.0, 2 * (0.9 + 0.1 * 100))):
        g = grads.replace(images=scale * grads.images)
        updates, state = optimizer.update(g, state, learned)
        expected, adam_state = adam.update(grads.replace(images=clipped_scale * grads.images),
                                           adam_state, learned)
        np.testing.assert_allclose(updates.images, expected.images, rtol=1e-6)
        np.testing.assert_allclose(updates.raw_step_sizes, expected.raw_step_sizes)
        learned_next = optax.apply_updates(learned, updates)
        np.testing.assert_array_equal(learned_next.labels[..., 0], 0.0)  # 0.2 - 0.5: stopped at 0
        np.testing.assert_allclose(learned_next.labels[..., 1],
                                   (learned.labels + expected.labels)[..., 1])
        learned = learned_next


def _simplex_by_bisection(v: np.ndarray) -> np.ndarray:
    """max(v - theta, 0) with theta found by bisection so that it sums to 1 (float64)."""
    lo, hi = v.min() - 1.0, v.max()
    for _ in range(200):
        theta = (lo + hi) / 2
        lo, hi = (theta, hi) if np.maximum(v - theta, 0).sum() > 1 else (lo, theta)
    return np.maximum(v - (lo + hi) / 2, 0)


def test_project_to_simplex_matches_bisection_and_keeps_simplex_points():
    """Random vectors of every scale land where bisection on theta puts them; points already
    on the simplex (a one-hot, a uniform, a mixed one) stay where they are."""
    v = np.concatenate([np.random.default_rng(0).normal(size=(20, 10)) * s for s in (0.1, 1, 5)])
    got = np.asarray(project_to_simplex(jnp.asarray(v, jnp.float32)))
    np.testing.assert_allclose(got, [_simplex_by_bisection(row) for row in v.astype(np.float64)],
                               atol=1e-5)
    assert (got >= 0).all() and np.allclose(got.sum(-1), 1, atol=1e-5)
    on = jnp.array([[0, 0, 1, 0.0], [0.25] * 4, [0.5, 0.3, 0, 0.2]])
    np.testing.assert_allclose(project_to_simplex(on), on, atol=1e-6)


def test_simplex_labels_keep_each_label_vector_on_the_simplex():
    """simplex_labels: after each outer step every label vector is >= 0 and sums to 1, and
    images and step sizes move as under plain Adam."""
    config = small_config(simplex_labels=True, learn_labels=True, outer_lr=0.5)
    optimizer, adam = make_optimizer(config, 3), make_optimizer(small_config(outer_lr=0.5), 3)
    learned = Learned(images=jnp.ones((1, 2, 3)), raw_step_sizes=jnp.zeros(3),
                      labels=jnp.array([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]]))
    grads = Learned(images=jnp.full((1, 2, 3), 0.5), raw_step_sizes=jnp.ones(3),
                    labels=jnp.array([[[1.0, -1.0, -1.0], [1.0, -3.0, -2.0]]]))
    state, adam_state = optimizer.init(learned), adam.init(learned)
    for _ in range(3):
        updates, state = optimizer.update(grads, state, learned)
        expected, adam_state = adam.update(grads, adam_state, learned)
        np.testing.assert_allclose(updates.images, expected.images, rtol=1e-6)
        np.testing.assert_allclose(updates.raw_step_sizes, expected.raw_step_sizes, rtol=1e-6)
        learned = optax.apply_updates(learned, updates)
        np.testing.assert_allclose(learned.labels,
                                   project_to_simplex(learned.labels - updates.labels
                                                      + expected.labels), atol=1e-6)
        assert (learned.labels >= 0).all()
        np.testing.assert_allclose(learned.labels.sum(-1), 1.0, atol=1e-6)
    assert float(learned.labels[0, 0, 0]) < 1.0  # the labels did move


@pytest.mark.parametrize("overrides, message", [
    (dict(grad_clip_ema=1.0), "grad_clip_ema must be in [0, 1)"),
    (dict(nonneg_labels=True), "add --learn_labels=true or drop --nonneg_labels"),
    (dict(simplex_labels=True), "add --learn_labels=true or drop --simplex_labels"),
])
def test_clipping_flags_are_checked(overrides, message):
    with pytest.raises(dd_jax.ConfigError, match=re.escape(message)):
        build_outer_loop(None, LeNet(), small_config(**overrides))


def test_cosine_warmup_must_be_shorter_than_the_run():
    with pytest.raises(dd_jax.ConfigError, match=r"warmup_iterations \(20\) must be shorter than the run \(20 iterations\)"):
        make_optimizer(small_config(lr_schedule="cosine", iterations=20, warmup_iterations=20), 3)


# --------------------------------------------------------------------------- validation holdout

VAL_SIZE = 300


def test_validation_holdout_is_never_trained_on(digits28):
    loop = build_outer_loop(digits28, LeNet(), small_config(val_size=VAL_SIZE))
    train = {x.tobytes() for x in np.asarray(loop.train_x)}
    val = {x.tobytes() for x in loop.val_x}
    full = {x.tobytes() for x in digits28.train_x}
    assert len(full) == len(digits28.train_x)  # no duplicate images, so sets compare examples
    assert len(val) == VAL_SIZE and len(train) == len(full) - VAL_SIZE
    assert not train & val and train | val == full
    assert loop.batches.n_train == len(full) - VAL_SIZE  # real batches come from train only


@pytest.fixture(scope="module")
def holdout_run(digits28):
    """60 iterations with a validation holdout, evaluated every 10: (config, log rows, result)."""
    rows = []
    config = small_config(iterations=60, eval_every=10, val_size=VAL_SIZE)
    d = dd_jax.distill(digits28, LeNet(), config, progress=False, log=rows.append)
    return config, rows, d


def test_validation_holdout_chooses_the_best_evaluated_iterate(digits28, holdout_run):
    config, rows, d = holdout_run
    evaluated = [r for r in rows if "val_acc" in r]
    assert [r["iteration"] for r in evaluated] == list(range(10, 61, 10))
    val_accs = [r["val_acc"] for r in evaluated]
    first_best = evaluated[int(np.argmax(val_accs))]
    assert d.selected == {"iteration": first_best["iteration"], "val_acc": max(val_accs),
                          "val_size": VAL_SIZE}
    # the returned data is that iterate: it scores that accuracy on the holdout and on the test set
    loop = build_outer_loop(digits28, LeNet(), config)
    learned = dd_jax.Learned(jnp.asarray(d.images), jnp.log(jnp.expm1(jnp.asarray(d.step_sizes))))
    val_acc = loop.accuracy_on(loop.val_x, loop.val_y, 1)(learned)["mean"]
    test_acc = dd_jax.evaluate(d, digits28, LeNet())["mean"]
    assert val_acc == pytest.approx(max(val_accs), abs=1.5 / VAL_SIZE)
    assert test_acc == pytest.approx(first_best["test_acc"], abs=1.5 / len(digits28.test_y))


def test_model_selection_never_sees_the_test_set(digits28, holdout_run):
    """With a validation holdout, a test set of garbage (noise images, shifted labels) changes
    the test accuracies logged and nothing else: the same iterate, images and step sizes."""
    config, real_rows, real = holdout_run
    noise = jax.random.normal(jax.random.PRNGKey(5), digits28.test_x.shape)
    garbage = dataclasses.replace(digits28, test_x=np.asarray(noise, np.float32),
                                  test_y=(digits28.test_y + 1) % 10)
    rows, d = {"real": real_rows, "garbage": []}, {"real": real}
    d["garbage"] = dd_jax.distill(garbage, LeNet(), config, progress=False,
                                  log=rows["garbage"].append)
    test_accs = {name: [r["test_acc"] for r in rows[name] if "test_acc" in r] for name in rows}
    assert len(test_accs["real"]) == 6 and test_accs["real"] != test_accs["garbage"]
    assert d["garbage"].selected == d["real"].selected
    np.testing.assert_array_equal(d["garbage"].images, d["real"].images)
    np.testing.assert_array_equal(d["garbage"].step_sizes, d["real"].step_sizes)
    assert [r["val_acc"] for r in rows["garbage"] if "val_acc" in r] == \
        [r["val_acc"] for r in rows["real"] if "val_acc" in r]


def test_best_on_validation_keeps_the_first_best_and_survives_a_restart(tmp_path):
    scores = iter([0.5, 0.7, 0.6, 0.7, 0.65])
    path = tmp_path / "best"
    best = BestOnValidation(lambda learned: {"mean": next(scores)}, 10, path)
    template = dd_jax.Learned(jnp.zeros((1, 2, 3, 3, 1)), jnp.zeros(3))
    iterate = lambda i: dd_jax.Learned(jnp.full((1, 2, 3, 3, 1), float(i)), jnp.full(3, -float(i)))
    assert [best.update(iterate(i), i) for i in (1, 2, 3)] == [0.5, 0.7, 0.6]
    assert best.selected == {"iteration": 2, "val_acc": 0.7, "val_size": 10}
    restarted = BestOnValidation(best.accuracy, 10, path)
    restarted.restore(template)
    assert restarted.selected == best.selected
    np.testing.assert_array_equal(np.asarray(restarted.learned.images), 2.0)
    np.testing.assert_array_equal(np.asarray(restarted.learned.raw_step_sizes), -2.0)
    restarted.update(iterate(4), 4)  # a tie keeps the earlier iterate
    restarted.update(iterate(5), 5)
    assert restarted.selected["iteration"] == 2


def test_resumed_run_keeps_the_validation_choice(digits28, tmp_path):
    config = small_config(iterations=60, eval_every=10, checkpoint_every=10, val_size=VAL_SIZE)
    whole = dd_jax.distill(digits28, LeNet(), config, progress=False)
    dd_jax.distill(digits28, LeNet(), config, workdir=tmp_path, progress=False, iterations=30)
    resumed = dd_jax.distill(digits28, LeNet(), config, workdir=tmp_path, resume=True, progress=False)
    assert resumed.selected == whole.selected
    np.testing.assert_array_equal(resumed.images, whole.images)
    np.testing.assert_array_equal(resumed.step_sizes, whole.step_sizes)


def test_bad_validation_size_is_a_config_error(digits28):
    with pytest.raises(dd_jax.ConfigError, match="val_size must be >= 0"):
        build_outer_loop(digits28, LeNet(), small_config(val_size=-1))
    with pytest.raises(dd_jax.ConfigError, match="val_size=1497 must be between 1 and the 1497"):
        build_outer_loop(digits28, LeNet(), small_config(val_size=1497))
