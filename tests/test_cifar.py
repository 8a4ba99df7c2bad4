"""CIFAR-10: AlexCifarNet (its layers and both convolution paths), the tfds loader's
normalisation, the experiments' settings, and runs through the CLI on tfds mock data."""
from __future__ import annotations

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_cli import OUTPUTS, run_ok
from test_models import assert_same_outputs_and_grads

from dd_jax import data
from dd_jax.errors import ConfigError
from dd_jax.models import MODELS, AlexCifarNet, get_model, local_response_norm, max_pool_3x3_s2_p1
from experiments.configs import EXPERIMENTS

tfds = pytest.importorskip("tensorflow_datasets")

# --------------------------------------------------------------------------- the network


def test_alexcifarnet_parameters_and_output_shapes():
    x = jnp.zeros((2, 32, 32, 3))
    variables = jax.eval_shape(AlexCifarNet(num_classes=7).init, jax.random.PRNGKey(0), x)
    shapes = jax.tree.map(lambda s: s.shape, variables["params"])
    assert shapes == {
        "conv1": {"kernel": (5, 5, 3, 64), "bias": (64,)},
        "conv2": {"kernel": (5, 5, 64, 64), "bias": (64,)},
        "fc1": {"kernel": (8 * 8 * 64, 384), "bias": (384,)},  # 4096 features, as the authors'
        "fc2": {"kernel": (384, 192), "bias": (192,)},
        "fc3": {"kernel": (192, 7), "bias": (7,)},
    }
    out = jax.eval_shape(AlexCifarNet(num_classes=7).apply, variables, x)
    assert out.shape == (2, 7) and out.dtype == jnp.float32
    assert MODELS["alexcifarnet"] is AlexCifarNet
    m = get_model("alexcifarnet", 10, conv="xla")
    assert isinstance(m, AlexCifarNet) and m.conv == "xla" and m.num_classes == 10


@pytest.mark.parametrize("conv, batch", [("toeplitz", 3), ("native", 70)])
def test_alexcifarnet_equals_xla(conv, batch):
    """Outputs and parameter gradients of the fast convolution paths agree with flax's (same
    parameters): 3 images convolve from patches, 70 through the C++ kernels (dd_jax.native)."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(batch, 32, 32, 3)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, size=batch), jnp.int32)
    toeplitz, xla = AlexCifarNet(conv=conv), AlexCifarNet(conv="xla")
    s_toeplitz = jax.eval_shape(toeplitz.init, jax.random.PRNGKey(0), x[:1])["params"]
    s_xla = jax.eval_shape(xla.init, jax.random.PRNGKey(0), x[:1])["params"]
    assert jax.tree.map(lambda s: (s.shape, s.dtype), s_toeplitz) == \
        jax.tree.map(lambda s: (s.shape, s.dtype), s_xla)
    # weights ~ 1/sqrt(fan_in) so activations stay O(1) through the LRNs; random biases too
    params = jax.tree.map(
        lambda s: jnp.asarray(rng.normal(size=s.shape) / np.sqrt(np.prod(s.shape[:-1]))
                              if len(s.shape) > 1 else rng.normal(size=s.shape) * 0.1, jnp.float32),
        s_toeplitz)

    logits, xla_logits = assert_same_outputs_and_grads(toeplitz, xla, params, x, y, grad_rtol=1e-3)
    assert logits.shape == (batch, 10)
    assert float(jnp.std(xla_logits)) > 1e-2  # non-degenerate logits


def test_alexcifarnet_rejects_unknown_conv():
    with pytest.raises(ConfigError, match="AlexCifarNet conv must be"):
        jax.eval_shape(AlexCifarNet(conv="fft").init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))


def _lrn_reference(x: np.ndarray, size: int, alpha: float, beta: float, k: float) -> np.ndarray:
    """PyTorch's documented LocalResponseNorm, channel by channel (channels last): the window of
    channel c is c - size//2 .. c + (size-1)//2, the sum divided by size."""
    c_total = x.shape[-1]
    out = np.empty_like(x)
    for c in range(c_total):
        lo, hi = max(0, c - size // 2), min(c_total - 1, c + (size - 1) // 2)
        s = np.sum(x[..., lo : hi + 1] ** 2, axis=-1)
        out[..., c] = x[..., c] / (k + alpha / size * s) ** beta
    return out


@pytest.mark.parametrize("size, alpha, beta, k", [(4, 0.001 / 9.0, 0.75, 1.0), (3, 0.5, 0.75, 2.0),
                                                  (4, 2.0, 0.5, 1.0)])
def test_local_response_norm_matches_pytorch_formula(size, alpha, beta, k):
    x = np.random.default_rng(size).normal(size=(2, 3, 3, 7)).astype(np.float64) * 3
    ours = np.asarray(local_response_norm(jnp.asarray(x, jnp.float32), size, alpha, beta, k))
    np.testing.assert_allclose(ours, _lrn_reference(x, size, alpha, beta, k), rtol=1e-5, atol=1e-6)
    if alpha > 0.1:  # the large-alpha cases really normalise: output differs from input
        assert not np.allclose(ours, x, rtol=1e-2)


@pytest.mark.parametrize("h, w", [(32, 32), (9, 6)])
def test_max_pool_3x3_s2_p1_equals_flax_max_pool(h, w):
    rng = np.random.default_rng(h)
    x = jnp.asarray(rng.normal(size=(2, h, w, 3)), jnp.float32)
    ref_pool = lambda x: nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    out_shape = ref_pool(x).shape
    weights = jnp.asarray(rng.normal(size=out_shape), jnp.float32)

    @jax.jit
    def both(x):
        grad = lambda pool: jax.grad(lambda x: jnp.sum(weights * pool(x)))(x)
        return max_pool_3x3_s2_p1(x), ref_pool(x), grad(max_pool_3x3_s2_p1), grad(ref_pool)

    y1, y2, g1, g2 = both(x)
    assert y1.shape == (2, (h + 1) // 2, (w + 1) // 2, 3)
    np.testing.assert_array_equal(np.asarray(y1), np.asarray(y2))
    np.testing.assert_allclose(np.asarray(g1), np.asarray(g2), rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- data


def test_cifar10_loads_nhwc_normalised_with_the_authors_constants():
    with tfds.testing.mock_data(num_examples=16):
        d = data.load_dataset("cifar10")
        source = tfds.data_source("cifar10", split="train", download=False)
        raw = np.stack([ex["image"] for ex in source])
    assert d.train_x.shape == (16, 32, 32, 3) and d.test_x.shape == (16, 32, 32, 3)
    assert d.train_x.dtype == np.float32 and d.train_y.dtype == np.int32
    assert d.num_classes == 10 and d.image_shape == (32, 32, 3)
    assert d.mean == (0.4914, 0.4822, 0.4465) and d.std == (0.247, 0.243, 0.261)
    # per channel: the red, green, blue planes each with their own mean/std
    np.testing.assert_allclose(d.denormalise(d.train_x), raw / 255.0, atol=1e-6)
    np.testing.assert_allclose(d.train_x[..., 2], (raw[..., 2] / 255.0 - 0.4465) / 0.261, atol=1e-5)


# --------------------------------------------------------------------------- experiments


def test_cifar_and_poison_experiment_settings():
    fixed, random = EXPERIMENTS["cifar10_fixed_init"](), EXPERIMENTS["cifar10_random_init"]()
    for c in (fixed, random):
        assert (c.dataset, c.model, c.steps, c.epochs, c.images_per_class) == \
            ("cifar10", "alexcifarnet", 10, 3, 1)
        assert c.step_size_init == 0.001 and c.poison_class == -1
    assert (fixed.init_regime, fixed.n_nets) == ("fixed", 1)
    assert random.init_regime == "random" and random.n_nets > 1
    for name, dataset, model in (("mnist_poison", "mnist", "lenet"),
                                 ("cifar10_poison", "cifar10", "alexcifarnet")):
        c = EXPERIMENTS[name]()
        assert (c.dataset, c.model, c.poison_class, c.poison_target) == (dataset, model, 0, 1)
        assert c.init_regime == "random_pretrained" and c.pool_path.endswith("pool.npz")
        assert (c.steps, c.epochs) == (1, 1)


# Mock CIFAR-10 (random pixels, 24 images per split) through the real CLI, as small as it gets:
# compiling AlexCifarNet's meta-step is most of this test's time (cifar10_random_init differs
# from it only by the regime, which tests/test_cli.py runs end to end with LeNet).
CIFAR_TINY = ["--iterations=1", "--steps=2", "--epochs=1", "--real_batch_size=4",
              "--checkpoint_every=1", "--log_every=1", "--quiet"]


@pytest.mark.slow
def test_cifar10_fixed_init_runs_through_the_cli(tmp_path):
    name, out = "cifar10_fixed_init", tmp_path / "cifar10_fixed_init"
    with tfds.testing.mock_data(num_examples=24):
        stdout = run_ok([name, *CIFAR_TINY, f"--output_dir={out}"])
    assert f"{name}: test accuracy" in stdout
    assert OUTPUTS <= {p.name for p in out.iterdir()}
    r = json.loads((out / "results.json").read_text())
    assert (r["experiment"], r["dataset"], r["images"], r["steps"]) == (name, "cifar10", 20, 2)
    assert (r["init_regime"], r["test_examples"], r["eval_nets"]) == ("fixed", 24, 1)
    assert 0.0 <= r["test_acc"] <= 1.0 and np.isfinite(r["distill_seconds"])
    assert "rows" not in r and "poison_class" not in r  # not a poisoning run
    config = json.loads((out / "config.json").read_text())
    assert (config["model"], config["conv"], config["step_size_init"]) == \
        ("alexcifarnet", "native", 0.001)
    with np.load(out / "distilled.npz") as f:
        assert f["images"].shape == (2, 10, 32, 32, 3)
        assert str(f["model"]) == "alexcifarnet"
        assert f["init/conv2/kernel"].shape == (5, 5, 64, 64)  # theta_0 of the fixed regime
        np.testing.assert_allclose(f["mean"], [0.4914, 0.4822, 0.4465], rtol=1e-6)
        assert np.all(np.isfinite(f["images"]))
