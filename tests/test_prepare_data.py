"""`python -m experiments.prepare_data`: tfds datasets as array_record files (no TensorFlow),
USPS from its LIBSVM files, and errors that tell "not prepared" from "prepared as tfrecord"."""
from __future__ import annotations

import bz2
import contextlib
import importlib.util
import io
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT
from dd_jax.data import load_dataset
from experiments import prepare_data
from experiments import run as cli

tfds = pytest.importorskip("tensorflow_datasets")


class TinyImages(tfds.core.GeneratorBasedBuilder):
    """6 training and 4 test 8x8 RGB images as NumPy uint8 arrays (as cifar10's builder
    yields them), 3 classes; nothing to download."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(8, 8, 3)),
            "label": tfds.features.ClassLabel(num_classes=3)}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(6), "test": self._generate_examples(4)}

    def _generate_examples(self, n):
        for i in range(n):
            yield i, {"image": tiny_pixels(n)[i], "label": i % 3}


def tiny_pixels(n: int) -> np.ndarray:
    return np.random.default_rng(n).integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)


def call(args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = prepare_data.main([str(a) for a in args])
    return rc, out.getvalue(), err.getvalue()


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_prepares_array_record_that_loads_losslessly(tmp_path):
    rc, out, err = call(["tiny_images", "--data_dir", tmp_path])
    assert rc == 0, err
    assert "tiny_images: 6 training and 4 test images of shape (8, 8, 3), 3 classes" in out
    files = [p.name for p in (tmp_path / "tiny_images").glob("*/*")]
    assert any(".array_record" in f for f in files) and not any(".tfrecord" in f for f in files)
    d = load_dataset("tiny_images", str(tmp_path))
    loaded = np.rint(d.denormalise(d.test_x) * 255).astype(np.uint8)
    # the same images and labels (tfds stores a split in its own order)
    expected = {px.tobytes(): i % 3 for i, px in enumerate(tiny_pixels(4))}
    assert {px.tobytes(): int(y) for px, y in zip(loaded, d.test_y)} == expected


def test_tfds_image_encoding_is_restored():
    encode = tfds.features.Image.encode_example
    with prepare_data.images_encoded_with_pil():
        assert tfds.features.Image.encode_example is not encode
    assert tfds.features.Image.encode_example is encode


@pytest.mark.parametrize("name, shape", [("cifar10", (32, 32, 3)), ("svhn", (28, 28, 1))])
def test_prepare_on_tfds_mock_data(tmp_path, name, shape):
    with tfds.testing.mock_data(num_examples=12):
        rc, out, err = call([name, f"--data_dir={tmp_path}"])
    assert rc == 0, err
    assert out.startswith(f"{name}: 12 training and 12 test images of shape {shape}, 10 classes")
    assert f"--dataset={name} --data_dir={tmp_path}" in out


def _libsvm(n: int) -> str:
    rng = np.random.default_rng(n)
    return "".join(f"{i % 10 + 1} " + " ".join(f"{j}:{v:.3f}" for j, v in
                                              enumerate(rng.uniform(-1, 1, 256), 1)) + "\n"
                   for i in range(n))


def test_prepare_usps_downloads_the_libsvm_files(tmp_path):
    source = tmp_path / "site"
    source.mkdir()
    (source / "usps.bz2").write_bytes(bz2.compress(_libsvm(5).encode()))
    (source / "usps.t.bz2").write_bytes(bz2.compress(_libsvm(3).encode()))
    prepare_data.prepare_usps(str(tmp_path / "usps"), base_url=source.as_uri() + "/")
    d = load_dataset("usps", str(tmp_path / "usps"))
    assert d.train_x.shape == (5, 28, 28, 1) and d.test_x.shape == (3, 28, 28, 1)
    assert sorted(p.name for p in (tmp_path / "usps").iterdir()) == ["usps.bz2", "usps.t.bz2"]


def test_usps_download_failure_is_one_line(tmp_path):
    with pytest.raises(prepare_data.DataError, match="cannot download .*usps.bz2"):
        prepare_data.prepare_usps(str(tmp_path / "usps"), base_url=(tmp_path / "no").as_uri() + "/")
    assert list((tmp_path / "usps").iterdir()) == []


@pytest.mark.parametrize("args, fragment", [
    ([], "no dataset named"),
    (["cifar10", "--data_dir"], "--data_dir needs a value"),
    (["cifar10", "--datadir=x"], "unknown flag '--datadir=x'"),
    (["cifar10", "svhn"], "unexpected argument 'svhn'"),
    (["no_such_dataset_xyz"], "unknown dataset 'no_such_dataset_xyz'"),
])
def test_bad_input(args, fragment):
    rc, out, err = call(args)
    assert rc == 2 and out == ""
    assert fragment in one_error_line(err)


def test_help():
    rc, out, _ = call(["--help"])
    assert rc == 0 and "array_record" in out and "--data_dir" in out


# --------------------------------------------------------------------------- reading errors


def run_error(capsys, tmp_path, dataset: str) -> str:
    rc = cli.main(["mnist_fixed_init", f"--dataset={dataset}", f"--data_dir={tmp_path}",
                   f"--output_dir={tmp_path / 'run'}", "--quiet"])
    assert rc == 2
    return one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("dataset", ["cifar10", "svhn"])
def test_not_prepared_names_the_command(capsys, tmp_path, dataset):
    line = run_error(capsys, tmp_path, dataset)
    assert "is not prepared in" in line and str(tmp_path) in line
    assert f"python -m experiments.prepare_data {dataset} --data_dir=DIR" in line


@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is not None,
                    reason="with TensorFlow, tfrecord files are readable")
@pytest.mark.parametrize("dataset, tfds_name", [("cifar10", "cifar10"), ("svhn", "svhn_cropped")])
def test_prepared_as_tfrecord_names_both_fixes(capsys, tmp_path, dataset, tfds_name):
    """A dataset prepared by download_and_prepare() with its default file format."""
    version = tmp_path / tfds_name / "3.0.2"
    version.mkdir(parents=True)
    for split in ("train", "test"):
        (version / f"{tfds_name}-{split}.tfrecord-00000-of-00001").write_bytes(b"\0" * 16)
    line = run_error(capsys, tmp_path, dataset)
    assert "prepared as tfrecord files" in line and "pip install tensorflow" in line
    assert f"python -m experiments.prepare_data {dataset} --data_dir=DIR" in line


def test_not_prepared_is_one_stderr_line(tmp_path):
    """Run as a user would: tfds' own warnings do not add lines to the error."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "experiments.run", "mnist_fixed_init",
                           "--dataset", "cifar10", "--data_dir", str(tmp_path), "--quiet"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stdout == ""
    assert "is not prepared in" in one_error_line(proc.stderr)
