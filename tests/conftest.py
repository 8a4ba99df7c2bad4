"""Shared fixtures for the dd_jax test suite.

Speed: the suite runs on a 2-core CPU and most of its time is XLA compilation. Every
compilation goes through a persistent XLA compilation cache, in the subprocesses the tests
start too (through JAX_COMPILATION_CACHE_DIR): within a run the same LeNet meta-step and
evaluator compile once, and a second run of the suite finds all of them compiled. The cache
lives where JAX_COMPILATION_CACHE_DIR names, else in pytest's cache directory
(`.pytest_cache/d/dd_jax_xla`, emptied by `pytest --cache-clear`), else (pytest's cache
provider off) in a temporary directory removed at the end. It changes no numerics: a cache
entry is keyed by the program, the jax version and the device.
"""
from __future__ import annotations

import gzip
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

_CACHE_DIR: str | None = None
_OWN_CACHE = False


def pytest_configure(config):
    global _CACHE_DIR, _OWN_CACHE
    import jax

    _CACHE_DIR = os.environ.get("JAX_COMPILATION_CACHE_DIR")
    if not _CACHE_DIR and getattr(config, "cache", None) is not None:
        _CACHE_DIR = str(config.cache.mkdir("dd_jax_xla"))
    if not _CACHE_DIR:
        _CACHE_DIR = tempfile.mkdtemp(prefix="dd_jax_test_xla_cache_")
        _OWN_CACHE = True
    jax.config.update("jax_compilation_cache_dir", _CACHE_DIR)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE_DIR  # the subprocess tests' cache too
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"


def pytest_unconfigure(config):
    if _OWN_CACHE and _CACHE_DIR:
        shutil.rmtree(_CACHE_DIR, ignore_errors=True)


# --------------------------------------------------------------------------- data


@pytest.fixture(scope="session")
def digits28():
    from dd_jax.data import load_digits

    return load_digits(size=28)


@pytest.fixture(scope="session")
def digits8():
    from dd_jax.data import load_digits

    return load_digits(size=8)


MNIST_GZ = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}


def _first_flip_position(raw: bytes, exc_type: type) -> int:
    """The first byte of the deflate payload whose inversion makes gzip.decompress raise
    exactly `exc_type` (deterministic for a given file)."""
    for pos in range(20, len(raw) - 8):
        b = bytearray(raw)
        b[pos] ^= 0xFF
        try:
            gzip.decompress(bytes(b))
        except Exception as e:  # noqa: BLE001
            if type(e) is exc_type:
                return pos
    raise AssertionError(f"no byte flip gives {exc_type}")


def corrupt_mnist_file(directory: Path, how: str, fname: str = MNIST_GZ["train_labels"]) -> None:
    """Damages one file of an MNIST copy in `directory`.

    how: 'regzip' (one byte of the uncompressed data changed, re-gzipped: a valid gzip whose
    contents fail the SHA-256), 'crc' / 'deflate' (one byte of the compressed stream flipped so
    that gzip reports a CRC mismatch / zlib an invalid deflate stream), 'truncate', 'missing'.
    """
    import zlib

    path = directory / fname
    raw = path.read_bytes()
    if how == "regzip":
        data = bytearray(gzip.decompress(raw))
        data[len(data) // 2] ^= 0x01
        path.write_bytes(gzip.compress(bytes(data), mtime=0))
    elif how in ("crc", "deflate"):
        exc = gzip.BadGzipFile if how == "crc" else zlib.error
        pos = _first_flip_position(raw, exc)
        b = bytearray(raw)
        b[pos] ^= 0xFF
        path.write_bytes(bytes(b))
    elif how == "truncate":
        path.write_bytes(raw[: len(raw) // 2])
    elif how == "missing":
        path.unlink()
    else:
        raise ValueError(how)


@pytest.fixture
def mnist_copy(tmp_path) -> Path:
    """A fresh copy of the packaged MNIST directory (about 11 MB) to damage."""
    from dd_jax import data

    dst = tmp_path / "mnist"
    shutil.copytree(data.MNIST_DIR, dst)
    return dst


# --------------------------------------------------------------------------- models


def make_tiny_mlp(hidden: int = 6, num_classes: int = 10):
    """A smooth (tanh) two-layer Flax MLP: smooth so finite differences are meaningful."""
    import flax.linen as nn

    class TinyMLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = x.reshape(x.shape[0], -1)
            x = nn.tanh(nn.Dense(hidden, name="fc1")(x))
            return nn.Dense(num_classes, name="fc2")(x)

    return TinyMLP()


def make_tiny_convnet(num_classes: int = 10, pool: bool = False, patches_up_to: int = 64,
                      native: bool = False, head: bool = False):
    """A tiny conv net: the library's Toeplitz conv (3x3, 2 features, optionally with its fused
    2x2 max pooling; batches of at most `patches_up_to` images from patches, larger ones through
    the C++ kernels with `native`), tanh, dense; with `head` the dense layer is a declared head
    (`dense_step.HeadModule`), which the outer loop trains with the fused step."""
    import flax.linen as nn

    from dd_jax.conv import ToeplitzConv

    class TinyConv(nn.Module):
        features_only: bool = False
        head_layers: tuple[str, ...] = ("fc",) if head else ()

        @nn.compact
        def __call__(self, x):
            x = nn.tanh(ToeplitzConv(2, (3, 3), 1, pool=pool, patches_up_to=patches_up_to,
                                     native=native, name="conv")(x))
            x = x.reshape(x.shape[0], -1)
            if self.features_only:
                return x
            return nn.Dense(num_classes, name="fc")(x)

    return TinyConv()


# --------------------------------------------------------------------------- finite differences


def finite_difference_check(f, h: float):
    """Jitted (x, v) -> (grad f(x), <grad f(x), v>, (f(x + h v) - f(x - h v)) / 2h) for a
    scalar function f of a pytree x and a direction v of x's structure."""
    import jax
    import jax.numpy as jnp

    @jax.jit
    def check(x, v):
        grad = jax.grad(f)(x)
        analytic = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grad), jax.tree.leaves(v)))
        plus = jax.tree.map(lambda a, d: a + h * d, x, v)
        minus = jax.tree.map(lambda a, d: a - h * d, x, v)
        return grad, analytic, (f(plus) - f(minus)) / (2 * h)

    return check


def assert_matches_finite_difference(analytic, numeric, rtol: float):
    """|analytic - numeric| < rtol * the larger of the two, along a direction where f moves."""
    analytic, numeric = float(analytic), float(numeric)
    assert abs(numeric) > 1e-6, "degenerate direction: the test would be vacuous"
    rel = abs(analytic - numeric) / max(abs(numeric), abs(analytic))
    assert rel < rtol, (analytic, numeric, rel)


@pytest.fixture(scope="session")
def tiny_mlp():
    return make_tiny_mlp()


# --------------------------------------------------------------------------- tiny runs (baselines, report)

TINY_DIGITS = ["--dataset=digits", "--test_subset=100", "--quiet"]
TINY_BASELINES = [*TINY_DIGITS, "--steps=2", "--score_holdout=300", "--optimised_candidates=3",
                  "--step_size_grid=0.03,0.3"]


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory) -> dict[str, Path]:
    """Three finished runs through the CLI: 'distill' (mnist_fixed_init, 2 iterations),
    'baselines' (mnist_baselines, every method, plus --distilled=<distill's npz>) and
    'baselines_random' (mnist_baselines_random, 2 methods, 2 training / 2 held-out inits)."""
    from experiments import run as cli

    root = tmp_path_factory.mktemp("tiny_runs")
    runs = {name: root / name for name in ("distill", "baselines", "baselines_random")}
    argvs = {
        "distill": ["mnist_fixed_init", *TINY_DIGITS, "--iterations=2", "--real_batch_size=64",
                    "--val_size=0"],
        "baselines": ["mnist_baselines", *TINY_BASELINES,
                      f"--distilled={runs['distill'] / 'distilled.npz'}"],
        "baselines_random": ["mnist_baselines_random", *TINY_BASELINES, "--n_nets=2",
                             "--n_eval_nets=2", "--baselines=random_real,mean"],
    }
    for name, argv in argvs.items():
        assert cli.main([*argv, f"--output_dir={runs[name]}"]) == 0, name
    return runs


class Killed(BaseException):
    """What `interrupt_meta_step(how="kill")` raises, standing for ``kill -9``: no except clause
    of the code under test catches it, so nothing is saved on the way out (finally clauses and
    context exits still run, as they would not after a real kill -9)."""


def interrupt_meta_step(monkeypatch, after_calls: int, how: str = "interrupt"):
    """The meta-step is interrupted on call after_calls + 1: ``how="interrupt"`` raises
    KeyboardInterrupt there (Ctrl-C where no handler defers it, or a second Ctrl-C);
    ``"sigint"`` / ``"sigterm"`` send this process the signal (Ctrl-C; ``kill PID``, a
    scheduler's preemption) and let the step run; ``"kill"`` raises `Killed`, as ``kill -9``
    ends the process."""
    import os
    import signal

    import dd_jax.outer_step

    real = dd_jax.outer_step.make_meta_step

    def patched(*args, **kwargs):
        step = real(*args, **kwargs)
        calls = [0]

        def interrupted(*a, **k):
            calls[0] += 1
            if calls[0] == after_calls + 1 and how in ("sigint", "sigterm"):
                os.kill(os.getpid(), signal.SIGINT if how == "sigint" else signal.SIGTERM)
            elif calls[0] > after_calls:
                raise Killed if how == "kill" else KeyboardInterrupt
            return step(*a, **k)

        return interrupted

    monkeypatch.setattr(dd_jax.outer_step, "make_meta_step", patched)
