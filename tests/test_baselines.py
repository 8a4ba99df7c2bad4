"""Baselines: the sets' layout and content, choices made on training data only, k-NN, the CLI run."""
from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_cli import call_main

import dd_jax
from conftest import make_tiny_mlp
from dd_jax import baselines as bl
from dd_jax import knn
from dd_jax.config import default_config
from dd_jax.errors import ConfigError
from dd_jax.meta import distilled_labels
from dd_jax.models import as_model, get_model
from dd_jax.outer_step import build_outer_loop
from experiments.configs import EXPERIMENTS


def toy_images(n: int, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, 2, 2, 1) images whose pixels all equal their index; labels index % num_classes."""
    x = np.broadcast_to(np.arange(n, dtype=np.float32)[:, None, None, None], (n, 2, 2, 1)).copy()
    return x, (np.arange(n) % num_classes).astype(np.int32)


# --------------------------------------------------------------------------- the sets


@pytest.mark.parametrize("steps,ipc", [(1, 1), (3, 2)])
def test_random_real_layout_and_class_balance(steps, ipc):
    x, y = toy_images(200, 5)
    images = bl.random_real_images(jax.random.PRNGKey(0), x, y, steps, ipc, 5)
    labels = np.asarray(distilled_labels(steps, ipc, 5))
    assert images.shape == (steps, 5 * ipc, 2, 2, 1) and labels.shape == images.shape[:2]
    index = images[..., 0, 0, 0].astype(int)  # which training image fills each slot
    np.testing.assert_array_equal(y[index], labels)  # every slot holds its label's class
    for s in range(steps):  # every step: ipc images of every class
        assert np.bincount(labels[s], minlength=5).tolist() == [ipc] * 5
    assert len(np.unique(index)) == index.size  # no image used twice
    again = bl.random_real_images(jax.random.PRNGKey(0), x, y, steps, ipc, 5)
    other = bl.random_real_images(jax.random.PRNGKey(1), x, y, steps, ipc, 5)
    np.testing.assert_array_equal(images, again)
    assert not np.array_equal(images, other)


def test_too_few_images_of_a_class_is_a_config_error():
    x, y = toy_images(20, 5)  # 4 per class
    with pytest.raises(ConfigError, match="fewer than the 6"):
        bl.random_real_images(jax.random.PRNGKey(0), x, y, 3, 2, 5)


def test_kmeans_gives_k_centres_per_class_at_the_clusters():
    rng = np.random.default_rng(0)
    steps, ipc, classes = 2, 2, 3
    k = steps * ipc
    true = rng.normal(size=(classes, k, 4)) * 20  # well-separated cluster centres per class
    x = (true[:, :, None, :] + rng.normal(size=(classes, k, 50, 4)) * 0.1).reshape(-1, 2, 2, 1)
    y = np.repeat(np.arange(classes), k * 50).astype(np.int32)
    images = bl.kmeans_images(x.astype(np.float32), y, steps, ipc, classes, seed=0)
    labels = np.asarray(distilled_labels(steps, ipc, classes))
    assert images.shape == (steps, classes * ipc, 2, 2, 1)
    for c in range(classes):
        centres = images[labels == c].reshape(-1, 4)
        assert len(centres) == k
        dist = np.linalg.norm(centres[:, None] - true[c][None], axis=-1)
        assert sorted(dist.argmin(axis=1).tolist()) == list(range(k))  # one centre per cluster
        assert dist.min(axis=1).max() < 0.1


def test_mean_image_is_the_class_mean_in_every_slot():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(60, 3, 3, 1)).astype(np.float32)
    y = rng.integers(0, 3, 60).astype(np.int32)
    images = bl.mean_images(x, y, 2, 2, 3)
    labels = np.asarray(distilled_labels(2, 2, 3))
    assert images.shape == (2, 6, 3, 3, 1)
    for s in range(2):
        for j in range(6):
            np.testing.assert_allclose(images[s, j], x[y == labels[s, j]].mean(axis=0), rtol=1e-5)


# --------------------------------------------------------------------------- k-NN and choosing


def test_knn_on_a_separable_toy():
    rng = np.random.default_rng(2)
    centres = np.array([[-10.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    test_y = rng.integers(0, 3, 300)
    test_x = (centres[test_y] + rng.normal(size=(300, 2))).reshape(300, 2, 1, 1)
    ref_x, ref_y = centres.reshape(3, 2, 1, 1), np.arange(3)
    assert knn.knn_accuracy(ref_x, ref_y, test_x, test_y, k=1, chunk=7) == 1.0
    assert knn.knn_accuracy(ref_x, (ref_y + 1) % 3, test_x, test_y) == 0.0
    # k=3 with two references per class near the centre and one far outlier of class 2 near
    # class 0's points: the vote among the 3 nearest still gives class 0
    ref_x3 = np.concatenate([centres, centres + 0.5, [[-9.0, 0.5]]]).reshape(7, 2, 1, 1)
    ref_y3 = np.array([0, 1, 2, 0, 1, 2, 2])
    class0 = test_y == 0
    assert knn.knn_accuracy(ref_x3, ref_y3, test_x[class0], test_y[class0], k=3) == 1.0
    with pytest.raises(ConfigError, match="knn_k=4"):
        knn.knn_accuracy(ref_x, ref_y, test_x, test_y, k=4)


def test_step_size_search_takes_the_best_score_smallest_on_ties():
    scores = {0.01: 0.2, 0.1: 0.7, 0.3: 0.7, 1.0: 0.1}
    best, seen = bl.search_step_size(scores.__getitem__, [1.0, 0.3, 0.1, 0.01])
    assert best == 0.1 and seen == scores


@pytest.mark.parametrize("text", ["", "0.1,-1", "a,b", "0.1,nan"])
def test_bad_grid_is_a_config_error(text):
    with pytest.raises(ConfigError, match="step_size_grid"):
        bl.parse_grid(text)


# --------------------------------------------------------------------------- BaselineMaker


def tiny_config(**fields):
    c = default_config()
    c.update(dict(steps=2, score_holdout=300, optimised_candidates=4,
                  step_size_grid="0.01,0.1,1.0", kind="baselines"))
    c.update(fields)
    return c


@pytest.fixture(scope="module")
def maker(digits28):
    return bl.BaselineMaker(digits28, make_tiny_mlp(), tiny_config())


def test_choices_use_the_training_holdout_never_the_test_set(maker, digits28):
    b = maker.make("random_real")
    # the scores are the holdout accuracies of theta_0 trained on the set, recomputed apart
    split = maker.split
    model = as_model(make_tiny_mlp())
    theta0 = jax.tree.map(lambda a: jnp.asarray(a)[None], maker.init_params)
    evaluator = dd_jax.evaluation.Evaluator(model.apply, 3, split.holdout_x, split.holdout_y)
    for lr, score in b.step_size_scores.items():
        acc = evaluator(theta0, jnp.asarray(b.data.images), jnp.asarray(b.data.labels),
                        jnp.full((6,), lr))
        assert score == pytest.approx(float(acc[0]))
    assert b.step_size == max(b.step_size_scores, key=b.step_size_scores.get)
    # a test set of garbage changes nothing: the choice never looks at it
    garbage = dataclasses.replace(digits28, test_x=np.full_like(digits28.test_x, np.nan),
                                  test_y=(digits28.test_y + 1) % 10)
    again = bl.BaselineMaker(garbage, make_tiny_mlp(), tiny_config()).make("random_real")
    assert again.step_size_scores == b.step_size_scores
    np.testing.assert_array_equal(again.data.images, b.data.images)


def test_sets_come_from_the_pool_not_the_holdout(maker):
    images = maker.make("random_real").data.images.reshape(-1, 28 * 28)
    pool = maker.split.learn_x.reshape(len(maker.split.learn_y), -1)
    holdout = maker.split.holdout_x.reshape(len(maker.split.holdout_y), -1)
    assert len(pool) + len(holdout) == 1497 and len(holdout) == 300
    for img in images:
        assert np.any(np.all(pool == img, axis=1)) and not np.any(np.all(holdout == img, axis=1))
    np.testing.assert_allclose(  # the mean baseline is the pool's class mean
        maker.make("mean").data.images[0, 3], maker.split.learn_x[maker.split.learn_y == 3].mean(0),
        rtol=1e-5, atol=1e-5)


def test_optimised_real_picks_the_best_scored_set(maker):
    random_real, best = maker.make("random_real"), maker.make("optimised_real")
    scores = best.candidate_scores
    assert len(scores) == 4
    candidates = [maker.random_set(i) for i in range(4)]
    np.testing.assert_array_equal(candidates[0], random_real.data.images)
    # each candidate's score, recomputed, at random_real's step size; the winner is the argmax
    for cand, score in zip(candidates, scores):
        assert maker.scorer(cand, random_real.step_size) == pytest.approx(score)
    np.testing.assert_array_equal(best.data.images, candidates[int(np.argmax(scores))])
    assert max(scores) >= scores[0] == pytest.approx(random_real.score)
    assert best.score >= max(scores) - 1e-9  # its own step size search can only do better


def test_baseline_is_distilled_data_with_the_distillation_theta0(maker, digits28, tmp_path):
    b = maker.make("kmeans")
    assert b.data.images.shape == (2, 10, 28, 28, 1) and b.data.steps == 2 and b.data.epochs == 3
    np.testing.assert_array_equal(b.data.labels, distilled_labels(2, 1, 10))
    np.testing.assert_array_equal(b.data.step_sizes, np.full(6, b.step_size, np.float32))
    theta0 = build_outer_loop(digits28, make_tiny_mlp(), tiny_config()).regime.fixed_params
    jax.tree.map(np.testing.assert_array_equal, b.data.init_params, jax.tree.map(np.asarray, theta0))
    dd_jax.save_distilled(tmp_path / "b.npz", b.data)
    back = dd_jax.load_distilled(tmp_path / "b.npz")
    np.testing.assert_array_equal(back.images, b.data.images)
    np.testing.assert_array_equal(back.step_sizes, b.data.step_sizes)


def test_random_regime_scores_on_training_draws(digits28):
    c = tiny_config(init_regime="random", n_nets=3, baselines="mean")
    m = bl.BaselineMaker(digits28, make_tiny_mlp(), c)
    assert m.init_params is None  # evaluate() then draws the held-out inits, as for distilled data
    assert jax.tree.leaves(m.scorer._inits)[0].shape[0] == 3
    b = m.make("mean")
    assert b.data.init_regime == "random" and b.data.seed == 0 and b.data.init_params is None


# --------------------------------------------------------------------------- the CLI


def read(run) -> dict:
    return json.loads((run / "results.json").read_text())


@pytest.mark.slow
def test_baselines_run_through_the_cli(tiny_runs):
    run = tiny_runs["baselines"]
    results = read(run)
    assert [r["method"] for r in results["rows"]] == [*bl.BASELINES, "distilled"]
    assert results["experiment"] == "mnist_baselines" and results["kind"] == "baselines"
    assert results["images"] == 20 and results["init_regime"] == "fixed"
    assert results["test_examples"] == 100 and results["distill_seconds"] > 0
    for r in results["rows"]:
        assert {"method", "test_acc", "test_acc_std", "eval_nets", "knn_acc", "step_size",
                "seconds"} <= set(r)
        assert r["eval_nets"] == 1 and 0 <= r["test_acc"] <= 1 and 0 <= r["knn_acc"] <= 1
    for r in results["rows"][:4]:
        assert r["step_size"] in (0.03, 0.3)
        assert (run / f"baseline_{r['method']}.png").exists()
    assert len(results["rows"][1]["candidate_scores"]) == 3
    assert results["test_acc"] == max(r["test_acc"] for r in results["rows"][:4])  # baselines only

    # a saved baseline retrains to the reported accuracy, exactly like distilled data
    config = json.loads((run / "config.json").read_text())
    dataset = dd_jax.load_dataset("digits").subset(0, 100)
    model = get_model(config["model"], 10, config["conv"])
    kmeans = dd_jax.load_distilled(run / "baseline_kmeans.npz")
    row = results["rows"][2]
    assert dd_jax.evaluate(kmeans, dataset, model)["accuracies"] == row["test_accs"]
    assert knn.knn_of(kmeans, dataset, 1) == row["knn_acc"]
    # the distilled row is the distilled run's own evaluation
    distilled = read(tiny_runs["distill"])
    assert results["rows"][4]["test_accs"] == distilled["test_accs"]


@pytest.mark.slow
def test_random_baselines_use_the_held_out_inits(tiny_runs):
    results = read(tiny_runs["baselines_random"])
    assert [r["method"] for r in results["rows"]] == ["random_real", "mean"]
    mean = dd_jax.load_distilled(tiny_runs["baselines_random"] / "baseline_mean.npz")
    dataset = dd_jax.load_dataset("digits").subset(0, 100)
    model = get_model("lenet", 10)
    regime = dd_jax.make_regime("random", jax.random.PRNGKey(0), as_model(model),
                                jnp.asarray(dataset.train_x[:1]))
    accs = dd_jax.evaluation.Evaluator(as_model(model).apply, 3, dataset.test_x, dataset.test_y)(
        regime.eval_inits(2), jnp.asarray(mean.images), jnp.asarray(mean.labels),
        jnp.asarray(mean.step_sizes))
    assert results["rows"][1]["test_accs"] == accs.tolist() and results["rows"][1]["eval_nets"] == 2


@pytest.mark.parametrize("flag,fragment", [
    ("--baselines=random_real,knn", "--baselines="),
    ("--step_size_grid=0.1,x", "--step_size_grid="),
    ("--score_holdout=1497", "score_holdout=1497"),
    ("--resume", "nothing can be resumed"),
    ("--knn_k=101 --score_holdout=300", "knn_k=101"),
])
def test_bad_baselines_input_is_one_line(flag, fragment, tmp_path):
    rc, _, err = call_main(["mnist_baselines", "--dataset=digits", *flag.split(),
                         f"--output_dir={tmp_path / 'x'}"])
    assert rc == 2 and "Traceback" not in err
    assert err.startswith("error: ") and err.count("\n") == 1 and fragment in err, err
    assert not (tmp_path / "x" / "results.json").exists()


def test_experiments_are_listed():
    assert EXPERIMENTS["mnist_baselines"]().kind == "baselines"
    fixed, base = EXPERIMENTS["mnist_fixed_init_100"](), EXPERIMENTS["mnist_baselines"]()
    assert {k: v for k, v in fixed.items() if k != "kind"} == {k: v for k, v in base.items() if k != "kind"}
    rand, base_r = EXPERIMENTS["mnist_random_init"](), EXPERIMENTS["mnist_baselines_random"]()
    assert {k: v for k, v in rand.items() if k != "kind"} == {k: v for k, v in base_r.items() if k != "kind"}
