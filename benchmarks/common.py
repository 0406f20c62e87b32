"""What the benchmark scripts share: generated CIFAR-sized data, the environment record, JSON output."""

from __future__ import annotations

import argparse
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
from kd_core.recipes import Recipe  # noqa: E402
from kd_core.train import fit  # noqa: E402


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


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo; `platform.processor()` elsewhere): CPU figures
    move with it, several-fold between the machines this project runs on."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment(device: torch.device | str = "cpu") -> dict[str, Any]:
    device = torch.device(device)
    return {"torch": torch.__version__, "python": platform.python_version(), "cpus": os.cpu_count(),
            "cpu_model": cpu_model(),
            "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}


def write_json(name: str, record: dict[str, Any], path: str | None = None) -> Path:
    target = Path(path) if path else RESULTS / f"{name}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(record, indent=2, default=str))
    print(f"wrote {target}")
    return target


def training_parser(description: str, train: int, epochs: int) -> argparse.ArgumentParser:
    """The arguments of the training benchmarks: device, generated data size, timing, GPU options."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--train", type=int, default=train, help="training images")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=epochs, help="timed epochs each, after one warm-up round")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json")
    return parser


def training_setup(args: argparse.Namespace) -> tuple[torch.device, Dataset]:
    """Torch threads set, the device, and generated CIFAR-sized data on it."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    return device, generated_cifar(args.train, args.classes, held_out=max(args.train // 10, 200)).to(device)


def fit_epoch_seconds(model: torch.nn.Module, data: Dataset, recipe: Recipe, **options: Any) -> float:
    """`fit`'s own epoch time (train + val) of one epoch (`recipe.epochs` must be 1)."""
    seconds: list[float] = []
    fit(model, data, recipe, callback=lambda report: seconds.append(report.metrics["epoch_time"]), **options)
    return seconds[0]
