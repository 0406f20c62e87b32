"""Datasets as splits that yield mini-batches on the training device.

A `Split` holds a whole split as tensors on one device (device-resident batching): images
are float, or uint8 with a `transform` applied per batch (augmentation and normalisation
happen there, with no per-sample Python work). Splits too large for memory implement the
same `batches`/`__len__`/`to` interface over a DataLoader.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch


class BatchTransform(Protocol):
    """Turns a batch of stored images into model inputs on the same device.

    `generator` is None for deterministic use (evaluation); training passes one.
    """

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor: ...


class SplitLike(Protocol):
    def __len__(self) -> int: ...

    def batches(
        self, batch_size: int, generator: torch.Generator | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...

    def to(self, device: torch.device | str) -> SplitLike: ...


@dataclass(frozen=True)
class Split:
    """Images (N, C, H, W) and integer labels (N,), on one device."""

    images: torch.Tensor
    labels: torch.Tensor
    transform: BatchTransform | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device | str) -> Split:
        return replace(self, images=self.images.to(device), labels=self.labels.to(device))

    def batches(
        self, batch_size: int, generator: torch.Generator | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Mini-batches in order, or shuffled (and augmented) when a CPU generator is given."""
        n = len(self)
        device = self.labels.device
        if generator is None:
            order = torch.arange(n, device=device)
        else:
            order = torch.randperm(n, generator=generator).to(device)
        for start in range(0, n, batch_size):
            index = order[start : start + batch_size]
            images = self.images[index]
            if self.transform is not None:
                images = self.transform(images, generator)
            yield images, self.labels[index]


@dataclass(frozen=True)
class Dataset:
    name: str
    train: SplitLike
    val: SplitLike
    test: SplitLike
    num_classes: int
    in_channels: int
    #: How raw inputs become model inputs, for deployment (recorded with exports).
    preprocess: dict[str, Any] = field(default_factory=dict)

    def to(self, device: torch.device | str) -> Dataset:
        return replace(
            self, train=self.train.to(device), val=self.val.to(device), test=self.test.to(device)
        )


def seeded_split(
    n: int, fractions: tuple[float, float], seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Index sets (train, val, test) of a seeded permutation; `fractions` = (val, test)."""
    val_fraction, test_fraction = fractions
    if not (0 < val_fraction < 1 and 0 < test_fraction < 1):
        raise ValueError(f"split fractions must lie in (0, 1), got val {val_fraction}, test {test_fraction}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = round(n * test_fraction)
    n_val = round((n - n_test) * val_fraction)
    test, val, train = order[:n_test], order[n_test : n_test + n_val], order[n_test + n_val :]
    return train, val, test
