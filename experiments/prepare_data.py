"""Prepare a dataset that dd-jax reads but does not ship; run it on a machine with internet.

    python -m experiments.prepare_data NAME [--data_dir DIR]

NAME: cifar10, svhn, usps, or another tensorflow-datasets catalog name with 'image' and
'label' features. tfds datasets are downloaded and written as array_record files, which
`load_dataset` reads with `tfds.data_source`: neither preparing nor reading needs TensorFlow.
They go to DIR (default ~/tensorflow_datasets, tfds' own default). usps downloads the LIBSVM
files usps.bz2 and usps.t.bz2 into DIR (default ./data/usps). The prepared dataset is then
loaded once as a check. On an offline machine, copy DIR there and pass --data_dir=DIR to
`python -m experiments.run`.
"""
from __future__ import annotations

import contextlib
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

from dd_jax.data import load_dataset
from dd_jax.errors import ConfigError, DataError, DDJaxError
from dd_jax.files import atomic_path
from dd_jax.tfds_data import TFDS_NAMES
from dd_jax.usps import USPS_DIR, USPS_FILES, USPS_URL

USAGE = "usage: python -m experiments.prepare_data NAME [--data_dir DIR]"


def parse_args(argv: list[str]) -> tuple[str | None, str | None, bool]:
    """argv -> (NAME, --data_dir or None, whether --help/-h was given)."""
    name, data_dir, rest = None, None, list(argv)
    while rest:
        arg = rest.pop(0)
        if arg in ("--help", "-h"):
            return name, data_dir, True
        if arg.startswith("--data_dir="):
            data_dir = arg.partition("=")[2]
        elif arg == "--data_dir":
            if not rest or rest[0].startswith("--"):
                raise ConfigError("flag --data_dir needs a value: --data_dir=DIR")
            data_dir = rest.pop(0)
        elif arg.startswith("-"):
            raise ConfigError(f"unknown flag {arg!r}; {USAGE}")
        elif name is None:
            name = arg
        else:
            raise ConfigError(f"unexpected argument {arg!r}; {USAGE}")
    return name, data_dir, False


@contextlib.contextmanager
def images_encoded_with_pil() -> Iterator[None]:
    """While active, tfds encodes NumPy uint8 images with PIL (lossless PNG), as it does PIL
    images, instead of with TensorFlow: builders such as cifar10 yield NumPy images."""
    import numpy as np
    import PIL.Image
    import tensorflow_datasets as tfds

    image_cls = tfds.features.Image
    encode = image_cls.encode_example

    def encode_example(self, image):
        if isinstance(image, np.ndarray) and image.dtype == np.uint8:
            image = PIL.Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
        return encode(self, image)

    image_cls.encode_example = encode_example
    try:
        yield
    finally:
        image_cls.encode_example = encode


def prepare_tfds(name: str, data_dir: str | None) -> None:
    """Downloads tfds dataset `name` and writes it as array_record files under data_dir."""
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
        with images_encoded_with_pil():
            builder.download_and_prepare(file_format="array_record")
    except tfds.core.registered.DatasetNotFoundError:
        raise ConfigError(f"unknown dataset {name!r}: not usps, svhn or a tensorflow-datasets "
                          "catalog name") from None
    except Exception as e:  # tfds raises many types for a failed download or build
        raise DataError(f"preparing {name!r} failed ({type(e).__name__}: "
                        f"{' '.join(str(e).split())[:200]}); this needs internet access to "
                        "its source") from None


def download(url: str, path: Path) -> None:
    """`url` saved at `path`, written atomically."""
    try:
        with (atomic_path(path, ".part") as tmp, urllib.request.urlopen(url, timeout=60) as response,
              tmp.open("wb") as f):
            f.write(response.read())
    except (urllib.error.URLError, OSError) as e:
        raise DataError(f"cannot download {url} ({getattr(e, 'reason', e)}); this needs "
                        "internet access") from None


def prepare_usps(data_dir: str | None, base_url: str = USPS_URL) -> None:
    """usps.bz2 and usps.t.bz2 from the LIBSVM site into data_dir (default ./data/usps)."""
    directory = Path(data_dir or USPS_DIR)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create {directory} ({e.strerror or e}); choose a writable "
                          "--data_dir=DIR") from None
    for fname in USPS_FILES.values():
        download(base_url + fname, directory / fname)


def prepare(name: str, data_dir: str | None) -> str:
    """Prepares dataset `name` (a load_dataset name) and loads it; returns a summary line."""
    if name in ("mnist", "digits"):
        return f"{name} ships with dd-jax: nothing to prepare"
    if name == "usps":
        prepare_usps(data_dir)
    else:
        prepare_tfds(TFDS_NAMES.get(name, name), data_dir)
    d = load_dataset(name, data_dir)
    return (f"{name}: {len(d.train_y)} training and {len(d.test_y)} test images of shape "
            f"{d.image_shape}, {d.num_classes} classes; use it with --dataset={name}"
            + (f" --data_dir={data_dir}" if data_dir else ""))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        name, data_dir, wants_help = parse_args(argv)
        if wants_help:
            print(__doc__)
            return 0
        if name is None:
            raise ConfigError(f"no dataset named; {USAGE}")
        print(prepare(name, data_dir))
    except DDJaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
