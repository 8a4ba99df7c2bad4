"""Datasets: packaged MNIST (checked), scikit-learn digits, tensorflow-datasets names."""
from __future__ import annotations

import gzip
import socket

import numpy as np
import pytest

from conftest import MNIST_GZ, corrupt_mnist_file
from dd_jax import data
from dd_jax.data import load_dataset, load_digits, load_mnist, parse_idx
from dd_jax.dataset import Dataset
from dd_jax.errors import DataError


@pytest.fixture(scope="module")
def mnist() -> Dataset:
    return load_mnist()


def test_mnist_shapes_and_dtypes(mnist):
    assert mnist.name == "mnist" and mnist.num_classes == 10
    assert mnist.train_x.shape == (60000, 28, 28, 1) and mnist.train_x.dtype == np.float32
    assert mnist.test_x.shape == (10000, 28, 28, 1) and mnist.test_x.dtype == np.float32
    assert mnist.train_y.shape == (60000,) and mnist.train_y.dtype == np.int32
    assert mnist.test_y.shape == (10000,) and mnist.test_y.dtype == np.int32
    assert mnist.image_shape == (28, 28, 1)


def test_mnist_canonical_order(mnist):
    np.testing.assert_array_equal(mnist.train_y[:10], [5, 0, 4, 1, 9, 2, 1, 3, 1, 4])
    np.testing.assert_array_equal(mnist.test_y[:10], [7, 2, 1, 0, 4, 1, 4, 9, 5, 9])
    # the well-known class counts of the MNIST training and test sets
    np.testing.assert_array_equal(
        np.bincount(mnist.train_y), [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949])
    np.testing.assert_array_equal(
        np.bincount(mnist.test_y), [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009])


def test_mnist_normalisation(mnist):
    assert mnist.mean == (0.1307,) and mnist.std == (0.3081,)
    x = mnist.train_x
    assert abs(float(x.mean(dtype=np.float64))) < 0.01
    assert abs(float(x.std(dtype=np.float64)) - 1.0) < 0.01
    # pixels back in [0, 1], on the uint8 grid k/255, with both ends present
    px = mnist.denormalise(mnist.test_x[:200])
    assert px.min() > -1e-5 and px.max() < 1 + 1e-5
    np.testing.assert_allclose(px * 255, np.rint(px * 255), atol=1e-3)
    assert px.min() < 1e-5 and px.max() > 1 - 1e-5


def test_load_dataset_mnist_is_packaged_copy(mnist):
    again = load_dataset("mnist")
    np.testing.assert_array_equal(again.test_y, mnist.test_y)
    np.testing.assert_array_equal(again.test_x[:50], mnist.test_x[:50])


def test_subset(mnist):
    s = mnist.subset(100, 30)
    assert s.train_x.shape == (100, 28, 28, 1) and s.test_x.shape == (30, 28, 28, 1)
    np.testing.assert_array_equal(s.train_y, mnist.train_y[:100])
    np.testing.assert_array_equal(s.test_y, mnist.test_y[:30])
    full = mnist.subset(0, 0)
    assert len(full.train_y) == 60000 and len(full.test_y) == 10000


# --------------------------------------------------------------------------- damaged copies


def test_copy_loads(mnist_copy, mnist):
    d = load_mnist(mnist_copy)
    np.testing.assert_array_equal(d.test_y, mnist.test_y)


@pytest.mark.parametrize(
    "how",
    [
        "regzip",  # valid gzip, one byte of the data changed: SHA-256 mismatch
        "crc",  # a flipped byte in the compressed stream that gzip reports as a CRC error
        "truncate",
        "deflate",  # a flipped byte that makes the deflate stream itself invalid (zlib.error)
    ],
)
@pytest.mark.parametrize("which", ["train_labels", "test_images"])
def test_corrupted_file_raises_data_error(mnist_copy, how, which):
    corrupt_mnist_file(mnist_copy, how, MNIST_GZ[which])
    with pytest.raises(DataError, match="corrupted") as e:
        load_mnist(mnist_copy)
    assert MNIST_GZ[which] in str(e.value)  # names the file
    assert "reinstall" in str(e.value)  # and the fix


def test_one_changed_byte_is_caught_by_the_checksum(mnist_copy):
    """'regzip' really produces a valid gzip whose contents differ in exactly one byte."""
    path = mnist_copy / MNIST_GZ["train_labels"]
    before = gzip.decompress(path.read_bytes())
    corrupt_mnist_file(mnist_copy, "regzip", MNIST_GZ["train_labels"])
    after = gzip.decompress(path.read_bytes())
    assert len(after) == len(before)
    assert sum(a != b for a, b in zip(before, after)) == 1
    with pytest.raises(DataError, match="SHA-256"):
        load_mnist(mnist_copy)


@pytest.mark.parametrize("which", ["train_images", "test_labels"])
def test_missing_file_raises_data_error(mnist_copy, which):
    corrupt_mnist_file(mnist_copy, "missing", MNIST_GZ[which])
    with pytest.raises(DataError, match="missing") as e:
        load_mnist(mnist_copy)
    assert MNIST_GZ[which] in str(e.value)


def test_missing_checksums_raise_data_error(mnist_copy):
    (mnist_copy / "SHA256SUMS").unlink()
    with pytest.raises(DataError, match="SHA256SUMS"):
        load_mnist(mnist_copy)


def test_incomplete_checksums_raise_data_error(mnist_copy):
    sums = mnist_copy / "SHA256SUMS"
    lines = [l for l in sums.read_text().splitlines() if "t10k-labels" not in l]
    sums.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError):
        load_mnist(mnist_copy)


def test_load_dataset_honours_mnist_dir(mnist_copy, monkeypatch):
    corrupt_mnist_file(mnist_copy, "regzip", MNIST_GZ["train_labels"])
    monkeypatch.setattr(data, "MNIST_DIR", mnist_copy)
    with pytest.raises(DataError, match="corrupted"):
        load_dataset("mnist")


# --------------------------------------------------------------------------- IDX parsing


def _idx(shape, payload: bytes, magic=b"\x00\x00\x08") -> bytes:
    header = magic + bytes([len(shape)]) + b"".join(int(n).to_bytes(4, "big") for n in shape)
    return header + payload


def test_parse_idx_valid():
    a = parse_idx(_idx((2, 3), bytes(range(6))))
    assert a.dtype == np.uint8 and a.shape == (2, 3)
    np.testing.assert_array_equal(a, np.arange(6).reshape(2, 3))
    assert parse_idx(_idx((4,), b"\x05\x00\x04\x01")).tolist() == [5, 0, 4, 1]


@pytest.mark.parametrize(
    "raw",
    [
        _idx((2, 3), bytes(6), magic=b"\x01\x00\x08"),  # first byte not 0
        _idx((2, 3), bytes(6), magic=b"\x00\x01\x08"),
        _idx((2, 3), bytes(6), magic=b"\x00\x00\x0d"),  # float data, not unsigned bytes
        b"\x1f\x8b\x08\x00",  # a gzip header: the caller forgot to decompress
        b"PK\x03\x04" + bytes(8),
        b"\x00\x00",  # too short
        b"",
    ],
    ids=["byte0", "byte1", "dtype", "gzip", "zip", "short", "empty"],
)
def test_parse_idx_rejects_bad_magic(raw):
    with pytest.raises(DataError, match="magic"):
        parse_idx(raw)


def test_parse_idx_rejects_wrong_size():
    with pytest.raises(DataError, match="header says"):
        parse_idx(_idx((2, 3), bytes(5)))
    with pytest.raises(DataError, match="header says"):
        parse_idx(_idx((2, 3), bytes(7)))


def test_parse_idx_rejects_truncated_header():
    with pytest.raises(DataError):
        parse_idx(b"\x00\x00\x08\x03\x00\x00")


# --------------------------------------------------------------------------- digits


@pytest.mark.parametrize("size", [8, 28])
def test_load_digits(size, digits8, digits28):
    d = digits8 if size == 8 else digits28
    assert d.name == "digits" and d.num_classes == 10
    assert d.train_x.shape == (1497, size, size, 1) and d.test_x.shape == (300, size, size, 1)
    assert d.train_x.dtype == np.float32 and d.train_y.dtype == np.int32
    assert set(np.unique(d.train_y)) == set(range(10)) == set(np.unique(d.test_y))
    # class balance (scikit-learn's digits have 174-183 images per class)
    counts = np.bincount(d.train_y, minlength=10)
    assert counts.min() >= 140 and counts.max() <= 160, counts
    test_counts = np.bincount(d.test_y, minlength=10)
    assert test_counts.min() >= 25 and test_counts.max() <= 35, test_counts
    # normalised with MNIST's constants; pixels in [0, 1] once denormalised
    px = d.denormalise(d.train_x)
    assert px.min() > -1e-5 and px.max() < 1 + 1e-5 and px.max() > 0.9
    assert abs(float(d.train_x.mean())) < 1.0  # roughly centred


def test_digits_are_sklearn_digits_in_order(digits8):
    from sklearn.datasets import load_digits as sk

    ref = sk()
    np.testing.assert_array_equal(digits8.train_y, ref.target[:-300])
    np.testing.assert_array_equal(digits8.test_y, ref.target[-300:])
    np.testing.assert_allclose(digits8.denormalise(digits8.train_x)[..., 0],
                               ref.images[:-300] / 16.0, atol=1e-6)


def test_digits_upsampled_keeps_the_picture(digits8, digits28):
    """The 28x28 version is the 8x8 image resized: shrinking it back gives nearly the original."""
    import jax

    small = np.asarray(jax.image.resize(digits28.denormalise(digits28.test_x[:20]),
                                        (20, 8, 8, 1), "bilinear"))
    orig = digits8.denormalise(digits8.test_x[:20])
    corr = np.corrcoef(small.ravel(), orig.ravel())[0, 1]
    assert corr > 0.9


def test_load_digits_n_test():
    d = load_digits(size=8, n_test=97)
    assert len(d.train_y) == 1797 - 97 and len(d.test_y) == 97


def test_load_dataset_digits(digits28):
    d = load_dataset("digits")
    np.testing.assert_array_equal(d.train_x, digits28.train_x)
    np.testing.assert_array_equal(d.test_y, digits28.test_y)


# --------------------------------------------------------------------------- tfds names


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection is recorded and refused."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    return attempts


def test_unknown_tfds_name_raises_helpful_data_error(no_network, tmp_path):
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(DataError) as e:
        load_dataset("no_such_dataset_xyz", data_dir=str(tmp_path))
    if no_network:
        pytest.skip("tfds tried to reach the network for an unknown name")
    msg = str(e.value)
    assert "'no_such_dataset_xyz'" in msg  # names the dataset
    assert "prepare_data" in msg and "tensorflow-datasets" in msg  # how to prepare it
    assert "'mnist'" in msg and "'digits'" in msg  # and the offline alternatives


def test_tfds_never_asked_to_download(monkeypatch, no_network):
    """A catalog dataset that is not prepared fails fast: nothing is downloaded."""
    tfds = pytest.importorskip("tensorflow_datasets")
    calls = []

    def fake_data_source(name, **kwargs):
        calls.append(kwargs)
        raise FileNotFoundError(f"{name} is not prepared")

    monkeypatch.setattr(tfds, "data_source", fake_data_source)
    with pytest.raises(DataError, match="fashion_mnist"):
        load_dataset("fashion_mnist")
    # (not calling data_source at all for an unprepared dataset would be fine too)
    assert all(c.get("download") is False for c in calls), calls
