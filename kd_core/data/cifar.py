"""CIFAR-10 and CIFAR-100 as device-resident splits of uint8 images, augmented per batch.

The files are read through torchvision (its pickle layout); all images of a split become one
uint8 tensor (N, 3, 32, 32), and the split's transform augments and normalises each batch on
the training device. Validation is carved from the training set (model selection); the
official test set is the test split.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
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


@dataclass(frozen=True)
class CifarFiles:
    """One CIFAR variant's file layout (the "python version" archive)."""

    folder: str
    train: tuple[str, ...]
    test: str
    meta: str
    labels_key: str
    torchvision_name: str  # whose url, archive name and md5 `download` uses


CIFAR10_FILES = CifarFiles("cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), "test_batch",
                           "batches.meta", "labels", "CIFAR10")
CIFAR100_FILES = CifarFiles("cifar-100-python", ("train",), "test", "meta", "fine_labels", "CIFAR100")
IMAGE_VALUES = 3 * 32 * 32


class CifarFileError(ValueError):
    """A CIFAR file that is damaged, of the wrong layout, or would run code when unpickled."""


def _latin1_encode(text: str, encoding: str) -> bytes:
    """`_codecs.encode` as protocol-2 pickles use it for bytes (numpy's raw array data), only that."""
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"encoding {encoding!r} is not part of the CIFAR format")
    return text.encode("latin1")


def _allowed_globals() -> dict[tuple[str, str], Callable[..., Any]]:
    # numpy pickles an array as _reconstruct(ndarray, ...) + dtype + raw bytes; the module of
    # _reconstruct is numpy.core.multiarray in the official files (numpy 1) and numpy._core in
    # files written by numpy 2. Nothing else may be named.
    reconstruct = np.ndarray((0,), np.uint8).__reduce__()[0]
    found = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype, ("_codecs", "encode"): _latin1_encode}
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        found[module, "_reconstruct"] = reconstruct
    return found


class _Refused(pickle.UnpicklingError):
    """A global outside the CIFAR format: refused before it is looked up, let alone called."""


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles only the CIFAR format's objects: every other global is refused before it is called."""

    allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.allowed[module, name]
        except KeyError:
            raise _Refused(f"it refers to {module}.{name}, which the CIFAR format never does "
                           "(loading it could run code)") from None


def read_cifar_file(path: Path) -> dict[str, Any]:
    """One CIFAR file as a dict with str keys. Raises CifarFileError naming the file when it is
    unreadable, truncated, not a dict, or would need anything beyond the format's objects."""
    try:
        with open(path, "rb") as file:
            content = _CifarUnpickler(file, encoding="latin1").load()
    except _Refused as error:
        raise CifarFileError(f"CIFAR file {path}: refused, {error}") from None
    except Exception as error:  # nothing runs while loading, so any error means a damaged file
        raise CifarFileError(f"CIFAR file {path}: unreadable or truncated ({type(error).__name__})") from None
    if not isinstance(content, dict):
        raise CifarFileError(f"CIFAR file {path}: holds a {type(content).__name__}, not a dict")
    return content


def read_cifar_batches(paths: Sequence[Path], labels_key: str, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 3, 32, 32) uint8 and labels (N,) of CIFAR batch files, each checked:
    `data` a uint8 array of N rows of 3072 values, `labels_key` N labels in [0, num_classes)."""
    images, labels = [], []
    for path in paths:
        batch = read_cifar_file(path)
        data, targets = batch.get("data"), batch.get(labels_key)
        if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
                and data.shape[1] == IMAGE_VALUES):
            found = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
            raise CifarFileError(f"CIFAR file {path}: 'data' must be uint8 of shape (N, {IMAGE_VALUES}), "
                                 f"found {found}")
        if not isinstance(targets, list) or len(targets) != len(data) or not all(
                isinstance(t, int) and 0 <= t < num_classes for t in targets):
            raise CifarFileError(f"CIFAR file {path}: {labels_key!r} must be {len(data)} labels in "
                                 f"0..{num_classes - 1}")
        images.append(torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()))
        labels.append(torch.tensor(targets, dtype=torch.long))
    return torch.cat(images), torch.cat(labels)


def _download(root: str, files: CifarFiles) -> None:
    """The official archive into `root`, checked against torchvision's recorded md5."""
    import torchvision.datasets
    from torchvision.datasets.utils import download_and_extract_archive

    official = getattr(torchvision.datasets, files.torchvision_name)
    download_and_extract_archive(official.url, root, filename=official.filename, md5=official.tgz_md5)


def split_off_val(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Index sets (train, val) of a seeded permutation of range(n); both non-empty."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = max(1, round(n * val_fraction))
    if n_val >= n:
        raise ValueError(f"val_fraction {val_fraction} of {n} training images leaves no training images")
    return order[n_val:], order[:n_val]


def _load(
    name: str, files: CifarFiles, mean: Stats, std: Stats, num_classes: int, *, root: str,
    download: bool, augment: str, val_fraction: float, seed: int, train_subset: int | None,
) -> Dataset:
    root = os.path.expanduser(root)
    folder = Path(root) / files.folder
    needed = [*files.train, files.test, files.meta]
    missing = [file for file in needed if not (folder / file).is_file()]
    if missing and download:
        _download(root, files)
        missing = [file for file in needed if not (folder / file).is_file()]
    if missing:
        raise DatasetFilesNotFoundError(
            f"{name} files not found in {folder} (missing: {', '.join(missing)}); pass `download: true` "
            f"in the dataset arguments to download them into root {root!r}, or set `root` to the folder "
            f"that holds {files.folder}/"
        )
    read_cifar_file(folder / files.meta)  # as torchvision did: a damaged meta file is named too
    images, labels = read_cifar_batches([folder / file for file in files.train], files.labels_key, num_classes)
    test_images, test_labels = read_cifar_batches([folder / files.test], files.labels_key, num_classes)
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
    return _load("cifar10", CIFAR10_FILES, CIFAR10_MEAN, CIFAR10_STD, 10, root=root, download=download,
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
    return _load("cifar100", CIFAR100_FILES, CIFAR100_MEAN, CIFAR100_STD, 100, root=root, download=download,
                 augment=augment, val_fraction=val_fraction, seed=seed, train_subset=train_subset)
