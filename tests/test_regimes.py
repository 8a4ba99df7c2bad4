"""Initialisation regimes (fixed / random) and the named weight distributions."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import make_tiny_mlp
from dd_jax.errors import ConfigError
from dd_jax.models import Model, as_model
from dd_jax.regimes import INIT_DISTRIBUTIONS, make_regime, sample_init, sample_inits

X1 = jnp.zeros((1, 4, 4, 1))


def shapes_model(**kernels) -> Model:
    """A Model whose init gives {'name': {'kernel': zeros(shape), 'bias': ones(shape[-1])}}."""

    def init(key, x):
        return {name: {"kernel": jnp.zeros(shape), "bias": jnp.ones(shape[-1:])}
                for name, shape in kernels.items()}

    return Model(init, lambda p, x: x)


@pytest.fixture(scope="module")
def mlp():
    """A small model for the regime tests: trivial init (so jit compilations stay cheap)."""
    return shapes_model(fc1=(16, 6), fc2=(6, 10))


@pytest.fixture(scope="module")
def flax_mlp():
    return as_model(make_tiny_mlp())


def _evals(regime, n):
    return jax.jit(regime.eval_inits, static_argnums=0)(n)


def _leaves_equal(a, b) -> bool:
    return all(np.array_equal(np.asarray(x), np.asarray(y))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _net(tree, i):
    return jax.tree.map(lambda a: a[i], tree)


# --------------------------------------------------------------------------- distributions

DENSE, CONV = (400, 120), (3, 3, 64, 32)  # conv HWIO: PyTorch fan_in = 3*3*64, fan_out = 3*3*32


def _fans(shape):
    receptive = int(np.prod(shape[:-2]))
    return shape[-2] * receptive, shape[-1] * receptive


EXPECTED_STD = {
    "xavier_normal": lambda fi, fo: np.sqrt(2.0 / (fi + fo)),
    "xavier_uniform": lambda fi, fo: np.sqrt(2.0 / (fi + fo)),
    "kaiming_normal": lambda fi, fo: np.sqrt(2.0 / fi),
    "kaiming_uniform": lambda fi, fo: np.sqrt(2.0 / fi),
    "lecun_normal": lambda fi, fo: np.sqrt(1.0 / fi),
}


@pytest.fixture(scope="module")
def big_samples():
    """{(dist, gain): params} for a large dense and a large conv kernel, drawn under jit."""
    model = shapes_model(dense=DENSE, conv=CONV)
    cases = [(d, 1.0) for d in INIT_DISTRIBUTIONS] + [("xavier_normal", 2.0)]
    # one compilation for all of them
    draw = jax.jit(lambda key: [sample_init(key, model, X1, d, g) for d, g in cases])
    return dict(zip(cases, draw(jax.random.PRNGKey(3))))


@pytest.mark.parametrize("layer", ["dense", "conv"])
@pytest.mark.parametrize("dist, gain", [(d, 1.0) for d in EXPECTED_STD] + [("xavier_normal", 2.0)])
def test_weight_std_follows_pytorch_fans(big_samples, dist, gain, layer):
    w = np.asarray(big_samples[(dist, gain)][layer]["kernel"], np.float64)
    shape = DENSE if layer == "dense" else CONV
    assert w.shape == shape
    fan_in, fan_out = _fans(shape)
    expected = gain * EXPECTED_STD[dist](fan_in, fan_out)
    # >= 18k samples: the std estimate's relative error is ~0.5%; 3% is > 5 sigma
    assert abs(w.std() / expected - 1) < 0.03, (w.std(), expected)
    assert abs(w.mean()) < 0.05 * expected
    if dist.endswith("uniform"):
        bound = np.sqrt(3.0) * expected
        assert np.abs(w).max() <= bound * (1 + 1e-6)
        assert np.abs(w).max() > 0.95 * bound
    if dist == "lecun_normal":  # truncated at 2 sigma of the untruncated normal
        assert np.abs(w).max() < 2.0 * expected / 0.87962566 * (1 + 1e-5)


def test_xavier_normal_is_not_the_jax_default_fan_convention(big_samples):
    """Regression guard for the PyTorch convention: counting only I and O of a conv kernel
    would give std sqrt(2/(64+32)) = 0.144 instead of sqrt(2/(576+288)) = 0.048."""
    w = np.asarray(big_samples[("xavier_normal", 1.0)]["conv"]["kernel"])
    assert abs(w.std() - np.sqrt(2.0 / (576 + 288))) < 0.003


@pytest.mark.parametrize("layer", ["dense", "conv"])
def test_orthogonal_columns_are_orthonormal(big_samples, layer):
    w = np.asarray(big_samples[("orthogonal", 1.0)][layer]["kernel"], np.float64)
    flat = w.reshape(-1, w.shape[-1])  # PyTorch flattens all but the output dimension
    np.testing.assert_allclose(flat.T @ flat, np.eye(w.shape[-1]), atol=1e-4)
    # and the eager path draws the same
    eager = sample_init(jax.random.PRNGKey(3), shapes_model(dense=DENSE, conv=CONV), X1, "orthogonal")
    np.testing.assert_allclose(np.asarray(eager[layer]["kernel"]), w, atol=1e-5)


@pytest.mark.parametrize("dist", [*INIT_DISTRIBUTIONS, "model"])
def test_biases_zero_and_tree_kept(big_samples, dist):
    model = shapes_model(dense=DENSE, conv=CONV)
    template = model.init(None, X1)  # biases are ones here: they really must be replaced
    params = (sample_init(jax.random.PRNGKey(0), model, X1, "model") if dist == "model"
              else big_samples[(dist, 1.0)])
    assert jax.tree.structure(params) == jax.tree.structure(template)
    for p, t in zip(jax.tree.leaves(params), jax.tree.leaves(template)):
        assert p.shape == t.shape and p.dtype == t.dtype
    if dist == "model":  # the model's own initialisers: unchanged
        assert _leaves_equal(params, template)
        return
    for name in ("dense", "conv"):
        np.testing.assert_array_equal(np.asarray(params[name]["bias"]), 0.0)
        k = np.asarray(params[name]["kernel"])
        assert np.all(np.isfinite(k)) and np.std(k) > 0


def test_sample_init_deterministic_per_key():
    model = shapes_model(dense=(6, 5))
    draw = jax.jit(lambda k: sample_init(k, model, X1))
    a, b, c = draw(jax.random.PRNGKey(0)), draw(jax.random.PRNGKey(0)), draw(jax.random.PRNGKey(1))
    assert float(jnp.std(a["dense"]["kernel"])) > 0
    assert _leaves_equal(a, b)
    assert not np.allclose(np.asarray(a["dense"]["kernel"]), np.asarray(c["dense"]["kernel"]))


def _random_regime_inits(model, dists, n_nets=2):
    regimes = [make_regime("random", jax.random.PRNGKey(0), model, X1, n_nets=n_nets, dist=d)
               for d in dists]
    # as outer_step.make_meta_step calls it: inside jit, with a traced iteration counter
    return jax.jit(lambda it: [r.train_inits(it) for r in regimes])(jnp.asarray(3, jnp.int32))


def test_every_distribution_works_in_random_regime_under_jit(mlp):
    """The random regime's train_inits runs inside the jitted meta-step, for every name."""
    dists = [*INIT_DISTRIBUTIONS, "model"]
    for dist, inits in zip(dists, _random_regime_inits(mlp, dists)):
        assert jax.tree.structure(inits) == jax.tree.structure(mlp.init(None, X1)), dist
        k = np.asarray(inits["fc1"]["kernel"])
        assert k.shape == (2, 16, 6) and np.all(np.isfinite(k)), dist
        if dist != "model":  # (this model's own init is all zeros)
            assert not np.allclose(k[0], k[1]), dist
            np.testing.assert_array_equal(np.asarray(inits["fc1"]["bias"]), 0.0)
        if dist == "orthogonal":
            np.testing.assert_allclose(k[0].T @ k[0], np.eye(6), atol=1e-5)


def test_random_regime_with_flax_module(flax_mlp):
    regime = make_regime("random", jax.random.PRNGKey(0), flax_mlp, X1, n_nets=2)

    @jax.jit
    def logits(it):
        return jax.vmap(lambda p: flax_mlp.apply(p, jnp.ones((3, 4, 4, 1))))(regime.train_inits(it))

    out = logits(jnp.asarray(3, jnp.int32))
    assert out.shape == (2, 3, 10) and bool(jnp.all(jnp.isfinite(out)))
    assert not np.allclose(np.asarray(out[0]), np.asarray(out[1]))


def test_unknown_distribution():
    with pytest.raises(ConfigError, match="unknown init_dist 'glorot'") as e:
        sample_init(jax.random.PRNGKey(0), shapes_model(dense=(3, 2)), X1, "glorot")
    for name in INIT_DISTRIBUTIONS:
        assert name in str(e.value)
    with pytest.raises(ConfigError):
        make_regime("fixed", jax.random.PRNGKey(0), shapes_model(dense=(3, 2)), X1, dist="glorot")


# --------------------------------------------------------------------------- regimes


def test_fixed_regime_same_params_everywhere(mlp):
    key = jax.random.PRNGKey(0)
    regime = make_regime("fixed", key, mlp, X1)
    assert regime.name == "fixed" and regime.fixed_params is not None
    theta0 = regime.fixed_params
    train = jax.jit(regime.train_inits)  # as the meta-step calls it
    for it in (0, 1, 7):
        inits = train(jnp.asarray(it, jnp.int32))
        assert jax.tree.leaves(inits)[0].shape[0] == 1
        assert _leaves_equal(_net(inits, 0), theta0)
    evals = _evals(regime, 3)
    assert jax.tree.leaves(evals)[0].shape[0] == 3
    for i in range(3):
        assert _leaves_equal(_net(evals, i), theta0)
    # deterministic in the key; another key gives another theta0
    assert _leaves_equal(make_regime("fixed", key, mlp, X1).fixed_params, theta0)
    other = make_regime("fixed", jax.random.PRNGKey(1), mlp, X1).fixed_params
    assert not _leaves_equal(other, theta0)
    # xavier weights, zero biases
    assert float(jnp.std(theta0["fc1"]["kernel"])) > 0
    np.testing.assert_array_equal(np.asarray(theta0["fc1"]["bias"]), 0.0)


def test_fixed_regime_with_flax_module(flax_mlp):
    regime = make_regime("fixed", jax.random.PRNGKey(0), flax_mlp, X1)
    theta0 = regime.fixed_params
    assert set(theta0) == {"fc1", "fc2"}
    assert theta0["fc1"]["kernel"].shape == (16, 6)
    np.testing.assert_array_equal(np.asarray(theta0["fc2"]["bias"]), 0.0)
    assert _leaves_equal(_net(regime.train_inits(0), 0), theta0)


def test_random_regime(mlp):
    key = jax.random.PRNGKey(0)
    regime = make_regime("random", key, mlp, X1, n_nets=3)
    again = make_regime("random", key, mlp, X1, n_nets=3)  # e.g. a resumed run
    other = make_regime("random", jax.random.PRNGKey(1), mlp, X1, n_nets=3)
    assert regime.name == "random" and regime.fixed_params is None

    @jax.jit  # one compilation; train_inits gets a traced counter, as in the meta-step
    def draws(its):
        return ([regime.train_inits(its[i]) for i in range(4)], again.train_inits(its[2]),
                other.train_inits(its[0]), regime.eval_inits(4), again.eval_inits(4))

    batches, again_2, other_0, evals, again_evals = draws(jnp.arange(4, dtype=jnp.int32))
    kernels = [np.asarray(b["fc1"]["kernel"]) for b in batches]
    for b, k in zip(batches, kernels):
        assert k.shape == (3, 16, 6)
        # the nets of one iteration differ from each other
        assert not np.allclose(k[0], k[1]) and not np.allclose(k[1], k[2])
        np.testing.assert_array_equal(np.asarray(b["fc1"]["bias"]), 0.0)
    # fresh draws every iteration
    for i in range(4):
        for j in range(i + 1, 4):
            assert not np.allclose(kernels[i], kernels[j])
    # deterministic: the same key draws the same inits; another key other ones
    assert _leaves_equal(again_2, batches[2])
    assert not np.allclose(np.asarray(other_0["fc1"]["kernel"]), kernels[0])
    # held-out evaluation nets: deterministic, and none equals any training net
    assert jax.tree.leaves(evals)[0].shape[0] == 4
    assert _leaves_equal(again_evals, evals)
    ek = np.asarray(evals["fc1"]["kernel"])
    assert not np.allclose(ek[0], ek[1])
    for tk in kernels:
        for e in ek:
            for t in tk:
                assert not np.allclose(e, t)
    # eagerly, with a Python int iteration, the same draws (up to float rounding)
    for a, b in zip(jax.tree.leaves(regime.train_inits(1)), jax.tree.leaves(batches[1])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_sample_inits_stacks_independent_draws(mlp):
    inits = jax.jit(lambda k: sample_inits(k, 3, mlp, X1, "xavier_normal", 1.0))(jax.random.PRNGKey(0))
    k = np.asarray(inits["fc1"]["kernel"])
    assert k.shape == (3, 16, 6)
    assert not np.allclose(k[0], k[1])
    np.testing.assert_array_equal(np.asarray(inits["fc1"]["bias"]), 0.0)


def test_unknown_regime(mlp):
    with pytest.raises(ConfigError, match="unknown init_regime 'sometimes'") as e:
        make_regime("sometimes", jax.random.PRNGKey(0), mlp, X1)
    assert "fixed" in str(e.value) and "random" in str(e.value)


@pytest.mark.parametrize("n_nets", [0, 2, 4])
def test_fixed_regime_needs_one_net(mlp, n_nets):
    with pytest.raises(ConfigError, match="n_nets must be 1") as e:
        make_regime("fixed", jax.random.PRNGKey(0), mlp, X1, n_nets=n_nets)
    assert "--init_regime=random" in str(e.value)
