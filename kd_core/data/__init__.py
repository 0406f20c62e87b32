"""Datasets. Importing this package registers every dataset."""

from kd_core.data import digits  # noqa: F401  (registers the dataset)
from kd_core.data.base import Dataset, Split, batches, seeded_split
from kd_core.data.registry import DATASETS

__all__ = ["DATASETS", "Dataset", "Split", "batches", "seeded_split"]
