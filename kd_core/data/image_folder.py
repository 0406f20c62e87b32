"""Image folders (one sub-folder per class, e.g. ImageNet) read from disk through a DataLoader.

Too large to hold in memory, so each split is a `LoaderSplit`: same interface as `Split`, with
decoding and augmentation in DataLoader workers and batches moved to the training device.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Annotated, Any

import torch
from annotated_types import Ge, Gt, Lt
from torch.utils.data import DataLoader, RandomSampler, SequentialSampler, Subset
from torch.utils.data import Dataset as TorchDataset

from kd_core.data.augment import IMAGENET_MEAN, IMAGENET_STD
from kd_core.data.base import Dataset
from kd_core.data.cifar import split_off_val
from kd_core.data.registry import DATASETS

EVAL_CROP_FRACTION = 0.875  # resize to image_size / 0.875 (256 for 224), then centre-crop


@dataclass(frozen=True)
class LoaderSplit:
    """A map-style dataset of (image tensor, label) served in mini-batches by a DataLoader."""

    dataset: TorchDataset
    num_workers: int = 2
    device: torch.device | None = None  # None: batches stay on the CPU

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def to(self, device: torch.device | str) -> LoaderSplit:
        return replace(self, device=torch.device(device))

    def batches(
        self, batch_size: int, generator: torch.Generator | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Mini-batches in order, or shuffled by `generator` (which also seeds the workers' augmentation)."""
        if generator is None:
            sampler = SequentialSampler(self.dataset)
            # Workers' seeds are drawn from the loader's generator: a fixed one leaves the global RNG alone.
            generator = torch.Generator().manual_seed(0)
        else:
            sampler = RandomSampler(self.dataset, generator=generator)
        pin = self.device is not None and self.device.type == "cuda"
        loader = DataLoader(self.dataset, batch_size=batch_size, sampler=sampler, num_workers=self.num_workers,
                            pin_memory=pin, generator=generator)
        for images, labels in loader:
            if self.device is not None:
                images = images.to(self.device, non_blocking=True)
                labels = labels.to(self.device, non_blocking=True)
            yield images, labels


def _folder(path: str, role: str, transform: Any) -> Any:
    """torchvision's ImageFolder of `path`; FileNotFoundError naming `role` when unusable."""
    from torchvision.datasets import ImageFolder

    path = os.path.expanduser(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"image_folder: {role} {path!r} is not a directory")
    try:
        return ImageFolder(path, transform=transform)
    except FileNotFoundError as error:  # no class folders, or a class folder without images
        raise FileNotFoundError(f"image_folder: {role} {path!r} needs one sub-folder of images per class "
                                f"(.png, .jpg, ...): {error}") from None


@DATASETS.register("image_folder")
def image_folder(
    train_dir: str,
    val_dir: str,
    image_size: Annotated[int, Ge(8)] = 224,
    val_fraction: Annotated[float, Gt(0), Lt(1)] = 0.1,
    seed: int = 0,
    batch_workers: Annotated[int, Ge(0)] = 2,
) -> Dataset:
    """Train on `train_dir` less a seeded validation part (model selection); `val_dir` is the test split."""
    from torchvision import transforms  # torchvision takes seconds to import: only when used
    from torchvision.datasets.vision import StandardTransform

    normalize = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train_transform = transforms.Compose([
        transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip(), transforms.ToTensor(), normalize,
    ])
    resize = round(image_size / EVAL_CROP_FRACTION)
    eval_transform = transforms.Compose([
        transforms.Resize(resize), transforms.CenterCrop(image_size), transforms.ToTensor(), normalize,
    ])
    train_folder = _folder(train_dir, "train_dir", train_transform)
    test_folder = _folder(val_dir, "val_dir", eval_transform)
    if train_folder.classes != test_folder.classes:
        only_train = sorted(set(train_folder.classes) - set(test_folder.classes))
        only_val = sorted(set(test_folder.classes) - set(train_folder.classes))
        raise ValueError(f"image_folder: train_dir and val_dir must hold the same class folders; "
                         f"only in train_dir: {only_train or 'none'}, only in val_dir: {only_val or 'none'}")
    # The validation part is read like the test split: same files list, evaluation transform.
    val_folder = copy.copy(train_folder)
    val_folder.transform, val_folder.transforms = eval_transform, StandardTransform(eval_transform)
    train, val = split_off_val(len(train_folder), val_fraction, seed)
    return Dataset(
        "image_folder",
        LoaderSplit(Subset(train_folder, train.tolist()), batch_workers),
        LoaderSplit(Subset(val_folder, val.tolist()), batch_workers),
        LoaderSplit(test_folder, batch_workers),
        num_classes=len(train_folder.classes),
        in_channels=3,
        preprocess={"input": "RGB image file", "resize": resize, "center_crop": image_size,
                    "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "classes": train_folder.classes},
    )
