"""Datasets: shapes, ranges, the seeded split, on-disk formats, bad names."""

import gzip
import pathlib
import pickle
import subprocess
import sys

import numpy as np
import pytest

import datasplits


def _row_set(X):
    return {row.tobytes() for row in X.reshape(len(X), -1)}


def test_mnist_split_sizes_shapes_and_range():
    sizes = {}
    for split in datasplits.SPLITS:
        X, y = datasplits.load_split("mnist", split)
        assert X.dtype == np.float32 and y.dtype == np.int64
        assert X.shape[1:] == (1, 28, 28)
        assert X.min() == 0.0 and X.max() == 1.0
        # Stratified: every class equally often.
        assert np.bincount(y, minlength=10).tolist() == [len(y) // 10] * 10
        sizes[split] = len(y)
    assert sizes == {"train": 3500, "val": 500, "test": 1000}
    assert datasplits.split_sizes("mnist") == sizes


def test_digits_shape_and_scaling():
    X, y = datasplits.load_split("digits", "test")
    assert X.shape[1:] == (1, 8, 8) and X.dtype == np.float32
    assert 0.0 <= X.min() and X.max() == 1.0
    assert sorted(set(y.tolist())) == list(range(10))
    assert sum(datasplits.split_sizes("digits").values()) == 1797


def test_splits_are_disjoint_and_seeded():
    train = _row_set(datasplits.load_split("mnist", "train")[0])
    val = _row_set(datasplits.load_split("mnist", "val")[0])
    test_a, y_a = datasplits.load_split("mnist", "test", split_seed=0)
    assert not (train & _row_set(test_a)) and not (val & _row_set(test_a)) and not (train & val)
    test_b, y_b = datasplits.load_split("mnist", "test", split_seed=0)
    np.testing.assert_array_equal(test_a, test_b)
    np.testing.assert_array_equal(y_a, y_b)
    test_c, _ = datasplits.load_split("mnist", "test", split_seed=1)
    assert _row_set(test_c) != _row_set(test_a)


def test_normalization_is_the_training_split_statistics():
    X, _ = datasplits.load_split("mnist", "train")
    norm = datasplits.normalization("mnist")
    assert norm["mean"] == pytest.approx([float(X.mean(dtype=np.float64))])
    assert norm["std"] == pytest.approx([float(X.std(dtype=np.float64))])
    assert 0.1 < norm["mean"][0] < 0.2


def test_unknown_dataset_and_split_name_the_problem():
    with pytest.raises(ValueError, match="'imagenet-22k'"):
        datasplits.load_split("imagenet-22k")
    with pytest.raises(ValueError, match="'holdout'"):
        datasplits.load_split("mnist", "holdout")


def test_on_disk_dataset_needs_a_root_and_names_the_missing_path(tmp_path):
    with pytest.raises(datasplits.DataError, match="--data-root"):
        datasplits.load_split("cifar10")
    with pytest.raises(datasplits.DataError, match="FashionMNIST/raw/t10k-images-idx3-ubyte"):
        datasplits.load_split("fashion-mnist", data_root=tmp_path)
    with pytest.raises(datasplits.DataError, match="cifar-10-batches-py/test_batch"):
        datasplits.load_split("cifar10", data_root=tmp_path)
    with pytest.raises(datasplits.DataError, match="cifar-10-batches-py/data_batch_1"):
        datasplits.load_split("cifar10", "train", data_root=tmp_path)


def _write_idx(path, array, gz):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def test_fashion_mnist_reads_torchvision_idx_files(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    train_x = rng.integers(0, 256, (200, 28, 28))
    train_y = np.repeat(np.arange(10), 20)
    test_x = rng.integers(0, 256, (30, 28, 28))
    test_y = np.arange(30) % 10
    _write_idx(raw / "train-images-idx3-ubyte", train_x, gz=True)
    _write_idx(raw / "train-labels-idx1-ubyte", train_y, gz=True)
    _write_idx(raw / "t10k-images-idx3-ubyte", test_x, gz=False)
    _write_idx(raw / "t10k-labels-idx1-ubyte", test_y, gz=False)
    X, y = datasplits.load_split("fashion-mnist", "test", data_root=tmp_path)
    assert X.shape == (30, 1, 28, 28)
    np.testing.assert_array_equal(X[:, 0], (test_x / 255.0).astype(np.float32))
    np.testing.assert_array_equal(y, test_y)
    sizes = datasplits.split_sizes("fashion-mnist", data_root=tmp_path)
    assert sizes == {"train": 180, "val": 20, "test": 30}


def test_cifar10_reads_torchvision_pickles(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (20, 3072), dtype=np.uint8),
                 b"labels": list(np.arange(20) % 10)}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    X, y = datasplits.load_split("cifar10", "val", data_root=tmp_path)
    assert X.shape == (10, 3, 32, 32) and X.dtype == np.float32
    assert sorted(y.tolist()) == list(range(10))
    assert datasplits.input_shape("cifar10") == (3, 32, 32)


def test_datasplits_imports_neither_torch_nor_the_training_code():
    code = ("import sys, datasplits; datasplits.load_split('digits'); "
            "assert not {'torch', 'models'} & set(sys.modules), sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=pathlib.Path(__file__).resolve().parents[2])
