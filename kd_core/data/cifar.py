"""CIFAR-10 and CIFAR-100 as device-resident splits of uint8 images, augmented per batch.

The files are read through torchvision (its pickle layout); all images of a split become one
uint8 tensor (N, 3, 32, 32), and the split's transform augments and normalises each batch on
the training device. Validation is carved from the training set (model selection); the
official test set is the test split.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import torch
from annotated_types import Ge, Gt, Lt

from kd_core.data.augment import (
    AUGMENTATIONS,
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    AugmentationName,
    Stats,
)
from kd_core.data.base import Dataset, Split
from kd_core.data.registry import DATASETS

DEFAULT_ROOT = "~/.cache/kdsweep/data"


class DatasetFilesNotFoundError(FileNotFoundError):
    """The dataset's files are not under the given root (and download was not asked for)."""


@functools.cache
def _files_class(torchvision_name: str) -> Any:
    """torchvision's CIFAR10 or CIFAR100 (imported on first use: seconds), without its md5 checks.

    torchvision compares every file's md5 with the official release's. We check only that the
    files exist, so CIFAR-format files written elsewhere (the tests' generated ones, re-packed
    subsets) load too; a truncated file still fails when unpickled, and download() still checks
    the downloaded archive's md5."""
    import torchvision.datasets

    base = getattr(torchvision.datasets, torchvision_name)
    return type(f"_{torchvision_name}Files", (base,), {
        "train_list": [[name, None] for name, _ in base.train_list],
        "test_list": [[name, None] for name, _ in base.test_list],
        "meta": {**base.meta, "md5": None},
    })


def split_off_val(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Index sets (train, val) of a seeded permutation of range(n); both non-empty."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = max(1, round(n * val_fraction))
    if n_val >= n:
        raise ValueError(f"val_fraction {val_fraction} of {n} training images leaves no training images")
    return order[n_val:], order[:n_val]


def _uint8_split(files: Any) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.from_numpy(files.data).permute(0, 3, 1, 2).contiguous()  # torchvision keeps HWC
    return images, torch.tensor(files.targets, dtype=torch.long)


def _load(
    name: str, torchvision_name: str, mean: Stats, std: Stats, num_classes: int, *, root: str,
    download: bool, augment: str, val_fraction: float, seed: int, train_subset: int | None,
) -> Dataset:
    files_class = _files_class(torchvision_name)
    root = os.path.expanduser(root)
    folder = Path(root) / files_class.base_folder
    needed = [entry[0] for entry in files_class.train_list + files_class.test_list] + [files_class.meta["filename"]]
    missing = [file for file in needed if not (folder / file).is_file()]
    if missing and not download:
        raise DatasetFilesNotFoundError(
            f"{name} files not found in {folder} (missing: {', '.join(missing)}); pass `download: true` "
            f"in the dataset arguments to download them into root {root!r}, or set `root` to the folder "
            f"that holds {files_class.base_folder}/"
        )
    images, labels = _uint8_split(files_class(root, train=True, download=download))
    test_images, test_labels = _uint8_split(files_class(root, train=False))
    return uint8_dataset(name, (images, labels), (test_images, test_labels), num_classes, mean, std,
                         augment=augment, val_fraction=val_fraction, seed=seed, train_subset=train_subset,
                         input_format="uint8 RGB HWC -> CHW /255")


def uint8_dataset(
    name: str, train_set: tuple[torch.Tensor, torch.Tensor], test_set: tuple[torch.Tensor, torch.Tensor],
    num_classes: int, mean: Sequence[float], std: Sequence[float], *, augment: str, val_fraction: float,
    seed: int, train_subset: int | None, input_format: str,
) -> Dataset:
    """A device-resident Dataset from uint8 images (N, C, H, W) and labels (N,): val carved from
    the training set with `seed`, `train_subset` a seeded random part of the rest, the test set
    as given; batches augmented (`augment`) and normalised (`mean`, `std` per channel) on the
    device. Raises ValueError when `train_subset` exceeds the training images."""
    (images, labels), (test_images, test_labels) = train_set, test_set
    train_transform, eval_transform = AUGMENTATIONS.get(augment)(mean, std)
    train, val = split_off_val(len(labels), val_fraction, seed)
    if train_subset is not None:
        if train_subset > len(train):
            raise ValueError(f"train_subset {train_subset} exceeds the {len(train)} training images")
        train = train[:train_subset]  # already shuffled: a seeded random subset; val is unchanged
    return Dataset(
        name,
        Split(images[train], labels[train], train_transform),
        Split(images[val], labels[val], eval_transform),
        Split(test_images, test_labels, eval_transform),
        num_classes=num_classes,
        in_channels=images.shape[1],
        preprocess={"input": input_format, "mean": list(mean), "std": list(std), "augment": augment},
    )


@DATASETS.register("cifar10")
def cifar10(
    root: str = DEFAULT_ROOT,
    download: bool = False,
    augment: AugmentationName = "crop_flip",
    val_fraction: Annotated[float, Gt(0), Lt(1)] = 0.1,
    seed: int = 0,
    train_subset: Annotated[int, Ge(1)] | None = None,
) -> Dataset:
    """CIFAR-10: 50,000 training images (val carved from them) and 10,000 test images, 10 classes."""
    return _load("cifar10", "CIFAR10", CIFAR10_MEAN, CIFAR10_STD, 10, root=root, download=download,
                 augment=augment, val_fraction=val_fraction, seed=seed, train_subset=train_subset)


@DATASETS.register("cifar100")
def cifar100(
    root: str = DEFAULT_ROOT,
    download: bool = False,
    augment: AugmentationName = "crop_flip",
    val_fraction: Annotated[float, Gt(0), Lt(1)] = 0.1,
    seed: int = 0,
    train_subset: Annotated[int, Ge(1)] | None = None,
) -> Dataset:
    """CIFAR-100 (fine labels): 50,000 training images (val carved from them), 10,000 test, 100 classes."""
    return _load("cifar100", "CIFAR100", CIFAR100_MEAN, CIFAR100_STD, 100, root=root, download=download,
                 augment=augment, val_fraction=val_fraction, seed=seed, train_subset=train_subset)
