"""Datasets as tensors, split train/val/test, and shuffled mini-batches."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch


@dataclass(frozen=True)
class Split:
    """Images (N, C, H, W) float32 and integer labels (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device | str) -> Split:
        return Split(self.images.to(device), self.labels.to(device))


@dataclass(frozen=True)
class Dataset:
    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int
    #: How raw inputs become model inputs, for deployment (recorded with exports).
    preprocess: dict[str, Any] = field(default_factory=dict)

    @property
    def in_channels(self) -> int:
        return self.train.images.shape[1]

    def to(self, device: torch.device | str) -> Dataset:
        return replace(
            self, train=self.train.to(device), val=self.val.to(device), test=self.test.to(device)
        )


def seeded_split(
    n: int, fractions: tuple[float, float], seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Index sets (train, val, test) of a seeded permutation; `fractions` = (val, test)."""
    val_fraction, test_fraction = fractions
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = round(n * test_fraction)
    n_val = round((n - n_test) * val_fraction)
    test, val, train = order[:n_test], order[n_test : n_test + n_val], order[n_test + n_val :]
    return train, val, test


def batches(
    split: Split, batch_size: int, generator: torch.Generator | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Mini-batches of a split already on its device; shuffled when a generator is given."""
    n = len(split)
    if generator is None:
        order = torch.arange(n, device=split.labels.device)
    else:
        order = torch.randperm(n, generator=generator).to(split.labels.device)
    for start in range(0, n, batch_size):
        index = order[start : start + batch_size]
        yield split.images[index], split.labels[index]
