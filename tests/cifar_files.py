"""Write small CIFAR-10 / CIFAR-100 datasets in the real "python version" file layout.

The real files are Python 2 pickles: their `str` keys load as str with encoding="latin1" (as
torchvision reads them) and as bytes with encoding="bytes" (the CIFAR page's recipe, hence
b"data", b"labels"). Python 3's pickle cannot write a Python 2 str, so `_Py2Pickler` emits
that opcode for `_Py2Str` values; the files then load both ways, like the real ones.
"""

from __future__ import annotations

import pickle
import struct
from pathlib import Path
from typing import Any

import numpy as np

CIFAR10_FOLDER, CIFAR100_FOLDER = "cifar-10-batches-py", "cifar-100-python"


class _Py2Str(bytes):
    """A Python 2 `str` (bytes that loads as str under encoding='latin1')."""


class _Py2Pickler(pickle._Pickler):  # the pure-Python pickler: its dispatch table can be extended
    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj: _Py2Str) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[_Py2Str] = save_py2_str


def _py2(value: Any) -> Any:
    """Keys and strings as Python 2 str, recursively."""
    if isinstance(value, str):
        return _Py2Str(value.encode("latin1"))
    if isinstance(value, dict):
        return {_py2(k): _py2(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_py2(v) for v in value]
    return value


def _dump(path: Path, content: dict[str, Any]) -> None:
    with open(path, "wb") as file:
        _Py2Pickler(file, protocol=2).dump(_py2(content))


def _batch(rng: np.random.Generator, n: int, num_classes: int, label_keys: list[str], name: str) -> dict[str, Any]:
    labels = rng.integers(0, num_classes, n)
    batch = {"batch_label": name, "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
             "filenames": [f"{name.replace(' ', '_')}_{i}.png" for i in range(n)]}
    for key in label_keys:  # CIFAR-100's coarse labels are stand-ins: nothing here reads them
        batch[key] = [int(label) for label in (labels if key != "coarse_labels" else labels // 5)]
    return batch


def write_cifar(root: Path, num_classes: int, n_train: int, n_test: int, seed: int = 0) -> Path:
    """Random uint8 images with random labels, as CIFAR-10 (num_classes=10) or CIFAR-100 (100) files
    under `root`; returns `root` (pass it as the dataset's `root`)."""
    rng = np.random.default_rng(seed)
    if num_classes == 10:
        folder = root / CIFAR10_FOLDER
        folder.mkdir(parents=True, exist_ok=True)
        for i, part in enumerate(np.array_split(np.arange(n_train), 5), start=1):
            _dump(folder / f"data_batch_{i}", _batch(rng, len(part), 10, ["labels"], f"training batch {i} of 5"))
        _dump(folder / "test_batch", _batch(rng, n_test, 10, ["labels"], "testing batch 1 of 1"))
        _dump(folder / "batches.meta", {"num_cases_per_batch": n_test, "num_vis": 3072,
                                        "label_names": [f"class_{c}" for c in range(10)]})
    elif num_classes == 100:
        folder = root / CIFAR100_FOLDER
        folder.mkdir(parents=True, exist_ok=True)
        keys = ["fine_labels", "coarse_labels"]
        _dump(folder / "train", _batch(rng, n_train, 100, keys, "training batch 1 of 1"))
        _dump(folder / "test", _batch(rng, n_test, 100, keys, "testing batch 1 of 1"))
        _dump(folder / "meta", {"fine_label_names": [f"fine_{c}" for c in range(100)],
                                "coarse_label_names": [f"coarse_{c}" for c in range(20)]})
    else:
        raise ValueError(f"CIFAR has 10 or 100 classes, got {num_classes}")
    return root
