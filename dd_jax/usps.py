"""The USPS digits (`load_usps`) from the LIBSVM multiclass files, which this package does not
carry: ``usps.bz2`` and ``usps.t.bz2`` in data_dir (default ./data/usps)."""
from __future__ import annotations

import bz2
from pathlib import Path

import numpy as np

from dd_jax.dataset import NORMALISATION, Dataset, normalise, resize
from dd_jax.errors import DataError

USPS_DIR = Path("data") / "usps"
USPS_FILES = {"train": "usps.bz2", "test": "usps.t.bz2"}  # LIBSVM multiclass 'usps'
USPS_URL = "https://www.csie.ntu.edu.tw/~cjlin/libsvmtools/datasets/multiclass/"


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
