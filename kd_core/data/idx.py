"""MNIST-format (IDX) datasets: Fashion-MNIST from Debian's `dataset-fashion-mnist` package, and
any folder holding the four IDX files (gzip-compressed or not).

The files are read with torchvision's MNIST-format readers; all images of a split become one
uint8 tensor (N, 1, 28, 28) on the training device, normalised (and optionally augmented) per
batch. Validation is carved from the training set with a seed; the official test set is the
test split; `train_subset` keeps a seeded random part of the training images (CPU-sized runs).
"""

from __future__ import annotations

import gzip
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import torch
from annotated_types import Ge, Gt, Lt

from kd_core.data.augment import AugmentationName
from kd_core.data.base import Dataset
from kd_core.data.cifar import DatasetFilesNotFoundError, uint8_dataset
from kd_core.data.registry import DATASETS

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"  # where `apt-get install dataset-fashion-mnist` puts it
# Per-channel statistics of the 60,000 Fashion-MNIST training images (pixel values / 255).
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)
FILES = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
         "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}


def _find(root: Path, stem: str) -> Path | None:
    for candidate in (root / stem, root / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def read_idx(path: Path, labels: bool) -> torch.Tensor:
    """One IDX file (gzip or not) as a uint8 tensor: images (N, H, W) or labels (N,).

    Raises ValueError naming the file when it is not a well-formed IDX file of that kind.
    """
    from torchvision.datasets.mnist import read_image_file, read_label_file  # slow import: on use

    reader = read_label_file if labels else read_image_file
    try:
        if path.suffix != ".gz":
            return reader(str(path))
        with tempfile.NamedTemporaryFile(suffix=".idx") as plain:  # torchvision reads plain files
            with gzip.open(path, "rb") as compressed:
                shutil.copyfileobj(compressed, plain)
            plain.flush()
            return reader(plain.name)
    except (AssertionError, OSError, EOFError, RuntimeError, ValueError) as error:
        kind = "label" if labels else "image"
        raise ValueError(f"{path}: not an IDX {kind} file ({type(error).__name__}: {error})") from None


def load_idx(
    name: str, root: str, num_classes: int | None, mean: Sequence[float], std: Sequence[float], *,
    augment: str, val_fraction: float, seed: int, train_subset: int | None,
) -> Dataset:
    """The four IDX files under `root` as a Dataset; `num_classes` None: max label + 1."""
    folder = Path(os.path.expanduser(root))
    found = {key: _find(folder, stem) for key, stem in FILES.items()}
    missing = [FILES[key] for key, path in found.items() if path is None]
    if missing:
        hint = " (install Debian's dataset-fashion-mnist package)" if root == FASHION_MNIST_ROOT else ""
        raise DatasetFilesNotFoundError(f"{name}: IDX files not found in {folder}{hint}: missing "
                                        f"{', '.join(missing)} (gzip or not)")
    images, labels = read_idx(found["train_images"], False), read_idx(found["train_labels"], True).long()
    test_images, test_labels = read_idx(found["test_images"], False), read_idx(found["test_labels"], True).long()
    for split, (x, y) in {"train": (images, labels), "test": (test_images, test_labels)}.items():
        if len(x) != len(y):
            raise ValueError(f"{name}: {split} has {len(x)} images but {len(y)} labels in {folder}")
    classes = num_classes or int(max(labels.max(), test_labels.max())) + 1
    return uint8_dataset(name, (images.unsqueeze(1), labels), (test_images.unsqueeze(1), test_labels), classes,
                         mean, std, augment=augment, val_fraction=val_fraction, seed=seed, train_subset=train_subset,
                         input_format="uint8 grey (N, 1, H, W) /255")


@DATASETS.register("fashion_mnist")
def fashion_mnist(
    root: str = FASHION_MNIST_ROOT,
    augment: AugmentationName = "none",
    val_fraction: Annotated[float, Gt(0), Lt(1)] = 1 / 12,
    seed: int = 0,
    train_subset: Annotated[int, Ge(1)] | None = None,
) -> Dataset:
    """Fashion-MNIST (Xiao et al. 2017): 60,000 training images (val carved from them, 5,000 by
    default) and 10,000 test images, 28x28 grey, 10 classes."""
    return load_idx("fashion_mnist", root, 10, FASHION_MNIST_MEAN, FASHION_MNIST_STD, augment=augment,
                    val_fraction=val_fraction, seed=seed, train_subset=train_subset)


@DATASETS.register("idx")
def idx(
    root: str,
    mean: float = 0.5,
    std: Annotated[float, Gt(0)] = 0.5,
    augment: AugmentationName = "none",
    val_fraction: Annotated[float, Gt(0), Lt(1)] = 1 / 12,
    seed: int = 0,
    train_subset: Annotated[int, Ge(1)] | None = None,
) -> Dataset:
    """Any MNIST-format folder (MNIST, KMNIST, ...): the four IDX files under `root` with
    MNIST's file names; classes = the largest label + 1; `mean`/`std` of pixel values / 255."""
    return load_idx("idx", root, None, (mean,), (std,), augment=augment, val_fraction=val_fraction,
                    seed=seed, train_subset=train_subset)
