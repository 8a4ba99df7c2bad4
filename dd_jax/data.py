"""Stage 1 - data: real datasets as normalised NHWC float32 arrays.

`load_dataset(name)` knows:
- ``mnist``: canonical MNIST carried inside the package (IDX files, SHA-256 checked on every load);
- ``digits``: scikit-learn's 1797 real 8x8 digits, shipped offline, upsampled to 28x28
  (a deterministic split of 1497 train / 300 test);
- ``usps``: the standard USPS set (7291 train / 2007 test, 16x16), read from the LIBSVM files
  ``usps.bz2`` and ``usps.t.bz2`` in data_dir (default ./data/usps), resized to 28x28 (bicubic);
- ``svhn``: tensorflow-datasets' ``svhn_cropped`` (prepared offline), converted to grayscale
  and resized to 28x28 (bicubic);
- any other name: a tensorflow-datasets catalog dataset that is already prepared on this machine
  (``tfds.data_source`` reads array_record files; with TensorFlow installed, ``tfds.load``).

`python -m experiments.prepare_data NAME` prepares usps, svhn and tfds datasets in that form.
"""
from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import zlib
from pathlib import Path
from typing import Callable

import numpy as np

from dd_jax.errors import ConfigError, DataError, absl_warnings_off

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
    "usps": ((0.1307,), (0.3081,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261)),
}
# dataset names of load_dataset whose tfds catalog name differs
TFDS_NAMES = {"svhn": "svhn_cropped"}
DATASET_OF_TFDS = {v: k for k, v in TFDS_NAMES.items()}
USPS_DIR = Path("data") / "usps"
USPS_FILES = {"train": "usps.bz2", "test": "usps.t.bz2"}  # LIBSVM multiclass 'usps'
USPS_URL = "https://www.csie.ntu.edu.tw/~cjlin/libsvmtools/datasets/multiclass/"


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


@dataclasses.dataclass(frozen=True)
class Split:
    """The training set cut in two: images to learn from (learn_x, learn_y) and a holdout to
    choose with (pretrained networks' pools are another thing: dd_jax.pretrain)."""

    learn_x: np.ndarray
    learn_y: np.ndarray
    holdout_x: np.ndarray
    holdout_y: np.ndarray


def split_holdout(key, train_x: np.ndarray, train_y: np.ndarray, n_holdout: int,
                  flag: str) -> Split:
    """A random slice of n_holdout training examples (drawn with the jax.random `key`) held
    out; the rest is learned from. `flag` names the setting in the error for a bad n_holdout."""
    import jax

    if not 0 < n_holdout < len(train_y):
        raise ConfigError(
            f"{flag}={n_holdout} must be between 1 and the {len(train_y)} training images - 1; "
            f"lower --{flag} or raise --train_subset"
        )
    perm = np.asarray(jax.random.permutation(key, len(train_y)))
    hold, learn = perm[:n_holdout], perm[n_holdout:]
    return Split(train_x[learn], train_y[learn], train_x[hold], train_y[hold])


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


def resize(pixels: np.ndarray, size: int, method: str = "bilinear") -> np.ndarray:
    """(N, H, W, C) -> (N, size, size, C), `method` of jax.image.resize (antialiased when shrinking)."""
    import jax

    out = jax.image.resize(
        pixels.astype(np.float32), (pixels.shape[0], size, size, pixels.shape[-1]), method
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


def parse_libsvm(text: str, n_features: int) -> tuple[np.ndarray, np.ndarray]:
    """LIBSVM lines 'label index:value ...' (indices 1-based, omitted values 0) ->
    (features (N, n_features) float32, labels (N,) int64)."""
    rows, labels = [], []
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        row = np.zeros(n_features, np.float32)
        try:
            labels.append(int(float(fields[0])))
            for field in fields[1:]:
                index, value = field.split(":")
                row[int(index) - 1] = float(value)
        except (ValueError, IndexError):
            raise DataError(f"LIBSVM line {number} is malformed (expected 'label index:value ...' "
                            f"with indices 1..{n_features}): {line[:60]!r}") from None
        rows.append(row)
    if not rows:
        raise DataError("LIBSVM file holds no examples")
    return np.stack(rows), np.array(labels)


def load_usps(directory: Path | str | None = None, size: int = 28) -> Dataset:
    """USPS (LIBSVM 'usps': 7291 train / 2007 test 16x16 digits, pixels in [-1, 1], labels
    1..10 for digits 0..9) from usps.bz2 / usps.t.bz2 in `directory` (default ./data/usps),
    resized to size x size (bicubic) and normalised like MNIST."""
    import bz2

    directory = Path(directory or USPS_DIR)
    mean, std = NORMALISATION["usps"]
    splits = {}
    for split, fname in USPS_FILES.items():
        path = directory / fname
        if not path.is_file():
            raise DataError(
                f"USPS file {path} is missing: download usps.bz2 and usps.t.bz2 from {USPS_URL} "
                f"into {directory}/ (or pass --data_dir=DIR holding them)"
            )
        try:
            text = bz2.decompress(path.read_bytes()).decode("ascii")
        except (OSError, ValueError, EOFError) as e:
            raise DataError(f"USPS file {path} is not a readable bz2 text file ({e}); download it "
                            f"again from {USPS_URL}") from None
        features, labels = parse_libsvm(text, 16 * 16)
        if labels.min() < 1 or labels.max() > 10:
            raise DataError(f"USPS file {path} has labels outside 1..10 (digits 0..9)")
        pixels = ((np.clip(features, -1.0, 1.0) + 1.0) / 2.0).reshape(-1, 16, 16, 1)
        if size != 16:
            pixels = resize(pixels, size, "bicubic")
        splits[split] = normalise(np.clip(pixels, 0.0, 1.0), mean, std), (labels - 1).astype(np.int32)
    (train_x, train_y), (test_x, test_y) = splits["train"], splits["test"]
    return Dataset("usps", train_x, train_y, test_x, test_y, 10, mean, std)


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


def _tfds_arrays(name: str, data_dir: str | None) -> tuple[np.ndarray, ...]:
    """(train pixels, train labels, test pixels, test labels, num_classes) of a prepared tfds
    dataset, pixels uint8 (N, H, W, C); a one-line DataError saying how to prepare it if absent."""
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise DataError(
            f"dataset {name!r} needs tensorflow-datasets: pip install tensorflow-datasets"
        ) from None
    try:
        with absl_warnings_off():
            (train_px, train_y), (test_px, test_y) = (
                _tfds_split(tfds, name, split, data_dir) for split in ("train", "test")
            )
            builder = tfds.builder(name, data_dir=data_dir)
        num_classes = int(builder.info.features["label"].num_classes)
    except Exception as e:  # tfds raises many types for a dataset that is not prepared
        raise tfds_unavailable(tfds, name, data_dir, e) from None
    return train_px, train_y, test_px, test_y, num_classes


def prepared_formats(root: Path, name: str) -> set[str]:
    """File formats ('array_record', 'tfrecord', ...) of tfds dataset `name`'s prepared files
    under `root`, for any config and version; empty if none are there."""
    formats = ("array_record", "tfrecord", "riegeli", "parquet")
    return {f for f in formats if any((root / name).glob(f"**/*.{f}*"))}


def tfds_unavailable(tfds, name: str, data_dir: str | None, error: Exception) -> DataError:
    """The one-line error for a tfds dataset that could not be read: an unknown name, not
    prepared, prepared in a format that needs TensorFlow, or unreadable; each with its fix."""
    import importlib.util

    root = Path(data_dir or tfds.core.constants.DATA_DIR)
    prepare = f"python -m experiments.prepare_data {DATASET_OF_TFDS.get(name, name)}"
    formats = prepared_formats(root, name)
    if isinstance(error, tfds.core.registered.DatasetNotFoundError):
        return DataError(f"unknown dataset {name!r}: not 'mnist', 'digits', 'usps', 'svhn' or a "
                         "tensorflow-datasets catalog name (prepared with `python -m "
                         "experiments.prepare_data NAME`)")
    if not formats:
        return DataError(
            f"dataset {name!r} is not prepared in {root}: on a machine with internet run "
            f"`{prepare} --data_dir=DIR`, copy DIR here and pass --data_dir=DIR "
            "(offline alternatives: 'mnist', 'digits')")
    if "array_record" not in formats and importlib.util.find_spec("tensorflow") is None:
        return DataError(
            f"dataset {name!r} in {root} is prepared as {', '.join(sorted(formats))} files, "
            "which tensorflow-datasets reads only with TensorFlow: pip install tensorflow, or "
            f"prepare it again as array_record with `{prepare} --data_dir=DIR`")
    return DataError(
        f"dataset {name!r} in {root} cannot be read ({type(error).__name__}: "
        f"{' '.join(str(error).split())[:160]}); prepare it again with `{prepare} --data_dir=DIR`")


def load_tfds(name: str, data_dir: str | None = None) -> Dataset:
    """A tensorflow-datasets catalog dataset with 'image' and 'label' features, prepared offline."""
    train_px, train_y, test_px, test_y, num_classes = _tfds_arrays(name, data_dir)
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


def load_svhn(data_dir: str | None = None, size: int = 28) -> Dataset:
    """SVHN (tfds 'svhn_cropped', 73257 train / 26032 test, 32x32 RGB) as grayscale
    (ITU-R 601-2 luma, as PIL's 'L') resized to size x size (bicubic), normalised with the
    grayscale training set's own mean and std."""
    train_px, train_y, test_px, test_y, num_classes = _tfds_arrays(TFDS_NAMES["svhn"], data_dir)

    def gray(px: np.ndarray) -> np.ndarray:
        luma = px.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32) / 255.0
        return np.clip(resize(luma[..., None], size, "bicubic"), 0.0, 1.0)

    train_px, test_px = gray(train_px), gray(test_px)
    mean, std = (float(train_px.mean()),), (float(train_px.std()),)
    return Dataset("svhn", normalise(train_px, mean, std), train_y.astype(np.int32),
                   normalise(test_px, mean, std), test_y.astype(np.int32), num_classes, mean, std)


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
