"""The handwritten digits bundled with scikit-learn: 1797 8x8 grey images, 10 classes."""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path
from typing import Annotated

import numpy as np
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
    raw_images, raw_labels = digits_arrays()
    images = torch.tensor(raw_images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(raw_labels, dtype=torch.long)
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


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """`sklearn.datasets.load_digits()`'s images, (1797, 8, 8) grey levels 0..16, and targets,
    (1797,) ints: read from the CSV file scikit-learn ships (64 pixels then the target per row)
    without importing scikit-learn, which takes most of a second in every process that loads the
    data (each trial's actor); through `load_digits` where that file is not found."""
    spec = importlib.util.find_spec("sklearn")  # finds the package without importing it
    locations = spec.submodule_search_locations if spec else None
    path = Path(locations[0], "datasets", "data", "digits.csv.gz") if locations else None
    if path is None or not path.is_file():
        from sklearn.datasets import load_digits

        bunch = load_digits()
        return bunch.images, bunch.target
    with gzip.open(path, "rt") as rows:
        table = np.loadtxt(rows, delimiter=",")
    return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)
