"""Datasets on generated files (CIFAR pickles, PNG folders) and the batch augmentation."""

from __future__ import annotations

import math
import pickle
import typing
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kd_core.data import AUGMENTATIONS, DATASETS, CropFlipNormalize, Dataset, Normalize
from kd_core.data.augment import CIFAR10_MEAN, CIFAR100_MEAN, AugmentationName
from kd_core.data.cifar import DatasetFilesNotFoundError
from kd_core.distillers import DISTILLERS
from kd_core.models import build_model
from kd_core.recipes import build_recipe
from kd_core.train import fit
from sweeps.spec import factory_args
from tests.cifar_files import CIFAR10_FOLDER, CIFAR100_FOLDER, write_cifar

N_TRAIN, N_TEST = 250, 50


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cifar")
    write_cifar(root, 10, N_TRAIN, N_TEST, seed=1)
    write_cifar(root, 100, N_TRAIN, N_TEST, seed=2)
    return root


def raw_rows(root: Path, num_classes: int, train: bool) -> tuple[np.ndarray, list[int]]:
    """The images (N x 3072, CHW order) and labels as stored in the files, read the CIFAR page's way."""
    if num_classes == 10:
        names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
        folder, label_key = root / CIFAR10_FOLDER, b"labels"
    else:
        names, folder, label_key = ["train" if train else "test"], root / CIFAR100_FOLDER, b"fine_labels"
    entries = [pickle.load(open(folder / name, "rb"), encoding="bytes") for name in names]
    return np.concatenate([e[b"data"] for e in entries]), [label for e in entries for label in e[label_key]]


def rows(images: torch.Tensor) -> list[bytes]:
    return [image.flatten().numpy().tobytes() for image in images]


@pytest.mark.parametrize("name, num_classes, mean", [("cifar10", 10, CIFAR10_MEAN), ("cifar100", 100, CIFAR100_MEAN)])
def test_cifar_loads_generated_files(cifar_root: Path, name: str, num_classes: int, mean: tuple) -> None:
    data = DATASETS.get(name)(root=str(cifar_root), val_fraction=0.2, seed=0)
    assert (data.num_classes, data.in_channels) == (num_classes, 3)
    assert (len(data.train), len(data.val), len(data.test)) == (200, 50, N_TEST)
    for split in (data.train, data.val, data.test):
        assert split.images.dtype == torch.uint8 and split.images.shape[1:] == (3, 32, 32)
        assert split.labels.dtype == torch.int64
        assert 0 <= split.labels.min() and split.labels.max() < num_classes
    # Every image is a stored one with its stored label; CHW flattened equals the stored row.
    data_rows, labels = raw_rows(cifar_root, num_classes, train=True)
    stored = {row.tobytes(): label for row, label in zip(data_rows, labels)}
    train_rows, val_rows = rows(data.train.images), rows(data.val.images)
    assert not set(train_rows) & set(val_rows)  # disjoint
    assert set(train_rows) | set(val_rows) == set(stored)
    assert [stored[r] for r in train_rows] == data.train.labels.tolist()
    assert [stored[r] for r in val_rows] == data.val.labels.tolist()
    test_rows, test_labels = raw_rows(cifar_root, num_classes, train=False)
    assert rows(data.test.images) == [row.tobytes() for row in test_rows]  # the official test set, in order
    assert data.test.labels.tolist() == test_labels
    # Batches: augmented and normalised on the way out.
    images, labels = next(data.train.batches(16, torch.Generator().manual_seed(0)))
    assert images.dtype == torch.float32 and images.shape == (16, 3, 32, 32) and labels.shape == (16,)
    assert data.preprocess["mean"] == list(mean)


def test_cifar_val_split_is_seeded(cifar_root: Path) -> None:
    def val_rows(seed: int) -> list[bytes]:
        return rows(DATASETS.get("cifar10")(root=str(cifar_root), seed=seed).val.images)

    assert val_rows(0) == val_rows(0)
    assert set(val_rows(0)) != set(val_rows(1))


def test_cifar_train_subset_keeps_val(cifar_root: Path) -> None:
    full = DATASETS.get("cifar100")(root=str(cifar_root))
    small = DATASETS.get("cifar100")(root=str(cifar_root), train_subset=40)
    assert len(small.train) == 40
    assert set(rows(small.train.images)) <= set(rows(full.train.images))
    assert torch.equal(small.val.images, full.val.images)
    with pytest.raises(ValueError, match="train_subset"):
        DATASETS.get("cifar100")(root=str(cifar_root), train_subset=10_000)


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_missing_cifar_files_name_the_path_and_download(tmp_path: Path, name: str) -> None:
    with pytest.raises(DatasetFilesNotFoundError) as error:
        DATASETS.get(name)(root=str(tmp_path))
    assert isinstance(error.value, FileNotFoundError)
    assert str(tmp_path) in str(error.value) and "download: true" in str(error.value)


def test_spec_validation_of_the_new_factories() -> None:
    assert set(typing.get_args(AugmentationName)) == set(AUGMENTATIONS.names())
    assert factory_args(DATASETS.get("cifar10"), {})["augment"] == "crop_flip"
    with pytest.raises(ValueError, match="augment"):
        factory_args(DATASETS.get("cifar10"), {"augment": "mixup"})
    with pytest.raises(ValueError, match="missing argument 'train_dir', 'val_dir'"):
        factory_args(DATASETS.get("image_folder"), {})


def test_fit_runs_on_cifar_splits(cifar_root: Path) -> None:
    data = DATASETS.get("cifar10")(root=str(cifar_root))
    torch.manual_seed(0)
    ce = DISTILLERS.get("ce")
    distiller = ce(build_model("convnet", 10, 3, {"width": 4}), [], ce.make_params())
    result = fit(distiller, data, build_recipe("digits", {"epochs": 1, "batch_size": 32}))
    assert result.epochs_run == 1
    assert math.isfinite(result.metrics["train_loss"]) and 0 <= result.metrics["test_acc"] <= 1


# --- image folders ---------------------------------------------------------------------------------


def write_folder(root: Path, classes: list[str], per_class: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            size = tuple(int(s) for s in rng.integers(20, 40, 2))  # mixed sizes: the transforms unify them
            Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("folders")
    classes = ["cat", "dog", "fox"]
    return write_folder(root / "train", classes, 6, seed=0), write_folder(root / "val", classes, 2, seed=1)


def image_folder(folders: tuple[Path, Path], **args: object) -> Dataset:
    args = {"image_size": 16, "val_fraction": 0.2, "batch_workers": 0, **args}
    return DATASETS.get("image_folder")(train_dir=str(folders[0]), val_dir=str(folders[1]), **args)


def test_image_folder_loads_and_batches(folders: tuple[Path, Path]) -> None:
    data = image_folder(folders)
    assert (data.num_classes, data.in_channels) == (3, 3)
    assert (len(data.train), len(data.val), len(data.test)) == (14, 4, 6)
    assert data.preprocess["classes"] == ["cat", "dog", "fox"]
    data = data.to("cpu")
    batches = list(data.train.batches(5, torch.Generator().manual_seed(0)))
    assert [len(labels) for _, labels in batches] == [5, 5, 4]
    assert all(images.shape[1:] == (3, 16, 16) and images.dtype == torch.float32 for images, _ in batches)
    test_batches = list(data.test.batches(4))
    assert torch.cat([labels for _, labels in test_batches]).tolist() == [0, 0, 1, 1, 2, 2]  # sequential
    again = list(data.test.batches(4))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(test_batches, again))  # evaluation is deterministic


def test_image_folder_with_workers_is_seeded(folders: tuple[Path, Path]) -> None:
    data = image_folder(folders, batch_workers=2)  # workers' augmentation is seeded by the generator
    first = list(data.train.batches(7, torch.Generator().manual_seed(3)))
    second = list(data.train.batches(7, torch.Generator().manual_seed(3)))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, second))


def test_image_folder_errors(folders: tuple[Path, Path], tmp_path: Path) -> None:
    train, val = folders
    with pytest.raises(FileNotFoundError, match="train_dir .*nowhere.* is not a directory"):
        DATASETS.get("image_folder")(train_dir=str(tmp_path / "nowhere"), val_dir=str(val))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="val_dir .*empty.* one sub-folder of images per class"):
        DATASETS.get("image_folder")(train_dir=str(train), val_dir=str(tmp_path / "empty"))
    other = write_folder(tmp_path / "other", ["cat", "dog", "owl"], 1, seed=2)
    with pytest.raises(ValueError, match=r"only in train_dir: \['fox'\], only in val_dir: \['owl'\]"):
        DATASETS.get("image_folder")(train_dir=str(train), val_dir=str(other))


# --- augmentation ----------------------------------------------------------------------------------

IDENTITY = {"mean": (0.0, 0.0, 0.0), "std": (1 / 255, 1 / 255, 1 / 255)}  # normalisation leaves 0..255 values


def coordinate_images(n: int, size: int = 32) -> torch.Tensor:
    """uint8 images whose pixel (y, x) is (y + 1, x + 1, sample + 1): 0 only in padding."""
    y, x = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    images = torch.stack([y + 1, x + 1, torch.zeros_like(y)]).expand(n, 3, size, size).clone()
    images[:, 2] = torch.arange(1, n + 1).view(n, 1, 1)
    return images.to(torch.uint8)


def crop_shift(out: torch.Tensor, k: int, padding: int) -> tuple[int, int] | None:
    """(dy, dx) if output image `out` is image k of `coordinate_images` shifted by it, with zero padding."""
    inside = out[2] != 0
    assert (out[:, ~inside] == 0).all()  # zero padding, whole pixels
    assert (out[2, inside] == k + 1).all()  # from its own source image
    i, j = torch.where(inside)
    dy, dx = out[0, inside] - 1 - i, out[1, inside] - 1 - j
    if len(dy.unique()) != 1 or len(dx.unique()) != 1:
        return None
    dy, dx = int(dy[0]), int(dx[0])
    assert -padding <= dy <= padding and -padding <= dx <= padding
    assert inside.sum() == (32 - abs(dy)) * (32 - abs(dx))  # every in-bounds source pixel is used
    return dy, dx


@pytest.mark.parametrize("flip", [False, True])
def test_crops_stay_in_bounds_with_one_offset_per_sample(flip: bool) -> None:
    images, padding = coordinate_images(64), 4
    out = CropFlipNormalize(padding, flip=flip, **IDENTITY)(images, torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.dtype == torch.float32
    out = out.round().long()
    offsets, flips = set(), 0
    for k in range(len(images)):
        shift = crop_shift(out[k], k, padding)
        if shift is None and flip:  # a flipped crop: un-flipped, it is a plain shifted crop
            shift, flips = crop_shift(out[k].flip(2), k, padding), flips + 1
        assert shift is not None  # one (dy, dx) per sample
        offsets.add(shift)
    assert len(offsets) > 10  # offsets differ between samples
    assert 10 < flips < 54 if flip else flips == 0


def test_flips_flip_some_samples() -> None:
    images = coordinate_images(64)
    out = CropFlipNormalize(0, flip=True, **IDENTITY)(images, torch.Generator().manual_seed(0)).round()
    flipped = [torch.equal(o, torch.flip(i, dims=[2]).float()) for o, i in zip(out, images)]
    unflipped = [torch.equal(o, i.float()) for o, i in zip(out, images)]
    assert all(f != u for f, u in zip(flipped, unflipped))  # each sample is exactly one of the two
    assert 10 < sum(flipped) < 54


def test_normalised_statistics() -> None:
    generator = torch.Generator().manual_seed(0)
    mean, std = torch.tensor([0.2, 0.5, 0.6]), torch.tensor([0.05, 0.1, 0.12])  # 0..1 holds mean +- 3.3 std
    pixels = mean.view(1, 3, 1, 1) + std.view(1, 3, 1, 1) * torch.randn(256, 3, 16, 16, generator=generator)
    images = (pixels * 255).round().clamp(0, 255).to(torch.uint8)
    stats = {"mean": mean.tolist(), "std": std.tolist()}
    for transform in (Normalize(**stats), CropFlipNormalize(0, **stats)):
        out = transform(images, torch.Generator().manual_seed(1))
        torch.testing.assert_close(out.mean((0, 2, 3)), torch.zeros(3), atol=0.02, rtol=0)
        torch.testing.assert_close(out.std((0, 2, 3)), torch.ones(3), atol=0.03, rtol=0)
    floats = Normalize(mean.tolist(), std.tolist())(pixels, None)  # float input is taken as 0..1
    torch.testing.assert_close(floats, (pixels - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1))


def test_augmentation_is_seeded_and_eval_is_plain_normalisation() -> None:
    images = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    train, evaluation = AUGMENTATIONS.get("crop_flip")((0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    first = train(images, torch.Generator().manual_seed(5))
    assert torch.equal(first, train(images, torch.Generator().manual_seed(5)))
    assert not torch.equal(first, train(images, torch.Generator().manual_seed(6)))
    plain = Normalize((0.5, 0.4, 0.3), (0.2, 0.25, 0.3))(images, None)
    assert torch.equal(train(images, None), plain) and torch.equal(evaluation(images, None), plain)
    none_train, _ = AUGMENTATIONS.get("none")((0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    assert torch.equal(none_train(images, torch.Generator().manual_seed(5)), plain)
    torch.testing.assert_close(plain, (images.float() / 255 - torch.tensor([0.5, 0.4, 0.3]).view(3, 1, 1))
                               / torch.tensor([0.2, 0.25, 0.3]).view(3, 1, 1))


def test_digits_are_scikit_learns_read_without_importing_it(monkeypatch) -> None:
    """The digits file is read directly (a trial's actor does not pay scikit-learn's import) and
    holds exactly `load_digits()`'s arrays; without the file, `load_digits` itself is used."""
    import importlib.util
    import subprocess
    import sys

    from sklearn.datasets import load_digits

    from kd_core.data.digits import digits_arrays

    bunch = load_digits()
    images, labels = digits_arrays()
    np.testing.assert_array_equal(images, bunch.images)
    np.testing.assert_array_equal(labels, bunch.target)
    assert labels.dtype == bunch.target.dtype
    imported = subprocess.run(
        [sys.executable, "-c", "import sys; from kd_core.data import DATASETS; DATASETS.get('digits')(); "
                               "print('sklearn' in sys.modules)"], capture_output=True, text=True, check=True)
    assert imported.stdout.strip() == "False"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    fallback_images, fallback_labels = digits_arrays()
    np.testing.assert_array_equal(fallback_images, bunch.images)
    np.testing.assert_array_equal(fallback_labels, bunch.target)
