"""Datasets read through tensorflow-datasets once prepared on this machine (`load_tfds`, and
`load_svhn`: 'svhn_cropped' as 28x28 grayscale); a dataset that cannot be read gets one
`DataError` line saying how to prepare it (`tfds_unavailable`)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from dd_jax.dataset import NORMALISATION, Dataset, normalise, resize
from dd_jax.errors import DataError, absl_logging_off

# dataset names of load_dataset whose tfds catalog name differs
TFDS_NAMES = {"svhn": "svhn_cropped"}
DATASET_OF_TFDS = {v: k for k, v in TFDS_NAMES.items()}


def _tfds_split(tfds, name: str, split: str, data_dir: str | None) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, H, W, C), labels (N,)) of one split: with TensorFlow installed through
    `tfds.load` (which can also prepare the dataset), otherwise from prepared array_record files
    through `tfds.data_source` (no download attempted)."""
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
        with absl_logging_off():
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
