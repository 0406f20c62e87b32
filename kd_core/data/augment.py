"""Batch transforms for device-resident splits: uint8 images (N, C, H, W) -> normalised float.

They run on whatever device holds the images, a whole batch at a time (no per-sample Python).
Random numbers come from the CPU generator that `Split.batches` passes, so a seed fixes the
augmentation on every device; only small index tensors travel to the images' device.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F

from kd_core.data.base import BatchTransform
from kd_core.registry import Registry

Stats = tuple[float, float, float]

CIFAR10_MEAN: Stats = (0.4914, 0.4822, 0.4465)
CIFAR10_STD: Stats = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN: Stats = (0.5071, 0.4865, 0.4409)
CIFAR100_STD: Stats = (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN: Stats = (0.485, 0.456, 0.406)
IMAGENET_STD: Stats = (0.229, 0.224, 0.225)


class Normalize:
    """uint8 (0..255) or float (0..1) images -> (x - mean) / std per channel, as float32."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        if len(mean) != len(std) or min(std) <= 0:
            raise ValueError(f"need one mean and one positive std per channel, got mean {mean}, std {std}")
        self.mean, self.std = tuple(mean), tuple(std)
        self._constants: dict[tuple[torch.device, bool], tuple[torch.Tensor, torch.Tensor]] = {}

    def _scale_shift(self, device: torch.device, from_uint8: bool) -> tuple[torch.Tensor, torch.Tensor]:
        # x * scale - shift in one fused pass; cached per device so no host->device copy per batch.
        key = (device, from_uint8)
        if key not in self._constants:
            std = torch.tensor(self.std, dtype=torch.float32)
            mean = torch.tensor(self.mean, dtype=torch.float32)
            scale = 1 / (std * 255) if from_uint8 else 1 / std
            self._constants[key] = (scale.view(-1, 1, 1).to(device), (mean / std).view(-1, 1, 1).to(device))
        return self._constants[key]

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        scale, shift = self._scale_shift(images.device, images.dtype == torch.uint8)
        return images.float() * scale - shift

    def draw(self, n: int, generator: torch.Generator) -> None:
        """No random parameters: every view of an image is the same."""
        return None

    def apply(self, images: torch.Tensor, params: torch.Tensor | None) -> torch.Tensor:
        return self(images)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mean={self.mean}, std={self.std})"


class CropFlipNormalize:
    """Random crop from a zero-padded image and random horizontal flip per sample, then normalise.

    Matches torchvision's RandomCrop(size, padding) + RandomHorizontalFlip + ToTensor + Normalize.
    With `generator` None (evaluation) it only normalises.
    """

    def __init__(self, padding: int = 4, flip: bool = True, *, mean: Sequence[float], std: Sequence[float]) -> None:
        if padding < 0:
            raise ValueError(f"padding must be >= 0, got {padding}")
        self.padding, self.flip = padding, flip
        self.normalize = Normalize(mean, std)

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if generator is None:
            return self.normalize(images)
        return self.apply(images, self.draw(len(images), generator))

    def draw(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """Random parameters of `n` views, (n, 3): crop offsets dy, dx and the flip bit.

        Drawn on the CPU generator (reproducible everywhere); `apply` replays them, so a fixed
        bank of views can be stored and shown again (the teacher-output cache does)."""
        p = self.padding
        dy = torch.randint(0, 2 * p + 1, (n, 1), generator=generator)
        dx = torch.randint(0, 2 * p + 1, (n, 1), generator=generator)
        flipped = (torch.rand(n, 1, generator=generator) < 0.5 if self.flip
                   else torch.zeros(n, 1, dtype=torch.bool))
        return torch.cat([dy, dx, flipped.long()], dim=1)

    def apply(self, images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        n, _, height, width = images.shape
        p = self.padding
        params = params.to(images.device, non_blocking=True)
        dy, dx, flipped = params[:, :1], params[:, 1:2], params[:, 2:].bool()
        # Output pixel (i, j) of sample k reads padded pixel (dy_k + i, dx_k + j), or (dy_k + i, dx_k + W-1-j)
        # when flipped: crop and flip are one gather along the flattened padded image.
        columns = torch.arange(width, device=images.device)
        rows = dy + torch.arange(height, device=images.device)
        cols = dx + torch.where(flipped, columns.flip(0), columns)
        padded = F.pad(images, (p, p, p, p)) if p else images
        index = (rows.view(n, height, 1) * (width + 2 * p) + cols.view(n, 1, width)).view(n, 1, height * width)
        cropped = padded.flatten(2).gather(2, index.expand(-1, images.shape[1], -1)).view(images.shape)
        return self.normalize(cropped)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(padding={self.padding}, flip={self.flip}, "
                f"mean={self.normalize.mean}, std={self.normalize.std})")


AugmentationRecipe = Callable[[Sequence[float], Sequence[float]], tuple[BatchTransform, BatchTransform]]

#: Named recipes: (mean, std) -> (train transform, eval transform).
AUGMENTATIONS: Registry[AugmentationRecipe] = Registry("augmentation")
#: The registered names, as a type: dataset factories use it so a spec with a typo fails validation.
AugmentationName = Literal["none", "crop_flip"]


@AUGMENTATIONS.register("none")
def no_augmentation(mean: Sequence[float], std: Sequence[float]) -> tuple[BatchTransform, BatchTransform]:
    return Normalize(mean, std), Normalize(mean, std)


@AUGMENTATIONS.register("crop_flip")
def crop_flip(mean: Sequence[float], std: Sequence[float]) -> tuple[BatchTransform, BatchTransform]:
    """The standard CIFAR recipe: 4-pixel zero padding, random crop, random horizontal flip."""
    return CropFlipNormalize(4, True, mean=mean, std=std), Normalize(mean, std)
