"""Datasets. Importing this package registers every dataset."""

from kd_core.data import digits  # noqa: F401  (registers the dataset)
from kd_core.data.base import BatchTransform, Dataset, Split, SplitLike, seeded_split
from kd_core.data.registry import DATASETS

__all__ = ["DATASETS", "BatchTransform", "Dataset", "Split", "SplitLike", "seeded_split"]
