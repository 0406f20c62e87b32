"""What the benchmark scripts share: generated CIFAR-sized data, the environment record, JSON output."""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))  # run as `python benchmarks/X.py` from a checkout

from kd_core.data import CropFlipNormalize, Dataset, Normalize, Split  # noqa: E402
from kd_core.data.augment import CIFAR100_MEAN, CIFAR100_STD  # noqa: E402


def generated_cifar(train: int, classes: int = 100, held_out: int = 1000, seed: int = 0) -> Dataset:
    """Random uint8 images in CIFAR's shape (3x32x32) with the standard crop+flip augmentation.

    Their content is noise: these data measure speed, not accuracy."""
    g = torch.Generator().manual_seed(seed)

    def split(n: int, transform: Any) -> Split:
        images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
        return Split(images, torch.randint(0, classes, (n,), generator=g), transform)

    normalize = Normalize(CIFAR100_MEAN, CIFAR100_STD)
    return Dataset("generated_cifar", split(train, CropFlipNormalize(4, True, mean=CIFAR100_MEAN, std=CIFAR100_STD)),
                   split(held_out, normalize), split(held_out, normalize), num_classes=classes, in_channels=3)


def environment(device: torch.device | str = "cpu") -> dict[str, Any]:
    device = torch.device(device)
    return {"torch": torch.__version__, "python": platform.python_version(), "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}


def write_json(name: str, record: dict[str, Any], path: str | None = None) -> Path:
    target = Path(path) if path else RESULTS / f"{name}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(record, indent=2, default=str))
    print(f"wrote {target}")
    return target
