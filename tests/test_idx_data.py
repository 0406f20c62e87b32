"""MNIST-format (IDX) datasets: Fashion-MNIST from Debian's package, and folders of IDX files."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from kd_core.data import DATASETS
from kd_core.data.cifar import DatasetFilesNotFoundError
from kd_core.data.idx import FASHION_MNIST_ROOT


def write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)


def write_folder(root: Path, n_train: int = 60, n_test: int = 20, classes: int = 4, compress: bool = True) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    write_idx(root / "train-images-idx3-ubyte", rng.integers(0, 256, (n_train, 28, 28)), compress)
    write_idx(root / "train-labels-idx1-ubyte", np.arange(n_train) % classes, compress)
    write_idx(root / "t10k-images-idx3-ubyte", rng.integers(0, 256, (n_test, 28, 28)), not compress)
    write_idx(root / "t10k-labels-idx1-ubyte", np.arange(n_test) % classes, not compress)
    return root


def test_fashion_mnist_loads_from_the_debian_package() -> None:
    assert Path(FASHION_MNIST_ROOT, "train-images-idx3-ubyte.gz").is_file(), "make test installs dataset-fashion-mnist"
    data = DATASETS.get("fashion_mnist")()
    assert len(data.train) + len(data.val) == 60000 and len(data.val) == 5000 and len(data.test) == 10000
    assert data.num_classes == 10 and data.in_channels == 1
    assert data.train.images.dtype == torch.uint8 and data.train.images.shape[1:] == (1, 28, 28)
    assert sorted(data.test.labels.unique().tolist()) == list(range(10))
    images, _ = next(data.val.batches(5000))
    assert abs(images.mean().item()) < 0.05 and abs(images.std().item() - 1) < 0.05  # normalised
    subset = DATASETS.get("fashion_mnist")(train_subset=1000, seed=3)
    assert len(subset.train) == 1000 and len(subset.val) == 5000
    again = DATASETS.get("fashion_mnist")(train_subset=1000, seed=3)
    assert torch.equal(subset.train.labels, again.train.labels)  # seeded


@pytest.mark.parametrize("compress", [True, False])
def test_any_idx_folder_loads_gzip_or_not(tmp_path, compress) -> None:
    root = write_folder(tmp_path / "idx", compress=compress)
    data = DATASETS.get("idx")(root=str(root), val_fraction=0.25, augment="crop_flip")
    assert data.num_classes == 4 and len(data.train) == 45 and len(data.val) == 15 and len(data.test) == 20
    images, labels = next(data.train.batches(8, torch.Generator().manual_seed(0)))
    assert images.shape == (8, 1, 28, 28) and images.dtype == torch.float32 and labels.dtype == torch.long


def test_missing_and_malformed_files_are_named(tmp_path) -> None:
    with pytest.raises(DatasetFilesNotFoundError, match="missing train-images-idx3-ubyte"):
        DATASETS.get("idx")(root=str(tmp_path / "empty"))
    root = write_folder(tmp_path / "bad")
    (root / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x03garbage"))
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte.gz: not an IDX label file"):
        DATASETS.get("idx")(root=str(root))
