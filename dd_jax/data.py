"""Stage 1 - data: real datasets as normalised NHWC float32 arrays.

`load_dataset(name)` knows:
- ``mnist``: canonical MNIST carried inside the package (IDX files, SHA-256 checked on every load);
- ``digits``: scikit-learn's 1797 real 8x8 digits, shipped offline, upsampled to 28x28
  (a deterministic split of 1497 train / 300 test);
- any other name: a tensorflow-datasets catalog dataset that is already prepared on this machine
  (``tfds.data_source``; with TensorFlow installed, ``tfds.load``).
"""
from __future__ import annotations

import dataclasses
import gzip
import hashlib
import zlib
from pathlib import Path

import numpy as np

from dd_jax.errors import DataError

MNIST_DIR = Path(__file__).parent / "_data" / "mnist"
MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# (mean, std) per channel of [0, 1] pixels, as the authors' code normalises; a tfds dataset not
# listed here is normalised with its training split's own per-channel statistics.
NORMALISATION = {
    "mnist": ((0.1307,), (0.3081,)),
    "digits": ((0.1307,), (0.3081,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261)),
}


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A classification dataset, images normalised with (mean, std).

    train_x: (N, H, W, C) float32, train_y: (N,) int32; test_x, test_y likewise.
    """

    name: str
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_x.shape[1:])

    def denormalise(self, x: np.ndarray) -> np.ndarray:
        """Normalised images back to [0, 1] pixel space (unclipped)."""
        return np.asarray(x) * np.asarray(self.std) + np.asarray(self.mean)

    def subset(self, n_train: int = 0, n_test: int = 0) -> "Dataset":
        """The first n_train / n_test examples (0 keeps all); for quick runs and tests."""
        tr = slice(None, n_train or None)
        te = slice(None, n_test or None)
        return dataclasses.replace(
            self,
            train_x=self.train_x[tr],
            train_y=self.train_y[tr],
            test_x=self.test_x[te],
            test_y=self.test_y[te],
        )


def normalise(pixels: np.ndarray, mean, std) -> np.ndarray:
    """(N, H, W, C) pixels in [0, 1] -> float32 normalised per channel."""
    return ((pixels - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)).astype(np.float32)


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


def resize(pixels: np.ndarray, size: int) -> np.ndarray:
    """(N, H, W, C) -> (N, size, size, C), bilinear (antialiased when shrinking)."""
    import jax

    out = jax.image.resize(
        pixels.astype(np.float32), (pixels.shape[0], size, size, pixels.shape[-1]), "bilinear"
    )
    return np.asarray(out)


def load_digits(size: int = 28, n_test: int = 300) -> Dataset:
    """scikit-learn's real 8x8 digits (offline), resized to size x size; last n_test are test."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    pixels = resize(d.images[..., None] / 16.0, size) if size != 8 else d.images[..., None] / 16.0
    mean, std = NORMALISATION["digits"]
    x = normalise(np.clip(pixels, 0.0, 1.0), mean, std)
    y = d.target.astype(np.int32)
    return Dataset("digits", x[:-n_test], y[:-n_test], x[-n_test:], y[-n_test:], 10, mean, std)


def _tfds_split(tfds, name: str, split: str, data_dir: str | None) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, H, W, C), labels (N,)) of one split: with TensorFlow installed through
    `tfds.load` (which can also prepare the dataset), otherwise from prepared array_record files
    through `tfds.data_source` (no download attempted)."""
    import importlib.util

    if importlib.util.find_spec("tensorflow") is not None:
        data = tfds.as_numpy(tfds.load(name, split=split, batch_size=-1, data_dir=data_dir))
        return np.asarray(data["image"]), np.asarray(data["label"])
    source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    return (np.stack([ex["image"] for ex in source]), np.array([ex["label"] for ex in source]))


def load_tfds(name: str, data_dir: str | None = None) -> Dataset:
    """A tensorflow-datasets catalog dataset with 'image' and 'label' features, prepared offline."""
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise DataError(
            f"dataset {name!r} needs tensorflow-datasets: pip install tensorflow-datasets"
        ) from None
    try:
        (train_px, train_y), (test_px, test_y) = (
            _tfds_split(tfds, name, split, data_dir) for split in ("train", "test")
        )
        num_classes = int(tfds.builder(name, data_dir=data_dir).info.features["label"].num_classes)
    except Exception as e:  # tfds raises many types for a dataset that is not prepared
        raise DataError(
            f"dataset {name!r} is not available offline ({type(e).__name__}: "
            f"{' '.join(str(e).split())[:160]}). "
            f"Prepare it once on a machine with internet: pip install tensorflow "
            f"tensorflow-datasets && python -c \"import tensorflow_datasets as tfds; "
            f"tfds.builder('{name}').download_and_prepare()\", then copy ~/tensorflow_datasets "
            f"here (or pass --data_dir). Offline alternatives: 'mnist', 'digits'."
        ) from None
    train_px = train_px.astype(np.float32) / 255.0
    test_px = test_px.astype(np.float32) / 255.0
    mean, std = NORMALISATION.get(name) or (
        tuple(float(m) for m in train_px.mean(axis=(0, 1, 2))),
        tuple(float(s) for s in train_px.std(axis=(0, 1, 2))),
    )
    return Dataset(
        name, normalise(train_px, mean, std), train_y.astype(np.int32),
        normalise(test_px, mean, std), test_y.astype(np.int32), num_classes, mean, std,
    )


def load_dataset(name: str, data_dir: str | None = None) -> Dataset:
    """The named dataset: 'mnist' and 'digits' offline, anything else through tfds."""
    if name == "mnist":
        return load_mnist()
    if name == "digits":
        return load_digits()
    return load_tfds(name, data_dir)
