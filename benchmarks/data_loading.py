"""Epoch throughput of device-resident augmentation vs a torchvision DataLoader, on CIFAR-sized data.

Both pipelines serve the same generated images (uint8, 3x32x32; nothing is downloaded) with the
same augmentation (4-pixel zero-padded random crop, horizontal flip, normalisation), batch 128,
and deliver batches on the same device:

- device-resident: `Split` holding all images on the device, `CropFlipNormalize` per batch;
- DataLoader: a Dataset of PIL images with RandomCrop(32, padding=4), RandomHorizontalFlip,
  ToTensor, Normalize, `--workers` worker processes (persistent), pinned memory on CUDA.

One warm-up epoch each, then `--epochs` timed epochs (synchronised on CUDA). Prints a table and the
ratio device-resident / DataLoader; writes the figures as JSON.

    .venv/bin/python benchmarks/data_loading.py                       # cuda if available, else cpu
    .venv/bin/python benchmarks/data_loading.py --device cpu --images 20000 --epochs 5 --workers 4
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms

from kd_core.data import CropFlipNormalize, Split
from kd_core.data.augment import CIFAR100_MEAN, CIFAR100_STD

ROOT = Path(__file__).resolve().parent.parent
BATCH_SIZE = 128


class PILImages(torch.utils.data.Dataset):
    """HWC uint8 images served as PIL images, like torchvision's CIFAR datasets."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Callable) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(Image.fromarray(self.images[index])), int(self.labels[index])


def time_epochs(epoch: Callable[[int], Iterator[tuple[torch.Tensor, torch.Tensor]]], epochs: int,
                device: torch.device) -> list[float]:
    """Seconds per epoch for one warm-up epoch (dropped) and `epochs` timed ones."""
    seconds = []
    for index in range(epochs + 1):
        started = time.perf_counter()
        for _batch in epoch(index):
            pass  # the batches are produced (augmented, on the device); nothing consumes them
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - started)
    return seconds[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs, after one warm-up epoch")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    parser.add_argument("--threads", type=int, help="torch intra-op threads of the main process (default: torch's)")
    parser.add_argument("--json", default=str(ROOT / "benchmarks/results/data_loading.json"))
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    rng = np.random.default_rng(0)
    images_hwc = rng.integers(0, 256, (args.images, 32, 32, 3), dtype=np.uint8)  # as CIFAR's .data
    labels = rng.integers(0, args.classes, args.images)

    split = Split(torch.from_numpy(images_hwc).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels),
                  CropFlipNormalize(4, True, mean=CIFAR100_MEAN, std=CIFAR100_STD)).to(device)

    def resident_epoch(index: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return split.batches(BATCH_SIZE, torch.Generator().manual_seed(index))

    pipeline = transforms.Compose([
        transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(), transforms.ToTensor(),
        transforms.Normalize(CIFAR100_MEAN, CIFAR100_STD),
    ])
    loader = DataLoader(PILImages(images_hwc, labels, pipeline), batch_size=BATCH_SIZE, shuffle=True,
                        num_workers=args.workers, persistent_workers=args.workers > 0,
                        pin_memory=device.type == "cuda")

    def loader_epoch(index: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, targets in loader:
            yield images.to(device, non_blocking=True), targets.to(device, non_blocking=True)

    results = {}
    for name, epoch in [("device-resident", resident_epoch), ("DataLoader", loader_epoch)]:
        seconds = time_epochs(epoch, args.epochs, device)
        results[name] = {"epoch_seconds": seconds, "images_per_second": args.images * len(seconds) / sum(seconds)}
    ratio = results["device-resident"]["images_per_second"] / results["DataLoader"]["images_per_second"]

    print(f"{args.images} images 3x32x32, batch {BATCH_SIZE}, device {device}, {args.epochs} timed epochs, "
          f"DataLoader workers {args.workers}, torch threads {torch.get_num_threads()}")
    print(f"{'pipeline':<16} {'s/epoch (mean)':>15} {'images/s':>12}")
    for name, result in results.items():
        mean = sum(result["epoch_seconds"]) / len(result["epoch_seconds"])
        print(f"{name:<16} {mean:>15.3f} {result['images_per_second']:>12,.0f}")
    print(f"ratio device-resident / DataLoader: {ratio:.1f}x")

    record = {
        "config": {"images": args.images, "classes": args.classes, "batch_size": BATCH_SIZE, "epochs": args.epochs,
                   "workers": args.workers, "device": str(device)},
        "environment": {"torch": torch.__version__, "python": platform.python_version(), "cpus": os.cpu_count(),
                        "torch_threads": torch.get_num_threads(),
                        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
        "results": results,
        "ratio_resident_over_dataloader": ratio,
    }
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
