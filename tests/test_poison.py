"""Data poisoning: the label map, its meta-gradient, the attack metrics, and a run through the CLI."""
from __future__ import annotations

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_cli import assert_one_line_error, call_main, run_ok
from test_meta_gradient import EPOCHS, RTOL, _checker, _problem, _unit

import dd_jax
from conftest import assert_matches_finite_difference, make_tiny_convnet, make_tiny_mlp
from dd_jax.config import default_config
from dd_jax.distilled import DistilledData
from dd_jax.errors import ConfigError, DataError
from dd_jax.evaluation import Evaluator, evaluate
from dd_jax.inner import inner_train
from dd_jax.meta import Learned, meta_loss
from dd_jax.models import as_model
from dd_jax.outer_step import build_outer_loop
from dd_jax.poison import attack_metrics, check_poison, evaluate_poison, poison_labels, summarise_attack

# --------------------------------------------------------------------------- the label map


def test_poison_labels_changes_only_class_k():
    y = jnp.asarray([0, 1, 2, 3, 2, 9, 2, 0], jnp.int32)
    out = np.asarray(poison_labels(y, 2, 7))
    np.testing.assert_array_equal(out, [0, 1, 7, 3, 7, 9, 7, 0])
    assert out.dtype == np.int32
    changed = out != np.asarray(y)
    np.testing.assert_array_equal(changed, np.asarray(y) == 2)  # exactly the class-K entries


def test_poison_labels_off_is_identity():
    y = jnp.arange(10, dtype=jnp.int32)
    assert poison_labels(y, -1, 3) is y
    # the target may itself occur among the labels: only K moves, T's own images stay T
    np.testing.assert_array_equal(np.asarray(poison_labels(y, 0, 1)), [1, 1, 2, 3, 4, 5, 6, 7, 8, 9])


@pytest.mark.parametrize("k, t, match", [
    (10, 1, "poison_class must be -1"), (-2, 1, "poison_class must be -1"),
    (0, -1, "poison_target must be"), (0, 10, "poison_target must be"), (3, 3, "other than"),
])
def test_check_poison_rejects_impossible_classes(k, t, match):
    with pytest.raises(ConfigError, match=match):
        check_poison(k, t, 10)


def test_check_poison_needs_class_k_and_others_in_the_test_set():
    check_poison(-1, -1, 10, np.zeros(5))  # off: nothing to check
    check_poison(0, 1, 10, np.array([0, 1]))
    with pytest.raises(DataError, match="holds no images of poison_class 4"):
        check_poison(4, 1, 10, np.array([0, 1, 2]))
    with pytest.raises(DataError, match="holds only images of poison_class 0"):
        check_poison(0, 1, 10, np.array([0, 0]))


# --------------------------------------------------------------------------- the meta-gradient

K_CLASSES = 3  # the tiny problem of test_meta_gradient has labels 0..2


@pytest.mark.parametrize("model_name, n_nets", [("mlp", 2), ("conv", 1)])
def test_poisoned_meta_gradient_matches_finite_differences(model_name, n_nets):
    """The poisoning objective - meta_loss against poison_labels(real_y) - differentiated
    through every inner step, against float64 central differences."""
    with jax.enable_x64():
        model_fn = (make_tiny_mlp(hidden=5, num_classes=K_CLASSES) if model_name == "mlp"
                    else make_tiny_convnet(K_CLASSES))
        learned, labels, init_params, real_x, real_y, apply_fn = _problem(model_fn, n_nets, seed=7)
        assert bool(jnp.any(real_y == 0)), "no class-K image in the real batch: vacuous test"
        poisoned_y = poison_labels(real_y, 0, 2)
        check = _checker(labels, init_params, real_x, poisoned_y, apply_fn, remat=False)
        objective = functools.partial(meta_loss, labels=labels, init_params=init_params,
                                      real_x=real_x, apply_fn=apply_fn, epochs=EPOCHS)

        rng = np.random.default_rng(11)
        zeros_img = jnp.zeros_like(learned.images)
        zeros_eta = jnp.zeros_like(learned.raw_step_sizes)
        directions = [
            Learned(_unit(rng.normal(size=learned.images.shape)), zeros_eta),
            Learned(zeros_img, _unit(rng.normal(size=learned.raw_step_sizes.shape))),
            Learned(_unit(rng.normal(size=learned.images.shape)),
                    _unit(rng.normal(size=learned.raw_step_sizes.shape))),
        ]
        for v in directions:
            grad, analytic, numeric = check(learned, v)
            assert_matches_finite_difference(analytic, numeric, RTOL)

        # the label map changes the objective and its gradient (it is not a no-op)
        plain = jax.jit(jax.grad(lambda l: objective(l, real_y=real_y)))(learned)
        assert not np.allclose(np.asarray(plain.images), np.asarray(grad.images))
        assert float(objective(learned, real_y=poisoned_y)) != float(objective(learned, real_y=real_y))


def test_outer_loop_meta_step_uses_poisoned_labels(digits8):
    """One outer iteration's meta-loss equals meta_loss against the K -> T relabelled batch."""
    dataset = digits8.subset(200, 60)
    config = default_config()
    config.update(dict(real_batch_size=32, poison_class=3, poison_target=5, iterations=1))
    model = as_model(make_tiny_mlp())
    loop = build_outer_loop(dataset, model, config)
    expected_y = np.where(dataset.train_y == 3, 5, dataset.train_y)
    np.testing.assert_array_equal(np.asarray(loop.train_y), expected_y)

    learned0 = jax.tree.map(jnp.array, loop.state.learned)  # the step donates its state
    idx = jnp.asarray(loop.batches(0))
    assert bool(jnp.any(jnp.asarray(dataset.train_y)[idx] == 3)), "vacuous: no class-K image"
    _, loss = loop.step(loop.state, 0)
    by_hand = meta_loss(learned0, loop.labels, loop.regime.train_inits(0), loop.train_x[idx],
                        jnp.asarray(expected_y)[idx], apply_fn=model.apply, epochs=config.epochs)
    np.testing.assert_allclose(float(loss), float(by_hand), rtol=1e-5)
    unpoisoned = meta_loss(learned0, loop.labels, loop.regime.train_inits(0), loop.train_x[idx],
                           jnp.asarray(dataset.train_y)[idx], apply_fn=model.apply,
                           epochs=config.epochs)
    assert abs(float(loss) - float(unpoisoned)) > 1e-4


def test_objective_plugs_into_the_outer_loop(digits8):
    """The config's poisoning and the same `Poisoning` passed as `objective` build the same
    targets; a research objective of one's own reaches the meta-step; its check runs first."""
    from dd_jax.errors import DataError
    from dd_jax.objective import Plain, objective_for
    from dd_jax.poison import Poisoning

    dataset = digits8.subset(200, 60)
    config = default_config()
    config.update(dict(real_batch_size=32, iterations=1))
    model = as_model(make_tiny_mlp())
    assert objective_for(config) == Plain()
    poisoned = config.copy_and_resolve_references()
    poisoned.update(dict(poison_class=3, poison_target=5))
    assert objective_for(poisoned) == Poisoning(3, 5)
    by_config = build_outer_loop(dataset, model, poisoned)
    passed = build_outer_loop(dataset, model, config, objective=Poisoning(3, 5))
    np.testing.assert_array_equal(np.asarray(by_config.train_y), np.asarray(passed.train_y))

    class Shifted:  # every class trained towards the next one
        def check(self, dataset):
            if dataset.num_classes < 2:
                raise DataError("needs two classes")

        def targets(self, labels):
            return (np.asarray(labels) + 1) % 10

    shifted = build_outer_loop(dataset, model, config, objective=Shifted())
    np.testing.assert_array_equal(np.asarray(shifted.train_y), (dataset.train_y + 1) % 10)
    no_k = dataclasses.replace(dataset, test_y=np.zeros_like(dataset.test_y))  # no class 3 to attack
    with pytest.raises(DataError, match="no images of poison_class 3"):
        build_outer_loop(no_k, model, config, objective=Poisoning(3, 5))


# --------------------------------------------------------------------------- the attack metrics


def test_attack_metrics_on_a_hand_made_toy():
    # K = 2, T = 0. Four class-2 images: three predicted 0, one predicted 2 (right, not attacked).
    labels = np.array([2, 2, 2, 2, 0, 0, 1, 1, 1, 3])
    preds = np.array([0, 0, 0, 2, 0, 1, 1, 1, 0, 3])
    m = attack_metrics(preds, labels, poison_class=2, poison_target=0)
    assert m["attack_success"] == pytest.approx(3 / 4)
    # other classes: 0 -> [0 ok, 1 wrong], 1 -> [1 ok, 1 ok, 0 wrong], 3 -> [3 ok]: 4 of 6
    assert m["other_class_acc"] == pytest.approx(4 / 6)
    assert m["test_acc"] == pytest.approx(5 / 10)  # true labels: 4 others + the one class-2 hit


def test_attack_metrics_perfect_attack_and_no_attack():
    labels = np.array([0, 0, 1, 2, 2])
    assert attack_metrics(np.array([1, 1, 1, 2, 2]), labels, 0, 1) == {
        "test_acc": 0.6, "attack_success": 1.0, "other_class_acc": 1.0}
    assert attack_metrics(labels, labels, 0, 1) == {
        "test_acc": 1.0, "attack_success": 0.0, "other_class_acc": 1.0}


def test_summarise_attack_mean_and_std():
    s = summarise_attack([{"test_acc": 0.5, "attack_success": 0.2, "other_class_acc": 0.9},
                          {"test_acc": 0.7, "attack_success": 0.6, "other_class_acc": 0.7}])
    assert s["eval_nets"] == 2
    assert s["attack_success"] == pytest.approx(0.4) and s["attack_success_std"] == pytest.approx(0.2)
    assert s["other_class_acc"] == pytest.approx(0.8) and s["test_acc_std"] == pytest.approx(0.1)


def test_evaluate_poison_matches_predictions_by_hand(digits8):
    """before/after figures equal attack_metrics of predictions computed directly (theta_0 as is,
    and after inner_train), and 'after' test accuracy agrees with evaluation.evaluate."""
    dataset = digits8.subset(100, 300)
    model = as_model(make_tiny_mlp(hidden=8))
    rng = np.random.default_rng(0)
    distilled = DistilledData(
        images=rng.normal(size=(2, 10, 8, 8, 1)).astype(np.float32),
        labels=np.tile(np.arange(10, dtype=np.int32), (2, 1)),
        step_sizes=np.array([0.3, 0.2, 0.1, 0.1], np.float32), epochs=2,
        mean=dataset.mean, std=dataset.std, init_regime="random", init_dist="xavier_normal",
        init_gain=1.0, seed=3)
    inits = jax.vmap(lambda k: model.init(k, jnp.zeros((1, 8, 8, 1))))(
        jax.random.split(jax.random.PRNGKey(1), 3))
    rows = evaluate_poison(distilled, dataset, model, 4, 9, init_params=inits)

    x = jnp.asarray(dataset.test_x)
    per_net = {name: [] for name in ("before", "after")}
    for i in range(3):
        theta0 = jax.tree.map(lambda a: a[i], inits)
        theta = inner_train(model.apply, theta0, jnp.asarray(distilled.images),
                            jnp.asarray(distilled.labels), jnp.asarray(distilled.step_sizes), 2)
        for name, p in (("before", theta0), ("after", theta)):
            preds = np.asarray(jnp.argmax(model.apply(p, x), -1))
            per_net[name].append(attack_metrics(preds, dataset.test_y, 4, 9))
    for name in ("before", "after"):
        expected = summarise_attack(per_net[name])
        for key, value in expected.items():
            assert rows[name][key] == pytest.approx(value, abs=1e-6), (name, key)
    assert rows["before"] != rows["after"]
    acc = evaluate(distilled, dataset, model, init_params=inits)
    assert rows["after"]["test_acc"] == pytest.approx(acc["mean"], abs=1e-9)
    assert rows["before"]["test_acc"] == pytest.approx(acc["untrained"]["mean"], abs=1e-9)


def test_evaluator_predictions_agree_with_its_accuracy(digits8):
    """Predictions over a padded last chunk: exactly N rows, accuracy as the counting path."""
    dataset = digits8.subset(10, 250)
    model = as_model(make_tiny_mlp())
    inits = jax.vmap(lambda k: model.init(k, jnp.zeros((1, 8, 8, 1))))(
        jax.random.split(jax.random.PRNGKey(0), 2))
    ev = Evaluator(model.apply, 1, dataset.test_x, dataset.test_y, chunk=100)
    preds = ev.predictions(inits)
    assert preds.shape == (2, 250)
    np.testing.assert_allclose((preds == dataset.test_y).mean(axis=1), ev.untrained(inits))


# --------------------------------------------------------------------------- end to end

TINY_POISON = ["mnist_poison", "--init_regime=fixed", "--n_nets=1", "--dataset=digits",
               "--iterations=4", "--real_batch_size=64", "--n_eval_nets=2", "--eval_every=2",
               "--checkpoint_every=2", "--log_every=1", "--quiet"]


@pytest.mark.slow
def test_poisoning_run_through_the_cli(tmp_path):
    out = tmp_path / "poison"
    stdout = run_ok([*TINY_POISON, f"--output_dir={out}"])
    assert "poisoning: class 0 predicted as 1" in stdout
    assert {"config.json", "metrics.jsonl", "checkpoint", "distilled.npz", "distilled.png",
            "results.json", "poisoning.png"} <= {p.name for p in out.iterdir()}
    r = json.loads((out / "results.json").read_text())
    assert (r["experiment"], r["poison_class"], r["poison_target"]) == ("mnist_poison", 0, 1)
    assert r["steps"] == 1 and r["epochs"] == 1 and r["images"] == 10
    before, after = r["rows"]
    assert (before["method"], after["method"]) == ("before", "after")
    for row in r["rows"]:
        for key in ("test_acc", "test_acc_std", "eval_nets", "seconds", "attack_success",
                    "other_class_acc"):
            assert key in row, key
        assert 0.0 <= row["attack_success"] <= 1.0 and 0.0 <= row["other_class_acc"] <= 1.0
    assert after["seconds"] == r["distill_seconds"] and before["seconds"] == 0.0
    assert r["attack_success"] == after["attack_success"]
    # the same networks: the plain evaluation's figures are the rows' test accuracies
    assert after["test_acc"] == pytest.approx(r["test_acc"])
    assert before["test_acc"] == pytest.approx(r["untrained_acc"])
    config = json.loads((out / "config.json").read_text())
    assert config["poison_class"] == 0 and config["outer_lr"] == 0.02


@pytest.mark.parametrize("flags, fragment", [
    (["--poison_target=0"], "poison_target must be"),
    (["--poison_class=12"], "poison_class must be -1"),
    (["--test_subset=3"], "use a larger --test_subset"),  # digits' first 3 test images: no 0
])
def test_bad_poisoning_settings_are_one_line_errors(tmp_path, flags, fragment):
    rc, _, err = call_main([*TINY_POISON, *flags, f"--output_dir={tmp_path / 'bad'}"])
    assert_one_line_error(rc, err, fragment)


@pytest.mark.slow
def test_poisoned_distillation_attacks_class_k(digits8):
    """A short poisoning run (tiny MLP, fixed theta_0, one GD step on 10 images): the poisoned
    meta-loss falls, and after training on the data theta_0 predicts far more of class K as T
    than after training on the same run's unpoisoned data, keeping most other classes right."""
    dataset = digits8.subset(600, 300)
    model = make_tiny_mlp(hidden=16)
    config = default_config()
    config.update(dict(steps=1, epochs=1, real_batch_size=128, iterations=60, outer_lr=0.05,
                       log_every=1, eval_every=10**6))
    rows, distilled = {}, {}
    for name, k, t in (("poisoned", 0, 1), ("clean", -1, -1)):
        rows[name] = []
        distilled[name] = dd_jax.distill(dataset, model, config, progress=False, poison_class=k,
                                         poison_target=t, log=rows[name].append)
    losses = [r["meta_loss"] for r in rows["poisoned"]]
    assert np.mean(losses[-10:]) < np.mean(losses[:10]) - 0.5, losses
    attack = {name: evaluate_poison(d, dataset, model, 0, 1)["after"] for name, d in distilled.items()}
    assert attack["poisoned"]["eval_nets"] == attack["clean"]["eval_nets"] == 1  # the same theta_0
    assert attack["poisoned"]["attack_success"] > attack["clean"]["attack_success"] + 0.5, attack
    assert attack["poisoned"]["other_class_acc"] > 0.5, attack
