"""Synthetic shapes: one rendered visual class per class index, generated here (no downloads).

LW-KD's lightweight teacher trains on these (docs/methods.md, lwkd). Class c is a fixed
composition of simple shapes (discs, rings, rectangles, bars) whose kinds, positions, sizes,
orientations and colours come from a generator seeded by c alone, so a class looks the same
for every seed and every class count. The seed drives only the per-sample affine jitter
(rotation, scale, translation), the noise and the split.
"""

from __future__ import annotations

import math
from typing import Annotated

import torch
import torch.nn.functional as F
from annotated_types import Ge, Gt, Lt

from kd_core.data.base import Dataset, Split, seeded_split
from kd_core.data.registry import DATASETS

DEFAULT_VAL_FRACTION = 0.15
DEFAULT_TEST_FRACTION = 0.2

LAYOUT_SEED = 20_200_713  # class layouts; independent of the sample seed
SHAPES_PER_CLASS = 3
DISC, RING, RECTANGLE, BAR = range(4)
MAX_ROTATION = math.radians(10)
MAX_SHIFT = 0.1  # in units of half the image width
SCALE_RANGE = (0.9, 1.1)
NOISE_STD = 0.1  # on colours in [0, 1]
REFERENCE_PER_CLASS, REFERENCE_SEED = 20, -1  # the draw that fixes the normalisation


def _uniform(generator: torch.Generator, low: float, high: float, size: tuple[int, ...] = ()) -> torch.Tensor:
    return low + (high - low) * torch.rand(size, generator=generator)


def _render_class(class_index: int, image_size: int, channels: int) -> torch.Tensor:
    """The jitter-free image (channels, H, W) of one class, colours in [0, 1]."""
    generator = torch.Generator().manual_seed(LAYOUT_SEED + class_index)
    pixel = 2.0 / image_size  # one pixel in the [-1, 1] coordinates of affine_grid
    centres = torch.linspace(-1 + pixel / 2, 1 - pixel / 2, image_size)
    y, x = torch.meshgrid(centres, centres, indexing="ij")
    thin = max(0.08, pixel / 2)  # half-thickness of rings and bars: at least one pixel wide
    canvas = torch.zeros(channels, image_size, image_size)
    for _ in range(SHAPES_PER_CLASS):
        kind = int(torch.randint(4, (), generator=generator))
        cx, cy = _uniform(generator, -0.6, 0.6, (2,)).tolist()
        angle = float(_uniform(generator, 0, math.pi))
        colour = _uniform(generator, 0.25, 1.0, (channels,))
        # Coordinates in the shape's own rotated frame.
        u = (x - cx) * math.cos(angle) + (y - cy) * math.sin(angle)
        v = -(x - cx) * math.sin(angle) + (y - cy) * math.cos(angle)
        radius = torch.hypot(u, v)
        if kind == DISC:
            inside = float(_uniform(generator, 0.2, 0.45)) - radius
        elif kind == RING:
            inside = thin - (radius - float(_uniform(generator, 0.3, 0.55))).abs()
        elif kind == RECTANGLE:
            half_u, half_v = _uniform(generator, 0.15, 0.45, (2,)).tolist()
            inside = torch.minimum(half_u - u.abs(), half_v - v.abs())
        else:
            inside = torch.minimum(float(_uniform(generator, 0.5, 0.9)) - u.abs(), thin - v.abs())
        mask = torch.sigmoid(4 * inside / pixel)  # soft edges about one pixel wide: small images stay smooth
        canvas = canvas * (1 - mask) + colour[:, None, None] * mask
    return canvas


def class_prototypes(num_classes: int, image_size: int, channels: int) -> torch.Tensor:
    """Jitter-free images of every class, (num_classes, channels, H, W)."""
    return torch.stack([_render_class(c, image_size, channels) for c in range(num_classes)])


def _jitter(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random small rotation, scale and translation per image."""
    n = len(images)
    angle = _uniform(generator, -MAX_ROTATION, MAX_ROTATION, (n,))
    scale = _uniform(generator, *SCALE_RANGE, (n,))
    shift = _uniform(generator, -MAX_SHIFT, MAX_SHIFT, (n, 2))
    # affine_grid maps output to input coordinates: dividing by the scale zooms by it.
    cos, sin = angle.cos() / scale, angle.sin() / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _draw(prototypes: torch.Tensor, per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Jittered, noisy (unnormalised) samples of every class, grouped by class."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(len(prototypes)).repeat_interleave(per_class)
    images = _jitter(prototypes[labels], generator)
    return images + NOISE_STD * torch.randn(images.shape, generator=generator), labels


def normalisation(prototypes: torch.Tensor) -> tuple[float, float]:
    """(mean, std) of a fixed reference draw from `prototypes`.

    Fixed by the class layouts alone, so every seed and sample count shares one transform:
    LW-KD's bank (another seed) must see inputs normalised as the teacher's training data.
    """
    images = _draw(prototypes, REFERENCE_PER_CLASS, REFERENCE_SEED)[0]
    return images.mean().item(), images.std().item()


def synthetic_images(
    num_classes: int, image_size: int, channels: int, per_class: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`per_class` jittered, noisy, normalised images of every class, grouped by class.

    Returns images (num_classes * per_class, channels, image_size, image_size) and labels.
    """
    if num_classes < 2 or image_size < 4 or channels < 1 or per_class < 1:
        raise ValueError("synthetic images need num_classes >= 2, image_size >= 4, channels >= 1, "
                         f"per_class >= 1; got {num_classes}, {image_size}, {channels}, {per_class}")
    prototypes = class_prototypes(num_classes, image_size, channels)
    images, labels = _draw(prototypes, per_class, seed)
    mean, std = normalisation(prototypes)
    return (images - mean) / std, labels


@DATASETS.register("synthetic_shapes")
def synthetic_shapes(
    num_classes: Annotated[int, Ge(2)] = 10,
    image_size: Annotated[int, Ge(4)] = 32,
    channels: Annotated[int, Ge(1)] = 3,
    samples_per_class: Annotated[int, Ge(1)] = 100,
    seed: int = 0,
    val_fraction: Annotated[float, Gt(0), Lt(1)] = DEFAULT_VAL_FRACTION,
    test_fraction: Annotated[float, Gt(0), Lt(1)] = DEFAULT_TEST_FRACTION,
) -> Dataset:
    """Seeded synthetic shapes and a seeded train/val/test split (val carved from non-test)."""
    images, labels = synthetic_images(num_classes, image_size, channels, samples_per_class, seed)
    train, val, test = seeded_split(len(labels), (val_fraction, test_fraction), seed)
    mean, std = normalisation(class_prototypes(num_classes, image_size, channels))
    return Dataset(
        "synthetic_shapes",
        Split(images[train], labels[train]),
        Split(images[val], labels[val]),
        Split(images[test], labels[test]),
        num_classes=num_classes,
        in_channels=channels,
        preprocess={"input": "rendered by kd_core.data.synthetic (colours in [0, 1])", "mean": mean, "std": std},
    )
