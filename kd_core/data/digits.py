"""The handwritten digits bundled with scikit-learn: 1797 8x8 grey images, 10 classes."""

from __future__ import annotations

from typing import Annotated

import torch
from annotated_types import Gt, Lt

from kd_core.data.base import Dataset, Split, seeded_split
from kd_core.data.registry import DATASETS


@DATASETS.register("digits")
def digits(
    seed: int = 0,
    val_fraction: Annotated[float, Gt(0), Lt(1)] = 0.15,
    test_fraction: Annotated[float, Gt(0), Lt(1)] = 0.2,
) -> Dataset:
    """Seeded train/val/test split; val is carved from the non-test part."""
    from sklearn.datasets import load_digits  # 3 s to import: only when the data is loaded

    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(bunch.target, dtype=torch.long)
    train, val, test = seeded_split(len(labels), (val_fraction, test_fraction), seed)
    # Normalise with training statistics only, so val and test stay unseen.
    mean, std = images[train].mean().item(), images[train].std().item()
    images = (images - mean) / std
    return Dataset(
        "digits",
        Split(images[train], labels[train]),
        Split(images[val], labels[val]),
        Split(images[test], labels[test]),
        num_classes=10,
        in_channels=1,
        preprocess={"input": "8x8 grey levels 0..16", "scale": 1 / 16, "mean": mean, "std": std},
    )
