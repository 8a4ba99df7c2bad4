"""tensorflow-datasets loading, on tfds' own mock data (no download, no TensorFlow needed)."""
import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from dd_jax.data import load_dataset  # noqa: E402


def test_prepared_tfds_dataset_loads_normalised():
    with tfds.testing.mock_data(num_examples=12):
        d = load_dataset("fashion_mnist")
    assert d.train_x.shape == (12, 28, 28, 1) and d.test_x.shape == (12, 28, 28, 1)
    assert d.train_x.dtype == np.float32 and d.train_y.dtype == np.int32
    assert d.num_classes == 10
    assert set(np.unique(d.train_y)) <= set(range(10))
    # normalised with the training split's own statistics
    np.testing.assert_allclose(d.train_x.mean(), 0.0, atol=1e-4)
    np.testing.assert_allclose(d.train_x.std(), 1.0, atol=1e-3)


def test_outer_step_benchmark_mocks_only_when_asked(tmp_path):
    """`benchmarks.outer_step --mock_examples=N` times an unprepared tfds dataset on mock data."""
    from benchmarks.outer_step import mock_data
    from dd_jax.errors import DataError

    with mock_data(12):
        d = load_dataset("cifar10", str(tmp_path))
    assert d.train_x.shape == (12, 32, 32, 3) and d.num_classes == 10
    with mock_data(0), pytest.raises(DataError, match="cifar10"):
        load_dataset("cifar10", str(tmp_path))
