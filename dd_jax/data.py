"""Stage 1 - data: real datasets as normalised NHWC float32 arrays.

`load_dataset(name)` knows:
- ``mnist``: canonical MNIST carried inside the package (IDX files, SHA-256 checked on every load);
- ``digits``: scikit-learn's 1797 real 8x8 digits, shipped offline, upsampled to 28x28
  (a deterministic split of 1497 train / 300 test);
- ``usps``: the standard USPS set (7291 train / 2007 test, 16x16), read from the LIBSVM files
  ``usps.bz2`` and ``usps.t.bz2`` in data_dir (default ./data/usps), resized to 28x28 (bicubic;
  `dd_jax.usps`);
- ``svhn``: tensorflow-datasets' ``svhn_cropped`` (prepared offline), converted to grayscale
  and resized to 28x28 (bicubic; `dd_jax.tfds_data`);
- any other name: a tensorflow-datasets catalog dataset that is already prepared on this machine
  (``tfds.data_source`` reads array_record files; with TensorFlow installed, ``tfds.load``).

`python -m experiments.prepare_data NAME` prepares usps, svhn and tfds datasets in that form.
Every loader returns a `dd_jax.dataset.Dataset`.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import zlib
from pathlib import Path
from typing import Callable

import numpy as np

from dd_jax.dataset import NORMALISATION, Dataset, normalise, resize
from dd_jax.errors import DataError
from dd_jax.tfds_data import load_svhn, load_tfds
from dd_jax.usps import load_usps

MNIST_DIR = Path(__file__).parent / "_data" / "mnist"
MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def _read_checked(path: Path, expected_sha256: str) -> bytes:
    if not path.exists():
        raise DataError(
            f"MNIST file {path} is missing; reinstall dd_jax (pip install -e .) to restore the "
            "packaged copy"
        )
    try:
        raw = gzip.decompress(path.read_bytes())
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(
            f"MNIST file {path} is not a readable gzip file ({e}); it is corrupted - "
            "reinstall dd_jax to restore it"
        ) from None
    digest = hashlib.sha256(raw).hexdigest()
    if digest != expected_sha256:
        raise DataError(
            f"MNIST file {path} is corrupted: SHA-256 of its uncompressed bytes is {digest}, "
            f"expected {expected_sha256}; reinstall dd_jax to restore it"
        )
    return raw


def parse_idx(raw: bytes) -> np.ndarray:
    """An IDX file's bytes (uint8 data) -> array with the shape its header gives."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError("not an IDX file of unsigned bytes (bad magic number)")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise DataError(f"IDX header cut short: {ndim} dimensions need {4 + 4 * ndim} bytes")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise DataError(f"IDX file holds {data.size} values, its header says {shape}")
    return data.reshape(shape)


def read_checksums(path: Path) -> dict[str, str]:
    """{file name: SHA-256} from a `sha256sum`-style file listing every MNIST file."""
    if not path.exists():
        raise DataError(f"{path} is missing; reinstall dd_jax to restore the MNIST files")
    lines = [l for l in path.read_text().splitlines() if l.strip() and not l.startswith("#")]
    sums = dict(reversed(l.split()) for l in lines if len(l.split()) == 2)
    missing = [f for f in MNIST_FILES.values() if f not in sums]
    if missing:
        raise DataError(f"{path} has no checksum for {', '.join(missing)}; it is corrupted - "
                        "reinstall dd_jax to restore it")
    return sums


def load_mnist(directory: Path | str | None = None) -> Dataset:
    """Canonical MNIST (60k/10k, 28x28x1) from IDX files, verified against SHA256SUMS.

    directory defaults to the copy inside the package (MNIST_DIR).
    """
    directory = Path(MNIST_DIR if directory is None else directory)
    sums = read_checksums(directory / "SHA256SUMS")
    arrays = {
        key: parse_idx(_read_checked(directory / f"{fname}.gz", sums[fname]))
        for key, fname in MNIST_FILES.items()
    }
    mean, std = NORMALISATION["mnist"]
    to_x = lambda a: normalise(a[..., None].astype(np.float32) / 255.0, mean, std)
    return Dataset(
        "mnist",
        to_x(arrays["train_images"]),
        arrays["train_labels"].astype(np.int32),
        to_x(arrays["test_images"]),
        arrays["test_labels"].astype(np.int32),
        10,
        mean,
        std,
    )


def load_digits(size: int = 28, n_test: int = 300) -> Dataset:
    """scikit-learn's real 8x8 digits (offline), resized to size x size; last n_test are test."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    pixels = resize(d.images[..., None] / 16.0, size) if size != 8 else d.images[..., None] / 16.0
    mean, std = NORMALISATION["digits"]
    x = normalise(np.clip(pixels, 0.0, 1.0), mean, std)
    y = d.target.astype(np.int32)
    return Dataset("digits", x[:-n_test], y[:-n_test], x[-n_test:], y[-n_test:], 10, mean, std)


# dataset name -> loader(data_dir); any other name is read through tensorflow-datasets
LOADERS: dict[str, Callable[[str | None], Dataset]] = {
    "mnist": lambda data_dir: load_mnist(),  # carried: data_dir is not consulted
    "digits": lambda data_dir: load_digits(),  # scikit-learn's, carried likewise
    "usps": load_usps,
    "svhn": load_svhn,
}


def load_dataset(name: str, data_dir: str | None = None) -> Dataset:
    """The named dataset: `LOADERS`' ('mnist' and 'digits' offline, 'usps' from LIBSVM files in
    data_dir, 'svhn' grayscale 28x28), anything else through tfds."""
    return LOADERS.get(name, functools.partial(load_tfds, name))(data_dir)
