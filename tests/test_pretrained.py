"""Pretrained networks: pool training and files, the fixed_/random_pretrained regimes (meta-gradient,
held-out members), evaluation of data distilled for a pool, the USPS/SVHN loaders, and the
domain-adaptation experiments end to end through the CLI."""
from __future__ import annotations

import bz2
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_cli import assert_one_line_error, call_main
from test_meta_gradient import EPOCHS, RTOL, STEPS, K, _checker, _problem, _unit

import dd_jax
from conftest import assert_matches_finite_difference, make_tiny_mlp
from dd_jax.config import default_config
from dd_jax.data import load_dataset
from dd_jax.dataset import NORMALISATION
from dd_jax.errors import ConfigError, DataError
from dd_jax.models import as_model, get_model
from dd_jax.pretrain import (
    Pool,
    check_pool,
    load_pool,
    pool_fingerprint,
    pool_for_config,
    pool_path,
    save_pool,
    train_pool,
)
from dd_jax.regimes import make_regime
from dd_jax.usps import parse_libsvm


def labelled_pool(n: int, shapes: dict[str, tuple[int, ...]]) -> dict:
    """A pool whose member i has every parameter equal to i (so a draw names its member)."""
    return {layer: {"kernel": jnp.broadcast_to(jnp.arange(n, dtype=jnp.float32)[:, None, None], (n, *shape)),
                    "bias": jnp.broadcast_to(jnp.arange(n, dtype=jnp.float32)[:, None], (n, shape[-1]))}
            for layer, shape in shapes.items()}


def member_ids(inits) -> np.ndarray:
    return np.asarray(inits["fc"]["bias"][:, 0]).astype(int)


# --------------------------------------------------------------------------- regimes


def test_random_pretrained_never_samples_held_out_members():
    size, held_out, n_nets = 9, 3, 4
    regime = make_regime("random_pretrained", jax.random.PRNGKey(0), None, None, n_nets=n_nets,
                         pool=labelled_pool(size, {"fc": (3, 2)}), pool_eval_nets=held_out)
    # as the meta-step draws them: jitted, traced iteration counter, pool passed as an argument
    draw = jax.jit(jax.vmap(regime.train_inits, in_axes=(0, None)))
    batches = draw(jnp.arange(300), regime.pool)["fc"]["bias"][..., 0]  # (300, n_nets)
    ids = np.asarray(batches).astype(int)
    assert ids.shape == (300, n_nets)
    assert set(ids.ravel()) == set(range(size - held_out))  # every training member, nothing else
    assert all(len(set(row)) == n_nets for row in ids)  # distinct within an iteration
    assert len({tuple(row) for row in ids}) > 100  # a fresh draw per iteration
    np.testing.assert_array_equal(member_ids(regime.eval_inits(held_out)), range(size - held_out, size))
    np.testing.assert_array_equal(member_ids(regime.eval_inits(2)), [6, 7])
    # deterministic in the key: eagerly, with the regime's own pool, the same draws
    again = make_regime("random_pretrained", jax.random.PRNGKey(0), None, None, n_nets=n_nets,
                        pool=labelled_pool(size, {"fc": (3, 2)}), pool_eval_nets=held_out)
    np.testing.assert_array_equal(member_ids(again.train_inits(7)), ids[7])
    with pytest.raises(ConfigError, match="pool_eval_nets=3"):
        regime.eval_inits(4)


def test_fixed_pretrained_is_member_zero():
    pool = labelled_pool(4, {"fc": (3, 2)})
    regime = make_regime("fixed_pretrained", jax.random.PRNGKey(0), None, None, pool=pool)
    np.testing.assert_array_equal(member_ids(jax.jit(regime.train_inits)(jnp.asarray(5))), [0])
    np.testing.assert_array_equal(member_ids(regime.eval_inits(3)), [0, 0, 0])
    np.testing.assert_array_equal(np.asarray(regime.fixed_params["fc"]["kernel"]), 0.0)


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(name="random_pretrained", n_nets=5, pool_eval_nets=2), "n_nets=5"),
    (dict(name="random_pretrained", n_nets=1, pool_eval_nets=0), "pool_eval_nets >= 1"),
    (dict(name="fixed_pretrained", n_nets=2), "--init_regime=random_pretrained"),
    (dict(name="random_pretrained", n_nets=1, pool_eval_nets=1, pool=None), "needs a pool"),
])
def test_pretrained_regime_errors(kwargs, fragment):
    kwargs = {"pool": labelled_pool(6, {"fc": (3, 2)}), **kwargs}
    with pytest.raises(ConfigError, match=fragment.replace("+", r"\+")):
        make_regime(kwargs.pop("name"), jax.random.PRNGKey(0), None, None, **kwargs)


@pytest.mark.parametrize("name, n_nets", [("fixed_pretrained", 1), ("random_pretrained", 2)])
def test_pretrained_meta_gradient_matches_finite_differences(name, n_nets):
    """The meta-gradient from pool members drawn by the regime, against float64 central differences."""
    with jax.enable_x64():
        learned, labels, pool, real_x, real_y, apply_fn = _problem(
            make_tiny_mlp(hidden=5, num_classes=K), n_nets=5, seed=11)
        regime = make_regime(name, jax.random.PRNGKey(0), None, None, n_nets=n_nets, pool=pool,
                             pool_eval_nets=2)
        inits = jax.jit(regime.train_inits)(jnp.asarray(3), regime.pool)
        leaf = np.asarray(jax.tree.leaves(inits)[0])
        assert leaf.dtype == np.float64 and leaf.shape[0] == n_nets
        members = np.asarray(jax.tree.leaves(pool)[0])
        drawn = [int(np.flatnonzero([np.array_equal(m, x) for m in members])[0]) for x in leaf]
        assert all(i < 3 for i in drawn) and (drawn == [0] or len(set(drawn)) == n_nets), drawn
        check = _checker(labels, inits, real_x, real_y, apply_fn, remat=False)
        rng = np.random.default_rng(5)
        zeros_img, zeros_eta = jnp.zeros_like(learned.images), jnp.zeros_like(learned.raw_step_sizes)
        directions = [dd_jax.Learned(_unit(rng.normal(size=learned.images.shape)), zeros_eta),
                      dd_jax.Learned(zeros_img, _unit(rng.normal(size=learned.raw_step_sizes.shape))),
                      dd_jax.Learned(_unit(rng.normal(size=learned.images.shape)),
                                     _unit(rng.normal(size=learned.raw_step_sizes.shape)))]
        for t in range(STEPS * EPOCHS):
            directions.append(dd_jax.Learned(zeros_img, jnp.asarray(np.eye(STEPS * EPOCHS)[t])))
        for v in directions:
            grad, analytic, numeric = check(learned, v)
            assert_matches_finite_difference(analytic, numeric, RTOL)
        assert bool(jnp.all(jnp.abs(grad.raw_step_sizes) > 0))


# --------------------------------------------------------------------------- pool files


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def mlp():
    return make_tiny_mlp(hidden=8)


@pytest.fixture(scope="module")
def mlp_pool(digits, mlp, tmp_path_factory):
    """(config, path) of a 6-network tiny-MLP pool trained briefly on digits."""
    config = default_config()
    config.update(dict(dataset="digits", model="tiny_mlp", pool_size=6, pool_epochs=2,
                       pool_batch_size=50))
    params, losses = train_pool(digits, mlp, config, progress=False)
    path = tmp_path_factory.mktemp("pool") / "pool.npz"
    save_pool(path, params, {"dataset": "digits", "model": "tiny_mlp", "num_classes": 10,
                             "image_shape": [28, 28, 1]})
    return config, path, params, losses


def test_train_pool(mlp_pool, digits, mlp):
    config, _, params, losses = mlp_pool
    kernel = np.asarray(params["fc1"]["kernel"])
    assert kernel.shape == (6, 28 * 28, 8) and losses.shape == (2, 6)
    assert not np.allclose(kernel[0], kernel[1])  # independent inits and batch orders
    assert np.all(losses[1] < losses[0])  # every network learns
    acc = dd_jax.evaluation.Evaluator(as_model(mlp).apply, 1, digits.test_x, digits.test_y).untrained(params)
    assert np.all(acc > 0.6), acc
    # same seed, same pool, bit for bit
    again, _ = train_pool(digits, mlp, config, progress=False)
    assert pool_fingerprint(again) == pool_fingerprint(params)


def test_pool_round_trip_is_bitwise(tmp_path):
    rng = np.random.default_rng(0)
    params = {"conv": {"kernel": rng.normal(size=(3, 5, 5, 1, 2)).astype(np.float32),
                       "bias": rng.normal(size=(3, 2)).astype(np.float32)},
              "fc": {"kernel": rng.normal(size=(3, 7, 10)), "bias": np.zeros((3, 10), np.float32)}}
    meta = {"dataset": "digits", "model": "lenet", "num_classes": 10, "image_shape": [28, 28, 1],
            "test_accs": [0.5, 0.25, 1 / 3]}
    written = save_pool(tmp_path / "p.npz", params, meta)
    loaded, loaded_meta = load_pool(tmp_path / "p.npz")
    assert jax.tree.structure(loaded) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    assert loaded_meta == written and {**meta, **loaded_meta} == loaded_meta
    assert loaded_meta["pool_size"] == 3 and loaded_meta["fingerprint"] == pool_fingerprint(params)


def _resave(src: Path, dst: Path, change) -> Path:
    with np.load(src) as f:
        arrays = {k: f[k] for k in f.files}
    change(arrays)
    np.savez(dst, **arrays)
    return dst


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _set_meta(**fields):
    def change(arrays):
        arrays["meta"] = np.array(json.dumps({**json.loads(str(arrays["meta"])), **fields}))
    return change


def _bump_a_weight(arrays):
    arrays["params/fc1/kernel"] = arrays["params/fc1/kernel"].copy()
    arrays["params/fc1/kernel"][0, 0, 0] += 1e-3


@pytest.mark.parametrize("make, fragment", [
    (lambda src, d: d / "absent.npz", "no network pool at"),
    (lambda src, d: _write(d / "text.npz", b"not a pool"), "not a readable dd_jax pool"),
    (lambda src, d: _resave(src, d / "x.npz", lambda a: a.pop("meta")), "not a dd_jax pool file"),
    (lambda src, d: _resave(src, d / "x.npz", _set_meta(version=99)), "version 99"),
    (lambda src, d: _resave(src, d / "x.npz", _bump_a_weight), "corrupted"),
], ids=["missing", "not-npz", "no-meta", "version", "changed-weight"])
def test_bad_pool_files_raise_data_error(mlp_pool, tmp_path, make, fragment):
    path = make(mlp_pool[1], tmp_path)
    with pytest.raises(DataError, match=fragment) as e:
        load_pool(path)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("change, fragment", [
    (dict(model="lenet"), "holds 'lenet' networks"),
    (dict(num_classes=3), "trained for 3 classes"),
    (dict(image_shape=[32, 32, 1]), "(32, 32, 1)"),
    (dict(source="mnist"), "trained on 'digits', not 'mnist'"),
])
def test_pool_that_does_not_fit_the_run(mlp_pool, digits, mlp, change, fragment):
    params, meta = load_pool(mlp_pool[1])
    source = change.pop("source", "")
    pool = Pool(params, {**meta, **change}, "p.npz")
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        check_pool(pool, as_model(mlp), digits, "tiny_mlp", source)


def test_pool_of_another_architecture(mlp_pool, digits):
    params, meta = load_pool(mlp_pool[1])
    with pytest.raises(ConfigError, match="do not fit the model"):
        check_pool(Pool(params, meta, "p.npz"), as_model(make_tiny_mlp(hidden=5)), digits)


def test_pool_path_default_and_missing_pool(digits, mlp, tmp_path, monkeypatch):
    config = default_config()
    config.update(dict(init_regime="random_pretrained", pool_source="usps"))
    assert pool_path(config) == Path("runs/usps_pool/pool.npz")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"create it with `python -m experiments.run usps_pool`"):
        pool_for_config(config, mlp, digits)
    config.pool_source = ""
    with pytest.raises(ConfigError, match="--pool_path"):
        pool_path(config)


# --------------------------------------------------------------------------- distil and evaluate


def _distill(mlp_pool, digits, mlp, **overrides):
    config, path = mlp_pool[0].copy_and_resolve_references(), mlp_pool[1]
    config.update(dict(pool_path=str(path), steps=1, iterations=3, real_batch_size=64, n_nets=2,
                       pool_eval_nets=2, n_eval_nets=2, n_eval_nets_during=2, eval_every=100))
    config.update(overrides)
    return dd_jax.distill(digits, mlp, config, progress=False)


def test_random_pretrained_distil_save_and_evaluate(mlp_pool, digits, mlp, tmp_path):
    d = _distill(mlp_pool, digits, mlp, init_regime="random_pretrained")
    params = mlp_pool[2]
    assert d.init_params is None
    assert d.pool == {"path": str(mlp_pool[1]), "fingerprint": pool_fingerprint(params),
                      "dataset": "digits", "pool_size": 6, "eval_nets": 2}
    dd_jax.save_distilled(tmp_path / "d.npz", d)
    loaded = dd_jax.load_distilled(tmp_path / "d.npz")
    assert loaded.pool == d.pool and loaded.init_regime == "random_pretrained"
    result = dd_jax.evaluate(loaded, digits, mlp)  # default: every held-out member
    held_out = jax.tree.map(lambda a: jnp.asarray(a[4:6]), params)
    explicit = dd_jax.evaluate(loaded, digits, mlp, init_params=held_out)
    assert result["n_nets"] == 2 and result["accuracies"] == explicit["accuracies"]
    assert result["untrained"]["accuracies"] == explicit["untrained"]["accuracies"]
    assert result["mean"] != result["untrained"]["mean"]
    with pytest.raises(ConfigError, match="pool_eval_nets=2"):
        dd_jax.evaluate(loaded, digits, mlp, n_nets=3)

    # the pool it was made for, and only that one
    other = dict(params, fc2={"kernel": params["fc2"]["kernel"] * 2, "bias": params["fc2"]["bias"]})
    save_pool(mlp_pool[1].with_name("other.npz"), other, load_pool(mlp_pool[1])[1])
    loaded.pool = {**loaded.pool, "path": str(mlp_pool[1].with_name("other.npz"))}
    with pytest.raises(DataError, match="not the one this data was distilled for"):
        dd_jax.evaluate(loaded, digits, mlp)
    loaded.pool = {**loaded.pool, "path": str(tmp_path / "moved.npz")}
    with pytest.raises(DataError, match="put the pool file there"):
        dd_jax.evaluate(loaded, digits, mlp)


def test_fixed_pretrained_distils_for_member_zero(mlp_pool, digits, mlp, tmp_path):
    d = _distill(mlp_pool, digits, mlp, init_regime="fixed_pretrained", n_nets=1)
    for a, b in zip(jax.tree.leaves(d.init_params), jax.tree.leaves(mlp_pool[2])):
        assert np.asarray(a).tobytes() == np.asarray(b[0]).tobytes()
    assert d.pool["eval_nets"] == 0
    dd_jax.save_distilled(tmp_path / "d.npz", d)
    loaded = dd_jax.load_distilled(tmp_path / "d.npz")
    assert loaded.pool == d.pool
    assert dd_jax.evaluate(loaded, digits, mlp)["accuracies"] == dd_jax.evaluate(d, digits, mlp)["accuracies"]


# --------------------------------------------------------------------------- loaders


def _libsvm_lines(rng, n: int) -> tuple[str, np.ndarray, np.ndarray]:
    """n USPS-format lines (labels 1..10, 256 values in [-1, 1], some zeros omitted as LIBSVM does)."""
    labels = rng.integers(1, 11, n)
    values = rng.uniform(-1, 1, (n, 256)).round(6)
    values[:, ::7] = 0.0
    lines = [f"{l} " + " ".join(f"{j + 1}:{v:g}" for j, v in enumerate(row) if v != 0.0)
             for l, row in zip(labels, values)]
    return "\n".join(lines) + "\n", labels, values


def test_parse_libsvm():
    text, labels, values = _libsvm_lines(np.random.default_rng(0), 5)
    x, y = parse_libsvm(text, 256)
    np.testing.assert_array_equal(y, labels)
    np.testing.assert_allclose(x, values, atol=1e-6)
    with pytest.raises(DataError, match="line 2 is malformed"):
        parse_libsvm("1 1:0.5\n2 3-0.1\n", 256)
    with pytest.raises(DataError, match="malformed"):
        parse_libsvm("1 300:0.5\n", 256)


def test_usps_loader(tmp_path):
    rng = np.random.default_rng(1)
    train_text, train_labels, _ = _libsvm_lines(rng, 6)
    test_text, test_labels, _ = _libsvm_lines(rng, 4)
    # a last test image: all ink (1.0) -> pixels 1 everywhere, also after resizing
    test_text += "3 " + " ".join(f"{j}:1" for j in range(1, 257)) + "\n"
    (tmp_path / "usps.bz2").write_bytes(bz2.compress(train_text.encode()))
    (tmp_path / "usps.t.bz2").write_bytes(bz2.compress(test_text.encode()))
    d = load_dataset("usps", str(tmp_path))
    assert d.name == "usps" and d.num_classes == 10
    assert d.train_x.shape == (6, 28, 28, 1) and d.test_x.shape == (5, 28, 28, 1)
    assert d.train_x.dtype == np.float32 and d.train_y.dtype == np.int32
    np.testing.assert_array_equal(d.train_y, train_labels - 1)  # labels 1..10 are digits 0..9
    np.testing.assert_array_equal(d.test_y, [*(test_labels - 1), 2])
    assert (d.mean, d.std) == NORMALISATION["mnist"]
    pixels = d.denormalise(d.test_x)
    np.testing.assert_allclose(pixels[-1], 1.0, atol=1e-5)
    assert pixels.min() >= -1e-6 and pixels.max() <= 1 + 1e-6


def test_usps_missing_or_corrupted(tmp_path):
    with pytest.raises(DataError, match=r"usps\.bz2 is missing: download usps\.bz2 and usps\.t\.bz2") as e:
        load_dataset("usps", str(tmp_path))
    assert str(tmp_path) in str(e.value) and "libsvmtools" in str(e.value)
    (tmp_path / "usps.bz2").write_bytes(b"not bz2 at all")
    with pytest.raises(DataError, match="not a readable bz2"):
        load_dataset("usps", str(tmp_path))


def test_svhn_loader_on_tfds_mock_data():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=12):
        d = load_dataset("svhn")
    assert d.name == "svhn" and d.num_classes == 10
    assert d.train_x.shape == (12, 28, 28, 1) and d.test_x.shape == (12, 28, 28, 1)
    assert set(np.unique(d.train_y)) <= set(range(10))
    np.testing.assert_allclose(d.train_x.mean(), 0.0, atol=1e-4)  # its own grayscale statistics
    np.testing.assert_allclose(d.train_x.std(), 1.0, atol=1e-3)


def test_svhn_grayscale(monkeypatch):
    """Flat colours come out as their luma (0.299 R + 0.587 G + 0.114 B), at 28x28."""
    from dd_jax import tfds_data

    colours = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255]], np.uint8)
    images = np.broadcast_to(colours[:, None, None, :], (4, 32, 32, 3)).copy()
    labels = np.arange(4)
    monkeypatch.setattr(tfds_data, "_tfds_arrays",
                        lambda name, data_dir: (images, labels, images, labels, 10))
    d = tfds_data.load_svhn()
    np.testing.assert_allclose(d.denormalise(d.test_x)[:, 14, 14, 0], [0.299, 0.587, 0.114, 1.0], atol=1e-5)


def test_svhn_not_prepared(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(DataError, match="'svhn_cropped' is not prepared in .*"
                       "python -m experiments.prepare_data svhn"):
        load_dataset("svhn", str(tmp_path))


# --------------------------------------------------------------------------- CLI end to end

POOL_ARGS = ["digits_pool", "--pool_size=4", "--pool_epochs=1", "--train_subset=640", "--quiet"]
ADAPT_ARGS = ["digits_to_mnist", "--steps=1", "--n_nets=2", "--pool_eval_nets=2", "--n_eval_nets=2",
              "--n_eval_nets_during=2", "--iterations=3", "--real_batch_size=64", "--train_subset=1000",
              "--test_subset=300", "--eval_every=2", "--quiet"]


@pytest.fixture(scope="module")
def adaptation(tmp_path_factory):
    """A tiny digits pool, then MNIST distilled from it, in a fresh working directory with the
    default paths (runs/digits_pool/pool.npz, runs/digits_to_mnist/)."""
    root, old = tmp_path_factory.mktemp("adapt"), os.getcwd()
    os.chdir(root)
    try:
        pool_run = call_main(POOL_ARGS)
        adapt_run = call_main(ADAPT_ARGS)
    finally:
        os.chdir(old)
    return root, pool_run, adapt_run


@pytest.mark.slow
def test_pool_run_outputs(adaptation):
    root, (rc, out, err), _ = adaptation
    assert rc == 0, err
    workdir = root / "runs" / "digits_pool"
    assert {p.name for p in workdir.iterdir()} == {"config.json", "pool.npz", "results.json"}
    results = json.loads((workdir / "results.json").read_text())
    params, meta = load_pool(workdir / "pool.npz")
    assert meta["dataset"] == "digits" and meta["model"] == "lenet" and meta["pool_size"] == 4
    assert meta["image_shape"] == [28, 28, 1] and meta["train"]["pool_epochs"] == 1
    assert meta["train_examples"] == 640 and len(meta["test_accs"]) == 4
    assert results["test_accs"] == meta["test_accs"] and results["eval_nets"] == 4
    assert results["test_acc"] == pytest.approx(np.mean(meta["test_accs"]))
    assert results["test_acc"] > 0.3  # (1 epoch on 640 images; chance is 0.1)
    for key in ("experiment", "dataset", "init_regime", "images", "test_acc_std", "distill_seconds"):
        assert key in results
    assert "4 networks trained on digits" in out and "runs/digits_pool/pool.npz" in out


@pytest.mark.slow
def test_adaptation_run_rows_and_reevaluation(adaptation):
    root, _, (rc, out, err) = adaptation
    assert rc == 0, err
    workdir = root / "runs" / "digits_to_mnist"
    results = json.loads((workdir / "results.json").read_text())
    _, meta = load_pool(root / "runs" / "digits_pool" / "pool.npz")
    assert results["init_regime"] == "random_pretrained" and results["dataset"] == "mnist"
    assert results["pool_source"] == "digits"
    assert results["pool"] == {"path": "runs/digits_pool/pool.npz", "fingerprint": meta["fingerprint"],
                               "dataset": "digits", "pool_size": 4, "eval_nets": 2}
    before, after = results["rows"]
    assert before["method"] == "before" and after["method"] == "after"
    assert after["test_acc"] == results["test_acc"] and before["test_acc"] == results["untrained_acc"]
    assert before["eval_nets"] == after["eval_nets"] == 2
    for row in results["rows"]:
        assert {"test_acc", "test_acc_std", "eval_nets", "seconds"} <= set(row)
    # re-evaluating the saved distilled data (from the run's directory, where the pool path is valid)
    distilled = dd_jax.load_distilled(workdir / "distilled.npz")
    assert distilled.pool == results["pool"]
    dataset = load_dataset("mnist").subset(1000, 300)
    old = os.getcwd()
    os.chdir(root)
    try:
        again = dd_jax.evaluate(distilled, dataset, get_model("lenet", 10))
    finally:
        os.chdir(old)
    assert again["accuracies"] == results["test_accs"]
    assert again["untrained"]["accuracies"] == before["test_accs"]


@pytest.mark.slow  # it needs the adaptation run
@pytest.mark.parametrize("args, fragments", [
    (["mnist_to_digits"], ["no network pool at runs/mnist_pool/pool.npz",
                           "python -m experiments.run mnist_pool"]),
    (["mnist_to_digits", "--pool_path=runs/digits_pool/pool.npz"], ["trained on 'digits', not 'mnist'"]),
    (["mnist_fixed_init", "--init_regime=random_pretrained", "--n_nets=2", "--n_eval_nets=2",
      "--n_eval_nets_during=2"], ["needs a network pool", "--pool_path"]),
    (["digits_to_mnist", "--n_eval_nets=20"], ["n_eval_nets=20", "pool_eval_nets=10"]),
    (["digits_to_mnist", "--pool_eval_nets=3", "--n_eval_nets=2", "--n_eval_nets_during=2"],
     ["pool of 4 networks", "n_nets=4"]),
    (["digits_pool", "--pool_optimizer=lbfgs"], ["unknown pool_optimizer 'lbfgs'"]),
    (["digits_pool", "--resume"], ["nothing can be resumed"]),
    (["digits_pool", "--kind=bake"], ["unknown kind 'bake'"]),
])
def test_bad_pretrained_input_is_a_one_line_error(adaptation, tmp_path, args, fragments):
    root = adaptation[0]
    old = os.getcwd()
    os.chdir(root)
    try:
        rc, _, err = call_main([*args, f"--output_dir={tmp_path / 'run'}", "--quiet"])
    finally:
        os.chdir(old)
    assert_one_line_error(rc, err, *fragments)


def test_adaptation_experiments_point_at_their_source_pool():
    from dd_jax.pretrain import validate_pool_config
    from dd_jax.validation import validate_config
    from experiments.configs import EXPERIMENTS, PRETRAINED_EXPERIMENTS

    for fn in PRETRAINED_EXPERIMENTS:
        config = fn()
        if config.kind == "pretrain_pool":
            validate_pool_config(config)
            assert fn.__name__ == f"{config.dataset}_pool"
            continue
        validate_config(config)
        source, target = fn.__name__.split("_to_")
        assert (config.pool_source, config.dataset) == (source, target)
        assert (config.steps, config.epochs, config.images_per_class) == (10, 3, 1)  # 100 images
        assert config.init_regime == "random_pretrained"
        assert pool_path(config) == Path("runs") / f"{source}_pool" / "pool.npz"
        assert EXPERIMENTS[f"{source}_pool"]().dataset == source
        assert EXPERIMENTS[f"{source}_pool"]().pool_size - config.pool_eval_nets >= config.n_nets
