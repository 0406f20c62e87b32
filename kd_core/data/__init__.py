"""Datasets. Importing this package registers every dataset."""

from kd_core.data import cifar, digits, idx, image_folder, synthetic  # noqa: F401  (registers the datasets)
from kd_core.data.augment import AUGMENTATIONS, CropFlipNormalize, Normalize
from kd_core.data.base import BatchTransform, Dataset, Split, SplitLike, seeded_split
from kd_core.data.image_folder import LoaderSplit
from kd_core.data.registry import DATASETS

__all__ = ["AUGMENTATIONS", "DATASETS", "BatchTransform", "CropFlipNormalize", "Dataset", "LoaderSplit", "Normalize",
           "Split", "SplitLike", "seeded_split"]
