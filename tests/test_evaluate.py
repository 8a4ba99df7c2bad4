"""The evaluation protocols (dd_jax.protocols), the evaluation models, `python -m
experiments.evaluate` and the cross-architecture table's pieces, at tiny shapes."""
from __future__ import annotations

import contextlib
import io
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import make_tiny_mlp
from dd_jax.data import load_dataset
from dd_jax.distilled import DistilledData, save_distilled
from dd_jax.errors import ConfigError, DataError
from dd_jax.models import MLP, ConvNet, LeNet, as_model, conv3x3_patches
from dd_jax.protocols import (
    Recipe,
    augment,
    check_labels,
    check_model_fits,
    evaluate_paper,
    evaluate_standard,
    learning_rate,
    minibatches,
    train_network,
    train_networks,
)
from experiments import cross_arch
from experiments import evaluate as cli


@pytest.fixture(scope="module")
def mnist():
    return load_dataset("mnist").subset(0, 500)


def real_set(dataset, per_class: int, steps: int = 1, **fields) -> DistilledData:
    """The first `per_class` training images of every class as a distilled set of `steps`
    batches (plain GD step sizes 0.1, fixed regime fields unless overridden)."""
    idx = np.concatenate([np.where(dataset.train_y == c)[0][:per_class] for c in range(10)])
    idx = idx.reshape(10, per_class).T.reshape(steps, -1)
    defaults = dict(step_sizes=np.full(steps, 0.1, np.float32), epochs=1, mean=dataset.mean,
                    std=dataset.std, init_regime="random", init_dist="xavier_normal",
                    init_gain=1.0, seed=0)
    return DistilledData(images=dataset.train_x[idx], labels=dataset.train_y[idx],
                         **{**defaults, **fields})


def soft(labels: np.ndarray, k: int = 10) -> np.ndarray:
    return np.eye(k, dtype=np.float32)[labels]


# ----------------------------------------------------------------- the standard protocol


def test_standard_protocol_beats_chance_on_real_images(mnist):
    d = real_set(mnist, per_class=10)
    acc = evaluate_standard(d, mnist, MLP(), n_nets=2, recipe=Recipe(epochs=60))
    assert acc["n_nets"] == 2 and len(acc["accuracies"]) == 2
    assert min(acc["accuracies"]) > 0.4, acc  # chance: 10%


def test_sgd_momentum_weight_decay_equals_plain_loop():
    """train_network = PyTorch's SGD (g += wd p; buf = m buf + g; p -= lr_t buf), one full
    batch per epoch, lr_t = lr for the first half of the epochs and lr / 10 after."""
    model = make_tiny_mlp()
    x = jax.random.normal(jax.random.PRNGKey(0), (12, 4, 4, 1))
    y = jnp.arange(12) % 10
    params = model.init(jax.random.PRNGKey(1), x[:1])["params"]
    recipe = Recipe(epochs=4, lr=0.3, momentum=0.9, weight_decay=0.05)
    apply = lambda p, x: model.apply({"params": p}, x)
    got = train_network(apply, params, jax.random.PRNGKey(2), x, y, recipe)

    grad = jax.jit(jax.grad(
        lambda p: optax.softmax_cross_entropy_with_integer_labels(apply(p, x), y).mean()))
    p, buf = params, jax.tree.map(jnp.zeros_like, params)
    for lr in (0.3, 0.3, 0.03, 0.03):
        g = jax.tree.map(lambda g, w: g + 0.05 * w, grad(p), p)
        buf = jax.tree.map(lambda b, g: 0.9 * b + g, buf, g)
        p = jax.tree.map(lambda w, b: w - lr * b, p, buf)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(p)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert not np.allclose(jax.tree.leaves(got)[0], jax.tree.leaves(params)[0])


def test_lr_drops_tenfold_at_half_the_epochs():
    lr = learning_rate(Recipe(epochs=5, lr=0.01), steps_per_epoch=3)
    rates = np.array([lr(t) for t in range(15)])
    np.testing.assert_allclose(rates[:6], 0.01)  # epochs 0, 1 (epochs // 2 = 2)
    np.testing.assert_allclose(rates[6:], 0.001, rtol=1e-6)


def test_minibatches_cover_every_example_once_per_epoch():
    index, mask = minibatches(jax.random.PRNGKey(0), 10, 4)
    assert index.shape == mask.shape == (3, 4)
    assert sorted(np.asarray(index)[np.asarray(mask) > 0].tolist()) == list(range(10))
    assert float(mask.sum()) == 10 and float(mask[-1].sum()) == 2


def test_vmap_over_nets_equals_loop_and_seeds_repeat():
    x = jax.random.normal(jax.random.PRNGKey(0), (20, 4, 4, 1))
    y = jnp.arange(20) % 10
    recipe = Recipe(epochs=2, batch_size=8, augment=True)
    key = jax.random.PRNGKey(3)
    vmapped = train_networks(make_tiny_mlp(), key, 3, x, y, recipe)
    looped = train_networks(make_tiny_mlp(), key, 3, x, y, recipe, vmap=False)
    again = train_networks(make_tiny_mlp(), key, 3, x, y, recipe)
    for v, l, a in zip(*map(jax.tree.leaves, (vmapped, looped, again))):
        assert v.shape[0] == 3
        np.testing.assert_allclose(v, l, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(v, a)
        assert not np.allclose(v[0], v[1])  # each net its own init


def test_augment_is_identity_without_range_and_moves_pixels_with_it():
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 8, 8, 2))
    same = augment(jax.random.PRNGKey(1), x, scale=1.0, rotate=0.0, shift=0.0)
    np.testing.assert_allclose(same, x, atol=1e-5)
    moved = augment(jax.random.PRNGKey(1), x)
    assert moved.shape == x.shape and not np.allclose(moved, x)
    grad = jax.grad(lambda x: augment(jax.random.PRNGKey(1), x).sum())(x)
    assert np.isfinite(grad).all() and np.abs(grad).sum() > 0  # differentiable


# ----------------------------------------------------------------- labels and the paper protocol


def test_soft_one_hot_labels_train_as_hard_labels(mnist):
    hard = real_set(mnist, per_class=2, steps=2, step_sizes=np.full(2, 0.1, np.float32))
    soft_set = DistilledData(**{**vars(hard), "soft_labels": soft(hard.labels)})
    recipe = Recipe(epochs=5)
    a = evaluate_standard(hard, mnist, make_tiny_mlp(), n_nets=2, recipe=recipe)
    b = evaluate_standard(soft_set, mnist, make_tiny_mlp(), n_nets=2, recipe=recipe)
    np.testing.assert_allclose(a["accuracies"], b["accuracies"], atol=2 / len(mnist.test_y))

    init = make_tiny_mlp().init(jax.random.PRNGKey(0), mnist.train_x[:1])["params"]
    fixed = lambda d: DistilledData(**{**vars(d), "init_regime": "fixed", "init_params": init})
    p_hard = evaluate_paper(fixed(hard), mnist, make_tiny_mlp())
    p_soft = evaluate_paper(fixed(soft_set), mnist, make_tiny_mlp())
    assert abs(p_hard["mean"] - p_soft["mean"]) <= 2 / len(mnist.test_y)
    assert p_hard["mean"] != p_hard["untrained"]["mean"]


def test_negative_soft_labels_diverge_and_are_counted(mnist):
    """Soft labels with a negative entry make the soft-target cross-entropy unbounded below:
    300 epochs of SGD drive an MLP's weights to non-finite values, which the standard protocol
    counts; the same images with one-hot labels train."""
    d = real_set(mnist, per_class=1)
    recipe = Recipe(epochs=300)
    onehot = DistilledData(**{**vars(d), "soft_labels": soft(d.labels)})
    negative = DistilledData(**{**vars(d), "soft_labels": soft(d.labels) - 3 * soft((d.labels + 1) % 10)})
    ok = evaluate_standard(onehot, mnist, MLP(), n_nets=2, recipe=recipe)
    bad = evaluate_standard(negative, mnist, MLP(), n_nets=2, recipe=recipe)
    assert ok["diverged"] == 0 and min(ok["accuracies"]) > 0.3
    assert bad["diverged"] == 2
    warning = cli.divergence_warning({"diverged": 2, "eval_nets": 2, "negative_labels": True})
    assert warning.startswith("warning: 2 of 2 networks diverged") and "--nonneg_labels=true" in warning
    assert cli.divergence_warning({"diverged": 0, "eval_nets": 2, "negative_labels": True}) == ""


def test_check_labels_rejects_malformed_labels():
    with pytest.raises(DataError, match="soft labels have 3 classes"):
        check_labels(np.zeros((1, 2, 3), np.float32), 10)
    with pytest.raises(DataError, match=r"\[0, 10\)"):
        check_labels(np.array([[0, 12]]), 10)
    with pytest.raises(DataError, match="must be"):
        check_labels(np.zeros((1, 2), np.float32), 10)


def test_paper_protocol_refuses_another_models_theta0(mnist):
    shapes = jax.eval_shape(LeNet().init, jax.random.PRNGKey(0), mnist.train_x[:1])["params"]
    init = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), shapes)
    d = real_set(mnist, 1, init_regime="fixed", init_params=init)
    with pytest.raises(ConfigError, match="parameter tree"):
        evaluate_paper(d, mnist, make_tiny_mlp())


def test_models_fit_their_images():
    with pytest.raises(ConfigError, match="cannot take 8x8x1"):
        check_model_fits(as_model(LeNet()), (8, 8, 1))
    x28 = jnp.zeros((1, 28, 28, 1))
    params = jax.eval_shape(ConvNet().init, jax.random.PRNGKey(0), x28)["params"]
    assert params["fc"]["kernel"].shape == (3 * 3 * 128, 10)  # 28 -> 14 -> 7 -> 3
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 7, 7, 3))
    k = jax.random.normal(jax.random.PRNGKey(2), (3, 3, 3, 4))
    ref = nn.Conv(4, (3, 3), padding=1).apply({"params": {"kernel": k, "bias": jnp.zeros(4)}}, x)
    np.testing.assert_allclose(conv3x3_patches(x, k), ref, atol=1e-5)


# ----------------------------------------------------------------- the CLI


def call(args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main([str(a) for a in args])
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def npz(tmp_path_factory, mnist):
    path = tmp_path_factory.mktemp("set") / "distilled.npz"
    save_distilled(path, real_set(mnist, 1), model="lenet")
    return path


def test_cli_writes_json_and_markdown(npz, tmp_path):
    rc, out, err = call([npz, "--model=mlp", "--epochs", "3", "--n_nets=2", "--test_subset=100",
                         f"--out={tmp_path}"])
    assert rc == 0, err
    assert len(out.strip().splitlines()) == 1 and "standard protocol, mlp" in out
    record = json.loads((tmp_path / "evaluate_standard_mlp.json").read_text())
    assert record["eval_nets"] == 2 and record["test_examples"] == 100
    assert record["recipe"]["epochs"] == 3 and record["labels"] == "hard"
    assert "| standard | mlp |" in (tmp_path / "evaluate_standard_mlp.md").read_text()


@pytest.mark.parametrize("optimizer, words", [("gd", "GD steps"), ("momentum", "momentum steps")])
def test_cli_paper_protocol_names_the_sets_inner_optimizer(mnist, tmp_path, optimizer, words):
    path = tmp_path / "distilled.npz"
    save_distilled(path, real_set(mnist, 1, inner_optimizer=optimizer), model="lenet")
    rc, _, err = call([path, "--protocol=paper", "--n_nets=2", "--test_subset=100"])
    assert rc == 0, err
    record = json.loads((tmp_path / "evaluate_paper_lenet.json").read_text())
    assert record["inner_optimizer"] == optimizer and record["eval_nets"] == 2
    assert f"1 x 1 {words} at the set's step sizes" in (tmp_path / "evaluate_paper_lenet.md").read_text()


@pytest.mark.parametrize("args, fragment", [
    (["missing.npz"], "is not a file"),
    (["NOT_NPZ"], "cannot read distilled data"),
    (["NPZ", "--protocol=other"], "unknown protocol"),
    (["NPZ", "--model=resnet"], "unknown model"),
    (["NPZ", "--protocol=paper", "--model=mlp"], "distilled for (lenet)"),
    (["NPZ", "--epochs=x"], "expected an integer"),
    (["NPZ", "--n_nets=0"], "--n_nets must be >= 1"),
    (["NPZ", "--bogus=1"], "unknown flag --bogus"),
    (["SMALL"], "the distilled images are"),
    ([], "no distilled set named"),
])
def test_cli_bad_input_is_one_error_line(npz, tmp_path, mnist, args, fragment):
    not_npz = tmp_path / "x.npz"
    not_npz.write_text("not an npz")
    small = tmp_path / "distilled.npz"
    d = real_set(mnist, 1)
    save_distilled(small, DistilledData(**{**vars(d), "images": d.images[:, :, :8, :8]}))
    names = {"NPZ": npz, "NOT_NPZ": not_npz, "SMALL": small}
    rc, out, err = call([names.get(a, a) for a in args])
    assert rc == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], err


# ----------------------------------------------------------------- the cross-architecture table


def test_cross_arch_cells_and_table(tmp_path, mnist):
    for name, per_class in (("big", 2), ("small", 1)):
        (tmp_path / name).mkdir()
        save_distilled(tmp_path / name / "distilled.npz", real_set(mnist, per_class),
                       model="lenet")
    (tmp_path / "paper" / "small").mkdir(parents=True)  # the same file again, deeper
    (tmp_path / "paper" / "small" / "distilled.npz").write_bytes(
        (tmp_path / "small" / "distilled.npz").read_bytes())
    (tmp_path / "archive" / "old").mkdir(parents=True)
    save_distilled(tmp_path / "archive" / "old" / "distilled.npz", real_set(mnist, 3))
    sets = cross_arch.find_sets(tmp_path)
    assert list(sets) == ["big", "small"]
    order = cross_arch.cells(sets)
    assert len(order) == 2 * 6 and order[0] == ("big", "paper", "lenet")
    assert order[-2:] == [("small", "standard", "convnet"), ("big", "standard", "convnet")]
    flags = dict(cross_arch.FLAGS)
    assert cross_arch.run_cell(sets["big"], "paper", "mlp", flags)["status"] == "n/a"
    records = {"big|standard|lenet": {"test_acc": 0.9, "test_acc_std": 0.01, "eval_nets": 5,
                                      "seconds": 3.0},
               "big|paper|mlp": {"status": "n/a", "why": "architecture",
                                 "reason": "distilled for lenet (no pool needed)"},
               "small|paper|lenet": {"status": "n/a", "why": "no pool",
                                     "reason": "its pool is not committed "
                                     "(no network pool at /elsewhere/pool.npz)"}}
    text = cross_arch.table(sets, records, flags)
    assert "Paper protocol n/a for lack of a pool: small start" in text
    assert "/elsewhere" not in text  # the paths stay in table.json's records
    assert "| big | 20 | hard | random | not run | n/a | not run | 90.00 ± 1.00 (5) |" in text
