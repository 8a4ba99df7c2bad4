"""Stage 1 - data: the dataset type every loader returns (`Dataset`: normalised NHWC float32
images), a training set cut into a learning part and a holdout (`Split`), the pixel
transforms the loaders share, and the order in which the outer loop draws real batches
(`BatchOrder`)."""
from __future__ import annotations

import dataclasses

import jax
import numpy as np

from dd_jax.errors import ConfigError

# (mean, std) per channel of [0, 1] pixels, as the authors' code normalises; a tfds dataset not
# listed here is normalised with its training split's own per-channel statistics.
NORMALISATION = {
    "mnist": ((0.1307,), (0.3081,)),
    "digits": ((0.1307,), (0.3081,)),
    "usps": ((0.1307,), (0.3081,)),
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


def resize(pixels: np.ndarray, size: int, method: str = "bilinear") -> np.ndarray:
    """(N, H, W, C) -> (N, size, size, C), `method` of jax.image.resize (antialiased when shrinking)."""
    out = jax.image.resize(
        pixels.astype(np.float32), (pixels.shape[0], size, size, pixels.shape[-1]), method
    )
    return np.asarray(out)


class BatchOrder:
    """Real batches as the authors' shuffled loader draws them: a fresh permutation per pass,
    consecutive slices of `batch_size`, the remainder dropped."""

    def __init__(self, key: jax.Array, n_train: int, batch_size: int):
        self.key, self.n_train = key, n_train
        self.batch_size = min(batch_size, n_train)
        self.per_pass = n_train // self.batch_size
        self._pass, self._perm = -1, None

    def __call__(self, iteration: int) -> np.ndarray:
        p, i = divmod(iteration, self.per_pass)
        if p != self._pass:
            self._pass = p
            self._perm = np.asarray(jax.random.permutation(jax.random.fold_in(self.key, p), self.n_train))
        return self._perm[i * self.batch_size : (i + 1) * self.batch_size]
